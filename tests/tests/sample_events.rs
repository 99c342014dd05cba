//! The sample SQS events in `infra/events/` (for `cargo lambda invoke --data-file` and
//! `sam local invoke -e`) stay true to the code: every body parses into the message type its
//! queue carries and says nothing those types would drop, names maps, entities and keys of
//! `examples/sales.yaml`, and the deliver sample is exactly what sequence plans for the sequence
//! sample (groups, roots, deduplication ids).
use std::path::PathBuf;

use dualsync::domain::change::{CapturedTransaction, DeliveryBatch, TransactionNotification, MAX_MESSAGE_BYTES};
use dualsync::domain::config::{compile, parse_job};
use dualsync::domain::job::{Job, Side};
use dualsync::domain::sequence::{dedup_id, plan};
use dualsync::steps::reconcile::ReconcileMessage;
use serde_json::Value;

const STAGE_ARN: &str = "arn:aws:sqs:us-east-1:123456789012:dualsync-dev-";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn job() -> Job {
    let text = std::fs::read_to_string(root().join("examples/sales.yaml")).expect("examples/sales.yaml");
    let def = parse_job("examples/sales.yaml", &text).expect("job parses");
    compile("examples/sales.yaml", &def).expect("job compiles")
}

/// The records of `infra/events/<name>.json`, after checking the SQS envelope of each.
fn records(name: &str, queue: &str) -> Vec<Value> {
    let path = root().join("infra/events").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let event: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let records = event["Records"].as_array().unwrap_or_else(|| panic!("{name}: no Records")).clone();
    assert!(!records.is_empty(), "{name}: no records");
    let fifo = queue.ends_with(".fifo");
    for r in &records {
        assert_eq!(r["eventSource"], "aws:sqs", "{name}");
        assert_eq!(r["eventSourceARN"], format!("{STAGE_ARN}{queue}"), "{name}");
        assert_eq!(r["awsRegion"], "us-east-1", "{name}");
        for field in ["messageId", "receiptHandle", "body", "md5OfBody"] {
            assert!(r[field].is_string(), "{name}: {field} missing");
        }
        assert!(r["messageAttributes"].is_object(), "{name}: messageAttributes missing");
        let attrs = &r["attributes"];
        for field in ["ApproximateReceiveCount", "SentTimestamp", "SenderId", "ApproximateFirstReceiveTimestamp"] {
            assert!(attrs[field].is_string(), "{name}: attributes.{field} missing");
        }
        for field in ["MessageGroupId", "SequenceNumber", "MessageDeduplicationId"] {
            assert_eq!(attrs[field].is_string(), fifo, "{name}: attributes.{field} (FIFO: {fifo})");
        }
    }
    records
}

fn without_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k, without_nulls(v))).collect())
        }
        Value::Array(a) => Value::Array(a.into_iter().map(without_nulls).collect()),
        v => v,
    }
}

/// Parses a record's body as `$t` and checks that it round-trips: a misspelt optional field
/// in a sample would otherwise be ignored silently. (A macro: the tests crate has no serde
/// dependency to name the traits with.)
macro_rules! body {
    ($t:ty, $name:expr, $record:expr) => {{
        let text = $record["body"].as_str().expect("body is a string");
        let parsed: $t =
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{}: body does not parse: {e}\n{text}", $name));
        let original: Value = serde_json::from_str(text).expect("body is JSON");
        let again = serde_json::to_value(&parsed).expect("serializes");
        assert_eq!(without_nulls(again), without_nulls(original), "{}: body does not round-trip", $name);
        parsed
    }};
}

#[test]
fn capture_sample_is_transaction_notifications_of_the_sales_job() {
    let job = job();
    for r in records("capture", "capture") {
        let tx = body!(TransactionNotification, "capture", &r);
        assert_eq!(tx.job, job.name);
        let side = job.side_of(&tx.app).unwrap_or_else(|| panic!("capture: unknown app {}", tx.app));
        for c in &tx.changes {
            assert_eq!(c.app, tx.app);
            let (_, map) = job
                .map_for_entity(side, &c.entity)
                .unwrap_or_else(|| panic!("capture: entity {} is not mapped for {}", c.entity, tx.app));
            assert_eq!(c.key.0.len(), map.keys.len(), "capture: key of {} has the wrong length", c.entity);
            assert!(job.company_in_scope(c.company.as_deref()), "capture: company out of scope");
        }
    }
}

