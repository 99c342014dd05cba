//! The capture function's real binary behind `cargo lambda watch`, invoked with
//! `cargo lambda invoke` and an SQS event, against the emulator's queues and table: what AWS
//! Lambda does with it, on this machine, and the log lines an operator reads there. `./scripts/test`
//! installs cargo-lambda (PyPI), builds the function binaries and starts moto server.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dualsync::adapters::aws::{bootstrap, sdk_config, DynamoKv, Names, Resources, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::domain::job::JobAction;
use dualsync::ports::{Queue, SystemClock};
use dualsync::state::State;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

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

fn sqs_record(id: &str, body: &str, receive_count: u32) -> serde_json::Value {
    serde_json::json!({
        "messageId": id, "receiptHandle": format!("rh-{id}"), "body": body,
        "attributes": { "ApproximateReceiveCount": receive_count.to_string(), "SentTimestamp": "1700000000000" },
        "messageAttributes": {}, "md5OfBody": "", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:000000000000:capture", "awsRegion": "us-east-1"
    })
}

fn notification(txid: &str) -> String {
    serde_json::json!({
        "job": "j", "app": "a", "txid": txid,
        "changes": [{ "app": "a", "entity": "parents", "key": ["p1"], "op": "upsert", "seq": 1, "at_ms": 0, "company": "X" }]
    })
    .to_string()
}

/// A fresh stage on the emulator with an active job `j`, and `cargo lambda watch` serving the
/// Lambda runtime API on a free port.
struct Watched {
    dir: tempfile::TempDir,
    endpoint: String,
    cargo_lambda: String,
    port: u16,
    root: PathBuf,
    sdk: aws_config::SdkConfig,
    names: Names,
    resources: Resources,
    state: State,
    _watch: Killed,
}

