//! What the operators' metrics count per job (issue 12 item 3): records delivered, delivery lag,
//! error rows by category, conflicts, dead letters and throttling waits. A [`Tally`] is what one
//! batch counted; it becomes counters added to a per-minute item of the state table
//! ([`Tally::counters`], read back by [`Tally::from_counters`]) and, in a Lambda function, one
//! CloudWatch embedded metric format line ([`Tally::emf`]).
//!
//! The state table can add to a counter but not keep a maximum or a percentile, so delivery lag
//! is kept as a histogram over fixed bounds (a 1-2-5 series of milliseconds): a minute's p50 and
//! maximum are the upper bound of the bucket they fall in, at most 2.5 times the true value.
//! The EMF line carries the lags themselves (a sample of at most [`EMF_VALUES`]), so CloudWatch
//! computes exact statistics.
use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{json, Map, Value};

use super::errors::ErrorCategory;

/// Upper bounds (inclusive, milliseconds) of the lag histogram's buckets; one more bucket holds
/// what is above the last.
pub const LAG_BOUNDS_MS: [u64; 24] = [
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000, 10_000_000, 20_000_000, 50_000_000,
];

/// The most values one EMF metric may carry (CloudWatch's limit per metric and line).
pub const EMF_VALUES: usize = 100;

/// The CloudWatch namespace and dimension of the functions' metrics (template.yaml's alarms and
/// dashboard name the same).
pub const NAMESPACE: &str = "Dualsync";
pub const DIMENSION: &str = "Job";

/// Change-to-delivery lag: a histogram, and a sample of the values for the EMF line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lag {
    pub count: u64,
    pub sum_ms: u64,
    pub max_ms: u64,
    /// Counts per bucket of [`LAG_BOUNDS_MS`], the last one above it.
    pub buckets: [u64; LAG_BOUNDS_MS.len() + 1],
    /// At most [`EMF_VALUES`] lags, a uniform sample (reservoir) of all counted.
    pub sample: Vec<u64>,
}

impl Lag {
    pub fn record(&mut self, ms: u64) {
        self.count += 1;
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.max_ms = self.max_ms.max(ms);
        self.buckets[bucket_of(ms)] += 1;
        if self.sample.len() < EMF_VALUES {
            self.sample.push(ms);
        } else {
            // Reservoir sampling: the n-th value replaces a random slot with probability 100/n.
            // A hash of the count is random enough to sample by, and needs no generator.
            let slot = (splitmix(self.count) % self.count) as usize;
            if slot < EMF_VALUES {
                self.sample[slot] = ms;
            }
        }
    }

    fn merge(&mut self, other: &Lag) {
        for ms in &other.sample {
            // Keeps the sample bounded; the histogram and totals are merged exactly below.
            if self.sample.len() < EMF_VALUES {
                self.sample.push(*ms);
            }
        }
        self.count += other.count;
        self.sum_ms = self.sum_ms.saturating_add(other.sum_ms);
        self.max_ms = self.max_ms.max(other.max_ms);
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
    }

    /// The upper bound of the bucket holding the `q` quantile (0 to 1); `None` with no lags.
    pub fn quantile_bound(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(bound_of(i));
            }
        }
        Some(bound_of(LAG_BOUNDS_MS.len()))
    }

    /// The upper bound of the highest bucket that holds a lag.
    pub fn max_bound(&self) -> Option<u64> {
        self.buckets.iter().rposition(|n| *n > 0).map(bound_of)
    }
}

fn bucket_of(ms: u64) -> usize {
    LAG_BOUNDS_MS.partition_point(|b| *b < ms)
}

/// A bucket's upper bound; the bucket above the last bound reports twice the last bound.
fn bound_of(i: usize) -> u64 {
    LAG_BOUNDS_MS.get(i).copied().unwrap_or(LAG_BOUNDS_MS[LAG_BOUNDS_MS.len() - 1] * 2)
}

fn splitmix(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What was counted for one job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    pub delivered: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
    /// Requests held at a closed gate until an app's Retry-After passed, and changes given back
    /// to the queue to wait one out.
    pub throttle_waits: u64,
    /// Error rows recorded (or raised again), by category.
    pub errors: BTreeMap<&'static str, u64>,
    pub lag: Lag,
}

