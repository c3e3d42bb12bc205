//! Rows sent column by column: one text array per column, unnested on the target.
//!
//! A multi-row `VALUES` list costs the target's parser and planner something for every
//! value: each literal is a node of its own, typed and coerced one by one. The same rows as
//! `ROWS FROM (unnest('{...}'::t1[]), unnest('{...}'::t2[]), ...)` reach the target as one
//! literal per column, which the array input function parses in a tight loop; the parse
//! and the plan are then the same size whatever the number of rows. On a pgbench target,
//! 40000 updates and 40000 inserts in batches of 2000 took 0.80-0.93 s as `VALUES` and
//! 0.55-0.61 s unnested (docs/benchmarks.md, session 5).
//!
//! Only types whose values survive the trip as array elements qualify
//! ([`crate::catalog::ColumnInfo::array_element`]): the type has an array type, `,`
//! separates its elements, and it is no array itself (unnest would flatten one). Every
//! element is written double-quoted, so any text (empty, `NULL`, braces, spaces) comes
//! back exactly.

use std::fmt::Write as _;

/// Text arrays being filled, one per column, one element per row.
#[derive(Debug, Default)]
pub struct ColumnArrays {
    /// Each column's elements, comma-separated, already escaped for a SQL literal.
    columns: Vec<String>,
    rows: usize,
}

impl ColumnArrays {
    /// Start empty, with `width` columns (allocations are kept).
    pub fn start(&mut self, width: usize) {
        self.columns.truncate(width);
        self.clear();
        self.columns.resize_with(width, String::new);
    }

    /// The size of the text held.
    pub fn bytes(&self) -> usize {
        self.columns.iter().map(String::len).sum()
    }

    /// Add column `col`'s value of the current row (`None` is NULL). Every column gets
    /// one value per row, then [`ColumnArrays::end_row`].
    pub fn push(&mut self, col: usize, value: Option<&str>) {
        let out = &mut self.columns[col];
        if self.rows > 0 {
            out.push(',');
        }
        match value {
            None => out.push_str("NULL"),
            Some(text) => push_element(out, text),
        }
    }

    pub fn end_row(&mut self) {
        self.rows += 1;
    }

    /// Empty the arrays (their memory is kept).
    pub fn clear(&mut self) {
        for c in &mut self.columns {
            c.clear();
        }
        self.rows = 0;
    }

    /// Append `ROWS FROM (unnest('{...}'::type[]), ...)`, `types` giving each column's
    /// type (as `format_type` prints it) in column order, and empty the arrays: what they
    /// held is in `sql` now, and must not count against the buffer's size any more.
    pub fn write_from<'a>(&mut self, sql: &mut String, types: impl IntoIterator<Item = &'a str>) {
        sql.push_str("ROWS FROM (");
        for (n, (column, ty)) in self.columns.iter().zip(types).enumerate() {
            if n > 0 {
                sql.push_str(", ");
            }
            let _ = write!(sql, "unnest('{{{column}}}'::{ty}[])");
        }
        sql.push(')');
        self.clear();
    }
}

/// `"text"` as an array element inside a SQL string literal: `"` and `\` escaped with a
/// backslash for the array parser, `'` doubled for the SQL parser (with
/// `standard_conforming_strings` on, which every cutover session sets).
fn push_element(out: &mut String, text: &str) {
    out.push('"');
    let mut rest = text;
    while let Some(i) = rest.bytes().position(|b| matches!(b, b'\'' | b'"' | b'\\')) {
        out.push_str(&rest[..i]);
        out.push_str(match rest.as_bytes()[i] {
            b'\'' => "''",
            b'"' => "\\\"",
            _ => "\\\\",
        });
        rest = &rest[i + 1..];
    }
    out.push_str(rest);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_quoted_for_the_array_and_the_literal() {
        let mut a = ColumnArrays::default();
        a.start(2);
        a.push(0, Some(r#"it's "x" \ y"#));
        a.push(1, None);
        a.end_row();
        a.push(0, Some(""));
        a.push(1, Some("NULL"));
        a.end_row();
        let mut sql = String::new();
        a.write_from(&mut sql, ["text", "pg_catalog.int4"]);
        assert_eq!((a.rows, a.bytes()), (0, 0), "written out, so empty");
        assert_eq!(
            sql,
            r#"ROWS FROM (unnest('{"it''s \"x\" \\ y",""}'::text[]), unnest('{NULL,"NULL"}'::pg_catalog.int4[]))"#
        );
        a.push(0, Some("x"));
        a.push(1, Some("y"));
        a.start(1);
        assert_eq!((a.rows, a.bytes(), a.columns.len()), (0, 0, 1));
    }
}
