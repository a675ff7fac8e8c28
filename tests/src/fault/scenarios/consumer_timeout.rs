//! Scenario 7: a handler stuck in blocking code (`stuck`: on its first delivery it blocks its
//! thread for 20 s, which Warren's 1 s `job_timeout` cannot interrupt, then fails) outlives the
//! broker's consumer timeout. RabbitMQ 4.x applies the `x-consumer-timeout` the worker asked
//! for (7 s here: 1 round of 1 s buffered, 1 s of run, 5 s to settle) and cancels the consumer;
//! 3.10 ignores that argument and closes the channel after its own `consumer_timeout`, lowered
//! to 5 s (checked every second) on the fault node for the scenario. Either way Warren subscribes
//! again in the same session and keeps consuming; the job is redelivered and completes; when
//! the stuck run finally fails, nothing is published for it (the broker took it back), so it
//! does not come back a second time. Meanwhile echo jobs keep arriving, 10 a second.
//!
//! Everything is seen from outside the worker: the broker lists a new consumer tag of the same
//! process (Warren's tags are new for every subscription), the worker's connections are the
//! ones it started with (one session), and the sink has the stuck job once, run again by the
//! same process. Recovery: the longest pause between two jobs recorded after it got stuck.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::Session;
use crate::fault::check::Ledger;
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::sink::Tally;

/// How long the stuck handler blocks its thread on its first delivery.
const STUCK: Duration = Duration::from_secs(20);

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(7, "consumer-timeout", vec![Node::single()], bin).await?;
    let set = "application:set_env(rabbit, consumer_timeout, 5000), \
               application:set_env(rabbit, channel_tick_interval, 1000).";
    let restore = "application:set_env(rabbit, consumer_timeout, 1800000), \
                   application:set_env(rabbit, channel_tick_interval, 60000).";
    s.with_broker_settings(set, restore, scenario).await
}

async fn scenario(s: &Scenario) -> anyhow::Result<Report> {
    let mut report = Report::new(7, s.name);
    let settings = Settings {
        concurrency: 4,
        prefetch: Some(4),
        job_timeout: "1s",
        operation_timeout: "5s",
        shutdown_grace: "2s",
        ..Settings::default()
    };
    let (dispatcher, mut pool) = s.dispatcher_and_worker(&settings).await?;
    let worker_pid = pool.procs[0].pid;
    let session = Session::of(&s.node, worker_pid).await?;
    let first_tags = s.node.consumer_tags(&s.vhost, &s.queue).await?;
    anyhow::ensure!(
        first_tags.len() == 1 && first_tags[0].contains(&format!(":{worker_pid} ")),
        "expected the worker's one consumer, found {first_tags:?}"
    );

    let hang = s.jobs(1, "stuck", &json!({ "ms": STUCK.as_millis() as u64 }));
    let hang_id = hang[0].id.clone().expect("id");
    let (first, first_log) = submit::spawn(
        dispatcher.clone(),
        hang,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(30), first)
        .await
        .context("submitting")??;
    let hang_submitted = now_ms();
    let echoes = s.jobs(300, "echo", &json!({}));
    let plan = Plan {
        rate: Some(10.0),
        ..Plan::default()
    };
    let (submitting, log) =
        submit::spawn(dispatcher.clone(), echoes, plan, CancellationToken::new());

    // The broker ends the consumer: its tag goes, the worker's new one comes.
    let until = Instant::now() + Duration::from_secs(90);
    let new_tags = loop {
        let tags = s.node.consumer_tags(&s.vhost, &s.queue).await?;
        if !tags.is_empty() && tags.iter().all(|t| !first_tags.contains(t)) {
            break tags;
        }
        anyhow::ensure!(
            Instant::now() < until,
            "the consumer was not replaced within 90 s (tags {tags:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    report.note(format!(
        "the consumer was replaced {:.1}s after the stuck job was submitted",
        now_ms().saturating_sub(hang_submitted) as f64 / 1000.0
    ));
    report.check(
        new_tags.len() == 1 && new_tags[0].contains(&format!(":{worker_pid} ")),
        format!("the new consumer is not the worker's one: {new_tags:?}"),
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !Tally::of(&s.sink.lines()).counts.contains_key(&hang_id) {
        anyhow::ensure!(
            Instant::now() < until,
            "the stuck job was not redelivered and completed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The stuck run ends and fails: it must publish nothing (no retry of a job already done).
    let stuck_ends = hang_submitted + STUCK.as_millis() as u64 + 2_000;
    tokio::time::sleep(Duration::from_millis(stuck_ends.saturating_sub(now_ms()))).await;
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    report.check(
        pool.procs[0].exited().is_none(),
        "the worker process exited",
    );
    session.check_unchanged(&s.node, &mut report).await?;
    let last_tags = s.node.consumer_tags(&s.vhost, &s.queue).await?;
    report.check(
        last_tags == new_tags,
        format!("the consumer changed again: {new_tags:?}, then {last_tags:?}"),
    );
    let mut ledger = Ledger::default();
    ledger.add_dispatcher(&first_log.lock().expect("log"));
    ledger.add_dispatcher(&log.lock().expect("log"));
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    let lines = s.sink.lines();
    report.check(
        lines.iter().all(|l| l.pid == worker_pid),
        "a job was recorded by another process",
    );
    let mut recorded: Vec<u64> = lines
        .iter()
        .filter(|l| l.id != hang_id && l.recorded_ms >= hang_submitted)
        .map(|l| l.recorded_ms)
        .collect();
    recorded.sort_unstable();
    if let Some(pause) = recorded.windows(2).map(|w| w[1] - w[0]).max() {
        report.recovery.push(pause as f64 / 1000.0);
    }
    Ok(report)
}
