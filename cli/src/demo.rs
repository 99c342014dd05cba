//! `dualsync demo`: two sample apps (fno-like and Dataverse-like), the job of
//! `examples/sales.yaml`, an initial load, then edits on both sides at once. Exits 0 only if
//! every link ends in step and every expected error was seen.
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rusqlite::params;
use std::path::Path;
use std::time::{Duration, Instant};

use dualsync::domain::config::{parse_job, JobDef};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::domain::job::Side;
use dualsync::runtime::verify::compare;
use dualsync::state::ErrorFilter;
use dualsync::steps::Metrics;

use crate::backend::BackendArgs;
use crate::pipeline::Pipeline;

use crate::sample_apps::{self as apps, account, company, order_number};

const JOB_FILE: &str = include_str!("../../examples/sales.yaml");
const JOB: &str = "sales";

#[derive(Args)]
pub struct DemoArgs {
    /// Customers loaded into fno before the job starts.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Sales orders loaded into fno before the job starts (5 lines each).
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>14} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

pub async fn run(data_dir: &Path, backend: &BackendArgs, args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let dir = data_dir.join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let (fno_path, dv_path) = (dir.join("fno.db"), dir.join("dataverse.db"));
    let n = args.customers.max(20);
    let dv_only = 500;
    println!("dualsync demo: fno-like and Dataverse-like sample apps in {}", dir.display());

    // 1. Two apps with data before the job exists.
    let pb = bar((n + args.orders) as u64, "loading fno");
    let mut fno = apps::create_fno(&fno_path)?;
    apps::seed_fno(&mut fno, n, args.orders, 5, |i| pb.set_position(i as u64))?;
    pb.finish_with_message(format!("{n} customers, {} orders, {} lines", args.orders, args.orders * 5));
    let mut dv = apps::create_dataverse(&dv_path)?;
    apps::seed_dataverse(&mut dv, n, dv_only)?;

    // 2. The job: examples/sales.yaml, pointed at the demo's apps.
    let mut def = parse_job("examples/sales.yaml", JOB_FILE)?;
    def.apps[0].path = Some(fno_path.display().to_string());
    def.apps[1].path = Some(dv_path.display().to_string());
    let rt = Pipeline::open(&dir, backend, "demo").await?;
    println!("running on {}", rt.describe());
    let result = scenario(&rt, &dir, args, def, started).await;
    rt.close().await?;
    result
}

