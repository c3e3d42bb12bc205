//! `cutover`: the binary's entry point.
//!
//! Deliberately thin, as in ripgrep: parse the arguments, set up logging, hand the
//! command to its function in the library, and turn the result into the contract's exit
//! code (0 success, 1 a definite "no", 2 could not answer). Everything else lives in the
//! library, where the tests can reach it.
//!
//! Errors are printed here and only here, as one line on stderr: `cutover: ` and the
//! error with its causes (`{:#}`), which by convention end in `; hint: ...`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;
use cutover::cli::{Cli, Command, EXIT_ERROR, LogCommand, LogFormat, usage_error_line};
use cutover::{api_client, commands};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return usage_error(&err),
    };
    init_tracing(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(&anyhow::Error::new(err).context("cannot start the runtime")),
    };
    match runtime.block_on(dispatch(&cli.command)) {
        Ok(outcome) => outcome.into(),
        Err(err) => fail(&err),
    }
}

async fn dispatch(command: &Command) -> anyhow::Result<cutover::cli::Outcome> {
    match command {
        Command::Check(args) => commands::check(args).await,
        Command::Run(args) => commands::run(args).await,
        Command::Status(args) => api_client::status(args).await,
        Command::Ready(args) => api_client::ready(args).await,
        Command::Verify(args) => commands::verify(args).await,
        Command::Log(LogCommand::Verify(args)) => commands::log_verify(args).await,
        Command::Log(LogCommand::Show(args)) => commands::log_show(args).await,
        Command::Teardown(args) => commands::teardown(args).await,
        Command::Demo(args) => commands::demo(args).await,
    }
}

/// Prints `err` as one line and returns exit code 2. A closed stdout (`cutover log show
/// | head`) is not an error worth reporting: exit quietly.
fn fail(err: &anyhow::Error) -> ExitCode {
    let broken_pipe = err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        return ExitCode::SUCCESS;
    }
    let message = format!("{err:#}");
    let one_line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("cutover: {one_line}");
    ExitCode::from(EXIT_ERROR)
}

/// `--help` and `--version` print as clap prints them; usage errors become one line.
fn usage_error(err: &clap::Error) -> ExitCode {
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            ExitCode::SUCCESS
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = err.print();
            ExitCode::from(EXIT_ERROR)
        }
        _ => {
            eprintln!("cutover: {}", usage_error_line(err));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Logs go to stderr (stdout is for answers). RUST_LOG, when set, wins; otherwise the
/// level of cutover's own crates comes from the command (info for `run`, warn for the
/// demo and the queries) shifted by -v/-q, and libraries stay at warn until -vvv.
fn init_tracing(cli: &Cli) {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    // The demo draws its own progress; the job's info lines would break it up.
    let base: i32 = match cli.command {
        Command::Run(_) => 3,
        _ => 2,
    };
    let index = (base + i32::from(cli.verbose) - i32::from(cli.quiet)).clamp(0, 5);
    let level = LEVELS[usize::try_from(index).unwrap_or(2)];
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::new(directives),
        _ if cli.verbose >= 3 => EnvFilter::new("trace"),
        _ => EnvFilter::new(format!(
            "{default},cutover={level},cutover_config={level},cutover_connectors={level},\
             cutover_verifier={level}",
            default = if index == 0 { "off" } else { "warn" },
        )),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .init(),
    }
}
