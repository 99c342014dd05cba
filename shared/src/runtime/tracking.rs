//! Change-tracking ingress: polls an odata app's tracked changes (delta links) map by map and
//! puts references on the capture queue, like local ingress does with a sqlite app's change log
//! ([`super::ingress`], whose splitting it shares): one notification per page of changes, in
//! parts when it does not fit a message, the position saved after the send.
//!
//! A deleted record comes back named by its id alone, so every record seen is remembered with
//! its integration key ([`State::remember_tracked`]); a delete whose id was never seen leaves
//! an error row naming the map and the id. A delta token the app no longer knows starts a full
//! listing again: every record listed gets an upsert reference (delivery's content check makes
//! those of records in step harmless), and the records the listing no longer shows, which were
//! deleted while tracking could not tell, get delete references.
use tracing::{info, warn};

use crate::domain::canon::key_text;
use crate::domain::change::{ChangeNotification, Key, Operation, Parts, TransactionNotification};
use crate::domain::errors::ErrorCategory;
use crate::domain::job::{Job, Side, TableMap};
use crate::domain::sequence::short_hash;
use crate::ports::{ChangeTracking, EntitySpec, OutMessage, Queue, Tracked, TrackedPage};
use crate::state::{NewError, State, TrackingPosition};
use crate::steps::ingress::fit;
use crate::steps::{ConnectorRegistry, StepError};

/// What one poll of one map did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PollReport {
    pub pages: usize,
    pub upserts: usize,
    pub deletes: usize,
    /// Deletes of records never seen: each left an error row.
    pub unknown_deletes: usize,
    /// The delta token had expired: the map was listed afresh.
    pub resynced: bool,
    /// The page budget ran out before the answer's last page: poll again soon.
    pub more: bool,
}

/// The maps whose changes dualsync polls by change tracking: every map of a side whose app
/// has `capture: change_tracking`.
pub fn tracked_maps(job: &Job) -> Vec<(Side, usize)> {
    Side::BOTH
        .into_iter()
        .filter(|s| job.apps[s.index()].tracking.is_some())
        .flat_map(|s| (0..job.maps.len()).map(move |m| (s, m)))
        .collect()
}

/// Polls every tracked map of every capturing job once, `max_pages` pages each at most (a
/// scheduled invocation's bounded work: a map with more goes on at the next). One map's
/// failure is logged and the others go on; the references sent and the maps that failed.
pub async fn poll_all(
    state: &State,
    apps: &dyn ConnectorRegistry,
    capture: &dyn Queue,
    max_pages: usize,
) -> Result<(usize, usize), StepError> {
    let (mut sent, mut failed) = (0, 0);
    for job in state.capturing_jobs().await? {
        for (side, m) in tracked_maps(&job) {
            let map = &job.maps[m];
            let polled = match apps.tracker(&job, side) {
                Ok(source) => poll_map(state, &job, side, map, source.as_ref(), capture, max_pages).await,
                Err(e) => Err(e.into()),
            };
            match polled {
                Ok(r) => sent += r.upserts + r.deletes,
                Err(e) => {
                    failed += 1;
                    warn!(job = %job.name, app = job.app_name(side), map = %map.name, error = %e,
                        "change tracking: poll failed; the next one tries again");
                }
            }
        }
    }
    Ok((sent, failed))
}

/// What change tracking asks of a map on `side`: its key fields, and the company field.
pub fn tracked_spec(map: &TableMap, side: Side) -> EntitySpec {
    EntitySpec {
        name: map.entity(side).to_string(),
        key_fields: map.key_fields(side),
        fields: map.company.iter().map(|c| c[side.index()].clone()).collect(),
        binds: vec![],
    }
}

/// Polls map `map` of the job's app on `side`: pages of changes until an answer's last page
/// (the delta link is kept for the next poll), `max_pages` at most.
pub async fn poll_map(
    state: &State,
    job: &Job,
    side: Side,
    map: &TableMap,
    source: &dyn ChangeTracking,
    capture: &dyn Queue,
    max_pages: usize,
) -> Result<PollReport, StepError> {
    let app = job.app_name(side);
    let spec = tracked_spec(map, side);
    let mut pos = state.tracking_position(&job.name, app, &map.name).await?;
    let mut report = PollReport::default();
    while report.pages < max_pages.max(1) {
        if pos.link.is_none() && !pos.listing_open {
            pos.listing += 1;
            pos.listing_open = true;
        }
        let asked = pos.link.clone().unwrap_or_else(|| format!("listing {}", pos.listing));
        let page = match source.track(&spec, pos.link.as_deref()).await? {
            Tracked::Page(p) => p,
            Tracked::Expired(message) if !report.resynced => {
                warn!(job = %job.name, app, map = %map.name, reason = %message,
                    "change tracking: the app no longer knows the delta token; listing the map afresh (full resync)");
                report.resynced = true;
                pos = TrackingPosition { link: None, listing: pos.listing, listing_open: false };
                continue;
            }
            Tracked::Expired(message) => {
                return Err(StepError::Refused(format!(
                    "change tracking of {app}/{}: a fresh listing's link expired at once: {message}",
                    map.name
                )))
            }
        };
        report.pages += 1;
        let last = page.next.is_none();
        let next = page.next.clone().or_else(|| page.delta.clone());
        let gone = take_page(state, job, side, map, &pos, &asked, page, capture, &mut report).await?;
        pos.link = next;
        if last {
            pos.listing_open = false;
        }
        state.set_tracking_position(&job.name, app, &map.name, &pos).await?;
        // Forgotten only once the position has moved on: a crash before it gets the same
        // deletes again, and they must still resolve.
        state.forget_tracked(&job.name, app, &map.name, &gone).await?;
        if last {
            if report.resynced {
                info!(job = %job.name, app, map = %map.name, "change tracking: the full resync is listed");
            }
            return Ok(report);
        }
    }
    report.more = true;
    Ok(report)
}

