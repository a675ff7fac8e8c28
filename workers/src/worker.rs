//! The worker process's life: connect, declare, consume, run jobs concurrently, shut down.
//!
//! 1. Two connections: one consumes, one publishes retries and dead letters with confirms.
//!    They are separate because RabbitMQ blocks publishing connections under a memory or disk
//!    alarm, and consuming must go on then.
//! 2. The topology of every consumed queue is declared (idempotently).
//! 3. One channel and one consumer per queue, each with a per-consumer prefetch of
//!    `concurrency` (quorum queues refuse global QoS) and a unique consumer tag.
//! 4. Deliveries from all queues are merged; each runs as its own task ([`crate::job`]), at
//!    most `concurrency` at once across queues.
//! 5. On shutdown (the token is cancelled): cancel the consumers so no new job arrives, let the
//!    running jobs finish for up to `worker.shutdown_grace`, then close. Deliveries that were
//!    prefetched but not started, and jobs still running after the grace period, are unacked
//!    and return to their queues when the channel closes.
//!
//! If the broker connection or a consumer is lost, [`Worker::run`] returns an error and the
//! process exits non-zero; its unacked jobs are redelivered to other workers.

use std::sync::Arc;

use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use warren_core::config::Config;
use warren_core::connection::{self, ConnectError};
use warren_core::topology::{self, TopologyError};

use crate::handler::Registry;
use crate::job::{self, QueueRuntime, Shared};

/// A worker: which queues it consumes, with which handlers.
pub struct Worker {
    config: Config,
    registry: Registry,
    queues: Vec<String>,
}

/// Why a worker stopped other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no queue to consume: give at least one --queue")]
    NoQueues,
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{what}: {source}")]
    Broker { what: String, source: lapin::Error },
    #[error("the consumer of queue `{0}` was cancelled by the broker (queue deleted?)")]
    ConsumerCancelled(String),
}

fn broker(what: impl Into<String>) -> impl FnOnce(lapin::Error) -> WorkerError {
    let what = what.into();
    move |source| WorkerError::Broker { what, source }
}

impl Worker {
    pub fn new(config: Config, registry: Registry) -> Worker {
        Worker {
            config,
            registry,
            queues: Vec::new(),
        }
    }

    /// Adds a queue to consume.
    pub fn queue(mut self, name: impl Into<String>) -> Worker {
        let name = name.into();
        if !self.queues.contains(&name) {
            self.queues.push(name);
        }
        self
    }

    /// Runs until `shutdown` is cancelled (then returns `Ok` after draining), or until the
    /// broker connection fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if self.queues.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        let worker_id = worker_id();
        let broker_config = &self.config.broker;
        let consuming =
            connection::connect(broker_config, &format!("warren-worker {worker_id} consume"))
                .await?;
        let publishing =
            connection::connect(broker_config, &format!("warren-worker {worker_id} publish"))
                .await?;

        let setup = consuming
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        let queues: Vec<QueueRuntime> = self
            .queues
            .iter()
            .map(|name| QueueRuntime {
                name: name.as_str().into(),
                config: self.config.queue(name),
            })
            .collect();
        let declare: Vec<_> = queues.iter().map(|q| (&*q.name, &q.config)).collect();
        topology::declare(&setup, &declare).await?;
        let _ = setup.close(200, "declared".into()).await;

        let publisher = publishing
            .create_channel()
            .await
            .map_err(broker("opening a channel"))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(broker("enabling publisher confirms"))?;
        let shared = Arc::new(Shared {
            registry: self.registry,
            publisher,
            worker_id: worker_id.clone(),
            max_payload_bytes: self.config.jobs.max_payload_bytes,
            publish_timeout: broker_config.operation_timeout,
        });

        let concurrency = self.config.worker.concurrency;
        let mut consumers = Vec::new();
        let mut streams = Vec::new();
        for queue in queues {
            let queue = Arc::new(queue);
            let (channel, tag, consumer) =
                consume(&consuming, &queue.name, &worker_id, concurrency).await?;
            consumers.push((channel, tag));
            streams.push(
                consumer
                    .map(move |delivery| (queue.clone(), delivery))
                    .boxed(),
            );
        }
        tracing::info!(
            worker = %worker_id,
            queues = ?self.queues,
            concurrency,
            kinds = ?shared.registry.kinds(),
            "worker started"
        );

        let tracker = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(usize::from(concurrency)));
        let mut deliveries = futures::stream::select_all(streams);
        let stopped = loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                slot = slots.clone().acquire_owned() => slot,
            };
            let Ok(slot) = slot else { break Ok(()) };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => next,
            };
            let (queue, delivery) = match next {
                Some((queue, Ok(delivery))) => (queue, delivery),
                Some((queue, Err(err))) => {
                    break Err(broker(format!("consuming queue `{}`", queue.name))(err));
                }
                None => break Err(WorkerError::ConsumerCancelled(self.queues.join(", "))),
            };
            let shared = shared.clone();
            let span = tracing::info_span!("job", queue = %queue.name, tag = delivery.delivery_tag);
            tracker.spawn(
                async move {
                    job::process(&shared, &queue, delivery).await;
                    drop(slot);
                }
                .instrument(span),
            );
        };

        tracing::info!(
            "stopping: no new jobs; waiting for {} running job(s)",
            tracker.len()
        );
        for (channel, tag) in &consumers {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        tracker.close();
        let grace = self.config.worker.shutdown_grace;
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                "{} job(s) still running after {}; leaving them to be redelivered",
                tracker.len(),
                humantime::format_duration(grace)
            );
        }
        drop(deliveries);
        let _ = consuming.close(200, "worker stopping".into()).await;
        let _ = publishing.close(200, "worker stopping".into()).await;
        tracing::info!("worker stopped");
        stopped
    }
}

/// Opens a channel with per-consumer prefetch and starts consuming `queue` under a unique tag.
async fn consume(
    connection: &Connection,
    queue: &str,
    worker_id: &str,
    prefetch: u16,
) -> Result<(Channel, String, lapin::Consumer), WorkerError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("opening a channel"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(broker("setting prefetch"))?;
    let tag = format!(
        "warren-worker {worker_id} {}",
        uuid::Uuid::now_v7().simple()
    );
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker(format!("consuming queue `{queue}`")))?;
    Ok((channel, tag, consumer))
}

/// `host:pid`, written into dead letters and connection names.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}:{}", std::process::id())
}
