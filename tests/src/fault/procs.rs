//! `fault-worker` processes: spawn, wait until consuming, SIGKILL, SIGTERM, supervise.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::now_ms;

/// How to start one worker process (and its replacements).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub bin: PathBuf,
    pub label: String,
    pub queues: Vec<String>,
    pub concurrency: u16,
    /// The worker's `warren.toml` (`WARREN_CONFIG`).
    pub config: PathBuf,
    /// `WARREN_AMQP_URL`: one URL, or several separated by commas.
    pub urls: String,
    /// `WARREN_SINK`.
    pub sink: PathBuf,
    /// Where the process logs go.
    pub dir: PathBuf,
}

/// A running (or exited) worker process.
pub struct WorkerProc {
    pub child: Child,
    pub pid: u32,
    pub log: PathBuf,
    pub label: String,
    /// When it was spawned, ms since the epoch.
    pub spawned_ms: u64,
}

impl WorkerSpec {
    /// Starts generation `generation` of this worker.
    pub fn spawn(&self, generation: usize) -> anyhow::Result<WorkerProc> {
        let log = self.dir.join(format!("{}-{generation}.log", self.label));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut command = Command::new(&self.bin);
        for queue in &self.queues {
            command.args(["--queue", queue]);
        }
        command
            .args(["--concurrency", &self.concurrency.to_string()])
            .env("WARREN_CONFIG", &self.config)
            .env("WARREN_AMQP_URL", &self.urls)
            .env("WARREN_SINK", &self.sink)
            .env("RUST_LOG", "info,lapin=warn")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        Ok(WorkerProc {
            pid: child.id(),
            child,
            log,
            label: format!("{}#{generation}", self.label),
            spawned_ms: now_ms(),
        })
    }
}

impl WorkerProc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until the log says `needle` `times` times; fails after `deadline` or if the
    /// process exits first.
    pub async fn wait_log(
        &mut self,
        needle: &str,
        times: usize,
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if self.log_text().matches(needle).count() >= times {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "worker {} exited ({status}) before logging {needle:?}:\n{}",
                    self.label,
                    tail(&self.log_text())
                );
            }
            if Instant::now() > until {
                bail!(
                    "worker {} did not log {needle:?} within {deadline:?}:\n{}",
                    self.label,
                    tail(&self.log_text())
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until it consumes (its log says "worker started").
    pub async fn wait_started(&mut self, deadline: Duration) -> anyhow::Result<()> {
        self.wait_log("worker started", 1, deadline).await
    }

    /// SIGKILL, then reap it.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a graceful stop); SIGKILL if it is still running after `deadline`.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() > until {
                self.sigkill();
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last lines of a log, for failure messages.
pub fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// Worker processes by slot; a slot whose process died can be restarted.
pub struct Pool {
    pub specs: Vec<WorkerSpec>,
    pub procs: Vec<WorkerProc>,
    generations: Vec<usize>,
    /// Every process that ever ran, exited ones included (their logs stay readable).
    pub retired: Vec<WorkerProc>,
}

impl Pool {
    /// Starts one process per spec and waits until all consume.
    pub async fn start(specs: Vec<WorkerSpec>, deadline: Duration) -> anyhow::Result<Pool> {
        let mut procs = Vec::new();
        for spec in &specs {
            procs.push(spec.spawn(0)?);
        }
        for proc in &mut procs {
            proc.wait_started(deadline).await?;
        }
        Ok(Pool {
            generations: vec![0; specs.len()],
            specs,
            procs,
            retired: Vec::new(),
        })
    }

    /// Replaces slot `i`'s process by a new one (the old one must have exited or be killed);
    /// returns the new pid. Does not wait for it to consume.
    pub fn respawn(&mut self, i: usize) -> anyhow::Result<u32> {
        self.generations[i] += 1;
        let new = self.specs[i].spawn(self.generations[i])?;
        let pid = new.pid;
        let old = std::mem::replace(&mut self.procs[i], new);
        self.retired.push(old);
        Ok(pid)
    }

    /// SIGTERM to all, waiting up to `deadline` each. Returns labels of those that had to be
    /// killed.
    pub async fn stop(&mut self, deadline: Duration) -> Vec<String> {
        let mut killed = Vec::new();
        for proc in &mut self.procs {
            if proc.terminate(deadline).await.is_none() {
                killed.push(proc.label.clone());
            }
        }
        killed
    }

    /// All logs, current and retired processes.
    pub fn all_logs(&self) -> String {
        self.retired
            .iter()
            .chain(&self.procs)
            .map(|p| {
                format!(
                    "===== {} (pid {}) =====\n{}",
                    p.label,
                    p.pid,
                    tail(&p.log_text())
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A crash seen by a supervisor.
#[derive(Debug, Clone)]
pub struct Death {
    pub slot: usize,
    pub pid: u32,
    pub status: String,
    pub at_ms: u64,
    pub replacement: u32,
}

/// Restarts any process of the pool that exits, until `stop` is cancelled; returns the deaths.
pub async fn supervise(pool: Arc<Mutex<Pool>>, stop: CancellationToken) -> Vec<Death> {
    let mut deaths = Vec::new();
    while !stop.is_cancelled() {
        {
            let mut pool = pool.lock().await;
            for i in 0..pool.procs.len() {
                if let Some(status) = pool.procs[i].exited() {
                    let pid = pool.procs[i].pid;
                    let at_ms = now_ms();
                    match pool.respawn(i) {
                        Ok(replacement) => deaths.push(Death {
                            slot: i,
                            pid,
                            status: status.to_string(),
                            at_ms,
                            replacement,
                        }),
                        Err(err) => eprintln!("supervisor: cannot restart worker {i}: {err:#}"),
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    deaths
}
