//! `POST /v1/queues/{queue}/jobs` and `POST /v1/queues/{queue}/jobs:batch`: submitting jobs.
//! A job is answered 202 with its id only once the broker confirmed it (and routed it to its
//! queue); every job is submitted through the service's [`warren_dispatcher::waiter::Waiter`],
//! so `GET /v1/jobs/{id}/wait` can tell its outcome.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use warren_core::envelope::NewJob;
use warren_core::trace::{self, TraceContext};

use crate::AppState;
use crate::body::JsonBody;
use crate::problem::{Problem, ProblemBody};
use crate::routes::PathParams;

/// One job to submit.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The job kind: which handler runs it.
    #[schema(example = "send")]
    pub kind: String,
    /// The job's payload: any JSON value, at most `jobs.max_payload_bytes` once serialised.
    #[schema(value_type = Object, example = json!({"to": "a@example.com"}))]
    pub payload: serde_json::Value,
    /// The job id (default: a new UUIDv7); the handler sees it. Submitting again with the same
    /// id lets a handler recognise a repeat.
    #[serde(default)]
    pub id: Option<String>,
    /// Hold the job this long before its queue gets it: a duration like `"90s"`, `"10m"`,
    /// `"1h 30m"`, or a number of seconds (whole seconds, up to the delay levels' maximum of
    /// about 48.5 days).
    #[serde(default)]
    pub delay: Option<Delay>,
    /// The job's priority (0-255); the queue must take priorities (`max_priority`).
    #[serde(default)]
    pub priority: Option<u8>,
}

/// A delay: a duration's text or a number of seconds.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Delay {
    /// Seconds.
    Seconds(u64),
    /// A duration like `"90s"` or `"1h 30m"`.
    #[schema(example = "90s")]
    Text(String),
}

impl<'de> Deserialize<'de> for Delay {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Delay, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Number(n) if n.as_u64().is_some() => {
                Ok(Delay::Seconds(n.as_u64().unwrap_or_default()))
            }
            serde_json::Value::String(text) => Ok(Delay::Text(text)),
            other => Err(serde::de::Error::custom(format!(
                "{other} is not a delay: write a duration like \"90s\" or a whole number of \
                 seconds"
            ))),
        }
    }
}

impl JobRequest {
    /// The job for `queue`, or 400 naming the field (the delay's text).
    pub fn into_job(self, queue: &str) -> Result<NewJob, Problem> {
        let delay = match &self.delay {
            Some(Delay::Text(text)) => Some(parse_delay(text)?),
            Some(Delay::Seconds(seconds)) => Some(Duration::from_secs(*seconds)),
            None => None,
        };
        let mut job = NewJob::new(queue, self.kind, &self.payload);
        job.id = self.id;
        job.delay = delay;
        job.priority = self.priority;
        Ok(job)
    }
}

fn parse_delay(text: &str) -> Result<Duration, Problem> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        Problem::field(
            "delay",
            format!("`delay`: `{text}` is not a duration like \"90s\" or \"1h 30m\": {err}"),
        )
    })
}

/// A job the broker confirmed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    /// The job id.
    pub id: String,
}

