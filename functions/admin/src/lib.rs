//! The admin HTTP JSON API over [`Admin`]: jobs, start and stop, pause and resume, error rows and
//! counts, the conflict log, metrics by the minute, retry/dismiss requests, and dead letters with
//! their redrive (documented in `docs/admin-api.openapi.yaml`).
//!
//! [`router`] serves [`ROUTES`]; the local runner wraps it in [`with_token`] (a bearer token),
//! and the admin Lambda serves it as it is behind a function URL with AWS_IAM auth.
//!
//! Answers are JSON. Failures are `{"error": "<message>"}`: 404 for an unknown job, error,
//! request, queue or dead letter, 409 for what a rule refuses (the job's status, the request limits), 400 for a bad
//! parameter or body (naming it), 401 for a missing or wrong token, 500 for the rest.
mod auth;
mod error;
mod input;
mod routes;

use std::sync::Arc;

use axum::http::{Method, StatusCode, Uri};
use axum::Router;
use dualsync::admin::Admin;

pub use auth::with_token;
pub use error::ApiError;
pub use input::{DEFAULT_LIMIT, MAX_LIMIT};
pub use routes::{HandedBack, NewRequest, RedriveBody};

/// Every (method, path) the API serves; [`router`] is built from this list, and a test checks
/// it against the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/jobs"),
    ("GET", "/jobs/{job}"),
    ("POST", "/jobs/{job}/start"),
    ("POST", "/jobs/{job}/stop"),
    ("POST", "/jobs/{job}/pause"),
    ("POST", "/jobs/{job}/resume"),
    ("GET", "/jobs/{job}/errors"),
    ("GET", "/jobs/{job}/errors/counts"),
    ("GET", "/jobs/{job}/errors/{id}"),
    ("GET", "/jobs/{job}/conflicts"),
    ("GET", "/jobs/{job}/metrics"),
    ("POST", "/jobs/{job}/requests"),
    ("GET", "/jobs/{job}/requests"),
    ("GET", "/jobs/{job}/requests/{id}"),
    ("GET", "/dead-letters"),
    ("GET", "/dead-letters/{queue}/{id}"),
    ("POST", "/dead-letters/{queue}/redrive"),
];

/// The API over `admin`, without authentication (see [`with_token`]).
pub fn router(admin: Arc<Admin>) -> Router {
    ROUTES
        .iter()
        .fold(Router::new(), |r, (method, path)| r.route(path, routes::endpoint(method, path)))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(no_route)
        .with_state(admin)
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no route {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, format!("{} does not take {method}", uri.path()))
}

#[cfg(test)]
mod tests;
