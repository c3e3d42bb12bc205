//! `cutover check JOB.toml`: pre-flight checks against both databases. Reads only; never
//! creates, alters or drops anything. Each check passes, warns (a risk worth knowing) or
//! fails (the job would fail or be unsafe), with a detail and the fix.

use std::path::Path;

use cutover_config::JobSpec;
use cutover_connectors::catalog::{self, TableInfo};
use cutover_connectors::pg_apply::{self, TablePlan};
use cutover_connectors::pg_conn;
use cutover_connectors::pg_source::client::ReplicationSession;
use cutover_connectors::pg_source::provision;
use cutover_connectors::{Lsn, TableName};
use serde::Serialize;
use tokio_postgres::Client;

use crate::cli::{CheckArgs, Outcome};

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: String,
    pub result: Verdict,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Default)]
struct Report {
    checks: Vec<Check>,
}

impl Report {
    fn add(
        &mut self,
        check: impl Into<String>,
        result: Verdict,
        detail: impl Into<String>,
        fix: Option<String>,
    ) {
        self.checks.push(Check {
            check: check.into(),
            result,
            detail: detail.into(),
            fix,
        });
    }

    fn pass(&mut self, check: impl Into<String>, detail: impl Into<String>) {
        self.add(check, Verdict::Pass, detail, None);
    }

    fn warn(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.add(check, Verdict::Warn, detail, Some(fix.into()));
    }

    fn fail(
        &mut self,
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.add(check, Verdict::Fail, detail, Some(fix.into()));
    }
}

#[derive(Serialize)]
struct Document<'a> {
    job: &'a str,
    ok: bool,
    checks: &'a [Check],
}

