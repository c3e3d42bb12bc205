//! The job spec: what a job file says, after parsing and pure validation.
//!
//! These types are the in-memory form of the job TOML of `shared/contract.md`. Parsing
//! ([`JobSpec::parse`], in `crate::parse`) fills defaults, so every field here has its
//! final value; nothing downstream needs to know a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::secret::Secret;

/// A whole job: one source, one target, the tables between them.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// `[a-z0-9_-]{1,48}`; names the slot, the publication and the progress rows.
    pub name: String,
    /// The file the spec was read from, when it came from a file.
    pub path: Option<PathBuf>,
    pub source: SourceSpec,
    pub target: TargetSpec,
    /// `[[table]]` entries, in file order. Empty: every table matched by
    /// `source.tables` maps by name.
    pub tables: Vec<TableSpec>,
    pub snapshot: SnapshotSpec,
    pub verify: VerifySpec,
    pub ready: ReadySpec,
    pub changelog: ChangelogSpec,
    pub api: ApiSpec,
    /// Where the job keeps local state (`data_dir`, default `./cutover-data`).
    pub data_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub conn: ConnSpec,
    /// Table patterns (`schema.table`, `*` allowed in either part) used when no
    /// `[[table]]` is given. Default `["public.*"]`.
    pub tables: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    pub conn: ConnSpec,
    /// Default target schema for tables mapped by name. `None`: the source's schema.
    pub schema: Option<String>,
    /// Create missing target tables from the source's definitions (identity mapping only),
    /// with their indexes built after the data is loaded. Default false.
    pub create_tables: bool,
    /// Target sessions the apply may use (1 or 2, default 1). With 2, while a group runs
    /// on one session the next group's changes that it does not touch go ahead on the
    /// other; 1 applies one group at a time.
    pub apply_sessions: usize,
}

/// How to reach one database. The URL may hold a password; it is never
/// printed: use [`ConnSpec::endpoint`] for messages.
#[derive(Clone, PartialEq)]
pub struct ConnSpec {
    /// libpq URL or key=value conninfo, as written (possibly with a password).
    pub url: Secret,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// Where the settings were written, so that errors found later by
    /// [`ConnSpec::resolve`] point at the job file like parse errors do.
    pub origin: ConnOrigin,
}

/// Where a [`ConnSpec`] was written (for messages only; never holds a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnOrigin {
    /// The job file as given, `<job>` when parsed from a string.
    pub file: String,
    /// The section, `[source]` or `[target]` (`connection` for a spec built in code).
    pub section: String,
    /// The line of the `url` key.
    pub url_line: Option<usize>,
    /// The line of the `password_env` key.
    pub password_env_line: Option<usize>,
}

impl Default for ConnOrigin {
    fn default() -> Self {
        Self {
            file: "<job>".to_owned(),
            section: "connection".to_owned(),
            url_line: None,
            password_env_line: None,
        }
    }
}

/// One `[[table]]` entry.
///
/// Names are `schema.table` or `table`; a part in double quotes may hold any
/// character (`""` for a quote). Unquoted parts are taken as written, without case
/// folding: job files name tables as the catalog spells them. A bare source name is
/// in schema `public`. The target table is `target` if given, else the source's
/// name; when that name has no schema, the schema is `[target] schema` if set, else
/// the source's schema. Parsing guarantees that no two entries share a source, or a
/// target, under these rules (see [`JobSpec::table_target`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TableSpec {
    /// `schema.table` or `table` (schema `public`), as written.
    pub source: String,
    /// `schema.table` or `table`; `None`: same name, in `target.schema` if set.
    pub target: Option<String>,
    /// Target column = SQL expression over source columns. Empty: map by name.
    pub columns: BTreeMap<String, String>,
    /// Optional row filter over source columns.
    pub filter: Option<String>,
    /// The line of the `[[table]]` header in the job file (for messages).
    pub line: usize,
    /// The line of each `[table.columns]` entry, by target column.
    pub column_lines: BTreeMap<String, usize>,
    /// The line of `where`, when there is one.
    pub filter_line: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMode {
    /// Copy every table, then stream.
    Initial,
    /// Stream only.
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSpec {
    pub mode: SnapshotMode,
    /// Tables (or table ranges) copied at once. Default 4.
    pub parallelism: usize,
    /// How long creating the replication slot may wait for transactions open on the
    /// source before it gives up, naming them. Default 60s.
    pub slot_wait: Duration,
    /// Tables larger than this many bytes are copied in page ranges, up to `parallelism`
    /// at once, each at least half this size; smaller ones in one stream, which keeps the
    /// target's heap in the source's order and allows `COPY FREEZE`. Default 4GB.
    pub split_larger_than: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct VerifySpec {
    /// Full passes every this long; zero turns them off. Default 10m.
    pub every: Duration,
    /// Source rows a continuous pass reads per second at most (0: no limit), so that
    /// verification never starves the source or the apply. Default 50000.
    pub max_rows_per_second: u64,
    /// A pass replaces the snapshots it reads both sides in once they are this old, in the
    /// middle of a table if need be (continuing after the last key compared), so that no
    /// snapshot holds back vacuum for long. Default 2m.
    pub snapshot_max_age: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ReadySpec {
    /// Default 5s.
    pub max_lag: Duration,
    /// Default 30m.
    pub max_verify_age: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChangelogSpec {
    /// Default `<data_dir>/<name>/log`.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiSpec {
    /// Default 127.0.0.1:7432.
    pub listen: SocketAddr,
    /// Environment variable holding the bearer token, if any.
    pub token_env: Option<String>,
}

/// Connection settings resolved from a [`ConnSpec`]: everything a client needs.
#[derive(Clone, PartialEq)]
pub struct ConnParams {
    /// Host name, IP address, or a unix socket directory (starts with `/`).
    pub host: String,
    pub port: u16,
    pub user: String,
    pub dbname: String,
    pub password: Option<Secret>,
    pub sslmode: SslMode,
    /// libpq `options` (e.g. `-c search_path=...`), if given in the URL.
    pub options: Option<String>,
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl ConnParams {
    /// `host:port/dbname` (or `socketdir:port/dbname`), safe to print.
    pub fn endpoint(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }
}

impl std::fmt::Debug for ConnParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("dbname", &self.dbname)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("sslmode", &self.sslmode)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ConnSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnSpec")
            .field("url", &"***")
            .field("password_env", &self.password_env)
            .field("origin", &self.origin)
            .finish()
    }
}
