//! Admin commands: jobs, errors, requests, conflicts, dead letters, initial sync, on the local or the AWS
//! backend, through the same [`dualsync::admin::Admin`] service as the admin API.
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

use dualsync::admin::{JobView, QueueReading, Reading, Redrive, StepQueues};
use dualsync::domain::config::{load_job_file, JobDef};
use dualsync::domain::errors::{DeadLetter, ErrorCategory, ErrorStatus, SyncError};
use dualsync::domain::metrics::MetricsView;
use dualsync::domain::requests::{ReconcileRequest, RequestAction};
use dualsync::state::ErrorFilter;

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
    /// Pauses an active job: changes are still captured, and delivered in order on resume.
    Pause { job: String },
    /// Resumes a paused job: what it kept goes to delivery first, in order.
    Resume { job: String },
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
    pub fn filter(&self, status: Option<ErrorStatus>) -> ErrorFilter {
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

fn parse_status(s: &str) -> Result<ErrorStatus, String> {
    ErrorStatus::parse(s).ok_or_else(|| format!("unknown status '{s}': use open, retrying, dismissed or resolved"))
}

#[derive(Subcommand)]
pub enum ErrorsCommand {
    /// Lists error rows, oldest first (open ones unless --status or --all).
    List {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
        /// open, retrying, dismissed or resolved.
        #[arg(long, value_parser = parse_status, conflicts_with = "all")]
        status: Option<ErrorStatus>,
        /// Rows of every status.
        #[arg(long)]
        all: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed at the end of a page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Shows one error row.
    Show { job: String, id: String },
    /// Counts error rows by category and by status.
    Counts {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Requests a retry of the open errors that match: each re-enters delivery with a fresh read.
    Retry {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Requests a dismissal of the open errors that match, for good.
    Dismiss {
        job: String,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

#[derive(Subcommand)]
pub enum RequestsCommand {
    /// A job's retry and dismiss requests with their progress, oldest first.
    List { job: String },
}

#[derive(Subcommand)]
pub enum DeadLettersCommand {
    /// Dead-letter rows, newest first: why each message reached its queue's dead-letter queue.
    List {
        /// Only this queue's rows (capture, sequence, deliver, reconcile, or a full queue name).
        #[arg(long)]
        queue: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Continue after this cursor (printed at the end of a page).
        #[arg(long)]
        after: Option<String>,
    },
    /// Shows one dead-letter row with the message body (references only).
    Show { queue: String, message_id: String },
    /// Sends dead letters back to their queue: one message, a job's, or all of the queue's.
    Redrive {
        queue: String,
        /// The message to send back.
        #[arg(required_unless_present_any = ["job", "all"], conflicts_with_all = ["job", "all"])]
        message_id: Option<String>,
        /// Every message that names this job.
        #[arg(long, conflicts_with = "all")]
        job: Option<String>,
        /// Every message of the queue.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Args)]
pub struct ConflictsArgs {
    job: String,
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Continue after this cursor (printed at the end of a page).
    #[arg(long)]
    after: Option<String>,
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
            let views = match job {
                Some(j) => vec![rt.admin.job(&j).await?],
                None => rt.admin.jobs().await?,
            };
            if views.is_empty() {
                println!("no jobs: apply one with `dualsync job apply FILE`");
            }
            for view in &views {
                print_job(view);
                print_metrics(&rt.admin.metrics(&view.job, None).await?);
            }
            // The same queues in every view: printed once, after the jobs.
            if let Some(view) = views.last() {
                print_queues(&view.pipeline_queues);
            }
        }
        JobCommand::Pause { job } => print_job(&rt.admin.pause(&job).await?),
        JobCommand::Resume { job } => {
            let (view, handed_back) = rt.admin.resume(&job).await?;
            print_job(&view);
            println!("{handed_back} kept deliveries handed back, in order");
        }
    }
    Ok(())
}

fn print_job(v: &JobView) {
    let count = |s: ErrorStatus| v.errors.by_status.get(&s).copied().unwrap_or(0);
    println!(
        "{}: {} (revision {}), {} open and {} retrying error(s), {} request(s) queued",
        v.job,
        v.status.as_str(),
        v.revision,
        count(ErrorStatus::Open),
        count(ErrorStatus::Retrying),
        v.requests_queued
    );
    if let Some(reason) = &v.paused_reason {
        println!("  paused: {reason}");
    }
    if v.kept_deliveries > 0 {
        let at_least = if v.kept_deliveries >= dualsync::admin::KEPT_COUNTED { "at least " } else { "" };
        println!("  {at_least}{} deliveries kept until the job is active", v.kept_deliveries);
    }
    if let Some(rule) = &v.alert {
        println!(
            "  alert rule: pause after {} application errors in {} minutes",
            rule.application_errors, rule.minutes
        );
    }
    for p in &v.initial_sync {
        let of = p.total.map_or(String::new(), |t| format!(" of {t}"));
        let state = if p.finished() {
            "done".to_string()
        } else if p.listed_all {
            format!("{} of {} pages done", p.pages_done, p.pages)
        } else {
            format!("{} of {}+ pages done, listing", p.pages_done, p.pages)
        };
        println!(
            "  initial sync of {} from {}: {} records{of} synced, {} listed, {state}",
            p.map, p.from, p.done, p.listed
        );
    }
}

/// What the pipeline's queues hold, once after the jobs: they are every job's, not one's.
fn print_queues(queues: &[StepQueues]) {
    let show = |r: &QueueReading| match &r.depth {
        Reading::Depth(d) => format!("{} visible / {} in flight", d.visible, d.in_flight),
        Reading::Unreadable { error } => format!("unreadable ({error})"),
    };
    println!("pipeline queues (shared by every job):");
    for q in queues {
        println!("  {:<10} {}; dead letters {}", q.step, show(&q.queue), show(&q.dead_letter));
    }
}

/// The job's counts over the last hour (`Admin::metrics`' default window).
fn print_metrics(m: &MetricsView) {
    let t = &m.totals;
    let lag = match (t.lag_ms_p50, t.lag_ms_max) {
        (Some(p50), Some(max)) => format!(" (delivery lag: median under {p50} ms, longest under {max} ms)"),
        _ => String::new(),
    };
    let errors: Vec<String> = t.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
    println!(
        "  last hour: {} delivered{lag}, {} conflict(s), {} dead letter(s), {} throttling wait(s); error rows: {}",
        t.delivered,
        t.conflicts,
        t.dead_letters,
        t.throttle_waits,
        errors.join(", ")
    );
}

pub async fn errors(data_dir: &Path, backend: &BackendArgs, cmd: ErrorsCommand) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    match cmd {
        ErrorsCommand::List { job, filter, status, all, limit, after } => {
            let status = if all { None } else { Some(status.unwrap_or(ErrorStatus::Open)) };
            let filter = filter.filter(status);
            let page = rt.admin.errors(&job, &filter, limit, after.as_deref()).await?;
            println!(
                "{:<22} {:<12} {:<20} {:<10} {:<20} {:>8} {:<9} message",
                "id", "category", "map", "app", "key", "attempts", "status"
            );
            for e in &page.items {
                println!(
                    "{:<22} {:<12} {:<20} {:<10} {:<20} {:>8} {:<9} {}",
                    e.id,
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
        ErrorsCommand::Show { job, id } => print_error(&rt.admin.error(&job, &id).await?),
        ErrorsCommand::Counts { job, filter } => {
            let c = rt.admin.counts(&job, &filter.filter(None)).await?;
            println!("{} error row(s)", c.total);
            for cat in ErrorCategory::ALL {
                println!("  {:<12} {}", cat.as_str(), c.by_category.get(&cat).copied().unwrap_or(0));
            }
            for st in ErrorStatus::ALL {
                println!("  {:<12} {}", st.as_str(), c.by_status.get(&st).copied().unwrap_or(0));
            }
        }
        ErrorsCommand::Retry { job, filter } => submit(&rt, &job, RequestAction::Retry, &filter).await?,
        ErrorsCommand::Dismiss { job, filter } => submit(&rt, &job, RequestAction::Dismiss, &filter).await?,
    }
    Ok(())
}

fn print_error(e: &SyncError) {
    println!("id:          {}", e.id);
    println!("category:    {} ({})", e.category.as_str(), if e.retriable { "retriable" } else { "not retriable" });
    println!("status:      {}", e.status.as_str());
    println!("map:         {} (entity {} of app {})", e.map, e.entity, e.app);
    println!("key:         {}", e.key.display());
    println!("seq, txid:   {}, {}", e.seq, e.txid);
    println!("attempts:    {}", e.attempts);
    println!("first seen:  {} ms", e.first_seen_ms);
    println!("last seen:   {} ms", e.last_seen_ms);
    if let Some(r) = &e.request {
        println!("request:     {r}");
    }
    println!("message:     {}", e.message);
}

async fn submit(rt: &Backend, job: &str, action: RequestAction, filter: &FilterArgs) -> Result<()> {
    let request = rt.admin.submit(job, action, filter.filter(None)).await?;
    println!("request {} queued: {} of {} open error(s)", request.id, action.as_str(), request.progress.selected);
    rt.run_requests().await?;
    if rt.local().is_some() {
        print_request(&rt.admin.request(job, &request.id).await?);
        if action == RequestAction::Retry {
            println!("a running `dualsync run` delivers the retried changes");
        }
    } else {
        println!("the reconcile function runs it; follow it with `dualsync requests list {job}`");
    }
    Ok(())
}

pub async fn requests(data_dir: &Path, backend: &BackendArgs, cmd: RequestsCommand) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    match cmd {
        RequestsCommand::List { job } => {
            let list = rt.admin.requests(&job).await?;
            if list.is_empty() {
                println!("no requests for job '{job}'");
            }
            for r in &list {
                print_request(r);
            }
        }
    }
    Ok(())
}

fn print_request(r: &ReconcileRequest) {
    let p = &r.progress;
    println!(
        "{} {:<7} {:<8} selected {}, done {}, succeeded {}, still failing {}, not retriable {}{}",
        r.id,
        r.action.as_str(),
        r.status.as_str(),
        p.selected,
        p.done,
        p.succeeded,
        p.still_failing,
        p.not_retriable,
        r.reason.as_deref().map(|x| format!(" ({x})")).unwrap_or_default()
    );
}

pub async fn dead_letters(data_dir: &Path, backend: &BackendArgs, cmd: DeadLettersCommand) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    match cmd {
        DeadLettersCommand::List { queue, limit, after } => {
            let page = rt.admin.dead_letters(queue.as_deref(), limit, after.as_deref()).await?;
            if page.items.is_empty() {
                println!("no dead letters");
            } else {
                println!("{:<15} {:<28} {:<38} {:<12} {:<9} reason", "at ms", "queue", "message id", "job", "status");
            }
            for d in &page.items {
                println!(
                    "{:<15} {:<28} {:<38} {:<12} {:<9} {}",
                    d.at_ms,
                    d.queue,
                    d.message_id,
                    d.job.as_deref().unwrap_or("-"),
                    d.status.as_str(),
                    d.reason
                );
            }
            if let Some(next) = page.next {
                println!("more: --after '{next}'");
            }
        }
        DeadLettersCommand::Show { queue, message_id } => {
            print_dead_letter(&rt.admin.dead_letter(&queue, &message_id).await?)
        }
        DeadLettersCommand::Redrive { queue, message_id, job, all } => {
            let which = match (message_id, job) {
                (Some(id), _) => Redrive::Message(id),
                (None, Some(job)) => Redrive::Job(job),
                (None, None) if all => Redrive::All,
                (None, None) => bail!("say which dead letters: a MESSAGE_ID, --job JOB or --all"),
            };
            let report = rt.admin.redrive(&queue, &which).await?;
            println!(
                "{} message(s) sent back to {}: {}",
                report.redriven.len(),
                report.queue,
                report.redriven.join(" ")
            );
            if report.left > 0 {
                println!("{} other message(s) left in its dead-letter queue", report.left);
            }
            if report.more {
                println!("stopped after {} messages: redrive again for the rest", report.redriven.len());
            }
            if !report.redriven.is_empty() {
                match rt.local() {
                    Some(_) => println!("a running `dualsync run` handles them"),
                    None => println!(
                        "the queue's function handles them; see `dualsync dead-letters list` for any that fail again"
                    ),
                }
            }
        }
    }
    Ok(())
}

fn print_dead_letter(d: &DeadLetter) {
    println!("queue:         {}", d.queue);
    println!("message id:    {}", d.message_id);
    println!("job:           {}", d.job.as_deref().unwrap_or("-"));
    println!("status:        {}", d.status.as_str());
    println!("at:            {} ms", d.at_ms);
    if let Some(ms) = d.redriven_ms {
        println!("redriven at:   {ms} ms");
    }
    println!("receive count: {}", d.receive_count);
    println!("reason:        {}", d.reason);
    println!("body:          {}", d.body);
}

pub async fn conflicts(data_dir: &Path, backend: &BackendArgs, args: ConflictsArgs) -> Result<()> {
    let rt = Backend::open(data_dir, backend).await?;
    let page = rt.admin.conflicts(&args.job, args.limit, args.after.as_deref()).await?;
    println!("{:<24} {:<24} {:<12} winner", "map", "key", "seen from");
    for c in page.items {
        println!("{:<24} {:<24} {:<12} {}", c.map, c.key.display(), c.app, c.winner);
    }
    if let Some(next) = page.next {
        println!("more: --after '{next}'");
    }
    Ok(())
}
