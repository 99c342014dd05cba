//! `dualsync demo`: two sample apps (fno-like and Dataverse-like: sqlite databases, or OData
//! services with `--apps odata`), the job of `examples/sales.yaml`, an initial load, then edits
//! on both sides at once. Exits 0 only if every link ends in step and every expected error was
//! seen.
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use dualsync::steps::initial_sync::{SyncEvent, SyncOptions};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use dualsync::domain::config::{parse_job, JobDef};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::domain::job::Side;
use dualsync::runtime::verify::compare;
use dualsync::state::ErrorFilter;
use dualsync::steps::Metrics;

use crate::backend::{BackendArgs, BackendKind};
use crate::demo_apps::{DemoApps, Edit, OdataApps, SqliteApps};
use crate::pipeline::Pipeline;
use crate::sample_apps::{self as sample, account, company, order_number, Row};

const JOB_FILE: &str = include_str!("../../examples/sales.yaml");
const JOB: &str = "sales";
/// Accounts only Dataverse holds before the job starts.
const DV_ONLY: usize = 500;
/// The customers' table in each app.
const CUSTOMERS: [&str; 2] = ["CustomersV3", "accounts"];

/// Which sample apps the demo runs between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AppsKind {
    /// Two SQLite databases, captured by triggers.
    Sqlite,
    /// Two OData services in this process (fno and Dataverse flavors): fno's data events come
    /// to the demo's ingress route, Dataverse's changes by change tracking.
    Odata,
}

#[derive(Args)]
pub struct DemoArgs {
    /// Customers loaded into fno before the job starts.
    #[arg(long, default_value_t = 10_000)]
    customers: usize,
    /// Sales orders loaded into fno before the job starts (5 lines each).
    #[arg(long, default_value_t = 2_000)]
    orders: usize,
    /// The sample apps: sqlite databases, or OData services in this process.
    #[arg(long, value_enum, default_value = "sqlite")]
    apps: AppsKind,
    /// After the demo, keep the runner up with the dashboard and the admin API on --admin-addr
    /// until Ctrl-C (local backend).
    #[arg(long)]
    serve: bool,
    /// Where --serve listens (loopback addresses only).
    #[arg(long, default_value = "127.0.0.1:7878")]
    admin_addr: SocketAddr,
    /// The admin API's bearer token with --serve. Without one, a random token is written to
    /// DATA_DIR/demo/admin-token.
    #[arg(long, env = "DUALSYNC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
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
    if args.apps == AppsKind::Odata && backend.backend != BackendKind::Local {
        bail!("--apps odata runs on the local backend only: its apps listen on this machine's loopback");
    }
    if args.serve {
        if backend.backend != BackendKind::Local {
            bail!("--serve runs on the local backend only: on AWS the demo's stage is deleted at its end");
        }
        crate::run::loopback("--admin-addr", args.admin_addr)?;
    }
    match args.apps {
        AppsKind::Sqlite => demo(&SqliteApps::create(&dir)?, &dir, backend, args, started).await,
        AppsKind::Odata => demo(&OdataApps::start().await?, &dir, backend, args, started).await,
    }
}

async fn demo(apps: &impl DemoApps, dir: &Path, backend: &BackendArgs, args: DemoArgs, started: Instant) -> Result<()> {
    let n = args.customers.max(20);
    println!("dualsync demo: fno-like and Dataverse-like {}", apps.describe());

    // 1. Two apps with data before the job exists.
    let pb = bar((n + args.orders) as u64, "loading fno");
    apps.load(Side::A, sample::fno_seed(n, args.orders, 5), &|i| pb.set_position(i as u64)).await?;
    pb.finish_with_message(format!("{n} customers, {} orders, {} lines", args.orders, args.orders * 5));
    apps.load(Side::B, sample::dataverse_seed(n, DV_ONLY), &|_| {}).await?;

    // 2. The job: examples/sales.yaml, pointed at the demo's apps.
    let mut def = parse_job("examples/sales.yaml", JOB_FILE)?;
    apps.point(&mut def);
    let rt = Pipeline::open(dir, backend, "demo").await?;
    println!("running on {}", rt.describe());
    let serve = args.serve.then(|| (args.admin_addr, args.admin_token.clone()));
    let result = scenario(&rt, apps, args, def, started).await;
    if let Pipeline::Local(local) = &rt {
        look_around(dir);
        if let Some((addr, token)) = serve {
            let token = crate::run::admin_token(token, dir, "admin-token", "DUALSYNC_ADMIN_TOKEN")?;
            if let Err(e) = &result {
                eprintln!("dualsync demo: {e:#}");
            }
            crate::run::serve(local, dir, addr, token, false, &format!("the demo's job '{JOB}' runs")).await?;
        }
    }
    rt.close().await?;
    result
}

