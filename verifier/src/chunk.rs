//! Chunked comparison of two key-ordered row streams, and multiset comparison of keyless tables.
//!
//! # Keyed tables
//!
//! Both sides deliver rows in ascending key order (the reader runs `COPY (SELECT … ORDER BY key)
//! TO STDOUT` under a snapshot). The **source** side defines chunk boundaries: every
//! [`CompareOptions::chunk_rows`] source rows close a chunk whose upper bound is the last source
//! key; the **target** side is cut at that same key, so both chunks cover the same key range no
//! matter how many rows are missing or extra on the target. Rows arrive in [`RowBatch`]es, one
//! buffer per batch already holding the canonical encoding ([`crate::canonical`], key then
//! columns per row), so a chunk's digest is one blake3 hasher per side fed the batches' bytes
//! directly. On the equal path that is the whole cost besides the order checks: no per-row
//! digests and no per-row allocations (perf-anchors §3: bulk blake3 over PK-ordered chunks costs
//! ~0.2 s per 10 M rows, per-row digests ~1.6 s). Producers may index each batch's integer keys
//! ([`RowBatch::index_keys`]) on their own thread, so the order checks and chunk bounds compare
//! numbers from a dense array. Owned [`Row`]s ([`compare_keyed`]) are packed into batches first.
//!
//! Only a chunk whose digests differ (or whose row counts already differ) is narrowed: a merge of
//! the two buffered chunks by key reports every key as [`Difference::Missing`] (on the target),
//! [`Difference::Extra`] or [`Difference::Different`] with the indexes of the differing columns;
//! only reported keys are copied out of the batches. Memory is bounded by one source chunk plus
//! at most `2 × chunk_rows` buffered target rows (and the batches they straddle; every other
//! batch is handed back to its producer through [`BatchSource::recycle`]); if the target has more
//! rows in one range (a bulk of extra rows), the rest of that range is merged straight from the
//! stream without buffering.
//!
//! # Key order is the caller's
//!
//! The merge never guesses an order. The caller passes a comparator that **must agree with the
//! order the database produced**: for text keys read with `ORDER BY key COLLATE "C"` that is the
//! byte order of the values ([`ColumnOrder::Bytes`], hard case 25: never the column's own
//! collation, which drifts between glibc versions); integer keys are ordered numerically by the
//! database (`9 < 10`, `-1 < 0`) while their text is not, so they need [`ColumnOrder::Integer`] (or
//! a custom comparator). Because a mismatch between comparator and database order would turn into
//! false differences, both streams are checked to be strictly increasing under the comparator, and
//! a violation is an error ([`CompareError::OutOfOrder`], [`CompareError::DuplicateKey`]), never a
//! silent report.
//!
//! # Keyless tables
//!
//! Tables without a key (hard case 4) are compared as **multisets**: a signed count per
//! [`crate::canonical::row_digest`] (of the batch's encoding of the columns), `+1` per source row
//! and `−1` per target row. Rows whose count returns to zero are dropped at once, so reading both
//! sides interleaved keeps the tally small when their physical orders are similar; the worst case
//! holds every unmatched distinct row.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::batch::{KeyRef, RowBatch, RowRef, decode_values, index_int};
use crate::canonical::{domain_hasher, encode_owned_row};

/// One column value as PostgreSQL text, `None` for SQL NULL.
pub type Value = Option<Vec<u8>>;

/// The key columns' values of a row, in key order.
pub type Key = Vec<Value>;

/// Bytes of encoded rows the chunk buffer collects before handing them to the hasher; large enough
/// for blake3's SIMD paths, small enough to stay in cache.
const HASH_FLUSH_BYTES: usize = 64 * 1024;

/// One row as read from either side.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Row {
    /// Values of the key columns (may repeat values that also appear in `columns`).
    pub key: Key,
    /// Values of all compared columns, in mapping order.
    pub columns: Vec<Value>,
}

impl Row {
    /// Build a row from its key and column values.
    pub fn new(key: Key, columns: Vec<Value>) -> Self {
        Self { key, columns }
    }
}

/// Which side of the comparison a row or an error belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The source database (the truth).
    Source,
    /// The target database.
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// One row-level difference of a keyed table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Difference {
    /// The key exists on the source but not on the target.
    Missing {
        /// The missing key.
        key: Key,
    },
    /// The key exists on the target but not on the source.
    Extra {
        /// The extra key.
        key: Key,
    },
    /// The key exists on both sides with different column values.
    Different {
        /// The key (as read from the target).
        key: Key,
        /// Indexes into [`Row::columns`] of the differing columns.
        columns: Vec<usize>,
    },
}

impl Difference {
    /// The key this difference is about.
    pub fn key(&self) -> &Key {
        match self {
            Difference::Missing { key }
            | Difference::Extra { key }
            | Difference::Different { key, .. } => key,
        }
    }
}

/// Tuning of a comparison.
#[derive(Clone, Debug)]
pub struct CompareOptions {
    /// Source rows per chunk (the unit of the hash fast path and of narrowing).
    pub chunk_rows: usize,
    /// At most this many differences are kept; all are counted.
    pub max_differences: usize,
    /// Stop at the first chunk boundary after this instant, leaving the rest of both
    /// streams unread; [`KeyedOutcome::resume_after`] then says where to go on. A caller
    /// uses it to renew long-lived snapshots in the middle of a large table.
    pub deadline: Option<std::time::Instant>,
}

impl Default for CompareOptions {
    fn default() -> Self {
        Self {
            chunk_rows: 10_000,
            max_differences: 1_000,
            deadline: None,
        }
    }
}

/// Result of comparing one keyed table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyedOutcome {
    /// Rows read from the source.
    pub source_rows: u64,
    /// Rows read from the target.
    pub target_rows: u64,
    /// Distinct keys examined (union of both sides).
    pub rows_compared: u64,
    /// Chunks compared.
    pub chunks: u64,
    /// Chunks whose digests differed and were narrowed to rows.
    pub chunks_differing: u64,
    /// The first [`CompareOptions::max_differences`] differences, in key order.
    pub differences: Vec<Difference>,
    /// Number of differences found, including those not kept.
    pub differences_total: u64,
    /// Set when the comparison stopped at [`CompareOptions::deadline`]: every key up to and
    /// including this one was compared, none after it.
    pub resume_after: Option<Key>,
}

impl KeyedOutcome {
    /// Whether both sides held exactly the same rows.
    pub fn is_equal(&self) -> bool {
        self.differences_total == 0
    }

    fn record(&mut self, difference: Difference, max: usize) {
        self.differences_total += 1;
        if self.differences.len() < max {
            self.differences.push(difference);
        }
    }
}

/// Why a comparison stopped.
#[derive(Debug, thiserror::Error)]
pub enum CompareError<E> {
    /// Reading a side failed.
    #[error("could not read {side} rows")]
    Read {
        /// The side whose reader failed.
        side: Side,
        /// The reader's error.
        #[source]
        source: E,
    },
    /// A side's keys are not increasing under the supplied comparator: the database order and
    /// the comparator disagree (or the query lacked `ORDER BY`).
    #[error("{side} rows out of key order at row {row}")]
    OutOfOrder {
        /// The offending side.
        side: Side,
        /// 1-based position of the offending row in that side's stream.
        row: u64,
    },
    /// A side delivered the same key twice: the key is not unique under the comparator.
    #[error("duplicate key on {side} at row {row}")]
    DuplicateKey {
        /// The offending side.
        side: Side,
        /// 1-based position of the offending row in that side's stream.
        row: u64,
    },
    /// A row's key or column count differs from the first row's.
    #[error("{side} row {row} has {found} {what}, expected {expected}")]
    Shape {
        /// The offending side.
        side: Side,
        /// 1-based position of the offending row in that side's stream.
        row: u64,
        /// `"key columns"` or `"columns"`.
        what: &'static str,
        /// Count established by the first row.
        expected: usize,
        /// Count of the offending row.
        found: usize,
    },
}

/// How one key column is ordered by the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ColumnOrder {
    /// Byte order of the text form: `text`/`varchar` under `COLLATE "C"`, `uuid`, `bytea` (hex).
    Bytes,
    /// Numeric order of an integer column (`int2`, `int4`, `int8`, integral `numeric`), parsed
    /// from its text; unparseable text falls back to byte order (and then most likely trips the
    /// order check, which is the point).
    Integer,
}

/// Per-column key order with PostgreSQL's default `ASC NULLS LAST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyOrder {
    columns: Vec<ColumnOrder>,
}

impl KeyOrder {
    /// The per-column rules.
    pub fn columns(&self) -> &[ColumnOrder] {
        &self.columns
    }

    /// Order by the given per-column rules; keys longer than the list compare extra columns by
    /// bytes.
    pub fn new(columns: Vec<ColumnOrder>) -> Self {
        Self { columns }
    }

    /// Byte order on every column.
    pub fn bytes() -> Self {
        Self::new(Vec::new())
    }

