//! Where the secrets of app connectors come from when the job file names a store (Secrets
//! Manager or SSM Parameter Store), and the one type that holds a secret value.
use async_trait::async_trait;

use crate::domain::job::StoredSecret;

/// A secret value: `Debug` shows `<secret>`, and there is no `Display`, so a value never reaches
/// a log, an error message, an error row or the state table by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

/// Why a secret could not be read. Messages name the secret and the store's error code, never
/// a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// Worth trying again (throttled, the store unreachable).
    #[error("cannot read {what} now: {reason}")]
    Transient { what: String, reason: String },
    /// Not there, not allowed, or not text: an operator has to act.
    #[error("cannot read {what}: {reason}")]
    Refused { what: String, reason: String },
}

/// Reads secrets from a store; implementations cache each value after the first read, so a
/// request never waits for the store.
#[async_trait]
pub trait SecretStore: Send + Sync {
    async fn fetch(&self, secret: &StoredSecret) -> Result<Secret, SecretError>;
    /// Drops the cached value (the app refused it: the secret may have been rotated).
    fn forget(&self, secret: &StoredSecret);
}
