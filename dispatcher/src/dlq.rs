//! The dead-letter workbench: seeing, replaying, purging and exporting the jobs in a work
//! queue's dead-letter queue (`<queue>.dead`) without ever losing one by looking.
//!
//! Every operation is one *pass* over `<queue>.dead` on channels of its own (never the
//! dispatcher's submit channel):
//!
//! 1. `basic.get` without auto-ack, on a few reader channels at once (eight: each get
//!    from a quorum queue waits for a Raft log write, and concurrent gets share them), at most
//!    as many messages as the queue held when the pass began (the first `basic.get-ok` says
//!    how many): jobs that arrive meanwhile (a worker still failing them) are left for the next
//!    pass, so no pass runs forever. A message is looked at and dropped from memory at once:
//!    only its delivery tag is kept, so a queue of any depth is read in constant memory.
//! 2. A message the operation takes is settled on its own: `purge` acks it; `replay`
//!    republishes a copy to the work queue through [`topology::JOBS_EXCHANGE`] (mandatory, with
//!    a publisher confirm) and acks the dead letter only once the broker confirmed the copy.
//! 3. Everything else stays unacknowledged until the end of the pass and is handed back with a
//!    single `basic.nack` (`multiple`, `requeue`) per reader; the channels then close.
//!
//! A nack, unlike a reject or a closed channel, does not count towards a quorum queue's
//! delivery limit on RabbitMQ 4.x; on 3.10 every return counts, and `<queue>.dead` is declared
//! with a limit that reading never reaches ([`topology::READ_SAFE_DELIVERY_LIMIT`]), so a
//! pass that dies (killed process, lost connection: the broker hands back what it held) loses
//! nothing either. An interrupted replay can leave a job both in the work queue (confirmed)
//! and in `<queue>.dead` (not yet acked): it duplicates at worst, never loses.
//!
//! What a replayed copy carries is chosen by [`envelope::replay_properties`]: the job's id,
//! kind, properties and allow-listed headers, a fresh attempt count and the replay marker
//! ([`envelope::REPLAYED`], [`envelope::REPLAYED_AT`]); never the failure headers, `x-death`
//! or the broker's delivery counts.
//!
//! Unacknowledged deliveries are subject to the broker's consumer timeout (30 min by
//! default): a pass slower than that (`replay --rate` over a deep queue) is cut off by the
//! broker, which hands its messages back.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{FuturesOrdered, FuturesUnordered};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use serde::Serialize;
use serde_json::{Map, Value};
use warren_core::envelope::{self, Job};
use warren_core::publish::{self, PublishError};
use warren_core::topology;

use crate::{Dispatcher, LinkError, is_not_found};

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
    #[error(
        "queue `{dead}` does not exist on the broker (is `{work}` a Warren work queue? \
         `warren topology apply --queue {work}` declares it)"
    )]
    NoQueue { dead: String, work: String },
    #[error(
        "`{given}` is a dead-letter queue: name its work queue, `{work}` (its dead letters are \
         read from `{given}`)"
    )]
    DeadName { given: String, work: String },
    #[error("reading queue `{queue}`: no answer within {timeout:?}")]
    Timeout { queue: String, timeout: Duration },
    #[error("settling a message of `{queue}`: {source}")]
    Settle {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "work queue `{0}` does not exist on the broker, so its dead letters cannot go back \
         (run `warren topology apply --queue {0}`)"
    )]
    UnknownQueue(String),
    #[error(
        "exchange `{}` does not exist on the broker: Warren's topology was never declared here \
         (run `warren topology apply`)",
        topology::JOBS_EXCHANGE
    )]
    NoTopology,
    #[error("replaying to `{queue}`: {source}")]
    Publish {
        queue: String,
        #[source]
        source: PublishError,
    },
    #[error("writing the export: {0}")]
    Write(#[source] std::io::Error),
    #[error("invalid option: {0}")]
    Invalid(&'static str),
    /// A replay stopped part-way: `summary` says what it did before; every job not moved is
    /// still in the dead-letter queue (a job both moved and still there runs twice, at worst).
    #[error(
        "replay stopped after moving {} job(s); the others are still in the dead-letter queue: \
         {source}",
        summary.moved
    )]
    Interrupted {
        summary: Box<ReplaySummary>,
        #[source]
        source: Box<DlqError>,
    },
}

/// Which dead letters an operation takes. Every condition set must hold; an empty filter
/// takes them all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only these job ids (`message_id`); empty: any.
    pub ids: Vec<String>,
    /// Only this kind (the `type` property).
    pub kind: Option<String>,
    /// Only this class ([`DeadRecord::class`]: `permanent`, `exhausted`, `malformed`,
    /// `unknown-kind`, `delivery-limit`, ...).
    pub class: Option<String>,
    /// Only dead letters that failed before this time ([`DeadRecord::failed_at`]); one whose
    /// failure time is unknown does not match.
    pub failed_before: Option<SystemTime>,
}

impl Filter {
    /// True when `record` is taken.
    pub fn matches(&self, record: &DeadRecord) -> bool {
        let id_ok = self.ids.is_empty()
            || record
                .id
                .as_ref()
                .is_some_and(|id| self.ids.iter().any(|want| want == id));
        let kind_ok = self.kind.is_none() || record.kind == self.kind;
        let class_ok = self.class.is_none() || record.class == self.class;
        let age_ok = match self.failed_before {
            None => true,
            Some(before) => record.failed_at_time().is_some_and(|at| at < before),
        };
        id_ok && kind_ok && class_ok && age_ok
    }
}

