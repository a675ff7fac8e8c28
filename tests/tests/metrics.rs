//! `/metrics` counts a run exactly.
//!
//! A `warren-worker` process (its listener set by `worker.http` in its config file) runs 1,000
//! jobs: successes (`echo`), jobs that fail once then succeed (`fail {"times": 1}`: one retry
//! each), permanent failures (`fail {"permanent": true}`: dead-lettered, class `permanent`) and
//! jobs of kinds it has no handler for (dead-lettered, class `unknown-kind`, counted as
//! `kind="unknown"`). The jobs are submitted by an in-process dispatcher with metrics on. Then
//! both processes' metrics, parsed with a Prometheus text-format parser, must match the run
//! exactly: attempts started, succeeded, retried, dead-lettered by class, nothing requeued,
//! nothing in flight, one duration observed per attempt, one submit per job.

use std::time::Duration;

use serde_json::json;
use warren_core::NewJob;
use warren_core::metrics::{MAX_LABEL_VALUES, Metrics};
use warren_tests::probe::{self, Scrape};
use warren_tests::{binary, broker_url, cleanup, config, connect, dispatcher, procs, unique_queue};

const ECHO: usize = 600;
const FLAKY: usize = 250;
const PERMANENT: usize = 100;
const UNKNOWN: usize = 50;

