//! Property tests of the delivery invariant (DESIGN §3):
//!
//! > once edits stop and queues drain, every link with no open error has canon(A) = canon(B);
//! > where both sides were edited concurrently the value is the primary's. No acknowledged
//! > change is lost; no change is applied twice with a different result.
//!
//! Two sqlite apps with different table and field names (`a`: parents/children, `b`:
//! owners/items), one job with a parent map and a child map that looks its parent up. The test
//! drives the pipeline itself, one step at a time with a chosen batch size, from one thread: app
//! edits, pumping the change logs, capture / sequence / deliver runs, crashes at every failpoint
//! of the steps, duplicated queue messages and clock moves, in random order. Then it drains the
//! pipeline and checks the apps.
//!
//! Cases per property: `PROPTEST_CASES` when set, else the defaults below.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use dualsync::adapters::connectors::sqlite::transaction;
use dualsync::adapters::embedded::{EmbeddedDb, EmbeddedQueue};
use dualsync::domain::canon;
use dualsync::domain::change::Key;
use dualsync::domain::config::parse_job;
use dualsync::domain::errors::{ConflictRecord, ErrorStatus, SyncError};
use dualsync::domain::job::Side;
use dualsync::ports::{ManualClock, OutMessage, Queue};
use dualsync::runtime::local::{LocalRuntime, BATCH};
use dualsync::runtime::verify;
use dualsync::runtime::worker::run_once;
use dualsync::state::ErrorFilter;
use dualsync::steps::{Failpoints, LoadedJob};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Configuration

/// Cases per property when `PROPTEST_CASES` is not set (about 2,000 in all; see the report in
/// the commit that added this file for the time it takes).
const CASES_CONVERGENCE: u32 = 900;
const CASES_PRIMARY_WINS: u32 = 450;
const CASES_EXACTLY_ONCE: u32 = 700;

/// Parents `p0..p3`, children `1..=3` of each.
const PARENTS: u8 = 4;
const CHILDREN: u8 = 3;

/// Queues give a message back after 30 s; moving the clock this far makes it visible again.
const PAST_VISIBILITY_MS: i64 = 31_000;

/// A message received this often goes to the dead-letter queue (max receives 5). Crashes are
/// the only failed receives here, so at most 4 per batch of work keep every message out of it:
/// further crash actions run their step without crashing.
const MAX_CRASHES: usize = 4;

const DRAIN_ROUNDS: usize = 200;

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn job_yaml(primary: Side) -> String {
    let primary = if primary == Side::A { "a" } else { "b" };
    format!(
        "job: j
apps:
  - {{ name: a, connector: sqlite, path: A }}
  - {{ name: b, connector: sqlite, path: B }}
primary: {primary}
table_groups:
  - name: g
    maps:
      - name: parents
        sequence: 1
        entities: {{ a: parents, b: owners }}
        keys: [{{ a: pid, b: owner_id }}]
        fields:
          - {{ a: name, b: title }}
          - {{ a: n, b: num }}
      - name: children
        sequence: 2
        entities: {{ a: children, b: items }}
        keys: [{{ a: pid, b: owner_id }}, {{ a: cno, b: item_no }}]
        fields: [{{ a: label, b: caption }}]
        lookups:
          - map: parents
            fields: [{{ a: pid, b: owner_id }}]
"
    )
}

const SCHEMA_A: &str = "CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, n INTEGER);
    CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));";
const SCHEMA_B: &str = "CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT, num INTEGER);
    CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));";

