//! In-flight jobs: which jobs this worker process runs now ([`Running`]), and answering
//! `warren inflight` about them ([`answer_requests`]).
//!
//! The broker does not tell which message a channel holds, so the worker keeps its own list:
//! a job enters it when its handler starts ([`Running::enter`], from [`crate::job`]) and leaves
//! when the handler returns, whatever the outcome.
//!
//! Each session, the worker binds an exclusive, server-named queue of its own to the control
//! exchange ([`topology::CONTROL_EXCHANGE`]) on its consuming connection (the queue goes with
//! the connection) and answers each well-formed request once, on a channel of its publishing
//! connection, through RabbitMQ's direct reply-to (the protocol and its checks:
//! [`warren_core::inflight`]). Answering is best effort: a topology without the control
//! exchange (applied by an older Warren), or a user without the permissions, costs a warning
//! and nothing else; jobs run as before. While RabbitMQ blocks publishing (a resource alarm)
//! the worker does not answer. At most [`ANSWERS_PER_SECOND`] answers a second, one per
//! request: publishing requests to the control exchange cannot make workers amplify them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use warren_core::inflight::{ANSWERS_PER_SECOND, Answer, Request, RunningJob, WorkerInfo};
use warren_core::topology;

use crate::handler::JobContext;

/// The jobs whose handlers run now in this process, across sessions.
#[derive(Debug, Default)]
pub(crate) struct Running {
    jobs: Mutex<HashMap<u64, Entry>>,
    next: AtomicU64,
}

/// One running job.
#[derive(Debug)]
struct Entry {
    id: String,
    kind: String,
    queue: Arc<str>,
    attempt: u32,
    /// Wall-clock start, for the operator.
    started_at: SystemTime,
    /// Monotonic start, for how long it has run.
    started: Instant,
    job_timeout: Duration,
}

/// A job's place in [`Running`]: removed when dropped.
pub(crate) struct Entered<'a> {
    running: &'a Running,
    key: u64,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        lock(&self.running.jobs).remove(&self.key);
    }
}

