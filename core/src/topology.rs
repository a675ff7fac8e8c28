//! The AMQP topology: every exchange, queue, binding and `x-` argument Warren uses is spelled
//! here, and nowhere else.
//!
//! ```text
//!  submit ──► warren.jobs (direct) ──key=<queue>──► <queue>  (quorum, x-delivery-limit)
//!                                                     │  ▲
//!          worker: retry with delay d ────────────────┼──┼──► warren.delay.21 … .00 (topic)
//!                                                     │  │        └─ TTL queues, see `delay`
//!                                                     │  └── warren.delay.deliver (topic)
//!          worker: permanent / exhausted / malformed  │
//!          broker: delivery limit reached ────────────┴──► warren.dead (direct) ──► <queue>.dead
//! ```
//!
//! Everything is declared idempotently by [`declare`] (`warren topology apply`, as the admin
//! user); a worker starts with [`ensure`], which checks passively and declares only what is
//! missing, so that a worker user without configure rights runs once the admin applied the
//! topology. A second run of [`declare`] changes nothing. A queue
//! that already exists with other arguments (say `classic` where Warren wants `quorum`) makes
//! RabbitMQ close the channel with `PRECONDITION_FAILED`; [`declare`] turns that into
//! [`TopologyError::Mismatch`] naming the queue and the argument.
//!
//! A delayed job whose work queue was deleted meanwhile matches no binding on
//! `warren.delay.deliver`; that exchange's alternate exchange sends it to the
//! `warren.unroutable` queue, where it can be seen, instead of leaving it stuck in a delay
//! level.
//!
//! Why the arguments are what they are:
//! - quorum queues replicate and fsync, so a confirmed job survives a broker crash
//!   (<https://www.rabbitmq.com/docs/quorum-queues>);
//! - `x-delivery-limit` dead-letters a job that crashed its worker that many times, instead of
//!   redelivering it forever (3.10 has no default);
//! - `x-dead-letter-strategy = at-least-once` with `x-overflow = reject-publish` makes the
//!   broker's own dead-lettering (delivery limit, delay TTLs) safe against a crash mid-move
//!   (<https://www.rabbitmq.com/docs/quorum-queues#dead-lettering>); it needs the
//!   `stream_queue` feature flag, which `scripts/broker` enables;
//! - `<queue>.dead` and `warren.unroutable` (when quorum) have `x-delivery-limit =`
//!   [`READ_SAFE_DELIVERY_LIMIT`] (2,147,483,647) and no dead-letter target: they are read by
//!   fetching without acking (`warren peek`, the management UI), and a message handed back
//!   by a closed channel or a reject counts as a delivery (on 3.10 a nack too). Without the
//!   argument RabbitMQ 4.x applies its default limit of 20 and *drops* each message after
//!   its 21st read; `-1`, unlimited on 4.x, makes 3.10 drop it on its first return.
//!   `i32::MAX` means the same on both versions, so Warren declares the same arguments on
//!   3.10 and 4.x. Classic queues have no delivery limit (and refuse the argument), so
//!   classic dead-letter queues get none.
//!
//! RabbitMQ cannot change a queue's arguments in place: a queue declared by an older Warren
//! (a dead-letter queue without the limit, say) is a [`TopologyError::Mismatch`] whose message
//! says how to replace it.

use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use crate::config::{QueueConfig, QueueType};
use crate::delay;

/// Jobs are published here with the queue's name as routing key.
pub const JOBS_EXCHANGE: &str = "warren.jobs";
/// Dead jobs are published here with `<queue>.dead` as routing key.
pub const DEAD_EXCHANGE: &str = "warren.dead";
/// The last hop of a delay: routes a message whose time is up to its work queue.
pub const DELAY_DELIVER_EXCHANGE: &str = "warren.delay.deliver";
/// Exchange and queue that catch a delayed job whose work queue no longer exists, so that it
/// is kept in sight instead of circling in the delay levels.
pub const UNROUTABLE: &str = "warren.unroutable";
/// Fanout exchange of control requests to every worker process (`warren inflight`): each
/// worker binds a queue of its own to it ([`control_queue_arguments`]; docs/PROTOCOL.md,
/// "In-flight jobs").
pub const CONTROL_EXCHANGE: &str = "warren.control";
/// The most control requests a worker's control queue holds; older ones are dropped.
pub const CONTROL_QUEUE_MAX: i64 = 16;
/// How long a control request waits in a worker's control queue before it is dropped (its
/// requester has stopped listening by then).
pub const CONTROL_REQUEST_TTL_MS: i64 = 10_000;
/// Suffix of every dead-letter queue.
pub const DEAD_SUFFIX: &str = ".dead";
/// Longest queue name: the delay routing key adds 44 bytes and must fit in 255.
pub const MAX_QUEUE_NAME: usize = 255 - 2 * delay::LEVELS as usize;
/// The `x-delivery-limit` of the queues that are only ever read, never worked off
/// (`<queue>.dead`, [`UNROUTABLE`]): high enough that reading them never drops a message,
/// and the same on RabbitMQ 3.10 and 4.x (where `-1` would mean "unlimited" on 4.x but "drop
/// on the first return" on 3.10).
pub const READ_SAFE_DELIVERY_LIMIT: i64 = i32::MAX as i64;

