//! The ingress of pushed change events (`POST /ingress/{job}/{app}/{source}`), the handler of
//! [`dualsync::steps::ingress`] served two ways:
//!
//! - [`router`]: an axum router, which the local runner (`dualsync run`) serves beside the
//!   admin API on its loopback address; these routes are authenticated by each app's ingress
//!   key, not by the admin token;
//! - [`function_url`]: a Lambda function URL request (payload 2.0) in, its response out, for the
//!   ingress function on AWS. Its function URL has AuthType NONE: Dataverse and fno cannot sign
//!   requests with SigV4, so the app's key is the authentication.
mod function_url;
mod local;

use std::sync::Arc;

use dualsync::adapters::aws::Usage;
use dualsync::steps::ingress::Ingress;
use dualsync::steps::ConnectorRegistry;
use dualsync_lambda::SenderEnv;

pub use aws_lambda_events::event::lambda_function_urls::{LambdaFunctionUrlRequest, LambdaFunctionUrlResponse};
pub use function_url::{function_url, request_of, MAX_BODY_BYTES};
pub use local::router;

/// Where the path of every ingress route starts.
pub const PREFIX: &str = "/ingress";

/// The ingress over the DynamoDB state table and the SQS capture queue `env` names; `apps`
/// opens the apps' connectors for keys read back by id.
pub fn aws(
    sdk: &aws_config::SdkConfig,
    env: &SenderEnv,
    apps: Arc<dyn ConnectorRegistry>,
    usage: Arc<Usage>,
) -> Ingress {
    let (state, capture) = env.open(sdk, usage);
    Ingress::new(state, apps, Arc::new(capture))
}
