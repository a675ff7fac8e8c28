//! W3C trace context through a job's life (docs/PROTOCOL.md, "Trace context"): the submit span
//! is a child of the caller's, the job's `traceparent` header is the submit span, and every
//! attempt of the job — retries included — runs in a new span whose parent is the submit span.
//! A producer's invalid `traceparent` is ignored and never copied. What the handler saw is
//! recorded through the [`Recorder`] (`JobContext::trace`), never read from logs.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use warren_core::trace::{TRACEPARENT, TRACESTATE, TraceContext};
use warren_core::{NewJob, envelope, topology};
use warren_tests::http::{Serve, client, serve_config};
use warren_tests::*;
use warren_workers::{JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(30);

/// Given a caller's trace context, when a job submitted in it fails twice and succeeds on the
/// third attempt, then the message's `traceparent` is a new span of the caller's trace (the
/// submit span), and the three attempts share that trace id, each with a span id of its own,
/// each a child of the submit span.
#[tokio::test]
async fn every_attempt_is_a_child_of_the_submit_span() {
    let queue = unique_queue("trace");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let caller = TraceContext::new_root();

    let job = NewJob::new(&queue, "flaky", &json!({})).with_traceparent(caller);
    let id = dispatcher.submit(job).await.expect("submitted");

    follow_through_retries(&config, &queue, &id.0, &caller).await;
}

/// The same over HTTP: `POST /v1/queues/{queue}/jobs` with a `traceparent` header (and a
/// `tracestate`, which the job carries), then a worker that fails it twice.
#[tokio::test]
async fn a_traceparent_is_followed_from_an_http_submit_through_retries() {
    let queue = unique_queue("trace-http");
    let config = config(&[&queue]);
    let _declared = dispatcher(&config).await;
    let token = "trace-submit-token-0123456789abcdef";
    let serve = Serve::builder(&serve_config(
        &[&queue],
        &[("tracer", token, "submit")],
        "",
        "",
    ))
    .start()
    .await;
    let caller = TraceContext::new_root();

    let response = client(None)
        .post(serve.url(&format!("/v1/queues/{queue}/jobs")))
        .bearer_auth(token)
        .header("traceparent", caller.to_string())
        .header("tracestate", "vendor=opaque-1")
        .json(&json!({"kind": "flaky", "payload": {}}))
        .send()
        .await
        .expect("the request");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let body: serde_json::Value = response.json().await.expect("JSON");
    let id = body["id"].as_str().expect("the job id").to_owned();

    let message = follow_through_retries(&config, &queue, &id, &caller).await;
    assert_eq!(
        header(&message, TRACESTATE).as_deref(),
        Some("vendor=opaque-1")
    );
}

/// Given `warren serve --log-format json`, when it takes a job and stops, then everything
/// it wrote to stderr is one JSON object per line: the "listening on" and "stopped" lines,
/// and the access log line of the request.
#[tokio::test]
async fn warren_serve_logs_json_lines() {
    let queue = unique_queue("json-serve");
    let config = config(&[&queue]);
    let _declared = dispatcher(&config).await;
    let token = "json-serve-token-0123456789abcdef";
    let mut serve = Serve::builder(&serve_config(
        &[&queue],
        &[("logger", token, "submit")],
        "",
        "",
    ))
    .arg("--log-format")
    .arg("json")
    .start()
    .await;
    let response = client(None)
        .post(serve.url(&format!("/v1/queues/{queue}/jobs")))
        .bearer_auth(token)
        .json(&json!({"kind": "echo", "payload": {}}))
        .send()
        .await
        .expect("the request");
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    serve.terminate();
    assert!(serve.wait_exit(DEADLINE).await.success());

    let stderr = serve.stderr();
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("listening on")),
        "{stderr}"
    );
    assert!(messages.iter().any(|m| m.contains("stopped")), "{stderr}");
    assert!(
        lines
            .iter()
            .any(|l| l.to_string().contains(&format!("/v1/queues/{queue}/jobs"))),
        "the access log line: {stderr}"
    );
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}

