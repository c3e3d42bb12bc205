//! Applying the stream: source transactions, in commit order, grouped into target
//! transactions that each end by recording how far they got.
//!
//! Statements are built as SQL text with every value a quoted literal (the text form
//! pgoutput sent, which the target column's input function parses back), and sent in
//! batches with the simple query protocol: one round trip carries many statements, and
//! consecutive inserts into one table become one multi-row `INSERT`. Values are never
//! spliced unquoted and identifiers are always quoted. The SQL buffer is flushed to the
//! server whenever it passes [`MAX_SQL_BYTES`], so a transaction of any size uses bounded
//! memory here; the target holds the open transaction.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::plan::TablePlan;
use super::state::Progress;
use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident, quote_literal};
use crate::lsn::Lsn;
use crate::pg_source::decode::{
    Begin, ColumnValue, Commit, Delete, Insert, OldTuple, Relation, Truncate, TupleData, Update,
};

/// Flush buffered SQL to the target past this size.
const MAX_SQL_BYTES: usize = 1 << 20;
/// Rows in one multi-row statement at most.
const MAX_ROWS_PER_STATEMENT: usize = 1000;

/// When to end a target transaction that holds several source transactions.
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub max_transactions: usize,
    pub max_rows: u64,
    pub max_age: Duration,
}

impl Default for GroupLimits {
    fn default() -> Self {
        Self {
            max_transactions: 2000,
            max_rows: 50_000,
            max_age: Duration::from_millis(200),
        }
    }
}

/// Counters since the applier was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Source transactions committed on the target.
    pub transactions: u64,
    /// Row changes committed on the target.
    pub rows: u64,
}

/// How the columns of one source relation (by OID, from its Relation message) feed a plan.
struct RelationMap {
    name: TableName,
    plan: Option<Arc<TablePlan>>,
    /// For each plan column, the index of its source column in the relation's tuples.
    source_index: Vec<usize>,
}

/// The statement being extended with more rows.
#[derive(PartialEq, Eq)]
enum OpenStatement {
    Insert { oid: u32, rows: usize },
    Delete { oid: u32, rows: usize },
}

/// Applies decoded changes to the target.
pub struct Applier {
    client: Client,
    job: String,
    plans: HashMap<TableName, Arc<TablePlan>>,
    /// Changes to a table apply only from transactions that commit at or after this LSN.
    snapshot_lsn: HashMap<TableName, Lsn>,
    relations: HashMap<u32, RelationMap>,
    limits: GroupLimits,
    sql: String,
    open: Option<OpenStatement>,
    /// A target transaction is open (its BEGIN is buffered or sent).
    in_group: bool,
    group_started: Instant,
    group_txns: usize,
    group_rows: u64,
    /// The source transaction being received: its commit LSN, and whether it is skipped.
    txn: Option<(Lsn, bool)>,
    /// The last source transaction added to the open group.
    last_in_group: Option<Progress>,
    committed: Progress,
    stats: ApplyStats,
    warned_unmapped: std::collections::HashSet<u32>,
}

impl Applier {
    /// `committed` is the target's progress row (or the slot's start when there is none).
    pub fn new(
        client: Client,
        job: &str,
        plans: Vec<Arc<TablePlan>>,
        snapshot_lsn: HashMap<TableName, Lsn>,
        committed: Progress,
        limits: GroupLimits,
    ) -> Self {
        Self {
            client,
            job: job.to_string(),
            plans: plans
                .into_iter()
                .map(|p| (p.source_name().clone(), p))
                .collect(),
            snapshot_lsn,
            relations: HashMap::new(),
            limits,
            sql: String::with_capacity(MAX_SQL_BYTES + 64 * 1024),
            open: None,
            in_group: false,
            group_started: Instant::now(),
            group_txns: 0,
            group_rows: 0,
            txn: None,
            last_in_group: None,
            committed,
            stats: ApplyStats::default(),
            warned_unmapped: Default::default(),
        }
    }

