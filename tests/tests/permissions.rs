//! Least privilege: the users of `config/definitions.json` can each do their job, and the two
//! runtime users nothing else.
//!
//! Each test runs in a vhost of its own ([`TempVhost`]), with users of its own named after it
//! (users are global in RabbitMQ) that get exactly the permissions `config/definitions.json`
//! gives `warren-admin`, `warren-dispatcher` and `warren-worker` (read from the file, so the
//! file is what is tested), set through `scripts/broker ctl`. The queues have the names the
//! definitions allow (`demo`, `default`): the vhost keeps them apart from every other test.
//!
//! Run with `--nocapture` to see the permission table (user × operation × allowed?) as
//! measured on the broker at hand.

use std::collections::BTreeMap;
use std::time::Duration;

use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ExchangeKind};
use serde_json::{Value, json};
use warren_core::config::{Config, QueueConfig};
use warren_core::topology::{self, TopologyError};
use warren_dispatcher::{Dispatcher, SubmitError};
use warren_tests::{
    Recorder, TempVhost, broker_ctl, broker_url, config, quick_queue, start_worker, take_messages,
    workspace_root,
};
use warren_workers::{JobError, Registry, WorkerError};

/// The work queue the definitions let the worker consume (`config/warren.toml`'s `demo`).
const QUEUE: &str = "demo";
/// The other queue the definitions name (compose's worker consumes `default` too).
const ZERO_DELAY_QUEUE: &str = "default";

/// Given the three users in a fresh vhost and the topology applied by the admin, when each
/// tries every operation below, then the admin may do everything, the dispatcher only submit
/// to `warren.jobs`, and the worker only what a worker does (check the topology passively,
/// consume its queues, publish retries and dead letters). Passive declares reveal only that
/// something exists: RabbitMQ 3.10 answers them for anyone, 4.x only for a user with some
/// permission on the name. Prints the table.
#[tokio::test]
async fn each_user_may_do_its_job_and_nothing_else() {
    let vhost = TempVhost::new("perm-table");
    let users = Users::new(&vhost);
    let admin = users.connect("admin").await;
    apply_topology(&users, &[QUEUE, ZERO_DELAY_QUEUE]).await;
    // Things to try on that are not Warren's: another application's queue, a scratch queue
    // and exchange to bind, purge and delete.
    let setup = admin.create_channel().await.expect("channel");
    for queue in ["other-app", "scratch"] {
        setup
            .queue_declare(queue.into(), durable(), FieldTable::default())
            .await
            .expect("declare");
    }
    setup
        .exchange_declare(
            "scratch-x".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");

    let mut measured: BTreeMap<&str, Vec<Outcome>> = BTreeMap::new();
    // The admin last: its deletes succeed.
    for role in ["dispatcher", "worker", "admin"] {
        let connection = users.connect(role).await;
        let mut outcomes = Vec::new();
        for op in OPERATIONS {
            outcomes.push(try_operation(&connection, op).await);
        }
        let _ = connection.close(200, "done".into()).await;
        measured.insert(role, outcomes);
    }

    let version = broker_version();
    println!(
        "\nPermissions as measured on RabbitMQ {version} (users of config/definitions.json):\n"
    );
    println!("| operation | warren-admin | warren-dispatcher | warren-worker |");
    println!("|---|---|---|---|");
    let mut wrong = Vec::new();
    for (i, op) in OPERATIONS.iter().enumerate() {
        let cell = |role: &str| measured[role][i].to_string();
        println!(
            "| {} | {} | {} | {} |",
            op.name,
            cell("admin"),
            cell("dispatcher"),
            cell("worker")
        );
        // RabbitMQ 3.10 answers a passive declare to anyone; 4.x only to a user with some
        // permission on the name (measured on both).
        let passive = matches!(op.what, Op::PassiveQueue(_) | Op::PassiveExchange(_));
        let anyone = passive && version.starts_with("3.");
        for (role, expected) in [
            ("admin", true),
            ("dispatcher", op.dispatcher || anyone),
            ("worker", op.worker || anyone),
        ] {
            let got = &measured[role][i];
            let ok = match got {
                Outcome::Allowed => expected,
                Outcome::Refused => !expected,
                Outcome::Other(_) => false,
            };
            if !ok {
                wrong.push(format!("{role}: {} -> {got}", op.name));
            }
        }
    }
    println!();
    assert!(
        wrong.is_empty(),
        "permissions differ from the expected ones:\n  {}",
        wrong.join("\n  ")
    );
}

/// Given the topology applied by the admin, when the dispatcher user submits and a real worker
/// runs as the worker user, then every job is done, retried (through `warren.delay.21`, and
/// through `warren.jobs` for a 0 s retry) or dead-lettered, and the worker declared nothing.
#[tokio::test]
async fn runtime_users_submit_consume_retry_and_dead_letter() {
    let vhost = TempVhost::new("perm-run");
    let users = Users::new(&vhost);
    apply_topology(&users, &[QUEUE, ZERO_DELAY_QUEUE]).await;

    // Given a worker on both queues as the worker user.
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "ok", |_| Ok(None));
    recorder.handle(&mut registry, "flaky", |call| match call.attempt {
        1 => Err(JobError::Retry("first attempt fails".into())),
        _ => Ok(None),
    });
    recorder.handle(&mut registry, "broken", |_| {
        Err(JobError::Permanent("cannot ever work".into()))
    });
    let worker = start_worker(
        &users.config("worker", &[QUEUE, ZERO_DELAY_QUEUE]),
        registry,
        &[QUEUE, ZERO_DELAY_QUEUE],
    );

    // When the dispatcher user submits.
    let dispatcher = Dispatcher::connect(&users.config("dispatcher", &[]))
        .await
        .expect("the dispatcher user connects");
    for (queue, kind) in [
        (QUEUE, "ok"),
        (QUEUE, "flaky"),
        (ZERO_DELAY_QUEUE, "flaky"),
        (QUEUE, "broken"),
    ] {
        let job = warren_core::NewJob::new(queue, kind, &json!({}));
        dispatcher.submit(job).await.expect("submitted");
    }

    // Then: ok once, each flaky twice (delayed 1 s and 0 s), broken once and dead-lettered.
    let calls = recorder.wait_for(6, Duration::from_secs(30)).await;
    assert_eq!(
        calls.iter().filter(|c| c.attempt == 2).count(),
        2,
        "{calls:?}"
    );
    let admin = users.connect("admin").await;
    let channel = admin.create_channel().await.expect("channel");
    let dead = take_messages(
        &channel,
        &topology::dead_queue(QUEUE),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        warren_tests::header(&dead[0], "x-warren-error-class").as_deref(),
        Some("permanent")
    );
    assert!(
        worker.is_running(),
        "the worker runs without configure rights"
    );
    worker.stop().await;
    dispatcher.close().await;
}

