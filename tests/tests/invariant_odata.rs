//! The model test's invariant (DESIGN §3, see `invariant.rs`) over two OData services with their
//! faults: side A an fno-like service, side B a Dataverse-like one (`odata_sample::Server`), both
//! `connector: odata`, the same job as `invariant.rs` (parents and children that look their
//! parent up), driven by the shared harness (`model/`).
//!
//! - Users edit and delete records on the services (`put`, `delete`). Every change of a
//!   service, the users' and dualsync's own writes alike, reaches capture as the app would send
//!   it, through the ingress handler: fno as data events (or, in half the cases, the project's
//!   JSON notification), Dataverse as webhook contexts whose post image carries the key and the
//!   `RowVersion`. dualsync's writes to Dataverse come back from its application user, which the
//!   job names (`own_user_id`): ingress drops them; those to fno come back as any change does.
//!   A change waits in its app's feed until a `Feeds` action sends it (in order, as a webhook
//!   queue would); an answer other than 200 leaves it there, to be sent again.
//! - Faults of the services, met by a chosen request to come (a read, a write batch, a
//!   delete): 503, 429 with `Retry-After: 0` (the connector waits it out in the request, and
//!   after three gives up with a system failure), added latency, and a time-out after the write
//!   landed (the service stalls its answer past the connector's time-out, [`TIME_OUT`]). Besides,
//!   the harness's own: crashes at every failpoint, duplicated messages, clock moves, edits
//!   between a delivery's read and its write, the job stopped and paused, retry requests, two
//!   workers on the same messages.
//!
//! Then the same checks as `converges_under_faults`: in step unless an open error names the
//! record, no lost update, nothing dead-lettered.
//!
//! Cases: `PROPTEST_CASES` when set, else [`CASES_ODATA`]. A `Retry-After` above zero is not
//! drawn: the connector waits it out in real time (its limiter's gate), and so would the test.
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

mod common;
mod model;

use async_trait::async_trait;
use common::{Control, FaultyRegistry, Hook};
use dualsync::adapters::connectors::odata::OdataApp;
use dualsync::domain::change::{ChangeNotification, Operation, Parts, TransactionNotification};
use dualsync::domain::config::{compile, parse_job};
use dualsync::domain::errors::ErrorStatus;
use dualsync::domain::job::{ConnectorSpec, Side};
use dualsync::ports::Connector;
use dualsync::runtime::local::LocalRuntime;
use dualsync::steps::ingress::{Ingress, Request};
use dualsync::steps::{ConnectorRegistry, StepKind};
use model::*;
use odata_sample::{Fault, Kind, Options, Server};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

/// Cases when `PROPTEST_CASES` is not set.
const CASES_ODATA: u32 = 150;

/// The connectors' time-out in this test (120 s in the product): a stalled answer costs this
/// much real time.
const TIME_OUT: Duration = Duration::from_millis(250);
/// How long a service stalls its answer after the write landed: past [`TIME_OUT`].
const STALL: Duration = Duration::from_millis(400);

/// dualsync's application user in the Dataverse-like service, and the users who edit there.
const OWN_USER: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
const USER: &str = "0b0b0b0b-0000-4000-8000-00000000000b";
/// The ingress keys, as the apps' webhook registrations send them.
const FNO_KEY: &str = "fno-ingress-key-1";
const DV_KEY: &str = "dv-ingress-key-22";

fn job_yaml(primary: Side, fno: &str, dv: &str) -> String {
    format!(
        "job: j
apps:
  - name: a
    connector: odata
    url: {fno}
    flavor: fno
    auth: {{ kind: none }}
    ingress: {{ auth: {{ kind: http_header, name: x-fno-key, key_env: FNO_KEY }} }}
  - name: b
    connector: odata
    url: {dv}
    flavor: dataverse
    auth: {{ kind: none }}
    ingress: {{ auth: {{ kind: webhook_key, key_env: DV_KEY }}, own_user_id: {OWN_USER} }}
primary: {}
{}",
        app_name(primary),
        model::MAPS
    )
}

