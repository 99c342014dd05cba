//! `dualsync`: the local runner, the demo, the benchmark and the admin commands.
mod admin;
mod aws;
mod backend;
mod bench;
mod bench_isync;
mod bench_odata;
mod bench_odata_isync;
mod dashboard;
mod demo;
mod demo_apps;
mod doctor;
mod initial_sync;
mod pipeline;
mod run;
mod sample_apps;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "dualsync", version, about = "Keeps two systems of record in step, both ways, eventually consistent.")]
struct Cli {
    /// Where the local runner keeps its state (one SQLite file) and the demo its sample apps.
    #[arg(long, global = true, env = "DUALSYNC_DATA_DIR", default_value = ".dualsync")]
    data_dir: PathBuf,
    #[command(flatten)]
    backend: backend::BackendArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Two sample apps, a job, an initial load, concurrent edits on both sides; prints what happened.
    Demo(demo::DemoArgs),
    /// Runs a job file's job on this machine until Ctrl-C (with the dashboard on its admin address).
    Run(run::RunArgs),
    /// Serves the web dashboard of a deployed stack on this machine (--backend aws): its calls
    /// are signed with your AWS credentials for the stack's admin function URL.
    Dashboard(dashboard::DashboardArgs),
    /// Checks that a job file's apps can serve it; prints each problem with how to fix it.
    Doctor(doctor::DoctorArgs),
    /// Syncs N records end to end through the embedded pipeline and prints figures.
    Bench(bench::BenchArgs),
    /// Job definitions and status.
    #[command(subcommand)]
    Job(admin::JobCommand),
    /// Sync errors: list, show, count, retry, dismiss.
    #[command(subcommand)]
    Errors(admin::ErrorsCommand),
    /// Retry and dismiss requests and their progress.
    #[command(subcommand)]
    Requests(admin::RequestsCommand),
    /// Dead letters: list, show, redrive.
    #[command(subcommand)]
    DeadLetters(admin::DeadLettersCommand),
    /// Conflicts: which side won.
    Conflicts(admin::ConflictsArgs),
    /// Copies what exists in one app to the other.
    InitialSync(initial_sync::InitialSyncArgs),
    /// AWS resources: create them on an account or emulator; measure the cost per record.
    #[command(subcommand)]
    Aws(aws::AwsCommand),
}

/// See the workspace manifest: glibc's allocator was a sixth of the runner's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .with_writer(std::io::stderr)
        .init();
    // The steps call SQLite synchronously and wait on its locks: twice as many worker threads as
    // cores keep the cores busy while some threads wait (bench: +8% records/s on 2 cores).
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(cores * 2).enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Demo(args) => demo::run(&cli.data_dir, &cli.backend, args).await,
            Command::Run(args) => run::run(&cli.data_dir, args).await,
            Command::Dashboard(args) => dashboard::run(&cli.data_dir, &cli.backend, args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Bench(args) => bench::run(&cli.data_dir, args).await,
            Command::Job(cmd) => admin::job(&cli.data_dir, &cli.backend, cmd).await,
            Command::Errors(cmd) => admin::errors(&cli.data_dir, &cli.backend, cmd).await,
            Command::Requests(cmd) => admin::requests(&cli.data_dir, &cli.backend, cmd).await,
            Command::DeadLetters(cmd) => admin::dead_letters(&cli.data_dir, &cli.backend, cmd).await,
            Command::Conflicts(args) => admin::conflicts(&cli.data_dir, &cli.backend, args).await,
            Command::InitialSync(args) => initial_sync::run(&cli.data_dir, &cli.backend, args).await,
            Command::Aws(cmd) => aws::run(&cli.backend, cmd).await,
        }
    })
}