/// The dead-letter queue of `queue`.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}{DEAD_SUFFIX}")
}

/// The exchange, and the queue of the same name, of delay level `level`.
pub fn delay_level(level: u32) -> String {
    format!("warren.delay.{level:02}")
}

/// Where a message is published to wait `seconds` before it reaches `queue`:
/// `(exchange, routing key)`.
pub fn delay_route(seconds: u64, queue: &str) -> (String, String) {
    (
        delay_level(delay::LEVELS - 1),
        delay::routing_key(seconds, queue),
    )
}

/// Checks that `name` can be a Warren work queue.
///
/// The delay routing key uses dots as word separators and `*`/`#` as wildcards, so a name is
/// one or more dot-separated words of letters, digits, `-` and `_`.
pub fn validate_queue_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_QUEUE_NAME {
        return Err(NameError::Length(name.len()));
    }
    if name.starts_with("amq.") || name.starts_with("warren.") {
        return Err(NameError::Reserved);
    }
    if name.ends_with(DEAD_SUFFIX) {
        return Err(NameError::DeadSuffix);
    }
    let word_ok = |w: &str| {
        !w.is_empty()
            && w.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !name.split('.').all(word_ok) {
        return Err(NameError::Characters);
    }
    Ok(())
}

/// Why a queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("queue names are 1 to {MAX_QUEUE_NAME} bytes long (this one has {0})")]
    Length(usize),
    #[error("queue names starting with `amq.` or `warren.` are reserved")]
    Reserved,
    #[error("queue names ending in `.dead` are reserved for dead-letter queues")]
    DeadSuffix,
    #[error(
        "queue names are dot-separated words of ASCII letters, digits, `-` and `_` \
         (no empty words, no `*` or `#`)"
    )]
    Characters,
}

/// The arguments of work queue `name`.
pub fn work_queue_arguments(name: &str, queue: &QueueConfig) -> FieldTable {
    let mut args = Arguments::of_type(queue.queue_type);
    args.string("x-dead-letter-exchange", DEAD_EXCHANGE);
    args.string("x-dead-letter-routing-key", &dead_queue(name));
    if queue.queue_type == QueueType::Quorum {
        args.long("x-delivery-limit", i64::from(queue.delivery_limit));
        args.at_least_once_dead_lettering();
    }
    // Quorum queues take priorities without an argument (RabbitMQ 4.0+; see
    // `priority_support`); a classic queue is a priority queue only with this one.
    if let (QueueType::Classic, Some(max)) = (queue.queue_type, queue.max_priority) {
        args.long("x-max-priority", i64::from(max));
    }
    args.0
}

