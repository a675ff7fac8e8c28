//! A job's life through a real broker and an in-process worker: done, retried with backoff,
//! exhausted, permanent, panicking, overrunning, unknown kind.

use std::time::Duration;

use serde_json::{Value, json};
use warren_core::envelope;
use warren_tests::*;
use warren_workers::{JobContext, JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(30);

/// A registry with one recorded handler for `kind`, answering with `answer`.
fn recorded(
    kind: &str,
    answer: impl Fn(&Call) -> Result<Option<Value>, JobError> + Send + Sync + 'static,
) -> (Recorder, Registry) {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, kind, answer);
    (recorder, registry)
}

/// Given a worker for `echo`, when a job is submitted, then the handler runs once with the
/// payload and the job is acked (nothing is left in the queue after the worker stops).
#[tokio::test]
async fn submitted_job_is_processed_and_acked() {
    let (recorder, registry) = recorded("echo", |call| Ok(Some(call.payload.clone())));
    let mut stage = Stage::new("done", registry).await;

    let id = stage.submit("echo", json!({"n": 7})).await;

    let calls = recorder.wait_for(1, DEADLINE).await;
    assert_eq!(calls[0].id, id.0);
    assert_eq!(calls[0].attempt, 1);
    assert_eq!(calls[0].payload, json!({"n": 7}));
    stage.stop_worker().await;
    let (ready, dead) = stage.ready().await;
    assert_eq!(ready, 0, "the job was acked, not requeued");
    assert_eq!(dead, 0);
    assert_eq!(recorder.calls().len(), 1, "processed exactly once");
    stage.end().await;
}

/// Given a handler that fails twice, when the job runs, then it sees attempts 1, 2, 3 with the
/// configured backoff (1 s, then 2 s, no jitter) between them, and succeeds on the third.
#[tokio::test]
async fn failing_twice_then_succeeding_retries_with_backoff() {
    let (recorder, registry) = recorded("flaky", |call| match call.attempt {
        1 | 2 => Err(JobError::retry("not yet")),
        _ => Ok(None),
    });
    let mut stage = Stage::new("retry", registry).await;

    stage.submit("flaky", json!({})).await;

    let calls = recorder.wait_for(3, DEADLINE).await;
    let attempts: Vec<u32> = calls.iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let first_gap = calls[1].at - calls[0].at;
    let second_gap = calls[2].at - calls[1].at;
    assert!(
        first_gap >= Duration::from_millis(900) && first_gap < Duration::from_millis(2500),
        "{first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1900) && second_gap < Duration::from_millis(3500),
        "{second_gap:?}"
    );
    stage.stop_worker().await;
    assert_eq!(stage.ready().await.1, 0);
    stage.end().await;
}

/// Given a handler that always fails (retryable) and 3 attempts allowed, then after the third
/// attempt the job is in `<queue>.dead` with the reason, attempts, time and worker headers.
#[tokio::test]
async fn exhausted_job_is_dead_lettered_with_reason_headers() {
    let (recorder, registry) = recorded("doomed", |_| Err(JobError::retry("service unavailable")));
    let stage = Stage::new("exhaust", registry).await;

    let id = stage.submit("doomed", json!({"x": 1})).await;

    let dead = stage.dead_letters(1).await;
    assert_eq!(recorder.calls().len(), 3);
    let message = &dead[0];
    assert_eq!(
        message
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(id.0)
    );
    assert_eq!(message.data, br#"{"x":1}"#, "payload kept byte for byte");
    assert_eq!(
        header(message, envelope::ERROR_CLASS).as_deref(),
        Some("exhausted")
    );
    assert!(
        header(message, envelope::ERROR)
            .unwrap_or_default()
            .contains("service unavailable")
    );
    assert_eq!(
        envelope::header_int(&message.properties, envelope::ATTEMPTS),
        Some(3)
    );
    assert!(header(message, envelope::FAILED_AT).is_some());
    assert!(header(message, envelope::WORKER).is_some());
    assert_eq!(
        header(message, envelope::QUEUE).as_deref(),
        Some(stage.queue.as_str())
    );
    stage.end().await;
}

/// Given a handler that fails permanently, then the job is dead-lettered after one attempt.
#[tokio::test]
async fn permanent_failure_is_dead_lettered_at_once() {
    let (recorder, registry) = recorded("bad-input", |_| Err(JobError::permanent("no such user")));
    let stage = Stage::new("permanent", registry).await;

    stage.submit("bad-input", json!({})).await;

    let dead = stage.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header(&dead[0], envelope::ERROR).as_deref(),
        Some("no such user")
    );
    assert_eq!(recorder.calls().len(), 1, "never retried");
    stage.end().await;
}

