//! A Dataverse webhook: the JSON of a `RemoteExecutionContext` (the same body Dataverse sends
//! to Azure Service Bus).
//!
//! - `MessageName` Create and Update are upserts, Delete a delete; other messages are refused
//!   (the step is registered on the wrong message).
//! - `PrimaryEntityName` (the logical name, `account`) names the entity; `PrimaryEntityId` the
//!   record. The integration key is read from the record's attributes, first of the post image
//!   (`PostEntityImages`), then the `Target` of `InputParameters`, then the pre image (a delete
//!   carries its key only there). Attributes are `{key, value}` pairs; a typed value is an
//!   object with `__type` (`OptionSetValue`, `Money`: its `Value`; an `EntityReference` cannot
//!   be an integration key).
//! - When the key fields are not all there (an update's `Target` holds only what changed; with
//!   `x-ms-dynamics-msg-size-exceeded` Dataverse strips the images and parameters, and what is
//!   left is not trusted for the key), the record is named by id ([`RecordRef::Id`]): its key
//!   must be read back.
//! - `CorrelationId` is the transaction: one user action and the plug-in steps it sets off share
//!   it. Capture takes one message per transaction id, so the operation's own id follows it
//!   (`<CorrelationId>/<OperationId or RequestId>`): two operations of one action stay two
//!   messages, and a retry of one delivery is the same message.
//! - `RowVersion` is the seq, and the record's version is Dataverse's etag for it, `W/"<n>"`.
use serde_json::Value;

use super::{dotnet_date, err, json, key_value, kind, opt_string, string, whole, EntityKeys, Event};
use super::{IngressError, RecordRef, Reference};
use crate::domain::change::{Key, Operation};

/// The header Dataverse sets when the context was too large and its images were removed.
pub const SIZE_EXCEEDED_HEADER: &str = "x-ms-dynamics-msg-size-exceeded";

