//! The key-value table (DESIGN §4) in the embedded SQLite file: table `kv`, keyed by
//! `(pk, sk)`, `WITHOUT ROWID` so that items of one partition sit together in sort-key order.
use async_trait::async_trait;
use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value;

use super::db::EmbeddedDb;
use crate::ports::kv::{counter_name_ok, prefix_end, Expect, Item, KvError, KvStore, Page, Put, SkRange};

/// [`KvStore`] over the `kv` table of an [`EmbeddedDb`]. Get one with [`EmbeddedDb::kv`].
#[derive(Debug, Clone)]
pub struct EmbeddedKv {
    db: EmbeddedDb,
}

impl EmbeddedKv {
    pub(crate) fn new(db: EmbeddedDb) -> Self {
        EmbeddedKv { db }
    }

    /// Deletes the items whose expiry has passed (they already read as absent); returns how many.
    pub fn purge_expired(&self) -> Result<usize, KvError> {
        let now = self.db.now_ms();
        let conn = self.db.lock();
        let mut stmt = conn
            .prepare_cached("DELETE FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?1")
            .map_err(unavailable)?;
        stmt.execute([now]).map_err(unavailable)
    }
}

fn unavailable(e: rusqlite::Error) -> KvError {
    KvError::Unavailable(format!("state database: {e}"))
}

fn corrupt(pk: &str, sk: &str, reason: impl std::fmt::Display) -> KvError {
    KvError::Corrupt { pk: pk.to_string(), sk: sk.to_string(), reason: reason.to_string() }
}

fn live(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_none_or(|t| t > now)
}

/// A row as read, before its body is parsed.
struct RawItem {
    sk: String,
    rev: i64,
    body: String,
    expires_at: Option<i64>,
}

impl RawItem {
    fn into_item(self, pk: &str) -> Result<Item, KvError> {
        let rev =
            u64::try_from(self.rev).map_err(|_| corrupt(pk, &self.sk, format!("negative revision {}", self.rev)))?;
        let body: Value =
            serde_json::from_str(&self.body).map_err(|e| corrupt(pk, &self.sk, format!("body is not JSON: {e}")))?;
        Ok(Item { pk: pk.to_string(), sk: self.sk, rev, body, expires_at: self.expires_at })
    }
}

/// The live row at `(pk, sk)`, if any, unparsed: bodies are parsed after the lock is released.
fn get_in(conn: &rusqlite::Connection, pk: &str, sk: &str, now: i64) -> Result<Option<RawItem>, KvError> {
    let mut stmt =
        conn.prepare_cached("SELECT rev, body, expires_at FROM kv WHERE pk = ?1 AND sk = ?2").map_err(unavailable)?;
    let raw = stmt
        .query_row(params![pk, sk], |r| {
            Ok(RawItem { sk: sk.to_string(), rev: r.get(0)?, body: r.get(1)?, expires_at: r.get(2)? })
        })
        .optional()
        .map_err(unavailable)?;
    Ok(raw.filter(|raw| live(raw.expires_at, now)))
}

/// The stored revision of `(pk, sk)` and whether it is live: `None` if there is no row.
fn current_rev(tx: &Transaction<'_>, pk: &str, sk: &str, now: i64) -> Result<Option<(i64, bool)>, KvError> {
    let mut stmt =
        tx.prepare_cached("SELECT rev, expires_at FROM kv WHERE pk = ?1 AND sk = ?2").map_err(unavailable)?;
    stmt.query_row(params![pk, sk], |r| {
        let expires_at: Option<i64> = r.get(1)?;
        Ok((r.get::<_, i64>(0)?, live(expires_at, now)))
    })
    .optional()
    .map_err(unavailable)
}

fn holds(expect: Expect, current: Option<(i64, bool)>) -> bool {
    match expect {
        Expect::Any => true,
        Expect::Absent => !matches!(current, Some((_, true))),
        Expect::Rev(want) => matches!(current, Some((rev, true)) if u64::try_from(rev) == Ok(want)),
    }
}

