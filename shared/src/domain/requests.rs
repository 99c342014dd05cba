//! Reconcile requests (DESIGN §1, seeds: async-error-management "Limits"): retry or dismiss the
//! errors that match a filter, queued per job and run in order of creation.
use serde::{Deserialize, Serialize};

use super::errors::{ErrorCategory, ErrorStatus, SyncError};

/// Requests a job may have queued or running at once; a sixth is refused.
pub const MAX_QUEUED_REQUESTS: usize = 5;
/// Error rows one request may select; a larger selection is refused.
pub const MAX_REQUEST_RECORDS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestAction {
    Retry,
    Dismiss,
}

impl RequestAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestAction::Retry => "retry",
            RequestAction::Dismiss => "dismiss",
        }
    }
}

/// Which error rows a query or a request selects. Times are milliseconds since the epoch and
/// apply to when a row was first seen.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
    /// Map name, or the entity name in the app the change came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Data source: the app the change came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<ErrorCategory>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ErrorStatus>,
}

impl ErrorFilter {
    pub fn matches(&self, e: &SyncError) -> bool {
        self.entity.as_ref().is_none_or(|x| *x == e.map || *x == e.entity)
            && self.app.as_ref().is_none_or(|x| *x == e.app)
            && self.category.is_none_or(|c| c == e.category)
            && self.status.is_none_or(|s| s == e.status)
            && self.from_ms.is_none_or(|t| e.first_seen_ms >= t)
            && self.to_ms.is_none_or(|t| e.first_seen_ms < t)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    /// Waiting its turn on the reconcile queue.
    Queued,
    Running,
    /// Ran: a dismiss is complete; a retry's changes are back in delivery (see its progress).
    Done,
    /// Not run: the job was not active when its turn came (the reason says why).
    Refused,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Queued => "queued",
            RequestStatus::Running => "running",
            RequestStatus::Done => "done",
            RequestStatus::Refused => "refused",
        }
    }
    /// Whether the request holds one of its job's queue places.
    pub fn in_queue(self) -> bool {
        matches!(self, RequestStatus::Queued | RequestStatus::Running)
    }
}

/// How far a request got. For a retry, `done` counts rows whose retry has finished, each
/// `succeeded` (synced, the row resolved) or `still_failing` (the row open again).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub selected: usize,
    pub done: usize,
    pub succeeded: usize,
    pub still_failing: usize,
    /// Selected rows that cannot be retried (concurrency skips): left as they are.
    pub not_retriable: usize,
}

/// A request as stored under `REQ#job` (sort key: creation time and id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileRequest {
    pub id: String,
    pub job: String,
    pub action: RequestAction,
    pub filter: ErrorFilter,
    pub created_ms: i64,
    pub status: RequestStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub progress: Progress,
    /// Set once every selected row's outcome is known: the progress is then final.
    #[serde(default)]
    pub settled: bool,
}

impl ReconcileRequest {
    /// The retry progress from the rows this request retried (tagged with its id) as they are
    /// now. `queued` rows went back to delivery; a row a later request took over (no longer
    /// tagged) had failed again, since only open rows are selected.
    pub fn retry_progress<'a>(&self, queued: usize, tagged: impl Iterator<Item = &'a SyncError>) -> Progress {
        let (mut pending, mut succeeded) = (0, 0);
        for row in tagged {
            match row.status {
                ErrorStatus::Retrying => pending += 1,
                ErrorStatus::Resolved => succeeded += 1,
                ErrorStatus::Open | ErrorStatus::Dismissed => {}
            }
        }
        let done = queued.saturating_sub(pending);
        Progress { done, succeeded, still_failing: done - succeeded.min(done), ..self.progress }
    }
}

/// Why a request is refused when it is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestRefusal {
    #[error("job '{job}' is {status}: retry and dismiss requests are taken only while it is active")]
    NotActive { job: String, status: &'static str },
    #[error(
        "job '{job}' already has {MAX_QUEUED_REQUESTS} requests queued: wait for one to finish \
         (see `dualsync requests list {job}`)"
    )]
    QueueFull { job: String },
    #[error(
        "the filter selects {count} errors; a request takes at most {MAX_REQUEST_RECORDS}: narrow it by \
         time range (from_ms/to_ms), entity, data source (app) or category"
    )]
    TooManyRecords { count: usize },
    #[error("no open errors of job '{job}' match the filter")]
    NothingSelected { job: String },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::change::Key;
    use crate::domain::job::Side;

    fn row(status: ErrorStatus) -> SyncError {
        SyncError {
            id: "1-a".into(),
            job: "j".into(),
            map: "m".into(),
            entity: "e".into(),
            app: "a".into(),
            source: Side::A,
            key: Key(vec!["k".into()]),
            seq: 1,
            txid: "t".into(),
            category: ErrorCategory::Application,
            message: "x".into(),
            retriable: true,
            attempts: 1,
            first_seen_ms: 0,
            last_seen_ms: 0,
            status,
            request: Some("r".into()),
            delete: false,
        }
    }

    #[test]
    fn retry_progress_counts_rows_by_their_status_now() {
        let req = ReconcileRequest {
            id: "r".into(),
            job: "j".into(),
            action: RequestAction::Retry,
            filter: ErrorFilter::default(),
            created_ms: 0,
            status: RequestStatus::Done,
            reason: None,
            progress: Progress { selected: 6, not_retriable: 1, ..Default::default() },
            settled: false,
        };
        // 5 queued: 1 pending, 2 resolved, 1 open again, 1 taken over by a later request.
        let rows = [
            row(ErrorStatus::Retrying),
            row(ErrorStatus::Resolved),
            row(ErrorStatus::Resolved),
            row(ErrorStatus::Open),
        ];
        let p = req.retry_progress(5, rows.iter());
        assert_eq!(p, Progress { selected: 6, done: 4, succeeded: 2, still_failing: 2, not_retriable: 1 });
    }

    #[test]
    fn refusals_name_the_limit_and_how_to_narrow() {
        let m = RequestRefusal::TooManyRecords { count: 10_001 }.to_string();
        assert!(m.contains("10001 errors") && m.contains("at most 10000") && m.contains("entity"), "{m}");
        let m = RequestRefusal::QueueFull { job: "sales".into() }.to_string();
        assert!(m.contains("5 requests queued"), "{m}");
        let m = RequestRefusal::NotActive { job: "sales".into(), status: "paused" }.to_string();
        assert!(m.contains("is paused"), "{m}");
    }
}
