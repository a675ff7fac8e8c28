//! The eight scenarios of issue 3, and the suite that runs them in order.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::check::Ledger;
use super::node::Node;
use super::procs::Pool;
use super::sink::{Tally, recovery_ms};
use super::submit::{self, Plan};
use super::{Report, Scenario, Settings, now_ms, table};

/// Every scenario, by number.
pub const ALL: [(u8, &str); 8] = [
    (1, "worker-sigkill"),
    (2, "broker-restart"),
    (3, "cluster-leader-kill"),
    (4, "connection-cut-and-freeze"),
    (5, "poison-job"),
    (6, "memory-alarm"),
    (7, "consumer-timeout"),
    (8, "bad-input"),
];

/// Longest a scenario may take before it is abandoned as failed.
const SCENARIO_DEADLINE: Duration = Duration::from_secs(360);

/// Runs the selected scenarios in order on the suite's own nodes and prints one line per
/// scenario, then the table. Starts the fault node (and the cluster, for scenario 3, stopped
/// again right after it).
pub async fn run_suite(bin: &Path, selection: &[u8]) -> Vec<Report> {
    let started = Instant::now();
    let mut reports = Vec::new();
    let single = Node::single();
    if let Err(err) = single.start().await {
        let mut report = Report::new(0, "start the fault node");
        report.fail(format!("{err}"));
        return vec![report];
    }
    for (number, name) in ALL {
        if !selection.contains(&number) {
            continue;
        }
        eprintln!("\n=== scenario {number}: {name} ===");
        let t0 = Instant::now();
        let run = run_one(number, bin);
        let done = match tokio::time::timeout(SCENARIO_DEADLINE, run).await {
            Ok(Ok(done)) => done,
            Ok(Err(err)) => {
                let mut report = Report::new(number, name);
                report.fail(format!("scenario aborted: {err:#}"));
                vec![report]
            }
            Err(_) => {
                let mut report = Report::new(number, name);
                report.fail(format!(
                    "scenario did not finish within {SCENARIO_DEADLINE:?}"
                ));
                vec![report]
            }
        };
        let count = done.len() as u32;
        for mut report in done {
            if report.wall.is_zero() {
                report.wall = t0.elapsed() / count;
            }
            println!("{}", report.line());
            reports.push(report);
        }
    }
    println!(
        "\nfault suite: {} scenario(s) in {:.0}s\n\n{}",
        reports.len(),
        started.elapsed().as_secs_f64(),
        table(&reports)
    );
    reports
}

async fn run_one(number: u8, bin: &Path) -> anyhow::Result<Vec<Report>> {
    let timed = |t0: Instant, report: anyhow::Result<Report>| {
        report.map(|mut r| {
            r.wall = t0.elapsed();
            r
        })
    };
    let t0 = Instant::now();
    let one = |r: Report| vec![r];
    Ok(match number {
        1 => one(timed(t0, worker_sigkill(bin).await)?),
        2 => one(timed(t0, broker_restart(bin).await)?),
        3 => {
            let result = timed(t0, cluster_leader_kill(bin).await);
            // Free the two cores for the next scenarios.
            if let Err(err) = super::node::stop_cluster().await {
                eprintln!("stopping the cluster: {err}");
            }
            one(result?)
        }
        4 => one(timed(t0, connection_faults(bin).await)?),
        5 => {
            let first = timed(t0, poison_job(bin, "5", 1).await)?;
            let t1 = Instant::now();
            vec![first, timed(t1, poison_job(bin, "5b", 8).await)?]
        }
        6 => one(timed(t0, memory_alarm(bin).await)?),
        7 => one(timed(t0, consumer_timeout(bin).await)?),
        8 => one(timed(t0, super::bad_input::bad_input(bin).await)?),
        _ => anyhow::bail!("scenario {number} is not written yet"),
    })
}

