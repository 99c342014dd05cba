//! What the CLI's test files share: sqlite apps and the one-map job over them.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Runs `sql` on the sqlite app at `path` (waiting out a runner's write lock).
pub fn sqlite(path: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.execute_batch(sql).unwrap();
}

/// The first column of the first row `sql` gives.
pub fn count(path: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(10)).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// `dir/job.yaml`: job `people`, app a's `people` to app b's `contacts` (a.db, b.db in `dir`).
pub fn people_job(dir: &Path) -> PathBuf {
    let job = dir.join("job.yaml");
    std::fs::write(
        &job,
        "job: people
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: sqlite, path: b.db }
primary: a
table_groups:
  - name: all
    maps:
      - name: people
        sequence: 1
        entities: { a: people, b: contacts }
        keys: [{ a: id, b: contact_id }]
        fields: [{ a: name, b: fullname }]
",
    )
    .unwrap();
    job
}
