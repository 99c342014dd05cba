//! The admin Lambda function: the admin API ([`dualsync_admin::router`]) behind a function URL.
//! Function URL events are API Gateway v2 payloads, which `lambda_http` turns into HTTP requests.
//! No bearer token here: the function URL's AWS_IAM auth (SigV4) decides who may call.
use std::sync::Arc;

use dualsync::adapters::aws::{sdk_config, Usage};
use dualsync_lambda::EnvError;

/// The function's configuration, from the environment variables template.yaml sets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Env {
    /// The DynamoDB state table.
    table: String,
    /// The work queues in pipeline order: capture, sequence, deliver (where a resume hands kept
    /// deliveries back to), reconcile (where retry and dismiss requests are queued). Dead letters
    /// are redriven to each from the dead-letter queue named after it.
    queue_urls: [String; 4],
}

impl Env {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, EnvError> {
        let need = |name: &'static str| var(name).filter(|v| !v.is_empty()).ok_or(EnvError::Missing(name));
        Ok(Env {
            table: need("DUALSYNC_TABLE")?,
            queue_urls: [
                need("CAPTURE_QUEUE_URL")?,
                need("SEQUENCE_QUEUE_URL")?,
                need("DELIVER_QUEUE_URL")?,
                need("RECONCILE_QUEUE_URL")?,
            ],
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    dualsync_lambda::init_tracing();
    let env = match Env::from_vars(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => return dualsync_lambda::refuse_events(e).await,
    };
    // The clients, built once per cold start and shared by every request.
    let sdk = sdk_config(None).await;
    let admin = dualsync::adapters::aws::admin(&sdk, &env.table, &env.queue_urls, Arc::new(Usage::default()));
    let router = dualsync_admin::router(Arc::new(admin));
    lambda_http::run(router).await
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

    const ALL: [(&str, &str); 5] = [
        ("DUALSYNC_TABLE", "dualsync-dev-state"),
        ("CAPTURE_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-capture"),
        ("SEQUENCE_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-sequence"),
        ("DELIVER_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-deliver.fifo"),
        ("RECONCILE_QUEUE_URL", "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-reconcile.fifo"),
    ];

    #[test]
    fn reads_the_table_and_the_queues() {
        let env = Env::from_vars(vars(&ALL)).unwrap();
        assert_eq!(env.table, "dualsync-dev-state");
        assert_eq!(
            env.queue_urls.map(|u| queue_name(&u)),
            ["capture", "sequence", "deliver.fifo", "reconcile.fifo"].map(|q| format!("dualsync-dev-{q}"))
        );
    }

    #[test]
    fn names_a_missing_or_empty_variable() {
        for (i, (name, _)) in ALL.iter().enumerate() {
            let mut pairs = ALL.to_vec();
            pairs.remove(i);
            assert_eq!(Env::from_vars(vars(&pairs)), Err(EnvError::Missing(name)));
            pairs.insert(i, (name, ""));
            let err = Env::from_vars(vars(&pairs)).unwrap_err();
            assert_eq!(err, EnvError::Missing(name));
            assert!(err.to_string().starts_with(&format!("environment variable {name} is not set")), "{err}");
        }
    }
}