/// Parses a webhook body. `mapped` gives the map entity and key fields of a logical name, or
/// `None` for an entity the job does not map; `size_exceeded` is whether the request had
/// [`SIZE_EXCEEDED_HEADER`]; `now_ms` is used when the context has no `OperationCreatedOn`.
pub fn parse(
    body: &[u8],
    mapped: &dyn Fn(&str) -> Option<EntityKeys>,
    size_exceeded: bool,
    now_ms: i64,
) -> Result<Event, IngressError> {
    let ctx = json(body)?;
    if !ctx.is_object() {
        return Err(err("(body)", format!("must be a RemoteExecutionContext object, found {}", kind(&ctx))));
    }
    let message = string(&ctx, "", "MessageName")?;
    let op = match message {
        "Create" | "Update" => Operation::Upsert,
        "Delete" => Operation::Delete,
        other => {
            return Err(err(
                "MessageName",
                format!("'{other}' is not a change dualsync captures: register the step on Create, Update or Delete"),
            ))
        }
    };
    let logical = string(&ctx, "", "PrimaryEntityName")?;
    let id = string(&ctx, "", "PrimaryEntityId")?;
    if !super::is_guid(id) {
        return Err(err("PrimaryEntityId", "must be a GUID"));
    }
    let correlation = string(&ctx, "", "CorrelationId")?;
    let operation = match opt_string(&ctx, "", "OperationId")? {
        Some(o) => Some(o),
        None => opt_string(&ctx, "", "RequestId")?,
    };
    let txid = match operation {
        Some(o) => format!("{correlation}/{o}"),
        None => format!("{correlation}/{message}:{id}"),
    };
    let depth = match ctx.get("Depth") {
        None | Some(Value::Null) => None,
        Some(d) => Some(u32::try_from(whole(d, "Depth")?).map_err(|_| err("Depth", "is too large"))?),
    };
    let user = match opt_string(&ctx, "", "InitiatingUserId")? {
        Some(u) => Some(u.to_string()),
        None => opt_string(&ctx, "", "UserId")?.map(str::to_string),
    };
    let at_ms = match opt_string(&ctx, "", "OperationCreatedOn")? {
        Some(t) => {
            dotnet_date(t).ok_or_else(|| err("OperationCreatedOn", "must be a date like /Date(1700000000000)/"))?
        }
        None => now_ms,
    };
    let Some(keys) = mapped(logical) else {
        // Not an error: the step may be registered on more tables than the job maps.
        return Ok(Event { txid, changes: vec![], user, depth, ignored: vec![logical.to_string()] });
    };

    // Where the record's attributes are, most complete first.
    let mut sources: Vec<(String, &Value)> = Vec::new();
    for (list, at) in [("PostEntityImages", "PostEntityImages"), ("InputParameters", "InputParameters")] {
        for (i, (name, entity)) in pairs(&ctx, list)?.into_iter().enumerate() {
            if list == "InputParameters" && name != "Target" {
                continue;
            }
            sources.push((format!("{at}[{i}].value"), entity));
        }
    }
    for (i, (_, entity)) in pairs(&ctx, "PreEntityImages")?.into_iter().enumerate() {
        sources.push((format!("PreEntityImages[{i}].value"), entity));
    }

    let mut found: Vec<Option<String>> = vec![None; keys.key_fields.len()];
    let mut row_version: Option<u64> = None;
    for (at, entity) in &sources {
        if !entity.is_object() {
            // A Delete's Target is an EntityReference: an object too; anything else is wrong.
            return Err(err(at.clone(), format!("must be an entity object, found {}", kind(entity))));
        }
        if let Some(rv) = entity.get("RowVersion").filter(|v| !v.is_null()) {
            let rv = whole(rv, &format!("{at}.RowVersion"))?;
            row_version = Some(row_version.map_or(rv, |r| r.max(rv)));
        }
        for (j, (name, value)) in pairs(entity, "Attributes").map_err(|e| nest(at, e))?.into_iter().enumerate() {
            let Some(k) = keys.key_fields.iter().position(|f| f == name) else { continue };
            if found[k].is_some() {
                continue;
            }
            found[k] = Some(attribute_text(value, &format!("{at}.Attributes[{j}].value"), name)?);
        }
    }
    let record = match found.into_iter().collect::<Option<Vec<String>>>() {
        // A context cut for size is not trusted for the key, whatever is left of it.
        Some(key) if !size_exceeded => RecordRef::Key(Key(key)),
        // Stripped or partial: named by id, its key read back from Dataverse.
        _ => RecordRef::Id(id.to_ascii_lowercase()),
    };
    Ok(Event {
        txid,
        changes: vec![Reference {
            entity: keys.entity,
            record,
            op,
            seq: row_version,
            version: row_version.map(|rv| format!("W/\"{rv}\"")),
            company: None,
            at_ms,
        }],
        user,
        depth,
        ignored: vec![],
    })
}

/// A list of `{key, value}` pairs (`InputParameters`, images, `Attributes`); absent or null is
/// empty.
fn pairs<'a>(obj: &'a Value, name: &str) -> Result<Vec<(&'a str, &'a Value)>, IngressError> {
    let list = match obj.get(name) {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Array(a)) => a,
        Some(other) => return Err(err(name, format!("must be a list of key/value pairs, found {}", kind(other)))),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, p) in list.iter().enumerate() {
        let at = format!("{name}[{i}]");
        let key = match p.get("key") {
            Some(Value::String(k)) => k.as_str(),
            Some(other) => return Err(err(format!("{at}.key"), format!("must be a string, found {}", kind(other)))),
            None => return Err(err(at, "must be a key/value pair: {\"key\": ..., \"value\": ...}")),
        };
        out.push((key, p.get("value").unwrap_or(&Value::Null)));
    }
    Ok(out)
}

fn nest(at: &str, e: IngressError) -> IngressError {
    err(format!("{at}.{}", e.at), e.message)
}

