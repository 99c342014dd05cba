//! `dualsync dashboard --backend aws`: the dashboard served on this machine, every API call
//! forwarded to the stack's admin function URL (AWS_IAM auth) signed with the user's AWS
//! credentials. The local server holds those credentials' power, so it is guarded like the
//! runner's API: loopback only (the CLI's check) and a bearer token.
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use dualsync_admin::ApiError;

use crate::sigv4::Signer;

/// Where the calls go and how they are signed.
pub struct Upstream {
    /// The function URL, with a trailing `/`.
    base: String,
    signer: Signer,
    client: reqwest::Client,
}

/// The largest request body forwarded (the API's bodies are small filters).
const MAX_BODY: usize = 1 << 20;

impl Upstream {
    /// `url`: the admin function URL (the stack's `AdminApiUrl` output).
    pub fn new(url: &str, signer: Signer) -> Result<Self, String> {
        let base = if url.ends_with('/') { url.to_string() } else { format!("{url}/") };
        let parsed: Uri = base.parse().map_err(|e| format!("admin API URL '{url}': {e}"))?;
        if parsed.scheme().is_none() || parsed.authority().is_none() || parsed.query().is_some() {
            return Err(format!("admin API URL '{url}': expected https://<id>.lambda-url.<region>.on.aws/"));
        }
        Ok(Upstream { base, signer, client: client() })
    }

    /// Sends one signed request and answers with the function's status, content type and body.
    async fn forward(&self, method: Method, path_and_query: &str, content_type: Option<&str>, body: Bytes) -> Response {
        let url = format!("{}{}", self.base, path_and_query.trim_start_matches('/'));
        let mut req = Request::builder().method(method.clone()).uri(&url);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        let mut req = match req.body(body.to_vec()) {
            Ok(r) => r,
            Err(e) => {
                return ApiError::new(StatusCode::BAD_REQUEST, format!("{method} {path_and_query}: {e}"))
                    .into_response()
            }
        };
        if let Err(e) = self.signer.sign(&mut req).await {
            return ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()).into_response();
        }
        match send(&self.client, req).await {
            Ok((status, content_type, body)) => {
                let mut res = (status, body).into_response();
                if let Some(ct) = content_type {
                    res.headers_mut().insert(header::CONTENT_TYPE, ct);
                }
                res
            }
            Err(e) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the admin function URL {} did not answer {method} {path_and_query}: {e}", self.base),
            )
            .into_response(),
        }
    }
}

fn client() -> reqwest::Client {
    // The admin function times out after 30 s; a little more here tells the two apart.
    reqwest::Client::builder().timeout(std::time::Duration::from_secs(35)).build().unwrap_or_default()
}

/// Sends a signed request as it is: the signature covers its host, path, query, headers and body.
async fn send(
    client: &reqwest::Client,
    req: Request<Vec<u8>>,
) -> Result<(StatusCode, Option<header::HeaderValue>, Bytes), reqwest::Error> {
    let req = reqwest::Request::try_from(req)?;
    let res = client.execute(req).await?;
    let status = res.status();
    let content_type = res.headers().get(header::CONTENT_TYPE).cloned();
    Ok((status, content_type, res.bytes().await?))
}

/// The dashboard's pages, and every other path forwarded to `upstream`, signed, behind `token`.
pub fn router(upstream: Arc<Upstream>, token: String) -> Router {
    let api = Router::new().fallback(forward).with_state(upstream);
    crate::router().merge(dualsync_admin::with_token(api, token))
}

async fn forward(
    State(up): State<Arc<Upstream>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if body.len() > MAX_BODY {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("a request body takes at most {MAX_BODY} bytes"))
            .into_response();
    }
    let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    up.forward(method, path_and_query, content_type, body).await
}

/// Finds the admin function URL of stage `stage` through Lambda's API (GetFunctionUrlConfig of
/// `dualsync-<stage>-admin`), signed like the calls themselves. `endpoint`: Lambda's endpoint
/// (`https://lambda.<region>.amazonaws.com`, or an emulator's).
pub async fn function_url(signer: &Signer, endpoint: &str, stage: &str) -> Result<String, String> {
    let function = format!("dualsync-{stage}-admin");
    let url = format!("{}/2021-10-31/functions/{function}/url", endpoint.trim_end_matches('/'));
    let mut req =
        Request::builder().method(Method::GET).uri(&url).body(Vec::new()).map_err(|e| format!("{url}: {e}"))?;
    signer.sign(&mut req).await.map_err(|e| e.to_string())?;
    let (status, _, body) =
        send(&client(), req).await.map_err(|e| format!("asking Lambda ({endpoint}) for {function}'s URL: {e}"))?;
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let why = answer.get("Message").or_else(|| answer.get("message")).and_then(|m| m.as_str()).unwrap_or("");
        return Err(format!(
            "Lambda answered {status} for {function}'s URL: {why} (is stage '{stage}' deployed in {}? \
             pass the stack's AdminApiUrl output with --admin-url otherwise)",
            signer.region()
        ));
    }
    answer
        .get("FunctionUrl")
        .and_then(|u| u.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("Lambda's answer for {function}'s URL has no FunctionUrl"))
}
