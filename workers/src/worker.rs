//! The worker process's life: connect, check the topology, consume, run jobs concurrently,
//! recover from a lost broker, shut down.
//!
//! [`Worker::run`] is a loop of *sessions*. A session:
//! 1. opens two connections: one consumes, one publishes retries and dead letters with
//!    confirms. They are separate because RabbitMQ blocks publishing connections under a
//!    memory or disk alarm, and consuming must go on then;
//! 2. checks that Warren's exchanges and its queues exist (passive declares, which need no
//!    configure right) and declares the topology only when something is missing
//!    ([`topology::ensure`]): a worker user without configure rights runs once the admin
//!    applied the topology, and stops with a clear error otherwise;
//! 3. opens one channel and consumer per queue, with a per-consumer prefetch (quorum queues
//!    refuse global QoS) of `worker.prefetch`, twice `concurrency` by default, and a unique
//!    consumer tag;
//! 4. merges the deliveries of all queues and runs each as its own task ([`crate::job`]), at
//!    most `concurrency` at once across queues and sessions; each channel's settler task sends
//!    the acks, batching runs of finished deliveries into one `multiple` ack
//!    ([`crate::settle`]);
//! 5. answers `warren inflight` with the jobs its handlers run, on a control queue of its own
//!    ([`crate::inflight`]; best effort: a missing `warren.control` or permission is a warning).
//!
//! Each consumer asks for `x-consumer-timeout` ([`warren_core::config::Config::consumer_timeout`],
//! longer than anything Warren's own `job_timeout` lets a delivery take). A consumer the broker
//! ends — its channel closed (consumer timeout on 3.x), or a `basic.cancel` (its queue deleted,
//! or a consumer timeout on 4.x) — is subscribed again within the session, on a new channel,
//! with backoff while its queue is missing: it is logged and counted, and the other queues go
//! on meanwhile. A queue is never left silently unconsumed. The ended consumer's jobs still
//! running are taken back ([`crate::job`]): stopped, nothing published for them.
//! A lost connection ends the session: the loop reconnects with exponential backoff
//! (trying every configured address) and starts a new one. Jobs still running from the old
//! session finish, but their acks cannot reach the broker any more (lapin returns `Ok(false)`,
//! counted in the stats): the broker has already requeued them, so they run again
//! (at-least-once).
//!
//! On shutdown (the token is cancelled): cancel the consumers so no new job arrives, let the
//! running jobs finish for up to `worker.shutdown_grace`, then close. Deliveries prefetched but
//! not started, and jobs still running after the grace period, return to their queues when the
//! connection closes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};
use lapin::message::Delivery;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warren_core::config::Config;
use warren_core::connection::{self, ConnectError, Connector};
use warren_core::topology::{self, TopologyError};

use warren_core::inflight::WorkerInfo;
use warren_core::metrics::{Link as MetricLink, Metrics};
use warren_core::probes::Health;

use crate::handler::Registry;
use crate::inflight::{self, Running};
use crate::job::{self, QueueRuntime, Shared, Stats};
use crate::settle::{SettleHook, Settled, Settler};
use crate::watchdog;

/// A worker: which queues it consumes, with which handlers.
pub struct Worker {
    config: Config,
    registry: Registry,
    queues: Vec<String>,
    hook: Option<SettleHook>,
    metrics: Option<Arc<Metrics>>,
    health: Option<Arc<Health>>,
}

/// Why a worker stopped other than by shutdown. Only errors that reconnecting cannot fix
/// end [`Worker::run`]; see [`WorkerError::is_fatal`].
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no queue to consume: give at least one --queue")]
    NoQueues,
    #[error("invalid queue name `{name}`: {reason}")]
    InvalidQueue {
        name: String,
        reason: topology::NameError,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error("{what}: {source}")]
    Broker { what: String, source: lapin::Error },
    #[error("{0}: no answer from the broker within the operation timeout")]
    Timeout(String),
    #[error("the publishing channel was lost")]
    PublisherLost,
    #[error("every consumer was cancelled by the broker (queues deleted?)")]
    ConsumersCancelled,
    #[error("the connection to the broker was lost")]
    ConnectionLost,
}