    /// Compare two keys.
    pub fn compare(&self, a: &[Value], b: &[Value]) -> Ordering {
        for (index, (x, y)) in a.iter().zip(b).enumerate() {
            let rule = self
                .columns
                .get(index)
                .copied()
                .unwrap_or(ColumnOrder::Bytes);
            let ordering = match (x, y) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => compare_value(rule, x, y),
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        a.len().cmp(&b.len())
    }

    /// The rule of key column `index`.
    #[inline]
    fn rule(&self, index: usize) -> ColumnOrder {
        self.columns
            .get(index)
            .copied()
            .unwrap_or(ColumnOrder::Bytes)
    }
}

/// Orders the keys of rows held in [`RowBatch`]es; it **must agree with the order the database
/// produced** (see the module docs), and like any order it finds a key equal to itself (rows with
/// the very same bytes are matched without asking it).
///
/// Implemented by [`KeyOrder`] (which reads the values straight from the batch) and by any
/// `Fn(&[Value], &[Value]) -> Ordering` (which is handed owned copies of both keys, so it is
/// only meant for tests and small inputs).
pub trait KeyComparator {
    /// Compare two keys.
    fn compare_keys(&self, a: KeyRef<'_>, b: KeyRef<'_>) -> Ordering;

    /// A number that orders keys exactly as [`KeyComparator::compare_keys`] does whenever both
    /// keys have one (for example a single integer column), so the comparison can work out each
    /// row's once and compare numbers. `None` (the default) always asks `compare_keys`.
    fn integer_key(&self, key: KeyRef<'_>) -> Option<i128> {
        let _ = key;
        None
    }

    /// [`KeyComparator::integer_key`] of every row of `batch`, if the batch holds them already
    /// (see [`RowBatch::index_keys`]), as [`RowBatch`]'s dense index.
    #[doc(hidden)]
    fn key_index<'b>(&self, batch: &'b RowBatch) -> Option<&'b [i64]> {
        let _ = batch;
        None
    }
}

impl KeyComparator for KeyOrder {
    #[inline]
    fn compare_keys(&self, a: KeyRef<'_>, b: KeyRef<'_>) -> Ordering {
        for (index, (x, y)) in a.values().zip(b.values()).enumerate() {
            let ordering = match (x, y) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => compare_value(self.rule(index), x, y),
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        a.len().cmp(&b.len())
    }

    /// A single integer key column's value: two such keys compare by it alone (a NULL or
    /// unparseable value has none and takes the general path).
    #[inline]
    fn integer_key(&self, key: KeyRef<'_>) -> Option<i128> {
        if key.len() != 1 || self.rule(0) != ColumnOrder::Integer {
            return None;
        }
        parse_integer(key.values().next()??)
    }

    #[inline]
    fn key_index<'b>(&self, batch: &'b RowBatch) -> Option<&'b [i64]> {
        batch.key_index(self)
    }
}

impl<F> KeyComparator for F
where
    F: Fn(&[Value], &[Value]) -> Ordering,
{
    fn compare_keys(&self, a: KeyRef<'_>, b: KeyRef<'_>) -> Ordering {
        self(&a.to_key(), &b.to_key())
    }
}

#[inline]
fn compare_value(rule: ColumnOrder, x: &[u8], y: &[u8]) -> Ordering {
    if rule == ColumnOrder::Integer
        && let (Some(x), Some(y)) = (parse_integer(x), parse_integer(y))
    {
        return x.cmp(&y);
    }
    x.cmp(y)
}

/// The integer `text` spells, exactly as `str::parse::<i128>` reads it (optional `+` or `-`,
/// then ASCII digits only), without allocating or checking UTF-8 first.
#[inline]
pub(crate) fn parse_integer(text: &[u8]) -> Option<i128> {
    let (negative, digits) = match text.split_first()? {
        (b'-', rest) => (true, rest),
        (b'+', rest) => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    if digits.len() <= 18 {
        // At most 10^18 - 1: no overflow in a u64.
        let mut value = 0u64;
        for &byte in digits {
            let digit = byte.wrapping_sub(b'0');
            if digit > 9 {
                return None;
            }
            value = value * 10 + u64::from(digit);
        }
        let value = i128::from(value);
        return Some(if negative { -value } else { value });
    }
    let mut value = 0i128;
    for &byte in digits {
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value.checked_mul(10)?;
        value = if negative {
            value.checked_sub(i128::from(digit))?
        } else {
            value.checked_add(i128::from(digit))?
        };
    }
    Some(value)
}

/// Where the rows of one side come from: batches in stream order.
///
/// The comparison hands every batch back through [`BatchSource::recycle`] once it holds no row
/// it still needs, so a producer can reuse the buffers; at most one chunk of rows (plus the
/// batches they straddle) is held at a time.
pub trait BatchSource {
    /// What a failed read reports.
    type Error;

    /// The next batch, `None` at the end of the stream.
    fn next_batch(&mut self) -> Option<Result<RowBatch, Self::Error>>;

    /// A batch the comparison is done with.
    fn recycle(&mut self, batch: RowBatch) {
        drop(batch);
    }
}

/// Rows per batch when owned [`Row`]s are compared (they are packed into batches first).
const ROWS_PER_PACKED_BATCH: usize = 256;

/// A [`BatchSource`] over owned rows: packs them into batches of one shape.
struct PackedRows<I, E> {
    rows: I,
    batch_rows: usize,
    /// Keyless comparison: keys are ignored (packed as empty).
    keyless: bool,
    /// A row that did not fit the previous batch's shape, or an error to report after the rows
    /// read before it.
    pending: Option<Result<Row, E>>,
    spare: Vec<RowBatch>,
}

impl<I, E> PackedRows<I, E>
where
    I: Iterator<Item = Result<Row, E>>,
{
    fn new(rows: I, batch_rows: usize, keyless: bool) -> Self {
        Self {
            rows,
            batch_rows: batch_rows.max(1),
            keyless,
            pending: None,
            spare: Vec::new(),
        }
    }

    fn shape(&self, row: &Row) -> (usize, usize) {
        let key_len = if self.keyless { 0 } else { row.key.len() };
        (key_len, row.columns.len())
    }

    fn push(&self, batch: &mut RowBatch, row: &Row) {
        let key: &[Value] = if self.keyless { &[] } else { &row.key };
        // The batch was shaped after this row (or one of the same shape).
        let _ = batch.push_row(key, &row.columns);
    }
}

impl<I, E> BatchSource for PackedRows<I, E>
where
    I: Iterator<Item = Result<Row, E>>,
{
    type Error = E;

    fn next_batch(&mut self) -> Option<Result<RowBatch, E>> {
        let first = match self.pending.take() {
            Some(Err(error)) => return Some(Err(error)),
            Some(Ok(row)) => row,
            None => match self.rows.next()? {
                Err(error) => return Some(Err(error)),
                Ok(row) => row,
            },
        };
        let (key_len, columns) = self.shape(&first);
        let mut batch = self.spare.pop().unwrap_or_default();
        batch.reset(key_len, columns);
        self.push(&mut batch, &first);
        while batch.len() < self.batch_rows {
            match self.rows.next() {
                None => break,
                Some(Ok(row)) if self.shape(&row) == (key_len, columns) => {
                    self.push(&mut batch, &row);
                }
                Some(other) => {
                    self.pending = Some(other);
                    break;
                }
            }
        }
        Some(Ok(batch))
    }

    fn recycle(&mut self, batch: RowBatch) {
        if self.spare.len() < 2 {
            self.spare.push(batch);
        }
    }
}

/// A row's place in a [`Stream`]: the sequence number of its batch and its index there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    seq: u64,
    row: usize,
}

/// One side's batches with a cursor, one row of lookahead, order and shape checks.
///
/// Rows are checked (shape, order, counted) the first time they are looked at, in stream order,
/// exactly once. Batches stay held until [`Stream::release`] finds no row of them needed.
struct Stream<B> {
    side: Side,
    source: B,
    /// Keyed comparison: keys must be strictly increasing. Otherwise (multiset) keys are ignored.
    ordered: bool,
    held: std::collections::VecDeque<RowBatch>,
    /// Sequence number of `held[0]`.
    first_seq: u64,
    /// The next row to take; its `row` may equal its batch's length (then the next batch's first
    /// row is next), and its `seq` may be one past the held batches (not loaded yet).
    cursor: Pos,
    /// Whether the row at `cursor` has been checked already (looked at, not taken).
    peeked: bool,
    /// The last checked row: the one the next row's key is checked against.
    last: Option<Pos>,
    /// [`KeyComparator::integer_key`] of `last`'s key (keyed streams).
    last_int: Option<i128>,
    /// Rows checked so far (the 1-based number of `last`).
    read: u64,
    done: bool,
}

impl<B: BatchSource> Stream<B> {
    fn new(side: Side, source: B, ordered: bool) -> Self {
        Self {
            side,
            source,
            ordered,
            held: std::collections::VecDeque::new(),
            first_seq: 0,
            cursor: Pos { seq: 0, row: 0 },
            peeked: false,
            last: None,
            last_int: None,
            read: 0,
            done: false,
        }
    }

    #[inline]
    fn batch(&self, seq: u64) -> &RowBatch {
        &self.held[(seq - self.first_seq) as usize]
    }

