//! The `dualsync` binary end to end: the demo at a small scale on both backends, the
//! long-running runner with a clean Ctrl-C and its ingress routes, a bad job file, and the admin commands on AWS
//! (moto server, started by `./scripts/test`).
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{count, people_job, sqlite};

fn dualsync(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dualsync"));
    cmd.arg("--data-dir").arg(data_dir).env("RUST_BACKTRACE", "0");
    cmd
}

#[test]
fn demo_converges_and_sees_every_expected_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualsync(dir.path()).args(["demo", "--customers", "300", "--orders", "40"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("conflict: customers DEMF/C000003 changed on both sides; fno (primary) won"), "{stdout}");
    // The sample apps are in step map by map: 300 + 500 from dataverse + 100 new - 1 deleted.
    assert!(
        stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["customers", "900", "900", "900"]),
        "{stdout}"
    );
}

/// The same scenario and checks between two OData sample services in the demo's process: fno's
/// data events come to the demo's ingress route, Dataverse's changes by change tracking.
#[test]
fn demo_converges_between_odata_apps() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualsync(dir.path())
        .args(["demo", "--apps", "odata", "--customers", "300", "--orders", "40"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("OData sample services: fno at http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(stdout.contains("conflict: customers DEMF/C000003 changed on both sides; fno (primary) won"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["customers", "900", "900", "900"]),
        "{stdout}"
    );
}

#[test]
fn bench_between_odata_services_delivers_every_record() {
    // Both ways the source can tell of its changes: the project's notification (one per source
    // transaction) and fno business events (one per record).
    for events in ["notification", "fno"] {
        let dir = tempfile::tempdir().unwrap();
        let args = ["bench", "--apps", "odata", "--records", "450", "--tx-size", "100", "--events", events];
        let out = dualsync(dir.path()).args(args).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("all 450 records in the target with their values"), "{stdout}");
        assert!(stdout.lines().any(|l| l.starts_with("requests/record")), "{stdout}");
    }
}

#[test]
fn bench_of_an_initial_sync_between_odata_services_verifies_every_record() {
    let dir = tempfile::tempdir().unwrap();
    // Three pages, the last one short, two in flight.
    let args = ["bench", "--apps", "odata", "--initial-sync", "--records", "1234", "--pages-in-flight", "2"];
    let out = dualsync(dir.path()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("records            1234 (1234 created)"), "{stdout}");
    assert!(stdout.contains("all 1234 records in the target with their values, no failed record"), "{stdout}");
}

