//! Integration keys as OData sees them: key predicates (`accounts(accountnumber='A-1')`), the
//! `$filter` that reads many keys at once, and which key values a URL cannot carry.
//!
//! A [`Key`] holds canonical text only; the literal form depends on the property's type
//! ([`KeyKind`]): strings quoted with `'` doubled, numbers, GUIDs and booleans bare (OData v4.01
//! ABNF, `primitiveLiteral`). The connector learns each key field's kind from the JSON of the
//! records the service sends (a number is a number; a Dataverse GUID is a GUID).
use serde_json::Value;

use crate::domain::change::Key;
use crate::domain::job::Flavor;

/// The type of a key property, as far as its literal form goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    String,
    Number,
    Guid,
    Bool,
}

impl KeyKind {
    /// The kind of a key property from the raw JSON the service sent for it (a decimal too
    /// long for a float is still a number here, though [`super::values`] reads it as text).
    /// Dataverse's record ids and lookup values are `Edm.Guid`, sent as GUID text; elsewhere
    /// GUID text may be a string property, which must stay quoted.
    pub fn of_json(raw: &str, flavor: Flavor) -> KeyKind {
        let raw = raw.trim();
        match raw.as_bytes().first() {
            Some(b'-' | b'0'..=b'9') => KeyKind::Number,
            Some(b't' | b'f') => KeyKind::Bool,
            _ => match serde_json::from_str::<Value>(raw) {
                Ok(Value::String(s)) if flavor == Flavor::Dataverse && is_guid(&s) => KeyKind::Guid,
                _ => KeyKind::String,
            },
        }
    }
}

/// Why a key cannot be written as a literal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key field `{field}` is a {kind} on the service, but the key's value is not one")]
    NotOfKind { field: String, kind: &'static str },
    #[error("the key has {got} value(s) for {want} key field(s)")]
    Arity { got: usize, want: usize },
}

pub fn is_guid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// JSON number grammar (the form canonical key text takes for numbers).
pub fn is_number(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, rest) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    if int.is_empty() || (int.len() > 1 && int.starts_with('0')) {
        return false;
    }
    let rest = match rest.strip_prefix('.') {
        Some(r) => {
            let n = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            if n == 0 {
                return false;
            }
            &r[n..]
        }
        None => rest,
    };
    match rest.strip_prefix(['e', 'E']) {
        Some(e) => {
            let e = e.strip_prefix(['+', '-']).unwrap_or(e);
            !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
        }
        None => rest.is_empty(),
    }
}

/// The OData literal of one key value (not yet percent-encoded).
pub fn literal(field: &str, text: &str, kind: KeyKind) -> Result<String, KeyError> {
    let bad = |kind: &'static str| KeyError::NotOfKind { field: field.to_string(), kind };
    match kind {
        KeyKind::String => Ok(format!("'{}'", text.replace('\'', "''"))),
        KeyKind::Number if is_number(text) => Ok(text.to_string()),
        KeyKind::Number => Err(bad("number")),
        KeyKind::Guid if is_guid(text) => Ok(text.to_ascii_lowercase()),
        KeyKind::Guid => Err(bad("GUID")),
        KeyKind::Bool if text == "true" || text == "false" => Ok(text.to_string()),
        KeyKind::Bool => Err(bad("boolean")),
    }
}

/// Percent-encodes text for a URL path segment or query value: everything but RFC 3986's
/// unreserved characters and the quote and parentheses OData's syntax is made of.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'\'' | b'(' | b')' | b',' | b'=' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The key predicate, percent-encoded: `(accountnumber='A-1')`, `(dataAreaId='usmf',Id=7)`.
/// Named pairs even for one key field: a Dataverse alternate key must be named, and OData
/// services accept the named form of a single key too.
pub fn predicate(fields: &[String], kinds: &[KeyKind], key: &Key) -> Result<String, KeyError> {
    if key.0.len() != fields.len() {
        return Err(KeyError::Arity { got: key.0.len(), want: fields.len() });
    }
    let mut parts = Vec::with_capacity(fields.len());
    for ((field, kind), text) in fields.iter().zip(kinds).zip(&key.0) {
        parts.push(format!("{}={}", encode(field), encode(&literal(field, text, *kind)?)));
    }
    Ok(format!("({})", parts.join(",")))
}

/// A `$filter` expression matching any of `keys` (not encoded): `a eq 'x' or a eq 'y'`, or
/// `(a eq 'x' and b eq 1) or (...)` for composite keys. `or` chains rather than 4.01's `in`:
/// Dataverse speaks OData 4.0.
pub fn filter(fields: &[String], kinds: &[KeyKind], keys: &[&Key]) -> Result<String, KeyError> {
    let mut terms = Vec::with_capacity(keys.len());
    for key in keys {
        if key.0.len() != fields.len() {
            return Err(KeyError::Arity { got: key.0.len(), want: fields.len() });
        }
        let mut eqs = Vec::with_capacity(fields.len());
        for ((field, kind), text) in fields.iter().zip(kinds).zip(&key.0) {
            eqs.push(format!("{field} eq {}", literal(field, text, *kind)?));
        }
        terms.push(if eqs.len() == 1 { eqs.remove(0) } else { format!("({})", eqs.join(" and ")) });
    }
    Ok(terms.join(" or "))
}

