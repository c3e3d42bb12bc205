//! The small grammars inside job files: job names, table names, durations,
//! environment variable names.
//!
//! Each is checked when the file is read, not when the daemon first needs it, so that a
//! typo costs a failed `cutover check` instead of a half-started cutover. They are kept
//! deliberately narrow: a job name ends up unquoted in replication commands, so it gets
//! a whitelist, and table names follow exactly the quoting rule that
//! `cutover-connectors` applies (`"..."` with `""` for a quote, no case folding).

use std::time::Duration;

/// Longest job name: it names a replication slot and a publication (PostgreSQL allows
/// 63 bytes), and leaves room for the prefixes and suffixes the daemon adds.
pub const MAX_JOB_NAME: usize = 48;

/// Longest identifier PostgreSQL keeps (NAMEDATALEN - 1); longer ones are truncated
/// by the server, which would silently map two names onto one.
pub const MAX_IDENT_BYTES: usize = 63;

/// Why a job name is refused, with a name that would be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobNameError {
    Empty,
    TooLong { chars: usize, fixed: String },
    BadChars { fixed: String },
}

/// Check a job name against `[a-z0-9_-]{1,48}`.
pub(crate) fn check_job_name(name: &str) -> Result<(), JobNameError> {
    if name.is_empty() {
        return Err(JobNameError::Empty);
    }
    let fixed = fix_job_name(name);
    if !name.chars().all(is_job_name_char) {
        return Err(JobNameError::BadChars { fixed });
    }
    let chars = name.chars().count();
    if chars > MAX_JOB_NAME {
        return Err(JobNameError::TooLong { chars, fixed });
    }
    Ok(())
}

fn is_job_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-'
}

/// Lower case, every other character replaced by `_`, cut to the limit.
fn fix_job_name(name: &str) -> String {
    let fixed: String = name
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if is_job_name_char(c) { c } else { '_' })
        .take(MAX_JOB_NAME)
        .collect();
    if fixed.is_empty() {
        "job".to_owned()
    } else {
        fixed
    }
}

/// `schema.table` or `table` split into unquoted parts: `(schema, table)`.
///
/// A part is either written in double quotes (any character; `""` stands for one
/// quote; not empty) or bare: letters, digits, `_` and `$`, not starting with a digit.
/// Bare parts are kept as written (no case folding). With `wildcards`, bare parts may
/// also hold `*` (table patterns of `[source] tables`).
pub(crate) fn split_table_name(
    text: &str,
    wildcards: bool,
) -> Result<(Option<String>, String), String> {
    let mut parts: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("a double quote is not closed".to_owned()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    Some('"') => break,
                    Some(c) => part.push(c),
                }
            }
            if part.is_empty() {
                return Err("a quoted name is empty".to_owned());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                let ok = c.is_alphanumeric() || c == '_' || c == '$' || (wildcards && c == '*');
                if !ok {
                    return Err(if c == '"' {
                        "a double quote may only start a name part".to_owned()
                    } else {
                        format!("{c:?} is not allowed in an unquoted name")
                    });
                }
                part.push(c);
                chars.next();
            }
            if part.is_empty() {
                return Err("a name part is empty".to_owned());
            }
            if part.starts_with(|c: char| c.is_ascii_digit()) {
                return Err("an unquoted name cannot start with a digit".to_owned());
            }
        }
        if part.contains('\0') {
            return Err("a name cannot contain a NUL character".to_owned());
        }
        if part.len() > MAX_IDENT_BYTES {
            return Err(format!(
                "a name part is {} bytes long, PostgreSQL keeps at most {MAX_IDENT_BYTES}",
                part.len()
            ));
        }
        parts.push(part);
        match chars.next() {
            None => break,
            Some('.') => {}
            Some(_) => {
                return Err("a quoted name part must be followed by \".\" or the end".to_owned());
            }
        }
    }
    let mut parts = parts.into_iter();
    match (parts.next(), parts.next(), parts.next()) {
        (Some(table), None, None) => Ok((None, table)),
        (Some(schema), Some(table), None) => Ok((Some(schema), table)),
        _ => Err("it has more than two parts".to_owned()),
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parse a duration: `"0"`, or one or more `<number><unit>` groups with units `ms`,
/// `s`, `m`, `h`, `d` (`"500ms"`, `"5s"`, `"1.5s"`, `"1h30m"`). No spaces and no bare
/// numbers other than `0`: a bare `5` is ambiguous between seconds and milliseconds.
/// Precision is a nanosecond; anything beyond is dropped.
///
/// The same grammar can serve `--wait` and similar command-line flags.
pub fn parse_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let mut total_nanos: u128 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let int_len = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if int_len == 0 {
            return None;
        }
        let int: u128 = rest[..int_len].parse().ok()?;
        rest = &rest[int_len..];
        let mut frac = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let frac_len = after_dot.len()
                - after_dot
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .len();
            if frac_len == 0 {
                return None;
            }
            frac = &after_dot[..frac_len];
            rest = &after_dot[frac_len..];
        }
        let unit_len = rest.len()
            - rest
                .trim_start_matches(|c: char| c.is_ascii_alphabetic())
                .len();
        let (unit, tail) = rest.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "d" => 86_400 * 1_000_000_000,
            _ => return None,
        };
        let mut part = int.checked_mul(unit_nanos)?;
        // Only the first 18 fraction digits can matter at nanosecond precision.
        let frac = &frac[..frac.len().min(18)];
        if !frac.is_empty() {
            let digits: u128 = frac.parse().ok()?;
            part = part.checked_add(digits * unit_nanos / 10u128.pow(frac.len() as u32))?;
        }
        total_nanos = total_nanos.checked_add(part)?;
        rest = tail;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// Parse a size as PostgreSQL writes them: a whole number and a unit `B`, `kB`, `MB`,
