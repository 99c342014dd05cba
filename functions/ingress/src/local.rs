//! The ingress routes as an axum router, for the local runner's HTTP server.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use dualsync::steps::ingress::{Ingress, Request};

use crate::MAX_BODY_BYTES;

/// `POST /ingress/{job}/{app}/{source}` over `ingress`; no fallback, so that it merges with
/// another router (the admin API's) that has one.
pub fn router(ingress: Arc<Ingress>) -> Router {
    Router::new()
        .route(&format!("{}/{{job}}/{{app}}/{{source}}", crate::PREFIX), post(handle))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(ingress)
}

async fn handle(
    State(ingress): State<Arc<Ingress>>,
    Path((job, app, source)): Path<(String, String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let headers =
        headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string()))).collect();
    let req = Request { job, app, source, headers, query, body: body.to_vec() };
    let answer = ingress.handle(&req).await;
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(answer.body)).into_response()
}
