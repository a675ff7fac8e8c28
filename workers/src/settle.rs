//! Acks in batches: one `basic.ack` with `multiple = true` for every run of finished
//! deliveries, instead of one ack per job.
//!
//! Each consumer channel has one [`Settler`], a task that owns every ack and nack of that
//! channel. A job task hands its delivery over when it is finished — done, or its retry or
//! dead letter confirmed by the broker ([`crate::job`]) — and goes on; the settler sends:
//!
//! - for a run of finished deliveries with consecutive tags starting at the lowest unsettled
//!   one: a single ack of the run's last tag with `multiple = true` (AMQP delivery tags of a
//!   channel count 1, 2, 3, ... and a multiple ack settles every tag up to it);
//! - for a delivery to hand back (its retry could not be queued): a single `nack` with requeue;
//! - for deliveries finished behind one that is still running (a slow job blocks the run):
//!   single acks after [`GAP_LINGER`], so a slow job never holds its neighbours' prefetch
//!   slots.
//!
//! The settler sends whenever it has taken in everything the job tasks handed over so far: at
//! low load that is one ack per job at once, under load the batches grow by themselves. It
//! counts each job's outcome once its ack is sent, and acks it could not send (the channel is
//! gone: the broker requeues those jobs itself) as lost.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::ShortString;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::job::{Outcome, Stats};

/// How long deliveries finished behind a still-running one wait before they are acked one by
/// one (the gap usually closes within microseconds: jobs end slightly out of order).
pub(crate) const GAP_LINGER: Duration = Duration::from_millis(10);

/// Most deliveries taken in before sending what is ready.
const MAX_INTAKE: usize = 1024;

/// Called once per job when its settlement was sent (or could not be): for metrics and the
/// benchmark's latency figures.
pub type SettleHook = Arc<dyn Fn(&Settled<'_>) + Send + Sync>;

/// One job's settlement, as seen by a [`SettleHook`].
#[derive(Debug)]
pub struct Settled<'a> {
    /// The job id (`message_id`), if the message had one.
    pub id: Option<&'a str>,
    /// How the job ended: `"done"`, `"retry scheduled"`, `"dead-lettered"` or `"requeued"`.
    pub outcome: &'static str,
    /// False when the ack could not be sent (the broker will deliver the job again).
    pub sent: bool,
}

/// How a finished delivery is to be settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done, or its replacement (retry, dead letter) is safely queued.
    Ack,
    /// Hand it back to the queue for redelivery.
    Requeue,
}

/// A finished delivery, handed from its job task to its channel's settler.
pub(crate) struct Finished {
    pub tag: u64,
    pub acker: Acker,
    pub settle: Settle,
    pub outcome: Outcome,
    /// Kept only when a [`SettleHook`] wants it.
    pub id: Option<ShortString>,
}

/// The job tasks' handle on their channel's settler task. Cheap to clone; the task ends (after
/// sending what it can) once every handle is dropped.
#[derive(Clone)]
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<Finished>,
    keep_ids: bool,
}

impl Settler {
    /// Creates the settler of a fresh channel (its first delivery tag is 1) and the task to
    /// spawn that runs it.
    pub fn new(
        stats: Arc<Stats>,
        hook: Option<SettleHook>,
        timeout: Duration,
    ) -> (Settler, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let settler = Settler {
            tx,
            keep_ids: hook.is_some(),
        };
        let window = Window {
            base: 1,
            slots: VecDeque::new(),
            stats,
            hook,
            timeout,
        };
        (settler, run(rx, window))
    }

    /// Whether [`Finished::id`] is wanted.
    pub fn keeps_ids(&self) -> bool {
        self.keep_ids
    }

    /// Hands a finished delivery over. If the settler is gone (its channel's session ended), the
    /// broker has requeued the delivery already; it is counted as an ack lost.
    pub fn finish(&self, finished: Finished, stats: &Stats) {
        if self.tx.send(finished).is_err() {
            stats.acks_lost.fetch_add(1, Ordering::Relaxed);
            stats.requeued.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The settler task: take in finished deliveries, send what is ready, repeat.
async fn run(mut rx: mpsc::UnboundedReceiver<Finished>, mut window: Window) {
    let mut gap_deadline: Option<Instant> = None;
    loop {
        let received = match gap_deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, rx.recv()).await.ok(),
            None => Some(rx.recv().await),
        };
        match received {
            Some(Some(first)) => {
                window.insert(first);
                for _ in 1..MAX_INTAKE {
                    match rx.try_recv() {
                        Ok(more) => window.insert(more),
                        Err(_) => break,
                    }
                }
                window.send_ready().await;
            }
            // Every job task is gone: settle whatever is left, one by one if need be.
            Some(None) => {
                window.send_ready().await;
                window.send_behind_gap().await;
                return;
            }
            // A gap has lasted GAP_LINGER: ack what waits behind it one by one.
            None => {
                window.send_behind_gap().await;
                window.send_ready().await;
                gap_deadline = None;
            }
        }
        if gap_deadline.is_none() && window.waits_behind_gap() {
            gap_deadline = Some(Instant::now() + GAP_LINGER);
        }
    }
}

/// The unsettled deliveries of one channel, from the lowest unsettled tag up.
struct Window {
    /// Tag of `slots[0]`; every tag below it is settled.
    base: u64,
    slots: VecDeque<Slot>,
    stats: Arc<Stats>,
    hook: Option<SettleHook>,
    timeout: Duration,
}

enum Slot {
    /// Delivered; its job still runs.
    Running,
    Finished(Finished),
    /// Acked on its own, behind a gap.
    Sent,
}

impl Window {
    fn insert(&mut self, finished: Finished) {
        let Some(index) = finished
            .tag
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
        else {
            // Cannot happen: each tag is finished once. Settle it alone rather than lose it.
            tracing::error!(tag = finished.tag, "delivery finished twice; ignoring");
            return;
        };
        if self.slots.len() <= index {
            self.slots.resize_with(index + 1, || Slot::Running);
        }
        self.slots[index] = Slot::Finished(finished);
    }

