//! Compares the two apps of a job map by map: how many records each side holds and how many
//! pairs are in step (equal canonical content). Used by the demo, the benchmark and the tests.
use std::collections::BTreeMap;

use crate::domain::canon::{canon, hash, record_key};
use crate::domain::change::Key;
use crate::domain::job::Side;
use crate::ports::ConnectorError;
use crate::steps::LoadedJob;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapComparison {
    pub map: String,
    /// Records on side A and side B.
    pub records: [usize; 2],
    /// Keys present on both sides with equal content.
    pub in_step: usize,
    /// Keys present on both sides with different content.
    pub differ: Vec<Key>,
    /// Keys present on one side only (A, B).
    pub only: [Vec<Key>; 2],
}

impl MapComparison {
    pub fn all_in_step(&self) -> bool {
        self.differ.is_empty() && self.only.iter().all(Vec::is_empty)
    }
}

/// Reads every record of every map on both sides.
pub async fn compare(lj: &LoadedJob) -> Result<Vec<MapComparison>, ConnectorError> {
    let mut out = Vec::new();
    for (m, map) in lj.job.maps.iter().enumerate() {
        let mut sides: [BTreeMap<Key, String>; 2] = Default::default();
        for side in Side::BOTH {
            let mut after: Option<String> = None;
            loop {
                let page = lj.connector(side).list(lj.spec(m, side), after.as_deref(), 2000).await?;
                for (key, r) in &page.records {
                    let h =
                        canon(map, side, &r.fields).map(|c| hash(&c)).unwrap_or_else(|e| format!("unmappable: {e}"));
                    let key = record_key(map, side, &r.fields).unwrap_or_else(|| key.clone());
                    sides[side.index()].insert(key, h);
                }
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        let mut cmp =
            MapComparison { map: map.name.clone(), records: [sides[0].len(), sides[1].len()], ..Default::default() };
        for (k, h) in &sides[0] {
            match sides[1].get(k) {
                Some(h2) if h2 == h => cmp.in_step += 1,
                Some(_) => cmp.differ.push(k.clone()),
                None => cmp.only[0].push(k.clone()),
            }
        }
        cmp.only[1] = sides[1].keys().filter(|k| !sides[0].contains_key(*k)).cloned().collect();
        out.push(cmp);
    }
    Ok(out)
}
