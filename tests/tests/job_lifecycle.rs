//! A job's life through a real broker and an in-process worker: done, retried with backoff,
//! exhausted, permanent, panicking, overrunning, unknown kind.

use std::time::Duration;

use serde_json::json;
use warren_core::envelope::{self, NewJob};
use warren_tests::*;
use warren_workers::{JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(30);

/// Given a worker for `echo`, when a job is submitted, then the handler runs once with the
/// payload and the job is acked (nothing is left in the queue after the worker stops).
#[tokio::test]
async fn submitted_job_is_processed_and_acked() {
    let queue = unique_queue("done");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |call| Ok(Some(call.payload.clone())));
    let worker = start_worker(&config, registry, &[&queue]);

    let id = dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({"n": 7})))
        .await
        .expect("submitted");

    let calls = recorder.wait_for(1, DEADLINE).await;
    assert_eq!(calls[0].id, id.0);
    assert_eq!(calls[0].attempt, 1);
    assert_eq!(calls[0].payload, json!({"n": 7}));
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(
        ready_count(&channel, &queue).await,
        0,
        "the job was acked, not requeued"
    );
    assert_eq!(
        ready_count(&channel, &warren_core::topology::dead_queue(&queue)).await,
        0
    );
    assert_eq!(recorder.calls().len(), 1, "processed exactly once");
    cleanup(&channel, &[&queue]).await;
}

/// Given a handler that fails twice, when the job runs, then it sees attempts 1, 2, 3 with the
/// configured backoff (1 s, then 2 s, no jitter) between them, and succeeds on the third.
#[tokio::test]
async fn failing_twice_then_succeeding_retries_with_backoff() {
    let queue = unique_queue("retry");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "flaky", |call| match call.attempt {
        1 | 2 => Err(JobError::retry("not yet")),
        _ => Ok(None),
    });
    let worker = start_worker(&config, registry, &[&queue]);

    dispatcher
        .submit(NewJob::new(&queue, "flaky", &json!({})))
        .await
        .expect("submitted");

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
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(
        ready_count(&channel, &warren_core::topology::dead_queue(&queue)).await,
        0
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given a handler that always fails (retryable) and 3 attempts allowed, then after the third
/// attempt the job is in `<queue>.dead` with the reason, attempts, time and worker headers.
#[tokio::test]
async fn exhausted_job_is_dead_lettered_with_reason_headers() {
    let queue = unique_queue("exhaust");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "doomed", |_| {
        Err(JobError::retry("service unavailable"))
    });
    let worker = start_worker(&config, registry, &[&queue]);

    let id = dispatcher
        .submit(NewJob::new(&queue, "doomed", &json!({"x": 1})))
        .await
        .expect("submitted");

    let channel = connect().await.create_channel().await.expect("channel");
    let dead = take_messages(
        &channel,
        &warren_core::topology::dead_queue(&queue),
        1,
        DEADLINE,
    )
    .await;
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
        Some(queue.as_str())
    );
    worker.stop().await;
    cleanup(&channel, &[&queue]).await;
}

/// Given a handler that fails permanently, then the job is dead-lettered after one attempt.
#[tokio::test]
async fn permanent_failure_is_dead_lettered_at_once() {
    let queue = unique_queue("permanent");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "bad-input", |_| {
        Err(JobError::permanent("no such user"))
    });
    let worker = start_worker(&config, registry, &[&queue]);

    dispatcher
        .submit(NewJob::new(&queue, "bad-input", &json!({})))
        .await
        .expect("submitted");

    let channel = connect().await.create_channel().await.expect("channel");
    let dead = take_messages(
        &channel,
        &warren_core::topology::dead_queue(&queue),
        1,
        DEADLINE,
    )
    .await;
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("permanent")
    );
    assert_eq!(
        header(&dead[0], envelope::ERROR).as_deref(),
        Some("no such user")
    );
    assert_eq!(recorder.calls().len(), 1, "never retried");
    worker.stop().await;
    cleanup(&channel, &[&queue]).await;
}

/// Given a job whose kind no handler serves, then it is dead-lettered with that reason.
#[tokio::test]
async fn unknown_kind_is_dead_lettered() {
    let queue = unique_queue("unknown");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let mut registry = Registry::new();
    Recorder::new().handle(&mut registry, "known", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);

    dispatcher
        .submit(NewJob::new(&queue, "mystery", &json!({})))
        .await
        .expect("submitted");

    let channel = connect().await.create_channel().await.expect("channel");
    let dead = take_messages(
        &channel,
        &warren_core::topology::dead_queue(&queue),
        1,
        DEADLINE,
    )
    .await;
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("unknown-kind")
    );
    assert!(
        header(&dead[0], envelope::ERROR)
            .unwrap_or_default()
            .contains("mystery")
    );
    assert!(worker.is_running());
    worker.stop().await;
    cleanup(&channel, &[&queue]).await;
}

/// Given a handler that panics on its first attempt, then the worker survives, the panic is
/// a retryable failure, and the second attempt succeeds.
#[tokio::test]
async fn handler_panic_is_retried() {
    let queue = unique_queue("panic");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let seen = recorder.clone();
    registry.register(
        "explosive",
        move |payload: serde_json::Value, ctx: warren_workers::JobContext| {
            let seen = seen.clone();
            async move {
                seen.record(payload, &ctx);
                if ctx.attempt == 1 {
                    panic!("kaboom");
                }
                Ok(None)
            }
        },
    );
    let worker = start_worker(&config, registry, &[&queue]);

    dispatcher
        .submit(NewJob::new(&queue, "explosive", &json!({})))
        .await
        .expect("submitted");

    let calls = recorder.wait_for(2, DEADLINE).await;
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    assert!(
        worker.is_running(),
        "a panicking handler does not kill the worker"
    );
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(
        ready_count(&channel, &warren_core::topology::dead_queue(&queue)).await,
        0
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given a queue with a 300 ms job timeout and a handler that hangs on its first attempt, then
/// the overrun counts as a retryable failure and the second attempt succeeds.
#[tokio::test]
async fn overrunning_handler_times_out_and_is_retried() {
    let queue = unique_queue("timeout");
    let mut config = config(&[&queue]);
    if let Some(q) = config.queues.get_mut(&queue) {
        q.job_timeout = Duration::from_millis(300);
    }
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let seen = recorder.clone();
    registry.register(
        "slow",
        move |payload: serde_json::Value, ctx: warren_workers::JobContext| {
            let seen = seen.clone();
            async move {
                seen.record(payload, &ctx);
                if ctx.attempt == 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok(None)
            }
        },
    );
    let worker = start_worker(&config, registry, &[&queue]);

    dispatcher
        .submit(NewJob::new(&queue, "slow", &json!({})))
        .await
        .expect("submitted");

    let calls = recorder.wait_for(2, DEADLINE).await;
    assert_eq!(calls.iter().map(|c| c.attempt).collect::<Vec<_>>(), [1, 2]);
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}
