//! What each deployed function does on AWS, which its execution role in template.yaml must grant
//! and nothing more (tests/tests/iam.rs checks the roles against [`needs`]). Moto grants every
//! call, so no end-to-end test sees a missing permission: when code starts sending to, receiving
//! from or calling something new, change [`needs`] in the same commit.
use dualsync::adapters::aws::Names;
use dualsync::steps::StepKind;

/// The deployed functions (template.yaml's `AWS::Serverless::Function`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Function {
    Capture,
    Sequence,
    Deliver,
    Reconcile,
    Admin,
    Ingress,
    Tracker,
}

impl Function {
    pub const ALL: [Function; 7] = [
        Function::Capture,
        Function::Sequence,
        Function::Deliver,
        Function::Reconcile,
        Function::Admin,
        Function::Ingress,
        Function::Tracker,
    ];

    /// Its binary (template.yaml's `BuildProperties.Binary`, the folder under `functions/`).
    pub fn binary(self) -> &'static str {
        match self {
            Function::Capture => "capture",
            Function::Sequence => "sequence",
            Function::Deliver => "deliver",
            Function::Reconcile => "reconcile",
            Function::Admin => "admin",
            Function::Ingress => "ingress",
            Function::Tracker => "tracker",
        }
    }
}

/// A queue of the stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueId {
    /// A step's input queue.
    Work(StepKind),
    /// Where SQS moves a work queue's message after its last receive.
    DeadLetter(StepKind),
}

impl QueueId {
    pub const WORK: [QueueId; 4] = [
        QueueId::Work(StepKind::Capture),
        QueueId::Work(StepKind::Sequence),
        QueueId::Work(StepKind::Deliver),
        QueueId::Work(StepKind::Reconcile),
    ];
    pub const DEAD_LETTER: [QueueId; 4] = [
        QueueId::DeadLetter(StepKind::Capture),
        QueueId::DeadLetter(StepKind::Sequence),
        QueueId::DeadLetter(StepKind::Deliver),
        QueueId::DeadLetter(StepKind::Reconcile),
    ];

    /// Its resource in template.yaml: `CaptureQueue`, `CaptureDeadLetterQueue`, ...
    pub fn logical_id(self) -> String {
        match self {
            QueueId::Work(step) => format!("{step:?}Queue"),
            QueueId::DeadLetter(step) => format!("{step:?}DeadLetterQueue"),
        }
    }

    /// Its name in a stage, as the code computes it.
    pub fn name(self, names: &Names) -> String {
        let work = |step| match step {
            StepKind::Capture => names.capture_queue(),
            StepKind::Sequence => names.sequence_queue(),
            StepKind::Deliver => names.deliver_queue(),
            StepKind::Reconcile => names.reconcile_queue(),
        };
        match self {
            QueueId::Work(step) => work(step),
            QueueId::DeadLetter(step) => names.dead_letter_queue(&work(step)),
        }
    }
}

/// The SQS actions of a function's input queue: what its event source mapping polls with
/// (ReceiveMessage, DeleteMessage, GetQueueAttributes) and ChangeMessageVisibility, which
/// [`crate::Handler::handle`] sets on failed messages (their backoff).
pub const INPUT_ACTIONS: [&str; 4] =
    ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility"];
/// Sending (SqsQueue sends with SendMessageBatch, which SendMessage authorizes).
pub const SEND_ACTIONS: [&str; 1] = ["sqs:SendMessage"];
/// Taking messages off a queue the function reads itself (no event source mapping): receive,
/// then delete once handled (SqsQueue's DeleteMessageBatch needs DeleteMessage).
pub const DRAIN_ACTIONS: [&str; 3] = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility"];
/// Reading a queue's depth (`Queue::depth`: SqsQueue reads the approximate counts with
/// GetQueueAttributes).
pub const DEPTH_ACTIONS: [&str; 1] = ["sqs:GetQueueAttributes"];
/// On the state table, the same for every function: each one holds a `State` over `DynamoKv`,
/// and these are the calls DynamoKv makes (get, get_many, put and put_many as conditional
/// updates, add as an unconditional `ADD` update, delete, query; a test here reads them from its
/// source).
pub const TABLE_ACTIONS: [&str; 5] =
    ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:UpdateItem", "dynamodb:DeleteItem", "dynamodb:Query"];
