//! The dead-letter workbench (`warren dlq …`, `warren_dispatcher::dlq`) against a real broker:
//! listing leaves `<queue>.dead` as it was, however often; `show` gives every header; a replay
//! brings every job back to a worker that then runs it, and a replay killed half-way loses
//! none; a purge deletes exactly what its filters select; an export is what `warren submit
//! --file` reads.
//!
//! Dead letters come from a real in-process worker whose handler fails (kind `job` fails until
//! the test heals it; kind `nobody` has no handler), or, where a test needs dead letters that
//! failed long ago or are not JSON, are published to `warren.dead` as a worker would.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Value, json};
use warren_core::envelope::{self, DeadLetter, DeadReason, NewJob};
use warren_core::topology;
use warren_dispatcher::dlq::{self, Filter, ReplayOptions};
use warren_tests::cli::{Run, Warren};
use warren_tests::*;
use warren_workers::{JobContext, JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(60);

/// A worker whose kind `job` fails permanently until `heal` is called, then records each run.
struct Failing {
    healed: Arc<AtomicBool>,
    recorder: Recorder,
}

impl Failing {
    fn registry() -> (Failing, Registry) {
        let healed = Arc::new(AtomicBool::new(false));
        let recorder = Recorder::new();
        let mut registry = Registry::new();
        let (h, r) = (healed.clone(), recorder.clone());
        registry.register("job", move |payload: Value, ctx: JobContext| {
            let (healed, recorder) = (h.clone(), r.clone());
            async move {
                if !healed.load(Ordering::SeqCst) {
                    return Err(JobError::permanent("job: failing \u{1b}[31mon purpose"));
                }
                recorder.record(payload, &ctx);
                Ok(None)
            }
        });
        (Failing { healed, recorder }, registry)
    }

    fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    /// Ids of the jobs run after healing, each once.
    fn done(&self) -> BTreeSet<String> {
        self.recorder.calls().into_iter().map(|c| c.id).collect()
    }
}

/// Submits `n` jobs of `kind` (payload `{"n": i}`) and returns their ids.
async fn submit_many(stage: &Stage, kind: &str, n: usize) -> BTreeSet<String> {
    let jobs = (0..n).map(|i| NewJob::new(&stage.queue, kind, &json!({ "n": i })));
    let results: Vec<_> = stage.dispatcher.submit_all(jobs).collect().await;
    results
        .into_iter()
        .map(|r| r.expect("submitted").0)
        .collect()
}

/// Waits until `<queue>.dead` holds at least `n` ready messages.
async fn wait_dead(stage: &Stage, n: u32) {
    let dead = topology::dead_queue(&stage.queue);
    let until = Instant::now() + DEADLINE;
    loop {
        let ready = ready_count(&stage.channel, &dead).await;
        if ready >= n {
            return;
        }
        assert!(
            Instant::now() < until,
            "`{dead}` has {ready} ready messages after {DEADLINE:?}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The ids in `<queue>.dead`, each with how many times it is there, as `dlq::list` reads them.
async fn dead_ids(stage: &Stage) -> BTreeMap<String, usize> {
    let mut ids = BTreeMap::new();
    dlq::list(
        &stage.dispatcher,
        &stage.queue,
        &Filter::default(),
        None,
        |record| {
            *ids.entry(record.id.unwrap_or_default()).or_insert(0) += 1;
        },
    )
    .await
    .expect("listing");
    ids
}

fn once_each(ids: &BTreeSet<String>) -> BTreeMap<String, usize> {
    ids.iter().map(|id| (id.clone(), 1)).collect()
}

/// Given five jobs that failed permanently and two of a kind no worker knows, all in
/// `<queue>.dead`, when the dead letters are listed 100 times (and once by `warren dlq list
/// --json`), then every listing shows the same seven ids once each with their class, the
/// filters select what they say, and the queue still holds the seven, each once.
#[tokio::test]
async fn list_leaves_the_queue_as_it_was_after_100_reads() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-list", registry).await;
    let doomed = submit_many(&stage, "job", 5).await;
    let unknown = submit_many(&stage, "nobody", 2).await;
    wait_dead(&stage, 7).await;
    stage.stop_worker().await;
    let all: BTreeSet<String> = doomed.union(&unknown).cloned().collect();

    for read in 0..100 {
        let mut seen = BTreeMap::new();
        let summary = dlq::list(
            &stage.dispatcher,
            &stage.queue,
            &Filter::default(),
            None,
            |record| {
                let class = record.class.clone().unwrap_or_default();
                let id = record.id.clone().unwrap_or_default();
                let want = if doomed.contains(&id) {
                    "permanent"
                } else {
                    "unknown-kind"
                };
                assert_eq!(class, want, "class of {id}");
                assert!(record.reason.is_some() && record.failed_at_time().is_some());
                *seen.entry(id).or_insert(0) += 1;
            },
        )
        .await
        .expect("listing");
        assert_eq!(seen, once_each(&all), "read {read}");
        assert_eq!((summary.listed, summary.total), (7, 7), "read {read}");
    }

    let by_kind = |kind: &str| Filter {
        kind: Some(kind.into()),
        ..Filter::default()
    };
    let mut nobody = BTreeSet::new();
    dlq::list(
        &stage.dispatcher,
        &stage.queue,
        &by_kind("nobody"),
        None,
        |r| {
            nobody.insert(r.id.unwrap_or_default());
        },
    )
    .await
    .expect("listing");
    assert_eq!(nobody, unknown);
    let mut limited = 0;
    let class = Filter {
        class: Some("permanent".into()),
        ..Filter::default()
    };
    dlq::list(&stage.dispatcher, &stage.queue, &class, Some(3), |r| {
        assert!(doomed.contains(&r.id.unwrap_or_default()));
        limited += 1;
    })
    .await
    .expect("listing");
    assert_eq!(limited, 3);

    let run = warren(&["dlq", "list", &stage.queue, "--json"]).await;
    run.assert_success();
    let listed: Vec<Value> = serde_json::from_str(&run.stdout).expect("a JSON array");
    let ids: BTreeSet<String> = listed
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!((ids, listed.len()), (all.clone(), 7));
    let run = warren(&["dlq", "list", &stage.queue, "--class", "unknown-kind"]).await;
    run.assert_success();
    assert_eq!(run.stdout.matches("class=unknown-kind").count(), 2);
    assert!(!run.stdout.contains("class=permanent"));

    assert_eq!(dead_ids(&stage).await, once_each(&all));
    let dead = topology::dead_queue(&stage.queue);
    let kept = take_messages(&stage.channel, &dead, 7, DEADLINE).await;
    assert_eq!(ready_count(&stage.channel, &dead).await, 0);
    for message in &kept {
        assert!(
            header(message, envelope::ERROR_CLASS).is_some(),
            "headers kept"
        );
    }
    stage.end().await;
}

/// Given a dead letter written by a worker, when it is shown by the library and by `warren dlq
/// show --json`, then every header the broker delivers with it is there with its value, and
/// the properties and payload are the job's; the human form escapes the control character in
/// the handler's error.
#[tokio::test]
async fn show_gives_every_header() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-show", registry).await;
    let id = stage.submit("job", json!({"to": "a@example.com"})).await.0;
    wait_dead(&stage, 1).await;
    stage.stop_worker().await;
    let dead = topology::dead_queue(&stage.queue);

    let raw = warren_dispatcher::dlq::peek(&stage.dispatcher, &dead, 1)
        .await
        .expect("peek");
    let raw_headers = raw[0].properties.headers().clone().unwrap_or_default();
    let job = dlq::show(&stage.dispatcher, &stage.queue, &id)
        .await
        .expect("show")
        .expect("found");
    // The broker adds its delivery counts per delivery (and 3.10 counts the peek's return):
    // every other header is the same on every read.
    let per_read = [envelope::ACQUIRED_COUNT, envelope::DELIVERY_COUNT];
    let raw_keys: BTreeSet<&str> = raw_headers
        .inner()
        .keys()
        .map(|k| k.as_str())
        .filter(|k| !per_read.contains(k))
        .collect();
    let shown_keys: BTreeSet<&str> = job
        .headers
        .keys()
        .map(String::as_str)
        .filter(|k| !per_read.contains(k))
        .collect();
    assert_eq!(shown_keys, raw_keys, "every header");
    assert!(shown_keys.len() >= 6, "{shown_keys:?}");
    for key in [
        envelope::ERROR,
        envelope::ERROR_CLASS,
        envelope::FAILED_AT,
        envelope::WORKER,
        envelope::QUEUE,
    ] {
        let value = envelope::header_str(&raw[0].properties, key).expect(key);
        assert_eq!(job.headers[key], Value::String(value.into_owned()), "{key}");
    }
    assert_eq!(job.headers[envelope::ATTEMPTS], json!(1));
    assert_eq!(job.properties["message_id"], json!(id));
    assert_eq!(job.properties["type"], json!("job"));
    assert_eq!(job.payload, Some(json!({"to": "a@example.com"})));
    assert!(
        dlq::show(&stage.dispatcher, &stage.queue, "no-such-id")
            .await
            .expect("show")
            .is_none()
    );

    let run = warren(&["dlq", "show", &stage.queue, &id, "--json"]).await;
    run.assert_success();
    let shown: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(shown["headers"][envelope::ERROR_CLASS], json!("permanent"));
    assert_eq!(shown["id"], json!(id));
    assert_eq!(shown["payload"]["to"], json!("a@example.com"));
    let human = warren(&["dlq", "show", &stage.queue, &id]).await;
    human.assert_success();
    assert!(
        human.stdout.contains(envelope::FAILED_AT),
        "{}",
        human.stdout
    );
    assert!(
        !human.stdout.contains('\u{1b}'),
        "escaped: {}",
        human.stdout
    );
    assert!(human.stdout.contains("\\u{1b}[31mon purpose"));
    let missing = warren(&["dlq", "show", &stage.queue, "no-such-id"]).await;
    assert!(!missing.status.success());
    assert!(missing.stderr.contains("no dead letter with id"));
    assert_eq!(ready_count(&stage.channel, &dead).await, 1, "still there");
    stage.end().await;
}

/// Given three dead letters, one replayed by id with `warren dlq replay` while no worker
/// runs, then the work queue holds one copy with the job's id, kind and payload, a fresh
/// attempt count and the replay headers, and none of the failure headers or the broker's
/// counts; the other two are untouched in `<queue>.dead`.
#[tokio::test]
async fn a_replayed_copy_carries_only_what_warren_chose() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-copy", registry).await;
    let ids = submit_many(&stage, "job", 3).await;
    wait_dead(&stage, 3).await;
    stage.stop_worker().await;
    let chosen = ids.iter().next().cloned().unwrap_or_default();

    let run = warren(&["dlq", "replay", &stage.queue, "--id", &chosen]).await;
    run.assert_success();
    assert!(run.stderr.contains("1 moved, 2 remain"), "{}", run.stderr);

    let copies = take_messages(&stage.channel, &stage.queue, 1, DEADLINE).await;
    let copy = &copies[0];
    let props = &copy.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(chosen.as_str())
    );
    assert_eq!(props.kind().as_ref().map(|s| s.as_str()), Some("job"));
    let payload: Value = serde_json::from_slice(&copy.data).expect("JSON");
    assert!(payload["n"].is_u64());
    assert_eq!(envelope::header_int(props, envelope::REPLAYED), Some(1));
    assert!(header(copy, envelope::REPLAYED_AT).is_some());
    let headers = without_first_delivery_count(props.headers().clone().unwrap_or_default());
    for gone in [
        envelope::ERROR,
        envelope::ERROR_CLASS,
        envelope::ATTEMPTS,
        envelope::FAILED_AT,
        envelope::WORKER,
        envelope::QUEUE,
        envelope::ATTEMPT,
        envelope::ACQUIRED_COUNT,
        envelope::DELIVERY_COUNT,
        "x-death",
    ] {
        assert!(!headers.contains_key(gone), "{gone} carried: {headers:?}");
    }
    let left = dead_ids(&stage).await;
    let rest: BTreeSet<String> = ids.iter().filter(|id| **id != chosen).cloned().collect();
    assert_eq!(left, once_each(&rest));
    stage.end().await;
}

