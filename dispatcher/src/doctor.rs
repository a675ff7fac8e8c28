//! `warren doctor`: checks what Warren relies on in a broker, and says what to do about each
//! miss. Nothing is changed: everything is read through the management HTTP API
//! ([`crate::management`]) and one AMQP connection.
//!
//! The checks, in the order they run (each a [`Check`] with its [`Outcome`]):
//!
//! 1. `amqp`: broker.url accepts Warren's login.
//! 2. `management_api`: the API answers, as which user (doctor needs `administrator` to read
//!    other users' permissions and the broker's settings). Without it nothing else can be
//!    checked.
//! 3. `broker_version`: below 3.10 Warren cannot work (at-least-once dead-lettering); 3.10 is
//!    out of support, and 3.11–3.13 untested (warnings); 4.x's differences are listed (README,
//!    "RabbitMQ 4.3 and 3.10").
//! 4. `feature_flags`: `stream_queue` (at-least-once dead-lettering from quorum queues needs
//!    it, on 3.10 it may be off) and `quorum_queue` enabled; a stable flag left disabled after
//!    an upgrade is a warning.
//! 5. `plugins`: `rabbitmq_management` on every node; `rabbitmq_prometheus` recommended;
//!    `rabbitmq_auth_mechanism_ssl` when the config logs in by client certificate.
//! 6. `consumer_timeout`: the broker's, against the longest a worker of these queues may hold
//!    a delivery ([`Config::consumer_timeout`]); it matters where workers cannot set their own
//!    (`x-consumer-timeout`: RabbitMQ before 3.12, and classic queues before 4.0).
//!    RabbitMQ 3.10 does not tell its value over the API: then a warning says what it must be.
//! 7. `exchanges`: Warren's shared exchanges (`warren.control` included) exist with their
//!    type and arguments.
//! 8. `delay_levels`: the 22 delay queues and exchanges, with their arguments and bindings.
//! 9. `queue` (one per queue and dead-letter queue, and `warren.unroutable`): exists, with the
//!    arguments [`topology`] declares for the config and its bindings.
//! 10. `permissions` (one per user): the user Warren connects as, and each `--user`, against
//!     what its role needs (README "Users and permissions", config/definitions.json): a
//!     dispatcher writes `warren.jobs`; a worker also writes `warren.delay.21` and
//!     `warren.dead` and reads its queues; an admin configures, writes and reads all of
//!     Warren's names. What only some commands need is a warning when missing: a
//!     dispatcher's `warren.delay.21` (delayed submits) and `warren.control` (`warren
//!     inflight`); a worker's `amq.default` (answering `submit --wait`), `warren.control` and
//!     server-named `amq.gen-*` queues (answering `warren inflight`). Permission patterns are
//!     evaluated like RabbitMQ does (an unanchored regular expression; empty means `^$`).
//!
//! [`Report::holds`] is true when no check failed (warnings hold).

use std::collections::BTreeSet;
use std::time::Duration;

use futures::future::join_all;
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;
use serde_json::{Map, Value};
use warren_core::config::{Config, QueueType};
use warren_core::{delay, topology};

use crate::Dispatcher;
use crate::management::{Binding, Management, ManagementError, Overview, Permission};

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Holds, but read the detail (a version out of support, a value the broker does not tell).
    Warn,
    Fail,
}

/// One check: what, about which queue, user or flag, how it came out, and what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `amqp`, `management_api`, `broker_version`, `feature_flags`, `plugins`,
    /// `consumer_timeout`, `exchanges`, `delay_levels`, `queue` or `permissions`.
    pub check: &'static str,
    /// The queue or user it is about (`queue`, `permissions`).
    pub subject: Option<String>,
    #[serde(rename = "status")]
    pub outcome: Outcome,
    pub detail: String,
    /// What to do about it, when it is not `ok`.
    pub fix: Option<String>,
}

impl Check {
    fn new(check: &'static str, subject: Option<&str>) -> Check {
        Check {
            check,
            subject: subject.map(str::to_owned),
            outcome: Outcome::Ok,
            detail: String::new(),
            fix: None,
        }
    }

    fn ok(mut self, detail: impl Into<String>) -> Check {
        self.outcome = Outcome::Ok;
        self.detail = detail.into();
        self
    }

    fn warn(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome = Outcome::Warn;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    fn fail(mut self, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        self.outcome = Outcome::Fail;
        self.detail = detail.into();
        self.fix = Some(fix.into());
        self
    }

    /// `fail` when there are problems (listed), else `ok` with `fine`.
    fn judged(self, problems: &[String], fine: &str, fix: &str) -> Check {
        match problems.is_empty() {
            true => self.ok(fine),
            false => self.fail(problems.join("; "), fix),
        }
    }
}

/// Everything doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub vhost: String,
    /// The management API's address (no credentials).
    pub management: String,
    pub broker_version: Option<String>,
    pub checks: Vec<Check>,
    /// True when no check failed.
    pub holds: bool,
}

