//! `docker-compose.yml` is valid Compose, and its services are shaped the way Warren relies on.
//!
//! There is no Docker engine on our machines, so this is how the compose file is checked: it is
//! validated against the Compose Specification's JSON schema (vendored in this repository at
//! `tests/schemas/compose-spec.json`, see `tests/schemas/README.md`, so a clone alone runs this
//! test), and the properties that matter to Warren are asserted: workers scale
//! (`docker compose up --scale worker=4`), wait for a healthy broker, the broker has a health
//! check, and its image is the RabbitMQ version the local node runs by default; ports are bound
//! to 127.0.0.1, credentials come from the environment and guest is never used. A missing
//! schema fails the test; it is never skipped. No broker is needed.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// Given the repository's compose file, when validated against the Compose schema, then it
/// passes with no error.
#[test]
fn compose_file_matches_the_compose_spec() {
    let compose = compose_file();
    let errors = schema_errors(&compose);
    assert!(
        errors.is_empty(),
        "docker-compose.yml does not match the Compose Specification:\n  {}",
        errors.join("\n  ")
    );
    let services = compose["services"]
        .as_object()
        .map(|s| s.len())
        .unwrap_or(0);
    println!(
        "docker-compose.yml is valid against {} ({services} services)",
        schema_path().display()
    );
}

/// Given the compose file, then the worker service can be scaled (no fixed container name, no
/// host ports) and starts only once RabbitMQ reports healthy, and RabbitMQ has a health check.
#[test]
fn worker_scales_and_waits_for_a_healthy_broker() {
    let compose = compose_file();
    let services = &compose["services"];

    let worker = &services["worker"];
    assert!(
        worker.is_object(),
        "docker-compose.yml has no `worker` service"
    );
    assert!(
        worker.get("container_name").is_none(),
        "the worker service must not set container_name: `--scale worker=N` needs distinct names"
    );
    assert!(
        worker.get("ports").is_none(),
        "the worker service must not publish host ports: scaled copies would clash"
    );
    assert_eq!(
        worker["depends_on"]["rabbitmq"]["condition"], "service_healthy",
        "the worker must wait for `rabbitmq` with `condition: service_healthy`"
    );

    let healthcheck = &services["rabbitmq"]["healthcheck"];
    assert!(
        healthcheck.is_object(),
        "the rabbitmq service needs a healthcheck"
    );
    let test = match &healthcheck["test"] {
        Value::Array(parts) => parts
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        other => other.as_str().unwrap_or_default().to_owned(),
    };
    assert!(
        test.contains("rabbitmq-diagnostics") && test.contains("ping"),
        "the rabbitmq healthcheck should run `rabbitmq-diagnostics -q ping`, found {test:?}"
    );
    for key in ["interval", "timeout", "retries", "start_period"] {
        assert!(
            healthcheck.get(key).is_some(),
            "the rabbitmq healthcheck has no `{key}`"
        );
    }
}

