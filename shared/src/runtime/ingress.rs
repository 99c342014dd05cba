//! Local ingress: reads a local app's change log and puts one notification per transaction on
//! the capture queue, like a webhook or business event would on AWS.
use crate::domain::change::{ChangeNotification, TransactionNotification};
use crate::ports::{ChangeFeed, OutMessage, Queue, RawChange};
use crate::state::State;
use crate::steps::StepError;

/// Moves up to `limit` change-log rows of one app onto the capture queue; returns how many.
///
/// The position is saved after the send, so a crash in between sends the same transactions
/// again, which capture's dedupe drops. A page never ends inside a transaction, so the same
/// rows always form the same notification (one larger than the page goes alone).
pub async fn pump_feed(
    state: &State,
    job: &str,
    app: &str,
    feed: &dyn ChangeFeed,
    capture: &dyn Queue,
    limit: usize,
) -> Result<usize, StepError> {
    let pos = state.feed_position(job, app).await?;
    let rows = feed
        .changes_after(pos, limit)
        .await
        .map_err(|e| StepError::Kv(crate::ports::KvError::Unavailable(format!("change log of {app}: {e}"))))?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut groups: Vec<Vec<RawChange>> = Vec::new();
    for r in rows.iter() {
        match groups.last_mut() {
            Some(g) if g[0].txid == r.txid => g.push(r.clone()),
            _ => groups.push(vec![r.clone()]),
        }
    }
    if rows.len() == limit && groups.len() > 1 {
        groups.pop(); // may continue past this page
    }
    let last = groups.last().and_then(|g| g.last()).map(|r| r.seq).unwrap_or(pos);
    let count: usize = groups.iter().map(Vec::len).sum();
    let msgs: Vec<OutMessage> = groups
        .into_iter()
        .map(|g| {
            let tx = TransactionNotification {
                job: job.to_string(),
                app: app.to_string(),
                // The first seq makes a transaction split over pages two distinct notifications.
                txid: format!("{}@{}", g[0].txid, g[0].seq),
                changes: g
                    .into_iter()
                    .map(|r| ChangeNotification {
                        app: app.to_string(),
                        entity: r.entity,
                        key: r.key,
                        op: r.op,
                        seq: r.seq,
                        version: r.version,
                        company: r.company,
                        at_ms: r.at_ms,
                    })
                    .collect(),
            };
            OutMessage::standard(serde_json::to_string(&tx).unwrap_or_default())
        })
        .collect();
    capture.send(msgs).await?;
    state.set_feed_position(job, app, last).await?;
    Ok(count)
}
