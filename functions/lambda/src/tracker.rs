//! The scheduled change-tracking poller (an EventBridge schedule invokes it): every tracked map
//! of every capturing job is polled for a bounded number of pages and its references go to the
//! capture queue (`dualsync::runtime::tracking`). A map with more to read goes on at the next
//! invocation, so no invocation outlives its time-out whatever the backlog.
use std::sync::Arc;

use dualsync::adapters::aws::{SqsQueue, Usage};
use dualsync::runtime::tracking::poll_all;
use dualsync::state::State;
use dualsync::steps::{ConnectorRegistry, StepError};

use crate::SenderEnv;

/// Pages per map per invocation: 20 pages of 500 records (the default page size) is well
/// inside the function's time-out against a service that throttles.
pub const PAGES_PER_INVOCATION: usize = 20;

pub struct Tracker {
    state: State,
    apps: Arc<dyn ConnectorRegistry>,
    capture: SqsQueue,
}

/// What one invocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Polled {
    /// References sent to the capture queue.
    pub sent: usize,
    /// Maps whose poll failed (logged; the next invocation tries again).
    pub failed: usize,
}

impl Tracker {
    pub fn new(
        sdk: &aws_config::SdkConfig,
        env: &SenderEnv,
        apps: Arc<dyn ConnectorRegistry>,
        usage: Arc<Usage>,
    ) -> Tracker {
        let (state, capture) = env.open(sdk, usage);
        Tracker { state, apps, capture }
    }

    /// One scheduled poll. Only the state or the capture queue failing fails the invocation
    /// (EventBridge retries it); an app that fails is one map's logged failure.
    pub async fn poll(&self) -> Result<Polled, StepError> {
        let (sent, failed) = poll_all(&self.state, self.apps.as_ref(), &self.capture, PAGES_PER_INVOCATION).await?;
        tracing::info!(sent, failed, "change tracking polled");
        Ok(Polled { sent, failed })
    }
}
