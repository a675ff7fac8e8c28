//! No password in sight (issue 10): every output of `warren` and `warren-worker` — `--help`,
//! successful runs, a worker's log at info, debug and trace, and every error path (bad URLs that do
//! not parse, a `,` in a password, joined URLs, an unknown scheme, a refused login, an
//! unreachable broker, a config file whose TOML or URL is broken, amqps:// to a plain
//! listener) — is searched for the test passwords, which must never appear.
//!
//! The broker user is made for the test with `scripts/broker ctl add_user` and a password
//! holding `,` `@` `%` `:`; it is deleted at the end. The masking function itself has unit
//! tests in `core/src/secret.rs`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use warren_tests::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// A broker user with a distinctive password, deleted when dropped.
struct SecretUser {
    name: String,
    /// The password as the broker knows it.
    password: String,
}

impl SecretUser {
    fn new() -> SecretUser {
        let token = uuid::Uuid::now_v7().simple().to_string();
        let token = &token[token.len() - 10..];
        let user = SecretUser {
            name: format!("t-secret-{token}"),
            password: format!("Pw{token},p@ss%w:rd"),
        };
        broker_ctl(&["add_user", &user.name, &user.password]);
        broker_ctl(&["set_permissions", "-p", "/", &user.name, ".*", ".*", ".*"]);
        user
    }

    /// The password percent-encoded for a URL.
    fn encoded(&self) -> String {
        self.password
            .replace('%', "%25")
            .replace(',', "%2C")
            .replace('@', "%40")
            .replace(':', "%3A")
    }

    /// Texts that must appear nowhere: the password raw and encoded, and its pieces on
    /// either side of the `,` (a parser that split the URL there would show one of them).
    fn needles(&self) -> Vec<String> {
        let (head, tail) = self.password.split_once(',').expect("a comma");
        let encoded = self.encoded();
        let (encoded_head, encoded_tail) = encoded.split_once("%2C").expect("a comma");
        // As lapin's trace log would print the SASL response: its bytes in decimal.
        let bytes = self
            .password
            .bytes()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        vec![
            self.password.clone(),
            encoded.clone(),
            head.to_owned(),
            tail.to_owned(),
            encoded_head.to_owned(),
            encoded_tail.to_owned(),
            bytes,
        ]
    }

    /// `amqp[s]://NAME:PASSWORD@HOST:PORT/%2f` on the test broker's address, the password as
    /// given.
    fn url(&self, scheme: &str, host_port: &str, password: &str) -> String {
        format!("{scheme}://{}:{password}@{host_port}/%2f", self.name)
    }
}

impl Drop for SecretUser {
    fn drop(&mut self) {
        let _ = Command::new(workspace_root().join("scripts/broker"))
            .args(["ctl", "delete_user", &self.name])
            .output();
    }
}

/// One captured run.
struct Run {
    what: String,
    success: bool,
    output: String,
}

