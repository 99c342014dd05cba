//! Pure domain logic: no I/O here, so everything can be tested in isolation.
pub mod canon;
pub mod change;
pub mod config;
pub mod decide;
pub mod delivery;
pub mod errors;
pub mod ingress;
pub mod job;
pub mod keys;
pub mod link;
pub mod metrics;
pub mod requests;
pub mod sequence;
