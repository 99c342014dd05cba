//! `dualsync run --config FILE`: the long-running local runner on the user's own sqlite apps (until
//! Ctrl-C, or with `--until-idle` until every change log is read and every queue empty),
//! with the admin API on a loopback address behind a bearer token, and the ingress routes for
//! pushed events (Dataverse webhooks, fno events) beside it, behind each app's ingress key, and
//! the web dashboard (`/dashboard/`) over that API.
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
    loopback("--admin-addr", args.admin_addr)?;
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
    let token = admin_token(args.admin_token, data_dir, "admin-token", "DUALSYNC_ADMIN_TOKEN")?;
    serve(&rt, data_dir, args.admin_addr, token, args.until_idle, &format!("job '{name}' runs")).await
}

/// Refuses an address that is not loopback: what listens there holds the admin powers.
pub fn loopback(flag: &str, addr: SocketAddr) -> Result<()> {
    if !addr.ip().is_loopback() {
        bail!("{flag} {addr}: the admin API and the dashboard listen on a loopback address only");
    }
    Ok(())
}

/// Runs the runtime's workers with its loopback server on `addr` (see [`local_api`]) until
/// Ctrl-C, or until idle with `until_idle`; then stops after the current batches. `what` opens
/// the line that says where everything is.
pub async fn serve(
    rt: &Arc<LocalRuntime>,
    data_dir: &Path,
    addr: SocketAddr,
    token: String,
    until_idle: bool,
    what: &str,
) -> Result<()> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr} for the admin API"))?;
    eprintln!(
        "dualsync: {what}; state in {}; dashboard on http://{addr}{}, admin API and ingress (/ingress/{{job}}/{{app}}/{{source}}) on http://{addr}. Ctrl-C stops.",
        data_dir.display(),
        dualsync_dashboard::PATH,
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let tasks = rt.spawn(shutdown.clone());
    let server = spawn_server(listener, local_api(rt, token), shutdown);
    if until_idle {
        tokio::select! {
            idle = wait_idle(rt) => {
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

/// What the runner serves on its loopback address: the admin routes behind the bearer token;
/// the dashboard's files beside them (its calls carry the token); the ingress routes, each
/// authenticated by its app's own ingress key (the token layer wraps the admin router only).
pub fn local_api(rt: &LocalRuntime, token: String) -> axum::Router {
    let admin = dualsync_admin::with_token(dualsync_admin::router(Arc::new(rt.admin())), token);
    admin.merge(dualsync_ingress::router(Arc::new(rt.ingress()))).merge(dualsync_dashboard::router())
}

/// Serves `app` until `shutdown` turns true, then finishes the requests under way.
pub fn spawn_server(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        axum::serve(listener, app).with_graceful_shutdown(stopped).await
    })
}

/// The token a loopback server requires: `given` (from `--...-token` or `env`, at least 16
/// characters), or a fresh random one written to DATA_DIR/`file`.
pub fn admin_token(given: Option<String>, data_dir: &Path, file: &str, env: &str) -> Result<String> {
    match given {
        Some(t) if t.len() >= 16 => Ok(t),
        Some(_) => bail!("{env} is too short: use at least 16 characters"),
        None => write_token(data_dir, file),
    }
}

/// Returns once the runtime is idle (checked every 100 ms while its workers run).
async fn wait_idle(rt: &LocalRuntime) -> Result<()> {
    while !rt.is_idle().await? {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A fresh random token in DATA_DIR/`file`, readable by this user only.
fn write_token(data_dir: &Path, file: &str) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(file);
    let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(token.as_bytes())?;
    eprintln!("dualsync: token written to {} (the dashboard asks for it once)", path.display());
    Ok(token)
}
