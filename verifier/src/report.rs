//! The `verify --json` document of the operator contract (`contract.md`, "Fields that scripts
//! read"): `lsn`, `equal`, and per table `source`, `target`, `rows_compared`, `equal`, a capped
//! `differences` list of `{"kind", "key": {column: value}, "columns": [...]}` and
//! `differences_total`.
//!
//! Keys are objects whose members keep the key's column order (a plain map type would sort them).
//! Values are the PostgreSQL text form, `null` for SQL NULL. Keyless tables report the whole row
//! as `key` and add a `count` member when a row is missing or extra more than once.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunk::{Difference, KeyedOutcome, MultisetOutcome, Side, Value};

/// The whole `verify --json` document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Source position compared at (`X/XXXXXXXX`), `null` when the run was not anchored.
    pub lsn: Option<String>,
    /// Whether every table is equal.
    pub equal: bool,
    /// One entry per mapped table.
    pub tables: Vec<TableReport>,
}

impl VerifyReport {
    /// Build the document; `equal` is derived from the tables.
    pub fn new(lsn: Option<String>, tables: Vec<TableReport>) -> Self {
        Self {
            lsn,
            equal: tables.iter().all(|table| table.equal),
            tables,
        }
    }
}

/// One table's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableReport {
    /// Source table, as `schema.table`.
    pub source: String,
    /// Target table, as `schema.table`.
    pub target: String,
    /// Rows (distinct keys) compared.
    pub rows_compared: u64,
    /// Whether the table is equal on both sides.
    pub equal: bool,
    /// The first differences (capped).
    pub differences: Vec<DifferenceReport>,
    /// All differences found, including those not listed.
    pub differences_total: u64,
    /// The source position this table was compared at, when anchored (a pass renews its
    /// anchor between tables, so tables of one pass may differ). For a table compared in
    /// several snapshots, the first (earliest) one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// How many successive snapshots the table was compared in, when more than one: a
    /// long comparison takes fresh ones as it goes, each part of the table (a key range,
    /// in key order, no gap and no overlap) compared as of one source position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<u32>,
}

impl TableReport {
    /// Add the result of comparing another part of the same table (other rows, or the
    /// same rows later). The position stays the earliest one a part was compared at.
    pub fn absorb(&mut self, other: TableReport) {
        self.rows_compared += other.rows_compared;
        self.differences_total += other.differences_total;
        self.equal &= other.equal;
        self.differences.extend(other.differences);
        self.differences
            .truncate(crate::chunk::CompareOptions::default().max_differences);
        if self.lsn.is_none() {
            self.lsn = other.lsn;
        }
    }
}

/// What kind of difference a row shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DifferenceKind {
    /// On the source, not on the target.
    Missing,
    /// On the target, not on the source.
    Extra,
    /// On both, with different values.
    Different,
}

/// One listed difference.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DifferenceReport {
    /// The kind of difference.
    pub kind: DifferenceKind,
    /// Key column → value (the whole row for keyless tables).
    pub key: KeyValues,
    /// Names of the differing columns (empty unless `kind` is `different`).
    pub columns: Vec<String>,
    /// For keyless tables: how many copies are missing or extra, when more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// An ordered `{column: value}` object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyValues(pub Vec<(String, Option<String>)>);

impl KeyValues {
    /// Pair column names with values (text lossily decoded as UTF-8; sessions are pinned to
    /// `client_encoding=UTF8`, so that only matters for corrupt data).
    pub fn from_values(names: &[String], values: &[Value]) -> Self {
        Self(
            values
                .iter()
                .enumerate()
                .map(|(index, value)| {
                    let name = names
                        .get(index)
                        .cloned()
                        .unwrap_or_else(|| format!("column{}", index + 1));
                    let text = value
                        .as_deref()
                        .map(|bytes| String::from_utf8_lossy(bytes).into_owned());
                    (name, text)
                })
                .collect(),
        )
    }
}

impl Serialize for KeyValues {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for KeyValues {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyValues;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of column names to text values or null")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<KeyValues, A::Error> {
                let mut pairs = Vec::with_capacity(access.size_hint().unwrap_or(0));
                while let Some(pair) = access.next_entry::<String, Option<String>>()? {
                    pairs.push(pair);
                }
                Ok(KeyValues(pairs))
            }
        }
        deserializer.deserialize_map(KeyVisitor)
    }
}