/// On the function's own log group (Lambda writes its logs with the function's role).
pub const LOG_ACTIONS: [&str; 2] = ["logs:CreateLogStream", "logs:PutLogEvents"];
/// On the Secrets Manager secrets the job files name (`AwsSecrets` reads one with GetSecretValue).
pub const SECRET_ACTIONS: [&str; 1] = ["secretsmanager:GetSecretValue"];
/// On the SSM parameters the job files name (`AwsSecrets` reads one with GetParameter,
/// decrypting a SecureString).
pub const PARAMETER_ACTIONS: [&str; 1] = ["ssm:GetParameter"];
/// template.yaml's parameters listing those secrets and parameters (ARNs).
pub const SECRET_ARNS_PARAMETER: &str = "AppSecretArns";
pub const PARAMETER_ARNS_PARAMETER: &str = "AppParameterArns";

/// The queues one function uses, by how it uses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// The queue whose event source mapping invokes it ([`INPUT_ACTIONS`]).
    pub input: Option<QueueId>,
    /// Where it sends ([`SEND_ACTIONS`]).
    pub sends_to: &'static [QueueId],
    /// What it receives from, deletes from and releases itself ([`DRAIN_ACTIONS`]).
    pub drains: &'static [QueueId],
    /// Whose depth it reads ([`DEPTH_ACTIONS`]).
    pub counts: &'static [QueueId],
    /// Whether it calls the apps, and so reads their stored secrets ([`SECRET_ACTIONS`],
    /// [`PARAMETER_ACTIONS`]).
    pub calls_apps: bool,
}

impl Needs {
    /// Every SQS action it needs, with the queue it needs it on.
    pub fn queue_actions(&self) -> Vec<(&'static str, QueueId)> {
        let on = |actions: &'static [&'static str], queues: &[QueueId]| {
            queues.iter().flat_map(move |q| actions.iter().map(move |a| (*a, *q))).collect::<Vec<_>>()
        };
        let mut all = on(&INPUT_ACTIONS, self.input.as_slice());
        all.extend(on(&SEND_ACTIONS, self.sends_to));
        all.extend(on(&DRAIN_ACTIONS, self.drains));
        all.extend(on(&DEPTH_ACTIONS, self.counts));
        all
    }
}

