//! Error management on both backends: the same test bodies run on the embedded runner and on
//! the Lambda handlers over moto server (started by `./scripts/test`). Error rows and repeats,
//! queries and stable paging, counts, retry and dismiss requests with their limits, refusals and
//! progress, pause and resume, the alert rule, dead letters and their redrive, and the admin API
//! over each backend.
#[macro_use]
mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{create_apps, emulator, Backend, FaultyRegistry};
use dualsync::adapters::aws::{bootstrap, Names, Usage};
use dualsync::adapters::embedded::EmbeddedDb;
use dualsync::admin::{Admin, AdminError, Redrive};
use dualsync::domain::errors::{DeadLetterStatus, ErrorCategory, ErrorStatus, SyncError};
use dualsync::domain::job::{AlertRule, JobStatus, Side};
use dualsync::domain::keys;
use dualsync::domain::requests::{RequestAction, RequestStatus, MAX_REQUEST_RECORDS};
use dualsync::ports::{Expect, ManualClock, OutMessage, Put};
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::{ErrorFilter, State};
use dualsync::steps::{Backoff, Failpoints};
use dualsync_lambda::stack::Stack;

enum Pipeline {
    Local { rt: LocalRuntime, clock: ManualClock },
    Aws { stack: Arc<Stack> },
}

struct H {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    pipeline: Pipeline,
    admin: Admin,
    /// On AWS: the table, for [`H::load`].
    table: Option<(aws_sdk_dynamodb::Client, String)>,
}

