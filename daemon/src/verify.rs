//! `cutover verify JOB.toml`: compare every mapped table, source against target, row by row.
//!
//! This first version compares the two databases as they stand (no LSN anchor): run it on a
//! quiet source, or after the job has caught up and writes have stopped; rows changed while
//! it reads can show up as differences. Each side is read with `COPY (SELECT ... ORDER BY
//! key) TO STDOUT` under the pinned session settings, the rows are parsed as they arrive and
//! fed through bounded channels to the verifier on a blocking thread, which hashes chunks of
//! the key-ordered streams and narrows only the chunks that differ down to rows.

use std::sync::Arc;

use anyhow::Context as _;
use cutover_config::{ConnParams, JobSpec};
use cutover_connectors::pg_apply::TablePlan;
use cutover_connectors::{pg_conn, quote_ident};
use cutover_verifier::canonical::table_domain;
use cutover_verifier::chunk::{
    ColumnOrder, CompareOptions, KeyOrder, Row, compare_keyed, compare_multiset,
};
use cutover_verifier::copy_text::{CopyLines, parse_row};
use cutover_verifier::report::{TableReport, VerifyReport};
use futures_util::StreamExt;

use crate::cli::{Outcome, VerifyArgs};

pub async fn verify(args: &VerifyArgs) -> anyhow::Result<Outcome> {
    let spec = JobSpec::load(&args.job)?;
    let source_params = spec.source.conn.resolve()?;
    let target_params = spec.target.conn.resolve()?;
    let app = format!("cutover/{}/verify", spec.name);
    let source = pg_conn::connect(&source_params, &app)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = pg_conn::connect(&target_params, &app)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let plans = crate::job::plan_tables(
        false,
        &spec,
        &source_params,
        &target_params,
        &source,
        &target,
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let plans: Vec<Arc<TablePlan>> = if args.tables.is_empty() {
        plans
    } else {
        for wanted in &args.tables {
            if !plans.iter().any(|p| &p.source_name().to_string() == wanted) {
                anyhow::bail!(
                    "table {wanted} is not in the job; hint: name a source table as schema.table, one of: {}",
                    plans
                        .iter()
                        .map(|p| p.source_name().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        plans
            .into_iter()
            .filter(|p| args.tables.contains(&p.source_name().to_string()))
            .collect()
    };
    let mut tables = Vec::new();
    for plan in &plans {
        tables.push(verify_table(&source_params, &target_params, &app, plan).await?);
    }
    let report = VerifyReport::new(None, tables);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if report.equal {
        Outcome::Success
    } else {
        Outcome::Negative
    })
}

fn print_report(report: &VerifyReport) {
    for t in &report.tables {
        let mark = if t.equal { "equal" } else { "DIFFERENT" };
        println!(
            "{} -> {}: {mark}, {} rows compared, {} differences",
            t.source, t.target, t.rows_compared, t.differences_total
        );
        for d in &t.differences {
            println!("  {}", serde_json::to_string(d).unwrap_or_default());
        }
        if (t.differences.len() as u64) < t.differences_total {
            println!(
                "  ... and {} more",
                t.differences_total - t.differences.len() as u64
            );
        }
    }
    println!(
        "{} (compared as the databases stand, not anchored at an LSN)",
        if report.equal {
            "source and target are equal"
        } else {
            "source and target differ"
        }
    );
}

/// How one side's rows are read and ordered.
struct SideQuery {
    sql: String,
}

/// `ORDER BY` terms and the matching comparator: integer keys by value, everything else
/// by the bytes of its text form (`::text COLLATE "C"`), which is what the comparator
/// reproduces.
fn key_order(plan: &TablePlan, side_source: bool) -> (Vec<String>, KeyOrder) {
    let mut terms = Vec::new();
    let mut order = Vec::new();
    for c in plan.columns.iter().filter(|c| c.key) {
        // The source side orders by the mapped value, the target by its column.
        let name = if side_source {
            c.expr.clone()
        } else {
            quote_ident(&c.target)
        };
        if matches!(c.type_name.as_str(), "smallint" | "integer" | "bigint") {
            terms.push(name);
            order.push(ColumnOrder::Integer);
        } else {
            terms.push(format!("{name}::pg_catalog.text COLLATE \"C\""));
            order.push(ColumnOrder::Bytes);
        }
    }
    (terms, KeyOrder::new(order))
}

fn side_query(plan: &TablePlan, side_source: bool) -> SideQuery {
    // The source side reads through the mapping: the same select list and filter as the
    // snapshot, evaluated by the same server.
    let (table, cols, filter) = if side_source {
        let only = if plan.source.relkind == 'r' {
            "ONLY "
        } else {
            ""
        };
        (
            format!("{only}{}", plan.source_name().quoted()),
            plan.select_list(),
            plan.filter_sql()
                .map(|f| format!(" WHERE {f}"))
                .unwrap_or_default(),
        )
    } else {
        (
            plan.target_name().quoted(),
            plan.target_column_list(),
            String::new(),
        )
    };
    let (terms, _) = key_order(plan, side_source);
    let order = if terms.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", terms.join(", "))
    };
    SideQuery {
        sql: format!("COPY (SELECT {cols} FROM {table}{filter}{order}) TO STDOUT"),
    }
}

/// Rows of one side, handed to the comparison thread in batches.
type Batch = Result<Vec<Row>, String>;

/// Read one side into a bounded channel of parsed row batches, on its own connection.
fn spawn_reader(
    params: ConnParams,
    app: String,
    query: SideQuery,
    columns: usize,
    key_columns: Vec<usize>,
) -> Rows {
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(CHANNEL_BATCHES);
    tokio::spawn(async move {
        let client = match pg_conn::connect(&params, &app).await {
            Ok(c) => c,
            Err(e) => return drop(tx.send(Err(e.to_string())).await),
        };
        let stream = match client.copy_out(&query.sql).await {
            Ok(s) => s,
            Err(e) => {
                let cause = cutover_connectors::error::pg_cause(&e);
                return drop(
                    tx.send(Err(format!("{}: {cause}", params.endpoint())))
                        .await,
                );
            }
        };
        futures_util::pin_mut!(stream);
        let mut lines = CopyLines::new();
        let mut batch = Vec::with_capacity(BATCH_ROWS);
        let mut bad = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return drop(tx.send(Err(cutover_connectors::error::pg_cause(&e))).await),
            };
            lines.push(&chunk, |line| {
                match parse_row(line, columns, &key_columns) {
                    Ok(row) => batch.push(row),
                    Err(e) => bad = Some(e.to_string()),
                }
            });
            if let Some(e) = bad.take() {
                return drop(tx.send(Err(e)).await);
            }
            if batch.len() >= BATCH_ROWS {
                let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS));
                if tx.send(Ok(full)).await.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = lines.finish() {
            return drop(tx.send(Err(e.to_string())).await);
        }
        if !batch.is_empty() {
            let _ = tx.send(Ok(batch)).await;
        }
    });
    Rows {
        rx,
        current: Vec::new().into_iter(),
    }
}

/// Rows per batch, and batches in flight per side: memory stays bounded by both.
const BATCH_ROWS: usize = 1024;
const CHANNEL_BATCHES: usize = 8;

/// The rows of one side as a blocking iterator, for the comparison thread.
struct Rows {
    rx: tokio::sync::mpsc::Receiver<Batch>,
    current: std::vec::IntoIter<Row>,
}

impl Iterator for Rows {
    type Item = Result<Row, String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(row) = self.current.next() {
                return Some(Ok(row));
            }
            match self.rx.blocking_recv()? {
                Ok(batch) => self.current = batch.into_iter(),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

async fn verify_table(
    source: &ConnParams,
    target: &ConnParams,
    app: &str,
    plan: &Arc<TablePlan>,
) -> anyhow::Result<TableReport> {
    let columns = plan.columns.len();
    let key_columns: Vec<usize> = plan.key_indexes();
    let column_names: Vec<String> = plan.columns.iter().map(|c| c.target.clone()).collect();
    let key_names: Vec<String> = key_columns
        .iter()
        .map(|&j| plan.columns[j].target.clone())
        .collect();
    let src_rx = spawn_reader(
        source.clone(),
        app.to_string(),
        side_query(plan, true),
        columns,
        key_columns.clone(),
    );
    let dst_rx = spawn_reader(
        target.clone(),
        app.to_string(),
        side_query(plan, false),
        columns,
        key_columns.clone(),
    );
    let domain = table_domain(&plan.target_name().schema, &plan.target_name().name, 1);
    let (_, order) = key_order(plan, false);
    let plan = plan.clone();
    let options = CompareOptions::default();
    let max = options.max_differences;
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<TableReport> {
        let (source_name, target_name) = (
            plan.source_name().to_string(),
            plan.target_name().to_string(),
        );
        if key_columns.is_empty() {
            let outcome = compare_multiset(&domain, src_rx, dst_rx)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("could not compare {source_name} with {target_name}"))?;
            Ok(TableReport::multiset(
                source_name,
                target_name,
                &column_names,
                &outcome,
                max,
            ))
        } else {
            let outcome = compare_keyed(
                &domain,
                src_rx,
                dst_rx,
                |a, b| order.compare(a, b),
                &options,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("could not compare {source_name} with {target_name}"))?;
            Ok(TableReport::keyed(
                source_name,
                target_name,
                &key_names,
                &column_names,
                &outcome,
            ))
        }
    })
    .await
    .context("the comparison thread failed")??;
    Ok(report)
}
