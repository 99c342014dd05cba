//! An OData v4 sample service that behaves like Dataverse or fno where they differ (issue 10 item 9),
//! on a loopback port, with faults on demand.
//!
//! - Dataverse (`/api/data/v9.2/`): records have a GUID id (`<set>id`, always returned) and an
//!   alternate key; `PATCH` by key is an upsert (`If-None-Match: *` makes it create-only, an
//!   existing record answers 412 `0x80060892`); `If-Match` with a stale etag answers 412
//!   `0x80060882`, on a missing record 404 `0x80060891`; a `POST` with a taken key answers
//!   `0x80040237`; string comparisons ignore case; key values holding `/ < > * % & : \ ? +` are
//!   refused in a URL; more than `max_concurrent` requests in flight answer 429 `0x80072326`
//!   with Retry-After, and so do requests past the request-count or execution-time window
//!   when `Options::protection` is on (`protection`); validation failures are 400 `0x80044331`.
//! - fno (`/data/`): keys include `dataAreaId`; collections show the default company's records
//!   unless `cross-company=true`; `PATCH` on a missing record is 404 (no upsert); a duplicate
//!   `POST` and validation failures answer 500 with the Infolog in `innererror` (naming the
//!   value, as fno does: the connector must keep it out of its messages).
//! - generic: a duplicate `POST` is 409; validation 400.
//!
//! Every flavor: weak etags (`W/"n"`), `$select`, `$filter` (`eq`, `and`, `or`, parentheses),
//! `$orderby`, `$top`, server-driven paging (`Prefer: odata.maxpagesize`, `$skiptoken` in
//! `@odata.nextLink`: absolute for Dataverse, relative for the others), `return=representation`,
//! `odata.metadata=full` (`@odata.id`), Dataverse change tracking (`Prefer: odata.track-changes`,
//! delta links with `$deltatoken`, `$deletedEntity`, expired tokens on demand, `EntityDefinitions`
//! for a set's primary id attribute), multipart `$batch` with change sets (atomic) and
//! `odata.continue-on-error`, OAuth2 client credentials at `/token`. Numbers are stored as the
//! text they came in, so a decimal is never rounded here either.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use dualsync::adapters::connectors::odata::batch;

mod store;
use store::{Rows, Slot, SortValue};

pub mod events;
pub use events::{EventKey, Subscription, UserTx};
mod protection;
pub use protection::Protection;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dataverse,
    Fno,
    Generic,
}

/// A fault the next matching request meets.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 with this Retry-After (seconds), Dataverse's request-count code.
    Throttle(u64),
    /// This status with a plain error body.
    Status(u16),
    /// Answer after this delay.
    Delay(Duration),
    /// Do the work, then stall this long before answering (a time-out after the write landed).
    LandThenStall(Duration),
}

#[derive(Debug, Clone)]
pub struct Logged {
    /// When the request came in, and when its answer went out.
    pub arrived: Instant,
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Requests inside a `$batch` (0 for others).
    pub parts: usize,
}

#[derive(Debug, Clone)]
struct Row {
    id: String,
    etag: u64,
    /// Property → raw JSON text.
    props: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct Set {
    keys: Vec<String>,
    /// Dataverse's primary id property.
    id_field: Option<String>,
    rows: Rows,
    /// Field → longest text accepted.
    max_len: BTreeMap<String, usize>,
    /// Dataverse lookups: held as the parent's id in `_<name>_value`.
    lookups: Vec<LookupDecl>,
    /// The properties `$metadata` would list, when declared: `$select` of another is refused.
    properties: Option<BTreeSet<String>>,
    /// Dataverse: the alternate key's index status (`Active` unless set).
    key_status: Option<String>,
    /// Change tracking: (change number of the delete, record id) of each deleted record.
    tombstones: Vec<(u64, String)>,
}

/// A Dataverse lookup: the property `_<name>_value` (the parent's GUID, read-only), written
/// only through `<navigation>@odata.bind`, read as the parent by `$expand=<navigation>`.
#[derive(Debug, Clone)]
struct LookupDecl {
    name: String,
    navigation: String,
    target: String,
}

impl LookupDecl {
    fn property(&self) -> String {
        format!("_{}_value", self.name)
    }
}

#[derive(Debug, Clone, Default)]
struct Store {
    sets: BTreeMap<String, Set>,
    etag: u64,
    /// Change tracking: delta tokens below this have expired.
    min_token: u64,
}

pub struct Shared {
    pub kind: Kind,
    base: String,
    origin: Mutex<String>,
    store: Mutex<Store>,
    faults: Mutex<VecDeque<Fault>>,
    pub log: Mutex<Vec<Logged>>,
    in_flight: AtomicUsize,
    pub most_in_flight: AtomicUsize,
    pub max_concurrent: usize,
    /// Dataverse's request-count and execution-time window, when on.
    window: Option<protection::Window>,
    /// Answers that were 429 (service protection), whatever the cause.
    pub throttled: AtomicUsize,
    /// Added to every request (see [`Options::latency`]).
    pub latency: Duration,
    pub max_page: usize,
    /// (client id, secret) when OAuth is on.
    auth: Option<(String, String)>,
    tokens: Mutex<Vec<String>>,
    pub token_requests: AtomicUsize,
    pub token_lifetime_secs: u64,
    pub default_company: String,
    /// The user's edits on their way to the subscription, if any ([`events`]).
    events: events::Outbox,
}

pub struct Server {
    pub shared: Arc<Shared>,
    /// The service root, ending in `/`.
    pub url: String,
    pub token_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct Options {
    /// Dataverse: requests in flight above this answer 429 (service protection).
    pub max_concurrent: usize,
    pub max_page: usize,
    pub auth: Option<(String, String)>,
    pub token_lifetime_secs: u64,
    /// Every request takes this long more, counted in flight: a WAN round trip to the
    /// service (the bench runs with 20 ms). Zero by default.
    pub latency: Duration,
    /// Dataverse: the request-count and execution-time limits over a sliding window
    /// ([`Protection::DATAVERSE`]). Off by default.
    pub protection: Option<Protection>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_concurrent: 52,
            max_page: 5000,
            auth: None,
            token_lifetime_secs: 3600,
            latency: Duration::ZERO,
            protection: None,
        }
    }
}

/// What a service was asked, from its log: for figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// HTTP requests, a `$batch` counting as one (token requests left out).
    pub requests: usize,
    /// `$batch` requests among them, and the requests they carried.
    pub batches: usize,
    pub batch_parts: usize,
    /// Answers that were 429.
    pub throttled: usize,
    /// The service's own time on them (arrival to answer, less the added latency).
    pub execution: Duration,
}

