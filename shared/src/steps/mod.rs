//! The four steps, written once over the ports: [`capture`], [`sequence`], [`deliver`] and
//! [`reconcile`]. Each takes a batch of queue messages and answers one [`Outcome`] per message,
//! which a handler maps to acks and releases (locally) or to an `SqsBatchResponse` (Lambda).
pub mod capture;
pub mod deliver;
pub mod handle;
pub mod ingress;
pub mod initial_sync;
pub mod lifecycle;
pub mod metrics;
pub mod pause;
pub mod reconcile;
pub mod record;
pub mod redeliver;
pub mod sequence;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::job::{Job, JobStatus, Side};
use crate::ports::{Bind, Connector, ConnectorError, EntitySpec, Queue};
use crate::state::{State, StateError};
pub use metrics::Metrics;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (delivered, skipped, or recorded as an error row): acknowledge.
    Done,
    /// A system failure: give the message back, visible again after `delay`.
    Retry { delay: Duration, reason: String },
    /// The message cannot be handled at all (malformed, unknown job): give it back so that it
    /// reaches the dead-letter queue; the reason is logged.
    Poison { reason: String },
}

/// The queue-driven steps, for handlers that dispatch on which queue a batch came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepKind {
    Capture,
    Sequence,
    Deliver,
    Reconcile,
}

impl StepKind {
    /// In pipeline order.
    pub const ALL: [StepKind; 4] = [StepKind::Capture, StepKind::Sequence, StepKind::Deliver, StepKind::Reconcile];

    pub fn name(self) -> &'static str {
        match self {
            StepKind::Capture => "capture",
            StepKind::Sequence => "sequence",
            StepKind::Deliver => "deliver",
            StepKind::Reconcile => "reconcile",
        }
    }
}

impl Steps {
    /// Runs one step over a batch of its queue's messages (`input`: reconcile hands work on to
    /// messages of its own queue).
    pub async fn run(
        &self,
        step: StepKind,
        input: &dyn Queue,
        msgs: &[crate::ports::InMessage],
    ) -> Result<Vec<Outcome>, StepError> {
        match step {
            StepKind::Capture => self.capture(msgs).await,
            StepKind::Sequence => self.sequence(msgs).await,
            StepKind::Deliver => self.deliver(msgs).await,
            StepKind::Reconcile => self.reconcile_messages(input, msgs).await,
        }
    }
}

/// Crash injection for tests: a named point returns `true` to make the step stop there, as if
/// the process died (nothing after it happens, nothing is acknowledged).
#[derive(Clone, Default)]
pub struct Failpoints(Option<Arc<FailpointFn>>);

type FailpointFn = dyn Fn(&str) -> bool + Send + Sync;

