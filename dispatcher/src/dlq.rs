//! The dead-letter workbench: reading a queue's dead letters (`<queue>.dead`) without losing
//! them.

use lapin::message::Delivery;
use lapin::options::{BasicGetOptions, BasicNackOptions};

use crate::{Dispatcher, LinkError};

/// Why a dead-letter operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("invalid queue name: {0}")]
    Name(#[from] warren_core::topology::NameError),
    #[error("reading queue `{queue}`: {source}")]
    Read {
        queue: String,
        #[source]
        source: lapin::Error,
    },
}

/// Up to `count` messages of `queue` (usually `<queue>.dead`), left in the queue: they are
/// fetched unacknowledged and handed back with one `basic.nack` (requeue, multiple), then the
/// channel closes (which hands back anything left).
///
/// A nack, unlike a reject or a closed channel, does not count towards a quorum queue's
/// delivery limit on RabbitMQ 4.x, so peeking is harmless even on a dead-letter queue that an
/// older Warren declared without `x-delivery-limit` (4.x gives those a limit of 20). On 3.10
/// every return counts; the queues Warren reads are declared with a limit that reading never
/// reaches ([`warren_core::topology::READ_SAFE_DELIVERY_LIMIT`]).
pub async fn peek(
    dispatcher: &Dispatcher,
    queue: &str,
    count: usize,
) -> Result<Vec<Delivery>, DlqError> {
    let channel = dispatcher.open_channel().await?;
    let name = warren_core::topology::short(queue)?;
    let mut messages = Vec::new();
    while messages.len() < count {
        let got = channel
            .basic_get(name.clone(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|source| DlqError::Read {
                queue: queue.to_owned(),
                source,
            })?;
        let Some(message) = got else { break };
        messages.push(message.delivery);
    }
    if let Some(last) = messages.last() {
        let requeue_all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        // If the nack fails, closing the channel still hands the messages back.
        let _ = channel.basic_nack(last.delivery_tag, requeue_all).await;
    }
    let _ = channel.close(200, "peek done".into()).await;
    Ok(messages)
}
