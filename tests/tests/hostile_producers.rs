//! Producers that do not play by Warren's rules: messages written byte by byte
//! ([`warren_tests::raw_amqp`]) with content no well-behaved client would send but RabbitMQ
//! passes on. Whatever arrives, the worker process survives and each message reaches one clear
//! outcome (processed, or dead-lettered), exactly once.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_dispatcher::Dispatcher;
use warren_tests::raw_amqp::{self, RawMessage};
use warren_tests::*;
use warren_workers::{Registry, Worker};

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
