//! Scenario 5: a poison job (`abort`: the worker process dies whenever it runs it) among 1,000
//! good ones, on a queue with `delivery_limit = 3`; a supervisor restarts the worker each time.
//! The poison job must end in `<queue>.dead` (the broker's delivery limit) and every good job
//! must be processed. Recovery: from each death to the first job of the restarted worker.
//!
//! Run twice: with concurrency 1 and prefetch 1, and as `5b` with concurrency 8 and prefetch 8
//! (both set explicitly: Warren's default prefetch is twice the concurrency). On RabbitMQ 3.10
//! and 4.3 alike a quorum queue counts a delivery for every message a dead consumer held, so good jobs
//! prefetched beside the poison one (and not finished before the crash) are redelivered with
//! it, in the same order, and can reach the delivery limit with it: `5b` reports how many
//! (they are dead-lettered, not lost) instead of failing on them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::fault::check::Ledger;
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings};
use crate::sink::{Tally, recovery_ms};

/// Runs the scenario with `concurrency` (and the same prefetch), reported as `label`.
pub async fn run(bin: &Path, label: &str, concurrency: u16) -> anyhow::Result<Report> {
    let name = if concurrency == 1 {
        "poison-job"
    } else {
        "poison-job-prefetch8"
    };
    let s = Scenario::new(5, name, vec![Node::single()], bin).await?;
    let mut report = Report::new(label, s.name);
    let settings = Settings {
        delivery_limit: 3,
        concurrency,
        // Set, not left to the default (twice the concurrency): what is tested is how many
        // deliveries a crash takes with it.
        prefetch: Some(concurrency),
        ..Settings::default()
    };
    let (dispatcher, pool) = s.dispatcher_and_worker(&settings).await?;
    let pool = Arc::new(Mutex::new(pool));
    let stop_supervisor = CancellationToken::new();
    let supervisor = tokio::spawn(crate::procs::supervise(
        pool.clone(),
        stop_supervisor.clone(),
    ));

    let mut jobs = s.jobs(1_000, "echo", &json!({}));
    let poison = s.jobs(1, "abort", &json!({})).remove(0);
    let poison_id = poison.id.clone().expect("id");
    jobs.insert(500, poison);
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        jobs,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting did not finish")??;

    // Let the supervisor restart the worker until everything settled: the poison job dead,
    // the good ones done.
    let expect = log.lock().expect("log").confirmed.clone();
    if let Err(err) = crate::fault::check::wait_settled(
        &s.node,
        &s.vhost,
        &s.sink,
        &expect,
        Duration::from_secs(120),
    )
    .await
    {
        report.fail(format!("{err:#}"));
    }
    stop_supervisor.cancel();
    let deaths = supervisor.await?;
    let mut pool = Arc::try_unwrap(pool)
        .map_err(|_| anyhow::anyhow!("pool still shared"))?
        .into_inner();
    pool.procs[0].wait_started(Duration::from_secs(30)).await?;

    let mut ledger = Ledger::default();
    ledger.add_dispatcher(&log.lock().expect("log"));
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    report.note(format!(
        "worker died {} time(s): {:?}",
        deaths.len(),
        deaths.iter().map(|d| d.status.as_str()).collect::<Vec<_>>()
    ));
    let limit = settings.delivery_limit as usize;
    report.check(
        (1..=limit + 1).contains(&deaths.len()),
        format!(
            "the worker died {} times; expected 1 to {} (delivery limit {limit})",
            deaths.len(),
            limit + 1
        ),
    );
    let poison_dead: Vec<_> = dead.iter().filter(|d| d.key == poison_id).collect();
    report.check(
        poison_dead.len() == 1 && poison_dead[0].class == "broker:delivery_limit",
        format!("the poison job is not dead-lettered once by the delivery limit: {poison_dead:?}"),
    );
    let collateral: Vec<_> = dead.iter().filter(|d| d.key != poison_id).collect();
    let tally = Tally::of(&s.sink.lines());
    let never_ran = collateral
        .iter()
        .filter(|d| !tally.counts.contains_key(&d.key))
        .count();
    report.check(
        !tally.counts.contains_key(&poison_id),
        "the poison job was recorded as processed",
    );
    if concurrency == 1 {
        report.check(
            collateral.is_empty(),
            format!(
                "{} good jobs were dead-lettered with the poison job: {collateral:?}",
                collateral.len()
            ),
        );
        report.check(
            tally.unique() == 1_000,
            format!("{} of the 1,000 good jobs processed", tally.unique()),
        );
    } else if !collateral.is_empty() {
        report.note(format!(
            "LIMITATION (quorum queues + prefetch {concurrency}): {} good jobs prefetched beside the \
             poison job reached the delivery limit with it and were dead-lettered ({never_ran} of them never ran); \
             none lost",
            collateral.len()
        ));
    }
    let lines = s.sink.lines();
    // Only replacements that did not take the poison job first record a job.
    for death in &deaths {
        if let Some(ms) = recovery_ms(&lines, death.at_ms, death.at_ms, Some(death.replacement)) {
            report.recovery.push(ms as f64 / 1000.0);
        }
    }
    s.cleanup().await;
    Ok(report)
}
