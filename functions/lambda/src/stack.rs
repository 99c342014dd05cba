//! A deployed stack run in one process: the four functions' handlers over one stage's table and
//! queues, fed by the local apps' change logs, each polled like its SQS event source would.
//! The AWS backend of the demo, the emulator-backed tests and the cost benchmark run on it.
use std::sync::Arc;
use std::time::Duration;

use dualsync::adapters::aws::{DynamoKv, Resources, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::domain::job::{JobStatus, Side};
use dualsync::ports::{ChangeFeed, Queue, SystemClock};
use dualsync::runtime::ingress::pump_feed;
use dualsync::runtime::local::{install_capture, AppRegistry, SqliteRegistry};
use dualsync::state::State;
use dualsync::steps::{lifecycle, Backoff, ConnectorRegistry, Metrics, StepKind, Steps};
use lambda_runtime::Error;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::poller::{poll_once, Invocation};
use crate::{Env, Handler};

/// Lambda's batch size on every event source (template.yaml).
pub const LAMBDA_BATCH: usize = 10;

pub struct Stack {
    /// Capture, sequence, deliver, reconcile.
    pub handlers: Vec<Handler>,
    pub apps: Arc<dyn AppRegistry>,
    /// Where the apps' ingress sends (what a webhook or business event does on AWS).
    capture: SqsQueue,
    /// Every input queue in pipeline order (capture, sequence, deliver, reconcile), for telling
    /// when the pipeline is idle.
    queues: Vec<SqsQueue>,
    /// The state as the local ingress uses it (jobs, change-log positions), counting into
    /// [`Self::ingress_usage`]: on AWS the apps send to the capture queue themselves, so this
    /// bookkeeping is not what a synced record costs.
    ingress: State,
    pub ingress_usage: Arc<Usage>,
    pub metrics: Arc<Metrics>,
}

impl Stack {
    /// The stack of `resources`; `usage` counts the AWS requests and capacity units spent.
    pub fn new(sdk: &aws_config::SdkConfig, resources: &Resources, usage: Arc<Usage>) -> Stack {
        Self::with_apps(sdk, resources, usage, Arc::new(SqliteRegistry::default()))
    }

    /// As [`Self::new`], with the apps opened through `apps` (tests wrap them to inject faults).
    pub fn with_apps(
        sdk: &aws_config::SdkConfig,
        resources: &Resources,
        usage: Arc<Usage>,
        apps: Arc<dyn AppRegistry>,
    ) -> Stack {
        let metrics = Arc::new(Metrics::default());
        let env = Env {
            table: resources.table.clone(),
            sequence_queue_url: resources.sequence_url.clone(),
            deliver_queue_url: resources.deliver_url.clone(),
            input_queue_url: String::new(),
            max_receive_count: MAX_RECEIVE_COUNT,
        };
        let inputs = [
            (StepKind::Capture, &resources.capture_url),
            (StepKind::Sequence, &resources.sequence_url),
            (StepKind::Deliver, &resources.deliver_url),
            (StepKind::Reconcile, &resources.reconcile_url),
        ];
        let handlers = inputs
            .iter()
            .map(|(step, url)| {
                let env = Env { input_queue_url: url.to_string(), ..env.clone() };
                Handler::new(*step, &env, sdk, apps.clone() as Arc<dyn ConnectorRegistry>, usage.clone())
                    .with_metrics(metrics.clone())
            })
            .collect();
        let ingress_usage = Arc::new(Usage::default());
        let kv = DynamoKv::new(
            aws_sdk_dynamodb::Client::new(sdk),
            resources.table.clone(),
            Arc::new(SystemClock),
            ingress_usage.clone(),
        );
        let ingress = State::new(Arc::new(kv), Arc::new(SystemClock));
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let queue = |url: &str| {
            SqsQueue::new(
                sqs.clone(),
                dualsync::adapters::aws::queue_name(url),
                url.to_string(),
                MAX_RECEIVE_COUNT,
                usage.clone(),
            )
        };
        Stack {
            handlers,
            apps,
            capture: queue(&resources.capture_url),
            queues: inputs.iter().map(|(_, url)| queue(url)).collect(),
            ingress,
            ingress_usage,
            metrics,
        }
    }

    /// Retries with `backoff` instead of the default (tests over an emulator wait in real time).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        for h in &mut self.handlers {
            h.set_backoff(backoff);
        }
        self
    }

    /// The steps of the capture function: for what admin commands do directly (initial sync,
    /// reading state).
    pub fn steps(&self) -> &Arc<Steps> {
        self.handlers[0].steps()
    }

    pub fn state(&self) -> &State {
        &self.steps().state
    }

    /// Starts a job: installs change capture in its sqlite apps, then makes it active.
    pub async fn start(&self, job: &str) -> Result<(), Error> {
        let steps = self.steps();
        lifecycle::start(&steps.state, steps.deliver_queue.as_ref(), job, |j| install_capture(self.apps.as_ref(), j))
            .await?;
        Ok(())
    }

    async fn active_jobs(&self) -> Result<Vec<dualsync::domain::job::Job>, Error> {
        let mut out = Vec::new();
        for name in self.ingress.job_names().await? {
            let (job, status) = self.ingress.job(&name).await?;
            // A paused job keeps capturing (delivery keeps its changes until it resumes).
            if status == JobStatus::Active || status.holds_deliveries() {
                out.push(job);
            }
        }
        Ok(out)
    }

    /// Moves every active job's app change logs onto the capture queue; returns the rows moved.
    pub async fn pump_feeds(&self, limit: usize) -> Result<usize, Error> {
        let mut n = 0;
        for job in self.active_jobs().await? {
            for side in Side::BOTH {
                let app = self.apps.sqlite_app(&job, side)?;
                n += pump_feed(
                    &self.ingress,
                    &job.name,
                    job.app_name(side),
                    app.as_ref(),
                    &self.capture,
                    limit,
                    &self.metrics.echoes_suppressed,
                )
                .await?;
            }
        }
        Ok(n)
    }

    /// Polls every function once, in pipeline order; returns the invocations that had messages.
    pub async fn poll_round(&self) -> Result<Vec<Invocation>, Error> {
        let mut out = Vec::new();
        for h in &self.handlers {
            if let Some(i) = poll_once(h, LAMBDA_BATCH).await? {
                out.push(i);
            }
        }
        Ok(out)
    }

    /// True when no change log has unread rows and no queue holds a message (visible or in
    /// flight). Each step sends before it acknowledges, so reading the change logs first and
    /// then the queues in pipeline order sees work moving downstream; deliver is read again
    /// last for what reconcile hands back upstream.
    pub async fn is_idle(&self) -> Result<bool, Error> {
        for job in self.active_jobs().await? {
            for side in Side::BOTH {
                let app = self.apps.sqlite_app(&job, side)?;
                let pos = self.ingress.feed_position(&job.name, job.app_name(side)).await?;
                if !app.changes_after(pos, 1).await?.is_empty() {
                    return Ok(false);
                }
            }
        }
        let deliver = &self.queues[2]; // see the field
        for q in self.queues.iter().chain([deliver]) {
            if !q.depth().await?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Runs ingress and the four functions until `shutdown` turns true.
    pub fn spawn(self: &Arc<Self>, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let stack = self.clone();
        tokio::spawn(async move {
            while !*shutdown.borrow() {
                let moved = match stack.pump_feeds(1000).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::error!(error = %e, "reading app change logs");
                        0
                    }
                };
                let handled = match stack.poll_round().await {
                    Ok(i) => i.len(),
                    Err(e) => {
                        tracing::error!(error = %e, "polling the queues");
                        0
                    }
                };
                if moved + handled == 0 {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
        })
    }
}
