//! `dualsync run --config FILE`: the long-running local runner on the user's own sqlite apps.
use anyhow::Result;
use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dualsync::domain::job::JobStatus;
use dualsync::runtime::local::LocalRuntime;

use crate::admin::read_job_file;

#[derive(Args)]
pub struct RunArgs {
    /// The job file.
    #[arg(long)]
    config: PathBuf,
}

pub async fn run(data_dir: &Path, args: RunArgs) -> Result<()> {
    let def = read_job_file(&args.config)?;
    let name = def.job.clone();
    let rt = Arc::new(LocalRuntime::open(data_dir)?);
    rt.apply(def).await?;
    let (_, status) = rt.state.job(&name).await?;
    if status != JobStatus::Active {
        rt.start(&name).await?;
    }
    eprintln!("dualsync: job '{name}' is active; state in {}. Ctrl-C stops.", data_dir.display());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown);
    tokio::signal::ctrl_c().await?;
    eprintln!("dualsync: stopping after the current batches; queued work stays in {}", data_dir.display());
    stop.send(true)?;
    for t in tasks {
        t.await?;
    }
    eprintln!("dualsync: stopped");
    Ok(())
}
