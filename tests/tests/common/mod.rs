//! Fixtures shared by the end-to-end tests: a job with parents, children (a lookup to parents)
//! and a live map, its two sqlite apps, and a way to make one app's writes fail.
#![allow(dead_code)] // each test binary uses its own part of this

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use dualsync::adapters::connectors::sqlite::{transaction, SqliteApp};
use dualsync::domain::change::Key;
use dualsync::domain::config::{parse_job, JobDef};
use dualsync::domain::job::{Job, Side};
use dualsync::ports::{Connector, ConnectorError, EntitySpec, ListPage, Record, WriteFailure, WriteOp};
use dualsync::runtime::local::{AppRegistry, SqliteRegistry};
use dualsync::steps::ConnectorRegistry;

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

/// Wraps the sqlite apps so that a test can make side B's writes fail like a 503.
pub struct Flaky {
    inner: SqliteRegistry,
    fail_b_writes: Arc<AtomicBool>,
}

struct FlakyConnector {
    inner: Arc<dyn Connector>,
    fail: Arc<AtomicBool>,
}

#[async_trait]
impl Connector for FlakyConnector {
    fn app(&self) -> &str {
        self.inner.app()
    }
    async fn read(&self, e: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError> {
        self.inner.read(e, keys).await
    }
    async fn write(
        &self,
        e: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError> {
        if self.fail.load(Ordering::SeqCst) {
            let failure = WriteFailure::Transient { message: "503 service unavailable".into(), retry_after: None };
            return Ok(ops.iter().map(|_| Err(failure.clone())).collect());
        }
        self.inner.write(e, ops).await
    }
    async fn delete(&self, e: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError> {
        self.inner.delete(e, keys).await
    }
    async fn list(&self, e: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError> {
        self.inner.list(e, after, limit).await
    }
}

impl AppRegistry for Flaky {
    fn sqlite_app(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError> {
        self.inner.sqlite_app(job, side)
    }
}

impl ConnectorRegistry for Flaky {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError> {
        let [a, b] = self.inner.connectors(job)?;
        Ok([a, Arc::new(FlakyConnector { inner: b, fail: self.fail_b_writes.clone() })])
    }
}

impl Flaky {
    pub fn new(fail_b_writes: Arc<AtomicBool>) -> Self {
        Flaky { inner: SqliteRegistry::default(), fail_b_writes }
    }
}

/// Creates the two apps' tables at `a` and `b`; returns the job pointed at them.
pub fn create_apps(a: &Path, b: &Path) -> JobDef {
    let schema = |p: &Path, sql: &str| rusqlite::Connection::open(p).unwrap().execute_batch(sql).unwrap();
    schema(
        a,
        "CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, co TEXT, kind TEXT);
         CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));
         CREATE TABLE notes (nid TEXT PRIMARY KEY, text TEXT);",
    );
    schema(
        b,
        "CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT NOT NULL, company TEXT, kind_code INTEGER);
         CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));
         CREATE TABLE memos (memo_id TEXT PRIMARY KEY, body TEXT);",
    );
    let mut def = parse_job("job.yaml", JOB).unwrap();
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
}

/// The sqlite apps, each side behind a [`Faulty`] connector with its [`Control`].
pub struct FaultyRegistry {
    inner: SqliteRegistry,
    controls: [Control; 2],
}

impl FaultyRegistry {
    pub fn new(controls: [Control; 2]) -> Self {
        FaultyRegistry { inner: SqliteRegistry::default(), controls }
    }
}

impl AppRegistry for FaultyRegistry {
    fn sqlite_app(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError> {
        self.inner.sqlite_app(job, side)
    }
}

impl ConnectorRegistry for FaultyRegistry {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError> {
        let [a, b] = self.inner.connectors(job)?;
        Ok([
            Arc::new(Faulty { inner: a, control: self.controls[0].clone() }),
            Arc::new(Faulty { inner: b, control: self.controls[1].clone() }),
        ])
    }
}
