//! The ingress Lambda function: a function URL request in (AuthType NONE: the app's ingress key
//! authenticates it), references on the capture queue out (see dualsync-ingress).
use std::sync::Arc;

use aws_lambda_events::event::lambda_function_urls::LambdaFunctionUrlRequest;
use dualsync::adapters::aws::{sdk_config, Usage};
use dualsync_lambda::SenderEnv;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    dualsync_lambda::init_tracing();
    let env = match SenderEnv::from_vars(|k| std::env::var(k).ok()) {
        Ok(env) => env,
        Err(e) => return dualsync_lambda::refuse_events(e).await,
    };
    // Built once per cold start. The apps' connectors come from the same registry the other
    // functions use (keys read back by id go through it).
    let sdk = sdk_config(None).await;
    let apps = dualsync_lambda::aws_registry(&sdk);
    let ingress = dualsync_ingress::aws(&sdk, &env, apps, Arc::new(Usage::default()));
    let ingress = &ingress;
    lambda_runtime::run(service_fn(move |event: LambdaEvent<LambdaFunctionUrlRequest>| async move {
        Ok::<_, lambda_runtime::Error>(dualsync_ingress::function_url(ingress, event.payload).await)
    }))
    .await
}
