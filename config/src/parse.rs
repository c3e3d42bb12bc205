//! From job-file text to a [`JobSpec`]: syntax, structure, values, defaults.
//!
//! Three layers, each with the best position it can give:
//!
//! 1. TOML syntax, by the `toml` crate; its error span gives the line.
//! 2. Structure, by serde: the raw structs below use `deny_unknown_fields`, so a
//!    misspelt key is an error instead of a silently ignored setting (a typo in
//!    `max_lag` must not quietly leave the default readiness gate in place). Every key
//!    is optional at this layer, and every leaf is kept as a `Spanned<toml::Value>`, so
//!    serde only ever fails on unknown keys and on a section of the wrong shape. Those
//!    failures are located by matching the error's span against a spanned parse of the
//!    document ([`toml::de::DeTable`]), which tells which table the key sits in: the
//!    valid keys of that table give the "did you mean".
//! 3. Values and required keys, by hand, so that each message can name the key, say
//!    what is accepted, and point at the value's line (or the section header's, for a
//!    missing key); and so that values that may be secret (`url`, `password_env`,
//!    `token_env`) are described without being echoed.
//!
//! Defaults are filled here and nowhere else.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::conn::{parse_conn, url_error};
use crate::error::{ConfigError, describe, kind, line_of, nearest};
use crate::names::{
    JobNameError, MAX_IDENT_BYTES, MAX_JOB_NAME, check_job_name, is_env_name, parse_duration,
    parse_size, split_table_name,
};
use crate::secret::Secret;
use crate::spec::{
    ApiSpec, ChangelogSpec, ConnOrigin, ConnSpec, JobSpec, ReadySpec, SnapshotMode, SnapshotSpec,
    SourceSpec, TableSpec, TargetSpec, VerifySpec,
};

/// `file` in messages when the text came without a path.
pub const NO_FILE: &str = "<job>";

const DEFAULT_DATA_DIR: &str = "./cutover-data";
const DEFAULT_SOURCE_TABLES: &str = "public.*";
const DEFAULT_PARALLELISM: usize = 4;
const MAX_PARALLELISM: i64 = 64;
const DEFAULT_APPLY_SESSIONS: usize = 1;
const DEFAULT_VERIFY_EVERY: Duration = Duration::from_secs(10 * 60);
const DEFAULT_VERIFY_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(2 * 60);
const MIN_VERIFY_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(1);
/// Source rows a continuous pass reads per second at most.
const DEFAULT_VERIFY_ROWS_PER_SECOND: u64 = 50_000;
/// How long creating the slot may wait for open transactions on the source.
const DEFAULT_SLOT_WAIT: Duration = Duration::from_secs(60);
/// Tables larger than this are copied in page ranges (docs/benchmarks.md, session 8).
const DEFAULT_SPLIT_LARGER_THAN: u64 = 4 << 30;
const MIN_SPLIT_LARGER_THAN: u64 = 1 << 20;
const DEFAULT_MAX_LAG: Duration = Duration::from_secs(5);
const DEFAULT_MAX_VERIFY_AGE: Duration = Duration::from_secs(30 * 60);
const DEFAULT_LISTEN: &str = "127.0.0.1:7432";
const URL_EXAMPLE: &str = "url = \"postgresql://user@host:5432/db\"";
const DURATION_FORMS: &str = "\"500ms\", \"5s\", \"10m\", \"2h\"";

/// The keys each table accepts; `""` is the top level, `table` each `[[table]]`.
/// Kept equal to the raw structs by a test.
const KEYS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "name",
            "data_dir",
            "source",
            "target",
            "table",
            "snapshot",
            "verify",
            "ready",
            "changelog",
            "api",
        ],
    ),
    ("source", &["url", "password_env", "tables"]),
    (
        "target",
        &[
            "url",
            "password_env",
            "schema",
            "create_tables",
            "apply_sessions",
        ],
    ),
    ("table", &["source", "target", "columns", "where"]),
    (
        "snapshot",
        &["mode", "parallelism", "slot_wait", "split_larger_than"],
    ),
    (
        "verify",
        &["every", "max_rows_per_second", "snapshot_max_age"],
    ),
    ("ready", &["max_lag", "max_verify_age"]),
    ("changelog", &["dir"]),
    ("api", &["listen", "token_env"]),
];

