//! The objects a job owns on the source: its publication and its replication slot.
//!
//! The publication is created before the slot (decoding reads the publication through
//! the historic catalog, so a publication created after the slot is invisible to it;
//! hard case 14), always with an explicit table list, never `FOR ALL TABLES`, and with
//! `publish_via_partition_root` so changes to partitions arrive under the root's name
//! (hard case 16).

use tokio_postgres::Client;

use crate::error::{Error, Result};
use crate::ident::{TableName, quote_ident};
use crate::lsn::Lsn;

/// The slot and publication names of job `job` (`[a-z0-9_-]{1,48}`): `cutover_` then the
/// name with `-` turned into `_`, since slot names allow only `[a-z0-9_]`.
pub fn object_name(job: &str) -> String {
    format!("cutover_{}", job.replace('-', "_"))
}

/// What `pg_replication_slots` says about a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub active: bool,
    pub active_pid: Option<i32>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    pub restart_lsn: Option<Lsn>,
    pub confirmed_flush_lsn: Option<Lsn>,
    /// `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: Option<i64>,
}

fn lsn_of(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// The slot's state, or `None` when there is no such slot.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text, active, active_pid, wal_status, \
                    restart_lsn::text, confirmed_flush_lsn::text, \
                    pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::int8 \
             FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::from_pg("read pg_replication_slots", "the source", &e))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        database: r.get(1),
        active: r.get(2),
        active_pid: r.get(3),
        wal_status: r.get(4),
        restart_lsn: lsn_of(r.get(5)),
        confirmed_flush_lsn: lsn_of(r.get(6)),
        retained_bytes: r.get(7),
    }))
}

/// Refuse a slot we must not use: lost (its WAL is gone, so changes were skipped), held by
/// another process, or not a pgoutput slot of this database.
pub fn check_slot_usable(slot: &str, state: &SlotState, dbname: &str) -> Result<()> {
    if state.wal_status.as_deref() == Some("lost") {
        return Err(Error::operator(format!("replication slot \"{slot}\" is lost"))
            .detail("the server removed WAL the slot still needed (max_slot_wal_keep_size), so changes since the slot's position can no longer be streamed")
            .hint("the target can no longer be kept exact from this slot: run \"cutover teardown\", clear the target tables, and run the job again to copy a fresh snapshot"));
    }
    if state.active {
        let pid = state
            .active_pid
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into());
        return Err(Error::transient(format!(
            "replication slot \"{slot}\" is active for PID {pid}"
        ))
        .hint("another cutover run of this job (or a stale connection) holds the slot; stop it, or wait for wal_sender_timeout to end a dead one")
        // A killed predecessor's walsender lets go within wal_sender_timeout (60s by
        // default); a live second consumer does not, and is refused then.
        .retry_for(std::time::Duration::from_secs(90)));
    }
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(Error::operator(format!(
            "replication slot \"{slot}\" exists but does not use pgoutput"
        ))
        .hint("drop it (SELECT pg_drop_replication_slot(...)) or rename the job"));
    }
    if state.database.as_deref() != Some(dbname) {
        return Err(Error::operator(format!(
            "replication slot \"{slot}\" belongs to database \"{}\", not \"{dbname}\"",
            state.database.as_deref().unwrap_or("?")
        ))
        .hint("rename the job, or drop the other slot if it is stale"));
    }
    Ok(())
}

/// Whether the publication exists.
pub async fn publication_exists(client: &Client, publication: &str) -> Result<bool> {
    Ok(client
        .query_opt(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| Error::from_pg("read the publication", "the source", &e))?
        .is_some())
}

