//! Credentials for an OData service: OAuth2 client credentials (Microsoft Entra ID) with the
//! token cached until shortly before it expires, HTTP basic, a bearer token, or none.
//!
//! A secret is read from the environment variable the job file names when the connector is
//! built, or, where that variable is not set and the job file names a store behind it (Secrets
//! Manager, SSM), from the store at the first request that needs it; the store caches it for
//! the process. It lives only in [`Secret`], whose `Debug` shows nothing: it never reaches a
//! log, an error message or the state table. An error names where the secret is, never its value.
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::domain::job::{AuthSpec, SecretRef, StoredSecret};
pub use crate::ports::Secret;
use crate::ports::{SecretError, SecretStore};

/// A secret as the connector holds it: the value an environment variable gave, or where it
/// waits in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Value(Secret),
    Stored(StoredSecret),
}

/// Credentials resolved from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    ClientCredentials { token_url: String, client_id: String, secret: SecretSource, scope: String },
    Basic { username: String, password: SecretSource },
    Bearer(SecretSource),
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("environment variable {0} is not set (auth)")]
    Missing(String),
    #[error("token endpoint refused the client credentials (HTTP {status}{code}): check the client id and {secret}")]
    Refused { status: u16, code: String, secret: String },
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    #[error("token endpoint answered without a token")]
    NoToken,
    #[error("auth: {0}")]
    Store(SecretError),
}

impl AuthError {
    /// Whether trying again later may work (the token endpoint or the secret store unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, AuthError::Unreachable(_) | AuthError::Store(SecretError::Transient { .. }))
    }
}

/// The value where an environment variable holds it, else the store the reference names.
fn source(r: &SecretRef, env: &dyn Fn(&str) -> Option<String>) -> Result<SecretSource, AuthError> {
    if let Some(v) = r.env.as_deref().and_then(env).filter(|v| !v.is_empty()) {
        return Ok(SecretSource::Value(Secret::new(v)));
    }
    match (r.store(), &r.env) {
        (Some(stored), _) => Ok(SecretSource::Stored(stored)),
        (None, Some(var)) => Err(AuthError::Missing(var.clone())),
        (None, None) => Err(AuthError::Missing("auth secret".into())),
    }
}

impl Credentials {
    /// Resolves `spec` with `env` (the process environment in production).
    pub fn resolve(
        spec: &AuthSpec,
        service_url: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, AuthError> {
        let var = |name: &str| env(name).filter(|v| !v.is_empty()).ok_or_else(|| AuthError::Missing(name.to_string()));
        let secret = || match spec.secret() {
            Some((_, r)) => source(&r, env),
            None => Err(AuthError::Missing("auth secret".into())),
        };
        Ok(match spec {
            AuthSpec::ClientCredentials { tenant, token_url, client_id, client_id_env, scope, .. } => {
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
                    secret: secret()?,
                    scope: scope.clone().unwrap_or_else(|| format!("{}/.default", origin(service_url))),
                }
            }
            AuthSpec::Basic { username, username_env, .. } => Credentials::Basic {
                username: match (username, username_env) {
                    (Some(u), _) => u.clone(),
                    (None, Some(e)) => var(e)?,
                    (None, None) => return Err(AuthError::Missing("auth.username".into())),
                },
                password: secret()?,
            },
            AuthSpec::Bearer { .. } => Credentials::Bearer(secret()?),
            AuthSpec::None => Credentials::None,
        })
    }
}

/// For connectors built without a store: a secret the job file keeps in one cannot be read.
pub struct NoSecretStore;

#[async_trait]
impl SecretStore for NoSecretStore {
    async fn fetch(&self, secret: &StoredSecret) -> Result<Secret, SecretError> {
        Err(SecretError::Refused { what: secret.to_string(), reason: "this connector has no secret store".into() })
    }
    fn forget(&self, _: &StoredSecret) {}
}

