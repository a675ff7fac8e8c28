//! # warren-core
//!
//! What both sides of Warren need: the job envelope, the AMQP topology, configuration and
//! connecting to RabbitMQ. It knows nothing about command lines or job handlers.
//!
//! ## A job's life
//!
//! 1. **Submit** — the dispatcher ([`warren_dispatcher`]) encodes a [`envelope::NewJob`] into an
//!    AMQP message ([`envelope`]) and publishes it to [`topology::JOBS_EXCHANGE`] with publisher
//!    confirms and `mandatory` set ([`publish`]). The job id is returned only after the broker
//!    confirmed the message and did not return it as unroutable. Its `traceparent` header is the
//!    submit span's W3C trace context ([`trace`]), which every attempt's span names as parent.
//! 2. **Queue** — the exchange routes the job to its durable quorum queue ([`topology`]).
//! 3. **Consume** — a worker (`warren-workers`) receives it with a per-consumer prefetch,
//!    decodes it back into a [`envelope::Job`] and runs the handler registered for its kind.
//! 4. **Ack** — only after the handler finished. A crash before that leaves the job unacked, and
//!    the broker redelivers it to another worker.
//! 5. **Retry** — a retryable failure with attempts left is re-published with `attempt + 1` into
//!    the broker-held delay queues ([`delay`], [`topology`]), which hand it back to its work queue
//!    when the backoff delay has passed; only then is the original acked.
//! 6. **Dead-letter** — a permanent failure, exhausted retries or an undecodable message is
//!    published to `<queue>.dead` with the reason in its headers ([`envelope::DeadLetter`]), then
//!    acked. A job that keeps crashing workers reaches the same queue through the quorum queue's
//!    delivery limit.
//!
//! [`warren_dispatcher`]: https://docs.rs/warren-dispatcher

pub mod config;
pub mod connection;
pub mod delay;
pub mod envelope;
pub mod inflight;
pub mod metrics;
pub mod probes;
pub mod publish;
pub mod reply;
pub mod secret;
pub mod settings;
pub mod tls;
pub mod topology;
pub mod trace;

pub use config::{Config, ConfigError, QueueConfig};
pub use envelope::{Job, JobId, NewJob};

/// An error and its causes on one line, each cause shown only if its text is not already part
/// of the message before it (library errors often repeat their source in their own text).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(err) = cause {
        let more = err.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = err.source();
    }
    text
}