/// Given a handler that takes a typed payload, then a job that fits it runs with its fields, and
/// one that does not is dead-lettered as permanent with serde's reason, the handler never run.
#[tokio::test]
async fn typed_payloads_are_parsed_or_dead_lettered() {
    #[derive(serde::Deserialize)]
    struct Email {
        to: String,
    }
    let (sent, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register("send", move |email: Email, _ctx: JobContext| {
        let sent = sent.clone();
        async move {
            let _ = sent.send(email.to);
            Ok(None)
        }
    });
    let stage = Stage::new("typed", registry).await;

    stage
        .submit("send", json!({"to": "ada@example.com", "cc": []}))
        .await;
    stage
        .submit("send", json!({"from": "ada@example.com"}))
        .await;

    let dead = stage.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("permanent")
    );
    let error = header(&dead[0], envelope::ERROR).unwrap_or_default();
    assert!(error.contains("missing field `to`"), "{error}");
    let to = tokio::time::timeout(DEADLINE, seen.recv()).await;
    assert_eq!(to.ok().flatten().as_deref(), Some("ada@example.com"));
    assert!(seen.try_recv().is_err(), "the handler ran once");
    stage.end().await;
}

/// Given a job whose kind no handler serves, then it is dead-lettered with that reason.
#[tokio::test]
async fn unknown_kind_is_dead_lettered() {
    let (_recorder, registry) = recorded("known", |_| Ok(None));
    let stage = Stage::new("unknown", registry).await;

    stage.submit("mystery", json!({})).await;

    let dead = stage.dead_letters(1).await;
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("unknown-kind")
    );
    assert!(
        header(&dead[0], envelope::ERROR)
            .unwrap_or_default()
            .contains("mystery")
    );
    assert!(stage.worker_is_running());
    stage.end().await;
}

/// A registry whose `kind` handler is recorded, then does `first` on attempt 1 and succeeds on
/// later attempts.
fn misbehaving_on_first_attempt<F, Fut>(kind: &str, first: F) -> (Recorder, Registry)
where
    F: Fn() -> Fut + Send + Sync + Copy + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let seen = recorder.clone();
    registry.register(kind, move |payload: Value, ctx: JobContext| {
        let seen = seen.clone();
        async move {
            seen.record(payload, &ctx);
            if ctx.attempt == 1 {
                first().await;
            }
            Ok(None)
        }
    });
    (recorder, registry)
}

/// Given a handler that panics before it returns its future (as a custom `Deserialize` or code
/// before the first `.await` can), then the worker survives and the job is retried.
#[tokio::test]
async fn handler_panic_before_its_future_is_retried() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let seen = recorder.clone();
    registry.register("eager", move |payload: Value, ctx: JobContext| {
        assert!(
            ctx.attempt > 1,
            "panicking at once on attempt {}",
            ctx.attempt
        );
        seen.record(payload, &ctx);
        std::future::ready(Ok(None))
    });
    let mut stage = Stage::new("eager-panic", registry).await;

    stage.submit("eager", json!({})).await;

    let calls = recorder.wait_for(1, DEADLINE).await;
    assert_eq!(calls[0].attempt, 2, "attempt 1 panicked and was retried");
    assert!(stage.worker_is_running());
    stage.stop_worker().await;
    assert_eq!(stage.ready().await, (0, 0));
    stage.end().await;
}

/// Given a handler that panics on its first attempt, then the worker survives, the panic is
/// a retryable failure, and the second attempt succeeds.
#[tokio::test]
async fn handler_panic_is_retried() {
    let (recorder, registry) =
        misbehaving_on_first_attempt("explosive", || async { panic!("kaboom") });
    let mut stage = Stage::new("panic", registry).await;

    stage.submit("explosive", json!({})).await;

    let calls = recorder.wait_for(2, DEADLINE).await;
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(
        stage.worker_is_running(),
        "a panicking handler does not kill the worker"
    );
    stage.stop_worker().await;
    assert_eq!(stage.ready().await.1, 0);
    stage.end().await;
}

/// Given a queue with a 300 ms job timeout and a handler that hangs on its first attempt, then
/// the overrun counts as a retryable failure and the second attempt succeeds.
#[tokio::test]
async fn overrunning_handler_times_out_and_is_retried() {
    let (recorder, registry) =
        misbehaving_on_first_attempt("slow", || tokio::time::sleep(Duration::from_secs(3600)));
    let stage = Stage::with("timeout", registry, |q| {
        q.job_timeout = Duration::from_millis(300)
    })
    .await;

    stage.submit("slow", json!({})).await;

    let calls = recorder.wait_for(2, DEADLINE).await;
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    stage.end().await;
}