/// One side's entity sets and property names (A's as in `invariant.rs`'s tables).
struct Names {
    /// Entity sets (parents, children) and the logical names Dataverse's events give them.
    sets: [&'static str; 2],
    logical: [&'static str; 2],
    /// The parent key, the parent's name and number, the child number and label.
    pid: &'static str,
    name: &'static str,
    n: &'static str,
    cno: &'static str,
    label: &'static str,
}

const NAMES: [Names; 2] = [
    Names {
        sets: ["parents", "children"],
        logical: ["parent", "child"],
        pid: "pid",
        name: "name",
        n: "n",
        cno: "cno",
        label: "label",
    },
    Names {
        sets: ["owners", "items"],
        logical: ["owner", "item"],
        pid: "owner_id",
        name: "title",
        n: "num",
        cno: "item_no",
        label: "caption",
    },
];

impl Names {
    fn set(&self, r: Rec) -> &'static str {
        self.sets[r.map_idx()]
    }
    /// The record's key values as the service takes them.
    fn key(&self, r: Rec) -> Vec<Value> {
        match r {
            Rec::Parent(_) => vec![json!(r.pid())],
            Rec::Child(_, c) => vec![json!(r.pid()), json!(c)],
        }
    }
    /// The key as properties of an event or a record.
    fn key_props(&self, r: Rec) -> Vec<(&'static str, Value)> {
        let mut props = vec![(self.pid, json!(r.pid()))];
        if let Rec::Child(_, c) = r {
            props.push((self.cno, json!(c)));
        }
        props
    }
    /// The record holding value `v`.
    fn record(&self, r: Rec, v: u64) -> Value {
        let mut rec: serde_json::Map<String, Value> =
            self.key_props(r).into_iter().map(|(k, v)| (k.into(), v)).collect();
        match r {
            Rec::Parent(_) => {
                rec.insert(self.name.into(), json!(format!("n{v}")));
                rec.insert(self.n.into(), json!(v));
            }
            Rec::Child(..) => {
                rec.insert(self.label.into(), json!(format!("l{v}")));
            }
        }
        Value::Object(rec)
    }
}

/// A change of one record waiting in its app's feed.
#[derive(Debug, Clone)]
struct Change {
    rec: Rec,
    op: Operation,
    /// The service's change number: the record's etag after the change (for a delete, the one
    /// before it: what Dataverse's pre image tells).
    etag: u64,
    /// The record's id in the service (Dataverse's primary id).
    id: String,
    /// Whether it is the first change of the record since it was created.
    created: bool,
    /// Made by dualsync (its application user), not by a user.
    own: bool,
}

/// Changes users made: (side, change).
type UserChanges = Arc<Mutex<Vec<(Side, Change)>>>;

/// The two services and their change feeds.
struct ServiceApps {
    servers: [Arc<Server>; 2],
    /// Per side, each record as last observed: (id, etag).
    seen: [BTreeMap<Rec, (String, u64)>; 2],
    /// The users' changes as they made them, not yet in the feeds (a record a user deletes
    /// right after dualsync created it, within one action, is never observed present).
    users: UserChanges,
    /// Per side, the changes not yet sent to ingress, oldest first.
    feed: [VecDeque<Change>; 2],
    /// fno's changes as data events (else as the project's JSON notification).
    fno_events: bool,
    /// Events sent: their ids.
    sent: u64,
}

impl ServiceApps {
    fn server(&self, side: Side) -> &Server {
        &self.servers[side.index()]
    }

    /// The value of `r` on `side`, read from the service's store.
    fn read(server: &Server, side: Side, r: Rec) -> Option<u64> {
        let names = &NAMES[side.index()];
        let props = server.get(names.set(r), &names.key(r))?;
        let text = |field: &str| -> Option<String> {
            props.get(field).and_then(|raw| serde_json::from_str::<Value>(raw).ok()?.as_str().map(str::to_string))
        };
        match r {
            Rec::Parent(_) => {
                let name = text(names.name).unwrap_or_else(|| panic!("{side:?} {r:?}: no {}", names.name));
                let n: u64 = props.get(names.n).and_then(|n| n.parse().ok()).unwrap_or_else(|| {
                    panic!("{side:?} {r:?}: {} is not a whole number", names.n);
                });
                assert_eq!(name, format!("n{n}"), "{side:?} {r:?}: fields from different writes");
                Some(n)
            }
            Rec::Child(..) => {
                let label = text(names.label).unwrap_or_else(|| panic!("{side:?} {r:?}: no {}", names.label));
                Some(label.trim_start_matches('l').parse().expect("label"))
            }
        }
    }

