//! Warren, as its users run it: jobs submitted through the dispatcher library or the `warren`
//! CLI, drained by worker processes (`bench-worker`, the `warren-worker` command line with a
//! counting no-op handler), with everything on: publisher confirms, mandatory routing, late
//! acks, retry bookkeeping.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, ensure};
use futures::StreamExt;
use serde_json::json;
use warren_core::NewJob;
use warren_core::config::QueueType;
use warren_dispatcher::Dispatcher;

use crate::procs::{self, Workers, config_for, settle_and_delete};
use crate::{Bench, Record, payload, unique_queue};

/// Logging as shipped: one info line per job.
const LOG_DEFAULT: &str = "info,lapin=warn";
/// Logging with the per-job lines off.
const LOG_QUIET: &str = "warn";

/// Submit (library, CLI), drain by one process (default and quiet logging), end to end.
pub async fn throughput(bench: &mut Bench, queue_type: QueueType) -> anyhow::Result<()> {
    let concurrency = bench.concurrency;
    let (dispatcher, queues) = declare(bench, queue_type, 1).await?;
    let seconds = submit_all(&dispatcher, &queues, bench.jobs).await?;
    bench.emit(
        Record::new("warren", "enqueue", queue_type, "Dispatcher::submit_all")
            .took(bench.jobs, seconds)
            .note("dispatcher.max_in_flight = 1000 confirms in flight"),
    )?;
    drain(bench, &dispatcher, queue_type, &queues, 1, LOG_DEFAULT).await?;

    let (dispatcher, queues) = declare(bench, queue_type, 1).await?;
    let seconds = submit_cli(bench, queue_type, &queues[0]).await?;
    bench.emit(
        Record::new("warren", "enqueue", queue_type, "warren submit --file")
            .took(bench.jobs, seconds)
            .note("wall time of the whole command, process start and connect included"),
    )?;
    drain(bench, &dispatcher, queue_type, &queues, 1, LOG_QUIET).await?;

    end_to_end(bench, queue_type, concurrency).await
}

/// Drain by 2 and 4 processes, and by one process consuming 8 queues (quorum queues).
pub async fn scaling(bench: &mut Bench) -> anyhow::Result<()> {
    let queue_type = QueueType::Quorum;
    for processes in [2, 4] {
        let (dispatcher, queues) = declare(bench, queue_type, 1).await?;
        submit_all(&dispatcher, &queues, bench.jobs).await?;
        drain(
            bench,
            &dispatcher,
            queue_type,
            &queues,
            processes,
            LOG_QUIET,
        )
        .await?;
    }
    let (dispatcher, queues) = declare(bench, queue_type, 8).await?;
    submit_all(&dispatcher, &queues, bench.jobs).await?;
    drain(bench, &dispatcher, queue_type, &queues, 1, LOG_QUIET).await
}

/// End to end at concurrency 1 and 16, for their idle and draining RSS (256 is in
/// [`throughput`]).
pub async fn memory(bench: &mut Bench) -> anyhow::Result<()> {
    for concurrency in [1, 16] {
        end_to_end(bench, QueueType::Quorum, concurrency).await?;
    }
    Ok(())
}

/// A dispatcher and `count` fresh queues of `queue_type`, declared.
async fn declare(
    bench: &Bench,
    queue_type: QueueType,
    count: usize,
) -> anyhow::Result<(Dispatcher, Vec<String>)> {
    let dispatcher = Dispatcher::connect(&config_for(bench, queue_type)).await?;
    let queues: Vec<String> = (0..count).map(|_| unique_queue("warren")).collect();
    dispatcher.apply_topology(&queues).await?;
    Ok((dispatcher, queues))
}

/// The benchmark's jobs, spread round-robin over `queues`.
fn jobs(queues: &[String], count: usize) -> Vec<NewJob> {
    (0..count)
        .map(|i| NewJob::new(&queues[i % queues.len()], "noop", &payload(i)))
        .collect()
}

/// Submits the jobs through the library; returns the seconds until the last was confirmed.
async fn submit_all(
    dispatcher: &Dispatcher,
    queues: &[String],
    count: usize,
) -> anyhow::Result<f64> {
    let batch = jobs(queues, count);
    let started = Instant::now();
    let confirmed = dispatcher
        .submit_all(batch)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(confirmed == count, "only {confirmed} of {count} confirmed");
    Ok(seconds)
}

