//! Link state: what dualsync remembers of a pair of records (DESIGN §1).
use serde::{Deserialize, Serialize};

use super::change::ChangeRef;
use super::job::Side;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// Hash of the canonical content at the last sync; `None` until the first sync.
    #[serde(default)]
    pub hash: Option<String>,
    /// Each side's version (etag) right after the last sync.
    #[serde(default)]
    pub version: [Option<String>; 2],
    /// Highest change seq captured per side.
    #[serde(default)]
    pub seen: [u64; 2],
    /// Seq of the change last synced per side.
    #[serde(default)]
    pub synced: [u64; 2],
    /// The last write to one side, recorded on the link before it was made: the only link
    /// write of an ordinary delivery (DESIGN §4: one conditional link write per change). Whether
    /// it landed is read off the target record when it is next needed, see [`Self::settled`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingWrite>,
    /// Sort keys of this link's open, retriable error rows: resolved when the link next syncs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_errors: Vec<String>,
    /// Children whose delivery found this record missing on the other side: delivered again
    /// once this record exists on both sides (DESIGN §3 step 5, "retriable once the parent has
    /// synced", done without an operator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiters: Vec<ChangeRef>,
}

/// A write to `side` of content `hash`, conditional on the record being at `from_version`
/// (`None`: create-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWrite {
    pub side: Side,
    pub hash: String,
    pub from_version: Option<String>,
    /// The write failed in a way that may or may not have landed (a time-out, a 5xx). Such a
    /// mark proves nothing about a later change of the target: see [`PendingWrite::judge`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub uncertain: bool,
    /// A create of content `side` held before (the last sync's, or our earlier write's there):
    /// the record, gone from `side`, written back from the other side unchanged since (an
    /// echo, a change sent again). A user's delete on `side` wins over it (capture's `ours`). A
    /// create of other content is the other side's newer change, which wins over a delete made
    /// before it reached `side`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restores: bool,
}

/// What a pending write's target record says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Landing {
    /// The target holds the written content, or changed after a write that was made.
    Landed,
    /// The target is still at the version the write was conditional on, or absent.
    NotLanded,
    /// The target changed, and the write may never have been made: whether the change came
    /// before or after it cannot be told, so the last sync is unknown (both sides changed),
    /// unless the write was of the content last synced ([`LinkState::last_synced`]).
    Unknown,
}

/// A record as delivery reads it: the hash of its canonical content and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed<'a> {
    pub hash: &'a str,
    pub version: &'a str,
}

impl PendingWrite {
    /// Whether the write landed, judged from the target record now (`None`: absent).
    ///
    /// It holds the written content: landed. It is still at the version the write was
    /// conditional on: not landed (it failed, or the process died before making it). Otherwise
    /// the record changed after the read: since the write was conditional on that version, it
    /// was made first and then edited.
    ///
    /// That last judgement holds only for a write that was made. Delivery takes the mark back
    /// when the app refuses the write, and marks it `uncertain` when the write failed in a way
    /// that may or may not have landed (a time-out, a 5xx); for such a mark "changed after" is
    /// [`Landing::Unknown`]. What is left is a process killed between the mark and the write's
    /// answer, with the target edited before the change is delivered again: that edit is taken
    /// for one made on top of the write (docs/design-notes.md §3).
    pub fn judge(&self, target: Option<Observed<'_>>) -> Landing {
        match target {
            Some(t) if t.hash == self.hash => Landing::Landed,
            Some(t) if self.from_version.as_deref() == Some(t.version) => Landing::NotLanded,
            None => Landing::NotLanded,
            Some(_) if self.uncertain => Landing::Unknown,
            Some(_) => Landing::Landed,
        }
    }
}

impl LinkState {
    pub fn is_synced(&self) -> bool {
        self.hash.is_some()
    }

    /// Whether delivering change `seq` from `source`, which finds both records in step (or the
    /// other side changed on top of a write it judges landed), must commit the link even though
    /// its settled state says nothing new: when the pending mark is
    /// uncertain (left, it would judge a later edit of its target as unknown), and when the
    /// change is the one that made the mark, coming again (a retry, or a redelivery racing the
    /// delivery still under way). That delivery may still be waiting for the write's answer,
    /// and a time-out makes it mark the write uncertain, conditional on the link's revision:
    /// without a commit here, that mark would land after the message was acknowledged, on a
    /// link whose write is known to have landed, and a later edit of its target would be judged
    /// unknown, a conflict whose primary has no change left to send. An echo of a landed write
    /// (from the write's target) and later changes of the source still cost no link write.
    pub fn commit_when_in_step(&self, source: Side, seq: u64) -> bool {
        self.pending.as_ref().is_some_and(|p| p.uncertain || (p.side != source && self.synced[source.index()] == seq))
    }

