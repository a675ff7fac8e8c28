//! Publishing with proof: every Warren publish is `mandatory` and waits for the broker's
//! publisher confirm, so "published" means "on disk in a queue".
//!
//! With `mandatory`, a message that no queue is bound for comes back inside its confirmation
//! ([`lapin::Confirmation::Ack`] with a returned message): that is how a submit to a missing
//! queue becomes [`PublishError::Unroutable`] instead of a silent drop. See
//! <https://www.rabbitmq.com/docs/confirms#publisher-confirms>.
//!
//! Publishing is split in two ([`send`], then [`Pending::confirmed`]) so that a batch can keep
//! many confirms in flight; [`publish`] does both for a single message.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::watch;

/// Why a message is not known to be safely queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "no queue is bound for `{routing_key}` on exchange `{exchange}` (does the queue exist?)"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("the broker refused the message (nack) on exchange `{exchange}`")]
    Nacked { exchange: String },
    #[error("the channel is not in confirm mode, so the broker gave no proof of receipt")]
    NotConfirmed,
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("publishing failed: {0}")]
    Channel(#[from] lapin::Error),
}

/// Sends one message (`mandatory`) and returns its pending confirm. The caller bounds how long
/// sending may take (see [`publish`]).
pub async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Pending, PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.clone(),
            options,
            body,
            properties,
        )
        .await?;
    Ok(Pending {
        confirm,
        exchange: exchange.to_owned(),
        routing_key,
    })
}

/// Sends one message and waits for its confirm, all of it within `timeout`: sending can hang
/// too, not only the confirm (RabbitMQ stops reading from a publisher it blocked under a
/// memory or disk alarm, and the socket's buffers fill up).
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
) -> Result<(), PublishError> {
    let publish = async {
        // The one deadline is the one around both steps.
        send(channel, exchange, routing_key, body, properties)
            .await?
            .confirmed(Duration::MAX)
            .await
    };
    tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| PublishError::Timeout(timeout))?
}

/// Like [`publish`], but the deadline only runs while RabbitMQ does not block publishing
/// (`blocked`, from [`crate::connection::watch_blocked`]): under a memory or disk alarm the
/// broker is alive and answers once the alarm clears, however long that takes, and giving up
/// then would only hand the message's job back to be run again. A publish still unanswered
/// `timeout` after the block (if any) ended fails with [`PublishError::Timeout`].
pub async fn publish_when_unblocked(
    channel: &Channel,
    exchange: &str,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
    timeout: Duration,
    blocked: &watch::Receiver<bool>,
) -> Result<(), PublishError> {
    let publish = async {
        let pending = send(channel, exchange, routing_key, body, properties).await?;
        pending.confirmed(Duration::MAX).await
    };
    tokio::pin!(publish);
    let mut blocked = blocked.clone();
    loop {
        // Wait out a block (at once if there is none).
        let unblocked = blocked.wait_for(|is_blocked| !is_blocked);
        tokio::select! {
            result = &mut publish => return result,
            watched = unblocked => if watched.is_err() {
                // The connection's watch is gone: a plain deadline from here.
                break;
            },
        }
        // A whole `timeout` from the moment publishing is allowed, unless a new block starts.
        tokio::select! {
            result = &mut publish => return result,
            () = tokio::time::sleep(timeout) => {
                if !*blocked.borrow() {
                    return Err(PublishError::Timeout(timeout));
                }
            }
        }
    }
    tokio::time::timeout(timeout, publish)
        .await
        .map_err(|_| PublishError::Timeout(timeout))?
}

/// A message sent and not yet confirmed.
#[derive(Debug)]
pub struct Pending {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: ShortString,
}

impl Pending {
    /// Waits for the broker's verdict, at most `timeout`.
    pub async fn confirmed(self, timeout: Duration) -> Result<(), PublishError> {
        let confirmation = tokio::time::timeout(timeout, self.confirm)
            .await
            .map_err(|_| PublishError::Timeout(timeout))??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
                exchange: self.exchange,
                routing_key: self.routing_key.to_string(),
            }),
            Confirmation::Nack(_) => Err(PublishError::Nacked {
                exchange: self.exchange,
            }),
            // A channel without confirm.select: no proof, so no success.
            Confirmation::NotRequested => Err(PublishError::NotConfirmed),
        }
    }
}
