//! AWS SDK errors as one short line: the service's code and message, or what kept the request
//! from being answered. `DisplayErrorContext` appends the error's `Debug` form, which carries
//! the raw HTTP response with every header (about 2,300 characters a line in the logs), and
//! nothing in it helps an operator that the code and message do not say.
use std::error::Error;

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};

/// `<code>: <message>` for an error the service answered; otherwise the chain of causes
/// (`dispatch failure: io error: connection refused`, `timed out`).
pub fn brief<E, R>(e: &SdkError<E, R>) -> String
where
    E: ProvideErrorMetadata + Error + 'static,
    R: std::fmt::Debug + 'static,
{
    if let SdkError::ServiceError(s) = e {
        let err = s.err();
        return match (err.code(), err.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_string(),
            (None, Some(message)) => message.to_string(),
            (None, None) => causes(err),
        };
    }
    causes(e)
}

/// An error and its sources' texts, each once (a wrapper often repeats its source's text):
/// `DisplayErrorContext` without the `Debug` form.
pub(crate) fn causes(e: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sqs::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_sqs::operation::send_message_batch::SendMessageBatchError;

    /// A stand-in for the raw response: what `DisplayErrorContext` would have printed.
    const RAW: &str = "x-amzn-requestid: 6fa7c1e4, content-type: text/xml, date: Tue, 01 Dec 2026";

    #[test]
    fn a_service_error_is_its_code_and_message_without_the_response() {
        let meta = ErrorMetadata::builder()
            .code("AWS.SimpleQueueService.NonExistentQueue")
            .message("The specified queue does not exist.")
            .build();
        let e: SdkError<SendMessageBatchError, String> =
            SdkError::service_error(SendMessageBatchError::generic(meta), RAW.to_string());
        assert_eq!(brief(&e), "AWS.SimpleQueueService.NonExistentQueue: The specified queue does not exist.");
        let long = aws_sdk_sqs::error::DisplayErrorContext(&e).to_string();
        assert!(long.contains("x-amzn-requestid"), "what this replaces: {long}");
    }

    #[test]
    fn a_request_that_got_no_answer_says_why() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e: SdkError<SendMessageBatchError, String> = SdkError::dispatch_failure(ConnectorError::io(Box::new(io)));
        let text = brief(&e);
        assert!(text.starts_with("dispatch failure"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
        let e: SdkError<SendMessageBatchError, String> = SdkError::timeout_error("no answer in 3.1 s");
        assert!(brief(&e).contains("no answer in 3.1 s"), "{}", brief(&e));
    }
}
