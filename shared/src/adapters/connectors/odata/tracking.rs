//! Change tracking (OData delta links, as Dataverse serves them): nothing to register in the app.
//!
//! The first request lists the entity set with `Prefer: odata.track-changes`; its pages go on by
//! `@odata.nextLink`, and the last one carries `@odata.deltaLink`. Getting the delta link later
//! gives what changed since: changed records as entities, deleted ones as `$deletedEntity`
//! entries that name the record's id only (OData 4.0 JSON: `"@odata.context": "…/$deletedEntity"`,
//! `id`, `reason`; OData 4.01: `"@removed": {…}` with `@id`, and maybe the key properties), and a
//! new delta link on its last page. A token the service no longer knows (Dataverse:
//! `ExpiredVersionStamp` `0x80044352`, changes kept `ExpireChangeTrackingInDays`; OData: `410
//! Gone`) is [`Tracked::Expired`]: the caller starts again with a full listing.
//!
//! Only the key fields and the fields the caller names are selected: a tracked change is a
//! reference, and delivery reads the record fresh. Dataverse rejects `$filter`, `$orderby`,
//! `$expand` and `$top` with change tracking, so none are sent.
use async_trait::async_trait;
use reqwest::Method;
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use super::errors::{self, classify, ServiceError};
use super::values::{self, RawEntity};
use super::{keys, paging, OdataApp};
use crate::domain::change::Key;
use crate::domain::job::Flavor;
use crate::ports::{ChangeTracking, ConnectorError, EntitySpec, Tracked, TrackedChange, TrackedDelete, TrackedPage};

/// A delta or listing page as sent (`@nextLink`/`@deltaLink` are OData 4.01's short names).
#[derive(Deserialize)]
struct RawDelta {
    #[serde(default)]
    value: Vec<RawEntity>,
    #[serde(rename = "@odata.nextLink", alias = "@nextLink", default)]
    next_link: Option<String>,
    #[serde(rename = "@odata.deltaLink", alias = "@deltaLink", default)]
    delta_link: Option<String>,
}

/// What one entry of a delta page is.
enum Entry {
    Changed(TrackedChange),
    Deleted(TrackedDelete),
    /// An added or deleted link between entities (`$link`, `$deletedLink`): only sent for
    /// expanded navigation properties, which tracking never asks for.
    Link,
}

