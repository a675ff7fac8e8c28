//! Configuration: one `warren.toml` read by the dispatcher and the workers alike.
//!
//! Every section and field has a default, so an empty file (or no file) is a working local
//! setup. Unknown keys are rejected, and [`Config::validate`] checks values that TOML cannot:
//! an error always names the file and the key. Durations are written the humane way (`"30s"`,
//! `"5m"`, `"1h 30m"`).
//!
//! Where a file comes from is decided by [`Config::load`]; environment variables override the
//! broker's address and TLS files ([`ENV_OVERRIDES`]) so that containers and tests can point at
//! another broker without a file. An error about an overridden key names the variable, not the
//! file. Broker URLs are shown with their password masked ([`crate::secret`]), in errors too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{delay, topology};

/// Environment variable that overrides `broker.url`: one URL (a `,` in it is part of it).
pub const AMQP_URL_ENV: &str = "WARREN_AMQP_URL";
/// Environment variable that overrides `broker.failover_urls`: URLs separated by whitespace,
/// which cannot appear in a URL (a `,` can, in a password).
pub const FAILOVER_URLS_ENV: &str = "WARREN_AMQP_FAILOVER_URLS";
/// Environment variables that override `[broker.tls]` keys.
pub const TLS_CA_FILE_ENV: &str = "WARREN_TLS_CA_FILE";
pub const TLS_CERT_FILE_ENV: &str = "WARREN_TLS_CERT_FILE";
pub const TLS_KEY_FILE_ENV: &str = "WARREN_TLS_KEY_FILE";
pub const TLS_SERVER_NAME_ENV: &str = "WARREN_TLS_SERVER_NAME";
/// Environment variable that overrides `management.url` (the management HTTP API, for
/// `warren status` and `warren doctor`).
pub const MANAGEMENT_URL_ENV: &str = "WARREN_MANAGEMENT_URL";
/// Environment variable that overrides `worker.http` (the worker's `/healthz`, `/readyz` and
/// `/metrics` listener, e.g. `0.0.0.0:9090`).
pub const WORKER_HTTP_ENV: &str = "WARREN_WORKER_HTTP";
/// Environment variables that override `[http]` keys (`warren serve`).
pub const HTTP_LISTEN_ENV: &str = "WARREN_HTTP_LISTEN";
pub const HTTP_TLS_CERT_FILE_ENV: &str = "WARREN_HTTP_TLS_CERT_FILE";
pub const HTTP_TLS_KEY_FILE_ENV: &str = "WARREN_HTTP_TLS_KEY_FILE";
/// Environment variable that adds one `admin` token to `http.tokens` (named `env`), for
/// containers and quick starts.
pub const HTTP_TOKEN_ENV: &str = "WARREN_HTTP_TOKEN";
/// Every environment override: (variable, the key it replaces). An empty variable counts as
/// unset.
pub const ENV_OVERRIDES: [(&str, &str); 12] = [
    (AMQP_URL_ENV, "broker.url"),
    (FAILOVER_URLS_ENV, "broker.failover_urls"),
    (TLS_CA_FILE_ENV, "broker.tls.ca_file"),
    (TLS_CERT_FILE_ENV, "broker.tls.cert_file"),
    (TLS_KEY_FILE_ENV, "broker.tls.key_file"),
    (TLS_SERVER_NAME_ENV, "broker.tls.server_name"),
    (MANAGEMENT_URL_ENV, "management.url"),
    (HTTP_LISTEN_ENV, "http.listen"),
    (HTTP_TLS_CERT_FILE_ENV, "http.tls_cert_file"),
    (HTTP_TLS_KEY_FILE_ENV, "http.tls_key_file"),
    (HTTP_TOKEN_ENV, "http.tokens"),
    (WORKER_HTTP_ENV, "worker.http"),
];
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
    /// `[management]`: the management HTTP API (`warren status`, `warren doctor`).
    pub management: ManagementConfig,
    /// `[http]`: the HTTP API (`warren serve`).
    pub http: HttpConfig,
    /// `[queue_defaults]`: the settings of every queue, unless its own section says otherwise.
    pub queue_defaults: QueueConfig,
    /// `[queues.NAME]`: per-queue settings, already merged over `queue_defaults`. A queue that
    /// is not listed uses `queue_defaults`.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Where this configuration was read from, for error messages.
    pub source: ConfigSource,
    /// Keys set by an environment variable ([`ENV_OVERRIDES`]), with the variable's name: an
    /// error about such a key names the variable as its origin.
    pub env_overrides: BTreeMap<&'static str, &'static str>,
    /// The keys the file sets (dotted: `worker.concurrency`, `queues.emails.retry.jitter`), for
    /// `warren config show` ([`crate::settings`]).
    pub file_keys: BTreeSet<String>,
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
    management: ManagementConfig,
    http: HttpConfig,
    queue_defaults: toml::Table,
    queues: BTreeMap<String, toml::Table>,
}