const DELIVERED: &str = "delivered";
const CONFLICTS: &str = "conflicts";
const DEAD_LETTERS: &str = "dead_letters";
const THROTTLE_WAITS: &str = "throttle_waits";
const ERRORS: &str = "err_";
const LAG_COUNT: &str = "lag_n";
const LAG_SUM: &str = "lag_sum_ms";
const LAG_BUCKET: &str = "lag_b";

impl Tally {
    pub fn error(&mut self, category: ErrorCategory) {
        *self.errors.entry(category.as_str()).or_default() += 1;
    }

    pub fn is_empty(&self) -> bool {
        *self == Tally::default()
    }

    pub fn merge(&mut self, other: &Tally) {
        self.delivered += other.delivered;
        self.conflicts += other.conflicts;
        self.dead_letters += other.dead_letters;
        self.throttle_waits += other.throttle_waits;
        for (c, n) in &other.errors {
            *self.errors.entry(c).or_default() += n;
        }
        self.lag.merge(&other.lag);
    }

    /// The counters to add to the job's minute item: only those above zero, named with
    /// `[a-z0-9_]` (the table stores each as its own number, see `KvStore::add`).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out = vec![
            (DELIVERED.to_string(), self.delivered),
            (CONFLICTS.to_string(), self.conflicts),
            (DEAD_LETTERS.to_string(), self.dead_letters),
            (THROTTLE_WAITS.to_string(), self.throttle_waits),
            (LAG_COUNT.to_string(), self.lag.count),
            (LAG_SUM.to_string(), self.lag.sum_ms),
        ];
        out.extend(self.errors.iter().map(|(c, n)| (format!("{ERRORS}{c}"), *n)));
        out.extend(self.lag.buckets.iter().enumerate().map(|(i, n)| (format!("{LAG_BUCKET}{i}"), *n)));
        out.retain(|(_, n)| *n > 0);
        out
    }

    /// A tally from the counters of a minute item (unknown names are ignored: a newer writer's).
    pub fn from_counters(body: &Value) -> Tally {
        let mut t = Tally::default();
        let Some(counters) = body.as_object() else { return t };
        for (name, n) in counters {
            let Some(n) = n.as_u64() else { continue };
            match name.as_str() {
                DELIVERED => t.delivered = n,
                CONFLICTS => t.conflicts = n,
                DEAD_LETTERS => t.dead_letters = n,
                THROTTLE_WAITS => t.throttle_waits = n,
                LAG_COUNT => t.lag.count = n,
                LAG_SUM => t.lag.sum_ms = n,
                other => {
                    if let Some(c) = other.strip_prefix(ERRORS).and_then(ErrorCategory::parse) {
                        t.errors.insert(c.as_str(), n);
                    } else if let Some(i) = other.strip_prefix(LAG_BUCKET).and_then(|i| i.parse::<usize>().ok()) {
                        if let Some(b) = t.lag.buckets.get_mut(i) {
                            *b = n;
                        }
                    }
                }
            }
        }
        t.lag.max_ms = t.lag.max_bound().unwrap_or(0);
        t
    }

    /// The CloudWatch embedded metric format object for this tally of `job` at `at_ms`: one
    /// line per job and batch, each metric both per job and over all jobs. Counts are always present (zero included, so that an alarm on
    /// them sees data), the lag only when something was delivered.
    pub fn emf(&self, job: &str, at_ms: i64, step: &str) -> Value {
        let mut metrics = vec![
            json!({"Name": "Delivered", "Unit": "Count"}),
            json!({"Name": "Conflicts", "Unit": "Count"}),
            json!({"Name": "DeadLetters", "Unit": "Count"}),
            json!({"Name": "ThrottleWaits", "Unit": "Count"}),
            json!({"Name": "Errors", "Unit": "Count"}),
        ];
        let mut line = Map::new();
        line.insert(DIMENSION.into(), json!(job));
        line.insert("Step".into(), json!(step));
        line.insert("Delivered".into(), json!(self.delivered));
        line.insert("Conflicts".into(), json!(self.conflicts));
        line.insert("DeadLetters".into(), json!(self.dead_letters));
        line.insert("ThrottleWaits".into(), json!(self.throttle_waits));
        // `Errors` counts the rows an operator acts on (application and system); concurrency
        // skips are informational and counted apart.
        let acted_on: u64 = [ErrorCategory::Application, ErrorCategory::System]
            .iter()
            .map(|c| self.errors.get(c.as_str()).copied().unwrap_or(0))
            .sum();
        line.insert("Errors".into(), json!(acted_on));
        for c in ErrorCategory::ALL {
            let name = emf_error_metric(c);
            metrics.push(json!({"Name": name, "Unit": "Count"}));
            line.insert(name, json!(self.errors.get(c.as_str()).copied().unwrap_or(0)));
        }
        if !self.lag.sample.is_empty() {
            metrics.push(json!({"Name": "DeliveryLag", "Unit": "Milliseconds"}));
            line.insert("DeliveryLag".into(), json!(self.lag.sample));
        }
        line.insert(
            "_aws".into(),
            json!({
                "Timestamp": at_ms,
                "CloudWatchMetrics": [{
                    "Namespace": NAMESPACE,
                    // Per job, and over all jobs (no dimension: what the stack's alarms watch).
                    "Dimensions": [[DIMENSION], []],
                    "Metrics": metrics,
                }],
            }),
        );
        Value::Object(line)
    }
}

