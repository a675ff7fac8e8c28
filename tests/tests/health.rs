//! The health probes of a worker process and of `warren serve`: `/healthz` while it lives, `/readyz` flipping to 503
//! while the broker is away and back to 200 once it consumes again; a bad `--http` address
//! stops the worker at once.
//!
//! The shared broker is never stopped: the worker reaches it through a TCP relay of this test
//! (on a port of its own), and "the broker goes away" is the relay closing every connection and
//! refusing new ones, until it listens again on the same port. (The fault suite's relay,
//! `warren_tests::fault::relay`, freezes connections instead, which only heartbeats reveal:
//! slower, and not what this test is about.)

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use warren_tests::http::Serve;
use warren_tests::probe::{self, Scrape};
use warren_tests::{binary, broker_url, cleanup, config, connect, dispatcher, procs, unique_queue};

/// A relay to the test broker that can be cut (every connection closed, nothing accepted) and
/// restored (listening again on the same port); or, short of that, frozen (nothing forwarded
/// on the connections it has, the sockets kept open) and one connection cut.
struct Relay {
    port: u16,
    upstream: String,
    running: Option<Running>,
}

/// A listening relay: its stop, its freeze, and one token per connection in accept order.
struct Running {
    stop: CancellationToken,
    freeze: CancellationToken,
    connections: Arc<Mutex<Vec<CancellationToken>>>,
}

impl Relay {
    async fn start(upstream: String) -> Relay {
        // Bound here, port chosen by the system: a port found free and bound later may be
        // taken meanwhile (by a parallel test's connection, as happened on CI).
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("the relay listens");
        let port = listener.local_addr().expect("the relay's address").port();
        let mut relay = Relay {
            port,
            upstream,
            running: None,
        };
        relay.serve(listener);
        relay
    }

    /// The broker URL through the relay.
    fn url(&self) -> String {
        broker_url().replace(&self.upstream, &format!("127.0.0.1:{}", self.port))
    }

    /// Listens again on the relay's port.
    async fn restore(&mut self) {
        let listener = TcpListener::bind(("127.0.0.1", self.port))
            .await
            .expect("the relay listens again on its port");
        self.serve(listener);
    }

