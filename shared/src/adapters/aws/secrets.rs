//! [`AwsSecrets`]: the secrets that job files keep in Secrets Manager or SSM Parameter Store,
//! read at first use and cached for the life of the process (a Lambda execution environment),
//! so a request never waits for the store and a cold start reads each secret once.
//!
//! Values live only in [`Secret`]; errors carry the secret's id and the store's error code and
//! message, which never hold a value.
use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_config::SdkConfig;
use aws_sdk_secretsmanager::error::{ProvideErrorMetadata, SdkError};
use tokio::sync::OnceCell;

use crate::domain::job::StoredSecret;
use crate::ports::{Secret, SecretError, SecretStore};

/// The store's clients, built when first needed: a local run whose secrets all come from
/// environment variables never loads AWS settings.
struct Clients {
    secrets_manager: aws_sdk_secretsmanager::Client,
    ssm: aws_sdk_ssm::Client,
}

pub struct AwsSecrets {
    sdk: OnceCell<SdkConfig>,
    clients: OnceCell<Clients>,
    cache: Mutex<HashMap<StoredSecret, Secret>>,
}

impl AwsSecrets {
    /// Over given AWS settings (a Lambda function's, or an emulator's in tests).
    pub fn new(sdk: &SdkConfig) -> AwsSecrets {
        AwsSecrets { sdk: OnceCell::new_with(Some(sdk.clone())), clients: OnceCell::new(), cache: Mutex::default() }
    }

    /// Loading the default AWS settings (environment, profile, instance role) at the first
    /// read from a store: what the local runner uses.
    pub fn from_default_settings() -> AwsSecrets {
        AwsSecrets { sdk: OnceCell::new(), clients: OnceCell::new(), cache: Mutex::default() }
    }

    async fn clients(&self) -> &Clients {
        self.clients
            .get_or_init(|| async {
                let sdk = self.sdk.get_or_init(|| super::sdk_config(None)).await;
                Clients {
                    secrets_manager: aws_sdk_secretsmanager::Client::new(sdk),
                    ssm: aws_sdk_ssm::Client::new(sdk),
                }
            })
            .await
    }

    async fn read(&self, secret: &StoredSecret) -> Result<Secret, SecretError> {
        let what = secret.to_string();
        let clients = self.clients().await;
        let value = match secret {
            StoredSecret::SecretsManager(id) => {
                let out = clients
                    .secrets_manager
                    .get_secret_value()
                    .secret_id(id)
                    .send()
                    .await
                    .map_err(|e| classify(&what, "GetSecretValue", e))?;
                if out.secret_binary().is_some() && out.secret_string().is_none() {
                    return Err(SecretError::Refused {
                        what,
                        reason: "it holds binary data; dualsync reads a secret string".into(),
                    });
                }
                out.secret_string().map(str::to_string)
            }
            StoredSecret::Ssm(name) => {
                let out = clients
                    .ssm
                    .get_parameter()
                    .name(name)
                    .with_decryption(true)
                    .send()
                    .await
                    .map_err(|e| classify(&what, "GetParameter", e))?;
                out.parameter().and_then(|p| p.value()).map(str::to_string)
            }
        };
        match value.filter(|v| !v.is_empty()) {
            Some(v) => Ok(Secret::new(v)),
            None => Err(SecretError::Refused { what, reason: "it is empty".into() }),
        }
    }
}

#[async_trait]
impl SecretStore for AwsSecrets {
    async fn fetch(&self, secret: &StoredSecret) -> Result<Secret, SecretError> {
        if let Some(v) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(secret) {
            return Ok(v.clone());
        }
        let value = self.read(secret).await?;
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(secret.clone(), value.clone());
        Ok(value)
    }

    fn forget(&self, secret: &StoredSecret) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).remove(secret);
    }
}

/// A store's failure: throttling, a server error or no answer is worth retrying (the change's
/// backoff); anything else (no such secret, access denied, a KMS key it may not use) needs an
/// operator, and says the store's error code.
fn classify<E, R>(what: &str, op: &str, e: SdkError<E, R>) -> SecretError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let what = what.to_string();
    match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            let code = err.code().unwrap_or("an unnamed error");
            let reason = match err.message() {
                Some(m) => format!("{op}: {code}: {m}"),
                None => format!("{op}: {code}"),
            };
            let transient =
                code.contains("Throttl") || code.starts_with("InternalServ") || code == "ServiceUnavailable";
            if transient {
                SecretError::Transient { what, reason }
            } else {
                SecretError::Refused { what, reason }
            }
        }
        SdkError::TimeoutError(_) => SecretError::Transient { what, reason: format!("{op}: timed out") },
        SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            SecretError::Transient { what, reason: format!("{op}: {}", super::brief(&e)) }
        }
        _ => SecretError::Refused { what, reason: format!("{op}: {}", super::brief(&e)) },
    }
}