impl TableReport {
    /// Report of a keyed table. `key_names` name the key columns, `column_names` the compared
    /// columns in [`crate::chunk::Row::columns`] order.
    pub fn keyed(
        source: impl Into<String>,
        target: impl Into<String>,
        key_names: &[String],
        column_names: &[String],
        outcome: &KeyedOutcome,
    ) -> Self {
        let differences = outcome
            .differences
            .iter()
            .map(|difference| {
                let (kind, columns) = match difference {
                    Difference::Missing { .. } => (DifferenceKind::Missing, Vec::new()),
                    Difference::Extra { .. } => (DifferenceKind::Extra, Vec::new()),
                    Difference::Different { columns, .. } => (
                        DifferenceKind::Different,
                        columns
                            .iter()
                            .map(|&index| {
                                column_names
                                    .get(index)
                                    .cloned()
                                    .unwrap_or_else(|| format!("column{}", index + 1))
                            })
                            .collect(),
                    ),
                };
                DifferenceReport {
                    kind,
                    key: KeyValues::from_values(key_names, difference.key()),
                    columns,
                    count: None,
                }
            })
            .collect();
        Self {
            source: source.into(),
            target: target.into(),
            rows_compared: outcome.rows_compared,
            equal: outcome.is_equal(),
            differences,
            differences_total: outcome.differences_total,
            lsn: None,
            snapshots: None,
        }
    }

    /// Report of a keyless table, listing at most `max_differences` distinct rows.
    pub fn multiset(
        source: impl Into<String>,
        target: impl Into<String>,
        column_names: &[String],
        outcome: &MultisetOutcome,
        max_differences: usize,
    ) -> Self {
        let differences = outcome
            .differences
            .iter()
            .take(max_differences)
            .map(|difference| DifferenceReport {
                kind: match difference.side {
                    Side::Source => DifferenceKind::Missing,
                    Side::Target => DifferenceKind::Extra,
                },
                key: KeyValues::from_values(column_names, &difference.columns),
                columns: Vec::new(),
                count: (difference.count > 1).then_some(difference.count),
            })
            .collect();
        Self {
            source: source.into(),
            target: target.into(),
            rows_compared: outcome.source_rows.max(outcome.target_rows),
            equal: outcome.is_equal(),
            differences,
            differences_total: outcome.differences_total,
            lsn: None,
            snapshots: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::MultisetDifference;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn keyed_report_matches_contract() {
        let outcome = KeyedOutcome {
            source_rows: 3,
            target_rows: 3,
            rows_compared: 4,
            chunks: 1,
            chunks_differing: 1,
            differences: vec![
                Difference::Missing {
                    key: vec![Some(b"2".to_vec()), Some(b"b".to_vec())],
                },
                Difference::Different {
                    key: vec![Some(b"3".to_vec()), None],
                    columns: vec![2],
                },
                Difference::Extra {
                    key: vec![Some(b"9".to_vec()), Some(b"z".to_vec())],
                },
            ],
            differences_total: 5,
            resume_after: None,
        };
        let table = TableReport::keyed(
            "public.t",
            "public.t",
            &names(&["z_id", "a_part"]),
            &names(&["z_id", "a_part", "val"]),
            &outcome,
        );
        let report = VerifyReport::new(Some("0/16B3748".into()), vec![table]);
        let json = serde_json::to_string(&report).expect("serialize");
        assert_eq!(
            json,
            concat!(
                r#"{"lsn":"0/16B3748","equal":false,"tables":[{"source":"public.t","#,
                r#""target":"public.t","rows_compared":4,"equal":false,"differences":["#,
                r#"{"kind":"missing","key":{"z_id":"2","a_part":"b"},"columns":[]},"#,
                r#"{"kind":"different","key":{"z_id":"3","a_part":null},"columns":["val"]},"#,
                r#"{"kind":"extra","key":{"z_id":"9","a_part":"z"},"columns":[]}],"#,
                r#""differences_total":5}]}"#
            )
        );
        let back: VerifyReport = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, report);
    }

    #[test]
    fn equal_report_and_unanchored_lsn() {
        let table = TableReport::keyed("s.a", "t.a", &[], &[], &KeyedOutcome::default());
        let report = VerifyReport::new(None, vec![table]);
        assert!(report.equal);
        let value = serde_json::to_value(&report).expect("serialize");
        assert!(value["lsn"].is_null());
        assert_eq!(value["tables"][0]["differences_total"], 0);
    }

    #[test]
    fn multiset_report_lists_rows_with_counts() {
        let outcome = MultisetOutcome {
            source_rows: 4,
            target_rows: 2,
            differences: vec![
                MultisetDifference {
                    side: Side::Source,
                    columns: vec![Some(b"a".to_vec()), None],
                    count: 2,
                },
                MultisetDifference {
                    side: Side::Target,
                    columns: vec![Some(b"b".to_vec()), Some(b"".to_vec())],
                    count: 1,
                },
            ],
            differences_total: 3,
        };
        let table = TableReport::multiset("s.t", "s.t", &names(&["x", "y"]), &outcome, 1);
        let value = serde_json::to_value(&table).expect("serialize");
        assert_eq!(
            value,
            serde_json::json!({
                "source": "s.t", "target": "s.t", "rows_compared": 4, "equal": false,
                "differences": [
                    {"kind": "missing", "key": {"x": "a", "y": null}, "columns": [], "count": 2}
                ],
                "differences_total": 3
            })
        );
    }
}
