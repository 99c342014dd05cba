//! The local runner: all four steps in one process over the embedded table and queues.
pub mod doctor;
pub mod ingress;
#[cfg(feature = "sqlite")]
pub mod local;
pub mod tracking;
pub mod verify;
pub mod worker;
