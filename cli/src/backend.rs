//! Where the admin commands act: the local runner's data folder, or a deployed stack's DynamoDB
//! table and queues (`--backend aws`, `--endpoint-url` for an emulator).
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use dualsync::adapters::aws::{sdk_config, DynamoKv, Names, Resources, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::domain::job::JobAction;
use dualsync::ports::{OutMessage, Queue, SystemClock};
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::State;
use dualsync::steps::reconcile::ReconcileMessage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// The embedded runner's state in the data folder.
    Local,
    /// A deployed stack (or an emulator with --endpoint-url).
    Aws,
}

#[derive(Args, Clone, Debug)]
pub struct BackendArgs {
    #[arg(long, global = true, env = "DUALSYNC_BACKEND", value_enum, default_value = "local")]
    pub backend: BackendKind,
    /// AWS endpoint override, for an emulator such as moto server (AWS backend).
    #[arg(long, global = true, env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// The stack's stage: resources are named dualsync-STAGE-... (AWS backend).
    #[arg(long, global = true, env = "DUALSYNC_STAGE", default_value = "dev")]
    pub stage: String,
}

pub enum Backend {
    Local(Box<LocalRuntime>),
    Aws { state: State, reconcile: Arc<dyn Queue> },
}

impl Backend {
    pub async fn open(data_dir: &Path, args: &BackendArgs) -> Result<Backend> {
        match args.backend {
            BackendKind::Local => Ok(Backend::Local(Box::new(LocalRuntime::open(data_dir)?))),
            BackendKind::Aws => {
                let sdk = sdk_config(args.endpoint_url.as_deref()).await;
                let names = Names::new(&args.stage);
                let resources = Resources::lookup(&sdk, &names)
                    .await
                    .with_context(|| format!("finding the resources of stage '{}'", args.stage))?;
                let usage = Arc::new(Usage::default());
                let kv = DynamoKv::new(
                    aws_sdk_dynamodb::Client::new(&sdk),
                    resources.table.clone(),
                    Arc::new(SystemClock),
                    usage.clone(),
                );
                let reconcile = Arc::new(SqsQueue::new(
                    aws_sdk_sqs::Client::new(&sdk),
                    names.reconcile_queue(),
                    resources.reconcile_url.clone(),
                    MAX_RECEIVE_COUNT,
                    usage,
                ));
                Ok(Backend::Aws { state: State::new(Arc::new(kv), Arc::new(SystemClock)), reconcile })
            }
        }
    }

    pub fn state(&self) -> &State {
        match self {
            Backend::Local(rt) => &rt.state,
            Backend::Aws { state, .. } => state,
        }
    }

    /// Starts a job. Locally this also installs change capture in its sqlite apps; on AWS the
    /// apps send their changes to the capture queue themselves.
    pub async fn start(&self, job: &str) -> Result<()> {
        match self {
            Backend::Local(rt) => rt.start(job).await?,
            Backend::Aws { state, .. } => {
                state.transition(job, JobAction::Start).await?;
                state.transition(job, JobAction::Activate).await?;
            }
        }
        Ok(())
    }

    pub async fn stop(&self, job: &str) -> Result<()> {
        match self {
            Backend::Local(rt) => rt.stop(job).await?,
            Backend::Aws { state, .. } => {
                state.transition(job, JobAction::Stop).await?;
                state.transition(job, JobAction::Halt).await?;
            }
        }
        Ok(())
    }

    /// On AWS, queues a reconcile request for the reconcile function (FIFO per job, so a job's
    /// requests run in order). `None` on the local backend, which runs requests directly.
    pub async fn queue_reconcile(&self, request: &ReconcileMessage) -> Result<Option<()>> {
        let Backend::Aws { reconcile, .. } = self else { return Ok(None) };
        let body = serde_json::to_string(request)?;
        let dedup = uuid::Uuid::new_v4().to_string();
        reconcile.send(vec![OutMessage::fifo(body, request.job().to_string(), dedup)]).await?;
        Ok(Some(()))
    }
}
