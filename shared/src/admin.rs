//! The operators' view (issue: error management): jobs and their status, pause and resume,
//! error rows and counts, the conflict log, retry/dismiss requests, and dead letters. One
//! service over the state table and the queues, so the CLI and the admin API behave the same on
//! every backend.
use serde::Serialize;
use std::sync::Arc;

use crate::domain::config::JobDef;
use crate::domain::errors::{ConflictRecord, SyncError};
use crate::domain::job::{AlertRule, Job, JobStatus};
use crate::domain::metrics::MetricsView;
use crate::domain::requests::{ReconcileRequest, RequestAction, RequestStatus};
use crate::ports::{ConnectorError, Page, Queue, QueueError};
use crate::state::{ErrorCounts, ErrorFilter, State, StateError};
use crate::steps::reconcile::ReconcileMessage;
use crate::steps::StepError;
use crate::steps::{lifecycle, pause};

mod dead_letters;
mod queues;
pub use dead_letters::{DeadLetterQueue, Redrive, RedriveReport, MAX_REDRIVE};
pub use queues::{QueueReading, Reading, StepQueues, DEPTH_TIMEOUT};

/// What went wrong, by whose fault: the admin API maps these to 404, 409, 400 and 500.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    NotFound(String),
    /// Refused by a rule (limits, job status, illegal transition).
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StateError> for AdminError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::UnknownJob(_) => AdminError::NotFound(e.to_string()),
            StateError::Refused(_) | StateError::Transition(_) | StateError::Running { .. } => {
                AdminError::Refused(e.to_string())
            }
            StateError::Config(_) => AdminError::BadRequest(e.to_string()),
            StateError::Kv(_) => AdminError::Internal(e.to_string()),
        }
    }
}

impl From<StepError> for AdminError {
    fn from(e: StepError) -> Self {
        match e {
            StepError::State(e) => e.into(),
            // Only a start meets its apps here: preparing them failed, the job is stopped again.
            StepError::Connector(e) => AdminError::Refused(format!("the apps could not be prepared: {e}")),
            other => AdminError::Internal(other.to_string()),
        }
    }
}

impl From<crate::ports::KvError> for AdminError {
    fn from(e: crate::ports::KvError) -> Self {
        AdminError::Internal(e.to_string())
    }
}

/// A job as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub job: String,
    pub status: JobStatus,
    pub revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<AlertRule>,
    /// Every error row of the job, by category and by status.
    pub errors: ErrorCounts,
    /// Retry and dismiss requests queued or running.
    pub requests_queued: usize,
    /// Deliveries kept aside while the job is not active (paused, stopped), counted up to
    /// [`KEPT_COUNTED`]: a count of `KEPT_COUNTED` means at least that many.
    pub kept_deliveries: usize,
    /// The pipeline's queues, each step's with its dead-letter queue, in pipeline order: shared
    /// by every job, so what they hold is every job's backlog, not this one's.
    pub pipeline_queues: Vec<StepQueues>,
    /// The apps, side A first, and which one wins conflicts.
    pub apps: Vec<AppView>,
    pub primary: String,
    /// The table groups in delivery order, each with its maps and their sequence.
    pub table_groups: Vec<GroupView>,
    /// Initial syncs begun, per map and source app (of every company).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub initial_sync: Vec<crate::steps::initial_sync::SyncProgress>,
}

/// An app of a job: its name and connector (never its address or secrets).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AppView {
    pub name: String,
    pub connector: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupView {
    pub name: String,
    pub maps: Vec<MapView>,
}

/// A table map: its name, its place in the group, and the entity it pairs in each app.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MapView {
    pub name: String,
    pub sequence: u32,
    pub entities: std::collections::BTreeMap<String, String>,
}

/// How many kept deliveries a job view counts at most: one small query page, since a dashboard
/// reads job views every few seconds.
pub const KEPT_COUNTED: usize = 100;

impl JobView {
    fn shape(def: &JobDef) -> (Vec<AppView>, Vec<GroupView>) {
        let apps = def.apps.iter().map(|a| AppView { name: a.name.clone(), connector: a.connector.clone() }).collect();
        let groups = def
            .table_groups
            .iter()
            .map(|g| GroupView {
                name: g.name.clone(),
                maps: g
                    .maps
                    .iter()
                    .map(|m| MapView { name: m.name.clone(), sequence: m.sequence, entities: m.entities.clone() })
                    .collect(),
            })
            .collect();
        (apps, groups)
    }
}