/// Takes job `id` off `queue` to read its `traceparent` (the submit span: a child of
/// `caller`), publishes it again unchanged, runs it in a worker that fails attempts 1 and 2,
/// and checks every attempt's trace context against the submit span. Returns the message.
async fn follow_through_retries(
    config: &warren_core::Config,
    queue: &str,
    id: &str,
    caller: &TraceContext,
) -> lapin::message::Delivery {
    let channel = connect().await.create_channel().await.expect("channel");
    // The message as the broker holds it, before any worker saw it: published again as is.
    let message = take_messages(&channel, queue, 1, DEADLINE).await.remove(0);
    assert_eq!(
        message.properties.message_id().as_ref().map(|m| m.as_str()),
        Some(id)
    );
    let submit = envelope::traceparent(&message.properties).expect("a valid traceparent");
    assert_eq!(submit.trace_id(), caller.trace_id(), "the caller's trace");
    assert_ne!(submit.span_id(), caller.span_id(), "a span of its own");
    republish(&channel, queue, &message).await;

    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "flaky", |call| match call.attempt {
        1 | 2 => Err(JobError::retry("not yet")),
        _ => Ok(None),
    });
    let worker = start_worker(config, registry, &[queue]);
    let calls = recorder.wait_for(3, DEADLINE).await;
    worker.stop().await;

    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for call in &calls {
        assert_eq!(call.id, id);
        assert_eq!(
            call.trace.trace_id(),
            caller.trace_id(),
            "attempt {}",
            call.attempt
        );
        assert_eq!(
            call.trace.parent_id(),
            Some(submit.span_id()),
            "attempt {}'s parent is the submit span",
            call.attempt
        );
        assert_ne!(call.trace.span_id(), submit.span_id());
        assert_ne!(call.trace.span_id(), caller.span_id());
    }
    let mut spans: Vec<_> = calls.iter().map(|c| c.trace.span_id()).collect();
    spans.sort_by_key(|s| s.to_bytes());
    spans.dedup();
    assert_eq!(spans.len(), 3, "a new span id per attempt");
    cleanup(&channel, &[queue]).await;
    message
}

/// Given no trace context from the caller, a submitted job starts a trace of its own: its
/// header is valid, without a parent, and the handler's attempt is its child.
#[tokio::test]
async fn a_job_without_a_caller_trace_starts_one() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let stage = Stage::new("trace-root", registry).await;

    stage.submit("echo", json!({})).await;

    let calls = recorder.wait_for(1, DEADLINE).await;
    let trace = calls[0].trace;
    assert!(
        trace.parent_id().is_some(),
        "the attempt's parent: the submit span"
    );
    assert!(TraceContext::parse(&trace.context.to_string()).is_some());
    stage.end().await;
}