/// Given 500 jobs that failed and wait in `<queue>.dead`, when the handler is fixed and all
/// are replayed (library call), then the replay reports 500 moved and none remaining, and the
/// worker runs each of the 500 jobs, on a fresh first attempt.
#[tokio::test]
async fn replay_of_500_dead_jobs_brings_all_back() {
    let (failing, registry) = Failing::registry();
    let stage = Stage::new("dlq-replay", registry).await;
    let ids = submit_many(&stage, "job", 500).await;
    wait_dead(&stage, 500).await;
    assert_eq!(dead_ids(&stage).await, once_each(&ids));
    failing.heal();

    let mut last = dlq::Progress::default();
    let options = ReplayOptions {
        limit: None,
        ..ReplayOptions::default()
    };
    let summary = dlq::replay(&stage.dispatcher, &stage.queue, &options, |p| last = *p)
        .await
        .expect("replay");
    assert_eq!((summary.moved, summary.remaining), (500, 0));
    assert_eq!((summary.skipped.count, summary.failed.count), (0, 0));
    assert_eq!((last.taken, last.total), (500, 500));

    let calls = failing.recorder.wait_for(500, DEADLINE).await;
    assert_eq!(failing.done(), ids, "every replayed job ran");
    assert!(calls.iter().all(|c| c.attempt == 1), "fresh attempt counts");
    assert_eq!(stage.ready().await, (0, 0));
    stage.end().await;
}