/// The RabbitMQ version a connection's broker announced in `connection.start` (its server
/// property `version`, e.g. `4.3.6`), as (major, minor); `None` when it did not say.
pub fn broker_version(connection: &Connection) -> Option<(u32, u32)> {
    let properties = connection.configuration().server_properties();
    let text = match properties.inner().get("version")? {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        _ => return None,
    };
    let mut parts = text.split('.').map(|part| part.trim().parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
}

/// Whether the broker (major version `major`, if known) can give queue `name` the priorities
/// its config asks for (`max_priority`): a classic queue always can (`x-max-priority`); a
/// quorum queue only on RabbitMQ 4.0 and later, where every quorum queue has two priority
/// levels (0–4 normal, 5 and above high) and no argument is declared. RabbitMQ 3.x quorum
/// queues ignore priorities, so there the config is refused rather than silently ignored.
pub fn priority_support(
    name: &str,
    queue: &QueueConfig,
    major: Option<u32>,
) -> Result<(), TopologyError> {
    match (queue.queue_type, queue.max_priority, major) {
        (QueueType::Quorum, Some(_), Some(major)) if major < 4 => {
            Err(TopologyError::NoPriorities {
                queue: name.to_owned(),
                major,
            })
        }
        _ => Ok(()),
    }
}

/// [`priority_support`] for every queue, on the broker of `connection`.
pub fn check_priorities(
    connection: &Connection,
    queues: &[(&str, &QueueConfig)],
) -> Result<(), TopologyError> {
    let major = broker_version(connection).map(|(major, _)| major);
    queues
        .iter()
        .try_for_each(|(name, queue)| priority_support(name, queue, major))
}

/// The arguments of a worker process's control queue: server-named (`amq.gen-…`), exclusive
/// and auto-delete (it lives as long as the worker's connection), bound to
/// [`CONTROL_EXCHANGE`]. Classic (exclusive queues cannot be replicated), holding at most
/// [`CONTROL_QUEUE_MAX`] requests for at most [`CONTROL_REQUEST_TTL_MS`]: whoever may publish
/// to the control exchange can make it cost the broker and the worker only so much.
pub fn control_queue_arguments() -> FieldTable {
    let mut args = Arguments::of_type(QueueType::Classic);
    args.long("x-max-length", CONTROL_QUEUE_MAX);
    args.long("x-message-ttl", CONTROL_REQUEST_TTL_MS);
    args.0
}

/// The arguments of [`DELAY_DELIVER_EXCHANGE`]: what matches no work queue goes to
/// [`UNROUTABLE`].
pub fn deliver_exchange_arguments() -> FieldTable {
    let mut args = Arguments(FieldTable::default());
    args.string("alternate-exchange", UNROUTABLE);
    args.0
}

/// The arguments of a dead-letter queue: same type as its work queue, no onward route, and
/// (quorum) a delivery limit that reading it never reaches.
pub fn dead_queue_arguments(queue: &QueueConfig) -> FieldTable {
    read_only_queue(queue.queue_type).0
}

/// The arguments of the [`UNROUTABLE`] queue: quorum, no onward route, a delivery limit that
/// reading it never reaches.
pub fn unroutable_queue_arguments() -> FieldTable {
    read_only_queue(QueueType::Quorum).0
}

/// A queue whose messages wait for someone to look at them: reads must not use up a
/// delivery limit (see the module documentation).
fn read_only_queue(queue_type: QueueType) -> Arguments {
    let mut args = Arguments::of_type(queue_type);
    if queue_type == QueueType::Quorum {
        args.long("x-delivery-limit", READ_SAFE_DELIVERY_LIMIT);
    }
    args
}

/// The arguments of delay level `level`'s queue: a fixed TTL, then on to the next level.
pub fn delay_queue_arguments(level: u32) -> FieldTable {
    let next = match level {
        0 => DELAY_DELIVER_EXCHANGE.to_owned(),
        _ => delay_level(level - 1),
    };
    let ttl_ms = delay::level_ttl(level).as_millis();
    let mut args = Arguments::of_type(QueueType::Quorum);
    args.long("x-message-ttl", i64::try_from(ttl_ms).unwrap_or(i64::MAX));
    args.string("x-dead-letter-exchange", &next);
    args.at_least_once_dead_lettering();
    args.0
}

/// One builder for `x-` argument tables.
struct Arguments(FieldTable);

impl Arguments {
    fn of_type(queue_type: QueueType) -> Self {
        let mut args = Arguments(FieldTable::default());
        args.string("x-queue-type", queue_type.as_str());
        args
    }

    fn string(&mut self, key: &str, value: &str) {
        self.0
            .insert(key.into(), AMQPValue::LongString(LongString::from(value)));
    }

    fn long(&mut self, key: &str, value: i64) {
        self.0.insert(key.into(), AMQPValue::LongLongInt(value));
    }

    fn at_least_once_dead_lettering(&mut self) {
        self.string("x-dead-letter-strategy", "at-least-once");
        self.string("x-overflow", "reject-publish");
    }
}

/// One thing [`declare`] declared, for `warren topology apply` to print.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "declared", rename_all = "lowercase")]
pub enum Declared {
    Exchange {
        name: String,
        kind: &'static str,
    },
    Queue {
        name: String,
        queue_type: &'static str,
    },
    Binding {
        source: String,
        destination: String,
        key: String,
    },
}

impl std::fmt::Display for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Declared::Exchange { name, kind } => write!(f, "exchange {name} ({kind})"),
            Declared::Queue { name, queue_type } => write!(f, "queue    {name} ({queue_type})"),
            Declared::Binding {
                source,
                destination,
                key,
            } => {
                write!(f, "binding  {source} -> {destination} [{key}]")
            }
        }
    }
}

