//! Capture (DESIGN §2.1): turn change notifications into validated change references.
//!
//! Rules from the seeds: a delete never enters the async pipeline, it goes through the live
//! path now; a transaction touching both async and live maps is rejected whole, naming the
//! misconfigured entities. Capture is idempotent under redelivery (dedupe by app and
//! transaction id), drops the echo of dualsync's own writes when the notification carries the
//! version dualsync wrote, and raises each link's highest seen seq so that delivery can tell a
//! stale change from the latest.
use std::collections::BTreeSet;
use tracing::{debug, warn};

use super::deliver::ChangeResult;
use super::{LoadedJob, Metrics, Outcome, StepError, Steps};
use crate::domain::canon;
use crate::domain::change::{
    split_by_size, CapturedTransaction, ChangeRef, Key, Operation, StoredTransaction, TransactionNotification,
    MAX_MESSAGE_BYTES,
};
use crate::domain::errors::ErrorCategory;
use crate::domain::job::{JobStatus, Mode, Side};
use crate::domain::keys;
use crate::domain::link::LinkState;
use crate::ports::{ConnectorError, InMessage, KvError, OutMessage, Put, QueueError, Record};
use crate::state::{DeleteMark, State, VersionedLink};

/// How often capture re-reads links whose seen-seq update lost a race before giving up.
const MAX_RACES: usize = 5;

impl Steps {
    pub async fn capture(&self, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut alert: BTreeSet<String> = BTreeSet::new();
        // One message's failure is its own: the others of the batch go on.
        for m in msgs {
            let before = Metrics::get(&self.metrics.application);
            outcomes.push(match self.capture_one(m).await {
                Ok(outcome) => outcome,
                Err(e @ StepError::Crashed(_)) => return Err(e),
                Err(StepError::Queue(e @ QueueError::TooLarge { .. })) => Outcome::Poison { reason: e.to_string() },
                Err(e) => {
                    warn!(message_id = %m.id, error = %e, "capture failed; the message will be retried");
                    Outcome::Retry { delay: self.backoff.delay(m.receive_count, None), reason: e.to_string() }
                }
            });
            if Metrics::get(&self.metrics.application) > before {
                alert.extend(serde_json::from_str::<TransactionNotification>(&m.body).ok().map(|tx| tx.job));
            }
        }
        // The alert rule once per batch and job that recorded application errors.
        for job in alert {
            self.check_alert(&job).await?;
        }
        Ok(outcomes)
    }

