//! Link state: what dualsync remembers of a pair of records (DESIGN §1).
use serde::{Deserialize, Serialize};

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
}

/// A write to `side` of content `hash`, conditional on the record being at `from_version`
/// (`None`: create-only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingWrite {
    pub side: Side,
    pub hash: String,
    pub from_version: Option<String>,
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
    /// was made first and then edited. (The one case this misjudges needs a crash right after
    /// the app refused the write because someone else had just changed the record; delivery
    /// takes the mark back in that case when it lives to see it.)
    pub fn landed(&self, target: Option<Observed<'_>>) -> bool {
        match target {
            Some(t) if t.hash == self.hash => true,
            Some(t) => self.from_version.as_deref() != Some(t.version),
            None => false,
        }
    }
}

impl LinkState {
    pub fn is_synced(&self) -> bool {
        self.hash.is_some()
    }

    /// This state with its pending write settled against the records now (indexed by side):
    /// if it landed, its content is the last sync.
    pub fn settled(&self, records: [Option<Observed<'_>>; 2]) -> LinkState {
        let mut s = self.clone();
        if let Some(p) = s.pending.take() {
            if p.landed(records[p.side.index()]) {
                s.hash = Some(p.hash);
            }
        }
        s
    }

    /// The content of the last sync, given the records now (indexed by side).
    pub fn last_synced(&self, records: [Option<Observed<'_>>; 2]) -> Option<&str> {
        match &self.pending {
            Some(p) if p.landed(records[p.side.index()]) => Some(&p.hash),
            _ => self.hash.as_deref(),
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