/// What can go wrong while declaring.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("invalid queue name `{name}`: {reason}")]
    InvalidName { name: String, reason: NameError },
    #[error(
        "{what} `{name}` already exists with different settings: {detail}. {}",
        mismatch_fix(what, name, detail)
    )]
    Mismatch {
        what: &'static str,
        name: String,
        detail: String,
    },
    #[error("declaring {what}: {source}")]
    Broker { what: String, source: lapin::Error },
    #[error(
        "queue `{queue}` is configured with max_priority, but it is a quorum queue and \
         RabbitMQ {major}.x quorum queues have no priorities (4.0 and later have): set \
         type = \"classic\" for it (a durable classic queue with x-max-priority), or remove \
         max_priority"
    )]
    NoPriorities { queue: String, major: u32 },
    #[error(
        "Warren's topology is incomplete ({missing} does not exist) and this user may not \
         declare it ({detail}): run `warren topology apply` as the admin user (with this \
         worker's queues, `--queue NAME`), then start again"
    )]
    NotPermitted { missing: String, detail: String },
}

/// What the operator can do about a [`TopologyError::Mismatch`].
fn mismatch_fix(what: &str, name: &str, detail: &str) -> String {
    if what != "queue" || name.starts_with("warren.delay.") {
        return "Delete it (after draining it) or change the config to match".to_owned();
    }
    let why = match name.ends_with(DEAD_SUFFIX) || name == UNROUTABLE {
        true if detail.contains("'x-delivery-limit'") => format!(
            "It was declared by an older Warren (or by hand) without the `x-delivery-limit = \
             {READ_SAFE_DELIVERY_LIMIT}` that keeps RabbitMQ 4.x from dropping its messages \
             after 21 reads. "
        ),
        _ => String::new(),
    };
    format!(
        "{why}RabbitMQ cannot change a queue's arguments in place: stop the workers consuming \
         it and run `warren topology migrate`, which moves its messages to `{}`, declares it \
         again with Warren's arguments and moves them back (or change the config to match)",
        migration_queue(name)
    )
}

/// Where `warren topology migrate` keeps the messages of `queue` while it declares the queue
/// again (`warren.` names are reserved, so it cannot be anyone's queue).
pub fn migration_queue(queue: &str) -> String {
    format!("warren.migrate.{queue}")
}

/// The arguments of a [`migration_queue`]: quorum, and a delivery limit moving never reaches.
pub fn migration_queue_arguments() -> FieldTable {
    read_only_queue(QueueType::Quorum).0
}

/// The bindings that route messages into one of Warren's queues, as `(exchange, key)`: a
/// work queue's, a dead-letter queue's or [`UNROUTABLE`]'s, as [`declare`] makes them.
pub fn bindings_of(queue: &str) -> Vec<(String, String)> {
    if queue == UNROUTABLE {
        vec![(UNROUTABLE.to_owned(), String::new())]
    } else if queue.ends_with(DEAD_SUFFIX) {
        vec![(DEAD_EXCHANGE.to_owned(), queue.to_owned())]
    } else {
        vec![
            (JOBS_EXCHANGE.to_owned(), queue.to_owned()),
            (
                DELAY_DELIVER_EXCHANGE.to_owned(),
                delay::deliver_pattern(queue),
            ),
        ]
    }
}

/// Declares the shared exchanges, the delay levels, and each work queue with its dead-letter
/// queue and bindings. Idempotent. Returns everything declared, in order.
///
/// The channel is closed by the broker on a mismatch: use a channel of its own.
pub async fn declare(
    channel: &Channel,
    queues: &[(&str, &QueueConfig)],
) -> Result<Vec<Declared>, TopologyError> {
    let mut d = Declarer {
        channel,
        done: Vec::new(),
    };
    for (name, _) in queues {
        validate_queue_name(name).map_err(|reason| TopologyError::InvalidName {
            name: (*name).to_owned(),
            reason,
        })?;
    }
    d.exchange(JOBS_EXCHANGE, ExchangeKind::Direct).await?;
    d.exchange(DEAD_EXCHANGE, ExchangeKind::Direct).await?;
    d.exchange_with(UNROUTABLE, ExchangeKind::Fanout, FieldTable::default())
        .await?;
    d.queue(UNROUTABLE, "quorum", unroutable_queue_arguments())
        .await?;
    d.bind_queue(UNROUTABLE, UNROUTABLE, "").await?;
    d.exchange_with(
        CONTROL_EXCHANGE,
        ExchangeKind::Fanout,
        FieldTable::default(),
    )
    .await?;
    d.exchange_with(
        DELAY_DELIVER_EXCHANGE,
        ExchangeKind::Topic,
        deliver_exchange_arguments(),
    )
    .await?;
    for level in (0..delay::LEVELS).rev() {
        d.exchange(&delay_level(level), ExchangeKind::Topic).await?;
    }
    for level in (0..delay::LEVELS).rev() {
        let name = delay_level(level);
        d.queue(&name, "quorum", delay_queue_arguments(level))
            .await?;
        d.bind_queue(&name, &name, &delay::level_pattern(level, true))
            .await?;
        let next = match level {
            0 => DELAY_DELIVER_EXCHANGE.to_owned(),
            _ => delay_level(level - 1),
        };
        d.bind_exchange(&name, &next, &delay::level_pattern(level, false))
            .await?;
    }
    for (name, queue) in queues {
        let dead = dead_queue(name);
        let queue_type = queue.queue_type.as_str();
        d.queue(&dead, queue_type, dead_queue_arguments(queue))
            .await?;
        d.bind_queue(DEAD_EXCHANGE, &dead, &dead).await?;
        d.queue(name, queue_type, work_queue_arguments(name, queue))
            .await?;
        d.bind_queue(JOBS_EXCHANGE, name, name).await?;
        d.bind_queue(DELAY_DELIVER_EXCHANGE, name, &delay::deliver_pattern(name))
            .await?;
    }
    Ok(d.done)
}

