//! The AWS adapters (DynamoDB, SQS) against the embedded ones: the same test bodies run on
//! `EmbeddedKv` / `EmbeddedQueue` and on `DynamoKv` / `SqsQueue` talking to moto server, so
//! that both backends keep the semantics of the ports. Every AWS test bootstraps a stage of
//! its own (a fresh uuid), so they run in parallel.
//!
//! The moto endpoint comes from `DUALSYNC_TEST_AWS_ENDPOINT`, which `./scripts/test` sets.
use std::sync::{Arc, Once};
use std::time::Duration;

use dualsync::adapters::aws::{self, DynamoKv, Names, SqsQueue, Usage};
use dualsync::adapters::embedded::{EmbeddedDb, QueueConfig};
use dualsync::ports::clock::{Clock, ManualClock, SystemClock};
use dualsync::ports::kv::{Expect, Item, KvError, KvStore, Put, SkRange};
use dualsync::ports::queue::{InMessage, OutMessage, Queue, QueueDepth, QueueError};
use serde_json::{json, Value};

// ---- set-up ------------------------------------------------------------------------------

const ENDPOINT_VAR: &str = "DUALSYNC_TEST_AWS_ENDPOINT";

/// The SDK configuration for moto. Fails (never skips) without an endpoint.
async fn moto() -> aws_config::SdkConfig {
    let endpoint = std::env::var(ENDPOINT_VAR).unwrap_or_else(|_| {
        panic!("{ENDPOINT_VAR} is not set: run these tests with ./scripts/test, which starts moto server")
    });
    static ENV: Once = Once::new();
    // Before any SDK configuration is loaded: moto takes any credentials.
    ENV.call_once(|| {
        for (name, value) in
            [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
        {
            if std::env::var_os(name).is_none() {
                std::env::set_var(name, value);
            }
        }
    });
    aws::sdk_config(Some(&endpoint)).await
}

async fn stage() -> (aws_config::SdkConfig, aws::Resources) {
    let sdk = moto().await;
    let names = Names::new(&format!("t{}", uuid::Uuid::new_v4().simple()));
    let resources = aws::bootstrap(&sdk, &names).await.expect("bootstrap");
    (sdk, resources)
}

/// Real time, so that TTL attributes are plausible; tests move it by hand.
fn clock() -> ManualClock {
    ManualClock::new(SystemClock.now_ms())
}

struct KvEnv {
    kv: Box<dyn KvStore>,
    clock: ManualClock,
    usage: Option<Arc<Usage>>,
}

async fn embedded_kv() -> KvEnv {
    let clock = clock();
    let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("open");
    KvEnv { kv: Box::new(db.kv()), clock, usage: None }
}

async fn dynamo_kv() -> KvEnv {
    let (sdk, resources) = stage().await;
    let clock = clock();
    let usage = Arc::new(Usage::default());
    let kv =
        DynamoKv::new(aws_sdk_dynamodb::Client::new(&sdk), resources.table, Arc::new(clock.clone()), usage.clone());
    KvEnv { kv: Box::new(kv), clock, usage: Some(usage) }
}

/// How time passes for a queue: the embedded one follows its clock, SQS real time.
enum Time {
    Manual(ManualClock),
    Real,
}

impl Time {
    async fn pass(&self, d: Duration) {
        match self {
            Time::Manual(clock) => clock.advance(i64::try_from(d.as_millis()).expect("short")),
            Time::Real => tokio::time::sleep(d).await,
        }
    }
}

struct QueueEnv {
    q: Box<dyn Queue>,
    dlq: Box<dyn Queue>,
    time: Time,
    usage: Option<Arc<Usage>>,
}

async fn embedded_queue(fifo: bool) -> QueueEnv {
    let clock = clock();
    let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("open");
    let (name, dlq_name) = if fifo { ("q.fifo", "q-dlq.fifo") } else { ("q", "q-dlq") };
    let mut config = QueueConfig::new(name, fifo);
    config.visibility_timeout = Duration::from_secs(180);
    config.max_receive_count = aws::MAX_RECEIVE_COUNT;
    config.dead_letter = Some(dlq_name.to_string());
    let q = db.queue(config);
    let mut dlq_config = QueueConfig::new(dlq_name, fifo);
    dlq_config.max_receive_count = 0;
    let dlq = db.queue(dlq_config);
    QueueEnv { q: Box::new(q), dlq: Box::new(dlq), time: Time::Manual(clock), usage: None }
}

/// `deliver.fifo` or `capture` of a fresh stage, with its dead-letter queue.
async fn sqs_queue(fifo: bool) -> QueueEnv {
    let (sdk, r) = stage().await;
    let client = aws_sdk_sqs::Client::new(&sdk);
    let usage = Arc::new(Usage::default());
    let urls = r.queue_urls();
    let (work, dead) = if fifo { (&urls[4], &urls[5]) } else { (&urls[0], &urls[1]) };
    let queue = |(name, url): &(String, String)| {
        SqsQueue::new(client.clone(), name.clone(), url.clone(), aws::MAX_RECEIVE_COUNT, usage.clone())
    };
    QueueEnv { q: Box::new(queue(work)), dlq: Box::new(queue(dead)), time: Time::Real, usage: Some(usage) }
}

/// Runs a test body on both backends.
macro_rules! both {
    ($body:ident, $embedded:expr, $aws:expr) => {
        mod $body {
            #[tokio::test]
            async fn embedded() {
                super::$body($embedded.await).await;
            }
            #[tokio::test]
            async fn aws() {
                super::$body($aws.await).await;
            }
        }
    };
}

// ---- key-value table ---------------------------------------------------------------------

fn put(pk: &str, sk: &str, body: Value, expect: Expect) -> Put {
    Put { pk: pk.into(), sk: sk.into(), body, expires_at: None, expect }
}

fn is_condition_failed<T: std::fmt::Debug>(r: &Result<T, KvError>) -> bool {
    matches!(r, Err(KvError::ConditionFailed { .. }))
}

fn sks(items: &[Item]) -> Vec<String> {
    items.iter().map(|i| i.sk.clone()).collect()
}

async fn conditional_puts_count_revisions(env: KvEnv) {
    let kv = env.kv;
    assert_eq!(kv.put(put("p", "s", json!(1), Expect::Absent)).await.expect("create"), 1);
    assert!(is_condition_failed(&kv.put(put("p", "s", json!(2), Expect::Absent)).await), "exists");
    assert_eq!(kv.put(put("p", "s", json!({"a": [1, "x"]}), Expect::Rev(1))).await.expect("rev 1"), 2);
    assert!(is_condition_failed(&kv.put(put("p", "s", json!(4), Expect::Rev(1))).await), "stale rev");
    assert_eq!(kv.put(put("p", "s", json!(5), Expect::Any)).await.expect("any"), 3);
    assert!(is_condition_failed(&kv.put(put("p", "other", json!(6), Expect::Rev(1))).await), "rev on missing");
    assert_eq!(kv.put(put("p", "new", json!(7), Expect::Any)).await.expect("any on missing"), 1);
    let item = kv.get("p", "s").await.expect("get").expect("present");
    assert_eq!(
        (item.pk.as_str(), item.sk.as_str(), item.rev, item.body, item.expires_at),
        ("p", "s", 3, json!(5), None)
    );
    assert_eq!(kv.get("p", "other").await.expect("get"), None, "failed puts wrote nothing");
    assert_eq!(kv.get("other", "s").await.expect("get"), None);
}
both!(conditional_puts_count_revisions, super::embedded_kv(), super::dynamo_kv());

async fn expired_items_read_as_absent(env: KvEnv) {
    let (kv, clock) = (env.kv, env.clock);
    let now = clock.now_ms();
    let mut p = put("p", "ttl", json!({"a": 1}), Expect::Absent);
    p.expires_at = Some(now + 1_500);
    assert_eq!(kv.put(p).await.expect("put"), 1);
    assert_eq!(kv.get("p", "ttl").await.expect("get").map(|i| i.expires_at), Some(Some(now + 1_500)));
    clock.advance(1_499);
    assert!(kv.get("p", "ttl").await.expect("get").is_some(), "live 1 ms before expiry");
    clock.advance(1);
    assert_eq!(kv.get("p", "ttl").await.expect("get"), None, "expires_at <= now reads absent");
    assert_eq!(kv.get_many(&[("p".into(), "ttl".into())]).await.expect("get_many"), vec![None]);
    assert!(kv.query("p", &SkRange::default(), 10, None).await.expect("query").items.is_empty(), "query skips it");
    assert!(is_condition_failed(&kv.put(put("p", "ttl", json!(0), Expect::Rev(1))).await), "expired is not live");
    // Absent holds on an expired item, and the revision keeps counting across the expiry.
    assert_eq!(kv.put(put("p", "ttl", json!(2), Expect::Absent)).await.expect("recreate"), 2);
    let item = kv.get("p", "ttl").await.expect("get").expect("present");
    assert_eq!((item.rev, item.body, item.expires_at), (2, json!(2), None), "the expiry is removed");
    clock.advance(10_000);
    assert!(kv.get("p", "ttl").await.expect("get").is_some(), "no expiry any more");
}
both!(expired_items_read_as_absent, super::embedded_kv(), super::dynamo_kv());

async fn get_many_answers_in_key_order(env: KvEnv) {
    let kv = env.kv;
    let puts = (0..130).map(|i| put("p", &format!("k{i:03}"), json!(i), Expect::Any)).collect();
    assert!(kv.put_many(puts).await.expect("put_many").iter().all(|r| r.is_ok()));
    let key = |sk: &str| ("p".to_string(), sk.to_string());
    let got = kv.get_many(&[key("k005"), key("missing"), key("k000"), key("k005")]).await.expect("get_many");
    let bodies: Vec<Option<Value>> = got.into_iter().map(|i| i.map(|i| i.body)).collect();
    assert_eq!(bodies, [Some(json!(5)), None, Some(json!(0)), Some(json!(5))], "order and duplicates kept");
    // More keys than one BatchGetItem takes, in reverse order.
    let keys: Vec<(String, String)> = (0..130).rev().map(|i| key(&format!("k{i:03}"))).collect();
    let got = kv.get_many(&keys).await.expect("get_many");
    let bodies: Vec<Value> = got.into_iter().map(|i| i.expect("present").body).collect();
    assert_eq!(bodies, (0..130).rev().map(|i| json!(i)).collect::<Vec<_>>());
    assert!(kv.get_many(&[]).await.expect("none").is_empty());
}
both!(get_many_answers_in_key_order, super::embedded_kv(), super::dynamo_kv());

async fn put_many_fails_only_failed_conditions(env: KvEnv) {
    let kv = env.kv;
    kv.put(put("p", "exists", json!(0), Expect::Any)).await.expect("put");
    let results = kv
        .put_many(vec![
            put("p", "new", json!(1), Expect::Absent),
            put("p", "exists", json!(2), Expect::Absent),
            put("p", "exists", json!(3), Expect::Rev(1)),
            put("p", "other", json!(4), Expect::Rev(7)),
            put("p", "any", json!(5), Expect::Any),
            // Later puts to a key of the batch see the earlier ones, in batch order.
            put("p", "new", json!(6), Expect::Rev(1)),
            put("p", "exists", json!(7), Expect::Rev(2)),
            put("p", "new", json!(8), Expect::Rev(1)),
        ])
        .await
        .expect("put_many");
    let summary: Vec<Result<u64, bool>> =
        results.iter().map(|r| r.as_ref().map(|rev| *rev).map_err(|_| is_condition_failed(r))).collect();
    assert_eq!(summary, [Ok(1), Err(true), Ok(2), Err(true), Ok(1), Ok(2), Ok(3), Err(true)]);
    assert_eq!(kv.get("p", "exists").await.expect("get").map(|i| i.body), Some(json!(7)));
    assert_eq!(kv.get("p", "new").await.expect("get").map(|i| (i.rev, i.body)), Some((2, json!(6))));
    assert_eq!(kv.get("p", "other").await.expect("get"), None);
}
both!(put_many_fails_only_failed_conditions, super::embedded_kv(), super::dynamo_kv());

async fn delete_honours_its_condition(env: KvEnv) {
    let (kv, clock) = (env.kv, env.clock);
    kv.put(put("p", "s", json!(1), Expect::Absent)).await.expect("put");
    assert!(is_condition_failed(&kv.delete("p", "s", Expect::Rev(2)).await));
    assert!(is_condition_failed(&kv.delete("p", "s", Expect::Absent).await));
    kv.delete("p", "s", Expect::Rev(1)).await.expect("delete rev 1");
    assert_eq!(kv.get("p", "s").await.expect("get"), None);
    kv.delete("p", "s", Expect::Any).await.expect("delete missing is fine");
    kv.delete("p", "s", Expect::Absent).await.expect("absent holds");
    assert!(is_condition_failed(&kv.delete("p", "s", Expect::Rev(1)).await));
    assert_eq!(kv.put(put("p", "s", json!(1), Expect::Absent)).await.expect("fresh"), 1, "a delete resets the rev");

    let mut p = put("p", "ttl", json!(1), Expect::Any);
    p.expires_at = Some(clock.now_ms());
    kv.put(p).await.expect("put expired");
    assert!(is_condition_failed(&kv.delete("p", "ttl", Expect::Rev(1)).await), "expired is not live");
    kv.delete("p", "ttl", Expect::Absent).await.expect("expired counts as absent");
    assert_eq!(kv.put(put("p", "ttl", json!(1), Expect::Absent)).await.expect("fresh"), 1, "the item is gone");
}
both!(delete_honours_its_condition, super::embedded_kv(), super::dynamo_kv());

async fn query_honours_prefix_from_to_and_after(env: KvEnv) {
    let (kv, clock) = (env.kv, env.clock);
    let keys = ["a", "a/1", "a/2", "a/3", "a/30", "a0", "ab", "b/1", "é/1"];
    let puts = keys.iter().map(|sk| put("p", sk, json!(sk), Expect::Any)).collect();
    kv.put_many(puts).await.expect("put_many");
    kv.put(put("other", "a/1", json!(0), Expect::Any)).await.expect("other partition");
    let mut gone = put("p", "a/25", json!(0), Expect::Any);
    gone.expires_at = Some(clock.now_ms() - 1);
    kv.put(gone).await.expect("expired item");

    let range = |prefix: &str, from: Option<&str>, to: Option<&str>| SkRange {
        prefix: prefix.into(),
        from: from.map(Into::into),
        to: to.map(Into::into),
    };
    let q = |r: SkRange, limit: usize, after: Option<&'static str>| {
        let kv = &kv;
        async move {
            let page = kv.query("p", &r, limit, after).await.expect("query");
            (sks(&page.items), page.next)
        }
    };
    let all = |v: &[&str]| (v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), None);
    assert_eq!(q(range("", None, None), 100, None).await, all(&keys));
    assert_eq!(q(range("a/", None, None), 100, None).await, all(&["a/1", "a/2", "a/3", "a/30"]));
    assert_eq!(q(range("a/", Some("a/2"), None), 100, None).await, all(&["a/2", "a/3", "a/30"]), "from inclusive");
    assert_eq!(q(range("a/", Some("0"), None), 100, None).await, all(&["a/1", "a/2", "a/3", "a/30"]), "from low");
    assert_eq!(q(range("a/", None, Some("a/3")), 100, None).await, all(&["a/1", "a/2"]), "to exclusive");
    assert_eq!(q(range("a/", None, Some("a/30")), 100, None).await, all(&["a/1", "a/2", "a/3"]));
    assert_eq!(q(range("a/", Some("a/2"), Some("a/3")), 100, None).await, all(&["a/2"]));
    assert_eq!(q(range("a/", None, None), 100, Some("a/2")).await, all(&["a/3", "a/30"]), "after exclusive");
    assert_eq!(q(range("a/", None, None), 100, Some("a/15")).await, all(&["a/2", "a/3", "a/30"]), "after any key");
    assert_eq!(q(range("a/", None, None), 100, Some("a")).await, all(&["a/1", "a/2", "a/3", "a/30"]), "after below");
    assert_eq!(q(range("a/", None, None), 100, Some("a0")).await, all(&[]), "after above");
    assert_eq!(q(range("", Some("a0"), Some("b/1")), 100, None).await, all(&["a0", "ab"]));
    assert_eq!(q(range("", None, Some("a/1")), 100, None).await, all(&["a"]));
    assert_eq!(q(range("é", None, None), 100, None).await, all(&["é/1"]), "UTF-8 prefix");
    assert_eq!(q(range("a/", Some("a/3"), Some("a/2")), 100, None).await, all(&[]), "from above to");
    assert_eq!(q(range("c", None, None), 100, None).await, all(&[]));
    // Paging: `next` only when more follows.
    assert_eq!(q(range("a/", None, None), 2, None).await, (vec!["a/1".into(), "a/2".into()], Some("a/2".into())));
    assert_eq!(q(range("a/", None, None), 2, Some("a/2")).await, all(&["a/3", "a/30"]), "last page, no next");
    assert_eq!(q(range("a/", None, None), 3, Some("a/1")).await, all(&["a/2", "a/3", "a/30"]));
    assert_eq!(q(range("a/", None, None), 0, None).await, (vec!["a/1".into()], Some("a/1".into())), "limit 0 as 1");
}
both!(query_honours_prefix_from_to_and_after, super::embedded_kv(), super::dynamo_kv());

