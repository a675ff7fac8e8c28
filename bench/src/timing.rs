//! Latency at low load and the accuracy of retry delays, with the dispatcher and a worker in
//! this process (so one clock times both ends; no log subscriber is installed).
//!
//! - latency: jobs submitted at a steady rate; for each, submit → handler start, and submit →
//!   ack sent (the worker's [`Worker::on_settled`] hook). Submit = the moment `submit` is called.
//! - retry delay: jobs whose first attempt fails with a retry after 1 s or 10 s (no jitter);
//!   the error is (second attempt's start − first attempt's end) − asked.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::NewJob;
use warren_core::config::{QueueConfig, QueueType, RetryConfig};
use warren_dispatcher::Dispatcher;
use warren_workers::{JobContext, JobError, Registry, Worker};

use crate::procs::{self, config_for, settle_and_delete};
use crate::{Bench, Record, payload, unique_queue};

/// When each job was submitted, and the two delays measured from it.
#[derive(Default)]
struct Clock {
    submitted: HashMap<String, Instant>,
    started: Vec<Duration>,
    acked: Vec<Duration>,
}

pub async fn latency(bench: &mut Bench, rate: u32, seconds: u64) -> anyhow::Result<()> {
    let queue = unique_queue("latency");
    let mut config = config_for(bench, QueueType::Quorum);
    config.worker.concurrency = 16;
    let dispatcher = Arc::new(Dispatcher::connect(&config).await?);
    dispatcher
        .apply_topology(std::slice::from_ref(&queue))
        .await?;

    let clock = Arc::new(Mutex::new(Clock::default()));
    let mut registry = Registry::new();
    let seen = clock.clone();
    registry.register(
        "noop",
        move |_payload: serde_json::Value, ctx: JobContext| {
            let now = Instant::now();
            if let Ok(mut clock) = seen.lock()
                && let Some(at) = clock.submitted.get(&ctx.id.0).copied()
            {
                clock.started.push(now - at);
            }
            async { Ok(None) }
        },
    );
    let seen = clock.clone();
    let shutdown = CancellationToken::new();
    let worker = Worker::new(config.clone(), registry)
        .queue(queue.clone())
        .on_settled(move |settled| {
            let now = Instant::now();
            if let (Ok(mut clock), Some(id)) = (seen.lock(), settled.id)
                && let Some(at) = clock.submitted.get(id).copied()
            {
                clock.acked.push(now - at);
            }
        });
    let running = tokio::spawn(worker.run(shutdown.clone()));
    let channel = dispatcher.open_channel().await?;
    procs::wait_consumers(&channel, &queue, 1).await?;

    let total = (u64::from(rate) * seconds) as usize;
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut submits = tokio::task::JoinSet::new();
    for i in 0..total {
        ticks.tick().await;
        let id = uuid::Uuid::now_v7().to_string();
        let mut job = NewJob::new(&queue, "noop", &payload(i));
        job.id = Some(id.clone());
        if let Ok(mut clock) = clock.lock() {
            clock.submitted.insert(id, Instant::now());
        }
        let dispatcher = dispatcher.clone();
        submits.spawn(async move { dispatcher.submit(job).await });
    }
    while let Some(result) = submits.join_next().await {
        result?.context("latency submit")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while clock.lock().map_or(0, |c| c.acked.len()) < total {
        ensure!(
            Instant::now() < deadline,
            "latency run: not every job acked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    running.await??;
    settle_and_delete(&channel, std::slice::from_ref(&queue)).await?;

    let mut clock = std::mem::take(&mut *clock.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    ensure!(
        clock.started.len() == total && clock.acked.len() == total,
        "latency run: {} started, {} acked of {total}",
        clock.started.len(),
        clock.acked.len()
    );
    bench.emit(
        Record::new(
            "warren",
            "latency",
            QueueType::Quorum,
            "in-process worker, c16",
        )
        .took(total, seconds as f64)
        .with("rate_per_s", json!(rate))
        .with("duration_s", json!(seconds))
        .with("start_ms", percentiles(&mut clock.started))
        .with("ack_ms", percentiles(&mut clock.acked))
        .note("submit = the call to Dispatcher::submit; ack = the worker's ack sent"),
    )
}

fn percentiles(samples: &mut [Duration]) -> serde_json::Value {
    samples.sort();
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        (samples[index].as_secs_f64() * 1e6).round() / 1e3
    };
    json!({ "p50": at(0.50), "p99": at(0.99), "max": at(1.0) })
}

/// Retry delays of 1 s and 10 s, five jobs each, at once.
pub async fn retry_delays(bench: &mut Bench) -> anyhow::Result<()> {
    const JOBS: usize = 5;
    let asked = [1u64, 10];
    let queues: Vec<String> = asked
        .iter()
        .map(|s| unique_queue(&format!("retry{s}s")))
        .collect();
    let mut config = config_for(bench, QueueType::Quorum);
    for (queue, seconds) in queues.iter().zip(asked) {
        let retry = RetryConfig {
            max_attempts: 2,
            initial_delay: Duration::from_secs(seconds),
            multiplier: 2.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.0,
        };
        config.queues.insert(
            queue.clone(),
            QueueConfig {
                retry,
                ..QueueConfig::default()
            },
        );
    }
    let dispatcher = Dispatcher::connect(&config).await?;
    dispatcher.apply_topology(&queues).await?;

    // (queue, job id) → end of attempt 1, start of attempt 2.
    type Attempts = HashMap<(String, String), (Option<Instant>, Option<Instant>)>;
    let attempts: Arc<Mutex<Attempts>> = Arc::default();
    let mut registry = Registry::new();
    let seen = attempts.clone();
    registry.register(
        "flaky",
        move |_payload: serde_json::Value, ctx: JobContext| {
            let seen = seen.clone();
            async move {
                let key = (ctx.queue.to_string(), ctx.id.0.clone());
                let now = Instant::now();
                let mut seen = seen.lock().map_err(|_| JobError::permanent("poisoned"))?;
                let entry = seen.entry(key).or_default();
                if ctx.attempt == 1 {
                    entry.0 = Some(now);
                    Err(JobError::retry("first attempt fails, as planned"))
                } else {
                    entry.1 = Some(now);
                    Ok(None)
                }
            }
        },
    );
    let shutdown = CancellationToken::new();
    let worker = queues
        .iter()
        .fold(Worker::new(config.clone(), registry), |w, q| {
            w.queue(q.clone())
        });
    let running = tokio::spawn(worker.run(shutdown.clone()));
    for queue in &queues {
        for i in 0..JOBS {
            dispatcher
                .submit(NewJob::new(queue, "flaky", &payload(i)))
                .await?;
        }
    }
    let done = |a: &Attempts| a.values().filter(|(_, second)| second.is_some()).count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while attempts.lock().map_or(0, |a| done(&a)) < JOBS * queues.len() {
        ensure!(
            Instant::now() < deadline,
            "retry run: not every job retried in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await??;
    let channel = dispatcher.open_channel().await?;
    settle_and_delete(&channel, &queues).await?;

    let attempts = std::mem::take(&mut *attempts.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
    for (queue, seconds) in queues.iter().zip(asked) {
        let mut errors_ms: Vec<f64> = attempts
            .iter()
            .filter(|((q, _), _)| q == queue)
            .filter_map(|(_, (first, second))| {
                Some(second.as_ref()?.duration_since(*first.as_ref()?))
            })
            .map(|actual| (actual.as_secs_f64() - seconds as f64) * 1e3)
            .collect();
        errors_ms.sort_by(f64::total_cmp);
        let round = |v: f64| (v * 10.0).round() / 10.0;
        bench.emit(
            Record::new(
                "warren",
                "retry-delay",
                QueueType::Quorum,
                "in-process worker, c16",
            )
            .with("asked_s", json!(seconds))
            .with(
                "error_ms",
                json!({
                    "min": round(errors_ms[0]),
                    "median": round(errors_ms[errors_ms.len() / 2]),
                    "max": round(errors_ms[errors_ms.len() - 1]),
                }),
            )
            .with("samples", json!(errors_ms.len()))
            .note("error = (attempt 2 start - attempt 1 end) - asked delay"),
        )?;
    }
    Ok(())
}
