//! Worker processes and what the benchmark checks on them: the count file their handlers
//! write, their peak RSS, the queues they leave behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use lapin::Channel;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use warren_core::Config;
use warren_core::config::QueueType;

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

/// Worker processes consuming the same queues, counting into one file.
pub struct Workers {
    children: Vec<Child>,
    pub count_file: PathBuf,
    log_file: PathBuf,
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
        let log_file = bench.work_dir.join(format!("{stem}.log"));
        let config = config_file(bench, queue_type)?;
        let worker = binary("bench-worker")?;
        let spawned_at = now();
        let mut children = Vec::new();
        for _ in 0..processes {
            let log_out = File::options().create(true).append(true).open(&log_file)?;
            let mut command = Command::new(&worker);
            command
                .arg("--config")
                .arg(&config)
                .arg("--concurrency")
                .arg(concurrency.to_string())
                .env("WARREN_BENCH_COUNT_FILE", &count_file)
                .env("RUST_LOG", log)
                .env_remove("WARREN_AMQP_URL")
                .stdin(Stdio::null())
                .stdout(log_out.try_clone()?)
                .stderr(log_out);
            for queue in queues {
                command.arg("--queue").arg(queue);
            }
            children.push(command.spawn().context("starting bench-worker")?);
        }
        Ok(Workers {
            children,
            count_file,
            log_file,
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
            for child in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    bail!("a worker exited ({status}); log:\n{}", self.log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "only {counted} of {jobs} jobs handled in time; log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        verify_count_file(&self.count_file, jobs)
    }

    /// Peak RSS (VmHWM) of each process so far, in bytes.
    pub fn peak_rss(&self) -> Vec<u64> {
        self.children.iter().map(|c| peak_rss(c.id())).collect()
    }

    /// Stops the processes gracefully (SIGTERM: they finish and ack what they run).
    pub fn stop(mut self) -> anyhow::Result<()> {
        for child in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        for child in &mut self.children {
            let status = child.wait()?;
            ensure!(
                status.success(),
                "worker exited with {status}; log:\n{}",
                self.log_tail()
            );
        }
        self.children.clear();
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

use std::fs::File;

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

/// VmHWM of a process, in bytes (0 if it is gone).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Now, as unix seconds (the count files' clock).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

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
/// have put its job back), then deletes them and their dead-letter queues.
pub async fn settle_and_delete(channel: &Channel, queues: &[String]) -> anyhow::Result<()> {
    for queue in queues {
        let (ready, _) = probe(channel, queue).await?;
        ensure!(ready == 0, "{ready} messages back in {queue} after the run");
        for name in [queue.clone(), warren_core::topology::dead_queue(queue)] {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
    }
    Ok(())
}
