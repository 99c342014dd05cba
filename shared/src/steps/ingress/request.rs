//! A pushed event as any HTTP server hands it over, and the answer, without a framework: the
//! local runner (axum) and the Lambda function URL each convert to and from these.
use serde_json::{json, Value};

/// The event formats an ingress route takes: `POST /ingress/{job}/{app}/{source}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Dataverse webhook's `RemoteExecutionContext`.
    Dataverse,
    /// fno business events or data events (one, or a list).
    Fno,
    /// The project's own JSON notification, as on the capture queue.
    Notification,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Dataverse, Source::Fno, Source::Notification];

    pub fn parse(segment: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.as_str() == segment)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Dataverse => "dataverse",
            Source::Fno => "fno",
            Source::Notification => "notification",
        }
    }
}

/// One request to an ingress route: the path's parameters, headers, query and raw body.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub job: String,
    pub app: String,
    /// The last path segment: `dataverse`, `fno` or `notification`.
    pub source: String,
    /// Header names in any case.
    pub headers: Vec<(String, String)>,
    /// Query parameters, decoded.
    pub query: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first header of this name, whatever its case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The first query parameter of this name (query names are case-sensitive).
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// The answer: a status and a short JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Value,
}

impl Response {
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        Response { status, body: json!({ "error": message.into() }) }
    }
}

/// What one accepted request did, the body of a 200.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Accepted {
    /// Changes put on the capture queue.
    pub captured: usize,
    /// Events about entities no map of the job covers (logged, not an error: the sender would
    /// retry).
    pub ignored: usize,
    /// Events caused by dualsync's own application user: echoes of its writes.
    pub own_writes: usize,
    /// Changes that became error rows (a key that could not be read back, a change too large
    /// for a queue message).
    pub errors: usize,
}

impl Accepted {
    pub fn response(&self) -> Response {
        Response { status: 200, body: serde_json::to_value(self).unwrap_or(Value::Null) }
    }
}
