//! SigV4 signing of the calls the local dashboard forwards to the stack (the admin function URL,
//! and Lambda's API to find it), with the user's own AWS credentials: IAM stays the only door.
use std::time::SystemTime;

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use axum::http::Request;

/// Why a call could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no AWS credentials to sign with: {0} (set a profile, AWS_PROFILE or AWS_ACCESS_KEY_ID)")]
    Credentials(String),
    #[error("could not sign {uri}: {reason}")]
    Sign { uri: String, reason: String },
}

/// Signs requests for one service in one region (function URLs: service `lambda`).
#[derive(Clone, Debug)]
pub struct Signer {
    credentials: SharedCredentialsProvider,
    region: String,
    service: &'static str,
}

impl Signer {
    pub fn new(credentials: SharedCredentialsProvider, region: impl Into<String>) -> Self {
        Signer { credentials, region: region.into(), service: "lambda" }
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// Adds `Authorization`, `X-Amz-Date` (and `X-Amz-Security-Token` for temporary
    /// credentials) to `req`, signing its method, URI (which must be absolute), headers and body.
    /// Credentials are asked of the provider each time: it caches and refreshes them.
    pub async fn sign(&self, req: &mut Request<Vec<u8>>) -> Result<(), SignError> {
        let uri = req.uri().to_string();
        let failed = |reason: String| SignError::Sign { uri: uri.clone(), reason };
        if req.uri().authority().is_none() {
            return Err(failed("the URI has no host".into()));
        }
        let credentials =
            self.credentials.provide_credentials().await.map_err(|e| SignError::Credentials(e.to_string()))?;
        let identity = credentials.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name(self.service)
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| failed(e.to_string()))?
            .into();
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.as_str().to_string(),
                    v.to_str().map_err(|_| failed(format!("header {k} is not text")))?.to_string(),
                ))
            })
            .collect::<Result<_, SignError>>()?;
        let signable = SignableRequest::new(
            req.method().as_str(),
            uri.as_str(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            SignableBody::Bytes(req.body()),
        )
        .map_err(|e| failed(e.to_string()))?;
        let (instructions, _) = sign(signable, &params).map_err(|e| failed(e.to_string()))?.into_parts();
        instructions.apply_to_request_http1x(req);
        Ok(())
    }
}
