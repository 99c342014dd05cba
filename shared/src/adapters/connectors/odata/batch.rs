//! The multipart `$batch` format (OData v4.01 Part 1 §11.7, multipart/mixed): requests, and
//! change sets of requests that succeed or fail together, in one HTTP request; the answer
//! holds one response per request, in order, change sets' responses nested likewise.
//!
//! Lines end in CRLF; responses are read with LF alone too, as some proxies rewrite them.
//! Each request carries a `Content-ID` (required inside change sets, harmless outside), and a
//! response is matched to its request by that id where the service echoes it, by position
//! otherwise.

/// One request inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    /// Absolute URL of the resource (accepted by every service; relative forms vary).
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

/// A batch's top-level parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    Single(Request),
    /// Requests applied atomically.
    ChangeSet(Vec<Request>),
}

/// One response of a batch, flattened out of change sets in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_id: Option<String>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable $batch response: {0}")]
pub struct BatchError(pub String);

/// Encodes the body of a batch request; requests are numbered 1, 2, … across change sets in
/// `Content-ID`. Returns the body; the request's content type is
/// `multipart/mixed;boundary=<boundary>`.
pub fn encode(boundary: &str, items: &[Item]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut id = 0usize;
    for (n, item) in items.iter().enumerate() {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match item {
            Item::Single(r) => {
                id += 1;
                part(&mut out, r, id);
            }
            Item::ChangeSet(rs) => {
                let cs = format!("changeset_{boundary}_{n}");
                out.extend_from_slice(format!("Content-Type: multipart/mixed;boundary={cs}\r\n\r\n").as_bytes());
                for r in rs {
                    id += 1;
                    out.extend_from_slice(format!("--{cs}\r\n").as_bytes());
                    part(&mut out, r, id);
                }
                out.extend_from_slice(format!("--{cs}--\r\n").as_bytes());
            }
        }
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn part(out: &mut Vec<u8>, r: &Request, id: usize) {
    out.extend_from_slice(
        format!("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: {id}\r\n\r\n")
            .as_bytes(),
    );
    out.extend_from_slice(format!("{} {} HTTP/1.1\r\n", r.method, r.url).as_bytes());
    for (k, v) in &r.headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    match &r.body {
        Some(b) => {
            out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", b.len()).as_bytes());
            out.extend_from_slice(b);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"\r\n"),
    }
}

/// The `boundary` parameter of a multipart content type.
pub fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').map(str::trim).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim().trim_matches('"').to_string())
    })
}

/// Decodes a batch response body given its content type.
pub fn decode(content_type: &str, body: &[u8]) -> Result<Vec<Response>, BatchError> {
    let boundary = boundary_of(content_type).ok_or_else(|| BatchError(format!("no boundary in '{content_type}'")))?;
    let mut out = Vec::new();
    for p in split_parts(body, &boundary)? {
        let (headers, content) = split_head(p);
        let ct = header(&headers, "content-type").unwrap_or_default().to_ascii_lowercase();
        if ct.starts_with("multipart/mixed") {
            out.extend(decode(&ct_original(&headers), content)?);
        } else {
            let mut r = http_response(content)?;
            r.content_id = header(&headers, "content-id").map(str::to_string).or(r.content_id);
            out.push(r);
        }
    }
    Ok(out)
}

fn ct_original(headers: &[(String, String)]) -> String {
    header(headers, "content-type").unwrap_or_default().to_string()
}

/// The parts between `--boundary` lines (preamble and epilogue dropped).
pub fn split_parts<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<&'a [u8]>, BatchError> {
    let delim = format!("--{boundary}");
    let d = delim.as_bytes();
    let mut starts = Vec::new(); // (index of the delimiter line, index after its line end)
    let mut i = 0;
    while let Some(at) = find(&body[i..], d) {
        let pos = i + at;
        let line_start = pos == 0 || body[pos - 1] == b'\n';
        let after = pos + d.len();
        if line_start {
            starts.push((pos, after));
        }
        i = after;
    }
    if starts.is_empty() {
        return Err(BatchError(format!("no part delimited by '{delim}'")));
    }
    let mut parts = Vec::new();
    for w in starts.windows(2) {
        let (_, after) = w[0];
        let (next, _) = w[1];
        if body[after..].starts_with(b"--") {
            break; // the closing delimiter
        }
        let mut start = after;
        // The rest of the delimiter line (transport padding) and its line end.
        while start < next && body[start] != b'\n' {
            start += 1;
        }
        start = (start + 1).min(next);
        let mut end = next;
        // The line end before the next delimiter belongs to the delimiter.
        if end > start && body[end - 1] == b'\n' {
            end -= 1;
            if end > start && body[end - 1] == b'\r' {
                end -= 1;
            }
        }
        parts.push(&body[start..end]);
    }
    let (_, last_after) = *starts.last().unwrap_or(&(0, 0));
    if !body[last_after..].starts_with(b"--") {
        return Err(BatchError("the closing delimiter is missing (the answer was cut short)".into()));
    }
    Ok(parts)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Headers of a MIME part or HTTP message, and what follows the blank line.