/// One dead letter, summed up: what `warren dlq list` shows. Every text comes from the
/// message, which anyone could have published: print it escaped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadRecord {
    /// The job id (`message_id`).
    pub id: Option<String>,
    /// The job kind (`type`).
    pub kind: Option<String>,
    /// Attempts made ([`envelope::ATTEMPTS`]; for a job the broker dead-lettered, the attempt
    /// it was on, [`envelope::ATTEMPT`]).
    pub attempts: Option<i64>,
    /// Which kind of failure: [`envelope::ERROR_CLASS`] for a job a worker gave up on; for one
    /// the broker dead-lettered (it carries `x-death`), its reason (`delivery-limit`,
    /// `expired`, `rejected`, `maxlen`).
    pub class: Option<String>,
    /// Why, in words ([`envelope::ERROR`], or the broker's reason and queue).
    pub reason: Option<String>,
    /// When it failed for good (RFC 3339): [`envelope::FAILED_AT`], or the time in `x-death`.
    pub failed_at: Option<String>,
    /// The first [`PREVIEW_CHARS`] characters of the payload (lossy UTF-8).
    pub payload_preview: String,
    /// The payload's size in bytes.
    pub payload_bytes: usize,
    /// How many times it was replayed before ([`envelope::REPLAYED`]).
    pub replayed: Option<i64>,
}

/// Characters of the payload a [`DeadRecord`] shows.
pub const PREVIEW_CHARS: usize = 80;
/// The longest class or time text a [`DeadRecord`] takes from a header.
const MAX_SHORT_TEXT: usize = 64;
/// At most this many examples of jobs not taken are kept in a summary.
pub const MAX_EXAMPLES: usize = 100;

impl DeadRecord {
    /// Reads the summary of a delivered dead letter; never fails (missing or malformed parts
    /// are `None`).
    pub fn read(properties: &BasicProperties, body: &[u8]) -> DeadRecord {
        let headers = properties.headers().as_ref();
        let death = headers.and_then(latest_death);
        let text = |v: &Option<ShortString>| v.as_ref().map(|s| s.as_str().to_owned());
        let header_text = |key: &str, limit: usize| {
            envelope::header_str(properties, key).map(|s| envelope::capped(&s, limit).into_owned())
        };
        let (class, reason, failed_at, attempts) = match death {
            Some(death) => broker_death(headers, death),
            None => (
                header_text(envelope::ERROR_CLASS, MAX_SHORT_TEXT),
                header_text(envelope::ERROR, envelope::MAX_ERROR_BYTES),
                header_text(envelope::FAILED_AT, MAX_SHORT_TEXT),
                envelope::header_int(properties, envelope::ATTEMPTS)
                    .or_else(|| envelope::header_int(properties, envelope::ATTEMPT)),
            ),
        };
        DeadRecord {
            id: text(properties.message_id()),
            kind: text(properties.kind()),
            attempts,
            class,
            reason,
            failed_at,
            payload_preview: preview(body),
            payload_bytes: body.len(),
            replayed: envelope::header_int(properties, envelope::REPLAYED),
        }
    }

    /// [`DeadRecord::failed_at`] as a time, if it is RFC 3339.
    pub fn failed_at_time(&self) -> Option<SystemTime> {
        humantime::parse_rfc3339_weak(self.failed_at.as_deref()?).ok()
    }
}

/// A whole dead letter: what `warren dlq show` prints. Header values become JSON: strings,
/// numbers, booleans, arrays, objects; a timestamp as RFC 3339 text, a byte array as
/// `{"bytes_hex": ...}`, a decimal as `{"decimal": ...}`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadJob {
    #[serde(flatten)]
    pub record: DeadRecord,
    /// Every AMQP property the message has (`message_id`, `type`, `content_type`, ...).
    pub properties: Map<String, Value>,
    /// Every header, as the broker delivered it (`x-death` included).
    pub headers: Map<String, Value>,
    /// The payload, when it is JSON.
    pub payload: Option<Value>,
    /// The payload as (lossy UTF-8) text, when it is not JSON.
    pub payload_text: Option<String>,
    /// Whether the broker delivered it before (to an earlier reader).
    pub redelivered: bool,
}

impl DeadJob {
    fn read(delivery: &Delivery) -> DeadJob {
        let props = &delivery.properties;
        let (payload, payload_text) = match serde_json::from_slice::<Value>(&delivery.data) {
            Ok(value) => (Some(value), None),
            Err(_) => (
                None,
                Some(String::from_utf8_lossy(&delivery.data).into_owned()),
            ),
        };
        let headers = props
            .headers()
            .as_ref()
            .map(|table| table_json(table, 0))
            .unwrap_or_default();
        DeadJob {
            record: DeadRecord::read(props, &delivery.data),
            properties: properties_json(props),
            headers,
            payload,
            payload_text,
            redelivered: delivery.redelivered,
        }
    }
}

/// How far a pass got, for a progress bar.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Progress {
    /// Dead letters read so far.
    pub read: u64,
    /// The most this pass reads: the queue's depth when it began (0 until known).
    pub total: u64,
    /// Dead letters taken so far (moved by a replay, deleted by a purge).
    pub taken: u64,
}

/// Jobs an operation selected but did not take, with why: a count and the first
/// [`MAX_EXAMPLES`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct NotTaken {
    pub count: u64,
    pub examples: Vec<NotTakenJob>,
}

/// One job not taken.
#[derive(Debug, Clone, Serialize)]
pub struct NotTakenJob {
    pub id: Option<String>,
    pub reason: String,
}

