//! Item keys of the key-value table (DESIGN §4). Every user-supplied component is escaped so
//! that no key value can forge another item's key: `\` becomes `\\` and `#` becomes `\#`.
use super::change::Key;
use super::errors::ErrorCategory;
use super::job::Side;

pub fn escape(component: &str) -> String {
    let mut out = String::with_capacity(component.len());
    for ch in component.chars() {
        if ch == '\\' || ch == '#' {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

fn key_part(key: &Key) -> String {
    key.0.iter().map(|c| escape(c)).collect::<Vec<_>>().join("#")
}

/// DynamoDB's limits on an item's partition and sort keys (bytes, UTF-8).
pub const MAX_PK_BYTES: usize = 2048;
pub const MAX_SK_BYTES: usize = 1024;

/// Why a record key cannot be stored, if it is too long for an item keyed by it (its link, or
/// the index entry of its error rows).
pub fn record_key_too_long(job: &str, map: &str, key: &Key) -> Option<String> {
    let link = link_pk(job, map, key).len();
    let index = error_index_sk(map, key, Side::A, ErrorCategory::Concurrency).len();
    (link > MAX_PK_BYTES || index > MAX_SK_BYTES).then(|| {
        format!(
            "key of {map} is too long to store: {} bytes; a link's partition key holds at most {MAX_PK_BYTES} \
             bytes and an error row's index key at most {MAX_SK_BYTES} (with the map name)",
            key.display().len()
        )
    })
}

/// Why a transaction id cannot be stored for capture's dedupe, if it is too long.
pub fn txid_too_long(job: &str, app: &str, txid: &str) -> Option<String> {
    let bytes = tx_pk(job, app, txid).len();
    (bytes > MAX_PK_BYTES).then(|| {
        format!("transaction id is too long to store: {} bytes; its item's partition key holds at most {MAX_PK_BYTES} bytes (with the job and app names)", txid.len())
    })
}

pub const CONFIG: &str = "CONFIG";
pub const STATE: &str = "STATE";
/// In a link's partition: the seq per side of the record's latest delete that ran, kept after
/// the link itself is gone (see `State::remember_delete`).
pub const GONE: &str = "GONE";
pub const CAPTURED: &str = "CAPTURED";

pub fn job_pk(job: &str) -> String {
    format!("JOB#{}", escape(job))
}
/// Partition of the list of jobs (one item per job), so jobs can be listed with a query.
pub const JOBS_PK: &str = "JOBS";

pub fn link_pk(job: &str, map: &str, key: &Key) -> String {
    // The key's component count is fixed per map, so `#` between components cannot collide.
    format!("LINK#{}#{}#{}", escape(job), escape(map), key_part(key))
}

pub fn tx_pk(job: &str, app: &str, txid: &str) -> String {
    format!("TX#{}#{}#{}", escape(job), escape(app), escape(txid))
}

/// In a transaction's partition: capture's mark that it ran the live delete of a record of
/// the transaction. Hashed, because a record key may be longer than a sort key holds.
pub fn delete_mark_sk(map: &str, key: &Key) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}#{}", escape(map), key_part(key)).as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("DELETED#{hex}")
}

/// In a transaction's partition: capture's dedupe mark of one part of a split transaction.
pub fn part_captured_sk(index: u32) -> String {
    format!("{CAPTURED}#{index:010}")
}
/// In a transaction's partition: which parts of a large transaction capture has kept.
pub const PARTS: &str = "PARTS";
/// In a transaction's partition: one piece of one kept part, in order.
pub const PIECE_PREFIX: &str = "PIECE#";
pub fn piece_sk(part: u32, piece: usize) -> String {
    format!("{PIECE_PREFIX}{part:010}#{piece:010}")
}

pub fn errors_pk(job: &str) -> String {
    format!("ERR#{}", escape(job))
}

/// An error row's id: its first-seen time and a random part, so the id alone finds the row.
pub fn error_id(at_ms: i64, random: &str) -> String {
    format!("{}-{random}", at_ms.max(0))
}
/// The sort key of the error row with this id; `None` if it is not an error row id.
pub fn error_sk(id: &str) -> Option<String> {
    let (ms, random) = id.split_once('-')?;
    let ok = !random.is_empty() && random.chars().all(|c| c.is_ascii_alphanumeric());
    ok.then(|| ms.parse::<i64>().ok().map(|ms| time_sk(ms, id))).flatten()
}

/// Finds the open error row of one link and cause, so a repeat raises its attempts.
pub fn error_index_pk(job: &str) -> String {
    format!("ERRIDX#{}", escape(job))
}
pub fn error_index_sk(map: &str, key: &Key, side: Side, category: ErrorCategory) -> String {
    format!("{}#{}#{:?}#{}", escape(map), key_part(key), side, category.as_str())
}

pub fn conflicts_pk(job: &str) -> String {
    format!("CONFLICT#{}", escape(job))
}

/// Reconcile requests of a job (sort key: creation time and id), and its queue places.
pub fn requests_pk(job: &str) -> String {
    format!("REQ#{}", escape(job))
}
pub const REQUEST_QUEUE: &str = "QUEUE";
/// A request's id: its creation time and a random part, so the id alone finds the request.
pub fn request_sk(id: &str) -> Option<String> {
    error_sk(id)
}

/// Deliveries kept while a job is paused, in arrival order.
pub fn parked_pk(job: &str) -> String {
    format!("PARK#{}", escape(job))
}

/// Position of a local change feed (the last change-log seq handed to capture).
/// Where change tracking of one map of an odata app stands (its next or delta link).
pub fn tracking_pk(job: &str, app: &str, map: &str) -> String {
    format!("TRACK#{}#{}#{}", escape(job), escape(app), escape(map))
}

/// The records change tracking has seen in one map of an odata app: record id → integration
/// key (a deleted record is named by its id alone).
pub fn tracked_ids_pk(job: &str, app: &str, map: &str) -> String {
    format!("TRACKID#{}#{}#{}", escape(job), escape(app), escape(map))
}

pub fn feed_pk(job: &str, app: &str) -> String {
    format!("FEED#{}#{}", escape(job), escape(app))
}

/// Dead-letter rows of one queue, one per message, newest first (see [`dead_letter_sk`]).
pub fn dead_letters_pk(queue: &str) -> String {
    format!("DEAD#{}", escape(queue))
}
/// A dead-letter row's sort key: the time counted down from the largest 15-digit number, so an
/// ascending query reads the newest first; then the message id.
pub fn dead_letter_sk(at_ms: i64, message_id: &str) -> String {
    format!("{:015}#{}", 999_999_999_999_999 - at_ms.clamp(0, 999_999_999_999_999), escape(message_id))
}
/// Finds a dead-letter row by message id (sort key: the message id; the item holds the row's
/// sort key).
pub fn dead_letter_index_pk(queue: &str) -> String {
    format!("DEADIDX#{}", escape(queue))
}

/// A job's per-minute metric counters (sort key: the minute's start, zero-padded ms).
pub fn metrics_pk(job: &str) -> String {
    format!("METRICS#{}", escape(job))
}
pub fn metrics_sk(minute_ms: i64) -> String {
    format!("{:015}", minute_ms.max(0))
}

pub fn init_pk(job: &str, map: &str) -> String {
    format!("INIT#{}#{}", escape(job), escape(map))
}

/// A sort key that orders by time: zero-padded milliseconds, then an id.
pub fn time_sk(at_ms: i64, id: &str) -> String {
    format!("{:015}#{}", at_ms.max(0), id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_components_cannot_forge_other_keys() {
        let a = link_pk("j", "m", &Key(vec!["x#y".into()]));
        let b = link_pk("j", "m", &Key(vec!["x".into(), "y".into()]));
        assert_ne!(a, b);
        let c = link_pk("j#m", "x", &Key(vec!["y".into()]));
        let d = link_pk("j", "m#x", &Key(vec!["y".into()]));
        assert_ne!(c, d);
        assert_eq!(escape(r"a\#b"), r"a\\\#b");
    }

    #[test]
    fn error_ids_find_their_sort_keys() {
        let id = error_id(1234, "abc");
        assert_eq!(error_sk(&id), Some(time_sk(1234, &id)));
        for bad in ["", "x-abc", "12", "12-", "12-a#b"] {
            assert_eq!(error_sk(bad), None, "{bad}");
        }
    }

    #[test]
    fn dead_letter_sort_keys_sort_newest_first() {
        assert!(dead_letter_sk(1000, "z") < dead_letter_sk(999, "a"));
        assert!(dead_letter_sk(1000, "a") < dead_letter_sk(1000, "b"));
        assert_eq!(dead_letter_sk(1, "m#1"), r"999999999999998#m\#1");
    }

    #[test]
    fn keys_too_long_for_the_table_are_told() {
        let short = Key(vec!["x".repeat(500), "y".into()]);
        assert_eq!(record_key_too_long("j", "m", &short), None);
        let long = Key(vec!["x".repeat(1100), "y".into()]);
        let why = record_key_too_long("j", "m", &long).unwrap();
        assert!(why.contains("1102 bytes"), "{why}");
        assert!(record_key_too_long("j", "m", &long.abbreviated()).is_none());
        assert_eq!(txid_too_long("j", "a", &"t".repeat(2000)), None);
        assert!(txid_too_long("j", "a", &"t".repeat(2100)).is_some());
    }

    #[test]
    fn time_sort_keys_sort_by_time() {
        assert!(time_sk(999, "z") < time_sk(1000, "a"));
    }
}
