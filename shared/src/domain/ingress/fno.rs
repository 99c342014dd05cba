//! finance and operations business events and data events (JSON, one event or a list).
//!
//! - `BusinessEventId` names the event; a data event also names its entity (`EntityName`) and
//!   what happened (`EventType`: Create, Update, Delete, or the past tense). A business event
//!   is mapped by its id: the job says which entity it is about.
//! - `ControlNumber` is the seq. Delivery is at least once and control numbers have gaps: the
//!   number orders a record's changes, nothing counts on it being contiguous, and a delivery
//!   repeated has the same `EventId`, the transaction id, so capture takes it once.
//! - The key fields are read from the event's own properties (where fno puts a business
//!   event's contract fields and a data event's entity fields); a missing `dataAreaId` is the
//!   event's `BusinessEventLegalEntity`, which is also the company.
use serde_json::Value;

use super::{dotnet_date, err, json, key_value, kind, opt_string, string, whole, EntityKeys, Event};
use super::{IngressError, RecordRef, Reference};
use crate::domain::change::{Key, Operation};

/// Parses an fno event body: one event, or a list of them (each its own transaction).
/// `mapped` gives the map entity and key fields of an `EntityName` or a `BusinessEventId`.
pub fn parse(
    body: &[u8],
    mapped: &dyn Fn(&str) -> Option<EntityKeys>,
    now_ms: i64,
) -> Result<Vec<Event>, IngressError> {
    match json(body)? {
        Value::Array(events) => {
            events.iter().enumerate().map(|(i, e)| event(e, &format!("[{i}]"), mapped, now_ms)).collect()
        }
        e @ Value::Object(_) => Ok(vec![event(&e, "", mapped, now_ms)?]),
        other => Err(err("(body)", format!("must be an event object or a list of them, found {}", kind(&other)))),
    }
}

