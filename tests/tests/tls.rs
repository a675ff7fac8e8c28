//! TLS to the broker (issue 10): jobs run over `amqps://` with the test CA; a wrong CA, an
//! expired certificate and a wrong host name are each refused with their own message; a client
//! certificate logs in by SASL EXTERNAL; `amqps://` to the plain listener is refused, never
//! downgraded.
//!
//! The broker's TLS listener and its certificates come from `scripts/broker` through the
//! variables `scripts/test` exports ([`warren_tests::tls`]); without them the tests fail with
//! instructions. The bad certificates are made by `scripts/tls` for each test and served by a
//! throwaway `openssl s_server`, or (the wrong CA, the wrong name) met at the real broker.

use std::process::Command;
use std::time::Duration;

use warren_core::config::{BrokerConfig, Config, TlsConfig};
use warren_core::connection::{ConnectError, connect};
use warren_core::tls::TlsFailure;
use warren_tests::tls::{BrokerTls, CertDir, TlsServer, broker_tls};
use warren_tests::*;
use warren_workers::Registry;

const DEADLINE: Duration = Duration::from_secs(30);

fn tls_broker(tls: &BrokerTls) -> BrokerConfig {
    BrokerConfig {
        url: tls.url.clone(),
        tls: TlsConfig {
            ca_file: Some(tls.ca_file()),
            ..TlsConfig::default()
        },
        connect_timeout: Duration::from_secs(3),
        ..BrokerConfig::default()
    }
}

/// Connects and expects a TLS failure; returns it with the error's message.
/// Settings for `server` at 127.0.0.1 that trust the CA of `certs` (and nothing else).
fn trusting_ca(server: &TlsServer, certs: &CertDir) -> BrokerConfig {
    BrokerConfig {
        url: server.url("127.0.0.1"),
        tls: TlsConfig {
            ca_file: Some(certs.file("ca.pem")),
            ..TlsConfig::default()
        },
        ..BrokerConfig::default()
    }
}

async fn refused(broker: &BrokerConfig) -> (TlsFailure, String) {
    match connect(broker, "warren-tests tls refused").await {
        Ok(_) => panic!("connected to {} although it must be refused", broker.url),
        Err(ConnectError::Tls { failure, .. }) => {
            let message = connect(broker, "warren-tests tls refused")
                .await
                .expect_err("refused again")
                .to_string();
            (failure, message)
        }
        Err(other) => panic!("expected a TLS error, got: {other}"),
    }
}

/// Given the broker's TLS listener and its CA in `[broker.tls] ca_file`, when a dispatcher
/// submits 20 jobs over `amqps://` and a worker consumes them over `amqps://`, then every job
/// is processed once, and the broker lists the test's connections as TLS ones.
#[tokio::test]
async fn jobs_run_over_tls() {
    let tls = broker_tls();
    let queue = unique_queue("tls-jobs");
    let mut config = config(&[&queue]);
    config.broker = tls_broker(&tls);
    config.validate().expect("an amqps config is valid");

    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);

    let mut ids = Vec::new();
    for i in 0..20 {
        let job = warren_core::NewJob::new(&queue, "echo", &serde_json::json!({ "i": i }));
        ids.push(dispatcher.submit(job).await.expect("submitted over TLS"));
    }
    let calls = recorder.wait_for(20, DEADLINE).await;
    assert_eq!(calls.len(), 20, "every job processed once");

    let listing = broker_ctl(&["-q", "list_connections", "ssl", "port"]);
    let tls_port = warren_tests::tls::host_port(&tls.url);
    let tls_port = tls_port.rsplit(':').next().expect("a port");
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with("true") && line.ends_with(tls_port)),
        "connections on the TLS port are TLS:\n{listing}"
    );

    worker.stop().await;
    let channel = warren_tests::connect()
        .await
        .create_channel()
        .await
        .expect("channel");
    cleanup(&channel, &[&queue]).await;
}

