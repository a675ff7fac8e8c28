//! Configuration: one `warren.toml` read by the dispatcher and the workers alike.
//!
//! Every section and field has a default, so an empty file (or no file) is a working local
//! setup. Unknown keys are rejected, and [`Config::validate`] checks values that TOML cannot:
//! an error always names the file and the key. Durations are written the humane way (`"30s"`,
//! `"5m"`, `"1h 30m"`).
//!
//! Where a file comes from is decided by [`Config::load`]; `WARREN_AMQP_URL` overrides
//! `broker.url` so that containers and tests can point at another broker without a file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{delay, topology};

/// Environment variable that overrides `broker.url`.
pub const AMQP_URL_ENV: &str = "WARREN_AMQP_URL";
/// Environment variable naming the config file when no `--config` is given.
pub const CONFIG_ENV: &str = "WARREN_CONFIG";
/// Looked for in the working directory when neither `--config` nor `WARREN_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "config/warren.toml";

/// RabbitMQ's default `consumer_timeout`: a delivery unacked for longer closes its channel.
/// <https://www.rabbitmq.com/docs/consumers#acknowledgement-timeout>
pub const BROKER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The whole configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub broker: BrokerConfig,
    pub jobs: JobsConfig,
    pub dispatcher: DispatcherConfig,
    pub worker: WorkerConfig,
    /// `[queue_defaults]`: the settings of every queue, unless its own section says otherwise.
    pub queue_defaults: QueueConfig,
    /// `[queues.NAME]`: per-queue settings, already merged over `queue_defaults`. A queue that
    /// is not listed uses `queue_defaults`.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Where this configuration was read from, for error messages.
    pub source: ConfigSource,
}

/// The file as written: queue sections stay raw tables until they are merged over
/// `[queue_defaults]`, so a queue section only needs the keys it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    broker: BrokerConfig,
    jobs: JobsConfig,
    dispatcher: DispatcherConfig,
    worker: WorkerConfig,
    queue_defaults: toml::Table,
    queues: BTreeMap<String, toml::Table>,
}

/// Where a [`Config`] came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConfigSource {
    #[default]
    Defaults,
    File(PathBuf),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Defaults => f.write_str("(built-in defaults)"),
            ConfigSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// `[broker]`: how to reach RabbitMQ.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL, vhost percent-encoded (`%2f` is `/`).
    pub url: String,
    /// More nodes of the same cluster: connecting tries `url` and then these in turn, and a
    /// lost connection fails over to the next one.
    pub failover_urls: Vec<String>,
    /// AMQP heartbeat interval: a silent peer is declared dead after two missed beats.
    #[serde(with = "humane")]
    pub heartbeat: Duration,
    /// How long to keep retrying (with exponential backoff) before giving up on connecting.
    #[serde(with = "humane")]
    pub connect_timeout: Duration,
    /// Deadline for one broker round trip, such as waiting for a publisher confirm.
    #[serde(with = "humane")]
    pub operation_timeout: Duration,
    /// How long a submit waits while RabbitMQ blocks publishers (memory or disk alarm) before
    /// it fails.
    #[serde(with = "humane")]
    pub blocked_timeout: Duration,
}

impl BrokerConfig {
    /// Every address to try, `url` first.
    pub fn addresses(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.failover_urls.iter().map(String::as_str))
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            failover_urls: Vec::new(),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            blocked_timeout: Duration::from_secs(30),
        }
    }
}

/// `[jobs]`: limits that apply to every job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// The largest JSON payload accepted, in bytes.
    pub max_payload_bytes: usize,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_payload_bytes: 1024 * 1024,
        }
    }
}

/// `[dispatcher]`: submitting jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// How many publishes may wait for their confirm at once in a batch.
    pub max_in_flight: usize,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 1000,
        }
    }
}

