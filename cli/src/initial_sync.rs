//! `dualsync initial-sync`: copies what exists in one app to the other (DESIGN §5). Locally the
//! sync runs in this process, a progress bar per map on a terminal (plain lines otherwise), and
//! ends with the summary table; on AWS it is queued for the reconcile function, and `dualsync
//! job status` follows it.
use std::io::IsTerminal;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use dualsync::domain::errors::ErrorStatus;
use dualsync::domain::requests::RequestAction;
use dualsync::state::ErrorFilter;
use dualsync::steps::initial_sync::{reset_checkpoints, SyncEvent, SyncOptions, DEFAULT_PAGE, DEFAULT_PAGES_IN_FLIGHT};
use dualsync::steps::reconcile::ReconcileMessage;

use crate::backend::{Backend, BackendArgs};

#[derive(Args)]
pub struct InitialSyncArgs {
    job: String,
    /// The app to copy from.
    #[arg(long)]
    from: String,
    /// Only this map (its parents synced already).
    #[arg(long)]
    map: Option<String>,
    /// Only this company's records (maps with a company field).
    #[arg(long)]
    company: Option<String>,
    /// Re-runs only the records with an open error row from this app.
    #[arg(long)]
    only_failed: bool,
    /// Start over instead of resuming from the last checkpoint.
    #[arg(long)]
    restart: bool,
    /// Counts per map and company what would be created, updated, already in step or in
    /// conflict; writes nothing.
    #[arg(long)]
    dry_run: bool,
    /// Records per page [default: 500 locally, 100 on AWS, where a page is a message].
    #[arg(long)]
    page_size: Option<usize>,
    /// Pages delivered at once (each app's concurrency limit applies beneath).
    #[arg(long, default_value_t = DEFAULT_PAGES_IN_FLIGHT)]
    pages_in_flight: usize,
}

pub async fn run(data_dir: &Path, backend: &BackendArgs, args: InitialSyncArgs) -> Result<()> {
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
    if args.restart && (args.dry_run || args.only_failed) {
        bail!("--restart starts a full sync over: it goes with neither --dry-run nor --only-failed");
    }
    if args.restart {
        reset_checkpoints(rt.state(), &args.job, &args.from).await?;
    }
    let Some(local) = rt.local() else {
        return queue_on_aws(&rt, &args).await;
    };
    let opts = SyncOptions {
        map: args.map.clone(),
        company: args.company.clone(),
        only_failed: args.only_failed,
        dry_run: args.dry_run,
        pages_in_flight: args.pages_in_flight.max(1),
        ..SyncOptions::new(side).page_size(args.page_size.unwrap_or(DEFAULT_PAGE))
    };
    let mut shown = Progress::new();
    let report = local.steps.initial_sync(&args.job, &opts, |e| shown.show(e)).await?;
    print!("{}", report.table());
    if args.dry_run {
        println!("dry run: nothing was written");
    }
    let failed: u64 = report.maps.iter().map(|m| m.total().errors_total()).sum();
    if failed > 0 {
        println!(
            "{failed} record(s) did not sync, each with an error row: `dualsync errors list {}` shows them; \
             `dualsync initial-sync {} --from {} --only-failed` runs them again",
            args.job, args.job, args.from
        );
    }
    Ok(())
}

/// On AWS: the listing message (or, for `--only-failed`, a retry request of the app's open
/// rows) goes to the reconcile function.
async fn queue_on_aws(rt: &Backend, args: &InitialSyncArgs) -> Result<()> {
    if args.dry_run {
        bail!("--dry-run reads both apps from this process, which runs on the local backend only: run it where the apps can be reached with --backend local");
    }
    if args.only_failed {
        let filter = ErrorFilter {
            app: Some(args.from.clone()),
            entity: args.map.clone(),
            status: Some(ErrorStatus::Open),
            ..Default::default()
        };
        let request = rt.admin.submit(&args.job, RequestAction::Retry, filter).await?;
        println!(
            "retry request {} of the failed records from {} queued for the reconcile function",
            request.id, args.from
        );
        return Ok(());
    }
    let message = ReconcileMessage::InitialSync {
        job: args.job.clone(),
        from: args.from.clone(),
        map: args.map.clone(),
        company: args.company.clone(),
        page_size: args.page_size,
    };
    rt.queue_reconcile(&message).await?;
    println!(
        "initial sync of job '{}' from {} queued for the reconcile function: `dualsync job status {}` shows its progress",
        args.job, args.from, args.job
    );
    Ok(())
}

/// A progress bar per map on a terminal, a plain line every few seconds otherwise.
struct Progress {
    terminal: bool,
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl Progress {
    fn new() -> Self {
        Progress { terminal: std::io::stderr().is_terminal(), bar: None, last_line: Instant::now() }
    }

    fn show(&mut self, e: SyncEvent<'_>) {
        match e {
            SyncEvent::MapStart { map, total, done } => {
                if self.terminal {
                    let bar = ProgressBar::new(total.unwrap_or(0).max(done));
                    bar.set_style(
                        ProgressStyle::with_template("{prefix:>20} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_bar())
                            .progress_chars("=> "),
                    );
                    bar.set_prefix(map.to_string());
                    bar.set_position(done);
                    bar.reset_eta();
                    self.bar = Some(bar);
                } else {
                    let of = total.map_or(String::new(), |t| format!(" of {t}"));
                    eprintln!("{map}: starting, {done}{of} records done before");
                }
                self.last_line = Instant::now();
            }
            SyncEvent::Page { map, done } => match &self.bar {
                Some(bar) => bar.set_position(done),
                None if self.last_line.elapsed().as_secs() >= 5 => {
                    eprintln!("{map}: {done} records");
                    self.last_line = Instant::now();
                }
                None => {}
            },
            SyncEvent::MapDone(m) => {
                let t = m.total();
                let line = format!(
                    "{}: {} listed, {} created, {} updated, {} in step, {} conflicts, {} errors",
                    m.map,
                    t.listed,
                    t.created,
                    t.updated,
                    t.in_step,
                    t.conflicts,
                    t.errors_total()
                );
                match self.bar.take() {
                    Some(bar) => bar.finish_with_message("done"),
                    None => eprintln!("{line}"),
                }
            }
        }
    }
}