impl WorkerError {
    /// Errors that a new session would only repeat: bad names, refused credentials, a queue
    /// declared with other arguments, a missing topology this user may not declare, a
    /// permission the user lacks (`ACCESS_REFUSED`, e.g. no read right on a queue to consume).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            WorkerError::NoQueues
                | WorkerError::InvalidQueue { .. }
                | WorkerError::Connect(
                    ConnectError::AccessRefused { .. } | ConnectError::InvalidUrl(_)
                )
                | WorkerError::Topology(
                    TopologyError::Mismatch { .. }
                        | TopologyError::InvalidName { .. }
                        | TopologyError::NotPermitted { .. }
                )
        ) || matches!(
            self,
            WorkerError::Broker { source, .. }
                | WorkerError::Topology(TopologyError::Broker { source, .. })
                if topology::is_access_refused(source)
        )
    }
}

/// What outlives a session: the handlers, the concurrency limit, the running jobs.
struct Process {
    config: Config,
    registry: Registry,
    queues: Vec<Arc<QueueRuntime>>,
    worker_id: String,
    connector: Connector,
    /// One permit per job allowed to run at once.
    slots: Arc<Semaphore>,
    /// Every job task, across sessions, awaited on shutdown.
    tracker: TaskTracker,
    stats: Arc<Stats>,
    hook: Option<SettleHook>,
    /// The jobs whose handlers run now, across sessions (`warren inflight`).
    running: Arc<Running>,
    /// Connection state, reconnects and consumer cancels (the jobs' series are in `queues`).
    metrics: Option<Arc<Metrics>>,
    /// Readiness: one condition per connection and per consumed queue ([`conditions`]).
    health: Option<Arc<Health>>,
    /// Set once a session has connected: the next session that connects is a reconnect.
    connected_before: AtomicBool,
}

impl Worker {
    pub fn new(config: Config, registry: Registry) -> Worker {
        Worker {
            config,
            registry,
            queues: Vec::new(),
            hook: None,
            metrics: None,
            health: None,
        }
    }

