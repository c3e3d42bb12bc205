//! `[target] create_tables = true`: create a missing target table from the source's
//! definition (identity mapping only).
//!
//! Carried: columns with their types, `NOT NULL`, stored generated columns, the primary key,
//! unique and check constraints, and the other indexes (their definitions rewritten to name
//! the target table). Not carried: defaults, sequences and identity (the target's values
//! come from the source until cutover; set them up before switching), foreign keys (the
//! referenced tables may not exist yet; add them after the copy), triggers, grants. The
//! table is created with its primary key, which the apply needs; its other constraints and
//! indexes are built after the data is loaded: they are saved as the table's deferred
//! indexes (`cutover.tables.deferred_indexes`, in the transaction that creates the table),
//! which the copy creates when its last chunk is in (`super::indexes`).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident, quote_literal};

fn err(what: &str, side: &str, e: tokio_postgres::Error) -> Error {
    Error::from_pg(what, side, &e)
}

/// How to create a target table like a source table.
#[derive(Debug, Clone, PartialEq)]
pub struct TableDefinition {
    /// The table and its primary key.
    pub create: Vec<String>,
    /// Other constraints and indexes, built after the load.
    pub after_load: Vec<String>,
}

/// The statements that create `target` like `source`, read from the source's catalog.
pub async fn create_table_sql(
    source: &Client,
    src: &TableName,
    dst: &TableName,
) -> Result<TableDefinition> {
    let rel = source
        .query_one(
            "SELECT c.oid, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&src.schema, &src.name],
        )
        .await
        .map_err(|e| err(&format!("read the definition of {src}"), "the source", e))?;
    let oid: u32 = rel.get(0);
    let source_qualified: String = rel.get(1);
    let columns = source
        .query(
            "SELECT a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, \
                    CASE WHEN a.attgenerated = 's' THEN pg_catalog.pg_get_expr(d.adbin, d.adrelid) END \
             FROM pg_catalog.pg_attribute a \
             LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .map_err(|e| err(&format!("read the columns of {src}"), "the source", e))?;
    let mut column_sql = Vec::new();
    for c in &columns {
        let name: String = c.get(0);
        let type_name: String = c.get(1);
        let not_null: bool = c.get(2);
        let generated: Option<String> = c.get(3);
        let mut def = format!("{} {type_name}", quote_ident(&name));
        if let Some(expr) = generated {
            def.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
        }
        if not_null {
            def.push_str(" NOT NULL");
        }
        column_sql.push(def);
    }
    let target = dst.quoted();
    let mut statements = vec![format!("CREATE TABLE {target} ({})", column_sql.join(", "))];
    let mut after_load = Vec::new();
    let constraints = source
        .query(
            "SELECT pg_catalog.quote_ident(conname), pg_catalog.pg_get_constraintdef(oid), contype = 'p' \
             FROM pg_catalog.pg_constraint WHERE conrelid = $1 AND contype IN ('p', 'u', 'c', 'x') \
             ORDER BY contype = 'p' DESC, conname",
            &[&oid],
        )
        .await
        .map_err(|e| err(&format!("read the constraints of {src}"), "the source", e))?;
    for c in &constraints {
        let name: String = c.get(0);
        let def: String = c.get(1);
        let primary: bool = c.get(2);
        let statement = format!("ALTER TABLE {target} ADD CONSTRAINT {name} {def}");
        if primary {
            statements.push(statement);
        } else {
            after_load.push(statement);
        }
    }
    let indexes = source
        .query(
            "SELECT pg_catalog.pg_get_indexdef(i.indexrelid) FROM pg_catalog.pg_index i \
             WHERE i.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid) \
             ORDER BY i.indexrelid",
            &[&oid],
        )
        .await
        .map_err(|e| err(&format!("read the indexes of {src}"), "the source", e))?;
    let from = format!(" ON {source_qualified} USING ");
    let to = format!(" ON {target} USING ");
    for row in &indexes {
        let def: String = row.get(0);
        if !def.contains(&from) {
            return Err(Error::operator(format!(
                "cannot carry an index of {src} to {dst}: unexpected definition"
            ))
            .detail(def)
            .hint("create the target table yourself, or drop create_tables"));
        }
        after_load.push(def.replacen(&from, &to, 1));
    }
    Ok(TableDefinition {
        create: statements,
        after_load,
    })
}

/// Create `dst` on the target like `src` on the source (and its schema if missing), with
/// its primary key, and save its other constraints and indexes for after the copy of job
/// `job`: one transaction, so a crash leaves either nothing or both.
pub async fn create_target_table(
    source: &Client,
    target: &Client,
    src: &TableName,
    dst: &TableName,
    job: &str,
) -> Result<()> {
    super::ensure_state_schema(target).await?;
    let def = create_table_sql(source, src, dst).await?;
    let deferred = if def.after_load.is_empty() {
        "NULL".to_string()
    } else {
        format!(
            "ARRAY[{}]::text[]",
            def.after_load
                .iter()
                .map(|s| quote_literal(s))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let sql = format!(
        "BEGIN; CREATE SCHEMA IF NOT EXISTS {}; {}; \
         INSERT INTO cutover.tables (job, source_table, target_table, snapshot_lsn, deferred_indexes) \
         VALUES ({}, {}, {}, '0/0', {deferred}) \
         ON CONFLICT (job, source_table) DO UPDATE SET target_table = EXCLUDED.target_table, \
           deferred_indexes = EXCLUDED.deferred_indexes, done_at = NULL; COMMIT;",
        quote_ident(&dst.schema),
        def.create.join("; "),
        quote_literal(job),
        quote_literal(&src.to_string()),
        quote_literal(&dst.to_string())
    );
    if let Err(e) = target.batch_execute(&sql).await {
        let _ = target.batch_execute("ROLLBACK").await;
        let code = e.code().map(|c| c.code().to_string());
        let mut er = err(&format!("create target table {dst}"), "the target", e);
        if er.hint.is_none() {
            er.hint = crate::error::hint_for(
                code.as_deref(),
                |c| c.starts_with("42"),
                "types and functions the table uses (enums, domains, extensions) must exist on the target first",
            );
        }
        return Err(er);
    }
    tracing::info!(table = %dst, from = %src, "created the target table");
    Ok(())
}
