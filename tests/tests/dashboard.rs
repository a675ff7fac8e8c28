//! The observability files docker-compose.yml mounts are consistent with each other and with
//! what Warren and RabbitMQ really export.
//!
//! - `config/grafana/dashboards/warren.json` parses, every panel has a query, and every metric
//!   name in every PromQL expression (panel targets and template variables) is one that Warren
//!   exports (the `# TYPE` lines of `warren_core::metrics::Metrics::new().encode()`; counters are
//!   seen with `_total`, histograms as `_bucket`, `_sum`, `_count`)
//!   or one that RabbitMQ 4.3's `rabbitmq_prometheus` exports on the endpoints Prometheus
//!   scrapes (`tests/fixtures/rabbitmq-4.3-prometheus-metrics.txt`, captured from the local
//!   broker; the file says how). The dashboard shows what an operator watches: throughput,
//!   failures, retries, dead letters, in flight, handler latency quantiles and queue depth.
//! - `config/prometheus.yml` parses and scrapes the compose services by their names, on the
//!   ports the compose file gives them (the worker's `--http`, `warren serve --listen`,
//!   RabbitMQ's 15692, aggregated and per queue).
//! - Grafana's provisioning points at the dashboard folder the compose file mounts and at the
//!   data source uid the dashboard uses.
//!
//! The checker itself is unit-tested: a made-up metric name fails it. No broker is needed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

/// Given the dashboard, when every PromQL expression is read, then every `warren_*` and
/// `rabbitmq_*` name in it is exported by Warren or by RabbitMQ.
#[test]
fn dashboard_refers_only_to_exported_metrics() {
    let dashboard = dashboard();
    let expressions = expressions(&dashboard);
    assert!(
        expressions.len() >= 20,
        "the dashboard has only {} expressions",
        expressions.len()
    );
    let known = known_metrics();
    let unknown = unknown_metrics(&expressions, &known);
    assert!(
        unknown.is_empty(),
        "config/grafana/dashboards/warren.json refers to metrics nobody exports: {unknown:?}\n\
         (Warren's names: {WARREN_TYPES_SOURCE}; RabbitMQ's: {})",
        rabbitmq_fixture().display()
    );
    let used: BTreeSet<String> = expressions.iter().flat_map(|e| metric_names(e)).collect();
    println!(
        "{} expressions, {} metric names, all exported: {used:?}",
        expressions.len(),
        used.len()
    );
}

/// Given the dashboard, then it shows the numbers the issue lists, each in a panel of its own
/// title: throughput, failures, retries, dead letters, in flight, handler latency (p50, p95 and
/// p99 from the duration histogram) and queue depth (RabbitMQ's per-queue numbers).
#[test]
fn dashboard_shows_what_an_operator_watches() {
    let dashboard = dashboard();
    let panels = panels(&dashboard);
    let mut ids = BTreeSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel has no title: {panel}");
        assert!(
            ids.insert(panel["id"].as_u64().expect("numeric panel id")),
            "panel id {} is used twice",
            panel["id"]
        );
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            !exprs.is_empty() && exprs.iter().all(|e| !e.trim().is_empty()),
            "panel {title:?} has no query"
        );
        assert_eq!(
            panel["datasource"]["uid"],
            datasource_uid(),
            "panel {title:?} does not use the provisioned data source"
        );
    }
    let panel_exprs = |title: &str| -> String {
        let panel = panels
            .iter()
            .find(|p| p["title"] == title)
            .unwrap_or_else(|| panic!("the dashboard has no panel {title:?}"));
        panel["targets"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["expr"].as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    };
    for (title, needles) in [
        (
            "Throughput",
            &["warren_jobs_submitted_total", "warren_jobs_succeeded_total"][..],
        ),
        (
            "Failures",
            &[
                "warren_jobs_retried_total",
                "warren_jobs_dead_lettered_total",
            ],
        ),
        ("Retries", &["warren_jobs_retried_total"]),
        ("Dead letters", &["warren_jobs_dead_lettered_total"]),
        ("In flight", &["warren_jobs_in_flight"]),
        (
            "Handler latency",
            &[
                "histogram_quantile(0.5,",
                "histogram_quantile(0.95,",
                "histogram_quantile(0.99,",
                "warren_job_duration_seconds_bucket",
            ],
        ),
        (
            "Queue depth",
            &[
                "rabbitmq_detailed_queue_messages_ready",
                "rabbitmq_detailed_queue_messages_unacked",
            ],
        ),
    ] {
        let exprs = panel_exprs(title);
        for needle in needles {
            assert!(
                exprs.contains(needle),
                "panel {title:?} should use {needle}: {exprs}"
            );
        }
    }
}