async fn harness(backend: Backend, alert: Option<AlertRule>) -> H {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    let mut def = create_apps(&a, &b);
    def.alert = alert;
    let (apps, _) = FaultyRegistry::fresh();
    let (pipeline, admin, table) = match backend {
        Backend::Local => {
            let clock = ManualClock::new(1_700_000_000_000);
            let db = EmbeddedDb::open_in_memory(Arc::new(clock.clone())).unwrap();
            let rt = LocalRuntime::with_registry(db, Arc::new(clock.clone()), Failpoints::default(), apps);
            let admin = rt.admin();
            (Pipeline::Local { rt, clock }, admin, None)
        }
        Backend::Aws => {
            let sdk = emulator().await;
            let names = Names::new(&format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
            let resources = bootstrap(&sdk, &names).await.expect("bootstrap");
            let usage = Arc::new(Usage::default());
            let stack = Arc::new(Stack::with_apps(&sdk, &resources, usage.clone(), apps).with_backoff(Backoff::QUICK));
            let table = (aws_sdk_dynamodb::Client::new(&sdk), resources.table.clone());
            (Pipeline::Aws { stack }, resources.admin(&sdk, usage), Some(table))
        }
    };
    admin.state.apply_job(def).await.unwrap();
    let h = H { _dir: dir, a, b, pipeline, admin, table };
    match &h.pipeline {
        Pipeline::Local { rt, .. } => rt.start("j").await.unwrap(),
        Pipeline::Aws { stack } => stack.start("j").await.unwrap(),
    }
    h
}

impl H {
    fn state(&self) -> &State {
        &self.admin.state
    }

    /// Lets a little time pass, so that rows recorded next are seen later.
    async fn tick(&self) {
        match &self.pipeline {
            Pipeline::Local { clock, .. } => clock.advance(10),
            Pipeline::Aws { .. } => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }

    async fn start(&self, job: &str) {
        match &self.pipeline {
            Pipeline::Local { rt, .. } => rt.start(job).await.unwrap(),
            Pipeline::Aws { stack } => stack.start(job).await.unwrap(),
        }
    }

    fn exec(&self, side: Side, sql: &str) {
        common::exec(if side == Side::A { &self.a } else { &self.b }, sql)
    }

    fn count(&self, side: Side, sql: &str) -> i64 {
        common::query(if side == Side::A { &self.a } else { &self.b }, sql)
    }

    /// Every step until nothing moves.
    async fn drain(&self) {
        match &self.pipeline {
            Pipeline::Local { rt, clock } => {
                for _ in 0..100 {
                    while rt.pump().await.unwrap() > 0 {}
                    if rt.is_idle().await.unwrap() {
                        return;
                    }
                    clock.advance(301_000);
                }
                panic!("pipeline did not drain");
            }
            Pipeline::Aws { stack } => {
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let moved = stack.pump_feeds(1000).await.unwrap();
                    let handled = stack.poll_round().await.unwrap().len();
                    if moved + handled == 0 {
                        if stack.is_idle().await.unwrap() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    assert!(Instant::now() < deadline, "the stack did not drain in two minutes");
                }
            }
        }
    }

    async fn rows(&self, filter: ErrorFilter) -> Vec<SyncError> {
        self.state().error_rows("j", &filter).await.unwrap().into_iter().map(|(_, e)| e).collect()
    }

    async fn status(&self) -> JobStatus {
        self.state().job_record("j").await.unwrap().0.status
    }

    /// `n` children of a parent that exists in neither app: `n` missing references.
    async fn orphans(&self, parent: &str, n: usize) {
        let values: Vec<String> = (1..=n).map(|i| format!("('{parent}', {i}, 'c')")).collect();
        self.exec(Side::A, &format!("INSERT INTO children (pid, cno, label) VALUES {}", values.join(", ")));
        self.drain().await;
    }

    /// Writes new items straight into the store, as its `put` would (revision 1). On AWS in
    /// batches of 25: moto server answers about a hundred writes a second, and ten thousand
    /// of them one by one took this test's two minutes.
    async fn load(&self, puts: Vec<Put>) {
        use aws_sdk_dynamodb::types::{AttributeValue as V, PutRequest, WriteRequest};
        let Some((client, table)) = &self.table else {
            for chunk in puts.chunks(1000) {
                for r in self.state().kv().put_many(chunk.to_vec()).await.unwrap() {
                    r.unwrap();
                }
            }
            return;
        };
        for chunk in puts.chunks(25) {
            let mut writes: Vec<WriteRequest> = chunk
                .iter()
                .map(|p| {
                    let item = [
                        ("pk", V::S(p.pk.clone())),
                        ("sk", V::S(p.sk.clone())),
                        ("body", V::S(p.body.to_string())),
                        ("rev", V::N("1".into())),
                    ];
                    let item = item.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    WriteRequest::builder()
                        .put_request(PutRequest::builder().set_item(Some(item)).build().unwrap())
                        .build()
                })
                .collect();
            while !writes.is_empty() {
                let out = client.batch_write_item().request_items(table, writes).send().await.unwrap();
                writes = out.unprocessed_items.and_then(|mut u| u.remove(table)).unwrap_or_default();
            }
        }
    }

    async fn submit(&self, action: RequestAction, filter: ErrorFilter) -> Result<String, String> {
        match self.admin.submit("j", action, filter).await {
            Ok(r) => Ok(r.id),
            Err(AdminError::Refused(m)) => Err(m),
            Err(e) => panic!("not a refusal: {e:?}"),
        }
    }
}

fn application() -> ErrorFilter {
    ErrorFilter { category: Some(ErrorCategory::Application), ..Default::default() }
}

on_both_backends!(
    rows_repeat_filter_page_and_count,
    a_retry_syncs_the_latest_and_reports_progress,
    a_row_whose_record_is_gone_from_both_sides_is_closed,
    dismiss_is_permanent,
    requests_need_an_active_job,
    requests_queue_up_to_five_and_run_in_order,
    a_request_stored_but_never_queued_does_not_hold_its_place,
    a_request_selects_at_most_ten_thousand_records,
    pause_keeps_changes_and_resume_delivers_them_in_order,
    the_alert_rule_pauses_the_job,
    conflicts_stay_out_of_the_error_list,
    the_admin_api_serves_the_backend,
    dead_letters_are_listed_shown_and_redriven,
    metrics_count_what_the_pipeline_did,
);

async fn rows_repeat_filter_page_and_count(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 7).await;
    let rows = h.rows(ErrorFilter::default()).await;
    assert_eq!(rows.len(), 7, "{rows:#?}");
    for r in &rows {
        assert_eq!(
            (r.category, r.status, r.attempts, r.retriable),
            (ErrorCategory::Application, ErrorStatus::Open, 1, true)
        );
        assert_eq!((r.map.as_str(), r.entity.as_str(), r.app.as_str()), ("children", "children", "a"));
        assert!(r.message.starts_with("missing reference: parents/p9"), "{}", r.message);
        assert_eq!(h.admin.error("j", &r.id).await.unwrap(), *r);
    }
    // A repeat of the same link and cause raises attempts on the same row.
    h.exec(Side::A, "UPDATE children SET label = 'c2' WHERE cno = 1");
    h.drain().await;
    let rows = h.rows(ErrorFilter::default()).await;
    assert_eq!(rows.len(), 7);
    assert_eq!(rows.iter().map(|r| r.attempts).max(), Some(2));

    // Filters: entity (map or entity name), data source, category, status, time range.
    let by = |f: ErrorFilter| async { h.rows(f).await.len() };
    assert_eq!(by(ErrorFilter { entity: Some("children".into()), ..Default::default() }).await, 7);
    assert_eq!(
        by(ErrorFilter { entity: Some("children".into()), app: Some("a".into()), ..Default::default() }).await,
        7
    );
    assert_eq!(by(ErrorFilter { entity: Some("parents".into()), ..Default::default() }).await, 0);
    assert_eq!(by(ErrorFilter { app: Some("b".into()), ..Default::default() }).await, 0);
    assert_eq!(by(ErrorFilter { category: Some(ErrorCategory::System), ..Default::default() }).await, 0);
    assert_eq!(by(ErrorFilter { status: Some(ErrorStatus::Resolved), ..Default::default() }).await, 0);
    let first = rows.iter().map(|r| r.first_seen_ms).min().unwrap();
    assert_eq!(by(ErrorFilter { to_ms: Some(first), ..Default::default() }).await, 0);
    assert_eq!(by(ErrorFilter { from_ms: Some(first), ..Default::default() }).await, 7);

    // Stable paging: pages of 3 see every row once, in time order.
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = h.admin.errors("j", &ErrorFilter::default(), 3, after.as_deref()).await.unwrap();
        assert!(page.items.len() <= 3);
        seen.extend(page.items.iter().map(|r| r.id.clone()));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
    assert_eq!(seen, ids);
    assert!(matches!(h.admin.errors("j", &ErrorFilter::default(), 0, None).await, Err(AdminError::BadRequest(_))));

    let counts = h.admin.counts("j", &ErrorFilter::default()).await.unwrap();
    assert_eq!(counts.total, 7);
    assert_eq!(counts.by_category.get(&ErrorCategory::Application), Some(&7));
    assert_eq!(counts.by_status.get(&ErrorStatus::Open), Some(&7));
    assert!(matches!(h.admin.error("j", "1-nope").await, Err(AdminError::NotFound(_))));
    assert!(matches!(h.admin.counts("nojob", &ErrorFilter::default()).await, Err(AdminError::NotFound(_))));
}

async fn a_retry_syncs_the_latest_and_reports_progress(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 3).await;
    // Still missing: the retry fails again; rows open, attempts raised.
    let id = h.submit(RequestAction::Retry, application()).await.unwrap();
    h.drain().await;
    let r = h.admin.request("j", &id).await.unwrap();
    assert_eq!(r.status, RequestStatus::Done);
    assert_eq!((r.progress.selected, r.progress.done, r.progress.succeeded, r.progress.still_failing), (3, 3, 0, 3));
    assert!(h.rows(ErrorFilter::default()).await.iter().all(|r| r.status == ErrorStatus::Open && r.attempts == 2));

    // The parent arrives: the children waiting for it go again by themselves, and their rows
    // are resolved; nothing is left for an operator to retry.
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p9', 'n', 'X', 'small')");
    h.drain().await;
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM items WHERE owner_id = 'p9'"), 3);
    assert!(h.rows(ErrorFilter::default()).await.iter().all(|r| r.status == ErrorStatus::Resolved));
    let refused = h.submit(RequestAction::Retry, application()).await.unwrap_err();
    assert_eq!(refused, "no open errors of job 'j' match the filter");
    let r = h.admin.request("j", &id).await.unwrap();
    assert!(r.settled);
    let list = h.admin.requests("j").await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0], r);
}