/// What `function` does with the queues, from its code (see each line). Every function also
/// gets [`TABLE_ACTIONS`] on the state table and [`LOG_ACTIONS`] on its log group.
pub fn needs(function: Function) -> Needs {
    use QueueId::Work;
    use StepKind::*;
    match function {
        // steps/capture.rs: a captured transaction goes to the sequence queue; on the live path
        // it reads the source app and deletes in the target.
        Function::Capture => Needs {
            input: Some(Work(Capture)),
            sends_to: &[Work(Sequence)],
            drains: &[],
            counts: &[],
            calls_apps: true,
        },
        // steps/sequence.rs: delivery groups go to deliver.fifo. It opens the job's connectors
        // but never sends a request, so it reads no stored secret (they are read at first use).
        Function::Sequence => Needs {
            input: Some(Work(Sequence)),
            sends_to: &[Work(Deliver)],
            drains: &[],
            counts: &[],
            calls_apps: false,
        },
        // steps/deliver/mod.rs: reads both apps and writes; a job resumed while delivery was
        // keeping its messages aside gets them handed back to deliver.fifo (steps/pause.rs
        // `hand_back`), its own input queue.
        Function::Deliver => {
            Needs { input: Some(Work(Deliver)), sends_to: &[Work(Deliver)], drains: &[], counts: &[], calls_apps: true }
        }
        // steps/reconcile.rs: a retry puts the rows' changes back on deliver.fifo; an initial
        // sync lists an app.
        Function::Reconcile => Needs {
            input: Some(Work(Reconcile)),
            sends_to: &[Work(Deliver)],
            drains: &[],
            counts: &[],
            calls_apps: true,
        },
        // admin.rs: a retry or dismiss request is queued on reconcile.fifo; a resume hands the
        // kept deliveries back to deliver.fifo (steps/pause.rs `resume`); a redrive receives
        // from each dead-letter queue, sends back to its work queue, deletes what it sent and
        // makes the rest visible again (admin.rs `redrive`); a job view reads the depth of every
        // work and dead-letter queue (admin/queues.rs).
        Function::Admin => Needs {
            input: None,
            sends_to: &[Work(Capture), Work(Sequence), Work(Deliver), Work(Reconcile)],
            drains: &[
                QueueId::DeadLetter(Capture),
                QueueId::DeadLetter(Sequence),
                QueueId::DeadLetter(Deliver),
                QueueId::DeadLetter(Reconcile),
            ],
            counts: &[
                Work(Capture),
                Work(Sequence),
                Work(Deliver),
                Work(Reconcile),
                QueueId::DeadLetter(Capture),
                QueueId::DeadLetter(Sequence),
                QueueId::DeadLetter(Deliver),
                QueueId::DeadLetter(Reconcile),
            ],
            calls_apps: false,
        },
        // steps/ingress/mod.rs: a pushed event's notifications go to the capture queue; its
        // State reads the job and writes error rows (keys that cannot be read back, changes
        // too large for a message: steps/ingress/fit.rs); a record named only by id has its
        // key read back from its app.
        Function::Ingress => {
            Needs { input: None, sends_to: &[Work(Capture)], drains: &[], counts: &[], calls_apps: true }
        }
        // runtime/tracking.rs: the tracked changes' notifications go to the capture queue; its
        // State reads the jobs, keeps positions and record ids, and writes error rows (deletes of
        // ids never seen); the apps are polled.
        Function::Tracker => {
            Needs { input: None, sends_to: &[Work(Capture)], drains: &[], counts: &[], calls_apps: true }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AWS operations an adapter's source calls on its SDK client (`.client.<op>()`), as
    /// IAM actions: SQS authorizes its batch calls with the single-message action.
    fn calls(source: &str, service: &str) -> Vec<String> {
        let mut found: Vec<String> = source
            .split(".client")
            .skip(1)
            .filter_map(|rest| {
                let op = rest.trim_start().strip_prefix('.')?;
                let op = &op[..op.find('(')?];
                if op == "clone" {
                    return None;
                }
                let pascal: String = op.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect::<String>();
                let pascal = match service {
                    "sqs" => pascal.strip_suffix("Batch").unwrap_or(&pascal).to_string(),
                    _ => pascal,
                };
                Some(format!("{service}:{pascal}"))
            })
            .collect();
        found.sort();
        found.dedup();
        found
    }

    fn sorted(actions: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = actions.iter().map(|a| a.to_string()).collect();
        v.sort();
        v.dedup();
        v
    }

    #[test]
    fn table_actions_are_the_calls_dynamo_kv_makes() {
        let source = include_str!("../../../shared/src/adapters/aws/dynamo.rs");
        assert_eq!(calls(source, "dynamodb"), sorted(&TABLE_ACTIONS));
    }

    #[test]
    fn queue_actions_are_the_calls_sqs_queue_makes() {
        let source = include_str!("../../../shared/src/adapters/aws/sqs.rs");
        let all: Vec<&str> =
            INPUT_ACTIONS.iter().chain(&SEND_ACTIONS).chain(&DRAIN_ACTIONS).chain(&DEPTH_ACTIONS).copied().collect();
        assert_eq!(calls(source, "sqs"), sorted(&all));
    }

    #[test]
    fn reads_operations_off_the_client() {
        let source = "self\n            .client\n            .send_message_batch()\n let c = self.client.clone();";
        assert_eq!(calls(source, "sqs"), ["sqs:SendMessage"]);
        assert_eq!(calls("self.client.batch_get_item()", "dynamodb"), ["dynamodb:BatchGetItem"]);
    }

    #[test]
    fn queues_name_their_template_resources_and_stage_names() {
        let names = Names::new("dev");
        assert_eq!(QueueId::Work(StepKind::Deliver).logical_id(), "DeliverQueue");
        assert_eq!(QueueId::DeadLetter(StepKind::Capture).logical_id(), "CaptureDeadLetterQueue");
        assert_eq!(QueueId::DeadLetter(StepKind::Deliver).name(&names), "dualsync-dev-deliver-dlq.fifo");
        let deliver = needs(Function::Deliver).queue_actions();
        assert!(deliver.contains(&("sqs:SendMessage", QueueId::Work(StepKind::Deliver))), "{deliver:?}");
        assert_eq!(deliver.len(), INPUT_ACTIONS.len() + 1);
    }
}