    async fn capture_one(&self, m: &InMessage) -> Result<Outcome, StepError> {
        let tx: TransactionNotification = match serde_json::from_str(&m.body) {
            Ok(tx) => tx,
            Err(e) => return Ok(Outcome::Poison { reason: format!("malformed change notification: {e}") }),
        };
        let Some(lj) = self.load_job(&tx.job).await? else {
            return Ok(Outcome::Poison { reason: format!("unknown job '{}'", tx.job) });
        };
        let job = &lj.job;
        let Some(source) = job.side_of(&tx.app) else {
            let apps = format!("{}, {}", job.app_name(Side::A), job.app_name(Side::B));
            return Ok(Outcome::Poison {
                reason: format!("app '{}' is not an app of job '{}' (apps: {apps})", tx.app, job.name),
            });
        };
        if let Some(why) = keys::txid_too_long(&job.name, &tx.app, &tx.txid) {
            return Ok(Outcome::Poison { reason: format!("{why}; app '{}'", tx.app) });
        }
        let captured = match tx.parts.is_whole() {
            true => self.state.tx_captured(&job.name, &tx.app, &tx.txid).await?,
            false => self.state.part_captured(&job.name, &tx.app, &tx.txid, tx.parts.index).await?,
        };
        if captured {
            return Ok(Outcome::Done);
        }
        if lj.status == JobStatus::Starting {
            return Ok(Outcome::Retry {
                delay: self.backoff.delay(m.receive_count, None),
                reason: format!("job '{}' is still starting", job.name),
            });
        }

        // Validate and resolve every change against the job.
        let mut upserts: Vec<(ChangeRef, Mode, Option<String>)> = Vec::new();
        let mut deletes: Vec<(usize, ChangeRef)> = Vec::new();
        for ch in &tx.changes {
            let mut c = ChangeRef {
                map: ch.entity.clone(),
                source,
                key: ch.key.clone(),
                seq: ch.seq,
                txid: tx.txid.clone(),
                at_ms: ch.at_ms,
                retry_of: None,
                waited: false,
            };
            let mapped = job.map_for_entity(source, &ch.entity);
            if let Some((_, map)) = mapped {
                c.map = map.name.clone();
            }
            // Every item keyed by a record key must be storable, the error row's too.
            if let Some(why) = keys::record_key_too_long(&job.name, &c.map, &c.key) {
                c.key = c.key.abbreviated();
                self.record_raw(&job.name, &c, &ch.entity, &tx.app, ErrorCategory::Application, why).await?;
                continue;
            }
            if ch.app != tx.app {
                let msg =
                    format!("change of {} names app '{}' inside a transaction of app '{}'", ch.entity, ch.app, tx.app);
                self.record_raw(&job.name, &c, &ch.entity, &tx.app, ErrorCategory::Application, msg).await?;
                continue;
            }
            let Some((m, map)) = mapped else {
                let msg = format!("entity '{}' of app '{}' is not mapped in job '{}'", ch.entity, tx.app, job.name);
                self.record_raw(&job.name, &c, &ch.entity, &tx.app, ErrorCategory::Application, msg).await?;
                continue;
            };
            if let Err(msg) = check_key(&ch.key, &map.key_fields(source), &ch.entity) {
                self.record_raw(&job.name, &c, &ch.entity, &tx.app, ErrorCategory::Application, msg).await?;
                continue;
            }
            if !job.company_in_scope(ch.company.as_deref()) {
                Metrics::add(&self.metrics.out_of_scope, 1);
                continue;
            }
            match ch.op {
                Operation::Delete => deletes.push((m, c)),
                Operation::Upsert => upserts.push((c, map.mode, ch.version.clone())),
            }
        }
        // A paused job keeps capturing: delivery keeps its changes until it resumes.
        if !(lj.status == JobStatus::Active || lj.status.holds_deliveries()) {
            let msg = format!(
                "job '{}' is {}: change not synced; retry it once the job is active",
                job.name,
                lj.status.as_str()
            );
            self.record_each(&lj, &upserts, &deletes, &msg).await?;
            return self.finish(&lj, source, &tx, Vec::new()).await;
        }

        let live_entities = entities(&lj, upserts.iter().filter(|u| u.1 == Mode::Live).map(|u| &u.0));
        let async_entities = entities(&lj, upserts.iter().filter(|u| u.1 == Mode::Async).map(|u| &u.0));
        if !live_entities.is_empty() && !async_entities.is_empty() {
            let msg = format!(
                "transaction {} mixes async and live maps; make them all one mode. async: {}; live: {}",
                tx.txid,
                async_entities.into_iter().collect::<Vec<_>>().join(", "),
                live_entities.into_iter().collect::<Vec<_>>().join(", "),
            );
            self.record_each(&lj, &upserts, &deletes, &msg).await?;
            return self.finish(&lj, source, &tx, Vec::new()).await;
        }

        // The live path: deletes and live maps, done now.
        let begun = match self.begin_deletes(&lj, &deletes, m.receive_count).await? {
            Ok(begun) => begun,
            Err(outcome) => return Ok(outcome),
        };
        for ((map, c), before) in deletes.iter().zip(begun) {
            if let Some(outcome) = self.run_delete(&lj, *map, c, before, m.receive_count).await? {
                return Ok(outcome);
            }
        }
        let (live, queued): (Vec<_>, Vec<_>) = upserts.into_iter().partition(|u| u.1 == Mode::Live);
        let live: Vec<ChangeRef> = live.into_iter().map(|u| u.0).collect();
        for r in self.deliver_now(&lj, &live).await? {
            if let ChangeResult::System { retry_after, message } = r {
                return Ok(Outcome::Retry { delay: self.backoff.delay(m.receive_count, retry_after), reason: message });
            }
        }

        let changes = self.raise_seen(&lj, queued).await?;
        Metrics::add(&self.metrics.captured, changes.len() as u64);
        self.finish(&lj, source, &tx, changes).await
    }

