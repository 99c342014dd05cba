//! `dualsync bench`: syncs N records end to end through the embedded pipeline (change log →
//! capture → sequence → deliver → other app) and prints records per second, p50/p99 latency from
//! the app's change to its delivery, peak memory, and, in the same run, the speed of a plain
//! copy of the same rows from one sqlite app to the other. `--apps odata` runs it between two
//! OData sample services instead (see `bench_odata`).
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use rusqlite::params;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualsync::domain::config::parse_job;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::Metrics;

use crate::sample_apps::{in_transaction, open};

#[derive(Args)]
pub struct BenchArgs {
    /// The apps: two sqlite files, or two OData sample services (fno-like to Dataverse-like,
    /// 20 ms per request, Dataverse's service protection).
    #[arg(long, value_enum, default_value_t = BenchApps::Sqlite)]
    apps: BenchApps,
    /// Records to sync [default: 200000 with sqlite apps, 100000 with odata apps].
    #[arg(long)]
    records: Option<usize>,
    /// Records per source-app transaction (odata: business events per list posted).
    #[arg(long, default_value_t = 100)]
    tx_size: usize,
    /// Deliver workers.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// odata: the target's `batch_size` (operations per `$batch`) [default: the connector's; with
    /// --initial-sync 1000, as the README advises for a large initial sync].
    #[arg(long)]
    batch_size: Option<usize>,
    /// odata: how the source's changes reach ingress.
    #[arg(long, value_enum, default_value_t = crate::bench_odata::Events::Notification)]
    events: crate::bench_odata::Events,
    /// An initial sync instead of live changes [default N: 1000000]: sqlite apps, N customers
    /// and N order lines with a lookup; odata apps, N customers.
    #[arg(long)]
    initial_sync: bool,
    /// --initial-sync: records per page.
    #[arg(long, default_value_t = dualsync::steps::initial_sync::DEFAULT_PAGE)]
    page_size: usize,
    /// --initial-sync: pages delivered at once.
    #[arg(long)]
    pages_in_flight: Option<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchApps {
    Sqlite,
    Odata,
}

pub(crate) const SRC: &str =
    "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INTEGER, price REAL, note TEXT)";
pub(crate) const DST: &str = "CREATE TABLE products (product_id INTEGER PRIMARY KEY, title TEXT NOT NULL, quantity INTEGER, unit_price REAL, remark TEXT)";

pub(crate) fn job_yaml(src: &Path, dst: &Path) -> String {
    format!(
        "job: bench
apps:
  - {{ name: src, connector: sqlite, path: '{}' }}
  - {{ name: dst, connector: sqlite, path: '{}' }}
primary: src
table_groups:
  - name: items
    maps:
      - name: items
        sequence: 1
        entities: {{ src: items, dst: products }}
        keys: [{{ src: id, dst: product_id }}]
        fields:
          - {{ src: name, dst: title }}
          - {{ src: qty, dst: quantity }}
          - {{ src: price, dst: unit_price }}
          - {{ src: note, dst: remark }}
",
        src.display(),
        dst.display()
    )
}

pub(crate) fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(data_dir: &Path, args: BenchArgs) -> Result<()> {
    match args.apps {
        BenchApps::Sqlite if args.initial_sync => {
            let n = args.records.unwrap_or(1_000_000);
            crate::bench_isync::run(data_dir, n, args.page_size, args.pages_in_flight).await
        }
        BenchApps::Odata if args.initial_sync => {
            let n = args.records.unwrap_or(1_000_000);
            crate::bench_odata_isync::run(data_dir, n, args.page_size, args.pages_in_flight, args.batch_size).await
        }
        BenchApps::Sqlite => sqlite(data_dir, &args, args.records.unwrap_or(200_000)).await,
        BenchApps::Odata => {
            let n = args.records.unwrap_or(100_000);
            crate::bench_odata::run(data_dir, n, args.tx_size, args.workers, args.events, args.batch_size).await
        }
    }
}

async fn sqlite(data_dir: &Path, args: &BenchArgs, n: usize) -> Result<()> {
    let dir = data_dir.join("bench");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let (src, dst) = (dir.join("src.db"), dir.join("dst.db"));
    open(&src)?.execute_batch(SRC)?;
    open(&dst)?.execute_batch(DST)?;

    let mut rt = LocalRuntime::open(&dir)?;
    rt.deliver_workers = args.workers.max(1);
    let rt = Arc::new(rt);
    rt.apply(parse_job("bench job", &job_yaml(&src, &dst))?).await?;
    rt.start("bench").await?;
    let metrics = rt.steps.metrics.clone();
    metrics.keep_latencies();

    println!("dualsync bench: {n} records, transactions of {}, {} deliver workers", args.tx_size, rt.deliver_workers);
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown);
    let started = Instant::now();
    let tx_size = args.tx_size.max(1);
    let producer = tokio::task::spawn_blocking(move || -> Result<()> {
        let mut conn = open(&src)?;
        for start in (0..n).step_by(tx_size) {
            in_transaction(&mut conn, &format!("bench-{start}"), |tx| {
                let mut ins =
                    tx.prepare_cached("INSERT INTO items (id, name, qty, price, note) VALUES (?1, ?2, ?3, ?4, ?5)")?;
                for i in start..(start + tx_size).min(n) {
                    ins.execute(params![
                        i as i64,
                        format!("item {i}"),
                        (i % 97) as i64,
                        (i % 1000) as f64 / 10.0,
                        "bench"
                    ])?;
                }
                Ok(())
            })?;
        }
        Ok(())
    });
    producer.await??;
    let produced = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while Metrics::get(&metrics.written) < n as u64 {
        if Instant::now() > deadline {
            bail!("only {} of {n} records delivered after 10 minutes", Metrics::get(&metrics.written));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    stop.send(true)?;
    for t in tasks {
        t.await?;
    }
    let mut lat = metrics.take_latencies();
    lat.sort_unstable();
    let rate = n as f64 / elapsed.as_secs_f64();

    // Baseline: a plain copy of the same rows into a fresh target, renaming fields as the map does.
    let copy_path = dir.join("copy.db");
    let mut copy = open(&copy_path)?;
    copy.execute_batch(DST)?;
    let source = open(&dir.join("src.db"))?;
    let t = Instant::now();
    {
        let tx = copy.transaction()?;
        {
            let mut read = source.prepare("SELECT id, name, qty, price, note FROM items ORDER BY id")?;
            let mut write = tx.prepare(
                "INSERT INTO products (product_id, title, quantity, unit_price, remark) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            let mut rows = read.query([])?;
            while let Some(r) = rows.next()? {
                write.execute(params![
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, f64>(3)?,
                    r.get::<_, String>(4)?
                ])?;
            }
        }
        tx.commit()?;
    }
    let copy_rate = n as f64 / t.elapsed().as_secs_f64();

    println!("records            {n}");
    println!("source writes done {:.2} s", produced.as_secs_f64());
    println!("all delivered      {:.2} s", elapsed.as_secs_f64());
    println!("records/s          {rate:.0}");
    println!("latency p50        {} ms", percentile(&lat, 0.50));
    println!("latency p99        {} ms", percentile(&lat, 0.99));
    println!("peak memory        {:.1} MiB", peak_rss_mib().unwrap_or(f64::NAN));
    println!("plain copy         {copy_rate:.0} records/s");
    println!("ratio              {:.3} of plain copy", rate / copy_rate);
    Ok(())
}
