//! The consumer watchdog: no queue stays silently unconsumed because the broker stopped
//! serving a consumer without saying so.
//!
//! RabbitMQ normally ends a consumer with `basic.cancel` (queue deleted, consumer timeout) or by
//! closing its channel, and the worker subscribes again ([`crate::worker`]). But RabbitMQ 3.10
//! sometimes deletes a quorum queue without cancelling its consumers (seen about once in a
//! hundred deletions: `tests/tests/consumer_restart.rs`); the worker then waits on a consumer
//! of a queue that no longer exists, and a queue declared again under the same name gets no
//! consumer from it.
//!
//! So every [`CHECK_INTERVAL`] the watchdog asks the broker, with a passive `queue.declare`
//! on a channel of its own, how many consumers each queue has. A queue the worker believes it
//! consumes that is missing, or that has no consumer at all, twice in a row (a consumer just
//! subscribed is counted at once; twice rules out a declare racing a re-subscription), gets
//! its consumers cancelled by the worker itself: their streams end as after a broker cancel,
//! and the worker subscribes again (waiting, with backoff, while the queue is missing).
//!
//! The cost is one passive declare per queue per interval. Other workers' consumers count too,
//! so a stale consumer goes unnoticed while another worker serves the queue: the queue is
//! consumed then, which is what matters.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicCancelOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::task::JoinHandle;

use crate::worker::Consumers;

/// How often each consumed queue is checked.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Stops the watchdog when the session ends (dropped).
pub(crate) struct Watchdog(JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts watching `queues` for this session's `consumers`.
pub(crate) fn watch(
    connection: Arc<Connection>,
    consumers: Consumers,
    queues: Vec<Arc<str>>,
    timeout: Duration,
) -> Watchdog {
    Watchdog(tokio::spawn(async move {
        let mut checks = Checks {
            connection,
            channel: None,
            timeout,
        };
        let mut suspects = HashSet::new();
        let mut tick = tokio::time::interval(CHECK_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            for queue in &queues {
                let live = consumers.live_of(queue);
                if live.is_empty() {
                    // Being subscribed again, or the session is ending.
                    suspects.remove(queue);
                    continue;
                }
                match checks.check(queue).await {
                    Verdict::Unserved if !suspects.insert(queue.clone()) => {
                        suspects.remove(queue);
                        tracing::warn!(
                            %queue,
                            "the broker serves no consumer of this queue although the worker \
                             subscribed (deleted without a cancel?); subscribing again"
                        );
                        cancel(&live, timeout).await;
                    }
                    Verdict::Unserved => {}
                    Verdict::Served | Verdict::Unknown => {
                        suspects.remove(queue);
                    }
                }
            }
        }
    }))
}

/// What the broker says of a queue.
enum Verdict {
    /// It has consumers.
    Served,
    /// It has none, or it does not exist.
    Unserved,
    /// No answer (no channel, no answer in time, no permission): the watchdog acts only on
    /// the broker's word.
    Unknown,
}

/// The passive declares, on a channel reopened when a missing queue closed it.
struct Checks {
    connection: Arc<Connection>,
    channel: Option<Channel>,
    timeout: Duration,
}

impl Checks {
    /// Whether the broker counts a consumer on `queue`.
    async fn check(&mut self, queue: &str) -> Verdict {
        let channel = match self.channel.take() {
            Some(channel) if channel.status().connected() => channel,
            _ => match tokio::time::timeout(self.timeout, self.connection.create_channel()).await {
                Ok(Ok(channel)) => channel,
                _ => return Verdict::Unknown,
            },
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declare = channel.queue_declare(queue.into(), passive, FieldTable::default());
        let answer = tokio::time::timeout(self.timeout, declare).await;
        self.channel = Some(channel);
        match answer {
            Ok(Ok(declared)) if declared.consumer_count() > 0 => Verdict::Served,
            Ok(Ok(_)) => Verdict::Unserved,
            Ok(Err(err)) if is_not_found(&err) => Verdict::Unserved,
            _ => Verdict::Unknown,
        }
    }
}

/// Cancels the consumers: lapin then ends their streams, and the worker subscribes again. A
/// cancel that fails or hangs closes the consumer's channel instead, which ends it too.
async fn cancel(consumers: &[(Channel, String)], timeout: Duration) {
    for (channel, tag) in consumers {
        let cancel = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        if !matches!(tokio::time::timeout(timeout, cancel).await, Ok(Ok(()))) {
            let close = channel.close(200, "consumer served by no queue".into());
            let _ = tokio::time::timeout(timeout, close).await;
        }
    }
}

/// True for the channel error of a passive declare of a missing queue.
fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}