    /// What the target durably holds.
    pub fn committed(&self) -> Progress {
        self.committed
    }

    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    /// Whether a source transaction is between its Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Whether applied source transactions wait in an open target transaction.
    pub fn has_uncommitted(&self) -> bool {
        self.in_group
    }

    /// Whether the open group should be committed now.
    pub fn group_full(&self) -> bool {
        self.in_group
            && (self.group_txns >= self.limits.max_transactions
                || self.group_rows >= self.limits.max_rows
                || self.group_started.elapsed() >= self.limits.max_age)
    }

    pub fn relation(&mut self, rel: &Relation) -> Result<()> {
        let name = TableName::new(rel.namespace.clone(), rel.name.clone());
        let plan = self.plans.get(&name).cloned();
        let mut source_index = Vec::new();
        if let Some(plan) = &plan {
            for c in &plan.columns {
                let idx = rel.columns.iter().position(|rc| rc.name == c.source).ok_or_else(|| {
                    Error::operator(format!(
                        "column {}.{} is gone from the source",
                        name,
                        quote_ident(&c.source)
                    ))
                    .detail("the table's shape changed while the job ran (a dropped or renamed column)")
                    .hint("restore the column on the source, or change the target and the mapping and run the job again")
                })?;
                source_index.push(idx);
            }
        }
        self.relations.insert(
            rel.oid,
            RelationMap {
                name,
                plan,
                source_index,
            },
        );
        Ok(())
    }

    pub fn begin(&mut self, begin: &Begin) -> Result<()> {
        let skip = begin.final_lsn <= self.committed.commit_lsn
            || self
                .last_in_group
                .is_some_and(|l| begin.final_lsn <= l.commit_lsn);
        self.txn = Some((begin.final_lsn, skip));
        Ok(())
    }

    /// The relation map for a change, when the change must be applied.
    fn target_for(&mut self, oid: u32) -> Result<Option<(Arc<TablePlan>, Vec<usize>)>> {
        let Some((commit_lsn, skip)) = self.txn else {
            return Err(Error::transient(
                "replication stream sent a change outside a transaction",
            ));
        };
        if skip {
            return Ok(None);
        }
        let Some(rel) = self.relations.get(&oid) else {
            return Err(Error::transient(format!(
                "replication stream sent a change for relation {oid} before its Relation message"
            )));
        };
        let Some(plan) = rel.plan.clone() else {
            if self.warned_unmapped.insert(oid) {
                tracing::warn!(table = %rel.name, "ignoring changes to a published table the job does not map");
            }
            return Ok(None);
        };
        let from = self
            .snapshot_lsn
            .get(plan.source_name())
            .copied()
            .unwrap_or(Lsn::ZERO);
        if commit_lsn < from {
            // The table's copy was taken after this transaction committed: it is in there.
            return Ok(None);
        }
        Ok(Some((plan, rel.source_index.clone())))
    }

    fn ensure_group(&mut self) {
        if !self.in_group {
            self.in_group = true;
            self.group_started = Instant::now();
            self.group_txns = 0;
            self.group_rows = 0;
            self.sql.push_str("BEGIN; SET CONSTRAINTS ALL DEFERRED;");
        }
    }

    fn close_statement(&mut self) {
        match self.open.take() {
            Some(OpenStatement::Insert { .. }) => self.sql.push(';'),
            Some(OpenStatement::Delete { .. }) => self.sql.push_str(");"),
            None => {}
        }
    }

