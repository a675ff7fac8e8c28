//! Scenario 1: a worker SIGKILLed every 3 s while 3 workers run 10,000 jobs; each killed worker
//! is restarted at once. 5% of the jobs are `flaky` (a retryable failure on attempt 1, so a
//! retry goes through the delay queues) and 5% `fail` (a permanent failure, so a dead letter
//! is published): a kill can land between a retry's or dead letter's confirm and the ack of
//! the delivery it replaces. Recovery: from each kill to the first job recorded by its
//! replacement.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::fault::check::{self, Ledger};
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::procs::Pool;
use crate::sink::{Tally, recovery_ms};

const JOBS: usize = 10_000;

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(1, "worker-sigkill", vec![Node::single()], bin).await?;
    let mut report = Report::new(1, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let specs = (1..=3)
        .map(|i| s.worker(&format!("w{i}"), &settings, &urls))
        .collect();
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
    let jobs = s.mixed_jobs(JOBS, 50, 20, 20);
    let kinds = check::kinds_of(&jobs);
    let processable = kinds.values().filter(|k| *k != "fail").count();
    let stop = CancellationToken::new();
    let (submitting, log) = submit::spawn(dispatcher.clone(), jobs, Plan::default(), stop.clone());

    let mut kills = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let processed = Tally::of(&s.sink.lines()).unique();
        if processed >= processable * 9 / 10 || Instant::now() > deadline {
            break;
        }
        let slot = kills.len() % pool.procs.len();
        let at = now_ms();
        pool.procs[slot].sigkill();
        let replacement = pool.respawn(slot)?;
        kills.push((at, replacement));
    }
    tokio::time::timeout(Duration::from_secs(200), submitting)
        .await
        .context("submitting did not finish")??;
    let mut ledger = Ledger::default();
    ledger.add_dispatcher(&log.lock().expect("log"));
    report.note(format!(
        "{} SIGKILLs; failed submit attempts: {}",
        kills.len(),
        log.lock().expect("log").error_summary()
    ));
    report.check(
        kills.len() >= 5,
        format!("only {} kills happened", kills.len()),
    );
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    s.judge_kinds(&mut report, &kinds, &ledger, &dead);
    let lines = s.sink.lines();
    for (at, pid) in &kills {
        match recovery_ms(&lines, *at, *at, Some(*pid)) {
            Some(ms) => report.recovery.push(ms as f64 / 1000.0),
            None => report.note(format!("replacement pid {pid} recorded no job")),
        }
    }
    if let Ok(d) = Arc::try_unwrap(dispatcher) {
        d.close().await;
    }
    s.cleanup().await;
    Ok(report)
}
