//! `warren serve --listen ADDR`: the HTTP API (crate `warren-service`) until SIGTERM or
//! SIGINT, then a graceful stop: no new connections, the requests in flight finish, exit 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use tokio_util::sync::CancellationToken;
use warren_core::Config;
use warren_service::AppState;
use warren_workers::telemetry;

/// Serve the HTTP API: submit jobs, see queues, work dead letters and wait for outcomes over
/// HTTP (routes and status codes: /openapi.json). Tokens come from [[http.tokens]] in the
/// config and $WARREN_HTTP_TOKEN (one admin token).
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  WARREN_HTTP_TOKEN=$(openssl rand -hex 32) warren serve --listen 127.0.0.1:8080\n  \
                  curl -H \"Authorization: Bearer $WARREN_HTTP_TOKEN\" http://127.0.0.1:8080/v1/queues"
)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:8080 or [::]:8080 (port 0: any free port);
    /// default: http.listen of the config ($WARREN_HTTP_LISTEN).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// PEM certificate for HTTPS (with --tls-key-file); default: http.tls_cert_file.
    #[arg(long, value_name = "FILE", requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key for HTTPS (with --tls-cert-file); default: http.tls_key_file.
    #[arg(long, value_name = "FILE", requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
}

pub async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let Some(listen) = args.listen.or_else(|| config.http.listen.clone()) else {
        bail!("no address to listen on: give --listen ADDR (or http.listen in the config)");
    };
    let address: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen `{listen}` is not an address like 127.0.0.1:8080"))?;
    let cert = args
        .tls_cert_file
        .or_else(|| config.http.tls_cert_file.clone());
    let key = args
        .tls_key_file
        .or_else(|| config.http.tls_key_file.clone());
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => Some(Arc::new(
            warren_service::tls::server_config(&cert, &key).context("setting up HTTPS")?,
        )),
        _ => None,
    };
    let state = AppState::new(config).context("setting up the HTTP API")?;
    if state.token_count() == 0 {
        tracing::warn!(
            "no tokens: every /v1 request will be refused (401); add [[http.tokens]] to the \
             config or set WARREN_HTTP_TOKEN"
        );
    }
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address}"))?;
    let bound = listener.local_addr().context("the listening address")?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    telemetry::notice(
        module_path!(),
        &format!("warren serve: listening on {scheme}://{bound}"),
    );
    let shutdown = state.shutdown_token();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let router = warren_service::router(Arc::new(state));
    warren_service::serve(listener, router, tls, shutdown)
        .await
        .context("serving HTTP")?;
    telemetry::notice(module_path!(), "warren serve: stopped");
    Ok(ExitCode::SUCCESS)
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT.
async fn stop_on_signal(shutdown: CancellationToken) {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM; Ctrl-C still stops");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    telemetry::notice(
        module_path!(),
        "warren serve: stopping (finishing the requests in flight)",
    );
    shutdown.cancel();
}