    #[inline]
    fn row(&self, pos: Pos) -> RowRef<'_> {
        self.batch(pos.seq).row(pos.row)
    }

    #[inline]
    fn key(&self, pos: Pos) -> KeyRef<'_> {
        self.row(pos).key()
    }

    /// Look at the next row without taking it (checking it the first time).
    #[inline]
    fn peek<C>(
        &mut self,
        order: &C,
        shape: &mut Shape,
    ) -> Result<Option<Pos>, CompareError<B::Error>>
    where
        C: KeyComparator + ?Sized,
    {
        if self.peeked {
            return Ok(Some(self.cursor));
        }
        if self.done {
            return Ok(None);
        }
        loop {
            let index = (self.cursor.seq - self.first_seq) as usize;
            match self.held.get(index) {
                Some(batch) if self.cursor.row < batch.len() => break,
                Some(_) => {
                    self.cursor = Pos {
                        seq: self.cursor.seq + 1,
                        row: 0,
                    };
                }
                None => match self.source.next_batch() {
                    None => {
                        self.done = true;
                        return Ok(None);
                    }
                    Some(Err(source)) => {
                        return Err(CompareError::Read {
                            side: self.side,
                            source,
                        });
                    }
                    Some(Ok(batch)) if batch.is_empty() => self.source.recycle(batch),
                    Some(Ok(batch)) => self.held.push_back(batch),
                },
            }
        }
        let pos = self.cursor;
        self.read += 1;
        if pos.row == 0 {
            // Every row of a batch has the batch's shape.
            let batch = self.batch(pos.seq);
            // A keyless comparison ignores keys, as if every row had none.
            let key_len = if self.ordered { batch.key_len() } else { 0 };
            let columns = batch.columns();
            shape.check(self.side, self.read, key_len, columns)?;
        }
        if self.ordered {
            let batch = self.batch(pos.seq);
            let int = match order.key_index(batch) {
                Some(index) => index_int(index[pos.row]),
                None => order.integer_key(batch.row(pos.row).key()),
            };
            let ordering = match (self.last, self.last_int, int) {
                (None, _, _) => Ordering::Less,
                (Some(_), Some(last), Some(int)) => last.cmp(&int),
                (Some(last), _, _) => order.compare_keys(self.key(last), self.key(pos)),
            };
            self.last_int = int;
            match ordering {
                Ordering::Less => {}
                Ordering::Equal => {
                    return Err(CompareError::DuplicateKey {
                        side: self.side,
                        row: self.read,
                    });
                }
                Ordering::Greater => {
                    return Err(CompareError::OutOfOrder {
                        side: self.side,
                        row: self.read,
                    });
                }
            }
        }
        self.last = Some(pos);
        self.peeked = true;
        Ok(Some(pos))
    }

    /// The fast path of [`Stream::next`] / [`Stream::next_within`]: take up to `max` rows of the
    /// current batch in one go, as long as they follow the last checked row in that batch, have
    /// an indexed integer key ([`RowBatch::index_keys`]), are strictly increasing and within
    /// `bound`. Each is checked exactly as [`Stream::peek`] would; whatever stops the run (the end
    /// of the batch, a row the general path must look at, a violation to report, a row past the
    /// bound) is left to the general path. Returns the rows taken.
    #[inline]
    fn take_run<C>(&mut self, max: usize, bound: Option<Bound<'_>>, order: &C) -> usize
    where
        C: KeyComparator + ?Sized,
    {
        let (Some(last), Some(mut last_int)) = (self.last, self.last_int) else {
            return 0;
        };
        if self.peeked
            || !self.ordered
            || last.seq != self.cursor.seq
            || last.row + 1 != self.cursor.row
        {
            return 0;
        }
        let limit = match bound {
            None => i128::MAX,
            Some(Bound { int: Some(int), .. }) => int,
            Some(_) => return 0,
        };
        let Some(batch) = self.held.get((self.cursor.seq - self.first_seq) as usize) else {
            return 0;
        };
        let Some(index) = order.key_index(batch) else {
            return 0;
        };
        let from = self.cursor.row;
        let end = index.len().min(from.saturating_add(max));
        let mut row = from;
        while row < end {
            let Some(int) = index_int(index[row]) else {
                break;
            };
            if int <= last_int || int > limit {
                break;
            }
            last_int = int;
            row += 1;
        }
        let taken = row - from;
        if taken > 0 {
            self.read += taken as u64;
            self.last = Some(Pos {
                seq: self.cursor.seq,
                row: row - 1,
            });
            self.last_int = Some(last_int);
            self.cursor.row = row;
        }
        taken
    }

    /// Take the next row.
    #[inline]
    fn next<C>(
        &mut self,
        order: &C,
        shape: &mut Shape,
    ) -> Result<Option<Pos>, CompareError<B::Error>>
    where
        C: KeyComparator + ?Sized,
    {
        let pos = self.peek(order, shape)?;
        if pos.is_some() {
            self.cursor.row += 1;
            self.peeked = false;
        }
        Ok(pos)
    }

    /// Take the next row if its key is within `bound` (inclusive; `None` = unbounded).
    #[inline]
    fn next_within<C>(
        &mut self,
        bound: Option<Bound<'_>>,
        order: &C,
        shape: &mut Shape,
    ) -> Result<Option<Pos>, CompareError<B::Error>>
    where
        C: KeyComparator + ?Sized,
    {
        let Some(pos) = self.peek(order, shape)? else {
            return Ok(None);
        };
        if let Some(bound) = bound {
            // The peeked row is the last checked one: `last_int` is its number.
            let ordering = match (self.last_int, bound.int) {
                (Some(int), Some(bound)) => int.cmp(&bound),
                _ => order.compare_keys(self.key(pos), bound.key),
            };
            if ordering == Ordering::Greater {
                return Ok(None);
            }
        }
        self.cursor.row += 1;
        self.peeked = false;
        Ok(Some(pos))
    }

    /// `pos`, or the first row of the next batch when `pos` is past the end of its batch.
    #[inline]
    fn normalize(&self, pos: Pos) -> Pos {
        match self.held.get((pos.seq - self.first_seq) as usize) {
            Some(batch) if pos.row >= batch.len() => Pos {
                seq: pos.seq + 1,
                row: 0,
            },
            _ => pos,
        }
    }

    /// Call `each` with the framing of the `count` rows from `start` on, one run per batch.
    fn for_each_run(&self, start: Pos, mut count: usize, mut each: impl FnMut(&[u8])) {
        let mut pos = self.normalize(start);
        while count > 0 {
            let Some(batch) = self.held.get((pos.seq - self.first_seq) as usize) else {
                return;
            };
            let to = batch.len().min(pos.row + count);
            each(batch.rows_bytes(pos.row, to));
            count -= to - pos.row;
            pos = Pos {
                seq: pos.seq + 1,
                row: 0,
            };
        }
    }

    /// Hand back every batch before the one holding the last checked row (the only row the
    /// stream itself still needs). Callers must hold no position in those batches.
    fn release(&mut self) {
        let keep = self.last.map_or(self.cursor.seq, |last| last.seq);
        while self.first_seq < keep {
            match self.held.pop_front() {
                Some(batch) => self.source.recycle(batch),
                None => break,
            }
            self.first_seq += 1;
        }
    }
}

/// The upper bound of a chunk: the last source key, and its
/// [`KeyComparator::integer_key`].
#[derive(Clone, Copy)]
struct Bound<'a> {
    key: KeyRef<'a>,
    int: Option<i128>,
}

/// Shape (key / column counts) fixed by the first row of either side.
#[derive(Default)]
struct Shape {
    key: Option<usize>,
    columns: Option<usize>,
}

