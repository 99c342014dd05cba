//! The key-value table (DESIGN §4) on DynamoDB: one item per `(pk, sk)` with its revision, its
//! body as JSON text, and its expiry (`expires_at` in seconds for DynamoDB's TTL, which deletes
//! lazily, and `exp_ms` so that an expired item reads as absent to the millisecond, as locally).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnValue};
use aws_sdk_dynamodb::Client;
use futures::stream::{self, StreamExt};

use super::usage::{item_bytes, read_units, write_units, Usage};
use crate::ports::kv::{counter_name_ok, prefix_end};
use crate::ports::kv::{Expect, Item, KvError, KvStore, Page, Put, SkRange};
use crate::ports::Clock;

type Attrs = HashMap<String, AttributeValue>;

/// The attribute name prefix of a counter of [`KvStore::add`]: each counter is a number
/// attribute of its own, since `ADD` works on top-level numbers and the body is JSON text.
const COUNTER: &str = "n_";

/// DynamoDB's BatchGetItem limit.
const BATCH_GET: usize = 100;
/// Conditional writes in flight at once (DynamoDB bills per item, not per request).
const WRITES_IN_FLIGHT: usize = 16;

#[derive(Clone)]
pub struct DynamoKv {
    client: Client,
    table: String,
    clock: Arc<dyn Clock>,
    usage: Arc<Usage>,
}

impl DynamoKv {
    pub fn new(client: Client, table: String, clock: Arc<dyn Clock>, usage: Arc<Usage>) -> Self {
        DynamoKv { client, table, clock, usage }
    }

    fn unavailable(&self, op: &str, reason: impl std::fmt::Display) -> KvError {
        KvError::Unavailable(format!("DynamoDB {op} on table {}: {reason}", self.table))
    }

    fn key(pk: &str, sk: &str) -> Attrs {
        HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
    }

