//! Fuzzes job decoding: any message a plain AMQP client can send must decode into a job or a
//! `DecodeError`, never a panic; and a decoded job's retry and dead-letter copies must build.

#![no_main]

use arbitrary::Arbitrary;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use libfuzzer_sys::fuzz_target;
use warren_core::envelope::{self, DeadLetter, DeadReason, Job};

/// What a raw publisher controls: the properties Warren reads, a header table and the body.
#[derive(Debug, Arbitrary)]
struct Message {
    message_id: Option<String>,
    kind: Option<String>,
    content_type: Option<String>,
    user_id: Option<String>,
    expiration: Option<String>,
    headers: Vec<(String, Header)>,
    body: Vec<u8>,
    max_payload: u16,
}

#[derive(Debug, Arbitrary)]
enum Header {
    Long(i64),
    Int(i32),
    Short(i16),
    Byte(u8),
    Text(String),
    Bytes(Vec<u8>),
    Bool(bool),
    Double(f64),
    Void,
    Attempt(i64),
    Death(Vec<(String, String)>),
}

fn short(text: &str) -> Option<ShortString> {
    ShortString::try_new(text).ok()
}

fn value(header: Header) -> (Option<&'static str>, AMQPValue) {
    match header {
        Header::Long(n) => (None, AMQPValue::LongLongInt(n)),
        Header::Int(n) => (None, AMQPValue::LongInt(n)),
        Header::Short(n) => (None, AMQPValue::ShortInt(n)),
        Header::Byte(n) => (None, AMQPValue::ShortShortUInt(n)),
        Header::Text(s) => (None, AMQPValue::LongString(LongString::from(s))),
        Header::Bytes(b) => (None, AMQPValue::ByteArray(b.into())),
        Header::Bool(b) => (None, AMQPValue::Boolean(b)),
        Header::Double(d) => (None, AMQPValue::Double(d)),
        Header::Void => (None, AMQPValue::Void),
        Header::Attempt(n) => (Some(envelope::ATTEMPT), AMQPValue::LongLongInt(n)),
        Header::Death(entries) => {
            let mut table = FieldTable::default();
            for (k, v) in entries {
                if let Some(k) = short(&k) {
                    table.insert(k, AMQPValue::LongString(v.into()));
                }
            }
            (Some("x-death"), AMQPValue::FieldArray(vec![AMQPValue::FieldTable(table)].into()))
        }
    }
}

fuzz_target!(|message: Message| {
    let mut properties = BasicProperties::default();
    if let Some(id) = message.message_id.as_deref().and_then(short) {
        properties = properties.with_message_id(id);
    }
    if let Some(kind) = message.kind.as_deref().and_then(short) {
        properties = properties.with_type(kind);
    }
    if let Some(content_type) = message.content_type.as_deref().and_then(short) {
        properties = properties.with_content_type(content_type);
    }
    if let Some(user) = message.user_id.as_deref().and_then(short) {
        properties = properties.with_user_id(user);
    }
    if let Some(expiration) = message.expiration.as_deref().and_then(short) {
        properties = properties.with_expiration(expiration);
    }
    let mut headers = FieldTable::default();
    for (key, header) in message.headers {
        let (fixed_key, value) = value(header);
        if let Some(key) = short(fixed_key.unwrap_or(&key)) {
            headers.insert(key, value);
        }
    }
    let properties = properties.with_headers(headers);

    let _ = envelope::parse_payload::<serde_json::Value>(&message.body);
    let _ = envelope::check_json(&message.body);
    if let Ok(job) = Job::decode(&properties, &message.body, usize::from(message.max_payload)) {
        assert!(job.attempt >= 1);
        let retry = envelope::retry_properties(&properties, job.attempt.saturating_add(1));
        assert!(retry.user_id().is_none() && retry.expiration().is_none());
        let dead = DeadLetter {
            reason: DeadReason::Exhausted,
            error: "fuzz".into(),
            attempts: job.attempt,
            queue: "q".into(),
            worker: "w".into(),
        };
        let _ = dead.properties(&properties);
    }
});
