//! Property tests of the delivery invariant (DESIGN §3):
//!
//! > once edits stop and queues drain, every link with no open error has canon(A) = canon(B);
//! > where both sides were edited concurrently the value is the primary's. No acknowledged
//! > change is lost; no change is applied twice with a different result.
//!
//! Two sqlite apps with different table and field names (`a`: parents/children, `b`:
//! owners/items), one job with a parent map and a child map that looks its parent up. The test
//! drives the pipeline itself, from one thread, one step at a time with a chosen batch size: app
//! edits, pumping the change logs, capture / sequence / deliver runs, crashes at every failpoint
//! of the steps, duplicated queue messages and clock moves, in random order. Then it drains the
//! pipeline and checks the apps.
//!
//! 1. `converges_under_chaos`: both sides in step, no open error, nothing dead-lettered, no
//!    update lost. 1b. `converges_with_missing_references`: the same with children created where
//!    their parent is missing: out of step only where an error is open, open only where out of
//!    step. 2. `primary_wins_concurrent_edits`: rounds of edits, then the pipeline: the primary's
//!    value where both sides edited, a conflict row naming it. 3. `redelivery_changes_nothing`:
//!    every message received, sent again after the drain, changes no value and no version.
//!    1c. `converges_under_faults`: deletes, app writes that fail, are refused or land and time
//!    out, edits between a delivery's read and its write, the job stopped and paused, retry
//!    requests, and two deliver workers on the same messages at once (a redelivery racing the
//!    delivery under way, their connector calls interleaved at random). 1d.
//!    `big_transactions_converge_under_faults`: the same with transactions over the queue limit
//!    among the faults, whose lanes take several messages of one FIFO group (and a fixed case of
//!    one, `a_transaction_over_the_queue_limit_converges_under_faults`). The `found_*` tests are
//!    the minimal cases the properties shrank library bugs to.
//!
//! "No change is lost" is checked with the history of the users' edits: every value ever written
//! is unique, and the test remembers, for each edit, the value it replaced on its side (and what
//! that one replaced, and so on). After the drain, the value both sides hold must be the last
//! value users wrote on one side or the other, and no edit may have replaced it: an edit made on
//! top of a value is newer than it, so that value winning over it is a lost update, whatever the
//! primary.
//!
//! Cases per property: `PROPTEST_CASES` when set (property 1d: one per [`BIG_CASE_COST`] of it),
//! else the defaults below (5,100 in all, and 80 big ones: 185 s of CPU in a debug build, two
//! tests at a time; 187 s wall on a two-core machine shared with other work, load average near
//! 5; property 1d alone 29 s of CPU, 34 s wall). Each property first runs the seeds saved in
//!
//! The harness is `model/` (shared with `invariant_odata.rs`, the same invariant over two OData
//! services); this file holds the sqlite apps behind it and the properties over them.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

mod common;
mod model;

use async_trait::async_trait;
use common::{Control, FaultyRegistry, Hook, Writes};
use dualsync::adapters::connectors::sqlite::transaction;
use dualsync::domain::canon;
use dualsync::domain::config::parse_job;
use dualsync::domain::job::Side;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::StepKind;
use model::*;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{TestCaseError, TestRunner};
use rusqlite::{params, Connection, OptionalExtension};

// ---------------------------------------------------------------------------------------------
// Configuration

// ---------------------------------------------------------------------------------------------
// Configuration

/// Cases per property when `PROPTEST_CASES` is not set.
const CASES_CONVERGENCE: u32 = 800;
const CASES_ORPHANS: u32 = 300;
const CASES_PRIMARY_WINS: u32 = 400;
const CASES_EXACTLY_ONCE: u32 = 600;
const CASES_FAULTS: u32 = 3000;
/// Cases of `big_transactions_converge_under_faults` (property 1d). One of its cases costs about
/// as much as this many of `converges_under_faults` (0.3 s of CPU in a debug build against
/// 30 ms: a big transaction's lane is delivered one change per wave), so `PROPTEST_CASES` = N
/// runs N / `BIG_CASE_COST` of them (at least one): the time of N ordinary cases.
const CASES_BIG: u32 = 80;
const BIG_CASE_COST: u32 = 10;

/// [`CASES_BIG`], or one per [`BIG_CASE_COST`] of `PROPTEST_CASES` when it is set.
fn big_cases() -> u32 {
    (cases(CASES_BIG * BIG_CASE_COST) / BIG_CASE_COST).max(1)
}

fn job_yaml(primary: Side) -> String {
    format!(
        "job: j
apps:
  - {{ name: a, connector: sqlite, path: A }}
  - {{ name: b, connector: sqlite, path: B }}
primary: {}
{}",
        app_name(primary),
        model::MAPS
    )
}

const SCHEMA_A: &str = "CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, n INTEGER);
    CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));";
const SCHEMA_B: &str = "CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT, num INTEGER);
    CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));";