/// Given a vhost where Warren's topology was never applied, when a worker starts as the worker
/// user, then it stops at once with a fatal error naming what is missing and the fix; and the
/// dispatcher user's submit says the topology is missing.
#[tokio::test]
async fn a_worker_without_configure_rights_refuses_a_missing_topology() {
    let vhost = TempVhost::new("perm-missing");
    let users = Users::new(&vhost);

    let worker = start_worker(&users.config("worker", &[QUEUE]), Registry::new(), &[QUEUE]);
    let result = tokio::time::timeout(Duration::from_secs(30), worker.task)
        .await
        .expect("the worker stops on its own")
        .expect("no panic");
    let err = result.expect_err("a missing topology is fatal for the worker user");
    assert!(
        matches!(
            &err,
            WorkerError::Topology(TopologyError::NotPermitted { .. })
        ),
        "{err}"
    );
    assert!(err.is_fatal());
    let text = err.to_string();
    for part in [
        "exchange warren.jobs does not exist",
        "ACCESS_REFUSED",
        "run `warren topology apply` as the admin user",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }

    let dispatcher = Dispatcher::connect(&users.config("dispatcher", &[]))
        .await
        .expect("connects");
    let job = warren_core::NewJob::new(QUEUE, "ok", &json!({}));
    let err = dispatcher.submit(job).await.expect_err("nowhere to go");
    assert!(matches!(err, SubmitError::NoTopology), "{err}");
    dispatcher.close().await;
}