    /// Sends the captured changes on, then remembers the transaction id (or part). A crash
    /// between the two repeats the send, which delivery absorbs (deduplication id, loopback
    /// control).
    ///
    /// A transaction that fits in one message goes to sequence in it. One that does not (or
    /// came in parts) is kept in the state table part by part, and once every part is kept a
    /// message naming it goes to sequence, which orders the whole transaction: a child's
    /// parent may be in another part (see docs/design-notes.md, "Transactions of any size").
    async fn finish(
        &self,
        lj: &LoadedJob,
        source: Side,
        tx: &TransactionNotification,
        changes: Vec<ChangeRef>,
    ) -> Result<Outcome, StepError> {
        let job = &lj.job.name;
        let mut captured =
            CapturedTransaction { job: job.clone(), source, txid: tx.txid.clone(), changes, stored: None };
        let body = serde_json::to_string(&captured).unwrap_or_default();
        if tx.parts.is_whole() && body.len() <= MAX_MESSAGE_BYTES {
            if !captured.changes.is_empty() {
                self.sequence_queue.send(vec![OutMessage::standard(body)]).await?;
            }
        } else {
            let pieces = match split_by_size(std::mem::take(&mut captured.changes), 2, MAX_MESSAGE_BYTES) {
                Ok(p) => p,
                Err(e) => return Ok(Outcome::Poison { reason: format!("transaction {}: {e}", tx.txid) }),
            };
            if self.state.keep_part(job, &tx.app, &tx.txid, tx.parts, pieces).await? {
                captured.stored = Some(StoredTransaction { app: tx.app.clone() });
                let body = serde_json::to_string(&captured).unwrap_or_default();
                self.sequence_queue.send(vec![OutMessage::standard(body)]).await?;
            }
        }
        self.failpoints.check("capture.after_send")?;
        let mark = match tx.parts.is_whole() {
            true => self.state.tx_mark(job, &tx.app, &tx.txid),
            false => self.state.part_mark(job, &tx.app, &tx.txid, tx.parts.index),
        };
        self.state.kv().put(mark).await?;
        Ok(Outcome::Done)
    }

    /// Records an application error row for each change of a transaction that goes no further;
    /// a delete's row says so, so that its retry runs the live delete again (a retry through
    /// delivery would find the record missing at its source and skip it, or let the other
    /// side's change create it again).
    async fn record_each(
        &self,
        lj: &LoadedJob,
        upserts: &[(ChangeRef, Mode, Option<String>)],
        deletes: &[(usize, ChangeRef)],
        msg: &str,
    ) -> Result<(), StepError> {
        for (c, _, _) in upserts {
            self.record(lj, c, ErrorCategory::Application, msg.to_string()).await?;
        }
        for (_, c) in deletes {
            self.record_delete(lj, c, ErrorCategory::Application, msg.to_string()).await?;
        }
        Ok(())
    }

