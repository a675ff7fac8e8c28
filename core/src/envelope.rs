//! The job envelope: how a job is written into an AMQP message and read back out of one.
//!
//! This module is the only place where jobs become messages and messages become jobs. The
//! format is plain AMQP so that any client can produce or consume jobs (see
//! `docs/PROTOCOL.md`):
//!
//! - body: the job's JSON payload, byte for byte as submitted;
//! - properties: `message_id` = job id, `type` = job kind, `content_type` =
//!   `application/json`, `delivery_mode` = 2 (persistent), `timestamp` (when it was submitted),
//!   `app_id`; when asked, `priority` and `reply_to` (with `correlation_id` = job id, for
//!   [`crate::reply`]);
//! - route: exchange `warren.jobs`, key = the queue; a delayed job goes to the top delay level
//!   with the delay written into its key ([`crate::delay`], [`Message::exchange`]);
//! - headers: a new job carries only its W3C `traceparent` (the submit span's context,
//!   [`crate::trace`]) and, when the submitter gave a valid one, `tracestate` (no [`ATTEMPT`]
//!   header means attempt 1). A retry carries [`ATTEMPT`]; a dead-lettered job also carries
//!   the [`DeadLetter`] headers; a job replayed from its dead-letter queue carries [`REPLAYED`]
//!   and [`REPLAYED_AT`] ([`replay_properties`]). The header table is kept this small because
//!   RabbitMQ parses it on every publish: with the two headers Warren used to write, a
//!   confirmed publish was 15–20% slower (bench/, 2026-11-24).
//!
//! The copies a worker publishes (retries, dead letters) carry only what Warren chose: the
//! [`CARRIED_HEADERS`] allow-list, each value a short scalar (`traceparent` and `tracestate`
//! only if valid), plus the headers Warren writes
//! itself, each capped in size ([`MAX_ERROR_BYTES`]). Anything else a producer put in the
//! header table stays behind: `CC`/`BCC` (RabbitMQ would route every copy to those keys too,
//! multiplying the job), forged `x-warren-error*` fields, broker bookkeeping (`x-death`), and
//! headers too big for a copy to be delivered safely.
//!
//! Everything read from a message is untrusted: [`Job::decode`] turns its properties into a
//! typed job or a [`DecodeError`] that says why it is poison, and [`parse_payload`] its body
//! into the handler's payload type or a [`PayloadError`]. Neither ever panics.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use serde::de::{DeserializeOwned, IgnoredAny};
use serde_json::error::Category;

use crate::trace::{self, SpanIds, TraceContext};
use crate::{delay, topology};

/// Header: which attempt this delivery is, starting at 1.
pub const ATTEMPT: &str = "x-warren-attempt";
/// Header: when the job was first submitted (RFC 3339, UTC). Optional and informational; other
/// producers may write it, Warren's dispatcher does not (the `timestamp` property says it).
pub const FIRST_ENQUEUED_AT: &str = "x-warren-first-enqueued-at";
/// Dead-letter header: why the job is dead.
pub const ERROR: &str = "x-warren-error";
/// Dead-letter header: which kind of failure (see [`DeadReason::class`]).
pub const ERROR_CLASS: &str = "x-warren-error-class";
/// Dead-letter header: attempts made.
pub const ATTEMPTS: &str = "x-warren-attempts";
/// Dead-letter header: when it failed for good (RFC 3339, UTC).
pub const FAILED_AT: &str = "x-warren-failed-at";
/// Dead-letter header: the worker that gave up on it.
pub const WORKER: &str = "x-warren-worker";
/// Dead-letter header: the work queue it came from.
pub const QUEUE: &str = "x-warren-queue";
/// Replay header: how many times `warren dlq replay` sent the job back to its work queue (a
/// 64-bit integer). Copies carry it (integers only), so a job that dies again keeps its count.
pub const REPLAYED: &str = "x-warren-replayed";
/// Replay header: when the job was last replayed (RFC 3339, UTC). Copies carry it.
pub const REPLAYED_AT: &str = "x-warren-replayed-at";
/// Set by RabbitMQ 4.x quorum queues on a redelivery: earlier deliveries of the message.
pub const ACQUIRED_COUNT: &str = "x-acquired-count";
/// Set by quorum queues on a redelivery: earlier returns that count towards the delivery limit.
pub const DELIVERY_COUNT: &str = "x-delivery-count";

/// Headers of a delivery that its copies (retries, dead letters) carry over, if their value is
/// a string or number of at most [`MAX_CARRIED_VALUE_BYTES`]: the documented producer input
/// [`FIRST_ENQUEUED_AT`] and W3C trace context (`traceparent` and `tracestate` only when valid,
/// [`crate::trace`]: a producer's invalid one is not carried). [`ATTEMPT`] is written anew on
/// every copy.
pub const CARRIED_HEADERS: [&str; 4] = [
    FIRST_ENQUEUED_AT,
    trace::TRACEPARENT,
    trace::TRACESTATE,
    "baggage",
];
/// The largest header value a copy carries over from its delivery.
pub const MAX_CARRIED_VALUE_BYTES: usize = 1024;
/// The longest [`ERROR`] text Warren writes; a longer handler error or panic message is cut
/// there (on a character boundary) and says how much was left out.
pub const MAX_ERROR_BYTES: usize = 2048;

/// The only content type Warren writes, and the only one it reads (besides none at all).
pub const CONTENT_TYPE: &str = "application/json";
/// `app_id` of messages Warren publishes.
pub const APP_ID: &str = "warren";
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// A job's id: the AMQP `message_id`. A UUIDv7 unless the submitter chose one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub String);

