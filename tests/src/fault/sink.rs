//! The independent sink: the file `fault-worker` processes append one line to per handled job
//! (`<id> <pid> <started ms> <recorded ms>`). The suite counts with it, never with Warren's
//! own counters.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

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

/// A sink file, shared by all the worker processes of one scenario.
#[derive(Debug, Clone)]
pub struct Sink {
    pub path: PathBuf,
}

impl Sink {
    pub fn new(path: impl AsRef<Path>) -> Sink {
        Sink {
            path: path.as_ref().to_path_buf(),
        }
    }

    /// Every line so far (a missing file is no line). A torn last line (being written) is
    /// left out.
    pub fn lines(&self) -> Vec<Line> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
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
