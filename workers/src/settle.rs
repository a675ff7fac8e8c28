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
//! - for a delivery to hand back (its retry could not be queued): a single `reject` with requeue;
//! - for deliveries finished behind one that is still running (a slow job blocks the run):
//!   single acks after [`GAP_LINGER`], so a slow job never holds its neighbours' prefetch
//!   slots.
//!
//! The settler sends whenever it has taken in everything the job tasks handed over so far: at
//! low load that is one ack per job at once, under load the batches grow by themselves. It
//! counts each job's outcome once its ack is sent, and acks it could not send (the channel is
//! gone: the broker requeues those jobs itself) as lost.
//!
//! Its memory is bounded by the unsettled deliveries (at most the channel's prefetch), not by
//! the tags seen: a job running for hours while millions of deliveries after it finish costs
//! one range of tags acked behind it. A [`SettleHook`] that panics is caught and logged;
//! settling goes on (otherwise the channel would get no more acks until the broker's consumer
//! timeout closed it).

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::Acker;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::types::ShortString;
use tokio::sync::mpsc;
use tokio::time::Instant;

use warren_core::metrics::{self, KindMetrics};

use crate::job::{Outcome, Stats};

/// How long deliveries finished behind a still-running one wait before they are acked one by
/// one (the gap usually closes within microseconds: jobs end slightly out of order).
pub(crate) const GAP_LINGER: Duration = Duration::from_millis(10);

/// Most deliveries taken in before sending what is ready.
const MAX_INTAKE: usize = 1024;

/// Called once per job when its settlement was sent (or could not be): for metrics and the
/// benchmark's latency figures. A panic in it is caught and logged; settling goes on.
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
pub(crate) struct Finished<A = Acker> {
    pub tag: u64,
    pub acker: A,
    pub settle: Settle,
    pub outcome: Outcome,
    /// Kept only when a [`SettleHook`] wants it.
    pub id: Option<ShortString>,
    /// The job's metric series, when the worker records metrics: counted where the stats are.
    pub metrics: Option<Arc<KindMetrics>>,
}

/// What the settler calls on a delivery: [`Acker`] on a channel, a recording fake in tests.
pub(crate) trait Acknowledge: Send + Sync + 'static {
    /// `basic.ack` of this delivery, or with `multiple` of every unsettled one up to it.
    /// `Ok(false)`: not sent, the channel is gone.
    fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send;
    /// Hands this delivery alone back to its queue (`basic.reject` with requeue).
    fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send;
}

impl Acknowledge for Acker {
    fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send {
        Acker::ack(self, BasicAckOptions { multiple })
    }

    /// A reject, not a nack: RabbitMQ 4.x counts a rejected delivery towards a quorum queue's
    /// delivery limit but not a nacked one, so a job whose retry keeps failing to publish ends
    /// in its dead-letter queue instead of looping forever (3.10 counts both).
    fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send {
        Acker::reject(self, BasicRejectOptions { requeue: true })
    }
}

/// The job tasks' handle on their channel's settler task. Cheap to clone; the task ends (after
/// sending what it can) once every handle is dropped.
pub(crate) struct Settler<A = Acker> {
    tx: mpsc::UnboundedSender<Finished<A>>,
    keep_ids: bool,
}

impl<A> Clone for Settler<A> {
    fn clone(&self) -> Self {
        Settler {
            tx: self.tx.clone(),
            keep_ids: self.keep_ids,
        }
    }
}

impl Settler {
    /// Creates the settler of a fresh channel (its first delivery tag is 1) and the task to
    /// spawn that runs it.
    pub fn new(
        stats: Arc<Stats>,
        hook: Option<SettleHook>,
        timeout: Duration,
    ) -> (Settler, impl Future<Output = ()> + Send + 'static) {
        Settler::start(stats, hook, timeout)
    }
}

