//! From a batch of queue messages to one outcome each, the same for the local workers and the
//! Lambda handlers: run the step, keep FIFO groups in order, and leave a dead-letter row for
//! every message that is about to reach a dead-letter queue.
use std::collections::HashMap;
use std::time::Duration;

use tracing::warn;

use super::{Outcome, StepError, StepKind, Steps};
use crate::ports::{InMessage, Queue};

impl Steps {
    /// Runs `step` over a batch received from `input`.
    ///
    /// A failure of the whole step (the table or a queue unreachable) gives every message back.
    /// A crash at a failpoint is passed on: nothing is settled, as if the process died.
    pub async fn handle(
        &self,
        step: StepKind,
        input: &dyn Queue,
        msgs: &[InMessage],
    ) -> Result<Vec<Outcome>, StepError> {
        let ran = super::metrics::scope(self.run(step, input, msgs)).await;
        let mut outcomes = match ran {
            Ok(o) => o,
            Err(e @ StepError::Crashed(_)) => return Err(e),
            Err(e) => {
                warn!(queue = input.name(), error = %e, "step failed; the whole batch will be retried");
                let reason = e.to_string();
                msgs.iter()
                    .map(|m| Outcome::Retry {
                        delay: self.backoff.delay(m.receive_count, None),
                        reason: reason.clone(),
                    })
                    .collect()
            }
        };
        hold_back_fifo_groups(msgs, &mut outcomes);
        let max = input.max_receive_count();
        for (m, o) in msgs.iter().zip(&outcomes) {
            let reason = match o {
                Outcome::Done => continue,
                Outcome::Retry { reason, .. } | Outcome::Poison { reason } => reason,
            };
            // Field values never reach a reason: steps name keys at most.
            warn!(queue = input.name(), message_id = %m.id, receive_count = m.receive_count, %reason, "message not handled");
            if max > 0 && m.receive_count >= max {
                self.state.record_dead_letter(input.name(), m, reason).await?;
                if let Some(job) = crate::state::job_of(&m.body) {
                    self.metrics.count(&job, |t| t.dead_letters += 1);
                }
            }
        }
        self.flush_metrics(step.name()).await;
        Ok(outcomes)
    }
}

/// On a FIFO queue a batch may hold several messages of one group, in order. Once one of them
/// is not done, the rest of its group must not be acknowledged ahead of it: they are given back
/// with it, and come again after it (SQS FIFO partial batch semantics).
pub fn hold_back_fifo_groups(msgs: &[InMessage], outcomes: &mut [Outcome]) {
    let mut failed: HashMap<&str, (String, Duration)> = HashMap::new();
    for (m, o) in msgs.iter().zip(outcomes.iter_mut()) {
        let Some(group) = m.group.as_deref() else { continue };
        if let Some((first, delay)) = failed.get(group) {
            if *o == Outcome::Done || matches!(o, Outcome::Retry { .. }) {
                *o = Outcome::Retry { delay: *delay, reason: format!("held behind message {first} of its FIFO group") };
            }
            continue;
        }
        match o {
            Outcome::Done => {}
            Outcome::Retry { delay, .. } => {
                failed.insert(group, (m.id.clone(), *delay));
            }
            Outcome::Poison { .. } => {
                failed.insert(group, (m.id.clone(), Duration::ZERO));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, group: Option<&str>) -> InMessage {
        InMessage {
            id: id.into(),
            receipt: format!("r-{id}"),
            body: String::new(),
            group: group.map(str::to_string),
            receive_count: 1,
        }
    }

    fn retry(secs: u64) -> Outcome {
        Outcome::Retry { delay: Duration::from_secs(secs), reason: "app down".into() }
    }

    #[test]
    fn the_rest_of_a_failed_group_is_held_back_and_other_groups_go_on() {
        let msgs = [msg("1", Some("g")), msg("2", Some("h")), msg("3", Some("g")), msg("4", Some("g"))];
        let mut out = vec![Outcome::Done, Outcome::Done, retry(4), Outcome::Done];
        hold_back_fifo_groups(&msgs, &mut out);
        assert_eq!(out[0], Outcome::Done, "before the failure");
        assert_eq!(out[1], Outcome::Done, "another group");
        assert_eq!(out[2], retry(4));
        assert_eq!(
            out[3],
            Outcome::Retry { delay: Duration::from_secs(4), reason: "held behind message 3 of its FIFO group".into() }
        );
    }

    #[test]
    fn poison_holds_its_group_back_but_keeps_its_own_reason() {
        let msgs = [msg("1", Some("g")), msg("2", Some("g")), msg("3", Some("g"))];
        let poison = Outcome::Poison { reason: "malformed".into() };
        let mut out = vec![poison.clone(), Outcome::Done, Outcome::Poison { reason: "also bad".into() }];
        hold_back_fifo_groups(&msgs, &mut out);
        assert_eq!(out[0], poison);
        assert!(matches!(&out[1], Outcome::Retry { delay, reason } if delay.is_zero() && reason.contains("message 1")));
        assert_eq!(out[2], Outcome::Poison { reason: "also bad".into() }, "a poison message stays poison");
    }

    #[test]
    fn standard_queue_messages_are_independent() {
        let msgs = [msg("1", None), msg("2", None)];
        let mut out = vec![retry(1), Outcome::Done];
        hold_back_fifo_groups(&msgs, &mut out);
        assert_eq!(out, vec![retry(1), Outcome::Done]);
    }
}
