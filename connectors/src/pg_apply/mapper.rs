//! Between the stream and the applier: each relation's shape is checked against the
//! job's mapping as pgoutput announces it (DDL on the source while the job runs), and the
//! rows of tables mapped through expressions or filters are evaluated on the source.
//!
//! Shapes. pgoutput sends a Relation message before the first change that uses a new
//! shape. It is compared, by name and type, with the columns the mapping reads:
//! - a new column: by-name mappings add it to the target (in the apply transaction, with
//!   the value the source gives existing rows); explicit mappings ignore it and say so;
//! - a dropped or renamed column, a type change: the mapping goes on when it still holds
//!   (an implicit cast to the target column, a dropped column the target can default),
//!   else the table is paused (see [`super::Applier::pause`]) with what to do.
//!
//! Evaluation. A change of an evaluated table is turned into the change of the target
//! row: its columns computed with the same SQL the snapshot used, by the same server,
//! over the old and new images (`FROM (VALUES ...) AS s(columns)`, many rows a round
//! trip), and the filter deciding whether it is an insert, an update, a delete or nothing
//! on the target.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::plan::{ColumnMap, TablePlan};
use crate::catalog::ColumnInfo;
use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident, quote_literal};
use crate::pg_source::client::StreamEvent;
use crate::pg_source::decode::{
    ColumnValue, Delete, Insert, LogicalMessage, OldTuple, Relation, TupleData, Update,
};

/// How long a column added on the source may stay invisible to the mapper's catalog reads
/// after its transaction arrived from the stream (see `add_column_sql`).
const CATALOG_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// Rows evaluated in one round trip at most, and the SQL size that ends a round trip.
const MAX_EVAL_ROWS: usize = 1000;
const MAX_EVAL_SQL: usize = 1 << 20;

/// What the applier does next.
#[derive(Debug)]
pub enum Step {
    /// Apply this event (a change of an evaluated table is already in target shape).
    Event(StreamEvent),
    /// A relation's shape, and the plan its changes apply with from here.
    Shape(Shape),
    /// The mapping no longer holds: stop applying the table, keep its changes. With a
    /// relation, at its new shape; without, at the change in this step (which is not
    /// applied either).
    Pause {
        oid: u32,
        relation: Option<Relation>,
        table: TableName,
        error: Error,
    },
    /// A change the filter leaves out.
    Nothing,
}

#[derive(Debug)]
pub struct Shape {
    pub relation: Relation,
    pub table: TableName,
    /// `None`: the job does not carry this table.
    pub plan: Option<Arc<TablePlan>>,
    /// Target statements to run before the first change in the new shape.
    pub ddl: Vec<String>,
    /// The source columns known from now on, when that changed (recorded with the DDL).
    pub known_columns: Option<Vec<String>>,
    /// What changed, for the log and the status.
    pub notes: Vec<String>,
}

/// How to evaluate the rows of one relation shape.
struct RelState {
    plan: Arc<TablePlan>,
    /// Relation positions of the source columns the mapping reads, and their types.
    deps: Vec<(usize, String, String)>,
    /// For each plan column, indexes into `deps` (empty for plain columns).
    column_deps: Vec<Vec<usize>>,
    /// For each plan column that is a plain source column, its position in the relation:
    /// its value is carried as the stream sent it, not sent to the source.
    plain: Vec<Option<usize>>,
    filter_deps: Vec<usize>,
    /// The filter reads only key columns, so an old key tuple is enough to evaluate it.
    filter_on_key: bool,
}

pub struct Mapper {
    source: Client,
    target: Client,
    plans: HashMap<TableName, Arc<TablePlan>>,
    known: HashMap<TableName, Vec<String>>,
    /// Evaluation state per relation OID, for evaluated tables in a shape that holds.
    relations: HashMap<u32, Arc<RelState>>,
    type_names: HashMap<(u32, i32), (String, String)>,
}

/// One change waiting for its evaluation.
struct Pending {
    step: usize,
    state: Arc<RelState>,
    change: LogicalMessage,
}

/// A row sent for evaluation: values per dep (`None`: unknown, an unchanged TOAST value),
/// and whether it is a whole row (else only the key columns are meaningful).
struct EvalRow {
    values: Vec<Option<ColumnValue>>,
    /// Per plan column, the value of a plain column (`None`: not plain, or not sent).
    plain: Vec<Option<ColumnValue>>,
    full: bool,
}

/// What came back for a row: a value per plan column (`UnchangedToast` when a column it
/// reads was not sent), and the filter's verdict (`None`: could not be told).
struct Evaluated {
    columns: Vec<ColumnValue>,
    passes: Option<bool>,
}

