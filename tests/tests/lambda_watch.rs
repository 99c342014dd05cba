//! The capture function's real binary behind `cargo lambda watch`, invoked with
//! `cargo lambda invoke` and an SQS event, against the emulator's queues and table: what AWS
//! Lambda does with it, on this machine. `./scripts/test` installs cargo-lambda (PyPI), builds
//! the function binaries and starts moto server.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualsync::adapters::aws::{bootstrap, sdk_config, DynamoKv, Names, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::domain::job::JobAction;
use dualsync::ports::{Queue, SystemClock};
use dualsync::state::State;

fn required(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run the tests with ./scripts/test"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Kills the process group of a child (cargo lambda watch, or the function) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("--").arg(format!("-{}", self.0.id())).status();
        let _ = self.0.wait();
    }
}

fn spawn(cmd: &mut Command, log: &Path) -> Killed {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    Killed(cmd.process_group(0).stdout(Stdio::from(out)).stderr(Stdio::from(err)).spawn().expect("spawn"))
}

fn sqs_record(id: &str, body: &str) -> serde_json::Value {
    serde_json::json!({
        "messageId": id, "receiptHandle": format!("rh-{id}"), "body": body,
        "attributes": { "ApproximateReceiveCount": "1", "SentTimestamp": "1700000000000" },
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:capture", "awsRegion": "us-east-1"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_binary_answers_an_sqs_event_through_cargo_lambda() {
    let endpoint = required("DUALSYNC_TEST_AWS_ENDPOINT");
    let cargo_lambda = required("DUALSYNC_CARGO_LAMBDA");
    let bin = PathBuf::from(required("DUALSYNC_FUNCTIONS_DIR")).join("capture");
    assert!(bin.is_file(), "{} is missing: ./scripts/test builds it", bin.display());
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
    {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let sdk = sdk_config(Some(&endpoint)).await;
    let names = Names::new(&format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    let resources = bootstrap(&sdk, &names).await.unwrap();

    // A stored, active job. A deployed function opens only odata apps (a sqlite app runs only
    // locally), so the sample job's apps become OData services; capture's async path never
    // calls them, so nothing listens at their address.
    let dir = tempfile::tempdir().unwrap();
    let mut def = common::create_apps(&dir.path().join("a.db"), &dir.path().join("b.db"));
    for app in &mut def.apps {
        app.connector = "odata".into();
        app.path = None;
        app.url = Some(format!("http://127.0.0.1:9/{}/", app.name));
        app.flavor = Some(dualsync::domain::job::Flavor::Generic);
        app.auth = Some(dualsync::domain::job::AuthSpec::None);
    }
    let kv = DynamoKv::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        resources.table.clone(),
        Arc::new(SystemClock),
        Arc::new(Usage::default()),
    );
    let state = State::new(Arc::new(kv), Arc::new(SystemClock));
    state.apply_job(def).await.unwrap();
    state.transition("j", JobAction::Start).await.unwrap();
    state.transition("j", JobAction::Activate).await.unwrap();

    // cargo lambda watch serves the Lambda runtime API; the function binary polls it.
    let port = free_port();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let _watch = spawn(
        Command::new(&cargo_lambda)
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", &port.to_string()])
            .current_dir(root),
        &dir.path().join("watch.log"),
    );
    // The function exits if the runtime API is not there yet: start it once the port answers.
    let up = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < up,
            "cargo lambda watch did not start: {}",
            std::fs::read_to_string(dir.path().join("watch.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _function = spawn(
        Command::new(&bin)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{port}/.rt"))
            // With --only-lambda-apis, cargo lambda serves the one function `_`.
            .env("AWS_LAMBDA_FUNCTION_NAME", "_")
            .env("AWS_ENDPOINT_URL", &endpoint)
            .env("DUALSYNC_TABLE", &resources.table)
            .env("CAPTURE_QUEUE_URL", &resources.capture_url)
            .env("SEQUENCE_QUEUE_URL", &resources.sequence_url)
            .env("DELIVER_QUEUE_URL", &resources.deliver_url)
            .env("MAX_RECEIVE_COUNT", MAX_RECEIVE_COUNT.to_string())
            .env("RUST_LOG", "info"),
        &dir.path().join("function.log"),
    );

    // One good notification and one poison message in one event.
    let good = serde_json::json!({
        "job": "j", "app": "a", "txid": "tx-watch-1",
        "changes": [{ "app": "a", "entity": "parents", "key": ["p1"], "op": "upsert", "seq": 1, "at_ms": 0, "company": "X" }]
    });
    let event = serde_json::json!({ "Records": [sqs_record("m-good", &good.to_string()), sqs_record("m-poison", "{not json")] });
    let event_file = dir.path().join("event.json");
    std::fs::write(&event_file, event.to_string()).unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    let response = loop {
        let out = Command::new("timeout")
            .arg("30")
            .arg(&cargo_lambda)
            .args(["lambda", "invoke", "_", "-A", "127.0.0.1", "-P", &port.to_string(), "--output-format", "json"])
            .arg("--data-file")
            .arg(&event_file)
            .current_dir(root)
            .output()
            .unwrap();
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "cargo lambda invoke kept failing: {}\nwatch: {}\nfunction: {}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.path().join("watch.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("function.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let response: serde_json::Value = serde_json::from_str(response.trim()).expect("a JSON response");
    assert_eq!(response, serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "m-poison" }] }));

    // The good notification went on to the sequence queue, as one captured transaction.
    let sequence = SqsQueue::new(
        aws_sdk_sqs::Client::new(&sdk),
        names.sequence_queue(),
        resources.sequence_url.clone(),
        MAX_RECEIVE_COUNT,
        Arc::new(Usage::default()),
    );
    let sent = sequence.receive(10).await.unwrap();
    assert_eq!(sent.len(), 1, "{sent:#?}");
    let tx: serde_json::Value = serde_json::from_str(&sent[0].body).unwrap();
    assert_eq!((tx["job"].as_str(), tx["txid"].as_str()), (Some("j"), Some("tx-watch-1")));
    // Its logs are JSON lines carrying the transaction id as correlation id.
    let logs = std::fs::read_to_string(dir.path().join("function.log")).unwrap();
    let line =
        logs.lines().find(|l| l.contains("correlation_id")).unwrap_or_else(|| panic!("no correlation id in {logs}"));
    let line: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert!(line.to_string().contains("tx-watch-1"), "{line}");
}
