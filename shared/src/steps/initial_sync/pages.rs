//! The state of an initial sync in the table (DESIGN §4 `INIT#job#map`): per map, source app
//! and company filter, one checkpoint item (`FROM#app`, or `FROM#app#CO#company`) for the
//! listing, and one page task per listed page beside it (`…#PAGE#n`).
//!
//! Listing is sequential (each page's cursor comes from the one before) and cheap; delivering
//! a page is the work, and pages are delivered in parallel and finish in any order. So the
//! listing checkpoint and the pages' progress are kept apart: a listed page becomes a task
//! holding its records' keys and change seqs (references, never field values) before the
//! listing checkpoint moves past it, and the task is marked done, with its counts, once every
//! record of it is synced or has an error row. Resuming delivers the tasks not done, then lists
//! on from the checkpoint: no record is skipped whatever order pages finished in, and a page
//! delivered twice (a crash between its delivery and its mark) is harmless, since §3 is safe to
//! repeat. Holding keys rather than a cursor makes a task exact: listing again from a cursor
//! could give another set of records once the source changed.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::counts::Counts;
use crate::domain::change::Key;
use crate::domain::keys;
use crate::ports::{Expect, KvStore, Put, SkRange};
use crate::steps::StepError;

/// The listing's checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Cursor after the last listed page.
    pub after: Option<String>,
    /// Every page is listed (tasks may still be running).
    #[serde(default)]
    pub listed_all: bool,
    /// Pages listed so far: the next page's number.
    #[serde(default)]
    pub pages: u64,
    /// Pages marked done: once every page is listed and done, the map is (on AWS, whichever of
    /// the lister and the last page sees that moves the sync to the next map).
    #[serde(default)]
    pub pages_done: u64,
    /// Records listed, and records of the pages done: the sync's progress (`job status`).
    #[serde(default)]
    pub listed: u64,
    #[serde(default)]
    pub done: u64,
    /// Records the target held when the map's sync began, for the target-only count.
    #[serde(default)]
    pub target_before: Option<u64>,
    /// Records the source held then: the progress bar's length.
    #[serde(default)]
    pub source_total: Option<u64>,
    /// Begun as a sync of this map alone (`--map`): on AWS its end does not move on to the
    /// maps after it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub only_map: bool,
    /// Records per page (AWS: the next map's listing keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<usize>,
}

/// One listed record of a page task: its key, the change seq its listing gave (so that a
/// resumed delivery is not taken for a stale change) and its company.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub k: Key,
    #[serde(default)]
    pub s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<String>,
    /// The error row this delivery retries (`--only-failed`), never stored in a task.
    #[serde(skip)]
    pub retry: Option<String>,
}

/// A page task.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PageTask {
    /// The records to deliver; dropped once done.
    #[serde(default)]
    pub entries: Vec<Entry>,
    #[serde(default)]
    pub done: bool,
    /// Per company, once done.
    #[serde(default)]
    pub counts: BTreeMap<String, Counts>,
}

/// Where one initial sync (a map, a source app, a company filter) keeps its items.
#[derive(Debug, Clone)]
pub struct SyncItems {
    pub pk: String,
    pub sk: String,
}

impl SyncItems {
    pub fn new(job: &str, map: &str, from_app: &str, company: Option<&str>) -> Self {
        let mut sk = format!("FROM#{}", keys::escape(from_app));
        if let Some(c) = company {
            sk.push_str(&format!("#CO#{}", keys::escape(c)));
        }
        SyncItems { pk: keys::init_pk(job, map), sk }
    }

    pub fn page_sk(&self, n: u64) -> String {
        format!("{}#PAGE#{n:010}", self.sk)
    }

    fn pages(&self) -> SkRange {
        SkRange { prefix: format!("{}#PAGE#", self.sk), from: None, to: None }
    }

    pub async fn checkpoint(&self, kv: &dyn KvStore) -> Result<(Checkpoint, Option<u64>), StepError> {
        Ok(match kv.get(&self.pk, &self.sk).await? {
            Some(item) => (decode(&item.pk, &item.sk, item.body)?, Some(item.rev)),
            None => (Checkpoint::default(), None),
        })
    }

    /// Writes the checkpoint over revision `rev` (`None`: a first one); returns the new revision.
    /// Fails with a condition failure when another writer moved it first.
    pub async fn put_checkpoint(&self, kv: &dyn KvStore, cp: &Checkpoint, rev: Option<u64>) -> Result<u64, StepError> {
        let put = Put {
            pk: self.pk.clone(),
            sk: self.sk.clone(),
            body: serde_json::to_value(cp).unwrap_or_default(),
            expires_at: None,
            expect: rev.map_or(Expect::Absent, Expect::Rev),
        };
        Ok(kv.put(put).await?)
    }