/// One conditional write inside an open transaction, its body already encoded. The outer error
/// is for the database, the inner one for the condition.
fn put_in(tx: &Transaction<'_>, put: &Put, body: &str, now: i64) -> Result<Result<u64, KvError>, KvError> {
    let current = current_rev(tx, &put.pk, &put.sk, now)?;
    if !holds(put.expect, current) {
        return Ok(Err(KvError::ConditionFailed { pk: put.pk.clone(), sk: put.sk.clone() }));
    }
    // The revision keeps counting across an expiry (the row is still there): a writer holding a
    // revision read before the item expired can never match the item written after.
    let rev = current.map_or(1, |(rev, _)| rev.saturating_add(1));
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO kv (pk, sk, rev, body, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (pk, sk) DO UPDATE SET
                rev = excluded.rev, body = excluded.body, expires_at = excluded.expires_at",
        )
        .map_err(unavailable)?;
    stmt.execute(params![put.pk, put.sk, rev, body, put.expires_at]).map_err(unavailable)?;
    // `rev` started at 1 and only grows, so it is positive.
    Ok(Ok(rev as u64))
}

/// Bodies are encoded before the writer lock is taken: the lock is held for SQLite work only.
fn encode(put: &Put) -> Result<String, KvError> {
    serde_json::to_string(&put.body).map_err(|e| corrupt(&put.pk, &put.sk, e))
}

#[async_trait]
impl KvStore for EmbeddedKv {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, KvError> {
        let now = self.db.now_ms();
        let raw = get_in(&self.db.read_lock(), pk, sk, now)?;
        raw.map(|r| r.into_item(pk)).transpose()
    }

    async fn get_many(&self, keys: &[(String, String)]) -> Result<Vec<Option<Item>>, KvError> {
        let now = self.db.now_ms();
        let mut conn = self.db.read_lock();
        // One read transaction: a consistent snapshot, and one lock for all the reads.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred).map_err(unavailable)?;
        let raw = keys.iter().map(|(pk, sk)| get_in(&tx, pk, sk, now)).collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(unavailable)?;
        drop(conn);
        raw.into_iter().zip(keys).map(|(r, (pk, _))| r.map(|r| r.into_item(pk)).transpose()).collect()
    }

    async fn put(&self, put: Put) -> Result<u64, KvError> {
        let now = self.db.now_ms();
        let body = encode(&put)?;
        let mut conn = self.db.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
        let rev = put_in(&tx, &put, &body, now)?;
        tx.commit().map_err(unavailable)?;
        rev
    }

