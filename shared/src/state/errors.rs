//! Sync error rows (`ERR#job`, sort key: first seen and id) and the index that finds a link's
//! row for one cause (`ERRIDX#job`), so that a repeat raises the row's attempts.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use super::{decode, encode, ErrorFilter, State};
use crate::domain::change::Key;
use crate::domain::errors::{ErrorCategory, ErrorStatus, SyncError};
use crate::domain::job::Side;
use crate::domain::keys;
use crate::domain::link::LinkState;
use crate::ports::{Expect, KvError, Page, Put, SkRange};

/// How long a resolved or dismissed row stays visible before the table's TTL removes it.
pub const ERROR_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

/// What a step knows of a failure when it records it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewError {
    pub map: String,
    pub entity: String,
    pub app: String,
    pub source: Side,
    pub key: Key,
    pub seq: u64,
    pub txid: String,
    pub category: ErrorCategory,
    pub message: String,
    /// `key` is the app's record id, because the event named the record by id alone and its
    /// integration key could not be found. Such a row cannot be retried (nothing could address
    /// the record's counterpart) and is linked to no record; the operator mends it by hand.
    pub by_record_id: bool,
    /// The change is a delete (see [`SyncError::delete`]).
    pub delete: bool,
}

/// Error rows counted by category and by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCounts {
    pub total: usize,
    pub by_category: BTreeMap<ErrorCategory, usize>,
    pub by_status: BTreeMap<ErrorStatus, usize>,
}

fn range(filter: &ErrorFilter) -> SkRange {
    SkRange {
        prefix: String::new(),
        from: filter.from_ms.map(|t| keys::time_sk(t, "")),
        to: filter.to_ms.map(|t| keys::time_sk(t, "")),
    }
}

/// Resolved and dismissed rows expire; open and retrying ones stay until they are settled.
fn expiry(status: ErrorStatus, now: i64) -> Option<i64> {
    matches!(status, ErrorStatus::Resolved | ErrorStatus::Dismissed).then_some(now + ERROR_RETENTION_MS)
}

impl State {
    /// Records a failure: one row per failing link and cause; a repeat raises attempts and last
    /// seen and reopens the row. Retriable rows are noted on the link so that its next sync
    /// resolves them. Returns the row's sort key.
    pub async fn record_error(&self, job: &str, e: NewError) -> Result<String, KvError> {
        // Another step may write the same row between our read and our write (delivery and
        // capture both record a link's concurrency skips): read it again and repeat.
        let sk = loop {
            match self.put_error_row(job, &e).await {
                Err(KvError::ConditionFailed { .. }) => continue,
                written => break written?,
            }
        };
        if e.category.retriable() && !e.by_record_id {
            self.note_open_error(job, &e.map, &e.key, &sk).await?;
        }
        Ok(sk)
    }

    /// One attempt at writing `e`'s row: a new row, or the link's row for this cause updated
    /// under the revision read.
    async fn put_error_row(&self, job: &str, e: &NewError) -> Result<String, KvError> {
        let now = self.now_ms();
        let idx_pk = keys::error_index_pk(job);
        let idx_sk = keys::error_index_sk(&e.map, &e.key, e.source, e.category);
        let pk = keys::errors_pk(job);
        let existing = match self.kv.get(&idx_pk, &idx_sk).await? {
            Some(idx) => match idx.body.as_str() {
                Some(sk) => self.kv.get(&pk, sk).await?,
                None => None,
            },
            None => None,
        };
        // A dismissed row is settled for good (and one that cannot be read is left as it is):
        // a new failure starts a new row.
        let existing = existing
            .and_then(|item| decode::<SyncError>(&item).ok().map(|row| (item, row)))
            .filter(|(_, row)| row.status != ErrorStatus::Dismissed);
        Ok(match existing {
            Some((item, mut row)) => {
                row.attempts += 1;
                row.last_seen_ms = now;
                row.seq = row.seq.max(e.seq);
                row.txid = e.txid.clone();
                row.message = e.message.clone();
                row.status = ErrorStatus::Open;
                // The row holds the record's latest failed change from this source.
                row.delete = e.delete;
                let put = Put {
                    pk: pk.clone(),
                    sk: item.sk.clone(),
                    body: encode(&row),
                    expires_at: None,
                    expect: Expect::Rev(item.rev),
                };
                self.kv.put(put).await?;
                item.sk
            }
            None => {
                let id = keys::error_id(now, &uuid::Uuid::new_v4().simple().to_string()[..12]);
                let sk = keys::error_sk(&id).unwrap_or_else(|| keys::time_sk(now, &id));
                let row = SyncError {
                    id,
                    job: job.to_string(),
                    map: e.map.clone(),
                    entity: e.entity.clone(),
                    app: e.app.clone(),
                    source: e.source,
                    key: e.key.clone(),
                    seq: e.seq,
                    txid: e.txid.clone(),
                    category: e.category,
                    message: e.message.clone(),
                    retriable: e.category.retriable() && !e.by_record_id,
                    attempts: 1,
                    first_seen_ms: now,
                    last_seen_ms: now,
                    status: ErrorStatus::Open,
                    request: None,
                    delete: e.delete,
                };
                let rows = vec![
                    Put {
                        pk: pk.clone(),
                        sk: sk.clone(),
                        body: encode(&row),
                        expires_at: None,
                        expect: Expect::Absent,
                    },
                    Put { pk: idx_pk, sk: idx_sk, body: sk.clone().into(), expires_at: None, expect: Expect::Any },
                ];
                for r in self.kv.put_many(rows).await? {
                    r?;
                }
                sk
            }
        })
    }

