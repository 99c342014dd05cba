//! Sending one HTTP request to the service: through the app's limiter, with credentials and the
//! OData headers, riding out service protection (a 429's Retry-After, a few times) and renewing
//! a refused OAuth token once. Everything else is the caller's to classify.
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Client, Method, Url};

use super::auth::{without_url, AuthError, Authenticator};
use super::errors::retry_after;
use super::limiter::{Limiter, Outcome};
use crate::ports::ConnectorError;

/// An answer: status, headers (names lowercased), body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::batch::header(&self.headers, name)
    }
    pub fn retry_after(&self) -> Option<Duration> {
        retry_after(self.header("retry-after"))
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A throttled request is tried again (after its Retry-After, at the limiter's gate) this many
/// times before the throttling is the caller's failure.
const THROTTLE_TRIES: usize = 3;
/// A Retry-After longer than this is not waited out in the request: the step's own backoff
/// (the message goes back to its queue) takes over, and the gate stays closed meanwhile.
const LONGEST_WAIT_IN_REQUEST: Duration = Duration::from_secs(10);

pub struct Transport {
    pub app: String,
    pub root: Url,
    pub client: Client,
    pub auth: Authenticator,
    pub auth_hint: String,
    pub limiter: Arc<Limiter>,
}

impl Transport {
    pub fn transient(&self, message: String, retry_after: Option<Duration>) -> ConnectorError {
        ConnectorError::Transient { app: self.app.clone(), message, retry_after }
    }

    pub fn rejected(&self, message: String) -> ConnectorError {
        ConnectorError::Rejected { app: self.app.clone(), message }
    }

    fn auth_error(&self, e: AuthError) -> ConnectorError {
        if e.is_transient() {
            self.transient(e.to_string(), None)
        } else {
            self.rejected(e.to_string())
        }
    }

    /// Sends a request; `headers` come on top of the OData ones.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, String)],
        body: Option<Vec<u8>>,
    ) -> Result<Answer, ConnectorError> {
        let mut renewed = false;
        let mut throttled = 0;
        loop {
            let permit = self.limiter.acquire().await;
            let auth = self.auth.header(&self.client).await.map_err(|e| self.auth_error(e))?;
            let mut req = self
                .client
                .request(method.clone(), url)
                .header("OData-Version", "4.0")
                .header("OData-MaxVersion", "4.0");
            if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("accept")) {
                req = req.header("Accept", "application/json");
            }
            if let Some(a) = &auth {
                req = req.header("Authorization", a.expose());
            }
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            if let Some(b) = &body {
                if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
                    req = req.header("Content-Type", "application/json");
                }
                req = req.body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    permit.finish(Outcome::Neutral);
                    return Err(self.transient(without_url(&e), None));
                }
            };
            let status = resp.status().as_u16();
            let headers: Vec<(String, String)> = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            let body_bytes = match resp.bytes().await {
                Ok(b) => b.to_vec(),
                Err(e) => {
                    permit.finish(Outcome::Neutral);
                    return Err(self.transient(without_url(&e), None));
                }
            };
            let answer = Answer { status, headers, body: body_bytes };
            let ra = answer.retry_after();
            if status == 429 || (status == 503 && ra.is_some()) {
                permit.finish(Outcome::Throttled(ra));
                throttled += 1;
                if throttled < THROTTLE_TRIES && ra.unwrap_or_default() <= LONGEST_WAIT_IN_REQUEST {
                    continue; // the limiter's gate holds this until Retry-After passes
                }
                return Ok(answer);
            }
            permit.finish(Outcome::Ok);
            if status == 401 && self.auth.renews() && !renewed {
                renewed = true;
                self.auth.invalidate().await;
                continue;
            }
            return Ok(answer);
        }
    }
}
