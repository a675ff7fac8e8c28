//! Reading dead letters never destroys them: `<queue>.dead` and `warren.unroutable` keep every
//! job through 100 reads by `warren peek` and 100 more by a reader that hands them back by
//! closing its channel (the `warren peek` of before, a crashed client, the management UI's
//! reject), on RabbitMQ 3.10 and 4.x. Each read hands the jobs back, which counts as a
//! delivery (closing: on both versions; `warren peek`'s nack: on 3.10 only), and a quorum
//! queue drops a message past its delivery limit: 20 on 4.x unless declared, and `-1` drops
//! on the first return on 3.10. And queues left by an older Warren are refused with a
//! message that says how to replace them, and `warren topology migrate` replaces them keeping
//! every message.
//!
//! Two tests use a vhost of their own (`scripts/broker ctl`): against another node, set the
//! `WARREN_BROKER_*` variables as well as `WARREN_AMQP_URL` (see `scripts/broker`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection};
use serde_json::json;
use warren_core::config::BrokerConfig;
use warren_core::topology::{self, TopologyError};
use warren_dispatcher::dlq::peek;
use warren_tests::*;
use warren_workers::{JobError, Registry};

const READS: usize = 100;
const JOBS: usize = 4;

/// Given four jobs that failed permanently and wait in `<queue>.dead`, when the dead-letter
/// queue is read 100 times by `warren peek` and 100 times by a reader that closes its channel
/// without settling, then all four are still there.
#[tokio::test]
async fn dead_letters_survive_100_reads() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "doomed", |_| {
        Err(JobError::permanent("fails on purpose"))
    });
    let mut stage = Stage::new("dead-reads", registry).await;
    let mut ids = BTreeSet::new();
    for n in 0..JOBS {
        ids.insert(stage.submit("doomed", json!({ "n": n })).await.0);
    }
    let dead = topology::dead_queue(&stage.queue);
    wait_ready(&stage.channel, &dead, JOBS as u32).await;
    stage.stop_worker().await;
    let connection = connect().await;

    reads_keep_every_job(&connection, &stage.dispatcher, &dead, &ids).await;

    stage.end().await;
}

/// Given three delayed jobs whose work queue does not exist, waiting in `warren.unroutable`
/// (of a vhost of their own, so that the count is theirs), when that queue is read 100 times by
/// `warren peek` and 100 times by a reader that closes its channel, then all three are there.
#[tokio::test]
async fn unroutable_jobs_survive_100_reads() {
    let vhost = tokio::task::spawn_blocking(|| TempVhost::new("unroutable-reads"))
        .await
        .expect("vhost");
    let gone = unique_queue("never-declared");
    let mut config = config(&[]);
    config.broker.url = vhost.url();
    let dispatcher = dispatcher(&config).await;
    let connection = connect_to(&config.broker).await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let mut ids = BTreeSet::new();
    for n in 0..3 {
        let id = format!("unroutable-{n}-{gone}");
        let (exchange, key) = topology::delay_route(1, &gone);
        let confirm = channel
            .basic_publish(
                exchange.as_str().into(),
                key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"{}",
                BasicProperties::default().with_message_id(id.as_str().into()),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack() && confirm.take_message().is_none());
        ids.insert(id);
    }
    wait_ready(&channel, topology::UNROUTABLE, 3).await;

    reads_keep_every_job(&connection, &dispatcher, topology::UNROUTABLE, &ids).await;

    dispatcher.close().await;
    let _ = connection.close(200, "done".into()).await;
    drop(vhost);
}

