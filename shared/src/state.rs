//! Typed access to the items of the one key-value table (DESIGN §4), over the [`KvStore`] port.
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::sync::Arc;

use crate::domain::change::Key;
use crate::domain::config::{compile, ConfigErrors, JobDef};
use crate::domain::errors::{ConflictRecord, DeadLetter, ErrorCategory, ErrorStatus, SyncError};
use crate::domain::job::{Job, JobStatus, Side};
use crate::domain::keys;
use crate::domain::link::LinkState;
use crate::ports::{Clock, Expect, Item, KvError, KvStore, Page, Put, SkRange};

/// How long capture remembers a transaction id (redelivery window).
pub const TX_DEDUPE_TTL_MS: i64 = 24 * 3600 * 1000;

/// A job as stored: its definition, status and config revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub def: JobDef,
    pub status: JobStatus,
    pub revision: u64,
}

/// A link state with the item revision it was read at (for the conditional commit).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedLink {
    pub state: LinkState,
    pub rev: u64,
}

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
}

/// Which error rows a query or a reconcile request selects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFilter {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    /// Map name or either side's entity name.
    pub entity: Option<String>,
    /// Data source: the app the change came from.
    pub app: Option<String>,
    pub category: Option<ErrorCategory>,
    pub status: Option<ErrorStatus>,
}

