//! Initial sync (DESIGN §5): copy what exists in one app to the other, map by map in delivery
//! order, page by page, each record through the §3 algorithm (so it is safe against live
//! changes and against running twice), with a checkpoint after every page so that a crash
//! resumes where it stopped. Every failure is an ordinary error row: all are visible, and a
//! retry re-runs only the failed records.
//!
//! That includes system failures (an app throttled or down while a page is written): a page's
//! records that failed that way get retriable system error rows before its checkpoint moves,
//! so the checkpoint never passes a record that is neither synced nor on record. The pages go
//! on (an outage does not stall the whole copy), and `dualsync errors retry` puts the recorded
//! records through the deliver queue, whose backoff rides out the outage. A crash between the
//! rows and the checkpoint runs the page again, which is harmless (§3 is safe to repeat).
use serde::{Deserialize, Serialize};

use super::deliver::ChangeResult;
use super::{Metrics, StepError, Steps};
use crate::domain::canon::record_key;
use crate::domain::change::ChangeRef;
use crate::domain::errors::ErrorCategory;
use crate::domain::job::{JobStatus, Side};
use crate::domain::keys;
use crate::ports::{Expect, Put};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitialSyncReport {
    pub pages: usize,
    pub records: usize,
    /// Records that hit a system failure: each has a retriable error row (retry the job's
    /// errors to sync them).
    pub system_errors: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Checkpoint {
    /// Cursor after the last finished page; `None` once the map is done.
    after: Option<String>,
    done: bool,
    records: usize,
}

impl Steps {
    /// Copies every record of `from` to the other app. `progress(map, records so far)` is called
    /// after each page.
    pub async fn initial_sync(
        &self,
        job_name: &str,
        from: Side,
        page_size: usize,
        mut progress: impl FnMut(&str, usize),
    ) -> Result<InitialSyncReport, StepError> {
        let lj = self
            .load_job(job_name)
            .await?
            .ok_or_else(|| StepError::State(crate::state::StateError::UnknownJob(job_name.into())))?;
        if lj.status != JobStatus::Active {
            return Err(StepError::NotActive { job: job_name.into(), status: lj.status.as_str() });
        }
        let job = &lj.job;
        let app = job.app_name(from).to_string();
        let mut report = InitialSyncReport::default();
        for (m, map) in job.maps.iter().enumerate() {
            let (pk, sk) = (keys::init_pk(&job.name, &map.name), format!("FROM#{}", keys::escape(&app)));
            let stored = self.state.kv().get(&pk, &sk).await?;
            let (mut cp, mut rev) = match &stored {
                Some(item) => {
                    (serde_json::from_value::<Checkpoint>(item.body.clone()).unwrap_or_default(), Some(item.rev))
                }
                None => (Checkpoint::default(), None),
            };
            while !cp.done {
                let page = lj.connector(from).list(lj.spec(m, from), cp.after.as_deref(), page_size).await?;
                let now = self.state.now_ms();
                let changes: Vec<ChangeRef> = page
                    .records
                    .iter()
                    .map(|(key, r)| ChangeRef {
                        map: map.name.clone(),
                        source: from,
                        key: record_key(map, from, &r.fields).unwrap_or_else(|| key.clone()),
                        // The record's version is its latest change seq where the app gives one.
                        seq: r.version.parse().unwrap_or(0),
                        txid: format!("initial-sync@{now}"),
                        at_ms: now,
                        retry_of: None,
                        waited: false,
                    })
                    .collect();
                let refs: Vec<&ChangeRef> = changes.iter().collect();
                let results = self.deliver_wave(&lj, &refs).await?;
                for (c, r) in changes.iter().zip(&results) {
                    if let ChangeResult::System { message, .. } = r {
                        self.record(&lj, c, ErrorCategory::System, message.clone()).await?;
                        Metrics::add(&self.metrics.system_recorded, 1);
                        report.system_errors += 1;
                    }
                }
                report.records += changes.len();
                report.pages += 1;
                cp.records += changes.len();
                cp.after = page.next.clone();
                cp.done = page.next.is_none();
                let put = Put {
                    pk: pk.clone(),
                    sk: sk.clone(),
                    body: serde_json::to_value(&cp).unwrap_or_default(),
                    expires_at: None,
                    expect: rev.map_or(Expect::Absent, Expect::Rev),
                };
                rev = Some(self.state.kv().put(put).await?);
                self.failpoints.check("initial_sync.after_page")?;
                progress(&map.name, cp.records);
            }
        }
        Ok(report)
    }
}

/// Forgets the checkpoints of an initial sync so that it runs again from the start. Needs only
/// the state table, so an admin command can do it against a deployed stack.
pub async fn reset_checkpoints(state: &crate::state::State, job: &str, from_app: &str) -> Result<(), StepError> {
    let (compiled, _) = state.job(job).await?;
    for map in &compiled.maps {
        let sk = format!("FROM#{}", keys::escape(from_app));
        state.kv().delete(&keys::init_pk(job, &map.name), &sk, Expect::Any).await?;
    }
    Ok(())
}
