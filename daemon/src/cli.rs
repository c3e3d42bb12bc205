//! The command line: every command, flag and argument of the `cutover` binary.
//!
//! Why a module of its own: the command line is part of the contract
//! (`shared/contract.md`). Scripts, runbooks and acceptance suites call these names,
//! so they are declared in one place, with clap's derive API, and nothing else in the
//! crate parses `argv`. `main.rs` only dispatches; command implementations receive the
//! typed argument structs defined here.
//!
//! Exit codes are the contract's three: [`Outcome::Success`] (0), [`Outcome::Negative`]
//! (1, a definite "no") and anything that could not be answered (2): an `Err` returned by
//! a command, or [`Outcome::Unanswered`] when the command has already reported why.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use cutover_connectors::Lsn;

/// `--api` when neither `--api` nor a `--config` with `[api] listen` is given.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7432";

/// Move a live PostgreSQL database into a new schema or cluster, and prove it.
///
/// Exit codes, for every command: 0 success (the job ran, the check passed, the target is
/// ready, the tables are equal); 1 a definite negative answer (a check failed, not ready,
/// differences found, a broken change log); 2 could not answer (bad arguments, invalid
/// config, cannot connect, internal error).
#[derive(Debug, Parser)]
#[command(name = "cutover", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Format of the log lines written to stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log more (repeat for more detail: -v debug, -vv trace, -vvv trace for every library).
    /// RUST_LOG, when set, takes precedence.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    pub verbose: u8,

    /// Log less (-q errors only, -qq nothing).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub quiet: u8,
}

/// How log lines on stderr look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line, for log shippers.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pre-flight checks against both databases; changes nothing.
    ///
    /// Checks wal_level, privileges, primary keys and replica identity, the mapping
    /// against both catalogs, slot and publication state, and free disk for the change
    /// log. Prints each check with pass or fail and a fix. Exit 1 when a check fails.
    Check(CheckArgs),

    /// Run the job in the foreground until SIGINT or SIGTERM.
    ///
    /// Creates the publication and slot if missing, copies the initial snapshot, streams
    /// and applies changes, writes the change log, verifies continuously and serves the
    /// HTTP API. Stopping and starting again resumes where it was.
    Run(RunArgs),

    /// Show a running job's phase, snapshot progress, LSNs, lag and last verification.
    Status(StatusArgs),

    /// Exit 0 when every readiness gate holds, else 1 with the unmet gates listed.
    Ready(ReadyArgs),

    /// One full verification pass now, source against target, through the mapping.
    ///
    /// Exit 0 when equal, 1 when differences are found (listed by table and key).
    Verify(VerifyArgs),

    /// Inspect the change log.
    #[command(subcommand)]
    Log(LogCommand),

    /// Drop the job's replication slot and publication on the source.
    ///
    /// Afterwards the source retains no WAL for the job. Refuses while the job's slot is
    /// in use unless --force is given.
    Teardown(TeardownArgs),

    /// Start throwaway PostgreSQL clusters and show a whole cutover on sample data.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The job file.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,

    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job file.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,
}

/// Where a client command finds the daemon's HTTP API.
#[derive(Debug, Clone, Default, Args)]
pub struct ApiArgs {
    /// Address (host:port) of the daemon's HTTP API.
    /// [default: the [api] listen address of --config, else 127.0.0.1:7432]
    #[arg(long, value_name = "ADDR")]
    pub api: Option<String>,

    /// The job file, to read the [api] listen address and the [api] token_env variable.
    /// Without it the token is read from CUTOVER_API_TOKEN.
    #[arg(long, value_name = "JOB.toml")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub api: ApiArgs,

    /// Print the status document (the same as GET /v1/status) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReadyArgs {
    #[command(flatten)]
    pub api: ApiArgs,

    /// Poll every 500ms until ready or until this much time has passed (e.g. 500ms, 30s,
    /// 10m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,

    /// Print the readiness document (the same as GET /v1/ready) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The job file.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,

    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    /// Verify only this table (source `schema.table`); repeat for several.
    #[arg(long = "table", value_name = "T")]
    pub tables: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Check the change log's hash chain and every record's checksum.
    ///
    /// Exit 1 names the first bad record.
    Verify(LogVerifyArgs),

    /// Print change records.
    Show(LogShowArgs),
}

#[derive(Debug, Args)]
pub struct LogVerifyArgs {
    /// The change log directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LogShowArgs {
    /// The change log directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Only records at or after this LSN (X/XXXXXXXX).
    #[arg(long, value_name = "L")]
    pub from_lsn: Option<Lsn>,

    /// Only records at or before this LSN (X/XXXXXXXX).
    #[arg(long, value_name = "L")]
    pub to_lsn: Option<Lsn>,

    /// Only records of this table (source `schema.table`); repeat for several.
    #[arg(long = "table", value_name = "T")]
    pub tables: Vec<String>,

    /// Print one JSON object a line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct TeardownArgs {
    /// The job file.
    #[arg(value_name = "JOB.toml")]
    pub job: PathBuf,

    /// Drop the slot even while a consumer is connected to it (terminates it).
    #[arg(long)]
    pub force: bool,

    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Orders in the sample shop (items are about twice as many, customers a tenth).
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    pub rows: u64,