    /// Records Prometheus metrics in `metrics` (see [`warren_core::metrics`]): jobs started,
    /// succeeded, retried, dead-lettered and requeued by queue and kind, handler durations,
    /// jobs in flight, acks lost, reconnects, connection state, consumer cancels. Without it
    /// nothing is recorded.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Worker {
        self.metrics = Some(metrics);
        self
    }

    /// Keeps `health` up to date: ready while both connections are open and every queue has a
    /// subscribed consumer; not ready while the broker is away, between sessions, or while a
    /// consumer is being subscribed again (`/readyz`, [`warren_core::probes`]).
    pub fn health(mut self, health: Arc<Health>) -> Worker {
        self.health = Some(health);
        self
    }

    /// Calls `hook` for every job once its ack (or nack) was sent, or could not be: for
    /// metrics. It runs on the settling task, so it must be quick.
    pub fn on_settled(mut self, hook: impl Fn(&Settled<'_>) + Send + Sync + 'static) -> Worker {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// Adds a queue to consume.
    pub fn queue(mut self, name: impl Into<String>) -> Worker {
        let name = name.into();
        if !self.queues.contains(&name) {
            self.queues.push(name);
        }
        self
    }

    /// Runs until `shutdown` is cancelled (then returns `Ok` after draining), reconnecting
    /// whenever the broker is lost. Returns an error only for what reconnecting cannot fix.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        if self.queues.is_empty() {
            return Err(WorkerError::NoQueues);
        }
        for name in &self.queues {
            topology::validate_queue_name(name).map_err(|reason| WorkerError::InvalidQueue {
                name: name.clone(),
                reason,
            })?;
        }
        let process = Process {
            queues: self
                .queues
                .iter()
                .map(|name| {
                    // This queue first, then the others it shares the worker's slots with.
                    let mut consumed = vec![name.as_str()];
                    consumed.extend(self.queues.iter().map(String::as_str).filter(|q| q != name));
                    Arc::new(QueueRuntime {
                        name: name.as_str().into(),
                        config: self.config.queue(name),
                        consumer_timeout: self.config.consumer_timeout(&consumed),
                        metrics: self
                            .metrics
                            .as_ref()
                            .map(|m| m.worker_queue(name, &self.registry.kinds())),
                    })
                })
                .collect(),
            worker_id: worker_id(),
            connector: Connector::new(&self.config.broker)?,
            slots: Arc::new(Semaphore::new(usize::from(self.config.worker.concurrency))),
            tracker: TaskTracker::new(),
            stats: Arc::default(),
            hook: self.hook,
            running: Arc::default(),
            metrics: self.metrics,
            health: self.health,
            connected_before: AtomicBool::new(false),
            config: self.config,
            registry: self.registry,
        };
        if let Some(health) = &process.health {
            for condition in conditions(&self.queues) {
                health.set(&condition, false);
            }
        }
        let mut reconnect = reconnect_backoff();
        let result = loop {
            match process.session(&shutdown, &mut reconnect).await {
                Ok(()) => break Ok(()),
                Err(err) if err.is_fatal() => break Err(err),
                Err(err) => {
                    let wait = reconnect.next().unwrap_or(MAX_RECONNECT_DELAY);
                    tracing::warn!(
                        error = %warren_core::error_chain(&err),
                        "lost the broker; reconnecting in {}",
                        humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        };
        process.tracker.close();
        if !process.tracker.is_empty() {
            // Jobs of a lost session: their acks cannot be delivered any more, but let them end.
            let _ =
                tokio::time::timeout(process.config.worker.shutdown_grace, process.tracker.wait())
                    .await;
        }
        tracing::info!(stats = %process.stats, "worker stopped");
        result
    }
}

/// How often a session looks at its connections' state ([`watch_connections`]).
const CONNECTION_CHECK: Duration = Duration::from_millis(500);

/// A token cancelled once either connection is no longer connected (checked every
/// [`CONNECTION_CHECK`]), or when the session drops it; the watching task ends then.
fn watch_connections(connections: [lapin::ConnectionStatus; 2]) -> CancellationToken {
    let gone = CancellationToken::new();
    let token = gone.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CONNECTION_CHECK);
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            if connections.iter().any(|status| !status.connected()) {
                token.cancel();
                return;
            }
        }
    });
    gone
}

