//! Quorum-queue priorities (RabbitMQ 4.x): a job published with a high `priority` property
//! (5 and above) overtakes the normal jobs waiting in a Warren work queue, with no queue
//! argument to declare; its retries keep the property. RabbitMQ 3.10's quorum queues ignore
//! priorities, so there the test is skipped.

use std::time::Duration;

use lapin::options::ConfirmSelectOptions;
use serde_json::json;
use warren_core::NewJob;
use warren_core::publish;
use warren_core::topology::JOBS_EXCHANGE;
use warren_tests::*;
use warren_workers::{JobError, Registry};

fn broker_major_version() -> u32 {
    broker_ctl(&["version"])
        .trim()
        .split('.')
        .next()
        .and_then(|major| major.parse().ok())
        .unwrap_or(0)
}

/// Given 30 normal jobs waiting in a quorum work queue and then one job with priority 9 that
/// fails its first attempt, when a worker taking one job at a time starts, then the priority
/// job is among the first three run (RabbitMQ 4.x serves high and normal priorities 2:1), and
/// its retry, queued behind what is left, again overtakes the normal jobs.
#[tokio::test]
async fn a_high_priority_job_overtakes_normal_ones_and_its_retry_too() {
    if broker_major_version() < 4 {
        eprintln!("skipped: quorum queues have no priorities before RabbitMQ 4.0");
        return;
    }
    let queue = unique_queue("priority");
    let mut config = config(&[&queue]);
    config.worker.concurrency = 1;
    config.worker.prefetch = Some(1);
    if let Some(q) = config.queues.get_mut(&queue) {
        q.retry.initial_delay = Duration::from_secs(1);
    }
    let dispatcher = dispatcher(&config).await;
    let channel = connect().await.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let publish = |job: NewJob, priority: Option<u8>| {
        let channel = channel.clone();
        async move {
            let message = job.encode(1 << 20).expect("encodes");
            let properties = match priority {
                Some(p) => message.properties.with_priority(p),
                None => message.properties,
            };
            publish::send(
                &channel,
                JOBS_EXCHANGE,
                message.routing_key,
                &message.body,
                properties,
            )
            .await
            .expect("sent")
            .confirmed(Duration::from_secs(10))
            .await
            .expect("confirmed");
        }
    };
    for n in 0..30 {
        publish(NewJob::new(&queue, "echo", &json!({ "n": n })), None).await;
    }
    publish(NewJob::new(&queue, "urgent", &json!({})), Some(9)).await;

    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| {
        // Slow enough that the retry is back (1 s) while normal jobs still wait.
        std::thread::sleep(Duration::from_millis(100));
        Ok(None)
    });
    recorder.handle(&mut registry, "urgent", |call| match call.attempt {
        1 => Err(JobError::retry("first attempt fails")),
        _ => Ok(None),
    });
    let worker = start_worker(&config, registry, &[&queue]);
    let calls = recorder.wait_for(32, Duration::from_secs(60)).await;
    worker.stop().await;

    let urgent: Vec<usize> = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.payload == json!({}))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(urgent.len(), 2, "two attempts of the urgent job");
    assert!(urgent[0] < 3, "first attempt ran at position {}", urgent[0]);
    // The retry arrives ~1 s later (about 10 echo jobs in): it must not wait behind the
    // remaining normal jobs.
    assert!(
        urgent[1] < 25,
        "the retry ran at position {} of 32: its priority was lost",
        urgent[1]
    );
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
}