/// `[worker]`: the worker process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Handlers run at once by one process.
    pub concurrency: u16,
    /// Each consumer's prefetch (unacked deliveries the broker sends ahead); `None` means twice
    /// `concurrency`. At least `concurrency`: the room above it keeps handlers busy while
    /// finished jobs wait for their acks, retries or dead letters. (While a resource alarm
    /// blocks publishing, each queue also gets an overflow consumer with a prefetch of 256, room
    /// for failed jobs waiting for the alarm.)
    pub prefetch: Option<u16>,
    /// On SIGTERM/SIGINT, how long in-flight jobs may take to finish before the process exits
    /// anyway (what did not finish is redelivered by the broker).
    #[serde(with = "humane")]
    pub shutdown_grace: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            prefetch: None,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

impl WorkerConfig {
    /// Each consumer's prefetch: `prefetch`, or twice `concurrency`.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
            .unwrap_or_else(|| self.concurrency.saturating_mul(2))
    }
}

/// `[queues.NAME]`: one work queue.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// `quorum` (replicated, the default) or `classic`.
    #[serde(rename = "type")]
    pub queue_type: QueueType,
    /// Deliveries after which the broker dead-letters a job that never got settled (a job that
    /// crashes its worker every time). Quorum queues only.
    pub delivery_limit: u32,
    /// A handler running longer than this is stopped and counted as a retryable failure.
    #[serde(with = "humane")]
    pub job_timeout: Duration,
    pub retry: RetryConfig,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            queue_type: QueueType::Quorum,
            delivery_limit: 10,
            job_timeout: Duration::from_secs(5 * 60),
            retry: RetryConfig::default(),
        }
    }
}

/// The RabbitMQ queue type of a work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[queues.NAME.retry]`: the exponential backoff between attempts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all, the first one included. 1 means never retry.
    pub max_attempts: u32,
    #[serde(with = "humane")]
    pub initial_delay: Duration,
    pub multiplier: f64,
    #[serde(with = "humane")]
    pub max_delay: Duration,
    /// Randomisation factor: each delay is drawn from `[d·(1-jitter), d·(1+jitter)]`.
    pub jitter: f64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60 * 60),
            jitter: 0.2,
        }
    }
}

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {origin}: `{key}` {reason}")]
    Invalid {
        origin: ConfigSource,
        key: String,
        reason: String,
    },
}

impl Config {
    /// Loads the configuration: from `path` if given, else from `$WARREN_CONFIG`, else from
    /// `config/warren.toml` if it exists, else the built-in defaults. Then applies
    /// `$WARREN_AMQP_URL` and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(CONFIG_ENV).map(PathBuf::from);
        let default = Path::new(DEFAULT_CONFIG_PATH);
        let path = match (path, from_env) {
            (Some(path), _) => Some(path.to_path_buf()),
            (None, Some(path)) => Some(path),
            (None, None) => default.exists().then(|| default.to_path_buf()),
        };
        let mut config = match path {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        if let Ok(urls) = std::env::var(AMQP_URL_ENV) {
            let mut urls = urls
                .split(',')
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty());
            if let Some(first) = urls.next() {
                config.broker.url = first;
                config.broker.failover_urls = urls.collect();
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses one file, without validating it.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.source = ConfigSource::File(path.to_path_buf());
        Ok(config)
    }

    /// Parses TOML text, without validating it.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        let file: FileConfig = toml::from_str(text).map_err(|err| err.to_string())?;
        let queue = |key: &str, table: toml::Table| {
            QueueConfig::deserialize(toml::Value::Table(table))
                .map_err(|err| format!("in [{key}]: {err}"))
        };
        let queue_defaults = queue("queue_defaults", file.queue_defaults.clone())?;
        let mut queues = BTreeMap::new();
        for (name, table) in file.queues {
            let merged = merge(file.queue_defaults.clone(), table);
            queues.insert(name.clone(), queue(&format!("queues.{name}"), merged)?);
        }
        Ok(Config {
            broker: file.broker,
            jobs: file.jobs,
            dispatcher: file.dispatcher,
            worker: file.worker,
            queue_defaults,
            queues,
            source: ConfigSource::Defaults,
        })
    }

