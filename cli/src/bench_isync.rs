//! `dualsync bench --initial-sync`: an initial sync between two sqlite apps of N customers and
//! N order lines, each line a lookup to its customer, through the same pool of page tasks as
//! `dualsync initial-sync`; prints elapsed, records/s, peak memory and, in the same run, the
//! speed of a plain copy of the same rows, with the ratio.
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rusqlite::params;

use dualsync::domain::config::parse_job;
use dualsync::domain::job::Side;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::initial_sync::{SyncOptions, DEFAULT_PAGES_IN_FLIGHT};

use crate::bench::peak_rss_mib;
use crate::sample_apps::open;

const SRC: &str = "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT, credit REAL);
     CREATE TABLE lines (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, item TEXT, qty INTEGER);";
const DST: &str = "CREATE TABLE accounts (account_id INTEGER PRIMARY KEY, title TEXT NOT NULL, town TEXT, credit_limit REAL);
     CREATE TABLE order_lines (line_id INTEGER PRIMARY KEY, account_id INTEGER NOT NULL, product TEXT, quantity INTEGER);";

fn job_yaml(src: &Path, dst: &Path) -> String {
    format!(
        "job: isync
apps:
  - {{ name: src, connector: sqlite, path: '{}' }}
  - {{ name: dst, connector: sqlite, path: '{}' }}
primary: src
table_groups:
  - name: sales
    maps:
      - name: customers
        sequence: 1
        entities: {{ src: customers, dst: accounts }}
        keys: [{{ src: id, dst: account_id }}]
        fields:
          - {{ src: name, dst: title }}
          - {{ src: city, dst: town }}
          - {{ src: credit, dst: credit_limit }}
      - name: lines
        sequence: 2
        entities: {{ src: lines, dst: order_lines }}
        keys: [{{ src: id, dst: line_id }}]
        fields:
          - {{ src: customer_id, dst: account_id }}
          - {{ src: item, dst: product }}
          - {{ src: qty, dst: quantity }}
        lookups:
          - {{ map: customers, fields: [{{ src: customer_id, dst: account_id }}] }}
",
        src.display(),
        dst.display()
    )
}

pub async fn run(data_dir: &Path, n: usize, page_size: usize, pages_in_flight: Option<usize>) -> Result<()> {
    let dir = data_dir.join("bench-initial-sync");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let (src, dst) = (dir.join("src.db"), dir.join("dst.db"));
    fill(&src, n)?;
    open(&dst)?.execute_batch(DST)?;

    let rt = Arc::new(LocalRuntime::open(&dir)?);
    rt.apply(parse_job("bench job", &job_yaml(&src, &dst))?).await?;
    rt.start("isync").await?;
    let opts = SyncOptions {
        pages_in_flight: pages_in_flight.unwrap_or(DEFAULT_PAGES_IN_FLIGHT).max(1),
        ..SyncOptions::new(Side::A).page_size(page_size)
    };
    println!(
        "dualsync bench --initial-sync: {n} customers + {n} lines with a lookup, pages of {}, {} in flight",
        opts.page_size, opts.pages_in_flight
    );
    let started = Instant::now();
    let report = rt.steps.initial_sync("isync", &opts, |_| {}).await?;
    let elapsed = started.elapsed();
    let synced: u64 = report.maps.iter().map(|m| m.total().created).sum();
    let total = 2 * n as u64;
    let rate = total as f64 / elapsed.as_secs_f64();

    let t = Instant::now();
    plain_copy(&src, &dir.join("copy.db"))?;
    let copy_rate = total as f64 / t.elapsed().as_secs_f64();

    print!("{}", report.table());
    println!("records            {total} ({synced} created)");
    println!("elapsed            {:.2} s", elapsed.as_secs_f64());
    println!("records/s          {rate:.0}");
    println!("peak memory        {:.1} MiB", peak_rss_mib().unwrap_or(f64::NAN));
    println!("plain copy         {copy_rate:.0} records/s");
    println!("ratio              {:.3} of plain copy", rate / copy_rate);
    if synced != total {
        anyhow::bail!("only {synced} of {total} records created");
    }
    Ok(())
}

/// The source app: `n` customers and `n` lines, line `i` of customer `i`.
fn fill(src: &Path, n: usize) -> Result<()> {
    let mut conn = open(src)?;
    conn.execute_batch(SRC)?;
    let tx = conn.transaction()?;
    {
        let mut c = tx.prepare("INSERT INTO customers VALUES (?1, ?2, ?3, ?4)")?;
        let mut l = tx.prepare("INSERT INTO lines VALUES (?1, ?2, ?3, ?4)")?;
        for i in 0..n as i64 {
            c.execute(params![i, format!("customer {i}"), format!("city {}", i % 500), (i % 1000) as f64 * 10.0])?;
            l.execute(params![i, i, format!("item {}", i % 97), i % 13])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// The baseline: the same rows into a fresh target, renaming fields as the maps do.
fn plain_copy(src: &Path, copy: &Path) -> Result<()> {
    let source = open(src)?;
    let mut target = open(copy)?;
    target.execute_batch(DST)?;
    let tx = target.transaction()?;
    for (select, insert) in [
        ("SELECT id, name, city, credit FROM customers ORDER BY id", "INSERT INTO accounts VALUES (?1, ?2, ?3, ?4)"),
        ("SELECT id, customer_id, item, qty FROM lines ORDER BY id", "INSERT INTO order_lines VALUES (?1, ?2, ?3, ?4)"),
    ] {
        let mut read = source.prepare(select)?;
        let mut write = tx.prepare(insert)?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            write.execute(params![
                r.get::<_, rusqlite::types::Value>(0)?,
                r.get::<_, rusqlite::types::Value>(1)?,
                r.get::<_, rusqlite::types::Value>(2)?,
                r.get::<_, rusqlite::types::Value>(3)?
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}
