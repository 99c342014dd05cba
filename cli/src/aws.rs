//! `dualsync aws`: create a stage's table and queues (on an account, or an emulator with
//! --endpoint-url), and the cost benchmark.
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rusqlite::params;

use dualsync::adapters::aws::{bootstrap, sdk_config, Names, Resources, Usage, UsageSnapshot};
use dualsync::domain::config::parse_job;
use dualsync::domain::job::Side;
use dualsync::steps::reconcile::ReconcileMessage;
use dualsync::steps::Metrics;
use dualsync_lambda::stack::Stack;

use crate::backend::BackendArgs;
use crate::bench::{job_yaml, DST, SRC};
use crate::sample_apps::{in_transaction, open};

#[derive(Subcommand)]
pub enum AwsCommand {
    /// Creates the state table and the queues (each with its dead-letter queue) of --stage, if
    /// they are missing, and prints their names and URLs.
    Bootstrap,
    /// Runs N changes through the Lambda handlers and the AWS adapters (use an emulator:
    /// --endpoint-url), counts requests and capacity units, and prints the cost per million
    /// synced records at on-demand prices.
    Cost(CostArgs),
}

#[derive(Args)]
pub struct CostArgs {
    /// Changes to sync: half are inserts in the primary app, half edits of them in the other.
    #[arg(long, default_value_t = 2_000)]
    records: usize,
    /// Records per source-app transaction.
    #[arg(long, default_value_t = 100)]
    tx_size: usize,
    /// The functions' memory, for the GB-seconds.
    #[arg(long, default_value_t = 256)]
    memory_mb: u32,
    /// An initial sync of N records that src holds before the job starts, fanned out by the
    /// reconcile function one message per page, instead of live changes.
    #[arg(long)]
    initial_sync: bool,
}

/// The reconcile function's time-out (template.yaml's Globals): no invocation may take longer.
const FUNCTION_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(backend: &BackendArgs, cmd: AwsCommand) -> Result<()> {
    let sdk = sdk_config(backend.endpoint_url.as_deref()).await;
    match cmd {
        AwsCommand::Bootstrap => {
            let r = bootstrap(&sdk, &Names::new(&backend.stage)).await?;
            println!("table            {}", r.table);
            for (name, url) in r.queue_urls() {
                println!("{name:<16} {url}");
            }
            Ok(())
        }
        AwsCommand::Cost(args) => cost(&sdk, args).await,
    }
}

/// On-demand prices (USD), as the issue states them.
mod price {
    pub const LAMBDA_REQUEST: f64 = 0.20 / 1e6;
    pub const LAMBDA_GB_SECOND_ARM: f64 = 0.000_013_333_4;
    pub const SQS_STANDARD: f64 = 0.40 / 1e6;
    pub const SQS_FIFO: f64 = 0.50 / 1e6;
    pub const DYNAMO_WRITE_UNIT: f64 = 0.625 / 1e6;
    pub const DYNAMO_READ_UNIT: f64 = 0.125 / 1e6;
}