/// The EMF metric of a category's error rows: `ApplicationErrors`, `SystemErrors`, ...
pub fn emf_error_metric(c: ErrorCategory) -> String {
    let s = c.as_str();
    let mut chars = s.chars();
    let first = chars.next().map(|f| f.to_ascii_uppercase().to_string()).unwrap_or_default();
    format!("{first}{}Errors", chars.as_str())
}

/// One minute of a job's metrics, as the admin API serves it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MinuteView {
    pub at_ms: i64,
    pub delivered: u64,
    /// The upper bound of the lag bucket holding the median (see the module's note); `null`
    /// when nothing was delivered.
    pub lag_ms_p50: Option<u64>,
    pub lag_ms_max: Option<u64>,
    pub lag_ms_mean: Option<u64>,
    pub conflicts: u64,
    pub dead_letters: u64,
    pub throttle_waits: u64,
    pub errors: BTreeMap<&'static str, u64>,
}

impl MinuteView {
    pub fn new(at_ms: i64, t: &Tally) -> MinuteView {
        MinuteView {
            at_ms,
            delivered: t.delivered,
            lag_ms_p50: t.lag.quantile_bound(0.5),
            lag_ms_max: t.lag.max_bound(),
            lag_ms_mean: (t.lag.count > 0).then(|| t.lag.sum_ms / t.lag.count),
            conflicts: t.conflicts,
            dead_letters: t.dead_letters,
            throttle_waits: t.throttle_waits,
            errors: t.errors.clone(),
        }
    }
}

/// The sums over a window.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub delivered: u64,
    pub conflicts: u64,
    pub dead_letters: u64,
    pub throttle_waits: u64,
    /// Every category, zero included.
    pub errors: BTreeMap<&'static str, u64>,
    pub lag_ms_p50: Option<u64>,
    pub lag_ms_max: Option<u64>,
}

/// `GET /jobs/{job}/metrics`: a job's metrics since a time, minute by minute (minutes with
/// nothing counted are left out).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricsView {
    pub job: String,
    pub since_ms: i64,
    pub totals: Totals,
    pub minutes: Vec<MinuteView>,
}

impl MetricsView {
    pub fn new(job: &str, since_ms: i64, minutes: &[(i64, Tally)]) -> MetricsView {
        let mut all = Tally::default();
        for (_, t) in minutes {
            all.merge(t);
        }
        let mut errors: BTreeMap<&'static str, u64> = ErrorCategory::ALL.iter().map(|c| (c.as_str(), 0)).collect();
        errors.extend(all.errors.iter().map(|(c, n)| (*c, *n)));
        MetricsView {
            job: job.to_string(),
            since_ms,
            totals: Totals {
                delivered: all.delivered,
                conflicts: all.conflicts,
                dead_letters: all.dead_letters,
                throttle_waits: all.throttle_waits,
                errors,
                lag_ms_p50: all.lag.quantile_bound(0.5),
                lag_ms_max: all.lag.max_bound(),
            },
            minutes: minutes.iter().map(|(at, t)| MinuteView::new(*at, t)).collect(),
        }
    }
}

