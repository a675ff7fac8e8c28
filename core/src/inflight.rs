//! In-flight jobs: the messages of `warren inflight` on the control exchange
//! ([`topology::CONTROL_EXCHANGE`]). The broker does not tell which message a channel holds,
//! so workers say it themselves when asked (docs/PROTOCOL.md, "In-flight jobs"):
//!
//! 1. Each worker process binds an exclusive, server-named queue to the fanout exchange
//!    `warren.control` ([`topology::control_queue_arguments`]) and consumes it.
//! 2. The requester (`warren_dispatcher::inflight`) consumes RabbitMQ's direct reply-to
//!    pseudo-queue ([`DIRECT_REPLY_TO`]) and, on the same channel, publishes a [`Request`]
//!    ([`Request::encode`]) with `reply_to = amq.rabbitmq.reply-to`.
//! 3. Each worker answers once with an [`Answer`]: who it is and the jobs its handlers are
//!    running, each with its queue's `job_timeout`. The requester collects answers for a short
//!    window.
//!
//! Anyone who may publish to `warren.control` can send requests, so a worker answers only a
//! well-formed one ([`Request::decode`]: the type, a small JSON body, a valid queue name, a
//! direct reply-to address — never a queue name, which would make workers publish into any
//! queue), once, at most [`ANSWERS_PER_SECOND`] a second, with an answer of at most
//! [`MAX_ANSWER_BYTES`]. Answers are untrusted for the requester too: [`Answer::decode`] checks
//! their size and shape.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::ShortString;
use serde::{Deserialize, Serialize};

use crate::envelope::{APP_ID, CONTENT_TYPE};

pub use crate::reply::{DIRECT_REPLY_TO, REPLY_PREFIX};
/// The `type` property of a request.
pub const REQUEST_KIND: &str = "warren.inflight";
/// The `type` property of an answer.
pub const ANSWER_KIND: &str = "warren.inflight.answer";
/// The largest request body a worker reads.
pub const MAX_REQUEST_BYTES: usize = 1024;
/// The largest answer a worker sends (jobs past it are left out, and `truncated` is set) and a
/// requester reads.
pub const MAX_ANSWER_BYTES: usize = 128 * 1024;
/// The most answers a worker sends in one second, whatever it is sent; the rest of the
/// requests are dropped.
pub const ANSWERS_PER_SECOND: u32 = 10;
/// Longest text field (job id, kind, queue, names) an answer carries.
const MAX_FIELD: usize = 255;

/// What `warren inflight` asks every worker: the jobs it runs, of one queue or of all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Only jobs of this queue; `None`: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
}

/// A request as a worker received it, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub request: Request,
    /// Where the answer goes: a direct reply-to address.
    pub reply_to: ShortString,
    /// The requester's correlation id, echoed on the answer.
    pub correlation_id: Option<ShortString>,
}

/// Why a worker ignores a control message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("not a warren.inflight request (type {0:?})")]
    Kind(Option<String>),
    #[error("reply_to is not a direct reply-to address")]
    ReplyTo,
    #[error("the body is {0} bytes, over {MAX_REQUEST_BYTES}")]
    TooLarge(usize),
    #[error("the body is not a request: {0}")]
    Body(String),
    #[error("invalid queue name in the request")]
    Queue,
}

impl Request {
    /// The request's body and properties (`reply_to` is [`DIRECT_REPLY_TO`]).
    pub fn encode(&self, correlation_id: &str) -> (Vec<u8>, BasicProperties) {
        // A struct of one optional string always serialises.
        let body = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(REQUEST_KIND.into())
            .with_app_id(APP_ID.into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        if let Ok(id) = ShortString::try_new(correlation_id) {
            properties = properties.with_correlation_id(id);
        }
        (body, properties)
    }

    /// Checks a control message: its type, where the answer would go, its body.
    pub fn decode(properties: &BasicProperties, body: &[u8]) -> Result<Received, RequestError> {
        let kind = properties.kind().as_ref().map(|k| k.as_str());
        if kind != Some(REQUEST_KIND) {
            return Err(RequestError::Kind(
                kind.map(|k| k.chars().take(64).collect()),
            ));
        }
        // The whole shape, not just the prefix: RabbitMQ 3.x would crash the answering channel on
        // a forged address ([`crate::reply::answerable_address`]).
        let reply_to = crate::reply::answerable_address(properties).ok_or(RequestError::ReplyTo)?;
        if body.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooLarge(body.len()));
        }
        let request: Request =
            serde_json::from_slice(body).map_err(|err| RequestError::Body(err.to_string()))?;
        if let Some(queue) = &request.queue
            && crate::topology::validate_queue_name(queue).is_err()
        {
            return Err(RequestError::Queue);
        }
        let correlation_id = properties.correlation_id().clone().filter(|id| {
            id.as_str().len() <= 64 && id.as_str().bytes().all(|b| b.is_ascii_graphic())
        });
        Ok(Received {
            request,
            reply_to,
            correlation_id,
        })
    }
}