impl NotTaken {
    fn add(&mut self, id: Option<String>, reason: impl Into<String>) {
        self.count += 1;
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(NotTakenJob {
                id,
                reason: reason.into(),
            });
        }
    }
}

/// What `list` saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ListSummary {
    /// Records handed to the caller.
    pub listed: u64,
    /// Dead letters read.
    pub read: u64,
    /// The queue's depth when the pass began.
    pub total: u64,
}

/// What a [`replay`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    /// Jobs republished to the work queue (confirmed) and removed from the dead-letter queue.
    pub moved: u64,
    /// Dead letters left in the dead-letter queue as this pass saw it: those it handed back
    /// and those it did not read.
    pub remaining: u64,
    /// Selected but not replayable (not a job a worker can run: no id or kind, not JSON, ...);
    /// left in the dead-letter queue.
    pub skipped: NotTaken,
    /// Selected, but the broker refused the copy; left in the dead-letter queue.
    pub failed: NotTaken,
}

/// What a [`purge`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PurgeSummary {
    /// Dead letters deleted.
    pub deleted: u64,
    /// Dead letters left, as this pass saw them.
    pub remaining: u64,
    /// Kept because the filter has an age and their failure time is unknown.
    pub undated: u64,
}

/// What an [`export`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportSummary {
    /// Lines written.
    pub exported: u64,
    /// Dead letters that cannot be a `warren submit --file` line (no kind, payload not JSON).
    pub skipped: NotTaken,
}

/// Which dead letters [`replay`] moves, and how fast.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    pub filter: Filter,
    /// At most this many jobs; `None`: every one that matches.
    pub limit: Option<u64>,
    /// At most this many jobs per second; `None`: as fast as confirms come.
    pub rate: Option<f64>,
}

/// Lists dead letters of work queue `queue` (read from `<queue>.dead`), calling `each` with
/// every one that `filter` takes, up to `limit`; leaves the queue as it was.
pub async fn list(
    dispatcher: &Dispatcher,
    queue: &str,
    filter: &Filter,
    limit: Option<u64>,
    mut each: impl FnMut(DeadRecord),
) -> Result<ListSummary, DlqError> {
    let mut pass = Pass::open(dispatcher, queue, false).await?;
    let mut listed = 0;
    let result = async {
        while limit.is_none_or(|limit| listed < limit) {
            let Some((_, delivery)) = pass.next().await? else {
                break;
            };
            let record = DeadRecord::read(&delivery.properties, &delivery.data);
            if filter.matches(&record) {
                listed += 1;
                each(record);
            }
        }
        Ok(())
    }
    .await;
    let summary = ListSummary {
        listed,
        read: pass.read,
        total: pass.total(),
    };
    pass.finish().await;
    result.map(|()| summary)
}

/// The whole dead letter of work queue `queue` whose job id is `id` (the first one, if the
/// queue holds it twice); `None` when there is none. Leaves the queue as it was.
pub async fn show(
    dispatcher: &Dispatcher,
    queue: &str,
    id: &str,
) -> Result<Option<DeadJob>, DlqError> {
    let mut pass = Pass::open(dispatcher, queue, false).await?;
    let result = async {
        while let Some((_, delivery)) = pass.next().await? {
            if delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str())
                == Some(id)
            {
                return Ok(Some(DeadJob::read(&delivery)));
            }
        }
        Ok(None)
    }
    .await;
    pass.finish().await;
    result
}

/// The replay rates [`replay`] takes, in jobs per second: slower than one job in 100 s is
/// not a rate but a stop, and faster than a million is no limit at all.
pub const REPLAY_RATES: std::ops::RangeInclusive<f64> = 0.01..=1_000_000.0;

/// Whether `rate` (jobs per second) is one [`replay`] takes ([`REPLAY_RATES`]); NaN and
/// infinities are not.
pub fn check_rate(rate: f64) -> Result<(), DlqError> {
    if REPLAY_RATES.contains(&rate) {
        Ok(())
    } else {
        Err(DlqError::Invalid(
            "the replay rate must be from 0.01 to 1000000 jobs per second",
        ))
    }
}

/// Sends the dead letters of work queue `queue` that `options` select back to `queue`, each
/// through [`topology::JOBS_EXCHANGE`] (mandatory, confirmed) with a fresh attempt count and
/// the replay marker ([`envelope::replay_properties`]); each dead letter is removed only once
/// its copy is confirmed. Up to `dispatcher.max_in_flight` copies wait for their confirm at
/// once. `progress` is called as the pass goes.
///
/// A message that no worker could run (no id or kind, a content type other than JSON, a
/// payload that is not JSON or is over `jobs.max_payload_bytes`) is not sent: it stays, and
/// is counted in [`ReplaySummary::skipped`]. A copy the broker refuses (nack) stays too
/// ([`ReplaySummary::failed`]). A missing work queue or exchange, a lost connection or a
/// confirm that never comes stops the replay: [`DlqError::Interrupted`] says how far it got.
pub async fn replay(
    dispatcher: &Dispatcher,
    queue: &str,
    options: &ReplayOptions,
    mut progress: impl FnMut(&Progress),
) -> Result<ReplaySummary, DlqError> {
    if let Some(rate) = options.rate {
        check_rate(rate)?;
    }
    let routing_key = topology::short(queue)?;
    let mut pass = Pass::open(dispatcher, queue, true).await?;
    let mut replay = Replay {
        queue,
        routing_key,
        options,
        max_payload: dispatcher.config().jobs.max_payload_bytes,
        window: dispatcher.config().dispatcher.max_in_flight.max(1),
        timeout: dispatcher.config().broker.operation_timeout,
        summary: ReplaySummary::default(),
        sent: 0,
    };
    let result = replay.run(&mut pass, &mut progress).await;
    let mut summary = replay.summary;
    summary.remaining = pass.remaining();
    let read = pass.read;
    pass.finish().await;
    match result {
        Ok(()) => Ok(summary),
        // Stopped before anything was read: nothing to tell but the error.
        Err(source) if read == 0 => Err(source),
        Err(source) => Err(DlqError::Interrupted {
            summary: Box::new(summary),
            source: Box::new(source),
        }),
    }
}

