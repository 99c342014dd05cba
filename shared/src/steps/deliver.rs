//! Deliver (DESIGN §2.3 and §3): read fresh, detect loopback, concurrency and conflicts, write
//! to the other app, commit the link.
//!
//! A batch of messages is split into lanes, one per delivery group, each in order. The heads of
//! all lanes form a wave, and a wave goes through each phase of §3 together, so every read,
//! write and link commit is one batched call per map and side. A system failure stops its lane:
//! that message and the rest of its group are given back; the other lanes go on.
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tracing::{debug, warn};

use super::record::WAITING;
use super::redeliver::redelivery;
use super::{LoadedJob, Metrics, Outcome, StepError, Steps};
use crate::domain::canon::{self, Canon};
use crate::domain::change::{ChangeRef, DeliveryBatch, Key, Lane};
use crate::domain::decide::{decide, Decision};
use crate::domain::errors::{ConflictRecord, ErrorCategory};
use crate::domain::job::{JobStatus, Side};
use crate::domain::link::{LinkState, Observed, PendingWrite};
use crate::domain::sequence::short_hash;
use crate::ports::{ConnectorError, InMessage, KvError, Precondition, Put, Record, WriteFailure, WriteOp};
use crate::state::State;

/// A change (by index) that ends in an error row of this category, with its message.
type Failure = (usize, ErrorCategory, String);

/// A lane: one dependency root's changes in order, each with the index of its message.
type RootLane = (String, Vec<(usize, ChangeRef)>);

/// How often one change goes back to step 1 or 2 within a batch after losing a race (a failed
/// write precondition or link commit) before it is treated as a system failure.
const MAX_RACES: usize = 3;

