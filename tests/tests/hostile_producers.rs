//! Producers that do not play by Warren's rules: plain AMQP clients with RabbitMQ's default
//! 128 KiB frames, and messages written byte by byte ([`warren_tests::raw_amqp`]), with content
//! no well-behaved client would send but RabbitMQ passes on. Whatever arrives, the worker process
//! survives and each message reaches one clear outcome (processed, or dead-lettered), exactly
//! once: a `CC` header does not multiply a job, forged `x-warren-*` fields do not reach its
//! dead letter, a header as big as the frame allows is received, and what Warren writes itself
//! stays small.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::{envelope, topology};
use warren_dispatcher::Dispatcher;
use warren_tests::raw_amqp::{self, RawMessage};
use warren_tests::*;
use warren_workers::{JobError, Registry, Worker};

const DEADLINE: Duration = Duration::from_secs(30);

/// RabbitMQ's default frame size. A header ~120 KiB big only arrives in one frame this large,
/// so the worker asks for it whatever Warren's default is.
const FRAME_MAX: u32 = 128 * 1024;

/// Every settlement the worker reported: (job id, outcome, ack sent).
type Settlements = Arc<Mutex<Vec<(String, &'static str, bool)>>>;

/// `url` with `frame_max` set in its query string.
fn with_frame_max(url: &str, frame_max: u32) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}frame_max={frame_max}")
}

/// A worker on `queue` (connections with [`FRAME_MAX`] frames) running `registry`, reporting
/// each settlement, and the dispatcher that declared the queue.
async fn start(queue: &str, registry: Registry) -> (RunningWorker, Settlements, Dispatcher) {
    let mut config = config(&[queue]);
    config.broker.url = with_frame_max(&config.broker.url, FRAME_MAX);
    let dispatcher = dispatcher(&config).await;
    let settled: Settlements = Arc::default();
    let seen = settled.clone();
    let worker = Worker::new(config, registry)
        .queue(queue)
        .on_settled(move |s| {
            let id = s.id.unwrap_or("(no id)").to_owned();
            seen.lock().expect("lock").push((id, s.outcome, s.sent));
        });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    (RunningWorker { shutdown, task }, settled, dispatcher)
}

async fn wait_settled(settled: &Settlements, n: usize) {
    let until = Instant::now() + DEADLINE;
    while settled.lock().expect("lock").len() < n {
        assert!(
            Instant::now() < until,
            "only {:?} of {n} jobs settled within {DEADLINE:?}",
            settled.lock().expect("lock")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Given a worker for `echo` on 128 KiB frames, when a raw producer publishes an `echo` job
/// whose header table is nested 20,000 deep (~117 KiB: lapin's recursive parser overflowed
/// its I/O thread's 2 MiB stack on it and aborted the process), then the job is settled once,
/// as done (its handler ran once) or dead-lettered, the worker keeps running, and a normal job
/// submitted after it is processed too.
#[tokio::test]
async fn a_header_nested_20000_deep_reaches_one_outcome_and_the_worker_survives() {
    let queue = unique_queue("deep-header");
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |call| Ok(Some(call.payload.clone())));
    let (worker, settled, dispatcher) = start(&queue, registry).await;

    let headers = raw_amqp::deep_headers(20_000);
    let message = RawMessage::job(&queue, "deep-1", "echo", &headers, br#"{"n":1}"#);
    raw_amqp::publish_once(&broker_url(), &message)
        .await
        .expect("RabbitMQ accepts and confirms the deep header");

    wait_settled(&settled, 1).await;
    let (id, outcome, sent) = settled.lock().expect("lock")[0].clone();
    assert_eq!(id, "deep-1");
    assert!(sent, "the ack was sent");
    let channel = connect().await.create_channel().await.expect("channel");
    match outcome {
        "done" => {
            let calls = recorder.calls();
            assert_eq!(calls.len(), 1, "handled once: {calls:?}");
            assert_eq!(calls[0].id, "deep-1");
            assert_eq!(calls[0].payload, json!({"n": 1}));
        }
        "dead-lettered" => {
            let dead = warren_core::topology::dead_queue(&queue);
            assert_eq!(ready_count(&channel, &dead).await, 1);
        }
        other => panic!("expected done or dead-lettered, got {other}"),
    }
    assert!(worker.is_running(), "the worker survived");

    let after = warren_core::NewJob::new(&queue, "echo", &json!({"n": 2}));
    let after = dispatcher.submit(after).await.expect("submitted");
    wait_settled(&settled, 2).await;
    assert_eq!(
        settled.lock().expect("lock")[1],
        (after.0, "done", true),
        "a normal job after it is processed"
    );
    assert_eq!(settled.lock().expect("lock").len(), 2, "each settled once");

    worker.stop().await;
    assert_eq!(ready_count(&channel, &queue).await, 0, "nothing requeued");
    cleanup(&channel, &[&queue]).await;
}

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
/// header and a 20 KB one, then the worker receives it and processes it exactly once: its
/// connection is not closed by an oversized frame (as it was with 16 KiB frames, every ack of
/// the connection lost and the job redelivered into the same crash), so nothing runs twice.
#[tokio::test]
async fn a_header_as_big_as_the_default_frame_allows_is_processed_once() {
    let queue = unique_queue("bighdr");
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let (worker, settled, _dispatcher) = start(&queue, registry).await;
    let mut headers = FieldTable::default();
    headers.insert("x-big".into(), text(&"b".repeat(100_000)));
    headers.insert("x-twenty-k".into(), text(&"t".repeat(20_000)));
    let producer = confirm_channel().await;

    let id = publish_raw(&producer, &queue, "echo", headers).await;
    wait_settled(&settled, 1).await;

    // A worker whose connection the frame closed runs the job again within a second or two:
    // watch for that long before stopping it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.stop().await;
    assert_eq!(
        *settled.lock().expect("lock"),
        [(id, "done", true)],
        "processed once, its ack sent"
    );
    assert_eq!(recorder.calls().len(), 1);
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0);
    cleanup(&channel, &[&queue]).await;
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
