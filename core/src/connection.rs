//! Connecting to RabbitMQ, with bounded retries.
//!
//! Every Warren process opens its connections here: named (so `rabbitmqctl list_connections
//! name` and the management UI tell them apart), with the configured heartbeat, RabbitMQ's
//! default frame size ([`DEFAULT_FRAME_MAX`]: any message a producer may send fits), and on tokio
//! through `async_rs::Runtime::tokio_current()` (lapin 4 runs on tokio by itself; no executor
//! bridge is needed). A broker that is down is retried with exponential backoff for
//! `broker.connect_timeout`, then reported as [`ConnectError::Unreachable`]; refused
//! credentials are reported at once. With several addresses (`broker.failover_urls`, a
//! cluster) each attempt tries the next one, so a lost node is failed over.
//!
//! `amqps://` addresses connect over TLS with the certificates of `[broker.tls]`
//! ([`crate::tls`]); a failed handshake (untrusted CA, expired certificate, wrong host name, a
//! plain listener) is reported at once as [`ConnectError::Tls`], never retried in plaintext.
//! URLs in messages and logs never show the password ([`crate::secret`]).

use std::time::Duration;

use async_rs::Runtime;
use std::sync::atomic::{AtomicUsize, Ordering};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::tcp::AsyncTcpStream;
use lapin::uri::{AMQPScheme, AMQPUri, SASLMechanism};
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::watch;

use crate::config::BrokerConfig;
use crate::secret::{mask_in, mask_url};
use crate::tls::{TlsClient, TlsFailure, TlsSetupError};

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL (password masked) and why it does not parse.
    #[error("invalid broker URL {0}")]
    InvalidUrl(String),
    /// `[broker.tls]` names files that cannot be used.
    #[error(transparent)]
    TlsSetup(#[from] TlsSetupError),
    /// The TLS handshake failed: not retried, a certificate does not change by trying again.
    #[error("TLS to RabbitMQ at {url} failed: {}: {detail}", failure.explain())]
    Tls {
        url: String,
        failure: TlsFailure,
        /// rustls's own words.
        detail: String,
    },
    #[error(
        "cannot reach RabbitMQ at {url} (gave up after {attempts} attempts in {waited}): {source}. \
         Is the broker running? Start a local one with `scripts/broker start`, or set \
         WARREN_AMQP_URL"
    )]
    Unreachable {
        url: String,
        attempts: u32,
        waited: String,
        source: Box<lapin::Error>,
    },
    #[error("RabbitMQ at {url} refused the login: {source}")]
    AccessRefused {
        url: String,
        source: Box<lapin::Error>,
    },
}

/// The largest AMQP frame asked for, unless the URL sets `?frame_max=`: RabbitMQ's own default
/// (`frame_max = 131072`). It must be at least what producers may use: AMQP cannot split a
/// message's content header (its properties and header table) across frames, so RabbitMQ
/// delivers a header as large as its producer's frame size allowed, and lapin closes a
/// connection that receives a frame over the size it asked for — every in-flight ack lost,
/// and the same message redelivered into the same crash. (Warren asked for 16 KiB until
/// 2026-11-30 to save memory: lapin allocates two buffers of 32 frames per connection; at this
/// size they are reserved up front and filled only as traffic passes through them.) A broker
/// configured with a larger `frame_max` needs the same `?frame_max=` in Warren's URL.
pub const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// Opens connections to one broker or cluster, remembering which address worked last so
/// that, after losing a connection, the next attempt starts with the following address.
#[derive(Debug)]
pub struct Connector {
    broker: BrokerConfig,
    /// Every configured address, heartbeat applied.
    uris: Vec<AMQPUri>,
    /// For `amqps://` addresses: the TLS client of `[broker.tls]`.
    tls: Option<TlsClient>,
    /// Index of the address to try first next time.
    next: AtomicUsize,
}