    /// A user's write of `v` to `r`; the value it replaced, or `None` (outer) when it wrote
    /// nothing (a child whose parent is not there, unless `orphans`).
    fn put(server: &Server, users: &UserChanges, side: Side, r: Rec, v: u64, orphans: bool) -> Option<Option<u64>> {
        if let Rec::Child(p, _) = r {
            if !orphans && Self::read(server, side, Rec::Parent(p)).is_none() {
                return None;
            }
        }
        let before = Self::read(server, side, r);
        let names = &NAMES[side.index()];
        server.put(names.set(r), names.record(r, v));
        let (id, etag) = Self::version(server, side, r).expect("the record just written");
        let change = Change { rec: r, op: Operation::Upsert, etag, id, created: before.is_none(), own: false };
        users.lock().unwrap().push((side, change));
        Some(before)
    }

    /// A user's delete of `r` (a parent with its children); what it deleted.
    fn remove(server: &Server, users: &UserChanges, side: Side, r: Rec) -> Vec<Rec> {
        let names = &NAMES[side.index()];
        let mut recs: Vec<Rec> = match r {
            Rec::Parent(p) => (1..=CHILDREN).map(|c| Rec::Child(p, c)).collect(),
            Rec::Child(..) => vec![],
        };
        recs.push(r);
        let mut gone = Vec::new();
        for d in recs {
            let Some((id, etag)) = Self::version(server, side, d) else { continue };
            if server.delete(names.set(d), &names.key(d)) {
                let change = Change { rec: d, op: Operation::Delete, etag, id, created: false, own: false };
                users.lock().unwrap().push((side, change));
                gone.push(d);
            }
        }
        gone
    }

    /// The record's id and etag in the service, if it is there.
    fn version(server: &Server, side: Side, r: Rec) -> Option<(String, u64)> {
        let names = &NAMES[side.index()];
        Some((server.id_of(names.set(r), &names.key(r))?, server.etag_of(names.set(r), &names.key(r))?))
    }

    /// The ingress request of one change as its app sends it.
    fn event(&mut self, side: Side, c: &Change) -> Request {
        self.sent += 1;
        let n = self.sent;
        let names = &NAMES[side.index()];
        let at = format!("/Date({})/", 1_700_000_000_000u64 + n);
        let user = if c.own { OWN_USER } else { USER };
        match side {
            Side::A if self.fno_events => {
                let mut e = json!({
                    "BusinessEventId": "DataEvent",
                    "EntityName": names.set(c.rec),
                    "EventType": if c.op == Operation::Delete { "Deleted" } else if c.created { "Created" } else { "Updated" },
                    "ControlNumber": c.etag,
                    "EventId": format!("fno-event-{n}"),
                    "EventTime": at,
                    "InitiatingUserAADObjectId": user,
                });
                for (k, v) in names.key_props(c.rec) {
                    e[k] = v;
                }
                request(side, "fno", FNO_KEY, json!([e]))
            }
            Side::A => {
                let tx = TransactionNotification {
                    job: "j".into(),
                    app: "a".into(),
                    txid: format!("fno-tx-{n}"),
                    changes: vec![ChangeNotification {
                        app: "a".into(),
                        entity: names.set(c.rec).into(),
                        key: c.rec.key(),
                        op: c.op,
                        seq: c.etag,
                        version: None,
                        company: None,
                        at_ms: 1_700_000_000_000 + n as i64,
                    }],
                    parts: Parts::default(),
                };
                request(side, "notification", FNO_KEY, serde_json::to_value(&tx).expect("notification"))
            }
            Side::B => {
                let logical = names.logical[c.rec.map_idx()];
                let attributes: Vec<Value> =
                    names.key_props(c.rec).into_iter().map(|(k, v)| json!({ "key": k, "value": v })).collect();
                let image = json!({
                    "Attributes": attributes,
                    "Id": c.id,
                    "LogicalName": logical,
                    "RowVersion": c.etag.to_string(),
                });
                let message = match c.op {
                    Operation::Delete => "Delete",
                    Operation::Upsert if c.created => "Create",
                    Operation::Upsert => "Update",
                };
                let mut ctx = json!({
                    "MessageName": message,
                    "PrimaryEntityName": logical,
                    "PrimaryEntityId": c.id,
                    "CorrelationId": format!("corr-{n}"),
                    "OperationId": format!("op-{n}"),
                    "Depth": 1,
                    "InitiatingUserId": user,
                    "OperationCreatedOn": at,
                });
                if c.op == Operation::Delete {
                    ctx["InputParameters"] =
                        json!([{ "key": "Target", "value": { "Id": c.id, "LogicalName": logical } }]);
                    ctx["PreEntityImages"] = json!([{ "key": "PreImage", "value": image }]);
                } else {
                    ctx["InputParameters"] = json!([{ "key": "Target", "value": image.clone() }]);
                    ctx["PostEntityImages"] = json!([{ "key": "PostImage", "value": image }]);
                }
                request(side, "dataverse", DV_KEY, ctx)
            }
        }
    }
}

/// A request to `side`'s ingress route for `source`, with the app's key as its webhook
/// registration sends it (fno: a header; Dataverse: `?code=`).
fn request(side: Side, source: &str, key: &str, body: Value) -> Request {
    let (mut headers, mut query) = (Vec::new(), Vec::new());
    match side {
        Side::A => headers.push(("x-fno-key".to_string(), key.to_string())),
        Side::B => query.push(("code".to_string(), key.to_string())),
    }
    let (job, app, source, body) = ("j".into(), app_name(side).into(), source.into(), body.to_string().into_bytes());
    Request { job, app, source, headers, query, body }
}

#[async_trait(?Send)]
impl Apps for ServiceApps {
    fn edit(&mut self, side: Side, recs: &[Rec], counter: &mut u64, orphans: bool, _txid: &str) -> Vec<UserWrite> {
        let mut written = Vec::new();
        for &r in recs {
            if let Some(before) = Self::put(self.server(side), &self.users, side, r, *counter + 1, orphans) {
                *counter += 1;
                written.push((r, *counter, before));
            }
        }
        written
    }