/// The statements of one app (explicit column lists: capture adds `_ds_version`).
struct SideSql {
    upsert_parent: &'static str,
    upsert_child: &'static str,
    read_parent: &'static str,
    read_child: &'static str,
    /// Every row of each table, version included.
    dump: [&'static str; 2],
}

const SQL: [SideSql; 2] = [
    SideSql {
        upsert_parent: "INSERT INTO parents (pid, name, n) VALUES (?1, ?2, ?3)
            ON CONFLICT (pid) DO UPDATE SET name = excluded.name, n = excluded.n",
        upsert_child: "INSERT INTO children (pid, cno, label) VALUES (?1, ?2, ?3)
            ON CONFLICT (pid, cno) DO UPDATE SET label = excluded.label",
        read_parent: "SELECT name, n FROM parents WHERE pid = ?1",
        read_child: "SELECT label FROM children WHERE pid = ?1 AND cno = ?2",
        dump: [
            "SELECT pid, name, n, _ds_version FROM parents ORDER BY pid",
            "SELECT pid, cno, label, _ds_version FROM children ORDER BY pid, cno",
        ],
    },
    SideSql {
        upsert_parent: "INSERT INTO owners (owner_id, title, num) VALUES (?1, ?2, ?3)
            ON CONFLICT (owner_id) DO UPDATE SET title = excluded.title, num = excluded.num",
        upsert_child: "INSERT INTO items (owner_id, item_no, caption) VALUES (?1, ?2, ?3)
            ON CONFLICT (owner_id, item_no) DO UPDATE SET caption = excluded.caption",
        read_parent: "SELECT title, num FROM owners WHERE owner_id = ?1",
        read_child: "SELECT caption FROM items WHERE owner_id = ?1 AND item_no = ?2",
        dump: [
            "SELECT owner_id, title, num, _ds_version FROM owners ORDER BY owner_id",
            "SELECT owner_id, item_no, caption, _ds_version FROM items ORDER BY owner_id, item_no",
        ],
    },
];

/// The value `r` holds on a side (`None`: no such record). A parent's two fields always come
/// from one write; anything else is a torn write.
fn value_of(conn: &Connection, side: Side, r: Rec) -> Option<u64> {
    let sql = &SQL[side.index()];
    match r {
        Rec::Parent(_) => {
            let row: Option<(String, i64)> = conn
                .query_row(sql.read_parent, [r.pid()], |x| Ok((x.get(0)?, x.get(1)?)))
                .optional()
                .expect("read parent");
            row.map(|(name, n)| {
                assert_eq!(name, format!("n{n}"), "{side:?} {r:?}: fields from different writes");
                n as u64
            })
        }
        Rec::Child(_, c) => {
            let label: Option<String> = conn
                .query_row(sql.read_child, params![r.pid(), c as i64], |x| x.get(0))
                .optional()
                .expect("read child");
            label.map(|l| l.trim_start_matches('l').parse().expect("label"))
        }
    }
}

/// Deletes `r` (a parent with its children) on `side` in one app transaction; returns what it
/// deleted.
fn delete_rec(conn: &mut Connection, side: Side, r: Rec, txid: &str) -> Vec<Rec> {
    let (parents, children) = match side {
        Side::A => ("DELETE FROM parents WHERE pid = ?1", "DELETE FROM children WHERE pid = ?1"),
        Side::B => ("DELETE FROM owners WHERE owner_id = ?1", "DELETE FROM items WHERE owner_id = ?1"),
    };
    let child = match side {
        Side::A => "DELETE FROM children WHERE pid = ?1 AND cno = ?2",
        Side::B => "DELETE FROM items WHERE owner_id = ?1 AND item_no = ?2",
    };
    transaction(conn, txid, |tx| {
        let mut gone = Vec::new();
        match r {
            Rec::Parent(p) => {
                for c in 1..=BIG_CHILDREN {
                    if value_of(tx, side, Rec::Child(p, c)).is_some() {
                        gone.push(Rec::Child(p, c));
                    }
                }
                if value_of(tx, side, r).is_some() {
                    gone.push(r);
                }
                tx.execute(children, [r.pid()])?;
                tx.execute(parents, [r.pid()])?;
            }
            Rec::Child(_, c) => {
                if value_of(tx, side, r).is_some() {
                    gone.push(r);
                }
                tx.execute(child, params![r.pid(), c])?;
            }
        }
        Ok(gone)
    })
    .expect("app delete")
}

/// Writes value `v` to `r` on `side` in one app transaction; returns the value it replaced, or
/// `None` (outer) when it wrote nothing (a child whose parent is not there).
fn upsert_rec(conn: &mut Connection, side: Side, r: Rec, v: u64, txid: &str) -> Option<Option<u64>> {
    let sql = &SQL[side.index()];
    transaction(conn, txid, |tx| {
        if let Rec::Child(p, _) = r {
            if value_of(tx, side, Rec::Parent(p)).is_none() {
                return Ok(None);
            }
        }
        let before = value_of(tx, side, r);
        match r {
            Rec::Parent(_) => tx.execute(sql.upsert_parent, params![r.pid(), format!("n{v}"), v])?,
            Rec::Child(_, c) => tx.execute(sql.upsert_child, params![r.pid(), c, format!("l{v}")])?,
        };
        Ok(Some(before))
    })
    .expect("app transaction")
}
// ---------------------------------------------------------------------------------------------
// The sqlite apps

/// The two sqlite apps: their users' connections, and their change logs, which the runtime
/// pumps onto the capture queue.
struct SqliteApps {
    _dir: tempfile::TempDir,
    conns: [Connection; 2],
    paths: [PathBuf; 2],
}

#[async_trait(?Send)]
impl Apps for SqliteApps {
    fn edit(&mut self, side: Side, recs: &[Rec], counter: &mut u64, orphans: bool, txid: &str) -> Vec<UserWrite> {
        let sql = &SQL[side.index()];
        let mut next = *counter;
        let written = transaction(&mut self.conns[side.index()], txid, |tx| {
            let mut written = Vec::new();
            for &r in recs {
                if let Rec::Child(p, _) = r {
                    if !orphans && value_of(tx, side, Rec::Parent(p)).is_none() {
                        continue;
                    }
                }
                let before = value_of(tx, side, r);
                next += 1;
                match r {
                    Rec::Parent(_) => tx.execute(sql.upsert_parent, params![r.pid(), format!("n{next}"), next])?,
                    Rec::Child(_, c) => tx.execute(sql.upsert_child, params![r.pid(), c, format!("l{next}")])?,
                };
                written.push((r, next, before));
            }
            Ok(written)
        })
        .expect("app transaction");
        *counter = next;
        written
    }

