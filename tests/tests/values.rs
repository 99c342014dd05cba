//! No silent type coercion (DESIGN §3, "Canonical content"): a value the target cannot hold
//! exactly is an application error naming the map, key and field, never the value; values
//! that are the same once canonical compare equal, whatever each side's column type.
mod common;

use common::{apps_of, Local};
use dualsync::domain::errors::ErrorCategory;
use dualsync::domain::job::Side;
use dualsync::runtime::verify::MapComparison;

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

async fn harness() -> Local {
    Local::with(|a, b| {
        apps_of(
            a,
            b,
            [
                "CREATE TABLE things (id TEXT PRIMARY KEY, code TEXT, amount TEXT, note TEXT);",
                "CREATE TABLE stuff (sid TEXT PRIMARY KEY, code_no INTEGER, amt REAL, memo TEXT);",
            ],
            JOB,
        )
    })
    .await
}

/// The one map's comparison.
async fn in_step(h: &Local) -> MapComparison {
    h.compare().await.remove(0)
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
    assert_eq!(h.text(Side::B, "SELECT count(*) || '' FROM stuff"), Some("0".into()), "nothing half written");

    // An edit on B's side cannot turn A's value into what B made of it.
    h.exec(Side::B, "UPDATE stuff SET memo = 'm' WHERE sid = 't1'");
    h.drain().await;
    assert_eq!(
        h.text(Side::A, "SELECT code || '|' || typeof(code) FROM things WHERE id = 't1'"),
        Some("007|text".into())
    );

    // Once A holds a value B can keep, the record syncs (and the row is resolved).
    h.exec(Side::A, "UPDATE things SET code = '7' WHERE id = 't1'");
    h.drain().await;
    assert_eq!(h.text(Side::B, "SELECT code_no || '|' || typeof(code_no) FROM stuff"), Some("7|integer".into()));
    assert!(in_step(&h).await.all_in_step(), "{:?}", in_step(&h).await);
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
    assert_eq!(h.text(Side::B, "SELECT count(*) || '' FROM stuff"), Some("0".into()));
}

#[tokio::test]
async fn a_number_and_its_canonical_text_are_in_step_both_ways_without_rewrites() {
    let h = harness().await;
    h.exec(Side::A, "INSERT INTO things (id, code, amount, note) VALUES ('t1', '7', '1.5', 'n')");
    h.drain().await;
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(h.text(Side::B, "SELECT code_no || '|' || typeof(code_no) FROM stuff"), Some("7|integer".into()));
    assert_eq!(h.text(Side::B, "SELECT amt || '|' || typeof(amt) FROM stuff"), Some("1.5|real".into()));
    assert!(in_step(&h).await.all_in_step(), "{:?}", in_step(&h).await);
    // The echo of B's write does not come back to A: A keeps its text.
    assert_eq!(h.text(Side::A, "SELECT typeof(code) FROM things"), Some("text".into()));

    // B's numbers go to A's text columns as their canonical text, and are in step there.
    h.exec(Side::B, "UPDATE stuff SET code_no = 8, amt = 2.25 WHERE sid = 't1'");
    h.drain().await;
    assert!(h.errors().await.is_empty(), "{:#?}", h.errors().await);
    assert_eq!(
        h.text(Side::A, "SELECT code || '|' || amount || '|' || typeof(code) FROM things"),
        Some("8|2.25|text".into())
    );
    assert!(in_step(&h).await.all_in_step(), "{:?}", in_step(&h).await);
}
