//! A worker process outlives the loss of its broker connections: it reconnects, re-declares
//! and goes on consuming, without being restarted.

use std::time::Duration;

use serde_json::json;
use warren_core::envelope::NewJob;
use warren_tests::*;

const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

/// Given a worker that processed a job, when the broker closes both of its connections, then
/// the same process reconnects by itself (two new connections) and processes the next job.
#[tokio::test]
async fn worker_reconnects_after_its_connections_are_closed() {
    let queue = unique_queue("reconnect");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let mut worker = TestWorker::spawn(WORKER, &[&queue], 4);
    worker.wait_started(Duration::from_secs(30)).await;
    let first = dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({})))
        .await
        .expect("submitted");
    worker.wait_done(&first.0, Duration::from_secs(30)).await;

    let named = format!(":{} ", worker.process.pid);
    let before = {
        let named = named.clone();
        tokio::task::spawn_blocking(move || connection_pids(&named))
            .await
            .expect("listing")
    };
    let closed = {
        let named = named.clone();
        tokio::task::spawn_blocking(move || close_connections(&named))
            .await
            .expect("closing")
    };
    assert_eq!(closed, 2, "the consuming and the publishing connection");

    let second = dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({})))
        .await
        .expect("submitted");
    worker.wait_done(&second.0, Duration::from_secs(60)).await;
    let after = tokio::task::spawn_blocking(move || connection_pids(&named))
        .await
        .expect("listing");
    assert_eq!(after.len(), 2, "a new session, with its two connections");
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "new connections: before {before:?}, after {after:?}"
    );
    assert!(worker.process.exited().is_none(), "the same process");
    assert!(
        worker
            .sink
            .lines()
            .iter()
            .all(|line| line.pid == worker.process.pid),
        "every job ran in the one process"
    );
    worker.remove();
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}
