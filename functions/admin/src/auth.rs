//! The bearer token that guards the API where nothing else does (the local runner). On AWS the
//! function URL's AWS_IAM auth (SigV4) does this job instead.
use std::sync::Arc;

use axum::extract::Request;
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::Router;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Requires `Authorization: Bearer <token>` on every request, unknown routes included, and
/// answers `401 {"error": ...}` otherwise. An empty `token` refuses every request.
pub fn with_token(router: Router, token: String) -> Router {
    let expected: Arc<Option<[u8; 32]>> = Arc::new((!token.is_empty()).then(|| digest(token.as_bytes())));
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        let expected = expected.clone();
        async move {
            match check(&req, expected.as_ref().as_ref()) {
                Ok(()) => next.run(req).await,
                Err(e) => e.into_response(),
            }
        }
    }))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn check(req: &Request, expected: Option<&[u8; 32]>) -> Result<(), ApiError> {
    let malformed =
        || ApiError::unauthorized("missing or malformed Authorization header: send 'Authorization: Bearer <token>'");
    let value = req.headers().get(AUTHORIZATION).ok_or_else(malformed)?;
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    match expected {
        Some(expected) if constant_time_eq(&digest(token.as_bytes()), expected) => Ok(()),
        _ => Err(ApiError::unauthorized("wrong bearer token")),
    }
}

/// Compares digests (fixed length) without an early exit, so the time taken says nothing about
/// how much of the token was right.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares_whole_digests() {
        let a = digest(b"secret");
        assert!(constant_time_eq(&a, &digest(b"secret")));
        assert!(!constant_time_eq(&a, &digest(b"secret ")));
        let mut last_bit = a;
        last_bit[31] ^= 1;
        assert!(!constant_time_eq(&a, &last_bit));
    }
}
