//! App connectors.
pub mod sqlite;
