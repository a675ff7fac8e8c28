//! Batched acks ([`warren_workers::Settled`]): jobs that finish out of order are each settled
//! exactly once, and a slow job does not hold back the acks of the jobs delivered after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::NewJob;
use warren_tests::*;
use warren_workers::{Registry, Worker};

/// Every settlement the worker reported, by job id: (outcome, sent).
type Settlements = Arc<Mutex<HashMap<String, Vec<(&'static str, bool)>>>>;

fn start(
    queue: &str,
    concurrency: u16,
    registry: Registry,
) -> (RunningWorker, Settlements, warren_core::Config) {
    let mut config = config(&[queue]);
    config.worker.concurrency = concurrency;
    let settled: Settlements = Arc::default();
    let seen = settled.clone();
    let worker = Worker::new(config.clone(), registry)
        .queue(queue)
        .on_settled(move |s| {
            let id = s.id.unwrap_or("(no id)").to_owned();
            seen.lock()
                .expect("lock")
                .entry(id)
                .or_default()
                .push((s.outcome, s.sent));
        });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(shutdown.clone()));
    (RunningWorker { shutdown, task }, settled, config)
}

async fn wait_settled(settled: &Settlements, n: usize, deadline: Duration) {
    let until = Instant::now() + deadline;
    while settled.lock().expect("lock").len() < n {
        assert!(
            Instant::now() < until,
            "only {} of {n} jobs settled in {deadline:?}",
            settled.lock().expect("lock").len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Given 2,000 jobs that sleep 0-3 ms each (so they finish out of order) at concurrency 64,
/// when they run, then every job is settled exactly once as done, and after the worker stops
/// nothing is back in the queue: every delivery was acked, none twice (a double ack would have
/// closed the channel and requeued jobs).
#[tokio::test]
async fn out_of_order_jobs_are_each_acked_once() {
    let queue = unique_queue("settle-order");
    let mut registry = Registry::new();
    registry.register("jitter", |payload: serde_json::Value, _ctx| async move {
        let ms = payload["n"].as_u64().unwrap_or(0) % 4;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(None)
    });
    let (worker, settled, config) = start(&queue, 64, registry);
    let dispatcher = dispatcher(&config).await;

    let jobs: Vec<NewJob> = (0..2000)
        .map(|n| NewJob::new(&queue, "jitter", &json!({ "n": n })))
        .collect();
    let ids: Vec<String> = futures::StreamExt::collect::<Vec<_>>(dispatcher.submit_all(jobs))
        .await
        .into_iter()
        .map(|r| r.expect("confirmed").0)
        .collect();

    wait_settled(&settled, ids.len(), Duration::from_secs(60)).await;
    worker.stop().await;
    let settled = settled.lock().expect("lock").clone();
    for id in &ids {
        assert_eq!(
            settled.get(id).map(Vec::as_slice),
            Some(&[("done", true)][..]),
            "{id}"
        );
    }
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0, "nothing requeued");
    cleanup(&channel, &[&queue]).await;
}

/// Given a worker with concurrency 4 and a job that sleeps 4 s, when 20 quick jobs are queued
/// behind it, then all 20 run and are acked while the slow one still runs. With prefetch 4 the
/// broker only delivers more once earlier deliveries are acked, so this shows the quick jobs'
/// acks were not held back behind the slow job's unsettled delivery tag.
#[tokio::test]
async fn slow_job_does_not_hold_back_acks_of_later_jobs() {
    let queue = unique_queue("settle-gap");
    let mut registry = Registry::new();
    registry.register("slow", |_payload: serde_json::Value, _ctx| async move {
        tokio::time::sleep(Duration::from_secs(4)).await;
        Ok(None)
    });
    registry.register("quick", |_payload: serde_json::Value, _ctx| async move {
        Ok(None)
    });
    let (worker, settled, config) = start(&queue, 4, registry);
    let dispatcher = dispatcher(&config).await;

    let slow = dispatcher
        .submit(NewJob::new(&queue, "slow", &json!({})))
        .await
        .expect("confirmed");
    for n in 0..20 {
        dispatcher
            .submit(NewJob::new(&queue, "quick", &json!({ "n": n })))
            .await
            .expect("confirmed");
    }
    wait_settled(&settled, 20, Duration::from_secs(30)).await;
    assert!(
        !settled.lock().expect("lock").contains_key(&slow.0),
        "the 20 quick jobs were delivered and acked before the slow job ended"
    );

    wait_settled(&settled, 21, Duration::from_secs(30)).await;
    worker.stop().await;
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0, "nothing requeued");
    cleanup(&channel, &[&queue]).await;
}
