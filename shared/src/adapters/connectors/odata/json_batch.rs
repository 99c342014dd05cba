//! The JSON `$batch` format of OData v4.01 (JSON Format §19): the same requests as the
//! multipart format ([`super::batch`]), as one JSON document `{"requests": [...]}`, answered by
//! `{"responses": [...]}`. A service may answer in any order: responses are matched to their
//! requests by `id`, and given back in request order. Change sets become atomicity groups.
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::batch::{BatchError, Item, Request, Response};

#[derive(Serialize)]
struct Envelope<'a> {
    requests: Vec<JsonRequest<'a>>,
}

#[derive(Serialize)]
struct JsonRequest<'a> {
    id: String,
    #[serde(rename = "atomicityGroup", skip_serializing_if = "Option::is_none")]
    atomicity_group: Option<String>,
    method: &'a str,
    url: &'a str,
    #[serde(skip_serializing_if = "Map::is_empty")]
    headers: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<&'a RawValue>,
}

/// The body of a JSON batch request; requests are numbered 1, 2, … as in the multipart
/// format, so that an answer names its request the same way. A request body must be JSON.
pub fn encode(items: &[Item]) -> Result<Vec<u8>, BatchError> {
    let mut bodies: Vec<Option<Box<RawValue>>> = Vec::new();
    let mut flat: Vec<(&Request, Option<String>)> = Vec::new();
    for (n, item) in items.iter().enumerate() {
        match item {
            Item::Single(r) => flat.push((r, None)),
            Item::ChangeSet(rs) => flat.extend(rs.iter().map(|r| (r, Some(format!("g{n}"))))),
        }
    }
    for (r, _) in &flat {
        let body = match &r.body {
            Some(b) => {
                let text = std::str::from_utf8(b).map_err(|e| BatchError(format!("request body is not text: {e}")))?;
                Some(RawValue::from_string(text.to_string()).map_err(|e| BatchError(format!("request body: {e}")))?)
            }
            None => None,
        };
        bodies.push(body);
    }
    let requests = flat
        .iter()
        .zip(&bodies)
        .enumerate()
        .map(|(i, ((r, group), body))| JsonRequest {
            id: (i + 1).to_string(),
            atomicity_group: group.clone(),
            method: r.method,
            url: &r.url,
            headers: r.headers.iter().map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone()))).collect(),
            body: body.as_deref(),
        })
        .collect();
    serde_json::to_vec(&Envelope { requests }).map_err(|e| BatchError(e.to_string()))
}

#[derive(Deserialize)]
struct Answers {
    responses: Vec<JsonResponse>,
}

#[derive(Deserialize)]
struct JsonResponse {
    id: Option<String>,
    status: u16,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    body: Option<Box<RawValue>>,
}

/// Decodes a JSON batch response, in the order of the request ids (1, 2, …); responses without
/// a numeric id keep their place after those.
pub fn decode(body: &[u8]) -> Result<Vec<Response>, BatchError> {
    let answers: Answers = serde_json::from_slice(body).map_err(|e| BatchError(format!("JSON batch: {e}")))?;
    let mut out: Vec<Response> = answers
        .responses
        .into_iter()
        .map(|r| Response {
            status: r.status,
            headers: r
                .headers
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_string)))
                .collect(),
            body: r.body.map(|b| b.get().as_bytes().to_vec()).unwrap_or_default(),
            content_id: r.id,
        })
        .collect();
    out.sort_by_key(|r| r.content_id.as_deref().and_then(|id| id.parse::<u64>().ok()).unwrap_or(u64::MAX));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::batch::tests::req;
    use super::*;

    #[test]
    fn requests_are_numbered_and_change_sets_become_atomicity_groups() {
        let items = [
            Item::Single(req("GET", "https://x/a?$filter=k%20eq%201", None)),
            Item::ChangeSet(vec![
                req("PATCH", "https://x/a(1)", Some(r#"{"n":"x"}"#)),
                req("DELETE", "https://x/a(2)", None),
            ]),
        ];
        let v: Value = serde_json::from_slice(&encode(&items).expect("encodes")).expect("JSON");
        let rs = v["requests"].as_array().expect("requests");
        assert_eq!(rs.len(), 3);
        assert_eq!((rs[0]["id"].as_str(), rs[0].get("atomicityGroup")), (Some("1"), None));
        assert_eq!((rs[1]["id"].as_str(), rs[1]["atomicityGroup"].as_str()), (Some("2"), Some("g1")));
        assert_eq!(rs[2]["atomicityGroup"], rs[1]["atomicityGroup"]);
        assert_eq!(rs[1]["body"]["n"], "x", "the body is JSON, not a string");
        assert_eq!(rs[1]["headers"]["if-match"], "W/\"1\"");
        assert!(rs[2].get("body").is_none());
    }

    #[test]
    fn a_body_that_is_not_json_is_refused() {
        let e = encode(&[Item::Single(req("POST", "https://x/a", Some("not json")))]).unwrap_err();
        assert!(e.0.contains("request body"), "{e}");
    }

    #[test]
    fn responses_come_back_in_request_order_with_their_bodies() {
        let body = br#"{"responses":[
            {"id":"2","status":412,"headers":{"content-type":"application/json"},"body":{"error":{"code":"x","message":"stale"}}},
            {"id":"1","status":201,"headers":{"etag":"W/\"7\"","odata-version":"4.01"},"body":{"k":1}},
            {"id":"3","status":204}
        ]}"#;
        let rs = decode(body).expect("decodes");
        assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [201, 412, 204]);
        assert_eq!(rs[0].header("ETag"), Some("W/\"7\""));
        assert_eq!(String::from_utf8_lossy(&rs[0].body), r#"{"k":1}"#);
        assert!(rs[2].body.is_empty());
        assert!(decode(b"--batch").is_err());
    }
}
