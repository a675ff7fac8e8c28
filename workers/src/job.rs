//! One delivery, from arrival to settlement. This is where a job is run, retried and
//! dead-lettered.
//!
//! 1. **Decode** the message ([`Job::decode`]). A message that is not a job (no id, no kind, a
//!    spoofed attempt header, a body that is not JSON, ...) is poison: dead-lettered with the
//!    reason, never retried.
//! 2. **Count** deliveries: a job the broker delivered more than `delivery_limit` times before
//!    ([`envelope::earlier_deliveries`]: every run ended with its worker, or overran the broker's
//!    consumer timeout, which RabbitMQ 4.x no longer counts itself) is dead-lettered.
//! 3. **Look up** the handler for the job's kind; an unknown kind is dead-lettered.
//! 4. **Run** the handler under the queue's `job_timeout`, catching panics, on the payload
//!    read as the handler's type (a payload that does not fit it is a permanent failure). An
//!    overrun or a panic is a retryable failure. If the broker ends the job's consumer
//!    meanwhile, the run is *taken back*: stopped (or its late result discarded), nothing
//!    published, the delivery handed back; the broker delivers the job again.
//! 5. **Settle**, always acking last, once what replaces the delivery is safely queued:
//!    - done: ack;
//!    - retryable with attempts left: publish a copy with `attempt + 1` into the delay
//!      queues ([`warren_core::topology::delay_route`]), wait for its confirm, ack;
//!    - permanent, or out of attempts: publish a copy with the failure headers to
//!      `<queue>.dead`, wait for its confirm, ack.
//!
//!    Before the ack of a final outcome (done, or dead-lettered), a job whose `reply_to` is a
//!    direct reply-to address gets its outcome sent there ([`send_reply`],
//!    [`warren_core::reply`]); never for a retry.
//!
//! If the replacement cannot be published, the delivery is rejected back to its queue
//! (`basic.reject` with requeue, which RabbitMQ 4.x counts towards the delivery limit) so the broker redelivers it: nothing is lost, at worst run again.
//! The ack or nack itself is sent by the channel's [`Settler`], which acks runs of finished
//! deliveries with one `multiple` ack ([`crate::settle`]). If the channel is gone by then, the
//! broker redelivers the job by itself; the settler counts that as an ack lost.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::BoxFuture;
use lapin::message::Delivery;
use lapin::{BasicProperties, Channel};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use warren_core::config::QueueConfig;
use warren_core::envelope::{self, DeadLetter, DeadReason, Job, PayloadError};
use warren_core::metrics::{KindMetrics, QueueMetrics};
use warren_core::publish::{self, PublishError};
use warren_core::reply::{self, Outcome as ReplyOutcome};
use warren_core::trace::SpanIds;
use warren_core::{delay, topology};

use crate::handler::{JobContext, JobError, Registry};
use crate::retry::{self, Next};
use crate::settle::{Finished, Settle, Settler};

/// What every job task of one worker process shares.
pub(crate) struct Shared {
    pub registry: Registry,
    /// Confirm-mode channel on the publishing connection, for retries and dead letters.
    pub publisher: Channel,
    /// Written into dead letters (`x-warren-worker`).
    pub worker_id: String,
    pub max_payload_bytes: usize,
    /// Deadline for a retry or dead-letter publish to be confirmed (counted while publishing
    /// is not blocked), and for an ack.
    pub publish_timeout: Duration,
    /// Whether RabbitMQ blocks the publishing connection (a resource alarm).
    pub blocked: watch::Receiver<bool>,
    /// Cancelled when the publishing channel turns out to be dead, so that the worker
    /// reconnects instead of failing every job's next step.
    pub lost: CancellationToken,
    /// Outcome counters over the process's life.
    pub stats: Arc<Stats>,
    /// The jobs whose handlers run now, for `warren inflight` ([`crate::inflight`]).
    pub running: Arc<crate::inflight::Running>,
}