/// Given config/prometheus.yml, then it parses, and it scrapes every worker copy (DNS service
/// discovery on the compose service `worker`, at the port of its `--http`), `warren serve` (at
/// its `--listen` port) and RabbitMQ's plugin both aggregated (`/metrics`) and per queue
/// (`/metrics/detailed` with `queue_coarse_metrics`, which the queue depth panel reads); every
/// host it names is a compose service.
#[test]
fn prometheus_scrapes_the_compose_services() {
    let prometheus = yaml(&repo_root().join("config/prometheus.yml"));
    let compose = yaml(&repo_root().join("docker-compose.yml"));
    let services: BTreeSet<String> = compose["services"]
        .as_object()
        .expect("compose services")
        .keys()
        .cloned()
        .collect();
    let jobs = prometheus["scrape_configs"]
        .as_array()
        .expect("config/prometheus.yml has scrape_configs");
    let job = |name: &str| {
        jobs.iter()
            .find(|j| j["job_name"] == name)
            .unwrap_or_else(|| panic!("config/prometheus.yml has no job {name:?}"))
    };

    // Every target's host is a compose service.
    for job in jobs {
        let name = job["job_name"].as_str().unwrap_or_default();
        for target in static_targets(job) {
            let host = target.split(':').next().unwrap_or_default();
            assert!(
                services.contains(host),
                "job {name:?} scrapes {target}, but {host:?} is no compose service ({services:?})"
            );
        }
        for sd in job["dns_sd_configs"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            for host in sd["names"].as_array().cloned().unwrap_or_default() {
                let host = host.as_str().unwrap_or_default();
                assert!(
                    services.contains(host),
                    "job {name:?} resolves {host:?}, which is no compose service"
                );
            }
        }
    }

    // Workers: every copy, by DNS A records, at the port of the worker's --http.
    let worker_port = flag_port(&compose["services"]["worker"]["command"], "--http");
    let worker = job("warren-worker");
    let sd = &worker["dns_sd_configs"][0];
    assert_eq!(sd["names"][0], "worker", "{worker}");
    assert_eq!(sd["type"], "A", "one A record per worker copy: {worker}");
    assert_eq!(sd["port"].as_u64(), Some(worker_port), "{worker}");

    // warren serve, at its --listen port.
    let serve_port = flag_port(&compose["services"]["serve"]["command"], "--listen");
    assert_eq!(
        static_targets(job("warren-serve")),
        vec![format!("serve:{serve_port}")]
    );

    // RabbitMQ, aggregated and per queue.
    let rabbitmq = job("rabbitmq");
    assert_eq!(static_targets(rabbitmq), vec!["rabbitmq:15692".to_owned()]);
    assert!(
        rabbitmq["metrics_path"].is_null() || rabbitmq["metrics_path"] == "/metrics",
        "{rabbitmq}"
    );
    let queues = job("rabbitmq-queues");
    assert_eq!(static_targets(queues), vec!["rabbitmq:15692".to_owned()]);
    assert_eq!(queues["metrics_path"], "/metrics/detailed");
    let families: Vec<&str> = queues["params"]["family"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        families.contains(&"queue_coarse_metrics"),
        "per-queue depth needs family=queue_coarse_metrics: {families:?}"
    );
    let plugins = std::fs::read_to_string(repo_root().join("config/enabled_plugins"))
        .expect("config/enabled_plugins");
    assert!(
        plugins.contains("rabbitmq_prometheus"),
        "config/enabled_plugins lacks rabbitmq_prometheus: {plugins}"
    );

    // Compose mounts this very file where Prometheus reads it.
    let mounts = volumes(&compose["services"]["prometheus"]);
    assert!(
        mounts.contains(&"./config/prometheus.yml:/etc/prometheus/prometheus.yml:ro".to_owned()),
        "the prometheus service should mount config/prometheus.yml: {mounts:?}"
    );
}

