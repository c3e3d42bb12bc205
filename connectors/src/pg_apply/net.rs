//! Net changes per key: the changes a target transaction holds for one table, reduced to
//! at most one operation per key, then applied set-based.
//!
//! Within one target transaction (several source transactions, applied atomically) only
//! the final state of each row is visible to anyone else, so a row inserted then updated
//! three times is one INSERT of its last image, and a counter updated a thousand times is
//! one UPDATE. The reduced changes of a table are then sent as a handful of set-based
//! statements: deletes, inserts, and one update per shape of update, each statement's rows
//! in key order ([`sort_by_key`]).
//!
//! This reorders changes across keys (and across tables), which is only invisible when
//! nothing on the target depends on that order: the table has no unique index or
//! exclusion constraint besides its key (no transient conflicts between keys), and
//! foreign-key checks and triggers are off for the session (`session_replication_role =
//! replica`). The applier uses net changes only under those conditions, and the plain
//! ordered path otherwise.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use crate::pg_source::decode::ColumnValue;

/// Maps and sets touched for every change: a fast hash (keyed per process, so row values
/// cannot be chosen to collide) instead of SipHash, which cost about 6% of the apply's CPU.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<T> = HashSet<T, foldhash::fast::RandomState>;

/// The net effect of the changes to one key.
#[derive(Debug, Clone, PartialEq)]
pub enum NetOp {
    /// The row did not exist before: insert this image (no unchanged-TOAST values).
    Insert(Vec<ColumnValue>),
    /// The row existed: set the columns that are not `UnchangedToast`.
    Update(Vec<ColumnValue>),
    /// The row existed and is gone: its key values.
    Delete(Vec<ColumnValue>),
    /// The row may have existed: delete it, then insert this image.
    Replace(Vec<ColumnValue>),
}

/// A change that cannot be folded into the net changes (the caller flushes the queue and
/// applies it in order instead): its row, given back.
#[derive(Debug, Clone, PartialEq)]
pub struct NotFoldable(pub Vec<ColumnValue>);

/// The net changes of one table, keyed by the key values' text; or, for a table without
/// a key or any unique index that only receives inserts, its inserted rows in order.
///
/// A row image holds its key values: only a delete keeps them apart.
#[derive(Debug, Default)]
pub struct TableQueue {
    pub rows: FastMap<Vec<u8>, NetOp>,
    /// Rows inserted into a table with no unique index at all: nothing on the target can
    /// conflict with them, so they wait for the end of the group like net changes (the
    /// caller flushes them before any other change of the table).
    pub appended: Vec<Vec<ColumnValue>>,
    pub bytes: usize,
}

/// Key bytes: each key value length-prefixed, so `('a','bc')` and `('ab','c')` differ;
/// `None` when a key value is NULL or missing.
pub fn key_bytes<'a>(key: impl IntoIterator<Item = &'a ColumnValue>) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    for v in key {
        match v {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => push_key_part(&mut out, b),
            ColumnValue::Null | ColumnValue::UnchangedToast => return None,
        }
    }
    Some(out)
}

/// Append one key value to key bytes (see [`key_bytes`]).
pub fn push_key_part(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
}

/// The values of key bytes made of text values, as text (what [`key_bytes`] took apart
/// it puts together; anything else, malformed, ends the list where it stops making sense).
pub fn key_text(mut key: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((len, rest)) = key.split_first_chunk::<8>() {
        let len = usize::try_from(u64::from_le_bytes(*len)).unwrap_or(usize::MAX);
        let Some((value, rest)) = rest.split_at_checked(len) else {
            break;
        };
        out.push(String::from_utf8_lossy(value).into_owned());
        key = rest;
    }
    out
}

/// One key column's value, for putting rows in key order.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum KeyPart {
    Null,
    Int(i64),
    Text(bytes::Bytes),
}

/// Whether a column of this type (as `format_type` prints it) is put in order by number
/// rather than by the bytes of its text.
pub fn orders_as_integer(type_name: &str) -> bool {
    matches!(type_name, "smallint" | "integer" | "bigint")
}

/// Put rows in the order of their key: `key` gives each key column's index in a row, and
/// whether its values are integers (ordered by number; any other type, or a value that
/// does not parse, by its text's bytes, which is the order of the target's index for
/// many types and a fixed one for the rest).
///
/// Net changes come out of a hash map in no order; sent in key order, each statement's
/// rows walk the target's key index and (for a table loaded in key order) its heap from
/// one end to the other rather than at random. On a pgbench target, a 5000-row
/// `pgbench_accounts` update took 91-95 ms of the backend's CPU in key order against
/// 113-140 ms at random (docs/benchmarks.md, session 15).
pub fn sort_by_key(rows: &mut [Vec<ColumnValue>], key: &[(usize, bool)]) {
    if key.is_empty() || rows.len() < 2 {
        return;
    }
    let part = |row: &[ColumnValue], (j, integer): (usize, bool)| match row.get(j) {
        Some(ColumnValue::Text(b) | ColumnValue::Binary(b)) => integer
            .then(|| parse_integer(b))
            .flatten()
            .map_or_else(|| KeyPart::Text(b.clone()), KeyPart::Int),
        _ => KeyPart::Null,
    };
    // (One key column, the usual case: no vector per row.)
    match key {
        &[only] => rows.sort_by_cached_key(|row| part(row, only)),
        _ => rows.sort_by_cached_key(|row| key.iter().map(|&k| part(row, k)).collect::<Vec<_>>()),
    }
}

