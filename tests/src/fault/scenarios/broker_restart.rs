//! Scenario 2: the broker stopped and restarted twice while 10,000 jobs flow (submitted at
//! 200/s by a dispatcher that keeps submitting through the outages): once `stop_app` + 3 s +
//! `start_app`, once `kill -9` + start. 5% of the jobs are `flaky` (their retries wait in the
//! delay queues through the restarts) and 5% `fail` (dead-lettered). Recovery: from the fault
//! to the first job recorded whose handler started after the broker was back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::until;
use crate::fault::check::{self, Ledger};
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::procs::Pool;
use crate::sink::recovery_ms;

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(2, "broker-restart", vec![Node::single()], bin).await?;
    let mut report = Report::new(2, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let specs = (1..=3)
        .map(|i| s.worker(&format!("w{i}"), &settings, &urls))
        .collect();
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
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
