//! `warren-bench`: end-to-end throughput of Warren and of bare lapin on the same broker.
//!
//! Both runs do the same work: N persistent ~150-byte JSON messages published with publisher
//! confirms (1,000 in flight) into a fresh quorum queue while one consumer drains it, acking
//! each message after its (no-op) handler ran. The clock runs from the first publish until
//! the consumer has handled the last message.
//!
//! ```text
//! cargo run --release -p warren-bench -- --jobs 10000
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_core::envelope::NewJob;
use warren_dispatcher::Dispatcher;
use warren_workers::{Registry, Worker};

#[derive(Parser)]
struct Args {
    /// Jobs per run.
    #[arg(long, default_value_t = 10_000)]
    jobs: usize,
    /// Runs per system; the median is reported with min and max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Worker concurrency (= prefetch) for Warren; bare lapin uses the same prefetch.
    #[arg(long, default_value_t = 256)]
    concurrency: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = Config::load(None)?;
    config.worker.concurrency = args.concurrency;
    let mut lapin_rates = Vec::new();
    let mut warren_rates = Vec::new();
    for run in 1..=args.runs {
        let lapin = bare_lapin(&config, args.jobs, args.concurrency).await?;
        println!("run {run}: bare lapin end to end: {lapin:>8.0} jobs/s");
        let warren = warren(&config, args.jobs).await?;
        println!("run {run}: warren end to end:     {warren:>8.0} jobs/s");
        lapin_rates.push(lapin);
        warren_rates.push(warren);
    }
    let (l, w) = (summary(&mut lapin_rates), summary(&mut warren_rates));
    println!(
        "\n{} jobs, quorum queue, prefetch {}, median (min-max) of {} runs:",
        args.jobs, args.concurrency, args.runs
    );
    println!(
        "  bare lapin (awaited acks): {:>6.0} jobs/s ({:.0}-{:.0})",
        l.1, l.0, l.2
    );
    println!(
        "  warren (one worker):       {:>6.0} jobs/s ({:.0}-{:.0})  = {:.2}x bare lapin",
        w.1,
        w.0,
        w.2,
        w.1 / l.1
    );
    Ok(())
}

fn summary(rates: &mut [f64]) -> (f64, f64, f64) {
    rates.sort_by(f64::total_cmp);
    (rates[0], rates[rates.len() / 2], rates[rates.len() - 1])
}

fn payload(i: usize) -> serde_json::Value {
    serde_json::json!({
        "user_id": i, "action": "send-welcome-email", "email": "someone@example.com",
        "template": "welcome-v2", "locale": "en-GB", "attempt_hint": 0, "pad": "xxxxxxxxxxxxxxxx"
    })
}

/// Warren: dispatcher `submit_all` while one in-process worker drains with a no-op handler.
async fn warren(config: &Config, jobs: usize) -> anyhow::Result<f64> {
    let queue = format!("bench-warren-{}", uuid::Uuid::now_v7().simple());
    let dispatcher = Dispatcher::connect(config).await?;
    dispatcher
        .apply_topology(std::slice::from_ref(&queue))
        .await?;

    let handled = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let mut registry = Registry::new();
    let (count, done) = (handled.clone(), all_done.clone());
    registry.register("noop", move |_payload, _ctx| {
        let (count, done) = (count.clone(), done.clone());
        async move {
            if count.fetch_add(1, Ordering::Relaxed) + 1 == jobs {
                done.notify_one();
            }
            Ok(None)
        }
    });
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(
        Worker::new(config.clone(), registry)
            .queue(queue.clone())
            .run(shutdown.clone()),
    );

    let started = Instant::now();
    let batch: Vec<NewJob> = (0..jobs)
        .map(|i| NewJob::new(&queue, "noop", &payload(i)))
        .collect();
    let confirmed = dispatcher
        .submit_all(batch)
        .filter(|r| std::future::ready(r.is_ok()))
        .count()
        .await;
    anyhow::ensure!(confirmed == jobs, "only {confirmed} of {jobs} confirmed");
    tokio::time::timeout(Duration::from_secs(600), all_done.notified())
        .await
        .context("drain timed out")?;
    let elapsed = started.elapsed();

    shutdown.cancel();
    worker.await??;
    let channel = dispatcher.open_channel().await?;
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    channel
        .queue_delete(
            format!("{queue}.dead").as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await?;
    dispatcher.close().await;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

/// Bare lapin: a confirmed publisher (1,000 in flight) and a consumer that awaits each ack.
async fn bare_lapin(config: &Config, jobs: usize, prefetch: u16) -> anyhow::Result<f64> {
    let queue = format!("bench-lapin-{}", uuid::Uuid::now_v7().simple());
    let publishing =
        warren_core::connection::connect(&config.broker, "bench lapin publish").await?;
    let consuming = warren_core::connection::connect(&config.broker, "bench lapin consume").await?;
    let publisher = publishing.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    publisher
        .queue_declare(queue.as_str().into(), durable, args)
        .await?;

    let consumer_channel = consuming.create_channel().await?;
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = consumer_channel
        .basic_consume(
            queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let drain = tokio::spawn(async move {
        let mut handled = 0;
        while handled < jobs {
            let Some(delivery) = consumer.next().await else {
                break;
            };
            let delivery = delivery?;
            let _payload: serde_json::Value = serde_json::from_slice(&delivery.data)?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            handled += 1;
        }
        anyhow::Ok(handled)
    });

    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    for i in 0..jobs {
        let body = payload(i).to_string().into_bytes();
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let options = BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        };
        in_flight.push(
            publisher
                .basic_publish("".into(), queue.as_str().into(), options, &body, properties)
                .await?,
        );
        if in_flight.len() >= 1000 {
            anyhow::ensure!(
                in_flight
                    .next()
                    .await
                    .transpose()?
                    .is_some_and(|c| c.is_ack()),
                "nacked"
            );
        }
    }
    while let Some(confirm) = in_flight.next().await {
        anyhow::ensure!(confirm?.is_ack(), "nacked");
    }
    let handled = tokio::time::timeout(Duration::from_secs(600), drain)
        .await
        .context("drain timed out")???;
    let elapsed = started.elapsed();
    anyhow::ensure!(handled == jobs, "consumer stopped after {handled}");
    publisher
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    close(&publishing).await;
    close(&consuming).await;
    Ok(jobs as f64 / elapsed.as_secs_f64())
}

async fn close(connection: &Connection) {
    let _ = connection.close(200, "bench done".into()).await;
}
