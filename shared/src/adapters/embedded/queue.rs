//! Queues in the embedded SQLite file, with SQS semantics (see `ports::queue`).
//!
//! All queues share the table `queue_messages`; a row belongs to the queue named in its `queue`
//! column. A row's `visible_at` is `NULL` while it is fresh (sent, never received or released),
//! else the time from which it is visible again. A row is *invisible* when `visible_at > now`:
//! received and not yet acknowledged within its visibility timeout, or released with a delay.
//!
//! Receiving merges, in id order, the fresh rows (index `queue_fresh`, already in id order) with
//! the touched rows that are visible again (index `queue_touched`, usually few). On a FIFO queue
//! a group with any invisible row is blocked; that is one probe of `queue_touched_group` per
//! group met, so the cost does not grow with the number of blocked groups.
//!
//! Several consumers of one FIFO queue share its groups: with [`EmbeddedQueue::share_groups`]
//! a receive takes messages of a few groups only and leaves the rest to the next receive, so
//! the first consumer does not lock every group and leave the others idle (and the others do
//! not read the whole queue, every poll, to find nothing).
//!
//! The receipt is `"<id>.<receive count>"`: a message received again has a higher count, so an
//! older receipt no longer matches anything (ids are never reused, see the schema in `db.rs`).
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{params, Transaction, TransactionBehavior};

use super::db::EmbeddedDb;
use crate::ports::queue::{InMessage, OutMessage, Queue, QueueDepth, QueueError};

/// Fresh rows of a queue (?1) in id order, at most ?2 (-1: all), off the covering index
/// `queue_fresh`.
const SQL_FRESH: &str = "SELECT id, grp FROM queue_messages
    WHERE queue = ?1 AND visible_at IS NULL ORDER BY id LIMIT ?2";
/// Touched rows of a queue (?1) visible again at a time (?2), in id order, at most ?3 (-1: all).
const SQL_VISIBLE_AGAIN: &str = "SELECT id, grp, receive_count FROM queue_messages
    WHERE queue = ?1 AND visible_at IS NOT NULL AND visible_at <= ?2
    ORDER BY id LIMIT ?3";
/// Whether a group (?2) of a queue (?1) has an invisible row at a time (?3): one probe of
/// `queue_touched_group`.
const SQL_GROUP_BLOCKED: &str = "SELECT EXISTS (SELECT 1 FROM queue_messages
    WHERE queue = ?1 AND grp IS ?2 AND visible_at IS NOT NULL AND visible_at > ?3)";
/// Fresh, visible-again and invisible rows of a queue (?1) at a time (?2).
const SQL_DEPTH: &str = "SELECT
    (SELECT count(*) FROM queue_messages WHERE queue = ?1 AND visible_at IS NULL),
    (SELECT count(*) FROM queue_messages
        WHERE queue = ?1 AND visible_at IS NOT NULL AND visible_at <= ?2),
    (SELECT count(*) FROM queue_messages
        WHERE queue = ?1 AND visible_at IS NOT NULL AND visible_at > ?2)";
/// Whether a queue (?1) holds no row: two index probes.
const SQL_IS_EMPTY: &str = "SELECT
    NOT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1 AND visible_at IS NULL)
    AND NOT EXISTS (SELECT 1 FROM queue_messages WHERE queue = ?1 AND visible_at IS NOT NULL)";

/// The configuration of one queue. Build with [`QueueConfig::new`], then set fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    pub name: String,
    /// FIFO: group order, group locking and deduplication.
    pub fifo: bool,
    /// How long a received message stays invisible unless acknowledged or released.
    pub visibility_timeout: Duration,
    /// Receives after which a message goes to `dead_letter` instead of being handed out again.
    /// 0 means no limit.
    pub max_receive_count: u32,
    /// The dead-letter queue (a queue name in the same file). Without one, messages are handed
    /// out again however often they were received.
    pub dead_letter: Option<String>,
    /// FIFO only: a message whose deduplication id was sent within this window (counted from
    /// the first send) is dropped silently. Messages without a deduplication id are never dropped.
    pub dedup_window: Duration,
    /// Bodies larger than this are refused with [`QueueError::TooLarge`] (SQS: 256 KiB).
    pub max_body_bytes: usize,
}

impl QueueConfig {
    /// Defaults: visibility timeout 30 s, 5 receives at most, no dead-letter queue,
    /// deduplication window 5 minutes, bodies up to 256 KiB.
    pub fn new(name: impl Into<String>, fifo: bool) -> Self {
        QueueConfig {
            name: name.into(),
            fifo,
            visibility_timeout: Duration::from_secs(30),
            max_receive_count: 5,
            dead_letter: None,
            dedup_window: Duration::from_secs(5 * 60),
            max_body_bytes: 256 * 1024,
        }
    }
}

/// A message as stored, for operators and tests (e.g. to inspect a dead-letter queue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    pub id: i64,
    pub group: Option<String>,
    pub body: String,
    pub receive_count: u32,
    /// When it was first sent (kept when moved to the dead-letter queue), ms since the epoch.
    pub sent_at: i64,
    /// `None`: visible since sent. Otherwise visible from then on (ms since the epoch).
    pub visible_at: Option<i64>,
}

