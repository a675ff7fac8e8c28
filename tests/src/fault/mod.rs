//! The fault-injection suite: real `fault-worker` processes and a real dispatcher against the
//! suite's own RabbitMQ nodes, one fault per scenario, counted with an independent sink.
//!
//! Each scenario runs in a fresh vhost of its node, so that its queues, delay levels and
//! channels are its own. After the faults stop it waits until everything settled, checks that
//! nothing is stuck (0 ready and 0 unacked everywhere, the queues' unacked equal to the
//! channels'), stops the workers, drains the dead-letter queues and counts (see
//! [`check::count`]):
//!
//! - processed = unique ids in the sink; duplicates = sink lines − processed;
//! - dead-lettered = messages in `<queue>.dead`;
//! - lost = confirmed ids neither processed nor dead;
//! - unexpected = processed or dead ids never submitted;
//! - unconfirmed-but-arrived = submits that never returned Ok whose job arrived anyway
//!   (at-least-once allows it; reported apart);
//! - recovery = from the fault to the first job recorded whose handler started after the
//!   fault had taken effect (see each scenario).
//!
//! Workers are `fault-worker` processes (the `warren-worker` command line with recording
//! handlers) started through the shared harness ([`crate::procs`]); what they did is read from
//! the sink ([`crate::sink`]) and the broker, never from their logs.
//!
//! `docs/FAULTS.md` describes the scenarios; `scripts/faults` runs them.

pub mod check;
pub mod node;
pub mod relay;
pub mod scenarios;
pub mod submit;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use warren_core::config::Config;
use warren_core::envelope::NewJob;
use warren_dispatcher::Dispatcher;

use crate::procs::{Pool, WorkerSpec};
pub use crate::sink::now_ms;
use crate::sink::{Sink, Tally};
use check::{Counts, Ledger};
use node::Node;

/// The `warren.toml` of a scenario: its one queue and the knobs the scenarios turn.
#[derive(Debug, Clone)]
pub struct Settings {
    pub heartbeat: &'static str,
    pub connect_timeout: &'static str,
    pub operation_timeout: &'static str,
    pub blocked_timeout: &'static str,
    pub max_payload_bytes: usize,
    pub max_in_flight: usize,
    pub concurrency: u16,
    /// `worker.prefetch`; `None` leaves Warren's default (twice `concurrency`).
    pub prefetch: Option<u16>,
    pub shutdown_grace: &'static str,
    pub delivery_limit: u32,
    pub job_timeout: &'static str,
    pub max_attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: "10s",
            connect_timeout: "5s",
            operation_timeout: "5s",
            blocked_timeout: "30s",
            max_payload_bytes: 1024 * 1024,
            max_in_flight: 1000,
            concurrency: 8,
            prefetch: None,
            shutdown_grace: "5s",
            delivery_limit: 10,
            job_timeout: "30s",
            max_attempts: 3,
        }
    }
}

impl Settings {
    /// The `warren.toml` text for these addresses (the first is `broker.url`, the others
    /// `failover_urls`) and queues. Retries are quick: 1 s, then 2 s, at most 4 s, no jitter.
    pub fn toml(&self, urls: &[String], queues: &[String]) -> String {
        let (first, rest) = urls.split_first().expect("at least one URL");
        let rest: Vec<String> = rest.iter().map(|u| format!("{u:?}")).collect();
        let prefetch = self
            .prefetch
            .map(|p| format!("prefetch = {p}\n"))
            .unwrap_or_default();
        let mut text = format!(
            r#"[broker]
url = {first:?}
failover_urls = [{rest}]
heartbeat = "{heartbeat}"
connect_timeout = "{connect_timeout}"
operation_timeout = "{operation_timeout}"
blocked_timeout = "{blocked_timeout}"

[jobs]
max_payload_bytes = {max_payload_bytes}

[dispatcher]
max_in_flight = {max_in_flight}

[worker]
concurrency = {concurrency}
{prefetch}shutdown_grace = "{shutdown_grace}"
"#,
            rest = rest.join(", "),
            heartbeat = self.heartbeat,
            connect_timeout = self.connect_timeout,
            operation_timeout = self.operation_timeout,
            blocked_timeout = self.blocked_timeout,
            max_payload_bytes = self.max_payload_bytes,
            max_in_flight = self.max_in_flight,
            concurrency = self.concurrency,
            shutdown_grace = self.shutdown_grace,
        );
        for queue in queues {
            text.push_str(&format!(
                r#"
[queues.{queue}]
delivery_limit = {delivery_limit}
job_timeout = "{job_timeout}"

[queues.{queue}.retry]
max_attempts = {max_attempts}
initial_delay = "1s"
multiplier = 2.0
max_delay = "4s"
jitter = 0.0
"#,
                delivery_limit = self.delivery_limit,
                job_timeout = self.job_timeout,
                max_attempts = self.max_attempts,
            ));
        }
        text
    }
}

