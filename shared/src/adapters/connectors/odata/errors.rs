//! What an OData service's error answer means, from what the service says (its error code and
//! text, fno's `innererror`) and not the HTTP status alone: a 412 may be a stale etag, a
//! create-only hit or a duplicate key; fno answers some validation failures with a 500 whose
//! real text is in `innererror`; Dataverse's codes (`0x80060892` duplicate key, `0x80060891`
//! not found by key) say more than the status.
//!
//! Messages keep the service's code and text, never a record's field value: values the request
//! carried are cut out of the service's text before it becomes a message.
use serde::Deserialize;
use std::time::Duration;

use crate::ports::WriteFailure;

/// The parts of an OData error body (`{"error": {"code", "message", "innererror"}}`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceError {
    pub code: String,
    pub message: String,
    /// fno's `innererror.message` (the Infolog text) and `innererror.type`.
    pub inner_message: String,
    pub inner_type: String,
}

#[derive(Deserialize)]
struct Envelope {
    error: Body,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<serde_json::Value>,
    #[serde(default)]
    innererror: Option<Inner>,
}

#[derive(Deserialize)]
struct Inner {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    r#type: Option<String>,
}

fn text(v: &Option<serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        // OData 4.0 JSON Verbose and some services: `"message": {"lang": "en", "value": "..."}`.
        Some(serde_json::Value::Object(o)) => o.get("value").and_then(|v| v.as_str()).unwrap_or_default().to_string(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

impl ServiceError {
    /// Reads an error body; anything else (an HTML page from a proxy) gives its first line.
    pub fn parse(body: &[u8]) -> ServiceError {
        match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope { error }) => {
                let inner = error.innererror;
                ServiceError {
                    code: text(&error.code),
                    message: text(&error.message),
                    inner_message: inner.as_ref().and_then(|i| i.message.clone()).unwrap_or_default(),
                    inner_type: inner.and_then(|i| i.r#type).unwrap_or_default(),
                }
            }
            Err(_) => {
                let s = String::from_utf8_lossy(body);
                let line = s.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or_default();
                ServiceError { message: line.chars().take(200).collect(), ..Default::default() }
            }
        }
    }

    fn says(&self, words: &[&str]) -> bool {
        let all = format!("{} {}", self.message, self.inner_message).to_ascii_lowercase();
        words.iter().any(|w| all.contains(w))
    }
}

/// What an answer means for the operation that got it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// The record is not at the version the write was conditional on.
    Stale,
    /// The record (or its key) already exists: on a create-only write, a lost create race.
    Exists,
    /// No record with this key.
    NotFound,
    /// Refused: validation, bad request, unsupported (an application failure).
    Invalid,
    /// 401: the credentials were refused.
    Unauthenticated,
    /// 403: the identity lacks a privilege.
    Forbidden,
    /// Throttled (429, or 503 with Retry-After): a system failure, after the service's wait.
    Throttled(Option<Duration>),
    /// 5xx and the like: a system failure.
    Unavailable,
}

/// Dataverse codes (hex as the service writes them, lowercased).
const DUPLICATE_CODES: &[&str] = &["0x80040237", "0x80060892"];
const NOT_FOUND_CODES: &[&str] = &["0x80060891", "0x80040217"];
const STALE_CODES: &[&str] = &["0x80060882"];
/// Service protection: requests, execution time, concurrency.
const THROTTLE_CODES: &[&str] = &["0x80072322", "0x80072321", "0x80072326"];

/// Classifies an answer by status, Retry-After and what the body says.
pub fn classify(status: u16, retry_after: Option<Duration>, err: &ServiceError) -> Class {
    let code = err.code.to_ascii_lowercase();
    let code = code.as_str();
    if THROTTLE_CODES.contains(&code) || status == 429 {
        return Class::Throttled(retry_after);
    }
    if DUPLICATE_CODES.contains(&code) {
        return Class::Exists;
    }
    if NOT_FOUND_CODES.contains(&code) {
        return Class::NotFound;
    }
    if STALE_CODES.contains(&code) {
        return Class::Stale;
    }
    // fno words a duplicate in its Infolog ("The record already exists."), whatever the status.
    if err.says(&["already exists", "duplicate key", "cannot insert duplicate"]) {
        return Class::Exists;
    }
    match status {
        412 => Class::Stale, // refined by the operation: see `write_failure`
        409 => Class::Exists,
        404 => Class::NotFound,
        401 => Class::Unauthenticated,
        403 => Class::Forbidden,
        503 if retry_after.is_some() => Class::Throttled(retry_after),
        // fno: a validation failure thrown while writing comes back as a 500 whose innererror
        // holds the Infolog; that is the app refusing the record, not an outage.
        500 if fno_validation(err) => Class::Invalid,
        500..=599 => Class::Unavailable,
        408 => Class::Unavailable,
        _ => Class::Invalid,
    }
}