    async fn maybe_flush(&mut self) -> Result<()> {
        if self.sql.len() >= MAX_SQL_BYTES {
            self.close_statement();
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<()> {
        if self.sql.is_empty() {
            return Ok(());
        }
        let result = self.client.batch_execute(&self.sql).await;
        self.sql.clear();
        result.map_err(|e| self.apply_error(e))
    }

    fn apply_error(&self, e: tokio_postgres::Error) -> Error {
        let upto = self
            .txn
            .map(|t| t.0)
            .or(self.last_in_group.map(|l| l.commit_lsn));
        let what = match upto {
            Some(lsn) => format!("apply source transactions up to commit LSN {lsn}"),
            None => "apply source transactions".to_string(),
        };
        let mut err = Error::from_pg(&what, "the target", &e);
        if !err.is_transient() && err.hint.is_none() {
            err.hint = Some("the target differs from the source (a row changed or added behind the job's back?); fix the target row, then run the job again: it resumes at the same transaction".into());
        }
        err
    }

    fn push_value(
        sql: &mut String,
        value: &ColumnValue,
        table: &TableName,
        column: &str,
    ) -> Result<()> {
        match value {
            ColumnValue::Null => sql.push_str("NULL"),
            ColumnValue::Text(bytes) => {
                let text = std::str::from_utf8(bytes).map_err(|_| {
                    Error::operator(format!(
                        "invalid UTF-8 in column {table}.{}",
                        quote_ident(column)
                    ))
                })?;
                sql.push_str(&quote_literal(text));
            }
            ColumnValue::UnchangedToast => {
                return Err(Error::operator(format!(
                    "the stream sent no value for column {table}.{} of a new row",
                    quote_ident(column)
                )));
            }
            ColumnValue::Binary(_) => {
                return Err(Error::operator(
                    "the stream sent a binary value; cutover asks for text",
                ));
            }
        }
        Ok(())
    }

    fn value<'a>(tuple: &'a TupleData, idx: usize, table: &TableName) -> Result<&'a ColumnValue> {
        tuple.columns.get(idx).ok_or_else(|| {
            Error::operator(format!(
                "a row of {table} has fewer columns than its Relation message"
            ))
        })
    }

    pub async fn insert(&mut self, ins: &Insert) -> Result<()> {
        let Some((plan, idx)) = self.target_for(ins.oid)? else {
            return Ok(());
        };
        self.ensure_group();
        let extend = matches!(self.open, Some(OpenStatement::Insert { oid, rows }) if oid == ins.oid && rows < MAX_ROWS_PER_STATEMENT);
        if extend {
            self.sql.push_str(",(");
        } else {
            self.close_statement();
            let _ = write!(
                self.sql,
                "INSERT INTO {} ({}) VALUES (",
                plan.target_name().quoted(),
                plan.target_column_list()
            );
        }
        for (j, c) in plan.columns.iter().enumerate() {
            if j > 0 {
                self.sql.push(',');
            }
            let v = Self::value(&ins.new, idx[j], plan.source_name())?;
            Self::push_value(&mut self.sql, v, plan.source_name(), &c.source)?;
        }
        self.sql.push(')');
        self.open = Some(match self.open {
            Some(OpenStatement::Insert { oid, rows }) if extend => OpenStatement::Insert {
                oid,
                rows: rows + 1,
            },
            _ => OpenStatement::Insert {
                oid: ins.oid,
                rows: 1,
            },
        });
        self.group_rows += 1;
        self.maybe_flush().await
    }

