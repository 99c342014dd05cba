//! dualsync: keeps records in two systems of record in step, both ways, eventually consistent.
//!
//! - [`domain`]: pure logic and types (jobs, changes, canonical form, the delivery decision).
//! - [`ports`]: the traits the steps talk to (key-value table, queues, connectors, clock).
//! - [`state`]: the typed items of the one key-value table (DESIGN §4) over the KV port.
//! - [`steps`]: capture, sequence, deliver and reconcile, written once over the ports.
//! - [`adapters`]: embedded (SQLite) table and queues, and the connectors.
//! - [`admin`]: what operators do (jobs, errors, requests), for the CLI and the admin API.
//! - [`runtime`]: the local runner that drives the steps from the embedded queues.
pub mod adapters;
pub mod admin;
pub mod domain;
pub mod ports;
pub mod runtime;
pub mod state;
pub mod steps;
