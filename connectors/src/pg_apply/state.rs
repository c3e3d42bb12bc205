//! The apply's own bookkeeping on the target, in schema `cutover`.
//!
//! `cutover.progress` holds, per job, the last source transaction the target holds; it
//! is written in the same target transaction as the changes. `cutover.tables` holds the
//! snapshot state of each table: the LSN of the snapshot its copy was taken at, and
//! whether the copy finished. A change to a table is applied only when its transaction
//! committed at or after that LSN, so a table copied later (after a restart) never sees
//! a change twice.

use std::collections::HashMap;

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::lsn::Lsn;

/// How far the target got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Commit LSN of the last source transaction applied.
    pub commit_lsn: Lsn,
    /// End LSN of its commit record: what the slot may be confirmed to.
    pub end_lsn: Lsn,
}

/// The snapshot state of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableState {
    /// Changes to the table committed before this LSN are in the copy.
    pub snapshot_lsn: Lsn,
    pub rows_copied: u64,
    pub done: bool,
    /// The source columns the job knew when it last looked (copy start, or a column added
    /// by the stream): a column of the stream outside this list is new.
    pub source_columns: Option<Vec<String>>,
    /// The table's apply is paused from the source transaction that committed here on;
    /// its changes from there are applied when it resumes.
    pub paused_lsn: Option<Lsn>,
    /// Why it is paused, and what to do.
    pub attention: Option<String>,
}

const SCHEMA_SQL: &str = "
CREATE SCHEMA IF NOT EXISTS cutover;
CREATE TABLE IF NOT EXISTS cutover.progress (
    job text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    end_lsn pg_lsn NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS cutover.tables (
    job text NOT NULL,
    source_table text NOT NULL,
    target_table text NOT NULL,
    snapshot_lsn pg_lsn NOT NULL,
    rows_copied bigint NOT NULL DEFAULT 0,
    started_at timestamptz NOT NULL DEFAULT now(),
    done_at timestamptz,
    PRIMARY KEY (job, source_table)
);
ALTER TABLE cutover.tables ADD COLUMN IF NOT EXISTS deferred_indexes text[];
ALTER TABLE cutover.tables ADD COLUMN IF NOT EXISTS source_columns text[];
ALTER TABLE cutover.tables ADD COLUMN IF NOT EXISTS paused_lsn pg_lsn;
ALTER TABLE cutover.tables ADD COLUMN IF NOT EXISTS attention text;";

fn err(what: &str, e: tokio_postgres::Error) -> Error {
    Error::from_pg(what, "the target", &e)
}

/// Create the bookkeeping schema if it is missing.
pub async fn ensure_state_schema(client: &Client) -> Result<()> {
    // Two jobs starting at once could race on CREATE ... IF NOT EXISTS; serialize them.
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_catalog.pg_advisory_xact_lock(7432001); {SCHEMA_SQL} COMMIT;"
        ))
        .await
        .map_err(|e| {
            let code = e.code().map(|c| c.code().to_string());
            let mut er = err("create schema \"cutover\"", e);
            if er.hint.is_none() {
                er.hint = crate::error::hint_for(
                    code.as_deref(),
                    |c| c == "42501",
                    "the target user needs CREATE on the target database, or create schema cutover for it",
                );
            }
            er
        })
}

/// The job's progress on the target, if it has applied anything.
pub async fn read_progress(client: &Client, job: &str) -> Result<Option<Progress>> {
    let row = client
        .query_opt(
            "SELECT commit_lsn::text, end_lsn::text FROM cutover.progress WHERE job = $1",
            &[&job],
        )
        .await
        .map_err(|e| err("read cutover.progress", e))?;
    Ok(row.map(|r| Progress {
        commit_lsn: r.get::<_, String>(0).parse().unwrap_or_default(),
        end_lsn: r.get::<_, String>(1).parse().unwrap_or_default(),
    }))
}