impl JobId {
    /// A new time-ordered id.
    pub fn generate() -> JobId {
        JobId(uuid::Uuid::now_v7().to_string())
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A job about to be submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    /// The payload's JSON text, sent as the message body unchanged.
    pub payload: Vec<u8>,
    /// The job id; generated when `None`.
    pub id: Option<String>,
    /// Hold the job this long before its queue gets it (whole seconds, up to
    /// [`delay::MAX_DELAY`]), in the delay levels that hold retries. `None` or zero: at once.
    pub delay: Option<Duration>,
    /// The AMQP `priority` property; the queue must take priorities (`max_priority`), which the
    /// dispatcher checks before publishing.
    pub priority: Option<u8>,
    /// The AMQP `reply_to` property: where a worker sends the job's final outcome. Workers
    /// answer only direct reply-to addresses ([`crate::reply`]); the dispatcher sets it for
    /// `submit_and_wait`.
    pub reply_to: Option<String>,
    /// The trace the job is submitted in: the caller's span (an HTTP request's `traceparent`,
    /// say), the parent of the submit span. `None`: the submit starts a new trace.
    pub traceparent: Option<TraceContext>,
    /// The caller's W3C `tracestate`, written on the job if valid
    /// ([`trace::is_valid_tracestate`]), else left out.
    pub tracestate: Option<String>,
}

impl NewJob {
    /// A job whose payload is serialised from a JSON value.
    pub fn new(
        queue: impl Into<String>,
        kind: impl Into<String>,
        payload: &serde_json::Value,
    ) -> NewJob {
        NewJob {
            queue: queue.into(),
            kind: kind.into(),
            payload: payload.to_string().into_bytes(),
            id: None,
            delay: None,
            priority: None,
            reply_to: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// A job whose payload is JSON text; checked by [`NewJob::encode`].
    pub fn from_json_text(
        queue: impl Into<String>,
        kind: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> NewJob {
        NewJob {
            queue: queue.into(),
            kind: kind.into(),
            payload: payload.into(),
            id: None,
            delay: None,
            priority: None,
            reply_to: None,
            traceparent: None,
            tracestate: None,
        }
    }

    /// Sets the job id.
    pub fn with_id(mut self, id: impl Into<String>) -> NewJob {
        self.id = Some(id.into());
        self
    }

    /// Holds the job `delay` before its queue gets it.
    pub fn with_delay(mut self, delay: Duration) -> NewJob {
        self.delay = Some(delay);
        self
    }

    /// Sets the job's priority.
    pub fn with_priority(mut self, priority: u8) -> NewJob {
        self.priority = Some(priority);
        self
    }

    /// Submits the job in the caller's trace: the submit span becomes a child of `parent`.
    pub fn with_traceparent(mut self, parent: TraceContext) -> NewJob {
        self.traceparent = Some(parent);
        self
    }

    /// [`NewJob::with_traceparent`] from header text: an invalid value is ignored (the job
    /// starts a new trace), as the W3C recommendation asks.
    pub fn with_traceparent_header(mut self, value: &str) -> NewJob {
        self.traceparent = TraceContext::parse(value);
        self
    }

    /// Carries the caller's `tracestate` on the job, if it is valid.
    pub fn with_tracestate(mut self, value: impl Into<String>) -> NewJob {
        self.tracestate = Some(value.into());
        self
    }

    /// Checks the job and turns it into the message to publish, with the submit span's trace
    /// context ([`Message::trace`]: a child of [`NewJob::traceparent`], or a new trace) as its
    /// `traceparent` header.
    pub fn encode(&self, max_payload_bytes: usize) -> Result<Message, EncodeError> {
        if self.payload.len() > max_payload_bytes {
            return Err(EncodeError::TooLarge {
                size: self.payload.len(),
                limit: max_payload_bytes,
            });
        }
        serde_json::from_slice::<IgnoredAny>(&self.payload).map_err(EncodeError::NotJson)?;
        let queue = topology::short(&self.queue).map_err(|_| EncodeError::TooLong("queue"))?;
        if self.kind.is_empty() {
            return Err(EncodeError::EmptyKind);
        }
        let kind =
            ShortString::try_new(self.kind.as_str()).map_err(|_| EncodeError::TooLong("kind"))?;
        let id = match &self.id {
            Some(id) if id.is_empty() => return Err(EncodeError::EmptyId),
            Some(id) => JobId(id.clone()),
            None => JobId::generate(),
        };
        let message_id =
            ShortString::try_new(id.0.as_str()).map_err(|_| EncodeError::TooLong("job id"))?;
        let delay_seconds = match self.delay {
            Some(delay) if delay > delay::MAX_DELAY + Duration::from_millis(499) => {
                return Err(EncodeError::DelayTooLong(delay));
            }
            Some(delay) => delay::whole_seconds(delay),
            None => 0,
        };
        let now = SystemTime::now();
        let mut properties = BasicProperties::default()
            .with_message_id(message_id)
            .with_type(kind)
            .with_content_type(CONTENT_TYPE.into())
            .with_delivery_mode(PERSISTENT)
            .with_timestamp(unix_seconds(now))
            .with_app_id(APP_ID.into());
        if let Some(priority) = self.priority {
            properties = properties.with_priority(priority);
        }
        let trace = SpanIds::child_of(self.traceparent.as_ref());
        properties =
            properties.with_headers(trace_headers(&trace.context, self.tracestate.as_deref()));
        if let Some(reply_to) = &self.reply_to {
            let reply_to = ShortString::try_new(reply_to.as_str())
                .map_err(|_| EncodeError::TooLong("reply_to"))?;
            properties = properties
                .with_reply_to(reply_to)
                .with_correlation_id(message_id_for_reply(&id)?);
        }
        let (exchange, routing_key) = match delay_seconds {
            0 => (topology::JOBS_EXCHANGE.to_owned(), queue),
            seconds => {
                let (exchange, key) = topology::delay_route(seconds, &self.queue);
                // Queue names leave room for the delay words (topology::MAX_QUEUE_NAME).
                let key = ShortString::try_new(key).map_err(|_| EncodeError::TooLong("queue"))?;
                (exchange, key)
            }
        };
        Ok(Message {
            id,
            exchange,
            routing_key,
            delay_seconds,
            body: self.payload.clone(),
            properties,
            trace,
        })
    }
}

/// The header table of a new job: `traceparent`, and `tracestate` if valid.
fn trace_headers(context: &TraceContext, tracestate: Option<&str>) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        trace::TRACEPARENT.into(),
        AMQPValue::LongString(context.to_string().into()),
    );
    if let Some(state) =
        tracestate.filter(|s| !s.is_empty() && trace::is_valid_tracestate(s.as_bytes()))
    {
        headers.insert(trace::TRACESTATE.into(), long_string(state));
    }
    headers
}

/// The correlation id of a job that asks for a reply: its id.
fn message_id_for_reply(id: &JobId) -> Result<ShortString, EncodeError> {
    ShortString::try_new(id.0.as_str()).map_err(|_| EncodeError::TooLong("job id"))
}

/// An encoded job, ready for `basic_publish` to `exchange`: [`topology::JOBS_EXCHANGE`], or
/// for a delayed job the top delay level ([`topology::delay_route`]).
#[derive(Debug, Clone)]
pub struct Message {
    pub id: JobId,
    pub exchange: String,
    pub routing_key: ShortString,
    /// The delay the job is held, in whole seconds (0: none).
    pub delay_seconds: u64,
    pub body: Vec<u8>,
    pub properties: BasicProperties,
    /// The submit span: its context is the `traceparent` header; its parent, the caller's.
    pub trace: SpanIds,
}

/// Why a job could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("payload is {size} bytes, over the limit of {limit} (jobs.max_payload_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("payload is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("{0} is longer than 255 bytes")]
    TooLong(&'static str),
    #[error("job kind is empty")]
    EmptyKind,
    #[error("job id is empty")]
    EmptyId,
    #[error(
        "a delay of {} s ({:.1} days) is longer than the delay levels can hold: {} s ({:.1} \
         days) at most",
        .0.as_secs(),
        .0.as_secs_f64() / 86_400.0,
        delay::MAX_DELAY.as_secs(),
        delay::MAX_DELAY.as_secs_f64() / 86_400.0
    )]
    DelayTooLong(Duration),
}

