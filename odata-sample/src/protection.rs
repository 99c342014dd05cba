//! Dataverse's service protection over time: per user, at most so many requests and so much
//! combined execution time within a sliding window (Dataverse: 6,000 requests and 1,200 s
//! within 300 s). Beyond either the service answers 429 with the limit's own code and a
//! `Retry-After` saying when the window has room again. The third limit, requests in flight,
//! is `Options::max_concurrent`.
//!
//! A `$batch` counts as one request. Microsoft's "Service protection API limits" says that
//! bundling requests in batch operations sends fewer requests and that the execution-time
//! limit is what counters it; so a batch's parts add execution time, not requests.
//! Execution time is what the service spends on a request, from its arrival to its answer,
//! without the WAN round trip that `Options::latency` stands for. The sample service has one
//! set of credentials, so one user and one window.
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The limits of one user's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    pub requests: usize,
    pub execution: Duration,
    pub window: Duration,
}

impl Protection {
    /// Dataverse's defaults per user and web server.
    pub const DATAVERSE: Protection =
        Protection { requests: 6000, execution: Duration::from_secs(1200), window: Duration::from_secs(300) };
}

/// Why a request was refused: Dataverse's error code and message, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub message: String,
    pub retry_after_secs: u64,
}

/// The sliding window: requests admitted (by arrival) and execution spent (by completion).
pub struct Window {
    limits: Protection,
    state: Mutex<Spent>,
}

#[derive(Default)]
struct Spent {
    arrivals: VecDeque<Instant>,
    executions: VecDeque<(Instant, Duration)>,
    execution: Duration,
}

impl Spent {
    /// Forgets what left the window by `now`.
    fn slide(&mut self, now: Instant, window: Duration) {
        while self.arrivals.front().is_some_and(|at| *at + window <= now) {
            self.arrivals.pop_front();
        }
        while let Some((at, spent)) = self.executions.front().copied() {
            if at + window > now {
                break;
            }
            self.execution = self.execution.saturating_sub(spent);
            self.executions.pop_front();
        }
    }
}

impl Window {
    pub fn new(limits: Protection) -> Window {
        Window { limits, state: Mutex::new(Spent::default()) }
    }

    /// Admits a request arriving at `now`, or says which limit it would pass.
    pub fn admit(&self, now: Instant) -> Result<(), Refusal> {
        let Protection { requests, execution, window } = self.limits;
        let mut spent = self.state.lock().unwrap();
        spent.slide(now, window);
        let retry = |oldest: Option<Instant>| {
            let free_at = oldest.map_or(now, |at| at + window);
            free_at.saturating_duration_since(now).as_secs_f64().ceil().max(1.0) as u64
        };
        if spent.arrivals.len() >= requests {
            return Err(Refusal {
                code: "0x80072322",
                message: format!(
                    "Number of requests exceeded the limit of {requests} over time window of {} seconds.",
                    window.as_secs()
                ),
                retry_after_secs: retry(spent.arrivals.front().copied()),
            });
        }
        if spent.execution >= execution {
            return Err(Refusal {
                code: "0x80072321",
                message: format!(
                    "Combined execution time of incoming requests exceeded limit of {} milliseconds over time window of {} seconds.",
                    execution.as_millis(),
                    window.as_secs()
                ),
                retry_after_secs: retry(spent.executions.front().map(|(at, _)| *at)),
            });
        }
        // Requests reach this point a little out of their arrival order: keep the window sorted.
        let at = spent.arrivals.iter().rposition(|a| *a <= now).map_or(0, |p| p + 1);
        spent.arrivals.insert(at, now);
        Ok(())
    }

    /// Counts the execution time of an admitted request that finished at `now`.
    pub fn spent(&self, now: Instant, execution: Duration) {
        let mut spent = self.state.lock().unwrap();
        spent.execution += execution;
        spent.executions.push_back((now, execution));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Protection =
        Protection { requests: 3, execution: Duration::from_secs(2), window: Duration::from_secs(10) };

    #[test]
    fn a_full_window_refuses_until_its_oldest_request_leaves() {
        let w = Window::new(SMALL);
        let t0 = Instant::now();
        for s in 0..3 {
            w.admit(t0 + Duration::from_secs(s)).unwrap();
        }
        let refused = w.admit(t0 + Duration::from_secs(4)).unwrap_err();
        assert_eq!(refused.code, "0x80072322");
        assert_eq!(refused.retry_after_secs, 6, "the first request leaves the window at 10 s");
        assert!(refused.message.contains("limit of 3 over time window of 10 seconds"), "{}", refused.message);
        w.admit(t0 + Duration::from_secs(10)).expect("room again once the first request left");
        assert!(w.admit(t0 + Duration::from_millis(10_500)).is_err(), "the second is still in the window");
    }

    #[test]
    fn requests_admitted_out_of_arrival_order_leave_the_window_by_arrival() {
        let w = Window::new(SMALL);
        let t0 = Instant::now();
        for s in [2, 1, 0] {
            w.admit(t0 + Duration::from_secs(s)).unwrap();
        }
        w.admit(t0 + Duration::from_secs(10)).expect("the request that arrived at 0 s left at 10 s");
        assert!(w.admit(t0 + Duration::from_secs(10)).is_err(), "the one at 1 s is still in");
    }

    #[test]
    fn execution_time_over_the_limit_refuses_until_it_leaves_the_window() {
        let w = Window::new(SMALL);
        let t0 = Instant::now();
        w.admit(t0).unwrap();
        w.spent(t0 + Duration::from_secs(1), Duration::from_millis(1500));
        w.admit(t0 + Duration::from_secs(1)).unwrap();
        w.spent(t0 + Duration::from_secs(2), Duration::from_millis(500));
        let refused = w.admit(t0 + Duration::from_secs(3)).unwrap_err();
        assert_eq!((refused.code, refused.retry_after_secs), ("0x80072321", 8));
        w.admit(t0 + Duration::from_secs(11)).expect("the first 1.5 s left the window at 11 s");
    }
}
