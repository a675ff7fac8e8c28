//! Scenario 8: bad input from raw AMQP clients (lapin directly with RabbitMQ's default 128 KiB
//! frames, and [`crate::raw_amqp`] for what lapin cannot write), among good jobs.
//!
//! Each case is judged on its own outcome, counted exactly: a malformed message ends in
//! `<queue>.dead` once with its reason and never runs; a valid job that merely carries odd or
//! spoofed headers (a 20 KB header, a header table nested 20,000 deep, ...) is processed once; a
//! job with `CC`/`BCC` headers naming the delay levels' routing keys and the queue itself fails
//! with a retryable error and runs exactly `max_attempts` times, then has exactly one dead
//! letter; what the broker refuses never arrives. Runs are counted by the worker's `on_settled`
//! hook (one line per settled delivery) and the sink, never from the log. The worker stays the
//! same process with the same two connections (one session, checked on the broker), and the
//! good jobs around the bad ones are each processed exactly once.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::envelope::{ATTEMPT, ERROR, ERROR_CLASS};
use warren_core::topology;

use super::Session;
use crate::fault::check::{DeadMessage, Ledger};
use crate::fault::node::Node;
use crate::fault::submit::{self, Plan};
use crate::fault::{Report, Scenario, Settings};
use crate::raw_amqp::{self, RawMessage, RawPublisher};
use crate::sink::{Settlement, Tally};

/// What must become of a bad message.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Dead-lettered by the worker, once, with this `x-warren-error-class`; never run.
    Dead(&'static str),
    /// A valid job despite the oddity: processed once.
    Processed,
    /// A retryable failure every time: run exactly this many times (`max_attempts`), then
    /// dead-lettered once as `exhausted`.
    Exhausted(usize),
    /// Refused by the broker at publish (channel error, no confirm): never arrives.
    Refused,
}

/// A message published by lapin.
struct Case {
    name: &'static str,
    expect: Expect,
    properties: BasicProperties,
    body: Vec<u8>,
}

/// A message lapin cannot write, published byte by byte ([`crate::raw_amqp`]): a valid job
/// whose header table is `headers` (encoded).
struct RawCase {
    name: &'static str,
    expect: Expect,
    id: String,
    kind: &'static str,
    headers: Vec<u8>,
    body: Vec<u8>,
}

/// `jobs.max_payload_bytes` in this scenario.
const MAX_PAYLOAD: usize = 4096;
/// `max_message_size` set on the node during the scenario (restored afterwards).
const MAX_MESSAGE: usize = 1024 * 1024;

fn headers(case: &str, extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert("x-fault-case".into(), AMQPValue::LongString(case.into()));
    for (key, value) in extra {
        table.insert((*key).into(), value.clone());
    }
    table
}

/// A fresh message id for a case: `bad-<case>-<uuid>`.
fn case_id(case: &str) -> String {
    format!("bad-{case}-{}", uuid::Uuid::now_v7().simple())
}

/// A valid job's properties (id, kind, JSON content type) plus the case header.
fn valid(case: &str, kind: &str, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(case_id(case).into())
        .with_type(kind.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers(case, extra))
}

fn fake_x_death() -> AMQPValue {
    let mut death = FieldTable::default();
    death.insert("count".into(), AMQPValue::LongLongInt(99));
    death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
    death.insert(
        "queue".into(),
        AMQPValue::LongString("somewhere-else".into()),
    );
    death.insert("exchange".into(), AMQPValue::LongString("".into()));
    AMQPValue::FieldArray(FieldArray::from(vec![
        AMQPValue::FieldTable(death),
        AMQPValue::LongString("junk".into()),
    ]))
}