/// Deletes the dead letters of work queue `queue` that `filter` takes (acks them); hands the
/// others back.
pub async fn purge(
    dispatcher: &Dispatcher,
    queue: &str,
    filter: &Filter,
    mut progress: impl FnMut(&Progress),
) -> Result<PurgeSummary, DlqError> {
    let mut pass = Pass::open(dispatcher, queue, false).await?;
    let mut summary = PurgeSummary::default();
    let ageless = Filter {
        failed_before: None,
        ..filter.clone()
    };
    let result = async {
        while let Some((ticket, delivery)) = pass.next().await? {
            let record = DeadRecord::read(&delivery.properties, &delivery.data);
            if filter.matches(&record) {
                pass.ack(ticket).await?;
                summary.deleted += 1;
            } else if filter.failed_before.is_some()
                && record.failed_at_time().is_none()
                && ageless.matches(&record)
            {
                summary.undated += 1;
            }
            progress(&pass.progress(summary.deleted));
        }
        Ok(())
    }
    .await;
    summary.remaining = pass.remaining();
    pass.finish().await;
    result.map(|()| summary)
}

/// One line of an export: what `warren submit --file` reads.
#[derive(Debug, Serialize)]
struct ExportLine<'a> {
    kind: &'a str,
    payload: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
}

/// Writes the dead letters of work queue `queue` that `filter` takes to `out`, one JSON line
/// each, `{"kind": .., "payload": .., "id": ..}`: the format `warren submit --file` reads.
/// A dead letter with no kind or a payload that is not JSON cannot be such a line: it is
/// counted in [`ExportSummary::skipped`] with its id. Leaves the queue as it was.
pub async fn export(
    dispatcher: &Dispatcher,
    queue: &str,
    filter: &Filter,
    out: &mut impl std::io::Write,
) -> Result<ExportSummary, DlqError> {
    let mut pass = Pass::open(dispatcher, queue, false).await?;
    let mut summary = ExportSummary::default();
    let result = async {
        while let Some((_, delivery)) = pass.next().await? {
            let props = &delivery.properties;
            let record = DeadRecord::read(props, &delivery.data);
            if !filter.matches(&record) {
                continue;
            }
            let Some(kind) = props.kind().as_ref().filter(|k| !k.as_str().is_empty()) else {
                summary
                    .skipped
                    .add(record.id, "no type property (the job kind)");
                continue;
            };
            let Ok(payload) = serde_json::from_slice::<Value>(&delivery.data) else {
                summary.skipped.add(record.id, "payload is not valid JSON");
                continue;
            };
            let line = ExportLine {
                kind: kind.as_str(),
                payload,
                id: props.message_id().as_ref().map(|id| id.as_str()),
            };
            serde_json::to_writer(&mut *out, &line).map_err(|err| DlqError::Write(err.into()))?;
            out.write_all(b"\n").map_err(DlqError::Write)?;
            summary.exported += 1;
        }
        out.flush().map_err(DlqError::Write)
    }
    .await;
    pass.finish().await;
    result.map(|()| summary)
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

/// Channels a pass reads with at once. A `basic.get` from a quorum queue is a command in the
/// queue's Raft log, written to disk before the answer: one reader waits for every write in
/// turn, several share them (10,000 dead letters: 41 s with one reader, 17 s with eight, on a
/// loaded two-core machine).
const READERS: usize = 8;

/// Where a message read by a pass came from: its reader channel and delivery tag.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    reader: usize,
    tag: u64,
}

/// A `basic.get` in flight on one reader, and its answer.
type Got = (
    usize,
    Result<Option<lapin::message::BasicGetMessage>, DlqError>,
);

/// One pass over a dead-letter queue, on channels of its own (see the module docs).
struct Pass {
    /// The reader channels (`basic.get`).
    readers: Vec<Channel>,
    /// In confirm mode, for a pass that publishes (replay).
    publisher: Option<Channel>,
    /// `<queue>.dead`.
    dead: ShortString,
    /// `<queue>`.
    work: String,
    timeout: Duration,
    /// The most messages this pass reads: the depth when it began (from the first
    /// `basic.get-ok`); `None` before the first read.
    bound: Option<u64>,
    /// `basic.get`s sent so far (answered or not).
    asked: u64,
    /// A `basic.get` came back empty: ask no more.
    empty: bool,
    /// Messages read so far.
    read: u64,
    /// `basic.get`s in flight: at most one per reader, so at most [`READERS`] messages are
    /// held in memory.
    gets: FuturesUnordered<futures::future::BoxFuture<'static, Got>>,
    /// Readers with no `basic.get` in flight.
    idle: Vec<usize>,
    /// Per reader, the delivery tags read and not acked: handed back by [`Pass::finish`].
    /// Tags only, never the messages.
    unsettled: Vec<BTreeSet<u64>>,
}

