//! The initial copy: one table (or one page range of a large table) streamed from the
//! source's exported snapshot into the target with COPY, byte for byte.
//!
//! The rows are never decoded: the data of the source's `COPY ... TO STDOUT` (a message per
//! row) goes, joined into 64 KiB messages, into the target's `COPY ... FROM STDIN`, between
//! two sessions of our own protocol code (`wire::relay_copy`). Binary format is used when
//! every column has the same built-in type on both sides (binary forms of user types embed
//! OIDs that differ between clusters), text otherwise.
//!
//! A table is copied in one stream unless it is larger than `[snapshot] split_larger_than`
//! (4GB by default); larger ones are split into ranges of pages (`ctid` ranges, which
//! PostgreSQL 14+ scans directly) copied in parallel. One stream keeps the target's heap in
//! the source's order, so the primary key's build after the copy sorts presorted input, and
//! it lets the copy empty the table in its own transaction and load it with `COPY FREEZE`:
//! the rows arrive frozen and all-visible, so neither the index builds nor a later vacuum
//! write every page again to set hint bits or freeze them. On the 2-CPU benchmark machine
//! four ranges of a 1.3 GB table took longer than one stream and more CPU on the target
//! (docs/benchmarks.md, session 8).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio_postgres::Client;

use super::plan::TablePlan;
use super::state::MARK_DONE_SQL;
use crate::error::{Error, Result};
use crate::ident::quote_literal;
use crate::pg_source::wire;

/// Live counters of a table's copy, shared by the chunks copying it.
#[derive(Debug, Default)]
pub struct CopyCounters {
    /// Rows: counted as COPY messages arrive (one per row), corrected to the server's
    /// count when a chunk finishes.
    pub rows: AtomicU64,
    pub bytes: AtomicU64,
}

/// A range of heap pages `[lower, upper)`; `None` bounds are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyChunk {
    pub lower_page: Option<u64>,
    pub upper_page: Option<u64>,
}

impl CopyChunk {
    pub const WHOLE: CopyChunk = CopyChunk {
        lower_page: None,
        upper_page: None,
    };

    fn predicate(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(l) = self.lower_page {
            parts.push(format!("ctid >= '({l},0)'::pg_catalog.tid"));
        }
        if let Some(u) = self.upper_page {
            parts.push(format!("ctid < '({u},0)'::pg_catalog.tid"));
        }
        (!parts.is_empty()).then(|| parts.join(" AND "))
    }
}

/// How much a chunk copies between updates of its table's shared counters.
const PUBLISH_BYTES: u64 = 256 * 1024;

/// PostgreSQL's page size in all but custom builds; it only turns
/// `[snapshot] split_larger_than` into pages.
pub const PAGE_BYTES: u64 = 8192;

/// Split a table of `pages` pages larger than `split_pages` into at most `parallelism`
/// ranges of at least half that; copy a smaller one whole. The last range is open-ended, so
/// pages added after the size was read are still copied (the snapshot decides which rows
/// are visible).
pub fn plan_chunks(
    relkind: char,
    pages: u64,
    parallelism: usize,
    split_pages: u64,
) -> Vec<CopyChunk> {
    let parallelism = parallelism.max(1) as u64;
    if relkind != 'r' || pages <= split_pages || parallelism == 1 {
        return vec![CopyChunk::WHOLE];
    }
    let n = (pages / (split_pages / 2).max(1)).clamp(1, parallelism);
    let step = pages.div_ceil(n);
    (0..n)
        .map(|i| CopyChunk {
            lower_page: (i > 0).then_some(i * step),
            upper_page: (i + 1 < n).then_some((i + 1) * step),
        })
        .collect()
}

/// Empty the target table before its copy starts (again). A table that other tables'
/// foreign keys reference cannot be truncated alone; it is emptied with DELETE instead, with
/// the foreign-key triggers off for that transaction (the referencing tables are copied from
/// the same snapshot). Returns whether TRUNCATE worked, so that a whole-table copy may
/// truncate again in its own transaction and load with `COPY FREEZE`.
pub async fn truncate_target(target: &Client, plan: &TablePlan) -> Result<bool> {
    let table = plan.target_name().quoted();
    let what = format!("empty {} before its copy", plan.target_name());
    match target.batch_execute(&format!("TRUNCATE {table}")).await {
        Ok(()) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED) => {
            let sql = format!(
                "BEGIN; SET LOCAL session_replication_role = replica; DELETE FROM {table}; COMMIT;"
            );
            if let Err(e) = target.batch_execute(&sql).await {
                let _ = target.batch_execute("ROLLBACK").await;
                let mut err = Error::from_pg(&what, "the target", &e);
                err.hint = Some(format!(
                    "{} is referenced by foreign keys; empty it (and the tables referencing it) on the target, or let the target user set session_replication_role",
                    plan.target_name()
                ));
                return Err(err);
            }
            Ok(false)
        }
        Err(e) => Err(Error::from_pg(&what, "the target", &e)),
    }
}

/// One unit of the copy: a chunk of a table.
#[derive(Debug, Clone)]
pub struct CopyTask {
    pub plan: Arc<TablePlan>,
    pub chunk: CopyChunk,
    /// The table was emptied with TRUNCATE (see [`truncate_target`]). A whole-table chunk
    /// into an ordinary target table then truncates it again in its own transaction and
    /// loads with `COPY FREEZE`. Its rows are visible to every snapshot once it commits,
    /// which nobody but this job reads yet.
    pub truncated: bool,
}

