//! Fixtures shared by the end-to-end tests: a job with parents, children (a lookup to parents)
//! and a live map, its two sqlite apps, connectors whose faults a test controls, and the
//! in-process harness over them.
#![allow(dead_code)] // each test binary uses its own part of this

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dualsync::adapters::connectors::sqlite::{transaction, SqliteApp};
use dualsync::adapters::embedded::EmbeddedDb;
use dualsync::domain::change::Key;
use dualsync::domain::config::{parse_job, JobDef};
use dualsync::domain::errors::{ErrorStatus, SyncError};
use dualsync::domain::job::{Job, Side};
use dualsync::ports::{Connector, ConnectorError, EntitySpec, ListPage, ManualClock, Record, WriteFailure, WriteOp};
use dualsync::runtime::local::{AppRegistry, LocalRuntime, SqliteRegistry};
use dualsync::runtime::verify::{compare, MapComparison};
use dualsync::state::ErrorFilter;
use dualsync::steps::{ConnectorRegistry, Failpoints};

const JOB: &str = "job: j
apps:
  - { name: a, connector: sqlite, path: A }
  - { name: b, connector: sqlite, path: B }
primary: a
companies: [X]
table_groups:
  - name: g
    maps:
      - name: parents
        sequence: 1
        entities: { a: parents, b: owners }
        company: { a: co, b: company }
        keys: [{ a: pid, b: owner_id }]
        fields:
          - { a: name, b: title }
          - { a: co, b: company }
          - a: kind
            b: kind_code
            values: [{ a: small, b: 1 }, { a: large, b: 2 }]
      - name: children
        sequence: 2
        entities: { a: children, b: items }
        keys: [{ a: pid, b: owner_id }, { a: cno, b: item_no }]
        fields: [{ a: label, b: caption }]
        lookups:
          - map: parents
            fields: [{ a: pid, b: owner_id }]
      - name: notes
        sequence: 3
        mode: live
        entities: { a: notes, b: memos }
        keys: [{ a: nid, b: memo_id }]
        fields: [{ a: text, b: body }]
";

/// Creates the two apps' tables at `a` and `b`; returns the job pointed at them.
pub fn create_apps(a: &Path, b: &Path) -> JobDef {
    apps_of(
        a,
        b,
        [
            "CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, co TEXT, kind TEXT);
             CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));
             CREATE TABLE notes (nid TEXT PRIMARY KEY, text TEXT);",
            "CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT NOT NULL, company TEXT, kind_code INTEGER);
             CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));
             CREATE TABLE memos (memo_id TEXT PRIMARY KEY, body TEXT);",
        ],
        JOB,
    )
}

/// Creates each app's tables (`schemas`: A's, B's) at `a` and `b`; returns the job of `yaml`
/// (apps `a` and `b`) pointed at them.
pub fn apps_of(a: &Path, b: &Path, schemas: [&str; 2], yaml: &str) -> JobDef {
    for (path, sql) in [(a, schemas[0]), (b, schemas[1])] {
        rusqlite::Connection::open(path).unwrap().execute_batch(sql).unwrap();
    }
    let mut def = parse_job("job.yaml", yaml).unwrap();
    def.apps[0].path = Some(a.display().to_string());
    def.apps[1].path = Some(b.display().to_string());
    def
}

/// One app transaction with its own transaction id.
pub fn exec(path: &Path, sql: &str) {
    static TX: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut conn = rusqlite::Connection::open(path).unwrap();
    let txid = format!("t{}", TX.fetch_add(1, Ordering::SeqCst));
    transaction(&mut conn, &txid, |tx| tx.execute_batch(sql)).unwrap();
}

pub fn query(path: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(path).unwrap().query_row(sql, [], |r| r.get(0)).unwrap()
}

/// What side A's or B's writes do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writes {
    Work,
    /// Fail like a 503: not made.
    Fail,
    /// Refused like a 400.
    Refuse,
    /// Made, then answered like a time-out: landed, and the caller cannot know it.
    LandThenFail,
    /// The next write call refused like a 429 with a Retry-After of 1 s (not made); the ones
    /// after it work.
    ThrottleOnce,
}

pub type Hook = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Controls over one side's connector.
#[derive(Clone)]
pub struct Control {
    pub writes: Arc<Mutex<Writes>>,
    /// Runs once, just before the next write reaches the app: a user acting between delivery's
    /// read and its write.
    pub before_write: Arc<Mutex<Option<Hook>>>,
    /// Whether reads give each record's latest change seq (the sqlite connector's do); off, the
    /// steps take capture's link-state path instead.
    pub reads_change_seq: bool,
    /// A schedule of yields, one bit per connector call (read, write, delete), lowest first: a
    /// set bit makes that call yield to the other tasks of its thread before it runs. Two
    /// deliveries joined on one thread then interleave their reads and writes as the bits say.
    pub yields: Arc<AtomicU64>,
}