fn string(entity: &RawEntity, name: &str) -> Option<String> {
    entity.get(name).and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

/// A record id as dualsync keeps it: the key segment of an entity id (`accounts(<guid>)` or
/// `…/accounts('x')` → `<guid>`, `x`), or the text as sent (Dataverse's `$deletedEntity` `id` is
/// the bare GUID); GUIDs lowercased, since Dataverse writes them either way.
pub fn record_id(text: &str) -> String {
    let t = text.trim();
    let inner = match (t.rfind('('), t.ends_with(')')) {
        (Some(i), true) => &t[i + 1..t.len() - 1],
        _ => t,
    };
    let inner = inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')).unwrap_or(inner);
    let guid = inner.len() == 36 && inner.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if guid {
        inner.to_ascii_lowercase()
    } else {
        inner.to_string()
    }
}

/// The change number a Dataverse etag carries (`W/"915244"` → 915244).
pub fn etag_seq(etag: &str) -> Option<u64> {
    let t = etag.trim().trim_start_matches("W/").trim_matches('"');
    t.parse().ok()
}

fn entry(e: &RawEntity, spec: &EntitySpec, id_field: Option<&str>) -> Result<Entry, String> {
    let context = string(e, "@odata.context").unwrap_or_default();
    if context.ends_with("$link") || context.ends_with("$deletedLink") {
        return Ok(Entry::Link);
    }
    let (_, record) = values::to_record(e, spec)?;
    let key: Option<Vec<String>> =
        spec.key_fields.iter().map(|f| record.fields.get(f).and_then(crate::domain::canon::key_text)).collect();
    let deleted = context.ends_with("$deletedEntity") || e.contains_key("@removed") || e.contains_key("@odata.removed");
    if deleted {
        let id = ["id", "@id", "@odata.id"].iter().find_map(|n| string(e, n)).map(|s| record_id(&s));
        return match (id, key) {
            (Some(id), key) => Ok(Entry::Deleted(TrackedDelete { id, key: key.map(Key) })),
            // A 4.01 deleted entry may name the record by its key properties alone.
            (None, Some(key)) => Ok(Entry::Deleted(TrackedDelete { id: String::new(), key: Some(Key(key)) })),
            (None, None) => Err(format!("{}: a deleted entry names no record (no id, no key fields)", spec.name)),
        };
    }
    let id = id_field
        .and_then(|f| string(e, f))
        .or_else(|| ["@odata.id", "@id"].iter().find_map(|n| string(e, n)))
        .map(|s| record_id(&s));
    let version = values::etag(e);
    Ok(Entry::Changed(TrackedChange {
        id,
        key: key.map(Key),
        seq: version.as_deref().and_then(etag_seq),
        version,
        fields: record.fields.into_iter().filter(|(k, _)| !spec.key_fields.contains(k)).collect(),
    }))
}

/// Reads one delta or listing page. `id_field` is the property holding the record's id
/// (Dataverse's primary id attribute), when the service has one.
pub fn parse_page(body: &[u8], spec: &EntitySpec, id_field: Option<&str>) -> Result<TrackedPage, String> {
    let raw: RawDelta = serde_json::from_slice(body).map_err(|e| format!("unreadable delta page: {e}"))?;
    let mut page = TrackedPage { next: raw.next_link, delta: raw.delta_link, ..Default::default() };
    for e in &raw.value {
        match entry(e, spec, id_field)? {
            Entry::Changed(c) => page.changes.push(c),
            Entry::Deleted(d) => page.deletes.push(d),
            Entry::Link => {}
        }
    }
    Ok(page)
}

/// Primary id attributes learnt per (service root, entity set): table metadata, the same for
/// every job of the process.
fn primary_ids() -> &'static Mutex<HashMap<(String, String), String>> {
    static IDS: OnceLock<Mutex<HashMap<(String, String), String>>> = OnceLock::new();
    IDS.get_or_init(|| Mutex::new(HashMap::new()))
}

impl OdataApp {
    /// The property holding a record's id in `entity`: on Dataverse the table's primary id
    /// attribute (`accountid`), asked once of the table definitions, since a `$deletedEntity`
    /// names a record by it alone; other services give ids as `@odata.id`.
    async fn primary_id(&self, entity: &str) -> Result<Option<String>, ConnectorError> {
        if self.flavor() != Flavor::Dataverse {
            return Ok(None);
        }
        let cache_key = (self.t.root.to_string(), entity.to_string());
        if let Some(f) = primary_ids().lock().unwrap_or_else(|e| e.into_inner()).get(&cache_key) {
            return Ok(Some(f.clone()));
        }
        let filter = format!("EntitySetName eq '{}'", entity.replace('\'', "''"));
        let url =
            format!("{}EntityDefinitions?$filter={}&$select=PrimaryIdAttribute", self.t.root, keys::encode(&filter));
        let a = self.t.send(Method::GET, &url, &[], None).await?;
        if !a.ok() {
            return Err(self.failure(&a, &[]));
        }
        let page = values::parse_page(&a.body)
            .map_err(|e| self.t.transient(format!("unreadable table definition: {e}"), None))?;
        let field = page.value.first().and_then(|d| string(d, "PrimaryIdAttribute")).ok_or_else(|| {
            self.t.rejected(format!("{entity}: no table has this entity set name (EntityDefinitions)"))
        })?;
        primary_ids().lock().unwrap_or_else(|e| e.into_inner()).insert(cache_key, field.clone());
        Ok(Some(field))
    }
}

#[async_trait]
impl ChangeTracking for OdataApp {
    fn tracking_app(&self) -> &str {
        &self.t.app
    }

