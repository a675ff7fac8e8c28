//! A consumer the broker ends is subscribed again: a worker serving several queues never
//! leaves one of them silently unconsumed (RabbitMQ sends `basic.cancel` when a queue is
//! deleted, and on 4.x when a delivery outlives the consumer timeout).

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use warren_core::NewJob;
use warren_tests::*;
use warren_workers::Registry;

const DEADLINE: Duration = Duration::from_secs(30);

/// Given a worker on queues A and B, when A is deleted (its consumer cancelled by the broker)
/// and declared again a little later, then B is served meanwhile and a job submitted to the new
/// A is processed: the worker subscribed again, with backoff while A was missing.
#[tokio::test]
async fn a_deleted_and_redeclared_queue_is_consumed_again() {
    let a = unique_queue("cancel-a");
    let b = unique_queue("cancel-b");
    let config = config(&[&a, &b]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&a, &b]);
    let channel = connect().await.create_channel().await.expect("channel");
    let submit = |queue: &str, n: u32| NewJob::new(queue, "echo", &json!({ "n": n }));
    dispatcher.submit(submit(&a, 1)).await.expect("submitted");
    recorder.wait_for(1, DEADLINE).await;

    channel
        .queue_delete(a.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("deleting A");
    dispatcher
        .submit(submit(&b, 2))
        .await
        .expect("submitted to B");
    recorder.wait_for(2, DEADLINE).await;
    dispatcher
        .apply_topology(std::slice::from_ref(&a))
        .await
        .expect("declaring A again");
    dispatcher
        .submit(submit(&a, 3))
        .await
        .expect("submitted to the new A");

    let calls = recorder.wait_for(3, DEADLINE).await;
    assert_eq!(calls[2].payload, json!({"n": 3}));
    assert!(worker.is_running());
    worker.stop().await;
    assert_eq!(ready_count(&channel, &a).await, 0);
    cleanup(&channel, &[&a, &b]).await;
    dispatcher.close().await;
}
