//! Admin commands: jobs, errors, conflicts, initial sync, on the local or the AWS backend.
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

use dualsync::domain::config::{load_job_file, JobDef};
use dualsync::domain::errors::{ErrorCategory, ErrorStatus};
use dualsync::state::ErrorFilter;
use dualsync::steps::initial_sync::reset_checkpoints;
use dualsync::steps::reconcile::{ReconcileAction, ReconcileMessage};

use crate::backend::{Backend, BackendArgs};

#[derive(Subcommand)]
pub enum JobCommand {
    /// Validates a job file and stores the job (stopped, or unchanged if running).
    Apply { file: PathBuf },
    /// Starts a job: installs change capture in its apps and makes it active.
    Start { job: String },
    /// Stops a job.
    Stop { job: String },
    /// Shows every job's status, or one job's.
    Status { job: Option<String> },
}

#[derive(Args, Clone)]
pub struct FilterArgs {
    /// Map or entity name.
    #[arg(long)]
    entity: Option<String>,
    /// Data source: the app the change came from.
    #[arg(long)]
    app: Option<String>,
    /// application, system, concurrency or conflict.
    #[arg(long, value_parser = parse_category)]
    category: Option<ErrorCategory>,
    /// Only rows first seen at or after this time (milliseconds since the epoch).
    #[arg(long)]
    from_ms: Option<i64>,
    /// Only rows first seen before this time (milliseconds since the epoch).
    #[arg(long)]
    to_ms: Option<i64>,
}

impl FilterArgs {
    fn filter(&self, status: Option<ErrorStatus>) -> ErrorFilter {
        ErrorFilter {
            from_ms: self.from_ms,
            to_ms: self.to_ms,
            entity: self.entity.clone(),
            app: self.app.clone(),
            category: self.category,
            status,
        }
    }
}

fn parse_category(s: &str) -> Result<ErrorCategory, String> {
    ErrorCategory::parse(s)
        .ok_or_else(|| format!("unknown category '{s}': use application, system, concurrency or conflict"))
}

#[derive(Subcommand)]
pub enum ErrorsCommand {
    /// Lists error rows (open ones unless --all).
    List {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// Include resolved, retrying and dismissed rows.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed at the end of a page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Retries the open errors that match: each re-enters delivery with a fresh read.
    Retry {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Dismisses the open errors that match, for good.
    Dismiss {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(Args)]
pub struct ConflictsArgs {
    job: String,
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args)]
pub struct InitialSyncArgs {
    job: String,
    /// The app to copy from.
    #[arg(long)]
    from: String,
    /// Start over instead of resuming from the last checkpoint.
    #[arg(long)]
    restart: bool,
}

/// Reads a job file and resolves its sqlite paths against the file's folder.
pub fn read_job_file(path: &Path) -> Result<JobDef> {
    let (mut def, _) = load_job_file(path)?;
    let base = path.parent().unwrap_or(Path::new("."));
    for app in &mut def.apps {
        if let Some(p) = &app.path {
            let p = Path::new(p);
            if p.is_relative() {
                let abs = std::path::absolute(base.join(p)).with_context(|| format!("resolving {}", p.display()))?;
                app.path = Some(abs.display().to_string());
            }
        }
    }
    Ok(def)
}

pub async fn job(data_dir: &Path, backend: &BackendArgs, cmd: JobCommand) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    match cmd {
        JobCommand::Apply { file } => {
            let def = read_job_file(&file)?;
            let rec = rt.state().apply_job(def).await?;
            println!("job '{}' applied (revision {}, {})", rec.def.job, rec.revision, rec.status.as_str());
        }
        JobCommand::Start { job } => {
            rt.start(&job).await?;
            println!("job '{job}' is active");
        }
        JobCommand::Stop { job } => {
            rt.stop(&job).await?;
            println!("job '{job}' is stopped");
        }
        JobCommand::Status { job } => {
            let names = match job {
                Some(j) => vec![j],
                None => rt.state().job_names().await?,
            };
            if names.is_empty() {
                println!("no jobs: apply one with `dualsync job apply FILE`");
            }
            for name in names {
                let (record, _) = rt.state().job_record(&name).await?;
                let open = rt
                    .state()
                    .errors(&name, &ErrorFilter { status: Some(ErrorStatus::Open), ..Default::default() }, 10_000, None)
                    .await?;
                println!(
                    "{name}: {} (revision {}), {} open error(s)",
                    record.status.as_str(),
                    record.revision,
                    open.items.len()
                );
            }
        }
    }
    Ok(())
}

pub async fn errors(data_dir: &Path, backend: &BackendArgs, cmd: ErrorsCommand) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    match cmd {
        ErrorsCommand::List { job, filter, all, limit, after } => {
            let status = (!all).then_some(ErrorStatus::Open);
            let page = rt.state().errors(&job, &filter.filter(status), limit, after.as_deref()).await?;
            println!(
                "{:<12} {:<24} {:<10} {:<24} {:>8} {:<9} message",
                "category", "map", "app", "key", "attempts", "status"
            );
            for e in &page.items {
                println!(
                    "{:<12} {:<24} {:<10} {:<24} {:>8} {:<9} {}",
                    e.category.as_str(),
                    e.map,
                    e.app,
                    e.key.display(),
                    e.attempts,
                    e.status.as_str(),
                    e.message
                );
            }
            if let Some(next) = page.next {
                println!("more: --after '{next}'");
            }
        }
        ErrorsCommand::Retry { job, filter } => reconcile(&rt, &job, ReconcileAction::Retry, &filter).await?,
        ErrorsCommand::Dismiss { job, filter } => reconcile(&rt, &job, ReconcileAction::Dismiss, &filter).await?,
    }
    Ok(())
}

