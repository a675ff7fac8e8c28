//! The fault-injection suite: nine scenarios against the suite's own RabbitMQ nodes (never the
//! shared `warren@localhost`), with real `fault-worker` processes (the `warren-worker` command
//! line with recording handlers) and the dispatcher library, counted with an independent sink.
//! See `docs/FAULTS.md`.
//!
//! It takes about ten minutes and starts its own nodes, so it is ignored by a plain
//! `cargo test`; run it with `scripts/faults`, or:
//!
//! ```text
//! cargo test -p warren-tests --test faults -- --ignored --test-threads=1 --nocapture
//! ```
//!
//! `WARREN_FAULTS=1,2` runs only those scenarios. `WARREN_FAULTS_KEEP_NODES=1` leaves the
//! nodes running afterwards (scripts/faults stops them anyway).

use std::path::Path;

use warren_tests::fault::{node, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the fault-injection suite takes ~10 minutes: run scripts/faults"]
async fn fault_injection_suite() {
    let selection: Vec<u8> = match std::env::var("WARREN_FAULTS") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .expect("WARREN_FAULTS is a list like 1,2,5")
            })
            .collect(),
        _ => scenarios::ALL.iter().map(|(n, _)| *n).collect(),
    };
    let bin = Path::new(env!("CARGO_BIN_EXE_fault-worker"));
    let reports = scenarios::run_suite(bin, &selection).await;

    if std::env::var_os("WARREN_FAULTS_KEEP_NODES").is_none() {
        let _ = node::Node::single().stop().await;
        let _ = node::stop_cluster().await;
    }
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| {
            r.failures
                .iter()
                .map(move |f| format!("scenario {} {}: {f}", r.number, r.name))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "fault scenarios failed:\n{}",
        failed.join("\n")
    );
}
