//! `dualsync dashboard --backend aws`: the web dashboard for a deployed stack, served on this
//! machine. Every API call goes to the stack's admin function URL signed with SigV4 from the
//! user's AWS credentials, so IAM stays the only door to the stack; the local server itself is
//! on loopback behind a bearer token, since it holds those credentials' power. Locally the
//! dashboard is served by `dualsync run` (and `dualsync demo --serve`) beside its admin API.
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

use dualsync::adapters::aws::sdk_config;
use dualsync_dashboard::proxy::{self, Upstream};
use dualsync_dashboard::Signer;

use crate::backend::{BackendArgs, BackendKind};
use crate::run::{admin_token, loopback, spawn_server};

#[derive(Args)]
pub struct DashboardArgs {
    /// Where the dashboard listens (loopback addresses only).
    #[arg(long, default_value = "127.0.0.1:7879")]
    addr: SocketAddr,
    /// The admin function URL (the stack's AdminApiUrl output). Without it, it is asked of
    /// Lambda for the function dualsync-STAGE-admin.
    #[arg(long, env = "DUALSYNC_ADMIN_URL")]
    admin_url: Option<String>,
    /// The dashboard's bearer token. Without one, a random token is written to
    /// DATA_DIR/dashboard-token (readable by this user only).
    #[arg(long, env = "DUALSYNC_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

pub async fn run(data_dir: &Path, backend: &BackendArgs, args: DashboardArgs) -> Result<()> {
    if backend.backend != BackendKind::Aws {
        bail!(
            "the local dashboard is served by `dualsync run` (or `dualsync demo --serve`) at http://<admin address>{}; \
             `dualsync dashboard` is for a stack: add --backend aws",
            dualsync_dashboard::PATH
        );
    }
    loopback("--addr", args.addr)?;
    let sdk = sdk_config(backend.endpoint_url.as_deref()).await;
    let region = sdk.region().map(|r| r.to_string()).context("no AWS region: set AWS_REGION or a profile's region")?;
    let credentials =
        sdk.credentials_provider().context("no AWS credentials provider: set a profile or AWS_PROFILE")?;
    let signer = Signer::new(credentials, region.clone());
    let url = match args.admin_url {
        Some(url) => url,
        None => {
            let endpoint =
                backend.endpoint_url.clone().unwrap_or_else(|| format!("https://lambda.{region}.amazonaws.com"));
            proxy::function_url(&signer, &endpoint, &backend.stage).await.map_err(anyhow::Error::msg)?
        }
    };
    let upstream = Upstream::new(&url, signer).map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    let token = admin_token(args.token, data_dir, "dashboard-token", "DUALSYNC_DASHBOARD_TOKEN")?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("listening on {} for the dashboard", args.addr))?;
    eprintln!(
        "dualsync: dashboard of stage '{}' on http://{}{} (calls signed for {url}). Ctrl-C stops.",
        backend.stage,
        args.addr,
        dualsync_dashboard::PATH
    );
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let server = spawn_server(listener, proxy::router(Arc::new(upstream), token), shutdown);
    tokio::signal::ctrl_c().await?;
    stop.send(true)?;
    server.await?.context("dashboard server")?;
    Ok(())
}
