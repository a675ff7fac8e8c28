//! `warren status`: what each queue holds and how fast it moves, from two sources that differ
//! in how true their numbers are.
//!
//! - **AMQP, counted now**: a passive `queue.declare` answers with the queue's ready messages
//!   and its consumers at that moment, from the queue itself. Ready jobs, consumers, the
//!   dead-letter queue's depth and the jobs waiting in the delay levels come from there.
//! - **The management HTTP API, sampled** ([`crate::management`]): unacked deliveries, publish
//!   and deliver rates and the age of the oldest job are only known there, and the broker
//!   refreshes them every `collect_statistics_interval` (5 s by default; quorum queues report
//!   later still, so right after four jobs were dead-lettered the API may still say 0). Every
//!   [`QueueStatus`] lists which of its numbers are sampled.
//!
//! When one source cannot be reached the other still answers: without the API, the AMQP
//! counts are shown and the sampled columns are unknown (`None`); without AMQP, the API's
//! sampled counts stand in and are labelled so.
//!
//! The delay levels (`warren.delay.NN`) are shared by every work queue and the broker does not
//! tell which queue a waiting job is for (that is in its routing key, which only reading the
//! message shows, and reading a TTL queue would disturb it), so status reports their total,
//! once, as [`DelayLevels`], never per queue.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;
use warren_core::{delay, topology};

use crate::Dispatcher;
use crate::management::{Management, ManagementError, QueueInfo};

/// What `warren status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The management API (and UI): its address, and whether it answered.
    pub management: Source,
    /// The AMQP connection: whether it answered.
    pub amqp: Source,
    /// One row per queue asked about, in the order asked.
    pub queues: Vec<QueueStatus>,
    pub delay_levels: DelayLevels,
}

/// One source of numbers and whether it answered.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    /// The management API's address (no credentials), or broker.url with its password masked
    /// (`None` when the connection failed before it was known).
    pub address: Option<String>,
    pub reachable: bool,
    /// Why not, when it did not answer.
    pub error: Option<String>,
}

/// One work queue. A number is `None` when no source could tell it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueStatus {
    pub queue: String,
    /// Whether the queue exists (`None`: neither source could tell).
    pub exists: Option<bool>,
    /// Messages ready for delivery.
    pub ready: Option<u64>,
    /// Messages delivered to consumers and not yet acknowledged (sampled).
    pub unacked: Option<u64>,
    pub consumers: Option<u64>,
    /// Messages published into the queue per second (sampled).
    pub publish_rate: Option<f64>,
    /// Messages delivered (or fetched) per second (sampled).
    pub deliver_rate: Option<f64>,
    /// Ready messages in `<queue>.dead`.
    pub dead: Option<u64>,
    /// Seconds since the oldest ready job was published (sampled; classic queues only, from
    /// the `timestamp` of the message at the head).
    pub oldest_age_secs: Option<u64>,
    /// The fields above that come from the management API's samples rather than from a count
    /// made now over AMQP.
    pub sampled: Vec<&'static str>,
}

/// The jobs waiting in the delay levels, for every queue together.
#[derive(Debug, Clone, Serialize)]
pub struct DelayLevels {
    /// Messages in all `warren.delay.NN` queues (retries and delayed jobs, for all queues).
    pub messages: Option<u64>,
    /// Whether `messages` is sampled (the API) rather than counted now (AMQP).
    pub sampled: bool,
    /// Levels that do not exist (the topology was never applied in this vhost).
    pub missing_levels: Vec<String>,
}

/// Collects the status of `queues`: counted over AMQP through `amqp` (or, when the
/// connection failed, `Err` with the reason, shown as it is) and sampled from the
/// management API. Never fails: what a source could not tell is `None`, and each source says
/// whether it answered.
pub async fn collect(
    amqp: Result<&Dispatcher, String>,
    management: &Management,
    queues: &[String],
) -> Status {
    let (counts, amqp_source) = match amqp {
        Ok(dispatcher) => {
            let url = warren_core::secret::mask_url(&dispatcher.config().broker.url);
            match count_now(dispatcher, queues).await {
                Ok(counts) => (Some(counts), reachable(Some(url))),
                Err(reason) => (None, unreachable(Some(url), reason)),
            }
        }
        Err(reason) => (None, unreachable(None, reason)),
    };
    let (samples, management_source) = sample(management, queues, counts.is_none()).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rows = queues
        .iter()
        .enumerate()
        .map(|(i, queue)| {
            let counted = counts.as_ref().map(|c| &c.queues[i]);
            let sampled = samples.as_ref().map(|s| (&s.queues[i], s.rates));
            row(queue, counted, sampled, now)
        })
        .collect();
    let delay_levels = match (&counts, &samples) {
        (Some(counts), _) => DelayLevels {
            messages: Some(counts.delayed),
            sampled: false,
            missing_levels: counts.missing_levels.clone(),
        },
        (None, Some(samples)) => DelayLevels {
            messages: samples.delayed,
            sampled: true,
            missing_levels: samples.missing_levels.clone(),
        },
        (None, None) => DelayLevels {
            messages: None,
            sampled: false,
            missing_levels: Vec::new(),
        },
    };
    Status {
        management: Source {
            address: Some(management.address().to_owned()),
            ..management_source
        },
        amqp: amqp_source,
        queues: rows,
        delay_levels,
    }
}

