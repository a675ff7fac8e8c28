//! `warren topology migrate`: declares Warren's topology like `apply`, and replaces each of
//! Warren's queues that exists with other arguments, keeping its messages.
//!
//! RabbitMQ cannot change a queue's arguments in place (a declare with other ones is refused
//! with `PRECONDITION_FAILED`). That happens on an upgrade (dead-letter and `warren.unroutable`
//! queues declared by a Warren older than its RabbitMQ 4.x work lack `x-delivery-limit`) and
//! when an operator changes a work queue's settings (`delivery_limit`, `type`). For such a
//! queue `Q`, with no consumer on it (the workers stopped):
//!
//! 1. declare `warren.migrate.Q` ([`topology::migration_queue`]), quorum, and unbind `Q` from
//!    the exchanges that route into it, so nothing new arrives (a submit to it fails as
//!    unroutable, and says so; a delayed job meanwhile goes to `warren.unroutable`);
//! 2. move every message of `Q` there: `basic.get`, publish the same body and properties
//!    (less the broker's delivery counts) with a confirm, then ack;
//! 3. delete `Q` (now empty), declare the topology again (which creates `Q` with Warren's
//!    arguments and bindings), move the messages back, delete `warren.migrate.Q`.
//!
//! Each message is acked only once its copy is confirmed, so a crash at any point loses
//! nothing (at worst a message is in both queues). A later run finishes what an interrupted one
//! left in a `warren.migrate.*` queue.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use warren_core::envelope::{ACQUIRED_COUNT, DELIVERY_COUNT};
use warren_core::publish::{self, PublishError};
use warren_core::topology::{self, Declared, TopologyError};

use crate::{ApplyError, Dispatcher, LinkError};

/// One queue replaced by [`Dispatcher::migrate_topology`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Migrated {
    pub queue: String,
    /// Messages moved out and back in.
    pub messages: u64,
    /// Why it was replaced: the broker's words.
    pub reason: String,
}

/// Why a migration stopped. What was moved so far stays in `warren.migrate.<queue>`; running
/// the migration again finishes it.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(
        "queue `{queue}` has {consumers} consumer(s): stop the workers consuming it, then run \
         `warren topology migrate` again"
    )]
    Consumers { queue: String, consumers: u32 },
    #[error("{what}: {source}")]
    Broker { what: String, source: lapin::Error },
    #[error("moving a message of `{from}` to `{to}`: {source}")]
    Publish {
        from: String,
        to: String,
        source: PublishError,
    },
    #[error("queue `{0}` still differs after it was migrated")]
    Stuck(String),
    #[error("{0}: no answer from the broker within 60 s")]
    Timeout(String),
    #[error(transparent)]
    Name(#[from] topology::NameError),
}

impl Dispatcher {
    /// Declares the shared topology and `queues` (like [`Dispatcher::apply_topology`]), and
    /// replaces every Warren queue that differs from what Warren declares, keeping its messages
    /// (see the module documentation). `progress` is told of each queue replaced.
    pub async fn migrate_topology(
        &self,
        queues: &[String],
        mut progress: impl FnMut(&Migrated),
    ) -> Result<(Vec<Declared>, Vec<Migrated>), MigrateError> {
        let owned = warren_queues(queues);
        // The queues emptied into their migration queue, with the broker's reason.
        let mut replaced: Vec<(String, String)> = Vec::new();
        let declared = loop {
            match self.apply_topology(queues).await {
                Ok(declared) => break declared,
                Err(ApplyError::Topology(TopologyError::Mismatch {
                    what: "queue",
                    name,
                    detail,
                })) if owned.contains(&name) => {
                    if replaced.iter().any(|(queue, _)| *queue == name) {
                        return Err(MigrateError::Stuck(name));
                    }
                    self.empty_into_migration_queue(&name).await?;
                    replaced.push((name, detail));
                }
                Err(err) => return Err(err.into()),
            }
        };
        // Back into the new queues; also what an interrupted run left behind.
        let channel = self.confirm_channel().await?;
        let mut migrated = Vec::new();
        for queue in &owned {
            let parked = topology::migration_queue(queue);
            if !self.queue_exists(&parked).await? {
                continue;
            }
            let messages = move_all(self, &channel, &parked, queue).await?;
            call(
                "deleting the migration queue",
                channel.queue_delete(parked.as_str().into(), QueueDeleteOptions::default()),
            )
            .await?;
            let reason = replaced
                .iter()
                .find(|(name, _)| name == queue)
                .map_or("an interrupted migration was finished", |(_, detail)| {
                    detail
                });
            let done = Migrated {
                queue: queue.clone(),
                messages,
                reason: reason.to_owned(),
            };
            progress(&done);
            migrated.push(done);
        }
        let _ = channel.close(200, "migrated".into()).await;
        Ok((declared, migrated))
    }

