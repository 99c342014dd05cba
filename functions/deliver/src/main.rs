//! The deliver Lambda function: SQS event in, `SqsBatchResponse` out (see dualsync-lambda).
use dualsync::steps::StepKind;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    dualsync_lambda::run(StepKind::Deliver).await
}
