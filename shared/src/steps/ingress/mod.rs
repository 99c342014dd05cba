//! Pushed events in, references on the capture queue out: the handler behind
//! `POST /ingress/{job}/{app}/{source}` (DESIGN §2, ingress), written once for the local runner's
//! HTTP server and the AWS ingress function, over a framework-free [`Request`] and [`Response`].
//!
//! In order, each failure answering at once:
//!
//! 1. the route: the source is `dataverse`, `fno` or `notification`, the job exists and has the
//!    app, and the app takes pushed events (`ingress` in the job file); otherwise 404, the same
//!    answer for each so that an unauthenticated caller learns nothing of the job (the log says
//!    which);
//! 2. the key ([`auth`]): 401 `unauthorized`, nothing more;
//! 3. the body, parsed by [`crate::domain::ingress`] into references: 400 naming what is wrong
//!    and where (the parser's own words);
//! 4. entities no map covers are ignored and counted (the sender would retry an error for
//!    ever), events of dualsync's own application user are skipped as echoes ([`routing`]);
//! 5. a record named only by id (Dataverse stripped the images for size) has its key read back
//!    through the app's connector; one that cannot be read (a delete: the record is gone) is an
//!    error row naming the record id, never dropped. The app unreachable: 503, nothing
//!    captured, and the sender sends again;
//! 6. the notifications, cut to the queue's message size ([`fit`]), go to the capture queue;
//!    200 with the counts. No delivery work happens in the request: capture does the rest.
pub mod auth;
mod fit;
pub mod request;
pub mod routing;

use std::sync::Arc;

use tracing::{debug, error, info, warn};

use crate::domain::change::{Key, TransactionNotification};
use crate::domain::errors::ErrorCategory;
use crate::domain::ingress::{dataverse, fno, Event, RecordRef, Reference};
use crate::domain::job::{IngressSpec, Job, Side};
use crate::ports::{ConnectorError, EntitySpec, OutMessage, Queue};
use crate::state::{NewError, State, StateError};
use crate::steps::{ConnectorRegistry, StepError};

pub use auth::Denied;
pub use fit::fit;
pub use request::{Accepted, Request, Response, Source};

/// Reads an environment variable (the process's, or a test's).
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The ingress handler: the state (jobs, error rows), the apps' connectors (for keys read back
/// by id) and the capture queue.
pub struct Ingress {
    state: State,
    registry: Arc<dyn ConnectorRegistry>,
    capture: Arc<dyn Queue>,
    env: Env,
}

/// What the route names: the job, the app's side and its ingress settings.
struct Route {
    job: Job,
    side: Side,
    spec: IngressSpec,
    source: Source,
}

impl Ingress {
    /// Keys are read from the process environment.
    pub fn new(state: State, registry: Arc<dyn ConnectorRegistry>, capture: Arc<dyn Queue>) -> Ingress {
        Ingress { state, registry, capture, env: Arc::new(|k| std::env::var(k).ok()) }
    }

    /// Keys are read through `env` instead (tests).
    pub fn with_env(mut self, env: Env) -> Ingress {
        self.env = env;
        self
    }

    /// Handles one request; never fails: every outcome is an answer.
    pub async fn handle(&self, req: &Request) -> Response {
        match self.accept(req).await {
            Ok(a) => a.response(),
            Err(r) => r,
        }
    }

    async fn accept(&self, req: &Request) -> Result<Accepted, Response> {
        let route = self.route(req).await?;
        match auth::check(&route.spec.auth, req, self.env.as_ref()) {
            Ok(()) => {}
            Err(Denied::Unauthorized) => {
                warn!(job = %req.job, app = %req.app, source = %req.source, "ingress: missing or wrong key");
                return Err(Response::error(401, "unauthorized"));
            }
            Err(Denied::NotConfigured { key_env }) => {
                error!(job = %req.job, app = %req.app, %key_env,
                    "ingress: the app's key variable is not set; every request is refused");
                return Err(Response::error(500, "ingress is not configured on this server"));
            }
        }
        let app = req.app.as_str();
        let now = self.state.now_ms();
        let txs = match route.source {
            Source::Notification => vec![own_notification(req, &route.job.name, app)?],
            Source::Dataverse | Source::Fno => {
                let events = self.parse(&route, req, now)?;
                let mut out = Accepted::default();
                let mut txs = Vec::new();
                for event in events {
                    if let Some(tx) = self.notification(&route, app, event, now, &mut out).await? {
                        txs.push(tx);
                    }
                }
                return self.send(&route.job.name, app, txs, out).await;
            }
        };
        self.send(&route.job.name, app, txs, Accepted::default()).await
    }

