//! The records of one entity set, indexed so that a service of a few hundred thousand records
//! answers in about constant time per record: by normalised key (what a key predicate or a
//! `$filter` of key values names), by record id (Dataverse's GUID), by change number (change
//! tracking pages in change order) and in key order (`$orderby` of the key fields, the
//! connector's listing). Before, every lookup scanned the set: a bulk load or a sync of N
//! records took N² comparisons.
//!
//! Records live in slots numbered in creation order (a number is never reused), so a listing
//! without `$orderby` keeps the order records were made in, and a page ends at a slot number
//! that a later page starts after, whatever was created or deleted meanwhile.
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;

use crate::{norm_key, Kind, Row};

/// Where a record is: its slot number.
pub(crate) type Slot = u64;

#[derive(Debug, Clone)]
pub(crate) struct Rows {
    kind: Kind,
    keys: Vec<String>,
    slots: BTreeMap<Slot, Row>,
    next: Slot,
    /// Normalised key values (case folded for Dataverse, numbers by value) → slot.
    by_key: HashMap<Vec<String>, Slot>,
    /// Record id, lower case → slot.
    by_id: HashMap<String, Slot>,
    /// Change number (the record's etag) → slot.
    by_change: BTreeMap<u64, Slot>,
    /// Key fields in `$orderby` order, then the slot.
    by_order: BTreeSet<(Vec<SortValue>, Slot)>,
}

/// One value as `$orderby` compares it: numbers by value before any text, text by its JSON.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum SortValue {
    Number(f64),
    Text(Option<String>),
}

impl Eq for SortValue {}

impl Ord for SortValue {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (SortValue::Number(a), SortValue::Number(b)) => a.total_cmp(b),
            (SortValue::Number(_), SortValue::Text(_)) => Ordering::Less,
            (SortValue::Text(_), SortValue::Number(_)) => Ordering::Greater,
            (SortValue::Text(a), SortValue::Text(b)) => a.cmp(b),
        }
    }
}

impl PartialOrd for SortValue {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl SortValue {
    /// A property's raw JSON text (or its absence) as `$orderby` sorts it.
    pub(crate) fn of(raw: Option<&String>) -> SortValue {
        match raw.and_then(|s| s.parse::<f64>().ok()) {
            Some(n) => SortValue::Number(n),
            None => SortValue::Text(raw.cloned()),
        }
    }
}

impl Rows {
    pub(crate) fn new(keys: &[String], kind: Kind) -> Rows {
        Rows {
            kind,
            keys: keys.to_vec(),
            slots: BTreeMap::new(),
            next: 0,
            by_key: HashMap::new(),
            by_id: HashMap::new(),
            by_change: BTreeMap::new(),
            by_order: BTreeSet::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// A record's normalised key, as the index holds it.
    fn key_of(&self, props: &BTreeMap<String, String>) -> Vec<String> {
        let raw: Vec<String> = self.keys.iter().map(|k| props.get(k).cloned().unwrap_or_default()).collect();
        norm_key(&raw, self.kind)
    }

    fn order_of(&self, props: &BTreeMap<String, String>) -> Vec<SortValue> {
        self.keys.iter().map(|k| SortValue::of(props.get(k))).collect()
    }

    /// The slot of the record with these key values (raw JSON text each, in key order).
    pub(crate) fn find_key(&self, raw: &[String]) -> Option<Slot> {
        self.by_key.get(&norm_key(raw, self.kind)).copied()
    }

    /// The slot of the record with this id (any case).
    pub(crate) fn find_id(&self, id: &str) -> Option<Slot> {
        self.by_id.get(&id.to_lowercase()).copied()
    }

    /// Every record, in creation order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Row> {
        self.slots.values()
    }

    /// Records after `slot` (all when `None`), in creation order, with their slots.
    pub(crate) fn after_slot(&self, slot: Option<Slot>) -> impl Iterator<Item = (Slot, &Row)> {
        let from = slot.map_or(Bound::Unbounded, Bound::Excluded);
        self.slots.range((from, Bound::Unbounded)).map(|(s, r)| (*s, r))
    }

    /// Records in key order after the record whose key sorts as `after` (all when `None`).
    pub(crate) fn after_in_key_order(&self, after: Option<Vec<SortValue>>) -> impl Iterator<Item = &Row> {
        // Past every slot of that key: keys are unique, so this is past the record itself.
        let from = after.map_or(Bound::Unbounded, |k| Bound::Excluded((k, Slot::MAX)));
        self.by_order.range((from, Bound::Unbounded)).filter_map(|(_, s)| self.slots.get(s))
    }

    /// Records changed after change number `after`, in change order.
    pub(crate) fn changed_after(&self, after: u64) -> impl Iterator<Item = &Row> {
        self.by_change.range((Bound::Excluded(after), Bound::Unbounded)).filter_map(|(_, s)| self.slots.get(s))
    }

    /// Adds a record; its key must be free (the callers check).
    pub(crate) fn insert(&mut self, row: Row) -> Slot {
        let slot = self.next;
        self.next += 1;
        self.index(slot, &row);
        self.slots.insert(slot, row);
        slot
    }

    /// Merges `props` into the record at `slot` with a new change number; `Err` with the
    /// slot of the other record if the merge would give it that record's key.
    pub(crate) fn update(&mut self, slot: Slot, props: BTreeMap<String, String>, etag: u64) -> Result<&Row, Slot> {
        let Some(mut row) = self.slots.remove(&slot) else { return Err(slot) };
        let mut merged = row.props.clone();
        merged.extend(props);
        if let Some(&other) = self.by_key.get(&self.key_of(&merged)).filter(|s| **s != slot) {
            self.slots.insert(slot, row);
            return Err(other);
        }
        self.unindex(slot, &row);
        row.props = merged;
        row.etag = etag;
        self.index(slot, &row);
        Ok(self.slots.entry(slot).or_insert(row))
    }

    pub(crate) fn remove(&mut self, slot: Slot) -> Option<Row> {
        let row = self.slots.remove(&slot)?;
        self.unindex(slot, &row);
        Some(row)
    }

    fn index(&mut self, slot: Slot, row: &Row) {
        self.by_key.insert(self.key_of(&row.props), slot);
        self.by_id.insert(row.id.to_lowercase(), slot);
        self.by_change.insert(row.etag, slot);
        self.by_order.insert((self.order_of(&row.props), slot));
    }

    fn unindex(&mut self, slot: Slot, row: &Row) {
        let key = self.key_of(&row.props);
        if self.by_key.get(&key) == Some(&slot) {
            self.by_key.remove(&key);
        }
        self.by_id.remove(&row.id.to_lowercase());
        self.by_change.remove(&row.etag);
        self.by_order.remove(&(self.order_of(&row.props), slot));
    }
}

/// The record at a slot the caller found under the same lock.
impl std::ops::Index<Slot> for Rows {
    type Output = Row;
    fn index(&self, slot: Slot) -> &Row {
        &self.slots[&slot]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, etag: u64, key: &str) -> Row {
        Row { id: id.into(), etag, props: [("k".to_string(), key.to_string())].into() }
    }