impl Pass {
    /// Opens the reader channels (and a confirm-mode channel if the pass publishes) for work
    /// queue `queue`'s dead letters.
    async fn open(dispatcher: &Dispatcher, queue: &str, confirms: bool) -> Result<Pass, DlqError> {
        if let Some(work) = queue.strip_suffix(topology::DEAD_SUFFIX)
            && topology::validate_queue_name(work).is_ok()
        {
            return Err(DlqError::DeadName {
                given: queue.to_owned(),
                work: work.to_owned(),
            });
        }
        topology::validate_queue_name(queue)?;
        let dead = topology::short(&topology::dead_queue(queue))?;
        let timeout = dispatcher.config().broker.operation_timeout;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(dispatcher.open_channel().await?);
        }
        let publisher = if confirms {
            let channel = dispatcher.open_channel().await?;
            tokio::time::timeout(
                timeout,
                channel.confirm_select(ConfirmSelectOptions::default()),
            )
            .await
            .map_err(|_| DlqError::Timeout {
                queue: dead.to_string(),
                timeout,
            })?
            .map_err(|source| DlqError::Read {
                queue: dead.to_string(),
                source,
            })?;
            Some(channel)
        } else {
            None
        };
        Ok(Pass {
            readers,
            publisher,
            dead,
            work: queue.to_owned(),
            timeout,
            bound: None,
            asked: 0,
            empty: false,
            read: 0,
            gets: FuturesUnordered::new(),
            idle: (0..READERS).rev().collect(),
            unsettled: vec![BTreeSet::new(); READERS],
        })
    }

    /// The next message, or `None` once the queue is empty or the pass has read as many
    /// messages as the queue held when it began. Messages come in about the queue's order
    /// (the readers' answers interleave).
    async fn next(&mut self) -> Result<Option<(Ticket, Delivery)>, DlqError> {
        loop {
            self.ask();
            let Some((reader, got)) = self.gets.next().await else {
                return Ok(None);
            };
            self.idle.push(reader);
            let Some(message) = got? else {
                self.empty = true;
                continue;
            };
            let tag = message.delivery.delivery_tag;
            self.unsettled[reader].insert(tag);
            self.read += 1;
            if self.bound.is_none() {
                self.bound = Some(self.read + u64::from(message.message_count));
            }
            return Ok(Some((Ticket { reader, tag }, message.delivery)));
        }
    }

    /// Sends `basic.get`s on the idle readers, as many as the bound allows (only one until
    /// the first answer says the depth).
    fn ask(&mut self) {
        let limit = match self.bound {
            None => 1,
            Some(_) => READERS,
        };
        while !self.empty
            && self.gets.len() < limit
            && self.bound.is_none_or(|bound| self.asked < bound)
        {
            let Some(reader) = self.idle.pop() else {
                break;
            };
            let channel = self.readers[reader].clone();
            let (queue, work, timeout) = (self.dead.clone(), self.work.clone(), self.timeout);
            self.asked += 1;
            self.gets.push(Box::pin(async move {
                let get = channel.basic_get(queue.clone(), BasicGetOptions { no_ack: false });
                let got = match tokio::time::timeout(timeout, get).await {
                    Err(_) => Err(DlqError::Timeout {
                        queue: queue.to_string(),
                        timeout,
                    }),
                    Ok(Err(source)) if is_not_found(&source) => Err(DlqError::NoQueue {
                        dead: queue.to_string(),
                        work,
                    }),
                    Ok(Err(source)) => Err(DlqError::Read {
                        queue: queue.to_string(),
                        source,
                    }),
                    Ok(Ok(got)) => Ok(got),
                };
                (reader, got)
            }));
        }
    }

    /// Removes a message read by this pass from the queue.
    async fn ack(&mut self, ticket: Ticket) -> Result<(), DlqError> {
        self.readers[ticket.reader]
            .basic_ack(ticket.tag, BasicAckOptions { multiple: false })
            .await
            .map_err(|source| DlqError::Settle {
                queue: self.dead.to_string(),
                source,
            })?;
        self.unsettled[ticket.reader].remove(&ticket.tag);
        Ok(())
    }

    /// The queue's depth when the pass began, as far as known.
    fn total(&self) -> u64 {
        self.bound.unwrap_or(self.read)
    }

    /// Messages left in the queue as this pass saw it: handed back, or never read.
    fn remaining(&self) -> u64 {
        let held: usize = self.unsettled.iter().map(BTreeSet::len).sum();
        held as u64 + self.total().saturating_sub(self.read)
    }

    fn progress(&self, taken: u64) -> Progress {
        Progress {
            read: self.read,
            total: self.total(),
            taken,
        }
    }

    /// Waits for the `basic.get`s still in flight, then hands back every message not acked
    /// (one `basic.nack` per reader, multiple, requeue: not counted as a delivery on 4.x) and
    /// closes the channels. If a nack cannot be sent, the closing channel hands its messages
    /// back all the same.
    async fn finish(mut self) {
        self.empty = true;
        while let Some((reader, got)) = self.gets.next().await {
            if let Ok(Some(message)) = got {
                self.unsettled[reader].insert(message.delivery.delivery_tag);
            }
        }
        let requeue_all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        for (channel, unsettled) in self.readers.iter().zip(&self.unsettled) {
            if let Some(&last) = unsettled.last() {
                let _ = channel.basic_nack(last, requeue_all).await;
            }
        }
        let closing = self
            .readers
            .iter()
            .chain(self.publisher.iter())
            .map(|channel| channel.close(200, "dead-letter pass done".into()));
        let _ = tokio::time::timeout(self.timeout, futures::future::join_all(closing)).await;
    }
}