/// Dataverse's `ExpiredVersionStamp`: the change-tracking starting point (a delta token's data
/// version) is older than the organization keeps changes (`ExpireChangeTrackingInDays`), or no
/// longer valid: "Please perform a full sync".
pub const EXPIRED_VERSION_STAMP: &str = "0x80044352";

/// Whether an answer to a delta link says its token can no longer be used: Dataverse's
/// `ExpiredVersionStamp` code (whatever the status), or the OData protocol's `410 Gone` for a
/// delta link that is no longer valid. Either way tracking must start afresh.
pub fn delta_expired(status: u16, err: &ServiceError) -> bool {
    status == 410 || err.code.eq_ignore_ascii_case(EXPIRED_VERSION_STAMP)
}

fn fno_validation(err: &ServiceError) -> bool {
    let t = err.inner_type.to_ascii_lowercase();
    t.contains("axodatawriteexception")
        || t.contains("validation")
        || err.inner_message.contains("Infolog")
        || err.inner_message.to_ascii_lowercase().contains("validation")
}

/// What a write did, given the answer's class. `create_only` tells which precondition it
/// carried: for an update, a missing record is a record changed since the read (deleted);
/// for a create, any precondition failure is the record existing (a lost create race).
pub fn write_failure(class: &Class, create_only: bool, message: String) -> WriteFailure {
    match class {
        Class::Stale | Class::Exists if create_only => WriteFailure::PreconditionFailed,
        Class::Stale | Class::NotFound if !create_only => WriteFailure::PreconditionFailed,
        // A duplicate on an update is another unique key of the entity: a validation refusal.
        Class::Throttled(retry_after) => WriteFailure::Transient { message, retry_after: *retry_after },
        Class::Unavailable => WriteFailure::Transient { message, retry_after: None },
        _ => WriteFailure::Rejected(message),
    }
}