    /// Marks every delete of a transaction begun before any of them runs, each with the version
    /// of the target's record it means to delete. A capture that did not finish (killed, or its
    /// acknowledgement lost) comes back after the visibility timeout, when either side may hold
    /// a record created or changed since: the marks tell what each delete meant, also for the
    /// deletes it never reached. Returns, per delete, what an earlier run left or this one
    /// found, or the outcome when a target could not be read.
    async fn begin_deletes(
        &self,
        lj: &LoadedJob,
        deletes: &[(usize, ChangeRef)],
        receive_count: u32,
    ) -> Result<Result<Vec<Begun>, Outcome>, StepError> {
        let job = &lj.job;
        let mut begun = Vec::with_capacity(deletes.len());
        for (m, c) in deletes {
            let app = job.app_name(c.source);
            if let Some(mark) = self.state.delete_mark(&job.name, app, &c.txid, &c.map, &c.key).await? {
                begun.push(Begun::Earlier(mark));
                continue;
            }
            let found = match self.read_target(lj, *m, c, receive_count).await {
                Ok(found) => found,
                Err(outcome) => return Ok(Err(outcome)),
            };
            let mark = DeleteMark { target_version: found.as_ref().map(|r| r.version.clone()) };
            self.state.put_delete_mark(&job.name, app, &c.txid, &c.map, &c.key, &mark).await?;
            begun.push(Begun::Now(found));
        }
        if begun.iter().any(|b| matches!(b, Begun::Now(_))) {
            self.failpoints.check("capture.delete_marked")?;
        }
        Ok(Ok(begun))
    }

    /// The delete's target record as it is now; the outcome when it cannot be read.
    pub(crate) async fn read_target(
        &self,
        lj: &LoadedJob,
        m: usize,
        c: &ChangeRef,
        receive_count: u32,
    ) -> Result<Option<Record>, Outcome> {
        let target = c.source.other();
        match lj.connector(target).read(lj.spec(m, target), std::slice::from_ref(&c.key)).await {
            Ok(found) => Ok(found.into_iter().next().flatten()),
            Err(e) => Err(self.unreachable(c, &e, receive_count)),
        }
    }

    /// Runs the live delete of `c`, a change of map `m`, as [`Self::begin_deletes`] left it.
    /// `Some(outcome)` when the message must be retried. Also how a retry request runs a
    /// delete's row again.
    ///
    /// Like any change, a delete older than one already applied is stale (DESIGN §3 step 1):
    /// a delete of its record from the same side that ran says so (the link it removed is
    /// gone). Run, a delete captured late, its message retried or behind a backlog, deleted a
    /// record created since on either side (the kill -9 soak found one gone from both).
    pub(crate) async fn run_delete(
        &self,
        lj: &LoadedJob,
        m: usize,
        c: &ChangeRef,
        begun: Begun,
        receive_count: u32,
    ) -> Result<Option<Outcome>, StepError> {
        let deleted = self.state.deleted_seqs(&lj.job.name, &c.map, &c.key).await?[c.source.index()];
        // Seq 0: the app does not tell a delete's place among its changes (OData change
        // tracking's deleted entities), so its age cannot be judged.
        if c.seq != 0 && c.seq < deleted {
            let msg = format!("skipped: a newer delete (seq {deleted}) of {}/{} ran", c.map, c.key);
            self.record(lj, c, ErrorCategory::Concurrency, msg).await?;
            return Ok(None);
        }
        match begun {
            Begun::Earlier(mark) => self.delete_again(lj, m, c, mark, receive_count).await,
            Begun::Now(found) => self.delete_now(lj, m, c, found, receive_count).await,
        }
    }

    /// A live delete that could not reach an app: its message is retried.
    fn unreachable(&self, c: &ChangeRef, e: &ConnectorError, receive_count: u32) -> Outcome {
        let reason = format!("live delete of {}/{}: {}", c.map, c.key, e.message());
        Outcome::Retry { delay: self.backoff.delay(receive_count, e.retry_after()), reason }
    }