/// A replay in progress.
struct Replay<'a> {
    queue: &'a str,
    routing_key: ShortString,
    options: &'a ReplayOptions,
    max_payload: usize,
    /// Copies waiting for their confirm at once, at most.
    window: usize,
    timeout: Duration,
    summary: ReplaySummary,
    /// Copies sent so far (confirmed or not).
    sent: u64,
}

/// A copy sent and waiting for its confirm: the dead letter's delivery tag, its job id, and
/// the broker's answer.
type InFlight = (Ticket, Option<String>, Result<(), PublishError>);

impl Replay<'_> {
    async fn run(
        &mut self,
        pass: &mut Pass,
        progress: &mut impl FnMut(&Progress),
    ) -> Result<(), DlqError> {
        let started = Instant::now();
        let Some(publisher) = pass.publisher.clone() else {
            return Err(DlqError::Invalid("a replay needs a confirm-mode channel"));
        };
        let mut in_flight = FuturesOrdered::new();
        let result = async {
            while self.options.limit.is_none_or(|limit| self.sent < limit) {
                let Some((ticket, delivery)) = pass.next().await? else {
                    break;
                };
                let record = DeadRecord::read(&delivery.properties, &delivery.data);
                if !self.options.filter.matches(&record) {
                    progress(&pass.progress(self.summary.moved));
                    continue;
                }
                if let Err(reason) = runnable(&delivery, self.max_payload) {
                    self.summary.skipped.add(record.id, reason);
                    progress(&pass.progress(self.summary.moved));
                    continue;
                }
                if let Some(rate) = self.options.rate {
                    let due = started + Duration::from_secs_f64(self.sent as f64 / rate);
                    let wait = tokio::time::sleep_until(due.into());
                    tokio::pin!(wait);
                    // Confirms that arrive while waiting are settled at once.
                    loop {
                        tokio::select! {
                            () = &mut wait => break,
                            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                                self.settle(pass, done).await?;
                                progress(&pass.progress(self.summary.moved));
                            }
                        }
                    }
                }
                let properties =
                    envelope::replay_properties(&delivery.properties, SystemTime::now());
                let send = publish::send(
                    &publisher,
                    topology::JOBS_EXCHANGE,
                    self.routing_key.clone(),
                    &delivery.data,
                    properties,
                );
                let pending = tokio::time::timeout(self.timeout, send)
                    .await
                    .map_err(|_| self.publish_error(PublishError::Timeout(self.timeout)))?
                    .map_err(|err| self.publish_error(err))?;
                self.sent += 1;
                let timeout = self.timeout;
                in_flight.push_back(async move {
                    (ticket, record.id, pending.confirmed(timeout).await)
                });
                while in_flight.len() >= self.window {
                    if let Some(done) = in_flight.next().await {
                        self.settle(pass, done).await?;
                    }
                    progress(&pass.progress(self.summary.moved));
                }
                // Each dead letter is removed as soon as its copy is confirmed, not at the end
                // of the pass: a replay that dies leaves behind only what was in flight.
                while let Some(Some(done)) = in_flight.next().now_or_never() {
                    self.settle(pass, done).await?;
                    progress(&pass.progress(self.summary.moved));
                }
            }
            Ok(())
        }
        .await;
        // Confirms still due are awaited even after an error, so that every copy the broker
        // took is acked (its dead letter removed) rather than left to run twice.
        while let Some(done) = in_flight.next().await {
            if let Err(err) = self.settle(pass, done).await
                && result.is_ok()
            {
                return Err(err);
            }
            progress(&pass.progress(self.summary.moved));
        }
        result
    }

    /// Acks the dead letter whose copy the broker confirmed; keeps one it refused.
    async fn settle(&mut self, pass: &mut Pass, done: InFlight) -> Result<(), DlqError> {
        let (ticket, id, answer) = done;
        match answer {
            Ok(()) => {
                pass.ack(ticket).await?;
                self.summary.moved += 1;
                Ok(())
            }
            Err(PublishError::Nacked { .. }) => {
                self.summary
                    .failed
                    .add(id, "the broker refused the copy (nack)");
                Ok(())
            }
            Err(err) => Err(self.publish_error(err)),
        }
    }

    fn publish_error(&self, err: PublishError) -> DlqError {
        match err {
            PublishError::Unroutable { .. } => DlqError::UnknownQueue(self.queue.to_owned()),
            PublishError::Channel(err) if is_not_found(&err) => DlqError::NoTopology,
            source => DlqError::Publish {
                queue: self.queue.to_owned(),
                source,
            },
        }
    }
}

/// Whether a worker could run this dead letter if it went back: `Err` says why not.
fn runnable(delivery: &Delivery, max_payload: usize) -> Result<(), String> {
    Job::decode(&delivery.properties, &[], max_payload)
        .map_err(|err| format!("not a job a worker can run: {err}"))?;
    if delivery.data.len() > max_payload {
        return Err(format!(
            "payload is {} bytes, over the limit of {max_payload} (jobs.max_payload_bytes)",
            delivery.data.len()
        ));
    }
    envelope::check_json(&delivery.data).map_err(|err| err.to_string())
}

/// The most recent entry of `x-death`, if the broker dead-lettered the message.
/// Borrowed, never cloned: a hostile table can be nested thousands deep, and a clone recurses.
fn latest_death(headers: &FieldTable) -> Option<&FieldTable> {
    match headers.inner().get("x-death")? {
        AMQPValue::FieldArray(deaths) => match deaths.as_slice().first()? {
            AMQPValue::FieldTable(death) => Some(death),
            _ => None,
        },
        _ => None,
    }
}

