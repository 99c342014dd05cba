//! A kill -9 soak of the real `dualsync` binary (issue 9, item 14).
//!
//! Two sqlite apps (`a`: parents/children, `b`: owners/items), one job with a parent map and a
//! child map that looks its parent up, `a` primary. `dualsync run` syncs them while this test
//! edits both apps: updates, inserts, deletes, multi-row transactions (a parent and its
//! children), and the same record on both sides back to back (concurrent edits). Every 0.5 to
//! 5 s the runner is SIGKILLed and restarted (after up to half a second, edits going on); after
//! some deletes sooner, within 20 to 400 ms, while the delete is likely in flight. Then
//! editing stops, `dualsync run --until-idle` drains the pipeline, and every key of both maps is
//! checked.
//!
//! `DUALSYNC_SOAK_SEED` sets the seed (printed either way), `DUALSYNC_SOAK_SECS` the edit phase
//! (default 75 s; the drain takes up to the 30 s a killed runner's messages stay invisible,
//! and then some). On a failure the data folder is kept and its path printed: `state/state.db`
//! (links, error rows, queues), each app's `soak_audit` (every write to its tables, users' and
//! dualsync's, with the transaction it was made in) and `runner.log`.
//!
//! # What the test knows
//!
//! Every value written is unique (`n<id>`/`l<id>`), and so is every delete (an id, no content).
//! Each write is made in a `BEGIN IMMEDIATE` transaction that first reads the record on its side,
//! so the test knows exactly what each write was made on top of: a value (written by a user on
//! one side, maybe copied over by dualsync) or nothing. A write's *past* is the value it was made
//! on, and that value's past, and so on: those values were replaced, on purpose, by a newer edit.
//! An absent record links to no past: the test cannot tell which delete (if any) it is absent
//! from, nor whether that delete's live path has run yet.
//!
//! # What is asserted, per key, after the drain
//!
//! Exempt keys: those an open (or retrying) application or system error row names (map and key).
//! A concurrency skip exempts nothing: it means a newer change of the record exists and was
//! delivered (the invariant test's rule).
//!
//! (a) **In step**: both apps hold the same value, or both lack the record, unless the key is
//!     exempt. (DESIGN §3: once edits stop and queues drain, every link with no open error has
//!     canon(A) = canon(B).) A parent's two fields come from one write on each side (no torn
//!     write), checked wherever a parent is read.
//! (b) For keys in step and not exempt, with `lastA`, `lastB` each side's last write:
//!     - **No lost update**: if one side's last write was made on top of the other side's last
//!       value (that value is in its past), it is causally newer: the key holds its content (for
//!       a delete: absent). Any other outcome drops an edit made with the other value in view.
//!     - **The primary wins concurrent edits**: if both last writes are values, neither in the
//!       other's past, the key holds the primary's. Each side wrote without having seen the
//!       other's value, so since the last content both shared (the link's last sync), both
//!       changed: a conflict, decided by the primary (DESIGN §3 step 4, also for a first
//!       delivery where both records exist). Checked only on the keys that are never deleted
//!       (parents `p0..p3` and their children): where a delete has been made, a record absent on
//!       one side may be absent from a delete whose live path has not yet run, and what a late
//!       delete does to a later concurrent insert is not settled by the design. The deletable
//!       keys (`p4..p7` and their children) get (a), (c) and the lost-update check, which no
//!       late delete excuses: the other side's deletes all came before its last value, which the
//!       newer write was made on, so a delete that undoes that write is a stale one.
//! (c) **No value that was not someone's last write**: for a key in step (exempt or not), its
//!     content (a value, or absent) is the content of the last write of `a` or of `b` to it
//!     (absent for a delete); absent if neither side ever wrote it. Values only come from users'
//!     writes, so anything else is an older value coming back: a lost update.
//! Deletes: a delete that is a side's last write, made on top of the other side's last value,
//! must leave the record absent on both sides (the lost-update rule); a delete racing an insert
//! the other side never saw must still leave both sides alike (a) with one of the two (c).
//!
//! Nothing here depends on timing: each rule holds for every interleaving the design allows, so
//! a failure is a bug in dualsync (the message names the seed, the key, its history of writes and
//! the kill times).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dualsync::adapters::connectors::sqlite::transaction;
use dualsync::domain::change::Key;
use dualsync::domain::errors::{ErrorStatus, SyncError};
use dualsync::domain::job::Side;
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::ErrorFilter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// Parents `p0..p7`, two children each: few keys, so that edits and deliveries meet often.
const PARENTS: u8 = 8;
const CHILDREN: u8 = 2;
/// Parents below this one, and their children, are never deleted: the primary-wins check runs
/// on them (see the header).
const KEPT: u8 = 4;
const PRIMARY: Side = Side::A;
const JOB: &str = "soak";
/// The edit phase when `DUALSYNC_SOAK_SECS` is not set.
const DEFAULT_SECS: u64 = 75;
/// How long the final `run --until-idle` may take before the test calls it stuck.
const DRAIN_LIMIT: Duration = Duration::from_secs(240);
const TOKEN: &str = "soak-test-admin-token-0123456789";