impl Server {
    pub async fn start(kind: Kind, opts: Options) -> Server {
        let base = match kind {
            Kind::Dataverse => "/api/data/v9.2/",
            Kind::Fno => "/data/",
            Kind::Generic => "/odata/",
        };
        let shared = Arc::new(Shared {
            kind,
            base: base.to_string(),
            origin: Mutex::new(String::new()),
            store: Mutex::new(Store::default()),
            faults: Mutex::new(VecDeque::new()),
            log: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
            max_concurrent: opts.max_concurrent,
            window: opts.protection.filter(|_| kind == Kind::Dataverse).map(protection::Window::new),
            throttled: AtomicUsize::new(0),
            latency: opts.latency,
            max_page: opts.max_page,
            auth: opts.auth,
            tokens: Mutex::new(Vec::new()),
            token_requests: AtomicUsize::new(0),
            token_lifetime_secs: opts.token_lifetime_secs,
            default_company: "usmf".into(),
            events: events::Outbox::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let origin = format!("http://{addr}");
        *shared.origin.lock().unwrap() = origin.clone();
        let s = shared.clone();
        let app =
            Router::new().fallback(move |method: Method, uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let s = s.clone();
                async move { s.serve(method, uri, headers, body).await }
            });
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Server { url: format!("{origin}{base}"), token_url: format!("{origin}/token"), shared, task }
    }

    /// Declares an entity set with its key fields (Dataverse: the alternate key; its id field
    /// is `<singular>id`, given here).
    pub fn add_set(&self, name: &str, keys: &[&str], id_field: Option<&str>) {
        let mut st = self.shared.store.lock().unwrap();
        let keys: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
        st.sets.insert(
            name.to_string(),
            Set {
                rows: Rows::new(&keys, self.shared.kind),
                keys,
                id_field: id_field.map(str::to_string),
                max_len: BTreeMap::new(),
                lookups: Vec::new(),
                properties: None,
                key_status: None,
                tombstones: Vec::new(),
            },
        );
    }

    /// Declares the properties of `set` (besides its keys): a `$select` of any other is refused
    /// as the service refuses an unknown property.
    pub fn declare(&self, set: &str, properties: &[&str]) {
        let mut st = self.shared.store.lock().unwrap();
        let s = st.sets.get_mut(set).unwrap();
        let mut declared: BTreeSet<String> = properties.iter().map(|p| p.to_string()).collect();
        declared.extend(s.keys.iter().cloned());
        s.properties = Some(declared);
    }

    /// Dataverse: the status of `set`'s alternate key (Pending, InProgress, Active, Failed).
    pub fn key_status(&self, set: &str, status: &str) {
        self.shared.store.lock().unwrap().sets.get_mut(set).unwrap().key_status = Some(status.to_string());
    }

    /// Declares a Dataverse lookup of `set`: `_<name>_value` holds a record id of `target`,
    /// set only by `<navigation>@odata.bind`.
    pub fn add_lookup(&self, set: &str, name: &str, navigation: &str, target: &str) {
        let mut st = self.shared.store.lock().unwrap();
        st.sets.get_mut(set).unwrap().lookups.push(LookupDecl {
            name: name.into(),
            navigation: navigation.into(),
            target: target.into(),
        });
    }

    /// The etag number of a record (`W/"<n>"`; the change number of its last change), by key
    /// values: what a Dataverse webhook tells as its `RowVersion`.
    pub fn etag_of(&self, set: &str, key: &[Value]) -> Option<u64> {
        self.find(set, key, |r| r.etag)
    }

    /// The id of a record (Dataverse's primary id), by key values.
    pub fn id_of(&self, set: &str, key: &[Value]) -> Option<String> {
        self.find(set, key, |r| r.id.clone())
    }

    /// What `f` takes from the record of `set` with these key values (JSON each), if any.
    fn find<T>(&self, set: &str, key: &[Value], f: impl Fn(&Row) -> T) -> Option<T> {
        let st = self.shared.store.lock().unwrap();
        let s = st.sets.get(set)?;
        let key: Vec<String> = key.iter().map(|v| v.to_string()).collect();
        s.rows.find_key(&key).map(|slot| f(&s.rows[slot]))
    }

    pub fn max_len(&self, set: &str, field: &str, n: usize) {
        self.shared.store.lock().unwrap().sets.get_mut(set).unwrap().max_len.insert(field.to_string(), n);
    }

    /// Puts a record as a user of the app would (new etag).
    pub fn put(&self, set: &str, record: Value) {
        self.put_raw(set, &record.to_string());
    }

    /// As [`Self::put`], from JSON text: numbers are kept as written.
    pub fn put_raw(&self, set: &str, json_text: &str) {
        let change = self.put_change(set, json_text);
        self.shared.events.send(self.shared.kind, vec![change]);
    }

    /// A user's put, applied: what its event tells.
    fn put_change(&self, set: &str, json_text: &str) -> events::Change {
        let mut st = self.shared.store.lock().unwrap();
        st.etag += 1;
        let etag = st.etag;
        let s = st.sets.get_mut(set).unwrap();
        let props = parse_props(json_text.as_bytes()).unwrap();
        let key: Vec<String> = s.keys.iter().map(|k| props.get(k).cloned().unwrap_or_default()).collect();
        let given = props.clone();
        let (op, row) = match s.rows.find_key(&key) {
            // The same key: the merge cannot take another record's.
            Some(slot) => (events::Op::Update, s.rows.update(slot, props, etag).ok().cloned()),
            None => {
                let row = Row { id: uuid::Uuid::new_v4().to_string(), etag, props };
                s.rows.insert(row.clone());
                (events::Op::Create, Some(row))
            }
        };
        let row = row.expect("the record just written");
        events::Change { set: set.into(), op, id: row.id, version: etag, keys: s.keys.clone(), given, image: row.props }
    }

    /// Raw JSON text of a record's properties, by key values (JSON text each).
    pub fn get(&self, set: &str, key: &[Value]) -> Option<BTreeMap<String, String>> {
        self.find(set, key, |r| r.props.clone())
    }

    pub fn count(&self, set: &str) -> usize {
        self.shared.store.lock().unwrap().sets.get(set).map_or(0, |s| s.rows.len())
    }

    /// Deletes a record as a user of the app would (change tracking notes it).
    pub fn delete(&self, set: &str, key: &[Value]) -> bool {
        let change = self.delete_change(set, key);
        let found = change.is_some();
        self.shared.events.send(self.shared.kind, change.into_iter().collect());
        found
    }

    /// A user's delete, applied: what its event tells (`None`: no such record).
    fn delete_change(&self, set: &str, key: &[Value]) -> Option<events::Change> {
        let key: Vec<String> = key.iter().map(|v| v.to_string()).collect();
        let mut st = self.shared.store.lock().unwrap();
        st.etag += 1;
        let e = st.etag;
        let s = st.sets.get_mut(set).unwrap();
        let row = s.rows.find_key(&key).and_then(|slot| s.rows.remove(slot))?;
        s.tombstones.push((e, row.id.clone()));
        let (op, keys) = (events::Op::Delete, s.keys.clone());
        Some(events::Change {
            set: set.into(),
            op,
            id: row.id,
            version: e,
            keys,
            given: BTreeMap::new(),
            image: row.props,
        })
    }

    /// Deletes a record by its id alone, the way a record created and deleted between two
    /// polls looks to change tracking: a tombstone for an id no client saw.
    pub fn tombstone(&self, set: &str, id: &str) {
        let mut st = self.shared.store.lock().unwrap();
        st.etag += 1;
        let e = st.etag;
        st.sets.get_mut(set).unwrap().tombstones.push((e, id.to_string()));
    }

    /// Expires every delta token given so far: a delta request with one answers Dataverse's
    /// `ExpiredVersionStamp` (changes older than `ExpireChangeTrackingInDays`).
    pub fn expire_tokens(&self) {
        let mut st = self.shared.store.lock().unwrap();
        st.etag += 1;
        st.min_token = st.etag;
    }

    pub fn fault(&self, f: Fault) {
        self.shared.faults.lock().unwrap().push_back(f);
    }

    /// Drops the faults no request has met yet.
    pub fn clear_faults(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    pub fn log(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_log(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// The most requests, and the most execution time, that any window of `span` held (by
    /// arrival; token requests and 429s left out): how close a run came to the protection
    /// limits.
    pub fn busiest(&self, span: Duration) -> (usize, Duration) {
        let log = self.shared.log.lock().unwrap();
        let mut served: Vec<(Instant, Duration)> = log
            .iter()
            .filter(|l| !l.path.starts_with("/token") && l.status != 429)
            .map(|l| (l.arrived, l.at.duration_since(l.arrived).saturating_sub(self.shared.latency)))
            .collect();
        served.sort_by_key(|(at, _)| *at);
        let (mut most, mut most_execution, mut execution, mut first) = (0, Duration::ZERO, Duration::ZERO, 0);
        for (i, (at, spent)) in served.iter().enumerate() {
            execution += *spent;
            while served[first].0 + span <= *at {
                execution -= served[first].1;
                first += 1;
            }
            most = most.max(i + 1 - first);
            most_execution = most_execution.max(execution);
        }
        (most, most_execution)
    }

    /// Requests, batches and 429s served so far.
    pub fn traffic(&self) -> Traffic {
        let log = self.shared.log.lock().unwrap();
        let mut t = Traffic { throttled: self.shared.throttled.load(Ordering::SeqCst), ..Traffic::default() };
        for l in log.iter().filter(|l| !l.path.starts_with("/token")) {
            t.requests += 1;
            t.execution += l.at.duration_since(l.arrived).saturating_sub(self.shared.latency);
            if l.parts > 0 {
                t.batches += 1;
                t.batch_parts += l.parts;
            }
        }
        t
    }
}

fn norm(text: &str, kind: Kind) -> String {
    if kind == Kind::Dataverse {
        text.to_lowercase()
    } else {
        text.to_string()
    }
}

fn norm_key(key: &[String], kind: Kind) -> Vec<String> {
    key.iter().map(|k| norm(&canon_json(k), kind)).collect()
}

/// JSON text compared by value: numbers by their decimal value, strings by their text.
fn canon_json(raw: &str) -> String {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::String(s)) => format!("s:{s}"),
        Ok(Value::Number(_)) => format!(
            "n:{}",
            dualsync::adapters::connectors::odata::values::canonical_decimal(raw.trim()).unwrap_or_default()
        ),
        Ok(other) => format!("o:{other}"),
        Err(_) => format!("x:{raw}"),
    }
}

/// What a collection GET asks, besides the set.
struct Listing<'a> {
    /// The raw query string (a next link repeats it).
    query: &'a str,
    q: &'a HashMap<String, String>,
    select: Option<&'a [String]>,
    full: bool,
    prefer: Option<String>,
    cross: bool,
}

/// An answer inside the server: status, headers, JSON body (or none).
#[derive(Debug, Clone)]
struct Ans {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Ans {
    fn json(status: u16, v: Value) -> Ans {
        Ans {
            status,
            headers: vec![("Content-Type".into(), "application/json; odata.metadata=minimal".into())],
            body: v.to_string().into_bytes(),
        }
    }
    fn text(status: u16, text: String) -> Ans {
        Ans {
            status,
            headers: vec![("Content-Type".into(), "application/json; odata.metadata=minimal".into())],
            body: text.into_bytes(),
        }
    }
    fn empty(status: u16) -> Ans {
        Ans { status, headers: vec![], body: vec![] }
    }
    fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

const UNADDRESSABLE: &[char] = &['/', '<', '>', '*', '%', '&', ':', '\\', '?', '+'];

impl Shared {
    fn err(&self, status: u16, code: &str, message: &str) -> Ans {
        Ans::json(status, json!({"error": {"code": code, "message": message}}))
    }