/// Given a vhost where an older Warren declared `warren.unroutable` and a `<queue>.dead`
/// without `x-delivery-limit`, and the work queue with `delivery_limit` 10 where the config now
/// says 4, all holding messages, and a `warren.migrate.<queue>.dead` left by an interrupted
/// migration: when this Warren declares its topology there, each queue is refused with an error
/// naming it, the argument and `warren topology migrate`; the migration refuses while a
/// consumer is on a queue, and then replaces all three with Warren's arguments, every message
/// kept with its headers, the interrupted one's included, and no `warren.migrate.*` left.
#[tokio::test]
async fn queues_of_an_older_warren_are_migrated_with_their_messages() {
    let vhost = tokio::task::spawn_blocking(|| TempVhost::new("older-warren"))
        .await
        .expect("vhost");
    let queue = unique_queue("upgrade");
    let dead = topology::dead_queue(&queue);
    let mut config = config(&[&queue]);
    config.broker.url = vhost.url();
    if let Some(settings) = config.queues.get_mut(&queue) {
        settings.delivery_limit = 4;
    }
    let connection = connect_to(&config.broker).await;
    let setup = connection.create_channel().await.expect("channel");
    setup
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    // What an older Warren declared: quorum, no limit on the read-only queues; the work queue
    // with the limit of the old config.
    let quorum_only = || {
        let mut old = FieldTable::default();
        old.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
        old
    };
    let mut old_settings = config.queue(&queue);
    old_settings.delivery_limit = 10;
    let parked = topology::migration_queue(&dead);
    for (name, args) in [
        (topology::UNROUTABLE.to_owned(), quorum_only()),
        (dead.clone(), quorum_only()),
        (
            queue.clone(),
            topology::work_queue_arguments(&queue, &old_settings),
        ),
        (parked.clone(), topology::migration_queue_arguments()),
    ] {
        setup
            .queue_declare(name.as_str().into(), durable(), args)
            .await
            .expect("declaring the old queue");
    }
    let mut expected: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (name, n) in [
        (topology::UNROUTABLE.to_owned(), 2),
        (dead.clone(), 3),
        (queue.clone(), 2),
        (parked.clone(), 1),
    ] {
        let mut ids = BTreeSet::new();
        for i in 0..n {
            let id = format!("{name}-{i}");
            let mut headers = FieldTable::default();
            headers.insert(
                "x-warren-error".into(),
                AMQPValue::LongString(LongString::from(format!("error of {id}"))),
            );
            let properties = BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_type("echo".into())
                .with_headers(headers);
            let confirm = setup
                .basic_publish(
                    "".into(),
                    name.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    b"{}",
                    properties,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack() && confirm.take_message().is_none());
            ids.insert(id);
        }
        expected.push((name, ids));
    }
    let settings = config.queue(&queue);

    // Refused, with the way out.
    let channel = connection.create_channel().await.expect("channel");
    let err = topology::declare(&channel, &[(&queue, &settings)])
        .await
        .expect_err("an old queue is refused");
    let TopologyError::Mismatch { name, detail, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(name, topology::UNROUTABLE);
    assert!(detail.contains("'x-delivery-limit'"), "{detail}");
    let text = err.to_string();
    for part in ["older Warren", "warren topology migrate"] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }

    // Not while someone consumes one of them.
    let dispatcher = dispatcher_in(&config).await;
    let consumer = connection.create_channel().await.expect("channel");
    consumer
        .basic_consume(
            topology::UNROUTABLE.into(),
            "old-worker".into(),
            lapin::options::BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let queues = vec![queue.clone()];
    let err = dispatcher
        .migrate_topology(&queues, |_| {})
        .await
        .expect_err("a consumed queue is not migrated");
    assert!(
        matches!(&err, warren_dispatcher::MigrateError::Consumers { queue, consumers: 1 } if queue == topology::UNROUTABLE),
        "{err}"
    );
    consumer.close(200, "stopped".into()).await.expect("close");
    // The queue forgets a closed channel's consumer a moment later (under load, visibly).
    let until = Instant::now() + Duration::from_secs(10);
    while consumer_count(&connection, topology::UNROUTABLE).await > 0 {
        assert!(
            Instant::now() < until,
            "the closed consumer is still counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut told = Vec::new();
    let (_, migrated) = dispatcher
        .migrate_topology(&queues, |m| told.push(m.queue.clone()))
        .await
        .expect("migrated");
    let counts: Vec<(String, u64)> = migrated
        .iter()
        .map(|m| (m.queue.clone(), m.messages))
        .collect();
    assert_eq!(
        counts,
        [
            (topology::UNROUTABLE.to_owned(), 2),
            (dead.clone(), 4),
            (queue.clone(), 2)
        ]
    );
    assert_eq!(told.len(), 3);

    // Now Warren's arguments, every message kept with its headers, nothing parked.
    let channel = connection.create_channel().await.expect("channel");
    topology::declare(&channel, &[(&queue, &settings)])
        .await
        .expect("declared after the migration");
    let mut homes: Vec<(String, BTreeSet<String>)> = Vec::new();
    for (name, ids) in expected {
        let home = if name == parked { dead.clone() } else { name };
        match homes.iter_mut().find(|(h, _)| *h == home) {
            Some((_, all)) => all.extend(ids),
            None => homes.push((home, ids)),
        }
    }
    for (home, ids) in &homes {
        let found = read(&connection, home, ids.len()).await;
        assert_eq!(&found, ids, "{home}");
    }
    wait_ready(&setup, &dead, 4).await;
    let message = setup
        .basic_get(dead.as_str().into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("a dead letter");
    let error = header(&message.delivery, "x-warren-error").unwrap_or_default();
    assert!(error.starts_with("error of "), "{error}");
    for name in [&parked, &topology::migration_queue(topology::UNROUTABLE)] {
        let check = connection.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        assert!(
            check
                .queue_declare(name.as_str().into(), passive, FieldTable::default())
                .await
                .is_err(),
            "{name} is left over"
        );
    }
    dispatcher.close().await;
    let _ = connection.close(200, "done".into()).await;
    drop(vhost);
}

/// Consumers of `queue`, by a passive declare.
async fn consumer_count(connection: &Connection, queue: &str) -> u32 {
    let channel = connection.create_channel().await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let state = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .expect("passive declare");
    let _ = channel.close(200, "counted".into()).await;
    state.consumer_count()
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// A dispatcher on `config` that declares nothing.
async fn dispatcher_in(config: &warren_core::config::Config) -> warren_dispatcher::Dispatcher {
    warren_dispatcher::Dispatcher::connect(config)
        .await
        .expect("dispatcher")
}

/// Reads `queue` [`READS`] times with `warren peek` and [`READS`] times by fetching everything
/// unacked and closing the channel, checking after each read by closing that `ids` are all
/// still there (and nothing else).
async fn reads_keep_every_job(
    connection: &Connection,
    dispatcher: &warren_dispatcher::Dispatcher,
    queue: &str,
    ids: &BTreeSet<String>,
) {
    assert_eq!(
        &read(connection, queue, ids.len()).await,
        ids,
        "before reading"
    );
    for _ in 0..READS {
        peek(dispatcher, queue, usize::MAX)
            .await
            .expect("warren peek");
    }
    assert_eq!(
        &read(connection, queue, ids.len()).await,
        ids,
        "after {READS} reads by `warren peek`"
    );
    for n in 1..=READS {
        assert_eq!(
            &read(connection, queue, ids.len()).await,
            ids,
            "read {n} of {READS} by fetching and closing the channel"
        );
    }
    println!(
        "`{queue}` holds all {} jobs; x-delivery-count of its first: {:?}",
        ids.len(),
        delivery_count(connection, queue).await
    );
}

/// The `x-delivery-count` header of the first message of `queue` (read and handed back).
async fn delivery_count(connection: &Connection, queue: &str) -> Option<AMQPValue> {
    let channel = connection.create_channel().await.expect("channel");
    let message = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .expect("basic.get")?;
    let headers = message.delivery.properties.headers().clone()?;
    let _ = channel.close(200, "read done".into()).await;
    headers.inner().get("x-delivery-count").cloned()
}

/// The message ids of everything in `queue`, fetched unacked on a channel of their own and
/// handed back by closing it: one read, a delivery of each message. A closed channel's
/// messages return to the queue a moment after the close, so a read that finds fewer than
/// `want` is repeated for up to 5 s before its answer counts.
async fn read(connection: &Connection, queue: &str, want: usize) -> BTreeSet<String> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let channel = connection.create_channel().await.expect("channel");
        let mut ids = BTreeSet::new();
        while let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            let id = message.delivery.properties.message_id().clone();
            ids.insert(id.map(|s| s.to_string()).unwrap_or_default());
        }
        channel.close(200, "read done".into()).await.expect("close");
        if ids.len() >= want || Instant::now() > until {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `queue` has `n` ready messages; panics after 30 s.
async fn wait_ready(channel: &lapin::Channel, queue: &str, n: u32) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = ready_count(channel, queue).await;
        if ready >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "`{queue}` has {ready} ready messages after 30 s, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A connection to `broker` (the test broker, maybe another vhost).
async fn connect_to(broker: &BrokerConfig) -> Connection {
    warren_core::connection::connect(broker, "warren-tests dead-letters")
        .await
        .expect("connecting to the test broker")
}
