//! `GET /v1/jobs/{id}/wait?timeout=30s`: the outcome of a job this server submitted, as
//! `warren submit --wait` tells it, through the service's
//! [`warren_dispatcher::waiter::Waiter`] (direct reply-to; nothing stored on the broker).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use warren_dispatcher::waiter::Waited;

use crate::AppState;
use crate::problem::{Problem, ProblemBody};
use crate::routes::PathParams;

/// The longest a wait may last.
pub const MAX_WAIT: Duration = Duration::from_secs(300);
/// The wait when no `timeout` is given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// How long to wait: a duration like `30s` or `2m` (or a number of seconds), at most 5m;
    /// default 30s. `0s` answers at once.
    pub timeout: Option<String>,
}

/// The job is submitted, and its outcome did not come in time.
#[derive(Debug, Serialize, ToSchema)]
pub struct Pending {
    pub id: String,
    /// Always `pending`.
    #[schema(example = "pending")]
    pub state: &'static str,
}

/// Wait for the outcome of a job this server submitted. 200 with the outcome (`status`
/// `done` with the handler's `result`, or `failed` with the dead letter's `class` and
/// `reason`; `attempts` in both), 202 `{"state": "pending"}` when none came in time (the job
/// is not cancelled), 404 for an id this server did not submit (or submitted over an hour
/// ago). A job the broker dead-letters by itself (its delivery limit) sends no outcome.
#[utoipa::path(
    get,
    path = "/v1/jobs/{id}/wait",
    tag = "jobs",
    params(("id" = String, Path, description = "The job id"), WaitQuery),
    responses(
        (status = 200, description = "The outcome, as `warren submit --wait --json` prints it: {id, attempts, status: done|failed, result | class, reason}", body = Object),
        (status = 202, description = "No outcome within the timeout", body = Pending),
        (status = 400, description = "An invalid `timeout`, or an unknown query parameter (named in `field`)", body = ProblemBody),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 404, description = "No job with this id was submitted through this server (recently)", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn wait(
    State(state): State<Arc<AppState>>,
    PathParams(id): PathParams<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(query) = query.map_err(|r| crate::problem::query_problem(&r))?;
    let timeout = match query.timeout.as_deref() {
        Some(text) => parse_timeout(text)?,
        None => DEFAULT_WAIT,
    };
    let waited = tokio::select! {
        waited = state.waiter.wait(&id, timeout) => waited,
        // The server is stopping: answer with what is known now, rather than hold it up.
        () = state.stopping() => state.waiter.wait(&id, Duration::ZERO).await,
    };
    match waited {
        Waited::Outcome(reply) => Ok(Json(reply).into_response()),
        Waited::Pending => Ok((
            StatusCode::ACCEPTED,
            Json(Pending {
                id,
                state: "pending",
            }),
        )
            .into_response()),
        Waited::Unknown => Err(Problem::new(
            StatusCode::NOT_FOUND,
            "no job with this id was submitted through this server (outcomes are kept for an \
             hour)",
        )
        .at("id")),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, Problem> {
    let text = text.trim();
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text).map_err(|err| err.to_string()),
    };
    match parsed {
        Ok(timeout) if timeout <= MAX_WAIT => Ok(timeout),
        Ok(_) => Err(Problem::field(
            "timeout",
            format!(
                "`timeout`: at most {}",
                humantime::format_duration(MAX_WAIT)
            ),
        )),
        Err(err) => Err(Problem::field(
            "timeout",
            format!("`timeout`: `{text}` is not a duration like \"30s\": {err}"),
        )),
    }
}
