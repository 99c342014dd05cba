//! Change tracking's state per job, odata app and map: where tracking stands (the link to get
//! next) and which records it has seen (record id → integration key), since a deleted record
//! comes back named by its id alone.
use serde::{Deserialize, Serialize};

use super::{decode, encode, State};
use crate::domain::change::Key;
use crate::domain::keys;
use crate::ports::{Expect, KvError, Put, SkRange};

/// Where change tracking of one map stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackingPosition {
    /// The link to get next: a next link while an answer goes on over pages, else the delta
    /// link. `None`: tracking starts (again) with a full listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Full listings started so far; a record seen by a listing is noted with its number, so
    /// that the records a new listing no longer shows are known to be gone.
    #[serde(default)]
    pub listing: u64,
    /// True while a full listing goes on over pages (its last page ends it).
    #[serde(default)]
    pub listing_open: bool,
}

/// A record tracking has seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    key: Key,
    /// The number of the last full listing that showed it, or that was under way when a delta
    /// showed it.
    listing: u64,
}

/// Records remembered per request (a `put_many`/`get_many` call).
const CHUNK: usize = 100;

impl State {
    pub async fn tracking_position(&self, job: &str, app: &str, map: &str) -> Result<TrackingPosition, KvError> {
        match self.kv.get(&keys::tracking_pk(job, app, map), keys::STATE).await? {
            Some(item) => decode(&item),
            None => Ok(TrackingPosition::default()),
        }
    }

    pub async fn set_tracking_position(
        &self,
        job: &str,
        app: &str,
        map: &str,
        pos: &TrackingPosition,
    ) -> Result<(), KvError> {
        let put = Put {
            pk: keys::tracking_pk(job, app, map),
            sk: keys::STATE.into(),
            body: encode(pos),
            expires_at: None,
            expect: Expect::Any,
        };
        self.kv.put(put).await.map(|_| ())
    }

    /// Notes records seen (id → key) during `listing`.
    pub async fn remember_tracked(
        &self,
        job: &str,
        app: &str,
        map: &str,
        records: &[(String, Key)],
        listing: u64,
    ) -> Result<(), KvError> {
        let pk = keys::tracked_ids_pk(job, app, map);
        for chunk in records.chunks(CHUNK) {
            let puts = chunk
                .iter()
                .map(|(id, key)| Put {
                    pk: pk.clone(),
                    sk: keys::escape(id),
                    body: encode(&Seen { key: key.clone(), listing }),
                    expires_at: None,
                    expect: Expect::Any,
                })
                .collect();
            for r in self.kv.put_many(puts).await? {
                r?;
            }
        }
        Ok(())
    }

    /// The integration keys of records by id, in the order of `ids` (`None`: never seen).
    pub async fn tracked_keys(
        &self,
        job: &str,
        app: &str,
        map: &str,
        ids: &[String],
    ) -> Result<Vec<Option<Key>>, KvError> {
        let pk = keys::tracked_ids_pk(job, app, map);
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(CHUNK) {
            let wanted: Vec<(String, String)> = chunk.iter().map(|id| (pk.clone(), keys::escape(id))).collect();
            for item in self.kv.get_many(&wanted).await? {
                out.push(match item {
                    Some(i) => Some(decode::<Seen>(&i)?.key),
                    None => None,
                });
            }
        }
        Ok(out)
    }

    /// Forgets records that are gone.
    pub async fn forget_tracked(&self, job: &str, app: &str, map: &str, ids: &[String]) -> Result<(), KvError> {
        let pk = keys::tracked_ids_pk(job, app, map);
        for id in ids {
            self.kv.delete(&pk, &keys::escape(id), Expect::Any).await?;
        }
        Ok(())
    }

    /// Records last seen before full listing `listing`: when that listing is complete, these
    /// are the records it no longer showed (deleted while tracking could not tell).
    pub async fn tracked_before(
        &self,
        job: &str,
        app: &str,
        map: &str,
        listing: u64,
    ) -> Result<Vec<(String, Key)>, KvError> {
        let pk = keys::tracked_ids_pk(job, app, map);
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.kv.query(&pk, &SkRange::default(), 500, after.as_deref()).await?;
            for item in &page.items {
                let seen: Seen = decode(item)?;
                if seen.listing < listing {
                    out.push((unescape(&item.sk), seen.key));
                }
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }
}

/// The record id an escaped sort key holds.
fn unescape(sk: &str) -> String {
    let mut out = String::with_capacity(sk.len());
    let mut chars = sk.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::embedded::EmbeddedDb;
    use crate::ports::ManualClock;
    use std::sync::Arc;

    #[tokio::test]
    async fn positions_and_seen_records_round_trip_per_map() {
        let clock = ManualClock::new(1);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
        let state = State::new(Arc::new(db.kv()), Arc::new(clock));
        assert_eq!(state.tracking_position("j", "dv", "m").await.unwrap(), TrackingPosition::default());
        let pos =
            TrackingPosition { link: Some("https://x/accounts?$deltatoken=1".into()), listing: 2, listing_open: false };
        state.set_tracking_position("j", "dv", "m", &pos).await.unwrap();
        assert_eq!(state.tracking_position("j", "dv", "m").await.unwrap(), pos);
        assert_eq!(state.tracking_position("j", "dv", "other").await.unwrap(), TrackingPosition::default());

        let k = |s: &str| Key(vec![s.into()]);
        state.remember_tracked("j", "dv", "m", &[("a#1".into(), k("A-1")), ("b".into(), k("B"))], 1).await.unwrap();
        state.remember_tracked("j", "dv", "m", &[("b".into(), k("B"))], 2).await.unwrap();
        let ids = ["a#1".to_string(), "b".into(), "c".into()];
        assert_eq!(state.tracked_keys("j", "dv", "m", &ids).await.unwrap(), vec![Some(k("A-1")), Some(k("B")), None]);
        assert_eq!(state.tracked_keys("j", "dv", "other", &ids[..1]).await.unwrap(), vec![None]);
        assert_eq!(state.tracked_before("j", "dv", "m", 2).await.unwrap(), vec![("a#1".to_string(), k("A-1"))]);
        state.forget_tracked("j", "dv", "m", &ids[..1]).await.unwrap();
        assert_eq!(state.tracked_keys("j", "dv", "m", &ids[..1]).await.unwrap(), vec![None]);
    }
}
