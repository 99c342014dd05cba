//! Transactions of any size, on the embedded runner and on the Lambda handlers over moto server
//! (`source scripts/moto.sh`): an app transaction far over the queue's 256 KiB syncs, in
//! dependency order even when a child's parent falls in another part of it, beside an
//! unrelated transaction of the same batch; parts are deduped each on its own; a key too long
//! for the table is an error row of its own.
//!
//! The largest transaction has `DUALSYNC_BIG_TX_ROWS` rows (default 1,000) whose keys are padded
//! by `DUALSYNC_BIG_TX_KEY_PAD` bytes (default 900): about four times the limit, in few rows, so
//! that it stays quick on moto. The 100,000-row figures in the report are this test run by hand
//! with 100000 rows and no padding.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[macro_use]
mod common;

use common::{apps_of, emulator, exec, query, Backend, FaultyRegistry, Local};
use dualsync::adapters::aws::{bootstrap, Names, Usage};
use dualsync::domain::change::{ChangeNotification, Key, Operation, Parts, TransactionNotification, MAX_MESSAGE_BYTES};
use dualsync::domain::config::JobDef;
use dualsync::domain::errors::{ErrorCategory, SyncError};
use dualsync::domain::job::Side;
use dualsync::ports::{OutMessage, Queue};
use dualsync::runtime::verify::compare;
use dualsync::state::{ErrorFilter, State};
use dualsync::steps::{Metrics, StepKind, Steps};
use dualsync_lambda::stack::Stack;

/// `entries`: a two-part key and a company field. `parents` look up an entry by fields that
/// are not their key (so sequence joins them only within one transaction); `children` look up
/// their parent by a key field (so they follow its root across transactions too).
const JOB: &str = "job: j
apps:
  - { name: a, connector: sqlite, path: A }
  - { name: b, connector: sqlite, path: B }
primary: a
companies: [X]
table_groups:
  - name: g
    maps:
      - name: entries
        sequence: 1
        entities: { a: entries, b: records }
        company: { a: co, b: company }
        keys: [{ a: co, b: company }, { a: eno, b: record_no }]
        fields: [{ a: label, b: caption }]
      - name: parents
        sequence: 2
        entities: { a: parents, b: owners }
        keys: [{ a: pid, b: owner_id }]
        fields: [{ a: name, b: title }, { a: co, b: company }, { a: eno, b: record_no }]
        lookups:
          - map: entries
            fields: [{ a: co, b: company }, { a: eno, b: record_no }]
      - name: children
        sequence: 3
        entities: { a: children, b: items }
        keys: [{ a: pid, b: owner_id }, { a: cno, b: item_no }]
        fields: [{ a: label, b: caption }]
        lookups:
          - map: parents
            fields: [{ a: pid, b: owner_id }]
";

/// The apps' tables at `a` and `b`, with `rows_before_start` run in app `a` (before capture is
/// installed); the job pointed at them.
fn create_apps(a: &Path, b: &Path, rows_before_start: &str) -> JobDef {
    let def = apps_of(
        a,
        b,
        [
            "CREATE TABLE entries (co TEXT, eno TEXT, label TEXT, PRIMARY KEY (co, eno));
             CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, co TEXT, eno TEXT);
             CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));",
            "CREATE TABLE records (company TEXT, record_no TEXT, caption TEXT, PRIMARY KEY (company, record_no));
             CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT, company TEXT, record_no TEXT);
             CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));",
        ],
        JOB,
    );
    if !rows_before_start.is_empty() {
        rusqlite::Connection::open(a).unwrap().execute_batch(rows_before_start).unwrap();
    }
    def
}

enum Pipeline {
    Local(Local),
    Aws { _dir: tempfile::TempDir, a: PathBuf, b: PathBuf, stack: Arc<Stack> },
}

struct H {
    pipeline: Pipeline,
}

