//! Whether a pushed event carries the app's ingress key, the way Dataverse webhooks send it:
//! `WebhookKey` (`?code=`), `HttpHeader` (a named header), `HttpQueryString` (a named query
//! parameter). The expected key is read from the environment variable the job file names.
use sha2::{Digest, Sha256};

use super::request::Request;
use crate::domain::job::IngressAuth;

/// Why a request is not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No key, or the wrong one: a 401 that says nothing more.
    Unauthorized,
    /// The variable that should hold the key is unset or empty: the operator's to fix, so it
    /// is named in the log, never to the caller.
    NotConfigured { key_env: String },
}

/// Checks `req` against `auth`; `env` reads an environment variable.
pub fn check(auth: &IngressAuth, req: &Request, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Denied> {
    let expected = env(auth.key_env())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Denied::NotConfigured { key_env: auth.key_env().to_string() })?;
    let given = match auth {
        IngressAuth::WebhookKey { .. } => req.query("code"),
        IngressAuth::HttpHeader { name, .. } => req.header(name),
        IngressAuth::HttpQueryString { name, .. } => req.query(name),
    };
    match given {
        Some(g) if same(g.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(Denied::Unauthorized),
    }
}

/// Compares the keys' digests (fixed length) without an early exit, so the time taken says
/// nothing about how much of a guess was right, nor about the key's length.
fn same(given: &[u8], expected: &[u8]) -> bool {
    let (a, b): ([u8; 32], [u8; 32]) = (Sha256::digest(given).into(), Sha256::digest(expected).into());
    let diff = a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cret-key".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn req(headers: &[(&str, &str)], query: &[(&str, &str)]) -> Request {
        let pairs = |p: &[(&str, &str)]| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Request { headers: pairs(headers), query: pairs(query), ..Request::default() }
    }

    #[test]
    fn a_webhook_key_is_the_code_query_parameter() {
        let auth = IngressAuth::WebhookKey { key_env: "KEY".into() };
        assert_eq!(check(&auth, &req(&[], &[("code", "s3cret-key")]), &env), Ok(()));
        assert_eq!(check(&auth, &req(&[], &[("code", "s3cret-key ")]), &env), Err(Denied::Unauthorized));
        assert_eq!(check(&auth, &req(&[], &[("Code", "s3cret-key")]), &env), Err(Denied::Unauthorized));
        assert_eq!(check(&auth, &req(&[("code", "s3cret-key")], &[]), &env), Err(Denied::Unauthorized));
        assert_eq!(check(&auth, &req(&[], &[]), &env), Err(Denied::Unauthorized));
    }

    #[test]
    fn a_header_key_is_matched_by_name_in_any_case() {
        let auth = IngressAuth::HttpHeader { name: "X-Dualsync-Key".into(), key_env: "KEY".into() };
        assert_eq!(check(&auth, &req(&[("x-dualsync-key", "s3cret-key")], &[]), &env), Ok(()));
        assert_eq!(check(&auth, &req(&[("x-dualsync-key", "s3cret")], &[]), &env), Err(Denied::Unauthorized));
        assert_eq!(check(&auth, &req(&[], &[("X-Dualsync-Key", "s3cret-key")]), &env), Err(Denied::Unauthorized));
    }

    #[test]
    fn a_query_string_key_is_its_named_parameter() {
        let auth = IngressAuth::HttpQueryString { name: "key".into(), key_env: "KEY".into() };
        assert_eq!(check(&auth, &req(&[], &[("key", "s3cret-key")]), &env), Ok(()));
        assert_eq!(check(&auth, &req(&[], &[("code", "s3cret-key")]), &env), Err(Denied::Unauthorized));
    }

    #[test]
    fn an_unset_or_empty_key_variable_lets_nobody_in() {
        for key_env in ["UNSET", "EMPTY"] {
            let auth = IngressAuth::WebhookKey { key_env: key_env.into() };
            // Not even a request with an empty key.
            assert_eq!(
                check(&auth, &req(&[], &[("code", "")]), &env),
                Err(Denied::NotConfigured { key_env: key_env.into() })
            );
        }
    }
}