impl Mapper {
    /// `known` lists, per source table, the source columns the job has seen; a column
    /// outside it is new.
    pub fn new(
        source: Client,
        target: Client,
        plans: &[Arc<TablePlan>],
        known: HashMap<TableName, Vec<String>>,
    ) -> Self {
        let known = plans
            .iter()
            .map(|p| {
                let cols = known
                    .get(p.source_name())
                    .cloned()
                    .unwrap_or_else(|| p.source.columns.iter().map(|c| c.name.clone()).collect());
                (p.source_name().clone(), cols)
            })
            .collect();
        Self {
            source,
            target,
            plans: plans
                .iter()
                .map(|p| (p.source_name().clone(), p.clone()))
                .collect(),
            known,
            relations: HashMap::new(),
            type_names: HashMap::new(),
        }
    }

    /// Turn a batch of stream events into steps, in the same order.
    pub async fn process(&mut self, events: Vec<StreamEvent>) -> Result<Vec<Step>> {
        let mut steps = Vec::with_capacity(events.len());
        let mut pending = Vec::new();
        for ev in events {
            match ev {
                StreamEvent::Message(LogicalMessage::Relation(rel)) => {
                    let step = self.shape(rel).await?;
                    steps.push(step);
                }
                StreamEvent::Message(
                    change @ (LogicalMessage::Insert(_)
                    | LogicalMessage::Update(_)
                    | LogicalMessage::Delete(_)),
                ) => {
                    let oid = match &change {
                        LogicalMessage::Insert(i) => i.oid,
                        LogicalMessage::Update(u) => u.oid,
                        LogicalMessage::Delete(d) => d.oid,
                        _ => 0,
                    };
                    match self.relations.get(&oid) {
                        Some(state) => {
                            pending.push(Pending {
                                step: steps.len(),
                                state: state.clone(),
                                change,
                            });
                            steps.push(Step::Nothing);
                        }
                        None => steps.push(Step::Event(StreamEvent::Message(change))),
                    }
                }
                other => steps.push(Step::Event(other)),
            }
        }
        if !pending.is_empty() {
            self.evaluate(&mut steps, pending).await?;
        }
        Ok(steps)
    }

    /// `format_type` of a relation column's type, with and without its modifier.
    async fn type_name(&mut self, oid: u32, typmod: i32) -> Result<(String, String)> {
        if let Some(t) = self.type_names.get(&(oid, typmod)) {
            return Ok(t.clone());
        }
        let row = self
            .source
            .query_one(
                "SELECT pg_catalog.format_type($1, NULLIF($2, -1)), pg_catalog.format_type($1, NULL)",
                &[&oid, &typmod],
            )
            .await
            .map_err(|e| Error::from_pg("read the catalog", "the source", &e))?;
        let t: (String, String) = (row.get(0), row.get(1));
        self.type_names.insert((oid, typmod), t.clone());
        Ok(t)
    }

    async fn shape(&mut self, rel: Relation) -> Result<Step> {
        let schema = if rel.namespace.is_empty() {
            "pg_catalog".to_string()
        } else {
            rel.namespace.clone()
        };
        let table = TableName::new(schema, rel.name.clone());
        self.relations.remove(&rel.oid);
        let Some(base) = self.plans.get(&table).cloned() else {
            return Ok(Step::Shape(Shape {
                relation: rel,
                table,
                plan: None,
                ddl: Vec::new(),
                known_columns: None,
                notes: Vec::new(),
            }));
        };
        let mut types = Vec::new();
        for c in &rel.columns {
            types.push(self.type_name(c.type_oid, c.type_modifier).await?);
        }
        let outcome = if base.explicit {
            self.shape_explicit(&base, &rel, &types).await?
        } else {
            self.shape_by_name(&base, &rel, &types).await?
        };
        match outcome {
            Err(error) => Ok(Step::Pause {
                oid: rel.oid,
                relation: Some(rel),
                table,
                error,
            }),
            Ok((plan, ddl, known_columns, notes)) => {
                let plan = Arc::new(plan);
                if plan.evaluated() {
                    match eval_state(&plan, &rel, &types) {
                        Ok(state) => {
                            self.relations.insert(rel.oid, Arc::new(state));
                        }
                        Err(error) => {
                            return Ok(Step::Pause {
                                oid: rel.oid,
                                relation: Some(rel),
                                table,
                                error,
                            });
                        }
                    }
                }
                if let Some(k) = &known_columns {
                    self.known.insert(table.clone(), k.clone());
                }
                Ok(Step::Shape(Shape {
                    relation: rel,
                    table,
                    plan: Some(plan),
                    ddl,
                    known_columns,
                    notes,
                }))
            }
        }
    }

