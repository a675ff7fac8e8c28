//! The scenarios, one file each, and the suite that runs them in order.
//!
//! | # | file | fault |
//! |---|---|---|
//! | 1 | [`worker_sigkill`] | workers SIGKILLed mid-job |
//! | 2 | [`broker_restart`] | the broker stopped, and killed, under load |
//! | 3 | [`cluster_leader_kill`] | the quorum queue's leader node killed |
//! | 4 | [`connection_faults`] | connections closed by the broker; a frozen connection |
//! | 5 | [`poison_job`] | a job that kills its worker process |
//! | 6 | [`memory_alarm`] | publishers blocked by a memory alarm, failing jobs among good ones |
//! | 7 | [`consumer_timeout`] | the broker closes a consumer's channel |
//! | 8 | [`bad_input`] | hostile messages from raw AMQP clients |
//! | 9 | [`queue_deleted`] | one of a worker's queues deleted and declared again |

pub mod bad_input;
pub mod broker_restart;
pub mod cluster_leader_kill;
pub mod connection_faults;
pub mod consumer_timeout;
pub mod memory_alarm;
pub mod poison_job;
pub mod queue_deleted;
pub mod worker_sigkill;

use std::path::Path;
use std::time::{Duration, Instant};

use super::node::Node;
use super::{Report, table};

/// Every scenario, by number.
pub const ALL: [(u8, &str); 9] = [
    (1, "worker-sigkill"),
    (2, "broker-restart"),
    (3, "cluster-leader-kill"),
    (4, "connection-cut-and-freeze"),
    (5, "poison-job"),
    (6, "memory-alarm"),
    (7, "consumer-timeout"),
    (8, "bad-input"),
    (9, "queue-deleted"),
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
    match single.version().await {
        Ok(version) => eprintln!(
            "fault suite on RabbitMQ {version} ({})",
            single.erlang_name()
        ),
        Err(err) => eprintln!("the fault node did not tell its version: {err}"),
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
        1 => one(timed(t0, worker_sigkill::run(bin).await)?),
        2 => one(timed(t0, broker_restart::run(bin).await)?),
        3 => {
            let result = timed(t0, cluster_leader_kill::run(bin).await);
            // Free the two cores for the next scenarios.
            if let Err(err) = super::node::stop_cluster().await {
                eprintln!("stopping the cluster: {err}");
            }
            one(result?)
        }
        4 => one(timed(t0, connection_faults::run(bin).await)?),
        5 => {
            let first = timed(t0, poison_job::run(bin, "5", 1).await)?;
            let t1 = Instant::now();
            vec![first, timed(t1, poison_job::run(bin, "5b", 8).await)?]
        }
        6 => one(timed(t0, memory_alarm::run(bin).await)?),
        7 => one(timed(t0, consumer_timeout::run(bin).await)?),
        8 => one(timed(t0, bad_input::run(bin).await)?),
        9 => one(timed(t0, queue_deleted::run(bin).await)?),
        _ => anyhow::bail!("there is no scenario {number}"),
    })
}

/// Waits until `at`, or returns at once if it passed.
async fn until(at: Instant) {
    tokio::time::sleep_until(at.into()).await;
}

/// A worker process's session as the broker sees it: the connections it had when it started
/// consuming. Warren opens new ones for every session, so finding the same ones later proves
/// it never had to start a new session (checked on the broker, not in the worker's log).
pub struct Session {
    pid: u32,
    connections: Vec<String>,
}

impl Session {
    /// The connections of worker process `pid` now (it must have its two).
    pub async fn of(node: &Node, pid: u32) -> anyhow::Result<Session> {
        let connections = node.connections_of(pid).await?;
        anyhow::ensure!(
            connections.len() == 2,
            "worker {pid} has {} connections, not its two: {connections:?}",
            connections.len()
        );
        Ok(Session { pid, connections })
    }

    /// Fails `report` unless process `pid` still has exactly the connections it started with.
    pub async fn check_unchanged(&self, node: &Node, report: &mut Report) -> anyhow::Result<()> {
        let now = node.connections_of(self.pid).await?;
        report.check(
            now == self.connections,
            format!(
                "worker {} started a new session: its connections were {:?}, are {now:?}",
                self.pid, self.connections
            ),
        );
        Ok(())
    }
}
