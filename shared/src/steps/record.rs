//! Error rows as the steps record them (DESIGN §1 "sync error"): one place that builds the row,
//! counts it and logs it (the key only, never field values), and checks the job's alert rule
//! once per batch of rows rather than once per row.
use tracing::warn;

use super::{LoadedJob, Metrics, StepError, Steps};
use crate::domain::change::ChangeRef;
use crate::domain::errors::ErrorCategory;
use crate::state::NewError;

/// Ends the message of a missing reference whose child waits for its parent to sync: such a
/// row does not count toward the alert rule (see [`Steps::check_alert`]) unless the reference
/// is still missing after the parent synced.
pub const WAITING: &str = " (waiting for it)";

impl Steps {
    /// Records an error row for a change of a loaded job. Does not check the alert rule: callers
    /// that record application errors call [`Steps::record_all`] or check it once themselves.
    pub(crate) async fn record(
        &self,
        lj: &LoadedJob,
        c: &ChangeRef,
        category: ErrorCategory,
        message: String,
    ) -> Result<(), StepError> {
        self.record_change(lj, c, category, message, false).await
    }

    /// As [`Steps::record`], for a delete: its row's retry runs the live delete again
    /// (`SyncError::delete`).
    pub(crate) async fn record_delete(
        &self,
        lj: &LoadedJob,
        c: &ChangeRef,
        category: ErrorCategory,
        message: String,
    ) -> Result<(), StepError> {
        self.record_change(lj, c, category, message, true).await
    }

    async fn record_change(
        &self,
        lj: &LoadedJob,
        c: &ChangeRef,
        category: ErrorCategory,
        message: String,
        delete: bool,
    ) -> Result<(), StepError> {
        let entity = lj.job.map(&c.map).map(|(_, m)| m.entity(c.source).to_string()).unwrap_or_else(|| c.map.clone());
        let e = self.new_error(&lj.job.name, c, &entity, lj.job.app_name(c.source), category, message);
        self.state.record_error(&lj.job.name, NewError { delete, ..e }).await?;
        Ok(())
    }

    /// Records rows, then checks the alert rule once if any is an application error.
    pub(crate) async fn record_all<'c>(
        &self,
        lj: &LoadedJob,
        rows: impl IntoIterator<Item = (&'c ChangeRef, ErrorCategory, String)>,
    ) -> Result<(), StepError> {
        let mut application = false;
        for (c, category, message) in rows {
            application |= category == ErrorCategory::Application;
            self.record(lj, c, category, message).await?;
        }
        if application {
            self.check_alert(&lj.job.name).await?;
        }
        Ok(())
    }

    /// Records an error row where the change may not resolve against the job (an unknown map or
    /// entity): the caller names the entity and the app.
    pub(crate) async fn record_raw(
        &self,
        job: &str,
        c: &ChangeRef,
        entity: &str,
        app: &str,
        category: ErrorCategory,
        message: String,
    ) -> Result<(), StepError> {
        let e = self.new_error(job, c, entity, app, category, message);
        self.state.record_error(job, e).await?;
        Ok(())
    }

    /// The row of change `c`, counted and logged (the key only).
    fn new_error(
        &self,
        job: &str,
        c: &ChangeRef,
        entity: &str,
        app: &str,
        category: ErrorCategory,
        message: String,
    ) -> NewError {
        match category {
            ErrorCategory::Concurrency => Metrics::add(&self.metrics.concurrency, 1),
            ErrorCategory::Application => Metrics::add(&self.metrics.application, 1),
            _ => {}
        }
        self.metrics.count(job, |t| t.error(category));
        warn!(job, map = %c.map, key = %c.key, category = category.as_str(), reason = %message, "sync error");
        NewError {
            map: c.map.clone(),
            entity: entity.to_string(),
            app: app.to_string(),
            source: c.source,
            key: c.key.clone(),
            by_record_id: false,
            seq: c.seq,
            txid: c.txid.clone(),
            category,
            message,
            delete: false,
        }
    }
}
