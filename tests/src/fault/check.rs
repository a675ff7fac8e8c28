//! After the faults: wait until everything settled, check nothing is stuck, drain the
//! dead-letter queues and count against the ledger of what was submitted.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lapin::options::BasicGetOptions;
use warren_core::envelope::{self, ERROR, ERROR_CLASS};

use warren_core::envelope::NewJob;

use super::node::Node;
use crate::sink::{Sink, Tally};

/// What was submitted, by job key (the message id; for raw messages without one, a case
/// name).
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    pub submitted: HashSet<String>,
    /// Confirmed by the broker (the dispatcher returned the id, or a raw publish was acked).
    pub confirmed: HashSet<String>,
}

impl Ledger {
    pub fn add_dispatcher(&mut self, log: &super::submit::Log) {
        self.submitted.extend(log.submitted.iter().cloned());
        self.confirmed.extend(log.confirmed.iter().cloned());
    }
}

/// One queue as `rabbitmqctl list_queues` shows it.
#[derive(Debug, Clone)]
pub struct QueueRow {
    pub name: String,
    pub ready: u64,
    pub unacked: u64,
    /// All messages the queue holds: ready, unacked, and (quorum queues with at-least-once
    /// dead-lettering) those dead-lettered but not yet accepted by their target, which neither
    /// of the other two counts.
    pub messages: u64,
}

impl QueueRow {
    /// True while the queue holds anything at all.
    pub fn busy(&self) -> bool {
        self.ready > 0 || self.unacked > 0 || self.messages > 0
    }

    /// `name: N ready, N unacked, N held for dead-lettering`.
    pub fn describe(&self) -> String {
        let held = self.messages.saturating_sub(self.ready + self.unacked);
        let mut text = format!(
            "{}: {} ready, {} unacked",
            self.name, self.ready, self.unacked
        );
        if held > 0 {
            text.push_str(&format!(", {held} held for dead-lettering"));
        }
        text
    }
}

pub async fn list_queues(node: &Node, vhost: &str) -> anyhow::Result<Vec<QueueRow>> {
    let text = node
        .ctl(&[
            "-q",
            "list_queues",
            "-p",
            vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "messages",
            "--no-table-headers",
        ])
        .await?;
    let mut rows = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 4 {
            bail!("unexpected list_queues line {line:?}");
        }
        let count = |i: usize| fields[i].trim().parse().unwrap_or(u64::MAX);
        rows.push(QueueRow {
            name: fields[0].to_owned(),
            ready: count(1),
            unacked: count(2),
            messages: count(3),
        });
    }
    Ok(rows)
}

/// Sum of `messages_unacknowledged` over the channels of `vhost`.
pub async fn channels_unacked(node: &Node, vhost: &str) -> anyhow::Result<u64> {
    let text = node
        .ctl(&[
            "-q",
            "list_channels",
            "vhost",
            "messages_unacknowledged",
            "--no-table-headers",
        ])
        .await?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .filter(|(v, _)| *v == vhost)
        .map(|(_, n)| n.trim().parse::<u64>().unwrap_or(0))
        .sum())
}

fn is_dead(name: &str) -> bool {
    name.ends_with(warren_core::topology::DEAD_SUFFIX)
}

