//! The test broker's TLS listener and test certificates, for `tests/tls.rs` and
//! `tests/secrets.rs`.
//!
//! The listener and its certificates come from `scripts/broker` (`WARREN_BROKER_TLS`, on by
//! default for the default node): `scripts/test` exports `WARREN_AMQPS_URL` and
//! `WARREN_BROKER_TLS_DIR` (its `ca.pem`, `client.pem`/`client.key`) from `scripts/broker env`.
//! Run outside `scripts/test` with neither those nor `WARREN_AMQP_URL` set, they are read from
//! `scripts/broker env` directly. A missing listener fails the test with instructions; it is
//! never skipped. Other certificates (a wrong CA, an expired or misnamed server certificate)
//! are made by `scripts/tls` in a temporary folder, and served by `openssl s_server`.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// The test broker's TLS side.
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// `amqps://guest:guest@127.0.0.1:5671/%2f` (the node's AMQP port - 1).
    pub url: String,
    /// The node's `tls/` folder: `ca.pem`, `server.pem`, `client.pem`, `client.key`.
    pub dir: PathBuf,
    /// The user `client.pem` logs in as (SASL EXTERNAL).
    pub client_user: String,
}

impl BrokerTls {
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
    /// `url` without user and password (the login comes from the client certificate).
    pub fn url_without_user(&self) -> String {
        match self.url.split_once("://").and_then(|(s, rest)| {
            rest.rsplit_once('@')
                .map(|(_, host)| format!("{s}://{host}"))
        }) {
            Some(url) => url,
            None => self.url.clone(),
        }
    }
}

/// How to get a TLS listener, for failure messages.
pub const HOW_TO: &str = "the TLS tests need the test broker's TLS listener: run them through \
    `scripts/test` (it exports WARREN_AMQPS_URL and WARREN_BROKER_TLS_DIR from `scripts/broker \
    env`), and make sure the node was started by a scripts/broker that gives it one (a node \
    started before that needs a restart: `scripts/broker stop; scripts/broker start`; named nodes \
    need WARREN_BROKER_TLS=1 at start)";

/// The test broker's TLS listener, checked to accept TCP connections; panics with instructions
/// otherwise.
pub fn broker_tls() -> BrokerTls {
    let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (url, dir, user) = match (
        from_env("WARREN_AMQPS_URL"),
        from_env("WARREN_BROKER_TLS_DIR"),
    ) {
        (Some(url), Some(dir)) => (url, dir, from_env("WARREN_BROKER_TLS_USER")),
        _ if from_env(warren_core::config::AMQP_URL_ENV).is_some() => panic!(
            "WARREN_AMQP_URL is set but WARREN_AMQPS_URL / WARREN_BROKER_TLS_DIR are not; {HOW_TO}"
        ),
        _ => {
            let env = broker_env();
            let get = |key: &str| {
                env.lines()
                    .find_map(|line| line.strip_prefix(&format!("{key}=")))
                    .map(unquote)
            };
            match (get("WARREN_AMQPS_URL"), get("WARREN_BROKER_TLS_DIR")) {
                (Some(url), Some(dir)) => (url, dir, get("WARREN_BROKER_TLS_USER")),
                _ => panic!("`scripts/broker env` names no TLS listener; {HOW_TO}"),
            }
        }
    };
    let tls = BrokerTls {
        url,
        dir: PathBuf::from(dir),
        client_user: user.unwrap_or_else(|| "warren-tls-client".to_owned()),
    };
    assert!(
        tls.ca_file().is_file() && tls.client_cert().is_file() && tls.client_key().is_file(),
        "no test certificates in {} (ca.pem, client.pem, client.key); {HOW_TO}",
        tls.dir.display()
    );
    let address = host_port(&tls.url);
    assert!(
        TcpStream::connect_timeout(
            &address.parse().expect("the AMQPS URL has host:port"),
            Duration::from_secs(3)
        )
        .is_ok(),
        "nothing listens on {address} (WARREN_AMQPS_URL); {HOW_TO}"
    );
    tls
}

fn broker_env() -> String {
    let output = Command::new(workspace_root().join("scripts/broker"))
        .arg("env")
        .output()
        .expect("running scripts/broker env");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `scripts/broker env` quotes with printf %q; paths and URLs there need no more than this.
fn unquote(value: &str) -> String {
    value.trim_matches('\'').replace('\\', "")
}

/// `127.0.0.1:5671` from an AMQP URL.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// A temporary folder of certificates made by `scripts/tls`, removed when dropped.
pub struct CertDir(pub PathBuf);

impl CertDir {
    /// A new, empty folder with a fresh test CA in it (`ca.pem`, `ca.key`).
    pub fn with_ca(what: &str) -> CertDir {
        let dir = std::env::temp_dir().join(format!(
            "warren-certs-{what}-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir).expect("creating a temp dir");
        let dir = CertDir(dir);
        dir.tls(&["ca", &dir.path_str()]);
        dir
    }

    pub fn path_str(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Runs `scripts/tls ARGS`, panicking with its output if it fails.
    pub fn tls(&self, args: &[&str]) {
        let output = Command::new(workspace_root().join("scripts/tls"))
            .args(args)
            .output()
            .expect("running scripts/tls");
        assert!(
            output.status.success(),
            "scripts/tls {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A server certificate of this folder's CA for `names`, expired or not: `OUT.pem/.key`.
    pub fn server(&self, out: &str, expired: bool, names: &[&str]) -> (PathBuf, PathBuf) {
        let kind = if expired { "expired-server" } else { "server" };
        let prefix = self.file(out);
        let mut args = vec![
            kind.to_owned(),
            self.path_str(),
            prefix.to_string_lossy().into_owned(),
        ];
        args.extend(names.iter().map(|n| (*n).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tls(&args);
        (prefix.with_extension("pem"), prefix.with_extension("key"))
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway TLS server (`openssl s_server`) on a free loopback port, presenting `cert`;
/// killed when dropped. It speaks no AMQP: the tests only need its handshake.
pub struct TlsServer {
    child: Child,
    pub port: u16,
}

impl TlsServer {
    pub fn start(cert: &Path, key: &Path) -> TlsServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting openssl s_server (scripts/tls installs openssl)");
        let server = TlsServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "openssl s_server did not listen on {port} within 10 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// `amqps://guest:guest@HOST:PORT/%2f`.
    pub fn url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
