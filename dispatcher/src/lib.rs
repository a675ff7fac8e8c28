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
//! The operations behind the `warren` command (crate `warren-cli`) are library calls here, so
//! that any program (and the HTTP service) can run them: [`dlq`] reads dead letters,
//! [`migrate`] replaces queues declared with other arguments.

pub mod dlq;
pub mod doctor;
pub mod inflight;
mod link;
pub mod management;
pub mod migrate;
pub mod status;
pub mod wait;
pub mod waiter;

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use lapin::Channel;
use tracing::Instrument;
use warren_core::config::Config;
use warren_core::connection::{ConnectError, Connector};
use warren_core::envelope::{EncodeError, JobId, NewJob};
use warren_core::metrics::Metrics;
use warren_core::probes::Readiness;
use warren_core::publish::{self, PublishError};
use warren_core::topology::{self, Declared, TopologyError};

pub use link::LinkError;
use link::Links;
pub use migrate::{MigrateError, Migrated};
pub use wait::WaitError;

/// Submits jobs over a connection that is reopened when lost.
pub struct Dispatcher {
    links: Links,
    config: Config,
    /// Work queues a passive declare found (or could not check: no permission), so a delayed
    /// job for them is not checked again (the delay levels accept any key: a missing queue
    /// would show only when the job is due). Held across a check, so that a batch of delayed
    /// jobs checks each queue once.
    known_queues: tokio::sync::Mutex<std::collections::HashSet<String>>,
}

/// Why a job was not submitted.
///
/// Only [`SubmitError::Publish`] (a lost connection, or no confirm in time) leaves it unknown
/// whether the broker kept the job: submitting it again is safe but may run it twice (Warren
/// is at-least-once). [`SubmitError::is_retryable`] tells which errors a later try may fix.
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
    #[error(
        "RabbitMQ has blocked publishing for over {0:?} (a memory or disk alarm: see the \
         management UI); the job was not submitted"
    )]
    Blocked(Duration),
    #[error(transparent)]
    Connection(#[from] LinkError),
    #[error(transparent)]
    Publish(PublishError),
    #[error("priority {priority} refused for queue `{queue}`: {source}")]
    Priority {
        queue: String,
        priority: u8,
        source: warren_core::config::PriorityError,
    },
    #[error(transparent)]
    Unsupported(TopologyError),
}

impl SubmitError {
    /// True when submitting the same job again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SubmitError::Blocked(_) | SubmitError::Connection(_) | SubmitError::Publish(_)
        )
    }
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
    #[error(transparent)]
    Link(#[from] LinkError),
}

impl Dispatcher {
    /// Connects (so that an unreachable broker is reported at once) and opens a confirm-mode
    /// channel.
    pub async fn connect(config: &Config) -> Result<Dispatcher, DispatcherError> {
        let name = format!("warren-dispatcher pid={}", std::process::id());
        let links = Links::new(
            Connector::new(&config.broker)?,
            name,
            config.broker.operation_timeout,
        );
        links.current().await?;
        Ok(Dispatcher {
            links,
            config: config.clone(),
            known_queues: Default::default(),
        })
    }

    /// Submits one job and returns its id once the broker has confirmed it.
    ///
    /// A job with a delay goes to the delay levels ([`warren_core::delay`]) and reaches its
    /// queue when its time is up; a job with a priority is refused before anything is
    /// published unless its queue takes priorities (`max_priority`, and for a quorum queue
    /// RabbitMQ 4.0 or later).
    ///
    /// The job's `traceparent` header is the submit span's context ([`NewJob::encode`]): a
    /// child of [`NewJob::traceparent`] when the caller gave one (with the `otel` feature, else
    /// of the current OpenTelemetry span, if any), or a new trace.
    pub async fn submit(&self, job: NewJob) -> Result<JobId, SubmitError> {
        let link = self.links.current().await?;
        self.submit_on(&link, &link.channel, job).await
    }

