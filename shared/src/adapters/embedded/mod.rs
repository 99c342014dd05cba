//! Embedded (SQLite) key-value table and queues.