/// How many jobs ended which way, over the worker process's life.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub done: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Handed back to the broker: settling failed, or the channel was gone.
    pub requeued: AtomicU64,
    /// Acks lapin could not send because the channel was lost (`Ok(false)`): the broker will
    /// redeliver those jobs, so they may run twice.
    pub acks_lost: AtomicU64,
    /// Consumers the broker cancelled (queue deleted, consumer timeout on RabbitMQ 4.x) or
    /// whose channel it closed; each was subscribed again.
    pub consumer_restarts: AtomicU64,
    /// Runs stopped, or results discarded, because the broker ended their consumer and took
    /// the delivery back: no retry or dead letter was published for them.
    pub taken_back: AtomicU64,
}

impl Stats {
    pub(crate) fn count(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Done => &self.done,
            Outcome::Retried => &self.retried,
            Outcome::DeadLettered(_) => &self.dead_lettered,
            Outcome::Requeued => &self.requeued,
            Outcome::TakenBack => &self.taken_back,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "{} done, {} retries scheduled, {} dead-lettered, {} requeued ({} acks lost with their channel), {} consumers restarted, {} runs taken back by the broker",
            get(&self.done),
            get(&self.retried),
            get(&self.dead_lettered),
            get(&self.requeued),
            get(&self.acks_lost),
            get(&self.consumer_restarts),
            get(&self.taken_back)
        )
    }
}

/// One work queue as the worker consumes it.
pub(crate) struct QueueRuntime {
    pub name: Arc<str>,
    pub config: QueueConfig,
    /// What each consumer asks the broker for as `x-consumer-timeout`
    /// ([`warren_core::config::Config::consumer_timeout`]).
    pub consumer_timeout: Duration,
    /// This queue's metric handles, by kind, when the worker records metrics.
    pub metrics: Option<QueueMetrics>,
}

/// How a job ended, for the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Done,
    Retried,
    /// With why: its class is a label of `warren_jobs_dead_lettered_total`.
    DeadLettered(DeadReason),
    /// Handed back to the broker to be delivered again (settling failed).
    Requeued,
    /// The broker ended the job's consumer (a consumer timeout, a closed channel) and took the
    /// delivery back: the run was stopped, or its result discarded, and nothing was published.
    TakenBack,
}

impl Outcome {
    /// The `outcome` field of the job's log line (and its exported span).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retried => "retried",
            Outcome::DeadLettered(_) => "dead_lettered",
            Outcome::Requeued => "requeued",
            Outcome::TakenBack => "taken_back",
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retried => "retry scheduled",
            Outcome::DeadLettered(_) => "dead-lettered",
            Outcome::Requeued => "requeued",
            Outcome::TakenBack => "taken back",
        }
    }
}

/// Runs one delivery to its end and hands it to its channel's settler. Never panics and never
/// returns an error: every path settles the delivery or leaves it to the broker to redeliver.
///
/// `slot` is the job's place among the worker's `concurrency`: it is given back as soon as the
/// handler has returned, before the retry or dead letter is published. Publishing can take
/// long (under a memory alarm RabbitMQ blocks publishers until the alarm clears, and the
/// delivery waits for it: see [`crate::worker`] on prefetch while blocked); failed jobs waiting
/// for that must not keep good jobs from running.
pub(crate) async fn process(
    shared: &Shared,
    queue: &QueueRuntime,
    settler: &Settler,
    delivery: Delivery,
    slot: OwnedSemaphorePermit,
    taken_back: &CancellationToken,
) {
    let started = Instant::now();
    // This attempt's span: a child of the submit span the job's `traceparent` names (the same
    // on every attempt: copies carry it unchanged), or a new trace without a valid one.
    let trace = SpanIds::child_of(envelope::traceparent(&delivery.properties).as_ref());
    let span = job_span(queue, &delivery, &trace);
    #[cfg(feature = "otel")]
    let exported = export_span(queue, &delivery, &trace);
    // The job's series (an unknown kind's are `kind="unknown"`), counted as the stats are.
    let metrics = queue
        .metrics
        .as_ref()
        .map(|m| m.kind(text(delivery.properties.kind())).clone());
    // The attempt is in the span (recorded once decoded); the exported span takes it here.
    #[cfg_attr(not(feature = "otel"), allow(unused_variables))]
    let (settle, outcome, attempt) = run(
        shared,
        queue,
        &delivery,
        slot,
        taken_back,
        metrics.as_deref(),
        &trace,
    )
    .instrument(span.clone())
    .await;
    span.in_scope(|| log_outcome(outcome, started));
    #[cfg(feature = "otel")]
    if let Some(mut exported) = exported {
        exported.set("warren.job.attempt", i64::from(attempt));
        exported.set("warren.job.outcome", outcome.name());
        let failed = (outcome != Outcome::Done).then(|| outcome.as_str().to_owned());
        exported.end(failed);
    }
    let id = match settler.keeps_ids() {
        true => delivery.properties.message_id().clone(),
        false => None,
    };
    let finished = Finished {
        tag: delivery.delivery_tag,
        acker: delivery.acker,
        settle,
        outcome,
        id,
        metrics,
    };
    settler.finish(finished, &shared.stats);
}

