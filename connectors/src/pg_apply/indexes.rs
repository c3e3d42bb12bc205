//! Indexes built after the load, as pg_restore and pgcopydb do: maintaining a btree row by
//! row while COPY streams in costs more than building it once afterwards.
//!
//! Before a large table's copy, its target indexes and key/unique/exclusion constraints are
//! dropped and their definitions saved in `cutover.tables.deferred_indexes`, in one
//! transaction. When the last chunk is in, they are created again and the table is marked
//! done, again in one transaction. A restart in between finds the definitions saved (and
//! the indexes gone), recopies the table and restores them the same way: the target never
//! ends up without its indexes once the table counts as done.
//!
//! Tables are left alone when their key is referenced by a foreign key (it cannot be
//! dropped), when the target is partitioned, or when its replica identity uses an index.

use tokio_postgres::Client;

use super::plan::TablePlan;
use crate::error::{Error, Result};
use crate::ident::quote_literal;

/// Tables smaller than this many pages (8 MiB) keep their indexes during the copy.
pub const MIN_DEFERRED_PAGES: i64 = 1024;

fn err(what: &str, e: tokio_postgres::Error) -> Error {
    Error::from_pg(what, "the target", &e)
}

/// Drop the target's indexes for the copy of `plan`'s table, saving how to recreate them.
/// Returns whether indexes are (now or already) deferred.
pub async fn defer_indexes(target: &Client, plan: &TablePlan, job: &str) -> Result<bool> {
    let source_table = plan.source_name().to_string();
    let saved: Option<Vec<String>> = target
        .query_one(
            "SELECT deferred_indexes FROM cutover.tables WHERE job = $1 AND source_table = $2",
            &[&job, &source_table],
        )
        .await
        .map_err(|e| err("read cutover.tables", e))?
        .get(0);
    if saved.is_some() {
        // A restart: they were dropped before, and are restored when this copy ends.
        return Ok(true);
    }
    if plan.source.pages < MIN_DEFERRED_PAGES || plan.target.relkind != 'r' {
        return Ok(false);
    }
    let oid = plan.target.oid;
    let blocked = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE contype = 'f' AND confrelid = $1) \
                 OR (SELECT relreplident = 'i' FROM pg_catalog.pg_class WHERE oid = $1)",
            &[&oid],
        )
        .await
        .map_err(|e| err("read the target's constraints", e))?
        .get::<_, bool>(0);
    if blocked {
        return Ok(false);
    }
    let table = plan.target_name().quoted();
    let rows = target
        .query(
            "SELECT 'ALTER TABLE ' || $2 || ' ADD CONSTRAINT ' || pg_catalog.quote_ident(c.conname) || ' ' \
                    || pg_catalog.pg_get_constraintdef(c.oid), \
                    'ALTER TABLE ' || $2 || ' DROP CONSTRAINT ' || pg_catalog.quote_ident(c.conname), 0 \
             FROM pg_catalog.pg_constraint c \
             WHERE c.conrelid = $1 AND c.contype IN ('p', 'u', 'x') \
             UNION ALL \
             SELECT pg_catalog.pg_get_indexdef(i.indexrelid), \
                    'DROP INDEX ' || pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(ic.relname), 1 \
             FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class ic ON ic.oid = i.indexrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = ic.relnamespace \
             WHERE i.indrelid = $1 \
               AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint c WHERE c.conindid = i.indexrelid) \
             ORDER BY 3",
            &[&oid, &table],
        )
        .await
        .map_err(|e| err("read the target's indexes", e))?;
    if rows.is_empty() {
        return Ok(false);
    }
    let creates: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let drops: Vec<String> = rows.iter().map(|r| r.get(1)).collect();
    let saved_array = creates
        .iter()
        .map(|c| quote_literal(c))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "BEGIN; UPDATE cutover.tables SET deferred_indexes = ARRAY[{saved_array}]::text[] \
         WHERE job = {} AND source_table = {}; {}; COMMIT;",
        quote_literal(job),
        quote_literal(&source_table),
        drops.join("; ")
    );
    in_transaction(target, &sql).await.map_err(|e| {
        err(
            &format!("drop the indexes of {} for the copy", plan.target_name()),
            e,
        )
    })?;
    tracing::debug!(table = %plan.target_name(), indexes = creates.len(), "indexes deferred until the copy ends");
    Ok(true)
}