const JOB_YAML: &str = "job: soak
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: sqlite, path: b.db }
primary: a
table_groups:
  - name: g
    maps:
      - name: parents
        sequence: 1
        entities: { a: parents, b: owners }
        keys: [{ a: pid, b: owner_id }]
        fields:
          - { a: name, b: title }
          - { a: n, b: num }
      - name: children
        sequence: 2
        entities: { a: children, b: items }
        keys: [{ a: pid, b: owner_id }, { a: cno, b: item_no }]
        fields: [{ a: label, b: caption }]
        lookups:
          - map: parents
            fields: [{ a: pid, b: owner_id }]
";

const SCHEMA: [&str; 2] = [
    "CREATE TABLE parents (pid TEXT PRIMARY KEY, name TEXT, n INTEGER);
     CREATE TABLE children (pid TEXT, cno INTEGER, label TEXT, PRIMARY KEY (pid, cno));",
    "CREATE TABLE owners (owner_id TEXT PRIMARY KEY, title TEXT, num INTEGER);
     CREATE TABLE items (owner_id TEXT, item_no INTEGER, caption TEXT, PRIMARY KEY (owner_id, item_no));",
];

/// One app's statements (explicit columns: capture adds `_ds_version`).
struct Sql {
    upsert_parent: &'static str,
    upsert_child: &'static str,
    read_parent: &'static str,
    read_child: &'static str,
    delete_parent: &'static str,
    delete_child: &'static str,
}

const SQL: [Sql; 2] = [
    Sql {
        upsert_parent: "INSERT INTO parents (pid, name, n) VALUES (?1, ?2, ?3)
            ON CONFLICT (pid) DO UPDATE SET name = excluded.name, n = excluded.n",
        upsert_child: "INSERT INTO children (pid, cno, label) VALUES (?1, ?2, ?3)
            ON CONFLICT (pid, cno) DO UPDATE SET label = excluded.label",
        read_parent: "SELECT name, n FROM parents WHERE pid = ?1",
        read_child: "SELECT label FROM children WHERE pid = ?1 AND cno = ?2",
        delete_parent: "DELETE FROM parents WHERE pid = ?1",
        delete_child: "DELETE FROM children WHERE pid = ?1 AND cno = ?2",
    },
    Sql {
        upsert_parent: "INSERT INTO owners (owner_id, title, num) VALUES (?1, ?2, ?3)
            ON CONFLICT (owner_id) DO UPDATE SET title = excluded.title, num = excluded.num",
        upsert_child: "INSERT INTO items (owner_id, item_no, caption) VALUES (?1, ?2, ?3)
            ON CONFLICT (owner_id, item_no) DO UPDATE SET caption = excluded.caption",
        read_parent: "SELECT title, num FROM owners WHERE owner_id = ?1",
        read_child: "SELECT caption FROM items WHERE owner_id = ?1 AND item_no = ?2",
        delete_parent: "DELETE FROM owners WHERE owner_id = ?1",
        delete_child: "DELETE FROM items WHERE owner_id = ?1 AND item_no = ?2",
    },
];

fn side_name(side: Side) -> &'static str {
    match side {
        Side::A => "a",
        Side::B => "b",
    }
}

/// A record of either map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Rec {
    Parent(u8),
    /// Parent, child number (1-based).
    Child(u8, u8),
}