/// The messages lapin publishes to `queue`; notes what cannot be sent at all.
fn cases(queue: &str, max_attempts: usize, notes: &mut Vec<String>) -> Vec<Case> {
    let body = |case: &str| format!("{{\"note\":\"case={case}\"}}").into_bytes();
    let long = |n: usize| "x".repeat(n);
    let cases = vec![
        Case {
            name: "not-json",
            expect: Expect::Dead("malformed"),
            properties: valid("not-json", "echo", &[]),
            body: b"case=not-json: this is not JSON".to_vec(),
        },
        Case {
            name: "empty-body",
            expect: Expect::Dead("malformed"),
            properties: valid("empty-body", "echo", &[]),
            body: Vec::new(),
        },
        Case {
            name: "invalid-utf8",
            expect: Expect::Dead("malformed"),
            properties: valid("invalid-utf8", "echo", &[]),
            body: [&[0xff_u8, 0xfe, 0x00][..], b"case=invalid-utf8"].concat(),
        },
        Case {
            name: "nested-2000-deep",
            expect: Expect::Dead("malformed"),
            properties: valid("nested-2000-deep", "echo", &[]),
            body: format!("{}{}", "[".repeat(2000), "]".repeat(2000)).into_bytes(),
        },
        Case {
            name: "text-plain",
            expect: Expect::Dead("malformed"),
            properties: valid("text-plain", "echo", &[]).with_content_type("text/plain".into()),
            body: body("text-plain"),
        },
        Case {
            name: "xml-content-type",
            expect: Expect::Dead("malformed"),
            properties: valid("xml-content-type", "echo", &[])
                .with_content_type("application/xml".into()),
            body: body("xml-content-type"),
        },
        Case {
            name: "no-properties",
            expect: Expect::Dead("malformed"),
            properties: BasicProperties::default(),
            body: body("no-properties"),
        },
        Case {
            name: "no-message-id",
            expect: Expect::Dead("malformed"),
            properties: BasicProperties::default()
                .with_type("echo".into())
                .with_headers(headers("no-message-id", &[])),
            body: body("no-message-id"),
        },
        Case {
            name: "empty-message-id",
            expect: Expect::Dead("malformed"),
            properties: valid("empty-message-id", "echo", &[]).with_message_id("".into()),
            body: body("empty-message-id"),
        },
        Case {
            name: "no-type",
            expect: Expect::Dead("malformed"),
            properties: BasicProperties::default()
                .with_message_id(format!("bad-no-type-{}", uuid::Uuid::now_v7().simple()).into())
                .with_headers(headers("no-type", &[])),
            body: body("no-type"),
        },
        Case {
            name: "attempt-text",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-text",
                "echo",
                &[(ATTEMPT, AMQPValue::LongString("abc".into()))],
            ),
            body: body("attempt-text"),
        },
        Case {
            name: "attempt-zero",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-zero",
                "echo",
                &[(ATTEMPT, AMQPValue::LongLongInt(0))],
            ),
            body: body("attempt-zero"),
        },
        Case {
            name: "attempt-negative",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-negative",
                "echo",
                &[(ATTEMPT, AMQPValue::ShortInt(-5))],
            ),
            body: body("attempt-negative"),
        },
        Case {
            name: "attempt-2pow40",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-2pow40",
                "echo",
                &[(ATTEMPT, AMQPValue::LongLongInt(1 << 40))],
            ),
            body: body("attempt-2pow40"),
        },
        Case {
            name: "attempt-float",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-float",
                "echo",
                &[(ATTEMPT, AMQPValue::Double(1.5))],
            ),
            body: body("attempt-float"),
        },
        Case {
            name: "attempt-300-byte-value",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-300-byte-value",
                "echo",
                &[(ATTEMPT, AMQPValue::LongString(LongString::from(long(300))))],
            ),
            body: body("attempt-300-byte-value"),
        },
        Case {
            name: "spoofed-attempt-valid",
            expect: Expect::Processed,
            properties: valid(
                "spoofed-attempt-valid",
                "echo",
                &[(ATTEMPT, AMQPValue::LongLongInt(2))],
            ),
            body: body("spoofed-attempt-valid"),
        },
        Case {
            name: "spoofed-x-death-valid-job",
            expect: Expect::Processed,
            properties: valid(
                "spoofed-x-death-valid-job",
                "echo",
                &[
                    ("x-death", fake_x_death()),
                    (
                        "x-first-death-reason",
                        AMQPValue::LongString("expired".into()),
                    ),
                    ("x-delivery-count", AMQPValue::LongLongInt(7)),
                ],
            ),
            body: body("spoofed-x-death-valid-job"),
        },
        Case {
            name: "spoofed-x-death-bad-payload",
            expect: Expect::Dead("permanent"),
            properties: valid(
                "spoofed-x-death-bad-payload",
                "sleep",
                &[("x-death", fake_x_death())],
            ),
            body: body("spoofed-x-death-bad-payload"),
        },
        Case {
            name: "x-death-not-an-array",
            expect: Expect::Processed,
            properties: valid(
                "x-death-not-an-array",
                "echo",
                &[("x-death", AMQPValue::LongString("not a table".into()))],
            ),
            body: body("x-death-not-an-array"),
        },
        Case {
            name: "1000-byte-header-value",
            expect: Expect::Processed,
            properties: valid(
                "1000-byte-header-value",
                "echo",
                &[(
                    "x-fault-long",
                    AMQPValue::LongString(LongString::from(long(1000))),
                )],
            ),
            body: body("1000-byte-header-value"),
        },
        Case {
            name: "unknown-kind",
            expect: Expect::Dead("unknown-kind"),
            properties: valid("unknown-kind", "no-such-kind", &[]),
            body: body("unknown-kind"),
        },
        Case {
            name: "kind-255-bytes",
            expect: Expect::Dead("unknown-kind"),
            properties: valid("kind-255-bytes", "echo", &[])
                .with_type(ShortString::try_new(long(255)).expect("255 fits")),
            body: body("kind-255-bytes"),
        },
        Case {
            name: "id-255-bytes",
            expect: Expect::Processed,
            properties: valid("id-255-bytes", "echo", &[]).with_message_id(
                ShortString::try_new(format!("bad-id-255-bytes-{}", long(255 - 17)))
                    .expect("255 fits"),
            ),
            body: body("id-255-bytes"),
        },
        Case {
            name: "payload-over-max",
            expect: Expect::Dead("malformed"),
            properties: valid("payload-over-max", "echo", &[]),
            body: serde_json::to_vec(
                &json!({"note": "case=payload-over-max", "pad": long(MAX_PAYLOAD * 2)}),
            )
            .expect("json"),
        },
        Case {
            name: "bad-expiration",
            expect: Expect::Refused,
            properties: valid("bad-expiration", "echo", &[]).with_expiration("soon".into()),
            body: body("bad-expiration"),
        },
        Case {
            name: "spoofed-user-id",
            expect: Expect::Refused,
            properties: valid("spoofed-user-id", "echo", &[]).with_user_id("admin".into()),
            body: body("spoofed-user-id"),
        },
        Case {
            name: "over-max-message-size",
            expect: Expect::Refused,
            properties: valid("over-max-message-size", "echo", &[]),
            body: serde_json::to_vec(
                &json!({"note": "case=over-max-message-size", "pad": long(MAX_MESSAGE + 1024)}),
            )
            .expect("json"),
        },
        Case {
            name: "header-20kb",
            expect: Expect::Processed,
            properties: valid(
                "header-20kb",
                "echo",
                &[(
                    "x-fault-twenty-k",
                    AMQPValue::LongString(LongString::from(long(20_000))),
                )],
            ),
            body: body("header-20kb"),
        },
        Case {
            name: "cc-bcc-delay-keys",
            expect: Expect::Exhausted(max_attempts),
            properties: valid(
                "cc-bcc-delay-keys",
                "flaky",
                &[("CC", routing_keys(queue)), ("BCC", routing_keys(queue))],
            ),
            body: serde_json::to_vec(&json!({"times": 1000, "note": "case=cc-bcc-delay-keys"}))
                .expect("json"),
        },
        Case {
            name: "attempt-4kb-string",
            expect: Expect::Dead("malformed"),
            properties: valid(
                "attempt-4kb-string",
                "echo",
                &[(ATTEMPT, AMQPValue::LongString(LongString::from(long(4096))))],
            ),
            body: body("attempt-4kb-string"),
        },
        Case {
            name: "forged-error-class",
            expect: Expect::Dead("permanent"),
            properties: valid(
                "forged-error-class",
                "fail",
                &[
                    (ERROR_CLASS, AMQPValue::LongString("unknown-kind".into())),
                    (ERROR, AMQPValue::LongString("forged".into())),
                ],
            ),
            body: body("forged-error-class"),
        },
    ];
    // Names over 255 bytes cannot be sent: AMQP short strings have a one-byte length, and lapin
    // refuses to build one (ShortString::try_new; `From` would panic).
    for (what, len) in [("message_id", 256), ("type", 300), ("header name", 256)] {
        match ShortString::try_new(long(len)) {
            Err(err) => notes.push(format!(
                "a {len}-byte {what} cannot be sent with lapin: {err}"
            )),
            Ok(_) => notes.push(format!("lapin accepted a {len}-byte {what}?!")),
        }
    }
    cases
}