/// One scenario's place: its node(s), vhost, queue, files.
pub struct Scenario {
    pub number: u8,
    pub name: &'static str,
    /// The node `rabbitmqctl` is run against.
    pub node: Node,
    /// Every node whose address clients get, in order.
    pub nodes: Vec<Node>,
    pub vhost: String,
    /// The scenario's work queue.
    pub queue: String,
    /// Every queue its workers consume and its dispatchers declare (`queue` first).
    pub queues: Vec<String>,
    pub dir: PathBuf,
    pub sink: Sink,
    pub bin: PathBuf,
    pub started: Instant,
}

impl Scenario {
    /// Creates the scenario's vhost and directory.
    pub async fn new(
        number: u8,
        name: &'static str,
        nodes: Vec<Node>,
        bin: &Path,
    ) -> anyhow::Result<Scenario> {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let tag = &tag[tag.len() - 6..];
        let vhost = format!("fault-{number}-{tag}");
        let dir = node::run_dir().join(format!("{number}-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        let node = nodes[0].clone();
        node.add_vhost(&vhost).await?;
        let queue = format!("jobs-{number}");
        Ok(Scenario {
            number,
            name,
            node,
            nodes,
            queues: vec![queue.clone()],
            queue,
            sink: Sink::new(&dir, "sink"),
            vhost,
            dir,
            bin: bin.to_path_buf(),
            started: Instant::now(),
        })
    }

    /// The AMQP URLs of the nodes, with this scenario's vhost.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url(&self.vhost)).collect()
    }

    /// Writes `settings` as `<label>.toml` for the given addresses; returns its path.
    pub fn write_config(&self, label: &str, settings: &Settings, urls: &[String]) -> PathBuf {
        let path = self.dir.join(format!("{label}.toml"));
        std::fs::write(&path, settings.toml(urls, &self.queues)).expect("writing a config");
        path
    }

    /// The same settings as a [`Config`], for the dispatcher in this process.
    pub fn config(&self, settings: &Settings, urls: &[String]) -> Config {
        let config = Config::from_toml(&settings.toml(urls, &self.queues)).expect("valid TOML");
        config.validate().expect("valid config");
        config
    }

    /// A `fault-worker` process on this scenario's queues and sink (its settlements too).
    pub fn worker(&self, label: &str, settings: &Settings, urls: &[String]) -> WorkerSpec {
        let config = self.write_config(label, settings, urls);
        self.sink.env().into_iter().fold(
            WorkerSpec::new(&self.bin, label, &self.queues, &self.dir).config(config),
            |spec, (key, path)| spec.env(key, path),
        )
    }

    /// A connected dispatcher that declared the scenario's queues.
    pub async fn dispatcher(
        &self,
        settings: &Settings,
        urls: &[String],
    ) -> anyhow::Result<Arc<Dispatcher>> {
        let config = self.config(settings, urls);
        let dispatcher = Dispatcher::connect(&config).await?;
        tokio::time::timeout(
            Duration::from_secs(60),
            dispatcher.apply_topology(&self.queues),
        )
        .await
        .context("declaring the topology: no answer")??;
        Ok(Arc::new(dispatcher))
    }

    /// The usual start of a scenario: a dispatcher that declared the queues, and one worker
    /// process `w1`, both with `settings` on every node's address.
    pub async fn dispatcher_and_worker(
        &self,
        settings: &Settings,
    ) -> anyhow::Result<(Arc<Dispatcher>, Pool)> {
        let urls = self.urls();
        let dispatcher = self.dispatcher(settings, &urls).await?;
        let worker = self.worker("w1", settings, &urls);
        let pool = Pool::start(vec![worker], Duration::from_secs(60)).await?;
        Ok((dispatcher, pool))
    }

    /// `n` jobs of `kind` with `payload` for the scenario's queue, each with its own id.
    pub fn jobs(&self, n: usize, kind: &str, payload: &Value) -> Vec<NewJob> {
        self.jobs_for(&self.queue, n, kind, payload)
    }

    /// `n` jobs of `kind` with `payload` for `queue`, each with its own id.
    pub fn jobs_for(&self, queue: &str, n: usize, kind: &str, payload: &Value) -> Vec<NewJob> {
        (0..n)
            .map(|_| NewJob::new(queue, kind, payload).with_id(uuid::Uuid::now_v7().to_string()))
            .collect()
    }

    /// `n` jobs taking `ms` each: `sleep`, except every `flaky_every`-th a `flaky` one (a
    /// retryable failure on attempt 1, done on attempt 2) and, if `fail_every` is not 0, every
    /// `fail_every`-th (offset by half) a `fail` one (a permanent failure: dead-lettered).
    pub fn mixed_jobs(
        &self,
        n: usize,
        ms: u64,
        flaky_every: usize,
        fail_every: usize,
    ) -> Vec<NewJob> {
        (0..n)
            .map(|i| {
                let (kind, payload) = if fail_every > 0 && i % fail_every == fail_every / 2 {
                    ("fail", json!({ "ms": ms }))
                } else if flaky_every > 0 && i % flaky_every == 0 {
                    ("flaky", json!({ "times": 1, "ms": ms }))
                } else {
                    ("sleep", json!({ "ms": ms }))
                };
                NewJob::new(&self.queue, kind, &payload).with_id(uuid::Uuid::now_v7().to_string())
            })
            .collect()
    }

    /// Settles, checks, stops the workers, drains, counts; fills `report`. Returns the dead
    /// letters for the scenario's own checks.
    pub async fn finish(
        &self,
        pool: &mut Pool,
        ledger: &Ledger,
        report: &mut Report,
        settle: Duration,
    ) -> anyhow::Result<Vec<check::DeadMessage>> {
        if let Err(err) = check::wait_settled(
            &self.node,
            &self.vhost,
            &self.sink,
            &ledger.confirmed,
            settle,
        )
        .await
        {
            report.fail(format!("{err:#}"));
        }
        let patience = Duration::from_secs(15);
        let problems = check::stuck_check(&self.node, &self.vhost, false, patience).await?;
        for problem in problems {
            report.fail(format!("stuck (workers running): {problem}"));
        }
        let killed: Vec<String> = pool
            .stop(Duration::from_secs(20))
            .await
            .into_iter()
            .filter(|(_, status)| status.is_none())
            .map(|(label, _)| label)
            .collect();
        if !killed.is_empty() {
            report.note(format!(
                "workers killed after a graceful stop timed out: {killed:?}"
            ));
        }
        let dead = check::drain_dead(&self.node, &self.vhost).await?;
        let problems = check::stuck_check(&self.node, &self.vhost, true, patience).await?;
        for problem in problems {
            report.fail(format!("stuck (after drain): {problem}"));
        }
        let tally = Tally::of(&self.sink.lines());
        report.set_counts(check::count(ledger, &tally, &dead));
        report.note(self.settled_summary());
        Ok(dead)
    }

    /// What the workers' `on_settled` hooks recorded: deliveries by outcome, and acks that
    /// could not be sent (their channel was gone: those jobs are delivered again).
    pub fn settled_summary(&self) -> String {
        let settlements = self.sink.settlements();
        let mut by_outcome: std::collections::BTreeMap<&str, usize> = Default::default();
        for s in &settlements {
            *by_outcome.entry(s.outcome.as_str()).or_default() += 1;
        }
        let unsent = settlements.iter().filter(|s| !s.sent).count();
        format!("deliveries settled: {by_outcome:?}; acks not sent: {unsent}")
    }

    /// Judges the jobs by kind ([`check::judge_kinds`]) after [`Scenario::finish`]: every
    /// misplaced job fails the report; the figures go to its notes.
    pub fn judge_kinds(
        &self,
        report: &mut Report,
        kinds: &check::Kinds,
        ledger: &Ledger,
        dead: &[check::DeadMessage],
    ) -> check::KindOutcomes {
        let tally = Tally::of(&self.sink.lines());
        let outcomes = check::judge_kinds(kinds, ledger, &tally, dead);
        report.note(outcomes.summary());
        for problem in &outcomes.problems {
            report.fail(problem.clone());
        }
        outcomes
    }

    /// Deletes the vhost (everything in it).
    pub async fn cleanup(&self) {
        let _ = self.node.delete_vhost(&self.vhost).await;
    }

    /// Runs `run` with broker settings changed by the Erlang expression `set`, puts them back
    /// with `restore` whatever happened, then cleans up.
    pub async fn with_broker_settings<'a, F, Fut>(
        &'a self,
        set: &str,
        restore: &str,
        run: F,
    ) -> anyhow::Result<Report>
    where
        F: FnOnce(&'a Scenario) -> Fut,
        Fut: Future<Output = anyhow::Result<Report>>,
    {
        self.node.eval(set).await?;
        let result = run(self).await;
        let _ = self.node.eval(restore).await;
        let report = result?;
        self.cleanup().await;
        Ok(report)
    }
}

/// The outcome of one scenario.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `1` to `8`, or `5b` for a variant.
    pub number: String,
    pub name: String,
    pub counts: Counts,
    /// Seconds from each fault to processing again.
    pub recovery: Vec<f64>,
    /// Shown instead of the list of recovery times, when set.
    pub recovery_label: Option<String>,
    pub wall: Duration,
    pub notes: Vec<String>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn new(number: impl ToString, name: &str) -> Report {
        Report {
            number: number.to_string(),
            name: name.to_owned(),
            ..Report::default()
        }
    }

