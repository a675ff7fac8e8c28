//! `warren dlq …` and `warren peek`: the dead-letter workbench. In every `warren dlq` command
//! `Q` is the work queue; its dead letters are in `Q.dead`. The operations are library calls
//! ([`warren_dispatcher::dlq`]); this module parses their arguments and prints what they return.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::{ArgGroup, Subcommand};
use warren_core::envelope;
use warren_core::topology::dead_queue;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::dlq::{self, DeadRecord, Filter, NotTaken, Progress, ReplayOptions};

use crate::output::{self, printable};

/// See, replay, purge and export dead letters (the jobs in Q.dead).
#[derive(Subcommand)]
pub enum Command {
    /// List the dead letters of work queue Q (id, kind, attempts, class, reason, failed at,
    /// payload preview); leaves them where they are.
    #[command(after_help = "Examples:\n  warren dlq list emails\n  \
                            warren dlq list emails --kind send --class exhausted --limit 20 --json")]
    List(ListArgs),
    /// Show one dead letter of work queue Q: the whole job, every property and header.
    #[command(
        after_help = "Example:\n  warren dlq show emails 0193a4f2-8c1e-7d3b-9a51-2f0c7e6b1d42"
    )]
    Show(ShowArgs),
    /// Send dead letters back to work queue Q, each with a fresh attempt count and the replay
    /// headers (x-warren-replayed, x-warren-replayed-at); a dead letter is removed only once
    /// the broker confirmed its copy.
    #[command(after_help = "Examples:\n  warren dlq replay emails --all\n  \
                            warren dlq replay emails --id 0193a4f2-8c1e-7d3b-9a51-2f0c7e6b1d42\n  \
                            warren dlq replay emails --limit 100 --kind send --class exhausted --rate 50/s")]
    Replay(ReplayArgs),
    /// Delete dead letters of work queue Q (all of them, or those the filters select); asks
    /// first unless --yes.
    #[command(
        after_help = "Examples:\n  warren dlq purge emails --older-than 7d --kind send\n  \
                            warren dlq purge emails --class malformed --yes"
    )]
    Purge(PurgeArgs),
    /// Write the dead letters of work queue Q as JSON lines that `warren submit --file` reads
    /// ({"kind": .., "payload": .., "id": ..}); leaves them where they are.
    #[command(after_help = "Example:\n  warren dlq export emails > dead.jsonl\n  \
                            warren submit --queue emails --file dead.jsonl")]
    Export(ExportArgs),
}

/// Filters shared by the commands.
#[derive(clap::Args)]
pub struct FilterArgs {
    /// Only jobs of this kind.
    #[arg(long)]
    kind: Option<String>,
    /// Only jobs of this failure class (permanent, exhausted, malformed, unknown-kind,
    /// delivery-limit, ...).
    #[arg(long)]
    class: Option<String>,
}

impl FilterArgs {
    fn filter(&self) -> Filter {
        Filter {
            kind: self.kind.clone(),
            class: self.class.clone(),
            ..Filter::default()
        }
    }
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// The work queue (its dead letters are in Q.dead).
    #[arg(value_name = "Q")]
    queue: String,
    /// Show at most N dead letters.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    /// The work queue (its dead letters are in Q.dead).
    #[arg(value_name = "Q")]
    queue: String,
    /// The job id.
    #[arg(value_name = "ID")]
    id: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
#[command(group(ArgGroup::new("which").required(true).multiple(true).args(["id", "all", "limit"])))]
pub struct ReplayArgs {
    /// The work queue the dead letters go back to (they are read from Q.dead).
    #[arg(value_name = "Q")]
    queue: String,
    /// Replay the job with this id (repeatable).
    #[arg(long, value_name = "ID")]
    id: Vec<String>,
    /// Replay every dead letter the filters select.
    #[arg(long, conflicts_with = "limit")]
    all: bool,
    /// Replay at most N dead letters.
    #[arg(long, value_name = "N")]
    limit: Option<u64>,
    #[command(flatten)]
    filter: FilterArgs,
    /// At most N jobs per second, e.g. 50/s.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    rate: Option<f64>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct PurgeArgs {
    /// The work queue (its dead letters are in Q.dead).
    #[arg(value_name = "Q")]
    queue: String,
    /// Only dead letters that failed longer ago than this (e.g. 90s, 12h, 7d).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Option<Duration>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Delete without asking.
    #[arg(long)]
    yes: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The work queue (its dead letters are in Q.dead).
    #[arg(value_name = "Q")]
    queue: String,
    #[command(flatten)]
    filter: FilterArgs,
}

pub async fn run(dispatcher: &Dispatcher, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::List(args) => list(dispatcher, args).await,
        Command::Show(args) => show(dispatcher, args).await,
        Command::Replay(args) => replay(dispatcher, args).await,
        Command::Purge(args) => purge(dispatcher, args).await,
        Command::Export(args) => export(dispatcher, args).await,
    }
}