type Value = Spanned<toml::Value>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: Option<Value>,
    data_dir: Option<Value>,
    source: Option<Spanned<RawSource>>,
    target: Option<Spanned<RawTarget>>,
    table: Option<Vec<Spanned<RawTable>>>,
    snapshot: Option<Spanned<RawSnapshot>>,
    verify: Option<Spanned<RawVerify>>,
    ready: Option<Spanned<RawReady>>,
    changelog: Option<Spanned<RawChangelog>>,
    api: Option<Spanned<RawApi>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSource {
    url: Option<Value>,
    password_env: Option<Value>,
    tables: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    url: Option<Value>,
    password_env: Option<Value>,
    schema: Option<Value>,
    create_tables: Option<Value>,
    apply_sessions: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    source: Option<Value>,
    target: Option<Value>,
    columns: Option<Spanned<BTreeMap<Spanned<String>, Value>>>,
    #[serde(rename = "where")]
    filter: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSnapshot {
    mode: Option<Value>,
    parallelism: Option<Value>,
    slot_wait: Option<Value>,
    split_larger_than: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    every: Option<Value>,
    max_rows_per_second: Option<Value>,
    snapshot_max_age: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReady {
    max_lag: Option<Value>,
    max_verify_age: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChangelog {
    dir: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<Value>,
    token_env: Option<Value>,
}

impl JobSpec {
    /// Parse and validate a job file's text. `path` is only used in messages and
    /// kept in [`JobSpec::path`]; nothing is read. Every default is filled in.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<JobSpec, ConfigError> {
        let ctx = Ctx {
            text,
            file: path.map_or_else(|| NO_FILE.to_owned(), |p| p.display().to_string()),
        };
        let doc = DeTable::parse(text).map_err(|e| ctx.syntax_error(&e))?;
        ctx.check_shapes(doc.get_ref())?;
        let raw: RawJob =
            toml::from_str(text).map_err(|e| ctx.structure_error(&e, doc.get_ref()))?;
        ctx.build(raw, path)
    }

    /// Read a job file and [`JobSpec::parse`] it. An unreadable file is an error that
    /// names the path and the operating system's reason.
    pub fn load(path: &Path) -> Result<JobSpec, ConfigError> {
        let file = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| {
            let hint = match e.kind() {
                std::io::ErrorKind::NotFound if path.is_relative() => {
                    Some("check the path; it is relative to the current directory".to_owned())
                }
                std::io::ErrorKind::NotFound => Some("check the path".to_owned()),
                std::io::ErrorKind::PermissionDenied => {
                    Some("make the file readable by the user running cutover".to_owned())
                }
                std::io::ErrorKind::IsADirectory => {
                    Some("give the path of the job's .toml file".to_owned())
                }
                _ => None,
            };
            ConfigError::new(&file, None, format!("could not read job file: {e}"), hint)
        })?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
            let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
            ConfigError::new(
                &file,
                Some(line),
                "job file is not valid UTF-8",
                Some("save the file as UTF-8".to_owned()),
            )
        })?;
        Self::parse(&text, Some(path))
    }

    /// The target table of a `[[table]]` entry as `(schema, table)`, unquoted, by the
    /// rule in [`TableSpec`]'s documentation. `None` if the entry's names do not parse
    /// (only possible for a spec built by hand).
    pub fn table_target(&self, table: &TableSpec) -> Option<(String, String)> {
        let source = table.source_name()?;
        effective_target(
            &source,
            table.target.as_deref(),
            self.target.schema.as_deref(),
        )
    }
}

impl TableSpec {
    /// The source table as `(schema, table)`, unquoted; a bare name is in `public`.
    /// `None` if the name does not parse (only possible for a spec built by hand).
    pub fn source_name(&self) -> Option<(String, String)> {
        let (schema, table) = split_table_name(&self.source, false).ok()?;
        Some((schema.unwrap_or_else(|| "public".to_owned()), table))
    }
}

fn effective_target(
    source: &(String, String),
    target: Option<&str>,
    default_schema: Option<&str>,
) -> Option<(String, String)> {
    let (schema, table) = match target {
        Some(text) => split_table_name(text, false).ok()?,
        None => (None, source.1.clone()),
    };
    let schema = schema
        .or_else(|| default_schema.map(str::to_owned))
        .unwrap_or_else(|| source.0.clone());
    Some((schema, table))
}

/// `schema.table` for messages, quoting parts that are not plain lower-case names.
fn show_table(name: &(String, String)) -> String {
    let show = |p: &str| {
        let plain = !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit());
        if plain {
            p.to_owned()
        } else {
            format!("\"{}\"", p.replace('"', "\"\""))
        }
    };
    format!("{}.{}", show(&name.0), show(&name.1))
}

struct Ctx<'a> {
    text: &'a str,
    file: String,
}

