//! The executor of DESIGN §3 for a wave: changes of distinct delivery groups, taken through
//! the phases together so that each phase's I/O is one batched call per map and side. What
//! each change does next is decided in `domain::delivery`; this file only does the I/O.
//!
//! A round: links and step 1 → both records read (step 2) and decided (steps 3–4) → lookups
//! (step 5) → conflicts logged → pending marks (step 7, made first) → writes (step 6) → undos,
//! forgotten links and step 3's commits → waiting children released. A change that lost a race
//! goes round again, at most [`MAX_RACES`] times.
use std::collections::BTreeMap;

use tracing::{debug, warn};

use super::waiters::Waiter;
use super::{ChangeResult, Effect};
use crate::domain::canon::{self, Canon};
use crate::domain::change::ChangeRef;
use crate::domain::delivery::{Context, Done, End, LinkAt, Progress, Seen};
use crate::domain::errors::{ConflictRecord, ErrorCategory};
use crate::domain::job::{Job, Side};
use crate::domain::sequence::short_hash;
use crate::ports::{ConnectorError, KvError, Precondition, Record, WriteFailure, WriteOp};
use crate::state::State;
use crate::steps::redeliver::redelivery;
use crate::steps::{LoadedJob, Metrics, StepError, Steps};

/// The wave's items, and the changes of maps the job no longer has (an application error each).
#[allow(clippy::type_complexity)]
fn wave_items<'c>(
    job: &Job,
    changes: &[&'c ChangeRef],
) -> (Vec<Item<'c>>, Vec<(&'c ChangeRef, ErrorCategory, String)>) {
    let mut stray = Vec::new();
    let mut items = Vec::with_capacity(changes.len());
    for c in changes {
        match job.map(&c.map) {
            Some((map, _)) => items.push(Item {
                c,
                map,
                progress: Progress::ToRead,
                source: None,
                hashes: Default::default(),
                found: false,
                write: None,
            }),
            None => {
                warn!(job = %job.name, map = %c.map, "delivery for a map the job no longer has");
                stray.push((*c, ErrorCategory::Application, format!("map '{}' is not in job '{}'", c.map, job.name)));
            }
        }
    }
    (items, stray)
}

/// Answers in the order of `changes`, from the answers of the changes of known maps: a stray's
/// place is an application failure (recorded as such).
fn in_order(job: &Job, changes: &[&ChangeRef], mut results: impl Iterator<Item = ChangeResult>) -> Vec<ChangeResult> {
    let stray = ChangeResult::Done { effect: Effect::Failed(ErrorCategory::Application), found: false };
    changes
        .iter()
        .map(|c| match job.map(&c.map) {
            Some(_) => results.next().unwrap_or_else(|| stray.clone()),
            None => stray.clone(),
        })
        .collect()
}

/// How often one change goes back to step 1 within a wave after losing a race (a failed write
/// precondition or link commit) before it is treated as a system failure.
const MAX_RACES: usize = 3;

/// One change of the wave and what delivery knows of it so far.
struct Item<'c> {
    c: &'c ChangeRef,
    /// Its map's index.
    map: usize,
    progress: Progress,
    /// The source record as read this round, with its canonical content: what a write sends.
    source: Option<(Record, Canon)>,
    /// The content hashes of the source and other side's records as read, for conflict rows.
    hashes: (String, String),
    /// The other side held the record when last read.
    found: bool,
    /// What the write decided when last read would do (created, updated, a conflict won).
    write: Option<Effect>,
}

impl Item<'_> {
    /// What the change did (or, not yet written, would do) as it stands.
    fn effect(&self) -> Effect {
        match &self.progress {
            Progress::ToCommit(_) => Effect::InStep,
            Progress::ToCheck(_) | Progress::ToMark(_) | Progress::ToWrite(..) => self.write.unwrap_or(Effect::Updated),
            Progress::Done(done) => self.effect_of(&done.end),
            Progress::ToRead | Progress::ToUndo { .. } | Progress::ToForget { .. } | Progress::Again => Effect::Skipped,
        }
    }

    fn effect_of(&self, end: &End) -> Effect {
        match end {
            End::Synced { wrote: true, .. } => self.write.unwrap_or(Effect::Updated),
            End::Synced { wrote: false, .. } => Effect::InStep,
            End::ConflictLost { .. } => Effect::Conflict,
            End::OtherSideChanged | End::Undone => Effect::Skipped,
            End::Failed { category, .. } => Effect::Failed(*category),
            End::Waiting { .. } => Effect::Failed(ErrorCategory::Application),
            End::Retry { .. } => Effect::Failed(ErrorCategory::System),
        }
    }
}

