//! Identifiers and how they reach SQL: always quoted, never spliced raw.

use std::fmt;

/// Quote an identifier the way PostgreSQL's `quote_ident` does unconditionally:
/// wrap it in double quotes and double every embedded double quote.
pub fn quote_ident(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 2);
    out.push('"');
    for c in name.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// Quote a string literal for the rare places that cannot take a parameter
/// (replication commands, `SET TRANSACTION SNAPSHOT`).
pub fn quote_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    push_literal(&mut out, value);
    out
}

/// Append `value` quoted as a string literal (what [`quote_literal`] returns) to `out`.
pub fn push_literal(out: &mut String, value: &str) {
    out.push('\'');
    let mut rest = value;
    while let Some(i) = rest.find('\'') {
        out.push_str(&rest[..=i]);
        out.push('\'');
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('\'');
}

/// A schema-qualified table name, as the catalog spells it (not quoted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl TableName {
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parse `schema.table` or `table` (schema `default_schema`). A part may be written
    /// in double quotes to hold dots or upper case (`"My.Schema"."T"`); unquoted parts are
    /// taken as written (no case folding: job files name tables as the catalog does).
    pub fn parse(text: &str, default_schema: &str) -> Option<Self> {
        let parts = split_qualified(text)?;
        match parts.as_slice() {
            [name] => Some(Self::new(default_schema, name.clone())),
            [schema, name] => Some(Self::new(schema.clone(), name.clone())),
            _ => None,
        }
    }

    /// `"schema"."name"`, ready for SQL.
    pub fn quoted(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

impl fmt::Display for TableName {
    /// `schema.name` for people; parts that need it are quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |p: &str| {
            let plain = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit());
            if plain { p.to_string() } else { quote_ident(p) }
        };
        write!(f, "{}.{}", show(&self.schema), show(&self.name))
    }
}

fn split_qualified(text: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let mut part = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        part.push('"');
                    }
                    '"' => break,
                    c => part.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == '.' {
                    break;
                }
                part.push(c);
                chars.next();
            }
        }
        if part.is_empty() {
            return None;
        }
        parts.push(part);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_doubles_embedded_quotes() {
        assert_eq!(
            quote_ident(r#"x"; DROP TABLE t; --"#),
            r#""x""; DROP TABLE t; --""#
        );
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn parses_qualified_names() {
        assert_eq!(
            TableName::parse("orders", "public"),
            Some(TableName::new("public", "orders"))
        );
        assert_eq!(
            TableName::parse("v2.orders", "public"),
            Some(TableName::new("v2", "orders"))
        );
        assert_eq!(
            TableName::parse(r#""My.S"."Odd ""Name""""#, "public"),
            Some(TableName::new("My.S", r#"Odd "Name""#))
        );
        assert_eq!(TableName::parse("a.b.c", "public"), None);
        assert_eq!(TableName::parse("", "public"), None);
        assert_eq!(TableName::parse("a.", "public"), None);
    }

    #[test]
    fn display_quotes_only_when_needed() {
        assert_eq!(TableName::new("public", "t").to_string(), "public.t");
        assert_eq!(
            TableName::new("public", "Odd \"Name\"").to_string(),
            r#"public."Odd ""Name""""#
        );
    }
}
