//! Helpers shared by Warren's end-to-end tests, which run against a real RabbitMQ.
//!
//! The broker comes from `scripts/broker start` (or `WARREN_AMQP_URL`). A missing broker fails
//! the test loudly with instructions; nothing is skipped.
//!
//! Isolation: every test works on queues with unique names ([`unique_queue`]), so tests run in
//! parallel and never see each other's jobs. The shared exchanges and delay levels are
//! declared idempotently by everyone. Each test deletes its queues at the end ([`cleanup`]).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_core::config::{Config, QueueConfig, RetryConfig};
use warren_dispatcher::Dispatcher;
use warren_workers::{JobContext, JobError, Registry, Worker, WorkerError};

/// The broker the tests use.
pub fn broker_url() -> String {
    std::env::var(warren_core::config::AMQP_URL_ENV)
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A queue name no other test uses: `t-<what>-<random>`.
pub fn unique_queue(what: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    format!("t-{what}-{}", &id[id.len() - 12..])
}

/// A config for tests: the test broker, quick retries (1 s, ×2, no jitter), short grace.
pub fn config(queues: &[&str]) -> Config {
    let mut config = Config::default();
    config.broker.url = broker_url();
    config.worker.shutdown_grace = Duration::from_secs(10);
    for queue in queues {
        config.queues.insert((*queue).to_owned(), quick_queue());
    }
    config
}

/// Queue settings with 1 s, 2 s, 4 s ... retries and no jitter, so timings are predictable.
pub fn quick_queue() -> QueueConfig {
    QueueConfig {
        retry: RetryConfig {
            max_attempts: 3,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.0,
        },
        ..QueueConfig::default()
    }
}

/// A raw connection, failing the test with instructions if the broker is not there.
pub async fn connect() -> Connection {
    let mut broker = Config::default().broker;
    broker.url = broker_url();
    match warren_core::connection::connect(&broker, "warren-tests").await {
        Ok(connection) => connection,
        Err(err) => panic!(
            "these tests need a running RabbitMQ: {err}\n\
             start one with `scripts/broker start` (or set WARREN_AMQP_URL)"
        ),
    }
}

/// A dispatcher on the test config, after declaring the test's queues.
pub async fn dispatcher(config: &Config) -> Dispatcher {
    let dispatcher = match Dispatcher::connect(config).await {
        Ok(d) => d,
        Err(err) => panic!("cannot connect: {err}\nstart a broker with `scripts/broker start`"),
    };
    let queues: Vec<String> = config.queues.keys().cloned().collect();
    dispatcher
        .apply_topology(&queues)
        .await
        .expect("declaring the test queues");
    dispatcher
}

/// A worker running in this process, stopped with [`RunningWorker::stop`].
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), WorkerError>>,
}

/// Starts an in-process worker for `queues` with `registry`.
pub fn start_worker(config: &Config, registry: Registry, queues: &[&str]) -> RunningWorker {
    let shutdown = CancellationToken::new();
    let worker = queues
        .iter()
        .fold(Worker::new(config.clone(), registry), |w, q| w.queue(*q));
    let task = tokio::spawn(worker.run(shutdown.clone()));
    RunningWorker { shutdown, task }
}

impl RunningWorker {
    /// True while the worker task has not ended.
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Cancels the worker and waits for it to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s")
            .expect("worker task did not panic");
        result.expect("worker ran without error");
    }
}

/// One handler call, as seen by a [`Recorder`].
#[derive(Debug, Clone)]
pub struct Call {
    pub id: String,
    pub attempt: u32,
    pub payload: Value,
    pub at: Instant,
    /// The attempt's trace context ([`JobContext::trace`]).
    pub trace: warren_core::trace::SpanIds,
}

/// Records every handler call, so tests can wait for and inspect them.
#[derive(Clone, Default)]
pub struct Recorder {
    calls: Arc<Mutex<Vec<Call>>>,
    changed: Arc<Notify>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Registers `kind` so that each call is recorded, then answered by `answer`.
    pub fn handle<F>(&self, registry: &mut Registry, kind: &str, answer: F)
    where
        F: Fn(&Call) -> Result<Option<Value>, JobError> + Send + Sync + 'static,
    {
        let recorder = self.clone();
        let answer = Arc::new(answer);
        registry.register(kind, move |payload: Value, ctx: JobContext| {
            let recorder = recorder.clone();
            let answer = answer.clone();
            async move {
                let call = Call {
                    id: ctx.id.0.clone(),
                    attempt: ctx.attempt,
                    payload,
                    at: Instant::now(),
                    trace: ctx.trace,
                };
                let result = answer(&call);
                recorder.push(call);
                result
            }
        });
    }

    /// Records a call made by a hand-written handler, from its arguments.
    pub fn record(&self, payload: Value, ctx: &JobContext) {
        self.push(Call {
            id: ctx.id.0.clone(),
            attempt: ctx.attempt,
            payload,
            at: Instant::now(),
            trace: ctx.trace,
        });
    }

