//! The AWS backend: the key-value table on DynamoDB ([`DynamoKv`]), the queues on SQS
//! ([`SqsQueue`]), the names of one stage's resources (shared with `template.yaml`), and
//! [`bootstrap`], which creates them on an emulator or an account; the apps' connectors as the
//! functions open them ([`AwsRegistry`]) and the secrets they read ([`AwsSecrets`]).
mod dynamo;
mod registry;
mod sdk_error;
mod secrets;
mod sqs;
mod usage;

use std::collections::HashMap;
use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
    TimeToLiveSpecification,
};
use aws_sdk_sqs::types::QueueAttributeName;

pub use dynamo::DynamoKv;
pub use registry::AwsRegistry;
pub use sdk_error::brief;
pub use secrets::AwsSecrets;
pub use sqs::SqsQueue;
pub use usage::{Usage, UsageSnapshot};

/// Receives before SQS moves a message to its dead-letter queue (template.yaml's redrive policy).
pub const MAX_RECEIVE_COUNT: u32 = 5;
/// At least six times the functions' timeout (30 s), as AWS advises for SQS event sources.
pub const VISIBILITY_TIMEOUT_SECS: u32 = 180;

/// A queue's name is the last segment of its URL (`https://sqs.../123456789012/name`).
pub fn queue_name(url: &str) -> String {
    url.rsplit('/').next().unwrap_or(url).to_string()
}

/// The operators' service over a state table and the four work queues (by URL, in pipeline
/// order: capture, sequence, deliver, reconcile), each with the dead-letter queue named after it:
/// what the CLI on AWS and the admin function both use.
pub fn admin(
    sdk: &SdkConfig,
    table: &str,
    queue_urls: &[String; 4],
    usage: std::sync::Arc<Usage>,
) -> crate::admin::Admin {
    use std::sync::Arc;
    let clock = Arc::new(crate::ports::SystemClock);
    let kv = DynamoKv::new(aws_sdk_dynamodb::Client::new(sdk), table.to_string(), clock.clone(), usage.clone());
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let queue = |url: &str, max_receive_count: u32| {
        Arc::new(SqsQueue::new(sqs.clone(), queue_name(url), url.to_string(), max_receive_count, usage.clone()))
    };
    // A dead-letter queue has no redrive policy of its own.
    let dead_letter_queues = crate::steps::StepKind::ALL
        .into_iter()
        .zip(queue_urls)
        .map(|(step, url)| crate::admin::DeadLetterQueue {
            step,
            work: queue(url, MAX_RECEIVE_COUNT),
            dead: queue(&dead_letter_url(url), 0),
        })
        .collect();
    let [_, _, deliver, reconcile] = queue_urls;
    crate::admin::Admin::new(
        crate::state::State::new(Arc::new(kv), clock),
        queue(deliver, MAX_RECEIVE_COUNT),
        queue(reconcile, MAX_RECEIVE_COUNT),
    )
    .with_dead_letter_queues(dead_letter_queues)
}

/// `...-capture-dlq`, `...-deliver-dlq.fifo`: a FIFO queue's dead-letter queue is FIFO too.
pub fn dead_letter_queue_name(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// The URL of a work queue's dead-letter queue: in the same account and region, named after it.
pub fn dead_letter_url(queue_url: &str) -> String {
    let name = queue_name(queue_url);
    format!("{}{}", &queue_url[..queue_url.len() - name.len()], dead_letter_queue_name(&name))
}

/// The SDK configuration from the environment; `endpoint_url` points it at an emulator.
pub async fn sdk_config(endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{resource} of stage '{stage}' was not found ({reason}): create it with `dualsync aws bootstrap --stage {stage}` or `sam deploy`")]
    Missing { stage: String, resource: String, reason: String },
    #[error("{op} {resource}: {reason}")]
    Call { op: &'static str, resource: String, reason: String },
}

/// The names of one stage's resources: `dualsync-STAGE-...`, as in template.yaml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    stage: String,
}

impl Names {
    pub fn new(stage: &str) -> Names {
        Names { stage: stage.to_string() }
    }
    pub fn stage(&self) -> &str {
        &self.stage
    }
    fn name(&self, what: &str) -> String {
        format!("dualsync-{}-{what}", self.stage)
    }
    pub fn table(&self) -> String {
        self.name("state")
    }
    pub fn capture_queue(&self) -> String {
        self.name("capture")
    }
    pub fn sequence_queue(&self) -> String {
        self.name("sequence")
    }
    pub fn deliver_queue(&self) -> String {
        self.name("deliver.fifo")
    }
    pub fn reconcile_queue(&self) -> String {
        self.name("reconcile.fifo")
    }
    /// `...-capture-dlq`, `...-deliver-dlq.fifo`: a FIFO queue's dead-letter queue is FIFO too.
    pub fn dead_letter_queue(&self, queue: &str) -> String {
        dead_letter_queue_name(queue)
    }
    /// The four work queues in pipeline order.
    pub fn queues(&self) -> [String; 4] {
        [self.capture_queue(), self.sequence_queue(), self.deliver_queue(), self.reconcile_queue()]
    }
}

/// One stage's table and queue URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub names: Names,
    pub table: String,
    pub capture_url: String,
    pub sequence_url: String,
    pub deliver_url: String,
    pub reconcile_url: String,
    /// Capture, sequence, deliver, reconcile.
    pub dead_letter_urls: [String; 4],
}