async fn cost(sdk: &aws_config::SdkConfig, args: CostArgs) -> Result<()> {
    let half = if args.initial_sync { args.records.max(1) } else { (args.records / 2).max(1) };
    let synced = if args.initial_sync { half as f64 } else { (half * 2) as f64 };
    let stage = format!("cost{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let resources = bootstrap(sdk, &Names::new(&stage)).await.context("creating the benchmark's table and queues")?;
    let result = measure(sdk, &resources, &args, half, synced, &stage).await;
    resources.delete(sdk).await.context("deleting the benchmark's table and queues")?;
    result
}

async fn measure(
    sdk: &aws_config::SdkConfig,
    resources: &Resources,
    args: &CostArgs,
    half: usize,
    synced: f64,
    stage: &str,
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (src, dst) = (dir.path().join("src.db"), dir.path().join("dst.db"));
    open(&src)?.execute_batch(SRC)?;
    open(&dst)?.execute_batch(DST)?;
    if args.initial_sync {
        // Rows from before the job: only an initial sync copies them.
        let mut conn = open(&src)?;
        let tx = conn.transaction()?;
        {
            let mut ins =
                tx.prepare("INSERT INTO items (id, name, qty, price, note) VALUES (?1, 'item', ?1 % 97, 1.5, 'old')")?;
            for i in 0..half {
                ins.execute(params![i as i64])?;
            }
        }
        tx.commit()?;
    }
    let usage = Arc::new(Usage::default());
    let stack = Stack::new(sdk, resources, usage.clone());
    stack.state().apply_job(parse_job("cost job", &job_yaml(&src, &dst))?).await?;
    stack.start("bench").await.map_err(|e| anyhow::anyhow!("{e}"))?;
    // Setup is not what a synced record costs.
    usage.reset();
    if args.initial_sync {
        println!("dualsync aws cost --initial-sync: {half} records in src before the job, stage {stage}");
        let admin = resources.admin(sdk, usage.clone());
        let listing = ReconcileMessage::InitialSync {
            job: "bench".into(),
            from: "src".into(),
            map: None,
            company: None,
            page_size: None,
        };
        admin.reconcile.send(vec![listing.out()]).await?;
        let started = Instant::now();
        let (mut invocations, mut billed_ms, mut longest) = (0u64, 0u64, Duration::ZERO);
        let deadline = Instant::now() + Duration::from_secs(3600);
        while synced_count(&src, &dst, Side::A)? < half {
            if Instant::now() > deadline {
                bail!("only {} of {half} records copied in an hour", synced_count(&src, &dst, Side::A)?);
            }
            for inv in stack.poll_round().await.map_err(|e| anyhow::anyhow!("{e}"))? {
                invocations += 1;
                billed_ms += (inv.billed.as_millis() as u64).max(1);
                longest = longest.max(inv.billed);
            }
        }
        let written = Metrics::get(&stack.metrics.written);
        report(args, synced, written, invocations, billed_ms, &usage.snapshot(), started.elapsed());
        println!(
            "longest invocation {:.2} s (the functions' time-out: {} s)",
            longest.as_secs_f64(),
            FUNCTION_TIMEOUT.as_secs()
        );
        if longest > FUNCTION_TIMEOUT {
            bail!("an invocation took longer than the functions' time-out");
        }
        return Ok(());
    }

    println!(
        "dualsync aws cost: {} changes ({half} inserts in src, then {half} edits of them in dst), transactions of {}, stage {stage}",
        half * 2,
        args.tx_size
    );
    let started = Instant::now();
    let (mut invocations, mut billed_ms) = (0u64, 0u64);
    for phase in [Side::A, Side::B] {
        write_phase(&src, &dst, phase, half, args.tx_size.max(1))?;
        let deadline = Instant::now() + Duration::from_secs(1800);
        while synced_count(&src, &dst, phase)? < half {
            if Instant::now() > deadline {
                bail!(
                    "phase {phase:?}: only {} of {half} changes arrived in 30 minutes",
                    synced_count(&src, &dst, phase)?
                );
            }
            stack.pump_feeds(1000).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            for inv in stack.poll_round().await.map_err(|e| anyhow::anyhow!("{e}"))? {
                invocations += 1;
                // Lambda bills each invocation by the millisecond, at least one.
                billed_ms += (inv.billed.as_millis() as u64).max(1);
            }
        }
    }
    let written = Metrics::get(&stack.metrics.written);
    report(args, synced, written, invocations, billed_ms, &usage.snapshot(), started.elapsed());
    Ok(())
}

/// Phase A: insert `n` items in src. Phase B: edit each of them in dst.
fn write_phase(src: &Path, dst: &Path, phase: Side, n: usize, tx_size: usize) -> Result<()> {
    let mut conn = open(if phase == Side::A { src } else { dst })?;
    for start in (0..n).step_by(tx_size) {
        in_transaction(&mut conn, &format!("cost-{phase:?}-{start}"), |tx| {
            let sql = match phase {
                Side::A => "INSERT INTO items (id, name, qty, price, note) VALUES (?1, 'item', ?1 % 97, 1.5, 'new')",
                Side::B => "UPDATE products SET remark = 'edited', quantity = quantity + 1 WHERE product_id = ?1",
            };
            let mut stmt = tx.prepare_cached(sql)?;
            for i in start..(start + tx_size).min(n) {
                stmt.execute(params![i as i64])?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// How many of the phase's changes have arrived on the other side.
fn synced_count(src: &Path, dst: &Path, phase: Side) -> Result<usize> {
    let n: i64 = match phase {
        Side::A => open(dst)?.query_row("SELECT count(*) FROM products", [], |r| r.get(0))?,
        Side::B => open(src)?.query_row("SELECT count(*) FROM items WHERE note = 'edited'", [], |r| r.get(0))?,
    };
    Ok(n as usize)
}

fn report(
    args: &CostArgs,
    synced: f64,
    written: u64,
    invocations: u64,
    billed_ms: u64,
    u: &UsageSnapshot,
    elapsed: Duration,
) {
    let per_m = |x: f64| x / synced * 1e6;
    let gb_s = billed_ms as f64 / 1000.0 * f64::from(args.memory_mb) / 1024.0;
    let rows = [
        ("Lambda requests", invocations as f64, price::LAMBDA_REQUEST),
        ("Lambda GB-seconds", gb_s, price::LAMBDA_GB_SECOND_ARM),
        ("SQS standard requests", u.sqs_standard_requests as f64, price::SQS_STANDARD),
        ("SQS FIFO requests", u.sqs_fifo_requests as f64, price::SQS_FIFO),
        ("DynamoDB write units", u.dynamo_write_units, price::DYNAMO_WRITE_UNIT),
        ("DynamoDB read units", u.dynamo_read_units, price::DYNAMO_READ_UNIT),
    ];
    println!("synced records     {synced:.0} ({written} writes to the apps), {:.1} s", elapsed.as_secs_f64());
    println!("{:<24} {:>12} {:>14} {:>14}", "item", "count", "per record", "USD per 1M");
    let mut total = 0.0;
    for (name, count, unit) in rows {
        let usd = per_m(count) * unit;
        total += usd;
        println!("{name:<24} {count:>12.1} {:>14.4} {usd:>14.4}", count / synced);
    }
    println!("{:<24} {:>12} {:>14} {total:>14.4}", "total", "", "");
    println!("DynamoDB requests  {} ({:.2} per record)", u.dynamo_requests, u.dynamo_requests as f64 / synced);
    println!(
        "Lambda             {invocations} invocations, {:.1} ms each on average against this endpoint (emulator latency included)",
        billed_ms as f64 / invocations.max(1) as f64
    );
}