/// What [`ensure`] found, or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// Everything this user may see was there already, and nothing was declared: a runtime
    /// user without configure rights (the arguments are the admin's to keep, with
    /// `warren topology apply`).
    Present,
    /// Everything was there, and declaring it again (which changes nothing, and fails on a
    /// queue with other arguments) checked the arguments: a user with configure rights.
    Verified,
    /// `missing` was not there, so everything was declared.
    Declared {
        missing: String,
        declared: Vec<Declared>,
    },
}

/// Makes sure Warren's topology for `queues` exists, declaring only when something is missing:
/// how a worker starts, whether its user may configure or not.
///
/// First Warren's exchanges and queues are checked with *passive* declares, which need no
/// configure right ([`first_missing`] says which checks a runtime user can make); a passive
/// check sees neither bindings nor arguments.
/// - Something missing: everything is declared as by [`declare`]; a user without configure
///   rights gets [`TopologyError::NotPermitted`], which names what is missing and tells to run
///   `warren topology apply` as the admin user.
/// - All there, but the user may not see everything (a runtime user on RabbitMQ 4.x):
///   [`Ensured::Present`], nothing declared.
/// - All there and all seen: declaring again checks the arguments ([`Ensured::Verified`],
///   or [`TopologyError::Mismatch`]); a user who may not declare (a runtime user on 3.10,
///   where passive declares are answered to anyone) gets `ACCESS_REFUSED`, which is fine:
///   [`Ensured::Present`].
///
/// A runtime user so costs the broker one refused operation per start (logged as a channel
/// error). Opens its own channels on `connection` (a missing item or a refusal closes one).
pub async fn ensure(
    connection: &Connection,
    queues: &[(&str, &QueueConfig)],
) -> Result<Ensured, TopologyError> {
    for (name, _) in queues {
        validate_queue_name(name).map_err(|reason| TopologyError::InvalidName {
            name: (*name).to_owned(),
            reason,
        })?;
    }
    check_priorities(connection, queues)?;
    let missing = match first_missing(connection, queues).await? {
        Seen::Missing(missing) => Some(missing),
        Seen::Partly => return Ok(Ensured::Present),
        Seen::All => None,
    };
    let channel = open_channel(connection).await?;
    let declared = match declare(&channel, queues).await {
        Ok(declared) => declared,
        Err(TopologyError::Broker { source, .. }) if is_access_refused(&source) => {
            return match missing {
                Some(missing) => Err(TopologyError::NotPermitted {
                    missing,
                    detail: source.to_string(),
                }),
                None => Ok(Ensured::Present),
            };
        }
        Err(err) => return Err(err),
    };
    let _ = channel.close(200, "declared".into()).await;
    Ok(match missing {
        Some(missing) => Ensured::Declared { missing, declared },
        None => Ensured::Verified,
    })
}

/// What [`first_missing`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// The first exchange or queue that does not exist (`exchange warren.jobs`, `queue emails`).
    Missing(String),
    /// Everything exists.
    All,
    /// What the user may see exists; the rest it may not check (refused).
    Partly,
}

