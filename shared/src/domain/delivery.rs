//! One change's way through delivery (DESIGN §3), as pure transitions: the executor in
//! `steps::deliver` does the I/O each state asks for, for a whole wave of changes at once, and
//! feeds the answers back here.
//!
//! ```text
//! ToRead ──(link, both records: steps 1–4)──┬─> ToCommit ──(link commit: step 3)──> Done | Again
//!                                            ├─> ToCheck ──(lookups: step 5)──> ToMark | Done
//!                                            │     ToMark ──(pending mark: step 7)──> ToWrite | Again
//!                                            │     ToWrite ──(write: step 6)──> Done | Again
//!                                            ├─> ToUndo ──(delete on the other side)──> Done
//!                                            ├─> ToForget ──(link deleted, rows closed)──> Done | Again
//!                                            └─> Done
//! ```
//! `Again` goes back to `ToRead` (a race lost to a concurrent change, bounded by the executor).
use super::change::{ChangeRef, Key};
use super::decide::{decide, Decision};
use super::errors::ErrorCategory;
use super::job::Side;
use super::link::{LinkState, Observed, PendingWrite};
use crate::ports::WriteFailure;
use std::time::Duration;

/// A record as delivery read it: the hash of its canonical content, its version and, where the
/// app tells it, the seq of its latest change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen<'a> {
    pub hash: &'a str,
    pub version: &'a str,
    pub seq: Option<u64>,
}

impl<'a> Seen<'a> {
    fn observed(self) -> Observed<'a> {
        Observed { hash: self.hash, version: self.version }
    }
}

/// A link as read: its revision (for conditional writes) and state.
#[derive(Debug, Clone, Copy)]
pub struct LinkAt<'a> {
    pub rev: u64,
    pub state: &'a LinkState,
}

/// What delivery needs to know of the job for one change.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub primary: Side,
    /// The source app's name, for messages.
    pub source_app: &'a str,
    /// The target app's name, for messages.
    pub target_app: &'a str,
}

/// Where one change is.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Steps 1 and 2 to do: its link, then both records, are read.
    ToRead,
    /// Step 3: in step, and the link's stored state lags (a first link, a sync it does not show
    /// yet, rows to resolve, an uncertain mark seen landed): commit `next`.
    ToCommit(Commit),
    /// Step 5: the write is decided; every lookup must exist on the other side.
    ToCheck(Write),
    /// Step 7, made before step 6: the link records the write as pending.
    ToMark(Write),
    /// Step 6: the write, its mark at revision `.1`.
    ToWrite(Write, u64),
    /// The source record is gone and the other side holds our create of it, made after the
    /// live delete found nothing to delete: delete it there too, and the link if still at
    /// revision `rev`, closing its rows (`rows`).
    ToUndo { rev: u64, rows: Vec<String> },
    /// The record is on neither side: the link goes if still at revision `rev` (a delivery
    /// racing this one may have marked a create since), and its rows (`rows`) can never sync now.
    ToForget { rev: u64, rows: Vec<String>, message: String },
    /// Lost a race with a concurrent change (a failed write precondition or link commit):
    /// back to step 1.
    Again,
    /// Finished.
    Done(Done),
}

/// A link commit of step 3.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    pub next: LinkState,
    /// The revision read; `None`: a first link.
    pub rev: Option<u64>,
    /// Error rows the commit drops from the link: resolved just before it.
    pub resolves: Vec<String>,
    /// How the change ends once committed.
    pub then: End,
}

/// A decided write of the source's content to the other side.
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// It overrides a concurrent change of the other side (the source is primary): logged
    /// before the write.
    pub conflict: bool,
    /// The link revision read; `None`: no link yet.
    pub rev: Option<u64>,
    /// The link as read: what a write that did not land puts back over its mark. Not as
    /// settled then: a mark it held is judged again next time, since its write may still be
    /// landing from another delivery of the change (a redelivery racing it).
    pub unmarked: LinkState,
    /// The link with this write pending.
    pub mark: LinkState,
    /// The link's open error rows: they stay on the mark and are resolved once the write is
    /// made. Resolved before it, a write that then failed in a delivery whose message another
    /// had already answered (recording its row) left them resolved with nothing to retry.
    pub resolves: Vec<String>,
    /// The version the write is conditional on (If-Match); `None`: create-only.
    pub if_match: Option<String>,
}

