//! Sequencing (DESIGN §2.2): order a transaction's changes parent-before-child and give each a
//! delivery lane, the link of its dependency root, so that a parent and its children stay in
//! order while unrelated records are delivered in parallel. Lanes travel in FIFO message groups
//! that are a stable bucket of the root: one root always maps to one group.
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use super::change::{encoded_len, CapturedTransaction, ChangeRef, DeliveryBatch, Key, Lane};
use super::job::{Job, TableMap};

/// FIFO message groups per job: enough for parallel delivery, few enough to pack messages.
pub const GROUPS: u64 = 16;
/// Changes per deliver message at most, to bound one message's work; bytes are bounded too.
pub const MAX_CHANGES_PER_MESSAGE: usize = 400;

/// Orders the transaction's changes into lanes and packs them into delivery batches of at most
/// `limit` bytes encoded each (the whole transaction: parent-before-child holds across it).
///
/// Order: table group, then sequence (the job's map order); lookups always point to an earlier
/// map (validated), so this is also a topological order. Of several changes to one record only
/// the latest is kept: delivery reads the record fresh anyway.
pub fn plan(job: &Job, tx: &CapturedTransaction, limit: usize) -> Vec<DeliveryBatch> {
    let mut latest: BTreeMap<(usize, &Key), &ChangeRef> = BTreeMap::new();
    for c in &tx.changes {
        let Some((idx, _)) = job.map(&c.map) else { continue };
        let slot = latest.entry((idx, &c.key)).or_insert(c);
        if c.seq > slot.seq {
            *slot = c;
        }
    }
    // BTreeMap order is (map index, key): delivery order.
    let changes: Vec<(usize, &ChangeRef)> = latest.into_iter().map(|((i, _), c)| (i, c)).collect();

    // Union-find over the changes: a child joins its parent's set.
    let mut parent: Vec<usize> = (0..changes.len()).collect();
    fn find(p: &mut [usize], i: usize) -> usize {
        let mut r = i;
        while p[r] != r {
            r = p[r];
        }
        p[i] = r;
        r
    }
    let position: BTreeMap<(usize, &Key), usize> =
        changes.iter().enumerate().map(|(pos, (i, c))| ((*i, &c.key), pos)).collect();
    fn union(p: &mut [usize], x: usize, y: usize) {
        let (a, b) = (find(p, x), find(p, y));
        if a != b {
            // The earlier change (the parent side) stays the representative.
            p[a.max(b)] = a.min(b);
        }
    }
    // The changes of one map are contiguous (sorted by map index).
    let span = |m: usize| changes.partition_point(|(i, _)| *i < m)..changes.partition_point(|(i, _)| *i <= m);
    // Maps whose changes in this transaction are already joined in one set.
    let mut joined: Vec<bool> = vec![false; job.maps.len()];
    let mut roots: Vec<(usize, Key)> = Vec::with_capacity(changes.len());
    for (pos, (map_idx, c)) in changes.iter().enumerate() {
        roots.push(root_of(job, *map_idx, &c.key));
        let map = &job.maps[*map_idx];
        for lookup in &map.lookups {
            match derived_parent_key(map, &lookup.fields, &c.key) {
                Some(k) => {
                    if let Some(&m) = position.get(&(lookup.map, &k)) {
                        union(&mut parent, pos, m);
                    }
                }
                // The parent cannot be told from the key: keep every change of the referenced
                // map in this transaction in one group with this change, which is always safe.
                // (They are joined once, so a large transaction costs no more than a small one.)
                None => {
                    let members = span(lookup.map);
                    if !joined[lookup.map] {
                        for m in members.clone().skip(1) {
                            union(&mut parent, members.start, m);
                        }
                        joined[lookup.map] = true;
                    }
                    if !members.is_empty() {
                        union(&mut parent, pos, members.start);
                    }
                }
            }
        }
    }

    let mut lanes: BTreeMap<usize, Lane> = BTreeMap::new();
    for (pos, (_, c)) in changes.iter().enumerate() {
        let rep = find(&mut parent, pos);
        let (root_map, root_key) = &roots[rep];
        let lane = lanes
            .entry(rep)
            .or_insert_with(|| Lane { root: group_id(&job.maps[*root_map].name, root_key), changes: Vec::new() });
        lane.changes.push((*c).clone());
    }
    let mut groups: BTreeMap<String, Vec<Lane>> = BTreeMap::new();
    for lane in lanes.into_values() {
        groups.entry(bucket(&lane.root)).or_default().push(lane);
    }
    groups.into_iter().flat_map(|(group, lanes)| pack(&tx.job, &group, lanes, limit)).collect()
}

