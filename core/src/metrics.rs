//! Prometheus metrics of a worker process and of the dispatcher (`warren serve`), on the
//! Prometheus org's client crate (`prometheus-client`), exposed in the Prometheus text format
//! 0.0.4 at `/metrics` ([`crate::probes`]).
//!
//! One [`Metrics`] per process holds every family (registered at once, with its HELP text, so
//! a scrape shows them all from the start). Recording is cheap and never blocks on the
//! network: a counter is an atomic add. On a worker's hot path nothing is looked up per job:
//! each consumed queue gets a [`QueueMetrics`] at start with the handles of every
//! `(queue, kind)` series already made ([`Metrics::worker_queue`]); a job takes its kind's
//! [`KindMetrics`] from an immutable map and counts on clones of the series' atomics.
//!
//! ## Bounded labels
//!
//! Everything that arrives over AMQP or HTTP may be hostile: a producer that sends a million
//! random kinds must not make a million series. So:
//! - on a worker, `queue` is one of the queues it consumes (its configuration) and `kind` one
//!   of the kinds it has a handler for, any other kind counted as `kind="unknown"`;
//! - on the dispatcher (and the HTTP service), the first [`MAX_LABEL_VALUES`] distinct queues
//!   and kinds of *confirmed* jobs get their own series, any later one `"other"`;
//! - `class` is one of the dead-letter classes ([`crate::envelope::DeadReason::class`]),
//!   `connection` one of `consume`, `publish`, `dispatcher`.
//!
//! Metrics are optional everywhere: a worker or dispatcher without a [`Metrics`] records
//! nothing and pays nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s text: Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// On the dispatcher side, how many distinct queues, and kinds, get series of their own; later
/// ones are counted as [`OTHER`].
pub const MAX_LABEL_VALUES: usize = 256;

/// The `kind` of a job whose kind the worker has no handler for (or that is not a job at all).
pub const UNKNOWN_KIND: &str = "unknown";

/// The label value of a queue or kind past [`MAX_LABEL_VALUES`] on the dispatcher side.
pub const OTHER: &str = "other";

/// The dead-letter classes, as in `x-warren-error-class` (see
/// [`crate::envelope::DeadReason::class`]); any other is counted as [`OTHER`].
pub const DEAD_CLASSES: [&str; 5] = [
    "permanent",
    "exhausted",
    "malformed",
    "unknown-kind",
    "delivery-limit",
];

/// Buckets of the job handler's duration, in seconds: 1 ms to 5 min.
const JOB_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Buckets of a submit and of a publisher confirm, in seconds: 0.5 ms to 10 s.
const SUBMIT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Which connection `warren_connected` is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// A worker's consuming connection.
    Consume,
    /// A worker's publishing connection (retries, dead letters).
    Publish,
    /// The dispatcher's connection (`warren serve`).
    Dispatcher,
}