/// Recreate the indexes saved for `plan`'s table (if any) and mark its copy done, in one
/// transaction.
pub async fn restore_indexes_and_mark_done(
    target: &Client,
    plan: &TablePlan,
    job: &str,
) -> Result<()> {
    let source_table = plan.source_name().to_string();
    let saved: Option<Vec<String>> = target
        .query_one(
            "SELECT deferred_indexes FROM cutover.tables WHERE job = $1 AND source_table = $2",
            &[&job, &source_table],
        )
        .await
        .map_err(|e| err("read cutover.tables", e))?
        .get(0);
    let creates = saved.unwrap_or_default();
    // Index builds sort the whole table: give them at least 256 MB (never less than the
    // server's own setting), for this transaction only, so a large table's sort stays in
    // memory instead of spilling to disk.
    let memory = if creates.is_empty() {
        ""
    } else {
        "SELECT pg_catalog.set_config('maintenance_work_mem', \
         (GREATEST(pg_catalog.pg_size_bytes(pg_catalog.current_setting('maintenance_work_mem')), 268435456) / 1024)::pg_catalog.text || 'kB', true); "
    };
    let sql = format!(
        "BEGIN; {memory}{}{}UPDATE cutover.tables SET deferred_indexes = NULL, done_at = now() \
         WHERE job = {} AND source_table = {}; COMMIT;",
        creates.join("; "),
        if creates.is_empty() { "" } else { "; " },
        quote_literal(job),
        quote_literal(&source_table)
    );
    in_transaction(target, &sql).await.map_err(|e| {
        let code = e.code().map(|c| c.code().to_string());
        let mut er = err(&format!("recreate the indexes of {}", plan.target_name()), e);
        if er.hint.is_none() {
            er.hint = crate::error::hint_for(
                code.as_deref(),
                crate::error::is_constraint_violation,
                "the copied rows break a unique index or constraint the target has and the source lacks; fix the target's definition and run the job again",
            );
        }
        er
    })
}

/// Run `sql` (which opens and commits its own transaction); roll back if it fails, so the
/// session is not left inside an aborted transaction.
async fn in_transaction(
    client: &Client,
    sql: &str,
) -> std::result::Result<(), tokio_postgres::Error> {
    let result = client.batch_execute(sql).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

/// After a crash during a copy whose indexes were deferred: empty those tables (they are
/// copied again anyway) and give them their indexes back, so the catalog shows the target as
/// the user defined it before anything is planned. Reads nothing but `cutover.tables`, and
/// does nothing when that table does not exist.
pub async fn undo_interrupted_deferrals(target: &Client, job: &str) -> Result<()> {
    let exists: bool = target
        .query_one(
            "SELECT pg_catalog.to_regclass('cutover.tables') IS NOT NULL",
            &[],
        )
        .await
        .map_err(|e| err("read the catalog", e))?
        .get(0);
    if !exists {
        return Ok(());
    }
    let rows = target
        .query(
            "SELECT source_table, target_table, deferred_indexes FROM cutover.tables \
             WHERE job = $1 AND deferred_indexes IS NOT NULL AND done_at IS NULL",
            &[&job],
        )
        .await
        .map_err(|e| err("read cutover.tables", e))?;
    for row in rows {
        let source_table: String = row.get(0);
        let target_table: String = row.get(1);
        let creates: Vec<String> = row.get(2);
        let Some(name) = crate::ident::TableName::parse(&target_table, "public") else {
            continue;
        };
        let sql = format!(
            "BEGIN; TRUNCATE {}; {}{}UPDATE cutover.tables SET deferred_indexes = NULL \
             WHERE job = {} AND source_table = {}; COMMIT;",
            name.quoted(),
            creates.join("; "),
            if creates.is_empty() { "" } else { "; " },
            quote_literal(job),
            quote_literal(&source_table)
        );
        in_transaction(target, &sql)
            .await
            .map_err(|e| err(&format!("restore the indexes of {target_table}"), e))?;
        tracing::info!(table = %target_table, "restored indexes deferred by an interrupted copy");
    }
    Ok(())
}