/// A job as a worker sees it, before its payload is read ([`parse_payload`]): the payload
/// is the message body.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub kind: String,
    /// 1 for the first attempt; retries count up.
    pub attempt: u32,
}

impl Job {
    /// Reads a delivered message. Anything that is not a well-formed Warren job is an error
    /// that says why; the caller dead-letters it.
    pub fn decode(
        properties: &BasicProperties,
        body: &[u8],
        max_payload_bytes: usize,
    ) -> Result<Job, DecodeError> {
        let id = match properties.message_id() {
            Some(id) if !id.as_str().is_empty() => JobId(id.as_str().to_owned()),
            _ => return Err(DecodeError::MissingId),
        };
        let kind = match properties.kind() {
            Some(kind) if !kind.as_str().is_empty() => kind.as_str().to_owned(),
            _ => return Err(DecodeError::MissingKind),
        };
        if let Some(content_type) = properties.content_type()
            && !is_json(content_type.as_str())
        {
            return Err(DecodeError::ContentType(content_type.as_str().to_owned()));
        }
        if body.len() > max_payload_bytes {
            return Err(DecodeError::TooLarge {
                size: body.len(),
                limit: max_payload_bytes,
            });
        }
        let attempt = attempt(properties.headers().as_ref())?;
        Ok(Job { id, kind, attempt })
    }
}

/// Reads a job's body as its handler's payload type `P` (`serde_json::Value` for an untyped
/// handler). Parsing straight into `P` skips building a `Value` a typed handler would not use;
/// [`check_json`] checks a body that no handler will read.
pub fn parse_payload<P: DeserializeOwned>(body: &[u8]) -> Result<P, PayloadError> {
    // UTF-8 is checked over the whole body first: a typed parse skips the strings of fields it
    // ignores, and the protocol wants strict UTF-8 JSON whatever the handler reads.
    serde_json::from_str(utf8(body)?).map_err(|err| match err.classify() {
        // The shape was wrong before the parse got to any syntax error further on.
        Category::Data => match check_json(body) {
            Ok(()) => PayloadError::Mismatch(err.to_string()),
            Err(not_json) => not_json,
        },
        Category::Syntax | Category::Eof | Category::Io => PayloadError::NotJson(err.to_string()),
    })
}

/// Checks that `body` is strict UTF-8 JSON without keeping any of it.
pub fn check_json(body: &[u8]) -> Result<(), PayloadError> {
    serde_json::from_str::<IgnoredAny>(utf8(body)?)
        .map(|_| ())
        .map_err(|err| PayloadError::NotJson(err.to_string()))
}

fn utf8(body: &[u8]) -> Result<&str, PayloadError> {
    std::str::from_utf8(body).map_err(|err| PayloadError::NotJson(format!("invalid UTF-8: {err}")))
}

/// Why a job's body cannot be its handler's payload.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PayloadError {
    /// Not JSON at all: the message is malformed, whatever its kind.
    #[error("body is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not the shape the handler's payload type asks for.
    #[error("payload does not fit the handler's type: {0}")]
    Mismatch(String),
}

/// Why a delivered message is not a job. Each is final: retrying cannot help.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("message has no message_id property (the job id)")]
    MissingId,
    #[error("message has no type property (the job kind)")]
    MissingKind,
    #[error("content type `{0}` is not application/json")]
    ContentType(String),
    #[error("body is {size} bytes, over the limit of {limit} (jobs.max_payload_bytes)")]
    TooLarge { size: usize, limit: usize },
    #[error("header x-warren-attempt is {0}, not a whole number from 1 up")]
    BadAttempt(String),
}

/// True for `application/json`, with or without parameters such as `; charset=utf-8`.
fn is_json(content_type: &str) -> bool {
    let media_type = content_type.split(';').next().unwrap_or_default();
    media_type.trim().eq_ignore_ascii_case(CONTENT_TYPE)
}

