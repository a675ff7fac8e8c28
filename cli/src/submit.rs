//! `warren submit`: one job (payload inline, from a file or stdin) or a file of jobs, each
//! printed as its id once the broker confirmed it; with `--wait`, the job's outcome.
//!
//! Job options: `--delay 90s` or `--at 2026-12-01T09:00:00Z` hold the job in the delay levels
//! until then (a time already past runs it now); `--priority N` for a queue that takes
//! priorities (`max_priority`); `--id` sets the job id a handler sees (`JobContext::id`);
//! `--wait [--timeout 30s]` waits for the outcome through RabbitMQ's direct reply-to
//! (`Dispatcher::submit_and_wait`) and exits 0 (done: the handler's JSON result on stdout),
//! 1 (failed after its last attempt: class and reason on stderr) or 3 (no outcome in time; the
//! job is not cancelled). A delay or priority the queue cannot take exits 2, nothing published.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;
use warren_core::envelope::{EncodeError, NewJob};
use warren_core::reply::Outcome;
use warren_dispatcher::{Dispatcher, SubmitError, WaitError};

use crate::output;

/// Exit code of `--wait` when no outcome came in time (see `main.rs`).
const EXIT_TIMEOUT: u8 = 3;
/// Exit code of an option the queue cannot take (as clap's usage errors).
const EXIT_USAGE: u8 = 2;

/// Submit a job (payload from --payload, --payload-file or stdin), or a file of jobs.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  warren submit --queue emails --kind send --payload '{\"to\": \"a@example.com\"}'\n  \
                        echo '{\"n\": 1}' | warren submit --queue demo --kind echo\n  \
                        warren submit --queue demo --file jobs.jsonl\n  \
                        warren submit --queue demo --kind echo --payload '{}' --delay 90s\n  \
                        warren submit --queue demo --kind echo --payload '{}' --at 2026-12-01T09:00:00Z\n  \
                        warren submit --queue urgent --kind echo --payload '{}' --priority 9\n  \
                        warren submit --queue demo --kind echo --payload '{\"n\": 1}' --wait --timeout 30s\n\n\
                  Exit codes with --wait: 0 done (the handler's JSON result on stdout), 1 failed \
                  after its last attempt, 2 usage, 3 timeout (the job is not cancelled)."
)]
pub struct Args {
    /// The work queue.
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
    /// Job id (default: a new UUIDv7), so that a submission tried again can be recognised; the
    /// handler sees it (JobContext::id).
    #[arg(long, conflicts_with = "file")]
    id: Option<String>,
    /// Submit one job per line: {"kind": "...", "payload": ..., "id"?, "delay"?: "90s",
    /// "priority"?: N}. `-` reads stdin.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Hold the job this long before its queue gets it ("90s", "10m", "1h 30m"; whole
    /// seconds, up to the delay levels' maximum of about 48.5 days).
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "at")]
    delay: Option<Duration>,
    /// Hold the job until this time (RFC 3339 with a zone: 2026-12-01T09:00:00Z, or
    /// +02:00); a time already past runs the job now.
    #[arg(long, value_parser = parse_at)]
    at: Option<SystemTime>,
    /// The job's priority; the queue must take priorities (max_priority in its config).
    #[arg(long)]
    priority: Option<u8>,
    /// Wait for the job's outcome and print the handler's JSON result (exit 0), or say why it
    /// failed after its last attempt (exit 1), or time out (exit 3).
    #[arg(long, conflicts_with = "file")]
    wait: bool,
    /// How long --wait waits, from the submit (delay and retries included).
    #[arg(long, requires = "wait", value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Print JSON: {"id": ...} per job; with --wait the whole outcome
    /// ({"id", "attempts", "status": "done"|"failed"|"timeout", "result" | "class", "reason"}).
    #[arg(long)]
    json: bool,
}

