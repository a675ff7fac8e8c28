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
//! address as RabbitMQ writes them ([`answerable_address`]), never to a queue name, which would
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

/// A delivery's `reply_to` if it looks like a direct reply-to address (the [`REPLY_PREFIX`],
/// then 1 to 200 visible ASCII characters); `None` for no `reply_to` and for a queue name.
/// Not enough to answer safely on RabbitMQ 3.x: workers answer only [`answerable_address`].
pub fn reply_address(properties: &BasicProperties) -> Option<ShortString> {
    let address = properties.reply_to().as_ref()?;
    let suffix = address.as_str().strip_prefix(REPLY_PREFIX)?;
    let opaque =
        !suffix.is_empty() && suffix.len() <= 200 && suffix.bytes().all(|b| b.is_ascii_graphic());
    opaque.then(|| address.clone())
}

/// A delivery's `reply_to` if it is a direct reply-to address as RabbitMQ 3.x and 4.x write
/// them: `amq.rabbitmq.reply-to.<pid>.<key>`, where `<pid>` is the base64 of an Erlang pid in
/// the external term format and `<key>` a base64 token.
///
/// The whole shape is checked, not just the prefix: RabbitMQ 3.x decodes `<pid>` with an
/// unguarded `binary_to_term` (`rabbit_channel:decode_fast_reply_to`), so a forged address
/// like `amq.rabbitmq.reply-to.AAAA.BBBB` would crash the replying channel's process there,
/// and with it the worker's publishing connection, each time the job is delivered. RabbitMQ
/// 4.3.6 drops such a reply without complaint (measured).
pub fn answerable_address(properties: &BasicProperties) -> Option<ShortString> {
    let address = properties.reply_to().as_ref()?;
    let suffix = address.as_str().strip_prefix(REPLY_PREFIX)?;
    let (pid, key) = suffix.split_once('.')?;
    let token = |part: &str| {
        !part.is_empty()
            && part.len() <= 160
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    };
    let shaped = token(pid) && token(key) && base64(pid).is_some_and(|t| is_erlang_pid(&t));
    shaped.then(|| address.clone())
}

/// Standard base64 with `=` padding, as Erlang's `base64:encode` writes it.
fn base64(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let value = |b: u8| -> Option<u32> {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    };
    let chunks = bytes.len() / 4;
    let mut out = Vec::with_capacity(chunks * 3);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && i + 1 != chunks) {
            return None;
        }
        let mut n = 0u32;
        for &b in &chunk[..4 - pad] {
            n = n << 6 | value(b)?;
        }
        n <<= 6 * pad;
        let decoded = n.to_be_bytes();
        out.extend_from_slice(&decoded[1..4 - pad]);
    }
    Some(out)
}

/// True when `term` is exactly one Erlang pid in the external term format (version 131;
/// `NEW_PID_EXT` or `PID_EXT`; its node an atom with an `@`), which `binary_to_term` decodes
/// without fail.
fn is_erlang_pid(term: &[u8]) -> bool {
    let [131, tag, rest @ ..] = term else {
        return false;
    };
    // The node: ATOM_EXT / ATOM_UTF8_EXT (2-byte length), SMALL_ATOM(_UTF8)_EXT (1 byte).
    let (length, rest) = match rest {
        [100 | 118, high, low, rest @ ..] => (usize::from(*high) << 8 | usize::from(*low), rest),
        [115 | 119, length, rest @ ..] => (usize::from(*length), rest),
        _ => return false,
    };
    let Some((node, ids)) = rest.split_at_checked(length) else {
        return false;
    };
    if !node.contains(&b'@') || std::str::from_utf8(node).is_err() {
        return false;
    }
    // ID and serial (4 bytes each), then creation: 4 bytes (NEW_PID_EXT) or 1 (PID_EXT).
    matches!((tag, ids.len()), (88, 12) | (103, 9))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_reply_to(address: &str) -> BasicProperties {
        BasicProperties::default().with_reply_to(address.into())
    }

    /// Standard base64 with padding, for the tests.
    fn encode(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk.iter().fold(0u32, |n, &b| n << 8 | u32::from(b));
            let n = n << (8 * (3 - chunk.len()));
            for i in 0..4 {
                match i <= chunk.len() {
                    true => out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])),
                    false => out.push('='),
                }
            }
        }
        out
    }

    #[test]
    fn only_direct_reply_to_addresses_are_answered() {
        // As RabbitMQ 4.3.6 wrote one.
        let v2 = "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyOTgzNDU5NgADCjoAAAAAaw1GGQ==.\
                  RTiGot1kzDK+6WtW9b+bXQ==";
        assert_eq!(
            answerable_address(&with_reply_to(v2)).map(|a| a.to_string()),
            Some(v2.to_owned())
        );
        // RabbitMQ 3.x: base64(term_to_binary(Pid)), NEW_PID_EXT with ATOM_UTF8_EXT, and
        // PID_EXT with ATOM_EXT (older Erlang), for <0.1234.0> on rabbit@host.
        let mut new_pid = vec![131, 88, 118, 0, 11];
        new_pid.extend_from_slice(b"rabbit@host");
        new_pid.extend_from_slice(&[0, 0, 4, 210, 0, 0, 0, 0, 0, 0, 0, 1]);
        let mut old_pid = vec![131, 103, 100, 0, 11];
        old_pid.extend_from_slice(b"rabbit@host");
        old_pid.extend_from_slice(&[0, 0, 4, 210, 0, 0, 0, 0, 1]);
        for pid in [new_pid, old_pid] {
            let address = format!("{REPLY_PREFIX}{}.S2V5S2V5S2V5S2V5S2V5Kw==", encode(&pid));
            assert!(
                answerable_address(&with_reply_to(&address)).is_some(),
                "{address}"
            );
            assert_eq!(base64(&encode(&pid)), Some(pid));
        }
        for hostile in [
            "emails",
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.",
            "amq.rabbitmq.reply-to.a b",
            "xamq.rabbitmq.reply-to.abc",
            "amq.rabbitmq.reply-to.forged",
            // Valid base64, not a pid: would crash a RabbitMQ 3.x channel.
            "amq.rabbitmq.reply-to.AAAA.BBBB",
            "amq.rabbitmq.reply-to.g2gDZAAE.x",
            "amq.rabbitmq.reply-to.a.b.c",
            // The 4.3 address cut short, or with its padding broken.
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyOTgzNDU5NgADCjoAAAAAaw1G.x",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyOTgzNDU5NgADCjoAAAAAaw1GGQ=.x",
            "amq.rabbitmq.reply-to.g1h2AA5yZXBseUAy.cYzz4F8o/YBxcoTwnEEQSQ==",
        ] {
            assert_eq!(
                answerable_address(&with_reply_to(hostile)),
                None,
                "{hostile}"
            );
        }
        assert_eq!(answerable_address(&BasicProperties::default()), None);
        // The looser prefix check lets the forged ones through.
        assert!(reply_address(&with_reply_to("amq.rabbitmq.reply-to.AAAA.BBBB")).is_some());
        assert_eq!(reply_address(&with_reply_to("emails")), None);
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
