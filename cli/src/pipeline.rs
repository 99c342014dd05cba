//! The whole pipeline on either backend, for the demo: the embedded runner, or a stack of the
//! four Lambda handlers on a stage's DynamoDB table and SQS queues (an emulator or an account).
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use dualsync::adapters::aws::{bootstrap, sdk_config, Names, Resources, Usage};
use dualsync::admin::Admin;
use dualsync::domain::requests::RequestAction;
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::{ErrorFilter, State};
use dualsync::steps::ingress::Ingress;
use dualsync::steps::{Metrics, Steps};
use dualsync_lambda::stack::Stack;

use crate::backend::{BackendArgs, BackendKind};

// One per process: the size of the AWS variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Pipeline {
    Local(Arc<LocalRuntime>),
    Aws { stack: Arc<Stack>, resources: Resources, sdk: aws_config::SdkConfig, admin: Admin },
}

impl Pipeline {
    /// Locally, the runner's state in `dir`. On AWS, a fresh stage named after `--stage` and
    /// `purpose`, created here and deleted by [`Self::close`].
    pub async fn open(dir: &std::path::Path, backend: &BackendArgs, purpose: &str) -> Result<Pipeline> {
        if backend.backend == BackendKind::Local {
            return Ok(Pipeline::Local(Arc::new(LocalRuntime::open(dir)?)));
        }
        let sdk = sdk_config(backend.endpoint_url.as_deref()).await;
        let stage = format!("{}-{purpose}{}", backend.stage, &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let resources = bootstrap(&sdk, &Names::new(&stage))
            .await
            .with_context(|| format!("creating the table and queues of stage '{stage}'"))?;
        let usage = Arc::new(Usage::default());
        let stack = Arc::new(Stack::new(&sdk, &resources, usage.clone()));
        let admin = resources.admin(&sdk, usage);
        Ok(Pipeline::Aws { stack, resources, sdk, admin })
    }

    pub fn describe(&self) -> String {
        match self {
            Pipeline::Local(_) => "the embedded runner".into(),
            Pipeline::Aws { resources, .. } => {
                format!("the Lambda handlers on DynamoDB table {} and its SQS queues", resources.table)
            }
        }
    }

    pub fn steps(&self) -> &Arc<Steps> {
        match self {
            Pipeline::Local(rt) => &rt.steps,
            Pipeline::Aws { stack, .. } => stack.steps(),
        }
    }

    pub fn state(&self) -> &State {
        &self.steps().state
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        match self {
            Pipeline::Local(rt) => rt.steps.metrics.clone(),
            Pipeline::Aws { stack, .. } => stack.metrics.clone(),
        }
    }

    pub async fn start(&self, job: &str) -> Result<()> {
        match self {
            Pipeline::Local(rt) => rt.start(job).await?,
            Pipeline::Aws { stack, .. } => stack.start(job).await.map_err(|e| anyhow::anyhow!("{e}"))?,
        }
        Ok(())
    }

    pub fn spawn(&self, shutdown: watch::Receiver<bool>) -> Vec<JoinHandle<()>> {
        match self {
            Pipeline::Local(rt) => rt.spawn(shutdown),
            Pipeline::Aws { stack, .. } => vec![stack.spawn(shutdown)],
        }
    }

    pub async fn is_idle(&self) -> Result<bool> {
        match self {
            Pipeline::Local(rt) => Ok(rt.is_idle().await?),
            Pipeline::Aws { stack, .. } => stack.is_idle().await.map_err(|e| anyhow::anyhow!("{e}")),
        }
    }

    /// The handler of pushed events (locally; on AWS the ingress function takes them), keys
    /// from the process environment unless given with `Ingress::with_env`.
    pub fn ingress(&self) -> Option<Ingress> {
        match self {
            Pipeline::Local(rt) => Some(rt.ingress()),
            Pipeline::Aws { .. } => None,
        }
    }

    /// Polls every tracked map (change tracking) to the end of its changes now: the position
    /// the runner's polls go on from. Before the runner is spawned only (one poller at a time).
    pub async fn poll_tracking(&self) -> Result<usize> {
        match self {
            Pipeline::Local(rt) => Ok(rt.poll_tracking().await?),
            Pipeline::Aws { .. } => Ok(0),
        }
    }

    /// Whether every tracked map was read to the end by a poll begun after `mark` (true
    /// without tracked maps).
    pub async fn tracking_read_since(&self, mark: std::time::Instant) -> Result<bool> {
        match self {
            Pipeline::Local(rt) => Ok(rt.tracking_read_since(mark).await?),
            Pipeline::Aws { .. } => Ok(true),
        }
    }

    /// The operators' service over this pipeline's state and queues.
    pub fn admin(&self) -> Admin {
        match self {
            Pipeline::Local(rt) => rt.admin(),
            Pipeline::Aws { admin, .. } => admin.clone(),
        }
    }

    /// Requests a retry of the errors that match; the pipeline's reconcile step runs it.
    pub async fn retry(&self, job: &str, filter: ErrorFilter) -> Result<String> {
        let request = self.admin().submit(job, RequestAction::Retry, filter).await?;
        Ok(format!("request {} for {} error(s) queued", request.id, request.progress.selected))
    }

    /// Deletes what [`Self::open`] created on AWS.
    pub async fn close(self) -> Result<()> {
        if let Pipeline::Aws { resources, sdk, .. } = self {
            resources.delete(&sdk).await.context("deleting the demo's table and queues")?;
        }
        Ok(())
    }
}
