//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` header every
//! job carries, so that a job can be followed from the request that submitted it to each
//! attempt of its handler, across processes (docs/PROTOCOL.md, "Trace context").
//!
//! Where it sits in a job's life:
//!
//! 1. **Submit** — [`crate::envelope::NewJob::encode`] makes the submit span's context: a
//!    [`TraceContext::child`] of the caller's (`NewJob::with_traceparent`), or a new trace, and
//!    writes it as the job's `traceparent` header.
//! 2. **Attempt** — the worker reads the header ([`TraceContext::from_header`]) and runs each
//!    attempt in a span of its own: a child of the submit span, with a new span id.
//! 3. **Copies** — retries and dead letters carry the header unchanged
//!    ([`crate::envelope::CARRIED_HEADERS`]), but only a valid one: every attempt's parent is
//!    the submit span.
//!
//! Everything here reads untrusted text: a producer's header that is not a valid
//! `traceparent` is treated as absent — never a panic, never carried further. Valid means
//! exactly what the W3C recommendation says: version `00` is `00-<32 hex>-<16 hex>-<2 hex>`,
//! 55 characters, lowercase hex, neither id all zeros; version `ff` is invalid; a higher
//! version is read by the rules the recommendation gives for future versions (its first four
//! fields as version 00 has them, then the end or a `-`), and written on as version `00`.
//!
//! Hand-written (about a hundred lines): the `opentelemetry` crate's propagator needs the
//! OpenTelemetry API in every build and a `Context` per job, while Warren's libraries must
//! carry trace context with the `otel` feature off too; no small, well-kept crate does only
//! this.
//!
//! With the `otel` cargo feature, `export` sends the submit and attempt spans, with exactly
//! these ids, to the OpenTelemetry span processor the binary installed.

use std::fmt;

/// The `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// The `tracestate` header name (vendor-specific trace data, carried if valid).
pub const TRACESTATE: &str = "tracestate";
/// The longest `tracestate` Warren carries: the 512 characters the recommendation asks every
/// vendor to propagate. A longer one is dropped whole (cutting it could split a member).
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// The most list members a `tracestate` may have.
const MAX_TRACESTATE_MEMBERS: usize = 32;
/// Length of a version-00 `traceparent`.
const VERSION_00_LEN: usize = 55;

/// Trace flag: the caller may have recorded this trace.
pub const SAMPLED: u8 = 0x01;
/// Trace flag (Trace Context level 2): the trace id's right 7 bytes are random.
pub const RANDOM: u8 = 0x02;

/// A 16-byte trace id, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// An 8-byte span id, never all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

/// One `traceparent`: the trace, the span that is the parent of whatever receives it, and the
/// trace flags.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    flags: u8,
}

impl TraceContext {
    /// A new trace: random trace and span ids, sampled (the submitter had no trace of its own).
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            flags: SAMPLED | RANDOM,
        }
    }

    /// A span whose parent is this one: same trace, a new span id, the known flags kept (the
    /// recommendation wants flags it does not define written as zero).
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id,
            span_id: SpanId::random(),
            flags: self.flags & (SAMPLED | RANDOM),
        }
    }

    /// A context from its parts; `None` if either id is all zeros.
    pub fn from_parts(trace_id: [u8; 16], span_id: [u8; 8], flags: u8) -> Option<TraceContext> {
        Some(TraceContext {
            trace_id: TraceId::new(trace_id)?,
            span_id: SpanId::new(span_id)?,
            flags,
        })
    }

    /// Reads a `traceparent` value; `None` for anything that is not a valid one.
    pub fn parse(value: &str) -> Option<TraceContext> {
        TraceContext::from_header(value.as_bytes())
    }

    /// [`TraceContext::parse`] on raw header bytes (an AMQP long string need not be UTF-8).
    pub fn from_header(value: &[u8]) -> Option<TraceContext> {
        if value.len() < VERSION_00_LEN {
            return None;
        }
        let version = hex_byte(value[0], value[1])?;
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        match version {
            // Version 00 is exactly 55 characters.
            0x00 if value.len() != VERSION_00_LEN => return None,
            0xff => return None,
            // A future version: what follows the flags is its own, after a dash.
            _ if value.len() > VERSION_00_LEN && value[VERSION_00_LEN] != b'-' => return None,
            _ => {}
        }
        let trace_id = TraceId::new(hex_array(&value[3..35])?)?;
        let span_id = SpanId::new(hex_array(&value[36..52])?)?;
        let flags = hex_byte(value[53], value[54])?;
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    pub fn flags(&self) -> u8 {
        self.flags
    }

    pub fn is_sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

/// The version-00 `traceparent` text, written without allocating.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

impl TraceId {
    /// `None` for all zeros (invalid by the recommendation).
    pub fn new(bytes: [u8; 16]) -> Option<TraceId> {
        (bytes != [0; 16]).then_some(TraceId(bytes))
    }

    fn random() -> TraceId {
        loop {
            if let Some(id) = TraceId::new(rand::random()) {
                return id;
            }
        }
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }
}

impl SpanId {
    /// `None` for all zeros (invalid by the recommendation).
    pub fn new(bytes: [u8; 8]) -> Option<SpanId> {
        (bytes != [0; 8]).then_some(SpanId(bytes))
    }

    fn random() -> SpanId {
        loop {
            if let Some(id) = SpanId::new(rand::random()) {
                return id;
            }
        }
    }

    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }
}