/// What a job's start does to its apps before the job turns active: the local runner installs
/// change capture in its sqlite apps; on AWS the apps send their changes themselves.
pub type Installer = Arc<dyn Fn(&Job) -> Result<(), ConnectorError> + Send + Sync>;

/// The window of [`Admin::metrics`] when no start is given.
pub const DEFAULT_METRICS_WINDOW_MS: i64 = 60 * 60_000;

/// How long a request may hold a place without being noted as sent before a later call sends
/// it: longer than any submit takes between the two (the admin function times out after 30 s).
pub const UNSENT_AFTER_MS: i64 = 2 * 60_000;

#[derive(Clone)]
pub struct Admin {
    pub state: State,
    /// Where resumed deliveries go back to.
    pub deliver: Arc<dyn Queue>,
    /// Where requests are queued for the reconcile step.
    pub reconcile: Arc<dyn Queue>,
    /// The work queues with their dead-letter queues, in pipeline order (see
    /// [`Admin::with_dead_letter_queues`]).
    pub dead_letter_queues: Vec<DeadLetterQueue>,
    /// Run by [`Admin::start`] (see [`Installer`]); nothing unless set with
    /// [`Admin::with_installer`].
    pub install: Installer,
}

impl Admin {
    /// An admin over the state and the queues it sends to; dead letters need
    /// [`Admin::with_dead_letter_queues`] as well.
    pub fn new(state: State, deliver: Arc<dyn Queue>, reconcile: Arc<dyn Queue>) -> Self {
        Admin { state, deliver, reconcile, dead_letter_queues: Vec::new(), install: Arc::new(|_| Ok(())) }
    }

    /// What a start does to the job's apps first (see [`Installer`]).
    pub fn with_installer(mut self, install: Installer) -> Self {
        self.install = install;
        self
    }

    /// The work queues and their dead-letter queues, in pipeline order.
    pub fn with_dead_letter_queues(mut self, queues: Vec<DeadLetterQueue>) -> Self {
        self.dead_letter_queues = queues;
        self
    }

    pub async fn jobs(&self) -> Result<Vec<JobView>, AdminError> {
        // The queues are every job's: read once for the list.
        let queues = self.pipeline_queues().await;
        let mut out = Vec::new();
        for name in self.state.job_names().await? {
            out.push(self.job_with(&name, queues.clone()).await?);
        }
        Ok(out)
    }

    pub async fn job(&self, name: &str) -> Result<JobView, AdminError> {
        self.job_with(name, self.pipeline_queues().await).await
    }

    /// The view of job `name` beside the pipeline's queues as read.
    async fn job_with(&self, name: &str, pipeline_queues: Vec<StepQueues>) -> Result<JobView, AdminError> {
        let (record, _) = self.state.job_record(name).await?;
        self.send_unsent_requests(name).await?;
        let errors = self.state.error_counts(name, &ErrorFilter::default()).await?;
        let requests_queued = self.state.queued_requests(name).await?;
        let kept_deliveries = self.state.parked(name, KEPT_COUNTED).await?.len();
        let (apps, table_groups) = JobView::shape(&record.def);
        Ok(JobView {
            job: record.def.job,
            status: record.status,
            revision: record.revision,
            paused_reason: record.paused_reason,
            alert: record.def.alert,
            errors,
            requests_queued,
            kept_deliveries,
            pipeline_queues,
            apps,
            primary: record.def.primary,
            table_groups,
            initial_sync: crate::steps::initial_sync::progress(&self.state, name).await?,
        })
    }

    /// Starts a stopped job (DESIGN §1): prepares its apps, then hands back what delivery kept
    /// while it was stopped. Returns the job and how many kept deliveries went back.
    pub async fn start(&self, name: &str) -> Result<(JobView, usize), AdminError> {
        let install = self.install.clone();
        let n = lifecycle::start(&self.state, self.deliver.as_ref(), name, move |job| install(job)).await?;
        Ok((self.job(name).await?, n))
    }

    /// Stops a job: it moves no data until started again; what is captured or in flight is kept.
    pub async fn stop(&self, name: &str) -> Result<JobView, AdminError> {
        lifecycle::stop(&self.state, name).await?;
        self.job(name).await
    }

    pub async fn pause(&self, name: &str) -> Result<JobView, AdminError> {
        pause::pause(&self.state, name, "paused by an operator").await?;
        self.job(name).await
    }

