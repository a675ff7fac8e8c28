//! In-flight jobs (`warren inflight`): asking every worker process which jobs its handlers run
//! now, and which of them are past their queue's `job_timeout`.
//!
//! The broker does not tell which message a channel holds, so the workers are asked (the
//! protocol: [`warren_core::inflight`], docs/PROTOCOL.md "In-flight jobs"): on a channel of its
//! own, [`inflight`] consumes RabbitMQ's direct reply-to pseudo-queue, publishes one request to
//! the fanout exchange `warren.control` (with a confirm: a missing exchange is an error that
//! says how to declare it), and collects the answers that arrive within the window. A worker
//! that does not answer in time (busy broker, blocked publishing, an older Warren) is simply not
//! in the result; with no worker at all the result is empty, not an error.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use futures::StreamExt;
use lapin::Channel;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use serde::Serialize;
use warren_core::JobId;
use warren_core::inflight::{Answer, DIRECT_REPLY_TO, Request, RunningJob, WorkerInfo};
use warren_core::topology::{self, NameError};

use crate::{Dispatcher, LinkError};

/// How long [`inflight`] waits for answers unless told otherwise.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(1500);

/// What the workers answered.
#[derive(Debug, Clone, Serialize)]
pub struct Inflight {
    /// Every worker that answered, jobs or not.
    pub workers: Vec<WorkerInfo>,
    /// Their running jobs, longest-running first.
    pub jobs: Vec<InflightJob>,
    /// Workers whose answer left jobs out (it would have been over its size limit).
    pub truncated: usize,
    /// Messages on the reply channel that were not answers to this request (malformed,
    /// oversized, unrelated): not shown.
    pub ignored: usize,
}

/// A job a worker's handler runs now.
#[derive(Debug, Clone, Serialize)]
pub struct InflightJob {
    pub worker: WorkerInfo,
    #[serde(flatten)]
    pub job: RunningJob,
    /// When its handler started (`started_at_ms`, the worker's clock), RFC 3339.
    pub started_at: String,
    /// Running past its queue's `job_timeout` ([`RunningJob::overdue`]).
    pub overdue: bool,
}

/// Why the workers could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("invalid queue name: {0}")]
    Name(#[from] NameError),
    #[error(
        "exchange `{}` does not exist: declare it with `warren topology apply` (as the admin \
         user); workers then answer once they start (or reconnect)",
        topology::CONTROL_EXCHANGE
    )]
    NoControlExchange,
    #[error("asking the workers: {0}")]
    Broker(#[source] lapin::Error),
    #[error("asking the workers: no answer from the broker within {0:?}")]
    Timeout(Duration),
}

/// Asks every worker process for its running jobs (of `queue` only, if given) and collects
/// the answers that arrive within `window`.
pub async fn inflight(
    dispatcher: &Dispatcher,
    queue: Option<&str>,
    window: Duration,
) -> Result<Inflight, InflightError> {
    if let Some(queue) = queue {
        topology::validate_queue_name(queue)?;
    }
    let channel = dispatcher.open_channel().await?;
    let timeout = dispatcher.config().broker.operation_timeout;
    let result = ask(&channel, queue, window, timeout).await;
    if channel.status().connected() {
        let _ = channel.close(200, "inflight done".into()).await;
    }
    result
}