async fn query_pages_through_250_items(env: KvEnv) {
    let kv = env.kv;
    let wanted: Vec<String> = (0..250).map(|i| format!("item/{i:04}")).collect();
    let mut puts: Vec<Put> =
        wanted.iter().map(|sk| put("p", sk, json!({"sk": sk, "pad": "x".repeat(300)}), Expect::Absent)).collect();
    puts.extend(["item", "item0", "iteM/1", "other/1"].map(|sk| put("p", sk, json!(0), Expect::Absent)));
    assert!(kv.put_many(puts).await.expect("put_many").iter().all(|r| r.is_ok()));
    let range = SkRange { prefix: "item/".into(), from: None, to: None };
    let mut got = Vec::new();
    let mut sizes = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = kv.query("p", &range, 100, after.as_deref()).await.expect("query");
        sizes.push(page.items.len());
        got.extend(sks(&page.items));
        if sizes.len() == 1 {
            // Writes meanwhile: one behind the cursor (not seen), one ahead (seen in order).
            for sk in ["item/0050/late", "item/0200/late"] {
                kv.put(put("p", sk, json!(0), Expect::Any)).await.expect("late write");
            }
        }
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), got.last(), "next is the last key returned");
                after = Some(next);
            }
            None => break,
        }
    }
    let mut want = wanted;
    want.insert(201, "item/0200/late".into());
    assert_eq!(sizes, [100, 100, 51]);
    assert_eq!(got, want, "every item once, in order");
}
both!(query_pages_through_250_items, super::embedded_kv(), super::dynamo_kv());