/// Given the rabbitmq service, then its image is `rabbitmq:<V>-management` with `<V>` the
/// version `scripts/broker` runs by default (`DEFAULT_RABBITMQ`): Docker users get the broker
/// the tests and the fault suite are proven on.
#[test]
fn broker_image_is_the_local_default_version() {
    let compose = compose_file();
    let script = repo_root().join("scripts/broker");
    let text = std::fs::read_to_string(&script)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", script.display()));
    let default = text
        .lines()
        .find_map(|line| line.strip_prefix("DEFAULT_RABBITMQ="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .unwrap_or_else(|| panic!("{} sets no DEFAULT_RABBITMQ=", script.display()));
    let image = compose["services"]["rabbitmq"]["image"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        image,
        format!("rabbitmq:{default}-management"),
        "the rabbitmq service should run the version scripts/broker runs by default ({default})"
    );
}

/// Given the rabbitmq service, then the broker config files it mounts exist in the repository
/// (Docker would otherwise create empty directories in their place).
#[test]
fn broker_config_files_it_mounts_exist() {
    let compose = compose_file();
    let volumes = compose["services"]["rabbitmq"]["volumes"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mounted: Vec<&str> = volumes
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|volume| volume.split(':').next())
        .filter(|source| source.starts_with("./"))
        .collect();
    assert!(
        !mounted.is_empty(),
        "the rabbitmq service mounts no files from the repository"
    );
    for source in mounted {
        let path = repo_root().join(source);
        assert!(
            path.is_file(),
            "the rabbitmq service mounts {source}, which does not exist"
        );
    }
}

/// Given the compose file, then every published port is bound to 127.0.0.1 (AMQP, management,
/// RabbitMQ's metrics, the HTTP API, Prometheus and Grafana are reachable from this machine
/// only; the services talk over the compose network).
#[test]
fn published_ports_are_bound_to_the_loopback_interface() {
    let compose = compose_file();
    let services = compose["services"].as_object().cloned().unwrap_or_default();
    let mut published = 0;
    for (name, service) in &services {
        for port in service["ports"].as_array().cloned().unwrap_or_default() {
            let text = match &port {
                Value::String(text) => text.clone(),
                Value::Object(long) => format!(
                    "{}:{}",
                    long.get("host_ip").and_then(Value::as_str).unwrap_or(""),
                    long.get("published")
                        .map(Value::to_string)
                        .unwrap_or_default()
                ),
                other => other.to_string(),
            };
            assert!(
                text.starts_with("127.0.0.1:"),
                "service `{name}` publishes {text:?}: bind it to 127.0.0.1 (\"127.0.0.1:HOST:CONTAINER\")"
            );
            published += 1;
        }
    }
    assert_eq!(
        published, 6,
        "expected the broker's AMQP, management and Prometheus ports, `warren serve`'s HTTP \
         port, Prometheus's UI and Grafana"
    );
}

/// Given the compose file, then no service uses guest: the broker's default user is the admin
/// from `WARREN_ADMIN_USER`/`WARREN_ADMIN_PASSWORD`, each Warren service logs in as its own
/// user with a password from the environment (never written in the file), and the topology is
/// applied by the admin, the jobs consumed by the worker user, the demo job submitted by the
/// dispatcher user.
#[test]
fn credentials_come_from_the_environment_and_guest_is_never_used() {
    let text = std::fs::read_to_string(repo_root().join("docker-compose.yml")).expect("read");
    let compose = compose_file();
    let services = &compose["services"];
    let env = |service: &str, key: &str| {
        services[service]["environment"][key]
            .as_str()
            .unwrap_or_else(|| panic!("service `{service}` sets no {key}"))
            .to_owned()
    };
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(
            !line.to_ascii_lowercase().contains("guest"),
            "docker-compose.yml mentions guest: {line}"
        );
    }
    assert!(env("rabbitmq", "RABBITMQ_DEFAULT_USER").starts_with("${WARREN_ADMIN_USER"));
    assert!(env("rabbitmq", "RABBITMQ_DEFAULT_PASS").starts_with("${WARREN_ADMIN_PASSWORD:?"));
    for (service, user) in [
        ("topology", "WARREN_ADMIN"),
        ("worker", "WARREN_WORKER"),
        ("dispatcher-demo", "WARREN_DISPATCHER"),
        ("serve", "WARREN_DISPATCHER"),
    ] {
        let url = env(service, "WARREN_AMQP_URL");
        let expected = format!("amqp://${{{user}_USER:-");
        assert!(url.starts_with(&expected), "{service}: {url}");
        assert!(
            url.contains(&format!(":${{{user}_PASSWORD:?")),
            "{service}: the password must come from {user}_PASSWORD (required): {url}"
        );
    }
    for key in ["WARREN_DISPATCHER_PASSWORD", "WARREN_WORKER_PASSWORD"] {
        assert!(
            env("rabbitmq", key).starts_with(&format!("${{{key}:?")),
            "{key}"
        );
    }
    // `warren serve`'s admin token and Grafana's admin password: required, from the environment.
    assert!(env("serve", "WARREN_HTTP_TOKEN").starts_with("${WARREN_HTTP_TOKEN:?"));
    assert!(
        env("grafana", "GF_SECURITY_ADMIN_PASSWORD").starts_with("${WARREN_GRAFANA_PASSWORD:?")
    );
}

/// Given `config/rabbitmq-users.sh`, which makes compose's runtime users, then it gives them
/// exactly the permissions `config/definitions.json` gives warren-dispatcher and
/// warren-worker (the ones tests/tests/permissions.rs proves).
#[test]
fn compose_users_get_the_permissions_of_the_definitions() {
    let script = std::fs::read_to_string(repo_root().join("config/rabbitmq-users.sh"))
        .expect("config/rabbitmq-users.sh");
    let definitions: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("config/definitions.json"))
            .expect("config/definitions.json"),
    )
    .expect("JSON");
    for (user, var) in [
        ("warren-dispatcher", "$dispatcher"),
        ("warren-worker", "$worker"),
    ] {
        let permission = definitions["permissions"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["user"] == user))
            .unwrap_or_else(|| panic!("no permissions for {user}"));
        // As JSON strings, then as the script's unquoted heredoc spells them.
        let field = |key: &str| {
            serde_json::to_string(&permission[key])
                .expect("string")
                .replace('\\', "\\\\")
                .replace('$', "\\$")
        };
        let expected = format!(
            "{{ \"user\": \"{var}\", \"vhost\": \"/\", \"configure\": {}, \"write\": {}, \"read\": {} }}",
            field("configure"),
            field("write"),
            field("read")
        );
        assert!(
            script.contains(&expected),
            "config/rabbitmq-users.sh should hold the permissions of {user}:\n  {expected}"
        );
    }
}

