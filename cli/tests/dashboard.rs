//! The dashboard in a real browser: Debian's chromium, headless, driven through chromedriver
//! (WebDriver) against the real `dualsync run`. An operator logs in, filters the sync errors,
//! retries the selection once the target app is fixed, watches the request finish, then pauses
//! and resumes the job. `./scripts/test` installs chromium and chromium-driver when missing.
//!
//! Every wait is a bounded poll on a condition the page shows; nothing asserts on time.
use std::future::Future;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};

mod common;
use common::{count, people_job, sqlite};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The longest any condition is waited for; a wait that ends there fails, naming the condition.
const PATIENCE: Duration = Duration::from_secs(90);
const TOKEN: &str = "a-dashboard-test-token-of-some-length";

/// A child process of this test, killed (by its own id) when the test ends however it ends.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `check` until it holds; fails naming `what` if it never does within [`PATIENCE`].
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "waited {PATIENCE:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The text of the first element matching `css`, or "" while there is none (pages redraw).
async fn text(c: &Client, css: &str) -> String {
    match c.find(Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The filter and page the errors page shows (`?category=...#page`), "" before it shows one.
async fn shown_query(c: &Client) -> String {
    match c.find(Locator::Css("#errors-table")).await {
        Ok(e) => e.attr("data-query").await.ok().flatten().unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn click(c: &Client, css: &str) {
    let what = format!("{css} to be clickable");
    until(&what, || async move {
        match c.find(Locator::Css(css)).await {
            Ok(e) => e.click().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

/// A WebDriver session on a fresh headless chromium, with the flags it needs here: as root,
/// offline, and without the background work that stalls it when the network is closed.
async fn browser(driver_port: u16, profile: &Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ]
    .iter()
    .map(|a| a.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let caps = json!({ "browserName": "chrome", "goog:chromeOptions": { "binary": CHROMIUM, "args": args } });
    let caps = caps.as_object().unwrap().clone();
    let url = format!("http://127.0.0.1:{driver_port}");
    let deadline = Instant::now() + PATIENCE;
    // chromedriver takes a moment to listen: connect until it answers.
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let why = match ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
            Ok(c) => return c,
            Err(e) => e.to_string(),
        };
        assert!(Instant::now() < deadline, "no WebDriver session from {CHROMEDRIVER} on {url}: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_filters_retries_and_pauses_in_the_browser() {
    for tool in [CHROMIUM, CHROMEDRIVER] {
        assert!(Path::new(tool).exists(), "{tool} is missing: ./scripts/test installs chromium and chromium-driver");
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    sqlite(&a, "CREATE TABLE people (id TEXT PRIMARY KEY, name TEXT)");
    // The target app refuses some records (a rule of its own), until the operator fixes it.
    sqlite(
        &b,
        "CREATE TABLE contacts (contact_id TEXT PRIMARY KEY, fullname TEXT);
         CREATE TRIGGER refuse BEFORE INSERT ON contacts WHEN NEW.contact_id LIKE 'r%'
         BEGIN SELECT RAISE(ABORT, 'refused by the app''s rule'); END;",
    );
    let job = people_job(dir.path());
    let port = free_port();
    let _runner = Owned(
        Command::new(env!("CARGO_BIN_EXE_dualsync"))
            .arg("--data-dir")
            .arg(dir.path().join("state"))
            .args(["run", "--admin-addr", &format!("127.0.0.1:{port}"), "--config"])
            .arg(&job)
            .env("DUALSYNC_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let driver_port = free_port();
    let _driver = Owned(
        Command::new(CHROMEDRIVER)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = browser(driver_port, &dir.path().join("chromium-profile")).await;
    // The steps run as their own task so that the browser session is closed (and chromium with
    // it) whatever they end with; a failure is then raised again.
    let steps = {
        let c = c.clone();
        tokio::spawn(async move { operator(&c, port, &a, &b).await })
    };
    let outcome = steps.await;
    if outcome.is_err() {
        // What the page showed when a step failed.
        let shown = c.find(Locator::Css("body")).await.unwrap().text().await.unwrap_or_default();
        eprintln!("the page showed:\n{shown}");
    }
    c.close().await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn operator(c: &Client, port: u16, a: &Path, b: &Path) {
    until("the runner to install capture", || async move {
        count(a, "SELECT count(*) FROM sqlite_master WHERE name = '_dualsync_changes'") > 0
    })
    .await;
    sqlite(
        a,
        "INSERT INTO people (id, name) VALUES ('p1', 'Ada');
         INSERT INTO people (id, name) VALUES ('r1', 'Refused one');
         INSERT INTO people (id, name) VALUES ('r2', 'Refused two');
         INSERT INTO people (id, name) VALUES ('r3', 'Refused three');",
    );

    // Log in: the token is asked for once, and kept for the session.
    c.goto(&format!("http://127.0.0.1:{port}/")).await.unwrap();
    c.find(Locator::Css("#token")).await.unwrap().send_keys("not-the-token").await.unwrap();
    click(c, "#login").await;
    until(
        "the wrong token to be refused",
        || async move { text(c, "#login-error").await.contains("wrong bearer token") },
    )
    .await;
    c.find(Locator::Css("#token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    click(c, "#login").await;
    until("the job to show as active", || async move { text(c, "[data-job-status='people']").await == "active" }).await;
    let stored = c.execute("return sessionStorage.getItem('dualsync.token')", vec![]).await.unwrap();
    assert_eq!(stored, json!(TOKEN), "the token is kept in the session");
    assert!(!c.current_url().await.unwrap().as_str().contains(TOKEN), "the token is never in a URL");
    // The job page counts the refusals (it refreshes by itself).
    until("three application errors on the job page", || async move {
        text(c, "[data-count='application']").await == "application: 3"
    })
    .await;
    assert_eq!(count(b, "SELECT count(*) FROM contacts WHERE contact_id = 'p1'"), 1);

    // The target is fixed; the operator filters the errors and retries what the filter selects.
    sqlite(b, "DROP TRIGGER refuse");
    click(c, "#nav-errors").await;
    until("the error filters", || async move { c.find(Locator::Css("#f-category")).await.is_ok() }).await;
    c.find(Locator::Css("#f-category")).await.unwrap().select_by_value("application").await.unwrap();
    c.find(Locator::Css("#f-app")).await.unwrap().select_by_value("a").await.unwrap();
    click(c, "#f-apply").await;
    until("the filtered page", || async move {
        shown_query(c).await == "?app=a&category=application#0" && text(c, "#match-count").await == "3 rows match"
    })
    .await;
    let rows = c.find_all(Locator::Css("#errors-table tr[data-error]")).await.unwrap();
    assert_eq!(rows.len(), 3);
    rows[0].click().await.unwrap();
    until("a row's details", || async move { text(c, "#error-detail").await.contains("refused by a trigger") }).await;
    // A filter that selects nothing says so before anything is sent.
    c.find(Locator::Css("#f-category")).await.unwrap().select_by_value("system").await.unwrap();
    click(c, "#f-apply").await;
    until("no rows to match", || async move {
        shown_query(c).await == "?app=a&category=system#0" && text(c, "#match-count").await == "0 rows match"
    })
    .await;
    click(c, "#retry-selection").await;
    until("the empty selection to be named", || async move {
        text(c, "#request-problems").await.contains("No open errors match the filter")
    })
    .await;
    click(c, "#confirm-request").await;
    until("the refusal in plain words", || async move {
        text(c, "#request-result").await.contains("Refused: no open errors of job 'people' match the filter")
    })
    .await;

    c.find(Locator::Css("#f-category")).await.unwrap().select_by_value("application").await.unwrap();
    click(c, "#f-apply").await;
    until("3 rows to match again", || async move {
        shown_query(c).await == "?app=a&category=application#0" && text(c, "#match-count").await == "3 rows match"
    })
    .await;
    click(c, "#retry-selection").await;
    until("the count before the retry", || async move {
        text(c, "#request-preview").await.contains("selects 3 open errors")
    })
    .await;
    click(c, "#confirm-request").await;
    until("the request to be queued", || async move { text(c, "#request-result").await.contains("queued: 3 rows") })
        .await;

    // The request runs; its page follows it to the end.
    click(c, "#nav-requests").await;
    until("the retry to finish with 3 synced", || async move {
        text(c, "[data-request-status]").await == "done"
            && text(c, "[data-settled]").await == "final"
            && text(c, "[data-succeeded]").await == "3"
    })
    .await;
    assert_eq!(count(b, "SELECT count(*) FROM contacts WHERE contact_id LIKE 'r%'"), 3, "the retried records");

    // The charts draw the job's metrics: records synced by the minute, and the three refusals.
    click(c, "#nav-charts").await;
    until("records synced on the chart", || async move {
        c.find_all(Locator::Css("#delivered-chart rect")).await.is_ok_and(|bars| !bars.is_empty())
            && c.find_all(Locator::Css("#errors-chart rect")).await.is_ok_and(|bars| !bars.is_empty())
    })
    .await;

    // Pause and resume from the job page: a change made while paused waits, then arrives.
    click(c, "#nav-jobs").await;
    until("the delivery lag on the job page", || async move {
        text(c, "[data-lag='people']").await.starts_with("p50 ≤ ")
    })
    .await;
    // What is queued: the pipeline's queues, shown once for every job, each step's with its
    // dead-letter queue; the retried records are delivered, so nothing waits.
    assert_eq!(text(c, "#pipeline-queues h3").await, "Pipeline queues (shared by every job)");
    until("the pipeline's queues to show empty", || async move {
        let mut cells = Vec::new();
        for step in ["capture", "sequence", "deliver", "reconcile"] {
            cells.push(text(c, &format!("[data-queue-depth='{step}']")).await);
            cells.push(text(c, &format!("[data-dead-letter-depth='{step}']")).await);
        }
        cells.iter().all(|t| t == "0 visible / 0 in flight")
    })
    .await;
    click(c, "button[data-action='pause'][data-job='people']").await;
    until("the job to show as paused", || async move { text(c, "[data-job-status='people']").await == "paused" }).await;
    sqlite(a, "INSERT INTO people (id, name) VALUES ('p2', 'Grace')");
    until("the change to be kept while paused", || async move {
        text(c, "[data-job-card='people']").await.contains("1 delivery(ies) kept")
    })
    .await;
    assert_eq!(count(b, "SELECT count(*) FROM contacts WHERE contact_id = 'p2'"), 0, "delivered while paused");
    click(c, "button[data-action='resume'][data-job='people']").await;
    until("the job to show as active again", || async move { text(c, "[data-job-status='people']").await == "active" })
        .await;
    until("the kept change to arrive", || async move {
        count(b, "SELECT count(*) FROM contacts WHERE contact_id = 'p2'") == 1
    })
    .await;
}
