//! One job: provision the source, copy the snapshot, stream and apply, and survive every
//! restart in between.
//!
//! ```text
//!  source                                   daemon                               target
//!  publication ─┐
//!  slot ────────┼─ CREATE_REPLICATION_SLOT ─ exported snapshot ── COPY ... ─────▶ tables (+ cutover.tables)
//!               └─ START_REPLICATION ─────── decode ─ Applier ── BEGIN..COMMIT ─▶ tables (+ cutover.progress)
//!                        ▲                                                          │
//!                        └──────── confirm(end LSN of the last committed group) ◀───┘
//! ```
//!
//! [`run`] is the supervisor: it runs [`run_once`] and, when that fails with a transient
//! error (a lost connection, a restarting server), waits with backoff and runs it again.
//! Every `run_once` resumes from what the target holds, so a retry is the same code path
//! as a restart after `kill -9`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use cutover_config::{ConnParams, JobSpec, SnapshotMode};
use cutover_connectors::catalog::{self, TableInfo};
use cutover_connectors::error::{Error, Result};
use cutover_connectors::pg_apply::{
    self, Applier, CopyCounters, CopyTask, GroupLimits, Mapper, MappingSpec, Step, TablePlan,
    TablesAtStart,
};
use cutover_connectors::pg_source::client::{
    ReplicationSession, ReplicationStream, StartOptions, StreamEvent,
};
use cutover_connectors::pg_source::decode::{Commit, LogicalMessage};
use cutover_connectors::pg_source::{provision, wire};
use cutover_connectors::{Lsn, TableName, pg_conn};
use futures_util::FutureExt;
use tokio::sync::watch;

use crate::anchor::{BarrierReceiver, BarrierReply, BarrierRequest, PauseRequest};
use crate::status::{Phase, StatusHandle, TableStatus};

/// Everything a job needs that is not in its spec.
#[derive(Clone)]
pub struct JobContext {
    pub spec: Arc<JobSpec>,
    pub source: ConnParams,
    pub target: ConnParams,
    pub status: StatusHandle,
    /// Becomes `true` when the job must stop (SIGINT, SIGTERM).
    pub shutdown: watch::Receiver<bool>,
    /// Requests from the verifier to hold the apply at an LSN (see [`crate::anchor`]); the
    /// stream that runs serves them.
    pub barriers: Arc<tokio::sync::Mutex<BarrierReceiver>>,
}

impl JobContext {
    fn slot(&self) -> String {
        provision::object_name(&self.spec.name)
    }

