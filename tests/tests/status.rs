//! `warren status` against the real broker: the numbers it prints (as `--json`) are the jobs
//! the test put there — ready, dead-lettered, held by a consumer — and without the management
//! API it still counts over AMQP and says the API is unreachable.
//!
//! Each test works on a queue of its own ([`unique_queue`]) in the default vhost.

use std::process::Output;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use warren_core::NewJob;
use warren_core::topology::dead_queue;
use warren_tests::{
    Recorder, binary, broker_url, cleanup, config, connect, dispatcher, ready_count, start_worker,
    unique_queue,
};
use warren_workers::{JobError, Registry};

/// How long one `warren status` may take (a broker that is down takes 5 s to give up on).
const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `warren status --queue QUEUE ARGS...` against the test broker, with `env` on top.
async fn warren_status(queue: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(binary("warren"));
    command
        .arg("status")
        .args(["--queue", queue])
        .args(args)
        .current_dir(std::env::temp_dir())
        .env(warren_core::config::AMQP_URL_ENV, broker_url())
        .env_remove(warren_core::config::CONFIG_ENV)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("warren status ends within the deadline")
        .expect("warren status runs")
}

/// `warren status --queue QUEUE --json`, parsed; panics unless it exits 0.
async fn status_json(queue: &str, env: &[(&str, &str)]) -> Value {
    let output = warren_status(queue, &["--json"], env).await;
    assert!(
        output.status.success(),
        "warren status failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "not JSON ({err}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// The consumers of `queue`, as a passive declare counts them.
async fn consumers(channel: &lapin::Channel, queue: &str) -> u32 {
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("the queue exists")
        .consumer_count()
}

/// The row of `queue`.
fn row<'a>(status: &'a Value, queue: &str) -> &'a Value {
    status["queues"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["queue"] == queue))
        .unwrap_or_else(|| panic!("no row for {queue} in {status:#}"))
}

