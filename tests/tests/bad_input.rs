//! Every bad-input rule of capture and delivery: what category it lands in, what the message
//! says, and that nothing is dropped silently (an error row or the dead-letter queue); and the
//! runner's housekeeping, which must never trim what is not yet read.
mod common;

use common::{Local, Writes};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus, SyncError};
use dualsync::domain::job::Side;
use dualsync::domain::requests::RequestAction;
use dualsync::ports::{OutMessage, Queue};
use dualsync::runtime::worker::run_once;
use dualsync::state::ErrorFilter;
use dualsync::steps::StepKind;

async fn harness() -> Local {
    Local::new().await
}

impl Local {
    async fn only_error(&self) -> SyncError {
        let errors = self.errors().await;
        assert_eq!(errors.len(), 1, "{errors:#?}");
        errors.into_iter().next().unwrap()
    }

    async fn send_capture(&self, body: &str) {
        self.rt.capture.send(vec![OutMessage::standard(body.to_string())]).await.unwrap();
    }

    /// Runs capture until its queue is empty (poison goes to the dead-letter queue after 5 tries).
    async fn run_capture(&self) {
        let steps = &self.rt.steps;
        for _ in 0..10 {
            let queue = self.rt.capture.as_ref();
            run_once(queue, 10, &|m| async move {
                let r = steps.handle(StepKind::Capture, queue, &m).await;
                (m, r)
            })
            .await
            .unwrap();
        }
    }
}

fn notification(job: &str, app: &str, entity: &str, key: &[&str], company: Option<&str>) -> String {
    serde_json::json!({
        "job": job, "app": app, "txid": "tx1",
        "changes": [{ "app": app, "entity": entity, "key": key, "op": "upsert", "seq": 1, "at_ms": 0, "company": company }]
    })
    .to_string()
}

/// The message is in the dead-letter queue, and a dead-letter row says why.
async fn assert_dead_lettered(h: &Local, reason: &str) {
    h.run_capture().await;
    assert!(h.rt.capture.is_empty().unwrap(), "{reason}: still on the capture queue");
    let dlq = h.rt.dead_letters[0].peek_all().unwrap();
    assert_eq!(dlq.len(), 1, "{reason}: not dead-lettered");
    let rows = h.rt.state.dead_letters("capture").await.unwrap();
    assert_eq!(rows.len(), 1, "{reason}: one dead-letter row");
    assert!(rows[0].reason.contains(reason), "{reason}: row says {:?}", rows[0].reason);
    assert_eq!(rows[0].body, dlq[0].body);
    assert_eq!(rows[0].receive_count, 5);
    assert!(h.errors().await.is_empty());
}

#[tokio::test]
async fn malformed_notification_goes_to_the_dead_letter_queue() {
    let h = harness().await;
    h.send_capture("{not json").await;
    assert_dead_lettered(&h, "malformed change notification").await;
}

#[tokio::test]
async fn unknown_job_goes_to_the_dead_letter_queue() {
    let h = harness().await;
    h.send_capture(&notification("nope", "a", "parents", &["p1"], Some("X"))).await;
    assert_dead_lettered(&h, "unknown job 'nope'").await;
}

#[tokio::test]
async fn unknown_app_goes_to_the_dead_letter_queue() {
    let h = harness().await;
    h.send_capture(&notification("j", "crm", "parents", &["p1"], Some("X"))).await;
    assert_dead_lettered(&h, "app 'crm' is not an app of job 'j'").await;
}

#[tokio::test]
async fn unmapped_entity_is_an_application_error() {
    let h = harness().await;
    h.send_capture(&notification("j", "a", "invoices", &["i1"], Some("X"))).await;
    h.run_capture().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!(e.message, "entity 'invoices' of app 'a' is not mapped in job 'j'");
}

#[tokio::test]
async fn malformed_keys_are_application_errors() {
    let h = harness().await;
    h.send_capture(&notification("j", "a", "parents", &["p1", "extra"], Some("X"))).await;
    h.run_capture().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!(e.message, "malformed key for parents: 2 value(s), expected 1 (pid)");

    let h = harness().await;
    h.send_capture(&notification("j", "a", "children", &["p1", ""], Some("X"))).await;
    h.run_capture().await;
    assert_eq!(h.only_error().await.message, "malformed key for children: key field cno is empty");
}

#[tokio::test]
async fn a_company_out_of_scope_is_skipped_not_synced() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'Y', 'small')");
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners"), 0);
    assert!(h.errors().await.is_empty());
}

#[tokio::test]
async fn a_transaction_mixing_async_and_live_maps_is_rejected_whole() {
    let h = harness().await;
    h.exec(
        Side::A,
        "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small');
                     INSERT INTO notes (nid, text) VALUES ('n1', 'hello');",
    );
    h.drain().await;
    let errors = h.errors().await;
    assert_eq!(errors.len(), 2, "{errors:#?}");
    for e in &errors {
        assert_eq!(e.category, ErrorCategory::Application);
        assert!(
            e.message.contains("mixes async and live maps")
                && e.message.contains("async: parents (parents)")
                && e.message.contains("live: notes (notes)"),
            "{}",
            e.message
        );
    }
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners") + h.query(Side::B, "SELECT count(*) FROM memos"), 0);
}