/// DynamoDB answers at most 1 MiB per Query call: a page of large items takes several calls.
async fn query_gathers_a_page_across_1_mib_answers(env: KvEnv) {
    let kv = env.kv;
    let puts = (0..5).map(|i| put("big", &i.to_string(), json!("x".repeat(300 * 1024)), Expect::Any)).collect();
    assert!(kv.put_many(puts).await.expect("put_many").iter().all(|r| r.is_ok()));
    let page = kv.query("big", &SkRange::default(), 10, None).await.expect("query");
    assert_eq!((sks(&page.items), page.next), (["0", "1", "2", "3", "4"].map(String::from).to_vec(), None));
    let page = kv.query("big", &SkRange::default(), 4, None).await.expect("query");
    assert_eq!((sks(&page.items), page.next.as_deref()), (["0", "1", "2", "3"].map(String::from).to_vec(), Some("3")));
    if let Some(usage) = env.usage {
        assert!(usage.snapshot().dynamo_requests >= 5 + 2 + 2, "more than one Query call per page");
    }
}
both!(query_gathers_a_page_across_1_mib_answers, super::embedded_kv(), super::dynamo_kv());

async fn usage_counts_units(env: KvEnv) {
    let Some(usage) = env.usage else { return };
    let kv = env.kv;
    // A body of a little under 3 KiB: with the key and the other attributes, three write units.
    kv.put(put("p", "big", json!("x".repeat(3 * 1024 - 100)), Expect::Any)).await.expect("put");
    let s = usage.snapshot();
    assert_eq!((s.dynamo_requests, s.dynamo_write_units, s.dynamo_read_units), (1, 3.0, 0.0));
    assert!(is_condition_failed(&kv.put(put("p", "small", json!(1), Expect::Rev(4))).await));
    assert_eq!(usage.snapshot().dynamo_write_units, 4.0, "a failed condition costs a unit too");
    usage.reset();
    kv.get("p", "big").await.expect("get");
    kv.get("p", "missing").await.expect("get");
    assert_eq!(usage.snapshot().dynamo_read_units, 2.0, "3 KiB is one 4 KiB read; absent still costs one");
    usage.reset();
    kv.get_many(&[("p".into(), "big".into()), ("p".into(), "missing".into())]).await.expect("get_many");
    assert_eq!((usage.snapshot().dynamo_requests, usage.snapshot().dynamo_read_units), (1, 2.0));
    usage.reset();
    kv.query("p", &SkRange::default(), 10, None).await.expect("query");
    assert_eq!((usage.snapshot().dynamo_requests, usage.snapshot().dynamo_read_units), (1, 1.0));
    assert_eq!((usage.snapshot().sqs_fifo_requests, usage.snapshot().sqs_standard_requests), (0, 0));
}
both!(usage_counts_units, super::embedded_kv(), super::dynamo_kv());