async fn a_row_whose_record_is_gone_from_both_sides_is_closed(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 1).await;
    assert_eq!(h.rows(application()).await[0].status, ErrorStatus::Open);
    // The record is deleted at its source (a delete takes the live path): it exists nowhere now,
    // and its row can never sync. It is closed with that reason, and nothing is left to retry.
    h.exec(Side::A, "DELETE FROM children WHERE pid = 'p9'");
    h.drain().await;
    let rows = h.rows(application()).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, ErrorStatus::Resolved, "{rows:#?}");
    assert!(rows[0].message.contains("no longer exists on either side"), "{}", rows[0].message);
    let refused = h.submit(RequestAction::Retry, ErrorFilter::default()).await.unwrap_err();
    assert_eq!(refused, "no open errors of job 'j' match the filter");
}

async fn dismiss_is_permanent(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 2).await;
    let id = h.submit(RequestAction::Dismiss, application()).await.unwrap();
    h.drain().await;
    let r = h.admin.request("j", &id).await.unwrap();
    assert_eq!((r.status, r.progress.selected, r.progress.done), (RequestStatus::Done, 2, 2));
    let rows = h.rows(ErrorFilter::default()).await;
    assert!(rows.iter().all(|r| r.status == ErrorStatus::Dismissed), "{rows:#?}");
    // Nothing open is left to retry, and a dismissed row never comes back.
    let refused = h.submit(RequestAction::Retry, ErrorFilter::default()).await.unwrap_err();
    assert_eq!(refused, "no open errors of job 'j' match the filter");
    h.exec(Side::A, "UPDATE children SET label = 'again' WHERE cno = 1");
    h.drain().await;
    let rows = h.rows(ErrorFilter::default()).await;
    assert_eq!(rows.len(), 3);
    assert_eq!(rows.iter().filter(|r| r.status == ErrorStatus::Dismissed).count(), 2);
    let new = rows.iter().find(|r| r.status == ErrorStatus::Open).unwrap();
    assert_eq!(new.attempts, 1);
}

