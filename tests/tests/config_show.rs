//! `warren config show`: the effective configuration, where each value came from, and no
//! password in sight. No broker needed: the command only reads the configuration.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use warren_core::config::{AMQP_URL_ENV, CONFIG_ENV, MANAGEMENT_URL_ENV};
use warren_tests::binary;

const FILE_PASSWORD: &str = "file-pw-0451";
const ENV_PASSWORD: &str = "env-pw-9d2e";
const MANAGEMENT_PASSWORD: &str = "mgmt-pw-77c1";

/// A config file of the test's own, in a directory of its own.
fn config_file(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "warren-config-show-{what}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("warren.toml");
    std::fs::write(
        &path,
        format!(
            "[broker]\nurl = \"amqp://fileuser:{FILE_PASSWORD}@127.0.0.1:5672/%2f\"\n\
             [worker]\nconcurrency = 3\n\
             [management]\nuser = \"ops\"\npassword = \"{MANAGEMENT_PASSWORD}\"\n\
             [queue_defaults]\njob_timeout = \"2m\"\n\
             [queues.emails]\ndelivery_limit = 4\n"
        ),
    )
    .expect("write config");
    path
}

/// Runs `warren ARGS` with only the given Warren variables set; returns stdout and stderr.
fn warren(args: &[&str], env: &[(&str, &str)], dir: &Path) -> (String, String) {
    let mut command = Command::new(binary("warren"));
    command.args(args).current_dir(dir);
    for (var, _) in warren_core::config::ENV_OVERRIDES {
        command.env_remove(var);
    }
    command.env_remove(CONFIG_ENV);
    for (var, value) in env {
        command.env(var, value);
    }
    let output = command.output().expect("running warren");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    );
    assert!(output.status.success(), "warren {args:?} failed: {stderr}");
    (stdout, stderr)
}

/// Given a config file that sets the broker URL (with a password), the worker's concurrency,
/// the management password and queue settings, and `WARREN_AMQP_URL` (another password), when
/// `warren config show --json` runs, then the variable wins and is named as the source, the
/// file's values are attributed to the file (a queue key inherited from its `[queue_defaults]`
/// too), untouched keys to the defaults, and no password appears anywhere in the output.
#[test]
fn an_env_var_wins_and_is_named_a_file_value_is_attributed_and_no_password_shows() {
    let file = config_file("json");
    let dir = file.parent().expect("dir");
    let env_url = format!("amqp://envuser:{ENV_PASSWORD}@127.0.0.1:5672/%2f");
    let file_arg = file.to_str().expect("UTF-8 path");
    let (stdout, stderr) = warren(
        &["--config", file_arg, "config", "show", "--json"],
        &[(AMQP_URL_ENV, &env_url)],
        dir,
    );
    let shown: Value = serde_json::from_str(&stdout).expect("JSON");
    let setting = |key: &str| {
        shown["settings"]
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in {shown:#}"))
            .clone()
    };
    assert_eq!(shown["file"], file_arg);

    let url = setting("broker.url");
    assert_eq!(url["source"], "env");
    assert_eq!(url["env"], AMQP_URL_ENV);
    assert_eq!(url["value"], "amqp://envuser:***@127.0.0.1:5672/%2f");

    for (key, value) in [
        ("worker.concurrency", Value::from(3)),
        ("management.user", Value::from("ops")),
        ("management.password", Value::from("***")),
        ("queues.emails.delivery_limit", Value::from(4)),
        ("queues.emails.job_timeout", Value::from("2m")),
    ] {
        let got = setting(key);
        assert_eq!(got["source"], "file", "{key}: {got}");
        assert_eq!(got["path"], file_arg, "{key}: {got}");
        assert_eq!(got["value"], value, "{key}");
    }
    for key in [
        "worker.shutdown_grace",
        "broker.heartbeat",
        "queues.emails.retry.max_attempts",
    ] {
        assert_eq!(setting(key)["source"], "default", "{key}");
    }
    assert_eq!(setting("worker.shutdown_grace")["value"], "30s");

    for secret in [FILE_PASSWORD, ENV_PASSWORD, MANAGEMENT_PASSWORD] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown:\n{stdout}\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Given the config file named by `WARREN_CONFIG` and the management URL (with a password) in
/// `WARREN_MANAGEMENT_URL`, when `warren config show` prints its table, then each line names
/// its source (`$WARREN_MANAGEMENT_URL`, the file, `default`), the file is said to come from
/// `$WARREN_CONFIG`, and no password appears.
#[test]
fn the_table_names_each_source_and_hides_every_password() {
    let file = config_file("text");
    let dir = file.parent().expect("dir");
    let management = format!("http://ops:{MANAGEMENT_PASSWORD}@127.0.0.1:15672/");
    let file_arg = file.to_str().expect("UTF-8 path");
    let (stdout, stderr) = warren(
        &["config", "show"],
        &[(CONFIG_ENV, file_arg), (MANAGEMENT_URL_ENV, &management)],
        dir,
    );
    let line = |key: &str| {
        stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no line for {key}:\n{stdout}"))
            .to_owned()
    };
    assert!(
        stdout.starts_with(&format!("# config file: {file_arg} ($WARREN_CONFIG)")),
        "{stdout}"
    );
    let url = line("management.url");
    assert!(url.ends_with(&format!("# ${MANAGEMENT_URL_ENV}")), "{url}");
    assert!(url.contains("http://ops:***@127.0.0.1:15672/"), "{url}");
    assert!(line("worker.concurrency").ends_with(&format!("# {file_arg}")));
    assert!(line("broker.url").contains("fileuser:***@"));
    assert!(line("worker.shutdown_grace").ends_with("# default"));
    for secret in [FILE_PASSWORD, MANAGEMENT_PASSWORD] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} shown:\n{stdout}\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}
