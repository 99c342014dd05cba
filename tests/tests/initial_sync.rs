//! Initial sync (DESIGN §5) on the embedded runner: a page whose writes fail for a system
//! reason never leaves a silent gap. The checkpoint moves past it only once each failed record
//! has a retriable error row, so an operator's retry reaches it.
mod common;

use common::{create_apps, Local, Writes};
use dualsync::domain::change::Key;
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::domain::job::Side;
use dualsync::domain::requests::RequestAction;
use dualsync::state::ErrorFilter;
use dualsync::steps::initial_sync::{InitialSyncReport, SyncEvent, SyncOptions};

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

/// Options of a sync from A in pages of `page` records.
fn from_a(page: usize) -> SyncOptions {
    SyncOptions::new(Side::A).page_size(page)
}

/// An initial sync from A in pages of two parents, one page at a time, with B's writes failing
/// for the second page only: p3 and p4.
async fn sync_failing_second_page(h: &Local) -> InitialSyncReport {
    let b = h.controls[1].clone();
    let mut parent_pages = 0;
    let opts = SyncOptions { pages_in_flight: 1, ..from_a(2) };
    h.rt.steps
        .initial_sync("j", &opts, move |e| {
            if let SyncEvent::Page { map: "parents", .. } = e {
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
    let again = h.rt.steps.initial_sync("j", &from_a(2), |_| {}).await.unwrap();
    assert_eq!((again.records, again.system_errors), (0, 0), "{again:?}");
    // ...and a retry of the rows reaches the records once B is back.
    h.rt.admin().submit("j", RequestAction::Retry, ErrorFilter::default()).await.unwrap();
    h.drain().await;
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    let errors = h.errors().await;
    assert!(errors.iter().all(|e| e.status == ErrorStatus::Resolved), "{errors:#?}");
}

/// A throttled app says when to come back: the page waits that long and delivers its records
/// again, so a sync into an app at its limits slows down instead of leaving error rows.
#[tokio::test]
async fn records_the_target_throttled_are_delivered_again_after_its_retry_after() {
    let h = harness().await;
    *h.controls[1].writes.lock().unwrap() = Writes::ThrottleOnce;
    let started = std::time::Instant::now();
    let report = h.rt.steps.initial_sync("j", &from_a(2), |_| {}).await.unwrap();
    assert!(started.elapsed() >= std::time::Duration::from_secs(1), "waited for the Retry-After");
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    assert_eq!((report.records, report.system_errors), (5, 0), "{report:?}");
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(map(&report, "parents").total().created, 5);
}

#[tokio::test]
async fn a_restarted_initial_sync_goes_through_records_with_open_rows_again() {
    // Restarting from the beginning delivers every record again: the failed ones sync and
    // their rows are resolved, the copied ones are found in step.
    let h = harness().await;
    sync_failing_second_page(&h).await;
    assert_eq!(h.errors().await.len(), 2);
    dualsync::steps::initial_sync::reset_checkpoints(&h.rt.state, "j", "a").await.unwrap();
    let report = h.rt.steps.initial_sync("j", &from_a(2), |_| {}).await.unwrap();
    assert_eq!((report.records, report.system_errors), (5, 0), "{report:?}");
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    let errors = h.errors().await;
    assert!(errors.iter().all(|e| e.status == ErrorStatus::Resolved), "{errors:#?}");
}

/// Two apps where A holds `n` parents with a child each (`p0001`/1 ...), written before the job.
async fn families(n: usize) -> Local {
    Local::with(|a, b| {
        let def = create_apps(a, b);
        let conn = rusqlite::Connection::open(a).unwrap();
        for i in 1..=n {
            let pid = format!("p{i:04}");
            conn.execute("INSERT INTO parents (pid, name, co, kind) VALUES (?1, 'n', 'X', 'small')", [&pid]).unwrap();
            conn.execute("INSERT INTO children (pid, cno, label) VALUES (?1, 1, 'l')", [&pid]).unwrap();
        }
        def
    })
    .await
}

fn count(path: &std::path::Path, table: &str) -> i64 {
    common::query(path, &format!("SELECT count(*) FROM {table}"))
}

/// The report's map, by name.
fn map<'r>(report: &'r InitialSyncReport, name: &str) -> &'r dualsync::steps::initial_sync::MapReport {
    report.maps.iter().find(|m| m.map == name).unwrap_or_else(|| panic!("no map {name} in {report:?}"))
}

/// Killed at `point` (after it passed `passes` times) and started again: every record is on B
/// once, with no error row; the second run did only what was left, and the summary counts each
/// record once, whatever order the pages finished in.
async fn killed_and_resumed(point: &str, passes: u32) {
    let h = families(300).await;
    let opts = SyncOptions { pages_in_flight: 4, ..from_a(7) };
    *h.crash_at.lock().unwrap() = Some((point.to_string(), passes));
    let crashed = h.rt.steps.initial_sync("j", &opts, |_| {}).await;
    assert!(crashed.is_err(), "the failpoint fired: {crashed:?}");
    assert!(h.crash_at.lock().unwrap().is_none());
    let copied = count(&h.b, "owners");
    assert!(copied < 300, "killed part way: {copied} owners copied");

    let report = h.rt.steps.initial_sync("j", &opts, |_| {}).await.unwrap();
    assert_eq!((count(&h.b, "owners"), count(&h.b, "items")), (300, 300));
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    let parents = map(&report, "parents");
    assert!(parents.records_this_run < 300, "resumed, not started over: {parents:?}");
    let t = parents.total();
    assert_eq!(t.listed, 300, "each record counted once: {t:?}");
    assert_eq!(t.created + t.in_step, 300, "{t:?}");
    assert_eq!(t.errors_total(), 0);
    assert_eq!(map(&report, "children").total().created, 300);
    // Run again: all done, nothing to do.
    let again = h.rt.steps.initial_sync("j", &opts, |_| {}).await.unwrap();
    assert_eq!(again.records, 0, "{again:?}");
    assert_eq!(map(&again, "parents").total().listed, 300, "the summary still covers the whole sync");
}

#[tokio::test]
async fn killed_after_a_page_it_resumes_and_syncs_every_record_once() {
    killed_and_resumed("initial_sync.after_page", 5).await;
}

#[tokio::test]
async fn killed_after_listing_a_page_it_resumes_and_syncs_every_record_once() {
    // Pages listed and stored as tasks, some not delivered yet: the next run delivers them.
    killed_and_resumed("initial_sync.after_list", 9).await;
}

/// A holds p1..p5; B holds p1 with equal content, p2 with other content, and x1 of its own.
async fn both_sides() -> Local {
    Local::with(|a, b| {
        let def = create_apps(a, b);
        let conn = rusqlite::Connection::open(a).unwrap();
        for n in 1..=5 {
            conn.execute("INSERT INTO parents (pid, name, co, kind) VALUES (?1, 'n', 'X', 'small')", [format!("p{n}")])
                .unwrap();
        }
        let conn = rusqlite::Connection::open(b).unwrap();
        conn.execute_batch(
            "INSERT INTO owners VALUES ('p1', 'n', 'X', 1);
             INSERT INTO owners VALUES ('p2', 'other', 'X', 1);
             INSERT INTO owners VALUES ('x1', 'only in b', 'X', 2);",
        )
        .unwrap();
        def
    })
    .await
}

fn b_owners(h: &Local) -> Vec<(String, String, i64)> {
    let conn = rusqlite::Connection::open(&h.b).unwrap();
    let mut st = conn.prepare("SELECT owner_id, title, _ds_version FROM owners ORDER BY owner_id").unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

#[tokio::test]
async fn records_on_both_sides_are_matched_by_key_and_what_only_the_target_holds_is_left_alone() {
    let h = both_sides().await;
    let before = b_owners(&h);
    let report = h.rt.steps.initial_sync("j", &from_a(2), |_| {}).await.unwrap();
    let parents = map(&report, "parents");
    let t = parents.total();
    assert_eq!((t.listed, t.created, t.in_step, t.conflicts, t.updated), (5, 3, 1, 1, 0), "{t:?}");
    assert_eq!(parents.target_only, Some(1), "x1: {parents:?}");
    let after = b_owners(&h);
    // p1 equal: linked with no write (its version did not move); p2: A is primary and won,
    // logged as a conflict; x1: untouched.
    assert_eq!(after[0], before[0]);
    assert_eq!(after[1].1, "n");
    assert_eq!(after.iter().find(|o| o.0 == "x1"), before.iter().find(|o| o.0 == "x1"));
    let conflicts = h.rt.admin().conflicts("j", 10, None).await.unwrap().items;
    assert_eq!(conflicts.iter().map(|c| c.key.to_string()).collect::<Vec<_>>(), ["p2"]);
    assert_eq!(conflicts[0].winner, "a");
    // The summary table has a line per map with these counts.
    let table = report.table();
    assert!(table.contains("target only"), "{table}");
    let line = table.lines().find(|l| l.starts_with("parents")).unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[..8], ["parents", "X", "5", "3", "0", "1", "1", "0"], "{table}");
}

#[tokio::test]
async fn a_dry_run_counts_what_would_happen_and_writes_nothing() {
    let h = both_sides().await;
    let before = b_owners(&h);
    let opts = SyncOptions { dry_run: true, ..from_a(2) };
    let report = h.rt.steps.initial_sync("j", &opts, |_| {}).await.unwrap();
    let parents = map(&report, "parents");
    let t = parents.total();
    assert_eq!((t.listed, t.created, t.in_step, t.conflicts), (5, 3, 1, 1), "{t:?}");
    assert_eq!(parents.target_only, Some(1));
    assert!(report.table().contains("to create"));
    // Nothing written: B, the links, the rows, the conflicts, the checkpoints.
    assert_eq!(b_owners(&h), before);
    assert!(h.errors().await.is_empty());
    assert!(h.rt.admin().conflicts("j", 10, None).await.unwrap().items.is_empty());
    let state = &h.rt.state;
    let keys = [("parents", Key(vec!["p1".into()])), ("parents", Key(vec!["p3".into()]))];
    let refs: Vec<(&str, &Key)> = keys.iter().map(|(m, k)| (*m, k)).collect();
    assert!(state.links("j", &refs).await.unwrap().iter().all(Option::is_none), "no link written");
    let init = dualsync::domain::keys::init_pk("j", "parents");
    assert!(state.kv().get(&init, "FROM#a").await.unwrap().is_none(), "no checkpoint");
    // ...so the real sync afterwards does it all.
    let real = h.rt.steps.initial_sync("j", &from_a(2), |_| {}).await.unwrap();
    assert_eq!(map(&real, "parents").total().created, 3);
}

#[tokio::test]
async fn only_failed_runs_again_just_the_records_that_did_not_sync() {
    let h = harness().await;
    sync_failing_second_page(&h).await;
    assert_eq!(h.errors().await.len(), 2);
    let opts = SyncOptions { only_failed: true, ..from_a(2) };
    let report = h.rt.steps.initial_sync("j", &opts, |_| {}).await.unwrap();
    let t = map(&report, "parents").total();
    assert_eq!((t.listed, t.created), (2, 2), "p3 and p4 only: {t:?}");
    assert_eq!(map(&report, "children").total().listed, 0);
    assert_eq!(owners(&h), ["p1", "p2", "p3", "p4", "p5"]);
    let errors = h.errors().await;
    assert!(errors.iter().all(|e| e.status == ErrorStatus::Resolved), "{errors:#?}");
    // Nothing left to re-run.
    let again = h.rt.steps.initial_sync("j", &opts, |_| {}).await.unwrap();
    assert_eq!(again.records, 0);
}

#[tokio::test]
async fn a_map_with_twelve_lookups_syncs() {
    const N: usize = 12;
    let refs: Vec<String> = (1..=N).map(|i| format!("r{i}")).collect();
    let yaml = format!(
        "job: j
apps:
  - {{ name: a, connector: sqlite, path: A }}
  - {{ name: b, connector: sqlite, path: B }}
primary: a
table_groups:
  - name: g
    maps:
      - name: people
        sequence: 1
        entities: {{ a: people, b: persons }}
        keys: [{{ a: id, b: pid }}]
        fields: [{{ a: name, b: title }}]
      - name: deals
        sequence: 2
        entities: {{ a: deals, b: contracts }}
        keys: [{{ a: id, b: cid }}]
        fields: [{}]
        lookups: [{}]
",
        refs.iter().map(|r| format!("{{ a: {r}, b: {r} }}")).collect::<Vec<_>>().join(", "),
        refs.iter()
            .map(|r| format!("{{ map: people, fields: [{{ a: {r}, b: {r} }}] }}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let cols = refs.iter().map(|r| format!("{r} TEXT")).collect::<Vec<_>>().join(", ");
    let schemas = [
        format!("CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT); CREATE TABLE deals (id TEXT PRIMARY KEY, {cols});"),
        format!("CREATE TABLE persons (pid TEXT PRIMARY KEY, title TEXT); CREATE TABLE contracts (cid TEXT PRIMARY KEY, {cols});"),
    ];
    let h = Local::with(|a, b| {
        let def = common::apps_of(a, b, [&schemas[0], &schemas[1]], &yaml);
        let conn = rusqlite::Connection::open(a).unwrap();
        for i in 1..=N {
            conn.execute("INSERT INTO people VALUES (?1, 'n')", [format!("u{i}")]).unwrap();
        }
        for d in 1..=30 {
            // Each deal refers to twelve people, a different one per lookup.
            let values: Vec<String> = (0..N).map(|l| format!("'u{}'", (d + l) % N + 1)).collect();
            conn.execute_batch(&format!(
                "INSERT INTO deals (id, {}) VALUES ('d{d}', {})",
                refs.join(", "),
                values.join(", ")
            ))
            .unwrap();
        }
        def
    })
    .await;
    let report = h.rt.steps.initial_sync("j", &from_a(7), |_| {}).await.unwrap();
    assert_eq!(map(&report, "deals").total().created, 30, "{report:?}");
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(count(&h.b, "contracts"), 30);
    // Every deal's twelve references arrived as they are in A.
    let all = |path: &std::path::Path, table: &str, key: &str| -> Vec<String> {
        let conn = rusqlite::Connection::open(path).unwrap();
        let sql = format!("SELECT {key} || ':' || {} FROM {table} ORDER BY {key}", refs.join(" || ',' || "));
        let mut st = conn.prepare(&sql).unwrap();
        st.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    assert_eq!(all(&h.b, "contracts", "cid"), all(&h.a, "deals", "id"));
}