/// What a user is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submits jobs: writes `warren.jobs`.
    Dispatcher,
    /// Runs jobs: writes `warren.jobs`, the top delay level and `warren.dead`, reads its
    /// queues.
    Worker,
    /// Applies and migrates the topology, reads dead letters: everything on Warren's names.
    Admin,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "dispatcher" => Ok(Role::Dispatcher),
            "worker" => Ok(Role::Worker),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "`{other}` is not a role: dispatcher, worker or admin"
            )),
        }
    }
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Dispatcher => "dispatcher",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }
}

/// A user to check, and as what (`None`: worker if it may read one of the queues, else
/// dispatcher).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserToCheck {
    pub name: String,
    pub role: Option<Role>,
}

impl UserToCheck {
    /// `NAME` or `NAME=ROLE` (`dispatcher`, `worker`, `admin`).
    pub fn parse(text: &str) -> Result<UserToCheck, String> {
        if let Some((name, role)) = text.rsplit_once('=')
            && let Ok(role) = role.parse::<Role>()
        {
            return Ok(UserToCheck {
                name: name.to_owned(),
                role: Some(role),
            });
        }
        match text.is_empty() {
            true => Err("a user name is needed".to_owned()),
            false => Ok(UserToCheck {
                name: text.to_owned(),
                role: None,
            }),
        }
    }
}

/// What to look at besides the config: more queues, more users.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Queues checked besides the config's.
    pub queues: Vec<String>,
    /// Users checked besides the one Warren connects as.
    pub users: Vec<UserToCheck>,
}

/// Runs every check against the broker of `config` (its vhost), through `amqp` (or the
/// reason it could not connect) and `management`.
pub async fn examine(
    config: &Config,
    amqp: Result<&Dispatcher, String>,
    management: &Management,
    options: &Options,
) -> Report {
    let mut queues: Vec<String> = config.queues.keys().cloned().collect();
    for queue in &options.queues {
        if !queues.contains(queue) {
            queues.push(queue.clone());
        }
    }
    let mut checks = vec![amqp_check(config, amqp)];
    let overview = match management.overview().await {
        Ok(overview) => overview,
        Err(err) => {
            checks.push(Check::new("management_api", None).fail(
                err.to_string(),
                "enable the rabbitmq_management plugin (`rabbitmq-plugins enable \
                 rabbitmq_management`) and point management.url / $WARREN_MANAGEMENT_URL at it; \
                 no other check can run without it",
            ));
            return report(management, None, checks);
        }
    };
    checks.push(api_check(management, &overview).await);
    let version = overview.version();
    checks.push(version_check(&overview));
    checks.push(feature_flags_check(management).await);
    checks.push(plugins_check(config, management).await);
    checks.push(consumer_timeout_check(config, management, version, &queues).await);
    checks.push(exchanges_check(management).await);
    checks.push(delay_levels_check(management).await);
    checks.extend(queue_checks(config, management, &queues).await);
    checks.extend(permission_checks(config, management, &queues, &options.users).await);
    report(management, overview.rabbitmq_version, checks)
}

fn report(management: &Management, version: Option<String>, checks: Vec<Check>) -> Report {
    Report {
        vhost: management.vhost().to_owned(),
        management: management.address().to_owned(),
        broker_version: version,
        holds: checks.iter().all(|c| c.outcome != Outcome::Fail),
        checks,
    }
}

fn amqp_check(config: &Config, amqp: Result<&Dispatcher, String>) -> Check {
    let check = Check::new("amqp", None);
    let url = warren_core::secret::mask_url(&config.broker.url);
    match amqp {
        Ok(_) => check.ok(format!("connected to {url}")),
        Err(reason) => check.fail(
            reason,
            "start the broker, or fix broker.url / $WARREN_AMQP_URL (address, user, password, \
             vhost)",
        ),
    }
}

async fn api_check(management: &Management, overview: &Overview) -> Check {
    let check = Check::new("management_api", None);
    let version = overview.management_version.as_deref().unwrap_or("?");
    match management.whoami().await {
        Ok(me) if me.tags.iter().any(|t| t == "administrator") => check.ok(format!(
            "{} (management {version}) answers user `{}` (administrator)",
            management.address(),
            me.name
        )),
        Ok(me) => check.warn(
            format!(
                "{} answers user `{}` with tags [{}]: without `administrator` the users' \
                 permissions and the broker's settings cannot be read",
                management.address(),
                me.name,
                me.tags.join(", ")
            ),
            "run doctor with an administrator's management credentials (management.user / \
             management.password, or $WARREN_MANAGEMENT_URL)",
        ),
        Err(err) => check.fail(err.to_string(), "check the management API's credentials"),
    }
}