    fn serve(&mut self, listener: TcpListener) {
        let running = Running {
            stop: CancellationToken::new(),
            freeze: CancellationToken::new(),
            connections: Arc::default(),
        };
        let (stop, freeze) = (running.stop.clone(), running.freeze.clone());
        let connections = running.connections.clone();
        self.running = Some(running);
        let upstream = self.upstream.clone();
        tokio::spawn(async move {
            loop {
                let mut client = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                };
                let cut = stop.child_token();
                lock(&connections).push(cut.clone());
                let (freeze, upstream) = (freeze.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        // Frozen: both sockets stay open, nothing passes, until cut.
                        _ = freeze.cancelled() => cut.cancelled().await,
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                    }
                });
            }
        });
    }

    /// Closes every relayed connection and stops listening.
    fn cut(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
        }
    }

    /// Forwards nothing more on any connection, without closing one.
    fn freeze(&self) {
        if let Some(running) = &self.running {
            running.freeze.cancel();
        }
    }

    /// Closes the `n`th connection accepted (from 0).
    fn cut_connection(&self, n: usize) {
        if let Some(running) = &self.running {
            lock(&running.connections)[n].cancel();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `host:port` of the test broker's URL.
fn broker_authority() -> String {
    let url = broker_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let after_user = after_scheme
        .rsplit_once('@')
        .map_or(after_scheme, |(_, rest)| rest);
    after_user.split('/').next().unwrap_or("").to_owned()
}

/// A `warren-worker` consuming `queue` through `relay`, its listener on a port of its own (from
/// `$WARREN_WORKER_HTTP`), once it consumes: the process, that port, its log directory.
async fn worker_through(relay: &Relay, queue: &str) -> (procs::WorkerProc, u16, PathBuf) {
    let port = probe::free_port();
    let dir = std::env::temp_dir().join(format!("warren-{queue}"));
    let mut worker = procs::WorkerSpec::new(binary("warren-worker"), "worker", &[queue], &dir)
        .env("WARREN_AMQP_URL", relay.url())
        .env("WARREN_WORKER_HTTP", format!("127.0.0.1:{port}"))
        .spawn(0)
        .expect("starting warren-worker");
    worker
        .wait_started(Duration::from_secs(30))
        .await
        .expect("the worker consumes");
    (worker, port, dir)
}

fn assert_probe_headers(response: &probe::Response) {
    assert_eq!(response.header("cache-control"), Some("no-store"));
    assert_eq!(response.header("x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn readiness_follows_the_broker_going_away_and_coming_back() {
    let queue = unique_queue("health");
    let dispatcher = dispatcher(&config(&[&queue])).await;
    let mut relay = Relay::start(broker_authority()).await;
    let (mut worker, port, dir) = worker_through(&relay, &queue).await;

    let alive = probe::wait_for_status(port, "/healthz", 200, Duration::from_secs(10)).await;
    let alive = alive.expect("/healthz answers");
    assert_eq!(alive.status, 200);
    assert_probe_headers(&alive);
    let ready = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(10)).await;
    let ready = ready.expect("/readyz answers");
    assert_eq!(ready.status, 200, "{ready:?}\n{}", worker.log_tail());
    assert_probe_headers(&ready);
    let metrics = probe::get(port, "/metrics")
        .await
        .expect("/metrics answers");
    assert_probe_headers(&metrics);

    // The broker goes away.
    relay.cut();
    let away = probe::wait_for_status(port, "/readyz", 503, Duration::from_secs(20)).await;
    let away = away.expect("/readyz answers while the broker is away");
    assert_eq!(away.status, 503, "{away:?}\n{}", worker.log_tail());
    assert_probe_headers(&away);
    assert!(away.body.contains("not ready"), "{away:?}");
    // ... and stays away: not ready all along, alive all along.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ready = probe::get(port, "/readyz").await.expect("/readyz answers");
        assert_eq!(ready.status, 503, "{ready:?}\n{}", worker.log_tail());
        let alive = probe::get(port, "/healthz")
            .await
            .expect("/healthz answers");
        assert_eq!(alive.status, 200);
    }
    let scrape = Scrape::fetch(port).await;
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "consume")]),
        0.0
    );

    // The broker is back: ready again once the worker has reconnected and consumes.
    relay.restore().await;
    let back = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(30)).await;
    let back = back.expect("/readyz answers");
    assert_eq!(back.status, 200, "{back:?}\n{}", worker.log_tail());
    let scrape = Scrape::fetch(port).await;
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "consume")]),
        1.0
    );
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "publish")]),
        1.0
    );
    assert!(scrape.value("warren_reconnects_total", &[]) >= 1.0);

    worker.terminate(Duration::from_secs(20)).await;
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    dispatcher.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `warren-worker --http` with an address it cannot listen on stops at once, non-zero, saying
/// why; before it ever connects to the broker.
#[test]
fn a_bad_http_address_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a port to occupy");
    let taken = taken.local_addr().expect("its address").to_string();
    for address in ["not-an-address", taken.as_str()] {
        let output = Command::new(binary("warren-worker"))
            .args(["--queue", "t-health-never", "--http", address])
            .env_remove("WARREN_CONFIG")
            .env("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("NO_COLOR", "1")
            .output()
            .expect("running warren-worker");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!output.status.success(), "{address}: {text}");
        assert!(
            text.contains(&format!("cannot listen on --http {address}")),
            "{address}: {text}"
        );
    }
}

/// The port of a running `warren serve`.
fn serve_port(serve: &Serve) -> u16 {
    let address = serve.address();
    let port = address.rsplit_once(':').map_or(address, |(_, port)| port);
    port.parse().expect("warren serve's port")
}

/// `warren serve` with its broker at a port nothing listens on: alive (`/healthz` 200), not
/// ready (`/readyz` 503, at once: the probe never waits for the broker, and [`probe::get`]
/// gives up after 5 s), and it stays so.
#[tokio::test]
async fn serve_is_alive_but_not_ready_without_a_broker() {
    let closed = probe::free_port();
    let config = format!("[broker]\nurl = \"amqp://guest:guest@127.0.0.1:{closed}/%2f\"\n");
    let serve = Serve::builder(&config).start().await;
    let port = serve_port(&serve);
    for _ in 0..4 {
        let ready = probe::get(port, "/readyz").await.expect("/readyz answers");
        assert_eq!(ready.status, 503, "{ready:?}\n{}", serve.stderr());
        assert!(ready.body.contains("not connected"), "{ready:?}");
        assert_probe_headers(&ready);
        let alive = probe::get(port, "/healthz")
            .await
            .expect("/healthz answers");
        assert_eq!(alive.status, 200);
        assert_probe_headers(&alive);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let scrape = Scrape::fetch(port).await;
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "dispatcher")]),
        0.0
    );
}