    /// Resumes a paused job; its kept deliveries go back to the deliver queue in order.
    pub async fn resume(&self, name: &str) -> Result<(JobView, usize), AdminError> {
        let n = pause::resume(&self.state, self.deliver.as_ref(), name).await?;
        Ok((self.job(name).await?, n))
    }

    pub async fn errors(
        &self,
        job: &str,
        filter: &ErrorFilter,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<SyncError>, AdminError> {
        self.state.job_record(job).await?;
        if !(1..=1000).contains(&limit) {
            return Err(AdminError::BadRequest(format!("limit {limit} is out of range: use 1 to 1000")));
        }
        Ok(self.state.errors(job, filter, limit, after).await?)
    }

    pub async fn error(&self, job: &str, id: &str) -> Result<SyncError, AdminError> {
        self.state.job_record(job).await?;
        self.state.error(job, id).await?.ok_or_else(|| AdminError::NotFound(format!("job '{job}' has no error '{id}'")))
    }

    pub async fn counts(&self, job: &str, filter: &ErrorFilter) -> Result<ErrorCounts, AdminError> {
        self.state.job_record(job).await?;
        Ok(self.state.error_counts(job, filter).await?)
    }

    pub async fn conflicts(
        &self,
        job: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<ConflictRecord>, AdminError> {
        self.state.job_record(job).await?;
        Ok(self.state.conflicts(job, limit.clamp(1, 1000), after).await?)
    }

    /// The job's metrics from the minute holding `since_ms` (default: the last hour) to now.
    pub async fn metrics(&self, job: &str, since_ms: Option<i64>) -> Result<MetricsView, AdminError> {
        self.state.job_record(job).await?;
        let since = since_ms.unwrap_or_else(|| self.state.now_ms() - DEFAULT_METRICS_WINDOW_MS);
        let minutes = self.state.metrics(job, since).await?;
        Ok(MetricsView::new(job, since, &minutes))
    }

    /// Creates a retry or dismiss request and queues it for the reconcile step.
    pub async fn submit(
        &self,
        job: &str,
        action: RequestAction,
        filter: ErrorFilter,
    ) -> Result<ReconcileRequest, AdminError> {
        self.send_unsent_requests(job).await?;
        let mut request = self.state.create_request(job, action, filter).await?;
        if let Err(e) = self.send_request(&request).await {
            // Not queued: free its place rather than hold it for good.
            request.status = RequestStatus::Refused;
            request.reason = Some(format!("could not be queued: {e}"));
            self.state.save_request(&request).await?;
            self.state.release_request_place(job, &request.id).await?;
            return Err(AdminError::Internal(format!("request {} could not be queued: {e}", request.id)));
        }
        Ok(request)
    }

    /// Puts a stored request's run message on the reconcile queue and notes that it is there.
    async fn send_request(&self, request: &ReconcileRequest) -> Result<(), QueueError> {
        let message = ReconcileMessage::Run { job: request.job.clone(), request: request.id.clone() };
        self.reconcile.send(vec![message.out()]).await?;
        self.state.mark_request_sent(&request.job, &request.id).await.map_err(|e| QueueError::Unavailable {
            queue: self.reconcile.name().to_string(),
            reason: format!("sent, but not noted as sent: {e}"),
        })
    }

    /// Sends the requests an admin stored (taking a place) but died before sending, so that no
    /// place is held for good. Done whenever a job's places are read.
    async fn send_unsent_requests(&self, job: &str) -> Result<(), AdminError> {
        for request in self.state.unsent_requests(job, UNSENT_AFTER_MS).await? {
            tracing::warn!(job, request = %request.id, "request stored but never queued: queueing it now");
            self.send_request(&request)
                .await
                .map_err(|e| AdminError::Internal(format!("request {} could not be queued: {e}", request.id)))?;
        }
        Ok(())
    }

    pub async fn requests(&self, job: &str) -> Result<Vec<ReconcileRequest>, AdminError> {
        self.state.job_record(job).await?;
        self.send_unsent_requests(job).await?;
        Ok(self.state.requests(job).await?)
    }

    pub async fn request(&self, job: &str, id: &str) -> Result<ReconcileRequest, AdminError> {
        self.state.job_record(job).await?;
        let request = self.state.request(job, id).await?;
        let request = request.ok_or_else(|| AdminError::NotFound(format!("job '{job}' has no request '{id}'")))?;
        Ok(self.state.with_progress(request).await?)
    }
}
