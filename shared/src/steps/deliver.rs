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

use super::{LoadedJob, Metrics, Outcome, StepError, Steps};
use crate::domain::canon::{self, Canon};
use crate::domain::change::{ChangeRef, DeliveryBatch, Key, Lane};
use crate::domain::decide::{decide, Decision};
use crate::domain::errors::{ConflictRecord, ErrorCategory};
use crate::domain::job::{JobStatus, Side};
use crate::domain::link::{LinkState, Observed, PendingWrite};
use crate::ports::{ConnectorError, InMessage, KvError, Precondition, Put, Record, WriteFailure, WriteOp};
use crate::state::{NewError, State};

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
            if lj.status.holds_deliveries() {
                // Paused: keep the messages aside, in order, until the job resumes.
                let mut mine: Vec<usize> = lanes.iter().flat_map(|(_, lane)| lane.iter().map(|(i, _)| *i)).collect();
                mine.sort_unstable();
                mine.dedup();
                let kept: Vec<&InMessage> = mine.iter().map(|i| &msgs[*i]).collect();
                self.state.park(&job_name, &kept).await?;
                // Resumed while these were kept: hand them back now (see steps::pause).
                if self.state.job_record(&job_name).await?.0.status == JobStatus::Active {
                    super::pause::hand_back(&self.state, self.deliver_queue.as_ref(), &job_name).await?;
                }
                continue;
            }
            if !matches!(lj.status, JobStatus::Active | JobStatus::Stopping) {
                // Only an active job moves data: keep the messages until it runs again.
                for (_, lane) in &lanes {
                    for (i, _) in lane {
                        outcomes[*i] = Outcome::Retry {
                            delay: self.backoff.cap.min(Duration::from_secs(30)),
                            reason: format!("job '{job_name}' is {}", lj.status.as_str()),
                        };
                    }
                }
                continue;
            }
            let mut heads = vec![0usize; lanes.len()];
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
                            // A retry that did not sync leaves its row open again.
                            if let Some(sk) = &lanes[l].1[heads[l]].1.retry_of {
                                let why = "handled without syncing (see the newer rows of this record)";
                                self.state.settle_retry(&job_name, sk, why).await?;
                            }
                            heads[l] += 1
                        }
                        ChangeResult::System { message, retry_after } => blocked[l] = Some((message, retry_after)),
                    }
                }
            }
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
        let mut failures: Vec<(usize, ErrorCategory, String)> = Vec::new();

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
            // (change, next link state, revision read, error rows the commit resolves)
            let mut commits: Vec<(usize, LinkState, Option<u64>, Vec<String>)> = Vec::new();
            let mut writes: Vec<Plan> = Vec::new();
            for (((i, link), rs), ro) in live.into_iter().zip(src).zip(dst) {
                let c = changes[i];
                let map = &job.maps[map_idx[i].unwrap_or(0)];
                let (rs, ro) = match (rs, ro) {
                    (Ok(rs), Ok(ro)) => (rs, ro),
                    (Err(e), _) | (_, Err(e)) => {
                        results[i] = Some(match e {
                            ConnectorError::Transient { message, retry_after, .. } => {
                                ChangeResult::System { message, retry_after }
                            }
                            ConnectorError::Rejected { message, .. } => {
                                failures.push((i, ErrorCategory::Application, message));
                                ChangeResult::Done
                            }
                        });
                        continue;
                    }
                };
                let Some(rs) = rs else {
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
                        // stored state does not show yet, or error rows to resolve. An echo of a
                        // landed write costs no link write.
                        let errors = open_errors(link.as_ref());
                        if link.is_none() || settled.hash.as_deref() != Some(h_s.as_str()) || !errors.is_empty() {
                            let mut next = next_link(&settled, c, &h_s, &rs.version);
                            next.version[c.source.other().index()] = ro.as_ref().map(|r| r.version.clone());
                            commits.push((i, next, link.as_ref().map(|l| l.rev), errors));
                        }
                        Metrics::add(&self.metrics.in_step, 1);
                        results[i] = Some(ChangeResult::Done);
                    }
                    Decision::OtherSideChanged => {
                        Metrics::add(&self.metrics.other_side_changed, 1);
                        results[i] = Some(ChangeResult::Done);
                    }
                    Decision::ConflictLost => {
                        conflicts.push(self.conflict(job, c, &h_s, h_o.as_deref().unwrap_or_default()));
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
                        failures.push((
                            i,
                            ErrorCategory::Application,
                            format!("missing reference: {}/{}", job.maps[*m].name, k),
                        ));
                        results[i] = Some(ChangeResult::Done);
                        blocked[*p] = true;
                    }
                    Err(ConnectorError::Transient { message, retry_after, .. }) => {
                        results[i] = Some(ChangeResult::System { message, retry_after });
                        blocked[*p] = true;
                    }
                    Err(ConnectorError::Rejected { message, .. }) => {
                        failures.push((i, ErrorCategory::Application, message));
                        results[i] = Some(ChangeResult::Done);
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
            // crash window between the write and its record. The commit drops the link's open
            // errors, so their rows are resolved just before it.
            let mut retry: Vec<usize> = Vec::new();
            let resolve: Vec<String> = writes.iter().flat_map(|p| open_errors(p.link.as_ref())).collect();
            if !resolve.is_empty() {
                self.state.resolve_errors(&job.name, &resolve).await?;
            }
            let marks = writes
                .iter()
                .map(|plan| {
                    let c = changes[plan.i];
                    let mut state = next_link(&plan.settled, c, &plan.hash, &plan.source.version);
                    // Until the write lands, the last sync is the one before it.
                    state.hash = plan.settled.hash.clone();
                    state.pending = Some(PendingWrite {
                        side: c.source.other(),
                        hash: plan.hash.clone(),
                        from_version: plan.other.as_ref().map(|r| r.version.clone()),
                    });
                    State::link_put(&job.name, &c.map, &c.key, &state, plan.link.as_ref().map(|l| l.rev))
                })
                .collect();
            let mut marked: Vec<(Plan, u64)> = Vec::with_capacity(writes.len());
            for (plan, answer) in writes.into_iter().zip(self.state.put_links(marks).await?) {
                match answer {
                    Ok(rev) => marked.push((plan, rev)),
                    Err(KvError::ConditionFailed { .. }) => retry.push(plan.i),
                    Err(e) => return Err(e.into()),
                }
            }

            // Step 6: write to the other app, conditional on the version read.
            let mut unmark: Vec<Put> = Vec::new();
            let mut by_target: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
            for (p, (plan, _)) in marked.iter().enumerate() {
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
                            results[i] = Some(ChangeResult::Done);
                            Metrics::add(&self.metrics.written, 1);
                            self.metrics.record_latency(self.state.now_ms() - c.at_ms);
                        }
                        Err(WriteFailure::PreconditionFailed) => {
                            // Someone changed the record since the read: the write did not land,
                            // but the record no longer shows that. Take the mark back before
                            // trying again (if that loses a race, the next round re-reads).
                            unmark.push(State::link_put(&job.name, &c.map, &c.key, &plan.settled, Some(marked_rev)));
                            retry.push(i);
                        }
                        Err(WriteFailure::Rejected(message)) => {
                            failures.push((
                                i,
                                ErrorCategory::Application,
                                format!("{} refused {}/{}: {message}", job.app_name(side), c.map, c.key),
                            ));
                            results[i] = Some(ChangeResult::Done);
                        }
                        Err(WriteFailure::Transient { message, retry_after }) => {
                            results[i] = Some(ChangeResult::System { message, retry_after });
                        }
                    }
                }
            }
            self.failpoints.check("deliver.after_write")?;
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
            for ((i, _, _, _), a) in commits.iter().zip(answers) {
                match a {
                    Ok(_) => results[*i] = Some(ChangeResult::Done),
                    Err(KvError::ConditionFailed { .. }) => retry.push(*i),
                    Err(e) => return Err(e.into()),
                }
            }
            self.failpoints.check("deliver.after_commit")?;
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

        for (i, category, message) in failures {
            self.record(lj, changes[i], category, message).await?;
        }
        for c in conflicts {
            Metrics::add(&self.metrics.conflicts, 1);
            self.state.record_conflict(c).await?;
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(ChangeResult::Done)).collect())
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

    /// Records an error row for a change and counts it.
    pub(crate) async fn record(
        &self,
        lj: &LoadedJob,
        c: &ChangeRef,
        category: ErrorCategory,
        message: String,
    ) -> Result<(), StepError> {
        let entity = lj.job.map(&c.map).map(|(_, m)| m.entity(c.source).to_string()).unwrap_or_else(|| c.map.clone());
        self.record_raw(&lj.job.name, c, &entity, lj.job.app_name(c.source), category, message).await
    }

    pub(crate) async fn record_raw(
        &self,
        job: &str,
        c: &ChangeRef,
        entity: &str,
        app: &str,
        category: ErrorCategory,
        message: String,
    ) -> Result<(), StepError> {
        match category {
            ErrorCategory::Concurrency => Metrics::add(&self.metrics.concurrency, 1),
            ErrorCategory::Application => Metrics::add(&self.metrics.application, 1),
            _ => {}
        }
        warn!(job, map = %c.map, key = %c.key, category = category.as_str(), %message, "sync error");
        let e = NewError {
            map: c.map.clone(),
            entity: entity.to_string(),
            app: app.to_string(),
            source: c.source,
            key: c.key.clone(),
            seq: c.seq,
            txid: c.txid.clone(),
            category,
            message,
        };
        self.state.record_error(job, e).await?;
        if category == ErrorCategory::Application {
            self.check_alert(job).await?;
        }
        Ok(())
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

fn open_errors(link: Option<&crate::state::VersionedLink>) -> Vec<String> {
    link.map(|l| l.state.open_errors.clone()).unwrap_or_default()
}
