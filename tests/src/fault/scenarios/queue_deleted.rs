//! Scenario 9: one worker process consumes two queues, A and B. A is deleted (the broker
//! cancels its consumer), jobs keep arriving on B meanwhile, then A is declared again and gets
//! jobs of its own. Every job of both queues must be processed by that one process, in one
//! session (its connections unchanged, checked on the broker): B is never left waiting while
//! A is gone, and A is consumed again once it is back (the worker subscribes again, with
//! backoff while A is missing). Recovery: from A's redeclaration to the first job of A
//! recorded after it.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use lapin::options::QueueDeleteOptions;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::envelope::NewJob;
use warren_dispatcher::Dispatcher;

use super::Session;
use crate::fault::check::Ledger;
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings, now_ms};
use crate::sink::Sink;

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let mut s = Scenario::new(9, "queue-deleted", vec![Node::single()], bin).await?;
    let a = s.queue.clone();
    let b = format!("{a}-b");
    s.queues = vec![a.clone(), b.clone()];
    let mut report = Report::new(9, s.name);
    let settings = Settings::default();
    let (dispatcher, mut pool) = s.dispatcher_and_worker(&settings).await?;
    let pid = pool.procs[0].pid;
    let session = Session::of(&s.node, pid).await?;
    let first_tag_a = s.node.consumer_tags(&s.vhost, &a).await?;
    let mut ledger = Ledger::default();
    let plan = Plan {
        rate: Some(50.0),
        ..Plan::default()
    };
    let payload = json!({"ms": 5});

    // Both queues consumed.
    let mut first = s.jobs_for(&a, 100, "sleep", &payload);
    first.extend(s.jobs_for(&b, 100, "sleep", &payload));
    submit_and_wait(&s, &dispatcher, first, &plan, &mut ledger).await?;

    // A deleted; B goes on.
    let connection = warren_core::connection::connect(
        &warren_core::config::BrokerConfig {
            url: s.node.url(&s.vhost),
            ..Default::default()
        },
        "fault-suite admin",
    )
    .await?;
    let channel = connection.create_channel().await?;
    channel
        .queue_delete(a.as_str().into(), QueueDeleteOptions::default())
        .await
        .context("deleting queue A")?;
    let _ = connection.close(200, "deleted".into()).await;
    let deleted_at = now_ms();
    let on_b = s.jobs_for(&b, 300, "sleep", &payload);
    let b_ids: HashSet<String> = on_b.iter().filter_map(|j| j.id.clone()).collect();
    submit_and_wait(&s, &dispatcher, on_b, &plan, &mut ledger).await?;
    let redeclared_at = now_ms();
    let b_while_gone = s
        .sink
        .lines()
        .iter()
        .filter(|l| b_ids.contains(&l.id) && l.recorded_ms < redeclared_at)
        .count();
    report.note(format!(
        "while A was gone ({:.1}s): {b_while_gone} of B's {} jobs processed",
        (redeclared_at - deleted_at) as f64 / 1000.0,
        b_ids.len()
    ));

    // A declared again, and given jobs.
    tokio::time::timeout(
        Duration::from_secs(30),
        dispatcher.apply_topology(std::slice::from_ref(&a)),
    )
    .await
    .context("declaring A again: no answer")??;
    let on_a = s.jobs_for(&a, 200, "sleep", &payload);
    let a_ids: HashSet<String> = on_a.iter().filter_map(|j| j.id.clone()).collect();
    submit_and_wait(&s, &dispatcher, on_a, &plan, &mut ledger).await?;
    let lines = s.sink.lines();
    if let Some(first_a) = lines
        .iter()
        .filter(|l| a_ids.contains(&l.id))
        .map(|l| l.recorded_ms)
        .min()
    {
        report
            .recovery
            .push(first_a.saturating_sub(redeclared_at) as f64 / 1000.0);
    }
    let tag_a = s.node.consumer_tags(&s.vhost, &a).await?;
    report.check(
        tag_a.len() == 1 && tag_a[0].contains(&format!(":{pid} ")) && tag_a != first_tag_a,
        format!("A's consumer is not a new one of the worker: {first_tag_a:?}, then {tag_a:?}"),
    );
    report.check(
        pool.procs[0].exited().is_none(),
        "the worker process exited",
    );
    session.check_unchanged(&s.node, &mut report).await?;
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    report.check(
        s.sink.lines().iter().all(|l| l.pid == pid),
        "a job was recorded by another process",
    );
    if let Ok(d) = Arc::try_unwrap(dispatcher) {
        d.close().await;
    }
    s.cleanup().await;
    Ok(report)
}

/// Submits `jobs` at `plan`'s pace, then waits until every confirmed one is in the sink.
async fn submit_and_wait(
    s: &Scenario,
    dispatcher: &Arc<Dispatcher>,
    jobs: Vec<NewJob>,
    plan: &Plan,
    ledger: &mut Ledger,
) -> anyhow::Result<()> {
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        jobs,
        plan.clone(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .context("submitting")??;
    let confirmed = log.lock().expect("log").confirmed.clone();
    ledger.add_dispatcher(&log.lock().expect("log"));
    wait_recorded(&s.sink, &confirmed, Duration::from_secs(60)).await
}

/// Waits until every id of `ids` is in the sink.
async fn wait_recorded(
    sink: &Sink,
    ids: &HashSet<String>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    loop {
        let seen: HashSet<String> = sink.lines().into_iter().map(|l| l.id).collect();
        let missing = ids.iter().filter(|id| !seen.contains(*id)).count();
        if missing == 0 {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < until,
            "{missing} of {} jobs not processed within {deadline:?}",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