/// Sends one page's references; returns the ids of the records it deleted.
#[allow(clippy::too_many_arguments)]
async fn take_page(
    state: &State,
    job: &Job,
    side: Side,
    map: &TableMap,
    pos: &TrackingPosition,
    asked: &str,
    page: TrackedPage,
    capture: &dyn Queue,
    report: &mut PollReport,
) -> Result<Vec<String>, StepError> {
    let app = job.app_name(side);
    let at_ms = state.now_ms();
    let company_field = map.company.as_ref().map(|c| c[side.index()].clone());
    let seen: Vec<(String, Key)> = page.changes.iter().filter_map(|c| Some((c.id.clone()?, c.key.clone()?))).collect();
    state.remember_tracked(&job.name, app, &map.name, &seen, pos.listing).await?;
    let mut changes: Vec<ChangeNotification> = Vec::new();
    let note =
        |key: Key, op: Operation, seq: u64, version: Option<String>, company: Option<String>| ChangeNotification {
            app: app.to_string(),
            entity: map.entity(side).to_string(),
            key,
            op,
            seq,
            version,
            company,
            at_ms,
        };
    // A record without an integration key is outside the map (as in a listing for initial sync).
    for c in page.changes {
        let Some(key) = c.key else { continue };
        let company = company_field.as_ref().and_then(|f| c.fields.get(f)).and_then(key_text);
        changes.push(note(key, Operation::Upsert, c.seq.unwrap_or(0), c.version, company));
        report.upserts += 1;
    }
    let by_id: Vec<String> = page.deletes.iter().filter(|d| d.key.is_none()).map(|d| d.id.clone()).collect();
    let mut known = state.tracked_keys(&job.name, app, &map.name, &by_id).await?.into_iter();
    let mut gone = Vec::new();
    let mut unknown = Vec::new();
    for d in page.deletes {
        let key = match d.key {
            Some(k) => Some(k),
            None => known.next().flatten(),
        };
        match key {
            Some(key) => {
                changes.push(note(key, Operation::Delete, 0, None, None));
                if !d.id.is_empty() {
                    gone.push(d.id);
                }
            }
            None => unknown.push(d.id),
        }
    }
    // The end of a full listing: what it no longer shows was deleted meanwhile.
    if page.next.is_none() && pos.listing_open {
        for (id, key) in state.tracked_before(&job.name, app, &map.name, pos.listing).await? {
            changes.push(note(key, Operation::Delete, 0, None, None));
            gone.push(id);
        }
    }
    report.deletes += changes.iter().filter(|c| c.op == Operation::Delete).count();
    let txid = txid(&map.name, asked, &changes, &unknown);
    for id in &unknown {
        report.unknown_deletes += 1;
        let error = NewError {
            map: map.name.clone(),
            entity: map.entity(side).to_string(),
            app: app.to_string(),
            source: side,
            key: Key(vec![id.clone()]),
            by_record_id: true,
            seq: 0,
            txid: txid.clone(),
            category: ErrorCategory::Application,
            message: format!(
                "delete of {} record id {id} in {app} not captured: change tracking never saw this record, so its \
                 integration key is unknown (created and deleted between two polls, or before tracking started); \
                 its counterpart in {}, if any, was not deleted: delete it there, then dismiss this row",
                map.name,
                job.app_name(side.other())
            ),
            delete: false,
        };
        state.record_error_counted(&job.name, error).await?;
    }
    if !changes.is_empty() {
        let tx = TransactionNotification {
            job: job.name.clone(),
            app: app.to_string(),
            txid,
            changes,
            parts: Parts::default(),
        };
        let msgs: Vec<OutMessage> = fit(state, tx)
            .await?
            .iter()
            .map(|p| OutMessage::standard(serde_json::to_string(p).unwrap_or_default()))
            .collect();
        capture.send(msgs).await?;
    }
    Ok(gone)
}

/// The transaction id of a page: the link asked and what the page said. The same page asked
/// again after a crash (before its position was saved) gives the same id, so capture drops it;
/// the same link answering more since gives another one.
fn txid(map: &str, asked: &str, changes: &[ChangeNotification], unknown: &[String]) -> String {
    let mut parts: Vec<Vec<u8>> = vec![map.as_bytes().to_vec(), asked.as_bytes().to_vec()];
    for c in changes {
        let op = if c.op == Operation::Delete { "d" } else { "u" };
        parts.push(
            format!("{op}{}|{}|{}", c.seq, c.version.as_deref().unwrap_or_default(), c.key.display()).into_bytes(),
        );
    }
    parts.extend(unknown.iter().map(|id| format!("x{id}").into_bytes()));
    let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
    format!("track:{map}:{}", short_hash(&refs))
}
