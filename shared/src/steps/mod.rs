//! The four steps.