    fn delete(&mut self, side: Side, r: Rec, _txid: &str) -> Vec<Rec> {
        Self::remove(self.server(side), &self.users, side, r)
    }

    fn value(&self, side: Side, r: Rec) -> Option<u64> {
        Self::read(self.server(side), side, r)
    }

    fn dump(&self) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for side in Side::BOTH {
            let (server, names) = (self.server(side), &NAMES[side.index()]);
            let rows = all_recs()
                .filter_map(|r| {
                    let props = server.get(names.set(r), &names.key(r))?;
                    Some(format!("{r:?} {props:?} etag {:?}", server.etag_of(names.set(r), &names.key(r))))
                })
                .collect();
            out.push(rows);
            out.push(vec![format!("{side:?} feed holds {} change(s)", self.feed[side.index()].len())]);
            if std::env::var("TMPLOG").is_ok() {
                out.push(
                    server
                        .log()
                        .iter()
                        .map(|l| format!("TMPLOG {side:?} {} {} {} parts {}", l.method, l.path, l.status, l.parts))
                        .collect(),
                );
            }
        }
        out
    }

    async fn feeds(&mut self, rt: &LocalRuntime, limit: usize) -> usize {
        let keys = |k: &str| match k {
            "FNO_KEY" => Some(FNO_KEY.to_string()),
            "DV_KEY" => Some(DV_KEY.to_string()),
            _ => None,
        };
        let registry = rt.apps.clone() as Arc<dyn ConnectorRegistry>;
        let ingress = Ingress::new(rt.state.clone(), registry, rt.capture.clone()).with_env(Arc::new(keys));
        let mut moved = 0;
        for side in Side::BOTH {
            for _ in 0..limit {
                let Some(change) = self.feed[side.index()].front().cloned() else { break };
                let answer = ingress.handle(&self.event(side, &change)).await;
                match answer.status {
                    200 => {
                        self.feed[side.index()].pop_front();
                        moved += 1;
                    }
                    // Not taken now (the state or an app unreachable): the app sends it again.
                    503 => break,
                    s => panic!("ingress refused {side:?}'s change of {:?} with {s}: {}", change.rec, answer.body),
                }
            }
        }
        moved
    }

    fn user_hook(
        &self,
        side: Side,
        rec: Rec,
        value: Option<u64>,
        _txid: String,
        edits: Arc<Mutex<Vec<HookEdit>>>,
    ) -> Hook {
        let (server, users) = (self.servers[side.index()].clone(), self.users.clone());
        Box::new(move || {
            Box::pin(async move {
                let mut edits = edits.lock().unwrap();
                match value {
                    None => edits
                        .extend(Self::remove(&server, &users, side, rec).into_iter().map(|d| (side, d, None, None))),
                    Some(v) => {
                        // Orphans allowed: the property's apps take children without parents.
                        if let Some(before) = Self::put(&server, &users, side, rec, v, true) {
                            edits.push((side, rec, Some(v), before));
                        }
                    }
                }
            })
        })
    }