fn version_check(overview: &Overview) -> Check {
    let check = Check::new("broker_version", None);
    let text = overview.rabbitmq_version.clone().unwrap_or_default();
    match overview.version() {
        None => check.warn(
            format!("the broker does not say its version (`{text}`)"),
            "check by hand that it is RabbitMQ 4.x (or 3.10)",
        ),
        Some((major, minor, _)) if major < 3 || (major == 3 && minor < 10) => check.fail(
            format!(
                "RabbitMQ {text}: Warren needs 3.10 or later (at-least-once dead-lettering from \
                 quorum queues)"
            ),
            "upgrade RabbitMQ, to 4.x",
        ),
        Some((3, 10, _)) => check.warn(
            format!(
                "RabbitMQ {text}: out of support since 2023 and Warren's legacy leg: one \
                 broker-wide consumer_timeout (no x-consumer-timeout), a nack counts towards the \
                 delivery limit, quorum queues have no priorities"
            ),
            "upgrade to RabbitMQ 4.x; first run `warren topology migrate` (README, \"Upgrading \
             a Warren deployment from 3.10\")",
        ),
        Some((3, _, _)) => check.warn(
            format!(
                "RabbitMQ {text}: out of community support, and Warren is proven only on 4.3 \
                 and 3.10"
            ),
            "upgrade to RabbitMQ 4.x",
        ),
        Some(_) => check.ok(format!(
            "RabbitMQ {text}: quorum queues without x-delivery-limit get 20 and drop past it \
             (Warren declares every limit, checked below); consumer timeouts are per consumer; a \
             nack's requeue does not count (Warren rejects); Khepri metadata store"
        )),
    }
}

async fn feature_flags_check(management: &Management) -> Check {
    let check = Check::new("feature_flags", None);
    let flags = match management.feature_flags().await {
        Ok(flags) => flags,
        Err(err) => return check.fail(err.to_string(), api_fix(&err)),
    };
    let mut problems = Vec::new();
    let mut disabled_stable = Vec::new();
    for flag in &flags {
        let needed = matches!(flag.name.as_str(), "stream_queue" | "quorum_queue");
        if flag.state != "enabled" {
            if needed {
                problems.push(format!(
                    "`{}` is {} (at-least-once dead-lettering from quorum queues needs \
                     stream_queue)",
                    flag.name, flag.state
                ));
            } else if flag.stability.as_deref() == Some("stable") {
                disabled_stable.push(flag.name.clone());
            }
        }
    }
    if !problems.is_empty() {
        return check.fail(
            problems.join("; "),
            "rabbitmqctl enable_feature_flag stream_queue (scripts/broker does it at start), \
             or enable_feature_flag all",
        );
    }
    if !disabled_stable.is_empty() {
        return check.warn(
            format!(
                "stream_queue and quorum_queue are enabled; stable flags still disabled: {}",
                disabled_stable.join(", ")
            ),
            "after an upgrade, once every node runs the new version: rabbitmqctl \
             enable_feature_flag all",
        );
    }
    check.ok(format!(
        "every feature flag Warren needs is enabled ({} flags, stream_queue among them)",
        flags.len()
    ))
}

async fn plugins_check(config: &Config, management: &Management) -> Check {
    let check = Check::new("plugins", None);
    let nodes = match management.nodes().await {
        Ok(nodes) => nodes,
        Err(err) => return check.fail(err.to_string(), api_fix(&err)),
    };
    let certificate_login =
        config.broker.tls.cert_file.is_some() && !config.broker.url.contains("auth_mechanism=");
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    for node in nodes.iter().filter(|n| n.running != Some(false)) {
        let has = |plugin: &str| node.has_plugin(plugin);
        if !has("rabbitmq_management") {
            problems.push(format!("{}: rabbitmq_management is not enabled", node.name));
        }
        if certificate_login && !has("rabbitmq_auth_mechanism_ssl") {
            problems.push(format!(
                "{}: rabbitmq_auth_mechanism_ssl is not enabled, and the config logs in with \
                 a client certificate (SASL EXTERNAL)",
                node.name
            ));
        }
        if !has("rabbitmq_prometheus") {
            warnings.push(format!(
                "{}: rabbitmq_prometheus is not enabled (no metrics)",
                node.name
            ));
        }
    }
    let names: BTreeSet<&str> = nodes
        .iter()
        .flat_map(|n| n.enabled_plugins.iter().map(String::as_str))
        .collect();
    let listed = names.into_iter().collect::<Vec<_>>().join(", ");
    if !problems.is_empty() {
        return check.fail(
            problems.join("; "),
            "rabbitmq-plugins enable <plugin> on each node (config/enabled_plugins lists \
             Warren's)",
        );
    }
    if !warnings.is_empty() {
        return check.warn(
            format!("{}; enabled: {listed}", warnings.join("; ")),
            "rabbitmq-plugins enable rabbitmq_prometheus",
        );
    }
    check.ok(format!("enabled on {} node(s): {listed}", nodes.len()))
}