/// The first key of the job locks (`'cutv'`); the second is [`job_lock_key`].
const LOCK_CLASS: i32 = 0x6375_7476;

/// The second key of a job's lock: FNV-1a of its name (fixed here, so that daemons of
/// different versions agree on it).
pub fn job_lock_key(job: &str) -> i32 {
    let hash = job.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}

/// Take the job's lock on the target for this run, waiting at most `wait` for the
/// sessions of an earlier run to end.
///
/// Every session of a run that writes to the target (the control session, which repairs,
/// copies and applies, and the copy's workers) holds the job's advisory lock in shared
/// mode for as long as it lives. A session of an earlier run may still be at work on the
/// target: its daemon was killed while the target ran a group, or while a worker built a
/// table's indexes and marked it done. The server finishes that transaction, and may
/// commit it, after the new run has read `cutover.progress` and `cutover.tables`; the new
/// run would then apply those source transactions a second time, or take a finished
/// table for an interrupted copy. So a new run first takes the lock exclusively, which it
/// gets only once no session of an earlier run is left, and then holds it shared like its
/// workers ([`join_job_lock`]).
///
/// The exclusive lock is only ever tried, never waited for in the server's queue: a
/// waiting run would queue ahead of the running one's workers and hold them back.
pub async fn lock_job(client: &Client, job: &str, wait: std::time::Duration) -> Result<()> {
    let key = job_lock_key(job);
    let deadline = std::time::Instant::now() + wait;
    let mut logged = false;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&LOCK_CLASS, &key])
            .await
            .map_err(|e| err("take the job's lock", e))?;
        if row.get::<_, bool>(0) {
            // Shared first, then let go of the exclusive hold: the session never is
            // without the lock in between.
            client
                .batch_execute(&format!(
                    "SELECT pg_advisory_lock_shared({LOCK_CLASS}, {key}); \
                     SELECT pg_advisory_unlock({LOCK_CLASS}, {key});"
                ))
                .await
                .map_err(|e| err("take the job's lock", e))?;
            return Ok(());
        }
        let holders = client
            .query(
                "SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.state, '') \
                 FROM pg_locks l LEFT JOIN pg_stat_activity a USING (pid) \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                   AND l.classid = $1 AND l.objid = $2 AND l.database = \
                       (SELECT oid FROM pg_database WHERE datname = current_database()) \
                 ORDER BY l.pid",
                &[
                    &u32::from_ne_bytes(LOCK_CLASS.to_ne_bytes()),
                    &u32::from_ne_bytes(key.to_ne_bytes()),
                ],
            )
            .await
            .map_err(|e| err("look up the holders of the job's lock", e))?;
        let who = if holders.is_empty() {
            "a session that just ended".to_string()
        } else {
            holders
                .iter()
                .map(|r| {
                    format!(
                        "pid {}, application_name \"{}\", {}",
                        r.get::<_, i32>(0),
                        r.get::<_, String>(1),
                        r.get::<_, String>(2)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if std::time::Instant::now() >= deadline {
            let mut e = Error::transient(format!(
                "other sessions hold job \"{job}\"'s lock on the target ({who})"
            ));
            e.detail = Some("an earlier run's sessions are still finishing transactions there, or a second daemon runs this job against the same target".into());
            e.hint = Some("it is retried for 90 s; if it lasts, find those sessions in pg_stat_activity on the target and stop the process that owns them".into());
            return Err(e.retry_for(std::time::Duration::from_secs(90)));
        }
        if !logged {
            tracing::info!(holders = %who, "waiting for an earlier session of this job on the target to end");
            logged = true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Hold the job's lock (shared) on another session of this run, for as long as that
/// session lives. The run's control session holds it already ([`lock_job`]), so no other
/// run can hold it exclusively; if one does, this run's control session is gone, and the
/// session must not write.
pub async fn join_job_lock(client: &Client, job: &str) -> Result<()> {
    let row = client
        .query_one(&join_job_lock_sql(job), &[])
        .await
        .map_err(|e| err("take the job's lock", e))?;
    if row.get::<_, bool>(0) {
        Ok(())
    } else {
        Err(join_refused(job))
    }
}

/// [`join_job_lock`] on one of our own protocol sessions (the copy's relay).
pub async fn join_job_lock_raw(
    conn: &mut crate::pg_source::wire::Connection,
    job: &str,
) -> Result<()> {
    let rows = conn
        .simple_query(&join_job_lock_sql(job))
        .await
        .map_err(|e| Error::from_wire("take the job's lock", "the target", e))?;
    match rows.first().and_then(|r| r.first()) {
        Some(Some(v)) if &v[..] == b"t" => Ok(()),
        _ => Err(join_refused(job)),
    }
}

fn join_job_lock_sql(job: &str) -> String {
    format!(
        "SELECT pg_catalog.pg_try_advisory_lock_shared({LOCK_CLASS}, {})",
        job_lock_key(job)
    )
}

fn join_refused(job: &str) -> Error {
    let mut e = Error::transient(format!(
        "another run holds job \"{job}\"'s lock on the target"
    ));
    e.detail =
        Some("this run's control session has ended, and another daemon took the job over".into());
    e.hint = Some("this run starts over; if two daemons run this job, stop one of them".into());
    e
}

/// Every table's snapshot state, keyed by the source table's display name.
pub async fn read_table_states(client: &Client, job: &str) -> Result<HashMap<String, TableState>> {
    let rows = client
        .query(
            "SELECT source_table, snapshot_lsn::text, rows_copied, done_at IS NOT NULL, \
                    source_columns, paused_lsn::text, attention \
             FROM cutover.tables WHERE job = $1",
            &[&job],
        )
        .await
        .map_err(|e| err("read cutover.tables", e))?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                TableState {
                    snapshot_lsn: r.get::<_, String>(1).parse().unwrap_or_default(),
                    rows_copied: r.get::<_, i64>(2).max(0) as u64,
                    done: r.get(3),
                    source_columns: r.get(4),
                    paused_lsn: r.get::<_, Option<String>>(5).and_then(|l| l.parse().ok()),
                    attention: r.get(6),
                },
            )
        })
        .collect())
}

/// Record that the copy of `source_table` starts at `snapshot_lsn` (not done).
pub async fn mark_table_started(
    client: &Client,
    job: &str,
    source_table: &str,
    target_table: &str,
    snapshot_lsn: Lsn,
    source_columns: &[String],
) -> Result<()> {
    client
        .execute(
            "INSERT INTO cutover.tables (job, source_table, target_table, snapshot_lsn, source_columns) \
             VALUES ($1, $2, $3, $4::text::pg_lsn, $5) \
             ON CONFLICT (job, source_table) DO UPDATE SET target_table = EXCLUDED.target_table, \
               snapshot_lsn = EXCLUDED.snapshot_lsn, rows_copied = 0, started_at = now(), done_at = NULL, \
               source_columns = EXCLUDED.source_columns, paused_lsn = NULL, attention = NULL",
            &[&job, &source_table, &target_table, &snapshot_lsn.to_string(), &source_columns],
        )
        .await
        .map_err(|e| err("write cutover.tables", e))?;
    Ok(())
}

/// SQL that marks a table done with `rows` copied, for use inside the copy's transaction.
pub(crate) const MARK_DONE_SQL: &str = "UPDATE cutover.tables SET rows_copied = rows_copied + $3, \
     done_at = CASE WHEN $4 THEN now() ELSE done_at END WHERE job = $1 AND source_table = $2";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_lock_key_never_changes() {
        // FNV-1a, 32 bits: daemons of every version must take the same lock for a job.
        assert_eq!(job_lock_key("fence"), 0xbc81_4616_u32 as i32);
        assert_eq!(job_lock_key(""), 0x811c_9dc5_u32 as i32);
        assert_ne!(job_lock_key("a"), job_lock_key("b"));
    }
}