    fn delete(&mut self, side: Side, r: Rec, txid: &str) -> Vec<Rec> {
        delete_rec(&mut self.conns[side.index()], side, r, txid)
    }

    fn value(&self, side: Side, r: Rec) -> Option<u64> {
        value_of(&self.conns[side.index()], side, r)
    }

    /// Every row of every table of both apps, versions included, and the last change-log seq.
    fn dump(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for side in Side::BOTH {
            let conn = &self.conns[side.index()];
            for sql in SQL[side.index()].dump {
                let mut stmt = conn.prepare(sql).expect("dump");
                let rows = stmt
                    .query_map([], |r| {
                        let cols: Vec<String> =
                            (0..4).map(|i| r.get_ref(i).map(|v| format!("{v:?}"))).collect::<Result<_, _>>()?;
                        Ok(cols.join(" | "))
                    })
                    .expect("dump")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("dump");
                out.push(rows);
            }
            // The last seq ever given (AUTOINCREMENT keeps it even if the log is trimmed).
            let seq: Option<i64> = conn
                .query_row("SELECT seq FROM sqlite_sequence WHERE name = '_dualsync_changes'", [], |r| r.get(0))
                .optional()
                .expect("change log");
            out.push(vec![format!("{side:?} change log up to seq {seq:?}")]);
        }
        out
    }

    async fn feeds(&mut self, rt: &LocalRuntime, limit: usize) -> usize {
        rt.pump_feeds(limit).await.expect("pump feeds")
    }

    fn user_hook(
        &self,
        side: Side,
        rec: Rec,
        value: Option<u64>,
        txid: String,
        edits: Arc<Mutex<Vec<HookEdit>>>,
    ) -> Hook {
        let path = self.paths[side.index()].clone();
        Box::new(move || {
            Box::pin(async move {
                let mut conn = Connection::open(&path).expect("open app");
                conn.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
                let mut edits = edits.lock().unwrap();
                match value {
                    None => {
                        edits.extend(delete_rec(&mut conn, side, rec, &txid).into_iter().map(|r| (side, r, None, None)))
                    }
                    Some(v) => {
                        if let Some(before) = upsert_rec(&mut conn, side, rec, v, &txid) {
                            edits.push((side, rec, Some(v), before));
                        }
                    }
                }
            })
        })
    }
}

impl Harness {
    async fn new(primary: Side) -> Harness {
        Self::with_seq(primary, true).await
    }

    /// `reads_seq`: whether the connectors' reads give each record's latest change seq (off:
    /// capture's link-state path).
    async fn with_seq(primary: Side, reads_seq: bool) -> Harness {
        // In memory when the machine offers it: thousands of cases create their apps afresh.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir");
        let paths = [dir.path().join("a.db"), dir.path().join("b.db")];
        let open = |p: &Path| {
            let c = Connection::open(p).expect("open app");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            c.pragma_update(None, "synchronous", "OFF").expect("synchronous");
            c.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
            c
        };
        let conns = [open(&paths[0]), open(&paths[1])];
        conns[0].execute_batch(SCHEMA_A).expect("schema a");
        conns[1].execute_batch(SCHEMA_B).expect("schema b");
        let mut def = parse_job("job.yaml", &job_yaml(primary)).expect("job");
        def.apps[0].path = Some(paths[0].display().to_string());
        def.apps[1].path = Some(paths[1].display().to_string());
        let controls = [Control::new(), Control::new()].map(|c| Control { reads_change_seq: reads_seq, ..c });
        let registry = Arc::new(FaultyRegistry::new(controls.clone()));
        let apps = Box::new(SqliteApps { _dir: dir, conns, paths });
        Harness::start(primary, def, apps, registry, controls).await
    }
}

// ---------------------------------------------------------------------------------------------
// The properties

/// Property 1: convergence under chaos.
async fn convergence(primary: Side, actions: &[Action]) -> Result<(), TestCaseError> {
    convergence_with(primary, actions, false).await
}

async fn convergence_with(primary: Side, actions: &[Action], orphans: bool) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    h.orphans = orphans;
    for a in actions {
        h.act(a).await;
    }
    h.drain().await?;
    h.check_converged().await
}