async fn consumer_timeout_check(
    config: &Config,
    management: &Management,
    version: Option<(u32, u32, u32)>,
    queues: &[String],
) -> Check {
    let check = Check::new("consumer_timeout", None);
    let needed = needed_consumer_timeout(config, queues);
    let needed_text = humantime::format_duration(needed).to_string();
    let classic = queues
        .iter()
        .any(|q| config.queue(q).queue_type == QueueType::Classic);
    // Where workers cannot set their own consumer timeout, the broker's must be longer.
    let broker_wide_applies = match version {
        Some((3, minor, _)) if minor < 12 => true,
        Some((3, _, _)) => classic,
        Some(_) => false,
        None => true,
    };
    let fix = format!(
        "set consumer_timeout in rabbitmq.conf to at least {} ms ({needed_text}) and restart \
         the broker, or lower job_timeout",
        needed.as_millis()
    );
    let effective = match management.effective_config().await {
        Ok(effective) => effective,
        Err(err) => return check.fail(err.to_string(), api_fix(&err)),
    };
    let Some(effective) = effective else {
        let detail = format!(
            "this RabbitMQ does not tell its consumer_timeout over the API (3.10); a worker of \
             the configured queues may hold a delivery up to {needed_text}"
        );
        return match broker_wide_applies {
            true => check.warn(detail, format!("make sure of it by hand: {fix}")),
            false => check.ok(detail),
        };
    };
    let configured = consumer_timeout_of(&effective);
    let shown = match configured {
        ConsumerTimeout::Millis(ms) => {
            humantime::format_duration(Duration::from_millis(ms)).to_string()
        }
        ConsumerTimeout::Off => "off".to_owned(),
        ConsumerTimeout::Unknown => "unknown (not in the effective configuration)".to_owned(),
    };
    let detail = format!(
        "broker: {shown}; a worker of the configured queues may hold a delivery up to \
         {needed_text}"
    );
    if !broker_wide_applies {
        return check.ok(format!(
            "{detail}; workers set x-consumer-timeout on each quorum consumer, so the \
             broker-wide value does not bind them"
        ));
    }
    match configured {
        ConsumerTimeout::Millis(ms) if Duration::from_millis(ms) < needed => check.fail(
            format!("{detail}: the broker would take deliveries back from running jobs"),
            fix,
        ),
        ConsumerTimeout::Unknown => check.warn(detail, format!("make sure of it by hand: {fix}")),
        _ => check.ok(detail),
    }
}

/// The longest a worker consuming every one of `queues` asks the broker to let it hold a
/// delivery: [`Config::consumer_timeout`] with each queue first.
pub fn needed_consumer_timeout(config: &Config, queues: &[String]) -> Duration {
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    (0..names.len())
        .map(|i| {
            let mut order = names.clone();
            order.swap(0, i);
            config.consumer_timeout(&order)
        })
        .max()
        .unwrap_or_default()
}

/// The `rabbit` application's consumer_timeout in `/api/config/effective`.
#[derive(Debug, PartialEq, Eq)]
enum ConsumerTimeout {
    Millis(u64),
    Off,
    Unknown,
}

fn consumer_timeout_of(effective: &str) -> ConsumerTimeout {
    let Some(start) = effective.find("{consumer_timeout,") else {
        return ConsumerTimeout::Unknown;
    };
    let value: String = effective[start + "{consumer_timeout,".len()..]
        .chars()
        .take_while(|c| *c != '}')
        .filter(|c| !c.is_whitespace())
        .collect();
    match value.parse::<u64>() {
        Ok(ms) => ConsumerTimeout::Millis(ms),
        Err(_) if matches!(value.as_str(), "false" | "undefined" | "infinity") => {
            ConsumerTimeout::Off
        }
        Err(_) => ConsumerTimeout::Unknown,
    }
}

/// What to do when the API refused a request.
fn api_fix(err: &ManagementError) -> &'static str {
    match err {
        ManagementError::Forbidden { .. } | ManagementError::Unauthorized { .. } => {
            "run doctor with an administrator's management credentials"
        }
        _ => "check the management API (management.url)",
    }
}