    /// The users' changes go into the feeds as they were made; then each record is compared
    /// with how it was last seen (after those), and what differs is dualsync's writes: a new
    /// etag a change (created when it was not there), a record gone a delete, a new id a delete
    /// then a create.
    fn observe(&mut self) {
        for (side, c) in std::mem::take(&mut *self.users.lock().unwrap()) {
            match c.op {
                Operation::Upsert => self.seen[side.index()].insert(c.rec, (c.id.clone(), c.etag)),
                Operation::Delete => self.seen[side.index()].remove(&c.rec),
            };
            self.feed[side.index()].push_back(c);
        }
        for side in Side::BOTH {
            for r in all_recs() {
                let now = Self::version(&self.servers[side.index()], side, r);
                let before = self.seen[side.index()].get(&r).cloned();
                let feed = &mut self.feed[side.index()];
                let gone = |(id, etag): (String, u64)| Change {
                    rec: r,
                    op: Operation::Delete,
                    etag,
                    id,
                    created: false,
                    own: true,
                };
                match (&before, &now) {
                    (None, None) => continue,
                    (Some(b), None) => feed.push_back(gone(b.clone())),
                    (Some((_, old)), Some((_, etag))) if old == etag => continue,
                    (b, Some((id, etag))) => {
                        // Gone and created again since: Dataverse tells both.
                        let again = b.as_ref().filter(|(old, _)| old != id);
                        if let Some(b) = again {
                            feed.push_back(gone(b.clone()));
                        }
                        let created = b.is_none() || again.is_some();
                        let (id, etag) = (id.clone(), *etag);
                        feed.push_back(Change { rec: r, op: Operation::Upsert, etag, id, created, own: true });
                    }
                }
                match now {
                    Some(n) => self.seen[side.index()].insert(r, n),
                    None => self.seen[side.index()].remove(&r),
                };
            }
        }
    }

    fn service_fault(&mut self, side: Side, fault: &Fault, after: u8) {
        for _ in 0..after {
            self.server(side).fault(Fault::Delay(Duration::ZERO));
        }
        self.server(side).fault(fault.clone());
    }

    fn end_faults(&mut self) {
        for s in &self.servers {
            s.clear_faults();
        }
    }
}

/// The harness over the two services: the job applied and started, its connectors opened with
/// the test's time-out, each behind the harness's controls (hooks and yields; their writes work,
/// the faults are the services').
async fn harness(primary: Side, fno_events: bool) -> Harness {
    let fno = Server::start(Kind::Fno, Options::default()).await;
    fno.add_set("parents", &["pid"], None);
    fno.add_set("children", &["pid", "cno"], None);
    let dv = Server::start(Kind::Dataverse, Options::default()).await;
    dv.add_set("owners", &["owner_id"], Some("ownerid"));
    dv.add_set("items", &["owner_id", "item_no"], Some("itemid"));
    let def = parse_job("job.yaml", &job_yaml(primary, &fno.url, &dv.url)).expect("job");
    let job = compile("job.yaml", &def).expect("job compiles");
    let connectors: [Arc<dyn Connector>; 2] = Side::BOTH.map(|side| {
        let app = &job.apps[side.index()];
        let ConnectorSpec::Odata(spec) = &app.connector else { panic!("{side:?} is not an odata app") };
        Arc::new(OdataApp::with_env(&app.name, spec, TIME_OUT, &|_| None).expect("open odata app"))
            as Arc<dyn Connector>
    });
    let controls = [Control::new(), Control::new()];
    let registry = Arc::new(FaultyRegistry::over(connectors, controls.clone()));
    let apps = ServiceApps {
        servers: [Arc::new(fno), Arc::new(dv)],
        seen: Default::default(),
        users: Arc::default(),
        feed: Default::default(),
        fno_events,
        sent: 0,
    };
    let mut h = Harness::start(primary, def, Box::new(apps), registry, controls).await;
    // Deletes and refusals leave children without parents now and then.
    h.orphans = true;
    h
}