fn event(e: &Value, at: &str, mapped: &dyn Fn(&str) -> Option<EntityKeys>, now_ms: i64) -> Result<Event, IngressError> {
    let path = |name: &str| super::join(at, name);
    if !e.is_object() {
        return Err(err(
            if at.is_empty() { "(body)" } else { at },
            format!("must be an event object, found {}", kind(e)),
        ));
    }
    let id = string(e, at, "BusinessEventId")?;
    let control = match e.get("ControlNumber") {
        Some(v) => whole(v, &path("ControlNumber"))?,
        None => return Err(err(if at.is_empty() { "(body)" } else { at }, "'ControlNumber' is missing")),
    };
    let entity_name = opt_string(e, at, "EntityName")?;
    let by = entity_name.unwrap_or(id);
    let user = opt_string(e, at, "InitiatingUserAADObjectId")?.map(str::to_string);
    let Some(keys) = mapped(by) else {
        // Not an error: an fno endpoint may be sent more events than the job maps.
        return Ok(Event { txid: id.to_string(), changes: vec![], user, depth: None, ignored: vec![by.to_string()] });
    };
    let op = match opt_string(e, at, "EventType")? {
        Some("Create" | "Created" | "Update" | "Updated") => Operation::Upsert,
        Some("Delete" | "Deleted") => Operation::Delete,
        Some(other) => return Err(err(path("EventType"), format!("'{other}' is not Create, Update or Delete"))),
        None if id.ends_with("Delete") || id.ends_with("Deleted") => Operation::Delete,
        None => Operation::Upsert,
    };
    // An empty legal entity names none (it would make an empty key value).
    let legal_entity = opt_string(e, at, "BusinessEventLegalEntity")?.filter(|l| !l.is_empty());
    let mut key = Vec::with_capacity(keys.key_fields.len());
    for f in &keys.key_fields {
        let value = match e.get(f) {
            Some(v) => v,
            None if f.eq_ignore_ascii_case("dataAreaId") && legal_entity.is_some() => {
                key.push(legal_entity.unwrap_or_default().to_string());
                continue;
            }
            None => {
                return Err(err(
                    if at.is_empty() { "(body)" } else { at },
                    format!("key field '{f}' of {} is missing: add it to the event's payload", keys.entity),
                ))
            }
        };
        if value.is_object() || value.is_array() {
            return Err(err(path(f), format!("key field '{f}' must be a plain value, found {}", kind(value))));
        }
        key.push(key_value(value).ok_or_else(|| err(path(f), format!("key field '{f}' is empty")))?);
    }
    let company = match e.get("dataAreaId").and_then(Value::as_str) {
        Some(c) => Some(c.to_string()),
        None => legal_entity.map(str::to_string),
    };
    let txid = match opt_string(e, at, "EventId")? {
        Some(t) => t.to_string(),
        None => format!("{id}#{control}"),
    };
    let at_ms = match opt_string(e, at, "EventTime")? {
        Some(t) => dotnet_date(t).ok_or_else(|| err(path("EventTime"), "must be a date like /Date(1700000000000)/"))?,
        None => now_ms,
    };
    Ok(Event {
        txid,
        changes: vec![Reference {
            entity: keys.entity,
            record: RecordRef::Key(Key(key)),
            op,
            seq: Some(control),
            version: None,
            company,
            at_ms,
        }],
        user,
        depth: None,
        ignored: vec![],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapped(name: &str) -> Option<EntityKeys> {
        let customers = || EntityKeys {
            entity: "CustomersV3".into(),
            key_fields: vec!["dataAreaId".into(), "CustomerAccount".into()],
        };
        match name {
            "CustomersV3" | "CustomerCreatedBusinessEvent" => Some(customers()),
            _ => None,
        }
    }

    fn business_event() -> Value {
        json!({
            "BusinessEventId": "CustomerCreatedBusinessEvent",
            "BusinessEventLegalEntity": "USMF",
            "ContextRecordSubject": "",
            "ControlNumber": 5637144576u64,
            "CustomerAccount": "US-027",
            "CustomerName": "kept out",
            "EventId": "0C9D3FBD-4F6E-4D3D-9C5A-D3B3B1C6A001",
            "EventTime": "/Date(1533035191000)/",
            "EventTimeIso8601": "2018-07-31T11:06:31.8414337Z",
            "InitiatingUserAADObjectId": "B2C9A3E1-0000-0000-0000-000000000001",
            "MajorVersion": 0,
            "MinorVersion": 0,
            "ParentContextRecordSubjects": []
        })
    }

    #[test]
    fn a_business_event_is_an_upsert_keyed_with_its_legal_entity() {
        let events = parse(business_event().to_string().as_bytes(), &mapped, 0).unwrap();
        let e = &events[0];
        assert_eq!(e.txid, "0C9D3FBD-4F6E-4D3D-9C5A-D3B3B1C6A001");
        let c = &e.changes[0];
        assert_eq!(c.record, RecordRef::Key(Key(vec!["USMF".into(), "US-027".into()])));
        assert_eq!(
            (c.op, c.seq, c.company.as_deref(), c.at_ms),
            (Operation::Upsert, Some(5637144576), Some("USMF"), 1_533_035_191_000)
        );
        let n = e.notification("j", "fno", 0).unwrap();
        assert!(!serde_json::to_string(&n).unwrap().contains("kept out"), "references only");
    }

    #[test]
    fn data_events_name_their_entity_and_operation_and_come_in_lists() {
        let mut ev = json!({"BusinessEventId": "Microsoft.Dynamics.DataEvents.CustomersV3", "EntityName": "CustomersV3",
            "EventType": "Deleted", "ControlNumber": "12", "dataAreaId": "demf", "CustomerAccount": 42, "EventId": "e1"});
        let mut again = ev.clone();
        again["ControlNumber"] = json!(20); // a gap: fine
        again["EventType"] = json!("Update");
        ev["EventId"] = json!("e0");
        let events = parse(json!([ev, again]).to_string().as_bytes(), &mapped, 3).unwrap();
        assert_eq!(events.len(), 2);
        let (a, b) = (&events[0].changes[0], &events[1].changes[0]);
        assert_eq!((a.op, a.seq, a.company.as_deref()), (Operation::Delete, Some(12), Some("demf")));
        assert_eq!(a.record, RecordRef::Key(Key(vec!["demf".into(), "42".into()])));
        assert_eq!((b.op, b.seq, b.at_ms), (Operation::Upsert, Some(20), 3));
    }

    #[test]
    fn events_the_job_does_not_map_are_ignored_by_name() {
        let mut vendor = business_event();
        vendor["BusinessEventId"] = json!("VendorCreated");
        let events = parse(json!([vendor, business_event()]).to_string().as_bytes(), &mapped, 0).unwrap();
        assert_eq!((events[0].changes.len(), &events[0].ignored), (0, &vec!["VendorCreated".to_string()]));
        assert_eq!((events[1].changes.len(), events[1].ignored.len()), (1, 0));
    }

    #[test]
    fn bad_input_says_what_and_where() {
        let with = |f: &dyn Fn(&mut Value)| {
            let mut e = business_event();
            f(&mut e);
            e
        };
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!("x"), "(body)", "must be an event object or a list"),
            (json!([1]), "[0]", "must be an event object"),
            (
                with(&|e| {
                    e.as_object_mut().unwrap().remove("ControlNumber");
                }),
                "(body)",
                "'ControlNumber' is missing",
            ),
            (with(&|e| e["ControlNumber"] = json!(-1)), "ControlNumber", "whole number"),
            (with(&|e| e["EntityName"] = json!(5)), "EntityName", "must be a string"),
            (with(&|e| e["EventType"] = json!("Merge")), "EventType", "'Merge' is not Create"),
            (
                with(&|e| {
                    e.as_object_mut().unwrap().remove("CustomerAccount");
                }),
                "(body)",
                "key field 'CustomerAccount' of CustomersV3 is missing",
            ),
            (with(&|e| e["CustomerAccount"] = json!({"a": 1})), "CustomerAccount", "must be a plain value"),
            (with(&|e| e["CustomerAccount"] = json!("")), "CustomerAccount", "is empty"),
            (with(&|e| e["EventTime"] = json!("yesterday")), "EventTime", "must be a date"),
            (
                json!([business_event(), {"BusinessEventId": "CustomerCreatedBusinessEvent"}]),
                "[1]",
                "'ControlNumber' is missing",
            ),
        ];
        for (v, at, message) in cases {
            let e = parse(v.to_string().as_bytes(), &mapped, 0).unwrap_err();
            assert!(e.at == at && e.message.contains(message), "wanted {at}: {message}; got {e}");
        }
    }
}
