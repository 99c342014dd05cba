//! Lookups held as references (Dataverse): read through `$expand` of the navigation property
//! with the parent's key fields, written as `<navigation>@odata.bind` to the parent's address.
//!
//! The service keeps such a lookup as the parent's id (`_<name>_value`, a GUID), which is not
//! the parent's integration key; expanding the navigation property gives that key in the same
//! request instead of a second query per parent.
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};

use super::keys::{self, KeyKind};
use super::values::{value_of, RawEntity};
use crate::domain::canon::key_text;
use crate::domain::change::Key;
use crate::domain::job::Flavor;
use crate::ports::{Bind, EntitySpec};

/// `$select` of the key and mapped fields that are properties, and `$expand` of each bind
/// with its parent's key fields (a navigation property cannot be `$select`ed).
pub fn projection(spec: &EntitySpec) -> Vec<String> {
    let mut fields: Vec<&str> = spec.key_fields.iter().map(String::as_str).collect();
    for f in &spec.fields {
        if !fields.contains(&f.as_str()) && spec.bind_of(f).is_none() {
            fields.push(f);
        }
    }
    let mut out = vec![format!("$select={}", keys::encode(&fields.join(",")))];
    if !spec.binds.is_empty() {
        let expand: Vec<String> =
            spec.binds.iter().map(|b| format!("{}($select={})", b.navigation, b.key_fields.join(","))).collect();
        out.push(format!("$expand={}", keys::encode(&expand.join(","))));
    }
    out
}

/// The bound fields of an entity as read: the expanded parent's key values, all null when the
/// lookup is empty, absent when the service did not expand it.
pub fn read(entity: &RawEntity, spec: &EntitySpec, out: &mut BTreeMap<String, Value>) -> Result<(), String> {
    for b in &spec.binds {
        let Some(raw) = entity.get(&b.navigation) else { continue };
        let parent: Option<HashMap<String, Box<RawValue>>> = serde_json::from_str(raw.get())
            .map_err(|e| format!("{}: the expanded {} is not an entity: {e}", spec.name, b.navigation))?;
        for (field, key_field) in b.fields.iter().zip(&b.key_fields) {
            let v = match parent.as_ref().and_then(|p| p.get(key_field)) {
                Some(r) => value_of(r).map_err(|e| format!("{}: {}/{key_field}: {e}", spec.name, b.navigation))?,
                None => Value::Null,
            };
            out.insert(field.clone(), v);
        }
    }
    Ok(())
}

/// The parent's address for `@odata.bind`, relative to the service root
/// (`accounts(accountnumber='A-1')`), or `None` for an empty lookup.
pub fn address(b: &Bind, values: &[&Value], flavor: Flavor) -> Result<Option<String>, String> {
    let texts: Vec<Option<String>> = values.iter().map(|v| key_text(v)).collect();
    if texts.iter().all(Option::is_none) {
        return Ok(None);
    }
    let Some(texts) = texts.into_iter().collect::<Option<Vec<String>>>() else {
        return Err(format!("lookup {}: the parent key is partly empty", b.navigation));
    };
    let key = Key(texts);
    if !keys::addressable(flavor, &key) {
        return Err(format!(
            "lookup {}: the parent key {key} holds a character {} cannot take in a URL (one of / < > * % & : \\ ? +)",
            b.navigation,
            flavor.as_str()
        ));
    }
    let kinds: Vec<KeyKind> = values.iter().map(|v| KeyKind::of_json(&v.to_string(), flavor)).collect();
    let pred = keys::predicate(&b.key_fields, &kinds, &key).map_err(|e| format!("lookup {}: {e}", b.navigation))?;
    Ok(Some(format!("{}{pred}", keys::encode(&b.entity))))
}

