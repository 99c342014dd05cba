//! The functions' configuration, from environment variables the SAM template sets.
use dualsync::steps::StepKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// The DynamoDB state table.
    pub table: String,
    pub sequence_queue_url: String,
    pub deliver_queue_url: String,
    /// The queue this function's events come from.
    pub input_queue_url: String,
    /// The redrive policy's maxReceiveCount of the input queue: on that receive a failing
    /// message gets its dead-letter row.
    pub max_receive_count: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("environment variable {0} is not set (template.yaml sets it for every function)")]
    Missing(&'static str),
    #[error("environment variable {name} is '{value}': {expected}")]
    Invalid { name: &'static str, value: String, expected: &'static str },
}

pub fn input_var(step: StepKind) -> &'static str {
    match step {
        StepKind::Capture => "CAPTURE_QUEUE_URL",
        StepKind::Sequence => "SEQUENCE_QUEUE_URL",
        StepKind::Deliver => "DELIVER_QUEUE_URL",
        StepKind::Reconcile => "RECONCILE_QUEUE_URL",
    }
}

impl Env {
    /// Reads the variables through `var` (the process environment, or a map in tests).
    pub fn from_vars(step: StepKind, var: impl Fn(&str) -> Option<String>) -> Result<Env, EnvError> {
        let need = |name: &'static str| var(name).filter(|v| !v.is_empty()).ok_or(EnvError::Missing(name));
        let max_receive_count = match var("MAX_RECEIVE_COUNT") {
            None => 5,
            Some(v) => v.parse().ok().filter(|n| *n > 0).ok_or(EnvError::Invalid {
                name: "MAX_RECEIVE_COUNT",
                value: v,
                expected: "a positive whole number",
            })?,
        };
        Ok(Env {
            table: need("DUALSYNC_TABLE")?,
            sequence_queue_url: need("SEQUENCE_QUEUE_URL")?,
            deliver_queue_url: need("DELIVER_QUEUE_URL")?,
            input_queue_url: need(input_var(step))?,
            max_receive_count,
        })
    }
}

/// The configuration of a function that only sends to the capture queue (ingress, tracker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderEnv {
    pub table: String,
    pub capture_queue_url: String,
}

impl SenderEnv {
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<SenderEnv, EnvError> {
        let need = |name: &'static str| var(name).filter(|v| !v.is_empty()).ok_or(EnvError::Missing(name));
        Ok(SenderEnv { table: need("DUALSYNC_TABLE")?, capture_queue_url: need("CAPTURE_QUEUE_URL")? })
    }
}

impl SenderEnv {
    /// The state table and the capture queue these functions work with; `usage` counts what
    /// their clients spend.
    pub fn open(
        &self,
        sdk: &aws_config::SdkConfig,
        usage: std::sync::Arc<dualsync::adapters::aws::Usage>,
    ) -> (dualsync::state::State, dualsync::adapters::aws::SqsQueue) {
        use dualsync::adapters::aws::{queue_name, DynamoKv, SqsQueue, MAX_RECEIVE_COUNT};
        use std::sync::Arc;
        let clock = Arc::new(dualsync::ports::SystemClock);
        let kv = DynamoKv::new(aws_sdk_dynamodb::Client::new(sdk), self.table.clone(), clock.clone(), usage.clone());
        let url = &self.capture_queue_url;
        let capture =
            SqsQueue::new(aws_sdk_sqs::Client::new(sdk), queue_name(url), url.clone(), MAX_RECEIVE_COUNT, usage);
        (dualsync::state::State::new(Arc::new(kv), clock), capture)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dualsync::adapters::aws::queue_name;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const BASE: [(&str, &str); 3] = [
        ("DUALSYNC_TABLE", "dualsync-dev-state"),
        ("SEQUENCE_QUEUE_URL", "http://q/1/dualsync-dev-sequence"),
        ("DELIVER_QUEUE_URL", "http://q/1/dualsync-dev-deliver.fifo"),
    ];

    #[test]
    fn reads_the_input_queue_of_the_step() {
        let mut pairs = BASE.to_vec();
        pairs.push(("CAPTURE_QUEUE_URL", "http://q/1/dualsync-dev-capture"));
        let env = Env::from_vars(StepKind::Capture, vars(&pairs)).unwrap();
        assert_eq!(env.input_queue_url, "http://q/1/dualsync-dev-capture");
        assert_eq!(env.max_receive_count, 5);
        assert_eq!(queue_name(&env.deliver_queue_url), "dualsync-dev-deliver.fifo");
        let deliver = Env::from_vars(StepKind::Deliver, vars(&BASE)).unwrap();
        assert_eq!(deliver.input_queue_url, deliver.deliver_queue_url);
    }

    #[test]
    fn a_sender_reads_the_table_and_the_capture_queue_and_names_what_is_missing() {
        let all = [("DUALSYNC_TABLE", "dualsync-dev-state"), ("CAPTURE_QUEUE_URL", "http://q/1/dualsync-dev-capture")];
        let env = SenderEnv::from_vars(vars(&all)).unwrap();
        assert_eq!(
            (env.table.as_str(), queue_name(&env.capture_queue_url).as_str()),
            ("dualsync-dev-state", "dualsync-dev-capture")
        );
        for (i, (missing, _)) in all.iter().enumerate() {
            let mut pairs = all.to_vec();
            pairs[i].1 = "";
            assert_eq!(SenderEnv::from_vars(vars(&pairs)), Err(EnvError::Missing(missing)));
        }
    }

    #[test]
    fn names_what_is_missing_or_wrong() {
        assert_eq!(Env::from_vars(StepKind::Reconcile, vars(&BASE)), Err(EnvError::Missing("RECONCILE_QUEUE_URL")));
        assert_eq!(Env::from_vars(StepKind::Deliver, vars(&BASE[1..])), Err(EnvError::Missing("DUALSYNC_TABLE")));
        let mut pairs = BASE.to_vec();
        pairs.push(("MAX_RECEIVE_COUNT", "0"));
        let err = Env::from_vars(StepKind::Deliver, vars(&pairs)).unwrap_err();
        assert_eq!(err.to_string(), "environment variable MAX_RECEIVE_COUNT is '0': a positive whole number");
    }
}