/// Says how to look at what the demo did: its state is in its own data folder, not the
/// default one, so every command names it.
fn look_around(dir: &Path) {
    let d = dir.display().to_string();
    let d = if d.contains(char::is_whitespace) { format!("'{d}'") } else { d };
    println!();
    println!("The demo's state is in {d}. To look at what happened:");
    for command in [
        format!("job status {JOB}"),
        format!("errors list {JOB}"),
        format!("errors counts {JOB}"),
        format!("conflicts {JOB}"),
    ] {
        println!("  dualsync --data-dir {d} {command}");
    }
    println!(
        "Or run the demo with --serve: the runner then stays up with the dashboard on http://127.0.0.1:7878{}",
        dualsync_dashboard::PATH
    );
}

async fn scenario(rt: &Pipeline, apps: &impl DemoApps, args: DemoArgs, def: JobDef, started: Instant) -> Result<()> {
    let n = args.customers.max(20);
    rt.state().apply_job(def).await?;
    rt.start(JOB).await?;
    apps.connect(rt).await?;

    // 3. Initial sync, both ways.
    let total = (sample::GROUPS + n + args.orders * 6) as u64;
    let pb = bar(total, "initial sync");
    let report = rt
        .steps()
        .initial_sync(JOB, &SyncOptions::new(Side::A), |e| {
            if let SyncEvent::Page { map, done } = e {
                pb.set_message(format!("{map}: {done}"))
            }
        })
        .await?;
    pb.set_position(report.records as u64);
    let back = rt.steps().initial_sync(JOB, &SyncOptions::new(Side::B), |_| {}).await?;
    pb.finish_with_message(format!(
        "{} records fno → dataverse, {} records dataverse → fno",
        report.records, back.records
    ));
    // Change tracking reads from here on: a delete made before a map's first poll would not
    // show (a first poll lists what is there).
    rt.poll_tracking().await?;

    // 4. Edits made before the runner picks them up, so their outcome is certain:
    //    a conflict, an order whose customer and header are missing on the target, a delete.
    let conflict = 3usize;
    let update = |side: Side, i: usize, field: &'static str, value: Value| Edit::Update {
        table: CUSTOMERS[side.index()],
        key: sample::customer_key(side, i),
        set: vec![(field, value)],
    };
    apps.edit(Side::A, "fno-conflict", vec![update(Side::A, conflict, "Name", json!("Edited in fno"))]).await?;
    apps.edit(Side::B, "dv-conflict", vec![update(Side::B, conflict, "name", json!("Edited in dataverse"))]).await?;
    let (orphan_customer, orphan_order) = (account(900_001), order_number(900_001));
    apps.edit(
        Side::B,
        "dv-orphan-order",
        vec![
            Edit::Insert(Row::new(
                "salesorders",
                vec![
                    ("msdyn_company", json!("USMF")),
                    ("ordernumber", json!(orphan_order)),
                    ("msdyn_customeraccount", json!(orphan_customer)),
                    ("statuscode", json!(1)),
                ],
            )),
            Edit::Insert(Row::new(
                "salesorderdetails",
                vec![
                    ("msdyn_company", json!("USMF")),
                    ("msdyn_salesordernumber", json!(orphan_order)),
                    ("msdyn_linenumber", json!(1)),
                    ("msdyn_itemnumber", json!("ITEM-0001")),
                    ("quantity", json!(2.0)),
                    ("priceperunit", json!(9.5)),
                ],
            )),
        ],
    )
    .await?;
    let deleted = n + 7; // a Dataverse-born account with no orders
    let delete = Edit::Delete { table: CUSTOMERS[1], key: sample::customer_key(Side::B, deleted) };
    apps.edit(Side::B, "dv-delete", vec![delete]).await?;

    // 5. The runner, with edits on both sides at once.
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown);
    let pb = ProgressBar::new_spinner();
    pb.set_prefix("live edits");
    pb.enable_steady_tick(Duration::from_millis(100));
    let metrics = rt.metrics();
    let (fno_edits, dv_edits) = tokio::join!(edit_fno(apps, n, args.orders), edit_dataverse(apps, n));
    fno_edits?;
    dv_edits?;
    wait_idle(rt, apps, &pb, &metrics).await?;

    // 6. Mend the missing references: create the customer. The order waiting for it, and the
    //    line waiting for the order, go again by themselves once it syncs.
    let customer = sample::dataverse_account("USMF", &orphan_customer, "Late customer", "G01", 1000.0, 2);
    apps.edit(Side::B, "dv-mend", vec![Edit::Insert(customer)]).await?;
    wait_idle(rt, apps, &pb, &metrics).await?;
    // What is still open is retried, as an operator would (nothing, when all went well).
    let retry = ErrorFilter { category: Some(ErrorCategory::Application), ..Default::default() };
    let still_open =
        rt.state().error_counts(JOB, &ErrorFilter { status: Some(ErrorStatus::Open), ..retry.clone() }).await?;
    let retried = if still_open.total > 0 {
        let r = rt.retry(JOB, retry).await?;
        wait_idle(rt, apps, &pb, &metrics).await?;
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
    if let Some(capture) = apps.capture_report() {
        println!("{capture}");
    }
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
    let name = apps.field(Side::B, CUSTOMERS[1], &sample::customer_key(Side::B, conflict), "name").await?;
    if name != Some(json!("Edited in fno")) {
        failed.push("the conflict was not decided by the primary (fno)".into());
    }
    let missing: Vec<_> = rows.iter().filter(|(_, r)| r.message.starts_with("missing reference")).collect();
    if missing.len() < 2 || missing.iter().any(|(_, r)| r.status != ErrorStatus::Resolved) {
        failed.push(format!(
            "expected the orphan order's header and line as missing references, mended once the customer synced; saw {}",
            missing.len()
        ));
    }
    let gone = apps.field(Side::A, CUSTOMERS[0], &sample::customer_key(Side::A, deleted), "Name").await?.is_none();
    if !gone || m(&metrics.live_deletes) == 0 {
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

/// Waits until the pipeline has taken everything the apps changed and delivered it: the apps'
/// events are in, every tracked map was read after the last write, and no work is left.
async fn wait_idle(rt: &Pipeline, apps: &impl DemoApps, pb: &ProgressBar, m: &Metrics) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    apps.sent().await?;
    loop {
        // A write the pipeline makes during a round changes a tracked app again (an echo to
        // read): the round is the last when nothing was written in it.
        let (mark, written) = (Instant::now(), Metrics::get(&m.written));
        // Read before the queues: a poll done sends to capture before it counts as done.
        while !(rt.tracking_read_since(mark).await? && rt.is_idle().await?) {
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
        if Metrics::get(&m.written) == written {
            return Ok(());
        }
    }
}

/// fno: credit limits of 1,000 customers (transactions of 50) and 200 new orders of 5 lines.
async fn edit_fno(apps: &impl DemoApps, n: usize, orders: usize) -> Result<()> {
    // Customers 10.. (clear of the conflict customer), below the half that Dataverse edits.
    let edited: Vec<usize> = (10..(10 + 1000).min(n / 2)).collect();
    for (chunk, ids) in edited.chunks(50).enumerate() {
        let edits = ids
            .iter()
            .map(|&i| Edit::Update {
                table: CUSTOMERS[0],
                key: sample::customer_key(Side::A, i),
                // Above any seeded limit (at most 49,900): always a change.
                set: vec![("CreditLimit", json!(50_000.0 + i as f64))],
            })
            .collect();
        apps.edit(Side::A, &format!("fno-credit-{chunk}"), edits).await?;
    }
    for o in orders..orders + 200 {
        let mut edits = vec![Edit::Insert(sample::order_header(o, &account((o * 7) % (n / 2) * 2 + o % 2)))];
        edits.extend((1..=5i64).map(|l| Edit::Insert(sample::order_line(o, l, "ITEM-0042", l as f64, 12.5))));
        apps.edit(Side::A, &format!("fno-order-{o}"), edits).await?;
    }
    Ok(())
}

/// Dataverse: names of 1,000 other customers (one transaction each) and 100 new accounts.
async fn edit_dataverse(apps: &impl DemoApps, n: usize) -> Result<()> {
    for i in n / 2..(n / 2 + 1000).min(n) {
        let rename = Edit::Update {
            table: CUSTOMERS[1],
            key: sample::customer_key(Side::B, i),
            set: vec![("name", json!(format!("Customer {i} (renamed)")))],
        };
        apps.edit(Side::B, &format!("dv-name-{i}"), vec![rename]).await?;
    }
    for i in n + DV_ONLY..n + DV_ONLY + 100 {
        let account = sample::dataverse_account(company(i), &account(i), &format!("New account {i}"), "G02", 2500.0, 1);
        apps.edit(Side::B, &format!("dv-new-{i}"), vec![Edit::Insert(account)]).await?;
    }
    Ok(())
}