impl Process {
    /// One connected session; returns `Ok` after a graceful shutdown.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        reconnect: &mut ExponentialBackoff,
    ) -> Result<(), WorkerError> {
        let timeout = self.config.broker.operation_timeout;
        // Shared with the watchdog task (watchdog.rs), which opens channels of its own.
        // Until the session ends: not ready, connections down in the metrics.
        let state = SessionState(self);
        let consuming = Arc::new(self.connector.connect(&self.consuming_name()).await?);
        self.connection_state(MetricLink::Consume, true);
        let publishing = self
            .connector
            .connect(&format!("warren-worker {} publish", self.worker_id))
            .await?;
        self.connection_state(MetricLink::Publish, true);
        if self.connected_before.swap(true, Ordering::Relaxed)
            && let Some(metrics) = &self.metrics
        {
            metrics.reconnected();
        }

        let queues: Vec<_> = self.queues.iter().map(|q| (&*q.name, &q.config)).collect();
        let ensured = within(
            timeout * 4,
            "checking the topology",
            topology::ensure(&consuming, &queues),
        )
        .await??;
        if let topology::Ensured::Declared { missing, declared } = ensured {
            tracing::info!(
                %missing,
                declared = declared.len(),
                "the topology was incomplete: declared it"
            );
        }

        let publisher = deadline(timeout, "opening a channel", publishing.create_channel()).await?;
        deadline(
            timeout,
            "enabling publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let mut blocked = connection::watch_blocked(&publishing);
        let shared = Arc::new(Shared {
            registry: self.registry.clone(),
            publisher,
            worker_id: self.worker_id.clone(),
            max_payload_bytes: self.config.jobs.max_payload_bytes,
            publish_timeout: timeout,
            blocked: blocked.clone(),
            lost: CancellationToken::new(),
            stats: self.stats.clone(),
            running: self.running.clone(),
        });

        let consumers = Consumers::default();
        let mut deliveries = SelectAll::new();
        for queue in &self.queues {
            deliveries.push(self.consume(&consuming, queue, &consumers).await?);
        }
        // Subscribes again to a queue the broker no longer serves this worker without having
        // said so (see watchdog.rs), until the session ends.
        let _watchdog = watchdog::watch(
            consuming.clone(),
            consumers.clone(),
            self.queues.iter().map(|q| q.name.clone()).collect(),
            timeout,
        );
        // Answers `warren inflight` until the session ends (best effort: never fails it).
        let _responder = inflight::answer_requests(inflight::Control {
            consuming: &consuming,
            publishing: &publishing,
            running: self.running.clone(),
            worker: self.identity(),
            blocked: blocked.clone(),
            timeout,
        })
        .await;
        *reconnect = reconnect_backoff();
        tracing::info!(
            worker = %self.worker_id,
            queues = ?self.queues.iter().map(|q| &*q.name).collect::<Vec<_>>(),
            concurrency = self.config.worker.concurrency,
            kinds = ?self.registry.kinds(),
            consumer_timeouts = ?self
                .queues
                .iter()
                .map(|q| humantime::format_duration(q.consumer_timeout).to_string())
                .collect::<Vec<_>>(),
            "worker started"
        );

        // The consumer streams end when the connection drops, but not always: on RabbitMQ
        // 3.10 a connection cut as the session began once left them open (no error, no end)
        // and the worker waiting for ever. So the connections' own state is watched too.
        let gone = watch_connections([consuming.status().clone(), publishing.status().clone()]);
        let _stop_watching = gone.clone().drop_guard();
        let ended = loop {
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = shared.lost.cancelled() => break Err(WorkerError::PublisherLost),
                _ = gone.cancelled() => break Err(WorkerError::ConnectionLost),
                slot = self.slots.clone().acquire_owned() => slot,
            };
            let Ok(slot) = slot else { break Ok(()) };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = shared.lost.cancelled() => break Err(WorkerError::PublisherLost),
                _ = gone.cancelled() => break Err(WorkerError::ConnectionLost),
                Ok(()) = blocked.changed() => {
                    let now_blocked = *blocked.borrow_and_update();
                    self.follow_blocking(now_blocked, &consuming, &consumers, &mut deliveries).await;
                    continue;
                }
                next = deliveries.next() => next,
            };
            let (queue, delivery) = match next {
                Some(Event::Delivery(of, delivery)) => (of, delivery),
                Some(Event::Ended(of, why)) => {
                    match self.consumer_ended(&consuming, shutdown, of, why, &consumers) {
                        Ok(Some(again)) => deliveries.push(again),
                        Ok(None) => {}
                        Err(err) => break Err(err),
                    }
                    continue;
                }
                Some(Event::Lost(err)) => break Err(err),
                None => break Err(WorkerError::ConsumersCancelled),
            };
            let shared = shared.clone();
            // The job's tracing span is made by `job::process`, which reads its trace context.
            self.tracker.spawn(async move {
                // Boxed so that spawning moves a pointer, not the whole job's state.
                Box::pin(job::process(
                    &shared,
                    &queue.queue,
                    &queue.settler,
                    delivery,
                    slot,
                    &queue.taken_back,
                ))
                .await;
            });
        };

        // The streams hold the settlers' handles: dropping them lets each settler end once its
        // last job task has handed its delivery over.
        drop(deliveries);
        let closing = match ended {
            Ok(()) => {
                self.drain(&consumers.all()).await;
                timeout
            }
            // The broker is lost: not ready from now on. A close sent as a connection dies is
            // never answered (lapin does not fail it), so the closes get a moment, not the
            // whole operation timeout, and the next session starts at once.
            Err(_) => {
                drop(state);
                timeout.min(CLOSE_AFTER_LOSS)
            }
        };
        let _ = tokio::time::timeout(closing, consuming.close(200, "worker stopping".into())).await;
        let _ =
            tokio::time::timeout(closing, publishing.close(200, "worker stopping".into())).await;
        ended
    }

    /// Graceful stop: no new deliveries, running jobs get `shutdown_grace` to finish and ack.
    async fn drain(&self, consumers: &[(Channel, String)]) {
        // Stopping: not ready from now on, so that a load balancer or orchestrator looks away.
        if let Some(health) = &self.health {
            health.set_all(false);
        }
        tracing::info!(
            "stopping: no new jobs; waiting for {} running job(s)",
            self.tracker.len()
        );
        for (channel, tag) in consumers {
            let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(self.config.broker.operation_timeout, cancel).await;
        }
        self.tracker.close();
        let grace = self.config.worker.shutdown_grace;
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{} job(s) still running after {}; leaving them to be redelivered",
                self.tracker.len(),
                humantime::format_duration(grace)
            );
        }
    }

    /// Records whether a connection is open: its readiness condition and `warren_connected`.
    fn connection_state(&self, link: MetricLink, open: bool) {
        if let Some(health) = &self.health {
            health.set(connection_condition(link), open);
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_connected(link, open);
        }
    }

    /// The consuming connection's name, as the broker lists it.
    fn consuming_name(&self) -> String {
        format!("warren-worker {} consume", self.worker_id)
    }

    /// Who this process is, in its answers to `warren inflight`.
    fn identity(&self) -> WorkerInfo {
        let host = self
            .worker_id
            .rsplit_once(':')
            .map_or(self.worker_id.as_str(), |(host, _)| host);
        WorkerInfo {
            connection: self.consuming_name(),
            host: host.to_owned(),
            pid: std::process::id(),
        }
    }

    /// Publishing was blocked or unblocked: the first block of a session gives each queue an
    /// overflow consumer (see [`Consumers`]), kept for the rest of the session.
    async fn follow_blocking<'a>(
        &'a self,
        blocked: bool,
        connection: &'a Connection,
        consumers: &'a Consumers,
        deliveries: &mut SelectAll<Deliveries<'a>>,
    ) {
        if !blocked {
            tracing::info!("publishing unblocked");
            return;
        }
        if consumers.has_overflow() {
            tracing::warn!("publishing blocked again (resource alarm)");
            return;
        }
        tracing::warn!(
            "publishing blocked (resource alarm): failed jobs wait for their retry to be \
             published; an overflow consumer per queue keeps the queues moving meanwhile"
        );
        for queue in &self.queues {
            match self.subscribe(connection, queue, consumers, true).await {
                Ok(stream) => deliveries.push(stream),
                Err(err) => {
                    tracing::warn!(queue = %queue.name, error = %warren_core::error_chain(&err), "could not add an overflow consumer")
                }
            }
        }
    }

    /// A consumer's stream ended: the session ends if the connection is gone; otherwise the
    /// broker cancelled the consumer or closed its channel, and it is subscribed again (the
    /// returned stream), unless the worker is stopping or this end was already handled.
    fn consumer_ended<'a>(
        &'a self,
        connection: &'a Connection,
        shutdown: &CancellationToken,
        of: ConsumerOf,
        why: Option<lapin::Error>,
        consumers: &'a Consumers,
    ) -> Result<Option<Deliveries<'a>>, WorkerError> {
        if !connection.status().connected() {
            return Err(
                why.map_or(WorkerError::ConnectionLost, |source| WorkerError::Broker {
                    what: format!("consuming `{}`", of.queue.name),
                    source,
                }),
            );
        }
        if shutdown.is_cancelled() {
            return Ok(None);
        }
        // The broker takes back what this consumer had not settled (a closed channel: all of
        // it; a consumer timeout: the overdue delivery, and the others are handed back too).
        of.taken_back.cancel();
        // A closed channel ends its stream with the error, then `Ended(None)`.
        if of.ended.swap(true, Ordering::Relaxed) || of.overflow {
            return Ok(None);
        }
        self.stats.consumer_restarts.fetch_add(1, Ordering::Relaxed);
        let queue = &of.queue.name;
        if let Some(metrics) = &self.metrics {
            metrics.consumer_cancelled(queue);
        }
        if let Some(health) = &self.health {
            health.set(&queue_condition(queue), false);
        }
        match &why {
            Some(err) => {
                tracing::warn!(%queue, error = %err, "the broker closed the consumer's channel; subscribing again")
            }
            None => {
                tracing::warn!(%queue, "the broker cancelled the consumer (queue deleted, or a consumer timeout); subscribing again")
            }
        }
        Ok(Some(self.resubscribe(connection, of.queue, consumers)))
    }

    /// Subscribes to `queue` again after the broker ended its consumer: after
    /// [`RESUBSCRIBE_PAUSE`], then with exponential backoff (200 ms up to 10 s) while it fails
    /// (the queue is gone). The returned stream yields the new consumer's deliveries once it is
    /// subscribed; if the connection is lost meanwhile it yields [`Event::Lost`], which ends the
    /// session.
    fn resubscribe<'a>(
        &'a self,
        connection: &'a Connection,
        queue: Arc<QueueRuntime>,
        consumers: &'a Consumers,
    ) -> Deliveries<'a> {
        let subscribed = async move {
            let mut backoff = reconnect_backoff();
            tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
            loop {
                match self.consume(connection, &queue, consumers).await {
                    Ok(stream) => {
                        tracing::info!(queue = %queue.name, "consuming the queue again");
                        return stream;
                    }
                    Err(err) if !connection.status().connected() => {
                        return futures::stream::once(async move { Event::Lost(err) }).boxed();
                    }
                    Err(err) => {
                        let wait = backoff.next().unwrap_or(MAX_RECONNECT_DELAY);
                        tracing::warn!(
                            queue = %queue.name,
                            error = %warren_core::error_chain(&err),
                            "cannot consume the queue (deleted?); trying again in {}",
                            humantime::format_duration(Duration::from_millis(wait.as_millis() as u64))
                        );
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        };
        futures::stream::once(subscribed).flatten().boxed()
    }

    /// Opens a channel with per-consumer prefetch (`worker.prefetch`) and consumes `queue` under
    /// a unique tag; the consumer is added to `consumers` (cancelled on shutdown). The stream
    /// ends with [`Event::Ended`] when the broker ends the consumer.
    async fn consume<'a>(
        &self,
        connection: &Connection,
        queue: &Arc<QueueRuntime>,
        consumers: &Consumers,
    ) -> Result<Deliveries<'a>, WorkerError> {
        let stream = self.subscribe(connection, queue, consumers, false).await?;
        if let Some(health) = &self.health {
            health.set(&queue_condition(&queue.name), true);
        }
        Ok(stream)
    }

    /// [`Process::consume`], or with `overflow` a queue's overflow consumer (see [`Consumers`]).
    /// The channel is closed once the consumer has ended and its last delivery is settled.
    async fn subscribe<'a>(
        &self,
        connection: &Connection,
        queue: &Arc<QueueRuntime>,
        consumers: &Consumers,
        overflow: bool,
    ) -> Result<Deliveries<'a>, WorkerError> {
        let timeout = self.config.broker.operation_timeout;
        let channel = deadline(timeout, "opening a channel", connection.create_channel()).await?;
        let prefetch = match overflow {
            true => PARKED_ROOM,
            false => self.config.worker.prefetch(),
        };
        let qos = channel.basic_qos(prefetch, BasicQosOptions { global: false });
        deadline(timeout, "setting prefetch", qos).await?;
        let tag = format!(
            "warren-worker {} {}",
            self.worker_id,
            uuid::Uuid::now_v7().simple()
        );
        let options = BasicConsumeOptions::default();
        let consume = channel.basic_consume(
            (*queue.name).into(),
            tag.as_str().into(),
            options,
            topology::consumer_arguments(queue.config.queue_type, queue.consumer_timeout),
        );
        let consumer = deadline(
            timeout,
            &format!("consuming queue `{}`", queue.name),
            consume,
        )
        .await?;
        let (settler, settling) = Settler::new(self.stats.clone(), self.hook.clone(), timeout);
        let settled_channel = channel.clone();
        self.tracker.spawn(async move {
            settling.await;
            if settled_channel.status().connected() {
                let close = settled_channel.close(200, "consumer ended".into());
                let _ = tokio::time::timeout(timeout, close).await;
            }
        });
        let of = ConsumerOf {
            queue: queue.clone(),
            settler,
            ended: Arc::default(),
            taken_back: CancellationToken::new(),
            overflow,
        };
        lock(&consumers.list).push(Subscription {
            queue: queue.name.clone(),
            ended: of.ended.clone(),
            channel,
            tag,
            overflow,
        });
        // lapin ends the stream after a `basic.cancel` from the broker, and after the error of
        // a closed channel: either way an `Ended` comes last.
        let last = of.clone();
        let stream = consumer
            .map(move |next| match next {
                Ok(delivery) => Event::Delivery(of.clone(), delivery),
                Err(err) => Event::Ended(of.clone(), Some(err)),
            })
            .chain(futures::stream::once(
                async move { Event::Ended(last, None) },
            ))
            .boxed();
        Ok(stream)
    }
}

