//! Every ingress parser over arbitrary bytes, arbitrary JSON and mutated real events: no panic,
//! an error naming where for bad input. Bounded (a few hundred cases each) to stay a regular
//! test of a few seconds in debug builds.
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::{dataverse, fno, EntityKeys, Event, IngressError, RecordRef};

fn mapped(name: &str) -> Option<EntityKeys> {
    match name {
        "account" | "CustomersV3" | "CustomerCreatedBusinessEvent" => {
            Some(EntityKeys { entity: "e".into(), key_fields: vec!["dataAreaId".into(), "k".into()] })
        }
        _ => None,
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec![
        "MessageName",
        "PrimaryEntityName",
        "PrimaryEntityId",
        "CorrelationId",
        "Depth",
        "InputParameters",
        "PostEntityImages",
        "PreEntityImages",
        "Attributes",
        "key",
        "value",
        "__type",
        "Value",
        "RowVersion",
        "BusinessEventId",
        "ControlNumber",
        "EntityName",
        "EventType",
        "EventId",
        "EventTime",
        "dataAreaId",
        "k",
        "BusinessEventLegalEntity",
        "OperationCreatedOn",
        "OperationId",
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        prop::sample::select(vec![
            "Create",
            "Update",
            "Delete",
            "account",
            "Target",
            "CustomersV3",
            "00000000-0000-0000-0000-000000000001",
            "/Date(1)/",
            "/Date(",
            "",
            "Deleted",
            "7",
            "-1",
            "EntityReference:x",
            "é",
        ])
        .prop_map(|s| Value::String(s.into())),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((names.clone(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<Map<_, _>>())),
        ]
    })
}

/// A parser's outcome is an event with references only, or an error that says where.
fn check(out: Result<Vec<Event>, IngressError>) {
    match out {
        Ok(events) => {
            for e in events {
                for c in e.changes {
                    if let RecordRef::Key(k) = c.record {
                        assert!(k.0.iter().all(|v| !v.is_empty()), "an empty key value: {k:?}");
                    }
                }
            }
        }
        Err(e) => assert!(!e.at.is_empty() && !e.message.is_empty(), "{e:?}"),
    }
}

fn both(bytes: &[u8]) {
    check(dataverse::parse(bytes, &mapped, false, 0).map(|e| vec![e]));
    check(dataverse::parse(bytes, &mapped, true, 0).map(|e| vec![e]));
    check(fno::parse(bytes, &mapped, 0));
}

/// A real event with one member replaced by an arbitrary value, at any depth.
fn mutate(mut v: Value, path: &[usize], with: Value) -> Value {
    fn go(v: &mut Value, path: &[usize], with: Value) {
        let Some((&i, rest)) = path.split_first() else {
            *v = with;
            return;
        };
        match v {
            Value::Object(m) if !m.is_empty() => {
                let key = m.keys().nth(i % m.len()).cloned().unwrap_or_default();
                if let Some(x) = m.get_mut(&key) {
                    go(x, rest, with)
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let n = a.len();
                go(&mut a[i % n], rest, with)
            }
            other => *other = with,
        }
    }
    go(&mut v, path, with);
    v
}

fn webhook() -> Value {
    json!({"MessageName": "Update", "PrimaryEntityName": "account",
        "PrimaryEntityId": "00000000-0000-0000-0000-000000000001", "CorrelationId": "c", "Depth": 1,
        "OperationCreatedOn": "/Date(1752094336000+0000)/",
        "InputParameters": [{"key": "Target", "value": {"Attributes": [{"key": "k", "value": "A"},
            {"key": "dataAreaId", "value": {"__type": "OptionSetValue:x", "Value": 1}}], "RowVersion": "5"}}],
        "PostEntityImages": [{"key": "i", "value": {"Attributes": [{"key": "k", "value": "B"}]}}]})
}

fn fno_event() -> Value {
    json!([{"BusinessEventId": "CustomerCreatedBusinessEvent", "ControlNumber": 5, "k": "A",
        "BusinessEventLegalEntity": "USMF", "EventTime": "/Date(1)/", "EventId": "e"}])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        both(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in any_json()) {
        both(v.to_string().as_bytes());
    }

    #[test]
    fn mutated_real_events_never_panic(path in prop::collection::vec(any::<usize>(), 0..6), with in any_json()) {
        both(mutate(webhook(), &path, with.clone()).to_string().as_bytes());
        both(mutate(fno_event(), &path, with).to_string().as_bytes());
    }
}
