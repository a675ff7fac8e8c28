//! Bare lapin, the ceiling: what the broker and the client library allow with no job queue
//! around them — no envelope, no handler registry, no retry bookkeeping.
//!
//! - publish: one confirm-mode channel, 1,000 publishes awaiting their confirm at once;
//! - drain: one consumer, prefetch = the bench's concurrency, on a filled queue; each delivery's
//!   JSON body is parsed (the no-op "handler"), then either every ack is awaited in turn, or
//!   one ack with `multiple = true` settles 64 deliveries at once;
//! - end to end: the publisher and the awaiting consumer at once.

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::json;
use warren_core::config::QueueType;

use crate::procs::{config_for, settle_and_delete};
use crate::{Bench, Record, payload, unique_queue};

/// How the consumer acks.
#[derive(Clone, Copy)]
enum Acks {
    /// Each ack awaited before the next delivery is taken.
    Awaited,
    /// One `multiple` ack per this many deliveries.
    Multiple(usize),
}

pub async fn run(bench: &mut Bench, queue_type: QueueType) -> anyhow::Result<()> {
    let config = config_for(bench, queue_type);
    let publishing =
        warren_core::connection::connect(&config.broker, "bench lapin publish").await?;
    let consuming = warren_core::connection::connect(&config.broker, "bench lapin consume").await?;
    let publisher = publishing.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let jobs = bench.jobs;

    // Publish ceiling, filling a queue that the awaited-acks drain then empties.
    let queue = declare(&publisher, "lapin", queue_type).await?;
    let seconds = publish(&publisher, &queue, jobs).await?;
    bench.emit(
        Record::new("lapin", "enqueue", queue_type, "1,000 confirms in flight")
            .took(jobs, seconds)
            .with("ceiling", json!("primary")),
    )?;
    let channel = consuming.create_channel().await?;
    let seconds = drain(channel, &queue, jobs, bench.concurrency, Acks::Awaited).await?;
    bench.emit(
        Record::new(
            "lapin",
            "drain",
            queue_type,
            format!("prefetch {}, await each ack", bench.concurrency),
        )
        .took(jobs, seconds)
        .with("ceiling", json!("secondary"))
        .note("seconds = first delivery to last ack sent"),
    )?;
    settle_and_delete(&publisher, std::slice::from_ref(&queue)).await?;

    let queue = declare(&publisher, "lapin", queue_type).await?;
    publish(&publisher, &queue, jobs).await?;
    let channel = consuming.create_channel().await?;
    let seconds = drain(channel, &queue, jobs, bench.concurrency, Acks::Multiple(64)).await?;
    bench.emit(
        Record::new(
            "lapin",
            "drain",
            queue_type,
            format!("prefetch {}, one multiple ack per 64", bench.concurrency),
        )
        .took(jobs, seconds)
        .with("ceiling", json!("primary"))
        .note("seconds = first delivery to last ack sent"),
    )?;
    settle_and_delete(&publisher, std::slice::from_ref(&queue)).await?;

    // End to end: consumer already waiting, then publish.
    let queue = declare(&publisher, "lapin", queue_type).await?;
    let consumer = {
        let (channel, queue, prefetch) = (
            consuming.create_channel().await?,
            queue.clone(),
            bench.concurrency,
        );
        tokio::spawn(async move { drain(channel, &queue, jobs, prefetch, Acks::Awaited).await })
    };
    crate::procs::wait_consumers(&publisher, &queue, 1).await?;
    let started = Instant::now();
    publish(&publisher, &queue, jobs).await?;
    tokio::time::timeout(Duration::from_secs(600), consumer)
        .await
        .context("end-to-end drain timed out")???;
    bench.emit(
        Record::new(
            "lapin",
            "e2e",
            queue_type,
            format!("prefetch {}, await each ack", bench.concurrency),
        )
        .took(jobs, started.elapsed().as_secs_f64())
        .with("ceiling", json!("primary"))
        .note("seconds = first publish to last ack sent"),
    )?;
    settle_and_delete(&publisher, std::slice::from_ref(&queue)).await?;

    close(&publishing).await;
    close(&consuming).await;
    Ok(())
}

async fn declare(channel: &Channel, what: &str, queue_type: QueueType) -> anyhow::Result<String> {
    let queue = unique_queue(what);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(crate::queue_type_name(queue_type).into()),
    );
    let options = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.as_str().into(), options, args)
        .await?;
    Ok(queue)
}

/// Publishes `jobs` persistent messages with 1,000 confirms in flight; returns the seconds.
async fn publish(channel: &Channel, queue: &str, jobs: usize) -> anyhow::Result<f64> {
    let bodies: Vec<Vec<u8>> = (0..jobs)
        .map(|i| payload(i).to_string().into_bytes())
        .collect();
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for body in &bodies {
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        in_flight.push(
            channel
                .basic_publish("".into(), queue.into(), options, body, properties)
                .await?,
        );
        if in_flight.len() >= 1000 {
            let confirm = in_flight.next().await.transpose()?;
            ensure!(confirm.is_some_and(|c| c.is_ack()), "publish nacked");
        }
    }
    while let Some(confirm) = in_flight.next().await {
        ensure!(confirm?.is_ack(), "publish nacked");
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Consumes `jobs` deliveries and acks them; returns the seconds from the first delivery to
/// the last ack sent. The channel is closed afterwards (so an ack never sent would show).
async fn drain(
    channel: Channel,
    queue: &str,
    jobs: usize,
    prefetch: u16,
    acks: Acks,
) -> anyhow::Result<f64> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            format!("bench-{}", uuid::Uuid::now_v7().simple())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut first = None;
    for handled in 1..=jobs {
        let delivery = consumer
            .next()
            .await
            .context("the consumer ended early")??;
        first.get_or_insert_with(Instant::now);
        let _payload: serde_json::Value = serde_json::from_slice(&delivery.data)?;
        match acks {
            Acks::Awaited => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Acks::Multiple(every) if handled % every == 0 || handled == jobs => {
                delivery
                    .acker
                    .ack(BasicAckOptions { multiple: true })
                    .await?;
            }
            Acks::Multiple(_) => {}
        }
    }
    let seconds = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    channel.close(200, "drained".into()).await?;
    Ok(seconds)
}

async fn close(connection: &Connection) {
    let _ = connection.close(200, "bench done".into()).await;
}