fn captured(job: &Job) -> Vec<CapturedTransaction> {
    let mut out = Vec::new();
    for r in records("sequence", "sequence") {
        let tx = body!(CapturedTransaction, "sequence", &r);
        assert_eq!(tx.job, job.name);
        for c in &tx.changes {
            let (_, map) = job.map(&c.map).unwrap_or_else(|| panic!("sequence: unknown map {}", c.map));
            assert_eq!(c.source, tx.source);
            assert_eq!(c.txid, tx.txid);
            assert_eq!(c.key.0.len(), map.keys.len(), "sequence: key of {} has the wrong length", c.map);
        }
        out.push(tx);
    }
    out
}

#[test]
fn sequence_sample_is_the_capture_sample_captured() {
    let job = job();
    let capture: Vec<TransactionNotification> =
        records("capture", "capture").iter().map(|r| body!(TransactionNotification, "capture", r)).collect();
    let sequence = captured(&job);
    assert_eq!(capture.len(), sequence.len());
    for (n, c) in capture.iter().zip(&sequence) {
        assert_eq!(n.txid, c.txid);
        assert_eq!(job.side_of(&n.app), Some(c.source));
        let from_capture: Vec<_> = n
            .changes
            .iter()
            .map(|x| (job.map_for_entity(c.source, &x.entity).map(|(_, m)| m.name.clone()), &x.key, x.seq, x.at_ms))
            .collect();
        let in_sequence: Vec<_> = c.changes.iter().map(|x| (Some(x.map.clone()), &x.key, x.seq, x.at_ms)).collect();
        assert_eq!(from_capture, in_sequence);
    }
}

#[test]
fn deliver_sample_is_what_sequence_plans() {
    let job = job();
    let planned: Vec<DeliveryBatch> = captured(&job).iter().flat_map(|tx| plan(&job, tx, MAX_MESSAGE_BYTES)).collect();
    let records = records("deliver", "deliver.fifo");
    assert_eq!(records.len(), planned.len(), "deliver: one record per planned batch");
    for (r, want) in records.iter().zip(&planned) {
        let batch = body!(DeliveryBatch, "deliver", r);
        assert_eq!(&batch, want, "deliver: not the batch sequence plans");
        assert_eq!(r["attributes"]["MessageGroupId"], batch.group.as_str());
        assert_eq!(r["attributes"]["MessageDeduplicationId"], dedup_id(&batch).as_str());
    }
    assert!(planned.iter().any(|b| b.lanes.iter().any(|l| l.changes.len() > 1)), "a lane with parent and children");
    assert!(planned.iter().any(|b| b.lanes.iter().any(|l| l.changes.iter().any(|c| c.source == Side::B))));
}

#[test]
fn reconcile_sample_is_reconcile_requests() {
    let job = job();
    let mut actions = Vec::new();
    for r in records("reconcile", "reconcile.fifo") {
        let msg = body!(ReconcileMessage, "reconcile", &r);
        assert_eq!(msg.job(), job.name);
        // Message group = job: a job's requests run in order.
        assert_eq!(r["attributes"]["MessageGroupId"], msg.job());
        if let ReconcileMessage::InitialSync { from, .. } = &msg {
            assert!(job.side_of(from).is_some(), "reconcile: unknown app {from}");
        }
        if let ReconcileMessage::Run { request, .. } = &msg {
            assert!(dualsync::domain::keys::request_sk(request).is_some(), "reconcile: bad request id {request}");
            assert_eq!(r["attributes"]["MessageDeduplicationId"], msg.out().dedup_id.unwrap().as_str());
        }
        actions.push(std::mem::discriminant(&msg));
    }
    actions.dedup();
    assert_eq!(actions.len(), 2, "requests to run, then an initial sync");
}
