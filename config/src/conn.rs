//! Connection strings: libpq URLs and key=value conninfo, parsed the way libpq does.
//!
//! DBAs paste connection strings from `psql` and expect them to mean the same here,
//! so the grammar follows libpq (`conninfo_uri_parse` and `conninfo_parse` in
//! `fe-connect.c`): percent-decoding in URLs, single quotes and backslash escapes in
//! key=value strings, `?host=/dir` for unix sockets, later settings overriding earlier
//! ones, and the password looked up in `PGPASSWORD` and then the password file, which
//! is ignored when group or world can read it.
//!
//! Two things differ on purpose:
//!
//! * Parameters that would change security if silently dropped (`sslrootcert`,
//!   `channel_binding`, `require_auth`, `service`, `hostaddr`, ...) are refused rather
//!   than ignored: cutover's clients cannot honor them. Harmless tuning parameters
//!   (`application_name`, keepalives, ...) are accepted and ignored. Anything else is a
//!   typo and an error.
//! * Error messages never echo any part of the string. A URL holds a password, and a
//!   malformed one (an unencoded `@` or `/` in the password, an unquoted space in a
//!   key=value password) moves pieces of the password into the host, port or keyword
//!   positions. Messages therefore say which part is wrong, not what it holds; the
//!   only text they repeat is a parameter keyword, and not even that right after an
//!   unquoted password.
//!
//! [`ConnSpec::resolve`] is the only function in this crate that reads the
//! environment; [`ConnSpec::resolve_with`] takes the environment as a function so that
//! tests (and callers with their own configuration sources) do not touch process state.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{ConfigError, nearest};
use crate::secret::Secret;
use crate::spec::{ConnOrigin, ConnParams, ConnSpec, SslMode};

/// Parameters cutover uses.
const USED: &[&str] = &[
    "host",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "options",
    "connect_timeout",
    "passfile",
];

/// libpq parameters that cutover accepts and ignores: they tune or label a
/// connection but do not change whom we talk to or how safely.
const IGNORED: &[&str] = &[
    "application_name",
    "fallback_application_name",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "target_session_attrs",
    "load_balance_hosts",
    "sslcompression",
    "sslnegotiation",
    "sslsni",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "replication",
];

/// libpq parameters that cutover refuses: ignoring them would connect somewhere else
/// or with weaker checks than the user asked for.
const UNSUPPORTED: &[&str] = &[
    "hostaddr",
    "service",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
    "sslkeylogfile",
    "requirepeer",
    "channel_binding",
    "require_auth",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "min_protocol_version",
    "max_protocol_version",
    "gssdelegation",
    "scram_client_key",
    "scram_server_key",
    "oauth_issuer",
    "oauth_client_id",
    "oauth_client_secret",
    "oauth_scope",
];

const URL_EXAMPLE: &str = "\"postgresql://user@host:5432/db\"";

/// What is wrong with a connection string: a description that holds no part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnError {
    pub(crate) detail: String,
    pub(crate) hint: Option<String>,
}

fn bad(detail: impl Into<String>, hint: Option<&str>) -> ConnError {
    ConnError {
        detail: detail.into(),
        hint: hint.map(str::to_owned),
    }
}

/// The settings a connection string spells out, before defaults and the environment.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) host: Option<String>,
    pub(crate) port: Option<u16>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) dbname: Option<String>,
    pub(crate) sslmode: Option<SslMode>,
    pub(crate) options: Option<String>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) passfile: Option<String>,
}

/// Parse a libpq URL or key=value string. Pure.
pub(crate) fn parse_conn(text: &str) -> Result<Parsed, ConnError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(bad(
            "it is empty",
            Some(&format!("write url = {URL_EXAMPLE}")),
        ));
    }
    for prefix in ["postgresql://", "postgres://"] {
        if let Some(rest) = strip_prefix_ignore_case(trimmed, prefix) {
            return parse_url(rest);
        }
    }
    if strip_prefix_ignore_case(trimmed, "jdbc:").is_some() {
        return Err(bad(
            "JDBC URLs are not supported",
            Some("remove the \"jdbc:\" prefix and pass user and password in the URL itself"),
        ));
    }
    if trimmed.contains("://") {
        return Err(bad(
            "the URL scheme must be postgresql:// or postgres://",
            Some(&format!("write url = {URL_EXAMPLE}")),
        ));
    }
    if trimmed.contains('=') {
        return parse_keyword_value(trimmed);
    }
    Err(bad(
        "it is neither a postgresql:// URL nor a key=value connection string",
        Some(&format!(
            "write url = {URL_EXAMPLE} or \"host=... port=... dbname=... user=...\""
        )),
    ))
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