    /// `WHERE` conditions that find the row `tuple` on the target: the key columns, or for
    /// a table without a key every column (with `IS NOT DISTINCT FROM`; by text form for
    /// types without equality; columns the stream left out are skipped).
    fn push_match(
        sql: &mut String,
        plan: &TablePlan,
        idx: &[usize],
        tuple: &TupleData,
        keyed: bool,
    ) -> Result<()> {
        let mut first = true;
        for (j, c) in plan.columns.iter().enumerate() {
            if keyed && !c.key {
                continue;
            }
            let v = Self::value(tuple, idx[j], plan.source_name())?;
            if matches!(v, ColumnValue::UnchangedToast) {
                if keyed {
                    return Err(Error::operator(format!(
                        "key column {}.{} arrived without its value (an unchanged TOASTed key)",
                        plan.source_name(),
                        quote_ident(&c.source)
                    ))
                    .hint("set REPLICA IDENTITY FULL on the source table, or use a key column that is not stored out of line"));
                }
                continue;
            }
            if !first {
                sql.push_str(" AND ");
            }
            first = false;
            if matches!(v, ColumnValue::Null) {
                let _ = write!(sql, "{} IS NULL", quote_ident(&c.target));
                continue;
            }
            if c.match_as_text {
                let _ = write!(sql, "{}::pg_catalog.text", quote_ident(&c.target));
            } else {
                sql.push_str(&quote_ident(&c.target));
            }
            sql.push_str(if keyed {
                " = "
            } else {
                " IS NOT DISTINCT FROM "
            });
            Self::push_value(sql, v, plan.source_name(), &c.source)?;
        }
        if first {
            sql.push_str("true");
        }
        Ok(())
    }

    pub async fn update(&mut self, upd: &Update) -> Result<()> {
        let Some((plan, idx)) = self.target_for(upd.oid)? else {
            return Ok(());
        };
        self.ensure_group();
        self.close_statement();
        let keyed = plan.keyed();
        let mut set = String::new();
        for (j, c) in plan.columns.iter().enumerate() {
            let v = Self::value(&upd.new, idx[j], plan.source_name())?;
            if matches!(v, ColumnValue::UnchangedToast) {
                // Unchanged TOAST: the target keeps what it has (hard case 1).
                continue;
            }
            if !set.is_empty() {
                set.push(',');
            }
            let _ = write!(set, "{} = ", quote_ident(&c.target));
            Self::push_value(&mut set, v, plan.source_name(), &c.source)?;
        }
        if set.is_empty() {
            return Ok(());
        }
        let target = plan.target_name().quoted();
        let old = upd.old.as_ref().map(OldTuple::tuple);
        if keyed {
            let _ = write!(self.sql, "UPDATE {target} SET {set} WHERE ");
            Self::push_match(&mut self.sql, &plan, &idx, old.unwrap_or(&upd.new), true)?;
        } else {
            let Some(old) = old else {
                return Err(Error::operator(format!(
                    "an update of {} arrived without the old row",
                    plan.source_name()
                ))
                .hint(format!(
                    "run ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                    plan.source_name().quoted()
                )));
            };
            let _ = write!(
                self.sql,
                "UPDATE {target} SET {set} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE "
            );
            Self::push_match(&mut self.sql, &plan, &idx, old, false)?;
            self.sql.push_str(" LIMIT 1)");
        }
        self.sql.push(';');
        self.group_rows += 1;
        self.maybe_flush().await
    }

