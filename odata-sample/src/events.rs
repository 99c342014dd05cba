//! Outbound change events, as the real apps send them: an edit made as the app's user
//! ([`Server::put`], [`Server::delete`], or several in one [`Server::user_transaction`]) is
//! POSTed to the subscription's URL with the key the app sends.
//!
//! - Dataverse: a webhook (a step registered on Create, Update and Delete, asynchronous, with a
//!   post image and a pre image): one `RemoteExecutionContext` per operation; the operations of
//!   one user transaction share its `CorrelationId`, each has its own `OperationId`; the
//!   record's `RowVersion` is its etag number.
//! - fno: a data event per record (`BusinessEventId` `Microsoft.Dynamics.DataEvents.<entity>`,
//!   `EntityName`, `EventType` Created/Updated/Deleted, the entity's key fields, the legal entity),
//!   `ControlNumber` the record's change number (increasing, with gaps), `EventId` its own.
//! - generic: no events (a generic service has no outbound events to imitate).
//!
//! Delivery is one event at a time, in the order the edits were made, each POST awaited
//! before the next; a 503, a 429 or no answer is tried again with a growing pause (as Dataverse
//! and fno retry their endpoints), anything else that is not a success is given up and kept
//! in [`Server::event_failures`]. [`Server::events_delivered`] waits for what was sent so far.
//! Writes made through the OData API (dualsync's) send no events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::{Kind, Server};

/// The app user that makes the edits events are sent for (Dataverse `InitiatingUserId`, fno
/// `InitiatingUserAADObjectId`): not dualsync's user.
pub const USER_ID: &str = "5e1f0c0d-0000-4000-8000-00000000a11c";

/// Attempts at one event before it is given up (the pauses between them grow to
/// [`MAX_PAUSE`]: about 20 s of retrying in all).
const ATTEMPTS: u32 = 15;
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// Where an app sends its events, and the key it sends with them.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub url: String,
    pub key: EventKey,
}

/// How the key travels, as Dataverse's webhook registration offers it.
#[derive(Debug, Clone)]
pub enum EventKey {
    /// `WebhookKey`: `?code=<key>`.
    WebhookKey(String),
    /// `HttpHeader`: the header `name` with the key.
    Header { name: String, value: String },
    /// `HttpQueryString`: the query parameter `name` with the key.
    Query { name: String, value: String },
}

/// What happened to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
}

/// One record changed by the app's user, as the store saw it.
#[derive(Debug, Clone)]
pub struct Change {
    pub set: String,
    pub op: Op,
    /// Dataverse's record id.
    pub id: String,
    /// The change number: the record's etag after it (of the delete, for a delete).
    pub version: u64,
    /// The set's key fields.
    pub keys: Vec<String>,
    /// The properties the edit gave (raw JSON text each; empty for a delete).
    pub given: BTreeMap<String, String>,
    /// The record after the edit (before it, for a delete).
    pub image: BTreeMap<String, String>,
}

/// A user's edits applied together: their events go out together, Dataverse's under one
/// correlation id.
#[derive(Default)]
pub struct UserTx {
    ops: Vec<TxOp>,
}

enum TxOp {
    Put(String, String),
    Delete(String, Vec<Value>),
}

impl UserTx {
    /// As [`Server::put`].
    pub fn put(&mut self, set: &str, record: Value) {
        self.ops.push(TxOp::Put(set.to_string(), record.to_string()));
    }

    /// As [`Server::put_raw`].
    pub fn put_raw(&mut self, set: &str, json_text: &str) {
        self.ops.push(TxOp::Put(set.to_string(), json_text.to_string()));
    }

    /// As [`Server::delete`].
    pub fn delete(&mut self, set: &str, key: &[Value]) {
        self.ops.push(TxOp::Delete(set.to_string(), key.to_vec()));
    }
}

/// The server's outbox: events waiting for delivery, counted.
#[derive(Default)]
pub struct Outbox {
    sender: Mutex<Option<mpsc::UnboundedSender<Vec<u8>>>>,
    queued: AtomicU64,
    delivered: Mutex<Option<watch::Receiver<u64>>>,
    failures: std::sync::Arc<Mutex<Vec<String>>>,
}