/// Per side: (parent upsert, parent exists, child upsert, parent read, child read, dumps).
struct SideSql {
    upsert_parent: &'static str,
    parent_exists: &'static str,
    upsert_child: &'static str,
    read_parent: &'static str,
    read_child: &'static str,
    dump: [&'static str; 2],
}

const SQL: [SideSql; 2] = [
    SideSql {
        upsert_parent: "INSERT INTO parents (pid, name, n) VALUES (?1, ?2, ?3)
            ON CONFLICT (pid) DO UPDATE SET name = excluded.name, n = excluded.n",
        parent_exists: "SELECT count(*) FROM parents WHERE pid = ?1",
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
        parent_exists: "SELECT count(*) FROM owners WHERE owner_id = ?1",
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

// ---------------------------------------------------------------------------------------------
// Actions

/// A record of either map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Rec {
    Parent(u8),
    /// Parent, child number (1-based).
    Child(u8, u8),
}

impl Rec {
    fn pid(self) -> String {
        match self {
            Rec::Parent(p) | Rec::Child(p, _) => format!("p{p}"),
        }
    }
    fn map(self) -> &'static str {
        match self {
            Rec::Parent(_) => "parents",
            Rec::Child(..) => "children",
        }
    }
    fn map_idx(self) -> usize {
        match self {
            Rec::Parent(_) => 0,
            Rec::Child(..) => 1,
        }
    }
    fn key(self) -> Key {
        match self {
            Rec::Parent(_) => Key(vec![self.pid()]),
            Rec::Child(_, c) => Key(vec![self.pid(), c.to_string()]),
        }
    }
    /// The content written with value `v`, as side A's fields (what `canon` reads).
    fn fields_a(self, v: u64) -> canon::Fields {
        let fields = match self {
            Rec::Parent(_) => json!({ "pid": self.pid(), "name": format!("n{v}"), "n": v }),
            Rec::Child(_, c) => json!({ "pid": self.pid(), "cno": c, "label": format!("l{v}") }),
        };
        serde_json::from_value(fields).expect("fields")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Capture,
    Sequence,
    Deliver,
}

/// Every failpoint of the steps and the step it is in.
const POINTS: [(&str, Stage); 6] = [
    ("capture.after_send", Stage::Capture),
    ("sequence.after_send", Stage::Sequence),
    ("deliver.after_read", Stage::Deliver),
    ("deliver.after_write", Stage::Deliver),
    ("deliver.after_commit", Stage::Deliver),
    ("deliver.before_ack", Stage::Deliver),
];

#[derive(Clone)]
enum Action {
    /// One app transaction upserting these records with fresh values (a child only where its
    /// parent exists on that side).
    Edit { side: Side, recs: Vec<Rec> },
    /// Move up to `limit` change-log rows of each app onto the capture queue.
    Feeds { limit: usize },
    /// Run one step once on a batch of up to `batch` messages.
    Step { stage: Stage, batch: usize },
    /// Arm a failpoint (index into [`POINTS`]), run its step, then move the clock past the
    /// visibility timeout so that the unacknowledged batch comes back.
    Crash { point: usize, batch: usize },
    /// Send a copy of a message of the queue again (a FIFO copy gets a new deduplication id).
    Duplicate { stage: Stage, pick: Index },
    /// Move the clock.
    Advance { ms: i64 },
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Edit { side, recs } => write!(f, "Edit({side:?}, {recs:?})"),
            Action::Feeds { limit } => write!(f, "Feeds({limit})"),
            Action::Step { stage, batch } => write!(f, "{stage:?}({batch})"),
            Action::Crash { point, batch } => write!(f, "Crash({}, {batch})", POINTS[*point].0),
            Action::Duplicate { stage, pick } => write!(f, "Duplicate({stage:?}, {})", pick.index(1 << 16)),
            Action::Advance { ms } => write!(f, "Advance({ms})"),
        }
    }
}

fn side() -> impl Strategy<Value = Side> {
    prop_oneof![Just(Side::A), Just(Side::B)]
}

fn stage() -> impl Strategy<Value = Stage> {
    prop_oneof![Just(Stage::Capture), Just(Stage::Sequence), Just(Stage::Deliver)]
}

fn rec() -> impl Strategy<Value = Rec> {
    prop_oneof![(0..PARENTS).prop_map(Rec::Parent), (0..PARENTS, 1..=CHILDREN).prop_map(|(p, c)| Rec::Child(p, c)),]
}