impl Watched {
    async fn start() -> Watched {
        let endpoint = required("DUALSYNC_TEST_AWS_ENDPOINT");
        let cargo_lambda = required("DUALSYNC_CARGO_LAMBDA");
        for (k, v) in
            [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
        {
            if std::env::var_os(k).is_none() {
                std::env::set_var(k, v);
            }
        }
        let sdk = sdk_config(Some(&endpoint)).await;
        let names = Names::new(&format!("w{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
        let resources = bootstrap(&sdk, &names).await.unwrap();

        // A stored, active job. A deployed function opens only odata apps (a sqlite app runs
        // only locally), so the sample job's apps become OData services; capture's async path
        // never calls them, so nothing listens at their address.
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
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let watch = spawn(
            Command::new(&cargo_lambda)
                .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1", "-P", &port.to_string()])
                .current_dir(&root),
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
        Watched { dir, endpoint, cargo_lambda, port, root, sdk, names, resources, state, _watch: watch }
    }

    /// The capture binary with the stage's environment, `unset` left out and `set` over it.
    fn capture(&self, unset: &[&str], set: &[(&str, &str)]) -> Killed {
        let bin = PathBuf::from(required("DUALSYNC_FUNCTIONS_DIR")).join("capture");
        assert!(bin.is_file(), "{} is missing: ./scripts/test builds it", bin.display());
        let max = MAX_RECEIVE_COUNT.to_string();
        let mut env: Vec<(&str, &str)> = vec![
            ("AWS_ENDPOINT_URL", &self.endpoint),
            ("DUALSYNC_TABLE", &self.resources.table),
            ("CAPTURE_QUEUE_URL", &self.resources.capture_url),
            ("SEQUENCE_QUEUE_URL", &self.resources.sequence_url),
            ("DELIVER_QUEUE_URL", &self.resources.deliver_url),
            ("MAX_RECEIVE_COUNT", &max),
            ("RUST_LOG", "info"),
        ];
        env.retain(|(k, _)| !unset.contains(k));
        env.extend_from_slice(set);
        let mut cmd = Command::new(&bin);
        cmd.env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_RUNTIME_API", format!("http://127.0.0.1:{}/.rt", self.port))
            // With --only-lambda-apis, cargo lambda serves the one function `_`.
            .env("AWS_LAMBDA_FUNCTION_NAME", "_");
        for (k, v) in env {
            cmd.env(k, v);
        }
        spawn(&mut cmd, &self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("function.log")
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `cargo lambda invoke` with an SQS event of `records`, tried until `answered` accepts its
    /// output (the function may not be polling yet). Each try is cut off after 30 s: a try that
    /// hangs shows as such.
    fn invoke(&self, records: Vec<serde_json::Value>, answered: impl Fn(&Output) -> bool) -> Output {
        let event_file = self.dir.path().join("event.json");
        std::fs::write(&event_file, serde_json::json!({ "Records": records }).to_string()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = Command::new("timeout")
                .arg("30")
                .arg(&self.cargo_lambda)
                .args(["lambda", "invoke", "_", "-A", "127.0.0.1", "-P", &self.port.to_string()])
                .args(["--output-format", "json", "--data-file"])
                .arg(&event_file)
                .current_dir(&self.root)
                .output()
                .unwrap();
            if answered(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "cargo lambda invoke never answered as expected (exit {:?}; 124 is a hang): {}{}\nwatch: {}\nfunction: {}",
                out.status.code(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.dir.path().join("watch.log")).unwrap_or_default(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Collects the keys of every JSON object in a value, in order and repeats kept: serde_json's
/// `Value` keeps only the last of a repeated key, so it cannot tell that a line had two.
struct Keys<'a>(&'a mut Vec<Vec<String>>);

impl<'de> DeserializeSeed<'de> for Keys<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Keys<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let all = self.0;
        let mut keys = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            keys.push(k);
            map.next_value_seed(Keys(&mut *all))?;
        }
        all.push(keys);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let all = self.0;
        while seq.next_element_seed(Keys(&mut *all))?.is_some() {}
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
}

/// The function's log as JSON lines: every line must be one, with no object holding a key twice
/// (the log's `message` was overwritten by a field named `message`).
fn json_lines(logs: &str) -> Vec<serde_json::Value> {
    logs.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut keys = Vec::new();
            Keys(&mut keys)
                .deserialize(&mut serde_json::Deserializer::from_str(l))
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}"));
            for object in &keys {
                let mut sorted = object.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), object.len(), "a key twice in {l}");
            }
            serde_json::from_str(l).unwrap()
        })
        .collect()
}

/// The log lines of invocations (EMF metric lines apart) each name the request and the batch.
fn assert_every_line_names_its_invocation(lines: &[serde_json::Value], txid: &str) {
    let logged: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("_aws").is_none()).collect();
    assert!(logged.len() >= 2, "at least a failed message and the batch's end: {lines:#?}");
    for l in logged {
        let span = &l["span"];
        assert!(span["request_id"].as_str().is_some_and(|r| !r.is_empty()), "no request id: {l}");
        assert!(span["correlation_id"].as_str().is_some_and(|c| c.contains(txid)), "no correlation id: {l}");
        assert!(l["fields"]["message"].is_string(), "one message: {l}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_binary_answers_an_sqs_event_through_cargo_lambda() {
    let w = Watched::start().await;
    let _function = w.capture(&[], &[]);

    // One good notification, one poison message, and one that is poison on its last receive.
    let response = w.invoke(
        vec![
            sqs_record("m-good", &notification("tx-watch-1"), 1),
            sqs_record("m-poison", "{not json", 1),
            sqs_record("m-dead", r#"{"job":"j"}"#, MAX_RECEIVE_COUNT),
        ],
        |out| out.status.success(),
    );
    let response: serde_json::Value = serde_json::from_slice(&response.stdout).expect("a JSON response");
    assert_eq!(
        response,
        serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "m-poison" }, { "itemIdentifier": "m-dead" }] })
    );

    // The good notification went on to the sequence queue, as one captured transaction.
    let sequence = SqsQueue::new(
        aws_sdk_sqs::Client::new(&w.sdk),
        w.names.sequence_queue(),
        w.resources.sequence_url.clone(),
        MAX_RECEIVE_COUNT,
        Arc::new(Usage::default()),
    );
    let sent = sequence.receive(10).await.unwrap();
    assert_eq!(sent.len(), 1, "{sent:#?}");
    let tx: serde_json::Value = serde_json::from_str(&sent[0].body).unwrap();
    assert_eq!((tx["job"].as_str(), tx["txid"].as_str()), (Some("j"), Some("tx-watch-1")));

    // Its logs are JSON lines, one message each, every one naming the request and the batch;
    // the batch's end is logged even where every message went well.
    let lines = json_lines(&w.logs());
    assert_every_line_names_its_invocation(&lines, "tx-watch-1");
    let end = lines.iter().find(|l| l["fields"]["message"] == "batch handled").expect("the batch's end");
    assert_eq!((end["fields"]["done"].as_u64(), end["fields"]["poison"].as_u64()), (Some(1), Some(2)), "{end}");
    let failed = lines.iter().find(|l| l["fields"]["message"] == "message not handled").expect("a failed message");
    assert!(failed["fields"]["message_id"].is_string(), "{failed}");

    // The dead letter is counted for job j: one EMF line (namespace Dualsync, dimension Job),
    // and the job's minute in the table.
    let emf: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("_aws").is_some()).collect();
    assert_eq!(emf.len(), 1, "one metrics line for the one job with counts: {emf:#?}");
    assert_eq!(emf[0]["_aws"]["CloudWatchMetrics"][0]["Namespace"], "Dualsync");
    assert_eq!((emf[0]["Job"].as_str(), emf[0]["DeadLetters"].as_u64()), (Some("j"), Some(1)), "{}", emf[0]);
    let minutes = w.state.metrics("j", 0).await.unwrap();
    assert_eq!(minutes.iter().map(|(_, t)| t.dead_letters).sum::<u64>(), 1, "{minutes:?}");
}