/// `CC`/`BCC` routing keys a hostile producer could aim at Warren's own topology: the delay
/// levels' keys for 1, 2 and 4 s to `queue`, and `queue` itself. If a retry copy carried them,
/// the broker would route it to every one of them again.
fn routing_keys(queue: &str) -> AMQPValue {
    let keys = [1, 2, 4]
        .iter()
        .map(|seconds| topology::delay_route(*seconds, queue).1)
        .chain([queue.to_owned()])
        .map(|key| AMQPValue::LongString(key.into()))
        .collect::<Vec<_>>();
    AMQPValue::FieldArray(FieldArray::from(keys))
}

/// The messages written byte by byte.
fn raw_cases() -> Vec<RawCase> {
    vec![RawCase {
        name: "headers-nested-20000-deep",
        expect: Expect::Processed,
        id: case_id("headers-nested-20000-deep"),
        kind: "echo",
        headers: raw_amqp::deep_headers(20_000),
        body: b"{\"note\":\"case=headers-nested-20000-deep\"}".to_vec(),
    }]
}

/// The key the suite counts a case under (see `check::key_of`).
fn key(case: &Case) -> String {
    match case.properties.message_id() {
        Some(id) if !id.as_str().is_empty() => id.to_string(),
        _ => format!("case:{}", case.name),
    }
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes one raw message; `Ok(true)` if the broker confirmed it into a queue.
async fn publish_raw(channel: &Channel, queue: &str, case: &Case) -> anyhow::Result<bool> {
    let publish = async {
        let confirm = channel
            .basic_publish(
                warren_core::topology::JOBS_EXCHANGE.into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &case.body,
                case.properties.clone(),
            )
            .await?
            .await?;
        anyhow::Ok(matches!(confirm, Confirmation::Ack(None)))
    };
    match tokio::time::timeout(Duration::from_secs(10), publish).await {
        Ok(Ok(confirmed)) => Ok(confirmed),
        Ok(Err(_)) => Ok(false),
        Err(_) => Ok(false),
    }
}

pub async fn run(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(8, "bad-input", vec![Node::single()], bin).await?;
    let set = format!("application:set_env(rabbit, max_message_size, {MAX_MESSAGE}).");
    let restore = "application:set_env(rabbit, max_message_size, 134217728).";
    s.with_broker_settings(&set, restore, scenario).await
}

/// A case once published: how it must end, and under which key it is counted.
struct Sent {
    name: &'static str,
    expect: Expect,
    key: String,
    confirmed: bool,
}

async fn scenario(s: &Scenario) -> anyhow::Result<Report> {
    let mut report = Report::new(8, s.name);
    let settings = Settings {
        max_payload_bytes: MAX_PAYLOAD,
        ..Settings::default()
    };
    let (dispatcher, mut pool) = s.dispatcher_and_worker(&settings).await?;
    let worker_pid = pool.procs[0].pid;
    let session = Session::of(&s.node, worker_pid).await?;
    let mut ledger = Ledger::default();
    submit_good(s, &dispatcher, &mut ledger).await?;

    let mut notes = Vec::new();
    let cases = cases(&s.queue, settings.max_attempts as usize, &mut notes);
    for note in notes {
        report.note(note);
    }
    // A producer with RabbitMQ's default frame size, whatever Warren's own default is.
    let broker = warren_core::config::BrokerConfig {
        url: format!("{}?frame_max=131072", s.node.url(&s.vhost)),
        ..Default::default()
    };
    let connection = warren_core::connection::connect(&broker, "fault-suite raw client").await?;
    let mut channel = confirm_channel(&connection).await?;
    let mut sent = Vec::new();
    for case in &cases {
        let key = key(case);
        ledger.submitted.insert(key.clone());
        let confirmed = publish_raw(&channel, &s.queue, case).await?;
        if confirmed {
            ledger.confirmed.insert(key.clone());
        }
        if !channel.status().connected() {
            channel = confirm_channel(&connection).await?;
        }
        sent.push(Sent {
            name: case.name,
            expect: case.expect.clone(),
            key,
            confirmed,
        });
    }
    let _ = connection.close(200, "done".into()).await;
    let mut raw = RawPublisher::connect(&s.node.url(&s.vhost)).await?;
    for case in raw_cases() {
        ledger.submitted.insert(case.id.clone());
        let message = RawMessage::job(&s.queue, &case.id, case.kind, &case.headers, &case.body);
        let confirmed = match raw.publish(&message).await {
            Ok(()) => true,
            Err(err) => {
                report.note(format!("case {}: not confirmed: {err}", case.name));
                false
            }
        };
        if confirmed {
            ledger.confirmed.insert(case.id.clone());
        }
        sent.push(Sent {
            name: case.name,
            expect: case.expect,
            key: case.id,
            confirmed,
        });
    }
    let _ = raw.close().await;
    submit_good(s, &dispatcher, &mut ledger).await?;

    report.check(pool.procs[0].exited().is_none(), "the worker process died");
    session.check_unchanged(&s.node, &mut report).await?;
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    let tally = Tally::of(&s.sink.lines());
    let settlements = s.sink.settlements();
    report.check(
        s.sink.lines().iter().all(|l| l.pid == worker_pid)
            && settlements.iter().all(|l| l.pid == worker_pid),
        "a job was run by another process than the first worker",
    );
    let unsent: Vec<_> = settlements.iter().filter(|l| !l.sent).collect();
    report.check(
        unsent.is_empty(),
        format!("acks that could not be sent (a lost session): {unsent:?}"),
    );
    for case in &sent {
        let got = judge(case, &dead, &tally, &settlements);
        match &got {
            Ok(summary) => report.note(format!("  {} → {summary}", case.name)),
            Err(problem) => report.fail(format!("case {}: {problem}", case.name)),
        }
    }
    let good: Vec<&String> = ledger
        .confirmed
        .iter()
        .filter(|id| !id.starts_with("bad-") && !id.starts_with("case:"))
        .collect();
    let good_once = good.iter().filter(|id| tally.of_id(id) == 1).count();
    report.check(
        good.len() == 500 && good_once == 500,
        format!(
            "{good_once} of {} confirmed good jobs processed exactly once",
            good.len()
        ),
    );
    Ok(report)
}

/// Submits 250 good jobs through the dispatcher, all confirmed.
async fn submit_good(
    s: &Scenario,
    dispatcher: &std::sync::Arc<warren_dispatcher::Dispatcher>,
    ledger: &mut Ledger,
) -> anyhow::Result<()> {
    let jobs = s.jobs(250, "echo", &json!({}));
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        jobs,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));
    Ok(())
}