impl Rec {
    fn all() -> Vec<Rec> {
        (0..PARENTS)
            .flat_map(|p| std::iter::once(Rec::Parent(p)).chain((1..=CHILDREN).map(move |c| Rec::Child(p, c))))
            .collect()
    }
    fn parent(self) -> u8 {
        match self {
            Rec::Parent(p) | Rec::Child(p, _) => p,
        }
    }
    fn pid(self) -> String {
        format!("p{}", self.parent())
    }
    fn deletable(self) -> bool {
        self.parent() >= KEPT
    }
    fn map(self) -> &'static str {
        match self {
            Rec::Parent(_) => "parents",
            Rec::Child(..) => "children",
        }
    }
    fn key(self) -> Key {
        match self {
            Rec::Parent(_) => Key(vec![self.pid()]),
            Rec::Child(_, c) => Key(vec![self.pid(), c.to_string()]),
        }
    }
    /// The value the record holds on a side (`None`: no such record); panics on a torn parent.
    fn read(self, conn: &Connection, side: Side) -> Option<u64> {
        let sql = &SQL[side.index()];
        match self {
            Rec::Parent(_) => {
                let row: Option<(String, i64)> = conn
                    .query_row(sql.read_parent, [self.pid()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
                    .expect("read parent");
                row.map(|(name, n)| {
                    assert_eq!(name, format!("n{n}"), "{side:?} {self:?}: its fields come from different writes");
                    n as u64
                })
            }
            Rec::Child(_, c) => {
                let label: Option<String> = conn
                    .query_row(sql.read_child, params![self.pid(), c], |r| r.get(0))
                    .optional()
                    .expect("read child");
                label.map(|l| l.trim_start_matches('l').parse().expect("label"))
            }
        }
    }
    fn upsert(self, tx: &Transaction, side: Side, v: u64) {
        let sql = &SQL[side.index()];
        match self {
            Rec::Parent(_) => tx.execute(sql.upsert_parent, params![self.pid(), format!("n{v}"), v as i64]),
            Rec::Child(_, c) => tx.execute(sql.upsert_child, params![self.pid(), c, format!("l{v}")]),
        }
        .expect("upsert");
    }
    fn delete(self, tx: &Transaction, side: Side) {
        let sql = &SQL[side.index()];
        match self {
            Rec::Parent(_) => tx.execute(sql.delete_parent, [self.pid()]),
            Rec::Child(_, c) => tx.execute(sql.delete_child, params![self.pid(), c]),
        }
        .expect("delete");
    }
}

/// One user write: its id (unique across values and deletes), and whether it deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Write {
    id: u64,
    delete: bool,
}

impl Write {
    /// What the record holds right after it: the value, or nothing.
    fn content(self) -> Option<u64> {
        (!self.delete).then_some(self.id)
    }
}

/// A write as the failure report shows it: ms into the run, side, the write, the value it was
/// made on.
type Logged = (u128, Side, Write, Option<u64>);

/// What users wrote, as the test knows it.
#[derive(Default)]
struct Model {
    next_id: u64,
    txids: u64,
    /// Each side's last write to each record.
    last: BTreeMap<Rec, [Option<Write>; 2]>,
    /// Per write id: the values it was written on top of, directly or through the one it replaced.
    past: HashMap<u64, BTreeSet<u64>>,
    /// Per record, every write for the failure report: (ms into the run, side, write, made on).
    history: BTreeMap<Rec, Vec<Logged>>,
    transactions: u64,
    writes: u64,
    deletes: u64,
    concurrent: u64,
}

impl Model {
    /// One app transaction on `side`: `f` returns the writes it made, with what each was made on.
    fn transact(
        &mut self,
        conn: &mut Connection,
        side: Side,
        started: Instant,
        f: impl FnOnce(&Transaction, &mut u64) -> Vec<(Rec, Write, Option<u64>)>,
    ) -> usize {
        self.txids += 1;
        let txid = format!("soak-{}-{}", side_name(side), self.txids);
        let mut next_id = self.next_id;
        let made = transaction(conn, &txid, |tx| Ok(f(tx, &mut next_id))).expect("app transaction");
        self.next_id = next_id;
        if made.is_empty() {
            return 0;
        }
        self.transactions += 1;
        let ms = started.elapsed().as_millis();
        for &(rec, w, on) in &made {
            let mut past = BTreeSet::new();
            if let Some(v) = on {
                past.insert(v);
                past.extend(self.past.get(&v).into_iter().flatten().copied());
            }
            self.past.insert(w.id, past);
            self.last.entry(rec).or_default()[side.index()] = Some(w);
            self.history.entry(rec).or_default().push((ms, side, w, on));
            self.writes += 1;
            self.deletes += u64::from(w.delete);
        }
        made.len()
    }