/// Warren's topology for `queues`, checked by passive declares: what is missing, or how much
/// of it this user could see.
///
/// A passive declare needs no configure right, but RabbitMQ 4.3 answers it only for a name the
/// user has *some* permission on (configure, write or read), and `ACCESS_REFUSED` otherwise,
/// whether the exchange or queue exists or not; 3.10 answers anyone (both measured by
/// `tests/tests/permissions.rs`). So the checks go from what a worker needs to what only the
/// admin sees:
/// 1. the exchanges a worker publishes to ([`JOBS_EXCHANGE`], [`DEAD_EXCHANGE`], the top delay
///    level) and the work queues it consumes: a refusal here is an error
///    ([`TopologyError::Broker`], `ACCESS_REFUSED`), the worker could not work without them;
/// 2. the rest (`<queue>.dead`, [`UNROUTABLE`], [`DELAY_DELIVER_EXCHANGE`], the other delay
///    levels): a runtime user has no right on them, and the first refusal ends the checks
///    (the broker logs it as a channel error). Those are the admin's to keep, with
///    `warren topology apply`.
pub async fn first_missing(
    connection: &Connection,
    queues: &[(&str, &QueueConfig)],
) -> Result<Seen, TopologyError> {
    let channel = open_channel(connection).await?;
    let top_level = delay_level(delay::LEVELS - 1);
    let mut needed = vec![
        Item::Exchange(JOBS_EXCHANGE.to_owned()),
        Item::Exchange(DEAD_EXCHANGE.to_owned()),
        Item::Exchange(top_level.clone()),
    ];
    needed.extend(
        queues
            .iter()
            .map(|(name, _)| Item::Queue((*name).to_owned())),
    );
    for item in needed {
        match item.exists(&channel).await {
            Ok(true) => {}
            Ok(false) => return Ok(Seen::Missing(item.to_string())),
            Err(err) => return Err(broker(format!("{item} (passive check)"), err)),
        }
    }
    let mut internal: Vec<Item> = queues
        .iter()
        .map(|(name, _)| Item::Queue(dead_queue(name)))
        .collect();
    internal.push(Item::Exchange(UNROUTABLE.to_owned()));
    internal.push(Item::Queue(UNROUTABLE.to_owned()));
    internal.push(Item::Exchange(DELAY_DELIVER_EXCHANGE.to_owned()));
    for level in (0..delay::LEVELS).rev() {
        if level != delay::LEVELS - 1 {
            internal.push(Item::Exchange(delay_level(level)));
        }
        internal.push(Item::Queue(delay_level(level)));
    }
    for item in internal {
        match item.exists(&channel).await {
            Ok(true) => {}
            Ok(false) => return Ok(Seen::Missing(item.to_string())),
            Err(err) if is_access_refused(&err) => return Ok(Seen::Partly),
            Err(err) => return Err(broker(format!("{item} (passive check)"), err)),
        }
    }
    let _ = channel.close(200, "checked".into()).await;
    Ok(Seen::All)
}

/// An exchange or a queue, for [`first_missing`].
enum Item {
    Exchange(String),
    Queue(String),
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Exchange(name) => write!(f, "exchange {name}"),
            Item::Queue(name) => write!(f, "queue {name}"),
        }
    }
}

impl Item {
    /// A passive declare: `Ok(false)` when it does not exist (the broker has then closed
    /// `channel`).
    async fn exists(&self, channel: &Channel) -> Result<bool, lapin::Error> {
        let checked = match self {
            Item::Exchange(name) => {
                let passive = ExchangeDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .exchange_declare(
                        name.as_str().into(),
                        ExchangeKind::Direct,
                        passive,
                        FieldTable::default(),
                    )
                    .await
            }
            Item::Queue(name) => {
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                channel
                    .queue_declare(name.as_str().into(), passive, FieldTable::default())
                    .await
                    .map(|_| ())
            }
        };
        match checked {
            Ok(()) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(err),
        }
    }
}

async fn open_channel(connection: &Connection) -> Result<Channel, TopologyError> {
    connection
        .create_channel()
        .await
        .map_err(|err| broker("opening a channel".to_owned(), err))
}

/// True for the channel error RabbitMQ raises when the user lacks a permission
/// (`ACCESS_REFUSED`, 403): configure to declare or delete, write to publish or bind, read to
/// consume or get.
pub fn is_access_refused(error: &lapin::Error) -> bool {
    soft_error(error) == Some(AMQPSoftError::ACCESSREFUSED)
}

/// True for `NOT_FOUND` (404): a passive declare of something that does not exist.
fn is_not_found(error: &lapin::Error) -> bool {
    soft_error(error) == Some(AMQPSoftError::NOTFOUND)
}

fn soft_error(error: &lapin::Error) -> Option<AMQPSoftError> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(soft) => Some(soft.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// Runs the declarations one by one and records them.
struct Declarer<'a> {
    channel: &'a Channel,
    done: Vec<Declared>,
}

