//! Comparing every mapped table, source against target, row by row.
//!
//! `cutover verify JOB.toml` asks the job's daemon, when it runs, for an anchored pass
//! (`POST /v1/verify`, see [`crate::verifier`]): both sides read as of one source LSN
//! ([`crate::anchor`]), so rows in flight are not differences. Without a daemon it compares
//! the two databases as they stand. Each side is read with `COPY (SELECT ... ORDER BY key)
//! TO STDOUT` under the pinned session settings (the source side through the job's
//! mapping), the rows are parsed as they arrive and fed through bounded channels to the
//! verifier on a blocking thread, which hashes chunks of the key-ordered streams and
//! narrows only the chunks that differ down to rows.

use std::sync::Arc;

use anyhow::Context as _;
use cutover_config::JobSpec;
use cutover_connectors::pg_apply::TablePlan;
use cutover_connectors::{pg_conn, quote_ident, quote_literal};
use cutover_verifier::batch::RowBatch;
use cutover_verifier::canonical::table_domain;
use cutover_verifier::chunk::{
    BatchSource, ColumnOrder, CompareOptions, KeyOrder, Value, compare_keyed_batches,
    compare_multiset_batches,
};
use cutover_verifier::copy_text::CopyParser;
use cutover_verifier::report::{TableReport, VerifyReport};
use futures_util::StreamExt;

use crate::cli::{Outcome, VerifyArgs};

