//! `warren inflight`: workers report the jobs their handlers run, and jobs past their queue's
//! `job_timeout` are flagged.
//!
//! Every worker process of a vhost answers a request on `warren.control`, so each test runs in
//! a vhost of its own ([`TempVhost`]): the workers of the other tests are not in it.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use serde_json::{Value, json};
use tokio::sync::Notify;
use warren_core::NewJob;
use warren_core::config::Config;
use warren_core::inflight::{ANSWERS_PER_SECOND, DIRECT_REPLY_TO, REQUEST_KIND};
use warren_core::topology::CONTROL_EXCHANGE;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::inflight::{Inflight, inflight};
use warren_tests::*;
use warren_workers::{JobContext, Registry};

/// The test config on `vhost`'s broker URL.
fn vhost_config(vhost: &TempVhost, queues: &[&str]) -> Config {
    let mut config = config(queues);
    config.broker.url = vhost.url();
    config
}

/// Asks until `done` holds for the answer; panics with the last answer after 30 s.
async fn inflight_until(
    dispatcher: &Dispatcher,
    queue: Option<&str>,
    done: impl Fn(&Inflight) -> bool,
) -> Inflight {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let found = inflight(dispatcher, queue, Duration::from_secs(1))
            .await
            .expect("inflight");
        if done(&found) {
            return found;
        }
        assert!(
            Instant::now() < until,
            "not seen within 30 s; last answer: {found:#?}"
        );
    }
}