/// The job's tracing span: its queue and delivery tag, id, kind and trace context (this
/// attempt's span id and its parent, the submit span); the attempt is recorded once decoded.
/// Fields are formatted only when the span is enabled (`RUST_LOG` at info or finer).
fn job_span(queue: &QueueRuntime, delivery: &Delivery, trace: &SpanIds) -> tracing::Span {
    tracing::info_span!(
        "job",
        queue = %queue.name,
        tag = delivery.delivery_tag,
        job_id = %text(delivery.properties.message_id()),
        kind = %text(delivery.properties.kind()),
        attempt = tracing::field::Empty,
        trace_id = %trace.trace_id(),
        span_id = %trace.span_id(),
        parent_id = trace.parent_id().map(tracing::field::display),
    )
}

/// This attempt's OpenTelemetry span (feature `otel`), when spans are exported.
#[cfg(feature = "otel")]
fn export_span(
    queue: &QueueRuntime,
    delivery: &Delivery,
    trace: &SpanIds,
) -> Option<warren_core::trace::export::Span> {
    use warren_core::trace::export;
    let mut span = export::start("job", export::Kind::Consumer, trace)?;
    span.set("messaging.destination.name", queue.name.to_string());
    span.set(
        "messaging.message.id",
        text(delivery.properties.message_id()).to_owned(),
    );
    span.set(
        "warren.job.kind",
        text(delivery.properties.kind()).to_owned(),
    );
    Some(span)
}

