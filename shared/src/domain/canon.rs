//! The canonical form of a record under a table map: the map's key and field pairs, named by
//! side A's field names, with values in side A's value space, normalized. Two records are in
//! step exactly when their canonical forms are equal (value by value, see [`same_value`]); the
//! hash of the form is what link state remembers.
//!
//! Values compare by their text, whatever type each app gives them: a number equals a string
//! only when the string is the number's canonical text (`7` = `"7"`, `1.5` = `"1.5"`), never
//! when the text differs (`"007"`, `"1.50"`, `" 7"`, `"7.0"` are not `7`). A connector whose
//! storage would change a written value out of its class (SQLite's column affinity) refuses the
//! write instead (DESIGN §3, "no silent coercion").
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use thiserror::Error;

use super::change::Key;
use super::job::{Side, TableMap};

pub type Fields = BTreeMap<String, Value>;
/// Canonical content: side A field name → normalized value in side A's value space.
pub type Canon = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CanonError {
    /// The value has no entry in the field's value map (the value itself is not shown).
    #[error("value of field '{field}' has no entry in its value map")]
    UnmappedValue { field: String },
}

/// Integral floats become integers, so `3.0` from one app equals `3` from the other.
pub fn normalize(v: &Value) -> Value {
    if let Value::Number(n) = v {
        if n.as_i64().is_none() && n.as_u64().is_none() {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    return Value::from(f as i64);
                }
            }
        }
    }
    v.clone()
}

/// The form two values are compared and hashed in: normalized, and a string that is exactly
/// a number's canonical text taken as that number.
pub fn comparable(v: &Value) -> Value {
    match v {
        Value::String(s) => match s.parse::<serde_json::Number>() {
            Ok(n) => {
                let n = normalize(&Value::Number(n));
                let text = n.to_string();
                if text == *s {
                    n
                } else {
                    v.clone()
                }
            }
            Err(_) => v.clone(),
        },
        other => normalize(other),
    }
}

/// Whether two values are the same canonical value (see the module doc).
pub fn same_value(a: &Value, b: &Value) -> bool {
    a == b || comparable(a) == comparable(b)
}