    /// Steps 1 and 2 for `queue`, and the deletion of the emptied queue.
    async fn empty_into_migration_queue(&self, queue: &str) -> Result<(), MigrateError> {
        let channel = self.confirm_channel().await?;
        let state = call(
            &format!("reading queue `{queue}`"),
            channel.queue_declare(queue.into(), passive(), FieldTable::default()),
        )
        .await?;
        if state.consumer_count() > 0 {
            return Err(MigrateError::Consumers {
                queue: queue.to_owned(),
                consumers: state.consumer_count(),
            });
        }
        let parked = topology::migration_queue(queue);
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        call(
            &format!("declaring `{parked}`"),
            channel.queue_declare(
                parked.as_str().into(),
                durable,
                topology::migration_queue_arguments(),
            ),
        )
        .await?;
        for (exchange, key) in topology::bindings_of(queue) {
            call(
                &format!("unbinding `{queue}` from `{exchange}`"),
                channel.queue_unbind(
                    queue.into(),
                    exchange.as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }
        move_all(self, &channel, queue, &parked).await?;
        call(
            &format!("deleting the old `{queue}`"),
            channel.queue_delete(queue.into(), QueueDeleteOptions::default()),
        )
        .await?;
        let _ = channel.close(200, "queue emptied".into()).await;
        Ok(())
    }

    async fn confirm_channel(&self) -> Result<Channel, MigrateError> {
        let channel = self.open_channel().await?;
        call(
            "enabling publisher confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(channel)
    }

    /// Whether `queue` exists (a passive declare, on a channel of its own: a missing queue
    /// closes the channel).
    async fn queue_exists(&self, queue: &str) -> Result<bool, MigrateError> {
        let channel = self.open_channel().await?;
        let found = channel
            .queue_declare(queue.into(), passive(), FieldTable::default())
            .await
            .is_ok();
        if found {
            let _ = channel.close(200, "checked".into()).await;
        }
        Ok(found)
    }
}

/// The queues a migration may replace: the work queues, their dead-letter queues and
/// `warren.unroutable`. Never the shared delay levels, never anyone else's queue.
fn warren_queues(queues: &[String]) -> Vec<String> {
    let mut owned = vec![topology::UNROUTABLE.to_owned()];
    for queue in queues {
        owned.push(topology::dead_queue(queue));
        owned.push(queue.clone());
    }
    owned
}

/// Moves every message of `from` to `to` (through the default exchange), one at a time: each
/// is acked only once its copy is confirmed. Returns how many were moved.
async fn move_all(
    dispatcher: &Dispatcher,
    channel: &Channel,
    from: &str,
    to: &str,
) -> Result<u64, MigrateError> {
    let timeout = dispatcher.config().broker.operation_timeout;
    let mut moved = 0;
    loop {
        let got = call(
            &format!("reading `{from}`"),
            channel.basic_get(from.into(), BasicGetOptions { no_ack: false }),
        )
        .await?;
        let Some(message) = got else {
            return Ok(moved);
        };
        let delivery = message.delivery;
        let properties = without_delivery_counts(delivery.properties.clone());
        let publish_error = |source| MigrateError::Publish {
            from: from.to_owned(),
            to: to.to_owned(),
            source,
        };
        let key = topology::short(to)?;
        publish::publish(channel, "", key, &delivery.data, properties, timeout)
            .await
            .map_err(publish_error)?;
        call(
            &format!("acking a message of `{from}`"),
            delivery.acker.ack(BasicAckOptions::default()),
        )
        .await?;
        moved += 1;
    }
}

/// The properties less `x-delivery-count` and `x-acquired-count`: the old queue's bookkeeping,
/// which would count against the message in its new queue.
fn without_delivery_counts(properties: BasicProperties) -> BasicProperties {
    let Some(headers) = properties.headers().clone() else {
        return properties;
    };
    let mut kept = FieldTable::default();
    for (key, value) in headers.inner() {
        if key.as_str() != ACQUIRED_COUNT && key.as_str() != DELIVERY_COUNT {
            kept.insert(key.clone(), value.clone());
        }
    }
    properties.with_headers(kept)
}

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    }
}

/// A broker call with a generous deadline, its error saying what it was doing.
async fn call<T>(
    what: &str,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T, MigrateError> {
    match tokio::time::timeout(Duration::from_secs(60), future).await {
        Ok(result) => result.map_err(|source| MigrateError::Broker {
            what: what.to_owned(),
            source,
        }),
        Err(_) => Err(MigrateError::Timeout(what.to_owned())),
    }
}