fn service_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::Status(503)),
        3 => Just(Fault::Throttle(0)),
        2 => (1u64..20).prop_map(|ms| Fault::Delay(Duration::from_millis(ms))),
        2 => Just(Fault::LandThenStall(STALL)),
    ]
}

/// The faults of [`model::faults_among`], the services' own among them.
fn odata_fault_action() -> impl Strategy<Value = Action> {
    let service =
        (side(), service_fault(), 0u8..6).prop_map(|(side, fault, after)| Action::Service { side, fault, after });
    faults_among(2, service)
}

/// The property: faults, then the faults end (services back, job running, open errors retried
/// as an operator would), then the invariant.
async fn convergence_over_services(primary: Side, fno_events: bool, actions: &[Action]) -> Result<(), TestCaseError> {
    let mut h = harness(primary, fno_events).await;
    for a in actions {
        h.act(a).await;
    }
    h.settle().await?;
    h.check_converged().await
}

/// [`odata_fault_action`]s, with now and then a round of the pipeline (each app's changes sent,
/// capture, sequence, deliver once each): deliveries, where the services' faults are met, come
/// oftener than the steps drawn one by one in order would make them.
fn odata_actions() -> impl Strategy<Value = Vec<Action>> {
    let round = (1usize..10, 1usize..5).prop_map(|(limit, batch)| {
        let steps = [StepKind::Capture, StepKind::Sequence, StepKind::Deliver];
        std::iter::once(Action::Feeds { limit }).chain(steps.map(|step| Action::Step { step, batch })).collect()
    });
    let one = odata_fault_action().prop_map(|a| vec![a]);
    prop::collection::vec(prop_oneof![4 => one, 1 => round], 1..50).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(CASES_ODATA), ..ProptestConfig::default() })]
    #[test]
    fn converges_over_odata_services_under_faults(
        primary in side(),
        fno_events in any::<bool>(),
        actions in odata_actions(),
    ) {
        block_on(convergence_over_services(primary, fno_events, &actions))?;
    }
}

/// Edits on both sides, a delete, and a time-out after the write landed, with no other fault:
/// the services' changes come through ingress in each app's own format and both sides end in
/// step, the primary's value where both edited.
#[test]
fn edits_on_both_services_converge_through_their_events() {
    use Action::*;
    for fno_events in [true, false] {
        run(block_on(async {
            let mut h = harness(Side::A, fno_events).await;
            let made = h.act(&Edit { side: Side::A, recs: vec![Rec::Parent(0), Rec::Child(0, 1)] }).await;
            h.act(&Edit { side: Side::B, recs: vec![Rec::Parent(1), Rec::Parent(2)] }).await;
            h.drain().await?;
            h.check_converged().await?;
            prop_assert_eq!(h.value(Side::B, Rec::Child(0, 1)), Some(made[1].2));
            h.act(&Edit { side: Side::A, recs: vec![Rec::Parent(1)] }).await;
            h.act(&Edit { side: Side::B, recs: vec![Rec::Parent(1)] }).await;
            h.act(&Delete { side: Side::B, rec: Rec::Parent(2) }).await;
            h.act(&Service { side: Side::B, fault: odata_sample::Fault::LandThenStall(STALL), after: 1 }).await;
            h.drain().await?;
            h.check_converged().await?;
            prop_assert_eq!(h.value(Side::A, Rec::Parent(2)), None);
            let a1 = h.value(Side::A, Rec::Parent(1));
            prop_assert_eq!(h.value(Side::B, Rec::Parent(1)), a1);
            Ok(())
        }));
    }
}

// ---------------------------------------------------------------------------------------------
// What the property found, as fixed cases

