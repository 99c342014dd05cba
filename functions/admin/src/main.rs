//! The admin Lambda function: the admin API ([`dualsync_admin::router`]) behind a function URL.
//! Function URL events are API Gateway v2 payloads, which `lambda_http` turns into HTTP requests.
//! No bearer token here: the function URL's AWS_IAM auth (SigV4) decides who may call.
use std::sync::Arc;

use dualsync::adapters::aws::{sdk_config, DynamoKv, SqsQueue, Usage, MAX_RECEIVE_COUNT};
use dualsync::admin::Admin;
use dualsync::ports::{Queue, SystemClock};
use dualsync::state::State;

/// The function's configuration, from the environment variables template.yaml sets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Env {
    /// The DynamoDB state table.
    table: String,
    /// Where a resume hands kept deliveries back to.
    deliver_queue_url: String,
    /// Where retry and dismiss requests are queued.
    reconcile_queue_url: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("environment variable {0} is not set (template.yaml sets it for the admin function)")]
struct MissingVar(&'static str);

impl Env {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, MissingVar> {
        let need = |name: &'static str| var(name).filter(|v| !v.is_empty()).ok_or(MissingVar(name));
        Ok(Env {
            table: need("DUALSYNC_TABLE")?,
            deliver_queue_url: need("DELIVER_QUEUE_URL")?,
            reconcile_queue_url: need("RECONCILE_QUEUE_URL")?,
        })
    }
}

/// A queue's name is the last segment of its URL (`https://sqs.../123456789012/name`).
fn queue_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}

/// The clients, built once per cold start and shared by every request.
async fn admin(env: &Env) -> Admin {
    let sdk = &sdk_config(None).await;
    let usage = Arc::new(Usage::default());
    let clock = Arc::new(SystemClock);
    let kv = DynamoKv::new(aws_sdk_dynamodb::Client::new(sdk), env.table.clone(), clock.clone(), usage.clone());
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let queue = |url: &str| -> Arc<dyn Queue> {
        Arc::new(SqsQueue::new(sqs.clone(), queue_name(url), url.to_string(), MAX_RECEIVE_COUNT, usage.clone()))
    };
    Admin::new(State::new(Arc::new(kv), clock), queue(&env.deliver_queue_url), queue(&env.reconcile_queue_url))
}

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    dualsync_lambda::init_tracing();
    let env = Env::from_vars(|k| std::env::var(k).ok()).inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    let router = dualsync_admin::router(Arc::new(admin(&env).await));
    lambda_http::run(router).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const ALL: [(&str, &str); 3] = [
        ("DUALSYNC_TABLE", "dualsync-dev-state"),
        ("DELIVER_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-deliver.fifo"),
        ("RECONCILE_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-reconcile.fifo"),
    ];

    #[test]
    fn reads_the_table_and_both_queues() {
        let env = Env::from_vars(vars(&ALL)).unwrap();
        assert_eq!(env.table, "dualsync-dev-state");
        assert_eq!(queue_name(&env.deliver_queue_url), "dualsync-dev-deliver.fifo");
        assert_eq!(queue_name(&env.reconcile_queue_url), "dualsync-dev-reconcile.fifo");
    }

    #[test]
    fn names_a_missing_or_empty_variable() {
        for (i, (name, _)) in ALL.iter().enumerate() {
            let mut pairs = ALL.to_vec();
            pairs.remove(i);
            assert_eq!(Env::from_vars(vars(&pairs)), Err(MissingVar(name)));
            pairs.insert(i, (name, ""));
            let err = Env::from_vars(vars(&pairs)).unwrap_err();
            assert_eq!(err, MissingVar(name));
            assert!(err.to_string().starts_with(&format!("environment variable {name} is not set")), "{err}");
        }
    }
}