impl Outbox {
    /// Queues the events of `changes` (one user action) when there is a subscription.
    pub(crate) fn send(&self, kind: Kind, changes: Vec<Change>) {
        let sender = self.sender.lock().unwrap();
        let Some(sender) = sender.as_ref() else { return };
        let correlation = uuid::Uuid::new_v4().to_string();
        for c in &changes {
            let body = match kind {
                Kind::Dataverse => dataverse_context(c, &correlation),
                Kind::Fno => fno_data_event(c),
                Kind::Generic => continue,
            };
            self.queued.fetch_add(1, Ordering::SeqCst);
            // The receiver lives as long as the delivery task, which runs until the server
            // is dropped.
            let _ = sender.send(body.to_string().into_bytes());
        }
    }
}

impl Server {
    /// From now on, the user's edits are sent to `sub` (replacing an earlier subscription's
    /// target for events not yet sent). Call inside a tokio runtime: the delivery runs there.
    pub fn subscribe(&self, sub: Subscription) {
        let (tx, rx) = mpsc::unbounded_channel();
        let outbox = &self.shared.events;
        let done = outbox.queued.load(Ordering::SeqCst);
        let (count, watcher) = watch::channel(done);
        *outbox.delivered.lock().unwrap() = Some(watcher);
        *outbox.sender.lock().unwrap() = Some(tx);
        tokio::spawn(deliver(sub, rx, count, done, outbox.failures.clone()));
    }

    /// Several edits as one user transaction: applied in order, their events sent after.
    pub fn user_transaction(&self, f: impl FnOnce(&mut UserTx)) {
        let mut tx = UserTx::default();
        f(&mut tx);
        let changes = tx
            .ops
            .into_iter()
            .filter_map(|op| match op {
                TxOp::Put(set, text) => Some(self.put_change(&set, &text)),
                TxOp::Delete(set, key) => self.delete_change(&set, &key),
            })
            .collect();
        self.shared.events.send(self.shared.kind, changes);
    }

    /// Waits until every event queued so far has been delivered (or given up).
    pub async fn events_delivered(&self) {
        let target = self.shared.events.queued.load(Ordering::SeqCst);
        let watcher = self.shared.events.delivered.lock().unwrap().clone();
        if let Some(mut w) = watcher {
            // The sender goes only with the delivery task, after the last event.
            let _ = w.wait_for(|n| *n >= target).await;
        }
    }

    /// The events sent so far (queued for delivery).
    pub fn events_sent(&self) -> u64 {
        self.shared.events.queued.load(Ordering::SeqCst)
    }

    /// The events given up, each as `<what>: <why>` (no record values).
    pub fn event_failures(&self) -> Vec<String> {
        self.shared.events.failures.lock().unwrap().clone()
    }
}

/// Delivers events one at a time, in order, until the server is dropped.
async fn deliver(
    sub: Subscription,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    count: watch::Sender<u64>,
    mut done: u64,
    failures: std::sync::Arc<Mutex<Vec<String>>>,
) {
    let client = reqwest::Client::new();
    let url = match target(&sub) {
        Ok(u) => u,
        Err(e) => {
            failures.lock().unwrap().push(format!("subscription url {}: {e}", sub.url));
            return;
        }
    };
    while let Some(body) = rx.recv().await {
        if let Err(why) = post(&client, &url, &sub.key, body).await {
            failures.lock().unwrap().push(format!("event {}: {why}", done + 1));
        }
        done += 1;
        count.send_replace(done);
    }
}

/// The URL events go to, with the key when it travels in the query string.
fn target(sub: &Subscription) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(&sub.url).map_err(|e| e.to_string())?;
    match &sub.key {
        EventKey::WebhookKey(k) => {
            url.query_pairs_mut().append_pair("code", k);
        }
        EventKey::Query { name, value } => {
            url.query_pairs_mut().append_pair(name, value);
        }
        EventKey::Header { .. } => {}
    }
    Ok(url)
}

/// One event POSTed until it is taken, refused, or out of attempts.
async fn post(client: &reqwest::Client, url: &reqwest::Url, key: &EventKey, body: Vec<u8>) -> Result<(), String> {
    let mut pause = FIRST_PAUSE;
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        let mut req = client.post(url.clone()).header("content-type", "application/json").body(body.clone());
        if let EventKey::Header { name, value } = key {
            req = req.header(name.as_str(), value.as_str());
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) if matches!(r.status().as_u16(), 429 | 503) => last = format!("answered {}", r.status()),
            Ok(r) => return Err(format!("refused with {}", r.status())),
            Err(e) => last = format!("not delivered: {e}"),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
    Err(format!("{last}, {ATTEMPTS} times"))
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

/// A property's raw JSON text as a value (`null` if it is not JSON).
fn value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or(Value::Null)
}

