//! The handlers: read the request, call [`Admin`], answer with its result.
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use dualsync::admin::{Admin, JobView, Redrive, RedriveReport};
use dualsync::domain::errors::{ConflictRecord, DeadLetter, SyncError};
use dualsync::domain::metrics::MetricsView;
use dualsync::domain::requests::{ReconcileRequest, RequestAction};
use dualsync::ports::Page;
use dualsync::state::{ErrorCounts, ErrorFilter};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::input::{
    check_range, JsonBody, Params, QueryPairs, QueryParams, FILTER_PARAMS, PAGE_PARAMS, QUEUE_PARAM, SINCE_PARAM,
};

type AdminState = State<Arc<Admin>>;
type Answer<T> = Result<Json<T>, ApiError>;

/// The handler of one entry of [`crate::ROUTES`].
pub(crate) fn endpoint(method: &str, path: &str) -> MethodRouter<Arc<Admin>> {
    match (method, path) {
        ("GET", "/jobs") => get(jobs),
        ("GET", "/jobs/{job}") => get(job),
        ("POST", "/jobs/{job}/start") => post(start),
        ("POST", "/jobs/{job}/stop") => post(stop),
        ("POST", "/jobs/{job}/pause") => post(pause),
        ("POST", "/jobs/{job}/resume") => post(resume),
        ("GET", "/jobs/{job}/errors") => get(errors),
        ("GET", "/jobs/{job}/errors/counts") => get(counts),
        ("GET", "/jobs/{job}/errors/{id}") => get(error),
        ("GET", "/jobs/{job}/conflicts") => get(conflicts),
        ("GET", "/jobs/{job}/metrics") => get(metrics),
        ("POST", "/jobs/{job}/requests") => post(submit),
        ("GET", "/jobs/{job}/requests") => get(requests),
        ("GET", "/jobs/{job}/requests/{id}") => get(request),
        ("GET", "/dead-letters") => get(dead_letters),
        ("GET", "/dead-letters/{queue}/{id}") => get(dead_letter),
        ("POST", "/dead-letters/{queue}/redrive") => post(redrive),
        _ => panic!("no handler for {method} {path}"),
    }
}

async fn jobs(State(admin): AdminState) -> Answer<Vec<JobView>> {
    Ok(Json(admin.jobs().await?))
}

async fn job(State(admin): AdminState, Params(job): Params<String>) -> Answer<JobView> {
    Ok(Json(admin.job(&job).await?))
}

async fn start(State(admin): AdminState, Params(job): Params<String>) -> Answer<HandedBack> {
    let (job, handed_back) = admin.start(&job).await?;
    Ok(Json(HandedBack { job, handed_back }))
}

async fn stop(State(admin): AdminState, Params(job): Params<String>) -> Answer<JobView> {
    Ok(Json(admin.stop(&job).await?))
}

async fn pause(State(admin): AdminState, Params(job): Params<String>) -> Answer<JobView> {
    Ok(Json(admin.pause(&job).await?))
}

/// The answer to a start or a resume: the job, and how many kept deliveries went back to the
/// deliver queue.
#[derive(Debug, Serialize)]
pub struct HandedBack {
    pub job: JobView,
    pub handed_back: usize,
}

async fn resume(State(admin): AdminState, Params(job): Params<String>) -> Answer<HandedBack> {
    let (job, handed_back) = admin.resume(&job).await?;
    Ok(Json(HandedBack { job, handed_back }))
}

async fn errors(
    State(admin): AdminState,
    Params(job): Params<String>,
    QueryPairs(q): QueryPairs,
) -> Answer<Page<SyncError>> {
    let q = QueryParams::parse(q, &[FILTER_PARAMS, PAGE_PARAMS])?;
    Ok(Json(admin.errors(&job, &q.filter()?, q.limit()?, q.after()).await?))
}

async fn counts(
    State(admin): AdminState,
    Params(job): Params<String>,
    QueryPairs(q): QueryPairs,
) -> Answer<ErrorCounts> {
    let q = QueryParams::parse(q, &[FILTER_PARAMS])?;
    Ok(Json(admin.counts(&job, &q.filter()?).await?))
}

async fn error(State(admin): AdminState, Params((job, id)): Params<(String, String)>) -> Answer<SyncError> {
    Ok(Json(admin.error(&job, &id).await?))
}

async fn conflicts(
    State(admin): AdminState,
    Params(job): Params<String>,
    QueryPairs(q): QueryPairs,
) -> Answer<Page<ConflictRecord>> {
    let q = QueryParams::parse(q, &[PAGE_PARAMS])?;
    Ok(Json(admin.conflicts(&job, q.limit()?, q.after()).await?))
}

async fn metrics(
    State(admin): AdminState,
    Params(job): Params<String>,
    QueryPairs(q): QueryPairs,
) -> Answer<MetricsView> {
    let q = QueryParams::parse(q, &[SINCE_PARAM])?;
    Ok(Json(admin.metrics(&job, q.since()?).await?))
}

/// The body of `POST /jobs/{job}/requests`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRequest {
    pub action: RequestAction,
    #[serde(default)]
    pub filter: ErrorFilter,
}

async fn submit(
    State(admin): AdminState,
    Params(job): Params<String>,
    JsonBody(body): JsonBody<NewRequest>,
) -> Result<(StatusCode, Json<ReconcileRequest>), ApiError> {
    check_range(&body.filter, "filter")?;
    let request = admin.submit(&job, body.action, body.filter).await?;
    Ok((StatusCode::ACCEPTED, Json(request)))
}

async fn requests(State(admin): AdminState, Params(job): Params<String>) -> Answer<Vec<ReconcileRequest>> {
    Ok(Json(admin.requests(&job).await?))
}

async fn request(State(admin): AdminState, Params((job, id)): Params<(String, String)>) -> Answer<ReconcileRequest> {
    Ok(Json(admin.request(&job, &id).await?))
}

async fn dead_letters(State(admin): AdminState, QueryPairs(q): QueryPairs) -> Answer<Page<DeadLetter>> {
    let q = QueryParams::parse(q, &[QUEUE_PARAM, PAGE_PARAMS])?;
    Ok(Json(admin.dead_letters(q.get("queue"), q.limit()?, q.after()).await?))
}

async fn dead_letter(State(admin): AdminState, Params((queue, id)): Params<(String, String)>) -> Answer<DeadLetter> {
    Ok(Json(admin.dead_letter(&queue, &id).await?))
}

/// The body of `POST /dead-letters/{queue}/redrive`: one of `message_id`, `job` or `all`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveBody {
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub job: Option<String>,
    #[serde(default)]
    pub all: bool,
}

impl RedriveBody {
    pub fn which(self) -> Result<Redrive, ApiError> {
        match self {
            RedriveBody { message_id: Some(id), job: None, all: false } => Ok(Redrive::Message(id)),
            RedriveBody { message_id: None, job: Some(job), all: false } => Ok(Redrive::Job(job)),
            RedriveBody { message_id: None, job: None, all: true } => Ok(Redrive::All),
            _ => Err(ApiError::bad_request(
                r#"body: say which dead letters with exactly one of "message_id", "job" or "all": true"#,
            )),
        }
    }
}

async fn redrive(
    State(admin): AdminState,
    Params(queue): Params<String>,
    JsonBody(body): JsonBody<RedriveBody>,
) -> Answer<RedriveReport> {
    Ok(Json(admin.redrive(&queue, &body.which()?).await?))
}