    /// Upserts `recs` with fresh values in one transaction; a child only where its parent exists
    /// on that side (a child without one is a missing reference, not what this test is after).
    fn upsert(&mut self, conn: &mut Connection, side: Side, recs: &[Rec], started: Instant) -> usize {
        self.transact(conn, side, started, |tx, next_id| {
            let mut made = Vec::new();
            for &r in recs {
                if let Rec::Child(p, _) = r {
                    if Rec::Parent(p).read(tx, side).is_none() {
                        continue;
                    }
                }
                let on = r.read(tx, side);
                *next_id += 1;
                r.upsert(tx, side, *next_id);
                made.push((r, Write { id: *next_id, delete: false }, on));
            }
            made
        })
    }

    /// Deletes a record in one transaction (a parent with its children), if it exists there.
    fn delete(&mut self, conn: &mut Connection, side: Side, rec: Rec, started: Instant) -> usize {
        self.transact(conn, side, started, |tx, next_id| {
            let mut recs = Vec::new();
            if let Rec::Parent(p) = rec {
                recs.extend((1..=CHILDREN).map(|c| Rec::Child(p, c)));
            }
            recs.push(rec);
            let mut made = Vec::new();
            for r in recs {
                let Some(on) = r.read(tx, side) else { continue };
                *next_id += 1;
                r.delete(tx, side);
                made.push((r, Write { id: *next_id, delete: true }, Some(on)));
            }
            made
        })
    }

    /// Whether `id` was written on top of `value` (directly or through what it replaced).
    fn made_on(&self, id: u64, value: u64) -> bool {
        self.past.get(&id).is_some_and(|p| p.contains(&value))
    }
}

fn open_app(path: &Path) -> Connection {
    let conn = Connection::open(path).expect("open app");
    conn.busy_timeout(Duration::from_secs(30)).expect("busy timeout");
    conn.pragma_update(None, "journal_mode", "WAL").expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL").expect("synchronous");
    conn
}

