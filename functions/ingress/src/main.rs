//! The ingress Lambda function: a function URL request in (AuthType NONE: the app's ingress key
//! authenticates it), references on the capture queue out (see dualsync-ingress).
use std::sync::Arc;

use aws_lambda_events::event::lambda_function_urls::LambdaFunctionUrlRequest;
use dualsync::adapters::aws::{sdk_config, Usage};
use dualsync_lambda::EnvError;
use lambda_runtime::{service_fn, LambdaEvent};

/// The function's configuration, from the environment variables template.yaml sets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Env {
    table: String,
    capture_queue_url: String,
}

impl Env {
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Env, EnvError> {
        let need = |name: &'static str| var(name).filter(|v| !v.is_empty()).ok_or(EnvError::Missing(name));
        Ok(Env { table: need("DUALSYNC_TABLE")?, capture_queue_url: need("CAPTURE_QUEUE_URL")? })
    }
}

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    dualsync_lambda::init_tracing();
    let env = Env::from_vars(|k| std::env::var(k).ok()).inspect_err(|e| tracing::error!(error = %e, "cannot start"))?;
    // Built once per cold start. The apps' connectors come from the same registry the other
    // functions use (keys read back by id go through it).
    let sdk = sdk_config(None).await;
    let apps = dualsync_lambda::aws_registry(&sdk);
    let ingress = dualsync_ingress::aws(&sdk, &env.table, &env.capture_queue_url, apps, Arc::new(Usage::default()));
    let ingress = &ingress;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<LambdaFunctionUrlRequest>| async move {
        Ok::<_, lambda_runtime::Error>(dualsync_ingress::function_url(ingress, event.payload).await)
    }))
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_table_and_the_capture_queue_and_names_what_is_missing() {
        let all = |k: &str| match k {
            "DUALSYNC_TABLE" => Some("dualsync-dev-state".to_string()),
            "CAPTURE_QUEUE_URL" => Some("https://sqs.eu-west-1.amazonaws.com/1/dualsync-dev-capture".to_string()),
            _ => None,
        };
        let env = Env::from_vars(all).unwrap();
        assert_eq!(env.table, "dualsync-dev-state");
        for missing in ["DUALSYNC_TABLE", "CAPTURE_QUEUE_URL"] {
            let without = |k: &str| if k == missing { Some(String::new()) } else { all(k) };
            assert_eq!(Env::from_vars(without), Err(EnvError::Missing(missing)));
        }
    }
}
