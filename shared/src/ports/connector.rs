//! How dualsync reads and writes one app, and how it learns of the app's changes locally.
use async_trait::async_trait;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;
use thiserror::Error;

use crate::domain::change::{Key, Operation};
use crate::domain::errors::ErrorCategory;

/// What a connector needs to know of an entity: its name, its integration key fields (in key
/// order) and the fields dualsync reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EntitySpec {
    pub name: String,
    pub key_fields: Vec<String>,
    pub fields: Vec<String>,
    /// Fields that are a reference to a parent record rather than a column (OData navigation
    /// properties); only connectors that declare binds get any.
    pub binds: Vec<Bind>,
}

/// A lookup held as a reference: record fields that carry the parent's integration key, read
/// and written through a navigation property (Dataverse `<navigation>@odata.bind`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    /// The record fields holding the parent's key, in the parent key's order.
    pub fields: Vec<String>,
    /// The single-valued navigation property.
    pub navigation: String,
    /// The parent's entity (set) and its key fields: the parent's address.
    pub entity: String,
    pub key_fields: Vec<String>,
}

impl EntitySpec {
    /// The bind a field belongs to, if any.
    pub fn bind_of(&self, field: &str) -> Option<&Bind> {
        self.binds.iter().find(|b| b.fields.iter().any(|f| f == field))
    }
}

/// A record as read: the requested fields and the record's version (etag).
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub fields: BTreeMap<String, Value>,
    pub version: String,
    /// The seq of the record's latest change, where the app gives one (a change-log id,
    /// Dataverse's RowVersion): delivery compares it with a change's seq to tell a stale change
    /// without capture having to note every seq it sees.
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// Write only if the record is still at this version (If-Match).
    IfMatch(String),
    /// Create only: fail if the record exists.
    CreateOnly,
}

/// An upsert by integration key: `fields` holds the key fields too.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteOp {
    pub key: Key,
    pub fields: BTreeMap<String, Value>,
    pub precondition: Precondition,
}

/// Why one write did not happen.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum WriteFailure {
    /// The record changed since it was read (412) or exists on create-only.
    #[error("precondition failed")]
    PreconditionFailed,
    /// The app refused the write: validation or permission (4xx). An application failure.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Throttling, 5xx, time-out: a system failure, to retry.
    #[error("transient: {message}")]
    Transient { message: String, retry_after: Option<Duration> },
}

/// A write that failed with the whole request it went in.
impl From<&ConnectorError> for WriteFailure {
    fn from(e: &ConnectorError) -> WriteFailure {
        match e {
            ConnectorError::Transient { message, retry_after, .. } => {
                WriteFailure::Transient { message: message.clone(), retry_after: *retry_after }
            }
            ConnectorError::Rejected { message, .. } => WriteFailure::Rejected(message.clone()),
        }
    }
}

/// A connector call that failed as a whole.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConnectorError {
    #[error("{app}: {message}")]
    Transient { app: String, message: String, retry_after: Option<Duration> },
    #[error("{app}: {message}")]
    Rejected { app: String, message: String },
}

impl ConnectorError {
    /// The category of a change that failed with this error: a system failure is retried with
    /// backoff, an application failure is recorded at once (retriable by an operator).
    pub fn category(&self) -> ErrorCategory {
        match self {
            ConnectorError::Transient { .. } => ErrorCategory::System,
            ConnectorError::Rejected { .. } => ErrorCategory::Application,
        }
    }

    /// The app's message, without the app's name.
    pub fn message(&self) -> &str {
        match self {
            ConnectorError::Transient { message, .. } | ConnectorError::Rejected { message, .. } => message,
        }
    }

    /// How long the app asked us to wait before the next request, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ConnectorError::Transient { retry_after, .. } => *retry_after,
            ConnectorError::Rejected { .. } => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListPage {
    /// (key, record) in key order.
    pub records: Vec<(Key, Record)>,
    /// Cursor for the next page; `None` at the end.
    pub next: Option<String>,
}

#[async_trait]
pub trait Connector: Send + Sync {
    /// The app's name, for messages.
    fn app(&self) -> &str;
    /// True when [`Record::seq`] is always set: the record's latest change seq, comparable with
    /// the seqs of its change notifications.
    fn reads_change_seq(&self) -> bool {
        false
    }
    /// Reads records by integration key; the answer is in the order of `keys`.
    async fn read(&self, entity: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError>;
    /// Upserts by integration key, each under its precondition; returns each new version.
    async fn write(
        &self,
        entity: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError>;
    /// Deletes by integration key; a missing record is not an error.
    async fn delete(&self, entity: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError>;
    /// One page of all records of an entity, in key order, for initial sync.
    async fn list(&self, entity: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError>;
    /// How many records the entity holds (initial sync's progress and its count of records
    /// only the target holds). Any connector can list them all; those that can ask the app do.
    async fn count(&self, entity: &EntitySpec) -> Result<u64, ConnectorError> {
        let (mut n, mut after) = (0u64, None);
        loop {
            let page = self.list(entity, after.as_deref(), 5000).await?;
            n += page.records.len() as u64;
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(n),
            }
        }
    }
    /// The integration key of the record the app names `id` (its own record id, as a Dataverse
    /// webhook whose images were stripped names it), or `None` when there is no such record.
    /// Apps that name no record by id refuse.
    async fn key_of_id(&self, entity: &EntitySpec, id: &str) -> Result<Option<Key>, ConnectorError> {
        let _ = id;
        Err(ConnectorError::Rejected {
            app: self.app().to_string(),
            message: format!("{}: this app does not name its records by id, so a key cannot be read back", entity.name),
        })
    }

    /// Checks that the app can serve the job (`dualsync doctor`): every entity and its fields
    /// can be read, and `companies` exist where the app knows companies. Any connector can read
    /// one record of each entity; connectors that can tell more say more.
    async fn diagnose(&self, entities: &[EntitySpec], companies: &[String]) -> Vec<Finding> {
        let _ = companies;
        let mut out = Vec::new();
        for e in entities {
            if let Err(err) = self.list(e, None, 1).await {
                out.push(Finding {
                    subject: e.name.clone(),
                    problem: format!("cannot read it: {}", err.message()),
                    fix: format!("check that {} has this table with the key and fields the job maps", self.app()),
                });
            }
        }
        out
    }
}

/// A problem `dualsync doctor` found with an app: what it concerns (an entity set, a company,
/// the service), what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub subject: String,
    pub problem: String,
    pub fix: String,
}

/// One row of a local app's change log.
#[derive(Debug, Clone, PartialEq)]
pub struct RawChange {
    pub seq: u64,
    pub entity: String,
    pub key: Key,
    pub op: Operation,
    pub txid: String,
    pub company: Option<String>,
    /// The record's version after the change.
    pub version: Option<String>,
    pub at_ms: i64,
}

/// A change log a local app keeps (through triggers), read by local ingress.
#[async_trait]
pub trait ChangeFeed: Send + Sync {
    /// Changes with `seq > after`, in seq order, `limit` at most.
    async fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<RawChange>, ConnectorError>;
}
