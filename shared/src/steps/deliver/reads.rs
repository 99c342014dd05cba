//! Reads of records by (map, side, key), batched: one connector call per map and side.
use std::collections::{BTreeMap, HashMap};

use crate::domain::change::Key;
use crate::domain::job::Side;
use crate::ports::{ConnectorError, Record};
use crate::steps::{LoadedJob, Steps};

impl Steps {
    /// Reads records by (map index, side, key); the answers are in the order asked.
    pub(crate) async fn read_grouped<'k>(
        &self,
        lj: &LoadedJob,
        refs: impl Iterator<Item = (usize, Side, &'k Key)>,
    ) -> Vec<Result<Option<Record>, ConnectorError>> {
        let refs: Vec<(usize, Side, &Key)> = refs.collect();
        let mut groups: BTreeMap<(usize, Side), Vec<usize>> = BTreeMap::new();
        for (n, (m, s, _)) in refs.iter().enumerate() {
            groups.entry((*m, *s)).or_default().push(n);
        }
        let mut out: HashMap<usize, Result<Option<Record>, ConnectorError>> = HashMap::with_capacity(refs.len());
        // Every (map, side) at once: the calls are independent, and each may be a round trip.
        let calls = groups.iter().map(|((m, side), ns)| {
            let keys: Vec<Key> = ns.iter().map(|n| refs[*n].2.clone()).collect();
            async move { lj.connector(*side).read(lj.spec(*m, *side), &keys).await }
        });
        let answers = futures::future::join_all(calls).await;
        for (ns, answer) in groups.into_values().zip(answers) {
            match answer {
                Ok(records) => {
                    let mut records = records.into_iter();
                    for n in ns {
                        out.insert(n, Ok(records.next().flatten()));
                    }
                }
                Err(e) => {
                    for n in ns {
                        out.insert(n, Err(e.clone()));
                    }
                }
            }
        }
        (0..refs.len()).map(|n| out.remove(&n).unwrap_or(Ok(None))).collect()
    }
}