/// Reads [`ATTEMPT`]: absent means 1 (a job from a plain AMQP client); anything but a
/// positive integer is an error.
/// How many times the broker delivered this message before this delivery, as far as it says:
/// RabbitMQ 4.x's `x-acquired-count` counts every earlier delivery (consumer timeouts and
/// requeues included, which its delivery limit no longer counts); 3.x's `x-delivery-count`
/// counts returns, which on 3.x include consumer timeouts. 0 for a first delivery, and when the
/// broker tells nothing (classic queues). Read only on a redelivery: on a first delivery these
/// headers can only be a producer's.
pub fn earlier_deliveries(properties: &BasicProperties, redelivered: bool) -> u64 {
    if !redelivered {
        return 0;
    }
    let Some(headers) = properties.headers() else {
        return 0;
    };
    [ACQUIRED_COUNT, DELIVERY_COUNT]
        .iter()
        .filter_map(|key| headers.inner().get(*key).and_then(integer))
        .filter_map(|n| u64::try_from(n).ok())
        .max()
        .unwrap_or(0)
}

fn attempt(headers: Option<&FieldTable>) -> Result<u32, DecodeError> {
    let Some(value) = headers.and_then(|h| h.inner().get(ATTEMPT)) else {
        return Ok(1);
    };
    let Some(number) = integer(value) else {
        return Err(DecodeError::BadAttempt(describe(value)));
    };
    u32::try_from(number)
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| DecodeError::BadAttempt(number.to_string()))
}

/// A header value as a short description for an error message: never more than a few dozen
/// bytes, whatever the producer sent (the message may end up in a dead letter's header).
fn describe(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => describe_text("a string", s.as_bytes()),
        AMQPValue::ShortString(s) => describe_text("a string", s.as_str().as_bytes()),
        AMQPValue::ByteArray(b) => format!("a byte array of {} bytes", b.as_slice().len()),
        AMQPValue::FieldTable(t) => format!("a table of {} fields", t.inner().len()),
        AMQPValue::FieldArray(a) => format!("an array of {} values", a.as_slice().len()),
        AMQPValue::Boolean(b) => format!("the boolean {b}"),
        AMQPValue::Float(f) => format!("the float {f}"),
        AMQPValue::Double(f) => format!("the float {f}"),
        AMQPValue::DecimalValue(_) => "a decimal".to_owned(),
        AMQPValue::Timestamp(t) => format!("the timestamp {t}"),
        AMQPValue::Void => "void".to_owned(),
        other => integer(other).map_or_else(|| "a value".to_owned(), |n| n.to_string()),
    }
}

fn describe_text(what: &str, bytes: &[u8]) -> String {
    const PREVIEW: usize = 24;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(PREVIEW)]);
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    if bytes.len() > PREVIEW {
        format!("{what} of {} bytes (\"{text}…\")", bytes.len())
    } else {
        format!("{what} (\"{text}\")")
    }
}

/// Properties for the next attempt of a job: the original's properties (`copy_of`), the
/// [`CARRIED_HEADERS`] it had, and the attempt counter.
pub fn retry_properties(original: &BasicProperties, next_attempt: u32) -> BasicProperties {
    let mut headers = carried_headers(original);
    headers.insert(
        ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(next_attempt)),
    );
    copy_of(original).with_headers(headers)
}

/// Properties for a dead letter sent back to its work queue (`warren dlq replay`): the
/// original's properties (`copy_of`: id, kind, content type, priority, ...) and the
/// [`CARRIED_HEADERS`] it had; no [`ATTEMPT`] (attempt 1 again), none of the failure headers,
/// no `x-death` or broker delivery counts; [`REPLAYED`] one more than the dead letter's (a
/// missing or unreadable count is 0) and [`REPLAYED_AT`] = `at`.
pub fn replay_properties(dead: &BasicProperties, at: SystemTime) -> BasicProperties {
    let previous = dead
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(REPLAYED))
        .and_then(integer)
        .filter(|n| *n >= 0)
        .unwrap_or(0);
    let mut headers = carried_headers(dead);
    headers.insert(
        REPLAYED.into(),
        AMQPValue::LongLongInt(previous.saturating_add(1)),
    );
    headers.insert(REPLAYED_AT.into(), timestamp_value(at));
    copy_of(dead).with_headers(headers)
}

/// Why and how a job was given up on; written as headers on the dead-lettered message.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub reason: DeadReason,
    /// Human-readable detail: the handler's error, the decode error, ...
    pub error: String,
    pub attempts: u32,
    pub queue: String,
    pub worker: String,
}

/// The kinds of failure that end in a dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The handler said retrying cannot help.
    Permanent,
    /// Every allowed attempt failed.
    Exhausted,
    /// The message is not a job Warren can read.
    Malformed,
    /// No handler is registered for the job's kind.
    UnknownKind,
    /// Delivered more than `delivery_limit` times without being settled: each run ended with
    /// its worker (a crash, a kill) or was taken back by the broker's consumer timeout.
    DeliveryLimit,
}

impl DeadReason {
    /// The value of the [`ERROR_CLASS`] header.
    pub fn class(self) -> &'static str {
        match self {
            DeadReason::Permanent => "permanent",
            DeadReason::Exhausted => "exhausted",
            DeadReason::Malformed => "malformed",
            DeadReason::UnknownKind => "unknown-kind",
            DeadReason::DeliveryLimit => "delivery-limit",
        }
    }
}

impl DeadLetter {
    /// Properties for the dead-lettered copy: the original's, plus the failure headers.
    pub fn properties(&self, original: &BasicProperties) -> BasicProperties {
        let mut headers = carried_headers(original);
        let mut put = |key: &str, value: AMQPValue| {
            headers.insert(key.into(), value);
        };
        put(ERROR, long_string(&capped(&self.error, MAX_ERROR_BYTES)));
        put(ERROR_CLASS, long_string(self.reason.class()));
        put(ATTEMPTS, AMQPValue::LongLongInt(i64::from(self.attempts)));
        put(FAILED_AT, timestamp_value(SystemTime::now()));
        put(WORKER, long_string(&self.worker));
        put(QUEUE, long_string(&self.queue));
        copy_of(original).with_headers(headers)
    }
}