fn dualsync(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualsync"));
    cmd.arg("--data-dir").arg(dir.join("state")).env("RUST_BACKTRACE", "0");
    cmd
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run dualsync");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A `dualsync run` process, SIGKILLed when dropped (so a failing test leaves none behind).
struct Runner(Child);

impl Runner {
    /// SIGKILL (what `Child::kill` sends on Unix), and reap it.
    fn kill(mut self) {
        self.0.kill().expect("SIGKILL the runner");
        self.0.wait().expect("reap the runner");
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dualsync run` on the job, its stderr appended to `runner.log`.
fn runner(dir: &Path, until_idle: bool) -> Runner {
    let log = OpenOptions::new().create(true).append(true).open(dir.join("runner.log")).expect("runner log");
    let mut cmd = dualsync(dir);
    cmd.args(["run", "--admin-addr", "127.0.0.1:0", "--config"])
        .arg(dir.join("job.yaml"))
        .env("DUALSYNC_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    if until_idle {
        cmd.arg("--until-idle");
    }
    Runner(cmd.spawn().expect("spawn dualsync run"))
}

fn log_tail(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join("runner.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Each app's tables as the audit triggers see them: (table, key expression, value column).
const AUDITED: [[(&str, &str, &str); 2]; 2] = [
    [("parents", "{r}.pid", "n"), ("children", "{r}.pid || '/' || {r}.cno", "label")],
    [("owners", "{r}.owner_id", "num"), ("items", "{r}.owner_id || '/' || {r}.item_no", "caption")],
];

/// Test-only triggers that keep every write to the mapped tables, users' and dualsync's alike,
/// in `soak_audit` (the change log is trimmed as it is consumed): the failure report's evidence.
/// The transaction id is the one in `_dualsync_tx` (this test's `soak-*`, dualsync's
/// `dualsync-write-*`), or none for a write outside a marked transaction.
fn install_audit(conn: &Connection, side: Side) {
    let mut sql = String::from(
        "CREATE TABLE soak_audit (id INTEGER PRIMARY KEY, tbl TEXT, k TEXT, op TEXT, val TEXT, txid TEXT, at_ms INTEGER);",
    );
    let now = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
    let txid = "(SELECT txid FROM _dualsync_tx LIMIT 1)";
    for (table, key, value) in AUDITED[side.index()] {
        for (op, when, row) in [("insert", "INSERT", "NEW"), ("update", "UPDATE", "NEW"), ("delete", "DELETE", "OLD")] {
            let val = if row == "OLD" { "NULL".to_string() } else { format!("NEW.{value}") };
            // An update of the mapped columns only: not capture's own version bump.
            let when = if when == "UPDATE" { format!("UPDATE OF {value}") } else { when.to_string() };
            sql.push_str(&format!(
                "CREATE TRIGGER soak_{table}_{op} AFTER {when} ON {table} BEGIN \
                 INSERT INTO soak_audit (tbl, k, op, val, txid, at_ms) \
                 VALUES ('{table}', {}, '{op}', {val}, {txid}, {now}); END;",
                key.replace("{r}", row)
            ));
        }
    }
    conn.execute_batch(&sql).expect("audit triggers");
}

/// Every write to a record on one side, from the audit table: ms into the run, op, value,
/// transaction.
fn audit(conn: &Connection, side: Side, rec: Rec, epoch_ms: i64) -> Vec<String> {
    let table = AUDITED[side.index()][usize::from(matches!(rec, Rec::Child(..)))].0;
    let key = match rec {
        Rec::Parent(_) => rec.pid(),
        Rec::Child(_, c) => format!("{}/{c}", rec.pid()),
    };
    let mut stmt = conn
        .prepare("SELECT at_ms, op, val, txid FROM soak_audit WHERE tbl = ?1 AND k = ?2 ORDER BY id")
        .expect("audit");
    stmt.query_map(params![table, key], |r| {
        let (at, op, val, txid): (i64, String, Option<String>, Option<String>) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        let by = txid.unwrap_or_else(|| "no marked transaction".into());
        Ok(format!("    {:>6} ms {} {op} {} by {by}", at - epoch_ms, side_name(side), val.unwrap_or_default()))
    })
    .expect("audit")
    .collect::<Result<_, _>>()
    .expect("audit")
}

fn epoch_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as i64
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|s| s.parse().unwrap_or_else(|_| panic!("{name}={s}: not a whole number")))
}

/// What the state database holds after the drain.
struct Outcome {
    /// Open or retrying application/system rows.
    open: Vec<SyncError>,
    conflicts: usize,
    dead_letters: usize,
}

fn read_state(dir: &Path) -> Outcome {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio").block_on(async {
        let rt = LocalRuntime::open(&dir.join("state")).expect("open state");
        let admin = rt.admin();
        let mut open = Vec::new();
        for status in [ErrorStatus::Open, ErrorStatus::Retrying] {
            let filter = ErrorFilter { status: Some(status), ..ErrorFilter::default() };
            let mut after: Option<String> = None;
            loop {
                let page = admin.errors(JOB, &filter, 500, after.as_deref()).await.expect("error rows");
                open.extend(page.items.into_iter().filter(|e| e.category.retriable()));
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        let mut conflicts = 0;
        let mut after: Option<String> = None;
        loop {
            let page = admin.conflicts(JOB, 500, after.as_deref()).await.expect("conflicts");
            conflicts += page.items.len();
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let dead_letters = rt.dead_letters.iter().map(|q| q.peek_all().expect("dead letters").len()).sum();
        Outcome { open, conflicts, dead_letters }
    })
}

/// The rules of the header for one record; `Err` says what is wrong.
fn check(model: &Model, rec: Rec, held: [Option<u64>; 2], exempt: bool) -> Result<(), String> {
    if held[0] != held[1] {
        return if exempt { Ok(()) } else { Err(format!("out of step, no open error: (a, b) hold {held:?}")) };
    }
    let x = held[0];
    let last = model.last.get(&rec).copied().unwrap_or_default();
    // (c) someone's last write.
    let candidates: Vec<Option<u64>> = last.iter().flatten().map(|w| w.content()).collect();
    let allowed = if candidates.is_empty() { x.is_none() } else { candidates.contains(&x) };
    if !allowed {
        return Err(format!(
            "both sides hold {x:?}, but the last writes (a, b) are {last:?}: not someone's last write"
        ));
    }
    if exempt {
        return Ok(());
    }
    let [Some(wa), Some(wb)] = last else { return Ok(()) };
    // (b) no lost update: a side's last write made on top of the other's last value wins.
    for (s, o) in [(wa, wb), (wb, wa)] {
        if let Some(v) = o.content() {
            if model.made_on(s.id, v) && x != s.content() {
                return Err(format!(
                    "both sides hold {x:?}, but write {} was made on top of {v} (the other side's last): a lost \
                     update",
                    s.id
                ));
            }
        }
    }
    // (b) concurrent values: the primary's.
    let concurrent = !wa.delete && !wb.delete && !model.made_on(wa.id, wb.id) && !model.made_on(wb.id, wa.id);
    if concurrent && !rec.deletable() {
        let primary = last[PRIMARY.index()].and_then(|w| w.content());
        if x != primary {
            return Err(format!(
                "both sides hold {x:?}; the last writes (a, b) {last:?} were concurrent, so the primary ({}) \
                 should have won",
                side_name(PRIMARY)
            ));
        }
    }
    Ok(())
}

#[test]
fn kill_9_soak_converges() {
    let seed = env_u64("DUALSYNC_SOAK_SEED").unwrap_or_else(|| rand::rng().random());
    let secs = env_u64("DUALSYNC_SOAK_SECS").unwrap_or(DEFAULT_SECS);
    println!("soak: seed {seed}, {secs} s of edits (DUALSYNC_SOAK_SEED={seed} DUALSYNC_SOAK_SECS={secs} to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);
    // Kept if the test fails (any panic), removed at the end when it passes.
    let dir = tempfile::tempdir().expect("tempdir").keep();
    println!("soak: data in {}", dir.display());

    let paths: [PathBuf; 2] = [dir.join("a.db"), dir.join("b.db")];
    let mut apps = [open_app(&paths[0]), open_app(&paths[1])];
    for side in Side::BOTH {
        apps[side.index()].execute_batch(SCHEMA[side.index()]).expect("schema");
    }
    std::fs::write(dir.join("job.yaml"), JOB_YAML).expect("job file");
    // Started before the soak: capture is installed, so no edit goes uncaptured.
    run_ok(dualsync(&dir).arg("job").arg("apply").arg(dir.join("job.yaml")));
    run_ok(dualsync(&dir).args(["job", "start", JOB]));
    for side in Side::BOTH {
        install_audit(&apps[side.index()], side);
    }

    let recs = Rec::all();
    let mut model = Model::default();
    let (started, started_ms) = (Instant::now(), epoch_ms());
    let end = started + Duration::from_secs(secs);
    let mut kills: Vec<u128> = Vec::new();
    let mut child = Some(runner(&dir, false));
    let mut next_kill = started + Duration::from_millis(rng.random_range(500..5000));
    let mut restart_at = started;
    while Instant::now() < end {
        let now = Instant::now();
        match &mut child {
            Some(_) if now >= next_kill => {
                child.take().expect("a runner").kill();
                kills.push(started.elapsed().as_millis());
                restart_at = now + Duration::from_millis(rng.random_range(0..500));
            }
            Some(c) => {
                if let Some(status) = c.0.try_wait().expect("runner status") {
                    panic!("seed {seed}: the runner exited by itself ({status}):\n{}", log_tail(&dir));
                }
            }
            None if now >= restart_at => {
                child = Some(runner(&dir, false));
                next_kill = now + Duration::from_millis(rng.random_range(500..5000));
            }
            None => {}
        }
        let side = if rng.random_bool(0.5) { Side::A } else { Side::B };
        match rng.random_range(0..100) {
            // Updates and inserts: one to three records in one transaction.
            0..40 => {
                let n = rng.random_range(1..=3);
                let pick: Vec<Rec> = (0..n).map(|_| recs[rng.random_range(0..recs.len())]).collect();
                model.upsert(&mut apps[side.index()], side, &pick, started);
            }
            // A parent and its children in one transaction.
            40..55 => {
                let p = rng.random_range(0..PARENTS);
                let family: Vec<Rec> =
                    std::iter::once(Rec::Parent(p)).chain((1..=CHILDREN).map(|c| Rec::Child(p, c))).collect();
                model.upsert(&mut apps[side.index()], side, &family, started);
            }
            // A delete (a parent with its children); now and then the runner dies soon after,
            // likely while the delete is on its way through capture.
            55..65 => {
                let deletable: Vec<Rec> = recs.iter().copied().filter(|r| r.deletable()).collect();
                let pick = deletable[rng.random_range(0..deletable.len())];
                if model.delete(&mut apps[side.index()], side, pick, started) > 0 && rng.random_bool(0.3) {
                    next_kill = next_kill.min(Instant::now() + Duration::from_millis(rng.random_range(20..400)));
                }
            }
            // The same record on both sides at once.
            _ => {
                let r = recs[rng.random_range(0..recs.len())];
                let made: usize =
                    Side::BOTH.iter().map(|&s| model.upsert(&mut apps[s.index()], s, &[r], started)).sum();
                model.concurrent += u64::from(made == 2);
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
    }
    if let Some(c) = child.take() {
        c.kill();
        kills.push(started.elapsed().as_millis());
    }
    let edit_secs = started.elapsed().as_secs_f64();

    // Drain: a runner that stops once every change log is read and every queue is empty.
    let drain_started = Instant::now();
    let mut drain = runner(&dir, true);
    let status = loop {
        if let Some(status) = drain.0.try_wait().expect("runner status") {
            break status;
        }
        if drain_started.elapsed() > DRAIN_LIMIT {
            panic!(
                "seed {seed}: the pipeline did not drain in {DRAIN_LIMIT:?}; data kept in {}:\n{}",
                dir.display(),
                log_tail(&dir)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "seed {seed}: the draining runner failed ({status}):\n{}", log_tail(&dir));
    let drain_secs = drain_started.elapsed().as_secs_f64();

    let outcome = read_state(&dir);
    let exempt: HashSet<(String, Key)> = outcome.open.iter().map(|e| (e.map.clone(), e.key.clone())).collect();
    let mut failures = Vec::new();
    let (mut in_step, mut exempted, mut exempt_in_step) = (0, 0, 0);
    for &rec in &recs {
        let held = [rec.read(&apps[0], Side::A), rec.read(&apps[1], Side::B)];
        let is_exempt = exempt.contains(&(rec.map().to_string(), rec.key()));
        in_step += usize::from(held[0] == held[1]);
        exempted += usize::from(is_exempt);
        exempt_in_step += usize::from(is_exempt && held[0] == held[1]);
        if let Err(why) = check(&model, rec, held, is_exempt) {
            let history: Vec<String> = model
                .history
                .get(&rec)
                .into_iter()
                .flatten()
                .map(|(ms, side, w, on)| {
                    let what = if w.delete { format!("delete #{}", w.id) } else { format!("value {}", w.id) };
                    format!("    {ms:>6} ms {} {what} (on {on:?})", side_name(*side))
                })
                .collect();
            let log: Vec<String> =
                Side::BOTH.iter().flat_map(|&s| audit(&apps[s.index()], s, rec, started_ms)).collect();
            failures.push(format!(
                "{} {}: {why}\n  writes:\n{}\n  every write on a, then on b (soak_audit):\n{}",
                rec.map(),
                rec.key(),
                history.join("\n"),
                log.join("\n")
            ));
        }
    }
    println!(
        "soak: seed {seed}: {edit_secs:.0} s of edits: {} transactions, {} writes ({} deletes, {} concurrent \
         pairs), {} kills; drained in {drain_secs:.1} s; {} keys checked, {in_step} in step, {exempted} named by \
         {} open error(s) ({exempt_in_step} of these keys in step); {} conflict(s) logged; {} dead letter(s)",
        model.transactions,
        model.writes,
        model.deletes,
        model.concurrent,
        kills.len(),
        recs.len(),
        outcome.open.len(),
        outcome.conflicts,
        outcome.dead_letters
    );
    for e in &outcome.open {
        let held = recs
            .iter()
            .find(|r| r.map() == e.map && r.key() == e.key)
            .map(|&r| [r.read(&apps[0], Side::A), r.read(&apps[1], Side::B)]);
        println!(
            "soak: open {} error on {} {} from {}: {}; (a, b) hold {held:?}",
            e.category.as_str(),
            e.map,
            e.key,
            e.app,
            e.message
        );
    }
    if !failures.is_empty() {
        panic!(
            "seed {seed}: {} key(s) fail the soak's checks (data kept in {}; ms count from {started_ms} ms \
             after the Unix epoch, as runner.log's times do; kills at ms {kills:?}):\n{}",
            failures.len(),
            dir.display(),
            failures.join("\n")
        );
    }
    drop(apps);
    std::fs::remove_dir_all(&dir).expect("remove the data folder");
}
