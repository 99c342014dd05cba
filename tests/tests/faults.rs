//! The ways delivery diverged under faults (issue 9), each driven step by step on the embedded
//! runner with two sqlite apps: a write that fails and is then overtaken by an edit, a delete
//! racing a first delivery, a delete and create again on one side, a job stopped with
//! deliveries in flight, a child delivered before its parent, a retry request whose rows were
//! first seen child before parent. Each test failed before its fix.
mod common;

use common::{Local, Writes};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::domain::job::{JobStatus, Side};
use dualsync::domain::requests::RequestAction;
use dualsync::ports::Queue;
use dualsync::state::ErrorFilter;
use dualsync::steps::StepKind;

/// The change logs into capture, and one batch of each of capture and sequence.
async fn capture_and_sequence(h: &Local) {
    h.rt.pump_feeds(1000).await.unwrap();
    h.rt.step_once(StepKind::Capture).await.unwrap();
    h.rt.step_once(StepKind::Sequence).await.unwrap();
}

/// `pid`, created on A, synced, then deleted by `side`'s user: the delete waits on the capture
/// queue.
async fn synced_then_deleted(h: &Local, pid: &str, side: Side) {
    h.exec(Side::A, &format!("INSERT INTO parents (pid, name, co, kind) VALUES ('{pid}', 'n0', 'X', 'small')"));
    h.drain().await;
    let delete = match side {
        Side::A => format!("DELETE FROM parents WHERE pid = '{pid}'"),
        Side::B => format!("DELETE FROM owners WHERE owner_id = '{pid}'"),
    };
    h.exec(side, &delete);
    h.rt.pump_feeds(1000).await.unwrap();
}

/// Every step until nothing moves, without letting time pass: a message received and held
/// back stays held.
async fn settle(h: &Local) {
    while h.rt.pump().await.unwrap() > 0 {}
}

/// One batch of capture, killed at failpoint `point`.
async fn capture_crashing_at(h: &Local, point: &str) {
    *h.crash_at.lock().unwrap() = Some((point.into(), 0));
    h.rt.step_once(StepKind::Capture).await.unwrap();
    assert!(h.crash_at.lock().unwrap().is_none(), "capture crashed at {point}");
}