    /// Settings that are valid but probably not what the operator wants, one sentence each.
    /// The binaries log them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (name, queue) in &self.queues {
            let consumer_timeout = self.consumer_timeout(&[name.as_str()]);
            if consumer_timeout >= BROKER_CONSUMER_TIMEOUT {
                warnings.push(format!(
                    "{}: queues.{name}: a worker asks RabbitMQ for a consumer timeout of {} \
                     (x-consumer-timeout, from job_timeout); RabbitMQ 4.x honours it, but 3.10 \
                     ignores it and applies its broker-wide consumer_timeout (30m by default): \
                     on 3.10 raise consumer_timeout in rabbitmq.conf above it",
                    self.source,
                    humantime::format_duration(consumer_timeout)
                ));
            }
            if queue.queue_type == QueueType::Classic {
                warnings.push(format!(
                    "{}: queues.{name} is a classic queue: RabbitMQ dead-letters from classic \
                     queues at-most-once and they have no delivery limit, so a job that crashes \
                     its worker every time is redelivered forever; use type = \"quorum\" for \
                     Warren's guarantees",
                    self.source
                ));
            }
        }
        warnings
    }

    /// The settings of one queue: its own section, or `[queue_defaults]`.
    /// The consumer timeout a worker consuming `queues` asks RabbitMQ for on the consumer of
    /// `queues[0]` (`x-consumer-timeout`; RabbitMQ 3.12 and 4.x honour it, 3.10 ignores it).
    ///
    /// Long enough that Warren's own `job_timeout` always acts first, so the broker's is a last
    /// resort (a handler that blocks its thread and cannot be stopped): the broker counts from
    /// the delivery, and a delivery can wait in the prefetch buffer for a free slot behind
    /// `prefetch` deliveries of every consumed queue, each running up to its `job_timeout`; then
    /// it runs up to its own `job_timeout`, and its retry or dead letter has `operation_timeout`
    /// to be confirmed.
    pub fn consumer_timeout(&self, queues: &[&str]) -> Duration {
        let Some(own) = queues.first() else {
            return BROKER_CONSUMER_TIMEOUT;
        };
        let longest = queues
            .iter()
            .map(|q| self.queue(q).job_timeout)
            .max()
            .unwrap_or_default();
        let waiting = usize::from(self.worker.prefetch()) * queues.len();
        let concurrency = usize::from(self.worker.concurrency.max(1));
        let rounds = u32::try_from(waiting.div_ceil(concurrency)).unwrap_or(u32::MAX);
        longest
            .saturating_mul(rounds)
            .saturating_add(self.queue(own).job_timeout)
            .saturating_add(self.broker.operation_timeout)
    }

    pub fn queue(&self, name: &str) -> QueueConfig {
        self.queues
            .get(name)
            .unwrap_or(&self.queue_defaults)
            .clone()
    }

    /// Checks what the types alone cannot. The first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, reason: String| ConfigError::Invalid {
            origin: self.source.clone(),
            key,
            reason,
        };
        for (i, url) in self.broker.addresses().enumerate() {
            if let Err(err) = url.parse::<lapin::uri::AMQPUri>() {
                let key = match i {
                    0 => "broker.url".to_owned(),
                    _ => format!("broker.failover_urls[{}]", i - 1),
                };
                return Err(invalid(key, format!("is not an AMQP URL: {err}")));
            }
        }
        if self.broker.heartbeat.as_secs() > u64::from(u16::MAX) {
            return Err(invalid(
                "broker.heartbeat".into(),
                "must be under 18h".into(),
            ));
        }
        if self.dispatcher.max_in_flight == 0 {
            return Err(invalid(
                "dispatcher.max_in_flight".into(),
                "must be at least 1".into(),
            ));
        }
        if self.worker.concurrency == 0 {
            return Err(invalid(
                "worker.concurrency".into(),
                "must be at least 1".into(),
            ));
        }
        if self.worker.prefetch() < self.worker.concurrency {
            return Err(invalid(
                "worker.prefetch".into(),
                format!(
                    "must be at least worker.concurrency ({})",
                    self.worker.concurrency
                ),
            ));
        }
        if self.jobs.max_payload_bytes == 0 {
            return Err(invalid(
                "jobs.max_payload_bytes".into(),
                "must be at least 1".into(),
            ));
        }
        self.queue_defaults
            .validate()
            .map_err(|(key, reason)| invalid(format!("queue_defaults.{key}"), reason))?;
        for (name, queue) in &self.queues {
            if let Err(reason) = topology::validate_queue_name(name) {
                return Err(invalid(format!("queues.{name}"), reason.to_string()));
            }
            queue
                .validate()
                .map_err(|(key, reason)| invalid(format!("queues.{name}.{key}"), reason))?;
        }
        Ok(())
    }
}