/// The start of the minute holding `ms`.
pub fn minute_of(ms: i64) -> i64 {
    ms.div_euclid(60_000) * 60_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lags_fall_in_buckets_and_quantiles_report_bucket_bounds() {
        let mut lag = Lag::default();
        for ms in [0, 3, 7, 40, 40, 900, 70_000_000] {
            lag.record(ms);
        }
        assert_eq!(lag.count, 7);
        assert_eq!(lag.max_ms, 70_000_000);
        assert_eq!(lag.buckets[0], 1, "0 ms is in the first bucket");
        assert_eq!(lag.buckets[bucket_of(40)], 2);
        assert_eq!(bucket_of(50), bucket_of(40), "bounds are inclusive");
        assert_eq!(lag.quantile_bound(0.5), Some(50), "the 4th of 7 lags is 40 ms, in the bucket up to 50");
        assert_eq!(lag.max_bound(), Some(100_000_000), "above the last bound");
        assert_eq!(Lag::default().quantile_bound(0.5), None);
    }

    #[test]
    fn the_sample_stays_bounded_and_draws_from_all_values() {
        let mut lag = Lag::default();
        for ms in 0..10_000 {
            lag.record(ms);
        }
        assert_eq!(lag.sample.len(), EMF_VALUES);
        assert!(lag.sample.iter().any(|v| *v >= 5_000), "later values replace earlier ones: {:?}", lag.sample);
    }

    #[test]
    fn counters_round_trip_through_a_minute_item() {
        let mut t = Tally { delivered: 5, conflicts: 1, dead_letters: 2, throttle_waits: 3, ..Tally::default() };
        t.error(ErrorCategory::Application);
        t.error(ErrorCategory::Application);
        t.error(ErrorCategory::System);
        t.lag.record(30);
        t.lag.record(1_500);
        let counters = t.counters();
        assert!(counters
            .iter()
            .all(|(name, n)| *n > 0 && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')));
        let body = Value::Object(counters.into_iter().map(|(k, n)| (k, json!(n))).collect());
        let back = Tally::from_counters(&body);
        assert_eq!((back.delivered, back.conflicts, back.dead_letters, back.throttle_waits), (5, 1, 2, 3));
        assert_eq!(back.errors.get("application"), Some(&2));
        assert_eq!(back.errors.get("system"), Some(&1));
        assert_eq!((back.lag.count, back.lag.sum_ms, back.lag.buckets), (2, 1_530, t.lag.buckets));
        assert_eq!(back.lag.max_ms, 2_000, "the bucket bound: the table keeps no maximum");
    }

    #[test]
    fn an_emf_line_names_its_metrics_and_carries_every_count() {
        let mut t = Tally { delivered: 2, ..Tally::default() };
        t.error(ErrorCategory::Concurrency);
        t.error(ErrorCategory::System);
        t.lag.record(12);
        let line = t.emf("sales", 1_700_000_000_000, "deliver");
        let directive = &line["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Dualsync");
        assert_eq!(directive["Dimensions"], json!([["Job"], []]));
        // Every metric the directive names is a member of the line (EMF's rule).
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(line.get(name).is_some(), "{name} is declared but missing");
        }
        assert_eq!(line["Job"], "sales");
        assert_eq!(line["Delivered"], 2);
        assert_eq!(line["Errors"], 1, "system only: concurrency skips are not errors an operator acts on");
        assert_eq!(line["ConcurrencyErrors"], 1);
        assert_eq!(line["ApplicationErrors"], 0);
        assert_eq!(line["DeliveryLag"], json!([12]));
        assert_eq!(line["_aws"]["Timestamp"], 1_700_000_000_000i64);
    }

    #[test]
    fn a_view_sums_minutes_and_lists_every_category() {
        let a = Tally { delivered: 3, ..Tally::default() };
        let mut b = Tally { delivered: 4, conflicts: 1, ..Tally::default() };
        b.error(ErrorCategory::Application);
        let v = MetricsView::new("sales", 0, &[(60_000, a), (120_000, b)]);
        assert_eq!(v.totals.delivered, 7);
        assert_eq!(v.totals.conflicts, 1);
        assert_eq!(v.totals.errors.len(), ErrorCategory::ALL.len());
        assert_eq!(v.totals.errors["application"], 1);
        assert_eq!(v.minutes.iter().map(|m| m.at_ms).collect::<Vec<_>>(), [60_000, 120_000]);
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["minutes"][1]["errors"]["application"], 1);
        assert_eq!(json["totals"]["dead_letters"], 0);
        assert!(json["minutes"][0]["lag_ms_p50"].is_null(), "present, null: nothing was delivered with a lag");
        assert_eq!(minute_of(125_000), 120_000);
        assert_eq!(minute_of(-1), -60_000);
    }
}
