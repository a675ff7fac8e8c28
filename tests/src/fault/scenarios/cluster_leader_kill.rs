//! Scenario 3: a 3-node cluster with quorum queues: while 6,000 jobs flow (200/s), the node
//! holding the queue's leader is killed (`kill -9`); workers and dispatcher have all three
//! addresses and fail over. The node is started again 20 s later
//! (`WARREN_FAULTS_NODE_DOWN_SECS`). 5% of the jobs are `flaky` and 5% `fail`, so the workers
//! publish retries and dead letters to quorum queues whose leaders move too, and retries come
//! back through the delay levels' at-least-once dead-lettering. Recovery: from the kill to the
//! first job started 0.5 s after it or later.
//!
//! The cluster runs the suite's RabbitMQ version (`WARREN_RABBITMQ`, 4.3 by default: metadata
//! in Khepri; 3.10: Mnesia with `pause_minority`) and is judged the same way on both.
//!
//! RabbitMQ's at-least-once dead-lettering re-sends a dead letter whose publish to its target
//! was not confirmed only after `dead_letter_worker_publisher_confirm_timeout` (180 s by
//! default); retries expiring from a delay level while the work queue's leader is being lost
//! wait that long (docs/FAULTS.md, Findings). The scenario lowers it to
//! [`DLX_CONFIRM_TIMEOUT_MS`] on every node, so that the suite sees them arrive within its
//! time, and reports how late they were.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::until;
use crate::fault::check::{self, Ledger};
use crate::fault::node::{self, Node};
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::procs::Pool;
use crate::sink::recovery_ms;

/// `dead_letter_worker_publisher_confirm_timeout` during the scenario, in ms (RabbitMQ's
/// default: 180,000).
const DLX_CONFIRM_TIMEOUT_MS: u64 = 10_000;

/// Sets RabbitMQ's at-least-once dead-letter re-send timeout on `node` (read by each
/// dead-letter worker when it starts, i.e. when its queue gets a leader).
async fn set_dlx_confirm_timeout(node: &Node) -> anyhow::Result<()> {
    node.eval(&format!(
        "application:set_env(rabbit, dead_letter_worker_publisher_confirm_timeout, {DLX_CONFIRM_TIMEOUT_MS})."
    ))
    .await?;
    Ok(())
}

