//! A long-lived waiter for jobs' outcomes: what the HTTP API (`warren serve`) submits through,
//! so that `GET /v1/jobs/{id}/wait` can tell any job it submitted.
//!
//! [`Dispatcher::submit_and_wait`] opens a reply channel per job; a service that submits
//! thousands of jobs and is asked about some of them later keeps one instead:
//!
//! 1. a channel of its own, on the dispatcher's connection, in confirm mode, consumes the
//!    direct reply-to pseudo-queue `amq.rabbitmq.reply-to` (no-ack) for the waiter's whole
//!    life, and is reopened when the connection was lost;
//! 2. [`Waiter::submit`] records the job id as pending, then publishes the job on that channel
//!    with `reply_to = amq.rabbitmq.reply-to` (confirmed and routed, as any submit);
//! 3. a reply whose `correlation_id` is a recorded id settles that id's entry ([`Waiter::wait`]
//!    hands it out, as often as asked, until the entry expires);
//! 4. entries are kept for [`WaiterSettings::ttl`] and at most [`WaiterSettings::capacity`]
//!    of them (the oldest go first), so the map never grows without bound.
//!
//! As with `submit --wait`, nothing is stored on the broker: a reply sent while the reply
//! channel was down is lost (its entry stays pending until it expires), and a job the broker
//! dead-letters by itself (its delivery limit) sends none.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::Channel;
use tokio::sync::watch;
use warren_core::config::Config;
use warren_core::connection::Connector;
use warren_core::envelope::{JobId, NewJob};
use warren_core::reply::{DIRECT_REPLY_TO, Reply};

use crate::link::{Link, Links};
use crate::{Dispatcher, DispatcherError, LinkError, SubmitError};

impl Dispatcher {
    /// A dispatcher that connects on its first use rather than now: for a long-running
    /// service that must start (and answer 503) while the broker is away.
    pub fn lazy(config: &Config) -> Result<Dispatcher, DispatcherError> {
        let name = format!("warren-dispatcher pid={}", std::process::id());
        let links = Links::new(
            Connector::new(&config.broker)?,
            name,
            config.broker.operation_timeout,
        );
        Ok(Dispatcher {
            links,
            config: config.clone(),
            known_queues: Default::default(),
        })
    }
}

/// How many outcomes a [`Waiter`] keeps, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct WaiterSettings {
    /// At most this many job ids are remembered; the oldest is forgotten first.
    pub capacity: usize,
    /// A job id is forgotten this long after it was submitted.
    pub ttl: Duration,
}

impl Default for WaiterSettings {
    fn default() -> Self {
        WaiterSettings {
            capacity: 100_000,
            ttl: Duration::from_secs(3600),
        }
    }
}

/// Where a job's outcome stands, as far as the waiter knows.
#[derive(Debug, Clone, PartialEq)]
pub enum Waited {
    /// The outcome came: done (the handler's result) or failed (class, reason, attempts).
    Outcome(Reply),
    /// Submitted here, no outcome yet (within the time asked).
    Pending,
    /// Not submitted through this waiter, or forgotten (see [`WaiterSettings`]).
    Unknown,
}

/// Submits jobs with a reply address and hands out their outcomes by job id (see the
/// [module docs](self)).
pub struct Waiter {
    dispatcher: Arc<Dispatcher>,
    /// The reply channel and the link it lives on; replaced when it is no longer usable.
    reply: tokio::sync::Mutex<Option<(Link, Channel)>>,
    outcomes: Arc<Mutex<Outcomes>>,
}

impl Waiter {
    pub fn new(dispatcher: Arc<Dispatcher>, settings: WaiterSettings) -> Waiter {
        Waiter {
            dispatcher,
            reply: tokio::sync::Mutex::new(None),
            outcomes: Arc::new(Mutex::new(Outcomes::new(settings))),
        }
    }

    /// The dispatcher it submits through.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Submits `job` (its `reply_to` set to the waiter's address) and returns its id once the
    /// broker confirmed it; from then on [`Waiter::wait`] knows the id.
    pub async fn submit(&self, mut job: NewJob) -> Result<JobId, SubmitError> {
        let (link, channel) = self.reply_channel().await?;
        let id = match job.id.clone() {
            Some(id) => JobId(id),
            None => JobId::generate(),
        };
        job.id = Some(id.0.clone());
        job.reply_to = Some(DIRECT_REPLY_TO.to_owned());
        // Recorded first: a quick worker may reply before the confirm arrives.
        let ticket = self.lock().insert(&id.0);
        match self.dispatcher.submit_on(&link, &channel, job).await {
            Ok(id) => Ok(id),
            Err(err) => {
                self.lock().remove(&id.0, ticket);
                Err(err)
            }
        }
    }

    /// Opens the connection and the reply channel if they are not open (what the first
    /// submit would do), so that a caller can bound how long that may take.
    pub async fn connect(&self) -> Result<(), LinkError> {
        self.reply_channel().await.map(|_| ())
    }