    pub fn fail(&mut self, failure: impl Into<String>) {
        let failure = failure.into();
        eprintln!("[{} {}] FAILURE: {failure}", self.number, self.name);
        self.failures.push(failure);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let mut note: String = note.into();
        if note.len() > 300 {
            let mut cut = 297;
            while !note.is_char_boundary(cut) {
                cut -= 1;
            }
            note.truncate(cut);
            note.push_str("...");
        }
        eprintln!("[{} {}] {note}", self.number, self.name);
        self.notes.push(note);
    }

    pub fn check(&mut self, ok: bool, failure: impl Into<String>) {
        if !ok {
            self.fail(failure);
        }
    }

    /// Records the counts and applies the common assertions: lost = 0, unexpected = 0,
    /// duplicates at most 5% of the jobs.
    pub fn set_counts(&mut self, counts: Counts) {
        if counts.lost > 0 {
            self.fail(format!(
                "{} confirmed jobs lost, e.g. {:?}",
                counts.lost,
                &counts.lost_ids[..counts.lost_ids.len().min(5)]
            ));
        }
        if counts.unexpected > 0 {
            self.fail(format!(
                "{} unexpected jobs, e.g. {:?}",
                counts.unexpected,
                &counts.unexpected_ids[..counts.unexpected_ids.len().min(5)]
            ));
        }
        let bound = counts.submitted.div_ceil(20);
        if counts.duplicates > bound {
            self.fail(format!(
                "{} duplicates, over the bound of {bound} (5%)",
                counts.duplicates
            ));
        }
        if counts.duplicates > 0 {
            self.note(format!(
                "duplicates (id × times recorded, first 10): {:?}",
                counts.duplicate_sample
            ));
        }
        self.counts = counts;
    }

