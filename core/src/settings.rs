//! The effective configuration key by key, with where each value came from (`warren config
//! show`): an environment variable (named), the config file, or a built-in default. Secrets
//! never leave here in clear: a key named `password` (or ending in `_password`) shows `***`,
//! and every URL its password masked ([`crate::secret::mask_url`]).
//!
//! The sections are those of [`Config`]; a new section is listed in [`settings`] too.

use std::collections::BTreeSet;

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, ConfigSource};
use crate::secret;

/// One key of the effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Dotted, as in the file: `broker.url`, `queues.emails.retry.max_attempts`.
    pub key: String,
    /// The value in effect, secrets masked; `null` for an optional key that is not set.
    pub value: Value,
    /// Where it came from: [`ConfigSource::Env`] (the variable), [`ConfigSource::File`] (also
    /// for a queue key inherited from the file's `[queue_defaults]`), or
    /// [`ConfigSource::Defaults`].
    pub origin: ConfigSource,
}

/// Every key of `config`, section by section, each queue after `queue_defaults`.
pub fn settings(config: &Config) -> Vec<Setting> {
    let mut sections: Vec<(String, Value)> = vec![
        section("broker", &config.broker),
        section("jobs", &config.jobs),
        section("dispatcher", &config.dispatcher),
        section("worker", &config.worker),
        section("management", &config.management),
        section("http", &config.http),
        section("queue_defaults", &config.queue_defaults),
    ];
    for (name, queue) in &config.queues {
        sections.push(section(&format!("queues.{name}"), queue));
    }
    let mut flat = Vec::new();
    for (prefix, value) in sections {
        flatten(&prefix, value, &mut flat);
    }
    flat.into_iter()
        .map(|(key, value)| Setting {
            value: masked(&key, value),
            origin: origin(config, &key),
            key,
        })
        .collect()
}

fn section(name: &str, value: &impl Serialize) -> (String, Value) {
    // The config structs are plain data (strings, numbers, durations as text): serialising
    // them cannot fail; `null` would show the section as unset rather than panic.
    (
        name.to_owned(),
        serde_json::to_value(value).unwrap_or(Value::Null),
    )
}

/// `value`'s leaves as `prefix.key` pairs (objects are walked, arrays are leaves).
fn flatten(prefix: &str, value: Value, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                flatten(&format!("{prefix}.{key}"), inner, out);
            }
        }
        leaf => out.push((prefix.to_owned(), leaf)),
    }
}

/// `value` with passwords replaced by `***` and URLs' passwords masked.
fn masked(key: &str, value: Value) -> Value {
    let name = key.rsplit('.').next().unwrap_or(key);
    if name == "password" || name.ends_with("_password") {
        return match value {
            Value::Null => Value::Null,
            Value::String(s) if s.is_empty() => Value::String(s),
            _ => Value::String(secret::MASK.to_owned()),
        };
    }
    if name == "tokens" {
        return masked_tokens(value);
    }
    match value {
        Value::String(s) => Value::String(mask_text(&s)),
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| match item {
                    Value::String(s) => Value::String(mask_text(&s)),
                    other => other,
                })
                .collect(),
        ),
        other => other,
    }
}

/// `http.tokens`: each token's secret replaced by `***`, its name and scope shown.
fn masked_tokens(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| match item {
                    Value::Object(mut token) => {
                        if token.contains_key("token") {
                            token.insert("token".into(), Value::String(secret::MASK.to_owned()));
                        }
                        Value::Object(token)
                    }
                    _ => Value::String(secret::MASK.to_owned()),
                })
                .collect(),
        ),
        Value::Null => Value::Null,
        _ => Value::String(secret::MASK.to_owned()),
    }
}

fn mask_text(text: &str) -> String {
    match text.contains("://") || text.contains('@') {
        true => secret::mask_url(text),
        false => text.to_owned(),
    }
}

/// Where `key`'s value came from: an environment variable wins, then the file (a queue key
/// the file sets for the queue, or in `[queue_defaults]`), else the built-in default.
fn origin(config: &Config, key: &str) -> ConfigSource {
    if let Some(var) = config.env_overrides.get(key) {
        return ConfigSource::Env(var);
    }
    let in_file = config.file_keys.contains(key)
        || config.queues.keys().any(|name| {
            key.strip_prefix(&format!("queues.{name}."))
                .is_some_and(|sub| config.file_keys.contains(&format!("queue_defaults.{sub}")))
        });
    match in_file {
        true => config.source.clone(),
        false => ConfigSource::Defaults,
    }
}

