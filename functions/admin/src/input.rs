//! What a request carries: path parameters, query parameters and JSON bodies, each read so that
//! a bad value is answered `400 {"error": ...}` naming what was wrong.
use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::state::ErrorFilter;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Page size when `limit` is not given.
pub const DEFAULT_LIMIT: usize = 50;
/// The largest `limit` a page takes.
pub const MAX_LIMIT: usize = 1000;

/// The error filter's query parameters.
pub const FILTER_PARAMS: &[&str] = &["from_ms", "to_ms", "entity", "app", "category", "status"];
/// The paging query parameters.
pub const PAGE_PARAMS: &[&str] = &["limit", "after"];
/// The dead-letter list's queue parameter.
pub const QUEUE_PARAM: &[&str] = &["queue"];

/// The metrics' start.
pub const SINCE_PARAM: &[&str] = &["since"];

/// Path parameters (`/jobs/{job}/...`).
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(t)) => Ok(Params(t)),
            Err(e) => Err(ApiError::new(e.status(), format!("path: {}", e.body_text()))),
        }
    }
}

/// The query string as name/value pairs, in order, repeats kept.
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Query(pairs)) => Ok(QueryPairs(pairs)),
            Err(e) => Err(ApiError::bad_request(format!("query string: {}", e.body_text()))),
        }
    }
}

/// A JSON body; a value of the wrong shape is answered naming its field.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), format!("body: {}", e.body_text())))?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        match serde_path_to_error::deserialize(de) {
            Ok(t) => Ok(JsonBody(t)),
            Err(e) => {
                let path = e.path().to_string();
                let inner = e.into_inner();
                Err(ApiError::bad_request(match path.as_str() {
                    "." | "" => format!("body: {inner}"),
                    p => format!("body: {p}: {inner}"),
                }))
            }
        }
    }
}

/// Query parameters checked against the names a route takes: an unknown name (a typo that would
/// otherwise widen a filter unnoticed), a repeat or an empty value is a bad request.
#[derive(Debug, Default)]
pub struct QueryParams(BTreeMap<String, String>);

impl QueryParams {
    pub fn parse(pairs: Vec<(String, String)>, allowed: &[&[&str]]) -> Result<Self, ApiError> {
        let mut out = BTreeMap::new();
        for (name, value) in pairs {
            if !allowed.iter().any(|set| set.contains(&name.as_str())) {
                let names: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter '{name}': this route takes {}",
                    if names.is_empty() { "none".to_string() } else { names.join(", ") }
                )));
            }
            if value.is_empty() {
                return Err(ApiError::bad_request(format!("query parameter '{name}' is empty")));
            }
            if out.contains_key(&name) {
                return Err(ApiError::bad_request(format!("query parameter '{name}' is given more than once")));
            }
            out.insert(name, value);
        }
        Ok(QueryParams(out))
    }

    /// A parameter's value as given.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn parsed<T>(&self, name: &str, parse: impl Fn(&str) -> Option<T>, expected: &str) -> Result<Option<T>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => parse(v)
                .map(Some)
                .ok_or_else(|| ApiError::bad_request(format!("query parameter '{name}' is '{v}': {expected}"))),
        }
    }

    /// `from_ms`, `to_ms`, `entity`, `app`, `category`, `status`.
    pub fn filter(&self) -> Result<ErrorFilter, ApiError> {
        let ms = |v: &str| v.parse::<i64>().ok();
        let one_of = |names: &[&str]| format!("use one of {}", names.join(", "));
        let filter = ErrorFilter {
            from_ms: self.parsed("from_ms", ms, "expected milliseconds since the epoch")?,
            to_ms: self.parsed("to_ms", ms, "expected milliseconds since the epoch")?,
            entity: self.get("entity").map(str::to_string),
            app: self.get("app").map(str::to_string),
            category: self.parsed(
                "category",
                ErrorCategory::parse,
                &one_of(&ErrorCategory::ALL.map(ErrorCategory::as_str)),
            )?,
            status: self.parsed("status", ErrorStatus::parse, &one_of(&ErrorStatus::ALL.map(ErrorStatus::as_str)))?,
        };
        check_range(&filter, "query parameter")?;
        Ok(filter)
    }

    /// `limit` (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]).
    pub fn limit(&self) -> Result<usize, ApiError> {
        let limit = self.parsed(
            "limit",
            |v| v.parse::<usize>().ok().filter(|n| (1..=MAX_LIMIT).contains(n)),
            &format!("expected a whole number from 1 to {MAX_LIMIT}"),
        )?;
        Ok(limit.unwrap_or(DEFAULT_LIMIT))
    }

    /// `since`: milliseconds since the epoch.
    pub fn since(&self) -> Result<Option<i64>, ApiError> {
        self.parsed("since", |v| v.parse::<i64>().ok().filter(|n| *n >= 0), "expected milliseconds since the epoch")
    }

    /// `after`: the `next` cursor of the previous page.
    pub fn after(&self) -> Option<&str> {
        self.get("after")
    }
}

/// A time range that selects nothing is a mistake, not an empty answer.
pub fn check_range(filter: &ErrorFilter, what: &str) -> Result<(), ApiError> {
    match (filter.from_ms, filter.to_ms) {
        (Some(from), Some(to)) if from >= to => Err(ApiError::bad_request(format!(
            "{what} 'from_ms' ({from}) must be less than 'to_ms' ({to}): the range is from_ms inclusive to to_ms exclusive"
        ))),
        _ => Ok(()),
    }
}
