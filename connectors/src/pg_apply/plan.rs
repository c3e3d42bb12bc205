//! How one source table maps onto one target table: what each target column is made of,
//! which rows are carried, and how the target key derives from the source's.
//!
//! A mapping is written once, as SQL over the source row, and evaluated in one place: the
//! source server, under the job's pinned session settings. The snapshot reads
//! `SELECT <expressions> FROM ONLY source WHERE <filter>`; the stream evaluates the same
//! expressions over each changed row (`FROM (VALUES ...) AS source(columns)`, see
//! [`super::eval`]); the verifier reads the same select list. Expressions must be
//! immutable, so a row yields the same target row whenever it is evaluated.

use std::collections::BTreeMap;

use tokio_postgres::Client;

use crate::catalog::{ColumnInfo, TableInfo};
use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident};

/// One target column and where its value comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnMap {
    /// The target column.
    pub target: String,
    /// What the value is made of, for messages: the source column, or the expression.
    pub source: String,
    /// SQL over the source row: a quoted source column, or `(expression)`.
    pub expr: String,
    /// A plain source column (by name, or renamed): the stream carries its value as it is.
    pub plain: bool,
    /// The source columns the value depends on.
    pub deps: Vec<String>,
    /// Part of the target key.
    pub key: bool,
    /// Compared by text form in row matches (the type has no equality operator).
    pub match_as_text: bool,
    /// The target column's type, as `format_type` prints it (for prepared statements).
    pub type_name: String,
    /// The target column's values may be sent as array elements (see
    /// [`crate::catalog::ColumnInfo::array_element`]).
    pub array_element: bool,
}

/// A row filter: SQL over the source row, and the source columns it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub sql: String,
    pub deps: Vec<String>,
}

/// A source table, its target, and the columns between them.
#[derive(Debug, Clone)]
pub struct TablePlan {
    pub source: TableInfo,
    pub target: TableInfo,
    pub columns: Vec<ColumnMap>,
    /// Binary COPY is safe: every mapped column is a plain column with the same built-in
    /// type on both sides.
    pub binary_copy: bool,
    /// Only source rows for which this holds are carried.
    pub filter: Option<Filter>,
    /// `[table.columns]` was given: the mapping is the user's, not "by name", so columns
    /// added to the source later are not added to the target.
    pub explicit: bool,
}

/// What the job file says about one table's mapping.
#[derive(Debug, Clone, Default)]
pub struct MappingSpec {
    /// Target column = SQL expression (or source column) over the source row.
    pub columns: BTreeMap<String, String>,
    pub filter: Option<String>,
    /// `file:line` of each column entry and of the filter, for messages.
    pub column_places: BTreeMap<String, String>,
    pub filter_place: Option<String>,
}

impl TablePlan {
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

    /// Whether rows from the stream must be evaluated on the source before they are
    /// applied (an expression or a filter), rather than carried column by column.
    pub fn evaluated(&self) -> bool {
        self.filter.is_some() || self.columns.iter().any(|c| !c.plain)
    }

    /// The select list over the source row, in mapping order: `"a", ("b" * 100)::bigint`.
    pub fn select_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.expr.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `WHERE`-ready condition of the filter, if any.
    pub fn filter_sql(&self) -> Option<&str> {
        self.filter.as_ref().map(|f| f.sql.as_str())
    }

    /// `"a", "b"` of the target columns, in mapping order.
    pub fn target_column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.target))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every source column the mapping reads (columns, filter), in source order.
    pub fn source_deps(&self) -> Vec<&ColumnInfo> {
        self.source
            .columns
            .iter()
            .filter(|s| {
                self.columns.iter().any(|c| c.deps.contains(&s.name))
                    || self
                        .filter
                        .as_ref()
                        .is_some_and(|f| f.deps.contains(&s.name))
            })
            .collect()
    }
}

/// Whether `text` names `column` on its own (`total` or `"total"`): a rename, not an
/// expression.
fn plain_reference<'a>(text: &str, source: &'a TableInfo) -> Option<&'a ColumnInfo> {
    let t = text.trim();
    let bare = t
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
    source.stored_columns().find(|c| {
        t == quote_ident(&c.name) || (bare && t.to_ascii_lowercase() == c.name && !is_keyword(t))
    })
}