    /// Changes the checkpoint with `f` under optimistic concurrency (the lister and the pages
    /// finishing all write it), again on a lost race. `f` answers false to leave it as it is;
    /// the answer is the checkpoint written, if any.
    pub async fn update_checkpoint(
        &self,
        kv: &dyn KvStore,
        mut f: impl FnMut(&mut Checkpoint) -> bool,
    ) -> Result<Option<Checkpoint>, StepError> {
        loop {
            let (mut cp, rev) = self.checkpoint(kv).await?;
            if !f(&mut cp) {
                return Ok(None);
            }
            match self.put_checkpoint(kv, &cp, rev).await {
                Ok(_) => return Ok(Some(cp)),
                Err(StepError::Kv(crate::ports::KvError::ConditionFailed { .. })) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Marks page `n` done with its counts and counts it on the checkpoint; the checkpoint as
    /// written when this call did it (`None`: the page was done already).
    pub async fn finish(
        &self,
        kv: &dyn KvStore,
        n: u64,
        counts: BTreeMap<String, Counts>,
    ) -> Result<Option<Checkpoint>, StepError> {
        let records: u64 = counts.values().map(|c| c.listed).sum();
        if !self.finish_page(kv, n, counts).await? {
            return Ok(None);
        }
        self.update_checkpoint(kv, |cp| {
            cp.pages_done += 1;
            cp.done += records;
            true
        })
        .await
    }

    /// Moves the listing past page `n` (listed with `records` entries, `next` after it). `None`
    /// when another lister did first.
    pub async fn listed(
        &self,
        kv: &dyn KvStore,
        n: u64,
        records: usize,
        next: Option<String>,
    ) -> Result<Option<Checkpoint>, StepError> {
        self.update_checkpoint(kv, |cp| {
            if cp.pages != n || cp.listed_all {
                return false;
            }
            cp.pages = n + 1;
            cp.listed += records as u64;
            cp.listed_all = next.is_none();
            cp.after = next.clone();
            true
        })
        .await
    }

    pub async fn put_page(&self, kv: &dyn KvStore, n: u64, task: &PageTask) -> Result<(), StepError> {
        let body = serde_json::to_value(task).unwrap_or_default();
        kv.put(Put { pk: self.pk.clone(), sk: self.page_sk(n), body, expires_at: None, expect: Expect::Any }).await?;
        Ok(())
    }

    /// Marks page `n` done with its counts. True when this call did it (a page delivered twice
    /// is marked once), so that the pages done are counted once each.
    async fn finish_page(&self, kv: &dyn KvStore, n: u64, counts: BTreeMap<String, Counts>) -> Result<bool, StepError> {
        let sk = self.page_sk(n);
        let Some(item) = kv.get(&self.pk, &sk).await? else { return Ok(false) };
        let task: PageTask = decode(&item.pk, &item.sk, item.body)?;
        if task.done {
            return Ok(false);
        }
        let body = serde_json::to_value(PageTask { entries: Vec::new(), done: true, counts }).unwrap_or_default();
        match kv.put(Put { pk: self.pk.clone(), sk, body, expires_at: None, expect: Expect::Rev(item.rev) }).await {
            Ok(_) => Ok(true),
            Err(crate::ports::KvError::ConditionFailed { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn page(&self, kv: &dyn KvStore, n: u64) -> Result<Option<PageTask>, StepError> {
        match kv.get(&self.pk, &self.page_sk(n)).await? {
            Some(item) => Ok(Some(decode(&item.pk, &item.sk, item.body)?)),
            None => Ok(None),
        }
    }

    /// Every page task, in page order: `(number, task)`.
    pub async fn all_pages(&self, kv: &dyn KvStore) -> Result<Vec<(u64, PageTask)>, StepError> {
        let (range, mut after, mut out) = (self.pages(), None::<String>, Vec::new());
        loop {
            let page = kv.query(&self.pk, &range, 500, after.as_deref()).await?;
            for item in page.items {
                let n = item.sk.rsplit('#').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                out.push((n, decode(&item.pk, &item.sk, item.body)?));
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(out),
            }
        }
    }

    /// The counts of the pages done, per company.
    pub async fn counts(&self, kv: &dyn KvStore) -> Result<BTreeMap<String, Counts>, StepError> {
        let mut out: BTreeMap<String, Counts> = BTreeMap::new();
        for (_, task) in self.all_pages(kv).await? {
            for (company, c) in &task.counts {
                out.entry(company.clone()).or_default().add(c);
            }
        }
        Ok(out)
    }
}

fn decode<T: serde::de::DeserializeOwned>(pk: &str, sk: &str, body: serde_json::Value) -> Result<T, StepError> {
    serde_json::from_value(body).map_err(|e| {
        StepError::Kv(crate::ports::KvError::Corrupt { pk: pk.to_string(), sk: sk.to_string(), reason: e.to_string() })
    })
}

/// Forgets an initial sync's checkpoints and page tasks of every map and company filter, so
/// that it runs again from the start.
pub async fn forget(kv: &dyn KvStore, job: &str, maps: &[String], from_app: &str) -> Result<(), StepError> {
    let base = format!("FROM#{}", keys::escape(from_app));
    for map in maps {
        let pk = keys::init_pk(job, map);
        kv.delete(&pk, &base, Expect::Any).await?;
        let range = SkRange { prefix: format!("{base}#"), from: None, to: None };
        loop {
            let page = kv.query(&pk, &range, 500, None).await?;
            if page.items.is_empty() {
                break;
            }
            for item in page.items {
                kv.delete(&pk, &item.sk, Expect::Any).await?;
            }
        }
    }
    Ok(())
}
