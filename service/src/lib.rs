//! # warren-service
//!
//! Warren's HTTP API, which `warren serve --listen ADDR` runs: other services submit jobs,
//! see the queues, work the dead letters and wait for outcomes over HTTP. Every operation is a
//! call into `warren-dispatcher`, the library behind the `warren` command, so the API and the
//! CLI answer alike (`GET /v1/queues` is `warren status --json`).
//!
//! A request's way through:
//!
//! 1. [`router`]'s outer layers: every response gets `Cache-Control: no-store` and
//!    `X-Content-Type-Options: nosniff`; one access-log line per request (method, path,
//!    status, duration, the token's name and scope, never the token); bodies are capped at
//!    `http.body_limit` (413).
//! 2. [`auth`]: bearer token (401), per-token rate limit (429), scope (403).
//! 3. A handler in [`routes`]: the body through [`body`] (415, 400 naming the field), then the
//!    library; a failure becomes a [`problem::Problem`] (its status and
//!    `{"error", "field"}`); a broker away or blocking publishers is a 503 with `Retry-After`.
//!
//! Jobs are submitted through a [`Waiter`] (direct reply-to, one channel for the server's
//! whole life), so `GET /v1/jobs/{id}/wait` can tell the outcome of any job submitted here.
//! [`openapi`] generates the OpenAPI 3.1 document served at `/openapi.json`. [`serve`] runs
//! the router until the shutdown token is cancelled, letting in-flight requests finish; [`tls`]
//! adds HTTPS when configured.

pub mod auth;
pub mod body;
pub mod openapi;
pub mod problem;
pub mod routes;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::set_header::SetResponseHeaderLayer;
use warren_core::config::{Config, HttpScope};
use warren_core::metrics::Metrics;
use warren_core::probes::{self, Readiness};
use warren_dispatcher::management::{Management, ManagementError};
use warren_dispatcher::waiter::{Waiter, WaiterSettings};
use warren_dispatcher::{Dispatcher, DispatcherError};

use crate::auth::{Caller, Tokens};
use crate::problem::Problem;

/// The longest a request waits for a connection to RabbitMQ before it is answered 503.
pub const CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What every handler shares.
pub struct AppState {
    /// Submits jobs (with a reply address) and hands out their outcomes; its dispatcher runs
    /// the dead-letter and status operations.
    pub waiter: Waiter,
    /// The management API, for `GET /v1/queues`' sampled numbers.
    pub management: Management,
    pub config: Config,
    tokens: Arc<Tokens>,
    /// The OpenAPI document, generated once.
    openapi: String,
    /// Cancelled when the server stops ([`AppState::shutdown_token`]): waits in flight answer
    /// `pending` at once rather than hold the shutdown up to their timeout.
    stopping: CancellationToken,
    /// `/metrics`: the dispatcher's submits and connection, and every request's route, status
    /// and duration.
    pub metrics: Arc<Metrics>,
    /// `/readyz`: the dispatcher (ready while its connection to RabbitMQ is open).
    readiness: Arc<dyn Readiness>,
}