/// Dataverse's attribute collection: `{key, value}` pairs.
fn attributes(props: &BTreeMap<String, String>) -> Value {
    Value::Array(props.iter().map(|(k, v)| json!({"key": k, "value": value(v)})).collect())
}

/// The table's logical name, from its entity set name (`accounts` → `account`).
fn logical_name(set: &str) -> &str {
    set.strip_suffix('s').unwrap_or(set)
}

/// The `RemoteExecutionContext` a Dataverse webhook step sends for `c`.
fn dataverse_context(c: &Change, correlation: &str) -> Value {
    let logical = logical_name(&c.set);
    let entity = |attrs: Value| {
        json!({
            "__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts",
            "Attributes": attrs,
            "EntityState": null,
            "FormattedValues": [],
            "Id": c.id,
            "KeyAttributes": [],
            "LogicalName": logical,
            "RelatedEntities": [],
            "RowVersion": c.version.to_string(),
        })
    };
    let (message, target, pre, post) = match c.op {
        Op::Create | Op::Update => (
            if c.op == Op::Create { "Create" } else { "Update" },
            entity(attributes(&c.given)),
            json!([]),
            json!([{"key": "postimage", "value": entity(attributes(&c.image))}]),
        ),
        Op::Delete => (
            "Delete",
            json!({"__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
                   "Id": c.id, "KeyAttributes": [], "LogicalName": logical, "Name": null, "RowVersion": null}),
            json!([{"key": "preimage", "value": entity(attributes(&c.image))}]),
            json!([]),
        ),
    };
    json!({
        "BusinessUnitId": "55adc078-92be-e911-a837-000d3a2aabe6",
        "CorrelationId": correlation,
        "Depth": 1,
        "InitiatingUserAzureActiveDirectoryObjectId": "00000000-0000-0000-0000-000000000000",
        "InitiatingUserId": USER_ID,
        "InputParameters": [{"key": "Target", "value": target}],
        "IsExecutingOffline": false,
        "IsInTransaction": false,
        "IsOfflinePlayback": false,
        "IsolationMode": 1,
        "MessageName": message,
        "Mode": 1,
        "OperationCreatedOn": format!("/Date({}+0000)/", now_ms()),
        "OperationId": uuid::Uuid::new_v4().to_string(),
        "OrganizationId": "6b0ae6c5-5d1c-4f84-9f6e-2b0d3c6a0d11",
        "OrganizationName": "sample",
        "OutputParameters": [],
        "OwningExtension": {"Id": "1f2a4a4b-0000-4000-8000-000000000001", "KeyAttributes": [],
                            "LogicalName": "sdkmessageprocessingstep", "Name": null, "RowVersion": null},
        "ParentContext": null,
        "PostEntityImages": post,
        "PreEntityImages": pre,
        "PrimaryEntityId": c.id,
        "PrimaryEntityName": logical,
        "RequestId": null,
        "SecondaryEntityName": "none",
        "SharedVariables": [],
        "Stage": 40,
        "UserAzureActiveDirectoryObjectId": "00000000-0000-0000-0000-000000000000",
        "UserId": USER_ID,
    })
}

