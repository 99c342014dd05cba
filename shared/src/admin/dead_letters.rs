//! Dead letters for operators: the rows that say why each message reached a dead-letter queue,
//! and redrive, which sends messages from a dead-letter queue back to their work queue.
//!
//! The dead-letter queue holds the messages; the row is the record. A row and its message are
//! matched by message id (a message keeps its id when it moves to the dead-letter queue). A
//! redriven message goes back as a new message, so if it fails again it reaches the dead-letter
//! queue again under a new id, with a row of its own; the old row is settled as `redriven`.
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{Admin, AdminError};
use crate::domain::errors::{DeadLetter, DeadLetterStatus};
use crate::ports::{InMessage, OutMessage, Page, Queue, QueueError};
use crate::state::{job_of, DeadLetterCursor};
use crate::steps::StepKind;

/// The most messages one redrive sends back (the admin function has 30 s): redrive again for
/// the rest.
pub const MAX_REDRIVE: usize = 1000;

/// A work queue and its dead-letter queue.
#[derive(Clone)]
pub struct DeadLetterQueue {
    /// The step that reads the work queue.
    pub step: StepKind,
    pub work: Arc<dyn Queue>,
    pub dead: Arc<dyn Queue>,
}

/// Which dead letters of a queue a redrive sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redrive {
    /// One message, by id.
    Message(String),
    /// Every message that names this job.
    Job(String),
    All,
}

/// What a redrive did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RedriveReport {
    /// The work queue the messages went back to.
    pub queue: String,
    /// The ids of the messages sent back, in order.
    pub redriven: Vec<String>,
    /// Messages of the dead-letter queue looked at and left there (not selected).
    pub left: usize,
    /// It stopped at [`MAX_REDRIVE`] messages: redrive again for the rest.
    pub more: bool,
}

impl From<QueueError> for AdminError {
    fn from(e: QueueError) -> Self {
        AdminError::Internal(e.to_string())
    }
}

/// A queue's name without `.fifo`: `dualsync-dev-deliver` for `dualsync-dev-deliver.fifo`.
fn base_name(name: &str) -> &str {
    name.strip_suffix(".fifo").unwrap_or(name)
}

impl Admin {
    /// The queue named `name`: its full name, or its step's name (`capture`, `deliver`, ...).
    fn dead_letter_queue(&self, name: &str) -> Result<&DeadLetterQueue, AdminError> {
        let wanted = base_name(name);
        let found = self.dead_letter_queues.iter().find(|q| {
            let have = base_name(q.work.name());
            !wanted.is_empty() && (have == wanted || have.ends_with(&format!("-{wanted}")))
        });
        found.ok_or_else(|| {
            let names: Vec<&str> = self.dead_letter_queues.iter().map(|q| q.work.name()).collect();
            AdminError::NotFound(format!("no queue named '{name}': the queues are {}", names.join(", ")))
        })
    }