/// Class, reason, failure time and attempts of a message the broker dead-lettered (from its
/// latest `x-death` entry). The `x-warren-*` headers of such a message are its producer's,
/// not a worker's: they are not believed.
fn broker_death(
    headers: Option<&FieldTable>,
    death: &FieldTable,
) -> (Option<String>, Option<String>, Option<String>, Option<i64>) {
    let field = |key: &str| match death.inner().get(key) {
        Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
        _ => None,
    };
    let raw = field("reason").unwrap_or_else(|| "unknown".to_owned());
    let reason_short = envelope::capped(&raw, MAX_SHORT_TEXT).into_owned();
    let class = reason_short.replace('_', "-");
    let from = field("queue").map_or_else(String::new, |q| {
        format!(" in queue `{}`", envelope::capped(&q, 255))
    });
    let reason = match raw.as_str() {
        "delivery_limit" => format!(
            "dead-lettered by RabbitMQ{from}: delivered more than its delivery limit without \
             being settled (its worker crashed, was killed or timed out each time)"
        ),
        "expired" => format!("dead-lettered by RabbitMQ{from}: its message TTL expired"),
        "rejected" => {
            format!("dead-lettered by RabbitMQ{from}: rejected or nacked without requeue")
        }
        "maxlen" => format!("dead-lettered by RabbitMQ{from}: the queue was full"),
        _ => format!("dead-lettered by RabbitMQ{from}: {reason_short}"),
    };
    let failed_at = match death.inner().get("time") {
        Some(AMQPValue::Timestamp(seconds)) => Some(
            humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_secs(*seconds),
            )
            .to_string(),
        ),
        _ => None,
    };
    // The broker's delivery counts on a message read from `<queue>.dead` count the reads of
    // the dead-letter queue, not the work queue's deliveries: only Warren's attempt number says
    // something (absent: the first attempt never ended).
    let attempts = headers
        .and_then(|h| h.inner().get(envelope::ATTEMPT))
        .and_then(envelope::integer);
    (Some(class), Some(reason), failed_at, attempts)
}

/// The first [`PREVIEW_CHARS`] characters of `body`, lossy UTF-8, with `…` if cut.
fn preview(body: &[u8]) -> String {
    // Four bytes per character at most: no need to decode more.
    let head = &body[..body.len().min(PREVIEW_CHARS * 4)];
    let text = String::from_utf8_lossy(head);
    let mut chars = text.chars();
    let mut shown: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() || head.len() < body.len() {
        shown.push('…');
    }
    shown
}

/// Every property a message has, as JSON.
fn properties_json(props: &BasicProperties) -> Map<String, Value> {
    let mut map = Map::new();
    let mut text = |key: &str, value: &Option<ShortString>| {
        if let Some(v) = value {
            map.insert(key.to_owned(), Value::String(v.as_str().to_owned()));
        }
    };
    text("content_type", props.content_type());
    text("content_encoding", props.content_encoding());
    text("correlation_id", props.correlation_id());
    text("reply_to", props.reply_to());
    text("expiration", props.expiration());
    text("message_id", props.message_id());
    text("type", props.kind());
    text("user_id", props.user_id());
    text("app_id", props.app_id());
    text("cluster_id", props.cluster_id());
    if let Some(mode) = props.delivery_mode() {
        map.insert("delivery_mode".into(), Value::from(*mode));
    }
    if let Some(priority) = props.priority() {
        map.insert("priority".into(), Value::from(*priority));
    }
    if let Some(seconds) = props.timestamp() {
        map.insert("timestamp".into(), timestamp_json(*seconds));
    }
    map
}

/// Nesting deeper than this is shown as a note: a hostile header cannot exhaust the stack.
const MAX_DEPTH: usize = 16;

fn table_json(table: &FieldTable, depth: usize) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), amqp_json(value, depth + 1)))
        .collect()
}

/// An AMQP field value as JSON.
fn amqp_json(value: &AMQPValue, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::String(format!(
            "(nested deeper than {MAX_DEPTH} levels: not shown)"
        ));
    }
    match value {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::Float(f) => float_json(f64::from(*f)),
        AMQPValue::Double(f) => float_json(*f),
        AMQPValue::DecimalValue(d) => {
            serde_json::json!({ "decimal": { "scale": d.scale, "value": d.value } })
        }
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::FieldArray(items) => Value::Array(
            items
                .as_slice()
                .iter()
                .map(|v| amqp_json(v, depth + 1))
                .collect(),
        ),
        AMQPValue::Timestamp(seconds) => timestamp_json(*seconds),
        AMQPValue::FieldTable(table) => Value::Object(table_json(table, depth)),
        AMQPValue::ByteArray(bytes) => {
            let hex: String = bytes
                .as_slice()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            serde_json::json!({ "bytes_hex": hex })
        }
        AMQPValue::Void => Value::Null,
        other => envelope::integer(other).map_or(Value::Null, Value::from),
    }
}

fn float_json(f: f64) -> Value {
    serde_json::Number::from_f64(f).map_or_else(|| Value::String(f.to_string()), Value::Number)
}

