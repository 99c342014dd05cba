//! The local runtime: the embedded table and queues in one SQLite file under a data folder,
//! `sqlite` and `odata` apps as connectors, and the four steps driven by tokio tasks.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::ingress::pump_feed;
use super::tracking::{poll_map, tracked_maps, PollReport};
use super::worker::{run_loop, run_once};
use crate::adapters::connectors::odata_apps::OdataApps;
use crate::adapters::connectors::sqlite::{CaptureSpec, SqliteApp};
use crate::adapters::embedded::{EmbeddedDb, EmbeddedKv, EmbeddedQueue, QueueConfig};
use crate::domain::config::JobDef;
use crate::domain::job::{ConnectorSpec, Job, Side};
use crate::ports::{ChangeTracking, Clock, Connector, ConnectorError, Queue, SystemClock};
use crate::state::{JobRecord, State, StateError};
use crate::steps::{lifecycle, ConnectorRegistry, Failpoints, StepError, StepKind, Steps};

/// How often a running runner trims change logs and purges expired items.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(10);

/// Messages a worker takes per receive.
pub const BATCH: usize = 500;

/// Opens each app once and shares it: `sqlite` apps by path, `odata` apps by name and service
/// root (their requests share the process's limiter of that service either way). An odata
/// app's secret comes from its environment variable, or from the AWS store the job file names
/// behind it (read with the default AWS settings at first use).
pub struct SqliteRegistry {
    open: Mutex<HashMap<PathBuf, Arc<SqliteApp>>>,
    odata: OdataApps,
}

impl Default for SqliteRegistry {
    fn default() -> Self {
        Self::with_secrets(Arc::new(crate::adapters::aws::AwsSecrets::from_default_settings()))
    }
}

impl SqliteRegistry {
    /// With odata apps reading their stored secrets through `secrets`.
    pub fn with_secrets(secrets: Arc<dyn crate::ports::SecretStore>) -> Self {
        SqliteRegistry { open: Mutex::default(), odata: OdataApps::new(secrets) }
    }

    pub fn app(&self, name: &str, path: &Path) -> Result<Arc<SqliteApp>, ConnectorError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(app) = open.get(path) {
            return Ok(app.clone());
        }
        let app = Arc::new(SqliteApp::open(name, path)?);
        open.insert(path.to_path_buf(), app.clone());
        Ok(app)
    }

    fn side(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError> {
        let app = &job.apps[side.index()];
        match &app.connector {
            ConnectorSpec::Sqlite { path } => self.app(&app.name, Path::new(path)),
            ConnectorSpec::Odata(_) => Err(ConnectorError::Rejected {
                app: app.name.clone(),
                message: "an odata app has no local change log".into(),
            }),
        }
    }

    /// The odata app behind a side, opened once.
    #[cfg(feature = "odata")]
    fn odata_app(
        &self,
        job: &Job,
        side: Side,
    ) -> Result<Arc<crate::adapters::connectors::odata::OdataApp>, ConnectorError> {
        let app = &job.apps[side.index()];
        let ConnectorSpec::Odata(spec) = &app.connector else {
            return Err(ConnectorError::Rejected { app: app.name.clone(), message: "not an odata app".into() });
        };
        self.odata.app(&app.name, spec)
    }

    fn connector(&self, job: &Job, side: Side) -> Result<Arc<dyn Connector>, ConnectorError> {
        let app = &job.apps[side.index()];
        match &app.connector {
            ConnectorSpec::Sqlite { .. } => Ok(self.side(job, side)? as Arc<dyn Connector>),
            ConnectorSpec::Odata(spec) => self.odata.open(&app.name, spec),
        }
    }
}

/// Whether a side of the job is a local `sqlite` app, with a change log to read.
pub fn has_change_log(job: &Job, side: Side) -> bool {
    matches!(job.apps[side.index()].connector, ConnectorSpec::Sqlite { .. })
}

/// The apps of the local runner: connectors, plus the local sqlite app behind each side for
/// installing change capture and reading its change log.
pub trait AppRegistry: ConnectorRegistry {
    fn sqlite_app(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError>;
}

impl AppRegistry for SqliteRegistry {
    fn sqlite_app(&self, job: &Job, side: Side) -> Result<Arc<SqliteApp>, ConnectorError> {
        self.side(job, side)
    }
}

impl ConnectorRegistry for SqliteRegistry {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError> {
        Ok([self.connector(job, Side::A)?, self.connector(job, Side::B)?])
    }