    /// The job, side and settings the request's path names.
    async fn route(&self, req: &Request) -> Result<Route, Response> {
        let not_found = |why: String| {
            warn!(job = %req.job, app = %req.app, source = %req.source, "ingress: {why}");
            Response::error(404, format!("no ingress route /ingress/{}/{}/{}", req.job, req.app, req.source))
        };
        let Some(source) = Source::parse(&req.source) else {
            return Err(not_found(format!("'{}' is not a source (dataverse, fno, notification)", req.source)));
        };
        let job = match self.state.job(&req.job).await {
            Ok((job, _)) => job,
            Err(StateError::UnknownJob(_)) => return Err(not_found("no such job".into())),
            Err(e) => return Err(unavailable(&e.into())),
        };
        let Some(side) = job.side_of(&req.app) else {
            return Err(not_found("the job has no such app".into()));
        };
        let Some(spec) = job.apps[side.index()].ingress.clone() else {
            return Err(not_found("the app takes no pushed events: give it 'ingress' in the job file".into()));
        };
        Ok(Route { job, side, spec, source })
    }

    /// The body as events, or a 400 naming what is wrong.
    fn parse(&self, route: &Route, req: &Request, now: i64) -> Result<Vec<Event>, Response> {
        let mapped = |name: &str| routing::entity_keys(&route.job, route.side, route.source, name);
        let parsed = match route.source {
            Source::Dataverse => {
                // Dataverse sets the header (to "true") when it removed the images for size.
                let stripped = req
                    .header(dataverse::SIZE_EXCEEDED_HEADER)
                    .is_some_and(|v| !v.trim().eq_ignore_ascii_case("false"));
                dataverse::parse(&req.body, &mapped, stripped, now).map(|e| vec![e])
            }
            Source::Fno => fno::parse(&req.body, &mapped, now),
            Source::Notification => Ok(vec![]),
        };
        parsed.map_err(|e| {
            info!(job = %route.job.name, app = %req.app, source = %req.source, error = %e, "ingress: bad event");
            Response::error(400, format!("{} event: {e}", route.source.as_str()))
        })
    }

    /// One event as a notification of its changes: unmapped entities and own writes left out,
    /// records named by id read back by key (or left as error rows).
    async fn notification(
        &self,
        route: &Route,
        app: &str,
        mut event: Event,
        now: i64,
        out: &mut Accepted,
    ) -> Result<Option<TransactionNotification>, Response> {
        for name in &event.ignored {
            debug!(job = %route.job.name, app, entity = %name, "ingress: no map covers this entity; ignored");
        }
        out.ignored += event.ignored.len();
        if event.changes.is_empty() {
            return Ok(None);
        }
        if routing::is_own_write(event.user.as_deref(), route.spec.own_user_id.as_deref()) {
            debug!(job = %route.job.name, app, txid = %event.txid, "ingress: dualsync's own write; skipped");
            out.own_writes += event.changes.len();
            return Ok(None);
        }
        let mut kept = Vec::with_capacity(event.changes.len());
        for mut change in std::mem::take(&mut event.changes) {
            if let RecordRef::Id(id) = &change.record {
                match self.key_of_id(route, &change, id).await? {
                    Ok(key) => change.record = RecordRef::Key(key),
                    Err(reason) => {
                        self.unresolved(route, app, &event.txid, &change, id, now, reason).await?;
                        out.errors += 1;
                        continue;
                    }
                }
            }
            kept.push(change);
        }
        event.changes = kept;
        if event.changes.is_empty() {
            return Ok(None);
        }
        // The clock stands in for an order the event does not give (every key is resolved).
        let tx = event.notification(&route.job.name, app, now.max(0) as u64).map_err(|e| {
            error!(job = %route.job.name, app, error = %e, "ingress: a reference left unresolved");
            Response::error(500, "internal error")
        })?;
        Ok(Some(tx))
    }

    /// The record's key read back through the app's connector: the key, or why not (for an
    /// error row). An app that cannot be reached now is a 503: the sender sends again.
    async fn key_of_id(&self, route: &Route, change: &Reference, id: &str) -> Result<Result<Key, String>, Response> {
        let Some((_, map)) = route.job.map_for_entity(route.side, &change.entity) else {
            return Ok(Err(format!("entity {} is not mapped", change.entity)));
        };
        let spec = EntitySpec {
            name: change.entity.clone(),
            key_fields: map.key_fields(route.side),
            fields: vec![],
            binds: vec![],
        };
        let read = match self.registry.connectors(&route.job) {
            Ok(c) => c[route.side.index()].key_of_id(&spec, id).await,
            Err(e) => Err(e),
        };
        match read {
            Ok(Some(key)) => Ok(Ok(key)),
            Ok(None) => Ok(Err(format!("no {} record has id {id} (a delete names a record already gone: register a pre image with the key fields)", change.entity))),
            Err(e @ ConnectorError::Transient { .. }) => {
                warn!(job = %route.job.name, error = %e, "ingress: cannot read a key back by id now");
                Err(Response::error(503, format!("the app cannot be reached to read record {id}'s key; send again")))
            }
            Err(e @ ConnectorError::Rejected { .. }) => Ok(Err(e.message().to_string())),
        }
    }

