//! The `warren` command's subcommands: what each one reads, submits and prints.
//!
//! Standard output carries only results (job ids, one per line), so that `warren submit` can
//! be piped; progress and summaries go to standard error.

use std::io::{BufRead, IsTerminal, Read};
use std::path::Path;

use anyhow::{Context, bail};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lapin::options::{BasicGetOptions, BasicNackOptions};
use serde::Deserialize;
use warren_core::envelope::{self, NewJob};

use crate::Dispatcher;

/// Where `warren submit` takes a single job's payload from.
pub enum PayloadSource<'a> {
    Inline(&'a str),
    File(&'a Path),
    Stdin,
}

/// `warren submit --queue Q --kind K ...`: submits one job and prints its id.
pub async fn submit_one(
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
pub async fn submit_file(dispatcher: &Dispatcher, queue: &str, file: &Path) -> anyhow::Result<()> {
    let (jobs, lines) = read_job_lines(queue, file, dispatcher.config().jobs.max_payload_bytes)?;
    let total = jobs.len() as u64;
    let progress = progress_bar(total);
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

/// A progress bar on a terminal; nothing when stderr is piped.
fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} jobs confirmed ({per_sec}, eta {eta})")
    {
        bar.set_style(style);
    }
    bar
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
pub async fn migrate_topology(
    dispatcher: &Dispatcher,
    extra_queues: &[String],
) -> anyhow::Result<()> {
    let queues = queues_with(dispatcher, extra_queues);
    let (declared, migrated) = dispatcher
        .migrate_topology(&queues, |done| {
            println!(
                "migrated queue {}: {} message(s) kept ({})",
                done.queue, done.messages, done.reason
            );
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
pub async fn apply_topology(
    dispatcher: &Dispatcher,
    extra_queues: &[String],
) -> anyhow::Result<()> {
    let queues = queues_with(dispatcher, extra_queues);
    let declared = dispatcher.apply_topology(&queues).await?;
    for item in &declared {
        println!("{item}");
    }
    eprintln!(
        "declared {} exchanges, queues and bindings (idempotent)",
        declared.len()
    );
    Ok(())
}

/// `text` with every control character (C0, DEL, C1) and bidirectional-text control written
/// as a Rust escape (`\u{1b}`), so untrusted text prints as what it is.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// `warren peek --queue Q`: shows up to `count` messages of a queue (usually `<queue>.dead`)
/// without removing them: they are fetched unacknowledged and handed back with one
/// `basic.nack` (requeue, multiple), then the channel closes (which hands back anything left).
///
/// A nack, unlike a reject or a closed channel, does not count towards a quorum queue's
/// delivery limit on RabbitMQ 4.x, so peeking is harmless even on a dead-letter queue that an
/// older Warren declared without `x-delivery-limit` (4.x gives those a limit of 20). On 3.10
/// every return counts; the queues Warren reads are declared with a limit that reading never
/// reaches ([`warren_core::topology::READ_SAFE_DELIVERY_LIMIT`]).
pub async fn peek(dispatcher: &Dispatcher, queue: &str, count: usize) -> anyhow::Result<()> {
    let channel = dispatcher.open_channel().await?;
    let name = warren_core::topology::short(queue)?;
    let mut shown = 0;
    let mut last_tag = None;
    while shown < count {
        let got = channel
            .basic_get(name.clone(), BasicGetOptions { no_ack: false })
            .await
            .with_context(|| format!("reading queue `{queue}`"))?;
        let Some(message) = got else { break };
        last_tag = Some(message.delivery.delivery_tag);
        let props = &message.delivery.properties;
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
            body = printable(&String::from_utf8_lossy(&message.delivery.data)),
        );
        shown += 1;
    }
    if shown == 0 {
        println!("(queue `{queue}` is empty)");
    }
    if let Some(tag) = last_tag {
        let requeue_all = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        // If the nack fails, closing the channel still hands the messages back.
        let _ = channel.basic_nack(tag, requeue_all).await;
    }
    let _ = channel.close(200, "peek done".into()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn untrusted_text_prints_without_control_characters() {
        let hostile = "job\u{1b}[2J\u{1b}]0;owned\u{7}\r\nline\u{9b}31m\u{202e}txt.exe";
        let shown = printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(shown.contains("\\u{1b}[2J"));
        assert!(shown.contains("\\u{202e}"));
        assert_eq!(printable("plain {\"é\": 1}"), "plain {\"é\": 1}");
    }
}
