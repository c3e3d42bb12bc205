//! The commands that do the work: `run`, `check`, `verify`, `teardown`, `demo`, `log`.
//!
//! Why one module of entry points: `main.rs` stays a thin dispatcher (parse, set up
//! logging, call one function, map its result to an exit code), and each command's
//! implementation can live where it belongs while its entry signature stays here.
//! Every entry point returns `Ok(Outcome)` for an answer (exit 0 or 1) and `Err` when
//! it could not answer (exit 2; `main` prints the error as one line).
//!
//! `log` is not implemented yet and says so (exit 2).

use crate::cli::{
    CheckArgs, DemoArgs, LogShowArgs, LogVerifyArgs, Outcome, RunArgs, TeardownArgs, VerifyArgs,
};

fn not_implemented(command: &str) -> anyhow::Result<Outcome> {
    anyhow::bail!(
        "\"cutover {command}\" is not implemented yet; hint: use a newer build of cutover"
    )
}

/// `cutover run JOB.toml`.
pub async fn run(args: &RunArgs) -> anyhow::Result<Outcome> {
    crate::run::run_job(&args.job).await
}

/// `cutover check JOB.toml`.
pub async fn check(args: &CheckArgs) -> anyhow::Result<Outcome> {
    crate::check::check(args).await
}

/// `cutover verify JOB.toml`.
pub async fn verify(args: &VerifyArgs) -> anyhow::Result<Outcome> {
    crate::verify::verify(args).await
}

/// `cutover teardown JOB.toml`.
pub async fn teardown(args: &TeardownArgs) -> anyhow::Result<Outcome> {
    crate::teardown::teardown(args).await
}

/// `cutover demo`.
pub async fn demo(args: &DemoArgs) -> anyhow::Result<Outcome> {
    crate::demo::run(args).await
}

/// `cutover log verify DIR`.
#[allow(clippy::unused_async, reason = "placeholder body; remove with it")]
pub async fn log_verify(args: &LogVerifyArgs) -> anyhow::Result<Outcome> {
    let _ = args;
    not_implemented("log verify")
}

/// `cutover log show DIR`.
#[allow(clippy::unused_async, reason = "placeholder body; remove with it")]
pub async fn log_show(args: &LogShowArgs) -> anyhow::Result<Outcome> {
    let _ = args;
    not_implemented("log show")
}