/// The original's properties for a copy the worker publishes, less two that would harm it:
/// `user_id` (RabbitMQ checks it against the publishing connection's user and closes the
/// channel on a mismatch; the worker is rarely the user who submitted the job) and
/// `expiration` (a per-message TTL would cut a retry's delay short, or silently drop a dead
/// letter).
fn copy_of(original: &BasicProperties) -> BasicProperties {
    let mut copy = BasicProperties::default();
    if let Some(v) = original.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = original.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = original.delivery_mode() {
        copy = copy.with_delivery_mode(*v);
    }
    if let Some(v) = original.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = original.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = original.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = original.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = original.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = original.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = original.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = original.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy.with_delivery_mode(PERSISTENT)
}

/// The [`CARRIED_HEADERS`] of the original whose values are short scalars; nothing else.
fn carried_headers(original: &BasicProperties) -> FieldTable {
    let mut headers = FieldTable::default();
    let Some(old) = original.headers() else {
        return headers;
    };
    for name in CARRIED_HEADERS {
        if name == trace::TRACEPARENT {
            // Written as version 00 (for a valid version-00 value: unchanged, byte for byte).
            if let Some(context) = traceparent(original) {
                headers.insert(
                    name.into(),
                    AMQPValue::LongString(context.to_string().into()),
                );
            }
        } else if let Some(value) = old.inner().get(name)
            && is_short_scalar(value)
            && (name != trace::TRACESTATE || is_valid_tracestate(value))
        {
            headers.insert(name.into(), value.clone());
        }
    }
    // The replay marker, so that a replayed job that dies again still says it was replayed:
    // the count only as a non-negative integer, the time as a short scalar.
    if let Some(count) = old.inner().get(REPLAYED).and_then(integer)
        && count >= 0
    {
        headers.insert(REPLAYED.into(), AMQPValue::LongLongInt(count));
    }
    if let Some(value) = old.inner().get(REPLAYED_AT)
        && is_short_scalar(value)
    {
        headers.insert(REPLAYED_AT.into(), value.clone());
    }
    headers
}

/// A `tracestate` header a copy carries: a string the W3C recommendation accepts.
fn is_valid_tracestate(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::LongString(s) => trace::is_valid_tracestate(s.as_bytes()),
        AMQPValue::ShortString(s) => trace::is_valid_tracestate(s.as_str().as_bytes()),
        _ => false,
    }
}

/// The job's W3C trace context as its delivery carries it: `None` when absent or invalid
/// (never an error: a job without a valid one still runs, in a trace of its own).
pub fn traceparent(properties: &BasicProperties) -> Option<TraceContext> {
    let value = properties
        .headers()
        .as_ref()?
        .inner()
        .get(trace::TRACEPARENT)?;
    match value {
        AMQPValue::LongString(s) => TraceContext::from_header(s.as_bytes()),
        AMQPValue::ShortString(s) => TraceContext::from_header(s.as_str().as_bytes()),
        _ => None,
    }
}

/// Strings up to [`MAX_CARRIED_VALUE_BYTES`], numbers, booleans and timestamps.
fn is_short_scalar(value: &AMQPValue) -> bool {
    match value {
        AMQPValue::LongString(s) => s.as_bytes().len() <= MAX_CARRIED_VALUE_BYTES,
        AMQPValue::ShortString(_) => true,
        AMQPValue::FieldTable(_)
        | AMQPValue::FieldArray(_)
        | AMQPValue::ByteArray(_)
        | AMQPValue::Void => false,
        _ => true,
    }
}

/// `text` cut to at most `limit` bytes on a character boundary, saying how much was left out.
pub fn capped(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return std::borrow::Cow::Borrowed(text);
    }
    let note = format!("… ({} more bytes)", text.len());
    let mut end = limit.saturating_sub(note.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    std::borrow::Cow::Owned(format!(
        "{}… ({} more bytes)",
        &text[..end],
        text.len() - end
    ))
}

/// Reads a header as text, if it is a string.
pub fn header_str<'a>(
    properties: &'a BasicProperties,
    key: &str,
) -> Option<std::borrow::Cow<'a, str>> {
    match properties.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        _ => None,
    }
}

/// Reads a header as an integer, if it is one.
pub fn header_int(properties: &BasicProperties, key: &str) -> Option<i64> {
    integer(properties.headers().as_ref()?.inner().get(key)?)
}

/// An AMQP integer of any width, as i64.
pub fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        _ => None,
    }
}

fn long_string(text: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(text))
}