/// Waits until `at` (an `Instant`), or returns at once if it passed.
async fn until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// Scenario 1: A worker SIGKILLed every 3 s while 3 workers run 10,000 jobs; each killed worker is
/// restarted at once. Recovery: from each kill to the first job recorded by its replacement.
async fn worker_sigkill(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(1, "worker-sigkill", vec![Node::single()], bin).await?;
    let mut report = Report::new(1, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let specs = (1..=3)
        .map(|i| s.worker(&format!("w{i}"), &settings, &urls))
        .collect();
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
    let jobs = s.jobs(10_000, "sleep", &json!({"ms": 50}));
    let stop = CancellationToken::new();
    let (submitting, log) = submit::spawn(dispatcher.clone(), jobs, Plan::default(), stop.clone());

    let mut kills = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let processed = Tally::of(&s.sink.lines()).unique();
        if processed >= 9_000 || Instant::now() > deadline {
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
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
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

/// Scenario 2: The broker stopped and restarted twice while 10,000 jobs flow (submitted at 200/s by a
/// dispatcher that keeps submitting through the outages): once `stop_app` + 3 s + `start_app`,
/// once `kill -9` + start. Recovery: from the fault to the first job recorded whose handler
/// started after the broker was back.
async fn broker_restart(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(2, "broker-restart", vec![Node::single()], bin).await?;
    let mut report = Report::new(2, s.name);
    let settings = Settings::default();
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let specs = (1..=3)
        .map(|i| s.worker(&format!("w{i}"), &settings, &urls))
        .collect();
    let mut pool = Pool::start(specs, Duration::from_secs(60)).await?;
    let jobs = s.jobs(10_000, "sleep", &json!({"ms": 10}));
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
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
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

/// Scenario 5: A poison job (`abort`: the worker process dies whenever it runs it) among 1,000 good
/// ones, on a queue with `delivery_limit = 3`; a supervisor restarts the worker each time.
/// The poison job must end in `<queue>.dead` (the broker's delivery limit) and every good job
/// must be processed. Recovery: from each death to the first job of the restarted worker.
///
/// Run twice: with concurrency (= prefetch) 1, and as `5b` with concurrency 8. On RabbitMQ
/// 3.10 a quorum queue counts a delivery for every message a dead consumer held, so good jobs
/// prefetched beside the poison one (and not finished before the crash) are redelivered with
/// it, in the same order, and can reach the delivery limit with it: `5b` reports how many
/// (they are dead-lettered, not lost) instead of failing on them.
async fn poison_job(bin: &Path, label: &str, concurrency: u16) -> anyhow::Result<Report> {
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
        ..Settings::default()
    };
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let pool = Pool::start(
        vec![s.worker("w1", &settings, &urls)],
        Duration::from_secs(60),
    )
    .await?;
    let pool = Arc::new(Mutex::new(pool));
    let stop_supervisor = CancellationToken::new();
    let supervisor = tokio::spawn(super::procs::supervise(
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
    if let Err(err) = super::check::wait_settled(
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
            "LIMITATION (RabbitMQ 3.10 quorum queues + prefetch {concurrency}): {} good jobs prefetched beside the \
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

/// True while the node reports a memory alarm.
async fn memory_alarm_on(node: &Node) -> anyhow::Result<bool> {
    Ok(node
        .eval("rabbit_alarm:get_alarms().")
        .await?
        .contains("memory"))
}

/// Polls `check` (every 200 ms) until it returns `want`, at most `deadline`.
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

/// Scenario 6: Publishers blocked by a memory alarm (`set_vm_memory_high_watermark 0`) for 12 s, then
/// released (`0.4`), while a worker drains a backlog and the dispatcher goes on submitting
/// (10 jobs/s, `blocked_timeout = 3s`). Submits during the alarm must fail clearly
/// (`Blocked` after the timeout, or no confirm in time) or succeed only after the release —
/// none may return an id while the broker blocks publishing — and the worker must keep
/// consuming meanwhile. Recovery: from the release to the first confirmed submit.
async fn memory_alarm(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(6, "memory-alarm", vec![Node::single()], bin).await?;
    let mut report = Report::new(6, s.name);
    let settings = Settings {
        blocked_timeout: "3s",
        concurrency: 2,
        ..Settings::default()
    };
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let mut pool = Pool::start(
        vec![s.worker("w1", &settings, &urls)],
        Duration::from_secs(60),
    )
    .await?;
    // A backlog for the worker to chew on through the alarm.
    let backlog = s.jobs(3_000, "sleep", &json!({"ms": 10}));
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
        let plan = Plan {
            rate: Some(10.0),
            concurrency: 200,
            retry_pause: Duration::from_millis(500),
            ..Plan::default()
        };
        let (submitting, log) =
            submit::spawn(dispatcher.clone(), during, plan, CancellationToken::new());
        tokio::time::sleep(Duration::from_secs(12)).await;
        let release = now_ms();
        s.node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await?;
        wait_for_alarm(&s.node, false, Duration::from_secs(20)).await?;
        tokio::time::timeout(Duration::from_secs(120), submitting)
            .await
            .context("submitting")??;
        anyhow::Ok((alarm_on, release, log))
    }
    .await;
    // Whatever happened, never leave the node alarmed.
    let _ = s.node.ctl(&["set_vm_memory_high_watermark", "0.4"]).await;
    let (alarm_on, release, log) = result?;

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
    let consumed_during = s
        .sink
        .lines()
        .iter()
        .filter(|l| l.recorded_ms >= alarm_on && l.recorded_ms < release)
        .count();
    report.note(format!(
        "jobs processed while publishing was blocked: {consumed_during}"
    ));
    report.check(
        consumed_during > 100,
        format!("the worker processed only {consumed_during} jobs during the alarm"),
    );
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    s.cleanup().await;
    Ok(report)
}

/// The time at the start of a worker log line (tracing's RFC 3339 UTC stamp), in ms.
fn log_time_ms(line: &str) -> Option<u64> {
    let stamp = line.split_whitespace().next()?;
    let time = humantime::parse_rfc3339_weak(stamp).ok()?;
    let ms = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis();
    u64::try_from(ms).ok()
}

/// Scenario 7: A handler that never finishes (`hang`, on its first delivery) past a lowered
/// `consumer_timeout` (5 s, checked every second, set at run time on the fault node and
/// restored afterwards): the broker closes the consumer's channel, Warren reopens it and keeps
/// consuming, and the job is redelivered and completes. Meanwhile echo jobs keep arriving.
/// Recovery: from the channel close (the worker's log) to the first job recorded after it.
async fn consumer_timeout(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(7, "consumer-timeout", vec![Node::single()], bin).await?;
    let set = "application:set_env(rabbit, consumer_timeout, 5000), \
               application:set_env(rabbit, channel_tick_interval, 1000).";
    let restore = "application:set_env(rabbit, consumer_timeout, 1800000), \
                   application:set_env(rabbit, channel_tick_interval, 60000).";
    s.with_broker_settings(set, restore, consumer_timeout_run)
        .await
}

async fn consumer_timeout_run(s: &Scenario) -> anyhow::Result<Report> {
    let mut report = Report::new(7, s.name);
    let settings = Settings {
        concurrency: 4,
        job_timeout: "5m",
        shutdown_grace: "2s",
        ..Settings::default()
    };
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let mut pool = Pool::start(
        vec![s.worker("w1", &settings, &urls)],
        Duration::from_secs(60),
    )
    .await?;
    let worker_pid = pool.procs[0].pid;
    let hang = s.jobs(1, "hang", &json!({}));
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
    pool.procs[0]
        .wait_log("hang: first delivery", 1, Duration::from_secs(30))
        .await?;
    let hang_started = now_ms();
    let echoes = s.jobs(300, "echo", &json!({}));
    let plan = Plan {
        rate: Some(10.0),
        ..Plan::default()
    };
    let (submitting, log) =
        submit::spawn(dispatcher.clone(), echoes, plan, CancellationToken::new());
    let reopened = "consumer channel closed by the broker; reopening it";
    pool.procs[0]
        .wait_log(reopened, 1, Duration::from_secs(90))
        .await?;
    let closed_ms = pool.procs[0]
        .log_text()
        .lines()
        .find(|l| l.contains(reopened))
        .and_then(log_time_ms)
        .context("reading the time of the channel close")?;
    report.note(format!(
        "the broker closed the channel {:.1}s after the hang started",
        closed_ms.saturating_sub(hang_started) as f64 / 1000.0
    ));
    let until = Instant::now() + Duration::from_secs(60);
    while !Tally::of(&s.sink.lines()).counts.contains_key(&hang_id) {
        anyhow::ensure!(
            Instant::now() < until,
            "the hanging job was not redelivered and completed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    report.check(
        pool.procs[0].exited().is_none(),
        "the worker process exited",
    );
    report.check(pool.procs[0].pid == worker_pid, "the worker was replaced");
    let mut ledger = Ledger::default();
    ledger.add_dispatcher(&first_log.lock().expect("log"));
    ledger.add_dispatcher(&log.lock().expect("log"));
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    let lines = s.sink.lines();
    if let Some(ms) = recovery_ms(&lines, closed_ms, closed_ms, None) {
        report.recovery.push(ms as f64 / 1000.0);
    }
    let log_text = pool.procs[0].log_text();
    report.check(
        log_text.matches("worker started").count() == 1,
        "the worker started a new session (it should only have reopened the channel)",
    );
    Ok(report)
}

/// Closes (from the broker) every connection of worker process `pid`; returns how many.
async fn close_worker_connections(node: &Node, pid: u32) -> anyhow::Result<usize> {
    let listing = node
        .ctl(&[
            "-q",
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
        ])
        .await?;
    let mut closed = 0;
    for conn in crate::connections_named(&listing, &format!(":{pid} ")) {
        // A connection that went away meanwhile is fine.
        if node
            .ctl(&["close_connection", conn, "fault suite: connection cut"])
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    Ok(closed)
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

/// Scenario 4: Connection faults of one worker process. (a) For a minute, every 5 s, the broker closes
/// the worker's connections (`rabbitmqctl close_connection`): it must reconnect each time.
/// (b) A frozen connection: a second worker consumes through a TCP relay (its first address;
/// its second address bypasses the relay) with a 10 s heartbeat; the relay is blackholed
/// (nothing passes, no socket closes), and the worker must notice the silence by heartbeat
/// and fail over. Jobs are submitted throughout. Recovery: from each cut (the moment the
/// worker logged the loss) to the first job it started after that; from the freeze to the
/// first job started 1 s after it or later (detection by heartbeat included).
async fn connection_faults(bin: &Path) -> anyhow::Result<Report> {
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
    let jobs = s.jobs(6_300, "sleep", &json!({"ms": 5}));
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
        let closed = close_worker_connections(&s.node, pid).await?;
        cuts.push((now_ms(), closed));
    }
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));
    let sessions = pool.procs[0].log_text().matches("worker started").count();
    report.note(format!(
        "cuts: closed {:?} connections; the worker ran {sessions} sessions",
        cuts.iter().map(|c| c.1).collect::<Vec<_>>()
    ));
    report.check(
        pool.procs[0].exited().is_none(),
        "the cut worker process exited",
    );
    report.check(
        sessions >= 10,
        format!("only {sessions} sessions for 12 cuts"),
    );
    pool.stop(Duration::from_secs(20)).await;
    // Each cut ends a session the moment the consuming connection is closed: the worker logs
    // "lost the broker" then. A job started after that line ran in a new session.
    let lines = s.sink.lines();
    let cut_recovery: Vec<f64> = pool.procs[0]
        .log_text()
        .lines()
        .filter(|l| l.contains("lost the broker"))
        .filter_map(log_time_ms)
        .filter_map(|lost| recovery_ms(&lines, lost, lost, Some(pid)))
        .map(|ms| ms as f64 / 1000.0)
        .collect();

    // (b) A frozen connection.
    let relay = super::relay::Relay::start(s.node.port).await?;
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
    pool.procs[0]
        .wait_log("worker started", 2, Duration::from_secs(90))
        .await
        .context("the worker never noticed the frozen connection")?;
    let log_text = pool.procs[0].log_text();
    let noticed = log_text
        .lines()
        .find(|l| l.contains("lost the broker"))
        .and_then(log_time_ms);
    if let Some(noticed) = noticed {
        report.note(format!(
            "frozen connection noticed after {:.1}s (heartbeat 10s)",
            noticed.saturating_sub(frozen_at) as f64 / 1000.0
        ));
    }
    tokio::time::timeout(Duration::from_secs(120), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));
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
    report.check(
        frozen_recovery.is_some(),
        "no job processed after the freeze",
    );
    s.cleanup().await;
    Ok(report)
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

/// Scenario 3: A 3-node cluster with quorum queues: while 6,000 jobs flow (200/s), the node holding the
/// queue's leader is killed (`kill -9`); workers and dispatcher have all three addresses and
/// fail over. The node is started again 10 s later. Recovery: from the kill to the first job
/// started 0.5 s after it or later.
async fn cluster_leader_kill(bin: &Path) -> anyhow::Result<Report> {
    super::node::start_cluster().await?;
    let nodes = super::node::cluster();
    let mut s = Scenario::new(3, "cluster-leader-kill", nodes.to_vec(), bin).await?;
    let mut report = Report::new(3, s.name);
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
    let jobs = s.jobs(6_000, "sleep", &json!({"ms": 20}));
    let plan = Plan {
        rate: Some(200.0),
        concurrency: 500,
        ..Plan::default()
    };
    // A second dispatcher on node 1, connected (and used once) before the fault, so that the
    // report can tell a channel that existed before the kill from one opened after it.
    let standby = s.dispatcher(&settings, &rotate(0)).await?;
    let mut standby_jobs = s.jobs(11, "echo", &json!({}));
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
    for job in s.jobs(5, "echo", &json!({})) {
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
    s.finish(&mut pool, &ledger, &mut report, Duration::from_secs(120))
        .await?;
    let lines = s.sink.lines();
    match recovery_ms(&lines, fault_at, fault_at + 500, None) {
        Some(ms) => report.recovery.push(ms as f64 / 1000.0),
        None => report.fail("no job processed after the leader was killed"),
    }
    s.cleanup().await;
    Ok(report)
}