/// Runs `bin` with `args` and `env` (nothing else of Warren's inherited) to its end; kills it
/// after [`DEADLINE`].
fn run(what: &str, bin: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(binary(bin));
    command
        .args(args)
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    clear_warren_env(&mut command);
    for (key, value) in env {
        command.env(key, value);
    }
    let started = Instant::now();
    let mut child = command.spawn().expect("starting the binary");
    loop {
        if child.try_wait().expect("waiting").is_some() || started.elapsed() > DEADLINE {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let output = child.wait_with_output().expect("output");
    Run {
        what: what.to_owned(),
        success: output.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

fn clear_warren_env(command: &mut Command) {
    for (key, _) in std::env::vars() {
        if key.starts_with("WARREN_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command.env("NO_COLOR", "1");
}

/// A `warren-worker` on `queue` at log level `level`, stopped with SIGTERM once its output
/// shows one of `until` (or after the deadline); its whole output.
fn run_worker(what: &str, url: &str, queue: &str, level: &str, until: &[&str]) -> Run {
    let dir =
        std::env::temp_dir().join(format!("warren-secrets-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let log = dir.join("worker.log");
    let file = std::fs::File::create(&log).expect("log file");
    let mut command = Command::new(binary("warren-worker"));
    command
        .args(["--queue", queue, "--concurrency", "2"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("clone"))
        .stderr(file);
    clear_warren_env(&mut command);
    command
        .env(warren_core::config::AMQP_URL_ENV, url)
        .env("RUST_LOG", level);
    let mut child = command.spawn().expect("starting warren-worker");
    let started = Instant::now();
    let read = |log: &PathBuf| std::fs::read_to_string(log).unwrap_or_default();
    while !until.iter().any(|u| read(&log).contains(u))
        && started.elapsed() < DEADLINE
        && child.try_wait().expect("waiting").is_none()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().expect("killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = read(&log);
    let _ = std::fs::remove_dir_all(&dir);
    Run {
        what: what.to_owned(),
        success: status.success(),
        output,
    }
}

/// Given a broker user whose password holds `,` `@` `%` `:`, when `warren` and
/// `warren-worker` run with it in good and bad URLs and configs — help, a submitted and
/// processed job (worker at info, debug and trace), and each error path — then no output contains
/// the password, raw or percent-encoded, or either half of it; the URLs they show are masked
/// (`NAME:***@`), and the env-supplied URL's errors name `$WARREN_AMQP_URL`.
#[tokio::test(flavor = "multi_thread")]
async fn no_output_shows_a_password() {
    let user = SecretUser::new();
    let plain = warren_tests::tls::host_port(&broker_url());
    let good = user.url("amqp", &plain, &user.encoded());
    let raw = user.url("amqp", &plain, &user.password);
    let wrong = user.url("amqp", &plain, &format!("{}x", user.encoded()));
    let unreachable = user.url("amqp", "127.0.0.1:1", &user.encoded());
    let amqps_to_plain = user.url("amqps", &plain, &user.encoded());
    let queue = unique_queue("secrets");
    let url_env = warren_core::config::AMQP_URL_ENV;

    let dir =
        std::env::temp_dir().join(format!("warren-secrets-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bad_toml = dir.join("bad-toml.toml");
    std::fs::write(&bad_toml, format!("[broker]\nurl = \"{raw}\" oops\n")).expect("write");
    let bad_key = dir.join("bad-key.toml");
    std::fs::write(
        &bad_key,
        format!("[broker]\nurl = \"{good}\"\n[worker]\nconcurency = 2\n"),
    )
    .expect("write");
    let bad_failover = dir.join("bad-failover.toml");
    std::fs::write(
        &bad_failover,
        format!(
            "[broker]\nurl = \"{good}\"\nfailover_urls = [\"{}\"]\n",
            user.url("amqp", "127.0.0.1:99999", &user.password)
        ),
    )
    .expect("write");
    let as_str = |p: &PathBuf| p.to_string_lossy().into_owned();

    let submit = [
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload",
        "{}",
    ];
    let joined = format!("{good},{good}");
    let http = user.url("http", &plain, &user.encoded());
    let runs = tokio::task::spawn_blocking({
        let (good, raw, wrong, unreachable, amqps_to_plain, queue) = (
            good.clone(),
            raw.clone(),
            wrong.clone(),
            unreachable.clone(),
            amqps_to_plain.clone(),
            queue.clone(),
        );
        let (bad_toml, bad_key, bad_failover) =
            (as_str(&bad_toml), as_str(&bad_key), as_str(&bad_failover));
        let submit: Vec<String> = submit.iter().map(|s| (*s).to_owned()).collect();
        move || {
            let submit: Vec<&str> = submit.iter().map(String::as_str).collect();
            let env = |url: &str| vec![(url_env, url.to_owned())];
            let mut runs = Vec::new();
            let mut go = |what: &str, bin: &str, args: &[&str], env: Vec<(&str, String)>| {
                let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
                runs.push(run(what, bin, args, &env));
            };
            go("warren --help", "warren", &["--help"], env(&good));
            go(
                "warren submit --help",
                "warren",
                &["submit", "--help"],
                env(&good),
            );
            go(
                "warren topology --help",
                "warren",
                &["topology", "--help"],
                env(&good),
            );
            go(
                "warren-worker --help",
                "warren-worker",
                &["--help"],
                env(&good),
            );
            go(
                "topology apply (good URL)",
                "warren",
                &["topology", "apply", "--queue", &queue],
                env(&good),
            );
            go("submit (good URL)", "warren", &submit, env(&good));
            go("submit (unencoded password)", "warren", &submit, env(&raw));
            go("submit (wrong password)", "warren", &submit, env(&wrong));
            go("submit (unreachable)", "warren", &submit, env(&unreachable));
            go(
                "submit (two URLs joined by ,)",
                "warren",
                &submit,
                env(&joined),
            );
            go("submit (http://)", "warren", &submit, env(&http));
            go(
                "submit (amqps:// to the plain port)",
                "warren",
                &submit,
                env(&amqps_to_plain),
            );
            go(
                "submit (failover URLs from the environment)",
                "warren",
                &submit,
                vec![
                    (url_env, unreachable.clone()),
                    (warren_core::config::FAILOVER_URLS_ENV, raw.clone()),
                ],
            );
            go(
                "submit (TLS file with amqp://)",
                "warren",
                &submit,
                vec![
                    (url_env, good.clone()),
                    (
                        warren_core::config::TLS_CA_FILE_ENV,
                        "/nonexistent.pem".to_owned(),
                    ),
                ],
            );
            for (what, path) in [
                ("config: TOML syntax error on the url line", &bad_toml),
                ("config: unknown key", &bad_key),
                ("config: failover URL that does not parse", &bad_failover),
            ] {
                go(
                    what,
                    "warren",
                    &["--config", path, "topology", "apply", "--queue", &queue],
                    vec![],
                );
                go(
                    what,
                    "warren-worker",
                    &["--config", path, "--queue", &queue],
                    vec![],
                );
            }
            let ended = ["ERROR", "error:"];
            runs.push(run_worker(
                "worker at debug (good URL)",
                &good,
                &queue,
                "debug",
                &["job done"],
            ));
            runs.push(run_worker(
                "worker at trace (good URL)",
                &good,
                &queue,
                "trace",
                &["worker started"],
            ));
            runs.push(run_worker(
                "worker at info (good URL)",
                &good,
                &queue,
                "info",
                &["worker started"],
            ));
            runs.push(run_worker(
                "worker at info (wrong password)",
                &wrong,
                &queue,
                "info",
                &ended,
            ));
            runs.push(run_worker(
                "worker at debug (unencoded password)",
                &raw,
                &queue,
                "debug",
                &["worker started", "ERROR", "error:"],
            ));
            runs
        }
    })
    .await
    .expect("runs");

    // The good runs did what they should, so the search covered real work.
    let find = |what: &str| runs.iter().find(|r| r.what == what).expect(what);
    assert!(
        find("topology apply (good URL)").success,
        "{}",
        find("topology apply (good URL)").output
    );
    assert!(
        find("submit (good URL)").success,
        "{}",
        find("submit (good URL)").output
    );
    let debug = find("worker at debug (good URL)");
    assert!(
        debug.output.contains("job done"),
        "the worker ran the job:\n{}",
        debug.output
    );
    for what in [
        "submit (wrong password)",
        "submit (unreachable)",
        "submit (two URLs joined by ,)",
        "submit (http://)",
        "submit (amqps:// to the plain port)",
        "submit (TLS file with amqp://)",
    ] {
        let run = find(what);
        assert!(!run.success, "{what} fails:\n{}", run.output);
        assert!(
            run.output.contains(&format!("{}:***@", user.name))
                || run.output.contains("$WARREN_TLS_CA_FILE"),
            "{what} shows the URL masked:\n{}",
            run.output
        );
    }
    let joined_run = find("submit (two URLs joined by ,)");
    assert!(
        joined_run.output.contains("$WARREN_AMQP_URL")
            && joined_run.output.contains("WARREN_AMQP_FAILOVER_URLS"),
        "{}",
        joined_run.output
    );

    let mut leaks = Vec::new();
    for run in &runs {
        for needle in user.needles() {
            if run.output.contains(&needle) {
                leaks.push(format!("{} shows {needle:?}:\n{}", run.what, run.output));
            }
        }
    }
    for run in &runs {
        println!(
            "{:<48} {:<8} {} bytes of output",
            run.what,
            if run.success { "exit 0" } else { "failed" },
            run.output.len()
        );
    }
    assert!(
        leaks.is_empty(),
        "passwords in the output:\n{}",
        leaks.join("\n---\n")
    );

    let _ = std::fs::remove_dir_all(&dir);
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}
