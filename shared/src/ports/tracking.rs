//! How ingress learns of an app's changes by asking it (change tracking: OData delta links),
//! where the app keeps no change log dualsync can read and sends no events.
use async_trait::async_trait;
use serde_json::Value;
use std::collections::BTreeMap;

use super::connector::{ConnectorError, EntitySpec};
use crate::domain::change::Key;

/// A record the app says changed (created or updated) since the last delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedChange {
    /// The app's own id of the record (Dataverse's primary id), which is all a later delete
    /// names; `None` when the app did not send one.
    pub id: Option<String>,
    /// The integration key; `None` when a key field is missing or empty (outside the map).
    pub key: Option<Key>,
    /// The record's version (etag) after the change.
    pub version: Option<String>,
    /// The record's change number where the version carries one (Dataverse's RowVersion).
    pub seq: Option<u64>,
    /// The other fields the caller asked for (the map's company field), as read.
    pub fields: BTreeMap<String, Value>,
}

/// A record the app says is gone since the last delta.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedDelete {
    /// The app's own id of the record (normalised like [`TrackedChange::id`]).
    pub id: String,
    /// The integration key, when the service sent the key fields with the deleted entry (an
    /// OData 4.01 service may; Dataverse sends the id only).
    pub key: Option<Key>,
}

/// One page of tracked changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrackedPage {
    pub changes: Vec<TrackedChange>,
    pub deletes: Vec<TrackedDelete>,
    /// Where the rest of this answer is (`@odata.nextLink`), absolute.
    pub next: Option<String>,
    /// Where the changes after this answer will be (`@odata.deltaLink`), absolute; only on an
    /// answer's last page.
    pub delta: Option<String>,
}

/// What asking for changes gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracked {
    Page(TrackedPage),
    /// The service no longer knows the starting point the link names (an expired or invalid
    /// delta token): tracking must start afresh with a full listing. The service's words.
    Expired(String),
}

#[async_trait]
pub trait ChangeTracking: Send + Sync {
    /// The app's name, for messages.
    fn tracking_app(&self) -> &str;
    /// One page of changes: `from` is a link an earlier page gave (its next or delta link), or
    /// `None` to start tracking: a listing of every record of the entity, whose last page
    /// gives the first delta link.
    async fn track(&self, entity: &EntitySpec, from: Option<&str>) -> Result<Tracked, ConnectorError>;
}