async fn scenario(rt: &Pipeline, dir: &Path, args: DemoArgs, def: JobDef, started: Instant) -> Result<()> {
    let (fno_path, dv_path) = (dir.join("fno.db"), dir.join("dataverse.db"));
    let n = args.customers.max(20);
    let dv_only = 500;
    let (mut fno, mut dv) = (apps::open(&fno_path)?, apps::open(&dv_path)?);
    rt.state().apply_job(def).await?;
    rt.start(JOB).await?;

    // 3. Initial sync, both ways.
    let total = (apps::GROUPS + n + args.orders * 6) as u64;
    let pb = bar(total, "initial sync");
    let report = rt.steps().initial_sync(JOB, Side::A, 500, |map, k| pb.set_message(format!("{map}: {k}"))).await?;
    pb.set_position(report.records as u64);
    let back = rt.steps().initial_sync(JOB, Side::B, 500, |_, _| {}).await?;
    pb.finish_with_message(format!(
        "{} records fno → dataverse, {} records dataverse → fno",
        report.records, back.records
    ));

    // 4. Edits made before the runner picks them up, so their outcome is certain:
    //    a conflict, an order whose customer and header are missing on the target, a delete.
    let conflict = 3usize;
    apps::in_transaction(&mut fno, "fno-conflict", |tx| {
        tx.execute(
            "UPDATE CustomersV3 SET Name = 'Edited in fno' WHERE dataAreaId = ?1 AND CustomerAccount = ?2",
            params![company(conflict), account(conflict)],
        )
        .map(|_| ())
    })?;
    apps::in_transaction(&mut dv, "dv-conflict", |tx| {
        tx.execute(
            "UPDATE accounts SET name = 'Edited in dataverse' WHERE msdyn_company = ?1 AND accountnumber = ?2",
            params![company(conflict), account(conflict)],
        )
        .map(|_| ())
    })?;
    let (orphan_customer, orphan_order) = (account(900_001), order_number(900_001));
    apps::in_transaction(&mut dv, "dv-orphan-order", |tx| {
        tx.execute("INSERT INTO salesorders (msdyn_company, ordernumber, msdyn_customeraccount, statuscode) VALUES ('USMF', ?1, ?2, 1)", params![orphan_order, orphan_customer])?;
        tx.execute("INSERT INTO salesorderdetails (msdyn_company, msdyn_salesordernumber, msdyn_linenumber, msdyn_itemnumber, quantity, priceperunit) VALUES ('USMF', ?1, 1, 'ITEM-0001', 2, 9.5)", params![orphan_order])
            .map(|_| ())
    })?;
    let deleted = n + 7; // a Dataverse-born account with no orders
    apps::in_transaction(&mut dv, "dv-delete", |tx| {
        tx.execute(
            "DELETE FROM accounts WHERE msdyn_company = ?1 AND accountnumber = ?2",
            params![company(deleted), account(deleted)],
        )
        .map(|_| ())
    })?;

    // 5. The runner, with edits on both sides at once.
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown);
    let pb = ProgressBar::new_spinner();
    pb.set_prefix("live edits");
    pb.enable_steady_tick(Duration::from_millis(100));
    let metrics = rt.metrics();
    let fno_edits = tokio::task::spawn_blocking({
        let path = fno_path.clone();
        move || edit_fno(&path, n, args.orders)
    });
    let dv_edits = tokio::task::spawn_blocking({
        let path = dv_path.clone();
        move || edit_dataverse(&path, n, dv_only)
    });
    fno_edits.await??;
    dv_edits.await??;
    wait_idle(rt, &pb, &metrics).await?;

    // 6. Mend the missing references: create the customer. The order waiting for it, and the
    //    line waiting for the order, go again by themselves once it syncs.
    apps::in_transaction(&mut dv, "dv-mend", |tx| {
        tx.execute(
            "INSERT INTO accounts (msdyn_company, accountnumber, name, msdyn_customergroupid, creditlimit, customertypecode) VALUES ('USMF', ?1, 'Late customer', 'G01', 1000, 2)",
            params![orphan_customer],
        )
        .map(|_| ())
    })?;
    wait_idle(rt, &pb, &metrics).await?;
    // What is still open is retried, as an operator would (nothing, when all went well).
    let retry = ErrorFilter { category: Some(ErrorCategory::Application), ..Default::default() };
    let still_open =
        rt.state().error_counts(JOB, &ErrorFilter { status: Some(ErrorStatus::Open), ..retry.clone() }).await?;
    let retried = if still_open.total > 0 {
        let r = rt.retry(JOB, retry).await?;
        wait_idle(rt, &pb, &metrics).await?;
        r
    } else {
        "nothing left to retry".to_string()
    };
    pb.finish_and_clear();
    stop.send(true)?;
    for t in tasks {
        t.await?;
    }
    let elapsed = started.elapsed();

    // 7. What happened, and whether it is right.
    let lj = rt.steps().load_job(JOB).await?.context("job vanished")?;
    let maps = compare(&lj).await?;
    let rows = rt.state().error_rows(JOB, &ErrorFilter::default()).await?;
    let conflicts = rt.state().conflicts(JOB, 1000, None).await?.items;
    let m = |c: &std::sync::atomic::AtomicU64| Metrics::get(c);

    println!();
    println!("{:<22} {:>8} {:>10} {:>9}", "map", "fno", "dataverse", "in step");
    for c in &maps {
        println!("{:<22} {:>8} {:>10} {:>9}", c.map, c.records[0], c.records[1], c.in_step);
    }
    println!();
    println!("{:<14} {:>6} {:>6}", "errors", "seen", "open");
    for cat in ErrorCategory::ALL {
        let seen = if cat == ErrorCategory::Conflict {
            conflicts.len()
        } else {
            rows.iter().filter(|(_, r)| r.category == cat).count()
        };
        let open = rows.iter().filter(|(_, r)| r.category == cat && r.status == ErrorStatus::Open).count();
        println!("{:<14} {:>6} {:>6}", cat.as_str(), seen, open);
    }
    for c in &conflicts {
        println!("conflict: {} {} changed on both sides; {} (primary) won", c.map, c.key, c.winner);
    }
    println!("retry: {retried}");
    let synced = m(&metrics.written);
    println!(
        "written {synced}, loopback: {} echoes dropped before delivery + {} found in step at delivery, live deletes {}",
        m(&metrics.echoes_suppressed),
        m(&metrics.in_step),
        m(&metrics.live_deletes)
    );
    println!("elapsed {:.1} s, {:.0} records/s", elapsed.as_secs_f64(), synced as f64 / elapsed.as_secs_f64());

    // The checks behind the exit status.
    let mut failed = Vec::new();
    for c in &maps {
        if !c.all_in_step() {
            failed.push(format!(
                "{}: {} differ, {} only in fno, {} only in dataverse",
                c.map,
                c.differ.len(),
                c.only[0].len(),
                c.only[1].len()
            ));
        }
    }
    let conflict_key = format!("{}/{}", company(conflict), account(conflict));
    if !conflicts.iter().any(|c| c.key.display() == conflict_key && c.winner == "fno") {
        failed.push(format!("no conflict logged for customers/{conflict_key} won by fno"));
    }
    let name: String = dv.query_row(
        "SELECT name FROM accounts WHERE msdyn_company = ?1 AND accountnumber = ?2",
        params![company(conflict), account(conflict)],
        |r| r.get(0),
    )?;
    if name != "Edited in fno" {
        failed.push("the conflict was not decided by the primary (fno)".into());
    }
    let missing: Vec<_> = rows.iter().filter(|(_, r)| r.message.starts_with("missing reference")).collect();
    if missing.len() < 2 || missing.iter().any(|(_, r)| r.status != ErrorStatus::Resolved) {
        failed.push(format!(
            "expected the orphan order's header and line as missing references, mended once the customer synced; saw {}",
            missing.len()
        ));
    }
    let gone: i64 = fno.query_row(
        "SELECT count(*) FROM CustomersV3 WHERE dataAreaId = ?1 AND CustomerAccount = ?2",
        params![company(deleted), account(deleted)],
        |r| r.get(0),
    )?;
    if gone != 0 || m(&metrics.live_deletes) == 0 {
        failed.push("the delete did not reach fno through the live path".into());
    }
    if m(&metrics.echoes_suppressed) + m(&metrics.in_step) == 0 {
        failed.push("no echo of a delivered write was suppressed".into());
    }
    // Concurrency skips are informational (not retriable); anything retriable must be mended.
    let open = rows.iter().filter(|(_, r)| r.retriable && r.status == ErrorStatus::Open).count();
    if open > 0 {
        failed.push(format!("{open} retriable error(s) still open"));
    }
    if !failed.is_empty() {
        bail!("demo checks failed:\n  {}", failed.join("\n  "));
    }
    println!("all checks passed: every link in step, conflict decided by fno, missing references mended once the parent synced, delete applied, echoes suppressed");
    Ok(())
}