    fn app_name(&self, role: &str) -> String {
        format!("cutover/{}/{role}", self.spec.name)
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// How a `run_once` ended without error.
enum Ended {
    /// Shutdown was requested and everything applied is confirmed.
    Stopped,
}

/// Run the job until shutdown. Transient errors are retried with backoff (logged once
/// per incident); an error that needs an operator ends the job.
pub async fn run(ctx: JobContext) -> Result<()> {
    let poller = tokio::spawn(poll_source(ctx.clone()));
    let mut backoff = Duration::from_millis(500);
    let mut incident: Option<String> = None;
    let mut incident_since = Instant::now();
    let result = loop {
        let applied_before = ctx.status.snapshot().applied_lsn;
        match run_once(&ctx).await {
            Ok(Ended::Stopped) => break Ok(()),
            Err(e)
                if e.is_transient()
                    && !ctx.stopping()
                    && e.retry_for.is_some_and(|limit| {
                        incident.as_deref() == Some(e.to_string().as_str())
                            && incident_since.elapsed() > limit
                    }) =>
            {
                // The same incident outlasted what waiting can fix.
                break Err(e);
            }
            Err(e) if e.is_transient() && !ctx.stopping() => {
                let text = e.to_string();
                if incident.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "job interrupted; retrying");
                    incident = Some(text.clone());
                    incident_since = Instant::now();
                }
                ctx.status.update(|s| s.error = Some(text));
                // An attempt that applied something was a success interrupted: start the
                // backoff over, so a second incident soon after is not waited out long.
                if ctx.status.snapshot().applied_lsn != applied_before {
                    backoff = Duration::from_millis(500);
                }
                let mut shutdown = ctx.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) if ctx.stopping() && e.is_transient() => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    poller.abort();
    ctx.status.update(|s| {
        s.phase = if result.is_ok() {
            Phase::Stopped
        } else {
            Phase::Failed
        };
        if let Err(e) = &result {
            s.error = Some(e.to_string());
        }
    });
    result
}

/// The tables of the job: explicit `[[table]]` entries, or every source table matched by
/// `[source] tables`, each with its target name.
pub(crate) async fn resolve_tables(
    spec: &JobSpec,
    source: &tokio_postgres::Client,
) -> Result<Vec<(TableName, TableName, MappingSpec)>> {
    let target_for = |src: &TableName| {
        TableName::new(
            spec.target
                .schema
                .clone()
                .unwrap_or_else(|| src.schema.clone()),
            src.name.clone(),
        )
    };
    let file = spec
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "job".to_string());
    if !spec.tables.is_empty() {
        let mut out = Vec::new();
        for t in &spec.tables {
            let src = TableName::parse(&t.source, "public").ok_or_else(|| {
                Error::operator(format!(
                    "invalid table name \"{}\" in [[table]] source",
                    t.source
                ))
            })?;
            let dst = match &t.target {
                Some(name) => {
                    TableName::parse(name, spec.target.schema.as_deref().unwrap_or(&src.schema))
                        .ok_or_else(|| {
                            Error::operator(format!(
                                "invalid table name \"{name}\" in [[table]] target"
                            ))
                        })?
                }
                None => target_for(&src),
            };
            let mapping = MappingSpec {
                columns: t.columns.clone(),
                filter: t.filter.clone(),
                column_places: t
                    .column_lines
                    .iter()
                    .map(|(c, line)| (c.clone(), format!("{file}:{line}")))
                    .collect(),
                filter_place: t.filter_line.map(|line| format!("{file}:{line}")),
            };
            out.push((src, dst, mapping));
        }
        return Ok(out);
    }
    let all = catalog::list_tables(source).await?;
    let picked: Vec<_> = all
        .into_iter()
        .filter(|t| {
            spec.source
                .tables
                .iter()
                .any(|p| catalog::matches_pattern(t, p))
        })
        .map(|t| {
            let dst = target_for(&t);
            (t, dst, MappingSpec::default())
        })
        .collect();
    if picked.is_empty() {
        return Err(Error::operator(format!(
            "no source table matches [source] tables = {:?}",
            spec.source.tables
        ))
        .hint("list the tables with [[table]] entries, or fix the patterns"));
    }
    Ok(picked)
}

/// One error out of a mapping's list: the first, with how many more `check` would show.
pub(crate) fn first_mapping_error(mut errors: Vec<Error>) -> Error {
    let more = errors.len().saturating_sub(1);
    let mut first = errors.remove(0);
    if more > 0 {
        first.detail = Some(match first.detail.take() {
            Some(d) => {
                format!("{d}; and {more} more mapping problems (cutover check lists them all)")
            }
            None => format!("and {more} more mapping problems (cutover check lists them all)"),
        });
    }
    first
}

/// Build a plan per table from both catalogs. With `create_missing` (only `run` passes it)
/// and `[target] create_tables`, missing target tables are created first; everyone else
/// only reads.
/// A table whose mapping does not hold against the catalogs (`run` may go on without it
/// when it is past its snapshot: see `run_once`).
pub(crate) struct Broken {
    pub source: TableName,
    pub target: TableName,
    pub error: Error,
}

pub(crate) async fn plan_tables(
    create_missing: bool,
    spec: &JobSpec,
    source_params: &ConnParams,
    target_params: &ConnParams,
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    mut broken: Option<&mut Vec<Broken>>,
) -> Result<Vec<Arc<TablePlan>>> {
    let same_database = source_params.host == target_params.host
        && source_params.port == target_params.port
        && source_params.dbname == target_params.dbname;
    let resolved = resolve_tables(spec, source).await?;
    if same_database && let Some((src, _, _)) = resolved.iter().find(|(src, dst, _)| src == dst) {
        return Err(Error::operator(format!(
            "table {src} would be copied onto itself: source and target are the same database"
        ))
        .hint("set [target] schema, or give the [[table]] a target in another schema"));
    }
    // Both catalogs of every table are read at once: the queries pipeline on the two
    // sessions, so a job's start takes a few round trips rather than several per table.
    let infos = futures_util::future::try_join_all(resolved.iter().map(|(src, dst, _)| {
        futures_util::future::try_join(
            catalog::table_info(source, src),
            catalog::table_info(target, dst),
        )
    }))
    .await?;
    let mut plans = Vec::new();
    for ((src, dst, mapping), (s, mut existing)) in resolved.into_iter().zip(infos) {
        let s: TableInfo = s.ok_or_else(|| {
            Error::operator(format!("source table {src} does not exist"))
                .hint("check the [[table]] source names and the [source] url's database")
        })?;
        if existing.is_none() && create_missing && spec.target.create_tables {
            if !mapping.columns.is_empty() {
                return Err(Error::operator(format!(
                    "target table {dst} does not exist, and [target] create_tables creates only tables mapped by name"
                ))
                .hint(format!("create {dst} on the target for its [table.columns] mapping")));
            }
            pg_apply::create_target_table(source, target, &src, &dst, &spec.name).await?;
            existing = catalog::table_info(target, &dst).await?;
        }
        let t: TableInfo = existing.ok_or_else(|| {
            Error::operator(format!("target table {dst} does not exist")).hint(format!(
                "create it on the target (for example from pg_dump --schema-only -t {}), or set [target] create_tables = true",
                src.quoted()
            ))
        })?;
        match pg_apply::plan_table(source, target, s, t, &mapping).await {
            Ok(plan) => plans.push(Arc::new(plan)),
            Err(errors) => match broken.as_deref_mut() {
                Some(list) => list.push(Broken {
                    source: src,
                    target: dst,
                    error: first_mapping_error(errors),
                }),
                None => return Err(first_mapping_error(errors)),
            },
        }
    }
    Ok(plans)
}

async fn run_once(ctx: &JobContext) -> Result<Ended> {
    let spec = &ctx.spec;
    let slot = ctx.slot();
    let publication = slot.clone();
    let control = ctx.app_name("control");
    let (source, target) = tokio::try_join!(
        pg_conn::connect(&ctx.source, &control),
        pg_conn::connect(&ctx.target, &control)
    )?;
    // This session repairs, controls the copy and applies: before it reads or changes the
    // job's state on the target, the earlier run's control session must be gone (a daemon
    // killed mid-group leaves its transaction running; see `lock_job`).
    pg_apply::lock_job(&target, &spec.name, JOB_LOCK_WAIT).await?;
    pg_apply::undo_interrupted_deferrals(&target, &spec.name).await?;
    // A table whose mapping broke while the job was down (or that an earlier run paused and
    // nobody fixed yet) stays paused if it is past its snapshot; the others run.
    let mut broken = Vec::new();
    let plans = plan_tables(
        true,
        &ctx.spec,
        &ctx.source,
        &ctx.target,
        &source,
        &target,
        Some(&mut broken),
    )
    .await?;
    pg_apply::ensure_state_schema(&target).await?;
    ctx.status.update(|s| {
        s.error = None;
        let old: HashMap<String, TableStatus> =
            s.tables.drain(..).map(|t| (t.source.clone(), t)).collect();
        let names = plans
            .iter()
            .map(|p| (p.source_name(), p.target_name(), None))
            .chain(
                broken
                    .iter()
                    .map(|b| (&b.source, &b.target, Some(b.error.to_string()))),
            );
        s.tables = names
            .map(|(src, dst, attention)| {
                let mut t = old.get(&src.to_string()).cloned().unwrap_or(TableStatus {
                    source: src.to_string(),
                    target: dst.to_string(),
                    rows_copied: 0,
                    bytes_copied: 0,
                    snapshot_done: false,
                    needs_attention: None,
                    notes: Vec::new(),
                });
                if attention.is_some() {
                    t.needs_attention = attention;
                }
                t
            })
            .collect();
    });

    // A slot we must not use is refused before anything is created on the source.
    let slot_state = provision::slot_state(&source, &slot).await?;
    if let Some(state) = &slot_state {
        provision::check_slot_usable(&slot, state, &ctx.source.dbname)?;
    }
    // The publication first, then the slot (hard case 14).
    let source_tables: Vec<TableName> = plans
        .iter()
        .map(|p| p.source_name().clone())
        .chain(broken.iter().map(|b| b.source.clone()))
        .collect();
    provision::ensure_publication(&source, &publication, &source_tables).await?;

    let mut snapshot_session = None;
    match slot_state {
        Some(_) => {}
        None => {
            let (session, created) = create_slot(ctx, &source, &slot, &publication, false).await?;
            // A new slot starts a new history: whatever an earlier slot of this job left
            // on the target (progress, finished copies) no longer lines up with it.
            target
                .execute("DELETE FROM cutover.progress WHERE job = $1", &[&spec.name])
                .await
                .map_err(|e| Error::from_pg("reset cutover.progress", "the target", &e))?;
            // Tables created for this job keep the indexes they are to get after the copy.
            target
                .execute(
                    "DELETE FROM cutover.tables WHERE job = $1 AND deferred_indexes IS NULL",
                    &[&spec.name],
                )
                .await
                .map_err(|e| Error::from_pg("reset cutover.tables", "the target", &e))?;
            tracing::info!(slot = %slot, consistent_point = %created.consistent_point, "created replication slot");
            snapshot_session = Some((session, created));
        }
    }

    // Which tables still need their copy.
    let states = pg_apply::read_table_states(&target, &spec.name).await?;
    let mut pending: Vec<Arc<TablePlan>> = Vec::new();
    let mut snapshot_lsn: HashMap<TableName, Lsn> = HashMap::new();
    let mut resuming: HashMap<TableName, Lsn> = HashMap::new();
    let mut known: HashMap<TableName, Vec<String>> = HashMap::new();
    let mut paused: HashMap<TableName, (Option<Lsn>, String)> = HashMap::new();
    for b in broken {
        match states.get(&b.source.to_string()) {
            Some(st) if st.done => {
                tracing::error!(table = %b.source, "the table's apply stays paused: {}", b.error);
                paused.insert(b.source, (st.paused_lsn, b.error.to_string()));
            }
            // Not copied yet: nothing to hold, the mapping must be fixed first.
            _ => return Err(b.error),
        }
    }
    for plan in &plans {
        let Some(st) = states.get(&plan.source_name().to_string()) else {
            continue;
        };
        if let Some(cols) = &st.source_columns {
            known.insert(plan.source_name().clone(), cols.clone());
        }
        if let (Some(lsn), true) = (st.paused_lsn, st.done) {
            resuming.insert(plan.source_name().clone(), lsn);
            let why = st.attention.clone().unwrap_or_default();
            ctx.status.update(|s| {
                if let Some(t) = s
                    .tables
                    .iter_mut()
                    .find(|t| t.source == plan.source_name().to_string())
                {
                    t.needs_attention = Some(format!(
                        "paused at {lsn}: {why} (resumes if the mapping holds now)"
                    ));
                }
            });
        }
    }
    for plan in &plans {
        match states.get(&plan.source_name().to_string()) {
            Some(st) if st.done => {
                snapshot_lsn.insert(plan.source_name().clone(), st.snapshot_lsn);
                ctx.status.update(|s| {
                    if let Some(t) = s
                        .tables
                        .iter_mut()
                        .find(|t| t.source == plan.source_name().to_string())
                    {
                        t.snapshot_done = true;
                        t.rows_copied = st.rows_copied;
                    }
                });
            }
            _ => pending.push(plan.clone()),
        }
    }

    if !pending.is_empty() {
        ctx.status.update(|s| s.phase = Phase::Snapshot);
        let (session, point, snapshot_name) = match snapshot_session.take() {
            Some((session, created)) => (session, created.consistent_point, created.snapshot_name),
            None => {
                // Tables copied after the slot's start (a restart during the copy, or a
                // table added to the job) use a snapshot of their own, from a temporary
                // slot; their changes apply from that snapshot's LSN on.
                let tmp = format!("{}_sync", slot);
                let (session, created) =
                    create_slot(ctx, &source, &tmp, &publication, true).await?;
                (session, created.consistent_point, created.snapshot_name)
            }
        };
        if spec.snapshot.mode == SnapshotMode::Never {
            for plan in &pending {
                pg_apply::mark_table_started(
                    &target,
                    &spec.name,
                    &plan.source_name().to_string(),
                    &plan.target_name().to_string(),
                    Lsn::ZERO,
                    &source_column_names(plan),
                )
                .await?;
                pg_apply::mark_done(&target, plan, &spec.name).await?;
                snapshot_lsn.insert(plan.source_name().clone(), Lsn::ZERO);
                ctx.status.update(|s| {
                    if let Some(t) = s
                        .tables
                        .iter_mut()
                        .find(|t| t.source == plan.source_name().to_string())
                    {
                        t.snapshot_done = true;
                    }
                });
            }
        } else {
            copy_tables(ctx, &target, &pending, point, &snapshot_name).await?;
            for plan in &pending {
                snapshot_lsn.insert(plan.source_name().clone(), point);
            }
        }
        // Ends the exporting session (and drops a temporary slot).
        drop(session);
    }
    drop(snapshot_session);
    if ctx.stopping() {
        return Ok(Ended::Stopped);
    }

    let tables = TablesAtStart {
        snapshot_lsn,
        resuming,
        paused,
    };
    stream(ctx, source, target, plans, tables, known).await
}

/// The source columns a table's copy starts with: the stream's columns outside this list
/// are new.
fn source_column_names(plan: &TablePlan) -> Vec<String> {
    plan.source.columns.iter().map(|c| c.name.clone()).collect()
}

/// Create a slot (bounded wait), returning the session that exported its snapshot.
async fn create_slot(
    ctx: &JobContext,
    source: &tokio_postgres::Client,
    slot: &str,
    publication: &str,
    temporary: bool,
) -> Result<(
    ReplicationSession,
    cutover_connectors::pg_source::client::CreatedSlot,
)> {
    let app = ctx.app_name(if temporary { "sync" } else { "slot" });
    let mut session =
        ReplicationSession::connect(&ctx.source, slot, publication, Lsn::ZERO, &app).await?;
    let wait = ctx.spec.snapshot.slot_wait;
    match tokio::time::timeout(wait, session.create_slot(slot, temporary)).await {
        Ok(created) => Ok((session, created?)),
        Err(_) => {
            let blockers = provision::blocking_backends(source, &app)
                .await
                .unwrap_or_default();
            drop(session);
            provision::cancel_slot_creation(source, &app, slot).await?;
            Err(Error::operator(format!(
                "could not create replication slot \"{slot}\": open transactions on the source kept it waiting for {}s",
                wait.as_secs()
            ))
            .detail(if blockers.is_empty() {
                "no blocking backend was found any more".to_string()
            } else {
                format!("waiting for {}", blockers.join("; "))
            })
            .hint("end those transactions (or wait for them) and run the job again; no slot was left behind"))
        }
    }
}

/// Copy `pending` tables from `snapshot_name` (consistent at `point`), `parallelism`
/// chunks at a time.
async fn copy_tables(
    ctx: &JobContext,
    target: &tokio_postgres::Client,
    pending: &[Arc<TablePlan>],
    point: Lsn,
    snapshot_name: &str,
) -> Result<()> {
    let spec = &ctx.spec;
    let parallelism = spec.snapshot.parallelism.max(1);
    let mut work: Vec<CopyTask> = Vec::new();
    let mut remaining: HashMap<TableName, usize> = HashMap::new();
    for plan in pending {
        pg_apply::mark_table_started(
            target,
            &spec.name,
            &plan.source_name().to_string(),
            &plan.target_name().to_string(),
            point,
            &source_column_names(plan),
        )
        .await?;
        let truncated = pg_apply::truncate_target(target, plan).await?;
        pg_apply::defer_indexes(target, plan, &spec.name).await?;
        let pages = plan.source.pages.max(0) as u64;
        let chunks = pg_apply::plan_chunks(
            plan.source.relkind,
            pages,
            parallelism,
            spec.snapshot.split_larger_than / pg_apply::PAGE_BYTES,
        );
        remaining.insert(plan.source_name().clone(), chunks.len());
        work.extend(chunks.into_iter().map(|chunk| CopyTask {
            plan: plan.clone(),
            chunk,
            truncated,
        }));
        ctx.status.update(|s| {
            if let Some(t) = s
                .tables
                .iter_mut()
                .find(|t| t.source == plan.source_name().to_string())
            {
                t.rows_copied = 0;
                t.bytes_copied = 0;
                t.snapshot_done = false;
            }
        });
    }
    // Biggest first, so the long pole starts early.
    work.reverse();
    let queue = Arc::new(tokio::sync::Mutex::new(work));
    let remaining = Arc::new(tokio::sync::Mutex::new(remaining));
    let counters: Arc<HashMap<TableName, CopyCounters>> = Arc::new(
        pending
            .iter()
            .map(|p| (p.source_name().clone(), CopyCounters::default()))
            .collect(),
    );
    let progress = spawn_copy_progress(ctx.clone(), counters.clone());
    let mut workers = Vec::new();
    for i in 0..parallelism {
        let ctx = ctx.clone();
        let queue = queue.clone();
        let remaining = remaining.clone();
        let counters = counters.clone();
        let snapshot_name = snapshot_name.to_string();
        workers.push(tokio::spawn(async move {
            let app = ctx.app_name(&format!("copy-{i}"));
            // The copy relays between two sessions of our own protocol code; index builds
            // and the mark of a finished table go through an ordinary session, opened
            // when this worker first finishes a table. Every target session holds the
            // job's lock until the worker ends, so a later run waits for its last
            // transaction (see `lock_job`).
            let mut src: Option<wire::Connection> = None;
            let mut dst: Option<wire::Connection> = None;
            let mut idx: Option<tokio_postgres::Client> = None;
            loop {
                let Some(task) = queue.lock().await.pop() else {
                    return Ok::<(), Error>(());
                };
                let plan = &task.plan;
                if ctx.stopping() {
                    return Ok(());
                }
                let s = match &mut src {
                    Some(s) => s,
                    None => src.insert(pg_conn::connect_raw(&ctx.source, &app).await?),
                };
                let d = match &mut dst {
                    Some(d) => d,
                    None => {
                        let mut c = pg_conn::connect_raw(&ctx.target, &app).await?;
                        pg_apply::join_job_lock_raw(&mut c, &ctx.spec.name).await?;
                        // As `prepare_target_session`.
                        if c.simple_query("SET session_replication_role = replica").await.is_err() {
                            tracing::debug!(
                                "target user may not set session_replication_role; triggers on target tables will fire"
                            );
                        }
                        dst.insert(c)
                    }
                };
                let counter = &counters[plan.source_name()];
                // After an error both sessions are unusable; they end with the worker.
                let rows = pg_apply::copy_chunk(
                    s,
                    &snapshot_name,
                    d,
                    &task,
                    &ctx.spec.name,
                    counter,
                )
                .await?;
                metrics::counter!(crate::metrics::SNAPSHOT_ROWS_TOTAL).increment(rows);
                let name = plan.source_name().to_string();
                tracing::debug!(table = %name, rows, chunk = ?task.chunk, "copied a range");
                let finished = {
                    let mut r = remaining.lock().await;
                    let n = r.entry(plan.source_name().clone()).or_insert(1);
                    *n -= 1;
                    *n == 0
                };
                if finished {
                    let d = match &idx {
                        Some(d) => d,
                        None => {
                            let c = pg_conn::connect(&ctx.target, &app).await?;
                            pg_apply::join_job_lock(&c, &ctx.spec.name).await?;
                            prepare_target_session(&c).await;
                            idx.insert(c)
                        }
                    };
                    pg_apply::restore_indexes_and_mark_done(d, plan, &ctx.spec.name).await?;
                    tracing::info!(table = %name, "snapshot copy done");
                }
                ctx.status.update(|s| {
                    if let Some(t) = s.tables.iter_mut().find(|t| t.source == name) {
                        t.rows_copied = counter.rows.load(Ordering::Relaxed);
                        t.snapshot_done |= finished;
                    }
                });
            }
        }));
    }
    let mut first_error = None;
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(join) => {
                first_error.get_or_insert(Error::transient(format!("copy worker failed: {join}")));
            }
        }
    }
    progress.abort();
    // The progress task may have stopped before the last counts were published.
    publish_counters(ctx, &counters);
    match first_error {
        Some(e) => Err(e),
        None if ctx.stopping() => Err(Error::transient("stopped during the snapshot copy")),
        None => Ok(()),
    }
}

