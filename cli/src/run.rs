//! `dualsync run --config FILE`: the long-running local runner on the user's own sqlite apps (until
//! Ctrl-C, or with `--until-idle` until every change log is read and every queue empty),
//! with the admin API on a loopback address behind a bearer token, and the ingress routes for
//! pushed events (Dataverse webhooks, fno events) beside it, behind each app's ingress key.
use anyhow::{bail, Context, Result};
use clap::Args;
use std::net::SocketAddr;
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
    /// Where the admin API listens (loopback addresses only).
    #[arg(long, default_value = "127.0.0.1:7878")]
    admin_addr: SocketAddr,
    /// The admin API's bearer token. Without one, a random token is written to
    /// DATA_DIR/admin-token (readable by this user only).
    #[arg(long, env = "DUALSYNC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Stop once the pipeline is idle (every change log read, every queue empty) instead of
    /// waiting for Ctrl-C: drains what is queued, for scripts and tests.
    #[arg(long)]
    until_idle: bool,
}

pub async fn run(data_dir: &Path, args: RunArgs) -> Result<()> {
    if !args.admin_addr.ip().is_loopback() {
        bail!("--admin-addr {}: the admin API listens on a loopback address only", args.admin_addr);
    }
    let def = read_job_file(&args.config)?;
    let name = def.job.clone();
    let rt = Arc::new(LocalRuntime::open(data_dir)?);
    rt.apply(def).await?;
    let (_, status) = rt.state.job(&name).await?;
    match status {
        JobStatus::Active => {}
        JobStatus::Paused | JobStatus::Resuming => {
            eprintln!("dualsync: job '{name}' is {}: resume it to deliver", status.as_str())
        }
        _ => rt.start(&name).await?,
    }
    let token = match args.admin_token {
        Some(t) if t.len() >= 16 => t,
        Some(_) => bail!("DUALSYNC_ADMIN_TOKEN is too short: use at least 16 characters"),
        None => write_token(data_dir)?,
    };
    let listener = tokio::net::TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("listening on {} for the admin API", args.admin_addr))?;
    // The admin routes behind the bearer token; the ingress routes beside them, each
    // authenticated by its app's own ingress key (the token layer wraps the admin router only).
    let admin = dualsync_admin::with_token(dualsync_admin::router(Arc::new(rt.admin())), token);
    let api = admin.merge(dualsync_ingress::router(Arc::new(rt.ingress())));
    eprintln!(
        "dualsync: job '{name}' runs; state in {}; admin API and ingress (/ingress/{{job}}/{{app}}/{{source}}) on http://{}. Ctrl-C stops.",
        data_dir.display(),
        args.admin_addr
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown.clone());
    let mut api_stop = shutdown;
    let server = tokio::spawn(async move {
        let stopped = async move {
            let _ = api_stop.wait_for(|stop| *stop).await;
        };
        axum::serve(listener, api).with_graceful_shutdown(stopped).await
    });
    if args.until_idle {
        tokio::select! {
            idle = wait_idle(&rt) => {
                idle?;
                eprintln!("dualsync: idle; stopping");
            }
            c = tokio::signal::ctrl_c() => c?,
        }
    } else {
        tokio::signal::ctrl_c().await?;
    }
    eprintln!("dualsync: stopping after the current batches; queued work stays in {}", data_dir.display());
    stop.send(true)?;
    for t in tasks {
        t.await?;
    }
    server.await?.context("admin API")?;
    eprintln!("dualsync: stopped");
    Ok(())
}

/// Returns once the runtime is idle (checked every 100 ms while its workers run).
async fn wait_idle(rt: &LocalRuntime) -> Result<()> {
    while !rt.is_idle().await? {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A fresh random token in DATA_DIR/admin-token, readable by this user only.
fn write_token(data_dir: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("admin-token");
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    eprintln!("dualsync: admin API token written to {}", path.display());
    Ok(token)
}