impl<A: Acknowledge> Settler<A> {
    /// [`Settler::new`] for any kind of delivery.
    fn start(
        stats: Arc<Stats>,
        hook: Option<SettleHook>,
        timeout: Duration,
    ) -> (Settler<A>, impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = mpsc::unbounded_channel();
        let settler = Settler {
            tx,
            keep_ids: hook.is_some(),
        };
        (settler, run(rx, Window::new(stats, hook, timeout)))
    }

    /// Whether [`Finished::id`] is wanted.
    pub fn keeps_ids(&self) -> bool {
        self.keep_ids
    }

    /// Hands a finished delivery over. If the settler is gone (its channel's session ended), the
    /// broker has requeued the delivery already; it is counted as an ack lost.
    pub fn finish(&self, finished: Finished<A>, stats: &Stats) {
        if let Err(mpsc::error::SendError(finished)) = self.tx.send(finished) {
            stats.acks_lost.fetch_add(1, Ordering::Relaxed);
            stats.requeued.fetch_add(1, Ordering::Relaxed);
            if let Some(metrics) = &finished.metrics {
                metrics.settled(metrics::Settled::Requeued, false);
            }
        }
    }
}

/// The settler task: take in finished deliveries, send what is ready, repeat.
async fn run<A: Acknowledge>(mut rx: mpsc::UnboundedReceiver<Finished<A>>, mut window: Window<A>) {
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
///
/// It keeps only what is finished and not sent yet, and the tags acked one by one behind a
/// gap as ranges, never an entry per tag: a job that runs for hours while a million deliveries
/// after it finish and are acked costs one range, and each pass costs what it sends.
struct Window<A> {
    /// The lowest unsettled tag: every tag below it is settled (acked, nacked, or given up).
    /// A multiple ack starts here.
    base: u64,
    /// Finished deliveries not sent yet, by tag (each at or above `base`). Once the ready
    /// ones are sent, what is left waits behind a gap: at most the channel's prefetch.
    finished: BTreeMap<u64, Finished<A>>,
    /// Tags above `base` already settled one by one behind a gap. No multiple ack spans
    /// them, and `base` skips them once the gap before them closes.
    sent: TagRanges,
    stats: Arc<Stats>,
    /// Called once per job after its ack or nack; a panic in it is caught and logged.
    hook: Option<SettleHook>,
    /// Deadline for each ack or nack.
    timeout: Duration,
}

impl<A: Acknowledge> Window<A> {
    /// The window of a fresh channel: its first delivery tag is 1.
    fn new(stats: Arc<Stats>, hook: Option<SettleHook>, timeout: Duration) -> Window<A> {
        Window {
            base: 1,
            finished: BTreeMap::new(),
            sent: TagRanges::default(),
            stats,
            hook,
            timeout,
        }
    }

    fn insert(&mut self, finished: Finished<A>) {
        let tag = finished.tag;
        if tag < self.base || self.sent.contains(tag) || self.finished.contains_key(&tag) {
            // Cannot happen: each tag is finished once, and settling it twice would close
            // the channel (PRECONDITION_FAILED, unknown delivery tag).
            tracing::error!(tag, "delivery finished twice; ignoring");
            return;
        }
        self.finished.insert(tag, finished);
    }

    /// Sends everything settled from the front: each run of finished acks as one multiple
    /// ack, each requeue as its own nack.
    async fn send_ready(&mut self) {
        loop {
            if let Some(end) = self.sent.take_starting_at(self.base) {
                self.base = end;
            }
            let mut run: Vec<Finished<A>> = Vec::new();
            while let Some(next) = self.finished.first_entry() {
                let expected = self.base + run.len() as u64;
                if *next.key() != expected || next.get().settle != Settle::Ack {
                    break;
                }
                run.push(next.remove());
            }
            if let Some(last) = run.last() {
                self.base = last.tag + 1;
                self.ack(run, true).await;
                continue;
            }
            // Not an ack (the run would have taken it): a requeue, which breaks runs.
            match self.finished.first_entry() {
                Some(next) if *next.key() == self.base => {
                    let finished = next.remove();
                    self.base += 1;
                    self.send_one(finished).await;
                }
                _ => return,
            }
        }
    }

    /// Whether finished deliveries wait behind a running one (after [`Window::send_ready`],
    /// everything still finished does).
    fn waits_behind_gap(&self) -> bool {
        !self.finished.is_empty()
    }

    /// Settles, one by one, the finished deliveries behind the running one at the front.
    async fn send_behind_gap(&mut self) {
        for (tag, finished) in std::mem::take(&mut self.finished) {
            self.sent.insert(tag);
            self.send_one(finished).await;
        }
    }

    /// Settles one delivery on its own: a single ack, or a nack with requeue.
    async fn send_one(&self, finished: Finished<A>) {
        match finished.settle {
            Settle::Ack => self.ack(vec![finished], false).await,
            Settle::Requeue => self.requeue(finished).await,
        }
    }

    /// Acks `batch`: with `multiple`, one ack of its last tag settles all of it (the caller
    /// guarantees they are every unsettled tag up to it).
    async fn ack(&self, batch: Vec<Finished<A>>, multiple: bool) {
        let Some(last) = batch.last() else { return };
        let ack = last.acker.ack(multiple);
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

    async fn requeue(&self, finished: Finished<A>) {
        let nack = tokio::time::timeout(self.timeout, finished.acker.requeue());
        let sent = matches!(nack.await, Ok(Ok(true)));
        if !sent {
            tracing::warn!(
                "nack not sent; the broker will redeliver the job when the channel closes"
            );
        }
        self.count(&finished, sent);
    }

    /// Counts the job's outcome and tells the hook. A panicking hook must not end this task:
    /// its channel would get no more acks, and its jobs would stall until the broker's
    /// consumer timeout closes it.
    fn count(&self, finished: &Finished<A>, sent: bool) {
        let outcome = if sent {
            finished.outcome
        } else {
            self.stats.acks_lost.fetch_add(1, Ordering::Relaxed);
            Outcome::Requeued
        };
        self.stats.count(outcome);
        if let Some(metrics) = &finished.metrics {
            metrics.settled(metric_of(finished.outcome), sent);
        }
        let Some(hook) = &self.hook else { return };
        let settled = Settled {
            id: finished.id.as_ref().map(|id| id.as_str()),
            outcome: outcome.as_str(),
            sent,
        };
        if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| hook(&settled))) {
            tracing::error!(
                job = settled.id.unwrap_or(""),
                panic = panic_text(&*panic),
                "the on_settled hook panicked; settling continues"
            );
        }
    }

    /// How many entries the window holds.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.finished.len() + self.sent.len()
    }
}

