//! Children waiting for their parent (DESIGN §3 step 5): a child whose lookup found its parent
//! missing on the other side is noted on the parent's link, and delivered again when the parent
//! exists on both sides. The note rides on the link item that delivery reads anyway, so the
//! happy path pays nothing for it.
use super::State;
use crate::domain::change::{ChangeRef, Key};
use crate::domain::link::LinkState;
use crate::ports::KvError;

/// Children noted on one parent at most: a link item must stay small (DynamoDB items are at most
/// 400 KB). Children past it keep their error row for an operator's retry.
pub const MAX_WAITERS: usize = 100;

impl State {
    /// Notes `child` on the link of its parent (`map`, `key`); false if the parent has as many
    /// waiting children as it may hold.
    pub async fn add_waiter(&self, job: &str, map: &str, key: &Key, child: &ChangeRef) -> Result<bool, KvError> {
        loop {
            let current = self.links(job, &[(map, key)]).await?.pop().flatten();
            let (mut state, rev) = match current {
                Some(l) => (l.state, Some(l.rev)),
                None => (LinkState::default(), None),
            };
            let same = |w: &ChangeRef| w.map == child.map && w.key == child.key && w.source == child.source;
            match state.waiters.iter().position(same) {
                Some(n) if state.waiters[n].seq >= child.seq => return Ok(true),
                Some(n) => state.waiters[n] = child.clone(),
                None if state.waiters.len() >= MAX_WAITERS => return Ok(false),
                None => state.waiters.push(child.clone()),
            }
            match self.kv.put(Self::link_put(job, map, key, &state, rev)).await {
                Ok(_) => return Ok(true),
                Err(KvError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
