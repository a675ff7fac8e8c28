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

/// The payload of a `greet` job: `{"name": "Ada"}`.
#[derive(serde::Deserialize)]
struct Greeting {
    name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let config = Config::load(None)?;

    let mut registry = Registry::new();
    // The payload is parsed into `Greeting`; one without a `name` is dead-lettered with
    // serde's reason before the handler runs. Take `serde_json::Value` to accept any JSON.
    registry.register("greet", |greeting: Greeting, ctx: JobContext| async move {
        if greeting.name.is_empty() {
            return Err(JobError::permanent("an empty name cannot be greeted"));
        }
        tracing::info!(job = %ctx.id, attempt = ctx.attempt, "hello, {}!", greeting.name);
        Ok(Some(serde_json::json!({ "greeted": greeting.name })))
    });

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