/// The data event fno sends for `c`: its key fields and legal entity, never other values.
fn fno_data_event(c: &Change) -> Value {
    let event_type = match c.op {
        Op::Create => "Created",
        Op::Update => "Updated",
        Op::Delete => "Deleted",
    };
    let legal_entity = c.image.get("dataAreaId").map(|v| value(v)).and_then(|v| v.as_str().map(str::to_string));
    let now = now_ms();
    let mut e = json!({
        "BusinessEventId": format!("Microsoft.Dynamics.DataEvents.{}", c.set),
        "BusinessEventLegalEntity": legal_entity.unwrap_or_default(),
        "ContextRecordSubject": "",
        "ControlNumber": c.version,
        "EntityName": c.set,
        "EventId": uuid::Uuid::new_v4().to_string().to_uppercase(),
        "EventTime": format!("/Date({now})/"),
        "EventType": event_type,
        "InitiatingUserAADObjectId": USER_ID,
        "MajorVersion": 0,
        "MinorVersion": 0,
        "ParentContextRecordSubjects": [],
    });
    for k in &c.keys {
        if let Some(v) = c.image.get(k) {
            e[k] = value(v);
        }
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualsync::domain::change::{Key, Operation};
    use dualsync::domain::ingress::{dataverse, fno, EntityKeys, RecordRef};

    fn change(op: Op) -> Change {
        let props = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Change {
            set: "accounts".into(),
            op,
            id: "ab89c994-065d-f011-bec2-000d3ac241ab".into(),
            version: 42,
            keys: vec!["msdyn_company".into(), "accountnumber".into()],
            given: props(&[("msdyn_company", "\"USMF\""), ("accountnumber", "\"C1\""), ("name", "\"n\"")]),
            image: props(&[
                ("dataAreaId", "\"USMF\""),
                ("msdyn_company", "\"USMF\""),
                ("accountnumber", "\"C1\""),
                ("name", "\"n\""),
            ]),
        }
    }

    /// An endpoint that answers 503 to its first request, then 200: what it was sent, in order.
    async fn flaky_endpoint() -> (String, std::sync::Arc<Mutex<Vec<Value>>>) {
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let got = seen.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let got = got.clone();
            async move {
                let mut got = got.lock().unwrap();
                got.push(serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null));
                if got.len() == 1 {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    axum::http::StatusCode::OK
                }
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (url, seen)
    }

    #[tokio::test]
    async fn events_go_in_order_and_a_503_is_sent_again() {
        let (url, seen) = flaky_endpoint().await;
        let s = Server::start(Kind::Fno, crate::Options::default()).await;
        s.add_set("CustomersV3", &["dataAreaId", "CustomerAccount"], None);
        s.put("CustomersV3", json!({"dataAreaId": "USMF", "CustomerAccount": "before", "Name": "x"}));
        s.subscribe(Subscription { url, key: EventKey::Query { name: "key".into(), value: "k".into() } });
        s.user_transaction(|tx| {
            for n in 0..3 {
                tx.put("CustomersV3", json!({"dataAreaId": "USMF", "CustomerAccount": format!("C{n}"), "Name": "x"}));
            }
            tx.delete("CustomersV3", &[json!("USMF"), json!("before")]);
        });
        s.events_delivered().await;
        assert_eq!(s.event_failures(), Vec::<String>::new());
        let seen = seen.lock().unwrap().clone();
        let got: Vec<(&str, &str)> =
            seen.iter().map(|e| (e["CustomerAccount"].as_str().unwrap(), e["EventType"].as_str().unwrap())).collect();
        assert_eq!(
            got,
            [("C0", "Created"), ("C0", "Created"), ("C1", "Created"), ("C2", "Created"), ("before", "Deleted")],
            "the first event again after the 503, then the others in order"
        );
        let numbers: Vec<u64> = seen.iter().map(|e| e["ControlNumber"].as_u64().unwrap()).collect();
        assert!(numbers.windows(2).skip(1).all(|w| w[0] < w[1]), "control numbers increase: {numbers:?}");
    }

    fn keys(_: &str) -> Option<EntityKeys> {
        Some(EntityKeys { entity: "accounts".into(), key_fields: vec!["msdyn_company".into(), "accountnumber".into()] })
    }

    /// The shapes are the ones the ingress parsers take: a record named by key, in order.
    #[test]
    fn events_parse_as_the_apps_events() {
        let key = RecordRef::Key(Key(vec!["USMF".into(), "C1".into()]));
        for (op, want) in
            [(Op::Create, Operation::Upsert), (Op::Update, Operation::Upsert), (Op::Delete, Operation::Delete)]
        {
            let body = dataverse_context(&change(op), "fc65709c-7b89-460a-bafc-7193dd5f7c5b").to_string();
            let e = dataverse::parse(body.as_bytes(), &keys, false, 0).unwrap();
            assert_eq!((e.changes[0].op, &e.changes[0].record), (want, &key), "{op:?}");
            assert_eq!(e.user.as_deref(), Some(USER_ID));
            if op != Op::Delete {
                assert_eq!(e.changes[0].seq, Some(42));
            }

            let body = fno_data_event(&change(op)).to_string();
            let e = fno::parse(body.as_bytes(), &keys, 0).unwrap();
            let c = &e[0].changes[0];
            assert_eq!((c.op, &c.record, c.seq, c.company.as_deref()), (want, &key, Some(42), Some("USMF")));
            assert!(!body.contains("\"n\""), "fno's data event carries the key, not the values: {body}");
        }
    }
}