/// Packs one group's lanes, in order, into deliver messages of at most `limit` bytes encoded
/// and [`MAX_CHANGES_PER_MESSAGE`] changes. A lane that fits in one message is never split; a
/// longer one goes on in the next messages of the group, in order (FIFO keeps a group's order
/// and deliver runs a root's lane across the messages of a batch). A single change larger than
/// a message alone (capture keeps keys far shorter) gets a message of its own.
fn pack(job: &str, group: &str, lanes: Vec<Lane>, limit: usize) -> Vec<DeliveryBatch> {
    let empty = DeliveryBatch { job: job.to_string(), group: group.to_string(), lanes: vec![] };
    let overhead = encoded_len(&empty);
    let mut out = vec![empty.clone()];
    // Bytes and changes of the last message.
    let (mut bytes, mut count) = (overhead, 0usize);
    for lane in lanes {
        let lane_overhead = encoded_len(&Lane { root: lane.root.clone(), changes: vec![] });
        let sizes: Vec<usize> = lane.changes.iter().map(encoded_len).collect();
        let whole = lane_overhead + sizes.iter().sum::<usize>() + sizes.len().saturating_sub(1);
        let started = |out: &[DeliveryBatch]| out.last().is_some_and(|b| !b.lanes.is_empty());
        let sep = usize::from(started(&out));
        if started(&out) && (bytes + sep + whole > limit || count + sizes.len() > MAX_CHANGES_PER_MESSAGE) {
            out.push(empty.clone());
            (bytes, count) = (overhead, 0);
        }
        // Whether the last message's last lane is a piece of this lane.
        let mut piece = false;
        for (c, size) in lane.changes.into_iter().zip(sizes) {
            let mut add = if piece { 1 + size } else { usize::from(started(&out)) + lane_overhead + size };
            if started(&out) && (bytes + add > limit || count + 1 > MAX_CHANGES_PER_MESSAGE) {
                out.push(empty.clone());
                (bytes, count, piece) = (overhead, 0, false);
                add = lane_overhead + size;
            }
            let last = out.last_mut().expect("one message at least");
            if !piece {
                last.lanes.push(Lane { root: lane.root.clone(), changes: vec![] });
                piece = true;
            }
            last.lanes.last_mut().expect("a lane was pushed").changes.push(c);
            bytes += add;
            count += 1;
        }
    }
    out.retain(|b| !b.lanes.is_empty());
    out
}

/// The FIFO message group of a root: a stable bucket of its id.
pub fn bucket(root: &str) -> String {
    let n = u64::from_str_radix(root.get(2..18).unwrap_or("0"), 16).unwrap_or(0);
    format!("b{:02}", n % GROUPS)
}

/// The dependency root of a record, following lookups whose fields are all part of the
/// record's own key (an order line's key holds its header's key): no read needed, and it holds
/// across transactions, so a line changed later still queues behind its header.
pub fn root_of(job: &Job, map_idx: usize, key: &Key) -> (usize, Key) {
    let (mut idx, mut key) = (map_idx, key.clone());
    loop {
        let map = &job.maps[idx];
        let next = map.lookups.iter().find_map(|l| derived_parent_key(map, &l.fields, &key).map(|k| (l.map, k)));
        match next {
            Some((p, k)) if p < idx => (idx, key) = (p, k),
            _ => return (idx, key),
        }
    }
}

/// The referenced key when every lookup field is one of the map's key fields.
fn derived_parent_key(map: &TableMap, lookup_fields: &[[String; 2]], key: &Key) -> Option<Key> {
    lookup_fields
        .iter()
        .map(|f| map.keys.iter().position(|k| k[0] == f[0]).and_then(|i| key.0.get(i).cloned()))
        .collect::<Option<Vec<_>>>()
        .map(Key)
}

/// A FIFO message group id for a root link: short and free of user characters.
pub fn group_id(map: &str, key: &Key) -> String {
    format!("g-{}", short_hash(&[map.as_bytes(), serde_json::to_string(&key.0).unwrap_or_default().as_bytes()]))
}