fn spawn_copy_progress(
    ctx: JobContext,
    counters: Arc<HashMap<TableName, CopyCounters>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            publish_counters(&ctx, &counters);
        }
    })
}

/// Copy the live counters of the running copies into the status.
fn publish_counters(ctx: &JobContext, counters: &HashMap<TableName, CopyCounters>) {
    ctx.status.update(|s| {
        for t in &mut s.tables {
            if let Some((_, c)) = counters.iter().find(|(n, _)| n.to_string() == t.source) {
                t.rows_copied = c.rows.load(Ordering::Relaxed);
                t.bytes_copied = c.bytes.load(Ordering::Relaxed);
            }
        }
    });
}

/// Settings for apply and copy sessions on the target: triggers and foreign-key checks do
/// not fire for replicated rows (as under PostgreSQL's own apply worker), when the
/// target user may set `session_replication_role`.
async fn prepare_target_session(client: &tokio_postgres::Client) -> bool {
    match client
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Ok(()) => true,
        Err(_) => {
            tracing::debug!(
                "target user may not set session_replication_role; triggers on target tables will fire"
            );
            false
        }
    }
}

/// Give the applier its second target session (groups overlap on the two, see
/// `Applier::add_session`), unless a target table has a trigger or rule that fires in
/// replica mode.
async fn second_apply_session(
    ctx: &JobContext,
    applier: &mut Applier,
    plans: &[Arc<TablePlan>],
) -> Result<()> {
    let control = applier.client();
    let oids: Vec<u32> = plans.iter().map(|p| p.target.oid).collect();
    let fired = pg_apply::fires_in_replica(control, &oids).await?;
    if !fired.is_empty() {
        tracing::info!(
            tables = %fired.join(", "),
            "target tables have triggers or rules that fire for replicated rows; groups are applied one at a time"
        );
        return Ok(());
    }
    let client = pg_conn::connect(&ctx.target, &ctx.app_name("apply")).await?;
    pg_apply::join_job_lock(&client, &ctx.spec.name).await?;
    if !prepare_target_session(&client).await {
        return Ok(());
    }
    applier.add_session(client).await
}

