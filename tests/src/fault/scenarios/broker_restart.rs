//! Scenario 2: the broker stopped and restarted twice while 10,000 jobs flow (submitted at
//! 200/s by a dispatcher that keeps submitting through the outages): once `stop_app` + 3 s +
//! `start_app`, once `kill -9` + start. 5% of the jobs are `flaky` (their retries wait in the
//! delay queues through the restarts) and 5% `fail` (dead-lettered). Recovery: from the fault
//! to the first job recorded whose handler started after the broker was back. Worker w1 serves
//! its probes (`--http`): its `/readyz`, polled every 100 ms, must answer 503 during each outage
//! and 200 again after it.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::until;
use crate::fault::check::{self, Ledger};
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::probe;
use crate::procs::Pool;
use crate::sink::recovery_ms;

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(2, "broker-restart", vec![Node::single()], bin).await?;
    let mut report = Report::new(2, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let probe_port = probe::free_port();
    let specs = (1..=3)
        .map(|i| {
            let worker = s.worker(&format!("w{i}"), &settings, &urls);
            match i {
                1 => worker.env("WARREN_WORKER_HTTP", format!("127.0.0.1:{probe_port}")),
                _ => worker,
            }
        })
        .collect();
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
    let polling = CancellationToken::new();
    let readiness = poll_readiness(probe_port, polling.clone());
    let jobs = s.mixed_jobs(10_000, 10, 20, 20);
    let kinds = check::kinds_of(&jobs);
    let plan = Plan {
        rate: Some(200.0),
        concurrency: 500,
        ..Plan::default()
    };
    let stop = CancellationToken::new();
    let t0 = Instant::now();
    let (submitting, log) = submit::spawn(dispatcher.clone(), jobs, plan, stop.clone());

    until(t0 + Duration::from_secs(8)).await;
    let fault_a = now_ms();
    s.node.ctl(&["stop_app"]).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.node.ctl(&["start_app"]).await?;
    let back_a = now_ms();
    report.note(format!(
        "stop_app..start_app: broker down {:.1}s",
        (back_a - fault_a) as f64 / 1000.0
    ));

    until(t0 + Duration::from_secs(25)).await;
    let fault_b = now_ms();
    s.node.kill().await?;
    s.node.start().await?;
    let back_b = now_ms();
    report.note(format!(
        "kill -9..start: broker down {:.1}s",
        (back_b - fault_b) as f64 / 1000.0
    ));

    tokio::time::timeout(Duration::from_secs(240), submitting)
        .await
        .context("submitting did not finish")??;
    polling.cancel();
    let readyz = std::mem::take(&mut *readiness.lock().expect("readiness samples"));
    for (what, fault, back) in [("stop_app", fault_a, back_a), ("kill -9", fault_b, back_b)] {
        match not_ready_window(&readyz, fault, back) {
            Some((from, to)) => report.note(format!(
                "{what}: w1's /readyz 503 from {:.1}s after the fault, 200 again {:.1}s after the broker was back",
                from.saturating_sub(fault) as f64 / 1000.0,
                to.saturating_sub(back) as f64 / 1000.0
            )),
            None => report.fail(format!(
                "{what}: w1's /readyz did not answer 503 during the outage and 200 after it"
            )),
        }
    }
    let mut ledger = Ledger::default();
    {
        let log = log.lock().expect("log");
        ledger.add_dispatcher(&log);
        report.note(format!("failed submit attempts: {}", log.error_summary()));
        for (class, text) in &log.samples {
            report.note(format!("  {class}: {text}"));
        }
        report.check(
            !log.errors.contains_key("hung"),
            "a submit hung past its deadline",
        );
    }
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    s.judge_kinds(&mut report, &kinds, &ledger, &dead);
    let lines = s.sink.lines();
    for (what, fault, back) in [("stop_app", fault_a, back_a), ("kill -9", fault_b, back_b)] {
        match recovery_ms(&lines, fault, back, None) {
            Some(ms) => {
                report.recovery.push(ms as f64 / 1000.0);
                report.note(format!(
                    "{what}: processing resumed {:.1}s after the fault, {:.1}s after the broker was back",
                    ms as f64 / 1000.0,
                    (fault + ms).saturating_sub(back) as f64 / 1000.0
                ));
            }
            None => report.fail("no job processed after the broker came back"),
        }
    }
    s.cleanup().await;
    Ok(report)
}

/// `/readyz` on `port` every 100 ms until `stop`: (wall-clock ms, status), 0 when nothing
/// answered.
fn poll_readiness(port: u16, stop: CancellationToken) -> Arc<Mutex<Vec<(u64, u16)>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let into = samples.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let status = probe::get(port, "/readyz").await.map_or(0, |r| r.status);
            if let Ok(mut samples) = into.lock() {
                samples.push((now_ms(), status));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    samples
}

/// The first 503 between the fault and 30 s after the broker was back, and the first 200
/// after that 503: when the probe said "not ready", and when "ready" again.
fn not_ready_window(samples: &[(u64, u16)], fault: u64, back: u64) -> Option<(u64, u64)> {
    let (down, _) = samples
        .iter()
        .find(|(at, status)| *at >= fault && *at <= back + 30_000 && *status == 503)?;
    let (up, _) = samples
        .iter()
        .find(|(at, status)| *at > *down && *status == 200)?;
    Some((*down, *up))
}