/// `warren dlq list Q`: one entry per dead letter, printed as it is read.
async fn list(dispatcher: &Dispatcher, args: ListArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let mut written: std::io::Result<()> = Ok(());
    if args.json {
        written = out.write_all(b"[");
    }
    let mut first = true;
    let summary = dlq::list(
        dispatcher,
        &args.queue,
        &args.filter.filter(),
        args.limit,
        |record| {
            if written.is_err() {
                return;
            }
            written = if args.json {
                let separator: &[u8] = if first { b"\n" } else { b",\n" };
                out.write_all(separator)
                    .and_then(|()| serde_json::to_writer(&mut out, &record).map_err(Into::into))
            } else {
                write_record(&mut out, &record)
            };
            first = false;
        },
    )
    .await
    .with_context(|| format!("listing the dead letters of `{}`", args.queue))?;
    if args.json {
        written = written.and_then(|()| out.write_all(b"\n]\n"));
    }
    written
        .and_then(|()| out.flush())
        .context("writing to stdout")?;
    if summary.read == 0 && args.limit == Some(0) {
        eprintln!("0 dead letter(s) listed (--limit 0)");
    } else {
        eprintln!(
            "{} dead letter(s) listed; `{}` held {} when read",
            summary.listed,
            dead_queue(&args.queue),
            summary.total
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// One dead letter as `warren dlq list` prints it; every text escaped.
fn write_record(out: &mut impl Write, record: &DeadRecord) -> std::io::Result<()> {
    let text = |v: &Option<String>| v.as_deref().map_or_else(|| "-".to_owned(), printable);
    writeln!(
        out,
        "{id}  kind={kind}  attempts={attempts}  class={class}  failed_at={failed}{replayed}\n    \
         reason: {reason}\n    payload: {payload}",
        id = text(&record.id),
        kind = text(&record.kind),
        attempts = record
            .attempts
            .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        class = text(&record.class),
        failed = text(&record.failed_at),
        replayed = record
            .replayed
            .map_or_else(String::new, |n| format!("  replayed={n}")),
        reason = text(&record.reason),
        payload = printable(&record.payload_preview),
    )
}

/// `warren dlq show Q ID`: the whole dead letter.
async fn show(dispatcher: &Dispatcher, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let found = dlq::show(dispatcher, &args.queue, &args.id)
        .await
        .with_context(|| format!("reading the dead letters of `{}`", args.queue))?;
    let Some(job) = found else {
        bail!(
            "no dead letter with id `{}` in `{}`",
            printable(&args.id),
            dead_queue(&args.queue)
        );
    };
    if args.json {
        let text = serde_json::to_string_pretty(&job).context("encoding JSON")?;
        println!("{text}");
        return Ok(ExitCode::SUCCESS);
    }
    let text = |v: &Option<String>| v.as_deref().map_or_else(|| "-".to_owned(), printable);
    let record = &job.record;
    println!("id:        {}", text(&record.id));
    println!("kind:      {}", text(&record.kind));
    println!(
        "attempts:  {}",
        record
            .attempts
            .map_or_else(|| "-".to_owned(), |n| n.to_string())
    );
    println!("class:     {}", text(&record.class));
    println!("reason:    {}", text(&record.reason));
    println!("failed at: {}", text(&record.failed_at));
    println!("properties:");
    for (key, value) in &job.properties {
        println!("  {}: {}", printable(key), json_text(value));
    }
    println!("headers:");
    for (key, value) in &job.headers {
        println!("  {}: {}", printable(key), json_text(value));
    }
    println!("payload ({} bytes):", record.payload_bytes);
    match (&job.payload, &job.payload_text) {
        (Some(value), _) => {
            let pretty = serde_json::to_string_pretty(value).context("encoding JSON")?;
            println!("{}", indent(&printable_lines(&pretty)));
        }
        (None, Some(raw)) => {
            println!("  (not JSON) {}", printable(raw));
        }
        (None, None) => {}
    }
    Ok(ExitCode::SUCCESS)
}

/// A JSON value on one line: strings as themselves, the rest as JSON; escaped.
fn json_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => printable(s),
        other => printable(&other.to_string()),
    }
}

/// `text` escaped line by line (its own line breaks kept).
fn printable_lines(text: &str) -> String {
    text.lines().map(printable).collect::<Vec<_>>().join("\n")
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `warren dlq replay Q ...`: moves dead letters back, with a progress bar on a terminal.
async fn replay(dispatcher: &Dispatcher, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let options = ReplayOptions {
        filter: Filter {
            ids: args.id.clone(),
            ..args.filter.filter()
        },
        limit: args.limit,
        rate: args.rate,
    };
    let bar = output::progress_bar(0, "moved");
    let target = |total: u64| match (args.limit, args.id.len()) {
        (Some(limit), _) => limit.min(total),
        (None, 0) => total,
        (None, ids) => (ids as u64).min(total),
    };
    let result = dlq::replay(dispatcher, &args.queue, &options, |p: &Progress| {
        bar.set_length(target(p.total).max(p.taken));
        bar.set_position(p.taken);
    })
    .await;
    bar.finish_and_clear();
    let dead = dead_queue(&args.queue);
    let summary = match result {
        Ok(summary) => summary,
        Err(dlq::DlqError::Interrupted { summary, source }) => {
            eprintln!(
                "{} moved, {} remain in `{dead}` (interrupted)",
                summary.moved, summary.remaining
            );
            return Err(anyhow::Error::new(*source).context(format!(
                "replay to `{}` stopped after moving {} job(s); every job not moved is \
                     still in `{dead}`",
                args.queue, summary.moved
            )));
        }
        Err(err) => return Err(err).context(format!("replaying `{dead}`")),
    };
    eprintln!(
        "{} moved, {} remain (moved to `{}`; left in `{dead}`)",
        summary.moved, summary.remaining, args.queue
    );
    report_not_taken("skipped", &summary.skipped);
    report_not_taken("failed", &summary.failed);
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).context("encoding JSON")?
        );
    }
    if summary.failed.count > 0 {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints how many jobs were `what` and why, with the first few ids, on stderr.
fn report_not_taken(what: &str, not_taken: &NotTaken) {
    if not_taken.count == 0 {
        return;
    }
    eprintln!(
        "{} {what} (still in the dead-letter queue):",
        not_taken.count
    );
    for job in not_taken.examples.iter().take(20) {
        eprintln!(
            "  {}: {}",
            job.id
                .as_deref()
                .map_or_else(|| "(no id)".to_owned(), printable),
            printable(&job.reason)
        );
    }
    if not_taken.count > 20 {
        eprintln!("  … and {} more", not_taken.count - 20);
    }
}

/// `--rate 50/s` (or `50`): jobs per second.
fn parse_rate(text: &str) -> Result<f64, String> {
    let number = text.strip_suffix("/s").unwrap_or(text).trim();
    match number.parse::<f64>() {
        Ok(rate) if dlq::check_rate(rate).is_ok() => Ok(rate),
        _ => Err(format!(
            "`{text}` is not a rate: write a number of jobs per second from {} to {}, e.g. 50/s",
            dlq::REPLAY_RATES.start(),
            dlq::REPLAY_RATES.end()
        )),
    }
}

/// `warren dlq purge Q ...`: deletes what the filters select, after asking.
async fn purge(dispatcher: &Dispatcher, args: PurgeArgs) -> anyhow::Result<ExitCode> {
    let failed_before = match args.older_than {
        Some(age) => Some(
            SystemTime::now()
                .checked_sub(age)
                .context("--older-than reaches before 1970")?,
        ),
        None => None,
    };
    let filter = Filter {
        failed_before,
        ..args.filter.filter()
    };
    let dead = dead_queue(&args.queue);
    if !args.yes {
        if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
            bail!(
                "refusing to purge `{dead}` without confirmation: not on a terminal, so nobody \
                 can be asked; add --yes to delete without asking"
            );
        }
        let mut matching = 0u64;
        dlq::list(dispatcher, &args.queue, &filter, None, |_| matching += 1)
            .await
            .with_context(|| format!("counting the dead letters to purge in `{dead}`"))?;
        if matching == 0 {
            println!("nothing to delete: no dead letter in `{dead}` matches");
            return Ok(ExitCode::SUCCESS);
        }
        eprint!(
            "Delete {matching} dead letter(s) from `{dead}`{}? [y/N] ",
            describe(&args)
        );
        let _ = std::io::stderr().flush();
        let mut answer = String::new();
        std::io::stdin()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            eprintln!("not deleted");
            return Ok(ExitCode::FAILURE);
        }
    }
    let bar = output::progress_bar(0, "read");
    let summary = dlq::purge(dispatcher, &args.queue, &filter, |p: &Progress| {
        bar.set_length(p.total);
        bar.set_position(p.read);
    })
    .await
    .with_context(|| format!("purging `{dead}`"));
    bar.finish_and_clear();
    let summary = summary?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&summary).context("encoding JSON")?
        );
    } else {
        println!(
            "deleted {} dead letter(s) from `{dead}`; {} remain",
            summary.deleted, summary.remaining
        );
    }
    if summary.undated > 0 {
        eprintln!(
            "{} dead letter(s) matched but carry no failure time ({} or x-death), so their \
             age is unknown: kept",
            summary.undated,
            envelope::FAILED_AT
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The filters of a purge, in words, for the question.
fn describe(args: &PurgeArgs) -> String {
    let mut parts = Vec::new();
    if let Some(age) = args.older_than {
        parts.push(format!(
            "failed over {} ago",
            humantime::format_duration(age)
        ));
    }
    if let Some(kind) = &args.filter.kind {
        parts.push(format!("kind {}", printable(kind)));
    }
    if let Some(class) = &args.filter.class {
        parts.push(format!("class {}", printable(class)));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

/// `warren dlq export Q`: JSON lines on stdout, what could not be exported on stderr.
async fn export(dispatcher: &Dispatcher, args: ExportArgs) -> anyhow::Result<ExitCode> {
    let mut out = std::io::BufWriter::new(std::io::stdout());
    let summary = dlq::export(dispatcher, &args.queue, &args.filter.filter(), &mut out)
        .await
        .with_context(|| format!("exporting the dead letters of `{}`", args.queue))?;
    eprintln!(
        "{} dead letter(s) exported from `{}`",
        summary.exported,
        dead_queue(&args.queue)
    );
    report_not_taken(
        "not exported (a `warren submit --file` line needs a kind and a JSON payload; see them \
         with `warren dlq show`)",
        &summary.skipped,
    );
    Ok(ExitCode::SUCCESS)
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
    /// One JSON object per message: id, kind, attempts, class, error, payload (as text).
    #[arg(long)]
    json: bool,
}

/// `warren peek --queue Q`: shows up to `count` messages of a queue without removing them
/// ([`dlq::peek`]).
pub async fn peek(dispatcher: &Dispatcher, args: PeekArgs) -> anyhow::Result<ExitCode> {
    let messages = dlq::peek(dispatcher, &args.queue, args.count).await?;
    for message in &messages {
        let props = &message.properties;
        if args.json {
            let text = |v: &Option<lapin::types::ShortString>| v.as_ref().map(|s| s.to_string());
            let header = |key: &str| envelope::header_str(props, key).map(|s| s.into_owned());
            let line = serde_json::json!({
                "id": text(props.message_id()),
                "kind": text(props.kind()),
                "attempts": envelope::header_int(props, envelope::ATTEMPTS)
                    .or_else(|| envelope::header_int(props, envelope::ATTEMPT)),
                "class": header(envelope::ERROR_CLASS),
                "error": header(envelope::ERROR),
                "payload": String::from_utf8_lossy(&message.data),
            });
            println!("{line}");
            continue;
        }
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
    if messages.is_empty() && !args.json {
        println!("(queue `{}` is empty)", args.queue);
    }
    Ok(ExitCode::SUCCESS)
}
