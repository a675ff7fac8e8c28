//! The dead-letter workbench over HTTP: `GET /v1/queues/{queue}/dead` (list),
//! `GET /v1/queues/{queue}/dead/{id}` (show), `POST /v1/queues/{queue}/dead:replay` and
//! `POST /v1/queues/{queue}/dead:purge`, the library calls behind `warren dlq`
//! ([`warren_dispatcher::dlq`]) with the same filters and the same JSON.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warren_dispatcher::dlq::{
    self, DeadJob, DeadRecord, Filter, PurgeSummary, ReplayOptions, ReplaySummary,
};

use crate::AppState;
use crate::body::JsonBody;
use crate::problem::{Problem, ProblemBody, query_problem};
use crate::routes::PathParams;

/// The most dead letters one list answers with.
pub const MAX_LIST: u64 = 10_000;
/// How many a list answers with when no `limit` is given.
pub const DEFAULT_LIST: u64 = 100;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// At most this many (default 100, at most 10000).
    pub limit: Option<u64>,
    /// Only jobs of this kind.
    pub kind: Option<String>,
    /// Only jobs of this failure class (permanent, exhausted, malformed, unknown-kind,
    /// delivery-limit, ...).
    pub class: Option<String>,
}

/// The dead letters listed, and what the pass saw.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadList {
    /// One record per dead letter, as `warren dlq list --json` prints them: {id, kind,
    /// attempts, class, reason, failed_at, replayed, payload_bytes, payload_preview, ...}.
    #[schema(value_type = Vec<Object>)]
    pub dead_letters: Vec<DeadRecord>,
    /// Records listed.
    pub listed: u64,
    /// Dead letters read to find them.
    pub read: u64,
    /// The dead-letter queue's depth when read.
    pub total: u64,
}

/// List the dead letters of a work queue (read from `<queue>.dead`, left where they are).
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/dead",
    tag = "dead letters",
    params(("queue" = String, Path, description = "A work queue of the config"), ListQuery),
    responses(
        (status = 200, description = "The dead letters", body = DeadList),
        (status = 400, description = "An invalid query parameter (named in `field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 404, description = "No such queue in the config, or its dead-letter queue does not exist", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<Arc<AppState>>,
    PathParams(queue): PathParams<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<DeadList>, Problem> {
    let Query(query) = query.map_err(|r| query_problem(&r))?;
    state.check_queue(&queue).await?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST);
    if limit > MAX_LIST {
        return Err(Problem::field(
            "limit",
            format!("`limit`: at most {MAX_LIST}"),
        ));
    }
    let filter = Filter {
        kind: query.kind,
        class: query.class,
        ..Filter::default()
    };
    state.connected().await?;
    let mut records = Vec::new();
    let summary = dlq::list(
        state.waiter.dispatcher(),
        &queue,
        &filter,
        Some(limit),
        |r| records.push(r),
    )
    .await
    .map_err(|err| Problem::from_dlq(&err))?;
    Ok(Json(DeadList {
        dead_letters: records,
        listed: summary.listed,
        read: summary.read,
        total: summary.total,
    }))
}

/// Show one dead letter: the whole job, every property and header (as `warren dlq show
/// --json`).
#[utoipa::path(
    get,
    path = "/v1/queues/{queue}/dead/{id}",
    tag = "dead letters",
    params(
        ("queue" = String, Path, description = "A work queue of the config"),
        ("id" = String, Path, description = "The job id"),
    ),
    responses(
        (status = 200, description = "The dead letter: the record's fields and {properties, headers, payload | payload_text, redelivered}", body = Object),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 404, description = "No such queue, or no dead letter with this id", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn show(
    State(state): State<Arc<AppState>>,
    PathParams((queue, id)): PathParams<(String, String)>,
) -> Result<Json<DeadJob>, Problem> {
    state.check_queue(&queue).await?;
    state.connected().await?;
    let found = dlq::show(state.waiter.dispatcher(), &queue, &id)
        .await
        .map_err(|err| Problem::from_dlq(&err))?;
    found.map(Json).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("no dead letter with this id in `{queue}.dead`"),
        )
        .at("id")
    })
}

/// Which dead letters to replay: `ids`, `all` or `limit` (at least one), narrowed by `kind`
/// and `class`; as `warren dlq replay`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Only these job ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Every dead letter the filters select.
    #[serde(default)]
    pub all: bool,
    /// At most this many.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Only jobs of this kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only jobs of this failure class.
    #[serde(default)]
    pub class: Option<String>,
    /// At most this many jobs per second (0.01 to 1000000).
    #[serde(default)]
    pub rate: Option<f64>,
}