/// Given a producer's job with an invalid `traceparent` (uppercase hex, which the W3C
/// recommendation forbids), when it fails once, then again for good, then it still ran both
/// times, each attempt in a fresh trace without a parent, and neither the retry nor the dead
/// letter carries the invalid value.
#[tokio::test]
async fn an_invalid_traceparent_is_ignored_and_not_carried() {
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "fail", |_| Err(JobError::retry("nope")));
    let stage = Stage::with("trace-bad", registry, |q| q.retry.max_attempts = 2).await;
    let invalid = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01";
    let mut headers = FieldTable::default();
    headers.insert(TRACEPARENT.into(), AMQPValue::LongString(invalid.into()));
    let properties = BasicProperties::default()
        .with_message_id("raw-bad-trace".into())
        .with_type("fail".into())
        .with_content_type("application/json".into())
        .with_headers(headers);
    publish(&stage.channel, &stage.queue, properties, b"{}").await;

    let dead = stage.dead_letters(1).await;
    let calls = recorder.wait_for(2, DEADLINE).await;
    assert_eq!(calls.len(), 2, "the job ran, and was retried");
    for call in &calls {
        assert_eq!(
            call.trace.parent_id(),
            None,
            "no parent from an invalid header"
        );
        assert_ne!(
            call.trace.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
    assert_ne!(
        calls[0].trace.trace_id(),
        calls[1].trace.trace_id(),
        "the retry carried no traceparent: its attempt started a trace of its own"
    );
    assert_eq!(
        header(&dead[0], TRACEPARENT),
        None,
        "the dead letter carries no invalid traceparent"
    );
    assert_eq!(
        header(&dead[0], envelope::ERROR_CLASS).as_deref(),
        Some("exhausted")
    );
    stage.end().await;
}

/// Given a worker started with `WARREN_LOG_FORMAT=json` (the env form of `--log-format json`),
/// when it runs a job that is done, one retried then done, one dead-lettered and one whose id
/// is hostile text, then every line of its log is one JSON object, and each job's outcome line
/// has its id, queue, kind, attempt, outcome, duration and trace id as fields (the retried
/// job's two lines in one trace). This test reads the log because the log format is what it
/// tests; the outcomes it waits for come from the worker's sink.
#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_job_fields() {
    let queue = unique_queue("json-log");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let dir =
        std::env::temp_dir().join(format!("warren-json-log-{}", uuid::Uuid::now_v7().simple()));
    let sink = sink::Sink::new(&dir, "sink");
    let spec = sink.env().into_iter().fold(
        procs::WorkerSpec::new(
            env!("CARGO_BIN_EXE_fault-worker"),
            "worker",
            &[&queue],
            &dir,
        )
        .env(warren_core::config::AMQP_URL_ENV, broker_url())
        .env("WARREN_LOG_FORMAT", "json"),
        |spec, (key, path)| spec.env(key, path),
    );
    let mut worker = spec.spawn(0).expect("starting the worker");
    worker
        .wait_started(DEADLINE)
        .await
        .expect("the worker consumes");

    let hostile = "evil\"}{\u{1b}[31m";
    let jobs = [
        NewJob::new(&queue, "echo", &json!({})).with_id("json-echo"),
        NewJob::new(&queue, "flaky", &json!({"times": 1})).with_id("json-flaky"),
        NewJob::new(&queue, "fail", &json!({})).with_id("json-fail"),
        NewJob::new(&queue, "echo", &json!({})).with_id(hostile),
    ];
    for job in jobs {
        dispatcher.submit(job).await.expect("submitted");
    }
    let until = std::time::Instant::now() + DEADLINE;
    while sink.settlements().len() < 5 {
        assert!(
            std::time::Instant::now() < until,
            "5 outcomes: {:?}",
            sink.settlements()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.signal("TERM").expect("stopping the worker");
    worker.wait_exit(DEADLINE).await.expect("the worker stops");

    let log = std::fs::read_to_string(&worker.log).expect("the log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|err| panic!("{err}: {line:?}")))
        .collect();
    assert!(lines.iter().all(serde_json::Value::is_object));
    let outcomes = |id: &str| -> Vec<&serde_json::Value> {
        lines
            .iter()
            .filter(|l| l["job_id"] == id && l.get("outcome").is_some())
            .collect()
    };
    let expect = [
        ("json-echo", "echo", vec![(1, "done")]),
        ("json-flaky", "flaky", vec![(1, "retried"), (2, "done")]),
        ("json-fail", "fail", vec![(1, "dead_lettered")]),
        (hostile, "echo", vec![(1, "done")]),
    ];
    for (id, kind, attempts) in expect {
        let found = outcomes(id);
        let seen: Vec<(u64, &str)> = found
            .iter()
            .map(|l| {
                (
                    l["attempt"].as_u64().unwrap_or(0),
                    l["outcome"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(seen, attempts, "{id}: {found:?}");
        for line in &found {
            assert_eq!(line["queue"], queue.as_str());
            assert_eq!(line["kind"], kind);
            assert_eq!(line["level"], "INFO");
            assert!(line["duration_us"].is_u64(), "{line}");
            let trace_id = line["trace_id"].as_str().unwrap_or_default();
            assert_eq!(trace_id.len(), 32, "{line}");
            assert!(
                trace_id
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(
                found[0]["trace_id"], line["trace_id"],
                "one trace for every attempt"
            );
            assert_ne!(found[0]["span_id"], serde_json::Value::Null);
        }
    }
    cleanup(
        &dispatcher.open_channel().await.expect("channel"),
        &[&queue],
    )
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A delivery published again to its queue, properties and body unchanged.
async fn republish(channel: &lapin::Channel, queue: &str, message: &lapin::message::Delivery) {
    publish(channel, queue, message.properties.clone(), &message.data).await;
}

async fn publish(channel: &lapin::Channel, queue: &str, properties: BasicProperties, body: &[u8]) {
    channel
        .basic_publish(
            topology::JOBS_EXCHANGE.into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await
        .expect("publish")
        .await
        .expect("published");
}