/// A key attribute's value as key text: plain JSON values as they are, typed values by their
/// `Value`; a lookup or an empty value cannot be an integration key.
fn attribute_text(v: &Value, at: &str, name: &str) -> Result<String, IngressError> {
    let plain = match v {
        Value::Object(o) => {
            let t = o.get("__type").and_then(Value::as_str).unwrap_or_default();
            if t.starts_with("EntityReference") {
                return Err(err(at, format!("key field '{name}' is a lookup: it cannot be an integration key")));
            }
            match o.get("Value") {
                Some(inner) if !inner.is_object() && !inner.is_array() => inner,
                _ => return Err(err(at, format!("key field '{name}' has a value of a kind dualsync cannot key by"))),
            }
        }
        Value::Array(_) => return Err(err(at, format!("key field '{name}' is a list"))),
        other => other,
    };
    key_value(plain).ok_or_else(|| err(at, format!("key field '{name}' is empty")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mapped(logical: &str) -> Option<EntityKeys> {
        match logical {
            "account" => Some(EntityKeys { entity: "accounts".into(), key_fields: vec!["accountnumber".into()] }),
            _ => None,
        }
    }

    const ID: &str = "ab89c994-065d-f011-bec2-000d3ac241ab";

    fn context(message: &str, target: Value, post: Value) -> Value {
        json!({
            "BusinessUnitId": "55adc078-92be-e911-a837-000d3a2aabe6",
            "CorrelationId": "fc65709c-7b89-460a-bafc-7193dd5f7c5b",
            "Depth": 1,
            "InitiatingUserId": "f88d0d38-940d-ed11-82e4-000d3a2fc6ad",
            "InputParameters": [{"key": "Target", "value": target}],
            "MessageName": message,
            "OperationCreatedOn": "/Date(1752094336000+0000)/",
            "OperationId": "b389c994-065d-f011-bec2-000d3ac241ab",
            "PostEntityImages": post,
            "PreEntityImages": [],
            "PrimaryEntityId": ID,
            "PrimaryEntityName": "account",
            "Stage": 40
        })
    }

    fn entity(attrs: Value, row_version: Value) -> Value {
        json!({"__type": "Entity:http://schemas.microsoft.com/xrm/2011/Contracts", "Attributes": attrs,
               "Id": ID, "LogicalName": "account", "RowVersion": row_version})
    }

    fn parse_value(v: &Value) -> Result<Event, IngressError> {
        parse(v.to_string().as_bytes(), &mapped, false, 5)
    }

    #[test]
    fn a_create_is_an_upsert_keyed_by_the_target_attributes() {
        let target = entity(
            json!([{"key": "accountnumber", "value": "A-1"}, {"key": "name", "value": "secret name"},
                   {"key": "creditlimit", "value": {"__type": "Money:http://schemas.microsoft.com/xrm/2011/Contracts", "Value": 8}}]),
            json!("812345"),
        );
        let e = parse_value(&context("Create", target, json!([]))).unwrap();
        assert_eq!(e.txid, "fc65709c-7b89-460a-bafc-7193dd5f7c5b/b389c994-065d-f011-bec2-000d3ac241ab");
        assert_eq!((e.depth, e.user.as_deref()), (Some(1), Some("f88d0d38-940d-ed11-82e4-000d3a2fc6ad")));
        let c = &e.changes[0];
        assert_eq!(c.entity, "accounts");
        assert_eq!(c.record, RecordRef::Key(Key(vec!["A-1".into()])));
        assert_eq!(
            (c.op, c.seq, c.version.as_deref(), c.at_ms),
            (Operation::Upsert, Some(812345), Some("W/\"812345\""), 1_752_094_336_000)
        );
        let n = e.notification("j", "dv", 0).unwrap();
        assert!(!serde_json::to_string(&n).unwrap().contains("secret"), "references only");
    }

    #[test]
    fn an_update_without_the_key_in_target_takes_it_from_the_post_image_or_by_id() {
        let target = entity(json!([{"key": "name", "value": "x"}]), Value::Null);
        let post = json!([{"key": "AsynchronousStepPrimaryName", "value": entity(
            json!([{"key": "accountnumber", "value": {"__type": "OptionSetValue:x", "Value": 7}}]), json!(9))}]);
        let e = parse_value(&context("Update", target.clone(), post)).unwrap();
        assert_eq!(e.changes[0].record, RecordRef::Key(Key(vec!["7".into()])));
        assert_eq!(e.changes[0].seq, Some(9));
        // Images stripped (x-ms-dynamics-msg-size-exceeded): named by id, to be read back,
        // even if what is left of the context holds the key fields.
        let mut ctx = context("Update", target, json!([]));
        ctx["InputParameters"] = json!([]);
        let e = parse(ctx.to_string().as_bytes(), &mapped, true, 5).unwrap();
        assert_eq!(e.changes[0].record, RecordRef::Id(ID.into()));
        assert!(e.notification("j", "dv", 0).is_err());
        let whole = entity(json!([{"key": "accountnumber", "value": "A-1"}]), Value::Null);
        let cut = context("Update", whole, json!([]));
        let e = parse(cut.to_string().as_bytes(), &mapped, true, 5).unwrap();
        assert_eq!(e.changes[0].record, RecordRef::Id(ID.into()));
    }

    #[test]
    fn a_delete_takes_its_key_from_the_pre_image() {
        let target = json!({"__type": "EntityReference:http://schemas.microsoft.com/xrm/2011/Contracts",
                            "Id": ID, "LogicalName": "account", "Name": null});
        let mut ctx = context("Delete", target, json!([]));
        ctx["PreEntityImages"] =
            json!([{"key": "pre", "value": entity(json!([{"key": "accountnumber", "value": "A-9"}]), Value::Null)}]);
        let e = parse_value(&ctx).unwrap();
        assert_eq!(
            (e.changes[0].op, &e.changes[0].record),
            (Operation::Delete, &RecordRef::Key(Key(vec!["A-9".into()])))
        );
    }

    #[test]
    fn bad_input_says_what_and_where() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (json!([]), "(body)", "must be a RemoteExecutionContext object"),
            (json!({"MessageName": "Create"}), "(body)", "'PrimaryEntityName' is missing"),
            (context("Assign", json!({}), json!([])), "MessageName", "'Assign' is not a change"),
            (
                {
                    let mut c = context("Create", json!({}), json!([]));
                    c["PrimaryEntityId"] = json!("x");
                    c
                },
                "PrimaryEntityId",
                "must be a GUID",
            ),
            (context("Create", json!(3), json!([])), "InputParameters[0].value", "must be an entity object"),
            (
                context("Create", entity(json!({}), Value::Null), json!([])),
                "InputParameters[0].value.Attributes",
                "must be a list",
            ),
            (
                context(
                    "Create",
                    entity(
                        json!([{"key": "accountnumber", "value": {"__type": "EntityReference:x", "Id": ID}}]),
                        Value::Null,
                    ),
                    json!([]),
                ),
                "InputParameters[0].value.Attributes[0].value",
                "is a lookup",
            ),
            (
                context("Create", entity(json!([{"key": "accountnumber", "value": ""}]), Value::Null), json!([])),
                "InputParameters[0].value.Attributes[0].value",
                "is empty",
            ),
            (
                context("Create", entity(json!([]), json!("-1")), json!([])),
                "InputParameters[0].value.RowVersion",
                "whole number",
            ),
            (
                {
                    let mut c = context("Create", json!({}), json!([]));
                    c["Depth"] = json!("deep");
                    c
                },
                "Depth",
                "whole number",
            ),
            (
                {
                    let mut c = context("Create", json!({}), json!([]));
                    c["PostEntityImages"] = json!([{"value": 1}]);
                    c
                },
                "PostEntityImages[0]",
                "key/value",
            ),
        ];
        for (v, at, message) in cases {
            let e = parse_value(&v).unwrap_err();
            assert!(e.at == at && e.message.contains(message), "wanted {at}: {message}; got {e}");
        }
        assert_eq!(parse(b"{", &mapped, false, 0).unwrap_err().at, "(body)");
    }

    #[test]
    fn an_entity_the_job_does_not_map_is_ignored_by_name() {
        let mut c = context("Create", json!({}), json!([]));
        c["PrimaryEntityName"] = json!("lead");
        let e = parse_value(&c).unwrap();
        assert!(e.changes.is_empty());
        assert_eq!(e.ignored, ["lead"]);
    }
}
