//! The broker's consumer timeout is Warren's last resort, and bounded.
//!
//! Each consumer asks for `x-consumer-timeout` (from `job_timeout`, see
//! `Config::consumer_timeout`), so Warren's own `job_timeout` stops a handler first. Only a
//! handler that blocks its thread cannot be stopped; RabbitMQ 4.x then cancels the consumer and
//! takes the delivery back (without counting it towards the delivery limit). Warren subscribes
//! again, publishes nothing for the run it lost, and counts deliveries itself
//! (`x-acquired-count`), so the job ends in `<queue>.dead` after `delivery_limit`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warren_core::NewJob;
use warren_core::config::Config;
use warren_core::envelope::{ERROR, ERROR_CLASS};
use warren_core::topology::dead_queue;
use warren_tests::*;
use warren_workers::{JobContext, JobError, Registry};

/// Whether the broker honours `x-consumer-timeout` (RabbitMQ 3.12 and later; 3.10 ignores it).
fn broker_has_consumer_timeouts() -> bool {
    let version = broker_ctl(&["version"]);
    let mut parts = version
        .trim()
        .split('.')
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (3, 12)
}

/// A worker on `slow` and `fast`: 4 slots, prefetch 4, every job_timeout 1 s, operation
/// timeout 2 s, so the consumer timeout Warren asks for is 2 rounds × 1 s + 1 s + 2 s = 5 s.
fn timeout_config(slow: &str, fast: &str) -> Config {
    let mut config = config(&[slow, fast]);
    config.worker.concurrency = 4;
    config.worker.prefetch = Some(4);
    config.broker.operation_timeout = Duration::from_secs(2);
    for queue in config.queues.values_mut() {
        queue.job_timeout = Duration::from_secs(1);
        queue.delivery_limit = 2;
    }
    config
}

/// Given a worker serving two queues, when a job on one of them blocks its thread for 7 s
/// (longer than the 5 s consumer timeout, and Warren's 1 s job_timeout cannot stop it) and then
/// fails, then
/// the broker takes it back each time, Warren subscribes again and publishes nothing (no retry)
/// for the lost runs, the job runs exactly `delivery_limit + 1` = 3 times and ends in `<slow>.dead` with
/// class `delivery-limit`; the other queue is served all along, and the slow queue is consumed
/// again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_past_the_consumer_timeout_ends_in_the_dead_letters_while_other_queues_flow() {
    if !broker_has_consumer_timeouts() {
        eprintln!("skipped: this broker ignores x-consumer-timeout (RabbitMQ 3.10)");
        return;
    }
    let slow = unique_queue("ctimeout-slow");
    let fast = unique_queue("ctimeout-fast");
    let config = timeout_config(&slow, &fast);
    assert_eq!(
        config.consumer_timeout(&[&slow, &fast]),
        Duration::from_secs(5)
    );
    let dispatcher = dispatcher(&config).await;
    let runs: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let blocking = runs.clone();
    registry.register("block", move |_: Value, _: JobContext| {
        let runs = blocking.clone();
        async move {
            runs.lock().expect("runs").push(Instant::now());
            // Blocking code: no `.await` for Warren's job_timeout to stop it at.
            std::thread::sleep(Duration::from_secs(7));
            // A failure that would be retried, had the broker not taken the delivery back.
            Err(JobError::retry("the stuck call failed in the end"))
        }
    });
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&slow, &fast]);
    let channel = connect().await.create_channel().await.expect("channel");

    let started = Instant::now();
    let stuck = dispatcher
        .submit(NewJob::new(&slow, "block", &json!({})))
        .await
        .expect("submitted");
    // The fast queue keeps flowing: one job a second, each processed.
    let mut fast_jobs = 0;
    let dead = loop {
        fast_jobs += 1;
        dispatcher
            .submit(NewJob::new(&fast, "echo", &json!({ "n": fast_jobs })))
            .await
            .expect("submitted to the fast queue");
        recorder.wait_for(fast_jobs, Duration::from_secs(5)).await;
        if ready_count(&channel, &dead_queue(&slow)).await > 0 {
            break take_messages(&channel, &dead_queue(&slow), 1, Duration::from_secs(5)).await;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no dead letter after 60 s; runs: {}",
            runs.lock().expect("runs").len()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };

    let dead = &dead[0];
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(stuck.0.as_str())
    );
    assert_eq!(header(dead, ERROR_CLASS).as_deref(), Some("delivery-limit"));
    let error = header(dead, ERROR).unwrap_or_default();
    assert!(error.contains("delivered 4 times"), "{error}");
    assert_eq!(runs.lock().expect("runs").len(), 3, "runs of the stuck job");
    assert!(fast_jobs >= 10, "the fast queue was served all along");

    // Consumed again: a quick job on the slow queue is processed.
    dispatcher
        .submit(NewJob::new(&slow, "echo", &json!({ "after": true })))
        .await
        .expect("submitted");
    let calls = recorder
        .wait_for(fast_jobs + 1, Duration::from_secs(15))
        .await;
    assert_eq!(calls[fast_jobs].payload, json!({ "after": true }));

    // Let the last blocked run end, then nothing is left anywhere: no retry and no second dead
    // letter were published for the runs the broker took back.
    tokio::time::sleep(Duration::from_secs(8)).await;
    worker.stop().await;
    assert_eq!(ready_count(&channel, &slow).await, 0);
    assert_eq!(ready_count(&channel, &dead_queue(&slow)).await, 0);
    assert_eq!(
        runs.lock().expect("runs").len(),
        3,
        "no run after the dead letter"
    );
    cleanup(&channel, &[&slow, &fast]).await;
    dispatcher.close().await;
}