fn call_error(op: &'static str, resource: &str, e: impl std::error::Error + 'static) -> AwsError {
    AwsError::Call { op, resource: resource.to_string(), reason: sdk_error::causes(&e) }
}

impl Resources {
    /// Finds an existing stage's resources.
    pub async fn lookup(sdk: &SdkConfig, names: &Names) -> Result<Resources, AwsError> {
        let missing =
            |resource: String, reason: String| AwsError::Missing { stage: names.stage.clone(), resource, reason };
        let dynamo = aws_sdk_dynamodb::Client::new(sdk);
        dynamo
            .describe_table()
            .table_name(names.table())
            .send()
            .await
            .map_err(|e| missing(format!("table {}", names.table()), brief(&e)))?;
        let sqs = aws_sdk_sqs::Client::new(sdk);
        let mut urls = Vec::new();
        for q in names.queues().iter().flat_map(|q| [q.clone(), names.dead_letter_queue(q)]) {
            let out = sqs
                .get_queue_url()
                .queue_name(&q)
                .send()
                .await
                .map_err(|e| missing(format!("queue {q}"), brief(&e)))?;
            urls.push(out.queue_url().unwrap_or_default().to_string());
        }
        Ok(Self::from_urls(names, urls))
    }

    /// `urls`: each work queue followed by its dead-letter queue, in pipeline order.
    fn from_urls(names: &Names, urls: Vec<String>) -> Resources {
        let u = |i: usize| urls.get(i).cloned().unwrap_or_default();
        Resources {
            names: names.clone(),
            table: names.table(),
            capture_url: u(0),
            sequence_url: u(2),
            deliver_url: u(4),
            reconcile_url: u(6),
            dead_letter_urls: [u(1), u(3), u(5), u(7)],
        }
    }

    /// The operators' service over this stage's table, deliver and reconcile queues.
    pub fn admin(&self, sdk: &SdkConfig, usage: std::sync::Arc<Usage>) -> crate::admin::Admin {
        let urls = [&self.capture_url, &self.sequence_url, &self.deliver_url, &self.reconcile_url];
        admin(sdk, &self.table, &urls.map(String::clone), usage)
    }

    /// Every queue's name and URL.
    pub fn queue_urls(&self) -> Vec<(String, String)> {
        let work = [&self.capture_url, &self.sequence_url, &self.deliver_url, &self.reconcile_url];
        self.names
            .queues()
            .iter()
            .zip(work)
            .zip(&self.dead_letter_urls)
            .flat_map(|((q, url), dlq)| [(q.clone(), url.clone()), (self.names.dead_letter_queue(q), dlq.clone())])
            .collect()
    }

    /// Deletes the table and the queues (what a benchmark or a demo created for itself).
    pub async fn delete(&self, sdk: &SdkConfig) -> Result<(), AwsError> {
        aws_sdk_dynamodb::Client::new(sdk)
            .delete_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| call_error("DeleteTable", &self.table, e))?;
        let sqs = aws_sdk_sqs::Client::new(sdk);
        for (name, url) in self.queue_urls() {
            sqs.delete_queue().queue_url(url).send().await.map_err(|e| call_error("DeleteQueue", &name, e))?;
        }
        Ok(())
    }
}

