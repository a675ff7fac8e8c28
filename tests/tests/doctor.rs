//! `warren doctor` against the real broker: it passes where the topology was applied as the
//! config says, and fails (exit 4, the failing check named in `--json`) on a queue declared
//! with another argument and on a user missing a permission.
//!
//! Each test runs in a vhost of its own ([`TempVhost`]), so doctor looks only at that vhost's
//! queues, exchanges and permissions.

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use warren_tests::{TempVhost, binary, broker_ctl, config, dispatcher, unique_queue};

/// How long one `warren doctor` may take.
const DEADLINE: Duration = Duration::from_secs(90);

/// A config file for `queue` with the defaults (what `warren doctor --config` reads), deleted
/// when dropped.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(queue: &str) -> ConfigFile {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_queue("doctor-config")));
        std::fs::write(&path, format!("[queues.{queue}]\n")).expect("writing the config file");
        ConfigFile(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Users made for a test, deleted when dropped.
struct Users(Vec<String>);

impl Users {
    /// Adds `name` with `permissions` (configure, write, read) on `vhost`.
    fn add(&mut self, vhost: &TempVhost, name: &str, permissions: [&str; 3]) {
        let password = uuid::Uuid::now_v7().simple().to_string();
        broker_ctl(&["add_user", name, &password]);
        self.0.push(name.to_owned());
        let [configure, write, read] = permissions;
        broker_ctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            name,
            configure,
            write,
            read,
        ]);
    }
}

impl Drop for Users {
    fn drop(&mut self) {
        for user in &self.0 {
            let _ =
                std::process::Command::new(warren_tests::workspace_root().join("scripts/broker"))
                    .args(["ctl", "delete_user", user])
                    .output();
        }
    }
}

/// `warren doctor --config FILE --json ARGS...` in `vhost`.
async fn doctor(vhost: &TempVhost, file: &ConfigFile, args: &[&str]) -> (Output, Value) {
    let mut command = tokio::process::Command::new(binary("warren"));
    command
        .arg("--config")
        .arg(&file.0)
        .args(["doctor", "--json"])
        .args(args)
        .current_dir(std::env::temp_dir())
        .env(warren_core::config::AMQP_URL_ENV, vhost.url())
        .env_remove(warren_core::config::CONFIG_ENV)
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    let output = tokio::time::timeout(DEADLINE, command.output())
        .await
        .expect("warren doctor ends within the deadline")
        .expect("warren doctor runs");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "not JSON ({err}): {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output, report)
}

/// The checks of `report` named `check` (about `subject`, when given).
fn checks<'a>(report: &'a Value, check: &str, subject: Option<&str>) -> Vec<&'a Value> {
    report["checks"]
        .as_array()
        .expect("a list of checks")
        .iter()
        .filter(|c| c["check"] == check && subject.is_none_or(|s| c["subject"] == s))
        .collect()
}

/// The one check `check` about `subject`.
fn the_check<'a>(report: &'a Value, check: &str, subject: &str) -> &'a Value {
    match checks(report, check, Some(subject)).as_slice() {
        [one] => one,
        other => panic!("expected one `{check}` check of {subject}, got {other:?}: {report:#}"),
    }
}

/// Given the topology applied as the config says, doctor passes: exit 0, no check failed.
#[tokio::test]
async fn doctor_passes_where_the_topology_matches_the_config() {
    let vhost = TempVhost::new("doctor-ok");
    let queue = unique_queue("doctor");
    let mut config = config(&[&queue]);
    config.broker.url = vhost.url();
    let dispatcher = dispatcher(&config).await;
    let file = ConfigFile::new(&queue);

    let (output, report) = doctor(&vhost, &file, &[]).await;

    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:#?}");
    assert_eq!(output.status.code(), Some(0), "{report:#}");
    assert_eq!(report["holds"], true);
    assert_eq!(report["vhost"], vhost.name.as_str());
    for check in [
        "amqp",
        "management_api",
        "broker_version",
        "feature_flags",
        "plugins",
        "consumer_timeout",
        "exchanges",
        "delay_levels",
        "permissions",
    ] {
        assert!(
            !checks(&report, check, None).is_empty(),
            "no `{check}` check: {report:#}"
        );
    }
    let dead = warren_core::topology::dead_queue(&queue);
    for subject in [queue.as_str(), dead.as_str()] {
        assert_eq!(the_check(&report, "queue", subject)["status"], "ok");
    }
    dispatcher.close().await;
}