fn reachable(address: Option<String>) -> Source {
    Source {
        address,
        reachable: true,
        error: None,
    }
}

fn unreachable(address: Option<String>, reason: String) -> Source {
    Source {
        address,
        reachable: false,
        error: Some(reason),
    }
}

/// What passive declares said.
struct Counts {
    queues: Vec<Counted>,
    delayed: u64,
    missing_levels: Vec<String>,
}

/// One queue's AMQP counts: `None` for a queue that does not exist (or may not be seen).
struct Counted {
    work: Option<(u64, u64)>,
    dead: Option<u64>,
    /// Why a passive declare failed other than "not found" (say `ACCESS_REFUSED`).
    refused: bool,
}

/// Passive declares of every queue, its dead-letter queue and the delay levels.
async fn count_now(dispatcher: &Dispatcher, queues: &[String]) -> Result<Counts, String> {
    let mut probe = Probe {
        dispatcher,
        channel: None,
    };
    let mut counted = Vec::with_capacity(queues.len());
    for queue in queues {
        let work = probe.declare(queue).await?;
        let dead = probe.declare(&topology::dead_queue(queue)).await?;
        counted.push(Counted {
            refused: matches!(work, Probed::Refused),
            work: work.counts(),
            dead: dead.counts().map(|(ready, _)| ready),
        });
    }
    let mut delayed = 0;
    let mut missing_levels = Vec::new();
    for level in 0..delay::LEVELS {
        let name = topology::delay_level(level);
        match probe.declare(&name).await?.counts() {
            Some((ready, _)) => delayed += ready,
            None => missing_levels.push(name),
        }
    }
    probe.close().await;
    Ok(Counts {
        queues: counted,
        delayed,
        missing_levels,
    })
}

/// Passive declares on one channel, opened again after the broker closed it (a queue that
/// does not exist closes the channel).
struct Probe<'a> {
    dispatcher: &'a Dispatcher,
    channel: Option<lapin::Channel>,
}

enum Probed {
    /// (ready messages, consumers)
    Found(u64, u64),
    Missing,
    Refused,
}

impl Probed {
    fn counts(&self) -> Option<(u64, u64)> {
        match self {
            Probed::Found(ready, consumers) => Some((*ready, *consumers)),
            _ => None,
        }
    }
}

impl Probe<'_> {
    async fn declare(&mut self, queue: &str) -> Result<Probed, String> {
        let channel = match self.channel.take() {
            Some(channel) if channel.status().connected() => channel,
            _ => self
                .dispatcher
                .open_channel()
                .await
                .map_err(|err| warren_core::error_chain(&err))?,
        };
        let Ok(name) = topology::short(queue) else {
            self.channel = Some(channel);
            return Ok(Probed::Missing);
        };
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let timeout = self.dispatcher.config().broker.operation_timeout;
        let answer = tokio::time::timeout(
            timeout,
            channel.queue_declare(name, passive, FieldTable::default()),
        )
        .await
        .map_err(|_| format!("no answer to a passive declare within {timeout:?}"))?;
        match answer {
            Ok(declared) => {
                self.channel = Some(channel);
                Ok(Probed::Found(
                    u64::from(declared.message_count()),
                    u64::from(declared.consumer_count()),
                ))
            }
            Err(err) if topology::is_access_refused(&err) => Ok(Probed::Refused),
            Err(err) if is_not_found(&err) => Ok(Probed::Missing),
            Err(err) => Err(format!("passive declare of `{queue}`: {err}")),
        }
    }

    async fn close(self) {
        if let Some(channel) = self.channel {
            let _ = channel.close(200, "status done".into()).await;
        }
    }
}

fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

/// What the API said.
struct Samples {
    queues: Vec<Sampled>,
    /// Delay levels' messages, only asked for when AMQP did not answer.
    delayed: Option<u64>,
    missing_levels: Vec<String>,
    /// Whether the broker keeps rates at all.
    rates: bool,
}

struct Sampled {
    work: Option<QueueInfo>,
    dead: Option<QueueInfo>,
}

/// Asks the API about every queue (and, when `delay_too`, the delay levels); the first error
/// ends it, and is what the status shows.
async fn sample(
    management: &Management,
    queues: &[String],
    delay_too: bool,
) -> (Option<Samples>, Source) {
    let address = Some(management.address().to_owned());
    let failed = |err: ManagementError| (None, unreachable(address.clone(), err.to_string()));
    let overview = match management.overview().await {
        Ok(overview) => overview,
        Err(err) => return failed(err),
    };
    let asked = join_all(queues.iter().map(|queue| async move {
        let work = management.queue(queue).await?;
        let dead = management.queue(&topology::dead_queue(queue)).await?;
        Ok::<_, ManagementError>(Sampled { work, dead })
    }))
    .await;
    let mut sampled = Vec::with_capacity(queues.len());
    for answer in asked {
        match answer {
            Ok(one) => sampled.push(one),
            Err(err) => return failed(err),
        }
    }
    let (mut delayed, mut missing_levels) = (None, Vec::new());
    if delay_too {
        let levels = join_all((0..delay::LEVELS).map(|level| async move {
            let name = topology::delay_level(level);
            (management.queue(&name).await, name)
        }))
        .await;
        let mut total = 0;
        for (answer, name) in levels {
            match answer {
                Ok(Some(info)) => total += info.messages.unwrap_or(0),
                Ok(None) => missing_levels.push(name),
                Err(err) => return failed(err),
            }
        }
        delayed = Some(total);
    }
    let samples = Samples {
        queues: sampled,
        delayed,
        missing_levels,
        rates: overview.has_rates(),
    };
    (Some(samples), reachable(address))
}

/// One row from what each source said.
///
/// `sampled`: what the API said of this queue, and whether the broker keeps rates.
fn row(
    queue: &str,
    counted: Option<&Counted>,
    sampled: Option<(&Sampled, bool)>,
    now: u64,
) -> QueueStatus {
    let info = sampled.and_then(|(q, _)| q.work.as_ref());
    let dead_info = sampled.and_then(|(q, _)| q.dead.as_ref());
    let rates = sampled.is_some_and(|(_, rates)| rates);
    let mut labels = Vec::new();
    // Counted now where AMQP could see the queue; else the API's sample, labelled.
    let work_counts = counted.and_then(|c| c.work);
    let (ready, consumers) = match (work_counts, info) {
        (Some((ready, consumers)), _) => (Some(ready), Some(consumers)),
        (None, Some(info)) => {
            labels.extend(["ready", "consumers"]);
            (info.messages_ready, info.consumers)
        }
        (None, None) => (None, None),
    };
    let dead = match (counted.and_then(|c| c.dead), dead_info) {
        (Some(dead), _) => Some(dead),
        (None, Some(info)) => {
            labels.push("dead");
            info.messages_ready
        }
        (None, None) => None,
    };
    let exists = match (counted, sampled) {
        (Some(c), _) if c.work.is_some() => Some(true),
        (_, Some(_)) => Some(info.is_some()),
        (Some(c), None) if !c.refused => Some(false),
        _ => None,
    };
    let unacked = info.and_then(|i| i.messages_unacknowledged);
    let publish_rate = info
        .filter(|_| rates)
        .map(|i| i.publish_rate().unwrap_or(0.0));
    let deliver_rate = info
        .filter(|_| rates)
        .map(|i| i.deliver_rate().unwrap_or(0.0));
    let oldest_age_secs = info
        .and_then(QueueInfo::head_timestamp)
        .and_then(|ts| u64::try_from(ts).ok())
        .map(|ts| now.saturating_sub(ts));
    if info.is_some() {
        labels.push("unacked");
        if rates {
            labels.extend(["publish_rate", "deliver_rate"]);
        }
        if oldest_age_secs.is_some() {
            labels.push("oldest_age_secs");
        }
    }
    QueueStatus {
        queue: queue.to_owned(),
        exists,
        ready,
        unacked,
        consumers,
        publish_rate,
        deliver_rate,
        dead,
        oldest_age_secs,
        sampled: labels,
    }
}