/// Creates a stage's table and queues where they are missing (what `sam deploy` creates, for an
/// emulator or a quick start), and answers their names and URLs.
pub async fn bootstrap(sdk: &SdkConfig, names: &Names) -> Result<Resources, AwsError> {
    create_table(sdk, &names.table()).await?;
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let mut urls = Vec::new();
    for q in names.queues() {
        let fifo = q.ends_with(".fifo");
        let dlq = names.dead_letter_queue(&q);
        let mut dlq_attrs = HashMap::from([(QueueAttributeName::MessageRetentionPeriod, (14 * 24 * 3600).to_string())]);
        if fifo {
            dlq_attrs.insert(QueueAttributeName::FifoQueue, "true".into());
        }
        let dlq_url = create_queue(&sqs, &dlq, dlq_attrs).await?;
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .map_err(|e| call_error("GetQueueAttributes", &dlq, e))?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn))
            .cloned()
            .unwrap_or_default();
        let mut attrs = HashMap::from([
            (QueueAttributeName::VisibilityTimeout, VISIBILITY_TIMEOUT_SECS.to_string()),
            (
                QueueAttributeName::RedrivePolicy,
                serde_json::json!({ "deadLetterTargetArn": dlq_arn, "maxReceiveCount": MAX_RECEIVE_COUNT }).to_string(),
            ),
        ]);
        if fifo {
            // High-throughput FIFO: deduplication and throughput limits per message group.
            attrs.insert(QueueAttributeName::FifoQueue, "true".into());
            attrs.insert(QueueAttributeName::ContentBasedDeduplication, "false".into());
            attrs.insert(QueueAttributeName::DeduplicationScope, "messageGroup".into());
            attrs.insert(QueueAttributeName::FifoThroughputLimit, "perMessageGroupId".into());
        }
        urls.push(create_queue(&sqs, &q, attrs).await?);
        urls.push(dlq_url);
    }
    Ok(Resources::from_urls(names, urls))
}

async fn create_queue(
    sqs: &aws_sdk_sqs::Client,
    name: &str,
    attrs: HashMap<QueueAttributeName, String>,
) -> Result<String, AwsError> {
    // CreateQueue answers the existing queue's URL when the attributes match.
    let out = sqs
        .create_queue()
        .queue_name(name)
        .set_attributes(Some(attrs))
        .send()
        .await
        .map_err(|e| call_error("CreateQueue", name, e))?;
    Ok(out.queue_url().unwrap_or_default().to_string())
}

async fn create_table(sdk: &SdkConfig, table: &str) -> Result<(), AwsError> {
    let client = aws_sdk_dynamodb::Client::new(sdk);
    if client.describe_table().table_name(table).send().await.is_err() {
        let key = |name: &str, kind: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
        let attr = |name: &str| {
            AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build()
        };
        client
            .create_table()
            .table_name(table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("pk", KeyType::Hash).map_err(|e| call_error("CreateTable", table, e))?)
            .key_schema(key("sk", KeyType::Range).map_err(|e| call_error("CreateTable", table, e))?)
            .attribute_definitions(attr("pk").map_err(|e| call_error("CreateTable", table, e))?)
            .attribute_definitions(attr("sk").map_err(|e| call_error("CreateTable", table, e))?)
            .send()
            .await
            .map_err(|e| call_error("CreateTable", table, e))?;
    }
    for _ in 0..120 {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| call_error("DescribeTable", table, e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            let ttl = TimeToLiveSpecification::builder()
                .attribute_name("expires_at")
                .enabled(true)
                .build()
                .map_err(|e| call_error("UpdateTimeToLive", table, e))?;
            // Already enabled is fine: TTL is then as wanted.
            if let Err(e) = client.update_time_to_live().table_name(table).time_to_live_specification(ttl).send().await
            {
                let text = brief(&e);
                if !text.contains("already enabled") {
                    return Err(call_error("UpdateTimeToLive", table, e));
                }
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(AwsError::Call { op: "CreateTable", resource: table.to_string(), reason: "not active after a minute".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_template() {
        let n = Names::new("dev");
        assert_eq!(n.table(), "dualsync-dev-state");
        assert_eq!(n.deliver_queue(), "dualsync-dev-deliver.fifo");
        assert_eq!(n.dead_letter_queue(&n.deliver_queue()), "dualsync-dev-deliver-dlq.fifo");
        assert_eq!(n.dead_letter_queue(&n.capture_queue()), "dualsync-dev-capture-dlq");
        let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-deliver.fifo";
        assert_eq!(
            dead_letter_url(url),
            "https://sqs.eu-west-1.amazonaws.com/123456789012/dualsync-dev-deliver-dlq.fifo"
        );
        assert_eq!(dead_letter_url("http://127.0.0.1:5000/000000000000/q"), "http://127.0.0.1:5000/000000000000/q-dlq");
        let r = Resources::from_urls(&n, (0..8).map(|i| format!("u{i}")).collect());
        assert_eq!((r.capture_url.as_str(), r.reconcile_url.as_str()), ("u0", "u6"));
        assert_eq!(r.dead_letter_urls, ["u1", "u3", "u5", "u7"].map(String::from));
        assert_eq!(r.queue_urls()[5], ("dualsync-dev-deliver-dlq.fifo".to_string(), "u5".to_string()));
    }
}
