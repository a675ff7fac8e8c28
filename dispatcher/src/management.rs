//! A client of RabbitMQ's management HTTP API, for what AMQP does not tell: queue statistics
//! (unacked counts, rates), the broker's version, feature flags, plugins and settings, queue
//! and exchange arguments, users' permissions. [`crate::status`] and [`crate::doctor`] read
//! it; neither changes anything through it.
//!
//! Where the API is and who logs in comes from the config's `[management]` section
//! ([`Config::management_endpoint`]): by default broker.url's host on port 15672 over
//! `http://`, with broker.url's credentials; `$WARREN_MANAGEMENT_URL` overrides the address.
//! The password travels only in the `Authorization` header: every URL this module shows or
//! puts in an error has no credentials in it. Requests go straight to the API (no HTTP proxy,
//! like the AMQP connection), bounded by `broker.connect_timeout` and
//! `broker.operation_timeout`; answers larger than [`MAX_ANSWER_BYTES`] are refused.
//!
//! TLS (`https://`) is rustls with the ring provider, like the AMQP connection: the CA of
//! `[broker.tls] ca_file` when set, else the system's trust store.
//!
//! The statistics the API returns are *sampled*: the broker's management agent collects them
//! every `collect_statistics_interval` (5 s by default), and quorum queues report theirs even
//! later. Counts that must be true now come from AMQP (a passive `queue.declare`), see
//! [`crate::status`]. API reference: <https://www.rabbitmq.com/docs/http-api-reference>.

use std::sync::Arc;

use percent_encoding::percent_decode_str;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use warren_core::config::Config;

/// The largest answer read from the API (the effective configuration of a busy node is well
/// under 1 MiB).
pub const MAX_ANSWER_BYTES: usize = 32 * 1024 * 1024;

/// Why the management API could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    #[error("invalid management API address (management.url): {0}")]
    Address(String),
    #[error("management API TLS setup: {0}")]
    Tls(String),
    #[error(
        "the management API at {url} is unreachable: {reason}. Is the rabbitmq_management \
         plugin enabled? Set management.url (or $WARREN_MANAGEMENT_URL) to its address"
    )]
    Unreachable { url: String, reason: String },
    #[error(
        "the management API at {url} refused the login of user `{user}` (401): wrong user or \
         password (management.user / management.password, or the URL's), or the user lacks a \
         management tag (`monitoring` or `administrator`)"
    )]
    Unauthorized { url: String, user: String },
    #[error(
        "the management API at {url} does not let user `{user}` read {path} (403): it needs \
         the `administrator` tag (or `monitoring` for statistics)"
    )]
    Forbidden {
        url: String,
        user: String,
        path: String,
    },
    #[error("the management API at {url} answered {status} to {path}")]
    Status {
        url: String,
        path: String,
        status: u16,
    },
    #[error("the management API's answer to {path} is not what Warren expects: {detail}")]
    Decode { path: String, detail: String },
}

impl ManagementError {
    /// True when the API could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ManagementError::Unreachable { .. })
    }
}

