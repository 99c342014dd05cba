//! The API against a real [`Admin`] over the embedded store (one SQLite file in a temp dir).
use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use dualsync::admin::Admin;
use dualsync::domain::change::Key;
use dualsync::domain::config::parse_job;
use dualsync::domain::errors::{ConflictRecord, ErrorCategory};
use dualsync::domain::job::{JobAction, Side};
use dualsync::ports::{OutMessage, Queue};
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::NewError;
use dualsync::steps::StepKind;
use serde_json::{json, Value};
use tower::ServiceExt;

use super::*;

const JOB: &str = "job: sales
apps:
  - { name: fno, connector: sqlite, path: fno.db }
  - { name: dataverse, connector: sqlite, path: dataverse.db }
primary: fno
table_groups:
  - name: customers
    maps:
      - name: customers
        sequence: 1
        entities: { fno: CustCustomer, dataverse: account }
        keys: [{ fno: CustomerAccount, dataverse: accountnumber }]
        fields: [{ fno: Name, dataverse: name }]
";

struct Fixture {
    _dir: tempfile::TempDir,
    rt: LocalRuntime,
    admin: Arc<Admin>,
    app: Router,
}

/// A stopped job `sales` with no errors.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let rt = LocalRuntime::open(dir.path()).unwrap();
    rt.state.apply_job(parse_job("job.yaml", JOB).unwrap()).await.unwrap();
    let admin: Arc<Admin> = Arc::new(rt.admin());
    let app = router(admin.clone());
    Fixture { _dir: dir, rt, admin, app }
}

impl Fixture {
    async fn activate(&self) {
        self.admin.state.transition("sales", JobAction::Start).await.unwrap();
        self.admin.state.transition("sales", JobAction::Activate).await.unwrap();
    }

    async fn record(&self, key: &str, app: &str, category: ErrorCategory) -> String {
        let e = NewError {
            map: "customers".into(),
            entity: if app == "fno" { "CustCustomer" } else { "account" }.into(),
            app: app.into(),
            source: if app == "fno" { Side::A } else { Side::B },
            key: Key(vec![key.into()]),
            by_record_id: false,
            seq: 1,
            txid: format!("t-{key}"),
            category,
            message: format!("missing reference: customers/{key}"),
            delete: false,
        };
        self.admin.state.record_error("sales", e).await.unwrap()
    }

    /// Handles the capture queue until it is empty: a poison message reaches the dead-letter
    /// queue on its sixth receive.
    async fn run_capture(&self) {
        while self.rt.step_once(StepKind::Capture).await.unwrap() > 0 {}
    }

    /// The ids of the messages in the capture dead-letter queue.
    fn capture_dlq(&self) -> Vec<String> {
        self.rt.dead_letters[0].peek_all().unwrap().iter().map(|m| m.id.to_string()).collect()
    }

    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
        send(&self.app, method, uri, None, body).await
    }
}

async fn send(app: &Router, method: &str, uri: &str, auth: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    let req = match body {
        Some(b) => req.header(header::CONTENT_TYPE, "application/json").body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    };
    let res = app.clone().oneshot(req.unwrap()).await.unwrap();
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{method} {uri}: not JSON ({e}): {bytes:?}"));
    (status, value)
}

fn message(v: &Value) -> &str {
    v["error"].as_str().unwrap_or_else(|| panic!("no error message in {v}"))
}