fn edit() -> impl Strategy<Value = Action> {
    (side(), prop::collection::vec(rec(), 1..4)).prop_map(|(side, recs)| Action::Edit { side, recs })
}

fn pipeline_action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (1usize..10).prop_map(|limit| Action::Feeds { limit }),
        6 => (stage(), 1usize..5).prop_map(|(stage, batch)| Action::Step { stage, batch }),
        2 => (0..POINTS.len(), 1usize..5).prop_map(|(point, batch)| Action::Crash { point, batch }),
        1 => (stage(), any::<Index>()).prop_map(|(stage, pick)| Action::Duplicate { stage, pick }),
        1 => prop_oneof![4 => 0i64..40_000, 1 => 250_000i64..400_000].prop_map(|ms| Action::Advance { ms }),
    ]
}

fn chaos_action() -> impl Strategy<Value = Action> {
    prop_oneof![1 => edit(), 2 => pipeline_action()]
}

// ---------------------------------------------------------------------------------------------
// The harness

struct Harness {
    _dir: tempfile::TempDir,
    rt: LocalRuntime,
    lj: Arc<LoadedJob>,
    clock: ManualClock,
    /// The failpoint that fires (once) when reached.
    armed: Arc<Mutex<Option<String>>>,
    /// Crashes since the pipeline was last drained.
    crashes: usize,
    /// The apps' own connections (what the app's users write through).
    apps: [Connection; 2],
    /// Fresh values: never repeat.
    counter: u64,
    txids: u64,
    /// Every message a step may have received: (stage, group, body).
    log: Option<BTreeSet<(u8, Option<String>, String)>>,
    dups: u64,
}

impl Harness {
    async fn new(primary: Side) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = [dir.path().join("a.db"), dir.path().join("b.db")];
        let open = |p: &std::path::Path| {
            let c = Connection::open(p).expect("open app");
            c.pragma_update(None, "journal_mode", "WAL").expect("wal");
            c.pragma_update(None, "synchronous", "OFF").expect("sync");
            c.busy_timeout(std::time::Duration::from_secs(5)).expect("busy");
            c
        };
        let apps = [open(&paths[0]), open(&paths[1])];
        apps[0].execute_batch(SCHEMA_A).expect("schema a");
        apps[1].execute_batch(SCHEMA_B).expect("schema b");

