//! A dispatcher outlives the loss of its connection: the submit in flight fails clearly (or
//! succeeded), and the next submit reconnects by itself.
//!
//! This file is its own test binary (its own process), so closing "this process's dispatcher
//! connections" touches no other test.

use std::time::Duration;

use serde_json::json;
use warren_core::envelope::NewJob;
use warren_tests::*;

/// Given a connected dispatcher, when the broker closes its connection, then submitting again
/// reconnects by itself and is confirmed.
#[tokio::test]
async fn dispatcher_reconnects_after_its_connection_is_closed() {
    let queue = unique_queue("disp-reconnect");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({"n": 1})))
        .await
        .expect("first submit");

    let name = format!("warren-dispatcher pid={}", std::process::id());
    let before = dispatcher_connections(&name).await;
    assert_eq!(before.len(), 1, "one dispatcher connection: {before:?}");
    let closing = name.clone();
    let closed = tokio::task::spawn_blocking(move || close_connections(&closing))
        .await
        .expect("closing");
    assert!(
        closed >= 1,
        "the dispatcher's connection was found and closed"
    );

    // Right after the loss a submit either is confirmed or fails with a retryable error
    // (never a silent success); submitting again reconnects and is confirmed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut failures = 0;
    loop {
        match dispatcher
            .submit(NewJob::new(&queue, "echo", &json!({"n": 2})))
            .await
        {
            Ok(_) => break,
            Err(err) => {
                assert!(err.is_retryable(), "unexpected error kind: {err}");
                failures += 1;
                assert!(
                    std::time::Instant::now() < deadline,
                    "never reconnected: {err}"
                );
            }
        }
    }
    println!("submits failed while reconnecting: {failures}");
    // The closed connection may be listed for a moment longer.
    let listed_until = std::time::Instant::now() + Duration::from_secs(10);
    let mut after = dispatcher_connections(&name).await;
    while after.len() != 1 && std::time::Instant::now() < listed_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = dispatcher_connections(&name).await;
    }
    assert_eq!(after.len(), 1, "one dispatcher connection again: {after:?}");
    assert!(
        !before.contains(&after[0]),
        "the confirmed submit went through a new connection ({after:?}, closed: {before:?})"
    );
    let channel = connect().await.create_channel().await.expect("channel");
    // A failed submit may still have reached the broker (at-least-once), never the reverse.
    let queued = ready_count(&channel, &queue).await;
    assert!(
        (2..=2 + failures).contains(&queued),
        "{queued} queued after {failures} failures"
    );
    cleanup(&channel, &[&queue]).await;
}

/// The broker's pids of the connections whose name contains `name`.
async fn dispatcher_connections(name: &str) -> Vec<String> {
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let listing = broker_ctl(&["-q", "list_connections", "pid", "client_properties"]);
        connections_named(&listing, &name)
            .into_iter()
            .map(str::to_owned)
            .collect()
    })
    .await
    .expect("listing connections")
}
