//! The operators' web dashboard (issue 12): jobs, sync errors with retry and dismiss of a
//! selection, requests and their progress, conflicts, dead letters with redrive, and charts.
//!
//! One hand-written page and script (`src/assets/`) over the admin JSON API, embedded in the
//! binary and served from the API's own origin: no CDN, no build step. [`router`] serves the
//! files under `/dashboard/`; the API beside it is the caller's: `dualsync run` merges it with
//! the admin router behind its bearer token, and [`proxy::router`] with calls forwarded, signed
//! with SigV4, to a stack's admin function URL. This crate is the CLI's: the admin Lambda's
//! binary does not carry it.
pub mod proxy;
pub mod sigv4;

use axum::http::header::{self, HeaderName};
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use axum::Router;

pub use sigv4::Signer;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// Where the dashboard is served: `http://<address>/dashboard/`.
pub const PATH: &str = "/dashboard/";

/// The dashboard's files (and `/` sends a browser there). Its API calls go to the same origin.
pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to(PATH) }))
        .route("/dashboard", get(|| async { Redirect::to(PATH) }))
        .route(PATH, get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/dashboard/app.js", get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/dashboard/app.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}

/// A file with headers that keep the page to its own origin: scripts, styles and calls from
/// this server only (no inline script can run), never framed, no referrer sent.
fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    let headers: [(HeaderName, &'static str); 6] = [
        (header::CONTENT_TYPE, content_type),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        // A new binary serves new files: never use a stale copy.
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, body)
}
