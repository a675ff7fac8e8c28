//! `warren-worker`: a long-running worker process with the built-in job kinds
//! (`warren_workers::builtin`). The command line is `warren_workers::cli` (its `cli` feature).

use std::process::ExitCode;

fn main() -> ExitCode {
    warren_workers::cli::main(warren_workers::builtin::register)
}