/// Steps 1 to 4: how the delivery is to be settled, how the job ended, and its attempt.
async fn run(
    shared: &Shared,
    queue: &QueueRuntime,
    delivery: &Delivery,
    slot: OwnedSemaphorePermit,
    taken_back: &CancellationToken,
    metrics: Option<&KindMetrics>,
    trace: &SpanIds,
) -> (Settle, Outcome, u32) {
    let body = &delivery.data;
    let job = match Job::decode(&delivery.properties, body, shared.max_payload_bytes) {
        Ok(job) => job,
        Err(err) => {
            drop(slot);
            return malformed(shared, queue, delivery, err.to_string()).await;
        }
    };
    tracing::Span::current().record("attempt", job.attempt);
    let earlier = envelope::earlier_deliveries(&delivery.properties, delivery.redelivered);
    if earlier > u64::from(queue.config.delivery_limit) {
        drop(slot);
        let reason = format!(
            "delivered {} times without being settled: every run ended with its worker (a crash \
             or a kill) or overran the broker's consumer timeout (queue delivery_limit {})",
            earlier + 1,
            queue.config.delivery_limit
        );
        tracing::warn!(job = %job.id, "{reason}; dead-lettering it");
        let dead = dead_letter(
            shared,
            queue,
            DeadReason::DeliveryLimit,
            reason,
            job.attempt,
        );
        let (settle, outcome) = dead_letter_and_ack(shared, queue, delivery, dead).await;
        return (settle, outcome, job.attempt);
    }
    let Some(start) = shared.registry.get(&job.kind) else {
        drop(slot);
        // A body that is not JSON is malformed whatever its kind (docs/PROTOCOL.md §5).
        if let Err(err) = envelope::check_json(body) {
            return malformed(shared, queue, delivery, err.to_string()).await;
        }
        let reason = format!(
            "no handler for kind `{}` (this worker knows: {})",
            job.kind,
            shared.registry.kinds().join(", ")
        );
        tracing::warn!(job = %job.id, kind = %job.kind, "{reason}; dead-lettering it");
        let dead = dead_letter(shared, queue, DeadReason::UnknownKind, reason, job.attempt);
        let (settle, outcome) = dead_letter_and_ack(shared, queue, delivery, dead).await;
        return (settle, outcome, job.attempt);
    };
    let attempt = job.attempt;
    let ctx = JobContext {
        id: job.id,
        kind: job.kind,
        queue: queue.name.clone(),
        attempt,
        redelivered: delivery.redelivered,
        trace: *trace,
    };
    let running = shared.running.enter(&ctx, queue.config.job_timeout);
    // Counts the attempt and its duration, and the handler in flight until dropped.
    let attempt_metrics = metrics.map(KindMetrics::attempt);
    // The payload is parsed, and the handler called, before its future runs: a panic there (a
    // custom `Deserialize`, code before the handler's first `.await`) is caught too.
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| start(body, ctx))) {
        Ok(Ok(running)) => {
            let running = AssertUnwindSafe(running).catch_unwind();
            let limited = tokio::time::timeout(queue.config.job_timeout, running);
            tokio::select! {
                biased;
                () = taken_back.cancelled() => {
                    drop(slot);
                    return (Settle::Requeue, taken_back_from(queue, "stopped its run"), attempt);
                }
                limited = limited => match limited {
                    Err(_) => Err(JobError::retry(format!(
                        "timed out after {}",
                        humantime::format_duration(queue.config.job_timeout)
                    ))),
                    Ok(Err(panic)) => Err(panicked(&*panic)),
                    Ok(Ok(result)) => result,
                },
            }
        }
        Ok(Err(err @ PayloadError::NotJson(_))) => {
            drop(slot);
            return malformed(shared, queue, delivery, err.to_string()).await;
        }
        Ok(Err(err @ PayloadError::Mismatch(_))) => Err(JobError::permanent(err.to_string())),
        Err(panic) => Err(panicked(&*panic)),
    };
    drop(attempt_metrics);
    drop(running);
    drop(slot);
    // A handler that blocked its thread could not be stopped: its result comes too late.
    if taken_back.is_cancelled() {
        let outcome = taken_back_from(queue, "discarded the result of its run");
        return (Settle::Requeue, outcome, attempt);
    }
    let (settle, outcome) = settle(shared, queue, delivery, attempt, result).await;
    (settle, outcome, attempt)
}

/// The broker ended the consumer of this delivery (its consumer timeout, or its channel closed)
/// and has taken the delivery back, or will once it is handed back: it is delivered again, so
/// publishing a retry or dead letter for this run would make a second copy of the job.
/// Settled as a requeue (ignored by the broker for a delivery it already took back).
fn taken_back_from(queue: &QueueRuntime, what: &str) -> Outcome {
    tracing::warn!(
        queue = %queue.name,
        "the broker ended this job's consumer and takes the delivery back; Warren {what} and \
         publishes nothing for it: the job will be delivered again"
    );
    Outcome::TakenBack
}

/// A message that is not a job: dead-lettered with the reason, never retried (attempts 0).
async fn malformed(
    shared: &Shared,
    queue: &QueueRuntime,
    delivery: &Delivery,
    reason: String,
) -> (Settle, Outcome, u32) {
    tracing::warn!(queue = %queue.name, error = %reason, "malformed message, dead-lettering it");
    let dead = dead_letter(shared, queue, DeadReason::Malformed, reason, 0);
    let (settle, outcome) = dead_letter_and_ack(shared, queue, delivery, dead).await;
    (settle, outcome, 0)
}