    async fn track(&self, entity: &EntitySpec, from: Option<&str>) -> Result<Tracked, ConnectorError> {
        let id_field = self.primary_id(&entity.name).await?;
        let url = match from {
            Some(link) => paging::resolve(&self.t.root, link).map_err(|m| self.t.rejected(m))?.to_string(),
            None => {
                let mut select: Vec<String> = entity.key_fields.clone();
                for f in entity.fields.iter().chain(&id_field) {
                    if !select.contains(f) {
                        select.push(f.clone());
                    }
                }
                self.url(&keys::encode(&entity.name), &[format!("$select={}", keys::encode(&select.join(",")))])
            }
        };
        // Preferences a service cannot apply to a request are ignored (RFC 7240), so every
        // page asks for tracking and the page size alike.
        let prefer = format!("odata.track-changes,{}", paging::max_page_size(self.spec.page_size));
        let a = self.t.send(Method::GET, &url, &[("Prefer", prefer)], None).await?;
        if !a.ok() {
            let err = ServiceError::parse(&a.body);
            if from.is_some() && errors::delta_expired(a.status, &err) {
                let class = classify(a.status, None, &err);
                return Ok(Tracked::Expired(errors::message(a.status, &err, &class, &[], &self.t.auth_hint)));
            }
            return Err(self.failure(&a, &[]));
        }
        let applied = a.header("preference-applied").unwrap_or_default().to_ascii_lowercase();
        if from.is_none() && !applied.contains("odata.track-changes") {
            return Err(self.t.rejected(format!(
                "{}: the service did not apply odata.track-changes; turn on change tracking for the table \
                 (Dataverse: Track changes, in the table's advanced options)",
                entity.name
            )));
        }
        let mut page = parse_page(&a.body, entity, id_field.as_deref()).map_err(|m| self.t.transient(m, None))?;
        if page.next.is_none() && page.delta.is_none() {
            return Err(self.t.rejected(format!(
                "{}: the last page of changes carries no delta link; is change tracking on for the table?",
                entity.name
            )));
        }
        // Links are kept absolute, checked to stay on the service's origin.
        for link in [&mut page.next, &mut page.delta].into_iter().flatten() {
            *link = paging::resolve(&self.t.root, link).map_err(|m| self.t.rejected(m))?.to_string();
        }
        Ok(Tracked::Page(page))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accounts() -> EntitySpec {
        EntitySpec {
            name: "accounts".into(),
            key_fields: vec!["accountnumber".into()],
            fields: vec!["msdyn_company".into()],
            binds: vec![],
        }
    }

    #[test]
    fn delta_pages_give_changes_with_id_key_and_version_and_deletes_by_id() {
        let body = json!({
            "@odata.context": "https://org.crm.dynamics.com/api/data/v9.2/$metadata#accounts(accountnumber)/$delta",
            "@odata.deltaLink": "https://org.crm.dynamics.com/api/data/v9.2/accounts?$select=accountnumber&$deltatoken=919058%2108%2f22%2f2017",
            "value": [
                {"@odata.etag": "W/\"915244\"", "accountnumber": "A-1", "msdyn_company": "usmf", "name": "x",
                 "accountid": "60C4E274-0D87-E711-80E5-00155DB19E6D"},
                {"@odata.etag": "W/\"915245\"", "accountnumber": null, "accountid": "70c4e274-0d87-e711-80e5-00155db19e6d"},
                {"@odata.context": "https://org.crm.dynamics.com/api/data/v9.2/$metadata#accounts/$deletedEntity",
                 "id": "2e451703-c686-e711-80e5-00155db19e6d", "reason": "deleted"},
                {"@removed": {"reason": "deleted"}, "@id": "accounts(3e451703-c686-e711-80e5-00155db19e6d)"},
                {"@removed": {"reason": "changed"}, "accountnumber": "A-9"},
                {"@odata.context": "#accounts/$deletedLink", "source": "a", "relationship": "r", "target": "b"}
            ]
        });
        let page = parse_page(body.to_string().as_bytes(), &accounts(), Some("accountid")).unwrap();
        assert_eq!(page.next, None);
        assert!(page.delta.as_deref().unwrap().contains("$deltatoken="));
        assert_eq!(page.changes.len(), 2);
        let c = &page.changes[0];
        assert_eq!(c.id.as_deref(), Some("60c4e274-0d87-e711-80e5-00155db19e6d"), "GUIDs are lowercased");
        assert_eq!(c.key, Some(Key(vec!["A-1".into()])));
        assert_eq!((c.version.as_deref(), c.seq), (Some("W/\"915244\""), Some(915244)));
        assert_eq!(c.fields.get("msdyn_company"), Some(&json!("usmf")));
        assert!(!c.fields.contains_key("name"), "only the selected fields");
        assert_eq!(page.changes[1].key, None, "no integration key: outside the map");
        assert_eq!(
            page.deletes,
            vec![
                TrackedDelete { id: "2e451703-c686-e711-80e5-00155db19e6d".into(), key: None },
                TrackedDelete { id: "3e451703-c686-e711-80e5-00155db19e6d".into(), key: None },
                TrackedDelete { id: String::new(), key: Some(Key(vec!["A-9".into()])) },
            ]
        );
    }

    #[test]
    fn listing_pages_carry_a_next_link_and_no_delta_link_until_the_last() {
        let body = br#"{"value":[{"accountnumber":"A-1","@odata.id":"accounts('A-1')"}],
            "@odata.nextLink":"accounts?$select=accountnumber&$skiptoken=2"}"#;
        let page = parse_page(body, &accounts(), None).unwrap();
        assert_eq!(page.next.as_deref(), Some("accounts?$select=accountnumber&$skiptoken=2"));
        assert_eq!(page.delta, None);
        assert_eq!(page.changes[0].id.as_deref(), Some("A-1"), "the entity id's key segment");
        assert_eq!(page.changes[0].seq, None, "no etag, no change number");
        let short = br#"{"value":[],"@deltaLink":"accounts?$deltatoken=5"}"#;
        assert_eq!(parse_page(short, &accounts(), None).unwrap().delta.as_deref(), Some("accounts?$deltatoken=5"));
    }

