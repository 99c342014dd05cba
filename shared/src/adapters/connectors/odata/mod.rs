//! The `odata` connector: Dataverse Web API v9.2, fno data entities and any OData v4 service
//! (DESIGN §9), over its own HTTP, JSON and multipart code.
//!
//! # Layout
//!
//! - [`keys`]: key predicates, literals by key kind, the `$filter` of many keys, which key
//!   values a URL cannot carry.
//! - [`values`]: payloads to records; numbers from their text, one canonical form per value.
//! - [`errors`]: what an error answer means (status, service code, `innererror`), and messages
//!   that keep the service's words but no field value.
//! - [`batch`]: the multipart `$batch` format, both ways.
//! - [`binds`]: lookups held as references: `$expand` to read, `@odata.bind` to write.
//! - [`paging`]: `@odata.nextLink` and `Prefer: odata.maxpagesize`.
//! - [`auth`]: client credentials with a cached token, basic, bearer, none.
//! - [`limiter`]: one adaptive concurrency limiter per service in the process.
//! - [`flavor`]: where Dataverse, fno and plain OData differ.
//! - [`http`]: one request through the limiter, with credentials and service protection.
//! - [`tracking`]: change tracking by delta links (`Prefer: odata.track-changes`).
//! - this file: [`OdataApp`], the [`Connector`] over them.
//!
//! # Requests
//!
//! - `read`: the keys' `$filter` (`or` of the key predicates, about 50 keys a query), with
//!   `$select` of the mapped fields; several queries go as GETs in one `$batch`.
//! - `write`: one request per operation, up to `batch_size` of them in one `$batch` with
//!   `Prefer: odata.continue-on-error` and no change set (each write stands alone); a lone
//!   operation goes as a plain request. Update: `PATCH` by key with `If-Match: <etag>`, the key
//!   fields left out of the body. Create-only: Dataverse `PATCH` by key with
//!   `If-None-Match: *`; fno and plain OData `POST`. A duplicate answer to a create, or a stale
//!   or missing record on an update, is `PreconditionFailed` (delivery reads again).
//! - `delete`: `DELETE` by key, batched; a record already gone is not an error.
//! - `list`: the entity set ordered by key, `Prefer: odata.maxpagesize`; the cursor is the
//!   service's next link.
//!
//! Key literals depend on the key fields' types, which the connector learns from the JSON the
//! service sends (a record read, or the values being written); while it knows nothing of an
//! entity, one `$top=1` query teaches it (an empty entity set needs no literal at all).
//!
//! A lookup the job binds (`bind` in the job file) is not a column: it is read by `$expand`ing
//! its navigation property with the parent's key fields, and written as
//! `<navigation>@odata.bind` to the parent's address by key (see [`binds`]).
//!
//! `read_key_by_id` reads a Dataverse record's key by its GUID, for pushed events that name a
//! record only by id.
//!
//! Change tracking (Dataverse): see [`tracking`].
//!
//! `$batch` requests are multipart, or JSON (OData 4.01) where the job says the service takes it
//! ([`json_batch`]).
pub mod auth;
pub mod batch;
pub mod binds;
mod doctor;
pub mod errors;
pub mod flavor;
pub mod http;
pub mod json_batch;
pub mod keys;
pub mod limiter;
pub mod paging;
pub mod tracking;
pub mod values;

use async_trait::async_trait;
use reqwest::{Method, Url};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use self::errors::{classify, Class, ServiceError};
use self::flavor::CreateBy;
use self::http::{Answer, Transport};
use self::keys::KeyKind;
use self::values::RawEntity;
use crate::domain::change::Key;
use crate::domain::job::{BatchFormat, Flavor, OdataSpec};
use crate::ports::{
    Connector, ConnectorError, EntitySpec, Finding, ListPage, Precondition, Record, WriteFailure, WriteOp,
};