impl Connector {
    pub fn new(broker: &BrokerConfig) -> Result<Connector, ConnectError> {
        let heartbeat = u16::try_from(broker.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let uris = broker
            .addresses()
            .map(|url| {
                if url
                    .split_once("://")
                    .is_some_and(|(_, rest)| rest.contains("://"))
                {
                    return Err(ConnectError::InvalidUrl(format!(
                        "{}: holds more than one URL",
                        mask_url(url)
                    )));
                }
                let mut uri: AMQPUri = url.parse().map_err(|err: String| {
                    ConnectError::InvalidUrl(format!("{}: {}", mask_url(url), mask_in(&err, url)))
                })?;
                uri.query.heartbeat = Some(heartbeat);
                uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
                Ok(uri)
            })
            .collect::<Result<Vec<_>, ConnectError>>()?;
        let any_tls = uris.iter().any(|uri| uri.scheme == AMQPScheme::AMQPS);
        let tls = match any_tls {
            true => Some(TlsClient::new(&broker.tls)?),
            // Config::validate refuses this; a BrokerConfig built in code is checked here too.
            false if broker.tls.is_set() => {
                return Err(ConnectError::InvalidUrl(format!(
                    "{}: [broker.tls] is set but the URL is amqp:// (plaintext); use amqps://",
                    mask_url(&broker.url)
                )));
            }
            false => None,
        };
        let uris = uris
            .into_iter()
            .map(|mut uri| {
                // A client certificate logs in as the user it names, unless the URL says.
                if uri.scheme == AMQPScheme::AMQPS
                    && tls.as_ref().is_some_and(|tls| tls.client_certificate)
                {
                    uri.query
                        .auth_mechanism
                        .get_or_insert(SASLMechanism::External);
                }
                uri
            })
            .collect();
        Ok(Connector {
            broker: broker.clone(),
            uris,
            tls,
            next: AtomicUsize::new(0),
        })
    }

    /// Opens a connection named `name`, trying the addresses in turn with exponential backoff
    /// until `broker.connect_timeout` has passed.
    pub async fn connect(&self, name: &str) -> Result<Connection, ConnectError> {
        let started = std::time::Instant::now();
        let policy = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .with_jitter()
            .without_max_times()
            .with_total_delay(Some(self.broker.connect_timeout));
        let count = self.uris.len().max(1);
        let per_attempt = (self.broker.connect_timeout / count as u32)
            .clamp(Duration::from_secs(1), Duration::from_secs(10));
        let mut attempts = 0;
        let mut last_url = String::new();
        let attempt = || {
            attempts += 1;
            let index = self.next.fetch_add(1, Ordering::Relaxed) % count;
            let uri = self.uris[index].clone();
            last_url = redacted(&uri);
            let url = last_url.clone();
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let tls = self.tls.clone();
            async move {
                let attempt = async move {
                    match (uri.scheme.clone(), tls) {
                        (AMQPScheme::AMQPS, Some(tls)) => connect_tls(uri, properties, tls).await,
                        (AMQPScheme::AMQPS, None) => Err(io_error(std::io::Error::other(
                            "amqps:// without a TLS client (a bug: Connector::new makes one)",
                        ))),
                        (AMQPScheme::AMQP, _) => {
                            Connection::connect_uri_with_runtime(
                                uri,
                                properties,
                                Runtime::tokio_current(),
                            )
                            .await
                        }
                    }
                };
                match tokio::time::timeout(per_attempt, attempt).await {
                    Ok(Ok(connection)) => {
                        // Next time (after a loss) start with this same address again only
                        // after the others have been tried.
                        tracing::debug!(%url, "connected to RabbitMQ");
                        self.next.store(index + 1, Ordering::Relaxed);
                        Ok(connection)
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(%url, error = %err, "connecting to RabbitMQ failed");
                        Err(err)
                    }
                    Err(_) => Err(timed_out()),
                }
            }
        };
        // Refused credentials and certificates will not change by trying again.
        let result = attempt
            .retry(policy)
            .sleep(tokio::time::sleep)
            .when(|err| !is_access_refused(err) && TlsFailure::of(err).is_none())
            .await;
        result.map_err(|source| {
            let url = match self.uris.len() {
                1 => last_url.clone(),
                n => format!("{last_url} (and {} other address(es))", n - 1),
            };
            if let Some((failure, detail)) = TlsFailure::of(&source) {
                ConnectError::Tls {
                    url: last_url.clone(),
                    failure,
                    detail,
                }
            } else if is_access_refused(&source) {
                ConnectError::AccessRefused {
                    url,
                    source: Box::new(source),
                }
            } else {
                let waited = humantime::format_duration(Duration::from_millis(
                    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                ))
                .to_string();
                ConnectError::Unreachable {
                    url,
                    attempts,
                    waited,
                    source: Box::new(source),
                }
            }
        })
    }
}

/// One TLS connection: TCP to the URL's host, then the handshake with `tls` (checking the
/// certificate against `server_name` or the host), then AMQP. lapin calls the closure for each
/// connection it opens.
async fn connect_tls(
    uri: AMQPUri,
    properties: ConnectionProperties,
    tls: TlsClient,
) -> lapin::Result<Connection> {
    let runtime = Runtime::tokio_current();
    Connection::connector(
        uri,
        runtime,
        async move |uri: AMQPUri, runtime| {
            let host = uri.authority.host.clone();
            let addresses = runtime.to_socket_addrs((host.clone(), uri.authority.port));
            let stream = AsyncTcpStream::connect(&runtime, addresses)
                .await
                .map_err(io_error)?;
            stream
                .into_rustls(&tls.connector, tls.server_name(&host))
                .await
                .map_err(io_error)
        },
        properties,
    )
    .await
}

fn io_error(error: std::io::Error) -> lapin::Error {
    lapin::ErrorKind::IOError(std::sync::Arc::new(error)).into()
}

/// Whether RabbitMQ currently blocks publishing on `connection` (a memory or disk alarm:
/// `connection.blocked` / `connection.unblocked`), as a watch that a background task keeps
/// up to date, logging each change, until the connection is gone.
/// See <https://www.rabbitmq.com/docs/connection-blocked>.
pub fn watch_blocked(connection: &Connection) -> watch::Receiver<bool> {
    let (blocked_tx, blocked) = watch::channel(false);
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Event::ConnectionBlocked(reason) => {
                    tracing::warn!(%reason, "RabbitMQ blocks publishing (resource alarm)");
                    blocked_tx.send_replace(true);
                }
                Event::ConnectionUnblocked => {
                    tracing::info!("RabbitMQ accepts publishing again");
                    blocked_tx.send_replace(false);
                }
                _ => {}
            }
        }
    });
    blocked
}

/// Opens one connection named `name` (see [`Connector::connect`]).
pub async fn connect(broker: &BrokerConfig, name: &str) -> Result<Connection, ConnectError> {
    Connector::new(broker)?.connect(name).await
}

fn is_access_refused(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED))
}

fn timed_out() -> lapin::Error {
    lapin::ErrorKind::IOError(std::sync::Arc::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "connection attempt timed out",
    )))
    .into()
}

/// The URL with its password masked (`user:***@`), for messages.
fn redacted(uri: &AMQPUri) -> String {
    let vhost = uri.vhost.replace('/', "%2f");
    format!(
        "{}://{}:{}@{}:{}/{}",
        uri.scheme,
        uri.authority.userinfo.username,
        crate::secret::MASK,
        uri.authority.host,
        uri.authority.port,
        vhost
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_in_messages_hide_the_password() {
        let uri: AMQPUri = "amqp://user:secret@example.com:5673/%2f"
            .parse()
            .expect("valid");
        let shown = redacted(&uri);
        assert!(!shown.contains("secret"));
        assert_eq!(shown, "amqp://user:***@example.com:5673/%2f");
    }
}
