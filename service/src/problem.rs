//! One error type for every answer that is not a success: [`Problem`] carries the status and
//! becomes the JSON body `{"error": "...", "field": "..."}` (`field` names the request field at
//! fault, when one is), with `Retry-After`, `WWW-Authenticate` or `Allow` where the status
//! calls for it.
//!
//! A client's mistake is always a 4xx naming what was wrong; a broker that cannot be reached
//! or blocks publishers is a 503 with `Retry-After`. Nothing a client sends becomes a 500.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use warren_dispatcher::SubmitError;
use warren_dispatcher::dlq::DlqError;

/// Seconds a client is told to wait before trying again after a 503.
pub const RETRY_AFTER_UNAVAILABLE: u64 = 5;

/// What a 503 says when RabbitMQ cannot be reached (the details go to the log, not to the
/// client).
pub const BROKER_AWAY: &str = "RabbitMQ cannot be reached right now; nothing was done";

/// Why a request failed: the body of every 4xx and 5xx answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProblemBody {
    /// What went wrong, in a sentence.
    pub error: String,
    /// The request field at fault (`kind`, `payload`, `[2].priority`, `timeout`, `queue`, ...),
    /// when one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A failed request: status, body and the headers its status calls for.
#[derive(Debug, Clone)]
pub struct Problem {
    pub status: StatusCode,
    pub body: ProblemBody,
    /// `Retry-After`, in seconds (429, 503).
    pub retry_after: Option<u64>,
    /// Adds `WWW-Authenticate: Bearer` (401).
    pub challenge: bool,
    /// Anything more to say, merged into the body (a replay's summary when it stopped).
    pub extra: Option<serde_json::Value>,
}

impl Problem {
    pub fn new(status: StatusCode, error: impl Into<String>) -> Problem {
        Problem {
            status,
            body: ProblemBody {
                error: error.into(),
                field: None,
            },
            retry_after: None,
            challenge: false,
            extra: None,
        }
    }

    /// 400 about one field.
    pub fn field(field: impl Into<String>, error: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, error).at(field)
    }

    /// The field at fault.
    pub fn at(mut self, field: impl Into<String>) -> Problem {
        self.body.field = Some(field.into());
        self
    }

    pub fn unauthorized(error: impl Into<String>) -> Problem {
        Problem {
            challenge: true,
            ..Problem::new(StatusCode::UNAUTHORIZED, error)
        }
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(error: impl Into<String>) -> Problem {
        Problem {
            retry_after: Some(RETRY_AFTER_UNAVAILABLE),
            ..Problem::new(StatusCode::SERVICE_UNAVAILABLE, error)
        }
    }

    /// 404 for a queue neither the config lists nor the broker has.
    pub fn unknown_queue(queue: &str) -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!(
                "queue `{queue}` does not exist (not in the config, not on the broker: \
                 `warren topology apply --queue {queue}` declares it)"
            ),
        )
        .at("queue")
    }

    /// How a failed submit answers (for one job, or one item of a batch).
    pub fn from_submit(err: &SubmitError) -> Problem {
        use warren_core::envelope::EncodeError;
        let text = warren_core::error_chain(err);
        match err {
            SubmitError::Invalid(EncodeError::TooLarge { .. }) => {
                Problem::new(StatusCode::PAYLOAD_TOO_LARGE, text).at("payload")
            }
            SubmitError::Invalid(EncodeError::NotJson(_)) => Problem::field("payload", text),
            SubmitError::Invalid(EncodeError::EmptyKind) => Problem::field("kind", text),
            SubmitError::Invalid(EncodeError::EmptyId) => Problem::field("id", text),
            SubmitError::Invalid(EncodeError::TooLong(what)) => {
                let field = if what.contains("kind") { "kind" } else { "id" };
                Problem::field(field, text)
            }
            SubmitError::Invalid(EncodeError::DelayTooLong(_)) => Problem::field("delay", text),
            SubmitError::Priority { .. } | SubmitError::Unsupported(_) => {
                Problem::field("priority", text)
            }
            SubmitError::UnknownQueue(_) => Problem::new(StatusCode::NOT_FOUND, text).at("queue"),
            SubmitError::Connection(_) => {
                tracing::warn!(error = %text, "a submit could not reach RabbitMQ");
                Problem::unavailable(BROKER_AWAY)
            }
            SubmitError::NoTopology | SubmitError::Blocked(_) | SubmitError::Publish(_) => {
                Problem::unavailable(text)
            }
        }
    }

    /// How a failed dead-letter operation answers.
    pub fn from_dlq(err: &DlqError) -> Problem {
        let text = warren_core::error_chain(err);
        match err {
            DlqError::Name(_) | DlqError::DeadName { .. } => Problem::field("queue", text),
            DlqError::NoQueue { .. } | DlqError::UnknownQueue(_) => {
                Problem::new(StatusCode::NOT_FOUND, text).at("queue")
            }
            DlqError::Invalid(_) => Problem::new(StatusCode::BAD_REQUEST, text),
            DlqError::Interrupted { summary, .. } => {
                let mut problem = Problem::unavailable(text);
                problem.extra = serde_json::to_value(summary.as_ref())
                    .ok()
                    .map(|summary| serde_json::json!({ "summary": summary }));
                problem
            }
            DlqError::Link(_) => {
                tracing::warn!(error = %text, "a dead-letter operation could not reach RabbitMQ");
                Problem::unavailable(BROKER_AWAY)
            }
            DlqError::Read { .. }
            | DlqError::Timeout { .. }
            | DlqError::Settle { .. }
            | DlqError::NoTopology
            | DlqError::Publish { .. }
            | DlqError::Write(_) => Problem::unavailable(text),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut body = serde_json::to_value(&self.body).unwrap_or_default();
        if let (Some(serde_json::Value::Object(extra)), serde_json::Value::Object(map)) =
            (self.extra, &mut body)
        {
            map.extend(extra);
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        if self.challenge {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"warren\""),
            );
        }
        response
    }
}

