//! `fault-worker`: a Warren worker process for the fault-injection suite (`tests/src/fault/`).
//!
//! Built on the warren-workers library exactly like `warren-worker`, with handlers that record
//! every job they finish in an independent sink: the file named by `$WARREN_SINK`, opened for
//! appending, one line per handled job, written with a single `write` after the handler's work
//! and before it returns `Ok` — so an ack lost in a crash shows up as a duplicate line, never as
//! a missing one. A line is `<job id> <pid> <handler start, ms since epoch> <recorded, ms>`; the
//! id comes first and is all that is counted, the rest times the recovery.
//!
//! Kinds:
//! - `echo`: record, done;
//! - `sleep` `{"ms": N}`: sleep N ms, record, done;
//! - `abort`: `std::process::abort()` — a poison job that kills the process every time;
//! - `hang`: on its first delivery (not `redelivered`) never returns; on a redelivery records
//!   and is done (the consumer-timeout scenario).
//!
//! Usage: `fault-worker --queue Q [--queue Q2 ...] [--concurrency N]`, with `WARREN_CONFIG`,
//! `WARREN_AMQP_URL` and `WARREN_SINK` in the environment. SIGTERM/SIGINT shut down gracefully.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_workers::{HandlerResult, JobContext, JobError, Registry, Worker};

/// Where handled jobs are recorded.
struct Sink {
    file: File,
}

impl Sink {
    fn open(path: &str) -> std::io::Result<Sink> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Sink { file })
    }

    /// One line per job, in one `write` (O_APPEND keeps concurrent lines whole, even across
    /// processes sharing the file), then flush.
    fn record(&self, ctx: &JobContext, started_ms: u128) -> Result<(), JobError> {
        let line = format!(
            "{} {} {} {}\n",
            ctx.id,
            std::process::id(),
            started_ms,
            now_ms()
        );
        let mut file = &self.file;
        file.write_all(line.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|err| JobError::retry(format!("cannot write the sink: {err}")))
    }
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn registry(sink: Arc<Sink>) -> Registry {
    let mut registry = Registry::new();
    let s = sink.clone();
    registry.register("echo", move |_payload: Value, ctx: JobContext| {
        let sink = s.clone();
        async move {
            let started = now_ms();
            sink.record(&ctx, started)?;
            Ok(None)
        }
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
            sink.record(&ctx, started)?;
            Ok(None)
        }
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
    let s = sink;
    registry.register("hang", move |_payload: Value, ctx: JobContext| {
        let sink = s.clone();
        async move {
            let started = now_ms();
            if !ctx.redelivered {
                tracing::warn!(job = %ctx.id, "hang: first delivery, never returning");
                std::future::pending::<()>().await;
            }
            sink.record(&ctx, started)?;
            Ok(None)
        }
    });
    registry
}

struct Args {
    queues: Vec<String>,
    concurrency: Option<u16>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        queues: Vec::new(),
        concurrency: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--queue" => args.queues.push(it.next().ok_or("--queue needs a value")?),
            "--concurrency" => {
                let value = it.next().ok_or("--concurrency needs a value")?;
                args.concurrency = Some(value.parse().map_err(|_| "bad --concurrency")?);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    if args.queues.is_empty() {
        return Err("give at least one --queue".into());
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .with_ansi(false)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let args = parse_args()?;
    let sink_path = std::env::var("WARREN_SINK").map_err(|_| "set WARREN_SINK to a file path")?;
    let sink = Arc::new(Sink::open(&sink_path).map_err(|e| format!("{sink_path}: {e}"))?);
    let mut config = Config::load(None).map_err(|e| e.to_string())?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(concurrency) = args.concurrency {
        config.worker.concurrency = concurrency;
        config.validate().map_err(|e| e.to_string())?;
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(warren_workers::worker::stop_on_signal(shutdown.clone()));
    let worker = args
        .queues
        .into_iter()
        .fold(Worker::new(config, registry(sink)), Worker::queue);
    worker
        .run(shutdown)
        .await
        .map_err(|e| warren_core::error_chain(&e))
}