/// Given a worker running one job that waits (job_timeout 60 s) and one whose handler blocks
/// its thread past its queue's 1 s job_timeout (Warren cannot stop it), when `inflight` asks,
/// then both are shown with the worker (connection name, host, pid), id, kind, attempt and
/// start time, the blocked one flagged overdue and the waiting one not; asked for one queue,
/// only its job is shown; `warren inflight Q --json` and the table say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_job_is_shown_and_an_overdue_one_is_flagged() {
    let vhost = TempVhost::new("inflight");
    let waiting = unique_queue("inflight-wait");
    let stuck = unique_queue("inflight-stuck");
    let mut config = vhost_config(&vhost, &[&waiting, &stuck]);
    config.queues.get_mut(&waiting).expect("queue").job_timeout = Duration::from_secs(60);
    config.queues.get_mut(&stuck).expect("queue").job_timeout = Duration::from_secs(1);
    let dispatcher = dispatcher(&config).await;

    let started = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let unblock = Arc::new(AtomicBool::new(false));
    let mut registry = Registry::new();
    let (count, wake) = (started.clone(), release.clone());
    registry.register("wait", move |_: Value, _: JobContext| {
        let (count, wake) = (count.clone(), wake.clone());
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = tokio::time::timeout(Duration::from_secs(60), wake.notified()).await;
            Ok(None)
        }
    });
    let (count, flag) = (started.clone(), unblock.clone());
    registry.register("block", move |_: Value, _: JobContext| {
        let (count, flag) = (count.clone(), flag.clone());
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            // Blocking code: no `.await` at which Warren's job_timeout could stop it.
            let until = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::SeqCst) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None)
        }
    });
    let worker = start_worker(&config, registry, &[&waiting, &stuck]);

    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let waiting_id = dispatcher
        .submit(NewJob::new(&waiting, "wait", &json!({})))
        .await
        .expect("submitted");
    let stuck_id = dispatcher
        .submit(NewJob::new(&stuck, "block", &json!({})))
        .await
        .expect("submitted");

    // When: asked until both jobs are seen and the blocked one is past its 1 s job_timeout.
    let found = inflight_until(&dispatcher, None, |f| {
        f.jobs.len() == 2 && f.jobs.iter().any(|j| j.overdue)
    })
    .await;

    // Then: one worker, this process; both jobs with what they are.
    assert_eq!(found.workers.len(), 1, "{found:#?}");
    let me = &found.workers[0];
    assert_eq!(me.pid, std::process::id());
    assert!(!me.host.is_empty());
    assert!(
        me.connection.starts_with("warren-worker ") && me.connection.ends_with(" consume"),
        "{}",
        me.connection
    );
    let job = |id: &str| {
        found
            .jobs
            .iter()
            .find(|j| j.job.id == id)
            .unwrap_or_else(|| panic!("job {id} not shown: {found:#?}"))
    };
    let (w, s) = (job(&waiting_id.0), job(&stuck_id.0));
    assert_eq!(
        (w.job.kind.as_str(), w.job.queue.as_str(), w.job.attempt),
        ("wait", waiting.as_str(), 1)
    );
    assert_eq!(
        (s.job.kind.as_str(), s.job.queue.as_str(), s.job.attempt),
        ("block", stuck.as_str(), 1)
    );
    assert!(!w.overdue, "the waiting job is within its 60 s: {w:#?}");
    assert!(s.overdue, "the blocked job is past its 1 s: {s:#?}");
    assert_eq!(s.job.job_timeout_ms, 1000);
    assert!(s.job.running_ms > 1000);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    for j in [w, s] {
        assert!(
            (before..=now).contains(&j.job.started_at_ms),
            "started {} not within [{before}, {now}]",
            j.job.started_at_ms
        );
        assert_eq!(&j.worker, me);
    }

    // One queue only.
    let only = inflight(&dispatcher, Some(&waiting), Duration::from_secs(1))
        .await
        .expect("inflight");
    let ids: Vec<&str> = only.jobs.iter().map(|j| j.job.id.as_str()).collect();
    assert_eq!(ids, [waiting_id.0.as_str()]);

    // The command line.
    let json = run_warren(&vhost, &["inflight", &stuck, "--json"]);
    let parsed: Value = serde_json::from_str(&json).expect("--json prints JSON");
    let jobs = parsed["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 1, "{parsed}");
    assert_eq!(jobs[0]["id"], stuck_id.0.as_str());
    assert_eq!(jobs[0]["kind"], "block");
    assert_eq!(jobs[0]["attempt"], 1);
    assert_eq!(jobs[0]["overdue"], true);
    assert!(
        jobs[0]["started_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{parsed}"
    );
    assert_eq!(jobs[0]["worker"]["pid"], std::process::id());
    let table = run_warren(&vhost, &["inflight"]);
    let row = |id: &str| {
        table
            .lines()
            .find(|line| line.starts_with(id))
            .unwrap_or_else(|| panic!("no row for {id}:\n{table}"))
            .to_owned()
    };
    assert!(row(&stuck_id.0).trim_end().ends_with("OVERDUE"), "{table}");
    assert!(!row(&waiting_id.0).contains("OVERDUE"), "{table}");

    // Released, the jobs leave the list.
    unblock.store(true, Ordering::SeqCst);
    release.notify_waiters();
    inflight_until(&dispatcher, None, |f| f.jobs.is_empty()).await;
    assert_eq!(started.load(Ordering::SeqCst), 2, "each job ran once");
    worker.stop().await;
    dispatcher.close().await;
}

/// Given a vhost with Warren's topology and no worker, when `inflight` asks (library and
/// command line), then the result is empty, not an error.
#[tokio::test]
async fn with_no_workers_the_result_is_empty() {
    let vhost = TempVhost::new("inflight-none");
    let queue = unique_queue("inflight-none");
    let dispatcher = dispatcher(&vhost_config(&vhost, &[&queue])).await;
    let found = inflight(&dispatcher, None, Duration::from_millis(500))
        .await
        .expect("no workers is no error");
    assert!(
        found.workers.is_empty() && found.jobs.is_empty(),
        "{found:#?}"
    );
    let json = run_warren(&vhost, &["inflight", "--json", "--window", "500ms"]);
    let parsed: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(parsed["jobs"], json!([]));
    assert_eq!(parsed["workers"], json!([]));
    dispatcher.close().await;
}

/// Given a running worker, when someone publishes to `warren.control` a request whose
/// `reply_to` names a queue, a malformed one, an oversized one and a good one, then only the
/// good one is answered (once) and the named queue receives nothing; when 60 well-formed
/// requests follow at once, they get at most [`ANSWERS_PER_SECOND`] answers a second (one per
/// request at most), and the worker goes on answering afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_no_answer_and_no_amplification() {
    let vhost = TempVhost::new("inflight-hostile");
    let queue = unique_queue("inflight-hostile");
    let config = vhost_config(&vhost, &[&queue]);
    let dispatcher = dispatcher(&config).await;
    let worker = start_worker(&config, Registry::new(), &[&queue]);
    // The worker answers once it runs.
    inflight_until(&dispatcher, None, |f| f.workers.len() == 1).await;

    let connection = connect_to(&vhost).await;
    let channel = connection.create_channel().await.expect("channel");
    let victim = "victim";
    channel
        .queue_declare(
            victim.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let mut answers = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "hostile".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume direct reply-to");
    let request = |reply_to: &str| {
        BasicProperties::default()
            .with_type(REQUEST_KIND.into())
            .with_reply_to(reply_to.into())
            .with_correlation_id("hostile".into())
    };
    publish(&channel, b"{}", request(victim)).await;
    publish(&channel, b"not json", request(DIRECT_REPLY_TO)).await;
    publish(&channel, &vec![b' '; 100_000], request(DIRECT_REPLY_TO)).await;
    publish(&channel, b"{}", request(DIRECT_REPLY_TO)).await;
    // The worker takes requests in order: once the good one is answered, the three before it
    // were seen (and ignored).
    let first = tokio::time::timeout(Duration::from_secs(30), answers.next())
        .await
        .expect("the well-formed request is answered")
        .expect("an answer")
        .expect("an answer");
    let answer: Value = serde_json::from_slice(&first.data).expect("JSON");
    assert_eq!(answer["jobs"], json!([]), "{answer}");
    assert_eq!(
        ready_count(&channel, victim).await,
        0,
        "a reply_to naming a queue gets nothing"
    );
    let second = tokio::time::timeout(Duration::from_secs(2), answers.next()).await;
    assert!(
        second.is_err(),
        "a second answer: only one request was well formed"
    );

    // A flood: at most ANSWERS_PER_SECOND answers a second.
    let flood = 60;
    for _ in 0..flood {
        publish(&channel, b"{}", request(DIRECT_REPLY_TO)).await;
    }
    let started = Instant::now();
    let mut answered = 0;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(3), answers.next()).await {
        answered += 1;
    }
    let seconds = started.elapsed().as_secs() as usize + 1;
    eprintln!("{answered} answers to {flood} well-formed requests (over about {seconds} s)");
    assert!(answered >= 1, "the well-formed requests were answered");
    assert!(
        answered <= ANSWERS_PER_SECOND as usize * seconds && answered < flood,
        "{answered} answers to {flood} requests in about {seconds} s"
    );
    // Still answering.
    inflight_until(&dispatcher, None, |f| f.workers.len() == 1).await;
    let _ = channel
        .queue_delete(victim.into(), Default::default())
        .await;
    worker.stop().await;
    dispatcher.close().await;
}

