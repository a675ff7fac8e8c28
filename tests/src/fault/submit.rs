//! Submitting through the `warren_dispatcher::Dispatcher` library while faults happen: every
//! job has its own id; a submit whose error `is_retryable()` is tried again with the same id
//! until it is confirmed or `give_up_after` has passed. Every attempt is logged.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_core::envelope::NewJob;
use warren_core::publish::PublishError;
use warren_dispatcher::{Dispatcher, SubmitError};

use super::now_ms;

/// How to submit a batch.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Jobs per second; `None` for as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Submits in flight at once.
    pub concurrency: usize,
    /// After this long (from a job's first attempt) a failing job is given up: unconfirmed.
    pub give_up_after: Duration,
    /// Pause between two attempts of one job.
    pub retry_pause: Duration,
    /// One attempt taking longer than this is a hung submit (a bug): it is abandoned, logged
    /// as `hung`, and tried again.
    pub attempt_deadline: Duration,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            rate: None,
            concurrency: 200,
            give_up_after: Duration::from_secs(180),
            retry_pause: Duration::from_millis(200),
            attempt_deadline: Duration::from_secs(60),
        }
    }
}

/// One submit attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: String,
    pub start_ms: u64,
    pub end_ms: u64,
    /// `None` = confirmed; else the error class.
    pub error: Option<String>,
}

/// What the dispatcher said, job by job.
#[derive(Debug, Default)]
pub struct Log {
    /// Ids tried at least once.
    pub submitted: HashSet<String>,
    /// Ids whose submit returned Ok (the broker confirmed them).
    pub confirmed: HashSet<String>,
    /// Ids given up on (no confirm ever), and the last error.
    pub unconfirmed: BTreeMap<String, String>,
    /// Failed attempts by error class.
    pub errors: BTreeMap<String, usize>,
    /// A few error texts, one per class, for the report.
    pub samples: BTreeMap<String, String>,
    pub attempts: Vec<Attempt>,
}

impl Log {
    pub fn failed_attempts(&self) -> usize {
        self.errors.values().sum()
    }

    /// `class×count, ...` for the report.
    pub fn error_summary(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A short class name for an error.
pub fn class(error: &SubmitError) -> &'static str {
    match error {
        SubmitError::Invalid(_) | SubmitError::Priority { .. } | SubmitError::Unsupported(_) => {
            "invalid"
        }
        SubmitError::UnknownQueue(_) => "unknown-queue",
        SubmitError::NoTopology => "no-topology",
        SubmitError::Blocked(_) => "blocked",
        SubmitError::Connection(_) => "connection",
        SubmitError::Publish(PublishError::Timeout(_)) => "confirm-timeout",
        SubmitError::Publish(PublishError::Nacked { .. }) => "nacked",
        SubmitError::Publish(PublishError::Channel(_)) => "channel",
        SubmitError::Publish(PublishError::Unroutable { .. }) => "unroutable",
        SubmitError::Publish(PublishError::NotConfirmed) => "not-confirmed",
    }
}

/// Submits `jobs` in the background; `stop` ends the submitting early (jobs not started yet
/// are not submitted at all). The log fills as it goes.
pub fn spawn(
    dispatcher: Arc<Dispatcher>,
    jobs: Vec<NewJob>,
    plan: Plan,
    stop: CancellationToken,
) -> (JoinHandle<()>, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let task_log = log.clone();
    let handle = tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(plan.concurrency));
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, job) in jobs.into_iter().enumerate() {
            if let Some(rate) = plan.rate {
                let due = started + Duration::from_secs_f64(i as f64 / rate);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep_until(due.into()) => {}
                }
            }
            let permit = tokio::select! {
                _ = stop.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit.expect("semaphore open"),
            };
            let dispatcher = dispatcher.clone();
            let log = task_log.clone();
            let plan = plan.clone();
            tasks.spawn(async move {
                submit_one(&dispatcher, job, &plan, &log).await;
                drop(permit);
            });
            while tasks.try_join_next().is_some() {}
        }
        while tasks.join_next().await.is_some() {}
    });
    (handle, log)
}

async fn submit_one(dispatcher: &Dispatcher, job: NewJob, plan: &Plan, log: &Mutex<Log>) {
    let id = job.id.clone().expect("fault jobs carry their id");
    log.lock().expect("log").submitted.insert(id.clone());
    let give_up = Instant::now() + plan.give_up_after;
    loop {
        let start_ms = now_ms();
        let result =
            tokio::time::timeout(plan.attempt_deadline, dispatcher.submit(job.clone())).await;
        let end_ms = now_ms();
        let (error, retry, text) = match result {
            Ok(Ok(_)) => (None, false, String::new()),
            Ok(Err(err)) => (
                Some(class(&err).to_owned()),
                err.is_retryable(),
                warren_core::error_chain(&err),
            ),
            Err(_) => (
                Some("hung".to_owned()),
                true,
                format!("submit did not return within {:?}", plan.attempt_deadline),
            ),
        };
        let done = {
            let mut log = log.lock().expect("log");
            log.attempts.push(Attempt {
                id: id.clone(),
                start_ms,
                end_ms,
                error: error.clone(),
            });
            match error {
                None => {
                    log.confirmed.insert(id.clone());
                    true
                }
                Some(class) => {
                    *log.errors.entry(class.clone()).or_insert(0) += 1;
                    log.samples.entry(class).or_insert(text.clone());
                    if !retry || Instant::now() >= give_up {
                        log.unconfirmed.insert(id.clone(), text);
                        true
                    } else {
                        false
                    }
                }
            }
        };
        if done {
            return;
        }
        tokio::time::sleep(plan.retry_pause).await;
    }
}
