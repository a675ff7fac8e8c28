//! Real worker processes against a real broker: a killed worker's job goes to another worker,
//! SIGTERM drains the running job before exiting, and two workers share a batch so that every
//! job is done exactly once.
//!
//! The processes are `fault-worker`: the `warren-worker` command line ([`warren_workers::cli`])
//! with recording handlers. What each did is read from its sink (a line per settled delivery,
//! from its `on_settled` hook), never from its log.
//!
//! Jobs are submitted with the library dispatcher, which declares the test queue before any
//! worker process starts, so a submit never races the worker's own declare.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::Channel;
use serde_json::json;
use warren_core::envelope::NewJob;
use warren_tests::*;

const DEADLINE: Duration = Duration::from_secs(30);
const WORKER: &str = env!("CARGO_BIN_EXE_fault-worker");

/// Given a worker process with concurrency 1 running a 3 s `sleep` job, when the process is
/// killed with SIGKILL mid-job and a second worker starts on the same queue, then the broker
/// redelivers the job to the second worker, which settles it done, and the killed worker never
/// did.
#[tokio::test]
async fn sigkilled_worker_job_is_redelivered_to_another_worker() {
    let queue = unique_queue("kill");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let channel = connect().await.create_channel().await.expect("channel");
    let mut first = TestWorker::spawn(WORKER, &[&queue], 1);
    first.wait_started(DEADLINE).await;

    let id = dispatcher
        .submit(NewJob::new(&queue, "sleep", &json!({"ms": 3000})))
        .await
        .expect("submitted")
        .0;
    wait_until_delivered(&channel, &queue, DEADLINE).await;
    assert!(
        first.done_ids().is_empty(),
        "the job is still running when the worker is killed:\n{}",
        first.process.log_tail()
    );
    let killed_at = Instant::now();
    first.signal("KILL");
    let status = first.wait_exit(DEADLINE).await;
    assert!(!status.success(), "a SIGKILLed worker does not exit 0");

    let mut second = TestWorker::spawn(WORKER, &[&queue], 1);
    second.wait_started(DEADLINE).await;
    second.wait_done(&id, DEADLINE).await;
    println!(
        "redelivered job done by the second worker {:?} after the kill",
        killed_at.elapsed()
    );
    assert_eq!(
        second.done_ids(),
        std::slice::from_ref(&id),
        "done once, by the second"
    );
    assert!(
        first.done_ids().is_empty() && first.sink.lines().is_empty(),
        "the killed worker never finished the job"
    );
    assert_eq!(ready_count(&channel, &queue).await, 0);

    first.remove();
    second.remove();
    cleanup(&channel, &[&queue]).await;
}

/// Given a worker process with concurrency 1 running a 2 s `sleep` job, when it receives
/// SIGTERM mid-job, then it lets the job finish, settles it done (its ack sent), and exits 0
/// within 20 s; the queue holds no ready message afterwards.
#[tokio::test]
async fn sigterm_lets_the_running_job_finish_then_exits_0() {
    let queue = unique_queue("term");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let channel = connect().await.create_channel().await.expect("channel");
    let mut worker = TestWorker::spawn(WORKER, &[&queue], 1);
    worker.wait_started(DEADLINE).await;

    let id = dispatcher
        .submit(NewJob::new(&queue, "sleep", &json!({"ms": 2000})))
        .await
        .expect("submitted")
        .0;
    wait_until_delivered(&channel, &queue, DEADLINE).await;
    assert!(
        worker.done_ids().is_empty(),
        "the job is still running when SIGTERM arrives:\n{}",
        worker.process.log_tail()
    );
    let signalled = Instant::now();
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(20)).await;
    let took = signalled.elapsed();
    println!("worker exited {took:?} after SIGTERM with {status}");

    assert!(
        status.success(),
        "exit status {status}, log:\n{}",
        worker.process.log_tail()
    );
    assert_eq!(
        worker.done_ids(),
        [id],
        "the in-flight job finished and was acked before the exit"
    );
    assert_eq!(
        ready_count(&channel, &queue).await,
        0,
        "the job was acked, not handed back to the queue"
    );

    worker.remove();
    cleanup(&channel, &[&queue]).await;
}

/// Given two worker processes (concurrency 16 each) on the same queue, when 1,000 `echo`
/// jobs are submitted as one batch, then every submitted id is settled done exactly once
/// across both workers, both workers did some of the work, and both exit 0 on SIGTERM.
#[tokio::test]
async fn two_workers_share_1000_jobs_exactly_once() {
    const JOBS: usize = 1000;
    let queue = unique_queue("share");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let channel = connect().await.create_channel().await.expect("channel");
    let mut workers = [
        TestWorker::spawn(WORKER, &[&queue], 16),
        TestWorker::spawn(WORKER, &[&queue], 16),
    ];
    for worker in &mut workers {
        worker.wait_started(DEADLINE).await;
    }

    let started = Instant::now();
    let jobs = (0..JOBS).map(|i| NewJob::new(&queue, "echo", &json!({"i": i})));
    let results: Vec<_> = dispatcher.submit_all(jobs).collect().await;
    let submitted: Vec<String> = results
        .into_iter()
        .enumerate()
        .map(|(i, result)| match result {
            Ok(id) => id.0,
            Err(err) => panic!("job {i} was not submitted: {err}"),
        })
        .collect();
    println!("submitted {JOBS} jobs in {:?}", started.elapsed());
    let submitted_set: HashSet<&String> = submitted.iter().collect();
    assert_eq!(submitted_set.len(), JOBS, "every job got its own id");

    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let done: HashSet<String> = workers.iter().flat_map(|w| w.done_ids()).collect();
        if done.len() >= JOBS {
            break;
        }
        assert!(
            Instant::now() < until,
            "only {} of {JOBS} jobs were done within 60 s",
            done.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "all {JOBS} jobs done {:?} after submitting",
        started.elapsed()
    );

    let per_worker: Vec<Vec<String>> = workers.iter().map(|w| w.done_ids()).collect();
    for (n, done) in per_worker.iter().enumerate() {
        println!("worker {} did {} jobs", n + 1, done.len());
    }
    let all: Vec<&String> = per_worker.iter().flatten().collect();
    let mut seen = HashSet::new();
    let twice: Vec<&&String> = all.iter().filter(|id| !seen.insert(**id)).collect();
    assert!(twice.is_empty(), "ids done more than once: {twice:?}");
    assert_eq!(seen, submitted_set, "the done ids are the submitted ids");
    assert!(
        per_worker.iter().all(|done| !done.is_empty()),
        "both workers did some jobs: {:?}",
        per_worker.iter().map(Vec::len).collect::<Vec<_>>()
    );

    for worker in &workers {
        worker.signal("TERM");
    }
    for worker in &mut workers {
        let status = worker.wait_exit(DEADLINE).await;
        assert!(
            status.success(),
            "exit status {status}, log:\n{}",
            worker.process.log_tail()
        );
    }
    assert_eq!(ready_count(&channel, &queue).await, 0);

    for worker in workers {
        worker.remove();
    }
    cleanup(&channel, &[&queue]).await;
}

/// Waits until `queue` has no ready message, i.e. the submitted job was delivered to a
/// consumer (submits are confirmed, so the job was in the queue before); panics after
/// `deadline`.
async fn wait_until_delivered(channel: &Channel, queue: &str, deadline: Duration) {
    let until = Instant::now() + deadline;
    loop {
        let ready = ready_count(channel, queue).await;
        if ready == 0 {
            return;
        }
        assert!(
            Instant::now() < until,
            "{ready} job(s) still ready in `{queue}` after {deadline:?}: no worker took them"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
