//! Initial sync on AWS: the work fans out over reconcile messages, and no invocation does more
//! than a bounded amount of it, whatever the size of the data (DESIGN §5).
//!
//! A listing message (`initial_sync`) takes the first map not done, lists at most
//! [`PAGES_PER_LISTING`] pages of it, each stored as a page task and handed to a page message
//! (`sync_page`, each in a FIFO group of its own, so pages run in parallel within the reconcile
//! function's concurrency and each app's limiter), then hands the rest of the listing on to a
//! listing message of its own. Once a map is listed, the listing waits: the last of its pages
//! to finish (or the lister itself, if they all finished first; the checkpoint's conditional
//! writes let exactly one of them see the map done) sends the listing message of the next map,
//! so a map's parents finish before it starts. A time-out anywhere loses nothing: a listing
//! message comes again and lists on from the checkpoint; a page message comes again and
//! delivers its task again, harmlessly (§3), unless it was marked done.
use std::time::Duration;

use super::pages::{PageTask, SyncItems};
use super::{selected_maps, SyncOptions};
use crate::domain::job::Side;
use crate::ports::Queue;
use crate::steps::reconcile::ReconcileMessage;
use crate::steps::{StepError, Steps};

/// Pages one listing message lists per invocation.
pub const PAGES_PER_LISTING: u64 = 20;

/// Records per page on AWS unless the sync asks for another size: the reconcile function takes
/// up to 10 messages an invocation (template.yaml's BatchSize) within its 30 s time-out, and a
/// record costs a few DynamoDB round trips, so 10 pages of 100 stay well inside it.
pub const AWS_PAGE: usize = 100;

impl Steps {
    /// Runs a listing message ([`ReconcileMessage::InitialSync`]).
    pub async fn sync_listing(&self, queue: &dyn Queue, message: &ReconcileMessage) -> Result<String, StepError> {
        let ReconcileMessage::InitialSync { job, from: from_app, map, company, page_size } = message else {
            return Err(StepError::Refused("not an initial sync listing".into()));
        };
        let (job, from_app, map, company) = (job.as_str(), from_app.as_str(), map.as_deref(), company.as_deref());
        let opts = self.options(job, from_app, map, company).await?.page_size(page_size.unwrap_or(AWS_PAGE));
        let lj = self.sync_job(job, &opts).await?;
        let kv = self.state.kv().as_ref();
        for m in selected_maps(&lj, &opts) {
            let name = &lj.job.maps[m].name;
            let items = SyncItems::new(job, name, from_app, company);
            // No counts up front: counting an OData entity is a listing of its own, unbounded.
            let mut cp = self.begin_map(&lj, m, &opts, &items, false).await?;
            if cp.listed_all && cp.pages_done >= cp.pages {
                continue;
            }
            for _ in 0..PAGES_PER_LISTING {
                if cp.listed_all {
                    break;
                }
                let n = cp.pages;
                let (entries, next) = self.list_page(&lj, m, &opts, cp.after.as_deref()).await?;
                let records = entries.len();
                items.put_page(kv, n, &PageTask { entries, ..Default::default() }).await?;
                let page = ReconcileMessage::SyncPage {
                    job: job.into(),
                    from: from_app.into(),
                    map: name.clone(),
                    company: company.map(String::from),
                    page: n,
                };
                queue.send(vec![page.out()]).await?;
                match items.listed(kv, n, records, next).await? {
                    Some(moved) => cp = moved,
                    None => return Ok(format!("map {name}: listed by another message")),
                }
                self.failpoints.check("initial_sync.after_list")?;
            }
            if !cp.listed_all {
                queue.send(vec![message.out()]).await?;
                return Ok(format!("map {name}: {} page(s) listed, listing goes on", cp.pages));
            }
            if cp.pages_done < cp.pages {
                return Ok(format!("map {name}: listed, {} of {} page(s) done", cp.pages_done, cp.pages));
            }
        }
        Ok("initial sync done".into())
    }

    /// Runs a page message: delivers the task, marks it done, and moves the sync to its next
    /// map if this was the map's last page.
    pub async fn sync_page(
        &self,
        queue: &dyn Queue,
        job: &str,
        from_app: &str,
        map: &str,
        company: Option<&str>,
        n: u64,
    ) -> Result<String, StepError> {
        let opts = self.options(job, from_app, Some(map), company).await?;
        let lj = self.sync_job(job, &opts).await?;
        let kv = self.state.kv().as_ref();
        let Some(m) = lj.job.map(map).map(|(m, _)| m) else {
            return Err(StepError::Refused(format!("job '{job}' has no map '{map}'")));
        };
        let items = SyncItems::new(job, map, from_app, company);
        let Some(task) = items.page(kv, n).await?.filter(|t| !t.done) else {
            return Ok(format!("page {n} of {map} is done already"));
        };
        // No waiting for a throttling app here: the invocation's time-out is short, and the rows
        // this leaves are retried like any system failure's.
        let (counts, system) = self.deliver_page(&lj, m, opts.from, &task.entries, false, Duration::ZERO).await?;
        if let Some(cp) = items.finish(kv, n, counts).await? {
            if cp.listed_all && cp.pages_done == cp.pages {
                // The map is done: the sync goes on with the maps after it (the listing
                // message of the whole sync finds this one done and passes it).
                let whole = self.whole_sync_map(job, from_app, map, company).await?;
                let next = ReconcileMessage::InitialSync {
                    job: job.into(),
                    from: from_app.into(),
                    map: whole,
                    company: company.map(String::from),
                    page_size: cp.page_size,
                };
                queue.send(vec![next.out()]).await?;
            }
        }
        Ok(format!("page {n} of {map}: {} record(s), {system} system failure(s)", task.entries.len()))
    }

    /// The options of a sync from the app named `from_app`.
    async fn options(
        &self,
        job: &str,
        from_app: &str,
        map: Option<&str>,
        company: Option<&str>,
    ) -> Result<SyncOptions, StepError> {
        let (compiled, _) = self.state.job(job).await?;
        let Some(from): Option<Side> = compiled.side_of(from_app) else {
            return Err(StepError::Refused(format!("app '{from_app}' is not an app of job '{job}'")));
        };
        let mut opts = SyncOptions::new(from);
        opts.map = map.map(String::from);
        opts.company = company.map(String::from);
        Ok(opts)
    }

    /// Whether the sync a page belongs to was of one map only (`--map`): the page's map then,
    /// else every map. Read off the checkpoint the listing made.
    async fn whole_sync_map(
        &self,
        job: &str,
        from_app: &str,
        map: &str,
        company: Option<&str>,
    ) -> Result<Option<String>, StepError> {
        let items = SyncItems::new(job, map, from_app, company);
        let (cp, _) = items.checkpoint(self.state.kv().as_ref()).await?;
        Ok(cp.only_map.then(|| map.to_string()))
    }
}