/// Given the admin applied only the shared topology and queue `demo`, when a worker user's
/// worker is started on `demo` and on `default` (whose queues are missing), then it stops
/// with the fatal error naming `default`; started on `demo` alone, it runs.
#[tokio::test]
async fn a_worker_declares_nothing_when_its_queues_exist() {
    let vhost = TempVhost::new("perm-partial");
    let users = Users::new(&vhost);
    apply_topology(&users, &[QUEUE]).await;

    let both = start_worker(
        &users.config("worker", &[QUEUE, ZERO_DELAY_QUEUE]),
        Registry::new(),
        &[QUEUE, ZERO_DELAY_QUEUE],
    );
    let err = tokio::time::timeout(Duration::from_secs(30), both.task)
        .await
        .expect("stops")
        .expect("no panic")
        .expect_err("default is missing");
    assert!(
        err.to_string().contains("queue default does not exist"),
        "{err}"
    );

    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "ok", |_| Ok(None));
    let worker = start_worker(&users.config("worker", &[QUEUE]), registry, &[QUEUE]);
    let dispatcher = Dispatcher::connect(&users.config("dispatcher", &[]))
        .await
        .expect("connects");
    let job = warren_core::NewJob::new(QUEUE, "ok", &json!({}));
    dispatcher.submit(job).await.expect("submitted");
    recorder.wait_for(1, Duration::from_secs(30)).await;
    worker.stop().await;
    dispatcher.close().await;
}

// --- operations ---------------------------------------------------------------------------------

/// One thing a user may or may not do, and whether each runtime user should be allowed it.
struct Operation {
    name: &'static str,
    what: Op,
    dispatcher: bool,
    worker: bool,
}