/// Property 2: the primary wins concurrent edits, a one-sided edit goes through, and every
/// concurrent edit leaves a conflict row naming the primary the winner, over rounds on the same
/// apps.
async fn primary_wins(primary: Side, rounds: &[(Vec<Action>, Vec<Action>)]) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    for (round, (edits, pipeline)) in rounds.iter().enumerate() {
        // Phase 1: edits only; the last value each side wrote to each record.
        let mut last: BTreeMap<Rec, [Option<u64>; 2]> = BTreeMap::new();
        for a in edits {
            for (side, r, v) in h.act(a).await {
                last.entry(r).or_default()[side.index()] = Some(v);
            }
        }
        // Phase 2: the pipeline, with crashes and duplicates; then drain.
        for a in pipeline {
            h.act(a).await;
        }
        h.drain().await?;
        h.check_converged().await?;

        let conflicts = h.conflicts().await;
        for (r, values) in &last {
            let expected = match values {
                [Some(_), Some(_)] => values[h.primary.index()].expect("primary's value"),
                [Some(v), None] | [None, Some(v)] => *v,
                [None, None] => unreachable!("an edit of neither side"),
            };
            let got = [h.value(Side::A, *r), h.value(Side::B, *r)];
            prop_assert_eq!(
                got,
                [Some(expected); 2],
                "round {}: {:?} written (A, B) = {:?}, primary {:?}: expected {} on both sides",
                round,
                r,
                values,
                primary,
                expected
            );
            if let [Some(a), Some(b)] = values {
                // The conflict as detected: each side's content then, A's first.
                let map = &h.lj.job.maps[r.map_idx()];
                let hash = |v: u64| canon::hash(&canon::canon(map, Side::A, &r.fields_a(v)).expect("canon"));
                let hashes = [hash(*a), hash(*b)];
                let found = conflicts.iter().any(|c| {
                    c.map == r.map() && c.key == r.key() && c.winner == app_name(primary) && c.hashes == hashes
                });
                prop_assert!(
                    found,
                    "round {}: {:?} was edited on both sides ((A, B) = {:?}), but no conflict row of that pair \
                     names {} the winner; conflicts: {:#?}",
                    round,
                    r,
                    values,
                    app_name(primary),
                    conflicts
                );
            }
        }
    }
    Ok(())
}

/// Property 3: exactly once in effect. After a drain, every message any step may have received,
/// sent again and run through the whole pipeline, changes nothing in the apps: no value, no
/// version, no change-log row.
async fn exactly_once(primary: Side, actions: &[Action], expire_dedupe: bool) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    h.log = Some(BTreeSet::new());
    for a in actions {
        h.act(a).await;
    }
    h.drain().await?;
    h.check_converged().await?;
    let before = h.dump();
    if expire_dedupe {
        // Past capture's transaction dedupe (24 h) and the FIFO deduplication window (5 min):
        // every copy goes all the way to delivery.
        h.clock.advance(25 * 3600 * 1000);
    }
    let log = h.log.take().unwrap_or_default();
    for (step, group, body) in log.iter().cloned() {
        h.resend(STEPS[step], group, body).await;
    }
    h.drain().await?;
    h.check_converged().await?;
    prop_assert_eq!(
        &before,
        &h.dump(),
        "sending the {} messages the steps received again changed the apps (values or versions)",
        log.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_CONVERGENCE), ..ProptestConfig::default() })]
    #[test]
    fn converges_under_chaos(primary in side(), actions in prop::collection::vec(chaos_action(), 1..60)) {
        block_on(convergence(primary, &actions))?;
    }
}

/// Property 1c: convergence under faults: deletes (and deletes then creates), app writes that
/// fail, are refused or time out after landing, user edits and deletes between a delivery's read
/// and its write, the job stopped, started, paused and resumed mid-flight, retry requests, a
/// crash between the pending mark and the write, and connectors with or without the change seq
/// in their reads. After the faults end (apps back, job running, open errors retried as an
/// operator would), every record is in step unless an open error names it, no value comes back
/// that a user replaced (unless a logged conflict decided it), and nothing is dead-lettered.
async fn convergence_under_faults(primary: Side, reads_seq: bool, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut h = Harness::with_seq(primary, reads_seq).await;
    // Deletes and refusals leave children without parents now and then.
    h.orphans = true;
    for a in actions {
        h.act(a).await;
    }
    h.settle().await?;
    h.check_converged().await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_FAULTS), ..ProptestConfig::default() })]
    #[test]
    fn converges_under_faults(
        primary in side(),
        reads_seq in any::<bool>(),
        actions in prop::collection::vec(fault_action(), 1..60),
    ) {
        block_on(convergence_under_faults(primary, reads_seq, &actions))?;
    }
}