/// An integer's text (an optional sign, then ASCII digits) as a number; `None` for
/// anything else, or out of range.
fn parse_integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        [b'+', rest @ ..] => (false, rest),
        _ => (false, text),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = i64::from(d - b'0');
        // Accumulated negatively, so that i64::MIN parses too.
        n = n.checked_mul(10)?.checked_sub(d)?;
    }
    if negative { Some(n) } else { n.checked_neg() }
}

fn size(values: &[ColumnValue]) -> usize {
    values
        .iter()
        .map(|v| match v {
            ColumnValue::Text(b) | ColumnValue::Binary(b) => b.len() + 16,
            _ => 16,
        })
        .sum::<usize>()
        + 64
}

/// `new` over `old`, in place: unchanged-TOAST columns of `new` keep `old`'s value.
fn merge(old: &mut [ColumnValue], new: Vec<ColumnValue>) {
    for (o, n) in old.iter_mut().zip(new) {
        if !matches!(n, ColumnValue::UnchangedToast) {
            *o = n;
        }
    }
}

fn complete(values: &[ColumnValue]) -> bool {
    !values
        .iter()
        .any(|v| matches!(v, ColumnValue::UnchangedToast))
}

impl TableQueue {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.appended.is_empty()
    }

    /// A row inserted into a table without any unique index (every column has a value).
    pub fn append(&mut self, row: Vec<ColumnValue>) -> Result<(), NotFoldable> {
        if !complete(&row) {
            return Err(NotFoldable(row));
        }
        self.account(size(&row));
        self.appended.push(row);
        Ok(())
    }

    fn account(&mut self, added: usize) {
        self.bytes += added;
    }

    /// An inserted row (every column has a value).
    pub fn insert(&mut self, key: Vec<u8>, row: Vec<ColumnValue>) -> Result<(), NotFoldable> {
        if !complete(&row) {
            return Err(NotFoldable(row));
        }
        let added = size(&row) + key.len();
        match self.rows.entry(key) {
            Entry::Vacant(e) => {
                e.insert(NetOp::Insert(row));
            }
            // Deleted earlier in this transaction (or the row was there before and deleted):
            // delete-then-insert covers both.
            Entry::Occupied(mut e) if matches!(e.get(), NetOp::Delete(_)) => {
                *e.get_mut() = NetOp::Replace(row);
            }
            // An insert of a key that exists cannot have succeeded on the source; keep the
            // order-preserving path for whatever this is.
            Entry::Occupied(_) => return Err(NotFoldable(row)),
        }
        self.account(added);
        Ok(())
    }

    /// An update that keeps the key; `row` may hold unchanged-TOAST values.
    pub fn update(&mut self, key: Vec<u8>, row: Vec<ColumnValue>) -> Result<(), NotFoldable> {
        let added = size(&row) + key.len();
        match self.rows.entry(key) {
            Entry::Vacant(e) => {
                e.insert(NetOp::Update(row));
            }
            Entry::Occupied(mut e) => match e.get_mut() {
                NetOp::Insert(old) | NetOp::Update(old) | NetOp::Replace(old) => {
                    merge(old, row);
                }
                NetOp::Delete(_) => return Err(NotFoldable(row)),
            },
        }
        self.account(added);
        Ok(())
    }

    /// A deleted row.
    pub fn delete(&mut self, key: Vec<u8>, key_values: Vec<ColumnValue>) {
        self.account(key.len() + 64);
        match self.rows.entry(key) {
            // Inserted within this transaction: as if it never was.
            Entry::Occupied(e) if matches!(e.get(), NetOp::Insert(_)) => {
                e.remove();
            }
            Entry::Occupied(mut e) => *e.get_mut() = NetOp::Delete(key_values),
            Entry::Vacant(e) => {
                e.insert(NetOp::Delete(key_values));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> ColumnValue {
        ColumnValue::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    fn key(s: &str) -> (Vec<u8>, Vec<ColumnValue>) {
        (key_bytes([&t(s)]).unwrap(), vec![t(s)])
    }

    fn op(q: &TableQueue, k: &str) -> Option<NetOp> {
        q.rows.get(&key(k).0).cloned()
    }

    #[test]
    fn key_bytes_give_their_text_back() {
        let (a, b, c) = (t("a"), t("b'c"), t(""));
        let bytes = key_bytes([&a, &b, &c]).unwrap();
        assert_eq!(key_text(&bytes), ["a", "b'c", ""]);
        assert_eq!(key_text(&[]), Vec::<String>::new());
        // Cut short: the values that are whole, never a panic.
        assert_eq!(key_text(&bytes[..bytes.len() - 8]), ["a", "b'c"]);
        assert_eq!(key_text(&bytes[..bytes.len() - 9]), ["a"]);
        assert_eq!(key_text(&bytes[..12]), ["a"]);
    }

    #[test]
    fn rows_are_put_in_key_order() {
        let row = |k: &str, other: &str| vec![t(other), t(k)];
        // Integers by number (10 after 9), a value that does not parse and text by bytes.
        let mut rows = vec![
            row("10", "a"),
            row("9", "b"),
            row("-3", "c"),
            row("x", "d"),
            row("100", "e"),
        ];
        sort_by_key(&mut rows, &[(1, true)]);
        let keys: Vec<_> = rows.iter().map(|r| r[1].clone()).collect();
        assert_eq!(keys, vec![t("-3"), t("9"), t("10"), t("100"), t("x")]);
        sort_by_key(&mut rows, &[(1, false)]);
        let keys: Vec<_> = rows.iter().map(|r| r[1].clone()).collect();
        assert_eq!(keys, vec![t("-3"), t("10"), t("100"), t("9"), t("x")]);
        // Two key columns: the first decides, the second breaks ties; NULL first.
        let mut rows = vec![
            vec![t("2"), t("b")],
            vec![t("1"), t("z")],
            vec![t("2"), t("a")],
            vec![ColumnValue::Null, t("q")],
        ];
        sort_by_key(&mut rows, &[(0, true), (1, false)]);
        assert_eq!(
            rows,
            vec![
                vec![ColumnValue::Null, t("q")],
                vec![t("1"), t("z")],
                vec![t("2"), t("a")],
                vec![t("2"), t("b")],
            ]
        );
        assert!(orders_as_integer("bigint") && !orders_as_integer("numeric"));
    }

    #[test]
    fn integers_parse_from_their_text() {
        let p = |s: &str| parse_integer(s.as_bytes());
        assert_eq!(p("0"), Some(0));
        assert_eq!(p("-42"), Some(-42));
        assert_eq!(p("+7"), Some(7));
        assert_eq!(p("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(p("9223372036854775807"), Some(i64::MAX));
        for bad in ["9223372036854775808", "", "-", "1.5", "12a", " 1", "٣"] {
            assert_eq!(p(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn key_bytes_separate_columns() {
        assert_ne!(
            key_bytes([&t("a"), &t("bc")]),
            key_bytes([&t("ab"), &t("c")])
        );
        assert_eq!(key_bytes([&ColumnValue::Null]), None);
    }

    #[test]
    fn insert_update_delete_fold() {
        let mut q = TableQueue::default();
        let (k, kv) = key("1");
        q.insert(k.clone(), vec![t("1"), t("a"), t("x")]).unwrap();
        q.update(k.clone(), vec![t("1"), t("b"), ColumnValue::UnchangedToast])
            .unwrap();
        assert_eq!(
            op(&q, "1"),
            Some(NetOp::Insert(vec![t("1"), t("b"), t("x")]))
        );
        q.delete(k.clone(), kv.clone());
        assert_eq!(op(&q, "1"), None, "insert then delete is nothing");

        q.update(k.clone(), vec![t("1"), t("c"), ColumnValue::UnchangedToast])
            .unwrap();
        q.update(k.clone(), vec![t("1"), ColumnValue::UnchangedToast, t("y")])
            .unwrap();
        assert_eq!(
            op(&q, "1"),
            Some(NetOp::Update(vec![t("1"), t("c"), t("y")]))
        );
        q.delete(k.clone(), kv.clone());
        assert_eq!(op(&q, "1"), Some(NetOp::Delete(vec![t("1")])));
        q.insert(k.clone(), vec![t("1"), t("d"), t("z")]).unwrap();
        assert_eq!(
            op(&q, "1"),
            Some(NetOp::Replace(vec![t("1"), t("d"), t("z")]))
        );
        q.update(k.clone(), vec![t("1"), t("e"), ColumnValue::UnchangedToast])
            .unwrap();
        assert_eq!(
            op(&q, "1"),
            Some(NetOp::Replace(vec![t("1"), t("e"), t("z")]))
        );
    }

    #[test]
    fn what_cannot_fold_is_refused_and_kept() {
        let mut q = TableQueue::default();
        let (k, kv) = key("1");
        assert_eq!(
            q.insert(k.clone(), vec![t("1"), ColumnValue::UnchangedToast]),
            Err(NotFoldable(vec![t("1"), ColumnValue::UnchangedToast]))
        );
        q.delete(k.clone(), kv.clone());
        assert_eq!(
            q.update(k.clone(), vec![t("1"), t("a")]),
            Err(NotFoldable(vec![t("1"), t("a")]))
        );
        assert_eq!(op(&q, "1"), Some(NetOp::Delete(vec![t("1")])));
        q.insert(k.clone(), vec![t("1"), t("a")]).unwrap();
        assert_eq!(
            q.insert(k, vec![t("1"), t("b")]),
            Err(NotFoldable(vec![t("1"), t("b")]))
        );
        assert_eq!(op(&q, "1"), Some(NetOp::Replace(vec![t("1"), t("a")])));
    }
}