/// A management API client for the config's broker and vhost.
#[derive(Clone)]
pub struct Management {
    client: reqwest::Client,
    /// The API's base address, without credentials, ending in `/`.
    base: Url,
    user: String,
    /// Sent only in the `Authorization` header; never shown.
    password: String,
    /// broker.url's vhost, decoded (`/` by default).
    vhost: String,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base.as_str())
            .field("user", &self.user)
            .field("vhost", &self.vhost)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// A client for the API named by `config` (nothing is sent yet).
    pub fn new(config: &Config) -> Result<Management, ManagementError> {
        let endpoint = config
            .management_endpoint()
            .map_err(ManagementError::Address)?;
        let mut base = Url::parse(&endpoint.url)
            .map_err(|err| ManagementError::Address(format!("{}: {err}", endpoint.url)))?;
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        base.set_query(None);
        base.set_fragment(None);
        let vhost = broker_vhost(&config.broker.url);
        let tls = tls_config(config, base.scheme() == "https")?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .connect_timeout(config.broker.connect_timeout)
            .timeout(config.broker.operation_timeout)
            .user_agent(concat!("warren/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|err| ManagementError::Tls(error_text(&err)))?;
        Ok(Management {
            client,
            base,
            user: endpoint.user,
            password: endpoint.password,
            vhost,
        })
    }

    /// The API's (and the management UI's) address, without credentials.
    pub fn address(&self) -> &str {
        self.base.as_str()
    }

    /// The vhost Warren works in (broker.url's).
    pub fn vhost(&self) -> &str {
        &self.vhost
    }

    /// The user the API is asked as.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// `GET /api/overview`: versions and how statistics are kept.
    pub async fn overview(&self) -> Result<Overview, ManagementError> {
        self.get_json(&["overview"]).await
    }

    /// `GET /api/whoami`: the API user and its tags.
    pub async fn whoami(&self) -> Result<Whoami, ManagementError> {
        let raw: RawWhoami = self.get_json(&["whoami"]).await?;
        Ok(Whoami {
            name: raw.name,
            tags: tags_of(&raw.tags),
        })
    }

    /// `GET /api/nodes`: the cluster's nodes, with their plugins.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ManagementError> {
        self.get_json(&["nodes"]).await
    }

    /// `GET /api/feature-flags` (RabbitMQ 3.8 and later).
    pub async fn feature_flags(&self) -> Result<Vec<FeatureFlag>, ManagementError> {
        self.get_json(&["feature-flags"]).await
    }

    /// `GET /api/queues/VHOST/NAME`; `None` when it does not exist.
    pub async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, ManagementError> {
        self.get_optional(&["queues", &self.vhost, name]).await
    }

    /// `GET /api/queues/VHOST`: every queue of the vhost, with statistics.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>, ManagementError> {
        self.get_json(&["queues", &self.vhost]).await
    }

    /// `GET /api/exchanges/VHOST/NAME`; `None` when it does not exist.
    pub async fn exchange(&self, name: &str) -> Result<Option<ExchangeInfo>, ManagementError> {
        self.get_optional(&["exchanges", &self.vhost, name]).await
    }

    /// `GET /api/queues/VHOST/NAME/bindings`: the bindings into a queue (`None`: no queue).
    pub async fn queue_bindings(
        &self,
        name: &str,
    ) -> Result<Option<Vec<Binding>>, ManagementError> {
        self.get_optional(&["queues", &self.vhost, name, "bindings"])
            .await
    }

    /// `GET /api/exchanges/VHOST/NAME/bindings/source`: the bindings out of an exchange.
    pub async fn exchange_bindings(
        &self,
        name: &str,
    ) -> Result<Option<Vec<Binding>>, ManagementError> {
        self.get_optional(&["exchanges", &self.vhost, name, "bindings", "source"])
            .await
    }

    /// `GET /api/users/NAME/permissions`: a user's permissions in every vhost; `None` when
    /// there is no such user. Needs the `administrator` tag.
    pub async fn user_permissions(
        &self,
        user: &str,
    ) -> Result<Option<Vec<Permission>>, ManagementError> {
        if self
            .get_optional::<Value>(&["users", user])
            .await?
            .is_none()
        {
            return Ok(None);
        }
        self.get_json(&["users", user, "permissions"])
            .await
            .map(Some)
    }

    /// `GET /api/config/effective`: the node's effective configuration as Erlang terms
    /// (RabbitMQ 3.12 and later, `administrator` only); `None` where the broker has no such
    /// endpoint (3.10).
    pub async fn effective_config(&self) -> Result<Option<String>, ManagementError> {
        let path = ["config", "effective"];
        match self.get(&path).await? {
            (StatusCode::NOT_FOUND, _) => Ok(None),
            (_, body) => Ok(Some(String::from_utf8_lossy(&body).into_owned())),
        }
    }

    /// A JSON answer that must exist.
    async fn get_json<T: DeserializeOwned>(&self, path: &[&str]) -> Result<T, ManagementError> {
        match self.get_optional(path).await? {
            Some(value) => Ok(value),
            None => Err(ManagementError::Status {
                url: self.base.to_string(),
                path: shown_path(path),
                status: StatusCode::NOT_FOUND.as_u16(),
            }),
        }
    }

    /// A JSON answer, `None` on 404.
    async fn get_optional<T: DeserializeOwned>(
        &self,
        path: &[&str],
    ) -> Result<Option<T>, ManagementError> {
        let (status, body) = self.get(path).await?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|err| ManagementError::Decode {
                path: shown_path(path),
                detail: err.to_string(),
            })
    }

    /// `GET /api/<path>` (each segment percent-encoded, so a vhost `/` is `%2F`): the status
    /// (2xx or 404) and the body; any other status is an error.
    async fn get(&self, path: &[&str]) -> Result<(StatusCode, Vec<u8>), ManagementError> {
        let mut url = self.base.clone();
        {
            let mut segments = url.path_segments_mut().map_err(|()| {
                ManagementError::Address(format!("{} cannot take a path", self.base))
            })?;
            segments.pop_if_empty().push("api").extend(path);
        }
        let unreachable = |err: reqwest::Error| ManagementError::Unreachable {
            url: self.base.to_string(),
            reason: error_text(&err),
        };
        let mut response = self
            .client
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status();
        match status {
            StatusCode::UNAUTHORIZED => {
                return Err(ManagementError::Unauthorized {
                    url: self.base.to_string(),
                    user: self.user.clone(),
                });
            }
            StatusCode::FORBIDDEN => {
                return Err(ManagementError::Forbidden {
                    url: self.base.to_string(),
                    user: self.user.clone(),
                    path: shown_path(path),
                });
            }
            s if s.is_success() || s == StatusCode::NOT_FOUND => {}
            s => {
                return Err(ManagementError::Status {
                    url: self.base.to_string(),
                    path: shown_path(path),
                    status: s.as_u16(),
                });
            }
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ManagementError::Decode {
                    path: shown_path(path),
                    detail: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, body))
    }
}

