//! Reconcile (DESIGN §2.4): retry and dismiss the error rows that match a filter.
//!
//! A retry puts each selected row's change back on the deliver queue, where a fresh read
//! decides: a record that is still the latest syncs (and the row is resolved), a stale one
//! becomes a concurrency skip. Dismiss deletes the rows for good. Both run only while the job is
//! active. (Request queueing and its limits come with the error-management work.)
use serde::{Deserialize, Serialize};

use super::{Outcome, StepError, Steps};
use crate::domain::change::{ChangeRef, DeliveryBatch, Lane};
use crate::domain::errors::{ErrorCategory, ErrorStatus};
use crate::domain::job::JobStatus;
use crate::domain::sequence::{bucket, group_id, root_of};
use crate::ports::{InMessage, OutMessage};
use crate::state::{ErrorFilter, StateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileAction {
    Retry,
    Dismiss,
}

/// A message on the reconcile queue (FIFO, group = job, so a job's requests run in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReconcileMessage {
    Retry {
        job: String,
        #[serde(default)]
        filter: ErrorFilter,
    },
    Dismiss {
        job: String,
        #[serde(default)]
        filter: ErrorFilter,
    },
    /// Copies what exists in app `from` to the other app (DESIGN §5). Checkpointed per page: a
    /// run cut short (a Lambda timeout) resumes where it stopped when the message comes again.
    InitialSync { job: String, from: String },
}

impl ReconcileMessage {
    pub fn job(&self) -> &str {
        match self {
            ReconcileMessage::Retry { job, .. }
            | ReconcileMessage::Dismiss { job, .. }
            | ReconcileMessage::InitialSync { job, .. } => job,
        }
    }
}

/// Pages of an initial sync run from the reconcile queue.
const INITIAL_SYNC_PAGE: usize = 500;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    pub selected: usize,
    pub queued: usize,
    pub dismissed: usize,
    /// Rows that cannot be retried (concurrency skips, conflicts).
    pub not_retriable: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("job '{job}' is {status}: retry and dismiss work only while it is active")]
    NotActive { job: String, status: &'static str },
    #[error("app '{app}' is not an app of job '{job}'")]
    UnknownApp { job: String, app: String },
    #[error(transparent)]
    Step(#[from] StepError),
}

impl From<StateError> for ReconcileError {
    fn from(e: StateError) -> Self {
        ReconcileError::Step(e.into())
    }
}

impl Steps {
    /// The reconcile step over a batch of reconcile-queue messages, in order.
    pub async fn reconcile_messages(&self, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        for m in msgs {
            let request: ReconcileMessage = match serde_json::from_str(&m.body) {
                Ok(r) => r,
                Err(e) => {
                    outcomes.push(Outcome::Poison { reason: format!("malformed reconcile request: {e}") });
                    continue;
                }
            };
            let job = request.job().to_string();
            let result = match request {
                ReconcileMessage::Retry { filter, .. } => {
                    self.reconcile(&job, ReconcileAction::Retry, &filter).await.map(|r| format!("{r:?}"))
                }
                ReconcileMessage::Dismiss { filter, .. } => {
                    self.reconcile(&job, ReconcileAction::Dismiss, &filter).await.map(|r| format!("{r:?}"))
                }
                ReconcileMessage::InitialSync { from, .. } => self.initial_sync_from(&job, &from).await,
            };
            outcomes.push(match result {
                Ok(report) => {
                    tracing::info!(job = %job, %report, "reconcile request done");
                    Outcome::Done
                }
                // Refusals (unknown job, job not active, unknown app) are the request's fault:
                // it goes to the dead-letter queue with the reason on record.
                Err(ReconcileError::NotActive { job, status }) => {
                    Outcome::Poison { reason: format!("job '{job}' is {status}: retry and dismiss need it active") }
                }
                Err(ReconcileError::Step(StepError::State(e @ StateError::UnknownJob(_)))) => {
                    Outcome::Poison { reason: e.to_string() }
                }
                Err(ReconcileError::Step(StepError::NotActive { job, status })) => {
                    Outcome::Poison { reason: format!("job '{job}' is {status}: initial sync needs it active") }
                }
                Err(ReconcileError::UnknownApp { job, app }) => {
                    Outcome::Poison { reason: format!("app '{app}' is not an app of job '{job}'") }
                }
                Err(ReconcileError::Step(e)) => return Err(e),
            });
        }
        Ok(outcomes)
    }

    async fn initial_sync_from(&self, job: &str, from: &str) -> Result<String, ReconcileError> {
        let (compiled, _) = self.state.job(job).await?;
        let side = compiled
            .side_of(from)
            .ok_or_else(|| ReconcileError::UnknownApp { job: job.to_string(), app: from.to_string() })?;
        let report = self.initial_sync(job, side, INITIAL_SYNC_PAGE, |_, _| {}).await?;
        Ok(format!("{report:?}"))
    }

    /// Retries or dismisses the open error rows of `job` that match `filter`.
    pub async fn reconcile(
        &self,
        job: &str,
        action: ReconcileAction,
        filter: &ErrorFilter,
    ) -> Result<ReconcileReport, ReconcileError> {
        let (compiled, status) = self.state.job(job).await?;
        if status != JobStatus::Active {
            return Err(ReconcileError::NotActive { job: job.to_string(), status: status.as_str() });
        }
        let mut filter = filter.clone();
        filter.status.get_or_insert(ErrorStatus::Open);
        let rows = self.state.error_rows(job, &filter).await.map_err(StepError::from)?;
        let mut report = ReconcileReport { selected: rows.len(), ..Default::default() };
        match action {
            ReconcileAction::Dismiss => {
                report.dismissed = self.state.dismiss_errors(job, &rows).await.map_err(StepError::from)?;
            }
            ReconcileAction::Retry => {
                let now = self.state.now_ms();
                let mut out = Vec::new();
                let mut retrying = Vec::new();
                for (sk, row) in &rows {
                    if !row.retriable || matches!(row.category, ErrorCategory::Concurrency | ErrorCategory::Conflict) {
                        report.not_retriable += 1;
                        continue;
                    }
                    let Some((map_idx, _)) = compiled.map(&row.map) else {
                        report.not_retriable += 1;
                        continue;
                    };
                    let (root_map, root_key) = root_of(&compiled, map_idx, &row.key);
                    let change = ChangeRef {
                        map: row.map.clone(),
                        source: row.source,
                        key: row.key.clone(),
                        seq: row.seq,
                        txid: row.txid.clone(),
                        at_ms: now,
                    };
                    let root = group_id(&compiled.maps[root_map].name, &root_key);
                    let lanes = vec![Lane { root: root.clone(), changes: vec![change] }];
                    let batch = DeliveryBatch { job: job.to_string(), group: bucket(&root), lanes };
                    // A retry must not be taken for a duplicate of the original delivery.
                    let dedup = format!("retry-{}-{}", row.id, row.attempts);
                    out.push(OutMessage::fifo(
                        serde_json::to_string(&batch).unwrap_or_default(),
                        batch.group.clone(),
                        dedup,
                    ));
                    retrying.push(sk.clone());
                }
                self.state
                    .set_error_status(job, &retrying, ErrorStatus::Retrying, &[ErrorStatus::Open])
                    .await
                    .map_err(StepError::from)?;
                report.queued = out.len();
                for chunk in out.chunks(500) {
                    self.deliver_queue.send(chunk.to_vec()).await.map_err(StepError::from)?;
                }
            }
        }
        Ok(report)
    }
}
