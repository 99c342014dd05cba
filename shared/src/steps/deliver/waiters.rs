//! Children waiting on a parent the other side lacks (DESIGN §3 step 5): noted on the parent's
//! link, and delivered again, in dependency order, when the parent syncs.
use crate::domain::change::{ChangeRef, Key};
use crate::domain::errors::ErrorCategory;
use crate::domain::job::Side;
use crate::domain::link::LinkState;
use crate::domain::sequence::short_hash;
use crate::ports::KvError;
use crate::state::State;
use crate::steps::record::WAITING;
use crate::steps::redeliver::redelivery;
use crate::steps::{LoadedJob, StepError, Steps};

/// A child whose parent (map index, key) is missing on the other side, with why.
pub(super) type Waiter<'c> = (&'c ChangeRef, usize, Key, String);

impl Steps {
    /// Sends the children waiting on these links (map, key, revision, state) back to the deliver
    /// queue, in dependency order, then clears them from the link (conditional on the revision:
    /// a link changed meanwhile keeps them, and sends them again at its next sync, which a fresh
    /// read makes harmless). The send comes first, so that a crash loses no child.
    pub(super) async fn release_waiters<'k>(
        &self,
        lj: &LoadedJob,
        links: impl IntoIterator<Item = (&'k str, &'k Key, u64, LinkState)>,
    ) -> Result<(), StepError> {
        let mut out = Vec::new();
        let mut clear = Vec::new();
        for (map, key, rev, mut state) in links {
            if state.waiters.is_empty() {
                continue;
            }
            let waiters: Vec<ChangeRef> = std::mem::take(&mut state.waiters)
                .into_iter()
                .map(|w| ChangeRef { waited: true, at_ms: self.state.now_ms(), ..w })
                .collect();
            let tag = format!("wait-{}", short_hash(&[map.as_bytes(), key.display().as_bytes(), &rev.to_le_bytes()]));
            out.extend(redelivery(&lj.job, waiters, &tag));
            clear.push(State::link_put(&lj.job.name, map, key, &state, Some(rev)));
        }
        if out.is_empty() {
            return Ok(());
        }
        self.deliver_queue.send(out).await?;
        for a in self.state.put_links(clear).await? {
            match a {
                Ok(_) | Err(KvError::ConditionFailed { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Records each child's missing reference and notes the child on its parent's link, to be
    /// delivered again when the parent syncs. Such a row does not count toward the alert rule
    /// yet: it counts if the reference is still missing after that.
    pub(super) async fn wait_for_parents(&self, lj: &LoadedJob, waiting: Vec<Waiter<'_>>) -> Result<(), StepError> {
        let job = &lj.job;
        let mut noted: Vec<(usize, Side, &Key)> = Vec::new();
        for (c, parent, key, why) in &waiting {
            self.record(lj, c, ErrorCategory::Application, format!("{why}{WAITING}")).await?;
            let child = ChangeRef { retry_of: None, ..(*c).clone() };
            if self.state.add_waiter(&job.name, &job.maps[*parent].name, key, &child).await? {
                noted.push((*parent, c.source.other(), key));
            } else {
                self.check_alert(&job.name).await?;
            }
        }
        // The parent may have synced between the lookup and the note: if it is there now, its
        // waiting children go at once.
        let found = self.read_grouped(lj, noted.iter().copied()).await;
        let mut there: Vec<(&str, &Key)> = Vec::new();
        for ((parent, _, key), r) in noted.iter().zip(found) {
            if matches!(r, Ok(Some(_))) {
                there.push((job.maps[*parent].name.as_str(), *key));
            }
        }
        let links = self.state.links(&job.name, &there).await?;
        let release = there.iter().zip(links).filter_map(|((map, key), l)| l.map(|l| (*map, *key, l.rev, l.state)));
        self.release_waiters(lj, release).await
    }
}
