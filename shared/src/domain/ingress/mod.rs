//! Apps' own change events parsed into references (DESIGN §2, ingress): which record of which
//! entity changed, how, in which transaction, with the order the app gives. Never the record's
//! values: a key field is read from an event only to name the record.
//!
//! - [`dataverse`]: a Dataverse webhook's `RemoteExecutionContext`.
//! - [`fno`]: finance and operations business events and data events.
//!
//! Each parser is pure: the job tells it which entities it maps and their key fields
//! ([`EntityKeys`]); bad input is an [`IngressError`] naming where in the event it is.
pub mod dataverse;
pub mod fno;
#[cfg(test)]
mod fuzz;

use serde_json::Value;
use thiserror::Error;

use super::canon::key_text;
use super::change::{ChangeNotification, Key, Operation, Parts, TransactionNotification};

/// A mapped entity as an event names it: the entity as the job's map names it, and its
/// integration key fields in key order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityKeys {
    pub entity: String,
    pub key_fields: Vec<String>,
}

/// How a record is named: by integration key, or only by the app's record id when the event
/// does not carry the key fields (the key must then be read back from the app).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordRef {
    Key(Key),
    Id(String),
}

/// One changed record, as a reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub entity: String,
    pub record: RecordRef,
    pub op: Operation,
    /// The app's order for the record (Dataverse RowVersion, fno ControlNumber), if given.
    pub seq: Option<u64>,
    /// The record's version right after the change, if the event tells it.
    pub version: Option<String>,
    pub company: Option<String>,
    pub at_ms: i64,
}

/// The changes of one event: one transaction of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub txid: String,
    pub changes: Vec<Reference>,
    /// Who made the change (Dataverse's initiating user), to tell dualsync's own writes.
    pub user: Option<String>,
    /// Dataverse's plug-in depth: above 1, the change was made by another step's code.
    pub depth: Option<u32>,
    /// Entities the event names that the job does not map: not an error (the sender would
    /// retry it), the caller counts and logs them.
    pub ignored: Vec<String>,
}

/// Why an event cannot be taken: where in it (a path like `InputParameters[0].value`) and what.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{at}: {message}")]
pub struct IngressError {
    pub at: String,
    pub message: String,
}

pub(crate) fn err(at: impl Into<String>, message: impl Into<String>) -> IngressError {
    IngressError { at: at.into(), message: message.into() }
}

/// A reference that is not ready to be a change notification.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Unresolved {
    #[error("{entity} record {id}: the event does not carry its integration key; it must be read back by id")]
    KeyById { entity: String, id: String },
}

impl Event {
    /// The project's notification for this event, when every record is named by key; `seq`
    /// stands in for an order the event does not give (the caller's, e.g. a receive counter).
    pub fn notification(&self, job: &str, app: &str, seq: u64) -> Result<TransactionNotification, Unresolved> {
        let mut changes = Vec::with_capacity(self.changes.len());
        for r in &self.changes {
            let key = match &r.record {
                RecordRef::Key(k) => k.clone(),
                RecordRef::Id(id) => return Err(Unresolved::KeyById { entity: r.entity.clone(), id: id.clone() }),
            };
            changes.push(ChangeNotification {
                app: app.to_string(),
                entity: r.entity.clone(),
                key,
                op: r.op,
                seq: r.seq.unwrap_or(seq),
                version: r.version.clone(),
                company: r.company.clone(),
                at_ms: r.at_ms,
            });
        }
        Ok(TransactionNotification {
            job: job.to_string(),
            app: app.to_string(),
            txid: self.txid.clone(),
            changes,
            parts: Parts::default(),
        })
    }
}

/// The body as a JSON value, or an error that says it is not JSON.
pub(crate) fn json(body: &[u8]) -> Result<Value, IngressError> {
    serde_json::from_slice(body).map_err(|e| err("(body)", format!("not JSON: {e}")))
}

/// A string member of an object, required.
pub(crate) fn string<'a>(obj: &'a Value, at: &str, name: &str) -> Result<&'a str, IngressError> {
    match obj.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) => Err(err(join(at, name), "is empty")),
        Some(other) => Err(err(join(at, name), format!("must be a string, found {}", kind(other)))),
        None => Err(err(at_or_body(at), format!("'{name}' is missing"))),
    }
}

/// An optional string member: absent and null are `None`, another type is an error.
pub(crate) fn opt_string<'a>(obj: &'a Value, at: &str, name: &str) -> Result<Option<&'a str>, IngressError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(err(join(at, name), format!("must be a string, found {}", kind(other)))),
    }
}

/// A whole number given as a JSON number or as digits in a string (RowVersion is a string).
pub(crate) fn whole(v: &Value, at: &str) -> Result<u64, IngressError> {
    match v {
        Value::Number(n) => n.as_u64().ok_or_else(|| err(at, format!("must be a whole number from 0, found {n}"))),
        Value::String(s) => s.trim().parse::<u64>().map_err(|_| err(at, "must be a whole number from 0")),
        other => Err(err(at, format!("must be a whole number, found {}", kind(other)))),
    }
}

/// `/Date(1752094336000+0000)/` (the .NET JSON date both apps send) as epoch milliseconds.
pub(crate) fn dotnet_date(text: &str) -> Option<i64> {
    let inner = text.strip_prefix("/Date(")?.strip_suffix(")/")?;
    // A leading '-' is the number's sign; a later '+' or '-' starts the zone offset.
    let first = inner.chars().next()?.len_utf8();
    let end = inner[first..].find(['+', '-']).map_or(inner.len(), |i| i + first);
    inner[..end].parse::<i64>().ok()
}

/// The text of a key value as the pipeline keys records; `None` for null or empty.
pub(crate) fn key_value(v: &Value) -> Option<String> {
    key_text(v)
}

/// `8-4-4-4-12` hexadecimal digits.
pub(crate) fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn join(at: &str, name: &str) -> String {
    if at.is_empty() {
        name.to_string()
    } else {
        format!("{at}.{name}")
    }
}

fn at_or_body(at: &str) -> String {
    if at.is_empty() {
        "(body)".into()
    } else {
        at.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotnet_dates_are_epoch_milliseconds() {
        assert_eq!(dotnet_date("/Date(1752094336000+0000)/"), Some(1_752_094_336_000));
        assert_eq!(dotnet_date("/Date(1533035191000)/"), Some(1_533_035_191_000));
        assert_eq!(dotnet_date("/Date(-5)/"), Some(-5));
        assert_eq!(dotnet_date("2018-07-31T11:06:31Z"), None);
        assert_eq!(dotnet_date("/Date()/"), None);
    }

    #[test]
    fn a_reference_by_id_is_not_a_notification_yet() {
        let e = Event {
            txid: "t".into(),
            changes: vec![Reference {
                entity: "accounts".into(),
                record: RecordRef::Id("00000000-0000-0000-0000-000000000001".into()),
                op: Operation::Upsert,
                seq: None,
                version: None,
                company: None,
                at_ms: 1,
            }],
            user: None,
            depth: None,
            ignored: vec![],
        };
        let u = e.notification("j", "dv", 7).unwrap_err();
        assert!(u.to_string().contains("must be read back by id"), "{u}");
    }
}
