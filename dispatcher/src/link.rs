//! The dispatcher's connection to RabbitMQ, reopened on demand after it was lost.
//!
//! A [`Link`] is one connection with one confirm-mode channel, plus what RabbitMQ said about
//! flow control on it: under a memory or disk alarm the broker sends `connection.blocked` and
//! stops reading from publishing connections (<https://www.rabbitmq.com/docs/connection-blocked>).
//! [`Links::current`] hands out the live link, or opens a new one (with the connector's
//! backoff and failover) when the last one is gone, so a dispatcher outlives broker restarts.
//! Publishes that were waiting for a confirm when the connection dropped fail with an error
//! (lapin does not republish them); the caller may submit them again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use tokio::sync::{Mutex, watch};
use warren_core::connection::{self, ConnectError, Connector};
use warren_core::metrics::{Link as MetricLink, Metrics};

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
    /// Shared with a reconnect started by a readiness probe ([`Links::readiness`]).
    shared: Arc<Shared>,
}

struct Shared {
    connector: Connector,
    name: String,
    timeout: Duration,
    current: Mutex<Option<Link>>,
    /// A copy of the current link that a readiness probe reads without waiting (`current` is
    /// held while a connection is opened).
    last: std::sync::Mutex<Option<Link>>,
    /// `warren_connected{connection="dispatcher"}`, reconnects, submits: set once, if at all.
    metrics: OnceLock<Arc<Metrics>>,
    /// Set once a link was opened: a later one is a reconnect.
    opened_before: AtomicBool,
    /// When a probe last started a reconnect ([`Links::readiness`]): at most one a second.
    probe_reconnect: std::sync::Mutex<Option<Instant>>,
}

/// How often a readiness probe may start a reconnect in the background.
const PROBE_RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// The longest a reconnect started by a probe may take.
const PROBE_RECONNECT_DEADLINE: Duration = Duration::from_secs(5);

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
            shared: Arc::new(Shared {
                connector,
                name,
                timeout,
                current: Mutex::new(None),
                last: std::sync::Mutex::new(None),
                metrics: OnceLock::new(),
                opened_before: AtomicBool::new(false),
                probe_reconnect: std::sync::Mutex::new(None),
            }),
        }
    }

    /// The live link, opening a new one if there is none.
    pub async fn current(&self) -> Result<Link, LinkError> {
        self.shared.current().await
    }

    /// See [`Shared::discard`].
    pub async fn discard(&self, link: &Link) {
        self.shared.discard(link).await
    }

    /// Closes the current link, if any.
    pub async fn close(&self) {
        self.shared.close().await
    }

    /// Records the connection's state, reconnects and submits in `metrics` from now on.
    pub fn set_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.shared.metrics.set(metrics);
        self.is_connected();
    }

    /// The metrics, if [`Links::set_metrics`] was called.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.shared.metrics.get()
    }

    /// Whether the current link's connection and channel are open, answered at once.
    pub fn is_connected(&self) -> bool {
        let connected = lock(&self.shared.last)
            .as_ref()
            .is_some_and(Link::is_usable);
        self.shared.record_connected(connected);
        connected
    }

    /// For `/readyz`: `Ok` while connected. Otherwise not ready, and a reconnect starts in the
    /// background (at most one a second, each given [`PROBE_RECONNECT_DEADLINE`]): the probe
    /// answers at once and never waits for the broker.
    pub fn readiness(&self) -> Result<(), String> {
        if self.is_connected() {
            return Ok(());
        }
        let due = {
            let mut last = lock(&self.shared.probe_reconnect);
            let due = last.is_none_or(|at| at.elapsed() >= PROBE_RECONNECT_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due && let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            runtime.spawn(async move {
                let _ = tokio::time::timeout(PROBE_RECONNECT_DEADLINE, shared.current()).await;
            });
        }
        Err("not connected to RabbitMQ (reconnecting)".to_owned())
    }
}

impl Shared {
    async fn current(&self) -> Result<Link, LinkError> {
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref().filter(|link| link.is_usable()) {
            return Ok(link.clone());
        }
        if current.is_some() {
            tracing::warn!("connection to RabbitMQ lost; reconnecting");
        }
        let link = match self.open().await {
            Ok(link) => link,
            Err(err) => {
                self.record_connected(false);
                return Err(err);
            }
        };
        *current = Some(link.clone());
        *lock(&self.last) = Some(link.clone());
        self.record_connected(true);
        if self.opened_before.swap(true, Ordering::Relaxed)
            && let Some(metrics) = self.metrics.get()
        {
            metrics.reconnected();
        }
        Ok(link)
    }

    fn record_connected(&self, connected: bool) {
        if let Some(metrics) = self.metrics.get() {
            metrics.set_connected(MetricLink::Dispatcher, connected);
        }
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
        lock(&self.last).take();
        if let Some(link) = self.current.lock().await.take() {
            let _ =
                tokio::time::timeout(self.timeout, link.connection.close(200, "bye".into())).await;
        }
        self.record_connected(false);
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