/// `warren serve` with the broker: ready once its dispatcher is connected (the first probe
/// starts the connection: the dispatcher connects lazily), and its `/metrics` counts the
/// requests by route and status.
#[tokio::test]
async fn serve_is_ready_with_the_broker_and_counts_requests() {
    let config = format!("[broker]\nurl = \"{}\"\n", broker_url());
    let serve = Serve::builder(&config).start().await;
    let port = serve_port(&serve);
    let ready = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(20)).await;
    let ready = ready.expect("/readyz answers");
    assert_eq!(ready.status, 200, "{ready:?}\n{}", serve.stderr());
    assert_probe_headers(&ready);
    let scrape = Scrape::fetch(port).await;
    assert_eq!(
        scrape.value("warren_connected", &[("connection", "dispatcher")]),
        1.0
    );
    assert!(
        scrape.value(
            "warren_http_requests_total",
            &[("route", "/readyz"), ("status", "200")]
        ) >= 1.0
    );
    assert!(
        scrape.histogram_count(
            "warren_http_request_duration_seconds",
            &[("route", "/readyz")]
        ) >= 1.0
    );
    // A path of the API's own is counted by its template, never the raw path.
    // (Read from the text: prometheus-parse cannot take the braces of a route template in a
    // label value.)
    let _ = probe::get(port, "/v1/queues/some-queue/dead").await;
    let text = probe::get(port, "/metrics").await.expect("/metrics").body;
    let line = "warren_http_requests_total{route=\"/v1/queues/{queue}/dead\",status=\"401\"} 1";
    assert!(text.lines().any(|l| l == line), "{text}");
    assert!(!text.contains("some-queue"), "{text}");
}

/// A queue whose consumer the broker cancels (the queue deleted) makes the worker not ready
/// until it consumes that queue again (declared anew), while its other queue goes on.
#[tokio::test]
async fn readiness_needs_a_consumer_on_every_queue() {
    let (kept, deleted) = (unique_queue("health-kept"), unique_queue("health-gone"));
    let dispatcher = dispatcher(&config(&[&kept, &deleted])).await;
    let port = probe::free_port();
    let dir = std::env::temp_dir().join(format!("warren-{deleted}"));
    let mut worker =
        procs::WorkerSpec::new(binary("warren-worker"), "worker", &[&kept, &deleted], &dir)
            .env("WARREN_AMQP_URL", broker_url())
            .env("WARREN_WORKER_HTTP", format!("127.0.0.1:{port}"))
            .spawn(0)
            .expect("starting warren-worker");
    worker
        .wait_started(Duration::from_secs(30))
        .await
        .expect("the worker consumes");
    let ready = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(ready.map(|r| r.status), Some(200), "{}", worker.log_tail());

    let channel = connect().await.create_channel().await.expect("channel");
    channel
        .queue_delete(deleted.as_str().into(), Default::default())
        .await
        .expect("deleting the queue");
    // The broker cancels the consumer (or, rarely on 3.10, the watchdog finds it gone).
    let gone = probe::wait_for_status(port, "/readyz", 503, Duration::from_secs(30)).await;
    let gone = gone.expect("/readyz answers");
    assert_eq!(gone.status, 503, "{gone:?}\n{}", worker.log_tail());
    assert!(
        gone.body.contains(&deleted),
        "the reason names the queue: {gone:?}"
    );
    assert!(!gone.body.contains(&kept), "{gone:?}");
    let alive = probe::get(port, "/healthz")
        .await
        .expect("/healthz answers");
    assert_eq!(alive.status, 200);

    dispatcher
        .apply_topology(std::slice::from_ref(&deleted))
        .await
        .expect("declaring the queue again");
    let back = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(30)).await;
    let back = back.expect("/readyz answers");
    assert_eq!(back.status, 200, "{back:?}\n{}", worker.log_tail());
    let scrape = Scrape::fetch(port).await;
    assert!(
        scrape.value("warren_consumer_cancels_total", &[("queue", &deleted)]) >= 1.0,
        "the cancel is counted"
    );
    assert_eq!(
        scrape.value("warren_consumer_cancels_total", &[("queue", &kept)]),
        0.0
    );

    worker.terminate(Duration::from_secs(20)).await;
    cleanup(&channel, &[&kept, &deleted]).await;
    dispatcher.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Given a ready worker, when its consuming connection is cut while its publishing connection
/// hangs (a half-dead network path: nothing answers, nothing closes), then `/readyz` is 503
/// within seconds. The session used to say it had ended only after closing both connections,
/// and the hanging one's close waited the whole operation timeout (30 s) while the worker said
/// "ready"; a cut that reached the two connections a moment apart did the same on CI.
#[tokio::test]
async fn readiness_drops_at_once_when_a_session_ends() {
    let queue = unique_queue("health-hang");
    let relay = Relay::start(broker_authority()).await;
    let (mut worker, port, dir) = worker_through(&relay, &queue).await;
    let ready = probe::wait_for_status(port, "/readyz", 200, Duration::from_secs(10)).await;
    assert_eq!(ready.map(|r| r.status), Some(200), "{}", worker.log_tail());

    // The worker connects its consuming connection first, then its publishing one.
    relay.freeze();
    relay.cut_connection(0);
    let away = probe::wait_for_status(port, "/readyz", 503, Duration::from_secs(5)).await;
    let away = away.expect("/readyz answers while the broker is away");
    assert_eq!(away.status, 503, "{away:?}\n{}", worker.log_tail());

    worker.terminate(Duration::from_secs(20)).await;
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
    let _ = std::fs::remove_dir_all(&dir);
}