/// Step 4: ack, retry or dead-letter according to the handler's result.
async fn settle(
    shared: &Shared,
    queue: &QueueRuntime,
    delivery: &Delivery,
    attempt: u32,
    result: Result<Option<serde_json::Value>, JobError>,
) -> (Settle, Outcome) {
    let job = text(delivery.properties.message_id());
    match result {
        Ok(result) => {
            if let Some(value) = &result {
                tracing::debug!(%value, "job result");
            }
            if reply::answerable_address(&delivery.properties).is_some() {
                let result = result.unwrap_or_default();
                let done = ReplyOutcome::Done {
                    result,
                    result_omitted: None,
                };
                send_reply(shared, delivery, attempt, done).await;
            }
            (Settle::Ack, Outcome::Done)
        }
        Err(JobError::Permanent(reason)) => {
            tracing::warn!(job = %job, error = %reason, "permanent failure, dead-lettering the job");
            let dead = dead_letter(shared, queue, DeadReason::Permanent, reason, attempt);
            dead_letter_and_ack(shared, queue, delivery, dead).await
        }
        Err(JobError::Retry(reason)) => match retry::next(&queue.config.retry, attempt) {
            Next::Retry {
                attempt: next,
                delay,
            } => {
                let seconds = delay::whole_seconds(delay);
                tracing::warn!(job = %job, error = %reason, "attempt {attempt} failed, will be retried in {seconds}s as attempt {next}");
                retry_and_ack(shared, queue, delivery, next, seconds).await
            }
            Next::GiveUp => {
                let reason = format!("gave up after {attempt} attempts; last error: {reason}");
                tracing::warn!(job = %job, "{reason}; dead-lettering the job");
                let dead = dead_letter(shared, queue, DeadReason::Exhausted, reason, attempt);
                dead_letter_and_ack(shared, queue, delivery, dead).await
            }
        },
    }
}

/// Queues attempt `next` to arrive after `seconds`, then acks this delivery.
///
/// This and [`dead_letter_and_ack`] return boxed futures: a publish awaiting its confirm is
/// large, and only failed jobs take these paths. Inline, they would make every job's task
/// several KiB, copied on each spawn (the callgrind profile of a drain showed it).
fn retry_and_ack<'a>(
    shared: &'a Shared,
    queue: &'a QueueRuntime,
    delivery: &'a Delivery,
    next: u32,
    seconds: u64,
) -> BoxFuture<'a, (Settle, Outcome)> {
    Box::pin(async move {
        let (exchange, key) = match seconds {
            0 => (topology::JOBS_EXCHANGE.to_owned(), queue.name.to_string()),
            _ => topology::delay_route(seconds, &queue.name),
        };
        let properties = envelope::retry_properties(&delivery.properties, next);
        let published = publish_copy(shared, &exchange, &key, delivery, properties).await;
        settle_after_publish(shared, published, Outcome::Retried)
    })
}

fn dead_letter(
    shared: &Shared,
    queue: &QueueRuntime,
    reason: DeadReason,
    error: String,
    attempts: u32,
) -> DeadLetter {
    DeadLetter {
        reason,
        error,
        attempts,
        queue: queue.name.to_string(),
        worker: shared.worker_id.clone(),
    }
}

/// Publishes a copy with the failure headers to `<queue>.dead`, then acks this delivery.
fn dead_letter_and_ack<'a>(
    shared: &'a Shared,
    queue: &'a QueueRuntime,
    delivery: &'a Delivery,
    dead: DeadLetter,
) -> BoxFuture<'a, (Settle, Outcome)> {
    Box::pin(async move {
        let properties = dead.properties(&delivery.properties);
        let key = topology::dead_queue(&queue.name);
        let published =
            publish_copy(shared, topology::DEAD_EXCHANGE, &key, delivery, properties).await;
        if published.is_ok() && reply::answerable_address(&delivery.properties).is_some() {
            let failed = ReplyOutcome::Failed {
                class: dead.reason.class().to_owned(),
                reason: dead.error,
            };
            send_reply(shared, delivery, dead.attempts, failed).await;
        }
        settle_after_publish(shared, published, Outcome::DeadLettered(dead.reason))
    })
}