/// Characters Dataverse (and fno, both behind IIS) cannot take in a key value in a URL, even
/// percent-encoded: such a record is read through `$filter` and written through its id.
const UNADDRESSABLE: &[char] = &['/', '<', '>', '*', '%', '&', ':', '\\', '?', '+'];

/// Whether this flavor can address the key in a URL path.
pub fn addressable(flavor: Flavor, key: &Key) -> bool {
    match flavor {
        Flavor::Dataverse | Flavor::Fno => !key.0.iter().any(|v| v.contains(UNADDRESSABLE)),
        Flavor::Generic => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(parts: &[&str]) -> Key {
        Key(parts.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn literals_quote_strings_and_leave_numbers_guids_and_booleans_bare() {
        assert_eq!(literal("f", "O'Brien", KeyKind::String).unwrap(), "'O''Brien'");
        assert_eq!(literal("f", "42", KeyKind::Number).unwrap(), "42");
        assert_eq!(literal("f", "-1.25", KeyKind::Number).unwrap(), "-1.25");
        let g = "6F9619FF-8B86-D011-B42D-00C04FC964FF";
        assert_eq!(literal("f", g, KeyKind::Guid).unwrap(), g.to_ascii_lowercase());
        assert_eq!(literal("f", "true", KeyKind::Bool).unwrap(), "true");
        assert!(literal("f", "4 2", KeyKind::Number).is_err());
        assert!(literal("f", "1; drop", KeyKind::Number).is_err());
        assert!(literal("f", "x", KeyKind::Guid).is_err());
    }

    #[test]
    fn predicates_name_every_field_and_encode_values() {
        let fields = vec!["dataAreaId".to_string(), "CustomerAccount".to_string()];
        let kinds = [KeyKind::String, KeyKind::String];
        assert_eq!(
            predicate(&fields, &kinds, &k(&["usmf", "US-001"])).unwrap(),
            "(dataAreaId='usmf',CustomerAccount='US-001')"
        );
        assert_eq!(
            predicate(&fields, &kinds, &k(&["usmf", "A B/é#"])).unwrap(),
            "(dataAreaId='usmf',CustomerAccount='A%20B%2F%C3%A9%23')"
        );
        assert_eq!(predicate(&fields[..1], &[KeyKind::Number], &k(&["7"])).unwrap(), "(dataAreaId=7)");
        assert_eq!(predicate(&fields, &kinds, &k(&["x"])), Err(KeyError::Arity { got: 1, want: 2 }));
    }

    #[test]
    fn filters_or_the_keys_and_and_the_fields() {
        let one = vec!["accountnumber".to_string()];
        let (a, b) = (k(&["A-1"]), k(&["it's"]));
        assert_eq!(
            filter(&one, &[KeyKind::String], &[&a, &b]).unwrap(),
            "accountnumber eq 'A-1' or accountnumber eq 'it''s'"
        );
        let two = vec!["co".to_string(), "n".to_string()];
        let (c, d) = (k(&["usmf", "1"]), k(&["demf", "2"]));
        assert_eq!(
            filter(&two, &[KeyKind::String, KeyKind::Number], &[&c, &d]).unwrap(),
            "(co eq 'usmf' and n eq 1) or (co eq 'demf' and n eq 2)"
        );
    }

    #[test]
    fn kinds_come_from_the_json_the_service_sends() {
        assert_eq!(KeyKind::of_json("7", Flavor::Fno), KeyKind::Number);
        assert_eq!(KeyKind::of_json("12345678901234567.891", Flavor::Fno), KeyKind::Number);
        assert_eq!(KeyKind::of_json("\"7\"", Flavor::Fno), KeyKind::String);
        let g = "\"6f9619ff-8b86-d011-b42d-00c04fc964ff\"";
        assert_eq!(KeyKind::of_json(g, Flavor::Dataverse), KeyKind::Guid);
        assert_eq!(KeyKind::of_json(g, Flavor::Generic), KeyKind::String);
        assert_eq!(KeyKind::of_json("true", Flavor::Generic), KeyKind::Bool);
    }

    #[test]
    fn dataverse_and_fno_cannot_address_some_characters() {
        assert!(addressable(Flavor::Dataverse, &k(&["A-1", "x y"])));
        for c in ["a/b", "a<b", "a>b", "a*b", "50%", "a&b", "a:b", "a\\b", "a?b", "a+b"] {
            assert!(!addressable(Flavor::Dataverse, &k(&[c])), "{c}");
            assert!(!addressable(Flavor::Fno, &k(&[c])), "{c}");
            assert!(addressable(Flavor::Generic, &k(&[c])), "{c}");
        }
    }

    #[test]
    fn number_grammar() {
        for ok in ["0", "7", "-7", "1.5", "1e10", "1.5E-3"] {
            assert!(is_number(ok), "{ok}");
        }
        for bad in ["", "-", "01", "1.", ".5", "1e", "NaN", "1 ", "0x10"] {
            assert!(!is_number(bad), "{bad}");
        }
    }
}