/// Marks the session's end, however it ends: not ready (every condition unmet), both
/// connections down in the metrics.
struct SessionState<'a>(&'a Process);

impl Drop for SessionState<'_> {
    fn drop(&mut self) {
        if let Some(health) = &self.0.health {
            health.set_all(false);
        }
        self.0.connection_state(MetricLink::Consume, false);
        self.0.connection_state(MetricLink::Publish, false);
    }
}

/// The readiness conditions of a worker consuming `queues`: its two connections, and a
/// subscribed consumer on each queue.
fn conditions(queues: &[String]) -> Vec<String> {
    [MetricLink::Consume, MetricLink::Publish]
        .map(|link| connection_condition(link).to_owned())
        .into_iter()
        .chain(queues.iter().map(|q| queue_condition(q)))
        .collect()
}

fn connection_condition(link: MetricLink) -> &'static str {
    match link {
        MetricLink::Publish => "publishing connection open",
        _ => "consuming connection open",
    }
}

fn queue_condition(queue: &str) -> String {
    format!("queue `{queue}` consumed")
}

/// The consumers of a session, cancelled on shutdown.
///
/// Under a memory or disk alarm, a failed job's retry or dead letter cannot be published until
/// the alarm clears, and its delivery stays unacked until then (acking first could lose it).
/// Each such delivery holds a place of its consumer's prefetch: with the usual prefetch a few
/// failing jobs fill it and stop the queue, good jobs included. A consumer's prefetch cannot be
/// raised once it consumes (RabbitMQ applies `basic.qos` to consumers started after it), so
/// while publishing is blocked each queue gets an *overflow* consumer of its own, on its own
/// channel, with a prefetch of [`PARKED_ROOM`]; handlers still run at most `concurrency` at
/// once (the slots). The overflow consumers stay until the session ends: cancelling one makes
/// RabbitMQ 3.10 hand its unacked deliveries to the queue again, and the jobs whose retries were
/// waiting for the alarm would run twice (fault scenario 6 saw 223 such duplicates).
#[derive(Clone, Default)]
pub(crate) struct Consumers {
    list: Arc<Mutex<Vec<Subscription>>>,
}

