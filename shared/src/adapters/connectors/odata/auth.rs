//! Credentials for an OData service: OAuth2 client credentials (Microsoft Entra ID) with the
//! token cached until shortly before it expires, HTTP basic, a bearer token, or none.
//!
//! Secrets are read from the environment variables the job file names when the connector is
//! built, and live only in [`Secret`], whose `Debug` shows nothing: they never reach a log, an
//! error message or the state table. An error names the variable, never its value.
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::domain::job::AuthSpec;

/// A secret value: shown as `<secret>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// Credentials resolved from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    ClientCredentials { token_url: String, client_id: String, secret: Secret, scope: String },
    Basic { username: String, password: Secret },
    Bearer(Secret),
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("environment variable {0} is not set (auth)")]
    Missing(String),
    #[error(
        "token endpoint refused the client credentials (HTTP {status}{code}): check the client id and {secret_env}"
    )]
    Refused { status: u16, code: String, secret_env: String },
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint answered without a token")]
    NoToken,
}

impl Credentials {
    /// Resolves `spec` with `env` (the process environment in production).
    pub fn resolve(
        spec: &AuthSpec,
        service_url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthError> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty()).ok_or_else(|| AuthError::Missing(name.to_string()));
        Ok(match spec {
            AuthSpec::ClientCredentials { tenant, token_url, client_id, client_id_env, client_secret_env, scope } => {
                let token_url = match (token_url, tenant) {
                    (Some(u), _) => u.clone(),
                    (None, Some(t)) => format!("https://login.microsoftonline.com/{t}/oauth2/v2.0/token"),
                    (None, None) => return Err(AuthError::Missing("auth.tenant".into())),
                };
                let client_id = match (client_id, client_id_env) {
                    (Some(id), _) => id.clone(),
                    (None, Some(e)) => var(e)?,
                    (None, None) => return Err(AuthError::Missing("auth.client_id".into())),
                };
                Credentials::ClientCredentials {
                    token_url,
                    client_id,
                    secret: Secret(var(client_secret_env)?),
                    scope: scope.clone().unwrap_or_else(|| format!("{}/.default", origin(service_url))),
                }
            }
            AuthSpec::Basic { username, username_env, password_env } => Credentials::Basic {
                username: match (username, username_env) {
                    (Some(u), _) => u.clone(),
                    (None, Some(e)) => var(e)?,
                    (None, None) => return Err(AuthError::Missing("auth.username".into())),
                },
                password: Secret(var(password_env)?),
            },
            AuthSpec::Bearer { token_env } => Credentials::Bearer(Secret(var(token_env)?)),
            AuthSpec::None => Credentials::None,
        })
    }
}

/// `scheme://host[:port]` of a URL.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// What to tell an operator to check when the service answers 401.
pub fn hint(spec: &AuthSpec) -> String {
    match spec {
        AuthSpec::ClientCredentials { client_secret_env, .. } => {
            format!("the app registration, its application user and {client_secret_env}")
        }
        AuthSpec::Basic { password_env, .. } => format!("the user name and {password_env}"),
        AuthSpec::Bearer { token_env } => format!("the token in {token_env}"),
        AuthSpec::None => "whether the service needs auth".into(),
    }
}

/// A token is renewed this long before it expires, so none expires in flight.
const EARLY: Duration = Duration::from_secs(300);

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

/// Gives the `Authorization` header value, fetching and caching OAuth tokens.
#[derive(Debug)]
pub struct Authenticator {
    creds: Credentials,
    secret_env: String,
    cached: Mutex<Option<(Secret, Instant)>>,
}

impl Authenticator {
    pub fn new(creds: Credentials, spec: &AuthSpec) -> Self {
        let secret_env = match spec {
            AuthSpec::ClientCredentials { client_secret_env, .. } => client_secret_env.clone(),
            _ => String::new(),
        };
        Authenticator { creds, secret_env, cached: Mutex::new(None) }
    }