async fn requests_need_an_active_job(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 1).await;
    h.admin.pause("j").await.unwrap();
    let m = h.submit(RequestAction::Retry, ErrorFilter::default()).await.unwrap_err();
    assert_eq!(m, "job 'j' is paused: retry and dismiss requests are taken only while it is active");
    h.admin.resume("j").await.unwrap();
    // Queued while active, but the job stopped before its turn: refused, with the reason.
    let id = h.submit(RequestAction::Dismiss, ErrorFilter::default()).await.unwrap();
    h.state().transition("j", dualsync::domain::job::JobAction::Stop).await.unwrap();
    h.drain().await;
    let r = h.admin.request("j", &id).await.unwrap();
    assert_eq!(r.status, RequestStatus::Refused);
    assert!(r.reason.as_deref().unwrap().contains("was stopping"), "{r:?}");
    assert_eq!(h.rows(ErrorFilter::default()).await[0].status, ErrorStatus::Open);
    let m = h.submit(RequestAction::Dismiss, ErrorFilter::default()).await.unwrap_err();
    assert!(m.starts_with("job 'j' is stopping:"), "{m}");
    assert!(matches!(
        h.admin.submit("nojob", RequestAction::Retry, ErrorFilter::default()).await,
        Err(AdminError::NotFound(_))
    ));
}

async fn requests_queue_up_to_five_and_run_in_order(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p8", 2).await;
    h.tick().await;
    h.orphans("p9", 2).await;
    // First a dismiss of the two older rows, then retries of everything: run in order of
    // creation, the retries find only the two rows the dismiss left.
    let first = ErrorFilter { entity: Some("children".into()), ..Default::default() };
    let rows = h.rows(ErrorFilter::default()).await;
    let two = ErrorFilter { to_ms: Some(rows[2].first_seen_ms), ..first.clone() };
    let two_n = h.rows(two.clone()).await.len();
    assert_eq!(two_n, 2);
    let mut ids = vec![h.submit(RequestAction::Dismiss, two).await.unwrap()];
    for _ in 0..4 {
        ids.push(h.submit(RequestAction::Retry, first.clone()).await.unwrap());
    }
    let m = h.submit(RequestAction::Retry, first.clone()).await.unwrap_err();
    assert_eq!(m, "job 'j' already has 5 requests queued: wait for one to finish (see `dualsync requests list j`)");
    assert_eq!(h.admin.job("j").await.unwrap().requests_queued, 5);
    h.drain().await;
    let list = h.admin.requests("j").await.unwrap();
    assert_eq!(list.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids);
    assert!(list.iter().all(|r| r.status == RequestStatus::Done), "{list:#?}");
    assert_eq!(list[0].progress.done, two_n);
    assert_eq!(list[1].progress.selected, 4 - two_n);
    // Places are free again.
    assert_eq!(h.admin.job("j").await.unwrap().requests_queued, 0);
    h.submit(RequestAction::Retry, first).await.unwrap();
}

