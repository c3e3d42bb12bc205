//! Batches of rows kept in their canonical chunk framing, without per-row or per-field
//! allocations.
//!
//! A [`RowBatch`] holds the rows of one side back to back in one byte buffer, each row framed
//! exactly as [`crate::chunk::encode_chunk_row`] frames it: the canonical encoding
//! ([`crate::canonical`]) of its key values, then of its column values. That framing is
//! self-delimiting (every value carries its tag and length), so the batch only records where each
//! row starts; keys and columns are read back from the bytes on demand ([`RowRef`], [`KeyRef`]).
//! The hash fast path feeds whole runs of rows to blake3 straight from the buffer, and nothing is
//! materialized unless a difference has to be reported.
//!
//! Every row of a batch has the same shape (number of key values and of columns), fixed when the
//! batch is created. Buffers are meant to be reused: [`RowBatch::clear`] keeps their capacity.

use crate::canonical::{TAG_NULL, TAG_VALUE};
use crate::chunk::{Key, KeyComparator, KeyOrder, Row, Value};

/// Bytes before a framed value: its tag and its `u64` length.
const HEADER: usize = 9;

/// Rows of one shape in the canonical chunk framing, back to back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowBatch {
    /// The framed rows.
    pub(crate) bytes: Vec<u8>,
    /// Offset in `bytes` where each row starts.
    pub(crate) starts: Vec<usize>,
    key_len: usize,
    columns: usize,
    /// Each row's [`KeyComparator::integer_key`] under `ints_order` ([`NO_INT`] for none), when
    /// [`RowBatch::index_keys`] worked them out for every row.
    ints: Vec<i64>,
    ints_order: Option<KeyOrder>,
}

/// A row without an integer key in [`RowBatch::index_keys`]' index (also used for the one key
/// that collides with it, which then simply takes the general comparison).
const NO_INT: i64 = i64::MIN;

/// A row's shape differs from its batch's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "row has {key_len} key values and {columns} columns, the batch holds {expected_key_len} and {expected_columns}"
)]
pub struct ShapeMismatch {
    /// Key values of the row.
    pub key_len: usize,
    /// Columns of the row.
    pub columns: usize,
    /// Key values of the batch's rows.
    pub expected_key_len: usize,
    /// Columns of the batch's rows.
    pub expected_columns: usize,
}

impl RowBatch {
    /// An empty batch of rows with `key_len` key values and `columns` column values each.
    pub fn new(key_len: usize, columns: usize) -> Self {
        Self {
            bytes: Vec::new(),
            starts: Vec::new(),
            key_len,
            columns,
            ints: Vec::new(),
            ints_order: None,
        }
    }