/// Keys per `$filter` query: short enough for any service's URL limit.
const KEYS_PER_QUERY: usize = 50;
/// Longest query URL built; past it a query takes fewer keys.
const MAX_URL: usize = 6000;
/// How long one request may take (Dataverse's own limit is two minutes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// An OData app: one service, its flavor, and what it learnt of the entities' keys.
pub struct OdataApp {
    spec: OdataSpec,
    t: Transport,
    kinds: Mutex<HashMap<String, Vec<KeyKind>>>,
}

/// One request of a write or delete, before it is sent alone or in a batch.
struct Planned {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl OdataApp {
    /// Builds the connector; secrets are read from the process environment now (a job file
    /// that keeps them in a store needs [`Self::with_store`]).
    pub fn open(name: &str, spec: &OdataSpec) -> Result<OdataApp, ConnectorError> {
        Self::with_env(name, spec, DEFAULT_TIMEOUT, &|k| std::env::var(k).ok())
    }

    /// As [`Self::open`], with a request time-out and an environment of the caller's.
    pub fn with_env(
        name: &str,
        spec: &OdataSpec,
        timeout: Duration,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<OdataApp, ConnectorError> {
        Self::with_store(name, spec, timeout, env, Arc::new(auth::NoSecretStore))
    }

    /// As [`Self::with_env`], reading a secret that no variable holds from `secrets` at the
    /// first request (see [`auth`]).
    pub fn with_store(
        name: &str,
        spec: &OdataSpec,
        timeout: Duration,
        env: &dyn Fn(&str) -> Option<String>,
        secrets: Arc<dyn crate::ports::SecretStore>,
    ) -> Result<OdataApp, ConnectorError> {
        let rejected = |message: String| ConnectorError::Rejected { app: name.to_string(), message };
        let mut root_text = spec.url.clone();
        if !root_text.ends_with('/') {
            root_text.push('/');
        }
        let root = Url::parse(&root_text).map_err(|e| rejected(format!("url: {e}")))?;
        let creds = auth::Credentials::resolve(&spec.auth, root.as_str(), env).map_err(|e| rejected(e.to_string()))?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(10).min(timeout))
            .pool_max_idle_per_host(spec.max_concurrency)
            .build()
            .map_err(|e| rejected(format!("http client: {e}")))?;
        let t = Transport {
            app: name.to_string(),
            limiter: limiter::shared(root.as_str(), spec.max_concurrency),
            root,
            client,
            auth: auth::Authenticator::new(creds, &spec.auth, secrets),
            auth_hint: auth::hint(&spec.auth),
        };
        Ok(OdataApp { spec: spec.clone(), t, kinds: Mutex::new(HashMap::new()) })
    }

    /// The limiter this app's requests go through (shared by the process).
    pub fn limiter(&self) -> &Arc<limiter::Limiter> {
        &self.t.limiter
    }

    fn flavor(&self) -> Flavor {
        self.spec.flavor
    }

    /// `root/entity?query` with the flavor's common query options.
    fn url(&self, path: &str, query: &[String]) -> String {
        let mut q: Vec<String> = query.to_vec();
        if let Some(c) = flavor::common_query(self.flavor()) {
            q.push(c.to_string());
        }
        let mut url = format!("{}{path}", self.t.root);
        if !q.is_empty() {
            url.push('?');
            url.push_str(&q.join("&"));
        }
        url
    }

    fn cached_kinds(&self, entity: &str) -> Option<Vec<KeyKind>> {
        self.kinds.lock().unwrap_or_else(|e| e.into_inner()).get(entity).cloned()
    }

    fn learn(&self, spec: &EntitySpec, e: &RawEntity) {
        if let Some(k) = values::key_kinds(e, spec, self.flavor()) {
            self.kinds.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.name.clone(), k);
        }
    }

