//! Change notifications: references to changes, never record data (DESIGN §1).
use serde::{Deserialize, Serialize};

use super::job::Side;

/// The transaction id prefix of dualsync's own writes to an app: the change-log rows they
/// leave are echoes (a `sqlite` app's triggers log them, ingress drops them).
pub const OWN_WRITE_TXID_PREFIX: &str = "dualsync-write-";

/// An integration key: the values of a map's key fields in key-pair order, as canonical text.
/// Both apps share the key values, so the same `Key` finds the record on either side.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key(pub Vec<String>);

impl Key {
    /// Operator-facing form: `a/b`.
    pub fn display(&self) -> String {
        self.0.join("/")
    }

    /// A stand-in for a key too long to be stored, for the error row that says so: its first
    /// characters, its length and a hash, short enough for every item keyed by a record key.
    pub fn abbreviated(&self) -> Key {
        let full = self.display();
        let head: String = full.chars().take(40).collect();
        let hash = super::sequence::short_hash(&[full.as_bytes()]);
        Key(vec![format!("{head}… ({} bytes, {})", full.len(), &hash[..12])])
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Create or update: both are delivered as an upsert by integration key.
    Upsert,
    Delete,
}

/// A reference to one change in one app, as ingress delivers it to capture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeNotification {
    pub app: String,
    pub entity: String,
    pub key: Key,
    pub op: Operation,
    /// Monotonic per record where the app gives one (RowVersion, ControlNumber, change-log id).
    pub seq: u64,
    /// The record's version (etag) right after this change, if the source knows it; lets
    /// capture recognise the echo of dualsync's own write without reading the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<String>,
    pub at_ms: i64,
}

/// What ingress puts on the capture queue: the changes one app committed together, or one part
/// of them when they do not fit in one message ([`TransactionNotification::split`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionNotification {
    pub job: String,
    pub app: String,
    pub txid: String,
    pub changes: Vec<ChangeNotification>,
    /// Which part of the transaction this is (from 0) and how many there are; capture dedupes
    /// each part on its own and sequence orders the parts together.
    #[serde(default, skip_serializing_if = "Parts::is_whole")]
    pub parts: Parts,
}

/// Part `index` of `count` of a transaction split over several messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parts {
    pub index: u32,
    pub count: u32,
}

impl Default for Parts {
    fn default() -> Self {
        Parts { index: 0, count: 1 }
    }
}

impl Parts {
    pub fn is_whole(&self) -> bool {
        self.count <= 1
    }
}

/// The most bytes a message the pipeline builds may have: SQS's 256 KiB, less a margin for what
/// the queue adds (attributes) and for rounding.
pub const MAX_MESSAGE_BYTES: usize = 240 * 1024;

/// A single item whose encoding alone exceeds a message's limit: it cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("item {index} takes {bytes} bytes encoded, more than a message may hold ({limit})")]
pub struct TooLargeItem {
    pub index: usize,
    pub bytes: usize,
    pub limit: usize,
}

/// Splits `items` into consecutive runs, in order, such that an envelope of `overhead` bytes
/// holding one run as a JSON array stays within `limit` bytes. Sizes are the items' JSON
/// encodings plus a separating comma, so the result is exact for `serde_json::to_string`.
pub fn split_by_size<T: Serialize>(items: Vec<T>, overhead: usize, limit: usize) -> Result<Vec<Vec<T>>, TooLargeItem> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    let mut run: Vec<T> = Vec::new();
    let mut bytes = overhead;
    for (index, item) in items.into_iter().enumerate() {
        let size = serde_json::to_string(&item).map(|s| s.len()).unwrap_or(usize::MAX);
        if overhead.saturating_add(size) > limit {
            return Err(TooLargeItem { index, bytes: size, limit: limit.saturating_sub(overhead) });
        }
        let comma = usize::from(!run.is_empty());
        if bytes + comma + size > limit {
            runs.push(std::mem::take(&mut run));
            bytes = overhead;
        }
        bytes += usize::from(!run.is_empty()) + size;
        run.push(item);
    }
    if !run.is_empty() || runs.is_empty() {
        runs.push(run);
    }
    Ok(runs)
}

/// The encoded size of `value`.
pub fn encoded_len<T: Serialize>(value: &T) -> usize {
    serde_json::to_string(value).map(|s| s.len()).unwrap_or(usize::MAX)
}

impl TransactionNotification {
    /// This transaction as messages of at most `limit` bytes each: itself when it fits, else
    /// parts of the same transaction id, numbered, in the transaction's order.
    pub fn split(self, limit: usize) -> Result<Vec<TransactionNotification>, TooLargeItem> {
        if encoded_len(&self) <= limit {
            return Ok(vec![self]);
        }
        let TransactionNotification { job, app, txid, changes, .. } = self;
        // The envelope of the largest part number (its digits are the widest).
        let envelope = TransactionNotification {
            job: job.clone(),
            app: app.clone(),
            txid: txid.clone(),
            changes: vec![],
            parts: Parts { index: u32::MAX, count: u32::MAX },
        };
        let runs = split_by_size(changes, encoded_len(&envelope), limit)?;
        let count = runs.len() as u32;
        Ok(runs
            .into_iter()
            .enumerate()
            .map(|(i, changes)| TransactionNotification {
                job: job.clone(),
                app: app.clone(),
                txid: txid.clone(),
                changes,
                parts: Parts { index: i as u32, count },
            })
            .collect())
    }
}

