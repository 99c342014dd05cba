//! Dead-letter rows (`DEAD#queue`): why a message reached its queue's dead-letter queue, newest
//! first, each found by its message id through `DEADIDX#queue`; settled as `redriven` when an
//! operator sends the message back.
use serde_json::json;

use super::{decode, encode, State};
use crate::domain::errors::{DeadLetter, DeadLetterStatus};
use crate::domain::keys;
use crate::ports::{Expect, InMessage, Item, KvError, Page, Put, SkRange};

/// How long a redriven row is kept as a record: as long as SQS keeps a dead letter (14 days).
pub const DEAD_LETTER_RETENTION_MS: i64 = 14 * 24 * 3600 * 1000;

/// The job a message body names (`{"job": ...}`), if it is JSON and names one.
pub fn job_of(body: &str) -> Option<String> {
    let value = serde_json::from_str::<serde_json::Value>(body).ok()?;
    value.get("job").and_then(|j| j.as_str()).map(str::to_string)
}

/// Where a page of dead letters ends: a row of one queue. Written `<sort key>@<queue>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterCursor {
    pub queue: String,
    pub sk: String,
}

impl DeadLetterCursor {
    pub fn parse(s: &str) -> Option<Self> {
        let (sk, queue) = s.rsplit_once('@')?;
        let time_ok = sk.len() > 16 && sk.as_bytes()[..15].iter().all(u8::is_ascii_digit) && &sk[15..16] == "#";
        (time_ok && !queue.is_empty()).then(|| DeadLetterCursor { queue: queue.to_string(), sk: sk.to_string() })
    }

    /// The countdown time that leads the sort key (rows of all queues are merged by it).
    fn time(sk: &str) -> &str {
        sk.get(..15).unwrap_or(sk)
    }
}

impl std::fmt::Display for DeadLetterCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.sk, self.queue)
    }
}

fn index_put(queue: &str, message_id: &str, sk: &str, at_ms: i64, expires_at: Option<i64>, expect: Expect) -> Put {
    Put {
        pk: keys::dead_letter_index_pk(queue),
        sk: keys::escape(message_id),
        body: json!({ "sk": sk, "at_ms": at_ms }),
        expires_at,
        expect,
    }
}

fn index_sk(item: &Item) -> Option<String> {
    item.body.get("sk").and_then(|s| s.as_str()).map(str::to_string)
}

impl State {
    /// Records a message on its last receive, before it moves to the dead-letter queue. Keyed
    /// by message id, so handling the same receive twice leaves one row (brought up to date).
    pub async fn record_dead_letter(&self, queue: &str, m: &InMessage, reason: &str) -> Result<(), KvError> {
        let mut at_ms = self.now_ms();
        let mut sk = keys::dead_letter_sk(at_ms, &m.id);
        match self.kv.put(index_put(queue, &m.id, &sk, at_ms, None, Expect::Absent)).await {
            Ok(_) => {}
            Err(KvError::ConditionFailed { .. }) => {
                if let Some(item) = self.kv.get(&keys::dead_letter_index_pk(queue), &keys::escape(&m.id)).await? {
                    sk = index_sk(&item).unwrap_or(sk);
                    at_ms = item.body.get("at_ms").and_then(|t| t.as_i64()).unwrap_or(at_ms);
                }
            }
            Err(e) => return Err(e),
        }
        let row = DeadLetter {
            queue: queue.to_string(),
            message_id: m.id.clone(),
            job: job_of(&m.body),
            receive_count: m.receive_count,
            reason: reason.to_string(),
            body: m.body.clone(),
            at_ms,
            status: DeadLetterStatus::Dead,
            redriven_ms: None,
        };
        let put =
            Put { pk: keys::dead_letters_pk(queue), sk, body: encode(&row), expires_at: None, expect: Expect::Any };
        self.kv.put(put).await.map(|_| ())
    }

