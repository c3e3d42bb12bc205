//! Parsing of PostgreSQL `COPY … TO STDOUT` text-format rows into [`Row`]s.
//!
//! The readers of both sides pull `COPY (SELECT cols FROM t ORDER BY key) TO STDOUT` (text format,
//! default delimiter and NULL string) under the pinned session settings. In that format a row ends
//! with `\n`, fields are separated by `\t`, the field `\N` (exactly) is NULL, and newline, tab and
//! backslash inside values are always backslash-escaped, so a raw `\n` or `\t` is never data.
//! [`CopyLines`] reassembles rows across `CopyData` messages; [`parse_fields`] undoes the escapes
//! so the value bytes are the plain text form the canonical encoding expects.

use crate::chunk::{Row, Value};

/// A malformed `COPY` text row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyTextError {
    /// The row has a different number of fields than expected.
    #[error("copy row has {found} fields, expected {expected}")]
    FieldCount {
        /// Fields expected from the column list.
        expected: usize,
        /// Fields found in the row.
        found: usize,
    },
    /// A key column index is outside the row.
    #[error("key column {index} is outside a row of {fields} fields")]
    KeyIndex {
        /// The requested index.
        index: usize,
        /// Fields in the row.
        fields: usize,
    },
    /// The data ended in the middle of a row.
    #[error("copy data ended inside a row")]
    Truncated,
}

/// Split one row (without its trailing `\n`) into unescaped field values, reusing `out`.
pub fn parse_fields(line: &[u8], out: &mut Vec<Value>) {
    out.clear();
    for field in line.split(|&byte| byte == b'\t') {
        if field == b"\\N" {
            out.push(None);
        } else {
            out.push(Some(unescape(field)));
        }
    }
}

fn unescape(field: &[u8]) -> Vec<u8> {
    if !field.contains(&b'\\') {
        return field.to_vec();
    }
    let mut out = Vec::with_capacity(field.len());
    let mut index = 0;
    while index < field.len() {
        let byte = field[index];
        index += 1;
        if byte != b'\\' || index == field.len() {
            out.push(byte);
            continue;
        }
        let escaped = field[index];
        index += 1;
        match escaped {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut value = u32::from(escaped - b'0');
                for _ in 0..2 {
                    match field.get(index) {
                        Some(&digit @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(digit - b'0');
                            index += 1;
                        }
                        _ => break,
                    }
                }
                out.push((value & 0xff) as u8);
            }
            b'x' if field.get(index).is_some_and(u8::is_ascii_hexdigit) => {
                let mut value = 0u8;
                for _ in 0..2 {
                    match field.get(index).and_then(|d| (*d as char).to_digit(16)) {
                        Some(digit) => {
                            value = value.wrapping_mul(16).wrapping_add(digit as u8);
                            index += 1;
                        }
                        None => break,
                    }
                }
                out.push(value);
            }
            other => out.push(other),
        }
    }
    out
}

/// Parse one row into a [`Row`] whose key is taken from the fields at `key_columns`.
pub fn parse_row(line: &[u8], columns: usize, key_columns: &[usize]) -> Result<Row, CopyTextError> {
    let mut fields = Vec::with_capacity(columns);
    parse_fields(line, &mut fields);
    if fields.len() != columns {
        return Err(CopyTextError::FieldCount {
            expected: columns,
            found: fields.len(),
        });
    }
    let key = key_columns
        .iter()
        .map(|&index| {
            fields.get(index).cloned().ok_or(CopyTextError::KeyIndex {
                index,
                fields: fields.len(),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(Row::new(key, fields))
}

/// Reassembles complete rows from `CopyData` payloads that may split or join rows arbitrarily.
#[derive(Debug, Default)]
pub struct CopyLines {
    partial: Vec<u8>,
}

impl CopyLines {
    /// An empty reassembler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one payload; `row` is called with each complete row (without `\n`).
    pub fn push(&mut self, mut data: &[u8], mut row: impl FnMut(&[u8])) {
        while let Some(end) = data.iter().position(|&byte| byte == b'\n') {
            if self.partial.is_empty() {
                row(&data[..end]);
            } else {
                self.partial.extend_from_slice(&data[..end]);
                row(&self.partial);
                self.partial.clear();
            }
            data = &data[end + 1..];
        }
        self.partial.extend_from_slice(data);
    }

    /// End of data: an incomplete trailing row is an error.
    pub fn finish(&self) -> Result<(), CopyTextError> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(CopyTextError::Truncated)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(line: &[u8]) -> Vec<Value> {
        let mut out = Vec::new();
        parse_fields(line, &mut out);
        out
    }

    #[test]
    fn null_empty_and_literal_null() {
        assert_eq!(
            fields(b"\\N\t\tNULL\t\\\\N"),
            vec![
                None,
                Some(Vec::new()),
                Some(b"NULL".to_vec()),
                Some(b"\\N".to_vec())
            ]
        );
    }

    #[test]
    fn escapes_are_undone() {
        assert_eq!(
            fields(b"a\\tb\\nc\\\\d\\r\\b\\f\\v\\101\\x41\\q"),
            vec![Some(b"a\tb\nc\\d\r\x08\x0c\x0bAAq".to_vec())]
        );
    }

    #[test]
    fn rows_reassemble_across_payloads() {
        let mut lines = CopyLines::new();
        let mut rows = Vec::new();
        for payload in [&b"1\ta\n2\t"[..], b"b", b"\n3\tc\n"] {
            lines.push(payload, |row| rows.push(row.to_vec()));
        }
        assert_eq!(
            rows,
            vec![b"1\ta".to_vec(), b"2\tb".to_vec(), b"3\tc".to_vec()]
        );
        assert_eq!(lines.finish(), Ok(()));
        lines.push(b"4", |_| {});
        assert_eq!(lines.finish(), Err(CopyTextError::Truncated));
    }

    #[test]
    fn parse_row_takes_key_columns() {
        let row = parse_row(b"x\t7\t\\N", 3, &[1]).expect("row");
        assert_eq!(row.key, vec![Some(b"7".to_vec())]);
        assert_eq!(row.columns.len(), 3);
        assert_eq!(
            parse_row(b"x\t7", 3, &[1]),
            Err(CopyTextError::FieldCount {
                expected: 3,
                found: 2
            })
        );
        assert_eq!(
            parse_row(b"x", 1, &[2]),
            Err(CopyTextError::KeyIndex {
                index: 2,
                fields: 1
            })
        );
    }
}