    /// Sends everything settled from the front: each run of finished acks as one multiple
    /// ack, each requeue as its own nack.
    async fn send_ready(&mut self) {
        loop {
            while matches!(self.slots.front(), Some(Slot::Sent)) {
                self.pop();
            }
            let run = self
                .slots
                .iter()
                .take_while(|slot| matches!(slot, Slot::Finished(f) if f.settle == Settle::Ack))
                .count();
            if run > 0 {
                let batch: Vec<Finished> = (0..run).filter_map(|_| self.pop()).collect();
                self.ack(batch, true).await;
                continue;
            }
            match self.slots.front() {
                Some(Slot::Finished(f)) if f.settle == Settle::Requeue => {
                    if let Some(finished) = self.pop() {
                        self.requeue(finished).await;
                    }
                }
                _ => return,
            }
        }
    }

    /// Whether finished deliveries wait behind a running one.
    fn waits_behind_gap(&self) -> bool {
        self.slots
            .iter()
            .any(|slot| matches!(slot, Slot::Finished(_)))
    }

    /// Settles, one by one, the finished deliveries behind the running one at the front.
    async fn send_behind_gap(&mut self) {
        for index in 0..self.slots.len() {
            if !matches!(self.slots[index], Slot::Finished(_)) {
                continue;
            }
            let Slot::Finished(finished) = std::mem::replace(&mut self.slots[index], Slot::Sent)
            else {
                continue;
            };
            match finished.settle {
                Settle::Ack => self.ack(vec![finished], false).await,
                Settle::Requeue => self.requeue(finished).await,
            }
        }
    }

    /// Removes the front slot, returning its delivery if it was finished and not yet sent.
    fn pop(&mut self) -> Option<Finished> {
        let slot = self.slots.pop_front()?;
        self.base += 1;
        match slot {
            Slot::Finished(finished) => Some(finished),
            Slot::Running | Slot::Sent => None,
        }
    }

    /// Acks `batch`: with `multiple`, one ack of its last tag settles all of it (the caller
    /// guarantees they are every unsettled tag up to it).
    async fn ack(&self, batch: Vec<Finished>, multiple: bool) {
        let Some(last) = batch.last() else { return };
        let ack = last.acker.ack(BasicAckOptions { multiple });
        let sent = match tokio::time::timeout(self.timeout, ack).await {
            Ok(Ok(true)) => true,
            Ok(Ok(false)) => {
                tracing::warn!(
                    jobs = batch.len(),
                    "ack not sent: the channel is gone; the broker will redeliver these jobs"
                );
                false
            }
            Ok(Err(err)) => {
                tracing::warn!(jobs = batch.len(), error = %err, "ack failed; the broker will redeliver these jobs");
                false
            }
            Err(_) => {
                tracing::warn!(
                    jobs = batch.len(),
                    "ack not sent in time; the broker may redeliver these jobs"
                );
                false
            }
        };
        for finished in &batch {
            self.count(finished, sent);
        }
    }

    async fn requeue(&self, finished: Finished) {
        let options = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        let nack = tokio::time::timeout(self.timeout, finished.acker.nack(options));
        let sent = matches!(nack.await, Ok(Ok(true)));
        if !sent {
            tracing::warn!(
                "nack not sent; the broker will redeliver the job when the channel closes"
            );
        }
        self.count(&finished, sent);
    }

    fn count(&self, finished: &Finished, sent: bool) {
        let outcome = if sent {
            finished.outcome
        } else {
            self.stats.acks_lost.fetch_add(1, Ordering::Relaxed);
            Outcome::Requeued
        };
        self.stats.count(outcome);
        if let Some(hook) = &self.hook {
            hook(&Settled {
                id: finished.id.as_ref().map(|id| id.as_str()),
                outcome: outcome.as_str(),
                sent,
            });
        }
    }
}