fn parse_url(rest: &str) -> Result<Parsed, ConnError> {
    let mut parsed = Parsed::default();
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    let (netloc, path) = match before_query.split_once('/') {
        Some((n, p)) => (n, Some(p)),
        None => (before_query, None),
    };
    let hostspec = match netloc.split_once('@') {
        Some((userspec, hostspec)) => {
            let (user, password) = match userspec.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userspec, None),
            };
            parsed.set("user", &decode(user, "user name")?, false)?;
            if let Some(password) = password {
                parsed.set("password", &decode(password, "password")?, false)?;
            }
            hostspec
        }
        None => netloc,
    };
    if hostspec.contains(',') {
        return Err(multiple_hosts());
    }
    let (host, port) = if let Some(v6) = hostspec.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(bad(
                "an IPv6 address in brackets is not closed with \"]\"",
                Some("write the host as [::1]:5432"),
            ));
        };
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(port) => Some(port),
                None => {
                    return Err(bad(
                        "unexpected text after an IPv6 address",
                        Some("write the host as [::1]:5432"),
                    ));
                }
            },
        };
        (addr.to_owned(), port)
    } else {
        match hostspec.split_once(':') {
            Some((h, p)) => (decode(h, "host")?, Some(p)),
            None => (decode(hostspec, "host")?, None),
        }
    };
    parsed.set("host", &host, false)?;
    if let Some(port) = port {
        parsed.set("port", &decode(port, "port")?, false)?;
    }
    if let Some(path) = path {
        parsed.set("dbname", &decode(path, "database name")?, false)?;
    }
    if let Some(query) = query {
        let mut after_password = false;
        for pair in query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let Some((key, value)) = pair.split_once('=') else {
                return Err(bad(
                    "a parameter after \"?\" has no \"=\"",
                    Some(
                        "write parameters as ?key=value&key=value, and percent-encode \"&\" and \"=\" inside values",
                    ),
                ));
            };
            if value.contains('=') {
                return Err(bad(
                    "a parameter after \"?\" has more than one \"=\"",
                    Some("percent-encode \"=\" inside values as %3D"),
                ));
            }
            let key = decode(key, "parameter name")?;
            let value = decode(value, "parameter value")?;
            let (key, value) = if key == "ssl" && value == "true" {
                ("sslmode".to_owned(), "require".to_owned())
            } else {
                (key, value)
            };
            parsed.set(&key, &value, after_password)?;
            after_password = key == "password";
        }
    }
    Ok(parsed)
}

fn multiple_hosts() -> ConnError {
    bad(
        "it lists more than one host; cutover connects to exactly one server",
        Some("name the primary's host only"),
    )
}

/// libpq's percent-decoding: `%XX` only, `%00` refused, no `+` for space.
fn decode(text: &str, part: &str) -> Result<String, ConnError> {
    if !text.contains('%') {
        return Ok(text.to_owned());
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) else {
                return Err(bad(
                    format!("the {part} has an invalid percent-encoding"),
                    Some("write \"%\" as %25; every \"%\" must be followed by two hex digits"),
                ));
            };
            if byte == 0 {
                return Err(bad(
                    format!("the {part} contains %00, which is not allowed"),
                    None,
                ));
            }
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        bad(
            format!("the {part} is not valid UTF-8 after percent-decoding"),
            None,
        )
    })
}

