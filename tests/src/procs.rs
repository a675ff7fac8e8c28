//! Worker processes, for everyone who runs them: the end-to-end tests (`tests/tests/`), the
//! fault-injection suite ([`crate::fault`]) and the benchmark (`warren-bench`). One harness:
//! spawn a worker binary built on the `warren-worker` command line ([`warren_workers::cli`]),
//! wait until it consumes, signal it, stop it, restart it, supervise it, read its peak memory.
//!
//! A process gets its arguments (`--queue`, `--concurrency`, `--config`) and environment from a
//! [`WorkerSpec`]; `WARREN_CONFIG` and `WARREN_AMQP_URL` are never inherited from the caller,
//! only set by the spec. Its stdout and stderr go to its own log file, which is read for one
//! thing only: the `worker started` line that says it consumes. What a worker *did* is counted
//! elsewhere (the [`crate::sink`] of `fault-worker`, the benchmark's count file), never by
//! parsing its log.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use warren_core::config::{AMQP_URL_ENV, CONFIG_ENV};

use crate::sink::now_ms;

/// What the log of a worker says once it consumes (`warren_workers::worker`).
pub const STARTED: &str = "worker started";

/// How to start one worker process (and its replacements).
#[derive(Debug, Clone)]
pub struct WorkerSpec {
    pub bin: PathBuf,
    /// Names its log files: `<label>-<generation>.log`.
    pub label: String,
    pub queues: Vec<String>,
    /// `--concurrency`, if given.
    pub concurrency: Option<u16>,
    /// `--config`, if given.
    pub config: Option<PathBuf>,
    /// Extra environment (`RUST_LOG` is `info,lapin=warn` unless set here).
    pub env: Vec<(String, OsString)>,
    /// Where the logs go.
    pub dir: PathBuf,
}

impl WorkerSpec {
    /// `bin` on `queues`, logging into `dir`.
    pub fn new(
        bin: impl Into<PathBuf>,
        label: &str,
        queues: &[impl AsRef<str>],
        dir: impl Into<PathBuf>,
    ) -> WorkerSpec {
        WorkerSpec {
            bin: bin.into(),
            label: label.to_owned(),
            queues: queues.iter().map(|q| q.as_ref().to_owned()).collect(),
            concurrency: None,
            config: None,
            env: Vec::new(),
            dir: dir.into(),
        }
    }

    pub fn concurrency(mut self, concurrency: u16) -> WorkerSpec {
        self.concurrency = Some(concurrency);
        self
    }

    pub fn config(mut self, path: impl Into<PathBuf>) -> WorkerSpec {
        self.config = Some(path.into());
        self
    }

    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> WorkerSpec {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    /// Starts generation `generation` of this worker (0 for the first; a restart takes the
    /// next), without waiting for it to consume.
    pub fn spawn(&self, generation: usize) -> anyhow::Result<WorkerProc> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("{}", self.dir.display()))?;
        let log = self.dir.join(format!("{}-{generation}.log", self.label));
        let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let mut command = Command::new(&self.bin);
        for queue in &self.queues {
            command.args(["--queue", queue]);
        }
        if let Some(concurrency) = self.concurrency {
            command.args(["--concurrency", &concurrency.to_string()]);
        }
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
            .env_remove(CONFIG_ENV)
            .env_remove(AMQP_URL_ENV)
            .env("RUST_LOG", "info,lapin=warn")
            .env("NO_COLOR", "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
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

/// A running (or exited) worker process. Dropping it kills it.
pub struct WorkerProc {
    pub child: Child,
    pub pid: u32,
    pub log: PathBuf,
    pub label: String,
    /// When it was spawned, ms since the epoch.
    pub spawned_ms: u64,
}

impl WorkerProc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log_text())
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until it consumes (its log says [`STARTED`]); fails after `deadline` or if the
    /// process exits first.
    pub async fn wait_started(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + deadline;
        loop {
            if self.log_text().contains(STARTED) {
                return Ok(());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "worker {} exited ({status}) before it consumed:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            if Instant::now() > until {
                bail!(
                    "worker {} did not consume within {deadline:?}:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` (`TERM`, `KILL`, `INT`, ...) without waiting.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.pid.to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(status.success(), "kill -{signal} {} failed", self.pid);
        Ok(())
    }

    /// SIGKILL, then reap it.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; fails after `deadline` (and kills it).
    pub async fn wait_exit(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.exited() {
                return Ok(status);
            }
            if Instant::now() > until {
                self.sigkill();
                bail!(
                    "worker {} did not exit within {deadline:?}:\n{}",
                    self.label,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (a graceful stop); SIGKILL if it is still running after `deadline`. The exit
    /// status, or `None` if it had to be killed.
    pub async fn terminate(&mut self, deadline: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited() {
            return Some(status);
        }
        let _ = self.signal("TERM");
        self.wait_exit(deadline).await.ok()
    }

    /// Peak resident memory (VmHWM) so far, in bytes; 0 once the process is gone.
    pub fn peak_rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
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
    /// Every process that ran before its slot's current one (their logs stay readable).
    pub retired: Vec<WorkerProc>,
}

impl Pool {
    /// Starts one process per spec and waits until all consume.
    pub async fn start(specs: Vec<WorkerSpec>, deadline: Duration) -> anyhow::Result<Pool> {
        let mut pool = Pool::spawn(specs)?;
        for proc in &mut pool.procs {
            proc.wait_started(deadline).await?;
        }
        Ok(pool)
    }

    /// Starts one process per spec, without waiting.
    pub fn spawn(specs: Vec<WorkerSpec>) -> anyhow::Result<Pool> {
        let procs = specs
            .iter()
            .map(|spec| spec.spawn(0))
            .collect::<anyhow::Result<Vec<_>>>()?;
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

    /// The first process that exited, with its label and status.
    pub fn any_exited(&mut self) -> Option<(String, ExitStatus)> {
        self.procs
            .iter_mut()
            .find_map(|p| p.exited().map(|status| (p.label.clone(), status)))
    }

    /// SIGTERM to all at once, then waits up to `deadline` for each. Returns each process's
    /// label and exit status (`None`: it had to be killed).
    pub async fn stop(&mut self, deadline: Duration) -> Vec<(String, Option<ExitStatus>)> {
        for proc in &mut self.procs {
            if proc.exited().is_none() {
                let _ = proc.signal("TERM");
            }
        }
        let mut stopped = Vec::new();
        for proc in &mut self.procs {
            let status = proc.wait_exit(deadline).await.ok();
            stopped.push((proc.label.clone(), status));
        }
        stopped
    }

    /// Peak RSS of each current process, in bytes.
    pub fn peak_rss(&self) -> Vec<u64> {
        self.procs.iter().map(WorkerProc::peak_rss).collect()
    }

    /// The tails of all logs, retired processes first.
    pub fn all_logs(&self) -> String {
        self.retired
            .iter()
            .chain(&self.procs)
            .map(|p| format!("===== {} (pid {}) =====\n{}", p.label, p.pid, p.log_tail()))
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