/// `scheme://host[:port]` of a URL.
pub fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// What to tell an operator to check when the service answers 401.
pub fn hint(spec: &AuthSpec) -> String {
    let at = spec.secret().map(|(_, r)| r.to_string()).unwrap_or_default();
    match spec {
        AuthSpec::ClientCredentials { .. } => format!("the app registration, its application user and {at}"),
        AuthSpec::Basic { .. } => format!("the user name and {at}"),
        AuthSpec::Bearer { .. } => format!("the token in {at}"),
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
pub struct Authenticator {
    creds: Credentials,
    /// Where the secret is, for messages.
    secret_at: String,
    secrets: Arc<dyn SecretStore>,
    cached: Mutex<Option<(Secret, Instant)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("creds", &self.creds).field("secret_at", &self.secret_at).finish()
    }
}

impl Authenticator {
    /// Stored secrets are read through `secrets` when first needed.
    pub fn new(creds: Credentials, spec: &AuthSpec, secrets: Arc<dyn SecretStore>) -> Self {
        let secret_at = spec.secret().map(|(_, r)| r.to_string()).unwrap_or_default();
        Authenticator { creds, secret_at, secrets, cached: Mutex::new(None) }
    }

    async fn secret(&self, s: &SecretSource) -> Result<Secret, AuthError> {
        match s {
            SecretSource::Value(v) => Ok(v.clone()),
            SecretSource::Stored(at) => self.secrets.fetch(at).await.map_err(AuthError::Store),
        }
    }

    /// The header value, or `None` without auth.
    pub async fn header(&self, http: &reqwest::Client) -> Result<Option<Secret>, AuthError> {
        match &self.creds {
            Credentials::None => Ok(None),
            Credentials::Bearer(t) => Ok(Some(Secret::new(format!("Bearer {}", self.secret(t).await?.expose())))),
            Credentials::Basic { username, password } => {
                let raw = format!("{username}:{}", self.secret(password).await?.expose());
                Ok(Some(Secret::new(format!("Basic {}", base64(raw.as_bytes())))))
            }
            Credentials::ClientCredentials { .. } => {
                // One fetch at a time: concurrent requests wait for the same token.
                let mut cached = self.cached.lock().await;
                if let Some((token, until)) = cached.as_ref() {
                    if Instant::now() < *until {
                        return Ok(Some(Secret::new(format!("Bearer {}", token.expose()))));
                    }
                }
                let (token, lifetime) = self.fetch(http).await?;
                let header = Secret::new(format!("Bearer {}", token.expose()));
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
        let Credentials::ClientCredentials { token_url, client_id, secret: source, scope } = &self.creds else {
            return Err(AuthError::NoToken);
        };
        let secret = self.secret(source).await?;
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
            if let SecretSource::Stored(at) = source {
                // Read the store again next time: the secret may have been rotated since.
                self.secrets.forget(at);
            }
            return Err(AuthError::Refused { status, code, secret: self.secret_at.clone() });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| AuthError::NoToken)?;
        let token = answer.access_token.filter(|t| !t.is_empty()).ok_or(AuthError::NoToken)?;
        let secs = match answer.expires_in {
            Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(3600),
            Some(serde_json::Value::String(s)) => s.parse().unwrap_or(3600),
            _ => 3600,
        };
        Ok((Secret::new(token), Duration::from_secs(secs)))
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
            client_secret: None,
            client_secret_env: Some("DV_SECRET".into()),
            scope: None,
        };
        let c =
            Credentials::resolve(&spec, "https://org.crm.dynamics.com/api/data/v9.2/", &env(&[("DV_SECRET", "s3")]))
                .unwrap();
        match &c {
            Credentials::ClientCredentials { token_url, scope, secret, .. } => {
                assert_eq!(token_url, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
                assert_eq!(scope, "https://org.crm.dynamics.com/.default");
                assert_eq!(secret, &SecretSource::Value(Secret::new("s3".into())));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{c:?}").contains("s3"), "secrets never show in Debug");
        let missing = Credentials::resolve(&spec, "https://x/", &env(&[])).unwrap_err();
        assert_eq!(missing.to_string(), "environment variable DV_SECRET is not set (auth)");
    }

    #[test]
    fn basic_and_bearer() {
        let spec = AuthSpec::Basic {
            username: Some("u".into()),
            username_env: None,
            password: None,
            password_env: Some("P".into()),
        };
        assert_eq!(
            Credentials::resolve(&spec, "https://x/", &env(&[("P", "pw")])).unwrap(),
            Credentials::Basic { username: "u".into(), password: SecretSource::Value(Secret::new("pw".into())) }
        );
        let spec = AuthSpec::Bearer { token: None, token_env: Some("T".into()) };
        assert!(Credentials::resolve(&spec, "https://x/", &env(&[("T", "")])).is_err());
    }

    /// A store that answers `value` for one secret id and refuses every other, counting reads.
    struct Store {
        value: &'static str,
        reads: std::sync::atomic::AtomicUsize,
    }

    #[async_trait]
    impl SecretStore for Store {
        async fn fetch(&self, secret: &StoredSecret) -> Result<Secret, SecretError> {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            match secret {
                StoredSecret::SecretsManager(id) if id == "dv" => Ok(Secret::new(self.value.into())),
                _ => Err(SecretError::Refused {
                    what: secret.to_string(),
                    reason: "GetParameter: ParameterNotFound".into(),
                }),
            }
        }
        fn forget(&self, _: &StoredSecret) {}
    }

    fn bearer(r: SecretRef) -> AuthSpec {
        AuthSpec::Bearer { token: Some(r), token_env: None }
    }

    #[tokio::test]
    async fn a_variable_wins_where_it_is_set_and_the_store_is_read_at_first_use_where_not() {
        let both = SecretRef { env: Some("T".into()), secrets_manager: Some("dv".into()), ssm: None };
        let spec = bearer(both.clone());
        let local = Credentials::resolve(&spec, "https://x/", &env(&[("T", "from-env")])).unwrap();
        assert_eq!(local, Credentials::Bearer(SecretSource::Value(Secret::new("from-env".into()))));
        let on_aws = Credentials::resolve(&spec, "https://x/", &env(&[])).unwrap();
        assert_eq!(on_aws, Credentials::Bearer(SecretSource::Stored(StoredSecret::SecretsManager("dv".into()))));

        let store = Arc::new(Store { value: "from-store", reads: Default::default() });
        let auth = Authenticator::new(on_aws, &spec, store.clone());
        assert_eq!(store.reads.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing is read before a request");
        let header = auth.header(&reqwest::Client::new()).await.unwrap().unwrap();
        assert_eq!(header.expose(), "Bearer from-store");

        // A parameter that is not there: the error names it and where, and is not transient.
        let spec = bearer(SecretRef { ssm: Some("/dualsync/missing".into()), ..Default::default() });
        let creds = Credentials::resolve(&spec, "https://x/", &env(&[])).unwrap();
        let err = Authenticator::new(creds, &spec, store).header(&reqwest::Client::new()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "auth: cannot read SSM parameter '/dualsync/missing': GetParameter: ParameterNotFound"
        );
        assert!(!err.is_transient());
        // Without a variable or a store there is nothing to read.
        let spec = bearer(SecretRef::env("T"));
        let err = Credentials::resolve(&spec, "https://x/", &env(&[])).unwrap_err();
        assert_eq!(err.to_string(), "environment variable T is not set (auth)");
    }

    #[tokio::test]
    async fn secret_values_never_show_in_debug_or_errors() {
        const VALUE: &str = "hunter2-very-secret";
        let r = SecretRef { env: Some("DV_SECRET".into()), secrets_manager: Some("dv".into()), ssm: None };
        let spec = AuthSpec::ClientCredentials {
            tenant: None,
            // Nothing listens there: the token request fails after the secret was read.
            token_url: Some("http://127.0.0.1:9/token".into()),
            client_id: Some("cid".into()),
            client_id_env: None,
            client_secret: Some(r.clone()),
            client_secret_env: None,
            scope: None,
        };
        for env_value in [Some(VALUE), None] {
            let vars: Vec<(&str, &str)> = env_value.map(|v| ("DV_SECRET", v)).into_iter().collect();
            let creds = Credentials::resolve(&spec, "https://x/", &env(&vars)).unwrap();
            let store = Arc::new(Store { value: VALUE, reads: Default::default() });
            let auth = Authenticator::new(creds.clone(), &spec, store.clone());
            let err = auth.header(&reqwest::Client::new()).await.unwrap_err();
            assert_eq!(store.reads.load(std::sync::atomic::Ordering::SeqCst), usize::from(env_value.is_none()));
            let refused = AuthError::Refused { status: 401, code: " invalid_client".into(), secret: r.to_string() };
            let shown = [
                format!("{spec:?}"),
                format!("{r:?} {r}"),
                format!("{creds:?}"),
                format!("{auth:?}"),
                format!("{err:?} {err}"),
                format!("{refused:?} {refused}"),
                hint(&spec),
            ];
            for s in &shown {
                assert!(!s.contains(VALUE), "a secret value shows in: {s}");
            }
            assert!(refused.to_string().ends_with("environment variable DV_SECRET or Secrets Manager secret 'dv'"));
        }
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