/// The dotted keys a TOML text sets (its leaves; arrays are leaves). Text that does not parse
/// sets none (the caller reports the parse error).
pub(crate) fn keys_of(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    if let Ok(table) = toml::from_str::<toml::Table>(text) {
        walk("", &table, &mut keys);
    }
    keys
}

fn walk(prefix: &str, table: &toml::Table, keys: &mut BTreeSet<String>) {
    for (key, value) in table {
        let path = match prefix {
            "" => key.clone(),
            _ => format!("{prefix}.{key}"),
        };
        match value {
            toml::Value::Table(inner) => walk(&path, inner, keys),
            _ => {
                keys.insert(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::AMQP_URL_ENV;

    fn get<'a>(all: &'a [Setting], key: &str) -> &'a Setting {
        all.iter()
            .find(|s| s.key == key)
            .unwrap_or_else(|| panic!("no {key}"))
    }

    #[test]
    fn each_value_says_where_it_came_from_and_secrets_are_masked() {
        let mut config = Config::from_toml(
            "[broker]\nurl = \"amqp://file:filepw@h/%2f\"\n[worker]\nconcurrency = 3\n\
             [management]\npassword = \"mgmtpw\"\n\
             [queue_defaults]\njob_timeout = \"2m\"\n[queues.\"a.b\"]\nretry = { jitter = 0.0 }\n",
        )
        .expect("parses");
        config.source = ConfigSource::File(PathBuf::from("warren.toml"));
        config.apply_env(|var| (var == AMQP_URL_ENV).then(|| "amqp://env:envpw@h2/%2f".to_owned()));
        let all = settings(&config);
        let file = ConfigSource::File(PathBuf::from("warren.toml"));

        let url = get(&all, "broker.url");
        assert_eq!(url.origin, ConfigSource::Env(AMQP_URL_ENV));
        assert_eq!(url.value, "amqp://env:***@h2/%2f");
        assert_eq!(get(&all, "worker.concurrency").origin, file);
        assert_eq!(get(&all, "worker.concurrency").value, 3);
        assert_eq!(
            get(&all, "worker.shutdown_grace").origin,
            ConfigSource::Defaults
        );
        assert_eq!(get(&all, "worker.shutdown_grace").value, "30s");
        assert_eq!(get(&all, "management.password").value, "***");
        assert_eq!(get(&all, "management.password").origin, file);
        assert_eq!(get(&all, "queues.a.b.retry.jitter").origin, file);
        assert_eq!(
            get(&all, "queues.a.b.job_timeout").origin,
            file,
            "via queue_defaults"
        );
        assert_eq!(get(&all, "queues.a.b.job_timeout").value, "2m");
        assert_eq!(
            get(&all, "queues.a.b.delivery_limit").origin,
            ConfigSource::Defaults
        );
        let text = format!("{all:?}");
        for secret in ["filepw", "envpw", "mgmtpw"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }

    #[test]
    fn http_tokens_are_masked_and_named() {
        let mut config = Config::from_toml(
            "[[http.tokens]]\nname = \"ci\"\ntoken = \"file-token-0123456789\"\nscope = \"read\"\n",
        )
        .expect("parses");
        config.apply_env(|var| {
            (var == crate::config::HTTP_TOKEN_ENV).then(|| "env-token-0123456789".to_owned())
        });
        config.validate().expect("valid");
        let all = settings(&config);
        let tokens = get(&all, "http.tokens");
        assert_eq!(
            tokens.origin,
            ConfigSource::Env(crate::config::HTTP_TOKEN_ENV)
        );
        assert_eq!(tokens.value[0]["name"], "ci");
        assert_eq!(tokens.value[0]["scope"], "read");
        assert_eq!(tokens.value[1]["scope"], "admin");
        let text = format!("{all:?} {config:?}");
        for secret in ["file-token-0123456789", "env-token-0123456789"] {
            assert!(!text.contains(secret), "{secret} shown: {text}");
        }
    }
}
