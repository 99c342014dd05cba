//! OData JSON payloads to records and back, with one canonical form per value.
//!
//! Numbers are read from their text (serde_json's `RawValue`), never through a float: an
//! `Edm.Decimal` or money value `12.50` and `12.5` are the same decimal, written `12.5`; a
//! value is a JSON number when that canonical text is exactly a number serde_json holds
//! (integers, and decimals whose shortest float text is the same text), and otherwise its
//! canonical text as a string, which [`crate::domain::canon`] compares with numbers by text.
//! So a round trip through Dataverse or fno compares equal, and no decimal is ever rounded.
//! Strings (dates, GUIDs, choice labels) are kept as the service writes them; booleans,
//! null, complex values as they are.
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};

use super::keys::KeyKind;
use crate::domain::canon::key_text;
use crate::domain::change::Key;
use crate::domain::job::Flavor;
use crate::ports::{EntitySpec, Record};

/// A number's canonical decimal text: no exponent, no leading zeros, no trailing zeros after
/// the point, no point without a fraction, no `-0`. `None` when `text` is not a JSON number.
pub fn canonical_decimal(text: &str) -> Option<String> {
    if !super::keys::is_number(text) {
        return None;
    }
    let (neg, body) = match text.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, text),
    };
    let (mantissa, exp) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], body[i + 1..].parse::<i64>().ok()?),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    // The decimal point sits after `point` digits of `digits`.
    let point = int.len() as i64 + exp;
    if point.abs() > 10_000 {
        return None; // not a value any service stores; refuse rather than build huge text
    }
    let (mut whole, mut fraction) = if point <= 0 {
        (String::from("0"), format!("{}{digits}", "0".repeat((-point) as usize)))
    } else if point as usize >= digits.len() {
        (format!("{digits}{}", "0".repeat(point as usize - digits.len())), String::new())
    } else {
        (digits[..point as usize].to_string(), digits[point as usize..].to_string())
    };
    let trimmed = whole.trim_start_matches('0');
    whole = if trimmed.is_empty() { "0".into() } else { trimmed.to_string() };
    fraction.truncate(fraction.trim_end_matches('0').len());
    let zero = whole == "0" && fraction.is_empty();
    let sign = if neg && !zero { "-" } else { "" };
    Some(if fraction.is_empty() { format!("{sign}{whole}") } else { format!("{sign}{whole}.{fraction}") })
}

/// The value of a JSON number given as text (see the module doc).
pub fn number_value(text: &str) -> Option<Value> {
    let canon = canonical_decimal(text)?;
    if !canon.contains('.') {
        if let Ok(i) = canon.parse::<i64>() {
            return Some(Value::from(i));
        }
        if let Ok(u) = canon.parse::<u64>() {
            return Some(Value::from(u));
        }
    } else if let Some(n) = canon.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
        if n.to_string() == canon {
            return Some(Value::Number(n));
        }
    }
    Some(Value::String(canon))
}

/// The value of one property as the service sent it.
pub fn value_of(raw: &RawValue) -> Result<Value, serde_json::Error> {
    let text = raw.get().trim();
    if text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        if let Some(v) = number_value(text) {
            return Ok(v);
        }
    }
    serde_json::from_str(text)
}

/// One entity as sent: its properties, raw.
pub type RawEntity = HashMap<String, Box<RawValue>>;

/// A collection response (`{"value": [...], "@odata.nextLink": ...}`).
#[derive(Deserialize)]
pub struct RawPage {
    #[serde(default)]
    pub value: Vec<RawEntity>,
    #[serde(rename = "@odata.nextLink", default)]
    pub next_link: Option<String>,
}

pub fn parse_page(body: &[u8]) -> Result<RawPage, serde_json::Error> {
    serde_json::from_slice(body)
}

pub fn parse_entity(body: &[u8]) -> Result<RawEntity, serde_json::Error> {
    serde_json::from_slice(body)
}