    /// fno's way of failing a write: 500 with the Infolog in innererror.
    fn fno_write_error(&self, infolog: &str) -> Ans {
        Ans::json(
            500,
            json!({"error": {"code": "", "message": "An error has occurred.", "innererror": {
                "message": format!("Write failed for table row. Infolog: {infolog}"),
                "type": "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException",
                "stacktrace": "   at Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataDelegatingHandler.SendAsync"
            }}}),
        )
    }

    async fn serve(self: Arc<Self>, method: Method, uri: axum::http::Uri, headers: HeaderMap, body: Bytes) -> Response {
        let arrived = Instant::now();
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let path = uri.path().to_string();
        let query = uri.query().unwrap_or_default().to_string();
        let hdr = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
        let fault = if path == "/token" { None } else { self.faults.lock().unwrap().pop_front() };
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        let mut stall = None;
        let mut parts = 0;
        // Whether the window counted this request (its execution time is added at the end).
        let mut admitted = false;
        let ans = if path == "/token" {
            self.token(&body)
        } else if !self.authorized(hdr("authorization")) {
            self.err(401, "0x80072560", "The user is not a member of the organization.")
        } else if self.kind == Kind::Dataverse && now > self.max_concurrent {
            let mut a = self.err(429, "0x80072326", "Number of concurrent requests exceeded the limit of 52.");
            a.headers.push(("Retry-After".into(), "1".into()));
            a
        } else if let Some(refused) = self.window.as_ref().and_then(|w| w.admit(arrived).err()) {
            let mut a = self.err(429, refused.code, &refused.message);
            a.headers.push(("Retry-After".into(), refused.retry_after_secs.to_string()));
            a
        } else {
            admitted = true;
            match fault {
                Some(Fault::Throttle(secs)) => {
                    let mut a = self.err(
                        429,
                        "0x80072322",
                        "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
                    );
                    a.headers.push(("Retry-After".into(), secs.to_string()));
                    a
                }
                Some(Fault::Status(s)) => self.err(s, "", "The service is unavailable."),
                f => {
                    if let Some(Fault::Delay(d)) = f {
                        tokio::time::sleep(d).await;
                    }
                    if let Some(Fault::LandThenStall(d)) = f {
                        stall = Some(d);
                    }
                    let content_type = hdr("content-type").unwrap_or_default();
                    if path == format!("{}$batch", self.base)
                        && method == Method::POST
                        && content_type.starts_with("application/json")
                    {
                        let (a, n) = self.json_batch(&hdr("prefer").unwrap_or_default(), &body);
                        parts = n;
                        a
                    } else if path == format!("{}$batch", self.base) && method == Method::POST {
                        let (a, n) = self.batch(
                            hdr("content-type").unwrap_or_default(),
                            hdr("prefer").unwrap_or_default(),
                            &body,
                        );
                        parts = n;
                        a
                    } else {
                        let h: Vec<(String, String)> = headers
                            .iter()
                            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or_default().to_string()))
                            .collect();
                        self.handle(method.as_str(), &path, &query, &h, &body)
                    }
                }
            }
        };
        if let Some(d) = stall {
            tokio::time::sleep(d).await;
        }
        if ans.status == 429 {
            self.throttled.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(w) = self.window.as_ref().filter(|_| admitted) {
            let now = Instant::now();
            w.spent(now, now.duration_since(arrived).saturating_sub(self.latency));
        }
        self.log.lock().unwrap().push(Logged {
            arrived,
            at: Instant::now(),
            method: method.to_string(),
            path: format!("{path}?{query}"),
            status: ans.status,
            parts,
        });
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut resp = (StatusCode::from_u16(ans.status).unwrap(), ans.body).into_response();
        for (k, v) in ans.headers {
            resp.headers_mut().insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        resp
    }

    fn token(&self, body: &[u8]) -> Ans {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let form: HashMap<String, String> = String::from_utf8_lossy(body)
            .split('&')
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.to_string(), decode(&v.replace('+', " "))))
            .collect();
        let Some((id, secret)) = &self.auth else { return Ans::json(400, json!({"error": "unsupported"})) };
        if form.get("grant_type").map(String::as_str) != Some("client_credentials")
            || form.get("client_id") != Some(id)
            || form.get("client_secret") != Some(secret)
            || !form.get("scope").is_some_and(|s| s.ends_with("/.default"))
        {
            return Ans::json(
                401,
                json!({"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."}),
            );
        }
        let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
        self.tokens.lock().unwrap().push(token.clone());
        Ans::json(200, json!({"token_type": "Bearer", "expires_in": self.token_lifetime_secs, "access_token": token}))
    }

    fn authorized(&self, header: Option<String>) -> bool {
        if self.auth.is_none() {
            return true;
        }
        match header.and_then(|h| h.strip_prefix("Bearer ").map(str::to_string)) {
            Some(t) => self.tokens.lock().unwrap().contains(&t),
            None => false,
        }
    }

    /// Revokes every token issued so far (the next request with one answers 401).
    pub fn revoke_tokens(&self) {
        self.tokens.lock().unwrap().clear();
    }

    fn batch(&self, content_type: String, prefer: String, body: &[u8]) -> (Ans, usize) {
        let items = match batch::decode_requests(&content_type, body) {
            Ok(i) => i,
            Err(e) => return (self.err(400, "0x80060891", &format!("malformed batch: {e}")), 0),
        };
        let count: usize = items
            .iter()
            .map(|i| match i {
                batch::ParsedItem::Single(_) => 1,
                batch::ParsedItem::ChangeSet(r) => r.len(),
            })
            .sum();
        if count > 1000 {
            return (self.err(400, "0x8006088a", "The number of requests in a batch exceeds 1000."), count);
        }
        let go_on = prefer.contains("odata.continue-on-error");
        let mut out = Vec::new();
        let mut is_cs = Vec::new();
        for item in items {
            let (answers, cs, failed) = match item {
                batch::ParsedItem::Single(r) => {
                    let a = self.part(&r);
                    let failed = !a.ok();
                    (vec![(a, r.content_id)], false, failed)
                }
                batch::ParsedItem::ChangeSet(rs) => {
                    let snapshot = self.store.lock().unwrap().clone();
                    let mut answers = Vec::new();
                    let mut failed = false;
                    for r in &rs {
                        let a = self.part(r);
                        if !a.ok() {
                            // A change set fails whole: undo it, answer its failure alone.
                            *self.store.lock().unwrap() = snapshot.clone();
                            answers = vec![(a, r.content_id.clone())];
                            failed = true;
                            break;
                        }
                        answers.push((a, r.content_id.clone()));
                    }
                    (answers, !failed, failed)
                }
            };
            out.push(
                answers
                    .into_iter()
                    .map(|(a, id)| batch::Response {
                        status: a.status,
                        headers: a.headers,
                        body: a.body,
                        content_id: id,
                    })
                    .collect::<Vec<_>>(),
            );
            is_cs.push(cs);
            if failed && !go_on {
                break;
            }
        }
        let boundary = format!("batchresponse_{}", uuid::Uuid::new_v4().simple());
        let mut a = Ans {
            status: 200,
            headers: vec![("Content-Type".into(), format!("multipart/mixed; boundary={boundary}"))],
            body: batch::encode_responses(&boundary, &out, &is_cs),
        };
        if go_on {
            a.headers.push(("Preference-Applied".into(), "odata.continue-on-error".into()));
        }
        (a, count)
    }

