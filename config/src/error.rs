//! The one error type of job configuration, and the helpers that build it.
//!
//! Operators read these messages at 3 a.m. during a cutover, and scripts grep them, so
//! every error has the same one-line shape, in PostgreSQL's message style:
//!
//! ```text
//! {file}:{line}: {primary}; hint: {hint}
//! ```
//!
//! `file` is the job file as the user named it (`<job>` for text parsed without a path),
//! `line` is 1-based and left out only when nothing in the file is to blame (an
//! unreadable file, a missing environment variable found without a line), the primary
//! message starts in lower case and has no trailing period, and the hint is left out
//! only when there is no useful fix to suggest.
//!
//! Error text never holds a connection URL, a password or a token: the builders in this
//! crate describe what is wrong with such a value without echoing it, and
//! [`ConfigError::new`] folds every line break into a space so that nothing can smuggle
//! a second line into logs.

use std::fmt;

/// An invalid or unreadable job configuration: where, what, and how to fix it.
///
/// `Display` is exactly one line: `{file}:{line}: {primary}; hint: {hint}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{line}: {primary}{hint}", line = LineSuffix(*.line), hint = HintSuffix(.hint.as_deref()))]
pub struct ConfigError {
    file: String,
    line: Option<usize>,
    primary: String,
    hint: Option<String>,
}

impl ConfigError {
    /// Build an error. Line breaks in `primary` and `hint` become spaces, so the
    /// message stays on one line. Callers must not pass secrets.
    pub fn new(
        file: impl Into<String>,
        line: Option<usize>,
        primary: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        Self {
            file: one_line(file.into()),
            line,
            primary: one_line(primary.into()),
            hint: hint.map(one_line),
        }
    }

    /// The job file as given (`<job>` when parsed from a string without a path).
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The 1-based line the error points at, when there is one.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// What is wrong (lower case, no trailing period).
    pub fn primary(&self) -> &str {
        &self.primary
    }

    /// How to fix it, when there is a useful suggestion.
    pub fn hint(&self) -> Option<&str> {
        self.hint.as_deref()
    }
}

struct LineSuffix(Option<usize>);

impl fmt::Display for LineSuffix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, ":{line}"),
            None => Ok(()),
        }
    }
}

struct HintSuffix<'a>(Option<&'a str>);

impl fmt::Display for HintSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(hint) => write!(f, "; hint: {hint}"),
            None => Ok(()),
        }
    }
}

fn one_line(text: String) -> String {
    if text.contains(['\n', '\r']) {
        text.replace("\r\n", " ").replace(['\n', '\r'], " ")
    } else {
        text
    }
}

/// The 1-based line holding byte `offset` of `text` (clamped to the text's end).
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    1 + text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
}

/// Levenshtein distance over chars, for "did you mean" suggestions.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `typed`, if it is close enough to be a likely typo:
/// at most a third of the longer word differs (at least one edit allowed), compared
/// without regard to case.
pub(crate) fn nearest<'a>(typed: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let typed = typed.to_lowercase();
    candidates
        .iter()
        .map(|&c| (edit_distance(&typed, c), c))
        .filter(|&(d, c)| d <= (typed.chars().count().max(c.len()) / 3).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// A value's description for messages: scalars as written, containers by kind.
/// Only for values that cannot be secrets.
pub(crate) fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(x) => x.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(_) => "a date-time".to_owned(),
        toml::Value::Array(_) => "an array".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
    }
}

/// A value's kind with an article, never its content: for values that may be secret.
pub(crate) fn kind(value: &toml::Value) -> &'static str {
    match value {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_has_the_documented_shape() {
        let e = ConfigError::new("job.toml", Some(12), "unknown key", Some("fix it".into()));
        assert_eq!(e.to_string(), "job.toml:12: unknown key; hint: fix it");
        let e = ConfigError::new("job.toml", None, "could not read job file", None);
        assert_eq!(e.to_string(), "job.toml: could not read job file");
        assert_eq!(e.file(), "job.toml");
        assert_eq!(e.line(), None);
        assert_eq!(e.primary(), "could not read job file");
        assert_eq!(e.hint(), None);
    }

    #[test]
    fn messages_stay_on_one_line() {
        let e = ConfigError::new("a\nb", Some(1), "x\r\ny", Some("p\rq".into()));
        assert_eq!(e.to_string(), "a b:1: x y; hint: p q");
    }

    #[test]
    fn line_numbers_count_from_one() {
        let text = "a\nb\nc";
        assert_eq!(line_of(text, 0), 1);
        assert_eq!(line_of(text, 2), 2);
        assert_eq!(line_of(text, 4), 3);
        assert_eq!(line_of(text, 999), 3);
    }

    #[test]
    fn suggestions_are_near_misses_only() {
        assert_eq!(edit_distance("max_lagg", "max_lag"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            nearest("max_lagg", &["max_lag", "max_verify_age"]),
            Some("max_lag")
        );
        assert_eq!(nearest("URL", &["url", "password_env"]), Some("url"));
        assert_eq!(nearest("bogus", &["name", "source", "target"]), None);
    }
}
