//! No silent type coercion (DESIGN §3, "Canonical content"): a value the target cannot hold
//! exactly is an application error naming the map, key and field, never the value; values
//! that are the same once canonical compare equal, whatever each side's column type.
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dualsync::adapters::embedded::EmbeddedDb;
use dualsync::domain::config::parse_job;
use dualsync::domain::errors::{ErrorCategory, SyncError};
use dualsync::domain::job::Side;
use dualsync::ports::ManualClock;
use dualsync::runtime::local::{LocalRuntime, SqliteRegistry};
use dualsync::state::ErrorFilter;
use dualsync::steps::Failpoints;

/// `code` is TEXT on A and INTEGER on B; `amount` is TEXT on A and REAL on B.
const JOB: &str = "job: v
apps:
  - { name: a, connector: sqlite, path: A }
  - { name: b, connector: sqlite, path: B }
primary: a
table_groups:
  - name: g
    maps:
      - name: things
        sequence: 1
        entities: { a: things, b: stuff }
        keys: [{ a: id, b: sid }]
        fields:
          - { a: code, b: code_no }
          - { a: amount, b: amt }
          - { a: note, b: memo }
";

struct H {
    _dir: tempfile::TempDir,
    rt: LocalRuntime,
    a: PathBuf,
    b: PathBuf,
    clock: ManualClock,
}

async fn harness() -> H {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let schema = |p: &Path, sql: &str| rusqlite::Connection::open(p).unwrap().execute_batch(sql).unwrap();
    schema(&a, "CREATE TABLE things (id TEXT PRIMARY KEY, code TEXT, amount TEXT, note TEXT);");
    schema(&b, "CREATE TABLE stuff (sid TEXT PRIMARY KEY, code_no INTEGER, amt REAL, memo TEXT);");
    let mut def = parse_job("job.yaml", JOB).unwrap();
    def.apps[0].path = Some(a.display().to_string());
    def.apps[1].path = Some(b.display().to_string());
    let clock = ManualClock::new(1_700_000_000_000);
    let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
    let registry = Arc::new(SqliteRegistry::default());
    let rt = LocalRuntime::with_registry(db, Arc::new(clock.clone()), Failpoints::default(), registry);
    rt.apply(def).await.unwrap();
    rt.start("v").await.unwrap();
    H { _dir: dir, rt, a, b, clock }
}

impl H {
    fn exec(&self, side: Side, sql: &str) {
        common::exec(if side == Side::A { &self.a } else { &self.b }, sql)
    }

    /// One value and its storage class, e.g. `"007|text"`; `None` when there is no such row.
    fn value(&self, side: Side, sql: &str) -> Option<String> {
        let conn = rusqlite::Connection::open(if side == Side::A { &self.a } else { &self.b }).unwrap();
        conn.query_row(sql, [], |r| r.get(0)).ok()
    }

    async fn errors(&self) -> Vec<SyncError> {
        self.rt.state.error_rows("v", &ErrorFilter::default()).await.unwrap().into_iter().map(|(_, e)| e).collect()
    }

    async fn drain(&self) {
        for _ in 0..100 {
            while self.rt.pump().await.unwrap() > 0 {}
            if self.rt.is_idle().await.unwrap() {
                return;
            }
            self.clock.advance(301_000);
        }
        panic!("pipeline did not drain");
    }

    async fn in_step(&self) -> dualsync::runtime::verify::MapComparison {
        let lj = self.rt.steps.load_job("v").await.unwrap().unwrap();
        dualsync::runtime::verify::compare(&lj).await.unwrap().remove(0)
    }
}

#[tokio::test]
async fn a_value_the_target_column_would_change_is_refused_naming_map_key_and_field() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO things (id, code, amount, note) VALUES ('t1', '007', '1.5', 'n')");
    h.drain().await;

    let errors = h.errors().await;
    assert_eq!(errors.len(), 1, "{errors:#?}");
    let e = &errors[0];
    assert_eq!(e.category, ErrorCategory::Application);
    assert_eq!((e.map.as_str(), e.key.to_string().as_str()), ("things", "t1"));
    assert!(e.message.contains("things/t1"), "names the map and key: {}", e.message);
    assert!(e.message.contains("code_no"), "names the field: {}", e.message);
    assert!(!e.message.contains("007") && !e.message.contains(" 7"), "never the value: {}", e.message);
    assert_eq!(h.value(Side::B, "SELECT count(*) || '' FROM stuff"), Some("0".into()), "nothing half written");

    // An edit on B's side cannot turn A's value into what B made of it.
    h.exec(Side::B, "UPDATE stuff SET memo = 'm' WHERE sid = 't1'");
    h.drain().await;
    assert_eq!(
        h.value(Side::A, "SELECT code || '|' || typeof(code) FROM things WHERE id = 't1'"),
        Some("007|text".into())
    );

    // Once A holds a value B can keep, the record syncs (and the row is resolved).
    h.exec(Side::A, "UPDATE things SET code = '7' WHERE id = 't1'");
    h.drain().await;
    assert_eq!(h.value(Side::B, "SELECT code_no || '|' || typeof(code_no) FROM stuff"), Some("7|integer".into()));
    assert!(h.in_step().await.all_in_step(), "{:?}", h.in_step().await);
}

#[tokio::test]
async fn trailing_zeros_and_padding_are_not_the_same_value() {
    // '1.50' would read back as 1.5, ' 7' as 7: refused, each naming its field.
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO things (id, code, amount, note) VALUES ('t1', '7', '1.50', 'n')");
    h.exec(Side::A, "INSERT INTO things (id, code, amount, note) VALUES ('t2', ' 7', '2', 'n')");
    h.drain().await;
    let mut errors = h.errors().await;
    errors.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(errors[0].message.contains("things/t1") && errors[0].message.contains("amt"), "{}", errors[0].message);
    assert!(errors[1].message.contains("things/t2") && errors[1].message.contains("code_no"), "{}", errors[1].message);
    assert_eq!(h.value(Side::B, "SELECT count(*) || '' FROM stuff"), Some("0".into()));
}

#[tokio::test]
async fn a_number_and_its_canonical_text_are_in_step_both_ways_without_rewrites() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO things (id, code, amount, note) VALUES ('t1', '7', '1.5', 'n')");
    h.drain().await;
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(h.value(Side::B, "SELECT code_no || '|' || typeof(code_no) FROM stuff"), Some("7|integer".into()));
    assert_eq!(h.value(Side::B, "SELECT amt || '|' || typeof(amt) FROM stuff"), Some("1.5|real".into()));
    assert!(h.in_step().await.all_in_step(), "{:?}", h.in_step().await);
    // The echo of B's write does not come back to A: A keeps its text.
    assert_eq!(h.value(Side::A, "SELECT typeof(code) FROM things"), Some("text".into()));

    // B's numbers go to A's text columns as their canonical text, and are in step there.
    h.exec(Side::B, "UPDATE stuff SET code_no = 8, amt = 2.25 WHERE sid = 't1'");
    h.drain().await;
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(
        h.value(Side::A, "SELECT code || '|' || amount || '|' || typeof(code) FROM things"),
        Some("8|2.25|text".into())
    );
    assert!(h.in_step().await.all_in_step(), "{:?}", h.in_step().await);
}