pub async fn check(args: &CheckArgs) -> anyhow::Result<Outcome> {
    let spec = JobSpec::load(&args.job)?;
    let mut report = Report::default();
    run_checks(&spec, &mut report).await;
    let ok = report.checks.iter().all(|c| c.result != Verdict::Fail);
    if args.json {
        let doc = Document {
            job: &spec.name,
            ok,
            checks: &report.checks,
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_table(&report.checks);
        let (warns, fails) = (
            report
                .checks
                .iter()
                .filter(|c| c.result == Verdict::Warn)
                .count(),
            report
                .checks
                .iter()
                .filter(|c| c.result == Verdict::Fail)
                .count(),
        );
        println!();
        println!(
            "{}: {} checks, {fails} failed, {warns} warnings",
            if ok {
                "ready to run"
            } else {
                "not ready to run"
            },
            report.checks.len()
        );
    }
    Ok(if ok {
        Outcome::Success
    } else {
        Outcome::Negative
    })
}

fn print_table(checks: &[Check]) {
    let width = checks
        .iter()
        .map(|c| c.check.chars().count())
        .max()
        .unwrap_or(5)
        .min(48);
    println!("{:<width$}  {:<6}  detail / fix", "check", "result");
    for c in checks {
        let result = match c.result {
            Verdict::Pass => "pass",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        println!("{:<width$}  {:<6}  {}", c.check, result, c.detail);
        if let Some(fix) = &c.fix {
            println!("{:<width$}  {:<6}  fix: {fix}", "", "");
        }
    }
}

async fn run_checks(spec: &JobSpec, report: &mut Report) {
    let source_params = match spec.source.conn.resolve() {
        Ok(p) => Some(p),
        Err(e) => {
            report.fail(
                "source connection settings",
                e.to_string(),
                "fix [source] in the job file",
            );
            None
        }
    };
    let target_params = match spec.target.conn.resolve() {
        Ok(p) => Some(p),
        Err(e) => {
            report.fail(
                "target connection settings",
                e.to_string(),
                "fix [target] in the job file",
            );
            None
        }
    };
    let app = format!("cutover/{}/check", spec.name);
    let source = match &source_params {
        Some(p) => match pg_conn::connect(p, &app).await {
            Ok(c) => {
                report.pass("source reachable", p.endpoint());
                Some(c)
            }
            Err(e) => {
                report.fail(
                    "source reachable",
                    e.primary.clone(),
                    e.hint.clone().unwrap_or_default(),
                );
                None
            }
        },
        None => None,
    };
    let target = match &target_params {
        Some(p) => match pg_conn::connect(p, &app).await {
            Ok(c) => {
                report.pass("target reachable", p.endpoint());
                Some(c)
            }
            Err(e) => {
                report.fail(
                    "target reachable",
                    e.primary.clone(),
                    e.hint.clone().unwrap_or_default(),
                );
                None
            }
        },
        None => None,
    };
    let slot = provision::object_name(&spec.name);

    if let (Some(params), Some(_)) = (&source_params, &source) {
        // Only a real replication connection proves the REPLICATION attribute (it is not
        // inherited through role membership) and the pg_hba.conf line.
        match ReplicationSession::connect(params, &slot, &slot, Lsn::ZERO, &app).await {
            Ok(session) => {
                drop(session);
                report.pass(
                    "source replication connection",
                    "a replication=database connection works",
                );
            }
            Err(e) => report.fail(
                "source replication connection",
                e.primary.clone(),
                e.hint.clone().unwrap_or_else(|| {
                    "grant the user REPLICATION and allow it in pg_hba.conf".into()
                }),
            ),
        }
    }
    if let Some(source) = &source {
        check_source_settings(source, report).await;
    }
    let same_database = match (&source_params, &target_params) {
        (Some(s), Some(t)) => s.host == t.host && s.port == t.port && s.dbname == t.dbname,
        _ => false,
    };
    if let (Some(source), Some(target)) = (&source, &target) {
        check_tables(spec, source, target, same_database, report).await;
    }
    if let Some(source) = &source {
        check_slot_and_publication(
            spec,
            source,
            source_params
                .as_ref()
                .map(|p| p.dbname.as_str())
                .unwrap_or(""),
            report,
        )
        .await;
    }
    check_disk(&spec.data_dir, report);
}

async fn setting(client: &Client, name: &str) -> Option<String> {
    client
        .query_opt(
            "SELECT setting FROM pg_catalog.pg_settings WHERE name = $1",
            &[&name],
        )
        .await
        .ok()
        .flatten()
        .map(|r| r.get(0))
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

async fn check_source_settings(source: &Client, report: &mut Report) {
    match setting(source, "wal_level").await.as_deref() {
        Some("logical") => report.pass("wal_level", "logical"),
        other => report.fail(
            "wal_level",
            format!("wal_level is {}", other.unwrap_or("unknown")),
            "ALTER SYSTEM SET wal_level = logical; then restart the source server",
        ),
    }
    let max_slots: i64 = setting(source, "max_replication_slots")
        .await
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let used_slots = count(
        source,
        "SELECT count(*) FROM pg_catalog.pg_replication_slots",
    )
    .await;
    if used_slots < max_slots {
        report.pass(
            "free replication slots",
            format!("{used_slots} of {max_slots} in use"),
        );
    } else {
        report.fail(
            "free replication slots",
            format!("{used_slots} of {max_slots} in use"),
            "raise max_replication_slots (restart needed) or drop an unused slot",
        );
    }
    let max_senders: i64 = setting(source, "max_wal_senders")
        .await
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let used_senders = count(
        source,
        "SELECT count(*) FROM pg_catalog.pg_stat_replication",
    )
    .await;
    // The job needs one sender to stream, and one more while it copies after a restart.
    if used_senders + 2 <= max_senders {
        report.pass(
            "free WAL senders",
            format!("{used_senders} of {max_senders} in use"),
        );
    } else {
        report.fail(
            "free WAL senders",
            format!("{used_senders} of {max_senders} in use; the job needs up to 2"),
            "raise max_wal_senders (restart needed)",
        );
    }
    match setting(source, "max_slot_wal_keep_size").await.as_deref() {
        Some("-1") | None => report.warn(
            "max_slot_wal_keep_size",
            "unlimited: a stopped job's slot retains WAL until the source's disk is full",
            "ALTER SYSTEM SET max_slot_wal_keep_size = '50GB' (sized to your disk); SELECT pg_reload_conf()",
        ),
        Some(v) => report.pass("max_slot_wal_keep_size", format!("{v} MB")),
    }
}

async fn check_tables(
    spec: &JobSpec,
    source: &Client,
    target: &Client,
    same_database: bool,
    report: &mut Report,
) {
    let tables = match crate::job::resolve_tables(spec, source).await {
        Ok(t) => t,
        Err(e) => {
            report.fail(
                "tables",
                e.primary.clone(),
                e.hint.clone().unwrap_or_default(),
            );
            return;
        }
    };
    let published: Vec<TableName> = source
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables",
            &[],
        )
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect()
        })
        .unwrap_or_default();
    // Tables whose copy was interrupted while their indexes were dropped: the next run
    // restores them; the catalog shows the target without them until then.
    let interrupted: Vec<String> = target
        .query(
            "SELECT target_table FROM cutover.tables WHERE job = $1 AND deferred_indexes IS NOT NULL AND done_at IS NULL",
            &[&spec.name],
        )
        .await
        .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        .unwrap_or_default();
    for (src, dst, mapping) in tables {
        let name = format!("table {src} -> {dst}");
        if interrupted.contains(&dst.to_string()) {
            report.warn(
                &name,
                format!("the copy of {dst} was interrupted while its indexes were set aside for the load"),
                "run the job again: it empties the table, restores its indexes and copies it again",
            );
            continue;
        }
        let s: Option<TableInfo> = match catalog::table_info(source, &src).await {
            Ok(s) => s,
            Err(e) => {
                report.fail(&name, e.primary.clone(), e.hint.clone().unwrap_or_default());
                continue;
            }
        };
        let Some(s) = s else {
            report.fail(
                &name,
                format!("source table {src} does not exist"),
                "check the [[table]] source name and the [source] url's database",
            );
            continue;
        };
        let has_key_or_full = s.has_primary_key || s.replica_identity == 'f';
        if !has_key_or_full {
            report.fail(
                format!("{name}: key"),
                format!("{src} has no primary key and REPLICA IDENTITY is not FULL: its updates and deletes cannot be applied"),
                format!("ALTER TABLE {} ADD PRIMARY KEY (...); or ALTER TABLE {} REPLICA IDENTITY FULL;", src.quoted(), src.quoted()),
            );
        } else if !s.has_primary_key {
            report.warn(
                format!("{name}: key"),
                "no primary key: REPLICA IDENTITY FULL logs whole old rows and each update or delete is matched row by row",
                format!("add a primary key to {src} if it can have one"),
            );
        }
        let generated: Vec<&str> = s
            .columns
            .iter()
            .filter(|c| c.generated)
            .map(|c| c.name.as_str())
            .collect();
        if !generated.is_empty() {
            report.warn(
                format!("{name}: generated columns"),
                format!(
                    "generated columns are not copied; the target computes them: {}",
                    generated.join(", ")
                ),
                "give the target the same generation expressions",
            );
        }
        if s.columns
            .iter()
            .any(|c| c.type_name == "oid" || c.type_name == "lo")
        {
            report.warn(
                format!("{name}: large objects"),
                "an oid/lo column may reference large objects, which logical replication does not carry",
                "copy pg_largeobject separately, or move the data into bytea",
            );
        }
        let toasted_keys: Vec<&str> = s
            .columns
            .iter()
            .filter(|c| {
                c.key
                    && (c.type_name == "text"
                        || c.type_name.starts_with("character varying")
                        || c.type_name == "bytea"
                        || c.type_name == "jsonb")
            })
            .map(|c| c.name.as_str())
            .collect();
        if !toasted_keys.is_empty() && s.replica_identity != 'f' {
            report.warn(
                format!("{name}: key storage"),
                format!("key columns of variable length may be stored out of line, and an update that does not change them then arrives without their value: {}", toasted_keys.join(", ")),
                format!("keep keys short, or ALTER TABLE {} REPLICA IDENTITY FULL", src.quoted()),
            );
        }
        if same_database && published.contains(&dst) {
            report.fail(
                format!("{name}: loop"),
                format!("target table {dst} is in a publication of the same database: the apply's writes would be published again"),
                format!("remove {dst} from that publication"),
            );
        }
        match catalog::table_info(target, &dst).await {
            Ok(Some(t)) => match pg_apply::plan_table(source, target, s, t, &mapping).await {
                Ok(plan) => report.pass(&name, mapping_summary(&plan)),
                Err(errors) => {
                    // A source without a key is reported by the key check above.
                    let keyless = !has_key_or_full;
                    for e in errors.into_iter().filter(|e| {
                        !(keyless && e.primary.contains("no primary key and no REPLICA IDENTITY FULL: its updates"))
                    }) {
                        report.fail(
                            format!("{name}: mapping"),
                            e.primary.clone(),
                            e.hint.clone().unwrap_or_default(),
                        );
                    }
                }
            },
            Ok(None) if spec.target.create_tables && !mapping.columns.is_empty() => report.fail(
                &name,
                format!("target table {dst} does not exist, and [target] create_tables creates only tables mapped by name"),
                format!("create {dst} on the target for its [table.columns] mapping"),
            ),
            Ok(None) if spec.target.create_tables => match pg_apply_sql(source, &src, &dst).await {
                Ok(n) => report.pass(
                    &name,
                    format!("{dst} does not exist; run creates it ({n} statements)"),
                ),
                Err(e) => report.fail(&name, e.primary.clone(), e.hint.clone().unwrap_or_default()),
            },
            Ok(None) => report.fail(
                &name,
                format!("target table {dst} does not exist"),
                if src.name == dst.name {
                    format!(
                        "create it on the target (for example from pg_dump --schema-only -t {} into schema {}), or set [target] create_tables = true",
                        src.quoted(),
                        dst.schema
                    )
                } else {
                    format!(
                        "create {dst} on the target in the shape the mapping expects, or name an existing table in [[table]] target"
                    )
                },
            ),
            Err(e) => report.fail(&name, e.primary.clone(), e.hint.clone().unwrap_or_default()),
        }
    }
}

