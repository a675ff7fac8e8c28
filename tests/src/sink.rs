//! The independent sink: files that `fault-worker` processes append to, so that tests and the
//! fault suite count what workers did without Warren's own counters and without reading logs.
//!
//! A sink is two files, shared by every worker process given it:
//!
//! - **handled** (`$WARREN_SINK`): one line per job a handler finished successfully,
//!   `<id> <pid> <handler start ms> <recorded ms>`, written after the handler's work and before
//!   it returns `Ok`, so an ack lost in a crash shows up as a duplicate line, never a missing
//!   one;
//! - **settled** (`$WARREN_SETTLED`): one line per delivery settled, from the worker's
//!   [`on_settled`](warren_workers::Worker::on_settled) hook,
//!   `<id> <pid> <outcome> <sent 1|0> <ms>` with outcome `done`, `retry-scheduled`,
//!   `dead-lettered` or `requeued` (`-` for a message without id). It counts runs exactly: a
//!   job retried twice then dead-lettered has three lines.
//!
//! Each line is written with one `write` on a file opened for appending, so lines of
//! concurrent processes never interleave. Times are ms since the epoch.
//!
//! [`SinkWriter`] is the writing side (in `fault-worker`), [`Sink`] the reading side.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The environment variable naming the handled file.
pub const HANDLED_ENV: &str = "WARREN_SINK";
/// The environment variable naming the settled file.
pub const SETTLED_ENV: &str = "WARREN_SETTLED";

/// Milliseconds since the epoch (the sink's clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// An id as written in a sink line: whitespace and control characters (which a hostile
/// producer may put in a `message_id`) become `?`, and an empty id `-`, so a line always has
/// its fields.
pub fn id_field(id: &str) -> String {
    if id.is_empty() {
        return "-".into();
    }
    id.chars()
        .map(|c| {
            if c.is_whitespace() || c.is_control() {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The writing side, in a worker process.
#[derive(Debug)]
pub struct SinkWriter {
    handled: File,
    settled: Option<File>,
}

impl SinkWriter {
    /// Opens the files named by [`HANDLED_ENV`] (required) and [`SETTLED_ENV`] (optional) for
    /// appending.
    pub fn from_env() -> Result<SinkWriter, String> {
        let handled = std::env::var_os(HANDLED_ENV)
            .ok_or_else(|| format!("set {HANDLED_ENV} to a file path"))?;
        let settled = std::env::var_os(SETTLED_ENV);
        let open = |path: &std::ffi::OsStr| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|err| format!("{}: {err}", Path::new(path).display()))
        };
        Ok(SinkWriter {
            handled: open(&handled)?,
            settled: settled.as_deref().map(open).transpose()?,
        })
    }

    /// True when settlements are recorded too.
    pub fn records_settlements(&self) -> bool {
        self.settled.is_some()
    }

    /// Records that the handler of job `id`, started at `started_ms`, finished its work.
    pub fn handled(&self, id: &str, started_ms: u64) -> std::io::Result<()> {
        let line = format!(
            "{} {} {started_ms} {}\n",
            id_field(id),
            std::process::id(),
            now_ms()
        );
        (&self.handled).write_all(line.as_bytes())
    }

    /// Records one settlement (see [`warren_workers::Settled`]). Errors are ignored: this runs
    /// on the settling task, and a sink that cannot be written shows up as missing lines.
    pub fn settled(&self, id: Option<&str>, outcome: &str, sent: bool) {
        let Some(mut file) = self.settled.as_ref() else {
            return;
        };
        let line = format!(
            "{} {} {} {} {}\n",
            id.map_or_else(|| "-".to_owned(), id_field),
            std::process::id(),
            outcome.replace(' ', "-"),
            u8::from(sent),
            now_ms()
        );
        let _ = file.write_all(line.as_bytes());
    }
}

/// One handled job.
#[derive(Debug, Clone)]
pub struct Line {
    pub id: String,
    pub pid: u32,
    /// When the handler started, ms since the epoch.
    pub started_ms: u64,
    /// When the line was written (after the handler's work), ms since the epoch.
    pub recorded_ms: u64,
}

/// One settled delivery.
#[derive(Debug, Clone)]
pub struct Settlement {
    /// `-` for a message without id.
    pub id: String,
    pub pid: u32,
    /// `done`, `retry-scheduled`, `dead-lettered` or `requeued`.
    pub outcome: String,
    /// False when the ack could not be sent (the channel was gone).
    pub sent: bool,
    pub at_ms: u64,
}

/// A sink's two files, shared by all the worker processes of one test or scenario.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Handled jobs ([`HANDLED_ENV`]).
    pub path: PathBuf,
    /// Settlements ([`SETTLED_ENV`]).
    pub settled_path: PathBuf,
}

impl Sink {
    /// A sink named `name` in `dir`: `<name>.txt` and `<name>.settled.txt`. The files are
    /// created by the first worker that writes.
    pub fn new(dir: impl AsRef<Path>, name: &str) -> Sink {
        let dir = dir.as_ref();
        Sink {
            path: dir.join(format!("{name}.txt")),
            settled_path: dir.join(format!("{name}.settled.txt")),
        }
    }

    /// The environment a worker process needs to write this sink.
    pub fn env(&self) -> [(&'static str, PathBuf); 2] {
        [
            (HANDLED_ENV, self.path.clone()),
            (SETTLED_ENV, self.settled_path.clone()),
        ]
    }

    /// Every handled line so far (a missing file is no line).
    pub fn lines(&self) -> Vec<Line> {
        whole_lines(&self.path)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let id = f.next()?.to_owned();
                let pid = f.next()?.parse().ok()?;
                let started_ms = f.next()?.parse().ok()?;
                let recorded_ms = f.next()?.parse().ok()?;
                Some(Line {
                    id,
                    pid,
                    started_ms,
                    recorded_ms,
                })
            })
            .collect()
    }

    /// Every settlement so far.
    pub fn settlements(&self) -> Vec<Settlement> {
        whole_lines(&self.settled_path)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some(Settlement {
                    id: f.next()?.to_owned(),
                    pid: f.next()?.parse().ok()?,
                    outcome: f.next()?.to_owned(),
                    sent: f.next()? == "1",
                    at_ms: f.next()?.parse().ok()?,
                })
            })
            .collect()
    }

    /// Ids whose ack for a `done` job was sent, in order, each as often as it happened.
    pub fn done_ids(&self) -> Vec<String> {
        self.settlements()
            .into_iter()
            .filter(|s| s.outcome == "done" && s.sent)
            .map(|s| s.id)
            .collect()
    }
}

