//! `warren topology apply | migrate`: declare Warren's exchanges and queues, or replace the
//! queues an older Warren declared with other arguments.

use std::process::ExitCode;

use clap::Subcommand;
use warren_dispatcher::Dispatcher;

/// Declare exchanges and queues.
#[derive(Subcommand)]
pub enum Command {
    /// Declare the shared exchanges, the delay queues and every configured queue (idempotent).
    #[command(after_help = "Example:\n  warren topology apply --queue emails")]
    Apply {
        /// Also declare this queue (repeatable).
        #[arg(long)]
        queue: Vec<String>,
        /// Print each declared exchange, queue and binding as a JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Like apply, and replace each of Warren's queues that exists with other arguments (an
    /// older Warren's dead-letter queues, changed queue settings), keeping its messages. Stop
    /// the workers of those queues first.
    #[command(after_help = "Example:\n  warren topology migrate --queue emails")]
    Migrate {
        /// Also declare (and migrate) this queue (repeatable).
        #[arg(long)]
        queue: Vec<String>,
        /// Print each migrated queue as a JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(dispatcher: &Dispatcher, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Apply { queue, json } => apply_topology(dispatcher, &queue, json).await?,
        Command::Migrate { queue, json } => migrate_topology(dispatcher, &queue, json).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// The configured queues and `extra` ones, once each.
fn queues_with(dispatcher: &Dispatcher, extra: &[String]) -> Vec<String> {
    let mut queues: Vec<String> = dispatcher.config().queues.keys().cloned().collect();
    for queue in extra {
        if !queues.contains(queue) {
            queues.push(queue.clone());
        }
    }
    queues
}

/// `warren topology migrate`: like `apply`, replacing the queues that differ (keeping their
/// messages), each reported as it is done.
async fn migrate_topology(
    dispatcher: &Dispatcher,
    extra_queues: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let queues = queues_with(dispatcher, extra_queues);
    let (declared, migrated) = dispatcher
        .migrate_topology(&queues, |done| match json {
            true => println!("{}", serde_json::json!(done)),
            false => println!(
                "migrated queue {}: {} message(s) kept ({})",
                done.queue, done.messages, done.reason
            ),
        })
        .await?;
    eprintln!(
        "declared {} exchanges, queues and bindings; {} queue(s) migrated",
        declared.len(),
        migrated.len()
    );
    Ok(())
}

/// `warren topology apply`: declares everything and prints it.
async fn apply_topology(
    dispatcher: &Dispatcher,
    extra_queues: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let queues = queues_with(dispatcher, extra_queues);
    let declared = dispatcher.apply_topology(&queues).await?;
    for item in &declared {
        match json {
            true => println!("{}", serde_json::json!(item)),
            false => println!("{item}"),
        }
    }
    eprintln!(
        "declared {} exchanges, queues and bindings (idempotent)",
        declared.len()
    );
    Ok(())
}