    /// The key fields' kinds, asking the service for one record if nothing is known yet;
    /// `None` when the entity set is empty.
    async fn kinds(&self, spec: &EntitySpec) -> Result<Option<Vec<KeyKind>>, ConnectorError> {
        if let Some(k) = self.cached_kinds(&spec.name) {
            return Ok(Some(k));
        }
        let select = format!("$select={}", keys::encode(&spec.key_fields.join(",")));
        // A record with a key: one whose key fields are null tells no type.
        let not_null: Vec<String> = spec.key_fields.iter().map(|f| format!("{f} ne null")).collect();
        let filter = format!("$filter={}", keys::encode(&not_null.join(" and ")));
        let url = self.url(&keys::encode(&spec.name), &[select, filter, "$top=1".into()]);
        let page = self.get_page(&url, 1).await?;
        match page.value.first() {
            Some(e) => {
                self.learn(spec, e);
                match self.cached_kinds(&spec.name) {
                    Some(k) => Ok(Some(k)),
                    None => Err(self.t.rejected(format!(
                        "{}: the service sent a record without its key fields {}",
                        spec.name,
                        spec.key_fields.join(", ")
                    ))),
                }
            }
            None => Ok(None),
        }
    }

    /// Kinds for writing `op`: what is known, else what the values being written are.
    fn kinds_for_write(&self, spec: &EntitySpec, op: &WriteOp) -> Vec<KeyKind> {
        self.cached_kinds(&spec.name).unwrap_or_else(|| {
            spec.key_fields
                .iter()
                .map(|f| match op.fields.get(f) {
                    Some(v) => KeyKind::of_json(&v.to_string(), self.flavor()),
                    None => KeyKind::String,
                })
                .collect()
        })
    }

    /// A whole request's failure as a connector error.
    fn failure(&self, a: &Answer, redact: &[String]) -> ConnectorError {
        let err = ServiceError::parse(&a.body);
        let class = classify(a.status, a.retry_after(), &err);
        let message = errors::message(a.status, &err, &class, redact, &self.t.auth_hint);
        match class {
            Class::Throttled(ra) => self.t.transient(message, ra),
            Class::Unavailable => self.t.transient(message, None),
            _ => self.t.rejected(message),
        }
    }

    async fn get(&self, url: &str, page_size: usize, extra: &[(&str, String)]) -> Result<Answer, ConnectorError> {
        let mut headers = vec![("Prefer", paging::max_page_size(page_size))];
        headers.extend(extra.iter().cloned());
        let a = self.t.send(Method::GET, url, &headers, None).await?;
        if !a.ok() {
            return Err(self.failure(&a, &[]));
        }
        Ok(a)
    }

    async fn get_page(&self, url: &str, page_size: usize) -> Result<values::RawPage, ConnectorError> {
        let a = self.get(url, page_size, &[]).await?;
        values::parse_page(&a.body).map_err(|e| self.t.transient(format!("unreadable answer: {e}"), None))
    }

    /// Every entity a query gives, following next links.
    async fn get_all(&self, first: values::RawPage) -> Result<Vec<RawEntity>, ConnectorError> {
        let mut out = first.value;
        let mut next = first.next_link;
        while let Some(link) = next {
            let url = paging::resolve(&self.t.root, &link).map_err(|m| self.t.rejected(m))?;
            let page = self.get_page(url.as_str(), self.spec.page_size).await?;
            out.extend(page.value);
            next = page.next_link;
        }
        Ok(out)
    }

    /// `$filter` queries covering `keys` (each within the URL limit); keys that cannot be
    /// written as literals of their kind match no record and are left out.
    fn filter_queries(&self, spec: &EntitySpec, kinds: &[KeyKind], keys: &[&Key], query: &[String]) -> Vec<String> {
        let usable: Vec<&Key> =
            keys.iter().copied().filter(|k| keys::filter(&spec.key_fields, kinds, &[k]).is_ok()).collect();
        let mut out = Vec::new();
        let mut rest = &usable[..];
        while !rest.is_empty() {
            let mut n = rest.len().min(KEYS_PER_QUERY);
            loop {
                let f = keys::filter(&spec.key_fields, kinds, &rest[..n]).unwrap_or_default();
                let mut q = query.to_vec();
                q.push(format!("$filter={}", keys::encode(&f)));
                let url = self.url(&keys::encode(&spec.name), &q);
                if url.len() <= MAX_URL || n == 1 {
                    out.push(url);
                    break;
                }
                n = n.div_ceil(2);
            }
            rest = &rest[n..];
        }
        out
    }