/// Property 1d: the same with transactions over the queue limit among the faults, at least one
/// (see [`Action::BigEdit`]): their lanes go out in several messages of one FIFO group.
///
/// Run by a [`TestRunner`] of its own, not `proptest!`: the macro sets the case count from
/// `PROPTEST_CASES` over the config it is given, so the count scaled by [`BIG_CASE_COST`] was
/// lost and `PROPTEST_CASES=2500`, meant as 20 cases, ran 2,500 of them (about twenty minutes in a
/// debug build: the "cases that take minutes" that kept this property out of CI). Each case
/// costs 0.1 to 3 s in a debug build; every drain it makes is bounded by [`DRAIN_ROUNDS`].
#[test]
fn big_transactions_converge_under_faults() {
    let config = ProptestConfig {
        cases: big_cases(),
        source_file: Some(file!()),
        test_name: Some(concat!(module_path!(), "::big_transactions_converge_under_faults")),
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    // (primary, reads_seq, actions): the faults with a big transaction put in among them.
    let case = (
        side(),
        any::<bool>(),
        prop::collection::vec(prop_oneof![12 => fault_action(), 1 => big_edit()], 0..40),
        big_edit(),
        any::<Index>(),
    )
        .prop_map(|(primary, reads_seq, mut actions, big, at)| {
            actions.insert(at.index(actions.len() + 1), big);
            (primary, reads_seq, actions)
        });
    let result = runner
        .run(&case, |(primary, reads_seq, actions)| block_on(convergence_under_faults(primary, reads_seq, &actions)));
    if let Err(e) = result {
        panic!("{e}\n{runner}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_ORPHANS), ..ProptestConfig::default() })]
    /// Property 1b: the same with children created where their parent is missing: missing
    /// references, errors that stay open until the child syncs, and must be resolved when it does.
    #[test]
    fn converges_with_missing_references(primary in side(), actions in prop::collection::vec(chaos_action(), 1..60)) {
        block_on(convergence_with(primary, &actions, true))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_PRIMARY_WINS), ..ProptestConfig::default() })]
    #[test]
    fn primary_wins_concurrent_edits(
        primary in side(),
        rounds in prop::collection::vec(
            (prop::collection::vec(edit(), 1..10), prop::collection::vec(pipeline_action(), 0..30)),
            2..=3,
        ),
    ) {
        block_on(primary_wins(primary, &rounds))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_EXACTLY_ONCE), ..ProptestConfig::default() })]
    #[test]
    fn redelivery_changes_nothing(
        primary in side(),
        actions in prop::collection::vec(chaos_action(), 1..40),
        expire_dedupe in any::<bool>(),
    ) {
        block_on(exactly_once(primary, &actions, expire_dedupe))?;
    }
}

// ---------------------------------------------------------------------------------------------
// What the properties found, as fixed cases (the minimal inputs proptest shrank them to)

/// A parent created and updated again before its first delivery: its first change was skipped
/// as stale, so the child created in between reached the other app before the parent
/// ("missing reference").
#[test]
fn found_a_stale_first_change_of_a_parent_still_goes_before_its_child() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(3)] },
        Edit { side: Side::A, recs: vec![Rec::Child(3, 1)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(3)] },
    ];
    run(block_on(convergence(Side::A, &actions)));
    // Parent and child in one transaction, then the parent again.
    let actions = [
        Edit { side: Side::B, recs: vec![Rec::Parent(1), Rec::Child(1, 2)] },
        Edit { side: Side::B, recs: vec![Rec::Parent(1)] },
    ];
    run(block_on(convergence(Side::A, &actions)));
}

/// The primary's change overwrote a concurrent edit and the process died before the conflict
/// row was written; the redelivery found both sides in step: no trace of the conflict.
#[test]
fn found_a_won_conflict_is_logged_even_if_the_process_dies_after_the_write() {
    use Action::*;
    let rounds = [
        (vec![Edit { side: Side::A, recs: vec![Rec::Parent(0)] }], vec![]),
        (
            vec![
                Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
                Edit { side: Side::B, recs: vec![Rec::Parent(0)] },
            ],
            vec![
                Feeds { limit: 9 },
                Step { step: StepKind::Capture, batch: 4 },
                Step { step: StepKind::Sequence, batch: 4 },
                Crash { point: 4, batch: 1 },
            ],
        ),
    ];
    run(block_on(primary_wins(Side::A, &rounds)));
}

/// The process died between the write to B and the link commit, then A's user edited the record
/// again: the next delivery took dualsync's own write in B for B's edit, a conflict that B (the
/// primary) won, and A's newer edit was lost (or, with own-write echoes dropped at ingress, the
/// two sides stayed apart).
#[test]
fn found_a_crash_between_write_and_link_commit_is_not_taken_for_an_edit() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Crash { point: 4, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
    ];
    run(block_on(convergence(Side::B, &actions)));
}

/// A's change is written to B and the process dies before the batch is acknowledged; B's user
/// then edits the record, on top of what dualsync wrote. That edit is the newest. With a link
/// commit after the write, the redelivery saw B hold neither the last synced content nor the
/// content it wrote, took B's edit for a concurrent one, and A being primary, wrote A's older
/// content over it. The pending write on the link, with the version it replaced, tells them
/// apart (`PendingWrite::landed`).
#[test]
fn found_an_edit_on_top_of_a_write_that_crashed_before_its_commit_is_kept() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Crash { point: 4, batch: 1 },
        Edit { side: Side::B, recs: vec![Rec::Parent(2)] },
    ];
    run(block_on(convergence(Side::A, &actions)));
}

/// A child synced after its missing reference was mended, and the process died right after the
/// link commit, which had already dropped the error from the link: the error row stayed open
/// for good, though the child is in step (and no later sync would resolve it).
#[test]
fn found_an_error_is_resolved_even_if_the_process_dies_after_the_commit() {
    use Action::*;
    let pipeline = || {
        vec![
            Feeds { limit: 9 },
            Step { step: StepKind::Capture, batch: 4 },
            Step { step: StepKind::Sequence, batch: 4 },
        ]
    };
    let mut actions = vec![Edit { side: Side::A, recs: vec![Rec::Child(0, 1)] }];
    actions.extend(pipeline());
    actions.push(Step { step: StepKind::Deliver, batch: 4 });
    actions.push(Edit { side: Side::A, recs: vec![Rec::Parent(0)] });
    actions.extend(pipeline());
    actions.push(Step { step: StepKind::Deliver, batch: 4 });
    actions.push(Edit { side: Side::A, recs: vec![Rec::Child(0, 1)] });
    actions.extend(pipeline());
    actions.push(Crash { point: 5, batch: 4 });
    run(block_on(convergence_with(Side::A, &actions, true)));
}