/// An AMQP timestamp (seconds since the epoch) as RFC 3339 text.
fn timestamp_json(seconds: u64) -> Value {
    let at = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(seconds));
    match at {
        Some(at) if seconds < 253_402_300_800 => {
            Value::String(humantime::format_rfc3339_seconds(at).to_string())
        }
        // Past year 9999: RFC 3339 cannot say it; the number itself.
        _ => Value::from(seconds),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn text(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s))
    }

    fn with_headers(pairs: Vec<(&str, AMQPValue)>) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (key, value) in pairs {
            headers.insert(key.into(), value);
        }
        BasicProperties::default()
            .with_message_id("job-1".into())
            .with_type("send".into())
            .with_headers(headers)
    }

    #[test]
    fn a_replay_rate_is_checked_against_the_bounds() {
        for rate in [1e-300, 0.0, -1.0, f64::NAN, f64::INFINITY, 1e7] {
            assert!(check_rate(rate).is_err(), "{rate} accepted");
        }
        for rate in [REPLAY_RATES.start(), &50.0, REPLAY_RATES.end()] {
            assert!(check_rate(*rate).is_ok(), "{rate} refused");
        }
    }

    #[test]
    fn a_workers_dead_letter_is_read_from_its_headers() {
        let props = with_headers(vec![
            (envelope::ERROR_CLASS, text("permanent")),
            (envelope::ERROR, text("no such user")),
            (envelope::ATTEMPTS, AMQPValue::LongLongInt(3)),
            (envelope::FAILED_AT, text("2026-11-30T10:00:00.000Z")),
        ]);
        let record = DeadRecord::read(&props, br#"{"to":"a@b.c"}"#);
        assert_eq!(record.id.as_deref(), Some("job-1"));
        assert_eq!(record.kind.as_deref(), Some("send"));
        assert_eq!(record.class.as_deref(), Some("permanent"));
        assert_eq!(record.reason.as_deref(), Some("no such user"));
        assert_eq!(record.attempts, Some(3));
        assert!(record.failed_at_time().is_some());
        assert_eq!(record.payload_preview, r#"{"to":"a@b.c"}"#);
    }

    #[test]
    fn a_brokers_dead_letter_is_read_from_x_death_not_forged_headers() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("queue".into(), text("emails"));
        death.insert("time".into(), AMQPValue::Timestamp(1_790_000_000));
        let props = with_headers(vec![
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            (envelope::ERROR_CLASS, text("forged")),
            (envelope::ATTEMPTS, AMQPValue::LongLongInt(99)),
            (envelope::ATTEMPT, AMQPValue::LongLongInt(2)),
            (envelope::DELIVERY_COUNT, AMQPValue::LongLongInt(11)),
        ]);
        let record = DeadRecord::read(&props, b"{}");
        assert_eq!(record.class.as_deref(), Some("delivery-limit"));
        assert!(
            record
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("emails"))
        );
        assert_eq!(record.attempts, Some(2));
        assert!(record.failed_at_time().is_some());
    }

    #[test]
    fn filters_need_every_condition() {
        let props = with_headers(vec![
            (envelope::ERROR_CLASS, text("exhausted")),
            (envelope::FAILED_AT, text("2026-11-30T10:00:00.000Z")),
        ]);
        let record = DeadRecord::read(&props, b"{}");
        assert!(Filter::default().matches(&record));
        let kind = |k: &str| Filter {
            kind: Some(k.into()),
            ..Filter::default()
        };
        assert!(kind("send").matches(&record));
        assert!(!kind("other").matches(&record));
        let both = Filter {
            class: Some("permanent".into()),
            ..kind("send")
        };
        assert!(!both.matches(&record));
        let ids = Filter {
            ids: vec!["x".into(), "job-1".into()],
            ..Filter::default()
        };
        assert!(ids.matches(&record));
        let at = record.failed_at_time().expect("dated");
        let older = |before: SystemTime| Filter {
            failed_before: Some(before),
            ..Filter::default()
        };
        assert!(older(at + Duration::from_secs(1)).matches(&record));
        assert!(!older(at - Duration::from_secs(1)).matches(&record));
        let undated = DeadRecord::read(&with_headers(vec![]), b"{}");
        assert!(!older(SystemTime::now()).matches(&undated));
    }

    #[test]
    fn hostile_headers_become_bounded_json() {
        // Deep enough to show the cap (building and dropping it recurses in the test itself).
        let deep = || {
            let mut nested = AMQPValue::LongString(LongString::from("bottom"));
            for _ in 0..300 {
                nested = AMQPValue::FieldArray(FieldArray::from(vec![nested]));
            }
            nested
        };
        let mut death = FieldTable::default();
        death.insert("reason".into(), text("rejected"));
        death.insert("deep".into(), deep());
        let props = with_headers(vec![
            ("deep", deep()),
            (
                "x-death",
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            ),
            (envelope::ERROR_CLASS, text(&"c".repeat(10_000))),
            ("nan", AMQPValue::Double(f64::NAN)),
            ("when", AMQPValue::Timestamp(u64::MAX)),
        ]);
        let record = DeadRecord::read(&props, &[0xff; 1000]);
        assert_eq!(record.class.as_deref(), Some("rejected"));
        let long_class = with_headers(vec![(envelope::ERROR_CLASS, text(&"c".repeat(10_000)))]);
        let record = DeadRecord::read(&long_class, &[0xff; 1000]);
        assert!(
            record
                .class
                .as_deref()
                .is_some_and(|c| c.len() <= MAX_SHORT_TEXT)
        );
        assert!(record.payload_preview.chars().count() <= PREVIEW_CHARS + 1);
        let json = props
            .headers()
            .as_ref()
            .map(|t| table_json(t, 0))
            .expect("headers");
        let shown = serde_json::to_string(&json).expect("serialises");
        assert!(shown.contains("nested deeper"));
        assert_eq!(json["nan"], Value::String("NaN".into()));
        assert_eq!(json["when"], Value::from(u64::MAX));
    }
}
