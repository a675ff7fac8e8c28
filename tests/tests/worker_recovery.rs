//! A worker process outlives the loss of its broker connections: it reconnects, re-declares
//! and goes on consuming, without being restarted.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;
use warren_core::envelope::NewJob;
use warren_tests::*;

/// Given a worker that processed a job, when the broker closes both of its connections, then
/// the worker reconnects by itself and processes the next job.
#[tokio::test]
async fn worker_reconnects_after_its_connections_are_closed() {
    let queue = unique_queue("reconnect");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let worker = spawn_worker_process(&[&queue], 4, &HashMap::new());
    worker
        .wait_for_log("worker started", Duration::from_secs(30))
        .await;
    let first = dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({})))
        .await
        .expect("submitted");
    worker
        .wait_for_log(&format!("job done job={first}"), Duration::from_secs(30))
        .await;

    let pid = worker.child.id();
    let closed = tokio::task::spawn_blocking(move || close_connections(&format!(":{pid} ")))
        .await
        .expect("closing");
    assert_eq!(closed, 2, "the consuming and the publishing connection");
    worker
        .wait_for_log("reconnecting", Duration::from_secs(30))
        .await;

    let second = dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({})))
        .await
        .expect("submitted");
    worker
        .wait_for_log(&format!("job done job={second}"), Duration::from_secs(60))
        .await;
    let log = worker.log_text();
    assert_eq!(
        log.matches("worker started").count(),
        2,
        "a second session started:\n{log}"
    );
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}