    /// Deletes `found`, the counterpart of `c`, now, unless the record exists again at the
    /// source.
    async fn delete_now(
        &self,
        lj: &LoadedJob,
        m: usize,
        c: &ChangeRef,
        found: Option<Record>,
        receive_count: u32,
    ) -> Result<Option<Outcome>, StepError> {
        let job = &lj.job;
        // Like any change, a delete is read fresh: a record that exists again at its source
        // (created again since, by a user or by our own create that raced the delete) makes it
        // stale, and the record's newer change decides.
        let key = std::slice::from_ref(&c.key);
        let at_source = match lj.connector(c.source).read(lj.spec(m, c.source), key).await {
            Ok(found) => found.into_iter().next().flatten(),
            Err(e) => return Ok(Some(self.unreachable(c, &e, receive_count))),
        };
        if let Some(record) = at_source {
            // Unless what is there is our own create of the content both sides last agreed
            // on, made after the delete: the delete wins over it, on both sides.
            if !self.ours(lj, m, c, &record).await? {
                let msg = format!("skipped: {}/{} exists again in {}", c.map, c.key, job.app_name(c.source));
                self.record(lj, c, ErrorCategory::Concurrency, msg).await?;
                return Ok(None);
            }
            debug!(job = %job.name, map = %c.map, key = %c.key, txid = %c.txid, "live delete: our create came back at the source; deleting it there");
            if let Err(e) = lj.connector(c.source).delete(lj.spec(m, c.source), key).await {
                return Ok(Some(self.unreachable(c, &e, receive_count)));
            }
        }
        self.delete_target(lj, m, c, found, receive_count).await
    }

    /// The live delete of `c` began in an earlier run (its mark says so): the target's record is deleted
    /// only if it is still the one the delete meant. One created or changed since stays, and
    /// its own change decides (DESIGN §3: an edit wins over a delete). One still the same goes
    /// the way of a first run ([`Self::delete_now`]), source read first: the earlier run may
    /// have stopped before it judged anything (the source unreachable), and the record the
    /// mark names may be the other side's newer one, which reached the source since.
    async fn delete_again(
        &self,
        lj: &LoadedJob,
        m: usize,
        c: &ChangeRef,
        mark: DeleteMark,
        receive_count: u32,
    ) -> Result<Option<Outcome>, StepError> {
        let found = match self.read_target(lj, m, c, receive_count).await {
            Ok(found) => found,
            Err(outcome) => return Ok(Some(outcome)),
        };
        match (found, mark.target_version) {
            (Some(r), Some(v)) if r.version == v => self.delete_now(lj, m, c, Some(r), receive_count).await,
            (Some(_), _) => {
                debug!(job = %lj.job.name, map = %c.map, key = %c.key, txid = %c.txid, "live delete run again: the target's record is newer than the delete");
                // Newer, and perhaps our create that raced the delete: its check decides.
                self.check_our_create(lj, c).await?;
                Ok(None)
            }
            // The delete landed; what may be left is its bookkeeping.
            (None, _) => self.deleted(lj, c).await.map(|()| None),
        }
    }

    /// Deletes `found`, the target's record of `c`, then its link. A record other than the one
    /// last synced stays: the change that made it, made without seeing the delete, wins over
    /// it (as an edit wins over a delete begun before it, see [`Self::delete_again`]), and a
    /// check from its side sends it on, also when that change was decided already (a conflict
    /// it lost).
    async fn delete_target(
        &self,
        lj: &LoadedJob,
        m: usize,
        c: &ChangeRef,
        found: Option<Record>,
        receive_count: u32,
    ) -> Result<Option<Outcome>, StepError> {
        let job = &lj.job;
        let target = c.source.other();
        let Some(record) = found else {
            return self.deleted(lj, c).await.map(|()| None);
        };
        let link = self.link(lj, c).await?;
        let hash = canon::canon(&job.maps[m], target, &record.fields).ok().map(|h| canon::hash(&h));
        if !link.as_ref().is_some_and(|l| hash.is_some_and(|h| l.state.synced_content(&h))) {
            let msg = format!(
                "skipped: {}/{} changed in {} since the last sync; that change wins over the delete",
                c.map,
                c.key,
                job.app_name(target)
            );
            self.record(lj, c, ErrorCategory::Concurrency, msg).await?;
            let link = link.map(|l| l.state).unwrap_or_default();
            let seq = record.seq.unwrap_or(0).max(link.seen(target)).max(link.synced[target.index()]);
            let check = ChangeRef { source: target, seq, retry_of: None, waited: false, ..c.clone() };
            return self.send_check(lj, check, &format!("delete-skip-{}-{}", c.txid, c.seq)).await.map(|()| None);
        }
        debug!(job = %job.name, map = %c.map, key = %c.key, txid = %c.txid, retry = c.retry_of.is_some(), "live delete");
        match lj.connector(target).delete(lj.spec(m, target), std::slice::from_ref(&c.key)).await {
            Ok(()) => {
                self.deleted(lj, c).await?;
                Metrics::add(&self.metrics.live_deletes, 1);
                Ok(None)
            }
            Err(e @ ConnectorError::Transient { .. }) => {
                warn!(job = %job.name, map = %c.map, key = %c.key, txid = %c.txid, reason = %e.message(), "live delete failed; will retry");
                Ok(Some(self.unreachable(c, &e, receive_count)))
            }
            Err(ConnectorError::Rejected { message, .. }) => {
                let msg = format!("{} refused the delete of {}/{}: {message}", job.app_name(target), c.map, c.key);
                self.record_delete(lj, c, ErrorCategory::Application, msg).await?;
                Ok(None)
            }
        }
    }