    #[test]
    fn lookups_follow_updates_and_removals() {
        let mut rows = Rows::new(&["k".into()], Kind::Dataverse);
        let a = rows.insert(row("A-1", 1, "\"Alpha\""));
        let b = rows.insert(row("b-2", 2, "\"beta\""));
        // Dataverse compares key text without case; ids are GUIDs in any case.
        assert_eq!(rows.find_key(&["\"ALPHA\"".into()]), Some(a));
        assert_eq!(rows.find_id("a-1"), Some(a));
        // An update that would take another record's key is refused and changes nothing.
        assert_eq!(rows.update(a, [("k".to_string(), "\"BETA\"".to_string())].into(), 3).err(), Some(b));
        assert_eq!(rows.find_key(&["\"alpha\"".into()]), Some(a));
        rows.update(a, [("k".to_string(), "\"gamma\"".to_string())].into(), 4).unwrap();
        assert_eq!(rows.find_key(&["\"alpha\"".into()]), None);
        assert_eq!(rows.find_key(&["\"gamma\"".into()]), Some(a));
        let changed: Vec<&str> = rows.changed_after(1).map(|r| r.id.as_str()).collect();
        assert_eq!(changed, ["b-2", "A-1"]);
        rows.remove(b);
        assert_eq!(rows.find_key(&["\"beta\"".into()]), None);
        assert_eq!(rows.len(), 1);
    }

    #[test]
    fn key_order_sorts_numbers_by_value_and_pages_after_a_key() {
        let mut rows = Rows::new(&["n".into()], Kind::Generic);
        for (i, n) in ["10", "9", "100", "9.5"].iter().enumerate() {
            rows.insert(Row { id: i.to_string(), etag: i as u64, props: [("n".to_string(), n.to_string())].into() });
        }
        let all: Vec<&str> = rows.after_in_key_order(None).map(|r| r.props["n"].as_str()).collect();
        assert_eq!(all, ["9", "9.5", "10", "100"]);
        let after = vec![SortValue::of(Some(&"9.5".to_string()))];
        let rest: Vec<&str> = rows.after_in_key_order(Some(after)).map(|r| r.props["n"].as_str()).collect();
        assert_eq!(rest, ["10", "100"]);
    }
}