impl Shape {
    fn check<E>(
        &mut self,
        side: Side,
        row_number: u64,
        key_len: usize,
        columns: usize,
    ) -> Result<(), CompareError<E>> {
        for (slot, found, what) in [
            (&mut self.key, key_len, "key columns"),
            (&mut self.columns, columns, "columns"),
        ] {
            match *slot {
                None => *slot = Some(found),
                Some(expected) if expected != found => {
                    return Err(CompareError::Shape {
                        side,
                        row: row_number,
                        what,
                        expected,
                        found,
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// Reusable hashing state of one side's chunk.
struct ChunkHasher<'d> {
    domain: &'d [u8],
    bytes: Vec<u8>,
}

impl<'d> ChunkHasher<'d> {
    fn new(domain: &'d [u8]) -> Self {
        Self {
            domain,
            bytes: Vec::with_capacity(HASH_FLUSH_BYTES + 4096),
        }
    }

    fn digest(&mut self, rows: &[Row]) -> [u8; 32] {
        let mut hasher = domain_hasher(self.domain);
        self.bytes.clear();
        for row in rows {
            encode_chunk_row(&mut self.bytes, row);
            if self.bytes.len() >= HASH_FLUSH_BYTES {
                hasher.update(&self.bytes);
                self.bytes.clear();
            }
        }
        hasher.update(&self.bytes);
        *hasher.finalize().as_bytes()
    }
}

/// Append one row as framed inside a chunk: the canonical encoding of its key, then of its
/// columns. Producers that hash chunks elsewhere (for example on a [`crate::hasher::HashPool`])
/// must frame rows with this function (or hold them in a [`RowBatch`], which frames them the
/// same way) so their digests equal [`chunk_digest`]'s.
#[inline]
pub fn encode_chunk_row(out: &mut Vec<u8>, row: &Row) {
    encode_owned_row(out, &row.key);
    encode_owned_row(out, &row.columns);
}

/// Digest of a chunk of rows under `table_domain`, as compared on the fast path.
pub fn chunk_digest(table_domain: &[u8], rows: &[Row]) -> [u8; 32] {
    ChunkHasher::new(table_domain).digest(rows)
}

/// Indexes of the columns whose values differ (a column present on one side only differs).
pub fn differing_columns(source: &[Value], target: &[Value]) -> Vec<usize> {
    (0..source.len().max(target.len()))
        .filter(|&index| source.get(index) != target.get(index))
        .collect()
}

/// [`differing_columns`] of two rows held in batches.
fn differing_columns_of(source: RowRef<'_>, target: RowRef<'_>) -> Vec<usize> {
    let (mut s, mut t) = (source.columns(), target.columns());
    let mut out = Vec::new();
    for index in 0.. {
        match (s.next(), t.next()) {
            (None, None) => break,
            (Some(a), Some(b)) if a == b => {}
            _ => out.push(index),
        }
    }
    out
}

/// Compare two key-ordered streams of one keyed table.
///
/// `table_domain` separates this table's digests from any other's (see
/// [`crate::canonical::table_domain`]); `order` must reproduce the database's `ORDER BY` (see the
/// module docs). Differences come out in key order. The rows are packed into [`RowBatch`]es and
/// compared by [`compare_keyed_batches`].
pub fn compare_keyed<S, T, E, C>(
    table_domain: &[u8],
    source: S,
    target: T,
    order: C,
    options: &CompareOptions,
) -> Result<KeyedOutcome, CompareError<E>>
where
    S: IntoIterator<Item = Result<Row, E>>,
    T: IntoIterator<Item = Result<Row, E>>,
    C: Fn(&[Value], &[Value]) -> Ordering,
{
    compare_keyed_packed(
        table_domain,
        source,
        target,
        &order,
        options,
        ROWS_PER_PACKED_BATCH,
    )
}

fn compare_keyed_packed<S, T, E, C>(
    table_domain: &[u8],
    source: S,
    target: T,
    order: &C,
    options: &CompareOptions,
    batch_rows: usize,
) -> Result<KeyedOutcome, CompareError<E>>
where
    S: IntoIterator<Item = Result<Row, E>>,
    T: IntoIterator<Item = Result<Row, E>>,
    C: KeyComparator + ?Sized,
{
    compare_keyed_batches(
        table_domain,
        PackedRows::new(source.into_iter(), batch_rows, false),
        PackedRows::new(target.into_iter(), batch_rows, false),
        order,
        options,
    )
}

/// Compare two key-ordered streams of row batches of one keyed table (see [`compare_keyed`]).
///
/// Chunks are hashed straight from the batches' framing; rows are only looked at one by one for
/// the order checks, the chunk bounds, and inside chunks whose digests differ.
pub fn compare_keyed_batches<S, T, E, C>(
    table_domain: &[u8],
    source: S,
    target: T,
    order: &C,
    options: &CompareOptions,
) -> Result<KeyedOutcome, CompareError<E>>
where
    S: BatchSource<Error = E>,
    T: BatchSource<Error = E>,
    C: KeyComparator + ?Sized,
{
    let chunk_rows = options.chunk_rows.max(1);
    let target_cap = chunk_rows.saturating_mul(2);
    let mut source = Stream::new(Side::Source, source, true);
    let mut target = Stream::new(Side::Target, target, true);
    let mut shape = Shape::default();
    let mut outcome = KeyedOutcome::default();
    let prefix = domain_hasher(table_domain);

    loop {
        let source_start = source.cursor;
        let mut source_count = 0;
        let mut source_last = None;
        while source_count < chunk_rows {
            let run = source.take_run(chunk_rows - source_count, None, order);
            if run > 0 {
                source_count += run;
                source_last = source.last;
                continue;
            }
            match source.next(order, &mut shape)? {
                Some(pos) => {
                    source_count += 1;
                    source_last = Some(pos);
                }
                None => break,
            }
        }
        // A full chunk is bounded by its last key; the final (short) chunk takes the rest of the
        // target.
        let bound = match source_last {
            Some(last) if source_count == chunk_rows => Some(Bound {
                key: source.key(last),
                int: source.last_int,
            }),
            _ => None,
        };
        let target_start = target.cursor;
        let mut target_count = 0;
        let mut overflow = false;
        loop {
            let run = target.take_run(target_cap - target_count, bound, order);
            if run == 0 && target.next_within(bound, order, &mut shape)?.is_none() {
                break;
            }
            target_count += run.max(1);
            if target_count >= target_cap {
                overflow = true;
                break;
            }
        }
        if source_count == 0 && target_count == 0 {
            break;
        }
        outcome.chunks += 1;
        outcome.source_rows += source_count as u64;
        outcome.target_rows += target_count as u64;

        let equal = !overflow
            && source_count == target_count
            && run_digest(&prefix, &source, source_start, source_count)
                == run_digest(&prefix, &target, target_start, target_count);
        if equal {
            outcome.rows_compared += source_count as u64;
        } else {
            outcome.chunks_differing += 1;
            narrow(
                &source,
                (source_start, source_count),
                &mut target,
                (target_start, target_count),
                overflow.then_some(bound),
                order,
                &mut shape,
                &mut outcome,
                options.max_differences,
            )?;
        }
        // Both sides are read up to the chunk's bound: a clean place to stop.
        let stop_after = match (&bound, options.deadline) {
            (Some(b), Some(deadline)) if std::time::Instant::now() >= deadline => {
                // A key with a NULL cannot be resumed after with `>`: go on instead.
                Some(b.key.to_key()).filter(|k| k.iter().all(Option::is_some))
            }
            _ => None,
        };
        source.release();
        target.release();
        if stop_after.is_some() {
            outcome.resume_after = stop_after;
            break;
        }
    }
    Ok(outcome)
}

/// Digest of the `count` rows of `stream` from `start` on, under the domain prefix `prefix`.
fn run_digest<B: BatchSource>(
    prefix: &blake3::Hasher,
    stream: &Stream<B>,
    start: Pos,
    count: usize,
) -> [u8; 32] {
    let mut hasher = prefix.clone();
    stream.for_each_run(start, count, |bytes| {
        hasher.update(bytes);
    });
    *hasher.finalize().as_bytes()
}

/// Merge one mismatching chunk by key and record every difference. `rest` holds the chunk's
/// bound when the buffered target rows did not cover the whole range: the rest of it is then
/// merged straight from the target stream, whose batches are handed back as it goes.
#[allow(clippy::too_many_arguments)]
fn narrow<S, T, E, C>(
    source: &Stream<S>,
    (source_start, source_count): (Pos, usize),
    target: &mut Stream<T>,
    (target_start, target_count): (Pos, usize),
    rest: Option<Option<Bound<'_>>>,
    order: &C,
    shape: &mut Shape,
    outcome: &mut KeyedOutcome,
    max_differences: usize,
) -> Result<(), CompareError<E>>
where
    S: BatchSource<Error = E>,
    T: BatchSource<Error = E>,
    C: KeyComparator + ?Sized,
{
    let mut source_pos = source_start;
    let mut source_left = source_count;
    let mut next_source = || -> Option<Pos> {
        if source_left == 0 {
            return None;
        }
        source_left -= 1;
        let pos = source.normalize(source_pos);
        source_pos = Pos {
            seq: pos.seq,
            row: pos.row + 1,
        };
        Some(pos)
    };
    let mut target_pos = target_start;
    let mut target_left = target_count;
    let mut next_target = |target: &mut Stream<T>,
                           shape: &mut Shape,
                           outcome: &mut KeyedOutcome|
     -> Result<Option<Pos>, CompareError<E>> {
        if target_left > 0 {
            target_left -= 1;
            let pos = target.normalize(target_pos);
            target_pos = Pos {
                seq: pos.seq,
                row: pos.row + 1,
            };
            return Ok(Some(pos));
        }
        match rest {
            Some(bound) => {
                let pos = target.next_within(bound, order, shape)?;
                if pos.is_some() {
                    outcome.target_rows += 1;
                    // Past the buffered rows only the current one is needed.
                    target.release();
                }
                Ok(pos)
            }
            None => Ok(None),
        }
    };
    let mut current_source = next_source();
    let mut current_target = next_target(target, shape, outcome)?;
    loop {
        let ordering = match (current_source, current_target) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            // The same framing is the same key (and the same row).
            (Some(s), Some(t)) if source.row(s).bytes() == target.row(t).bytes() => Ordering::Equal,
            (Some(s), Some(t)) => order.compare_keys(source.key(s), target.key(t)),
        };
        outcome.rows_compared += 1;
        match (ordering, current_source, current_target) {
            (Ordering::Less, Some(s), _) => {
                let key = source.key(s).to_key();
                outcome.record(Difference::Missing { key }, max_differences);
                current_source = next_source();
            }
            (Ordering::Greater, _, Some(t)) => {
                let key = target.key(t).to_key();
                outcome.record(Difference::Extra { key }, max_differences);
                current_target = next_target(target, shape, outcome)?;
            }
            (Ordering::Equal, Some(s), Some(t)) => {
                let (s, t) = (source.row(s), target.row(t));
                if s.bytes() != t.bytes() {
                    let columns = differing_columns_of(s, t);
                    if !columns.is_empty() || s.key().bytes() != t.key().bytes() {
                        outcome.record(
                            Difference::Different {
                                key: t.key().to_key(),
                                columns,
                            },
                            max_differences,
                        );
                    }
                }
                current_source = next_source();
                current_target = next_target(target, shape, outcome)?;
            }
            _ => break,
        }
    }
    Ok(())
}

/// One unmatched distinct row of a keyless table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultisetDifference {
    /// [`Side::Source`]: the row is missing on the target; [`Side::Target`]: it is extra there.
    pub side: Side,
    /// The row's values.
    pub columns: Vec<Value>,
    /// How many more copies that side has than the other.
    pub count: u64,
}

/// Result of comparing one keyless table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MultisetOutcome {
    /// Rows read from the source.
    pub source_rows: u64,
    /// Rows read from the target.
    pub target_rows: u64,
    /// Unmatched distinct rows (all of them, sorted: missing first, then by values).
    pub differences: Vec<MultisetDifference>,
    /// Unmatched rows counting duplicates (sum of [`MultisetDifference::count`]).
    pub differences_total: u64,
}

impl MultisetOutcome {
    /// Whether both sides held the same multiset of rows.
    pub fn is_equal(&self) -> bool {
        self.differences_total == 0
    }
}

/// Signed count per row digest of a keyless table.
pub struct MultisetTally {
    prefix: blake3::Hasher,
    scratch: Vec<u8>,
    /// Per digest: the net count and the row's canonical encoding (its column values).
    entries: HashMap<[u8; 32], (i64, usize, Vec<u8>)>,
    source_rows: u64,
    target_rows: u64,
}

impl MultisetTally {
    /// An empty tally for the table with this domain.
    pub fn new(table_domain: &[u8]) -> Self {
        Self {
            prefix: domain_hasher(table_domain),
            scratch: Vec::new(),
            entries: HashMap::new(),
            source_rows: 0,
            target_rows: 0,
        }
    }

    /// Count one source row.
    pub fn add_source(&mut self, columns: Vec<Value>) {
        self.source_rows += 1;
        self.add_owned(1, &columns);
    }

    /// Count one target row.
    pub fn add_target(&mut self, columns: Vec<Value>) {
        self.target_rows += 1;
        self.add_owned(-1, &columns);
    }

    /// Distinct rows currently unmatched (the tally's memory footprint).
    pub fn unmatched(&self) -> usize {
        self.entries.len()
    }

    fn add_owned(&mut self, delta: i64, columns: &[Value]) {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        encode_owned_row(&mut scratch, columns);
        self.add_encoded(delta, &scratch, columns.len());
        self.scratch = scratch;
    }

    /// Count a row given as the canonical encoding of its `count` column values: its digest is
    /// [`crate::canonical::row_digest`]'s.
    fn add_encoded(&mut self, delta: i64, encoded: &[u8], count: usize) {
        let mut hasher = self.prefix.clone();
        hasher.update(encoded);
        let digest = *hasher.finalize().as_bytes();
        match self.entries.entry(digest) {
            std::collections::hash_map::Entry::Occupied(mut entry) => {
                entry.get_mut().0 += delta;
                if entry.get().0 == 0 {
                    entry.remove();
                }
            }
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert((delta, count, encoded.to_vec()));
            }
        }
    }

    /// The unmatched rows.
    pub fn finish(self) -> MultisetOutcome {
        let mut differences: Vec<MultisetDifference> = self
            .entries
            .into_values()
            .map(|(net, count, encoded)| MultisetDifference {
                side: if net > 0 { Side::Source } else { Side::Target },
                columns: decode_values(&encoded, count),
                count: net.unsigned_abs(),
            })
            .collect();
        differences.sort_by(|a, b| {
            (a.side == Side::Target)
                .cmp(&(b.side == Side::Target))
                .then_with(|| a.columns.cmp(&b.columns))
        });
        MultisetOutcome {
            source_rows: self.source_rows,
            target_rows: self.target_rows,
            differences_total: differences.iter().map(|d| d.count).sum(),
            differences,
        }
    }
}

/// Compare two keyless tables as multisets of rows (only [`Row::columns`] is used), reading the
/// two sides alternately so matching rows cancel early.
pub fn compare_multiset<S, T, E>(
    table_domain: &[u8],
    source: S,
    target: T,
) -> Result<MultisetOutcome, CompareError<E>>
where
    S: IntoIterator<Item = Result<Row, E>>,
    T: IntoIterator<Item = Result<Row, E>>,
{
    compare_multiset_batches(
        table_domain,
        PackedRows::new(source.into_iter(), ROWS_PER_PACKED_BATCH, true),
        PackedRows::new(target.into_iter(), ROWS_PER_PACKED_BATCH, true),
    )
}

/// [`compare_multiset`] over row batches; the batches' key values (if any) are ignored.
pub fn compare_multiset_batches<S, T, E>(
    table_domain: &[u8],
    source: S,
    target: T,
) -> Result<MultisetOutcome, CompareError<E>>
where
    S: BatchSource<Error = E>,
    T: BatchSource<Error = E>,
{
    let mut tally = MultisetTally::new(table_domain);
    let mut shape = Shape::default();
    let mut source = Stream::new(Side::Source, source, false);
    let mut target = Stream::new(Side::Target, target, false);
    // Keyless streams are not ordered: the comparator is never asked.
    let order = KeyOrder::bytes();
    let (mut source_done, mut target_done) = (false, false);
    while !(source_done && target_done) {
        if !source_done {
            source_done = !tally_next(&mut source, &mut tally, &mut shape, &order)?;
        }
        if !target_done {
            target_done = !tally_next(&mut target, &mut tally, &mut shape, &order)?;
        }
    }
    Ok(tally.finish())
}

/// Count the next row of a keyless stream into `tally`; `false` at the end of the stream.
fn tally_next<B: BatchSource>(
    stream: &mut Stream<B>,
    tally: &mut MultisetTally,
    shape: &mut Shape,
    order: &KeyOrder,
) -> Result<bool, CompareError<B::Error>> {
    let Some(pos) = stream.next(order, shape)? else {
        return Ok(false);
    };
    let delta = match stream.side {
        Side::Source => {
            tally.source_rows += 1;
            1
        }
        Side::Target => {
            tally.target_rows += 1;
            -1
        }
    };
    let columns = stream.batch(pos.seq).columns();
    tally.add_encoded(delta, stream.row(pos).columns_bytes(), columns);
    if pos.row == 0 {
        // Rows of earlier batches are counted: hand those batches back.
        stream.release();
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;

    use super::*;

    const DOMAIN: &[u8] = b"public.accounts";

    fn text(value: &str) -> Value {
        Some(value.as_bytes().to_vec())
    }

    /// A row keyed by integer `id` with columns `(id, name, note)`.
    fn row(id: i64, name: Value, note: Value) -> Row {
        Row::new(
            vec![text(&id.to_string())],
            vec![text(&id.to_string()), name, note],
        )
    }

    fn table(n: i64) -> Vec<Row> {
        (1..=n)
            .map(|id| {
                row(
                    id,
                    text(&format!("name-{id}")),
                    text(&format!("n{}", id % 7)),
                )
            })
            .collect()
    }

    fn integer_order() -> impl Fn(&[Value], &[Value]) -> Ordering {
        let order = KeyOrder::new(vec![ColumnOrder::Integer]);
        move |a, b| order.compare(a, b)
    }

    fn ok(rows: &[Row]) -> impl Iterator<Item = Result<Row, Infallible>> + '_ {
        rows.iter().cloned().map(Ok)
    }

    /// Batches handed out in order; counts those not handed back yet.
    struct VecBatches {
        batches: std::collections::VecDeque<Result<RowBatch, &'static str>>,
        outstanding: usize,
        max_outstanding: usize,
    }

    impl VecBatches {
        fn new(batches: Vec<Result<RowBatch, &'static str>>) -> Self {
            Self {
                batches: batches.into(),
                outstanding: 0,
                max_outstanding: 0,
            }
        }
    }

    impl BatchSource for &mut VecBatches {
        type Error = &'static str;

        fn next_batch(&mut self) -> Option<Result<RowBatch, &'static str>> {
            let batch = self.batches.pop_front()?;
            if batch.is_ok() {
                self.outstanding += 1;
                self.max_outstanding = self.max_outstanding.max(self.outstanding);
            }
            Some(batch)
        }

        fn recycle(&mut self, _batch: RowBatch) {
            self.outstanding -= 1;
        }
    }

    /// `rows` packed at most `batch_rows` to a batch (a new one where the shape changes), each
    /// indexed under `index` when given.
    fn batches(rows: &[Row], batch_rows: usize, index: Option<&KeyOrder>) -> VecBatches {
        let mut out: Vec<RowBatch> = Vec::new();
        for row in rows {
            let fits = out
                .last_mut()
                .is_some_and(|batch| batch.len() < batch_rows && batch.push(row).is_ok());
            if !fits {
                let mut batch = RowBatch::new(row.key.len(), row.columns.len());
                batch.push(row).expect("its own shape");
                out.push(batch);
            }
        }
        if let Some(order) = index {
            for batch in &mut out {
                batch.index_keys(order);
            }
        }
        VecBatches::new(out.into_iter().map(Ok).collect())
    }

    /// Every way of feeding the comparison must give the same outcome: owned rows through a
    /// closure (packed in batches of several sizes), and batches compared under [`KeyOrder`],
    /// with and without their integer key index (the fast path).
    fn compare(source: &[Row], target: &[Row], chunk_rows: usize) -> KeyedOutcome {
        let options = CompareOptions {
            chunk_rows,
            max_differences: usize::MAX,
            ..Default::default()
        };
        let outcome = compare_keyed(DOMAIN, ok(source), ok(target), integer_order(), &options)
            .expect("comparison");
        for batch_rows in [1, 3, 7] {
            let other = compare_keyed_packed(
                DOMAIN,
                ok(source),
                ok(target),
                &integer_order(),
                &options,
                batch_rows,
            )
            .expect("comparison");
            assert_eq!(other, outcome, "packed {batch_rows} rows to a batch");
        }
        let order = KeyOrder::new(vec![ColumnOrder::Integer]);
        for batch_rows in [1, 2, 5, 64] {
            for index in [None, Some(&order)] {
                let mut s = batches(source, batch_rows, index);
                let mut t = batches(target, batch_rows, index);
                let other = compare_keyed_batches(DOMAIN, &mut s, &mut t, &order, &options)
                    .expect("comparison");
                assert_eq!(
                    other,
                    outcome,
                    "{batch_rows} rows to a batch, indexed: {}",
                    index.is_some()
                );
                // Whole chunk plus the batches it straddles, and what narrowing holds.
                let bound = 2 * chunk_rows.saturating_mul(2).div_ceil(batch_rows) + 4;
                assert!(
                    s.max_outstanding <= bound,
                    "{} > {bound}",
                    s.max_outstanding
                );
                assert!(
                    t.max_outstanding <= bound,
                    "{} > {bound}",
                    t.max_outstanding
                );
            }
        }
        outcome
    }

    fn key(id: i64) -> Key {
        vec![text(&id.to_string())]
    }

    /// Brute-force reference: differences by full key lookup.
    fn reference(source: &[Row], target: &[Row]) -> Vec<Difference> {
        let numeric = |row: &Row| -> i64 {
            std::str::from_utf8(row.key[0].as_deref().expect("key"))
                .expect("utf8")
                .parse()
                .expect("integer")
        };
        let mut keys: BTreeMap<i64, (Option<&Row>, Option<&Row>)> = BTreeMap::new();
        for row in source {
            keys.entry(numeric(row)).or_default().0 = Some(row);
        }
        for row in target {
            keys.entry(numeric(row)).or_default().1 = Some(row);
        }
        keys.into_values()
            .filter_map(|pair| match pair {
                (Some(s), None) => Some(Difference::Missing { key: s.key.clone() }),
                (None, Some(t)) => Some(Difference::Extra { key: t.key.clone() }),
                (Some(s), Some(t)) => {
                    let columns = differing_columns(&s.columns, &t.columns);
                    (!columns.is_empty()).then(|| Difference::Different {
                        key: t.key.clone(),
                        columns,
                    })
                }
                (None, None) => None,
            })
            .collect()
    }

    const CHUNK_SIZES: [usize; 7] = [1, 2, 3, 7, 64, 500, 5000];

    /// Every chunk size must report exactly `expected`, no more and no fewer.
    fn assert_reports(source: &[Row], target: &[Row], expected: &[Difference]) {
        assert_eq!(reference(source, target), expected, "reference disagrees");
        for chunk_rows in CHUNK_SIZES {
            let outcome = compare(source, target, chunk_rows);
            assert_eq!(outcome.differences, expected, "chunk_rows = {chunk_rows}");
            assert_eq!(outcome.differences_total, expected.len() as u64);
            assert_eq!(outcome.source_rows, source.len() as u64);
            assert_eq!(outcome.target_rows, target.len() as u64);
            assert_eq!(outcome.is_equal(), expected.is_empty());
        }
    }

    #[test]
    fn identical_tables_are_equal_without_narrowing() {
        let source = table(1000);
        for chunk_rows in CHUNK_SIZES {
            let outcome = compare(&source, &source, chunk_rows);
            assert!(outcome.is_equal());
            assert_eq!(outcome.chunks_differing, 0);
            assert_eq!(outcome.rows_compared, 1000);
            assert_eq!(outcome.chunks, 1000u64.div_ceil(chunk_rows as u64));
        }
    }

    #[test]
    fn empty_tables() {
        assert_reports(&[], &[], &[]);
        let rows = table(5);
        let missing: Vec<Difference> = (1..=5)
            .map(|id| Difference::Missing { key: key(id) })
            .collect();
        assert_reports(&rows, &[], &missing);
        let extra: Vec<Difference> = (1..=5)
            .map(|id| Difference::Extra { key: key(id) })
            .collect();
        assert_reports(&[], &rows, &extra);
    }

    #[test]
    fn one_changed_cell() {
        let source = table(1000);
        let mut target = source.clone();
        target[499].columns[1] = text("changed");
        let expected = [Difference::Different {
            key: key(500),
            columns: vec![1],
        }];
        assert_reports(&source, &target, &expected);
        // Narrowing touches only the one chunk holding the change.
        assert_eq!(compare(&source, &target, 64).chunks_differing, 1);
    }

    #[test]
    fn deleted_rows() {
        let source = table(1000);
        let mut target = source.clone();
        for index in [999, 500, 0] {
            target.remove(index);
        }
        let expected = [1, 501, 1000].map(|id| Difference::Missing { key: key(id) });
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn added_rows_inside_and_outside_the_source_range() {
        let mut source = table(1000);
        source.retain(|row| row.key != key(10) && row.key != key(600));
        let mut target = table(1000);
        target.insert(0, row(-5, None, None));
        target.push(row(2000, None, None));
        let expected = [-5, 10, 600, 2000].map(|id| Difference::Extra { key: key(id) });
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn a_bulk_of_extra_rows_in_one_range_is_streamed() {
        // ~300 extra target rows between source keys 100 and 400 overflow the 2 × chunk buffer
        // for small chunks, so the rest of the range is merged straight from the stream.
        let source: Vec<Row> = (1..=20).map(|id| row(id * 100, text("a"), None)).collect();
        let mut target: Vec<Row> = source
            .iter()
            .filter(|r| r.key != key(300))
            .cloned()
            .collect();
        target.extend(
            (101..400)
                .filter(|id| id % 100 != 0)
                .map(|id| row(id, text("x"), None)),
        );
        target.sort_by(|a, b| integer_order()(&a.key, &b.key));
        let expected = reference(&source, &target);
        assert_eq!(expected.len(), 298);
        assert_eq!(
            expected
                .iter()
                .filter(|d| matches!(d, Difference::Extra { .. }))
                .count(),
            297
        );
        assert!(expected.contains(&Difference::Missing { key: key(300) }));
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn null_empty_and_literal_null_are_distinct() {
        let source = vec![
            row(1, None, text("")),
            row(2, text(""), text("NULL")),
            row(3, text("NULL"), None),
            row(4, None, None),
        ];
        let target = vec![
            row(1, text(""), text("")),
            row(2, text("NULL"), text("NULL")),
            row(3, None, None),
            row(4, None, None),
        ];
        let expected = [1, 2, 3].map(|id| Difference::Different {
            key: key(id),
            columns: vec![1],
        });
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn shifted_values_differ_in_both_columns() {
        let source = vec![row(1, text("x0"), text("y")), row(2, text("a"), text("b"))];
        let target = vec![row(1, text("x"), text("0y")), row(2, text("a"), text("b"))];
        let expected = [Difference::Different {
            key: key(1),
            columns: vec![1, 2],
        }];
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn negative_zero_is_reported() {
        let source = vec![
            row(1, text("-0"), text("NaN")),
            row(2, text("0"), text("NaN")),
        ];
        let target = vec![
            row(1, text("0"), text("NaN")),
            row(2, text("0"), text("NaN")),
        ];
        let expected = [Difference::Different {
            key: key(1),
            columns: vec![1],
        }];
        assert_reports(&source, &target, &expected);
    }

    #[test]
    fn randomized_mutations_match_the_reference() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        for _round in 0..20 {
            let source = table(300);
            let mut target = source.clone();
            for _ in 0..next(12) {
                let index = next(target.len() as u64) as usize;
                match next(5) {
                    0 => {
                        target.remove(index);
                    }
                    1 => target[index].columns[2] = None,
                    2 => target[index].columns[1] = text(""),
                    3 => {
                        let id = 1000 + next(1000) as i64;
                        if !target.iter().any(|r| r.key == key(id)) {
                            target.push(row(id, None, text("new")));
                        }
                    }
                    _ => target[index].columns[1] = text("-0"),
                }
            }
            target.sort_by(|a, b| integer_order()(&a.key, &b.key));
            let expected = reference(&source, &target);
            assert_reports(&source, &target, &expected);
        }
    }

    #[test]
    fn a_deadline_stops_at_a_chunk_bound_and_the_rest_resumes_after_it() {
        let source = table(100);
        let mut target = source.clone();
        target.remove(50);
        let options = CompareOptions {
            chunk_rows: 8,
            max_differences: 100,
            deadline: Some(std::time::Instant::now()),
        };
        let first = compare_keyed(DOMAIN, ok(&source), ok(&target), integer_order(), &options)
            .expect("comparison");
        // The first chunk is compared whole, then the comparison stops at its bound.
        assert_eq!(first.resume_after, Some(key(8)));
        assert_eq!(first.rows_compared, 8);
        assert!(first.is_equal());
        // Going on after the bound, without a deadline, finds the one difference.
        let rest = compare_keyed(
            DOMAIN,
            ok(&source[8..]),
            ok(&target[8..]),
            integer_order(),
            &CompareOptions::default(),
        )
        .expect("comparison");
        assert_eq!(rest.resume_after, None);
        assert_eq!(rest.rows_compared, 92);
        assert_eq!(rest.differences, vec![Difference::Missing { key: key(51) }]);
        // The last, short chunk never stops early: there is nothing after it to resume.
        let short = CompareOptions {
            chunk_rows: 1000,
            ..options
        };
        let whole = compare_keyed(DOMAIN, ok(&source), ok(&target), integer_order(), &short)
            .expect("comparison");
        assert_eq!(whole.resume_after, None);
        assert_eq!(whole.differences_total, 1);
    }

    #[test]
    fn differences_are_capped_but_counted() {
        let source = table(100);
        let options = CompareOptions {
            chunk_rows: 8,
            max_differences: 3,
            ..Default::default()
        };
        let outcome = compare_keyed(DOMAIN, ok(&source), ok(&[]), integer_order(), &options)
            .expect("comparison");
        assert_eq!(outcome.differences.len(), 3);
        assert_eq!(outcome.differences_total, 100);
        assert_eq!(outcome.differences[0], Difference::Missing { key: key(1) });
    }

    #[test]
    fn composite_text_keys_in_byte_order() {
        let make = |a: &str, b: Option<&str>, v: &str| {
            Row::new(
                vec![text(a), b.and_then(text_opt)],
                vec![text(a), b.and_then(text_opt), text(v)],
            )
        };
        fn text_opt(value: &str) -> Value {
            Some(value.as_bytes().to_vec())
        }
        // "B" < "a" in byte order (COLLATE "C"); NULL sorts last within a prefix.
        let source = vec![
            make("B", Some("1"), "v"),
            make("a", Some("1"), "v"),
            make("a", Some("2"), "v"),
            make("a", None, "v"),
        ];
        let mut target = source.clone();
        target[3].columns[2] = text("w");
        target.remove(1);
        let order = KeyOrder::bytes();
        for chunk_rows in CHUNK_SIZES {
            let options = CompareOptions {
                chunk_rows,
                max_differences: 10,
                ..Default::default()
            };
            let outcome = compare_keyed(
                DOMAIN,
                ok(&source),
                ok(&target),
                |a: &[Value], b: &[Value]| order.compare(a, b),
                &options,
            )
            .expect("comparison");
            assert_eq!(
                outcome.differences,
                vec![
                    Difference::Missing {
                        key: vec![text("a"), text("1")]
                    },
                    Difference::Different {
                        key: vec![text("a"), None],
                        columns: vec![2]
                    },
                ]
            );
        }
    }

    #[test]
    fn integer_keys_need_an_integer_order() {
        let rows = table(20); // 1..=20 in numeric order: "10" sorts before "9" by bytes
        let bytes = KeyOrder::bytes();
        let error = compare_keyed(
            DOMAIN,
            ok(&rows),
            ok(&rows),
            |a: &[Value], b: &[Value]| bytes.compare(a, b),
            &CompareOptions::default(),
        )
        .expect_err("byte order must be rejected");
        assert!(matches!(
            error,
            CompareError::OutOfOrder {
                side: Side::Source,
                row: 10
            }
        ));
        assert!(integer_order()(&key(9), &key(10)) == Ordering::Less);
        assert!(integer_order()(&key(-1), &key(0)) == Ordering::Less);
    }

    #[test]
    fn duplicate_keys_and_bad_shapes_are_errors() {
        let mut rows = table(5);
        rows.insert(3, rows[2].clone());
        let error = compare_keyed(
            DOMAIN,
            ok(&table(5)),
            ok(&rows),
            integer_order(),
            &CompareOptions::default(),
        )
        .expect_err("duplicate");
        assert!(matches!(
            error,
            CompareError::DuplicateKey {
                side: Side::Target,
                row: 4
            }
        ));
        let mut short = table(5);
        short[4].columns.pop();
        let error = compare_keyed(
            DOMAIN,
            ok(&table(5)),
            ok(&short),
            integer_order(),
            &CompareOptions::default(),
        )
        .expect_err("shape");
        assert!(matches!(
            error,
            CompareError::Shape {
                side: Side::Target,
                row: 5,
                what: "columns",
                expected: 3,
                found: 2
            }
        ));
    }

    #[test]
    fn read_errors_are_propagated() {
        let source = table(3);
        let target = vec![Ok(source[0].clone()), Err("connection reset")];
        let error = compare_keyed(
            DOMAIN,
            source.iter().cloned().map(Ok),
            target,
            integer_order(),
            &CompareOptions::default(),
        )
        .expect_err("read error");
        assert!(matches!(
            error,
            CompareError::Read {
                side: Side::Target,
                source: "connection reset"
            }
        ));
    }

    #[test]
    fn chunk_digest_covers_the_key() {
        // Same columns under a different key must not hash equal.
        let source = vec![Row::new(vec![text("1")], vec![text("v")])];
        let target = vec![Row::new(vec![text("2")], vec![text("v")])];
        let outcome = compare_keyed(
            DOMAIN,
            ok(&source),
            ok(&target),
            integer_order(),
            &CompareOptions::default(),
        )
        .expect("comparison");
        assert_eq!(
            outcome.differences,
            vec![
                Difference::Missing {
                    key: vec![text("1")]
                },
                Difference::Extra {
                    key: vec![text("2")]
                }
            ]
        );
    }

    fn columns(values: &[Option<&str>]) -> Row {
        Row::new(
            Vec::new(),
            values
                .iter()
                .map(|v| v.map(|s| s.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn multiset(source: &[Row], target: &[Row]) -> MultisetOutcome {
        compare_multiset(DOMAIN, ok(source), ok(target)).expect("multiset")
    }

    #[test]
    fn multiset_equal_in_any_order() {
        let source = vec![
            columns(&[Some("a")]),
            columns(&[Some("a")]),
            columns(&[None]),
            columns(&[Some("b")]),
        ];
        let mut target = source.clone();
        target.reverse();
        let outcome = multiset(&source, &target);
        assert!(outcome.is_equal());
        assert_eq!((outcome.source_rows, outcome.target_rows), (4, 4));
    }

    #[test]
    fn multiset_duplicates_are_counted() {
        let source = vec![
            columns(&[Some("a")]),
            columns(&[Some("a")]),
            columns(&[Some("a")]),
            columns(&[Some("b")]),
        ];
        let target = vec![
            columns(&[Some("b")]),
            columns(&[Some("a")]),
            columns(&[Some("b")]),
            columns(&[Some("b")]),
        ];
        let outcome = multiset(&source, &target);
        assert_eq!(
            outcome.differences,
            vec![
                MultisetDifference {
                    side: Side::Source,
                    columns: vec![text("a")],
                    count: 2
                },
                MultisetDifference {
                    side: Side::Target,
                    columns: vec![text("b")],
                    count: 2
                },
            ]
        );
        assert_eq!(outcome.differences_total, 4);
    }

    #[test]
    fn multiset_null_empty_literal_and_shift() {
        let source = vec![
            columns(&[None, Some("x0"), Some("y")]),
            columns(&[Some(""), Some("-0"), None]),
        ];
        let target = vec![
            columns(&[Some("NULL"), Some("x0"), Some("y")]),
            columns(&[Some(""), Some("0"), None]),
        ];
        let outcome = multiset(&source, &target);
        assert_eq!(outcome.differences_total, 4);
        assert!(outcome.differences.iter().all(|d| d.count == 1));
        let shifted = vec![columns(&[None, Some("x"), Some("0y")])];
        assert_eq!(multiset(&source[..1], &shifted).differences_total, 2);
    }

    #[test]
    fn multiset_tally_cancels_matched_rows() {
        let mut tally = MultisetTally::new(DOMAIN);
        for i in 0..100 {
            let row = vec![text(&i.to_string())];
            tally.add_source(row.clone());
            tally.add_target(row);
            assert_eq!(tally.unmatched(), 0);
        }
        assert!(tally.finish().is_equal());
    }

    /// The error of comparing `source` with `target` on every path (see [`compare`]), which
    /// must agree.
    fn compare_error(source: &[Row], target: &[Row], chunk_rows: usize) -> String {
        let options = CompareOptions {
            chunk_rows,
            max_differences: usize::MAX,
            ..Default::default()
        };
        let expected = compare_keyed(DOMAIN, ok(source), ok(target), integer_order(), &options)
            .expect_err("an error")
            .to_string();
        let order = KeyOrder::new(vec![ColumnOrder::Integer]);
        for batch_rows in [1, 2, 3, 5] {
            let packed = compare_keyed_packed(
                DOMAIN,
                ok(source),
                ok(target),
                &integer_order(),
                &options,
                batch_rows,
            )
            .expect_err("an error");
            assert_eq!(packed.to_string(), expected, "packed {batch_rows}");
            for index in [None, Some(&order)] {
                let mut s = batches(source, batch_rows, index);
                let mut t = batches(target, batch_rows, index);
                let error = compare_keyed_batches(DOMAIN, &mut s, &mut t, &order, &options)
                    .expect_err("an error");
                assert_eq!(error.to_string(), expected, "{batch_rows} rows, {index:?}");
            }
        }
        expected
    }

    #[test]
    fn order_errors_are_found_at_every_batch_position() {
        for at in 1..12 {
            let mut duplicate = table(12);
            duplicate.insert(at, duplicate[at - 1].clone());
            for chunk_rows in [1, 4, 100] {
                assert_eq!(
                    compare_error(&table(12), &duplicate, chunk_rows),
                    format!("duplicate key on target at row {}", at + 1)
                );
                assert_eq!(
                    compare_error(&duplicate, &table(12), chunk_rows),
                    format!("duplicate key on source at row {}", at + 1)
                );
            }
            let mut swapped = table(12);
            swapped.swap(at - 1, at);
            for chunk_rows in [1, 4, 100] {
                assert_eq!(
                    compare_error(&table(12), &swapped, chunk_rows),
                    format!("target rows out of key order at row {}", at + 1)
                );
            }
        }
    }

    #[test]
    fn shape_changes_are_found_in_batches() {
        let mut wide = table(10);
        for row in &mut wide[6..] {
            row.columns.push(None);
        }
        assert_eq!(
            compare_error(&table(10), &wide, 4),
            "target row 7 has 4 columns, expected 3"
        );
        assert_eq!(
            compare_error(&wide, &table(10), 100),
            "source row 7 has 4 columns, expected 3"
        );
    }

    #[test]
    fn read_errors_after_batches_are_propagated() {
        let rows = table(10);
        let order = KeyOrder::new(vec![ColumnOrder::Integer]);
        let mut source = batches(&rows, 4, Some(&order));
        let mut target = batches(&rows[..8], 4, Some(&order));
        target.batches.push_back(Err("connection reset"));
        let error = compare_keyed_batches(
            DOMAIN,
            &mut source,
            &mut target,
            &order,
            &CompareOptions::default(),
        )
        .expect_err("read error");
        assert!(matches!(
            error,
            CompareError::Read {
                side: Side::Target,
                source: "connection reset"
            }
        ));
    }

    #[test]
    fn an_index_for_another_order_is_ignored() {
        // Indexed as integers, compared as bytes: "10" < "9" must still be caught.
        let rows = table(20);
        let integer = KeyOrder::new(vec![ColumnOrder::Integer]);
        let bytes = KeyOrder::bytes();
        let mut source = batches(&rows, 8, Some(&integer));
        let mut target = batches(&rows, 8, Some(&integer));
        let error = compare_keyed_batches(
            DOMAIN,
            &mut source,
            &mut target,
            &bytes,
            &CompareOptions::default(),
        )
        .expect_err("byte order must be rejected");
        assert!(matches!(
            error,
            CompareError::OutOfOrder {
                side: Side::Source,
                row: 10
            }
        ));
        // A stale index (rows added after indexing) is ignored too.
        let mut batch = RowBatch::new(1, 3);
        batch.push(&rows[0]).expect("row");
        batch.index_keys(&integer);
        batch.push(&rows[1]).expect("row");
        assert!(batch.key_index(&integer).is_none());
        batch.index_keys(&integer);
        assert_eq!(batch.key_index(&integer), Some(&[1i64, 2][..]));
        assert!(batch.key_index(&bytes).is_none());
    }

    #[test]
    fn equal_keys_with_other_text_are_reported() {
        // Integer order: "01" equals "1", but the key text differs, so the row does.
        let source = vec![row(1, text("a"), None), row(2, text("b"), None)];
        let mut target = source.clone();
        target[0].key = vec![text("01")];
        target[0].columns[0] = text("01");
        let outcome = compare(&source, &target, 1);
        assert_eq!(
            outcome.differences,
            vec![Difference::Different {
                key: vec![text("01")],
                columns: vec![0]
            }]
        );
        let mut target = source.clone();
        target[1].key = vec![text("+2")];
        let outcome = compare(&source, &target, 5);
        assert_eq!(
            outcome.differences,
            vec![Difference::Different {
                key: vec![text("+2")],
                columns: vec![]
            }]
        );
    }

    #[test]
    fn parse_integer_reads_like_str_parse() {
        let mut cases: Vec<String> = [
            "",
            "+",
            "-",
            "0",
            "-0",
            "+0",
            "00",
            "007",
            "1",
            "-1",
            "+1",
            "+-1",
            "-+1",
            "1-",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "0x10",
            "١",
            "9223372036854775807",
            "-9223372036854775808",
            "999999999999999999",
            "1000000000000000000",
            "-999999999999999999",
            "170141183460469231731687303715884105727",
            "170141183460469231731687303715884105728",
            "-170141183460469231731687303715884105728",
            "-170141183460469231731687303715884105729",
            "00000000000000000000000000000000000000000001",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let digits = (state % 45) as usize;
            let mut text: String = (0..digits)
                .map(|i| char::from(b'0' + ((state >> (i % 60)) % 10) as u8))
                .collect();
            match state % 7 {
                0 => text.insert(0, '-'),
                1 => text.insert(0, '+'),
                2 => text.push('x'),
                _ => {}
            }
            cases.push(text);
        }
        for case in cases {
            assert_eq!(
                parse_integer(case.as_bytes()),
                case.parse::<i128>().ok(),
                "{case:?}"
            );
        }
        assert_eq!(parse_integer(b"\xff1"), None);
    }

    #[test]
    fn key_order_reads_batches_as_it_reads_values() {
        let mut state = 0x1234_5678_9abc_def1u64;
        let mut next = move |bound: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % bound
        };
        let pieces = ["", "0", "1", "-1", "10", "9", "a", "B", "01", "+1", "é"];
        let orders = [
            KeyOrder::bytes(),
            KeyOrder::new(vec![ColumnOrder::Integer]),
            KeyOrder::new(vec![ColumnOrder::Integer, ColumnOrder::Bytes]),
            KeyOrder::new(vec![ColumnOrder::Bytes, ColumnOrder::Integer]),
        ];
        for _ in 0..3000 {
            let len = 1 + next(2) as usize;
            let mut key = || -> Key {
                (0..len)
                    .map(|_| {
                        (next(6) != 0).then(|| pieces[next(pieces.len() as u64) as usize].into())
                    })
                    .collect()
            };
            let (a, b) = (key(), key());
            let mut batch = RowBatch::new(len, 1);
            batch.push_row(&a, &[None]).expect("row");
            batch.push_row(&b, &[None]).expect("row");
            for order in &orders {
                let (x, y) = (batch.row(0).key(), batch.row(1).key());
                let expected = order.compare(&a, &b);
                assert_eq!(order.compare_keys(x, y), expected, "{a:?} {b:?} {order:?}");
                if let (Some(i), Some(j)) = (order.integer_key(x), order.integer_key(y)) {
                    assert_eq!(i.cmp(&j), expected, "{a:?} {b:?} {order:?}");
                }
            }
        }
    }

    #[test]
    fn multiset_batches_ignore_keys() {
        let source = vec![
            Row::new(vec![text("k1")], vec![text("a"), None]),
            Row::new(vec![text("k2")], vec![text("b"), text("")]),
        ];
        let target = vec![
            Row::new(vec![text("other")], vec![text("b"), text("")]),
            Row::new(vec![None], vec![text("a"), None]),
        ];
        let expected = multiset(&source, &target);
        assert!(expected.is_equal());
        let mut s = batches(&source, 1, None);
        let mut t = batches(&target, 1, None);
        let outcome = compare_multiset_batches(DOMAIN, &mut s, &mut t).expect("multiset");
        assert_eq!(outcome, expected);
        assert!(s.max_outstanding <= 2 && t.max_outstanding <= 2);
    }
}
