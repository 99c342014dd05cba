//! The pure part of delivery (DESIGN §3, steps 3 and 4): given the hashes of the two records and
//! the link state, what to do.
use super::job::Side;
use super::link::{LinkState, Observed};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Step 3: both sides hold the same content (an echo, a redelivery, a change to unmapped
    /// fields). Commit the link with the current versions; write nothing. Loopback control.
    InStep,
    /// Step 4: only the other side changed since the last sync; its own change flows back.
    OtherSideChanged,
    /// Step 4: both changed and the source is not primary: do not write; log the conflict.
    ConflictLost,
    /// Write the source's content to the other side; `conflict` when it overrides a concurrent
    /// change there (the source is primary), which is logged.
    Write { conflict: bool },
}

/// `src`: the source record (read fresh); `other`: the other side's record, `None` when it
/// does not exist.
pub fn decide(
    link: Option<&LinkState>,
    source: Side,
    primary: Side,
    src: Observed<'_>,
    other: Option<Observed<'_>>,
) -> Decision {
    let Some(o) = other else {
        return Decision::Write { conflict: false };
    };
    let (h_source, h_other) = (src.hash, o.hash);
    if h_source == h_other {
        return Decision::InStep;
    }
    let mut records = [None, None];
    records[source.index()] = Some(src);
    records[source.other().index()] = other;
    let last = link.and_then(|l| l.last_synced(records));
    match last {
        // The other side is as we left it: an ordinary change of the source.
        Some(last) if last == h_other => Decision::Write { conflict: false },
        Some(last) if last == h_source => Decision::OtherSideChanged,
        // Both changed since the last sync, or no link yet and both exist with different
        // content: a conflict, decided by the primary.
        _ if source == primary => Decision::Write { conflict: true },
        _ => Decision::ConflictLost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::link::PendingWrite;

    fn link(hash: &str) -> LinkState {
        LinkState { hash: Some(hash.into()), ..Default::default() }
    }

    /// A record with content `hash` at a version named after it.
    fn rec(hash: &str) -> Option<Observed<'_>> {
        Some(Observed { hash, version: hash })
    }

    fn d(l: Option<&LinkState>, source: Side, primary: Side, src: &str, other: Option<&str>) -> Decision {
        decide(l, source, primary, rec(src).expect("source"), other.and_then(rec))
    }

    #[test]
    fn every_branch_of_step_3_and_4() {
        let l = link("h0");
        let (a, b) = (Side::A, Side::B);
        assert_eq!(d(Some(&l), a, a, "h1", None), Decision::Write { conflict: false });
        assert_eq!(d(Some(&l), a, a, "h1", Some("h1")), Decision::InStep);
        assert_eq!(d(Some(&l), a, a, "h1", Some("h0")), Decision::Write { conflict: false });
        assert_eq!(d(Some(&l), b, a, "h0", Some("h1")), Decision::OtherSideChanged);
        assert_eq!(d(Some(&l), a, a, "h1", Some("h2")), Decision::Write { conflict: true });
        assert_eq!(d(Some(&l), b, a, "h2", Some("h1")), Decision::ConflictLost);
        // No link yet, both exist and differ: a conflict too.
        assert_eq!(d(None, a, a, "h1", Some("h2")), Decision::Write { conflict: true });
        assert_eq!(d(None, b, a, "h1", Some("h2")), Decision::ConflictLost);
        assert_eq!(d(Some(&LinkState::default()), b, a, "h1", Some("h2")), Decision::ConflictLost);
    }

    /// B's content h1 was being written to A (at version h0) when the process died.
    fn pending_b_to_a() -> LinkState {
        let mut l = link("h0");
        l.pending = Some(PendingWrite {
            side: Side::A,
            hash: "h1".into(),
            from_version: Some("h0".into()),
            uncertain: false,
            restores: false,
        });
        l
    }

    #[test]
    fn a_write_that_landed_counts_as_the_last_sync() {
        let l = pending_b_to_a();
        // It landed; B then changed to h2: an ordinary change of B.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h2", Some("h1")), Decision::Write { conflict: false });
        // It landed and B did not change again: the echo is in step.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h1", Some("h1")), Decision::InStep);
    }

    #[test]
    fn a_write_that_did_not_land_leaves_the_last_sync_as_it_was() {
        let l = pending_b_to_a();
        // A is still at the version the write was conditional on: B's change is still to send.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h1", Some("h0")), Decision::Write { conflict: false });
        assert_eq!(d(Some(&l), Side::B, Side::A, "h2", Some("h0")), Decision::Write { conflict: false });
    }

    #[test]
    fn an_edit_on_top_of_a_landed_write_is_the_other_sides_change() {
        // The write landed, then a user edited A to h3 (a new version). A is primary, B the
        // source: B's content is what was synced, so A's edit flows to B; it is not a conflict
        // that would overwrite the edit.
        let l = pending_b_to_a();
        assert_eq!(d(Some(&l), Side::B, Side::B, "h1", Some("h3")), Decision::OtherSideChanged);
        // And A's own change, delivered from A, is an ordinary change.
        assert_eq!(d(Some(&l), Side::A, Side::B, "h3", Some("h1")), Decision::Write { conflict: false });
        // If B changed too, it is a real conflict.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h2", Some("h3")), Decision::ConflictLost);
    }

    /// B's content h1 was written to A (at version h0) and the write failed in a way that may
    /// have landed (a 503, a time-out): delivery marked it uncertain.
    fn failed_b_to_a() -> LinkState {
        let mut l = pending_b_to_a();
        l.pending.as_mut().expect("pending").uncertain = true;
        l
    }

    #[test]
    fn an_edit_after_a_failed_write_is_a_conflict_not_an_edit_on_top() {
        let l = failed_b_to_a();
        // A's user edited to h3 after the write failed. Both sides changed since the last sync
        // (h0): whichever change comes first, the primary decides, and a conflict is logged.
        assert_eq!(d(Some(&l), Side::B, Side::B, "h1", Some("h3")), Decision::Write { conflict: true });
        assert_eq!(d(Some(&l), Side::B, Side::A, "h1", Some("h3")), Decision::ConflictLost);
        assert_eq!(d(Some(&l), Side::A, Side::A, "h3", Some("h1")), Decision::Write { conflict: true });
        assert_eq!(d(Some(&l), Side::A, Side::B, "h3", Some("h1")), Decision::ConflictLost);
        // The failed write did land after all (A holds h1): an ordinary landed write.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h2", Some("h1")), Decision::Write { conflict: false });
        // It did not land and A is untouched: B's change is still to send.
        assert_eq!(d(Some(&l), Side::B, Side::A, "h1", Some("h0")), Decision::Write { conflict: false });
    }

    #[test]
    fn the_landing_of_each_mark() {
        use crate::domain::link::Landing;
        let certain = pending_b_to_a().pending.expect("pending");
        let uncertain = failed_b_to_a().pending.expect("pending");
        let at = |hash: &'static str, version: &'static str| Some(Observed { hash, version });
        for (p, changed_after) in [(&certain, Landing::Landed), (&uncertain, Landing::Unknown)] {
            assert_eq!(p.judge(at("h1", "v9")), Landing::Landed);
            assert_eq!(p.judge(at("hx", "h0")), Landing::NotLanded);
            assert_eq!(p.judge(None), Landing::NotLanded);
            assert_eq!(p.judge(at("h3", "h3")), changed_after);
        }
    }
}