/// Issue 9, item 2: primary A, p0 synced; the write of A's edit to B fails (503), is refused
/// (400) or times out after landing; B's user then edits p0. Both sides changed since the last
/// sync: A's value wins on both sides and a conflict row says so (the failed write's mark passed
/// for a landed one, and B's edit for one made on top of it).
#[test]
fn found_a_failed_write_then_an_edit_of_its_target_is_a_conflict_the_primary_wins() {
    use Action::*;
    let pipeline = || {
        vec![
            Feeds { limit: 9 },
            Step { step: StepKind::Capture, batch: 4 },
            Step { step: StepKind::Sequence, batch: 4 },
            Step { step: StepKind::Deliver, batch: 4 },
        ]
    };
    for writes in [Writes::Fail, Writes::Refuse, Writes::LandThenFail] {
        run(block_on(async {
            let mut h = Harness::new(Side::A).await;
            h.act(&Edit { side: Side::A, recs: vec![Rec::Parent(0)] }).await;
            h.drain().await?;
            let a1 = h.act(&Edit { side: Side::A, recs: vec![Rec::Parent(0)] }).await[0].2;
            h.act(&Fault { side: Side::B, writes }).await;
            for a in pipeline() {
                h.act(&a).await;
            }
            h.act(&Edit { side: Side::B, recs: vec![Rec::Parent(0)] }).await;
            h.settle().await?;
            h.check_converged().await?;
            let got = [h.value(Side::A, Rec::Parent(0)), h.value(Side::B, Rec::Parent(0))];
            prop_assert_eq!(got, [Some(a1); 2], "{:?}: the primary's value on both sides", writes);
            let conflicts = h.conflicts().await;
            prop_assert!(conflicts.iter().any(|c| c.key == Rec::Parent(0).key() && c.winner == "a"), "{:?}", writes);
            Ok(())
        }));
    }
}

/// Issue 9, item 3: deleted and created again on one side, in two transactions and in one: the
/// live delete's echo from the other app came back as a user's delete, and both sides ended
/// without the record.
#[test]
fn found_a_delete_and_create_again_ends_present_on_both_sides() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 4 },
        Step { step: StepKind::Sequence, batch: 4 },
        Step { step: StepKind::Deliver, batch: 4 },
        Delete { side: Side::A, rec: Rec::Parent(1) },
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
    ];
    run(block_on(async {
        let mut h = Harness::new(Side::B).await;
        for a in &actions {
            h.act(a).await;
        }
        h.settle().await?;
        h.check_converged().await?;
        prop_assert!(h.value(Side::A, Rec::Parent(1)).is_some() && h.value(Side::B, Rec::Parent(1)).is_some());
        Ok(())
    }));
}

/// Issue 9, item 4: a job stopped with deliveries in flight, started later: they arrive, in
/// order, and none is dead-lettered (they were retried into the dead-letter queue).
#[test]
fn found_a_job_stopped_mid_flight_loses_nothing() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(2), Rec::Child(2, 1)] },
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 4 },
        Step { step: StepKind::Sequence, batch: 4 },
        Lifecycle(Op::Stop),
        Step { step: StepKind::Deliver, batch: 4 },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 4 },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 4 },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 4 },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 4 },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 4 },
        Lifecycle(Op::Start),
    ];
    run(block_on(convergence_under_faults(Side::A, true, &actions)));
}

/// Primary A. Two deliver workers run A's first change of p2 (the second received it again once
/// the visibility timeout passed); B's writes land and answer like a time-out. The first worker
/// marks the write pending and makes it; the second reads B holding the written content, in
/// step, and acknowledges the message without a link write (an echo of a landed write costs
/// none); then the first worker's time-out marks the write uncertain. B's user edits p2 on top
/// of the landed write: judged against an uncertain mark, a conflict that A wins, yet A had no
/// change left to send. The two sides stayed apart, B's newer edit neither synced nor undone.
/// A redelivery of the change that made a mark, finding it landed, now commits the link
/// (`PendingWrite::commit_when_in_step`), so the late uncertain mark loses its race.
#[test]
fn found_a_redelivery_that_finds_a_timed_out_write_landed_settles_it_before_the_time_out_is_told() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(2), Rec::Parent(0)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Fault { side: Side::B, writes: Writes::LandThenFail },
        Step { step: StepKind::Sequence, batch: 1 },
        TwoWorkers { batch: 1, yields: 0xa4e1_7068_0a03_9b0e },
        Edit { side: Side::B, recs: vec![Rec::Parent(2)] },
    ];
    run(block_on(convergence_under_faults(Side::A, false, &actions)));
}