/// Waits until every work and delay queue of `vhost` holds nothing (0 ready, 0 unacked, 0 held
/// for dead-lettering), every id in `expect` is in the sink or could be among the dead letters,
/// and the sink stopped growing.
pub async fn wait_settled(
    node: &Node,
    vhost: &str,
    sink: &Sink,
    expect: &HashSet<String>,
    deadline: Duration,
) -> anyhow::Result<()> {
    let until = Instant::now() + deadline;
    let mut last_lines = usize::MAX;
    let mut last_state;
    loop {
        let lines = sink.lines();
        let seen: HashSet<&str> = lines.iter().map(|l| l.id.as_str()).collect();
        let missing = expect
            .iter()
            .filter(|id| !seen.contains(id.as_str()))
            .count() as u64;
        match list_queues(node, vhost).await {
            Ok(rows) => {
                let busy: Vec<String> = rows
                    .iter()
                    .filter(|r| !is_dead(&r.name) && r.busy())
                    .map(QueueRow::describe)
                    .collect();
                let dead: u64 = rows
                    .iter()
                    .filter(|r| is_dead(&r.name))
                    .map(|r| r.ready)
                    .sum();
                last_state = format!(
                    "{} sink lines, {missing} expected ids not in the sink, {dead} dead letters, busy queues: {busy:?}",
                    lines.len()
                );
                if busy.is_empty() && missing <= dead && lines.len() == last_lines {
                    return Ok(());
                }
            }
            Err(err) => last_state = format!("list_queues failed: {err}"),
        }
        last_lines = lines.len();
        if Instant::now() > until {
            bail!("not settled within {deadline:?}: {last_state}");
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// The stuck check: every non-dead queue (or every queue, with `all`) holds no message at all
/// (ready, unacked, or held for at-least-once dead-lettering: a delay level whose expired
/// messages never reach their work queue keeps them there, counted in neither of the first
/// two), and the unacked counts of the queues equal those of the channels. Returns the
/// problems found (empty = clean).
///
/// Queue counters lag a little behind (quorum queues publish them every few seconds), so a
/// check that finds a problem looks again, up to `patience`, before reporting it.
pub async fn stuck_check(
    node: &Node,
    vhost: &str,
    all: bool,
    patience: Duration,
) -> anyhow::Result<Vec<String>> {
    let until = Instant::now() + patience;
    loop {
        let problems = stuck_once(node, vhost, all).await?;
        if problems.is_empty() || Instant::now() > until {
            return Ok(problems);
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

async fn stuck_once(node: &Node, vhost: &str, all: bool) -> anyhow::Result<Vec<String>> {
    let rows = list_queues(node, vhost).await?;
    let by_channels = channels_unacked(node, vhost).await?;
    let mut problems: Vec<String> = rows
        .iter()
        .filter(|r| (all || !is_dead(&r.name)) && r.busy())
        .map(QueueRow::describe)
        .collect();
    let by_queues: u64 = rows.iter().map(|r| r.unacked).sum();
    if by_queues != by_channels {
        problems.push(format!(
            "queues hold {by_queues} unacked messages but channels own {by_channels}"
        ));
    }
    Ok(problems)
}

/// One message taken from a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadMessage {
    pub queue: String,
    /// The job key: message id, else the `x-fault-case` header, else a `case=NAME` marker in
    /// the body (as `case:NAME`).
    pub key: String,
    /// Warren's `x-warren-error-class`, or `broker:<x-first-death-reason>`.
    pub class: String,
    pub error: String,
}

/// Takes every message out of every dead-letter queue of `vhost` (basic.get, auto-ack).
pub async fn drain_dead(node: &Node, vhost: &str) -> anyhow::Result<Vec<DeadMessage>> {
    let rows = list_queues(node, vhost).await?;
    let broker = warren_core::config::BrokerConfig {
        url: node.url(vhost),
        ..Default::default()
    };
    let connection = warren_core::connection::connect(&broker, "fault-suite drain")
        .await
        .context("connecting to drain the dead-letter queues")?;
    let channel = connection.create_channel().await?;
    let mut dead = Vec::new();
    for row in rows.iter().filter(|r| is_dead(&r.name)) {
        loop {
            let get = channel.basic_get(row.name.as_str().into(), BasicGetOptions { no_ack: true });
            let Some(message) = tokio::time::timeout(Duration::from_secs(10), get).await?? else {
                break;
            };
            let delivery = message.delivery;
            let props = &delivery.properties;
            let class = envelope::header_str(props, ERROR_CLASS)
                .map(|c| c.into_owned())
                .or_else(|| {
                    envelope::header_str(props, "x-first-death-reason")
                        .map(|r| format!("broker:{r}"))
                })
                .unwrap_or_else(|| "?".into());
            let error = envelope::header_str(props, ERROR)
                .map(|c| c.into_owned())
                .unwrap_or_default();
            dead.push(DeadMessage {
                queue: row.name.clone(),
                key: key_of(props, &delivery.data),
                class,
                error,
            });
        }
    }
    let _ = connection.close(200, "drained".into()).await;
    Ok(dead)
}

/// The key a message is counted under (see [`DeadMessage::key`]).
pub fn key_of(props: &lapin::BasicProperties, body: &[u8]) -> String {
    if let Some(id) = props
        .message_id()
        .as_ref()
        .filter(|id| !id.as_str().is_empty())
    {
        return id.to_string();
    }
    if let Some(case) = envelope::header_str(props, "x-fault-case") {
        return format!("case:{case}");
    }
    let text = String::from_utf8_lossy(body);
    if let Some(rest) = text.split("case=").nth(1) {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        return format!("case:{name}");
    }
    "?unidentified".into()
}

/// The numbers of one scenario.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub submitted: usize,
    pub confirmed: usize,
    /// Unique ids in the sink.
    pub processed: usize,
    /// Sink lines beyond the first per id.
    pub duplicates: usize,
    /// Messages drained from the dead-letter queues.
    pub dead: usize,
    /// Confirmed, neither processed nor dead.
    pub lost: usize,
    /// Processed or dead, never submitted.
    pub unexpected: usize,
    /// Submitted, never confirmed, yet processed or dead.
    pub unconfirmed_arrived: usize,
    /// Ids that are both processed and dead.
    pub processed_and_dead: usize,
    pub lost_ids: Vec<String>,
    pub unexpected_ids: Vec<String>,
    /// Ids recorded more than once, with their counts (at most 10).
    pub duplicate_sample: Vec<(String, usize)>,
}

pub fn count(ledger: &Ledger, tally: &Tally, dead: &[DeadMessage]) -> Counts {
    let processed = tally.ids();
    let dead_ids: HashSet<String> = dead.iter().map(|d| d.key.clone()).collect();
    let arrived: HashSet<&String> = processed.iter().chain(dead_ids.iter()).collect();
    let mut lost_ids: Vec<String> = ledger
        .confirmed
        .iter()
        .filter(|id| !arrived.contains(id))
        .cloned()
        .collect();
    lost_ids.sort();
    let mut unexpected_ids: Vec<String> = arrived
        .iter()
        .filter(|id| !ledger.submitted.contains(**id))
        .map(|id| (*id).clone())
        .collect();
    unexpected_ids.sort();
    let unconfirmed_arrived = arrived
        .iter()
        .filter(|id| ledger.submitted.contains(**id) && !ledger.confirmed.contains(**id))
        .count();
    let mut dups: Vec<(String, usize)> = tally
        .counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, n)| (id.clone(), *n))
        .collect();
    dups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    dups.truncate(10);
    // A job dead-lettered twice (two copies) is a duplicate too.
    let mut dead_counts: HashMap<&str, usize> = HashMap::new();
    for d in dead {
        *dead_counts.entry(d.key.as_str()).or_insert(0) += 1;
    }
    let dead_dups: usize = dead_counts.values().map(|n| n - 1).sum();
    Counts {
        submitted: ledger.submitted.len(),
        confirmed: ledger.confirmed.len(),
        processed: processed.len(),
        duplicates: tally.duplicates() + dead_dups,
        dead: dead.len(),
        lost: lost_ids.len(),
        unexpected: unexpected_ids.len(),
        unconfirmed_arrived,
        processed_and_dead: processed.intersection(&dead_ids).count(),
        lost_ids,
        unexpected_ids,
        duplicate_sample: dups,
    }
}

/// Each job's kind, by id.
pub type Kinds = HashMap<String, String>;

/// The kinds of `jobs`, by id.
pub fn kinds_of(jobs: &[NewJob]) -> Kinds {
    jobs.iter()
        .filter_map(|job| Some((job.id.clone()?, job.kind.clone())))
        .collect()
}

/// What became of the `flaky` and `fail` jobs of a scenario that mixes them in.
#[derive(Debug, Default)]
pub struct KindOutcomes {
    /// Confirmed `flaky` jobs, those recorded as processed, and the lines beyond one each.
    pub flaky: usize,
    pub flaky_processed: usize,
    pub flaky_duplicates: usize,
    /// Confirmed `fail` jobs, those in a dead-letter queue as `permanent`, and the dead
    /// letters beyond one each.
    pub fail: usize,
    pub fail_dead: usize,
    pub fail_duplicates: usize,
    /// Every job that did not end as its kind must (at most 10 listed, then a count).
    pub problems: Vec<String>,
}

impl KindOutcomes {
    fn problem(&mut self, problem: String) {
        match self.problems.len() {
            0..10 => self.problems.push(problem),
            10 => self.problems.push("(more)".into()),
            _ => {}
        }
    }

    /// One line for the report.
    pub fn summary(&self) -> String {
        format!(
            "flaky: {}/{} processed ({} recorded more than once); fail: {}/{} dead-lettered as permanent ({} extra copies)",
            self.flaky_processed,
            self.flaky,
            self.flaky_duplicates,
            self.fail_dead,
            self.fail,
            self.fail_duplicates
        )
    }
}

/// Judges each job by its kind: a `flaky` job (a retryable failure first, then done) must be
/// processed at least once and never dead-lettered; a `fail` job (a permanent failure) must be
/// in a dead-letter queue with class `permanent`, matched by its message id, and never
/// processed; a job of any other kind must never be dead-lettered. "Must arrive" applies to
/// confirmed jobs; "never" to every job.
pub fn judge_kinds(
    kinds: &Kinds,
    ledger: &Ledger,
    tally: &Tally,
    dead: &[DeadMessage],
) -> KindOutcomes {
    let mut dead_by_id: HashMap<&str, Vec<&DeadMessage>> = HashMap::new();
    for d in dead {
        dead_by_id.entry(d.key.as_str()).or_default().push(d);
    }
    let mut out = KindOutcomes::default();
    let mut ids: Vec<&String> = kinds.keys().collect();
    ids.sort();
    for id in ids {
        let kind = kinds[id].as_str();
        let confirmed = ledger.confirmed.contains(id);
        let runs = tally.of_id(id);
        let dead_here = dead_by_id.get(id.as_str()).map_or(&[][..], Vec::as_slice);
        match kind {
            "fail" => {
                if confirmed {
                    out.fail += 1;
                }
                let permanent = dead_here.iter().filter(|d| d.class == "permanent").count();
                if permanent > 0 {
                    out.fail_dead += 1;
                    out.fail_duplicates += permanent - 1;
                } else if confirmed {
                    out.problem(format!("fail job {id} is not in a dead-letter queue"));
                }
                if permanent != dead_here.len() {
                    out.problem(format!(
                        "fail job {id} dead-lettered as {:?}",
                        dead_here.iter().map(|d| &d.class).collect::<Vec<_>>()
                    ));
                }
                if runs > 0 {
                    out.problem(format!("fail job {id} was recorded as processed"));
                }
            }
            other => {
                if other == "flaky" {
                    if confirmed {
                        out.flaky += 1;
                    }
                    if runs > 0 {
                        out.flaky_processed += 1;
                        out.flaky_duplicates += runs - 1;
                    } else if confirmed {
                        out.problem(format!("flaky job {id} was never processed"));
                    }
                }
                if !dead_here.is_empty() {
                    out.problem(format!(
                        "{other} job {id} dead-lettered as {:?}: {:?}",
                        dead_here.iter().map(|d| &d.class).collect::<Vec<_>>(),
                        dead_here.first().map(|d| &d.error)
                    ));
                }
            }
        }
    }
    out
}