/// libpq's key=value grammar: `key = value` pairs separated by white space; a value
/// is bare (up to white space, `\` escapes the next character) or in single quotes
/// (`\'` and `\\` escape).
fn parse_keyword_value(text: &str) -> Result<Parsed, ConnError> {
    let mut parsed = Parsed::default();
    let mut chars = text.chars().peekable();
    let mut after_bare_password = false;
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|&c| !c.is_whitespace() && c != '=') {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(if after_bare_password {
                text_after_password()
            } else if known(&key) {
                bad(
                    format!("missing \"=\" after \"{key}\""),
                    Some("write key=value pairs separated by spaces"),
                )
            } else {
                bad(
                    "missing \"=\" after a word",
                    Some(
                        "write key=value pairs separated by spaces, and quote values that contain spaces: password='...'",
                    ),
                )
            });
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.peek() == Some(&'\'');
        if quoted {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(bad(
                            "a single-quoted value is not closed",
                            Some("end the value with ' and write a quote inside it as \\'"),
                        ));
                    }
                    Some('\\') => {
                        if let Some(c) = chars.next() {
                            value.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key == "dbname" && (value.contains('=') || value.contains("://")) {
            return Err(bad(
                "dbname holds a connection string, which cutover does not expand",
                Some("write the whole connection string as the url"),
            ));
        }
        parsed.set(&key, &value, after_bare_password)?;
        after_bare_password = key == "password" && !quoted;
    }
    Ok(parsed)
}

fn text_after_password() -> ConnError {
    bad(
        "unexpected text after the password",
        Some("quote a password that contains spaces: password='...', with \\' for a quote"),
    )
}

fn known(key: &str) -> bool {
    USED.contains(&key) || IGNORED.contains(&key) || UNSUPPORTED.contains(&key)
}

impl Parsed {
    /// Apply one parameter. Values are never echoed. `after_password`: the previous
    /// token was a password that may have run into this one, so an unknown keyword
    /// may be a piece of it and is not echoed either.
    fn set(&mut self, key: &str, value: &str, after_password: bool) -> Result<(), ConnError> {
        let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
        match key {
            "host" => {
                if value.contains(',') {
                    return Err(multiple_hosts());
                }
                if value.contains('@') {
                    return Err(bad(
                        "the host contains \"@\"",
                        Some("percent-encode \"@\" in the user name or password as %40"),
                    ));
                }
                if value.contains(char::is_whitespace) {
                    return Err(bad("the host contains white space", None));
                }
                self.host = text(value);
            }
            "port" => {
                if value.contains(',') {
                    return Err(multiple_hosts());
                }
                self.port = if value.is_empty() {
                    None
                } else {
                    match value.parse::<u16>() {
                        Ok(port) if port > 0 => Some(port),
                        _ => {
                            return Err(bad(
                                "the port is not a number from 1 to 65535",
                                Some(
                                    "write host:5432; percent-encode \"/\", \"@\" and \":\" in passwords",
                                ),
                            ));
                        }
                    }
                };
            }
            "user" => self.user = text(value),
            "password" => self.password = text(value).map(Secret::new),
            "dbname" => self.dbname = text(value),
            "options" => self.options = text(value),
            "passfile" => self.passfile = text(value),
            "sslmode" => {
                self.sslmode = Some(match value {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    "allow" => {
                        return Err(bad(
                            "sslmode \"allow\" is not supported",
                            Some("use \"prefer\", or \"disable\" to never use SSL"),
                        ));
                    }
                    _ => {
                        return Err(bad(
                            "sslmode must be one of disable, prefer, require, verify-ca, verify-full",
                            Some(
                                "write sslmode=verify-full to check the server's certificate and name",
                            ),
                        ));
                    }
                });
            }
            "connect_timeout" => {
                let Ok(seconds) = value.trim().parse::<i64>() else {
                    return Err(bad(
                        "connect_timeout must be a whole number of seconds",
                        Some("write connect_timeout=10"),
                    ));
                };
                // libpq: zero or negative waits forever, and less than 2 s means 2 s.
                self.connect_timeout =
                    (seconds > 0).then(|| Duration::from_secs(seconds.max(2) as u64));
            }
            "gssencmode" if value == "require" => {
                return Err(bad(
                    "gssencmode=require is not supported: cutover does not use GSSAPI encryption",
                    Some("use sslmode=verify-full for an encrypted connection"),
                ));
            }
            _ if IGNORED.contains(&key) => {}
            _ if UNSUPPORTED.contains(&key) => {
                let hint = match key {
                    "hostaddr" => "put the address in host instead",
                    "service" => "write the service's settings into the url",
                    _ => {
                        "remove it; cutover cannot honor it, and ignoring it could weaken the connection's checks"
                    }
                };
                return Err(bad(
                    format!("parameter \"{key}\" is not supported by cutover"),
                    Some(hint),
                ));
            }
            _ if after_password => return Err(text_after_password()),
            _ => {
                let all: Vec<&str> = USED
                    .iter()
                    .chain(IGNORED)
                    .chain(UNSUPPORTED)
                    .copied()
                    .collect();
                let hint = match nearest(key, &all) {
                    Some(near) => format!("did you mean \"{near}\"?"),
                    None => "see the libpq connection parameters; cutover uses host, port, user, password, dbname, sslmode, options, connect_timeout and passfile".to_owned(),
                };
                let shown: String = key.chars().take(40).collect();
                return Err(ConnError {
                    detail: format!("unknown parameter \"{}\"", shown.escape_debug()),
                    hint: Some(hint),
                });
            }
        }
        Ok(())
    }
}

impl ConnSpec {
    /// A connection given in code rather than in a job file.
    pub fn new(url: impl Into<String>, password_env: Option<String>) -> Self {
        Self {
            url: Secret::new(url),
            password_env,
            origin: ConnOrigin::default(),
        }
    }

    /// `host:port/dbname` as far as the URL itself says (`localhost`, `5432` and the
    /// user name standing in for what it leaves out), safe to print. No environment
    /// is read; use [`ConnParams::endpoint`] after [`ConnSpec::resolve`] for the
    /// settings actually used.
    pub fn endpoint(&self) -> String {
        match parse_conn(self.url.expose()) {
            Ok(p) => format!(
                "{}:{}/{}",
                p.host.as_deref().unwrap_or("localhost"),
                p.port.unwrap_or(5432),
                p.dbname
                    .as_deref()
                    .or(p.user.as_deref())
                    .unwrap_or("(default)")
            ),
            Err(_) => "(invalid url)".to_owned(),
        }
    }

    /// Everything needed to connect, with libpq's defaults and password lookup,
    /// read from the process environment. See [`ConnSpec::resolve_with`].
    pub fn resolve(&self) -> Result<ConnParams, ConfigError> {
        self.resolve_with(|name| std::env::var(name).ok())
    }

    /// Like [`ConnSpec::resolve`], with `env` standing in for the process environment.
    ///
    /// Defaults: host `localhost`; port `PGPORT`, else 5432; user `PGUSER`, else
    /// `USER`, else `postgres`; database the user name; sslmode `prefer`. The password
    /// comes from the first of: the variable named by `password_env` (an error if it
    /// is unset or empty), the url, `PGPASSWORD`, the password file (`passfile` in the
    /// url, else `PGPASSFILE`, else `$HOME/.pgpass`; skipped when group or world can
    /// read it, as libpq does).
    pub fn resolve_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ConnParams, ConfigError> {
        let origin = &self.origin;
        let parsed = parse_conn(self.url.expose()).map_err(|e| url_error(origin, e))?;
        let env_nonempty = |name: &str| env(name).filter(|v| !v.is_empty());

        let host = parsed
            .host
            .clone()
            .unwrap_or_else(|| "localhost".to_owned());
        let port = match (parsed.port, env_nonempty("PGPORT")) {
            (Some(port), _) => port,
            (None, Some(text)) => match text.trim().parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => {
                    return Err(ConfigError::new(
                        &origin.file,
                        origin.url_line,
                        format!(
                            "environment variable PGPORT is not a port number, and {} url sets no port",
                            origin.section
                        ),
                        Some("set PGPORT to a number from 1 to 65535, unset it, or put the port in the url".to_owned()),
                    ));
                }
            },
            (None, None) => 5432,
        };
        let user = parsed
            .user
            .clone()
            .or_else(|| env_nonempty("PGUSER"))
            .or_else(|| env_nonempty("USER"))
            .unwrap_or_else(|| "postgres".to_owned());
        let dbname = parsed.dbname.clone().unwrap_or_else(|| user.clone());

        let password = if let Some(var) = &self.password_env {
            match env(var) {
                Some(value) if !value.is_empty() => Some(Secret::new(value)),
                found => {
                    let state = if found.is_some() {
                        "is empty"
                    } else {
                        "is not set"
                    };
                    return Err(ConfigError::new(
                        &origin.file,
                        origin.password_env_line.or(origin.url_line),
                        format!(
                            "environment variable {var} named by {} password_env {state}",
                            origin.section
                        ),
                        Some(format!(
                            "export {var} with the password before starting cutover, or remove password_env to use PGPASSWORD or ~/.pgpass"
                        )),
                    ));
                }
            }
        } else if let Some(password) = parsed.password.clone() {
            Some(password)
        } else if let Some(password) = env_nonempty("PGPASSWORD") {
            Some(Secret::new(password))
        } else {
            let file = parsed
                .passfile
                .clone()
                .or_else(|| env_nonempty("PGPASSFILE"))
                .map(PathBuf::from)
                .or_else(|| env_nonempty("HOME").map(|home| Path::new(&home).join(".pgpass")));
            file.and_then(|file| passfile_lookup(&file, &host, port, &dbname, &user))
        };

        Ok(ConnParams {
            host,
            port,
            user,
            dbname,
            password,
            sslmode: parsed.sslmode.unwrap_or(SslMode::Prefer),
            options: parsed.options,
            connect_timeout: parsed.connect_timeout,
        })
    }
}

