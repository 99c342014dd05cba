//! What an initial sync did, per map and company: the counts each page keeps with its task
//! (so a resumed run reports the whole sync, not just its own part) and the summary table.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::domain::errors::ErrorCategory;
use crate::steps::deliver::{ChangeResult, Effect};

/// Counts of one page, company or map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub listed: u64,
    pub created: u64,
    pub updated: u64,
    /// Equal content on both sides: linked with no write.
    pub in_step: u64,
    /// Different content on both sides with no sync between: decided by the primary, logged.
    pub conflicts: u64,
    /// Not the latest, or superseded by the other side's newer change.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
    /// Records with an error row, by category (`application`, `system`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub errors: BTreeMap<String, u64>,
    /// Records the target already held when read: what the target-only count subtracts.
    #[serde(default)]
    pub found: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.listed += o.listed;
        self.created += o.created;
        self.updated += o.updated;
        self.in_step += o.in_step;
        self.conflicts += o.conflicts;
        self.skipped += o.skipped;
        self.found += o.found;
        for (k, n) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += n;
        }
    }

    /// Counts one listed record's delivery.
    pub(crate) fn count(&mut self, result: &ChangeResult) {
        self.listed += 1;
        let (effect, found) = match result {
            ChangeResult::Done { effect, found } => (*effect, *found),
            ChangeResult::System { .. } => (Effect::Failed(ErrorCategory::System), false),
        };
        self.found += u64::from(found);
        match effect {
            Effect::Created => self.created += 1,
            Effect::Updated => self.updated += 1,
            Effect::InStep => self.in_step += 1,
            Effect::Conflict => self.conflicts += 1,
            Effect::Skipped => self.skipped += 1,
            Effect::Failed(category) => *self.errors.entry(category.as_str().to_string()).or_default() += 1,
        }
    }

    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// One map of an initial sync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MapReport {
    pub map: String,
    /// Per company (`""`: records with no company field), over the whole sync so far.
    pub companies: BTreeMap<String, Counts>,
    /// Records the target holds that the source does not: counted, left alone. `None` when not
    /// counted (a run limited to one company, or `--only-failed`).
    pub target_only: Option<u64>,
    /// Records this run handled (a resumed run: only what was left), and how long it took.
    pub records_this_run: u64,
    pub elapsed_ms: u64,
}

impl MapReport {
    pub fn total(&self) -> Counts {
        let mut t = Counts::default();
        self.companies.values().for_each(|c| t.add(c));
        t
    }
    pub fn records_per_s(&self) -> f64 {
        self.records_this_run as f64 / (self.elapsed_ms.max(1) as f64 / 1000.0)
    }
}

/// A whole initial sync.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct InitialSyncReport {
    pub maps: Vec<MapReport>,
    pub dry_run: bool,
    /// Pages and records this run handled.
    pub pages: usize,
    pub records: usize,
    /// Records of this run that hit a system failure: each has a retriable error row.
    pub system_errors: usize,
}

impl InitialSyncReport {
    /// The summary table: a line per map and company (companies only where a map has
    /// several), errors by category, elapsed and records/s of this run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let created = if self.dry_run { "to create" } else { "created" };
        let updated = if self.dry_run { "to update" } else { "updated" };
        let _ = writeln!(
            out,
            "{:<20} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>7} {:>11} {:>9} {:>10}",
            "map",
            "company",
            "listed",
            created,
            updated,
            "in step",
            "conflicts",
            "skipped",
            "application",
            "system",
            "target only",
            "elapsed",
            "records/s"
        );
        for m in &self.maps {
            let mut rows: Vec<(String, Counts)> = Vec::new();
            if m.companies.len() > 1 {
                rows.extend(m.companies.iter().map(|(c, n)| (c.clone(), n.clone())));
            }
            rows.push((if m.companies.len() > 1 { "all".into() } else { first_company(m) }, m.total()));
            let last = rows.len() - 1;
            for (i, (company, c)) in rows.into_iter().enumerate() {
                let err = |k: ErrorCategory| c.errors.get(k.as_str()).copied().unwrap_or(0);
                let tail = if i == last {
                    format!(
                        "{:>11} {:>8.1}s {:>10.0}",
                        m.target_only.map_or("-".to_string(), |n| n.to_string()),
                        m.elapsed_ms as f64 / 1000.0,
                        m.records_per_s()
                    )
                } else {
                    String::new()
                };
                let _ = writeln!(
                    out,
                    "{:<20} {:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11} {:>7} {}",
                    m.map,
                    company,
                    c.listed,
                    c.created,
                    c.updated,
                    c.in_step,
                    c.conflicts,
                    c.skipped + err(ErrorCategory::Concurrency),
                    err(ErrorCategory::Application),
                    err(ErrorCategory::System),
                    tail
                );
            }
        }
        out
    }
}

fn first_company(m: &MapReport) -> String {
    match m.companies.keys().next() {
        Some(c) if !c.is_empty() => c.clone(),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_by_effect_and_category() {
        let mut c = Counts::default();
        c.count(&ChangeResult::Done { effect: Effect::Created, found: false });
        c.count(&ChangeResult::Done { effect: Effect::InStep, found: true });
        c.count(&ChangeResult::Done { effect: Effect::Failed(ErrorCategory::Application), found: true });
        c.count(&ChangeResult::System { message: "503".into(), retry_after: None });
        assert_eq!((c.listed, c.created, c.in_step, c.found), (4, 1, 1, 2));
        assert_eq!(c.errors.get("application"), Some(&1));
        assert_eq!(c.errors.get("system"), Some(&1));
        let mut t = Counts::default();
        t.add(&c);
        t.add(&c);
        assert_eq!((t.listed, t.errors_total()), (8, 4));
    }
}
