//! Request bodies: JSON only (`Content-Type: application/json`, else 415), at most
//! `http.body_limit` bytes (else 413), parsed into a typed request whose error names the field
//! at fault (400 `{"error": ..., "field": "priority"}`; `[2].kind` for an item of a batch).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{StatusCode, header};
use serde::de::DeserializeOwned;

use crate::problem::Problem;

/// A JSON body parsed into `T`, or the [`Problem`] that says why not.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Problem> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "the body must be JSON, sent with `Content-Type: application/json`",
            ));
        }
        let bytes =
            Bytes::from_request(request, state)
                .await
                .map_err(|rejection| match rejection.status() {
                    StatusCode::PAYLOAD_TOO_LARGE => Problem::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the body is over the server's limit (http.body_limit)",
                    ),
                    status => Problem::new(
                        if status.is_client_error() {
                            status
                        } else {
                            StatusCode::BAD_REQUEST
                        },
                        format!("reading the body: {}", rejection.body_text()),
                    ),
                })?;
        parse(&bytes).map(JsonBody)
    }
}

/// Parses `bytes` as JSON into `T`; the error names the field at fault.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Problem> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {inner}"),
            );
        }
        let message = inner.to_string();
        let field = match missing_field(&message) {
            // A missing field is reported at the object that should have it.
            Some(name) => match path.as_str() {
                "." => name.to_owned(),
                parent => format!("{parent}.{name}"),
            },
            None => path,
        };
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_owned();
        Problem::field(field.clone(), format!("`{field}`: {message}"))
    })?;
    deserializer.end().map_err(|err| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {err}"),
        )
    })?;
    Ok(value)
}

/// The field a serde message says is missing: "missing field `kind`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Job {
        kind: String,
        priority: Option<u8>,
    }

    fn field_of<T: DeserializeOwned + std::fmt::Debug>(text: &str) -> Option<String> {
        let problem = parse::<T>(text.as_bytes()).expect_err("refused");
        assert_eq!(problem.status, StatusCode::BAD_REQUEST);
        problem.body.field
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(field_of::<Job>("{}").as_deref(), Some("kind"));
        assert_eq!(field_of::<Job>(r#"{"kind": 5}"#).as_deref(), Some("kind"));
        assert_eq!(
            field_of::<Job>(r#"{"kind": "a", "priority": 300}"#).as_deref(),
            Some("priority")
        );
        assert_eq!(
            field_of::<Job>(r#"{"kind": "a", "nope": 1}"#).as_deref(),
            Some("nope")
        );
        assert_eq!(
            field_of::<Vec<Job>>(r#"[{"kind": "a"}, {"kind": "b", "priority": -1}]"#).as_deref(),
            Some("[1].priority")
        );
        assert_eq!(
            field_of::<Vec<Job>>(r#"[{"kind": "a"}, {}]"#).as_deref(),
            Some("[1].kind")
        );
        assert_eq!(field_of::<Job>("{").as_deref(), None);
        assert_eq!(field_of::<Job>(r#"{"kind": "a"} x"#).as_deref(), None);
    }
}