    /// Runs GET queries: one alone, several as `$batch` requests of `batch_size`, sent at once
    /// (the limiter bounds them); every entity they give.
    async fn run_queries(&self, urls: Vec<String>) -> Result<Vec<RawEntity>, ConnectorError> {
        if urls.len() == 1 {
            let page = self.get_page(&urls[0], self.spec.page_size).await?;
            return self.get_all(page).await;
        }
        let chunks = urls.chunks(self.spec.batch_size.max(1)).map(|chunk| self.run_query_batch(chunk));
        let found = futures::future::try_join_all(chunks).await?;
        Ok(found.into_iter().flatten().collect())
    }

    /// GET queries as one `$batch`; every entity they give.
    async fn run_query_batch(&self, chunk: &[String]) -> Result<Vec<RawEntity>, ConnectorError> {
        let mut out = Vec::new();
        let prefer = paging::max_page_size(self.spec.page_size);
        let items: Vec<batch::Item> = chunk
            .iter()
            .map(|u| {
                batch::Item::Single(batch::Request {
                    method: "GET",
                    url: u.clone(),
                    headers: vec![("Accept".into(), "application/json".into()), ("Prefer".into(), prefer.clone())],
                    body: None,
                })
            })
            .collect();
        let responses = self.send_batch(&items, &[]).await?;
        if responses.len() != chunk.len() {
            return Err(self
                .t
                .transient(format!("$batch answered {} of {} queries", responses.len(), chunk.len()), None));
        }
        for r in responses {
            let a = Answer { status: r.status, headers: r.headers, body: r.body };
            if !a.ok() {
                return Err(self.failure(&a, &[]));
            }
            let page =
                values::parse_page(&a.body).map_err(|e| self.t.transient(format!("unreadable answer: {e}"), None))?;
            out.extend(self.get_all(page).await?);
        }
        Ok(out)
    }

    /// Sends a `$batch`; the responses in request order.
    async fn send_batch(
        &self,
        items: &[batch::Item],
        redact: &[String],
    ) -> Result<Vec<batch::Response>, ConnectorError> {
        let url = format!("{}$batch", self.t.root);
        let prefer = ("Prefer", "odata.continue-on-error".to_string());
        let (headers, body) = match self.spec.batch_format {
            BatchFormat::Multipart => {
                let boundary = format!("batch_{}", uuid::Uuid::new_v4().simple());
                let content_type = ("Content-Type", format!("multipart/mixed;boundary={boundary}"));
                ([content_type, prefer, ("Accept", "multipart/mixed".to_string())], batch::encode(&boundary, items))
            }
            BatchFormat::Json => {
                let body = json_batch::encode(items).map_err(|e| self.t.rejected(e.to_string()))?;
                let json = "application/json".to_string();
                ([("Content-Type", json.clone()), prefer, ("Accept", json)], body)
            }
        };
        let a = self.t.send(Method::POST, &url, &headers, Some(body)).await?;
        if !a.ok() {
            return Err(self.failure(&a, redact));
        }
        let decoded = match self.spec.batch_format {
            BatchFormat::Multipart => batch::decode(a.header("content-type").unwrap_or_default(), &a.body),
            BatchFormat::Json => json_batch::decode(&a.body),
        };
        decoded.map_err(|e| self.t.transient(e.to_string(), None))
    }

