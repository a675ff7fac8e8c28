//! Micro-benchmarks of the per-job work outside the broker: encoding a job, decoding a
//! delivery, building a retry copy, and turning a delay into its route.
//!
//! ```text
//! cargo bench -p warren-core --bench envelope
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde::de::DeserializeOwned;
use serde_json::Value;
use warren_core::envelope::{self, DecodeError, Job, Message, NewJob, PayloadError};
use warren_core::{delay, topology};

fn payload() -> Value {
    serde_json::json!({
        "user_id": 42, "action": "send-welcome-email", "email": "someone@example.com",
        "template": "welcome-v2", "locale": "en-GB", "attempt_hint": 0, "pad": "xxxxxxxxxxxxxxxx"
    })
}

/// What a typed handler of the payload above might read.
#[derive(serde::Deserialize)]
#[allow(dead_code)] // read by the parse only
struct Welcome {
    user_id: u64,
    email: String,
    template: String,
}

/// What a worker does with a delivery before its handler runs: decode, then read the payload.
fn decode<P: DeserializeOwned>(
    message: &Message,
) -> (Result<Job, DecodeError>, Result<P, PayloadError>) {
    (
        Job::decode(&message.properties, &message.body, 1 << 20),
        envelope::parse_payload::<P>(&message.body),
    )
}

fn envelope(c: &mut Criterion) {
    let job = NewJob::new("emails", "send", &payload());
    c.bench_function("encode ~150-byte job", |b| {
        b.iter(|| black_box(&job).encode(1 << 20))
    });

    let message = job.encode(1 << 20).expect("encodes");
    c.bench_function("decode ~150-byte job", |b| {
        b.iter(|| decode::<Value>(black_box(&message)))
    });
    c.bench_function("decode ~150-byte job, typed payload", |b| {
        b.iter(|| decode::<Welcome>(black_box(&message)))
    });
    c.bench_function("retry copy properties", |b| {
        b.iter(|| envelope::retry_properties(black_box(&message.properties), 2))
    });
}

fn delays(c: &mut Criterion) {
    c.bench_function("delay route for 37 s", |b| {
        b.iter(|| {
            topology::delay_route(
                delay::whole_seconds(black_box(Duration::from_secs(37))),
                "emails",
            )
        })
    });
}

criterion_group!(benches, envelope, delays);
criterion_main!(benches);
