//! The `warren-worker` command line, for any worker binary: `warren-worker` itself runs it with
//! the built-in kinds; a binary with handlers of its own runs it with those (the way a Celery
//! app gets `celery worker`):
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     warren_workers::cli::main(|registry| {
//!         registry.register("resize", |_payload: serde_json::Value, _ctx| async move { Ok(None) });
//!     })
//! }
//! ```
//!
//! It parses `--queue` (repeatable), `--concurrency`, `--config` and `--http` (the
//! `/healthz`, `/readyz` and `/metrics` listener, [`warren_core::probes`]), logs to stdout through a
//! background writer (so a slow terminal or pipe never stalls the jobs; `RUST_LOG` sets the
//! level, default `info` = one line per job; `--log-format json` for JSON lines, and with the
//! `otel` feature spans over OTLP: [`crate::telemetry`]), and stops gracefully on SIGTERM or
//! SIGINT.
//! [`main_with`] also lets the binary adjust the [`Worker`] before it runs, e.g. to add an
//! [`on_settled`](Worker::on_settled) hook.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_core::metrics::Metrics;
use warren_core::probes::{self, Health};

pub use crate::telemetry::LogFormat;
use crate::{Registry, Worker};

#[derive(Parser)]
#[command(version, about = "Run Warren jobs from RabbitMQ queues")]
struct Args {
    /// Queue to consume (repeatable).
    #[arg(long = "queue", required = true)]
    queues: Vec<String>,
    /// Jobs run at once (default: worker.concurrency from the config, 16).
    #[arg(long)]
    concurrency: Option<u16>,
    /// Config file (default: $WARREN_CONFIG, else config/warren.toml if present).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve /healthz, /readyz and /metrics on this address, e.g. 127.0.0.1:9090 (default:
    /// worker.http from the config, $WARREN_WORKER_HTTP; off unless set).
    #[arg(long, value_name = "ADDR")]
    http: Option<String>,
    /// Log lines as text, or as one JSON object per line (job id, queue, kind, attempt,
    /// outcome, duration, trace id).
    #[arg(long, value_enum, env = "WARREN_LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Runs a worker process with the handlers `register` adds, until SIGTERM or SIGINT.
pub fn main(register: impl FnOnce(&mut Registry)) -> ExitCode {
    main_with(register, |worker| worker)
}

/// [`main`], with `customise` applied to the [`Worker`] (its queues added) before it runs.
pub fn main_with(
    register: impl FnOnce(&mut Registry),
    customise: impl FnOnce(Worker) -> Worker,
) -> ExitCode {
    let args = Args::parse();
    let _flush_on_exit = init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            tracing::error!("cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut registry = Registry::new();
    register(&mut registry);
    match runtime.block_on(run(args, registry, customise)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", warren_core::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// Log lines the background writer may fall behind by before logging waits. The buffer is
/// allocated whole up front, so it is kept small (tracing-appender's default, 128,000 lines,
/// costs about 4 MiB of memory).
const LOG_BUFFER_LINES: usize = 4096;

/// Logs to stdout from a background thread, as text or JSON lines ([`crate::telemetry`]), and
/// exports spans when OTLP is configured (feature `otel`). Lines are never dropped: if the
/// writer falls more than its buffer behind, logging waits. Keep the guard until exit (it
/// exports the last spans, then flushes the lines).
pub fn init_logging(format: LogFormat) -> Logging {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("warren-log")
        .finish(std::io::stdout());
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let telemetry = crate::telemetry::init(crate::telemetry::Options {
        format,
        default_filter: "info,lapin=warn",
        ansi: std::io::IsTerminal::is_terminal(&std::io::stdout()) && !no_color,
        writer,
        service_name: "warren-worker",
    });
    Logging {
        _telemetry: telemetry,
        _writer: guard,
    }
}

/// What [`init_logging`] started; dropped at exit: spans exported first, then the log lines
/// flushed (fields drop in this order).
pub struct Logging {
    _telemetry: crate::telemetry::Telemetry,
    _writer: tracing_appender::non_blocking::WorkerGuard,
}

async fn run(
    args: Args,
    registry: Registry,
    customise: impl FnOnce(Worker) -> Worker,
) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(concurrency) = args.concurrency {
        config.worker.concurrency = concurrency;
        config.validate()?;
    }
    if let Some(address) = args.http {
        config.worker.http = Some(address);
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(crate::worker::stop_on_signal(shutdown.clone()));
    // Bound before the worker starts, so that a bad or busy address stops it at once.
    let probes = match config.worker.http.clone() {
        Some(address) => Some(Probes::bind(&address).await?),
        None => None,
    };
    let mut worker = Worker::new(config, registry);
    if let Some(probes) = &probes {
        worker = worker
            .metrics(probes.metrics.clone())
            .health(probes.health.clone());
    }
    let worker = args.queues.into_iter().fold(worker, Worker::queue);
    let listening = probes.map(|probes| tokio::spawn(probes.serve(shutdown.clone())));
    let result = customise(worker).run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(listening) = listening {
        let _ = listening.await;
    }
    result?;
    Ok(())
}

/// The worker's HTTP listener (`--http`): `/healthz`, `/readyz` and `/metrics`
/// ([`warren_core::probes`]).
struct Probes {
    listener: tokio::net::TcpListener,
    metrics: std::sync::Arc<Metrics>,
    health: std::sync::Arc<Health>,
}

impl Probes {
    async fn bind(address: &str) -> anyhow::Result<Probes> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("cannot listen on --http {address}"))?;
        if let Ok(local) = listener.local_addr() {
            tracing::info!("serving /healthz, /readyz and /metrics on http://{local}");
        }
        Ok(Probes {
            listener,
            metrics: Metrics::new(),
            health: Health::new(),
        })
    }

    async fn serve(self, shutdown: CancellationToken) {
        let router = probes::router(self.metrics, self.health);
        if let Err(err) = probes::serve(self.listener, router, shutdown).await {
            tracing::error!("the /healthz, /readyz and /metrics listener failed: {err}");
        }
    }
}
