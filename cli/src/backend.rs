//! Where the admin commands act: the local runner's data folder, or a deployed stack's DynamoDB
//! table and queues (`--backend aws`, `--endpoint-url` for an emulator).
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use dualsync::adapters::aws::{sdk_config, Names, Resources, Usage};
use dualsync::admin::Admin;
use dualsync::runtime::local::LocalRuntime;
use dualsync::state::State;
use dualsync::steps::reconcile::ReconcileMessage;
use dualsync::steps::StepKind;

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

/// The admin service over the chosen backend, and the local runtime when local.
pub struct Backend {
    pub admin: Admin,
    local: Option<Box<LocalRuntime>>,
}

impl Backend {
    pub async fn open(data_dir: &Path, args: &BackendArgs) -> Result<Backend> {
        match args.backend {
            BackendKind::Local => {
                let rt = LocalRuntime::open(data_dir)?;
                Ok(Backend { admin: rt.admin(), local: Some(Box::new(rt)) })
            }
            BackendKind::Aws => {
                let sdk = sdk_config(args.endpoint_url.as_deref()).await;
                let resources = Resources::lookup(&sdk, &Names::new(&args.stage))
                    .await
                    .with_context(|| format!("finding the resources of stage '{}'", args.stage))?;
                Ok(Backend { admin: resources.admin(&sdk, Arc::new(Usage::default())), local: None })
            }
        }
    }

    pub fn state(&self) -> &State {
        &self.admin.state
    }

    pub fn local(&self) -> Option<&LocalRuntime> {
        self.local.as_deref()
    }

    /// Starts a job. Locally this also installs change capture in its sqlite apps; on AWS the
    /// apps send their changes to the capture queue themselves (see `Admin::with_installer`).
    pub async fn start(&self, job: &str) -> Result<()> {
        self.admin.start(job).await?;
        Ok(())
    }

    pub async fn stop(&self, job: &str) -> Result<()> {
        self.admin.stop(job).await?;
        Ok(())
    }

    /// Locally, runs the queued reconcile requests now, as a running `dualsync run` would; on
    /// AWS the reconcile function runs them.
    pub async fn run_requests(&self) -> Result<()> {
        if let Some(rt) = self.local() {
            while rt.step_once(StepKind::Reconcile).await? > 0 {}
        }
        Ok(())
    }

    /// Queues an initial sync for the reconcile function (AWS).
    pub async fn queue_reconcile(&self, message: &ReconcileMessage) -> Result<()> {
        self.admin.reconcile.send(vec![message.out()]).await?;
        Ok(())
    }
}
