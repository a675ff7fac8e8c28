//! # warren-dispatcher
//!
//! Submits jobs. [`Dispatcher::submit`] returns a job id only once RabbitMQ has confirmed the
//! message and routed it to a queue; [`Dispatcher::submit_all`] does the same for many jobs
//! with up to `dispatcher.max_in_flight` confirms outstanding at once, so a batch costs about
//! one round trip per window rather than one per job.
//!
//! The dispatcher never declares work queues on its own: a job for a queue that does not exist
//! is an error ([`SubmitError::UnknownQueue`]), not a queue created by a typo. Queues are
//! declared by workers when they start, or by `warren topology apply`.
//!
//! The [`cli`] module holds the `warren` command's subcommands.

pub mod cli;

use futures::{Stream, StreamExt};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use warren_core::config::Config;
use warren_core::connection::{self, ConnectError};
use warren_core::envelope::{EncodeError, JobId, NewJob};
use warren_core::publish::{self, PublishError};
use warren_core::topology::{self, Declared, TopologyError};

/// A connection to RabbitMQ that submits jobs.
pub struct Dispatcher {
    /// Kept so that the connection lives as long as the dispatcher.
    connection: Connection,
    /// In confirm mode: every publish gets an ack or nack from the broker.
    channel: Channel,
    config: Config,
}

/// Why a job was not submitted. When `submit` returns an error the job may or may not have
/// reached the broker only for [`SubmitError::Publish`] with a timeout or a lost connection:
/// submitting it again is safe but may run it twice (Warren is at-least-once).
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("invalid job: {0}")]
    Invalid(#[from] EncodeError),
    #[error(
        "queue `{0}` does not exist on the broker (start a worker for it, or run \
         `warren topology apply --queue {0}`)"
    )]
    UnknownQueue(String),
    #[error(
        "exchange `{}` does not exist on the broker: Warren's topology was never declared here \
         (start a worker, or run `warren topology apply`)",
        topology::JOBS_EXCHANGE
    )]
    NoTopology,
    #[error(transparent)]
    Publish(PublishError),
}

/// True for the channel error RabbitMQ raises on a publish to a missing exchange.
fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// Why the dispatcher could not start.
#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("opening a channel: {0}")]
    Channel(#[from] lapin::Error),
}

impl Dispatcher {
    /// Connects and opens a confirm-mode channel.
    pub async fn connect(config: &Config) -> Result<Dispatcher, DispatcherError> {
        let name = format!("warren-dispatcher pid={}", std::process::id());
        let connection = connection::connect(&config.broker, &name).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Dispatcher {
            connection,
            channel,
            config: config.clone(),
        })
    }

    /// Submits one job and returns its id once the broker has confirmed it.
    pub async fn submit(&self, job: NewJob) -> Result<JobId, SubmitError> {
        let message = job.encode(self.config.jobs.max_payload_bytes)?;
        let timeout = self.config.broker.operation_timeout;
        let result = publish::publish(
            &self.channel,
            topology::JOBS_EXCHANGE,
            message.routing_key,
            &message.body,
            message.properties,
            timeout,
        )
        .await;
        match result {
            Ok(()) => Ok(message.id),
            Err(PublishError::Unroutable { .. }) => Err(SubmitError::UnknownQueue(job.queue)),
            Err(PublishError::Channel(err)) if is_not_found(&err) => Err(SubmitError::NoTopology),
            Err(err) => Err(SubmitError::Publish(err)),
        }
    }

    /// Submits many jobs, pipelined: up to `dispatcher.max_in_flight` wait for their confirm at
    /// once. Yields one result per job, in input order, as soon as that job is confirmed.
    pub fn submit_all<'a, I>(
        &'a self,
        jobs: I,
    ) -> impl Stream<Item = Result<JobId, SubmitError>> + 'a
    where
        I: IntoIterator<Item = NewJob>,
        I::IntoIter: 'a,
    {
        futures::stream::iter(jobs)
            .map(move |job| self.submit(job))
            .buffered(self.config.dispatcher.max_in_flight)
    }

    /// Declares the shared topology and the given queues (with their configured settings), on
    /// a channel of its own so that a mismatch cannot break the submit channel.
    pub async fn apply_topology(&self, queues: &[String]) -> Result<Vec<Declared>, ApplyError> {
        let channel = self.connection.create_channel().await?;
        let settings: Vec<_> = queues
            .iter()
            .map(|q| (q.as_str(), self.config.queue(q)))
            .collect();
        let refs: Vec<_> = settings
            .iter()
            .map(|(name, queue)| (*name, queue))
            .collect();
        let declared = topology::declare(&channel, &refs).await?;
        let _ = channel.close(200, "topology applied".into()).await;
        Ok(declared)
    }

    /// The configuration this dispatcher runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The underlying connection, for commands that read queues directly.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// Closes the connection cleanly (pending confirms have all been awaited by then).
    pub async fn close(self) {
        let _ = self.connection.close(200, "bye".into()).await;
    }
}

/// Why `apply_topology` failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("opening a channel: {0}")]
    Channel(#[from] lapin::Error),
}
