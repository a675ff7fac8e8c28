//! The dispatcher's connection to RabbitMQ, reopened on demand after it was lost.
//!
//! A [`Link`] is one connection with one confirm-mode channel, plus what RabbitMQ said about
//! flow control on it: under a memory or disk alarm the broker sends `connection.blocked` and
//! stops reading from publishing connections (<https://www.rabbitmq.com/docs/connection-blocked>).
//! [`Links::current`] hands out the live link, or opens a new one (with the connector's
//! backoff and failover) when the last one is gone, so a dispatcher outlives broker restarts.
//! Publishes that were waiting for a confirm when the connection dropped fail with an error
//! (lapin does not republish them); the caller may submit them again.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::{Mutex, watch};
use warren_core::connection::{self, ConnectError, Connector};

/// One connection and its confirm channel.
#[derive(Clone)]
pub(crate) struct Link {
    pub connection: Arc<Connection>,
    /// In confirm mode: every publish gets an ack or nack from the broker.
    pub channel: Channel,
    /// `true` while the broker blocks this connection's publishes.
    blocked: watch::Receiver<bool>,
}

impl Link {
    fn is_usable(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Waits until the broker no longer blocks publishing, at most `timeout`. Returns false on
    /// timeout.
    pub async fn wait_unblocked(&self, timeout: Duration) -> bool {
        let mut blocked = self.blocked.clone();
        let unblocked = blocked.wait_for(|is_blocked| !is_blocked);
        matches!(tokio::time::timeout(timeout, unblocked).await, Ok(Ok(_)))
    }
}

/// The current link, replaced when it is lost.
pub(crate) struct Links {
    connector: Connector,
    name: String,
    timeout: Duration,
    current: Mutex<Option<Link>>,
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("opening a confirm channel: {0}")]
    Channel(#[from] lapin::Error),
    #[error("opening a confirm channel: no answer within {0:?}")]
    Timeout(Duration),
}

impl Links {
    pub fn new(connector: Connector, name: String, timeout: Duration) -> Links {
        Links {
            connector,
            name,
            timeout,
            current: Mutex::new(None),
        }
    }

    /// The live link, opening a new one if there is none.
    pub async fn current(&self) -> Result<Link, LinkError> {
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref().filter(|link| link.is_usable()) {
            return Ok(link.clone());
        }
        if current.is_some() {
            tracing::warn!("connection to RabbitMQ lost; reconnecting");
        }
        let link = self.open().await?;
        *current = Some(link.clone());
        Ok(link)
    }

    async fn open(&self) -> Result<Link, LinkError> {
        let connection = self.connector.connect(&self.name).await?;
        let blocked = connection::watch_blocked(&connection);
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = tokio::time::timeout(self.timeout, setup)
            .await
            .map_err(|_| LinkError::Timeout(self.timeout))??;
        Ok(Link {
            connection: Arc::new(connection),
            channel,
            blocked,
        })
    }

    /// Drops `link` if it is still the current one, so that the next submit opens a fresh
    /// connection and channel; the old connection is closed after `timeout`, once the
    /// confirms still pending on it have arrived.
    ///
    /// For a nacked publish: RabbitMQ 3.10 can leave a channel that first published to a
    /// quorum queue while the queue's leader node was down nacking every later publish to
    /// that queue until the node is back, even though a new leader was elected at once
    /// (scenario 3 of docs/FAULTS.md). A new channel is not affected.
    pub async fn discard(&self, link: &Link) {
        let mut current = self.current.lock().await;
        let same = current
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.connection, &link.connection));
        if !same {
            return;
        }
        let Some(old) = current.take() else { return };
        tracing::warn!("the broker refused a publish; reopening the connection");
        let timeout = self.timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let _ =
                tokio::time::timeout(timeout, old.connection.close(200, "reopened".into())).await;
        });
    }

    /// Closes the current link, if any.
    pub async fn close(&self) {
        if let Some(link) = self.current.lock().await.take() {
            let _ =
                tokio::time::timeout(self.timeout, link.connection.close(200, "bye".into())).await;
        }
    }
}