    /// A JSON `$batch` (OData 4.01), served by generic services only: requests of one
    /// atomicity group succeed or fail together; the responses go out last first, as the
    /// format allows any order (the client matches them by id).
    fn json_batch(&self, prefer: &str, body: &[u8]) -> (Ans, usize) {
        if self.kind != Kind::Generic {
            return (self.err(400, "0x80060891", "The batch request must be multipart/mixed."), 0);
        }
        let requests: Vec<Value> = match serde_json::from_slice::<Value>(body) {
            Ok(v) => v["requests"].as_array().cloned().unwrap_or_default(),
            Err(e) => return (self.err(400, "", &format!("malformed JSON batch: {e}")), 0),
        };
        let go_on = prefer.contains("odata.continue-on-error");
        let mut responses = Vec::new();
        let mut i = 0;
        while i < requests.len() {
            let group = requests[i]["atomicityGroup"].as_str().map(str::to_string);
            let mut end = i + 1;
            while group.is_some()
                && end < requests.len()
                && requests[end]["atomicityGroup"].as_str() == group.as_deref()
            {
                end += 1;
            }
            let snapshot = self.store.lock().unwrap().clone();
            let mut answered = Vec::new();
            let mut failed = false;
            for r in &requests[i..end] {
                let headers: Vec<(String, String)> = r["headers"]
                    .as_object()
                    .map(|h| h.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string())).collect())
                    .unwrap_or_default();
                let body = r.get("body").map(|b| b.to_string().into_bytes()).unwrap_or_default();
                let parsed = batch::ParsedRequest {
                    method: r["method"].as_str().unwrap_or_default().to_ascii_uppercase(),
                    url: r["url"].as_str().unwrap_or_default().to_string(),
                    headers,
                    body,
                    content_id: r["id"].as_str().map(str::to_string),
                };
                let a = self.part(&parsed);
                failed = !a.ok();
                answered.push((parsed.content_id, a));
                if failed {
                    break;
                }
            }
            if failed && group.is_some() {
                *self.store.lock().unwrap() = snapshot;
                answered.drain(..answered.len() - 1);
            }
            for (id, a) in answered {
                let body: Value = serde_json::from_slice(&a.body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&a.body).into_owned()));
                let headers: serde_json::Map<String, Value> =
                    a.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone()))).collect();
                let mut r = json!({ "id": id, "status": a.status, "headers": headers });
                if !a.body.is_empty() {
                    r["body"] = body;
                }
                responses.push(r);
            }
            if failed && !go_on {
                break;
            }
            i = end;
        }
        responses.reverse();
        let mut a = Ans::json(200, json!({ "responses": responses }));
        if go_on {
            a.headers.push(("Preference-Applied".into(), "odata.continue-on-error".into()));
        }
        (a, requests.len())
    }

    fn part(&self, r: &batch::ParsedRequest) -> Ans {
        let origin = self.origin.lock().unwrap().clone();
        let url = r.url.strip_prefix(&origin).unwrap_or(&r.url);
        let (path, query) = url.split_once('?').unwrap_or((url, ""));
        self.handle(&r.method, path, query, &r.headers, &r.body)
    }

    fn handle(&self, method: &str, path: &str, query: &str, headers: &[(String, String)], body: &[u8]) -> Ans {
        let hdr = |n: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(n)).map(|(_, v)| v.clone());
        let Some(rest) = path.strip_prefix(&self.base) else { return self.err(404, "", "no such path") };
        let rest = decode(rest);
        let q = parse_query(query);
        let cross = q.get("cross-company").map(String::as_str) == Some("true");
        let (set_name, pred) = match rest.find('(') {
            Some(i) if rest.ends_with(')') => (rest[..i].to_string(), Some(rest[i + 1..rest.len() - 1].to_string())),
            _ => (rest.clone(), None),
        };
        let mut guard = self.store.lock().unwrap();
        let st = &mut *guard;
        if method == "GET" && rest.is_empty() {
            return self.service_document(st);
        }
        if method == "GET" && set_name == "EntityDefinitions" && self.kind == Kind::Dataverse {
            return self.entity_definitions(st, &q);
        }
        // Borrowed, never copied: a request costs the records it touches, not the set's size.
        let Some(set) = st.sets.get(&set_name) else {
            return self.err(404, "0x80060888", &format!("Resource not found for the segment '{set_name}'."));
        };
        let full = hdr("accept").is_some_and(|a| a.contains("odata.metadata=full"));
        let repr = hdr("prefer").is_some_and(|p| p.contains("return=representation"));
        let select: Option<Vec<String>> = q.get("$select").map(|s| s.split(',').map(str::to_string).collect());
        let kind = self.kind;
        // A navigation property, or a lookup's own name, is not a property: Dataverse refuses
        // it in $select (its `_<name>_value` may be selected).
        if let Some(bad) =
            select.iter().flatten().find(|f| set.lookups.iter().any(|l| **f == l.name || **f == l.navigation))
        {
            return self.err(
                400,
                "0x80060888",
                &format!("Could not find a property named '{bad}' on type 'Microsoft.Dynamics.CRM.{set_name}'."),
            );
        }
        if let (Some(props), Some(sel)) = (&set.properties, &select) {
            if let Some(bad) = sel.iter().find(|f| !props.contains(*f)) {
                return self.err(
                    400,
                    "0x80060888",
                    &format!("Could not find a property named '{bad}' on type 'Microsoft.Dynamics.CRM.{set_name}'."),
                );
            }
        }
        let tracking = hdr("prefer").is_some_and(|p| p.contains("odata.track-changes"));
        match (method, pred) {
            ("GET", None) if kind == Kind::Dataverse && (tracking || q.contains_key("$deltatoken")) => {
                self.track(st, &set_name, set, &q, select.as_deref(), hdr("prefer"), tracking)
            }
            ("GET", None) => {
                let listing = Listing { query, q: &q, select: select.as_deref(), full, prefer: hdr("prefer"), cross };
                self.list(st, &set_name, set, listing)
            }
            ("POST", None) => {
                let props = match parse_props(body)
                    .map_err(|m| self.err(400, "0x80048d19", &m))
                    .and_then(|p| self.bind(st, set, body, p))
                {
                    Ok(p) => p,
                    Err(a) => return a,
                };
                let key: Vec<String> = set.keys.iter().map(|k| props.get(k).cloned().unwrap_or_default()).collect();
                if key.iter().any(|k| k.is_empty()) {
                    return self.err(400, "0x80040203", "A key field is missing.");
                }
                if let Some(a) = self.validate(set, &props) {
                    return a;
                }
                if set.rows.find_key(&key).is_some() {
                    return self.duplicate(&set_name);
                }
                st.etag += 1;
                let row = Row { id: uuid::Uuid::new_v4().to_string(), etag: st.etag, props };
                let set = st.sets.get_mut(&set_name).unwrap();
                let slot = set.rows.insert(row);
                let set = &st.sets[&set_name];
                self.written(201, &set_name, set, &set.rows[slot], repr, select.as_deref())
            }
            (m, Some(pred)) => {
                let found = match self.find(set, &pred) {
                    Ok(i) => i,
                    Err(a) => return a,
                };
                // fno without cross-company sees its default company only.
                let found = found.filter(|&i| {
                    kind != Kind::Fno
                        || cross
                        || set.rows[i].props.get("dataAreaId").map(|c| c.to_lowercase())
                            == Some(format!("\"{}\"", self.default_company))
                });
                let if_match = hdr("if-match");
                let if_none = hdr("if-none-match");
                if let (Some(im), Some(i)) = (&if_match, found) {
                    if im != "*" && *im != etag(set.rows[i].etag) {
                        return match kind {
                            Kind::Dataverse => self.err(
                                412,
                                "0x80060882",
                                "The version of the existing record doesn't match the RowVersion property provided.",
                            ),
                            _ => self.err(412, "", "The etag of the entity does not match the If-Match header."),
                        };
                    }
                }
                match m {
                    "GET" => match found {
                        Some(i) => {
                            let expand = match self.expand(set, &q) {
                                Ok(e) => e,
                                Err(a) => return a,
                            };
                            let row = &set.rows[i];
                            let extra = self.expanded(st, row, &expand);
                            let mut a =
                                Ans::text(200, self.entity(&set_name, set, row, select.as_deref(), full, &extra));
                            a.headers.push(("ETag".into(), etag(row.etag)));
                            a
                        }
                        None => self.not_found(&set_name),
                    },
                    "DELETE" => match found {
                        Some(i) => {
                            st.etag += 1;
                            let e = st.etag;
                            let s = st.sets.get_mut(&set_name).unwrap();
                            if let Some(row) = s.rows.remove(i) {
                                s.tombstones.push((e, row.id));
                            }
                            Ans::empty(204)
                        }
                        None => self.not_found(&set_name),
                    },
                    "PATCH" => {
                        let props = match parse_props(body)
                            .map_err(|m| self.err(400, "0x80048d19", &m))
                            .and_then(|p| self.bind(st, set, body, p))
                        {
                            Ok(p) => p,
                            Err(a) => return a,
                        };
                        if let Some(a) = self.validate(set, &props) {
                            return a;
                        }
                        let url_key = match self.pred_values(set, &pred) {
                            Ok(v) => v,
                            Err(a) => return a,
                        };
                        for (k, v) in &url_key {
                            if props.get(k).is_some_and(|b| norm(&canon_json(b), kind) != norm(&canon_json(v), kind)) {
                                return self.err(400, "0x80040203", "A key value in the body differs from the URL.");
                            }
                        }
                        match found {
                            Some(i) => {
                                if if_none.as_deref() == Some("*") {
                                    return self.err(
                                        412,
                                        "0x80060892",
                                        "A record with matching key values already exists.",
                                    );
                                }
                                st.etag += 1;
                                let e = st.etag;
                                // Addressed by id, the body may change the key: not to another record's.
                                if st.sets.get_mut(&set_name).unwrap().rows.update(i, props, e).is_err() {
                                    return self.duplicate(&set_name);
                                }
                                let set = &st.sets[&set_name];
                                self.written(200, &set_name, set, &set.rows[i], repr, select.as_deref())
                            }
                            None if if_match.is_some() || kind != Kind::Dataverse => self.not_found(&set_name),
                            None => {
                                // Dataverse upsert: create from the URL's key and the body.
                                if url_key.iter().any(|(k, _)| !set.keys.contains(k)) {
                                    return self.not_found(&set_name);
                                }
                                let mut all = props;
                                all.extend(url_key);
                                st.etag += 1;
                                let row = Row { id: uuid::Uuid::new_v4().to_string(), etag: st.etag, props: all };
                                let slot = st.sets.get_mut(&set_name).unwrap().rows.insert(row);
                                let set = &st.sets[&set_name];
                                self.written(201, &set_name, set, &set.rows[slot], repr, select.as_deref())
                            }
                        }
                    }
                    _ => self.err(405, "", "method not allowed"),
                }
            }
            _ => self.err(405, "", "method not allowed"),
        }
    }

    /// A create whose key another record has.
    fn duplicate(&self, set_name: &str) -> Ans {
        match self.kind {
            Kind::Dataverse => self.err(400, "0x80040237", "Cannot insert duplicate key."),
            Kind::Fno => {
                self.fno_write_error(&format!("Cannot create a record in {set_name}. The record already exists."))
            }
            Kind::Generic => self.err(409, "Conflict", "An entity with this key already exists."),
        }
    }

    /// A collection's records, one page (`Prefer: odata.maxpagesize`, at most `max_page`).
    ///
    /// A `$filter` of key values (`k eq 'a'`, joined by `and` over the key fields and by `or`
    /// between records) is answered from the key index; another is checked on every record.
    /// Without `$filter` and `$top`, in creation order or ordered by the key fields, a page's
    /// next link starts after its last record (its slot, or its key), so no page rescans the
    /// ones before; otherwise `$skiptoken` counts the records to skip.
    fn list(&self, st: &Store, set_name: &str, set: &Set, l: Listing<'_>) -> Ans {
        let kind = self.kind;
        let company = (kind == Kind::Fno && !l.cross).then(|| format!("\"{}\"", self.default_company));
        let in_company = |r: &Row| {
            company.as_ref().is_none_or(|c| r.props.get("dataAreaId").map(|v| v.to_lowercase()).as_ref() == Some(c))
        };
        let filter = match l.q.get("$filter").map(|f| Filter::parse(f)).transpose() {
            Ok(f) => f,
            Err(m) => return self.err(400, "0x80060888", &format!("Syntax error in $filter: {m}")),
        };
        let expand = match self.expand(set, l.q) {
            Ok(e) => e,
            Err(a) => return a,
        };
        let asked = l
            .prefer
            .and_then(|p| p.split(',').find_map(|x| x.trim().strip_prefix("odata.maxpagesize=").map(str::to_string)))
            .and_then(|n| n.parse::<usize>().ok());
        let page = asked.unwrap_or(self.max_page).min(self.max_page).max(1);
        let order: Option<Vec<&str>> = l.q.get("$orderby").map(|o| o.split(',').map(str::trim).collect());
        let in_key_order = order.as_ref().is_some_and(|o| o.iter().copied().eq(set.keys.iter().map(String::as_str)));
        let token = l.q.get("$skiptoken");
        let bad_token = || self.err(400, "0x80060888", "The $skiptoken is not one this service gave.");
        let (rows, next): (Vec<&Row>, Option<String>) =
            if filter.is_none() && !l.q.contains_key("$top") && (order.is_none() || in_key_order) {
                let records: Box<dyn Iterator<Item = &Row>> = if in_key_order {
                    let after = match token.map(|t| serde_json::from_str::<Vec<Option<String>>>(t)).transpose() {
                        Ok(a) => a.map(|raw| raw.iter().map(|v| SortValue::of(v.as_ref())).collect()),
                        Err(_) => return bad_token(),
                    };
                    Box::new(set.rows.after_in_key_order(after))
                } else {
                    let after = match token.map(|t| t.parse::<Slot>()).transpose() {
                        Ok(a) => a,
                        Err(_) => return bad_token(),
                    };
                    Box::new(set.rows.after_slot(after).map(|(_, r)| r))
                };
                let mut rows: Vec<&Row> = records.filter(|r| in_company(r)).take(page + 1).collect();
                let more = rows.len() > page;
                rows.truncate(page);
                let next = rows.last().filter(|_| more).map(|last| {
                    if in_key_order {
                        let raw: Vec<Option<&String>> = set.keys.iter().map(|k| last.props.get(k)).collect();
                        json!(raw).to_string()
                    } else {
                        set.rows.find_id(&last.id).unwrap_or_default().to_string()
                    }
                });
                (rows, next)
            } else {
                let mut rows: Vec<&Row> = match filter.as_ref().and_then(|f| f.key_lookups(&set.keys)) {
                    // The index compares normalised keys as `eq` does: what it finds is the answer.
                    Some(keys) => {
                        let mut slots: Vec<Slot> = keys.iter().filter_map(|k| set.rows.find_key(k)).collect();
                        slots.sort_unstable();
                        slots.dedup();
                        slots.into_iter().map(|s| &set.rows[s]).filter(|r| in_company(r)).collect()
                    }
                    None => set
                        .rows
                        .iter()
                        .filter(|r| in_company(r) && filter.as_ref().is_none_or(|f| f.matches(r, kind)))
                        .collect(),
                };
                if let Some(fields) = &order {
                    rows.sort_by(|a, b| {
                        for f in fields {
                            let c = SortValue::of(a.props.get(*f)).cmp(&SortValue::of(b.props.get(*f)));
                            if c != std::cmp::Ordering::Equal {
                                return c;
                            }
                        }
                        std::cmp::Ordering::Equal
                    });
                }
                if let Some(t) = l.q.get("$top").and_then(|t| t.parse::<usize>().ok()) {
                    rows.truncate(t);
                }
                let skip = match token.map(|t| t.parse::<usize>()).transpose() {
                    Ok(s) => s.unwrap_or(0),
                    Err(_) => return bad_token(),
                };
                let total = rows.len();
                let next = (skip + page < total).then(|| (skip + page).to_string());
                (rows.into_iter().skip(skip).take(page).collect(), next)
            };
        let value: Vec<String> = rows
            .iter()
            .map(|r| self.entity(set_name, set, r, l.select, l.full, &self.expanded(st, r, &expand)))
            .collect();
        let origin = self.origin.lock().unwrap().clone();
        let context = format!("{origin}{}$metadata#{set_name}", self.base);
        let mut out = format!("{{\"@odata.context\":{},\"value\":[{}]", json!(context), value.join(","));
        if let Some(token) = next {
            let mut qs: Vec<String> = l
                .query
                .split('&')
                .filter(|p| !p.starts_with("$skiptoken=") && !p.is_empty())
                .map(str::to_string)
                .collect();
            qs.push(format!("$skiptoken={}", dualsync::adapters::connectors::odata::keys::encode(&token)));
            let rel = format!("{set_name}?{}", qs.join("&"));
            let link = if kind == Kind::Dataverse { format!("{origin}{}{rel}", self.base) } else { rel };
            out.push_str(&format!(",\"@odata.nextLink\":{}", json!(link)));
        }
        out.push('}');
        let mut a = Ans::text(200, out);
        if asked.is_some() {
            a.headers.push(("Preference-Applied".into(), format!("odata.maxpagesize={page}")));
        }
        a
    }

    /// The body's lookups: `<navigation>@odata.bind` (a record URL by id or key, absolute or
    /// relative to the service root, or null) sets `_<name>_value`; writing the lookup as a
    /// property is refused, as Dataverse does.
    fn bind(
        &self,
        st: &Store,
        set: &Set,
        body: &[u8],
        mut props: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, Ans> {
        let invalid = |p: &str| self.err(400, "0x80060888", &format!("Invalid property '{p}' was found in entity."));
        for l in &set.lookups {
            for p in [l.property(), l.name.clone(), l.navigation.clone()] {
                if props.contains_key(&p) {
                    return Err(invalid(&p));
                }
            }
        }
        let m: HashMap<String, Value> = serde_json::from_slice(body).unwrap_or_default();
        let origin = self.origin.lock().unwrap().clone();
        for (k, v) in m {
            let Some(nav) = k.strip_suffix("@odata.bind") else { continue };
            let Some(l) = set.lookups.iter().find(|l| l.navigation == nav) else {
                return Err(self.err(400, "0x80060888", &format!("An undeclared property '{nav}' which only has property annotations in the payload but no property value was found in the payload.")));
            };
            let id = match v {
                Value::Null => "null".to_string(),
                Value::String(url) => {
                    let rel = url.strip_prefix(&origin).unwrap_or(&url);
                    let rel = rel.strip_prefix(self.base.as_str()).or_else(|| rel.strip_prefix('/')).unwrap_or(rel);
                    let rel = decode(rel);
                    let (target, pred) = match rel.find('(') {
                        Some(i) if rel.ends_with(')') => (&rel[..i], &rel[i + 1..rel.len() - 1]),
                        _ => return Err(self.err(400, "0x80060888", &format!("Bad reference for {nav}."))),
                    };
                    if target != l.target {
                        return Err(self.err(
                            400,
                            "0x80060888",
                            &format!("{nav} refers to {}, not {target}.", l.target),
                        ));
                    }
                    let Some(tset) = st.sets.get(target) else { return Err(self.not_found(target)) };
                    match self.find(tset, pred)? {
                        Some(i) => json!(tset.rows[i].id).to_string(),
                        None => return Err(self.not_found(target)),
                    }
                }
                _ => return Err(self.err(400, "0x80060888", &format!("The value of {k} must be a URL."))),
            };
            props.insert(l.property(), id);
        }
        Ok(props)
    }

    /// `$expand=nav($select=a,b),...` → (lookup, selected fields of the parent).
    fn expand(&self, set: &Set, q: &HashMap<String, String>) -> Result<Vec<(LookupDecl, Vec<String>)>, Ans> {
        let Some(text) = q.get("$expand") else { return Ok(vec![]) };
        let mut items = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&text[start..]);
        let mut out = Vec::new();
        for item in items {
            let (nav, opts) = match item.find('(') {
                Some(i) if item.ends_with(')') => (&item[..i], &item[i + 1..item.len() - 1]),
                _ => (item, ""),
            };
            let Some(l) = set.lookups.iter().find(|l| l.navigation == nav) else {
                return Err(self.err(400, "0x80060888", &format!("Could not find a property named '{nav}'.")));
            };
            let fields = match opts.strip_prefix("$select=") {
                Some(f) => f.split(',').map(str::to_string).collect(),
                None if opts.is_empty() => vec![],
                None => return Err(self.err(400, "0x80060888", "only $select is spoken inside $expand")),
            };
            out.push((l.clone(), fields));
        }
        Ok(out)
    }

    /// The expanded parents of a row: (navigation, entity JSON text or `null`).
    fn expanded(&self, st: &Store, row: &Row, expand: &[(LookupDecl, Vec<String>)]) -> Vec<(String, String)> {
        expand
            .iter()
            .map(|(l, fields)| {
                let id = row.props.get(&l.property()).and_then(|raw| serde_json::from_str::<String>(raw).ok());
                let tset = st.sets.get(&l.target);
                let parent = id.zip(tset).and_then(|(id, t)| t.rows.find_id(&id).map(|s| (t, &t.rows[s])));
                let text = match parent {
                    Some((t, r)) => {
                        let sel = if fields.is_empty() { None } else { Some(fields.as_slice()) };
                        self.entity(&l.target, t, r, sel, false, &[])
                    }
                    None => "null".to_string(),
                };
                (l.navigation.clone(), text)
            })
            .collect()
    }

    /// The service root: its entity sets.
    fn service_document(&self, st: &Store) -> Ans {
        let sets: Vec<Value> = st.sets.keys().map(|n| json!({ "name": n, "kind": "EntitySet", "url": n })).collect();
        Ans::json(200, json!({ "@odata.context": format!("{}$metadata", self.base), "value": sets }))
    }

    /// Dataverse table definitions, as `EntityDefinitions?$filter=EntitySetName eq '<set>'`
    /// with its keys expanded answers them: the set's keys as one alternate key, and its id field.
    fn entity_definitions(&self, st: &Store, q: &HashMap<String, String>) -> Ans {
        let wanted =
            q.get("$filter").and_then(|f| f.strip_prefix("EntitySetName eq '")).and_then(|f| f.strip_suffix('\''));
        let Some(wanted) = wanted else {
            return self.err(400, "0x80060888", "EntityDefinitions: only $filter=EntitySetName eq '<name>' is served");
        };
        let value: Vec<Value> = st
            .sets
            .get(wanted)
            .map(|set| {
                let logical = wanted.trim_end_matches('s');
                json!({
                    "LogicalName": logical,
                    "PrimaryIdAttribute": set.id_field,
                    "MetadataId": uuid::Uuid::new_v4().to_string(),
                    "Keys": [{
                        "LogicalName": format!("{logical}_key"),
                        "KeyAttributes": set.keys,
                        "EntityKeyIndexStatus": set.key_status.clone().unwrap_or_else(|| "Active".into()),
                    }],
                })
            })
            .into_iter()
            .collect();
        Ans::json(200, json!({ "value": value }))
    }

    /// Dataverse change tracking. A listing (`Prefer: odata.track-changes`) pages through the
    /// set by change number (`$skiptoken`), its delta token fixed at its first page (`dsfrom`);
    /// the last page carries `@odata.deltaLink`. A delta (`$deltatoken=T`) gives the records
    /// changed after T, then `$deletedEntity` entries for those deleted after T, paged by
    /// offset with the next token fixed at its first page (`dsnext`). A token older than the
    /// last `expire_tokens` answers `ExpiredVersionStamp`.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &self,
        st: &Store,
        set_name: &str,
        set: &Set,
        q: &HashMap<String, String>,
        select: Option<&[String]>,
        prefer: Option<String>,
        asked_tracking: bool,
    ) -> Ans {
        for o in ["$filter", "$orderby", "$expand", "$top"] {
            if q.contains_key(o) {
                return self.err(
                    400,
                    "0x80060888",
                    &format!("The \"{o}\" query parameter isn't supported when Change Tracking is enabled."),
                );
            }
        }
        let asked = prefer
            .and_then(|p| p.split(',').find_map(|x| x.trim().strip_prefix("odata.maxpagesize=").map(str::to_string)))
            .and_then(|n| n.parse::<usize>().ok());
        let page = asked.unwrap_or(self.max_page).min(self.max_page).max(1);
        let origin = self.origin.lock().unwrap().clone();
        let sel =
            q.get("$select").map(|s| format!("$select={}", dualsync::adapters::connectors::odata::keys::encode(s)));
        let link = |extra: String| {
            let mut parts: Vec<String> = sel.iter().cloned().collect();
            parts.push(extra);
            json!(format!("{origin}{}{set_name}?{}", self.base, parts.join("&")))
        };
        let num = |k: &str| q.get(k).and_then(|v| v.parse::<u64>().ok());
        let mut entries: Vec<String> = Vec::new();
        let (next, delta, context);
        if let Some(token) = num("$deltatoken") {
            if token < st.min_token {
                return self.err(
                    400,
                    "0x80044352",
                    "Version stamp associated with the client has expired. Please perform a full sync.",
                );
            }
            let upto = num("dsnext").unwrap_or(st.etag);
            let skip = num("$skiptoken").unwrap_or(0) as usize;
            let deleted = format!("{origin}{}$metadata#{set_name}/$deletedEntity", self.base);
            let gone = || set.tombstones.iter().filter(|(e, _)| *e > token);
            let total = set.rows.changed_after(token).count() + gone().count();
            // Only this page's entries are written out.
            entries = set
                .rows
                .changed_after(token)
                .map(|r| self.entity(set_name, set, r, select, false, &[]))
                .chain(
                    gone().map(|(_, id)| json!({"@odata.context": deleted, "id": id, "reason": "deleted"}).to_string()),
                )
                .skip(skip)
                .take(page)
                .collect();
            let more = skip + page < total;
            next = more.then(|| link(format!("$deltatoken={token}&$skiptoken={}&dsnext={upto}", skip + page)));
            delta = (!more).then(|| link(format!("$deltatoken={upto}")));
            context = format!("{origin}{}$metadata#{set_name}/$delta", self.base);
        } else {
            let from = num("dsfrom").unwrap_or(st.etag);
            let after = num("$skiptoken").unwrap_or(0);
            let mut rows: Vec<&Row> = set.rows.changed_after(after).take(page + 1).collect();
            let more = rows.len() > page;
            rows.truncate(page);
            entries.extend(rows.iter().map(|r| self.entity(set_name, set, r, select, false, &[])));
            let last = rows.last().map_or(after, |r| r.etag);
            next = more.then(|| link(format!("$skiptoken={last}&dsfrom={from}")));
            delta = (!more).then(|| link(format!("$deltatoken={from}")));
            context = format!("{origin}{}$metadata#{set_name}", self.base);
        }
        let mut out = format!("{{\"@odata.context\":{},\"value\":[{}]", json!(context), entries.join(","));
        if let Some(n) = next {
            out.push_str(&format!(",\"@odata.nextLink\":{n}"));
        }
        if let Some(d) = delta {
            out.push_str(&format!(",\"@odata.deltaLink\":{d}"));
        }
        out.push('}');
        let mut a = Ans::text(200, out);
        let mut applied = Vec::new();
        if asked_tracking {
            applied.push("odata.track-changes".to_string());
        }
        if asked.is_some() {
            applied.push(format!("odata.maxpagesize={page}"));
        }
        if !applied.is_empty() {
            a.headers.push(("Preference-Applied".into(), applied.join(",")));
        }
        a
    }

    fn not_found(&self, set: &str) -> Ans {
        match self.kind {
            Kind::Dataverse => self.err(
                404,
                "0x80060891",
                &format!("A record with the specified key values does not exist in {set} entity"),
            ),
            _ => self.err(404, "", "No resource was found for the key."),
        }
    }

    fn validate(&self, set: &Set, props: &BTreeMap<String, String>) -> Option<Ans> {
        for (field, max) in &set.max_len {
            let Some(Value::String(v)) = props.get(field).and_then(|r| serde_json::from_str(r).ok()) else { continue };
            if v.chars().count() > *max {
                return Some(match self.kind {
                    Kind::Dataverse => self.err(400, "0x80044331", &format!("A validation error occurred. The length of the '{field}' attribute exceeded the maximum allowed length of '{max}'.")),
                    // fno's Infolog names the value: the connector must not pass it on.
                    Kind::Fno => self.fno_write_error(&format!("Error: The value '{v}' in field {field} is too long.")),
                    Kind::Generic => self.err(400, "InvalidValue", &format!("Value '{v}' of {field} is too long.")),
                });
            }
        }
        None
    }

    fn written(&self, status: u16, set_name: &str, set: &Set, row: &Row, repr: bool, select: Option<&[String]>) -> Ans {
        if repr {
            let mut a = Ans::text(status, self.entity(set_name, set, row, select, false, &[]));
            a.headers.push(("ETag".into(), etag(row.etag)));
            a
        } else {
            let mut a = Ans::empty(204);
            a.headers.push(("ETag".into(), etag(row.etag)));
            a.headers.push(("OData-EntityId".into(), self.id_url(set_name, set, row)));
            a
        }
    }

    fn id_url(&self, set_name: &str, set: &Set, row: &Row) -> String {
        let origin = self.origin.lock().unwrap().clone();
        match &set.id_field {
            Some(_) => format!("{origin}{}{set_name}({})", self.base, row.id),
            None => {
                let pred: Vec<String> = set
                    .keys
                    .iter()
                    .map(|k| {
                        let raw = row.props.get(k).cloned().unwrap_or_default();
                        let lit = match serde_json::from_str::<Value>(&raw) {
                            Ok(Value::String(s)) => format!("'{}'", s.replace('\'', "''")),
                            _ => raw,
                        };
                        format!("{k}={}", dualsync::adapters::connectors::odata::keys::encode(&lit))
                    })
                    .collect();
                format!("{origin}{}{set_name}({})", self.base, pred.join(","))
            }
        }
    }

    /// The entity as JSON text: numbers as the text they came in (never through a float).
    fn entity(
        &self,
        set_name: &str,
        set: &Set,
        row: &Row,
        select: Option<&[String]>,
        full: bool,
        expanded: &[(String, String)],
    ) -> String {
        let mut m: BTreeMap<String, String> = BTreeMap::new();
        m.insert("@odata.etag".into(), json!(etag(row.etag)).to_string());
        if full {
            m.insert("@odata.id".into(), json!(self.id_url(set_name, set, row)).to_string());
        }
        for (k, raw) in &row.props {
            if select.is_none_or(|s| s.iter().any(|f| f == k)) {
                m.insert(k.clone(), raw.clone());
            }
        }
        if let Some(s) = select {
            for f in s {
                m.entry(f.clone()).or_insert_with(|| "null".into());
            }
        }
        if let Some(idf) = &set.id_field {
            // Dataverse returns the primary id whatever $select says.
            m.insert(idf.clone(), json!(row.id).to_string());
        }
        for (nav, text) in expanded {
            m.insert(nav.clone(), text.clone());
        }
        let fields: Vec<String> = m.iter().map(|(k, v)| format!("{}:{v}", json!(k))).collect();
        format!("{{{}}}", fields.join(","))
    }

    /// Key values named in a predicate: (field, raw JSON text).
    fn pred_values(&self, set: &Set, pred: &str) -> Result<Vec<(String, String)>, Ans> {
        let parts = split_pred(pred).map_err(|m| self.err(400, "0x80060888", &m))?;
        let mut out = Vec::new();
        for (name, lit) in parts {
            let value = literal_json(&lit).ok_or_else(|| self.err(400, "0x80060888", "bad literal in key"))?;
            let text = match serde_json::from_str::<Value>(&value) {
                Ok(Value::String(s)) => s,
                _ => value.clone(),
            };
            if self.kind != Kind::Generic && text.contains(UNADDRESSABLE) {
                return Err(self.err(
                    400,
                    "0x80060888",
                    "The key value contains characters that are not allowed in a URL.",
                ));
            }
            match name {
                Some(n) => out.push((n, value)),
                None => match &set.id_field {
                    Some(idf) => out.push((idf.clone(), value)),
                    None => out.push((set.keys.first().cloned().unwrap_or_default(), value)),
                },
            }
        }
        Ok(out)
    }

    fn find(&self, set: &Set, pred: &str) -> Result<Option<Slot>, Ans> {
        let vals = self.pred_values(set, pred)?;
        if let Some(idf) = &set.id_field {
            if vals.len() == 1 && vals[0].0 == *idf {
                let id = serde_json::from_str::<Value>(&vals[0].1)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_else(|| vals[0].1.clone());
                return Ok(set.rows.find_id(&id));
            }
        }
        let mut names: Vec<&String> = vals.iter().map(|(n, _)| n).collect();
        names.sort();
        let mut keys: Vec<&String> = set.keys.iter().collect();
        keys.sort();
        if names != keys {
            return Err(self.err(400, "0x80060888", "The key does not match an alternate key of the entity."));
        }
        let want: Vec<String> = set
            .keys
            .iter()
            .map(|k| vals.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default())
            .collect();
        Ok(set.rows.find_key(&want))
    }
}

