//! Connecting to RabbitMQ, with bounded retries.
//!
//! Every Warren process opens its connections here: named (so `rabbitmqctl list_connections
//! name` and the management UI tell them apart), with the configured heartbeat, and on tokio
//! through `async_rs::Runtime::tokio_current()` (lapin 4 runs on tokio by itself; no executor
//! bridge is needed). A broker that is down is retried with exponential backoff for
//! `broker.connect_timeout`, then reported as [`ConnectError::Unreachable`]; refused
//! credentials are reported at once.

use std::time::Duration;

use async_rs::Runtime;
use backoff::ExponentialBackoff;
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};

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
        source: lapin::Error,
    },
    #[error("RabbitMQ at {url} refused the login: {source}")]
    AccessRefused { url: String, source: lapin::Error },
}

/// Opens a connection named `name`, retrying with exponential backoff until
/// `broker.connect_timeout` has passed.
pub async fn connect(broker: &BrokerConfig, name: &str) -> Result<Connection, ConnectError> {
    let mut uri: AMQPUri = broker.url.parse().map_err(ConnectError::InvalidUrl)?;
    uri.query.heartbeat = Some(u16::try_from(broker.heartbeat.as_secs()).unwrap_or(u16::MAX));
    let url = redacted(&uri);
    let started = std::time::Instant::now();
    let policy = ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: Duration::from_secs(2),
        max_elapsed_time: Some(broker.connect_timeout),
        ..ExponentialBackoff::default()
    };
    let mut attempts = 0;
    let result = backoff::future::retry(policy, || {
        attempts += 1;
        let uri = uri.clone();
        let properties = ConnectionProperties::default().with_connection_name(name.into());
        let per_attempt = broker.connect_timeout.max(Duration::from_secs(1));
        async move {
            let attempt =
                Connection::connect_uri_with_runtime(uri, properties, Runtime::tokio_current());
            match tokio::time::timeout(per_attempt, attempt).await {
                Ok(Ok(connection)) => Ok(connection),
                Ok(Err(err)) if is_access_refused(&err) => Err(backoff::Error::permanent(err)),
                Ok(Err(err)) => {
                    tracing::debug!(error = %err, "connecting to RabbitMQ failed, will retry");
                    Err(backoff::Error::transient(err))
                }
                Err(_) => Err(backoff::Error::transient(timed_out())),
            }
        }
    })
    .await;
    result.map_err(|source| {
        if is_access_refused(&source) {
            ConnectError::AccessRefused {
                url: url.clone(),
                source,
            }
        } else {
            let waited = humantime::format_duration(Duration::from_millis(
                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            ))
            .to_string();
            ConnectError::Unreachable {
                url: url.clone(),
                attempts,
                waited,
                source,
            }
        }
    })
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