    /// [`Dispatcher::submit`] on `channel` (a confirm channel of `link`'s connection).
    pub(crate) async fn submit_on(
        &self,
        link: &link::Link,
        channel: &Channel,
        #[cfg_attr(not(feature = "otel"), allow(unused_mut))] mut job: NewJob,
    ) -> Result<JobId, SubmitError> {
        #[cfg(feature = "otel")]
        if job.traceparent.is_none() {
            job.traceparent = warren_core::trace::export::current_parent();
        }
        let message = job.encode(self.config.jobs.max_payload_bytes)?;
        let span = tracing::debug_span!(
            "submit",
            queue = %job.queue,
            job_id = %message.id,
            trace_id = %message.trace.trace_id(),
            span_id = %message.trace.span_id(),
            parent_id = message.trace.parent_id().map(tracing::field::display),
        );
        #[cfg(feature = "otel")]
        let exported = warren_core::trace::export::start(
            "submit",
            warren_core::trace::export::Kind::Producer,
            &message.trace,
        )
        .map(|mut exported| {
            exported.set("messaging.destination.name", job.queue.clone());
            exported.set("messaging.message.id", message.id.0.clone());
            exported.set("warren.job.kind", job.kind.clone());
            exported
        });
        let result = self
            .publish_checked(link, channel, job, message)
            .instrument(span)
            .await;
        #[cfg(feature = "otel")]
        if let Some(exported) = exported {
            exported.end(result.as_ref().err().map(ToString::to_string));
        }
        result
    }

    /// The checks of [`Dispatcher::submit`] that need the broker, then the confirmed publish.
    async fn publish_checked(
        &self,
        link: &link::Link,
        channel: &Channel,
        job: NewJob,
        message: warren_core::envelope::Message,
    ) -> Result<JobId, SubmitError> {
        let submit_started = std::time::Instant::now();
        if let Some(priority) = job.priority {
            let queue = self.config.queue(&job.queue);
            queue
                .check_priority(priority)
                .map_err(|source| SubmitError::Priority {
                    queue: job.queue.clone(),
                    priority,
                    source,
                })?;
            let major = topology::broker_version(&link.connection).map(|(major, _)| major);
            topology::priority_support(&job.queue, &queue, major)
                .map_err(SubmitError::Unsupported)?;
        }
        if message.delay_seconds > 0 {
            self.check_queue_exists(link, &job.queue).await?;
        }
        let blocked_timeout = self.config.broker.blocked_timeout;
        if !link.wait_unblocked(blocked_timeout).await {
            return Err(SubmitError::Blocked(blocked_timeout));
        }
        let publish_started = std::time::Instant::now();
        let result = publish::publish(
            channel,
            &message.exchange,
            message.routing_key,
            &message.body,
            message.properties,
            self.config.broker.operation_timeout,
        )
        .await;
        match result {
            Ok(()) => {
                if let Some(metrics) = self.links.metrics() {
                    let confirm = publish_started.elapsed();
                    metrics.submitted(&job.queue, &job.kind, submit_started.elapsed(), confirm);
                }
                Ok(message.id)
            }
            Err(PublishError::Unroutable { .. }) => Err(SubmitError::UnknownQueue(job.queue)),
            Err(PublishError::Channel(err)) if is_not_found(&err) => Err(SubmitError::NoTopology),
            Err(err @ PublishError::Nacked { .. }) => {
                // A channel can stay stuck nacking after a cluster node loss: use a new one.
                self.links.discard(link).await;
                Err(SubmitError::Publish(err))
            }
            Err(err) => Err(SubmitError::Publish(err)),
        }
    }

    /// A delayed job is published to the delay levels, which accept any routing key: that its
    /// queue exists is checked here, by a passive declare on a channel of its own (once per
    /// queue). A user who may not check (RabbitMQ 4.x answers a passive declare only for names
    /// the user has some permission on, so the dispatcher user of config/definitions.json is
    /// refused, once per queue and process) submits unchecked: a job whose queue is missing
    /// when it is due goes to `warren.unroutable`.
    async fn check_queue_exists(&self, link: &link::Link, queue: &str) -> Result<(), SubmitError> {
        let mut known = self.known_queues.lock().await;
        if known.contains(queue) {
            return Ok(());
        }
        if passive_declare(link, queue, self.config.broker.operation_timeout).await? == Some(false)
        {
            return Err(SubmitError::UnknownQueue(queue.into()));
        }
        known.insert(queue.to_owned());
        Ok(())
    }

