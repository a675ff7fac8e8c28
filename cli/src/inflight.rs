//! `warren inflight [Q]`: the jobs being worked on now.

use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::Context;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::inflight::{self, Inflight};

use crate::output::printable;

/// Show the jobs workers are running now, flagging those past their job_timeout.
///
/// Every worker process is asked over the `warren.control` exchange and answers with the jobs
/// its handlers run: the worker (connection name, host, pid), job id, kind, queue, attempt,
/// running since. A job running past its queue's job_timeout is flagged OVERDUE: a handler
/// Warren cannot stop (it blocks its thread), until the broker's consumer timeout takes the
/// job back.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  warren inflight\n  warren inflight emails --json")]
pub struct Args {
    /// Only jobs of this queue.
    queue: Option<String>,
    /// How long to wait for the workers' answers.
    #[arg(long, default_value = "1500ms", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Print JSON (workers, jobs with `overdue`) instead of a table.
    #[arg(long)]
    json: bool,
}

pub async fn run(dispatcher: &Dispatcher, args: Args) -> anyhow::Result<ExitCode> {
    let found = inflight::inflight(dispatcher, args.queue.as_deref(), args.window)
        .await
        .context("asking the workers for their running jobs")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&found)?);
    } else {
        print_table(&found);
    }
    summary(&found, args.window);
    Ok(ExitCode::SUCCESS)
}

fn print_table(found: &Inflight) {
    if found.jobs.is_empty() {
        return;
    }
    let header = [
        "JOB", "KIND", "QUEUE", "ATTEMPT", "SINCE", "RUNNING", "TIMEOUT", "WORKER", "HOST", "PID",
        "",
    ];
    let rows: Vec<[String; 11]> = found
        .jobs
        .iter()
        .map(|j| {
            let since = UNIX_EPOCH + Duration::from_millis(j.job.started_at_ms);
            [
                printable(&j.job.id),
                printable(&j.job.kind),
                printable(&j.job.queue),
                j.job.attempt.to_string(),
                humantime::format_rfc3339_seconds(since).to_string(),
                short(j.job.running_for()),
                short(j.job.job_timeout()),
                printable(&j.worker.connection),
                printable(&j.worker.host),
                j.worker.pid.to_string(),
                if j.overdue { "OVERDUE" } else { "" }.to_owned(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A duration to the second (to the millisecond under one second).
fn short(d: Duration) -> String {
    let d = match d >= Duration::from_secs(1) {
        true => Duration::from_secs(d.as_secs()),
        false => Duration::from_millis(d.as_millis() as u64),
    };
    humantime::format_duration(d).to_string()
}

fn summary(found: &Inflight, window: Duration) {
    let overdue = found.jobs.iter().filter(|j| j.overdue).count();
    let window = humantime::format_duration(window);
    if found.workers.is_empty() {
        eprintln!(
            "no worker answered within {window} (none running, or none that answers: workers \
             answer once `warren.control` exists, see `warren topology apply`)"
        );
    } else {
        eprintln!(
            "{} job(s) running on {} worker(s) that answered within {window}; {overdue} past \
             their queue's job_timeout",
            found.jobs.len(),
            found.workers.len()
        );
    }
    if found.truncated > 0 {
        eprintln!(
            "{} worker(s) left jobs out of their answer (size limit)",
            found.truncated
        );
    }
    if found.ignored > 0 {
        eprintln!(
            "{} message(s) that were not answers to this request were ignored",
            found.ignored
        );
    }
}