/// How a change finished.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub end: End,
    /// The link now, when children wait on it and the record is on both sides: they go again.
    pub release: Option<(u64, LinkState)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// Steps 3 or 6: both sides hold the source's content (`wrote`: by this delivery); the
    /// error rows the write settles (`resolves`) are resolved.
    Synced { wrote: bool, resolves: Vec<String> },
    /// Step 4: only the other side changed; its change flows back.
    OtherSideChanged,
    /// Step 4: both changed and the other side is primary: nothing written, logged. `resend`:
    /// the conflict was decided against an uncertain mark, so the primary may have no change
    /// left to send (the write it made may have been answered already): a check from the
    /// primary's side goes down the record's lane and writes its record over this one.
    ConflictLost { resend: Option<ChangeRef> },
    /// Our create of a deleted record was undone.
    Undone,
    /// An error row of this category.
    Failed { category: ErrorCategory, message: String },
    /// Step 5: a parent is missing on the other side; the change waits on the parent's link
    /// (map index, key) and goes again when it syncs.
    Waiting { parent: usize, key: Key, message: String },
    /// A system failure: retried later, and its lane waits behind it.
    Retry { message: String, retry_after: Option<Duration> },
}

impl Progress {
    fn done(end: End) -> Progress {
        Progress::Done(Done { end, release: None })
    }

    fn failed(category: ErrorCategory, message: String) -> Progress {
        Progress::done(End::Failed { category, message })
    }

    /// A failed connector call: a system failure is retried, any other recorded.
    pub fn call_failed(category: ErrorCategory, message: &str, retry_after: Option<Duration>) -> Progress {
        match category {
            ErrorCategory::System => Progress::done(End::Retry { message: message.to_string(), retry_after }),
            category => Progress::failed(category, message.to_string()),
        }
    }

    /// Step 1, from the link alone: a newer change of this record was captured. Skipped only
    /// once the link has synced: a record the other side does not have yet is delivered (read
    /// fresh, so with its latest content), since children queued behind it need it there.
    pub fn check_newer(c: &ChangeRef, link: Option<LinkAt<'_>>) -> Progress {
        match link {
            Some(l) if c.seq < l.state.seen(c.source) && l.state.is_synced() => Progress::failed(
                ErrorCategory::Concurrency,
                format!("skipped: a newer change (seq {}) of {}/{} exists", l.state.seen(c.source), c.map, c.key),
            ),
            _ => Progress::ToRead,
        }
    }

    /// Steps 1 to 4, with both records read fresh (`None`: absent). A record whose content
    /// cannot be put in canonical form never gets here: the executor records it.
    pub fn read(
        cx: &Context<'_>,
        c: &ChangeRef,
        link: Option<LinkAt<'_>>,
        source: Option<Seen<'_>>,
        other: Option<Seen<'_>>,
    ) -> Progress {
        let state = link.map(|l| l.state);
        let Some(source) = source else {
            if let Some(l) = link.filter(|l| created_here(Some(l.state), c.source.other(), other)) {
                return Progress::ToUndo { rev: l.rev, rows: l.state.open_errors.clone() };
            }
            let message = format!("skipped: {}/{} no longer exists in {}", c.map, c.key, cx.source_app);
            return match (link, other) {
                // Unless this change marked a create there, which may still land: the link
                // keeps the mark for the source's delete, which capture takes live (a landed
                // create then goes with it). Forgotten, that create stayed on the other side
                // with no link, the delete took it for a newer change there, and the record
                // came back on the side whose user deleted it (found by the property tests).
                (Some(l), None) if !l.state.creating_from(c.source, c.seq) => {
                    let mut rows = l.state.open_errors.clone();
                    rows.extend(c.retry_of.clone());
                    Progress::ToForget { rev: l.rev, rows, message }
                }
                _ => Progress::failed(ErrorCategory::Concurrency, message),
            };
        };
        // Step 1 again, where the app tells each record's latest change seq. Here the other
        // side's record is known: once it exists, a stale change can go.
        if let (Some(latest), Some(l)) = (source.seq, state) {
            if c.seq < latest && (l.is_synced() || other.is_some()) {
                let message = format!("skipped: a newer change (seq {latest}) of {}/{} exists", c.map, c.key);
                return Progress::failed(ErrorCategory::Concurrency, message);
            }
        }
        let mut records = [None, None];
        records[c.source.index()] = Some(source.observed());
        records[c.source.other().index()] = other.map(Seen::observed);
        let settled = state.map(|s| s.settled(records)).unwrap_or_default();
        let rows = state.map(|s| s.open_errors.clone()).unwrap_or_default();
        // The other side no longer holds the record it held at the last sync, and the source
        // has not changed since: the other side deleted it. While the link has rows to retry,
        // that delete may be one of them (held while the job was stopped): it decides. Written
        // here, the record came back on the side whose user deleted it, and the sync resolved
        // the delete's row with the others.
        if other.is_none() && !rows.is_empty() && settled.hash.as_deref() == Some(source.hash) {
            return Progress::Done(Done { end: End::OtherSideChanged, release: None });
        }
        let unchanged = Done { end: End::Synced { wrote: false, resolves: Vec::new() }, release: release(link) };
        match decide(state, c.source, cx.primary, source.observed(), other.map(Seen::observed)) {
            Decision::InStep => {
                // Committed only when it says something new, or when a mark must not be left
                // (`LinkState::commit_when_in_step`): an echo of a landed write costs no link
                // write. A create mark of this content stays on (`LinkState::kept_in_step`).
                let must = state.is_some_and(|s| s.commit_when_in_step(c.source, c.seq));
                if link.is_none() || settled.hash.as_deref() != Some(source.hash) || !rows.is_empty() || must {
                    let mut next = synced_link(&settled, c, source.hash, source.version);
                    next.version[c.source.other().index()] = other.map(|o| o.version.to_string());
                    next.pending = state.and_then(|s| s.kept_in_step(source.hash));
                    Progress::ToCommit(Commit {
                        next,
                        rev: link.map(|l| l.rev),
                        resolves: rows,
                        then: End::Synced { wrote: false, resolves: Vec::new() },
                    })
                } else {
                    Progress::Done(unchanged)
                }
            }
            Decision::OtherSideChanged => match link {
                // The change that made the mark, again, took its target's change for one made on
                // top of the write: committed like an in-step finding, so that the delivery still
                // waiting on that write cannot mark it uncertain afterwards.
                Some(l) if l.state.commit_when_in_step(c.source, c.seq) => Progress::ToCommit(Commit {
                    next: settled,
                    rev: Some(l.rev),
                    resolves: Vec::new(),
                    then: End::OtherSideChanged,
                }),
                _ => Progress::Done(Done { end: End::OtherSideChanged, release: release(link) }),
            },
            Decision::ConflictLost => {
                let resend = state.filter(|s| s.landing_unknown(records)).map(|s| primary_check(c, s, other));
                Progress::Done(Done { end: End::ConflictLost { resend }, release: release(link) })
            }
            Decision::Write { conflict } => {
                let mut mark = synced_link(&settled, c, source.hash, source.version);
                // Until the write lands, the last sync is the one before it: its content, and
                // the source's version then. Capture drops a notification of the source's
                // version on the link as delivered already, and this write may still fail or
                // never be made (a crash right after the mark).
                mark.hash = settled.hash.clone();
                mark.version[c.source.index()] = settled.version[c.source.index()].clone();
                mark.open_errors = rows.clone();
                let if_match = other.map(|o| o.version.to_string());
                // A create of content the target side held before: synced there, or written by
                // our earlier write, which may have landed (a time-out) and been deleted since.
                let written_before = state
                    .and_then(|s| s.pending.as_ref())
                    .is_some_and(|p| p.side == c.source.other() && p.hash == source.hash);
                let restores = if_match.is_none() && (settled.hash.as_deref() == Some(source.hash) || written_before);
                mark.pending = Some(PendingWrite {
                    side: c.source.other(),
                    hash: source.hash.to_string(),
                    from_version: if_match.clone(),
                    uncertain: false,
                    restores,
                });
                Progress::ToCheck(Write {
                    conflict,
                    rev: link.map(|l| l.rev),
                    unmarked: state.cloned().unwrap_or_default(),
                    mark,
                    resolves: rows,
                    if_match,
                })
            }
        }
    }