/// A [`Queue`] in an [`EmbeddedDb`]. Get one with [`EmbeddedDb::queue`].
#[derive(Debug)]
pub struct EmbeddedQueue {
    db: EmbeddedDb,
    config: QueueConfig,
    /// When expired deduplication ids are next cleared out (ms since the epoch).
    next_dedup_purge: AtomicI64,
    /// FIFO: the groups one receive takes messages of at most; 0: no limit.
    groups_per_receive: AtomicUsize,
}

/// A row that may be handed out. Its body is read only once it is chosen, so that skipping
/// rows of blocked groups reads the index `queue_fresh` alone.
struct Candidate {
    id: i64,
    group: Option<String>,
    receive_count: i64,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn parse_receipt(receipt: &str) -> Option<(i64, i64)> {
    let (id, count) = receipt.split_once('.')?;
    Some((id.parse().ok()?, count.parse().ok()?))
}

impl EmbeddedQueue {
    pub(crate) fn new(db: EmbeddedDb, config: QueueConfig) -> Self {
        EmbeddedQueue {
            db,
            config,
            next_dedup_purge: AtomicI64::new(i64::MIN),
            groups_per_receive: AtomicUsize::new(0),
        }
    }

    /// FIFO: lets `consumers` receivers work side by side on a queue of about `groups` message
    /// groups: each receive takes messages of `groups / consumers` groups at most (rounded up).
    /// Each group is still in one receiver's hands at a time (a group with a message in flight
    /// is blocked), so per-group order is kept; what changes is only how the groups are spread.
    /// One consumer (or none) takes every group again.
    pub fn share_groups(&self, groups: usize, consumers: usize) {
        let per_receive = if consumers > 1 { groups.div_ceil(consumers).max(1) } else { 0 };
        self.groups_per_receive.store(per_receive, Ordering::Relaxed);
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    fn unavailable(&self, e: rusqlite::Error) -> QueueError {
        QueueError::Unavailable { queue: self.config.name.clone(), reason: format!("state database: {e}") }
    }

    /// True when the queue holds no message, visible or not. Unlike [`Queue::depth`], which
    /// counts, this is constant time.
    pub fn is_empty(&self) -> Result<bool, QueueError> {
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(SQL_IS_EMPTY).map_err(|e| self.unavailable(e))?;
        stmt.query_row([&self.config.name], |r| r.get(0)).map_err(|e| self.unavailable(e))
    }

    /// True when none of `queues` (all in one database) holds a message, read under one lock so
    /// that a message a step moves from one queue to the next (sent before it is acknowledged)
    /// is always seen in one of them.
    pub fn all_empty(queues: &[&EmbeddedQueue]) -> Result<bool, QueueError> {
        let Some(first) = queues.first() else { return Ok(true) };
        if let Some(q) = queues.iter().find(|q| !q.db.same_database(&first.db)) {
            let reason = format!("not in the database of queue {}", first.config.name);
            return Err(QueueError::Unavailable { queue: q.config.name.clone(), reason });
        }
        let conn = first.db.lock();
        for q in queues {
            let mut stmt = conn.prepare_cached(SQL_IS_EMPTY).map_err(|e| q.unavailable(e))?;
            if !stmt.query_row([&q.config.name], |r| r.get::<_, bool>(0)).map_err(|e| q.unavailable(e))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Every message of the queue in id order, visible or not, without receiving any.
    pub fn peek_all(&self) -> Result<Vec<QueuedMessage>, QueueError> {
        let conn = self.db.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, grp, body, receive_count, sent_at, visible_at FROM queue_messages
                 WHERE queue = ?1 ORDER BY id",
            )
            .map_err(|e| self.unavailable(e))?;
        let rows = stmt
            .query_map([&self.config.name], |r| {
                Ok(QueuedMessage {
                    id: r.get(0)?,
                    group: r.get(1)?,
                    body: r.get(2)?,
                    receive_count: u32::try_from(r.get::<_, i64>(3)?).unwrap_or(u32::MAX),
                    sent_at: r.get(4)?,
                    visible_at: r.get(5)?,
                })
            })
            .map_err(|e| self.unavailable(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.unavailable(e))
    }

    fn begin<'c>(&self, conn: &'c mut rusqlite::Connection) -> Result<Transaction<'c>, QueueError> {
        conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(|e| self.unavailable(e))
    }

    /// Whether `group` has an invisible message: on a FIFO queue, none of its messages may go
    /// out then. One probe of the index `queue_touched_group`.
    fn group_blocked(&self, tx: &Transaction<'_>, group: Option<&str>, now: i64) -> Result<bool, QueueError> {
        let mut stmt = tx.prepare_cached(SQL_GROUP_BLOCKED).map_err(|e| self.unavailable(e))?;
        stmt.query_row(params![self.config.name, group, now], |r| r.get(0)).map_err(|e| self.unavailable(e))
    }

    /// Touched rows that are visible again, in id order.
    fn visible_again(&self, tx: &Transaction<'_>, now: i64, limit: i64) -> Result<Vec<Candidate>, QueueError> {
        let mut stmt = tx.prepare_cached(SQL_VISIBLE_AGAIN).map_err(|e| self.unavailable(e))?;
        let rows = stmt
            .query_map(params![self.config.name, now, limit], |r| {
                Ok(Candidate { id: r.get(0)?, group: r.get(1)?, receive_count: r.get(2)? })
            })
            .map_err(|e| self.unavailable(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.unavailable(e))
    }

    /// Picks what to hand out and what to dead-letter, reading fresh rows lazily so that a
    /// receive stops as soon as it has `max` messages.
    fn pick(&self, tx: &Transaction<'_>, now: i64, max: usize) -> Result<(Vec<Candidate>, Vec<Candidate>), QueueError> {
        let fifo = self.config.fifo;
        // FIFO: whether each group seen so far is blocked (asked once per group and receive).
        let mut blocked: HashMap<Option<String>, bool> = HashMap::new();
        // FIFO: the groups this receive hands out messages of, at most `groups_per_receive`.
        let groups_per_receive = self.groups_per_receive.load(Ordering::Relaxed);
        let mut taken: HashSet<Option<String>> = HashSet::new();
        // A standard queue needs no more than `max` rows from each side; a FIFO queue may have
        // to skip rows of blocked groups, so it reads on until it has enough.
        let limit = if fifo { -1 } else { i64::try_from(max).unwrap_or(i64::MAX) };
        let mut again = self.visible_again(tx, now, limit)?.into_iter().peekable();
        let dead_lettering = self.config.dead_letter.is_some() && self.config.max_receive_count > 0;
        let max_count = i64::from(self.config.max_receive_count);

        let mut stmt = tx.prepare_cached(SQL_FRESH).map_err(|e| self.unavailable(e))?;
        let mut fresh_rows = stmt.query(params![self.config.name, limit]).map_err(|e| self.unavailable(e))?;
        let mut next_fresh = || -> Result<Option<Candidate>, QueueError> {
            match fresh_rows.next().map_err(|e| self.unavailable(e))? {
                None => Ok(None),
                Some(r) => Ok(Some(Candidate {
                    id: r.get(0).map_err(|e| self.unavailable(e))?,
                    group: r.get(1).map_err(|e| self.unavailable(e))?,
                    receive_count: 0,
                })),
            }
        };
        let mut fresh = next_fresh()?;

        let mut chosen = Vec::new();
        let mut dead = Vec::new();
        while chosen.len() < max {
            // The smaller id of the two streams.
            let take_again = match (again.peek(), &fresh) {
                (Some(a), Some(f)) => a.id < f.id,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let candidate = if take_again { again.next() } else { std::mem::replace(&mut fresh, next_fresh()?) };
            let Some(c) = candidate else { break };
            if fifo {
                let is_blocked = match blocked.get(&c.group) {
                    Some(&b) => b,
                    None => {
                        let b = self.group_blocked(tx, c.group.as_deref(), now)?;
                        blocked.insert(c.group.clone(), b);
                        b
                    }
                };
                if is_blocked {
                    continue;
                }
                // Left whole to another receive: `taken` only grows, so once a group is left
                // out, none of its later messages is taken either (no gap in its order).
                if groups_per_receive > 0 && taken.len() >= groups_per_receive && !taken.contains(&c.group) {
                    continue;
                }
            }
            if dead_lettering && c.receive_count >= max_count {
                dead.push(c);
                continue;
            }
            if fifo && groups_per_receive > 0 {
                taken.insert(c.group.clone());
            }
            chosen.push(c);
        }
        Ok((chosen, dead))
    }

    fn dead_letter(&self, tx: &Transaction<'_>, dead: &[Candidate]) -> Result<(), QueueError> {
        let Some(dlq) = &self.config.dead_letter else {
            return Ok(());
        };
        // Moved, not copied: it keeps its id (as SQS keeps the MessageId), which its dead-letter
        // row is keyed by. Receipts name the queue, so none from before the move matches it.
        let mut move_row = tx
            .prepare_cached("UPDATE queue_messages SET queue = ?1, visible_at = NULL, receive_count = 0 WHERE id = ?2")
            .map_err(|e| self.unavailable(e))?;
        for c in dead {
            move_row.execute(params![dlq, c.id]).map_err(|e| self.unavailable(e))?;
            tracing::warn!(
                queue = %self.config.name,
                dead_letter = %dlq,
                id = c.id,
                receive_count = c.receive_count,
                "message moved to the dead-letter queue"
            );
        }
        Ok(())
    }

    /// Clears expired deduplication ids now and then (they are ignored once expired anyway).
    fn purge_dedup(&self, tx: &Transaction<'_>, now: i64) -> Result<(), QueueError> {
        if now < self.next_dedup_purge.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut stmt = tx
            .prepare_cached("DELETE FROM queue_dedup WHERE queue = ?1 AND expires_at <= ?2")
            .map_err(|e| self.unavailable(e))?;
        stmt.execute(params![self.config.name, now]).map_err(|e| self.unavailable(e))?;
        let every = millis(self.config.dedup_window).clamp(1_000, 60_000);
        self.next_dedup_purge.store(now.saturating_add(every), Ordering::Relaxed);
        Ok(())
    }
}

#[async_trait]
impl Queue for EmbeddedQueue {
    fn name(&self) -> &str {
        &self.config.name
    }

    fn max_receive_count(&self) -> u32 {
        self.config.max_receive_count
    }

    async fn send(&self, msgs: Vec<OutMessage>) -> Result<(), QueueError> {
        if let Some(big) = msgs.iter().find(|m| m.body.len() > self.config.max_body_bytes) {
            return Err(QueueError::TooLarge { queue: self.config.name.clone(), bytes: big.body.len() });
        }
        if msgs.is_empty() {
            return Ok(());
        }
        let now = self.db.now_ms();
        let dedup_until = now.saturating_add(millis(self.config.dedup_window));
        let mut conn = self.db.lock();
        let tx = self.begin(&mut conn)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO queue_messages (queue, grp, body, sent_at, visible_at, receive_count)
                     VALUES (?1, ?2, ?3, ?4, NULL, 0)",
                )
                .map_err(|e| self.unavailable(e))?;
            // Records the id unless it is already there and unexpired: 0 rows changed means a
            // duplicate within the window.
            let mut dedup = tx
                .prepare_cached(
                    "INSERT INTO queue_dedup (queue, dedup_id, expires_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (queue, dedup_id) DO UPDATE SET expires_at = excluded.expires_at
                     WHERE queue_dedup.expires_at <= ?4",
                )
                .map_err(|e| self.unavailable(e))?;
            for m in &msgs {
                if let (true, Some(dedup_id)) = (self.config.fifo, &m.dedup_id) {
                    let recorded = dedup
                        .execute(params![self.config.name, dedup_id, dedup_until, now])
                        .map_err(|e| self.unavailable(e))?;
                    if recorded == 0 {
                        tracing::debug!(
                            queue = %self.config.name,
                            dedup_id = %dedup_id,
                            "duplicate dropped"
                        );
                        continue;
                    }
                }
                insert.execute(params![self.config.name, m.group, m.body, now]).map_err(|e| self.unavailable(e))?;
            }
            if self.config.fifo {
                self.purge_dedup(&tx, now)?;
            }
        }
        tx.commit().map_err(|e| self.unavailable(e))
    }

    async fn receive(&self, max: usize) -> Result<Vec<InMessage>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let now = self.db.now_ms();
        let invisible_until = now.saturating_add(millis(self.config.visibility_timeout));
        let mut conn = self.db.lock();
        let tx = self.begin(&mut conn)?;
        let (chosen, dead) = self.pick(&tx, now, max)?;
        self.dead_letter(&tx, &dead)?;
        let mut out = Vec::with_capacity(chosen.len());
        {
            let mut update = tx
                .prepare_cached(
                    "UPDATE queue_messages SET visible_at = ?1, receive_count = receive_count + 1
                     WHERE id = ?2",
                )
                .map_err(|e| self.unavailable(e))?;
            let mut read_body =
                tx.prepare_cached("SELECT body FROM queue_messages WHERE id = ?1").map_err(|e| self.unavailable(e))?;
            for c in chosen {
                let body: String = read_body.query_row([c.id], |r| r.get(0)).map_err(|e| self.unavailable(e))?;
                update.execute(params![invisible_until, c.id]).map_err(|e| self.unavailable(e))?;
                let count = c.receive_count.saturating_add(1);
                out.push(InMessage {
                    id: c.id.to_string(),
                    receipt: format!("{}.{}", c.id, count),
                    body,
                    group: c.group,
                    receive_count: u32::try_from(count).unwrap_or(u32::MAX),
                });
            }
        }
        tx.commit().map_err(|e| self.unavailable(e))?;
        Ok(out)
    }