/// Copy one chunk of a table from the snapshot `snapshot_name` into the target, and
/// count it in `cutover.tables` in the same target transaction. `counters` advance as
/// data flows. Returns the rows copied.
///
/// Both sessions are our own protocol sessions ([`wire::Connection`], opened with
/// [`crate::pg_conn::connect_raw`]): the source's COPY data is relayed to the target
/// without being parsed ([`wire::relay_copy`]). After an error both sessions are unusable.
pub async fn copy_chunk(
    source: &mut wire::Connection,
    snapshot_name: &str,
    target: &mut wire::Connection,
    task: &CopyTask,
    job: &str,
    counters: &CopyCounters,
) -> Result<u64> {
    let CopyTask {
        plan,
        chunk,
        truncated,
    } = task;
    let out_what = format!("copy {} out", plan.source_name());
    let in_what = format!("copy into {}", plan.target_name());
    let src_err = |e| Error::from_wire(&out_what, "the source", e);
    let tgt_err = |e| Error::from_wire(&in_what, "the target", e);
    let format = if plan.binary_copy { "binary" } else { "text" };
    let only = if plan.source.relkind == 'r' {
        "ONLY "
    } else {
        ""
    };
    let conditions: Vec<String> = chunk
        .predicate()
        .into_iter()
        .chain(plan.filter_sql().map(str::to_string))
        .collect();
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    // The mapping's select list, evaluated here by the source (see `plan`).
    let out_sql = format!(
        "COPY (SELECT {} FROM {only}{}{filter}) TO STDOUT (FORMAT {format})",
        plan.select_list(),
        plan.source_name().quoted()
    );
    let freeze = *truncated && *chunk == CopyChunk::WHOLE && plan.target.relkind == 'r';
    let in_sql = format!(
        "COPY {} ({}) FROM STDIN (FORMAT {format}{})",
        plan.target_name().quoted(),
        plan.target_column_list(),
        if freeze { ", FREEZE" } else { "" }
    );

    source
        .simple_query(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot_name)
        ))
        .await
        .map_err(src_err)?;
    let begin = if freeze {
        format!("BEGIN; TRUNCATE {}", plan.target_name().quoted())
    } else {
        "BEGIN".to_string()
    };
    target.simple_query(&begin).await.map_err(tgt_err)?;
    source.start_copy(&out_sql, true).await.map_err(src_err)?;
    target.start_copy(&in_sql, false).await.map_err(tgt_err)?;

    // Counted here and published every PUBLISH_BYTES: the counters are shared by the
    // chunks of a table, and an atomic add per write would bounce their cache line
    // between CPUs.
    let (mut messages, mut rows_unpublished, mut bytes_unpublished) = (0u64, 0u64, 0u64);
    let mut progress = |rows: u64, bytes: u64| {
        messages += rows;
        rows_unpublished += rows;
        bytes_unpublished += bytes;
        if bytes_unpublished >= PUBLISH_BYTES {
            counters.rows.fetch_add(rows_unpublished, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(bytes_unpublished, Ordering::Relaxed);
            (rows_unpublished, bytes_unpublished) = (0, 0);
        }
    };
    let rows = wire::relay_copy(source, target, &mut progress)
        .await
        .map_err(|e| match e {
            wire::RelayError::Source(e) => src_err(e),
            wire::RelayError::Target(e) => tgt_err(e),
        })?;
    counters
        .bytes
        .fetch_add(bytes_unpublished, Ordering::Relaxed);
    // Binary COPY adds a header and a trailer message: settle on the server's count.
    counters
        .rows
        .fetch_add(rows_unpublished + rows, Ordering::Relaxed);
    counters.rows.fetch_sub(messages, Ordering::Relaxed);
    source.simple_query("COMMIT").await.map_err(src_err)?;
    target
        .simple_query(&format!(
            "UPDATE cutover.tables SET rows_copied = rows_copied + {rows} \
             WHERE job = {} AND source_table = {}; COMMIT",
            quote_literal(job),
            quote_literal(&plan.source_name().to_string())
        ))
        .await
        .map_err(tgt_err)?;
    Ok(rows)
}

/// Mark the copy of `plan`'s table finished.
pub async fn mark_done(target: &Client, plan: &TablePlan, job: &str) -> Result<()> {
    let source_table = plan.source_name().to_string();
    target
        .execute(MARK_DONE_SQL, &[&job, &source_table, &0i64, &true])
        .await
        .map_err(|e| Error::from_pg("write cutover.tables", "the target", &e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_tables_are_copied_whole() {
        assert_eq!(plan_chunks('r', 100, 4, 1000), vec![CopyChunk::WHOLE]);
        assert_eq!(plan_chunks('r', 1000, 4, 1000), vec![CopyChunk::WHOLE]);
        assert_eq!(plan_chunks('p', 1_000_000, 4, 1000), vec![CopyChunk::WHOLE]);
        assert_eq!(plan_chunks('r', 1_000_000, 1, 1000), vec![CopyChunk::WHOLE]);
    }

    #[test]
    fn large_tables_split_into_contiguous_ranges() {
        // Ranges of at least half the threshold, at most `parallelism` of them.
        assert_eq!(plan_chunks('r', 1001, 4, 1000).len(), 2);
        assert_eq!(plan_chunks('r', 1600, 4, 1000).len(), 3);
        assert_eq!(plan_chunks('r', 100_000, 3, 1000).len(), 3);
        let chunks = plan_chunks('r', 100_000, 4, 1000);
        assert_eq!(chunks.len(), 4);
        assert_eq!(chunks[0].lower_page, None);
        assert_eq!(chunks[3].upper_page, None);
        for w in chunks.windows(2) {
            assert_eq!(w[0].upper_page, w[1].lower_page);
        }
    }
}