    /// Step 5: `missing` is the first lookup (parent map index, key) the other side lacks.
    /// A change that waited for its parent once already fails as an ordinary application error.
    pub fn checked(self, c: &ChangeRef, missing: Option<(usize, Key, &str)>) -> Progress {
        match (self, missing) {
            (Progress::ToCheck(w), None) => Progress::ToMark(w),
            (Progress::ToCheck(_), Some((parent, key, parent_map))) => {
                let message = format!("missing reference: {parent_map}/{key}");
                if c.waited {
                    Progress::failed(ErrorCategory::Application, message)
                } else {
                    Progress::done(End::Waiting { parent, key, message })
                }
            }
            (other, _) => other,
        }
    }

    /// The link write this state asks for: the state to put, the revision it is conditional on
    /// (`None`: a first link) and the error rows it drops.
    pub fn link_write(&self) -> Option<(&LinkState, Option<u64>, &[String])> {
        match self {
            // A mark keeps the link's open rows (see `Write::resolves`).
            Progress::ToMark(w) => Some((&w.mark, w.rev, &[])),
            Progress::ToCommit(c) => Some((&c.next, c.rev, &c.resolves)),
            _ => None,
        }
    }

    /// The answer to [`Self::link_write`]: its new revision, or `None` when the link changed
    /// since it was read.
    pub fn link_written(self, rev: Option<u64>) -> Progress {
        match self {
            Progress::ToMark(_) => self.marked(rev),
            Progress::ToCommit(_) => self.committed(rev),
            other => other,
        }
    }

    /// Step 7 made first: the conditional mark's answer (`None`: the link changed since it was
    /// read).
    fn marked(self, rev: Option<u64>) -> Progress {
        match (self, rev) {
            (Progress::ToMark(w), Some(rev)) => Progress::ToWrite(w, rev),
            (Progress::ToMark(_), None) => Progress::Again,
            (other, _) => other,
        }
    }