impl Declarer<'_> {
    async fn exchange(&mut self, name: &str, kind: ExchangeKind) -> Result<(), TopologyError> {
        self.exchange_with(name, kind, FieldTable::default()).await
    }

    async fn exchange_with(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        let kind_name = match kind {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            _ => "topic",
        };
        let options = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .exchange_declare(name.into(), kind, options, args)
            .await
            .map_err(|source| match precondition_failed(&source) {
                Some(detail) => TopologyError::Mismatch {
                    what: "exchange",
                    name: name.to_owned(),
                    detail,
                },
                None => broker(format!("exchange `{name}`"), source),
            })?;
        self.done.push(Declared::Exchange {
            name: name.to_owned(),
            kind: kind_name,
        });
        Ok(())
    }

    async fn queue(
        &mut self,
        name: &str,
        queue_type: &'static str,
        args: FieldTable,
    ) -> Result<(), TopologyError> {
        let options = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(name.into(), options, args)
            .await
            .map_err(|source| match precondition_failed(&source) {
                Some(detail) => TopologyError::Mismatch {
                    what: "queue",
                    name: name.to_owned(),
                    detail,
                },
                None => broker(format!("queue `{name}`"), source),
            })?;
        self.done.push(Declared::Queue {
            name: name.to_owned(),
            queue_type,
        });
        Ok(())
    }

    async fn bind_queue(
        &mut self,
        exchange: &str,
        queue: &str,
        key: &str,
    ) -> Result<(), TopologyError> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|source| broker(format!("binding `{exchange}` -> `{queue}`"), source))?;
        self.binding(exchange, queue, key);
        Ok(())
    }

    async fn bind_exchange(
        &mut self,
        source: &str,
        destination: &str,
        key: &str,
    ) -> Result<(), TopologyError> {
        self.channel
            .exchange_bind(
                destination.into(),
                source.into(),
                key.into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| broker(format!("binding `{source}` -> `{destination}`"), err))?;
        self.binding(source, destination, key);
        Ok(())
    }

    fn binding(&mut self, source: &str, destination: &str, key: &str) {
        self.done.push(Declared::Binding {
            source: source.to_owned(),
            destination: destination.to_owned(),
            key: key.to_owned(),
        });
    }
}

fn broker(what: String, source: lapin::Error) -> TopologyError {
    TopologyError::Broker { what, source }
}

/// The broker's explanation, if `error` is a `PRECONDITION_FAILED` channel close (RabbitMQ
/// says e.g. "inequivalent arg 'x-queue-type' for queue 'q' in vhost '/': received 'classic'
/// but current is 'quorum'").
fn precondition_failed(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
        {
            let text = amqp.get_message().as_str();
            Some(text.trim_start_matches("PRECONDITION_FAILED - ").to_owned())
        }
        _ => None,
    }
}

/// A name as an AMQP short string, or an error naming it when it is over 255 bytes.
pub fn short(name: &str) -> Result<ShortString, NameError> {
    ShortString::try_new(name).map_err(|_| NameError::Length(name.len()))
}