/// Words that are SQL, not column names, when written bare (`true`, `null`, ...).
fn is_keyword(word: &str) -> bool {
    matches!(
        word.to_ascii_lowercase().as_str(),
        "true" | "false" | "null" | "default" | "current_date" | "current_timestamp" | "user"
    )
}

/// An expression or filter analysed on the source: its type and the columns it reads.
#[derive(Debug, Clone)]
struct Analysed {
    /// `format_type(type, NULL)` on the source.
    type_name: String,
    type_oid: u32,
    deps: Vec<String>,
}

/// Build the plan of one table from both catalogs and the job file's mapping. Every
/// problem is reported (not only the first), each naming the table, the column and a fix.
pub async fn plan_table(
    source_client: &Client,
    target_client: &Client,
    source: TableInfo,
    target: TableInfo,
    spec: &MappingSpec,
) -> Result<TablePlan, Vec<Error>> {
    let mut errors = Vec::new();
    let src = source.name.clone();
    let dst = target.name.clone();
    let at = |place: Option<&String>| place.map(|p| format!("{p}: ")).unwrap_or_default();

    // Which target columns the file maps, and which it names that do not exist.
    for (column, _) in spec.columns.iter() {
        match target.column(column) {
            None => errors.push(
                Error::operator(format!(
                    "{}[table.columns] {}: target table {dst} has no column {}",
                    at(spec.column_places.get(column)),
                    toml_key(column),
                    quote_ident(column)
                ))
                .hint(did_you_mean(
                    column,
                    &target,
                    toml_key,
                    "target columns",
                    "map one of the target's columns",
                )),
            ),
            Some(c) if c.generated => errors.push(
                Error::operator(format!(
                    "{}[table.columns] {}: {dst}.{} is a generated column; the target computes it",
                    at(spec.column_places.get(column)),
                    toml_key(column),
                    quote_ident(column)
                ))
                .hint("remove this entry"),
            ),
            Some(_) => {}
        }
    }

    // What each expression is: a plain source column, or SQL to analyse on the source.
    let mut expressions: Vec<(String, String)> = Vec::new();
    for (column, text) in &spec.columns {
        if target.column(column).is_none_or(|c| c.generated) {
            continue;
        }
        if plain_reference(text, &source).is_none() {
            expressions.push((column.clone(), text.clone()));
        }
    }
    let filter_text = spec.filter.clone();
    let analysed = match analyse(source_client, &source, &expressions, filter_text.as_deref()).await
    {
        Ok(a) => a,
        Err(e) => return Err(vec![e]),
    };

    let mut columns = Vec::new();
    let mut binary_copy = true;
    for t in target.stored_columns() {
        let place = at(spec.column_places.get(&t.name));
        let explicit = spec.columns.get(&t.name);
        // The source side: a column (by name or renamed), an expression, or nothing.
        let (source_text, expr, plain, deps, out_type, out_oid) = match explicit {
            Some(text) => match plain_reference(text, &source) {
                Some(s) => (
                    s.name.clone(),
                    quote_ident(&s.name),
                    true,
                    vec![s.name.clone()],
                    s.base_type.clone(),
                    s.type_oid,
                ),
                None => match analysed.columns.get(&t.name) {
                    Some(Ok(a)) => (
                        text.trim().to_string(),
                        format!("({})", text.trim()),
                        false,
                        a.deps.clone(),
                        a.type_name.clone(),
                        a.type_oid,
                    ),
                    Some(Err(e)) => {
                        errors.push(describe_expression_error(e, &place, &t.name, &source));
                        continue;
                    }
                    None => continue,
                },
            },
            None => match source.column(&t.name).filter(|s| !s.generated) {
                Some(s) => (
                    s.name.clone(),
                    quote_ident(&s.name),
                    true,
                    vec![s.name.clone()],
                    s.base_type.clone(),
                    s.type_oid,
                ),
                None => {
                    // A target-only column takes its default; without one it must be
                    // nullable, and it must not be part of the key.
                    if t.key {
                        errors.push(
                            Error::operator(format!(
                                "target key column {dst}.{} gets no value from {src}",
                                quote_ident(&t.name)
                            ))
                            .hint(format!(
                                "map it in [table.columns], e.g. {} = {}",
                                toml_key(&t.name),
                                toml_string(
                                    &source
                                        .key_columns()
                                        .next()
                                        .map(|k| sql_ident(&k.name))
                                        .unwrap_or_else(|| "<source key column>".into())
                                )
                            )),
                        );
                    } else if t.not_null && !t.has_default {
                        errors.push(
                            Error::operator(format!(
                                "target column {dst}.{} is NOT NULL without a default and nothing maps to it",
                                quote_ident(&t.name)
                            ))
                            .hint(format!(
                                "map it in [table.columns] ({} = \"<expression over source columns>\"), give it a default, or drop NOT NULL",
                                toml_key(&t.name)
                            )),
                        );
                    }
                    continue;
                }
            },
        };
        // Values travel as text (stream) or binary (copy, same built-in types only); the
        // target's input function must read what the source printed.
        if out_type != t.base_type {
            match implicit_cast(target_client, &out_type, t.type_oid).await {
                Ok(true) => {}
                Ok(false) => {
                    let fix = if plain {
                        format!(
                            "cast it: [table.columns] {} = {}, or give the target column the source's type",
                            toml_key(&t.name),
                            toml_string(&format!("{}::{}", sql_ident(&source_text), t.type_name))
                        )
                    } else {
                        format!(
                            "cast it: [table.columns] {} = {}",
                            toml_key(&t.name),
                            toml_string(&format!("({source_text})::{}", t.type_name))
                        )
                    };
                    let what = if plain {
                        format!("source column {src}.{}", quote_ident(&source_text))
                    } else {
                        "the expression".to_string()
                    };
                    errors.push(
                        Error::operator(format!(
                            "{place}column {dst}.{} is {} but {what} is {out_type}",
                            quote_ident(&t.name),
                            t.type_name,
                        ))
                        .hint(fix),
                    );
                    continue;
                }
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            }
        }
        let same_type = plain
            && source
                .column(&source_text)
                .is_some_and(|s| s.type_name == t.type_name && s.builtin && t.builtin);
        binary_copy &= same_type || (!plain && out_oid == t.type_oid && t.builtin);
        columns.push(ColumnMap {
            target: t.name.clone(),
            source: source_text,
            expr,
            plain,
            deps,
            key: t.key,
            match_as_text: !t.has_equality,
            type_name: t.type_name.clone(),
            array_element: t.array_element,
        });
    }

    let filter = match (&filter_text, analysed.filter) {
        (Some(text), Some(Ok(a))) => {
            if a.type_name != "boolean" {
                errors.push(
                    Error::operator(format!(
                        "{}[[table]] where ({src}): the condition is {}, not boolean",
                        at(spec.filter_place.as_ref()),
                        a.type_name
                    ))
                    .hint("write a condition, such as where = \"region = 'eu'\""),
                );
                None
            } else {
                Some(Filter {
                    sql: format!("({})", text.trim()),
                    deps: a.deps,
                })
            }
        }
        (Some(_), Some(Err(e))) => {
            errors.push(describe_filter_error(
                &e,
                &at(spec.filter_place.as_ref()),
                &src,
                &source,
            ));
            None
        }
        _ => None,
    };

    // Keys. Updates and deletes find their target row by the target key, computed from
    // what the source sends of the old row: its replica identity (or the whole row).
    let full = source.replica_identity == 'f';
    if !source.identifiable() {
        errors.push(
            Error::operator(format!(
                "source table {src} has no primary key and no REPLICA IDENTITY FULL: its updates and deletes cannot be applied"
            ))
            .hint(format!(
                "add a primary key, or run ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                src.quoted()
            )),
        );
    } else if !target.columns.iter().any(|c| c.key) && !full {
        errors.push(
            Error::operator(format!(
                "table {dst} has no primary key on the target and no REPLICA IDENTITY FULL on the source"
            ))
            .hint(format!(
                "add a primary key to {dst} (ALTER TABLE {} ADD PRIMARY KEY (...)), or run ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                dst.quoted(),
                src.quoted()
            )),
        );
    }
    let identity: Vec<&str> = source.key_columns().map(|c| c.name.as_str()).collect();
    if !full && source.identifiable() {
        for c in columns.iter().filter(|c| c.key) {
            let outside: Vec<&str> = c
                .deps
                .iter()
                .map(String::as_str)
                .filter(|d| !identity.contains(d))
                .collect();
            if c.deps.is_empty() {
                errors.push(
                    Error::operator(format!(
                        "{}the key of {dst} cannot be derived: key column {} is a constant, which does not identify rows",
                        at(spec.column_places.get(&c.target)),
                        quote_ident(&c.target)
                    ))
                    .hint(format!(
                        "compute {} from the source key columns ({})",
                        quote_ident(&c.target),
                        identity.join(", ")
                    )),
                );
            } else if !outside.is_empty() {
                errors.push(
                    Error::operator(format!(
                        "{}the key of {dst} cannot be derived: key column {} is computed from {} but the source sends only its key ({}) for updated and deleted rows",
                        at(spec.column_places.get(&c.target)),
                        quote_ident(&c.target),
                        outside.join(", "),
                        identity.join(", ")
                    ))
                    .hint(format!(
                        "compute the target key from the source key columns, or run ALTER TABLE {} REPLICA IDENTITY FULL on the source",
                        src.quoted()
                    )),
                );
            }
        }
        if let Some(f) = &filter {
            let outside: Vec<&str> = f
                .deps
                .iter()
                .map(String::as_str)
                .filter(|d| !identity.contains(d))
                .collect();
            if !outside.is_empty() {
                errors.push(
                    Error::operator(format!(
                        "{}[[table]] where ({src}) reads {} but the source sends only its key ({}) for the old row of an update, so an update that moves a row into or out of the filter could not be applied",
                        at(spec.filter_place.as_ref()),
                        outside.join(", "),
                        identity.join(", ")
                    ))
                    .hint(format!(
                        "run ALTER TABLE {} REPLICA IDENTITY FULL on the source (as PostgreSQL's own row filters require)",
                        src.quoted()
                    )),
                );
            }
        }
    }
    if columns.is_empty() && errors.is_empty() {
        errors.push(
            Error::operator(format!(
                "no column of {src} maps onto {dst} (source: {}; target: {})",
                names(source.stored_columns()),
                names(target.stored_columns())
            ))
            .hint("map the target's columns in [table.columns]"),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(TablePlan {
        source,
        target,
        columns,
        binary_copy,
        filter,
        explicit: !spec.columns.is_empty(),
    })
}

fn names<'a>(cols: impl Iterator<Item = &'a ColumnInfo>) -> String {
    cols.map(|c| quote_ident(&c.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A column name as a TOML key.
fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// A TOML string holding `text`: basic, or literal when it holds double quotes.
fn toml_string(text: &str) -> String {
    if text.contains('"') && !text.contains('\'') {
        format!("'{text}'")
    } else {
        format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// An identifier as a person would write it in SQL: bare when that means the same.
fn sql_ident(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !is_keyword(name);
    if bare {
        name.to_string()
    } else {
        quote_ident(name)
    }
}

/// Whether a value printed by type `from` (a name on the source) is read as the same value
/// by type `to` on the target: an implicit cast exists between them there.
async fn implicit_cast(target: &Client, from: &str, to: u32) -> Result<bool> {
    let row = target
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_cast \
                            WHERE castsource = pg_catalog.to_regtype($1) AND casttarget = $2 \
                              AND castcontext = 'i') \
                 OR EXISTS (SELECT 1 FROM pg_catalog.pg_type \
                            WHERE oid = $2 AND typtype = 'd' AND typbasetype = pg_catalog.to_regtype($1))",
            &[&from, &to],
        )
        .await
        .map_err(|e| Error::from_pg("read the catalog", "the target", &e))?;
    Ok(row.get(0))
}

/// Why an expression does not analyse: the server's message (and its position).
#[derive(Debug, Clone)]
struct ExprError {
    message: String,
    hint: Option<String>,
    code: String,
}

#[derive(Debug, Default)]
struct Analysis {
    columns: BTreeMap<String, Result<Analysed, ExprError>>,
    filter: Option<Result<Analysed, ExprError>>,
}

/// Analyse expressions and the filter on the source, in a transaction that is rolled
/// back: each becomes a stored generated column of an empty temporary copy of the
/// table's shape. PostgreSQL then checks what we need: it parses and type-checks against
/// the source's columns, refuses anything not immutable, subqueries and aggregates, and
/// records which columns it reads (`pg_depend`).
async fn analyse(
    client: &Client,
    source: &TableInfo,
    expressions: &[(String, String)],
    filter: Option<&str>,
) -> Result<Analysis> {
    let mut out = Analysis::default();
    if expressions.is_empty() && filter.is_none() {
        return Ok(out);
    }
    let err = |e: tokio_postgres::Error| Error::from_pg("analyse the mapping", "the source", &e);
    client.batch_execute("BEGIN").await.map_err(err)?;
    let result = async {
        let cols = source
            .stored_columns()
            .map(|c| format!("{} {}", quote_ident(&c.name), c.type_name))
            .collect::<Vec<_>>()
            .join(", ");
        client
            .batch_execute(&format!(
                "CREATE TEMPORARY TABLE cutover_probe ({cols}) ON COMMIT DROP"
            ))
            .await
            .map_err(err)?;
        let mut items: Vec<(Option<String>, &str)> = expressions
            .iter()
            .map(|(c, e)| (Some(c.clone()), e.as_str()))
            .collect();
        if let Some(f) = filter {
            items.push((None, f));
        }
        for (n, (column, text)) in items.into_iter().enumerate() {
            let r = analyse_one(client, n, text).await?;
            match column {
                Some(c) => {
                    out.columns.insert(c, r);
                }
                None => out.filter = Some(r),
            }
        }
        Ok::<_, Error>(())
    }
    .await;
    let rollback = client.batch_execute("ROLLBACK").await;
    result?;
    rollback.map_err(err)?;
    Ok(out)
}

async fn analyse_one(client: &Client, n: usize, text: &str) -> Result<Result<Analysed, ExprError>> {
    let err = |e: tokio_postgres::Error| Error::from_pg("analyse the mapping", "the source", &e);
    let as_expr_error = |e: &tokio_postgres::Error| {
        e.as_db_error().map(|db| ExprError {
            message: db.message().to_string(),
            hint: db.hint().map(str::to_string),
            code: db.code().code().to_string(),
        })
    };
    if has_statement_separator(text) {
        return Ok(Err(ExprError {
            message: String::new(),
            hint: None,
            code: "separator".into(),
        }));
    }
    client
        .batch_execute(&format!("SAVEPOINT cutover_probe_{n}"))
        .await
        .map_err(err)?;
    let attempt = async {
        let stmt = client
            .prepare(&format!("SELECT ({text}) FROM pg_temp.cutover_probe"))
            .await?;
        let oid = stmt.columns().first().map(|c| c.type_().oid()).unwrap_or(0);
        let type_name: String = client
            .query_one("SELECT pg_catalog.format_type($1, NULL)", &[&oid])
            .await?
            .get(0);
        let type_for_column = if type_name == "unknown" {
            "text".to_string()
        } else {
            type_name.clone()
        };
        client
            .execute(
                &format!(
                    "ALTER TABLE pg_temp.cutover_probe ADD COLUMN cutover_probe_{n} {type_for_column} GENERATED ALWAYS AS (({text})) STORED"
                ),
                &[],
            )
            .await?;
        let deps: Vec<String> = client
            .query(
                "SELECT DISTINCT a.attname::text \
                 FROM pg_catalog.pg_attribute g \
                 JOIN pg_catalog.pg_attrdef d ON d.adrelid = g.attrelid AND d.adnum = g.attnum \
                 JOIN pg_catalog.pg_depend p \
                   ON (p.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND p.objid = d.oid) \
                   OR (p.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND p.objid = g.attrelid AND p.objsubid = g.attnum) \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = p.refobjid AND a.attnum = p.refobjsubid \
                 WHERE g.attrelid = 'pg_temp.cutover_probe'::pg_catalog.regclass AND g.attname = $1 \
                   AND p.refobjid = g.attrelid AND p.refobjsubid > 0 AND p.refobjsubid <> g.attnum \
                 ORDER BY 1",
                &[&format!("cutover_probe_{n}")],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        Ok::<_, tokio_postgres::Error>(Analysed {
            type_name,
            type_oid: oid,
            deps,
        })
    }
    .await;
    match attempt {
        Ok(a) => {
            client
                .batch_execute(&format!("RELEASE SAVEPOINT cutover_probe_{n}"))
                .await
                .map_err(err)?;
            Ok(Ok(a))
        }
        Err(e) => match as_expr_error(&e) {
            Some(x) => {
                client
                    .batch_execute(&format!("ROLLBACK TO SAVEPOINT cutover_probe_{n}"))
                    .await
                    .map_err(err)?;
                Ok(Err(x))
            }
            None => Err(err(e)),
        },
    }
}

/// Whether SQL text holds a `;` outside quotes and comments: one expression may not end
/// a statement and start another.
fn has_statement_separator(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b';' => return true,
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b'$' => {
                // A dollar quote `$tag$ ... $tag$`.
                let end = b[i + 1..].iter().position(|&c| c == b'$');
                if let Some(len) = end {
                    let tag = &b[i..i + len + 2];
                    if tag[1..tag.len() - 1]
                        .iter()
                        .all(|c| c.is_ascii_alphanumeric() || *c == b'_')
                        && let Some(close) = find(&b[i + tag.len()..], tag)
                    {
                        i += tag.len() + close + tag.len();
                        continue;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    false
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn describe_expression_error(
    e: &ExprError,
    place: &str,
    column: &str,
    source: &TableInfo,
) -> Error {
    let what = format!("{place}[table.columns] {}", toml_key(column));
    let (problem, hint) = explain(e, source);
    Error::operator(format!("{what}: {problem}")).hint(hint)
}

fn describe_filter_error(e: &ExprError, place: &str, src: &TableName, source: &TableInfo) -> Error {
    let (problem, hint) = explain(e, source);
    Error::operator(format!("{place}[[table]] where ({src}): {problem}")).hint(hint)
}

/// What went wrong with an expression, in the user's terms (the server checked it as a
/// generated column of a probe table; none of that is theirs), and the fix.
fn explain(e: &ExprError, source: &TableInfo) -> (String, String) {
    let src = &source.name;
    let scalar = "write one scalar SQL expression over the source row's columns: no subqueries, aggregates, window functions or table-qualified column references";
    if e.code == "separator" {
        return (
            "the expression holds a \";\" outside quotes; an entry is one SQL expression, not statements".into(),
            "remove the \";\" and what follows it".into(),
        );
    }
    if e.message.contains("not immutable") {
        return (
            "the expression is not immutable (it depends on the clock, the session, randomness or a function marked STABLE or VOLATILE), so the snapshot and the stream could map a row differently".into(),
            "use only immutable functions: no now(), random() or nextval(); for a timestamptz, (ts AT TIME ZONE 'UTC')::date rather than ts::date".into(),
        );
    }
    match e.code.as_str() {
        "42703" => {
            let missing = e.message.split('"').nth(1).unwrap_or_default();
            if let Some(g) = source.columns.iter().find(|c| c.generated && c.name == missing) {
                return (
                    format!(
                        "it reads {src}.{}, a generated column, which the stream does not carry",
                        quote_ident(&g.name)
                    ),
                    "repeat the column's generation expression over the columns it is computed from".into(),
                );
            }
            (
                format!("column {} does not exist on source table {src}", quote_ident(missing)),
                did_you_mean(
                    missing,
                    source,
                    sql_ident,
                    "source columns",
                    "refer to source columns by name",
                ),
            )
        }
        "42883" => (
            format!("{} on source table {src}", e.message),
            "functions and operators resolve in pg_catalog only; qualify your own with their schema (myschema.f(x)), and check the argument types".into(),
        ),
        "42704" => (
            format!("{} on source table {src}", e.message),
            "types resolve in pg_catalog only; qualify your own with their schema (myschema.mytype)".into(),
        ),
        "42601" => (
            format!("the expression does not parse ({})", e.message),
            "check its parentheses and quotes: it must be one complete SQL expression".into(),
        ),
        "42P01" => (
            format!("the expression refers to another table ({})", e.message),
            scalar.into(),
        ),
        _ => (
            format!(
                "the expression does not work on source table {src}: {}",
                e.message
                    .replace("column generation expressions", "mapping expressions")
                    .replace("column generation expression", "a mapping expression")
            ),
            e.hint.clone().unwrap_or_else(|| scalar.into()),
        ),
    }
}

/// A hint for a column name not found in `table`: the close one if there is one (written
/// with `write`), and the columns there are.
fn did_you_mean(
    name: &str,
    table: &TableInfo,
    write: fn(&str) -> String,
    listed: &str,
    otherwise: &str,
) -> String {
    let all = names(table.stored_columns());
    match nearest(name, table.stored_columns()) {
        Some(near) => format!("did you mean {}? {listed}: {all}", write(near)),
        None => format!("{otherwise}: {all}"),
    }
}

/// The column whose name is closest to `name` (a typo), if one is close.
fn nearest<'a>(name: &str, cols: impl Iterator<Item = &'a ColumnInfo>) -> Option<&'a str> {
    cols.map(|c| (edit_distance(name, &c.name), c.name.as_str()))
        .filter(|(d, n)| *d > 0 && *d <= 2.max(n.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_outside_quotes_are_found() {
        assert!(has_statement_separator("1; DROP TABLE x"));
        assert!(!has_statement_separator("';'"));
        assert!(!has_statement_separator("\"a;b\" || 'x'"));
        assert!(!has_statement_separator("$q$;$q$"));
        assert!(!has_statement_separator("x -- ;\n"));
        assert!(!has_statement_separator("x /* ; */"));
        assert!(has_statement_separator("x /* ; */ ;"));
        assert!(!has_statement_separator("$1"));
    }

    #[test]
    fn hints_are_valid_toml_and_sql() {
        assert_eq!(toml_string("v::integer"), "\"v::integer\"");
        assert_eq!(toml_string("\"Mixed\"::integer"), "'\"Mixed\"::integer'");
        assert_eq!(sql_ident("total"), "total");
        assert_eq!(sql_ident("Total"), "\"Total\"");
        assert_eq!(sql_ident("user"), "\"user\"");
    }

    #[test]
    fn typos_find_their_column() {
        assert_eq!(edit_distance("totl", "total"), 1);
        assert_eq!(edit_distance("", "ab"), 2);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn toml_keys_are_quoted_when_needed() {
        assert_eq!(toml_key("total_cents"), "total_cents");
        assert_eq!(toml_key("Full Name"), "\"Full Name\"");
    }

    #[test]
    fn plain_references_are_renames() {
        let col = |name: &str| ColumnInfo {
            name: name.into(),
            attnum: 1,
            type_oid: 23,
            type_name: "integer".into(),
            base_type: "integer".into(),
            not_null: false,
            has_default: false,
            generated: false,
            key: false,
            has_equality: true,
            builtin: true,
            array_element: true,
        };
        let t = TableInfo {
            name: TableName::new("public", "t"),
            oid: 1,
            relkind: 'r',
            replica_identity: 'd',
            has_primary_key: false,
            other_unique_indexes: 0,
            columns: vec![col("total"), col("Mixed")],
            pages: 0,
            rows_estimate: 0.0,
        };
        assert!(plain_reference("total", &t).is_some());
        assert!(plain_reference(" TOTAL ", &t).is_some());
        assert!(plain_reference("\"total\"", &t).is_some());
        assert!(plain_reference("\"Mixed\"", &t).is_some());
        assert!(plain_reference("Mixed", &t).is_none(), "folds to mixed");
        assert!(plain_reference("total * 100", &t).is_none());
    }
}
