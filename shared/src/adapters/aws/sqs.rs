//! A queue (see `ports::queue`) on SQS: batched sends with group and deduplication ids on FIFO
//! queues, receipts as SQS receipt handles, release as a visibility change.
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry, MessageSystemAttributeName,
    QueueAttributeName, SendMessageBatchRequestEntry,
};
use aws_sdk_sqs::Client;

use super::usage::Usage;
use crate::ports::queue::{InMessage, OutMessage, Queue, QueueDepth, QueueError};

/// SQS limits: entries per batch call, bytes per message and per batch call.
const BATCH: usize = 10;
const MAX_BYTES: usize = 256 * 1024;
/// The longest visibility timeout SQS accepts (12 hours).
const MAX_VISIBILITY_SECS: u64 = 43_200;

#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    name: String,
    url: String,
    fifo: bool,
    max_receive_count: u32,
    usage: Arc<Usage>,
}

impl SqsQueue {
    pub fn new(client: Client, name: String, url: String, max_receive_count: u32, usage: Arc<Usage>) -> Self {
        let fifo = name.ends_with(".fifo");
        SqsQueue { client, name, url, fifo, max_receive_count, usage }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn unavailable(&self, op: &str, reason: impl std::fmt::Display) -> QueueError {
        QueueError::Unavailable { queue: self.name.clone(), reason: format!("SQS {op}: {reason}") }
    }

    async fn send_batch(&self, msgs: &[OutMessage]) -> Result<(), QueueError> {
        let entries = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| {
                SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(&m.body)
                    .set_message_group_id(m.group.clone())
                    // FIFO without an id of its own: never taken for a duplicate.
                    .set_message_deduplication_id(match (&m.dedup_id, self.fifo) {
                        (None, true) => Some(uuid::Uuid::new_v4().simple().to_string()),
                        (id, _) => id.clone(),
                    })
                    .build()
                    .map_err(|e| self.unavailable("SendMessageBatch", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.usage.sqs_call(self.fifo, msgs.iter().map(|m| m.body.len()).sum());
        let out = self
            .client
            .send_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| self.unavailable("SendMessageBatch", super::brief(&e)))?;
        if let Some(f) = out.failed().first() {
            return Err(self.unavailable(
                "SendMessageBatch",
                format!(
                    "{} of {} messages refused: {}",
                    out.failed().len(),
                    msgs.len(),
                    f.message().unwrap_or(f.code())
                ),
            ));
        }
        Ok(())
    }
}

/// Consecutive runs of messages, in order, of at most ten messages and 256 KiB in total each
/// (SendMessageBatch's limits); every size must be within 256 KiB.
fn batches(sizes: impl IntoIterator<Item = usize>) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0;
    for (i, size) in sizes.into_iter().enumerate() {
        match out.last_mut() {
            Some(r) if r.len() < BATCH && bytes + size <= MAX_BYTES => {
                r.end = i + 1;
                bytes += size;
            }
            _ => {
                out.push(i..i + 1);
                bytes = size;
            }
        }
    }
    out
}

#[async_trait]
impl Queue for SqsQueue {
    fn name(&self) -> &str {
        &self.name
    }

    fn max_receive_count(&self) -> u32 {
        self.max_receive_count
    }

    async fn send(&self, msgs: Vec<OutMessage>) -> Result<(), QueueError> {
        if let Some(m) = msgs.iter().find(|m| m.body.len() > MAX_BYTES) {
            return Err(QueueError::TooLarge { queue: self.name.clone(), bytes: m.body.len() });
        }
        for range in batches(msgs.iter().map(|m| m.body.len())) {
            self.send_batch(&msgs[range]).await?;
        }
        Ok(())
    }

    async fn receive(&self, max: usize) -> Result<Vec<InMessage>, QueueError> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(max.clamp(1, BATCH) as i32)
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_system_attribute_names(MessageSystemAttributeName::MessageGroupId)
            .send()
            .await
            .map_err(|e| self.unavailable("ReceiveMessage", super::brief(&e)))?;
        let msgs: Vec<InMessage> = out
            .messages()
            .iter()
            .filter_map(|m| {
                let attr = |a: MessageSystemAttributeName| m.attributes().and_then(|x| x.get(&a)).cloned();
                Some(InMessage {
                    id: m.message_id()?.to_string(),
                    receipt: m.receipt_handle()?.to_string(),
                    body: m.body().unwrap_or_default().to_string(),
                    group: attr(MessageSystemAttributeName::MessageGroupId),
                    receive_count: attr(MessageSystemAttributeName::ApproximateReceiveCount)
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                })
            })
            .collect();
        self.usage.sqs_call(self.fifo, msgs.iter().map(|m| m.body.len()).sum());
        Ok(msgs)
    }

    async fn ack(&self, receipts: &[String]) -> Result<(), QueueError> {
        for chunk in receipts.chunks(BATCH) {
            let entries = chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(|e| self.unavailable("DeleteMessageBatch", e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            self.usage.sqs_call(self.fifo, 0);
            let out = self
                .client
                .delete_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| self.unavailable("DeleteMessageBatch", super::brief(&e)))?;
            // A stale receipt (the message came back to someone else) deletes nothing, as locally.
            if let Some(f) = out.failed().iter().find(|f| f.code() != "ReceiptHandleIsInvalid") {
                return Err(self.unavailable("DeleteMessageBatch", f.message().unwrap_or(f.code())));
            }
        }
        Ok(())
    }

    async fn release(&self, receipt: &str, delay: Duration) -> Result<(), QueueError> {
        let secs = delay.as_millis().div_ceil(1000).min(u128::from(MAX_VISIBILITY_SECS)) as i32;
        let entry = ChangeMessageVisibilityBatchRequestEntry::builder()
            .id("0")
            .receipt_handle(receipt)
            .visibility_timeout(secs)
            .build()
            .map_err(|e| self.unavailable("ChangeMessageVisibility", e))?;
        self.usage.sqs_call(self.fifo, 0);
        self.client
            .change_message_visibility_batch()
            .queue_url(&self.url)
            .entries(entry)
            .send()
            .await
            .map_err(|e| self.unavailable("ChangeMessageVisibility", super::brief(&e)))?;
        Ok(())
    }

    /// GetQueueAttributes' approximate counts: in flight are the messages received and not
    /// deleted (NotVisible) and those sent or released with a delay (Delayed).
    async fn depth(&self) -> Result<QueueDepth, QueueError> {
        self.usage.sqs_call(self.fifo, 0);
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(|e| self.unavailable("GetQueueAttributes", super::brief(&e)))?;
        // A count missing from the answer is an error, not a zero: a depth of 0 says "caught up".
        let get = |a: QueueAttributeName| -> Result<u64, QueueError> {
            let v = out.attributes().and_then(|m| m.get(&a));
            v.and_then(|v| v.parse().ok())
                .ok_or_else(|| self.unavailable("GetQueueAttributes", format!("no count {} in the answer", a.as_str())))
        };
        Ok(QueueDepth {
            visible: get(QueueAttributeName::ApproximateNumberOfMessages)?,
            in_flight: get(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?
                + get(QueueAttributeName::ApproximateNumberOfMessagesDelayed)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_keep_order_and_stay_within_ten_messages_and_256_kib() {
        let sizes = [100, 200_000, 62_044, 1, 250_000, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 262_144];
        let runs = batches(sizes);
        assert_eq!(runs, vec![0..3, 3..13, 13..16, 16..17]);
        for r in &runs {
            assert!(r.len() <= BATCH);
            assert!(sizes[r.clone()].iter().sum::<usize>() <= MAX_BYTES, "{r:?}");
        }
        assert!(batches([]).is_empty());
    }
}