    /// The target's record of `c` is gone: so is its link, unless our create of it may be
    /// under way (a check then judges it). The link goes at the revision read: a delivery that
    /// marks a create in between changes it, and the next round sees that mark. Deleted
    /// regardless, the create landed with no link, and the record came back on the side whose
    /// user deleted it (found by the property tests).
    async fn deleted(&self, lj: &LoadedJob, c: &ChangeRef) -> Result<(), StepError> {
        let job = &lj.job.name;
        self.state.remember_delete(job, &c.map, &c.key, c.source, c.seq).await?;
        loop {
            let Some(link) = self.link(lj, c).await? else { return Ok(()) };
            if creating(&link.state, c) {
                return self.send_create_check(lj, c).await;
            }
            if self.state.forget_link(job, &c.map, &c.key, link.rev).await? {
                let why = "the record no longer exists on either side";
                return Ok(self.state.close_errors(job, &link.state.open_errors, why).await?);
            }
        }
    }

    /// When the link of `c` marks our create of the record in the delete's target, a check from
    /// the delete's side judges it (see [`Self::send_check`]); true then.
    async fn check_our_create(&self, lj: &LoadedJob, c: &ChangeRef) -> Result<bool, StepError> {
        if !self.link(lj, c).await?.is_some_and(|l| creating(&l.state, c)) {
            return Ok(false);
        }
        self.send_create_check(lj, c).await?;
        Ok(true)
    }

    async fn send_create_check(&self, lj: &LoadedJob, c: &ChangeRef) -> Result<(), StepError> {
        let check = ChangeRef { retry_of: None, waited: false, ..c.clone() };
        self.send_check(lj, check, &format!("delete-check-{}-{}", c.txid, c.seq)).await
    }

    async fn link(&self, lj: &LoadedJob, c: &ChangeRef) -> Result<Option<VersionedLink>, StepError> {
        Ok(self.state.links(&lj.job.name, &[(c.map.as_str(), &c.key)]).await?.pop().flatten())
    }

    /// Sends `check` down its record's lane, behind any delivery of the record under way. From
    /// the delete's side when our create of the record may be under way, between its read and
    /// its write (this delete found nothing to delete then): it finds the source gone and undoes
    /// a create that landed (deliver, `created_here`); the link stays for it to judge. From the
    /// other side when its change wins over the delete.
    async fn send_check(&self, lj: &LoadedJob, check: ChangeRef, tag: &str) -> Result<(), StepError> {
        self.deliver_queue.send(super::redeliver::redelivery(&lj.job, vec![check], tag)).await?;
        Ok(())
    }

    /// Whether `record`, at the source of change `c`, holds what our pending create wrote there
    /// from the other side's unchanged record (see [`crate::domain::link::PendingWrite::restores`]).
    async fn ours(&self, lj: &LoadedJob, m: usize, c: &ChangeRef, record: &Record) -> Result<bool, StepError> {
        let link = self.link(lj, c).await?;
        let Some(p) = link.and_then(|l| l.state.pending) else { return Ok(false) };
        let hash = canon::canon(&lj.job.maps[m], c.source, &record.fields).ok().map(|h| canon::hash(&h));
        Ok(p.side == c.source && p.restores && hash.as_deref() == Some(p.hash.as_str()))
    }