/// Given broken copies of the compose file, when validated, then each is rejected: the check
/// above can fail.
#[test]
fn schema_rejects_broken_compose_files() {
    let compose = compose_file();

    let mut ports_not_a_list = compose.clone();
    ports_not_a_list["services"]["worker"]["ports"] = json!("notalist");

    let mut unknown_top_level_key = compose.clone();
    unknown_top_level_key["servicez"] = json!({});

    let mut restart_not_a_string = compose.clone();
    restart_not_a_string["services"]["worker"]["restart"] = json!(["always"]);

    for (what, broken) in [
        ("worker ports: \"notalist\"", ports_not_a_list),
        ("unknown top-level key `servicez`", unknown_top_level_key),
        ("worker restart: [\"always\"]", restart_not_a_string),
    ] {
        let errors = schema_errors(&broken);
        assert!(
            !errors.is_empty(),
            "the schema accepted a compose file with {what}"
        );
        println!("rejected ({what}): {}", errors.join("; "));
    }
}

// --- helpers ------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Compose schema, vendored in this repository (`tests/schemas/`).
fn schema_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/compose-spec.json")
}

/// `docker-compose.yml` as JSON.
fn compose_file() -> Value {
    let path = repo_root().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()));
    serde_norway::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid YAML: {err}", path.display()))
}

/// Every way `instance` breaks the Compose schema, as `path: message` lines.
fn schema_errors(instance: &Value) -> Vec<String> {
    let path = schema_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|err| {
        panic!(
            "the Compose schema is missing: cannot read {}: {err}\n\
             it is vendored in the repository (tests/schemas/, see its README.md); without it \
             docker-compose.yml cannot be checked",
            path.display()
        )
    });
    let schema: Value = serde_json::from_str(&text)
        .unwrap_or_else(|err| panic!("{} is not valid JSON: {err}", path.display()));
    let validator = jsonschema::draft7::new(&schema)
        .unwrap_or_else(|err| panic!("{} is not a usable draft-07 schema: {err}", path.display()));
    validator
        .iter_errors(instance)
        .map(|err| {
            let at = err.instance_path().to_string();
            format!("{}: {err}", if at.is_empty() { "/" } else { &at })
        })
        .collect()
}