async fn exchanges_check(management: &Management) -> Check {
    let check = Check::new("exchanges", None);
    let mut deliver_args = Map::new();
    deliver_args.insert(
        "alternate-exchange".into(),
        Value::String(topology::UNROUTABLE.into()),
    );
    let expected = [
        (topology::JOBS_EXCHANGE, "direct", Map::new()),
        (topology::DEAD_EXCHANGE, "direct", Map::new()),
        (topology::UNROUTABLE, "fanout", Map::new()),
        (topology::DELAY_DELIVER_EXCHANGE, "topic", deliver_args),
        (topology::CONTROL_EXCHANGE, "fanout", Map::new()),
    ];
    let mut problems = Vec::new();
    for (name, kind, args) in &expected {
        match management.exchange(name).await {
            Ok(Some(found)) => {
                if found.kind != *kind {
                    problems.push(format!("`{name}` is {}, not {kind}", found.kind));
                }
                problems.extend(argument_differences(name, args, &found.arguments));
            }
            Ok(None) => problems.push(format!("`{name}` does not exist")),
            Err(err) => return check.fail(err.to_string(), api_fix(&err)),
        }
    }
    check.judged(
        &problems,
        "warren.jobs, warren.dead, warren.unroutable, warren.delay.deliver and warren.control \
         are as Warren declares them",
        "run `warren topology apply` as the admin user (an exchange with other settings must \
         be deleted first)",
    )
}

async fn delay_levels_check(management: &Management) -> Check {
    let check = Check::new("delay_levels", None);
    let answers = join_all((0..delay::LEVELS).map(|level| async move {
        let name = topology::delay_level(level);
        let queue = management.queue(&name).await?;
        let exchange = management.exchange(&name).await?;
        let into_queue = management.queue_bindings(&name).await?;
        let onward = management.exchange_bindings(&name).await?;
        Ok::<_, ManagementError>((level, name, queue, exchange, into_queue, onward))
    }))
    .await;
    let mut problems = Vec::new();
    for answer in answers {
        let (level, name, queue, exchange, into_queue, onward) = match answer {
            Ok(found) => found,
            Err(err) => return check.fail(err.to_string(), api_fix(&err)),
        };
        match queue {
            Some(queue) => problems.extend(argument_differences(
                &name,
                &expected_json(&topology::delay_queue_arguments(level)),
                &queue.arguments,
            )),
            None => problems.push(format!("queue `{name}` does not exist")),
        }
        match exchange {
            Some(exchange) if exchange.kind != "topic" => {
                problems.push(format!("exchange `{name}` is {}, not topic", exchange.kind));
            }
            Some(_) => {}
            None => problems.push(format!("exchange `{name}` does not exist")),
        }
        let into = delay::level_pattern(level, true);
        if !has_binding(into_queue.as_deref(), &name, &name, &into) {
            problems.push(format!(
                "queue `{name}` is not bound from `{name}` with `{into}`"
            ));
        }
        let next = match level {
            0 => topology::DELAY_DELIVER_EXCHANGE.to_owned(),
            _ => topology::delay_level(level - 1),
        };
        let pass = delay::level_pattern(level, false);
        if !has_binding(onward.as_deref(), &name, &next, &pass) {
            problems.push(format!(
                "exchange `{name}` is not bound to `{next}` with `{pass}`"
            ));
        }
    }
    check.judged(
        &problems,
        &format!(
            "all {} delay levels ({} … {}) exist with their TTLs and bindings",
            delay::LEVELS,
            topology::delay_level(0),
            topology::delay_level(delay::LEVELS - 1)
        ),
        "run `warren topology apply` as the admin user",
    )
}

fn has_binding(bindings: Option<&[Binding]>, source: &str, destination: &str, key: &str) -> bool {
    bindings
        .unwrap_or_default()
        .iter()
        .any(|b| b.source == source && b.destination == destination && b.routing_key == key)
}