    /// The header value, or `None` without auth.
    pub async fn header(&self, http: &reqwest::Client) -> Result<Option<Secret>, AuthError> {
        match &self.creds {
            Credentials::None => Ok(None),
            Credentials::Bearer(t) => Ok(Some(Secret(format!("Bearer {}", t.expose())))),
            Credentials::Basic { username, password } => {
                let raw = format!("{username}:{}", password.expose());
                Ok(Some(Secret(format!("Basic {}", base64(raw.as_bytes())))))
            }
            Credentials::ClientCredentials { .. } => {
                // One fetch at a time: concurrent requests wait for the same token.
                let mut cached = self.cached.lock().await;
                if let Some((token, until)) = cached.as_ref() {
                    if Instant::now() < *until {
                        return Ok(Some(Secret(format!("Bearer {}", token.expose()))));
                    }
                }
                let (token, lifetime) = self.fetch(http).await?;
                let header = Secret(format!("Bearer {}", token.expose()));
                let keep = lifetime.saturating_sub(EARLY).max(lifetime / 2);
                *cached = Some((token, Instant::now() + keep));
                Ok(Some(header))
            }
        }
    }

    /// Forgets the cached token (the service refused it: revoked, or the clock is off).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    /// Whether a refused request is worth one more try with a new token.
    pub fn renews(&self) -> bool {
        matches!(self.creds, Credentials::ClientCredentials { .. })
    }

    async fn fetch(&self, http: &reqwest::Client) -> Result<(Secret, Duration), AuthError> {
        let Credentials::ClientCredentials { token_url, client_id, secret, scope } = &self.creds else {
            return Err(AuthError::NoToken);
        };
        let form = format!(
            "grant_type=client_credentials&client_id={}&client_secret={}&scope={}",
            form_encode(client_id),
            form_encode(secret.expose()),
            form_encode(scope)
        );
        let resp = http
            .post(token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| AuthError::Unreachable(without_url(&e)))?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(|e| AuthError::Unreachable(without_url(&e)))?;
        if !(200..300).contains(&status) {
            // Entra answers {"error": "invalid_client", "error_description": ...}: keep the code.
            let code = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(|s| format!(" {s}")))
                .unwrap_or_default();
            return Err(AuthError::Refused { status, code, secret_env: self.secret_env.clone() });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| AuthError::NoToken)?;
        let token = answer.access_token.filter(|t| !t.is_empty()).ok_or(AuthError::NoToken)?;
        let secs = match answer.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(3600),
            Some(serde_json::Value::String(s)) => s.parse().unwrap_or(3600),
            _ => 3600,
        };
        Ok((Secret(token), Duration::from_secs(secs)))
    }
}

/// A transport error's text without its URL (a URL could carry a query with a secret).
pub fn without_url(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the answer was cut short"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({detail})")
    }
}

/// application/x-www-form-urlencoded value encoding.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn client_credentials_default_to_the_tenant_endpoint_and_the_service_scope() {
        let spec = AuthSpec::ClientCredentials {
            tenant: Some("contoso.onmicrosoft.com".into()),
            token_url: None,
            client_id: Some("cid".into()),
            client_id_env: None,
            client_secret_env: "DV_SECRET".into(),
            scope: None,
        };
        let c =
            Credentials::resolve(&spec, "https://org.crm.dynamics.com/api/data/v9.2/", &env(&[("DV_SECRET", "s3")]))
                .unwrap();
        match &c {
            Credentials::ClientCredentials { token_url, scope, secret, .. } => {
                assert_eq!(token_url, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
                assert_eq!(scope, "https://org.crm.dynamics.com/.default");
                assert_eq!(secret.expose(), "s3");
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("s3"), "secrets never show in Debug");
        let missing = Credentials::resolve(&spec, "https://x/", &env(&[])).unwrap_err();
        assert_eq!(missing.to_string(), "environment variable DV_SECRET is not set (auth)");
    }

    #[test]
    fn basic_and_bearer() {
        let spec = AuthSpec::Basic { username: Some("u".into()), username_env: None, password_env: "P".into() };
        assert_eq!(
            Credentials::resolve(&spec, "https://x/", &env(&[("P", "pw")])).unwrap(),
            Credentials::Basic { username: "u".into(), password: Secret("pw".into()) }
        );
        let spec = AuthSpec::Bearer { token_env: "T".into() };
        assert!(Credentials::resolve(&spec, "https://x/", &env(&[("T", "")])).is_err());
    }

    #[test]
    fn encodings() {
        assert_eq!(base64(b"u:pw"), "dTpwdw==");
        assert_eq!(base64(b"abc"), "YWJj");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(form_encode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(origin("https://org.crm.dynamics.com/api/data/v9.2/"), "https://org.crm.dynamics.com");
        assert_eq!(origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
    }
}
