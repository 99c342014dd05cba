//! Reconcile (DESIGN §2.4): retry and dismiss the error rows that match a filter.
//!
//! A retry puts each selected row's change back on the deliver queue, where a fresh read
//! decides: a record that is still the latest syncs (and the row is resolved), a stale one
//! becomes a concurrency skip. Dismiss deletes the rows for good. Both run only while the job is
//! active. (Request queueing and its limits come with the error-management work.)
use serde::{Deserialize, Serialize};

use super::{StepError, Steps};
use crate::domain::change::{ChangeRef, DeliveryBatch, Lane};
use crate::domain::errors::{ErrorCategory, ErrorStatus};
use crate::domain::job::JobStatus;
use crate::domain::sequence::{bucket, group_id, root_of};
use crate::ports::OutMessage;
use crate::state::{ErrorFilter, StateError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReconcileAction {
    Retry,
    Dismiss,
}

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
    #[error(transparent)]
    Step(#[from] StepError),
}

impl From<StateError> for ReconcileError {
    fn from(e: StateError) -> Self {
        ReconcileError::Step(e.into())
    }
}

impl Steps {
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