    /// Step 6's answer. The link state to put back over the mark (conditional on its
    /// revision) comes with it when the write failed: a failed write is never taken for a
    /// landed one (see `PendingWrite::judge`).
    pub fn written(
        self,
        cx: &Context<'_>,
        c: &ChangeRef,
        answer: Result<(), WriteFailure>,
    ) -> (Progress, Option<LinkState>) {
        let Progress::ToWrite(w, rev) = self else { return (self, None) };
        match answer {
            Ok(()) => {
                let release = (!w.mark.waiters.is_empty()).then_some((rev, w.mark));
                (Progress::Done(Done { end: End::Synced { wrote: true, resolves: w.resolves }, release }), None)
            }
            // Someone changed the record since the read: the write did not land, but the
            // record no longer shows that. Take the mark back and read again.
            Err(WriteFailure::PreconditionFailed) => (Progress::Again, Some(w.unmarked)),
            // Refused: it did not land. Take the mark back, or a later edit of the target would
            // pass for one made on top of this write.
            Err(WriteFailure::Rejected(message)) => (
                Progress::failed(
                    ErrorCategory::Application,
                    format!("{} refused {}/{}: {message}", cx.target_app, c.map, c.key),
                ),
                Some(w.unmarked),
            ),
            // It may or may not have landed: say so on the mark before anything reads it.
            Err(WriteFailure::Transient { message, retry_after }) => {
                let mut mark = w.mark;
                if let Some(p) = mark.pending.as_mut() {
                    p.uncertain = true;
                }
                (Progress::done(End::Retry { message, retry_after }), Some(mark))
            }
        }
    }

    /// A link commit's answer (`Some`: its new revision; `None`: the link changed meanwhile).
    fn committed(self, rev: Option<u64>) -> Progress {
        match (self, rev) {
            (Progress::ToCommit(commit), Some(rev)) => {
                let release = (!commit.next.waiters.is_empty()).then_some((rev, commit.next));
                Progress::Done(Done { end: commit.then, release })
            }
            (Progress::ToCommit(_), None) => Progress::Again,
            (other, _) => other,
        }
    }

    /// The undo's answer: the record and its link are deleted (`Ok(true)`), the record is and
    /// the link changed since it was read (`Ok(false)`: back to step 1), or the call failed.
    pub fn undone(self, answer: Result<bool, (ErrorCategory, &str, Option<Duration>)>) -> Progress {
        match (self, answer) {
            (Progress::ToUndo { .. }, Ok(true)) => Progress::done(End::Undone),
            (Progress::ToUndo { .. }, Ok(false)) => Progress::Again,
            (Progress::ToUndo { .. }, Err((category, message, retry_after))) => {
                Progress::call_failed(category, message, retry_after)
            }
            (other, _) => other,
        }
    }

    /// The answer to [`Progress::ToForget`]: the link deleted and its rows closed, the change
    /// ends as a concurrency skip; the link changed since it was read, back to step 1.
    pub fn forgotten(self, deleted: bool) -> Progress {
        match self {
            Progress::ToForget { message, .. } if deleted => Progress::failed(ErrorCategory::Concurrency, message),
            Progress::ToForget { .. } => Progress::Again,
            other => other,
        }
    }

    /// How the change ended: a change that is not done after its last round lost its races
    /// too often, a system failure retried later.
    pub fn ended(self, c: &ChangeRef) -> Done {
        match self {
            Progress::Done(done) => done,
            _ => Done {
                end: End::Retry {
                    message: format!("{}/{} kept changing during delivery", c.map, c.key),
                    retry_after: None,
                },
                release: None,
            },
        }
    }
}

/// The link as read, when children wait on it.
fn release(link: Option<LinkAt<'_>>) -> Option<(u64, LinkState)> {
    link.filter(|l| !l.state.waiters.is_empty()).map(|l| (l.rev, l.state.clone()))
}