/// Submits the jobs with `warren submit --file`; returns the command's wall time.
async fn submit_cli(bench: &Bench, queue_type: QueueType, queue: &str) -> anyhow::Result<f64> {
    let file = bench.work_dir.join(format!("{queue}.jsonl"));
    let lines: String = (0..bench.jobs)
        .map(|i| format!("{}\n", json!({"kind": "noop", "payload": payload(i)})))
        .collect();
    std::fs::write(&file, lines)?;
    let config = procs::config_file(bench, queue_type)?;
    let started = Instant::now();
    let status = tokio::process::Command::new(procs::binary("warren")?)
        .arg("--config")
        .arg(&config)
        .args(["submit", "--queue", queue, "--file"])
        .arg(&file)
        .env_remove("WARREN_AMQP_URL")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .context("running warren submit --file")?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(status.success(), "warren submit --file failed: {status}");
    Ok(seconds)
}

/// Drains the filled `queues` with `processes` worker processes and records it.
async fn drain(
    bench: &mut Bench,
    dispatcher: &Dispatcher,
    queue_type: QueueType,
    queues: &[String],
    processes: usize,
    log: &str,
) -> anyhow::Result<()> {
    let concurrency = bench.concurrency;
    let mut workers = Workers::start(bench, queue_type, queues, processes, concurrency, log)?;
    let (first, last) = workers.wait_counted(bench.jobs).await?;
    let rss = workers.peak_rss();
    let spawned_at = workers.spawned_at;
    workers.stop().await?;
    let channel = dispatcher.open_channel().await?;
    settle_and_delete(&channel, queues).await?;
    let pool = pool(processes, queues.len(), concurrency, log);
    bench.emit(
        Record::new("warren", "drain", queue_type, pool)
            .took(bench.jobs, last - first)
            .with("peak_rss_bytes", json!(rss.iter().sum::<u64>()))
            .with("peak_rss_by_process", json!(rss))
            .with("seconds_incl_startup", json!(last - spawned_at))
            .note("seconds = first to last handler run (start-up excluded); RSS = VmHWM"),
    )
}

/// One worker process at `concurrency` on an empty queue: its idle RSS, then `jobs` submitted
/// while it consumes (first submit to last handler run) and its peak RSS.
async fn end_to_end(
    bench: &mut Bench,
    queue_type: QueueType,
    concurrency: u16,
) -> anyhow::Result<()> {
    let (dispatcher, queues) = declare(bench, queue_type, 1).await?;
    let mut workers = Workers::start(bench, queue_type, &queues, 1, concurrency, LOG_DEFAULT)?;
    let channel = dispatcher.open_channel().await?;
    procs::wait_consumers(&channel, &queues[0], 1).await?;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let idle = workers.peak_rss();
    let pool = pool(1, 1, concurrency, LOG_DEFAULT);
    bench.emit(
        Record::new("warren", "idle-rss", queue_type, pool.clone())
            .with("peak_rss_bytes", json!(idle.iter().sum::<u64>()))
            .note("VmHWM after start-up and 2 s idle on an empty queue"),
    )?;

    let started = procs::now();
    submit_all(&dispatcher, &queues, bench.jobs).await?;
    let (_, last) = workers.wait_counted(bench.jobs).await?;
    let rss = workers.peak_rss();
    workers.stop().await?;
    settle_and_delete(&channel, &queues).await?;
    bench.emit(
        Record::new("warren", "e2e", queue_type, pool)
            .took(bench.jobs, last - started)
            .with("peak_rss_bytes", json!(rss.iter().sum::<u64>()))
            .note("seconds = first submit (Dispatcher::submit_all) to last handler run"),
    )
}

/// The variant's name in the table.
fn pool(processes: usize, queues: usize, concurrency: u16, log: &str) -> String {
    let processes = match processes {
        1 => "1 process".to_owned(),
        n => format!("{n} processes"),
    };
    let queues = match queues {
        1 => String::new(),
        n => format!(", {n} queues"),
    };
    let log = if log == LOG_DEFAULT { "info" } else { log };
    format!("{processes}{queues}, c{concurrency}, log={log}")
}