/// Given the broker's client certificate (CN = the script's EXTERNAL user) and an `amqps://`
/// URL without user or password, when Warren connects, submits and consumes, then the broker
/// shows the connection logged in as that user by EXTERNAL over TLS, and the job runs.
#[tokio::test]
async fn a_client_certificate_logs_in_by_external() {
    let tls = broker_tls();
    let queue = unique_queue("tls-external");
    let mut config = config(&[&queue]);
    config.broker = tls_broker(&tls);
    config.broker.url = tls.url_without_user();
    config.broker.tls.cert_file = Some(tls.client_cert());
    config.broker.tls.key_file = Some(tls.client_key());

    let name = format!("warren-tests external {}", uuid::Uuid::now_v7().simple());
    let connection = connect_named(&config.broker, &name).await;
    let listing = broker_ctl(&[
        "-q",
        "list_connections",
        "user",
        "auth_mechanism",
        "ssl",
        "client_properties",
    ]);
    let line = listing
        .lines()
        .find(|line| line.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed:\n{listing}"));
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        &fields[..3],
        [tls.client_user.as_str(), "EXTERNAL", "true"],
        "{line}"
    );
    drop(connection);

    let dispatcher = dispatcher(&config).await;
    let recorder = Recorder::new();
    let mut registry = Registry::new();
    recorder.handle(&mut registry, "echo", |_| Ok(None));
    let worker = start_worker(&config, registry, &[&queue]);
    let job = warren_core::NewJob::new(&queue, "echo", &serde_json::json!({ "by": "EXTERNAL" }));
    dispatcher.submit(job).await.expect("submitted");
    assert_eq!(recorder.wait_for(1, DEADLINE).await.len(), 1);
    worker.stop().await;
    let channel = warren_tests::connect()
        .await
        .create_channel()
        .await
        .expect("channel");
    cleanup(&channel, &[&queue]).await;
}

async fn connect_named(broker: &BrokerConfig, name: &str) -> lapin::Connection {
    match connect(broker, name).await {
        Ok(connection) => connection,
        Err(err) => panic!("connecting over TLS: {err}; {}", warren_tests::tls::HOW_TO),
    }
}

/// Given `ca_file` naming another CA than the one that signed the broker's certificate, when
/// Warren connects to the broker's TLS listener, then it is refused at once as an unknown
/// issuer, and the message says to check the CA file.
#[tokio::test]
async fn a_wrong_ca_is_refused() {
    let tls = broker_tls();
    let other = CertDir::with_ca("wrong-ca");
    let mut broker = tls_broker(&tls);
    broker.tls.ca_file = Some(other.file("ca.pem"));
    let started = std::time::Instant::now();
    let (failure, message) = refused(&broker).await;
    assert_eq!(failure, TlsFailure::UnknownIssuer, "{message}");
    assert!(
        message.contains("not signed by a trusted CA") && message.contains("ca_file"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "not retried: {:?}",
        started.elapsed()
    );
}

/// Given a server whose certificate (signed by the trusted CA, for 127.0.0.1) expired
/// yesterday, when Warren connects, then it is refused as expired.
#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let certs = CertDir::with_ca("expired");
    let (cert, key) = certs.server("server", true, &["localhost", "127.0.0.1"]);
    let server = TlsServer::start(&cert, &key);
    let broker = trusting_ca(&server, &certs);
    let (failure, message) = refused(&broker).await;
    assert_eq!(failure, TlsFailure::Expired, "{message}");
    assert!(message.contains("certificate has expired"), "{message}");
}

