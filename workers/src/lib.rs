//! # warren-workers
//!
//! The worker runtime: consume jobs from Warren queues, run the handler registered for each
//! job's kind, and settle every delivery: ack when done, retry through the broker's delay
//! queues, or dead-letter.
//!
//! - [`handler`]: what a job handler is, and the [`Registry`] of handlers by kind;
//! - [`worker`]: the process's life (connections, consumers, concurrency, shutdown);
//! - [`job`] (private): one delivery from decode to ack — where jobs are run, retried and
//!   dead-lettered;
//! - [`settle`] (private): each channel's settler, which sends the acks, batching runs of
//!   finished deliveries into one `multiple` ack;
//! - `inflight` (private): the jobs running now, and answering `warren inflight` about them;
//! - [`retry`]: the backoff schedule;
//! - [`builtin`]: the `echo`, `sleep` and `fail` kinds used by the demo and the tests;
//! - `cli` (cargo feature `cli`): the `warren-worker` command line, reusable by worker
//!   binaries with their own handlers; without the feature the crate pulls in no command-line
//!   dependencies.
//!
//! ```no_run
//! use warren_workers::{Registry, Worker};
//! # async fn example(config: warren_core::Config) -> Result<(), warren_workers::WorkerError> {
//! let mut registry = Registry::new();
//! registry.register("resize", |payload: serde_json::Value, _ctx| async move {
//!     let _ = payload; // ...
//!     Ok(None)
//! });
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! Worker::new(config, registry).queue("images").run(shutdown).await
//! # }
//! ```

pub mod builtin;
#[cfg(feature = "cli")]
pub mod cli;
pub mod handler;
mod inflight;
mod job;
pub mod retry;
mod settle;
#[cfg(feature = "cli")]
pub mod telemetry;
mod watchdog;
pub mod worker;

pub use handler::{HandlerResult, JobContext, JobError, Registry};
pub use settle::{SettleHook, Settled};
pub use worker::{Worker, WorkerError};
