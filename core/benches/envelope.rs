//! Micro-benchmarks of the per-job work outside the broker: encoding a job, decoding a
//! delivery, building a retry copy, and turning a delay into its route.
//!
//! ```text
//! cargo bench -p warren-core --bench envelope
//! ```

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use warren_core::envelope::{self, Job, NewJob};
use warren_core::{delay, topology};

fn payload() -> serde_json::Value {
    serde_json::json!({
        "user_id": 42, "action": "send-welcome-email", "email": "someone@example.com",
        "template": "welcome-v2", "locale": "en-GB", "attempt_hint": 0, "pad": "xxxxxxxxxxxxxxxx"
    })
}

fn envelope(c: &mut Criterion) {
    let job = NewJob::new("emails", "send", &payload());
    c.bench_function("encode ~150-byte job", |b| {
        b.iter(|| black_box(&job).encode(1 << 20))
    });

    let message = job.encode(1 << 20).expect("encodes");
    c.bench_function("decode ~150-byte job", |b| {
        b.iter(|| {
            Job::decode(
                black_box(&message.properties),
                black_box(&message.body),
                1 << 20,
            )
        })
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