    #[cfg(feature = "odata")]
    fn tracker(&self, job: &Job, side: Side) -> Result<Arc<dyn ChangeTracking>, ConnectorError> {
        Ok(self.odata_app(job, side)? as Arc<dyn ChangeTracking>)
    }
}

/// Installs change capture (triggers and change log) for every mapped entity in each of a
/// job's sqlite apps (an odata app's changes come through ingress).
pub fn install_capture(apps: &dyn AppRegistry, job: &Job) -> Result<(), ConnectorError> {
    for side in Side::BOTH.into_iter().filter(|s| has_change_log(job, *s)) {
        let specs: Vec<CaptureSpec> = job
            .maps
            .iter()
            .map(|m| CaptureSpec {
                entity: m.entity(side).to_string(),
                key_fields: m.key_fields(side),
                company_field: m.company.as_ref().map(|c| c[side.index()].clone()),
            })
            .collect();
        apps.sqlite_app(job, side)?.install_capture(&specs)?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("cannot use data folder {path}: {reason}")]
    DataDir { path: String, reason: String },
}

pub struct LocalRuntime {
    pub state: State,
    kv: EmbeddedKv,
    pub steps: Arc<Steps>,
    pub apps: Arc<dyn AppRegistry>,
    pub capture: Arc<EmbeddedQueue>,
    pub sequence: Arc<EmbeddedQueue>,
    pub deliver: Arc<EmbeddedQueue>,
    pub reconcile: Arc<EmbeddedQueue>,
    pub dead_letters: [Arc<EmbeddedQueue>; 4],
    /// Deliver workers run side by side; FIFO groups keep each group in order.
    pub deliver_workers: usize,
    /// When each tracked map (job, app, map) was last polled by this process (behind an `Arc`
    /// to keep the runtime small).
    polled: Arc<Mutex<HashMap<TrackedMapId, std::time::Instant>>>,
    /// Per tracked map, when the last poll that read to the end of its answer began (a poll
    /// of several turns: its first turn), and when an unfinished one began.
    read_through: Arc<Mutex<HashMap<TrackedMapId, ReadThrough>>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct ReadThrough {
    finished: Option<std::time::Instant>,
    unfinished: Option<std::time::Instant>,
}

/// A tracked map: job, app, map.
type TrackedMapId = (String, String, String);

/// Pages one poll of a tracked map reads at most before the poller turns to other work (a
/// first listing of a large table goes on at the next turn, from its saved position).
const TRACKING_PAGES_PER_TURN: usize = 20;

impl LocalRuntime {
    /// Opens (or creates) the runtime state in `data_dir/state.db`.
    pub fn open(data_dir: &Path) -> Result<Self, RuntimeError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| RuntimeError::DataDir { path: data_dir.display().to_string(), reason: e.to_string() })?;
        let db = EmbeddedDb::open(&data_dir.join("state.db"), Arc::new(SystemClock))
            .map_err(|e| RuntimeError::DataDir { path: data_dir.display().to_string(), reason: e.to_string() })?;
        Ok(Self::with_db(db, Arc::new(SystemClock), Failpoints::default()))
    }

    /// A runtime over a given database and clock, with failpoints: for tests.
    pub fn with_db(db: EmbeddedDb, clock: Arc<dyn Clock>, failpoints: Failpoints) -> Self {
        Self::with_registry(db, clock, failpoints, Arc::new(SqliteRegistry::default()))
    }