/// How an outcome is counted in the metrics (a run taken back is handed back: requeued).
fn metric_of(outcome: Outcome) -> metrics::Settled<'static> {
    match outcome {
        Outcome::Done => metrics::Settled::Succeeded,
        Outcome::Retried => metrics::Settled::Retried,
        Outcome::DeadLettered(reason) => metrics::Settled::DeadLettered(reason.class()),
        Outcome::Requeued | Outcome::TakenBack => metrics::Settled::Requeued,
    }
}

/// Sorted, disjoint tag ranges `start..end` (a map from start to end). Touching ranges are
/// merged, so there is one range per run of tags settled behind the same gap.
#[derive(Debug, Default)]
struct TagRanges(BTreeMap<u64, u64>);

impl TagRanges {
    /// Adds `tag`, which no range holds yet.
    fn insert(&mut self, tag: u64) {
        let start = match self.0.range(..tag).next_back() {
            Some((&before, &end)) if end == tag => before,
            _ => tag,
        };
        let end = self.0.remove(&(tag + 1)).unwrap_or(tag + 1);
        self.0.insert(start, end);
    }

    fn contains(&self, tag: u64) -> bool {
        self.0
            .range(..=tag)
            .next_back()
            .is_some_and(|(_, &end)| tag < end)
    }

    /// Removes the range that starts at `tag`, if any, and returns its end.
    fn take_starting_at(&mut self, tag: u64) -> Option<u64> {
        self.0.remove(&tag)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.len()
    }
}