/// One change resolved against a job: which map, from which side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRef {
    pub map: String,
    pub source: Side,
    pub key: Key,
    pub seq: u64,
    pub txid: String,
    /// When the app made the change; carried for end-to-end latency figures.
    pub at_ms: i64,
    /// The error row this delivery retries: settled by its outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_of: Option<String>,
    /// Delivered again because the parent it waited for synced (see `state::waiters`): if its
    /// reference is still missing, it is an ordinary application error and waits no more.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub waited: bool,
}

/// A captured transaction on its way to sequence (capture → sequence queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedTransaction {
    pub job: String,
    pub source: Side,
    pub txid: String,
    pub changes: Vec<ChangeRef>,
    /// A transaction too large for one message is kept in the state table, part by part, and
    /// this message only names it: sequence reads the whole transaction back (`changes` empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredTransaction>,
}

/// Where capture kept a large transaction: the app's name (the item's partition names it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTransaction {
    pub app: String,
}

/// The changes of one dependency root, in delivery order (parent before child).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    /// The root's id: every change under one root is delivered in order, across messages too.
    pub root: String,
    pub changes: Vec<ChangeRef>,
}

/// A deliver-queue message: the lanes of one transaction that share a FIFO message group (a
/// stable bucket of their roots). Packing them in one message saves queue requests; the bucket
/// keeps each root in one group, so its changes stay in order across transactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryBatch {
    pub job: String,
    pub group: String,
    pub lanes: Vec<Lane>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(i: usize) -> ChangeNotification {
        ChangeNotification {
            app: "a".into(),
            entity: "order_lines".into(),
            key: Key(vec![format!("SO-{:06}", i / 7), format!("{i}")]),
            op: Operation::Upsert,
            seq: i as u64,
            version: None,
            company: Some("USMF".into()),
            at_ms: 1_700_000_000_000,
        }
    }

    fn notification(n: usize) -> TransactionNotification {
        TransactionNotification {
            job: "j".into(),
            app: "a".into(),
            txid: "tx-1@1".into(),
            changes: (0..n).map(change).collect(),
            parts: Parts::default(),
        }
    }

    #[test]
    fn runs_fit_exactly_and_keep_every_item_in_order() {
        let items: Vec<String> = (0..500).map(|i| "x".repeat(i % 37)).collect();
        for limit in [60, 200, 1000] {
            let runs = split_by_size(items.clone(), 2, limit).unwrap();
            for r in &runs {
                assert!(!r.is_empty());
                assert!(serde_json::to_string(r).unwrap().len() <= limit, "limit {limit}");
            }
            // Greedy: the next item would not have fitted.
            for w in runs.windows(2) {
                let mut more = w[0].clone();
                more.push(w[1][0].clone());
                assert!(serde_json::to_string(&more).unwrap().len() > limit);
            }
            assert_eq!(runs.concat(), items);
        }
        assert_eq!(split_by_size(Vec::<String>::new(), 2, 10).unwrap(), vec![Vec::<String>::new()]);
        let err = split_by_size(vec!["a".to_string(), "b".repeat(20)], 2, 12).unwrap_err();
        assert_eq!((err.index, err.bytes), (1, 22));
    }

    #[test]
    fn a_large_transaction_is_split_into_numbered_parts_of_one_transaction_id() {
        let tx = notification(3000);
        let whole = serde_json::to_string(&tx).unwrap().len();
        assert!(whole > 256 * 1024, "{whole} bytes: the test needs a transaction over the limit");
        let parts = tx.clone().split(MAX_MESSAGE_BYTES).unwrap();
        assert!(parts.len() >= 2);
        for (i, p) in parts.iter().enumerate() {
            let body = serde_json::to_string(p).unwrap();
            assert!(body.len() <= MAX_MESSAGE_BYTES, "part {i}: {} bytes", body.len());
            assert_eq!((p.txid.as_str(), p.parts), ("tx-1@1", Parts { index: i as u32, count: parts.len() as u32 }));
            assert_eq!(serde_json::from_str::<TransactionNotification>(&body).unwrap(), *p);
        }
        let all: Vec<ChangeNotification> = parts.into_iter().flat_map(|p| p.changes).collect();
        assert_eq!(all, tx.changes, "every change once, in order");
    }

    #[test]
    fn a_transaction_that_fits_stays_whole_and_reads_as_before() {
        let tx = notification(10);
        let parts = tx.clone().split(MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(parts, vec![tx.clone()]);
        let body = serde_json::to_string(&parts[0]).unwrap();
        assert!(!body.contains("parts"), "{body}");
        let old = r#"{"job":"j","app":"a","txid":"t","changes":[]}"#;
        assert!(serde_json::from_str::<TransactionNotification>(old).unwrap().parts.is_whole());
    }

    #[test]
    fn an_abbreviated_key_is_short_and_tells_keys_apart() {
        let a = Key(vec!["k".repeat(5000)]);
        let b = Key(vec!["k".repeat(4999), "j".into()]);
        assert!(a.abbreviated().display().len() < 120);
        assert!(a.abbreviated().display().contains("5000 bytes"));
        assert_ne!(a.abbreviated(), b.abbreviated());
    }
}