/// `GB` or `TB` (multiples of 1024; the unit's case does not matter, a space may come
/// before it). `None` for anything else, and for a size past `u64::MAX` bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return None;
    }
    let number: u64 = text[..digits].parse().ok()?;
    let shift = match text[digits..].trim_start().to_ascii_lowercase().as_str() {
        "b" => 0,
        "kb" => 10,
        "mb" => 20,
        "gb" => 30,
        "tb" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names() {
        assert_eq!(check_job_name("shop-v2"), Ok(()));
        assert_eq!(check_job_name("a_b-0"), Ok(()));
        assert_eq!(check_job_name(&"x".repeat(48)), Ok(()));
        assert_eq!(check_job_name(""), Err(JobNameError::Empty));
        assert_eq!(
            check_job_name("Shop V2"),
            Err(JobNameError::BadChars {
                fixed: "shop_v2".into()
            })
        );
        assert_eq!(
            check_job_name(&"x".repeat(60)),
            Err(JobNameError::TooLong {
                chars: 60,
                fixed: "x".repeat(48)
            })
        );
        assert_eq!(
            check_job_name("shop\"; drop"),
            Err(JobNameError::BadChars {
                fixed: "shop___drop".into()
            })
        );
        assert_eq!(
            check_job_name("é"),
            Err(JobNameError::BadChars { fixed: "_".into() })
        );
    }

    #[test]
    fn table_names() {
        let ok = |t: &str| split_table_name(t, false);
        assert_eq!(ok("orders"), Ok((None, "orders".into())));
        assert_eq!(ok("v2.orders"), Ok((Some("v2".into()), "orders".into())));
        assert_eq!(
            ok("Public.Orders"),
            Ok((Some("Public".into()), "Orders".into()))
        );
        assert_eq!(
            ok(r#""My.S"."Odd ""Name""""#),
            Ok((Some("My.S".into()), r#"Odd "Name""#.into()))
        );
        assert_eq!(ok("t$1"), Ok((None, "t$1".into())));
        assert_eq!(ok("größe"), Ok((None, "größe".into())));
        for bad in [
            "", "a.", ".a", "a.b.c", "a b", "a;drop", "a--", "\"a", "\"\"", "1abc", "\"a\"b",
            "a\"b\"", "a.*",
        ] {
            assert!(ok(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(ok(&"x".repeat(64)).is_err());
        assert!(ok(&format!("\"{}\"", "é".repeat(32))).is_err());
        assert!(ok(&"x".repeat(63)).is_ok());
        assert_eq!(
            split_table_name("public.*", true),
            Ok((Some("public".into()), "*".into()))
        );
        assert_eq!(
            split_table_name("*.order*", true),
            Ok((Some("*".into()), "order*".into()))
        );
    }

    #[test]
    fn env_names() {
        assert!(is_env_name("SOURCE_PGPASSWORD"));
        assert!(is_env_name("_x1"));
        assert!(!is_env_name(""));
        assert!(!is_env_name("1X"));
        assert!(!is_env_name("hunter2!"));
        assert!(!is_env_name("A-B"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0.25h"), Some(Duration::from_secs(900)));
        assert_eq!(
            parse_duration("1.0000000001s"),
            Some(Duration::from_secs(1))
        );
        for bad in [
            "",
            "5",
            "5 seconds",
            "5 s",
            "1.s",
            ".5s",
            "1.5",
            "s",
            "5x",
            "-5s",
            "5S",
            "5s ",
            "99999999999999999999999999999999999999999s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        assert_eq!(parse_duration(&format!("{}d", u64::MAX / 1000)), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GB"), Some(4 << 30));
        assert_eq!(parse_size("512 MB"), Some(512 << 20));
        assert_eq!(parse_size("64kB"), Some(64 << 10));
        assert_eq!(parse_size("8192b"), Some(8192));
        assert_eq!(parse_size("1tb"), Some(1 << 40));
        for bad in [
            "",
            "GB",
            "4",
            "1.5GB",
            "-1GB",
            "4 G",
            "4GiB",
            "99999999999TB",
            " 4GB",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }
}