/// Primary A. B's user creates p0 and it is synced to A; the job is stopped; A's service sends
/// the echo of that write, and B's user deletes p0: capture, the job stopped, records a row for
/// each ("retry it once the job is active"). The operator starts the job and retries: the rows
/// went to delivery as plain changes, A's first (first seen): A holding p0 and B not, it created
/// p0 on B again, and B's delete, behind it, found p0 there: the deleted record came back on
/// both sides. And alone, a delete's row retried found its record gone at the source and the
/// other side's copy not dualsync's create: skipped, never applied. A delete's row now says it
/// is one, and a retry runs it through the live path again, before the request's other rows.
#[test]
fn found_a_delete_captured_while_the_job_was_stopped_is_applied_when_retried() {
    use Action::*;
    let deliver = |batch| [StepKind::Capture, StepKind::Sequence, StepKind::Deliver].map(|step| Step { step, batch });
    // The echo of the synced create first, then the delete.
    let mut actions = vec![Edit { side: Side::B, recs: vec![Rec::Parent(0)] }, Feeds { limit: 9 }];
    actions.extend(deliver(4));
    actions.extend([
        Lifecycle(Op::Stop),
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 4 },
        // Rows are retried in the order first seen: the echo's row a second before the delete's.
        Advance { ms: 1000 },
        Delete { side: Side::B, rec: Rec::Parent(0) },
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 4 },
    ]);
    // The record created on A by its user, synced, then deleted on B while the job is stopped.
    let mut alone = vec![Edit { side: Side::A, recs: vec![Rec::Parent(0)] }, Feeds { limit: 9 }];
    alone.extend(deliver(4));
    alone.extend(deliver(4));
    alone.extend([
        Lifecycle(Op::Stop),
        Delete { side: Side::B, rec: Rec::Parent(0) },
        Feeds { limit: 9 },
        Step { step: StepKind::Capture, batch: 4 },
    ]);
    for (actions, fno_events) in [(&actions, true), (&actions, false), (&alone, true)] {
        run(block_on(async {
            let mut h = harness(Side::A, fno_events).await;
            for a in actions {
                h.act(a).await;
            }
            h.settle().await?;
            h.check_converged().await?;
            let got = [h.value(Side::A, Rec::Parent(0)), h.value(Side::B, Rec::Parent(0))];
            prop_assert_eq!(got, [None, None], "B's user deleted p0");
            let open: Vec<_> = h
                .error_rows()
                .await
                .into_iter()
                .filter(|e| e.retriable && matches!(e.status, ErrorStatus::Open | ErrorStatus::Retrying))
                .collect();
            prop_assert!(open.is_empty(), "rows left open: {:#?}", open);
            Ok(())
        }));
    }
}

/// Primary B (a harness bug, not the product's: the test's feed of service changes). B's user
/// creates p1, A's user a child of p1 (A has no p1); one delivery creates the child on B and then
/// p1 on A, and just before that write B's user deletes p1 with its children. The feed compared
/// the services' records after each action: the child, created and deleted on B within the
/// action, was never seen there, and B's delete of it never sent; A kept it. Users' changes now
/// go into the feeds as they are made.
#[test]
fn found_a_child_created_by_dualsync_and_deleted_by_a_user_in_one_delivery_is_deleted_on_both_sides() {
    use Action::*;
    let actions = [
        Edit { side: Side::B, recs: vec![Rec::Parent(0)] },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Step { step: StepKind::Deliver, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        DuringWrite { target: Side::A, side: Side::B, rec: Rec::Parent(1), delete: true },
        Delete { side: Side::A, rec: Rec::Parent(0) },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(0), Rec::Child(1, 1)] },
        Edit { side: Side::B, recs: vec![Rec::Parent(1)] },
        Feeds { limit: 6 },
        Step { step: StepKind::Capture, batch: 3 },
        Step { step: StepKind::Sequence, batch: 3 },
        Step { step: StepKind::Deliver, batch: 3 },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 4 },
        Step { step: StepKind::Sequence, batch: 4 },
        Step { step: StepKind::Deliver, batch: 4 },
    ];
    run(block_on(convergence_over_services(Side::B, false, &actions)));
}