/// The operator-facing message: status, the service's code and text (fno's Infolog when the
/// outer text says nothing), with every value in `redact` cut out, and a hint for 401 and 403.
pub fn message(status: u16, err: &ServiceError, class: &Class, redact: &[String], auth_hint: &str) -> String {
    let mut out = format!("HTTP {status}");
    if !err.code.is_empty() {
        out.push_str(&format!(" {}", err.code));
    }
    let outer = err.message.trim();
    let inner = err.inner_message.trim();
    let text = match (outer, inner) {
        (o, "") => o.to_string(),
        ("", i) => i.to_string(),
        (o, i) if o == i => o.to_string(),
        (o, i) => format!("{o} ({i})"),
    };
    if !text.is_empty() {
        out.push_str(": ");
        out.push_str(&redact_values(&text, redact));
    }
    match class {
        Class::Unauthenticated => out.push_str(&format!(" [the service refused the credentials: check {auth_hint}]")),
        Class::Forbidden => {
            out.push_str(" [the identity lacks a privilege: check the application user's security roles]")
        }
        _ => {}
    }
    const MAX: usize = 600;
    if out.len() > MAX {
        let cut = (0..=MAX).rev().find(|i| out.is_char_boundary(*i)).unwrap_or(0);
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// Cuts each value out of `text` where it stands as a word of its own (between characters
/// that are not letters or digits), so a short value does not mangle codes and words.
pub fn redact_values(text: &str, values: &[String]) -> String {
    let mut out = text.to_string();
    let mut values: Vec<&String> = values.iter().filter(|v| !v.trim().is_empty()).collect();
    values.sort_by_key(|v| std::cmp::Reverse(v.len())); // longest first: a value inside another
    for v in values {
        let mut result = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(v.as_str()) {
            let before = rest[..i].chars().next_back();
            let after = rest[i + v.len()..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
            result.push_str(&rest[..i]);
            if word(before) || word(after) {
                result.push_str(v);
            } else {
                result.push('…');
            }
            rest = &rest[i + v.len()..];
        }
        result.push_str(rest);
        out = result;
    }
    out
}

/// `Retry-After` in seconds (the form Dataverse and fno send); an HTTP date is not used by
/// either and is read as absent.
pub fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dv(code: &str, message: &str) -> ServiceError {
        ServiceError::parse(format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#).as_bytes())
    }

    #[test]
    fn a_412_means_what_the_operation_and_the_body_say() {
        let stale =
            dv("0x80060882", "The version of the existing record doesn't match the RowVersion property provided.");
        let c = classify(412, None, &stale);
        assert_eq!(c, Class::Stale);
        assert_eq!(write_failure(&c, false, "m".into()), WriteFailure::PreconditionFailed);
        let dup = dv("0x80060892", "A record with matching key values already exists.");
        let c = classify(412, None, &dup);
        assert_eq!(c, Class::Exists);
        assert_eq!(write_failure(&c, true, "m".into()), WriteFailure::PreconditionFailed);
        // The same duplicate on an update is another unique key: a refusal, not a race.
        assert_eq!(write_failure(&c, false, "m".into()), WriteFailure::Rejected("m".into()));
        // 0x80040237 is a duplicate whatever the status.
        assert_eq!(classify(400, None, &dv("0x80040237", "Cannot insert duplicate key.")), Class::Exists);
    }

    #[test]
    fn an_update_of_a_record_gone_is_a_failed_precondition() {
        let gone = dv("0x80060891", "A record with the specified key values does not exist in account entity");
        let c = classify(404, None, &gone);
        assert_eq!(c, Class::NotFound);
        assert_eq!(write_failure(&c, false, "m".into()), WriteFailure::PreconditionFailed);
    }

    #[test]
    fn fno_validation_in_a_500_is_a_refusal_and_a_duplicate_there_is_a_lost_race() {
        let body = br#"{"error":{"code":"","message":"An error has occurred.","innererror":{"message":"Write failed for table row of type 'CustCustomerV3Entity'. Infolog: Error: Name must be filled in.","type":"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException","stacktrace":"at X"}}}"#;
        let e = ServiceError::parse(body);
        let c = classify(500, None, &e);
        assert_eq!(c, Class::Invalid);
        let m = message(500, &e, &c, &[], "");
        assert!(m.contains("Name must be filled in"), "{m}");
        assert!(!m.contains("at X"), "no stack trace: {m}");
        let dup = br#"{"error":{"code":"","message":"An error has occurred.","innererror":{"message":"Cannot create a record in Customers (CustTable). Customer account: US-1. The record already exists.","type":"Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"}}}"#;
        let c = classify(500, None, &ServiceError::parse(dup));
        assert_eq!(write_failure(&c, true, "m".into()), WriteFailure::PreconditionFailed);
        // A 500 that is not validation is an outage.
        let other = ServiceError::parse(br#"{"error":{"code":"","message":"An error has occurred."}}"#);
        assert_eq!(classify(500, None, &other), Class::Unavailable);
    }

    #[test]
    fn throttling_and_outages_are_system_failures() {
        let e = dv("0x80072322", "Number of requests exceeded the limit of 6000 over time window of 300 seconds.");
        let c = classify(429, Some(Duration::from_secs(5)), &e);
        assert_eq!(c, Class::Throttled(Some(Duration::from_secs(5))));
        assert!(matches!(write_failure(&c, true, "m".into()), WriteFailure::Transient { retry_after: Some(_), .. }));
        assert_eq!(
            classify(503, Some(Duration::from_secs(1)), &ServiceError::default()),
            Class::Throttled(Some(Duration::from_secs(1)))
        );
        assert_eq!(classify(503, None, &ServiceError::default()), Class::Unavailable);
        assert_eq!(classify(502, None, &ServiceError::parse(b"<html>Bad gateway</html>")), Class::Unavailable);
    }

    #[test]
    fn permission_failures_say_what_to_check() {
        let e = dv("0x80040220", "Principal user is missing prvWriteAccount privilege");
        let c = classify(403, None, &e);
        assert_eq!(c, Class::Forbidden);
        let m = message(403, &e, &c, &[], "auth.client_secret_env");
        assert!(m.starts_with("HTTP 403 0x80040220: Principal user is missing prvWriteAccount privilege"), "{m}");
        assert!(m.contains("security roles"), "{m}");
        let m = message(401, &ServiceError::default(), &Class::Unauthenticated, &[], "DV_SECRET");
        assert!(m.contains("check DV_SECRET"), "{m}");
        assert_eq!(write_failure(&Class::Forbidden, false, m.clone()), WriteFailure::Rejected(m));
    }

    #[test]
    fn messages_never_show_a_field_value() {
        let e = ServiceError {
            message: "Value 'Secret Corp' of Name is not valid; 1 error; code 0x1".into(),
            ..Default::default()
        };
        let m = message(400, &e, &Class::Invalid, &["Secret Corp".into(), "1".into(), "x".into()], "");
        assert_eq!(m, "HTTP 400: Value '…' of Name is not valid; … error; code 0x1");
    }

    #[test]
    fn retry_after_is_seconds() {
        assert_eq!(retry_after(Some("7")), Some(Duration::from_secs(7)));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(None), None);
    }
}
