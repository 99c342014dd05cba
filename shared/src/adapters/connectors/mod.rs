//! App connectors.
#[cfg(feature = "odata")]
pub mod odata;
pub mod sqlite;