    async fn note_open_error(&self, job: &str, map: &str, key: &Key, sk: &str) -> Result<(), KvError> {
        loop {
            let current = self.links(job, &[(map, key)]).await?.pop().flatten();
            let (mut state, rev) = match current {
                Some(l) => (l.state, Some(l.rev)),
                None => (LinkState::default(), None),
            };
            if state.open_errors.iter().any(|s| s == sk) {
                return Ok(());
            }
            state.open_errors.push(sk.to_string());
            match self.kv.put(Self::link_put(job, map, key, &state, rev)).await {
                Ok(_) => return Ok(()),
                Err(KvError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks error rows resolved (the link synced). Rows dismissed meanwhile stay dismissed. A
    /// delete's row stays open: a sync brings the record that delete removes, so only its retry
    /// (capture's live path) resolves it.
    pub async fn resolve_errors(&self, job: &str, sks: &[String]) -> Result<(), KvError> {
        self.update_rows(job, sks, |row| {
            (matches!(row.status, ErrorStatus::Open | ErrorStatus::Retrying) && !row.delete)
                .then(|| row.status = ErrorStatus::Resolved)
                .is_some()
        })
        .await
        .map(|_| ())
    }

    /// Closes open or retrying rows whose cause is gone (the record no longer exists on either
    /// side), saying why: resolved, with the reason as the message.
    pub async fn close_errors(&self, job: &str, sks: &[String], why: &str) -> Result<(), KvError> {
        self.update_rows(job, sks, |row| {
            matches!(row.status, ErrorStatus::Open | ErrorStatus::Retrying)
                .then(|| {
                    row.status = ErrorStatus::Resolved;
                    row.message = format!("closed: {why} (was: {})", row.message);
                })
                .is_some()
        })
        .await
        .map(|_| ())
    }

    /// Hands open rows to a retry request: `retrying`, tagged with the request's id.
    pub async fn mark_retrying(&self, job: &str, sks: &[String], request: &str) -> Result<usize, KvError> {
        self.update_rows(job, sks, |row| {
            (row.status == ErrorStatus::Open)
                .then(|| {
                    row.status = ErrorStatus::Retrying;
                    row.request = Some(request.to_string());
                })
                .is_some()
        })
        .await
    }

    /// A retried row whose change went through: resolved, unless something reopened it since
    /// (a new failure of the same link and cause, recorded by the retry itself).
    pub async fn resolve_retried(&self, job: &str, sk: &str) -> Result<(), KvError> {
        self.update_rows(job, &[sk.to_string()], |row| {
            (row.status == ErrorStatus::Retrying).then(|| row.status = ErrorStatus::Resolved).is_some()
        })
        .await
        .map(|_| ())
    }

    /// A retried change was handled without syncing its record (skipped as not the latest, or
    /// failed for another cause): its row, if still retrying, is open again with attempts raised.
    pub async fn settle_retry(&self, job: &str, sk: &str, why: &str) -> Result<(), KvError> {
        self.update_rows(job, &[sk.to_string()], |row| {
            (row.status == ErrorStatus::Retrying)
                .then(|| {
                    row.status = ErrorStatus::Open;
                    row.attempts += 1;
                    row.message = format!("retried: {why}");
                })
                .is_some()
        })
        .await
        .map(|_| ())
    }

    /// Dismisses open rows for good: they stay visible as `dismissed` until they expire, are
    /// never retried, and a new failure of the same link and cause starts a new row.
    pub async fn dismiss_errors(&self, job: &str, rows: &[(String, SyncError)]) -> Result<usize, KvError> {
        let sks: Vec<String> = rows.iter().map(|(sk, _)| sk.clone()).collect();
        let n = self
            .update_rows(job, &sks, |row| {
                (row.status == ErrorStatus::Open).then(|| row.status = ErrorStatus::Dismissed).is_some()
            })
            .await?;
        for (sk, row) in rows {
            let idx_sk = keys::error_index_sk(&row.map, &row.key, row.source, row.category);
            let idx_pk = keys::error_index_pk(job);
            // Only this row's index entry: a newer row of the same cause keeps its own.
            if let Some(idx) = self.kv.get(&idx_pk, &idx_sk).await? {
                if idx.body.as_str() == Some(sk.as_str()) {
                    match self.kv.delete(&idx_pk, &idx_sk, Expect::Rev(idx.rev)).await {
                        Ok(()) | Err(KvError::ConditionFailed { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(n)
    }

    /// Applies `change` to each row it accepts (returns `true` for), stamping last seen and
    /// the retention of settled rows. A row changed meanwhile (a new attempt) keeps its newer
    /// state. Returns how many rows changed.
    async fn update_rows(
        &self,
        job: &str,
        sks: &[String],
        change: impl Fn(&mut SyncError) -> bool,
    ) -> Result<usize, KvError> {
        let pk = keys::errors_pk(job);
        let now = self.now_ms();
        let mut changed = 0;
        for chunk in sks.chunks(500) {
            let keys: Vec<(String, String)> = chunk.iter().map(|sk| (pk.clone(), sk.clone())).collect();
            let mut puts = Vec::new();
            for item in self.kv.get_many(&keys).await?.into_iter().flatten() {
                let mut row: SyncError = decode(&item)?;
                if change(&mut row) {
                    row.last_seen_ms = now;
                    puts.push(Put {
                        pk: pk.clone(),
                        sk: item.sk.clone(),
                        expires_at: expiry(row.status, now),
                        body: encode(&row),
                        expect: Expect::Rev(item.rev),
                    });
                }
            }
            changed += self.kv.put_many(puts).await?.iter().filter(|r| r.is_ok()).count();
        }
        Ok(changed)
    }

    /// One error row by its id.
    pub async fn error(&self, job: &str, id: &str) -> Result<Option<SyncError>, KvError> {
        let Some(sk) = keys::error_sk(id) else { return Ok(None) };
        self.kv.get(&keys::errors_pk(job), &sk).await?.map(|item| decode(&item)).transpose()
    }

    /// Error rows in time order that match `filter`, a page at a time. The cursor is the last
    /// row's sort key, so paging is stable while rows are added or change status.
    pub async fn errors(
        &self,
        job: &str,
        filter: &ErrorFilter,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<SyncError>, KvError> {
        let pk = keys::errors_pk(job);
        let range = range(filter);
        let mut out = Vec::new();
        let mut cursor = after.map(str::to_string);
        loop {
            let page = self.kv.query(&pk, &range, limit.max(1) * 2, cursor.as_deref()).await?;
            for item in &page.items {
                let row: SyncError = decode(item)?;
                if filter.matches(&row) {
                    out.push(row);
                    if out.len() == limit {
                        return Ok(Page { items: out, next: Some(item.sk.clone()) });
                    }
                }
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => return Ok(Page { items: out, next: None }),
            }
        }
    }

    /// Calls `each` with every matching row and its sort key, in time order.
    pub async fn scan_errors(
        &self,
        job: &str,
        filter: &ErrorFilter,
        mut each: impl FnMut(String, SyncError),
    ) -> Result<(), KvError> {
        let pk = keys::errors_pk(job);
        let mut cursor: Option<String> = None;
        loop {
            let page = self.kv.query(&pk, &range(filter), 1000, cursor.as_deref()).await?;
            for item in page.items {
                let row: SyncError = decode(&item)?;
                if filter.matches(&row) {
                    each(item.sk, row);
                }
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => return Ok(()),
            }
        }
    }

    /// All matching rows with their sort keys.
    pub async fn error_rows(&self, job: &str, filter: &ErrorFilter) -> Result<Vec<(String, SyncError)>, KvError> {
        let mut out = Vec::new();
        self.scan_errors(job, filter, |sk, row| out.push((sk, row))).await?;
        Ok(out)
    }

    /// Counts of the matching rows by category and by status.
    pub async fn error_counts(&self, job: &str, filter: &ErrorFilter) -> Result<ErrorCounts, KvError> {
        let mut counts = ErrorCounts::default();
        self.scan_errors(job, filter, |_, row| {
            counts.total += 1;
            *counts.by_category.entry(row.category).or_default() += 1;
            *counts.by_status.entry(row.status).or_default() += 1;
        })
        .await?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::embedded::{EmbeddedDb, EmbeddedKv};
    use crate::ports::{Item, KvStore, ManualClock};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// Another worker: writes an error row once, between a recorder's read of it and its update.
    struct Interloper {
        kv: EmbeddedKv,
        armed: AtomicBool,
    }

    #[async_trait]
    impl KvStore for Interloper {
        async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, KvError> {
            self.kv.get(pk, sk).await
        }
        async fn get_many(&self, keys: &[(String, String)]) -> Result<Vec<Option<Item>>, KvError> {
            self.kv.get_many(keys).await
        }
        async fn put(&self, put: Put) -> Result<u64, KvError> {
            if matches!(put.expect, Expect::Rev(_))
                && put.pk.starts_with("ERR#")
                && self.armed.swap(false, Ordering::SeqCst)
            {
                let other = Put { expect: Expect::Any, ..put.clone() };
                self.kv.put(other).await?;
            }
            self.kv.put(put).await
        }
        async fn put_many(&self, puts: Vec<Put>) -> Result<Vec<Result<u64, KvError>>, KvError> {
            self.kv.put_many(puts).await
        }
        async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), KvError> {
            self.kv.delete(pk, sk, expect).await
        }
        async fn query(
            &self,
            pk: &str,
            range: &SkRange,
            limit: usize,
            after: Option<&str>,
        ) -> Result<Page<Item>, KvError> {
            self.kv.query(pk, range, limit, after).await
        }
        async fn add(
            &self,
            pk: &str,
            sk: &str,
            counters: &[(String, u64)],
            expires_at: Option<i64>,
        ) -> Result<(), KvError> {
            self.kv.add(pk, sk, counters, expires_at).await
        }
    }

    /// Capture and delivery record the same link's row at once (the kill -9 soak: a capture
    /// failed on it three times and waited out its backoff past the drain).
    #[tokio::test]
    async fn a_repeat_racing_another_writer_of_its_row_is_still_recorded() {
        let clock = ManualClock::new(1_700_000_000_000);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
        let kv = Arc::new(Interloper { kv: db.kv(), armed: AtomicBool::new(false) });
        let state = State::new(kv.clone(), Arc::new(clock));
        let e = NewError {
            map: "m".into(),
            entity: "e".into(),
            app: "a".into(),
            source: Side::A,
            key: Key(vec!["k".into()]),
            seq: 1,
            txid: "t".into(),
            category: ErrorCategory::Concurrency,
            message: "skipped".into(),
            by_record_id: false,
            delete: false,
        };
        let sk = state.record_error("j", e.clone()).await.unwrap();
        kv.armed.store(true, Ordering::SeqCst);
        assert_eq!(state.record_error("j", e).await.unwrap(), sk, "the same row");
        assert!(!kv.armed.load(Ordering::SeqCst), "the other writer came in between");
        let row: SyncError = decode(&kv.get(&keys::errors_pk("j"), &sk).await.unwrap().unwrap()).unwrap();
        assert_eq!(row.attempts, 3, "the first, the other writer's and ours");
    }
}
