//! A Lambda function URL request (payload format 2.0) as an ingress [`Request`], and the
//! answer as its response.
use aws_lambda_events::event::lambda_function_urls::{LambdaFunctionUrlRequest, LambdaFunctionUrlResponse};
use aws_lambda_events::http::{HeaderMap, HeaderValue};
use base64::Engine;
use dualsync::steps::ingress::{Ingress, Request, Response};

/// The largest body taken: a function URL's own limit (6 MB) for a request.
pub const MAX_BODY_BYTES: usize = 6 * 1024 * 1024;

/// Handles one function URL request.
pub async fn function_url(ingress: &Ingress, event: LambdaFunctionUrlRequest) -> LambdaFunctionUrlResponse {
    let answer = match request_of(event) {
        Ok(req) => ingress.handle(&req).await,
        Err(answer) => answer,
    };
    response(answer)
}

/// The request, or the answer to a request that is not one for ingress (its method, its path,
/// a body that is not base64 where it says it is).
pub fn request_of(event: LambdaFunctionUrlRequest) -> Result<Request, Response> {
    let method = event.request_context.http.method.clone().unwrap_or_default();
    let path = event.raw_path.clone().or(event.request_context.http.path.clone()).unwrap_or_default();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let [prefix, job, app, source] = segments[..] else {
        return Err(Response::error(
            404,
            format!("no route {path}: ingress paths are /ingress/{{job}}/{{app}}/{{source}}"),
        ));
    };
    if format!("/{prefix}") != crate::PREFIX {
        return Err(Response::error(
            404,
            format!("no route {path}: ingress paths are /ingress/{{job}}/{{app}}/{{source}}"),
        ));
    }
    if !method.eq_ignore_ascii_case("POST") {
        return Err(Response::error(405, format!("{path} takes POST, not {method}")));
    }
    let body = match (event.body, event.is_base64_encoded) {
        (None, _) => Vec::new(),
        (Some(b), false) => b.into_bytes(),
        (Some(b), true) => base64::engine::general_purpose::STANDARD
            .decode(b.as_bytes())
            .map_err(|e| Response::error(400, format!("the body is marked base64 but is not: {e}")))?,
    };
    if body.len() > MAX_BODY_BYTES {
        return Err(Response::error(413, format!("the body takes {} bytes, more than {MAX_BODY_BYTES}", body.len())));
    }
    let headers = event
        .headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string())))
        .collect();
    let mut query: Vec<(String, String)> = event.query_string_parameters.into_iter().collect();
    query.sort();
    Ok(Request { job: job.to_string(), app: app.to_string(), source: source.to_string(), headers, query, body })
}

fn response(answer: Response) -> LambdaFunctionUrlResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    let mut r = LambdaFunctionUrlResponse::default();
    r.status_code = i64::from(answer.status);
    r.headers = headers;
    r.body = Some(answer.body.to_string());
    r.is_base64_encoded = false;
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(method: &str, path: &str, body: Option<&str>, base64: bool) -> LambdaFunctionUrlRequest {
        serde_json::from_value(json!({
            "version": "2.0",
            "rawPath": path,
            "rawQueryString": "code=k%2B1",
            "headers": {"content-type": "application/json", "x-ms-dynamics-msg-size-exceeded": "true"},
            "queryStringParameters": {"code": "k+1"},
            "requestContext": {"accountId": "anonymous", "requestId": "r", "timeEpoch": 1,
                "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "t"}},
            "body": body,
            "isBase64Encoded": base64
        }))
        .unwrap()
    }

    #[test]
    fn a_post_to_an_ingress_path_is_a_request_with_its_body_decoded() {
        let r = request_of(event("POST", "/ingress/sales/dv/dataverse", Some("eyJhIjoxfQ=="), true)).unwrap();
        assert_eq!((r.job.as_str(), r.app.as_str(), r.source.as_str()), ("sales", "dv", "dataverse"));
        assert_eq!(r.body, br#"{"a":1}"#);
        assert_eq!(r.query("code"), Some("k+1"));
        assert_eq!(r.header("X-MS-Dynamics-Msg-Size-Exceeded"), Some("true"));
        let r = request_of(event("POST", "/ingress/sales/dv/fno/", Some("{}"), false)).unwrap();
        assert_eq!((r.source.as_str(), r.body.as_slice()), ("fno", b"{}".as_slice()));
    }

    #[test]
    fn other_paths_methods_and_bad_base64_are_answered_at_once() {
        let status = |e| request_of(e).map(|_| 0).unwrap_or_else(|r| r.status);
        assert_eq!(status(event("POST", "/jobs/sales", None, false)), 404);
        assert_eq!(status(event("POST", "/ingress/sales/dv", None, false)), 404);
        assert_eq!(status(event("POST", "/other/sales/dv/fno", None, false)), 404);
        assert_eq!(status(event("GET", "/ingress/sales/dv/fno", None, false)), 405);
        let bad = request_of(event("POST", "/ingress/sales/dv/fno", Some("not base64!"), true)).unwrap_err();
        assert_eq!(bad.status, 400);
        assert!(bad.body["error"].as_str().unwrap().contains("base64"), "{}", bad.body);
    }

    #[test]
    fn the_response_is_json_with_the_status() {
        let r = response(Response::error(401, "unauthorized"));
        assert_eq!(r.status_code, 401);
        assert_eq!(r.body.as_deref(), Some(r#"{"error":"unauthorized"}"#));
        assert_eq!(r.headers["content-type"], "application/json");
    }
}
