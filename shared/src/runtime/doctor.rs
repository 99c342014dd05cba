//! `dualsync doctor JOB`: whether each app of a job can serve it, before it runs. Each app
//! checks itself ([`crate::ports::Connector::diagnose`]); an app that cannot even be opened (a
//! secret's variable unset, a file missing) is one problem of its own.
use std::path::Path;

use crate::domain::job::{ConnectorSpec, Job, Side};
use crate::ports::{ConnectorError, Finding};
use crate::steps::{entity_specs, ConnectorRegistry};

/// The problems found, each with the app it concerns, in app order; empty when all is well.
pub async fn doctor(job: &Job, registry: &dyn ConnectorRegistry) -> Vec<(String, Finding)> {
    // Opening a sqlite app creates its file: a file not there is the finding, not a new file.
    let missing: Vec<_> = job
        .apps
        .iter()
        .filter_map(|a| match &a.connector {
            ConnectorSpec::Sqlite { path } if !Path::new(path).exists() => Some((
                a.name.clone(),
                Finding {
                    subject: format!("file {path}"),
                    problem: "does not exist".to_string(),
                    fix: "correct the app's path (relative to the job file's folder)".to_string(),
                },
            )),
            _ => None,
        })
        .collect();
    if !missing.is_empty() {
        return missing;
    }
    let connectors = match registry.connectors(job) {
        Ok(c) => c,
        Err(e) => {
            let app = match &e {
                ConnectorError::Transient { app, .. } | ConnectorError::Rejected { app, .. } => app.clone(),
            };
            let finding = Finding {
                subject: "connector".to_string(),
                problem: format!("cannot be opened: {}", e.message()),
                fix: "check the app's settings in the job file and the environment variables they name".to_string(),
            };
            return vec![(app, finding)];
        }
    };
    let specs = entity_specs(job);
    let mut out = Vec::new();
    for side in Side::BOTH {
        let entities: Vec<_> = specs.iter().map(|s| s[side.index()].clone()).collect();
        let app = job.app_name(side).to_string();
        out.extend(
            connectors[side.index()].diagnose(&entities, &job.companies).await.into_iter().map(|f| (app.clone(), f)),
        );
    }
    out
}