/// A query string that did not parse: 400 naming the parameter (axum's message starts with
/// it: "Failed to deserialize query string: limit: invalid digit ...").
pub fn query_problem(rejection: &axum::extract::rejection::QueryRejection) -> Problem {
    let text = rejection.body_text();
    let detail = text
        .strip_prefix("Failed to deserialize query string: ")
        .unwrap_or(&text);
    let field = detail
        .split_once(": ")
        .map(|(field, _)| field)
        .filter(|field| !field.contains(' '));
    let named = detail
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next());
    let problem = Problem::new(
        StatusCode::BAD_REQUEST,
        format!("invalid query string: {detail}"),
    );
    match named.or(field) {
        Some(field) => problem.at(field),
        None => problem,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use warren_core::envelope::EncodeError;

    use super::*;

    #[test]
    fn submit_errors_map_to_the_client_or_the_broker() {
        let blocked = Problem::from_submit(&SubmitError::Blocked(Duration::from_secs(30)));
        assert_eq!(blocked.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(blocked.retry_after, Some(RETRY_AFTER_UNAVAILABLE));
        let response = blocked.into_response();
        assert!(response.headers().contains_key(header::RETRY_AFTER));

        let too_large = Problem::from_submit(&SubmitError::Invalid(EncodeError::TooLarge {
            size: 10,
            limit: 5,
        }));
        assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(too_large.body.field.as_deref(), Some("payload"));
        let delay = Problem::from_submit(&SubmitError::Invalid(EncodeError::DelayTooLong(
            Duration::from_secs(u64::MAX / 4),
        )));
        assert_eq!(delay.status, StatusCode::BAD_REQUEST);
        assert_eq!(delay.body.field.as_deref(), Some("delay"));
        let unknown = Problem::from_submit(&SubmitError::UnknownQueue("q".into()));
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        let no_topology = Problem::from_submit(&SubmitError::NoTopology);
        assert_eq!(no_topology.status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn a_401_challenges_and_the_body_is_json() {
        let response = Problem::unauthorized("no token").into_response();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers().get(header::WWW_AUTHENTICATE),
            Some(&HeaderValue::from_static("Bearer realm=\"warren\""))
        );
        assert_eq!(
            response.headers().get(header::CONTENT_TYPE),
            Some(&HeaderValue::from_static("application/json"))
        );
    }
}
