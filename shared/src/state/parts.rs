//! A transaction too large for one message (§2: messages never exceed the queue's limit): the
//! dedupe of its parts, and the captured parts kept in its partition until every part is there,
//! so that sequence orders the whole transaction at once.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{decode, encode, State, TX_DEDUPE_TTL_MS};
use crate::domain::change::{ChangeRef, Parts};
use crate::domain::keys;
use crate::ports::{Expect, KvError, Put};

/// How often a part's record in the `PARTS` item is tried again when other parts of the same
/// transaction are recorded at the same time.
const MAX_RACES: usize = 50;

/// Which parts of a transaction capture has kept, and in how many pieces each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Kept {
    count: u32,
    pieces: BTreeMap<u32, usize>,
}

impl State {
    /// Whether capture has handled part `index` of a transaction.
    pub async fn part_captured(&self, job: &str, app: &str, txid: &str, index: u32) -> Result<bool, KvError> {
        Ok(self.kv.get(&keys::tx_pk(job, app, txid), &keys::part_captured_sk(index)).await?.is_some())
    }

    pub fn part_mark(&self, job: &str, app: &str, txid: &str, index: u32) -> Put {
        Put { sk: keys::part_captured_sk(index), ..self.tx_mark(job, app, txid) }
    }

    /// Keeps one captured part of a transaction (its changes in `pieces`, in order, each small
    /// enough for one item) and records it; true once every part of the transaction is kept.
    /// Doing it again with the same part is harmless: the record names each part's pieces.
    pub async fn keep_part(
        &self,
        job: &str,
        app: &str,
        txid: &str,
        parts: Parts,
        pieces: Vec<Vec<ChangeRef>>,
    ) -> Result<bool, KvError> {
        let pk = keys::tx_pk(job, app, txid);
        let expires_at = Some(self.now_ms() + TX_DEDUPE_TTL_MS);
        let count = pieces.len();
        let puts = pieces
            .iter()
            .enumerate()
            .map(|(n, p)| Put {
                pk: pk.clone(),
                sk: keys::piece_sk(parts.index, n),
                body: encode(p),
                expires_at,
                expect: Expect::Any,
            })
            .collect();
        for answer in self.kv.put_many(puts).await? {
            answer?;
        }
        for _ in 0..MAX_RACES {
            let (mut kept, expect) = match self.kv.get(&pk, keys::PARTS).await? {
                Some(item) => (decode::<Kept>(&item)?, Expect::Rev(item.rev)),
                None => (Kept { count: parts.count, pieces: BTreeMap::new() }, Expect::Absent),
            };
            kept.pieces.insert(parts.index, count);
            let put = Put { pk: pk.clone(), sk: keys::PARTS.into(), body: encode(&kept), expires_at, expect };
            match self.kv.put(put).await {
                Ok(_) => return Ok(kept.pieces.len() as u64 >= u64::from(kept.count)),
                Err(KvError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(KvError::Unavailable(format!("{pk} / {}: too many parts recorded at once; try again", keys::PARTS)))
    }

    /// The changes of a kept transaction in order (part, then piece), or `None` unless every
    /// part is kept (they expire with the transaction's dedupe marks).
    pub async fn kept_changes(&self, job: &str, app: &str, txid: &str) -> Result<Option<Vec<ChangeRef>>, KvError> {
        let pk = keys::tx_pk(job, app, txid);
        let Some(item) = self.kv.get(&pk, keys::PARTS).await? else { return Ok(None) };
        let kept: Kept = decode(&item)?;
        if (kept.pieces.len() as u64) < u64::from(kept.count) {
            return Ok(None);
        }
        let wanted: Vec<(String, String)> = kept
            .pieces
            .iter()
            .flat_map(|(part, &n)| (0..n).map(move |piece| keys::piece_sk(*part, piece)))
            .map(|sk| (pk.clone(), sk))
            .collect();
        let mut changes = Vec::new();
        // A few pieces at a time: each is up to a message's size.
        for chunk in wanted.chunks(16) {
            for item in self.kv.get_many(chunk).await? {
                let Some(item) = item else { return Ok(None) };
                changes.extend(decode::<Vec<ChangeRef>>(&item)?);
            }
        }
        Ok(Some(changes))
    }
}