/// Given Grafana's provisioning files, then the data source is the compose service
/// `prometheus` with the uid the dashboard uses, and the dashboard provider reads the folder
/// the compose file mounts config/grafana/dashboards at.
#[test]
fn grafana_provisioning_matches_the_compose_mounts() {
    let compose = yaml(&repo_root().join("docker-compose.yml"));
    let grafana = &compose["services"]["grafana"];
    let mounts = volumes(grafana);
    let target_of = |source: &str| {
        mounts
            .iter()
            .find_map(|m| {
                let mut parts = m.split(':');
                (parts.next() == Some(source)).then(|| parts.next().unwrap_or_default().to_owned())
            })
            .unwrap_or_else(|| panic!("the grafana service does not mount {source}: {mounts:?}"))
    };
    assert_eq!(
        target_of("./config/grafana/provisioning"),
        "/etc/grafana/provisioning"
    );
    let dashboards_dir = target_of("./config/grafana/dashboards");

    let datasources =
        yaml(&repo_root().join("config/grafana/provisioning/datasources/prometheus.yml"));
    let source = &datasources["datasources"][0];
    assert_eq!(source["type"], "prometheus");
    assert_eq!(source["uid"], datasource_uid());
    assert_eq!(source["url"], "http://prometheus:9090");
    assert!(compose["services"]["prometheus"].is_object());

    let providers = yaml(&repo_root().join("config/grafana/provisioning/dashboards/warren.yml"));
    assert_eq!(
        providers["providers"][0]["options"]["path"].as_str(),
        Some(dashboards_dir.as_str()),
        "the dashboard provider should read the folder compose mounts the dashboards at"
    );
    assert_eq!(providers["providers"][0]["type"], "file");

    // The admin password comes from the environment, required, never written in the file.
    let password = grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
        .as_str()
        .unwrap_or_default();
    assert!(
        password.starts_with("${WARREN_GRAFANA_PASSWORD:?"),
        "Grafana's admin password must come from WARREN_GRAFANA_PASSWORD (required): {password}"
    );
}

// --- the checker, unit-tested -------------------------------------------------------------------

/// Given expressions with made-up names, then the checker reports exactly those: it can fail.
#[test]
fn checker_rejects_made_up_metric_names() {
    let known = known_metrics();
    let good = [
        r#"sum by (queue) (rate(warren_jobs_succeeded_total{queue=~"$queue"}[$__rate_interval]))"#
            .to_owned(),
        "histogram_quantile(0.99, sum by (le) (rate(warren_job_duration_seconds_bucket[5m])))"
            .to_owned(),
        "sum(rabbitmq_queue_messages_ready)".to_owned(),
    ];
    assert!(unknown_metrics(&good, &known).is_empty());

    for (expr, bad) in [
        (
            "rate(warren_jobs_exploded_total[5m])",
            "warren_jobs_exploded_total",
        ),
        // A counter without the `_total` the encoder appends.
        ("rate(warren_jobs_succeeded[5m])", "warren_jobs_succeeded"),
        // A histogram's own name is no series: only _bucket, _sum and _count are.
        ("warren_job_duration_seconds", "warren_job_duration_seconds"),
        (
            "sum(rabbitmq_queue_messages_teleported)",
            "rabbitmq_queue_messages_teleported",
        ),
        (
            r#"warren_jobs_in_flight + on() rabbitmq_made_up{queue="warren_x"}"#,
            "rabbitmq_made_up",
        ),
    ] {
        let unknown = unknown_metrics(&[expr.to_owned()], &known);
        assert_eq!(unknown, vec![bad.to_owned()], "{expr}");
    }
    // A `__name__` matcher names a metric; another label's value does not.
    assert_eq!(
        unknown_metrics(
            &[r#"{__name__="warren_jobs_lost_total", queue=~"warren_.*"}"#.to_owned()],
            &known
        ),
        vec!["warren_jobs_lost_total".to_owned()]
    );

    // A made-up name in a copy of the real dashboard fails the dashboard check.
    let mut dashboard = dashboard();
    dashboard["panels"][0]["targets"][0]["expr"] =
        Value::String("rate(warren_jobs_vanished_total[5m])".to_owned());
    assert_eq!(
        unknown_metrics(&expressions(&dashboard), &known),
        vec!["warren_jobs_vanished_total".to_owned()]
    );
}

/// Given `# TYPE` lines, then counters, gauges and histograms give the names Prometheus sees.
#[test]
fn type_lines_give_the_exposed_names() {
    let names = names_from_type_lines(
        "# HELP a_total x\n# TYPE a_total counter\n# TYPE b gauge\n# TYPE c_seconds histogram\n\
         c_seconds_bucket{le=\"1\"} 0\n# TYPE d counter\n# EOF\n",
    );
    let expected: BTreeSet<String> = ["a_total", "b", "c_seconds_bucket", "c_seconds_sum"]
        .into_iter()
        .chain(["c_seconds_count", "d_total"])
        .map(str::to_owned)
        .collect();
    assert_eq!(names, expected);
}

// --- helpers ------------------------------------------------------------------------------------

/// Where Warren's metric names come from (shown when a name is unknown).
const WARREN_TYPES_SOURCE: &str =
    "the `# TYPE` lines of warren_core::metrics::Metrics::new().encode()";

/// Warren's metrics as a worker and `warren serve` expose them: a fresh registry with one series
/// of every labelled family made (a family without a series may be left out of the text).
fn warren_metrics() -> String {
    use std::time::Duration;
    use warren_core::metrics::{Link, Metrics};
    let metrics = Metrics::new();
    let _handles = metrics.worker_queue("q", &["k"]);
    metrics.submitted("q", "k", Duration::from_millis(2), Duration::from_millis(1));
    metrics.set_connected(Link::Consume, true);
    metrics.consumer_cancelled("q");
    metrics.http_request("/v1/queues", 200, Duration::from_millis(1));
    metrics.encode()
}

/// Every name the dashboard may use: Warren's and RabbitMQ's.
fn known_metrics() -> BTreeSet<String> {
    let mut known = names_from_type_lines(&warren_metrics());
    assert!(
        known.contains("warren_jobs_succeeded_total"),
        "Metrics::encode() declares no warren_jobs_succeeded_total: {known:?}"
    );
    let path = rabbitmq_fixture();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    known.extend(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned),
    );
    known
}