/// A deduplication id for a delivery batch: same changes, same id.
pub fn dedup_id(batch: &DeliveryBatch) -> String {
    let mut parts: Vec<Vec<u8>> = vec![batch.job.as_bytes().to_vec()];
    for c in batch.lanes.iter().flat_map(|l| &l.changes) {
        parts.push(
            format!("{}|{:?}|{}|{}", c.map, c.source, serde_json::to_string(&c.key.0).unwrap_or_default(), c.seq)
                .into_bytes(),
        );
    }
    short_hash(&parts.iter().map(|p| p.as_slice()).collect::<Vec<_>>())
}

/// Hex of the first 16 bytes of SHA-256 over length-prefixed parts (so parts cannot run together).
pub fn short_hash(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::change::MAX_MESSAGE_BYTES;
    use crate::domain::job::{App, ConnectorSpec, Lookup, Mode, Side};

    fn map(name: &str, keys: &[&str], lookups: Vec<Lookup>) -> TableMap {
        TableMap {
            name: name.into(),
            group: "g".into(),
            group_index: 0,
            sequence: 0,
            entity: [name.into(), name.into()],
            keys: keys.iter().map(|k| [k.to_string(), k.to_string()]).collect(),
            fields: vec![],
            lookups,
            company: None,
            mode: Mode::Async,
            event_names: Default::default(),
        }
    }

    fn job() -> Job {
        let app = |n: &str| App {
            name: n.into(),
            connector: ConnectorSpec::Sqlite { path: "x".into() },
            ingress: None,
            tracking: None,
        };
        Job {
            name: "j".into(),
            apps: [app("a"), app("b")],
            primary: Side::A,
            companies: vec![],
            alert: None,
            maps: vec![
                map("customers", &["Cust"], vec![]),
                map(
                    "headers",
                    &["Order"],
                    vec![Lookup { map: 0, fields: vec![["Cust".into(), "Cust".into()]], bind: [None, None] }],
                ),
                map(
                    "lines",
                    &["Order", "Line"],
                    vec![Lookup { map: 1, fields: vec![["Order".into(), "Order".into()]], bind: [None, None] }],
                ),
            ],
        }
    }

    fn change(map: &str, key: &[&str], seq: u64) -> ChangeRef {
        ChangeRef {
            map: map.into(),
            source: Side::A,
            key: Key(key.iter().map(|s| s.to_string()).collect()),
            seq,
            txid: "t".into(),
            at_ms: 0,
            retry_of: None,
            waited: false,
        }
    }

    fn tx(changes: Vec<ChangeRef>) -> CapturedTransaction {
        CapturedTransaction { job: "j".into(), source: Side::A, txid: "t".into(), changes, stored: None }
    }

    fn planned(t: &CapturedTransaction) -> Vec<DeliveryBatch> {
        plan(&job(), t, MAX_MESSAGE_BYTES)
    }

    /// Every message within `limit`, every change exactly once, and each root's changes in
    /// the order one unsplit lane would have them.
    fn assert_split_well(batches: &[DeliveryBatch], limit: usize, unsplit: &[Lane]) {
        for b in batches {
            let len = serde_json::to_string(b).unwrap().len();
            assert!(len <= limit, "message of {len} bytes over {limit}");
            assert!(b.lanes.iter().all(|l| bucket(&l.root) == b.group));
            assert!(b.lanes.iter().map(|l| l.changes.len()).sum::<usize>() <= MAX_CHANGES_PER_MESSAGE);
        }
        let mut by_root: BTreeMap<&str, Vec<&ChangeRef>> = BTreeMap::new();
        for l in batches.iter().flat_map(|b| &b.lanes) {
            by_root.entry(&l.root).or_default().extend(&l.changes);
        }
        assert_eq!(by_root.len(), unsplit.len());
        for l in unsplit {
            let got = &by_root[l.root.as_str()];
            assert_eq!(got.len(), l.changes.len(), "root {}", l.root);
            assert!(got.iter().zip(&l.changes).all(|(a, b)| *a == b), "root {} out of order", l.root);
        }
    }

    fn order(n: usize, lines: usize) -> Vec<ChangeRef> {
        let o = format!("O{n}");
        let mut v = vec![change("headers", &[&o], 1)];
        v.extend((0..lines).map(|i| change("lines", &[&o, &format!("{i:05}")], 2 + i as u64)));
        v
    }

    #[test]
    fn a_lane_longer_than_a_message_goes_on_in_the_next_messages_of_its_group_in_order() {
        let t = tx(order(1, 3000));
        // One lane: the header, then its lines in key order.
        let whole = vec![Lane { root: group_id("headers", &Key(vec!["O1".into()])), changes: order(1, 3000) }];
        for limit in [MAX_MESSAGE_BYTES, 4096, 600] {
            let batches = plan(&job(), &t, limit);
            assert!(batches.len() > 1, "limit {limit}");
            assert!(batches.iter().all(|b| b.group == batches[0].group));
            assert_split_well(&batches, limit, &whole);
            assert_eq!(batches[0].lanes[0].changes[0].map, "headers", "the header goes first");
        }
    }

    #[test]
    fn lanes_that_fit_stay_whole_and_big_ones_split_among_many_roots() {
        let mut changes = Vec::new();
        for n in 0..40 {
            changes.extend(order(n, (n * 37) % 90));
        }
        let t = tx(changes);
        let whole = lanes(plan(&job(), &t, usize::MAX));
        let limit = 3000;
        let batches = plan(&job(), &t, limit);
        assert_split_well(&batches, limit, &whole);
        // A lane that fits in one message is in one message.
        for l in &whole {
            let alone = DeliveryBatch { job: "j".into(), group: bucket(&l.root), lanes: vec![l.clone()] };
            if serde_json::to_string(&alone).unwrap().len() <= limit {
                let holding = batches.iter().filter(|b| b.lanes.iter().any(|x| x.root == l.root)).count();
                assert_eq!(holding, 1, "root {}", l.root);
            }
        }
    }

    #[test]
    fn parent_before_child_and_one_group_per_order() {
        let t = tx(vec![
            change("lines", &["O1", "2"], 5),
            change("lines", &["O2", "1"], 6),
            change("headers", &["O1"], 3),
            change("lines", &["O1", "1"], 4),
            change("headers", &["O2"], 7),
        ]);
        let lanes = lanes(planned(&t));
        assert_eq!(lanes.len(), 2, "{lanes:?}");
        for l in &lanes {
            assert_eq!(l.changes[0].map, "headers");
            assert!(l.changes[1..].iter().all(|c| c.map == "lines" && c.key.0[0] == l.changes[0].key.0[0]));
        }
        assert_ne!(lanes[0].root, lanes[1].root);
    }

    #[test]
    fn a_line_alone_queues_behind_its_header_across_transactions() {
        let alone = planned(&tx(vec![change("lines", &["O1", "3"], 9)]));
        let header = planned(&tx(vec![change("headers", &["O1"], 1)]));
        assert_eq!(alone[0].lanes[0].root, header[0].lanes[0].root);
        assert_eq!(alone[0].group, header[0].group);
    }

    #[test]
    fn non_key_lookups_within_a_transaction_share_a_group() {
        let t =
            tx(vec![change("headers", &["O1"], 2), change("customers", &["C1"], 1), change("customers", &["C2"], 3)]);
        let lanes = lanes(planned(&t));
        assert_eq!(lanes.len(), 1);
        let maps: Vec<&str> = lanes[0].changes.iter().map(|c| c.map.as_str()).collect();
        assert_eq!(maps, ["customers", "customers", "headers"]);
    }

    #[test]
    fn only_the_latest_change_of_a_record_is_kept() {
        let lanes = lanes(planned(&tx(vec![change("customers", &["C1"], 1), change("customers", &["C1"], 4)])));
        assert_eq!(lanes.len(), 1);
        assert_eq!(lanes[0].changes.len(), 1);
        assert_eq!(lanes[0].changes[0].seq, 4);
    }

    #[test]
    fn unrelated_roots_share_few_messages_and_each_root_one_group() {
        let changes: Vec<ChangeRef> = (0..200).map(|i| change("customers", &[&format!("C{i}")], i)).collect();
        let batches = planned(&tx(changes));
        assert!(batches.len() <= GROUPS as usize, "{}", batches.len());
        assert_eq!(batches.iter().map(|b| b.lanes.len()).sum::<usize>(), 200);
        for b in &batches {
            assert!(b.lanes.iter().all(|l| bucket(&l.root) == b.group));
        }
    }

    fn lanes(batches: Vec<DeliveryBatch>) -> Vec<Lane> {
        batches.into_iter().flat_map(|b| b.lanes).collect()
    }

    #[test]
    fn dedup_id_depends_on_the_changes() {
        let a = planned(&tx(vec![change("customers", &["C1"], 1)]));
        let b = planned(&tx(vec![change("customers", &["C1"], 2)]));
        assert_eq!(dedup_id(&a[0]), dedup_id(&a[0].clone()));
        assert_ne!(dedup_id(&a[0]), dedup_id(&b[0]));
    }
}
