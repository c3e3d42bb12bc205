//! `[target] create_tables = true`: create a missing target table from the source's
//! definition (identity mapping only).
//!
//! Carried: columns with their types, `NOT NULL`, stored generated columns, the primary key,
//! unique and check constraints, and the other indexes (their definitions rewritten to name
//! the target table). Not carried: defaults, sequences and identity (the target's values
//! come from the source until cutover; set them up before switching), foreign keys (the
//! referenced tables may not exist yet; add them after the copy), triggers, grants. The
//! table is created with its primary key, which the apply needs, and the copy then drops
//! and rebuilds large tables' indexes after the load (`super::indexes`).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident};

fn err(what: &str, side: &str, e: tokio_postgres::Error) -> Error {
    Error::from_pg(what, side, &e)
}

/// The statements that create `target` like `source`, read from the source's catalog.
pub async fn create_table_sql(
    source: &Client,
    src: &TableName,
    dst: &TableName,
) -> Result<Vec<String>> {
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
    let constraints = source
        .query(
            "SELECT pg_catalog.quote_ident(conname), pg_catalog.pg_get_constraintdef(oid) \
             FROM pg_catalog.pg_constraint WHERE conrelid = $1 AND contype IN ('p', 'u', 'c', 'x') \
             ORDER BY contype = 'p' DESC, conname",
            &[&oid],
        )
        .await
        .map_err(|e| err(&format!("read the constraints of {src}"), "the source", e))?;
    for c in &constraints {
        let name: String = c.get(0);
        let def: String = c.get(1);
        statements.push(format!("ALTER TABLE {target} ADD CONSTRAINT {name} {def}"));
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
        statements.push(def.replacen(&from, &to, 1));
    }
    Ok(statements)
}

/// Create `dst` on the target like `src` on the source (and its schema if missing), in one
/// transaction.
pub async fn create_target_table(
    source: &Client,
    target: &Client,
    src: &TableName,
    dst: &TableName,
) -> Result<()> {
    let statements = create_table_sql(source, src, dst).await?;
    let sql = format!(
        "BEGIN; CREATE SCHEMA IF NOT EXISTS {}; {}; COMMIT;",
        quote_ident(&dst.schema),
        statements.join("; ")
    );
    if let Err(e) = target.batch_execute(&sql).await {
        let _ = target.batch_execute("ROLLBACK").await;
        let mut er = err(&format!("create target table {dst}"), "the target", e);
        if er.hint.is_none() {
            er.hint = Some("types and functions the table uses (enums, domains, extensions) must exist on the target first".into());
        }
        return Err(er);
    }
    tracing::info!(table = %dst, from = %src, "created the target table");
    Ok(())
}
