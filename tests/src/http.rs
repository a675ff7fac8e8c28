//! Running `warren serve` for the tests of the HTTP API (tests/http_api.rs, and anyone who
//! needs a live server): a config file of the test's own in a scratch folder, the test
//! broker's URL, `--listen 127.0.0.1:0` (a free port, read back from the line the server
//! prints when it listens), and a stop with SIGTERM. Dropping a [`Serve`] kills the process.
//!
//! [`client`] is a reqwest client (rustls with ring, like everything in Warren) that trusts
//! an extra CA when given one.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{binary, broker_url};

/// How long `warren serve` may take to print its address.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// A `[[http.tokens]]` entry: (name, token, scope).
pub type Token<'a> = (&'a str, &'a str, &'a str);

/// A config file's text for `warren serve`: the test broker, `queues` (default settings)
/// and `tokens`, then `extra` (more TOML, e.g. an `[http]` key or a `[jobs]` section; keys
/// of `[http]` go in `http_extra`).
pub fn serve_config(
    queues: &[&str],
    tokens: &[Token<'_>],
    http_extra: &str,
    extra: &str,
) -> String {
    let mut text = format!(
        "[broker]\nurl = \"{}\"\n\n[http]\n{http_extra}\n",
        broker_url()
    );
    for (name, token, scope) in tokens {
        text.push_str(&format!(
            "[[http.tokens]]\nname = \"{name}\"\ntoken = \"{token}\"\nscope = \"{scope}\"\n\n"
        ));
    }
    for queue in queues {
        text.push_str(&format!("[queues.\"{queue}\"]\n\n"));
    }
    text.push_str(extra);
    text
}

/// A running `warren serve`.
pub struct Serve {
    child: Child,
    /// `http://127.0.0.1:PORT` (or `https://`).
    pub base: String,
    stderr: Arc<Mutex<String>>,
    dir: PathBuf,
}

/// How to start one.
pub struct ServeBuilder {
    config: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl ServeBuilder {
    pub fn env(mut self, key: &str, value: &str) -> ServeBuilder {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn arg(mut self, arg: &str) -> ServeBuilder {
        self.args.push(arg.to_owned());
        self
    }

    /// Starts the server and waits until it listens; panics with its output otherwise.
    pub async fn start(self) -> Serve {
        tokio::task::spawn_blocking(move || self.start_blocking())
            .await
            .expect("starting warren serve did not panic")
    }

    fn start_blocking(self) -> Serve {
        let id = uuid::Uuid::now_v7().simple().to_string();
        let dir = std::env::temp_dir().join(format!("warren-serve-{id}"));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        let config = dir.join("warren.toml");
        std::fs::write(&config, &self.config).expect("writing the config");
        let mut command = Command::new(binary("warren"));
        command
            .arg("--config")
            .arg(&config)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(&self.args)
            .current_dir(&dir)
            .env_remove(warren_core::config::CONFIG_ENV)
            .env_remove(warren_core::config::AMQP_URL_ENV)
            .env_remove(warren_core::config::HTTP_TOKEN_ENV)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("starting warren serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (address_tx, address_rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("stderr is piped");
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(address) = line.split("listening on ").nth(1) {
                    // The address ends the line, or the JSON string (`--log-format json`).
                    let address = address.trim().trim_end_matches("\"}");
                    let _ = address_tx.send(address.to_owned());
                }
                let mut log = log.lock().expect("the log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        let started = Instant::now();
        let base = loop {
            if let Ok(address) = address_rx.recv_timeout(Duration::from_millis(50)) {
                break address;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "warren serve exited ({status}) before listening:\n{}",
                    stderr.lock().expect("the log lock")
                );
            }
            if started.elapsed() > START_DEADLINE {
                let _ = child.kill();
                panic!(
                    "warren serve did not listen within {START_DEADLINE:?}:\n{}",
                    stderr.lock().expect("the log lock")
                );
            }
        };
        Serve {
            child,
            base,
            stderr,
            dir,
        }
    }
}

impl Serve {
    /// A server with `config` (see [`serve_config`]).
    pub fn builder(config: &str) -> ServeBuilder {
        ServeBuilder {
            config: config.to_owned(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// `base` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port`.
    pub fn address(&self) -> &str {
        self.base
            .split_once("://")
            .map_or(self.base.as_str(), |(_, rest)| rest)
    }

    /// What the server wrote to stderr so far (its access log among it).
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("the log lock").clone()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit; kills it and panics after `deadline`.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("checking warren serve") {
                return status;
            }
            if started.elapsed() > deadline {
                let _ = self.child.kill();
                panic!(
                    "warren serve did not exit within {deadline:?}:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The scratch folder (the config file is in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A reqwest client (rustls, ring; no proxy); trusts the CA in `ca_file` too when given.
pub fn client(ca_file: Option<&Path>) -> reqwest::Client {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        for cert in CertificateDer::pem_file_iter(path).expect("reading the CA file") {
            roots
                .add(cert.expect("a PEM certificate"))
                .expect("a usable CA certificate");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("an HTTP client")
}