pub async fn run(dispatcher: &Dispatcher, args: Args) -> anyhow::Result<ExitCode> {
    let options = JobOptions {
        delay: args.delay,
        at: args.at,
        priority: args.priority,
    };
    if let Some(file) = &args.file {
        return submit_file(dispatcher, &args.queue, file, &options, args.json).await;
    }
    let source = match (&args.payload, &args.payload_file) {
        (Some(text), _) => PayloadSource::Inline(text),
        (None, Some(path)) => PayloadSource::File(path),
        (None, None) => PayloadSource::Stdin,
    };
    let kind = args.kind.as_deref().unwrap_or_default();
    let mut job = NewJob::from_json_text(&args.queue, kind, read_payload(source)?);
    job.id = args.id.clone();
    options.apply(&mut job);
    if args.wait {
        return submit_and_wait(dispatcher, job, args.timeout, args.json).await;
    }
    let delay = job.delay;
    let id = match dispatcher.submit(job).await {
        Ok(id) => id,
        Err(err) if is_usage(&err) => return Ok(usage(&err)),
        Err(err) => return Err(err.into()),
    };
    if args.json {
        println!("{}", json!({ "id": id.0 }));
    } else {
        println!("{}", output::printable(&id.0));
    }
    if let Some(delay) = delay.filter(|d| !d.is_zero()) {
        let due = humantime::format_rfc3339_seconds(SystemTime::now() + delay);
        eprintln!("held in the delay levels until about {due}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `--delay`, `--at` and `--priority`, for one job or as the defaults of a `--file`'s lines.
struct JobOptions {
    delay: Option<Duration>,
    at: Option<SystemTime>,
    priority: Option<u8>,
}

impl JobOptions {
    fn apply(&self, job: &mut NewJob) {
        if let Some(at) = self.at {
            // A time already past: no delay, the job runs now.
            let delay = at.duration_since(SystemTime::now()).unwrap_or_default();
            if delay.is_zero() {
                eprintln!("note: --at is in the past; the job runs now");
            }
            job.delay = Some(delay);
        } else if self.delay.is_some() {
            job.delay = self.delay;
        }
        if self.priority.is_some() {
            job.priority = self.priority;
        }
    }
}

/// Errors about an option the queue cannot take: usage errors, exit 2.
fn is_usage(err: &SubmitError) -> bool {
    matches!(
        err,
        SubmitError::Invalid(EncodeError::DelayTooLong(_))
            | SubmitError::Priority { .. }
            | SubmitError::Unsupported(_)
    )
}

fn usage(err: &SubmitError) -> ExitCode {
    eprintln!("error: {}", warren_core::error_chain(err));
    ExitCode::from(EXIT_USAGE)
}

/// `--wait`: submits, waits, prints the outcome; the exit code says which.
async fn submit_and_wait(
    dispatcher: &Dispatcher,
    job: NewJob,
    timeout: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let reply = match dispatcher.submit_and_wait(job, timeout).await {
        Ok(reply) => reply,
        Err(WaitError::Submit(err)) if is_usage(&err) => return Ok(usage(&err)),
        Err(err @ WaitError::Timeout { .. }) => {
            if let WaitError::Timeout { id, .. } = &err
                && json
            {
                print_json(&json!({ "id": id.0, "status": "timeout" }))?;
            }
            eprintln!("timeout: {}", output::printable(&err.to_string()));
            return Ok(ExitCode::from(EXIT_TIMEOUT));
        }
        Err(err) => return Err(err.into()),
    };
    if json {
        print_json(&serde_json::to_value(&reply).context("writing the outcome as JSON")?)?;
    }
    match &reply.outcome {
        Outcome::Done {
            result,
            result_omitted,
        } => {
            if !json {
                print_json(result)?;
            }
            if let Some(why) = result_omitted {
                eprintln!("note: {}", output::printable(why));
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Failed { class, reason } => {
            eprintln!(
                "job {} failed ({}) after {} attempt(s): {}",
                output::printable(&reply.id),
                output::printable(class),
                reply.attempts,
                output::printable(reason)
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// One JSON value on a line of stdout; on a terminal, control characters a worker may have
/// put in it are escaped too (serde_json leaves C1 and bidirectional controls as they are).
fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    let text = value.to_string();
    let stdout = std::io::stdout();
    let text = match stdout.is_terminal() {
        true => output::printable(&text),
        false => text,
    };
    writeln!(stdout.lock(), "{text}").context("writing to stdout")
}

/// Where `warren submit` takes a single job's payload from.
enum PayloadSource<'a> {
    Inline(&'a str),
    File(&'a Path),
    Stdin,
}

fn read_payload(payload: PayloadSource<'_>) -> anyhow::Result<Vec<u8>> {
    Ok(match payload {
        PayloadSource::Inline(text) => text.as_bytes().to_vec(),
        PayloadSource::File(path) => std::fs::read(path)
            .with_context(|| format!("reading payload file {}", path.display()))?,
        PayloadSource::Stdin => {
            let mut buffer = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buffer)
                .context("reading payload from stdin")?;
            buffer
        }
    })
}

/// `--at`: RFC 3339 with a zone, `Z` or `±HH:MM`.
fn parse_at(text: &str) -> Result<SystemTime, String> {
    let wrong = || {
        format!(
            "`{text}` is not an RFC 3339 time with a zone, like 2026-12-01T09:00:00Z or \
             2026-12-01T10:00:00+01:00"
        )
    };
    let text = text.trim();
    if text.ends_with(['Z', 'z']) {
        return humantime::parse_rfc3339_weak(text).map_err(|_| wrong());
    }
    let split = text
        .len()
        .checked_sub(6)
        .filter(|&i| text.is_char_boundary(i));
    let (base, zone) = split.map(|i| text.split_at(i)).ok_or_else(wrong)?;
    let bytes = zone.as_bytes();
    let sign = match bytes.first() {
        Some(b'+') => 1i64,
        Some(b'-') => -1,
        _ => return Err(wrong()),
    };
    if bytes.get(3) != Some(&b':') {
        return Err(wrong());
    }
    let hours: i64 = zone[1..3].parse().map_err(|_| wrong())?;
    let minutes: i64 = zone[4..6].parse().map_err(|_| wrong())?;
    let local = humantime::parse_rfc3339_weak(base).map_err(|_| wrong())?;
    let offset = Duration::from_secs(((hours * 60 + minutes) * 60).unsigned_abs());
    // Local time = UTC + offset, so UTC = local - offset.
    let utc = match sign {
        1 => local.checked_sub(offset),
        _ => local.checked_add(offset),
    };
    utc.ok_or_else(wrong)
}

/// One line of a `--file` job list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    kind: String,
    payload: serde_json::Value,
    #[serde(default)]
    id: Option<String>,
    /// A delay like "90s" (overrides `--delay`/`--at`).
    #[serde(default)]
    delay: Option<String>,
    /// Overrides `--priority`.
    #[serde(default)]
    priority: Option<u8>,
}

/// `warren submit --queue Q --file jobs.jsonl`: one job per line, `{"kind":..,"payload":..}`.
///
/// Every line is read and checked before anything is sent, so a bad line (reported with its
/// number) means nothing was submitted. Then the jobs are pipelined; each confirmed id is
/// printed in input order, and a job that fails is reported with its line number.
async fn submit_file(
    dispatcher: &Dispatcher,
    queue: &str,
    file: &Path,
    options: &JobOptions,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = dispatcher.config();
    let checks = LineChecks {
        queue,
        max_payload: config.jobs.max_payload_bytes,
        queue_config: config.queue(queue),
        options,
    };
    let (jobs, lines) = read_job_lines(&checks, file)?;
    let total = jobs.len() as u64;
    let progress = output::progress_bar(total, "jobs confirmed");
    let mut results = std::pin::pin!(dispatcher.submit_all(jobs));
    let (mut confirmed, mut failed) = (0u64, 0u64);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut index = 0;
    while let Some(result) = results.next().await {
        match result {
            Ok(id) => {
                confirmed += 1;
                let line = match json {
                    true => json!({ "id": id.0 }).to_string(),
                    false => output::printable(&id.0),
                };
                writeln!(out, "{line}").context("writing to stdout")?;
            }
            Err(err) => {
                failed += 1;
                progress.suspend(|| eprintln!("line {}: not submitted: {err}", lines[index]));
            }
        }
        index += 1;
        progress.inc(1);
    }
    drop(out);
    progress.finish_and_clear();
    eprintln!("{confirmed} of {total} jobs confirmed by the broker on queue `{queue}`");
    if failed > 0 {
        bail!("{failed} of {total} jobs were not submitted (see the lines above)");
    }
    Ok(ExitCode::SUCCESS)
}

/// What every line of a `--file` is checked against before anything is sent.
struct LineChecks<'a> {
    queue: &'a str,
    max_payload: usize,
    queue_config: warren_core::QueueConfig,
    options: &'a JobOptions,
}

/// Reads and checks every line; returns the jobs and their line numbers.
fn read_job_lines(
    checks: &LineChecks<'_>,
    file: &Path,
) -> anyhow::Result<(Vec<NewJob>, Vec<usize>)> {
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let f = std::fs::File::open(file)
            .with_context(|| format!("opening job file {}", file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let (mut jobs, mut numbers, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in reader.lines().enumerate() {
        let number = i + 1;
        let line = line.with_context(|| format!("reading line {number} of {}", file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        match check_line(checks, &line) {
            Ok(job) => {
                jobs.push(job);
                numbers.push(number);
            }
            Err(err) => errors.push(format!("line {number}: {err}")),
        }
    }
    if !errors.is_empty() {
        for error in errors.iter().take(20) {
            eprintln!("{}", output::printable(error));
        }
        bail!(
            "{} bad line(s) in {} (expected {{\"kind\": \"...\", \"payload\": ...}} per line); \
             no job was submitted",
            errors.len(),
            file.display()
        );
    }
    Ok((jobs, numbers))
}

fn check_line(checks: &LineChecks<'_>, line: &str) -> Result<NewJob, String> {
    let parsed = serde_json::from_str::<JobLine>(line).map_err(|err| err.to_string())?;
    let mut job = NewJob::new(checks.queue, parsed.kind, &parsed.payload);
    job.id = parsed.id;
    checks.options.apply(&mut job);
    if let Some(delay) = &parsed.delay {
        job.delay = Some(
            humantime::parse_duration(delay)
                .map_err(|err| format!("delay `{delay}` is not a duration like \"90s\": {err}"))?,
        );
    }
    if parsed.priority.is_some() {
        job.priority = parsed.priority;
    }
    if let Some(priority) = job.priority {
        checks
            .queue_config
            .check_priority(priority)
            .map_err(|err| format!("priority {priority}: {err}"))?;
    }
    job.encode(checks.max_payload)
        .map(|_| job)
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_takes_rfc_3339_with_a_zone() {
        let utc = parse_at("2026-12-01T09:00:00Z").expect("Z");
        assert_eq!(parse_at("2026-12-01T10:00:00+01:00"), Ok(utc));
        assert_eq!(parse_at("2026-12-01T07:30:00-01:30"), Ok(utc));
        for bad in [
            "2026-12-01T09:00:00",
            "tomorrow",
            "2026-12-01T09:00:00+0100",
            "",
        ] {
            assert!(parse_at(bad).is_err(), "{bad}");
        }
    }
}
