//! The pure part of delivery (DESIGN §3, steps 3 and 4): given the hashes of the two records and
//! the link state, what to do.
use super::job::Side;
use super::link::LinkState;

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

/// `h_source`: hash of the source record (read fresh); `h_other`: hash of the other side's
/// record, `None` when it does not exist.
pub fn decide(
    link: Option<&LinkState>,
    source: Side,
    primary: Side,
    h_source: &str,
    h_other: Option<&str>,
) -> Decision {
    let Some(h_other) = h_other else {
        return Decision::Write { conflict: false };
    };
    if h_source == h_other {
        return Decision::InStep;
    }
    let mut hashes = [None, None];
    hashes[source.index()] = Some(h_source);
    hashes[source.other().index()] = Some(h_other);
    let last = link.and_then(|l| l.last_synced(hashes));
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

    fn link(hash: &str) -> LinkState {
        LinkState { hash: Some(hash.into()), ..Default::default() }
    }

    #[test]
    fn every_branch_of_step_3_and_4() {
        let l = link("h0");
        let (a, b) = (Side::A, Side::B);
        assert_eq!(decide(Some(&l), a, a, "h1", None), Decision::Write { conflict: false });
        assert_eq!(decide(Some(&l), a, a, "h1", Some("h1")), Decision::InStep);
        assert_eq!(decide(Some(&l), a, a, "h1", Some("h0")), Decision::Write { conflict: false });
        assert_eq!(decide(Some(&l), b, a, "h0", Some("h1")), Decision::OtherSideChanged);
        assert_eq!(decide(Some(&l), a, a, "h1", Some("h2")), Decision::Write { conflict: true });
        assert_eq!(decide(Some(&l), b, a, "h2", Some("h1")), Decision::ConflictLost);
        // No link yet, both exist and differ: a conflict too.
        assert_eq!(decide(None, a, a, "h1", Some("h2")), Decision::Write { conflict: true });
        assert_eq!(decide(None, b, a, "h1", Some("h2")), Decision::ConflictLost);
        assert_eq!(decide(Some(&LinkState::default()), b, a, "h1", Some("h2")), Decision::ConflictLost);
    }

    #[test]
    fn a_write_that_landed_before_a_crash_counts_as_the_last_sync() {
        // B's content h1 was being written to A when the process died; B then changed to h2.
        let mut l = link("h0");
        l.pending = Some((Side::A, "h1".into()));
        assert_eq!(decide(Some(&l), Side::B, Side::A, "h2", Some("h1")), Decision::Write { conflict: false });
        // The write did not land: A still holds h0, the last real sync.
        assert_eq!(decide(Some(&l), Side::B, Side::A, "h2", Some("h0")), Decision::Write { conflict: false });
        // A changed on its own meanwhile: a real conflict.
        assert_eq!(decide(Some(&l), Side::B, Side::A, "h2", Some("h3")), Decision::ConflictLost);
    }
}
