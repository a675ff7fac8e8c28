//! Scenario 8: bad input from a raw AMQP client (lapin directly, not the dispatcher), among
//! good jobs. Every bad message must end in `<queue>.dead` with a reason, or be refused by the
//! broker at publish; a valid job that merely carries spoofed headers is processed; the worker
//! stays alive; the good jobs around them are all processed.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use warren_core::envelope::ATTEMPT;

use super::check::Ledger;
use super::node::Node;
use super::procs::Pool;
use super::sink::Tally;
use super::submit::{self, Plan};
use super::{Report, Scenario, Settings};

/// What must become of a bad message.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    /// Dead-lettered by the worker with this `x-warren-error-class`.
    Dead(&'static str),
    /// A valid job despite the oddity: processed.
    Processed,
    /// Refused by the broker at publish (channel error, no confirm).
    Refused,
}

struct Case {
    name: &'static str,
    expect: Expect,
    properties: BasicProperties,
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

/// A valid job's properties (id, kind, JSON content type) plus the case header.
fn valid(case: &str, kind: &str, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    BasicProperties::default()
        .with_message_id(format!("bad-{case}-{}", uuid::Uuid::now_v7().simple()).into())
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

fn cases(notes: &mut Vec<String>) -> Vec<Case> {
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

pub async fn bad_input(bin: &Path) -> anyhow::Result<Report> {
    let s = Scenario::new(8, "bad-input", vec![Node::single()], bin).await?;
    let set = format!("application:set_env(rabbit, max_message_size, {MAX_MESSAGE}).");
    let restore = "application:set_env(rabbit, max_message_size, 134217728).";
    s.with_broker_settings(&set, restore, run).await
}

async fn run(s: &Scenario) -> anyhow::Result<Report> {
    let mut report = Report::new(8, s.name);
    let settings = Settings {
        max_payload_bytes: MAX_PAYLOAD,
        ..Settings::default()
    };
    let urls = s.urls();
    let dispatcher = s.dispatcher(&settings, &urls).await?;
    let mut pool = Pool::start(
        vec![s.worker("w1", &settings, &urls)],
        Duration::from_secs(60),
    )
    .await?;
    let worker_pid = pool.procs[0].pid;
    let mut ledger = Ledger::default();

    let before = s.jobs(250, "echo", &json!({}));
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        before,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));

    let mut notes = Vec::new();
    let cases = cases(&mut notes);
    for note in notes {
        report.note(note);
    }
    let broker = warren_core::config::BrokerConfig {
        url: s.node.url(&s.vhost),
        ..Default::default()
    };
    let connection = warren_core::connection::connect(&broker, "fault-suite raw client").await?;
    let mut channel = confirm_channel(&connection).await?;
    let mut outcomes = Vec::new();
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
        outcomes.push((case, key, confirmed));
    }
    let _ = connection.close(200, "done".into()).await;

    let after = s.jobs(250, "echo", &json!({}));
    let (submitting, log) = submit::spawn(
        dispatcher.clone(),
        after,
        Plan::default(),
        CancellationToken::new(),
    );
    tokio::time::timeout(Duration::from_secs(60), submitting)
        .await
        .context("submitting")??;
    ledger.add_dispatcher(&log.lock().expect("log"));

    report.check(pool.procs[0].exited().is_none(), "the worker process died");
    let dead = s
        .finish(&mut pool, &ledger, &mut report, Duration::from_secs(60))
        .await?;
    report.check(pool.procs[0].pid == worker_pid, "the worker was replaced");
    let log_text = pool.procs[0].log_text();
    report.check(
        log_text.matches("worker started").count() == 1,
        "the worker had to reconnect",
    );
    let tally = Tally::of(&s.sink.lines());
    let mut summary = Vec::new();
    for (case, key, confirmed) in &outcomes {
        let in_dead: Vec<_> = dead.iter().filter(|d| &d.key == key).collect();
        let processed = tally.counts.contains_key(key);
        let got = match (confirmed, in_dead.first(), processed) {
            (false, None, false) => Expect::Refused,
            (true, Some(d), false) if in_dead.len() == 1 && !d.error.is_empty() => {
                match d.class.as_str() {
                    "malformed" => Expect::Dead("malformed"),
                    "unknown-kind" => Expect::Dead("unknown-kind"),
                    "permanent" => Expect::Dead("permanent"),
                    other => {
                        report.fail(format!(
                            "case {}: dead-lettered with class {other}",
                            case.name
                        ));
                        continue;
                    }
                }
            }
            (true, None, true) => Expect::Processed,
            other => {
                report.fail(format!(
                    "case {}: confirmed={} dead={:?} processed={}",
                    case.name, other.0, in_dead, other.2
                ));
                continue;
            }
        };
        if got != case.expect {
            report.fail(format!(
                "case {}: expected {:?}, got {got:?}",
                case.name, case.expect
            ));
        }
        let reason = in_dead
            .first()
            .map(|d| format!(" ({}: {})", d.class, d.error))
            .unwrap_or_default();
        summary.push(format!("{} → {got:?}{reason}", case.name));
    }
    for line in summary {
        report.note(format!("  {line}"));
    }
    let good = ledger
        .confirmed
        .iter()
        .filter(|id| !id.starts_with("bad-") && !id.starts_with("case:"))
        .count();
    let good_done = tally
        .ids()
        .iter()
        .filter(|id| !id.starts_with("bad-"))
        .count();
    report.check(
        good == 500 && good_done == 500,
        format!("{good_done} of {good} good jobs processed"),
    );
    Ok(report)
}
