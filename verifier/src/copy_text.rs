//! Parsing of PostgreSQL `COPY … TO STDOUT` text-format rows into [`Row`]s.
//!
//! The readers of both sides pull `COPY (SELECT cols FROM t ORDER BY key) TO STDOUT` (text format,
//! default delimiter and NULL string) under the pinned session settings. In that format a row ends
//! with `\n`, fields are separated by `\t`, the field `\N` (exactly) is NULL, and newline, tab and
//! backslash inside values are always backslash-escaped, so a raw `\n` or `\t` is never data.
//! [`CopyLines`] reassembles rows across `CopyData` messages; [`parse_fields`] undoes the escapes
//! so the value bytes are the plain text form the canonical encoding expects.
//!
//! [`CopyParser`] does both at once for the comparison's fast path: it scans the payloads a word
//! at a time for the three bytes that matter (`\n`, `\t`, `\\`), and writes each row straight into a
//! [`RowBatch`] in its canonical framing; fields without a backslash are copied as they are.

use crate::batch::RowBatch;
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
    unescape_into(field, &mut out);
    out
}

/// Append the unescaped bytes of `field` to `out`.
fn unescape_into(field: &[u8], out: &mut Vec<u8>) {
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

const ONES: u64 = 0x0101_0101_0101_0101;
const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// `0x80` in every byte of `word` that may end a field (`\t`) or a row (`\n`), or start an
/// escape (`\\`), and nowhere else: every control byte (below `0x20`) and every backslash. The
/// tests are exact per byte (no carry crosses a byte), so all set bits can be used.
#[inline(always)]
fn candidates(word: u64) -> u64 {
    // High bit clear and (low 7 bits + 0x60) without carry into the high bit: below 0x20.
    let control = !(((word & LOW7).wrapping_add(ONES * 0x60)) | word) & HIGH;
    let diff = word ^ (ONES * u64::from(b'\\'));
    let backslash = !(((diff & LOW7).wrapping_add(LOW7)) | diff) & HIGH;
    control | backslash
}

/// The candidate mask of the 8 bytes of `data` at `at`; past the end the word is padded with
/// spaces, which are never candidates.
#[inline(always)]
fn candidates_at(data: &[u8], at: usize) -> u64 {
    let rest = data.get(at..).unwrap_or_default();
    let word = match rest.first_chunk::<8>() {
        Some(word) => *word,
        None => {
            let mut word = [b' '; 8];
            word[..rest.len()].copy_from_slice(rest);
            word
        }
    };
    candidates(u64::from_le_bytes(word))
}

/// The offset of the first `\n` in `data`.
fn find_newline(data: &[u8]) -> Option<usize> {
    let mut base = 0;
    while base < data.len() {
        let mut mask = candidates_at(data, base);
        while mask != 0 {
            let at = base + (mask.trailing_zeros() / 8) as usize;
            mask &= mask - 1;
            if data.get(at) == Some(&b'\n') {
                return Some(at);
            }
        }
        base += 8;
    }
    None
}

/// Where one field of the current row lies in the payload.
#[derive(Clone, Copy, Debug)]
struct FieldSpan {
    start: usize,
    end: usize,
    /// The field holds a backslash: `\N` or escapes to undo.
    escaped: bool,
}

/// Parses `COPY` text payloads straight into [`RowBatch`]es: the fast-path equivalent of
/// [`CopyLines`] + [`parse_row`], producing the same values (a batch row holds the key values at
/// `key_columns`, then every column) without allocating per row or per field.
#[derive(Debug)]
pub struct CopyParser {
    columns: usize,
    key_columns: Vec<usize>,
    /// The start of a row whose end has not arrived yet.
    partial: Vec<u8>,
    fields: Vec<FieldSpan>,
}

impl CopyParser {
    /// A parser of rows with `columns` fields, keyed by the fields at `key_columns`.
    pub fn new(columns: usize, key_columns: Vec<usize>) -> Self {
        Self {
            columns,
            key_columns,
            partial: Vec::new(),
            fields: Vec::with_capacity(columns),
        }
    }

    /// An empty batch of the shape this parser writes.
    pub fn batch(&self) -> RowBatch {
        RowBatch::new(self.key_columns.len(), self.columns)
    }

    /// Feed one payload (it may split or join rows arbitrarily); every row it completes is
    /// appended to `batch`, which must have this parser's shape (see [`CopyParser::batch`]).
    ///
    /// A malformed row is left out and reported once the whole payload is parsed (the last one's
    /// error, when there are several); the rows around it are still appended.
    pub fn push(&mut self, data: &[u8], batch: &mut RowBatch) -> Result<(), CopyTextError> {
        if batch.is_empty() {
            batch.reset(self.key_columns.len(), self.columns);
        }
        let mut error = None;
        let mut start = 0;
        if !self.partial.is_empty() {
            // A row begun in an earlier payload: complete it first.
            let Some(end) = find_newline(data) else {
                self.partial.extend_from_slice(data);
                return Ok(());
            };
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&data[..=end]);
            if self.split(&line, 0).is_some()
                && let Err(e) = self.emit(&line, batch)
            {
                error = Some(e);
            }
            line.clear();
            self.partial = line;
            start = end + 1;
        }
        while start < data.len() {
            match self.split(data, start) {
                Some(next) => {
                    if let Err(e) = self.emit(data, batch) {
                        error = Some(e);
                    }
                    start = next;
                }
                None => {
                    self.partial.extend_from_slice(&data[start..]);
                    break;
                }
            }
        }
        match error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// End of data: an incomplete trailing row is an error.
    pub fn finish(&self) -> Result<(), CopyTextError> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(CopyTextError::Truncated)
        }
    }

    /// Find the fields of the row starting at `start`: the offset after its `\n`, or `None`
    /// when `data` ends first. Scans a 64-bit word at a time.
    #[inline]
    fn split(&mut self, data: &[u8], start: usize) -> Option<usize> {
        self.fields.clear();
        let mut field = FieldSpan {
            start,
            end: start,
            escaped: false,
        };
        let mut base = start;
        while base < data.len() {
            let mut mask = candidates_at(data, base);
            while mask != 0 {
                let at = base + (mask.trailing_zeros() / 8) as usize;
                mask &= mask - 1;
                match data.get(at) {
                    Some(b'\t') => {
                        field.end = at;
                        self.fields.push(field);
                        field = FieldSpan {
                            start: at + 1,
                            end: at + 1,
                            escaped: false,
                        };
                    }
                    Some(b'\n') => {
                        field.end = at;
                        self.fields.push(field);
                        return Some(at + 1);
                    }
                    Some(b'\\') => field.escaped = true,
                    // Other control bytes are data.
                    _ => {}
                }
            }
            base += 8;
        }
        None
    }

    /// Append the row whose fields [`CopyParser::split`] found to `batch`.
    #[inline]
    fn emit(&self, data: &[u8], batch: &mut RowBatch) -> Result<(), CopyTextError> {
        let fields = &self.fields;
        if fields.len() != self.columns {
            return Err(CopyTextError::FieldCount {
                expected: self.columns,
                found: fields.len(),
            });
        }
        if let Some(&index) = self.key_columns.iter().find(|&&i| i >= fields.len()) {
            return Err(CopyTextError::KeyIndex {
                index,
                fields: fields.len(),
            });
        }
        batch.begin_row();
        for field in self
            .key_columns
            .iter()
            .map(|&index| &fields[index])
            .chain(fields)
        {
            let raw = &data[field.start..field.end];
            if !field.escaped {
                batch.push_value_from(data, field.start, field.end);
            } else if raw == b"\\N" {
                batch.push_value(None);
            } else {
                let mark = batch.begin_value();
                unescape_into(raw, batch.value_buffer());
                batch.end_value(mark);
            }
        }
        Ok(())
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

    /// Rows of `input` as the parser writes them, fed in payloads cut at `cuts`, with the
    /// error of every payload that reported one.
    fn parse_batched(
        input: &[u8],
        cuts: &[usize],
        columns: usize,
        key_columns: &[usize],
    ) -> (Vec<Row>, Vec<CopyTextError>, Result<(), CopyTextError>) {
        let mut parser = CopyParser::new(columns, key_columns.to_vec());
        let mut batch = parser.batch();
        let mut errors = Vec::new();
        let mut from = 0;
        for &cut in cuts.iter().chain([&input.len()]) {
            if let Err(e) = parser.push(&input[from..cut], &mut batch) {
                errors.push(e);
            }
            from = cut;
        }
        let rows = (0..batch.len()).map(|i| batch.row(i).to_row()).collect();
        (rows, errors, parser.finish())
    }

    /// The reference: [`CopyLines`] + [`parse_row`], one result per complete line.
    fn parse_reference(
        input: &[u8],
        columns: usize,
        key_columns: &[usize],
    ) -> (Vec<Result<Row, CopyTextError>>, Result<(), CopyTextError>) {
        let mut lines = CopyLines::new();
        let mut out = Vec::new();
        lines.push(input, |line| {
            out.push(parse_row(line, columns, key_columns))
        });
        (out, lines.finish())
    }

    fn assert_same_as_reference(input: &[u8], cuts: &[usize], columns: usize, keys: &[usize]) {
        let (expected, expected_end) = parse_reference(input, columns, keys);
        let (rows, errors, end) = parse_batched(input, cuts, columns, keys);
        let ok: Vec<Row> = expected.iter().filter_map(|r| r.clone().ok()).collect();
        let bad: Vec<CopyTextError> = expected.iter().filter_map(|r| r.clone().err()).collect();
        assert_eq!(rows, ok, "input {input:?} cut at {cuts:?}");
        assert_eq!(end, expected_end, "input {input:?}");
        // Each payload reports its last malformed row: every error reported is a real one,
        // and there is one exactly when some row is malformed.
        assert_eq!(
            errors.is_empty(),
            bad.is_empty(),
            "input {input:?} cut at {cuts:?}"
        );
        assert!(errors.iter().all(|e| bad.contains(e)), "input {input:?}");
    }

    #[test]
    fn parser_matches_parse_row() {
        let input: &[u8] = b"1\tplain\t\\N\n\
            2\t\t\\N\n\
            3\tNULL\t\\\\N\n\
            4\ta\\tb\\nc\\\\d\\re\t\\b\\f\\v\\101\\x41\\q\n\
            5\t\xc3\xa9t\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\tz\n\
            6\ttrailing\\\t\x01raw control\x1f\n\
            7\t12345678\t123456789012345678901234567890\n";
        for keys in [&[0][..], &[1], &[2, 0], &[], &[1, 1]] {
            assert_same_as_reference(input, &[], 3, keys);
        }
        let (rows, errors, end) = parse_batched(input, &[], 3, &[0]);
        assert!(errors.is_empty());
        assert_eq!(end, Ok(()));
        assert_eq!(rows.len(), 7);
        assert_eq!(rows[0].columns[2], None);
        assert_eq!(
            rows[1].columns,
            vec![Some(b"2".to_vec()), Some(Vec::new()), None]
        );
        assert_eq!(rows[2].columns[1], Some(b"NULL".to_vec()));
        assert_eq!(rows[2].columns[2], Some(b"\\N".to_vec()));
        assert_eq!(rows[3].columns[1], Some(b"a\tb\nc\\d\re".to_vec()));
        assert_eq!(rows[3].columns[2], Some(b"\x08\x0c\x0bAAq".to_vec()));
        assert_eq!(rows[4].columns[1], Some("été € 😀".as_bytes().to_vec()));
        assert_eq!(rows[5].columns[1], Some(b"trailing\\".to_vec()));
        assert_eq!(rows[5].columns[2], Some(b"\x01raw control\x1f".to_vec()));
        assert_eq!(rows[6].key, vec![Some(b"7".to_vec())]);
    }

    #[test]
    fn rows_split_anywhere_across_payloads() {
        let input: &[u8] = b"10\ta\\tb\t\\N\n\
            11\t\xc3\xa9\xe2\x82\xac\t\n\
            12\tlonger value spanning words\tx\\\\y\n\
            \t\t\n";
        // Every single cut, and every pair of cuts.
        for a in 0..=input.len() {
            assert_same_as_reference(input, &[a], 3, &[0]);
            for b in a..=input.len() {
                assert_same_as_reference(input, &[a, b], 3, &[0]);
            }
        }
        // Byte by byte.
        let cuts: Vec<usize> = (1..input.len()).collect();
        assert_same_as_reference(input, &cuts, 3, &[0]);
    }

    #[test]
    fn malformed_rows_are_left_out_and_reported() {
        let input = b"1\ta\n2\tb\tc\n3\tc\n4\n";
        assert_same_as_reference(input, &[], 2, &[0]);
        let (rows, errors, end) = parse_batched(input, &[], 2, &[0]);
        assert_eq!(rows.len(), 2);
        assert_eq!(end, Ok(()));
        // One payload: its last error.
        assert_eq!(
            errors,
            vec![CopyTextError::FieldCount {
                expected: 2,
                found: 1
            }]
        );
        let (rows, errors, _) = parse_batched(b"x\ty\n", &[], 2, &[2]);
        assert!(rows.is_empty());
        assert_eq!(
            errors,
            vec![CopyTextError::KeyIndex {
                index: 2,
                fields: 2
            }]
        );
        let (rows, errors, end) = parse_batched(b"1\ta\n2\tb", &[3], 2, &[0]);
        assert_eq!(rows.len(), 1);
        assert!(errors.is_empty());
        assert_eq!(end, Err(CopyTextError::Truncated));
    }

    #[test]
    fn random_rows_and_splits_match_the_reference() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        // Bytes that matter to the format, plus ordinary and multibyte text.
        let alphabet: &[&[u8]] = &[
            b"\\",
            b"\t",
            b"N",
            b"n",
            b"t",
            b"x",
            b"4",
            b"1",
            b"7",
            b"a",
            b" ",
            b"\x01",
            "é".as_bytes(),
            "€".as_bytes(),
            b"\\N",
            b"\\\\",
            b"\\t",
            b"\\n",
        ];
        for _round in 0..300 {
            let columns = 1 + next(4);
            let mut input = Vec::new();
            for _ in 0..next(6) {
                let fields = if next(10) == 0 { 1 + next(5) } else { columns };
                for field in 0..fields {
                    if field > 0 {
                        input.push(b'\t');
                    }
                    for _ in 0..next(12) {
                        let piece = alphabet[next(alphabet.len())];
                        // A raw tab is a field separator: keep the field count mostly right.
                        if piece != b"\t" || next(4) == 0 {
                            input.extend_from_slice(piece);
                        }
                    }
                }
                input.push(b'\n');
            }
            if next(5) == 0 {
                input.extend_from_slice(b"unterminated");
            }
            let mut cuts: Vec<usize> = (0..next(5)).map(|_| next(input.len() + 1)).collect();
            cuts.sort_unstable();
            let keys: Vec<usize> = (0..next(3)).map(|_| next(columns)).collect();
            assert_same_as_reference(&input, &cuts, columns, &keys);
        }
    }

    #[test]
    fn special_bytes_at_every_word_offset() {
        // Field boundaries and escapes at each position of a 64-bit word.
        for pad in 0..20 {
            let value = "v".repeat(pad);
            let input = format!("{value}\t{value}\\t{value}\t\\N\n{value}\n");
            let input = input.as_bytes();
            assert_same_as_reference(input, &[], 3, &[0]);
            assert_same_as_reference(input, &[pad], 3, &[0]);
        }
    }
}
