//! Queues between the steps. They carry references only, never record data.
//!
//! Semantics follow SQS: a received message is invisible for the queue's visibility timeout;
//! unacknowledged, it comes back with its receive count raised, and past the queue's maximum it
//! moves to the dead-letter queue, keeping its id and group (a dead-letter queue is a queue like
//! any other: an operator receives from it to send messages back). On a FIFO queue, messages of one group are handed out in
//! order and never while an earlier one of the group is in flight; a deduplication id seen
//! within the deduplication window drops the message.
use async_trait::async_trait;
use serde::Serialize;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub body: String,
    /// FIFO message group; `None` on a standard queue.
    pub group: Option<String>,
    /// FIFO deduplication id; `None` on a standard queue.
    pub dedup_id: Option<String>,
}

impl OutMessage {
    pub fn standard(body: String) -> Self {
        OutMessage { body, group: None, dedup_id: None }
    }
    pub fn fifo(body: String, group: String, dedup_id: String) -> Self {
        OutMessage { body, group: Some(group), dedup_id: Some(dedup_id) }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InMessage {
    pub id: String,
    /// Proof of this receipt: acknowledging with a stale receipt does nothing.
    pub receipt: String,
    pub body: String,
    pub group: Option<String>,
    /// 1 on the first delivery.
    pub receive_count: u32,
}

/// How many messages a queue holds (what an operator reads to see how far behind a step is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct QueueDepth {
    /// Ready to be received.
    pub visible: u64,
    /// Invisible: received and not yet acknowledged (within the visibility timeout), or
    /// released or sent with a delay that has not passed. `visible + in_flight` is every
    /// message held.
    pub in_flight: u64,
}

impl QueueDepth {
    /// No message at all, visible or not.
    pub fn is_empty(&self) -> bool {
        self.visible == 0 && self.in_flight == 0
    }
}

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("queue {queue} unavailable: {reason}")]
    Unavailable { queue: String, reason: String },
    #[error("message too large for queue {queue}: {bytes} bytes")]
    TooLarge { queue: String, bytes: usize },
}

#[async_trait]
pub trait Queue: Send + Sync {
    fn name(&self) -> &str;
    /// Maximum receives before a message goes to the dead-letter queue.
    fn max_receive_count(&self) -> u32;
    async fn send(&self, msgs: Vec<OutMessage>) -> Result<(), QueueError>;
    /// Up to `max` visible messages (FIFO order and group locking honoured).
    async fn receive(&self, max: usize) -> Result<Vec<InMessage>, QueueError>;
    async fn ack(&self, receipts: &[String]) -> Result<(), QueueError>;
    /// Gives a received message back, visible again after `delay` (backoff for retries).
    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), QueueError>;
    /// How many messages are visible and how many in flight, now. Exact on the embedded queue;
    /// on SQS the approximate counts it keeps (they lag sends and receives by up to a minute).
    async fn depth(&self) -> Result<QueueDepth, QueueError>;
}