    /// Drop every row, keeping the buffers' capacity and the shape.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.starts.clear();
        self.ints.clear();
        self.ints_order = None;
    }

    /// Drop every row and change the shape.
    pub fn reset(&mut self, key_len: usize, columns: usize) {
        self.clear();
        self.key_len = key_len;
        self.columns = columns;
    }

    /// Rows in the batch.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    /// Whether the batch holds no row.
    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Key values per row.
    pub fn key_len(&self) -> usize {
        self.key_len
    }

    /// Column values per row.
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Bytes of framed rows held.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Append a row given as key values and column values (in mapping order).
    pub fn push_row(&mut self, key: &[Value], columns: &[Value]) -> Result<(), ShapeMismatch> {
        if key.len() != self.key_len || columns.len() != self.columns {
            return Err(ShapeMismatch {
                key_len: key.len(),
                columns: columns.len(),
                expected_key_len: self.key_len,
                expected_columns: self.columns,
            });
        }
        self.begin_row();
        for value in key.iter().chain(columns) {
            self.push_value(value.as_deref());
        }
        Ok(())
    }

    /// [`RowBatch::push_row`] for an owned [`Row`].
    pub fn push(&mut self, row: &Row) -> Result<(), ShapeMismatch> {
        self.push_row(&row.key, &row.columns)
    }

    /// The row at `index`.
    ///
    /// # Panics
    ///
    /// When `index` is not below [`RowBatch::len`].
    pub fn row(&self, index: usize) -> RowRef<'_> {
        let start = self.starts[index];
        let end = self
            .starts
            .get(index + 1)
            .copied()
            .unwrap_or(self.bytes.len());
        RowRef {
            bytes: &self.bytes[start..end],
            key_len: self.key_len,
            columns: self.columns,
        }
    }

    /// The framing of the rows `from..to`, contiguous: what a chunk digest is fed.
    pub fn rows_bytes(&self, from: usize, to: usize) -> &[u8] {
        if from >= to {
            return &[];
        }
        let start = self.starts[from];
        let end = self.starts.get(to).copied().unwrap_or(self.bytes.len());
        &self.bytes[start..end]
    }

    /// Work out every row's integer key under `order` now ([`KeyComparator::integer_key`]), for
    /// example on the producer's thread while the rows are still in its cache: a comparison under
    /// the same order then reads it from this dense index instead of from the rows. Rows added
    /// later make the index stale, and it is then ignored.
    pub fn index_keys(&mut self, order: &KeyOrder) {
        self.ints.clear();
        for index in 0..self.len() {
            let int = order
                .integer_key(self.row(index).key())
                .and_then(|v| i64::try_from(v).ok())
                .unwrap_or(NO_INT);
            self.ints.push(int);
        }
        match &mut self.ints_order {
            Some(current) => current.clone_from(order),
            None => self.ints_order = Some(order.clone()),
        }
    }

    /// The integer keys [`RowBatch::index_keys`] worked out under `order`, if it did for every
    /// row; [`NO_INT`] marks a row to compare in full.
    #[inline]
    pub(crate) fn key_index(&self, order: &KeyOrder) -> Option<&[i64]> {
        (self.ints.len() == self.starts.len() && self.ints_order.as_ref() == Some(order))
            .then_some(&self.ints[..])
    }

    /// Start a row; its key values and then its column values follow through the `push_*`
    /// methods, exactly `key_len + columns` of them.
    #[inline]
    pub(crate) fn begin_row(&mut self) {
        self.starts.push(self.bytes.len());
    }

    /// Append one framed value of the current row.
    #[inline]
    pub(crate) fn push_value(&mut self, value: Option<&[u8]>) {
        match value {
            None => {
                let mut header = [0u8; HEADER];
                header[0] = TAG_NULL;
                self.bytes.extend_from_slice(&header);
            }
            Some(bytes) => {
                let mut header = [0u8; HEADER];
                header[0] = TAG_VALUE;
                header[1..].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
                self.bytes.extend_from_slice(&header);
                self.bytes.extend_from_slice(bytes);
            }
        }
    }

    /// Append the non-NULL value `data[start..end]` to the current row. Short values are
    /// copied as one fixed-size window when `data` has the bytes (then cut back to the value),
    /// which is much cheaper than a variable-length copy.
    #[inline]
    pub(crate) fn push_value_from(&mut self, data: &[u8], start: usize, end: usize) {
        const WINDOW: usize = 16;
        let len = end - start;
        let mut header = [0u8; HEADER];
        header[0] = TAG_VALUE;
        header[1..].copy_from_slice(&(len as u64).to_le_bytes());
        self.bytes.extend_from_slice(&header);
        match data.get(start..).and_then(<[u8]>::first_chunk::<WINDOW>) {
            Some(window) if len <= WINDOW => {
                let at = self.bytes.len();
                self.bytes.extend_from_slice(window);
                self.bytes.truncate(at + len);
            }
            _ => self.bytes.extend_from_slice(&data[start..end]),
        }
    }

    /// Start a non-NULL value whose bytes the caller appends to [`RowBatch::value_buffer`];
    /// [`RowBatch::end_value`] with the returned mark fills in its length.
    #[inline]
    pub(crate) fn begin_value(&mut self) -> usize {
        let mark = self.bytes.len();
        let mut header = [0u8; HEADER];
        header[0] = TAG_VALUE;
        self.bytes.extend_from_slice(&header);
        mark
    }

    /// Where the bytes of a value started with [`RowBatch::begin_value`] go.
    #[inline]
    pub(crate) fn value_buffer(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Finish a value started with [`RowBatch::begin_value`].
    #[inline]
    pub(crate) fn end_value(&mut self, mark: usize) {
        let len = (self.bytes.len() - mark - HEADER) as u64;
        self.bytes[mark + 1..mark + HEADER].copy_from_slice(&len.to_le_bytes());
    }
}

/// Decode the framed value at the start of `bytes`: the value and the bytes after it.
///
/// Batches are only ever written through [`RowBatch`], so the framing is well formed; a
/// truncated frame decodes as the bytes that are there.
#[inline]
fn split_value(bytes: &[u8]) -> (Option<&[u8]>, &[u8]) {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER>() else {
        return (None, &[]);
    };
    if header[0] == TAG_NULL {
        return (None, rest);
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[1..]);
    let len = usize::try_from(u64::from_le_bytes(len))
        .unwrap_or(usize::MAX)
        .min(rest.len());
    let (value, rest) = rest.split_at(len);
    (Some(value), rest)
}

/// Skip `count` framed values at the start of `bytes`.
#[inline]
fn skip_values(mut bytes: &[u8], count: usize) -> &[u8] {
    for _ in 0..count {
        bytes = split_value(bytes).1;
    }
    bytes
}

/// The framed values at the start of some bytes, decoded one by one.
#[derive(Clone, Debug)]
pub struct Values<'a> {
    bytes: &'a [u8],
    left: usize,
}

impl<'a> Iterator for Values<'a> {
    type Item = Option<&'a [u8]>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (value, rest) = split_value(self.bytes);
        self.bytes = rest;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Values<'_> {}

/// One row of a [`RowBatch`].
#[derive(Clone, Copy, Debug)]
pub struct RowRef<'a> {
    bytes: &'a [u8],
    key_len: usize,
    columns: usize,
}

