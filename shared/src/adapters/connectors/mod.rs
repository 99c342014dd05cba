//! App connectors.