/// How long the stream waits for the group in flight, with nothing read to apply, before
/// it goes on reading (with a second target session): about the time the socket is read
/// in while data keeps coming.
const IN_FLIGHT_PAUSE: Duration = Duration::from_millis(20);

/// Events read from the stream at once (those that have arrived) before they are mapped
/// and applied.
const BATCH_EVENTS: usize = 2000;

/// ... and at most about this many bytes of row values.
const BATCH_BYTES: usize = 8 << 20;

/// The bytes of row values an event holds.
fn event_bytes(event: &StreamEvent) -> usize {
    use cutover_connectors::pg_source::decode::{ColumnValue, TupleData};
    let tuple = |t: &TupleData| {
        t.columns
            .iter()
            .map(|v| match v {
                ColumnValue::Text(b) | ColumnValue::Binary(b) => b.len(),
                _ => 0,
            })
            .sum::<usize>()
    };
    match event {
        StreamEvent::Message(LogicalMessage::Insert(i)) => tuple(&i.new),
        StreamEvent::Message(LogicalMessage::Update(u)) => {
            tuple(&u.new) + u.old.as_ref().map_or(0, |o| tuple(o.tuple()))
        }
        StreamEvent::Message(LogicalMessage::Delete(d)) => tuple(d.old.tuple()),
        _ => 0,
    }
}