// ---- queues ------------------------------------------------------------------------------

fn bodies(msgs: &[InMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.body.clone()).collect()
}

/// Receives until `n` messages came or nothing more comes (a short poll may answer fewer
/// than are visible).
async fn receive_n(q: &dyn Queue, n: usize) -> Vec<InMessage> {
    let mut got = Vec::new();
    for _ in 0..20 {
        if got.len() >= n {
            break;
        }
        let batch = q.receive(n - got.len()).await.expect("receive");
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        got.extend(batch);
    }
    got
}

fn receipts(msgs: &[InMessage]) -> Vec<String> {
    msgs.iter().map(|m| m.receipt.clone()).collect()
}

async fn standard_send_receive_ack(env: QueueEnv) {
    let q = env.q;
    assert!(q.name().ends_with('q') || q.name().ends_with("capture"));
    assert_eq!(q.max_receive_count(), 5);
    let sent: Vec<String> = (0..25).map(|i| format!("m{i:02}")).collect();
    q.send(sent.iter().cloned().map(OutMessage::standard).collect()).await.expect("send in batches of ten");
    let got = receive_n(&*q, 25).await;
    let mut got_bodies = bodies(&got);
    got_bodies.sort();
    assert_eq!(got_bodies, sent);
    assert!(got.iter().all(|m| m.receive_count == 1 && m.group.is_none()));
    assert!(q.receive(10).await.expect("receive").is_empty(), "all in flight");
    q.ack(&receipts(&got)).await.expect("ack");
    env.time.pass(Duration::from_millis(1_100)).await;
    assert!(q.receive(10).await.expect("receive").is_empty(), "acknowledged");
    q.ack(&[]).await.expect("ack nothing");
    assert!(q.receive(0).await.expect("receive 0").is_empty());
}
both!(standard_send_receive_ack, super::embedded_queue(false), super::sqs_queue(false));

