//! Built-in job kinds for demos and tests: `echo`, `sleep` and `fail`.
//!
//! - `echo`: done at once; the result is the payload.
//! - `sleep`: `{"ms": N}` — waits N milliseconds, then done.
//! - `fail`: `{"times": N}` — a retryable failure while the attempt is at most N, then done;
//!   `{"permanent": true}` — a permanent failure.

use std::time::Duration;

use serde_json::Value;

use crate::handler::{HandlerResult, JobContext, JobError, Registry};

/// Registers the built-in kinds.
pub fn register(registry: &mut Registry) {
    registry
        .register("echo", echo)
        .register("sleep", sleep)
        .register("fail", fail);
}

async fn echo(payload: Value, _ctx: JobContext) -> HandlerResult {
    Ok(Some(payload))
}

async fn sleep(payload: Value, _ctx: JobContext) -> HandlerResult {
    let ms = payload["ms"]
        .as_u64()
        .ok_or_else(|| JobError::permanent(r#"sleep wants a payload like {"ms": 250}"#))?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(None)
}

async fn fail(payload: Value, ctx: JobContext) -> HandlerResult {
    if payload["permanent"].as_bool() == Some(true) {
        return Err(JobError::permanent(
            "failing for good, as the payload asked",
        ));
    }
    let times = payload["times"].as_u64().ok_or_else(|| {
        JobError::permanent(r#"fail wants a payload like {"times": 2} or {"permanent": true}"#)
    })?;
    if u64::from(ctx.attempt) <= times {
        return Err(JobError::retry(format!(
            "failing attempt {} of the first {times}, as asked",
            ctx.attempt
        )));
    }
    Ok(Some(
        serde_json::json!({ "succeeded_on_attempt": ctx.attempt }),
    ))
}