    /// Whether the broker has `queue` (a passive declare on a channel of its own, nothing
    /// cached): `Some(true)`, `Some(false)`, or `None` when this user may not ask (RabbitMQ
    /// 4.x answers only for names the user has some permission on; a mandatory publish then
    /// finds out).
    pub async fn has_queue(&self, queue: &str) -> Result<Option<bool>, SubmitError> {
        let link = self.links.current().await?;
        passive_declare(&link, queue, self.config.broker.operation_timeout).await
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
        let link = self.links.current().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(LinkError::Channel)?;
        let settings: Vec<_> = queues
            .iter()
            .map(|q| (q.as_str(), self.config.queue(q)))
            .collect();
        let refs: Vec<_> = settings
            .iter()
            .map(|(name, queue)| (*name, queue))
            .collect();
        topology::check_priorities(&link.connection, &refs)?;
        let timeout = self.config.broker.operation_timeout * 4;
        let declared = tokio::time::timeout(timeout, topology::declare(&channel, &refs))
            .await
            .map_err(|_| ApplyError::Timeout(timeout))??;
        let _ = channel.close(200, "topology applied".into()).await;
        Ok(declared)
    }

    /// Records `warren_jobs_submitted_total`, submit and confirm latencies,
    /// `warren_connected{connection="dispatcher"}` and reconnects in `metrics`
    /// ([`warren_core::metrics`]).
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Dispatcher {
        self.links.set_metrics(metrics);
        self
    }

    /// The metrics given to [`Dispatcher::with_metrics`], if any.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.links.metrics()
    }

    /// Whether the dispatcher's connection (and its confirm channel) is open now; answers at
    /// once, never waits for the broker.
    pub fn is_connected(&self) -> bool {
        self.links.is_connected()
    }

    /// The configuration this dispatcher runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A new channel on the current connection, for commands that read queues directly.
    pub async fn open_channel(&self) -> Result<Channel, LinkError> {
        let link = self.links.current().await?;
        Ok(link.connection.create_channel().await?)
    }

    /// Closes the connection (pending confirms have all been awaited by then).
    pub async fn close(self) {
        self.links.close().await;
    }
}

/// Ready while connected. When not, a probe starts a reconnect in the background (at most one
/// a second, with a short deadline) and answers at once: `/readyz` of `warren serve`.
impl Readiness for Dispatcher {
    fn readiness(&self) -> Result<(), String> {
        self.links.readiness()
    }
}

/// Why `apply_topology` failed.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("declaring the topology: no answer within {0:?}")]
    Timeout(Duration),
}

/// A passive `queue.declare` of `queue` on a channel of its own, within `timeout`: whether it
/// exists, or `None` when the user may not ask (access refused).
async fn passive_declare(
    link: &link::Link,
    queue: &str,
    timeout: std::time::Duration,
) -> Result<Option<bool>, SubmitError> {
    let check = async {
        let channel = link.connection.create_channel().await?;
        let passive = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.into(), passive, Default::default())
            .await;
        if declared.is_ok() {
            let _ = channel.close(200, "checked".into()).await;
        }
        Ok::<_, lapin::Error>(declared.map(|_| ()))
    };
    let checked = tokio::time::timeout(timeout, check)
        .await
        .map_err(|_| SubmitError::Connection(LinkError::Timeout(timeout)))?
        .map_err(|err| SubmitError::Connection(LinkError::Channel(err)))?;
    match checked {
        Ok(()) => Ok(Some(true)),
        Err(err) if is_not_found(&err) => Ok(Some(false)),
        Err(err) if topology::is_access_refused(&err) => Ok(None),
        Err(err) => Err(SubmitError::Connection(LinkError::Channel(err))),
    }
}