/// A panic's message, for the log.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(non-text panic payload)"
    }
}

#[cfg(test)]
mod tests {
    //! The window against a recording fake channel, no broker: which acks and nacks it sends,
    //! in which order, and when (tokio's clock is paused, so the linger is exact).

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize};

    use tokio::task::JoinError;

    use super::*;

    /// One call the settler made on a delivery.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Ack { tag: u64, multiple: bool },
        Nack { tag: u64, requeue: bool },
    }

    fn multiple(tag: u64) -> Call {
        Call::Ack {
            tag,
            multiple: true,
        }
    }

    fn single(tag: u64) -> Call {
        Call::Ack {
            tag,
            multiple: false,
        }
    }

    /// How the fake channel answers every ack and nack.
    #[derive(Debug, Clone, Copy)]
    enum Reply {
        /// `Ok(true)`: sent.
        Sent,
        /// `Ok(false)`: the channel is gone.
        Gone,
        /// Never answers.
        Hang,
    }

    /// A channel that records every call made on its deliveries, with when it came (time since
    /// the channel was made).
    #[derive(Clone)]
    struct Channel {
        calls: Arc<Mutex<Vec<(Call, Duration)>>>,
        start: Instant,
        reply: Reply,
    }

    impl Channel {
        fn new(reply: Reply) -> Channel {
            Channel {
                calls: Arc::default(),
                start: Instant::now(),
                reply,
            }
        }

        fn delivery(&self, tag: u64, settle: Settle) -> Finished<Fake> {
            let outcome = match settle {
                Settle::Ack => Outcome::Done,
                Settle::Requeue => Outcome::Requeued,
            };
            Finished {
                tag,
                acker: Fake {
                    tag,
                    channel: self.clone(),
                },
                settle,
                outcome,
                id: Some(format!("job-{tag}").into()),
                metrics: None,
            }
        }

        fn calls(&self) -> Vec<Call> {
            self.timed().into_iter().map(|(call, _)| call).collect()
        }

        fn timed(&self) -> Vec<(Call, Duration)> {
            self.calls.lock().expect("calls").clone()
        }
    }

    /// One delivery on a [`Channel`].
    struct Fake {
        tag: u64,
        channel: Channel,
    }

    impl Fake {
        fn answer(&self, call: Call) -> impl Future<Output = lapin::Result<bool>> + Send + use<> {
            let at = self.channel.start.elapsed();
            self.channel.calls.lock().expect("calls").push((call, at));
            let reply = self.channel.reply;
            async move {
                match reply {
                    Reply::Sent => Ok(true),
                    Reply::Gone => Ok(false),
                    Reply::Hang => std::future::pending().await,
                }
            }
        }
    }

    impl Acknowledge for Fake {
        fn ack(&self, multiple: bool) -> impl Future<Output = lapin::Result<bool>> + Send {
            self.answer(Call::Ack {
                tag: self.tag,
                multiple,
            })
        }

        fn requeue(&self) -> impl Future<Output = lapin::Result<bool>> + Send {
            self.answer(Call::Nack {
                tag: self.tag,
                requeue: true,
            })
        }
    }

    /// A settler task on a fake channel, as `worker.rs` spawns it.
    struct Running {
        channel: Channel,
        settler: Settler<Fake>,
        stats: Arc<Stats>,
        task: tokio::task::JoinHandle<()>,
    }

    /// Deadline for an ack in these tests.
    const TIMEOUT: Duration = Duration::from_secs(1);

    fn spawn(reply: Reply, hook: Option<SettleHook>) -> Running {
        let stats = Arc::new(Stats::default());
        let (settler, settling) = Settler::start(stats.clone(), hook, TIMEOUT);
        Running {
            channel: Channel::new(reply),
            settler,
            stats,
            task: tokio::spawn(settling),
        }
    }

    impl Running {
        fn finish(&self, tag: u64, settle: Settle) {
            let finished = self.channel.delivery(tag, settle);
            self.settler.finish(finished, &self.stats);
        }

        fn done(&self, tags: impl IntoIterator<Item = u64>) {
            for tag in tags {
                self.finish(tag, Settle::Ack);
            }
        }

        /// Drops the job tasks' handle and waits for the settler task to end.
        async fn close(self) -> (Channel, Arc<Stats>, Result<(), JoinError>) {
            drop(self.settler);
            let ended = tokio::time::timeout(Duration::from_secs(60), self.task)
                .await
                .expect("the settler task ends once every handle is dropped");
            (self.channel, self.stats, ended)
        }
    }

    /// Lets the settler take in what was handed over and send what is ready. The clock is
    /// paused: it moves (by `by`) only once every task waits, so this is no race.
    async fn idle(by: Duration) {
        tokio::time::sleep(by).await;
    }

    const A_MOMENT: Duration = Duration::from_millis(1);

    fn count(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Given deliveries 1 to 5 finished together, when the settler takes them in, then it
    /// sends one multiple ack of 5 at once.
    #[tokio::test(start_paused = true)]
    async fn a_run_of_consecutive_tags_is_one_multiple_ack_of_the_last() {
        let running = spawn(Reply::Sent, None);
        running.done(1..=5);
        idle(A_MOMENT).await;
        assert_eq!(running.channel.timed(), [(multiple(5), Duration::ZERO)]);

        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(channel.calls(), [multiple(5)]);
        assert_eq!(count(&stats.done), 5);
    }

    /// Given deliveries finished in the order 3, 1, 2, then one multiple ack of 3 settles them.
    #[tokio::test(start_paused = true)]
    async fn tags_finished_out_of_order_are_one_multiple_ack() {
        let running = spawn(Reply::Sent, None);
        running.done([3, 1, 2]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(channel.calls(), [multiple(3)]);
        assert_eq!(count(&stats.done), 3);
    }

    /// Given delivery 1 still running, when 2 to 10 finish, then nothing is sent until
    /// GAP_LINGER has passed, then 2 to 10 are acked one by one; when 1 finishes, it is acked
    /// alone, and the next delivery (11) is acked at once: nothing is acked twice.
    #[tokio::test(start_paused = true)]
    async fn tags_behind_a_running_one_are_acked_singly_after_the_linger() {
        let running = spawn(Reply::Sent, None);
        running.done(2..=10);
        idle(A_MOMENT).await;
        assert_eq!(running.channel.calls(), [], "held back for the linger");

        idle(GAP_LINGER).await;
        let singles: Vec<(Call, Duration)> =
            (2..=10).map(|tag| (single(tag), GAP_LINGER)).collect();
        assert_eq!(running.channel.timed(), singles);

        running.done([1]);
        idle(A_MOMENT).await;
        running.done([11]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        let mut expected: Vec<Call> = (2..=10).map(single).collect();
        expected.extend([multiple(1), multiple(11)]);
        assert_eq!(channel.calls(), expected);
        assert_eq!(count(&stats.done), 11);
    }

    /// Given 1 done, 2 to requeue and 3 done, then 1 is acked, 2 nacked with requeue and 3
    /// acked: no multiple ack covers 2.
    #[tokio::test(start_paused = true)]
    async fn a_requeue_breaks_a_run() {
        let running = spawn(Reply::Sent, None);
        running.finish(1, Settle::Ack);
        running.finish(2, Settle::Requeue);
        running.finish(3, Settle::Ack);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        let nack = Call::Nack {
            tag: 2,
            requeue: true,
        };
        assert_eq!(channel.calls(), [multiple(1), nack, multiple(3)]);
        assert_eq!(count(&stats.done), 2);
        assert_eq!(count(&stats.requeued), 1);
        assert_eq!(count(&stats.acks_lost), 0);
    }

    /// Given a settler that settled tags 1 to 3, when its channel is reopened (a new settler),
    /// then the new channel's tag 1 is acked at once, not taken for a tag already settled nor
    /// held back behind a gap.
    #[tokio::test(start_paused = true)]
    async fn a_fresh_settler_starts_at_tag_1() {
        let first = spawn(Reply::Sent, None);
        first.done(1..=3);
        let (channel, _, ended) = first.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(channel.calls(), [multiple(3)]);

        let reopened = spawn(Reply::Sent, None);
        reopened.done([1]);
        idle(A_MOMENT).await;
        assert_eq!(reopened.channel.timed(), [(multiple(1), Duration::ZERO)]);
        let (_, stats, ended) = reopened.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(count(&stats.done), 1);
    }

    /// Given delivery 1 running and 2, 3 finished, when every handle is dropped (the channel's
    /// consumer ended), then 2 and 3 are acked one by one at once, without waiting the linger.
    #[tokio::test(start_paused = true)]
    async fn dropping_every_handle_sends_what_is_left() {
        let running = spawn(Reply::Sent, None);
        running.done([2, 3]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(
            channel.timed(),
            [(single(2), Duration::ZERO), (single(3), Duration::ZERO)]
        );
        assert_eq!(count(&stats.done), 2);
    }

    /// Given delivery 1 running for as long as 100,000 later deliveries take to finish behind
    /// it (100 per linger, as a prefetch of 100 would let them in), then each linger acks those
    /// 100 and the window keeps one entry for all the tags it acked; when 1 finishes, one ack
    /// of 1 empties the window.
    #[tokio::test]
    async fn a_long_running_job_keeps_the_window_small() {
        const LATER: u64 = 100_000;
        let channel = Channel::new(Reply::Sent);
        let stats = Arc::new(Stats::default());
        let mut window = Window::new(stats.clone(), None, TIMEOUT);
        let started = std::time::Instant::now();
        let mut most_held = 0;
        for first in (2..LATER + 2).step_by(100) {
            for tag in first..first + 100 {
                window.insert(channel.delivery(tag, Settle::Ack));
            }
            window.send_ready().await;
            assert!(window.waits_behind_gap());
            // The linger is over:
            window.send_behind_gap().await;
            window.send_ready().await;
            assert!(!window.waits_behind_gap());
            most_held = most_held.max(window.held());
            assert!(window.finished.is_empty());
            assert_eq!(window.sent.len(), 1, "one range: 2..{}", first + 100);
            assert_eq!(window.base, 1);
        }
        let took = started.elapsed();
        assert!(
            most_held <= 1,
            "the window held up to {most_held} entries behind tag 1 ({LATER} deliveries took {took:?})"
        );

        window.insert(channel.delivery(1, Settle::Ack));
        window.send_ready().await;
        assert_eq!(window.held(), 0);
        assert_eq!(window.base, LATER + 2);
        let calls = channel.calls();
        assert_eq!(calls.len() as u64, LATER + 1);
        assert!(
            calls[..LATER as usize]
                .iter()
                .zip(2..)
                .all(|(call, tag)| *call == single(tag))
        );
        assert_eq!(calls.last(), Some(&multiple(1)));
        assert_eq!(count(&stats.done), LATER + 1);
    }

    /// Tags settled behind gaps in any order merge into one range per run; the range at the
    /// front is taken whole once the gap before it closes.
    #[test]
    fn tag_ranges_merge_touching_tags() {
        let mut ranges = TagRanges::default();
        for tag in [5, 3, 9, 4, 8] {
            ranges.insert(tag);
        }
        assert_eq!(ranges.0, BTreeMap::from([(3, 6), (8, 10)]));
        assert!(ranges.contains(3) && ranges.contains(5) && ranges.contains(9));
        assert!(!ranges.contains(2) && !ranges.contains(6) && !ranges.contains(10));
        ranges.insert(6);
        ranges.insert(7);
        assert_eq!(ranges.0, BTreeMap::from([(3, 10)]));
        assert_eq!(ranges.take_starting_at(2), None);
        assert_eq!(ranges.take_starting_at(3), Some(10));
        assert_eq!(ranges.len(), 0);
    }

    /// Given 1 running, 3 finished and acked after a linger, then 2 finished and acked after
    /// another, when 1 finishes, then it alone is acked and the next delivery (4) is acked at
    /// once with a multiple ack: the window moved past 2 and 3 without acking them again.
    #[tokio::test(start_paused = true)]
    async fn gaps_closing_out_of_order_ack_nothing_twice() {
        let running = spawn(Reply::Sent, None);
        running.done([3]);
        idle(GAP_LINGER + A_MOMENT).await;
        running.done([2]);
        idle(GAP_LINGER + A_MOMENT).await;
        running.done([1]);
        idle(A_MOMENT).await;
        running.done([4]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        let expected = [single(3), single(2), multiple(1), multiple(4)];
        assert_eq!(channel.calls(), expected);
        assert_eq!(count(&stats.done), 4);
    }

    /// Log lines written while a test runs on this thread.
    #[derive(Clone, Default)]
    struct Log(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Log {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log").extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Log {
        fn lines(&self) -> Vec<String> {
            let bytes = self.0.lock().expect("log").clone();
            String::from_utf8_lossy(&bytes)
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Given a hook that panics on every call, when 4 jobs are settled in two passes, then
    /// every ack is still sent and counted, the hook is called once per job, each panic is
    /// logged once at error level, and the settler ends normally.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_hook_does_not_stop_settling() {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // The test runtime has one thread: the settler task logs on this one.
        let _logging = tracing::subscriber::set_default(subscriber);
        let called = Arc::new(AtomicUsize::new(0));
        let calls = called.clone();
        let hook: SettleHook = Arc::new(move |_: &Settled<'_>| {
            calls.fetch_add(1, Ordering::Relaxed);
            panic!("the hook broke");
        });
        let running = spawn(Reply::Sent, Some(hook));
        running.done(1..=3);
        idle(A_MOMENT).await;
        running.done([4]);
        idle(A_MOMENT).await;
        assert_eq!(running.channel.calls(), [multiple(3), multiple(4)]);

        let (_, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(count(&stats.done), 4);
        assert_eq!(called.load(Ordering::Relaxed), 4);
        let lines = log.lines();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        for (line, tag) in lines.iter().zip(1..) {
            assert!(line.contains("ERROR"), "{line}");
            assert!(line.contains("the on_settled hook panicked; settling continues"));
            assert!(line.contains(&format!("job=\"job-{tag}\"")), "{line}");
            assert!(line.contains("panic=\"the hook broke\""), "{line}");
        }
    }

    /// Given a channel that is gone (acks answer `Ok(false)`), when two jobs finish, then one
    /// ack was tried, and both jobs are counted as lost and requeued, reported with `sent`
    /// false.
    #[tokio::test(start_paused = true)]
    async fn an_ack_the_channel_cannot_send_is_counted_lost() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let hook: SettleHook = Arc::new(move |s: &Settled<'_>| {
            let id = s.id.map(str::to_owned);
            record.lock().expect("seen").push((id, s.outcome, s.sent));
        });
        let running = spawn(Reply::Gone, Some(hook));
        running.done([1, 2]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(channel.calls(), [multiple(2)]);
        assert_eq!(count(&stats.done), 0);
        assert_eq!(count(&stats.acks_lost), 2);
        assert_eq!(count(&stats.requeued), 2);
        let lost = |id: &str| (Some(id.to_owned()), "requeued", false);
        assert_eq!(*seen.lock().expect("seen"), [lost("job-1"), lost("job-2")]);
    }

    /// Given a channel that never answers, then the ack is given up after the timeout and the
    /// job counted as lost, and the settler still ends.
    #[tokio::test(start_paused = true)]
    async fn an_ack_that_never_completes_is_given_up_after_the_timeout() {
        let running = spawn(Reply::Hang, None);
        let start = running.channel.start;
        running.done([1]);
        let (channel, stats, ended) = running.close().await;
        ended.expect("the settler ended normally");
        assert_eq!(channel.calls(), [multiple(1)]);
        assert_eq!(start.elapsed(), TIMEOUT);
        assert_eq!(count(&stats.acks_lost), 1);
        assert_eq!(count(&stats.requeued), 1);
    }
}