    /// Sends planned requests (alone, or `batch_size` to a `$batch`, the batches at once: the
    /// limiter bounds them, and no request depends on another); one answer each, `None` for
    /// those a batch answered short of (not run). A batch refused as a whole fails only its
    /// own requests, since the others may have landed; the call fails when every batch did.
    async fn send_planned(
        &self,
        planned: Vec<Planned>,
        redact: &[String],
    ) -> Result<Vec<Result<Option<Answer>, ConnectorError>>, ConnectorError> {
        if planned.len() == 1 {
            let Some(p) = planned.into_iter().next() else { return Ok(vec![]) };
            let headers: Vec<(&str, String)> = p.headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            return Ok(vec![Ok(Some(self.t.send(p.method, &p.url, &headers, p.body).await?))]);
        }
        let chunks = planned.chunks(self.spec.batch_size.max(1));
        let sizes: Vec<usize> = chunks.clone().map(<[Planned]>::len).collect();
        // Each runs to its end, so no request is cut off in flight when another fails.
        let answers = futures::future::join_all(chunks.map(|chunk| self.send_planned_batch(chunk, redact))).await;
        if let Some(Err(e)) = answers.iter().find(|a| a.is_err()).filter(|_| answers.iter().all(Result::is_err)) {
            return Err(e.clone());
        }
        Ok(answers
            .into_iter()
            .zip(sizes)
            .flat_map(|(answer, n)| match answer {
                Ok(answers) => answers.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); n],
            })
            .collect())
    }

    /// Planned requests as one `$batch`; one answer each, `None` for those it did not run.
    async fn send_planned_batch(
        &self,
        chunk: &[Planned],
        redact: &[String],
    ) -> Result<Vec<Option<Answer>>, ConnectorError> {
        let mut out = Vec::with_capacity(chunk.len());
        let items: Vec<batch::Item> = chunk
            .iter()
            .map(|p| {
                let mut headers = p.headers.clone();
                if p.body.is_some() {
                    headers.push(("Content-Type".into(), "application/json".into()));
                }
                batch::Item::Single(batch::Request {
                    method: method_name(&p.method),
                    url: p.url.clone(),
                    headers,
                    body: p.body.clone(),
                })
            })
            .collect();
        let responses = self.send_batch(&items, redact).await?;
        let mut by_id: HashMap<String, batch::Response> = HashMap::new();
        let mut in_order = Vec::new();
        for r in responses {
            match &r.content_id {
                Some(id) => {
                    by_id.insert(id.clone(), r);
                }
                None => in_order.push(r),
            }
        }
        let mut in_order = in_order.into_iter();
        for i in 0..chunk.len() {
            // Content-IDs number the batch's requests from 1 (see `batch::encode`).
            let id = (i + 1).to_string();
            let r = by_id.remove(&id).or_else(|| in_order.next());
            out.push(r.map(|r| Answer { status: r.status, headers: r.headers, body: r.body }));
        }
        Ok(out)
    }

    /// The `@odata.id` of each record whose key a URL cannot carry (Dataverse writes those
    /// through the record's id): one `$filter` query asking full metadata.
    async fn ids_of(
        &self,
        spec: &EntitySpec,
        kinds: &[KeyKind],
        keys: &[&Key],
    ) -> Result<HashMap<Key, String>, ConnectorError> {
        let mut out = HashMap::new();
        if keys.is_empty() {
            return Ok(out);
        }
        let select = format!("$select={}", keys::encode(&spec.key_fields.join(",")));
        for url in self.filter_queries(spec, kinds, keys, &[select]) {
            let accept = ("Accept", "application/json;odata.metadata=full".to_string());
            let a = self.get(&url, self.spec.page_size, &[accept]).await?;
            let page =
                values::parse_page(&a.body).map_err(|e| self.t.transient(format!("unreadable answer: {e}"), None))?;
            for e in self.get_all(page).await? {
                let (key, _) = values::to_record(&e, spec).map_err(|e| self.t.transient(e.to_string(), None))?;
                let id = ["@odata.editLink", "@odata.id"]
                    .iter()
                    .find_map(|a| e.get(*a).and_then(|r| serde_json::from_str::<String>(r.get()).ok()));
                if let (Some(key), Some(id)) = (key, id) {
                    let url = self.t.root.join(&id).map_err(|e| self.t.rejected(format!("record id: {e}")))?;
                    if url.origin() != self.t.root.origin() {
                        return Err(self.t.rejected("a record id points to another host; not followed".into()));
                    }
                    out.insert(key, url.to_string());
                }
            }
        }
        Ok(out)
    }

    /// The URL of a record by key, or by id where a URL cannot carry the key.
    fn record_url(
        &self,
        spec: &EntitySpec,
        kinds: &[KeyKind],
        key: &Key,
        ids: &HashMap<Key, String>,
        query: &[String],
    ) -> Result<String, String> {
        if keys::addressable(self.flavor(), key) {
            let pred = keys::predicate(&spec.key_fields, kinds, key).map_err(|e| e.to_string())?;
            return Ok(self.url(&format!("{}{pred}", keys::encode(&spec.name)), query));
        }
        match ids.get(key) {
            Some(id) if query.is_empty() => Ok(id.clone()),
            Some(id) => Ok(format!("{id}{}{}", if id.contains('?') { "&" } else { "?" }, query.join("&"))),
            None if flavor::writes_by_id(self.flavor()) => Err("no record with this key".into()),
            None => Err(format!(
                "the key holds a character {} cannot take in a URL (one of / < > * % & : \\ ? +), and it has no other address",
                self.flavor().as_str()
            )),
        }
    }

    /// The integration key of the record whose id is `id` (Dataverse: its primary GUID):
    /// `GET <set>(<id>)?$select=<key fields>`; `None` when the record does not exist. For events
    /// that name a record only by id (a webhook whose images were stripped for size).
    pub async fn read_key_by_id(&self, spec: &EntitySpec, id: &str) -> Result<Option<Key>, ConnectorError> {
        if !flavor::writes_by_id(self.flavor()) {
            return Err(self.t.rejected(format!(
                "{}: a {} service has no record id to read a key back by",
                spec.name,
                self.flavor().as_str()
            )));
        }
        if !keys::is_guid(id) {
            return Err(self.t.rejected(format!("{}: record id '{id}' is not a GUID", spec.name)));
        }
        let select = format!("$select={}", keys::encode(&spec.key_fields.join(",")));
        let url = self.url(&format!("{}({id})", keys::encode(&spec.name)), &[select]);
        let a = self.t.send(Method::GET, &url, &[], None).await?;
        if a.status == 404 {
            return Ok(None);
        }
        if !a.ok() {
            return Err(self.failure(&a, &[]));
        }
        let e = values::parse_entity(&a.body).map_err(|e| self.t.transient(format!("unreadable answer: {e}"), None))?;
        self.learn(spec, &e);
        let keys_only = EntitySpec { fields: vec![], binds: vec![], ..spec.clone() };
        match values::to_record(&e, &keys_only).map_err(|e| self.t.transient(e, None))? {
            (Some(key), _) => Ok(Some(key)),
            (None, _) => Err(self.t.rejected(format!(
                "{} record {id} has no integration key (its key fields {} are empty)",
                spec.name,
                spec.key_fields.join(", ")
            ))),
        }
    }

    /// The values of `op` other than its key: what an error message must not show.
    fn secrets_of(op: &WriteOp, spec: &EntitySpec) -> Vec<String> {
        op.fields
            .iter()
            .filter(|(k, _)| !spec.key_fields.contains(k))
            .filter_map(|(_, v)| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })
            .collect()
    }
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        _ => "GET",
    }
}

