//! `warren-bench`: Warren and bare lapin measured on the same broker, in one run, written as
//! JSON lines (one object per measurement) that `bench/report.py` turns into the table and the
//! chart. `bench/run` is the one command that also starts the broker and runs the Python peers.
//!
//! ```text
//! cargo build --release -p warren-bench -p warren-workers -p warren-dispatcher
//! target/release/warren-bench --jobs 10000 --runs 3 --out bench/results/raw.jsonl
//! ```
//!
//! The work is the same everywhere: N persistent ~150-byte JSON jobs ([`payload`]), published
//! with publisher confirms, handled by a no-op handler, acked after it ran. Every run of every
//! measure uses fresh, uniquely named queues and deletes them afterwards. Per run, for quorum
//! and classic queues:
//!
//! - **bare lapin** ([`ceiling`]): confirmed publish (1,000 in flight); drain with prefetch 256
//!   awaiting each ack, and with one `multiple` ack per 64 deliveries; end to end with awaited
//!   acks;
//! - **Warren** ([`warren`]): `Dispatcher::submit_all` and `warren submit --file`; drain by one
//!   `bench-worker` process (the `warren-worker` command line with a counting no-op handler) at
//!   default logging (`info`, a line per job) and at `warn`; end to end;
//!
//! and on quorum queues only: drain by 2 and 4 processes and by one process consuming 8 queues
//! (scaling), end to end at concurrency 1 and 16 (memory), latency at a steady rate and the
//! retry-delay error ([`timing`]).
//!
//! Counting is honest: a drain is complete when the handler has counted every job (each id
//! exactly once), and after the workers stopped gracefully their queues hold 0 messages (an ack
//! never sent would have put its job back).

mod ceiling;
mod procs;
mod timing;
mod warren;

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use serde_json::{Map, Value, json};
use warren_core::Config;
use warren_core::config::QueueType;

#[derive(Parser)]
#[command(about = "Measure Warren and bare lapin on the same broker; JSON lines out")]
struct Args {
    /// Jobs per throughput measurement.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Runs of everything; the report takes the median with min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// JSON lines file to append the records to.
    #[arg(long)]
    out: PathBuf,
    /// Parts to run (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<Part>,
    /// Worker concurrency (= prefetch) of the throughput runs; bare lapin uses the same prefetch.
    #[arg(long, default_value_t = 256)]
    concurrency: u16,
    /// Rate of the latency run, jobs per second.
    #[arg(long, default_value_t = 200)]
    latency_rate: u32,
    /// Length of the latency run, seconds.
    #[arg(long, default_value_t = 30)]
    latency_seconds: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Bare lapin: publish, drain (awaited / multiple acks), end to end.
    Ceiling,
    /// Warren: submit (library and CLI), drain by one process, end to end.
    Warren,
    /// Warren drain by 2 and 4 processes, and one process on 8 queues.
    Scaling,
    /// Warren end to end at concurrency 1 and 16 (idle and draining RSS).
    Memory,
    /// Submit → handler start and → ack at a steady rate.
    Latency,
    /// Retry delays of 1 s and 10 s, asked vs actual.
    Retry,
}