    async fn ack(&self, receipts: &[String]) -> Result<(), QueueError> {
        if receipts.is_empty() {
            return Ok(());
        }
        let mut conn = self.db.lock();
        let tx = self.begin(&mut conn)?;
        {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM queue_messages
                     WHERE id = ?1 AND queue = ?2 AND receive_count = ?3",
                )
                .map_err(|e| self.unavailable(e))?;
            for receipt in receipts {
                let Some((id, count)) = parse_receipt(receipt) else {
                    tracing::warn!(
                        queue = %self.config.name,
                        receipt = %receipt,
                        "ack with a malformed receipt ignored"
                    );
                    continue;
                };
                delete.execute(params![id, self.config.name, count]).map_err(|e| self.unavailable(e))?;
            }
        }
        tx.commit().map_err(|e| self.unavailable(e))
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), QueueError> {
        let Some((id, count)) = parse_receipt(receipt) else {
            tracing::warn!(
                queue = %self.config.name,
                receipt = %receipt,
                "release with a malformed receipt ignored"
            );
            return Ok(());
        };
        let visible_at = self.db.now_ms().saturating_add(millis(delay));
        let conn = self.db.lock();
        // One statement: SQLite commits it before `execute` returns.
        let mut stmt = conn
            .prepare_cached(
                "UPDATE queue_messages SET visible_at = ?1
                 WHERE id = ?2 AND queue = ?3 AND receive_count = ?4",
            )
            .map_err(|e| self.unavailable(e))?;
        stmt.execute(params![visible_at, id, self.config.name, count]).map_err(|e| self.unavailable(e))?;
        Ok(())
    }

