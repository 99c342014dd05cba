//! Local ingress: reads a local app's change log and puts one notification per transaction on
//! the capture queue, like a webhook or business event would on AWS.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::adapters::connectors::sqlite::OWN_WRITE_TXID_PREFIX;
use crate::domain::change::{ChangeNotification, TransactionNotification};
use crate::ports::{ChangeFeed, OutMessage, Queue, RawChange};
use crate::state::State;
use crate::steps::StepError;

/// Moves up to `limit` change-log rows of one app onto the capture queue; returns how many
/// rows it consumed.
///
/// The position is saved after the send, so a crash in between sends the same transactions
/// again, which capture's dedupe drops. A page never ends inside a transaction, so the same
/// rows always form the same notification (one larger than the page goes alone). Rows of
/// dualsync's own writes (their transaction id says so) are echoes: they stop here, counted in
/// `echoes`; capture's version check and delivery's content check catch the echoes of apps that
/// cannot mark their writes.
pub async fn pump_feed(
    state: &State,
    job: &str,
    app: &str,
    feed: &dyn ChangeFeed,
    capture: &dyn Queue,
    limit: usize,
    echoes: &AtomicU64,
) -> Result<usize, StepError> {
    let pos = state.feed_position(job, app).await?;
    let rows = feed.changes_after(pos, limit).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let full = rows.len() == limit;
    let mut groups: Vec<Vec<RawChange>> = Vec::new();
    for r in rows {
        match groups.last_mut() {
            Some(g) if g[0].txid == r.txid => g.push(r),
            _ => groups.push(vec![r]),
        }
    }
    if full && groups.len() > 1 {
        groups.pop(); // may continue past this page
    }
    let last = groups.last().and_then(|g| g.last()).map(|r| r.seq).unwrap_or(pos);
    let count: usize = groups.iter().map(Vec::len).sum();
    let (own, theirs): (Vec<_>, Vec<_>) =
        groups.into_iter().partition(|g| g[0].txid.starts_with(OWN_WRITE_TXID_PREFIX));
    echoes.fetch_add(own.iter().map(|g| g.len() as u64).sum(), Ordering::Relaxed);
    let msgs: Vec<OutMessage> = theirs
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
    if !msgs.is_empty() {
        capture.send(msgs).await?;
    }
    state.set_feed_position(job, app, last).await?;
    Ok(count)
}
