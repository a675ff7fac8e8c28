//! A dead job, seen as an operator sees it: in RabbitMQ's management UI, in a real browser.
//!
//! Headless Chromium (Debian's `chromium` package, `/usr/bin/chromium`) driven by
//! `playwright-core` (npm, pinned in `tests/browser/package-lock.json`: `npm ci` there) runs
//! `tests/browser/dead-letter.mjs`, which logs in, opens `<queue>.dead`, uses "Get messages"
//! and prints what the page shows. Screenshots go to `.warren/ci/screenshots/`, which CI keeps.
//! Without node, chromium or the npm packages the test fails and says how to install them:
//! it never passes without having looked.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use warren_core::envelope::{ATTEMPTS, ERROR, ERROR_CLASS, FAILED_AT, QUEUE};
use warren_core::topology::dead_queue;
use warren_tests::*;
use warren_workers::{JobError, Registry};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Given a worker whose handler fails permanently and a job submitted to a unique queue, once
/// the job is in `<queue>.dead`, when the browser logs into the management UI, opens that queue
/// and gets its messages, then the page shows the job: its id, Warren's reason headers (class
/// `permanent`, the handler's error, the attempts) and its payload; a screenshot is saved; and
/// the job is still in the queue afterwards (the UI's "Nack message requeue true").
#[tokio::test]
async fn a_dead_job_is_read_in_the_management_ui() {
    let browser = Browser::find();
    let reason = "card declined by the test gateway";
    let mut registry = Registry::new();
    registry.register("charge", move |_: Value, _| async move {
        Err::<Option<Value>, _>(JobError::permanent(reason))
    });
    let stage = Stage::new("mgmt-ui", registry).await;
    let payload = json!({ "order": 4711, "note": "seen in a browser" });
    let id = stage.submit("charge", payload.clone()).await;
    let dead = dead_queue(&stage.queue);
    wait_for_ready(&stage, &dead, 1).await;

    let page = browser.read_queue(&dead);

    let messages = page["messages"].as_array().expect("messages");
    assert_eq!(
        messages.len(),
        1,
        "the page shows the one dead job: {page:#}"
    );
    let message = &messages[0];
    assert_eq!(message["routing_key"], dead.as_str(), "{message:#}");
    let properties = &message["properties"];
    assert_eq!(properties["message_id"], id.0.as_str(), "{message:#}");
    assert_eq!(properties["type"], "charge", "{message:#}");
    let headers = &properties["headers"];
    assert_eq!(headers[ERROR_CLASS], "permanent", "{message:#}");
    let error = headers[ERROR].as_str().unwrap_or_default();
    assert!(error.contains(reason), "{message:#}");
    assert_eq!(headers[ATTEMPTS], "1", "{message:#}");
    assert_eq!(headers[QUEUE], stage.queue.as_str(), "{message:#}");
    assert!(headers[FAILED_AT].is_string(), "{message:#}");
    let shown: Value = serde_json::from_str(message["payload"].as_str().unwrap_or_default())
        .unwrap_or_else(|err| panic!("the payload is not the job's JSON ({err}): {message:#}"));
    assert_eq!(shown, payload);

    let screenshots = page["screenshots"].as_array().expect("screenshots");
    for shot in screenshots {
        let path = Path::new(shot.as_str().expect("a path"));
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 1000,
            "screenshot {} is missing or empty",
            path.display()
        );
        eprintln!("screenshot: {}", path.display());
    }
    assert!(!screenshots.is_empty());

    // Looking changed nothing.
    wait_for_ready(&stage, &dead, 1).await;
    stage.end().await;
}