/// pgoutput protocol 2 with in-progress transactions streamed where the server has it
/// (PostgreSQL 14+), spooled under `<data_dir>/<job>/spool`: the server then no longer
/// spills large transactions on its own disk, and they reach us while they run. Protocol 1
/// otherwise, or when the spool directory cannot be made.
fn start_options(ctx: &JobContext, session: &ReplicationSession) -> StartOptions {
    if session.server_version_num().is_none_or(|v| v < 140_000) {
        return StartOptions::default();
    }
    let dir = ctx.spec.data_dir.join(&ctx.spec.name).join("spool");
    match std::fs::create_dir_all(&dir) {
        Ok(()) => StartOptions::streaming(dir),
        Err(e) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "cannot spool streamed transactions; asking for whole transactions at commit (pgoutput protocol 1), which the source spills on its own disk"
            );
            StartOptions::default()
        }
    }
}

/// What `stream` tracks across events.
struct Streaming<'a> {
    ctx: &'a JobContext,
    applier: Applier,
    stream: ReplicationStream,
    /// What the slot was last confirmed to.
    confirmed: Lsn,
    /// What earlier attempts of this run applied (counters cover the whole run).
    base: (u64, u64),
    /// A verifier waiting for the apply to hold at an LSN.
    barrier: Option<BarrierRequest>,
    /// A verifier asking the apply to pause at the next transaction boundary.
    pause: Option<PauseRequest>,
}