/// Compares what became of one case with what must: its dead letters (by message id, or case
/// name for messages without one), handler runs recorded in the sink, and deliveries settled.
/// `Ok` with a summary, or what is wrong.
fn judge(
    case: &Sent,
    dead: &[DeadMessage],
    tally: &Tally,
    settlements: &[Settlement],
) -> Result<String, String> {
    let dead: Vec<&DeadMessage> = dead.iter().filter(|d| d.key == case.key).collect();
    let processed = tally.of_id(&case.key);
    // Messages without an id settle as `-`: their deliveries cannot be told apart.
    let has_id = !case.key.starts_with("case:");
    let settled: Vec<&str> = settlements
        .iter()
        .filter(|l| l.id == crate::sink::id_field(&case.key))
        .map(|l| l.outcome.as_str())
        .collect();
    let classes: Vec<&str> = dead.iter().map(|d| d.class.as_str()).collect();
    let seen = format!(
        "confirmed={} dead={classes:?} processed={processed} settled={settled:?}",
        case.confirmed
    );
    let ok = match &case.expect {
        Expect::Refused => !case.confirmed && dead.is_empty() && processed == 0,
        Expect::Processed => {
            case.confirmed && dead.is_empty() && processed == 1 && settled == ["done"]
        }
        Expect::Dead(class) => {
            case.confirmed
                && classes == [*class]
                && !dead[0].error.is_empty()
                && dead[0].error != "forged"
                && dead[0].error.len() <= warren_core::envelope::MAX_ERROR_BYTES
                && processed == 0
                && (!has_id || settled == ["dead-lettered"])
        }
        Expect::Exhausted(runs) => {
            let retries = settled.iter().filter(|o| **o == "retry-scheduled").count();
            case.confirmed
                && classes == ["exhausted"]
                && processed == 0
                && settled.len() == *runs
                && retries == runs - 1
                && settled.last() == Some(&"dead-lettered")
        }
    };
    if !ok {
        return Err(format!("expected {:?}, got {seen}", case.expect));
    }
    let reason = dead
        .first()
        .map(|d| format!(" ({}: {})", d.class, d.error))
        .unwrap_or_default();
    Ok(format!(
        "{:?}, {} run(s){reason}",
        case.expect,
        settled.len()
    ))
}