/// Given 500 dead jobs and a fixed handler, when `warren dlq replay --all --rate 50/s` is
/// killed with SIGKILL half-way, then no job is lost: every one of the 500 has run or is
/// still in `<queue>.dead` (a few may be both: at-least-once).
#[tokio::test]
async fn a_replay_killed_half_way_loses_none() {
    let (failing, registry) = Failing::registry();
    let stage = Stage::new("dlq-kill", registry).await;
    let ids = submit_many(&stage, "job", 500).await;
    wait_dead(&stage, 500).await;
    failing.heal();

    let dir = std::env::temp_dir().join(format!("warren-dlq-kill-{}", stage.queue));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = std::fs::File::create(dir.join("replay.log")).expect("log file");
    // Building the binary blocks: not on the runtime, whose connections must keep their
    // heartbeats.
    let warren_bin = tokio::task::spawn_blocking(|| binary("warren"))
        .await
        .expect("building warren");
    let mut replay = Command::new(warren_bin)
        .args(["dlq", "replay", &stage.queue, "--all", "--rate", "50/s"])
        .current_dir(&dir)
        .env(warren_core::config::AMQP_URL_ENV, broker_url())
        .env_remove(warren_core::config::CONFIG_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting warren dlq replay");
    failing.recorder.wait_for(100, DEADLINE).await;
    assert!(
        replay.try_wait().expect("polling").is_none(),
        "the replay ended before it could be killed"
    );
    replay.kill().expect("SIGKILL");
    let _ = replay.wait();
    let run_at_kill = failing.done().len();
    assert!(run_at_kill < 500, "killed half-way: {run_at_kill} had run");

    // What the killed replay held goes back to `<queue>.dead`; what it moved runs.
    let until = Instant::now() + DEADLINE;
    let (done, dead) = loop {
        let dead = dead_ids(&stage).await;
        let done = failing.done();
        let mut seen: BTreeSet<String> = dead.keys().cloned().collect();
        seen.extend(done.iter().cloned());
        if seen == ids && stage.ready().await.0 == 0 {
            break (done, dead);
        }
        if Instant::now() > until {
            let lost: Vec<_> = ids.difference(&seen).collect();
            let mut text = String::new();
            let _ = std::fs::File::open(dir.join("replay.log"))
                .and_then(|mut f| f.read_to_string(&mut text));
            panic!("lost {} job(s): {lost:?}\nreplay log:\n{text}", lost.len());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dead_count: usize = dead.values().sum();
    assert!(done.len() + dead_count >= 500);
    assert!(!dead.is_empty(), "the kill left some dead letters unmoved");
    assert!(
        dead_count < 500,
        "the dead letters whose copies were confirmed were removed as the replay went"
    );
    eprintln!(
        "killed after {run_at_kill} ran; in the end {} ran, {dead_count} still dead, {} both",
        done.len(),
        dead.keys().filter(|id| done.contains(*id)).count()
    );
    let _ = std::fs::remove_dir_all(&dir);
    stage.end().await;
}

/// Given dead letters of two kinds and classes, some failed long ago and some just now, when
/// `warren dlq purge` runs with `--older-than`, `--kind` and `--class`, then each run deletes
/// exactly the dead letters that match all of its filters and says how many; without a
/// terminal and without `--yes` it refuses and deletes nothing.
#[tokio::test]
async fn purge_removes_exactly_the_matching_ones() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-purge", registry).await;
    let recent_job = submit_many(&stage, "job", 3).await;
    let recent_nobody = submit_many(&stage, "nobody", 2).await;
    wait_dead(&stage, 5).await;
    stage.stop_worker().await;
    let publisher = confirm_channel().await;
    let long_ago = "2026-01-01T00:00:00.000Z";
    let mut old_job = BTreeSet::new();
    let mut old_nobody = BTreeSet::new();
    for i in 0..2 {
        let id = format!("old-job-{i}-{}", stage.queue);
        publish_dead(
            &publisher,
            &stage.queue,
            "job",
            &id,
            b"{}",
            DeadReason::Permanent,
            long_ago,
        )
        .await;
        old_job.insert(id);
    }
    let id = format!("old-nobody-{}", stage.queue);
    publish_dead(
        &publisher,
        &stage.queue,
        "nobody",
        &id,
        b"{}",
        DeadReason::UnknownKind,
        long_ago,
    )
    .await;
    old_nobody.insert(id);
    wait_dead(&stage, 8).await;

    let refused = warren(&["dlq", "purge", &stage.queue]).await;
    assert!(!refused.status.success());
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert_eq!(dead_ids(&stage).await.len(), 8, "nothing deleted");

    // Old and of kind `job`: the two published ones only.
    let run = warren(&[
        "dlq",
        "purge",
        &stage.queue,
        "--older-than",
        "1h",
        "--kind",
        "job",
        "--yes",
    ])
    .await;
    run.assert_success();
    assert!(run.stdout.contains("deleted 2 "), "{}", run.stdout);
    let mut left: BTreeSet<String> = recent_job.clone();
    left.extend(recent_nobody.iter().cloned());
    left.extend(old_nobody.iter().cloned());
    assert_eq!(dead_ids(&stage).await, once_each(&left));

    // Class unknown-kind, any age: the old one and the two recent ones.
    let run = warren(&[
        "dlq",
        "purge",
        &stage.queue,
        "--class",
        "unknown-kind",
        "--yes",
        "--json",
    ])
    .await;
    run.assert_success();
    let summary: Value = serde_json::from_str(&run.stdout).expect("JSON");
    assert_eq!(summary["deleted"], json!(3));
    assert_eq!(dead_ids(&stage).await, once_each(&recent_job));

    // Library: nothing older than a day is left.
    let day_old = Filter {
        failed_before: SystemTime::now().checked_sub(Duration::from_secs(86_400)),
        ..Filter::default()
    };
    let summary = dlq::purge(&stage.dispatcher, &stage.queue, &day_old, |_| {})
        .await
        .expect("purge");
    assert_eq!((summary.deleted, summary.remaining), (0, 3));
    assert_eq!(dead_ids(&stage).await, once_each(&recent_job));
    stage.end().await;
}

/// Given three dead jobs with JSON payloads and one whose payload is not JSON, when `warren
/// dlq export` writes them and `warren submit --file` reads the file into another queue, then
/// that queue gets the three jobs with their kinds, payloads and ids; the fourth is reported
/// with its id, not exported; the dead-letter queue still holds all four.
#[tokio::test]
async fn export_then_submit_file_round_trips() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-export", registry).await;
    let ids = submit_many(&stage, "job", 3).await;
    wait_dead(&stage, 3).await;
    stage.stop_worker().await;
    let publisher = confirm_channel().await;
    let not_json = format!("not-json-{}", stage.queue);
    publish_dead(
        &publisher,
        &stage.queue,
        "job",
        &not_json,
        b"{oops",
        DeadReason::Malformed,
        "2026-11-30T00:00:00.000Z",
    )
    .await;
    wait_dead(&stage, 4).await;

    let export = warren(&["dlq", "export", &stage.queue]).await;
    export.assert_success();
    let lines: Vec<&str> = export.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", export.stdout);
    assert!(
        export.stderr.contains("1 not exported"),
        "{}",
        export.stderr
    );
    assert!(export.stderr.contains(&not_json), "{}", export.stderr);

    let target = unique_queue("dlq-export-to");
    let target_config = config(&[&target]);
    let target_dispatcher = dispatcher(&target_config).await;
    let file = std::env::temp_dir().join(format!("{target}.jsonl"));
    std::fs::write(&file, &export.stdout).expect("writing the export");
    let submit = warren(&[
        "submit",
        "--queue",
        &target,
        "--file",
        file.to_str().expect("utf-8 path"),
    ])
    .await;
    submit.assert_success();
    let _ = std::fs::remove_file(&file);
    let jobs = take_messages(&stage.channel, &target, 3, DEADLINE).await;
    let got: BTreeSet<String> = jobs
        .iter()
        .map(|m| {
            assert_eq!(
                m.properties.kind().as_ref().map(|k| k.as_str()),
                Some("job")
            );
            let payload: Value = serde_json::from_slice(&m.data).expect("JSON");
            assert!(payload["n"].is_u64(), "payload kept: {payload}");
            m.properties
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(got, ids, "same ids");
    let mut all = ids.clone();
    all.insert(not_json);
    assert_eq!(
        dead_ids(&stage).await,
        once_each(&all),
        "export leaves them"
    );
    target_dispatcher.close().await;
    cleanup(&stage.channel, &[&target]).await;
    stage.end().await;
}

/// Given a dead letter whose header table is nested 20,000 deep (what a hostile producer can
/// send; the broker keeps it through its own dead-lettering), when it is listed, shown and
/// replayed, then each works: `show` cuts the nesting short, and the replayed copy carries none
/// of it.
#[tokio::test]
async fn a_hostile_dead_letter_is_listed_shown_and_replayed() {
    let (_failing, registry) = Failing::registry();
    let mut stage = Stage::new("dlq-hostile", registry).await;
    stage.stop_worker().await;
    let dead = topology::dead_queue(&stage.queue);
    let headers = raw_amqp::deep_headers(20_000);
    let message = raw_amqp::RawMessage::job(&dead, "deep-1", "job", &headers, br#"{"n":1}"#);
    raw_amqp::publish_once(&broker_url(), &message)
        .await
        .expect("RabbitMQ takes the deep header");
    wait_dead(&stage, 1).await;

    assert_eq!(
        dead_ids(&stage).await,
        once_each(&["deep-1".to_owned()].into())
    );
    let job = dlq::show(&stage.dispatcher, &stage.queue, "deep-1")
        .await
        .expect("show")
        .expect("found");
    let shown = serde_json::to_string(&job.headers).expect("JSON");
    assert!(
        shown.contains("nested deeper"),
        "{}",
        &shown[..shown.len().min(200)]
    );
    let summary = dlq::replay(
        &stage.dispatcher,
        &stage.queue,
        &ReplayOptions::default(),
        |_| {},
    )
    .await
    .expect("replay");
    assert_eq!((summary.moved, summary.remaining), (1, 0));
    let copies = take_messages(&stage.channel, &stage.queue, 1, DEADLINE).await;
    let headers =
        without_first_delivery_count(copies[0].properties.headers().clone().unwrap_or_default());
    let kept: BTreeSet<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
    assert_eq!(
        kept,
        [envelope::REPLAYED, envelope::REPLAYED_AT].into(),
        "only the replay marker"
    );
    stage.end().await;
}

/// A channel in confirm mode.
async fn confirm_channel() -> lapin::Channel {
    let channel = connect().await.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    channel
}

/// Publishes a dead letter of `queue` as a worker would (to `warren.dead`, confirmed), with its
/// failure time set to `failed_at`.
async fn publish_dead(
    channel: &lapin::Channel,
    queue: &str,
    kind: &str,
    id: &str,
    body: &[u8],
    reason: DeadReason,
    failed_at: &str,
) {
    let job = NewJob::from_json_text(queue, kind, "{}")
        .with_id(id)
        .encode(1024)
        .expect("encodes");
    let dead = DeadLetter {
        reason,
        error: "published by the test".into(),
        attempts: 1,
        queue: queue.into(),
        worker: "test".into(),
    }
    .properties(&job.properties);
    let mut headers = dead.headers().clone().unwrap_or_default();
    headers.insert(
        envelope::FAILED_AT.into(),
        AMQPValue::LongString(LongString::from(failed_at)),
    );
    let confirm = channel
        .basic_publish(
            topology::DEAD_EXCHANGE.into(),
            topology::dead_queue(queue).as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            dead.with_headers(headers),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack() && confirm.take_message().is_none());
}

/// Runs `warren args` on the test broker (no config file, stdin not a terminal) to its end;
/// panics if it takes over [`DEADLINE`].
async fn warren(args: &[&str]) -> Run {
    Warren::new(args).deadline(DEADLINE).run_async().await
}

/// `headers` without the delivery counts a broker stamps on a message's *first* delivery
/// (RabbitMQ 3.10's quorum queues add `x-delivery-count: 0`): not carried by Warren. A count
/// a copy carried over from its dead letter would be at least 1 (reading the dead-letter queue
/// counts as a delivery there), so it still shows.
fn without_first_delivery_count(headers: FieldTable) -> FieldTable {
    let zero = |value: &AMQPValue| {
        matches!(
            value,
            AMQPValue::LongLongInt(0) | AMQPValue::LongInt(0) | AMQPValue::LongUInt(0)
        )
    };
    headers
        .inner()
        .iter()
        .filter(|(key, value)| {
            let count =
                [envelope::DELIVERY_COUNT, envelope::ACQUIRED_COUNT].contains(&key.as_str());
            !(count && zero(value))
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect::<BTreeMap<_, _>>()
        .into()
}
