//! The handlers, one module per resource: each parses its request into typed values, calls
//! the library (`warren-dispatcher`) and answers with its JSON or a [`crate::problem::Problem`].

pub mod dead;
pub mod jobs;
pub mod queues;
pub mod wait;

use axum::extract::{FromRequestParts, Path};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// The path's parameters (`{queue}`, `{id}`), or a JSON 400 naming the one that is not valid
/// (percent-encoded bytes that are not UTF-8) instead of axum's plain-text answer.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(PathParams(value)),
            Err(rejection) => {
                let text = rejection.body_text();
                let field = text
                    .split_once("in `")
                    .and_then(|(_, rest)| rest.split('`').next())
                    .map(str::to_owned);
                let problem = Problem::new(StatusCode::BAD_REQUEST, text);
                Err(match field {
                    Some(field) => problem.at(field),
                    None => problem,
                })
            }
        }
    }
}