#[tokio::test]
async fn metrics_count_a_run_of_1000_jobs_exactly() {
    let queue = unique_queue("metrics");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let submit_metrics = Metrics::new();
    let dispatcher = dispatcher.with_metrics(submit_metrics.clone());

    let dir = std::env::temp_dir().join(format!("warren-{queue}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let port = probe::free_port();
    let file = dir.join("warren.toml");
    std::fs::write(
        &file,
        format!(
            "[broker]\nurl = \"{}\"\n[worker]\nconcurrency = 32\nhttp = \"127.0.0.1:{port}\"\n\
             [queues.\"{queue}\"]\nretry = {{ max_attempts = 3, initial_delay = \"1s\", \
             multiplier = 1.0, max_delay = \"1s\", jitter = 0.0 }}\n",
            broker_url()
        ),
    )
    .expect("writing the worker's config");
    let mut worker = procs::WorkerSpec::new(binary("warren-worker"), "worker", &[&queue], &dir)
        .config(&file)
        .spawn(0)
        .expect("starting warren-worker");
    worker
        .wait_started(Duration::from_secs(30))
        .await
        .expect("the worker consumes");

    let mut jobs = Vec::new();
    jobs.extend((0..ECHO).map(|i| NewJob::new(&queue, "echo", &json!({ "i": i }))));
    jobs.extend((0..FLAKY).map(|_| NewJob::new(&queue, "fail", &json!({ "times": 1 }))));
    jobs.extend((0..PERMANENT).map(|_| NewJob::new(&queue, "fail", &json!({ "permanent": true }))));
    jobs.extend((0..UNKNOWN).map(|i| NewJob::new(&queue, format!("no-such-kind-{i}"), &json!({}))));
    let submitted = futures::StreamExt::collect::<Vec<_>>(dispatcher.submit_all(jobs)).await;
    assert!(submitted.iter().all(Result::is_ok), "every job submitted");

    // Every job ends: done, or dead-lettered.
    let ends = (ECHO + FLAKY + PERMANENT + UNKNOWN) as f64;
    let until = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let scrape = Scrape::fetch(port).await;
        let ended = scrape.sum("warren_jobs_succeeded_total", &[("queue", &queue)])
            + scrape.sum("warren_jobs_dead_lettered_total", &[("queue", &queue)]);
        if ended >= ends {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "only {ended} of {ends} jobs ended; worker log:\n{}",
            worker.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Anything counted twice would show by now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let scrape = Scrape::fetch(port).await;
    let q = queue.as_str();
    let count = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("queue", q)];
        all.extend_from_slice(labels);
        scrape.value(name, &all)
    };
    let n = |n: usize| n as f64;

    assert_eq!(
        count("warren_jobs_started_total", &[("kind", "echo")]),
        n(ECHO)
    );
    assert_eq!(
        count("warren_jobs_started_total", &[("kind", "fail")]),
        n(FLAKY * 2 + PERMANENT),
        "one attempt per permanent failure, two per job that fails once"
    );
    assert_eq!(
        count("warren_jobs_started_total", &[("kind", "unknown")]),
        0.0
    );
    assert_eq!(
        count("warren_jobs_succeeded_total", &[("kind", "echo")]),
        n(ECHO)
    );
    assert_eq!(
        count("warren_jobs_succeeded_total", &[("kind", "fail")]),
        n(FLAKY)
    );
    assert_eq!(
        count("warren_jobs_retried_total", &[("kind", "fail")]),
        n(FLAKY)
    );
    assert_eq!(count("warren_jobs_retried_total", &[("kind", "echo")]), 0.0);
    let dead = |kind: &str, class: &str| {
        count(
            "warren_jobs_dead_lettered_total",
            &[("kind", kind), ("class", class)],
        )
    };
    assert_eq!(dead("fail", "permanent"), n(PERMANENT));
    assert_eq!(dead("unknown", "unknown-kind"), n(UNKNOWN));
    assert_eq!(
        scrape.sum("warren_jobs_dead_lettered_total", &[("queue", q)]),
        n(PERMANENT + UNKNOWN),
        "no other class"
    );
    assert_eq!(
        scrape.sum("warren_jobs_requeued_total", &[("queue", q)]),
        0.0
    );
    assert_eq!(scrape.value("warren_acks_lost_total", &[]), 0.0);
    assert_eq!(count("warren_jobs_in_flight", &[]), 0.0);
    let attempts = |kind: &str| {
        scrape.histogram_count(
            "warren_job_duration_seconds",
            &[("queue", q), ("kind", kind)],
        )
    };
    assert_eq!(attempts("echo"), n(ECHO));
    assert_eq!(attempts("fail"), n(FLAKY * 2 + PERMANENT));
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "consume")]),
        1.0
    );
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "publish")]),
        1.0
    );
    assert_eq!(scrape.value("warren_reconnects_total", &[]), 0.0);
    // The kinds the worker never saw (the producer's random ones) have no series of their own.
    assert!(
        !scrape.0.samples.iter().any(|s| s
            .labels
            .get("kind")
            .is_some_and(|k| k.starts_with("no-such-kind"))),
        "a random kind got a series"
    );

    // The dispatcher's side: one submit per job, each confirmed.
    let submits = Scrape::parse(&submit_metrics.encode());
    let submitted = |kind: &str| {
        submits.value(
            "warren_jobs_submitted_total",
            &[("queue", q), ("kind", kind)],
        )
    };
    assert_eq!(submitted("echo"), n(ECHO));
    assert_eq!(submitted("fail"), n(FLAKY + PERMANENT));
    assert_eq!(
        submits.sum("warren_jobs_submitted_total", &[("queue", q)]),
        n(ECHO + FLAKY + PERMANENT + UNKNOWN)
    );
    let total = n(ECHO + FLAKY + PERMANENT + UNKNOWN);
    assert_eq!(
        submits.histogram_count("warren_submit_duration_seconds", &[("queue", q)]),
        total
    );
    assert_eq!(
        submits.histogram_count("warren_confirm_duration_seconds", &[("queue", q)]),
        total
    );
    assert_eq!(
        submits.value("warren_connected", &[("connection", "dispatcher")]),
        1.0
    );

    worker.terminate(Duration::from_secs(20)).await;
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hostile producer's 10,000 random kinds (and queues, through a dispatcher-side service)
/// make at most the bounded number of series: on the dispatcher side the first 256 distinct
/// values, then `other`; on a worker only its handlers' kinds and `unknown`.
#[test]
fn random_kinds_make_a_bounded_number_of_series() {
    let metrics = Metrics::new();
    let ms = Duration::from_millis(1);
    for i in 0..10_000 {
        metrics.submitted(&format!("queue-{i}"), &format!("kind-{i}"), ms, ms);
    }
    let queue = metrics.worker_queue("work", &["echo", "fail"]);
    for i in 0..10_000 {
        drop(queue.kind(&format!("kind-{i}")).attempt());
    }
    let scrape = Scrape::parse(&metrics.encode());
    let series = |name: &str| scrape.samples(name, &[]).count();
    // The first 256 queues each with their own kind, then (other, other).
    assert_eq!(series("warren_jobs_submitted_total"), MAX_LABEL_VALUES + 1);
    assert_eq!(
        scrape.value(
            "warren_jobs_submitted_total",
            &[("queue", "other"), ("kind", "other")]
        ),
        (10_000 - MAX_LABEL_VALUES) as f64
    );
    assert_eq!(
        series("warren_submit_duration_seconds"),
        MAX_LABEL_VALUES + 1
    );
    // A worker: echo, fail and unknown.
    assert_eq!(series("warren_jobs_started_total"), 3);
    assert_eq!(
        scrape.value(
            "warren_jobs_started_total",
            &[("queue", "work"), ("kind", "unknown")]
        ),
        10_000.0
    );
    assert!(metrics.encode().lines().count() < 20_000);
}
