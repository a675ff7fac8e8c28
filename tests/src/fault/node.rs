//! RabbitMQ nodes of the fault suite, driven through `scripts/broker` and `scripts/cluster`.
//!
//! Every node here is the suite's own (`fault@localhost`, `fault1..3@localhost`, other ports
//! and data dirs): the shared development node `warren@localhost` is never started, stopped,
//! alarmed or touched. Each call has a deadline.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::workspace_root;

/// The standalone fault node: name and AMQP port.
pub const SINGLE: (&str, u16) = ("fault", 5690);
/// The cluster's AMQP ports, node 1 to 3 (see `scripts/cluster`).
pub const CLUSTER_PORTS: [u16; 3] = [5731, 5742, 5753];

/// How a node is reached by the scripts.
#[derive(Debug, Clone)]
enum Script {
    /// `WARREN_BROKER_NAME=name WARREN_BROKER_PORT=port scripts/broker ...`
    Broker { name: String, port: u16 },
    /// `scripts/cluster <cmd> N ...`
    Member { number: u8 },
}

/// One RabbitMQ node of the suite.
#[derive(Debug, Clone)]
pub struct Node {
    script: Script,
    pub port: u16,
}

/// A command that failed or ran past its deadline.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub struct NodeError {
    pub what: String,
    pub detail: String,
}

impl Node {
    /// The standalone fault node.
    pub fn single() -> Node {
        Node {
            script: Script::Broker {
                name: SINGLE.0.to_owned(),
                port: SINGLE.1,
            },
            port: SINGLE.1,
        }
    }

    /// Member `number` (1-3) of the local cluster.
    pub fn member(number: u8) -> Node {
        Node {
            script: Script::Member { number },
            port: CLUSTER_PORTS[usize::from(number - 1)],
        }
    }

    /// `fault@localhost`, `fault2@localhost`, ...
    pub fn erlang_name(&self) -> String {
        match &self.script {
            Script::Broker { name, .. } => format!("{name}@localhost"),
            Script::Member { number } => format!("fault{number}@localhost"),
        }
    }

    /// The AMQP URL of `vhost` on this node.
    pub fn url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let root = workspace_root();
        let mut command;
        match &self.script {
            Script::Broker { name, port } => {
                command = Command::new(root.join("scripts/broker"));
                command
                    .env("WARREN_BROKER_NAME", name)
                    .env("WARREN_BROKER_PORT", port.to_string())
                    .args(args);
            }
            Script::Member { number } => {
                command = Command::new(root.join("scripts/cluster"));
                let n = number.to_string();
                let (sub, rest): (&str, &[&str]) = match args.first().copied() {
                    Some("start") => ("start-node", &[]),
                    Some("stop") => ("stop-node", &[]),
                    Some("kill") => ("kill", &[]),
                    Some(sub) => (sub, &args[1..]),
                    None => ("status", &[]),
                };
                command.arg(sub).arg(&n).args(rest);
            }
        }
        command
            .env_remove("WARREN_AMQP_URL")
            .current_dir(&root)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Runs a script subcommand; its stdout on success.
    pub async fn run(&self, args: &[&str], deadline: Duration) -> Result<String, NodeError> {
        run(
            self.command(args),
            &format!("{} {args:?}", self.erlang_name()),
            deadline,
        )
        .await
    }

    /// `rabbitmqctl ARGS` against this node (30 s deadline).
    pub async fn ctl(&self, args: &[&str]) -> Result<String, NodeError> {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        self.run(&all, Duration::from_secs(30)).await
    }

    /// `rabbitmq-queues ARGS` against this node.
    pub async fn queues(&self, args: &[&str]) -> Result<String, NodeError> {
        let mut all = vec!["queues"];
        all.extend_from_slice(args);
        self.run(&all, Duration::from_secs(30)).await
    }

    /// Starts the node (idempotent: fine if it runs).
    pub async fn start(&self) -> Result<(), NodeError> {
        self.run(&["start"], Duration::from_secs(120))
            .await
            .map(drop)
    }

    /// Stops the node cleanly (the script kills it if that hangs).
    pub async fn stop(&self) -> Result<(), NodeError> {
        self.run(&["stop"], Duration::from_secs(90)).await.map(drop)
    }

    /// `kill -9` of the node's Erlang VM.
    pub async fn kill(&self) -> Result<(), NodeError> {
        self.run(&["kill"], Duration::from_secs(30)).await.map(drop)
    }