/// Where a [`Config`] came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ConfigSource {
    #[default]
    Defaults,
    File(PathBuf),
    /// An environment variable (e.g. `WARREN_AMQP_URL`), for the key it overrides.
    Env(&'static str),
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::Defaults => f.write_str("(built-in defaults)"),
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Env(var) => write!(f, "${var}"),
        }
    }
}

/// `[broker]`: how to reach RabbitMQ.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL, vhost percent-encoded (`%2f` is `/`): `amqp://` (plaintext) or `amqps://`
    /// (TLS). It holds the password: show it only through [`crate::secret::mask_url`].
    pub url: String,
    /// More nodes of the same cluster: connecting tries `url` and then these in turn, and a
    /// lost connection fails over to the next one. Same scheme as `url`.
    pub failover_urls: Vec<String>,
    /// `[broker.tls]`: certificates for `amqps://` URLs (only allowed with them).
    pub tls: TlsConfig,
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

/// `[broker.tls]`: TLS to the broker (`amqps://` URLs). Every key is optional: without
/// `ca_file` the system's trust store is used.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that signed the broker's certificate; when set, only these are
    /// trusted.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain), presented to the broker; with it the login is SASL
    /// EXTERNAL (the user named by the certificate) unless the URL sets `?auth_mechanism=`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry, when it is not the URL's host (e.g.
    /// connecting to an IP address or through a tunnel).
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// Whether any key is set.
    pub fn is_set(&self) -> bool {
        *self != TlsConfig::default()
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            failover_urls: Vec::new(),
            tls: TlsConfig::default(),
            heartbeat: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            operation_timeout: Duration::from_secs(30),
            blocked_timeout: Duration::from_secs(30),
        }
    }
}

/// `[management]`: RabbitMQ's management HTTP API, which `warren status` and `warren doctor`
/// read (queue statistics, the broker's version, feature flags, plugins, settings, users'
/// permissions). Every key is optional: by default the API is at broker.url's host, port 15672,
/// `http://`, with broker.url's user and password. The password is never shown.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ManagementConfig {
    /// `http://` or `https://` address of the management API (the UI's address), which may
    /// carry `user:password@`. `$WARREN_MANAGEMENT_URL` overrides it.
    pub url: Option<String>,
    /// The API's user, instead of the URL's (or broker.url's).
    pub user: Option<String>,
    /// The API's password, instead of the URL's (or broker.url's).
    pub password: Option<String>,
}

impl std::fmt::Debug for ManagementConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementConfig")
            .field("url", &self.url.as_deref().map(crate::secret::mask_url))
            .field("user", &self.user)
            .field(
                "password",
                &self.password.as_ref().map(|_| crate::secret::MASK),
            )
            .finish()
    }
}

/// Where the management API is and how to log in: [`Config::management_endpoint`].
#[derive(Clone, PartialEq, Eq)]
pub struct ManagementEndpoint {
    /// The API's base address without credentials (`http://127.0.0.1:15672/`): safe to show.
    pub url: String,
    pub user: String,
    /// Never shown: see the `Debug` implementation.
    pub password: String,
    /// True when the address was derived from broker.url (no `management.url` given).
    pub derived: bool,
}

impl std::fmt::Debug for ManagementEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagementEndpoint")
            .field("url", &self.url)
            .field("user", &self.user)
            .field("password", &crate::secret::MASK)
            .field("derived", &self.derived)
            .finish()
    }
}

/// The management API's port when `management.url` is not given (RabbitMQ's default).
pub const DEFAULT_MANAGEMENT_PORT: u16 = 15672;

/// `[http]`: the HTTP API that `warren serve` runs (crate `warren-service`). Every key is
/// optional; without a token no request gets past authentication.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// The address to listen on (`127.0.0.1:8080`, `[::]:8080`); `warren serve --listen`
    /// overrides it. `$WARREN_HTTP_LISTEN` too.
    pub listen: Option<String>,
    /// The bearer tokens that may call the API, each with a scope. `$WARREN_HTTP_TOKEN` adds
    /// one `admin` token named `env`. Never shown (see `Debug` of [`HttpToken`]).
    pub tokens: Vec<HttpToken>,
    /// The largest request body, in bytes; default `jobs.max_payload_bytes` plus 64 KiB for
    /// the rest of the request. At least `jobs.max_payload_bytes`.
    pub body_limit: Option<usize>,
    /// Requests per second each token may make (a token bucket); 0 (the default): no limit.
    /// Over it, 429 with `Retry-After`.
    pub rate_limit: u32,
    /// How many requests a token may make at once above `rate_limit` (the bucket's size);
    /// 0 (the default): the same as `rate_limit`.
    pub rate_burst: u32,
    /// PEM certificate (chain) for HTTPS; with `tls_key_file`. Without both: plain HTTP
    /// (terminate TLS in front). `$WARREN_HTTP_TLS_CERT_FILE`.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file` (PKCS#8, PKCS#1 or SEC1). `$WARREN_HTTP_TLS_KEY_FILE`.
    pub tls_key_file: Option<PathBuf>,
}