        let mut def = parse_job("job.yaml", &job_yaml(primary)).expect("job");
        def.apps[0].path = Some(paths[0].display().to_string());
        def.apps[1].path = Some(paths[1].display().to_string());
        let clock = ManualClock::new(1_700_000_000_000);
        let armed: Arc<Mutex<Option<String>>> = Arc::default();
        let fire = armed.clone();
        let failpoints = Failpoints::new(move |point| {
            let mut armed = fire.lock().unwrap();
            if armed.as_deref() == Some(point) {
                *armed = None;
                true
            } else {
                false
            }
        });
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("state db");
        let rt = LocalRuntime::with_db(db, Arc::new(clock.clone()), failpoints);
        rt.apply(def).await.expect("apply");
        rt.start("j").await.expect("start");
        let lj = rt.steps.load_job("j").await.expect("load").expect("job");
        Harness { _dir: dir, rt, lj, clock, armed, crashes: 0, apps, counter: 0, txids: 0, log: None, dups: 0 }
    }

    /// One app transaction on `side`; returns the records written and their values.
    fn edit(&mut self, side: Side, recs: &[Rec]) -> Vec<(Rec, u64)> {
        let sql = &SQL[side.index()];
        self.txids += 1;
        let txid = format!("app-{}", self.txids);
        let mut counter = self.counter;
        let written = transaction(&mut self.apps[side.index()], &txid, |tx| {
            let mut written = Vec::new();
            for &r in recs {
                let pid = r.pid();
                match r {
                    Rec::Parent(_) => {
                        counter += 1;
                        tx.execute(sql.upsert_parent, params![pid, format!("n{counter}"), counter as i64])?;
                    }
                    Rec::Child(_, c) => {
                        let exists: i64 = tx.query_row(sql.parent_exists, [&pid], |r| r.get(0))?;
                        if exists == 0 {
                            continue;
                        }
                        counter += 1;
                        tx.execute(sql.upsert_child, params![pid, c as i64, format!("l{counter}")])?;
                    }
                }
                written.push((r, counter));
            }
            Ok(written)
        })
        .expect("app transaction");
        self.counter = counter;
        written
    }

    /// The value a record holds on a side (`None`: no such record). Panics on a record whose
    /// fields disagree (a torn write).
    fn value(&self, side: Side, r: Rec) -> Option<u64> {
        let sql = &SQL[side.index()];
        let conn = &self.apps[side.index()];
        match r {
            Rec::Parent(_) => {
                let row: Option<(String, i64)> =
                    conn.query_row(sql.read_parent, [r.pid()], |x| Ok((x.get(0)?, x.get(1)?))).optional().unwrap();
                row.map(|(name, n)| {
                    assert_eq!(name, format!("n{n}"), "{side:?} {r:?}: fields from different writes");
                    n as u64
                })
            }
            Rec::Child(_, c) => {
                let label: Option<String> =
                    conn.query_row(sql.read_child, params![r.pid(), c as i64], |x| x.get(0)).optional().unwrap();
                label.map(|l| l.trim_start_matches('l').parse().expect("label"))
            }
        }
    }

    /// Every row of every table of both apps, versions included, and the last change-log seq.
    fn dump(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for side in Side::BOTH {
            let conn = &self.apps[side.index()];
            for sql in SQL[side.index()].dump {
                let mut stmt = conn.prepare(sql).unwrap();
                let rows = stmt
                    .query_map([], |r| {
                        Ok((0..4).map(|i| format!("{:?}", r.get_ref(i).unwrap())).collect::<Vec<_>>().join(" | "))
                    })
                    .unwrap()
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                out.push(rows);
            }
            let seq: i64 =
                conn.query_row("SELECT COALESCE(max(seq), 0) FROM _dualsync_changes", [], |r| r.get(0)).unwrap();
            out.push(vec![format!("{side:?} change log up to {seq}")]);
        }
        out
    }

    fn queue(&self, stage: Stage) -> &EmbeddedQueue {
        match stage {
            Stage::Capture => &self.rt.capture,
            Stage::Sequence => &self.rt.sequence,
            Stage::Deliver => &self.rt.deliver,
        }
    }

    /// Runs one step once; returns how many messages it took.
    async fn step(&mut self, stage: Stage, batch: usize) -> usize {
        if self.log.is_some() {
            let msgs = self.queue(stage).peek_all().unwrap();
            let log = self.log.as_mut().expect("log");
            log.extend(msgs.into_iter().map(|m| (stage as u8, m.group, m.body)));
        }
        let steps = &self.rt.steps;
        let queue = self.queue(stage);
        let n = match stage {
            Stage::Capture => {
                run_once(queue, batch, &|m| async move {
                    let r = steps.capture(&m).await;
                    (m, r)
                })
                .await
            }
            Stage::Sequence => {
                run_once(queue, batch, &|m| async move {
                    let r = steps.sequence(&m).await;
                    (m, r)
                })
                .await
            }
            Stage::Deliver => {
                run_once(queue, batch, &|m| async move {
                    let r = steps.deliver(&m).await;
                    (m, r)
                })
                .await
            }
        };
        n.expect("step")
    }

    async fn resend(&mut self, stage: Stage, group: Option<String>, body: String) {
        let msg = match stage {
            Stage::Deliver => {
                self.dups += 1;
                OutMessage::fifo(body, group.expect("FIFO group"), format!("duplicate-{}", self.dups))
            }
            _ => OutMessage::standard(body),
        };
        self.queue(stage).send(vec![msg]).await.unwrap();
    }

    /// Applies an action; edits are returned so that the caller can track them.
    async fn act(&mut self, a: &Action) -> Vec<(Side, Rec, u64)> {
        match a {
            Action::Edit { side, recs } => {
                return self.edit(*side, recs).into_iter().map(|(r, v)| (*side, r, v)).collect();
            }
            Action::Feeds { limit } => {
                self.rt.pump_feeds(*limit).await.unwrap();
            }
            Action::Step { stage, batch } => {
                self.step(*stage, *batch).await;
            }
            Action::Crash { point, batch } => {
                let (name, stage) = POINTS[*point];
                if self.crashes >= MAX_CRASHES {
                    self.step(stage, *batch).await;
                } else {
                    *self.armed.lock().unwrap() = Some(name.to_string());
                    self.step(stage, *batch).await;
                    let fired = self.armed.lock().unwrap().take().is_none();
                    if fired {
                        self.crashes += 1;
                        self.clock.advance(PAST_VISIBILITY_MS);
                    }
                }
            }
            Action::Duplicate { stage, pick } => {
                let msgs = self.queue(*stage).peek_all().unwrap();
                if !msgs.is_empty() {
                    let m = pick.get(&msgs).clone();
                    self.resend(*stage, m.group, m.body).await;
                }
            }
            Action::Advance { ms } => self.clock.advance(*ms),
        }
        Vec::new()
    }

    /// Runs every step until the pipeline is idle, moving the clock past the visibility timeout
    /// between rounds; an error if it does not get there.
    async fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..DRAIN_ROUNDS {
            for _ in 0..1000 {
                let mut moved = self.rt.pump_feeds(BATCH).await.unwrap();
                for stage in [Stage::Capture, Stage::Sequence, Stage::Deliver] {
                    moved += self.step(stage, 8).await;
                }
                if moved == 0 {
                    break;
                }
            }
            if self.rt.is_idle().await.unwrap() {
                self.crashes = 0;
                return Ok(());
            }
            self.clock.advance(PAST_VISIBILITY_MS);
        }
        let depths: Vec<_> = [Stage::Capture, Stage::Sequence, Stage::Deliver]
            .into_iter()
            .map(|s| (s, self.queue(s).peek_all().unwrap()))
            .collect();
        Err(TestCaseError::fail(format!("the pipeline did not drain in {DRAIN_ROUNDS} rounds: {depths:#?}")))
    }

    async fn error_rows(&self) -> Vec<SyncError> {
        self.rt.state.error_rows("j", &ErrorFilter::default()).await.unwrap().into_iter().map(|(_, e)| e).collect()
    }

    async fn conflicts(&self) -> Vec<ConflictRecord> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.rt.state.conflicts("j", 500, after.as_deref()).await.unwrap();
            out.extend(page.items);
            match page.next {
                Some(n) => after = Some(n),
                None => return out,
            }
        }
    }

    /// The invariant after a drain: nothing dead-lettered, no open application or system
    /// error, and every record in step on both sides.
    async fn check_converged(&self) -> Result<(), TestCaseError> {
        for (i, dlq) in self.rt.dead_letters.iter().enumerate() {
            let msgs = dlq.peek_all().unwrap();
            prop_assert!(msgs.is_empty(), "dead-letter queue {i} holds messages: {msgs:#?}");
        }
        let errors = self.error_rows().await;
        let open: Vec<&SyncError> = errors
            .iter()
            .filter(|e| matches!(e.status, ErrorStatus::Open | ErrorStatus::Retrying) && e.category.retriable())
            .collect();
        prop_assert!(open.is_empty(), "open application/system errors: {open:#?}");
        // Records with an open retriable error would be exempt (the invariant says "every link
        // with no open error"); there are none here, so every record must be in step. A
        // concurrency skip is informational (a newer change of the record exists and is
        // delivered), so it exempts nothing.
        let exempt: HashSet<(String, Key)> = open.iter().map(|e| (e.map.clone(), e.key.clone())).collect();
        for cmp in verify::compare(&self.lj).await.unwrap() {
            let out_of_step: Vec<&Key> = cmp
                .differ
                .iter()
                .chain(cmp.only.iter().flatten())
                .filter(|k| !exempt.contains(&(cmp.map.clone(), (*k).clone())))
                .collect();
            prop_assert!(
                out_of_step.is_empty(),
                "map {}: out of step after draining: {out_of_step:?}\ncomparison: {cmp:?}\napps: {:#?}\nerrors: {errors:#?}",
                cmp.map,
                self.dump()
            );
        }
        Ok(())
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime").block_on(f)
}