/// Submit one job; 202 with its id once the broker confirmed it.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/jobs",
    tag = "jobs",
    params(("queue" = String, Path, description = "A work queue of the config")),
    request_body(content = JobRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Confirmed by the broker", body = Accepted),
        (status = 400, description = "Invalid JSON, or a missing or invalid field (named in `field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 403, description = "The token's scope is not `submit` or `admin`", body = ProblemBody),
        (status = 404, description = "No such queue in the config (or on the broker)", body = ProblemBody),
        (status = 413, description = "The body or the payload is too large", body = ProblemBody),
        (status = 415, description = "The body is not `application/json`", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable, or blocking publishers (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<Arc<AppState>>,
    PathParams(queue): PathParams<String>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<JobRequest>,
) -> Result<(StatusCode, Json<Accepted>), Problem> {
    state.check_queue(&queue).await?;
    let job = request.into_job(&queue)?;
    let job = with_request_context(job, &headers);
    state.connected().await?;
    let id = state
        .waiter
        .submit(job)
        .await
        .map_err(|err| Problem::from_submit(&err))?;
    Ok((StatusCode::ACCEPTED, Json(Accepted { id: id.0 })))
}

/// What a job takes from its HTTP request besides the body: the caller's W3C trace context.
/// The job's submit span becomes a child of the request's `traceparent` (for a batch, each
/// job's), and a valid `tracestate` goes with it. A missing, repeated or invalid `traceparent`
/// is ignored, as the W3C recommendation asks: the job starts a trace of its own (and then
/// the `tracestate` is ignored too).
fn with_request_context(job: NewJob, headers: &HeaderMap) -> NewJob {
    let single = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok(),
            _ => None,
        }
    };
    let Some(parent) = single(trace::TRACEPARENT).and_then(TraceContext::parse) else {
        return job;
    };
    let job = job.with_traceparent(parent);
    // Repeated tracestate headers are one list (RFC 9110 field lines), joined with commas.
    let states: Vec<&str> = headers
        .get_all(trace::TRACESTATE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .collect();
    match states.is_empty() {
        true => job,
        false => job.with_tracestate(states.join(",")),
    }
}

/// The outcome of one item of a batch.
#[derive(Debug, Serialize, ToSchema)]
pub struct ItemResult {
    /// 202 when the broker confirmed the job; else the status a single submit would have had
    /// (400, 404, 413, 503).
    pub status: u16,
    /// The job id, when accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Why not, when not accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The item's field at fault, when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// What a batch did: one result per item, in the order sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchResult {
    /// Items the broker confirmed.
    pub accepted: usize,
    /// Items not submitted (see their `status` and `error`).
    pub failed: usize,
    pub results: Vec<ItemResult>,
}

/// The most items one batch may hold.
pub const MAX_BATCH: usize = 10_000;

/// Submit many jobs, pipelined (up to `dispatcher.max_in_flight` confirms outstanding). 202
/// when every item was confirmed; 207 with a status per item when some were not. A body that
/// is not an array of valid jobs is refused whole (400, nothing submitted).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/jobs:batch",
    tag = "jobs",
    params(("queue" = String, Path, description = "A work queue of the config")),
    request_body(content = Vec<JobRequest>, content_type = "application/json"),
    responses(
        (status = 202, description = "Every item confirmed by the broker", body = BatchResult),
        (status = 207, description = "Some items not submitted: see each item's status", body = BatchResult),
        (status = 400, description = "Invalid JSON, or a missing or invalid field (`[i].field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 403, description = "The token's scope is not `submit` or `admin`", body = ProblemBody),
        (status = 404, description = "No such queue in the config", body = ProblemBody),
        (status = 413, description = "The body is too large", body = ProblemBody),
        (status = 415, description = "The body is not `application/json`", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable: nothing submitted (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn batch(
    State(state): State<Arc<AppState>>,
    PathParams(queue): PathParams<String>,
    headers: HeaderMap,
    JsonBody(requests): JsonBody<Vec<JobRequest>>,
) -> Result<(StatusCode, Json<BatchResult>), Problem> {
    state.check_queue(&queue).await?;
    if requests.is_empty() {
        return Err(Problem::field(
            "[]",
            "the batch is empty: send at least one job",
        ));
    }
    if requests.len() > MAX_BATCH {
        return Err(Problem::field(
            "[]",
            format!("a batch holds at most {MAX_BATCH} jobs"),
        ));
    }
    let mut jobs = Vec::with_capacity(requests.len());
    for (i, request) in requests.into_iter().enumerate() {
        let job = request
            .into_job(&queue)
            .map_err(|p| p.at(format!("[{i}].delay")))?;
        jobs.push(with_request_context(job, &headers));
    }
    state.connected().await?;
    let window = state.config.dispatcher.max_in_flight.max(1);
    let waiter = &state.waiter;
    let results: Vec<ItemResult> = futures::stream::iter(jobs)
        .map(|job| async move {
            match waiter.submit(job).await {
                Ok(id) => ItemResult {
                    status: StatusCode::ACCEPTED.as_u16(),
                    id: Some(id.0),
                    error: None,
                    field: None,
                },
                Err(err) => {
                    let problem = Problem::from_submit(&err);
                    ItemResult {
                        status: problem.status.as_u16(),
                        id: None,
                        error: Some(problem.body.error),
                        field: problem.body.field,
                    }
                }
            }
        })
        .buffered(window)
        .collect()
        .await;
    let accepted = results.iter().filter(|r| r.id.is_some()).count();
    let failed = results.len() - accepted;
    let status = match failed {
        0 => StatusCode::ACCEPTED,
        _ => StatusCode::MULTI_STATUS,
    };
    Ok((
        status,
        Json(BatchResult {
            accepted,
            failed,
            results,
        }),
    ))
}