    async fn put_many(&self, puts: Vec<Put>) -> Result<Vec<Result<u64, KvError>>, KvError> {
        let now = self.db.now_ms();
        let bodies = puts.iter().map(encode).collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.db.lock();
        // One transaction (one commit) for the batch; each put still has its own condition, and
        // a failed condition only fails that put.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
        let out =
            puts.iter().zip(&bodies).map(|(put, body)| put_in(&tx, put, body, now)).collect::<Result<Vec<_>, _>>()?;
        tx.commit().map_err(unavailable)?;
        Ok(out)
    }

    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), KvError> {
        let now = self.db.now_ms();
        let mut conn = self.db.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
        let current = current_rev(&tx, pk, sk, now)?;
        if !holds(expect, current) {
            return Err(KvError::ConditionFailed { pk: pk.to_string(), sk: sk.to_string() });
        }
        if current.is_some() {
            let mut stmt = tx.prepare_cached("DELETE FROM kv WHERE pk = ?1 AND sk = ?2").map_err(unavailable)?;
            stmt.execute(params![pk, sk]).map_err(unavailable)?;
        }
        tx.commit().map_err(unavailable)
    }

    /// `limit` 0 is taken as 1, so that a page always makes progress.
    async fn query(&self, pk: &str, range: &SkRange, limit: usize, after: Option<&str>) -> Result<Page<Item>, KvError> {
        let now = self.db.now_ms();
        let limit = limit.max(1);
        // Lower bound (inclusive): the larger of the prefix and `from`.
        let lower: &str = match &range.from {
            Some(from) if from.as_str() > range.prefix.as_str() => from,
            _ => &range.prefix,
        };
        // Upper bound (exclusive): the smaller of the end of the prefix and `to`.
        let upper = match (prefix_end(&range.prefix), &range.to) {
            (Some(end), Some(to)) => Some(if to.as_str() < end.as_str() { to.clone() } else { end }),
            (end, to) => end.or_else(|| to.clone()),
        };
        let mut sql = String::from(
            "SELECT sk, rev, body, expires_at FROM kv
             WHERE pk = ?1 AND sk >= ?2 AND (expires_at IS NULL OR expires_at > ?3)",
        );
        if after.is_some() {
            sql.push_str(" AND sk > ?4");
        }
        if upper.is_some() {
            sql.push_str(" AND sk < ?5");
        }
        // `?6` is always there, so the statement always takes six parameters.
        sql.push_str(" ORDER BY sk LIMIT ?6");
        let conn = self.db.read_lock();
        let mut stmt = conn.prepare_cached(&sql).map_err(unavailable)?;
        // One more than asked: tells whether another page follows.
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let sql_params: [&dyn rusqlite::ToSql; 6] = [&pk, &lower, &now, &after, &upper, &fetch];
        let mut rows = stmt.query(&sql_params[..]).map_err(unavailable)?;
        let mut items = Vec::new();
        let mut more = false;
        while let Some(r) = rows.next().map_err(unavailable)? {
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(RawItem {
                sk: r.get(0).map_err(unavailable)?,
                rev: r.get(1).map_err(unavailable)?,
                body: r.get(2).map_err(unavailable)?,
                expires_at: r.get(3).map_err(unavailable)?,
            });
        }
        drop(rows);
        drop(stmt);
        drop(conn);
        let items = items.into_iter().map(|raw| raw.into_item(pk)).collect::<Result<Vec<_>, _>>()?;
        let next = if more { items.last().map(|i: &Item| i.sk.clone()) } else { None };
        Ok(Page { items, next })
    }

    /// Read, add and write in one immediate transaction (the writer lock), so adds never race.
    /// An expired item starts again from zero.
    async fn add(
        &self,
        pk: &str,
        sk: &str,
        counters: &[(String, u64)],
        expires_at: Option<i64>,
    ) -> Result<(), KvError> {
        if let Some((name, _)) = counters.iter().find(|(n, _)| !counter_name_ok(n)) {
            return Err(corrupt(pk, sk, format!("'{name}' cannot name a counter: use a-z, 0-9 and _")));
        }
        let now = self.db.now_ms();
        let mut conn = self.db.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(unavailable)?;
        let mut body = match get_in(&tx, pk, sk, now)? {
            Some(raw) => match raw.into_item(pk)?.body {
                Value::Object(m) => m,
                _ => return Err(corrupt(pk, sk, "a counter item's body is not an object")),
            },
            None => serde_json::Map::new(),
        };
        for (name, n) in counters {
            let was = body.get(name).and_then(Value::as_u64).unwrap_or(0);
            body.insert(name.clone(), Value::from(was.saturating_add(*n)));
        }
        let put = Put { pk: pk.to_string(), sk: sk.to_string(), body: Value::Null, expires_at, expect: Expect::Any };
        let text = serde_json::to_string(&body).map_err(|e| corrupt(pk, sk, e))?;
        put_in(&tx, &put, &text, now)??;
        tx.commit().map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::clock::{Clock, ManualClock};
    use serde_json::json;
    use std::sync::Arc;

    fn setup() -> (EmbeddedKv, ManualClock) {
        let clock = ManualClock::new(1_000_000);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("open");
        (db.kv(), clock)
    }

    fn put(pk: &str, sk: &str, body: Value, expect: Expect) -> Put {
        Put { pk: pk.into(), sk: sk.into(), body, expires_at: None, expect }
    }

    fn is_condition_failed<T: std::fmt::Debug>(r: &Result<T, KvError>) -> bool {
        matches!(r, Err(KvError::ConditionFailed { .. }))
    }

    #[tokio::test]
    async fn conditional_puts_bump_the_revision() {
        let (kv, _) = setup();
        assert_eq!(kv.put(put("p", "s", json!(1), Expect::Absent)).await.expect("create"), 1);
        assert!(is_condition_failed(&kv.put(put("p", "s", json!(2), Expect::Absent)).await));
        assert_eq!(kv.put(put("p", "s", json!(3), Expect::Rev(1))).await.expect("rev 1"), 2);
        assert!(is_condition_failed(&kv.put(put("p", "s", json!(4), Expect::Rev(1))).await), "stale rev");
        assert_eq!(kv.put(put("p", "s", json!(5), Expect::Any)).await.expect("any"), 3);
        assert!(is_condition_failed(&kv.put(put("p", "other", json!(6), Expect::Rev(1))).await), "rev on missing");
        assert_eq!(kv.put(put("p", "new", json!(7), Expect::Any)).await.expect("any on missing"), 1);

        let item = kv.get("p", "s").await.expect("get").expect("present");
        assert_eq!((item.rev, item.body), (3, json!(5)), "failed puts wrote nothing");
        assert_eq!(kv.get("p", "other").await.expect("get"), None);
    }

    #[tokio::test]
    async fn adds_create_counters_and_sum_them() {
        let (kv, clock) = setup();
        let exp = Some(clock.now_ms() + 100);
        kv.add("m", "1", &[("a".into(), 2), ("b".into(), 1)], exp).await.expect("create");
        kv.add("m", "1", &[("a".into(), 3), ("c".into(), 4)], exp).await.expect("add");
        let item = kv.get("m", "1").await.expect("get").expect("present");
        assert_eq!(item.body, json!({"a": 5, "b": 1, "c": 4}));
        assert_eq!(item.rev, 2);
        assert!(kv.add("m", "1", &[("A#".into(), 1)], None).await.is_err(), "a name DynamoDB could not hold");
        clock.advance(100);
        kv.add("m", "1", &[("a".into(), 1)], None).await.expect("after expiry");
        assert_eq!(kv.get("m", "1").await.expect("get").expect("present").body, json!({"a": 1}), "starts again");
    }

    #[tokio::test]
    async fn expired_items_read_as_absent() {
        let (kv, clock) = setup();
        let now = clock.now_ms();
        let mut p = put("p", "ttl", json!({"a": 1}), Expect::Absent);
        p.expires_at = Some(now + 100);
        assert_eq!(kv.put(p).await.expect("put"), 1);
        assert_eq!(kv.get("p", "ttl").await.expect("get").map(|i| i.expires_at), Some(Some(now + 100)));

        clock.advance(99);
        assert!(kv.get("p", "ttl").await.expect("get").is_some(), "still live 1 ms before expiry");
        clock.advance(1);
        assert_eq!(kv.get("p", "ttl").await.expect("get"), None, "expires_at <= now reads absent");
        assert!(is_condition_failed(&kv.put(put("p", "ttl", json!(0), Expect::Rev(1))).await), "expired is not live");
        let page = kv.query("p", &SkRange::default(), 10, None).await.expect("query");
        assert!(page.items.is_empty(), "query skips expired items");
        assert_eq!(kv.get_many(&[("p".into(), "ttl".into())]).await.expect("get_many"), vec![None]);

        // Absent passes on an expired item; the revision keeps counting.
        assert_eq!(kv.put(put("p", "ttl", json!(2), Expect::Absent)).await.expect("recreate"), 2);
        assert_eq!(kv.get("p", "ttl").await.expect("get").map(|i| (i.rev, i.expires_at)), Some((2, None)));
    }

    #[tokio::test]
    async fn purge_expired_deletes_only_expired_rows() {
        let (kv, clock) = setup();
        let now = clock.now_ms();
        for (sk, exp) in [("a", Some(now + 10)), ("b", Some(now + 1_000)), ("c", None)] {
            let mut p = put("p", sk, json!(sk), Expect::Any);
            p.expires_at = exp;
            kv.put(p).await.expect("put");
        }
        clock.advance(10);
        assert_eq!(kv.purge_expired().expect("purge"), 1);
        assert_eq!(kv.purge_expired().expect("purge again"), 0);
        let sks: Vec<String> =
            kv.query("p", &SkRange::default(), 10, None).await.expect("q").items.into_iter().map(|i| i.sk).collect();
        assert_eq!(sks, ["b", "c"]);
    }

    #[tokio::test]
    async fn delete_honours_its_condition() {
        let (kv, clock) = setup();
        kv.put(put("p", "s", json!(1), Expect::Absent)).await.expect("put");
        assert!(is_condition_failed(&kv.delete("p", "s", Expect::Rev(2)).await));
        assert!(is_condition_failed(&kv.delete("p", "s", Expect::Absent).await));
        kv.delete("p", "s", Expect::Rev(1)).await.expect("delete rev 1");
        assert_eq!(kv.get("p", "s").await.expect("get"), None);
        kv.delete("p", "s", Expect::Any).await.expect("delete missing is fine");
        kv.delete("p", "s", Expect::Absent).await.expect("absent holds");
        assert!(is_condition_failed(&kv.delete("p", "s", Expect::Rev(1)).await));

        let mut p = put("p", "ttl", json!(1), Expect::Any);
        p.expires_at = Some(clock.now_ms());
        kv.put(p).await.expect("put expired");
        kv.delete("p", "ttl", Expect::Absent).await.expect("expired counts as absent");
        assert_eq!(kv.put(put("p", "ttl", json!(1), Expect::Absent)).await.expect("fresh"), 1, "row is gone");
    }

    #[tokio::test]
    async fn get_many_answers_in_key_order() {
        let (kv, _) = setup();
        kv.put(put("p", "b", json!("b"), Expect::Any)).await.expect("put");
        kv.put(put("q", "a", json!("qa"), Expect::Any)).await.expect("put");
        let keys: Vec<(String, String)> = [("q", "a"), ("p", "zz"), ("p", "b"), ("q", "a")]
            .iter()
            .map(|(p, s)| (p.to_string(), s.to_string()))
            .collect();
        let got = kv.get_many(&keys).await.expect("get_many");
        let bodies: Vec<Option<Value>> = got.into_iter().map(|i| i.map(|i| i.body)).collect();
        assert_eq!(bodies, vec![Some(json!("qa")), None, Some(json!("b")), Some(json!("qa"))]);
        assert!(kv.get_many(&[]).await.expect("empty").is_empty());
    }

    #[tokio::test]
    async fn put_many_checks_each_condition_on_its_own() {
        let (kv, _) = setup();
        kv.put(put("p", "exists", json!(0), Expect::Any)).await.expect("put");
        let out = kv
            .put_many(vec![
                put("p", "new", json!(1), Expect::Absent),
                put("p", "exists", json!(2), Expect::Absent),
                put("p", "exists", json!(3), Expect::Rev(1)),
                put("p", "new", json!(4), Expect::Rev(1)),
            ])
            .await
            .expect("batch");
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].as_ref().ok(), Some(&1));
        assert!(is_condition_failed(&out[1]));
        assert_eq!(out[2].as_ref().ok(), Some(&2));
        assert_eq!(out[3].as_ref().ok(), Some(&2), "sees the earlier put of the same batch");
        assert_eq!(kv.get("p", "exists").await.expect("get").map(|i| i.body), Some(json!(3)));
        assert_eq!(kv.get("p", "new").await.expect("get").map(|i| i.body), Some(json!(4)));
    }

    async fn all_pages(kv: &EmbeddedKv, pk: &str, range: &SkRange, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..1_000 {
            let page = kv.query(pk, range, limit, after.as_deref()).await.expect("query");
            assert!(page.items.len() <= limit.max(1));
            out.extend(page.items.into_iter().map(|i| i.sk));
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
        panic!("paging does not end");
    }

    #[tokio::test]
    async fn query_prefix_range_and_paging() {
        let (kv, _) = setup();
        let sks = ["", "a", "a/1", "a/2", "a/3", "a/30", "a/4", "a0", "b/1", "a/\u{10FFFF}"];
        for sk in sks {
            kv.put(put("p", sk, json!(sk), Expect::Any)).await.expect("put");
        }
        kv.put(put("other", "a/1", json!(0), Expect::Any)).await.expect("put");

        let prefix = SkRange { prefix: "a/".into(), from: None, to: None };
        let want = ["a/1", "a/2", "a/3", "a/30", "a/4", "a/\u{10FFFF}"];
        for limit in [1, 2, 4, 6, 100] {
            assert_eq!(all_pages(&kv, "p", &prefix, limit).await, want, "limit {limit}");
        }
        let page = kv.query("p", &prefix, 6, None).await.expect("q");
        assert_eq!(page.next, None, "exactly `limit` left: no next page");
        let page = kv.query("p", &prefix, 2, None).await.expect("q");
        assert_eq!(page.next.as_deref(), Some("a/2"));

        let bounded = SkRange { prefix: "a/".into(), from: Some("a/2".into()), to: Some("a/4".into()) };
        assert_eq!(all_pages(&kv, "p", &bounded, 1).await, ["a/2", "a/3", "a/30"]);
        let from_below = SkRange { prefix: "a/".into(), from: Some("0".into()), to: Some("zzz".into()) };
        assert_eq!(all_pages(&kv, "p", &from_below, 3).await, want);
        let all = all_pages(&kv, "p", &SkRange::default(), 3).await;
        let mut sorted: Vec<String> = sks.iter().map(|s| s.to_string()).collect();
        sorted.sort();
        assert_eq!(all, sorted, "the empty sort key is included and order is bytewise");
        let after_mid = kv.query("p", &prefix, 10, Some("a/25")).await.expect("q");
        assert_eq!(after_mid.items.first().map(|i| i.sk.as_str()), Some("a/3"), "after need not exist");
    }

    #[tokio::test]
    async fn paging_is_stable_while_items_are_added_before_the_cursor() {
        let (kv, _) = setup();
        for i in 0..10 {
            kv.put(put("p", &format!("k{i:02}"), json!(i), Expect::Any)).await.expect("put");
        }
        let first = kv.query("p", &SkRange::default(), 5, None).await.expect("q");
        kv.put(put("p", "k00a", json!("late"), Expect::Any)).await.expect("put before cursor");
        let second = kv.query("p", &SkRange::default(), 5, first.next.as_deref()).await.expect("q");
        let sks: Vec<&str> = second.items.iter().map(|i| i.sk.as_str()).collect();
        assert_eq!(sks, ["k05", "k06", "k07", "k08", "k09"]);
        assert_eq!(second.next, None);
    }

    #[test]
    fn prefix_end_is_the_least_upper_bound() {
        assert_eq!(prefix_end(""), None);
        assert_eq!(prefix_end("a/").as_deref(), Some("a0"));
        assert_eq!(prefix_end("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(prefix_end("\u{10FFFF}"), None);
        assert_eq!(prefix_end("x\u{D7FF}").as_deref(), Some("x\u{E000}"), "skips surrogates");
    }

    #[tokio::test]
    async fn corrupt_body_is_reported() {
        let clock = ManualClock::new(0);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock)).expect("open");
        let kv = db.kv();
        db.lock()
            .execute("INSERT INTO kv (pk, sk, rev, body, expires_at) VALUES ('p', 's', 1, '{not json', NULL)", [])
            .expect("raw insert");
        let err = kv.get("p", "s").await.expect_err("corrupt");
        assert!(matches!(&err, KvError::Corrupt { pk, sk, .. } if pk == "p" && sk == "s"), "{err}");
        assert!(matches!(kv.query("p", &SkRange::default(), 10, None).await, Err(KvError::Corrupt { .. })));
        assert!(matches!(kv.get_many(&[("p".into(), "s".into())]).await, Err(KvError::Corrupt { .. })));
        // It can still be overwritten.
        assert_eq!(kv.put(put("p", "s", json!(1), Expect::Rev(1))).await.expect("overwrite"), 2);
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let clock = Arc::new(ManualClock::new(0));
        {
            let kv = EmbeddedDb::open(&path, clock.clone()).expect("open").kv();
            kv.put(put("p", "s", json!({"x": [1, 2]}), Expect::Absent)).await.expect("put");
            kv.put(put("p", "s", json!({"x": [3]}), Expect::Rev(1))).await.expect("put");
        }
        let kv = EmbeddedDb::open(&path, clock).expect("reopen").kv();
        let item = kv.get("p", "s").await.expect("get").expect("present");
        assert_eq!((item.rev, item.body), (2, json!({"x": [3]})));
    }

    mod model {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        fn sk() -> impl Strategy<Value = String> {
            "[ab/]{0,4}"
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
            #[test]
            fn query_pages_match_a_model(
                sks in proptest::collection::btree_set(sk(), 0..24),
                prefix in "[ab/]{0,2}",
                from in proptest::option::of(sk()),
                to in proptest::option::of(sk()),
                limit in 1usize..5,
            ) {
                let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
                let (kv, _) = setup();
                let got = rt.block_on(async {
                    let puts = sks.iter().map(|s| put("p", s, json!(s), Expect::Any)).collect();
                    kv.put_many(puts).await.expect("put_many");
                    let range = SkRange { prefix: prefix.clone(), from: from.clone(), to: to.clone() };
                    all_pages(&kv, "p", &range, limit).await
                });
                let want: Vec<String> = sks
                    .iter()
                    .filter(|s| s.starts_with(&prefix))
                    .filter(|s| from.as_ref().is_none_or(|f| s.as_str() >= f.as_str()))
                    .filter(|s| to.as_ref().is_none_or(|t| s.as_str() < t.as_str()))
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
