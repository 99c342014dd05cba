//! The AWS proxy of `dualsync dashboard --backend aws`: its calls arrive at a stand-in for the
//! admin function URL signed with SigV4 (the header's shape, the signed headers, and the
//! signature recomputed from what arrived, so nothing was changed after signing), and the
//! whole path works end to end: browser → local server (bearer token) → signed call → the real
//! admin API.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::Router;
use dualsync::domain::config::parse_job;
use dualsync::runtime::local::LocalRuntime;
use dualsync_dashboard::proxy::{self, Upstream};
use dualsync_dashboard::Signer;
use serde_json::{json, Value};

const REGION: &str = "eu-west-1";
const KEY_ID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const SESSION: &str = "session-token-example";
const TOKEN: &str = "a-dashboard-token-of-32-characters";

fn credentials() -> Credentials {
    Credentials::new(KEY_ID, SECRET, Some(SESSION.into()), None, "test")
}

fn signer() -> Signer {
    Signer::new(SharedCredentialsProvider::new(credentials()), REGION)
}

/// What the stand-in saw of each request: method, path and query, and the Authorization header.
type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// Checks one request the way the function URL's AWS_IAM auth would need it: the header's
/// shape, which headers are signed, and the signature itself, recomputed from the request as
/// it arrived. Answers 403 naming what is wrong.
async fn check_sigv4(req: Request) -> Result<Request, String> {
    let headers = req.headers().clone();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let auth = header("authorization").ok_or("no Authorization header")?;
    let rest = auth.strip_prefix("AWS4-HMAC-SHA256 ").ok_or(format!("not a SigV4 header: {auth}"))?;
    let parts: Vec<&str> = rest.split(", ").collect();
    let [credential, signed, signature] = parts[..] else { return Err(format!("three parts expected: {auth}")) };
    let date = header("x-amz-date").ok_or("no X-Amz-Date")?;
    let scope = format!("Credential={KEY_ID}/{}/{REGION}/lambda/aws4_request", &date[..8]);
    if credential != scope {
        return Err(format!("credential scope {credential}, expected {scope}"));
    }
    let signed: Vec<&str> = signed.strip_prefix("SignedHeaders=").ok_or("no SignedHeaders")?.split(';').collect();
    for needed in ["host", "x-amz-date", "x-amz-security-token"] {
        if !signed.contains(&needed) {
            return Err(format!("{needed} is not signed: {signed:?}"));
        }
    }
    let signature = signature.strip_prefix("Signature=").ok_or("no Signature")?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("the signature is not 64 hex digits: {signature}"));
    }
    if header("x-amz-security-token").as_deref() != Some(SESSION) {
        return Err("the session token is missing".into());
    }
    // Sign again what arrived (the signed headers only, at the request's own time): the same
    // signature unless the request changed after it was signed.
    let (parts, body) = req.into_parts();
    let body = to_bytes(body, 1 << 20).await.map_err(|e| e.to_string())?.to_vec();
    let host = parts.headers.get("host").and_then(|v| v.to_str().ok()).ok_or("no Host")?;
    let uri = format!("http://{host}{}", parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut again = axum::http::Request::builder().method(parts.method.clone()).uri(&uri);
    for name in signed.iter().filter(|n| !["authorization", "x-amz-date", "x-amz-security-token"].contains(n)) {
        again = again.header(*name, parts.headers.get(*name).ok_or(format!("signed header {name} is missing"))?);
    }
    let mut again = again.body(body.clone()).map_err(|e| e.to_string())?;
    resign_at(&mut again, &date)?;
    let expected = again.headers()["authorization"].to_str().unwrap().to_string();
    if !expected.ends_with(&format!("Signature={signature}")) {
        return Err(format!("signature mismatch: got {auth}, expected {expected}"));
    }
    Ok(Request::from_parts(parts, Body::from(body)))
}

/// Signs `req` with the test credentials at the time of `x_amz_date` (`yyyymmddThhmmssZ`).
fn resign_at(req: &mut axum::http::Request<Vec<u8>>, x_amz_date: &str) -> Result<(), String> {
    use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
    let n = |r: std::ops::Range<usize>| x_amz_date[r].parse::<i64>().map_err(|e| e.to_string());
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let secs = days_from_civil(y, m, d) * 86_400 + n(9..11)? * 3600 + n(11..13)? * 60 + n(13..15)?;
    let identity = credentials().into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(REGION)
        .name("lambda")
        .time(SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64))
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?
        .into();
    let uri = req.uri().to_string();
    let headers: Vec<(String, String)> =
        req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
    let signable = SignableRequest::new(
        req.method().as_str(),
        uri.as_str(),
        headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        SignableBody::Bytes(req.body()),
    )
    .map_err(|e| e.to_string())?;
    let (instructions, _) = sign(signable, &params).map_err(|e| e.to_string())?.into_parts();
    instructions.apply_to_request_http1x(req);
    Ok(())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `inner` behind the SigV4 check, recording what it saw.
