//! Change notifications: references to changes, never record data (DESIGN §1).
use serde::{Deserialize, Serialize};

use super::job::Side;

/// An integration key: the values of a map's key fields in key-pair order, as canonical text.
/// Both apps share the key values, so the same `Key` finds the record on either side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key(pub Vec<String>);

impl Key {
    /// Operator-facing form: `a/b`.
    pub fn display(&self) -> String {
        self.0.join("/")
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Create or update: both are delivered as an upsert by integration key.
    Upsert,
    Delete,
}

/// A reference to one change in one app, as ingress delivers it to capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeNotification {
    pub app: String,
    pub entity: String,
    pub key: Key,
    pub op: Operation,
    /// Monotonic per record where the app gives one (RowVersion, ControlNumber, change-log id).
    pub seq: u64,
    /// The record's version (etag) right after this change, if the source knows it; lets
    /// capture recognise the echo of dualsync's own write without reading the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    pub at_ms: i64,
}

/// What ingress puts on the capture queue: the changes one app committed together.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionNotification {
    pub job: String,
    pub app: String,
    pub txid: String,
    pub changes: Vec<ChangeNotification>,
}

/// One change resolved against a job: which map, from which side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRef {
    pub map: String,
    pub source: Side,
    pub key: Key,
    pub seq: u64,
    pub txid: String,
    /// When the app made the change; carried for end-to-end latency figures.
    pub at_ms: i64,
    /// The error row this delivery retries: settled by its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// Delivered again because the parent it waited for synced (see `state::waiters`): if its
    /// reference is still missing, it is an ordinary application error and waits no more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waited: bool,
}

/// A captured transaction on its way to sequence (capture → sequence queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedTransaction {
    pub job: String,
    pub source: Side,
    pub txid: String,
    pub changes: Vec<ChangeRef>,
}

/// The changes of one dependency root, in delivery order (parent before child).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    /// The root's id: every change under one root is delivered in order, across messages too.
    pub root: String,
    pub changes: Vec<ChangeRef>,
}

/// A deliver-queue message: the lanes of one transaction that share a FIFO message group (a
/// stable bucket of their roots). Packing them in one message saves queue requests; the bucket
/// keeps each root in one group, so its changes stay in order across transactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryBatch {
    pub job: String,
    pub group: String,
    pub lanes: Vec<Lane>,
}
