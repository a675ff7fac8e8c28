//! What a producer in another language can put in a job's header table, and what Warren makes
//! of it: a `CC` header must not multiply the job, forged `x-warren-*` fields must not reach the
//! dead letter, a header as big as RabbitMQ's default frame size allows must be received (not
//! crash-loop the worker's connection), and what Warren writes itself stays small.
//!
//! The producer here is a plain lapin client with RabbitMQ's default 128 KiB frames, publishing
//! straight to `warren.jobs` as any AMQP client could (docs/PROTOCOL.md §3).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use warren_core::{envelope, topology};
use warren_tests::*;
use warren_workers::{JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(30);

/// Publishes a job of `kind` to `queue` with `headers`, as a foreign producer would, and waits
/// for the broker's confirm.
async fn publish_raw(channel: &Channel, queue: &str, kind: &str, headers: FieldTable) -> String {
    let id = format!("raw-{}", uuid::Uuid::now_v7().simple());
    let properties = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_type(kind.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    let confirm = channel
        .basic_publish(
            topology::JOBS_EXCHANGE.into(),
            queue.into(),
            BasicPublishOptions::default(),
            br#"{"from":"elsewhere"}"#,
            properties,
        )
        .await
        .expect("publish");
    let confirmation = confirm.await.expect("confirm");
    assert!(confirmation.is_ack(), "the broker took the job");
    id
}

/// A producer's confirm channel, on a connection with RabbitMQ's default frame size whatever
/// Warren's own default is.
async fn confirm_channel() -> Channel {
    let mut broker = warren_core::Config::default().broker;
    broker.url = format!("{}?frame_max=131072", broker_url());
    let connection = warren_core::connection::connect(&broker, "hostile-producer")
        .await
        .expect("the producer connects");
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

/// Given a queue allowing 4 attempts and a handler that always fails, when a producer's job
/// carries `CC` and `BCC` headers naming the delay levels' routing keys, then the job still runs
/// exactly 4 times and lands in the dead-letter queue once. (Copies used to carry `CC`, and
/// RabbitMQ routed every retry to each key too: thousands of runs.)
#[tokio::test]
async fn cc_and_bcc_headers_do_not_multiply_a_job() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "fail", |_| Err(JobError::retry("always")));
    let mut stage = Stage::with("cc", registry, |q| q.retry.max_attempts = 4).await;
    let keys: Vec<AMQPValue> = [1, 2, 4]
        .iter()
        .map(|s| text(&topology::delay_route(*s, &stage.queue).1))
        .chain([text(&stage.queue)])
        .collect();
    let mut headers = FieldTable::default();
    headers.insert(
        "CC".into(),
        AMQPValue::FieldArray(FieldArray::from(keys.clone())),
    );
    headers.insert("BCC".into(), AMQPValue::FieldArray(FieldArray::from(keys)));
    let producer = confirm_channel().await;

    let id = publish_raw(&producer, &stage.queue, "fail", headers).await;

    let dead = stage.dead_letters(1).await;
    assert_eq!(
        dead[0].properties.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("exhausted")
    );
    let dead_headers = dead[0].properties.headers().clone().unwrap_or_default();
    assert!(!dead_headers.contains_key("CC") && !dead_headers.contains_key("BCC"));
    stage.stop_worker().await;
    let attempts: Vec<u32> = recorder.calls().iter().map(|c| c.attempt).collect();
    assert_eq!(attempts, [1, 2, 3, 4], "each attempt ran once");
    assert_eq!(stage.ready().await, (0, 0), "no stray copy left anywhere");
    stage.end().await;
}

/// Given a job whose producer wrote Warren's dead-letter headers itself, when it fails for
/// good, then its dead letter says what really happened, and none of the producer's other
/// headers are carried over.
#[tokio::test]
async fn forged_warren_headers_do_not_reach_the_dead_letter() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "fail", |_| {
        Err(JobError::retry("real reason"))
    });
    let stage = Stage::with("forged", registry, |q| q.retry.max_attempts = 2).await;
    let mut headers = FieldTable::default();
    headers.insert(envelope::ERROR_CLASS.into(), text("unknown-kind"));
    headers.insert(envelope::ERROR.into(), text("forged"));
    headers.insert(envelope::ATTEMPTS.into(), AMQPValue::LongLongInt(99));
    headers.insert(envelope::WORKER.into(), text("evil"));
    headers.insert("x-warren-replayed".into(), text("forged"));
    headers.insert("x-custom".into(), text("left behind"));
    headers.insert(
        "traceparent".into(),
        text("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    let producer = confirm_channel().await;

    publish_raw(&producer, &stage.queue, "fail", headers).await;

    let dead = stage.dead_letters(1).await;
    let delivery = &dead[0];
    assert_eq!(
        header(delivery, envelope::ERROR_CLASS).as_deref(),
        Some("exhausted")
    );
    let error = header(delivery, envelope::ERROR).unwrap_or_default();
    assert!(error.contains("real reason"), "{error}");
    assert_eq!(
        envelope::header_int(&delivery.properties, envelope::ATTEMPTS),
        Some(2)
    );
    assert_ne!(header(delivery, envelope::WORKER).as_deref(), Some("evil"));
    let headers = delivery.properties.headers().clone().unwrap_or_default();
    assert!(!headers.contains_key("x-warren-replayed"));
    assert!(!headers.contains_key("x-custom"));
    assert!(
        header(delivery, "traceparent").is_some(),
        "trace context is carried"
    );
    assert_eq!(recorder.calls().len(), 2);
    stage.end().await;
}

/// Given a producer with RabbitMQ's default 128 KiB frames, when its job carries a 100 KB
/// header, then the worker receives it and processes it exactly once: its connection is not
/// closed by an oversized frame, so no ack is lost and nothing runs twice.
#[tokio::test]
async fn a_header_as_big_as_the_default_frame_allows_is_processed_once() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let settled = Arc::new(AtomicUsize::new(0));
    let queue = unique_queue("bighdr");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let counted = settled.clone();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = warren_workers::Worker::new(config.clone(), registry)
        .queue(&queue)
        .on_settled(move |s| {
            if s.sent && s.outcome == "done" {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
    let task = tokio::spawn(worker.run(shutdown.clone()));
    let mut headers = FieldTable::default();
    headers.insert("x-big".into(), text(&"b".repeat(100_000)));
    headers.insert("x-twenty-k".into(), text(&"t".repeat(20_000)));
    let producer = confirm_channel().await;

    publish_raw(&producer, &queue, "echo", headers).await;
    recorder.wait_for(1, DEADLINE).await;

    // A worker whose connection is closed by the frame runs the job again within a second or
    // two: watch for that long before stopping it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    shutdown.cancel();
    task.await.expect("worker task").expect("worker ran");
    assert_eq!(recorder.calls().len(), 1, "processed exactly once");
    assert_eq!(
        settled.load(Ordering::Relaxed),
        1,
        "done once, its ack sent"
    );
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0);
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}

/// Given a handler whose error is 200 KB of text, when the job fails for good, then its dead
/// letter is published (not refused or crash-looping on a frame too big) with the error cut to
/// a couple of KiB that says how much was left out.
#[tokio::test]
async fn a_huge_handler_error_is_capped_in_the_dead_letter() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "verbose", |_| {
        Err(JobError::permanent(format!(
            "it broke: {}",
            "x".repeat(200_000)
        )))
    });
    let stage = Stage::new("bigerr", registry).await;

    stage.submit("verbose", json!({})).await;

    let dead = stage.dead_letters(1).await;
    let error = header(&dead[0], envelope::ERROR).unwrap_or_default();
    assert!(
        error.len() <= envelope::MAX_ERROR_BYTES,
        "{} bytes",
        error.len()
    );
    assert!(error.starts_with("it broke: xxx"), "{error:.40}");
    assert!(error.ends_with("more bytes)"));
    assert_eq!(recorder.calls().len(), 1);
    stage.end().await;
}