impl<'a> RowRef<'a> {
    /// The row's whole framing (key values, then column values).
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The row's key.
    #[inline]
    pub fn key(&self) -> KeyRef<'a> {
        KeyRef {
            bytes: self.bytes,
            len: self.key_len,
        }
    }

    /// The framing of the column values alone (the canonical encoding of the columns).
    pub fn columns_bytes(&self) -> &'a [u8] {
        skip_values(self.bytes, self.key_len)
    }

    /// The column values in mapping order.
    pub fn columns(&self) -> Values<'a> {
        Values {
            bytes: self.columns_bytes(),
            left: self.columns,
        }
    }

    /// The row as an owned [`Row`].
    pub fn to_row(&self) -> Row {
        Row::new(
            self.key().to_key(),
            self.columns().map(|v| v.map(<[u8]>::to_vec)).collect(),
        )
    }
}

/// The key values of a row of a [`RowBatch`].
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'a> {
    bytes: &'a [u8],
    len: usize,
}

impl<'a> KeyRef<'a> {
    /// Number of key values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the key has no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The key values in key order.
    #[inline]
    pub fn values(&self) -> Values<'a> {
        Values {
            bytes: self.bytes,
            left: self.len,
        }
    }

    /// The framing of the key values alone.
    pub fn bytes(&self) -> &'a [u8] {
        let rest = skip_values(self.bytes, self.len);
        &self.bytes[..self.bytes.len() - rest.len()]
    }

    /// The key as owned values.
    pub fn to_key(&self) -> Key {
        self.values().map(|v| v.map(<[u8]>::to_vec)).collect()
    }
}

/// Decode a canonical encoding of `count` values (as [`crate::canonical::encode_row`] writes it)
/// into owned values.
pub(crate) fn decode_values(bytes: &[u8], count: usize) -> Vec<Value> {
    Values { bytes, left: count }
        .map(|v| v.map(<[u8]>::to_vec))
        .collect()
}

/// Decode an entry of [`RowBatch::key_index`].
#[inline]
pub(crate) fn index_int(value: i64) -> Option<i128> {
    (value != NO_INT).then_some(i128::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::encode_owned_row;
    use crate::chunk::encode_chunk_row;

    fn text(value: &str) -> Value {
        Some(value.as_bytes().to_vec())
    }

    #[test]
    fn framing_equals_the_chunk_encoding() {
        let rows = vec![
            Row::new(vec![text("1")], vec![text("1"), None, text("")]),
            Row::new(vec![text("2")], vec![text("2"), text("NULL"), text("\\N")]),
            Row::new(vec![None], vec![None, text("x\ty"), text("é")]),
        ];
        let mut batch = RowBatch::new(1, 3);
        let mut expected = Vec::new();
        for row in &rows {
            batch.push(row).expect("shape");
            encode_chunk_row(&mut expected, row);
        }
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.rows_bytes(0, 3), &expected[..]);
        assert_eq!(batch.rows_bytes(1, 1), b"");
        for (index, row) in rows.iter().enumerate() {
            let view = batch.row(index);
            assert_eq!(view.to_row(), *row);
            assert_eq!(view.key().to_key(), row.key);
            let mut key = Vec::new();
            encode_owned_row(&mut key, &row.key);
            assert_eq!(view.key().bytes(), &key[..]);
            let mut columns = Vec::new();
            encode_owned_row(&mut columns, &row.columns);
            assert_eq!(view.columns_bytes(), &columns[..]);
            assert_eq!(decode_values(&columns, 3), row.columns);
        }
    }

    #[test]
    fn shape_is_enforced_and_clear_keeps_it() {
        let mut batch = RowBatch::new(1, 2);
        assert_eq!(
            batch.push_row(&[None], &[None]),
            Err(ShapeMismatch {
                key_len: 1,
                columns: 1,
                expected_key_len: 1,
                expected_columns: 2
            })
        );
        assert!(batch.is_empty());
        batch
            .push_row(&[text("a")], &[text("a"), None])
            .expect("row");
        batch.clear();
        assert!(batch.is_empty());
        assert_eq!((batch.key_len(), batch.columns()), (1, 2));
        batch.reset(0, 1);
        batch.push_row(&[], &[text("b")]).expect("row");
        assert_eq!(batch.row(0).to_row(), Row::new(vec![], vec![text("b")]));
    }

    #[test]
    fn values_written_in_place_get_their_length() {
        let mut batch = RowBatch::new(0, 2);
        batch.begin_row();
        let mark = batch.begin_value();
        batch.value_buffer().extend_from_slice(b"abc");
        batch.end_value(mark);
        batch.push_value(None);
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch.row(0).to_row(),
            Row::new(vec![], vec![text("abc"), None])
        );
    }
}
