//! Drives a step from a queue: receive a batch, run the step, acknowledge or give back each
//! message by its outcome. The local equivalent of an SQS event source mapping.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, warn};

use crate::ports::{InMessage, Queue, QueueError};
use crate::steps::{Outcome, StepError};

/// Applies outcomes to the queue (see [`crate::steps::Steps::handle`]): acks in one call,
/// releases one by one; a poison message comes back at once, to reach its dead-letter queue.
pub async fn settle(queue: &dyn Queue, msgs: &[InMessage], outcomes: &[Outcome]) -> Result<(), QueueError> {
    let mut acks = Vec::new();
    for (m, o) in msgs.iter().zip(outcomes) {
        match o {
            Outcome::Done => acks.push(m.receipt.clone()),
            Outcome::Retry { delay, .. } => queue.release(&m.receipt, *delay).await?,
            Outcome::Poison { .. } => queue.release(&m.receipt, Duration::ZERO).await?,
        }
    }
    if !acks.is_empty() {
        queue.ack(&acks).await?;
    }
    Ok(())
}

/// Receives and handles one batch; returns how many messages it handled.
pub async fn run_once<F, Fut>(queue: &dyn Queue, batch: usize, handler: &F) -> Result<usize, StepError>
where
    F: Fn(Vec<InMessage>) -> Fut,
    Fut: Future<Output = (Vec<InMessage>, Result<Vec<Outcome>, StepError>)>,
{
    let msgs = queue.receive(batch).await?;
    if msgs.is_empty() {
        return Ok(0);
    }
    let n = msgs.len();
    let (msgs, result) = handler(msgs).await;
    match result {
        Ok(outcomes) => settle(queue, &msgs, &outcomes).await?,
        // A crash leaves the batch unacknowledged: it comes back after the visibility timeout.
        Err(StepError::Crashed(point)) => warn!(queue = queue.name(), %point, "step crashed"),
        Err(e) => {
            error!(queue = queue.name(), error = %e, "step failed; the batch will be retried");
            for m in &msgs {
                queue.release(&m.receipt, Duration::from_secs(1)).await?;
            }
        }
    }
    Ok(n)
}

/// Loops [`run_once`] until `shutdown` turns true; sleeps briefly when the queue is empty.
pub async fn run_loop<F, Fut>(queue: Arc<dyn Queue>, batch: usize, handler: F, mut shutdown: watch::Receiver<bool>)
where
    F: Fn(Vec<InMessage>) -> Fut,
    Fut: Future<Output = (Vec<InMessage>, Result<Vec<Outcome>, StepError>)>,
{
    let idle = Duration::from_millis(5);
    while !*shutdown.borrow() {
        let handled = match run_once(queue.as_ref(), batch, &handler).await {
            Ok(n) => n,
            Err(e) => {
                error!(queue = queue.name(), error = %e, "queue unavailable");
                0
            }
        };
        if handled == 0 {
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.changed() => {}
            }
        } else {
            tokio::task::yield_now().await;
        }
    }
}
