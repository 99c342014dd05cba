//! Initial sync (DESIGN §5): copy what exists in one app to the other, map by map in delivery
//! order (a map's parents finish before it starts), each record through the §3 algorithm (so it
//! is safe against live changes and against running twice: equal content is linked with no
//! write, different content is a conflict the primary decides, and what only the target holds
//! is left alone and counted).
//!
//! A map's records are listed page by page and each listed page becomes a task (`pages`), which
//! a bounded pool delivers in parallel: companies and pages of one map run side by side, each
//! app's own concurrency limiter bounding its calls beneath. Tasks finish in any order; the
//! checkpoints stay exact (see `pages`), so a run killed at any moment resumes and ends with
//! every record synced exactly once in effect. On AWS the same tasks fan out as reconcile
//! messages, one per page (`fanout`).
//!
//! Every record that does not sync has an error row, all of them. System failures (an app
//! throttled or down while a page is written) get retriable rows before the page is marked
//! done, so nothing is passed over without a row; `--only-failed` (or `dualsync errors retry`)
//! re-runs just those records. A crash between the rows and the mark delivers the page again,
//! which is harmless.
pub mod counts;
pub mod fanout;
pub mod pages;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::task::JoinSet;
use tracing::debug;

pub use counts::{Counts, InitialSyncReport, MapReport};
use pages::{Entry, PageTask, SyncItems};

use super::deliver::ChangeResult;
use super::{LoadedJob, Metrics, StepError, Steps};
use crate::domain::canon::record_key;
use crate::domain::change::ChangeRef;
use crate::domain::errors::{ErrorCategory, ErrorStatus};
use crate::domain::job::{JobStatus, Side};
use crate::domain::requests::ErrorFilter;
use crate::ports::{ListPage, Record};

/// What an initial sync copies, and how.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// The app copied from.
    pub from: Side,
    /// One map only (its parents are expected synced already).
    pub map: Option<String>,
    /// One company only (records of maps with a company field).
    pub company: Option<String>,
    /// Re-runs only the records of open error rows from `from`, not the whole listing.
    pub only_failed: bool,
    /// Counts what would be created, updated, already in step or in conflict; writes nothing.
    pub dry_run: bool,
    pub page_size: usize,
    /// Pages delivered at once.
    pub pages_in_flight: usize,
}

impl SyncOptions {
    pub fn new(from: Side) -> Self {
        SyncOptions {
            from,
            map: None,
            company: None,
            only_failed: false,
            dry_run: false,
            page_size: DEFAULT_PAGE,
            pages_in_flight: DEFAULT_PAGES_IN_FLIGHT,
        }
    }
    pub fn page_size(mut self, n: usize) -> Self {
        self.page_size = n.max(1);
        self
    }
}

/// A page of 500: one batched read per side and one batched write (an OData `$batch` holds
/// 1,000 operations at most), and a task item well under DynamoDB's 400 KB.
pub const DEFAULT_PAGE: usize = 500;
/// Pages in flight: enough to keep both sides and every core busy (the sqlite apps and the
/// state table each have one writer, so more mostly waits), while OData apps' limiters bound
/// their requests whatever the number.
pub const DEFAULT_PAGES_IN_FLIGHT: usize = 4;

/// What a running sync tells its caller (the CLI's progress bars).
#[derive(Debug)]
pub enum SyncEvent<'a> {
    /// A map begins: the records its source holds (if known) and those earlier runs did.
    MapStart {
        map: &'a str,
        total: Option<u64>,
        done: u64,
    },
    /// A page is through: records done so far for the map, this run's and earlier runs'.
    Page {
        map: &'a str,
        done: u64,
    },
    MapDone(&'a MapReport),
}