    #[test]
    fn a_deleted_entry_without_id_or_key_is_refused_by_name() {
        let body = br##"{"value":[{"@odata.context":"#accounts/$deletedEntity","reason":"deleted"}]}"##;
        let err = parse_page(body, &accounts(), Some("accountid")).unwrap_err();
        assert!(err.contains("accounts: a deleted entry names no record"), "{err}");
        assert!(parse_page(b"<html>", &accounts(), None).unwrap_err().starts_with("unreadable delta page"));
    }

    #[test]
    fn record_ids_and_etag_numbers() {
        assert_eq!(
            record_id("https://x/api/data/v9.2/accounts(60C4E274-0D87-E711-80E5-00155DB19E6D)"),
            "60c4e274-0d87-e711-80e5-00155db19e6d"
        );
        assert_eq!(record_id("Customers('ALFKI')"), "ALFKI");
        assert_eq!(record_id(" 42 "), "42");
        assert_eq!(etag_seq("W/\"915244\""), Some(915244));
        assert_eq!(etag_seq("\"abc\""), None);
    }

    #[test]
    fn expired_tokens_are_told_by_the_error_not_the_status_alone() {
        let dv = ServiceError::parse(
            br#"{"error":{"code":"0x80044352","message":"Version stamp associated with the client has expired. Please perform a full sync."}}"#,
        );
        assert!(errors::delta_expired(400, &dv));
        assert!(errors::delta_expired(410, &ServiceError::default()), "OData: a delta link no longer valid");
        assert!(!errors::delta_expired(
            400,
            &ServiceError::parse(br#"{"error":{"code":"0x80060888","message":"bad"}}"#)
        ));
    }
}
