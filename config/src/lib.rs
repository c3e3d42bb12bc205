//! The `cutover` job spec.
//!
//! [`JobSpec::parse`] turns the text of a job file into a [`JobSpec`] with every default
//! filled in, or a [`ConfigError`] that names the file, line, key and a fix. Parsing is
//! pure: it reads no environment and touches no network. [`JobSpec::load`] adds reading
//! the file. [`ConnSpec::resolve`] is the one step that reads the environment (password
//! variables, `~/.pgpass`).
//!
//! Why this crate is strict: a job file drives a replication slot on a production
//! database and, at the end, a cutover. A setting that is misspelt and silently ignored
//! (a readiness gate, a table filter) is worse than a refusal to start, so unknown keys
//! are errors, every value is checked when the file is read, and every error points at
//! the file and line with a suggested fix (see [`ConfigError`]). And because job files
//! and their errors end up in tickets and logs, no error or `Debug` output ever holds a
//! password or a connection URL (see [`Secret`]).

mod conn;
mod error;
mod names;
mod parse;
mod secret;
mod spec;

pub use error::ConfigError;
pub use names::{MAX_IDENT_BYTES, MAX_JOB_NAME, parse_duration, parse_size};
pub use parse::NO_FILE;
pub use secret::Secret;
pub use spec::{
    ApiSpec, ChangelogSpec, ConnOrigin, ConnParams, ConnSpec, JobSpec, ReadySpec, SnapshotMode,
    SnapshotSpec, SourceSpec, SslMode, TableSpec, TargetSpec, VerifySpec,
};