    /// Drops echoes of dualsync's own writes and raises each remaining link's seen seq (unless
    /// the source's reads give each record's latest change seq, see [`crate::ports::Connector::reads_change_seq`]).
    async fn raise_seen(
        &self,
        lj: &LoadedJob,
        changes: Vec<(ChangeRef, Mode, Option<String>)>,
    ) -> Result<Vec<ChangeRef>, StepError> {
        let job = &lj.job.name;
        let reads_seq = changes.first().is_some_and(|(c, _, _)| lj.connector(c.source).reads_change_seq());
        let mut keep: Vec<ChangeRef> = Vec::with_capacity(changes.len());
        let mut pending: Vec<(ChangeRef, Option<String>)> = changes.into_iter().map(|(c, _, v)| (c, v)).collect();
        for _ in 0..MAX_RACES {
            if pending.is_empty() {
                break;
            }
            let refs: Vec<(&str, &Key)> = pending.iter().map(|(c, _)| (c.map.as_str(), &c.key)).collect();
            let links = self.state.links(job, &refs).await?;
            let mut puts: Vec<Put> = Vec::new();
            let mut raised: Vec<usize> = Vec::new();
            for (n, ((c, version), link)) in pending.iter().zip(links).enumerate() {
                let echo =
                    version.is_some() && link.as_ref().and_then(|l| l.state.version(c.source)) == version.as_deref();
                if echo {
                    Metrics::add(&self.metrics.echoes_suppressed, 1);
                    continue;
                }
                let (mut state, rev) = match link {
                    Some(l) => (l.state, Some(l.rev)),
                    None => (LinkState::default(), None),
                };
                // Where reads tell the record's latest seq, delivery checks staleness with it:
                // no link write here.
                if !reads_seq && state.raise_seen(c.source, c.seq) {
                    puts.push(State::link_put(job, &c.map, &c.key, &state, rev));
                    raised.push(n);
                } else {
                    keep.push(c.clone());
                }
            }
            let answers = self.state.put_links(puts).await?;
            let mut again = Vec::new();
            for (n, a) in raised.into_iter().zip(answers) {
                match a {
                    Ok(_) => keep.push(pending[n].0.clone()),
                    Err(KvError::ConditionFailed { .. }) => again.push(pending[n].clone()),
                    Err(e) => return Err(e.into()),
                }
            }
            pending = again;
        }
        // Still racing: pass them on; delivery's fresh read and link checks keep them safe.
        keep.extend(pending.into_iter().map(|(c, _)| c));
        Ok(keep)
    }
}

/// A delete of a transaction as [`Steps::begin_deletes`] leaves it.
pub(crate) enum Begun {
    /// An earlier run of the transaction's capture marked it begun.
    Earlier(DeleteMark),
    /// Begun now: the target's record as read (`None`: absent).
    Now(Option<Record>),
}

/// Whether `link` marks our create of `c`'s record in the delete's target.
fn creating(link: &LinkState, c: &ChangeRef) -> bool {
    link.pending.as_ref().is_some_and(|p| p.side == c.source.other() && p.from_version.is_none())
}

fn entities<'a>(lj: &LoadedJob, changes: impl Iterator<Item = &'a ChangeRef>) -> BTreeSet<String> {
    changes.filter_map(|c| lj.job.map(&c.map).map(|(_, m)| format!("{} ({})", m.entity(c.source), m.name))).collect()
}

/// A key is well formed when it has one non-empty value per key field.
fn check_key(key: &Key, fields: &[String], entity: &str) -> Result<(), String> {
    if key.0.len() != fields.len() {
        return Err(format!(
            "malformed key for {entity}: {} value(s), expected {} ({})",
            key.0.len(),
            fields.len(),
            fields.join(", ")
        ));
    }
    if let Some(i) = key.0.iter().position(|v| v.is_empty()) {
        return Err(format!("malformed key for {entity}: key field {} is empty", fields[i]));
    }
    Ok(())
}