async fn publish_copy(
    shared: &Shared,
    exchange: &str,
    key: &str,
    delivery: &Delivery,
    properties: BasicProperties,
) -> Result<(), PublishError> {
    // Queue names are validated to leave room for the delay prefix, so the key fits.
    let key = key.into();
    publish::publish_when_unblocked(
        &shared.publisher,
        exchange,
        key,
        &delivery.data,
        properties,
        shared.publish_timeout,
        &shared.blocked,
    )
    .await
}

/// Sends a job's final outcome (done, or dead-lettered) to the producer waiting for it
/// ([`warren_core::reply`]), before the delivery is acked. Only to a direct reply-to address
/// ([`reply::reply_address`]: a producer's `reply_to` naming a queue gets nothing), never
/// `mandatory`, and best effort: a reply whose waiter is gone is dropped by the broker, and a
/// reply that fails changes nothing about the job. No reply for an attempt to be retried.
fn send_reply<'a>(
    shared: &'a Shared,
    delivery: &'a Delivery,
    attempts: u32,
    outcome: ReplyOutcome,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let Some(address) = reply::answerable_address(&delivery.properties) else {
            return;
        };
        let id = text(delivery.properties.message_id()).to_owned();
        if *shared.blocked.borrow() {
            // A resource alarm: the reply would wait for it, and the ack with it.
            tracing::warn!(
                job = %id,
                "RabbitMQ blocks publishing (a resource alarm): the outcome is not sent to the \
                 waiting producer"
            );
            return;
        }
        let (body, properties) = reply::Reply {
            id,
            attempts,
            outcome,
        }
        .encode();
        let send = async {
            let options = lapin::options::BasicPublishOptions::default();
            let confirm = shared
                .publisher
                .basic_publish("".into(), address, options, &body, properties)
                .await?;
            confirm.await
        };
        match tokio::time::timeout(shared.publish_timeout, send).await {
            Ok(Ok(_)) => tracing::debug!("outcome sent to the waiting producer"),
            Ok(Err(err)) => {
                // ACCESS_REFUSED (a worker user without write on `amq.default`) closes the
                // publishing channel: reconnect now rather than fail the next job's step.
                if !shared.publisher.status().connected() {
                    shared.lost.cancel();
                }
                tracing::warn!(
                    error = %err,
                    "could not send the outcome to the waiting producer (the worker user needs \
                     write on `amq.default`: config/definitions.json)"
                );
            }
            Err(_) => tracing::warn!("sending the outcome to the waiting producer timed out"),
        }
    })
}

/// Ack once the replacement is queued; otherwise hand the delivery back to the broker.
fn settle_after_publish(
    shared: &Shared,
    published: Result<(), PublishError>,
    then: Outcome,
) -> (Settle, Outcome) {
    match published {
        Ok(()) => (Settle::Ack, then),
        Err(err) => {
            if !shared.publisher.status().connected() {
                shared.lost.cancel();
            }
            tracing::error!(error = %err, "could not queue the job's next step; requeueing it for redelivery");
            (Settle::Requeue, Outcome::Requeued)
        }
    }
}

/// The one info line per job outcome, logged in the job's span, which says the queue, job id,
/// kind, attempt and trace context (with `--log-format json` they are fields of the line's
/// object: [`crate::cli`]); the line adds the outcome and the duration. Kept lean: at default
/// logging this line is a third of a job's CPU cost in the worker.
fn log_outcome(outcome: Outcome, started: Instant) {
    tracing::info!(
        outcome = outcome.name(),
        duration_us = started.elapsed().as_micros() as u64,
        "job {}",
        outcome.as_str()
    );
}

/// A short-string property as text ("" when absent).
fn text(value: &Option<lapin::types::ShortString>) -> &str {
    value.as_ref().map_or("", |s| s.as_str())
}

/// A handler's panic, as the retryable failure it counts as.
fn panicked(panic: &(dyn std::any::Any + Send)) -> JobError {
    let message = if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.as_str()
    } else {
        "(non-text panic payload)"
    };
    JobError::retry(format!("handler panicked: {message}"))
}