/// Send dead letters back to their work queue, each with a fresh attempt count; a dead letter
/// is removed only once the broker confirmed its copy. 200 with the summary of
/// `warren dlq replay --json` ({moved, remaining, skipped, failed}).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/dead:replay",
    tag = "dead letters",
    params(("queue" = String, Path, description = "A work queue of the config")),
    request_body(content = ReplayRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What the replay did: {moved, remaining, skipped: {count, examples}, failed: {count, examples}}", body = Object),
        (status = 400, description = "Invalid JSON, or a missing or invalid field (named in `field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 403, description = "The token's scope is not `admin`", body = ProblemBody),
        (status = 404, description = "No such queue in the config or on the broker", body = ProblemBody),
        (status = 413, description = "The body is too large", body = ProblemBody),
        (status = 415, description = "The body is not `application/json`", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable, or the replay stopped part-way (`summary` says how far)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn replay(
    State(state): State<Arc<AppState>>,
    PathParams(queue): PathParams<String>,
    JsonBody(request): JsonBody<ReplayRequest>,
) -> Result<Json<ReplaySummary>, Problem> {
    state.check_queue(&queue).await?;
    if request.ids.is_empty() && !request.all && request.limit.is_none() {
        return Err(Problem::field(
            "all",
            "say which dead letters to replay: `ids`, `limit`, or `\"all\": true`",
        ));
    }
    if request.all && request.limit.is_some() {
        return Err(Problem::field(
            "limit",
            "`limit` and `all` exclude each other",
        ));
    }
    if request
        .rate
        .is_some_and(|rate| dlq::check_rate(rate).is_err())
    {
        let rates = dlq::REPLAY_RATES;
        return Err(Problem::field(
            "rate",
            format!(
                "`rate`: jobs per second, from {} to {}",
                rates.start(),
                rates.end()
            ),
        ));
    }
    let options = ReplayOptions {
        filter: Filter {
            ids: request.ids,
            kind: request.kind,
            class: request.class,
            failed_before: None,
        },
        limit: request.limit,
        rate: request.rate,
    };
    state.connected().await?;
    let summary = dlq::replay(state.waiter.dispatcher(), &queue, &options, |_| {})
        .await
        .map_err(|err| Problem::from_dlq(&err))?;
    Ok(Json(summary))
}

/// Which dead letters to delete: at least one filter, or `"all": true`; as `warren dlq purge`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Every dead letter (the filters, if any, still apply).
    #[serde(default)]
    pub all: bool,
    /// Only these job ids.
    #[serde(default)]
    pub ids: Vec<String>,
    /// Only jobs of this kind.
    #[serde(default)]
    pub kind: Option<String>,
    /// Only jobs of this failure class.
    #[serde(default)]
    pub class: Option<String>,
    /// Only dead letters that failed longer ago than this: a duration like `"7d"` or `"12h"`.
    /// One whose failure time is unknown is kept (counted in `undated`).
    #[serde(default)]
    #[schema(example = "7d")]
    pub older_than: Option<String>,
}

/// Delete dead letters. 200 with the summary of `warren dlq purge --json` ({deleted,
/// remaining, undated}).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/dead:purge",
    tag = "dead letters",
    params(("queue" = String, Path, description = "A work queue of the config")),
    request_body(content = PurgeRequest, content_type = "application/json"),
    responses(
        (status = 200, description = "What the purge did: {deleted, remaining, undated}", body = Object),
        (status = 400, description = "Invalid JSON, no filter and no `\"all\": true`, or an invalid field (named in `field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 403, description = "The token's scope is not `admin`", body = ProblemBody),
        (status = 404, description = "No such queue in the config, or its dead-letter queue does not exist", body = ProblemBody),
        (status = 413, description = "The body is too large", body = ProblemBody),
        (status = 415, description = "The body is not `application/json`", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "RabbitMQ unreachable (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn purge(
    State(state): State<Arc<AppState>>,
    PathParams(queue): PathParams<String>,
    JsonBody(request): JsonBody<PurgeRequest>,
) -> Result<Json<PurgeSummary>, Problem> {
    state.check_queue(&queue).await?;
    let failed_before = match request.older_than.as_deref() {
        Some(text) => Some(failed_before(text)?),
        None => None,
    };
    let filtered = !request.ids.is_empty()
        || request.kind.is_some()
        || request.class.is_some()
        || failed_before.is_some();
    if !filtered && !request.all {
        return Err(Problem::field(
            "all",
            "a purge needs a filter (`ids`, `kind`, `class`, `older_than`) or `\"all\": true`",
        ));
    }
    let filter = Filter {
        ids: request.ids,
        kind: request.kind,
        class: request.class,
        failed_before,
    };
    state.connected().await?;
    let summary = dlq::purge(state.waiter.dispatcher(), &queue, &filter, |_| {})
        .await
        .map_err(|err| Problem::from_dlq(&err))?;
    Ok(Json(summary))
}

fn failed_before(text: &str) -> Result<SystemTime, Problem> {
    let age: Duration = humantime::parse_duration(text.trim()).map_err(|err| {
        Problem::field(
            "older_than",
            format!("`older_than`: `{text}` is not a duration like \"7d\": {err}"),
        )
    })?;
    SystemTime::now()
        .checked_sub(age)
        .ok_or_else(|| Problem::field("older_than", "`older_than` reaches before 1970"))
}
