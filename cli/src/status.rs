//! `warren status`: one row per queue, from the management HTTP API (or AMQP alone).

use std::process::ExitCode;

use warren_core::Config;

/// Show each queue's depth, consumers, rates, delayed and dead jobs.
#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_config: &Config, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren status` is not built yet")
}
