//! `dualsync bench --apps odata --initial-sync`: an initial sync of N customers from the
//! fno-like OData sample service to the Dataverse-like one, both answering 20 ms late and the
//! target under Dataverse's service protection (see `bench_odata`), through the same pool of
//! page tasks as `dualsync initial-sync`, with the target's `batch_size` at 1,000 (see
//! `BATCH_SIZE`). Prints the summary table, elapsed, records/s, the
//! HTTP requests and 429s of both services, Dataverse's busiest window and peak memory; then
//! checks that the target holds every record with the source's values, and fails if not or if
//! any record has an error row.
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use dualsync::domain::config::parse_job;
use dualsync::domain::job::Side;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::initial_sync::{Counts, SyncOptions, DEFAULT_PAGES_IN_FLIGHT};
use odata_sample::Protection;

use crate::bench::peak_rss_mib;
use crate::bench_odata::{arrived, customer, job_yaml, services, traffic_line, DATAVERSE_CONCURRENCY, LATENCY};
use crate::sample_apps::{account, company};

/// The target's `batch_size` unless told: a large initial sync into Dataverse is bounded by its
/// 6,000 requests per 5 minutes, and the README advises the largest batch for it.
const BATCH_SIZE: usize = dualsync::domain::job::OdataSpec::MAX_BATCH_SIZE;

pub async fn run(
    data_dir: &Path,
    n: usize,
    page_size: usize,
    pages_in_flight: Option<usize>,
    batch_size: Option<usize>,
) -> Result<()> {
    let batch_size = batch_size.unwrap_or(BATCH_SIZE);
    let dir = data_dir.join("bench-odata-initial-sync");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let (fno, dataverse) = services().await;
    // Made in the service directly: the bench times the sync, not the making of its source.
    for i in 0..n {
        fno.put("CustomersV3", customer(i));
    }

    let rt = Arc::new(LocalRuntime::open(&dir)?);
    rt.apply(parse_job("bench job", &job_yaml(&fno.url, &dataverse.url, Some(batch_size)))?).await?;
    rt.start("bench").await?;
    let opts = SyncOptions {
        pages_in_flight: pages_in_flight.unwrap_or(DEFAULT_PAGES_IN_FLIGHT).max(1),
        ..SyncOptions::new(Side::A).page_size(page_size)
    };
    println!(
        "dualsync bench --apps odata --initial-sync: {n} customers from fno to dataverse, pages of {}, {} in flight, \
         $batch of {batch_size} to the target; both services {} ms per request, Dataverse at most {DATAVERSE_CONCURRENCY} in flight, \
         {} requests and {} s of execution per {} s",
        opts.page_size,
        opts.pages_in_flight,
        LATENCY.as_millis(),
        Protection::DATAVERSE.requests,
        Protection::DATAVERSE.execution.as_secs(),
        Protection::DATAVERSE.window.as_secs(),
    );
    let started = Instant::now();
    let report = rt.steps.initial_sync("bench", &opts, |_| {}).await?;
    let elapsed = started.elapsed();
    let mut total = Counts::default();
    report.maps.iter().for_each(|m| total.add(&m.total()));
    let (src, dst) = (fno.traffic(), dataverse.traffic());

    print!("{}", report.table());
    println!("records            {n} ({} created)", total.created);
    println!("elapsed            {:.1} s", elapsed.as_secs_f64());
    println!("records/s          {:.0}", n as f64 / elapsed.as_secs_f64());
    println!("{}", traffic_line("fno requests", &src));
    println!("{}", traffic_line("dataverse requests", &dst));
    println!(
        "429s               {} (fno {}, dataverse {})",
        src.throttled + dst.throttled,
        src.throttled,
        dst.throttled
    );
    let (busiest, execution) = dataverse.busiest(Protection::DATAVERSE.window);
    println!(
        "dataverse window   busiest {} s: {busiest} requests, {:.1} s of execution",
        Protection::DATAVERSE.window.as_secs(),
        execution.as_secs_f64()
    );
    println!("peak memory        {:.1} MiB", peak_rss_mib().unwrap_or(f64::NAN));

    if report.system_errors > 0 || total.errors_total() > 0 {
        bail!(
            "{} records did not sync ({} system failures): `dualsync --data-dir {} errors list bench` says why",
            total.errors_total(),
            report.system_errors,
            dir.display()
        );
    }
    let missing: Vec<usize> = (0..n).filter(|i| !arrived(&dataverse, *i)).collect();
    if !missing.is_empty() {
        let first: Vec<String> = missing.iter().take(5).map(|i| format!("{}/{}", company(*i), account(*i))).collect();
        bail!("the target does not hold {} records as written (first: {})", missing.len(), first.join(", "));
    }
    println!("verified           all {n} records in the target with their values, no failed record");
    Ok(())
}