impl Control {
    pub fn new() -> Self {
        Control {
            writes: Arc::new(Mutex::new(Writes::Work)),
            before_write: Arc::new(Mutex::new(None)),
            reads_change_seq: true,
            yields: Arc::default(),
        }
    }
    pub fn set(&self, w: Writes) {
        *self.writes.lock().unwrap() = w;
    }
}

/// One app's connector with its faults under a test's control.
pub struct Faulty {
    inner: Arc<dyn Connector>,
    control: Control,
}

impl Faulty {
    /// Yields first if the next bit of the schedule says so (see [`Control::yields`]).
    async fn next_call(&self) {
        let bits = self.control.yields.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| Some(b >> 1));
        if bits.is_ok_and(|b| b & 1 == 1) {
            tokio::task::yield_now().await;
        }
    }
}

#[async_trait]
impl Connector for Faulty {
    fn app(&self) -> &str {
        self.inner.app()
    }
    fn reads_change_seq(&self) -> bool {
        self.control.reads_change_seq && self.inner.reads_change_seq()
    }
    async fn read(&self, e: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError> {
        self.next_call().await;
        self.inner.read(e, keys).await
    }
    async fn write(
        &self,
        e: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError> {
        self.next_call().await;
        let hook = self.control.before_write.lock().unwrap().take();
        if let Some(hook) = hook {
            hook().await;
        }
        let mode = *self.control.writes.lock().unwrap();
        match mode {
            Writes::Work => self.inner.write(e, ops).await,
            Writes::Fail => Ok(ops
                .iter()
                .map(|_| Err(WriteFailure::Transient { message: "503 service unavailable".into(), retry_after: None }))
                .collect()),
            Writes::Refuse => Ok(ops.iter().map(|_| Err(WriteFailure::Rejected("400 bad request".into()))).collect()),
            Writes::ThrottleOnce => {
                *self.control.writes.lock().unwrap() = Writes::Work;
                let throttled = WriteFailure::Transient {
                    message: "429 too many requests".into(),
                    retry_after: Some(std::time::Duration::from_secs(1)),
                };
                Ok(ops.iter().map(|_| Err(throttled.clone())).collect())
            }
            Writes::LandThenFail => {
                self.inner.write(e, ops).await?;
                Err(ConnectorError::Transient {
                    app: self.app().into(),
                    message: "timed out".into(),
                    retry_after: None,
                })
            }
        }
    }
    async fn delete(&self, e: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError> {
        self.next_call().await;
        self.inner.delete(e, keys).await
    }
    async fn list(&self, e: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError> {
        self.inner.list(e, after, limit).await
    }
    async fn count(&self, e: &EntitySpec) -> Result<u64, ConnectorError> {
        self.inner.count(e).await
    }
}

/// The apps, each side behind a [`Faulty`] connector with its [`Control`]: the job's sqlite
/// apps, or connectors the test opened itself ([`Self::over`]).
pub struct FaultyRegistry {
    inner: SqliteRegistry,
    opened: Option<[Arc<dyn Connector>; 2]>,
    controls: [Control; 2],
}

impl FaultyRegistry {
    pub fn new(controls: [Control; 2]) -> Self {
        FaultyRegistry { inner: SqliteRegistry::default(), opened: None, controls }
    }

    /// Over connectors opened by the test (an odata app with a time-out of its own), whatever
    /// the job says of its apps.
    pub fn over(connectors: [Arc<dyn Connector>; 2], controls: [Control; 2]) -> Self {
        FaultyRegistry { inner: SqliteRegistry::default(), opened: Some(connectors), controls }
    }

    /// With fresh controls (every write works): the registry and its controls.
    pub fn fresh() -> (Arc<Self>, [Control; 2]) {
        let controls = [Control::new(), Control::new()];
        (Arc::new(FaultyRegistry::new(controls.clone())), controls)
    }
}

impl AppRegistry for FaultyRegistry {
    fn sqlite_app(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError> {
        self.inner.sqlite_app(job, side)
    }
}

impl ConnectorRegistry for FaultyRegistry {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError> {
        let [a, b] = match &self.opened {
            Some(c) => c.clone(),
            None => self.inner.connectors(job)?,
        };
        Ok([
            Arc::new(Faulty { inner: a, control: self.controls[0].clone() }),
            Arc::new(Faulty { inner: b, control: self.controls[1].clone() }),
        ])
    }
}

/// A job's two sqlite apps, each behind a [`Faulty`] connector, on the embedded runner with a
/// manual clock, the job started: the harness of the end-to-end tests that run in process.
pub struct Local {
    _dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
    pub rt: Arc<LocalRuntime>,
    pub clock: ManualClock,
    pub controls: [Control; 2],
    pub job: String,
    /// A crash to inject: the failpoint, and how many times it passes before it fires (once).
    pub crash_at: Arc<Mutex<Option<(String, u32)>>>,
}

impl Local {
    /// The job of [`create_apps`].
    pub async fn new() -> Local {
        Self::with(create_apps).await
    }

    /// `apps` makes the apps at the two paths it is given (their tables, any rows from before
    /// the job) and returns the job.
    pub async fn with(apps: impl FnOnce(&Path, &Path) -> JobDef) -> Local {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        let def = apps(&a, &b);
        let job = def.job.clone();
        let (registry, controls) = FaultyRegistry::fresh();
        let clock = ManualClock::new(1_700_000_000_000);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
        let crash_at: Arc<Mutex<Option<(String, u32)>>> = Arc::default();
        let armed = crash_at.clone();
        let failpoints = Failpoints::new(move |point| {
            let mut armed = armed.lock().unwrap();
            match armed.as_mut() {
                Some((p, 0)) if p == point => {
                    *armed = None;
                    true
                }
                Some((p, n)) if p == point => {
                    *n -= 1;
                    false
                }
                _ => false,
            }
        });
        let rt = LocalRuntime::with_registry(db, Arc::new(clock.clone()), failpoints, registry);
        rt.apply(def).await.unwrap();
        rt.start(&job).await.unwrap();
        Local { _dir: dir, a, b, rt: Arc::new(rt), clock, controls, job, crash_at }
    }

    pub fn path(&self, side: Side) -> &Path {
        match side {
            Side::A => &self.a,
            Side::B => &self.b,
        }
    }

    /// One app transaction on `side`.
    pub fn exec(&self, side: Side, sql: &str) {
        exec(self.path(side), sql)
    }

    /// The integer `sql` answers on `side`.
    pub fn query(&self, side: Side, sql: &str) -> i64 {
        query(self.path(side), sql)
    }

    /// The text `sql` answers on `side`; `None` when it finds no row.
    pub fn text(&self, side: Side, sql: &str) -> Option<String> {
        use rusqlite::OptionalExtension;
        rusqlite::Connection::open(self.path(side)).unwrap().query_row(sql, [], |r| r.get(0)).optional().unwrap()
    }

    /// Every step until nothing moves, letting retry delays pass.
    pub async fn drain(&self) {
        for _ in 0..100 {
            while self.rt.pump().await.unwrap() > 0 {}
            if self.rt.is_idle().await.unwrap() {
                return;
            }
            self.clock.advance(301_000);
        }
        panic!("pipeline did not drain");
    }

    pub async fn errors(&self) -> Vec<SyncError> {
        self.rows(ErrorFilter::default()).await
    }

    pub async fn rows(&self, filter: ErrorFilter) -> Vec<SyncError> {
        self.rt.state.error_rows(&self.job, &filter).await.unwrap().into_iter().map(|(_, e)| e).collect()
    }

    /// Open rows an operator would act on (concurrency skips are informational).
    pub async fn open_rows(&self) -> Vec<SyncError> {
        let filter = ErrorFilter { status: Some(ErrorStatus::Open), ..Default::default() };
        self.rows(filter).await.into_iter().filter(|r| r.retriable).collect()
    }

    /// Each map's records compared across the apps.
    pub async fn compare(&self) -> Vec<MapComparison> {
        let lj = self.rt.steps.load_job(&self.job).await.unwrap().unwrap();
        compare(&lj).await.unwrap()
    }
}

/// The emulator `./scripts/test` started (moto server at `DUALSYNC_TEST_AWS_ENDPOINT`); a
/// failure, not a skip, without it.
pub async fn emulator() -> aws_config::SdkConfig {
    let endpoint = std::env::var("DUALSYNC_TEST_AWS_ENDPOINT")
        .expect("DUALSYNC_TEST_AWS_ENDPOINT is not set: run the tests with ./scripts/test, which starts moto server");
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
    {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    dualsync::adapters::aws::sdk_config(Some(&endpoint)).await
}

/// Where a test body runs: the embedded runner, or the Lambda handlers over moto.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Local,
    Aws,
}

/// Runs each test body (`async fn name(backend: Backend)`) on both backends: tests
/// `local::name` and `aws::name`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod local {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Local).await })*
        }
        mod aws {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Backend::Aws).await })*
        }
    };
}