    /// Dead-letter rows of one queue or of all, newest first.
    pub async fn dead_letters(
        &self,
        queue: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<Page<DeadLetter>, AdminError> {
        if !(1..=1000).contains(&limit) {
            return Err(AdminError::BadRequest(format!("limit {limit} is out of range: use 1 to 1000")));
        }
        let queues: Vec<&str> = match queue {
            Some(name) => vec![self.dead_letter_queue(name)?.work.name()],
            None => self.dead_letter_queues.iter().map(|q| q.work.name()).collect(),
        };
        let cursor = match after {
            None => None,
            Some(a) => {
                Some(DeadLetterCursor::parse(a).filter(|c| queues.contains(&c.queue.as_str())).ok_or_else(|| {
                    AdminError::BadRequest(format!(
                        "'{a}' is not a cursor of this list: pass the `next` of the page before"
                    ))
                })?)
            }
        };
        Ok(self.state.dead_letter_page(&queues, limit, cursor.as_ref()).await?)
    }

    pub async fn dead_letter(&self, queue: &str, message_id: &str) -> Result<DeadLetter, AdminError> {
        let q = self.dead_letter_queue(queue)?;
        let row = self.state.dead_letter(q.work.name(), message_id).await?;
        row.ok_or_else(|| AdminError::NotFound(format!("queue {} has no dead letter '{message_id}'", q.work.name())))
    }

    /// Sends dead letters of `queue` back to it, to be handled as any message is. FIFO messages
    /// keep their group and order and get a deduplication id of their own (the original one may
    /// still be in the queue's window, which would drop them).
    pub async fn redrive(&self, queue: &str, which: &Redrive) -> Result<RedriveReport, AdminError> {
        let q = self.dead_letter_queue(queue)?;
        let row = match which {
            Redrive::Message(id) => Some(self.dead_letter(queue, id).await?),
            Redrive::Job(_) | Redrive::All => None,
        };
        let mut report = RedriveReport { queue: q.work.name().to_string(), redriven: Vec::new(), left: 0, more: false };
        let mut held = Vec::new();
        let pass = self.redrive_pass(q, which, &mut report, &mut held).await;
        // What was looked at and left is visible again at once, whatever happened.
        for receipt in &held {
            if let Err(e) = q.dead.release(receipt, Duration::ZERO).await {
                tracing::warn!(queue = q.dead.name(), error = %e, "a dead letter looked at stays invisible for its timeout");
            }
        }
        pass?;
        match row {
            Some(row) if report.redriven.is_empty() => Err(match row.status {
                DeadLetterStatus::Redriven => AdminError::Refused(format!(
                    "dead letter '{}' of queue {} was redriven already (at {} ms)",
                    row.message_id,
                    row.queue,
                    row.redriven_ms.unwrap_or_default()
                )),
                DeadLetterStatus::Dead => AdminError::NotFound(format!(
                    "message '{}' is not in dead-letter queue {}: it expired there (after 14 days), or it waits \
                     behind other messages of its FIFO group: redrive its job or the whole queue",
                    row.message_id,
                    q.dead.name()
                )),
            }),
            _ => Ok(report),
        }
    }

    /// Receives the dead-letter queue until it is empty or comes round again, sending the
    /// selected messages back; the receipts of the rest go to `held`.
    async fn redrive_pass(
        &self,
        q: &DeadLetterQueue,
        which: &Redrive,
        report: &mut RedriveReport,
        held: &mut Vec<String>,
    ) -> Result<(), AdminError> {
        let queue = q.work.name();
        let mut seen = HashSet::new();
        loop {
            let batch = q.dead.receive(10).await?;
            if batch.is_empty() {
                return Ok(());
            }
            let ids: Vec<String> = batch.iter().map(|m| m.id.clone()).collect();
            let rows = self.state.dead_letters_by_id(queue, &ids).await?;
            let (mut chosen, mut came_round) = (Vec::<InMessage>::new(), false);
            for (m, row) in batch.into_iter().zip(rows) {
                // A message seen before in this pass: its visibility ran out while we went on.
                let first_look = seen.insert(m.id.clone());
                came_round |= !first_look;
                let job = row.map_or_else(|| job_of(&m.body), |r| r.job);
                let selected = match which {
                    Redrive::Message(id) => m.id == *id,
                    Redrive::Job(j) => job.as_deref() == Some(j.as_str()),
                    Redrive::All => true,
                };
                if first_look && selected && report.redriven.len() + chosen.len() < MAX_REDRIVE {
                    chosen.push(m);
                } else {
                    report.left += usize::from(first_look);
                    held.push(m.receipt);
                }
            }
            if !chosen.is_empty() {
                let out = chosen
                    .iter()
                    .map(|m| match &m.group {
                        Some(group) => OutMessage::fifo(m.body.clone(), group.clone(), format!("redrive-{}", m.id)),
                        None => OutMessage::standard(m.body.clone()),
                    })
                    .collect();
                q.work.send(out).await?;
                // Settled before the delete: after a crash in between, the message is still in
                // the dead-letter queue for a later redrive (whose send is deduplicated on FIFO;
                // the steps take a repeat on the standard queues).
                for m in &chosen {
                    self.state.settle_dead_letter(queue, &m.id).await?;
                }
                let receipts: Vec<String> = chosen.iter().map(|m| m.receipt.clone()).collect();
                q.dead.ack(&receipts).await?;
                report.redriven.extend(chosen.into_iter().map(|m| m.id));
            }
            if came_round || matches!(which, Redrive::Message(id) if report.redriven.contains(id)) {
                return Ok(());
            }
            if report.redriven.len() >= MAX_REDRIVE {
                report.more = true;
                return Ok(());
            }
        }
    }
}