/// One check per work queue, per dead-letter queue, and for `warren.unroutable`.
async fn queue_checks(config: &Config, management: &Management, queues: &[String]) -> Vec<Check> {
    // (queue, its arguments, the bindings into it, its type)
    type Expected = (String, FieldTable, Vec<(String, String)>, &'static str);
    let mut expected: Vec<Expected> = Vec::new();
    for queue in queues {
        let settings = config.queue(queue);
        let fix_type = settings.queue_type.as_str();
        expected.push((
            queue.clone(),
            topology::work_queue_arguments(queue, &settings),
            topology::bindings_of(queue),
            fix_type,
        ));
        let dead = topology::dead_queue(queue);
        expected.push((
            dead.clone(),
            topology::dead_queue_arguments(&settings),
            topology::bindings_of(&dead),
            fix_type,
        ));
    }
    expected.push((
        topology::UNROUTABLE.to_owned(),
        topology::unroutable_queue_arguments(),
        topology::bindings_of(topology::UNROUTABLE),
        "quorum",
    ));
    let answers = join_all(expected.iter().map(|(name, ..)| async move {
        let info = management.queue(name).await?;
        let bindings = match info {
            Some(_) => management.queue_bindings(name).await?,
            None => None,
        };
        Ok::<_, ManagementError>((info, bindings))
    }))
    .await;
    expected
        .iter()
        .zip(answers)
        .map(|((name, args, bindings, queue_type), answer)| {
            let check = Check::new("queue", Some(name));
            let (info, found_bindings) = match answer {
                Ok(found) => found,
                Err(err) => return check.fail(err.to_string(), api_fix(&err)),
            };
            let Some(info) = info else {
                return check.fail(
                    format!(
                        "queue `{name}` does not exist in vhost `{}`",
                        management.vhost()
                    ),
                    "run `warren topology apply --queue NAME` as the admin user",
                );
            };
            let mut problems = argument_differences(name, &expected_json(args), &info.arguments);
            if info.durable == Some(false) {
                problems.push(format!("`{name}` is not durable"));
            }
            for (exchange, key) in bindings {
                if !has_binding(found_bindings.as_deref(), exchange, name, key) {
                    problems.push(format!(
                        "`{name}` is not bound from `{exchange}` with `{key}`"
                    ));
                }
            }
            let migrate = match problems.iter().any(|p| p.contains("argument")) {
                true => "RabbitMQ cannot change a queue's arguments in place: stop its workers \
                         and run `warren topology migrate` as the admin user (it keeps the \
                         messages), or change the config to match"
                    .to_owned(),
                false => "run `warren topology apply` as the admin user".to_owned(),
            };
            check.judged(
                &problems,
                &format!(
                    "{queue_type} queue with Warren's arguments and bindings ({} message(s) as last sampled)",
                    info.messages.unwrap_or(0)
                ),
                &migrate,
            )
        })
        .collect()
}

/// Each difference between Warren's arguments and the queue's (or exchange's), one sentence
/// each, mentioning "argument".
fn argument_differences(
    name: &str,
    expected: &Map<String, Value>,
    found: &Map<String, Value>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (key, want) in expected {
        match found.get(key) {
            None => problems.push(format!("`{name}` lacks argument {key} = {want}")),
            Some(have) if !same_value(want, have) => problems.push(format!(
                "`{name}` has argument {key} = {have}, Warren declares {want}"
            )),
            Some(_) => {}
        }
    }
    for (key, have) in found {
        if !expected.contains_key(key) {
            problems.push(format!(
                "`{name}` has argument {key} = {have}, which Warren does not declare"
            ));
        }
    }
    problems
}

/// Numbers compare as numbers (the API may print `10` or `10.0`), the rest as they are.
fn same_value(want: &Value, have: &Value) -> bool {
    match (want.as_i64(), have.as_i64(), have.as_f64()) {
        (Some(w), Some(h), _) => w == h,
        (Some(w), None, Some(h)) => (w as f64 - h).abs() < f64::EPSILON,
        _ => want == have,
    }
}

/// An AMQP argument table as the API shows it.
fn expected_json(table: &FieldTable) -> Map<String, Value> {
    table
        .inner()
        .iter()
        .map(|(key, value)| (key.as_str().to_owned(), amqp_json(value)))
        .collect()
}

fn amqp_json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ShortString(s) => Value::String(s.as_str().to_owned()),
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        other => Value::String(format!("{other:?}")),
    }
}

/// The broker.url user, then each `--user`.
async fn permission_checks(
    config: &Config,
    management: &Management,
    queues: &[String],
    users: &[UserToCheck],
) -> Vec<Check> {
    let mut to_check = Vec::new();
    let own = config
        .broker
        .url
        .parse::<lapin::uri::AMQPUri>()
        .ok()
        .map(|uri| uri.authority.userinfo.username);
    let certificate_login =
        config.broker.tls.cert_file.is_some() && !config.broker.url.contains("auth_mechanism=");
    let mut checks = Vec::new();
    match own {
        Some(_) if certificate_login => checks.push(Check::new("permissions", None).warn(
            "Warren logs in with a client certificate: the user is the certificate's name, \
                 which doctor does not know",
            "name it with --user NAME",
        )),
        Some(name) if !users.iter().any(|u| u.name == name) => {
            to_check.push(UserToCheck { name, role: None })
        }
        _ => {}
    }
    to_check.extend(users.iter().cloned());
    for user in &to_check {
        checks.push(user_check(management, queues, user).await);
    }
    checks
}