/// The version a write's answer gives: its ETag header, or the representation's etag.
fn written_version(a: &Answer) -> String {
    if let Some(e) = a.header("etag") {
        return e.to_string();
    }
    values::parse_entity(&a.body).ok().and_then(|e| values::etag(&e)).unwrap_or_default()
}

#[async_trait]
impl Connector for OdataApp {
    fn app(&self) -> &str {
        &self.t.app
    }

    async fn read(&self, entity: &EntitySpec, keys: &[Key]) -> Result<Vec<Option<Record>>, ConnectorError> {
        if keys.is_empty() {
            return Ok(vec![]);
        }
        let Some(kinds) = self.kinds(entity).await? else {
            return Ok(vec![None; keys.len()]); // the entity set is empty
        };
        let mut unique: Vec<&Key> = keys.iter().collect();
        unique.sort();
        unique.dedup();
        let urls = self.filter_queries(entity, &kinds, &unique, &binds::projection(entity));
        let found = if urls.is_empty() { vec![] } else { self.run_queries(urls).await? };
        let mut by_key: HashMap<Key, Record> = HashMap::new();
        for e in &found {
            self.learn(entity, e);
            let (key, record) = values::to_record(e, entity).map_err(|e| self.t.transient(e.to_string(), None))?;
            let Some(key) = key else { continue };
            if by_key.insert(key.clone(), record).is_some() {
                return Err(self.t.rejected(format!(
                    "two records of {} have the key {key}: the integration key must be unique",
                    entity.name
                )));
            }
        }
        Ok(keys.iter().map(|k| by_key.get(k).cloned()).collect())
    }