/// Given the topology applied and a worker running as a user with the worker permissions of
/// `config/definitions.json` (in a vhost of the test's own), when a user with the dispatcher's
/// permissions asks, then the worker answers: the file grants what the control queue, the
/// request and the direct reply-to answer need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_users_of_the_definitions_ask_and_answer() {
    let vhost = TempVhost::new("inflight-perm");
    let queue = "demo";
    let admin = dispatcher(&vhost_config(&vhost, &[queue])).await;
    admin.close().await;
    let worker_user = RuntimeUser::new(&vhost, "worker");
    let dispatcher_user = RuntimeUser::new(&vhost, "dispatcher");

    let mut config = vhost_config(&vhost, &[queue]);
    config.broker.url = worker_user.url(&vhost);
    let worker = start_worker(&config, Registry::new(), &[queue]);
    let mut config = vhost_config(&vhost, &[]);
    config.broker.url = dispatcher_user.url(&vhost);
    let asking = Dispatcher::connect(&config).await.expect("connects");

    let found = inflight_until(&asking, None, |f| f.workers.len() == 1).await;
    assert!(found.jobs.is_empty(), "{found:#?}");
    assert!(worker.is_running());
    worker.stop().await;
    asking.close().await;
}

/// A user of the test's own with the permissions `config/definitions.json` gives
/// `warren-<role>` on `/`, on the test's vhost; deleted when dropped.
struct RuntimeUser {
    name: String,
    password: String,
}

impl RuntimeUser {
    fn new(vhost: &TempVhost, role: &str) -> RuntimeUser {
        let path = workspace_root().join("config/definitions.json");
        let definitions: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("definitions.json"))
                .expect("JSON");
        let defined = format!("warren-{role}");
        let permission = definitions["permissions"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["user"] == defined.as_str()))
            .unwrap_or_else(|| panic!("no permissions for {defined}"));
        let field = |key: &str| permission[key].as_str().expect("a pattern").to_owned();
        let name = format!("{}-{role}", vhost.name);
        let password = uuid::Uuid::now_v7().simple().to_string();
        broker_ctl(&["add_user", &name, &password]);
        broker_ctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &name,
            &field("configure"),
            &field("write"),
            &field("read"),
        ]);
        RuntimeUser { name, password }
    }

    fn url(&self, vhost: &TempVhost) -> String {
        let base = vhost.url();
        let (scheme, rest) = base.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }
}

impl Drop for RuntimeUser {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/broker"))
            .args(["ctl", "delete_user", &self.name])
            .output();
    }
}

async fn publish(channel: &Channel, body: &[u8], properties: BasicProperties) {
    channel
        .basic_publish(
            CONTROL_EXCHANGE.into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish");
}

async fn connect_to(vhost: &TempVhost) -> lapin::Connection {
    let mut broker = Config::default().broker;
    broker.url = vhost.url();
    warren_core::connection::connect(&broker, "warren-tests inflight")
        .await
        .expect("connect")
}

/// Runs `warren ARGS` against `vhost` (no config file) and returns its standard output.
fn run_warren(vhost: &TempVhost, args: &[&str]) -> String {
    let output = Command::new(binary("warren"))
        .args(args)
        .env(warren_core::config::AMQP_URL_ENV, vhost.url())
        .env_remove(warren_core::config::CONFIG_ENV)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("running warren");
    assert!(
        output.status.success(),
        "warren {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8")
}
