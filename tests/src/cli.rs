//! Running the `warren` binary as a user does, for the tests of its commands: the test
//! broker's URL, no config file (unless a test sets `WARREN_CONFIG`), a scratch working
//! directory, `NO_COLOR`, stdin empty (not a terminal) unless given, and a deadline after which
//! the run is killed and the test fails.

use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{binary, broker_url};

/// How long a run may take before it is killed and the test fails.
pub const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// One run of the `warren` binary.
pub struct Warren {
    args: Vec<String>,
    deadline: Duration,
    env: Vec<(String, String)>,
    stdin: Option<Vec<u8>>,
}

/// What a run printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub took: Duration,
}

impl Warren {
    pub fn new(args: &[&str]) -> Warren {
        Warren {
            args: args.iter().map(|s| (*s).to_owned()).collect(),
            env: Vec::new(),
            stdin: None,
            deadline: RUN_DEADLINE,
        }
    }

    /// Kills the run and fails the test after `deadline` instead of [`RUN_DEADLINE`].
    pub fn deadline(mut self, deadline: Duration) -> Warren {
        self.deadline = deadline;
        self
    }

    pub fn arg(mut self, arg: &str) -> Warren {
        self.args.push(arg.to_owned());
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Warren {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.env.push((key.to_owned(), value));
        self
    }

    pub fn stdin(mut self, bytes: &[u8]) -> Warren {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// Runs the command on a blocking thread, for async tests.
    pub async fn run_async(self) -> Run {
        tokio::task::spawn_blocking(move || self.run())
            .await
            .expect("the warren run did not panic")
    }

    /// Runs the command to its end; kills it and panics after its deadline.
    pub fn run(self) -> Run {
        let mut command = Command::new(binary("warren"));
        command
            .args(&self.args)
            .current_dir(std::env::temp_dir())
            .env(warren_core::config::AMQP_URL_ENV, broker_url())
            .env_remove(warren_core::config::CONFIG_ENV)
            .env("NO_COLOR", "1")
            .stdin(if self.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let started = Instant::now();
        let mut child = command.spawn().expect("starting warren");
        if let (Some(bytes), Some(mut pipe)) = (self.stdin, child.stdin.take()) {
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let stdout = read_in_background(child.stdout.take());
        let stderr = read_in_background(child.stderr.take());
        let status = loop {
            if let Some(status) = child.try_wait().expect("checking the warren process") {
                break status;
            }
            if started.elapsed() > self.deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`warren {}` did not exit within {:?}",
                    self.args.join(" "),
                    self.deadline
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = started.elapsed();
        let stdout = stdout.join().expect("stdout reader");
        let stderr = stderr.join().expect("stderr reader");
        Run {
            status,
            stdout,
            stderr,
            took,
        }
    }
}

impl Run {
    pub fn assert_success(&self) {
        assert!(
            self.status.success(),
            "expected exit 0, got {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
    }

    pub fn assert_failure(&self) {
        assert!(
            !self.status.success() && self.status.code().is_some(),
            "expected a non-zero exit code, got {}\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
    }

    /// Asserts exit 0 and exactly one non-empty line on stdout; returns it (the job id).
    pub fn single_id(&self) -> String {
        self.assert_success();
        let lines: Vec<&str> = self.stdout.lines().collect();
        assert_eq!(lines.len(), 1, "one id line on stdout: {:?}", self.stdout);
        let id = lines[0].trim();
        assert!(
            !id.is_empty() && !id.contains(char::is_whitespace),
            "an id: {id:?}"
        );
        id.to_owned()
    }
}

fn read_in_background<R: Read + Send + 'static>(
    pipe: Option<R>,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}