    pub async fn delete(&mut self, del: &Delete) -> Result<()> {
        let Some((plan, idx)) = self.target_for(del.oid)? else {
            return Ok(());
        };
        self.ensure_group();
        let target = plan.target_name().quoted();
        let old = del.old.tuple();
        if plan.keyed() {
            let keys: Vec<usize> = plan
                .columns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.key)
                .map(|(j, _)| j)
                .collect();
            let extend = matches!(self.open, Some(OpenStatement::Delete { oid, rows }) if oid == del.oid && rows < MAX_ROWS_PER_STATEMENT);
            if extend {
                self.sql.push(',');
            } else {
                self.close_statement();
                let cols = keys
                    .iter()
                    .map(|&j| quote_ident(&plan.columns[j].target))
                    .collect::<Vec<_>>()
                    .join(",");
                let _ = write!(self.sql, "DELETE FROM {target} WHERE ({cols}) IN (");
            }
            self.sql.push('(');
            for (n, &j) in keys.iter().enumerate() {
                if n > 0 {
                    self.sql.push(',');
                }
                let v = Self::value(old, idx[j], plan.source_name())?;
                if !matches!(v, ColumnValue::Text(_)) {
                    return Err(Error::operator(format!(
                        "a delete from {} arrived without a value for key column {}",
                        plan.source_name(),
                        quote_ident(&plan.columns[j].source)
                    )));
                }
                Self::push_value(
                    &mut self.sql,
                    v,
                    plan.source_name(),
                    &plan.columns[j].source,
                )?;
            }
            self.sql.push(')');
            self.open = Some(match self.open {
                Some(OpenStatement::Delete { oid, rows }) if extend => OpenStatement::Delete {
                    oid,
                    rows: rows + 1,
                },
                _ => OpenStatement::Delete {
                    oid: del.oid,
                    rows: 1,
                },
            });
        } else {
            self.close_statement();
            let _ = write!(
                self.sql,
                "DELETE FROM {target} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE "
            );
            Self::push_match(&mut self.sql, &plan, &idx, old, false)?;
            self.sql.push_str(" LIMIT 1);");
        }
        self.group_rows += 1;
        self.maybe_flush().await
    }

    pub async fn truncate(&mut self, tr: &Truncate) -> Result<()> {
        let mut targets = Vec::new();
        for oid in &tr.oids {
            if let Some((plan, _)) = self.target_for(*oid)? {
                targets.push(plan.target_name().quoted());
            }
        }
        if targets.is_empty() {
            return Ok(());
        }
        self.ensure_group();
        self.close_statement();
        let _ = write!(self.sql, "TRUNCATE {}", targets.join(", "));
        if tr.restart_identity() {
            self.sql.push_str(" RESTART IDENTITY");
        }
        if tr.cascade() {
            self.sql.push_str(" CASCADE");
        }
        self.sql.push(';');
        self.group_rows += 1;
        self.maybe_flush().await
    }

    /// The end of a source transaction. Returns the progress now durable on the target
    /// when this commit ended a target transaction.
    pub async fn commit(&mut self, commit: &Commit) -> Result<Option<Progress>> {
        let Some((_, skip)) = self.txn.take() else {
            return Err(Error::transient(
                "replication stream sent a commit outside a transaction",
            ));
        };
        if skip {
            return Ok(None);
        }
        let progress = Progress {
            commit_lsn: commit.commit_lsn,
            end_lsn: commit.end_lsn,
        };
        if !self.in_group {
            // A transaction with no change for us (filtered or unmapped): nothing to write,
            // yet its position counts as applied once everything before it is.
            self.ensure_group();
        }
        self.group_txns += 1;
        self.last_in_group = Some(progress);
        if self.group_full() {
            self.flush().await
        } else {
            Ok(None)
        }
    }

    /// Commit the open target transaction, if any, with the progress row. Returns the
    /// progress now durable.
    pub async fn flush(&mut self) -> Result<Option<Progress>> {
        if !self.in_group || self.txn.is_some() {
            return Ok(None);
        }
        let Some(last) = self.last_in_group else {
            // BEGIN buffered but no source transaction finished: nothing to commit yet.
            return Ok(None);
        };
        self.close_statement();
        let _ = write!(
            self.sql,
            "INSERT INTO cutover.progress (job, commit_lsn, end_lsn, updated_at) VALUES ({}, '{}', '{}', now()) \
             ON CONFLICT (job) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, end_lsn = EXCLUDED.end_lsn, updated_at = now(); COMMIT;",
            quote_literal(&self.job),
            last.commit_lsn,
            last.end_lsn
        );
        let started = Instant::now();
        self.send().await?;
        metrics::histogram!("cutover_apply_batch_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        self.in_group = false;
        self.committed = last;
        self.last_in_group = None;
        self.stats.transactions += self.group_txns as u64;
        self.stats.rows += self.group_rows;
        metrics::counter!("cutover_applied_transactions_total").increment(self.group_txns as u64);
        metrics::counter!("cutover_applied_rows_total").increment(self.group_rows);
        Ok(Some(last))
    }
}
