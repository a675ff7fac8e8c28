//! Health probes: whether a process is alive, whether it is ready, and its metrics, for
//! Kubernetes-style probes and Prometheus scrapes.
//!
//! - `/healthz`: 200 while the process lives (the listener answers).
//! - `/readyz`: 200 when the process is [`Readiness::readiness`] ready, else 503 with the reason
//!   as text. A worker is ready when its connections are up and every queue it consumes has a
//!   subscribed consumer ([`Health`], updated by the worker); `warren serve` when its dispatcher
//!   has an open connection to the broker.
//! - `/metrics`: [`Metrics::encode`], Prometheus text format 0.0.4.
//!
//! [`Health`] and [`Readiness`] are always compiled (the worker updates a [`Health`] whether or
//! not anything serves it); the HTTP side ([`router`], [`serve`]) is behind the cargo feature
//! `http` (axum). Every response carries `Cache-Control: no-store` and
//! `X-Content-Type-Options: nosniff`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Whether a process is ready for work. Answers at once: a probe must never hang.
pub trait Readiness: Send + Sync + 'static {
    /// `Ok` when ready, else why not (one short line).
    fn readiness(&self) -> Result<(), String>;
}

/// A set of named conditions, each met or not: ready when every one is met (and there is at
/// least one). A worker keeps one condition per connection and one per consumed queue.
#[derive(Debug, Default)]
pub struct Health {
    conditions: Mutex<BTreeMap<String, bool>>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::default()
    }

    /// Sets whether `condition` is met (adding it if new).
    pub fn set(&self, condition: &str, met: bool) {
        let mut conditions = self.lock();
        match conditions.get_mut(condition) {
            Some(value) => *value = met,
            None => {
                conditions.insert(condition.to_owned(), met);
            }
        }
    }

    /// Marks every condition as not met (e.g. a session ended).
    pub fn set_all(&self, met: bool) {
        for value in self.lock().values_mut() {
            *value = met;
        }
    }

    /// Whether every condition is met.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        self.conditions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Readiness for Health {
    fn readiness(&self) -> Result<(), String> {
        let conditions = self.lock();
        if conditions.is_empty() {
            return Err("starting".to_owned());
        }
        let unmet: Vec<&str> = conditions
            .iter()
            .filter(|(_, met)| !**met)
            .map(|(name, _)| name.as_str())
            .collect();
        match unmet.is_empty() {
            true => Ok(()),
            false => Err(format!("not ready: {}", unmet.join(", "))),
        }
    }
}

#[cfg(feature = "http")]
pub use http::{router, serve, track_requests};

#[cfg(feature = "http")]
mod http {
    use std::sync::Arc;
    use std::time::Instant;

    use axum::Router;
    use axum::extract::{MatchedPath, Request, State};
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::middleware::Next;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use tokio_util::sync::CancellationToken;

    use super::Readiness;
    use crate::metrics::{self, Metrics};

    #[derive(Clone)]
    struct Probes {
        metrics: Arc<Metrics>,
        readiness: Arc<dyn Readiness>,
    }

    /// `/healthz`, `/readyz` and `/metrics` (GET), each response with `Cache-Control:
    /// no-store` and `X-Content-Type-Options: nosniff`. Merge it into a larger router with
    /// [`Router::merge`].
    pub fn router(metrics: Arc<Metrics>, readiness: Arc<dyn Readiness>) -> Router {
        Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .with_state(Probes { metrics, readiness })
            .layer(axum::middleware::map_response(no_store))
    }

    /// Serves `router` on `listener` until `shutdown` is cancelled; requests in progress then
    /// finish (graceful shutdown).
    pub async fn serve(
        listener: tokio::net::TcpListener,
        router: Router,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    }

    /// Middleware that counts every request in `warren_http_requests_total{route,status}` and
    /// `warren_http_request_duration_seconds{route}`; the route is the matched template
    /// (`/v1/queues/{queue}/jobs`), `unmatched` otherwise: never the raw path, so the series
    /// stay bounded. Use with `axum::middleware::from_fn_with_state(metrics, track_requests)`.
    pub async fn track_requests(
        State(metrics): State<Arc<Metrics>>,
        request: Request,
        next: Next,
    ) -> Response {
        let started = Instant::now();
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
        let response = next.run(request).await;
        metrics.http_request(&route, response.status().as_u16(), started.elapsed());
        response
    }

    async fn no_store(mut response: Response) -> Response {
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        response
    }

    async fn healthz() -> Response {
        text(StatusCode::OK, "ok\n".to_owned())
    }

    async fn readyz(State(probes): State<Probes>) -> Response {
        match probes.readiness.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        }
    }

    async fn metrics_text(State(probes): State<Probes>) -> Response {
        (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            probes.metrics.encode(),
        )
            .into_response()
    }

    fn text(status: StatusCode, body: String) -> Response {
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_condition_is_met() {
        let health = Health::new();
        assert_eq!(health.readiness(), Err("starting".to_owned()));
        health.set("connection consume", true);
        health.set("consumer of queue `a`", false);
        assert_eq!(
            health.readiness(),
            Err("not ready: consumer of queue `a`".to_owned())
        );
        health.set("consumer of queue `a`", true);
        assert!(health.is_ready());
        health.set_all(false);
        assert!(!health.is_ready());
    }
}
