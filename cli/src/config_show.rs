//! `warren config show`: the effective configuration and where each value came from.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Map, Value, json};
use warren_core::Config;
use warren_core::config::{CONFIG_ENV, ConfigSource};
use warren_core::settings::{self, Setting};

use crate::output::printable;

/// Show the configuration Warren runs with.
#[derive(Subcommand)]
#[command(after_help = "Example:\n  warren config show --json")]
pub enum Command {
    /// Every key in effect, with where it came from: an environment variable (named), the
    /// config file, or the built-in default. Passwords are masked.
    #[command(
        after_help = "Examples:\n  warren config show\n  warren --config prod.toml config show --json"
    )]
    Show {
        /// Print JSON: {"file": ..., "settings": {"KEY": {"value", "source", "env"|"path"}}}.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(file: Option<&Path>, config: &Config, command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Show { json } => {
            let all = settings::settings(config);
            let chosen = chosen_by(file, config);
            match json {
                true => println!("{}", serde_json::to_string_pretty(&as_json(config, &all))?),
                false => print_text(config, &chosen, &all),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How the config file was chosen.
fn chosen_by(file: Option<&Path>, config: &Config) -> String {
    match (&config.source, file) {
        (ConfigSource::File(_), Some(_)) => "--config".to_owned(),
        (ConfigSource::File(_), None) if std::env::var_os(CONFIG_ENV).is_some() => {
            format!("${CONFIG_ENV}")
        }
        (ConfigSource::File(_), None) => "found in the working directory".to_owned(),
        _ => String::new(),
    }
}

fn print_text(config: &Config, chosen: &str, all: &[Setting]) {
    match &config.source {
        ConfigSource::File(path) => println!(
            "# config file: {} ({chosen})",
            printable(&path.display().to_string())
        ),
        _ => println!("# no config file: built-in defaults and environment variables"),
    }
    let rows: Vec<(String, String, String)> = all
        .iter()
        .map(|s| {
            let value = match &s.value {
                Value::Null => "(not set)".to_owned(),
                other => other.to_string(),
            };
            (printable(&s.key), printable(&value), origin_text(&s.origin))
        })
        .collect();
    let key_width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
    let value_width = rows
        .iter()
        .map(|r| r.1.chars().count())
        .max()
        .unwrap_or(0)
        .min(60);
    for (key, value, origin) in rows {
        println!("{key:<key_width$} = {value:<value_width$}  # {origin}");
    }
}

fn origin_text(origin: &ConfigSource) -> String {
    match origin {
        ConfigSource::Defaults => "default".to_owned(),
        ConfigSource::File(path) => printable(&path.display().to_string()),
        ConfigSource::Env(var) => format!("${var}"),
    }
}

fn as_json(config: &Config, all: &[Setting]) -> Value {
    let mut settings = Map::new();
    for s in all {
        let mut entry = Map::new();
        entry.insert("value".into(), s.value.clone());
        match &s.origin {
            ConfigSource::Defaults => {
                entry.insert("source".into(), "default".into());
            }
            ConfigSource::File(path) => {
                entry.insert("source".into(), "file".into());
                entry.insert("path".into(), path.display().to_string().into());
            }
            ConfigSource::Env(var) => {
                entry.insert("source".into(), "env".into());
                entry.insert("env".into(), (*var).into());
            }
        }
        settings.insert(s.key.clone(), Value::Object(entry));
    }
    let file = match &config.source {
        ConfigSource::File(path) => Value::String(path.display().to_string()),
        _ => Value::Null,
    };
    json!({ "file": file, "settings": settings })
}
