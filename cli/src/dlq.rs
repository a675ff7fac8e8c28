//! `warren dlq …` and `warren peek`: the dead-letter workbench. In every `warren dlq` command
//! `Q` is the work queue; its dead letters are in `Q.dead`.

use std::process::ExitCode;

use clap::Subcommand;
use warren_core::envelope;
use warren_dispatcher::{Dispatcher, dlq};

use crate::output::printable;

/// See, replay, purge and export dead letters (the jobs in Q.dead).
#[derive(Subcommand)]
pub enum Command {}

pub async fn run(_dispatcher: &Dispatcher, command: Command) -> anyhow::Result<ExitCode> {
    match command {}
}

/// Show messages of a dead-letter queue (QUEUE.dead) without removing them. On a work queue
/// under RabbitMQ 3.x, a peek counts as a delivery towards its delivery limit.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  warren peek --queue demo.dead --count 5")]
pub struct PeekArgs {
    #[arg(long)]
    queue: String,
    #[arg(long, default_value_t = 10)]
    count: usize,
}

/// `warren peek --queue Q`: shows up to `count` messages of a queue without removing them
/// ([`dlq::peek`]).
pub async fn peek(dispatcher: &Dispatcher, args: PeekArgs) -> anyhow::Result<ExitCode> {
    let messages = dlq::peek(dispatcher, &args.queue, args.count).await?;
    for message in &messages {
        let props = &message.properties;
        // Everything shown comes from whoever published the message: escaped, so that no
        // control character (a terminal escape sequence, a carriage return) reaches the terminal.
        let text = |v: &Option<lapin::types::ShortString>| {
            v.as_ref().map_or("-".into(), |s| printable(s.as_str()))
        };
        let header = |key: &str| envelope::header_str(props, key).map(|s| printable(&s));
        let attempts = envelope::header_int(props, envelope::ATTEMPTS)
            .or_else(|| envelope::header_int(props, envelope::ATTEMPT));
        println!(
            "{id}  kind={kind}  attempts={attempts}  class={class}  error={error}\n    payload: {body}",
            id = text(props.message_id()),
            kind = text(props.kind()),
            attempts = attempts.map(|n| n.to_string()).unwrap_or("-".into()),
            class = header(envelope::ERROR_CLASS).unwrap_or("-".into()),
            error = header(envelope::ERROR).unwrap_or("-".into()),
            body = printable(&String::from_utf8_lossy(&message.data)),
        );
    }
    if messages.is_empty() {
        println!("(queue `{}` is empty)", args.queue);
    }
    Ok(ExitCode::SUCCESS)
}