async fn user_check(management: &Management, queues: &[String], user: &UserToCheck) -> Check {
    let check = Check::new("permissions", Some(&user.name));
    let vhost = management.vhost();
    let permissions = match management.user_permissions(&user.name).await {
        Ok(Some(permissions)) => permissions,
        Ok(None) => {
            return check.fail(
                format!("user `{}` does not exist", user.name),
                "create it with the permissions of config/definitions.json (README, \"Users \
                 and permissions\")",
            );
        }
        Err(err) => return check.fail(err.to_string(), api_fix(&err)),
    };
    let Some(permission) = permissions.iter().find(|p| p.vhost == vhost) else {
        return check.fail(
            format!("user `{}` has no permissions in vhost `{vhost}`", user.name),
            format!(
                "rabbitmqctl set_permissions -p {vhost} {} <configure> <write> <read>, as in \
                 config/definitions.json",
                user.name
            ),
        );
    };
    let patterns = match Patterns::new(permission) {
        Ok(patterns) => patterns,
        Err(detail) => {
            return check.warn(
                detail,
                "check the user's permissions by hand (README, \"Users and permissions\")",
            );
        }
    };
    let (role, inferred) = match user.role {
        Some(role) => (role, false),
        None if queues.iter().any(|q| patterns.read.is_match(q)) => (Role::Worker, true),
        None => (Role::Dispatcher, true),
    };
    let (mut missing, mut lacking) = (Vec::new(), Vec::new());
    for (right, resource, purpose) in needs(role, queues) {
        let regex = match right {
            "configure" => &patterns.configure,
            "write" => &patterns.write,
            _ => &patterns.read,
        };
        if regex.is_match(&resource) {
            continue;
        }
        match purpose {
            None => missing.push(format!("{right} `{resource}`")),
            Some(purpose) => lacking.push(format!("{right} `{resource}` (for {purpose})")),
        }
    }
    let article = match role {
        Role::Admin => "an",
        _ => "a",
    };
    let how = match inferred {
        true => format!(
            "checked as {article} {} (inferred from its read permission; NAME={} to choose)",
            role.as_str(),
            match role {
                Role::Worker => "dispatcher",
                _ => "worker",
            }
        ),
        false => format!("checked as {article} {}", role.as_str()),
    };
    let shown = format!(
        "configure `{}` write `{}` read `{}`",
        permission.configure, permission.write, permission.read
    );
    let fix = format!(
        "rabbitmqctl set_permissions -p {vhost} {} with patterns that allow them (see \
         config/definitions.json; list your queues in a worker's read pattern)",
        user.name
    );
    match (missing.is_empty(), lacking.is_empty()) {
        (true, true) => check.ok(format!("{how}: has what it needs ({shown})")),
        (true, false) => check.warn(
            format!(
                "{how}: has what it needs to run, but may not {} ({shown})",
                lacking.join(", ")
            ),
            fix,
        ),
        (false, _) => {
            missing.extend(lacking);
            check.fail(
                format!("{how}: may not {} ({shown})", missing.join(", ")),
                fix,
            )
        }
    }
}

/// What each role needs: (right, resource name, what it is for when it is not essential —
/// a missing one of those is a warning).
fn needs(role: Role, queues: &[String]) -> Vec<(&'static str, String, Option<&'static str>)> {
    let top_level = topology::delay_level(delay::LEVELS - 1);
    // A server-named queue (a worker's control queue, `warren inflight`).
    let server_named = "amq.gen-warren-doctor".to_owned();
    let mut needs = vec![("write", topology::JOBS_EXCHANGE.to_owned(), None)];
    match role {
        Role::Dispatcher => {
            needs.push(("write", top_level, Some("`warren submit --delay/--at`")));
            needs.push((
                "write",
                topology::CONTROL_EXCHANGE.to_owned(),
                Some("`warren inflight`"),
            ));
        }
        Role::Worker => {
            needs.push(("write", top_level, None));
            needs.push(("write", topology::DEAD_EXCHANGE.to_owned(), None));
            needs.extend(queues.iter().map(|q| ("read", q.clone(), None)));
            needs.push((
                "write",
                "amq.default".to_owned(),
                Some("answering `warren submit --wait`"),
            ));
            let inflight = Some("answering `warren inflight`");
            needs.push(("read", topology::CONTROL_EXCHANGE.to_owned(), inflight));
            for right in ["configure", "write", "read"] {
                needs.push((right, server_named.clone(), inflight));
            }
        }
        Role::Admin => {
            let mut names = vec![
                topology::JOBS_EXCHANGE.to_owned(),
                topology::DEAD_EXCHANGE.to_owned(),
                topology::UNROUTABLE.to_owned(),
                topology::DELAY_DELIVER_EXCHANGE.to_owned(),
                topology::CONTROL_EXCHANGE.to_owned(),
            ];
            names.extend((0..delay::LEVELS).map(topology::delay_level));
            for queue in queues {
                names.push(queue.clone());
                names.push(topology::dead_queue(queue));
                names.push(topology::migration_queue(queue));
            }
            needs.clear();
            for name in names {
                for right in ["configure", "write", "read"] {
                    needs.push((right, name.clone(), None));
                }
            }
        }
    }
    needs
}