impl Streaming<'_> {
    /// Confirm `applied` (a group the target committed), never past the first change a
    /// paused table has not applied.
    fn confirm(&mut self, applied: Lsn) {
        let to = match self.applier.hold() {
            Some(hold) => applied.min(hold),
            None => applied,
        };
        self.stream.confirm(to);
        self.confirmed = self.confirmed.max(to);
        publish_applied(self.ctx, &self.applier, self.base, applied);
    }

    /// A verifier asks for a pause: taken at once between transactions, else at the end
    /// of the transaction being received. (Not at the start of the next one: an idle
    /// source may send none for a long time, PostgreSQL 15 and later not even for the
    /// verifier's own logical message, and the verifier would wait in vain.)
    async fn pause_requested(&mut self, req: PauseRequest) -> Result<()> {
        self.pause = Some(req);
        if self.applier.in_transaction() {
            tracing::debug!(
                "a verifier asks for a pause inside a source transaction; pausing at its end"
            );
        } else {
            self.maybe_pause().await?;
        }
        Ok(())
    }

    /// Pause if asked (between transactions only): commit what is taken, say so, and wait
    /// (at most [`crate::anchor::MAX_PAUSE`]) for the barrier the verifier sends.
    async fn maybe_pause(&mut self) -> Result<()> {
        let Some(req) = self.pause.take() else {
            return Ok(());
        };
        if let Some(p) = self.applier.flush().await? {
            self.confirm(p.end_lsn);
        }
        let _ = req.paused.send(());
        if let Ok(Ok(barrier)) = tokio::time::timeout(crate::anchor::MAX_PAUSE, req.barrier).await {
            self.barrier_requested(barrier);
        }
        Ok(())
    }

    /// A verifier asks to hold at `req.lsn`: answered at once when the apply is past it,
    /// else when the stream reaches it.
    fn barrier_requested(&mut self, req: BarrierRequest) {
        if self.applier.last_seen_commit() >= req.lsn {
            let _ = req.reply.send(BarrierReply::Passed);
        } else if let Some(old) = self.barrier.replace(req) {
            let _ = old.reply.send(BarrierReply::Passed);
        }
    }

    /// Serve a waiting barrier if the apply has reached it: `next_commit` is the commit LSN
    /// of the next source transaction (`None`: nothing in flight up to `wal_end`).
    async fn maybe_hold(&mut self, next_commit: Option<Lsn>, wal_end: Lsn) -> Result<()> {
        let Some(lsn) = self.barrier.as_ref().map(|b| b.lsn) else {
            return Ok(());
        };
        let reached = match next_commit {
            Some(next) => next >= lsn,
            None => wal_end >= lsn,
        };
        if !reached || self.applier.in_transaction() {
            return Ok(());
        }
        // Everything before the anchor is in the open group (or committed): commit it, take
        // the target's snapshot, and only then go on.
        if let Some(p) = self.applier.flush().await? {
            self.confirm(p.end_lsn);
        }
        let Some(req) = self.barrier.take() else {
            return Ok(());
        };
        let reply = match crate::anchor::hold_snapshot(&req.client).await {
            Ok(()) => {
                let touched = self.applier.take_touched();
                publish_pending(self.ctx, &self.applier);
                BarrierReply::Held(req.client, touched)
            }
            Err(e) => BarrierReply::Failed(e),
        };
        let _ = req.reply.send(reply);
        Ok(())
    }

    /// A source transaction's Commit; a pause asked for inside it is taken here.
    async fn commit(&mut self, c: &Commit) -> Result<()> {
        if let Some(p) = self.applier.commit(c).await? {
            self.confirm(p.end_lsn);
        }
        self.maybe_pause().await
    }

    async fn event(&mut self, event: StreamEvent) -> Result<()> {
        match event {
            StreamEvent::Begin(b) => {
                self.maybe_pause().await?;
                self.maybe_hold(Some(b.final_lsn), Lsn::ZERO).await?;
                self.applier.begin(&b)?
            }
            StreamEvent::Commit(c) => self.commit(&c).await?,
            StreamEvent::Message(msg) => match msg {
                LogicalMessage::Relation(r) => {
                    // Only reached for relations the mapper passed on whole.
                    let table = TableName::new(r.namespace.clone(), r.name.clone());
                    self.applier.relation(&r, table, None, &[], None).await?;
                }
                LogicalMessage::Insert(i) => self.applier.insert(i).await?,
                LogicalMessage::Update(u) => self.applier.update(u).await?,
                LogicalMessage::Delete(d) => self.applier.delete(&d).await?,
                LogicalMessage::Truncate(t) => self.applier.truncate(&t).await?,
                LogicalMessage::Type(_)
                | LogicalMessage::Origin(_)
                | LogicalMessage::Message(_) => {}
                LogicalMessage::Begin(b) => self.applier.begin(&b)?,
                LogicalMessage::Commit(c) => self.commit(&c).await?,
                other => {
                    return Err(Error::operator(format!(
                        "unexpected message in a protocol 1 stream: {other:?}"
                    )));
                }
            },
            StreamEvent::KeepAlive { wal_end } => {
                self.maybe_hold(None, wal_end).await?;
                // Nothing in flight: everything the server sent up to wal_end is applied,
                // so the slot may move there and release WAL (hard case 11).
                if !self.applier.in_transaction()
                    && !self.applier.has_uncommitted()
                    && wal_end > self.confirmed
                {
                    self.confirm(wal_end);
                }
            }
        }
        Ok(())
    }

    async fn steps(&mut self, steps: Vec<Step>) -> Result<()> {
        for step in steps {
            self.step(step).await?;
        }
        Ok(())
    }

    async fn step(&mut self, step: Step) -> Result<()> {
        match step {
            Step::Event(ev) => self.event(ev).await?,
            Step::Nothing => {}
            Step::Shape(shape) => {
                let mapped = shape.plan.is_some();
                let applies = self
                    .applier
                    .relation(
                        &shape.relation,
                        shape.table.clone(),
                        shape.plan,
                        &shape.ddl,
                        shape.known_columns.as_deref(),
                    )
                    .await?;
                for note in &shape.notes {
                    tracing::warn!(table = %shape.table, "{note}");
                }
                let name = shape.table.to_string();
                self.ctx.status.update(|s| {
                    if let Some(t) = s.tables.iter_mut().find(|t| t.source == name) {
                        if mapped && applies {
                            t.needs_attention = None;
                        }
                        for note in &shape.notes {
                            if !t.notes.contains(note) {
                                t.notes.push(note.clone());
                            }
                        }
                        let excess = t.notes.len().saturating_sub(MAX_NOTES);
                        t.notes.drain(..excess);
                    }
                });
            }
            Step::Pause {
                oid,
                relation,
                table,
                error,
            } => {
                let reason = error.to_string();
                tracing::error!(table = %table, "the table's apply is paused: {reason}");
                let at_change = relation.is_none();
                self.applier
                    .pause(
                        oid,
                        relation.as_ref(),
                        table.clone(),
                        reason.clone(),
                        at_change,
                    )
                    .await?;
                let name = table.to_string();
                self.ctx.status.update(|s| {
                    if let Some(t) = s.tables.iter_mut().find(|t| t.source == name) {
                        t.needs_attention = Some(reason);
                    }
                });
            }
        }
        Ok(())
    }
}

