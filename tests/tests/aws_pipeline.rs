//! The pipeline on a real SQS and DynamoDB wire protocol (moto server, started by
//! `./scripts/test`): the four Lambda handlers, polled as their SQS event sources would, on a
//! fresh stage's table and queues. Convergence, parent before child, a poison message reaching
//! the dead-letter queue with its row, the partial batch response of deliver, and duplicates.
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create_apps, emulator, exec, query, Control, FaultyRegistry, Writes};
use dualsync::adapters::aws::{bootstrap, Names, Resources, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::domain::errors::ErrorCategory;
use dualsync::ports::{OutMessage, Queue};
use dualsync::runtime::verify::compare;
use dualsync::state::ErrorFilter;
use dualsync::steps::reconcile::ReconcileMessage;
use dualsync::steps::{Backoff, Metrics};
use dualsync_lambda::poller::sqs_event;
use dualsync_lambda::stack::{Stack, LAMBDA_BATCH};

struct H {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    sdk: aws_config::SdkConfig,
    names: Names,
    resources: Resources,
    stack: Arc<Stack>,
    /// Side B's connector faults.
    b_writes: Control,
}

async fn harness() -> H {
    harness_with(|_| {}).await
}

/// The harness, with rows written into app A (at the path given) before the job starts.
async fn harness_with(before: impl FnOnce(&std::path::Path)) -> H {
    let sdk = emulator().await;
    let names = Names::new(&format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    let resources = bootstrap(&sdk, &names).await.expect("bootstrap");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let def = create_apps(&a, &b);
    before(&a);
    let (apps, [_, b_writes]) = FaultyRegistry::fresh();
    let stack =
        Arc::new(Stack::with_apps(&sdk, &resources, Arc::new(Usage::default()), apps).with_backoff(Backoff::QUICK));
    stack.state().apply_job(def).await.unwrap();
    stack.start("j").await.unwrap();
    H { _dir: dir, a, b, sdk, names, resources, stack, b_writes }
}

impl H {
    fn queue(&self, url: &str, name: String) -> SqsQueue {
        SqsQueue::new(
            aws_sdk_sqs::Client::new(&self.sdk),
            name,
            url.to_string(),
            MAX_RECEIVE_COUNT,
            Arc::new(Usage::default()),
        )
    }

    /// Ingress and every function until the stack is idle.
    async fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let moved = self.stack.pump_feeds(1000).await.unwrap();
            let handled = self.stack.poll_round().await.unwrap().len();
            if moved + handled == 0 {
                if self.stack.is_idle().await.unwrap() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(Instant::now() < deadline, "the stack did not drain in two minutes");
        }
    }

    async fn assert_converged(&self) {
        let lj = self.stack.steps().load_job("j").await.unwrap().unwrap();
        for c in compare(&lj).await.unwrap() {
            assert!(
                c.all_in_step(),
                "{}: {} differ, only in a {:?}, only in b {:?}",
                c.map,
                c.differ.len(),
                c.only[0],
                c.only[1]
            );
        }
    }

    /// Seq of the first change-log row of an entity whose key mentions `key`, in app `b`.
    fn first_write(&self, entity: &str, key: &str) -> i64 {
        query(
            &self.b,
            &format!("SELECT min(seq) FROM _dualsync_changes WHERE entity = '{entity}' AND key LIKE '%{key}%'"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_with_parents_before_children() {
    let h = harness().await;
    // Children listed before their parent in the app's own transaction.
    exec(
        &h.a,
        "INSERT INTO children (pid, cno, label) VALUES ('p1', 1, 'one'), ('p1', 2, 'two');
         INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'first', 'X', 'small');
         INSERT INTO parents (pid, name, co, kind) VALUES ('p2', 'second', 'X', 'large');",
    );
    exec(&h.b, "INSERT INTO owners (owner_id, title, company, kind_code) VALUES ('p3', 'third', 'X', 1); INSERT INTO items (owner_id, item_no, caption) VALUES ('p3', 1, 'x');");
    h.drain().await;
    h.assert_converged().await;
    assert_eq!(query(&h.b, "SELECT count(*) FROM items"), 3);
    assert_eq!(query(&h.a, "SELECT count(*) FROM children WHERE pid = 'p3'"), 1);
    assert!(h.first_write("owners", "p1") < h.first_write("items", "p1"), "parent p1 was written after its child");
    // An edit on each side flows across.
    exec(&h.a, "UPDATE parents SET name = 'renamed' WHERE pid = 'p2'");
    exec(&h.b, "UPDATE items SET caption = 'changed' WHERE owner_id = 'p1' AND item_no = 2");
    h.drain().await;
    h.assert_converged().await;
    assert_eq!(query(&h.b, "SELECT count(*) FROM owners WHERE title = 'renamed'"), 1);
    assert_eq!(query(&h.a, "SELECT count(*) FROM children WHERE label = 'changed'"), 1);
    let errors = h.stack.state().error_rows("j", &ErrorFilter::default()).await.unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_reaches_the_dead_letter_queue_with_its_row() {
    let h = harness().await;
    let capture = h.queue(&h.resources.capture_url, h.names.capture_queue());
    capture.send(vec![OutMessage::standard("{not json".into())]).await.unwrap();
    h.drain().await;
    let dlq = h.queue(&h.resources.dead_letter_urls[0], h.names.dead_letter_queue(&h.names.capture_queue()));
    let dead = dlq.receive(10).await.unwrap();
    assert_eq!(dead.len(), 1, "the message is in the capture dead-letter queue");
    assert_eq!(dead[0].body, "{not json");
    let rows = h.stack.state().dead_letters(&h.names.capture_queue()).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert!(rows[0].reason.starts_with("malformed change notification"), "{}", rows[0].reason);
    assert_eq!(rows[0].receive_count, MAX_RECEIVE_COUNT);
    assert_eq!(rows[0].body, "{not json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_fails_a_group_from_its_first_failure_and_other_groups_go_on() {
    let h = harness().await;
    exec(&h.a, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'v1', 'X', 'small')");
    exec(&h.a, "UPDATE parents SET name = 'v2' WHERE pid = 'p1'");
    exec(&h.b, "INSERT INTO owners (owner_id, title, company, kind_code) VALUES ('q1', 'from b', 'X', 2)");
    // Capture and sequence only: three delivery messages wait, two in p1's group.
    h.stack.pump_feeds(1000).await.unwrap();
    for h_ in &h.stack.handlers[..2] {
        while dualsync_lambda::poller::poll_once(h_, LAMBDA_BATCH).await.unwrap().is_some() {}
    }
    h.b_writes.set(Writes::Fail);
    let deliver = &h.stack.handlers[2];
    let msgs = deliver.input().receive(10).await.unwrap();
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    let response = deliver.handle("test", sqs_event(&msgs)).await.unwrap();
    let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    let group_of = |id: &str| msgs.iter().find(|m| m.id == id).and_then(|m| m.group.clone());
    let p1_group = group_of(failed.first().expect("a failure"));
    let in_p1: Vec<&str> = msgs.iter().filter(|m| m.group == p1_group).map(|m| m.id.as_str()).collect();
    assert_eq!(failed, in_p1, "the failing group and only it is reported, from its first message on");
    assert_eq!(in_p1.len(), 2);
    assert_eq!(query(&h.a, "SELECT count(*) FROM parents WHERE pid = 'q1'"), 1, "the other group went on");
    // The failed messages come back after their backoff, not at once.
    let done: Vec<String> =
        msgs.iter().filter(|m| !failed.contains(&m.id.as_str())).map(|m| m.receipt.clone()).collect();
    deliver.input().ack(&done).await.unwrap();
    assert!(deliver.input().receive(10).await.unwrap().is_empty(), "the group is held back by its backoff");
    // Once the app is back, the group delivers in order.
    h.b_writes.set(Writes::Work);
    h.drain().await;
    h.assert_converged().await;
    assert_eq!(query(&h.b, "SELECT count(*) FROM owners WHERE owner_id = 'p1' AND title = 'v2'"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_failure_past_its_retries_is_an_error_row_not_a_loss() {
    let h = harness().await;
    h.b_writes.set(Writes::Fail);
    exec(&h.a, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'v1', 'X', 'small')");
    h.drain().await;
    let rows = h.stack.state().error_rows("j", &ErrorFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let e = &rows[0].1;
    assert_eq!((e.category, e.retriable, e.key.display().as_str()), (ErrorCategory::System, true, "p1"));
    assert!(e.message.contains("503"), "{}", e.message);
    let dlq = h.queue(&h.resources.dead_letter_urls[2], h.names.dead_letter_queue(&h.names.deliver_queue()));
    assert!(dlq.depth().await.unwrap().is_empty(), "recorded, so not dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_deliveries_change_nothing() {
    let h = harness().await;
    exec(&h.a, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'v1', 'X', 'small'); INSERT INTO children (pid, cno, label) VALUES ('p1', 1, 'c');");
    exec(&h.b, "INSERT INTO owners (owner_id, title, company, kind_code) VALUES ('q1', 'from b', 'X', 2)");
    h.stack.pump_feeds(1000).await.unwrap();
    // Every capture and delivery message arrives twice (another id, so FIFO deduplication
    // does not catch it: SQS delivers at least once).
    let capture = &h.stack.handlers[0];
    let first = capture.input().receive(10).await.unwrap();
    capture.input().send(first.iter().map(|m| OutMessage::standard(m.body.clone())).collect()).await.unwrap();
    for m in &first {
        capture.input().release(&m.receipt, Duration::ZERO).await.unwrap();
    }
    while dualsync_lambda::poller::poll_once(capture, LAMBDA_BATCH).await.unwrap().is_some() {}
    while dualsync_lambda::poller::poll_once(&h.stack.handlers[1], LAMBDA_BATCH).await.unwrap().is_some() {}
    let deliver = &h.stack.handlers[2];
    let msgs = deliver.input().receive(10).await.unwrap();
    assert!(!msgs.is_empty());
    let again: Vec<OutMessage> = msgs
        .iter()
        .map(|m| OutMessage::fifo(m.body.clone(), m.group.clone().unwrap(), uuid::Uuid::new_v4().to_string()))
        .collect();
    deliver.input().send(again).await.unwrap();
    for m in &msgs {
        deliver.input().release(&m.receipt, Duration::ZERO).await.unwrap();
    }
    h.drain().await;
    h.assert_converged().await;
    assert_eq!(Metrics::get(&h.stack.metrics.written), 3, "each record written once");
    let own_writes =
        |p: &PathBuf| query(p, "SELECT count(*) FROM _dualsync_changes WHERE txid LIKE 'dualsync-write-%'");
    assert_eq!(own_writes(&h.b) + own_writes(&h.a), 3);
    let errors = h.stack.state().error_rows("j", &ErrorFilter::default()).await.unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initial_sync_fans_out_one_message_per_page_and_the_job_status_follows_it() {
    let h = harness_with(|a| {
        let conn = rusqlite::Connection::open(a).unwrap();
        for i in 1..=130 {
            let pid = format!("p{i:03}");
            conn.execute("INSERT INTO parents (pid, name, co, kind) VALUES (?1, 'n', 'X', 'small')", [&pid]).unwrap();
            conn.execute("INSERT INTO children (pid, cno, label) VALUES (?1, 1, 'l')", [&pid]).unwrap();
        }
    })
    .await;
    // Pages of 5: 26 a map, more than one listing message lists (20 pages each).
    let listing = ReconcileMessage::InitialSync {
        job: "j".into(),
        from: "a".into(),
        map: None,
        company: None,
        page_size: Some(5),
    };
    let admin = h.resources.admin(&h.sdk, Arc::new(Usage::default()));
    admin.reconcile.send(vec![listing.out()]).await.unwrap();
    h.drain().await;
    assert_eq!((query(&h.b, "SELECT count(*) FROM owners"), query(&h.b, "SELECT count(*) FROM items")), (130, 130));
    h.assert_converged().await;
    let view = admin.job("j").await.unwrap();
    assert!(view.errors.by_status.is_empty(), "{:?}", view.errors);
    // The job's status shows each map's sync done, every page of it (26 of 5 records: each its
    // own task and message, the listing handed on after 20), and the empty notes map too.
    let progress: Vec<_> =
        view.initial_sync.iter().map(|p| (p.map.as_str(), p.done, p.pages, p.pages_done, p.finished())).collect();
    assert_eq!(progress, [("parents", 130, 26, 26, true), ("children", 130, 26, 26, true), ("notes", 0, 1, 1, true)]);
}

/// `GET /jobs/{job}` of the admin API over SQS: what each of the pipeline's queues holds
/// (GetQueueAttributes), and a queue that cannot be read named in its own field, the rest of
/// the view still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_view_shows_what_the_pipeline_queues_hold() {
    use tower::ServiceExt;
    let h = harness().await;
    let capture = h.queue(&h.resources.capture_url, h.names.capture_queue());
    capture.send(["m1", "m2"].map(|b| OutMessage::standard(b.to_string())).to_vec()).await.unwrap();
    assert_eq!(capture.receive(1).await.unwrap().len(), 1);
    let api = dualsync_admin::router(Arc::new(h.resources.admin(&h.sdk, Arc::new(Usage::default()))));
    let job_view = || async {
        let req = axum::http::Request::builder().uri("/jobs/j").body(axum::body::Body::empty()).unwrap();
        let res = api.clone().oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
        let view: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(status, 200, "{view}");
        view["pipeline_queues"].clone()
    };
    let depth = |queue: String, visible: u64, in_flight: u64| serde_json::json!({ "queue": queue, "visible": visible, "in_flight": in_flight });
    let work = [h.names.capture_queue(), h.names.sequence_queue(), h.names.deliver_queue(), h.names.reconcile_queue()];
    let expected: Vec<serde_json::Value> = ["capture", "sequence", "deliver", "reconcile"]
        .iter()
        .zip(&work)
        .map(|(step, q)| {
            let held = if *step == "capture" { (1, 1) } else { (0, 0) };
            serde_json::json!({
                "step": step,
                "queue": depth(q.clone(), held.0, held.1),
                "dead_letter": depth(h.names.dead_letter_queue(q), 0, 0),
            })
        })
        .collect();
    assert_eq!(job_view().await, serde_json::Value::from(expected.clone()));

    // A queue gone (deleted by hand, or not readable by this role): its field says why.
    let sqs = aws_sdk_sqs::Client::new(&h.sdk);
    sqs.delete_queue().queue_url(&h.resources.dead_letter_urls[3]).send().await.unwrap();
    let queues = job_view().await;
    let error = queues[3]["dead_letter"]["error"].as_str().unwrap_or_else(|| panic!("no error in {queues}"));
    assert!(
        error.contains(&format!("queue {} unavailable: SQS GetQueueAttributes", h.names.dead_letter_queue(&work[3]))),
        "{error}"
    );
    assert_eq!(queues[3]["dead_letter"].get("visible"), None, "{queues}");
    assert_eq!(queues[0], expected[0], "the other queues are still read");
}
