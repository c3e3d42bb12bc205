//! Errors of the connectors, classified by what the supervisor should do about them.
//!
//! Materialize splits source errors into transient (retry) and definite (stop and tell
//! the operator); supabase/etl maps error kinds to retry directives. We do the same with
//! [`ErrorClass`]: the daemon retries [`ErrorClass::Transient`] errors with backoff and
//! stops with the message and hint for the others.

use std::fmt;

use crate::pg_source::wire::WireError;

/// What the supervisor does with an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A lost connection, a restarting server: retry with backoff.
    Transient,
    /// The job cannot go on until an operator acts (a lost slot, a missing table).
    NeedsOperator,
}

/// An error in PostgreSQL's style: a lowercase primary, an optional detail and hint.
#[derive(Debug)]
pub struct Error {
    pub class: ErrorClass,
    pub primary: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub source: Option<Box<dyn std::error::Error + Send + Sync>>,
    /// For a transient error: how long the same incident may be retried before it needs
    /// an operator after all (`None`: for as long as it lasts).
    pub retry_for: Option<std::time::Duration>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn transient(primary: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            primary: primary.into(),
            detail: None,
            hint: None,
            source: None,
            retry_for: None,
        }
    }

    pub fn operator(primary: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::NeedsOperator,
            primary: primary.into(),
            detail: None,
            hint: None,
            source: None,
            retry_for: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Retry this transient error for at most `limit`, then treat it as needing an operator.
    pub fn retry_for(mut self, limit: std::time::Duration) -> Self {
        self.retry_for = Some(limit);
        self
    }

    pub fn is_transient(&self) -> bool {
        self.class == ErrorClass::Transient
    }

    /// Wrap a database error from `endpoint` while doing `what` (a verb phrase such as
    /// "create the publication"). Connection-level failures are transient; SQL errors the
    /// server reports need an operator unless their SQLSTATE says the server is going away.
    pub fn from_pg(what: &str, endpoint: &str, err: &tokio_postgres::Error) -> Self {
        let transient = is_transient_pg(err);
        let (primary, detail, hint) = match err.as_db_error() {
            Some(db) => (
                format!("could not {what} on {endpoint}: {}", db.message()),
                db.detail().map(str::to_string),
                db.hint().map(str::to_string),
            ),
            None => (
                format!("could not {what} on {endpoint}: {}", pg_cause(err)),
                None,
                None,
            ),
        };
        Self {
            class: if transient {
                ErrorClass::Transient
            } else {
                ErrorClass::NeedsOperator
            },
            primary,
            detail,
            hint,
            source: None,
            retry_for: None,
        }
    }
}

impl Error {
    /// Our error for a failure of one of our own protocol sessions (`pg_source::wire`)
    /// while doing `what` (a verb phrase) on `endpoint`, classified like [`from_pg`]'s.
    ///
    /// [`from_pg`]: Error::from_pg
    pub fn from_wire(what: &str, endpoint: &str, err: WireError) -> Self {
        let primary = |cause: &str| {
            let mut c = cause.chars();
            let cause = match c.next() {
                Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
                None => String::new(),
            };
            format!("could not {what} on {endpoint}: {cause}")
        };
        match err {
            WireError::Server(s) => {
                let code = s.code.as_str();
                // 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
                // cannot connect now; 53: insufficient resources; 40001/40P01:
                // serialization failure and deadlock.
                let transient = code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(code, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
                let mut e = if transient {
                    Error::transient(primary(&s.message))
                } else {
                    Error::operator(primary(&s.message))
                };
                e.detail = s.detail;
                e.hint = s.hint;
                if e.hint.is_none() && code.starts_with("28") {
                    e.hint = Some(
                        "check the user and the password (password_env, PGPASSWORD or ~/.pgpass)"
                            .into(),
                    );
                }
                e
            }
            WireError::Auth(m) => Error::operator(primary(&m))
                .hint("check the user and the password (password_env, PGPASSWORD or ~/.pgpass)"),
            WireError::Io(io) => Error::transient(primary(&io.to_string())).with_source(io),
            WireError::Closed => Error::transient(primary("the server closed the connection")),
            e @ WireError::Protocol(_) => Error::operator(primary(&e.to_string())).hint(
                "this is a bug in cutover or an unsupported server; report it with the server version",
            ),
        }
    }
}

/// The innermost readable cause of a client error (`connection refused`, `password
/// authentication failed ...`). tokio-postgres never puts the password in its errors.
pub fn pg_cause(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.message().to_string();
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    text.to_lowercase()
}

/// What to do when the server ran out of something (SQLSTATE class 53: disk space,
/// memory) or failed underneath (class 58: reading or writing a file).
pub const RESOURCE_HINT: &str = "the server ran out of a resource (disk space, memory) or could not read or write a file; free it or fix the server, then run the job again: it resumes where it stopped";

/// The hint for a failure with SQLSTATE `code` when PostgreSQL gave none: for a server
/// out of resources (classes 53 and 58) [`RESOURCE_HINT`], else `hint` when `about` says
/// it is about this code, else none. A hint that guesses the wrong cause is worse than
/// none.
pub fn hint_for(code: Option<&str>, about: fn(&str) -> bool, hint: &str) -> Option<String> {
    let code = code?;
    if code.starts_with("53") || code.starts_with("58") {
        Some(RESOURCE_HINT.to_string())
    } else if about(code) {
        Some(hint.to_string())
    } else {
        None
    }
}

/// Whether SQLSTATE `code` is an integrity constraint violation (class 23: unique,
/// foreign key, not null, check, exclusion).
pub fn is_constraint_violation(code: &str) -> bool {
    code.starts_with("23")
}

/// Whether a tokio-postgres error means "try again later": the connection broke, or the
/// server is shutting down, starting up or out of connections.
pub fn is_transient_pg(err: &tokio_postgres::Error) -> bool {
    if err.is_closed() {
        return true;
    }
    match err.code() {
        Some(code) => {
            let c = code.code();
            // 08: connection exception; 57P01-57P03: admin shutdown, crash shutdown,
            // cannot connect now; 53300: too many connections; 40001/40P01: serialization
            // failure and deadlock (the transaction can simply be retried).
            c.starts_with("08")
                || matches!(c, "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01")
        }
        // No SQLSTATE: an I/O error or a protocol-level failure.
        None => err.as_db_error().is_none(),
    }
}

impl fmt::Display for Error {
    /// One line: `primary; detail: ...; hint: ...`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.primary)?;
        if let Some(d) = &self.detail {
            write!(f, "; detail: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIQUE: &str = "a unique index refused a row";

    #[test]
    fn a_hint_only_names_the_cause_it_is_about() {
        // A constraint violation gets the hint about constraints.
        assert_eq!(
            hint_for(Some("23505"), is_constraint_violation, UNIQUE).as_deref(),
            Some(UNIQUE)
        );
        // A full disk or a failed file write gets the resource hint, never the guess.
        for code in ["53100", "53200", "58030"] {
            assert_eq!(
                hint_for(Some(code), is_constraint_violation, UNIQUE).as_deref(),
                Some(RESOURCE_HINT),
                "{code}"
            );
        }
        // Anything else (an exception raised by a trigger, a type mismatch, no SQLSTATE)
        // gets no hint rather than a wrong one.
        for code in [Some("P0001"), Some("22001"), Some("42804"), None] {
            assert_eq!(
                hint_for(code, is_constraint_violation, UNIQUE),
                None,
                "{code:?}"
            );
        }
    }
}
