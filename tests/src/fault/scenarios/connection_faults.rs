//! Scenario 4: connection faults of one worker process.
//!
//! (a) For a minute, every 5 s, the broker closes the worker's connections (`rabbitmqctl
//! close_connection`): it must reconnect each time, by itself. The broker shows it: at every
//! cut the process has two connections again, none of them one closed at the cut before, and
//! after every cut a job started after it is recorded by the same process.
//!
//! (b) A frozen connection: a second worker consumes through a TCP relay (its first address;
//! its second address bypasses the relay) with a 10 s heartbeat; the relay is blackholed
//! (nothing passes, no socket closes), and the worker must notice the silence by heartbeat and
//! fail over.
//!
//! Jobs are submitted throughout. Recovery: from each cut (the closes done) to the first job
//! the worker started after it; from the freeze to the first job it started 1 s after it or
//! later (detection by heartbeat included).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::until;
use crate::fault::check::Ledger;
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::procs::Pool;
use crate::sink::recovery_ms;

/// One cut: when its closes were done, the worker's connections it found, and how many of
/// them it closed (the worker may close the second itself once the first is gone).
struct Cut {
    at_ms: u64,
    found: Vec<String>,
    closed: usize,
}

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(4, "connection-cut-and-freeze", vec![Node::single()], bin).await?;
    let mut report = Report::new(4, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let mut ledger = Ledger::default();

    // (a) Cuts.
    let mut pool = Pool::start(
        vec![s.worker("cut", &settings, &urls)],
        Duration::from_secs(60),
    )
    .await?;
    let pid = pool.procs[0].pid;
    let plan = Plan {
        rate: Some(100.0),
        ..Plan::default()
    };
    // 68 s of jobs at 100/s: the last cut starts at 60 s, and closing (rabbitmqctl) takes up
    // to ~2.5 s under load; after it the worker needs jobs to show it came back (with 63 s of
    // jobs a CI run once had none left after the 12th cut's close).
    let jobs = s.jobs(6_800, "sleep", &json!({"ms": 5}));
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        jobs,
        plan.clone(),
        CancellationToken::new(),
    );
    let t0 = Instant::now();
    let mut cuts = Vec::new();
    for i in 1..=12u32 {
        until(t0 + Duration::from_secs(5) * i).await;
        let (found, closed) = close_worker_connections(&s.node, pid).await?;
        cuts.push(Cut {
            at_ms: now_ms(),
            found,
            closed,
        });
    }
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));
    report.note(format!(
        "cuts: closed {:?} connections",
        cuts.iter().map(|c| c.closed).collect::<Vec<_>>()
    ));
    report.check(
        pool.procs[0].exited().is_none(),
        "the cut worker process exited",
    );
    // Every cut found the two connections of a new session: none was there at the cut before.
    for (i, pair) in cuts.windows(2).enumerate() {
        let reused: Vec<_> = pair[1]
            .found
            .iter()
            .filter(|c| pair[0].found.contains(c))
            .collect();
        report.check(
            pair[1].found.len() == 2 && reused.is_empty(),
            format!(
                "cut {}: the worker had {} connections ({reused:?} left from before): it did not reconnect",
                i + 2,
                pair[1].found.len()
            ),
        );
    }
    report.check(
        cuts.first()
            .is_some_and(|c| c.found.len() == 2 && c.closed >= 1),
        "the first cut did not find and close the worker's connections",
    );
    pool.stop(Duration::from_secs(20)).await;
    let lines = s.sink.lines();
    let mut cut_recovery = Vec::new();
    for (i, cut) in cuts.iter().enumerate() {
        match recovery_ms(&lines, cut.at_ms, cut.at_ms, Some(pid)) {
            Some(ms) => cut_recovery.push(ms as f64 / 1000.0),
            None => report.fail(format!(
                "no job processed by the worker after cut {}",
                i + 1
            )),
        }
    }

    // (b) A frozen connection.
    let relay = crate::fault::relay::Relay::start(s.node.port).await?;
    let worker_urls = vec![relay.url(&s.vhost), s.node.url(&s.vhost)];
    let mut pool = Pool::start(
        vec![s.worker("frozen", &settings, &worker_urls)],
        Duration::from_secs(60),
    )
    .await?;
    let pid = pool.procs[0].pid;
    report.check(
        relay.accepted() >= 1,
        "the worker did not connect through the relay",
    );
    let jobs = s.jobs(3_000, "sleep", &json!({"ms": 5}));
    let (submitting, log) = submit::spawn(dispatcher.clone(), jobs, plan, CancellationToken::new());
    let warm = Instant::now() + Duration::from_secs(30);
    while s.sink.lines().iter().filter(|l| l.pid == pid).count() < 50 {
        anyhow::ensure!(
            Instant::now() < warm,
            "the frozen-scenario worker processed nothing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let frozen_at = now_ms();
    relay.set_blackhole(true);
    let resumed = Instant::now() + Duration::from_secs(90);
    while recovery_ms(&s.sink.lines(), frozen_at, frozen_at + 1000, Some(pid)).is_none() {
        anyhow::ensure!(
            Instant::now() < resumed,
            "the worker did not process a job within 90 s of the freeze:\n{}",
            pool.procs[0].log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));
    report.check(
        pool.procs[0].exited().is_none(),
        "the frozen worker process exited",
    );
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(90))
        .await?;
    drop(relay);
    let lines = s.sink.lines();
    let frozen_recovery =
        recovery_ms(&lines, frozen_at, frozen_at + 1000, Some(pid)).map(|ms| ms as f64 / 1000.0);
    report.recovery = cut_recovery.clone();
    report.recovery.extend(frozen_recovery);
    report.recovery_label = Some(format!(
        "cuts {}, freeze {}",
        span(&cut_recovery),
        frozen_recovery
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into())
    ));
    s.cleanup().await;
    Ok(report)
}

/// Closes (from the broker) every connection of worker process `pid`; returns those it found
/// and how many it closed.
async fn close_worker_connections(node: &Node, pid: u32) -> anyhow::Result<(Vec<String>, usize)> {
    let found = node.connections_of(pid).await?;
    let mut closed = 0;
    for conn in &found {
        // A connection that went away meanwhile is fine.
        if node
            .ctl(&["close_connection", conn, "fault suite: connection cut"])
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    Ok((found, closed))
}

/// `min–max s (n×)` for a list of seconds.
fn span(values: &[f64]) -> String {
    if values.is_empty() {
        return "-".into();
    }
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!("{min:.1}–{max:.1}s ({}×)", values.len())
}