/// One worker process's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    pub worker: WorkerInfo,
    /// The jobs its handlers run now.
    pub jobs: Vec<RunningJob>,
    /// Some jobs were left out to keep the answer under [`MAX_ANSWER_BYTES`].
    #[serde(default)]
    pub truncated: bool,
}

/// Who answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Its consuming connection's name (as `rabbitmqctl list_connections` and the management UI
    /// show it).
    pub connection: String,
    pub host: String,
    pub pid: u32,
}

/// A job a worker's handler is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    pub id: String,
    pub kind: String,
    pub queue: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When its handler started, in milliseconds since the Unix epoch (the worker's clock).
    pub started_at_ms: u64,
    /// How long its handler has been running, by the worker's monotonic clock.
    pub running_ms: u64,
    /// Its queue's `job_timeout`, in milliseconds.
    pub job_timeout_ms: u64,
}

impl RunningJob {
    /// Running past its queue's `job_timeout`: a handler that Warren could not stop (one that
    /// blocks its thread), stuck until the broker's consumer timeout takes the job back.
    pub fn overdue(&self) -> bool {
        self.running_ms > self.job_timeout_ms
    }

    pub fn running_for(&self) -> Duration {
        Duration::from_millis(self.running_ms)
    }

    pub fn job_timeout(&self) -> Duration {
        Duration::from_millis(self.job_timeout_ms)
    }
}

/// Why an answer was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("not an answer to this request")]
    Unrelated,
    #[error("the answer is {0} bytes, over {MAX_ANSWER_BYTES}")]
    TooLarge(usize),
    #[error("the body is not an answer: {0}")]
    Body(String),
}

