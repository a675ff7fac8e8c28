//! `warren`: submit jobs and manage Warren's topology from the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use warren_core::Config;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::cli::{self, PayloadSource};

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Submit jobs to Warren queues on RabbitMQ"
)]
struct Args {
    /// Config file (default: $WARREN_CONFIG, else config/warren.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job (payload from --payload, --payload-file or stdin), or a file of jobs.
    Submit {
        #[arg(long)]
        queue: String,
        /// Job kind (required unless --file is given).
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        kind: Option<String>,
        /// The JSON payload.
        #[arg(long, conflicts_with_all = ["payload_file", "file"])]
        payload: Option<String>,
        /// Read the JSON payload from a file.
        #[arg(long, conflicts_with = "file")]
        payload_file: Option<PathBuf>,
        /// Job id (default: a new UUIDv7).
        #[arg(long, conflicts_with = "file")]
        id: Option<String>,
        /// Submit one job per line: {"kind": "...", "payload": ...}. `-` reads stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Declare exchanges and queues.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// Show messages of a dead-letter queue (QUEUE.dead) without removing them. On a work
    /// queue under RabbitMQ 3.x, a peek counts as a delivery towards its delivery limit.
    Peek {
        #[arg(long)]
        queue: String,
        #[arg(long, default_value_t = 10)]
        count: usize,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare the shared exchanges, the delay queues and every configured queue (idempotent).
    Apply {
        /// Also declare this queue (repeatable).
        #[arg(long)]
        queue: Vec<String>,
    },
    /// Like apply, and replace each of Warren's queues that exists with other arguments (an
    /// older Warren's dead-letter queues, changed queue settings), keeping its messages. Stop
    /// the workers of those queues first.
    Migrate {
        /// Also declare (and migrate) this queue (repeatable).
        #[arg(long)]
        queue: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,lapin=off".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(tracing_subscriber::filter::filter_fn(|event| {
            warren_core::secret::safe_to_log(event.target(), *event.level())
        }))
        .init();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", warren_core::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::load(args.config.as_deref())?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let dispatcher = Dispatcher::connect(&config)
        .await
        .context("connecting to RabbitMQ")?;
    let result = match &args.command {
        Command::Submit {
            queue,
            file: Some(file),
            ..
        } => cli::submit_file(&dispatcher, queue, file).await,
        Command::Submit {
            queue,
            kind,
            payload,
            payload_file,
            id,
            file: None,
        } => {
            let source = match (payload, payload_file) {
                (Some(text), _) => PayloadSource::Inline(text),
                (None, Some(path)) => PayloadSource::File(path),
                (None, None) => PayloadSource::Stdin,
            };
            let kind = kind.as_deref().unwrap_or_default();
            cli::submit_one(&dispatcher, queue, kind, source, id.clone()).await
        }
        Command::Topology {
            action: TopologyAction::Apply { queue },
        } => cli::apply_topology(&dispatcher, queue).await,
        Command::Topology {
            action: TopologyAction::Migrate { queue },
        } => cli::migrate_topology(&dispatcher, queue).await,
        Command::Peek { queue, count } => cli::peek(&dispatcher, queue, *count).await,
    };
    dispatcher.close().await;
    result
}
