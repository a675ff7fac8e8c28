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

use std::time::Duration;

use async_rs::Runtime;
use std::sync::atomic::{AtomicUsize, Ordering};

use backon::{ExponentialBuilder, Retryable};
use futures::StreamExt;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties, Event};
use tokio::sync::watch;

use crate::config::BrokerConfig;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid broker URL: {0}")]
    InvalidUrl(String),
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
    /// Index of the address to try first next time.
    next: AtomicUsize,
}

impl Connector {
    pub fn new(broker: &BrokerConfig) -> Result<Connector, ConnectError> {
        let heartbeat = u16::try_from(broker.heartbeat.as_secs()).unwrap_or(u16::MAX);
        let uris = broker
            .addresses()
            .map(|url| {
                let mut uri: AMQPUri = url.parse().map_err(ConnectError::InvalidUrl)?;
                uri.query.heartbeat = Some(heartbeat);
                uri.query.frame_max.get_or_insert(DEFAULT_FRAME_MAX);
                Ok(uri)
            })
            .collect::<Result<Vec<_>, ConnectError>>()?;
        Ok(Connector {
            broker: broker.clone(),
            uris,
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
            async move {
                let attempt =
                    Connection::connect_uri_with_runtime(uri, properties, Runtime::tokio_current());
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
        // Refused credentials will not change by trying again.
        let result = attempt
            .retry(policy)
            .sleep(tokio::time::sleep)
            .when(|err| !is_access_refused(err))
            .await;
        result.map_err(|source| {
            let url = match self.uris.len() {
                1 => last_url.clone(),
                n => format!("{last_url} (and {} other address(es))", n - 1),
            };
            if is_access_refused(&source) {
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

/// The URL without its password, for messages.
fn redacted(uri: &AMQPUri) -> String {
    let vhost = uri.vhost.replace('/', "%2f");
    format!(
        "amqp://{}@{}:{}/{}",
        uri.authority.userinfo.username, uri.authority.host, uri.authority.port, vhost
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
        assert_eq!(shown, "amqp://user@example.com:5673/%2f");
    }
}