async fn too_large_is_refused(env: QueueEnv) {
    let q = env.q;
    let err = q.send(vec![OutMessage::standard("x".repeat(256 * 1024 + 1))]).await.expect_err("too large");
    assert!(matches!(err, QueueError::TooLarge { bytes: 262_145, .. }), "{err}");
    q.send(vec![OutMessage::standard("x".repeat(256 * 1024))]).await.expect("256 KiB fits");
}
both!(too_large_is_refused, super::embedded_queue(false), super::sqs_queue(false));

fn fifo(body: &str, group: &str, dedup: &str) -> OutMessage {
    OutMessage::fifo(body.into(), group.into(), dedup.into())
}

async fn fifo_keeps_group_order(env: QueueEnv) {
    let q = env.q;
    q.send(vec![fifo("a1", "A", "a1"), fifo("a2", "A", "a2"), fifo("b1", "B", "b1"), fifo("a3", "A", "a3")])
        .await
        .expect("send");
    let first = q.receive(1).await.expect("receive");
    assert_eq!(bodies(&first), ["a1"]);
    assert_eq!(first[0].group.as_deref(), Some("A"));
    // Group A is blocked while a1 is in flight.
    let second = receive_n(&*q, 1).await;
    assert_eq!(bodies(&second), ["b1"]);
    assert!(q.receive(10).await.expect("receive").is_empty(), "A blocked, B in flight");
    q.ack(&receipts(&first)).await.expect("ack");
    let rest = receive_n(&*q, 2).await;
    assert_eq!(bodies(&rest), ["a2", "a3"], "the rest of A in order");
}
both!(fifo_keeps_group_order, super::embedded_queue(true), super::sqs_queue(true));

