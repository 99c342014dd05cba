//! Reconcile (DESIGN §2.4): runs a job's retry and dismiss requests in order of creation, and
//! initial-sync requests.
//!
//! A retry puts each selected row's change back on the deliver queue, where a fresh read
//! decides: a record that is still the latest syncs (and the row is resolved), a stale one
//! becomes a concurrency skip (and the row is open again, attempts raised). Dismiss settles the
//! rows for good. Both run only while the job is active; a request whose turn comes while it is
//! not is refused, with the reason on the request.
use serde::{Deserialize, Serialize};

use super::capture::Begun;
use super::redeliver::redelivery;
use super::{Outcome, StepError, Steps};
use crate::domain::change::ChangeRef;
use crate::domain::errors::{ErrorCategory, ErrorStatus, SyncError};
use crate::domain::job::JobStatus;
use crate::domain::requests::{Progress, ReconcileRequest, RequestAction, RequestStatus, MAX_REQUEST_RECORDS};
use crate::ports::{InMessage, OutMessage, Queue};
use crate::state::{ErrorFilter, StateError};

/// A message on the reconcile queue (FIFO, group = job, so a job's requests run in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReconcileMessage {
    /// Runs a stored retry or dismiss request (see [`crate::state::State::create_request`]).
    Run { job: String, request: String },
    /// Copies what exists in app `from` to the other app (DESIGN §5): lists a bounded number
    /// of pages of the first map not done, hands each to a [`ReconcileMessage::SyncPage`], and
    /// hands the rest of the listing on to a message like itself (see
    /// `steps::initial_sync::fanout`). `map` and `company` limit it to one of each.
    InitialSync {
        job: String,
        from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        map: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        company: Option<String>,
        /// Records per page listed (default 500).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        page_size: Option<usize>,
    },
    /// Delivers page `page` of an initial sync's map (a task its listing stored).
    SyncPage {
        job: String,
        from: String,
        map: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        company: Option<String>,
        page: u64,
    },
}

impl ReconcileMessage {
    pub fn job(&self) -> &str {
        match self {
            ReconcileMessage::Run { job, .. }
            | ReconcileMessage::InitialSync { job, .. }
            | ReconcileMessage::SyncPage { job, .. } => job,
        }
    }
    /// The message for the reconcile queue: grouped by job (a job's requests and listings run
    /// in order), deduplicated by request; pages each in a group of their own, so that they
    /// run in parallel.
    pub fn out(&self) -> OutMessage {
        let body = serde_json::to_string(self).unwrap_or_default();
        match self {
            ReconcileMessage::Run { request, .. } => {
                OutMessage::fifo(body, self.job().into(), format!("run-{request}"))
            }
            ReconcileMessage::InitialSync { .. } => {
                OutMessage::fifo(body, self.job().into(), uuid::Uuid::new_v4().simple().to_string())
            }
            ReconcileMessage::SyncPage { job, from, map, company, page } => {
                let sync = crate::domain::sequence::short_hash(&[
                    job.as_bytes(),
                    from.as_bytes(),
                    map.as_bytes(),
                    company.as_deref().unwrap_or("").as_bytes(),
                ]);
                OutMessage::fifo(body, format!("init-{sync}-{page}"), format!("page-{sync}-{page}"))
            }
        }
    }
}

impl Steps {
    /// The reconcile step over a batch of reconcile-queue messages, in order.
    pub async fn reconcile_messages(&self, input: &dyn Queue, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        for m in msgs {
            let message: ReconcileMessage = match serde_json::from_str(&m.body) {
                Ok(r) => r,
                Err(e) => {
                    outcomes.push(Outcome::Poison { reason: format!("malformed reconcile request: {e}") });
                    continue;
                }
            };
            let result = match &message {
                ReconcileMessage::Run { job, request } => self.run_request(job, request).await,
                ReconcileMessage::InitialSync { .. } => self.sync_listing(input, &message).await,
                ReconcileMessage::SyncPage { job, from, map, company, page } => {
                    self.sync_page(input, job, from, map, company.as_deref(), *page).await
                }
            };
            outcomes.push(match result {
                Ok(report) => {
                    tracing::info!(job = %message.job(), %report, "reconcile request done");
                    Outcome::Done
                }
                // Refusals (unknown job or request, job not active, unknown app) are the
                // message's fault: it goes to the dead-letter queue with the reason on record.
                Err(StepError::State(e @ (StateError::UnknownJob(_) | StateError::Refused(_)))) => {
                    Outcome::Poison { reason: e.to_string() }
                }
                Err(StepError::NotActive { job, status }) => {
                    Outcome::Poison { reason: format!("job '{job}' is {status}: initial sync needs it active") }
                }
                Err(StepError::Refused(reason)) => Outcome::Poison { reason },
                Err(e) => return Err(e),
            });
        }
        Ok(outcomes)
    }