    /// Creates `vhost` with full rights for guest.
    pub async fn add_vhost(&self, vhost: &str) -> Result<(), NodeError> {
        self.ctl(&["-q", "add_vhost", vhost]).await?;
        self.ctl(&[
            "-q",
            "set_permissions",
            "-p",
            vhost,
            "guest",
            ".*",
            ".*",
            ".*",
        ])
        .await
        .map(drop)
    }

    pub async fn delete_vhost(&self, vhost: &str) -> Result<(), NodeError> {
        self.ctl(&["-q", "delete_vhost", vhost]).await.map(drop)
    }

    /// Evaluates an Erlang expression on the node.
    pub async fn eval(&self, expression: &str) -> Result<String, NodeError> {
        self.ctl(&["eval", expression]).await
    }

    /// The RabbitMQ version the node runs, as it reports it (`4.3.6`).
    pub async fn version(&self) -> Result<String, NodeError> {
        let text = self.eval("rabbit_misc:version().").await?;
        Ok(text.trim().trim_matches('"').to_owned())
    }

    /// Where the node keeps its metadata: `khepri` (4.x) or `mnesia` (3.x, or a 4.x node
    /// without the `khepri_db` feature flag).
    pub async fn metadata_store(&self) -> Result<String, NodeError> {
        let text = self
            .eval(
                "case code:which(rabbit_khepri) of non_existing -> mnesia; \
                 _ -> case rabbit_khepri:is_enabled() of true -> khepri; _ -> mnesia end end.",
            )
            .await?;
        Ok(text.trim().to_owned())
    }

    /// The node's pids of the connections of worker process `pid` (Warren names them
    /// `warren-worker <host>:<pid> consume|publish`), sorted: a worker that started a new
    /// session has other connections than before.
    pub async fn connections_of(&self, pid: u32) -> Result<Vec<String>, NodeError> {
        let listing = self
            .ctl(&[
                "-q",
                "list_connections",
                "pid",
                "client_properties",
                "--no-table-headers",
            ])
            .await?;
        let mut pids: Vec<String> = crate::connections_named(&listing, &format!(":{pid} "))
            .into_iter()
            .map(str::to_owned)
            .collect();
        pids.sort();
        Ok(pids)
    }

    /// The tags of the consumers on `queue` in `vhost` (Warren's contain `<host>:<pid>` and
    /// are new for every subscription), sorted.
    pub async fn consumer_tags(&self, vhost: &str, queue: &str) -> Result<Vec<String>, NodeError> {
        let text = self
            .ctl(&[
                "-q",
                "list_consumers",
                "-p",
                vhost,
                "queue_name",
                "consumer_tag",
                "--no-table-headers",
            ])
            .await?;
        let mut tags: Vec<String> = text
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .filter(|(name, _)| *name == queue)
            .map(|(_, tag)| tag.trim().to_owned())
            .collect();
        tags.sort();
        Ok(tags)
    }
}

/// The three cluster members.
pub fn cluster() -> [Node; 3] {
    [Node::member(1), Node::member(2), Node::member(3)]
}

/// `scripts/cluster start` (a fresh cluster unless all three run).
pub async fn start_cluster() -> Result<(), NodeError> {
    let mut command = Command::new(workspace_root().join("scripts/cluster"));
    command
        .arg("start")
        .env_remove("WARREN_AMQP_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    run(command, "scripts/cluster start", Duration::from_secs(240))
        .await
        .map(drop)
}

/// `scripts/cluster stop`.
pub async fn stop_cluster() -> Result<(), NodeError> {
    let mut command = Command::new(workspace_root().join("scripts/cluster"));
    command.arg("stop").stdin(Stdio::null()).kill_on_drop(true);
    run(command, "scripts/cluster stop", Duration::from_secs(120))
        .await
        .map(drop)
}

async fn run(mut command: Command, what: &str, deadline: Duration) -> Result<String, NodeError> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let output = tokio::time::timeout(deadline, command.output())
        .await
        .map_err(|_| NodeError {
            what: what.to_owned(),
            detail: format!("no answer within {deadline:?}"),
        })?
        .map_err(|err| NodeError {
            what: what.to_owned(),
            detail: err.to_string(),
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        Ok(stdout)
    } else {
        Err(NodeError {
            what: what.to_owned(),
            detail: format!(
                "{}: {stdout}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// Where the suite keeps a run's files (configs, sinks, worker logs).
pub fn run_dir() -> PathBuf {
    workspace_root().join(".warren/faults")
}