async fn fifo_drops_duplicates(env: QueueEnv) {
    let q = env.q;
    q.send(vec![fifo("first", "G", "d1"), fifo("again", "G", "d1")]).await.expect("send");
    q.send(vec![fifo("later", "G", "d1"), fifo("other", "G", "d2")]).await.expect("send");
    let got = receive_n(&*q, 3).await;
    assert_eq!(bodies(&got), ["first", "other"], "a seen deduplication id drops the message");
    // Without a deduplication id nothing is dropped.
    q.ack(&receipts(&got)).await.expect("ack");
    let no_dedup = |body: &str| OutMessage { body: body.into(), group: Some("H".into()), dedup_id: None };
    q.send(vec![no_dedup("same"), no_dedup("same")]).await.expect("send");
    assert_eq!(bodies(&receive_n(&*q, 2).await), ["same", "same"]);
}
both!(fifo_drops_duplicates, super::embedded_queue(true), super::sqs_queue(true));

async fn release_delays_and_counts_receives(env: QueueEnv) {
    let q = env.q;
    q.send(vec![OutMessage::standard("m".into())]).await.expect("send");
    let got = receive_n(&*q, 1).await;
    assert_eq!(got.iter().map(|m| m.receive_count).collect::<Vec<_>>(), [1]);
    q.release(&got[0].receipt, Duration::from_millis(1_500)).await.expect("release");
    assert!(q.receive(10).await.expect("receive").is_empty(), "not before the delay");
    env.time.pass(Duration::from_millis(2_100)).await;
    let again = receive_n(&*q, 1).await;
    assert_eq!(bodies(&again), ["m"]);
    assert_eq!(again[0].receive_count, 2, "the receive count goes up");
    assert_eq!(again[0].id, got[0].id, "the same message");
    q.release(&again[0].receipt, Duration::ZERO).await.expect("release now");
    assert_eq!(receive_n(&*q, 1).await.iter().map(|m| m.receive_count).collect::<Vec<_>>(), [3]);
}
both!(release_delays_and_counts_receives, super::embedded_queue(false), super::sqs_queue(false));