/// What a plan maps, in a few words.
fn mapping_summary(plan: &TablePlan) -> String {
    let computed = plan.columns.iter().filter(|c| !c.plain).count();
    let renamed = plan
        .columns
        .iter()
        .filter(|c| c.plain && c.source != c.target)
        .count();
    let mut parts = vec![format!("{} columns mapped", plan.columns.len())];
    if renamed > 0 {
        parts.push(format!("{renamed} renamed"));
    }
    if computed > 0 {
        parts.push(format!("{computed} computed on the source"));
    }
    let defaults = plan
        .target
        .stored_columns()
        .filter(|t| !plan.columns.iter().any(|c| c.target == t.name))
        .count();
    if defaults > 0 {
        parts.push(format!("{defaults} left to their defaults"));
    }
    if plan.filter.is_some() {
        parts.push("rows filtered".to_string());
    }
    parts.join(", ")
}

async fn check_slot_and_publication(
    spec: &JobSpec,
    source: &Client,
    dbname: &str,
    report: &mut Report,
) {
    let slot = provision::object_name(&spec.name);
    match provision::slot_state(source, &slot).await {
        Ok(None) => report.pass(
            "replication slot",
            format!("\"{slot}\" does not exist yet; run creates it"),
        ),
        Ok(Some(state)) => match provision::check_slot_usable(&slot, &state, dbname) {
            Ok(()) => report.pass(
                "replication slot",
                format!(
                    "\"{slot}\" exists (ours, {}), confirmed up to {}",
                    state.wal_status.as_deref().unwrap_or("?"),
                    state
                        .confirmed_flush_lsn
                        .map(|l| l.to_string())
                        .unwrap_or_else(|| "?".into())
                ),
            ),
            Err(e) if e.is_transient() => report.warn(
                "replication slot",
                e.primary.clone(),
                e.hint.clone().unwrap_or_default(),
            ),
            Err(e) => report.fail(
                "replication slot",
                e.primary.clone(),
                e.hint.clone().unwrap_or_default(),
            ),
        },
        Err(e) => report.fail(
            "replication slot",
            e.primary.clone(),
            e.hint.clone().unwrap_or_default(),
        ),
    }
    let exists = provision::publication_exists(source, &slot)
        .await
        .unwrap_or(false);
    if exists {
        report.pass("publication", format!("\"{slot}\" exists"));
    } else {
        report.pass("publication", format!("\"{slot}\" does not exist yet; run creates it (the source user must own the tables)"));
    }
}

