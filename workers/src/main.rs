//! `warren-worker`: a long-running worker process with the built-in job kinds.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_workers::{Registry, Worker, builtin};

#[derive(Parser)]
#[command(
    name = "warren-worker",
    version,
    about = "Run Warren jobs from RabbitMQ queues"
)]
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
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{}", warren_core::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut config = Config::load(args.config.as_deref())?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    if let Some(concurrency) = args.concurrency {
        config.worker.concurrency = concurrency;
        config.validate()?;
    }
    let mut registry = Registry::new();
    builtin::register(&mut registry);

    let shutdown = CancellationToken::new();
    tokio::spawn(warren_workers::worker::stop_on_signal(shutdown.clone()));
    let worker = args
        .queues
        .into_iter()
        .fold(Worker::new(config, registry), Worker::queue);
    worker.run(shutdown).await?;
    Ok(())
}
