//! Bad input from a plain AMQP client goes to the dead-letter queue with the reason; the
//! worker keeps running and keeps processing good jobs.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use warren_core::envelope::{self, NewJob};
use warren_core::topology;
use warren_tests::*;
use warren_workers::Registry;

/// Given a running worker, when raw messages arrive that are not jobs (not JSON, no id, wrong
/// content type, a spoofed attempt header, invalid UTF-8, not JSON and of a kind no handler
/// serves), then each lands in `<queue>.dead` marked malformed
/// with its reason, and a good job submitted after them is still processed.
#[tokio::test]
async fn malformed_messages_are_dead_lettered_and_the_worker_survives() {
    let queue = unique_queue("malformed");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);

    let connection = connect().await;
    let raw = connection.create_channel().await.expect("channel");
    raw.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let job = |id: &str| {
        BasicProperties::default()
            .with_message_id(id.into())
            .with_type("echo".into())
    };
    let mut spoofed = FieldTable::default();
    spoofed.insert(
        envelope::ATTEMPT.into(),
        AMQPValue::LongString("many".into()),
    );
    let bad: Vec<(BasicProperties, &[u8], &str)> = vec![
        (job("not-json"), b"this is not json", "JSON"),
        (
            BasicProperties::default().with_type("echo".into()),
            b"{}",
            "message_id",
        ),
        (
            job("text").with_content_type("text/plain".into()),
            b"{}",
            "text/plain",
        ),
        (
            job("spoofed").with_headers(spoofed),
            b"{}",
            "x-warren-attempt",
        ),
        (job("bad-utf8"), b"{\"name\": \"\xff\"}", "UTF-8"),
        (
            BasicProperties::default()
                .with_message_id("unknown-kind-not-json".into())
                .with_type("mystery".into()),
            b"{oops",
            "JSON",
        ),
    ];
    // Each case is told apart in the dead-letter queue by its correlation_id (a property copies
    // keep), not by its position: the worker handles them concurrently.
    let bad: Vec<(BasicProperties, &[u8], &str)> = bad
        .into_iter()
        .enumerate()
        .map(|(n, (p, body, reason))| {
            (
                p.with_correlation_id(format!("case-{n}").into()),
                body,
                reason,
            )
        })
        .collect();
    for (properties, body, _) in &bad {
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        raw.basic_publish(
            topology::JOBS_EXCHANGE.into(),
            queue.as_str().into(),
            options,
            body,
            properties.clone(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }

    let reader = connection.create_channel().await.expect("channel");
    let dead = take_messages(
        &reader,
        &topology::dead_queue(&queue),
        bad.len(),
        Duration::from_secs(30),
    )
    .await;
    let case_of = |message: &lapin::message::Delivery| {
        let case = message.properties.correlation_id().clone();
        bad.iter()
            .find(|(p, _, _)| *p.correlation_id() == case)
            .unwrap_or_else(|| panic!("a dead letter of no case: {case:?}"))
    };
    let mut cases: Vec<_> = dead
        .iter()
        .map(|m| case_of(m).0.correlation_id().clone())
        .collect();
    cases.sort();
    cases.dedup();
    assert_eq!(cases.len(), bad.len(), "one dead letter per case");
    for message in &dead {
        let (_, body, reason) = case_of(message);
        assert_eq!(
            header(message, envelope::ERROR_CLASS).as_deref(),
            Some("malformed")
        );
        let error = header(message, envelope::ERROR).unwrap_or_default();
        assert!(
            error.contains(reason),
            "{error:?} should mention {reason:?}"
        );
        assert_eq!(&message.data, body, "the original body is kept");
    }

    assert!(worker.is_running(), "the worker survives bad input");
    dispatcher
        .submit(NewJob::new(&queue, "echo", &json!({})))
        .await
        .expect("submitted");
    recorder.wait_for(1, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(ready_count(&reader, &queue).await, 0);
    cleanup(&reader, &[&queue]).await;
}
