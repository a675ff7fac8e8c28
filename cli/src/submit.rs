//! `warren submit`: one job (payload inline, from a file or stdin) or a file of jobs, each
//! printed as its id once the broker confirmed it.

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use futures::StreamExt;
use serde::Deserialize;
use warren_core::envelope::NewJob;
use warren_dispatcher::Dispatcher;

use crate::output;

/// Submit a job (payload from --payload, --payload-file or stdin), or a file of jobs.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  warren submit --queue emails --kind send --payload '{\"to\": \"a@example.com\"}'\n  \
                        echo '{\"n\": 1}' | warren submit --queue demo --kind echo\n  \
                        warren submit --queue demo --file jobs.jsonl"
)]
pub struct Args {
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
    /// Job id (default: a new UUIDv7), so that a submission tried again can be recognised.
    #[arg(long, conflicts_with = "file")]
    id: Option<String>,
    /// Submit one job per line: {"kind": "...", "payload": ...}. `-` reads stdin.
    #[arg(long)]
    file: Option<PathBuf>,
}

pub async fn run(dispatcher: &Dispatcher, args: Args) -> anyhow::Result<ExitCode> {
    if let Some(file) = &args.file {
        submit_file(dispatcher, &args.queue, file).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let source = match (&args.payload, &args.payload_file) {
        (Some(text), _) => PayloadSource::Inline(text),
        (None, Some(path)) => PayloadSource::File(path),
        (None, None) => PayloadSource::Stdin,
    };
    let kind = args.kind.as_deref().unwrap_or_default();
    submit_one(dispatcher, &args.queue, kind, source, args.id.clone()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Where `warren submit` takes a single job's payload from.
enum PayloadSource<'a> {
    Inline(&'a str),
    File(&'a Path),
    Stdin,
}

/// `warren submit --queue Q --kind K ...`: submits one job and prints its id.
async fn submit_one(
    dispatcher: &Dispatcher,
    queue: &str,
    kind: &str,
    payload: PayloadSource<'_>,
    id: Option<String>,
) -> anyhow::Result<()> {
    let payload = match payload {
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
    };
    let mut job = NewJob::from_json_text(queue, kind, payload);
    job.id = id;
    let id = dispatcher.submit(job).await?;
    println!("{id}");
    Ok(())
}

/// One line of a `--file` job list.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    kind: String,
    payload: serde_json::Value,
    #[serde(default)]
    id: Option<String>,
}

/// `warren submit --queue Q --file jobs.jsonl`: one job per line, `{"kind":..,"payload":..}`.
///
/// Every line is read and checked before anything is sent, so a bad line (reported with its
/// number) means nothing was submitted. Then the jobs are pipelined; each confirmed id is
/// printed in input order, and a job that fails is reported with its line number.
async fn submit_file(dispatcher: &Dispatcher, queue: &str, file: &Path) -> anyhow::Result<()> {
    let (jobs, lines) = read_job_lines(queue, file, dispatcher.config().jobs.max_payload_bytes)?;
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
                use std::io::Write;
                writeln!(out, "{id}").context("writing to stdout")?;
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
    Ok(())
}

/// Reads and checks every line; returns the jobs and their line numbers.
fn read_job_lines(
    queue: &str,
    file: &Path,
    max_payload: usize,
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
        let checked = serde_json::from_str::<JobLine>(&line)
            .map_err(|err| err.to_string())
            .and_then(|parsed| {
                let mut job = NewJob::new(queue, parsed.kind, &parsed.payload);
                job.id = parsed.id;
                job.encode(max_payload)
                    .map(|_| job)
                    .map_err(|err| err.to_string())
            });
        match checked {
            Ok(job) => {
                jobs.push(job);
                numbers.push(number);
            }
            Err(err) => errors.push(format!("line {number}: {err}")),
        }
    }
    if !errors.is_empty() {
        for error in errors.iter().take(20) {
            eprintln!("{error}");
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