    /// Recovery times as `1.2s/3.4s`.
    pub fn recovery_text(&self) -> String {
        if let Some(label) = &self.recovery_label {
            return label.clone();
        }
        if self.recovery.is_empty() {
            return "-".into();
        }
        self.recovery
            .iter()
            .map(|s| {
                if *s < 1.0 {
                    format!("{s:.2}s")
                } else {
                    format!("{s:.1}s")
                }
            })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// `pass`, `FAIL`, or a pass with a known limitation noted.
    pub fn result(&self) -> &'static str {
        let limited = self.notes.iter().any(|n| n.starts_with("LIMITATION"));
        match (self.failures.is_empty(), limited) {
            (false, _) => "FAIL",
            (true, true) => "pass (limitation: see notes)",
            (true, false) => "pass",
        }
    }

    /// The one line a scenario prints.
    pub fn line(&self) -> String {
        let c = &self.counts;
        format!(
            "scenario {} {}: submitted={} confirmed={} processed={} duplicates={} dead-lettered={} lost={} unexpected={} unconfirmed-but-arrived={} recovery={} wall={:.0}s {}",
            self.number,
            self.name,
            c.submitted,
            c.confirmed,
            c.processed,
            c.duplicates,
            c.dead,
            c.lost,
            c.unexpected,
            c.unconfirmed_arrived,
            self.recovery_text(),
            self.wall.as_secs_f64(),
            if self.failures.is_empty() {
                "PASS"
            } else {
                "FAIL"
            }
        )
    }
}

/// The final table (Markdown).
pub fn table(reports: &[Report]) -> String {
    let mut out = String::from(
        "| # | scenario | submitted | confirmed | processed | duplicates | dead-lettered | lost | unexpected | unconfirmed but arrived | recovery | wall | result |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|\n",
    );
    for r in reports {
        let c = &r.counts;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0}s | {} |\n",
            r.number,
            r.name,
            c.submitted,
            c.confirmed,
            c.processed,
            c.duplicates,
            c.dead,
            c.lost,
            c.unexpected,
            c.unconfirmed_arrived,
            r.recovery_text(),
            r.wall.as_secs_f64(),
            r.result()
        ));
    }
    out
}