impl Steps {
    /// Runs an initial sync in this process: pages of each map delivered by a pool of tasks.
    pub async fn initial_sync(
        self: &Arc<Self>,
        job_name: &str,
        opts: &SyncOptions,
        mut on: impl FnMut(SyncEvent<'_>),
    ) -> Result<InitialSyncReport, StepError> {
        let lj = self.sync_job(job_name, opts).await?;
        let mut report = InitialSyncReport { dry_run: opts.dry_run, ..Default::default() };
        for m in selected_maps(&lj, opts) {
            let started = Instant::now();
            let mut map_report = self.sync_map(&lj, m, opts, &mut report, &mut on).await?;
            map_report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            on(SyncEvent::MapDone(&map_report));
            report.maps.push(map_report);
        }
        Ok(report)
    }

    /// The job, active, and the options checked against it.
    async fn sync_job(&self, job_name: &str, opts: &SyncOptions) -> Result<Arc<LoadedJob>, StepError> {
        let lj = self
            .load_job(job_name)
            .await?
            .ok_or_else(|| StepError::State(crate::state::StateError::UnknownJob(job_name.into())))?;
        if lj.status != JobStatus::Active {
            return Err(StepError::NotActive { job: job_name.into(), status: lj.status.as_str() });
        }
        let job = &lj.job;
        if let Some(m) = &opts.map {
            if job.map(m).is_none() {
                let names: Vec<&str> = job.maps.iter().map(|m| m.name.as_str()).collect();
                return Err(StepError::Refused(format!(
                    "job '{job_name}' has no map '{m}' (maps: {})",
                    names.join(", ")
                )));
            }
        }
        if let Some(c) = &opts.company {
            if !job.company_in_scope(Some(c)) {
                return Err(StepError::Refused(format!(
                    "company '{c}' is not in job '{job_name}' (companies: {})",
                    job.companies.join(", ")
                )));
            }
            if opts.only_failed {
                return Err(StepError::Refused(
                    "--only-failed re-runs the failed records of every company: leave out --company".into(),
                ));
            }
        }
        Ok(lj)
    }

    /// One map: its pages, delivered by a bounded pool, in whatever order they finish.
    async fn sync_map(
        self: &Arc<Self>,
        lj: &Arc<LoadedJob>,
        m: usize,
        opts: &SyncOptions,
        report: &mut InitialSyncReport,
        on: &mut impl FnMut(SyncEvent<'_>),
    ) -> Result<MapReport, StepError> {
        let map = &lj.job.maps[m];
        let kv = self.state.kv().as_ref();
        let items = SyncItems::new(&lj.job.name, &map.name, lj.job.app_name(opts.from), opts.company.as_deref());
        let mut source = if opts.only_failed {
            Pages::Failed(self.failed_pages(lj, m, opts).await?.into_iter())
        } else if opts.dry_run {
            Pages::Listing { items: None, cp: Default::default(), pending: Vec::new().into_iter() }
        } else {
            let cp = self.begin_map(lj, m, opts, &items, true).await?;
            let all = items.all_pages(kv).await?;
            let pending: Vec<_> = all.into_iter().filter(|(_, t)| !t.done).map(|(n, t)| (Some(n), t.entries)).collect();
            Pages::Listing { items: Some(items.clone()), cp, pending: pending.into_iter() }
        };
        // Counts of earlier runs, for the bar; a dry run or a re-run of failures starts afresh.
        let mut done: u64 = match &source {
            Pages::Listing { items: Some(_), .. } => items.counts(kv).await?.values().map(|c| c.listed).sum(),
            _ => 0,
        };
        let total = match &source {
            Pages::Listing { items: Some(_), cp, .. } => cp.source_total,
            Pages::Listing { items: None, .. } => Some(self.count(lj, m, opts.from).await?),
            Pages::Failed(pages) => Some(pages.as_slice().iter().map(|(_, e)| e.len() as u64).sum()),
        };
        on(SyncEvent::MapStart { map: &map.name, total, done });

        let mut dry: BTreeMap<String, Counts> = BTreeMap::new();
        let mut this_run = 0u64;
        let mut pool: JoinSet<Result<PageDone, StepError>> = JoinSet::new();
        loop {
            while pool.len() < opts.pages_in_flight.max(1) {
                let Some((n, entries)) = source.next(self, lj, m, opts).await? else { break };
                let (steps, lj, items, dry_run) = (self.clone(), lj.clone(), items.clone(), opts.dry_run);
                let (from, patience) = (opts.from, self.backoff.cap);
                pool.spawn(async move {
                    let (counts, system) = steps.deliver_page(&lj, m, from, &entries, dry_run, patience).await?;
                    if let Some(n) = n {
                        items.finish(steps.state.kv().as_ref(), n, counts.clone()).await?;
                    }
                    Ok(PageDone { counts, system })
                });
            }
            let Some(joined) = pool.join_next().await else { break };
            let page = joined.map_err(|e| StepError::Task(format!("initial sync of map '{}': {e}", map.name)))??;
            let listed: u64 = page.counts.values().map(|c| c.listed).sum();
            report.pages += 1;
            report.records += listed as usize;
            report.system_errors += page.system;
            this_run += listed;
            done += listed;
            if opts.dry_run || opts.only_failed {
                page.counts.iter().for_each(|(c, n)| dry.entry(c.clone()).or_default().add(n));
            }
            self.failpoints.check("initial_sync.after_page")?;
            on(SyncEvent::Page { map: &map.name, done });
        }

        let (companies, target_before) = match &source {
            Pages::Listing { items: Some(_), cp, .. } => (items.counts(kv).await?, cp.target_before),
            Pages::Listing { items: None, .. } if opts.company.is_none() => {
                (dry, Some(lj.connector(opts.from.other()).count(lj.spec(m, opts.from.other())).await?))
            }
            _ => (dry, None),
        };
        let found: u64 = companies.values().map(|c| c.found).sum();
        Ok(MapReport {
            map: map.name.clone(),
            companies,
            target_only: target_before.map(|t| t.saturating_sub(found)),
            records_this_run: this_run,
            elapsed_ms: 0,
        })
    }

    /// The map's checkpoint, made on its first start with (if `count`) the counts the report
    /// needs from before anything is written.
    pub(crate) async fn begin_map(
        &self,
        lj: &LoadedJob,
        m: usize,
        opts: &SyncOptions,
        items: &SyncItems,
        count: bool,
    ) -> Result<pages::Checkpoint, StepError> {
        let kv = self.state.kv().as_ref();
        let (mut cp, rev) = items.checkpoint(kv).await?;
        if rev.is_some() {
            return Ok(cp);
        }
        cp.only_map = opts.map.is_some();
        cp.page_size = Some(opts.page_size);
        if count {
            cp.source_total = Some(self.count(lj, m, opts.from).await?);
            if opts.company.is_none() {
                cp.target_before = Some(self.count(lj, m, opts.from.other()).await?);
            }
        }
        match items.put_checkpoint(kv, &cp, None).await {
            Ok(_) => Ok(cp),
            // Begun meanwhile by another run: that one's counts stand.
            Err(StepError::Kv(crate::ports::KvError::ConditionFailed { .. })) => Ok(items.checkpoint(kv).await?.0),
            Err(e) => Err(e),
        }
    }

    async fn count(&self, lj: &LoadedJob, m: usize, side: Side) -> Result<u64, StepError> {
        Ok(lj.connector(side).count(lj.spec(m, side)).await?)
    }

    /// Lists the next page of a map, as entries (records of companies out of scope left out).
    pub(crate) async fn list_page(
        &self,
        lj: &LoadedJob,
        m: usize,
        opts: &SyncOptions,
        after: Option<&str>,
    ) -> Result<(Vec<Entry>, Option<String>), StepError> {
        let ListPage { records, next } =
            lj.connector(opts.from).list(lj.spec(m, opts.from), after, opts.page_size).await?;
        Ok((entries(lj, m, opts, &records), next))
    }

    /// The open error rows of a map from the source app, as pages of entries.
    async fn failed_pages(
        &self,
        lj: &LoadedJob,
        m: usize,
        opts: &SyncOptions,
    ) -> Result<Vec<(Option<u64>, Vec<Entry>)>, StepError> {
        let job = &lj.job;
        let filter = ErrorFilter {
            entity: Some(job.maps[m].name.clone()),
            app: Some(job.app_name(opts.from).to_string()),
            status: Some(ErrorStatus::Open),
            ..Default::default()
        };
        let mut rows: BTreeMap<crate::domain::change::Key, (u64, Vec<String>)> = BTreeMap::new();
        self.state
            .scan_errors(&job.name, &filter, |sk, row| {
                let retriable =
                    row.retriable && !matches!(row.category, ErrorCategory::Concurrency | ErrorCategory::Conflict);
                if retriable && !row.delete && row.map == job.maps[m].name {
                    let e = rows.entry(row.key).or_default();
                    e.0 = e.0.max(row.seq);
                    e.1.push(sk);
                }
            })
            .await?;
        // One change per record, retrying its first row; the others are resolved with it (a
        // sync resolves every open row of its link).
        // A dry run takes no row.
        let take = |sks: Vec<String>| if opts.dry_run { None } else { sks.into_iter().next() };
        let entries: Vec<Entry> =
            rows.into_iter().map(|(k, (s, sks))| Entry { k, s, c: None, retry: take(sks) }).collect();
        let sks: Vec<String> = entries.iter().filter_map(|e| e.retry.clone()).collect();
        if !sks.is_empty() {
            self.state.mark_retrying(&job.name, &sks, RETRY_TAG).await?;
        }
        Ok(entries.chunks(opts.page_size).map(|c| (None, c.to_vec())).collect())
    }

    /// Delivers (or, in a dry run, decides) one page; each record that hit a system failure
    /// gets a retriable error row. Records the target throttled (it said when to come back:
    /// Retry-After) are delivered again after that wait, while the page's waits add up to at
    /// most `patience`: a large sync into a throttling app slows down instead of failing
    /// records. Returns the counts per company and the failures with rows.
    pub(crate) async fn deliver_page(
        &self,
        lj: &LoadedJob,
        m: usize,
        from: Side,
        entries: &[Entry],
        dry_run: bool,
        patience: Duration,
    ) -> Result<(BTreeMap<String, Counts>, usize), StepError> {
        let now = self.state.now_ms();
        let changes: Vec<ChangeRef> = entries
            .iter()
            .map(|e| ChangeRef {
                map: lj.job.maps[m].name.clone(),
                source: from,
                key: e.k.clone(),
                seq: e.s,
                txid: format!("initial-sync@{now}"),
                at_ms: now,
                retry_of: e.retry.clone(),
                waited: false,
            })
            .collect();
        let refs: Vec<&ChangeRef> = changes.iter().collect();
        let mut results =
            if dry_run { self.decide_wave(lj, &refs).await? } else { self.deliver_wave(lj, &refs).await? };
        let throttled = |r: &ChangeResult| match r {
            ChangeResult::System { retry_after, .. } => *retry_after,
            ChangeResult::Done { .. } => None,
        };
        let mut waited = Duration::ZERO;
        loop {
            let again: Vec<usize> = (0..results.len()).filter(|&i| throttled(&results[i]).is_some()).collect();
            // At least a second: an app answering Retry-After 0 again and again must not spin.
            let wait = again
                .iter()
                .filter_map(|&i| throttled(&results[i]))
                .max()
                .map(|w| w.max(Duration::from_secs(1)))
                .filter(|w| waited + *w <= patience);
            let Some(wait) = wait else { break };
            debug!(job = %lj.job.name, map = %lj.job.maps[m].name, records = again.len(), wait_ms = wait.as_millis() as u64, "initial sync: throttled; delivering again after the app's Retry-After");
            tokio::time::sleep(wait).await;
            waited += wait;
            let refs: Vec<&ChangeRef> = again.iter().map(|&i| &changes[i]).collect();
            for (i, r) in again.into_iter().zip(self.deliver_wave(lj, &refs).await?) {
                results[i] = r;
            }
        }
        let (mut counts, mut system) = (BTreeMap::<String, Counts>::new(), 0);
        let mut retried = Vec::new();
        for ((c, e), r) in changes.iter().zip(entries).zip(&results) {
            counts.entry(e.c.clone().unwrap_or_default()).or_default().count(r);
            match r {
                ChangeResult::System { message, .. } if !dry_run => {
                    self.record(lj, c, ErrorCategory::System, message.clone()).await?;
                    Metrics::add(&self.metrics.system_recorded, 1);
                    system += 1;
                }
                ChangeResult::Done { .. } if c.retry_of.is_some() => retried.push(c),
                _ => {}
            }
        }
        self.settle_retries(lj, &retried).await?;
        Ok((counts, system))
    }
}

/// The request tag on the rows `--only-failed` takes.
const RETRY_TAG: &str = "initial-sync-only-failed";

/// One delivered page.
struct PageDone {
    counts: BTreeMap<String, Counts>,
    system: usize,
}

/// Where a map's pages come from.
enum Pages {
    /// The listing: tasks an earlier run left first, then pages listed from the checkpoint (a
    /// dry run keeps no items and lists from the start).
    Listing { items: Option<SyncItems>, cp: pages::Checkpoint, pending: std::vec::IntoIter<(Option<u64>, Vec<Entry>)> },
    /// The records of open error rows (`--only-failed`).
    Failed(std::vec::IntoIter<(Option<u64>, Vec<Entry>)>),
}

impl Pages {
    /// The next page: its task number (none in a dry run or a re-run of failures) and entries.
    async fn next(
        &mut self,
        steps: &Steps,
        lj: &LoadedJob,
        m: usize,
        opts: &SyncOptions,
    ) -> Result<Option<(Option<u64>, Vec<Entry>)>, StepError> {
        match self {
            Pages::Failed(pages) => Ok(pages.next()),
            Pages::Listing { items, cp, pending } => {
                if let Some(p) = pending.next() {
                    return Ok(Some(p));
                }
                if cp.listed_all {
                    return Ok(None);
                }
                let (entries, next) = steps.list_page(lj, m, opts, cp.after.as_deref()).await?;
                let n = cp.pages;
                let Some(items) = items else {
                    cp.pages += 1;
                    cp.listed_all = next.is_none();
                    cp.after = next;
                    return Ok(Some((None, entries)));
                };
                // The task first: a crash before the checkpoint moves lists this page again
                // under the same number.
                let kv = steps.state.kv().as_ref();
                items.put_page(kv, n, &PageTask { entries: entries.clone(), ..Default::default() }).await?;
                *cp = items.listed(kv, n, entries.len(), next).await?.ok_or_else(|| {
                    StepError::Refused(format!(
                        "another initial sync of map '{}' from {} is running: let it finish",
                        lj.job.maps[m].name,
                        lj.job.app_name(opts.from)
                    ))
                })?;
                steps.failpoints.check("initial_sync.after_list")?;
                Ok(Some((Some(n), entries)))
            }
        }
    }
}

/// The maps a sync covers, in delivery order.
fn selected_maps(lj: &LoadedJob, opts: &SyncOptions) -> Vec<usize> {
    (0..lj.job.maps.len()).filter(|m| opts.map.as_ref().is_none_or(|name| *name == lj.job.maps[*m].name)).collect()
}

/// A listed page's records as entries: key, change seq and company; records of companies out
/// of the job's scope (or not the one asked for) left out.
fn entries(
    lj: &LoadedJob,
    m: usize,
    opts: &SyncOptions,
    records: &[(crate::domain::change::Key, Record)],
) -> Vec<Entry> {
    let map = &lj.job.maps[m];
    let field = map.company.as_ref().map(|c| &c[opts.from.index()]);
    records
        .iter()
        .filter_map(|(key, r)| {
            let company = field.and_then(|f| r.fields.get(f)).and_then(|v| match v {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            });
            let in_scope = lj.job.company_in_scope(company.as_deref())
                && opts.company.as_ref().is_none_or(|c| company.as_ref() == Some(c));
            in_scope.then(|| Entry {
                k: record_key(map, opts.from, &r.fields).unwrap_or_else(|| key.clone()),
                // The record's version is its latest change seq where the app gives one.
                s: r.seq.unwrap_or_else(|| r.version.parse().unwrap_or(0)),
                c: company,
                retry: None,
            })
        })
        .collect()
}

/// How far an initial sync of one map from one app is (`dualsync job status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncProgress {
    pub map: String,
    pub from: String,
    /// Records listed so far, and those of the pages done.
    pub listed: u64,
    pub done: u64,
    pub pages: u64,
    pub pages_done: u64,
    /// Every page is listed.
    pub listed_all: bool,
    /// Records the source held when the map began, where counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

impl SyncProgress {
    pub fn finished(&self) -> bool {
        self.listed_all && self.pages_done >= self.pages
    }
}

/// The initial syncs a job has begun (of every company), read off their checkpoints.
pub async fn progress(state: &crate::state::State, job: &str) -> Result<Vec<SyncProgress>, crate::state::StateError> {
    let (compiled, _) = state.job(job).await?;
    let mut out = Vec::new();
    for map in &compiled.maps {
        for app in &compiled.apps {
            let items = SyncItems::new(job, &map.name, &app.name, None);
            let Some(item) = state.kv().get(&items.pk, &items.sk).await? else { continue };
            let Ok(cp) = serde_json::from_value::<pages::Checkpoint>(item.body) else { continue };
            out.push(SyncProgress {
                map: map.name.clone(),
                from: app.name.clone(),
                listed: cp.listed,
                done: cp.done,
                pages: cp.pages,
                pages_done: cp.pages_done,
                listed_all: cp.listed_all,
                total: cp.source_total,
            });
        }
    }
    Ok(out)
}

/// Forgets the checkpoints and page tasks of an initial sync so that it runs again from the
/// start. Needs only the state table, so an admin command can do it against a deployed stack.
pub async fn reset_checkpoints(state: &crate::state::State, job: &str, from_app: &str) -> Result<(), StepError> {
    let (compiled, _) = state.job(job).await?;
    let maps: Vec<String> = compiled.maps.iter().map(|m| m.name.clone()).collect();
    pages::forget(state.kv().as_ref(), job, &maps, from_app).await
}
