//! `bench-worker`: the `warren-worker` command line ([`warren_workers::cli`]) with one job kind,
//! `noop`, that only counts itself — the benchmark's worker process, as `celery -A
//! celery_tasks worker` is Celery's.
//!
//! Counting is the same as the Python peers' (bench/peers/peer_common.py): every handler call
//! appends one 27-byte record `"%08d %017.6f\n"` (the payload's `user_id`, the wall clock when
//! the handler ran) to `$WARREN_BENCH_COUNT_FILE`, opened with O_APPEND, so that the records of
//! several processes interleave whole.

use std::fs::File;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use warren_workers::JobError;

fn main() -> ExitCode {
    let Some(path) = std::env::var_os("WARREN_BENCH_COUNT_FILE") else {
        eprintln!("bench-worker: set WARREN_BENCH_COUNT_FILE to the count file's path");
        return ExitCode::FAILURE;
    };
    let file = match File::options().create(true).append(true).open(&path) {
        Ok(file) => Arc::new(file),
        Err(err) => {
            eprintln!("bench-worker: cannot open {}: {err}", path.display());
            return ExitCode::FAILURE;
        }
    };
    warren_workers::cli::main(move |registry| {
        registry.register("noop", move |job: Welcome, _ctx| {
            let file = file.clone();
            async move {
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                let record = format!("{:08} {now:017.6}\n", job.user_id);
                (&*file)
                    .write_all(record.as_bytes())
                    .map_err(|err| JobError::retry(format!("count file: {err}")))?;
                Ok(None)
            }
        });
    })
}

/// The benchmark's payload (`payload` in bench/src/main.rs), read whole as a typed handler would
/// (the Python peers' tasks get it as a dict).
#[derive(serde::Deserialize)]
#[allow(dead_code)] // parsed, not all of it read: the job is a no-op
struct Welcome {
    user_id: u64,
    action: String,
    email: String,
    template: String,
    locale: String,
    attempt_hint: u32,
    pad: String,
}