/// Primary A. B's user creates p2, which is synced to A (a create, its echo from A not yet
/// delivered), then deletes it while the job is stopped: capture records the delete's row. When
/// the job started, the held delivery of A's echo came first: A holding what was last synced, B
/// nothing, delivery created p2 on B again (a record the other side lacks was always written)
/// and resolved the link's open rows, the delete's among them: the deleted record was back on
/// both sides, and the retry had nothing left to do. A target that lost the record since the
/// last sync, the source unchanged, with rows to retry on the link, is now the other side's
/// change: not written, its rows left open.
#[test]
fn found_a_delete_held_while_the_job_was_stopped_is_not_undone_by_the_other_sides_echo() {
    use Action::*;
    let actions = [
        Edit { side: Side::B, recs: vec![Rec::Parent(2), Rec::Parent(1)] },
        Feeds { limit: 2 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Step { step: StepKind::Deliver, batch: 1 },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Delete { side: Side::B, rec: Rec::Parent(2) },
        Delete { side: Side::A, rec: Rec::Parent(0) },
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Step { step: StepKind::Capture, batch: 1 },
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Step { step: StepKind::Deliver, batch: 1 },
        Lifecycle(Op::Stop),
        Feeds { limit: 1 },
        Step { step: StepKind::Capture, batch: 1 },
        Step { step: StepKind::Sequence, batch: 1 },
        Step { step: StepKind::Deliver, batch: 1 },
    ];
    run(block_on(convergence_over_services(Side::A, false, &actions)));
}

/// Primary A. A's and B's users each write child p0/1 (A's value wins the conflict), then A's
/// user deletes p0 with its child. B's change of the child, delivered after, finds it gone from A
/// and writes B's record, which holds A's value, back there. The job is stopped, and capture
/// records A's delete as a row. Started again, the echo of that write finds both sides in step,
/// and the sync resolved the delete's row with the link's others: the deleted child came back
/// on both sides, never retried. A delete's row is now resolved by its retry only.
#[test]
fn found_a_delete_held_while_the_job_was_stopped_is_not_resolved_by_a_sync_of_its_record() {
    use Action::*;
    let round = |limit, batch| {
        let steps = [StepKind::Capture, StepKind::Sequence, StepKind::Deliver].map(|step| Step { step, batch });
        std::iter::once(Feeds { limit }).chain(steps).collect::<Vec<_>>()
    };
    let mut actions = vec![
        Edit { side: Side::A, recs: vec![Rec::Child(0, 1)] },
        Edit { side: Side::B, recs: vec![Rec::Parent(0), Rec::Parent(0), Rec::Child(0, 1)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(0), Rec::Parent(0), Rec::Parent(0)] },
    ];
    actions.extend(round(1, 1));
    actions.extend([
        Edit { side: Side::A, recs: vec![Rec::Parent(0), Rec::Parent(0)] },
        Delete { side: Side::A, rec: Rec::Parent(0) },
    ]);
    for (limit, batch) in [(2, 3), (1, 3), (1, 1)] {
        actions.extend(round(limit, batch));
    }
    actions.push(Lifecycle(Op::Stop));
    actions.extend(round(2, 2));
    run(block_on(convergence_over_services(Side::A, false, &actions)));
}

/// Primary A. A's user creates p1 and deletes it; B's user creates p1 (and a child of it) after
/// that. Capture of A's delete read B's new p1 and marked the delete begun with its version,
/// then could not read A (a 503) and was retried. Meanwhile B's p1 reached A. Run again, the
/// delete found B's record still at the marked version and deleted it, without the source
/// check a first run makes: p1 stayed on A alone, with no error. A delete run again now reads
/// the source first, like a first run, and B's p1, back at A, wins over it.
#[test]
fn found_a_delete_run_again_after_its_source_was_unreachable_reads_the_source_first() {
    use Action::*;
    use StepKind::*;
    let st = |step, batch| Step { step, batch };
    let actions = [
        Edit { side: Side::A, recs: vec![Rec::Parent(0)] },
        Feeds { limit: 1 },
        st(Capture, 1),
        st(Sequence, 1),
        st(Deliver, 1),
        Edit { side: Side::A, recs: vec![Rec::Child(0, 1)] },
        Feeds { limit: 1 },
        st(Capture, 1),
        st(Sequence, 1),
        st(Deliver, 1),
        Edit { side: Side::B, recs: vec![Rec::Child(1, 1)] },
        Service { side: Side::A, fault: odata_sample::Fault::Status(503), after: 5 },
        Edit { side: Side::A, recs: vec![Rec::Parent(2)] },
        Edit { side: Side::A, recs: vec![Rec::Parent(1), Rec::Parent(0)] },
        Delete { side: Side::A, rec: Rec::Parent(1) },
        Feeds { limit: 1 },
        st(Capture, 1),
        st(Sequence, 1),
        st(Deliver, 1),
        Edit { side: Side::B, recs: vec![Rec::Parent(1)] },
        Feeds { limit: 2 },
        st(Capture, 3),
        st(Sequence, 3),
        st(Deliver, 3),
        Feeds { limit: 2 },
        st(Capture, 3),
    ];
    run(block_on(convergence_over_services(Side::A, false, &actions)));
}