    /// As [`Self::with_db`], with the apps opened through `apps` (tests wrap them to inject faults).
    pub fn with_registry(
        db: EmbeddedDb,
        clock: Arc<dyn Clock>,
        failpoints: Failpoints,
        apps: Arc<dyn AppRegistry>,
    ) -> Self {
        let queue = |name: &str, fifo: bool| {
            let dlq = Arc::new(db.queue(QueueConfig::new(format!("{name}-dlq"), fifo)));
            let mut cfg = QueueConfig::new(name, fifo);
            cfg.visibility_timeout = Duration::from_secs(30);
            cfg.max_receive_count = 5;
            cfg.dead_letter = Some(format!("{name}-dlq"));
            (Arc::new(db.queue(cfg)), dlq)
        };
        let (capture, capture_dlq) = queue("capture", false);
        let (sequence, sequence_dlq) = queue("sequence", false);
        let (deliver, deliver_dlq) = queue("deliver.fifo", true);
        let (reconcile, reconcile_dlq) = queue("reconcile.fifo", true);
        let kv = db.kv();
        let state = State::new(Arc::new(kv.clone()), clock);
        let steps =
            Steps::new(state.clone(), apps.clone() as Arc<dyn ConnectorRegistry>, sequence.clone(), deliver.clone())
                .with_failpoints(failpoints);
        LocalRuntime {
            state,
            kv,
            steps: Arc::new(steps),
            apps,
            capture,
            sequence,
            deliver,
            reconcile,
            dead_letters: [capture_dlq, sequence_dlq, deliver_dlq, reconcile_dlq],
            deliver_workers: 2,
            polled: Arc::new(Mutex::new(HashMap::new())),
            read_through: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Stores a job definition (validated). Relative sqlite paths must be resolved by the caller.
    pub async fn apply(&self, def: JobDef) -> Result<JobRecord, RuntimeError> {
        Ok(self.state.apply_job(def).await?)
    }

    /// Starts a job: installs change capture in its sqlite apps, then makes it active.
    pub async fn start(&self, job: &str) -> Result<(), RuntimeError> {
        lifecycle::start(&self.state, self.deliver.as_ref(), job, |j| install_capture(self.apps.as_ref(), j)).await?;
        Ok(())
    }

    /// Stops a job: it moves no data until started again; captured changes stay queued.
    pub async fn stop(&self, job: &str) -> Result<(), RuntimeError> {
        lifecycle::stop(&self.state, job).await?;
        Ok(())
    }

    async fn active_jobs(&self) -> Result<Vec<Job>, RuntimeError> {
        Ok(self.state.capturing_jobs().await?)
    }

    /// Moves every active job's app change logs onto the capture queue; returns the rows moved.
    pub async fn pump_feeds(&self, limit: usize) -> Result<usize, RuntimeError> {
        let mut n = 0;
        for job in self.active_jobs().await? {
            for side in Side::BOTH.into_iter().filter(|s| has_change_log(&job, *s)) {
                let app = self.apps.sqlite_app(&job, side)?;
                n += pump_feed(
                    &self.state,
                    &job.name,
                    job.app_name(side),
                    app.as_ref(),
                    self.capture.as_ref(),
                    limit,
                    &self.steps.metrics.echoes_suppressed,
                )
                .await?;
            }
        }
        Ok(n)
    }

    /// Polls one tracked map, `max_pages` pages at most.
    async fn poll_one(&self, job: &Job, side: Side, m: usize, max_pages: usize) -> Result<PollReport, RuntimeError> {
        let map = &job.maps[m];
        let began = std::time::Instant::now();
        let source = self.apps.tracker(job, side)?;
        let report = poll_map(&self.state, job, side, map, source.as_ref(), self.capture.as_ref(), max_pages).await?;
        let id = (job.name.clone(), job.app_name(side).to_string(), map.name.clone());
        {
            let mut read = self.read_through.lock().unwrap_or_else(|e| e.into_inner());
            let r = read.entry(id.clone()).or_default();
            let first = r.unfinished.take().unwrap_or(began);
            if report.more {
                r.unfinished = Some(first);
            } else {
                r.finished = Some(first);
            }
        }
        self.polled.lock().unwrap_or_else(|e| e.into_inner()).insert(id, std::time::Instant::now());
        Ok(report)
    }

    /// Polls every tracked map of every active job now, each to the end of its answer; the
    /// references sent (upserts and deletes).
    pub async fn poll_tracking(&self) -> Result<usize, RuntimeError> {
        let mut n = 0;
        for job in self.active_jobs().await? {
            for (side, m) in tracked_maps(&job) {
                loop {
                    let r = self.poll_one(&job, side, m, TRACKING_PAGES_PER_TURN).await?;
                    n += r.upserts + r.deletes;
                    if !r.more {
                        break;
                    }
                }
            }
        }
        Ok(n)
    }

    /// Polls the tracked maps whose interval has passed (or whose last poll stopped short of
    /// its answer's end); one map's failure is logged and the others go on. True when some
    /// map has more to read at once.
    async fn poll_tracking_due(&self, more: &mut std::collections::HashSet<(String, usize, Side)>) -> bool {
        let jobs = match self.active_jobs().await {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "change tracking: listing jobs");
                return false;
            }
        };
        for job in jobs {
            for (side, m) in tracked_maps(&job) {
                let every = job.apps[side.index()].tracking.map_or(0, |t| t.poll_seconds);
                let id = (job.name.clone(), job.app_name(side).to_string(), job.maps[m].name.clone());
                let last = self.polled.lock().unwrap_or_else(|e| e.into_inner()).get(&id).copied();
                let due = more.contains(&(job.name.clone(), m, side))
                    || last.is_none_or(|t| t.elapsed() >= Duration::from_secs(every));
                if !due {
                    continue;
                }
                match self.poll_one(&job, side, m, TRACKING_PAGES_PER_TURN).await {
                    Ok(r) if r.more => {
                        more.insert((job.name.clone(), m, side));
                    }
                    Ok(_) => {
                        more.remove(&(job.name.clone(), m, side));
                    }
                    Err(e) => {
                        // Polled all the same: the next try waits its interval.
                        self.polled.lock().unwrap_or_else(|e| e.into_inner()).insert(id, std::time::Instant::now());
                        more.remove(&(job.name.clone(), m, side));
                        tracing::error!(job = %job.name, app = job.app_name(side), map = %job.maps[m].name,
                            error = %e, "change tracking: poll failed; trying again after the poll interval");
                    }
                }
            }
        }
        !more.is_empty()
    }