/// The leader of `queue` in `vhost`, as `list_queues name leader` shows it.
async fn queue_leader(node: &Node, vhost: &str, queue: &str) -> anyhow::Result<String> {
    let text = node
        .ctl(&[
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "leader",
            "--no-table-headers",
        ])
        .await?;
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(name, _)| *name == queue)
        .map(|(_, leader)| leader.trim().to_owned())
        .context("the queue is not listed")
}

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    node::start_cluster().await?;
    let nodes = node::cluster();
    // Which broker the cluster runs (scripts/cluster follows WARREN_RABBITMQ, like the fault
    // node): RabbitMQ 4.x keeps its metadata in Khepri, 3.x in Mnesia (with pause_minority).
    let version = nodes[0].version().await?;
    let store = nodes[0].metadata_store().await?;
    for node in &nodes {
        set_dlx_confirm_timeout(node).await?;
    }
    let mut s = Scenario::new(3, "cluster-leader-kill", nodes.to_vec(), bin).await?;
    let mut report = Report::new(3, s.name);
    report.note(format!(
        "3-node cluster of RabbitMQ {version}, metadata in {store}"
    ));
    let settings = Settings::default();
    let all = s.urls();
    let rotate = |k: usize| -> Vec<String> { (0..3).map(|i| all[(i + k) % 3].clone()).collect() };
    // The dispatcher declares the queue, so its leader sits on the dispatcher's node (3).
    let dispatcher = s.dispatcher(&settings, &rotate(2)).await?;
    let specs = vec![
        s.worker("w1", &settings, &rotate(0)),
        s.worker("w2", &settings, &rotate(1)),
    ];
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
    let jobs = s.mixed_jobs(6_000, 20, 20, 20);
    let mut kinds = check::kinds_of(&jobs);
    let plan = Plan {
        rate: Some(200.0),
        concurrency: 500,
        ..Plan::default()
    };
    // A second dispatcher on node 1, connected (and used once) before the fault, so that the
    // report can tell a channel that existed before the kill from one opened after it.
    let standby = s.dispatcher(&settings, &rotate(0)).await?;
    let mut standby_jobs = s.jobs(11, "echo", &json!({}));
    kinds.extend(check::kinds_of(&standby_jobs));
    let mut ledger = Ledger::default();
    let first = standby_jobs.remove(0);
    ledger.submitted.insert(first.id.clone().expect("id"));
    standby
        .submit(first.clone())
        .await
        .context("standby dispatcher")?;
    ledger.confirmed.insert(first.id.clone().expect("id"));
    let t0 = Instant::now();
    let (submitting, log) = submit::spawn(dispatcher.clone(), jobs, plan, CancellationToken::new());

    until(t0 + Duration::from_secs(10)).await;
    let leader = queue_leader(&s.node, &s.vhost, &s.queue).await?;
    let victim = nodes
        .iter()
        .position(|n| n.erlang_name() == leader)
        .with_context(|| format!("leader {leader} is not a cluster member"))?;
    let fault_at = now_ms();
    nodes[victim].kill().await?;
    // Talk to a survivor from now on.
    s.node = nodes[(victim + 1) % 3].clone();
    let until_leader = Instant::now() + Duration::from_secs(30);
    let new_leader = loop {
        if let Ok(l) = queue_leader(&s.node, &s.vhost, &s.queue).await
            && l != leader
            && !l.is_empty()
        {
            break l;
        }
        anyhow::ensure!(Instant::now() < until_leader, "no new leader within 30 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    report.note(format!(
        "killed the leader {leader}; new leader {new_leader} seen after {:.1}s",
        (now_ms() - fault_at) as f64 / 1000.0
    ));
    // While the node is down: one submit a second through the standby dispatcher.
    let mut standby_results = Vec::new();
    for job in standby_jobs {
        let id = job.id.clone().expect("id");
        ledger.submitted.insert(id.clone());
        let result = tokio::time::timeout(Duration::from_secs(2), standby.submit(job)).await;
        let text = match result {
            Ok(Ok(_)) => {
                ledger.confirmed.insert(id);
                "ok".to_owned()
            }
            Ok(Err(err)) => submit::class(&err).to_owned(),
            Err(_) => "no answer in 2s".to_owned(),
        };
        standby_results.push(text);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report.note(format!(
        "submits through a dispatcher connected before the kill, while the node was down: {standby_results:?}"
    ));
    // And through one connected after the new leader was known.
    let late = s.dispatcher(&settings, &rotate(1)).await?;
    let mut late_results = Vec::new();
    let late_jobs = s.jobs(5, "echo", &json!({}));
    kinds.extend(check::kinds_of(&late_jobs));
    for job in late_jobs {
        let id = job.id.clone().expect("id");
        ledger.submitted.insert(id.clone());
        let result = tokio::time::timeout(Duration::from_secs(2), late.submit(job)).await;
        late_results.push(match result {
            Ok(Ok(_)) => {
                ledger.confirmed.insert(id);
                "ok".to_owned()
            }
            Ok(Err(err)) => submit::class(&err).to_owned(),
            Err(_) => "no answer in 2s".to_owned(),
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    report.note(format!(
        "submits through a dispatcher connected {:.1}s after the kill: {late_results:?}",
        (now_ms() - fault_at) as f64 / 1000.0
    ));
    let down: u64 = std::env::var("WARREN_FAULTS_NODE_DOWN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    until(t0 + Duration::from_secs(10 + down)).await;
    let restart_at = now_ms();
    nodes[victim].start().await?;
    set_dlx_confirm_timeout(&nodes[victim]).await?;
    report.note(format!(
        "{leader} started again after {:.1}s",
        (now_ms() - fault_at) as f64 / 1000.0
    ));

    tokio::time::timeout(Duration::from_secs(180), submitting)
        .await
        .context("submitting")??;
    {
        let log = log.lock().expect("log");
        ledger.add_dispatcher(&log);
        report.note(format!("failed submit attempts: {}", log.error_summary()));
        report.check(
            !log.errors.contains_key("hung"),
            "a submit hung past its deadline",
        );
        // The main dispatcher lost its connection with the node: it must fail over and have
        // submits confirmed again while that node is still down.
        // (From its first failure after the kill: publishes already on their way may still be
        // confirmed by the dying node.)
        let first_failure = log
            .attempts
            .iter()
            .filter(|a| a.error.is_some() && a.end_ms >= fault_at)
            .map(|a| a.end_ms)
            .min()
            .unwrap_or(fault_at);
        let first_ok = log
            .attempts
            .iter()
            .filter(|a| a.error.is_none() && a.start_ms >= first_failure)
            .map(|a| a.end_ms)
            .min();
        match first_ok {
            Some(ok) if ok < restart_at => report.note(format!(
                "the main dispatcher had a submit confirmed again {:.1}s after the kill",
                (ok - fault_at) as f64 / 1000.0
            )),
            Some(ok) => report.fail(format!(
                "the main dispatcher had no submit confirmed until the killed node was back \
                 ({:.1}s after the kill; {} nacks meanwhile)",
                (ok - fault_at) as f64 / 1000.0,
                log.errors.get("nacked").copied().unwrap_or(0)
            )),
            None => report.fail("the main dispatcher never had a submit confirmed after the kill"),
        }
        let lines = s.sink.lines();
        let last_before = lines
            .iter()
            .map(|l| l.recorded_ms)
            .filter(|t| *t < fault_at + 500)
            .max();
        let first_after = lines
            .iter()
            .map(|l| l.started_ms)
            .filter(|t| *t >= fault_at + 500)
            .min();
        if let (Some(a), Some(b)) = (last_before, first_after) {
            report.note(format!(
                "around the kill: last job recorded at +{:.1}s, next one started at +{:.1}s",
                a.saturating_sub(fault_at) as f64 / 1000.0,
                b.saturating_sub(fault_at) as f64 / 1000.0
            ));
        }
    }
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    s.judge_kinds(&mut report, &kinds, &ledger, &dead);
    note_retry_delays(&s, &mut report, fault_at);
    let lines = s.sink.lines();
    match recovery_ms(&lines, fault_at, fault_at + 500, None) {
        Some(ms) => report.recovery.push(ms as f64 / 1000.0),
        None => report.fail("no job processed after the leader was killed"),
    }
    s.cleanup().await;
    Ok(report)
}

/// Notes how long the retries took to come back: from a `flaky` job's retry being scheduled
/// (its settlement) to its run being recorded, for the retries scheduled before and after the
/// kill (1 s is what was asked).
fn note_retry_delays(s: &Scenario, report: &mut Report, fault_at: u64) {
    let done: std::collections::HashMap<String, u64> = s
        .sink
        .lines()
        .into_iter()
        .map(|l| (l.id, l.recorded_ms))
        .collect();
    let (mut before, mut after) = (Vec::new(), Vec::new());
    for settled in s.sink.settlements() {
        if settled.outcome != "retry-scheduled" {
            continue;
        }
        if let Some(recorded) = done.get(&settled.id) {
            let took = recorded.saturating_sub(settled.at_ms) as f64 / 1000.0;
            if settled.at_ms < fault_at {
                before.push(took);
            } else {
                after.push(took);
            }
        }
    }
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    report.note(format!(
        "retries (1 s asked) came back within {:.1}s when scheduled before the kill ({} of them), within {:.1}s after it ({})",
        max(&before),
        before.len(),
        max(&after),
        after.len()
    ));
}
