//! App connectors.
#[cfg(feature = "odata")]
pub mod odata;
pub mod odata_apps;
#[cfg(feature = "sqlite")]
pub mod sqlite;
