//! A transaction notification cut to the capture queue's message size: what local ingress (the
//! change-log pump) and pushed-event ingress both send.
use crate::domain::change::{TooLargeItem, TransactionNotification, MAX_MESSAGE_BYTES};
use crate::domain::errors::ErrorCategory;
use crate::domain::job::Side;
use crate::state::{NewError, State};
use crate::steps::StepError;

/// The transaction as notifications that fit in a message each. A change too large for a
/// message on its own (its key alone is that long) cannot be captured: it leaves an application
/// error row, under an abbreviated key, and the rest of the transaction goes on.
pub async fn fit(state: &State, mut tx: TransactionNotification) -> Result<Vec<TransactionNotification>, StepError> {
    loop {
        match tx.clone().split(MAX_MESSAGE_BYTES) {
            Ok(parts) => return Ok(parts),
            Err(TooLargeItem { index, bytes, .. }) => {
                let ch = tx.changes.remove(index);
                let (job, _) = state.job(&tx.job).await?;
                let source = job.side_of(&tx.app).unwrap_or(Side::A);
                let map = job.map_for_entity(source, &ch.entity).map_or(ch.entity.clone(), |(_, m)| m.name.clone());
                let error = NewError {
                    map,
                    entity: ch.entity.clone(),
                    app: tx.app.clone(),
                    source,
                    key: ch.key.abbreviated(),
                    by_record_id: false,
                    seq: ch.seq,
                    txid: tx.txid.clone(),
                    category: ErrorCategory::Application,
                    message: format!(
                        "change of {} not captured: it takes {bytes} bytes, more than a queue message holds \
                         (its key is {} bytes)",
                        ch.entity,
                        ch.key.display().len()
                    ),
                    delete: false,
                };
                state.record_error_counted(&tx.job, error).await?;
            }
        }
    }
}