/// Waits until `queue` holds `n` ready messages (quorum queue counters settle after a moment).
async fn wait_for_ready(stage: &Stage, queue: &str, n: u32) {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = ready_count(&stage.channel, queue).await;
        if ready == n {
            return;
        }
        assert!(
            Instant::now() < until,
            "`{queue}` holds {ready} ready messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The browser test's tools, checked before anything runs.
struct Browser {
    node: PathBuf,
    script_dir: PathBuf,
}

impl Browser {
    /// Finds node, chromium and the npm packages, or fails saying how to install them.
    fn find() -> Browser {
        let script_dir = workspace_root().join("tests/browser");
        let node = PathBuf::from(std::env::var("WARREN_NODE").unwrap_or_else(|_| "node".into()));
        let node_ok = Command::new(&node)
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let mut missing = Vec::new();
        if !node_ok {
            missing.push(format!(
                "Node.js (`{}` does not run): install it (Debian: apt-get install -y nodejs npm)",
                node.display()
            ));
        }
        if !Path::new(&chromium()).exists() {
            missing.push(format!(
                "Chromium ({} is missing): apt-get install -y chromium",
                chromium()
            ));
        }
        if !script_dir.join("node_modules/playwright-core").exists() {
            missing.push(format!(
                "playwright-core: run `npm ci` in {}",
                script_dir.display()
            ));
        }
        assert!(
            missing.is_empty(),
            "the management UI browser test needs (.ci/run installs them):\n  {}",
            missing.join("\n  ")
        );
        Browser { node, script_dir }
    }

    /// Runs the script on `queue` and returns what it printed.
    fn read_queue(&self, queue: &str) -> Value {
        let ui = ManagementUi::from_env();
        let vhost = vhost_of(&broker_url());
        let screenshots = workspace_root().join(".warren/ci/screenshots");
        let mut child = Command::new(&self.node)
            .arg("dead-letter.mjs")
            .current_dir(&self.script_dir)
            .env("WARREN_UI_URL", &ui.url)
            .env("WARREN_UI_USER", &ui.user)
            .env("WARREN_UI_PASSWORD", &ui.password)
            .env("WARREN_UI_VHOST", vhost)
            .env("WARREN_UI_QUEUE", queue)
            .env("WARREN_UI_SCREENSHOTS", &screenshots)
            .env("WARREN_CHROMIUM", chromium())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting node");
        let until = Instant::now() + Duration::from_secs(180);
        while child.try_wait().expect("waiting for node").is_none() {
            if Instant::now() > until {
                let _ = child.kill();
                panic!("the browser script did not finish within 180 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let output = child.wait_with_output().expect("node's output");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "the browser script failed ({}):\n{stderr}\n{stdout}",
            output.status
        );
        serde_json::from_str(stdout.trim())
            .unwrap_or_else(|err| panic!("the script printed no JSON ({err}):\n{stdout}\n{stderr}"))
    }
}

fn chromium() -> String {
    std::env::var("WARREN_CHROMIUM").unwrap_or_else(|_| CHROMIUM.to_owned())
}

/// Where the management UI is, and how to log in: `WARREN_MANAGEMENT_URL` (credentials from
/// its `user:password@`, else guest/guest), else http://127.0.0.1:15672/ as guest.
struct ManagementUi {
    url: String,
    user: String,
    password: String,
}

impl ManagementUi {
    fn from_env() -> ManagementUi {
        let url = std::env::var(warren_core::config::MANAGEMENT_URL_ENV)
            .ok()
            .filter(|u| !u.trim().is_empty())
            .unwrap_or_else(|| "http://127.0.0.1:15672/".to_owned());
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url.as_str()));
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (user, password, host) = match authority.rsplit_once('@') {
            Some((info, host)) => {
                let (user, password) = info.split_once(':').unwrap_or((info, ""));
                (decode(user), decode(password), host)
            }
            None => ("guest".to_owned(), "guest".to_owned(), authority),
        };
        ManagementUi {
            url: format!("{scheme}://{host}{path}"),
            user,
            password,
        }
    }
}

/// The vhost of an AMQP URL (its path, percent-decoded; `/` when there is none).
fn vhost_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    match rest.split_once('/') {
        Some((_, path)) if !path.is_empty() => decode(path.split('?').next().unwrap_or(path)),
        _ => "/".to_owned(),
    }
}

/// `%XX` escapes decoded.
fn decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}
