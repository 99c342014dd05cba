//! Deliver (DESIGN §2.3 and §3): read fresh, detect loopback, concurrency and conflicts, write
//! to the other app, commit the link.
//!
//! A batch of messages is split into lanes, one per delivery group, each in order. The heads of
//! all lanes form a wave, and a wave goes through each phase of §3 together, so every read,
//! write and link commit is one batched call per map and side. A system failure stops its lane:
//! that message and the rest of its group are given back; the other lanes go on.
//!
//! # Layout
//! - this file: messages to lanes and waves, parking for a job that is not active, and each
//!   message's outcome.
//! - `wave`: the executor of §3 over a wave; what each change does next is decided in
//!   `domain::delivery`.
//! - `reads`: batched record reads; `waiters`: children waiting on a parent; `settle`: the rows
//!   of retried changes.
mod reads;
mod settle;
mod waiters;
mod wave;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{LoadedJob, Metrics, Outcome, StepError, Steps};
use crate::domain::change::{ChangeRef, DeliveryBatch, Lane};
use crate::domain::errors::ErrorCategory;
use crate::domain::job::JobStatus;
use crate::ports::InMessage;

/// A lane: one dependency root's changes in order, each with the index of its message.
type RootLane = (String, Vec<(usize, ChangeRef)>);

/// What a finished change did, as initial sync's summary counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Written to the other side, which did not hold the record.
    Created,
    /// Written over the other side's different content (no conflict: a link said it was ours).
    Updated,
    /// Both sides already held the same content: linked, nothing written.
    InStep,
    /// Both sides held different content with no sync between: decided by the primary, logged.
    Conflict,
    /// Not the latest, superseded by the other side's newer change, or undone.
    Skipped,
    /// An error row of this category (a missing reference waiting for its parent included).
    Failed(ErrorCategory),
}

/// What became of one change.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeResult {
    /// Delivered, already in step, skipped or recorded: nothing more to do. `found`: the other
    /// side held the record when it was last read (initial sync counts what exists only there).
    Done { effect: Effect, found: bool },
    /// A system failure: retry later.
    System { message: String, retry_after: Option<Duration> },
}

impl Steps {
    /// The deliver step over a batch of deliver-queue messages.
    pub async fn deliver(&self, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = vec![Outcome::Done; msgs.len()];
        // Lanes per job, by root, in order of first appearance: messages of one group arrive in
        // order, so each root's changes line up in order across messages.
        let mut jobs: BTreeMap<String, Vec<RootLane>> = BTreeMap::new();
        // Where each (job, root) lane is, so that a batch of many lanes is grouped in linear time.
        let mut lane_at: HashMap<(String, String), usize> = HashMap::new();
        for (i, m) in msgs.iter().enumerate() {
            let batch: DeliveryBatch = match serde_json::from_str(&m.body) {
                Ok(b) => b,
                Err(e) => {
                    outcomes[i] = Outcome::Poison { reason: format!("malformed delivery message: {e}") };
                    continue;
                }
            };
            let lanes = jobs.entry(batch.job.clone()).or_default();
            for Lane { root, changes } in batch.lanes {
                let at = *lane_at.entry((batch.job.clone(), root.clone())).or_insert_with(|| {
                    lanes.push((root, Vec::new()));
                    lanes.len() - 1
                });
                lanes[at].1.extend(changes.into_iter().map(|c| (i, c)));
            }
        }

        for (job_name, lanes) in jobs {
            let Some(lj) = self.load_job(&job_name).await? else {
                for (_, lane) in &lanes {
                    for (i, _) in lane {
                        outcomes[*i] = Outcome::Poison { reason: format!("unknown job '{job_name}'") };
                    }
                }
                continue;
            };
            if lj.status != JobStatus::Active {
                // Only an active job moves data. Paused, stopped or between the two: keep the
                // messages aside, in order, until it runs again (nothing waits out its retries
                // into the dead-letter queue for being stopped).
                let mut mine: Vec<usize> = lanes.iter().flat_map(|(_, lane)| lane.iter().map(|(i, _)| *i)).collect();
                mine.sort_unstable();
                mine.dedup();
                let kept: Vec<&InMessage> = mine.iter().map(|i| &msgs[*i]).collect();
                self.state.park(&job_name, &kept).await?;
                // Started or resumed while these were kept: hand them back now (see steps::pause).
                if self.state.job_record(&job_name).await?.0.status == JobStatus::Active {
                    super::pause::hand_back(&self.state, self.deliver_queue.as_ref(), &job_name).await?;
                }
                continue;
            }
            let mut heads = vec![0usize; lanes.len()];
            // Retried changes handled in this batch: their rows are settled after it.
            let mut retried: Vec<&ChangeRef> = Vec::new();
            let mut blocked: Vec<Option<(String, Option<Duration>)>> = vec![None; lanes.len()];
            loop {
                let wave: Vec<usize> =
                    (0..lanes.len()).filter(|l| blocked[*l].is_none() && heads[*l] < lanes[*l].1.len()).collect();
                if wave.is_empty() {
                    break;
                }
                let changes: Vec<&ChangeRef> = wave.iter().map(|l| &lanes[*l].1[heads[*l]].1).collect();
                let results = self.deliver_wave(&lj, &changes).await?;
                for (l, r) in wave.into_iter().zip(results) {
                    match r {
                        ChangeResult::Done { .. } => {
                            let c = &lanes[l].1[heads[l]].1;
                            if c.retry_of.is_some() {
                                retried.push(c);
                            }
                            heads[l] += 1
                        }
                        ChangeResult::System { message, retry_after } => blocked[l] = Some((message, retry_after)),
                    }
                }
            }
            self.settle_retries(&lj, &retried).await?;
            for (l, (_, lane)) in lanes.iter().enumerate() {
                let Some((message, retry_after)) = &blocked[l] else { continue };
                let failed = &lane[heads[l]].1;
                for (pos, (i, change)) in lane.iter().enumerate().skip(heads[l]) {
                    let m = &msgs[*i];
                    if m.receive_count >= self.deliver_queue.max_receive_count() {
                        // Retries are spent: record the failure and what waited behind it in this
                        // message (all retriable), and let the group go on.
                        let why = if pos == heads[l] {
                            message.clone()
                        } else {
                            format!("not delivered: it waits behind {}/{}, which failed", failed.map, failed.key)
                        };
                        self.record(&lj, change, ErrorCategory::System, why).await?;
                        Metrics::add(&self.metrics.system_recorded, 1);
                        outcomes[*i] = Outcome::Done;
                    } else {
                        Metrics::add(&self.metrics.system_retries, u64::from(pos == heads[l]));
                        if pos == heads[l] && retry_after.is_some() {
                            // Given back to wait out the app's Retry-After.
                            self.metrics.count(&job_name, |t| t.throttle_waits += 1);
                        }
                        outcomes[*i] = Outcome::Retry {
                            delay: self.backoff.delay(m.receive_count, *retry_after),
                            reason: if pos == heads[l] {
                                message.clone()
                            } else {
                                format!("waits behind {}/{}, which failed", failed.map, failed.key)
                            },
                        };
                    }
                }
            }
        }
        self.failpoints.check("deliver.before_ack")?;
        Ok(outcomes)
    }

    /// Delivers changes now, in order (the live path and initial sync use this).
    pub async fn deliver_now(&self, lj: &LoadedJob, changes: &[ChangeRef]) -> Result<Vec<ChangeResult>, StepError> {
        let mut out = Vec::with_capacity(changes.len());
        for c in changes {
            out.extend(self.deliver_wave(lj, &[c]).await?);
        }
        Ok(out)
    }
}