/// Lowercase hex of an id (at most 16 bytes), written to the formatter in one piece: a worker
/// formats three ids into every job's span at info level, and a `write!` per byte made that a
/// fifth of its instructions per job (`bench/callgrind`).
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut buffer = [0u8; 32];
    let bytes = &bytes[..bytes.len().min(16)];
    let hex = &mut buffer[..bytes.len() * 2];
    for (pair, byte) in hex.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    f.write_str(std::str::from_utf8(hex).map_err(|_| fmt::Error)?)
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// One lowercase hex digit (the recommendation allows no uppercase).
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(high: u8, low: u8) -> Option<u8> {
    Some((hex_digit(high)? << 4) | hex_digit(low)?)
}

fn hex_array<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = hex_byte(pair[0], pair[1])?;
    }
    Some(out)
}

/// The ids of one span Warren makes (a submit, or one attempt of a job): its context, which
/// its children name as their parent, and its own parent's span id (`None` for the first span
/// of a trace).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanIds {
    pub context: TraceContext,
    pub parent: Option<SpanId>,
}

impl SpanIds {
    /// A child of `parent` if there is one, else the first span of a new trace.
    pub fn child_of(parent: Option<&TraceContext>) -> SpanIds {
        match parent {
            Some(parent) => SpanIds {
                context: parent.child(),
                parent: Some(parent.span_id()),
            },
            None => SpanIds {
                context: TraceContext::new_root(),
                parent: None,
            },
        }
    }

    pub fn trace_id(&self) -> TraceId {
        self.context.trace_id()
    }

    pub fn span_id(&self) -> SpanId {
        self.context.span_id()
    }

    pub fn parent_id(&self) -> Option<SpanId> {
        self.parent
    }
}

/// True for a `tracestate` value Warren carries: at most [`MAX_TRACESTATE_BYTES`], at most 32
/// comma-separated members, each empty or `key=value` as the recommendation spells them (key:
/// lowercase letters, digits, `_-*/`, optionally `tenant@system`; value: printable ASCII
/// without `,` and `=`, not ending in a space). Anything else is dropped whole.
pub fn is_valid_tracestate(value: &[u8]) -> bool {
    if value.len() > MAX_TRACESTATE_BYTES || !value.is_ascii() {
        return false;
    }
    let mut members = 0;
    for member in value.split(|&c| c == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        members += 1;
        if members > MAX_TRACESTATE_MEMBERS {
            return false;
        }
        let Some(eq) = member.iter().position(|&c| c == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        if !valid_key(key) || !valid_value(value) {
            return false;
        }
    }
    true
}

fn valid_key(key: &[u8]) -> bool {
    let simple = |part: &[u8], max: usize, first_digit: bool| {
        !part.is_empty()
            && part.len() <= max
            && (part[0].is_ascii_lowercase() || (first_digit && part[0].is_ascii_digit()))
            && part.iter().all(|&c| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || matches!(c, b'_' | b'-' | b'*' | b'/')
            })
    };
    match key.iter().position(|&c| c == b'@') {
        None => simple(key, 256, false),
        Some(at) => simple(&key[..at], 241, true) && simple(&key[at + 1..], 14, false),
    }
}

fn valid_value(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && value.last() != Some(&b' ')
        && value
            .iter()
            .all(|&c| (0x20..=0x7e).contains(&c) && c != b',' && c != b'=')
}

