//! One adaptive concurrency limiter per app, shared by every step of the process (DESIGN §9,
//! service protection).
//!
//! Additive increase, multiplicative decrease: the limit starts low, grows by one for every
//! `limit` requests that succeed (about one per round trip of the whole window) up to the
//! app's maximum (Dataverse: 52 concurrent requests per user), and halves on a 429. A 429's
//! `Retry-After` closes the gate: no request to the app starts before it passes, whichever
//! task asks (no retry storm).
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// The limiter's arithmetic, apart from waiting: tested without I/O or clocks.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    pub max: usize,
    /// The current limit (fractional: increases add `1/limit`).
    pub limit: f64,
    pub in_flight: usize,
    /// No request starts before this instant.
    pub closed_until: Option<Instant>,
}

impl Aimd {
    pub fn new(max: usize) -> Aimd {
        let max = max.max(1);
        Aimd { max, limit: (max as f64).min(4.0), in_flight: 0, closed_until: None }
    }

    /// Whether a request may start now; if so it is counted in flight.
    pub fn try_start(&mut self, now: Instant) -> Result<(), Wait> {
        if let Some(t) = self.closed_until {
            if now < t {
                return Err(Wait::Until(t));
            }
            self.closed_until = None;
        }
        if self.in_flight >= self.limit.floor().max(1.0) as usize {
            return Err(Wait::Slot);
        }
        self.in_flight += 1;
        Ok(())
    }

    pub fn finish(&mut self, outcome: Outcome, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        match outcome {
            Outcome::Ok => self.limit = (self.limit + 1.0 / self.limit).min(self.max as f64),
            Outcome::Throttled(after) => {
                self.limit = (self.limit / 2.0).max(1.0);
                // Without a Retry-After, a second's pause still breaks a storm.
                let until = now + after.unwrap_or(Duration::from_secs(1));
                self.closed_until = Some(self.closed_until.map_or(until, |t| t.max(until)));
            }
            Outcome::Neutral => {}
        }
    }

    pub fn current_limit(&self) -> usize {
        self.limit.floor().max(1.0) as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The gate is closed until then (a Retry-After).
    Until(Instant),
    /// Every slot is taken.
    Slot,
}

/// How a request ended, for the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The service answered without pushing back.
    Ok,
    /// Service protection: 429 (or 503 with Retry-After).
    Throttled(Option<Duration>),
    /// Failed without telling anything about load (a network error).
    Neutral,
}

/// The async limiter: [`Limiter::acquire`] waits for a slot and an open gate.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<Aimd>,
    freed: Notify,
    /// Requests that were throttled, for figures and tests.
    throttled: std::sync::atomic::AtomicU64,
    most_in_flight: std::sync::atomic::AtomicUsize,
}

impl Limiter {
    pub fn new(max: usize) -> Limiter {
        Limiter {
            state: Mutex::new(Aimd::new(max)),
            freed: Notify::new(),
            throttled: Default::default(),
            most_in_flight: Default::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Aimd> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until a request may start; the permit reports how it ended when finished (or,
    /// dropped unfinished, as neutral).
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.freed.notified();
            let wait = {
                let mut s = self.lock();
                match s.try_start(Instant::now()) {
                    Ok(()) => {
                        self.most_in_flight.fetch_max(s.in_flight, std::sync::atomic::Ordering::Relaxed);
                        return Permit { limiter: self.clone(), done: false };
                    }
                    Err(w) => w,
                }
            };
            match wait {
                Wait::Until(t) => {
                    crate::steps::metrics::note_throttle_wait();
                    tokio::time::sleep_until(t.into()).await
                }
                Wait::Slot => notified.await,
            }
        }
    }

    fn finish(&self, outcome: Outcome) {
        if matches!(outcome, Outcome::Throttled(_)) {
            self.throttled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.lock().finish(outcome, Instant::now());
        self.freed.notify_waiters();
    }

    pub fn current_limit(&self) -> usize {
        self.lock().current_limit()
    }

    /// How many answers were throttling.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most requests that were in flight at once.
    pub fn most_in_flight(&self) -> usize {
        self.most_in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One request's place in the limiter.
pub struct Permit {
    limiter: Arc<Limiter>,
    done: bool,
}

impl Permit {
    pub fn finish(mut self, outcome: Outcome) {
        self.done = true;
        self.limiter.finish(outcome);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.finish(Outcome::Neutral);
        }
    }
}

/// The process's limiter of an app, by its service root: every connector to the same service
/// in this process shares it, whichever job or step opened it. The first caller's maximum holds.
pub fn shared(service_root: &str, max: usize) -> Arc<Limiter> {
    static ALL: OnceLock<Mutex<HashMap<String, Arc<Limiter>>>> = OnceLock::new();
    let mut all = ALL.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    all.entry(service_root.to_string()).or_insert_with(|| Arc::new(Limiter::new(max))).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_ramps_up_to_the_maximum_and_halves_on_throttling() {
        let t0 = Instant::now();
        let mut a = Aimd::new(52);
        assert_eq!(a.current_limit(), 4);
        for _ in 0..4 {
            a.try_start(t0).unwrap();
        }
        assert_eq!(a.try_start(t0), Err(Wait::Slot));
        for _ in 0..2000 {
            a.finish(Outcome::Ok, t0);
            a.try_start(t0).unwrap_or(());
        }
        assert_eq!(a.current_limit(), 52);
        a.finish(Outcome::Throttled(Some(Duration::from_secs(3))), t0);
        assert_eq!(a.current_limit(), 26);
    }

    #[test]
    fn no_request_starts_before_retry_after() {
        let t0 = Instant::now();
        let mut a = Aimd::new(10);
        a.try_start(t0).unwrap();
        a.finish(Outcome::Throttled(Some(Duration::from_secs(5))), t0);
        let until = t0 + Duration::from_secs(5);
        assert_eq!(a.try_start(t0 + Duration::from_secs(4)), Err(Wait::Until(until)));
        // A shorter Retry-After after a longer one does not reopen the gate early.
        a.in_flight += 1;
        a.finish(Outcome::Throttled(Some(Duration::from_secs(1))), t0);
        assert_eq!(a.try_start(t0 + Duration::from_secs(2)), Err(Wait::Until(until)));
        assert_eq!(a.try_start(until), Ok(()));
    }

    #[test]
    fn the_limit_never_drops_below_one() {
        let t0 = Instant::now();
        let mut a = Aimd::new(2);
        for _ in 0..10 {
            a.in_flight += 1;
            a.finish(Outcome::Throttled(None), t0);
        }
        assert_eq!(a.current_limit(), 1);
        assert_eq!(a.closed_until, Some(t0 + Duration::from_secs(1)));
    }

    #[tokio::test]
    async fn permits_hold_slots_until_finished_or_dropped() {
        let l = Arc::new(Limiter::new(1));
        let p = l.acquire().await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move { l2.acquire().await.finish(Outcome::Ok) });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(p);
        waiter.await.unwrap();
        assert_eq!(l.most_in_flight(), 1);
    }

    #[test]
    fn one_limiter_per_service_in_a_process() {
        let a = shared("https://one.example/api/", 52);
        let b = shared("https://one.example/api/", 8);
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &shared("https://two.example/api/", 52)));
    }
}