/// The series names a Prometheus text exposition's `# TYPE` lines declare: a counter `c` is seen
/// as `c_total` (OpenMetrics declares it without the suffix), a histogram `h` as `h_bucket`,
/// `h_sum` and `h_count`, a summary `s` as `s`, `s_sum` and `s_count`.
fn names_from_type_lines(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if (words.next(), words.next()) != (Some("#"), Some("TYPE")) {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "histogram" => {
                names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{name}{s}")))
            }
            "summary" => names.extend(["", "_sum", "_count"].map(|s| format!("{name}{s}"))),
            "counter" if !name.ends_with("_total") => {
                names.insert(format!("{name}_total"));
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// The `warren_*` and `rabbitmq_*` identifiers in a PromQL expression. Label values in quotes
/// are left out (`queue="warren_x"` names a queue), except a `__name__` matcher's, which names
/// a metric.
fn metric_names(expr: &str) -> Vec<String> {
    static PATTERNS: OnceLock<(Regex, Regex)> = OnceLock::new();
    let (matcher, name) = PATTERNS.get_or_init(|| {
        (
            Regex::new(r#"([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*""#)
                .expect("regex"),
            Regex::new(r"(?:^|[^A-Za-z0-9_:])((?:warren|rabbitmq)_[a-z0-9_]+)").expect("regex"),
        )
    });
    let without_label_values = matcher.replace_all(expr, |c: &regex::Captures| {
        if &c[1] == "__name__" {
            c[0].to_owned()
        } else {
            format!("{}{}\"\"", &c[1], &c[2])
        }
    });
    name.captures_iter(&without_label_values)
        .map(|c| c[1].to_owned())
        .collect()
}

/// The names in `expressions` that are not in `known`, sorted, each once.
fn unknown_metrics(expressions: &[String], known: &BTreeSet<String>) -> Vec<String> {
    let unknown: BTreeSet<String> = expressions
        .iter()
        .flat_map(|e| metric_names(e))
        .filter(|n| !known.contains(n))
        .collect();
    unknown.into_iter().collect()
}

/// Every PromQL expression of the dashboard: panel targets (rows' nested panels included) and
/// the template variables' queries.
fn expressions(dashboard: &Value) -> Vec<String> {
    let mut out: Vec<String> = panels(dashboard)
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for variable in dashboard["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        match &variable["query"] {
            Value::String(query) => out.push(query.clone()),
            Value::Object(query) => {
                if let Some(query) = query.get("query").and_then(Value::as_str) {
                    out.push(query.to_owned());
                }
            }
            _ => {}
        }
        if let Some(definition) = variable["definition"].as_str() {
            out.push(definition.to_owned());
        }
    }
    out
}

/// The dashboard's panels, those inside collapsed rows included.
fn panels(dashboard: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().cloned().unwrap_or_default() {
        out.extend(panel["panels"].as_array().cloned().unwrap_or_default());
        if panel["type"] != "row" {
            out.push(panel);
        }
    }
    out
}

fn static_targets(job: &Value) -> Vec<String> {
    job["static_configs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .flat_map(|c| c["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_owned))
        .collect()
}

/// The port of `--flag HOST:PORT` in a compose `command` list.
fn flag_port(command: &Value, flag: &str) -> u64 {
    let words: Vec<&str> = command
        .as_array()
        .map(|c| c.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    words
        .windows(2)
        .find(|w| w[0] == flag)
        .and_then(|w| w[1].rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("command {words:?} has no `{flag} HOST:PORT`"))
}

fn volumes(service: &Value) -> Vec<String> {
    service["volumes"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The uid of the provisioned Prometheus data source.
fn datasource_uid() -> Value {
    yaml(&repo_root().join("config/grafana/provisioning/datasources/prometheus.yml"))["datasources"]
        [0]["uid"]
        .clone()
}

fn dashboard() -> Value {
    let path = repo_root().join("config/grafana/dashboards/warren.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid JSON: {err}", path.display()))
}

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_norway::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid YAML: {err}", path.display()))
}

fn rabbitmq_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rabbitmq-4.3-prometheus-metrics.txt")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}
