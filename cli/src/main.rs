//! `warren`: submit jobs, and see and repair Warren's queues, from the command line.
//!
//! Each subcommand lives in a module of its own: its arguments (clap) and how it prints what
//! the library (`warren-dispatcher`) does. Standard output carries only results, so that every
//! command can be piped (`--json` where it prints data); progress, summaries and errors go to
//! standard error.
//!
//! Exit codes: 0 success; 1 failure (including a job that failed, with `submit --wait`);
//! 2 usage (clap's own, and a job option its queue cannot take: a delay beyond the delay
//! levels' maximum, a priority on a queue without priorities); 3 timeout (`submit --wait`);
//! 4 checks that do not hold (`doctor`).

mod config_show;
mod dlq;
mod doctor;
mod inflight;
mod output;
mod serve;
mod status;
mod submit;
mod topology;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use warren_core::Config;
use warren_dispatcher::Dispatcher;
use warren_workers::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "warren",
    version,
    about = "Submit jobs to Warren queues on RabbitMQ, and see and repair them",
    after_help = "Examples:\n  warren submit --queue emails --kind send --payload '{\"to\": \"a@example.com\"}'\n  \
                  warren status\n  warren dlq list emails\n  warren doctor"
)]
struct Args {
    /// Config file (default: $WARREN_CONFIG, else config/warren.toml if present).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log lines (on standard error) as text, or as one JSON object per line.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "WARREN_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Submit(submit::Args),
    Status(status::Args),
    #[command(
        subcommand,
        after_help = "Examples:\n  warren dlq list emails\n  warren dlq replay emails --all --rate 50/s\n  \
                      warren dlq purge emails --older-than 7d --yes"
    )]
    Dlq(dlq::Command),
    Inflight(inflight::Args),
    Doctor(doctor::Args),
    #[command(
        subcommand,
        after_help = "Examples:\n  warren topology apply --queue emails\n  warren topology migrate"
    )]
    Topology(topology::Command),
    Peek(dlq::PeekArgs),
    Serve(serve::Args),
    #[command(subcommand)]
    Config(config_show::Command),
    /// Print a shell completion script.
    #[command(
        after_help = "Examples:\n  warren completions bash > ~/.local/share/bash-completion/completions/warren\n  \
                            warren completions zsh > ~/.zfunc/_warren\n  \
                            warren completions fish > ~/.config/fish/completions/warren.fish"
    )]
    Completions {
        shell: clap_complete::Shell,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Kept until the end of main: dropping it exports the last spans (feature `otel`).
    let _telemetry = telemetry::init(telemetry::Options {
        format: args.log_format,
        default_filter: default_log_filter(&args.command),
        ansi: output::colour_on_stderr(),
        writer: std::io::stderr,
        service_name: "warren",
    });
    match run(args).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", warren_core::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Command::Completions { shell } = args.command {
        let mut command = Args::command();
        clap_complete::generate(shell, &mut command, "warren", &mut std::io::stdout());
        return Ok(ExitCode::SUCCESS);
    }
    let config = Config::load(args.config.as_deref())?;
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    match args.command {
        Command::Submit(submit) => connected(&config, async |d| submit::run(d, submit).await).await,
        Command::Status(status) => status::run(&config, status).await,
        Command::Dlq(command) => connected(&config, async |d| dlq::run(d, command).await).await,
        Command::Inflight(inflight) => {
            connected(&config, async |d| inflight::run(d, inflight).await).await
        }
        Command::Doctor(doctor) => doctor::run(&config, doctor).await,
        Command::Topology(command) => {
            connected(&config, async |d| topology::run(d, command).await).await
        }
        Command::Peek(peek) => connected(&config, async |d| dlq::peek(d, peek).await).await,
        Command::Serve(serve) => serve::run(&config, serve).await,
        Command::Config(command) => config_show::run(args.config.as_deref(), &config, command),
        Command::Completions { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// What is logged without `RUST_LOG`: warnings, and for `warren serve` its access log too.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Serve(_) => "warn,warren=info,warren_service=info,lapin=off",
        _ => "warn,lapin=off",
    }
}

/// Runs `command` with a dispatcher connected to the broker, and closes it afterwards.
async fn connected(
    config: &Config,
    command: impl AsyncFnOnce(&Dispatcher) -> anyhow::Result<ExitCode>,
) -> anyhow::Result<ExitCode> {
    let dispatcher = Dispatcher::connect(config)
        .await
        .context("connecting to RabbitMQ")?;
    let result = command(&dispatcher).await;
    dispatcher.close().await;
    result
}
