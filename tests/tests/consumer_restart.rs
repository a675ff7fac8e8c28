//! A consumer the broker ends is subscribed again: a worker serving several queues never
//! leaves one of them silently unconsumed (RabbitMQ sends `basic.cancel` when a queue is
//! deleted, and on 4.x when a delivery outlives the consumer timeout) — nor when the broker
//! drops a queue without a cancel (RabbitMQ 3.10 does so about once in a hundred quorum-queue
//! deletions; the worker's watchdog notices, workers/src/watchdog.rs).

use std::time::Duration;

use lapin::options::QueueDeleteOptions;
use serde_json::json;
use warren_core::NewJob;
use warren_core::config::QueueType;
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

/// Given a worker on a classic queue A and a queue B, when the broker's queue forgets A's
/// consumer without telling its channel (done here with `rabbitmqctl eval`: the state RabbitMQ
/// 3.10 leaves now and then after deleting a quorum queue, where the worker waits on a consumer
/// no queue serves), then a job submitted to A afterwards is processed: the watchdog found A
/// served by no consumer, cancelled the stale one and the worker subscribed again. Without the
/// watchdog the job waits for ever (the worker believes it consumes A).
#[tokio::test]
async fn a_consumer_the_broker_forgot_without_a_cancel_is_replaced() {
    let a = unique_queue("forgot-a");
    let b = unique_queue("forgot-b");
    let mut config = config(&[&a, &b]);
    if let Some(queue) = config.queues.get_mut(&a) {
        queue.queue_type = QueueType::Classic;
    }
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&a, &b]);
    let channel = connect().await.create_channel().await.expect("channel");
    let submit = |queue: &str, n: u32| NewJob::new(queue, "echo", &json!({ "n": n }));
    dispatcher.submit(submit(&a, 1)).await.expect("submitted");
    recorder.wait_for(1, DEADLINE).await;

    // The queue process drops its consumers with no `basic.cancel` to their channel (the
    // call is `basic_cancel` on RabbitMQ 3.x, `stop_consumer` on 4.x).
    let forget = format!(
        "QName = rabbit_misc:r(<<\"/\">>, queue, <<\"{a}\">>), \
         {{ok, Q}} = rabbit_amqqueue:lookup(QName), \
         QPid = amqqueue:get_pid(Q), \
         Consumers = rabbit_amqqueue:consumers(Q), \
         Stop = case rabbit_misc:version() of \
             \"3.\" ++ _ -> fun(Ch, Tag) -> {{basic_cancel, Ch, Tag, undefined, <<\"test\">>}} end; \
             _ -> fun(Ch, Tag) -> {{stop_consumer, #{{pid => Ch, consumer_tag => Tag, \
                                                     user => <<\"test\">>}}}} end \
         end, \
         [gen_server2:call(QPid, Stop(element(1, C), element(2, C)), infinity) || C <- Consumers], \
         length(Consumers)."
    );
    let forgotten = tokio::task::spawn_blocking(move || broker_ctl(&["-q", "eval", &forget]))
        .await
        .expect("rabbitmqctl eval");
    assert_eq!(
        forgotten.trim(),
        "1",
        "the queue forgot the worker's consumer"
    );
    dispatcher
        .submit(submit(&a, 2))
        .await
        .expect("submitted to A");
    dispatcher
        .submit(submit(&b, 3))
        .await
        .expect("submitted to B");

    let calls = recorder.wait_for(3, DEADLINE).await;
    let mut payloads: Vec<_> = calls.iter().map(|c| c.payload["n"].clone()).collect();
    payloads.sort_by_key(|n| n.as_u64());
    assert_eq!(payloads, [json!(1), json!(2), json!(3)]);
    assert!(worker.is_running());
    worker.stop().await;
    assert_eq!(ready_count(&channel, &a).await, 0);
    cleanup(&channel, &[&a, &b]).await;
    dispatcher.close().await;
}
