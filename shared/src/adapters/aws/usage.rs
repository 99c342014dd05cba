//! What the AWS adapters spend, counted as AWS bills it, for the cost benchmark.
use std::sync::atomic::{AtomicU64, Ordering};

/// Counters raised by every call of the DynamoDB and SQS adapters. Capacity units are kept in
/// thousandths so that they add up exactly.
#[derive(Debug, Default)]
pub struct Usage {
    dynamo_requests: AtomicU64,
    read_milli_units: AtomicU64,
    write_milli_units: AtomicU64,
    sqs_standard_requests: AtomicU64,
    sqs_fifo_requests: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageSnapshot {
    pub dynamo_requests: u64,
    pub dynamo_read_units: f64,
    pub dynamo_write_units: f64,
    /// Billed requests: each 64 KiB of payload of a call is one.
    pub sqs_standard_requests: u64,
    pub sqs_fifo_requests: u64,
}

impl Usage {
    pub fn snapshot(&self) -> UsageSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        UsageSnapshot {
            dynamo_requests: get(&self.dynamo_requests),
            dynamo_read_units: get(&self.read_milli_units) as f64 / 1000.0,
            dynamo_write_units: get(&self.write_milli_units) as f64 / 1000.0,
            sqs_standard_requests: get(&self.sqs_standard_requests),
            sqs_fifo_requests: get(&self.sqs_fifo_requests),
        }
    }

    pub fn reset(&self) {
        for c in [
            &self.dynamo_requests,
            &self.read_milli_units,
            &self.write_milli_units,
            &self.sqs_standard_requests,
            &self.sqs_fifo_requests,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn dynamo_request(&self) {
        self.dynamo_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read_units(&self, units: u64) {
        self.read_milli_units.fetch_add(units * 1000, Ordering::Relaxed);
    }

    pub(crate) fn write_units(&self, units: u64) {
        self.write_milli_units.fetch_add(units * 1000, Ordering::Relaxed);
    }

    /// One SQS call carrying `payload` bytes.
    pub(crate) fn sqs_call(&self, fifo: bool, payload: usize) {
        let billed = sqs_billed_requests(payload);
        let c = if fifo { &self.sqs_fifo_requests } else { &self.sqs_standard_requests };
        c.fetch_add(billed, Ordering::Relaxed);
    }
}

/// SQS bills every 64 KiB chunk of a request's payload as one request.
pub fn sqs_billed_requests(payload: usize) -> u64 {
    (payload.div_ceil(64 * 1024) as u64).max(1)
}

/// Write units of one item: a unit per KiB, at least one (a failed conditional write costs too).
pub fn write_units(item_bytes: usize) -> u64 {
    (item_bytes.div_ceil(1024) as u64).max(1)
}

/// Strongly consistent read units: a unit per 4 KiB read, at least one.
pub fn read_units(bytes: usize) -> u64 {
    (bytes.div_ceil(4096) as u64).max(1)
}

/// The size DynamoDB bills for an item of ours: attribute names plus values (strings in UTF-8
/// bytes, numbers about one byte per two digits plus one).
pub fn item_bytes(pk: &str, sk: &str, body: &str, expires: bool) -> usize {
    let number = |digits: usize| digits / 2 + 1;
    let mut n = "pk".len() + pk.len() + "sk".len() + sk.len() + "rev".len() + number(6) + "body".len() + body.len();
    if expires {
        n += "expires_at".len() + number(10) + "exp_ms".len() + number(13);
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_round_up_as_aws_bills_them() {
        assert_eq!(write_units(1), 1);
        assert_eq!(write_units(1024), 1);
        assert_eq!(write_units(1025), 2);
        assert_eq!(write_units(3 * 1024), 3);
        assert_eq!(read_units(0), 1);
        assert_eq!(read_units(4097), 2);
        assert_eq!(sqs_billed_requests(0), 1);
        assert_eq!(sqs_billed_requests(64 * 1024 + 1), 2);
    }

    #[test]
    fn counters_add_up_and_reset() {
        let u = Usage::default();
        u.write_units(3);
        u.read_units(1);
        u.sqs_call(true, 100);
        u.sqs_call(false, 70 * 1024);
        let s = u.snapshot();
        assert_eq!((s.dynamo_write_units, s.dynamo_read_units), (3.0, 1.0));
        assert_eq!((s.sqs_fifo_requests, s.sqs_standard_requests), (1, 2));
        u.reset();
        assert_eq!(u.snapshot(), UsageSnapshot::default());
    }
}