    /// Waits up to `timeout` for the outcome of job `id`.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Waited {
        let Some(mut outcome) = self.lock().watch(id) else {
            return Waited::Unknown;
        };
        let arrived = tokio::time::timeout(timeout, outcome.wait_for(Option::is_some)).await;
        match arrived {
            Ok(Ok(reply)) => match reply.as_ref() {
                Some(reply) => Waited::Outcome(reply.clone()),
                None => Waited::Pending,
            },
            // Timed out, or the entry was forgotten meanwhile.
            _ => Waited::Pending,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outcomes> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.outcomes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live reply channel, opened (with its consumer) on the dispatcher's current
    /// connection when there is none or the last one closed.
    async fn reply_channel(&self) -> Result<(Link, Channel), LinkError> {
        let mut reply = self.reply.lock().await;
        if let Some((link, channel)) = reply.as_ref()
            && link.connection.status().connected()
            && channel.status().connected()
        {
            return Ok((link.clone(), channel.clone()));
        }
        let link = self.dispatcher.links.current().await?;
        let (channel, consumer) = crate::wait::reply_channel(
            &link.connection,
            self.dispatcher.config.broker.operation_timeout,
        )
        .await?;
        let outcomes = Arc::clone(&self.outcomes);
        tokio::spawn(route_replies(consumer, outcomes));
        *reply = Some((link.clone(), channel.clone()));
        Ok((link, channel))
    }
}

/// Hands each reply to the entry of its `correlation_id`, until the channel closes.
async fn route_replies(mut consumer: lapin::Consumer, outcomes: Arc<Mutex<Outcomes>>) {
    while let Some(delivery) = consumer.next().await {
        let Ok(delivery) = delivery else { break };
        let Some(id) = delivery.properties.correlation_id().as_ref() else {
            continue;
        };
        let reply = match Reply::decode(&delivery.data) {
            Ok(reply) => reply,
            Err(err) => {
                tracing::warn!(job = %id, error = %err, "ignoring a reply that is not a Warren result");
                continue;
            }
        };
        let outcomes = outcomes.lock().unwrap_or_else(|p| p.into_inner());
        outcomes.settle(id.as_str(), reply);
    }
    tracing::debug!("the reply consumer ended; the next submit opens a new one");
}

/// The job ids submitted, each with its outcome once known; bounded in size and age.
struct Outcomes {
    settings: WaiterSettings,
    entries: HashMap<String, Entry>,
    /// Ids in submit order, with the ticket of the entry they were pushed for: an id
    /// submitted again gets a new entry, and the old ticket no longer removes it.
    order: VecDeque<(String, u64, Instant)>,
    next_ticket: u64,
}

struct Entry {
    ticket: u64,
    outcome: watch::Sender<Option<Reply>>,
}

impl Outcomes {
    fn new(settings: WaiterSettings) -> Outcomes {
        Outcomes {
            settings,
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_ticket: 0,
        }
    }

    /// Records `id` as pending (again, if it was known); returns the entry's ticket.
    fn insert(&mut self, id: &str) -> u64 {
        self.expire();
        while self.entries.len() >= self.settings.capacity.max(1) {
            if !self.pop_oldest() {
                break;
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let (outcome, _) = watch::channel(None);
        self.entries
            .insert(id.to_owned(), Entry { ticket, outcome });
        self.order
            .push_back((id.to_owned(), ticket, Instant::now()));
        ticket
    }

    fn remove(&mut self, id: &str, ticket: u64) {
        if self.entries.get(id).is_some_and(|e| e.ticket == ticket) {
            self.entries.remove(id);
        }
    }

    fn watch(&mut self, id: &str) -> Option<watch::Receiver<Option<Reply>>> {
        self.expire();
        self.entries.get(id).map(|e| e.outcome.subscribe())
    }

    fn settle(&self, id: &str, reply: Reply) {
        if let Some(entry) = self.entries.get(id) {
            entry.outcome.send_replace(Some(reply));
        }
    }

    fn expire(&mut self) {
        let ttl = self.settings.ttl;
        while self
            .order
            .front()
            .is_some_and(|(_, _, at)| at.elapsed() >= ttl)
        {
            self.pop_oldest();
        }
    }

    /// Forgets the oldest id; false when there is none.
    fn pop_oldest(&mut self) -> bool {
        let Some((id, ticket, _)) = self.order.pop_front() else {
            return false;
        };
        self.remove(&id, ticket);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::reply::Outcome;

    fn done(id: &str) -> Reply {
        Reply {
            id: id.to_owned(),
            attempts: 1,
            outcome: Outcome::Done {
                result: serde_json::json!({"ok": true}),
                result_omitted: None,
            },
        }
    }

    #[test]
    fn an_outcome_settles_its_entry_and_unknown_ids_stay_unknown() {
        let mut outcomes = Outcomes::new(WaiterSettings::default());
        outcomes.insert("a");
        outcomes.settle("b", done("b"));
        assert!(outcomes.watch("b").is_none());
        outcomes.settle("a", done("a"));
        let seen = outcomes.watch("a").expect("a is known");
        assert_eq!(*seen.borrow(), Some(done("a")));
    }

    #[test]
    fn the_map_is_bounded_and_the_oldest_goes_first() {
        let mut outcomes = Outcomes::new(WaiterSettings {
            capacity: 2,
            ttl: Duration::from_secs(60),
        });
        outcomes.insert("a");
        outcomes.insert("b");
        outcomes.insert("c");
        assert!(outcomes.watch("a").is_none());
        assert!(outcomes.watch("b").is_some() && outcomes.watch("c").is_some());
        assert!(outcomes.entries.len() <= 2);
    }

    #[test]
    fn entries_expire_and_a_resubmitted_id_keeps_its_new_entry() {
        let mut outcomes = Outcomes::new(WaiterSettings {
            capacity: 10,
            ttl: Duration::ZERO,
        });
        outcomes.insert("a");
        assert!(outcomes.watch("a").is_none(), "expired at once");
        let mut outcomes = Outcomes::new(WaiterSettings::default());
        let first = outcomes.insert("a");
        let _second = outcomes.insert("a");
        outcomes.remove("a", first);
        assert!(outcomes.watch("a").is_some(), "the new entry stays");
    }
}