impl Steps {
    /// Runs §3 for changes of distinct delivery groups together.
    pub(crate) async fn deliver_wave(
        &self,
        lj: &LoadedJob,
        changes: &[&ChangeRef],
    ) -> Result<Vec<ChangeResult>, StepError> {
        let job = &lj.job;
        let (mut items, stray) = wave_items(job, changes);
        for _ in 0..MAX_RACES {
            let todo: Vec<usize> =
                (0..items.len()).filter(|i| matches!(items[*i].progress, Progress::ToRead | Progress::Again)).collect();
            if todo.is_empty() {
                break;
            }
            self.read_and_decide(lj, &mut items, &todo).await?;
            self.check_lookups(lj, &mut items).await;
            self.log_conflicts(job, &items).await?;
            self.mark(job, &mut items).await?;
            self.write(lj, &mut items).await?;
            self.failpoints.check("deliver.after_write")?;
            self.undo(lj, &mut items).await?;
            self.forget_all(job, &mut items).await?;
            self.commit(job, &mut items).await?;
            self.failpoints.check("deliver.after_commit")?;
            let release: Vec<_> = items
                .iter_mut()
                .filter_map(|it| match &mut it.progress {
                    Progress::Done(Done { release, .. }) => {
                        release.take().map(|(rev, state)| (it.c.map.as_str(), &it.c.key, rev, state))
                    }
                    _ => None,
                })
                .collect();
            self.release_waiters(lj, release).await?;
        }
        let results = self.settle_wave(lj, items, stray).await?;
        Ok(in_order(job, changes, results))
    }

    /// Steps 1 to 4 only, for a dry run: what delivering each change would do, with nothing
    /// written (no link, no row, no write). Lookups are not checked: in a dry run the parents
    /// the same run would create are not there.
    pub(crate) async fn decide_wave(
        &self,
        lj: &LoadedJob,
        changes: &[&ChangeRef],
    ) -> Result<Vec<ChangeResult>, StepError> {
        let (mut items, _) = wave_items(&lj.job, changes);
        let todo: Vec<usize> = (0..items.len()).collect();
        self.read_and_decide(lj, &mut items, &todo).await?;
        let results: Vec<_> =
            items.iter().map(|it| ChangeResult::Done { effect: it.effect(), found: it.found }).collect();
        Ok(in_order(&lj.job, changes, results.into_iter()))
    }