fn etag(n: u64) -> String {
    format!("W/\"{n}\"")
}

fn parse_props(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let m: HashMap<String, Box<serde_json::value::RawValue>> =
        serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
    Ok(m.into_iter().filter(|(k, _)| !k.contains('@')).map(|(k, v)| (k, v.get().to_string())).collect())
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `name='v',n=7` or `'v'` / `guid` → (name, literal).
fn split_pred(pred: &str) -> Result<Vec<(Option<String>, String)>, String> {
    let mut out = Vec::new();
    let mut chars = pred.chars().peekable();
    loop {
        let mut name = String::new();
        let mut lit = String::new();
        let mut in_str = false;
        let mut seen_eq = false;
        while let Some(c) = chars.next() {
            if in_str {
                lit.push(c);
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        lit.push(chars.next().unwrap_or('\''));
                    } else {
                        in_str = false;
                    }
                }
                continue;
            }
            match c {
                '\'' => {
                    in_str = true;
                    lit.push(c);
                }
                '=' if !seen_eq => {
                    seen_eq = true;
                    name = std::mem::take(&mut lit);
                }
                ',' => break,
                c => lit.push(c),
            }
        }
        if in_str {
            return Err("unterminated string".into());
        }
        out.push((seen_eq.then(|| name.trim().to_string()), lit.trim().to_string()));
        if chars.peek().is_none() {
            break;
        }
    }
    Ok(out)
}