#[tokio::test]
async fn the_token_is_required_and_must_match() {
    let f = fixture().await;
    let app = with_token(f.app.clone(), "s3cret-token".into());

    let (status, body) = send(&app, "GET", "/jobs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(message(&body).contains("Authorization: Bearer"), "{body}");

    for wrong in
        ["Bearer s3cret-tokeN", "Bearer s3cret-token-and-more", "Bearer s3cret", "Basic s3cret-token", "s3cret-token"]
    {
        let (status, body) = send(&app, "GET", "/jobs", Some(wrong), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}: {body}");
        assert!(body["error"].is_string(), "{body}");
    }
    // Unknown routes too: no route discovery without the token.
    let (status, _) = send(&app, "GET", "/nothing/here", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, body) = send(&app, "GET", "/jobs", Some("Bearer s3cret-token"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body[0]["job"], "sales");
    assert_eq!(body[0]["status"], "stopped");
    let (status, _) = send(&app, "GET", "/jobs", Some("bearer s3cret-token"), None).await;
    assert_eq!(status, StatusCode::OK, "the scheme is case-insensitive");
}

#[tokio::test]
async fn the_401_says_bearer_and_an_empty_token_refuses_everything() {
    let f = fixture().await;
    let req = Request::builder().uri("/jobs").body(Body::empty()).unwrap();
    let res = with_token(f.app.clone(), "t".into()).oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(res.headers()[header::WWW_AUTHENTICATE], "Bearer");
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");

    let open = with_token(f.app.clone(), String::new());
    let (status, body) = send(&open, "GET", "/jobs", Some("Bearer "), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, body) = send(&open, "GET", "/jobs", Some("Bearer x"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
}

#[tokio::test]
async fn unknown_jobs_errors_and_requests_are_404_with_the_message() {
    let f = fixture().await;
    for uri in
        ["/jobs/nope", "/jobs/nope/errors", "/jobs/nope/errors/counts", "/jobs/nope/conflicts", "/jobs/nope/requests"]
    {
        let (status, body) = f.call("GET", uri, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(message(&body), "no job named 'nope'", "{uri}");
    }
    let (status, body) = f.call("POST", "/jobs/nope/pause", None).await;
    assert_eq!((status, message(&body)), (StatusCode::NOT_FOUND, "no job named 'nope'"));

    let (status, body) = f.call("GET", "/jobs/sales/errors/1700000000000-abc", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(message(&body), "job 'sales' has no error '1700000000000-abc'");
    let (status, body) = f.call("GET", "/jobs/sales/requests/r1", None).await;
    assert_eq!((status, message(&body)), (StatusCode::NOT_FOUND, "job 'sales' has no request 'r1'"));

    let (status, body) = f.call("GET", "/jobs/sales/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(message(&body), "no route GET /jobs/sales/nothing");
}

#[tokio::test]
async fn bad_query_values_are_400_naming_the_parameter() {
    let f = fixture().await;
    let cases = [
        ("/jobs/sales/errors?category=bogus", "query parameter 'category' is 'bogus'"),
        ("/jobs/sales/errors/counts?category=bogus", "query parameter 'category' is 'bogus'"),
        ("/jobs/sales/errors?status=closed", "query parameter 'status' is 'closed'"),
        ("/jobs/sales/errors?from_ms=yesterday", "query parameter 'from_ms' is 'yesterday'"),
        ("/jobs/sales/errors?limit=0", "query parameter 'limit' is '0'"),
        ("/jobs/sales/errors?limit=1001", "query parameter 'limit' is '1001'"),
        ("/jobs/sales/conflicts?limit=many", "query parameter 'limit' is 'many'"),
        ("/jobs/sales/errors?categroy=system", "unknown query parameter 'categroy'"),
        ("/jobs/sales/errors/counts?limit=5", "unknown query parameter 'limit'"),
        ("/jobs/sales/errors?app=fno&app=dataverse", "query parameter 'app' is given more than once"),
        ("/jobs/sales/errors?entity=", "query parameter 'entity' is empty"),
        ("/jobs/sales/errors?from_ms=20&to_ms=10", "'from_ms' (20) must be less than 'to_ms' (10)"),
    ];
    for (uri, expected) in cases {
        let (status, body) = f.call("GET", uri, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
        assert!(message(&body).contains(expected), "{uri}: {body}");
    }
    let (_, body) = f.call("GET", "/jobs/sales/errors?category=bogus", None).await;
    assert!(message(&body).contains("application, system, concurrency, conflict"), "{body}");
}

#[tokio::test]
async fn rules_refuse_with_409() {
    let f = fixture().await;
    f.record("C1", "fno", ErrorCategory::Application).await;

    let (status, body) = f.call("POST", "/jobs/sales/pause", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(message(&body), "job 'sales' is stopped: cannot pause it (allowed from active)");

    let (status, body) = f.call("POST", "/jobs/sales/resume", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(message(&body).contains("cannot resume it"), "{body}");

    let retry = json!({"action": "retry"});
    let (status, body) = f.call("POST", "/jobs/sales/requests", Some(retry.clone())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(message(&body).contains("job 'sales' is stopped"), "{body}");

    f.activate().await;
    let none = json!({"action": "dismiss", "filter": {"app": "dataverse"}});
    let (status, body) = f.call("POST", "/jobs/sales/requests", Some(none)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(message(&body), "no open errors of job 'sales' match the filter");
    let (status, body) = f.call("POST", "/jobs/sales/requests", Some(retry)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn bad_request_bodies_are_400_naming_the_field() {
    let f = fixture().await;
    f.activate().await;
    let cases = [
        (json!({"action": "retri"}), "body: action: unknown variant `retri`"),
        (json!({"filter": {}}), "missing field `action`"),
        (json!({"action": "retry", "filter": {"category": "bogus"}}), "body: filter.category: unknown variant `bogus`"),
        (
            json!({"action": "retry", "filter": {"categroy": "system"}}),
            "body: filter.categroy: unknown field `categroy`, expected one of",
        ),
        (json!({"action": "retry", "filter": {"from_ms": 5, "to_ms": 5}}), "filter 'from_ms' (5) must be less than"),
        (json!({"action": "retry", "force": true}), "unknown field `force`"),
    ];
    for (body, expected) in cases {
        let (status, answer) = f.call("POST", "/jobs/sales/requests", Some(body.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert!(message(&answer).contains(expected), "{body}: {answer}");
    }
    let req = Request::post("/jobs/sales/requests").body(Body::from("{not json")).unwrap();
    let res = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn errors_pages_counts_and_one_row() {
    let f = fixture().await;
    let first = f.record("C1", "fno", ErrorCategory::Application).await;
    tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    f.record("C2", "dataverse", ErrorCategory::System).await;

    let (status, page) = f.call("GET", "/jobs/sales/errors", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page}");
    assert!(page["next"].is_null(), "{page}");

    let (_, page1) = f.call("GET", "/jobs/sales/errors?limit=1", None).await;
    assert_eq!(page1["items"][0]["key"], json!(["C1"]), "{page1}");
    let next = page1["next"].as_str().expect("a cursor after a full page");
    let uri = format!("/jobs/sales/errors?limit=1&after={}", encode(next));
    let (status, page2) = f.call("GET", &uri, None).await;
    assert_eq!(status, StatusCode::OK, "{page2}");
    assert_eq!(page2["items"][0]["key"], json!(["C2"]), "{page2}");

    let (_, system) = f.call("GET", "/jobs/sales/errors?category=system&app=dataverse", None).await;
    assert_eq!(system["items"].as_array().unwrap().len(), 1, "{system}");
    assert_eq!(system["items"][0]["category"], "system");

    let (status, counts) = f.call("GET", "/jobs/sales/errors/counts?status=open", None).await;
    assert_eq!(status, StatusCode::OK, "{counts}");
    assert_eq!(counts, json!({"total": 2, "by_category": {"application": 1, "system": 1}, "by_status": {"open": 2}}));

    let id = page["items"][0]["id"].as_str().unwrap();
    assert!(first.ends_with(id), "{first} / {id}");
    let (status, row) = f.call("GET", &format!("/jobs/sales/errors/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{row}");
    assert_eq!(row["id"], id);
    assert_eq!(row["message"], "missing reference: customers/C1");

    let (_, job) = f.call("GET", "/jobs/sales", None).await;
    assert_eq!(job["errors"]["total"], 2, "{job}");
}

/// Percent-encodes a cursor for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn requests_are_accepted_listed_and_read() {
    let f = fixture().await;
    f.record("C1", "fno", ErrorCategory::Application).await;
    f.record("C2", "fno", ErrorCategory::Application).await;
    f.activate().await;

    let body = json!({"action": "retry", "filter": {"category": "application", "entity": "customers"}});
    let (status, created) = f.call("POST", "/jobs/sales/requests", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    assert_eq!(created["action"], "retry");
    assert_eq!(created["status"], "queued");
    assert_eq!(created["progress"]["selected"], 2);
    assert_eq!(created["filter"], json!({"category": "application", "entity": "customers"}));
    let id = created["id"].as_str().unwrap();

    let (status, list) = f.call("GET", "/jobs/sales/requests", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], id);
    let (status, one) = f.call("GET", &format!("/jobs/sales/requests/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{one}");
    assert_eq!(one["id"], id);
    let (_, job) = f.call("GET", "/jobs/sales", None).await;
    assert_eq!(job["requests_queued"], 1, "{job}");
    // Queued for the reconcile step.
    let queued = f.admin.reconcile.receive(10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert!(queued[0].body.contains(id), "{}", queued[0].body);
}

#[tokio::test]
async fn the_job_view_shows_what_the_pipeline_queues_hold() {
    let f = fixture().await;
    let msgs = ["m1", "m2"].map(|b| OutMessage::standard(b.to_string())).to_vec();
    f.rt.capture.send(msgs).await.unwrap();
    assert_eq!(f.rt.capture.receive(1).await.unwrap().len(), 1);

    let (status, job) = f.call("GET", "/jobs/sales", None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    let depth = |queue: &str, visible: u64, in_flight: u64| json!({ "queue": queue, "visible": visible, "in_flight": in_flight });
    let idle = |step: &str, queue: &str| json!({ "step": step, "queue": depth(queue, 0, 0), "dead_letter": depth(&format!("{queue}-dlq"), 0, 0) });
    let expected = json!([
        { "step": "capture", "queue": depth("capture", 1, 1), "dead_letter": depth("capture-dlq", 0, 0) },
        idle("sequence", "sequence"),
        idle("deliver", "deliver.fifo"),
        idle("reconcile", "reconcile.fifo"),
    ]);
    assert_eq!(job["pipeline_queues"], expected, "{job}");
    // The list reads the queues once and shows them in every job.
    let (_, jobs) = f.call("GET", "/jobs", None).await;
    assert_eq!(jobs[0]["pipeline_queues"], expected, "{jobs}");
}

#[tokio::test]
async fn pause_and_resume_answer_the_job() {
    let f = fixture().await;
    f.activate().await;
    let (status, job) = f.call("POST", "/jobs/sales/pause", None).await;
    assert_eq!(status, StatusCode::OK, "{job}");
    assert_eq!(job["status"], "paused");
    assert_eq!(job["paused_reason"], "paused by an operator");

    let (status, resumed) = f.call("POST", "/jobs/sales/resume", None).await;
    assert_eq!(status, StatusCode::OK, "{resumed}");
    assert_eq!(resumed["job"]["status"], "active", "{resumed}");
    assert_eq!(resumed["handed_back"], 0, "{resumed}");
}

#[tokio::test]
async fn start_and_stop_answer_the_job_with_its_shape() {
    let f = fixture().await;
    // The apps' preparation is the backend's (the local runner installs change capture): here
    // it fails once, then succeeds.
    let failing: dualsync::admin::Installer = Arc::new(|_| {
        Err(dualsync::ports::ConnectorError::Rejected { app: "fno".into(), message: "no such table".into() })
    });
    let app = router(Arc::new((*f.admin).clone().with_installer(failing)));
    let (status, refused) = send(&app, "POST", "/jobs/sales/start", None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert_eq!(message(&refused), "the apps could not be prepared: fno: no such table");
    let (_, job) = f.call("GET", "/jobs/sales", None).await;
    assert_eq!(job["status"], "stopped", "a start that failed leaves the job stopped: {job}");

    let app = router(Arc::new((*f.admin).clone().with_installer(Arc::new(|_| Ok(())))));
    let (status, started) = send(&app, "POST", "/jobs/sales/start", None, None).await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["job"]["status"], "active", "{started}");
    assert_eq!(started["handed_back"], 0, "{started}");
    let (status, again) = send(&app, "POST", "/jobs/sales/start", None, None).await;
    assert_eq!(status, StatusCode::CONFLICT, "starting an active job: {again}");

    let (status, stopped) = f.call("POST", "/jobs/sales/stop", None).await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    assert_eq!(stopped["kept_deliveries"], 0, "{stopped}");
    assert_eq!(stopped["primary"], "fno", "{stopped}");
    assert_eq!(stopped["apps"][0], json!({"name": "fno", "connector": "sqlite"}), "{stopped}");
    let map = &stopped["table_groups"][0]["maps"][0];
    assert_eq!(map["name"], "customers", "{stopped}");
    assert_eq!(map["sequence"], 1, "{stopped}");
    assert_eq!(map["entities"]["dataverse"], "account", "{stopped}");
}

#[tokio::test]
async fn conflicts_are_paged() {
    let f = fixture().await;
    for (i, key) in ["C1", "C2"].into_iter().enumerate() {
        let c = ConflictRecord {
            id: String::new(),
            job: "sales".into(),
            map: "customers".into(),
            key: Key(vec![key.into()]),
            app: "dataverse".into(),
            winner: "fno".into(),
            hashes: ["a".into(), format!("b{i}")],
            at_ms: 1_700_000_000_000 + i as i64,
        };
        assert!(f.admin.state.record_conflict(c).await.unwrap());
    }
    let (status, page) = f.call("GET", "/jobs/sales/conflicts?limit=1", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["items"][0]["winner"], "fno");
    let next = page["next"].as_str().expect("a cursor");
    let (_, rest) = f.call("GET", &format!("/jobs/sales/conflicts?after={}", encode(next)), None).await;
    assert_eq!(rest["items"][0]["key"], json!(["C2"]), "{rest}");
    assert!(rest["next"].is_null(), "{rest}");
}

/// Every listed route reaches a handler (a 404 from the router itself would say "no route"), and
/// a method not listed for a path is refused.
#[tokio::test]
async fn the_router_serves_exactly_the_listed_routes() {
    let f = fixture().await;
    for (method, path) in ROUTES {
        let uri = path.replace("{job}", "nope").replace("{queue}", "nope").replace("{id}", "x");
        let body = match *method {
            "POST" if path.ends_with("/requests") => Some(json!({"action": "retry"})),
            "POST" if path.ends_with("/redrive") => Some(json!({"all": true})),
            _ => None,
        };
        let (status, answer) = f.call(method, &uri, body).await;
        if uri == "/jobs" || uri == "/dead-letters" {
            assert_eq!(status, StatusCode::OK, "{method} {path}: {answer}");
            continue;
        }
        // The handler's 404 (no such job or queue), not the router's.
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        let expected = if path.starts_with("/dead-letters") { "no queue named 'nope'" } else { "no job named 'nope'" };
        assert!(message(&answer).starts_with(expected), "{method} {path}: {answer}");
    }
    let (status, answer) = f.call("DELETE", "/jobs/sales", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{answer}");
    assert_eq!(message(&answer), "/jobs/sales does not take DELETE");
    let (status, _) = f.call("GET", "/jobs/sales/pause", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn dead_letters_are_listed_shown_and_redriven() {
    let f = fixture().await;
    f.rt.capture.send(vec![OutMessage::standard("{not json".into())]).await.unwrap();
    f.run_capture().await;
    let first = f.capture_dlq();
    assert_eq!(first.len(), 1, "dead-lettered");
    let first = &first[0];

    let (status, page) = f.call("GET", "/dead-letters", None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"].as_array().unwrap().len(), 1, "{page}");
    let row = &page["items"][0];
    assert_eq!((row["queue"].as_str(), row["message_id"].as_str()), (Some("capture"), Some(first.as_str())), "{row}");
    assert_eq!((row["status"].as_str(), row["receive_count"].as_u64()), (Some("dead"), Some(5)), "{row}");
    assert!(row["job"].is_null(), "{row}");
    assert!(row["reason"].as_str().unwrap().starts_with("malformed change notification"), "{row}");
    let (_, only) = f.call("GET", "/dead-letters?queue=capture", None).await;
    assert_eq!(only["items"], page["items"]);
    let (_, none) = f.call("GET", "/dead-letters?queue=deliver", None).await;
    assert_eq!(none["items"], json!([]), "{none}");
    let (status, shown) = f.call("GET", &format!("/dead-letters/capture/{first}"), None).await;
    assert_eq!(status, StatusCode::OK, "{shown}");
    assert_eq!(shown["body"], "{not json");

    // Redriven while still poison: it comes back under a new id, with a new row and its reason.
    let (status, report) = f.call("POST", "/dead-letters/capture/redrive", Some(json!({"message_id": first}))).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report, json!({"queue": "capture", "redriven": [first], "left": 0, "more": false}));
    assert!(f.capture_dlq().is_empty(), "moved out of the dead-letter queue");
    f.run_capture().await;
    let again = f.capture_dlq();
    assert_eq!(again.len(), 1);
    assert_ne!(&again[0], first);
    let (_, page) = f.call("GET", "/dead-letters", None).await;
    let rows = page["items"].as_array().unwrap();
    assert_eq!(rows.len(), 2, "{page}");
    assert_eq!((rows[0]["message_id"].as_str(), rows[0]["status"].as_str()), (Some(again[0].as_str()), Some("dead")));
    assert!(rows[0]["reason"].as_str().unwrap().starts_with("malformed change notification"), "{page}");
    assert_eq!((rows[1]["message_id"].as_str(), rows[1]["status"].as_str()), (Some(first.as_str()), Some("redriven")));
    assert!(rows[1]["redriven_ms"].is_i64(), "{page}");

    // Pages of one, newest first.
    let (_, page1) = f.call("GET", "/dead-letters?limit=1", None).await;
    assert_eq!(page1["items"][0]["message_id"], again[0].as_str());
    let next = page1["next"].as_str().expect("a cursor");
    let (status, page2) = f.call("GET", &format!("/dead-letters?limit=1&after={}", encode(next)), None).await;
    assert_eq!(status, StatusCode::OK, "{page2}");
    assert_eq!(page2["items"][0]["message_id"], first.as_str());
    assert!(page2["next"].is_null(), "{page2}");

    // A job's redrive leaves what names no job.
    let (status, report) = f.call("POST", "/dead-letters/capture/redrive", Some(json!({"job": "sales"}))).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!((report["redriven"].clone(), report["left"].as_u64()), (json!([]), Some(1)), "{report}");
    assert_eq!(f.capture_dlq(), again, "left where it was, and visible");

    let (status, body) = f.call("POST", "/dead-letters/capture/redrive", Some(json!({"message_id": first}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(message(&body).contains("was redriven already"), "{body}");
    let cases = [
        ("POST", "/dead-letters/capture/redrive", Some(json!({})), StatusCode::BAD_REQUEST, "exactly one of"),
        (
            "POST",
            "/dead-letters/capture/redrive",
            Some(json!({"message_id": "1", "all": true})),
            StatusCode::BAD_REQUEST,
            "exactly one of",
        ),
        (
            "POST",
            "/dead-letters/capture/redrive",
            Some(json!({"everything": true})),
            StatusCode::BAD_REQUEST,
            "unknown field `everything`",
        ),
        (
            "POST",
            "/dead-letters/nope/redrive",
            Some(json!({"all": true})),
            StatusCode::NOT_FOUND,
            "no queue named 'nope': the queues are capture, sequence, deliver.fifo, reconcile.fifo",
        ),
        ("GET", "/dead-letters/capture/999", None, StatusCode::NOT_FOUND, "queue capture has no dead letter '999'"),
        ("GET", "/dead-letters?queue=nope", None, StatusCode::NOT_FOUND, "no queue named 'nope'"),
        ("GET", "/dead-letters?after=garbage", None, StatusCode::BAD_REQUEST, "'garbage' is not a cursor of this list"),
        ("GET", "/dead-letters?status=dead", None, StatusCode::BAD_REQUEST, "unknown query parameter 'status'"),
    ];
    for (method, uri, body, status, expected) in cases {
        let (got, answer) = f.call(method, uri, body).await;
        assert_eq!(got, status, "{method} {uri}: {answer}");
        assert!(message(&answer).contains(expected), "{method} {uri}: {answer}");
    }
}

fn repo_file(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn the_openapi_document_lists_exactly_the_routes() {
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&repo_file("docs/admin-api.openapi.yaml")).unwrap();
    assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true), "an OpenAPI 3.1 document");
    const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_mapping().expect("paths") {
        let path = path.as_str().unwrap().to_string();
        for (key, _) in item.as_mapping().expect("a path item") {
            let key = key.as_str().unwrap();
            if METHODS.contains(&key) {
                documented.insert((key.to_uppercase(), path.clone()));
            }
        }
    }
    let served: BTreeSet<(String, String)> = ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(ROUTES.len(), served.len(), "ROUTES lists a route twice");
    assert_eq!(documented, served, "docs/admin-api.openapi.yaml and ROUTES differ");
    for name in [
        "JobView",
        "SyncError",
        "ErrorCounts",
        "ConflictRecord",
        "ReconcileRequest",
        "Progress",
        "ErrorFilter",
        "DeadLetter",
        "RedriveReport",
        "Error",
    ] {
        assert!(doc["components"]["schemas"][name].is_mapping(), "schema {name} is missing");
    }
}

/// The sample event for `cargo lambda invoke admin --data-file` is a function URL request that
/// the router answers.
#[tokio::test]
async fn the_sample_function_url_event_reaches_the_router() {
    let f = fixture().await;
    let req = lambda_http::request::from_str(&repo_file("infra/events/admin-function-url.json")).unwrap();
    assert_eq!((req.method().as_str(), req.uri().path()), ("GET", "/jobs"));
    let res = f.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await.unwrap();
    let jobs: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(jobs[0]["job"], "sales", "{jobs}");
}

#[tokio::test]
async fn metrics_are_served_by_the_minute_with_totals() {
    use dualsync::domain::metrics::Tally;
    let f = fixture().await;
    let mut t = Tally { delivered: 3, conflicts: 1, ..Tally::default() };
    t.error(ErrorCategory::Application);
    t.lag.record(40);
    t.lag.record(3_000);
    f.admin.state.add_metrics("sales", &t).await.unwrap();
    f.admin.state.add_metrics("sales", &Tally { delivered: 2, dead_letters: 1, ..Tally::default() }).await.unwrap();

    let (status, m) = f.call("GET", "/jobs/sales/metrics?since=0", None).await;
    assert_eq!(status, StatusCode::OK, "{m}");
    assert_eq!(m["job"], "sales");
    let totals = &m["totals"];
    assert_eq!((totals["delivered"].as_u64(), totals["conflicts"].as_u64()), (Some(5), Some(1)), "{m}");
    assert_eq!((totals["dead_letters"].as_u64(), totals["throttle_waits"].as_u64()), (Some(1), Some(0)), "{m}");
    assert_eq!(totals["errors"], json!({"application": 1, "system": 0, "concurrency": 0, "conflict": 0}));
    let minutes = m["minutes"].as_array().unwrap();
    assert_eq!(minutes.len(), 1, "both batches counted in this minute: {m}");
    assert_eq!(minutes[0]["delivered"], 5);
    assert_eq!((minutes[0]["lag_ms_p50"].as_u64(), minutes[0]["lag_ms_max"].as_u64()), (Some(50), Some(5_000)));
    assert_eq!(minutes[0]["at_ms"].as_i64().unwrap() % 60_000, 0, "a minute's start");

    // A window after the minute holds nothing; the totals still name every category.
    let later = minutes[0]["at_ms"].as_i64().unwrap() + 60_000;
    let (_, m) = f.call("GET", &format!("/jobs/sales/metrics?since={later}"), None).await;
    assert_eq!((m["minutes"].as_array().map(Vec::len), m["totals"]["delivered"].as_u64()), (Some(0), Some(0)));

    let (status, answer) = f.call("GET", "/jobs/sales/metrics?since=yesterday", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(message(&answer), "query parameter 'since' is 'yesterday': expected milliseconds since the epoch");
    let (status, _) = f.call("GET", "/jobs/nope/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