    /// Whether values of source type `from` (base name) still fit target column `to`.
    async fn fits(&self, from: &str, to: &ColumnInfo) -> Result<bool> {
        if from == to.base_type {
            return Ok(true);
        }
        let row = self
            .target
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_cast \
                                WHERE castsource = pg_catalog.to_regtype($1) AND casttarget = $2 \
                                  AND castcontext = 'i')",
                &[&from, &to.type_oid],
            )
            .await
            .map_err(|e| Error::from_pg("read the catalog", "the target", &e))?;
        Ok(row.get(0))
    }

    /// A by-name mapping against a new shape.
    #[allow(clippy::type_complexity)]
    async fn shape_by_name(
        &mut self,
        base: &TablePlan,
        rel: &Relation,
        types: &[(String, String)],
    ) -> Result<
        std::result::Result<(TablePlan, Vec<String>, Option<Vec<String>>, Vec<String>), Error>,
    > {
        let src = base.source_name();
        let dst = base.target_name().clone();
        let known = self.known.get(src).cloned().unwrap_or_default();
        let position = |name: &str| rel.columns.iter().position(|c| c.name == name);
        let mut plan = base.clone();
        let mut notes = Vec::new();
        let mut columns = Vec::new();
        for c in &base.columns {
            let Some(i) = position(&c.source) else {
                // Renamed (a column the job has not seen, where this one stood, of the
                // same type) or dropped.
                let old_pos = base.source.columns.iter().position(|s| s.name == c.source);
                let old_type = base.source.column(&c.source).map(|s| s.type_name.clone());
                let renamed = old_pos.and_then(|p| {
                    let live: Vec<&ColumnInfo> = base
                        .source
                        .columns
                        .iter()
                        .filter(|s| !s.generated)
                        .filter(|s| position(&s.name).is_some() || s.name == c.source)
                        .collect();
                    let at = live.iter().position(|s| s.name == c.source).unwrap_or(p);
                    rel.columns
                        .get(at)
                        .filter(|rc| !known.contains(&rc.name))
                        .filter(|_| types.get(at).map(|t| &t.0) == old_type.as_ref())
                        .map(|rc| rc.name.clone())
                });
                if let Some(new_name) = renamed {
                    return Ok(Err(Error::operator(format!(
                        "column {} of {src} was renamed to {} on the source",
                        quote_ident(&c.source),
                        quote_ident(&new_name)
                    ))
                    .detail(format!("the apply of {src} is paused; its changes are kept on the source"))
                    .hint(format!(
                        "rename it on the target too (ALTER TABLE {} RENAME COLUMN {} TO {}), or map it in the job file ([table.columns] {} = \"{}\"), then restart the job",
                        dst.quoted(),
                        quote_ident(&c.target),
                        quote_ident(&new_name),
                        c.target,
                        new_name
                    ))));
                }
                let target_col = base.target.column(&c.target);
                let defaults = target_col.is_some_and(|t| !t.not_null || t.has_default);
                if c.key || !defaults {
                    return Ok(Err(Error::operator(format!(
                        "column {} was dropped from {src} on the source, but {dst}.{} {}",
                        quote_ident(&c.source),
                        quote_ident(&c.target),
                        if c.key { "is part of the target key" } else { "is NOT NULL without a default" }
                    ))
                    .detail(format!("the apply of {src} is paused; its changes are kept on the source"))
                    .hint(format!(
                        "give {dst}.{} a default (or drop its NOT NULL, or drop the column on the target), then restart the job",
                        quote_ident(&c.target)
                    ))));
                }
                notes.push(format!(
                    "column {} was dropped from {src}; {dst} keeps it, and new rows get its default",
                    quote_ident(&c.source)
                ));
                continue;
            };
            let was = base.source.column(&c.source).map(|s| s.type_name.as_str());
            if was != Some(types[i].0.as_str()) {
                let target_col = base.target.column(&c.target);
                let fits = match target_col {
                    Some(t) => self.fits(&types[i].1, t).await?,
                    None => false,
                };
                if !fits {
                    return Ok(Err(Error::operator(format!(
                        "column {} of {src} changed type on the source from {} to {}; {dst}.{} is {}",
                        quote_ident(&c.source),
                        was.unwrap_or("?"),
                        types[i].0,
                        quote_ident(&c.target),
                        c.type_name
                    ))
                    .detail(format!("the apply of {src} is paused; its changes are kept on the source"))
                    .hint(format!(
                        "change the target column too (ALTER TABLE {} ALTER COLUMN {} TYPE {}), then restart the job",
                        dst.quoted(),
                        quote_ident(&c.target),
                        types[i].0
                    ))));
                }
                notes.push(format!(
                    "column {} of {src} changed type from {} to {}; {dst}.{} ({}) still takes its values",
                    quote_ident(&c.source),
                    was.unwrap_or("?"),
                    types[i].0,
                    quote_ident(&c.target),
                    c.type_name
                ));
            }
            columns.push(c.clone());
        }
        // New columns: on the target already (mapped by name), or added to it.
        let mut ddl = Vec::new();
        let mut new_known = known.clone();
        for (i, rc) in rel.columns.iter().enumerate() {
            if known.contains(&rc.name) || columns.iter().any(|c| c.source == rc.name) {
                continue;
            }
            new_known.push(rc.name.clone());
            if let Some(t) = base.target.column(&rc.name) {
                if !self.fits(&types[i].1, t).await? {
                    return Ok(Err(Error::operator(format!(
                        "new column {} of {src} is {} but {dst}.{} is {}",
                        quote_ident(&rc.name),
                        types[i].0,
                        quote_ident(&t.name),
                        t.type_name
                    ))
                    .hint(format!(
                        "give {dst}.{} the source's type, then restart the job",
                        quote_ident(&t.name)
                    ))));
                }
                columns.push(new_column(&rc.name, &t.type_name));
                notes.push(format!(
                    "new column {} of {src} maps onto {dst}.{}",
                    quote_ident(&rc.name),
                    quote_ident(&t.name)
                ));
                continue;
            }
            match self
                .add_column_sql(src, &dst, &rc.name, &types[i].0)
                .await?
            {
                Ok(statements) => {
                    ddl.extend(statements);
                    columns.push(new_column(&rc.name, &types[i].0));
                    plan.target.columns.push(ColumnInfo {
                        name: rc.name.clone(),
                        attnum: 0,
                        type_oid: rc.type_oid,
                        type_name: types[i].0.clone(),
                        base_type: types[i].1.clone(),
                        not_null: false,
                        has_default: true,
                        generated: false,
                        key: false,
                        has_equality: false,
                        builtin: rc.type_oid < 16384,
                        // Not looked up for a column added on the way: rows with it are
                        // sent as VALUES.
                        array_element: false,
                    });
                    notes.push(format!(
                        "new column {} of {src} ({}) was added to {dst}",
                        quote_ident(&rc.name),
                        types[i].0
                    ));
                }
                Err(e) => return Ok(Err(e)),
            }
        }
        plan.columns = columns;
        let known_columns = (new_known != known).then_some(new_known);
        Ok(Ok((plan, ddl, known_columns, notes)))
    }

    /// `ALTER TABLE ... ADD COLUMN` for a column added on the source, giving existing rows
    /// the value the source gives them.
    async fn add_column_sql(
        &self,
        src: &TableName,
        dst: &TableName,
        column: &str,
        type_name: &str,
    ) -> Result<std::result::Result<Vec<String>, Error>> {
        let err = |e: tokio_postgres::Error| Error::from_pg("read the catalog", "the source", &e);
        // The transaction that added the column has committed, but the walsender may decode
        // its commit a moment before other sessions see it: look again for a while before
        // calling the column gone.
        let deadline = std::time::Instant::now() + CATALOG_CATCH_UP;
        let row = loop {
            let row = self
                .source
                .query_opt(
                    "SELECT a.atthasmissing, pg_catalog.pg_get_expr(d.adbin, d.adrelid), \
                            CASE WHEN a.atthasmissing THEN (a.attmissingval::text) END \
                     FROM pg_catalog.pg_attribute a \
                     LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum \
                     WHERE a.attrelid = $1::text::pg_catalog.regclass AND a.attname = $2 AND NOT a.attisdropped",
                    &[&src.quoted(), &column],
                )
                .await
                .map_err(err)?;
            if row.is_some() || std::time::Instant::now() >= deadline {
                break row;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let paused = format!("the apply of {src} is paused; its changes are kept on the source");
        let Some(row) = row else {
            return Ok(Err(Error::operator(format!(
                "column {} of {src} appeared in the stream but is no longer in the source's catalog",
                quote_ident(column)
            ))
            .detail(paused)
            .hint(format!(
                "add it to {dst} by hand (or leave it out with [table.columns]), then restart the job"
            ))));
        };
        let has_missing: bool = row.get(0);
        let default: Option<String> = row.get(1);
        let missing: Option<String> = row.get(2);
        let exists: bool = self
            .target
            .query_one(
                "SELECT pg_catalog.to_regtype($1) IS NOT NULL",
                &[&type_name],
            )
            .await
            .map_err(|e| Error::from_pg("read the catalog", "the target", &e))?
            .get(0);
        if !exists {
            return Ok(Err(Error::operator(format!(
                "new column {} of {src} is of type {type_name}, which the target does not have",
                quote_ident(column)
            ))
            .detail(paused)
            .hint(format!(
                "create the type on the target and add the column to {dst}, then restart the job"
            ))));
        }
        if default.is_some() && !has_missing {
            // A volatile default: the source rewrote the table, giving each existing row
            // a value that no change in the stream carries.
            return Ok(Err(Error::operator(format!(
                "column {} was added to {src} with a volatile default ({}): the values it gave existing rows are not in the stream",
                quote_ident(column),
                default.unwrap_or_default()
            ))
            .detail(paused)
            .hint(format!(
                "add the column to {dst} and fill it with the source's values, then restart the job"
            ))));
        }
        let col = quote_ident(column);
        let table = dst.quoted();
        let mut out = Vec::new();
        match missing {
            Some(array) => out.push(format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} {type_name} DEFAULT ({}::{type_name}[])[1]",
                quote_literal(&array)
            )),
            None => out.push(format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {col} {type_name}"
            )),
        }
        // Keep the source's default for rows the application inserts after the switch,
        // when it means the same on the target (no sequence or function it lacks).
        let keep = match &default {
            Some(expr) => self
                .target
                .prepare(&format!("SELECT ({expr})::{type_name}"))
                .await
                .is_ok(),
            None => false,
        };
        match (&default, keep) {
            (Some(expr), true) => out.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {col} SET DEFAULT {expr}"
            )),
            _ => out.push(format!(
                "ALTER TABLE {table} ALTER COLUMN {col} DROP DEFAULT"
            )),
        }
        Ok(Ok(out))
    }

    /// An explicit mapping against a new shape: it holds while every column it reads is
    /// there and its expressions still give what the target columns take.
    #[allow(clippy::type_complexity)]
    async fn shape_explicit(
        &mut self,
        base: &TablePlan,
        rel: &Relation,
        types: &[(String, String)],
    ) -> Result<
        std::result::Result<(TablePlan, Vec<String>, Option<Vec<String>>, Vec<String>), Error>,
    > {
        let src = base.source_name();
        let dst = base.target_name();
        let known = self.known.get(src).cloned().unwrap_or_default();
        let mut notes = Vec::new();
        let mut changed_type = false;
        for dep in base.source_deps() {
            let Some(i) = rel.columns.iter().position(|c| c.name == dep.name) else {
                let readers: Vec<String> = base
                    .columns
                    .iter()
                    .filter(|c| c.deps.contains(&dep.name))
                    .map(|c| c.target.clone())
                    .chain(
                        base.filter
                            .as_ref()
                            .filter(|f| f.deps.contains(&dep.name))
                            .map(|_| "where".to_string()),
                    )
                    .collect();
                return Ok(Err(Error::operator(format!(
                    "column {} of {src}, which the mapping reads ({}), is gone from the source (dropped or renamed)",
                    quote_ident(&dep.name),
                    readers.join(", ")
                ))
                .detail(format!("the apply of {src} is paused; its changes are kept on the source"))
                .hint(format!(
                    "update [table.columns] and where of {src} in the job file for the new shape, then restart the job"
                ))));
            };
            if types[i].0 != dep.type_name {
                changed_type = true;
                notes.push(format!(
                    "column {} of {src} changed type from {} to {}",
                    quote_ident(&dep.name),
                    dep.type_name,
                    types[i].0
                ));
            }
        }
        if changed_type {
            // Prepare the evaluation over the new types: the expressions must still
            // parse and give what the target columns take.
            let deps = base.source_deps();
            let nulls = deps
                .iter()
                .map(|d| {
                    let i = rel
                        .columns
                        .iter()
                        .position(|c| c.name == d.name)
                        .unwrap_or(0);
                    format!("NULL::{}", types[i].0)
                })
                .collect::<Vec<_>>()
                .join(", ");
            let names = deps
                .iter()
                .map(|d| quote_ident(&d.name))
                .collect::<Vec<_>>()
                .join(", ");
            let filter = base
                .filter_sql()
                .map(|f| format!(", ({f})::pg_catalog.bool"))
                .unwrap_or_default();
            let sql = format!(
                "SELECT {}{filter} FROM (VALUES ({nulls})) AS s({names})",
                base.select_list()
            );
            let holds = match self.source.prepare(&sql).await {
                Ok(stmt) => {
                    let mut ok = true;
                    for (c, col) in base.columns.iter().zip(stmt.columns()) {
                        let oid = col.type_().oid();
                        let name: String = self
                            .source
                            .query_one("SELECT pg_catalog.format_type($1, NULL)", &[&oid])
                            .await
                            .map_err(|e| Error::from_pg("read the catalog", "the source", &e))?
                            .get(0);
                        if let Some(t) = base.target.column(&c.target)
                            && !self.fits(&name, t).await?
                        {
                            ok = false;
                        }
                    }
                    ok.then_some(()).ok_or_else(|| {
                        "an expression no longer gives the target column's type".to_string()
                    })
                }
                Err(e) => Err(crate::error::pg_cause(&e)),
            };
            if let Err(why) = holds {
                return Ok(Err(Error::operator(format!(
                    "the mapping of {src} no longer holds after a type change on the source: {why}"
                ))
                .detail(format!(
                    "{}; the apply of {src} is paused, its changes are kept on the source",
                    notes.join("; ")
                ))
                .hint(format!(
                    "update [table.columns] of {src} in the job file (or the columns of {dst}), then restart the job"
                ))));
            }
            notes.push(format!("the mapping of {src} still holds"));
        }
        let mut new_known = known.clone();
        for rc in &rel.columns {
            if !known.contains(&rc.name) {
                new_known.push(rc.name.clone());
                notes.push(format!(
                    "new column {} of {src} is not carried: the mapping of {src} lists its columns",
                    quote_ident(&rc.name)
                ));
            }
        }
        let known_columns = (new_known != known).then_some(new_known);
        Ok(Ok((base.clone(), Vec::new(), known_columns, notes)))
    }

    /// Evaluate the pending changes, relation shape by relation shape, and put the target
    /// changes in their steps.
    async fn evaluate(&mut self, steps: &mut [Step], pending: Vec<Pending>) -> Result<()> {
        let mut groups: Vec<(Arc<RelState>, Vec<Pending>)> = Vec::new();
        for p in pending {
            match groups.iter_mut().find(|(s, _)| Arc::ptr_eq(s, &p.state)) {
                Some((_, list)) => list.push(p),
                None => groups.push((p.state.clone(), vec![p])),
            }
        }
        for (state, list) in groups {
            // Rows to evaluate: each change's new and old images.
            let mut rows: Vec<EvalRow> = Vec::new();
            let mut refs: Vec<(Option<usize>, Option<usize>)> = Vec::new();
            for p in &list {
                let (new, old) = images(&p.change);
                let old_row = old.map(|o| {
                    let full = matches!(o, OldTuple::Full(_));
                    let (values, plain) = pick(&state, o.tuple(), None);
                    rows.push(EvalRow {
                        values,
                        plain,
                        full,
                    });
                    rows.len() - 1
                });
                let new_row = new.map(|n| {
                    let fill = old.filter(|o| matches!(o, OldTuple::Full(_)));
                    let (values, plain) = pick(&state, n, fill.map(OldTuple::tuple));
                    rows.push(EvalRow {
                        values,
                        plain,
                        full: true,
                    });
                    rows.len() - 1
                });
                refs.push((new_row, old_row));
            }
            let results = self.run(&state, &rows).await?;
            for (p, (new_row, old_row)) in list.into_iter().zip(refs) {
                let step = decide(
                    &state,
                    p.change,
                    new_row.map(|r| &results[r]),
                    old_row.map(|r| &results[r]),
                );
                if let Step::Pause { oid, .. } = &step {
                    // Later changes of the table go to the applier as they are; it holds
                    // them back with the table.
                    self.relations.remove(oid);
                }
                steps[p.step] = step;
            }
        }
        Ok(())
    }

    /// Evaluate rows on the source, in round trips of bounded size.
    async fn run(&self, state: &RelState, rows: &[EvalRow]) -> Result<Vec<Evaluated>> {
        let mut out: Vec<Evaluated> = Vec::with_capacity(rows.len());
        let plan = &state.plan;
        let mut head = String::from("SELECT \"cutover.n\"");
        // Key columns are evaluated for every image; the rest only for whole rows (an old
        // key-only image has nothing else to compute from).
        // Result position of each computed column (plain ones are not sent).
        let mut out_pos = vec![0; plan.columns.len()];
        let mut next = 1;
        for (j, c) in plan.columns.iter().enumerate() {
            if state.plain[j].is_some() {
                continue;
            }
            out_pos[j] = next;
            next += 1;
            if c.key {
                let _ = write!(head, ", {}", c.expr);
            } else {
                let _ = write!(head, ", CASE WHEN \"cutover.full\" THEN {} END", c.expr);
            }
        }
        let filter_pos = next;
        if let Some(f) = plan.filter_sql() {
            if state.filter_on_key {
                let _ = write!(head, ", ({f}) IS TRUE");
            } else {
                let _ = write!(head, ", CASE WHEN \"cutover.full\" THEN ({f}) IS TRUE END");
            }
        }
        head.push_str(" FROM (VALUES ");
        let tail = format!(
            ") AS s(\"cutover.n\", \"cutover.full\"{})",
            state
                .deps
                .iter()
                .map(|(_, name, _)| format!(", {}", quote_ident(name)))
                .collect::<String>()
        );
        let mut start = 0;
        while start < rows.len() {
            let mut sql = head.clone();
            let mut end = start;
            while end < rows.len() && end - start < MAX_EVAL_ROWS && sql.len() < MAX_EVAL_SQL {
                let row = &rows[end];
                if end > start {
                    sql.push(',');
                }
                let _ = write!(sql, "({}, {}", end - start, row.full);
                for (d, (_, _, type_name)) in state.deps.iter().enumerate() {
                    sql.push_str(", ");
                    match &row.values[d] {
                        Some(ColumnValue::Text(b)) => {
                            let text = std::str::from_utf8(b).map_err(|_| {
                                Error::operator(format!(
                                    "invalid UTF-8 in a row of {}",
                                    plan.source_name()
                                ))
                            })?;
                            sql.push_str(&quote_literal(text));
                        }
                        _ => sql.push_str("NULL"),
                    }
                    let _ = write!(sql, "::{type_name}");
                }
                sql.push(')');
                end += 1;
            }
            sql.push_str(&tail);
            let messages = self.source.simple_query(&sql).await.map_err(|e| {
                let mut err = Error::from_pg(
                    &format!("evaluate the mapping of {}", plan.source_name()),
                    "the source",
                    &e,
                );
                if !err.is_transient() {
                    err.hint = Some(format!(
                        "an expression or the filter of {} fails on a changed row; fix the mapping in the job file (or the row on the source), then restart the job",
                        plan.source_name()
                    ));
                }
                err
            })?;
            let mut batch: Vec<Option<Evaluated>> = (start..end).map(|_| None).collect();
            for m in messages {
                let SimpleQueryMessage::Row(r) = m else {
                    continue;
                };
                let n: usize = r.get(0).and_then(|v| v.parse().ok()).unwrap_or(usize::MAX);
                let Some(slot) = batch.get_mut(n) else {
                    continue;
                };
                let row = &rows[start + n];
                let mut columns = Vec::with_capacity(plan.columns.len());
                for (j, deps) in state.column_deps.iter().enumerate() {
                    if state.plain[j].is_some() {
                        columns.push(row.plain[j].clone().unwrap_or(ColumnValue::UnchangedToast));
                        continue;
                    }
                    let unknown = deps.iter().any(|&d| row.values[d].is_none());
                    columns.push(if unknown {
                        ColumnValue::UnchangedToast
                    } else {
                        match r.get(out_pos[j]) {
                            Some(v) => ColumnValue::Text(Bytes::copy_from_slice(v.as_bytes())),
                            None => ColumnValue::Null,
                        }
                    });
                }
                let passes = if plan.filter.is_none() {
                    Some(true)
                } else if state.filter_deps.iter().any(|&d| row.values[d].is_none()) {
                    None
                } else {
                    r.get(filter_pos).map(|v| v == "t")
                };
                *slot = Some(Evaluated { columns, passes });
            }
            for e in batch {
                out.push(e.ok_or_else(|| {
                    Error::transient(format!(
                        "the source returned fewer rows than it was given while evaluating the mapping of {}",
                        plan.source_name()
                    ))
                })?);
            }
            start = end;
        }
        Ok(out)
    }
}

