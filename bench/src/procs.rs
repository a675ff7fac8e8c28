//! The benchmark's worker processes (`bench-worker`, run through the worker-process harness
//! shared with the tests and the fault suite, [`warren_tests::procs`]) and what the benchmark
//! checks on them: the count file their handlers write, their peak RSS, the queues they leave
//! behind.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use lapin::Channel;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use warren_core::Config;
use warren_core::config::QueueType;
use warren_tests::procs::{Pool, WorkerSpec};

use crate::Bench;

/// Where the release binaries are: next to this one.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    ensure!(
        path.exists(),
        "{} not found: cargo build --release -p warren-bench -p warren-dispatcher",
        path.display()
    );
    Ok(path)
}

/// A config file for the worker processes: the broker of `config`, queues of `queue_type`.
pub fn config_file(bench: &Bench, queue_type: QueueType) -> anyhow::Result<PathBuf> {
    let path = bench
        .work_dir
        .join(format!("{}.toml", crate::queue_type_name(queue_type)));
    let text = format!(
        "[broker]\nurl = {:?}\n\n[queue_defaults]\ntype = {:?}\n",
        bench.config.broker.url,
        crate::queue_type_name(queue_type)
    );
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The config of the in-process side (dispatcher, lapin) for `queue_type`.
pub fn config_for(bench: &Bench, queue_type: QueueType) -> Config {
    let mut config = bench.config.clone();
    config.queue_defaults.queue_type = queue_type;
    config
}

/// `bench-worker` processes consuming the same queues, counting into one file; started and
/// stopped through the shared worker-process harness ([`warren_tests::procs`]).
pub struct Workers {
    pool: Pool,
    pub count_file: PathBuf,
    pub spawned_at: f64,
}

impl Workers {
    /// Starts `processes` `bench-worker`s on `queues`, logging at `log` (a `RUST_LOG` value).
    pub fn start(
        bench: &Bench,
        queue_type: QueueType,
        queues: &[String],
        processes: usize,
        concurrency: u16,
        log: &str,
    ) -> anyhow::Result<Workers> {
        let stem = format!("{}-{}", queues[0], processes);
        let count_file = bench.work_dir.join(format!("{stem}.count"));
        let config = config_file(bench, queue_type)?;
        let worker = binary("bench-worker")?;
        let spawned_at = now();
        let specs = (0..processes)
            .map(|i| {
                WorkerSpec::new(&worker, &format!("{stem}-w{i}"), queues, &bench.work_dir)
                    .config(&config)
                    .concurrency(concurrency)
                    .env("WARREN_BENCH_COUNT_FILE", &count_file)
                    .env("RUST_LOG", log)
            })
            .collect();
        let pool = Pool::spawn(specs).context("starting bench-worker")?;
        Ok(Workers {
            pool,
            count_file,
            spawned_at,
        })
    }

    /// Waits until the handlers have counted `jobs` jobs; returns the first and last handler
    /// times (unix seconds) after checking every id in `0..jobs` ran exactly once.
    pub async fn wait_counted(&mut self, jobs: usize) -> anyhow::Result<(f64, f64)> {
        let deadline = Instant::now() + Duration::from_secs(120 + jobs as u64 / 100);
        loop {
            let counted = std::fs::metadata(&self.count_file).map_or(0, |m| m.len() as usize) / 27;
            if counted >= jobs {
                break;
            }
            if let Some((label, status)) = self.pool.any_exited() {
                bail!(
                    "worker {label} exited ({status}); logs:\n{}",
                    self.pool.all_logs()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "only {counted} of {jobs} jobs handled in time; logs:\n{}",
                    self.pool.all_logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        verify_count_file(&self.count_file, jobs)
    }

    /// Peak RSS (VmHWM) of each process so far, in bytes.
    pub fn peak_rss(&self) -> Vec<u64> {
        self.pool.peak_rss()
    }

    /// Stops the processes gracefully (SIGTERM: they finish and ack what they run).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        for (label, status) in self.pool.stop(Duration::from_secs(60)).await {
            ensure!(
                status.is_some_and(|s| s.success()),
                "worker {label} exited with {status:?}; logs:\n{}",
                self.pool.all_logs()
            );
        }
        Ok(())
    }
}

/// Reads the count file: every id in `0..jobs` exactly once. Returns the first and last times.
pub fn verify_count_file(path: &Path, jobs: usize) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(path)?;
    let mut seen = vec![0u32; jobs];
    let (mut first, mut last) = (f64::MAX, f64::MIN);
    let mut records = 0;
    for line in text.lines() {
        let (id, at) = line
            .split_once(' ')
            .with_context(|| format!("torn record {line:?}"))?;
        let id: usize = id.parse()?;
        let at: f64 = at.parse()?;
        ensure!(id < jobs, "the handler saw unknown job id {id}");
        seen[id] += 1;
        first = first.min(at);
        last = last.max(at);
        records += 1;
    }
    let missing = seen.iter().filter(|&&n| n == 0).count();
    let twice = seen.iter().filter(|&&n| n > 1).count();
    ensure!(
        records == jobs && missing == 0 && twice == 0,
        "count mismatch: {records} handler runs for {jobs} jobs, {missing} missing, {twice} run twice"
    );
    Ok((first, last))
}

/// Now, as unix seconds (the count files' clock).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// How long [`settle_and_delete`] gives a queue's count to reach zero.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// Ready messages and consumers of `queue` (passive declare).
pub async fn probe(channel: &Channel, queue: &str) -> anyhow::Result<(u32, u32)> {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let q = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .with_context(|| format!("queue {queue} is gone"))?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Waits until `queue` has at least `n` consumers.
pub async fn wait_consumers(channel: &Channel, queue: &str, n: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe(channel, queue).await?.1 < n {
        ensure!(
            Instant::now() < deadline,
            "no consumer on {queue} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Checks that `queues` hold no message (after their consumers stopped: an unsent ack would
/// have put its job back), then deletes them and their dead-letter queues. A quorum queue's
/// count can trail its last acks for a moment, so a count above zero is asked again for up to
/// [`SETTLE_WAIT`]; a job put back stays counted.
pub async fn settle_and_delete(channel: &Channel, queues: &[String]) -> anyhow::Result<()> {
    for queue in queues {
        let deadline = Instant::now() + SETTLE_WAIT;
        let mut ready = probe(channel, queue).await?.0;
        while ready > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            ready = probe(channel, queue).await?.0;
        }
        ensure!(ready == 0, "{ready} messages back in {queue} after the run");
        for name in [queue.clone(), warren_core::topology::dead_queue(queue)] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    Ok(())
}
