//! A job's metrics by the minute (`METRICS#job` / `<minute>`): counters that every handled
//! batch adds to (one `KvStore::add` per job and batch, no read), so the admin API and the CLI
//! show the same counts on every backend.
use super::{NewError, State};
use crate::domain::keys;
use crate::domain::metrics::{minute_of, Tally};
use crate::ports::{KvError, SkRange};

/// How long a minute's counters are kept (the dashboard charts two weeks at most).
pub const METRICS_RETENTION_MS: i64 = 14 * 24 * 3600 * 1000;

/// Minutes read per query page.
const PAGE: usize = 1000;

impl State {
    /// Adds what a batch counted for `job` to the minute holding now.
    pub async fn add_metrics(&self, job: &str, tally: &Tally) -> Result<(), KvError> {
        let counters = tally.counters();
        if counters.is_empty() {
            return Ok(());
        }
        let minute = minute_of(self.now_ms());
        let expires = Some(minute + METRICS_RETENTION_MS);
        self.kv.add(&keys::metrics_pk(job), &keys::metrics_sk(minute), &counters, expires).await
    }

    /// Records an error row outside the steps (ingress, change tracking), where no batch's
    /// tally carries it to the job's minute: counted with a write of its own. Such rows are
    /// rare (a change too large for a message, a record known by its id only).
    pub async fn record_error_counted(&self, job: &str, e: NewError) -> Result<String, KvError> {
        let mut tally = Tally::default();
        tally.error(e.category);
        let id = self.record_error(job, e).await?;
        self.add_metrics(job, &tally).await?;
        Ok(id)
    }

    /// The minutes of `job` from the one holding `since_ms` on, oldest first.
    pub async fn metrics(&self, job: &str, since_ms: i64) -> Result<Vec<(i64, Tally)>, KvError> {
        let range = SkRange { prefix: String::new(), from: Some(keys::metrics_sk(minute_of(since_ms))), to: None };
        let pk = keys::metrics_pk(job);
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.kv.query(&pk, &range, PAGE, after.as_deref()).await?;
            for item in &page.items {
                let at: i64 = item.sk.parse().map_err(|_| KvError::Corrupt {
                    pk: item.pk.clone(),
                    sk: item.sk.clone(),
                    reason: "a metrics item's sort key is not a minute".into(),
                })?;
                out.push((at, Tally::from_counters(&item.body)));
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }
}