/// Canonical text of a key component: strings as they are, other scalars as JSON text.
pub fn key_text(v: &Value) -> Option<String> {
    match normalize(v) {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

/// The canonical form of a record of `side`.
pub fn canon(map: &TableMap, side: Side, fields: &Fields) -> Result<Canon, CanonError> {
    let i = side.index();
    let mut out = Canon::new();
    let get = |name: &str| fields.get(name).map(normalize).unwrap_or(Value::Null);
    for k in &map.keys {
        out.insert(k[0].clone(), get(&k[i]));
    }
    for f in &map.fields {
        let v = get(&f.names[i]);
        let v = match (&f.values, side) {
            (Some(vm), Side::B) if !v.is_null() => vm
                .pairs
                .iter()
                .find(|(_, b)| same_value(b, &v))
                .map(|(a, _)| a.clone())
                .ok_or_else(|| CanonError::UnmappedValue { field: f.names[1].clone() })?,
            (Some(vm), Side::A) if !v.is_null() => {
                if !vm.pairs.iter().any(|(a, _)| same_value(a, &v)) {
                    return Err(CanonError::UnmappedValue { field: f.names[0].clone() });
                }
                v
            }
            _ => v,
        };
        out.insert(f.names[0].clone(), v);
    }
    Ok(out)
}

/// The fields to write on `side` for canonical content: names and values of that side.
pub fn to_side(map: &TableMap, side: Side, canon: &Canon) -> Fields {
    let i = side.index();
    let mut out = Fields::new();
    let get = |a_name: &str| canon.get(a_name).cloned().unwrap_or(Value::Null);
    for k in &map.keys {
        out.insert(k[i].clone(), get(&k[0]));
    }
    for f in &map.fields {
        let v = get(&f.names[0]);
        let v = match (&f.values, side) {
            // `canon` only holds values that are in the value map (checked when it was made).
            (Some(vm), Side::B) if !v.is_null() => {
                vm.pairs.iter().find(|(a, _)| same_value(a, &v)).map(|(_, b)| b.clone()).unwrap_or(v)
            }
            _ => v,
        };
        out.insert(f.names[i].clone(), v);
    }
    out
}

/// Hash of canonical content: hex of the first 16 bytes of SHA-256 over the JSON (sorted keys)
/// of its [`comparable`] form, so that values the same canonically hash the same.
pub fn hash(canon: &Canon) -> String {
    let form: BTreeMap<&String, Value> = canon.iter().map(|(k, v)| (k, comparable(v))).collect();
    let bytes = serde_json::to_vec(&form).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of the record of `map` that a lookup points to, from the record's fields on `side`;
/// `None` when the lookup is empty (an optional reference).
pub fn lookup_key(lookup_fields: &[[String; 2]], side: Side, fields: &Fields) -> Option<Key> {
    let parts: Option<Vec<String>> =
        lookup_fields.iter().map(|f| fields.get(&f[side.index()]).and_then(key_text)).collect();
    parts.map(Key)
}

/// The record's integration key from its fields on `side`.
pub fn record_key(map: &TableMap, side: Side, fields: &Fields) -> Option<Key> {
    lookup_key(&map.keys, side, fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::job::{FieldMap, Mode, ValueMap};
    use serde_json::json;

    fn map() -> TableMap {
        TableMap {
            name: "customers".into(),
            group: "g".into(),
            group_index: 0,
            sequence: 1,
            entity: ["Cust".into(), "accounts".into()],
            keys: vec![["Id".into(), "id".into()]],
            fields: vec![
                FieldMap { names: ["Name".into(), "name".into()], values: None },
                FieldMap {
                    names: ["Type".into(), "type".into()],
                    values: Some(ValueMap { pairs: vec![(json!("Person"), json!(1)), (json!("Org"), json!(2))] }),
                },
            ],
            lookups: vec![],
            company: None,
            mode: Mode::Async,
            event_names: Default::default(),
        }
    }

    fn fields(v: Value) -> Fields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn both_sides_canonicalize_to_the_same_form() {
        let m = map();
        let a = canon(&m, Side::A, &fields(json!({"Id": "C1", "Name": "Ann", "Type": "Org", "Extra": 5}))).unwrap();
        let b = canon(&m, Side::B, &fields(json!({"id": "C1", "name": "Ann", "type": 2.0}))).unwrap();
        assert_eq!(a, b);
        assert_eq!(hash(&a), hash(&b));
        let c = canon(&m, Side::B, &fields(json!({"id": "C1", "name": "Bob", "type": 2}))).unwrap();
        assert_ne!(hash(&a), hash(&c));
    }

    #[test]
    fn to_side_round_trips_through_the_value_map() {
        let m = map();
        let a = canon(&m, Side::A, &fields(json!({"Id": "C1", "Name": "Ann", "Type": "Person"}))).unwrap();
        let b_fields = to_side(&m, Side::B, &a);
        assert_eq!(b_fields.get("type"), Some(&json!(1)));
        assert_eq!(b_fields.get("id"), Some(&json!("C1")));
        assert_eq!(canon(&m, Side::B, &b_fields).unwrap(), a);
    }

    #[test]
    fn unmapped_value_is_an_error_that_hides_the_value() {
        let m = map();
        let err = canon(&m, Side::B, &fields(json!({"id": "C1", "name": "x", "type": 9}))).unwrap_err();
        assert_eq!(err, CanonError::UnmappedValue { field: "type".into() });
        assert!(!err.to_string().contains('9'));
    }

    #[test]
    fn a_number_equals_only_its_canonical_text() {
        for (a, b) in
            [(json!("7"), json!(7)), (json!("-7"), json!(-7.0)), (json!("1.5"), json!(1.5)), (json!(3.0), json!(3))]
        {
            assert!(same_value(&a, &b), "{a} = {b}");
        }
        for (a, b) in [
            (json!("007"), json!(7)),
            (json!(" 7"), json!(7)),
            (json!("7.0"), json!(7)),
            (json!("1.50"), json!(1.5)),
            (json!("+7"), json!(7)),
            (json!("1e2"), json!(100)),
            (json!(true), json!(1)),
            (json!(null), json!("")),
        ] {
            assert!(!same_value(&a, &b), "{a} != {b}");
        }
    }

    #[test]
    fn text_and_number_forms_of_one_record_hash_equal() {
        let m = map();
        let a = canon(&m, Side::A, &fields(json!({"Id": "C1", "Name": "7", "Type": "Org"}))).unwrap();
        let b = canon(&m, Side::B, &fields(json!({"id": "C1", "name": 7, "type": "2"}))).unwrap();
        assert_eq!(hash(&a), hash(&b), "a value map entry matches its text form too");
        let padded = canon(&m, Side::A, &fields(json!({"Id": "C1", "Name": "007", "Type": "Org"}))).unwrap();
        assert_ne!(hash(&padded), hash(&b));
    }

    #[test]
    fn key_text_normalizes_scalars() {
        assert_eq!(key_text(&json!(42.0)), Some("42".into()));
        assert_eq!(key_text(&json!("A")), Some("A".into()));
        assert_eq!(key_text(&Value::Null), None);
    }
}