async fn dead_letters_after_max_receives(env: QueueEnv) {
    let (q, dlq) = (env.q, env.dlq);
    q.send(vec![fifo("poison", "G", "p1"), fifo("next", "G", "n1")]).await.expect("send");
    for count in 1..=5 {
        let got = receive_n(&*q, 1).await;
        assert_eq!(got.first().map(|m| (m.body.as_str(), m.receive_count)), Some(("poison", count)));
        q.release(&got[0].receipt, Duration::ZERO).await.expect("release");
    }
    // The sixth receive moves it to the dead-letter queue and hands out the next of the group.
    let got = receive_n(&*q, 1).await;
    assert_eq!(bodies(&got), ["next"]);
    let dead = receive_n(&*dlq, 1).await;
    assert_eq!(bodies(&dead), ["poison"]);
}
both!(dead_letters_after_max_receives, super::embedded_queue(true), super::sqs_queue(true));

async fn depth_counts_visible_and_in_flight(env: QueueEnv) {
    let (q, dlq) = (env.q, env.dlq);
    let depth = |visible, in_flight| QueueDepth { visible, in_flight };
    assert_eq!(q.depth().await.expect("depth"), depth(0, 0));
    q.send(["m1", "m2", "m3"].map(|b| OutMessage::standard(b.into())).to_vec()).await.expect("send");
    assert_eq!(q.depth().await.expect("depth"), depth(3, 0));
    let got = receive_n(&*q, 2).await;
    assert_eq!(q.depth().await.expect("depth"), depth(1, 2), "received and not deleted");
    q.ack(&receipts(&got[..1])).await.expect("ack");
    q.release(&got[1].receipt, Duration::from_millis(1_500)).await.expect("release");
    assert_eq!(q.depth().await.expect("depth"), depth(1, 1), "released with a delay: still in flight");
    env.time.pass(Duration::from_millis(2_100)).await;
    assert_eq!(q.depth().await.expect("depth"), depth(2, 0), "its delay passed");
    assert!(dlq.depth().await.expect("depth").is_empty());
}
both!(depth_counts_visible_and_in_flight, super::embedded_queue(false), super::sqs_queue(false));

