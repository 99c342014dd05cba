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
    /// A write under way: (target side, hash being written). Set before writing to the other
    /// app, cleared by the commit; if the target holds exactly this content, the write landed
    /// and that content is the last sync, even though a crash kept the commit from happening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<(Side, String)>,
    /// Sort keys of this link's open, retriable error rows: resolved when the link next syncs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub open_errors: Vec<String>,
}

impl LinkState {
    pub fn is_synced(&self) -> bool {
        self.hash.is_some()
    }
    /// The content of the last sync, given each side's current hash (`None`: absent).
    pub fn last_synced(&self, hashes: [Option<&str>; 2]) -> Option<&str> {
        match &self.pending {
            Some((side, h)) if hashes[side.index()] == Some(h.as_str()) => Some(h),
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
