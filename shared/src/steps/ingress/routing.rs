//! Which map an event's entity name stands for, and which events are dualsync's own: pure.
//!
//! An event names its entity its own way: Dataverse by logical name (`account`) where maps name
//! the entity set (`accounts`), fno by data entity (`CustomersV3`) or by business event id
//! (`CustomerCreatedBusinessEvent`). A name matches, in this order: a map side's
//! `event_names`; the entity itself; for Dataverse, the entity set its logical name would have
//! by Dataverse's default plural (`account` → `accounts`, `opportunity` → `opportunities`,
//! `address` → `addresses`). A set named otherwise needs `event_names`.
use super::request::Source;
use crate::domain::ingress::EntityKeys;
use crate::domain::job::{Job, Side, TableMap};

/// The entity and key fields (on `side`) of the map an event of `source` means by `name`;
/// `None` when no map covers it.
pub fn entity_keys(job: &Job, side: Side, source: Source, name: &str) -> Option<EntityKeys> {
    let found = |f: &dyn Fn(&TableMap) -> bool| job.maps.iter().find(|m| f(m));
    let map = found(&|m| m.event_names[side.index()].iter().any(|n| n == name))
        .or_else(|| found(&|m| m.entity(side) == name))
        .or_else(|| match source {
            Source::Dataverse => {
                let sets = default_plurals(name);
                found(&|m| sets.iter().any(|s| s == m.entity(side)))
            }
            Source::Fno | Source::Notification => None,
        })?;
    Some(EntityKeys { entity: map.entity(side).to_string(), key_fields: map.key_fields(side) })
}

/// The entity set names Dataverse gives a table by default, from its logical name.
fn default_plurals(logical: &str) -> Vec<String> {
    let mut out = vec![format!("{logical}s")];
    if logical.ends_with(['s', 'x', 'z']) || logical.ends_with("ch") || logical.ends_with("sh") {
        out.push(format!("{logical}es"));
    }
    if let Some(stem) = logical.strip_suffix('y') {
        if !stem.ends_with(['a', 'e', 'i', 'o', 'u']) {
            out.push(format!("{stem}ies"));
        }
    }
    out
}

/// Whether an event caused by `user` is dualsync's own write (the app config names its user).
/// User ids are GUIDs, which apps write in either case.
pub fn is_own_write(user: Option<&str>, own_user_id: Option<&str>) -> bool {
    matches!((user, own_user_id), (Some(u), Some(own)) if u.trim().eq_ignore_ascii_case(own.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::config::{compile, parse_job};

    fn job() -> Job {
        let yaml = r#"
job: j
apps:
  - { name: fno, connector: sqlite, path: a.db }
  - { name: dv, connector: sqlite, path: b.db }
primary: fno
table_groups:
  - name: g
    maps:
      - name: customers
        sequence: 1
        entities: { fno: CustomersV3, dv: accounts }
        keys: [{ fno: CustomerAccount, dv: accountnumber }]
        event_names: { fno: [CustomerCreatedBusinessEvent] }
      - name: opportunities
        sequence: 2
        entities: { fno: Opps, dv: opportunities }
        keys: [{ fno: Id, dv: oppid }]
      - name: addresses
        sequence: 3
        entities: { fno: Addr, dv: customeraddresses }
        keys: [{ fno: Id, dv: addrid }]
      - name: odd
        sequence: 4
        entities: { fno: Odd, dv: new_oddset }
        keys: [{ fno: Id, dv: oddid }]
        event_names: { dv: [new_odd] }
"#;
        compile("j.yaml", &parse_job("j.yaml", yaml).unwrap()).unwrap()
    }

    fn entity(side: Side, source: Source, name: &str) -> Option<String> {
        entity_keys(&job(), side, source, name).map(|k| k.entity)
    }

    #[test]
    fn dataverse_logical_names_find_their_entity_sets() {
        let dv = |n| entity(Side::B, Source::Dataverse, n);
        assert_eq!(dv("account").as_deref(), Some("accounts"));
        assert_eq!(dv("opportunity").as_deref(), Some("opportunities"));
        assert_eq!(dv("customeraddress").as_deref(), Some("customeraddresses"));
        assert_eq!(dv("new_odd").as_deref(), Some("new_oddset"), "named in event_names");
        assert_eq!(dv("accounts").as_deref(), Some("accounts"), "the set's own name");
        assert_eq!(dv("lead"), None);
        assert_eq!(dv("CustomersV3"), None, "the other app's entity");
        let keys = entity_keys(&job(), Side::B, Source::Dataverse, "account").unwrap();
        assert_eq!(keys.key_fields, ["accountnumber"]);
    }

    #[test]
    fn fno_events_name_the_entity_or_an_event_the_map_lists() {
        let fno = |n| entity(Side::A, Source::Fno, n);
        assert_eq!(fno("CustomersV3").as_deref(), Some("CustomersV3"));
        assert_eq!(fno("CustomerCreatedBusinessEvent").as_deref(), Some("CustomersV3"));
        assert_eq!(fno("CustomersV3s"), None, "no plural guessing outside Dataverse");
        assert_eq!(fno("VendorCreated"), None);
    }

    #[test]
    fn own_writes_are_told_by_user_id_in_any_case() {
        let own = Some("F88D0D38-940D-ED11-82E4-000D3A2FC6AD");
        assert!(is_own_write(Some("f88d0d38-940d-ed11-82e4-000d3a2fc6ad"), own));
        assert!(!is_own_write(Some("00000000-940d-ed11-82e4-000d3a2fc6ad"), own));
        assert!(!is_own_write(None, own));
        assert!(!is_own_write(Some("f88d0d38-940d-ed11-82e4-000d3a2fc6ad"), None));
    }
}
