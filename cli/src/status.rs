//! `warren status`: one row per queue, counted over AMQP and sampled from the management HTTP
//! API ([`warren_dispatcher::status`]); `--watch` refreshes it.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use warren_core::Config;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::management::Management;
use warren_dispatcher::status::{self, QueueStatus, Status};

use crate::output::printable;

/// Show each queue's ready, unacked and dead jobs, consumers and rates, the jobs waiting in the
/// delay levels, and the management UI's address. Ready, consumers, dead and delayed are
/// counted now over AMQP; the columns marked * are the management API's samples.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  warren status\n  warren status --queue emails --json\n  \
                  warren status --watch 2s"
)]
pub struct Args {
    /// Only this queue (repeatable; default: every queue of the config).
    #[arg(long, value_name = "Q")]
    queue: Vec<String>,
    /// Print JSON (with --watch: one object per line).
    #[arg(long)]
    json: bool,
    /// Refresh every DURATION (e.g. 2s) until Ctrl-C: in place on a terminal.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    watch: Option<Duration>,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let queues: Vec<String> = match args.queue.is_empty() {
        true => config.queues.keys().cloned().collect(),
        false => args.queue.clone(),
    };
    if queues.is_empty() {
        anyhow::bail!(
            "no queues to show: the config lists none ([queues.NAME] in warren.toml); name one \
             with --queue Q"
        );
    }
    let management = Management::new(config).context("the management API's address")?;
    let mut dispatcher = connect(config).await;
    let in_place = args.watch.is_some() && std::io::stdout().is_terminal();
    loop {
        let amqp = match &dispatcher {
            Ok(d) => Ok(d),
            Err(reason) => Err(reason.clone()),
        };
        let status = status::collect(amqp, &management, &queues).await;
        let text = match (args.json, args.watch.is_some()) {
            (true, true) => serde_json::to_string(&status)? + "\n",
            (true, false) => serde_json::to_string_pretty(&status)? + "\n",
            (false, _) => table(&status),
        };
        let mut stdout = std::io::stdout().lock();
        if in_place {
            // Cursor home, clear the screen: the new table replaces the old one.
            write!(stdout, "\x1b[H\x1b[2J")?;
        }
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        drop(stdout);
        let Some(every) = args.watch else {
            let nothing = !status.amqp.reachable && !status.management.reachable;
            if let Ok(d) = dispatcher {
                d.close().await;
            }
            return Ok(match nothing {
                true => ExitCode::FAILURE,
                false => ExitCode::SUCCESS,
            });
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        if dispatcher.is_err() {
            dispatcher = connect(config).await;
        }
    }
    if let Ok(d) = dispatcher {
        d.close().await;
    }
    Ok(ExitCode::SUCCESS)
}

/// The AMQP side, or why it is not there (shown in the status).
async fn connect(config: &Config) -> Result<Dispatcher, String> {
    Dispatcher::connect(config)
        .await
        .map_err(|err| warren_core::error_chain(&err))
}

/// The status as a table, with what is sampled and what is missing said below it.
fn table(status: &Status) -> String {
    let sampled = |field: &str| status.queues.iter().any(|q| q.sampled.contains(&field));
    let head = |name: &str, field: &str| match sampled(field) {
        true => format!("{name}*"),
        false => name.to_owned(),
    };
    let width = status
        .queues
        .iter()
        .map(|q| printable(&q.queue).chars().count())
        .max()
        .unwrap_or(0)
        .max(5);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$}  {:>8}  {:>8}  {:>9}  {:>10}  {:>10}  {:>8}  {:>8}",
        "QUEUE",
        head("READY", "ready"),
        head("UNACKED", "unacked"),
        head("CONSUMERS", "consumers"),
        head("PUBLISH/s", "publish_rate"),
        head("DELIVER/s", "deliver_rate"),
        head("DEAD", "dead"),
        head("OLDEST", "oldest_age_secs"),
    );
    for queue in &status.queues {
        let _ = writeln!(out, "{}", row(queue, width));
    }
    let levels = &status.delay_levels;
    match levels.messages {
        Some(n) => {
            let _ = writeln!(
                out,
                "\ndelay levels: {n} job(s) waiting{}, for all queues together (the broker does \
                 not say which queue each is for)",
                if levels.sampled { " (sampled)" } else { "" }
            );
        }
        None => out.push_str("\ndelay levels: unknown\n"),
    }
    if !levels.missing_levels.is_empty() {
        let _ = writeln!(
            out,
            "  {} of the delay levels do not exist: run `warren topology apply`",
            levels.missing_levels.len()
        );
    }
    if let Some(address) = &status.management.address {
        let _ = writeln!(out, "management UI: {}", printable(address));
    }
    if let Some(error) = &status.management.error {
        let _ = writeln!(out, "management API unreachable: {}", printable(error));
        if status.amqp.reachable {
            out.push_str(
                "  unacked, rates and ages are unknown (?); ready, consumers, dead and delayed \
                 are counted over AMQP\n",
            );
        }
    }
    if let Some(error) = &status.amqp.error {
        let _ = writeln!(out, "AMQP unreachable: {}", printable(error));
        if status.management.reachable {
            out.push_str("  every number shown is the management API's sample\n");
        }
    }
    if status.queues.iter().any(|q| !q.sampled.is_empty()) {
        out.push_str(
            "* sampled by the management API (refreshed every 5 s by default, quorum queues \
             later); the other columns are counted now over AMQP\n",
        );
    }
    out
}

fn row(queue: &QueueStatus, width: usize) -> String {
    let name = printable(&queue.queue);
    if queue.exists == Some(false) {
        return format!("{name:<width$}  (does not exist: `warren topology apply --queue {name}`)");
    }
    let count = |n: Option<u64>| n.map_or("?".to_owned(), |n| n.to_string());
    let rate = |r: Option<f64>| r.map_or("?".to_owned(), |r| format!("{r:.1}"));
    let age = queue.oldest_age_secs.map_or("-".to_owned(), |secs| {
        humantime::format_duration(Duration::from_secs(secs)).to_string()
    });
    format!(
        "{name:<width$}  {:>8}  {:>8}  {:>9}  {:>10}  {:>10}  {:>8}  {:>8}",
        count(queue.ready),
        count(queue.unacked),
        count(queue.consumers),
        rate(queue.publish_rate),
        rate(queue.deliver_rate),
        count(queue.dead),
        age,
    )
}
