//! `warren doctor`: checks what Warren relies on, and says what to do about each miss
//! ([`warren_dispatcher::doctor`]). Exit 0 when every check holds, 4 when one fails.

use std::process::ExitCode;

use anyhow::Context;
use warren_core::Config;
use warren_dispatcher::Dispatcher;
use warren_dispatcher::doctor::{self, Options, Outcome, UserToCheck};
use warren_dispatcher::management::Management;

use crate::output::printable;

/// Check the broker (version, feature flags, plugins, consumer_timeout), Warren's exchanges,
/// delay levels and queues against the config, and the users' permissions. Read-only. Exit 0
/// when every check holds, 4 when one fails (warnings hold). Needs the management API with
/// an administrator's credentials.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  warren doctor\n  \
                  warren doctor --user warren-worker --user warren-dispatcher=dispatcher --json")]
pub struct Args {
    /// Also check this user's permissions (repeatable): NAME, or NAME=dispatcher|worker|admin
    /// to say what it must be able to do (default: worker if it may read one of the queues,
    /// else dispatcher). The user Warren connects as is always checked.
    #[arg(long, value_name = "NAME[=ROLE]", value_parser = UserToCheck::parse)]
    user: Vec<UserToCheck>,
    /// Also check this queue (repeatable; the config's queues are always checked).
    #[arg(long, value_name = "Q")]
    queue: Vec<String>,
    /// Print JSON: {"holds": bool, "checks": [{"check", "subject", "status", "detail", "fix"}]}.
    #[arg(long)]
    json: bool,
}

/// The exit code when a check fails.
const CHECKS_FAILED: u8 = 4;

pub async fn run(config: &Config, args: Args) -> anyhow::Result<ExitCode> {
    let management = Management::new(config).context("the management API's address")?;
    let dispatcher = Dispatcher::connect(config)
        .await
        .map_err(|err| warren_core::error_chain(&err));
    let options = Options {
        queues: args.queue,
        users: args.user,
    };
    let amqp = match &dispatcher {
        Ok(d) => Ok(d),
        Err(reason) => Err(reason.clone()),
    };
    let report = doctor::examine(config, amqp, &management, &options).await;
    if let Ok(d) = dispatcher {
        d.close().await;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for check in &report.checks {
            let mark = match check.outcome {
                Outcome::Ok => "ok  ",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
            };
            let what = match &check.subject {
                Some(subject) => format!("{} {}", check.check, printable(subject)),
                None => check.check.to_owned(),
            };
            println!("{mark}  {what}: {}", printable(&check.detail));
            if let Some(fix) = &check.fix {
                println!("        fix: {}", printable(fix));
            }
        }
        let failed = report
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Fail)
            .count();
        let warned = report
            .checks
            .iter()
            .filter(|c| c.outcome == Outcome::Warn)
            .count();
        println!(
            "\n{} check(s) in vhost `{}`: {failed} failed, {warned} warning(s){}",
            report.checks.len(),
            printable(&report.vhost),
            if report.holds {
                " — everything Warren relies on holds"
            } else {
                ""
            }
        );
    }
    Ok(match report.holds {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(CHECKS_FAILED),
    })
}