/// An admin that dies between storing a request (which takes a place) and queueing it must not
/// leave the place taken for good: the request is queued by a later call and runs.
async fn a_request_stored_but_never_queued_does_not_hold_its_place(backend: Backend) {
    let h = harness(backend, None).await;
    h.orphans("p9", 2).await;
    // Five requests stored ten minutes ago by an admin that crashed before each send.
    let then = ManualClock::new(h.state().now_ms() - 10 * 60_000);
    let crashed = State::new(h.state().kv().clone(), Arc::new(then));
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(crashed.create_request("j", RequestAction::Retry, application()).await.unwrap().id);
    }
    assert_eq!(h.admin.job("j").await.unwrap().requests_queued, 5);
    h.drain().await;
    let list = h.admin.requests("j").await.unwrap();
    assert_eq!(list.iter().map(|r| r.id.clone()).collect::<Vec<_>>(), ids);
    assert!(list.iter().all(|r| r.status == RequestStatus::Done), "{list:#?}");
    assert_eq!(h.admin.job("j").await.unwrap().requests_queued, 0);
    h.submit(RequestAction::Retry, application()).await.unwrap();
}

async fn a_request_selects_at_most_ten_thousand_records(backend: Backend) {
    let h = harness(backend, None).await;
    // Rows written straight into the table: 10,001 open application errors, a ms apart.
    let t0 = h.state().now_ms() - 20_000;
    let puts: Vec<Put> = (0..=MAX_REQUEST_RECORDS as i64)
        .map(|i| {
            let id = keys::error_id(t0 + i, &format!("r{i}"));
            let row = SyncError {
                id: id.clone(),
                job: "j".into(),
                map: "children".into(),
                entity: "children".into(),
                app: "a".into(),
                source: Side::A,
                key: dualsync::domain::change::Key(vec![format!("p{i}"), "1".into()]),
                seq: 1,
                txid: "t".into(),
                category: ErrorCategory::Application,
                message: "missing reference".into(),
                retriable: true,
                attempts: 1,
                first_seen_ms: t0 + i,
                last_seen_ms: t0 + i,
                status: ErrorStatus::Open,
                request: None,
                delete: false,
            };
            Put {
                pk: keys::errors_pk("j"),
                sk: keys::error_sk(&id).unwrap(),
                body: serde_json::to_value(&row).unwrap(),
                expires_at: None,
                expect: Expect::Any,
            }
        })
        .collect();
    h.load(puts).await;
    let m = h.submit(RequestAction::Dismiss, ErrorFilter::default()).await.unwrap_err();
    assert!(m.starts_with("the filter selects 10001 errors; a request takes at most 10000: narrow it"), "{m}");
    // Narrowed by time: exactly 10,000 is taken.
    let id =
        h.submit(RequestAction::Dismiss, ErrorFilter { to_ms: Some(t0 + 10_000), ..Default::default() }).await.unwrap();
    assert_eq!(h.admin.request("j", &id).await.unwrap().progress.selected, MAX_REQUEST_RECORDS);
}

