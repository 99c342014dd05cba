//! `dualsync bench --apps odata`: the embedded pipeline between two OData sample services on
//! loopback, each answering 20 ms late (a WAN round trip) and the target holding Dataverse's
//! service protection (52 requests in flight; 6,000 requests and 1,200 s of execution per
//! 5-minute window). N customers are created in the fno-like source
//! as its users would, `tx_size` to a transaction, and the source tells of them as an app does,
//! through the ingress handler (what `POST /ingress/bench/fno/{source}` runs) into capture: the
//! project's notification, one per transaction, or fno business events, one per record, posted
//! in lists of `tx_size`. The pipeline reads each record fresh from the source
//! (`$filter` queries over many keys in one `$batch`) and writes the Dataverse-like target
//! (`$batch`). Prints records/s end to end, HTTP requests per record on both services (a
//! `$batch` counting as one request, its parts shown beside), 429s, p50/p99 latency from the
//! user's change to its delivery; then checks that the target holds every record with the
//! values written to the source, and fails if not.
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualsync::domain::config::parse_job;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::ingress::Request;
use dualsync::steps::Metrics;
use odata_sample::{Kind, Options, Protection, Server, Traffic};

use crate::bench::{peak_rss_mib, percentile};
use crate::sample_apps::{account, company};

/// Added to every request on both services.
pub(crate) const LATENCY: Duration = Duration::from_millis(20);
/// Dataverse's service protection: concurrent requests per user.
pub(crate) const DATAVERSE_CONCURRENCY: usize = 52;
/// The header fno's business events are posted with, and the key's (in-process) variable.
const KEY_HEADER: &str = "x-bench-key";
const KEY_ENV: &str = "BENCH_EVENTS_KEY";
/// The bench stops when no record has arrived for this long: longer than Dataverse's window,
/// whose Retry-After can hold every request back for most of it.
const STALL: Duration = Duration::from_secs(360);

pub(crate) fn job_yaml(fno: &str, dataverse: &str, batch_size: Option<usize>) -> String {
    let batch_size = batch_size.map(|n| format!("\n    batch_size: {n}")).unwrap_or_default();
    format!(
        "job: bench
apps:
  - name: fno
    connector: odata
    url: '{fno}'
    flavor: fno
    auth: {{ kind: none }}
    ingress: {{ auth: {{ kind: http_header, name: {KEY_HEADER}, key_env: {KEY_ENV} }} }}
  - name: dataverse
    connector: odata
    url: '{dataverse}'
    flavor: dataverse
    auth: {{ kind: none }}{batch_size}
primary: fno
companies: [USMF, DEMF]
table_groups:
  - name: customers
    maps:
      - name: customers
        sequence: 1
        entities: {{ fno: CustomersV3, dataverse: accounts }}
        event_names: {{ fno: [CustomerChangedBusinessEvent] }}
        company: {{ fno: dataAreaId, dataverse: msdyn_company }}
        keys:
          - {{ fno: dataAreaId, dataverse: msdyn_company }}
          - {{ fno: CustomerAccount, dataverse: accountnumber }}
        fields:
          - {{ fno: OrganizationName, dataverse: name }}
          - {{ fno: CreditLimit, dataverse: creditlimit }}
          - {{ fno: CustomerGroupId, dataverse: msdyn_customergroupid }}
"
    )
}

/// Customer `i` as an fno user creates it.
pub(crate) fn customer(i: usize) -> Value {
    json!({
        "dataAreaId": company(i),
        "CustomerAccount": account(i),
        "OrganizationName": format!("Customer {i}"),
        "CreditLimit": (i % 500) * 100,
        "CustomerGroupId": format!("G{:02}", i % 10),
    })
}

/// fno's business event for customer `i` created at `now_ms`.
fn business_event(i: usize, now_ms: i64) -> Value {
    json!({
        "BusinessEventId": "CustomerChangedBusinessEvent",
        "BusinessEventLegalEntity": company(i),
        "ControlNumber": 5_637_144_576u64 + i as u64,
        "EventId": format!("bench-{i}"),
        "EventTime": format!("/Date({now_ms})/"),
        "InitiatingUserAADObjectId": "b2c9a3e1-0000-4000-8000-000000000001",
        "CustomerAccount": account(i),
    })
}