/// A transaction over the queue limit (issue 9 point 12): a parent and 130 children in one app
/// transaction whose captured form and lane take more than one message each, written on both
/// sides (a conflict per record), delivered under faults: writes that land and answer like a
/// time-out, a crash between the pending mark and the write, an edit and a delete between a
/// delivery's read and its write, two workers on the same messages, a retry. It converges like
/// any other, and its lane went out in several messages of one FIFO group.
#[test]
fn a_transaction_over_the_queue_limit_converges_under_faults() {
    use Action::*;
    for primary in [Side::A, Side::B] {
        run(block_on(async {
            let mut h = Harness::with_seq(primary, false).await;
            h.orphans = true;
            let prelude = [
                BigEdit { side: Side::A, parent: 1 },
                Edit { side: Side::B, recs: vec![Rec::Parent(1)] },
                Feeds { limit: 1000 },
                Step { step: StepKind::Capture, batch: 4 },
                Step { step: StepKind::Sequence, batch: 4 },
            ];
            for a in &prelude {
                h.act(a).await;
            }
            let msgs = h.rt.queue(StepKind::Deliver).peek_all().expect("peek");
            let largest = msgs.iter().map(|m| m.body.len()).max().unwrap_or_default();
            prop_assert!(msgs.len() >= 2, "{} deliver message(s), the largest {largest} bytes", msgs.len());
            let groups: BTreeSet<_> = msgs.iter().map(|m| m.group.clone()).collect();
            prop_assert!(groups.len() < msgs.len(), "a lane in several messages of its group: {groups:?}");
            let faults = [
                Fault { side: Side::B, writes: Writes::LandThenFail },
                Crash { point: 3, batch: 1 },
                DuringWrite { target: Side::B, side: Side::B, rec: Rec::Child(1, 5), delete: false },
                Step { step: StepKind::Deliver, batch: 1 },
                BigEdit { side: Side::B, parent: 1 },
                DuringWrite { target: Side::A, side: Side::A, rec: Rec::Child(1, 7), delete: true },
                Feeds { limit: 1000 },
                Step { step: StepKind::Capture, batch: 4 },
                Step { step: StepKind::Sequence, batch: 4 },
                TwoWorkers { batch: 2, yields: 0x5555_5555_5555_5555 },
                Fault { side: Side::B, writes: Writes::Fail },
                Step { step: StepKind::Deliver, batch: 2 },
                Fault { side: Side::B, writes: Writes::Work },
                Retry,
                Step { step: StepKind::Deliver, batch: 3 },
            ];
            for a in &faults {
                h.act(a).await;
            }
            h.settle().await?;
            h.check_converged().await
        }));
    }
}

/// Primary A. A's p1 is created on B by a write that lands and answers like a time-out; B's
/// user edits it there and then deletes it; A's change comes again (the delete not yet
/// captured), finds B without p1 and creates it again, and that write too lands and times out;
/// its retry finds p1 in step and committed the link, dropping the create mark. The live delete
/// then found p1 on B with nothing saying it was dualsync's own create, and skipped the delete
/// as stale: p1 came back on B with the value B's user had replaced, then deleted (a lost
/// update). An in-step commit now keeps a create mark of the content it commits
/// (`LinkState::kept_in_step`). The first list is what the property shrank a related case to
/// while the redelivery commit (`LinkState::commit_when_in_step`) still dropped the mark.
#[test]
fn found_a_create_that_timed_out_after_landing_is_still_known_as_ours_to_a_racing_delete() {
    use Action::*;
    let mut actions = vec![
        Edit { side: Side::A, recs: vec![Rec::Parent(2), Rec::Parent(1)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Step { step: StepKind::Sequence, batch: 1 },
        Fault { side: Side::B, writes: Writes::LandThenFail },
        Step { step: StepKind::Deliver, batch: 1 },
        Edit { side: Side::B, recs: vec![Rec::Parent(1)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Delete { side: Side::B, rec: Rec::Parent(1) },
        Crash { point: 2, batch: 1 },
    ];
    run(block_on(convergence_under_faults(Side::A, false, &actions)));
    // The same with the second create timing out too: all but the live delete captured, then
    // deliver, then its retry in step.
    actions.extend([
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 8 },
        Step { step: StepKind::Sequence, batch: 8 },
        Step { step: StepKind::Deliver, batch: 8 },
        Fault { side: Side::B, writes: Writes::Work },
        Advance { ms: 400_000 },
        Step { step: StepKind::Deliver, batch: 8 },
    ]);
    run(block_on(convergence_under_faults(Side::A, false, &actions)));
}

/// Primary B. Two deliver workers on A's first change of p1 (the second received it again once
/// the visibility timeout passed), both reading before either writes. The first marks its
/// create of p1 on B; the second reads that mark before the create is made, judges it not
/// landed, and marks its own; then the first one's create lands, the second one's is refused (B
/// has p1 now) and it took its mark back to the link as settled when it read, with no mark and
/// no last sync: the content the first one wrote to B was dualsync's, and the link no longer
/// said so. A's next edit then met B "changed" too, a conflict that B won with A's older
/// value. A mark taken back now leaves the link as it was read, the first mark in it.
#[test]
fn found_two_workers_creating_one_record_leave_the_link_knowing_the_create_that_landed() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Child(0, 1), Rec::Parent(1)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
        Crash { point: 1, batch: 1 },
        TwoWorkers { batch: 2, yields: 0x9a71_b9ee_c208_957a },
        Edit { side: Side::A, recs: vec![Rec::Parent(1)] },
    ];
    run(block_on(convergence_under_faults(Side::B, false, &actions)));
}

/// Primary A; B's writes fail like a 503. Two deliver workers on A's change of p0, the second at
/// the message's last receive: its write fails, so it records a retriable row and answers the
/// message. The first one, slower, read the link after that and resolved the link's open rows
/// before marking its write, which then failed too; its answer came on a receipt that was stale
/// by then. Nothing was left to retry: the row resolved, the message gone, p0 only on A. The
/// link's rows now stay open on the mark and are resolved once a write is made.
#[test]
fn found_a_row_recorded_by_one_worker_is_not_resolved_by_another_whose_write_fails() {
    use Action::*;
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Fault { side: Side::B, writes: Writes::Fail },
        Crash { point: 1, batch: 1 },
        TwoWorkers { batch: 1, yields: 0 },
        Advance { ms: 24000 },
        Crash { point: 2, batch: 1 },
        TwoWorkers { batch: 1, yields: 0x2434_f61f_e046_1f55 },
    ];
    run(block_on(convergence_under_faults(Side::A, false, &actions)));
}

