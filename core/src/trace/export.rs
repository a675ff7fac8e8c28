//! OpenTelemetry export of Warren's spans (cargo feature `otel`): the submit span of each job
//! and the span of each attempt, with exactly the ids the jobs' `traceparent` headers carry.
//!
//! The spans are handed straight to the span processor a binary installs ([`install`]; the
//! `warren` and `warren-worker` binaries install an OTLP/HTTP one when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Not through an OpenTelemetry `Tracer`: a tracer picks
//! span ids itself, and the ids here must be the ones already written into the job (the
//! header goes out before the span ends). Nothing installed: [`start`] returns `None` after
//! one atomic load, so the feature costs nothing where no exporter is configured.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::SystemTime;

use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt, TraceFlags, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanProcessor};

use super::{SpanIds, TraceContext};

static PROCESSOR: OnceLock<Box<dyn SpanProcessor>> = OnceLock::new();

/// Sends every span Warren ends from now on to `processor` (a batch processor with an OTLP
/// exporter, say). Once per process: a second call is refused and returns `false`.
pub fn install(processor: impl SpanProcessor + 'static) -> bool {
    PROCESSOR.set(Box::new(processor)).is_ok()
}

/// Exports what is still buffered and stops the processor; call once, at exit.
pub fn shutdown() {
    if let Some(processor) = PROCESSOR.get() {
        if let Err(err) = processor.force_flush() {
            tracing::warn!("exporting the last spans: {err}");
        }
        let _ = processor.shutdown();
    }
}

/// True when spans are exported.
pub fn is_on() -> bool {
    PROCESSOR.get().is_some()
}

/// The current OpenTelemetry span of the calling code (an application's own instrumentation),
/// as a parent for a job submitted without an explicit one.
pub fn current_parent() -> Option<TraceContext> {
    let cx = opentelemetry::Context::current();
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return None;
    }
    TraceContext::from_parts(
        context.trace_id().to_bytes(),
        context.span_id().to_bytes(),
        context.trace_flags().to_u8(),
    )
}

/// What a span is, in OpenTelemetry's terms.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// A job submitted (published).
    Producer,
    /// One attempt of a job.
    Consumer,
}

/// A span being recorded; exported by [`Span::end`].
pub struct Span {
    ids: SpanIds,
    name: &'static str,
    kind: Kind,
    start: SystemTime,
    attributes: Vec<KeyValue>,
}

/// Starts a span with these ids, or `None` when nothing is exported or the trace is not
/// sampled (the W3C flag: the caller chose not to record it).
pub fn start(name: &'static str, kind: Kind, ids: &SpanIds) -> Option<Span> {
    if !is_on() || !ids.context.is_sampled() {
        return None;
    }
    Some(Span {
        ids: *ids,
        name,
        kind,
        start: SystemTime::now(),
        attributes: vec![KeyValue::new("messaging.system", "rabbitmq")],
    })
}

impl Span {
    /// Adds an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        self.attributes.push(KeyValue::new(key, value));
    }

    /// Ends the span now, failed with `error` if there is one, and hands it to the processor.
    pub fn end(self, error: Option<String>) {
        let Some(processor) = PROCESSOR.get() else {
            return;
        };
        let context = &self.ids.context;
        let span_context = SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes(context.trace_id().to_bytes()),
            opentelemetry::trace::SpanId::from_bytes(context.span_id().to_bytes()),
            TraceFlags::new(context.flags()),
            false,
            TraceState::default(),
        );
        let parent = self
            .ids
            .parent
            .map_or(opentelemetry::trace::SpanId::INVALID, |id| {
                opentelemetry::trace::SpanId::from_bytes(id.to_bytes())
            });
        let status = match error {
            Some(description) => Status::error(description),
            None => Status::Unset,
        };
        processor.on_end(SpanData {
            span_context,
            parent_span_id: parent,
            parent_span_is_remote: self.ids.parent.is_some(),
            span_kind: match self.kind {
                Kind::Producer => SpanKind::Producer,
                Kind::Consumer => SpanKind::Consumer,
            },
            name: Cow::Borrowed(self.name),
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes: self.attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: scope().clone(),
        });
    }
}

fn scope() -> &'static InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE.get_or_init(|| {
        InstrumentationScope::builder("warren")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build()
    })
}
