//! What the catalogs of the source and the target say about the tables of a job.

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::ident::TableName;

/// One column of a table, as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    pub name: String,
    pub attnum: i16,
    pub type_oid: u32,
    /// `format_type(atttypid, atttypmod)`, qualified as needed under `search_path=pg_catalog`.
    pub type_name: String,
    /// `format_type(atttypid, NULL)`: the type without its modifier.
    pub base_type: String,
    pub not_null: bool,
    /// A default (or identity) fills the column when an insert leaves it out.
    pub has_default: bool,
    /// A generated column: never copied or written, the target computes it.
    pub generated: bool,
    /// Part of the primary key (or of the replica identity index when there is no key).
    pub key: bool,
    /// Whether the type (or its element type) has a default btree or hash equality. Types
    /// without one (json, xml, point, ...) are matched by their text form.
    pub has_equality: bool,
    /// A built-in type (OID below 16384), whose binary COPY form is the same everywhere.
    pub builtin: bool,
    /// Values of the type travel intact as elements of a `type[]` literal: the type has an
    /// array type, `,` delimits its elements, and it is no array itself (see
    /// `pg_apply::arrays`).
    pub array_element: bool,
}

/// A table: its OID, columns and key.
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    pub name: TableName,
    pub oid: u32,
    /// `r` table, `p` partitioned table.
    pub relkind: char,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: char,
    pub has_primary_key: bool,
    /// Unique indexes and exclusion constraints other than the primary key. Changes to a
    /// table with none can be applied as net changes per key, in any order across keys.
    pub other_unique_indexes: i64,
    /// Columns in attnum order, dropped columns excluded.
    pub columns: Vec<ColumnInfo>,
    /// Size in pages (of the main fork, now) and estimated rows, for planning the copy.
    pub pages: i64,
    pub rows_estimate: f64,
}

impl TableInfo {
    /// The key columns, in column order.
    pub fn key_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| c.key)
    }

    /// Columns that are written (not generated).
    pub fn stored_columns(&self) -> impl Iterator<Item = &ColumnInfo> {
        self.columns.iter().filter(|c| !c.generated)
    }

    pub fn column(&self, name: &str) -> Option<&ColumnInfo> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Whether updates and deletes can find their row: a key, or `REPLICA IDENTITY FULL`.
    pub fn identifiable(&self) -> bool {
        self.columns.iter().any(|c| c.key) || self.replica_identity == 'f'
    }
}

/// Every ordinary or partitioned table (not a partition) outside the system schemas.
pub async fn list_tables(client: &Client) -> Result<Vec<TableName>> {
    let rows = client
        .query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'cutover') \
               AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%' \
             ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(|e| Error::from_pg("list tables", "the source", &e))?;
    Ok(rows
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect())
}

/// Whether `name` matches a `schema.table` pattern where `*` matches any run of characters.
pub fn matches_pattern(name: &TableName, pattern: &str) -> bool {
    let (schema_pat, table_pat) = match pattern.split_once('.') {
        Some((s, t)) => (s, t),
        None => ("public", pattern),
    };
    glob(schema_pat, &name.schema) && glob(table_pat, &name.name)
}

fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative wildcard match with backtracking to the last star.
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// The catalog's description of `name`, or `None` when it does not exist.
pub async fn table_info(client: &Client, name: &TableName) -> Result<Option<TableInfo>> {
    let rel = client
        .query_opt(
            "SELECT c.oid, c.relkind::text, c.relreplident::text, \
                    (pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::int8)::int8, \
                    c.reltuples::float8, \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                            WHERE i.indrelid = c.oid AND i.indisprimary), \
                    (SELECT count(*) FROM pg_catalog.pg_index i \
                     WHERE i.indrelid = c.oid AND NOT i.indisprimary \
                       AND (i.indisunique OR i.indisexclusion))::int8 \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
            &[&name.schema, &name.name],
        )
        .await
        .map_err(|e| Error::from_pg("read the catalog", "the database", &e))?;
    let Some(rel) = rel else { return Ok(None) };
    let oid: u32 = rel.get(0);
    let relkind: String = rel.get(1);
    let replident: String = rel.get(2);
    let has_pk: bool = rel.get(5);
    // Key columns: the primary key, else the replica identity index.
    let cols = client
        .query(
            "WITH key AS ( \
               SELECT unnest(i.indkey) AS attnum FROM pg_catalog.pg_index i \
               WHERE i.indrelid = $1 AND (i.indisprimary OR (i.indisreplident AND NOT $2)) \
             ), elem AS ( \
               SELECT t.oid, CASE WHEN t.typelem <> 0 AND t.typlen = -1 THEN t.typelem \
                                  WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END AS eq_oid \
               FROM pg_catalog.pg_type t \
             ) \
             SELECT a.attname::text, a.attnum, a.atttypid, \
                    pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    a.attgenerated <> '', a.attnum IN (SELECT attnum FROM key), \
                    EXISTS (SELECT 1 FROM pg_catalog.pg_opclass oc \
                            JOIN pg_catalog.pg_am am ON am.oid = oc.opcmethod \
                            WHERE oc.opcdefault AND am.amname IN ('btree', 'hash') \
                              AND oc.opcintype IN (e.eq_oid, \
                                 (SELECT typbasetype FROM pg_catalog.pg_type WHERE oid = e.eq_oid))), \
                    pg_catalog.format_type(a.atttypid, NULL), (a.atthasdef OR a.attidentity <> ''), \
                    (ty.typarray <> 0 AND ty.typdelim = ',' AND ty.typcategory <> 'A') \
             FROM pg_catalog.pg_attribute a JOIN elem e ON e.oid = a.atttypid \
                  JOIN pg_catalog.pg_type ty ON ty.oid = a.atttypid \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&oid, &has_pk],
        )
        .await
        .map_err(|e| Error::from_pg("read the catalog", "the database", &e))?;
    let columns = cols
        .iter()
        .map(|r| {
            let type_oid: u32 = r.get(2);
            ColumnInfo {
                name: r.get(0),
                attnum: r.get(1),
                type_oid,
                type_name: r.get(3),
                base_type: r.get(8),
                not_null: r.get(4),
                has_default: r.get(9),
                generated: r.get(5),
                key: r.get(6),
                has_equality: r.get(7),
                builtin: type_oid < 16384,
                array_element: r.get(10),
            }
        })
        .collect();
    Ok(Some(TableInfo {
        name: name.clone(),
        oid,
        relkind: relkind.chars().next().unwrap_or('r'),
        replica_identity: replident.chars().next().unwrap_or('d'),
        has_primary_key: has_pk,
        other_unique_indexes: rel.get(6),
        columns,
        pages: rel.get(3),
        rows_estimate: rel.get(4),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_like_globs() {
        let t = TableName::new("public", "orders");
        assert!(matches_pattern(&t, "public.*"));
        assert!(matches_pattern(&t, "*.*"));
        assert!(matches_pattern(&t, "public.ord*"));
        assert!(matches_pattern(&t, "orders"));
        assert!(!matches_pattern(&t, "public.order"));
        assert!(!matches_pattern(&t, "app.*"));
        assert!(matches_pattern(
            &TableName::new("public", "a*b"),
            "public.a*b"
        ));
        assert!(matches_pattern(&t, "p*c.*s"));
    }
}
