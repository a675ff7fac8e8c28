//! Logs and span export for Warren's binaries (cargo feature `cli`): `warren-worker` and
//! `warren serve` start them the same way ([`init`]).
//!
//! - **Logs**: human-readable lines ([`LogFormat::Text`], colour only on a terminal), or one
//!   JSON object per line ([`LogFormat::Json`], `--log-format json` / `WARREN_LOG_FORMAT`):
//!   `timestamp`, `level`, `target`, `span` (the innermost span's name), the fields of every
//!   span the event is in (a job's id, queue, kind, attempt, trace and span ids), then the
//!   event's own fields and `message`. Producer-controlled text (a job id, a kind) is
//!   JSON-escaped, so a hostile value cannot forge a line. `RUST_LOG` sets the level.
//! - **Spans** (feature `otel`): when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the submit and attempt spans go to that
//!   OTLP/HTTP (protobuf) endpoint in batches, named by `OTEL_SERVICE_NAME` (default: the
//!   binary's name); exported what is left when the [`Telemetry`] guard is dropped. Unset: no
//!   exporter at all.

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colour on a terminal, unless `NO_COLOR`).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Where and how to log, and what to call this process in exported spans.
pub struct Options<W> {
    pub format: LogFormat,
    /// The filter when `RUST_LOG` is not set.
    pub default_filter: &'static str,
    /// Colour in text lines.
    pub ansi: bool,
    pub writer: W,
    /// `service.name` of exported spans when `OTEL_SERVICE_NAME` is not set.
    pub service_name: &'static str,
}

/// Keep until exit: dropping it exports the spans still buffered (feature `otel`).
#[must_use = "dropping the guard stops span export"]
pub struct Telemetry {
    exporting: bool,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if self.exporting {
            warren_core::trace::export::shutdown();
        }
    }
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }
}

/// Installs the global subscriber (and, with feature `otel` and an endpoint configured, the
/// span exporter). A failure to start the exporter is logged and leaves it off: tracing must
/// never keep jobs from running.
pub fn init<W>(options: Options<W>) -> Telemetry
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| options.default_filter.into());
    let (text, json) = match options.format {
        LogFormat::Text => (
            Some(
                tracing_subscriber::fmt::layer()
                    .with_ansi(options.ansi)
                    .with_writer(options.writer),
            ),
            None,
        ),
        LogFormat::Json => (
            None,
            Some(
                tracing_subscriber::fmt::layer()
                    .fmt_fields(JsonFields::new())
                    .event_format(JsonLines)
                    .with_writer(options.writer),
            ),
        ),
    };
    let _ = FORMAT.set(options.format);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::filter::filter_fn(|meta| {
            warren_core::secret::safe_to_log(meta.target(), *meta.level())
        }))
        .with(text)
        .with(json)
        .init();
    let exporting = start_export(options.service_name);
    Telemetry { exporting }
}

/// The format [`init`] chose, for [`notice`].
static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Writes `text` to standard error whatever `RUST_LOG` says (a server's "listening on"
/// line, which scripts wait for): as is, or with `--log-format json` as a JSON object of
/// its own (`timestamp`, `level`, `target`, `message`), so that every line stays JSON.
pub fn notice(target: &str, text: &str) {
    match FORMAT.get() {
        Some(LogFormat::Json) => {
            // By hand, to keep `message` last: the value a script reads ends the line.
            let json = |value: &str| Value::from(value).to_string();
            let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
            eprintln!(
                "{{\"timestamp\":{},\"level\":\"INFO\",\"target\":{},\"message\":{}}}",
                json(&now),
                json(target),
                json(text)
            );
        }
        _ => eprintln!("{text}"),
    }
}

/// One JSON object per event: see the module's documentation.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            humantime::format_rfc3339_micros(std::time::SystemTime::now())
                .to_string()
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        if let Some(scope) = ctx.event_scope() {
            let mut innermost = None;
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                // With `JsonFields`, a span's recorded fields are a JSON object's text.
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(fields)
                {
                    line.extend(fields);
                }
            }
            if let Some(name) = innermost {
                line.insert("span".into(), name.into());
            }
        }
        event.record(&mut Fields(&mut line));
        let text = serde_json::to_string(&Value::Object(line)).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// An event's fields into the line's object.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = warren_core::error_chain(value);
        self.0.insert(field.name().into(), text.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(not(feature = "otel"))]
fn start_export(_service_name: &str) -> bool {
    false
}

/// Starts the OTLP/HTTP span exporter if an endpoint is configured; see the module docs.
#[cfg(feature = "otel")]
fn start_export(service_name: &str) -> bool {
    let configured = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    if !configured("OTEL_EXPORTER_OTLP_ENDPOINT")
        && !configured("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    {
        return false;
    }
    match otlp::processor(service_name) {
        Ok(processor) => warren_core::trace::export::install(processor),
        Err(err) => {
            tracing::error!("OpenTelemetry export is off: {err}");
            false
        }
    }
}

#[cfg(feature = "otel")]
mod otlp {
    use std::sync::Arc;

    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::{BatchSpanProcessor, SpanProcessor};

    /// A batch span processor with an OTLP/HTTP protobuf exporter (endpoint, headers and
    /// timeout from the standard `OTEL_EXPORTER_OTLP_*` variables).
    pub(super) fn processor(service_name: &str) -> Result<BatchSpanProcessor, String> {
        let client = client()?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(client)
            .build()
            .map_err(|err| err.to_string())?;
        let name = std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| service_name.to_owned());
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&Resource::builder().with_service_name(name).build());
        Ok(processor)
    }

    /// The exporter's HTTP client: blocking (the batch processor exports from a thread of its
    /// own), rustls with ring and the system's roots for an `https://` collector. Built on a
    /// thread of its own: a blocking reqwest client may not be made inside an async runtime.
    fn client() -> Result<reqwest::blocking::Client, String> {
        std::thread::spawn(|| {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|err| err.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            reqwest::blocking::Client::builder()
                .tls_backend_preconfigured(tls)
                .build()
                .map_err(|err| err.to_string())
        })
        .join()
        .map_err(|_| "building the OTLP HTTP client panicked".to_owned())?
    }
}