/// One consumer of a session.
struct Subscription {
    queue: Arc<str>,
    /// Set once the broker ended it (the `ended` of its [`ConsumerOf`]).
    ended: Arc<AtomicBool>,
    channel: Channel,
    tag: String,
    /// An overflow consumer, only while publishing is blocked.
    overflow: bool,
}

/// The prefetch of a queue's overflow consumer while publishing is blocked: room for failed jobs
/// waiting for their retry or dead letter to be published.
const PARKED_ROOM: u16 = 256;

impl Consumers {
    /// The consumers to cancel on shutdown.
    fn all(&self) -> Vec<(Channel, String)> {
        lock(&self.list)
            .iter()
            .map(|s| (s.channel.clone(), s.tag.clone()))
            .collect()
    }

    /// Whether the overflow consumers were added already.
    fn has_overflow(&self) -> bool {
        lock(&self.list).iter().any(|s| s.overflow)
    }

    /// The consumers of `queue` (not the overflow ones) that have not ended and whose channel
    /// is open: the ones the worker believes the broker serves.
    pub(crate) fn live_of(&self, queue: &str) -> Vec<(Channel, String)> {
        lock(&self.list)
            .iter()
            .filter(|s| {
                !s.overflow
                    && &*s.queue == queue
                    && !s.ended.load(Ordering::Relaxed)
                    && s.channel.status().connected()
            })
            .map(|s| (s.channel.clone(), s.tag.clone()))
            .collect()
    }
}

