//! Scenario 6: publishers blocked by a memory alarm (`set_vm_memory_high_watermark 0`) for
//! 12 s, then released (`0.4`), while a worker (concurrency 4) drains a backlog in which one job
//! in ten is `flaky` (a retryable failure on attempt 1: its retry publish is blocked by the
//! alarm), and the dispatcher goes on submitting (10 jobs/s, `blocked_timeout = 3s`).
//!
//! - Submits during the alarm must fail clearly (`Blocked` after the timeout, or no confirm in
//!   time) or succeed only after the release: none may return an id while the broker blocks
//!   publishing.
//! - Good jobs keep completing during the alarm: failed jobs waiting for their retry to be
//!   published must not take every slot (consumers run on their own connection).
//! - After the release every job ends: the good ones processed, the flaky ones retried and
//!   processed; nothing lost.
//!
//! Recovery: from the release to the first confirmed submit.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::fault::check::{self, Ledger};
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};

/// The worker's concurrency (its prefetch is Warren's default, twice that).
const CONCURRENCY: u16 = 4;
/// Jobs waiting when the alarm starts.
const BACKLOG: usize = 6_000;
/// How long publishing is blocked.
const ALARM: Duration = Duration::from_secs(12);
/// Good jobs that must be recorded while publishing is blocked.
const MIN_GOOD_DURING: usize = 100;

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(6, "memory-alarm", vec![Node::single()], bin).await?;
    let mut report = Report::new(6, s.name);
    let settings = Settings {
        blocked_timeout: "3s",
        concurrency: CONCURRENCY,
        ..Settings::default()
    };
    let (dispatcher, mut pool) = s.dispatcher_and_worker(&settings).await?;
    // A backlog for the worker to chew on through the alarm, one job in ten `flaky`.
    let backlog = s.mixed_jobs(BACKLOG, 10, 10, 0);
    let mut kinds = check::kinds_of(&backlog);
    let (preload, preload_log) = submit::spawn(
        dispatcher.clone(),
        backlog,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(60), preload)
        .await
        .context("preloading")??;

    let result = async {
        s.node.ctl(&["set_vm_memory_high_watermark", "0"]).await?;
        wait_for_alarm(&s.node, true, Duration::from_secs(20)).await?;
        let alarm_on = now_ms();
        let during = s.jobs(120, "echo", &json!({}));
        let during_kinds = check::kinds_of(&during);
        let plan = Plan {
            rate: Some(10.0),
            concurrency: 200,
            retry_pause: Duration::from_millis(500),
            ..Plan::default()
        };
        let (submitting, log) =
            submit::spawn(dispatcher.clone(), during, plan, CancellationToken::new());
        tokio::time::sleep(ALARM).await;
        let release = now_ms();
        s.node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await?;
        wait_for_alarm(&s.node, false, Duration::from_secs(20)).await?;
        tokio::time::timeout(Duration::from_secs(120), submitting)
            .await
            .context("submitting")??;
        anyhow::Ok((alarm_on, release, log, during_kinds))
    }
    .await;
    // Whatever happened, never leave the node alarmed.
    let _ = s.node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    let (alarm_on, release, log, during_kinds) = result?;
    kinds.extend(during_kinds);

    let mut ledger = Ledger::default();
    ledger.add_dispatcher(&preload_log.lock().expect("log"));
    {
        let log = log.lock().expect("log");
        ledger.add_dispatcher(&log);
        let wrong: Vec<_> = log
            .attempts
            .iter()
            .filter(|a| a.error.is_none() && a.start_ms >= alarm_on && a.end_ms < release)
            .collect();
        report.check(
            wrong.is_empty(),
            format!(
                "{} submits returned an id while publishing was blocked: {:?}",
                wrong.len(),
                wrong.iter().take(3).collect::<Vec<_>>()
            ),
        );
        let blocked: Vec<_> = log
            .attempts
            .iter()
            .filter(|a| a.error.as_deref() == Some("blocked"))
            .map(|a| a.end_ms - a.start_ms)
            .collect();
        report.check(
            !blocked.is_empty(),
            "no submit failed with Blocked during the alarm",
        );
        let (min, max) = (
            blocked.iter().min().copied().unwrap_or(0),
            blocked.iter().max().copied().unwrap_or(0),
        );
        report.check(
            blocked.iter().all(|ms| (2_900..=6_000).contains(ms)),
            format!("Blocked submits took {min}..{max} ms; expected about blocked_timeout (3 s)"),
        );
        report.note(format!(
            "during the alarm: failed attempts {} (Blocked after {:.1}..{:.1}s); all retried and confirmed after the release",
            log.error_summary(),
            min as f64 / 1000.0,
            max as f64 / 1000.0
        ));
        report.check(
            !log.errors.contains_key("hung"),
            "a submit hung past its deadline",
        );
        if let Some(first) = log
            .attempts
            .iter()
            .filter(|a| a.error.is_none() && a.end_ms >= release)
            .map(|a| a.end_ms)
            .min()
        {
            report.recovery.push((first - release) as f64 / 1000.0);
        }
    }
    let lines = s.sink.lines();
    let during = |kind: &str| {
        lines
            .iter()
            .filter(|l| l.recorded_ms >= alarm_on && l.recorded_ms < release)
            .filter(|l| kinds.get(&l.id).is_some_and(|k| k == kind))
            .count()
    };
    let (good_during, flaky_during) = (during("sleep"), during("flaky"));
    // Per 2 s of the alarm: whether good jobs kept completing, or only before a stall.
    let mut slices = vec![0usize; (release - alarm_on).div_ceil(2_000) as usize];
    for line in lines.iter().filter(|l| {
        l.recorded_ms >= alarm_on
            && l.recorded_ms < release
            && kinds.get(&l.id).is_some_and(|k| k == "sleep")
    }) {
        slices[((line.recorded_ms - alarm_on) / 2_000) as usize] += 1;
    }
    report.note(format!(
        "while publishing was blocked ({:.1}s): {good_during} good jobs recorded ({slices:?} per 2 s), {flaky_during} flaky ones",
        (release - alarm_on) as f64 / 1000.0
    ));
    report.check(
        good_during >= MIN_GOOD_DURING,
        format!(
            "only {good_during} good jobs were processed while publishing was blocked (at least {MIN_GOOD_DURING} expected): failed jobs waiting for their retry to be published held the worker up"
        ),
    );
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    s.judge_kinds(&mut report, &kinds, &ledger, &dead);
    s.cleanup().await;
    Ok(report)
}

/// True while the node reports a memory alarm.
async fn memory_alarm_on(node: &Node) -> anyhow::Result<bool> {
    Ok(node
        .eval("rabbit_alarm:get_alarms().")
        .await?
        .contains("memory"))
}

/// Polls the alarm (every 200 ms) until it is `want`, at most `deadline`.
async fn wait_for_alarm(node: &Node, want: bool, deadline: Duration) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    while memory_alarm_on(node).await? != want {
        anyhow::ensure!(
            Instant::now() < until,
            "memory alarm still {} after {deadline:?}",
            !want
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