/// An OData literal as JSON text: `'a''b'` → `"a'b"`, `7` → `7`, a GUID → its JSON string.
fn literal_json(lit: &str) -> Option<String> {
    if let Some(s) = lit.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return Some(Value::String(s.replace("''", "'")).to_string());
    }
    if lit == "true" || lit == "false" || lit == "null" {
        return Some(lit.to_string());
    }
    if dualsync::adapters::connectors::odata::keys::is_guid(lit) {
        return Some(Value::String(lit.to_string()).to_string());
    }
    dualsync::adapters::connectors::odata::keys::is_number(lit).then(|| lit.to_string())
}

/// `$filter` expressions: `eq` comparisons joined by `and`, `or` and parentheses.
enum Filter {
    Eq(String, String),
    /// Only `ne null` is spoken.
    NotNull(String),
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, String> {
        let toks = tokens(text)?;
        let mut pos = 0;
        let f = Self::or(&toks, &mut pos)?;
        if pos != toks.len() {
            return Err(format!("unexpected '{}'", toks[pos]));
        }
        Ok(f)
    }
    fn or(t: &[String], p: &mut usize) -> Result<Filter, String> {
        let mut left = Self::and(t, p)?;
        while t.get(*p).map(String::as_str) == Some("or") {
            *p += 1;
            left = Filter::Or(Box::new(left), Box::new(Self::and(t, p)?));
        }
        Ok(left)
    }
    fn and(t: &[String], p: &mut usize) -> Result<Filter, String> {
        let mut left = Self::atom(t, p)?;
        while t.get(*p).map(String::as_str) == Some("and") {
            *p += 1;
            left = Filter::And(Box::new(left), Box::new(Self::atom(t, p)?));
        }
        Ok(left)
    }
    fn atom(t: &[String], p: &mut usize) -> Result<Filter, String> {
        if t.get(*p).map(String::as_str) == Some("(") {
            *p += 1;
            let f = Self::or(t, p)?;
            if t.get(*p).map(String::as_str) != Some(")") {
                return Err("missing ')'".into());
            }
            *p += 1;
            return Ok(f);
        }
        let (Some(name), Some(op), Some(lit)) = (t.get(*p), t.get(*p + 1), t.get(*p + 2)) else {
            return Err("incomplete comparison".into());
        };
        *p += 3;
        if op == "ne" && lit == "null" {
            return Ok(Filter::NotNull(name.clone()));
        }
        if op != "eq" {
            return Err(format!("unsupported operator '{op}'"));
        }
        let json = literal_json(lit).ok_or_else(|| format!("bad literal {lit}"))?;
        Ok(Filter::Eq(name.clone(), json))
    }
    /// The key values a filter names, one per record, when it is nothing but records' keys:
    /// `or` between records, each an `and` of `eq` over exactly the key fields.
    fn key_lookups(&self, keys: &[String]) -> Option<Vec<Vec<String>>> {
        match self {
            Filter::Or(a, b) => {
                let mut out = a.key_lookups(keys)?;
                out.extend(b.key_lookups(keys)?);
                Some(out)
            }
            _ => {
                let mut eq = HashMap::new();
                self.equalities(&mut eq)?;
                if eq.len() != keys.len() {
                    return None;
                }
                let key: Option<Vec<String>> = keys.iter().map(|k| eq.get(k.as_str()).map(|v| v.to_string())).collect();
                key.map(|k| vec![k])
            }
        }
    }