/// How long a run waits for an earlier session of the job to leave the target before the
/// attempt fails (and is retried).
const JOB_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Notes kept per table in the status.
const MAX_NOTES: usize = 20;

/// Stream from the slot and apply, until shutdown or an error.
async fn stream(
    ctx: &JobContext,
    source: tokio_postgres::Client,
    target: tokio_postgres::Client,
    plans: Vec<Arc<TablePlan>>,
    tables: TablesAtStart,
    known: HashMap<TableName, Vec<String>>,
) -> Result<Ended> {
    let spec = &ctx.spec;
    let slot = ctx.slot();
    let progress = pg_apply::read_progress(&target, &spec.name)
        .await?
        .unwrap_or_default();
    let replica_role = prepare_target_session(&target).await;
    // Tables paused by an earlier run get their changes again from where they stopped
    // (also those that stay paused: the session reports its start as flushed, which must
    // not pass what they hold).
    let start = tables
        .resuming
        .values()
        .copied()
        .chain(tables.paused.values().filter_map(|(since, _)| *since))
        .fold(progress.end_lsn, Lsn::min);
    let session =
        ReplicationSession::connect(&ctx.source, &slot, &slot, start, &ctx.app_name("stream"))
            .await?;
    let options = start_options(ctx, &session);
    let protocol = options.proto_version;
    let stream = session.start_with(options).await?;
    tracing::info!(slot = %slot, from = %start, protocol, "streaming");
    // The mapper evaluates on the source's control session and reads the target's
    // catalog on a session of its own (the apply session holds open transactions).
    let catalog = pg_conn::connect(&ctx.target, &ctx.app_name("map")).await?;
    let mut mapper = Mapper::new(source, catalog, &plans, known);
    let mut applier = Applier::new(
        target,
        &spec.name,
        tables,
        progress,
        GroupLimits::default(),
        replica_role,
    );
    let overlap = !plans.iter().any(|p| p.evaluated());
    if overlap && replica_role && spec.target.apply_sessions > 1 {
        second_apply_session(ctx, &mut applier, &plans).await?;
    }
    applier.prepare_commits().await?;
    applier.overlap_groups(overlap);
    let base = {
        let s = ctx.status.snapshot();
        (s.applied_transactions, s.applied_rows)
    };
    let mut st = Streaming {
        ctx,
        applier,
        stream,
        confirmed: start,
        base,
        barrier: None,
        pause: None,
    };
    let mut barriers = ctx.barriers.lock().await;
    ctx.status.update(|s| {
        s.phase = Phase::Streaming;
        s.applied_lsn = Some(progress.end_lsn.to_string());
    });
    let mut shutdown = ctx.shutdown.clone();
    let mut stopping = false;
    let mut stop_deadline: Option<tokio::time::Instant> = None;
    let idle = Duration::from_millis(5);
    // Steps mapped but not applied yet: the next batch is evaluated on the source while
    // these are applied on the target.
    let mut ready: Vec<Step> = Vec::new();
    // A verifier's pause request, taken between transactions.
    let mut incoming: Option<PauseRequest> = None;
    loop {
        if let Some(req) = incoming.take() {
            // The steps mapped already go first; the pause comes at a boundary after them.
            st.steps(std::mem::take(&mut ready)).await?;
            st.pause_requested(req).await?;
        }
        if (stopping || stop_deadline.is_some()) && !ready.is_empty() {
            st.steps(std::mem::take(&mut ready)).await?;
        }
        if stopping && !st.applier.in_transaction() {
            if let Some(p) = st.applier.flush().await? {
                st.confirm(p.end_lsn);
            }
            let committed = st.applier.durable().end_lsn;
            // The confirmation reaches the server on its next status update; give it time even
            // on a loaded machine (a stop should not leave the slot behind what is applied).
            st.stream.shutdown(Duration::from_secs(10)).await;
            tracing::info!(applied = %committed, "stopped");
            return Ok(Ended::Stopped);
        }
        if stop_deadline.is_some_and(|d| tokio::time::Instant::now() > d) {
            // A source transaction is still arriving; what the target holds is
            // consistent and confirmed (once a group in flight is answered), the rest will
            // be streamed again.
            if let Some(p) = st.applier.flush().await? {
                st.confirm(p.end_lsn);
            }
            st.stream.shutdown(Duration::from_secs(10)).await;
            tracing::warn!(
                "stopping in the middle of a source transaction; it will be applied on the next run"
            );
            return Ok(Ended::Stopped);
        }
        let wait = if !ready.is_empty()
            || (st.applier.has_uncommitted() && !st.applier.in_transaction())
        {
            idle
        } else {
            Duration::from_secs(1)
        };
        // A group in flight and nothing waiting to be read: the target is the slower
        // side. Wait for it rather than take events one by one as they arrive; with a
        // second target session only for a moment, so that the next group is still built
        // meanwhile (its early part goes ahead beside this one).
        if st.applier.in_flight() && st.stream.drained() {
            let answered = if st.applier.has_second_session() {
                st.applier.wait_in_flight_at_most(IN_FLIGHT_PAUSE).await?
            } else {
                st.applier.wait_in_flight().await?
            };
            if let Some(p) = answered {
                st.confirm(p.end_lsn);
            }
        }
        let event = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s), if !stopping => {
                stopping = true;
                stop_deadline = Some(tokio::time::Instant::now() + Duration::from_secs(30));
                continue;
            }
            Some(req) = barriers.recv() => {
                incoming = Some(req);
                continue;
            }
            ev = tokio::time::timeout(wait, st.stream.next()) => ev,
        };
        let event = match event {
            Err(_elapsed) => {
                st.steps(std::mem::take(&mut ready)).await?;
                if st.applier.in_transaction() {
                    continue;
                }
                // With a second target session and a group in flight, a pause in the
                // stream may only be the time between two reads of the socket: wait for
                // the group a moment, and commit the open one once it has answered (until
                // then it may still fill up and go ahead beside it).
                let answered = if st.applier.in_flight() && st.applier.has_second_session() {
                    st.applier.wait_in_flight_at_most(IN_FLIGHT_PAUSE).await?
                } else {
                    st.applier.flush().await?
                };
                if let Some(p) = answered {
                    st.confirm(p.end_lsn);
                }
                continue;
            }
            Ok(ev) => ev?,
        };
        let Some(event) = event else {
            return Err(Error::transient("the source ended the replication stream"));
        };
        // Take what has already arrived: rows of evaluated tables go to the source in round
        // trips of many rows, and the rest pass through here once per batch, not per event.
        let mut batch = Vec::with_capacity(64);
        let mut bytes = event_bytes(&event);
        batch.push(event);
        while batch.len() < BATCH_EVENTS && bytes < BATCH_BYTES {
            match st.stream.next().now_or_never() {
                Some(Ok(Some(ev))) => {
                    bytes += event_bytes(&ev);
                    batch.push(ev);
                }
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) | None => break,
            }
        }
        let (steps, applied) =
            tokio::join!(mapper.process(batch), st.steps(std::mem::take(&mut ready)));
        applied?;
        ready = steps?;
    }
}