/// What became of one change.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeResult {
    /// Delivered, already in step, skipped or recorded: nothing more to do.
    Done,
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
                        ChangeResult::Done => {
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

    /// Runs §3 for changes of distinct delivery groups together.
    pub(crate) async fn deliver_wave(
        &self,
        lj: &LoadedJob,
        changes: &[&ChangeRef],
    ) -> Result<Vec<ChangeResult>, StepError> {
        let job = &lj.job;
        let mut results: Vec<Option<ChangeResult>> = vec![None; changes.len()];
        let map_idx: Vec<Option<usize>> = changes.iter().map(|c| job.map(&c.map).map(|(i, _)| i)).collect();
        let mut pending: Vec<usize> = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            if map_idx[i].is_none() {
                warn!(job = %job.name, map = %c.map, "delivery for a map the job no longer has");
                results[i] = Some(ChangeResult::Done);
                self.record_raw(
                    job.name.as_str(),
                    c,
                    &c.map,
                    "?",
                    ErrorCategory::Application,
                    format!("map '{}' is not in job '{}'", c.map, job.name),
                )
                .await?;
            } else {
                pending.push(i);
            }
        }
        let mut conflicts: Vec<ConflictRecord> = Vec::new();
        let mut failures: Vec<Failure> = Vec::new();
        // Retried rows whose change was decided without a write: (row, why), closed at the end.
        let mut decided: Vec<(String, &str)> = Vec::new();
        // Retried rows whose change synced: resolved at the end, whether or not the link still
        // lists them.
        let mut synced: Vec<String> = Vec::new();
        // Children whose parent is missing on the other side: (change, parent map, parent key, why).
        let mut waiting: Vec<(usize, usize, Key, String)> = Vec::new();

        for _race in 0..MAX_RACES {
            if pending.is_empty() {
                break;
            }
            let refs: Vec<(&str, &Key)> = pending.iter().map(|&i| (changes[i].map.as_str(), &changes[i].key)).collect();
            let links = self.state.links(&job.name, &refs).await?;

            // Step 1: a newer change of this record exists. Skipped only once the link has
            // synced: a record the other side does not have yet is delivered (read fresh, so
            // with its latest content), since children queued behind it need it there.
            let mut live: Vec<(usize, Option<crate::state::VersionedLink>)> = Vec::new();
            for (&i, link) in pending.iter().zip(links) {
                let c = changes[i];
                match &link {
                    Some(l) if c.seq < l.state.seen(c.source) && l.state.is_synced() => {
                        let msg = format!(
                            "skipped: a newer change (seq {}) of {}/{} exists",
                            l.state.seen(c.source),
                            c.map,
                            c.key
                        );
                        failures.push((i, ErrorCategory::Concurrency, msg));
                        results[i] = Some(ChangeResult::Done);
                    }
                    _ => live.push((i, link)),
                }
            }

            // Step 2: read both sides fresh.
            let src = self
                .read_grouped(
                    lj,
                    live.iter().map(|(i, _)| (map_idx[*i].unwrap_or(0), changes[*i].source, &changes[*i].key)),
                )
                .await;
            let dst = self
                .read_grouped(
                    lj,
                    live.iter().map(|(i, _)| (map_idx[*i].unwrap_or(0), changes[*i].source.other(), &changes[*i].key)),
                )
                .await;
            self.failpoints.check("deliver.after_read")?;

            struct Plan {
                i: usize,
                link: Option<crate::state::VersionedLink>,
                /// The link with its last pending write settled against the records read.
                settled: LinkState,
                source: Record,
                canon: Canon,
                hash: String,
                other: Option<Record>,
                conflict: bool,
            }
            // A mark taken back leaves the link as it was read, not as settled against the
            // records then: a mark it held is judged again next time, since its write may still
            // be under way in another delivery of the change (a redelivery racing it) and land
            // after this read found it had not (dropped, that landing passed for an edit).
            let unmarked = |plan: &Plan| plan.link.as_ref().map(|l| l.state.clone()).unwrap_or_default();
            // (change, next link state, revision read, error rows the commit resolves)
            let mut commits: Vec<(usize, LinkState, Option<u64>, Vec<String>)> = Vec::new();
            // Records that exist on both sides now, with their link (revision, state): children
            // waiting for them go again.
            let mut release: Vec<(usize, u64, LinkState)> = Vec::new();
            // Records on neither side, with the error rows that can never sync now.
            let mut gone: Vec<(usize, Vec<String>)> = Vec::new();
            // Changes whose create on the other side must be undone: the source record is gone.
            let mut undo: Vec<usize> = Vec::new();
            let mut writes: Vec<Plan> = Vec::new();
            for (((i, link), rs), ro) in live.into_iter().zip(src).zip(dst) {
                let c = changes[i];
                let map = &job.maps[map_idx[i].unwrap_or(0)];
                let (rs, ro) = match (rs, ro) {
                    (Ok(rs), Ok(ro)) => (rs, ro),
                    (Err(e), _) | (_, Err(e)) => {
                        results[i] = Some(on_connector_error(i, &e, &mut failures));
                        continue;
                    }
                };
                let Some(rs) = rs else {
                    if created_here(link.as_ref(), map, c.source.other(), ro.as_ref()) {
                        // Deleted at the source while our create of it was under way, and the
                        // create landed after the live delete found nothing to delete: undo it.
                        undo.push(i);
                        continue;
                    }
                    if ro.is_none() && link.is_some() {
                        // On neither side: the link goes, and its open rows can never sync now.
                        let mut rows = open_errors(link.as_ref());
                        rows.extend(c.retry_of.clone());
                        gone.push((i, rows));
                    }
                    let msg = format!("skipped: {}/{} no longer exists in {}", c.map, c.key, job.app_name(c.source));
                    failures.push((i, ErrorCategory::Concurrency, msg));
                    results[i] = Some(ChangeResult::Done);
                    continue;
                };
                // Step 1 again, where the app tells each record's latest change seq. Here the
                // other side's record is known: once it exists, a stale change can go.
                if let (Some(latest), Some(l)) = (rs.seq, &link) {
                    if c.seq < latest && (l.state.is_synced() || ro.is_some()) {
                        let msg = format!("skipped: a newer change (seq {latest}) of {}/{} exists", c.map, c.key);
                        failures.push((i, ErrorCategory::Concurrency, msg));
                        results[i] = Some(ChangeResult::Done);
                        continue;
                    }
                }
                let canon_s = canon::canon(map, c.source, &rs.fields);
                let canon_o = ro.as_ref().map(|r| canon::canon(map, c.source.other(), &r.fields)).transpose();
                let (canon_s, canon_o) = match (canon_s, canon_o) {
                    (Ok(s), Ok(o)) => (s, o),
                    (Err(e), _) | (_, Err(e)) => {
                        failures.push((i, ErrorCategory::Application, format!("{}/{}: {e}", c.map, c.key)));
                        results[i] = Some(ChangeResult::Done);
                        continue;
                    }
                };
                let h_s = canon::hash(&canon_s);
                let h_o = canon_o.as_ref().map(canon::hash);
                let obs_s = Observed { hash: &h_s, version: &rs.version };
                let obs_o = h_o.as_deref().zip(ro.as_ref()).map(|(hash, r)| Observed { hash, version: &r.version });
                let mut records = [None, None];
                records[c.source.index()] = Some(obs_s);
                records[c.source.other().index()] = obs_o;
                let decision = decide(link.as_ref().map(|l| &l.state), c.source, job.primary, obs_s, obs_o);
                let settled = link.as_ref().map(|l| l.state.settled(records)).unwrap_or_default();
                debug!(job = %job.name, map = %c.map, key = %c.key, txid = %c.txid, ?decision, "decided");
                match decision {
                    Decision::InStep => {
                        // Written only when it says something new: a first link, a sync its
                        // stored state does not show yet, error rows to resolve, or a mark now
                        // known to have landed that must not be left (`commit_when_in_step`); a
                        // create mark of this content stays on (`kept_in_step`). An echo of a
                        // landed write costs no link write.
                        let errors = open_errors(link.as_ref());
                        let uncertain = link.as_ref().is_some_and(|l| l.state.commit_when_in_step(c.source, c.seq));
                        if link.is_none()
                            || settled.hash.as_deref() != Some(h_s.as_str())
                            || !errors.is_empty()
                            || uncertain
                        {
                            let mut next = next_link(&settled, c, &h_s, &rs.version);
                            next.version[c.source.other().index()] = ro.as_ref().map(|r| r.version.clone());
                            next.pending = link.as_ref().and_then(|l| l.state.kept_in_step(&h_s));
                            commits.push((i, next, link.as_ref().map(|l| l.rev), errors));
                        } else if let Some(l) = &link {
                            release.push((i, l.rev, l.state.clone()));
                        }
                        Metrics::add(&self.metrics.in_step, 1);
                        synced.extend(c.retry_of.clone());
                        results[i] = Some(ChangeResult::Done);
                    }
                    Decision::OtherSideChanged => {
                        match &link {
                            // The change that made the mark, again, took its target's change for
                            // one made on top of the write: committed, like an in-step finding,
                            // so that the delivery still waiting on that write cannot mark it
                            // uncertain afterwards (`commit_when_in_step`).
                            Some(l) if l.state.commit_when_in_step(c.source, c.seq) => {
                                commits.push((i, settled.clone(), Some(l.rev), Vec::new()))
                            }
                            _ => {
                                release.extend(link.as_ref().map(|l| (i, l.rev, l.state.clone())));
                                results[i] = Some(ChangeResult::Done);
                            }
                        }
                        // A retried row is settled: the other side's newer change supersedes it.
                        decided
                            .extend(c.retry_of.clone().map(|sk| (sk, "superseded by the other side's newer change")));
                        Metrics::add(&self.metrics.other_side_changed, 1);
                    }
                    Decision::ConflictLost => {
                        release.extend(link.as_ref().map(|l| (i, l.rev, l.state.clone())));
                        conflicts.push(self.conflict(job, c, &h_s, h_o.as_deref().unwrap_or_default()));
                        // A retried row is settled: the conflict log says the primary won.
                        decided.extend(
                            c.retry_of.clone().map(|sk| (sk, "lost a conflict to the primary (see conflicts)")),
                        );
                        results[i] = Some(ChangeResult::Done);
                    }
                    Decision::Write { conflict } => {
                        writes.push(Plan {
                            i,
                            link,
                            settled,
                            source: rs,
                            canon: canon_s,
                            hash: h_s,
                            other: ro,
                            conflict,
                        });
                    }
                }
            }

            // Step 5: every lookup must exist in the other app.
            let mut lookup_refs: Vec<(usize, usize, Side, Key)> = Vec::new(); // (plan, map, side, key)
            for (p, plan) in writes.iter().enumerate() {
                let c = changes[plan.i];
                let map = &job.maps[map_idx[plan.i].unwrap_or(0)];
                for l in &map.lookups {
                    if let Some(k) = canon::lookup_key(&l.fields, c.source, &plan.source.fields) {
                        lookup_refs.push((p, l.map, c.source.other(), k));
                    }
                }
            }
            let found = self.read_grouped(lj, lookup_refs.iter().map(|(_, m, s, k)| (*m, *s, k))).await;
            let mut blocked = vec![false; writes.len()];
            for ((p, m, _, k), r) in lookup_refs.iter().zip(found) {
                if blocked[*p] {
                    continue;
                }
                let i = writes[*p].i;
                match r {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        let why = format!("missing reference: {}/{}", job.maps[*m].name, k);
                        if changes[i].waited {
                            // It waited for its parent once already: an ordinary failure now.
                            failures.push((i, ErrorCategory::Application, why));
                        } else {
                            waiting.push((i, *m, k.clone(), why));
                        }
                        results[i] = Some(ChangeResult::Done);
                        blocked[*p] = true;
                    }
                    Err(e) => {
                        results[i] = Some(on_connector_error(i, &e, &mut failures));
                        blocked[*p] = true;
                    }
                }
            }
            let writes: Vec<Plan> = writes.into_iter().zip(blocked).filter(|(_, b)| !b).map(|(p, _)| p).collect();

            // A conflict the source wins is logged before anything is written: a crash after the
            // write would otherwise leave the other side overwritten and no trace of why.
            for plan in writes.iter().filter(|p| p.conflict) {
                let (c, map) = (changes[plan.i], &job.maps[map_idx[plan.i].unwrap_or(0)]);
                let side = c.source.other();
                let h_o =
                    plan.other.as_ref().and_then(|r| canon::canon(map, side, &r.fields).ok()).map(|c| canon::hash(&c));
                Metrics::add(&self.metrics.conflicts, 1);
                self.state
                    .record_conflict(self.conflict(job, c, &plan.hash, h_o.as_deref().unwrap_or_default()))
                    .await?;
            }

            // Step 7 comes first: each write is committed to its link as pending before it is made
            // (conditional on the revision read), and whether it landed is read off the target
            // record next time (see `PendingWrite::landed`). One link write per change, and no
            // crash window between the write and its record. The link's open errors stay on the
            // mark and their rows are resolved once the write is made (a crash in between leaves
            // them to the next delivery): resolved before it, a write that then failed in a
            // delivery whose message was already answered by another left them resolved.
            let mut retry: Vec<usize> = Vec::new();
            let marks: Vec<(LinkState, Put)> = writes
                .iter()
                .map(|plan| {
                    let c = changes[plan.i];
                    let mut state = next_link(&plan.settled, c, &plan.hash, &plan.source.version);
                    // Until the write lands, the last sync is the one before it: its content,
                    // and the source's version then. Capture drops a notification of the
                    // source's version on the link as delivered already, and this write may
                    // still fail or never be made (a crash right after this mark).
                    state.hash = plan.settled.hash.clone();
                    state.version[c.source.index()] = plan.settled.version[c.source.index()].clone();
                    state.open_errors = plan.settled.open_errors.clone();
                    state.pending = Some(PendingWrite {
                        side: c.source.other(),
                        hash: plan.hash.clone(),
                        from_version: plan.other.as_ref().map(|r| r.version.clone()),
                        uncertain: false,
                    });
                    let put = State::link_put(&job.name, &c.map, &c.key, &state, plan.link.as_ref().map(|l| l.rev));
                    (state, put)
                })
                .collect();
            let (mark_states, marks): (Vec<LinkState>, Vec<Put>) = marks.into_iter().unzip();
            let mut marked: Vec<(Plan, u64, LinkState)> = Vec::with_capacity(writes.len());
            for ((plan, state), answer) in writes.into_iter().zip(mark_states).zip(self.state.put_links(marks).await?) {
                match answer {
                    Ok(rev) => marked.push((plan, rev, state)),
                    Err(KvError::ConditionFailed { .. }) => retry.push(plan.i),
                    Err(e) => return Err(e.into()),
                }
            }
            if !marked.is_empty() {
                self.failpoints.check("deliver.after_mark")?;
            }

            // Step 6: write to the other app, conditional on the version read.
            let mut unmark: Vec<Put> = Vec::new();
            let mut by_target: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
            for (p, (plan, _, _)) in marked.iter().enumerate() {
                by_target.entry((map_idx[plan.i].unwrap_or(0), changes[plan.i].source.other())).or_default().push(p);
            }
            for ((m, side), ps) in by_target {
                let map = &job.maps[m];
                let ops: Vec<WriteOp> = ps
                    .iter()
                    .map(|&p| {
                        let plan = &marked[p].0;
                        WriteOp {
                            key: changes[plan.i].key.clone(),
                            fields: canon::to_side(map, side, &plan.canon),
                            precondition: match &plan.other {
                                Some(r) => Precondition::IfMatch(r.version.clone()),
                                None => Precondition::CreateOnly,
                            },
                        }
                    })
                    .collect();
                let answer = lj.connector(side).write(lj.spec(m, side), &ops).await;
                for (k, &p) in ps.iter().enumerate() {
                    let (plan, marked_rev) = (&marked[p].0, marked[p].1);
                    let (i, c) = (plan.i, changes[plan.i]);
                    let r = match &answer {
                        Ok(rs) => rs.get(k).cloned().unwrap_or(Err(WriteFailure::Transient {
                            message: "connector answered too few results".into(),
                            retry_after: None,
                        })),
                        Err(ConnectorError::Transient { message, retry_after, .. }) => {
                            Err(WriteFailure::Transient { message: message.clone(), retry_after: *retry_after })
                        }
                        Err(ConnectorError::Rejected { message, .. }) => Err(WriteFailure::Rejected(message.clone())),
                    };
                    match r {
                        Ok(_) => {
                            release.push((i, marked_rev, marked[p].2.clone()));
                            synced.extend(c.retry_of.clone());
                            synced.extend(open_errors(plan.link.as_ref()));
                            results[i] = Some(ChangeResult::Done);
                            Metrics::add(&self.metrics.written, 1);
                            self.metrics.record_latency(self.state.now_ms() - c.at_ms);
                        }
                        Err(WriteFailure::PreconditionFailed) => {
                            // Someone changed the record since the read: the write did not land,
                            // but the record no longer shows that. Take the mark back before
                            // trying again (if that loses a race, the next round re-reads).
                            unmark.push(State::link_put(&job.name, &c.map, &c.key, &unmarked(plan), Some(marked_rev)));
                            retry.push(i);
                        }
                        Err(WriteFailure::Rejected(message)) => {
                            // Refused: it did not land. Take the mark back, or a later edit of
                            // the target would pass for one made on top of this write.
                            unmark.push(State::link_put(&job.name, &c.map, &c.key, &unmarked(plan), Some(marked_rev)));
                            failures.push((
                                i,
                                ErrorCategory::Application,
                                format!("{} refused {}/{}: {message}", job.app_name(side), c.map, c.key),
                            ));
                            results[i] = Some(ChangeResult::Done);
                        }
                        Err(WriteFailure::Transient { message, retry_after }) => {
                            // It may or may not have landed: say so on the mark before anything
                            // else reads it (see `PendingWrite::judge`).
                            let mut state = marked[p].2.clone();
                            if let Some(pending) = state.pending.as_mut() {
                                pending.uncertain = true;
                            }
                            unmark.push(State::link_put(&job.name, &c.map, &c.key, &state, Some(marked_rev)));
                            results[i] = Some(ChangeResult::System { message, retry_after });
                        }
                    }
                }
            }
            self.failpoints.check("deliver.after_write")?;
            self.undo_creates(lj, &map_idx, changes, &undo, &mut results, &mut failures).await?;
            for (i, rows) in gone {
                self.state.close_errors(&job.name, &rows, "the record no longer exists on either side").await?;
                self.state.delete_link(&job.name, &changes[i].map, &changes[i].key).await?;
            }
            for a in self.state.put_links(unmark).await? {
                match a {
                    Ok(_) | Err(KvError::ConditionFailed { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }

            // Links in step whose stored state lags (step 3), each conditional on the revision
            // read; their open error rows are resolved first, as above.
            let resolve: Vec<String> = commits.iter().flat_map(|(_, _, _, errors)| errors.iter().cloned()).collect();
            if !resolve.is_empty() {
                self.state.resolve_errors(&job.name, &resolve).await?;
            }
            let puts = commits
                .iter()
                .map(|(i, next, rev, _)| State::link_put(&job.name, &changes[*i].map, &changes[*i].key, next, *rev))
                .collect();
            let answers = self.state.put_links(puts).await?;
            for ((i, next, _, _), a) in commits.iter().zip(answers) {
                match a {
                    Ok(rev) => {
                        results[*i] = Some(ChangeResult::Done);
                        release.push((*i, rev, next.clone()));
                    }
                    Err(KvError::ConditionFailed { .. }) => retry.push(*i),
                    Err(e) => return Err(e.into()),
                }
            }
            self.failpoints.check("deliver.after_commit")?;
            let release =
                release.into_iter().map(|(i, rev, state)| (changes[i].map.as_str(), &changes[i].key, rev, state));
            self.release_waiters(lj, release).await?;
            retry.sort_unstable();
            retry.dedup();
            pending = retry;
        }
        for i in pending {
            results[i] = Some(ChangeResult::System {
                message: format!("{}/{} kept changing during delivery", changes[i].map, changes[i].key),
                retry_after: None,
            });
        }

        self.record_all(lj, failures.into_iter().map(|(i, category, message)| (changes[i], category, message))).await?;
        self.wait_for_parents(lj, changes, waiting).await?;
        for (sk, why) in decided {
            self.state.close_errors(&job.name, &[sk], why).await?;
        }
        if !synced.is_empty() {
            self.state.resolve_errors(&job.name, &synced).await?;
        }
        for c in conflicts {
            Metrics::add(&self.metrics.conflicts, 1);
            self.state.record_conflict(c).await?;
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(ChangeResult::Done)).collect())
    }

    /// Settles the rows of retried changes that ended without a failure of their own. A row its
    /// delivery resolved or closed stays so; one whose record is now in step (or on neither
    /// side), synced by a newer change, is closed; any other is open again with its attempts
    /// raised (a stale retry is a concurrency skip, DESIGN §2.4).
    async fn settle_retries(&self, lj: &LoadedJob, retried: &[&ChangeRef]) -> Result<(), StepError> {
        let job = &lj.job;
        let known: Vec<(usize, &ChangeRef)> =
            retried.iter().filter_map(|c| job.map(&c.map).map(|(m, _)| (m, *c))).collect();
        let read = |side: Side| self.read_grouped(lj, known.iter().map(move |(m, c)| (*m, side, &c.key)));
        let (a, b) = (read(Side::A).await, read(Side::B).await);
        for (((m, c), ra), rb) in known.iter().zip(a).zip(b) {
            let hash =
                |side: Side, r: &Record| canon::canon(&job.maps[*m], side, &r.fields).ok().map(|c| canon::hash(&c));
            let in_step = match (ra, rb) {
                (Ok(None), Ok(None)) => true,
                (Ok(Some(ra)), Ok(Some(rb))) => hash(Side::A, &ra).is_some_and(|h| Some(h) == hash(Side::B, &rb)),
                _ => false,
            };
            let sk = c.retry_of.clone().unwrap_or_default();
            if in_step {
                self.state.close_errors(&job.name, &[sk], "in step now, synced by a newer change").await?;
            } else {
                let why = "handled without syncing (see the newer rows of this record)";
                self.state.settle_retry(&job.name, &sk, why).await?;
            }
        }
        Ok(())
    }

    /// Sends the children waiting on these links (map, key, revision, state) back to the deliver
    /// queue, in dependency order, then clears them from the link (conditional on the revision:
    /// a link changed meanwhile keeps them, and sends them again at its next sync, which a fresh
    /// read makes harmless). The send comes first, so that a crash loses no child.
    async fn release_waiters<'k>(
        &self,
        lj: &LoadedJob,
        links: impl IntoIterator<Item = (&'k str, &'k Key, u64, LinkState)>,
    ) -> Result<(), StepError> {
        let mut out = Vec::new();
        let mut clear = Vec::new();
        for (map, key, rev, mut state) in links {
            if state.waiters.is_empty() {
                continue;
            }
            let waiters: Vec<ChangeRef> = std::mem::take(&mut state.waiters)
                .into_iter()
                .map(|w| ChangeRef { waited: true, at_ms: self.state.now_ms(), ..w })
                .collect();
            let tag = format!("wait-{}", short_hash(&[map.as_bytes(), key.display().as_bytes(), &rev.to_le_bytes()]));
            out.extend(redelivery(&lj.job, waiters, &tag));
            clear.push(State::link_put(&lj.job.name, map, key, &state, Some(rev)));
        }
        if out.is_empty() {
            return Ok(());
        }
        self.deliver_queue.send(out).await?;
        for a in self.state.put_links(clear).await? {
            match a {
                Ok(_) | Err(KvError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Records each child's missing reference and notes the child on its parent's link, to be
    /// delivered again when the parent syncs. Such a row does not count toward the alert rule
    /// yet: it counts if the reference is still missing after that.
    async fn wait_for_parents(
        &self,
        lj: &LoadedJob,
        changes: &[&ChangeRef],
        waiting: Vec<(usize, usize, Key, String)>,
    ) -> Result<(), StepError> {
        let job = &lj.job;
        let mut noted: Vec<(usize, Side, &Key)> = Vec::new();
        for (i, parent, key, why) in &waiting {
            let c = changes[*i];
            self.record(lj, c, ErrorCategory::Application, format!("{why}{WAITING}")).await?;
            let child = ChangeRef { retry_of: None, ..c.clone() };
            if self.state.add_waiter(&job.name, &job.maps[*parent].name, key, &child).await? {
                noted.push((*parent, c.source.other(), key));
            } else {
                self.check_alert(&job.name).await?;
            }
        }
        // The parent may have synced between the lookup and the note: if it is there now, its
        // waiting children go at once.
        let found = self.read_grouped(lj, noted.iter().copied()).await;
        let mut there: Vec<(&str, &Key)> = Vec::new();
        for ((parent, _, key), r) in noted.iter().zip(found) {
            if matches!(r, Ok(Some(_))) {
                there.push((job.maps[*parent].name.as_str(), *key));
            }
        }
        let links = self.state.links(&job.name, &there).await?;
        let release = there.iter().zip(links).filter_map(|((map, key), l)| l.map(|l| (*map, *key, l.rev, l.state)));
        self.release_waiters(lj, release).await
    }

    /// Deletes, on the other side, the records that `undo` changes created after their source
    /// record was deleted, and their links. dualsync's own deletes, like its writes.
    async fn undo_creates(
        &self,
        lj: &LoadedJob,
        map_idx: &[Option<usize>],
        changes: &[&ChangeRef],
        undo: &[usize],
        results: &mut [Option<ChangeResult>],
        failures: &mut Vec<Failure>,
    ) -> Result<(), StepError> {
        let mut by_target: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
        for &i in undo {
            by_target.entry((map_idx[i].unwrap_or(0), changes[i].source.other())).or_default().push(i);
        }
        for ((m, side), is) in by_target {
            let keys: Vec<Key> = is.iter().map(|&i| changes[i].key.clone()).collect();
            match lj.connector(side).delete(lj.spec(m, side), &keys).await {
                Ok(()) => {
                    for &i in &is {
                        self.state.delete_link(&lj.job.name, &changes[i].map, &changes[i].key).await?;
                        Metrics::add(&self.metrics.live_deletes, 1);
                        results[i] = Some(ChangeResult::Done);
                    }
                }
                Err(e) => {
                    for &i in &is {
                        results[i] = Some(on_connector_error(i, &e, failures));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads records by (map, side, key), one connector call per map and side; answers in order.
    async fn read_grouped<'k>(
        &self,
        lj: &LoadedJob,
        refs: impl Iterator<Item = (usize, Side, &'k Key)>,
    ) -> Vec<Result<Option<Record>, ConnectorError>> {
        let refs: Vec<(usize, Side, &Key)> = refs.collect();
        let mut groups: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
        for (n, (m, s, _)) in refs.iter().enumerate() {
            groups.entry((*m, *s)).or_default().push(n);
        }
        let mut out: HashMap<usize, Result<Option<Record>, ConnectorError>> = HashMap::with_capacity(refs.len());
        for ((m, side), ns) in groups {
            let keys: Vec<Key> = ns.iter().map(|n| refs[*n].2.clone()).collect();
            match lj.connector(side).read(lj.spec(m, side), &keys).await {
                Ok(records) => {
                    let mut records = records.into_iter();
                    for n in ns {
                        out.insert(n, Ok(records.next().flatten()));
                    }
                }
                Err(e) => {
                    for n in ns {
                        out.insert(n, Err(e.clone()));
                    }
                }
            }
        }
        (0..refs.len()).map(|n| out.remove(&n).unwrap_or(Ok(None))).collect()
    }

    fn conflict(&self, job: &crate::domain::job::Job, c: &ChangeRef, h_source: &str, h_other: &str) -> ConflictRecord {
        let mut hashes = [String::new(), String::new()];
        hashes[c.source.index()] = h_source.to_string();
        hashes[c.source.other().index()] = h_other.to_string();
        ConflictRecord {
            id: String::new(),
            job: job.name.clone(),
            map: c.map.clone(),
            key: c.key.clone(),
            app: job.app_name(c.source).to_string(),
            winner: job.app_name(job.primary).to_string(),
            hashes,
            at_ms: self.state.now_ms(),
        }
    }
}

/// The link after syncing change `c` with content `hash`, from its settled state: the caller
/// sets the other side's version. Open errors are cleared: the sync resolves them.
fn next_link(settled: &LinkState, c: &ChangeRef, hash: &str, source_version: &str) -> LinkState {
    let mut next = settled.clone();
    next.hash = Some(hash.to_string());
    next.version[c.source.index()] = Some(source_version.to_string());
    next.raise_seen(c.source, c.seq);
    let synced = &mut next.synced[c.source.index()];
    *synced = (*synced).max(c.seq);
    next.open_errors.clear();
    next.pending = None;
    next
}

/// What became of change `i` whose connector call failed: a system failure is retried (its lane
/// waits behind it), any other is recorded.
fn on_connector_error(i: usize, e: &ConnectorError, failures: &mut Vec<Failure>) -> ChangeResult {
    match e.category() {
        ErrorCategory::System => {
            ChangeResult::System { message: e.message().to_string(), retry_after: e.retry_after() }
        }
        category => {
            failures.push((i, category, e.message().to_string()));
            ChangeResult::Done
        }
    }
}

/// Whether the other side's record is the one our pending create of it wrote.
fn created_here(
    link: Option<&crate::state::VersionedLink>,
    map: &crate::domain::job::TableMap,
    other: Side,
    record: Option<&Record>,
) -> bool {
    let (Some(p), Some(r)) = (link.and_then(|l| l.state.pending.as_ref()), record) else { return false };
    p.side == other
        && p.from_version.is_none()
        && canon::canon(map, other, &r.fields).is_ok_and(|c| canon::hash(&c) == p.hash)
}

fn open_errors(link: Option<&crate::state::VersionedLink>) -> Vec<String> {
    link.map(|l| l.state.open_errors.clone()).unwrap_or_default()
}