/// Create the job's publication for `tables`, or add tables it lacks. Tables already in it
/// that the job no longer names are left alone (dropping them could lose a table someone
/// else relies on); status reports them.
pub async fn ensure_publication(
    client: &Client,
    publication: &str,
    tables: &[TableName],
) -> Result<()> {
    let existing = client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_catalog.pg_publication_tables \
             WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(|e| Error::from_pg("read the publication", "the source", &e))?;
    let exists = publication_exists(client, publication).await?;
    let have: std::collections::HashSet<TableName> = existing
        .iter()
        .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    let list = |ts: &[&TableName]| ts.iter().map(|t| t.quoted()).collect::<Vec<_>>().join(", ");
    if !exists {
        let all: Vec<&TableName> = tables.iter().collect();
        let sql = format!(
            "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
            quote_ident(publication),
            list(&all)
        );
        client.batch_execute(&sql).await.map_err(|e| {
            let mut err = Error::from_pg(&format!("create publication \"{publication}\""), "the source", &e);
            if err.hint.is_none() {
                err.hint = Some("the source user must own the tables and have CREATE on the database, or a table owner can create the publication beforehand with the same name and table list".into());
            }
            err
        })?;
        return Ok(());
    }
    let missing: Vec<&TableName> = tables.iter().filter(|t| !have.contains(t)).collect();
    if !missing.is_empty() {
        let sql = format!(
            "ALTER PUBLICATION {} ADD TABLE {}",
            quote_ident(publication),
            list(&missing)
        );
        client.batch_execute(&sql).await.map_err(|e| {
            Error::from_pg(
                &format!("add tables to publication \"{publication}\""),
                "the source",
                &e,
            )
        })?;
    }
    Ok(())
}

/// Drop the slot (when inactive) and the publication. Idempotent.
pub async fn drop_objects(client: &Client, slot: &str, publication: &str) -> Result<(bool, bool)> {
    let dropped_slot = client
        .query_opt(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| Error::from_pg(&format!("drop replication slot \"{slot}\""), "the source", &e))?
        .is_some();
    let had_pub = publication_exists(client, publication).await?;
    client
        .batch_execute(&format!(
            "DROP PUBLICATION IF EXISTS {}",
            quote_ident(publication)
        ))
        .await
        .map_err(|e| {
            Error::from_pg(
                &format!("drop publication \"{publication}\""),
                "the source",
                &e,
            )
        })?;
    Ok((dropped_slot, had_pub))
}

/// Backends whose open transactions keep `CREATE_REPLICATION_SLOT` waiting: every
/// transaction that started before the slot's snapshot must end first (hard case 13).
pub async fn blocking_backends(client: &Client, own_application_name: &str) -> Result<Vec<String>> {
    let rows = client
        .query(
            "SELECT pid, coalesce(usename::text, '?'), coalesce(application_name, ''), state, \
                    coalesce(extract(epoch FROM now() - xact_start)::int8, 0) \
             FROM pg_catalog.pg_stat_activity \
             WHERE (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL) \
               AND pid <> pg_catalog.pg_backend_pid() AND application_name <> $1 \
               AND backend_type = 'client backend' \
             ORDER BY xact_start LIMIT 10",
            &[&own_application_name],
        )
        .await
        .map_err(|e| Error::from_pg("read pg_stat_activity", "the source", &e))?;
    Ok(rows
        .iter()
        .map(|r| {
            format!(
                "pid {} (user {}, application \"{}\", {}, transaction open {}s)",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2),
                r.get::<_, Option<String>>(3).unwrap_or_default(),
                r.get::<_, i64>(4)
            )
        })
        .collect())
}

/// End our own walsender that is still waiting in `CREATE_REPLICATION_SLOT`, so it cannot
/// finish creating the slot after we gave up, then drop the slot if it appeared anyway.
pub async fn cancel_slot_creation(
    client: &Client,
    application_name: &str,
    slot: &str,
) -> Result<()> {
    client
        .query(
            "SELECT pg_catalog.pg_terminate_backend(pid) FROM pg_catalog.pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_catalog.pg_backend_pid()",
            &[&application_name],
        )
        .await
        .map_err(|e| Error::from_pg("end the waiting replication connection", "the source", &e))?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = client
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_stat_activity WHERE application_name = $1",
                &[&application_name],
            )
            .await
            .map_err(|e| Error::from_pg("read pg_stat_activity", "the source", &e))?
            .get::<_, i64>(0);
        if n == 0 || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    client
        .query(
            "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await
        .map_err(|e| Error::from_pg(&format!("drop replication slot \"{slot}\""), "the source", &e))?;
    Ok(())
}

/// `pg_current_wal_lsn()` of the source.
pub async fn current_wal_lsn(client: &Client) -> Result<Lsn> {
    let row = client
        .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| Error::from_pg("read the WAL position", "the source", &e))?;
    let text: String = row.get(0);
    text.parse()
        .map_err(|_| Error::transient(format!("unexpected WAL position \"{text}\"")))
}