/// `/api/a/b` for messages.
fn shown_path(path: &[&str]) -> String {
    format!("/api/{}", path.join("/"))
}

/// broker.url's vhost, decoded: the path after the authority, `/` when empty.
fn broker_vhost(url: &str) -> String {
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) if !uri.vhost.is_empty() => uri.vhost,
        Ok(_) => "/".to_owned(),
        // Config::validate refuses such a URL; decode what is there.
        Err(_) => url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(_, vhost)| vhost.split(['?', '#']).next().unwrap_or_default())
            .filter(|vhost| !vhost.is_empty())
            .map_or_else(
                || "/".to_owned(),
                |vhost| percent_decode_str(vhost).decode_utf8_lossy().into_owned(),
            ),
    }
}

/// The rustls configuration: ring, and the trust roots of an `https://` API.
fn tls_config(config: &Config, https: bool) -> Result<rustls::ClientConfig, ManagementError> {
    let mut roots = rustls::RootCertStore::empty();
    if https {
        match &config.broker.tls.ca_file {
            Some(path) => {
                use rustls::pki_types::CertificateDer;
                use rustls::pki_types::pem::PemObject;
                let certificates = CertificateDer::pem_file_iter(path)
                    .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                    .map_err(|err| {
                        ManagementError::Tls(format!(
                            "broker.tls.ca_file {}: {err}",
                            path.display()
                        ))
                    })?;
                roots.add_parsable_certificates(certificates);
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ManagementError::Tls(err.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

/// An error and its causes on one line ("connection refused" is three levels down in a
/// reqwest error). reqwest's own text names the URL, which has no credentials here.
fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    warren_core::secret::mask_urls_in(&text)
}

/// A user's tags: a list on RabbitMQ 4.x, a comma-separated string on 3.10.
fn tags_of(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Value::String(text) => text
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

/// `GET /api/overview`, the parts Warren reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Overview {
    pub rabbitmq_version: Option<String>,
    pub management_version: Option<String>,
    pub erlang_version: Option<String>,
    pub cluster_name: Option<String>,
    /// `basic`, `detailed` or `none` (no rates at all).
    pub rates_mode: Option<String>,
    /// True when the broker collects no statistics (`management_agent.disable_metrics_collector`).
    pub disable_stats: Option<bool>,
}

impl Overview {
    /// The broker's version as (major, minor, patch), when it says.
    pub fn version(&self) -> Option<(u32, u32, u32)> {
        parse_version(self.rabbitmq_version.as_deref()?)
    }

    /// Whether queue rates are kept at all.
    pub fn has_rates(&self) -> bool {
        self.disable_stats != Some(true) && self.rates_mode.as_deref() != Some("none")
    }
}

/// `4.3.6` → (4, 3, 6); a suffix (`3.10.8+1.g…`, `4.0.0-beta.1`) is ignored.
pub fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.split('.').map(|part| {
        let digits: String = part.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u32>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

#[derive(Deserialize)]
struct RawWhoami {
    name: String,
    #[serde(default)]
    tags: Value,
}

/// `GET /api/whoami`.
#[derive(Debug, Clone)]
pub struct Whoami {
    pub name: String,
    pub tags: Vec<String>,
}

/// One node of `GET /api/nodes`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct NodeInfo {
    pub name: String,
    pub running: Option<bool>,
    /// The plugins enabled on the node (`rabbitmq-plugins enable`).
    pub enabled_plugins: Vec<String>,
    /// The Erlang applications running on the node (plugins among them).
    pub applications: Vec<Application>,
}

impl NodeInfo {
    /// Whether `plugin` is enabled (or at least running) on the node.
    pub fn has_plugin(&self, plugin: &str) -> bool {
        self.enabled_plugins.iter().any(|p| p == plugin)
            || self.applications.iter().any(|a| a.name == plugin)
    }
}

/// One running application of a node.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Application {
    pub name: String,
}

/// One of `GET /api/feature-flags`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct FeatureFlag {
    pub name: String,
    /// `enabled`, `disabled` or `state_changing`.
    pub state: String,
    /// `required`, `stable` or `experimental`.
    pub stability: Option<String>,
}

/// `GET /api/queues/VHOST/NAME`, the parts Warren reads. Every count is sampled.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QueueInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub queue_type: Option<String>,
    pub durable: Option<bool>,
    pub arguments: Map<String, Value>,
    pub messages: Option<u64>,
    pub messages_ready: Option<u64>,
    pub messages_unacknowledged: Option<u64>,
    pub consumers: Option<u64>,
    /// The `timestamp` property of the message at the head, in seconds since the epoch:
    /// classic queues only, and only for messages that carry one.
    pub head_message_timestamp: Option<Value>,
    pub message_stats: Option<MessageStats>,
}

impl QueueInfo {
    /// Messages published into the queue per second (sampled), `None` when not reported.
    pub fn publish_rate(&self) -> Option<f64> {
        self.message_stats
            .as_ref()
            .and_then(|s| s.publish_details.as_ref())
            .and_then(|d| d.rate)
    }

    /// Messages delivered to consumers or fetched per second (sampled).
    pub fn deliver_rate(&self) -> Option<f64> {
        self.message_stats
            .as_ref()
            .and_then(|s| s.deliver_get_details.as_ref())
            .and_then(|d| d.rate)
    }

    /// The head message's timestamp, in seconds since the epoch.
    pub fn head_timestamp(&self) -> Option<i64> {
        self.head_message_timestamp.as_ref().and_then(Value::as_i64)
    }
}

/// A queue's `message_stats`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MessageStats {
    pub publish_details: Option<RateDetails>,
    pub deliver_get_details: Option<RateDetails>,
}

/// `…_details`: the rate over the last sampling interval.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RateDetails {
    pub rate: Option<f64>,
}

