//! Adapters: embedded storage and app connectors.
pub mod connectors;
pub mod embedded;