async fn reconcile(rt: &Backend, job: &str, action: ReconcileAction, filter: &FilterArgs) -> Result<()> {
    let (filter, job) = (filter.filter(None), job.to_string());
    let rt = match rt {
        Backend::Local(rt) => rt,
        Backend::Aws { .. } => {
            let request = match action {
                ReconcileAction::Retry => ReconcileMessage::Retry { job, filter },
                ReconcileAction::Dismiss => ReconcileMessage::Dismiss { job, filter },
            };
            rt.queue_reconcile(&request).await?;
            println!("request queued for the reconcile function of job '{}'", request.job());
            return Ok(());
        }
    };
    let report = rt.steps.reconcile(&job, action, &filter).await?;
    match action {
        ReconcileAction::Retry => println!(
            "{} selected, {} queued for retry, {} not retriable; a running `dualsync run` delivers them",
            report.selected, report.queued, report.not_retriable
        ),
        ReconcileAction::Dismiss => println!("{} selected, {} dismissed", report.selected, report.dismissed),
    }
    Ok(())
}

pub async fn conflicts(data_dir: &Path, backend: &BackendArgs, args: ConflictsArgs) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    let page = rt.state().conflicts(&args.job, args.limit, None).await?;
    println!("{:<24} {:<24} {:<12} winner", "map", "key", "seen from");
    for c in page.items {
        println!("{:<24} {:<24} {:<12} {}", c.map, c.key.display(), c.app, c.winner);
    }
    Ok(())
}

pub async fn initial_sync(data_dir: &Path, backend: &BackendArgs, args: InitialSyncArgs) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    let (job, _) = rt.state().job(&args.job).await?;
    let Some(side) = job.side_of(&args.from) else {
        bail!(
            "app '{}' is not an app of job '{}' (apps: {}, {})",
            args.from,
            job.name,
            job.apps[0].name,
            job.apps[1].name
        );
    };
    if args.restart {
        reset_checkpoints(rt.state(), &args.job, &args.from).await?;
    }
    let rt = match &rt {
        Backend::Local(rt) => rt,
        Backend::Aws { .. } => {
            rt.queue_reconcile(&ReconcileMessage::InitialSync { job: args.job.clone(), from: args.from.clone() })
                .await?;
            println!("initial sync of job '{}' from {} queued for the reconcile function", args.job, args.from);
            return Ok(());
        }
    };
    let report = rt.steps.initial_sync(&args.job, side, 500, |map, n| eprintln!("{map}: {n} records")).await?;
    println!(
        "{} records in {} pages; {} deferred by system failures (run again to resume)",
        report.records, report.pages, report.deferred
    );
    Ok(())
}
