//! Sync error rows and conflict rows (DESIGN §1, seeds: async-faq "How are the errors
//! categorized?").
use serde::{Deserialize, Serialize};

use super::change::Key;
use super::job::Side;

/// The four error categories of the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorCategory {
    /// Business validation or logical errors (a refused write, a missing reference).
    Application,
    /// Unresolvable system errors after retries; retriable.
    System,
    /// The change was not the latest: skipped, not retriable.
    Concurrency,
    /// Both sides changed: decided by the primary app; kept in the conflict log.
    Conflict,
}

impl ErrorCategory {
    pub const ALL: [ErrorCategory; 4] =
        [ErrorCategory::Application, ErrorCategory::System, ErrorCategory::Concurrency, ErrorCategory::Conflict];
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCategory::Application => "application",
            ErrorCategory::System => "system",
            ErrorCategory::Concurrency => "concurrency",
            ErrorCategory::Conflict => "conflict",
        }
    }
    pub fn retriable(self) -> bool {
        matches!(self, ErrorCategory::Application | ErrorCategory::System)
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ErrorStatus {
    Open,
    Retrying,
    Dismissed,
    Resolved,
}

impl ErrorStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorStatus::Open => "open",
            ErrorStatus::Retrying => "retrying",
            ErrorStatus::Dismissed => "dismissed",
            ErrorStatus::Resolved => "resolved",
        }
    }
    pub const ALL: [ErrorStatus; 4] =
        [ErrorStatus::Open, ErrorStatus::Retrying, ErrorStatus::Dismissed, ErrorStatus::Resolved];
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One failing link and cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncError {
    /// `<first seen ms>-<random>`: finds the row (see [`super::keys::error_sk`]).
    pub id: String,
    pub job: String,
    pub map: String,
    /// The source app's entity.
    pub entity: String,
    /// The data source: the app the change came from.
    pub app: String,
    pub source: Side,
    pub key: Key,
    pub seq: u64,
    pub txid: String,
    pub category: ErrorCategory,
    /// What is wrong, naming the key at most, never field values.
    pub message: String,
    pub retriable: bool,
    pub attempts: u32,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub status: ErrorStatus,
    /// The retry request that last took this row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The change the row holds is a delete: a retry runs it through the live path again (as
    /// capture does), not through delivery, which would take the record missing at its source
    /// for a stale change.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete: bool,
}

/// A conflict: both sides changed since the last sync; the primary's side won.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictRecord {
    pub id: String,
    pub job: String,
    pub map: String,
    pub key: Key,
    /// The app whose change was being delivered when the conflict was seen.
    pub app: String,
    /// The app that won (the primary).
    pub winner: String,
    /// Hash of each side's content (A, B) when the conflict was seen.
    pub hashes: [String; 2],
    pub at_ms: i64,
}

/// A message that a step could not handle within its queue's receive limit: it is on its way to
/// the dead-letter queue. Bodies are references (keys, ids), never record data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub queue: String,
    pub message_id: String,
    /// The job the message names, when it names one.
    pub job: Option<String>,
    pub receive_count: u32,
    pub reason: String,
    pub body: String,
    pub at_ms: i64,
    #[serde(default)]
    pub status: DeadLetterStatus,
    /// When an operator sent it back to its queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redriven_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadLetterStatus {
    /// In the dead-letter queue.
    #[default]
    Dead,
    /// Sent back to its queue by an operator (as a new message: if it fails again, it comes
    /// back with a row of its own). Kept for a while as a record.
    Redriven,
}

impl DeadLetterStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Dead => "dead",
            DeadLetterStatus::Redriven => "redriven",
        }
    }
}
