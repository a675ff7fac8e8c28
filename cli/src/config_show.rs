//! `warren config show`: the effective configuration and where each value came from.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use warren_core::Config;

/// Show the configuration Warren runs with.
#[derive(Subcommand)]
pub enum Command {}

pub fn run(_file: Option<&Path>, _config: &Config, command: Command) -> anyhow::Result<ExitCode> {
    match command {}
}
