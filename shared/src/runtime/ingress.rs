//! Local ingress: reads a local app's change log and puts one notification per transaction on
//! the capture queue (in parts when it does not fit in one message), like a webhook or business
//! event would on AWS (see [`crate::steps::ingress`] for those).
use std::sync::atomic::{AtomicU64, Ordering};

use crate::domain::change::{ChangeNotification, Parts, TransactionNotification, OWN_WRITE_TXID_PREFIX};
use crate::ports::{ChangeFeed, OutMessage, Queue, RawChange};
use crate::state::State;
use crate::steps::ingress::fit;
use crate::steps::StepError;

/// Moves up to `limit` change-log rows of one app onto the capture queue; returns how many
/// rows it consumed.
///
/// The position is saved after the send, so a crash in between sends the same transactions
/// again, which capture's dedupe drops. A page never ends inside a transaction, so the same
/// rows always form the same notification: one that fills the page is read on to its end and
/// goes alone, in parts if it does not fit in one message. Rows of dualsync's own writes (their
/// transaction id says so) are echoes: they stop here, counted in `echoes`; capture's version
/// check and delivery's content check catch the echoes of apps that cannot mark their writes.
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
    let mut rows = feed.changes_after(pos, limit).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut full = rows.len() == limit;
    // One transaction fills the page: read on to its end, so that sequence sees all of it.
    while full && rows.iter().all(|r| r.txid == rows[0].txid) {
        let after = rows.last().map_or(pos, |r| r.seq);
        let more = feed.changes_after(after, limit).await?;
        let same = more.iter().take_while(|r| r.txid == rows[0].txid).count();
        full = same == limit;
        rows.extend(more.into_iter().take(same));
    }
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
    let mut msgs: Vec<OutMessage> = Vec::new();
    for g in theirs {
        let tx = TransactionNotification {
            job: job.to_string(),
            app: app.to_string(),
            // The first seq tells apart app transactions that reuse an id.
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
            parts: Parts::default(),
        };
        msgs.extend(
            fit(state, tx).await?.iter().map(|p| OutMessage::standard(serde_json::to_string(p).unwrap_or_default())),
        );
    }
    if !msgs.is_empty() {
        capture.send(msgs).await?;
    }
    state.set_feed_position(job, app, last).await?;
    Ok(count)
}