    /// Keep the clusters and the job running after the check, with the API up, until
    /// Ctrl-C; then remove everything.
    #[arg(long)]
    pub keep: bool,
}

/// How a command ended, when it could give an answer. Errors (exit code 2) travel as
/// `Err(anyhow::Error)` instead, and `main` prints them as one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit 0: the job ran, the check passed, the target is ready, the tables are equal.
    Success,
    /// Exit 1: a definite negative answer (a check failed, not ready, differences found,
    /// a broken chain).
    Negative,
    /// Exit 2 for a command that has already reported why it could not answer (e.g. in
    /// its `--json` document); `main` prints nothing more.
    Unanswered,
}

impl Outcome {
    /// The process exit code of this outcome.
    pub fn code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Negative => 1,
            Outcome::Unanswered => 2,
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        ExitCode::from(outcome.code())
    }
}

/// Exit code for errors: could not answer.
pub const EXIT_ERROR: u8 = 2;

/// Parses a duration such as `500ms`, `5s`, `1.5s`, `10m`, `1h` or `0`.
///
/// Used for `--wait`; the same spelling as the job file's durations.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let invalid = || {
        format!(
            "invalid duration \"{text}\"; hint: write a number and a unit: ms, s, m or h \
             (e.g. 500ms, 30s, 10m)"
        )
    };
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(invalid)?;
    let (number, unit) = s.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(invalid());
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(invalid()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| invalid())
}

/// Formats a duration the way [`parse_duration`] reads it: `500ms`, `5s`, `1.5s`, `10m`,
/// `1h`, `90s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 && !d.is_zero() {
        return format!("{}us", d.as_micros());
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    if ms.is_multiple_of(3_600_000) {
        return format!("{}h", ms / 3_600_000);
    }
    if ms.is_multiple_of(60_000) {
        return format!("{}m", ms / 60_000);
    }
    if ms.is_multiple_of(1000) {
        return format!("{}s", ms / 1000);
    }
    let secs = format!("{:.3}", d.as_secs_f64());
    format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
}

/// Turns a clap usage error into the one line `main` prints after `cutover: `:
/// the problem, then clap's tips (or a pointer to `--help`) as the hint.
pub fn usage_error_line(err: &clap::Error) -> String {
    let rendered = err.render().to_string();
    let mut message = String::new();
    let mut tips = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("Usage:") || line.starts_with("For more information")
        {
            continue;
        }
        if let Some(tip) = line.strip_prefix("tip:") {
            tips.push(tip.trim().to_string());
        } else if message.is_empty() {
            message = line
                .strip_prefix("error:")
                .unwrap_or(line)
                .trim()
                .to_string();
        }
    }
    if message.is_empty() {
        message = "invalid arguments".to_string();
    }
    if tips.is_empty() && message.contains("; hint: ") {
        // A value parser of ours already gave the fix.
        return message;
    }
    let hint = if tips.is_empty() {
        "run \"cutover --help\" or \"cutover <command> --help\" for usage".to_string()
    } else {
        tips.join("; ")
    };
    format!("{message}; hint: {hint}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "5", "s", "5 sec", "-5s", "1.s", ".5s", "5d", "1e3s"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.starts_with("invalid duration"), "{bad}: {err}");
            assert!(err.contains("hint:"), "{bad}: {err}");
        }
    }

    #[test]
    fn durations_format_as_they_parse() {
        for text in ["500ms", "5s", "1.5s", "10m", "1h", "90s", "0ms"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
    }

    #[test]
    fn api_flags_parse() {
        let cli = Cli::try_parse_from([
            "cutover",
            "ready",
            "--api",
            "10.0.0.1:80",
            "--wait",
            "30s",
            "--json",
            "-v",
        ])
        .unwrap();
        assert_eq!(cli.verbose, 1);
        let Command::Ready(args) = cli.command else {
            panic!("not ready: {:?}", cli.command)
        };
        assert_eq!(args.api.api.as_deref(), Some("10.0.0.1:80"));
        assert_eq!(args.wait, Some(Duration::from_secs(30)));
        assert!(args.json);
    }

    #[test]
    fn log_show_parses_lsns() {
        let cli = Cli::try_parse_from([
            "cutover",
            "log",
            "show",
            "/tmp/log",
            "--from-lsn",
            "0/16B6C50",
            "--table",
            "public.a",
            "--table",
            "public.b",
        ])
        .unwrap();
        let Command::Log(LogCommand::Show(args)) = cli.command else {
            panic!("not log show: {:?}", cli.command)
        };
        assert_eq!(args.from_lsn, Some(Lsn(0x16B6C50)));
        assert_eq!(args.tables, ["public.a", "public.b"]);
        assert!(Cli::try_parse_from(["cutover", "log", "show", "d", "--to-lsn", "x"]).is_err());
    }

    #[test]
    fn usage_errors_become_one_line_with_a_hint() {
        let err = Cli::try_parse_from(["cutover", "status", "--jsn"]).unwrap_err();
        let line = usage_error_line(&err);
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("unexpected argument '--jsn'"), "{line}");
        assert!(line.contains("; hint: "), "{line}");

        let err = Cli::try_parse_from(["cutover", "ready", "--wait", "soon"]).unwrap_err();
        let line = usage_error_line(&err);
        assert_eq!(line.matches("hint:").count(), 1, "{line}");
        assert!(line.contains("invalid duration \"soon\""), "{line}");
    }
}