    async fn write(
        &self,
        entity: &EntitySpec,
        ops: &[WriteOp],
    ) -> Result<Vec<Result<String, WriteFailure>>, ConnectorError> {
        if ops.is_empty() {
            return Ok(vec![]);
        }
        let flavor = self.flavor();
        let kinds: Vec<Vec<KeyKind>> = ops.iter().map(|op| self.kinds_for_write(entity, op)).collect();
        // Updates whose key a URL cannot carry go through the record's id (Dataverse).
        let by_id: Vec<usize> = (0..ops.len())
            .filter(|&i| {
                !keys::addressable(flavor, &ops[i].key) && matches!(ops[i].precondition, Precondition::IfMatch(_))
            })
            .collect();
        let ids = match by_id.first() {
            Some(&first) if flavor::writes_by_id(flavor) => {
                let by_id: Vec<&Key> = by_id.iter().map(|&i| &ops[i].key).collect();
                self.ids_of(entity, &kinds[first], &by_id).await?
            }
            _ => HashMap::new(),
        };
        let key_select = if flavor::select_on_write(flavor) {
            vec![format!("$select={}", keys::encode(&entity.key_fields.join(",")))]
        } else {
            vec![]
        };
        let mut results: Vec<Option<Result<String, WriteFailure>>> = vec![None; ops.len()];
        let mut planned = Vec::new();
        let mut planned_ops = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let prefer = ("Prefer".to_string(), "return=representation".to_string());
            let create_by = if keys::addressable(flavor, &op.key) { flavor::create_by(flavor) } else { CreateBy::Post };
            let body = |leave_out: &[String]| binds::body(&op.fields, leave_out, entity, flavor);
            let plan = match (&op.precondition, create_by) {
                (Precondition::CreateOnly, CreateBy::Post) => body(&[]).map(|body| Planned {
                    method: Method::POST,
                    url: self.url(&keys::encode(&entity.name), &key_select),
                    headers: vec![prefer],
                    body: Some(body),
                }),
                (Precondition::CreateOnly, CreateBy::UpsertIfNoneMatch) => body(&entity.key_fields).and_then(|body| {
                    self.record_url(entity, &kinds[i], &op.key, &ids, &key_select).map(|url| Planned {
                        method: Method::PATCH,
                        url,
                        headers: vec![prefer, ("If-None-Match".into(), "*".into())],
                        body: Some(body),
                    })
                }),
                (Precondition::IfMatch(version), _) => body(&entity.key_fields).and_then(|body| {
                    self.record_url(entity, &kinds[i], &op.key, &ids, &key_select).map(|url| Planned {
                        method: Method::PATCH,
                        url,
                        // A service without etags gives no version: the update is then only
                        // conditional on the record existing.
                        headers: vec![
                            prefer,
                            ("If-Match".into(), if version.is_empty() { "*".into() } else { version.clone() }),
                        ],
                        body: Some(body),
                    })
                }),
            };
            match plan {
                Ok(p) => {
                    planned.push(p);
                    planned_ops.push(i);
                }
                // No record by that id: it is gone since the read.
                Err(m) if m == "no record with this key" => results[i] = Some(Err(WriteFailure::PreconditionFailed)),
                Err(m) => results[i] = Some(Err(WriteFailure::Rejected(m))),
            }
        }
        let redact: Vec<String> = ops.iter().flat_map(|op| Self::secrets_of(op, entity)).collect();
        let answers = self.send_planned(planned, &redact).await?;
        for (n, i) in planned_ops.into_iter().enumerate() {
            let op = &ops[i];
            let create_only = op.precondition == Precondition::CreateOnly;
            results[i] = Some(match answers.get(n).cloned().unwrap_or(Ok(None)) {
                Err(e) => Err(WriteFailure::from(&e)),
                Ok(Some(a)) if a.ok() => Ok(written_version(&a)),
                Ok(Some(a)) => {
                    let err = ServiceError::parse(&a.body);
                    let class = classify(a.status, a.retry_after(), &err);
                    let message =
                        errors::message(a.status, &err, &class, &Self::secrets_of(op, entity), &self.t.auth_hint);
                    Err(errors::write_failure(&class, create_only, message))
                }
                Ok(None) => Err(WriteFailure::Transient {
                    message: "the service stopped the $batch before this operation".into(),
                    retry_after: None,
                }),
            });
        }
        Ok(results.into_iter().map(|r| r.unwrap_or(Err(WriteFailure::Rejected("not planned".into())))).collect())
    }

    async fn delete(&self, entity: &EntitySpec, keys: &[Key]) -> Result<(), ConnectorError> {
        if keys.is_empty() {
            return Ok(());
        }
        let Some(kinds) = self.kinds(entity).await? else {
            return Ok(()); // nothing to delete
        };
        let flavor = self.flavor();
        let unaddressable: Vec<&Key> = keys.iter().filter(|k| !keys::addressable(flavor, k)).collect();
        let ids = if unaddressable.is_empty() || !flavor::writes_by_id(flavor) {
            HashMap::new()
        } else {
            self.ids_of(entity, &kinds, &unaddressable).await?
        };
        let mut planned = Vec::new();
        for key in keys {
            match self.record_url(entity, &kinds, key, &ids, &[]) {
                Ok(url) => planned.push(Planned { method: Method::DELETE, url, headers: vec![], body: None }),
                Err(m) if m == "no record with this key" => {} // already gone
                Err(m) => return Err(self.t.rejected(format!("cannot delete {}/{key}: {m}", entity.name))),
            }
        }
        let n = planned.len();
        let answers = self.send_planned(planned, &[]).await?;
        for a in answers.into_iter().take(n) {
            match a? {
                Some(a) if a.ok() || a.status == 404 => {}
                Some(a) => return Err(self.failure(&a, &[])),
                None => return Err(self.t.transient("the service stopped the $batch before a delete".into(), None)),
            }
        }
        Ok(())
    }

    async fn key_of_id(&self, entity: &EntitySpec, id: &str) -> Result<Option<Key>, ConnectorError> {
        self.read_key_by_id(entity, id).await
    }

    async fn diagnose(&self, entities: &[EntitySpec], companies: &[String]) -> Vec<Finding> {
        self.doctor(entities, companies).await
    }

    async fn list(&self, entity: &EntitySpec, after: Option<&str>, limit: usize) -> Result<ListPage, ConnectorError> {
        let url = match after {
            Some(link) => paging::resolve(&self.t.root, link).map_err(|m| self.t.rejected(m))?.to_string(),
            None => {
                let mut query = binds::projection(entity);
                query.push(format!("$orderby={}", keys::encode(&entity.key_fields.join(","))));
                self.url(&keys::encode(&entity.name), &query)
            }
        };
        let page = self.get_page(&url, limit).await?;
        let mut records = Vec::with_capacity(page.value.len());
        for e in &page.value {
            self.learn(entity, e);
            let (key, record) = values::to_record(e, entity).map_err(|e| self.t.transient(e.to_string(), None))?;
            // A record without an integration key is outside the map.
            if let Some(key) = key {
                records.push((key, record));
            }
        }
        let next = match page.next_link {
            Some(link) => Some(paging::resolve(&self.t.root, &link).map_err(|m| self.t.rejected(m))?.to_string()),
            None => None,
        };
        Ok(ListPage { records, next })
    }
}
