//! The `warren` command as a user runs it: what it prints on stdout and stderr, its exit
//! status, and what it leaves in the broker.
//!
//! Every run gets `WARREN_AMQP_URL` set to the test broker, `WARREN_CONFIG` removed unless the
//! test sets it, and a working directory without a `config/warren.toml`, so no config file
//! leaks in. Each run has a deadline; a hung command is killed and fails the test.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use warren_tests::cli::Warren;
use warren_tests::*;

const DEADLINE: Duration = Duration::from_secs(30);

/// Given a queue declared with `warren topology apply --queue Q`, when one job is submitted
/// with an inline payload, a payload file and a payload on stdin, then each run exits 0 and
/// prints exactly one job id line, and the queue holds those three jobs with their payloads.
#[tokio::test]
async fn topology_apply_then_submit_prints_one_id_per_job() {
    let queue = unique_queue("cli-submit");
    let channel = connect().await.create_channel().await.expect("channel");

    let apply = Warren::new(&["topology", "apply", "--queue", &queue])
        .run_async()
        .await;
    apply.assert_success();
    assert!(
        apply.stdout.contains("warren.jobs"),
        "apply lists the jobs exchange:\n{}",
        apply.stdout
    );
    assert!(
        apply.stdout.lines().any(|line| line.contains(&queue)),
        "apply lists the queue:\n{}",
        apply.stdout
    );

    let inline = Warren::new(&[
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload",
        r#"{"a":1}"#,
    ])
    .run_async()
    .await;
    let inline_id = inline.single_id();

    let dir = TempDir::new("cli-submit");
    let payload_file = dir.write("payload.json", br#"{"from":"file"}"#);
    let from_file = Warren::new(&[
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload-file",
    ])
    .arg(payload_file.to_str().expect("utf-8 temp path"))
    .run_async()
    .await;
    let file_id = from_file.single_id();

    let from_stdin = Warren::new(&["submit", "--queue", &queue, "--kind", "echo"])
        .stdin(br#"{"from":"stdin"}"#)
        .run_async()
        .await;
    let stdin_id = from_stdin.single_id();

    let messages = take_messages(&channel, &queue, 3, DEADLINE).await;
    let got: Vec<(String, String)> = messages
        .iter()
        .map(|m| {
            let id = m
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            (id, String::from_utf8_lossy(&m.data).into_owned())
        })
        .collect();
    let want = [
        (inline_id, r#"{"a":1}"#.to_owned()),
        (file_id, r#"{"from":"file"}"#.to_owned()),
        (stdin_id, r#"{"from":"stdin"}"#.to_owned()),
    ];
    assert_eq!(
        got.iter().collect::<HashSet<_>>(),
        want.iter().collect::<HashSet<_>>()
    );
    assert_eq!(
        ready_count(&channel, &queue).await,
        0,
        "nothing else queued"
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given a queue that was never declared, when a job is submitted to it, then the command
/// exits non-zero and says that the queue does not exist, naming it.
#[tokio::test]
async fn submit_to_missing_queue_says_it_does_not_exist() {
    let queue = unique_queue("cli-missing");
    // The shared exchanges exist on any broker Warren ran on; make sure of it here, so the
    // only thing missing is the queue.
    let _shared = dispatcher(&config(&[])).await;

    let run = Warren::new(&[
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload",
        "{}",
    ])
    .run_async()
    .await;
    run.assert_failure();
    assert!(
        run.stdout.trim().is_empty(),
        "no id printed: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains(&queue) && run.stderr.contains("does not exist"),
        "stderr: {}",
        run.stderr
    );
    let channel = connect().await.create_channel().await.expect("channel");
    cleanup(&channel, &[&queue]).await;
}

/// Given a broker (vhost) where Warren's topology was never declared, when a job is
/// submitted, then the command says the topology is missing and how to declare it.
#[tokio::test]
async fn submit_before_any_topology_says_how_to_declare_it() {
    let vhost = tokio::task::spawn_blocking(|| TempVhost::new("cli-bare"))
        .await
        .expect("vhost");

    let run = Warren::new(&[
        "submit",
        "--queue",
        "anything",
        "--kind",
        "echo",
        "--payload",
        "{}",
    ])
    .env(warren_core::config::AMQP_URL_ENV, vhost.url())
    .run_async()
    .await;

    run.assert_failure();
    assert!(
        run.stderr.contains("never declared") && run.stderr.contains("warren topology apply"),
        "stderr: {}",
        run.stderr
    );
    tokio::task::spawn_blocking(move || drop(vhost))
        .await
        .expect("vhost deleted");
}

/// Given a declared queue, when the payload is not JSON, then the command exits non-zero,
/// says the payload is "not valid JSON", and nothing was queued.
#[tokio::test]
async fn invalid_json_payload_is_refused() {
    let queue = unique_queue("cli-json");
    let _dispatcher = dispatcher(&config(&[&queue])).await;

    let run = Warren::new(&[
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload",
        r#"{"a":"#,
    ])
    .run_async()
    .await;
    run.assert_failure();
    assert!(
        run.stdout.trim().is_empty(),
        "no id printed: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains("not valid JSON"),
        "stderr: {}",
        run.stderr
    );
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0);
    cleanup(&channel, &[&queue]).await;
}

/// Given a config file with `jobs.max_payload_bytes = 100` (via `WARREN_CONFIG`), when a
/// 200-byte JSON payload is submitted, then the command exits non-zero, says it is "over the
/// limit", and nothing was queued.
#[tokio::test]
async fn payload_over_the_configured_limit_is_refused() {
    let queue = unique_queue("cli-limit");
    let _dispatcher = dispatcher(&config(&[&queue])).await;
    let dir = TempDir::new("cli-limit");
    let config_file = dir.write("warren.toml", b"[jobs]\nmax_payload_bytes = 100\n");
    let payload = format!(r#"{{"s":"{}"}}"#, "x".repeat(192));
    assert_eq!(payload.len(), 200);

    let run = Warren::new(&[
        "submit",
        "--queue",
        &queue,
        "--kind",
        "echo",
        "--payload",
        &payload,
    ])
    .env("WARREN_CONFIG", &config_file)
    .run_async()
    .await;
    run.assert_failure();
    assert!(
        run.stdout.trim().is_empty(),
        "no id printed: {}",
        run.stdout
    );
    assert!(
        run.stderr.contains("over the limit"),
        "stderr: {}",
        run.stderr
    );
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 0);
    cleanup(&channel, &[&queue]).await;
}

/// Given a config file with a misspelt key or an out-of-range value, when any command runs
/// with it, then it exits non-zero and the error names the file and the full key.
#[test]
fn bad_config_files_name_the_file_and_the_key() {
    let cases: [(&str, &[u8], &str); 2] = [
        ("cli-typo", b"[worker]\nconcurency = 3\n", "concurency"),
        (
            "cli-bad-value",
            b"[queues.q.retry]\nmultiplier = 0.1\n",
            "queues.q.retry.multiplier",
        ),
    ];
    for (name, text, key) in cases {
        let dir = TempDir::new(name);
        let config_file = dir.write("warren.toml", text);

        let run = Warren::new(&[
            "submit",
            "--queue",
            "q",
            "--kind",
            "echo",
            "--payload",
            "{}",
        ])
        .env("WARREN_CONFIG", &config_file)
        .run();

        run.assert_failure();
        let file = config_file.display().to_string();
        assert!(
            run.stderr.contains(&file),
            "stderr names {file}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains(key),
            "stderr names {key}: {}",
            run.stderr
        );
    }
}

/// Given no broker at the URL (port 1), when a job is submitted, then the command gives up
/// within 15 s, exits non-zero and says it "cannot reach RabbitMQ".
#[test]
fn broker_down_fails_fast_with_a_clear_message() {
    let run = Warren::new(&[
        "submit",
        "--queue",
        "q",
        "--kind",
        "echo",
        "--payload",
        "{}",
    ])
    .env("WARREN_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
    .run();
    println!("gave up after {:?}", run.took);
    run.assert_failure();
    assert!(
        run.took < Duration::from_secs(15),
        "took {:?} to give up",
        run.took
    );
    assert!(
        run.stderr.contains("cannot reach RabbitMQ"),
        "stderr: {}",
        run.stderr
    );
}

/// Given a declared queue and a file of 50 job lines, when it is submitted with `--file`,
/// then the command exits 0, prints 50 distinct ids, reports "50 of 50 jobs confirmed", and
/// the queue holds exactly those 50 jobs.
#[tokio::test]
async fn submit_file_queues_every_line() {
    let queue = unique_queue("cli-file");
    let _dispatcher = dispatcher(&config(&[&queue])).await;
    let dir = TempDir::new("cli-file");
    let lines: String = (0..50)
        .map(|i| format!("{{\"kind\":\"echo\",\"payload\":{{\"i\":{i}}}}}\n"))
        .collect();
    let jobs = dir.write("jobs.jsonl", lines.as_bytes());

    let run = Warren::new(&["submit", "--queue", &queue, "--file"])
        .arg(jobs.to_str().expect("utf-8 temp path"))
        .run_async()
        .await;
    run.assert_success();
    let ids: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(ids.len(), 50, "stdout: {}", run.stdout);
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        50,
        "ids are distinct"
    );
    assert!(
        run.stderr.contains("50 of 50 jobs confirmed"),
        "stderr: {}",
        run.stderr
    );

    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 50);
    let messages = take_messages(&channel, &queue, 50, DEADLINE).await;
    let queued: HashSet<String> = messages
        .iter()
        .filter_map(|m| m.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    let printed: HashSet<String> = ids.iter().map(|s| s.to_string()).collect();
    assert_eq!(queued, printed, "the printed ids are the queued jobs");
    cleanup(&channel, &[&queue]).await;
}

/// Given a job file whose line 3 is `not json`, when it is submitted with `--file`, then the
/// command exits non-zero, points at line 3, and submits no job at all (not even lines 1-2).
#[tokio::test]
async fn submit_file_with_a_bad_line_submits_nothing() {
    let queue = unique_queue("cli-badline");
    let _dispatcher = dispatcher(&config(&[&queue])).await;
    let dir = TempDir::new("cli-badline");
    let jobs = dir.write(
        "jobs.jsonl",
        b"{\"kind\":\"echo\",\"payload\":{\"i\":1}}\n\
          {\"kind\":\"echo\",\"payload\":{\"i\":2}}\n\
          not json\n\
          {\"kind\":\"echo\",\"payload\":{\"i\":4}}\n",
    );

    let run = Warren::new(&["submit", "--queue", &queue, "--file"])
        .arg(jobs.to_str().expect("utf-8 temp path"))
        .run_async()
        .await;
    run.assert_failure();
    assert!(
        run.stdout.trim().is_empty(),
        "no id printed: {}",
        run.stdout
    );
    assert!(run.stderr.contains("line 3"), "stderr: {}", run.stderr);
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(
        ready_count(&channel, &queue).await,
        0,
        "no job was submitted"
    );
    cleanup(&channel, &[&queue]).await;
}

/// Given a declared queue, when job lines are piped in with `--file -`, then each is
/// submitted and its id printed.
#[tokio::test]
async fn submit_file_dash_reads_stdin() {
    let queue = unique_queue("cli-stdin");
    let _dispatcher = dispatcher(&config(&[&queue])).await;

    let run = Warren::new(&["submit", "--queue", &queue, "--file", "-"])
        .stdin(
            b"{\"kind\":\"echo\",\"payload\":{\"i\":1}}\n\
              {\"kind\":\"echo\",\"payload\":{\"i\":2}}\n\
              {\"kind\":\"echo\",\"payload\":{\"i\":3}}\n",
        )
        .run_async()
        .await;
    run.assert_success();
    assert_eq!(run.stdout.lines().count(), 3, "stdout: {}", run.stdout);
    assert!(
        run.stderr.contains("3 of 3 jobs confirmed"),
        "stderr: {}",
        run.stderr
    );
    let channel = connect().await.create_channel().await.expect("channel");
    assert_eq!(ready_count(&channel, &queue).await, 3);
    cleanup(&channel, &[&queue]).await;
}

/// Given a message from a hostile producer whose id, error header and body hold terminal escape
/// sequences, when `warren peek` shows it, then nothing it prints holds a control character:
/// each is shown escaped (`\u{1b}`), and the message stays in the queue.
#[tokio::test]
async fn peek_escapes_control_characters_from_the_message() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let queue = unique_queue("cli-peek-esc");
    let channel = connect().await.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let mut headers = FieldTable::default();
    headers.insert(
        warren_core::envelope::ERROR.into(),
        AMQPValue::LongString("boom\u{1b}]0;pwned\u{7}".into()),
    );
    let properties = lapin::BasicProperties::default()
        .with_message_id("id\u{1b}[31m".into())
        .with_type("k\r".into())
        .with_headers(headers);
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"\x1b[2J\x1b[1;1Hall clear\x9b",
            properties,
        )
        .await
        .expect("publish");
    assert_eq!(ready_count_eventually(&channel, &queue, 1).await, 1);

    let run = Warren::new(&["peek", "--queue", &queue]).run_async().await;

    run.assert_success();
    assert!(
        !run.stdout.chars().any(|c| c.is_control() && c != '\n'),
        "stdout: {:?}",
        run.stdout
    );
    assert!(run.stdout.contains("id\\u{1b}[31m"), "{:?}", run.stdout);
    assert!(run.stdout.contains("\\u{1b}[2J"), "{:?}", run.stdout);
    assert!(
        run.stdout.contains("boom\\u{1b}]0;pwned\\u{7}"),
        "{:?}",
        run.stdout
    );
    let json = Warren::new(&["peek", "--queue", &queue, "--json"])
        .run_async()
        .await;
    json.assert_success();
    assert!(
        !json.stdout.chars().any(|c| c.is_control() && c != '\n'),
        "stdout: {:?}",
        json.stdout
    );
    let line: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("one JSON line");
    assert_eq!(line["id"], "id\u{1b}[31m", "the id itself, JSON-escaped");
    assert_eq!(line["error"], "boom\u{1b}]0;pwned\u{7}");
    assert_eq!(
        ready_count_eventually(&channel, &queue, 1).await,
        1,
        "peek leaves it there"
    );
    cleanup(&channel, &[&queue]).await;
}

/// Every subcommand's `--help` ends with an example of its use.
#[test]
fn every_subcommand_help_shows_an_example() {
    let commands: &[&[&str]] = &[
        &["submit"],
        &["status"],
        &["dlq"],
        &["dlq", "list"],
        &["dlq", "show"],
        &["dlq", "replay"],
        &["dlq", "purge"],
        &["dlq", "export"],
        &["inflight"],
        &["doctor"],
        &["topology"],
        &["topology", "apply"],
        &["topology", "migrate"],
        &["peek"],
        &["config"],
        &["config", "show"],
        &["completions"],
    ];
    for command in commands {
        let mut args = command.to_vec();
        args.push("--help");
        let run = Warren::new(&args).run();
        run.assert_success();
        assert!(
            run.stdout.contains("Example"),
            "`warren {}` has no example: {}",
            command.join(" "),
            run.stdout
        );
    }
}

/// The ready count of `queue` once it is `want`, or what it is after 10 s.
async fn ready_count_eventually(channel: &lapin::Channel, queue: &str, want: u32) -> u32 {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let count = ready_count(channel, queue).await;
        if count == want || Instant::now() > until {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("warren-{what}-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir(path)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).expect("writing a temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
