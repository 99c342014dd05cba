//! Typed access to the items of the one key-value table (DESIGN §4), over the [`KvStore`] port.
mod dead_letters;
mod errors;
mod metrics;
mod parking;
mod parts;
mod requests;
mod tracking;
mod waiters;

pub use crate::domain::requests::ErrorFilter;
pub use dead_letters::{job_of, DeadLetterCursor, DEAD_LETTER_RETENTION_MS};
pub use errors::{ErrorCounts, NewError, ERROR_RETENTION_MS};
pub use metrics::METRICS_RETENTION_MS;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::sync::Arc;
pub use tracking::TrackingPosition;

use crate::domain::change::Key;
use crate::domain::config::{compile, ConfigErrors, JobDef};
use crate::domain::errors::ConflictRecord;
use crate::domain::job::{Job, JobStatus, Side};
use crate::domain::keys;
use crate::domain::link::LinkState;
use crate::ports::{Clock, Expect, Item, KvError, KvStore, Page, Put, SkRange};

/// How long capture remembers a transaction id (redelivery window).
pub const TX_DEDUPE_TTL_MS: i64 = 24 * 3600 * 1000;
/// How long the seqs of a record's deletes are kept: SQS's longest message retention.
const GONE_TTL_MS: i64 = 14 * 24 * 3600 * 1000;

/// A job as stored: its definition, status and config revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub def: JobDef,
    pub status: JobStatus,
    pub revision: u64,
    /// Why the job is paused (by an operator, or by its alert rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
}

/// A link state with the item revision it was read at (for the conditional commit).
#[derive(Debug, Clone, PartialEq)]
pub struct VersionedLink {
    pub state: LinkState,
    pub rev: u64,
}

/// What capture knew when it began a live delete: the version of the target's record it meant
/// to delete, as read then (`None`: there was none).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteMark {
    pub target_version: Option<String>,
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
    #[error(transparent)]
    Refused(#[from] crate::domain::requests::RequestRefusal),
}

#[derive(Clone)]
pub struct State {
    kv: Arc<dyn KvStore>,
    clock: Arc<dyn Clock>,
}

pub(crate) fn decode<T: DeserializeOwned>(item: &Item) -> Result<T, KvError> {
    serde_json::from_value(item.body.clone()).map_err(|e| KvError::Corrupt {
        pk: item.pk.clone(),
        sk: item.sk.clone(),
        reason: e.to_string(),
    })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> serde_json::Value {
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
                (
                    JobRecord { def, status: old.status, revision, paused_reason: old.paused_reason },
                    Expect::Rev(item.rev),
                )
            }
            None => (JobRecord { def, status: JobStatus::Stopped, revision: 1, paused_reason: None }, Expect::Absent),
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

    /// The jobs whose apps' changes are captured: active ones, and paused ones (delivery keeps
    /// their changes until they resume).
    pub async fn capturing_jobs(&self) -> Result<Vec<Job>, StateError> {
        let mut out = Vec::new();
        for name in self.job_names().await? {
            let (job, status) = self.job(&name).await?;
            if status == JobStatus::Active || status.holds_deliveries() {
                out.push(job);
            }
        }
        Ok(out)
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
        self.transition_because(name, action, None).await
    }

    /// A transition with its reason, kept while the job is paused.
    pub async fn transition_because(
        &self,
        name: &str,
        action: crate::domain::job::JobAction,
        reason: Option<String>,
    ) -> Result<JobStatus, StateError> {
        loop {
            let (mut record, rev) = self.job_record(name).await?;
            record.status = record.status.apply(name, action)?;
            if record.status != JobStatus::Resuming {
                record.paused_reason = record.status.holds_deliveries().then(|| reason.clone()).flatten();
            }
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

    /// Removes a link whose record no longer exists on either side, if it is still at revision
    /// `rev`; false when it changed since (a delivery marked a create, which may yet land). Its
    /// open error rows are the caller's to close.
    pub async fn forget_link(&self, job: &str, map: &str, key: &Key, rev: u64) -> Result<bool, KvError> {
        match self.kv.delete(&keys::link_pk(job, map, key), keys::STATE, Expect::Rev(rev)).await {
            Ok(()) => Ok(true),
            Err(KvError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The seq, per side, of the latest of the record's deletes that ran (see
    /// [`Self::remember_delete`]): a delete older than that of its side is stale.
    pub async fn deleted_seqs(&self, job: &str, map: &str, key: &Key) -> Result<[u64; 2], KvError> {
        Ok(self.deleted_item(job, map, key).await?.0)
    }

    async fn deleted_item(&self, job: &str, map: &str, key: &Key) -> Result<([u64; 2], Option<u64>), KvError> {
        match self.kv.get(&keys::link_pk(job, map, key), keys::GONE).await? {
            Some(item) => Ok((decode(&item)?, Some(item.rev))),
            None => Ok(([0; 2], None)),
        }
    }

    /// Keeps the seq of a delete of the record from `side` that ran, past the link it removes:
    /// an older delete of the record captured late (its message retried, or behind a backlog)
    /// is told by it. Kept as long as SQS keeps a message.
    pub async fn remember_delete(&self, job: &str, map: &str, key: &Key, side: Side, seq: u64) -> Result<(), KvError> {
        loop {
            let (mut seqs, rev) = self.deleted_item(job, map, key).await?;
            if seqs[side.index()] >= seq {
                return Ok(());
            }
            seqs[side.index()] = seq;
            let put = Put {
                pk: keys::link_pk(job, map, key),
                sk: keys::GONE.into(),
                body: encode(&seqs),
                expires_at: Some(self.now_ms() + GONE_TTL_MS),
                expect: rev.map_or(Expect::Absent, Expect::Rev),
            };
            // Two deletes of the record at once: the later write reads the other's seq first.
            match self.kv.put(put).await {
                Err(KvError::ConditionFailed { .. }) => continue,
                done => return done.map(|_| ()),
            }
        }
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

    /// The mark capture left when it began the live delete of `map`/`key` in this transaction,
    /// if any: a capture run again after a crash reads it (see `steps::capture::delete_now`).
    pub async fn delete_mark(
        &self,
        job: &str,
        app: &str,
        txid: &str,
        map: &str,
        key: &Key,
    ) -> Result<Option<DeleteMark>, KvError> {
        let item = self.kv.get(&keys::tx_pk(job, app, txid), &keys::delete_mark_sk(map, key)).await?;
        item.map(|i| decode(&i)).transpose()
    }

    /// Kept as long as the transaction's dedupe mark: a capture message comes back within it.
    pub async fn put_delete_mark(
        &self,
        job: &str,
        app: &str,
        txid: &str,
        map: &str,
        key: &Key,
        mark: &DeleteMark,
    ) -> Result<(), KvError> {
        let put = Put {
            pk: keys::tx_pk(job, app, txid),
            sk: keys::delete_mark_sk(map, key),
            body: encode(mark),
            expires_at: Some(self.now_ms() + TX_DEDUPE_TTL_MS),
            expect: Expect::Any,
        };
        self.kv.put(put).await.map(|_| ())
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