    /// Whether every tracked map of every active job was read to the end of its changes by a
    /// poll that began after `mark`: what the apps changed before `mark` is then on the capture
    /// queue. ([`Self::is_idle`] cannot tell changes an app holds that no poll has read yet.)
    pub async fn tracking_read_since(&self, mark: std::time::Instant) -> Result<bool, RuntimeError> {
        let read = self.read_through.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for job in self.active_jobs().await? {
            for (side, m) in tracked_maps(&job) {
                let id = (job.name.clone(), job.app_name(side).to_string(), job.maps[m].name.clone());
                if read.get(&id).and_then(|r| r.finished).is_none_or(|t| t < mark) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The queue a step reads.
    pub fn queue(&self, step: StepKind) -> &Arc<EmbeddedQueue> {
        match step {
            StepKind::Capture => &self.capture,
            StepKind::Sequence => &self.sequence,
            StepKind::Deliver => &self.deliver,
            StepKind::Reconcile => &self.reconcile,
        }
    }

    /// The operators' service over this runtime's state and queues.
    pub fn admin(&self) -> crate::admin::Admin {
        let queues = StepKind::ALL.into_iter().zip(&self.dead_letters).map(|(step, dead)| {
            crate::admin::DeadLetterQueue { step, work: self.queue(step).clone(), dead: dead.clone() }
        });
        let apps = self.apps.clone();
        crate::admin::Admin::new(self.state.clone(), self.deliver.clone(), self.reconcile.clone())
            .with_dead_letter_queues(queues.collect())
            .with_installer(Arc::new(move |job| install_capture(apps.as_ref(), job)))
    }

    /// The handler of pushed events (webhooks, business events) over this runtime's state, apps
    /// and capture queue; keys from the process environment.
    pub fn ingress(&self) -> crate::steps::ingress::Ingress {
        crate::steps::ingress::Ingress::new(
            self.state.clone(),
            self.apps.clone() as Arc<dyn ConnectorRegistry>,
            self.capture.clone(),
        )
    }

    /// Runs one batch of one step in this task; returns the messages handled.
    pub async fn step_once(&self, step: StepKind) -> Result<usize, StepError> {
        let steps = &self.steps;
        let queue = self.queue(step).as_ref();
        run_once(queue, BATCH, &|m| async move {
            let r = steps.handle(step, queue, &m).await;
            (m, r)
        })
        .await
    }

    /// One round of every step, in this task: what tests and `drain` use.
    pub async fn pump(&self) -> Result<usize, RuntimeError> {
        let mut n = self.pump_feeds(BATCH * 4).await?;
        for step in [StepKind::Capture, StepKind::Sequence, StepKind::Deliver, StepKind::Reconcile] {
            n += self.step_once(step).await?;
        }
        Ok(n)
    }

    /// Housekeeping for a long run: trims the change-log rows every job has consumed and purges
    /// expired items (capture dedupe) from the state table.
    pub async fn housekeeping(&self) -> Result<(), RuntimeError> {
        let mut consumed: HashMap<PathBuf, (u64, Arc<SqliteApp>)> = HashMap::new();
        for job in self.active_jobs().await? {
            for side in Side::BOTH.into_iter().filter(|s| has_change_log(&job, *s)) {
                let app = self.apps.sqlite_app(&job, side)?;
                let pos = self.state.feed_position(&job.name, job.app_name(side)).await.map_err(StepError::from)?;
                // An app shared by several jobs keeps what the slowest of them has not read.
                let entry = consumed.entry(app.path().to_path_buf()).or_insert((pos, app));
                entry.0 = entry.0.min(pos);
            }
        }
        for (upto, app) in consumed.into_values() {
            app.trim_changes(upto)?;
        }
        self.kv.purge_expired().map_err(StepError::from)?;
        Ok(())
    }

    /// True when no change log has unread rows and no queue holds a message (visible or not).
    /// The change logs are read first: the feed pump sends to capture before it moves its
    /// position, and the queues are then read in one snapshot, so work in motion between any
    /// two of them is always seen.
    pub async fn is_idle(&self) -> Result<bool, RuntimeError> {
        for job in self.active_jobs().await? {
            // A tracked map this process has not polled yet may hold changes.
            for (side, m) in tracked_maps(&job) {
                let id = (job.name.clone(), job.app_name(side).to_string(), job.maps[m].name.clone());
                if !self.polled.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&id) {
                    return Ok(false);
                }
            }
            for side in Side::BOTH.into_iter().filter(|s| has_change_log(&job, *s)) {
                let app = self.apps.sqlite_app(&job, side)?;
                let pos = self.state.feed_position(&job.name, job.app_name(side)).await.map_err(StepError::from)?;
                if !crate::ports::ChangeFeed::changes_after(app.as_ref(), pos, 1).await?.is_empty() {
                    return Ok(false);
                }
            }
        }
        let queues = [&*self.capture, &*self.sequence, &*self.deliver, &*self.reconcile];
        Ok(EmbeddedQueue::all_empty(&queues).map_err(StepError::from)?)
    }

    /// Spawns the workers: a change-log poller, a change-tracking poller, capture, sequence and
    /// the deliver workers. They
    /// stop, each after its current batch, when `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let rt = self.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut last_housekeeping = std::time::Instant::now();
            while !*stop.borrow() {
                if last_housekeeping.elapsed() > HOUSEKEEPING_EVERY {
                    if let Err(e) = rt.housekeeping().await {
                        tracing::error!(error = %e, "housekeeping");
                    }
                    last_housekeeping = std::time::Instant::now();
                }
                let moved = match rt.pump_feeds(BATCH * 4).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "reading app change logs");
                        0
                    }
                };
                if moved == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }));
        let rt = self.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut more = std::collections::HashSet::new();
            while !*stop.borrow() {
                if !rt.poll_tracking_due(&mut more).await {
                    // Intervals are whole seconds: a check every second keeps each within one.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }));
        let mut steps = vec![StepKind::Capture, StepKind::Sequence, StepKind::Reconcile];
        steps.extend(std::iter::repeat_n(StepKind::Deliver, self.deliver_workers));
        // Each deliver worker's receive takes its share of a job's groups, not all of them,
        // so that the waves of several workers overlap (design note 26).
        let groups = usize::try_from(crate::domain::sequence::GROUPS).unwrap_or(usize::MAX);
        self.deliver.share_groups(groups, self.deliver_workers);
        for step in steps {
            let handler = self.steps.clone();
            let queue = self.queue(step).clone() as Arc<dyn Queue>;
            let input = queue.clone();
            tasks.push(tokio::spawn(run_loop(
                queue,
                BATCH,
                move |m| {
                    let s = handler.clone();
                    let input = input.clone();
                    async move {
                        let r = s.handle(step, input.as_ref(), &m).await;
                        (m, r)
                    }
                },
                shutdown.clone(),
            )));
        }
        tasks
    }
}
