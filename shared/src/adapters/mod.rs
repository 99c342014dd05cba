//! Adapters: embedded storage, AWS (DynamoDB and SQS) and app connectors.
pub mod aws;
pub mod connectors;
#[cfg(feature = "sqlite")]
pub mod embedded;