/// The apps (with `rows_before_start` run in app `a` before capture is installed), the job,
/// started.
async fn harness(backend: Backend, rows_before_start: &str) -> H {
    let pipeline = match backend {
        Backend::Local => Pipeline::Local(Local::with(|a, b| create_apps(a, b, rows_before_start)).await),
        Backend::Aws => {
            let dir = tempfile::tempdir().unwrap();
            let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
            let def = create_apps(&a, &b, rows_before_start);
            let sdk = emulator().await;
            let names = Names::new(&format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
            let resources = bootstrap(&sdk, &names).await.expect("bootstrap");
            let (apps, _) = FaultyRegistry::fresh();
            let stack = Arc::new(Stack::with_apps(&sdk, &resources, Arc::new(Usage::default()), apps));
            stack.state().apply_job(def).await.unwrap();
            stack.start("j").await.unwrap();
            Pipeline::Aws { _dir: dir, a, b, stack }
        }
    };
    H { pipeline }
}

impl H {
    fn steps(&self) -> &Steps {
        match &self.pipeline {
            Pipeline::Local(l) => &l.rt.steps,
            Pipeline::Aws { stack, .. } => stack.steps(),
        }
    }

    /// App `b`'s database.
    fn b(&self) -> &Path {
        match &self.pipeline {
            Pipeline::Local(l) => &l.b,
            Pipeline::Aws { b, .. } => b,
        }
    }

    /// One app transaction in app `a`.
    fn exec_a(&self, sql: &str) {
        match &self.pipeline {
            Pipeline::Local(l) => l.exec(Side::A, sql),
            Pipeline::Aws { a, .. } => exec(a, sql),
        }
    }

    fn query_b(&self, sql: &str) -> i64 {
        query(self.b(), sql)
    }

    fn state(&self) -> &State {
        &self.steps().state
    }

    fn capture_queue(&self) -> &dyn Queue {
        match &self.pipeline {
            Pipeline::Local(l) => l.rt.queue(StepKind::Capture).as_ref(),
            Pipeline::Aws { stack, .. } => stack.handlers[0].input(),
        }
    }

    /// Every step until nothing moves.
    async fn drain(&self) {
        let started = Instant::now();
        match &self.pipeline {
            Pipeline::Local(l) => l.drain().await,
            Pipeline::Aws { stack, .. } => loop {
                let moved = stack.pump_feeds(1000).await.unwrap();
                let handled = stack.poll_round().await.unwrap().len();
                if moved + handled == 0 {
                    if stack.is_idle().await.unwrap() {
                        eprintln!("drained in {:.1} s", started.elapsed().as_secs_f64());
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                assert!(started.elapsed() < Duration::from_secs(3 * 3600), "the stack did not drain in 3 hours");
            },
        }
    }

    async fn errors(&self) -> Vec<SyncError> {
        self.state().error_rows("j", &ErrorFilter::default()).await.unwrap().into_iter().map(|(_, e)| e).collect()
    }

    async fn assert_converged(&self) {
        let lj = self.steps().load_job("j").await.unwrap().unwrap();
        for c in compare(&lj).await.unwrap() {
            assert!(
                c.all_in_step(),
                "{}: {} differ, {:?} only in a, {:?} only in b",
                c.map,
                c.differ.len(),
                c.only[0].len(),
                c.only[1].len()
            );
        }
    }

    async fn assert_no_dead_letters(&self) {
        for queue in ["capture", "sequence", "deliver"] {
            let name = self.queue_name(queue);
            let dead = self.state().dead_letters(&name).await.unwrap();
            assert!(dead.is_empty(), "{name}: {:?}", dead.iter().map(|d| &d.reason).collect::<Vec<_>>());
        }
    }

    fn queue_name(&self, step: &str) -> String {
        let kind = match step {
            "capture" => StepKind::Capture,
            "sequence" => StepKind::Sequence,
            _ => StepKind::Deliver,
        };
        match &self.pipeline {
            Pipeline::Local(l) => l.rt.queue(kind).name().to_string(),
            Pipeline::Aws { stack, .. } => stack.handlers[kind as usize].input().name().to_string(),
        }
    }

    /// Seq of the first change-log row of an entity in app `b` whose key mentions `key`.
    fn first_write(&self, entity: &str, key: &str) -> i64 {
        self.query_b(&format!(
            "SELECT min(seq) FROM _dualsync_changes WHERE entity = '{entity}' AND key LIKE '%\"{key}%'"
        ))
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One app transaction: `n` entries (keys padded by `pad` bytes), then a parent that looks up
/// the first of them (a parent in the transaction's first part, its child in the last).
fn entries_then_parent(n: usize, pid: &str, pad: usize) -> String {
    let pad = "x".repeat(pad);
    let values: Vec<String> = (0..n).map(|i| format!("('X', 'entry-{i:08}{pad}', 'entry {i}')")).collect();
    format!(
        "INSERT INTO entries (co, eno, label) VALUES {};
         INSERT INTO parents (pid, name, co, eno) VALUES ('{pid}', 'parent', 'X', 'entry-00000000{pad}');",
        values.join(", ")
    )
}

/// One app transaction: an entry, `n` lines of a parent, then the parent (the lines come
/// first in the app's own order and fill the first parts).
fn lines_then_header(n: usize, pid: &str) -> String {
    let values: Vec<String> = (1..=n).map(|i| format!("('{pid}', {i}, 'line {i}')")).collect();
    format!(
        "INSERT INTO entries (co, eno, label) VALUES ('X', '{pid}-e', 'header entry');
         INSERT INTO children (pid, cno, label) VALUES {};
         INSERT INTO parents (pid, name, co, eno) VALUES ('{pid}', 'header', 'X', '{pid}-e');",
        values.join(", ")
    )
}

on_both_backends!(
    a_transaction_several_times_the_queue_limit_syncs,
    a_key_too_long_to_store_is_an_error_row_of_its_own
);

// Thousands of rows each: on the embedded runner only, as they take minutes on moto.
mod local_only {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_transactions_sync_in_order_beside_an_unrelated_one() {
        super::big_transactions_sync_in_order_beside_an_unrelated_one(super::Backend::Local).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parts_of_a_transaction_are_deduped_each_on_its_own() {
        super::parts_of_a_transaction_are_deduped_each_on_its_own(super::Backend::Local).await
    }
}

/// The cases: 3,000 rows with a two-part key and a company field, and a header with
/// 3,000 lines, each one app transaction, in the same batches as an unrelated transaction.
async fn big_transactions_sync_in_order_beside_an_unrelated_one(backend: Backend) {
    let h = harness(backend, "").await;
    h.exec_a("INSERT INTO entries (co, eno, label) VALUES ('X', 'unrelated', 'small')");
    h.exec_a(&entries_then_parent(3000, "q1", 0));
    h.exec_a(&lines_then_header(3000, "p1"));
    h.exec_a("INSERT INTO entries (co, eno, label) VALUES ('X', 'unrelated-after', 'small')");
    h.drain().await;
    let errors = h.errors().await;
    assert!(errors.is_empty(), "{errors:#?}");
    h.assert_no_dead_letters().await;
    h.assert_converged().await;
    assert_eq!(h.query_b("SELECT count(*) FROM records"), 3003);
    assert_eq!(h.query_b("SELECT count(*) FROM items"), 3000);
    assert_eq!(h.query_b("SELECT count(*) FROM owners"), 2);
    // Parent before child across the parts of one transaction.
    assert!(h.first_write("records", "entry-00000000") < h.first_write("owners", "q1"), "q1 before its entry");
    assert!(h.first_write("owners", "p1") < h.first_write("items", "p1"), "a line before its header");
}

/// A transaction several times the queue's limit.
async fn a_transaction_several_times_the_queue_limit_syncs(backend: Backend) {
    let (n, pad) = (env("DUALSYNC_BIG_TX_ROWS", 1000), env("DUALSYNC_BIG_TX_KEY_PAD", 900));
    let h = harness(backend, "").await;
    h.exec_a("INSERT INTO entries (co, eno, label) VALUES ('X', 'unrelated', 'small')");
    let tx = entries_then_parent(n, "q1", pad);
    assert!(tx.len() > 3 * 256 * 1024, "{} bytes of SQL: not several times the limit", tx.len());
    h.exec_a(&tx);
    let started = Instant::now();
    h.drain().await;
    eprintln!("{backend:?}: a transaction of {} rows synced in {:.1} s", n + 1, started.elapsed().as_secs_f64());
    let errors = h.errors().await;
    assert!(errors.is_empty(), "{:#?}", &errors[..errors.len().min(5)]);
    h.assert_no_dead_letters().await;
    assert_eq!(h.query_b("SELECT count(*) FROM records") as usize, n + 1);
    assert_eq!(h.query_b("SELECT count(*) FROM owners"), 1);
    assert!(h.first_write("records", "entry-00000000") < h.first_write("owners", "q1"), "q1 before its entry");
}

/// Parts are told apart by their number: none is dropped as a duplicate of another, and a
/// part delivered twice is captured once.
async fn parts_of_a_transaction_are_deduped_each_on_its_own(backend: Backend) {
    // Rows made before the job starts: only the notifications below announce them.
    let values: Vec<String> = (1..=3000).map(|i| format!("('p1', {i}, 'line {i}')")).collect();
    let rows = format!(
        "INSERT INTO children (pid, cno, label) VALUES {};
         INSERT INTO entries (co, eno, label) VALUES ('X', 'e1', 'x');
         INSERT INTO parents (pid, name, co, eno) VALUES ('p1', 'header', 'X', 'e1');",
        values.join(", ")
    );
    let h = harness(backend, &rows).await;
    let change = |entity: &str, key: Vec<String>, seq: u64| ChangeNotification {
        app: "a".into(),
        entity: entity.into(),
        key: Key(key),
        op: Operation::Upsert,
        seq,
        version: None,
        company: None,
        at_ms: 1_700_000_000_000,
    };
    let mut changes: Vec<ChangeNotification> =
        (1..=3000).map(|i| change("children", vec!["p1".into(), i.to_string()], i)).collect();
    changes.push(change("entries", vec!["X".into(), "e1".into()], 3001));
    changes.push(change("parents", vec!["p1".into()], 3002));
    let tx = TransactionNotification {
        job: "j".into(),
        app: "a".into(),
        txid: "big-1".into(),
        changes,
        parts: Parts::default(),
    };
    let parts = tx.split(MAX_MESSAGE_BYTES).unwrap();
    assert!(parts.len() >= 2, "{} part(s)", parts.len());
    let body = |p: &TransactionNotification| OutMessage::standard(serde_json::to_string(p).unwrap());
    // The last part first, then every part, then the first again.
    let mut msgs = vec![body(parts.last().unwrap())];
    msgs.extend(parts.iter().map(body));
    msgs.push(body(&parts[0]));
    for m in msgs {
        h.capture_queue().send(vec![m]).await.unwrap();
    }
    h.drain().await;
    let errors = h.errors().await;
    assert!(errors.is_empty(), "{errors:#?}");
    h.assert_no_dead_letters().await;
    assert_eq!(Metrics::get(&h.steps().metrics.captured), 3002, "every change captured once");
    assert_eq!(h.query_b("SELECT count(*) FROM items"), 3000);
    assert!(h.first_write("owners", "p1") < h.first_write("items", "p1"), "a line before its header");
    h.assert_converged().await;
}

/// A key longer than the table's keys can hold fails that change alone, with a row saying why;
/// so does one longer than a queue message.
async fn a_key_too_long_to_store_is_an_error_row_of_its_own(backend: Backend) {
    let h = harness(backend, "").await;
    let (long, huge) = ("k".repeat(2100), "h".repeat(300_000));
    h.exec_a(&format!(
        "INSERT INTO entries (co, eno, label) VALUES ('X', 'fine', 'x'), ('X', '{long}', 'too long');
             INSERT INTO children (pid, cno, label) VALUES ('{long}', 1, 'too long');
             INSERT INTO entries (co, eno, label) VALUES ('X', '{huge}', 'larger than a message');"
    ));
    h.exec_a("INSERT INTO entries (co, eno, label) VALUES ('X', 'other', 'y')");
    h.drain().await;
    let errors = h.errors().await;
    assert_eq!(errors.len(), 3, "{errors:#?}");
    for e in &errors {
        assert_eq!(e.category, ErrorCategory::Application);
        assert!(e.key.display().len() < 200, "the row's key is abbreviated");
    }
    let told = |what: &str| errors.iter().filter(|e| e.message.contains(what)).count();
    assert_eq!(told("too long to store"), 2, "{errors:#?}");
    assert_eq!(told("more than a queue message holds"), 1, "{errors:#?}");
    // Counted in the job's metrics, the one ingress recorded (outside the steps) too.
    let minutes = h.state().metrics("j", 0).await.unwrap();
    let counted: u64 = minutes.iter().map(|(_, t)| t.errors.get("application").copied().unwrap_or(0)).sum();
    assert_eq!(counted, 3, "{minutes:?}");
    assert_eq!(h.query_b("SELECT count(*) FROM records"), 2, "the other changes synced");
    h.assert_no_dead_letters().await;
}