/// Item 2: primary A; p1 synced; the write of A's edit to B fails; B's user then edits p1.
/// Both sides changed since the last sync: A's value wins, and a conflict row says so. (Before:
/// the failed write's mark passed for a landed one and B's edit for one made on top of it.)
#[tokio::test]
async fn a_failed_write_is_never_taken_for_a_landed_one() {
    for failure in [Writes::Fail, Writes::Refuse] {
        let h = Local::new().await;
        h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n0', 'X', 'small')");
        h.drain().await;
        assert_eq!(h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p1'").as_deref(), Some("n0"));

        h.exec(Side::A, "UPDATE parents SET name = 'a1' WHERE pid = 'p1'");
        h.controls[1].set(failure);
        capture_and_sequence(&h).await;
        h.rt.step_once(StepKind::Deliver).await.unwrap();
        assert_eq!(h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p1'").as_deref(), Some("n0"));
        h.exec(Side::B, "UPDATE owners SET title = 'b1' WHERE owner_id = 'p1'");
        h.controls[1].set(Writes::Work);
        h.drain().await;
        if failure == Writes::Refuse {
            // A refused write is an application error: an operator retries it once fixed.
            let open = h.open_rows().await;
            assert!(open.iter().any(|r| r.category == ErrorCategory::Application && r.key.0 == ["p1"]), "{open:?}");
            let rt = &h.rt;
            rt.admin()
                .submit(
                    "j",
                    RequestAction::Retry,
                    ErrorFilter { category: Some(ErrorCategory::Application), ..Default::default() },
                )
                .await
                .unwrap();
            h.drain().await;
        }
        let (a, b) = (
            h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p1'"),
            h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p1'"),
        );
        assert_eq!((a.as_deref(), b.as_deref()), (Some("a1"), Some("a1")), "{failure:?}: the primary's value");
        let conflicts = h.rt.state.conflicts("j", 100, None).await.unwrap().items;
        assert!(conflicts.iter().any(|c| c.key.0 == ["p1"] && c.winner == "a"), "{failure:?}: {conflicts:?}");
        assert!(h.open_rows().await.is_empty(), "{failure:?}: {:?}", h.open_rows().await);
    }
}

/// Item 2, the safety net: primary A; the write of A's edit to B lands but answers like a
/// time-out, so its mark is uncertain; the message that would retry it is then answered
/// elsewhere (another deliver invocation, the rules of design note §3 notwithstanding); B's user
/// edits the record. B's change loses the conflict against the uncertain mark, and nothing of
/// A's is left to send: the lost conflict itself sends A's record again. (Before: A kept its
/// value, B its edit, and no row said so.)
#[tokio::test]
async fn a_conflict_lost_to_a_primary_with_nothing_left_to_send_sends_the_primarys_record() {
    let h = Local::new().await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n0', 'X', 'small')");
    h.drain().await;
    h.exec(Side::A, "UPDATE parents SET name = 'a1' WHERE pid = 'p1'");
    h.controls[1].set(Writes::LandThenFail);
    capture_and_sequence(&h).await;
    h.rt.step_once(StepKind::Deliver).await.unwrap();
    assert_eq!(h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p1'").as_deref(), Some("a1"), "landed");
    // The retry of A's change is answered by someone else.
    h.clock.advance(301_000);
    let retry = h.rt.deliver.receive(10).await.unwrap();
    assert_eq!(retry.len(), 1, "the write's message waits for its retry");
    h.rt.deliver.ack(&[retry[0].receipt.clone()]).await.unwrap();
    h.controls[1].set(Writes::Work);
    h.exec(Side::B, "UPDATE owners SET title = 'b1' WHERE owner_id = 'p1'");
    h.drain().await;
    let (a, b) = (
        h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p1'"),
        h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p1'"),
    );
    assert_eq!((a.as_deref(), b.as_deref()), (Some("a1"), Some("a1")), "the primary's value on both sides");
    let conflicts = h.rt.state.conflicts("j", 100, None).await.unwrap().items;
    assert!(conflicts.iter().any(|c| c.key.0 == ["p1"] && c.winner == "a"), "{conflicts:?}");
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}

/// Item 3: a record new on B, deleted on B while its first delivery is between its read and its
/// write (the live delete runs then and finds nothing on A), ends absent on both sides.
#[tokio::test]
async fn a_delete_racing_a_first_delivery_leaves_no_record_behind() {
    let h = Local::new().await;
    h.exec(Side::B, "INSERT INTO owners (owner_id, title, company, kind_code) VALUES ('p2', 't', 'X', 1)");
    capture_and_sequence(&h).await;
    let (rt, b) = (h.rt.clone(), h.b.clone());
    *h.controls[0].before_write.lock().unwrap() = Some(Box::new(move || {
        Box::pin(async move {
            common::exec(&b, "DELETE FROM owners WHERE owner_id = 'p2'");
            rt.pump_feeds(1000).await.unwrap();
            rt.step_once(StepKind::Capture).await.unwrap();
        })
    }));
    h.rt.step_once(StepKind::Deliver).await.unwrap();
    assert!(h.controls[0].before_write.lock().unwrap().is_none(), "the delete ran between read and write");
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE owner_id = 'p2'"), 0);
    assert_eq!(h.query(Side::A, "SELECT count(*) FROM parents WHERE pid = 'p2'"), 0, "present on A only");
    assert!(h.open_rows().await.is_empty());
}

/// Item 3: a record deleted and created again on one side (in two transactions, and in one)
/// ends present on both sides. dualsync's own delete on the other side is its own write: its
/// echo in that app's change log is not a user's delete.
#[tokio::test]
async fn a_delete_and_create_again_on_one_side_ends_present_on_both() {
    let h = Local::new().await;
    for id in ["p3", "p4"] {
        h.exec(Side::A, &format!("INSERT INTO parents (pid, name, co, kind) VALUES ('{id}', 'n0', 'X', 'small')"));
    }
    h.drain().await;
    h.exec(Side::A, "DELETE FROM parents WHERE pid = 'p3'");
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p3', 'again', 'X', 'small')");
    h.exec(
        Side::A,
        "DELETE FROM parents WHERE pid = 'p4'; INSERT INTO parents (pid, name, co, kind) VALUES ('p4', 'again', 'X', 'large')",
    );
    h.drain().await;
    for id in ["p3", "p4"] {
        assert_eq!(h.text(Side::A, &format!("SELECT name FROM parents WHERE pid = '{id}'")).as_deref(), Some("again"));
        assert_eq!(
            h.text(Side::B, &format!("SELECT title FROM owners WHERE owner_id = '{id}'")).as_deref(),
            Some("again")
        );
    }
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}

/// A delete whose capture crashed after its live delete ran, before the transaction was marked
/// captured, comes back after the visibility timeout. By then A's user has created the record
/// again: the delete, made on the record that is gone, must not delete the new one on either
/// side (the kill -9 soak found A's new record deleted this way).
#[tokio::test]
async fn a_delete_captured_again_after_a_crash_leaves_the_record_created_since() {
    let h = Local::new().await;
    synced_then_deleted(&h, "p5", Side::B).await;
    capture_crashing_at(&h, "capture.after_send").await;
    assert_eq!(h.query(Side::A, "SELECT count(*) FROM parents WHERE pid = 'p5'"), 0, "the live delete ran");
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p5', 'again', 'X', 'small')");
    h.drain().await;
    // The crashed capture's message is visible again once its visibility timeout has passed.
    h.clock.advance(301_000);
    h.drain().await;
    for (side, sql) in [
        (Side::A, "SELECT name FROM parents WHERE pid = 'p5'"),
        (Side::B, "SELECT title FROM owners WHERE owner_id = 'p5'"),
    ] {
        assert_eq!(h.text(side, sql).as_deref(), Some("again"), "{side:?}: the record created after the delete");
    }
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}

/// Killed between marking a live delete begun and running it, capture comes back and runs it:
/// the record in the target is still the one the delete meant. Had A's user changed it in
/// between, the change wins over the delete and the record ends on both sides with it.
#[tokio::test]
async fn a_delete_begun_before_a_crash_is_run_again_unless_its_record_changed_since() {
    for changed in [false, true] {
        let h = Local::new().await;
        synced_then_deleted(&h, "p5", Side::B).await;
        capture_crashing_at(&h, "capture.delete_marked").await;
        assert_eq!(h.query(Side::A, "SELECT count(*) FROM parents WHERE pid = 'p5'"), 1, "the delete did not run");
        if changed {
            h.exec(Side::A, "UPDATE parents SET name = 'edited' WHERE pid = 'p5'");
        }
        h.clock.advance(301_000);
        h.drain().await;
        let (a, b) = (
            h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p5'"),
            h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p5'"),
        );
        let want = changed.then(|| "edited".to_string());
        assert_eq!((a, b), (want.clone(), want), "changed since: {changed}");
        assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    }
}

/// A transaction deleting two records, killed after marking its deletes begun and before
/// running them; A's user edits both meanwhile. Run again, the transaction treats both alike:
/// each edit is newer than the delete and wins (the kill -9 soak found the delete the first run
/// never reached run as new, deleting a record A's user had created since).
#[tokio::test]
async fn every_delete_of_a_transaction_run_again_after_a_crash_is_judged_by_its_mark() {
    let h = Local::new().await;
    h.exec(
        Side::A,
        "INSERT INTO parents (pid, name, co, kind) VALUES ('p5', 'n5', 'X', 'small'), ('p6', 'n6', 'X', 'small')",
    );
    h.drain().await;
    h.exec(Side::B, "DELETE FROM owners WHERE owner_id IN ('p5', 'p6')");
    h.rt.pump_feeds(1000).await.unwrap();
    capture_crashing_at(&h, "capture.delete_marked").await;
    h.exec(Side::A, "UPDATE parents SET name = 'e5' WHERE pid = 'p5'");
    h.exec(Side::A, "UPDATE parents SET name = 'e6' WHERE pid = 'p6'");
    // Only the crashed delete runs again, before A's edits are captured.
    h.clock.advance(301_000);
    h.rt.step_once(StepKind::Capture).await.unwrap();
    h.drain().await;
    for (pid, name) in [("p5", "e5"), ("p6", "e6")] {
        let a = h.text(Side::A, &format!("SELECT name FROM parents WHERE pid = '{pid}'"));
        let b = h.text(Side::B, &format!("SELECT title FROM owners WHERE owner_id = '{pid}'"));
        assert_eq!((a.as_deref(), b.as_deref()), (Some(name), Some(name)), "{pid}");
    }
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}

/// A delete captured late (its message retried, or behind a backlog), after its source made
/// newer changes of the record that have all been applied: B's user deleted p5, created it
/// again and deleted it again, and A's user then created it anew. The late delete is older than
/// what B's later delete already did: it is stale and deletes nothing, whether A's new record
/// has reached B yet or not (the kill -9 soak found A's new record deleted on both sides).
#[tokio::test]
async fn a_delete_captured_after_a_newer_delete_of_its_record_deletes_nothing() {
    for delivered in [false, true] {
        let h = Local::new().await;
        synced_then_deleted(&h, "p5", Side::B).await;
        let late = h.rt.capture.receive(10).await.unwrap();
        assert_eq!(late.len(), 1, "B's delete, held back");
        h.exec(Side::B, "INSERT INTO owners (owner_id, title, company, kind_code) VALUES ('p5', 'b2', 'X', 1)");
        settle(&h).await;
        assert_eq!(h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p5'").as_deref(), Some("b2"));
        h.exec(Side::B, "DELETE FROM owners WHERE owner_id = 'p5'");
        settle(&h).await;
        assert_eq!(h.query(Side::A, "SELECT count(*) FROM parents WHERE pid = 'p5'"), 0, "B's newer delete ran");
        h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p5', 'again', 'X', 'small')");
        if delivered {
            settle(&h).await;
            assert_eq!(h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p5'").as_deref(), Some("again"));
        }
        // The held delete is visible again once its visibility timeout has passed, and runs
        // before anything else.
        h.clock.advance(301_000);
        assert_eq!(h.rt.step_once(StepKind::Capture).await.unwrap(), 1, "only the late delete");
        h.drain().await;
        let (a, b) = (
            h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p5'"),
            h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p5'"),
        );
        assert_eq!((a.as_deref(), b.as_deref()), (Some("again"), Some("again")), "delivered first: {delivered}");
        let skipped = h.rows(ErrorFilter::default()).await;
        assert!(
            skipped.iter().any(|r| r.category == ErrorCategory::Concurrency && r.message.contains("a newer delete")),
            "{skipped:?}"
        );
        assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    }
}

/// A's user deletes p6 while B's user edits it. B's edit reaches A first and creates the record
/// there again; A's delete, captured after, finds that create at its source. It is B's change,
/// made without seeing the delete, not B's unchanged record sent back: it stays and the record
/// ends with B's edit on both sides. (Before, the delete took our create for an echo and
/// deleted it on both sides; the kill -9 soak found a record that A's and B's users had each
/// written last gone from both.)
#[tokio::test]
async fn an_edit_that_reaches_the_deleting_side_first_wins_over_the_delete() {
    let h = Local::new().await;
    synced_then_deleted(&h, "p6", Side::A).await;
    let late = h.rt.capture.receive(10).await.unwrap();
    assert_eq!(late.len(), 1, "A's delete, held back");
    h.exec(Side::B, "UPDATE owners SET title = 'b1' WHERE owner_id = 'p6'");
    settle(&h).await;
    assert_eq!(h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p6'").as_deref(), Some("b1"), "created on A");
    h.clock.advance(301_000);
    h.drain().await;
    let (a, b) = (
        h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p6'"),
        h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p6'"),
    );
    assert_eq!((a.as_deref(), b.as_deref()), (Some("b1"), Some("b1")));
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}

/// B's user deletes p7 while A's user changes it: edits it, or deletes it and creates it anew.
/// The delete, captured first, finds on A a record other than the one last synced: A's change
/// wins over the delete and reaches B, as it does when the delete runs again after a crash.
/// (Before, the delete took A's record with it; the kill -9 soak found each side's new record
/// deleted by the other side's older delete, so neither user's last write was left.)
#[tokio::test]
async fn a_change_made_since_the_last_sync_wins_over_a_delete_from_the_other_side() {
    for change in ["UPDATE parents SET name = 'again' WHERE pid = 'p7'", "DELETE FROM parents WHERE pid = 'p7'; INSERT INTO parents (pid, name, co, kind) VALUES ('p7', 'again', 'X', 'small')"] {
        let h = Local::new().await;
        synced_then_deleted(&h, "p7", Side::B).await;
        // A's change, not yet captured: only B's delete runs.
        h.exec(Side::A, change);
        assert_eq!(h.rt.step_once(StepKind::Capture).await.unwrap(), 1, "only B's delete");
        h.drain().await;
        let (a, b) = (
            h.text(Side::A, "SELECT name FROM parents WHERE pid = 'p7'"),
            h.text(Side::B, "SELECT title FROM owners WHERE owner_id = 'p7'"),
        );
        assert_eq!((a.as_deref(), b.as_deref()), (Some("again"), Some("again")), "{change}");
        assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    }
}

/// Item 4: deliveries in flight when a job is stopped wait (nothing reaches the dead-letter
/// queue for it, no error row), and start delivers them in order.
#[tokio::test]
async fn stopping_a_job_loses_nothing() {
    let h = Local::new().await;
    h.exec(
        Side::A,
        "INSERT INTO parents (pid, name, co, kind) VALUES ('p5', 'n', 'X', 'small');
         INSERT INTO children (pid, cno, label) VALUES ('p5', 1, 'c1'), ('p5', 2, 'c2');",
    );
    capture_and_sequence(&h).await;
    h.rt.stop("j").await.unwrap();
    // Long past every retry the queue would make.
    for _ in 0..10 {
        h.rt.step_once(StepKind::Deliver).await.unwrap();
        h.clock.advance(301_000);
    }
    let dead = h.rt.dead_letters[StepKind::Deliver as usize].depth().await.unwrap();
    assert_eq!(dead.visible + dead.in_flight, 0, "dead-lettered for being stopped");
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items"), 0, "a stopped job moved data");
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    h.rt.start("j").await.unwrap();
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE owner_id = 'p5'"), 1);
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p5'"), 2);
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    assert_eq!(h.rt.state.job("j").await.unwrap().1, JobStatus::Active);
}

/// Item 13: a child delivered before its parent (here, captured in an earlier transaction)
/// waits for it and goes again when the parent syncs, with no operator; a row whose record no
/// longer exists on either side is closed with that reason.
#[tokio::test]
async fn missing_references_mend_themselves() {
    let h = Local::new().await;
    h.exec(Side::A, "INSERT INTO children (pid, cno, label) VALUES ('p6', 1, 'c1')");
    h.drain().await;
    let open = h.open_rows().await;
    assert_eq!(open.len(), 1, "{open:?}");
    assert!(open[0].message.starts_with("missing reference: parents/p6"), "{}", open[0].message);
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p6', 'n', 'X', 'small')");
    h.drain().await;
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p6'"), 1, "the child went again");
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);

    // An orphan deleted where it was made: its row closes, with the reason.
    h.exec(Side::A, "INSERT INTO children (pid, cno, label) VALUES ('p7', 1, 'c1')");
    h.drain().await;
    assert_eq!(h.open_rows().await.len(), 1);
    h.exec(Side::A, "DELETE FROM children WHERE pid = 'p7'");
    h.drain().await;
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
    let closed = h.rows(ErrorFilter { status: Some(ErrorStatus::Resolved), ..Default::default() }).await;
    assert!(
        closed.iter().any(|r| r.key.0 == ["p7", "1"] && r.message.contains("no longer exists on either side")),
        "{closed:?}"
    );
}

/// Item 1: a retry request delivers its rows in dependency order, whatever order they were
/// first seen in: a line first seen before its header goes after it, and both sync.
#[tokio::test]
async fn a_retry_request_delivers_parents_before_children() {
    let h = Local::new().await;
    // B refuses everything for now: the line fails first, then its header.
    h.controls[1].set(Writes::Refuse);
    h.exec(Side::A, "INSERT INTO children (pid, cno, label) VALUES ('p8', 1, 'c1')");
    h.drain().await;
    h.clock.advance(10);
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p8', 'n', 'X', 'small')");
    h.drain().await;
    // The child went again when... the parent did not sync: both rows are open, child first.
    let open = h.open_rows().await;
    assert_eq!(open.len(), 2, "{open:?}");
    assert!(open[0].first_seen_ms < open[1].first_seen_ms);
    assert_eq!(open[0].map, "children");
    h.controls[1].set(Writes::Work);
    let id = h.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await.unwrap().id;
    h.drain().await;
    let r = h.rt.admin().request("j", &id).await.unwrap();
    assert_eq!((r.progress.selected, r.progress.done, r.progress.succeeded, r.progress.still_failing), (2, 2, 2, 0));
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM owners WHERE owner_id = 'p8'"), 1);
    assert_eq!(h.query(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p8'"), 1);
    assert!(h.open_rows().await.is_empty(), "{:?}", h.open_rows().await);
}
