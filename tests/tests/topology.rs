//! The AMQP topology on a real broker: the delay levels deliver on time, declaring is
//! idempotent, and a queue that exists with other arguments is a clear error.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use warren_core::delay;
use warren_core::topology::{self, TopologyError};
use warren_tests::*;

/// Given the delay levels, when messages are published with 1 s, 5 s and 70 s of delay, then
/// each reaches its work queue no earlier than asked and less than a second late.
#[tokio::test]
async fn delays_of_1_5_and_70_seconds_arrive_on_time() {
    let queues: Vec<String> = ["d1", "d5", "d70"]
        .iter()
        .map(|w| unique_queue(w))
        .collect();
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    let config = config(&names);
    let _dispatcher = dispatcher(&config).await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    let mut waits = Vec::new();
    for (queue, seconds) in names.iter().zip([1u64, 5, 70]) {
        let (exchange, key) = topology::delay_route(seconds, queue);
        let sent = Instant::now();
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                options,
                b"{}",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(
            confirm.is_ack() && confirm.take_message().is_none(),
            "routed into the delay levels"
        );
        let queue = queue.to_string();
        let channel = connection.create_channel().await.expect("channel");
        waits.push(tokio::spawn(async move {
            take_messages(&channel, &queue, 1, Duration::from_secs(seconds + 10)).await;
            (seconds, sent.elapsed())
        }));
    }
    for wait in waits {
        let (asked, took) = wait.await.expect("wait task");
        println!("asked {asked} s, arrived after {took:?}");
        assert!(
            took >= Duration::from_secs(asked) - Duration::from_millis(50),
            "{asked} s arrived early: {took:?}"
        );
        assert!(
            took < Duration::from_secs(asked) + Duration::from_secs(1),
            "{asked} s arrived late: {took:?}"
        );
    }
    cleanup(&channel, &names).await;
}

/// Given the topology was declared, when it is declared again, then nothing fails and the
/// same items are reported.
#[tokio::test]
async fn declaring_twice_is_harmless() {
    let queue = unique_queue("idem");
    let config = config(&[&queue]);
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let settings = config.queue(&queue);
    let first = topology::declare(&channel, &[(&queue, &settings)])
        .await
        .expect("first declare");
    let second = topology::declare(&channel, &[(&queue, &settings)])
        .await
        .expect("second declare");
    assert_eq!(first, second);
    assert!(
        first.len() > 2 * delay::LEVELS as usize,
        "delay levels declared too"
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given a queue that already exists as a classic queue, when Warren declares it as a quorum
/// queue, then the error names the queue and a differing argument.
#[tokio::test]
async fn conflicting_queue_arguments_are_a_clear_error() {
    let queue = unique_queue("conflict");
    let config = config(&[&queue]);
    let connection = connect().await;
    let setup = connection.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    setup
        .queue_declare(queue.as_str().into(), durable, FieldTable::default())
        .await
        .expect("classic queue");

    let channel = connection.create_channel().await.expect("channel");
    let settings = config.queue(&queue);
    let err = topology::declare(&channel, &[(&queue, &settings)])
        .await
        .expect_err("mismatch");

    match &err {
        TopologyError::Mismatch { what, name, detail } => {
            assert_eq!((*what, name), ("queue", &queue));
            // RabbitMQ names the first argument it finds different (type, dead-letter exchange, ...).
            assert!(detail.contains("inequivalent arg 'x-"), "{detail}");
        }
        other => panic!("expected a mismatch, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&queue) && text.contains("inequivalent arg"),
        "{text}"
    );

    // A worker started on that queue stops with the same clear error.
    let worker = start_worker(&config, warren_workers::Registry::new(), &[&queue]);
    let result = tokio::time::timeout(Duration::from_secs(30), worker.task)
        .await
        .expect("worker returns");
    let worker_err = result
        .expect("no panic")
        .expect_err("worker refuses to start");
    let text = worker_err.to_string();
    assert!(
        text.contains(&queue) && text.contains("inequivalent arg"),
        "{text}"
    );

    let cleanup_channel = connection.create_channel().await.expect("channel");
    cleanup(&cleanup_channel, &[&queue]).await;
}

/// Given a job waiting in the delay levels, when its work queue is deleted meanwhile, then at
/// the end of the delay it lands in `warren.unroutable` instead of circling in a delay queue.
#[tokio::test]
async fn a_delayed_job_for_a_deleted_queue_lands_in_unroutable() {
    let queue = unique_queue("gone");
    let config = config(&[&queue]);
    let _dispatcher = dispatcher(&config).await;
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let id = format!("unroutable-{queue}");

    let (exchange, key) = topology::delay_route(1, &queue);
    let properties = BasicProperties::default().with_message_id(id.as_str().into());
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    channel
        .basic_publish(
            exchange.as_str().into(),
            key.as_str().into(),
            options,
            b"{}",
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    cleanup(&channel, &[&queue]).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = take_messages(&channel, topology::UNROUTABLE, 1, Duration::from_secs(30)).await;
        let got_id = got[0]
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string());
        if got_id.as_deref() == Some(id.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "our job never reached {}",
            topology::UNROUTABLE
        );
    }
}

/// Given one long-lived dispatcher connection, when more than `channel_max` (2047) questions
/// about missing queues each had a channel closed by the broker (404), then channel ids are
/// reused and every later operation still works: a server-closed channel's error stays with
/// that channel, not with its id (lapin kept it and failed the id's next `channel.open` with
/// it: `warren serve` answered 503 after a few thousand 404s; patches/PATCHED.md).
#[tokio::test]
async fn channel_ids_closed_by_the_broker_are_usable_again() {
    let queue = unique_queue("chan-reuse");
    let missing = unique_queue("chan-reuse-missing");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    // One more than lapin's channel_max: every id is used, most of them by a channel the
    // broker closed.
    for (name, exists) in [(&missing, false), (&queue, true)] {
        for n in 0..2100 {
            let known = dispatcher
                .has_queue(name)
                .await
                .unwrap_or_else(|err| panic!("question {n} about `{name}` failed: {err}"));
            assert_eq!(known, Some(exists), "question {n} about `{name}`");
        }
    }
}