/// A request body: the fields to write except `leave_out`, each bind written as
/// `<navigation>@odata.bind` (null empties the lookup). A bind whose fields are not all being
/// written is left as it is.
pub fn body(
    fields: &BTreeMap<String, Value>,
    leave_out: &[String],
    spec: &EntitySpec,
    flavor: Flavor,
) -> Result<Vec<u8>, String> {
    let mut map: Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !leave_out.contains(k) && spec.bind_of(k).is_none())
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for b in &spec.binds {
        let values: Option<Vec<&Value>> = b.fields.iter().map(|f| fields.get(f)).collect();
        let Some(values) = values else { continue };
        let target = address(b, &values, flavor)?;
        map.insert(format!("{}@odata.bind", b.navigation), target.map_or(Value::Null, Value::String));
    }
    Ok(serde_json::to_vec(&Value::Object(map)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn contacts() -> EntitySpec {
        EntitySpec {
            name: "contacts".into(),
            key_fields: vec!["emailaddress1".into()],
            fields: vec!["fullname".into(), "parentcustomerid".into()],
            binds: vec![Bind {
                fields: vec!["parentcustomerid".into()],
                navigation: "parentcustomerid_account".into(),
                entity: "accounts".into(),
                key_fields: vec!["accountnumber".into()],
            }],
        }
    }

    #[test]
    fn bodies_leave_out_what_the_url_names() {
        let f: BTreeMap<String, Value> = [("k".to_string(), json!("A")), ("v".to_string(), json!(1.5))].into();
        let spec = EntitySpec::default();
        assert_eq!(body(&f, &["k".into()], &spec, Flavor::Generic).unwrap(), br#"{"v":1.5}"#);
        assert_eq!(body(&f, &[], &spec, Flavor::Generic).unwrap(), br#"{"k":"A","v":1.5}"#);
    }

    #[test]
    fn bound_fields_are_expanded_not_selected() {
        let q = projection(&contacts());
        assert_eq!(q[0], "$select=emailaddress1,fullname");
        assert_eq!(q[1], "$expand=parentcustomerid_account(%24select=accountnumber)");
    }

    #[test]
    fn the_expanded_parent_gives_its_key_and_an_empty_lookup_gives_null() {
        let spec = contacts();
        let e: RawEntity = serde_json::from_str(
            r#"{"emailaddress1":"a@x","_parentcustomerid_value":"00000000-0000-0000-0000-000000000001",
                "parentcustomerid_account":{"accountnumber":"A-1","accountid":"00000000-0000-0000-0000-000000000001"}}"#,
        )
        .unwrap();
        let mut out = BTreeMap::new();
        read(&e, &spec, &mut out).unwrap();
        assert_eq!(out["parentcustomerid"], json!("A-1"));
        let e: RawEntity = serde_json::from_str(r#"{"parentcustomerid_account":null}"#).unwrap();
        read(&e, &spec, &mut out).unwrap();
        assert_eq!(out["parentcustomerid"], Value::Null);
        let e: RawEntity = serde_json::from_str(r#"{"parentcustomerid_account":[1]}"#).unwrap();
        let err = read(&e, &spec, &mut out).unwrap_err();
        assert!(err.contains("parentcustomerid_account is not an entity"), "{err}");
    }

    #[test]
    fn writes_bind_to_the_parents_alternate_key() {
        let spec = contacts();
        let mut f = BTreeMap::new();
        f.insert("emailaddress1".to_string(), json!("a@x"));
        f.insert("fullname".to_string(), json!("Ann"));
        f.insert("parentcustomerid".to_string(), json!("A-1 'x'"));
        let b: Value =
            serde_json::from_slice(&body(&f, &["emailaddress1".into()], &spec, Flavor::Dataverse).unwrap()).unwrap();
        assert_eq!(
            b,
            json!({"fullname": "Ann", "parentcustomerid_account@odata.bind": "accounts(accountnumber='A-1%20''x''')"})
        );
        f.insert("parentcustomerid".to_string(), Value::Null);
        let b: Value = serde_json::from_slice(&body(&f, &[], &spec, Flavor::Dataverse).unwrap()).unwrap();
        assert_eq!(b["parentcustomerid_account@odata.bind"], Value::Null);
        f.remove("parentcustomerid");
        let b: Value = serde_json::from_slice(&body(&f, &[], &spec, Flavor::Dataverse).unwrap()).unwrap();
        assert!(b.get("parentcustomerid_account@odata.bind").is_none());
    }

    #[test]
    fn a_parent_key_no_url_can_carry_is_refused_by_name() {
        let spec = contacts();
        let mut f = BTreeMap::new();
        f.insert("parentcustomerid".to_string(), json!("A/1"));
        let err = body(&f, &[], &spec, Flavor::Dataverse).unwrap_err();
        assert!(err.contains("lookup parentcustomerid_account") && err.contains("cannot take in a URL"), "{err}");
    }
}
