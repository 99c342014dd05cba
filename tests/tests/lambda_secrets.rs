//! The Lambda handlers as deployed (issue 10 point 4): apps opened by the AWS registry, an odata
//! app's client secret read from Secrets Manager and another's from SSM Parameter Store (moto
//! server, started by `./scripts/test`), a sync between two authenticated OData test servers
//! through the real steps; a sqlite app refused with a message that says why; and the secret
//! store's cache. And the scheduled tracker, polling Dataverse change tracking.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use common::emulator;
use dualsync::adapters::aws::{
    bootstrap, queue_name, AwsSecrets, Names, Resources, SqsQueue, Usage, MAX_RECEIVE_COUNT,
};
use dualsync::domain::change::{ChangeNotification, Key, Operation, Parts, TransactionNotification};
use dualsync::domain::config::{parse_job, JobDef};
use dualsync::domain::errors::ErrorStatus;
use dualsync::domain::job::{Side, StoredSecret};
use dualsync::ports::{OutMessage, Queue, SecretStore};
use dualsync::state::ErrorFilter;
use dualsync::steps::initial_sync::SyncOptions;
use dualsync::steps::{lifecycle, StepKind};
use dualsync_lambda::poller::{poll_once, sqs_event};
use dualsync_lambda::tracker::{Polled, Tracker};
use dualsync_lambda::{aws_registry, Env, Handler, SenderEnv};
use odata_sample::{Kind, Options, Server};

/// A fresh stage's table and queues on the emulator.
async fn stage(sdk: &aws_config::SdkConfig) -> Resources {
    let names = Names::new(&format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]));
    bootstrap(sdk, &names).await.expect("bootstrap")
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

async fn put_secret(sdk: &aws_config::SdkConfig, name: &str, value: &str) {
    aws_sdk_secretsmanager::Client::new(sdk).create_secret().name(name).secret_string(value).send().await.unwrap();
}

async fn put_parameter(sdk: &aws_config::SdkConfig, name: &str, value: &str) {
    aws_sdk_ssm::Client::new(sdk)
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
        .overwrite(true)
        .send()
        .await
        .unwrap();
}

/// The handler of `step` as a deployed function builds it (`Handler::from_env` does the same
/// over the default AWS settings): the AWS registry, secrets through one cache.
fn handler(step: StepKind, sdk: &aws_config::SdkConfig, r: &Resources) -> Handler {
    let input = match step {
        StepKind::Capture => &r.capture_url,
        StepKind::Sequence => &r.sequence_url,
        StepKind::Deliver => &r.deliver_url,
        StepKind::Reconcile => &r.reconcile_url,
    };
    let env = Env {
        table: r.table.clone(),
        sequence_queue_url: r.sequence_url.clone(),
        deliver_queue_url: r.deliver_url.clone(),
        input_queue_url: input.clone(),
        max_receive_count: MAX_RECEIVE_COUNT,
    };
    Handler::new(step, &env, sdk, aws_registry(sdk), Arc::new(Usage::default()))
}

/// The table and capture queue of a stage, as the ingress and tracker functions read them.
fn sender(r: &Resources) -> SenderEnv {
    SenderEnv { table: r.table.clone(), capture_queue_url: r.capture_url.clone() }
}

/// Applies and starts `def` (odata apps have nothing to install).
async fn start(h: &Handler, def: JobDef) {
    let steps = h.steps();
    let name = def.job.clone();
    steps.state.apply_job(def).await.unwrap();
    lifecycle::start(&steps.state, steps.deliver_queue.as_ref(), &name, |_| Ok(())).await.unwrap();
}