    /// Counts the rows (the index `queue_fresh` for the fresh ones, `queue_touched` for the
    /// rest), exact as of now.
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        let now = self.db.now_ms();
        let conn = self.db.lock();
        let mut stmt = conn.prepare_cached(SQL_DEPTH).map_err(|e| self.unavailable(e))?;
        let (fresh, back, invisible) = stmt
            .query_row(params![self.config.name, now], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
            })
            .map_err(|e| self.unavailable(e))?;
        Ok(QueueDepth { visible: (fresh + back).max(0) as u64, in_flight: invisible.max(0) as u64 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::clock::ManualClock;
    use std::sync::Arc;

    const VIS: Duration = Duration::from_secs(30);

    fn db() -> (EmbeddedDb, ManualClock) {
        let clock = ManualClock::new(1_000_000);
        (EmbeddedDb::open_in_memory(Arc::new(clock.clone())).expect("open"), clock)
    }

    fn config(name: &str, fifo: bool) -> QueueConfig {
        let mut c = QueueConfig::new(name, fifo);
        c.visibility_timeout = VIS;
        c
    }

    fn std_msgs(bodies: &[&str]) -> Vec<OutMessage> {
        bodies.iter().map(|b| OutMessage::standard(b.to_string())).collect()
    }

    /// FIFO messages "<group><n>": the group is the first letter, the dedup id the body.
    fn fifo_msgs(bodies: &[&str]) -> Vec<OutMessage> {
        bodies.iter().map(|b| OutMessage::fifo(b.to_string(), b[..1].to_string(), b.to_string())).collect()
    }

    fn bodies(msgs: &[InMessage]) -> Vec<&str> {
        msgs.iter().map(|m| m.body.as_str()).collect()
    }

    fn receipts(msgs: &[InMessage]) -> Vec<String> {
        msgs.iter().map(|m| m.receipt.clone()).collect()
    }

    #[tokio::test]
    async fn received_messages_come_back_after_the_visibility_timeout() {
        let (db, clock) = db();
        let q = db.queue(config("q", false));
        q.send(std_msgs(&["m1", "m2"])).await.expect("send");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth { visible: 2, in_flight: 0 });

        let first = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&first), ["m1", "m2"]);
        assert!(first.iter().all(|m| m.receive_count == 1));
        assert_eq!(q.depth().await.expect("depth"), QueueDepth { visible: 0, in_flight: 2 });
        assert!(q.receive(10).await.expect("receive").is_empty(), "invisible while in flight");
        assert!(!q.is_empty().expect("is_empty"), "in-flight messages are held");

        clock.advance(millis(VIS) - 1);
        assert!(q.receive(10).await.expect("receive").is_empty(), "1 ms before the timeout");
        clock.advance(1);
        let again = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&again), ["m1", "m2"]);
        assert!(again.iter().all(|m| m.receive_count == 2));
        assert_eq!(again[0].id, first[0].id);
        assert_ne!(again[0].receipt, first[0].receipt);

        q.ack(&receipts(&again)).await.expect("ack");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth::default());
        assert!(q.is_empty().expect("is_empty"));
        clock.advance(millis(VIS) * 2);
        assert!(q.receive(10).await.expect("receive").is_empty(), "acked messages are gone");
    }

    #[tokio::test]
    async fn all_empty_sees_a_message_in_any_queue_of_the_database() {
        let ((one, _), (other, _)) = (db(), db());
        let (a, b) = (one.queue(config("a", false)), one.queue(config("b", true)));
        assert!(EmbeddedQueue::all_empty(&[&a, &b]).expect("all_empty"));
        b.send(fifo_msgs(&["x"])).await.expect("send");
        assert!(!EmbeddedQueue::all_empty(&[&a, &b]).expect("all_empty"));
        let got = b.receive(1).await.expect("receive");
        assert!(!EmbeddedQueue::all_empty(&[&a, &b]).expect("all_empty"), "in flight counts");
        b.ack(&receipts(&got)).await.expect("ack");
        assert!(EmbeddedQueue::all_empty(&[&a, &b]).expect("all_empty"));
        let elsewhere = other.queue(config("c", false));
        let err = EmbeddedQueue::all_empty(&[&a, &elsewhere]).expect_err("two databases");
        assert!(err.to_string().contains("not in the database of queue a"), "{err}");
    }

    #[tokio::test]
    async fn receive_respects_max_and_id_order() {
        let (db, _) = db();
        let q = db.queue(config("q", false));
        q.send(std_msgs(&["1", "2", "3", "4", "5"])).await.expect("send");
        assert!(q.receive(0).await.expect("receive 0").is_empty());
        assert_eq!(bodies(&q.receive(2).await.expect("receive")), ["1", "2"]);
        assert_eq!(bodies(&q.receive(2).await.expect("receive")), ["3", "4"]);
        assert_eq!(bodies(&q.receive(2).await.expect("receive")), ["5"]);
    }

    #[tokio::test]
    async fn released_message_keeps_its_place_in_id_order() {
        let (db, _) = db();
        let q = db.queue(config("q", false));
        q.send(std_msgs(&["1", "2", "3"])).await.expect("send");
        let got = q.receive(1).await.expect("receive");
        q.release(&got[0].receipt, Duration::ZERO).await.expect("release");
        let again = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&again), ["1", "2", "3"], "a touched row merges back in id order");
        assert_eq!(again.iter().map(|m| m.receive_count).collect::<Vec<_>>(), [2, 1, 1]);
    }

    #[tokio::test]
    async fn stale_receipts_do_nothing() {
        let (db, clock) = db();
        let q = db.queue(config("q", false));
        q.send(std_msgs(&["m"])).await.expect("send");
        let old = q.receive(1).await.expect("receive").remove(0);
        clock.advance(millis(VIS));
        let new = q.receive(1).await.expect("receive").remove(0);
        assert_eq!(new.receive_count, 2);

        q.ack(std::slice::from_ref(&old.receipt)).await.expect("stale ack");
        q.release(&old.receipt, Duration::ZERO).await.expect("stale release");
        q.ack(&["garbage".to_string(), "1.x".to_string()]).await.expect("malformed ack is ignored");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth { visible: 0, in_flight: 1 }, "still in flight");
        assert!(q.receive(1).await.expect("receive").is_empty());

        q.ack(&[new.receipt]).await.expect("ack");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth::default());
    }

    #[tokio::test]
    async fn receipts_of_one_queue_do_not_touch_another() {
        let (db, _) = db();
        let a = db.queue(config("a", false));
        let b = db.queue(config("b", false));
        a.send(std_msgs(&["x"])).await.expect("send");
        let got = a.receive(1).await.expect("receive");
        b.ack(&receipts(&got)).await.expect("ack on the wrong queue");
        assert_eq!(a.depth().await.expect("depth").in_flight, 1);
        assert_eq!(b.depth().await.expect("depth"), QueueDepth::default());
    }

    #[tokio::test]
    async fn release_with_delay_makes_visible_later_with_the_same_count() {
        let (db, clock) = db();
        let q = db.queue(config("q", false));
        q.send(std_msgs(&["m"])).await.expect("send");
        let m = q.receive(1).await.expect("receive").remove(0);
        q.release(&m.receipt, Duration::from_secs(5)).await.expect("release");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth { visible: 0, in_flight: 1 });
        clock.advance(4_999);
        assert!(q.receive(1).await.expect("receive").is_empty());
        clock.advance(1);
        let again = q.receive(1).await.expect("receive");
        assert_eq!(again[0].receive_count, 2, "count raised by the receive, not the release");
    }

    #[tokio::test]
    async fn fifo_hands_out_groups_in_order_and_locks_them() {
        let (db, _) = db();
        let q = db.queue(config("q.fifo", true));
        q.send(fifo_msgs(&["a1", "a2", "b1", "a3", "b2", "c1"])).await.expect("send");

        let a1 = q.receive(1).await.expect("receive");
        assert_eq!(bodies(&a1), ["a1"]);
        let more = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&more), ["b1", "b2", "c1"], "group b and c flow while a is in flight");
        assert!(q.receive(10).await.expect("receive").is_empty(), "every group is in flight");

        q.ack(&receipts(&a1)).await.expect("ack a1");
        let rest_a = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&rest_a), ["a2", "a3"], "several of one group in one receive, in order");
        assert_eq!(rest_a[0].group.as_deref(), Some("a"));
    }

    /// Two consumers sharing four groups: each receive takes two groups, whole and in order,
    /// the receives hold disjoint groups, and a group comes back only once acknowledged.
    #[tokio::test]
    async fn fifo_consumers_sharing_groups_receive_disjoint_groups() {
        let (db, _) = db();
        let q = db.queue(config("q.fifo", true));
        q.share_groups(4, 2);
        q.send(fifo_msgs(&["a1", "b1", "c1", "d1", "a2", "b2", "c2", "d2"])).await.expect("send");

        let first = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&first), ["a1", "b1", "a2", "b2"], "the first two groups, each in order");
        let second = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&second), ["c1", "d1", "c2", "d2"], "the other two groups");
        assert!(q.receive(10).await.expect("receive").is_empty(), "every group is held by one of them");

        q.send(fifo_msgs(&["a3", "c3"])).await.expect("send");
        assert!(q.receive(10).await.expect("receive").is_empty(), "a and c are still held");
        q.ack(&receipts(&second)).await.expect("ack c and d");
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["c3"], "c free again; a still held");

        q.share_groups(4, 1);
        q.ack(&receipts(&first)).await.expect("ack a and b");
        q.send(fifo_msgs(&["b3", "d3"])).await.expect("send");
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["a3", "b3", "d3"], "one consumer takes all");
    }

    /// A group left out of a receive for the share is left out whole: a later receive starts it
    /// at its head, never in the middle.
    #[tokio::test]
    async fn fifo_group_left_to_another_receive_starts_at_its_head() {
        let (db, _) = db();
        let q = db.queue(config("q.fifo", true));
        q.share_groups(2, 2);
        q.send(fifo_msgs(&["a1", "b1", "a2", "b2", "a3"])).await.expect("send");
        let a = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&a), ["a1", "a2", "a3"]);
        let b = q.receive(1).await.expect("receive");
        assert_eq!(bodies(&b), ["b1"]);
        q.ack(&receipts(&a)).await.expect("ack a");
        assert!(q.receive(10).await.expect("receive").is_empty(), "b2 waits behind b1 in flight");
        q.ack(&receipts(&b)).await.expect("ack b1");
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["b2"]);
    }

    #[tokio::test]
    async fn fifo_group_stays_blocked_while_any_message_is_in_flight() {
        let (db, _) = db();
        let q = db.queue(config("q.fifo", true));
        q.send(fifo_msgs(&["a1", "a2", "a3"])).await.expect("send");
        let got = q.receive(2).await.expect("receive");
        assert_eq!(bodies(&got), ["a1", "a2"]);
        q.ack(&receipts(&got[..1])).await.expect("ack a1 only");
        assert!(q.receive(10).await.expect("receive").is_empty(), "a2 in flight blocks a3");
    }

    #[tokio::test]
    async fn fifo_release_with_delay_blocks_the_group() {
        let (db, clock) = db();
        let q = db.queue(config("q.fifo", true));
        q.send(fifo_msgs(&["a1", "a2", "b1"])).await.expect("send");
        let a1 = q.receive(1).await.expect("receive").remove(0);
        q.release(&a1.receipt, Duration::from_secs(10)).await.expect("release");
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["b1"], "a2 must not jump ahead of a1");
        clock.advance(10_000);
        let a = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&a), ["a1", "a2"]);
        assert_eq!(a[0].receive_count, 2);
    }

    #[tokio::test]
    async fn fifo_expired_visibility_redelivers_the_head_first() {
        let (db, clock) = db();
        let q = db.queue(config("q.fifo", true));
        q.send(fifo_msgs(&["a1", "a2"])).await.expect("send");
        assert_eq!(bodies(&q.receive(1).await.expect("receive")), ["a1"]);
        assert!(q.receive(10).await.expect("receive").is_empty());
        clock.advance(millis(VIS));
        let again = q.receive(1).await.expect("receive");
        assert_eq!(bodies(&again), ["a1"]);
        assert_eq!(again[0].receive_count, 2);
    }

    #[tokio::test]
    async fn fifo_messages_without_group_share_one_group() {
        let (db, _) = db();
        let q = db.queue(config("q.fifo", true));
        q.send(std_msgs(&["x", "y"])).await.expect("send");
        assert_eq!(bodies(&q.receive(1).await.expect("receive")), ["x"]);
        assert!(q.receive(10).await.expect("receive").is_empty());
    }

    #[tokio::test]
    async fn standard_queue_has_no_group_locking() {
        let (db, _) = db();
        let q = db.queue(config("q", false));
        q.send(fifo_msgs(&["a1", "a2"])).await.expect("send");
        assert_eq!(bodies(&q.receive(1).await.expect("receive")), ["a1"]);
        let next = q.receive(1).await.expect("receive");
        assert_eq!(bodies(&next), ["a2"], "a1 in flight does not hold back a2");
        q.send(fifo_msgs(&["a1"])).await.expect("send again");
        assert_eq!(q.depth().await.expect("depth").visible, 1, "no deduplication on a standard queue");
    }

    #[tokio::test]
    async fn fifo_deduplication_window() {
        let (db, clock) = db();
        let mut cfg = config("q.fifo", true);
        cfg.dedup_window = Duration::from_secs(60);
        let q = db.queue(cfg);
        q.send(fifo_msgs(&["a1", "a1"])).await.expect("send");
        assert_eq!(q.depth().await.expect("depth").visible, 1, "duplicate in the same batch dropped");
        let got = q.receive(1).await.expect("receive");
        q.ack(&receipts(&got)).await.expect("ack");
        clock.advance(59_999);
        q.send(fifo_msgs(&["a1"])).await.expect("send");
        assert_eq!(q.depth().await.expect("depth").visible, 0, "still within the window, even after the ack");
        clock.advance(1);
        q.send(fifo_msgs(&["a1"])).await.expect("send");
        assert_eq!(q.depth().await.expect("depth").visible, 1, "the window has passed");
        // Another queue has its own ids.
        let other = db.queue(config("other.fifo", true));
        other.send(fifo_msgs(&["a1"])).await.expect("send");
        assert_eq!(other.depth().await.expect("depth").visible, 1);
    }

    #[tokio::test]
    async fn dead_letter_after_max_receives() {
        let (db, clock) = db();
        let mut cfg = config("q.fifo", true);
        cfg.max_receive_count = 2;
        cfg.dead_letter = Some("q-dlq".into());
        let q = db.queue(cfg);
        let dlq = db.queue(config("q-dlq", true));
        q.send(fifo_msgs(&["a1", "a2"])).await.expect("send");

        let mut last = Vec::new();
        for count in 1..=2 {
            last = q.receive(10).await.expect("receive");
            assert_eq!(bodies(&last), ["a1", "a2"]);
            assert_eq!(last[0].receive_count, count);
            clock.advance(millis(VIS));
        }
        let got = q.receive(10).await.expect("receive");
        assert!(got.is_empty(), "both went to the dead-letter queue: {got:?}");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth::default());

        let dead = dlq.peek_all().expect("peek");
        assert_eq!(
            dead.iter().map(|m| (m.body.as_str(), m.group.as_deref(), m.receive_count)).collect::<Vec<_>>(),
            [("a1", Some("a"), 0), ("a2", Some("a"), 0)]
        );
        let from_dlq = dlq.receive(10).await.expect("receive dlq");
        assert_eq!(bodies(&from_dlq), ["a1", "a2"], "FIFO order kept in the dead-letter queue");
        let ids = |m: &[InMessage]| m.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&from_dlq), ids(&last), "a message keeps its id in the dead-letter queue");
        q.ack(&receipts(&last)).await.expect("a receipt from before the move");
        assert_eq!(dlq.depth().await.expect("depth").in_flight, 2, "does not touch the moved messages");
        assert!(from_dlq.iter().all(|m| m.receive_count == 1), "receive count starts over");
    }

    #[tokio::test]
    async fn dead_lettered_head_lets_the_rest_of_its_group_flow() {
        let (db, clock) = db();
        let mut cfg = config("q.fifo", true);
        cfg.max_receive_count = 1;
        cfg.dead_letter = Some("dlq".into());
        let q = db.queue(cfg);
        q.send(fifo_msgs(&["a1"])).await.expect("send");
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["a1"]);
        q.send(fifo_msgs(&["a2"])).await.expect("send");
        clock.advance(millis(VIS));
        let got = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&got), ["a2"], "a1 dead-lettered in the same receive, a2 handed out");
        assert_eq!(db.queue(config("dlq", true)).depth().await.expect("depth").visible, 1);
    }

    #[tokio::test]
    async fn without_dead_letter_queue_messages_keep_coming_back() {
        let (db, clock) = db();
        let mut cfg = config("q", false);
        cfg.max_receive_count = 1;
        let q = db.queue(cfg);
        q.send(std_msgs(&["m"])).await.expect("send");
        for count in 1..=3 {
            let got = q.receive(1).await.expect("receive");
            assert_eq!(got.iter().map(|m| m.receive_count).collect::<Vec<_>>(), [count]);
            clock.advance(millis(VIS));
        }
    }

    #[tokio::test]
    async fn too_large_is_refused_and_nothing_is_sent() {
        let (db, _) = db();
        let mut cfg = config("q", false);
        cfg.max_body_bytes = 4;
        let q = db.queue(cfg);
        let err = q.send(std_msgs(&["ok", "too long"])).await.expect_err("too large");
        assert!(matches!(err, QueueError::TooLarge { bytes: 8, .. }), "{err}");
        assert_eq!(q.depth().await.expect("depth"), QueueDepth::default());
    }

    #[tokio::test]
    async fn persists_across_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        let clock = ManualClock::new(1_000_000);
        let (receipt, first_id) = {
            let db = EmbeddedDb::open(&path, Arc::new(clock.clone())).expect("open");
            let q = db.queue(config("q.fifo", true));
            q.send(fifo_msgs(&["a1", "a2", "b1"])).await.expect("send");
            let got = q.receive(1).await.expect("receive").remove(0);
            (got.receipt, got.id)
        };
        let db = EmbeddedDb::open(&path, Arc::new(clock.clone())).expect("reopen");
        let q = db.queue(config("q.fifo", true));
        assert_eq!(q.depth().await.expect("depth"), QueueDepth { visible: 2, in_flight: 1 });
        assert_eq!(bodies(&q.receive(10).await.expect("receive")), ["b1"], "group a still locked");
        q.ack(&[receipt]).await.expect("ack with a receipt from before the restart");
        let rest = q.receive(10).await.expect("receive");
        assert_eq!(bodies(&rest), ["a2"]);
        q.send(fifo_msgs(&["c1"])).await.expect("send");
        let ids: Vec<i64> = q.peek_all().expect("peek").iter().map(|m| m.id).collect();
        assert!(ids.iter().all(|&id| id > first_id.parse::<i64>().expect("numeric id")), "ids never reused");
    }

    /// The receive, send and ack queries run off the indexes, not table scans.
    #[test]
    fn queries_use_the_indexes() {
        let (db, _) = db();
        let conn = db.lock();
        let plan = |sql: &str| -> String {
            let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).expect("prepare");
            // Unbound parameters read as NULL, which is fine for a plan.
            let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
            let rows = stmt.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3)).expect("plan");
            rows.collect::<Result<Vec<_>, _>>().expect("rows").join(" | ")
        };
        let fresh = plan(SQL_FRESH);
        assert!(fresh.contains("USING COVERING INDEX queue_fresh") && !fresh.contains("TEMP B-TREE"), "{fresh}");
        let again = plan(SQL_VISIBLE_AGAIN);
        assert!(again.contains("USING INDEX queue_touched (queue=? AND visible_at"), "{again}");
        let blocked = plan(SQL_GROUP_BLOCKED);
        assert!(
            blocked.contains("USING COVERING INDEX queue_touched_group (queue=? AND grp=? AND visible_at>?)"),
            "{blocked}"
        );
        for sql in [SQL_DEPTH, SQL_IS_EMPTY] {
            let p = plan(sql);
            assert!(!p.contains("SCAN queue_messages"), "{p}");
        }
    }
}