fn stand_in(inner: Router, seen: Seen) -> Router {
    inner.layer(middleware::from_fn(move |req: Request, next: Next| {
        let seen = seen.clone();
        async move {
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
            let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            seen.lock().unwrap().push((req.method().to_string(), pq, auth));
            match check_sigv4(req).await {
                Ok(req) => next.run(req).await,
                Err(why) => (StatusCode::FORBIDDEN, axum::Json(json!({"Message": why}))).into_response(),
            }
        }
    }))
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

const JOB: &str = "job: sales
apps:
  - { name: fno, connector: sqlite, path: fno.db }
  - { name: dataverse, connector: sqlite, path: dataverse.db }
primary: fno
table_groups:
  - name: customers
    maps:
      - name: customers
        sequence: 1
        entities: { fno: CustCustomer, dataverse: account }
        keys: [{ fno: CustomerAccount, dataverse: accountnumber }]
        fields: [{ fno: Name, dataverse: name }]
";

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().unwrap(), format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header(header::CONTENT_TYPE, "application/json").body(b.to_string());
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}")))
}

#[tokio::test]
async fn the_proxy_signs_every_call_and_reaches_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let rt = LocalRuntime::open(dir.path()).unwrap();
    rt.state.apply_job(parse_job("job.yaml", JOB).unwrap()).await.unwrap();
    let seen: Seen = Arc::default();
    let function_url = serve(stand_in(dualsync_admin::router(Arc::new(rt.admin())), seen.clone())).await;
    let upstream = Upstream::new(&format!("http://{function_url}/"), signer()).unwrap();
    let local = serve(proxy::router(Arc::new(upstream), TOKEN.into())).await;

    // No token: refused here, nothing forwarded.
    let (status, answer) = call(local, "GET", "/jobs", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let (status, _) = call(local, "GET", "/jobs", Some("not-the-token"), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(seen.lock().unwrap().is_empty(), "a refused call was forwarded");

    let (status, jobs) = call(local, "GET", "/jobs", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{jobs}");
    assert_eq!(jobs[0]["job"], "sales", "{jobs}");
    // A query string (signed in canonical order), a path parameter, and the API's own answers
    // passed through: 200 with the page, 409 with the rule's words.
    let (status, page) = call(local, "GET", "/jobs/sales/errors?limit=5&category=application", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["items"], json!([]), "{page}");
    let (status, refused) = call(local, "POST", "/jobs/sales/pause", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("sales"), "{refused}");
    // A body is signed too.
    let body = json!({"action": "retry", "filter": {"category": "system"}});
    let (status, refused) = call(local, "POST", "/jobs/sales/requests", Some(TOKEN), Some(body)).await;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("only while it is active"), "{refused}");
    let (status, missing) = call(local, "GET", "/jobs/nope", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen[1].1, "/jobs/sales/errors?limit=5&category=application");
    for (method, path, auth) in &seen {
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{method} {path}: {auth}");
        assert!(!auth.contains(TOKEN), "the bearer token went upstream: {auth}");
    }

    // The dashboard itself is served here, not forwarded, and keeps to its origin.
    let res = reqwest::get(format!("http://{local}/dashboard/")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let csp = res.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_string();
    assert!(csp.contains("script-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(res.text().await.unwrap().contains("/dashboard/app.js"));
}

#[tokio::test]
async fn a_changed_request_fails_the_stand_ins_check() {
    // The check is real: a request altered after signing (another path) is refused.
    let mut req = axum::http::Request::builder().method("GET").uri("http://127.0.0.1:9/jobs").body(Vec::new()).unwrap();
    signer().sign(&mut req).await.unwrap();
    let mut forged = Request::builder().method("GET").uri("/jobs/sales");
    for (k, v) in req.headers() {
        forged = forged.header(k, v);
    }
    let forged = forged.header("host", "127.0.0.1:9").body(Body::empty()).unwrap();
    let why = check_sigv4(forged).await.unwrap_err();
    assert!(why.starts_with("signature mismatch"), "{why}");
}

#[tokio::test]
async fn the_function_url_is_found_through_lambdas_api() {
    let seen: Seen = Arc::default();
    let lambda = Router::new().route(
        "/2021-10-31/functions/{name}/url",
        axum::routing::get(|axum::extract::Path(name): axum::extract::Path<String>| async move {
            if name == "dualsync-dev-admin" {
                axum::Json(json!({"FunctionUrl": "https://abc.lambda-url.eu-west-1.on.aws/", "AuthType": "AWS_IAM"}))
                    .into_response()
            } else {
                let message = format!("Function not found: {name}");
                (StatusCode::NOT_FOUND, axum::Json(json!({"Message": message}))).into_response()
            }
        }),
    );
    let addr = serve(stand_in(lambda, seen.clone())).await;
    let endpoint = format!("http://{addr}");
    let url = proxy::function_url(&signer(), &endpoint, "dev").await.unwrap();
    assert_eq!(url, "https://abc.lambda-url.eu-west-1.on.aws/");
    let why = proxy::function_url(&signer(), &endpoint, "prod").await.unwrap_err();
    assert!(why.contains("404") && why.contains("dualsync-prod-admin") && why.contains("--admin-url"), "{why}");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_function_url_is_a_502_naming_it() {
    // A port nothing listens on (bound, then released).
    let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let upstream = Upstream::new(&format!("http://{gone}"), signer()).unwrap();
    let local = serve(proxy::router(Arc::new(upstream), TOKEN.into())).await;
    let (status, answer) = call(local, "GET", "/jobs", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains(&gone.to_string()), "{answer}");
    assert!(Upstream::new("not a url", signer()).is_err());
}
