//! What is queued (issue 12: "what is queued and how far behind delivery is"): how many messages
//! each step's queue and its dead-letter queue hold, visible and in flight.
//!
//! The queues are the pipeline's, shared by every job: a job view shows them as they are, not a
//! job's share of them (a message names its job only in its body, which counting does not read).
//! A queue that cannot be read says why in its own field, so one missing queue or permission
//! does not fail the whole view.
use std::time::Duration;

use futures::future::join_all;
use serde::Serialize;

use super::{Admin, DeadLetterQueue};
use crate::ports::{Queue, QueueDepth};

/// How long one queue's depth is waited for before the view says it could not be read (a job
/// view is read every few seconds by a dashboard; SQS answers in milliseconds).
pub const DEPTH_TIMEOUT: Duration = Duration::from_secs(5);

/// One queue's depth as read now, or why it could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueueReading {
    /// The queue's full name.
    pub queue: String,
    #[serde(flatten)]
    pub depth: Reading,
}

/// `{"visible": 1, "in_flight": 0}` or `{"error": "..."}` beside the queue's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Reading {
    Depth(QueueDepth),
    Unreadable { error: String },
}

/// A step's queue and its dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepQueues {
    /// The step that reads the queue: capture, sequence, deliver or reconcile.
    pub step: &'static str,
    pub queue: QueueReading,
    pub dead_letter: QueueReading,
}

async fn read(queue: &dyn Queue) -> QueueReading {
    let depth = match tokio::time::timeout(DEPTH_TIMEOUT, queue.depth()).await {
        Ok(Ok(depth)) => Reading::Depth(depth),
        Ok(Err(e)) => Reading::Unreadable { error: e.to_string() },
        Err(_) => Reading::Unreadable { error: format!("no answer within {} s", DEPTH_TIMEOUT.as_secs()) },
    };
    if let Reading::Unreadable { error } = &depth {
        tracing::warn!(queue = queue.name(), error = %error, "a queue's depth could not be read");
    }
    QueueReading { queue: queue.name().to_string(), depth }
}

async fn read_step(q: &DeadLetterQueue) -> StepQueues {
    let (queue, dead_letter) = futures::join!(read(q.work.as_ref()), read(q.dead.as_ref()));
    StepQueues { step: q.step.name(), queue, dead_letter }
}

impl Admin {
    /// Every step's queue and dead-letter queue, in pipeline order, read side by side now.
    pub async fn pipeline_queues(&self) -> Vec<StepQueues> {
        join_all(self.dead_letter_queues.iter().map(read_step)).await
    }
}