impl QueueConfig {
    /// Checks one queue's settings; on error returns the key (relative to the queue) and why.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let retry = &self.retry;
        if self.delivery_limit == 0 {
            return Err(("delivery_limit", "must be at least 1".into()));
        }
        if self.job_timeout.is_zero() {
            return Err(("job_timeout", "must be above zero".into()));
        }
        if retry.max_attempts == 0 {
            return Err((
                "retry.max_attempts",
                "must be at least 1 (1 = no retries)".into(),
            ));
        }
        if !(retry.multiplier.is_finite() && retry.multiplier >= 1.0) {
            return Err((
                "retry.multiplier",
                "must be a number of at least 1.0".into(),
            ));
        }
        if !(0.0..=1.0).contains(&retry.jitter) {
            return Err(("retry.jitter", "must be between 0.0 and 1.0".into()));
        }
        if retry.max_delay > delay::MAX_DELAY {
            return Err((
                "retry.max_delay",
                format!(
                    "must not exceed {} (the longest delay the delay queues can hold)",
                    humantime::format_duration(delay::MAX_DELAY)
                ),
            ));
        }
        if retry.initial_delay > retry.max_delay {
            return Err((
                "retry.initial_delay",
                "must not exceed retry.max_delay".into(),
            ));
        }
        Ok(())
    }
}

/// `over` laid on `base`, key by key; nested tables (like `retry`) are merged too.
fn merge(mut base: toml::Table, over: toml::Table) -> toml::Table {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(inner)), toml::Value::Table(value)) => {
                *inner = merge(std::mem::take(inner), value);
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
    base
}

