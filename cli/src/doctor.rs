//! `dualsync doctor JOB_FILE`: checks that each app of a job can serve it (reachable,
//! authenticated, entity sets and fields there, Dataverse alternate keys active, fno companies
//! existing) and prints each problem with how to fix it; exits non-zero if there is any.
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

use dualsync::domain::config::compile;
use dualsync::runtime::doctor::doctor;
use dualsync::runtime::local::SqliteRegistry;

use crate::admin::read_job_file;

#[derive(Args)]
pub struct DoctorArgs {
    /// The job file.
    file: PathBuf,
}

pub async fn run(args: DoctorArgs) -> Result<()> {
    let def = read_job_file(&args.file)?;
    let job = compile(&args.file.display().to_string(), &def)?;
    let findings = doctor(&job, &SqliteRegistry::default()).await;
    if findings.is_empty() {
        println!("{}: both apps can serve job '{}'", args.file.display(), job.name);
        return Ok(());
    }
    for (app, f) in &findings {
        println!("{app}: {}: {}\n  fix: {}", f.subject, f.problem, f.fix);
    }
    bail!("{} problem(s) found", findings.len())
}