/// An AWS call that fails leaves a line with the service's code and message, not the raw
/// response (its headers made such a line about 2,300 characters long).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_aws_call_is_logged_short() {
    let w = Watched::start().await;
    let nowhere = format!("{}/123456789012/{}-nope", w.endpoint, w.names.sequence_queue());
    let _function = w.capture(&[], &[("SEQUENCE_QUEUE_URL", &nowhere)]);
    let response = w.invoke(vec![sqs_record("m-1", &notification("tx-watch-2"), 1)], |out| out.status.success());
    let response: serde_json::Value = serde_json::from_slice(&response.stdout).expect("a JSON response");
    assert_eq!(response, serde_json::json!({ "batchItemFailures": [{ "itemIdentifier": "m-1" }] }));

    let lines = json_lines(&w.logs());
    assert_every_line_names_its_invocation(&lines, "tx-watch-2");
    let failed = lines.iter().find(|l| l["fields"]["message"] == "message not handled").expect("the failure");
    let reason = failed["fields"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("SendMessageBatch") && reason.contains("does not exist"), "{failed}");
    for l in &lines {
        let text = l.to_string();
        assert!(text.len() < 1000, "{} characters: {text}", text.len());
        assert!(!text.to_ascii_lowercase().contains("x-amzn-requestid"), "raw headers: {text}");
    }
}

/// A function whose setup fails answers every invocation with why, readable, instead of
/// exiting (after which `cargo lambda invoke` waited for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_function_that_cannot_start_answers_why() {
    let w = Watched::start().await;
    let _function = w.capture(&["SEQUENCE_QUEUE_URL"], &[]);
    let why = "environment variable SEQUENCE_QUEUE_URL is not set";
    let out = w.invoke(vec![sqs_record("m-1", &notification("tx-watch-3"), 1)], |out| {
        String::from_utf8_lossy(&out.stdout).contains(why) || String::from_utf8_lossy(&out.stderr).contains(why)
    });
    assert!(!out.status.success(), "an error, not an answer");
    let lines = json_lines(&w.logs());
    let line = lines.iter().find(|l| l["fields"]["error"].as_str().is_some_and(|e| e.contains(why)));
    assert!(line.is_some(), "the log says why: {lines:#?}");
    assert!(!w.logs().contains("Missing("), "the readable message, not the Debug form: {}", w.logs());
}

/// The check above sees a key twice, which serde_json's `Value` does not.
#[test]
fn a_repeated_key_is_seen() {
    let twice = r#"{"fields":{"message":"message not handled","message":"m-1"}}"#;
    assert_eq!(serde_json::from_str::<serde_json::Value>(twice).unwrap()["fields"]["message"], "m-1");
    assert!(std::panic::catch_unwind(|| json_lines(twice)).is_err());
    assert_eq!(json_lines(r#"{"fields":{"message":"m"},"span":{"message_id":"1"}}"#).len(), 1);
}