/// Polls the handlers in pipeline order until a round finds every queue empty (no message
/// visible or in flight).
async fn drain(sdk: &aws_config::SdkConfig, r: &Resources, handlers: &[&Handler]) {
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let urls = [&r.capture_url, &r.sequence_url, &r.deliver_url, &r.reconcile_url];
    let queues: Vec<SqsQueue> = urls
        .iter()
        .map(|u| {
            SqsQueue::new(sqs.clone(), queue_name(u), u.to_string(), MAX_RECEIVE_COUNT, Arc::new(Usage::default()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut handled = 0;
        for h in handlers {
            handled += poll_once(h, 10).await.unwrap().map_or(0, |i| i.messages);
        }
        if handled == 0 {
            let mut busy = false;
            for q in &queues {
                busy |= !q.depth().await.unwrap().is_empty();
            }
            if !busy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(Instant::now() < deadline, "the queues did not drain in two minutes");
    }
}

/// A one-change transaction of `app`, as its notifications arrive at the capture queue.
fn notification(job: &str, app: &str, entity: &str, key: &[&str], company: Option<&str>) -> TransactionNotification {
    TransactionNotification {
        job: job.into(),
        app: app.into(),
        txid: unique("tx-"),
        changes: vec![ChangeNotification {
            app: app.into(),
            entity: entity.into(),
            key: Key(key.iter().map(|k| k.to_string()).collect()),
            op: Operation::Upsert,
            seq: 1_000,
            version: None,
            company: company.map(str::to_string),
            at_ms: 1_700_000_000_000,
        }],
        parts: Parts::default(),
    }
}

const JOB: &str = "job: sec
apps:
  - name: fno
    connector: odata
    url: FNO
    flavor: fno
    auth: { kind: client_credentials, token_url: FNO_TOKEN, client_id: fno-client, client_secret: { env: DUALSYNC_TEST_UNSET_SECRET, secrets_manager: FNO_SECRET_ID } }
  - name: dv
    connector: odata
    url: DV
    flavor: dataverse
    auth: { kind: client_credentials, token_url: DV_TOKEN, client_id: dv-client, client_secret: { ssm: DV_PARAMETER } }
primary: fno
table_groups:
  - name: g
    maps:
      - name: customers
        sequence: 1
        entities: { fno: CustomersV3, dv: accounts }
        company: { fno: dataAreaId, dv: msdyn_company }
        keys:
          - { fno: dataAreaId, dv: msdyn_company }
          - { fno: CustomerAccount, dv: accountnumber }
        fields:
          - { fno: Name, dv: name }
          - { fno: CreditLimit, dv: creditlimit }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_handlers_read_odata_secrets_from_secrets_manager_and_ssm_and_sync() {
    let sdk = emulator().await;
    let r = stage(&sdk).await;
    let (fno_secret, dv_secret) = (unique("fno-value-"), unique("dv-value-"));
    let f = Server::start(
        Kind::Fno,
        Options { auth: Some(("fno-client".into(), fno_secret.clone())), ..Default::default() },
    )
    .await;
    f.add_set("CustomersV3", &["dataAreaId", "CustomerAccount"], None);
    let d = Server::start(
        Kind::Dataverse,
        Options { auth: Some(("dv-client".into(), dv_secret.clone())), ..Default::default() },
    )
    .await;
    d.add_set("accounts", &["msdyn_company", "accountnumber"], Some("accountid"));
    for n in 0..12 {
        f.put_raw(
            "CustomersV3",
            &format!(r#"{{"dataAreaId":"usmf","CustomerAccount":"C-{n}","Name":"c{n}","CreditLimit":{n}.25}}"#),
        );
    }
    let (secret_id, parameter) = (unique("dualsync/test/fno-"), format!("/{}", unique("dualsync/test/dv-")));
    put_secret(&sdk, &secret_id, &fno_secret).await;
    put_parameter(&sdk, &parameter, &dv_secret).await;
    let yaml = JOB
        .replace("FNO_TOKEN", &f.token_url)
        .replace("DV_TOKEN", &d.token_url)
        .replace("FNO_SECRET_ID", &secret_id)
        .replace("DV_PARAMETER", &parameter)
        .replace("FNO", &f.url)
        .replace("DV", &d.url);
    let def = parse_job("job.yaml", &yaml).unwrap();

    let capture = handler(StepKind::Capture, &sdk, &r);
    let sequence = handler(StepKind::Sequence, &sdk, &r);
    let deliver = handler(StepKind::Deliver, &sdk, &r);
    start(&capture, def).await;
    // fno's records go to Dataverse: listed from fno with its secret from Secrets Manager,
    // written to Dataverse by the deliver function with its secret from SSM.
    let report = capture.steps().initial_sync("sec", &SyncOptions::new(Side::A).page_size(5), |_| {}).await.unwrap();
    assert_eq!(report.records, 12, "{report:?}");
    drain(&sdk, &r, &[&capture, &sequence, &deliver]).await;
    assert_eq!(d.count("accounts"), 12);
    let c7 = d.get("accounts", &[json!("usmf"), json!("C-7")]).unwrap();
    assert_eq!((c7["name"].as_str(), c7["creditlimit"].as_str()), ("\"c7\"", "7.25"));
    let tokens = |s: &Server| s.shared.token_requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!((tokens(&f), tokens(&d)), (1, 1), "one token each, from the stored secrets");
    let errors = deliver.steps().state.error_rows("sec", &ErrorFilter::default()).await.unwrap();
    assert!(errors.is_empty(), "{errors:#?}");

    // A wrong secret in the store: an application error row that names where the secret is,
    // never its value.
    let wrong = unique("wrong-value-");
    put_parameter(&sdk, &parameter, &wrong).await;
    d.shared.revoke_tokens();
    let fresh = handler(StepKind::Deliver, &sdk, &r); // a new execution environment: no cache
    f.put_raw("CustomersV3", r#"{"dataAreaId":"usmf","CustomerAccount":"C-3","Name":"edited","CreditLimit":3.25}"#);
    // fno tells of the edit (what its business event would send to the capture queue).
    let tx = notification("sec", "fno", "CustomersV3", &["usmf", "C-3"], Some("usmf"));
    capture.input().send(vec![OutMessage::standard(serde_json::to_string(&tx).unwrap())]).await.unwrap();
    drain(&sdk, &r, &[&capture, &sequence, &fresh]).await;
    let rows = fresh.steps().state.error_rows("sec", &ErrorFilter::default()).await.unwrap();
    assert!(!rows.is_empty(), "the refused secret leaves error rows");
    for (_, row) in &rows {
        assert_eq!(row.status, ErrorStatus::Open);
        assert!(row.message.contains(&format!("SSM parameter '{parameter}'")), "{}", row.message);
        assert!(row.message.contains("invalid_client"), "{}", row.message);
        for v in [&wrong, &dv_secret, &fno_secret] {
            assert!(!row.message.contains(v.as_str()), "a secret value in an error row: {}", row.message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_app_is_refused_on_aws_with_a_message_and_a_dead_letter_row_not_a_panic() {
    let sdk = emulator().await;
    let r = stage(&sdk).await;
    let yaml = "job: lite
apps:
  - { name: shop, connector: sqlite, path: /tmp/shop.db }
  - { name: dv, connector: odata, url: 'http://127.0.0.1:9/api/data/v9.2/', flavor: dataverse, auth: { kind: none } }
primary: shop
table_groups:
  - name: g
    maps:
      - { name: customers, sequence: 1, entities: { shop: customers, dv: accounts }, keys: [{ shop: id, dv: accountnumber }] }
";
    let capture = handler(StepKind::Capture, &sdk, &r);
    start(&capture, parse_job("job.yaml", yaml).unwrap()).await;
    let tx = notification("lite", "shop", "customers", &["1"], None);
    capture.input().send(vec![OutMessage::standard(serde_json::to_string(&tx).unwrap())]).await.unwrap();
    let mut msgs = capture.input().receive(10).await.unwrap();
    assert_eq!(msgs.len(), 1);
    // Its last receive: the failure is recorded with the message before SQS moves it on.
    msgs[0].receive_count = MAX_RECEIVE_COUNT;
    let response = capture.handle("test", sqs_event(&msgs)).await.unwrap();
    assert_eq!(response.batch_item_failures.len(), 1, "the message failed");
    let queue = queue_name(&r.capture_url);
    let row = capture.steps().state.dead_letter(&queue, &msgs[0].id).await.unwrap().expect("a dead-letter row");
    assert!(
        row.reason.contains(
            "app 'shop' is a sqlite app, and sqlite apps run only locally (`dualsync run`): on AWS a job's apps are odata apps"
        ),
        "{}",
        row.reason
    );
}

#[tokio::test]
async fn stored_secrets_are_read_once_and_again_only_once_forgotten() {
    let sdk = emulator().await;
    let store = AwsSecrets::new(&sdk);
    let id = unique("dualsync/test/cache-");
    put_secret(&sdk, &id, "first").await;
    let secret = StoredSecret::SecretsManager(id.clone());
    assert_eq!(store.fetch(&secret).await.unwrap().expose(), "first");
    aws_sdk_secretsmanager::Client::new(&sdk)
        .put_secret_value()
        .secret_id(&id)
        .secret_string("second")
        .send()
        .await
        .unwrap();
    assert_eq!(store.fetch(&secret).await.unwrap().expose(), "first", "cached: the store is not read per request");
    store.forget(&secret);
    assert_eq!(store.fetch(&secret).await.unwrap().expose(), "second");

    let missing = StoredSecret::Ssm(format!("/{}", unique("dualsync/test/none-")));
    let err = store.fetch(&missing).await.unwrap_err();
    assert!(err.to_string().starts_with(&format!("cannot read {missing}: GetParameter: ParameterNotFound")), "{err}");
}

/// The scheduled tracker as deployed: each invocation polls the Dataverse app's change tracking
/// (through the AWS registry) onto the capture queue, and the pipeline's handlers bring the
/// records to the other app; an edit in Dataverse arrives at the next invocation, and an
/// invocation with nothing new sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduled_tracker_brings_dataverse_changes_through_the_deployed_pipeline() {
    let sdk = emulator().await;
    let r = stage(&sdk).await;
    let g = Server::start(Kind::Generic, Options::default()).await;
    g.add_set("Customers", &["Code"], None);
    let d = Server::start(Kind::Dataverse, Options::default()).await;
    d.add_set("accounts", &["accountnumber"], Some("accountid"));
    for n in 0..5 {
        d.put("accounts", json!({"accountnumber": format!("D-{n}"), "name": format!("d{n}")}));
    }
    let yaml = "job: tr
apps:
  - { name: shop, connector: odata, url: SHOP, flavor: generic, auth: { kind: none } }
  - { name: dv, connector: odata, url: DV, flavor: dataverse, auth: { kind: none }, capture: change_tracking }
primary: shop
table_groups:
  - name: g
    maps:
      - name: customers
        sequence: 1
        entities: { shop: Customers, dv: accounts }
        keys: [{ shop: Code, dv: accountnumber }]
        fields: [{ shop: Label, dv: name }]
"
    .replace("SHOP", &g.url)
    .replace("DV", &d.url);
    let capture = handler(StepKind::Capture, &sdk, &r);
    let sequence = handler(StepKind::Sequence, &sdk, &r);
    let deliver = handler(StepKind::Deliver, &sdk, &r);
    start(&capture, parse_job("job.yaml", &yaml).unwrap()).await;
    let tracker = Tracker::new(&sdk, &sender(&r), aws_registry(&sdk), Arc::new(Usage::default()));

    assert_eq!(tracker.poll().await.unwrap(), Polled { sent: 5, failed: 0 });
    drain(&sdk, &r, &[&capture, &sequence, &deliver]).await;
    assert_eq!(g.count("Customers"), 5);
    assert_eq!(g.get("Customers", &[json!("D-3")]).unwrap()["Label"], "\"d3\"");

    d.put("accounts", json!({"accountnumber": "D-3", "name": "edited"}));
    assert_eq!(tracker.poll().await.unwrap(), Polled { sent: 1, failed: 0 });
    drain(&sdk, &r, &[&capture, &sequence, &deliver]).await;
    assert_eq!(g.get("Customers", &[json!("D-3")]).unwrap()["Label"], "\"edited\"");
    assert_eq!(tracker.poll().await.unwrap(), Polled { sent: 0, failed: 0 });
    let errors = deliver.steps().state.error_rows("tr", &ErrorFilter::default()).await.unwrap();
    assert!(errors.is_empty(), "{errors:#?}");
}