impl Answer {
    /// The answer's body (at most [`MAX_ANSWER_BYTES`]: jobs that do not fit are left out, and
    /// `truncated` says so) and properties (echoing the request's correlation id). Text fields
    /// are cut to 255 bytes.
    pub fn encode(&self, correlation_id: Option<&ShortString>) -> (Vec<u8>, BasicProperties) {
        let mut answer = self.clone();
        for job in &mut answer.jobs {
            for field in [&mut job.id, &mut job.kind, &mut job.queue] {
                cut(field);
            }
        }
        cut(&mut answer.worker.connection);
        cut(&mut answer.worker.host);
        let mut body = to_json(&answer);
        if body.len() > MAX_ANSWER_BYTES {
            answer.truncated = true;
            // Each job is at most ~1 KiB of JSON: keep as many as the limit leaves room for.
            let mut keep = answer.jobs.len();
            while body.len() > MAX_ANSWER_BYTES && keep > 0 {
                keep = keep.saturating_sub((body.len() - MAX_ANSWER_BYTES) / 1024 + 1);
                answer.jobs.truncate(keep);
                body = to_json(&answer);
            }
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(ANSWER_KIND.into())
            .with_app_id(APP_ID.into());
        if let Some(id) = correlation_id {
            properties = properties.with_correlation_id(id.clone());
        }
        (body, properties)
    }

    /// Reads an answer to the request with `correlation_id`.
    pub fn decode(
        properties: &BasicProperties,
        body: &[u8],
        correlation_id: &str,
    ) -> Result<Answer, AnswerError> {
        let kind = properties.kind().as_ref().map(|k| k.as_str());
        let correlation = properties.correlation_id().as_ref().map(|c| c.as_str());
        if kind != Some(ANSWER_KIND) || correlation != Some(correlation_id) {
            return Err(AnswerError::Unrelated);
        }
        if body.len() > MAX_ANSWER_BYTES {
            return Err(AnswerError::TooLarge(body.len()));
        }
        let mut answer: Answer =
            serde_json::from_slice(body).map_err(|err| AnswerError::Body(err.to_string()))?;
        for job in &mut answer.jobs {
            for field in [&mut job.id, &mut job.kind, &mut job.queue] {
                cut(field);
            }
        }
        cut(&mut answer.worker.connection);
        cut(&mut answer.worker.host);
        Ok(answer)
    }
}

/// `text` cut to at most [`MAX_FIELD`] bytes, on a character boundary.
fn cut(text: &mut String) {
    if text.len() > MAX_FIELD {
        let end = (0..=MAX_FIELD)
            .rev()
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(0);
        text.truncate(end);
    }
}

fn to_json(answer: &Answer) -> Vec<u8> {
    // Strings and numbers only: serialising cannot fail.
    serde_json::to_vec(answer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_properties(reply_to: &str) -> BasicProperties {
        BasicProperties::default()
            .with_type(REQUEST_KIND.into())
            .with_reply_to(reply_to.into())
            .with_correlation_id("c1".into())
    }

    #[test]
    fn only_well_formed_requests_to_direct_reply_to_addresses_are_answered() {
        // As RabbitMQ 4.3.6 wrote it.
        let address = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyOTgzNDU5NgAAeTgAAAAAaw1GGQ==.\
                       cYzz4F8o/YBxcoTwnEEQSQ==";
        let got = Request::decode(&request_properties(address), br#"{"queue":"emails"}"#)
            .expect("well-formed");
        assert_eq!(got.request.queue.as_deref(), Some("emails"));
        assert_eq!(got.reply_to.as_str(), address);
        assert_eq!(got.correlation_id.as_ref().map(|c| c.as_str()), Some("c1"));
        assert!(Request::decode(&request_properties(address), b"{}").is_ok());

        for hostile in [
            "emails",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "x.amq",
            "amq.rabbitmq.reply-to.AAAA.BBBB",
        ] {
            assert_eq!(
                Request::decode(&request_properties(hostile), b"{}"),
                Err(RequestError::ReplyTo),
                "{hostile}"
            );
        }
        let bad_bodies: [&[u8]; 4] = [
            b"not json",
            br#"{"queue":"amq.x"}"#,
            br#"{"queue":"q","extra":1}"#,
            br#"{"queue":5}"#,
        ];
        for body in bad_bodies {
            assert!(Request::decode(&request_properties(address), body).is_err());
        }
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert!(matches!(
            Request::decode(&request_properties(address), &big),
            Err(RequestError::TooLarge(_))
        ));
        let untyped = BasicProperties::default().with_reply_to(address.into());
        assert!(matches!(
            Request::decode(&untyped, b"{}"),
            Err(RequestError::Kind(None))
        ));
    }

    fn job(n: usize) -> RunningJob {
        RunningJob {
            id: format!("job-{n}"),
            kind: "k".repeat(300),
            queue: "q".into(),
            attempt: 1,
            started_at_ms: 1,
            running_ms: 2_000,
            job_timeout_ms: 1_000,
        }
    }

    #[test]
    fn answers_are_capped_and_read_back() {
        let answer = Answer {
            worker: WorkerInfo {
                connection: "warren-worker h:1 consume".into(),
                host: "h".into(),
                pid: 1,
            },
            jobs: (0..2000).map(job).collect(),
            truncated: false,
        };
        let correlation = ShortString::from("c1");
        let (body, properties) = answer.encode(Some(&correlation));
        assert!(body.len() <= MAX_ANSWER_BYTES, "{}", body.len());
        let read = Answer::decode(&properties, &body, "c1").expect("reads");
        assert!(read.truncated);
        assert!(!read.jobs.is_empty() && read.jobs.len() < 2000);
        assert_eq!(read.jobs[0].kind.len(), 255);
        assert!(read.jobs[0].overdue());
        assert_eq!(
            Answer::decode(&properties, &body, "other"),
            Err(AnswerError::Unrelated)
        );
        assert!(Answer::decode(&properties, b"[]", "c1").is_err());
    }
}
