//! Initial sync (DESIGN §5) on the embedded runner: a page whose writes fail for a system
//! reason never leaves a silent gap. The checkpoint moves past it only once each failed record
//! has a retriable error row, so an operator's retry reaches it.
mod common;

use common::{create_apps, Local, Writes};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::domain::job::Side;
use dualsync::domain::requests::RequestAction;
use dualsync::state::ErrorFilter;

/// Two apps where A already holds parents p1..p5 (written before the job existed, so only an
/// initial sync copies them).
async fn harness() -> Local {
    Local::with(|a, b| {
        let def = create_apps(a, b);
        let conn = rusqlite::Connection::open(a).unwrap();
        for n in 1..=5 {
            conn.execute("INSERT INTO parents (pid, name, co, kind) VALUES (?1, 'n', 'X', 'small')", [format!("p{n}")])
                .unwrap();
        }
        def
    })
    .await
}

fn owners(h: &Local) -> Vec<String> {
    let conn = rusqlite::Connection::open(&h.b).unwrap();
    let mut st = conn.prepare("SELECT owner_id FROM owners ORDER BY owner_id").unwrap();
    st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
}

/// An initial sync from A in pages of two parents, with B's writes failing for the second page
/// only: p3 and p4.
async fn sync_failing_second_page(h: &Local) -> dualsync::steps::initial_sync::InitialSyncReport {
    let b = h.controls[1].clone();
    let mut parent_pages = 0;
    h.rt.steps
        .initial_sync("j", Side::A, 2, move |map, _| {
            if map == "parents" {
                parent_pages += 1;
                b.set(if parent_pages == 1 { Writes::Fail } else { Writes::Work });
            }
        })
        .await
        .unwrap()
}

#[tokio::test]
async fn records_of_a_page_whose_writes_fail_get_retriable_rows_and_a_retry_syncs_them() {
    let h = harness().await;
    let report = sync_failing_second_page(&h).await;
    assert_eq!(owners(&h), ["p1", "p2", "p5"], "the pages before and after the failed one are copied");

    // Every record not synced has a retriable system error row, naming it.
    let mut errors = h.errors().await;
    errors.sort_by(|x, y| x.key.cmp(&y.key));
    let keys: Vec<String> = errors.iter().map(|e| e.key.to_string()).collect();
    assert_eq!(keys, ["p3", "p4"], "{errors:#?}");
    for e in &errors {
        assert_eq!(e.category, ErrorCategory::System);
        assert!(e.retriable);
        assert_eq!(e.status, ErrorStatus::Open);
        assert_eq!(e.map, "parents");
        assert_eq!(e.app, "a");
        assert!(e.message.contains("503"), "{}", e.message);
    }
    assert_eq!(report.records, 5, "five parents, no children or notes");
    assert_eq!(report.system_errors, 2, "the report counts the records that got rows: {report:?}");

    // Running again finds every map done (the rows, not the checkpoint, hold what is left)...
    let again = h.rt.steps.initial_sync("j", Side::A, 2, |_, _| {}).await.unwrap();
    assert_eq!((again.records, again.system_errors), (0, 0), "{again:?}");
    // ...and a retry of the rows reaches the records once B is back.
    h.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await.unwrap();
    h.drain().await;
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    let errors = h.errors().await;
    assert!(errors.iter().all(|e| e.status == ErrorStatus::Resolved), "{errors:#?}");
}

#[tokio::test]
async fn a_restarted_initial_sync_goes_through_records_with_open_rows_again() {
    // Restarting from the beginning delivers every record again: the failed ones sync and
    // their rows are resolved, the copied ones are found in step.
    let h = harness().await;
    sync_failing_second_page(&h).await;
    assert_eq!(h.errors().await.len(), 2);
    dualsync::steps::initial_sync::reset_checkpoints(&h.rt.state, "j", "a").await.unwrap();
    let report = h.rt.steps.initial_sync("j", Side::A, 2, |_, _| {}).await.unwrap();
    assert_eq!((report.records, report.system_errors), (5, 0), "{report:?}");
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    let errors = h.errors().await;
    assert!(errors.iter().all(|e| e.status == ErrorStatus::Resolved), "{errors:#?}");
}