pub async fn verify(args: &VerifyArgs) -> anyhow::Result<Outcome> {
    let spec = JobSpec::load(&args.job)?;
    // The job's daemon, when it runs, compares both sides as of one source LSN.
    let endpoint = crate::api_client::Endpoint::from_args(&crate::cli::ApiArgs {
        api: None,
        config: Some(args.job.clone()),
    })?;
    match crate::api_client::request_verify(&endpoint).await {
        Ok(Ok(doc)) => {
            let mut report: VerifyReport = serde_json::from_value(doc)
                .context("the daemon's verification report is not what this version reads")?;
            if !args.tables.is_empty() {
                report.tables.retain(|t| args.tables.contains(&t.source));
                report = VerifyReport::new(report.lsn, report.tables);
            }
            return finish(&report, args.json);
        }
        Ok(Err(why)) => anyhow::bail!("the job's daemon could not verify: {why}"),
        Err(e) if e.kind == crate::api_client::ClientErrorKind::Unreachable => {
            tracing::debug!("no daemon for the job ({e}); comparing the databases as they stand");
        }
        Err(e) => anyhow::bail!("{e}"),
    }
    let source_params = spec.source.conn.resolve()?;
    let target_params = spec.target.conn.resolve()?;
    let app = format!("cutover/{}/verify", spec.name);
    // Both at once; a source that cannot be reached is still the error reported first.
    let (source, target) = tokio::join!(
        pg_conn::connect(&source_params, &app),
        pg_conn::connect(&target_params, &app)
    );
    let source = source.map_err(|e| anyhow::anyhow!("{e}"))?;
    let target = target.map_err(|e| anyhow::anyhow!("{e}"))?;
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
    // The first table is read on the connections that planned (they only read the
    // catalogs); every further table on fresh ones.
    let mut planned = Some((source, target));
    for plan in &plans {
        let (s, t) = match planned.take() {
            Some(pair) => pair,
            None => tokio::try_join!(
                pg_conn::connect(&source_params, &app),
                pg_conn::connect(&target_params, &app)
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        };
        tables.push(compare_table(Arc::new(s), Arc::new(t), plan, None).await?);
    }
    let report = VerifyReport::new(None, tables);
    finish(&report, args.json)
}

/// Print the report; exit 0 equal, 1 differences. A reader that goes away early (`| head`)
/// is not an error: the outcome stays the comparison's.
fn finish(report: &VerifyReport, json: bool) -> anyhow::Result<Outcome> {
    write_report(&mut std::io::stdout().lock(), report, json)
}

fn write_report(
    out: &mut impl std::io::Write,
    report: &VerifyReport,
    json: bool,
) -> anyhow::Result<Outcome> {
    let outcome = if report.equal {
        Outcome::Success
    } else {
        Outcome::Negative
    };
    let written = if json {
        let text = serde_json::to_string_pretty(report)?;
        writeln!(out, "{text}").and_then(|()| out.flush())
    } else {
        print_report(out, report).and_then(|()| out.flush())
    };
    match written {
        Ok(()) => Ok(outcome),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(outcome),
        Err(e) => Err(anyhow::Error::new(e).context("could not write the report")),
    }
}

fn print_report(out: &mut impl std::io::Write, report: &VerifyReport) -> std::io::Result<()> {
    for t in &report.tables {
        let mark = if t.equal { "equal" } else { "DIFFERENT" };
        writeln!(
            out,
            "{} -> {}: {mark}, {} rows compared, {} differences",
            t.source, t.target, t.rows_compared, t.differences_total
        )?;
        for d in &t.differences {
            writeln!(out, "  {}", serde_json::to_string(d).unwrap_or_default())?;
        }
        if (t.differences.len() as u64) < t.differences_total {
            writeln!(
                out,
                "  ... and {} more",
                t.differences_total - t.differences.len() as u64
            )?;
        }
    }
    let verdict = if report.equal {
        "source and target are equal"
    } else {
        "source and target differ"
    };
    match &report.lsn {
        Some(lsn) => writeln!(
            out,
            "{verdict} at source LSN {lsn} (both sides read as of that position by the job's daemon{})",
            if report.equal {
                ""
            } else {
                ": the differences are real"
            }
        ),
        None => writeln!(
            out,
            "{verdict} (compared as the databases stand, not anchored at an LSN)"
        ),
    }
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

/// Where a read of a table starts: all of it, only some keys, or after a key.
#[derive(Clone, Copy)]
enum Range<'a> {
    All,
    Keys(&'a [Vec<String>]),
    After(&'a [Value]),
}

fn side_query(plan: &TablePlan, side_source: bool, range: Range<'_>) -> SideQuery {
    // The source side reads through the mapping: the same select list and filter as the
    // snapshot, evaluated by the same server.
    let (table, cols, mut conditions) = if side_source {
        let only = if plan.source.relkind == 'r' {
            "ONLY "
        } else {
            ""
        };
        (
            format!("{only}{}", plan.source_name().quoted()),
            plan.select_list(),
            plan.filter_sql().map(str::to_string).into_iter().collect(),
        )
    } else {
        (
            plan.target_name().quoted(),
            plan.target_column_list(),
            Vec::new(),
        )
    };
    let (terms, order) = key_order(plan, side_source);
    if let Range::After(after) = range {
        // The rest of the table after a key, in the order both sides are read in; the
        // comparator only stops after keys without NULLs.
        let values = after
            .iter()
            .zip(order.columns())
            .map(|(v, o)| {
                let text = String::from_utf8_lossy(v.as_deref().unwrap_or_default());
                match o {
                    ColumnOrder::Integer => format!("{}::pg_catalog.int8", quote_literal(&text)),
                    ColumnOrder::Bytes => {
                        format!("{}::pg_catalog.text COLLATE \"C\"", quote_literal(&text))
                    }
                }
            })
            .collect::<Vec<_>>();
        conditions.push(format!("({}) > ({})", terms.join(", "), values.join(", ")));
    }
    if let Range::Keys(keys) = range {
        // Only these target keys: the source side by its key expressions.
        let key_cols: Vec<&cutover_connectors::pg_apply::ColumnMap> =
            plan.columns.iter().filter(|c| c.key).collect();
        let terms = key_cols
            .iter()
            .map(|c| {
                if side_source {
                    c.expr.clone()
                } else {
                    quote_ident(&c.target)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let rows = keys
            .iter()
            .map(|k| {
                let values = k
                    .iter()
                    .zip(&key_cols)
                    .map(|(v, c)| format!("{}::{}", quote_literal(v), c.type_name))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("({values})")
            })
            .collect::<Vec<_>>()
            .join(", ");
        conditions.push(format!("({terms}) IN ({rows})"));
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
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
type Batch = Result<RowBatch, String>;

/// A cap on rows read per second, shared by the readers of a pass.
pub struct Throttle {
    rows_per_second: u64,
    started: std::time::Instant,
    rows: std::sync::atomic::AtomicU64,
}

impl Throttle {
    pub fn new(rows_per_second: u64) -> Option<Arc<Self>> {
        (rows_per_second > 0).then(|| {
            Arc::new(Self {
                rows_per_second,
                started: std::time::Instant::now(),
                rows: Default::default(),
            })
        })
    }

    /// Count `rows` read, and wait as long as the cap asks.
    async fn take(&self, rows: u64) {
        let total = self
            .rows
            .fetch_add(rows, std::sync::atomic::Ordering::Relaxed)
            + rows;
        let due = std::time::Duration::from_secs_f64(total as f64 / self.rows_per_second as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// Read one side into a bounded channel of parsed row batches, on `client` (in whatever
/// transaction it is: an anchored pass has it in the anchor's snapshot). The comparison
/// thread hands the batches back once it is done with them, and the reader refills them.
fn spawn_reader(
    client: Arc<tokio_postgres::Client>,
    side: &'static str,
    query: SideQuery,
    columns: usize,
    key_columns: Vec<usize>,
    order: KeyOrder,
    throttle: Option<Arc<Throttle>>,
) -> Rows {
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(CHANNEL_BATCHES);
    let (spare_tx, mut spare_rx) = tokio::sync::mpsc::unbounded_channel::<RowBatch>();
    tokio::spawn(async move {
        let stream = match client.copy_out(&query.sql).await {
            Ok(s) => s,
            Err(e) => {
                let cause = cutover_connectors::error::pg_cause(&e);
                return drop(tx.send(Err(format!("{side}: {cause}"))).await);
            }
        };
        futures_util::pin_mut!(stream);
        let mut parser = CopyParser::new(columns, key_columns);
        let mut batch = parser.batch();
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return drop(tx.send(Err(cutover_connectors::error::pg_cause(&e))).await),
            };
            if let Err(e) = parser.push(&chunk, &mut batch) {
                return drop(tx.send(Err(e.to_string())).await);
            }
            if batch.len() >= BATCH_ROWS {
                let next = match spare_rx.try_recv() {
                    Ok(mut spare) => {
                        spare.clear();
                        spare
                    }
                    Err(_) => parser.batch(),
                };
                let mut full = std::mem::replace(&mut batch, next);
                // The keys' numbers are worked out here, while the rows are in this
                // thread's cache, not on the comparison thread.
                full.index_keys(&order);
                if let Some(t) = &throttle {
                    t.take(full.len() as u64).await;
                }
                if tx.send(Ok(full)).await.is_err() {
                    return;
                }
            }
        }
        if let Err(e) = parser.finish() {
            return drop(tx.send(Err(e.to_string())).await);
        }
        if !batch.is_empty() {
            batch.index_keys(&order);
            let _ = tx.send(Ok(batch)).await;
        }
    });
    Rows {
        rx,
        spare: spare_tx,
    }
}

/// Rows per batch, and batches in flight per side: memory stays bounded by both.
const BATCH_ROWS: usize = 1024;
const CHANNEL_BATCHES: usize = 8;

/// The row batches of one side, for the comparison thread (which blocks on them).
struct Rows {
    rx: tokio::sync::mpsc::Receiver<Batch>,
    /// Batches the comparison is done with, back to the reader.
    spare: tokio::sync::mpsc::UnboundedSender<RowBatch>,
}

impl BatchSource for Rows {
    type Error = String;

    fn next_batch(&mut self) -> Option<Batch> {
        self.rx.blocking_recv()
    }

    fn recycle(&mut self, batch: RowBatch) {
        // The reader may be gone (end of data); the batch is then simply dropped.
        let _ = self.spare.send(batch);
    }
}

/// Compare one table, each side read on its own connection (the source one through the
/// mapping); `throttle` caps the source's rows per second.
pub async fn compare_table(
    source: Arc<tokio_postgres::Client>,
    target: Arc<tokio_postgres::Client>,
    plan: &Arc<TablePlan>,
    throttle: Option<Arc<Throttle>>,
) -> anyhow::Result<TableReport> {
    Ok(
        compare_rows(source, target, plan, throttle, Range::All, None)
            .await?
            .0,
    )
}

/// Compare a keyed table's rows after `after` (all of them when `None`), stopping at the
/// first chunk bound past `deadline`. Returns the report of the rows compared, and the key
/// to go on after when it stopped early (keyless tables are always compared whole).
pub async fn compare_table_part(
    source: Arc<tokio_postgres::Client>,
    target: Arc<tokio_postgres::Client>,
    plan: &Arc<TablePlan>,
    throttle: Option<Arc<Throttle>>,
    after: Option<&[Value]>,
    deadline: std::time::Instant,
) -> anyhow::Result<(TableReport, Option<Vec<Value>>)> {
    let range = match after {
        Some(key) => Range::After(key),
        None => Range::All,
    };
    compare_rows(source, target, plan, throttle, range, Some(deadline)).await
}

/// Compare only the rows of `keys` (target key values, in key column order), a few
/// hundred per query.
pub async fn compare_keys(
    source: Arc<tokio_postgres::Client>,
    target: Arc<tokio_postgres::Client>,
    plan: &Arc<TablePlan>,
    keys: &[Vec<String>],
) -> anyhow::Result<TableReport> {
    let mut total: Option<TableReport> = None;
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let (r, _) = compare_rows(
            source.clone(),
            target.clone(),
            plan,
            None,
            Range::Keys(chunk),
            None,
        )
        .await?;
        total = Some(match total {
            None => r,
            Some(mut t) => {
                t.absorb(r);
                t
            }
        });
    }
    Ok(total.unwrap_or_else(|| {
        TableReport::keyed(
            plan.source_name().to_string(),
            plan.target_name().to_string(),
            &[],
            &[],
            &Default::default(),
        )
    }))
}

/// Keys per query of [`compare_keys`].
const KEYS_PER_QUERY: usize = 500;

async fn compare_rows(
    source: Arc<tokio_postgres::Client>,
    target: Arc<tokio_postgres::Client>,
    plan: &Arc<TablePlan>,
    throttle: Option<Arc<Throttle>>,
    range: Range<'_>,
    deadline: Option<std::time::Instant>,
) -> anyhow::Result<(TableReport, Option<Vec<Value>>)> {
    let columns = plan.columns.len();
    let key_columns: Vec<usize> = plan.key_indexes();
    let column_names: Vec<String> = plan.columns.iter().map(|c| c.target.clone()).collect();
    let key_names: Vec<String> = key_columns
        .iter()
        .map(|&j| plan.columns[j].target.clone())
        .collect();
    // Both sides are compared in the target's key order (the source reads the same keys
    // through the mapping).
    let (_, order) = key_order(plan, false);
    // To end both reads if the comparison stops before the end of the table.
    let cancels = [source.cancel_token(), target.cancel_token()];
    let src_rx = spawn_reader(
        source,
        "the source",
        side_query(plan, true, range),
        columns,
        key_columns.clone(),
        order.clone(),
        throttle,
    );
    let dst_rx = spawn_reader(
        target,
        "the target",
        side_query(plan, false, range),
        columns,
        key_columns.clone(),
        order.clone(),
        None,
    );
    let domain = table_domain(&plan.target_name().schema, &plan.target_name().name, 1);
    let plan = plan.clone();
    let options = CompareOptions {
        deadline,
        ..Default::default()
    };
    let max = options.max_differences;
    let report = tokio::task::spawn_blocking(move || -> anyhow::Result<(TableReport, _)> {
        let (source_name, target_name) = (
            plan.source_name().to_string(),
            plan.target_name().to_string(),
        );
        if key_columns.is_empty() {
            let outcome = compare_multiset_batches(&domain, src_rx, dst_rx)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("could not compare {source_name} with {target_name}"))?;
            Ok((
                TableReport::multiset(source_name, target_name, &column_names, &outcome, max),
                None,
            ))
        } else {
            let outcome = compare_keyed_batches(&domain, src_rx, dst_rx, &order, &options)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| format!("could not compare {source_name} with {target_name}"))?;
            let report = TableReport::keyed(
                source_name,
                target_name,
                &key_names,
                &column_names,
                &outcome,
            );
            Ok((report, outcome.resume_after))
        }
    })
    .await
    .context("the comparison thread failed")??;
    if report.1.is_some() {
        // Stopped early: without a cancel, each server would go on sending the rest of
        // the table at full speed (the client's connection drains a response in flight
        // before it closes, discarding it). The caller drops these sessions, so the
        // cancel cannot hit a later query.
        for cancel in cancels {
            if let Err(e) = cancel.cancel_query(tokio_postgres::NoTls).await {
                tracing::debug!(error = %e, "could not cancel a verification read");
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cutover_verifier::chunk::{Difference, KeyedOutcome};

    /// A writer that fails every write with `kind`.
    struct Failing(std::io::ErrorKind);

    impl std::io::Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Err(self.0.into())
        }
    }

    fn report(equal: bool) -> VerifyReport {
        let outcome = KeyedOutcome {
            source_rows: 2,
            target_rows: 1,
            rows_compared: 2,
            differences_total: u64::from(!equal),
            differences: if equal {
                Vec::new()
            } else {
                vec![Difference::Missing {
                    key: vec![Some(b"7".to_vec())],
                }]
            },
            ..Default::default()
        };
        let table = TableReport::keyed(
            "public.t".to_string(),
            "public.t".to_string(),
            &["id".to_string()],
            &["id".to_string()],
            &outcome,
        );
        VerifyReport::new(None, vec![table])
    }

    #[test]
    fn a_closed_pipe_keeps_the_outcome() {
        for json in [true, false] {
            for (equal, outcome) in [(true, Outcome::Success), (false, Outcome::Negative)] {
                let got = write_report(
                    &mut Failing(std::io::ErrorKind::BrokenPipe),
                    &report(equal),
                    json,
                )
                .expect("a broken pipe is not an error");
                assert_eq!(got, outcome);
            }
            let error = write_report(
                &mut Failing(std::io::ErrorKind::PermissionDenied),
                &report(true),
                json,
            )
            .expect_err("other write errors are");
            assert!(error.to_string().contains("could not write the report"));
        }
    }

    #[test]
    fn report_text_is_unchanged() {
        let mut out = Vec::new();
        let outcome = write_report(&mut out, &report(false), false).expect("written");
        assert_eq!(outcome, Outcome::Negative);
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "public.t -> public.t: DIFFERENT, 2 rows compared, 1 differences\n  \
             {\"kind\":\"missing\",\"key\":{\"id\":\"7\"},\"columns\":[]}\n\
             source and target differ (compared as the databases stand, not anchored at an LSN)\n"
        );
        let mut out = Vec::new();
        write_report(&mut out, &report(true), true).expect("written");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "{}\n",
                serde_json::to_string_pretty(&report(true)).expect("json")
            )
        );
    }
}
