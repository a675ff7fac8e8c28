//! `warren doctor`: checks what Warren relies on, and says what to do about each miss.

use std::process::ExitCode;

use warren_core::Config;

/// Check the broker, its settings and Warren's queues and permissions against the config.
#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_config: &Config, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren doctor` is not built yet")
}
