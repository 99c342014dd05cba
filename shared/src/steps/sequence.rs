//! Sequence (DESIGN §2.2): order a captured transaction and send its delivery batches to the
//! FIFO deliver queue, one message group per dependency root.
use super::{Outcome, StepError, Steps};
use crate::domain::change::CapturedTransaction;
use crate::domain::sequence::{dedup_id, plan};
use crate::ports::{InMessage, OutMessage};

impl Steps {
    pub async fn sequence(&self, msgs: &[InMessage]) -> Result<Vec<Outcome>, StepError> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut out: Vec<OutMessage> = Vec::new();
        for m in msgs {
            let tx: CapturedTransaction = match serde_json::from_str(&m.body) {
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
            for batch in plan(&lj.job, &tx) {
                let body = serde_json::to_string(&batch).unwrap_or_default();
                out.push(OutMessage::fifo(body, batch.group.clone(), dedup_id(&batch)));
            }
            outcomes.push(Outcome::Done);
        }
        // One batched send for the whole batch; a crash before the acks only repeats messages
        // that the FIFO deduplication id drops.
        if !out.is_empty() {
            self.deliver_queue.send(out).await?;
        }
        self.failpoints.check("sequence.after_send")?;
        Ok(outcomes)
    }
}
