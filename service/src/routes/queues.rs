//! `GET /v1/queues`: every configured queue's numbers, the same as `warren status --json`
//! ([`warren_dispatcher::status::collect`]: counted now over AMQP, sampled from the
//! management API).

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use warren_dispatcher::status::{self, Status};

use crate::AppState;
use crate::problem::{Problem, ProblemBody};

/// Each configured queue's ready, unacked and dead jobs, consumers and rates, and the jobs in
/// the delay levels: the JSON of `warren status --json`. 200 when at least one source (AMQP or
/// the management API) answered; each source says whether it did.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    responses(
        (status = 200, description = "The status, as `warren status --json` prints it: {management, amqp, queues: [{queue, exists, ready, unacked, consumers, publish_rate, deliver_rate, dead, oldest_age_secs, sampled}], delay_levels}", body = Object),
        (status = 401, description = "No token, or an invalid one", body = ProblemBody),
        (status = 429, description = "Too many requests for this token (`Retry-After`)", body = ProblemBody),
        (status = 503, description = "Neither RabbitMQ nor its management API answered (`Retry-After`)", body = ProblemBody),
    ),
    security(("bearer" = []))
)]
pub async fn list(State(state): State<Arc<AppState>>) -> Result<Json<Status>, Problem> {
    let queues: Vec<String> = state.config.queues.keys().cloned().collect();
    let amqp = match state.connected().await {
        Ok(()) => Ok(state.waiter.dispatcher()),
        Err(problem) => Err(problem.body.error),
    };
    let status = status::collect(amqp, &state.management, &queues).await;
    if !status.amqp.reachable && !status.management.reachable {
        return Err(Problem::unavailable(
            "neither RabbitMQ nor its management API answered",
        ));
    }
    Ok(Json(status))
}
