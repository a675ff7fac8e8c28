//! Job handlers: what a worker runs for each job kind.
//!
//! A handler is an async function of the job's payload (a `serde_json::Value`, or your own
//! type that derives `Deserialize`) and a [`JobContext`]. It returns
//! `Ok(result)` when the job is done, [`JobError::Retry`] when a later attempt may succeed, or
//! [`JobError::Permanent`] when no attempt can. Handlers are registered by kind in a
//! [`Registry`]:
//!
//! ```
//! use warren_workers::{JobContext, JobError, Registry};
//!
//! #[derive(serde::Deserialize)]
//! struct Email {
//!     to: String,
//! }
//!
//! let mut registry = Registry::new();
//! // Typed: a payload without `to` is dead-lettered before the handler runs.
//! registry.register("send", |email: Email, ctx: JobContext| async move {
//!     tracing::info!(job = %ctx.id, "sending to {}", email.to);
//!     Ok(None)
//! });
//! // Untyped: any JSON.
//! registry.register("greet", |payload: serde_json::Value, ctx: JobContext| async move {
//!     let name = payload["name"].as_str().ok_or_else(|| JobError::permanent("no name"))?;
//!     tracing::info!(job = %ctx.id, "hello {name}");
//!     Ok(None)
//! });
//! ```
//!
//! A handler that panics or overruns its queue's `job_timeout` counts as a retryable failure;
//! the worker process keeps running.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde_json::Value;
use warren_core::JobId;
use warren_core::envelope::{self, PayloadError};
use warren_core::trace::SpanIds;

/// What a handler knows about the job it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub id: JobId,
    pub kind: String,
    pub queue: Arc<str>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// True when the broker delivers this attempt again (a worker died while running it).
    pub redelivered: bool,
    /// This attempt's trace context ([`JobContext::trace`]).
    pub trace: SpanIds,
}

impl JobContext {
    /// This attempt's span: its trace id (the job's, the same on every attempt), its own span
    /// id (new on every attempt) and its parent's, the span that submitted the job (the
    /// `traceparent` header; `None` when the job came without a valid one, and this attempt
    /// started a trace of its own). Hand [`SpanIds::context`] on as the `traceparent` of
    /// whatever the handler calls, to continue the trace there.
    pub fn trace(&self) -> &SpanIds {
        &self.trace
    }
}

/// A handler's result: `Ok(Some(value))` is done with a result, `Ok(None)` done without one.
pub type HandlerResult = Result<Option<Value>, JobError>;

/// A failed job, and whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// A later attempt may succeed (a timeout, a service that is down): retried with backoff
    /// while attempts are left, then dead-lettered.
    #[error("{0}")]
    Retry(String),
    /// No attempt can succeed (bad input): dead-lettered at once.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    pub fn retry(reason: impl Into<String>) -> JobError {
        JobError::Retry(reason.into())
    }

    pub fn permanent(reason: impl Into<String>) -> JobError {
        JobError::Permanent(reason.into())
    }
}

/// Anything that can run a job whose payload is a `P`. Implemented for every
/// `Fn(P, JobContext) -> Future`, where `P` is `serde_json::Value` or any type that derives
/// `Deserialize`.
pub trait Handler<P>: Send + Sync + 'static {
    fn call(&self, payload: P, ctx: JobContext) -> BoxFuture<'static, HandlerResult>;
}

impl<F, P, Fut> Handler<P> for F
where
    F: Fn(P, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, payload: P, ctx: JobContext) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self(payload, ctx))
    }
}

/// A registered handler: reads the body as the handler's payload type, then starts the job.
pub(crate) type Start = dyn Fn(&[u8], JobContext) -> Result<BoxFuture<'static, HandlerResult>, PayloadError>
    + Send
    + Sync;

/// Handlers by job kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<Start>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Registers `handler` for jobs of `kind`, replacing any earlier one. The handler's first
    /// argument says how the payload is read: `serde_json::Value` takes any JSON; a type that
    /// derives `Deserialize` is parsed straight from the body (faster), and a payload that does
    /// not fit it is dead-lettered as a permanent failure with serde's reason.
    pub fn register<P, H>(&mut self, kind: impl Into<String>, handler: H) -> &mut Registry
    where
        P: DeserializeOwned + 'static,
        H: Handler<P>,
    {
        let start = move |body: &[u8], ctx: JobContext| {
            let payload = envelope::parse_payload::<P>(body)?;
            Ok(handler.call(payload, ctx))
        };
        self.handlers.insert(kind.into(), Arc::new(start));
        self
    }

    /// The handler for `kind`, if any.
    pub(crate) fn get(&self, kind: &str) -> Option<&Start> {
        self.handlers.get(kind).map(|start| &**start)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}
