//! The traits the steps talk to. Adapters implement them for the embedded (SQLite) and the AWS
//! backends, and for each kind of app connector.
pub mod clock;
pub mod connector;
pub mod kv;
pub mod queue;
pub mod secrets;
pub mod tracking;

pub use clock::{Clock, ManualClock, SystemClock};
pub use connector::{
    Bind, ChangeFeed, Connector, ConnectorError, EntitySpec, Finding, ListPage, Precondition, RawChange, Record,
    WriteFailure, WriteOp,
};
pub use kv::{Expect, Item, KvError, KvStore, Page, Put, SkRange};
pub use queue::{InMessage, OutMessage, Queue, QueueDepth, QueueError};
pub use secrets::{Secret, SecretError, SecretStore};
pub use tracking::{ChangeTracking, Tracked, TrackedChange, TrackedDelete, TrackedPage};