async fn pause_keeps_changes_and_resume_delivers_them_in_order(backend: Backend) {
    let h = harness(backend, None).await;
    let view = h.admin.pause("j").await.unwrap();
    assert_eq!((view.status, view.paused_reason.as_deref()), (JobStatus::Paused, Some("paused by an operator")));
    match h.admin.pause("j").await {
        Err(AdminError::Refused(m)) => assert_eq!(m, "job 'j' is paused: cannot pause it (allowed from active)"),
        other => panic!("{other:?}"),
    }
    // Changed while paused: captured and sequenced, then kept by delivery.
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small'); INSERT INTO children (pid, cno, label) VALUES ('p1', 1, 'c')");
    h.exec(Side::A, "UPDATE children SET label = 'c2' WHERE pid = 'p1'");
    h.drain().await;
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM owners") + h.count(Side::B, "SELECT count(*) FROM items"), 0);
    assert!(!h.state().parked("j", 10).await.unwrap().is_empty());

    let (view, handed_back) = h.admin.resume("j").await.unwrap();
    assert_eq!((view.status, view.paused_reason), (JobStatus::Active, None));
    assert!(handed_back >= 1);
    h.drain().await;
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM items WHERE caption = 'c2'"), 1);
    assert!(h.rows(ErrorFilter::default()).await.is_empty(), "{:#?}", h.rows(ErrorFilter::default()).await);
    // The parent was written before its child.
    let first =
        |entity: &str| h.count(Side::B, &format!("SELECT min(seq) FROM _dualsync_changes WHERE entity = '{entity}'"));
    assert!(first("owners") < first("items"));
    assert!(h.state().parked("j", 10).await.unwrap().is_empty());
    match h.admin.resume("j").await {
        Err(AdminError::Refused(m)) => assert_eq!(m, "job 'j' is active: cannot resume it (allowed from paused)"),
        other => panic!("{other:?}"),
    }
    // A resume cut short (the job left `resuming`) is finished by resuming again; a paused job
    // can also be stopped.
    h.admin.pause("j").await.unwrap();
    h.state().transition("j", dualsync::domain::job::JobAction::Resume).await.unwrap();
    assert_eq!(h.status().await, JobStatus::Resuming);
    assert_eq!(h.admin.resume("j").await.unwrap().0.status, JobStatus::Active);
    h.admin.pause("j").await.unwrap();
    h.state().transition("j", dualsync::domain::job::JobAction::Stop).await.unwrap();
    assert_eq!(h.status().await, JobStatus::Stopping);
}

async fn the_alert_rule_pauses_the_job(backend: Backend) {
    let h = harness(backend, Some(AlertRule { application_errors: 3, minutes: 10 })).await;
    // Children waiting for a parent that has not synced do not count (they may mend).
    h.orphans("p8", 4).await;
    assert_eq!(h.status().await, JobStatus::Active);
    // Values the value map has no entry for do.
    let unmapped = |ids: &[&str]| {
        let rows: Vec<String> = ids.iter().map(|id| format!("('{id}', 'n', 'X', 'medium')")).collect();
        format!("INSERT INTO parents (pid, name, co, kind) VALUES {}", rows.join(", "))
    };
    h.exec(Side::A, &unmapped(&["u1", "u2"]));
    h.drain().await;
    assert_eq!(h.status().await, JobStatus::Active);
    h.exec(Side::A, &unmapped(&["u3"]));
    h.drain().await;
    let view = h.admin.job("j").await.unwrap();
    assert_eq!(view.status, JobStatus::Paused);
    let reason = view.paused_reason.unwrap();
    assert!(reason.starts_with("alert rule: 3 application errors in the last 10 minutes"), "{reason}");
    assert_eq!(view.alert, Some(AlertRule { application_errors: 3, minutes: 10 }));
    // Paused: a new change waits.
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')");
    h.drain().await;
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM owners"), 0);
    h.admin.resume("j").await.unwrap();
    h.drain().await;
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM owners"), 1);
}

async fn conflicts_stay_out_of_the_error_list(backend: Backend) {
    let h = harness(backend, None).await;
    h.exec(Side::A, "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')");
    h.drain().await;
    h.exec(Side::A, "UPDATE parents SET name = 'from a' WHERE pid = 'p1'");
    h.exec(Side::B, "UPDATE owners SET title = 'from b' WHERE owner_id = 'p1'");
    h.drain().await;
    let conflicts = h.admin.conflicts("j", 10, None).await.unwrap().items;
    assert_eq!(conflicts.len(), 1, "{conflicts:#?}");
    assert_eq!(conflicts[0].winner, "a");
    assert!(h.rows(ErrorFilter::default()).await.iter().all(|r| r.category != ErrorCategory::Conflict));
    assert_eq!(h.count(Side::B, "SELECT count(*) FROM owners WHERE title = 'from a'"), 1);
}