/// Free space where the job keeps its data, from `df` (the nearest existing directory).
fn check_disk(data_dir: &Path, report: &mut Report) {
    let mut dir = data_dir.to_path_buf();
    while !dir.exists() {
        if !dir.pop() {
            dir = Path::new(".").to_path_buf();
            break;
        }
    }
    if dir.as_os_str().is_empty() {
        dir = Path::new(".").to_path_buf();
    }
    let out = std::process::Command::new("df")
        .arg("-Pk")
        .arg(&dir)
        .output();
    let free_kib = out.ok().and_then(|o| {
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        text.lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(3))
            .and_then(|v| v.parse::<u64>().ok())
    });
    match free_kib {
        Some(k) if k >= 1024 * 1024 => report.pass(
            "free disk",
            format!("{} GiB free at {}", k / (1024 * 1024), dir.display()),
        ),
        Some(k) => report.warn(
            "free disk",
            format!("only {} MiB free at {}", k / 1024, dir.display()),
            "free space or point data_dir elsewhere",
        ),
        None => report.warn(
            "free disk",
            format!("could not read free space at {}", dir.display()),
            "check it by hand (df)",
        ),
    }
}

/// How many statements creating `dst` like `src` takes (proves the definition can be read).
async fn pg_apply_sql(
    source: &Client,
    src: &TableName,
    dst: &TableName,
) -> cutover_connectors::Result<usize> {
    cutover_connectors::pg_apply::create_table_sql(source, src, dst)
        .await
        .map(|d| d.create.len() + d.after_load.len())
}