async fn sqs_usage_counts_billed_requests(env: QueueEnv) {
    let Some(usage) = env.usage else { return };
    let q = env.q;
    q.send((0..12).map(|i| OutMessage::standard(format!("{i}"))).collect()).await.expect("send");
    assert_eq!(usage.snapshot().sqs_standard_requests, 2, "two batches");
    q.send(vec![OutMessage::standard("x".repeat(100 * 1024))]).await.expect("send");
    assert_eq!(usage.snapshot().sqs_standard_requests, 4, "100 KiB is two 64 KiB chunks");
    assert_eq!(usage.snapshot().sqs_fifo_requests, 0);
    assert_eq!(usage.snapshot().dynamo_requests, 0);
}
both!(sqs_usage_counts_billed_requests, super::embedded_queue(false), super::sqs_queue(false));

/// Looking up a stage that was never bootstrapped names what is missing and how to create it.
#[tokio::test]
async fn lookup_names_the_missing_resource() {
    let sdk = moto().await;
    let names = Names::new(&format!("missing{}", uuid::Uuid::new_v4().simple()));
    let err = aws::Resources::lookup(&sdk, &names).await.expect_err("nothing there").to_string();
    assert!(
        err.contains(&names.table()) && err.contains("sam deploy") && err.contains("dualsync aws bootstrap"),
        "{err}"
    );
}

/// Bootstrap twice is fine; lookup then finds the same resources; delete removes them.
#[tokio::test]
async fn bootstrap_is_idempotent_and_lookup_finds_it() {
    let sdk = moto().await;
    let names = Names::new(&format!("t{}", uuid::Uuid::new_v4().simple()));
    let first = aws::bootstrap(&sdk, &names).await.expect("bootstrap");
    let second = aws::bootstrap(&sdk, &names).await.expect("bootstrap again");
    let found = aws::Resources::lookup(&sdk, &names).await.expect("lookup");
    assert_eq!(first.queue_urls(), second.queue_urls());
    assert_eq!(first.queue_urls(), found.queue_urls());
    assert_eq!(found.table, names.table());
    let names_of: Vec<String> = found.queue_urls().into_iter().map(|(name, _)| name).collect();
    assert_eq!(names_of[2], names.sequence_queue());
    assert_eq!(names_of[7], names.dead_letter_queue(&names.reconcile_queue()));
    found.delete(&sdk).await.expect("delete");
    assert!(aws::Resources::lookup(&sdk, &names).await.is_err(), "gone");
}