/// The link after syncing change `c` with content `hash`, from its settled state: the caller
/// sets the other side's version. Its open error rows are dropped: the sync resolves them.
fn synced_link(settled: &LinkState, c: &ChangeRef, hash: &str, source_version: &str) -> LinkState {
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

/// A delivery of the record from the primary's side (the other side of `c`, read as `primary`),
/// sent after `c` lost a conflict that nothing else may settle. Its seq is the latest known of
/// that record, so step 1 does not skip it as stale; its transaction id names why it exists.
fn primary_check(c: &ChangeRef, link: &LinkState, primary: Option<Seen<'_>>) -> ChangeRef {
    let side = c.source.other();
    let seq = primary.and_then(|p| p.seq).unwrap_or(0).max(link.seen(side)).max(link.synced[side.index()]);
    ChangeRef {
        map: c.map.clone(),
        source: side,
        key: c.key.clone(),
        seq,
        txid: format!("conflict-check-{}-{}", c.txid, c.seq),
        at_ms: c.at_ms,
        retry_of: None,
        waited: false,
    }
}

/// Whether the other side's record is the one our pending create of it wrote.
fn created_here(link: Option<&LinkState>, other_side: Side, other: Option<Seen<'_>>) -> bool {
    let (Some(p), Some(r)) = (link.and_then(|l| l.pending.as_ref()), other) else { return false };
    p.side == other_side && p.from_version.is_none() && r.hash == p.hash
}

#[cfg(test)]
mod tests {
    use super::*;

    const CX: Context<'static> = Context { primary: Side::A, source_app: "fno", target_app: "dataverse" };

    fn change(source: Side, seq: u64) -> ChangeRef {
        ChangeRef {
            map: "customers".into(),
            source,
            key: Key(vec!["C1".into()]),
            seq,
            txid: "t1".into(),
            at_ms: 0,
            retry_of: None,
            waited: false,
        }
    }

    fn seen(hash: &'static str) -> Option<Seen<'static>> {
        Some(Seen { hash, version: hash, seq: None })
    }

    /// A link synced at content `hash`, versions named after it, with a change of A at seq 5.
    fn synced(hash: &str) -> LinkState {
        let mut l = LinkState { hash: Some(hash.into()), ..Default::default() };
        l.version = [Some(hash.into()), Some(hash.into())];
        l.seen = [5, 0];
        l.synced = [5, 0];
        l
    }

    fn at(state: &LinkState) -> Option<LinkAt<'_>> {
        Some(LinkAt { rev: 7, state })
    }

    fn end(p: &Progress) -> &End {
        match p {
            Progress::Done(d) => &d.end,
            other => panic!("not done: {other:?}"),
        }
    }

    fn write(p: Progress) -> Write {
        match p {
            Progress::ToCheck(w) => w,
            other => panic!("not a write: {other:?}"),
        }
    }

    /// The other side lost the record since the last sync, the source unchanged: with rows to
    /// retry on the link (the other side's delete, held while the job was stopped), that delete
    /// decides and the rows stay open; without, the record is written there as before.
    #[test]
    fn a_record_deleted_on_the_other_side_with_rows_waiting_is_not_written_again() {
        let mut l = synced("h0");
        l.open_errors = vec!["ts#row".into()];
        let p = Progress::read(&CX, &change(Side::A, 6), at(&l), seen("h0"), None);
        assert_eq!(end(&p), &End::OtherSideChanged);
        // The source changed since: its change goes (an edit wins over a delete, as before).
        assert!(!write(Progress::read(&CX, &change(Side::A, 6), at(&l), seen("h1"), None)).conflict);
        l.open_errors.clear();
        assert!(!write(Progress::read(&CX, &change(Side::A, 6), at(&l), seen("h0"), None)).conflict);
    }

    #[test]
    fn step_1_skips_a_stale_change_only_once_the_link_has_synced() {
        let l = synced("h0");
        assert!(matches!(
            end(&Progress::check_newer(&change(Side::A, 4), at(&l))),
            End::Failed { category: ErrorCategory::Concurrency, .. }
        ));
        assert_eq!(Progress::check_newer(&change(Side::A, 5), at(&l)), Progress::ToRead);
        assert_eq!(Progress::check_newer(&change(Side::A, 1), None), Progress::ToRead);
        let unsynced = LinkState { seen: [9, 0], ..Default::default() };
        assert_eq!(Progress::check_newer(&change(Side::A, 1), at(&unsynced)), Progress::ToRead);
        // A newer seq read off the source itself: stale once the other side has the record.
        let c = change(Side::A, 4);
        let newer = Some(Seen { hash: "h1", version: "v", seq: Some(6) });
        assert!(matches!(end(&Progress::read(&CX, &c, at(&unsynced), newer, seen("h0"))), End::Failed { .. }));
        assert!(matches!(Progress::read(&CX, &c, at(&unsynced), newer, None), Progress::ToCheck(_)));
    }

    #[test]
    fn a_gone_source_is_skipped_forgotten_or_undone() {
        let c = change(Side::A, 6);
        let l = synced("h0");
        // Gone here, still there: a skip (its delete flows on its own).
        assert!(matches!(end(&Progress::read(&CX, &c, at(&l), None, seen("h0"))), End::Failed { .. }));
        // Gone from both: the link goes, with its open rows and the retried one.
        let mut with_rows = l.clone();
        with_rows.open_errors = vec!["E1".into()];
        let retried = ChangeRef { retry_of: Some("E2".into()), ..c.clone() };
        match Progress::read(&CX, &retried, at(&with_rows), None, None) {
            Progress::ToForget { rows, .. } => assert_eq!(rows, ["E1", "E2"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(end(&Progress::read(&CX, &c, None, None, None)), End::Failed { .. }));
        let mut creating = LinkState {
            pending: Some(PendingWrite {
                side: Side::B,
                hash: "h1".into(),
                from_version: None,
                uncertain: false,
                restores: false,
            }),
            ..Default::default()
        };
        // Gone from both while this change's own create may still land there: the link stays.
        let marked = LinkState { synced: [6, 0], open_errors: with_rows.open_errors.clone(), ..creating.clone() };
        assert!(matches!(end(&Progress::read(&CX, &c, at(&marked), None, None)), End::Failed { .. }));
        // A later change (the delete's check from capture) forgets it.
        assert!(matches!(Progress::read(&CX, &change(Side::A, 7), at(&marked), None, None), Progress::ToForget { .. }));
        // Our pending create is what the other side holds: undone.
        assert_eq!(Progress::read(&CX, &c, at(&creating), None, seen("h1")), Progress::ToUndo { rev: 7, rows: vec![] });
        // Someone else's record with other content: not ours to delete.
        assert!(matches!(end(&Progress::read(&CX, &c, at(&creating), None, seen("h2"))), End::Failed { .. }));
        // An update (not a create) pending: not undone either.
        creating.pending.as_mut().expect("pending").from_version = Some("h0".into());
        assert!(matches!(end(&Progress::read(&CX, &c, at(&creating), None, seen("h1"))), End::Failed { .. }));
    }

    #[test]
    fn in_step_commits_only_what_is_new() {
        let c = change(Side::A, 6);
        let l = synced("h1");
        // An echo of what the link says: nothing to write.
        assert_eq!(
            Progress::read(&CX, &c, at(&l), seen("h1"), seen("h1")),
            Progress::Done(Done { end: End::Synced { wrote: false, resolves: Vec::new() }, release: None })
        );
        // A first link, a sync the link does not show, rows to resolve: committed.
        for (link, rows) in
            [(None, 0), (Some(synced("h0")), 0), (Some(LinkState { open_errors: vec!["E".into()], ..l.clone() }), 1)]
        {
            match Progress::read(&CX, &c, link.as_ref().and_then(at), seen("h1"), seen("h1")) {
                Progress::ToCommit(commit) => {
                    assert_eq!(commit.next.hash.as_deref(), Some("h1"));
                    assert_eq!(commit.next.synced[0], 6);
                    assert!(commit.next.open_errors.is_empty());
                    assert_eq!(commit.resolves.len(), rows);
                    assert_eq!(commit.rev, link.as_ref().map(|_| 7));
                }
                other => panic!("{other:?}"),
            }
        }
        // An uncertain mark seen landed: committed so it no longer judges edits as unknown.
        let mut uncertain = l.clone();
        uncertain.pending = Some(PendingWrite {
            side: Side::B,
            hash: "h1".into(),
            from_version: Some("h1".into()),
            uncertain: true,
            restores: false,
        });
        assert!(matches!(Progress::read(&CX, &c, at(&uncertain), seen("h1"), seen("h1")), Progress::ToCommit(_)));
    }

    #[test]
    fn a_mark_is_never_left_to_lie() {
        // A's change seq 6 created h1 on B; the mark as its delivery left it.
        let mut created = synced("h0");
        created.hash = None;
        created.synced = [6, 0];
        created.pending = Some(PendingWrite {
            side: Side::B,
            hash: "h1".into(),
            from_version: None,
            uncertain: false,
            restores: false,
        });
        // The echo from B costs no link write: the mark, landed, is the last sync.
        let echo = Progress::read(&CX, &change(Side::B, 2), at(&created), seen("h1"), seen("h1"));
        assert!(matches!(echo, Progress::Done(_)), "{echo:?}");
        // The change that made the mark, coming again (a redelivery racing the first), commits,
        // so the first cannot mark the landed write uncertain after this one is acknowledged;
        // the create mark stays on, made certain: a live delete still finds the create ours.
        match Progress::read(&CX, &change(Side::A, 6), at(&created), seen("h1"), seen("h1")) {
            Progress::ToCommit(commit) => {
                let kept = commit.next.pending.expect("create mark kept");
                assert_eq!((kept.hash.as_str(), kept.uncertain), ("h1", false));
            }
            other => panic!("{other:?}"),
        }
        // The same change again, finding B edited on top of its landed write: that judgement
        // is committed too, and A's edit flows back.
        match Progress::read(&CX, &change(Side::A, 6), at(&created), seen("h1"), seen("h3")) {
            Progress::ToCommit(commit) => {
                assert_eq!((commit.then, commit.next.hash.as_deref()), (End::OtherSideChanged, Some("h1")))
            }
            other => panic!("{other:?}"),
        }
        // A write taken back leaves the link as read, with the mark it held to judge again.
        let c = change(Side::A, 7);
        let p = Progress::read(&CX, &c, at(&created), seen("h2"), seen("h1")).checked(&c, None).marked(Some(9));
        let (_, put) = p.written(&CX, &c, Err(WriteFailure::PreconditionFailed));
        assert_eq!(put.expect("unmark"), created);
    }

    #[test]
    fn step_4_decides_without_a_write() {
        let l = synced("h0");
        let from_b = change(Side::B, 3);
        // Only A changed (A is the other side here): A's change flows back.
        assert_eq!(end(&Progress::read(&CX, &from_b, at(&l), seen("h0"), seen("h1"))), &End::OtherSideChanged);
        // Both changed, A is primary: B's change loses.
        assert_eq!(
            end(&Progress::read(&CX, &from_b, at(&l), seen("h2"), seen("h1"))),
            &End::ConflictLost { resend: None }
        );
        // Both changed, A is the source: A overwrites, logged as a conflict.
        let w = write(Progress::read(&CX, &change(Side::A, 6), at(&l), seen("h1"), seen("h2")));
        assert!(w.conflict);
    }

    #[test]
    fn a_conflict_lost_against_an_uncertain_mark_sends_the_primarys_record_again() {
        // A's h1 was written to B (at h0) and may have landed; B's user then edited B to h2.
        let mut l = synced("h0");
        l.pending = Some(PendingWrite {
            side: Side::B,
            hash: "h1".into(),
            from_version: Some("h0".into()),
            uncertain: true,
            restores: false,
        });
        let from_b = change(Side::B, 3);
        let a = Some(Seen { hash: "h1", version: "v7", seq: Some(9) });
        let lost = Progress::read(&CX, &from_b, at(&l), seen("h2"), a);
        let End::ConflictLost { resend: Some(check) } = end(&lost).clone() else {
            panic!("a lost conflict that resends")
        };
        assert_eq!((check.source, check.seq, &check.key, &check.map), (Side::A, 9, &from_b.key, &from_b.map));
        // The check is A's change: it wins the conflict and writes A's record to B.
        let w = write(Progress::read(&CX, &check, at(&l), a, seen("h2")));
        assert!(w.conflict && w.mark.pending.expect("mark").hash == "h1");
        // Not stale for step 1, whatever A's seqs on the link.
        assert_eq!(Progress::check_newer(&check, at(&l)), Progress::ToRead);
        // A certain mark, or none: the primary's change is still on its way, nothing resent.
        l.pending.as_mut().expect("mark").uncertain = false;
        l.hash = Some("h0".into());
        assert!(matches!(
            end(&Progress::read(&CX, &from_b, at(&l), seen("h2"), seen("h3"))),
            End::ConflictLost { resend: None }
        ));
    }

    #[test]
    fn a_write_is_marked_with_the_last_sync_unchanged() {
        let mut l = synced("h0");
        l.open_errors = vec!["E1".into()];
        let c = change(Side::A, 6);
        let w = write(Progress::read(&CX, &c, at(&l), seen("h1"), seen("h0")));
        assert!(!w.conflict);
        assert_eq!(w.rev, Some(7));
        assert_eq!(w.if_match.as_deref(), Some("h0"));
        assert_eq!(w.resolves, ["E1"]);
        // The mark keeps the last sync's content and source version until the write lands.
        assert_eq!(w.mark.hash.as_deref(), Some("h0"));
        assert_eq!(w.mark.version[0].as_deref(), Some("h0"));
        assert_eq!(w.mark.seen[0], 6);
        assert_eq!(w.mark.open_errors, ["E1"], "kept until the write is made");
        let p = w.mark.pending.clone().expect("pending");
        assert_eq!(
            (p.side, p.hash.as_str(), p.from_version.as_deref(), p.uncertain),
            (Side::B, "h1", Some("h0"), false)
        );
        // No record on the other side: create-only.
        let w = write(Progress::read(&CX, &c, None, seen("h1"), None));
        assert_eq!((w.if_match, w.rev), (None, None));
    }

    fn to_write(l: &LinkState) -> Progress {
        let c = change(Side::A, 6);
        let p = Progress::read(&CX, &c, at(l), seen("h1"), seen("h0")).checked(&c, None).marked(Some(8));
        assert!(matches!(p, Progress::ToWrite(_, 8)));
        p
    }

    #[test]
    fn every_answer_of_a_write() {
        let c = change(Side::A, 6);
        let l = synced("h0");
        let (p, put) = to_write(&l).written(&CX, &c, Ok(()));
        assert_eq!((end(&p), put), (&End::Synced { wrote: true, resolves: Vec::new() }, None));
        // A lost race takes the mark back and reads again.
        let (p, put) = to_write(&l).written(&CX, &c, Err(WriteFailure::PreconditionFailed));
        assert_eq!((p, put.expect("unmark").pending), (Progress::Again, None));
        // A refusal takes the mark back and is an application error naming the target app.
        let (p, put) = to_write(&l).written(&CX, &c, Err(WriteFailure::Rejected("bad".into())));
        assert!(put.expect("unmark").pending.is_none());
        match end(&p) {
            End::Failed { category: ErrorCategory::Application, message } => {
                assert_eq!(message, "dataverse refused customers/C1: bad")
            }
            other => panic!("{other:?}"),
        }
        // A failure that may have landed marks it uncertain and is retried.
        let retry_after = Some(Duration::from_secs(2));
        let (p, put) =
            to_write(&l).written(&CX, &c, Err(WriteFailure::Transient { message: "503".into(), retry_after }));
        assert_eq!(end(&p), &End::Retry { message: "503".into(), retry_after });
        assert!(put.expect("remark").pending.expect("pending").uncertain);
    }

    #[test]
    fn open_rows_are_resolved_once_the_write_is_made() {
        let c = change(Side::A, 6);
        let mut l = synced("h0");
        l.open_errors = vec!["E1".into()];
        let to_mark = Progress::read(&CX, &c, at(&l), seen("h1"), seen("h0")).checked(&c, None);
        assert_eq!(to_mark.link_write().map(|(_, _, rows)| rows.len()), Some(0), "none resolved before the mark");
        let (p, _) = to_write(&l).written(&CX, &c, Ok(()));
        assert_eq!(end(&p), &End::Synced { wrote: true, resolves: vec!["E1".into()] });
        let (_, put) =
            to_write(&l).written(&CX, &c, Err(WriteFailure::Transient { message: "503".into(), retry_after: None }));
        assert_eq!(put.expect("remark").open_errors, ["E1"], "still open after a failed write");
    }

    #[test]
    fn waiting_children_are_released_by_whatever_syncs_their_parent() {
        let waiter = change(Side::A, 1);
        let mut l = synced("h0");
        l.waiters = vec![waiter.clone()];
        let c = change(Side::A, 6);
        // Written: released with the mark, at its revision.
        let (p, _) = to_write(&l).written(&CX, &c, Ok(()));
        match p {
            Progress::Done(Done { release: Some((8, state)), .. }) => {
                assert_eq!(state.waiters, std::slice::from_ref(&waiter))
            }
            other => panic!("{other:?}"),
        }
        // In step with nothing new, or decided without a write: released with the link as read.
        for (s, o) in [("h0", "h0"), ("h0", "h1")] {
            let p = Progress::read(&CX, &change(Side::B, 3), at(&l), seen(s), seen(o));
            assert!(matches!(p, Progress::Done(Done { release: Some((7, _)), .. })), "{s} {o}: {p:?}");
        }
        // Committed: released at the commit's revision.
        let p = Progress::read(&CX, &c, at(&l), seen("h1"), seen("h1")).committed(Some(9));
        assert!(matches!(p, Progress::Done(Done { release: Some((9, _)), .. })));
        // No waiters: nothing to release (and nothing cloned).
        let p = Progress::read(&CX, &c, at(&synced("h0")), seen("h0"), seen("h0"));
        assert!(matches!(p, Progress::Done(Done { release: None, .. })));
    }

    #[test]
    fn lost_races_go_back_to_step_1() {
        let c = change(Side::A, 6);
        let l = synced("h0");
        let marked = Progress::read(&CX, &c, at(&l), seen("h1"), seen("h0")).checked(&c, None).marked(None);
        assert_eq!(marked, Progress::Again);
        assert_eq!(Progress::read(&CX, &c, None, seen("h1"), seen("h1")).committed(None), Progress::Again);
        assert!(matches!(Progress::Again.ended(&c).end, End::Retry { .. }));
        assert_eq!(Progress::done(End::Undone).ended(&c).end, End::Undone);
    }

    #[test]
    fn a_missing_parent_waits_once() {
        let c = change(Side::A, 6);
        let w = || Progress::read(&CX, &c, None, seen("h1"), None);
        assert_eq!(
            end(&w().checked(&c, Some((0, Key(vec!["P".into()]), "parents")))),
            &End::Waiting { parent: 0, key: Key(vec!["P".into()]), message: "missing reference: parents/P".into() }
        );
        let waited = ChangeRef { waited: true, ..c.clone() };
        assert!(matches!(
            end(&w().checked(&waited, Some((0, Key(vec!["P".into()]), "parents")))),
            End::Failed { category: ErrorCategory::Application, .. }
        ));
    }

    #[test]
    fn undo_and_forget_end_the_change() {
        let undo = Progress::ToUndo { rev: 2, rows: vec![] };
        assert_eq!(end(&undo.clone().undone(Ok(true))), &End::Undone);
        assert_eq!(undo.clone().undone(Ok(false)), Progress::Again);
        assert!(matches!(end(&undo.clone().undone(Err((ErrorCategory::System, "503", None)))), End::Retry { .. }));
        assert!(matches!(
            end(&undo.undone(Err((ErrorCategory::Application, "403", None)))),
            End::Failed { category: ErrorCategory::Application, .. }
        ));
        let forget = Progress::ToForget { rev: 3, rows: vec![], message: "gone".into() };
        assert_eq!(
            end(&forget.clone().forgotten(true)),
            &End::Failed { category: ErrorCategory::Concurrency, message: "gone".into() }
        );
        assert_eq!(forget.forgotten(false), Progress::Again);
    }
}
