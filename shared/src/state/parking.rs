//! Deliveries kept aside while a job is paused (`PARK#job`), handed back in arrival order when
//! it resumes. They are references, like every queue message.
use serde::{Deserialize, Serialize};

use super::{decode, encode, State};
use crate::domain::keys;
use crate::ports::{Expect, InMessage, KvError, Put, SkRange};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parked {
    #[serde(skip)]
    pub sk: String,
    pub group: Option<String>,
    pub body: String,
}

impl State {
    /// Keeps a batch of deliveries. The sort key (time, then place in the batch) keeps each
    /// FIFO group's order: a group's next batch is received only after this one is acked.
    pub async fn park(&self, job: &str, msgs: &[&InMessage]) -> Result<(), KvError> {
        let now = self.now_ms();
        let puts = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| Put {
                pk: keys::parked_pk(job),
                sk: keys::time_sk(now, &format!("{i:04}#{}", keys::escape(&m.id))),
                body: encode(&Parked { sk: String::new(), group: m.group.clone(), body: m.body.clone() }),
                expires_at: None,
                expect: Expect::Any,
            })
            .collect();
        for r in self.kv.put_many(puts).await? {
            r?;
        }
        Ok(())
    }

    /// The oldest kept deliveries of a job.
    pub async fn parked(&self, job: &str, limit: usize) -> Result<Vec<Parked>, KvError> {
        let page = self.kv.query(&keys::parked_pk(job), &SkRange::default(), limit, None).await?;
        page.items.iter().map(|i| Ok(Parked { sk: i.sk.clone(), ..decode(i)? })).collect()
    }

    pub async fn unpark(&self, job: &str, sks: &[String]) -> Result<(), KvError> {
        for sk in sks {
            self.kv.delete(&keys::parked_pk(job), sk, Expect::Any).await?;
        }
        Ok(())
    }
}
