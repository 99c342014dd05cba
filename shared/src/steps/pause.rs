//! Pause and resume (issue: error management). A paused job keeps capturing and sequencing;
//! delivery keeps its messages aside, in order ([`State::park`]), instead of writing. Resume
//! hands them back to the deliver queue before new ones can overtake them: while `resuming`,
//! delivery still keeps new messages aside, and what it kept during the switch to `active` is
//! handed back right after.
use crate::domain::errors::ErrorCategory;
use crate::domain::job::{JobAction, JobStatus};
use crate::domain::sequence::short_hash;
use crate::ports::{OutMessage, Queue};
use crate::state::{ErrorFilter, State};

use super::{StepError, Steps};

/// Pauses an active job, saying why in its status.
pub async fn pause(state: &State, job: &str, reason: &str) -> Result<JobStatus, StepError> {
    Ok(state.transition_because(job, JobAction::Pause, Some(reason.to_string())).await?)
}

/// Resumes a paused job (or finishes a resume that was cut short). Returns how many kept
/// deliveries it handed back.
pub async fn resume(state: &State, deliver: &dyn Queue, job: &str) -> Result<usize, StepError> {
    let (record, _) = state.job_record(job).await?;
    if record.status != JobStatus::Resuming {
        state.transition(job, JobAction::Resume).await?;
    }
    let mut n = hand_back(state, deliver, job).await?;
    state.transition(job, JobAction::Activate).await?;
    n += hand_back(state, deliver, job).await?;
    Ok(n)
}

/// Sends a job's kept deliveries back to the deliver queue, oldest first. A crash between the
/// send and the delete sends one again: delivery is idempotent.
pub async fn hand_back(state: &State, deliver: &dyn Queue, job: &str) -> Result<usize, StepError> {
    let mut n = 0;
    loop {
        let parked = state.parked(job, 100).await?;
        if parked.is_empty() {
            return Ok(n);
        }
        let out = parked
            .iter()
            .map(|p| {
                let dedup = format!("park-{}", short_hash(&[job.as_bytes(), p.sk.as_bytes()]));
                match &p.group {
                    Some(g) => OutMessage::fifo(p.body.clone(), g.clone(), dedup),
                    None => OutMessage::standard(p.body.clone()),
                }
            })
            .collect();
        deliver.send(out).await?;
        let sks: Vec<String> = parked.into_iter().map(|p| p.sk).collect();
        state.unpark(job, &sks).await?;
        n += sks.len();
    }
}

impl Steps {
    /// The job's alert rule: pauses an active job once N application errors were first seen
    /// within the last M minutes.
    pub(crate) async fn check_alert(&self, job: &str) -> Result<(), StepError> {
        let Some(lj) = self.load_job(job).await? else { return Ok(()) };
        let Some(rule) = lj.job.alert else { return Ok(()) };
        if lj.status != JobStatus::Active {
            return Ok(());
        }
        let filter = ErrorFilter {
            from_ms: Some(self.state.now_ms() - i64::from(rule.minutes) * 60_000),
            category: Some(ErrorCategory::Application),
            ..Default::default()
        };
        // A child still waiting for its parent to sync does not count (yet).
        let mut count = 0u32;
        self.state
            .scan_errors(job, &filter, |_, row| count += u32::from(!row.message.ends_with(super::record::WAITING)))
            .await?;
        if count >= rule.application_errors {
            let reason = format!(
                "alert rule: {count} application errors in the last {} minutes (limit {})",
                rule.minutes, rule.application_errors
            );
            tracing::warn!(job, %reason, "pausing job");
            match pause(&self.state, job, &reason).await {
                // Someone else paused or stopped it meanwhile.
                Err(StepError::State(crate::state::StateError::Transition(_))) | Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