/// Primary B; A's writes fail like a 503. Two deliver workers on B's first change of a child.
/// The first marks its create on A; A's user creates the child just before that write (which
/// then fails); the second, reading the first one's mark while it was still certain, took A's
/// record for an edit made on top of a landed write (the other side changed: nothing to send)
/// and answered the message; then the first marked its write uncertain. A's change of the
/// child then met an uncertain mark, a conflict that B won, with no change of B's left to send:
/// the sides stayed apart. The change that made a mark, judging it landed and the target
/// changed since, now commits that judgement like an in-step finding, so the late uncertain
/// mark loses its race (the edit wins: the documented limit of a mark whose answer was lost).
#[test]
fn found_a_redelivery_that_finds_the_target_edited_after_a_mark_settles_it_first() {
    use Action::*;
    let actions = [
        Fault { side: Side::A, writes: Writes::Fail },
        Edit { side: Side::B, recs: vec![Rec::Child(0, 2)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        DuringWrite { target: Side::A, side: Side::A, rec: Rec::Child(0, 2), delete: false },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 2 },
        Step { step: StepKind::Sequence, batch: 2 },
        Crash { point: 4, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        TwoWorkers { batch: 2, yields: 0xce18_db6e_e7f4_35ba },
    ];
    run(block_on(convergence_under_faults(Side::B, false, &actions)));
}

/// Primary B; A's writes fail like a 503. B's user creates p2; A's user creates it and deletes
/// it, and capture takes that delete live to B. A's user creates p2 again; delivery creates it
/// on B from A's first change (read fresh), and A's user deletes it just before that write. B's
/// change, behind it, finds B holding that content (the link's last sync) and A without p2, and
/// writes it to A: a create that fails, its mark uncertain; the process dies before the
/// acknowledgement, and A's user creates p2 once more. A's change then met the uncertain mark,
/// its target changed since: judged unknown, both sides changed, a conflict B won, though B
/// held only the content of the last sync and had no change left to send (B's own change
/// came again stale, behind dualsync's writes to B): A kept its value, B an older one of A's.
/// An uncertain write of the content the link last synced leaves that content the last sync,
/// landed or not (`LinkState::last_synced`).
#[test]
fn found_an_uncertain_write_of_the_content_last_synced_leaves_the_last_sync_known() {
    use Action::*;
    let actions = [
        Edit { side: Side::B, recs: vec![Rec::Parent(2)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Delete { side: Side::A, rec: Rec::Parent(2) },
        Fault { side: Side::A, writes: Writes::Fail },
        DuringWrite { target: Side::B, side: Side::A, rec: Rec::Parent(2), delete: true },
        Feeds { limit: 3 },
        Step { step: StepKind::Capture, batch: 3 },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Step { step: StepKind::Sequence, batch: 2 },
        Crash { point: 6, batch: 2 },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
    ];
    run(block_on(convergence_under_faults(Side::B, false, &actions)));
}

/// Primary B. B's user creates p0 and p1; A's user creates c(0,1). Two deliver workers on both
/// messages: the first reads A's child and marks its create on B; A's user deletes p0 with its
/// child just before a write to A; the second, having read the link before that mark, finds the
/// child on neither side and deleted the link, whatever it held by then. The first one's create
/// then landed on B with no link, A's delete took it for B's newer record, and the child came
/// back on A. A link found on neither side now goes only at the revision read, and not while
/// it marks a create this change made, which may still land (`LinkState::creating_from`).
#[test]
fn found_a_create_racing_a_delete_of_its_source_keeps_its_link() {
    use Action::*;
    let actions = [
        Edit { side: Side::B, recs: vec![Rec::Parent(0), Rec::Parent(1)] },
        Edit { side: Side::A, recs: vec![Rec::Child(0, 1)] },
        Feeds { limit: 1 },
        DuringWrite { target: Side::A, side: Side::A, rec: Rec::Parent(0), delete: true },
        Step { step: StepKind::Capture, batch: 2 },
        Step { step: StepKind::Sequence, batch: 2 },
        TwoWorkers { batch: 2, yields: 0x2fcd_5b9d_43a1_d425 },
    ];
    run(block_on(convergence_under_faults(Side::B, false, &actions)));
}