/// Given a handler that always overruns its 500 ms job_timeout (an `.await` that never ends),
/// then Warren's own timeout stops each run long before any broker timeout, and after
/// `max_attempts` = 3 runs the job is in `<queue>.dead`, saying it timed out. On 3.10 and 4.x
/// alike: the broker's consumer timeout never comes into it.
#[tokio::test]
async fn a_job_that_always_overruns_ends_in_the_dead_letters_after_its_attempts() {
    let queue = unique_queue("overrun");
    let mut config = config(&[&queue]);
    if let Some(q) = config.queues.get_mut(&queue) {
        q.job_timeout = Duration::from_millis(500);
    }
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    let record = recorder.clone();
    registry.register("overrun", move |payload: Value, ctx: JobContext| {
        record.record(payload, &ctx);
        async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(None)
        }
    });
    let worker = start_worker(&config, registry, &[&queue]);
    let channel = connect().await.create_channel().await.expect("channel");
    let id = dispatcher
        .submit(NewJob::new(&queue, "overrun", &json!({})))
        .await
        .expect("submitted");
    // Attempts 1 s and 2 s apart (quick_queue), each cut at 500 ms.
    let dead = take_messages(&channel, &dead_queue(&queue), 1, Duration::from_secs(30)).await;
    let dead = &dead[0];
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(id.0.as_str())
    );
    assert_eq!(header(dead, ERROR_CLASS).as_deref(), Some("exhausted"));
    let error = header(dead, ERROR).unwrap_or_default();
    assert!(
        error.contains("gave up after 3 attempts") && error.contains("timed out after 500ms"),
        "{error}"
    );
    let attempts: Vec<u32> = recorder.calls().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    worker.stop().await;
    assert_eq!(ready_count(&channel, &queue).await, 0);
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}

/// Given a classic work queue, then a worker consumes it: RabbitMQ 4.3 refuses
/// `x-consumer-timeout` on classic queues, so Warren asks for it on quorum queues only.
#[tokio::test]
async fn a_classic_queue_is_consumed_without_a_consumer_timeout() {
    let queue = unique_queue("classic-timeout");
    let mut config = config(&[&queue]);
    if let Some(q) = config.queues.get_mut(&queue) {
        q.queue_type = warren_core::config::QueueType::Classic;
    }
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);
    dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({ "classic": true })))
        .await
        .expect("submitted");
    let calls = recorder.wait_for(1, Duration::from_secs(20)).await;
    assert_eq!(calls[0].payload, json!({ "classic": true }));
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}