#[cfg(feature = "otel")]
pub mod export;

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let ctx = TraceContext::parse(VALID).expect("valid");
        assert_eq!(
            ctx.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(ctx.span_id().to_string(), "00f067aa0ba902b7");
        assert!(ctx.is_sampled());
        assert_eq!(ctx.to_string(), VALID);
        let unsampled = TraceContext::parse(&VALID.replace("-01", "-00")).expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn hostile_values_are_absent() {
        let long = "0".repeat(100_000);
        let hostile = [
            "",
            "00",
            "garbage",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid; version 00 must be exactly 55 characters.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Short ids, wrong separators, non-hex.
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-011",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bg-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Multibyte characters where hex belongs (must not panic on a char boundary).
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
            "ééééééééééééééééééééééééééééééééééééééééééééééééééééééé",
            long.as_str(),
        ];
        for value in hostile {
            assert_eq!(TraceContext::parse(value), None, "{value:?}");
        }
        assert_eq!(TraceContext::from_header(&[0xff; 55]), None);
        assert_eq!(TraceContext::from_header(&[b'-'; 55]), None);
    }

    #[test]
    fn random_near_misses_never_panic_and_round_trip_when_valid() {
        use rand::Rng;
        let alphabet: Vec<char> = "0123456789abcdefABCDEF-x\u{e9}\u{0}".chars().collect();
        let mut rng = rand::thread_rng();
        for _ in 0..20_000 {
            let len = rng.gen_range(50..62);
            let mut value: Vec<char> = VALID.chars().collect();
            value.resize(len, '0');
            for _ in 0..rng.gen_range(0..4) {
                let at = rng.gen_range(0..value.len());
                value[at] = alphabet[rng.gen_range(0..alphabet.len())];
            }
            let value: String = value.into_iter().collect();
            if let Some(ctx) = TraceContext::parse(&value) {
                assert_eq!(
                    TraceContext::parse(&ctx.to_string()),
                    Some(ctx),
                    "{value:?}"
                );
                assert!(value.is_ascii());
            }
        }
    }

    #[test]
    fn future_versions_are_read_as_the_recommendation_says() {
        let v1 = VALID.replacen("00", "01", 1);
        let ctx = TraceContext::parse(&v1).expect("same layout");
        assert_eq!(ctx.to_string(), VALID, "written on as version 00");
        let with_more = format!("{v1}-what-comes-next");
        assert!(TraceContext::parse(&with_more).is_some());
        // After the flags: the end, or a dash.
        assert_eq!(TraceContext::parse(&format!("{v1}x")), None);
        // Shorter than version 00: not read.
        assert_eq!(TraceContext::parse(&v1[..54]), None);
    }

    #[test]
    fn children_share_the_trace_not_the_span() {
        let parent = TraceContext::parse(VALID).expect("valid");
        let a = parent.child();
        let b = parent.child();
        assert_eq!(a.trace_id(), parent.trace_id());
        assert_ne!(a.span_id(), parent.span_id());
        assert_ne!(a.span_id(), b.span_id());
        assert!(a.is_sampled());
        let odd_flags = TraceContext::parse(&VALID.replace("-01", "-ff")).expect("valid");
        assert_eq!(odd_flags.child().flags(), SAMPLED | RANDOM);

        let ids = SpanIds::child_of(Some(&parent));
        assert_eq!(ids.parent_id(), Some(parent.span_id()));
        assert_eq!(ids.trace_id(), parent.trace_id());
        let root = SpanIds::child_of(None);
        assert_eq!(root.parent_id(), None);
        assert_ne!(root.trace_id(), parent.trace_id());
        assert!(TraceContext::parse(&root.context.to_string()).is_some());
    }

    #[test]
    fn tracestate_is_checked() {
        for good in [
            "",
            "congo=t61rcWkgMzE",
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            " a=1 , b=2 ,,",
            "tenant1@sys=x",
        ] {
            assert!(is_valid_tracestate(good.as_bytes()), "{good:?}");
        }
        let too_many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        let too_long = format!("k={}", "v".repeat(600));
        for bad in [
            "no-equals",
            "Upper=1",
            "k=a,b",
            "k=",
            "k=a=b",
            "k=t\tb",
            "k=é",
            too_many.as_str(),
            too_long.as_str(),
        ] {
            assert!(!is_valid_tracestate(bad.as_bytes()), "{bad:?}");
        }
    }
}