/// Given the queue declared with `x-delivery-limit = 3` where the config says 10, doctor
/// exits 4 and names the queue and the argument.
#[tokio::test]
async fn doctor_fails_on_a_queue_declared_with_another_argument() {
    let vhost = TempVhost::new("doctor-arg");
    let queue = unique_queue("doctor");
    let mut declared = config(&[&queue]);
    declared.broker.url = vhost.url();
    if let Some(settings) = declared.queues.get_mut(&queue) {
        settings.delivery_limit = 3;
    }
    let dispatcher = dispatcher(&declared).await;
    let file = ConfigFile::new(&queue);

    let (output, report) = doctor(&vhost, &file, &[]).await;

    assert_eq!(output.status.code(), Some(4), "{report:#}");
    assert_eq!(report["holds"], false);
    let check = the_check(&report, "queue", &queue);
    assert_eq!(check["status"], "fail", "{check:#}");
    let detail = check["detail"].as_str().expect("detail");
    assert!(detail.contains("x-delivery-limit"), "{detail}");
    assert!(
        check["fix"]
            .as_str()
            .is_some_and(|fix| fix.contains("warren topology migrate")),
        "{check:#}"
    );
    // Only that queue is wrong: its dead-letter queue and the rest hold.
    let dead = warren_core::topology::dead_queue(&queue);
    assert_eq!(the_check(&report, "queue", &dead)["status"], "ok");
    let failed: Vec<&Value> = report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["status"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    dispatcher.close().await;
}

/// Given a worker user that may not publish to `warren.dead`, doctor exits 4 and names the
/// user and the permission; a worker user with the permissions of config/definitions.json
/// passes, and one that only cannot answer `submit --wait` gets a warning.
#[tokio::test]
async fn doctor_fails_on_a_user_missing_a_permission() {
    let vhost = TempVhost::new("doctor-perm");
    let queue = unique_queue("doctor");
    let mut config = config(&[&queue]);
    config.broker.url = vhost.url();
    let dispatcher = dispatcher(&config).await;
    let file = ConfigFile::new(&queue);
    // The worker's permissions of config/definitions.json, reading this test's queue; the bad
    // user lacks `warren.dead`.
    let configure = "^amq\\.gen-.*$";
    let read = format!("^({queue}|warren\\.control|amq\\.gen-.*)$");
    let (good, bad, partial) = (
        format!("{}-good", vhost.name),
        format!("{}-bad", vhost.name),
        format!("{}-partial", vhost.name),
    );
    let mut users = Users(Vec::new());
    users.add(
        &vhost,
        &good,
        [
            configure,
            "^(warren\\.(jobs|dead|delay\\.21)|amq\\.default|amq\\.gen-.*)$",
            &read,
        ],
    );
    users.add(
        &vhost,
        &bad,
        [
            configure,
            "^(warren\\.(jobs|delay\\.21)|amq\\.default|amq\\.gen-.*)$",
            &read,
        ],
    );
    // Runs jobs, but cannot answer `warren submit --wait` (no write on amq.default): a warning.
    users.add(
        &vhost,
        &partial,
        [
            configure,
            "^(warren\\.(jobs|dead|delay\\.21)|amq\\.gen-.*)$",
            &read,
        ],
    );

    let (output, report) = doctor(
        &vhost,
        &file,
        &[
            "--user",
            &format!("{good}=worker"),
            "--user",
            &bad,
            "--user",
            &partial,
        ],
    )
    .await;

    assert_eq!(output.status.code(), Some(4), "{report:#}");
    assert_eq!(report["holds"], false);
    let failing = the_check(&report, "permissions", &bad);
    assert_eq!(failing["status"], "fail", "{failing:#}");
    let detail = failing["detail"].as_str().expect("detail");
    assert!(detail.contains("write `warren.dead`"), "{detail}");
    assert!(detail.contains("as a worker"), "{detail}");
    assert_eq!(
        the_check(&report, "permissions", &good)["status"],
        "ok",
        "{report:#}"
    );
    let warned = the_check(&report, "permissions", &partial);
    assert_eq!(warned["status"], "warn", "{warned:#}");
    assert!(
        warned["detail"]
            .as_str()
            .is_some_and(|d| d.contains("amq.default")),
        "{warned:#}"
    );
    assert_eq!(
        the_check(&report, "permissions", "guest")["status"],
        "ok",
        "{report:#}"
    );
    dispatcher.close().await;
    drop(users);
}