impl Link {
    fn label(self) -> &'static str {
        match self {
            Link::Consume => "consume",
            Link::Publish => "publish",
            Link::Dispatcher => "dispatcher",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueKind {
    queue: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueKindClass {
    queue: String,
    kind: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabel {
    connection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

/// Makes the histograms of a family, with its buckets.
#[derive(Clone)]
struct Buckets(&'static [f64]);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

type Histograms<L> = Family<L, Histogram, Buckets>;

fn histograms<L: Clone + std::hash::Hash + Eq>(buckets: &'static [f64]) -> Histograms<L> {
    Family::new_with_constructor(Buckets(buckets))
}

/// Every metric of one process (see the [module docs](self) and README "Health and metrics").
pub struct Metrics {
    registry: Registry,
    submitted: Family<QueueKind, Counter>,
    started: Family<QueueKind, Counter>,
    succeeded: Family<QueueKind, Counter>,
    retried: Family<QueueKind, Counter>,
    dead_lettered: Family<QueueKindClass, Counter>,
    requeued: Family<QueueKind, Counter>,
    job_duration: Histograms<QueueKind>,
    in_flight: Family<QueueLabel, Gauge>,
    acks_lost: Counter,
    reconnects: Counter,
    connected: Family<ConnectionLabel, Gauge>,
    consumer_cancels: Family<QueueLabel, Counter>,
    submit_duration: Histograms<QueueLabel>,
    confirm_duration: Histograms<QueueLabel>,
    http_requests: Family<RouteStatus, Counter>,
    http_duration: Histograms<RouteLabel>,
    /// The dispatcher side's queues and kinds with series of their own (at most
    /// [`MAX_LABEL_VALUES`] each).
    submit_queues: Bounded,
    submit_kinds: Bounded,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every family (with HELP text).
    pub fn new() -> Arc<Metrics> {
        let metrics = Metrics {
            registry: Registry::default(),
            submitted: Family::default(),
            started: Family::default(),
            succeeded: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            requeued: Family::default(),
            job_duration: histograms(&JOB_BUCKETS),
            in_flight: Family::default(),
            acks_lost: Counter::default(),
            reconnects: Counter::default(),
            connected: Family::default(),
            consumer_cancels: Family::default(),
            submit_duration: histograms(&SUBMIT_BUCKETS),
            confirm_duration: histograms(&SUBMIT_BUCKETS),
            http_requests: Family::default(),
            http_duration: histograms(&SUBMIT_BUCKETS),
            submit_queues: Bounded::default(),
            submit_kinds: Bounded::default(),
        };
        let mut registry = Registry::default();
        let r = &mut registry;
        // Counters are registered without `_total`: the encoder appends it.
        r.register(
            "warren_jobs_submitted",
            "Jobs submitted and confirmed by the broker",
            metrics.submitted.clone(),
        );
        r.register(
            "warren_jobs_started",
            "Handler runs started (one per attempt)",
            metrics.started.clone(),
        );
        r.register(
            "warren_jobs_succeeded",
            "Jobs done, their ack sent",
            metrics.succeeded.clone(),
        );
        r.register(
            "warren_jobs_retried",
            "Failed attempts whose retry was queued (confirmed), then acked",
            metrics.retried.clone(),
        );
        r.register(
            "warren_jobs_dead_lettered",
            "Jobs published to their dead-letter queue (confirmed), then acked, by class",
            metrics.dead_lettered.clone(),
        );
        r.register(
            "warren_jobs_requeued",
            "Deliveries handed back to the broker (settling failed, ack lost, or taken back)",
            metrics.requeued.clone(),
        );
        r.register(
            "warren_job_duration_seconds",
            "How long a handler ran, per attempt",
            metrics.job_duration.clone(),
        );
        r.register(
            "warren_jobs_in_flight",
            "Handlers running now",
            metrics.in_flight.clone(),
        );
        r.register(
            "warren_acks_lost",
            "Acks that could not be sent (the channel was gone): the broker redelivers those jobs",
            metrics.acks_lost.clone(),
        );
        r.register(
            "warren_reconnects",
            "Connections to the broker opened again after one was lost",
            metrics.reconnects.clone(),
        );
        r.register(
            "warren_connected",
            "1 while the connection is open, 0 otherwise",
            metrics.connected.clone(),
        );
        r.register(
            "warren_consumer_cancels",
            "Consumers the broker cancelled or whose channel it closed (each subscribed again)",
            metrics.consumer_cancels.clone(),
        );
        r.register(
            "warren_submit_duration_seconds",
            "A whole submit, from the call to the broker's confirm",
            metrics.submit_duration.clone(),
        );
        r.register(
            "warren_confirm_duration_seconds",
            "From publishing a job to the broker's confirm",
            metrics.confirm_duration.clone(),
        );
        r.register(
            "warren_http_requests",
            "HTTP requests answered, by route and status",
            metrics.http_requests.clone(),
        );
        r.register(
            "warren_http_request_duration_seconds",
            "How long an HTTP request took to answer, by route",
            metrics.http_duration.clone(),
        );
        Arc::new(Metrics {
            registry,
            ..metrics
        })
    }

    /// Every metric in the Prometheus text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// The handles a worker records a consumed `queue`'s jobs on: one set per kind in `kinds`
    /// (the kinds it has handlers for) and one for [`UNKNOWN_KIND`]. Every series is made now,
    /// at zero.
    pub fn worker_queue(&self, queue: &str, kinds: &[&str]) -> QueueMetrics {
        let in_flight = self.in_flight.get_or_create_owned(&QueueLabel {
            queue: queue.to_owned(),
        });
        let make = |kind: &str| {
            let labels = QueueKind {
                queue: queue.to_owned(),
                kind: kind.to_owned(),
            };
            let dead = |class: &str| {
                self.dead_lettered.get_or_create_owned(&QueueKindClass {
                    queue: queue.to_owned(),
                    kind: kind.to_owned(),
                    class: class.to_owned(),
                })
            };
            Arc::new(KindMetrics {
                started: self.started.get_or_create_owned(&labels),
                succeeded: self.succeeded.get_or_create_owned(&labels),
                retried: self.retried.get_or_create_owned(&labels),
                requeued: self.requeued.get_or_create_owned(&labels),
                dead_lettered: DEAD_CLASSES.map(dead),
                dead_other: dead(OTHER),
                duration: self.job_duration.get_or_create_owned(&labels),
                in_flight: in_flight.clone(),
                acks_lost: self.acks_lost.clone(),
            })
        };
        let by_kind = kinds
            .iter()
            .filter(|kind| **kind != UNKNOWN_KIND)
            .map(|kind| (Box::<str>::from(*kind), make(kind)))
            .collect();
        QueueMetrics {
            by_kind,
            unknown: make(UNKNOWN_KIND),
        }
    }

    /// A lost connection was opened again.
    pub fn reconnected(&self) {
        self.reconnects.inc();
    }

    /// Whether `link` is open now.
    pub fn set_connected(&self, link: Link, connected: bool) {
        self.connected
            .get_or_create(&ConnectionLabel {
                connection: link.label().to_owned(),
            })
            .set(i64::from(connected));
    }

    /// The broker ended the consumer of `queue` (one of the worker's queues).
    pub fn consumer_cancelled(&self, queue: &str) {
        self.consumer_cancels
            .get_or_create(&QueueLabel {
                queue: queue.to_owned(),
            })
            .inc();
    }

    /// A job submitted and confirmed: `submit` is the whole call, `confirm` from its publish to
    /// the broker's confirm.
    pub fn submitted(&self, queue: &str, kind: &str, submit: Duration, confirm: Duration) {
        let queue = self.submit_queues.label(queue);
        let kind = self.submit_kinds.label(kind);
        self.submitted
            .get_or_create(&QueueKind {
                queue: queue.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
        let queue = QueueLabel {
            queue: queue.to_owned(),
        };
        self.submit_duration
            .get_or_create(&queue)
            .observe(submit.as_secs_f64());
        self.confirm_duration
            .get_or_create(&queue)
            .observe(confirm.as_secs_f64());
    }

    /// An HTTP request answered. `route` is the matched route's template (bounded by the
    /// router), never the raw path.
    pub fn http_request(&self, route: &str, status: u16, took: Duration) {
        self.http_requests
            .get_or_create(&RouteStatus {
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(took.as_secs_f64());
    }
}

/// The metric handles of one queue a worker consumes: built once at start, read without a lock.
#[derive(Debug, Clone)]
pub struct QueueMetrics {
    by_kind: HashMap<Box<str>, Arc<KindMetrics>>,
    unknown: Arc<KindMetrics>,
}

impl QueueMetrics {
    /// The handles of `kind`, or of [`UNKNOWN_KIND`] if the worker has no handler for it.
    pub fn kind(&self, kind: &str) -> &Arc<KindMetrics> {
        self.by_kind.get(kind).unwrap_or(&self.unknown)
    }
}

/// The series of one `(queue, kind)`: clones of the registered metrics (each an atomic shared
/// with the registry).
#[derive(Debug)]
pub struct KindMetrics {
    started: Counter,
    succeeded: Counter,
    retried: Counter,
    requeued: Counter,
    /// By [`DEAD_CLASSES`] index.
    dead_lettered: [Counter; DEAD_CLASSES.len()],
    dead_other: Counter,
    duration: Histogram,
    in_flight: Gauge,
    acks_lost: Counter,
}

/// One handler run in flight ([`KindMetrics::attempt`]); dropping it ends it.
#[derive(Debug)]
pub struct Attempt<'a> {
    metrics: &'a KindMetrics,
    started: Instant,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
        self.metrics
            .duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

/// How a job's delivery was settled, for [`KindMetrics::settled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled<'a> {
    Succeeded,
    Retried,
    /// With the dead-letter class.
    DeadLettered(&'a str),
    /// Handed back to the broker.
    Requeued,
}

impl KindMetrics {
    /// A handler starts: counts the attempt and one more in flight, until the returned guard
    /// is dropped (the handler returned, or was stopped), which records its duration.
    pub fn attempt(&self) -> Attempt<'_> {
        self.started.inc();
        self.in_flight.inc();
        Attempt {
            metrics: self,
            started: Instant::now(),
        }
    }

    /// The job's delivery was settled (its ack or nack sent, or not: `sent`). An ack that
    /// could not be sent counts as an ack lost and a requeue (the broker redelivers the job).
    pub fn settled(&self, how: Settled<'_>, sent: bool) {
        if !sent {
            self.acks_lost.inc();
            self.requeued.inc();
            return;
        }
        match how {
            Settled::Succeeded => self.succeeded.inc(),
            Settled::Retried => self.retried.inc(),
            Settled::Requeued => self.requeued.inc(),
            Settled::DeadLettered(class) => DEAD_CLASSES
                .iter()
                .position(|c| *c == class)
                .map_or(&self.dead_other, |i| &self.dead_lettered[i])
                .inc(),
        };
    }
}

/// Label values with series of their own: the first [`MAX_LABEL_VALUES`] seen, then
/// [`OTHER`].
#[derive(Default)]
struct Bounded {
    seen: RwLock<HashSet<String>>,
}

impl Bounded {
    fn label<'a>(&self, value: &'a str) -> &'a str {
        let read = |seen: &HashSet<String>| {
            if seen.contains(value) {
                Some(value)
            } else if seen.len() >= MAX_LABEL_VALUES {
                Some(OTHER)
            } else {
                None
            }
        };
        if let Some(label) = read(&self.seen.read().unwrap_or_else(|e| e.into_inner())) {
            return label;
        }
        let mut seen = self.seen.write().unwrap_or_else(|e| e.into_inner());
        if let Some(label) = read(&seen) {
            return label;
        }
        seen.insert(value.to_owned());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, name: &str) -> usize {
        text.lines()
            .filter(|line| line.starts_with(&format!("{name}{{")))
            .count()
    }

    #[test]
    fn every_family_is_exposed_with_help_and_the_shared_names() {
        let metrics = Metrics::new();
        // A family shows once it has a series: a worker makes its jobs' series at start.
        let _ = metrics.worker_queue("q", &["k"]);
        metrics.set_connected(Link::Dispatcher, true);
        metrics.consumer_cancelled("q");
        let ms = Duration::from_millis(1);
        metrics.submitted("q", "k", ms, ms);
        metrics.http_request("/readyz", 200, ms);
        let text = metrics.encode();
        for name in [
            "warren_jobs_submitted_total",
            "warren_jobs_started_total",
            "warren_jobs_succeeded_total",
            "warren_jobs_retried_total",
            "warren_jobs_dead_lettered_total",
            "warren_jobs_requeued_total",
            "warren_job_duration_seconds",
            "warren_jobs_in_flight",
            "warren_acks_lost_total",
            "warren_reconnects_total",
            "warren_connected",
            "warren_consumer_cancels_total",
            "warren_submit_duration_seconds",
            "warren_confirm_duration_seconds",
            "warren_http_requests_total",
            "warren_http_request_duration_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
    }

    #[test]
    fn a_worker_counts_unknown_kinds_as_unknown() {
        let metrics = Metrics::new();
        let queue = metrics.worker_queue("emails", &["send"]);
        for i in 0..1000 {
            let kind = queue.kind(&format!("random-{i}"));
            drop(kind.attempt());
            kind.settled(Settled::DeadLettered("unknown-kind"), true);
        }
        let running = queue.kind("send").attempt();
        let text = metrics.encode();
        assert!(text.contains(
            "warren_jobs_dead_lettered_total{queue=\"emails\",kind=\"unknown\",class=\"unknown-kind\"} 1000"
        ), "{text}");
        assert!(text.contains("warren_jobs_started_total{queue=\"emails\",kind=\"send\"} 1"));
        assert!(text.contains("warren_jobs_in_flight{queue=\"emails\"} 1"));
        assert_eq!(series(&text, "warren_jobs_started_total"), 2, "{text}");
        assert!(!text.contains("random-"));
        drop(running);
        assert!(
            metrics
                .encode()
                .contains("warren_jobs_in_flight{queue=\"emails\"} 0")
        );
    }

    #[test]
    fn the_dispatcher_side_keeps_at_most_256_kinds_and_queues() {
        let metrics = Metrics::new();
        let ms = Duration::from_millis(1);
        for i in 0..10_000 {
            metrics.submitted(&format!("q{}", i % 300), &format!("k{i}"), ms, ms);
        }
        let text = metrics.encode();
        let submitted = series(&text, "warren_jobs_submitted_total");
        assert!(submitted <= (MAX_LABEL_VALUES + 1) * 2, "{submitted}");
        assert!(text.contains("kind=\"other\""));
        assert!(text.contains("queue=\"other\""));
        assert_eq!(
            series(&text, "warren_submit_duration_seconds_count"),
            MAX_LABEL_VALUES + 1
        );
    }
}
