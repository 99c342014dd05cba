//! Pushed events through the ingress routes (issue 10 points 5 to 7): recorded Dataverse
//! webhooks and an fno business event posted over HTTP to the local runtime's ingress router,
//! with a Dataverse-like app on the OData test server and a sqlite app; the records arrive on the
//! other side through the real steps. Keys read back by id when Dataverse stripped the images,
//! error rows for what cannot be resolved, 401/400/404 for requests the sender must fix, and the
//! ingress function's handler over moto: a function URL request in, a message on the capture
//! queue out.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};

use dualsync::adapters::embedded::EmbeddedDb;
use dualsync::domain::config::parse_job;
use dualsync::domain::errors::ErrorCategory;
use dualsync::domain::job::Side;
use dualsync::ports::{ManualClock, Queue};
use dualsync::runtime::local::{LocalRuntime, SqliteRegistry};
use dualsync::state::ErrorFilter;
use dualsync::steps::ingress::Ingress;
use dualsync::steps::Failpoints;
use odata_sample::{EventKey, Kind, Options, Server, Subscription};

const DV_KEY: &str = "dv-webhook-key-1";
const A_KEY: &str = "a-header-key-22";
/// dualsync's application user in the Dataverse app.
const OWN: &str = "0a0a0a0a-0000-4000-8000-00000000000a";

const JOB: &str = "job: s
apps:
  - name: a
    connector: sqlite
    path: A
    ingress: { auth: { kind: http_header, name: x-fno-key, key_env: A_KEY } }
  - name: dv
    connector: odata
    url: URL
    flavor: dataverse
    auth: { kind: none }
    ingress: { auth: { kind: webhook_key, key_env: DV_KEY }, own_user_id: OWN }
primary: a
table_groups:
  - name: g
    maps:
      - name: customers
        sequence: 1
        entities: { a: customers, dv: accounts }
        keys: [{ a: id, dv: accountnumber }]
        event_names: { a: [CustomerChangedBusinessEvent] }
        fields:
          - { a: name, dv: name }
          - { a: credit, dv: creditlimit }
";

fn recorded(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ingress_events").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn sql(path: &Path, s: &str) {
    rusqlite::Connection::open(path).unwrap().execute_batch(s).unwrap();
}

fn row(path: &Path, id: &str) -> Option<(String, f64)> {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("SELECT name, credit FROM customers WHERE id = ?1", [id], |r| Ok((r.get(0)?, r.get(1)?))).ok()
}

struct Fixture {
    server: Server,
    rt: LocalRuntime,
    clock: ManualClock,
    a: PathBuf,
    _dir: tempfile::TempDir,
    /// The ingress router's address.
    base: String,
    http: reqwest::Client,
    _serve: tokio::task::JoinHandle<()>,
}

impl Fixture {
    /// The job started over a Dataverse-like service and a sqlite app (holding `rows` before the
    /// start, so they are not in its change log), the ingress router on a loopback port.
    async fn start(rows: &str) -> Fixture {
        let server = Server::start(Kind::Dataverse, Options::default()).await;
        server.add_set("accounts", &["accountnumber"], Some("accountid"));
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.db");
        sql(&a, &format!("CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT, credit REAL); {rows}"));
        let mut def = parse_job("job.yaml", &JOB.replace("URL", &server.url).replace("OWN", OWN)).unwrap();
        def.apps[0].path = Some(a.display().to_string());
        let clock = ManualClock::new(1_700_000_000_000);
        let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
        let rt = LocalRuntime::with_registry(
            db,
            Arc::new(clock.clone()),
            Failpoints::default(),
            Arc::new(SqliteRegistry::default()),
        );
        rt.apply(def).await.unwrap();
        rt.start("s").await.unwrap();
        let keys = |k: &str| match k {
            "DV_KEY" => Some(DV_KEY.to_string()),
            "A_KEY" => Some(A_KEY.to_string()),
            _ => None,
        };
        let ingress = Ingress::new(rt.state.clone(), rt.apps.clone(), rt.capture.clone()).with_env(Arc::new(keys));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let router = dualsync_ingress::router(Arc::new(ingress));
        let serve = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Fixture { server, rt, clock, a, _dir: dir, base, http: reqwest::Client::new(), _serve: serve }
    }

