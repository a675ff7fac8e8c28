//! `fault-worker`: the `warren-worker` command line ([`warren_workers::cli`]) with recording
//! handlers, for the fault-injection suite (`tests/src/fault/`) and the worker-process tests.
//! Arguments, config, logging, signals and shutdown are exactly those of `warren-worker`; only
//! the job kinds differ, and every outcome is written to an independent sink
//! ([`warren_tests::sink`]): `$WARREN_SINK` gets a line per job a handler finished,
//! `$WARREN_SETTLED` (optional) a line per delivery settled, from the worker's `on_settled`
//! hook.
//!
//! Kinds:
//! - `echo`: record, done;
//! - `sleep` `{"ms": N}`: sleep N ms, record, done (no `ms`: a permanent failure);
//! - `flaky` `{"times": K, "ms": N}` (K defaults to 1, N to 0): a retryable failure while the
//!   attempt is at most K, then sleep, record, done;
//! - `fail` `{"ms": N}`: sleep N ms (default 0), then a permanent failure (dead-lettered);
//! - `abort`: `std::process::abort()`, a poison job that kills the process every time;
//! - `stuck` `{"ms": N}`: on its first delivery (not `redelivered`) blocks its thread for N ms
//!   (blocking code that `job_timeout` cannot stop), then fails retryably; on a redelivery
//!   records and is done (the consumer-timeout scenario).
//!
//! Usage: as `warren-worker` (`--queue Q ... [--concurrency N] [--config FILE]`), with
//! `WARREN_SINK` (and `WARREN_SETTLED`) in the environment.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use warren_tests::sink::{SinkWriter, now_ms};
use warren_workers::{HandlerResult, JobContext, JobError, Registry};

fn main() -> ExitCode {
    let sink = match SinkWriter::from_env() {
        Ok(sink) => Arc::new(sink),
        Err(err) => {
            eprintln!("fault-worker: {err}");
            return ExitCode::FAILURE;
        }
    };
    let hook = sink.clone();
    warren_workers::cli::main_with(
        |registry| register(registry, &sink),
        move |worker| {
            if !hook.records_settlements() {
                return worker;
            }
            worker
                .on_settled(move |settled| hook.settled(settled.id, settled.outcome, settled.sent))
        },
    )
}

/// `flaky`'s payload.
#[derive(Deserialize)]
struct Flaky {
    #[serde(default = "one")]
    times: u32,
    #[serde(default)]
    ms: u64,
}

fn one() -> u32 {
    1
}

/// `fail`'s payload.
/// `{"ms": N}` (default 0) of `fail` and `stuck`.
#[derive(Deserialize)]
struct Fail {
    #[serde(default)]
    ms: u64,
}

fn register(registry: &mut Registry, sink: &Arc<SinkWriter>) {
    let s = sink.clone();
    registry.register("echo", move |_payload: Value, ctx: JobContext| {
        let sink = s.clone();
        async move { record(&sink, &ctx, now_ms()) }
    });
    let s = sink.clone();
    registry.register("sleep", move |payload: Value, ctx: JobContext| {
        let sink = s.clone();
        async move {
            let started = now_ms();
            let ms = payload["ms"]
                .as_u64()
                .ok_or_else(|| JobError::permanent(r#"sleep wants {"ms": N}"#))?;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            record(&sink, &ctx, started)
        }
    });
    let s = sink.clone();
    registry.register("flaky", move |flaky: Flaky, ctx: JobContext| {
        let sink = s.clone();
        async move {
            let started = now_ms();
            if ctx.attempt <= flaky.times {
                return Err(JobError::retry(format!(
                    "flaky: attempt {} of the first {} fails",
                    ctx.attempt, flaky.times
                )));
            }
            tokio::time::sleep(Duration::from_millis(flaky.ms)).await;
            record(&sink, &ctx, started)
        }
    });
    registry.register("fail", |fail: Fail, _ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_millis(fail.ms)).await;
        HandlerResult::Err(JobError::permanent("fail: this job always fails"))
    });
    registry.register("abort", |_payload: Value, ctx: JobContext| async move {
        eprintln!(
            "fault-worker: job {} is poison: aborting the process",
            ctx.id
        );
        std::process::abort();
        #[allow(unreachable_code)]
        HandlerResult::Ok(None)
    });
    let s = sink.clone();
    registry.register("stuck", move |stuck: Fail, ctx: JobContext| {
        let sink = s.clone();
        async move {
            let started = now_ms();
            if !ctx.redelivered {
                tracing::warn!(job = %ctx.id, "stuck: first delivery, blocking the thread");
                std::thread::sleep(Duration::from_millis(stuck.ms));
                return HandlerResult::Err(JobError::retry("stuck: failed after blocking"));
            }
            record(&sink, &ctx, started)
        }
    });
}

/// Writes the job's sink line; a sink that cannot be written fails the job (retryable), so
/// that nothing is done without being recorded.
fn record(sink: &SinkWriter, ctx: &JobContext, started_ms: u64) -> HandlerResult {
    sink.handled(&ctx.id.0, started_ms)
        .map_err(|err| JobError::retry(format!("cannot write the sink: {err}")))?;
    Ok(None)
}
