//! The one key-value table (DESIGN §4): items addressed by partition key and sort key, with
//! optimistic concurrency through a per-item revision and optional expiry (TTL).
use async_trait::async_trait;
use serde_json::Value;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub pk: String,
    pub sk: String,
    /// Bumped by every write; conditional writes compare it.
    pub rev: u64,
    pub body: Value,
    /// Milliseconds since the epoch after which the item reads as absent.
    pub expires_at: Option<i64>,
}

/// The condition a write must meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Unconditional.
    Any,
    /// The item must not exist (or must have expired).
    Absent,
    /// The item must exist with this revision.
    Rev(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Put {
    pub pk: String,
    pub sk: String,
    pub body: Value,
    pub expires_at: Option<i64>,
    pub expect: Expect,
}

/// A sort-key range for queries: `prefix` must match, then `from..to` bounds (inclusive from,
/// exclusive to), compared as strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkRange {
    pub prefix: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass back as `after` for the next page; `None` at the end.
    pub next: Option<String>,
}

#[derive(Debug, Error)]
pub enum KvError {
    #[error("condition failed on {pk} / {sk}")]
    ConditionFailed { pk: String, sk: String },
    #[error("key-value table unavailable: {0}")]
    Unavailable(String),
    #[error("key-value table item {pk} / {sk} is corrupt: {reason}")]
    Corrupt { pk: String, sk: String, reason: String },
}

#[async_trait]
pub trait KvStore: Send + Sync {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, KvError>;
    /// Reads many items at once; the answer is in the order of `keys`.
    async fn get_many(&self, keys: &[(String, String)]) -> Result<Vec<Option<Item>>, KvError>;
    /// Writes one item if its condition holds; returns the new revision.
    async fn put(&self, put: Put) -> Result<u64, KvError>;
    /// Writes many items, each under its own condition (not atomic as a whole). The outer error
    /// is for the table being unreachable; the inner results say which conditions failed.
    async fn put_many(&self, puts: Vec<Put>) -> Result<Vec<Result<u64, KvError>>, KvError>;
    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), KvError>;
    /// Items of one partition whose sort key is in `range`, in sort-key order, `limit` at most,
    /// starting after the sort key `after`.
    async fn query(&self, pk: &str, range: &SkRange, limit: usize, after: Option<&str>) -> Result<Page<Item>, KvError>;
    /// Adds to counters of a counter item, creating it (and any counter it lacks) at zero: one
    /// unconditional write, with no read (DynamoDB `UpdateItem ADD`), so writers never race.
    /// The item reads back with a body of `{name: count}`; `expires_at` is set each time.
    /// Names are `[a-z0-9_]` (each counter is an attribute of its own in DynamoDB), and a
    /// counter item is only ever written through `add`.
    async fn add(&self, pk: &str, sk: &str, counters: &[(String, u64)], expires_at: Option<i64>)
        -> Result<(), KvError>;
}

/// Whether `name` may name a counter of [`KvStore::add`].
pub(crate) fn counter_name_ok(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// The smallest string greater than every string that starts with `prefix`, if there is one.
/// SQLite and DynamoDB compare strings bytewise, and UTF-8 keeps code point order, so incrementing the last
/// code point that can be incremented gives the bound.
pub(crate) fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}