/// Serde glue for durations written as `"30s"`, `"5m"`, `"1h 30m"`.
mod humane {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|err| {
            serde::de::Error::custom(format!("`{text}` is not a duration like \"30s\": {err}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        let config = Config::from_toml("").expect("empty config parses");
        assert_eq!(config.broker.url, BrokerConfig::default().url);
        assert_eq!(config.queue("anything"), QueueConfig::default());
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn the_shipped_config_file_is_valid() {
        let config = Config::from_toml(include_str!("../../config/warren.toml")).expect("parses");
        config.validate().expect("valid");
        assert_eq!(
            config.queue_defaults,
            QueueConfig::default(),
            "it documents the defaults"
        );
        assert_eq!(config.queue("unlisted"), QueueConfig::default());
        assert_eq!(config.queue("demo").retry.max_attempts, 3);
    }

    #[test]
    fn the_shipped_broker_config_refuses_what_warren_would_refuse() {
        let config = Config::from_toml(include_str!("../../config/warren.toml")).expect("parses");
        let broker = include_str!("../../config/rabbitmq.conf");
        let limit = broker
            .lines()
            .find_map(|line| line.strip_prefix("max_message_size = "))
            .and_then(|value| value.trim().parse::<usize>().ok());
        assert_eq!(limit, Some(config.jobs.max_payload_bytes));
    }

    #[test]
    fn queue_sections_and_durations_parse() {
        let config = Config::from_toml(
            r#"
            [queues.emails]
            type = "classic"
            job_timeout = "90s"
            retry = { max_attempts = 3, initial_delay = "2s", multiplier = 3.0, max_delay = "1m", jitter = 0.0 }
            "#,
        )
        .expect("parses");
        let emails = config.queue("emails");
        assert_eq!(emails.queue_type, QueueType::Classic);
        assert_eq!(emails.job_timeout, Duration::from_secs(90));
        assert_eq!(emails.retry.max_attempts, 3);
        assert_eq!(emails.retry.initial_delay, Duration::from_secs(2));
        config.validate().expect("valid");
    }

    #[test]
    fn queue_sections_override_the_defaults_key_by_key() {
        let config = Config::from_toml(
            r#"
            [queue_defaults]
            delivery_limit = 4
            retry = { max_attempts = 7, initial_delay = "3s" }
            [queues.fast.retry]
            initial_delay = "1s"
            "#,
        )
        .expect("parses");
        let fast = config.queue("fast");
        assert_eq!(fast.delivery_limit, 4);
        assert_eq!(
            fast.retry.max_attempts, 7,
            "inherited from queue_defaults.retry"
        );
        assert_eq!(fast.retry.initial_delay, Duration::from_secs(1));
        assert_eq!(
            config.queue("other").retry.initial_delay,
            Duration::from_secs(3)
        );
        let err = Config::from_toml("[queues.q]\ndelivery_limt = 1\n").expect_err("typo");
        assert!(
            err.contains("queues.q") && err.contains("delivery_limt"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[worker]\nconcurency = 4\n").expect_err("typo rejected");
        assert!(err.to_string().contains("concurency"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let config = Config::from_toml("[queues.q.retry]\nmultiplier = 0.5\n").expect("parses");
        let err = config.validate().expect_err("multiplier below 1");
        assert!(
            err.to_string().contains("queues.q.retry.multiplier"),
            "{err}"
        );

        let config = Config::from_toml("[worker]\nshutdown_grace = \"soon\"\n");
        assert!(
            config
                .expect_err("not a duration")
                .to_string()
                .contains("soon")
        );

        let config = Config::from_toml("[queues.\"bad name!\"]\n").expect("parses");
        let err = config.validate().expect_err("bad queue name");
        assert!(err.to_string().contains("queues.bad name!"), "{err}");

        let config = Config::from_toml("[broker]\nurl = \"http://x\"\n").expect("parses");
        let err = config.validate().expect_err("not amqp");
        assert!(err.to_string().contains("broker.url"), "{err}");
    }

    #[test]
    fn risky_settings_are_warned_about() {
        let config = Config::from_toml(
            "[queues.long]\njob_timeout = \"1h\"\n[queues.old]\ntype = \"classic\"\n[queues.ok]\n",
        )
        .expect("parses");
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("queues.long:")
                && warnings[0].contains("3.10")
                && warnings[0].contains("consumer_timeout")
        );
        assert!(warnings[1].contains("queues.old") && warnings[1].contains("at-most-once"));
    }

    #[test]
    fn the_consumer_timeout_leaves_room_for_waiting_running_and_settling() {
        let config = Config::from_toml(
            "[broker]\noperation_timeout = \"30s\"\n[worker]\nconcurrency = 4\nprefetch = 6\n\
             [queues.slow]\njob_timeout = \"10m\"\n[queues.fast]\njob_timeout = \"1m\"\n",
        )
        .expect("parses");
        let minutes = |m: u64| Duration::from_secs(m * 60);
        // Alone: 6 buffered deliveries need 2 rounds of 4 slots, then its own run, then 30 s.
        assert_eq!(
            config.consumer_timeout(&["fast"]),
            minutes(2) + minutes(1) + Duration::from_secs(30)
        );
        // Beside `slow`: 12 deliveries ahead at most, 3 rounds of the longest job_timeout.
        assert_eq!(
            config.consumer_timeout(&["fast", "slow"]),
            minutes(30) + minutes(1) + Duration::from_secs(30)
        );
        // Warren's own job_timeout always comes first.
        let defaults = Config::default();
        assert!(defaults.consumer_timeout(&["q"]) > defaults.queue("q").job_timeout);
        assert!(defaults.consumer_timeout(&["q"]) < BROKER_CONSUMER_TIMEOUT);
    }

    #[test]
    fn a_delay_past_the_delay_queues_is_rejected() {
        let config = Config::from_toml("[queues.q.retry]\nmax_delay = \"100days\"\n").expect("ok");
        let err = config.validate().expect_err("too long");
        assert!(err.to_string().contains("retry.max_delay"), "{err}");
    }
}