/// A token shorter than this is accepted with a warning ([`Config::warnings`]).
pub const HTTP_TOKEN_MIN_LEN: usize = 16;

/// Room for the rest of a request around the largest payload: [`HttpConfig::body_limit`]'s
/// default is `jobs.max_payload_bytes` plus this.
pub const HTTP_ENVELOPE_BYTES: usize = 64 * 1024;

impl HttpConfig {
    /// The largest request body for payloads of at most `max_payload` bytes.
    pub fn body_limit(&self, max_payload: usize) -> usize {
        self.body_limit
            .unwrap_or_else(|| max_payload.saturating_add(HTTP_ENVELOPE_BYTES))
    }

    /// On error, the key (within `[http]`) and why.
    fn validate(&self, max_payload: usize) -> Result<(), (String, String)> {
        if let Some(listen) = &self.listen
            && listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err((
                "listen".into(),
                format!("`{listen}` is not an address like 127.0.0.1:8080 or [::]:8080"),
            ));
        }
        for (i, token) in self.tokens.iter().enumerate() {
            if token.token.is_empty() {
                return Err((
                    format!("tokens[{i}].token"),
                    "is empty (make one with `openssl rand -hex 32`)".into(),
                ));
            }
            if !token.token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    format!("tokens[{i}].token"),
                    "must be visible ASCII characters only (no spaces)".into(),
                ));
            }
        }
        if let Some(limit) = self.body_limit
            && limit < max_payload
        {
            return Err((
                "body_limit".into(),
                format!("must be at least jobs.max_payload_bytes ({max_payload})"),
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err((
                "tls_cert_file".into(),
                "and http.tls_key_file go together: set both, or neither".into(),
            ));
        }
        Ok(())
    }
}

/// One bearer token of `[[http.tokens]]`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpToken {
    /// What the access log calls the token's requests (never the token): default `token-N`,
    /// its place in the list.
    #[serde(default)]
    pub name: Option<String>,
    /// The secret a client sends as `Authorization: Bearer <token>`.
    pub token: String,
    /// What the token may do.
    pub scope: HttpScope,
}

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpToken")
            .field("name", &self.name)
            .field("token", &crate::secret::MASK)
            .field("scope", &self.scope)
            .finish()
    }
}

/// What a token may do; each scope includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpScope {
    /// See queues, dead letters and outcomes (every `GET`).
    Read,
    /// Also submit jobs.
    Submit,
    /// Also replay and purge dead letters.
    Admin,
}

impl HttpScope {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpScope::Read => "read",
            HttpScope::Submit => "submit",
            HttpScope::Admin => "admin",
        }
    }
}

/// `[jobs]`: limits that apply to every job.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Address (`HOST:PORT`) of the worker's HTTP listener for `/healthz`, `/readyz` and
    /// `/metrics`; none unless set (`warren-worker --http`, `$WARREN_WORKER_HTTP`).
    pub http: Option<String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 16,
            prefetch: None,
            shutdown_grace: Duration::from_secs(30),
            http: None,
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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
    /// The highest job priority the queue takes (`warren submit --priority N`, 0 to N); `None`
    /// (the default): it takes none, and a job with a priority is refused before it is
    /// published. A classic queue is declared with `x-max-priority = N` (RabbitMQ's priority
    /// queue); a quorum queue needs no argument but RabbitMQ 4.0 or later, and has two levels
    /// there: 0–4 normal, 5 and above high ([`topology::priority_support`]).
    pub max_priority: Option<u8>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            queue_type: QueueType::Quorum,
            delivery_limit: 10,
            job_timeout: Duration::from_secs(5 * 60),
            retry: RetryConfig::default(),
            max_priority: None,
        }
    }
}

/// The RabbitMQ queue type of a work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
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