/// A column the stream added, mapped by name.
fn new_column(name: &str, type_name: &str) -> ColumnMap {
    ColumnMap {
        target: name.to_string(),
        source: name.to_string(),
        expr: quote_ident(name),
        plain: true,
        deps: vec![name.to_string()],
        key: false,
        match_as_text: true,
        type_name: type_name.to_string(),
        array_element: false,
    }
}

/// The evaluation state of an evaluated plan over a relation shape.
fn eval_state(
    plan: &Arc<TablePlan>,
    rel: &Relation,
    types: &[(String, String)],
) -> Result<RelState, Error> {
    let mut deps: Vec<(usize, String, String)> = Vec::new();
    let mut index_of = |name: &str| -> Result<usize, Error> {
        if let Some(d) = deps.iter().position(|(_, n, _)| n == name) {
            return Ok(d);
        }
        let i = rel
            .columns
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| {
                Error::operator(format!(
                    "column {} of {}, which the mapping reads, is not in the stream",
                    quote_ident(name),
                    plan.source_name()
                ))
                .hint("update the mapping in the job file, then restart the job")
            })?;
        deps.push((i, name.to_string(), types[i].0.clone()));
        Ok(deps.len() - 1)
    };
    let mut column_deps = Vec::new();
    let mut plain = Vec::new();
    for c in &plan.columns {
        if c.plain {
            let i = rel.columns.iter().position(|rc| rc.name == c.source);
            if i.is_some() {
                column_deps.push(Vec::new());
                plain.push(i);
                continue;
            }
        }
        plain.push(None);
        column_deps.push(
            c.deps
                .iter()
                .map(|d| index_of(d))
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    let filter_deps = match &plan.filter {
        Some(f) => f
            .deps
            .iter()
            .map(|d| index_of(d))
            .collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let filter_on_key = plan.filter.as_ref().is_some_and(|f| {
        f.deps
            .iter()
            .all(|d| rel.columns.iter().any(|c| &c.name == d && c.is_key()))
    });
    Ok(RelState {
        plan: plan.clone(),
        deps,
        column_deps,
        plain,
        filter_deps,
        filter_on_key,
    })
}

/// The new image and the old one of a change.
fn images(change: &LogicalMessage) -> (Option<&TupleData>, Option<&OldTuple>) {
    match change {
        LogicalMessage::Insert(i) => (Some(&i.new), None),
        LogicalMessage::Update(u) => (Some(&u.new), u.old.as_ref()),
        LogicalMessage::Delete(d) => (None, Some(&d.old)),
        _ => (None, None),
    }
}

/// The values of the mapping's source columns in `tuple`, and of its plain columns; an
/// unchanged TOAST value is taken from `fill` (a whole old row) when there is one, else
/// unknown.
#[allow(clippy::type_complexity)]
fn pick(
    state: &RelState,
    tuple: &TupleData,
    fill: Option<&TupleData>,
) -> (Vec<Option<ColumnValue>>, Vec<Option<ColumnValue>>) {
    let value = |i: usize| match tuple.columns.get(i) {
        Some(ColumnValue::UnchangedToast) => fill
            .and_then(|f| f.columns.get(i))
            .filter(|v| !matches!(v, ColumnValue::UnchangedToast))
            .cloned(),
        Some(v) => Some(v.clone()),
        None => None,
    };
    (
        state.deps.iter().map(|(i, _, _)| value(*i)).collect(),
        state.plain.iter().map(|i| i.and_then(value)).collect(),
    )
}

/// The target change for a source change, from its evaluated images.
fn decide(
    state: &RelState,
    change: LogicalMessage,
    new: Option<&Evaluated>,
    old: Option<&Evaluated>,
) -> Step {
    let plan = &state.plan;
    let tuple = |e: &Evaluated| TupleData {
        columns: e.columns.clone(),
    };
    let oid = match &change {
        LogicalMessage::Insert(i) => i.oid,
        LogicalMessage::Update(u) => u.oid,
        LogicalMessage::Delete(d) => d.oid,
        _ => 0,
    };
    let unknown_filter = |what: &str| {
        Step::Pause {
        oid,
        relation: None,
        table: plan.source_name().clone(),
        error: Error::operator(format!(
            "{what} of {} cannot be carried: the source did not send the values of columns it did not change (stored out of line)",
            plan.source_name()
        ))
        .detail(format!(
            "the apply of {} is paused; its changes are kept on the source",
            plan.source_name()
        ))
        .hint(format!(
            "run ALTER TABLE {} REPLICA IDENTITY FULL on the source, then restart the job",
            plan.source_name().quoted()
        )),
    }
    };
    match change {
        LogicalMessage::Insert(i) => match new.and_then(|n| n.passes) {
            Some(true) => Step::Event(StreamEvent::Message(LogicalMessage::Insert(Insert {
                xid: i.xid,
                oid: i.oid,
                new: tuple(new.expect("evaluated")),
            }))),
            Some(false) => Step::Nothing,
            None => unknown_filter("an insert"),
        },
        LogicalMessage::Delete(d) => {
            let Some(o) = old else { return Step::Nothing };
            let full = matches!(d.old, OldTuple::Full(_));
            if full && o.passes == Some(false) {
                return Step::Nothing;
            }
            let mapped = tuple(o);
            Step::Event(StreamEvent::Message(LogicalMessage::Delete(Delete {
                xid: d.xid,
                oid: d.oid,
                old: if full {
                    OldTuple::Full(mapped)
                } else {
                    OldTuple::Key(mapped)
                },
            })))
        }
        LogicalMessage::Update(u) => {
            let Some(n) = new else { return Step::Nothing };
            let Some(new_in) = n.passes else {
                return unknown_filter("an update");
            };
            let old_in = match (&u.old, old) {
                (Some(_), Some(o)) => match o.passes {
                    Some(v) => v,
                    None => return unknown_filter("an update"),
                },
                _ => new_in,
            };
            let mapped_old = match (&u.old, old) {
                (Some(OldTuple::Full(_)), Some(o)) => Some(OldTuple::Full(tuple(o))),
                (Some(OldTuple::Key(_)), Some(o)) => Some(OldTuple::Key(tuple(o))),
                _ => None,
            };
            match (old_in, new_in) {
                (true, true) => Step::Event(StreamEvent::Message(LogicalMessage::Update(Update {
                    xid: u.xid,
                    oid: u.oid,
                    old: mapped_old,
                    new: tuple(n),
                }))),
                (false, true) => {
                    if n.columns
                        .iter()
                        .any(|v| matches!(v, ColumnValue::UnchangedToast))
                    {
                        return unknown_filter("an update that moves a row into the filter");
                    }
                    Step::Event(StreamEvent::Message(LogicalMessage::Insert(Insert {
                        xid: u.xid,
                        oid: u.oid,
                        new: tuple(n),
                    })))
                }
                (true, false) => {
                    Step::Event(StreamEvent::Message(LogicalMessage::Delete(Delete {
                        xid: u.xid,
                        oid: u.oid,
                        old: mapped_old.unwrap_or_else(|| OldTuple::Key(tuple(n))),
                    })))
                }
                (false, false) => Step::Nothing,
            }
        }
        _ => Step::Nothing,
    }
}