/// A permission's three patterns, compiled as RabbitMQ applies them.
struct Patterns {
    configure: regex::Regex,
    write: regex::Regex,
    read: regex::Regex,
}

impl Patterns {
    fn new(permission: &Permission) -> Result<Patterns, String> {
        let compile = |what: &str, pattern: &str| {
            // RabbitMQ treats an empty pattern as `^$` (nothing).
            let pattern = if pattern.is_empty() { "^$" } else { pattern };
            regex::Regex::new(pattern).map_err(|err| {
                format!(
                    "the {what} pattern `{pattern}` of user `{}` cannot be evaluated here \
                     (RabbitMQ uses PCRE): {err}",
                    permission.user
                )
            })
        };
        Ok(Patterns {
            configure: compile("configure", &permission.configure)?,
            write: compile("write", &permission.write)?,
            read: compile("read", &permission.read)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_consumer_timeout_is_read_from_the_effective_config() {
        let text = "[{rabbit,\n     [{collect_statistics_interval,5000},\n      \
                    {consumer_timeout,1800000},\n      {heartbeat,60}]}]";
        assert_eq!(
            consumer_timeout_of(text),
            ConsumerTimeout::Millis(1_800_000)
        );
        assert_eq!(
            consumer_timeout_of("{consumer_timeout,false}"),
            ConsumerTimeout::Off
        );
        assert_eq!(consumer_timeout_of("[]"), ConsumerTimeout::Unknown);
    }

    #[test]
    fn users_come_with_an_optional_role() {
        assert_eq!(
            UserToCheck::parse("warren-worker").expect("name"),
            UserToCheck {
                name: "warren-worker".into(),
                role: None
            }
        );
        assert_eq!(
            UserToCheck::parse("a=b=dispatcher").expect("role"),
            UserToCheck {
                name: "a=b".into(),
                role: Some(Role::Dispatcher)
            }
        );
        assert!(UserToCheck::parse("").is_err());
    }

    #[test]
    fn the_shipped_users_have_what_their_roles_need() {
        let definitions: Value =
            serde_json::from_str(include_str!("../../config/definitions.json")).expect("json");
        let queues = vec!["default".to_owned(), "demo".to_owned()];
        let permissions = definitions["permissions"].as_array().expect("permissions");
        for (user, role) in [
            ("warren-admin", Role::Admin),
            ("warren-dispatcher", Role::Dispatcher),
            ("warren-worker", Role::Worker),
        ] {
            let p = permissions
                .iter()
                .find(|p| p["user"] == user)
                .expect("user listed");
            let permission = Permission {
                user: user.into(),
                vhost: "/".into(),
                configure: p["configure"].as_str().expect("text").into(),
                write: p["write"].as_str().expect("text").into(),
                read: p["read"].as_str().expect("text").into(),
            };
            let patterns = Patterns::new(&permission).expect("compiles");
            for (right, resource, _) in needs(role, &queues) {
                let regex = match right {
                    "configure" => &patterns.configure,
                    "write" => &patterns.write,
                    _ => &patterns.read,
                };
                assert!(regex.is_match(&resource), "{user}: {right} {resource}");
            }
        }
        // The dispatcher may not do a worker's job.
        let dispatcher = Patterns::new(&Permission {
            write: "^warren\\.jobs$".into(),
            read: "".into(),
            ..Permission::default()
        })
        .expect("compiles");
        assert!(!dispatcher.write.is_match("warren.dead"));
        assert!(!dispatcher.read.is_match("demo"), "empty means nothing");
    }

    #[test]
    fn argument_differences_name_each_argument() {
        let expected = expected_json(&topology::work_queue_arguments(
            "q",
            &warren_core::config::QueueConfig::default(),
        ));
        let mut found = expected.clone();
        assert!(argument_differences("q", &expected, &found).is_empty());
        found.insert("x-delivery-limit".into(), Value::from(3));
        found.insert("x-max-length".into(), Value::from(100));
        found.remove("x-overflow");
        let problems = argument_differences("q", &expected, &found);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().all(|p| p.contains("argument")));
    }
}
