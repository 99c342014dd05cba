//! What the steps count: process-wide counters (the demo, the benchmarks and the runner's
//! progress read them) and per-job tallies (issue 12 item 3), which [`Steps::handle`] takes
//! after each batch and adds to the job's minute in the state table, and which a Lambda function
//! also prints as a CloudWatch embedded metric format line (see [`Steps::flush_metrics`]).
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::Steps;
use crate::domain::metrics::Tally;

/// Counters of the process, and the per-job tallies not yet flushed.
#[derive(Debug, Default)]
pub struct Metrics {
    pub captured: AtomicU64,
    pub out_of_scope: AtomicU64,
    pub echoes_suppressed: AtomicU64,
    pub written: AtomicU64,
    pub in_step: AtomicU64,
    pub other_side_changed: AtomicU64,
    pub conflicts: AtomicU64,
    pub concurrency: AtomicU64,
    pub application: AtomicU64,
    pub system_retries: AtomicU64,
    pub system_recorded: AtomicU64,
    pub live_deletes: AtomicU64,
    /// Print each flushed tally as an EMF line on stdout (a Lambda function's log).
    pub emf: AtomicBool,
    latencies: Mutex<Option<Vec<u32>>>,
    jobs: Mutex<HashMap<String, Tally>>,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
    /// Starts keeping change-to-delivery latencies (milliseconds), for the benchmark.
    pub fn keep_latencies(&self) {
        *self.latencies.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }
    pub fn record_latency(&self, ms: i64) {
        if let Some(v) = self.latencies.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            v.push(ms.clamp(0, u32::MAX as i64) as u32);
        }
    }
    pub fn take_latencies(&self) -> Vec<u32> {
        self.latencies.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default()
    }

    /// Counts for `job`.
    pub fn count(&self, job: &str, f: impl FnOnce(&mut Tally)) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.get_mut(job) {
            Some(t) => f(t),
            None => f(jobs.entry(job.to_string()).or_default()),
        }
    }

    /// The tallies counted since the last take. Workers of one process share them, so a
    /// batch's flush may carry a concurrent batch's counts too: each count is flushed once.
    pub fn take_tallies(&self) -> HashMap<String, Tally> {
        std::mem::take(&mut *self.jobs.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

tokio::task_local! {
    /// The job a step is working on and where its counts go, for what happens below the steps
    /// (a connector waiting out an app's Retry-After) without passing the job down.
    static WORKING_ON: RefCell<Option<(Arc<Metrics>, String)>>;
}

/// Runs `f` with a place for [`working_on`] (what [`Steps::handle`] runs a step in).
pub(crate) async fn scope<F: std::future::Future>(f: F) -> F::Output {
    WORKING_ON.scope(RefCell::new(None), f).await
}

/// Notes the job the current step is working on from now on (steps handle one job at a time).
pub(crate) fn working_on(metrics: &Arc<Metrics>, job: &str) {
    let _ = WORKING_ON.try_with(|w| *w.borrow_mut() = Some((metrics.clone(), job.to_string())));
}

/// A request waited at an app's closed gate (its Retry-After): counted for the job the step
/// is working on, if any.
pub fn note_throttle_wait() {
    let _ = WORKING_ON.try_with(|w| {
        if let Some((metrics, job)) = &*w.borrow() {
            metrics.count(job, |t| t.throttle_waits += 1);
        }
    });
}

impl Steps {
    /// Adds the tallies counted so far to their jobs' minutes (one table write per job), and
    /// prints them as EMF lines where asked (`Metrics::emf`). Metrics never fail a batch: a
    /// failed write is logged and its counts are lost to the table (the EMF line has them).
    pub async fn flush_metrics(&self, step: &str) {
        let now = self.state.now_ms();
        for (job, tally) in self.metrics.take_tallies() {
            if tally.is_empty() {
                continue;
            }
            if self.metrics.emf.load(Ordering::Relaxed) {
                // EMF wants the object as the log line itself, not inside a tracing event.
                println!("{}", tally.emf(&job, now, step));
            }
            if let Err(e) = self.state.add_metrics(&job, &tally).await {
                warn!(job, error = %e, "could not store this batch's metrics");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_throttle_wait_counts_for_the_job_being_worked_on_inside_a_step_only() {
        let metrics = Arc::new(Metrics::default());
        note_throttle_wait(); // outside any step: nowhere to count it
        scope(async {
            note_throttle_wait(); // no job yet
            working_on(&metrics, "a");
            note_throttle_wait();
            working_on(&metrics, "b");
            note_throttle_wait();
            note_throttle_wait();
        })
        .await;
        let tallies = metrics.take_tallies();
        assert_eq!(tallies.len(), 2, "{tallies:?}");
        assert_eq!((tallies["a"].throttle_waits, tallies["b"].throttle_waits), (1, 2));
        assert!(metrics.take_tallies().is_empty(), "taken once");
    }
}