    /// Field → value of an `and` of `eq`s; `None` for anything else, or a field given twice.
    fn equalities<'a>(&'a self, out: &mut HashMap<&'a str, &'a str>) -> Option<()> {
        match self {
            Filter::Eq(f, v) => out.insert(f, v).is_none().then_some(()),
            Filter::And(a, b) => {
                a.equalities(out)?;
                b.equalities(out)
            }
            _ => None,
        }
    }

    fn matches(&self, r: &Row, kind: Kind) -> bool {
        match self {
            Filter::Eq(f, v) => {
                r.props.get(f).is_some_and(|x| norm(&canon_json(x), kind) == norm(&canon_json(v), kind))
            }
            Filter::NotNull(f) => r.props.get(f).is_some_and(|x| x != "null"),
            Filter::And(a, b) => a.matches(r, kind) && b.matches(r, kind),
            Filter::Or(a, b) => a.matches(r, kind) || b.matches(r, kind),
        }
    }
}

fn tokens(text: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            ' ' => {
                chars.next();
            }
            '(' | ')' => {
                out.push(c.to_string());
                chars.next();
            }
            '\'' => {
                let mut s = String::from("'");
                chars.next();
                loop {
                    match chars.next() {
                        Some('\'') if chars.peek() == Some(&'\'') => {
                            chars.next();
                            s.push_str("''");
                        }
                        Some('\'') => {
                            s.push('\'');
                            break;
                        }
                        Some(x) => s.push(x),
                        None => return Err("unterminated string".into()),
                    }
                }
                out.push(s);
            }
            _ => {
                let mut s = String::new();
                while let Some(&x) = chars.peek() {
                    if x == ' ' || x == '(' || x == ')' {
                        break;
                    }
                    s.push(x);
                    chars.next();
                }
                out.push(s);
            }
        }
    }
    Ok(out)
}