    /// Whether the pending mark is a create on the other side that change `seq` from `source`
    /// made itself. That change, coming again (a redelivery racing the delivery under way, a
    /// retry after a time-out), may find neither record while the create is still to land.
    pub fn creating_from(&self, source: Side, seq: u64) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.side != source && p.from_version.is_none() && self.synced[source.index()] == seq)
    }

    /// What a commit of content `hash`, in step on both sides, keeps of the pending mark: a
    /// create of that content, now certain (its target holds it). It is what tells a live delete
    /// from the create's target that the record there is dualsync's own create, made after the
    /// user's delete from the other side's older state (capture's `ours`), and a delete from the
    /// other side that our create may be under way (`creating`). Dropped by a commit, the create
    /// passed for the user's record, and the delete was skipped as stale: the record came back.
    pub fn kept_in_step(&self, hash: &str) -> Option<PendingWrite> {
        let p = self.pending.as_ref().filter(|p| p.from_version.is_none() && p.hash == hash)?;
        Some(PendingWrite { uncertain: false, ..p.clone() })
    }

    /// Whether `hash` is content this link synced: its last sync's, or its pending write's
    /// (made to one side from the other's record).
    pub fn synced_content(&self, hash: &str) -> bool {
        self.hash.as_deref() == Some(hash) || self.pending.as_ref().is_some_and(|p| p.hash == hash)
    }

    /// This state with its pending write settled against the records now (indexed by side):
    /// if it landed, its content is the last sync.
    pub fn settled(&self, records: [Option<Observed<'_>>; 2]) -> LinkState {
        let hash = self.last_synced(records).map(str::to_string);
        LinkState { hash, pending: None, ..self.clone() }
    }

    /// Whether the last sync cannot be told because of the pending mark (an uncertain write
    /// whose target changed since, of content other than the last sync's): a conflict decided
    /// then may be one whose primary has no change left to send.
    pub fn landing_unknown(&self, records: [Option<Observed<'_>>; 2]) -> bool {
        let unknown = self.pending.as_ref().is_some_and(|p| p.judge(records[p.side.index()]) == Landing::Unknown);
        unknown && self.last_synced(records).is_none()
    }

    /// The content of the last sync, given the records now (indexed by side). A write whose
    /// landing is unknown leaves it unknown, unless the write was of the content the link last
    /// synced: landed or not, that content is the last sync then (a change re-sending it, such
    /// as one creating the record again on a side that deleted it after the last sync).
    pub fn last_synced(&self, records: [Option<Observed<'_>>; 2]) -> Option<&str> {
        match &self.pending {
            Some(p) => match p.judge(records[p.side.index()]) {
                Landing::Landed => Some(&p.hash),
                Landing::NotLanded => self.hash.as_deref(),
                Landing::Unknown => self.hash.as_deref().filter(|h| *h == p.hash),
            },
            None => self.hash.as_deref(),
        }
    }
    pub fn version(&self, side: Side) -> Option<&str> {
        self.version[side.index()].as_deref()
    }
    pub fn seen(&self, side: Side) -> u64 {
        self.seen[side.index()]
    }
    /// Raises the highest seen seq of `side`; true if it changed.
    pub fn raise_seen(&mut self, side: Side, seq: u64) -> bool {
        let s = &mut self.seen[side.index()];
        if seq > *s {
            *s = seq;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A's change seq 5 wrote content h1 to B as a create; the mark as delivery left it.
    fn created_on_b(uncertain: bool) -> LinkState {
        LinkState {
            synced: [5, 0],
            pending: Some(PendingWrite {
                side: Side::B,
                hash: "h1".into(),
                from_version: None,
                uncertain,
                restores: false,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn an_in_step_delivery_commits_when_the_mark_is_uncertain_or_its_own_change_comes_again() {
        let certain = created_on_b(false);
        assert!(certain.commit_when_in_step(Side::A, 5), "the change that made the mark, again");
        assert!(!certain.commit_when_in_step(Side::A, 6), "a later change of the source");
        assert!(!certain.commit_when_in_step(Side::B, 3), "the echo of the write");
        let uncertain = created_on_b(true);
        assert!(uncertain.commit_when_in_step(Side::B, 3) && uncertain.commit_when_in_step(Side::A, 6));
        assert!(!LinkState::default().commit_when_in_step(Side::A, 5));
    }

    #[test]
    fn an_uncertain_write_of_the_content_last_synced_leaves_that_content_the_last_sync() {
        // B's change wrote h1, the content synced last, to A (which had deleted the record): a
        // create that timed out. A's user then created the record with h2.
        let l = LinkState {
            hash: Some("h1".into()),
            pending: Some(PendingWrite {
                side: Side::A,
                hash: "h1".into(),
                from_version: None,
                uncertain: true,
                restores: false,
            }),
            ..Default::default()
        };
        let now = [Some(Observed { hash: "h2", version: "v2" }), Some(Observed { hash: "h1", version: "v1" })];
        assert_eq!(l.last_synced(now), Some("h1"), "landed or not, h1");
        assert_eq!(l.settled(now), LinkState { pending: None, ..l.clone() });
        // A write of other content: whether h0 or h1 was synced last is unknown.
        let other = LinkState { hash: Some("h0".into()), ..l };
        assert_eq!(other.last_synced(now), None);
        assert_eq!(other.settled(now).hash, None);
    }

    #[test]
    fn an_in_step_commit_keeps_a_create_mark_of_its_content_made_certain() {
        let kept = created_on_b(true).kept_in_step("h1").expect("kept");
        assert!(!kept.uncertain && kept.side == Side::B && kept.from_version.is_none());
        assert_eq!(created_on_b(false).kept_in_step("h2"), None, "other content");
        let mut update = created_on_b(false);
        update.pending.as_mut().expect("mark").from_version = Some("v1".into());
        assert_eq!(update.kept_in_step("h1"), None, "an update");
    }
}