/// A connection-string problem as a [`ConfigError`] at the `url` key.
pub(crate) fn url_error(origin: &ConnOrigin, e: ConnError) -> ConfigError {
    ConfigError::new(
        &origin.file,
        origin.url_line,
        format!("invalid {} url: {}", origin.section, e.detail),
        e.hint,
    )
}

/// Read the password file if it is safe to, and find the password for a connection.
fn passfile_lookup(file: &Path, host: &str, port: u16, dbname: &str, user: &str) -> Option<Secret> {
    let meta = std::fs::metadata(file).ok()?;
    if !meta.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // libpq ignores a password file that group or others can read or write.
        if meta.permissions().mode() & 0o077 != 0 {
            return None;
        }
    }
    let bytes = std::fs::read(file).ok()?;
    passfile_match(&String::from_utf8_lossy(&bytes), host, port, dbname, user)
}

/// The password of the first line of a libpq password file that matches.
///
/// Lines are `host:port:database:user:password`; `#` starts a comment line; a field
/// that is exactly `*` matches anything; `\` escapes the next character (`\:`,
/// `\\`); the password ends at the next unescaped `:`. A unix socket directory that
/// is one of the usual defaults also matches the host `localhost`, as in libpq.
pub(crate) fn passfile_match(
    content: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<Secret> {
    let port = port.to_string();
    let hosts: &[&str] = if matches!(host, "/tmp" | "/var/run/postgresql" | "/run/postgresql") {
        &[host, "localhost"]
    } else {
        &[host]
    };
    for line in content.lines() {
        let line = line.trim_end_matches('\r');
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields = split_passfile_line(line);
        let [h, p, d, u, password, ..] = fields.as_slice() else {
            continue;
        };
        let matches = |field: &Field, value: &str| field.star || field.text == value;
        if hosts.iter().any(|candidate| matches(h, candidate))
            && matches(p, &port)
            && matches(d, dbname)
            && matches(u, user)
        {
            return (!password.text.is_empty()).then(|| Secret::new(password.text.clone()));
        }
    }
    None
}

struct Field {
    text: String,
    /// Written as a bare `*`: matches anything.
    star: bool,
}

fn split_passfile_line(line: &str) -> Vec<Field> {
    let mut fields = Vec::new();
    let mut text = String::new();
    let mut escaped_any = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                escaped_any = true;
                if let Some(next) = chars.next() {
                    text.push(next);
                }
            }
            ':' => {
                fields.push(Field {
                    star: text == "*" && !escaped_any,
                    text: std::mem::take(&mut text),
                });
                escaped_any = false;
            }
            c => text.push(c),
        }
    }
    fields.push(Field {
        star: text == "*" && !escaped_any,
        text,
    });
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const CANARY: &str = "Canary-pw_7f3a";

    fn parse(text: &str) -> Parsed {
        match parse_conn(text) {
            Ok(p) => p,
            Err(e) => panic!("{text:?}: {e:?}"),
        }
    }

    fn err(text: &str) -> ConnError {
        match parse_conn(text) {
            Ok(p) => panic!("{text:?} parsed: {p:?}"),
            Err(e) => e,
        }
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn spec(url: &str) -> ConnSpec {
        ConnSpec::new(url, None)
    }

    #[test]
    fn full_url() {
        let p = parse(
            "postgresql://rep:s%40cret@db.example.com:6432/shop?sslmode=verify-full&options=-c%20search_path%3Dv2&connect_timeout=10&application_name=x",
        );
        assert_eq!(p.host.as_deref(), Some("db.example.com"));
        assert_eq!(p.port, Some(6432));
        assert_eq!(p.user.as_deref(), Some("rep"));
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("s@cret"));
        assert_eq!(p.dbname.as_deref(), Some("shop"));
        assert_eq!(p.sslmode, Some(SslMode::VerifyFull));
        assert_eq!(p.options.as_deref(), Some("-c search_path=v2"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(10)));
    }

    #[test]
    fn url_variants() {
        let p = parse("postgres://");
        assert_eq!(p, Parsed::default());
        let p = parse("postgresql:///shop?host=/var/run/postgresql&port=5433");
        assert_eq!(p.host.as_deref(), Some("/var/run/postgresql"));
        assert_eq!(p.port, Some(5433));
        assert_eq!(p.dbname.as_deref(), Some("shop"));
        let p = parse("postgresql://%2Ftmp%2Fpg/db");
        assert_eq!(p.host.as_deref(), Some("/tmp/pg"));
        let p = parse("postgresql://[::1]:5433/db");
        assert_eq!(p.host.as_deref(), Some("::1"));
        assert_eq!(p.port, Some(5433));
        let p = parse("postgresql://[2001:db8::1]/db");
        assert_eq!(p.host.as_deref(), Some("2001:db8::1"));
        assert_eq!(p.port, None);
        let p = parse("POSTGRESQL://u@h?ssl=true");
        assert_eq!(p.sslmode, Some(SslMode::Require));
        assert_eq!(p.user.as_deref(), Some("u"));
        // Query parameters override the parts before them, as in libpq.
        let p = parse("postgresql://a@h/db1?user=b&dbname=db2&password=p%26q");
        assert_eq!(p.user.as_deref(), Some("b"));
        assert_eq!(p.dbname.as_deref(), Some("db2"));
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("p&q"));
        let p = parse("postgresql://u:@h");
        assert_eq!(p.password, None, "an empty password is no password");
        let p = parse("postgresql://u@h?connect_timeout=1");
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(2)));
        let p = parse("postgresql://u@h?connect_timeout=0");
        assert_eq!(p.connect_timeout, None);
        let p = parse("postgresql://caf%C3%A9@h");
        assert_eq!(p.user.as_deref(), Some("café"));
    }

    #[test]
    fn url_errors() {
        assert!(err("postgresql://u@h:99999/db").detail.contains("port"));
        assert!(err("postgresql://u@h:abc/db").detail.contains("port"));
        assert!(
            err("postgresql://h1,h2/db")
                .detail
                .contains("more than one host")
        );
        assert!(
            err("postgresql://u@h/db?foo=1")
                .detail
                .contains("unknown parameter \"foo\"")
        );
        assert_eq!(
            err("postgresql://u@h/db?sslmod=require").hint.as_deref(),
            Some("did you mean \"sslmode\"?")
        );
        assert!(
            err("postgresql://u@h/db?sslrootcert=/x")
                .detail
                .contains("not supported")
        );
        assert!(
            err("postgresql://u@h/db?sslmode=allow")
                .detail
                .contains("allow")
        );
        assert!(
            err("postgresql://u@h/db?sslmode=bogus")
                .detail
                .contains("sslmode")
        );
        assert!(
            err("postgresql://u@h/db?ssl=false")
                .detail
                .contains("unknown parameter")
        );
        assert!(err("postgresql://u@h/d%zzb").detail.contains("percent"));
        assert!(err("postgresql://u@h/d%00b").detail.contains("%00"));
        assert!(err("postgresql://u@h/db?x").detail.contains("no \"=\""));
        assert!(err("postgresql://u@[::1/db").detail.contains("IPv6"));
        assert!(
            err("postgresql://u@h/db?gssencmode=require")
                .detail
                .contains("gssencmode")
        );
        assert!(err("jdbc:postgresql://h/db").detail.contains("JDBC"));
        assert!(err("mysql://h/db").detail.contains("scheme"));
        assert!(err("shop").detail.contains("neither"));
        assert!(err("   ").detail.contains("empty"));
        assert!(
            err("postgresql://u@h/db?connect_timeout=soon")
                .detail
                .contains("connect_timeout")
        );
    }

    #[test]
    fn keyword_value() {
        let p = parse(
            r"host=/tmp port = 5433 user=rep password='it\'s a \\ secret' dbname=shop sslmode=require options='-c x=1' connect_timeout=5 application_name=a",
        );
        assert_eq!(p.host.as_deref(), Some("/tmp"));
        assert_eq!(p.port, Some(5433));
        assert_eq!(p.user.as_deref(), Some("rep"));
        assert_eq!(
            p.password.as_ref().map(Secret::expose),
            Some(r"it's a \ secret")
        );
        assert_eq!(p.dbname.as_deref(), Some("shop"));
        assert_eq!(p.sslmode, Some(SslMode::Require));
        assert_eq!(p.options.as_deref(), Some("-c x=1"));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(5)));
        let p = parse(r"password=a\ b user=''");
        assert_eq!(p.password.as_ref().map(Secret::expose), Some("a b"));
        assert_eq!(p.user, None);
        let p = parse("host=a host=b");
        assert_eq!(p.host.as_deref(), Some("b"), "later settings win");
    }

    #[test]
    fn keyword_value_errors() {
        assert!(
            err("host=a bogus=1")
                .detail
                .contains("unknown parameter \"bogus\"")
        );
        assert!(
            err("host=a port")
                .detail
                .contains("missing \"=\" after \"port\"")
        );
        assert!(err("password='abc").detail.contains("not closed"));
        assert!(err("dbname='host=x'").detail.contains("dbname"));
        assert!(err("host=a,b").detail.contains("more than one host"));
    }

    #[test]
    fn errors_never_echo_the_password() {
        let cases = [
            format!("postgresql://u:{CANARY}@h:5432/db?foo=1"),
            format!("postgresql://u:{CANARY}/x@h/db"),
            format!("postgresql://u:{CANARY}@x@h/db"),
            format!("postgresql://u:{CANARY}?@h/db"),
            format!("postgresql://u:%zz{CANARY}@h/db"),
            format!("postgresql://u@h/db?password={CANARY}&{CANARY}"),
            format!("postgresql://u@h/db?password=a&{CANARY}=b"),
            format!("host=h password=a {CANARY}=b"),
            format!("host=h password=a {CANARY}"),
            format!("host=h password={CANARY} {CANARY}"),
            format!("host=h password='{CANARY}"),
            format!("host=h port={CANARY}"),
            format!("host={CANARY}@h"),
            CANARY.to_string(),
            format!("jdbc:postgresql://h/db?password={CANARY}"),
            format!("postgresql://u:{CANARY}@h1,h2/db"),
        ];
        for url in &cases {
            let e = match parse_conn(url) {
                Err(e) => e,
                Ok(p) => panic!("{url:?} parsed: {p:?}"),
            };
            let shown = format!("{e:?} {}", url_error(&ConnOrigin::default(), e.clone()));
            assert!(!shown.contains(CANARY), "{url:?} leaked: {shown}");
            assert!(!shown.contains(&CANARY[..6]), "{url:?} leaked: {shown}");
            let r = spec(url).resolve_with(env(&[])).map(|_| ()).unwrap_err();
            assert!(!format!("{r} {r:?}").contains(CANARY));
        }
    }

    #[test]
    fn resolve_defaults_and_env() {
        let p = spec("postgresql://").resolve_with(env(&[])).unwrap();
        assert_eq!(p.host, "localhost");
        assert_eq!(p.port, 5432);
        assert_eq!(p.user, "postgres");
        assert_eq!(p.dbname, "postgres");
        assert_eq!(p.sslmode, SslMode::Prefer);
        assert_eq!(p.password, None);
        assert_eq!(p.endpoint(), "localhost:5432/postgres");

        let e = env(&[("PGPORT", "6543"), ("PGUSER", "alice"), ("USER", "bob")]);
        let p = spec("host=h").resolve_with(e).unwrap();
        assert_eq!(
            (p.port, p.user.as_str(), p.dbname.as_str()),
            (6543, "alice", "alice")
        );
        let p = spec("host=h")
            .resolve_with(env(&[("USER", "bob")]))
            .unwrap();
        assert_eq!(p.user, "bob");
        let p = spec("postgresql://h:1234/db")
            .resolve_with(env(&[("PGPORT", "6543")]))
            .unwrap();
        assert_eq!(p.port, 1234);
        let err = spec("host=h")
            .resolve_with(env(&[("PGPORT", "x")]))
            .unwrap_err();
        assert!(err.primary().contains("PGPORT"), "{err}");
    }

    #[test]
    fn password_precedence() {
        let with_env = ConnSpec::new(
            format!("postgresql://u:{CANARY}@h/db"),
            Some("SRC_PW".into()),
        );
        let all = env(&[
            ("SRC_PW", "from-env-var"),
            ("PGPASSWORD", "from-pgpassword"),
        ]);
        let p = with_env.resolve_with(&all).unwrap();
        assert_eq!(
            p.password.as_ref().map(Secret::expose),
            Some("from-env-var")
        );
        let p = spec(&format!("postgresql://u:{CANARY}@h/db"))
            .resolve_with(&all)
            .unwrap();
        assert_eq!(p.password.as_ref().map(Secret::expose), Some(CANARY));
        let p = spec("postgresql://u@h/db").resolve_with(&all).unwrap();
        assert_eq!(
            p.password.as_ref().map(Secret::expose),
            Some("from-pgpassword")
        );

        // password_env set but the variable is missing or empty: an error naming the
        // variable only.
        for e in [env(&[]), env(&[("SRC_PW", "")])] {
            let err = with_env.resolve_with(e).unwrap_err();
            let text = err.to_string();
            assert!(text.contains("SRC_PW"), "{text}");
            assert!(!text.contains(CANARY), "{text}");
        }
        let debug = format!("{:?} {:?}", with_env, with_env.resolve_with(&all).unwrap());
        assert!(
            !debug.contains(CANARY) && !debug.contains("from-env-var"),
            "{debug}"
        );
    }

    #[test]
    fn passfile_matching() {
        let content = "\
# comment
other:5432:shop:rep:wrong
db.example.com:5432:shop:rep:exact
*:6432:*:rep:any-host
db\\:x:5432:*:*:escaped\\:colon\\\\:trailing
\\*:5432:*:*:literal-star
localhost:5432:*:local:socket
";
        let get = |h: &str, p: u16, d: &str, u: &str| {
            passfile_match(content, h, p, d, u).map(|s| s.expose().to_owned())
        };
        assert_eq!(
            get("db.example.com", 5432, "shop", "rep").as_deref(),
            Some("exact")
        );
        assert_eq!(
            get("anything", 6432, "x", "rep").as_deref(),
            Some("any-host")
        );
        assert_eq!(get("anything", 6432, "x", "other"), None);
        assert_eq!(
            get("db:x", 5432, "d", "u").as_deref(),
            Some("escaped:colon\\")
        );
        assert_eq!(get("*", 5432, "d", "u").as_deref(), Some("literal-star"));
        assert_eq!(
            get("elsewhere", 5432, "d", "u"),
            None,
            "an escaped * is no wildcard"
        );
        assert_eq!(
            get("/var/run/postgresql", 5432, "d", "local").as_deref(),
            Some("socket")
        );
        assert_eq!(get("/srv/sock", 5432, "d", "local"), None);
        assert_eq!(
            passfile_match("a:1:b:c", "a", 1, "b", "c"),
            None,
            "too few fields"
        );
    }

    #[cfg(unix)]
    #[test]
    fn passfile_is_read_only_when_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "h:5432:db:u:from-file\n").unwrap();
        let path = file.to_str().unwrap().to_owned();
        let resolve = |url: &str, e: &[(&str, &str)]| {
            spec(url)
                .resolve_with(env(e))
                .unwrap()
                .password
                .map(|s| s.expose().to_owned())
        };

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            resolve("postgresql://u@h/db", &[("PGPASSFILE", &path)]).as_deref(),
            Some("from-file")
        );
        let url = format!("postgresql://u@h/db?passfile={}", path.replace('/', "%2F"));
        assert_eq!(resolve(&url, &[]).as_deref(), Some("from-file"));
        assert_eq!(
            resolve(
                "postgresql://u@h/db",
                &[("PGPASSFILE", &path), ("PGPASSWORD", "pw")]
            )
            .as_deref(),
            Some("pw"),
            "PGPASSWORD comes before the password file"
        );
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::fs::copy(&file, home.join(".pgpass")).unwrap();
        std::fs::set_permissions(home.join(".pgpass"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert_eq!(
            resolve("postgresql://u@h/db", &[("HOME", home.to_str().unwrap())]).as_deref(),
            Some("from-file")
        );

        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(
            resolve("postgresql://u@h/db", &[("PGPASSFILE", &path)]),
            None,
            "group-readable"
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert_eq!(
            resolve("postgresql://u@h/db", &[("PGPASSFILE", &path)]),
            None,
            "world-readable"
        );
        assert_eq!(
            resolve("postgresql://u@h/db", &[("PGPASSFILE", "/nonexistent/x")]),
            None
        );
    }

    #[test]
    fn endpoint_is_safe_to_print() {
        let s = spec(&format!("postgresql://u:{CANARY}@db:6432/shop"));
        assert_eq!(s.endpoint(), "db:6432/shop");
        assert_eq!(spec("postgresql://u@db").endpoint(), "db:5432/u");
        assert_eq!(
            spec(&format!("postgresql://u:{CANARY}@a,b/x")).endpoint(),
            "(invalid url)"
        );
    }
}
