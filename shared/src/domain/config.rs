//! Job definitions as written in YAML files, and their validation into a [`Job`].
//!
//! Validation reports every problem at once, each with the file, the path inside it and what is
//! wrong, so a user fixes a job file in one pass.
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use thiserror::Error;

use super::job::{Job, Mode};

/// The file form of an integration job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobDef {
    /// The job's name: letters, digits, `-` and `_`.
    pub job: String,
    /// Exactly two apps; the first is side A (its values are the canonical value space).
    pub apps: Vec<AppDef>,
    /// The app that is primary for conflict detection.
    pub primary: String,
    /// Default mode of the maps.
    #[serde(default)]
    pub mode: Mode,
    /// Companies (legal entities) in scope; empty means all.
    #[serde(default)]
    pub companies: Vec<String>,
    pub table_groups: Vec<TableGroupDef>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppDef {
    pub name: String,
    /// `sqlite` or `odata`.
    pub connector: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableGroupDef {
    pub name: String,
    pub maps: Vec<TableMapDef>,
}

/// A pair of names, one per app: `{ fno: CustomerAccount, dataverse: accountnumber }`.
pub type PairDef = BTreeMap<String, String>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableMapDef {
    pub name: String,
    pub sequence: u32,
    /// The entity (table) of each app.
    pub entities: PairDef,
    /// Integration key field pairs: required, like alternate keys.
    pub keys: Vec<PairDef>,
    #[serde(default)]
    pub fields: Vec<FieldMapDef>,
    #[serde(default)]
    pub lookups: Vec<LookupDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company: Option<PairDef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
}

/// A field map: one field name per app, and optionally a value map.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FieldMapDef {
    #[serde(flatten)]
    pub names: BTreeMap<String, String>,
    /// Value pairs, one value per app: `[{ fno: Person, dataverse: 1 }]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<BTreeMap<String, Value>>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupDef {
    /// The referenced map's name.
    pub map: String,
    /// The fields holding the referenced key, in the referenced map's key order.
    pub fields: Vec<PairDef>,
}

/// One problem in a job file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Path inside the file, like `table_groups[0].maps[1].keys[0]`.
    pub path: String,
    pub message: String,
}

/// All the problems found in one job file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", render(.file, .problems))]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<Problem>,
}

fn render(file: &str, problems: &[Problem]) -> String {
    let mut out = format!("{} problem(s) in {file}:", problems.len());
    for p in problems {
        out.push_str(&format!("\n  {file}: {}: {}", p.path, p.message));
    }
    out
}

/// Reads, parses and validates a job file.
pub fn load_job_file(path: &Path) -> Result<(JobDef, Job), ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: file.clone(),
        problems: vec![Problem { path: "(file)".into(), message: format!("cannot read: {e}") }],
    })?;
    let def = parse_job(&file, &text)?;
    let job = compile(&file, &def)?;
    Ok((def, job))
}

/// Parses YAML text into a [`JobDef`]; a syntax or shape error names the path inside the file.
pub fn parse_job(file: &str, text: &str) -> Result<JobDef, ConfigErrors> {
    todo!("parse {file} {text}")
}

/// Validates a [`JobDef`] into a [`Job`], collecting every problem.
pub fn compile(file: &str, def: &JobDef) -> Result<Job, ConfigErrors> {
    todo!("compile {file} {def:?}")
}