    /// Steps 1 to 4: the links, step 1 on them, both records read fresh, and each decided.
    async fn read_and_decide(&self, lj: &LoadedJob, items: &mut [Item<'_>], todo: &[usize]) -> Result<(), StepError> {
        let job = &lj.job;
        let refs: Vec<_> = todo.iter().map(|&i| (items[i].c.map.as_str(), &items[i].c.key)).collect();
        let links = self.state.links(&job.name, &refs).await?;
        let mut live = Vec::with_capacity(todo.len());
        for (&i, link) in todo.iter().zip(links) {
            let at = link.as_ref().map(|l| LinkAt { rev: l.rev, state: &l.state });
            match Progress::check_newer(items[i].c, at) {
                Progress::ToRead => live.push((i, link)),
                skipped => items[i].progress = skipped,
            }
        }
        let wanted: Vec<(usize, &ChangeRef)> = live.iter().map(|(i, _)| (items[*i].map, items[*i].c)).collect();
        let read = |side: fn(&ChangeRef) -> Side| {
            self.read_grouped(lj, wanted.iter().map(move |(m, c)| (*m, side(c), &c.key)))
        };
        // Both sides at once: over a WAN each read is a round trip, and neither depends on the other.
        let (src, dst) = futures::join!(read(|c| c.source), read(|c| c.source.other()));
        self.failpoints.check("deliver.after_read")?;
        for (((i, link), rs), ro) in live.into_iter().zip(src).zip(dst) {
            let it = &mut items[i];
            let (c, map) = (it.c, &job.maps[it.map]);
            let (rs, ro) = match (rs, ro) {
                (Ok(rs), Ok(ro)) => (rs, ro),
                (Err(e), _) | (_, Err(e)) => {
                    it.progress = failed_call(&e);
                    continue;
                }
            };
            let canon_s = rs.as_ref().map(|r| canon::canon(map, c.source, &r.fields)).transpose();
            let canon_o = ro.as_ref().map(|r| canon::canon(map, c.source.other(), &r.fields)).transpose();
            let (canon_s, h_o) = match (canon_s, canon_o) {
                (Ok(s), Ok(o)) => (s, o.as_ref().map(canon::hash)),
                // With the source gone, an other-side record we cannot read is simply not our
                // create of it (no hash matches an empty one).
                (Ok(None), Err(_)) => (None, Some(String::new())),
                (Err(e), _) | (_, Err(e)) => {
                    let message = format!("{}/{}: {e}", c.map, c.key);
                    it.progress = Progress::call_failed(ErrorCategory::Application, &message, None);
                    continue;
                }
            };
            let h_s = canon_s.as_ref().map(canon::hash);
            let seen_s =
                rs.as_ref().zip(h_s.as_deref()).map(|(r, hash)| Seen { hash, version: &r.version, seq: r.seq });
            let seen_o =
                ro.as_ref().zip(h_o.as_deref()).map(|(r, hash)| Seen { hash, version: &r.version, seq: r.seq });
            let at = link.as_ref().map(|l| LinkAt { rev: l.rev, state: &l.state });
            it.progress = Progress::read(&context(job, c), c, at, seen_s, seen_o);
            debug!(job = %job.name, map = %c.map, key = %c.key, txid = %c.txid, seq = c.seq, source = ?c.source, progress = progress_name(&it.progress), "decided");
            it.hashes = (h_s.unwrap_or_default(), h_o.unwrap_or_default());
            it.found = ro.is_some();
            it.write = match &it.progress {
                Progress::ToCheck(w) if w.if_match.is_none() => Some(Effect::Created),
                Progress::ToCheck(w) if w.conflict => Some(Effect::Conflict),
                Progress::ToCheck(_) => Some(Effect::Updated),
                _ => None,
            };
            it.source = rs.zip(canon_s);
        }
        Ok(())
    }

    /// Step 5: every lookup of each decided write must exist on the other side.
    async fn check_lookups(&self, lj: &LoadedJob, items: &mut [Item<'_>]) {
        let job = &lj.job;
        // (item, parent map, key), in the order of each map's lookups.
        let mut refs = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let (Progress::ToCheck(_), Some((record, _))) = (&it.progress, &it.source) else { continue };
            for l in &job.maps[it.map].lookups {
                if let Some(k) = canon::lookup_key(&l.fields, it.c.source, &record.fields) {
                    refs.push((i, l.map, k));
                }
            }
        }
        let found = self.read_grouped(lj, refs.iter().map(|(i, m, k)| (*m, items[*i].c.source.other(), k))).await;
        for ((i, m, k), r) in refs.into_iter().zip(found) {
            let it = &mut items[i];
            if !matches!(it.progress, Progress::ToCheck(_)) {
                continue; // already found missing or failed on an earlier lookup
            }
            let progress = std::mem::replace(&mut it.progress, Progress::Again);
            it.progress = match r {
                Ok(Some(_)) => progress,
                Ok(None) => progress.checked(it.c, Some((m, k, &job.maps[m].name))),
                Err(e) => failed_call(&e),
            };
        }
        for it in items.iter_mut().filter(|it| matches!(it.progress, Progress::ToCheck(_))) {
            it.progress = std::mem::replace(&mut it.progress, Progress::Again).checked(it.c, None);
        }
    }

    /// A conflict the source wins is logged before anything is written: a crash after the
    /// write would otherwise leave the other side overwritten and no trace of why.
    async fn log_conflicts(&self, job: &Job, items: &[Item<'_>]) -> Result<(), StepError> {
        for it in items {
            if let Progress::ToMark(w) = &it.progress {
                if w.conflict {
                    Metrics::add(&self.metrics.conflicts, 1);
                    // Counted once per conflict row: both sides' changes may see one conflict.
                    if self.state.record_conflict(self.conflict(job, it)).await? {
                        self.metrics.count(&job.name, |t| t.conflicts += 1);
                    }
                }
            }
        }
        Ok(())
    }

    /// Step 7, made before step 6: each write is recorded on its link as pending, conditional
    /// on the revision read, and whether it landed is read off the target next time (see
    /// `PendingWrite::judge`): one link write per change, and no crash window between the write
    /// and its record.
    async fn mark(&self, job: &Job, items: &mut [Item<'_>]) -> Result<(), StepError> {
        self.put_links_of(job, items, |p| matches!(p, Progress::ToMark(_))).await?;
        if items.iter().any(|it| matches!(it.progress, Progress::ToWrite(..))) {
            self.failpoints.check("deliver.after_mark")?;
        }
        Ok(())
    }

    /// Puts the link each selected change asks for (`Progress::link_write`: a mark or a
    /// commit), conditional on the revision read, and feeds each answer back. The rows a put
    /// drops from the link (a commit's) are resolved just before it.
    async fn put_links_of(
        &self,
        job: &Job,
        items: &mut [Item<'_>],
        selected: impl Fn(&Progress) -> bool,
    ) -> Result<(), StepError> {
        let mut chosen = Vec::new();
        let mut resolve = Vec::new();
        let mut puts = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let Some((state, rev, rows)) = it.progress.link_write().filter(|_| selected(&it.progress)) else {
                continue;
            };
            chosen.push(i);
            resolve.extend(rows.iter().cloned());
            puts.push(State::link_put(&job.name, &it.c.map, &it.c.key, state, rev));
        }
        if chosen.is_empty() {
            return Ok(());
        }
        if !resolve.is_empty() {
            self.state.resolve_errors(&job.name, &resolve).await?;
        }
        for (i, answer) in chosen.into_iter().zip(self.state.put_links(puts).await?) {
            let progress = std::mem::replace(&mut items[i].progress, Progress::Again);
            items[i].progress = progress.link_written(conditional(answer)?);
        }
        Ok(())
    }

    /// Step 6: each write, conditional on the version read, one connector call per map and
    /// side. A write that failed puts its link back over the mark (conditional on the mark's
    /// revision: if that loses a race, the next round reads again).
    async fn write(&self, lj: &LoadedJob, items: &mut [Item<'_>]) -> Result<(), StepError> {
        let job = &lj.job;
        let mut by_target: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            if matches!(it.progress, Progress::ToWrite(..)) {
                by_target.entry((it.map, it.c.source.other())).or_default().push(i);
            }
        }
        let mut unmark = Vec::new();
        for ((m, side), is) in by_target {
            let map = &job.maps[m];
            let ops: Vec<WriteOp> = is
                .iter()
                .filter_map(|&i| {
                    let (Progress::ToWrite(w, _), Some((_, canon))) = (&items[i].progress, &items[i].source) else {
                        return None;
                    };
                    Some(WriteOp {
                        key: items[i].c.key.clone(),
                        fields: canon::to_side(map, side, canon),
                        precondition: match &w.if_match {
                            Some(version) => Precondition::IfMatch(version.clone()),
                            None => Precondition::CreateOnly,
                        },
                    })
                })
                .collect();
            let answer = lj.connector(side).write(lj.spec(m, side), &ops).await;
            for (k, &i) in is.iter().enumerate() {
                let answer = match &answer {
                    Ok(rs) => rs.get(k).cloned().unwrap_or(Err(WriteFailure::Transient {
                        message: "connector answered too few results".into(),
                        retry_after: None,
                    })),
                    Err(e) => Err(WriteFailure::from(e)),
                };
                let it = &mut items[i];
                let Progress::ToWrite(_, rev) = it.progress else { continue };
                if answer.is_ok() {
                    let lag = self.state.now_ms() - it.c.at_ms;
                    Metrics::add(&self.metrics.written, 1);
                    self.metrics.record_latency(lag);
                    self.metrics.count(&job.name, |t| {
                        t.delivered += 1;
                        t.lag.record(lag.max(0) as u64);
                    });
                }
                let progress = std::mem::replace(&mut it.progress, Progress::Again);
                let (next, put) = progress.written(&context(job, it.c), it.c, answer.map(|_| ()));
                it.progress = next;
                unmark.extend(put.map(|state| State::link_put(&job.name, &it.c.map, &it.c.key, &state, Some(rev))));
            }
        }
        for answer in self.state.put_links(unmark).await? {
            conditional(answer)?;
        }
        Ok(())
    }

    /// Deletes, on the other side, the records our creates put there after their source was
    /// deleted, and their links: dualsync's own deletes, like its writes.
    async fn undo(&self, lj: &LoadedJob, items: &mut [Item<'_>]) -> Result<(), StepError> {
        let mut by_target: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
        for (i, it) in items.iter().enumerate() {
            if matches!(it.progress, Progress::ToUndo { .. }) {
                by_target.entry((it.map, it.c.source.other())).or_default().push(i);
            }
        }
        for ((m, side), is) in by_target {
            let keys: Vec<_> = is.iter().map(|&i| items[i].c.key.clone()).collect();
            for &i in &is {
                let c = items[i].c;
                debug!(job = %lj.job.name, map = %c.map, key = %c.key, txid = %c.txid, seq = c.seq, "undo: our create of a deleted record");
            }
            let answer = lj.connector(side).delete(lj.spec(m, side), &keys).await;
            for &i in &is {
                let it = &mut items[i];
                let Progress::ToUndo { rev, rows } = &it.progress else { continue };
                let answer = match &answer {
                    Ok(()) => {
                        Metrics::add(&self.metrics.live_deletes, 1);
                        Ok(self.forget(&lj.job, it.c, *rev, rows).await?)
                    }
                    Err(e) => Err((e.category(), e.message(), e.retry_after())),
                };
                it.progress = std::mem::replace(&mut it.progress, Progress::Again).undone(answer);
            }
        }
        Ok(())
    }

    /// Records on neither side: their links deleted, each if unchanged since it was read.
    async fn forget_all(&self, job: &Job, items: &mut [Item<'_>]) -> Result<(), StepError> {
        for it in items.iter_mut() {
            if let Progress::ToForget { rev, rows, .. } = &it.progress {
                let deleted = self.forget(job, it.c, *rev, rows).await?;
                it.progress = std::mem::replace(&mut it.progress, Progress::Again).forgotten(deleted);
            }
        }
        Ok(())
    }

    /// Deletes the link of `c`'s record, on neither side now, if still at revision `rev`, then
    /// closes its rows; false when it changed since it was read (a delivery racing this one
    /// marked a create, which may yet land).
    async fn forget(&self, job: &Job, c: &ChangeRef, rev: u64, rows: &[String]) -> Result<bool, StepError> {
        if !self.state.forget_link(&job.name, &c.map, &c.key, rev).await? {
            return Ok(false);
        }
        self.state.close_errors(&job.name, rows, "the record no longer exists on either side").await?;
        Ok(true)
    }

    /// Step 3's commits: links in step whose stored state lags, each conditional on the
    /// revision read.
    async fn commit(&self, job: &Job, items: &mut [Item<'_>]) -> Result<(), StepError> {
        self.put_links_of(job, items, |p| matches!(p, Progress::ToCommit(_))).await
    }

    /// What each change's end leaves to do: error rows, waiting children, retried rows
    /// settled, conflicts the primary won, metrics; and the answer per change.
    async fn settle_wave<'c>(
        &self,
        lj: &LoadedJob,
        items: Vec<Item<'c>>,
        mut failures: Vec<(&'c ChangeRef, ErrorCategory, String)>,
    ) -> Result<std::vec::IntoIter<ChangeResult>, StepError> {
        let job = &lj.job;
        let mut waiting: Vec<Waiter> = Vec::new();
        let mut closed: Vec<(String, &str)> = Vec::new();
        let mut synced: Vec<String> = Vec::new();
        let mut conflicts: Vec<ConflictRecord> = Vec::new();
        let mut checks: Vec<ChangeRef> = Vec::new();
        let mut results = Vec::with_capacity(items.len());
        for mut it in items {
            let done = std::mem::replace(&mut it.progress, Progress::Again).ended(it.c);
            let retried = it.c.retry_of.clone();
            let effect = it.effect_of(&done.end);
            let mut result = ChangeResult::Done { effect, found: it.found };
            match done.end {
                End::Synced { wrote, resolves } => {
                    Metrics::add(&self.metrics.in_step, u64::from(!wrote));
                    synced.extend(retried);
                    synced.extend(resolves);
                }
                End::OtherSideChanged => {
                    Metrics::add(&self.metrics.other_side_changed, 1);
                    closed.extend(retried.map(|sk| (sk, "superseded by the other side's newer change")));
                }
                End::ConflictLost { resend } => {
                    checks.extend(resend);
                    conflicts.push(self.conflict(job, &it));
                    closed.extend(retried.map(|sk| (sk, "lost a conflict to the primary (see conflicts)")));
                }
                End::Undone => {}
                End::Failed { category, message } => failures.push((it.c, category, message)),
                End::Waiting { parent, key, message } => waiting.push((it.c, parent, key, message)),
                End::Retry { message, retry_after } => result = ChangeResult::System { message, retry_after },
            }
            results.push(result);
        }
        self.record_all(lj, failures).await?;
        self.wait_for_parents(lj, waiting).await?;
        for (sk, why) in closed {
            self.state.close_errors(&job.name, &[sk], why).await?;
        }
        if !synced.is_empty() {
            self.state.resolve_errors(&job.name, &synced).await?;
        }
        // Before the answer: a crash in between sends them again, under the same dedupe ids.
        let resent: Vec<_> = checks
            .into_iter()
            .flat_map(|c| {
                let tag = short_hash(&[c.txid.as_bytes(), c.map.as_bytes(), c.key.display().as_bytes()]);
                redelivery(job, vec![c], &tag)
            })
            .collect();
        if !resent.is_empty() {
            self.deliver_queue.send(resent).await?;
        }
        for c in conflicts {
            Metrics::add(&self.metrics.conflicts, 1);
            let job = c.job.clone();
            if self.state.record_conflict(c).await? {
                self.metrics.count(&job, |t| t.conflicts += 1);
            }
        }
        Ok(results.into_iter())
    }

    /// The conflict row of a change, from the hashes its delivery read.
    fn conflict(&self, job: &Job, it: &Item<'_>) -> ConflictRecord {
        let c = it.c;
        let mut hashes = [String::new(), String::new()];
        hashes[c.source.index()] = it.hashes.0.clone();
        hashes[c.source.other().index()] = it.hashes.1.clone();
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

fn context<'j>(job: &'j Job, c: &ChangeRef) -> Context<'j> {
    Context { primary: job.primary, source_app: job.app_name(c.source), target_app: job.app_name(c.source.other()) }
}

fn failed_call(e: &ConnectorError) -> Progress {
    Progress::call_failed(e.category(), e.message(), e.retry_after())
}

/// A conditional link write's answer: its new revision, or `None` when it lost to a concurrent
/// write.
fn conditional(answer: Result<u64, KvError>) -> Result<Option<u64>, StepError> {
    match answer {
        Ok(rev) => Ok(Some(rev)),
        Err(KvError::ConditionFailed { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A short name of a change's state, for debug logs (the state itself holds record content).
fn progress_name(p: &Progress) -> &'static str {
    match p {
        Progress::ToRead => "to read",
        Progress::ToCommit(_) => "in step",
        Progress::ToCheck(w) if w.conflict => "conflict won",
        Progress::ToCheck(_) | Progress::ToMark(_) | Progress::ToWrite(..) => "write",
        Progress::ToUndo { .. } => "undo",
        Progress::ToForget { .. } => "forget",
        Progress::Again => "again",
        Progress::Done(Done { end, .. }) => match end {
            End::Synced { .. } => "in step",
            End::OtherSideChanged => "other side changed",
            End::ConflictLost { .. } => "conflict lost",
            End::Undone => "undone",
            End::Failed { .. } => "failed",
            End::Waiting { .. } => "waiting",
            End::Retry { .. } => "retry",
        },
    }
}