    /// Records a call made by a hand-written handler.
    pub fn push(&self, call: Call) {
        self.calls.lock().expect("recorder lock").push(call);
        self.changed.notify_waiters();
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("recorder lock").clone()
    }

    /// Waits until at least `n` calls were recorded; panics after `deadline`.
    pub async fn wait_for(&self, n: usize, deadline: Duration) -> Vec<Call> {
        let until = Instant::now() + deadline;
        loop {
            let notified = self.changed.notified();
            let calls = self.calls();
            if calls.len() >= n {
                return calls;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "expected {n} handler calls within {deadline:?}, saw {}: {calls:?}",
                    calls.len()
                );
            }
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }
}

/// Takes (and acks) messages from `queue` until `n` arrived; panics after `deadline`.
pub async fn take_messages(
    channel: &Channel,
    queue: &str,
    n: usize,
    deadline: Duration,
) -> Vec<lapin::message::Delivery> {
    let until = Instant::now() + deadline;
    let mut got = Vec::new();
    while got.len() < n {
        let message = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get");
        match message {
            Some(message) => got.push(message.delivery),
            None if Instant::now() > until => {
                panic!(
                    "expected {n} messages in `{queue}` within {deadline:?}, got {}",
                    got.len()
                )
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    got
}

/// Ready messages in `queue` (unacked ones are not counted).
pub async fn ready_count(channel: &Channel, queue: &str) -> u32 {
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let queue = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .expect("queue exists");
    queue.message_count()
}

/// Deletes the test's queues and their dead-letter queues.
pub async fn cleanup(channel: &Channel, queues: &[&str]) {
    for queue in queues {
        for name in [queue.to_string(), warren_core::topology::dead_queue(queue)] {
            let _ = channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

/// A header of a delivered message as text.
pub fn header(delivery: &lapin::message::Delivery, key: &str) -> Option<String> {
    warren_core::envelope::header_str(&delivery.properties, key).map(|s| s.into_owned())
}

/// The path of a workspace binary (`warren` or `warren-worker`), built once per test run.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let root = workspace_root();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "--bins", "-p", "warren-cli"])
            .current_dir(&root)
            .status()
            .expect("running cargo build for the binaries");
        assert!(status.success(), "building the warren binaries failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    target.join("debug").join(name)
}

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A worker process on the test broker: `fault-worker`, the `warren-worker` command line with
/// recording handlers (`echo`, `sleep`, `flaky`, `fail`, ...; see `src/bin/fault-worker.rs`),
/// started through the shared harness ([`procs`]) with its log and its sink ([`sink`]) in a
/// directory of its own. What it did is read from the sink, never from its log.
pub struct TestWorker {
    pub process: procs::WorkerProc,
    pub sink: sink::Sink,
    dir: PathBuf,
}

impl TestWorker {
    /// Starts `bin` (`env!("CARGO_BIN_EXE_fault-worker")` in a test) on `queues` with the
    /// built-in defaults and the test broker ([`broker_url`]).
    pub fn spawn(bin: &str, queues: &[&str], concurrency: u16) -> TestWorker {
        let dir = std::env::temp_dir().join(format!(
            "warren-test-worker-{}",
            uuid::Uuid::now_v7().simple()
        ));
        let sink = sink::Sink::new(&dir, "sink");
        let spec = sink.env().into_iter().fold(
            procs::WorkerSpec::new(bin, "worker", queues, &dir)
                .concurrency(concurrency)
                .env(warren_core::config::AMQP_URL_ENV, broker_url()),
            |spec, (key, path)| spec.env(key, path),
        );
        let process = spec.spawn(0).expect("starting the worker process");
        TestWorker { process, sink, dir }
    }

    /// Waits until it consumes; panics with its log after `deadline`.
    pub async fn wait_started(&mut self, deadline: Duration) {
        if let Err(err) = self.process.wait_started(deadline).await {
            panic!("{err:#}");
        }
    }

    /// Ids of the jobs it settled as done, its ack sent, in order (an id twice if done twice).
    pub fn done_ids(&self) -> Vec<String> {
        self.sink.done_ids()
    }

    /// Waits until job `id` is done (its ack sent); panics with the log after `deadline`.
    pub async fn wait_done(&self, id: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        while !self.done_ids().iter().any(|done| done == id) {
            if Instant::now() > until {
                panic!(
                    "job {id} was not done within {deadline:?}; worker log:\n{}",
                    self.process.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a signal (`KILL`, `TERM`, ...).
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal).expect("signalling the worker");
    }

    /// Waits for the process to exit; panics with its log after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        match self.process.wait_exit(deadline).await {
            Ok(status) => status,
            Err(err) => panic!("{err:#}"),
        }
    }

    /// Stops it (if running) and deletes its files: for a test that passed (a failing one
    /// keeps them, and its panic message shows the log).
    pub fn remove(mut self) {
        self.process.sigkill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `rabbitmqctl` against the local test broker (through `scripts/broker ctl`).
pub fn broker_ctl(args: &[&str]) -> String {
    let output = Command::new(workspace_root().join("scripts/broker"))
        .arg("ctl")
        .args(args)
        .output()
        .expect("running scripts/broker ctl");
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {text}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    text
}

/// A fresh vhost that guest may use, deleted when dropped: for tests that need a broker
/// where Warren never ran.
pub struct TempVhost {
    pub name: String,
}

impl TempVhost {
    pub fn new(what: &str) -> TempVhost {
        let name = unique_queue(what);
        broker_ctl(&["add_vhost", &name]);
        broker_ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        TempVhost { name }
    }

    /// The broker URL with this vhost.
    pub fn url(&self) -> String {
        let base = broker_url();
        let without_vhost = base.rsplit_once('/').map(|(head, _)| head).unwrap_or(&base);
        format!("{without_vhost}/{}", self.name)
    }
}

impl Drop for TempVhost {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/broker"))
            .args(["ctl", "delete_vhost", &self.name])
            .output();
    }
}

/// Closes (from the broker's side) every connection whose client-given name contains
/// `name_contains`; returns how many were closed.
pub fn close_connections(name_contains: &str) -> usize {
    let pids = connection_pids(name_contains);
    for pid in &pids {
        broker_ctl(&["close_connection", pid, "closed by a Warren test"]);
    }
    pids.len()
}

/// The broker's pids of the connections whose client-given name contains `name_contains`,
/// sorted: a process that reconnected has other pids than before.
pub fn connection_pids(name_contains: &str) -> Vec<String> {
    let listing = broker_ctl(&["-q", "list_connections", "pid", "client_properties"]);
    let mut pids: Vec<String> = connections_named(&listing, name_contains)
        .into_iter()
        .map(str::to_owned)
        .collect();
    pids.sort();
    pids
}

/// The connection pids in a `rabbitmqctl list_connections pid client_properties` listing whose
/// client-given name (`{"connection_name","..."}`) contains `name_contains`.
pub fn connections_named<'a>(listing: &'a str, name_contains: &str) -> Vec<&'a str> {
    listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .filter(|(pid, properties)| {
            let name = properties
                .split("{\"connection_name\",\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .unwrap_or_default();
            pid.starts_with('<') && name.contains(name_contains)
        })
        .map(|(pid, _)| pid)
        .collect()
}

pub mod cli;
pub mod fault;
pub mod http;
pub mod probe;
pub mod procs;
pub mod raw_amqp;
pub mod sink;
pub mod tls;

/// One test's stage: a unique queue, a dispatcher that declared it, an in-process worker
/// running `registry` on it, and a channel for looking into the broker.
pub struct Stage {
    pub queue: String,
    pub dispatcher: Dispatcher,
    pub channel: Channel,
    worker: Option<RunningWorker>,
}

impl Stage {
    /// Sets the stage with the test config ([`config`]) for a queue named after `what`.
    pub async fn new(what: &str, registry: Registry) -> Stage {
        Stage::with(what, registry, |_| {}).await
    }

    /// Same, after `tweak` adjusted the queue's settings.
    pub async fn with(
        what: &str,
        registry: Registry,
        tweak: impl FnOnce(&mut QueueConfig),
    ) -> Stage {
        let queue = unique_queue(what);
        let mut config = config(&[&queue]);
        if let Some(settings) = config.queues.get_mut(&queue) {
            tweak(settings);
        }
        let dispatcher = dispatcher(&config).await;
        let worker = Some(start_worker(&config, registry, &[&queue]));
        let channel = connect().await.create_channel().await.expect("channel");
        Stage {
            queue,
            dispatcher,
            channel,
            worker,
        }
    }

    /// Submits a job of `kind` to the stage's queue; panics unless it is confirmed.
    pub async fn submit(&self, kind: &str, payload: Value) -> warren_core::JobId {
        let job = warren_core::NewJob::new(&self.queue, kind, &payload);
        self.dispatcher.submit(job).await.expect("submitted")
    }

    /// Takes the first `n` jobs from the queue's dead-letter queue, waiting up to 30 s.
    pub async fn dead_letters(&self, n: usize) -> Vec<lapin::message::Delivery> {
        let dead = warren_core::topology::dead_queue(&self.queue);
        take_messages(&self.channel, &dead, n, Duration::from_secs(30)).await
    }

    /// Ready messages in the work queue and in its dead-letter queue.
    pub async fn ready(&self) -> (u32, u32) {
        let dead = warren_core::topology::dead_queue(&self.queue);
        (
            ready_count(&self.channel, &self.queue).await,
            ready_count(&self.channel, &dead).await,
        )
    }

    /// True while the worker runs.
    pub fn worker_is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(RunningWorker::is_running)
    }

    /// Stops the worker gracefully (unacked jobs return to the queue).
    pub async fn stop_worker(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
    }

    /// Stops the worker and deletes the stage's queues.
    pub async fn end(mut self) {
        self.stop_worker().await;
        cleanup(&self.channel, &[&self.queue]).await;
    }
}