/// Whether the target's record of customer `i` holds what the source's does.
pub(crate) fn arrived(target: &Server, i: usize) -> bool {
    let Some(got) = target.get("accounts", &[json!(company(i)), json!(account(i))]) else { return false };
    let want = customer(i);
    let text = |v: Option<&String>| v.and_then(|raw| serde_json::from_str::<Value>(raw).ok());
    let number = |v: Option<Value>| v.and_then(|v| v.as_f64());
    text(got.get("name")) == Some(want["OrganizationName"].clone())
        && text(got.get("msdyn_customergroupid")) == Some(want["CustomerGroupId"].clone())
        && number(text(got.get("creditlimit"))) == want["CreditLimit"].as_f64()
}

/// The project's notification of one source transaction creating customers `ids`.
fn notification(txid: usize, ids: std::ops::Range<usize>, now_ms: i64) -> Value {
    let changes: Vec<Value> = ids
        .map(|i| {
            json!({"app": "fno", "entity": "CustomersV3", "key": [company(i), account(i)], "op": "upsert",
                "seq": i, "company": company(i), "at_ms": now_ms})
        })
        .collect();
    json!({"job": "bench", "app": "fno", "txid": format!("bench-{txid}"), "changes": changes})
}

/// How the source tells dualsync of its changes.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Events {
    /// fno business events, one per record (its own transaction), posted in lists.
    Fno,
    /// The project's JSON notification, one per source transaction.
    Notification,
}

