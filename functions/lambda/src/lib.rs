//! What the four Lambda functions share: the setup done once per cold start ([`Handler::from_env`])
//! and the glue between an SQS event and a step of the shared crate ([`Handler::handle`]).
//! Each function's `main.rs` only names its step.
mod batch;
mod env;
pub mod permissions;
pub mod poller;
#[cfg(feature = "stack")]
pub mod stack;
pub mod tracker;

use std::sync::Arc;

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use dualsync::adapters::aws::{sdk_config, AwsRegistry, AwsSecrets, DynamoKv, SqsQueue, Usage};
use dualsync::ports::{Queue, SystemClock};
use dualsync::state::State;
use dualsync::steps::{ConnectorRegistry, Outcome, StepKind, Steps};
use lambda_runtime::{service_fn, Error, LambdaEvent};
use tracing::Instrument;

pub use batch::{batch_response, correlation_id, in_messages};
pub use env::{input_var, Env, EnvError, SenderEnv};

/// Runs the Lambda runtime loop for one step.
pub async fn run(step: StepKind) -> Result<(), Error> {
    init_tracing();
    let handler = match Handler::from_env(step).await {
        Ok(h) => h,
        Err(e) => return refuse_events(e).await,
    };
    let handler = &handler;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        handler.handle(&event.context.request_id, event.payload).await
    }))
    .await
}

/// What a function does when its setup fails (a variable unset): logs why, then answers every
/// event with that error, readable, instead of exiting. A process that exits reports nothing to
/// the runtime API, so `cargo lambda invoke` waited for an answer for ever; on AWS the error
/// is then the invocation's, in its log and its caller's answer, each time.
pub async fn refuse_events(why: impl std::fmt::Display) -> Result<(), Error> {
    let why = why.to_string();
    tracing::error!(error = %why, "cannot start: every event is answered with this error");
    let why = &why;
    // The runtime logs each invocation's error with its request id.
    lambda_runtime::run(service_fn(move |_: LambdaEvent<serde_json::Value>| async move {
        Err::<(), _>(lambda_runtime::Diagnostic {
            error_type: "CannotStart".into(),
            error_message: format!("cannot start: {why}"),
        })
    }))
    .await
}

/// JSON logs, level from `RUST_LOG` (the template sets it from its `LogLevel` parameter), one
/// `message` per line, and the fields of the innermost span (an invocation's request id and
/// correlation id, see [`Handler::handle`]) on each line.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_current_span(true)
        .with_span_list(false)
        .with_target(false)
        .init();
}

/// The apps as a deployed function opens them: odata apps with secrets from Secrets Manager or
/// SSM over `sdk`'s settings; a sqlite app is refused (it runs only locally).
pub fn aws_registry(sdk: &aws_config::SdkConfig) -> Arc<dyn ConnectorRegistry> {
    Arc::new(AwsRegistry::new(Arc::new(AwsSecrets::new(sdk))))
}

/// One step with its clients, built once per cold start and reused by every event.
pub struct Handler {
    step: StepKind,
    steps: Arc<Steps>,
    /// The queue the event came from: failed messages get their visibility changed on it.
    input: Arc<dyn Queue>,
}

impl Handler {
    /// Builds the AWS clients and the step from the environment (see [`Env`]). The apps are
    /// opened as on AWS ([`AwsRegistry`]): odata apps, their stored secrets read through one
    /// cache for the life of the execution environment.
    pub async fn from_env(step: StepKind) -> Result<Self, Error> {
        let env = Env::from_vars(step, |k| std::env::var(k).ok())?;
        let sdk = sdk_config(None).await;
        let handler = Self::new(step, &env, &sdk, aws_registry(&sdk), Arc::new(Usage::default()));
        // A deployed function prints its metrics for CloudWatch (embedded metric format).
        handler.steps.metrics.emf.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(handler)
    }

    /// A handler over given AWS settings and apps (tests point these at an emulator).
    /// `usage` counts the AWS requests and capacity units its clients spend.
    pub fn new(
        step: StepKind,
        env: &Env,
        sdk: &aws_config::SdkConfig,
        apps: Arc<dyn ConnectorRegistry>,
        usage: Arc<Usage>,
    ) -> Self {
        let dynamo = aws_sdk_dynamodb::Client::new(sdk);
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let queue = |url: &str| -> Arc<dyn Queue> {
            Arc::new(SqsQueue::new(
                sqs.clone(),
                dualsync::adapters::aws::queue_name(url),
                url.to_string(),
                env.max_receive_count,
                usage.clone(),
            ))
        };
        let kv = DynamoKv::new(dynamo, env.table.clone(), Arc::new(SystemClock), usage.clone());
        let state = State::new(Arc::new(kv), Arc::new(SystemClock));
        let steps = Steps::new(state, apps, queue(&env.sequence_queue_url), queue(&env.deliver_queue_url));
        Handler { step, steps: Arc::new(steps), input: queue(&env.input_queue_url) }
    }

    /// Counts into `metrics` (shared by the functions of one [`stack::Stack`]).
    /// (Made while the handler is built, before its steps are shared.)
    pub fn with_metrics(mut self, metrics: Arc<dualsync::steps::Metrics>) -> Self {
        if let Some(steps) = Arc::get_mut(&mut self.steps) {
            steps.metrics = metrics;
        }
        self
    }

    /// (Made while the handler is built, before its steps are shared.)
    pub fn set_backoff(&mut self, backoff: dualsync::steps::Backoff) {
        if let Some(steps) = Arc::get_mut(&mut self.steps) {
            steps.backoff = backoff;
        }
    }

    /// The queue this function's events come from.
    pub fn input(&self) -> &dyn Queue {
        self.input.as_ref()
    }

    pub fn steps(&self) -> &Arc<Steps> {
        &self.steps
    }

    /// Handles one SQS event: runs the step and reports the messages that failed, after
    /// setting their visibility (the retry backoff; zero for poison, so it reaches the
    /// dead-letter queue without waiting out the timeout each time).
    ///
    /// Every line logged meanwhile carries the invocation's `request_id` and the batch's
    /// `correlation_id` (one span holds both: the JSON logs show the innermost span's fields),
    /// and the batch ends with one line saying what became of its messages.
    pub async fn handle(&self, request_id: &str, event: SqsEvent) -> Result<SqsBatchResponse, Error> {
        let (msgs, unreadable) = in_messages(event.records);
        let span = tracing::info_span!(
            "invocation",
            request_id,
            step = self.step.name(),
            messages = msgs.len(),
            correlation_id = %correlation_id(&msgs)
        );
        async {
            let outcomes = self.steps.handle(self.step, self.input.as_ref(), &msgs).await?;
            let count = |f: fn(&Outcome) -> bool| outcomes.iter().filter(|o| f(o)).count();
            tracing::info!(
                done = count(|o| *o == Outcome::Done),
                retried = count(|o| matches!(o, Outcome::Retry { .. })),
                poison = count(|o| matches!(o, Outcome::Poison { .. })),
                "batch handled"
            );
            let (response, releases) = batch_response(&msgs, &outcomes, unreadable);
            for (receipt, delay) in releases {
                if let Err(e) = self.input.release(&receipt, delay).await {
                    // The message still fails and comes back after the visibility timeout.
                    tracing::warn!(error = %e, "could not change a failed message's visibility");
                }
            }
            Ok(response)
        }
        .instrument(span)
        .await
    }
}
