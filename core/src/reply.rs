//! Results: the message a worker sends back to a producer waiting for a job's outcome
//! (`warren submit --wait`, `Dispatcher::submit_and_wait`), through RabbitMQ's direct reply-to
//! (<https://www.rabbitmq.com/docs/direct-reply-to>).
//!
//! 1. The waiting producer consumes the pseudo-queue [`DIRECT_REPLY_TO`] (no-ack) on a channel,
//!    and on that same channel publishes its job with `reply_to = amq.rabbitmq.reply-to`; the
//!    broker rewrites that into an address of the channel, `amq.rabbitmq.reply-to.<opaque>`.
//! 2. When the job's outcome is final — done, or dead-lettered (a permanent failure, the last
//!    attempt failed, malformed, unknown kind) — the worker publishes a [`Reply`] to the
//!    default exchange with that address as routing key ([`reply_address`]). No reply for an
//!    attempt that will be retried, and none when the broker dead-letters the job itself (its
//!    delivery limit): the waiter then times out.
//! 3. The broker hands it straight to the waiting channel. Nothing is stored: a reply whose
//!    waiter is gone (timed out, disconnected) is dropped by the broker, and the job's outcome
//!    is then only in the logs and, for a failure, in `<queue>.dead`.
//!
//! A producer writes `reply_to`, so it is untrusted: a worker replies only to a direct reply-to
//! address (the [`REPLY_PREFIX`] and a short opaque suffix), never to a queue name, which would
//! let anyone who may submit a job make workers publish into any queue of the vhost. A reply's
//! body is capped at [`MAX_REPLY_BYTES`]: a bigger handler result is left out and the reply
//! says so.

use lapin::BasicProperties;
use lapin::types::ShortString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::{self, CONTENT_TYPE};

/// The pseudo-queue a waiting producer consumes, and the `reply_to` it writes on its job.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
/// What the broker turns [`DIRECT_REPLY_TO`] into on the delivered job: this prefix and an
/// opaque suffix naming the waiting channel.
pub const REPLY_PREFIX: &str = "amq.rabbitmq.reply-to.";
/// The largest reply body a worker sends; a handler result that would make it bigger is left
/// out (`result_omitted` says why).
pub const MAX_REPLY_BYTES: usize = 64 * 1024;
/// The `type` property of a reply.
pub const REPLY_KIND: &str = "warren.result";

/// A job's final outcome, as sent to its waiter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The job id.
    pub id: String,
    /// Attempts made (the last one included; 0 for a message that was not a job).
    pub attempts: u32,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// How the job ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The handler returned `Ok`: its JSON result (`null` for none).
    Done {
        #[serde(default)]
        result: Value,
        /// Set when the result was too big to send ([`MAX_REPLY_BYTES`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        result_omitted: Option<String>,
    },
    /// Dead-lettered: the class (`permanent`, `exhausted`, `malformed`, ...) and reason, as in
    /// the dead letter's headers.
    Failed { class: String, reason: String },
}

impl Reply {
    /// The reply's body (JSON, at most [`MAX_REPLY_BYTES`]) and properties.
    pub fn encode(&self) -> (Vec<u8>, BasicProperties) {
        let mut reply = self.clone();
        if let Outcome::Failed { reason, .. } = &mut reply.outcome {
            *reason = envelope::capped(reason, envelope::MAX_ERROR_BYTES).into_owned();
        }
        reply.id = envelope::capped(&reply.id, 255).into_owned();
        let mut body = to_json(&reply);
        if body.len() > MAX_REPLY_BYTES
            && let Outcome::Done { result, .. } = &reply.outcome
        {
            let note = format!(
                "the result is {} bytes of JSON, over the {MAX_REPLY_BYTES}-byte reply limit",
                result.to_string().len()
            );
            reply.outcome = Outcome::Done {
                result: Value::Null,
                result_omitted: Some(note),
            };
            body = to_json(&reply);
        }
        let mut properties = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(REPLY_KIND.into())
            .with_app_id(envelope::APP_ID.into());
        if let Ok(id) = ShortString::try_new(reply.id.as_str()) {
            properties = properties.with_correlation_id(id);
        }
        (body, properties)
    }

    /// Reads a reply's body. Anything but a reply is an error (the waiter reports it).
    pub fn decode(body: &[u8]) -> Result<Reply, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

fn to_json(reply: &Reply) -> Vec<u8> {
    // Serialising a struct of strings, numbers and a `Value` cannot fail.
    serde_json::to_vec(reply).unwrap_or_default()
}

/// Where to send the reply for a delivered job: its `reply_to` if that is a direct reply-to
/// address (the [`REPLY_PREFIX`], then 1 to 200 visible ASCII characters); `None` for no
/// `reply_to`, and for anything else a producer wrote (a queue name above all).
pub fn reply_address(properties: &BasicProperties) -> Option<ShortString> {
    let address = properties.reply_to().as_ref()?;
    let suffix = address.as_str().strip_prefix(REPLY_PREFIX)?;
    let opaque =
        !suffix.is_empty() && suffix.len() <= 200 && suffix.bytes().all(|b| b.is_ascii_graphic());
    opaque.then(|| address.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_reply_to(address: &str) -> BasicProperties {
        BasicProperties::default().with_reply_to(address.into())
    }

    #[test]
    fn only_direct_reply_to_addresses_are_answered() {
        let good = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNzk2NjYzOAAAAAAGAAAAAAAAAAA=";
        assert_eq!(
            reply_address(&with_reply_to(good)).map(|a| a.to_string()),
            Some(good.to_owned())
        );
        for hostile in [
            "emails",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "amq.rabbitmq.reply-to.a b",
            "xamq.rabbitmq.reply-to.abc",
        ] {
            assert_eq!(reply_address(&with_reply_to(hostile)), None, "{hostile}");
        }
        assert_eq!(reply_address(&BasicProperties::default()), None);
    }

    #[test]
    fn replies_round_trip_and_big_results_are_left_out() {
        let done = Reply {
            id: "j1".into(),
            attempts: 2,
            outcome: Outcome::Done {
                result: serde_json::json!({"n": 1}),
                result_omitted: None,
            },
        };
        let (body, properties) = done.encode();
        assert_eq!(Reply::decode(&body).expect("decodes"), done);
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some("j1")
        );
        let text: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(text["status"], "done");

        let big = Reply {
            outcome: Outcome::Done {
                result: Value::String("x".repeat(MAX_REPLY_BYTES)),
                result_omitted: None,
            },
            ..done
        };
        let (body, _) = big.encode();
        assert!(body.len() <= MAX_REPLY_BYTES);
        let Outcome::Done {
            result,
            result_omitted,
        } = Reply::decode(&body).expect("decodes").outcome
        else {
            panic!("still done");
        };
        assert_eq!(result, Value::Null);
        assert!(result_omitted.expect("says why").contains("reply limit"));

        let failed = Reply {
            id: "j2".into(),
            attempts: 3,
            outcome: Outcome::Failed {
                class: "exhausted".into(),
                reason: "é".repeat(10_000),
            },
        };
        let (body, _) = failed.encode();
        assert!(body.len() < 4096, "{}", body.len());
        let text: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(text["status"], "failed");
        assert_eq!(text["class"], "exhausted");
    }
}