/// Why the service could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Dispatcher(#[from] DispatcherError),
    #[error("the management API's address: {0}")]
    Management(#[from] ManagementError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("listening: {0}")]
    Io(#[from] std::io::Error),
}

impl AppState {
    /// The service's state for `config`; connects to RabbitMQ on the first request that needs
    /// it (so the server starts, and answers 503, while the broker is away).
    pub fn new(config: &Config) -> Result<AppState, ServiceError> {
        AppState::with_dispatcher(config, Dispatcher::lazy(config)?)
    }

    /// The service's state around `dispatcher` (one made with [`Dispatcher::lazy`], perhaps
    /// with metrics).
    pub fn with_dispatcher(
        config: &Config,
        dispatcher: Dispatcher,
    ) -> Result<AppState, ServiceError> {
        // The dispatcher's metrics, made here if it has none.
        let (dispatcher, metrics) = match dispatcher.metrics().cloned() {
            Some(metrics) => (dispatcher, metrics),
            None => {
                let metrics = Metrics::new();
                (dispatcher.with_metrics(metrics.clone()), metrics)
            }
        };
        let dispatcher = Arc::new(dispatcher);
        let readiness: Arc<dyn Readiness> = dispatcher.clone();
        Ok(AppState {
            waiter: Waiter::new(dispatcher, WaiterSettings::default()),
            management: Management::new(config)?,
            config: config.clone(),
            tokens: Arc::new(Tokens::new(&config.http)),
            openapi: openapi::document(),
            stopping: CancellationToken::new(),
            metrics,
            readiness,
        })
    }

    /// The token that stops the server: give it to [`serve`]. Cancelling it also ends the
    /// waits in flight (they answer `pending`).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Resolves when the server is stopping.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// How many tokens may call the API (none: every `/v1` request is refused).
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Ok when connected to RabbitMQ, or once connected within [`CONNECT_WAIT`] (at most
    /// `broker.connect_timeout`); else 503 with `Retry-After`. So that while the broker is
    /// away no request waits longer than that for a connection, however many queue up.
    pub async fn connected(&self) -> Result<(), Problem> {
        let dispatcher = self.waiter.dispatcher();
        if dispatcher.is_connected() {
            return Ok(());
        }
        let wait = CONNECT_WAIT.min(self.config.broker.connect_timeout);
        match tokio::time::timeout(wait, self.waiter.connect()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => {
                tracing::warn!(error = %warren_core::error_chain(&err), "cannot reach RabbitMQ");
                Err(Problem::unavailable(problem::BROKER_AWAY))
            }
            Err(_) => Err(Problem::unavailable(problem::BROKER_AWAY)),
        }
    }

    /// 404 unless `queue` is a queue of the config or one the broker has — the queues
    /// `warren submit --queue` takes (one the config does not list has `[queue_defaults]`).
    /// The broker is asked by a passive declare each time (nothing is cached, so random names
    /// cost no memory); a user who may not ask lets the mandatory publish decide (unroutable:
    /// 404 too). 503 while the broker is away.
    pub async fn check_queue(&self, queue: &str) -> Result<(), Problem> {
        if self.config.queues.contains_key(queue) {
            return Ok(());
        }
        if warren_core::topology::short(queue).is_err() {
            return Err(Problem::unknown_queue(queue));
        }
        self.connected().await?;
        match self.waiter.dispatcher().has_queue(queue).await {
            Ok(Some(false)) => Err(Problem::unknown_queue(queue)),
            Ok(_) => Ok(()),
            Err(err) => Err(Problem::from_submit(&err)),
        }
    }
}

/// The whole API: the `/v1` routes behind authentication, `/openapi.json`, and the layers
/// every response goes through.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state
        .config
        .http
        .body_limit(state.config.jobs.max_payload_bytes);
    let read = Router::new()
        .route("/v1/queues", get(routes::queues::list))
        .route("/v1/queues/{queue}/dead", get(routes::dead::list))
        .route("/v1/queues/{queue}/dead/{id}", get(routes::dead::show))
        .route("/v1/jobs/{id}/wait", get(routes::wait::wait))
        .route_layer(middleware::from_fn_with_state(
            HttpScope::Read,
            auth::require,
        ));
    let submit = Router::new()
        .route("/v1/queues/{queue}/jobs", post(routes::jobs::submit))
        .route("/v1/queues/{queue}/jobs:batch", post(routes::jobs::batch))
        .route_layer(middleware::from_fn_with_state(
            HttpScope::Submit,
            auth::require,
        ));
    let admin = Router::new()
        .route("/v1/queues/{queue}/dead:replay", post(routes::dead::replay))
        .route("/v1/queues/{queue}/dead:purge", post(routes::dead::purge))
        .route_layer(middleware::from_fn_with_state(
            HttpScope::Admin,
            auth::require,
        ));
    let api = read
        .merge(submit)
        .merge(admin)
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state.tokens),
            auth::authenticate,
        ))
        .with_state(Arc::clone(&state));

    let openapi = state.openapi.clone();
    let public = Router::new().route(
        "/openapi.json",
        get(move || async move {
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                openapi,
            )
        }),
    );

    Router::new()
        .merge(api)
        .merge(public)
        // `/healthz`, `/readyz` and `/metrics` take no token; every request is counted by its
        // matched route (never the raw path) and status.
        .merge(probes::router(
            Arc::clone(&state.metrics),
            Arc::clone(&state.readiness),
        ))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state.metrics),
            probes::track_requests,
        ))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        // A bug must not drop the connection without an answer: a panic becomes a JSON 500.
        .layer(CatchPanicLayer::custom(|_panic| {
            Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }))
        .layer(middleware::from_fn(access_log))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        ))
        .layer(SetResponseHeaderLayer::overriding(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
}

/// Runs `router` on `listener` (HTTPS when `tls` is given) until `shutdown` is cancelled;
/// then stops accepting, lets the requests in flight finish, and returns.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let service = router.into_make_service();
    let stop = shutdown.clone().cancelled_owned();
    match tls {
        None => {
            axum::serve(listener, service)
                .with_graceful_shutdown(stop)
                .await?
        }
        Some(config) => {
            let listener = tls::TlsListener::new(listener, config, shutdown)?;
            axum::serve(listener, service)
                .with_graceful_shutdown(stop)
                .await?
        }
    }
    Ok(())
}

/// 404 for a path the API does not have.
async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no such route (see /openapi.json)")
}

/// The longest path an access-log line shows.
const LOGGED_PATH_BYTES: usize = 200;

/// One line per request: method, path, status, duration, and who (the token's name and scope;
/// `-` before authentication). Headers are never logged: the token stays out of the log.
async fn access_log(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let path = warren_core::envelope::capped(request.uri().path(), LOGGED_PATH_BYTES).into_owned();
    let response = next.run(request).await;
    let caller = response.extensions().get::<Caller>();
    tracing::info!(
        target: "warren::http",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        duration_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3,
        token = caller.map_or("-", |c| &*c.name),
        scope = caller.map_or("-", |c| c.scope.as_str()),
        "request"
    );
    response.into_response()
}
