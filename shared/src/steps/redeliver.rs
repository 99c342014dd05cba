//! Redeliveries dualsync makes itself (retry requests, children waiting for their parent): the
//! changes go back on the deliver queue in dependency order, exactly as sequence orders a
//! transaction (table group, sequence, lookups), whatever order they were found in. A retry
//! request selects rows in the order they were first seen, and an order line first seen before
//! its header would otherwise fail again behind it.
use std::collections::HashSet;

use crate::domain::change::{CapturedTransaction, ChangeRef, Key, MAX_MESSAGE_BYTES};
use crate::domain::job::Job;
use crate::domain::sequence::{plan, short_hash};
use crate::ports::OutMessage;

/// One transaction's worth of changes, with the records it holds (each at most once).
type Round = (HashSet<(String, Key)>, Vec<ChangeRef>);

/// Deliver-queue messages for `changes`, planned as one transaction so that parents go before
/// their children and a parent and its children share a lane. `tag` names the redelivery (a
/// request id, a parent link) and makes the deduplication ids its own: a redelivery must not be
/// taken for a duplicate of the original delivery.
pub fn redelivery(job: &Job, changes: Vec<ChangeRef>, tag: &str) -> Vec<OutMessage> {
    // Sequence keeps one change per record (it reads fresh anyway); a redelivery must send every
    // change, since each settles its own row. Records that repeat go in later rounds.
    let mut rounds: Vec<Round> = Vec::new();
    for c in changes {
        let record = (c.map.clone(), c.key.clone());
        match rounds.iter_mut().find(|(seen, _)| !seen.contains(&record)) {
            Some((seen, round)) => {
                seen.insert(record);
                round.push(c)
            }
            None => rounds.push((HashSet::from([record]), vec![c])),
        }
    }
    let mut out = Vec::new();
    for (n, (_, changes)) in rounds.into_iter().enumerate() {
        let source = changes[0].source;
        let tx = CapturedTransaction {
            job: job.name.clone(),
            source,
            txid: format!("redeliver-{tag}"),
            changes,
            stored: None,
        };
        for (b, batch) in plan(job, &tx, MAX_MESSAGE_BYTES).into_iter().enumerate() {
            let body = serde_json::to_string(&batch).unwrap_or_default();
            let dedup = short_hash(&[tag.as_bytes(), format!("{n}/{b}").as_bytes(), body.as_bytes()]);
            out.push(OutMessage::fifo(body, batch.group, dedup));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::change::DeliveryBatch;
    use crate::domain::config::{compile, parse_job};
    use crate::domain::job::Side;

    const JOB: &str = "job: j
apps: [{ name: a, connector: sqlite, path: A }, { name: b, connector: sqlite, path: B }]
primary: a
table_groups:
  - name: g
    maps:
      - { name: customers, sequence: 1, entities: { a: c, b: c }, keys: [{ a: id, b: id }] }
      - name: headers
        sequence: 2
        entities: { a: h, b: h }
        keys: [{ a: id, b: id }]
        fields: [{ a: cust, b: cust }]
        lookups: [{ map: customers, fields: [{ a: cust, b: cust }] }]
      - name: lines
        sequence: 3
        entities: { a: l, b: l }
        keys: [{ a: id, b: id }, { a: no, b: no }]
        lookups: [{ map: headers, fields: [{ a: id, b: id }] }]
";

    fn change(map: &str, key: &[&str], row: &str) -> ChangeRef {
        ChangeRef {
            map: map.into(),
            source: Side::B,
            key: Key(key.iter().map(|k| k.to_string()).collect()),
            seq: 1,
            txid: "t".into(),
            at_ms: 0,
            retry_of: Some(row.into()),
            waited: false,
        }
    }

    /// Rows as a retry request finds them (first seen order: the line failed first), sent in
    /// dependency order: per FIFO group, the customer before the header before its lines.
    #[test]
    fn children_follow_their_parents_whatever_the_input_order() {
        let job = compile("job.yaml", &parse_job("job.yaml", JOB).unwrap()).unwrap();
        let rows = vec![
            change("lines", &["O1", "1"], "r1"),
            change("lines", &["O1", "2"], "r2"),
            change("headers", &["O1"], "r3"),
            change("customers", &["C1"], "r4"),
            change("lines", &["O1", "1"], "r5"),
        ];
        let out = redelivery(&job, rows, "req-1");
        let mut order: Vec<(String, String)> = Vec::new();
        for m in &out {
            let b: DeliveryBatch = serde_json::from_str(&m.body).unwrap();
            assert_eq!(m.group.as_deref(), Some(b.group.as_str()));
            for l in b.lanes {
                order.extend(l.changes.into_iter().map(|c| (c.map, c.retry_of.unwrap())));
            }
        }
        // Every row goes out once, the repeated record in a later message.
        let mut rows: Vec<&str> = order.iter().map(|(_, r)| r.as_str()).collect();
        rows.sort();
        assert_eq!(rows, ["r1", "r2", "r3", "r4", "r5"]);
        let at = |r: &str| order.iter().position(|(_, x)| x == r).unwrap();
        assert!(at("r3") < at("r1") && at("r3") < at("r2") && at("r1") < at("r5"), "{order:?}");
        // The header and its lines share a FIFO group, so the queue keeps that order.
        let group = |r: &str| {
            out.iter()
                .find(|m| m.body.contains(&format!("\"retry_of\":\"{r}\"")))
                .and_then(|m| m.group.clone())
                .unwrap()
        };
        assert_eq!(group("r1"), group("r3"));
        assert_eq!(group("r2"), group("r3"));
        // The repeated record goes in a later message (its own root's group: it is a line alone
        // now, behind its header's root, and a line that finds its header missing waits for it).
        let message = |r: &str| out.iter().position(|m| m.body.contains(&format!("\"retry_of\":\"{r}\""))).unwrap();
        assert!(message("r5") > message("r3"));
        // Deduplication ids are the redelivery's own: a retry is not a duplicate of the original.
        let again = redelivery(&job, vec![change("customers", &["C1"], "r4")], "req-2");
        let first = out.iter().find(|m| m.body.contains("\"r4\"")).unwrap();
        assert_ne!(again[0].dedup_id, first.dedup_id);
    }
}
