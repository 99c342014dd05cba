//! Reconcile requests (`REQ#job`): created under the per-job limits, run in order by the
//! reconcile step, with their progress.
use serde::{Deserialize, Serialize};

use super::{decode, encode, ErrorFilter, State, StateError};
use crate::domain::errors::ErrorStatus;
use crate::domain::job::JobStatus;
use crate::domain::keys;
use crate::domain::requests::{
    Progress, ReconcileRequest, RequestAction, RequestRefusal, RequestStatus, MAX_QUEUED_REQUESTS, MAX_REQUEST_RECORDS,
};
use crate::ports::{Expect, KvError, Put, SkRange};

/// The ids of a job's requests that are queued or running, oldest first: one item, written
/// conditionally, so that two admins cannot both take the fifth place.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RequestQueue {
    ids: Vec<String>,
    /// Places taken whose run message is not known to be on the reconcile queue yet: the admin
    /// that took the place sends it, then clears it here. One left behind (that admin died in
    /// between) is sent by a later call (see [`State::unsent_requests`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unsent: Vec<String>,
    /// Requests created so far, and when the last one was: they order the next id.
    #[serde(default)]
    created: u64,
    #[serde(default)]
    last_ms: i64,
}

impl State {
    /// Creates a request if the job is active, has a free queue place and the filter selects
    /// between 1 and 10,000 open errors. The caller then queues it for the reconcile step.
    pub async fn create_request(
        &self,
        job: &str,
        action: RequestAction,
        filter: ErrorFilter,
    ) -> Result<ReconcileRequest, StateError> {
        let (record, _) = self.job_record(job).await?;
        if record.status != JobStatus::Active {
            return Err(RequestRefusal::NotActive { job: job.into(), status: record.status.as_str() }.into());
        }
        let open = ErrorFilter { status: Some(ErrorStatus::Open), ..filter.clone() };
        let mut count = 0;
        self.scan_errors(job, &open, |_, _| count += 1).await?;
        if count == 0 {
            return Err(RequestRefusal::NothingSelected { job: job.into() }.into());
        }
        if count > MAX_REQUEST_RECORDS {
            return Err(RequestRefusal::TooManyRecords { count }.into());
        }
        let pk = keys::requests_pk(job);
        loop {
            let (mut queue, expect) = self.request_queue(job).await?;
            if queue.ids.len() >= MAX_QUEUED_REQUESTS {
                return Err(RequestRefusal::QueueFull { job: job.into() }.into());
            }
            // Ids sort in order of creation: time that never goes back, then a counter.
            let created_ms = self.now_ms().max(queue.last_ms);
            let random = &uuid::Uuid::new_v4().simple().to_string()[..6];
            let id = keys::error_id(created_ms, &format!("{:08}{random}", queue.created));
            let request = ReconcileRequest {
                id: id.clone(),
                job: job.into(),
                action,
                filter: filter.clone(),
                created_ms,
                status: RequestStatus::Queued,
                reason: None,
                progress: Progress { selected: count, ..Default::default() },
                settled: false,
            };
            self.save_request(&request).await?;
            queue.ids.push(id.clone());
            queue.unsent.push(id.clone());
            queue.created += 1;
            queue.last_ms = created_ms;
            let put =
                Put { pk: pk.clone(), sk: keys::REQUEST_QUEUE.into(), body: encode(&queue), expires_at: None, expect };
            match self.kv.put(put).await {
                Ok(_) => return Ok(request),
                Err(KvError::ConditionFailed { .. }) => {
                    // Another request took the place first: this one was never queued.
                    let sk = keys::request_sk(&id).unwrap_or_default();
                    self.kv.delete(&pk, &sk, Expect::Any).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The job's request places as stored (with the condition to write them back), less the
    /// places of requests that finished or were never written.
    async fn request_queue(&self, job: &str) -> Result<(RequestQueue, Expect), KvError> {
        let item = self.kv.get(&keys::requests_pk(job), keys::REQUEST_QUEUE).await?;
        let (mut queue, expect) = match &item {
            Some(i) => (decode::<RequestQueue>(i)?, Expect::Rev(i.rev)),
            None => (RequestQueue::default(), Expect::Absent),
        };
        let mut live = Vec::with_capacity(queue.ids.len());
        for id in std::mem::take(&mut queue.ids) {
            if self.request(job, &id).await?.is_some_and(|r| r.status.in_queue()) {
                live.push(id);
            }
        }
        queue.unsent.retain(|id| live.contains(id));
        queue.ids = live;
        Ok((queue, expect))
    }

    /// Requests that took a place at least `min_age_ms` ago and are still not known to be on
    /// the reconcile queue: their admin died between taking the place and sending. Sending one
    /// again is harmless (the message is deduplicated by request id, and a request that ran
    /// does not run again), so the caller sends these and marks them sent.
    pub async fn unsent_requests(&self, job: &str, min_age_ms: i64) -> Result<Vec<ReconcileRequest>, KvError> {
        let (queue, _) = self.request_queue(job).await?;
        let mut out = Vec::new();
        for id in &queue.unsent {
            match self.request(job, id).await? {
                Some(r) if r.status == RequestStatus::Queued && r.created_ms <= self.now_ms() - min_age_ms => {
                    out.push(r)
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Notes that a request's run message is on the reconcile queue.
    pub async fn mark_request_sent(&self, job: &str, id: &str) -> Result<(), KvError> {
        self.update_places(job, |q| {
            let before = q.unsent.len();
            q.unsent.retain(|i| i != id);
            q.unsent.len() != before
        })
        .await
    }

    /// How many of the job's requests are queued or running.
    pub async fn queued_requests(&self, job: &str) -> Result<usize, KvError> {
        Ok(self.request_queue(job).await?.0.ids.len())
    }

    pub async fn request(&self, job: &str, id: &str) -> Result<Option<ReconcileRequest>, KvError> {
        let Some(sk) = keys::request_sk(id) else { return Ok(None) };
        self.kv.get(&keys::requests_pk(job), &sk).await?.map(|i| decode(&i)).transpose()
    }

    pub async fn save_request(&self, request: &ReconcileRequest) -> Result<(), KvError> {
        let sk = keys::request_sk(&request.id).ok_or_else(|| KvError::Corrupt {
            pk: keys::requests_pk(&request.job),
            sk: request.id.clone(),
            reason: "bad request id".into(),
        })?;
        let put = Put {
            pk: keys::requests_pk(&request.job),
            sk,
            body: encode(request),
            expires_at: None,
            expect: Expect::Any,
        };
        self.kv.put(put).await.map(|_| ())
    }

    /// A job's requests in order of creation, retry progress brought up to date.
    pub async fn requests(&self, job: &str) -> Result<Vec<ReconcileRequest>, KvError> {
        let pk = keys::requests_pk(job);
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self.kv.query(&pk, &SkRange::default(), 500, after.as_deref()).await?;
            for item in page.items.iter().filter(|i| i.sk != keys::REQUEST_QUEUE) {
                out.push(self.with_progress(decode(item)?).await?);
            }
            match page.next {
                Some(n) => after = Some(n),
                None => return Ok(out),
            }
        }
    }

    /// A retry's progress is read off the rows it retried until every one has an outcome; then
    /// it is stored as final.
    pub async fn with_progress(&self, mut request: ReconcileRequest) -> Result<ReconcileRequest, KvError> {
        if request.action != RequestAction::Retry || request.status != RequestStatus::Done || request.settled {
            return Ok(request);
        }
        let scope = ErrorFilter { from_ms: request.filter.from_ms, to_ms: request.filter.to_ms, ..Default::default() };
        let mut tagged = Vec::new();
        self.scan_errors(&request.job, &scope, |_, row| {
            if row.request.as_deref() == Some(request.id.as_str()) {
                tagged.push(row);
            }
        })
        .await?;
        let queued = request.progress.selected - request.progress.not_retriable;
        request.progress = request.retry_progress(queued, tagged.iter());
        if request.progress.done == queued {
            request.settled = true;
            self.save_request(&request).await?;
        }
        Ok(request)
    }

    /// Frees a request's queue place once it has run (or was refused).
    pub async fn release_request_place(&self, job: &str, id: &str) -> Result<(), KvError> {
        self.update_places(job, |q| {
            let before = q.ids.len() + q.unsent.len();
            q.ids.retain(|i| i != id);
            q.unsent.retain(|i| i != id);
            q.ids.len() + q.unsent.len() != before
        })
        .await
    }

    /// Changes the job's places item as stored (`change` says whether it changed anything),
    /// conditionally, again if another writer came first.
    async fn update_places(&self, job: &str, change: impl Fn(&mut RequestQueue) -> bool) -> Result<(), KvError> {
        let pk = keys::requests_pk(job);
        loop {
            let Some(item) = self.kv.get(&pk, keys::REQUEST_QUEUE).await? else { return Ok(()) };
            let mut queue: RequestQueue = decode(&item)?;
            if !change(&mut queue) {
                return Ok(());
            }
            let put = Put {
                pk: pk.clone(),
                sk: keys::REQUEST_QUEUE.into(),
                body: encode(&queue),
                expires_at: None,
                expect: Expect::Rev(item.rev),
            };
            match self.kv.put(put).await {
                Ok(_) => return Ok(()),
                Err(KvError::ConditionFailed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