/// `GET /api/exchanges/VHOST/NAME`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ExchangeInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub durable: Option<bool>,
    pub arguments: Map<String, Value>,
}

/// One binding.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Binding {
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`.
    pub destination_type: String,
    pub routing_key: String,
}

/// One of `GET /api/users/NAME/permissions`: regular expressions over resource names.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Permission {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_with_suffixes() {
        assert_eq!(parse_version("4.3.6"), Some((4, 3, 6)));
        assert_eq!(parse_version("3.10.8+1.g1234"), Some((3, 10, 8)));
        assert_eq!(parse_version("4.0.0-beta.1"), Some((4, 0, 0)));
        assert_eq!(parse_version("4"), Some((4, 0, 0)));
        assert_eq!(parse_version("x"), None);
    }

    #[test]
    fn tags_come_as_a_list_or_a_string() {
        assert_eq!(
            tags_of(&serde_json::json!(["administrator", "x"])),
            ["administrator", "x"]
        );
        assert_eq!(
            tags_of(&serde_json::json!("administrator, monitoring")),
            ["administrator", "monitoring"]
        );
        assert!(tags_of(&serde_json::json!(null)).is_empty());
    }

    #[test]
    fn the_vhost_is_decoded_from_the_broker_url() {
        assert_eq!(broker_vhost("amqp://guest:guest@127.0.0.1:5672/%2f"), "/");
        assert_eq!(
            broker_vhost("amqp://guest:guest@127.0.0.1:5672/prod"),
            "prod"
        );
        assert_eq!(broker_vhost("amqp://guest:guest@127.0.0.1:5672"), "/");
    }

    #[test]
    fn no_password_in_sight() {
        let mut config = Config::default();
        config.management.url = Some("http://ops:s3cr3t@127.0.0.1:15672".into());
        let management = Management::new(&config).expect("client");
        assert_eq!(management.address(), "http://127.0.0.1:15672/");
        assert_eq!(management.user(), "ops");
        assert!(!format!("{management:?}").contains("s3cr3t"));
    }
}