async fn ask(
    channel: &Channel,
    queue: Option<&str>,
    window: Duration,
    timeout: Duration,
) -> Result<Inflight, InflightError> {
    // Direct reply-to: consume the pseudo-queue (no-ack) before publishing on the same channel.
    let options = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consume = channel.basic_consume(
        DIRECT_REPLY_TO.into(),
        "warren-inflight".into(),
        options,
        FieldTable::default(),
    );
    let mut answers = deadline(timeout, consume).await?;
    deadline(
        timeout,
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let correlation = JobId::generate().0;
    let request = Request {
        queue: queue.map(str::to_owned),
    };
    let (body, properties) = request.encode(&correlation);
    let published = async {
        channel
            .basic_publish(
                topology::CONTROL_EXCHANGE.into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(timeout, published).await {
        Err(_) => return Err(InflightError::Timeout(timeout)),
        Ok(Err(err)) if is_not_found(&err) => return Err(InflightError::NoControlExchange),
        Ok(Err(err)) => return Err(InflightError::Broker(err)),
        Ok(Ok(_)) => {}
    }

    let until = tokio::time::Instant::now() + window;
    let mut by_worker: BTreeMap<String, Answer> = BTreeMap::new();
    let mut ignored = 0;
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(until, answers.next()).await {
        match Answer::decode(&delivery.properties, &delivery.data, &correlation) {
            // One answer per worker: a second one (a forged copy) replaces nothing.
            Ok(answer) if !by_worker.contains_key(&answer.worker.connection) => {
                by_worker.insert(answer.worker.connection.clone(), answer);
            }
            Ok(_) | Err(_) => ignored += 1,
        }
    }
    Ok(collect(by_worker.into_values(), queue, ignored))
}

/// The answers as one list of jobs, longest-running first (only `queue`'s, if given: a worker
/// is asked for them, and a worker that ignored that is not trusted with it).
fn collect(answers: impl Iterator<Item = Answer>, queue: Option<&str>, ignored: usize) -> Inflight {
    let mut result = Inflight {
        workers: Vec::new(),
        jobs: Vec::new(),
        truncated: 0,
        ignored,
    };
    for answer in answers {
        if answer.truncated {
            result.truncated += 1;
        }
        for job in answer.jobs {
            if queue.is_some_and(|q| job.queue != q) {
                continue;
            }
            let started = UNIX_EPOCH + Duration::from_millis(job.started_at_ms);
            result.jobs.push(InflightJob {
                worker: answer.worker.clone(),
                started_at: humantime::format_rfc3339_millis(started).to_string(),
                overdue: job.overdue(),
                job,
            });
        }
        result.workers.push(answer.worker);
    }
    result
        .jobs
        .sort_by_key(|j| std::cmp::Reverse(j.job.running_ms));
    result
}

async fn deadline<T>(
    timeout: Duration,
    call: impl Future<Output = lapin::Result<T>>,
) -> Result<T, InflightError> {
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| InflightError::Timeout(timeout))?
        .map_err(InflightError::Broker)
}

/// `NOT_FOUND` (404): the publish went to an exchange that does not exist.
fn is_not_found(error: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e)
        if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(connection: &str, jobs: &[(&str, &str, u64, u64)]) -> Answer {
        Answer {
            worker: WorkerInfo {
                connection: connection.into(),
                host: "h".into(),
                pid: 1,
            },
            jobs: jobs
                .iter()
                .map(|(id, queue, running_ms, job_timeout_ms)| RunningJob {
                    id: (*id).into(),
                    kind: "k".into(),
                    queue: (*queue).into(),
                    attempt: 1,
                    started_at_ms: 0,
                    running_ms: *running_ms,
                    job_timeout_ms: *job_timeout_ms,
                })
                .collect(),
            truncated: false,
        }
    }

    #[test]
    fn jobs_are_listed_longest_first_with_overdue_ones_flagged() {
        let answers = vec![
            answer("w1", &[("a", "q", 10, 1000), ("b", "other", 50, 1000)]),
            answer("w2", &[("c", "q", 2000, 1000)]),
            answer("w3", &[]),
        ];
        let all = collect(answers.clone().into_iter(), None, 2);
        assert_eq!(all.workers.len(), 3);
        let ids: Vec<&str> = all.jobs.iter().map(|j| j.job.id.as_str()).collect();
        assert_eq!(ids, ["c", "b", "a"]);
        assert!(all.jobs[0].overdue && !all.jobs[1].overdue);
        assert_eq!(all.ignored, 2);
        let q = collect(answers.into_iter(), Some("q"), 0);
        assert_eq!(q.jobs.len(), 2);
    }
}