impl Running {
    /// Records that the handler of `ctx`'s job starts now, until the returned guard is dropped.
    pub(crate) fn enter(&self, ctx: &JobContext, job_timeout: Duration) -> Entered<'_> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            id: ctx.id.0.clone(),
            kind: ctx.kind.clone(),
            queue: ctx.queue.clone(),
            attempt: ctx.attempt,
            started_at: SystemTime::now(),
            started: Instant::now(),
            job_timeout,
        };
        lock(&self.jobs).insert(key, entry);
        Entered { running: self, key }
    }

    /// The running jobs (of `queue`, if given), longest-running first.
    pub(crate) fn snapshot(&self, queue: Option<&str>) -> Vec<RunningJob> {
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let mut jobs: Vec<RunningJob> = lock(&self.jobs)
            .values()
            .filter(|e| queue.is_none_or(|q| *e.queue == *q))
            .map(|e| RunningJob {
                id: e.id.clone(),
                kind: e.kind.clone(),
                queue: e.queue.to_string(),
                attempt: e.attempt,
                started_at_ms: millis(
                    e.started_at
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default(),
                ),
                running_ms: millis(e.started.elapsed()),
                job_timeout_ms: millis(e.job_timeout),
            })
            .collect();
        jobs.sort_by_key(|j| std::cmp::Reverse(j.running_ms));
        jobs
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The task answering control requests for one session; stopped when dropped.
pub(crate) struct Responder(Option<JoinHandle<()>>);

impl Drop for Responder {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// What [`answer_requests`] needs.
pub(crate) struct Control<'a> {
    /// The consuming connection: the control queue lives and dies with it.
    pub consuming: &'a Connection,
    /// The publishing connection: answers are published there (blocked under an alarm, like
    /// every publish, while consuming goes on).
    pub publishing: &'a Connection,
    pub running: Arc<Running>,
    pub worker: WorkerInfo,
    pub blocked: watch::Receiver<bool>,
    /// Deadline of each broker call.
    pub timeout: Duration,
}

/// Starts answering control requests for this session. Never fails the session: what goes
/// wrong is logged once, and the worker runs on without answering.
pub(crate) async fn answer_requests(control: Control<'_>) -> Responder {
    let channels = async {
        let listen = control.consuming.create_channel().await?;
        let reply = control.publishing.create_channel().await?;
        Ok::<_, lapin::Error>((listen, reply))
    };
    let (listen, reply) = match tokio::time::timeout(control.timeout, channels).await {
        Ok(Ok(channels)) => channels,
        Ok(Err(err)) => {
            not_answering(&err.to_string());
            return Responder(None);
        }
        Err(_) => {
            not_answering("no channel within the operation timeout");
            return Responder(None);
        }
    };
    let serving = Serving {
        listen,
        reply,
        running: control.running,
        worker: control.worker,
        blocked: control.blocked,
        timeout: control.timeout,
    };
    Responder(Some(tokio::spawn(serving.run())))
}

fn not_answering(why: &str) {
    tracing::warn!(
        error = %why,
        "this worker will not answer `warren inflight` (run `warren topology apply` as the admin \
         user to declare the {} exchange; the worker user needs the permissions of \
         config/definitions.json)",
        topology::CONTROL_EXCHANGE
    );
}

/// One session's answering task.
struct Serving {
    /// On the consuming connection: the control queue's consumer.
    listen: Channel,
    /// On the publishing connection: the answers.
    reply: Channel,
    running: Arc<Running>,
    worker: WorkerInfo,
    blocked: watch::Receiver<bool>,
    timeout: Duration,
}

impl Serving {
    async fn run(self) {
        let mut requests = match self.subscribe().await {
            Ok(consumer) => consumer,
            Err(err) => {
                not_answering(&err);
                let _ = self.listen.close(200, "not answering".into()).await;
                let _ = self.reply.close(200, "not answering".into()).await;
                return;
            }
        };
        let mut limit = RateLimit::new(ANSWERS_PER_SECOND);
        while let Some(Ok(delivery)) = requests.next().await {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            let received = match Request::decode(&delivery.properties, &delivery.data) {
                Ok(received) => received,
                Err(err) => {
                    tracing::debug!(error = %err, "ignored a control message");
                    continue;
                }
            };
            if !limit.allow(Instant::now()) {
                tracing::debug!("ignored a control request: over {ANSWERS_PER_SECOND} a second");
                continue;
            }
            if *self.blocked.borrow() {
                tracing::debug!("not answering a control request: publishing is blocked");
                continue;
            }
            let answer = Answer {
                worker: self.worker.clone(),
                jobs: self.running.snapshot(received.request.queue.as_deref()),
                truncated: false,
            };
            let (body, properties) = answer.encode(received.correlation_id.as_ref());
            let publish = self.reply.basic_publish(
                "".into(),
                received.reply_to,
                BasicPublishOptions::default(),
                &body,
                properties,
            );
            match tokio::time::timeout(self.timeout, publish).await {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    // A refused publish closes the answering channel: nothing more to do.
                    not_answering(&err.to_string());
                    break;
                }
                Err(_) => tracing::debug!("a control answer was not sent in time"),
            }
        }
        let _ = self.reply.close(200, "session over".into()).await;
    }

    /// Declares the control queue, binds it and consumes it (acks, a prefetch of 4).
    async fn subscribe(&self) -> Result<lapin::Consumer, String> {
        let steps = async {
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            };
            let queue = self
                .listen
                .queue_declare("".into(), options, topology::control_queue_arguments())
                .await?;
            self.listen
                .queue_bind(
                    queue.name().clone(),
                    topology::CONTROL_EXCHANGE.into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.listen.basic_qos(4, BasicQosOptions::default()).await?;
            let tag = format!("warren-worker {} control", self.worker.pid);
            self.listen
                .basic_consume(
                    queue.name().clone(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        match tokio::time::timeout(self.timeout, steps).await {
            Ok(Ok(consumer)) => Ok(consumer),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("no answer from the broker within the operation timeout".into()),
        }
    }
}

/// At most `per_second` answers in any one-second window that starts with an answer.
struct RateLimit {
    per_second: u32,
    window_start: Option<Instant>,
    used: u32,
}

impl RateLimit {
    fn new(per_second: u32) -> RateLimit {
        RateLimit {
            per_second,
            window_start: None,
            used: 0,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {
                if self.used >= self.per_second {
                    return false;
                }
                self.used += 1;
            }
            _ => {
                self.window_start = Some(now);
                self.used = 1;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_rate_limited() {
        let mut limit = RateLimit::new(3);
        let start = Instant::now();
        let allowed = (0..10).filter(|_| limit.allow(start)).count();
        assert_eq!(allowed, 3);
        assert!(limit.allow(start + Duration::from_millis(1001)));
    }

    #[test]
    fn jobs_leave_the_list_when_their_guard_drops() {
        let running = Running::default();
        let ctx = JobContext {
            id: warren_core::JobId("j1".into()),
            kind: "k".into(),
            queue: "q".into(),
            attempt: 2,
            redelivered: false,
            trace: warren_core::trace::SpanIds::child_of(None),
        };
        let entered = running.enter(&ctx, Duration::from_secs(1));
        let jobs = running.snapshot(None);
        assert_eq!(jobs.len(), 1);
        assert_eq!((jobs[0].id.as_str(), jobs[0].attempt), ("j1", 2));
        assert!(running.snapshot(Some("other")).is_empty());
        drop(entered);
        assert!(running.snapshot(None).is_empty());
    }
}