/// The arguments of a worker's consumer of a `queue_type` queue: for a quorum queue,
/// `x-consumer-timeout` in milliseconds, the longest a delivery may stay unacked before the
/// broker takes it back (see [`crate::config::Config::consumer_timeout`]). RabbitMQ 4.x answers
/// an overdue delivery with `basic.cancel` and returns it to the queue; 3.12+ honours the
/// argument too; 3.10 ignores it and closes the channel after its broker-wide
/// `consumer_timeout` instead. Classic queues: nothing — RabbitMQ 4.3 refuses the argument
/// there (`PRECONDITION_FAILED - invalid arg 'x-consumer-timeout'`), and has no consumer
/// timeout for them at all.
pub fn consumer_arguments(queue_type: QueueType, timeout: std::time::Duration) -> FieldTable {
    let mut args = Arguments(FieldTable::default());
    if queue_type == QueueType::Quorum {
        args.long(
            "x-consumer-timeout",
            i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX),
        );
    }
    args.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        assert!(validate_queue_name("emails").is_ok());
        assert!(validate_queue_name("orders.high-priority_2").is_ok());
        for bad in [
            "", "a..b", ".a", "a.", "a*", "a#", "a b", "amq.x", "warren.x", "x.dead",
        ] {
            assert!(validate_queue_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_queue_name(&"q".repeat(MAX_QUEUE_NAME)).is_ok());
        assert!(validate_queue_name(&"q".repeat(MAX_QUEUE_NAME + 1)).is_err());
        // The longest name still fits in a delay routing key.
        assert!(delay::routing_key(1, &"q".repeat(MAX_QUEUE_NAME)).len() <= 255);
    }

    #[test]
    fn work_queues_dead_letter_to_their_own_dead_queue() {
        let args = work_queue_arguments("emails", &QueueConfig::default());
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("emails.dead".into()))
        );
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(10)));
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
    }

    #[test]
    fn queues_that_are_only_read_never_reach_their_delivery_limit() {
        let limit = |args: &FieldTable| args.inner().get("x-delivery-limit").cloned();
        let quorum = QueueConfig::default();
        assert_eq!(quorum.queue_type, QueueType::Quorum);
        for args in [dead_queue_arguments(&quorum), unroutable_queue_arguments()] {
            // Not -1: RabbitMQ 3.10 drops a message on its first return with that.
            assert_eq!(limit(&args), Some(AMQPValue::LongLongInt(2_147_483_647)));
            assert_eq!(
                args.inner().get("x-queue-type"),
                Some(&AMQPValue::LongString("quorum".into()))
            );
            // Nowhere onward: a message stays until someone deletes it.
            assert_eq!(args.inner().get("x-dead-letter-exchange"), None);
        }
        // Classic queues have no delivery limit and refuse the argument.
        let classic = QueueConfig {
            queue_type: QueueType::Classic,
            ..QueueConfig::default()
        };
        let args = dead_queue_arguments(&classic);
        assert_eq!(limit(&args), None);
        assert_eq!(
            args.inner().get("x-queue-type"),
            Some(&AMQPValue::LongString("classic".into()))
        );
    }

    #[test]
    fn a_dead_letter_queue_from_an_older_warren_is_named_with_the_fix() {
        // What RabbitMQ 3.10.8 and 4.3.6 both say (checked on both).
        let detail = "inequivalent arg 'x-delivery-limit' for queue 'emails.dead' in vhost '/': \
                      received the value '2147483647' of type 'long' but current is none";
        let err = TopologyError::Mismatch {
            what: "queue",
            name: "emails.dead".into(),
            detail: detail.into(),
        };
        let text = err.to_string();
        for part in [
            "queue `emails.dead` already exists",
            detail,
            "older Warren",
            "warren topology migrate",
            "warren.migrate.emails.dead",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
        let unroutable = TopologyError::Mismatch {
            what: "queue",
            name: UNROUTABLE.into(),
            detail: detail.replace("emails.dead", UNROUTABLE),
        };
        assert!(
            unroutable
                .to_string()
                .contains("warren.migrate.warren.unroutable")
        );
        // A work queue whose settings changed can be migrated too, without the history.
        let work = TopologyError::Mismatch {
            what: "queue",
            name: "emails".into(),
            detail: "inequivalent arg 'x-delivery-limit' for queue 'emails'".into(),
        };
        let text = work.to_string();
        assert!(text.contains("warren topology migrate"), "{text}");
        assert!(!text.contains("older Warren"), "{text}");
        // Exchanges and delay levels keep the general advice.
        let delay = TopologyError::Mismatch {
            what: "queue",
            name: delay_level(3),
            detail: "inequivalent arg 'x-message-ttl'".into(),
        };
        assert!(delay.to_string().ends_with("change the config to match"));
    }

    #[test]
    fn priorities_per_queue_type_and_broker_version() {
        let quorum = QueueConfig {
            max_priority: Some(9),
            ..QueueConfig::default()
        };
        let classic = QueueConfig {
            queue_type: QueueType::Classic,
            ..quorum.clone()
        };
        let max = |args: &FieldTable| args.inner().get("x-max-priority").cloned();
        assert_eq!(max(&work_queue_arguments("q", &quorum)), None);
        assert_eq!(
            max(&work_queue_arguments("q", &classic)),
            Some(AMQPValue::LongLongInt(9))
        );
        assert!(priority_support("q", &quorum, Some(4)).is_ok());
        assert!(priority_support("q", &classic, Some(3)).is_ok());
        let err = priority_support("q", &quorum, Some(3)).expect_err("3.x quorum");
        assert!(err.to_string().contains("type = \"classic\""), "{err}");
        assert!(priority_support("q", &QueueConfig::default(), Some(3)).is_ok());
    }

    #[test]
    fn delay_levels_chain_down_to_deliver() {
        let top = delay_queue_arguments(delay::LEVELS - 1);
        assert_eq!(
            top.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString(
                delay_level(delay::LEVELS - 2).as_str().into()
            ))
        );
        let bottom = delay_queue_arguments(0);
        assert_eq!(
            bottom.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            bottom.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString(DELAY_DELIVER_EXCHANGE.into()))
        );
    }
}