    /// The error row of a change whose key could not be read back, under its record id.
    #[allow(clippy::too_many_arguments)]
    async fn unresolved(
        &self,
        route: &Route,
        app: &str,
        txid: &str,
        change: &Reference,
        id: &str,
        now: i64,
        reason: String,
    ) -> Result<(), Response> {
        let map =
            route.job.map_for_entity(route.side, &change.entity).map_or(change.entity.clone(), |(_, m)| m.name.clone());
        // Not retriable (no integration key to address the counterpart by): say what mends it.
        let (op, mend) = match change.op {
            crate::domain::change::Operation::Upsert => {
                ("change", "the record's next change, or an initial sync, brings it".to_string())
            }
            crate::domain::change::Operation::Delete => (
                "delete",
                format!(
                    "its counterpart in {}, if any, was not deleted: delete it there, then dismiss this row",
                    route.job.app_name(route.side.other())
                ),
            ),
        };
        let error = NewError {
            map,
            entity: change.entity.clone(),
            app: app.to_string(),
            source: route.side,
            key: Key(vec![id.to_string()]),
            by_record_id: true,
            seq: change.seq.unwrap_or(now.max(0) as u64),
            txid: txid.to_string(),
            category: ErrorCategory::Application,
            message: format!(
                "{op} of {} record {id} not captured: the event names it by id only and its integration key \
                 could not be read back: {reason}; {mend}",
                change.entity
            ),
            delete: false,
        };
        self.state.record_error_counted(&route.job.name, error).await.map_err(|e| unavailable(&StepError::from(e)))?;
        Ok(())
    }

    /// The notifications, cut to the queue's size, on the capture queue.
    async fn send(
        &self,
        job: &str,
        app: &str,
        txs: Vec<TransactionNotification>,
        mut out: Accepted,
    ) -> Result<Accepted, Response> {
        let mut msgs = Vec::new();
        for tx in txs {
            let before = tx.changes.len();
            let parts = fit(&self.state, tx).await.map_err(|e| unavailable(&e))?;
            let kept: usize = parts.iter().map(|p| p.changes.len()).sum();
            out.errors += before - kept;
            out.captured += kept;
            for p in parts {
                let body = serde_json::to_string(&p).map_err(|e| {
                    error!(job, app, error = %e, "ingress: cannot encode a notification");
                    Response::error(500, "internal error")
                })?;
                msgs.push(OutMessage::standard(body));
            }
        }
        if !msgs.is_empty() {
            self.capture.send(msgs).await.map_err(|e| unavailable(&e.into()))?;
        }
        info!(
            job,
            app,
            captured = out.captured,
            ignored = out.ignored,
            own_writes = out.own_writes,
            errors = out.errors,
            "ingress: accepted"
        );
        Ok(out)
    }
}

/// The project's own notification (the capture queue's format), checked against the route.
fn own_notification(req: &Request, job: &str, app: &str) -> Result<TransactionNotification, Response> {
    let bad = |m: String| Response::error(400, format!("notification: {m}"));
    let de = &mut serde_json::Deserializer::from_slice(&req.body);
    let tx: TransactionNotification = serde_path_to_error::deserialize(de).map_err(|e| {
        let at = e.path().to_string();
        bad(if at == "." { e.inner().to_string() } else { format!("{at}: {}", e.inner()) })
    })?;
    if tx.job != job {
        return Err(bad(format!("job '{}' is not the route's job '{job}'", tx.job)));
    }
    if tx.app != app {
        return Err(bad(format!("app '{}' is not the route's app '{app}'", tx.app)));
    }
    if tx.txid.is_empty() {
        return Err(bad("txid: is empty".into()));
    }
    if let Some(why) = crate::domain::keys::txid_too_long(job, app, &tx.txid) {
        return Err(bad(format!("txid: {why}")));
    }
    if !tx.parts.is_whole() {
        return Err(bad("parts: send the whole transaction; ingress splits it to the queue's size".into()));
    }
    if tx.changes.is_empty() {
        return Err(bad("changes: is empty".into()));
    }
    if let Some(i) = tx.changes.iter().position(|c| c.app != app) {
        return Err(bad(format!("changes[{i}].app: '{}' is not the route's app '{app}'", tx.changes[i].app)));
    }
    Ok(tx)
}

/// The state or the queue cannot be reached: 503, so that the sender sends again.
fn unavailable(e: &StepError) -> Response {
    error!(error = %e, "ingress: state or capture queue unavailable");
    Response::error(503, "dualsync cannot take events right now; send again")
}