/// What a consumer's stream yields.
// Deliveries are nearly every event: boxing them would allocate once more per job.
#[allow(clippy::large_enum_variant)]
enum Event {
    Delivery(ConsumerOf, Delivery),
    /// The broker ended the consumer (`basic.cancel`), or closed its channel (the error).
    Ended(ConsumerOf, Option<lapin::Error>),
    /// Subscribing again failed because the connection is gone: the session ends.
    Lost(WorkerError),
}

/// The events of one queue's consumer.
type Deliveries<'a> = BoxStream<'a, Event>;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a delivery came from: its queue, and its channel's settler.
#[derive(Clone)]
struct ConsumerOf {
    queue: Arc<QueueRuntime>,
    settler: Settler,
    /// Set once the consumer's end was handled (a closed channel reports it twice).
    ended: Arc<AtomicBool>,
    /// Cancelled when the broker ends the consumer: its jobs still running are stopped and
    /// publish nothing (see [`job::process`]).
    taken_back: CancellationToken,
    /// An overflow consumer (see [`Consumers`]): never subscribed again when it ends.
    overflow: bool,
}

/// The pause before subscribing again to a queue whose consumer the broker cancelled. A queue
/// being deleted cancels its consumers first; RabbitMQ 4.3 answers a `basic.consume` that
/// arrives while the deleted quorum queue is still shutting down with a *connection* error
/// (`541 INTERNAL_ERROR ... {shutdown, delete}`, fault scenario 9), which would cost the
/// worker its session and every in-flight ack. After the pause the queue is gone (a `404` that
/// closes only the new channel, retried with backoff) or declared anew.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(1);

/// How long a session that lost the broker waits for each connection's close.
const CLOSE_AFTER_LOSS: Duration = Duration::from_secs(1);

/// The longest wait between two attempts to reach the broker or a queue.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);

/// Waits between attempts to reconnect, or to consume a queue that is gone: 200 ms doubling up
/// to [`MAX_RECONNECT_DELAY`], with jitter, for ever.
fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(MAX_RECONNECT_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Runs a broker call with a deadline (lapin can hang on a dying server).
async fn deadline<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T, WorkerError> {
    within(timeout, what, call)
        .await?
        .map_err(|source| WorkerError::Broker {
            what: what.to_owned(),
            source,
        })
}

/// Runs any future with a deadline.
async fn within<T>(
    timeout: Duration,
    what: &str,
    call: impl Future<Output = T>,
) -> Result<T, WorkerError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| WorkerError::Timeout(what.to_owned()))
}

/// `host:pid`, written into dead letters and connection names.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Cancels `shutdown` on SIGTERM or SIGINT: how `warren-worker` (and any binary built on this
/// library) turns a signal into a graceful stop.
pub async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
