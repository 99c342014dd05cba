//! The tracker Lambda function: on each scheduled event, the tracked changes of every
//! capturing job's apps go to the capture queue (see dualsync-lambda's `tracker`).
use std::sync::Arc;

use dualsync::adapters::aws::{sdk_config, Usage};
use dualsync_lambda::tracker::Tracker;
use dualsync_lambda::SenderEnv;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    dualsync_lambda::init_tracing();
    let env = match SenderEnv::from_vars(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => return dualsync_lambda::refuse_events(e).await,
    };
    let sdk = sdk_config(None).await;
    let tracker = Tracker::new(&sdk, &env, dualsync_lambda::aws_registry(&sdk), Arc::new(Usage::default()));
    let tracker = &tracker;
    // The event is the schedule's; what to poll comes from the jobs in the state table.
    lambda_runtime::run(service_fn(move |_: LambdaEvent<serde_json::Value>| async move {
        let polled = tracker.poll().await?;
        Ok::<_, lambda_runtime::Error>(serde_json::json!({ "sent": polled.sent, "failed": polled.failed }))
    }))
    .await
}