async fn the_admin_api_serves_the_backend(backend: Backend) {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;
    let h = harness(backend, None).await;
    h.orphans("p9", 2).await;
    let api = dualsync_admin::router(Arc::new(h.admin.clone()));
    let call = |method: &str, path: &str, body: &str| {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let api = api.clone();
        async move {
            let answer = api.oneshot(request).await.unwrap();
            let status = answer.status();
            let bytes = axum::body::to_bytes(answer.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice::<serde_json::Value>(&bytes).unwrap())
        }
    };
    let (status, job) = call("GET", "/jobs/j", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((job["status"].as_str(), job["errors"]["total"].as_u64()), (Some("active"), Some(2)));
    let (status, page) = call("GET", "/jobs/j/errors?category=application&limit=1", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(page["next"].is_string());
    let (status, request) =
        call("POST", "/jobs/j/requests", r#"{"action":"dismiss","filter":{"category":"application"}}"#).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{request}");
    h.drain().await;
    let path = format!("/jobs/j/requests/{}", request["id"].as_str().unwrap());
    let (_, request) = call("GET", &path, "").await;
    assert_eq!((request["status"].as_str(), request["progress"]["done"].as_u64()), (Some("done"), Some(2)));
    let (status, refused) = call("POST", "/jobs/j/requests", r#"{"action":"retry"}"#).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"], "no open errors of job 'j' match the filter");
    let (status, _) = call("POST", "/jobs/j/pause", "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, refused) = call("POST", "/jobs/j/pause", "").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(refused["error"], "job 'j' is paused: cannot pause it (allowed from active)");
}

async fn dead_letters_are_listed_shown_and_redriven(backend: Backend) {
    let h = harness(backend, None).await;
    // A second job's apps, with a record in the first; the job itself does not exist yet.
    let (a2, b2) = (h._dir.path().join("a2.db"), h._dir.path().join("b2.db"));
    let mut late = create_apps(&a2, &b2);
    late.job = "late".into();
    rusqlite::Connection::open(&a2)
        .unwrap()
        .execute_batch("INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small')")
        .unwrap();
    let [capture, _, deliver, _] = &h.admin.dead_letter_queues[..] else { panic!("four queues") };
    let change = serde_json::json!({
        "job": "late", "app": "a", "txid": "tx-late",
        "changes": [{ "app": "a", "entity": "parents", "key": ["p1"], "op": "upsert", "seq": 1, "at_ms": 0, "company": "X" }]
    });
    capture.work.send(vec![OutMessage::standard(change.to_string())]).await.unwrap();
    h.drain().await;
    h.tick().await;
    capture.work.send(vec![OutMessage::standard("{not json".into())]).await.unwrap();
    // A FIFO one too: it goes back in its group.
    deliver.work.send(vec![OutMessage::fifo("{bad".into(), "g1".into(), "d1".into())]).await.unwrap();
    h.drain().await;

    // Each reached its dead-letter queue with its row; newest first, a page at a time.
    let page = h.admin.dead_letters(Some("capture"), 10, None).await.unwrap();
    assert_eq!(page.items.len(), 2, "{page:#?}");
    let (poison, unknown) = (page.items[0].clone(), page.items[1].clone());
    assert!(poison.reason.starts_with("malformed change notification"), "{poison:?}");
    assert_eq!(poison.job, None);
    assert_eq!((unknown.job.as_deref(), unknown.reason.as_str()), (Some("late"), "unknown job 'late'"));
    assert_eq!(unknown.body, change.to_string());
    for d in &page.items {
        assert_eq!((d.queue.as_str(), d.status, d.receive_count), (capture.work.name(), DeadLetterStatus::Dead, 5));
    }
    assert_eq!(h.admin.dead_letter("capture", &unknown.message_id).await.unwrap(), unknown);
    let all = h.admin.dead_letters(None, 10, None).await.unwrap().items;
    assert_eq!(all.len(), 3, "{all:#?}");
    let on_deliver = all.iter().find(|d| d.queue == deliver.work.name()).unwrap().clone();
    assert!(on_deliver.reason.starts_with("malformed delivery message"), "{on_deliver:?}");
    assert!(all.windows(2).all(|w| w[0].at_ms >= w[1].at_ms), "newest first: {all:#?}");
    let (mut seen, mut after) = (Vec::new(), None);
    loop {
        let page = h.admin.dead_letters(None, 1, after.as_deref()).await.unwrap();
        seen.extend(page.items);
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, all, "pages of one see every row once, newest first");

    // The job exists now: the redriven notification is handled as any other, and its row settles.
    h.admin.state.apply_job(late).await.unwrap();
    h.start("late").await;
    let report = h.admin.redrive("capture", &Redrive::Message(unknown.message_id.clone())).await.unwrap();
    assert_eq!((report.redriven.clone(), report.more), (vec![unknown.message_id.clone()], false));
    h.drain().await;
    assert_eq!(common::query(&b2, "SELECT count(*) FROM owners WHERE owner_id = 'p1'"), 1);
    let settled = h.admin.dead_letter("capture", &unknown.message_id).await.unwrap();
    assert_eq!(settled.status, DeadLetterStatus::Redriven);
    assert!(settled.redriven_ms.is_some_and(|t| t >= unknown.at_ms), "{settled:?}");
    match h.admin.redrive("capture", &Redrive::Message(unknown.message_id.clone())).await {
        Err(AdminError::Refused(m)) => assert!(m.contains("was redriven already"), "{m}"),
        other => panic!("{other:?}"),
    }

    // Still poison: back in the dead-letter queue under a new id, with a new row and its reason.
    let report = h.admin.redrive("capture", &Redrive::Job("late".into())).await.unwrap();
    assert_eq!((report.redriven.len(), report.left), (0, 1), "the poison names no job");
    let report = h.admin.redrive("capture", &Redrive::All).await.unwrap();
    assert_eq!((report.redriven.clone(), report.left), (vec![poison.message_id.clone()], 0));
    let report = h.admin.redrive("deliver", &Redrive::All).await.unwrap();
    assert_eq!(report.redriven, std::slice::from_ref(&on_deliver.message_id));
    h.drain().await;
    let rows = h.admin.dead_letters(None, 10, None).await.unwrap().items;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let dead: Vec<_> = rows.iter().filter(|d| d.status == DeadLetterStatus::Dead).collect();
    assert_eq!(dead.len(), 2, "{rows:#?}");
    for was in [&on_deliver, &poison] {
        let back = dead.iter().find(|d| d.queue == was.queue).unwrap();
        assert_ne!(back.message_id, was.message_id);
        assert_eq!((back.body.as_str(), back.reason.as_str()), (was.body.as_str(), was.reason.as_str()));
        assert!(back.at_ms >= was.at_ms, "{back:?}");
    }
    assert!(matches!(h.admin.dead_letter("capture", "nope").await, Err(AdminError::NotFound(_))));
    assert!(matches!(h.admin.dead_letters(Some("nope"), 10, None).await, Err(AdminError::NotFound(_))));
}

/// The per-job metrics reach the state table from the steps' batches, on both backends (the
/// AWS one through DynamoDB's `UpdateItem ADD`), and agree with what the pipeline did.
async fn metrics_count_what_the_pipeline_did(backend: Backend) {
    let h = harness(backend, None).await;
    h.exec(
        Side::A,
        "INSERT INTO parents (pid, name, co, kind) VALUES ('p1', 'n', 'X', 'small'), ('p2', 'n', 'X', 'small')",
    );
    h.drain().await;
    h.exec(Side::A, "UPDATE parents SET name = 'from a' WHERE pid = 'p1'");
    h.exec(Side::B, "UPDATE owners SET title = 'from b' WHERE owner_id = 'p1'");
    h.drain().await;
    h.orphans("p9", 2).await;
    let capture = &h.admin.dead_letter_queues[0];
    capture.work.send(vec![OutMessage::standard(r#"{"job":"j"}"#.into())]).await.unwrap();
    h.drain().await;

    let m = h.admin.metrics("j", Some(0)).await.unwrap();
    let written = match &h.pipeline {
        Pipeline::Local { rt, .. } => &rt.steps.metrics.written,
        Pipeline::Aws { stack } => &stack.metrics.written,
    };
    let written = dualsync::steps::Metrics::get(written);
    assert!(written >= 3, "two creates and the primary's side of the conflict: {written}");
    assert_eq!(m.totals.delivered, written, "every write reached the table: {m:#?}");
    assert_eq!(m.totals.conflicts, 1, "one conflict, whichever sides saw it: {m:#?}");
    assert_eq!(m.totals.dead_letters, 1, "{m:#?}");
    assert_eq!(m.totals.errors["application"], 2, "the two orphans: {m:#?}");
    assert_eq!(m.totals.throttle_waits, 0);
    let lagged: u64 = m.minutes.iter().filter(|x| x.lag_ms_max.is_some()).map(|x| x.delivered).sum();
    assert_eq!(lagged, written, "every delivery has its lag: {m:#?}");
    assert!(m.minutes.windows(2).all(|w| w[0].at_ms < w[1].at_ms), "oldest first, one entry a minute");
    assert_eq!(m.minutes.iter().map(|x| x.delivered).sum::<u64>(), m.totals.delivered);
}
