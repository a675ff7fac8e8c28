//! A worker with a handler of your own, in a few lines.
//!
//! Run it against the local broker (`scripts/broker start`), then submit a job:
//!
//! ```text
//! cargo run -p warren-workers --example custom_handler
//! target/debug/warren submit --queue greetings --kind greet --payload '{"name":"Ada"}'
//! ```

use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_workers::{JobContext, JobError, Registry, Worker};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let config = Config::load(None)?;

    let mut registry = Registry::new();
    registry.register(
        "greet",
        |payload: serde_json::Value, ctx: JobContext| async move {
            let name = payload["name"]
                .as_str()
                .ok_or_else(|| JobError::permanent(r#"expected {"name": "..."}"#))?;
            tracing::info!(job = %ctx.id, attempt = ctx.attempt, "hello, {name}!");
            Ok(Some(serde_json::json!({ "greeted": name })))
        },
    );

    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    Worker::new(config, registry)
        .queue("greetings")
        .run(shutdown)
        .await?;
    Ok(())
}
