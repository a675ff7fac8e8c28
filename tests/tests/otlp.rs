//! OpenTelemetry export (cargo feature `otel`): the spans Warren sends over OTLP/HTTP, caught by
//! a small receiver this test starts (an axum route decoding `ExportTraceServiceRequest`).
//!
//! Run with `cargo test -p warren-tests --features otel --test otlp`. One test per process:
//! it installs the global subscriber and exporter the way `warren-worker` does
//! (`warren_workers::telemetry::init`, configured by `OTEL_EXPORTER_OTLP_ENDPOINT` and
//! `OTEL_SERVICE_NAME`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use warren_core::NewJob;
use warren_core::trace::TraceContext;
use warren_tests::*;
use warren_workers::telemetry::{self, LogFormat, Options};
use warren_workers::{JobError, Registry};

const DEADLINE: Duration = Duration::from_secs(30);
const SERVICE: &str = "warren-otlp-test";

/// What the receiver got: each span with the `service.name` of its resource.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// Given the exporter pointed at a local OTLP receiver, when a job submitted in a caller's
/// trace fails twice and succeeds on its third attempt, then (after the exporter's flush at
/// shutdown) the receiver holds, in the caller's trace, one `submit` span (producer, a child of
/// the caller's span) and three `job` spans (consumer), one per attempt, each a child of the
/// submit span, with the span ids the handler saw, its attempt and outcome as attributes, all
/// under the configured service name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_attempt_spans_are_exported_with_their_parents() {
    let (address, received) = receiver().await;
    // SAFETY: set before anything reads the environment on another thread (this is the only
    // test in this binary, and the exporter is not started yet).
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{address}"));
        std::env::set_var("OTEL_SERVICE_NAME", SERVICE);
    }
    let telemetry = telemetry::init(Options {
        format: LogFormat::Text,
        default_filter: "warn",
        ansi: false,
        writer: std::io::stderr,
        service_name: "unused-default",
    });
    assert!(
        telemetry.exporting(),
        "OTEL_EXPORTER_OTLP_ENDPOINT starts the exporter"
    );

    let queue = unique_queue("otlp");
    let config = config(&[&queue]);
    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "flaky", |call| match call.attempt {
        1 | 2 => Err(JobError::retry("not yet")),
        _ => Ok(None),
    });
    let worker = start_worker(&config, registry, &[&queue]);
    let caller = TraceContext::new_root();

    let job = NewJob::new(&queue, "flaky", &json!({})).with_traceparent(caller);
    let id = dispatcher.submit(job).await.expect("submitted");
    let calls = recorder.wait_for(3, DEADLINE).await;
    worker.stop().await;
    cleanup(
        &dispatcher.open_channel().await.expect("channel"),
        &[&queue],
    )
    .await;
    // The exporter flushes when the guard drops; it blocks, so not on the runtime's thread.
    tokio::task::spawn_blocking(move || drop(telemetry))
        .await
        .expect("flushing the exporter");

    let spans: Vec<(String, Span)> = received
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, span)| span.trace_id == caller.trace_id().to_bytes())
        .cloned()
        .collect();
    assert!(
        spans.iter().all(|(service, _)| service == SERVICE),
        "{spans:?}"
    );
    let submits: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "submit")
        .collect();
    assert_eq!(submits.len(), 1, "one submit span: {spans:?}");
    let submit = submits[0];
    assert_eq!(submit.kind, SpanKind::Producer as i32);
    assert_eq!(
        submit.parent_span_id,
        caller.span_id().to_bytes(),
        "child of the caller"
    );
    assert_eq!(
        string_attribute(submit, "messaging.message.id").as_deref(),
        Some(id.0.as_str())
    );

    let mut jobs: Vec<&Span> = spans
        .iter()
        .map(|(_, s)| s)
        .filter(|s| s.name == "job")
        .collect();
    jobs.sort_by_key(|s| int_attribute(s, "warren.job.attempt"));
    assert_eq!(jobs.len(), 3, "one span per attempt: {spans:?}");
    for (i, (span, call)) in jobs.iter().zip(&calls).enumerate() {
        let attempt = i as i64 + 1;
        assert_eq!(span.kind, SpanKind::Consumer as i32);
        assert_eq!(int_attribute(span, "warren.job.attempt"), Some(attempt));
        assert_eq!(
            span.parent_span_id, submit.span_id,
            "attempt {attempt}: child of submit"
        );
        assert_eq!(
            span.span_id,
            call.trace.span_id().to_bytes(),
            "attempt {attempt}: the span the handler ran in"
        );
        let outcome = if attempt < 3 { "retried" } else { "done" };
        assert_eq!(
            string_attribute(span, "warren.job.outcome").as_deref(),
            Some(outcome)
        );
        assert_eq!(
            string_attribute(span, "messaging.destination.name").as_deref(),
            Some(queue.as_str())
        );
    }
}

/// An OTLP/HTTP receiver on a free port: `POST /v1/traces` with a protobuf body.
async fn receiver() -> (SocketAddr, Received) {
    let received = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(collect))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let address = listener.local_addr().expect("its address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, received)
}

async fn collect(State(received): State<Received>, body: Bytes) -> impl IntoResponse {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new()).into_response();
    };
    let mut received = received.lock().expect("lock");
    for resource in request.resource_spans {
        let service = resource
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| match &v.value {
                Some(AnyValue::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                received.push((service.clone(), span));
            }
        }
    }
    let answer = ExportTraceServiceResponse::default().encode_to_vec();
    ([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response()
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attribute(span: &Span, key: &str) -> Option<String> {
    match attribute(span, key)? {
        AnyValue::StringValue(s) => Some(s.clone()),
        _ => None,
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    match attribute(span, key)? {
        AnyValue::IntValue(n) => Some(*n),
        _ => None,
    }
}