/// Publish what is applied. `base` is what earlier attempts of this run applied, so the
/// counters cover the whole run across retries.
fn publish_applied(ctx: &JobContext, applier: &Applier, base: (u64, u64), applied: Lsn) {
    let stats = applier.stats();
    ctx.status.update(|s| {
        s.applied_lsn = Some(applied.to_string());
        s.applied_transactions = base.0 + stats.transactions;
        s.applied_rows = base.1 + stats.rows;
    });
    publish_pending(ctx, applier);
}

/// Publish how many changed keys wait to be verified again.
fn publish_pending(ctx: &JobContext, applier: &Applier) {
    let (keys, since) = applier.touched_pending();
    metrics::gauge!(crate::metrics::VERIFY_REVERIFY_QUEUE).set(keys as f64);
    ctx.status.update(|s| {
        s.reverify.pending_keys = keys as u64;
        s.reverify.pending_since = since;
    });
}

/// Poll the source for its WAL position and the slot's state, and derive the lag: the
/// applied LSN is compared with the source positions sampled over time, so the lag in
/// seconds is how long ago the source was where the target is now (one clock, no skew).
async fn poll_source(ctx: JobContext) {
    let slot = ctx.slot();
    let mut client: Option<tokio_postgres::Client> = None;
    let mut samples: std::collections::VecDeque<(Instant, Lsn)> = Default::default();
    let mut last_table_scan: Option<Instant> = None;
    let mut reported_unmapped: Vec<String> = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = pg_conn::connect(&ctx.source, &ctx.app_name("monitor"))
                .await
                .ok();
        }
        let Some(c) = client.as_ref() else { continue };
        let Ok(current) = provision::current_wal_lsn(c).await else {
            continue;
        };
        if last_table_scan.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            last_table_scan = Some(Instant::now());
            if let Ok(unmapped) = unmapped_tables(&ctx, c).await {
                if !unmapped.is_empty() && unmapped != reported_unmapped {
                    tracing::warn!(tables = %unmapped.join(", "), "source tables the job does not carry");
                }
                reported_unmapped.clone_from(&unmapped);
                ctx.status.update(|s| s.unmapped_tables = unmapped);
            }
        }
        let slot_state = provision::slot_state(c, &slot).await.ok().flatten();
        let now = Instant::now();
        samples.push_back((now, current));
        while samples.len() > 4 * 60 * 10 {
            samples.pop_front();
        }
        let status = ctx.status.snapshot();
        let applied: Option<Lsn> = status.applied_lsn.as_deref().and_then(|s| s.parse().ok());
        let (lag_bytes, lag_seconds) = match applied {
            Some(a) => {
                let bytes = current.bytes_since(a);
                let behind_since = samples.iter().find(|(_, l)| *l > a).map(|(t, _)| *t);
                let secs = behind_since
                    .map(|t| now.duration_since(t).as_secs_f64())
                    .unwrap_or(0.0);
                (Some(bytes), Some(secs))
            }
            None => (None, None),
        };
        if let Some(b) = lag_bytes {
            metrics::gauge!(crate::metrics::LAG_BYTES).set(b as f64);
        }
        if let Some(s) = lag_seconds {
            metrics::gauge!(crate::metrics::LAG_SECONDS).set(s);
        }
        let retained = slot_state
            .as_ref()
            .and_then(|s| s.retained_bytes)
            .map(|b| b.max(0) as u64);
        if let Some(r) = retained {
            metrics::gauge!(crate::metrics::SLOT_RETAINED_WAL_BYTES).set(r as f64);
        }
        ctx.status.update(|s| {
            s.source_lsn = Some(current.to_string());
            s.lag_bytes = lag_bytes;
            s.lag_seconds = lag_seconds;
            s.slot_retained_bytes = retained;
            s.updated_at = rfc3339(SystemTime::now());
        });
    }
}

/// Source tables that match the job's patterns (or, with `[[table]]` entries, sit in the
/// schemas they copy from) but are not among the job's tables.
async fn unmapped_tables(ctx: &JobContext, source: &tokio_postgres::Client) -> Result<Vec<String>> {
    let carried: std::collections::HashSet<String> = ctx
        .status
        .snapshot()
        .tables
        .iter()
        .map(|t| t.source.clone())
        .collect();
    if carried.is_empty() {
        return Ok(Vec::new());
    }
    let schemas: std::collections::HashSet<String> = ctx
        .spec
        .tables
        .iter()
        .filter_map(|t| TableName::parse(&t.source, "public").map(|n| n.schema))
        .collect();
    let all = catalog::list_tables(source).await?;
    Ok(all
        .into_iter()
        .filter(|t| {
            if ctx.spec.tables.is_empty() {
                ctx.spec
                    .source
                    .tables
                    .iter()
                    .any(|p| catalog::matches_pattern(t, p))
            } else {
                schemas.contains(&t.schema)
            }
        })
        .map(|t| t.to_string())
        .filter(|t| !carried.contains(t))
        .collect())
}

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1795651200);
        assert_eq!(rfc3339(t), "2026-11-26T00:00:00Z");
    }
}
