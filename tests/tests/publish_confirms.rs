//! Publisher confirms with many publishes in flight on one channel: each confirm reports its
//! own publish. A `mandatory` publish no queue is bound for is [`PublishError::Unroutable`],
//! and a routable one is `Ok`, however the broker's returns and (multiple) acks interleave.
//!
//! lapin 4.12.3 paired each confirm with whichever returned message was at the head of its
//! queue, and completes a multiple ack's tags in hash order, so unroutable publishes were
//! reported as safely queued and routable ones as returned. Warren uses a patched lapin
//! (`patches/lapin`, see `patches/PATCHED.md`) that pairs a confirm with the return of its
//! own publish.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation};
use warren_core::publish::{self, PublishError};
use warren_tests::*;

const PUBLISHES: usize = 4_000;
const ROUNDS: usize = 5;
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// A confirm channel and a fresh queue bound (by the default exchange) to its own name.
/// The queue is exclusive to the channel's connection, so a failed test leaves nothing behind.
async fn confirm_channel_and_queue(what: &str) -> (Channel, String) {
    let channel = connect().await.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let queue = unique_queue(what);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    (channel, queue)
}

/// Even messages are routable, odd ones are not.
fn routable(n: usize) -> bool {
    n.is_multiple_of(2)
}

/// Message `n` of a round goes to `queue` when it is [`routable`], else to `nowhere`.
fn routing_key<'a>(n: usize, queue: &'a str, nowhere: &'a str) -> &'a str {
    if routable(n) { queue } else { nowhere }
}

fn properties(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

/// Given one confirm channel, when 4,000 `mandatory` publishes alternate between a bound queue
/// and a key no queue is bound to, all sent before any confirm is awaited (Warren's publish
/// path: `publish::send`, then `Pending::confirmed`), then every routable publish is confirmed
/// `Ok` and every unroutable one is `Unroutable`, in each of 5 rounds.
#[tokio::test]
async fn pipelined_mandatory_publishes_each_get_their_own_verdict() {
    let (channel, queue) = confirm_channel_and_queue("confirms").await;
    let nowhere = unique_queue("nowhere");

    for round in 0..ROUNDS {
        let mut pending = Vec::with_capacity(PUBLISHES);
        for n in 0..PUBLISHES {
            let key = routing_key(n, &queue, &nowhere);
            let id = format!("r{round}-m{n}");
            let sent = publish::send(&channel, "", key.into(), b"{}", properties(&id))
                .await
                .expect("basic.publish");
            pending.push(sent);
        }

        let mut lost = Vec::new(); // unroutable, but reported as queued
        let mut misreported = Vec::new(); // routable, but reported as returned
        for (n, sent) in pending.into_iter().enumerate() {
            let verdict = sent.confirmed(CONFIRM_TIMEOUT).await;
            match (routable(n), verdict) {
                (true, Ok(())) => {}
                (false, Err(PublishError::Unroutable { routing_key, .. })) => {
                    assert_eq!(routing_key, nowhere);
                }
                (true, Err(PublishError::Unroutable { .. })) => misreported.push(n),
                (false, Ok(())) => lost.push(n),
                (_, Err(other)) => panic!("round {round}, message {n}: {other}"),
            }
        }
        assert!(
            lost.is_empty() && misreported.is_empty(),
            "round {round}: {} unroutable publishes reported Ok (first: {:?}), {} routable ones \
             reported Unroutable (first: {:?})",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>(),
            misreported.len(),
            misreported.iter().take(5).collect::<Vec<_>>(),
        );
    }

    assert_eq!(
        ready_count(&channel, &queue).await as usize,
        ROUNDS * PUBLISHES / 2,
        "every routable publish is in the queue"
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given one confirm channel and 4,000 pipelined `mandatory` publishes as above (on lapin
/// directly), then each unroutable publish's confirm carries the returned message with that
/// publish's own `message_id`, and no routable publish's confirm carries one.
#[tokio::test]
async fn a_returned_message_comes_back_with_its_own_confirm() {
    let (channel, queue) = confirm_channel_and_queue("returns").await;
    let nowhere = unique_queue("nowhere");
    let options = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };

    let mut confirms = Vec::with_capacity(PUBLISHES);
    for n in 0..PUBLISHES {
        let key = routing_key(n, &queue, &nowhere);
        let confirm = channel
            .basic_publish(
                "".into(),
                key.into(),
                options,
                b"{}",
                properties(&format!("m{n}")),
            )
            .await
            .expect("basic.publish");
        confirms.push(confirm);
    }

    let mut wrong = Vec::new();
    for (n, confirm) in confirms.into_iter().enumerate() {
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .expect("confirmed in time")
            .expect("confirm");
        let returned_id = match confirmation {
            Confirmation::Ack(returned) => returned.map(|message| {
                message
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
            }),
            other => panic!("message {n}: {other:?}"),
        };
        let expected = (!routable(n)).then(|| Some(format!("m{n}")));
        if returned_id != expected {
            wrong.push((n, returned_id));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} confirms carried the wrong returned message, first: {:?}",
        wrong.len(),
        wrong.iter().take(5).collect::<Vec<_>>()
    );
    cleanup(&channel, &[&queue]).await;
}