/// One step of a path into the document.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Ctx<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_of(self.text, span.start)
    }

    fn err(
        &self,
        span: &Range<usize>,
        primary: impl Into<String>,
        hint: Option<String>,
    ) -> ConfigError {
        ConfigError::new(&self.file, Some(self.line(span)), primary, hint)
    }

    fn err_top(&self, primary: impl Into<String>, hint: Option<String>) -> ConfigError {
        ConfigError::new(&self.file, Some(1), primary, hint)
    }

    // ----- errors from the toml crate -------------------------------------------

    /// Sections must be tables, `table` an array of tables, `columns` a table. Checked
    /// before serde, which would otherwise also accept an array for a section (filling
    /// the fields by position).
    fn check_shapes(&self, doc: &DeTable<'_>) -> Result<(), ConfigError> {
        let is_table = |v: &Spanned<DeValue<'_>>| matches!(v.get_ref(), DeValue::Table(_));
        for (key, value) in doc.iter() {
            let key = key.get_ref().as_ref();
            let path = [Seg::Key(key.to_owned())];
            if key == "table" {
                let DeValue::Array(items) = value.get_ref() else {
                    return Err(self.shape_error(&path, value.get_ref().type_str(), &value.span()));
                };
                for (i, item) in items.iter().enumerate() {
                    let path = [Seg::Key("table".to_owned()), Seg::Index(i)];
                    let DeValue::Table(entry) = item.get_ref() else {
                        return Err(self.shape_error(
                            &path,
                            item.get_ref().type_str(),
                            &item.span(),
                        ));
                    };
                    if let Some(columns) = entry.get("columns")
                        && !is_table(columns)
                    {
                        let path = [
                            path[0].clone(),
                            path[1].clone(),
                            Seg::Key("columns".to_owned()),
                        ];
                        return Err(self.shape_error(
                            &path,
                            columns.get_ref().type_str(),
                            &columns.span(),
                        ));
                    }
                }
            } else if !key.is_empty() && !keys_of(key).is_empty() && !is_table(value) {
                return Err(self.shape_error(&path, value.get_ref().type_str(), &value.span()));
            }
        }
        Ok(())
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let line = e.span().map(|s| self.line(&s));
        let message = e.message().lines().next().unwrap_or("invalid TOML");
        let (primary, hint) = match (message, e.span()) {
            ("duplicate key", Some(span)) => {
                let key = self.text.get(span.clone()).unwrap_or("").trim();
                let line_start = self.text[..span.start.min(self.text.len())]
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                let line_text = self.text[line_start..].lines().next().unwrap_or("").trim();
                if line_text.starts_with('[') {
                    let header = line_text.split('#').next().unwrap_or(line_text).trim();
                    (
                        format!("section {header} appears twice"),
                        Some("merge the two sections into one".to_owned()),
                    )
                } else {
                    (
                        format!("duplicate key {:?}", key.trim_matches(['"', '\''])),
                        Some("remove one of the two; a key may appear once in a table".to_owned()),
                    )
                }
            }
            (m, _) if m.starts_with("invalid basic string") => (
                lower_first(m),
                Some("end the string with \" on the same line; write \"\"\"...\"\"\" for text over several lines".to_owned()),
            ),
            (m, _) if m.starts_with("string values must be quoted") => (
                lower_first(m),
                Some("put the value in double quotes".to_owned()),
            ),
            (m, _) => (lower_first(m), None),
        };
        ConfigError::new(&self.file, line, primary, hint)
    }

    /// A serde failure on a document that is valid TOML: an unknown key, or a key
    /// whose value has the wrong shape (a string where a section belongs, ...).
    fn structure_error(&self, e: &toml::de::Error, doc: &DeTable<'_>) -> ConfigError {
        let Some(span) = e.span() else {
            return ConfigError::new(&self.file, None, "invalid job file structure", None);
        };
        let found = locate(doc, &span, &mut Vec::new());
        let message = e.message();
        match found {
            Some((mut path, Hit::Key)) if message.starts_with("unknown field") => {
                let key = match path.pop() {
                    Some(Seg::Key(k)) => k,
                    _ => String::new(),
                };
                self.unknown_key(&path, &key, &span)
            }
            Some((path, Hit::Value(kind))) if message.starts_with("invalid type") => {
                self.shape_error(&path, kind, &span)
            }
            Some((path, _)) => self.err(
                &span,
                format!("invalid value for {}", show_path(&path)),
                None,
            ),
            None => self.err(&span, "invalid job file structure", None),
        }
    }

    fn unknown_key(&self, parent: &[Seg], key: &str, span: &Range<usize>) -> ConfigError {
        let section = section_of(parent);
        let shown = key.escape_debug().to_string();
        let valid = keys_of(section);
        let place = match section {
            "" => String::new(),
            s => format!(" in {}", show_section(s)),
        };
        // A key is echoed only when it looks like a key. Anything else may be a value
        // (a URL with its password) written where a key belongs.
        let plain = !key.is_empty()
            && key.len() <= 64
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !plain {
            let valid_list = valid.join(", ");
            return self.err(
                span,
                format!("unknown key{place}; it is not shown because it does not look like a key"),
                Some(format!(
                    "did you write a value where a key belongs? valid keys here: {valid_list}"
                )),
            );
        }
        let primary = format!("unknown key \"{shown}\"{place}");
        let hint = match (section, key) {
            ("source" | "target", "password" | "pass" | "pgpassword") => format!(
                "keep passwords out of the job file: set password_env = \"{}_PGPASSWORD\" and export the password in that variable (or use PGPASSWORD or ~/.pgpass)",
                section.to_uppercase()
            ),
            ("table", "filter") => "did you mean \"where\"?".to_owned(),
            ("api", "token") => {
                "keep tokens out of the job file: set token_env = \"CUTOVER_API_TOKEN\" and export the token in that variable".to_owned()
            }
            _ => {
                if let Some(near) = nearest(key, valid) {
                    format!("did you mean \"{near}\"?")
                } else if let Some(home) = home_of(section, key) {
                    if home.is_empty() {
                        format!(
                            "\"{shown}\" is a top-level key: move it above the first [section], since keys after a [section] header belong to that section"
                        )
                    } else {
                        format!("\"{shown}\" belongs in {home}")
                    }
                } else if section.is_empty() {
                    format!("valid top-level keys: {}", valid.join(", "))
                } else {
                    format!("valid keys in {}: {}", show_section(section), valid.join(", "))
                }
            }
        };
        self.err(span, primary, Some(hint))
    }

    fn shape_error(&self, path: &[Seg], found: &str, span: &Range<usize>) -> ConfigError {
        let found = with_article(found);
        match path {
            [Seg::Key(k)] if k == "table" => self.err(
                span,
                format!("table must be an array of tables, not {}", single_table(found)),
                Some("write [[table]] (double brackets) above each table mapping".to_owned()),
            ),
            [Seg::Key(k)] => self.err(
                span,
                format!("{k} must be a section, not {found}"),
                Some(format!("write [{k}] on a line of its own, with its keys on the lines below")),
            ),
            [Seg::Key(t), Seg::Index(_)] if t == "table" => self.err(
                span,
                format!("each [[table]] entry must be a table, not {found}"),
                Some("write [[table]] and then source = \"schema.table\" on the next line".to_owned()),
            ),
            [Seg::Key(t), Seg::Index(_), Seg::Key(c)] if t == "table" && c == "columns" => self.err(
                span,
                format!("[table.columns] must be a table, not {}", single_table(found)),
                Some("write [table.columns] after the [[table]] entry, then target_column = \"expression\" lines".to_owned()),
            ),
            _ => self.err(span, format!("{} has the wrong type ({found})", show_path(path)), None),
        }
    }

    // ----- values -----------------------------------------------------------------

    fn build(&self, raw: RawJob, path: Option<&Path>) -> Result<JobSpec, ConfigError> {
        let name = self.name(raw.name.as_ref())?;
        let data_dir = match &raw.data_dir {
            Some(v) => PathBuf::from(self.nonempty_string(
                v,
                "data_dir",
                "data_dir = \"/var/lib/cutover\"",
            )?),
            None => PathBuf::from(DEFAULT_DATA_DIR),
        };

        let Some(source) = &raw.source else {
            return Err(self.err_top(
                "missing section [source]",
                Some(format!("add a [source] section with {URL_EXAMPLE}")),
            ));
        };
        let src = source.get_ref();
        let source_conn = self.conn(
            "source",
            source.span(),
            src.url.as_ref(),
            src.password_env.as_ref(),
        )?;
        let source_tables = match &src.tables {
            Some(v) => self.table_patterns(v)?,
            None => vec![DEFAULT_SOURCE_TABLES.to_owned()],
        };

        let Some(target) = &raw.target else {
            return Err(self.err_top(
                "missing section [target]",
                Some(format!("add a [target] section with {URL_EXAMPLE}")),
            ));
        };
        let tgt = target.get_ref();
        let target_conn = self.conn(
            "target",
            target.span(),
            tgt.url.as_ref(),
            tgt.password_env.as_ref(),
        )?;
        let target_schema = match &tgt.schema {
            Some(v) => Some(self.schema_name(v)?),
            None => None,
        };
        let create_tables = match &tgt.create_tables {
            None => false,
            Some(v) => match v.get_ref() {
                toml::Value::Boolean(b) => *b,
                _ => {
                    return Err(self.err(
                        &v.span(),
                        "[target] create_tables must be true or false",
                        Some("write create_tables = true (without quotes)".to_owned()),
                    ));
                }
            },
        };
        let apply_sessions = match &tgt.apply_sessions {
            None => DEFAULT_APPLY_SESSIONS,
            Some(v) => self.int_in(v, "[target] apply_sessions", 1, 2, DEFAULT_APPLY_SESSIONS)?,
        };

        let tables = self.tables(
            raw.table.as_deref().unwrap_or_default(),
            target_schema.as_deref(),
        )?;

        let snapshot = match &raw.snapshot {
            Some(s) => self.snapshot(s.get_ref())?,
            None => SnapshotSpec {
                mode: SnapshotMode::Initial,
                parallelism: DEFAULT_PARALLELISM,
                slot_wait: DEFAULT_SLOT_WAIT,
                split_larger_than: DEFAULT_SPLIT_LARGER_THAN,
            },
        };
        let verify = VerifySpec {
            every: self.duration_or(
                raw.verify.as_ref().and_then(|v| v.get_ref().every.as_ref()),
                "[verify] every",
                DEFAULT_VERIFY_EVERY,
            )?,
            max_rows_per_second: match raw
                .verify
                .as_ref()
                .and_then(|v| v.get_ref().max_rows_per_second.as_ref())
            {
                None => DEFAULT_VERIFY_ROWS_PER_SECOND,
                Some(v) => match v.get_ref() {
                    toml::Value::Integer(n) if *n >= 0 => u64::try_from(*n).unwrap_or(0),
                    other => {
                        return Err(self.err(
                            &v.span(),
                            format!(
                                "[verify] max_rows_per_second must be a whole number (0: no limit), not {}",
                                describe(other)
                            ),
                            Some(format!(
                                "write max_rows_per_second = {DEFAULT_VERIFY_ROWS_PER_SECOND}"
                            )),
                        ));
                    }
                },
            },
            snapshot_max_age: self.snapshot_max_age(
                raw.verify
                    .as_ref()
                    .and_then(|v| v.get_ref().snapshot_max_age.as_ref()),
            )?,
        };
        let ready_raw = raw.ready.as_ref().map(Spanned::get_ref);
        let ready = ReadySpec {
            max_lag: self.duration_or(
                ready_raw.and_then(|r| r.max_lag.as_ref()),
                "[ready] max_lag",
                DEFAULT_MAX_LAG,
            )?,
            max_verify_age: self.duration_or(
                ready_raw.and_then(|r| r.max_verify_age.as_ref()),
                "[ready] max_verify_age",
                DEFAULT_MAX_VERIFY_AGE,
            )?,
        };
        let changelog = ChangelogSpec {
            dir: match raw
                .changelog
                .as_ref()
                .and_then(|c| c.get_ref().dir.as_ref())
            {
                Some(v) => PathBuf::from(self.nonempty_string(
                    v,
                    "[changelog] dir",
                    "dir = \"/var/lib/cutover/log\"",
                )?),
                None => data_dir.join(&name).join("log"),
            },
        };
        let api = self.api(raw.api.as_ref().map(Spanned::get_ref))?;

        Ok(JobSpec {
            name,
            path: path.map(Path::to_path_buf),
            source: SourceSpec {
                conn: source_conn,
                tables: source_tables,
            },
            target: TargetSpec {
                conn: target_conn,
                schema: target_schema,
                create_tables,
                apply_sessions,
            },
            tables,
            snapshot,
            verify,
            ready,
            changelog,
            api,
            data_dir,
        })
    }

    /// An integer from `min` to `max` (`what` is `[section] key`), with a hint for what was
    /// written instead.
    fn int_in(
        &self,
        v: &Value,
        what: &str,
        min: i64,
        max: i64,
        default: usize,
    ) -> Result<usize, ConfigError> {
        let key = what.rsplit(' ').next().unwrap_or(what);
        let other = match v.get_ref() {
            toml::Value::Integer(n) if (min..=max).contains(n) => {
                return Ok(usize::try_from(*n).unwrap_or(default));
            }
            other => other,
        };
        let hint = match other {
            toml::Value::Integer(n) if *n > max => format!("write {key} = {max} or less"),
            toml::Value::Integer(_) => format!("write {key} = {min} or more"),
            toml::Value::String(s)
                if s.trim()
                    .parse::<i64>()
                    .is_ok_and(|n| (min..=max).contains(&n)) =>
            {
                format!("write {key} = {} without quotes", s.trim())
            }
            _ => format!("write {key} = {default}"),
        };
        Err(self.err(
            &v.span(),
            format!(
                "{what} must be an integer from {min} to {max}, not {}",
                describe(other)
            ),
            Some(hint),
        ))
    }

    fn name(&self, value: Option<&Value>) -> Result<String, ConfigError> {
        let why = "it names the replication slot and the publication";
        let Some(v) = value else {
            return Err(self.err_top(
                "missing key \"name\"",
                Some(format!(
                    "add name = \"my-job\" at the top of the file; {why}"
                )),
            ));
        };
        let name = self.string(v, "name", "name = \"shop-v2\"")?;
        match check_job_name(&name) {
            Ok(()) => Ok(name),
            Err(JobNameError::Empty) => Err(self.err(
                &v.span(),
                format!("name is empty, but {why}"),
                Some("write name = \"shop-v2\"".to_owned()),
            )),
            Err(JobNameError::BadChars { fixed }) => Err(self.err(
                &v.span(),
                format!(
                    "invalid name {name:?}: only a-z, 0-9, \"_\" and \"-\" are allowed, because {why}"
                ),
                Some(format!("write name = \"{fixed}\"")),
            )),
            Err(JobNameError::TooLong { chars, fixed }) => Err(self.err(
                &v.span(),
                format!(
                    "name is {chars} characters long, at most {MAX_JOB_NAME} are allowed, because {why}"
                ),
                Some(format!("write name = \"{fixed}\"")),
            )),
        }
    }

    /// `url` and `password_env` of `[source]` or `[target]`.
    fn conn(
        &self,
        section: &str,
        header: Range<usize>,
        url: Option<&Value>,
        password_env: Option<&Value>,
    ) -> Result<ConnSpec, ConfigError> {
        let shown = show_section(section);
        let Some(url) = url else {
            return Err(self.err(
                &header,
                format!("missing key \"url\" in {shown}"),
                Some(format!("add {URL_EXAMPLE} to {shown}")),
            ));
        };
        let toml::Value::String(text) = url.get_ref() else {
            return Err(self.err(
                &url.span(),
                format!("{shown} url must be a string, not {}", kind(url.get_ref())),
                Some(format!("write {URL_EXAMPLE}")),
            ));
        };
        let password_env_line = password_env.map(|v| self.line(&v.span()));
        let password_env = match password_env {
            Some(v) => Some(self.env_name(
                v,
                &format!("{shown} password_env"),
                &format!("{}_PGPASSWORD", section.to_uppercase()),
                "password",
            )?),
            None => None,
        };
        let origin = ConnOrigin {
            file: self.file.clone(),
            section: shown,
            url_line: Some(self.line(&url.span())),
            password_env_line,
        };
        let spec = ConnSpec {
            url: Secret::new(text.clone()),
            password_env,
            origin,
        };
        parse_conn(text).map_err(|e| url_error(&spec.origin, e))?;
        Ok(spec)
    }

    /// The name of an environment variable (`password_env`, `token_env`). The value is
    /// never echoed: a user who misread the key may have written the secret itself.
    fn env_name(
        &self,
        v: &Value,
        what: &str,
        example: &str,
        secret: &str,
    ) -> Result<String, ConfigError> {
        let hint = format!(
            "write {} = \"{example}\" and export the {secret} in that variable",
            what.rsplit(' ').next().unwrap_or(what)
        );
        match v.get_ref() {
            toml::Value::String(s) if is_env_name(s) => Ok(s.clone()),
            toml::Value::String(_) => Err(self.err(
                &v.span(),
                format!(
                    "{what} must be the name of an environment variable (letters, digits and \"_\"), not the {secret} itself"
                ),
                Some(hint),
            )),
            other => Err(self.err(&v.span(), format!("{what} must be a string, not {}", kind(other)), Some(hint))),
        }
    }

    fn table_patterns(&self, v: &Value) -> Result<Vec<String>, ConfigError> {
        let example = "write tables = [\"public.*\"]";
        let toml::Value::Array(items) = v.get_ref() else {
            return Err(self.err(
                &v.span(),
                format!(
                    "[source] tables must be an array of strings, not {}",
                    describe(v.get_ref())
                ),
                Some(example.to_owned()),
            ));
        };
        if items.is_empty() {
            return Err(self.err(
                &v.span(),
                "[source] tables is empty, so there is nothing to replicate",
                Some(format!("{example}, or remove the key to use that default")),
            ));
        }
        items
            .iter()
            .map(|item| match item {
                toml::Value::String(s) => match split_table_name(s, true) {
                    Ok(_) => Ok(s.clone()),
                    Err(why) => Err(self.err(
                        &v.span(),
                        format!("invalid table pattern {s:?} in [source] tables: {why}"),
                        Some("write \"schema.table\", where \"*\" matches any part of a name, e.g. \"public.*\"".to_owned()),
                    )),
                },
                other => Err(self.err(
                    &v.span(),
                    format!("[source] tables must hold strings, not {}", describe(other)),
                    Some(example.to_owned()),
                )),
            })
            .collect()
    }

    /// `[target] schema`: one name, stored unquoted.
    fn schema_name(&self, v: &Value) -> Result<String, ConfigError> {
        let text = self.string(v, "[target] schema", "schema = \"public\"")?;
        match split_table_name(&text, false) {
            Ok((None, schema)) => Ok(schema),
            Ok((Some(_), _)) => Err(self.err(
                &v.span(),
                format!("invalid [target] schema {text:?}: it must be a single name"),
                Some("write schema = \"v2\"; double-quote a name that contains a dot".to_owned()),
            )),
            Err(why) => Err(self.err(
                &v.span(),
                format!("invalid [target] schema {text:?}: {why}"),
                Some("write schema = \"v2\"; double-quote names with other characters, e.g. '\"My Schema\"'".to_owned()),
            )),
        }
    }

    fn tables(
        &self,
        raw: &[Spanned<RawTable>],
        target_schema: Option<&str>,
    ) -> Result<Vec<TableSpec>, ConfigError> {
        let mut out = Vec::with_capacity(raw.len());
        let mut sources: HashMap<(String, String), usize> = HashMap::new();
        let mut targets: HashMap<(String, String), usize> = HashMap::new();
        for entry in raw {
            let header = entry.span();
            let line = self.line(&header);
            let t = entry.get_ref();
            let Some(source_v) = &t.source else {
                return Err(self.err(
                    &header,
                    "missing key \"source\" in [[table]]",
                    Some("add source = \"schema.table\" to this [[table]]".to_owned()),
                ));
            };
            let source = self.string(source_v, "[[table]] source", "source = \"public.orders\"")?;
            let source_parts = self.table_name(&source, source_v, "source")?;
            let source_name = (
                source_parts.0.unwrap_or_else(|| "public".to_owned()),
                source_parts.1,
            );

            let target = match &t.target {
                Some(v) => {
                    let text = self.string(v, "[[table]] target", "target = \"v2.orders\"")?;
                    self.table_name(&text, v, "target")?;
                    Some(text)
                }
                None => None,
            };
            let target_name = effective_target(&source_name, target.as_deref(), target_schema)
                .unwrap_or_else(|| source_name.clone());

            if let Some(first) = sources.insert(source_name.clone(), line) {
                return Err(self.err(
                    &source_v.span(),
                    format!(
                        "source table {} is mapped twice: here and by the [[table]] at line {first}",
                        show_table(&source_name)
                    ),
                    Some("keep one [[table]] entry per source table".to_owned()),
                ));
            }
            if let Some(first) = targets.insert(target_name.clone(), line) {
                let at = t.target.as_ref().map_or(header.clone(), Spanned::span);
                return Err(self.err(
                    &at,
                    format!(
                        "target table {} is mapped twice: here and by the [[table]] at line {first}",
                        show_table(&target_name)
                    ),
                    Some("map each target table from one source table; set target to tell them apart".to_owned()),
                ));
            }

            let mut columns = BTreeMap::new();
            let mut column_lines = BTreeMap::new();
            if let Some(cols) = &t.columns {
                let mut entries: Vec<_> = cols.get_ref().iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (key, value) in entries {
                    let column = key.get_ref();
                    self.column_name(column, &key.span())?;
                    let hint = Some(format!(
                        "write {} = \"source_column\" or an SQL expression over source columns",
                        toml_key(column)
                    ));
                    let expr = match value.get_ref() {
                        toml::Value::String(s) if !s.trim().is_empty() => s.clone(),
                        toml::Value::String(_) => {
                            return Err(self.err(
                                &value.span(),
                                format!("[table.columns] {} is empty", toml_key(column)),
                                hint,
                            ));
                        }
                        other => {
                            return Err(self.err(
                                &value.span(),
                                format!(
                                    "[table.columns] {} must be a string holding an SQL expression, not {}",
                                    toml_key(column),
                                    describe(other)
                                ),
                                hint,
                            ));
                        }
                    };
                    column_lines.insert(column.clone(), self.line(&key.span()));
                    columns.insert(column.clone(), expr);
                }
            }

            let filter_line = t.filter.as_ref().map(|v| self.line(&v.span()));
            let filter = match &t.filter {
                Some(v) => {
                    let text = self.string(v, "[[table]] where", "where = \"region = 'eu'\"")?;
                    if text.trim().is_empty() {
                        return Err(self.err(
                            &v.span(),
                            "[[table]] where is empty",
                            Some(
                                "remove it, or write a condition such as where = \"region = 'eu'\""
                                    .to_owned(),
                            ),
                        ));
                    }
                    Some(text)
                }
                None => None,
            };

            out.push(TableSpec {
                source,
                target,
                columns,
                filter,
                line,
                column_lines,
                filter_line,
            });
        }
        Ok(out)
    }

    fn table_name(
        &self,
        text: &str,
        v: &Value,
        key: &str,
    ) -> Result<(Option<String>, String), ConfigError> {
        split_table_name(text, false).map_err(|why| {
            self.err(
                &v.span(),
                format!("invalid table name {text:?} in [[table]] {key}: {why}"),
                Some("write schema.table or table; double-quote parts with other characters, e.g. 'public.\"Order Items\"'".to_owned()),
            )
        })
    }

    fn column_name(&self, column: &str, span: &Range<usize>) -> Result<(), ConfigError> {
        let hint = || Some("name each target column as the catalog spells it".to_owned());
        if column.is_empty() {
            return Err(self.err(span, "empty column name in [table.columns]", hint()));
        }
        if column.contains('\0') {
            return Err(self.err(
                span,
                "column name with a NUL character in [table.columns]",
                hint(),
            ));
        }
        if column.len() > MAX_IDENT_BYTES {
            return Err(self.err(
                span,
                format!(
                    "column name {} in [table.columns] is {} bytes long, PostgreSQL keeps at most {MAX_IDENT_BYTES}",
                    toml_key(column),
                    column.len()
                ),
                hint(),
            ));
        }
        Ok(())
    }

    fn snapshot(&self, raw: &RawSnapshot) -> Result<SnapshotSpec, ConfigError> {
        let mode = match &raw.mode {
            None => SnapshotMode::Initial,
            Some(v) => {
                let hint = Some(
                    "use \"initial\" (copy the tables, then stream) or \"never\" (stream only)"
                        .to_owned(),
                );
                match v.get_ref() {
                    toml::Value::String(s) if s == "initial" => SnapshotMode::Initial,
                    toml::Value::String(s) if s == "never" => SnapshotMode::Never,
                    toml::Value::String(s) => {
                        return Err(self.err(
                            &v.span(),
                            format!("invalid [snapshot] mode {s:?}"),
                            hint,
                        ));
                    }
                    other => {
                        return Err(self.err(
                            &v.span(),
                            format!("[snapshot] mode must be a string, not {}", describe(other)),
                            hint,
                        ));
                    }
                }
            }
        };
        let parallelism = match &raw.parallelism {
            None => DEFAULT_PARALLELISM,
            Some(v) => self.int_in(
                v,
                "[snapshot] parallelism",
                1,
                MAX_PARALLELISM,
                DEFAULT_PARALLELISM,
            )?,
        };
        let slot_wait = self.duration_or(
            raw.slot_wait.as_ref(),
            "[snapshot] slot_wait",
            DEFAULT_SLOT_WAIT,
        )?;
        let split_larger_than = self.split_larger_than(raw.split_larger_than.as_ref())?;
        Ok(SnapshotSpec {
            mode,
            parallelism,
            slot_wait,
            split_larger_than,
        })
    }

    /// `[snapshot] split_larger_than`: a size of at least [`MIN_SPLIT_LARGER_THAN`].
    fn split_larger_than(&self, value: Option<&Value>) -> Result<u64, ConfigError> {
        const WHAT: &str = "[snapshot] split_larger_than";
        let Some(v) = value else {
            return Ok(DEFAULT_SPLIT_LARGER_THAN);
        };
        let (primary, hint) = match v.get_ref() {
            toml::Value::String(s) => match parse_size(s) {
                Some(n) if n >= MIN_SPLIT_LARGER_THAN => return Ok(n),
                Some(_) => (
                    format!("{WHAT} must be at least 1MB, not \"{s}\""),
                    "write split_larger_than = \"1MB\" or more; tables smaller than that gain nothing from being split".to_owned(),
                ),
                None if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => (
                    format!("invalid size {} for {WHAT}", describe(v.get_ref())),
                    format!("write a number with a unit, e.g. \"{s}MB\""),
                ),
                None => (
                    format!("invalid size {} for {WHAT}", describe(v.get_ref())),
                    "write a whole number with a unit: \"512MB\", \"4GB\", \"1TB\"".to_owned(),
                ),
            },
            toml::Value::Integer(n) => (
                format!("invalid size {} for {WHAT}", describe(v.get_ref())),
                format!("write a string with a unit, e.g. \"{n}GB\""),
            ),
            other => (
                format!("invalid size {} for {WHAT}", describe(other)),
                "write a whole number with a unit: \"512MB\", \"4GB\", \"1TB\"".to_owned(),
            ),
        };
        Err(self.err(&v.span(), primary, Some(hint)))
    }

    /// `[verify] snapshot_max_age`: at least [`MIN_VERIFY_SNAPSHOT_MAX_AGE`], since a part
    /// of a comparison reads at least one chunk in its snapshot anyway.
    fn snapshot_max_age(&self, value: Option<&Value>) -> Result<Duration, ConfigError> {
        const WHAT: &str = "[verify] snapshot_max_age";
        let age = self.duration_or(value, WHAT, DEFAULT_VERIFY_SNAPSHOT_MAX_AGE)?;
        match value {
            Some(v) if age < MIN_VERIFY_SNAPSHOT_MAX_AGE => Err(self.err(
                &v.span(),
                format!("{WHAT} must be at least 1s, not {}", describe(v.get_ref())),
                Some("write snapshot_max_age = \"1s\" or more (the default is \"2m\")".to_owned()),
            )),
            _ => Ok(age),
        }
    }

    fn duration_or(
        &self,
        value: Option<&Value>,
        what: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = value else { return Ok(default) };
        let hint = match v.get_ref() {
            toml::Value::String(s) => match parse_duration(s) {
                Some(d) => return Ok(d),
                None if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()) => {
                    format!("write a number with a unit, e.g. \"{s}s\" for {s} seconds")
                }
                None => format!("write a number with a unit: {DURATION_FORMS}"),
            },
            toml::Value::Integer(0) => "write \"0\" (in quotes)".to_owned(),
            toml::Value::Integer(n) => {
                format!("write a string with a unit, e.g. \"{n}s\" for {n} seconds")
            }
            _ => format!("write a number with a unit: {DURATION_FORMS}"),
        };
        Err(self.err(
            &v.span(),
            format!("invalid duration {} for {what}", describe(v.get_ref())),
            Some(hint),
        ))
    }

    fn api(&self, raw: Option<&RawApi>) -> Result<ApiSpec, ConfigError> {
        let listen_v = raw.and_then(|a| a.listen.as_ref());
        let listen: SocketAddr = match listen_v {
            None => DEFAULT_LISTEN
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7432))),
            Some(v) => {
                let text = self.string(v, "[api] listen", "listen = \"127.0.0.1:7432\"")?;
                text.parse().map_err(|_| {
                    let hint = match text.strip_prefix("localhost:") {
                        Some(port) => format!("write listen = \"127.0.0.1:{port}\""),
                        None => "write an IP address and a port, e.g. listen = \"127.0.0.1:7432\""
                            .to_owned(),
                    };
                    self.err(
                        &v.span(),
                        format!("invalid address {text:?} for [api] listen"),
                        Some(hint),
                    )
                })?
            }
        };
        let token_env = match raw.and_then(|a| a.token_env.as_ref()) {
            Some(v) => Some(self.env_name(v, "[api] token_env", "CUTOVER_API_TOKEN", "token")?),
            None => None,
        };
        if let Some(v) = listen_v
            && !listen.ip().is_loopback()
            && token_env.is_none()
        {
            return Err(self.err(
                &v.span(),
                format!("[api] listen {listen} is reachable from other hosts, but no token_env is set"),
                Some("set token_env = \"CUTOVER_API_TOKEN\" so that requests need a token, or listen on 127.0.0.1".to_owned()),
            ));
        }
        Ok(ApiSpec { listen, token_env })
    }

    // ----- small readers ----------------------------------------------------------

    /// A string value; anything else is an error naming `what` (not a secret key).
    fn string(&self, v: &Value, what: &str, example: &str) -> Result<String, ConfigError> {
        match v.get_ref() {
            toml::Value::String(s) => Ok(s.clone()),
            other => Err(self.err(
                &v.span(),
                format!("{what} must be a string, not {}", describe(other)),
                Some(format!("write {example}")),
            )),
        }
    }

    fn nonempty_string(&self, v: &Value, what: &str, example: &str) -> Result<String, ConfigError> {
        let s = self.string(v, what, example)?;
        if s.trim().is_empty() {
            return Err(self.err(
                &v.span(),
                format!("{what} is empty"),
                Some(format!("write {example}, or remove the key")),
            ));
        }
        Ok(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Hit {
    Key,
    Value(&'static str),
}

/// Find the key or value of `doc` whose span is `span`, with its path.
fn locate(
    table: &DeTable<'_>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
) -> Option<(Vec<Seg>, Hit)> {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().to_string()));
        if key.span() == *span {
            return Some((path.clone(), Hit::Key));
        }
        if let Some(found) = locate_value(value, span, path) {
            return Some(found);
        }
        path.pop();
    }
    None
}