fn timestamp_value(at: SystemTime) -> AMQPValue {
    long_string(&humantime::format_rfc3339_millis(at).to_string())
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn encode(job: &NewJob) -> Message {
        job.encode(1024).expect("encodes")
    }

    #[test]
    fn a_job_round_trips() {
        let new =
            NewJob::new("emails", "send", &serde_json::json!({"to": "a@b.c"})).with_id("job-1");
        let message = encode(&new);
        assert_eq!(message.id.0, "job-1");
        assert_eq!(message.routing_key.as_str(), "emails");
        assert_eq!(message.body, br#"{"to":"a@b.c"}"#);
        let job = Job::decode(&message.properties, &message.body, 1024).expect("decodes");
        assert_eq!(job.kind, "send");
        assert_eq!(job.attempt, 1);
        let payload: serde_json::Value = parse_payload(&message.body).expect("JSON");
        assert_eq!(payload["to"], "a@b.c");
        assert!(message.properties.timestamp().is_some());
        let headers = message.properties.headers().as_ref().expect("headers");
        let keys: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            vec![trace::TRACEPARENT],
            "a new job carries only its traceparent (attempt 1 is implied)"
        );
        assert_eq!(
            traceparent(&message.properties),
            Some(message.trace.context),
            "the header is the submit span's context"
        );
        assert_eq!(
            message.trace.parent_id(),
            None,
            "no caller's trace: a new one"
        );
    }

    #[test]
    fn the_submit_span_is_a_child_of_the_callers() {
        let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        let job = NewJob::new("q", "k", &serde_json::json!(1))
            .with_traceparent(parent)
            .with_tracestate("rojo=00f067aa0ba902b7");
        let message = encode(&job);
        assert_eq!(message.trace.trace_id(), parent.trace_id());
        assert_eq!(message.trace.parent_id(), Some(parent.span_id()));
        assert_ne!(message.trace.span_id(), parent.span_id());
        assert_eq!(
            traceparent(&message.properties),
            Some(message.trace.context)
        );
        assert_eq!(
            header_str(&message.properties, trace::TRACESTATE).as_deref(),
            Some("rojo=00f067aa0ba902b7")
        );
        let invalid = NewJob::new("q", "k", &serde_json::json!(1))
            .with_traceparent_header("00-XYZ")
            .with_tracestate("Not Valid");
        let message = encode(&invalid);
        assert_eq!(
            message.trace.parent_id(),
            None,
            "an invalid parent is ignored"
        );
        assert_eq!(header_str(&message.properties, trace::TRACESTATE), None);
    }

    #[test]
    fn copies_carry_trace_context_only_if_valid() {
        let with = |traceparent: AMQPValue, tracestate: AMQPValue| {
            let mut headers = FieldTable::default();
            headers.insert(trace::TRACEPARENT.into(), traceparent);
            headers.insert(trace::TRACESTATE.into(), tracestate);
            BasicProperties::default()
                .with_message_id("x".into())
                .with_type("k".into())
                .with_headers(headers)
        };
        let valid = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let good = with(long_string(valid), long_string("congo=t61rcWkgMzE"));
        let retry = retry_properties(&good, 2);
        assert_eq!(
            header_str(&retry, trace::TRACEPARENT).as_deref(),
            Some(valid)
        );
        assert_eq!(
            header_str(&retry, trace::TRACESTATE).as_deref(),
            Some("congo=t61rcWkgMzE")
        );
        // A future version is passed on as version 00; junk, other types: left behind.
        let future = with(
            long_string(&format!("{}-more", valid.replacen("00", "cc", 1))),
            AMQPValue::LongLongInt(1),
        );
        let retry = retry_properties(&future, 2);
        assert_eq!(
            header_str(&retry, trace::TRACEPARENT).as_deref(),
            Some(valid)
        );
        assert_eq!(header_str(&retry, trace::TRACESTATE), None);
        for junk in [
            long_string("00-abc-def-01"),
            long_string(&valid.to_uppercase()),
            AMQPValue::LongLongInt(7),
            AMQPValue::FieldArray(Default::default()),
        ] {
            let dead = DeadLetter {
                reason: DeadReason::Exhausted,
                error: "boom".into(),
                attempts: 3,
                queue: "q".into(),
                worker: "w1".into(),
            }
            .properties(&with(junk, long_string("Bad State")));
            let headers = dead.headers().as_ref().expect("headers");
            assert!(!headers.contains_key(trace::TRACEPARENT));
            assert!(!headers.contains_key(trace::TRACESTATE));
        }
    }

    #[test]
    fn earlier_deliveries_come_from_the_broker_only_on_a_redelivery() {
        let with = |pairs: &[(&str, AMQPValue)]| {
            let mut headers = FieldTable::default();
            for (key, value) in pairs {
                headers.insert((*key).into(), value.clone());
            }
            BasicProperties::default().with_headers(headers)
        };
        // RabbitMQ 4.x after two consumer timeouts: acquired twice, never returned.
        let timed_out = with(&[(ACQUIRED_COUNT, AMQPValue::LongLongInt(2))]);
        assert_eq!(earlier_deliveries(&timed_out, true), 2);
        // 3.x after three crashes.
        let crashed = with(&[(DELIVERY_COUNT, AMQPValue::LongLongInt(3))]);
        assert_eq!(earlier_deliveries(&crashed, true), 3);
        // Both: the larger.
        let both = with(&[
            (ACQUIRED_COUNT, AMQPValue::LongLongInt(5)),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(1)),
        ]);
        assert_eq!(earlier_deliveries(&both, true), 5);
        // A producer's forgery on a first delivery, junk, negative numbers: 0.
        assert_eq!(earlier_deliveries(&both, false), 0);
        let junk = with(&[
            (ACQUIRED_COUNT, AMQPValue::LongString("99".into())),
            (DELIVERY_COUNT, AMQPValue::LongLongInt(-4)),
        ]);
        assert_eq!(earlier_deliveries(&junk, true), 0);
        assert_eq!(earlier_deliveries(&BasicProperties::default(), true), 0);
    }

    #[test]
    fn bad_jobs_are_refused_before_sending() {
        let big = NewJob::from_json_text("q", "k", vec![b' '; 2000]);
        assert!(matches!(
            big.encode(1024),
            Err(EncodeError::TooLarge { size: 2000, .. })
        ));
        let not_json = NewJob::from_json_text("q", "k", "{oops");
        assert!(matches!(
            not_json.encode(1024),
            Err(EncodeError::NotJson(_))
        ));
        let no_kind = NewJob::from_json_text("q", "", "{}");
        assert!(matches!(no_kind.encode(1024), Err(EncodeError::EmptyKind)));
        let long_kind = NewJob::from_json_text("q", "k".repeat(256), "{}");
        assert!(matches!(
            long_kind.encode(1024),
            Err(EncodeError::TooLong("kind"))
        ));
    }

    #[test]
    fn delayed_jobs_go_to_the_top_delay_level() {
        let now = encode(&NewJob::new("q", "k", &serde_json::json!(1)));
        assert_eq!(now.exchange, topology::JOBS_EXCHANGE);
        assert_eq!(now.routing_key.as_str(), "q");
        let later = encode(
            &NewJob::new("q", "k", &serde_json::json!(1)).with_delay(Duration::from_secs(5)),
        );
        assert_eq!(later.exchange, topology::delay_level(delay::LEVELS - 1));
        assert_eq!(later.routing_key.as_str(), delay::routing_key(5, "q"));
        assert_eq!(later.delay_seconds, 5);
        let zero = encode(&NewJob::new("q", "k", &serde_json::json!(1)).with_delay(Duration::ZERO));
        assert_eq!(zero.exchange, topology::JOBS_EXCHANGE);
        let too_long = NewJob::new("q", "k", &serde_json::json!(1))
            .with_delay(delay::MAX_DELAY + Duration::from_secs(1));
        let err = too_long.encode(1024).expect_err("beyond the levels");
        assert!(matches!(err, EncodeError::DelayTooLong(_)));
        assert!(
            err.to_string().contains("longer than the delay levels"),
            "{err}"
        );
        let edge = NewJob::new("q", "k", &serde_json::json!(1)).with_delay(delay::MAX_DELAY);
        assert_eq!(encode(&edge).delay_seconds, delay::MAX_DELAY.as_secs());
    }

    #[test]
    fn priority_and_reply_to_are_properties() {
        let mut job = NewJob::new("q", "k", &serde_json::json!(1))
            .with_id("j")
            .with_priority(7);
        job.reply_to = Some("amq.rabbitmq.reply-to".into());
        let message = encode(&job);
        assert_eq!(message.properties.priority(), &Some(7));
        assert_eq!(
            message.properties.reply_to().as_ref().map(|r| r.as_str()),
            Some("amq.rabbitmq.reply-to")
        );
        assert_eq!(
            message
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some("j")
        );
    }

    #[test]
    fn generated_ids_are_unique() {
        let job = NewJob::new("q", "k", &serde_json::Value::Null);
        assert_ne!(encode(&job).id, encode(&job).id);
    }

    #[test]
    fn malformed_messages_say_why() {
        let good = encode(&NewJob::new("q", "k", &serde_json::json!(1)));
        let props = good.properties.clone();
        let decode = |p: &BasicProperties, body: &[u8]| Job::decode(p, body, 1024);

        let no_id = BasicProperties::default().with_type("k".into());
        assert_eq!(decode(&no_id, b"{}"), Err(DecodeError::MissingId));
        let no_kind = BasicProperties::default().with_message_id("x".into());
        assert_eq!(decode(&no_kind, b"{}"), Err(DecodeError::MissingKind));
        let text = props.clone().with_content_type("text/plain".into());
        assert!(matches!(
            decode(&text, b"{}"),
            Err(DecodeError::ContentType(_))
        ));
        assert!(matches!(
            decode(&props, &[b'1'; 2000]),
            Err(DecodeError::TooLarge { .. })
        ));

        for spoof in [
            AMQPValue::LongLongInt(0),
            AMQPValue::LongLongInt(-3),
            long_string("2"),
        ] {
            let mut headers = FieldTable::default();
            headers.insert(ATTEMPT.into(), spoof);
            let spoofed = props.clone().with_headers(headers);
            assert!(matches!(
                decode(&spoofed, b"{}"),
                Err(DecodeError::BadAttempt(_))
            ));
        }
    }

    #[test]
    fn payloads_are_json_of_the_handlers_type() {
        #[derive(Debug, serde::Deserialize)]
        struct Greet {
            name: String,
        }
        let greet: Greet = parse_payload(br#"{"name":"Ada","extra":1}"#).expect("fits");
        assert_eq!(greet.name, "Ada");
        assert!(matches!(
            parse_payload::<Greet>(br#"{"nom":"Ada"}"#),
            Err(PayloadError::Mismatch(_))
        ));
        for not_json in [
            &b"not json"[..],
            b"{\"name\":",
            b"{} trailing",
            b"\"\xff\"",
            b"{\"nom\": \"\xff\", \"name\": \"Ada\"}",
            b"{\"nom\": 1} trailing",
        ] {
            assert!(matches!(
                parse_payload::<Greet>(not_json),
                Err(PayloadError::NotJson(_))
            ));
            assert!(matches!(
                check_json(not_json),
                Err(PayloadError::NotJson(_))
            ));
        }
        assert_eq!(check_json(b"[1, {}]"), Ok(()));
    }

    #[test]
    fn json_with_a_charset_is_json() {
        let props = BasicProperties::default()
            .with_message_id("x".into())
            .with_type("k".into())
            .with_content_type("Application/JSON; charset=utf-8".into());
        assert!(Job::decode(&props, b"{}", 1024).is_ok());
    }

    #[test]
    fn copies_drop_user_id_and_expiration() {
        let original = BasicProperties::default()
            .with_message_id("x".into())
            .with_user_id("alice".into())
            .with_expiration("1000".into())
            .with_correlation_id("c".into());
        let retry = retry_properties(&original, 2);
        assert_eq!(retry.user_id(), &None);
        assert_eq!(retry.expiration(), &None);
        assert_eq!(retry.correlation_id(), original.correlation_id());
        assert_eq!(retry.delivery_mode(), &Some(2), "copies are persistent");
    }

    #[test]
    fn a_plain_amqp_job_needs_only_id_and_type() {
        let props = BasicProperties::default()
            .with_message_id("x".into())
            .with_type("k".into());
        let job = Job::decode(&props, b"[1,2]", 1024).expect("decodes");
        assert_eq!(job.attempt, 1);
    }

    #[test]
    fn retries_count_up_and_drop_broker_bookkeeping() {
        let message = encode(&NewJob::new("q", "k", &serde_json::json!({})));
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        let delivered = message.properties.clone().with_headers(headers);

        let retry = retry_properties(&delivered, 2);
        assert_eq!(header_int(&retry, ATTEMPT), Some(2));
        assert_eq!(
            traceparent(&retry),
            Some(message.trace.context),
            "the job's traceparent, unchanged"
        );
        assert!(
            !retry
                .headers()
                .as_ref()
                .expect("headers")
                .contains_key("x-death")
        );
        assert_eq!(retry.message_id(), delivered.message_id());

        let dead = DeadLetter {
            reason: DeadReason::Exhausted,
            error: "boom".into(),
            attempts: 3,
            queue: "q".into(),
            worker: "w1".into(),
        }
        .properties(&delivered);
        assert_eq!(header_str(&dead, ERROR).as_deref(), Some("boom"));
        assert_eq!(header_str(&dead, ERROR_CLASS).as_deref(), Some("exhausted"));
        assert_eq!(header_int(&dead, ATTEMPTS), Some(3));
        assert!(header_str(&dead, FAILED_AT).is_some());
    }

    fn hostile_headers() -> BasicProperties {
        let mut headers = FieldTable::default();
        let keys = FieldArray::from(vec![long_string("warren.delay.00")]);
        headers.insert("CC".into(), AMQPValue::FieldArray(keys.clone()));
        headers.insert("BCC".into(), AMQPValue::FieldArray(keys));
        headers.insert(ERROR_CLASS.into(), long_string("permanent"));
        headers.insert(ERROR.into(), long_string("forged"));
        headers.insert("x-warren-replayed".into(), long_string("forged"));
        headers.insert("x-custom".into(), long_string("not carried"));
        headers.insert("traceparent".into(), long_string(&"t".repeat(20_000)));
        headers.insert(
            FIRST_ENQUEUED_AT.into(),
            long_string("2026-01-01T00:00:00.000Z"),
        );
        BasicProperties::default()
            .with_message_id("x".into())
            .with_type("k".into())
            .with_headers(headers)
    }

    #[test]
    fn copies_carry_only_the_allow_list() {
        let delivered = hostile_headers();
        let retry = retry_properties(&delivered, 2);
        let kept: Vec<&str> = retry
            .headers()
            .as_ref()
            .expect("headers")
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            kept,
            vec![ATTEMPT, FIRST_ENQUEUED_AT],
            "CC, BCC, forged x-warren-* and the 20 KB traceparent stay behind"
        );

        let dead = DeadLetter {
            reason: DeadReason::Exhausted,
            error: "boom".into(),
            attempts: 3,
            queue: "q".into(),
            worker: "w1".into(),
        }
        .properties(&delivered);
        let headers = dead.headers().as_ref().expect("headers");
        assert!(!headers.contains_key("CC") && !headers.contains_key("BCC"));
        assert!(!headers.contains_key("x-warren-replayed"));
        assert!(!headers.contains_key("x-custom"));
        assert_eq!(header_str(&dead, ERROR_CLASS).as_deref(), Some("exhausted"));
        assert_eq!(header_str(&dead, ERROR).as_deref(), Some("boom"));
    }

    #[test]
    fn a_replay_starts_afresh_and_counts_replays() {
        // A dead letter as the broker delivers it: failure headers, x-death, delivery counts.
        let mut original = FieldTable::default();
        original.insert(ATTEMPT.into(), AMQPValue::LongLongInt(3));
        original.insert(
            FIRST_ENQUEUED_AT.into(),
            long_string("2026-01-01T00:00:00.000Z"),
        );
        let delivered = BasicProperties::default()
            .with_message_id("job-7".into())
            .with_type("send".into())
            .with_priority(5)
            .with_headers(original);
        let dead = DeadLetter {
            reason: DeadReason::Exhausted,
            error: "boom".into(),
            attempts: 3,
            queue: "q".into(),
            worker: "w1".into(),
        }
        .properties(&delivered);
        let mut headers = dead.headers().clone().unwrap_or_default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(Default::default()));
        headers.insert(DELIVERY_COUNT.into(), AMQPValue::LongLongInt(4));
        headers.insert(ACQUIRED_COUNT.into(), AMQPValue::LongLongInt(4));
        let dead = dead.with_headers(headers);

        let replay = replay_properties(&dead, SystemTime::now());
        let mut kept: Vec<&str> = replay
            .headers()
            .as_ref()
            .expect("headers")
            .inner()
            .keys()
            .map(|k| k.as_str())
            .collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![FIRST_ENQUEUED_AT, REPLAYED, REPLAYED_AT]);
        assert_eq!(header_int(&replay, REPLAYED), Some(1));
        assert_eq!(replay.message_id(), delivered.message_id());
        assert_eq!(replay.kind(), delivered.kind());
        assert_eq!(replay.priority(), &Some(5));
        let job = Job::decode(&replay, b"{}", 1024).expect("a job again");
        assert_eq!(job.attempt, 1, "a fresh attempt count");

        // It dies again: the dead letter keeps the count, and the next replay adds one.
        let again = DeadLetter {
            reason: DeadReason::Permanent,
            error: "still".into(),
            attempts: 1,
            queue: "q".into(),
            worker: "w1".into(),
        }
        .properties(&replay);
        assert_eq!(header_int(&again, REPLAYED), Some(1));
        assert!(header_str(&again, REPLAYED_AT).is_some());
        let twice = replay_properties(&again, SystemTime::now());
        assert_eq!(header_int(&twice, REPLAYED), Some(2));
    }

    #[test]
    fn headers_warren_writes_are_capped() {
        let huge = format!("handler panicked: {}", "é".repeat(50_000));
        let dead = DeadLetter {
            reason: DeadReason::Permanent,
            error: huge.clone(),
            attempts: 1,
            queue: "q".into(),
            worker: "w1".into(),
        }
        .properties(&hostile_headers());
        let error = header_str(&dead, ERROR).expect("error header");
        assert!(error.len() <= MAX_ERROR_BYTES, "{} bytes", error.len());
        assert!(error.starts_with("handler panicked: é"));
        assert!(error.ends_with("more bytes)"));

        let mut headers = FieldTable::default();
        headers.insert(ATTEMPT.into(), long_string(&"9".repeat(4096)));
        let props = BasicProperties::default()
            .with_message_id("x".into())
            .with_type("k".into())
            .with_headers(headers);
        let Err(err) = Job::decode(&props, b"{}", 1024) else {
            panic!("a 4 KB string attempt is malformed");
        };
        let text = err.to_string();
        assert!(text.len() < 120, "error echoes at most a preview: {text}");
        assert!(text.contains("4096 bytes"), "{text}");
    }
}