enum Op {
    PassiveQueue(&'static str),
    PassiveExchange(&'static str),
    Qos,
    Publish(&'static str, &'static str),
    Consume(&'static str),
    Get(&'static str),
    DeclareQueue(&'static str),
    DeclareWarrenQueue,
    /// What a worker does to answer `warren inflight`.
    ControlQueue,
    DeclareExchange(&'static str),
    Bind(&'static str, &'static str),
    Purge(&'static str),
    DeleteQueue(&'static str),
    DeleteExchange(&'static str),
}

const fn op(name: &'static str, what: Op, dispatcher: bool, worker: bool) -> Operation {
    Operation {
        name,
        what,
        dispatcher,
        worker,
    }
}

const OPERATIONS: &[Operation] = &[
    op(
        "check queue `demo` exists (passive queue.declare)",
        Op::PassiveQueue("demo"),
        false,
        true,
    ),
    op(
        "check queue `demo.dead` exists (passive queue.declare)",
        Op::PassiveQueue("demo.dead"),
        false,
        false,
    ),
    op(
        "check exchange `warren.jobs` exists (passive exchange.declare)",
        Op::PassiveExchange("warren.jobs"),
        true,
        true,
    ),
    op(
        "check exchange `warren.delay.00` exists (passive exchange.declare)",
        Op::PassiveExchange("warren.delay.00"),
        false,
        false,
    ),
    op("set prefetch (basic.qos)", Op::Qos, true, true),
    op(
        "publish to `warren.jobs` (submit; 0 s retry)",
        Op::Publish("warren.jobs", "demo"),
        true,
        true,
    ),
    // The dispatcher submits delayed jobs (`warren submit --delay`) into the delay levels.
    op(
        "publish to `warren.delay.21` (retry; delayed submit)",
        Op::Publish(
            "warren.delay.21",
            "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.demo",
        ),
        true,
        true,
    ),
    op(
        "publish to `warren.dead` (dead letter)",
        Op::Publish("warren.dead", "demo.dead"),
        false,
        true,
    ),
    op(
        "publish to `warren.delay.00`",
        Op::Publish("warren.delay.00", "x"),
        false,
        false,
    ),
    op(
        "publish to `amq.direct`",
        Op::Publish("amq.direct", "demo"),
        false,
        false,
    ),
    // Direct reply-to: a worker answers `warren inflight` (and `submit --wait`) by publishing
    // to the default exchange, which needs write on `amq.default`; RabbitMQ cannot limit that
    // to `amq.rabbitmq.reply-to.*` keys (topic permissions apply to topic exchanges only).
    op(
        "publish to the default exchange",
        Op::Publish("", "demo"),
        false,
        true,
    ),
    op(
        "publish to `warren.control` (warren inflight)",
        Op::Publish("warren.control", ""),
        true,
        false,
    ),
    op(
        "declare a server-named exclusive queue, bind it to `warren.control`, consume it",
        Op::ControlQueue,
        false,
        true,
    ),
    op("consume `demo`", Op::Consume("demo"), false, true),
    op(
        "consume `demo.dead`",
        Op::Consume("demo.dead"),
        false,
        false,
    ),
    op(
        "consume `other-app`",
        Op::Consume("other-app"),
        false,
        false,
    ),
    op("basic.get `demo`", Op::Get("demo"), false, true),
    op(
        "basic.get `warren.unroutable`",
        Op::Get("warren.unroutable"),
        false,
        false,
    ),
    op(
        "basic.get `warren.delay.00`",
        Op::Get("warren.delay.00"),
        false,
        false,
    ),
    op(
        "declare a new queue",
        Op::DeclareQueue("new-queue"),
        false,
        false,
    ),
    op(
        "declare `demo` again, same arguments",
        Op::DeclareWarrenQueue,
        false,
        false,
    ),
    op(
        "declare a new exchange",
        Op::DeclareExchange("new-exchange"),
        false,
        false,
    ),
    op(
        "bind `scratch` to `amq.direct`",
        Op::Bind("scratch", "amq.direct"),
        false,
        false,
    ),
    op("purge `scratch`", Op::Purge("scratch"), false, false),
    op(
        "delete queue `scratch`",
        Op::DeleteQueue("scratch"),
        false,
        false,
    ),
    op(
        "delete exchange `scratch-x`",
        Op::DeleteExchange("scratch-x"),
        false,
        false,
    ),
];

/// What the broker answered.
enum Outcome {
    Allowed,
    /// `ACCESS_REFUSED` (403).
    Refused,
    Other(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Allowed => write!(f, "yes"),
            Outcome::Refused => write!(f, "no (ACCESS_REFUSED)"),
            Outcome::Other(err) => write!(f, "?? {err}"),
        }
    }
}

/// Runs `op` on a channel of its own (a refusal closes it).
async fn try_operation(connection: &Connection, op: &Operation) -> Outcome {
    let channel = match connection.create_channel().await {
        Ok(channel) => channel,
        Err(err) => return Outcome::Other(format!("no channel: {err}")),
    };
    let result: Result<(), lapin::Error> = async {
        match op.what {
            Op::PassiveQueue(queue) => {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(queue.into(), passive, FieldTable::default())
                    .await?;
            }
            Op::PassiveExchange(exchange) => {
                let passive = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .exchange_declare(
                        exchange.into(),
                        ExchangeKind::Direct,
                        passive,
                        FieldTable::default(),
                    )
                    .await?;
            }
            Op::Qos => channel.basic_qos(8, BasicQosOptions::default()).await?,
            Op::Publish(exchange, key) => {
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                channel
                    .basic_publish(
                        exchange.into(),
                        key.into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        BasicProperties::default().with_type("ok".into()),
                    )
                    .await?
                    .await?;
            }
            Op::Consume(queue) => {
                let consumer = channel
                    .basic_consume(
                        queue.into(),
                        "permissions-test".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                drop(consumer);
                channel
                    .basic_cancel("permissions-test".into(), BasicCancelOptions::default())
                    .await?;
            }
            Op::Get(queue) => {
                channel
                    .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                    .await?;
            }
            Op::DeclareQueue(queue) => {
                channel
                    .queue_declare(queue.into(), durable(), FieldTable::default())
                    .await?;
            }
            Op::DeclareWarrenQueue => {
                let settings = quick_queue();
                channel
                    .queue_declare(
                        QUEUE.into(),
                        durable(),
                        topology::work_queue_arguments(QUEUE, &settings),
                    )
                    .await?;
            }
            Op::ControlQueue => {
                let options = QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                };
                let queue = channel
                    .queue_declare("".into(), options, topology::control_queue_arguments())
                    .await?;
                channel
                    .queue_bind(
                        queue.name().clone(),
                        topology::CONTROL_EXCHANGE.into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                channel
                    .basic_consume(
                        queue.name().clone(),
                        "permissions-test".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            Op::DeclareExchange(exchange) => {
                channel
                    .exchange_declare(
                        exchange.into(),
                        ExchangeKind::Direct,
                        ExchangeDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            Op::Bind(queue, exchange) => {
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.into(),
                        "scratch".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            Op::Purge(queue) => {
                channel
                    .queue_purge(queue.into(), QueuePurgeOptions::default())
                    .await?;
            }
            Op::DeleteQueue(queue) => {
                channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await?;
            }
            Op::DeleteExchange(exchange) => {
                channel
                    .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
                    .await?;
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let _ = channel.close(200, "done".into()).await;
            Outcome::Allowed
        }
        Err(err) if topology::is_access_refused(&err) => Outcome::Refused,
        Err(err) if err.to_string().contains("ACCESS_REFUSED") => Outcome::Refused,
        Err(err) => Outcome::Other(err.to_string()),
    }
}

// --- users --------------------------------------------------------------------------------------

/// The admin, dispatcher and worker of `config/definitions.json`, as users of this test's own
/// (`<vhost>-admin`, ...) with random passwords and the file's permissions on the test's vhost.
/// Deleted when dropped.
struct Users {
    vhost: String,
    names: BTreeMap<&'static str, (String, String)>,
}

impl Users {
    fn new(vhost: &TempVhost) -> Users {
        let definitions = definitions();
        let mut names = BTreeMap::new();
        for role in ["admin", "dispatcher", "worker"] {
            let defined = format!("warren-{role}");
            let permission = definitions["permissions"]
                .as_array()
                .and_then(|all| {
                    all.iter()
                        .find(|p| p["user"] == defined.as_str() && p["vhost"] == "/")
                })
                .unwrap_or_else(|| {
                    panic!("config/definitions.json has no permissions for {defined} on /")
                });
            let field = |key: &str| {
                permission[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("{defined}: `{key}` is not a string"))
                    .to_owned()
            };
            let user = format!("{}-{role}", vhost.name);
            let password = uuid::Uuid::now_v7().simple().to_string();
            broker_ctl(&["add_user", &user, &password]);
            broker_ctl(&[
                "set_permissions",
                "-p",
                &vhost.name,
                &user,
                &field("configure"),
                &field("write"),
                &field("read"),
            ]);
            names.insert(role, (user, password));
        }
        Users {
            vhost: vhost.name.clone(),
            names,
        }
    }

    /// The broker URL as `role` on the test's vhost.
    fn url(&self, role: &str) -> String {
        let (user, password) = &self.names[role];
        let base = broker_url();
        let (scheme, rest) = base.split_once("://").expect("a URL");
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        let host = host.split_once('/').map_or(host, |(host, _)| host);
        format!("{scheme}://{user}:{password}@{host}/{}", self.vhost)
    }

    /// The test config ([`config`]) as `role`.
    fn config(&self, role: &str, queues: &[&str]) -> Config {
        let mut config = config(queues);
        config.broker.url = self.url(role);
        if let Some(zero) = config.queues.get_mut(ZERO_DELAY_QUEUE) {
            *zero = zero_delay_queue();
        }
        config
    }

    async fn connect(&self, role: &str) -> Connection {
        let mut broker = Config::default().broker;
        broker.url = self.url(role);
        warren_core::connection::connect(&broker, "warren-tests permissions")
            .await
            .unwrap_or_else(|err| panic!("{role} cannot connect: {err}"))
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for (user, _) in self.names.values() {
            let _ = std::process::Command::new(workspace_root().join("scripts/broker"))
                .args(["ctl", "delete_user", user])
                .output();
        }
    }
}

/// `default`'s settings here: retried at once (published to `warren.jobs`, not a delay level).
fn zero_delay_queue() -> QueueConfig {
    let mut queue = quick_queue();
    queue.retry.initial_delay = Duration::ZERO;
    queue
}

/// `warren topology apply` as the admin user, for `queues`.
async fn apply_topology(users: &Users, queues: &[&str]) {
    let config = users.config("admin", queues);
    let admin = Dispatcher::connect(&config).await.expect("admin connects");
    let names: Vec<String> = queues.iter().map(|q| (*q).to_owned()).collect();
    admin
        .apply_topology(&names)
        .await
        .expect("the admin applies the topology");
    admin.close().await;
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn definitions() -> Value {
    let path = workspace_root().join("config/definitions.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// The version the test broker reports.
fn broker_version() -> String {
    broker_ctl(&["-q", "eval", "rabbit_misc:version()."])
        .trim()
        .trim_matches('"')
        .to_owned()
}