fn locate_value(
    value: &Spanned<DeValue<'_>>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
) -> Option<(Vec<Seg>, Hit)> {
    if value.span() == *span {
        return Some((path.clone(), Hit::Value(value.get_ref().type_str())));
    }
    match value.get_ref() {
        DeValue::Table(t) => locate(t, span, path),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(Seg::Index(i));
                if let Some(found) = locate_value(item, span, path) {
                    return Some(found);
                }
                path.pop();
            }
            None
        }
        _ => None,
    }
}

/// Which table of [`KEYS`] a path leads to.
fn section_of(parent: &[Seg]) -> &'static str {
    match parent {
        [] => "",
        [Seg::Key(t), Seg::Index(_)] if t == "table" => "table",
        [Seg::Key(s)] => KEYS
            .iter()
            .map(|(name, _)| *name)
            .find(|name| !name.is_empty() && *name != "table" && name == s)
            .unwrap_or(""),
        _ => "",
    }
}

fn keys_of(section: &str) -> &'static [&'static str] {
    KEYS.iter()
        .find(|(name, _)| *name == section)
        .map_or(&[], |(_, keys)| *keys)
}

/// Where `key` belongs when it is not valid in `section`: `""` for the top level,
/// else the sections that take it (`[source] or [target]`).
fn home_of(section: &str, key: &str) -> Option<String> {
    let homes: Vec<&str> = KEYS
        .iter()
        .filter(|(name, keys)| *name != section && keys.contains(&key))
        .map(|(name, _)| *name)
        .collect();
    if homes.contains(&"") {
        return Some(String::new());
    }
    if homes.is_empty() {
        return None;
    }
    Some(
        homes
            .iter()
            .map(|s| show_section(s))
            .collect::<Vec<_>>()
            .join(" or "),
    )
}

