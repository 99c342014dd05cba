//! Starting and stopping a job (DESIGN §1: `stopped → starting → active → stopping → stopped`),
//! one piece of code for every backend. A job that is not active moves no data, and loses none:
//! delivery keeps its changes aside in order (as for a paused job, see [`super::pause`]), and
//! start hands them back to the deliver queue before new ones can overtake them.
use crate::domain::job::{Job, JobAction};
use crate::ports::{ConnectorError, Queue};
use crate::state::State;

use super::pause::hand_back;
use super::StepError;

/// Starts a stopped job. `install` prepares its apps (local change capture; nothing on AWS,
/// where the apps send their changes themselves); if it fails, the job goes back to stopped so
/// that the user can fix the apps and start again. Returns how many kept deliveries it handed
/// back.
pub async fn start(
    state: &State,
    deliver: &dyn Queue,
    job: &str,
    install: impl FnOnce(&Job) -> Result<(), ConnectorError>,
) -> Result<usize, StepError> {
    state.transition(job, JobAction::Start).await?;
    let (compiled, _) = state.job(job).await?;
    if let Err(e) = install(&compiled) {
        stop(state, job).await?;
        return Err(e.into());
    }
    // Still `starting`, so delivery keeps new messages aside: what was kept goes first.
    let mut n = hand_back(state, deliver, job).await?;
    state.transition(job, JobAction::Activate).await?;
    n += hand_back(state, deliver, job).await?;
    Ok(n)
}

/// Stops a job: it moves no data until started again; what is captured or in flight is kept.
pub async fn stop(state: &State, job: &str) -> Result<(), StepError> {
    state.transition(job, JobAction::Stop).await?;
    state.transition(job, JobAction::Halt).await?;
    Ok(())
}
