//! How one source table maps onto one target table.

use crate::catalog::TableInfo;
use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident};

/// One target column and where its value comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMap {
    /// The target column.
    pub target: String,
    /// The source column it takes its value from (same name, in this issue; column
    /// expressions come with the mapping work and will sit beside this).
    pub source: String,
    /// Part of the target key.
    pub key: bool,
    /// Compared by text form in row matches (the type has no equality operator).
    pub match_as_text: bool,
    /// The target column's type, as `format_type` prints it (for prepared statements).
    pub type_name: String,
}

/// A source table, its target, and the columns between them.
#[derive(Debug, Clone)]
pub struct TablePlan {
    pub source: TableInfo,
    pub target: TableInfo,
    pub columns: Vec<ColumnMap>,
    /// Binary COPY is safe: every mapped column has the same built-in type on both sides.
    pub binary_copy: bool,
}

impl TablePlan {
    /// Map columns by name. Generated target columns are left to the target; every other
    /// target column needs a source column of the same name and type, and the target key
    /// must be made of mapped columns.
    pub fn by_name(source: TableInfo, target: TableInfo) -> Result<Self> {
        let mut columns = Vec::new();
        let mut binary_copy = true;
        for t in target.columns.iter().filter(|c| !c.generated) {
            let Some(s) = source.column(&t.name).filter(|s| !s.generated) else {
                if t.key {
                    return Err(Error::operator(format!(
                        "target key column {}.{} has no source column of the same name",
                        target.name,
                        quote_ident(&t.name)
                    ))
                    .hint("rename the column on the target, or map it explicitly when column mappings are available"));
                }
                // A target-only column takes its default.
                continue;
            };
            if s.type_name != t.type_name {
                return Err(Error::operator(format!(
                    "column {}.{} is {} on the source but {} on the target",
                    source.name,
                    quote_ident(&t.name),
                    s.type_name,
                    t.type_name
                ))
                .hint("give the target column the source's type"));
            }
            binary_copy &= s.builtin && t.builtin;
            columns.push(ColumnMap {
                target: t.name.clone(),
                source: s.name.clone(),
                key: t.key,
                match_as_text: !t.has_equality,
                type_name: t.type_name.clone(),
            });
        }
        if columns.is_empty() {
            return Err(Error::operator(format!(
                "no column of {} maps onto {}",
                source.name, target.name
            )));
        }
        // Updates and deletes find their target row by the target key, with values the
        // source sends for its own key: the two keys must be the same columns (unless the
        // source sends whole old rows).
        let source_key: Vec<&str> = source.key_columns().map(|c| c.name.as_str()).collect();
        let target_key: Vec<&str> = target.key_columns().map(|c| c.name.as_str()).collect();
        if source.replica_identity != 'f' && !target_key.is_empty() && source_key != target_key {
            return Err(Error::operator(format!(
                "the key of {} ({}) differs from the key of {} ({})",
                target.name,
                target_key.join(", "),
                source.name,
                if source_key.is_empty() { "none".to_string() } else { source_key.join(", ") }
            ))
            .hint("give the target the source's primary key, or set REPLICA IDENTITY FULL on the source table"));
        }
        if target.key_columns().next().is_none() && source.replica_identity != 'f' {
            return Err(Error::operator(format!(
                "table {} has no primary key on the target and no REPLICA IDENTITY FULL on the source",
                target.name
            ))
            .hint(format!(
                "add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                source.name.quoted()
            )));
        }
        Ok(Self {
            source,
            target,
            columns,
            binary_copy,
        })
    }

    pub fn source_name(&self) -> &TableName {
        &self.source.name
    }

    pub fn target_name(&self) -> &TableName {
        &self.target.name
    }

    /// The positions (in [`TablePlan::columns`]) of the target key's columns.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(j, _)| j)
            .collect()
    }

    /// Whether the target has a key that identifies rows (else rows are matched whole).
    pub fn keyed(&self) -> bool {
        self.columns.iter().any(|c| c.key)
    }

    /// `"a", "b"` of the source columns, in mapping order.
    pub fn source_column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.source))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"a", "b"` of the target columns, in mapping order.
    pub fn target_column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.target))
            .collect::<Vec<_>>()
            .join(", ")
    }
}