/// Why a job's priority does not fit its queue ([`QueueConfig::check_priority`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriorityError {
    #[error(
        "the queue takes no priorities (set `max_priority` in its [queues.NAME] section of \
         warren.toml, then `warren topology apply`)"
    )]
    NotTaken,
    #[error("priority {priority} is above the queue's max_priority of {max}")]
    AboveMax { priority: u8, max: u8 },
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
        config.apply_env(|var| std::env::var(var).ok());
        config.validate()?;
        Ok(config)
    }

    /// Applies the environment overrides ([`ENV_OVERRIDES`]) read through `var`; an empty or
    /// all-blank value counts as unset.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut set = |key: &'static str, name: &'static str| {
            self.env_overrides.insert(key, name);
        };
        if let Some(url) = var(AMQP_URL_ENV) {
            self.broker.url = url.trim().to_owned();
            set("broker.url", AMQP_URL_ENV);
        }
        if let Some(urls) = var(FAILOVER_URLS_ENV) {
            self.broker.failover_urls = urls.split_whitespace().map(str::to_owned).collect();
            set("broker.failover_urls", FAILOVER_URLS_ENV);
        }
        let tls = &mut self.broker.tls;
        if let Some(path) = var(TLS_CA_FILE_ENV) {
            tls.ca_file = Some(PathBuf::from(path));
            set("broker.tls.ca_file", TLS_CA_FILE_ENV);
        }
        if let Some(path) = var(TLS_CERT_FILE_ENV) {
            tls.cert_file = Some(PathBuf::from(path));
            set("broker.tls.cert_file", TLS_CERT_FILE_ENV);
        }
        if let Some(path) = var(TLS_KEY_FILE_ENV) {
            tls.key_file = Some(PathBuf::from(path));
            set("broker.tls.key_file", TLS_KEY_FILE_ENV);
        }
        if let Some(name) = var(TLS_SERVER_NAME_ENV) {
            tls.server_name = Some(name.trim().to_owned());
            set("broker.tls.server_name", TLS_SERVER_NAME_ENV);
        }
        if let Some(url) = var(MANAGEMENT_URL_ENV) {
            self.management.url = Some(url.trim().to_owned());
            set("management.url", MANAGEMENT_URL_ENV);
        }
        if let Some(address) = var(WORKER_HTTP_ENV) {
            self.worker.http = Some(address.trim().to_owned());
            set("worker.http", WORKER_HTTP_ENV);
        }
        if let Some(listen) = var(HTTP_LISTEN_ENV) {
            self.http.listen = Some(listen.trim().to_owned());
            set("http.listen", HTTP_LISTEN_ENV);
        }
        if let Some(path) = var(HTTP_TLS_CERT_FILE_ENV) {
            self.http.tls_cert_file = Some(PathBuf::from(path));
            set("http.tls_cert_file", HTTP_TLS_CERT_FILE_ENV);
        }
        if let Some(path) = var(HTTP_TLS_KEY_FILE_ENV) {
            self.http.tls_key_file = Some(PathBuf::from(path));
            set("http.tls_key_file", HTTP_TLS_KEY_FILE_ENV);
        }
        if let Some(token) = var(HTTP_TOKEN_ENV) {
            self.http
                .tokens
                .retain(|t| t.name.as_deref() != Some("env"));
            self.http.tokens.push(HttpToken {
                name: Some("env".to_owned()),
                token: token.trim().to_owned(),
                scope: HttpScope::Admin,
            });
            set("http.tokens", HTTP_TOKEN_ENV);
        }
    }

    /// Where the value of `key` came from: the environment variable that set it, or the
    /// config's source.
    pub fn origin_of(&self, key: &str) -> ConfigSource {
        self.env_overrides
            .iter()
            .find(|(k, _)| key == **k || key.starts_with(&format!("{k}[")))
            .map_or_else(|| self.source.clone(), |(_, var)| ConfigSource::Env(var))
    }

    /// Reads and parses one file, without validating it.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // A TOML error quotes the offending line, which may hold a broker URL and its password.
        let mut config = Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message: crate::secret::mask_urls_in(&message),
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
            management: file.management,
            http: file.http,
            queue_defaults,
            queues,
            source: ConfigSource::Defaults,
            env_overrides: BTreeMap::new(),
            file_keys: crate::settings::keys_of(text),
        })
    }

    /// Settings that are valid but probably not what the operator wants, one sentence each.
    /// The binaries log them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (i, token) in self.http.tokens.iter().enumerate() {
            if token.token.len() < HTTP_TOKEN_MIN_LEN {
                warnings.push(format!(
                    "{}: http.tokens[{i}] ({}) is shorter than {HTTP_TOKEN_MIN_LEN} characters, \
                     easy to guess; make one with `openssl rand -hex 32`",
                    self.origin_of(&format!("http.tokens[{i}]")),
                    token.name.as_deref().unwrap_or("unnamed")
                ));
            }
        }
        let tls = self.broker.url.starts_with("amqps://");
        if tls && self.management.url.is_none() {
            warnings.push(format!(
                "{}: broker.url is amqps:// but no management.url is set: `warren status` and \
                 `warren doctor` would send broker.url's password to http://<host>:15672 in \
                 plaintext; set management.url (or ${MANAGEMENT_URL_ENV}) to the API's https:// \
                 address",
                self.source
            ));
        }
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
            origin: self.origin_of(&key),
            key,
            reason,
        };
        self.validate_broker_addresses()
            .map_err(|(key, reason)| invalid(key, reason))?;
        self.management_endpoint()
            .map_err(|reason| invalid("management.url".into(), reason))?;
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
        self.http
            .validate(self.jobs.max_payload_bytes)
            .map_err(|(key, reason)| invalid(format!("http.{key}"), reason))?;
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

