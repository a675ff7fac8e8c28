//! `warren inflight [Q]`: the jobs being worked on now.

use std::process::ExitCode;

use warren_dispatcher::Dispatcher;

/// Show the jobs workers are running now, flagging those past their job_timeout.
#[derive(clap::Args)]
pub struct Args {}

pub async fn run(_dispatcher: &Dispatcher, _args: Args) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`warren inflight` is not built yet")
}
