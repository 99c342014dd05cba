//! Sequence (DESIGN §2.2): order a captured transaction and send its delivery batches to the
//! FIFO deliver queue, one message group per dependency root.
use super::{Outcome, StepError, Steps};
use crate::domain::change::{CapturedTransaction, MAX_MESSAGE_BYTES};
use crate::domain::sequence::{dedup_id, plan};
use crate::ports::{InMessage, OutMessage};

impl Steps {
    pub async fn sequence(&self, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut out: Vec<OutMessage> = Vec::new();
        for m in msgs {
            let mut tx: CapturedTransaction = match serde_json::from_str(&m.body) {
                Ok(tx) => tx,
                Err(e) => {
                    outcomes.push(Outcome::Poison { reason: format!("malformed captured transaction: {e}") });
                    continue;
                }
            };
            let Some(lj) = self.load_job(&tx.job).await? else {
                outcomes.push(Outcome::Poison { reason: format!("unknown job '{}'", tx.job) });
                continue;
            };
            // A large transaction is read back whole from where capture kept it.
            if let Some(stored) = &tx.stored {
                match self.state.kept_changes(&tx.job, &stored.app, &tx.txid).await? {
                    Some(changes) => tx.changes = changes,
                    None => {
                        let reason = format!(
                            "transaction {} of app '{}' is not kept whole (a part is missing or expired)",
                            tx.txid, stored.app
                        );
                        outcomes.push(Outcome::Poison { reason });
                        continue;
                    }
                }
            }
            let bodies: Vec<(String, _)> = plan(&lj.job, &tx, MAX_MESSAGE_BYTES)
                .into_iter()
                .map(|batch| (serde_json::to_string(&batch).unwrap_or_default(), batch))
                .collect();
            // Messages are planned to fit; one that does not (a change larger than a message)
            // fails its own transaction, never the others of the batch.
            if let Some((big, _)) = bodies.iter().find(|(b, _)| b.len() > MAX_MESSAGE_BYTES) {
                let reason = format!(
                    "transaction {}: a delivery message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                    tx.txid,
                    big.len()
                );
                outcomes.push(Outcome::Poison { reason });
                continue;
            }
            for (body, batch) in bodies {
                out.push(OutMessage::fifo(body, batch.group.clone(), dedup_id(&batch)));
            }
            outcomes.push(Outcome::Done);
        }
        // One batched send for the whole batch, in order (the queue splits it into calls); a
        // crash before the acks only repeats messages that the FIFO deduplication id drops.
        if !out.is_empty() {
            self.deliver_queue.send(out).await?;
        }
        self.failpoints.check("sequence.after_send")?;
        Ok(outcomes)
    }
}
