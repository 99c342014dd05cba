//! A stand-in for the Lambda SQS event source mapping, for the emulator-backed tests and the cost
//! benchmark: receive a batch from the function's queue, invoke the handler with it as an SQS
//! event, delete what the response does not report as failed. Failed messages keep the
//! visibility the handler gave them, as on AWS.
use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use dualsync::ports::InMessage;
use lambda_runtime::Error;

use crate::Handler;

/// What one invocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invocation {
    pub messages: usize,
    pub failed: usize,
    /// Time spent in the handler (what Lambda bills).
    pub billed: Duration,
}

/// The SQS event Lambda would build from received messages.
pub fn sqs_event(msgs: &[InMessage]) -> SqsEvent {
    let mut event = SqsEvent::default();
    event.records = msgs
        .iter()
        .map(|m| {
            let mut r = SqsMessage::default();
            r.message_id = Some(m.id.clone());
            r.receipt_handle = Some(m.receipt.clone());
            r.body = Some(m.body.clone());
            r.attributes.insert("ApproximateReceiveCount".into(), m.receive_count.to_string());
            if let Some(g) = &m.group {
                r.attributes.insert("MessageGroupId".into(), g.clone());
            }
            r.event_source = Some("aws:sqs".into());
            r
        })
        .collect();
    event
}

/// One poll: `None` when the queue had nothing visible.
pub async fn poll_once(handler: &Handler, batch: usize) -> Result<Option<Invocation>, Error> {
    let queue = handler.input();
    let msgs = queue.receive(batch).await?;
    if msgs.is_empty() {
        return Ok(None);
    }
    let started = Instant::now();
    // What Lambda would give as the request id: one per invocation.
    let response = handler.handle(&format!("local-{}", msgs[0].id), sqs_event(&msgs)).await?;
    let billed = started.elapsed();
    let failed: HashSet<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
    let done: Vec<String> =
        msgs.iter().filter(|m| !failed.contains(m.id.as_str())).map(|m| m.receipt.clone()).collect();
    if !done.is_empty() {
        queue.ack(&done).await?;
    }
    Ok(Some(Invocation { messages: msgs.len(), failed: failed.len(), billed }))
}