/// Given 3 jobs dead-lettered by a worker and 5 waiting, status shows 5 ready, 3 dead, no
/// consumer; when a consumer holds one of them, 4 ready, 1 consumer, and (once the
/// management API has sampled it) 1 unacked.
#[tokio::test]
async fn status_shows_what_was_submitted() {
    // Given: a worker that dead-letters every `doomed` job; three of them.
    let queue = unique_queue("status");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let channel = connect().await.create_channel().await.expect("channel");
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "doomed", |_| {
        Err(JobError::permanent("dies on purpose"))
    });
    let worker = start_worker(&config, registry, &[&queue]);
    for n in 0..3 {
        let job = NewJob::new(&queue, "doomed", &json!({ "n": n }));
        dispatcher.submit(job).await.expect("submitted");
    }
    recorder.wait_for(3, Duration::from_secs(30)).await;
    let dead = dead_queue(&queue);
    let until = Instant::now() + Duration::from_secs(30);
    while ready_count(&channel, &dead).await < 3 {
        assert!(
            Instant::now() < until,
            "3 jobs were not dead-lettered in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    // A quorum queue forgets a closed channel's consumer a moment after the close.
    let until = Instant::now() + Duration::from_secs(30);
    while consumers(&channel, &queue).await > 0 {
        assert!(
            Instant::now() < until,
            "the stopped worker's consumer stayed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Five more, with no worker.
    for n in 0..5 {
        let job = NewJob::new(&queue, "later", &json!({ "n": n }));
        dispatcher.submit(job).await.expect("submitted");
    }

    // When
    let status = status_json(&queue, &[]).await;

    // Then: counted now over AMQP, right after the fact.
    let shown = row(&status, &queue);
    assert_eq!(shown["exists"], true, "{status:#}");
    assert_eq!(shown["ready"], 5, "{status:#}");
    assert_eq!(shown["dead"], 3, "{status:#}");
    assert_eq!(shown["consumers"], 0, "{status:#}");
    assert_eq!(status["management"]["reachable"], true, "{status:#}");
    assert_eq!(status["amqp"]["reachable"], true, "{status:#}");
    let address = status["management"]["address"].as_str().expect("address");
    assert!(address.starts_with("http"), "{address}");
    let sampled = shown["sampled"].as_array().expect("sampled columns");
    assert!(sampled.contains(&json!("unacked")), "{status:#}");
    assert!(!sampled.contains(&json!("ready")), "{status:#}");
    assert!(status["delay_levels"]["messages"].is_u64(), "{status:#}");

    // Given: a consumer that holds one job unacknowledged.
    let consumer_channel = connect().await.create_channel().await.expect("channel");
    consumer_channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "status-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let held = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery within 10 s")
        .expect("a delivery")
        .expect("no error");

    // When / then: one consumer, four ready; unacked once the API has sampled it.
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let status = status_json(&queue, &[]).await;
        let shown = row(&status, &queue);
        assert_eq!(shown["consumers"], 1, "{status:#}");
        assert_eq!(shown["ready"], 4, "{status:#}");
        assert_eq!(shown["dead"], 3, "{status:#}");
        if shown["unacked"] == 1 {
            break;
        }
        assert!(
            Instant::now() < until,
            "the management API never sampled the unacked delivery: {status:#}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    drop(held);
    let _ = consumer_channel.close(200, "done".into()).await;
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}

/// With the management API on a closed port, status still shows the AMQP counts, says the API
/// is unreachable, leaves the sampled columns unknown, and never prints the API's password.
#[tokio::test]
async fn without_the_management_api_status_counts_over_amqp() {
    // Given: two ready jobs, and an API address where nothing listens.
    let queue = unique_queue("status-noapi");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    for n in 0..2 {
        let job = NewJob::new(&queue, "later", &json!({ "n": n }));
        dispatcher.submit(job).await.expect("submitted");
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("address").port()
    };
    let closed = format!("http://guest:mgmt-s3cr3t@127.0.0.1:{port}/");
    let env = [(warren_core::config::MANAGEMENT_URL_ENV, closed.as_str())];

    // When
    let status = status_json(&queue, &env).await;
    let text = warren_status(&queue, &[], &env).await;

    // Then
    assert_eq!(status["management"]["reachable"], false, "{status:#}");
    let error = status["management"]["error"].as_str().expect("an error");
    assert!(error.contains("unreachable"), "{error}");
    let shown = row(&status, &queue);
    assert_eq!(shown["ready"], 2, "{status:#}");
    assert_eq!(shown["dead"], 0, "{status:#}");
    assert_eq!(shown["consumers"], 0, "{status:#}");
    assert_eq!(shown["unacked"], Value::Null, "{status:#}");
    assert_eq!(shown["publish_rate"], Value::Null, "{status:#}");
    assert_eq!(shown["sampled"], json!([]), "{status:#}");

    assert!(text.status.success());
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("management API unreachable"), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&queue))
        .unwrap_or_else(|| panic!("no row for {queue}: {stdout}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(columns[1], "2", "ready: {line}");
    assert_eq!(columns[2], "?", "unacked: {line}");
    for output in [&text.stdout, &text.stderr] {
        let output = String::from_utf8_lossy(output);
        assert!(!output.contains("mgmt-s3cr3t"), "{output}");
    }

    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}

/// `--watch 1s --json` prints one JSON object per refresh, each with the queue's count, until
/// SIGINT, after which it exits 0.
#[tokio::test]
async fn watch_refreshes_until_interrupted() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    // Given
    let queue = unique_queue("status-watch");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let job = NewJob::new(&queue, "later", &json!({}));
    dispatcher.submit(job).await.expect("submitted");

    // When
    let mut child = tokio::process::Command::new(binary("warren"))
        .args(["status", "--queue", &queue, "--json", "--watch", "1s"])
        .current_dir(std::env::temp_dir())
        .env(warren_core::config::AMQP_URL_ENV, broker_url())
        .env_remove(warren_core::config::CONFIG_ENV)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("warren status --watch starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    for _ in 0..3 {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("a refresh within the deadline")
            .expect("reading stdout")
            .expect("a line, not the end");
        let status: Value = serde_json::from_str(&line).expect("each line is one JSON object");
        assert_eq!(row(&status, &queue)["ready"], 1, "{status:#}");
    }
    let pid = child.id().expect("running").to_string();
    let signalled = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill runs");
    assert!(signalled.success());

    // Then
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("exits after SIGINT")
        .expect("waiting");
    assert!(status.success(), "{status:?}");
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}

/// On a classic queue the broker tells the age of the job at the head (from its timestamp):
/// status shows it, sampled.
#[tokio::test]
async fn a_classic_queue_shows_its_oldest_job_age() {
    // Given: a classic queue holding one job.
    let queue = unique_queue("status-age");
    let mut config = config(&[&queue]);
    if let Some(settings) = config.queues.get_mut(&queue) {
        settings.queue_type = warren_core::config::QueueType::Classic;
    }
    let dispatcher = dispatcher(&config).await;
    let job = NewJob::new(&queue, "later", &json!({}));
    dispatcher.submit(job).await.expect("submitted");

    // When / then: once the management API has sampled the queue.
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let status = status_json(&queue, &[]).await;
        let shown = row(&status, &queue);
        assert_eq!(shown["ready"], 1, "{status:#}");
        if let Some(age) = shown["oldest_age_secs"].as_u64() {
            assert!(age < 600, "{status:#}");
            let sampled = shown["sampled"].as_array().expect("sampled");
            assert!(sampled.contains(&json!("oldest_age_secs")), "{status:#}");
            break;
        }
        assert!(
            Instant::now() < until,
            "no oldest job age within 40 s: {status:#}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}