    async fn put_one(&self, put: &Put) -> Result<Result<u64, KvError>, KvError> {
        let now = self.clock.now_ms();
        let body = serde_json::to_string(&put.body).map_err(|e| KvError::Corrupt {
            pk: put.pk.clone(),
            sk: put.sk.clone(),
            reason: e.to_string(),
        })?;
        let mut values: Attrs =
            HashMap::from([(":b".to_string(), s(&body)), (":zero".to_string(), n(0)), (":one".to_string(), n(1))]);
        let mut update = "SET body = :b, rev = if_not_exists(rev, :zero) + :one".to_string();
        match put.expires_at {
            Some(ms) => {
                update.push_str(", expires_at = :exp, exp_ms = :exp_ms");
                values.insert(":exp".into(), n(ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)));
                values.insert(":exp_ms".into(), n(ms));
            }
            None => update.push_str(" REMOVE expires_at, exp_ms"),
        }
        let condition = match put.expect {
            Expect::Any => None,
            Expect::Absent => {
                values.insert(":now".into(), n(now));
                Some("attribute_not_exists(pk) OR exp_ms <= :now".to_string())
            }
            Expect::Rev(rev) => {
                values.insert(":now".into(), n(now));
                values.insert(":rev".into(), n(rev));
                Some("rev = :rev AND (attribute_not_exists(exp_ms) OR exp_ms > :now)".to_string())
            }
        };
        self.usage.dynamo_request();
        self.usage.write_units(write_units(item_bytes(&put.pk, &put.sk, &body, put.expires_at.is_some())));
        let answer = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(&put.pk, &put.sk)))
            .update_expression(update)
            .set_condition_expression(condition)
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::UpdatedNew)
            .send()
            .await;
        match answer {
            Ok(out) => {
                let rev =
                    out.attributes().and_then(|a| a.get("rev")).and_then(number).ok_or_else(|| KvError::Corrupt {
                        pk: put.pk.clone(),
                        sk: put.sk.clone(),
                        reason: "the write returned no revision".into(),
                    })?;
                Ok(Ok(rev))
            }
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
                Ok(Err(KvError::ConditionFailed { pk: put.pk.clone(), sk: put.sk.clone() }))
            }
            Err(e) => Err(self.unavailable("UpdateItem", super::brief(&e))),
        }
    }

    /// An item as stored, or `None` if it has expired.
    fn decode(&self, attrs: &Attrs, now: i64) -> Result<Option<Item>, KvError> {
        let text = |name: &str| attrs.get(name).and_then(|v| v.as_s().ok()).cloned();
        let pk = text("pk").unwrap_or_default();
        let sk = text("sk").unwrap_or_default();
        let corrupt = |reason: &str| KvError::Corrupt { pk: pk.clone(), sk: sk.clone(), reason: reason.into() };
        let expires_at = attrs.get("exp_ms").and_then(number_i64);
        if expires_at.is_some_and(|t| t <= now) {
            return Ok(None);
        }
        let rev = attrs.get("rev").and_then(number).ok_or_else(|| corrupt("no revision"))?;
        let body = match text("body") {
            Some(body) => serde_json::from_str(&body).map_err(|e| corrupt(&format!("body is not JSON: {e}")))?,
            // A counter item (`add`): its counters are the body.
            None => {
                let counters: serde_json::Map<String, serde_json::Value> = attrs
                    .iter()
                    .filter_map(|(k, v)| Some((k.strip_prefix(COUNTER)?.to_string(), number(v)?.into())))
                    .collect();
                if counters.is_empty() {
                    return Err(corrupt("no body"));
                }
                serde_json::Value::Object(counters)
            }
        };
        Ok(Some(Item { pk, sk, rev, body, expires_at }))
    }

    fn bill_read(&self, attrs: Option<&Attrs>) {
        let bytes = attrs.map_or(0, |a| {
            let t = |k: &str| a.get(k).and_then(|v| v.as_s().ok()).map_or(0, String::len);
            item_bytes(&"p".repeat(t("pk")), &"s".repeat(t("sk")), &"b".repeat(t("body")), a.contains_key("exp_ms"))
        });
        self.usage.read_units(read_units(bytes));
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn number(v: &AttributeValue) -> Option<u64> {
    v.as_n().ok()?.parse().ok()
}

fn number_i64(v: &AttributeValue) -> Option<i64> {
    v.as_n().ok()?.parse().ok()
}

/// The sort-key bounds of a query: inclusive lower, inclusive upper for DynamoDB (`BETWEEN`),
/// and the exclusive upper and lower-than-`after` checks left to the caller. Empty strings
/// mean "no bound" (DynamoDB refuses empty key values).
pub(crate) fn sk_bounds(range: &SkRange, after: Option<&str>) -> (String, Option<String>) {
    let mut lower = range.prefix.clone();
    for b in [range.from.as_deref(), after].into_iter().flatten() {
        if b > lower.as_str() {
            lower = b.to_string();
        }
    }
    let upper = match (prefix_end(&range.prefix), &range.to) {
        (Some(end), Some(to)) => Some(if to.as_str() < end.as_str() { to.clone() } else { end }),
        (end, to) => end.or_else(|| to.clone()).filter(|_| !range.prefix.is_empty() || range.to.is_some()),
    };
    (lower, upper)
}

#[async_trait]
impl KvStore for DynamoKv {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, KvError> {
        self.usage.dynamo_request();
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.unavailable("GetItem", super::brief(&e)))?;
        self.bill_read(out.item());
        match out.item() {
            Some(attrs) => self.decode(attrs, self.clock.now_ms()),
            None => Ok(None),
        }
    }

    async fn get_many(&self, keys: &[(String, String)]) -> Result<Vec<Option<Item>>, KvError> {
        let now = self.clock.now_ms();
        let mut found: HashMap<(String, String), Item> = HashMap::new();
        for chunk in keys.chunks(BATCH_GET) {
            // BatchGetItem refuses a key twice in one call.
            let mut unique: Vec<&(String, String)> = chunk.iter().collect();
            unique.sort();
            unique.dedup();
            let mut pending: Vec<Attrs> = unique.iter().map(|(pk, sk)| Self::key(pk, sk)).collect();
            let mut pause = Duration::from_millis(20);
            while !pending.is_empty() {
                let request = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut pending)))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| self.unavailable("BatchGetItem", e))?;
                self.usage.dynamo_request();
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| self.unavailable("BatchGetItem", super::brief(&e)))?;
                let items = out.responses().and_then(|r| r.get(&self.table)).map(Vec::as_slice).unwrap_or_default();
                for attrs in items {
                    self.bill_read(Some(attrs));
                    if let Some(item) = self.decode(attrs, now)? {
                        found.insert((item.pk.clone(), item.sk.clone()), item);
                    }
                }
                // Keys asked for and not found cost a read unit each too.
                if let Some(unprocessed) = out.unprocessed_keys().and_then(|u| u.get(&self.table)) {
                    pending = unprocessed.keys().to_vec();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
            let asked = unique.len();
            let answered = unique.iter().filter(|k| found.contains_key(k)).count();
            self.usage.read_units(asked.saturating_sub(answered) as u64);
        }
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    async fn put(&self, put: Put) -> Result<u64, KvError> {
        self.put_one(&put).await?
    }

    /// Different keys are written concurrently; puts to one key go one after another in batch
    /// order, so that a later put's condition sees the earlier ones (as in the embedded table).
    async fn put_many(&self, puts: Vec<Put>) -> Result<Vec<Result<u64, KvError>>, KvError> {
        let count = puts.len();
        let mut chains: Vec<Vec<(usize, Put)>> = Vec::new();
        let mut chain_of: HashMap<(String, String), usize> = HashMap::new();
        for (i, p) in puts.into_iter().enumerate() {
            let chain = *chain_of.entry((p.pk.clone(), p.sk.clone())).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[chain].push((i, p));
        }
        let writes = chains.into_iter().map(|chain| async move {
            let mut answers = Vec::with_capacity(chain.len());
            for (i, p) in chain {
                answers.push((i, self.put_one(&p).await?));
            }
            Ok::<_, KvError>(answers)
        });
        let mut results: Vec<Option<Result<u64, KvError>>> = (0..count).map(|_| None).collect();
        let mut chains = stream::iter(writes).buffer_unordered(WRITES_IN_FLIGHT);
        while let Some(answers) = chains.next().await {
            for (i, answer) in answers? {
                results[i] = Some(answer);
            }
        }
        Ok(results.into_iter().map(|r| r.expect("every put is answered")).collect())
    }

    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), KvError> {
        let now = self.clock.now_ms();
        let (condition, values): (Option<&str>, Attrs) = match expect {
            Expect::Any => (None, HashMap::new()),
            Expect::Absent => {
                (Some("attribute_not_exists(pk) OR exp_ms <= :now"), HashMap::from([(":now".into(), n(now))]))
            }
            Expect::Rev(rev) => (
                Some("rev = :rev AND (attribute_not_exists(exp_ms) OR exp_ms > :now)"),
                HashMap::from([(":now".into(), n(now)), (":rev".into(), n(rev))]),
            ),
        };
        self.usage.dynamo_request();
        self.usage.write_units(1);
        let answer = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk, sk)))
            .set_condition_expression(condition.map(str::to_string))
            .set_expression_attribute_values((!values.is_empty()).then_some(values))
            .send()
            .await;
        match answer {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
                Err(KvError::ConditionFailed { pk: pk.to_string(), sk: sk.to_string() })
            }
            Err(e) => Err(self.unavailable("DeleteItem", super::brief(&e))),
        }
    }

    /// `limit` 0 is taken as 1, so that a page always makes progress.
    async fn query(&self, pk: &str, range: &SkRange, limit: usize, after: Option<&str>) -> Result<Page<Item>, KvError> {
        let now = self.clock.now_ms();
        let limit = limit.max(1);
        let (lower, upper) = sk_bounds(range, after);
        let mut values: Attrs = HashMap::from([(":pk".into(), s(pk)), (":now".into(), n(now))]);
        let mut condition = "pk = :pk".to_string();
        match (lower.is_empty(), &upper) {
            (false, Some(hi)) => {
                condition.push_str(" AND sk BETWEEN :lo AND :hi");
                values.insert(":lo".into(), s(&lower));
                values.insert(":hi".into(), s(hi));
            }
            (false, None) => {
                condition.push_str(" AND sk >= :lo");
                values.insert(":lo".into(), s(&lower));
            }
            (true, Some(hi)) => {
                condition.push_str(" AND sk <= :hi");
                values.insert(":hi".into(), s(hi));
            }
            (true, None) => {}
        }
        let keep = |sk: &str| {
            sk.starts_with(range.prefix.as_str())
                && after.is_none_or(|a| sk > a)
                && upper.as_deref().is_none_or(|hi| sk < hi)
        };
        let mut items: Vec<Item> = Vec::new();
        let mut start: Option<Attrs> = None;
        let mut more = false;
        loop {
            self.usage.dynamo_request();
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression(&condition)
                .filter_expression("attribute_not_exists(exp_ms) OR exp_ms > :now")
                .set_expression_attribute_values(Some(values.clone()))
                .consistent_read(true)
                // One more than asked: tells whether another page follows.
                .limit(i32::try_from(limit + 1).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.unavailable("Query", super::brief(&e)))?;
            let mut bytes = 0;
            for attrs in out.items() {
                let t = |k: &str| attrs.get(k).and_then(|v| v.as_s().ok()).map_or(0, String::len);
                bytes += t("pk") + t("sk") + t("body") + 16;
                let Some(item) = self.decode(attrs, now)? else { continue };
                if !keep(&item.sk) {
                    continue;
                }
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push(item);
            }
            self.usage.read_units(read_units(bytes));
            if more {
                break;
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => break,
            }
        }
        let next = if more { items.last().map(|i| i.sk.clone()) } else { None };
        Ok(Page { items, next })
    }

    /// One `UpdateItem` with `ADD`: no read and no condition, so concurrent adds all count.
    async fn add(
        &self,
        pk: &str,
        sk: &str,
        counters: &[(String, u64)],
        expires_at: Option<i64>,
    ) -> Result<(), KvError> {
        if let Some((name, _)) = counters.iter().find(|(n, _)| !counter_name_ok(n)) {
            return Err(KvError::Corrupt {
                pk: pk.to_string(),
                sk: sk.to_string(),
                reason: format!("'{name}' cannot name a counter: use a-z, 0-9 and _"),
            });
        }
        let mut names: HashMap<String, String> = HashMap::new();
        let mut values: Attrs = HashMap::from([(":one".to_string(), n(1))]);
        let mut adds = vec!["rev :one".to_string()];
        for (i, (name, count)) in counters.iter().enumerate() {
            names.insert(format!("#c{i}"), format!("{COUNTER}{name}"));
            values.insert(format!(":c{i}"), n(count));
            adds.push(format!("#c{i} :c{i}"));
        }
        let mut update = format!("ADD {}", adds.join(", "));
        match expires_at {
            Some(ms) => {
                update.push_str(" SET expires_at = :exp, exp_ms = :exp_ms");
                values.insert(":exp".into(), n(ms.div_euclid(1000) + i64::from(ms.rem_euclid(1000) != 0)));
                values.insert(":exp_ms".into(), n(ms));
            }
            None => update.push_str(" REMOVE expires_at, exp_ms"),
        }
        self.usage.dynamo_request();
        // Counters are a few dozen bytes each: one write unit unless an item has hundreds.
        let bytes = pk.len() + sk.len() + counters.iter().map(|(c, _)| c.len() + COUNTER.len() + 21).sum::<usize>();
        self.usage.write_units(write_units(bytes + 40));
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(Self::key(pk, sk)))
            .update_expression(update)
            .set_expression_attribute_names((!names.is_empty()).then_some(names))
            .set_expression_attribute_values(Some(values))
            .send()
            .await
            .map_err(|e| self.unavailable("UpdateItem", super::brief(&e)))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(prefix: &str, from: Option<&str>, to: Option<&str>) -> SkRange {
        SkRange { prefix: prefix.into(), from: from.map(Into::into), to: to.map(Into::into) }
    }

    #[test]
    fn bounds_take_the_tighter_of_prefix_from_to_and_after() {
        assert_eq!(sk_bounds(&range("", None, None), None), (String::new(), None));
        assert_eq!(sk_bounds(&range("a#", None, None), None), ("a#".into(), Some("a$".into())));
        assert_eq!(sk_bounds(&range("a#", Some("a#5"), Some("a#9")), None), ("a#5".into(), Some("a#9".into())));
        assert_eq!(sk_bounds(&range("a#", Some("a#5"), None), Some("a#7")), ("a#7".into(), Some("a$".into())));
        assert_eq!(sk_bounds(&range("", None, Some("m")), None), (String::new(), Some("m".into())));
        assert_eq!(sk_bounds(&range("a#", None, Some("z")), None), ("a#".into(), Some("a$".into())));
    }
}