/// `dualsync --backend aws` against the emulator `./scripts/test` started.
fn on_aws(data_dir: &std::path::Path, stage: &str) -> Command {
    let endpoint = std::env::var("DUALSYNC_TEST_AWS_ENDPOINT")
        .expect("DUALSYNC_TEST_AWS_ENDPOINT is not set: run the tests with ./scripts/test, which starts moto server");
    let mut cmd = dualsync(data_dir);
    cmd.args(["--backend", "aws", "--endpoint-url", &endpoint, "--stage", stage]);
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
    {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    cmd
}

fn stage() -> String {
    format!("cli{}", std::process::id())
}

#[test]
fn demo_converges_on_the_aws_backend() {
    let dir = tempfile::tempdir().unwrap();
    let out = on_aws(dir.path(), &stage()).args(["demo", "--customers", "60", "--orders", "10"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("running on the Lambda handlers on DynamoDB table"), "{stdout}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
    // The orphan order mends itself once its customer syncs: nothing is left to retry.
    assert!(stdout.contains("retry: nothing left to retry"), "{stdout}");
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn jobs_are_applied_started_and_stopped_on_aws() {
    let dir = tempfile::tempdir().unwrap();
    let stage = format!("{}jobs", stage());
    // Before bootstrap, the stage's resources are missing: said so, with the way out.
    let out = on_aws(dir.path(), &stage).args(["job", "status"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("table dualsync-{stage}-state")) && stderr.contains("dualsync aws bootstrap"),
        "{stderr}"
    );

    let created = run_ok(on_aws(dir.path(), &stage).args(["aws", "bootstrap"]));
    assert!(created.contains(&format!("dualsync-{stage}-deliver-dlq.fifo")), "{created}");
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "job: people
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: sqlite, path: b.db }
primary: a
table_groups:
  - name: g
    maps:
      - name: people
        sequence: 1
        entities: { a: people, b: contacts }
        keys: [{ a: id, b: contact_id }]
        fields: [{ a: name, b: fullname }]
",
    )
    .unwrap();
    let applied = run_ok(on_aws(dir.path(), &stage).args(["job", "apply"]).arg(&job));
    assert!(applied.contains("job 'people' applied (revision 1, stopped)"), "{applied}");
    run_ok(on_aws(dir.path(), &stage).args(["job", "start", "people"]));
    let status = run_ok(on_aws(dir.path(), &stage).args(["job", "status"]));
    assert!(
        status.contains("people: active (revision 1), 0 open and 0 retrying error(s), 0 request(s) queued"),
        "{status}"
    );
    // The last hour's metrics, read from the stage's table: nothing has moved yet.
    assert!(
        status.contains("  last hour: 0 delivered, 0 conflict(s), 0 dead letter(s), 0 throttling wait(s); error rows: application 0, concurrency 0, conflict 0, system 0"),
        "{status}"
    );
    // What is queued, read off the stage's queues: nothing yet, then the initial sync's message
    // waiting for the reconcile function (none runs here).
    assert!(
        status.contains(
            "pipeline queues (shared by every job):\n  \
             capture    0 visible / 0 in flight; dead letters 0 visible / 0 in flight\n"
        ),
        "{status}"
    );
    run_ok(on_aws(dir.path(), &stage).args(["initial-sync", "people", "--from", "a"]));
    let status = run_ok(on_aws(dir.path(), &stage).args(["job", "status", "people"]));
    assert!(
        status.contains("  reconcile  1 visible / 0 in flight; dead letters 0 visible / 0 in flight\n"),
        "{status}"
    );
    // Pause and resume, and the error and request commands.
    run_ok(on_aws(dir.path(), &stage).args(["job", "pause", "people"]));
    let status = run_ok(on_aws(dir.path(), &stage).args(["job", "status", "people"]));
    assert!(status.contains("people: paused") && status.contains("paused: paused by an operator"), "{status}");
    let out = on_aws(dir.path(), &stage).args(["errors", "retry", "people"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("job 'people' is paused: retry and dismiss requests are taken only while it is active"),
        "{stderr}"
    );
    let resumed = run_ok(on_aws(dir.path(), &stage).args(["job", "resume", "people"]));
    assert!(resumed.contains("people: active") && resumed.contains("0 kept deliveries handed back"), "{resumed}");
    let out =
        on_aws(dir.path(), &stage).args(["errors", "dismiss", "people", "--category", "system"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no open errors of job 'people' match the filter"));
    let counts = run_ok(on_aws(dir.path(), &stage).args(["errors", "counts", "people"]));
    assert!(counts.starts_with("0 error row(s)"), "{counts}");
    let requests = run_ok(on_aws(dir.path(), &stage).args(["requests", "list", "people"]));
    assert!(requests.contains("no requests for job 'people'"), "{requests}");
    let out = on_aws(dir.path(), &stage).args(["errors", "show", "people", "1-abc"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("job 'people' has no error '1-abc'"));
    // Starting an active job is an illegal transition, named as such.
    let out = on_aws(dir.path(), &stage).args(["job", "start", "people"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("job 'people' is active: cannot start it (allowed from stopped)"), "{stderr}");
    run_ok(on_aws(dir.path(), &stage).args(["job", "stop", "people"]));
    let status = run_ok(on_aws(dir.path(), &stage).args(["job", "status", "people"]));
    assert!(status.contains("people: stopped (revision 1)"), "{status}");
    // The same commands on the local backend do not see the AWS job.
    let local = run_ok(dualsync(dir.path()).args(["job", "status"]));
    assert!(local.contains("no jobs"), "{local}");
}

/// One HTTP/1.1 request to the local admin API; the whole answer, status line first.
fn http(port: u16, method: &str, path: &str, token: Option<&str>) -> String {
    request(port, method, path, token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default(), "")
}

/// One HTTP/1.1 request to the runner's loopback server with these header lines and body.
fn request(port: u16, method: &str, path: &str, headers: String, body: &str) -> String {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("the admin API never listened on {port}: {e}"),
        }
    };
    let length = body.len();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}Content-Length: {length}\r\nConnection: close\r\n\r\n{body}"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn run_syncs_the_users_apps_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    sqlite(&a, "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT)");
    sqlite(&b, "CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, fullname TEXT)");
    let job = people_job(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let token = "a-test-token-of-some-length";
    let child = dualsync(&dir.path().join("state"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&job)
        .env("DUALSYNC_ADMIN_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the job is active the capture triggers exist; then a write on each side syncs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&a, "SELECT count(*) FROM sqlite_master WHERE name = '_dualsync_changes'") == 0 {
        assert!(Instant::now() < deadline, "the runner never installed capture");
        std::thread::sleep(Duration::from_millis(50));
    }
    sqlite(&a, "INSERT INTO people (id, name) VALUES ('p1', 'Ada')");
    sqlite(&b, "INSERT INTO contacts (contact_id, fullname) VALUES ('p2', 'Grace')");
    while count(&b, "SELECT count(*) FROM contacts WHERE contact_id = 'p1' AND fullname = 'Ada'") == 0
        || count(&a, "SELECT count(*) FROM people WHERE id = 'p2' AND name = 'Grace'") == 0
    {
        assert!(Instant::now() < deadline, "records did not sync");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The admin API: a token is required; pause and resume through it.
    assert!(http(port, "GET", "/jobs/people", None).starts_with("HTTP/1.1 401"));
    assert!(http(port, "GET", "/jobs/people", Some("wrong-token-wrong-token")).starts_with("HTTP/1.1 401"));
    let answer = http(port, "GET", "/jobs/people", Some(token));
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#""status":"active""#), "{answer}");
    let answer = http(port, "POST", "/jobs/people/pause", Some(token));
    assert!(answer.contains(r#""status":"paused""#), "{answer}");
    sqlite(&a, "INSERT INTO people (id, name) VALUES ('p3', 'Edsger')");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(count(&b, "SELECT count(*) FROM contacts WHERE contact_id = 'p3'"), 0, "delivered while paused");
    let answer = http(port, "POST", "/jobs/people/resume", Some(token));
    assert!(answer.contains(r#""status":"active""#), "{answer}");
    while count(&b, "SELECT count(*) FROM contacts WHERE contact_id = 'p3'") == 0 {
        assert!(Instant::now() < deadline, "the change kept while paused was not delivered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");

    // Nothing is lost while it is down: a change made now syncs on the next run.
    sqlite(&a, "UPDATE people SET name = 'Ada L.' WHERE id = 'p1'");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = dualsync(&dir.path().join("state"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&job)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while count(&b, "SELECT count(*) FROM contacts WHERE fullname = 'Ada L.'") == 0 {
        assert!(Instant::now() < deadline + Duration::from_secs(30), "change made while stopped was lost");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
}

/// `dualsync run` serves the ingress routes beside the admin API: a recorded Dataverse webhook
/// posted to the binary with the app's webhook key brings the record from a Dataverse-like
/// service to the sqlite app; a wrong key is 401 and captures nothing.
#[test]
fn run_serves_ingress_a_dataverse_webhook_brings_the_record_to_the_other_app() {
    use odata_sample::{Kind, Options, Server};
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.db");
    sqlite(&a, "CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT, credit REAL)");
    // The service runs on this runtime's threads while the test waits on the binary.
    let services = tokio::runtime::Runtime::new().unwrap();
    let dv = services.block_on(Server::start(Kind::Dataverse, Options::default()));
    dv.add_set("accounts", &["accountnumber"], Some("accountid"));
    dv.put("accounts", serde_json::json!({"accountnumber": "D-1", "name": "Fourth Coffee", "creditlimit": 3.5}));
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "job: s
apps:
  - {{ name: a, connector: sqlite, path: a.db }}
  - name: dv
    connector: odata
    url: {}
    flavor: dataverse
    auth: {{ kind: none }}
    ingress: {{ auth: {{ kind: webhook_key, key_env: DV_WEBHOOK_KEY }} }}
primary: a
table_groups:
  - name: g
    maps:
      - name: customers
        sequence: 1
        entities: {{ a: customers, dv: accounts }}
        keys: [{{ a: id, dv: accountnumber }}]
        fields: [{{ a: name, dv: name }}, {{ a: credit, dv: creditlimit }}]
",
            dv.url
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let token = "a-test-token-of-some-length";
    let mut child = dualsync(&dir.path().join("state"))
        .args(["run", "--admin-addr", &format!("127.0.0.1:{port}"), "--config"])
        .arg(&job)
        .env("DUALSYNC_ADMIN_TOKEN", token)
        .env("DV_WEBHOOK_KEY", "dv-webhook-key-1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http(port, "GET", "/jobs/s", Some(token)).contains(r#""status":"active""#) {
        assert!(Instant::now() < deadline, "the job never became active");
        std::thread::sleep(Duration::from_millis(50));
    }
    let webhook = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/tests/ingress_events/dataverse-account-update.json"),
    )
    .unwrap();
    let json = "Content-Type: application/json\r\n".to_string();
    let answer = request(port, "POST", "/ingress/s/dv/dataverse?code=wrong-key", json.clone(), &webhook);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = request(port, "POST", "/ingress/s/dv/dataverse?code=dv-webhook-key-1", json, &webhook);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#""captured":1"#), "{answer}");
    while count(&a, "SELECT count(*) FROM customers WHERE id = 'D-1' AND name = 'Fourth Coffee' AND credit = 3.5") == 0
    {
        assert!(Instant::now() < deadline, "the webhook's record did not reach the sqlite app");
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_bad_job_file_is_refused_with_every_problem_named() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("bad.yaml");
    std::fs::write(
        &job,
        "job: bad
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: ftp }
primary: c
table_groups:
  - name: g
    maps:
      - name: m
        sequence: 1
        entities: { a: t, b: u }
        keys: [{ a: id }]
",
    )
    .unwrap();
    let out = dualsync(dir.path()).args(["job", "apply"]).arg(&job).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "bad.yaml: apps[1].connector: unknown connector 'ftp'",
        "bad.yaml: primary: primary 'c' is not one of the apps: a, b",
        "bad.yaml: table_groups[0].maps[0].keys[0]: key field missing on side 'b'",
    ] {
        assert!(stderr.contains(expected), "missing `{expected}` in:\n{stderr}");
    }
}

/// Handles every queue of the local runtime in `state` until nothing moves (poison messages
/// reach their dead-letter queue on their sixth receive); the ids in the capture dead-letter queue.
fn drain_local(state: &std::path::Path) -> Vec<String> {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let rt = dualsync::runtime::local::LocalRuntime::open(state).unwrap();
        while rt.pump().await.unwrap() > 0 {}
        assert!(rt.is_idle().await.unwrap());
        rt.dead_letters[0].peek_all().unwrap().iter().map(|m| m.id.to_string()).collect()
    })
}

fn send_capture(state: &std::path::Path, body: &str) {
    use dualsync::ports::{OutMessage, Queue};
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let rt = dualsync::runtime::local::LocalRuntime::open(state).unwrap();
        rt.capture.send(vec![OutMessage::standard(body.to_string())]).await.unwrap();
    })
}

#[test]
fn dead_letters_are_listed_shown_and_redriven_locally() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    sqlite(&a, "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT); INSERT INTO people VALUES ('p1', 'Ada')");
    sqlite(&b, "CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, fullname TEXT)");
    let job = people_job(dir.path());
    // A change of a job that does not exist yet, and a message that is not JSON.
    let change = r#"{"job": "people", "app": "a", "txid": "t1", "changes": [{"app": "a", "entity": "people", "key": ["p1"], "op": "upsert", "seq": 1, "at_ms": 0}]}"#;
    send_capture(&state, change);
    let unknown = drain_local(&state);
    assert_eq!(unknown.len(), 1);
    send_capture(&state, "{not json");
    let poison: Vec<String> = drain_local(&state).into_iter().filter(|id| !unknown.contains(id)).collect();
    assert_eq!(poison.len(), 1);
    let (unknown, poison) = (&unknown[0], &poison[0]);

    let list = run_ok(dualsync(&state).args(["dead-letters", "list"]));
    let at = |id: &str| list.lines().position(|l| l.split_whitespace().nth(2) == Some(id));
    let line = |id: &str| at(id).and_then(|i| list.lines().nth(i)).map(str::to_string);
    let row = line(unknown).unwrap_or_else(|| panic!("{list}"));
    assert!(
        row.contains(" capture ")
            && row.contains(" people ")
            && row.contains("dead")
            && row.ends_with("unknown job 'people'"),
        "{list}"
    );
    let row = line(poison).unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains(" - ") && row.contains("malformed change notification"), "{list}");
    assert!(at(poison) < at(unknown), "newest first: {list}");
    let shown = run_ok(dualsync(&state).args(["dead-letters", "show", "capture", unknown]));
    assert!(shown.contains("job:           people") && shown.contains(&format!("body:          {change}")), "{shown}");

    // Once the job exists, the redriven change syncs; the row is settled.
    run_ok(dualsync(&state).args(["job", "apply"]).arg(&job));
    run_ok(dualsync(&state).args(["job", "start", "people"]));
    let out = run_ok(dualsync(&state).args(["dead-letters", "redrive", "capture", unknown]));
    assert!(out.contains(&format!("1 message(s) sent back to capture: {unknown}")), "{out}");
    assert!(out.contains("1 other message(s) left in its dead-letter queue"), "{out}");
    assert_eq!(drain_local(&state), std::slice::from_ref(poison));
    assert_eq!(count(&b, "SELECT count(*) FROM contacts WHERE contact_id = 'p1' AND fullname = 'Ada'"), 1);

    // Still poison: back under a new id, with its reason.
    let out = run_ok(dualsync(&state).args(["dead-letters", "redrive", "capture", "--all"]));
    assert!(out.contains(&format!("1 message(s) sent back to capture: {poison}")), "{out}");
    let back = drain_local(&state);
    assert!(back.len() == 1 && back[0] != *poison, "{back:?}");
    let list = run_ok(dualsync(&state).args(["dead-letters", "list", "--queue", "capture"]));
    let statuses: Vec<(&str, &str)> = list
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[2], f[4])
        })
        .collect();
    assert_eq!(
        statuses,
        [(back[0].as_str(), "dead"), (poison.as_str(), "redriven"), (unknown.as_str(), "redriven")],
        "{list}"
    );
    // What is queued: nothing left to handle, the poison message in capture's dead-letter queue.
    let status = run_ok(dualsync(&state).args(["job", "status", "people"]));
    let queues = "pipeline queues (shared by every job):
  capture    0 visible / 0 in flight; dead letters 1 visible / 0 in flight
  sequence   0 visible / 0 in flight; dead letters 0 visible / 0 in flight
  deliver    0 visible / 0 in flight; dead letters 0 visible / 0 in flight
  reconcile  0 visible / 0 in flight; dead letters 0 visible / 0 in flight
";
    assert!(status.ends_with(queues), "{status}");

    let out = dualsync(&state).args(["dead-letters", "redrive", "capture"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("required"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = dualsync(&state).args(["dead-letters", "show", "capture", "999"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue capture has no dead letter '999'"));
    let out = dualsync(&state).args(["dead-letters", "redrive", "capture", unknown]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("was redriven already"));
}

/// The stage's table and queues on the emulator, and the handlers over them.
async fn aws_stack(stage: &str) -> (dualsync::adapters::aws::Resources, dualsync_lambda::stack::Stack) {
    use dualsync::adapters::aws::{sdk_config, Names, Resources, Usage};
    let endpoint = std::env::var("DUALSYNC_TEST_AWS_ENDPOINT").expect("DUALSYNC_TEST_AWS_ENDPOINT is not set");
    for (k, v) in [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_REGION", "us-east-1")]
    {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let sdk = sdk_config(Some(&endpoint)).await;
    let resources = Resources::lookup(&sdk, &Names::new(stage)).await.unwrap();
    let stack = dualsync_lambda::stack::Stack::new(&sdk, &resources, std::sync::Arc::new(Usage::default()));
    (resources, stack)
}

/// Runs the handlers until the stack is idle.
fn drain_aws(stage: &str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let (_, stack) = aws_stack(stage).await;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if stack.poll_round().await.unwrap().is_empty() {
                if stack.is_idle().await.unwrap() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(Instant::now() < deadline, "the stack did not drain in two minutes");
        }
    })
}

#[test]
fn dead_letters_are_listed_shown_and_redriven_on_aws() {
    let dir = tempfile::tempdir().unwrap();
    let stage = format!("{}dl", stage());
    run_ok(on_aws(dir.path(), &stage).args(["aws", "bootstrap"]));
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use dualsync::ports::{OutMessage, Queue};
        let (resources, _) = aws_stack(&stage).await;
        let sdk =
            dualsync::adapters::aws::sdk_config(std::env::var("DUALSYNC_TEST_AWS_ENDPOINT").ok().as_deref()).await;
        let capture = dualsync::adapters::aws::SqsQueue::new(
            aws_sdk_sqs::Client::new(&sdk),
            resources.names.capture_queue(),
            resources.capture_url.clone(),
            dualsync::adapters::aws::MAX_RECEIVE_COUNT,
            std::sync::Arc::new(dualsync::adapters::aws::Usage::default()),
        );
        capture.send(vec![OutMessage::standard("{not json".into())]).await.unwrap();
    });
    drain_aws(&stage);
    let queue = format!("dualsync-{stage}-capture");
    let rows = |list: &str| -> Vec<(String, String)> {
        list.lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[2].to_string(), f[4].to_string())
            })
            .collect()
    };
    let list = run_ok(on_aws(dir.path(), &stage).args(["dead-letters", "list"]));
    assert!(list.contains(&queue) && list.contains("malformed change notification"), "{list}");
    let first = rows(&list);
    assert_eq!(first.len(), 1, "{list}");
    let id = first[0].0.clone();
    assert_eq!(first[0].1, "dead");
    let shown = run_ok(on_aws(dir.path(), &stage).args(["dead-letters", "show", "capture", &id]));
    assert!(
        shown.contains("body:          {not json") && shown.contains(&format!("queue:         {queue}")),
        "{shown}"
    );

    let out = run_ok(on_aws(dir.path(), &stage).args(["dead-letters", "redrive", "capture", &id]));
    assert!(out.contains(&format!("1 message(s) sent back to {queue}: {id}")), "{out}");
    drain_aws(&stage);
    let list = run_ok(on_aws(dir.path(), &stage).args(["dead-letters", "list", "--queue", "capture"]));
    let now = rows(&list);
    assert_eq!(now.len(), 2, "{list}");
    assert!(now[0].0 != id && now[0].1 == "dead", "back under a new id: {list}");
    assert_eq!(now[1], (id, "redriven".to_string()), "{list}");
}

/// `dualsync doctor`: a job whose app lacks a mapped column fails, naming the table and the
/// column; fixed, it passes. The check creates nothing (a missing file is a finding).
#[test]
fn doctor_names_what_an_app_lacks_and_passes_once_it_is_there() {
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "job: people
apps:
  - { name: a, connector: sqlite, path: a.db }
  - { name: b, connector: sqlite, path: b.db }
primary: a
table_groups:
  - name: g
    maps:
      - name: people
        sequence: 1
        entities: { a: people, b: contacts }
        keys: [{ a: id, b: contact_id }]
        fields: [{ a: name, b: fullname }]
",
    )
    .unwrap();
    let doctor = || dualsync(dir.path()).arg("doctor").arg(&job).output().unwrap();
    let out = doctor();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success() && stdout.contains("a.db: does not exist"), "{stdout}");
    assert!(!dir.path().join("a.db").exists(), "doctor created the app's file");

    let sql =
        |file: &str, s: &str| rusqlite::Connection::open(dir.path().join(file)).unwrap().execute_batch(s).unwrap();
    sql("a.db", "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT)");
    sql("b.db", "CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, full_name TEXT)");
    let out = doctor();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "{stdout}");
    assert!(stdout.contains("b: contacts:") && stdout.contains("fullname"), "{stdout}");
    assert!(!stdout.contains("a: people"), "{stdout}");

    sql("b.db", "ALTER TABLE contacts RENAME COLUMN full_name TO fullname");
    let stdout = run_ok(dualsync(dir.path()).arg("doctor").arg(&job));
    assert!(stdout.contains("both apps can serve job 'people'"), "{stdout}");
}

/// `dualsync dashboard` is for a stack (locally `dualsync run` serves the dashboard), and it
/// listens on loopback only: it acts with the user's AWS credentials.
#[test]
fn dashboard_is_for_a_stack_and_listens_on_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dualsync(dir.path()).arg("dashboard").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("served by `dualsync run`"), "{stderr}");
    let out = dualsync(dir.path()).args(["--backend", "aws", "dashboard", "--addr", "0.0.0.0:7879"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("loopback address only"), "{stderr}");
}