/// The entity's etag (`@odata.etag`), if it has one.
pub fn etag(entity: &RawEntity) -> Option<String> {
    entity.get("@odata.etag").and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

/// The kinds of the key fields as this entity shows them; `None` when a key field is absent or
/// null (its type cannot be told).
pub fn key_kinds(entity: &RawEntity, spec: &EntitySpec, flavor: Flavor) -> Option<Vec<KeyKind>> {
    spec.key_fields
        .iter()
        .map(|f| entity.get(f).filter(|r| r.get().trim() != "null").map(|r| KeyKind::of_json(r.get(), flavor)))
        .collect()
}

/// The record and its integration key; `None` for the key when a key field is missing or
/// empty (no integration key: the record is not in the map's scope).
pub fn to_record(entity: &RawEntity, spec: &EntitySpec) -> Result<(Option<Key>, Record), String> {
    let mut fields = BTreeMap::new();
    for name in spec.key_fields.iter().chain(&spec.fields) {
        if fields.contains_key(name) || spec.bind_of(name).is_some() {
            continue;
        }
        if let Some(raw) = entity.get(name) {
            fields.insert(name.clone(), value_of(raw).map_err(|e| format!("{}.{name}: {e}", spec.name))?);
        }
    }
    super::binds::read(entity, spec, &mut fields)?;
    let key: Option<Vec<String>> = spec.key_fields.iter().map(|f| fields.get(f).and_then(key_text)).collect();
    let version = etag(entity).unwrap_or_default();
    Ok((key.map(Key), Record { fields, version, seq: None }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn decimals_have_one_canonical_text() {
        let cases = [
            ("12.50", "12.5"),
            ("12.5", "12.5"),
            ("1000.0000", "1000"),
            ("0.000", "0"),
            ("-0.0", "0"),
            ("007", "007"), // not a JSON number
            ("1e3", "1000"),
            ("1.5E-3", "0.0015"),
            ("-12345678901234567890.123400", "-12345678901234567890.1234"),
            ("0.1", "0.1"),
        ];
        for (input, want) in cases {
            match canonical_decimal(input) {
                Some(got) => assert_eq!(got, want, "{input}"),
                None => assert_eq!(input, want, "{input} should not be a number"),
            }
        }
    }

    #[test]
    fn numbers_never_pass_through_a_float_that_would_change_them() {
        assert_eq!(number_value("42").unwrap(), json!(42));
        assert_eq!(number_value("42.000").unwrap(), json!(42));
        assert_eq!(number_value("1234.56").unwrap(), json!(1234.56));
        assert_eq!(number_value("18446744073709551615").unwrap(), json!(18446744073709551615u64));
        // Too many digits for a float: kept exact, as text.
        assert_eq!(number_value("922337203685477.5807").unwrap(), json!("922337203685477.5807"));
        assert_eq!(number_value("123456789012345678901234").unwrap(), json!("123456789012345678901234"));
    }

    #[test]
    fn records_keep_requested_fields_and_the_etag() {
        let body = br#"{"@odata.etag":"W/\"7\"","accountnumber":"A-1","creditlimit":1000.00,"name":null,"other":1,
            "revenue":922337203685477.5807}"#;
        let e = parse_entity(body).unwrap();
        let spec = EntitySpec {
            name: "accounts".into(),
            key_fields: vec!["accountnumber".into()],
            fields: vec!["creditlimit".into(), "name".into(), "revenue".into()],
            binds: vec![],
        };
        let (key, r) = to_record(&e, &spec).unwrap();
        assert_eq!(key, Some(Key(vec!["A-1".into()])));
        assert_eq!(r.version, "W/\"7\"");
        assert_eq!(r.fields["creditlimit"], json!(1000));
        assert_eq!(r.fields["name"], Value::Null);
        assert_eq!(r.fields["revenue"], json!("922337203685477.5807"));
        assert!(!r.fields.contains_key("other"));
        assert_eq!(key_kinds(&e, &spec, Flavor::Dataverse), Some(vec![KeyKind::String]));
        let null_key = parse_entity(br#"{"accountnumber":null}"#).unwrap();
        assert_eq!(key_kinds(&null_key, &spec, Flavor::Dataverse), None);
        assert_eq!(to_record(&null_key, &spec).unwrap().0, None, "no integration key");
    }

    #[test]
    fn pages_carry_the_next_link() {
        let p = parse_page(br#"{"value":[{"a":1}],"@odata.nextLink":"accounts?$skiptoken=x"}"#).unwrap();
        assert_eq!(p.value.len(), 1);
        assert_eq!(p.next_link.as_deref(), Some("accounts?$skiptoken=x"));
    }
}
