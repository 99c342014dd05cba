//! The error rows of retried changes, settled once their batch is through.
use crate::domain::canon;
use crate::domain::change::ChangeRef;
use crate::domain::job::Side;
use crate::ports::Record;
use crate::steps::{LoadedJob, StepError, Steps};

impl Steps {
    /// Settles the rows of retried changes that ended without a failure of their own. A row its
    /// delivery resolved or closed stays so; one whose record is now in step (or on neither
    /// side), synced by a newer change, is closed; any other is open again with its attempts
    /// raised (a stale retry is a concurrency skip, DESIGN §2.4).
    pub(crate) async fn settle_retries(&self, lj: &LoadedJob, retried: &[&ChangeRef]) -> Result<(), StepError> {
        let job = &lj.job;
        let known: Vec<(usize, &ChangeRef)> =
            retried.iter().filter_map(|c| job.map(&c.map).map(|(m, _)| (m, *c))).collect();
        let read = |side: Side| self.read_grouped(lj, known.iter().map(move |(m, c)| (*m, side, &c.key)));
        let (a, b) = (read(Side::A).await, read(Side::B).await);
        for (((m, c), ra), rb) in known.iter().zip(a).zip(b) {
            let hash =
                |side: Side, r: &Record| canon::canon(&job.maps[*m], side, &r.fields).ok().map(|c| canon::hash(&c));
            let in_step = match (ra, rb) {
                (Ok(None), Ok(None)) => true,
                (Ok(Some(ra)), Ok(Some(rb))) => hash(Side::A, &ra).is_some_and(|h| Some(h) == hash(Side::B, &rb)),
                _ => false,
            };
            let sk = c.retry_of.clone().unwrap_or_default();
            if in_step {
                self.state.close_errors(&job.name, &[sk], "in step now, synced by a newer change").await?;
            } else {
                let why = "handled without syncing (see the newer rows of this record)";
                self.state.settle_retry(&job.name, &sk, why).await?;
            }
        }
        Ok(())
    }
}
