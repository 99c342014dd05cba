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
    #[error(
        "environment variable {0} is not set (template.yaml sets it for every function; on this machine \
         pass it with --env-var, or every variable at once with --env-file infra/emulator.env)"
    )]
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

    /// `infra/emulator.env` gives every function what it reads, for the stage `dualsync aws
    /// bootstrap --stage dev` makes, at the emulator its AWS_ENDPOINT_URL names.
    #[test]
    fn the_emulator_env_file_serves_every_function_of_stage_dev() {
        let text = include_str!("../../../infra/emulator.env");
        let pairs: Vec<(&str, &str)> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| l.split_once('=').unwrap_or_else(|| panic!("not KEY=VALUE: {l}")))
            .collect();
        let var = vars(&pairs);
        let endpoint = var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL");
        let names = dualsync::adapters::aws::Names::new("dev");
        for step in [StepKind::Capture, StepKind::Sequence, StepKind::Deliver, StepKind::Reconcile] {
            let env = Env::from_vars(step, &var).unwrap_or_else(|e| panic!("{step:?}: {e}"));
            assert_eq!(env.table, names.table());
            for url in [&env.sequence_queue_url, &env.deliver_queue_url, &env.input_queue_url] {
                assert!(url.starts_with(&endpoint), "{url} is not on {endpoint}");
            }
            assert_eq!(queue_name(&env.sequence_queue_url), names.sequence_queue());
            assert_eq!(queue_name(&env.deliver_queue_url), names.deliver_queue());
        }
        let sender = SenderEnv::from_vars(&var).unwrap();
        assert_eq!(queue_name(&sender.capture_queue_url), names.capture_queue());
        assert_eq!(queue_name(&var("RECONCILE_QUEUE_URL").unwrap()), names.reconcile_queue());
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"] {
            assert!(var(k).is_some(), "{k}: the SDK needs it even for an emulator");
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