pub async fn run(
    data_dir: &Path,
    n: usize,
    tx_size: usize,
    workers: usize,
    events: Events,
    batch_size: Option<usize>,
) -> Result<()> {
    let dir = data_dir.join("bench-odata");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let (fno, dataverse) = services().await;

    let mut rt = LocalRuntime::open(&dir)?;
    rt.deliver_workers = workers.max(1);
    let rt = Arc::new(rt);
    rt.apply(parse_job("bench job", &job_yaml(&fno.url, &dataverse.url, batch_size))?).await?;
    rt.start("bench").await?;
    let metrics = rt.steps.metrics.clone();
    metrics.keep_latencies();
    let key = uuid::Uuid::new_v4().simple().to_string();
    let events_key = key.clone();
    let ingress = rt.ingress().with_env(Arc::new(move |k: &str| (k == KEY_ENV).then(|| events_key.clone())));

    let tx_size = tx_size.max(1);
    let told = match events {
        Events::Fno => format!("fno business events in lists of {tx_size}"),
        Events::Notification => format!("a notification per transaction of {tx_size}"),
    };
    println!(
        "dualsync bench --apps odata: {n} records, {told}, {} deliver workers, $batch of {} to the target; \
         both services {} ms per request, Dataverse at most {DATAVERSE_CONCURRENCY} in flight, \
         {} requests and {} s of execution per {} s",
        rt.deliver_workers,
        batch_size.unwrap_or(dualsync::domain::job::OdataSpec::DEFAULT_BATCH_SIZE),
        LATENCY.as_millis(),
        Protection::DATAVERSE.requests,
        Protection::DATAVERSE.execution.as_secs(),
        Protection::DATAVERSE.window.as_secs(),
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown);
    let started = Instant::now();
    for start in (0..n).step_by(tx_size) {
        let now_ms = rt.state.now_ms();
        let ids = start..(start + tx_size).min(n);
        for i in ids.clone() {
            fno.put("CustomersV3", customer(i));
        }
        let (source, body) = match events {
            Events::Fno => ("fno", Value::Array(ids.map(|i| business_event(i, now_ms)).collect())),
            Events::Notification => ("notification", notification(start, ids, now_ms)),
        };
        let req = Request {
            job: "bench".into(),
            app: "fno".into(),
            source: source.into(),
            headers: vec![(KEY_HEADER.into(), key.clone())],
            query: vec![],
            body: body.to_string().into_bytes(),
        };
        let answer = ingress.handle(&req).await;
        if answer.status != 200 {
            bail!("ingress refused the {source} events of records {start}..: {} {}", answer.status, answer.body);
        }
    }
    let produced = started.elapsed();
    let (mut last, mut last_change) = (0, Instant::now());
    while Metrics::get(&metrics.written) < n as u64 {
        let now = Metrics::get(&metrics.written);
        if now != last {
            (last, last_change) = (now, Instant::now());
        } else if last_change.elapsed() > STALL {
            bail!(
                "only {now} of {n} records delivered, none for {} s (`dualsync --data-dir {} errors list bench` says why)",
                STALL.as_secs(),
                dir.display()
            );
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
    let (src, dst) = (fno.traffic(), dataverse.traffic());
    let requests = src.requests + dst.requests;
    let per_record = requests as f64 / n.max(1) as f64;

    println!("records            {n}");
    println!("events posted      {:.2} s", produced.as_secs_f64());
    println!("all delivered      {:.2} s", elapsed.as_secs_f64());
    println!("records/s          {:.0}", n as f64 / elapsed.as_secs_f64());
    println!("latency p50        {} ms", percentile(&lat, 0.50));
    println!("latency p99        {} ms", percentile(&lat, 0.99));
    println!("{}", traffic_line("fno requests", &src));
    println!("{}", traffic_line("dataverse requests", &dst));
    println!("requests/record    {per_record:.4} (one per {:.0} records)", 1.0 / per_record.max(f64::MIN_POSITIVE));
    println!(
        "429s               {} (fno {}, dataverse {})",
        src.throttled + dst.throttled,
        src.throttled,
        dst.throttled
    );
    println!(
        "most in flight     fno {}, dataverse {}",
        fno.shared.most_in_flight.load(std::sync::atomic::Ordering::SeqCst),
        dataverse.shared.most_in_flight.load(std::sync::atomic::Ordering::SeqCst)
    );
    let (busiest, execution) = dataverse.busiest(Protection::DATAVERSE.window);
    println!(
        "dataverse window   busiest {} s: {busiest} requests, {:.1} s of execution; all run: {:.1} s of execution",
        Protection::DATAVERSE.window.as_secs(),
        execution.as_secs_f64(),
        dst.execution.as_secs_f64()
    );
    println!("peak memory        {:.1} MiB", peak_rss_mib().unwrap_or(f64::NAN));

    let missing: Vec<usize> = (0..n).filter(|i| !arrived(&dataverse, *i)).collect();
    let extra = dataverse.count("accounts").saturating_sub(n);
    if !missing.is_empty() || extra > 0 {
        let first: Vec<String> = missing.iter().take(5).map(|i| format!("{}/{}", company(*i), account(*i))).collect();
        bail!(
            "the target does not hold every record as written: {} missing or different (first: {}), {extra} extra",
            missing.len(),
            first.join(", ")
        );
    }
    println!("verified           all {n} records in the target with their values");
    Ok(())
}

/// The fno-like source and the Dataverse-like target, both `LATENCY` late, the target under
/// Dataverse's service protection.
pub(crate) async fn services() -> (Server, Server) {
    let fno = Server::start(Kind::Fno, Options { latency: LATENCY, ..Options::default() }).await;
    fno.add_set("CustomersV3", &["dataAreaId", "CustomerAccount"], None);
    let dataverse = Server::start(
        Kind::Dataverse,
        Options {
            latency: LATENCY,
            max_concurrent: DATAVERSE_CONCURRENCY,
            protection: Some(Protection::DATAVERSE),
            ..Options::default()
        },
    )
    .await;
    dataverse.add_set("accounts", &["msdyn_company", "accountnumber"], Some("accountid"));
    (fno, dataverse)
}

pub(crate) fn traffic_line(name: &str, t: &Traffic) -> String {
    format!("{name:<19}{} ({} $batch carrying {} requests)", t.requests, t.batches, t.batch_parts)
}