/// The complete lines of a file; a torn last line (being written) is left out.
fn whole_lines(path: &Path) -> impl Iterator<Item = String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
}

/// What a sink says: unique ids and how often each was recorded.
#[derive(Debug, Default)]
pub struct Tally {
    pub lines: usize,
    pub counts: HashMap<String, usize>,
}

impl Tally {
    pub fn of(lines: &[Line]) -> Tally {
        let mut counts = HashMap::new();
        for line in lines {
            *counts.entry(line.id.clone()).or_insert(0) += 1;
        }
        Tally {
            lines: lines.len(),
            counts,
        }
    }

    pub fn unique(&self) -> usize {
        self.counts.len()
    }

    /// Lines beyond the first of each id.
    pub fn duplicates(&self) -> usize {
        self.lines - self.unique()
    }

    pub fn ids(&self) -> HashSet<String> {
        self.counts.keys().cloned().collect()
    }

    /// How often `id` was recorded.
    pub fn of_id(&self, id: &str) -> usize {
        self.counts.get(id).copied().unwrap_or(0)
    }
}

/// The time from `fault_ms` to the first job recorded whose handler started at or after
/// `not_before_ms` (and, if given, ran in process `pid`): when processing provably resumed.
pub fn recovery_ms(
    lines: &[Line],
    fault_ms: u64,
    not_before_ms: u64,
    pid: Option<u32>,
) -> Option<u64> {
    lines
        .iter()
        .filter(|l| l.started_ms >= not_before_ms && pid.is_none_or(|p| p == l.pid))
        .map(|l| l.recorded_ms)
        .min()
        .map(|first| first.saturating_sub(fault_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_fields_apart() {
        assert_eq!(id_field("a b\nc\u{7}d"), "a?b?c?d");
        assert_eq!(id_field("plain-id"), "plain-id");
        assert_eq!(id_field(""), "-");
    }
}