    /// Posts `body` to `path` with `headers`; the status and the JSON answer.
    async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<reqwest::Body>) -> (u16, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let a = req.send().await.unwrap();
        let status = a.status().as_u16();
        let text = a.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn webhook(&self, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
        self.post(&format!("/ingress/s/dv/dataverse?code={DV_KEY}"), headers, body.to_string()).await
    }

    /// Messages waiting on the capture queue (visible, in flight).
    async fn captured(&self) -> (u64, u64) {
        let d = self.rt.capture.depth().await.unwrap();
        (d.visible, d.in_flight)
    }

    async fn drain(&self) {
        for _ in 0..50 {
            while self.rt.pump().await.unwrap() > 0 {}
            if self.rt.is_idle().await.unwrap() {
                return;
            }
            self.clock.advance(301_000);
        }
        panic!("pipeline did not drain");
    }
}

/// The recorded webhook about another record: its id and account number.
fn webhook_about(id: &str, number: &str) -> Value {
    let text = recorded("dataverse-account-update.json")
        .to_string()
        .replace("ab89c994-065d-f011-bec2-000d3ac241ab", id)
        .replace("\"D-1\"", &format!("\"{number}\""));
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_recorded_dataverse_webhook_brings_the_record_to_the_sqlite_app() {
    let f = Fixture::start("").await;
    f.server.put("accounts", json!({"accountnumber": "D-1", "name": "Fourth Coffee", "creditlimit": 3.5}));
    let (status, body) = f.webhook(&[], &recorded("dataverse-account-update.json")).await;
    assert_eq!((status, &body), (200, &json!({"captured": 1, "ignored": 0, "own_writes": 0, "errors": 0})));
    assert_eq!(f.captured().await, (1, 0));
    f.drain().await;
    assert_eq!(row(&f.a, "D-1"), Some(("Fourth Coffee".into(), 3.5)));
    let errors = f.rt.state.error_rows("s", &ErrorFilter::default()).await.unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
}

#[tokio::test]
async fn stripped_images_have_the_key_read_back_by_id_and_a_gone_record_is_an_error_row() {
    let f = Fixture::start("").await;
    f.server.put("accounts", json!({"accountnumber": "D-2", "name": "stripped", "creditlimit": 2}));
    let id = f.server.id_of("accounts", &[json!("D-2")]).unwrap();
    // Dataverse removed the images and parameters for size; what is left names the record by id.
    let mut body = webhook_about(&id, "D-2");
    body["PostEntityImages"] = json!([]);
    body["InputParameters"] = json!([]);
    f.server.clear_log();
    let stripped = [("x-ms-dynamics-msg-size-exceeded", "true")];
    let (status, answer) = f.webhook(&stripped, &body).await;
    assert_eq!((status, answer["captured"].as_u64()), (200, Some(1)), "{answer}");
    let by_id = f.server.log().iter().any(|l| l.method == "GET" && l.path.contains(&format!("accounts({id})")));
    assert!(by_id, "the key is read by the record's id: {:#?}", f.server.log());
    f.drain().await;
    assert_eq!(row(&f.a, "D-2"), Some(("stripped".into(), 2.0)));

    // A delete whose images were stripped: the record is gone, its key cannot be read back.
    let gone = "11111111-2222-4333-8444-555555555555";
    let mut delete = webhook_about(gone, "D-3");
    delete["MessageName"] = json!("Delete");
    delete["PostEntityImages"] = json!([]);
    delete["InputParameters"] = json!([]);
    delete["OperationId"] = json!("c389c994-065d-f011-bec2-000d3ac241ab");
    let (status, answer) = f.webhook(&stripped, &delete).await;
    assert_eq!((status, answer["errors"].as_u64(), answer["captured"].as_u64()), (200, Some(1), Some(0)), "{answer}");
    assert_eq!(f.captured().await, (0, 0));
    let rows = f.rt.state.error_rows("s", &ErrorFilter::default()).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    let row = &rows[0].1;
    assert_eq!((row.key.display(), row.source), (gone.to_string(), Side::B));
    assert!(row.message.contains(&format!("delete of accounts record {gone} not captured")), "{}", row.message);
    // Keyed by the record id, it can address no counterpart: not retriable, linked to nothing.
    assert!(
        !row.retriable
            && row
                .message
                .ends_with("its counterpart in a, if any, was not deleted: delete it there, then dismiss this row"),
        "{row:#?}"
    );
    assert!(f.rt.state.links("s", &[("customers", &row.key)]).await.unwrap()[0].is_none());
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401_and_nothing_is_captured() {
    let f = Fixture::start("").await;
    let body = recorded("dataverse-account-update.json").to_string();
    for path in ["/ingress/s/dv/dataverse?code=wrong", "/ingress/s/dv/dataverse", "/ingress/s/dv/dataverse?code="] {
        let (status, answer) = f.post(path, &[], body.clone()).await;
        assert_eq!((status, answer), (401, json!({"error": "unauthorized"})), "{path}");
    }
    // The other app's key, in the other app's header, does not open this app's route.
    let (status, _) = f.post("/ingress/s/dv/dataverse", &[("x-fno-key", A_KEY)], body).await;
    assert_eq!(status, 401);
    assert_eq!(f.captured().await, (0, 0));
}

#[tokio::test]
async fn bad_bodies_are_400_naming_the_problem_and_unknown_routes_404() {
    let f = Fixture::start("").await;
    let mut body = recorded("dataverse-account-update.json");
    body["PrimaryEntityId"] = json!("not-a-guid");
    let (status, answer) = f.webhook(&[], &body).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "dataverse event: PrimaryEntityId: must be a GUID");
    let (status, answer) = f.post(&format!("/ingress/s/dv/dataverse?code={DV_KEY}"), &[], "{").await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().starts_with("dataverse event: (body): not JSON"), "{answer}");
    let (status, answer) = f.post("/ingress/s/a/fno", &[("x-fno-key", A_KEY)], r#"{"BusinessEventId": "x"}"#).await;
    assert_eq!((status, answer["error"].as_str()), (400, Some("fno event: (body): 'ControlNumber' is missing")));
    for path in ["/ingress/nope/dv/dataverse", "/ingress/s/nope/dataverse", "/ingress/s/dv/webhook"] {
        let (status, answer) = f.post(&format!("{path}?code={DV_KEY}"), &[], "{}").await;
        assert_eq!(status, 404, "{path}: {answer}");
        assert!(answer["error"].as_str().unwrap().starts_with("no ingress route"), "{answer}");
    }
    assert_eq!(f.captured().await, (0, 0));
}

#[tokio::test]
async fn unmapped_entities_are_ignored_and_own_writes_skipped() {
    let f = Fixture::start("").await;
    let mut lead = recorded("dataverse-account-update.json");
    lead["PrimaryEntityName"] = json!("lead");
    let (status, answer) = f.webhook(&[], &lead).await;
    assert_eq!((status, answer["ignored"].as_u64(), answer["captured"].as_u64()), (200, Some(1), Some(0)));
    let mut own = recorded("dataverse-account-update.json");
    own["InitiatingUserId"] = json!(OWN.to_uppercase());
    let (status, answer) = f.webhook(&[], &own).await;
    assert_eq!((status, answer["own_writes"].as_u64(), answer["captured"].as_u64()), (200, Some(1), Some(0)));
    assert_eq!(f.captured().await, (0, 0));
}

#[tokio::test]
async fn an_fno_business_event_and_an_own_notification_are_captured() {
    // A-7 is in the sqlite app before the job starts: only the event can bring it across.
    let f = Fixture::start("INSERT INTO customers (id, name, credit) VALUES ('A-7', 'from the event', 7.5);").await;
    let event = recorded("fno-business-event.json").to_string();
    let (status, answer) = f.post("/ingress/s/a/fno", &[("X-Fno-Key", A_KEY)], event).await;
    assert_eq!((status, answer["captured"].as_u64()), (200, Some(1)), "{answer}");
    assert_eq!(f.captured().await, (1, 0));
    f.drain().await;
    assert_eq!(f.server.get("accounts", &[json!("A-7")]).unwrap()["name"], "\"from the event\"");

    // The project's own notification, for the Dataverse app.
    f.server.put("accounts", json!({"accountnumber": "D-5", "name": "told", "creditlimit": 5}));
    let tx = json!({"job": "s", "app": "dv", "txid": "n-1", "changes": [{"app": "dv", "entity": "accounts",
        "key": ["D-5"], "op": "upsert", "seq": 9, "at_ms": 1_700_000_000_000i64}]});
    let path = format!("/ingress/s/dv/notification?code={DV_KEY}");
    let (status, answer) = f.post(&path, &[], tx.to_string()).await;
    assert_eq!((status, answer["captured"].as_u64()), (200, Some(1)), "{answer}");
    f.drain().await;
    assert_eq!(row(&f.a, "D-5"), Some(("told".into(), 5.0)));
    let mut other = tx.clone();
    other["job"] = json!("t");
    let (status, answer) = f.post(&path, &[], other.to_string()).await;
    assert_eq!((status, answer["error"].as_str()), (400, Some("notification: job 't' is not the route's job 's'")));
    let (status, answer) = f.post(&path, &[], r#"{"job": "s", "app": "dv", "txid": 5}"#).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().starts_with("notification: txid: invalid type"), "{answer}");
}

/// The sample services send their users' edits as the apps do: Dataverse a webhook per
/// operation (`?code=` key), fno a data event per record (header key). Both routes take them and
/// the pipeline brings the records across; writes through the OData API send nothing.
#[tokio::test]
async fn the_sample_services_send_their_users_edits_as_the_apps_events() {
    let f = Fixture::start("INSERT INTO customers (id, name, credit) VALUES ('A-8', 'told by fno', 8);").await;
    f.server.subscribe(Subscription {
        url: format!("{}/ingress/s/dv/dataverse", f.base),
        key: EventKey::WebhookKey(DV_KEY.into()),
    });
    f.server.put("accounts", json!({"accountnumber": "D-11", "name": "eleven", "creditlimit": 11}));
    f.server.user_transaction(|tx| {
        tx.put("accounts", json!({"accountnumber": "D-10", "name": "ten", "creditlimit": 10}));
        tx.put("accounts", json!({"accountnumber": "D-12", "name": "twelve", "creditlimit": 12}));
    });
    f.server.events_delivered().await;
    assert_eq!(f.server.event_failures(), Vec::<String>::new());
    assert_eq!(f.captured().await, (3, 0), "one message per operation");
    f.drain().await;
    for (id, name, credit) in [("D-10", "ten", 10.0), ("D-11", "eleven", 11.0), ("D-12", "twelve", 12.0)] {
        assert_eq!(row(&f.a, id), Some((name.into(), credit)), "{id}");
    }
    // dualsync's own write to the service (A-9, from the sqlite app) sends no event.
    assert_eq!(f.server.events_sent(), 3);
    sql(&f.a, "INSERT INTO customers (id, name, credit) VALUES ('A-9', 'from sqlite', 9);");
    f.drain().await;
    assert!(f.server.get("accounts", &[json!("A-9")]).is_some());
    assert_eq!(f.server.events_sent(), 3);

    // A user's delete: the webhook's pre image names the record.
    f.server.delete("accounts", &[json!("D-11")]);
    f.server.events_delivered().await;
    f.drain().await;
    assert_eq!(row(&f.a, "D-11"), None);

    // fno's data event about A-8 (a record the sqlite app holds: the event only names it).
    let fno = Server::start(Kind::Fno, Options::default()).await;
    fno.add_set("customers", &["id"], None);
    fno.subscribe(Subscription {
        url: format!("{}/ingress/s/a/fno", f.base),
        key: EventKey::Header { name: "x-fno-key".into(), value: A_KEY.into() },
    });
    fno.put("customers", json!({"id": "A-8", "name": "told by fno"}));
    fno.events_delivered().await;
    assert_eq!(fno.event_failures(), Vec::<String>::new());
    assert_eq!(f.captured().await, (1, 0));
    f.drain().await;
    assert_eq!(f.server.get("accounts", &[json!("A-8")]).unwrap()["name"], "\"told by fno\"");
    // Nothing failed (a concurrency skip, informational, may note the deleted record).
    let errors = f.rt.state.error_rows("s", &ErrorFilter::default()).await.unwrap();
    assert!(errors.iter().all(|(_, e)| e.category == ErrorCategory::Concurrency), "{errors:#?}");

    // A wrong key is refused, not retried: the event is given up and says why.
    fno.subscribe(Subscription {
        url: format!("{}/ingress/s/a/fno", f.base),
        key: EventKey::Header { name: "x-fno-key".into(), value: "wrong".into() },
    });
    fno.put("customers", json!({"id": "A-8", "name": "again"}));
    fno.events_delivered().await;
    let failed = fno.event_failures();
    assert!(failed.len() == 1 && failed[0].contains("refused with 401"), "{failed:?}");
}

mod function_url {
    //! The ingress function's handler over moto: a function URL request (base64 body, as Lambda
    //! hands over a request it cannot pass as text) in, a notification on the capture queue out.
    use super::*;
    use base64::Engine;
    use dualsync::adapters::aws::{bootstrap, DynamoKv, Names, Usage};
    use dualsync::domain::change::TransactionNotification;
    use dualsync::ports::SystemClock;
    use dualsync::state::State;
    use dualsync_ingress::LambdaFunctionUrlRequest;
    use dualsync_lambda::SenderEnv;

    async fn emulator() -> aws_config::SdkConfig {
        let endpoint = std::env::var("DUALSYNC_TEST_AWS_ENDPOINT").expect(
            "DUALSYNC_TEST_AWS_ENDPOINT is not set: run the tests with ./scripts/test, which starts moto server",
        );
        for (k, v) in
            [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
        {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        dualsync::adapters::aws::sdk_config(Some(&endpoint)).await
    }

    fn request(path: &str, query: &[(&str, &str)], body: &[u8]) -> LambdaFunctionUrlRequest {
        let params: serde_json::Map<String, Value> = query.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        serde_json::from_value(json!({
            "version": "2.0",
            "rawPath": path,
            "rawQueryString": query.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"),
            "headers": {"content-type": "application/json"},
            "queryStringParameters": params,
            "requestContext": {"accountId": "anonymous", "requestId": "r-1", "timeEpoch": 1,
                "http": {"method": "POST", "path": path, "protocol": "HTTP/1.1", "sourceIp": "203.0.113.9",
                         "userAgent": "Microsoft Dynamics CRM"}},
            "body": base64::engine::general_purpose::STANDARD.encode(body),
            "isBase64Encoded": true
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_function_url_request_becomes_a_message_on_the_capture_queue() {
        let sdk = emulator().await;
        let names = Names::new(&format!("i{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
        let res = bootstrap(&sdk, &names).await.expect("bootstrap");
        let usage = Arc::new(Usage::default());
        let kv =
            DynamoKv::new(aws_sdk_dynamodb::Client::new(&sdk), res.table.clone(), Arc::new(SystemClock), usage.clone());
        let state = State::new(Arc::new(kv), Arc::new(SystemClock));
        // No service behind the Dataverse app: the webhook carries its key, nothing is read back.
        let job = JOB.replace("URL", "http://127.0.0.1:9/api/data/v9.2/").replace("OWN", OWN);
        state.apply_job(parse_job("job.yaml", &job).unwrap()).await.unwrap();
        let keys = |k: &str| (k == "DV_KEY").then(|| DV_KEY.to_string());
        let ingress = dualsync_ingress::aws(
            &sdk,
            &SenderEnv { table: res.table.clone(), capture_queue_url: res.capture_url.clone() },
            Arc::new(SqliteRegistry::default()),
            usage,
        )
        .with_env(Arc::new(keys));
        let body = recorded("dataverse-account-update.json").to_string();

        let wrong = dualsync_ingress::function_url(
            &ingress,
            request("/ingress/s/dv/dataverse", &[("code", "x")], body.as_bytes()),
        )
        .await;
        assert_eq!((wrong.status_code, wrong.body.as_deref()), (401, Some(r#"{"error":"unauthorized"}"#)));

        let r = dualsync_ingress::function_url(
            &ingress,
            request("/ingress/s/dv/dataverse", &[("code", DV_KEY)], body.as_bytes()),
        )
        .await;
        assert_eq!(r.status_code, 200, "{:?}", r.body);
        let answer: Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!(answer["captured"], 1);

        let sqs = aws_sdk_sqs::Client::new(&sdk);
        let got = sqs.receive_message().queue_url(&res.capture_url).max_number_of_messages(10).send().await.unwrap();
        let msgs = got.messages.unwrap_or_default();
        assert_eq!(msgs.len(), 1, "one message for the accepted request, none for the refused one");
        let tx: TransactionNotification = serde_json::from_str(msgs[0].body.as_deref().unwrap()).unwrap();
        assert_eq!((tx.job.as_str(), tx.app.as_str(), tx.changes.len()), ("s", "dv", 1));
        assert_eq!((tx.changes[0].entity.as_str(), tx.changes[0].key.display()), ("accounts", "D-1".to_string()));
        assert_eq!(tx.txid, "fc65709c-7b89-460a-bafc-7193dd5f7c5b/b389c994-065d-f011-bec2-000d3ac241ab");
        res.delete(&sdk).await.unwrap();
    }
}