fn show_section(section: &str) -> String {
    match section {
        "table" => "[[table]]".to_owned(),
        s => format!("[{s}]"),
    }
}

fn show_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&k.escape_debug().to_string());
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    if out.is_empty() {
        "the document".to_owned()
    } else {
        out
    }
}

fn with_article(type_str: &str) -> &'static str {
    match type_str {
        "string" => "a string",
        "integer" => "an integer",
        "float" => "a float",
        "boolean" => "a boolean",
        "datetime" => "a date-time",
        "array" => "an array",
        "table" => "a table",
        _ => "a value of another type",
    }
}

fn single_table(found: &'static str) -> &'static str {
    if found == "a table" {
        "a single table"
    } else {
        found
    }
}

/// A key as it would be written in TOML: bare when possible, else quoted.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        key.to_owned()
    } else {
        format!("{key:?}")
    }
}

fn lower_first(message: &str) -> String {
    let mut chars = message.chars();
    match (chars.next(), chars.next()) {
        (Some(a), Some(b)) if a.is_uppercase() && !b.is_uppercase() => a
            .to_lowercase()
            .chain(std::iter::once(b))
            .chain(chars)
            .collect(),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KEYS` (used for suggestions) lists exactly the fields serde accepts.
    #[test]
    fn keys_match_the_raw_structs() {
        for (section, keys) in KEYS {
            let doc = match *section {
                "" => "zz_unknown = 1\n".to_owned(),
                "table" => "[[table]]\nzz_unknown = 1\n".to_owned(),
                s => format!("[{s}]\nzz_unknown = 1\n"),
            };
            let e = match toml::from_str::<RawJob>(&doc) {
                Ok(_) => panic!("{doc:?} parsed"),
                Err(e) => e,
            };
            let listed: Vec<&str> = e
                .message()
                .split_once("expected ")
                .map(|(_, rest)| rest)
                .unwrap_or("")
                .trim_start_matches("one of ")
                .split(", ")
                .flat_map(|k| k.split(" or "))
                .map(|k| k.trim_matches('`'))
                .collect();
            assert_eq!(&listed, keys, "section {section:?}: {}", e.message());
        }
    }

    #[test]
    fn lower_first_keeps_acronyms() {
        assert_eq!(lower_first("Invalid key"), "invalid key");
        assert_eq!(lower_first("TOML is bad"), "TOML is bad");
        assert_eq!(lower_first(""), "");
    }
}