impl Failpoints {
    pub fn new(f: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Failpoints(Some(Arc::new(f)))
    }
    pub fn check(&self, point: &str) -> Result<(), StepError> {
        match &self.0 {
            Some(f) if f(point) => Err(StepError::Crashed(point.to_string())),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A failpoint fired: the batch stops with nothing acknowledged.
    #[error("crashed at failpoint {0}")]
    Crashed(String),
    /// The key-value table or a queue is unreachable: the whole batch is retried.
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Kv(#[from] crate::ports::KvError),
    #[error(transparent)]
    Queue(#[from] crate::ports::QueueError),
    /// An app could not be reached or refused a whole call (outside the per-change paths).
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error("job '{job}' is {status}: start it first")]
    NotActive { job: String, status: &'static str },
    /// A request names something that does not exist: it cannot be run at all.
    #[error("{0}")]
    Refused(String),
    /// A task the step ran beside it stopped without an answer (it panicked).
    #[error("{0}")]
    Task(String),
}

/// Opens the connectors of a job's two apps (the runtime decides how, and caches them).
pub trait ConnectorRegistry: Send + Sync {
    fn connectors(&self, job: &Job) -> Result<[Arc<dyn Connector>; 2], ConnectorError>;

    /// The change tracking of the app on a side (an odata app with `capture: change_tracking`).
    fn tracker(&self, job: &Job, side: Side) -> Result<Arc<dyn crate::ports::ChangeTracking>, ConnectorError> {
        Err(ConnectorError::Rejected {
            app: job.app_name(side).to_string(),
            message: "this registry serves no change tracking".into(),
        })
    }
}

/// Backoff for system failures (throttling, 5xx, time-outs): the delay before a failed message is
/// received again grows by `factor` from `base` up to `cap`, and is never shorter than the app's
/// Retry-After. Over the queue's receives (5, after which the failure becomes a retriable error
/// row) the default waits 3 s, 24 s, 3.2 min and 15 min: a blip is retried at once, and an app
/// outage of 15 minutes and more passes without an error row (DESIGN §3).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub factor: u32,
    pub cap: Duration,
}

/// The longest an SQS message can be kept invisible (its visibility timeout's limit).
pub const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

impl Default for Backoff {
    fn default() -> Self {
        Backoff { base: Duration::from_secs(3), factor: 8, cap: Duration::from_secs(15 * 60) }
    }
}

impl Backoff {
    /// Short delays, for tests that wait in real time (a queue emulator).
    pub const QUICK: Backoff = Backoff { base: Duration::from_millis(200), factor: 2, cap: Duration::from_secs(2) };

    /// The delay after the `receive_count`-th receive failed.
    pub fn delay(&self, receive_count: u32, retry_after: Option<Duration>) -> Duration {
        let steps = receive_count.saturating_sub(1).min(16);
        let exp = self.base.saturating_mul(self.factor.saturating_pow(steps));
        exp.min(self.cap).max(retry_after.unwrap_or_default()).min(MAX_VISIBILITY)
    }

    /// How long the retries wait in all before a failure on the last of `receives` is recorded.
    pub fn ride_out(&self, receives: u32) -> Duration {
        (1..receives).map(|n| self.delay(n, None)).sum()
    }
}

/// A job ready to run: compiled, with its connectors and entity specs.
pub struct LoadedJob {
    pub job: Job,
    pub status: JobStatus,
    pub connectors: [Arc<dyn Connector>; 2],
    /// Per map, per side: what the connector reads and writes.
    pub specs: Vec<[EntitySpec; 2]>,
}

impl LoadedJob {
    pub fn connector(&self, side: Side) -> &Arc<dyn Connector> {
        &self.connectors[side.index()]
    }
    pub fn spec(&self, map_idx: usize, side: Side) -> &EntitySpec {
        &self.specs[map_idx][side.index()]
    }
}

/// Everything the steps need: the state table, the queues they send to, the connectors.
pub struct Steps {
    pub state: State,
    pub registry: Arc<dyn ConnectorRegistry>,
    pub sequence_queue: Arc<dyn Queue>,
    pub deliver_queue: Arc<dyn Queue>,
    pub failpoints: Failpoints,
    pub metrics: Arc<Metrics>,
    pub backoff: Backoff,
    jobs: Mutex<HashMap<String, (u64, Arc<LoadedJob>)>>,
}

impl Steps {
    pub fn new(
        state: State,
        registry: Arc<dyn ConnectorRegistry>,
        sequence_queue: Arc<dyn Queue>,
        deliver_queue: Arc<dyn Queue>,
    ) -> Self {
        Steps {
            state,
            registry,
            sequence_queue,
            deliver_queue,
            failpoints: Failpoints::default(),
            metrics: Arc::new(Metrics::default()),
            backoff: Backoff::default(),
            jobs: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_failpoints(mut self, failpoints: Failpoints) -> Self {
        self.failpoints = failpoints;
        self
    }

    /// The job, compiled and with its connectors; `None` if there is no such job. Reads the job
    /// item once per call (status changes take effect at once), compiles once per revision.
    pub async fn load_job(&self, name: &str) -> Result<Option<Arc<LoadedJob>>, StepError> {
        metrics::working_on(&self.metrics, name);
        let (record, _) = match self.state.job_record(name).await {
            Ok(r) => r,
            Err(StateError::UnknownJob(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let cached = self.jobs.lock().unwrap_or_else(|e| e.into_inner()).get(name).cloned();
        if let Some((rev, loaded)) = cached {
            if rev == record.revision && loaded.status == record.status {
                return Ok(Some(loaded));
            }
        }
        let job = crate::domain::config::compile("(stored job)", &record.def).map_err(StateError::from)?;
        let connectors = self.registry.connectors(&job)?;
        let specs = entity_specs(&job);
        let loaded = Arc::new(LoadedJob { job, status: record.status, connectors, specs });
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), (record.revision, loaded.clone()));
        Ok(Some(loaded))
    }
}

/// Per map, per side: what the connectors read and write.
pub fn entity_specs(job: &crate::domain::job::Job) -> Vec<[EntitySpec; 2]> {
    job.maps
        .iter()
        .map(|m| {
            Side::BOTH.map(|s| EntitySpec {
                name: m.entity(s).to_string(),
                key_fields: m.key_fields(s),
                fields: m.read_fields(s),
                binds: binds(job, m, s),
            })
        })
        .collect()
}

/// The map's lookups that `side` reads and writes through a navigation property.
fn binds(job: &crate::domain::job::Job, map: &crate::domain::job::TableMap, side: Side) -> Vec<Bind> {
    map.lookups
        .iter()
        .filter_map(|l| {
            let navigation = l.bind[side.index()].clone()?;
            let parent = &job.maps[l.map];
            Some(Bind {
                fields: l.fields.iter().map(|f| f[side.index()].clone()).collect(),
                navigation,
                entity: parent.entity(side).to_string(),
                key_fields: parent.key_fields(side),
            })
        })
        .collect()
}

#[cfg(test)]
mod backoff_tests {
    use super::*;

    #[test]
    fn the_default_rides_out_a_fifteen_minute_outage_over_five_receives() {
        let b = Backoff::default();
        assert_eq!(b.delay(1, None), Duration::from_secs(3));
        assert_eq!(b.delay(2, None), Duration::from_secs(24));
        assert!(b.ride_out(5) >= Duration::from_secs(15 * 60), "{:?}", b.ride_out(5));
        // Retry-After is honoured past the cap, within what SQS allows.
        assert_eq!(b.delay(1, Some(Duration::from_secs(3600))), Duration::from_secs(3600));
        assert_eq!(b.delay(1, Some(Duration::from_secs(100_000))), MAX_VISIBILITY);
        assert_eq!(b.delay(40, None), b.cap);
    }
}