    /// Runs one stored request. Running it again (a redelivered message) finishes what a crash
    /// interrupted and changes nothing once it is done.
    pub async fn run_request(&self, job: &str, id: &str) -> Result<String, StepError> {
        let Some(mut request) = self.state.request(job, id).await? else {
            return Err(StepError::Refused(format!("job '{job}' has no request '{id}'")));
        };
        if !request.status.in_queue() {
            return Ok(format!("request {id} already {}", request.status.as_str()));
        }
        let (compiled, status) = self.state.job(job).await?;
        if status != JobStatus::Active {
            request.status = RequestStatus::Refused;
            request.reason = Some(format!(
                "job '{job}' was {} when the request's turn came: retry and dismiss run only while it is active",
                status.as_str()
            ));
            return self.finish_request(request).await;
        }
        request.status = RequestStatus::Running;
        self.state.save_request(&request).await?;

        // Open rows, and rows this request already took before a crash.
        let mut rows: Vec<(String, SyncError)> = Vec::new();
        let scope = ErrorFilter { status: None, ..request.filter.clone() };
        self.state
            .scan_errors(job, &scope, |sk, row| {
                let ours = row.status == ErrorStatus::Retrying && row.request.as_deref() == Some(id);
                if row.status == ErrorStatus::Open || ours {
                    rows.push((sk, row));
                }
            })
            .await?;
        rows.truncate(MAX_REQUEST_RECORDS);
        let mut progress = Progress { selected: rows.len(), ..Default::default() };
        match request.action {
            RequestAction::Dismiss => {
                let n = self.state.dismiss_errors(job, &rows).await?;
                progress.done = n;
                progress.succeeded = n;
            }
            RequestAction::Retry => {
                // A row of a map the job no longer has cannot be delivered either.
                let (retriable, not): (Vec<_>, Vec<_>) = rows.into_iter().partition(|(_, r)| {
                    r.retriable
                        && !matches!(r.category, ErrorCategory::Concurrency | ErrorCategory::Conflict)
                        && compiled.map(&r.map).is_some()
                });
                progress.not_retriable = not.len();
                progress.selected = retriable.len() + not.len();
                // Marked first: a crash before the sends leaves rows this request finds again.
                let sks: Vec<String> = retriable.iter().map(|(sk, _)| sk.clone()).collect();
                self.state.mark_retrying(job, &sks, id).await?;
                let now = self.state.now_ms();
                let change = |sk: &String, row: &SyncError| ChangeRef {
                    map: row.map.clone(),
                    source: row.source,
                    key: row.key.clone(),
                    seq: row.seq,
                    txid: row.txid.clone(),
                    at_ms: now,
                    retry_of: Some(sk.clone()),
                    waited: false,
                };
                // Deletes first, through the live path as capture runs them, before the other
                // rows' changes can reach delivery: one of the other side's, delivered first,
                // would create the record again on the side whose user deleted it.
                let (deletes, others): (Vec<_>, Vec<_>) = retriable.iter().partition(|(_, row)| row.delete);
                for (sk, row) in deletes {
                    self.retry_delete(&compiled.name, &change(sk, row), row.attempts).await?;
                }
                let changes: Vec<ChangeRef> = others.into_iter().map(|(sk, row)| change(sk, row)).collect();
                // In dependency order, whatever order the rows were first seen in.
                let out = redelivery(&compiled, changes, &format!("retry-{id}"));
                for chunk in out.chunks(500) {
                    self.deliver_queue.send(chunk.to_vec()).await?;
                }
            }
        }
        request.progress = progress;
        request.status = RequestStatus::Done;
        self.finish_request(request).await
    }

    /// Runs a delete's row again through the live path (capture's): resolved once it went
    /// through (or made a row of its own: the record exists again, the app refused), open again
    /// with the reason when the app could not be reached.
    async fn retry_delete(&self, job: &str, c: &ChangeRef, attempts: u32) -> Result<(), StepError> {
        let sk = c.retry_of.clone().unwrap_or_default();
        // The rows retried are of maps the job has (checked by the caller).
        let lj = self.load_job(job).await?;
        let Some((m, lj)) = lj.and_then(|lj| Some((lj.job.map(&c.map)?.0, lj))) else {
            return Ok(self.state.settle_retry(job, &sk, "the job no longer maps this record").await?);
        };
        let outcome = match self.read_target(&lj, m, c, attempts).await {
            Ok(found) => self.run_delete(&lj, m, c, Begun::Now(found), attempts).await?,
            Err(outcome) => Some(outcome),
        };
        match outcome {
            None | Some(Outcome::Done) => self.state.resolve_retried(job, &sk).await?,
            Some(Outcome::Retry { reason, .. } | Outcome::Poison { reason }) => {
                self.state.settle_retry(job, &sk, &reason).await?
            }
        }
        Ok(())
    }

    async fn finish_request(&self, request: ReconcileRequest) -> Result<String, StepError> {
        self.state.save_request(&request).await?;
        self.state.release_request_place(&request.job, &request.id).await?;
        Ok(format!("request {} {}: {:?}", request.id, request.status.as_str(), request.progress))
    }
}
