//! The `cutover` job spec.
//!
//! [`JobSpec::parse`] turns the text of a job file into a [`JobSpec`] with every default
//! filled in, or a [`ConfigError`] that names the file, line, key and a fix. Parsing is
//! pure: it reads no environment and touches no network. [`ConnSpec::resolve`] is the one
//! step that reads the environment (password variables, `~/.pgpass`).

mod secret;
mod spec;

pub use secret::Secret;
pub use spec::{
    ApiSpec, ChangelogSpec, ConnParams, ConnSpec, JobSpec, ReadySpec, SnapshotMode,
    SnapshotSpec, SourceSpec, SslMode, TableSpec, TargetSpec, VerifySpec,
};