    /// The rows of these messages of `queue`, in the order of `ids` (`None`: no row).
    pub async fn dead_letters_by_id(&self, queue: &str, ids: &[String]) -> Result<Vec<Option<DeadLetter>>, KvError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let index_pk = keys::dead_letter_index_pk(queue);
        let index_keys: Vec<(String, String)> = ids.iter().map(|id| (index_pk.clone(), keys::escape(id))).collect();
        let sks: Vec<Option<String>> =
            self.kv.get_many(&index_keys).await?.iter().map(|i| i.as_ref().and_then(index_sk)).collect();
        let pk = keys::dead_letters_pk(queue);
        let row_keys: Vec<(String, String)> = sks.iter().flatten().map(|sk| (pk.clone(), sk.clone())).collect();
        let mut rows = if row_keys.is_empty() { Vec::new() } else { self.kv.get_many(&row_keys).await? }.into_iter();
        sks.iter()
            .map(|sk| match sk {
                Some(_) => rows.next().flatten().map(|item| decode(&item)).transpose(),
                None => Ok(None),
            })
            .collect()
    }

    pub async fn dead_letter(&self, queue: &str, message_id: &str) -> Result<Option<DeadLetter>, KvError> {
        Ok(self.dead_letters_by_id(queue, &[message_id.to_string()]).await?.pop().flatten())
    }

    /// Every row of a queue, oldest first.
    pub async fn dead_letters(&self, queue: &str) -> Result<Vec<DeadLetter>, KvError> {
        let mut rows: Vec<DeadLetter> = Vec::new();
        let mut after = None;
        loop {
            let page = self.kv.query(&keys::dead_letters_pk(queue), &SkRange::default(), 500, after.as_deref()).await?;
            rows.extend(page.items.iter().map(decode).collect::<Result<Vec<DeadLetter>, _>>()?);
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        rows.reverse();
        Ok(rows)
    }

    /// A page of the rows of `queues`, newest first (rows of the same millisecond in the order
    /// of `queues`), after `after`, whose queue must be one of `queues`. One query per queue.
    pub async fn dead_letter_page(
        &self,
        queues: &[&str],
        limit: usize,
        after: Option<&DeadLetterCursor>,
    ) -> Result<Page<DeadLetter>, KvError> {
        let after_at = after.map(|c| (queues.iter().position(|q| *q == c.queue).unwrap_or(0), c));
        let mut rows: Vec<(usize, String, DeadLetter)> = Vec::new();
        let mut more = false;
        for (i, queue) in queues.iter().enumerate() {
            // Where this queue's rows follow the cursor in the merged order (time, then queue).
            let start = after_at.map(|(at, c)| {
                let time = DeadLetterCursor::time(&c.sk);
                match i.cmp(&at) {
                    // Strictly later times only: `$` sorts after the `#` that follows the time.
                    std::cmp::Ordering::Less => format!("{time}$"),
                    std::cmp::Ordering::Equal => c.sk.clone(),
                    // The cursor's time too: the bare time sorts before every key that has it.
                    std::cmp::Ordering::Greater => time.to_string(),
                }
            });
            let page =
                self.kv.query(&keys::dead_letters_pk(queue), &SkRange::default(), limit, start.as_deref()).await?;
            more |= page.next.is_some();
            for item in &page.items {
                rows.push((i, item.sk.clone(), decode(item)?));
            }
        }
        rows.sort_by(|a, b| (DeadLetterCursor::time(&a.1), a.0, &a.1).cmp(&(DeadLetterCursor::time(&b.1), b.0, &b.1)));
        more |= rows.len() > limit;
        rows.truncate(limit);
        let next = match rows.last() {
            Some((i, sk, _)) if more => {
                Some(DeadLetterCursor { queue: queues[*i].to_string(), sk: sk.clone() }.to_string())
            }
            _ => None,
        };
        Ok(Page { items: rows.into_iter().map(|(_, _, row)| row).collect(), next })
    }

    /// Marks a row `redriven`: its message is back on its queue. Kept for
    /// [`DEAD_LETTER_RETENTION_MS`] as a record, then it expires.
    pub async fn settle_dead_letter(&self, queue: &str, message_id: &str) -> Result<(), KvError> {
        let Some(index) = self.kv.get(&keys::dead_letter_index_pk(queue), &keys::escape(message_id)).await? else {
            return Ok(());
        };
        let Some(sk) = index_sk(&index) else { return Ok(()) };
        let pk = keys::dead_letters_pk(queue);
        let Some(item) = self.kv.get(&pk, &sk).await? else { return Ok(()) };
        let mut row: DeadLetter = decode(&item)?;
        let now = self.now_ms();
        row.status = DeadLetterStatus::Redriven;
        row.redriven_ms = Some(now);
        let expires_at = Some(now + DEAD_LETTER_RETENTION_MS);
        self.kv.put(Put { pk, sk: sk.clone(), body: encode(&row), expires_at, expect: Expect::Any }).await?;
        self.kv.put(index_put(queue, message_id, &sk, row.at_ms, expires_at, Expect::Any)).await.map(|_| ())
    }
}