impl Config {
    /// The addresses and `[broker.tls]`: each URL parses (its password masked in the error),
    /// its scheme is one Warren honours, all share one scheme (a failover never drops TLS), and
    /// `[broker.tls]` comes only with `amqps://`. On error, the key and why.
    fn validate_broker_addresses(&self) -> Result<(), (String, String)> {
        let mut schemes = Vec::new();
        for (i, url) in self.broker.addresses().enumerate() {
            let key = match i {
                0 => "broker.url".to_owned(),
                _ => format!("broker.failover_urls[{}]", i - 1),
            };
            let shown = crate::secret::mask_url(url);
            let scheme = url.split_once("://").map(|(scheme, _)| scheme);
            match scheme {
                Some("amqp" | "amqps") => {}
                Some(other) => {
                    let other = crate::secret::mask_url(other);
                    return Err((
                        key,
                        format!(
                            "has the scheme `{other}:` ({shown}): Warren speaks amqp:// (plaintext) \
                             and amqps:// (TLS) only"
                        ),
                    ));
                }
                None => {
                    return Err((
                        key,
                        format!(
                            "is not an AMQP URL ({shown}): it must start with amqp:// or amqps://"
                        ),
                    ));
                }
            }
            let joined = url
                .split_once("://")
                .is_some_and(|(_, rest)| rest.contains("://"));
            if joined {
                let mut reason =
                    format!("holds more than one URL ({shown}): give one URL per address");
                if i == 0 && self.env_overrides.contains_key("broker.url") {
                    reason.push_str(&format!(
                        "; ${AMQP_URL_ENV} holds one URL: list the other nodes in \
                         ${FAILOVER_URLS_ENV}, separated by spaces"
                    ));
                }
                return Err((key, reason));
            }
            if let Err(err) = url.parse::<lapin::uri::AMQPUri>() {
                return Err((
                    key,
                    format!(
                        "is not a valid AMQP URL ({shown}): {}; percent-encode special \
                         characters in the user name and password (e.g. `@` as %40, `/` as %2F)",
                        crate::secret::mask_in(&err, url)
                    ),
                ));
            }
            schemes.push((key, scheme == Some("amqps")));
        }
        let tls = schemes.first().is_some_and(|(_, tls)| *tls);
        if let Some((key, _)) = schemes.iter().find(|(_, t)| *t != tls) {
            return Err((
                key.clone(),
                format!(
                    "is {} while broker.url is {}: every address must use the same scheme, so \
                     that failing over never drops TLS",
                    if tls { "amqp://" } else { "amqps://" },
                    if tls { "amqps://" } else { "amqp://" },
                ),
            ));
        }
        if !tls && self.broker.tls.is_set() {
            let key = ["ca_file", "cert_file", "key_file", "server_name"]
                .into_iter()
                .map(|k| format!("broker.tls.{k}"))
                .find(|k| self.env_overrides.contains_key(k.as_str()))
                .unwrap_or_else(|| "broker.tls".to_owned());
            return Err((
                key,
                "is set but broker.url is amqp:// (plaintext): use an amqps:// URL to the \
                 broker's TLS listener; Warren never connects in plaintext when TLS is configured"
                    .to_owned(),
            ));
        }
        let tls_files = &self.broker.tls;
        if tls_files.cert_file.is_some() != tls_files.key_file.is_some() {
            let missing = if tls_files.cert_file.is_some() {
                "key_file"
            } else {
                "cert_file"
            };
            return Err((
                format!("broker.tls.{missing}"),
                "is missing: cert_file and key_file go together".to_owned(),
            ));
        }
        if let Some(name) = &tls_files.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            return Err((
                "broker.tls.server_name".to_owned(),
                format!("`{name}` is not a DNS name or IP address"),
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Where the management HTTP API is, and its credentials: `management.url` (its
    /// `user:password@`, percent-decoded, else broker.url's) with `management.user` /
    /// `management.password` over them; without `management.url`, broker.url's host on port
    /// 15672 over `http://`, with broker.url's credentials. On error, why (any URL quoted with its password masked).
    pub fn management_endpoint(&self) -> Result<ManagementEndpoint, String> {
        let (url, user, password, derived) = match &self.management.url {
            Some(url) => {
                let shown = crate::secret::mask_url(url);
                let (scheme, rest) = match url.split_once("://") {
                    Some((scheme @ ("http" | "https"), rest)) => (scheme, rest),
                    _ => {
                        return Err(format!(
                            "is not an http:// or https:// URL ({shown}): the management API's \
                             address, e.g. http://127.0.0.1:15672/"
                        ));
                    }
                };
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                let (authority, path) = rest.split_at(end);
                let (userinfo, host) = match authority.rfind('@') {
                    Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
                    None => (None, authority),
                };
                if host.is_empty() || url.chars().any(char::is_whitespace) {
                    return Err(format!("is not a valid URL ({shown}): it needs a host"));
                }
                let (user, password) = match userinfo {
                    Some(info) => match info.split_once(':') {
                        Some((user, password)) => (percent_decode(user), percent_decode(password)),
                        None => (percent_decode(info), String::new()),
                    },
                    None => self.broker_credentials(),
                };
                let path = if path.is_empty() { "/" } else { path };
                (format!("{scheme}://{host}{path}"), user, password, false)
            }
            None => {
                let uri: lapin::uri::AMQPUri = self
                    .broker
                    .url
                    .parse()
                    .map_err(|_| "cannot be derived: broker.url does not parse".to_owned())?;
                let host = &uri.authority.host;
                let host = match host.contains(':') {
                    true => format!("[{host}]"),
                    false => host.clone(),
                };
                let userinfo = uri.authority.userinfo;
                (
                    format!("http://{host}:{DEFAULT_MANAGEMENT_PORT}/"),
                    userinfo.username,
                    userinfo.password,
                    true,
                )
            }
        };
        Ok(ManagementEndpoint {
            url,
            user: self.management.user.clone().unwrap_or(user),
            password: self.management.password.clone().unwrap_or(password),
            derived,
        })
    }
}

impl Config {
    /// broker.url's user and password (empty when it does not parse).
    fn broker_credentials(&self) -> (String, String) {
        match self.broker.url.parse::<lapin::uri::AMQPUri>() {
            Ok(uri) => (
                uri.authority.userinfo.username,
                uri.authority.userinfo.password,
            ),
            Err(_) => (String::new(), String::new()),
        }
    }
}

/// `%XX` escapes decoded (a user name or password in a URL); invalid escapes are kept as they
/// are.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

impl QueueConfig {
    /// Checks one queue's settings; on error returns the key (relative to the queue) and why.
    /// Whether a job with `priority` may go to this queue: a queue without `max_priority`
    /// takes none, and a priority above it is refused (not silently capped).
    pub fn check_priority(&self, priority: u8) -> Result<(), PriorityError> {
        match self.max_priority {
            None => Err(PriorityError::NotTaken),
            Some(max) if priority > max => Err(PriorityError::AboveMax { priority, max }),
            Some(_) => Ok(()),
        }
    }

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
        if self.max_priority == Some(0) {
            return Err((
                "max_priority",
                "must be 1 to 255 (leave it out for a queue without priorities)".into(),
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

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

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

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_worker_http_address_comes_from_the_file_or_the_environment() {
        assert_eq!(Config::default().worker.http, None, "off unless given");
        let mut config = Config::from_toml("[worker]\nhttp = \"0.0.0.0:9090\"\n").expect("valid");
        assert_eq!(config.worker.http.as_deref(), Some("0.0.0.0:9090"));
        config.apply_env(env(&[(WORKER_HTTP_ENV, " 127.0.0.1:9191 ")]));
        assert_eq!(config.worker.http.as_deref(), Some("127.0.0.1:9191"));
        assert_eq!(
            config.origin_of("worker.http"),
            ConfigSource::Env(WORKER_HTTP_ENV)
        );
    }

    #[test]
    fn the_url_from_the_environment_is_one_url_even_with_a_comma() {
        let mut config = Config::default();
        config.apply_env(env(&[(
            AMQP_URL_ENV,
            "amqp://guest:s3cr3t,tail@127.0.0.1:5672/%2f",
        )]));
        assert_eq!(
            config.broker.url,
            "amqp://guest:s3cr3t,tail@127.0.0.1:5672/%2f"
        );
        assert!(config.broker.failover_urls.is_empty());
        config.validate().expect("a comma is fine in a password");
        assert_eq!(
            config.origin_of("broker.url"),
            ConfigSource::Env(AMQP_URL_ENV)
        );
        assert_eq!(
            config.origin_of("worker.concurrency"),
            ConfigSource::Defaults
        );
    }

    #[test]
    fn failover_urls_from_the_environment_are_split_on_whitespace() {
        let mut config = Config::default();
        config.apply_env(env(&[(
            FAILOVER_URLS_ENV,
            " amqp://a:p,w@h1/%2f\n\tamqp://a:p,w@h2/%2f ",
        )]));
        assert_eq!(
            config.broker.failover_urls,
            ["amqp://a:p,w@h1/%2f", "amqp://a:p,w@h2/%2f"]
        );
        config.validate().expect("valid");
    }

    #[test]
    fn a_bad_url_from_the_environment_names_the_variable_and_hides_the_password() {
        let mut config = Config::default();
        config.apply_env(env(&[(
            AMQP_URL_ENV,
            "amqp://guest:s3cr3t@127.0.0.1:5672/%2f,amqp://guest:s3cr3t@127.0.0.1:99999/%2f",
        )]));
        let err = config.validate().expect_err("two URLs").to_string();
        assert!(
            err.starts_with("invalid config $WARREN_AMQP_URL: `broker.url`"),
            "{err}"
        );
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(err.contains("WARREN_AMQP_FAILOVER_URLS"), "{err}");

        let mut config = Config::default();
        config.apply_env(env(&[(AMQP_URL_ENV, "guest:hunter2@127.0.0.1")]));
        let err = config.validate().expect_err("no scheme").to_string();
        assert!(!err.contains("hunter2"), "{err}");

        let mut config = Config::default();
        config.apply_env(env(&[(
            AMQP_URL_ENV,
            "amqp://guest:hunter2@127.0.0.1:99999/%2f",
        )]));
        let err = config
            .validate()
            .expect_err("port out of range")
            .to_string();
        assert!(
            !err.contains("hunter2") && err.contains("guest:***@"),
            "{err}"
        );
    }

    #[test]
    fn schemes_warren_cannot_honour_are_errors() {
        for (url, expected) in [
            ("http://guest:pw@h/", "Warren speaks amqp://"),
            ("amqp+ssl://guest:pw@h/", "Warren speaks amqp://"),
            ("rabbit.example.com", "must start with amqp:// or amqps://"),
        ] {
            let config =
                Config::from_toml(&format!("[broker]\nurl = \"{url}\"\n")).expect("parses");
            let err = config.validate().expect_err(url).to_string();
            assert!(
                err.contains("broker.url") && err.contains(expected),
                "{err}"
            );
            assert!(!err.contains(":pw@"), "{err}");
        }
    }

    #[test]
    fn tls_settings_need_amqps_everywhere() {
        let config = Config::from_toml(
            "[broker]\nurl = \"amqp://guest:guest@h/%2f\"\n[broker.tls]\nca_file = \"ca.pem\"\n",
        )
        .expect("parses");
        let err = config.validate().expect_err("tls with amqp").to_string();
        assert!(
            err.contains("`broker.tls` is set but broker.url is amqp://"),
            "{err}"
        );

        let mut config = Config::default();
        config.apply_env(env(&[(TLS_CA_FILE_ENV, "/etc/ca.pem")]));
        let err = config.validate().expect_err("tls with amqp").to_string();
        assert!(
            err.starts_with("invalid config $WARREN_TLS_CA_FILE: `broker.tls.ca_file`"),
            "{err}"
        );

        let config = Config::from_toml(
            "[broker]\nurl = \"amqps://guest:guest@h1/%2f\"\nfailover_urls = [\"amqp://guest:guest@h2/%2f\"]\n",
        )
        .expect("parses");
        let err = config.validate().expect_err("mixed").to_string();
        assert!(
            err.contains("broker.failover_urls[0]") && err.contains("drops TLS"),
            "{err}"
        );

        let config = Config::from_toml(
            "[broker]\nurl = \"amqps://h/%2f\"\n[broker.tls]\ncert_file = \"c.pem\"\n",
        )
        .expect("parses");
        let err = config.validate().expect_err("no key").to_string();
        assert!(err.contains("broker.tls.key_file"), "{err}");

        let config = Config::from_toml(
            "[broker]\nurl = \"amqps://h/%2f\"\n[broker.tls]\nca_file = \"ca.pem\"\nserver_name = \"rabbit.internal\"\n",
        )
        .expect("parses");
        config.validate().expect("amqps with tls");
    }

    #[test]
    fn priorities_are_taken_only_where_configured() {
        let config = Config::from_toml(
            "[queues.urgent]\nmax_priority = 9\n[queues.zero]\nmax_priority = 0\n",
        )
        .expect("parses");
        assert_eq!(config.queue("urgent").check_priority(9), Ok(()));
        assert_eq!(
            config.queue("urgent").check_priority(10),
            Err(PriorityError::AboveMax {
                priority: 10,
                max: 9
            })
        );
        assert_eq!(
            config.queue("plain").check_priority(1),
            Err(PriorityError::NotTaken)
        );
        let err = config.validate().expect_err("0 is no maximum").to_string();
        assert!(err.contains("queues.zero.max_priority"), "{err}");
    }

    #[test]
    fn the_management_api_defaults_to_the_brokers_host_and_credentials() {
        let mut config = Config::default();
        config.broker.url = "amqp://warren:p%40ss@rabbit.internal:5672/prod".into();
        let endpoint = config.management_endpoint().expect("derived");
        assert_eq!(endpoint.url, "http://rabbit.internal:15672/");
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.as_str()),
            ("warren", "p@ss")
        );
        assert!(endpoint.derived);
        assert!(!format!("{endpoint:?}").contains("p@ss"));

        config.apply_env(env(&[(
            MANAGEMENT_URL_ENV,
            "https://ops:s3%2Fcr3t@mgmt.example.com:443/rabbit/",
        )]));
        let endpoint = config.management_endpoint().expect("from the environment");
        assert_eq!(endpoint.url, "https://mgmt.example.com:443/rabbit/");
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.as_str()),
            ("ops", "s3/cr3t")
        );
        assert_eq!(
            config.origin_of("management.url"),
            ConfigSource::Env(MANAGEMENT_URL_ENV)
        );
        assert!(!format!("{config:?}").contains("s3%2Fcr3t"));

        let config = Config::from_toml(
            "[management]\nurl = \"http://127.0.0.1:25672\"\nuser = \"admin\"\npassword = \"pw\"\n",
        )
        .expect("parses");
        let endpoint = config.management_endpoint().expect("keys over the URL");
        assert_eq!(endpoint.url, "http://127.0.0.1:25672/");
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.as_str()),
            ("admin", "pw")
        );

        let mut config = Config::default();
        config.apply_env(env(&[(MANAGEMENT_URL_ENV, "ftp://u:hunter2@h/")]));
        let err = config.validate().expect_err("not http").to_string();
        assert!(err.contains("ftp://u:***@h/"), "{err}");
        assert!(
            err.contains("$WARREN_MANAGEMENT_URL") && err.contains("management.url"),
            "{err}"
        );
        assert!(!err.contains("hunter2"), "{err}");

        let mut config = Config::default();
        config.apply_env(env(&[(MANAGEMENT_URL_ENV, "http://127.0.0.1:25672")]));
        let endpoint = config
            .management_endpoint()
            .expect("no credentials in the URL");
        assert_eq!(
            (endpoint.user.as_str(), endpoint.password.as_str()),
            ("guest", "guest")
        );
    }

    #[test]
    fn a_delay_past_the_delay_queues_is_rejected() {
        let config = Config::from_toml("[queues.q.retry]\nmax_delay = \"100days\"\n").expect("ok");
        let err = config.validate().expect_err("too long");
        assert!(err.to_string().contains("retry.max_delay"), "{err}");
    }

    #[test]
    fn the_http_section_is_checked_and_named() {
        let config = Config::from_toml(
            "[http]\nlisten = \"127.0.0.1:8080\"\nrate_limit = 5\n[[http.tokens]]\n\
             token = \"0123456789abcdef\"\nscope = \"submit\"\n",
        )
        .expect("parses");
        config.validate().expect("valid");
        assert_eq!(config.http.tokens[0].scope, HttpScope::Submit);
        assert_eq!(config.http.body_limit(1000), 1000 + HTTP_ENVELOPE_BYTES);
        let scope = Config::from_toml("[[http.tokens]]\ntoken = \"x\"\nscope = \"root\"\n")
            .expect_err("no such scope");
        assert!(scope.contains("root"), "{scope}");
        for (text, key) in [
            ("[http]\nlisten = \"localhost\"\n", "http.listen"),
            ("[http]\nbody_limit = 10\n", "http.body_limit"),
            ("[http]\ntls_cert_file = \"a.pem\"\n", "http.tls_cert_file"),
            (
                "[[http.tokens]]\ntoken = \"two words\"\nscope = \"read\"\n",
                "http.tokens[0].token",
            ),
        ] {
            let err = Config::from_toml(text)
                .expect("parses")
                .validate()
                .expect_err(text);
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        // $WARREN_HTTP_TOKEN adds one admin token and is named as the origin of its errors.
        let mut config = Config::default();
        config.apply_env(|var| (var == HTTP_TOKEN_ENV).then(|| "short".to_owned()));
        assert_eq!(config.http.tokens[0].scope, HttpScope::Admin);
        config.validate().expect("short, but a token");
        let warnings = config.warnings().join("\n");
        assert!(warnings.contains("$WARREN_HTTP_TOKEN"), "{warnings}");
        assert!(warnings.contains("shorter than 16"), "{warnings}");
        assert!(
            !format!("{config:?}").contains("short\""),
            "the token in Debug"
        );
    }
}