pub fn split_head(p: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let mut headers = Vec::new();
    let mut i = 0;
    loop {
        let end = p[i..].iter().position(|&b| b == b'\n').map_or(p.len(), |n| i + n);
        let line = String::from_utf8_lossy(&p[i..end]);
        let line = line.trim_end_matches('\r');
        let next = (end + 1).min(p.len());
        if line.is_empty() {
            return (headers, &p[next..]);
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        if end >= p.len() {
            return (headers, &p[p.len()..]);
        }
        i = next;
    }
}

fn http_response(content: &[u8]) -> Result<Response, BatchError> {
    let nl = content.iter().position(|&b| b == b'\n').unwrap_or(content.len());
    let status_line = String::from_utf8_lossy(&content[..nl]);
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| BatchError(format!("bad status line '{}'", status_line.trim())))?;
    let rest = if nl < content.len() { &content[nl + 1..] } else { &content[nl..] };
    let (headers, body) = split_head(rest);
    Ok(Response { status, headers, body: body.to_vec(), content_id: None })
}

/// Parses a batch *request* body into its parts: the inverse of [`encode`], for servers and
/// tests. Each request is (method, url, headers, body), change sets nested.
pub fn decode_requests(content_type: &str, body: &[u8]) -> Result<Vec<ParsedItem>, BatchError> {
    let boundary = boundary_of(content_type).ok_or_else(|| BatchError(format!("no boundary in '{content_type}'")))?;
    let mut out = Vec::new();
    for p in split_parts(body, &boundary)? {
        let (headers, content) = split_head(p);
        let ct = ct_original(&headers);
        if ct.to_ascii_lowercase().starts_with("multipart/mixed") {
            let cs = boundary_of(&ct).ok_or_else(|| BatchError("change set without boundary".into()))?;
            let mut reqs = Vec::new();
            for q in split_parts(content, &cs)? {
                let (h, c) = split_head(q);
                reqs.push(http_request(c, header(&h, "content-id").map(str::to_string))?);
            }
            out.push(ParsedItem::ChangeSet(reqs));
        } else {
            out.push(ParsedItem::Single(http_request(content, header(&headers, "content-id").map(str::to_string))?));
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedItem {
    Single(ParsedRequest),
    ChangeSet(Vec<ParsedRequest>),
}

fn http_request(content: &[u8], content_id: Option<String>) -> Result<ParsedRequest, BatchError> {
    let nl = content.iter().position(|&b| b == b'\n').unwrap_or(content.len());
    let line = String::from_utf8_lossy(&content[..nl]).trim().to_string();
    let mut words = line.split_whitespace();
    let (Some(method), Some(url)) = (words.next(), words.next()) else {
        return Err(BatchError(format!("bad request line '{line}'")));
    };
    let rest = if nl < content.len() { &content[nl + 1..] } else { &content[nl..] };
    let (headers, body) = split_head(rest);
    Ok(ParsedRequest { method: method.to_string(), url: url.to_string(), headers, body: body.to_vec(), content_id })
}

/// Encodes a batch *response* (for servers and tests): each top-level entry is one response,
/// or a change set's responses where `change_set` says so.
pub fn encode_responses(boundary: &str, items: &[Vec<Response>], change_set: &[bool]) -> Vec<u8> {
    fn one(out: &mut Vec<u8>, r: &Response) {
        out.extend_from_slice(b"Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
        if let Some(id) = &r.content_id {
            out.extend_from_slice(format!("Content-ID: {id}\r\n").as_bytes());
        }
        out.extend_from_slice(format!("\r\nHTTP/1.1 {} {}\r\n", r.status, reason(r.status)).as_bytes());
        for (k, v) in &r.headers {
            out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&r.body);
        out.extend_from_slice(b"\r\n");
    }
    let mut out = Vec::new();
    for (n, item) in items.iter().enumerate() {
        out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        if change_set.get(n).copied().unwrap_or(false) {
            let cs = format!("changesetresponse_{boundary}_{n}");
            out.extend_from_slice(format!("Content-Type: multipart/mixed;boundary={cs}\r\n\r\n").as_bytes());
            for r in item {
                out.extend_from_slice(format!("--{cs}\r\n").as_bytes());
                one(&mut out, r);
            }
            out.extend_from_slice(format!("--{cs}--\r\n").as_bytes());
        } else if let Some(r) = item.first() {
            one(&mut out, r);
        }
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        424 => "Failed Dependency",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A request with an `If-Match` header (the JSON format's tests use it too).
    pub(in crate::adapters::connectors::odata) fn req(method: &'static str, url: &str, body: Option<&str>) -> Request {
        Request {
            method,
            url: url.to_string(),
            headers: vec![("If-Match".into(), "W/\"1\"".into())],
            body: body.map(|b| b.as_bytes().to_vec()),
        }
    }

    #[test]
    fn requests_and_change_sets_encode_to_the_multipart_format() {
        let items = vec![
            Item::Single(req("GET", "https://x/api/accounts?$filter=a%20eq%201", None)),
            Item::ChangeSet(vec![req("PATCH", "https://x/api/accounts(a='1')", Some(r#"{"n":1}"#))]),
        ];
        let body = String::from_utf8(encode("batch_b", &items)).unwrap();
        let want =
            "--batch_b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\n\
GET https://x/api/accounts?$filter=a%20eq%201 HTTP/1.1\r\nIf-Match: W/\"1\"\r\n\r\n\
--batch_b\r\nContent-Type: multipart/mixed;boundary=changeset_batch_b_1\r\n\r\n\
--changeset_batch_b_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
PATCH https://x/api/accounts(a='1') HTTP/1.1\r\nIf-Match: W/\"1\"\r\nContent-Length: 7\r\n\r\n{\"n\":1}\r\n\
--changeset_batch_b_1--\r\n--batch_b--\r\n";
        assert_eq!(body, want);
        // And a server reads it back.
        let parsed = decode_requests("multipart/mixed; boundary=batch_b", body.as_bytes()).unwrap();
        assert_eq!(parsed.len(), 2);
        match &parsed[1] {
            ParsedItem::ChangeSet(rs) => {
                assert_eq!(rs[0].method, "PATCH");
                assert_eq!(rs[0].body, br#"{"n":1}"#);
                assert_eq!(rs[0].content_id.as_deref(), Some("2"));
                assert_eq!(header(&rs[0].headers, "if-match"), Some("W/\"1\""));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn responses_decode_in_order_with_change_sets_flattened() {
        let body = "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{\"value\":[]}\r\n\
--batchresponse_1\r\nContent-Type: multipart/mixed; boundary=changesetresponse_2\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\n\
HTTP/1.1 204 No Content\r\nETag: W/\"9\"\r\n\r\n\r\n\
--changesetresponse_2\r\nContent-Type: application/http\r\nContent-ID: 3\r\n\r\n\
HTTP/1.1 412 Precondition Failed\r\nContent-Type: application/json\r\n\r\n{\"error\":{\"code\":\"0x80060882\",\"message\":\"m\"}}\r\n\
--changesetresponse_2--\r\n--batchresponse_1--\r\n";
        let rs = decode("multipart/mixed; boundary=batchresponse_1", body.as_bytes()).unwrap();
        assert_eq!(rs.iter().map(|r| r.status).collect::<Vec<_>>(), [200, 204, 412]);
        assert_eq!(rs[0].body, b"{\"value\":[]}");
        assert_eq!(rs[1].header("etag"), Some("W/\"9\""));
        assert_eq!(rs[1].content_id.as_deref(), Some("2"));
        assert!(rs[1].body.is_empty());
        assert!(rs[2].body.starts_with(b"{\"error\""));
    }

    #[test]
    fn bare_line_feeds_and_quoted_boundaries_are_read() {
        let body =
            "preamble\n--b\nContent-Type: application/http\n\nHTTP/1.1 201 Created\nETag: W/\"1\"\n\n{}\n--b--\n";
        let rs = decode("multipart/mixed; boundary=\"b\"", body.as_bytes()).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!((rs[0].status, rs[0].body.as_slice()), (201, b"{}".as_slice()));
    }

    #[test]
    fn a_cut_short_answer_is_an_error_not_fewer_results() {
        let body = "--b\r\nContent-Type: application/http\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n";
        assert!(decode("multipart/mixed;boundary=b", body.as_bytes()).is_err());
        assert!(decode("multipart/mixed", b"").is_err());
    }

    #[test]
    fn encoded_responses_round_trip() {
        let r =
            |status, id: &str| Response { status, headers: vec![], body: b"{}".to_vec(), content_id: Some(id.into()) };
        let items = vec![vec![r(200, "1")], vec![r(204, "2"), r(412, "3")]];
        let body = encode_responses("r", &items, &[false, true]);
        let rs = decode("multipart/mixed;boundary=r", &body).unwrap();
        assert_eq!(
            rs.iter().map(|r| (r.status, r.content_id.clone().unwrap())).collect::<Vec<_>>(),
            [(200, "1".to_string()), (204, "2".to_string()), (412, "3".to_string())]
        );
    }
}