#[tokio::test]
async fn live_maps_and_deletes_go_through_the_live_path() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO notes (nid, text) VALUES ('n1', 'hello')");
    h.rt.pump_feeds(100).await.unwrap();
    h.run_capture().await;
    // Delivered during capture: nothing was queued for sequence.
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM memos WHERE body = 'hello'"), 1);
    assert!(h.rt.sequence.is_empty().unwrap());
    h.drain().await;
    h.exec(Side::B, "DELETE FROM memos WHERE memo_id = 'n1'");
    h.rt.pump_feeds(100).await.unwrap();
    h.run_capture().await;
    assert_eq!(h.query(Side::A, "SELECT count(*) FROM notes"), 0);
    assert!(h.rt.sequence.is_empty().unwrap());
}

#[tokio::test]
async fn a_change_while_the_job_is_stopped_is_recorded_not_lost() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')");
    h.rt.pump_feeds(100).await.unwrap();
    h.rt.stop("j").await.unwrap();
    h.run_capture().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!(e.message, "job 'j' is stopped: change not synced; retry it once the job is active");
    assert!(e.retriable);
}

#[tokio::test]
async fn a_missing_parent_is_a_missing_reference_mended_when_the_parent_syncs() {
    let h = harness().await;
    // The child exists in A, its parent in neither app.
    h.exec(Side::A, "INSERT INTO children (pid, cno, label) VALUES ('p9', 1, 'c')");
    h.drain().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!(e.message, "missing reference: parents/p9 (waiting for it)");
    assert!(e.retriable);
    // The parent syncs: the child goes again by itself, no retry needed.
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p9', 'n', 'X', 'large')");
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p9'"), 1);
    assert_eq!(h.only_error().await.status, ErrorStatus::Resolved);
}

#[tokio::test]
async fn a_value_outside_the_value_map_is_an_application_error_that_hides_the_value() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'secret-kind')");
    h.drain().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!(e.message, "parents/p1: value of field 'kind' has no entry in its value map");
    assert!(!e.message.contains("secret-kind"));
}

#[tokio::test]
async fn a_write_the_target_refuses_is_an_application_error_without_field_values() {
    let h = harness().await;
    // owners.title is NOT NULL in B.
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', NULL, 'X', 'small')");
    h.drain().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::Application);
    assert!(e.message.starts_with("b refused parents/p1:"), "{}", e.message);
    assert!(e.message.contains("NOT NULL"), "{}", e.message);
    assert!(!e.message.contains("small"), "{}", e.message);
}

#[tokio::test]
async fn a_stale_change_is_a_concurrency_skip() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'v0', 'X', 'small')");
    h.drain().await;
    h.exec(Side::A, "UPDATE parents SET name = 'v1' WHERE pid = 'p1'");
    h.exec(Side::A, "UPDATE parents SET name = 'v2' WHERE pid = 'p1'");
    // Two transactions, so two deliveries; the first one is stale once both are captured.
    h.rt.pump_feeds(100).await.unwrap();
    h.run_capture().await;
    h.drain().await;
    let errors = h.errors().await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].category, ErrorCategory::Concurrency);
    assert!(!errors[0].retriable);
    assert!(errors[0].message.starts_with("skipped: a newer change (seq"), "{}", errors[0].message);
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE title = 'v2'"), 1);
}

#[tokio::test]
async fn a_stale_change_of_a_record_the_other_side_lacks_is_delivered_not_skipped() {
    // Its children may queue behind it: skipping it would leave them a missing reference.
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'v1', 'X', 'small')");
    h.exec(Side::A, "INSERT INTO children (pid, cno, label) VALUES ('p1', 1, 'c')");
    h.exec(Side::A, "UPDATE parents SET name = 'v2' WHERE pid = 'p1'");
    h.rt.pump_feeds(100).await.unwrap();
    h.run_capture().await;
    h.drain().await;
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p1'"), 1);
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE title = 'v2'"), 1);
}

#[tokio::test]
async fn system_failures_are_retried_with_backoff_then_recorded_and_retriable() {
    let h = harness().await;
    h.controls[1].set(Writes::Fail);
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')");
    // First delivery fails and the message comes back later, not at once.
    while h.rt.pump().await.unwrap() > 0 {}
    assert!(h.errors().await.is_empty());
    assert!(!h.rt.deliver.is_empty().unwrap());
    let steps_metrics = h.rt.steps.metrics.clone();
    assert_eq!(dualsync::steps::Metrics::get(&steps_metrics.system_retries), 1);
    h.drain().await;
    let e = h.only_error().await;
    assert_eq!(e.category, ErrorCategory::System);
    assert!(e.retriable);
    assert_eq!(e.message, "503 service unavailable");
    assert!(h.rt.dead_letters[2].is_empty().unwrap());
    // The app recovers: a retry syncs the record.
    h.controls[1].set(Writes::Work);
    h.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await.unwrap();
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners"), 1);
    assert_eq!(h.only_error().await.status, ErrorStatus::Resolved);
}

#[tokio::test]
async fn housekeeping_trims_only_consumed_change_log_rows() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')");
    h.drain().await;
    // Not read yet: must survive the trim.
    h.exec(Side::A, "UPDATE parents SET name = 'n2' WHERE pid = 'p1'");
    h.rt.housekeeping().await.unwrap();
    assert_eq!(h.query(Side::A, "SELECT count(*) FROM _dualsync_changes"), 1);
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE title = 'n2'"), 1);
    h.rt.housekeeping().await.unwrap();
    assert_eq!(h.query(Side::A, "SELECT count(*) FROM _dualsync_changes"), 0);
}