/// Given certificates that do not name the host connected to — a server whose valid
/// certificate is for `elsewhere.example` only, and the real broker checked against
/// `server_name = "wrong.example"` — when Warren connects, then both are refused as a wrong
/// host name; and `server_name = "localhost"` with a URL to 127.0.0.1 is accepted.
#[tokio::test]
async fn a_wrong_host_name_is_refused() {
    let certs = CertDir::with_ca("wrong-name");
    let (cert, key) = certs.server("server", false, &["elsewhere.example"]);
    let server = TlsServer::start(&cert, &key);
    let broker = trusting_ca(&server, &certs);
    let (failure, message) = refused(&broker).await;
    assert_eq!(failure, TlsFailure::WrongHostName, "{message}");
    assert!(
        message.contains("not issued for this host name") && message.contains("server_name"),
        "{message}"
    );

    let tls = broker_tls();
    let mut broker = tls_broker(&tls);
    broker.tls.server_name = Some("wrong.example".to_owned());
    let (failure, message) = refused(&broker).await;
    assert_eq!(failure, TlsFailure::WrongHostName, "{message}");
    assert!(message.contains("wrong.example"), "{message}");

    broker.tls.server_name = Some("localhost".to_owned());
    connect_named(&broker, "warren-tests tls server_name").await;
}

/// Given the plain AMQP listener (WARREN_AMQP_URL), when Warren is given the same address as
/// `amqps://`, then it is refused as "does not speak TLS" — in the library and in `warren
/// submit`, which exits non-zero — and nothing reaches the queue: never a plaintext downgrade.
#[tokio::test]
async fn amqps_to_the_plain_listener_is_refused() {
    let plain = broker_url();
    assert!(plain.starts_with("amqp://"), "WARREN_AMQP_URL: {plain}");
    let amqps = plain.replacen("amqp://", "amqps://", 1);
    let tls = broker_tls();
    let broker = BrokerConfig {
        url: amqps.clone(),
        tls: TlsConfig {
            ca_file: Some(tls.ca_file()),
            ..TlsConfig::default()
        },
        ..BrokerConfig::default()
    };
    let (failure, message) = refused(&broker).await;
    assert_eq!(failure, TlsFailure::NotTls, "{message}");
    assert!(message.contains("does not speak TLS"), "{message}");

    // The command line, as in issue 10 (it used to succeed in plaintext).
    let queue = unique_queue("tls-plain");
    let channel = warren_tests::connect()
        .await
        .create_channel()
        .await
        .expect("channel");
    let mut apply = Config::default();
    apply.broker.url = plain.clone();
    warren_dispatcher::Dispatcher::connect(&apply)
        .await
        .expect("plain connect")
        .apply_topology(std::slice::from_ref(&queue))
        .await
        .expect("declared");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(binary("warren"))
            .args([
                "submit",
                "--queue",
                &queue,
                "--kind",
                "echo",
                "--payload",
                "{}",
            ])
            .current_dir(std::env::temp_dir())
            .env_remove(warren_core::config::CONFIG_ENV)
            .env(warren_core::config::AMQP_URL_ENV, &amqps)
            .output()
            .map(|output| (output, queue))
    })
    .await
    .expect("joined")
    .expect("running warren");
    let (output, queue) = output;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "refused: {stderr}");
    assert!(stderr.contains("does not speak TLS"), "{stderr}");
    assert!(output.stdout.is_empty(), "no job id printed");
    assert_eq!(ready_count(&channel, &queue).await, 0, "nothing was queued");
    cleanup(&channel, &[&queue]).await;
}

/// Given `[broker.tls]` (here `WARREN_TLS_CA_FILE`) with an `amqp://` URL, when `warren` runs,
/// then it stops before connecting, naming the variable and saying to use `amqps://`.
#[test]
fn tls_settings_with_a_plaintext_url_are_an_error() {
    let output = Command::new(binary("warren"))
        .args(["topology", "apply", "--queue", "q"])
        .current_dir(std::env::temp_dir())
        .env_remove(warren_core::config::CONFIG_ENV)
        .env(warren_core::config::AMQP_URL_ENV, broker_url())
        .env(
            warren_core::config::TLS_CA_FILE_ENV,
            "/etc/ssl/certs/ca.pem",
        )
        .output()
        .expect("running warren");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("$WARREN_TLS_CA_FILE") && stderr.contains("use an amqps:// URL"),
        "{stderr}"
    );
}