// ---------------------------------------------------------------------------------------------
// The properties

/// 1. Convergence under chaos.
async fn convergence(primary: Side, actions: Vec<Action>) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    for a in &actions {
        h.act(a).await;
    }
    h.drain().await?;
    h.check_converged().await
}

/// 2. The primary wins concurrent edits; a one-sided edit goes through; every concurrent edit
/// leaves a conflict row naming the primary.
async fn primary_wins(primary: Side, rounds: Vec<(Vec<Action>, Vec<Action>)>) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    let primary_app = if primary == Side::A { "a" } else { "b" };
    for (round, (edits, pipeline)) in rounds.iter().enumerate() {
        // Phase 1: edits only. The last value each side wrote to each record.
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
                [Some(a), Some(b)] => {
                    if primary == Side::A {
                        *a
                    } else {
                        *b
                    }
                }
                [Some(v), None] | [None, Some(v)] => *v,
                [None, None] => unreachable!(),
            };
            let got = [h.value(Side::A, *r), h.value(Side::B, *r)];
            prop_assert_eq!(
                got,
                [Some(expected); 2],
                "round {}: {:?} written (A, B) = {:?}, primary {:?}: expected value {} on both sides",
                round,
                r,
                values,
                primary,
                expected
            );
            if let [Some(a), Some(b)] = values {
                // The conflict as seen: each side's content when it was detected.
                let map = &h.lj.job.maps[r.map_idx()];
                let hash = |v: u64| canon::hash(&canon::canon(map, Side::A, &r.fields_a(v)).expect("canon"));
                let hashes = [hash(*a), hash(*b)];
                let found = conflicts
                    .iter()
                    .any(|c| c.map == r.map() && c.key == r.key() && c.winner == primary_app && c.hashes == hashes);
                prop_assert!(
                    found,
                    "round {}: {:?} was edited on both sides ((A, B) = {:?}) but no conflict row names {} the \
                     winner of it; conflicts: {:#?}",
                    round,
                    r,
                    values,
                    primary_app,
                    conflicts
                );
            }
        }
    }
    Ok(())
}

/// 3. Exactly once in effect: after a drain, every message any step received, sent again (and
/// run through the whole pipeline), changes nothing in the apps: no value, no version.
async fn exactly_once(primary: Side, actions: Vec<Action>, expire_dedupe: bool) -> Result<(), TestCaseError> {
    let mut h = Harness::new(primary).await;
    h.log = Some(BTreeSet::new());
    for a in &actions {
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
    let stages = [Stage::Capture, Stage::Sequence, Stage::Deliver];
    for (stage, group, body) in log.iter().cloned() {
        h.resend(stages[stage as usize], group, body).await;
    }
    h.drain().await?;
    h.check_converged().await?;
    let after = h.dump();
    prop_assert_eq!(
        &before,
        &after,
        "re-sending {} received messages changed the apps (values or versions)",
        log.len()
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_CONVERGENCE), ..ProptestConfig::default() })]
    #[test]
    fn converges_under_chaos(primary in side(), actions in prop::collection::vec(chaos_action(), 1..60)) {
        block_on(convergence(primary, actions))?;
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
        block_on(primary_wins(primary, rounds))?;
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
        block_on(exactly_once(primary, actions, expire_dedupe))?;
    }
}
