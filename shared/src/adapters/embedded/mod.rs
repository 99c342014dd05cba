//! Embedded (SQLite) key-value table and queues.
pub mod db;
pub mod kv;
pub mod queue;

pub use db::EmbeddedDb;
pub use kv::EmbeddedKv;
pub use queue::{EmbeddedQueue, QueueConfig, QueuedMessage};
