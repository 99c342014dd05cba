//! SQS events in, `SqsBatchResponse` out: pure mappings, so they are tested without AWS.
use std::collections::BTreeSet;
use std::time::Duration;

use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsMessage};
use dualsync::ports::InMessage;
use dualsync::steps::Outcome;

/// The event's records as queue messages. A record without a message id or receipt handle
/// cannot be handled or even reported; the second value counts them (they are logged, and SQS
/// redelivers them after the visibility timeout).
pub fn in_messages(records: Vec<SqsMessage>) -> (Vec<InMessage>, usize) {
    let mut msgs = Vec::with_capacity(records.len());
    let mut unreadable = 0;
    for r in records {
        let (Some(id), Some(receipt)) = (r.message_id, r.receipt_handle) else {
            unreadable += 1;
            continue;
        };
        msgs.push(InMessage {
            id,
            receipt,
            body: r.body.unwrap_or_default(),
            group: r.attributes.get("MessageGroupId").cloned(),
            receive_count: r.attributes.get("ApproximateReceiveCount").and_then(|c| c.parse().ok()).unwrap_or(1),
        });
    }
    (msgs, unreadable)
}

/// The response that reports every message not done as failed, and the visibility each
/// failed message should get: its backoff for a retry, zero for poison.
pub fn batch_response(
    msgs: &[InMessage],
    outcomes: &[Outcome],
    unreadable: usize,
) -> (SqsBatchResponse, Vec<(String, Duration)>) {
    if unreadable > 0 {
        tracing::error!(
            unreadable,
            "records without a message id or receipt handle: they come back after the visibility timeout"
        );
    }
    let mut response = SqsBatchResponse::default();
    let mut releases = Vec::new();
    for (m, o) in msgs.iter().zip(outcomes) {
        let delay = match o {
            Outcome::Done => continue,
            Outcome::Retry { delay, .. } => *delay,
            Outcome::Poison { .. } => Duration::ZERO,
        };
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = m.id.clone();
        response.batch_item_failures.push(failure);
        releases.push((m.receipt.clone(), delay));
    }
    (response, releases)
}

/// The transaction ids a batch carries (capture and sequence messages name one, delivery
/// messages one per change), for the logs' correlation id. At most 10, then a count.
pub fn correlation_id(msgs: &[InMessage]) -> String {
    let mut ids = BTreeSet::new();
    for m in msgs {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&m.body) else { continue };
        if let Some(t) = v.get("txid").and_then(|t| t.as_str()) {
            ids.insert(t.to_string());
        }
        for lane in v.get("lanes").and_then(|l| l.as_array()).into_iter().flatten() {
            for c in lane.get("changes").and_then(|c| c.as_array()).into_iter().flatten() {
                if let Some(t) = c.get("txid").and_then(|t| t.as_str()) {
                    ids.insert(t.to_string());
                }
            }
        }
    }
    let n = ids.len();
    let mut out: Vec<String> = ids.into_iter().take(10).collect();
    if n > 10 {
        out.push(format!("+{} more", n - 10));
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: Option<&str>, group: Option<&str>, count: &str, body: &str) -> SqsMessage {
        let mut r = SqsMessage::default();
        r.message_id = id.map(str::to_string);
        r.receipt_handle = id.map(|i| format!("rh-{i}"));
        r.body = Some(body.to_string());
        r.attributes.insert("ApproximateReceiveCount".into(), count.into());
        if let Some(g) = group {
            r.attributes.insert("MessageGroupId".into(), g.into());
        }
        r
    }

    #[test]
    fn records_become_messages_with_group_and_receive_count() {
        let (msgs, unreadable) =
            in_messages(vec![record(Some("a"), Some("g1"), "3", "{}"), record(None, None, "1", "{}")]);
        assert_eq!(unreadable, 1);
        assert_eq!(msgs.len(), 1);
        assert_eq!((msgs[0].id.as_str(), msgs[0].receipt.as_str()), ("a", "rh-a"));
        assert_eq!((msgs[0].group.as_deref(), msgs[0].receive_count), (Some("g1"), 3));
    }

    #[test]
    fn only_messages_not_done_are_reported_with_their_visibility() {
        let (msgs, _) = in_messages(vec![
            record(Some("a"), None, "1", "{}"),
            record(Some("b"), None, "1", "{}"),
            record(Some("c"), None, "1", "{}"),
        ]);
        let outcomes = [
            Outcome::Done,
            Outcome::Retry { delay: Duration::from_secs(2), reason: "down".into() },
            Outcome::Poison { reason: "bad".into() },
        ];
        let (response, releases) = batch_response(&msgs, &outcomes, 0);
        let failed: Vec<&str> = response.batch_item_failures.iter().map(|f| f.item_identifier.as_str()).collect();
        assert_eq!(failed, ["b", "c"]);
        assert_eq!(releases, vec![("rh-b".to_string(), Duration::from_secs(2)), ("rh-c".to_string(), Duration::ZERO)]);
    }

    #[test]
    fn correlation_id_lists_the_transactions() {
        let (msgs, _) = in_messages(vec![
            record(Some("a"), None, "1", r#"{"job":"j","txid":"t1"}"#),
            record(Some("b"), None, "1", r#"{"lanes":[{"root":"r","changes":[{"txid":"t2"},{"txid":"t1"}]}]}"#),
            record(Some("c"), None, "1", "not json"),
        ]);
        assert_eq!(correlation_id(&msgs), "t1,t2");
    }
}