impl ErrorFilter {
    pub fn matches(&self, e: &SyncError) -> bool {
        self.entity.as_ref().is_none_or(|x| *x == e.map || *x == e.entity)
            && self.app.as_ref().is_none_or(|x| *x == e.app)
            && self.category.is_none_or(|c| c == e.category)
            && self.status.is_none_or(|s| s == e.status)
            && self.from_ms.is_none_or(|t| e.first_seen_ms >= t)
            && self.to_ms.is_none_or(|t| e.first_seen_ms < t)
    }
    fn range(&self) -> SkRange {
        SkRange {
            prefix: String::new(),
            from: self.from_ms.map(|t| keys::time_sk(t, "")),
            to: self.to_ms.map(|t| keys::time_sk(t, "")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error("no job named '{0}'")]
    UnknownJob(String),
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error(transparent)]
    Transition(#[from] crate::domain::job::IllegalTransition),
    #[error("job '{job}' is {status}: stop it before changing its definition")]
    Running { job: String, status: &'static str },
}

#[derive(Clone)]
pub struct State {
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
}

fn decode<T: DeserializeOwned>(item: &Item) -> Result<T, KvError> {
    serde_json::from_value(item.body.clone()).map_err(|e| KvError::Corrupt {
        pk: item.pk.clone(),
        sk: item.sk.clone(),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

impl State {
    pub fn new(kv: Arc<dyn KvStore>, clock: Arc<dyn Clock>) -> Self {
        State { kv, clock }
    }
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    // ---- jobs ----

    /// Stores a job definition (validated first). A running job's definition cannot change.
    pub async fn apply_job(&self, def: JobDef) -> Result<JobRecord, StateError> {
        compile("(stored job)", &def)?;
        let pk = keys::job_pk(&def.job);
        let existing = self.kv.get(&pk, keys::CONFIG).await?;
        let (record, expect) = match existing {
            Some(item) => {
                let old: JobRecord = decode(&item)?;
                if old.status != JobStatus::Stopped && old.def != def {
                    return Err(StateError::Running { job: def.job.clone(), status: old.status.as_str() });
                }
                let revision = if old.def == def { old.revision } else { old.revision + 1 };
                (JobRecord { def, status: old.status, revision }, Expect::Rev(item.rev))
            }
            None => (JobRecord { def, status: JobStatus::Stopped, revision: 1 }, Expect::Absent),
        };
        self.kv.put(Put { pk, sk: keys::CONFIG.into(), body: encode(&record), expires_at: None, expect }).await?;
        self.kv
            .put(Put {
                pk: keys::JOBS_PK.into(),
                sk: keys::escape(&record.def.job),
                body: serde_json::json!({ "job": record.def.job }),
                expires_at: None,
                expect: Expect::Any,
            })
            .await?;
        Ok(record)
    }

    pub async fn job_record(&self, name: &str) -> Result<(JobRecord, u64), StateError> {
        let item = self.kv.get(&keys::job_pk(name), keys::CONFIG).await?;
        let item = item.ok_or_else(|| StateError::UnknownJob(name.to_string()))?;
        Ok((decode(&item)?, item.rev))
    }

    /// The compiled job and its status.
    pub async fn job(&self, name: &str) -> Result<(Job, JobStatus), StateError> {
        let (record, _) = self.job_record(name).await?;
        Ok((compile("(stored job)", &record.def)?, record.status))
    }

    pub async fn job_names(&self) -> Result<Vec<String>, StateError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.kv.query(keys::JOBS_PK, &SkRange::default(), 500, after.as_deref()).await?;
            for item in &page.items {
                if let Some(j) = item.body.get("job").and_then(|v| v.as_str()) {
                    out.push(j.to_string());
                }
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Moves a job through its status machine; a conflicting concurrent change is retried.
    pub async fn transition(&self, name: &str, action: crate::domain::job::JobAction) -> Result<JobStatus, StateError> {
        loop {
            let (mut record, rev) = self.job_record(name).await?;
            record.status = record.status.apply(name, action)?;
            let put = Put {
                pk: keys::job_pk(name),
                sk: keys::CONFIG.into(),
                body: encode(&record),
                expires_at: None,
                expect: Expect::Rev(rev),
            };
            match self.kv.put(put).await {
                Ok(_) => return Ok(record.status),
                Err(KvError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    // ---- links ----

    pub async fn links(&self, job: &str, refs: &[(&str, &Key)]) -> Result<Vec<Option<VersionedLink>>, KvError> {
        let keys: Vec<(String, String)> =
            refs.iter().map(|(m, k)| (keys::link_pk(job, m, k), keys::STATE.to_string())).collect();
        let items = self.kv.get_many(&keys).await?;
        items
            .into_iter()
            .map(|i| i.map(|item| Ok(VersionedLink { state: decode(&item)?, rev: item.rev })).transpose())
            .collect()
    }

    /// A conditional link write: `rev` is the revision read (`None`: the link must not exist).
    pub fn link_put(job: &str, map: &str, key: &Key, state: &LinkState, rev: Option<u64>) -> Put {
        Put {
            pk: keys::link_pk(job, map, key),
            sk: keys::STATE.into(),
            body: encode(state),
            expires_at: None,
            expect: rev.map_or(Expect::Absent, Expect::Rev),
        }
    }

    pub async fn delete_link(&self, job: &str, map: &str, key: &Key) -> Result<(), KvError> {
        self.kv.delete(&keys::link_pk(job, map, key), keys::STATE, Expect::Any).await
    }

    /// Writes link items, each under its own condition.
    pub async fn put_links(&self, puts: Vec<Put>) -> Result<Vec<Result<u64, KvError>>, KvError> {
        self.kv.put_many(puts).await
    }

    // ---- capture dedupe ----

    pub async fn tx_captured(&self, job: &str, app: &str, txid: &str) -> Result<bool, KvError> {
        Ok(self.kv.get(&keys::tx_pk(job, app, txid), keys::CAPTURED).await?.is_some())
    }

    pub fn tx_mark(&self, job: &str, app: &str, txid: &str) -> Put {
        Put {
            pk: keys::tx_pk(job, app, txid),
            sk: keys::CAPTURED.into(),
            body: serde_json::Value::Null,
            expires_at: Some(self.now_ms() + TX_DEDUPE_TTL_MS),
            expect: Expect::Any,
        }
    }

    // ---- change feed positions (local ingress) ----

    pub async fn feed_position(&self, job: &str, app: &str) -> Result<u64, KvError> {
        let item = self.kv.get(&keys::feed_pk(job, app), keys::STATE).await?;
        Ok(item.and_then(|i| i.body.as_u64()).unwrap_or(0))
    }

    pub async fn set_feed_position(&self, job: &str, app: &str, seq: u64) -> Result<(), KvError> {
        let put = Put {
            pk: keys::feed_pk(job, app),
            sk: keys::STATE.into(),
            body: seq.into(),
            expires_at: None,
            expect: Expect::Any,
        };
        self.kv.put(put).await.map(|_| ())
    }

    // ---- sync errors ----

    /// Records a failure: one row per failing link and cause; a repeat raises attempts and last
    /// seen and reopens the row. Retriable rows are noted on the link so that its next sync
    /// resolves them. Returns the row's sort key.
    pub async fn record_error(&self, job: &str, e: NewError) -> Result<String, KvError> {
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
        let sk = match existing {
            Some(item) => {
                let mut row: SyncError = decode(&item)?;
                row.attempts += 1;
                row.last_seen_ms = now;
                row.seq = row.seq.max(e.seq);
                row.txid = e.txid.clone();
                row.message = e.message.clone();
                row.status = ErrorStatus::Open;
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
                let id = uuid::Uuid::new_v4().simple().to_string();
                let sk = keys::time_sk(now, &id);
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
                    retriable: e.category.retriable(),
                    attempts: 1,
                    first_seen_ms: now,
                    last_seen_ms: now,
                    status: ErrorStatus::Open,
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
        };
        if e.category.retriable() {
            self.note_open_error(job, &e.map, &e.key, &sk).await?;
        }
        Ok(sk)
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

    /// Marks error rows resolved (the link synced). Rows dismissed meanwhile stay dismissed.
    pub async fn resolve_errors(&self, job: &str, sks: &[String]) -> Result<(), KvError> {
        self.set_error_status(job, sks, ErrorStatus::Resolved, &[ErrorStatus::Open, ErrorStatus::Retrying]).await
    }

    /// Sets the status of rows currently in one of `from`.
    pub async fn set_error_status(
        &self,
        job: &str,
        sks: &[String],
        to: ErrorStatus,
        from: &[ErrorStatus],
    ) -> Result<(), KvError> {
        let pk = keys::errors_pk(job);
        let keys: Vec<(String, String)> = sks.iter().map(|sk| (pk.clone(), sk.clone())).collect();
        let mut puts = Vec::new();
        for item in self.kv.get_many(&keys).await?.into_iter().flatten() {
            let mut row: SyncError = decode(&item)?;
            if from.contains(&row.status) {
                row.status = to;
                row.last_seen_ms = self.now_ms();
                puts.push(Put {
                    pk: pk.clone(),
                    sk: item.sk.clone(),
                    body: encode(&row),
                    expires_at: None,
                    expect: Expect::Rev(item.rev),
                });
            }
        }
        // A row changed meanwhile (a new attempt) keeps its newer status.
        self.kv.put_many(puts).await.map(|_| ())
    }

    /// Error rows in time order that match `filter`, a page at a time. The cursor is the last
    /// row's sort key, so paging is stable while rows are added.
    pub async fn errors(
        &self,
        job: &str,
        filter: &ErrorFilter,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<SyncError>, KvError> {
        let pk = keys::errors_pk(job);
        let range = filter.range();
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

    /// All matching rows with their sort keys (for reconcile requests).
    pub async fn error_rows(&self, job: &str, filter: &ErrorFilter) -> Result<Vec<(String, SyncError)>, KvError> {
        let pk = keys::errors_pk(job);
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.kv.query(&pk, &filter.range(), 1000, cursor.as_deref()).await?;
            for item in &page.items {
                let row: SyncError = decode(item)?;
                if filter.matches(&row) {
                    out.push((item.sk.clone(), row));
                }
            }
            match page.next {
                Some(n) => cursor = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// Dismisses rows for good: deleted, with their index entries.
    pub async fn dismiss_errors(&self, job: &str, rows: &[(String, SyncError)]) -> Result<usize, KvError> {
        for (sk, row) in rows {
            self.kv.delete(&keys::errors_pk(job), sk, Expect::Any).await?;
            let idx_sk = keys::error_index_sk(&row.map, &row.key, row.source, row.category);
            self.kv.delete(&keys::error_index_pk(job), &idx_sk, Expect::Any).await?;
        }
        Ok(rows.len())
    }

    // ---- dead letters ----

    /// Records a message on its last receive, before it moves to the dead-letter queue. Keyed
    /// by message id, so handling the same receive twice leaves one row.
    pub async fn record_dead_letter(
        &self,
        queue: &str,
        m: &crate::ports::InMessage,
        reason: &str,
    ) -> Result<(), KvError> {
        let job = serde_json::from_str::<serde_json::Value>(&m.body)
            .ok()
            .and_then(|v| v.get("job").and_then(|j| j.as_str()).map(str::to_string));
        let row = DeadLetter {
            queue: queue.to_string(),
            message_id: m.id.clone(),
            job,
            receive_count: m.receive_count,
            reason: reason.to_string(),
            body: m.body.clone(),
            at_ms: self.now_ms(),
        };
        let put = Put {
            pk: keys::dead_letters_pk(queue),
            sk: keys::escape(&m.id),
            body: encode(&row),
            expires_at: None,
            expect: Expect::Any,
        };
        self.kv.put(put).await.map(|_| ())
    }

    /// The dead-letter rows of a queue, oldest first.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, KvError> {
        let mut rows: Vec<DeadLetter> = Vec::new();
        let mut after = None;
        loop {
            let page = self.kv.query(&keys::dead_letters_pk(queue), &SkRange::default(), 500, after.as_deref()).await?;
            rows.extend(page.items.iter().map(decode).collect::<Result<Vec<DeadLetter>, _>>()?);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        rows.sort_by_key(|r| r.at_ms);
        Ok(rows)
    }

    // ---- conflicts ----

    /// Logs a conflict once: the same link with the same pair of contents is one conflict,
    /// whichever side's change saw it first.
    pub async fn record_conflict(&self, c: ConflictRecord) -> Result<bool, KvError> {
        let mut pair = c.hashes.clone();
        pair.sort();
        let id = crate::domain::sequence::short_hash(&[
            c.map.as_bytes(),
            pair[0].as_bytes(),
            pair[1].as_bytes(),
            c.key.display().as_bytes(),
        ]);
        let marker = Put {
            pk: format!("{}#SEEN", keys::conflicts_pk(&c.job)),
            sk: id.clone(),
            body: serde_json::Value::Null,
            expires_at: None,
            expect: Expect::Absent,
        };
        match self.kv.put(marker).await {
            Err(KvError::ConditionFailed { .. }) => return Ok(false),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let row = ConflictRecord { id: id.clone(), ..c };
        let put = Put {
            pk: keys::conflicts_pk(&row.job),
            sk: keys::time_sk(row.at_ms, &id),
            body: encode(&row),
            expires_at: None,
            expect: Expect::Any,
        };
        self.kv.put(put).await?;
        Ok(true)
    }

    pub async fn conflicts(
        &self,
        job: &str,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<ConflictRecord>, KvError> {
        let page = self.kv.query(&keys::conflicts_pk(job), &SkRange::default(), limit, after).await?;
        Ok(Page { items: page.items.iter().map(decode).collect::<Result<_, _>>()?, next: page.next })
    }
}
