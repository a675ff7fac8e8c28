//! Waiting for a job's outcome: [`Dispatcher::submit_and_wait`] (`warren submit --wait`).
//!
//! No result store: the outcome comes back through RabbitMQ's direct reply-to
//! (<https://www.rabbitmq.com/docs/direct-reply-to>), as [`warren_core::reply`] describes.
//!
//! 1. A channel of its own, on the dispatcher's connection, consumes the pseudo-queue
//!    `amq.rabbitmq.reply-to` with no-ack (the broker refuses acks there), before anything is
//!    published on it;
//! 2. the job is submitted on that channel (confirm, mandatory, as any submit) with
//!    `reply_to = amq.rabbitmq.reply-to`, which the broker rewrites into this channel's address;
//! 3. the worker that runs the job publishes its final outcome there: done with the handler's
//!    result, or failed with the dead letter's class and reason after the last attempt;
//! 4. the first reply whose `correlation_id` is the job id ends the wait; the channel is closed.
//!
//! The timeout counts from the call, so it covers queueing, any delay, every attempt and the
//! retry backoffs between them. On a timeout the job is *not* cancelled: it runs on, and its
//! reply, with no one waiting for it any more, is dropped by the broker. So is a reply when the
//! connection dropped meanwhile ([`WaitError::Lost`]). A job the broker dead-letters by itself
//! (its delivery limit: workers crashing on it) sends no reply: the wait times out.

use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use warren_core::envelope::{JobId, NewJob};
use warren_core::reply::{DIRECT_REPLY_TO, Reply};

use crate::{Dispatcher, LinkError, SubmitError};

/// Why [`Dispatcher::submit_and_wait`] has no outcome to give.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The job was not submitted.
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The job was submitted, but its outcome did not come within the timeout; it may still
    /// run (and its reply is then dropped).
    #[error(
        "job {id} was submitted, but no outcome came within {after:?}: it may still be \
         queued, delayed, waiting for a retry or running (it is not cancelled)"
    )]
    Timeout { id: JobId, after: Duration },
    /// The channel or connection closed while waiting: a reply sent now is lost.
    #[error(
        "job {id} was submitted, but the connection to RabbitMQ closed while waiting for its \
         outcome ({reason})"
    )]
    Lost { id: JobId, reason: String },
    /// Setting up the reply channel failed; nothing was submitted.
    #[error("setting up the wait for a reply: {0}")]
    Setup(#[from] LinkError),
}

impl Dispatcher {
    /// Submits `job` and waits up to `timeout` for its final outcome (see the [module
    /// docs](self)): [`Reply`] says done (with the handler's JSON result) or failed (class,
    /// reason, attempts). A failed job is an `Ok` here: the wait worked.
    pub async fn submit_and_wait(
        &self,
        job: NewJob,
        timeout: Duration,
    ) -> Result<Reply, WaitError> {
        let started = Instant::now();
        let link = self.links.current().await?;
        let operation = self.config.broker.operation_timeout;
        let (channel, mut consumer) = reply_channel(&link.connection, operation).await?;
        let mut job = job;
        job.reply_to = Some(DIRECT_REPLY_TO.to_owned());
        let submitted = self.submit_on(&link, &channel, job).await;
        let id = match submitted {
            Ok(id) => id,
            Err(err) => {
                close(&channel, operation).await;
                return Err(err.into());
            }
        };
        let left = timeout.saturating_sub(started.elapsed());
        let wait = async {
            while let Some(delivery) = consumer.next().await {
                let delivery = match delivery {
                    Ok(delivery) => delivery,
                    Err(err) => return Err(err.to_string()),
                };
                let ours = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .is_some_and(|c| c.as_str() == id.0);
                if !ours {
                    continue;
                }
                match Reply::decode(&delivery.data) {
                    Ok(reply) => return Ok(reply),
                    Err(err) => {
                        tracing::warn!(job = %id, error = %err, "ignoring a reply that is not a Warren result");
                    }
                }
            }
            Err("the reply consumer ended".to_owned())
        };
        let outcome = tokio::time::timeout(left, wait).await;
        close(&channel, operation).await;
        match outcome {
            Err(_) => Err(WaitError::Timeout { id, after: timeout }),
            Ok(Err(reason)) => Err(WaitError::Lost { id, reason }),
            Ok(Ok(reply)) => Ok(reply),
        }
    }
}

async fn close(channel: &lapin::Channel, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, channel.close(200, "done waiting".into())).await;
}

/// A confirm channel of its own consuming the direct reply-to pseudo-queue (no ack), set up
/// within `operation`: its replies come to the address `reply_to = amq.rabbitmq.reply-to`
/// stands for on jobs published on this channel. Used by [`Dispatcher::submit_and_wait`] (a
/// channel per call) and [`crate::waiter::Waiter`] (one for its whole life).
pub(crate) async fn reply_channel(
    connection: &lapin::Connection,
    operation: Duration,
) -> Result<(lapin::Channel, lapin::Consumer), LinkError> {
    let setup = async {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    tokio::time::timeout(operation, setup)
        .await
        .map_err(|_| LinkError::Timeout(operation))?
        .map_err(LinkError::Channel)
}