async fn wait_idle(rt: &Pipeline, pb: &ProgressBar, m: &Metrics) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !rt.is_idle().await? {
        pb.set_message(format!(
            "written {}, in step {}, errors {}",
            Metrics::get(&m.written),
            Metrics::get(&m.in_step),
            Metrics::get(&m.application)
        ));
        if Instant::now() > deadline {
            bail!("the pipeline did not drain within ten minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// fno: credit limits of 1,000 customers (transactions of 50) and 200 new orders of 5 lines.
fn edit_fno(path: &Path, n: usize, orders: usize) -> Result<()> {
    let mut conn = apps::open(path)?;
    // Customers 10.. (clear of the conflict customer), below the half that Dataverse edits.
    let edited: Vec<usize> = (10..(10 + 1000).min(n / 2)).collect();
    for (chunk, ids) in edited.chunks(50).enumerate() {
        apps::in_transaction(&mut conn, &format!("fno-credit-{chunk}"), |tx| {
            for &i in ids {
                tx.execute("UPDATE CustomersV3 SET CreditLimit = CreditLimit + 100 WHERE dataAreaId = ?1 AND CustomerAccount = ?2", params![company(i), account(i)])?;
            }
            Ok(())
        })?;
    }
    for o in orders..orders + 200 {
        apps::in_transaction(&mut conn, &format!("fno-order-{o}"), |tx| {
            tx.execute(
                "INSERT INTO SalesOrderHeadersV2 (dataAreaId, SalesOrderNumber, OrderingCustomerAccountNumber, OrderStatus) VALUES (?1, ?2, ?3, 'Backorder')",
                params![company(o), order_number(o), account((o * 7) % (n / 2) * 2 + o % 2)],
            )?;
            for l in 1..=5i64 {
                tx.execute(
                    "INSERT INTO SalesOrderLines (dataAreaId, SalesOrderNumber, LineNumber, ItemNumber, OrderedSalesQuantity, SalesPrice) VALUES (?1, ?2, ?3, 'ITEM-0042', ?4, 12.5)",
                    params![company(o), order_number(o), l, l as f64],
                )?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Dataverse: names of 1,000 other customers (one transaction each) and 100 new accounts.
fn edit_dataverse(path: &Path, n: usize, dv_only: usize) -> Result<()> {
    let mut conn = apps::open(path)?;
    for i in n / 2..(n / 2 + 1000).min(n) {
        apps::in_transaction(&mut conn, &format!("dv-name-{i}"), |tx| {
            tx.execute(
                "UPDATE accounts SET name = name || ' (renamed)' WHERE msdyn_company = ?1 AND accountnumber = ?2",
                params![company(i), account(i)],
            )
            .map(|_| ())
        })?;
    }
    for i in n + dv_only..n + dv_only + 100 {
        apps::in_transaction(&mut conn, &format!("dv-new-{i}"), |tx| {
            tx.execute(
                "INSERT INTO accounts (msdyn_company, accountnumber, name, msdyn_customergroupid, creditlimit, customertypecode) VALUES (?1, ?2, ?3, 'G02', 2500, 1)",
                params![company(i), account(i), format!("New account {i}")],
            )
            .map(|_| ())
        })?;
    }
    Ok(())
}