/// Everything a measurement needs.
pub struct Bench {
    pub config: Config,
    pub jobs: usize,
    pub concurrency: u16,
    pub work_dir: PathBuf,
    out: File,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let out = File::options()
        .create(true)
        .append(true)
        .open(&args.out)
        .with_context(|| format!("opening {}", args.out.display()))?;
    let work_dir = std::env::temp_dir().join(format!("warren-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work_dir)?;
    let mut bench = Bench {
        config: Config::load(None)?,
        jobs: args.jobs,
        concurrency: args.concurrency,
        work_dir,
        out,
    };
    let wants = |part| args.only.is_empty() || args.only.contains(&part);
    for run in 1..=args.runs {
        eprintln!("== run {run} of {}", args.runs);
        for queue_type in [QueueType::Quorum, QueueType::Classic] {
            if wants(Part::Ceiling) {
                ceiling::run(&mut bench, queue_type).await?;
            }
            if wants(Part::Warren) {
                warren::throughput(&mut bench, queue_type).await?;
            }
        }
        if wants(Part::Scaling) {
            warren::scaling(&mut bench).await?;
        }
        if wants(Part::Memory) {
            warren::memory(&mut bench).await?;
        }
        if wants(Part::Latency) {
            timing::latency(&mut bench, args.latency_rate, args.latency_seconds).await?;
        }
        if wants(Part::Retry) {
            timing::retry_delays(&mut bench).await?;
        }
    }
    let _ = std::fs::remove_dir_all(&bench.work_dir);
    Ok(())
}

impl Bench {
    /// Writes one record (and a line on stderr), in the peers' format.
    pub fn emit(&mut self, record: Record) -> anyhow::Result<()> {
        let rate = record
            .seconds
            .filter(|s| *s > 0.0)
            .map(|s| record.jobs as f64 / s);
        eprintln!(
            "  {:8} {:9} {:8} {:44} {}",
            record.system,
            record.measure,
            queue_type_name(record.queue_type),
            record.pool,
            match (rate, record.extra.get("peak_rss_bytes")) {
                (Some(rate), _) => format!("{rate:>9.0} jobs/s"),
                (None, Some(rss)) => format!("{rss} bytes RSS"),
                (None, None) => String::new(),
            }
        );
        let mut object = Map::new();
        object.insert("system".into(), json!(record.system));
        object.insert(
            "version".into(),
            json!(match record.system {
                "lapin" => "lapin 4.12",
                _ => concat!("warren ", env!("CARGO_PKG_VERSION")),
            }),
        );
        object.insert("measure".into(), json!(record.measure));
        object.insert("jobs".into(), json!(record.jobs));
        object.insert("seconds".into(), json!(record.seconds));
        object.insert("jobs_per_s".into(), json!(rate.map(|r| r.round())));
        object.insert(
            "queue_type".into(),
            json!(queue_type_name(record.queue_type)),
        );
        object.insert("pool".into(), json!(record.pool));
        object.insert("peak_rss_bytes".into(), Value::Null);
        object.insert("notes".into(), json!(record.notes));
        object.insert(
            "finished_at".into(),
            json!(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        );
        object.extend(record.extra);
        writeln!(self.out, "{}", Value::Object(object))?;
        Ok(())
    }
}

/// One measurement, before it is written.
pub struct Record {
    pub system: &'static str,
    pub measure: &'static str,
    pub queue_type: QueueType,
    /// The variant: pool, processes, concurrency, log level.
    pub pool: String,
    pub jobs: usize,
    pub seconds: Option<f64>,
    pub notes: String,
    /// More keys (`peak_rss_bytes`, `ceiling`, latency figures, ...).
    pub extra: Map<String, Value>,
}

impl Record {
    pub fn new(
        system: &'static str,
        measure: &'static str,
        queue_type: QueueType,
        pool: impl Into<String>,
    ) -> Record {
        Record {
            system,
            measure,
            queue_type,
            pool: pool.into(),
            jobs: 0,
            seconds: None,
            notes: String::new(),
            extra: Map::new(),
        }
    }

    pub fn took(mut self, jobs: usize, seconds: f64) -> Record {
        self.jobs = jobs;
        self.seconds = Some(seconds);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Record {
        self.notes = note.into();
        self
    }

    pub fn with(mut self, key: &str, value: Value) -> Record {
        self.extra.insert(key.to_owned(), value);
        self
    }
}

pub fn queue_type_name(queue_type: QueueType) -> &'static str {
    match queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    }
}

/// The job payload, identical to the Python side's (bench/peers/job_payload.py): ~150 bytes.
pub fn payload(i: usize) -> Value {
    json!({
        "user_id": i, "action": "send-welcome-email", "email": "someone@example.com",
        "template": "welcome-v2", "locale": "en-GB", "attempt_hint": 0, "pad": "xxxxxxxxxxxxxxxx"
    })
}

/// A fresh queue name for one measurement.
pub fn unique_queue(what: &str) -> String {
    format!("bench-{what}-{}", uuid::Uuid::now_v7().simple())
}
