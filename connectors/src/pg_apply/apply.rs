//! Applying the stream: source transactions, in commit order, grouped into target
//! transactions that each end by recording how far they got.
//!
//! Statements are built as SQL text with every value a quoted literal (the text form
//! pgoutput sent, which the target column's input function parses back), and sent in
//! batches with the simple query protocol: one round trip carries many statements, and
//! consecutive inserts into one table become one multi-row `INSERT` (rows sent as one
//! array per column where the types allow, see [`super::arrays`]). Values are never
//! spliced unquoted and identifiers are always quoted. The SQL buffer is flushed to the
//! server whenever it passes [`MAX_SQL_BYTES`], so a transaction of any size uses bounded
//! memory here; the target holds the open transaction.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryStream};

use super::arrays::ColumnArrays;
use super::net::{FastMap, FastSet};
use super::net::{
    NetOp, NotFoldable, TableQueue, key_bytes, key_text, orders_as_integer, push_key_part,
    sort_by_key,
};
use super::plan::TablePlan;
use super::state::Progress;
use crate::error::{Error, Result};
use crate::ident::{TableName, push_literal, quote_ident, quote_literal};
use crate::lsn::Lsn;
use crate::pg_source::decode::{
    Begin, ColumnValue, Commit, Delete, Insert, OldTuple, Relation, Truncate, TupleData, Update,
};

/// Flush buffered SQL to the target past this size.
const MAX_SQL_BYTES: usize = 1 << 20;
/// Rows in one multi-row statement at most.
const MAX_ROWS_PER_STATEMENT: usize = 1000;
/// Net changes held per group before they are sent, in (approximate) bytes.
const MAX_QUEUED_BYTES: usize = 32 << 20;
/// Source transactions a group holds at least before it is sent early, when the target
/// is idle (see [`Applier::target_idle`]).
const EAGER_GROUP_TXNS: usize = 1000;

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
            max_transactions: 5000,
            max_rows: 125_000,
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
    /// Groups that began on the second session while the one before was still running.
    pub pipelined_groups: u64,
    /// Of those, groups whose early part was rolled back and sent again after the group
    /// before committed (the group before waited for a lock, or the early part failed).
    pub pipeline_restarts: u64,
}

/// The statements that open every group's target transaction.
const GROUP_BEGIN: &str = "BEGIN; SET CONSTRAINTS ALL DEFERRED;";

/// SQL a group sends ahead on the second session at most, about (checked between tables;
/// what was sent is kept, to be sent again if the early part is rolled back).
const MAX_AHEAD_BYTES: usize = 8 << 20;

/// Keys a group's footprint keeps at most; past them, a table counts as changed in full
/// (nothing of it goes ahead in the next group), so a transaction of any size costs a
/// bounded amount of memory here.
const MAX_FOOTPRINT_KEYS: usize = 200_000;

/// How often the group in flight is checked for a wait on a lock once the next group's
/// early part is done (if it waits, it might wait for the early part through a third
/// session's lock request queued between them, which no deadlock detector sees: the early
/// part is rolled back).
const AHEAD_LOCK_CHECK: Duration = Duration::from_secs(1);

/// A target session the groups alternate on, with the statements prepared on it.
struct Lane {
    client: Client,
    /// Its backend's process ID.
    pid: i32,
    prepared: FastMap<StatementKey, String>,
}

/// What a group changed, per source relation: the keys of its net changes, and whether
/// anything else touched the table (ordered statements, DDL). A group's early part leaves
/// out whatever the group before touched (see [`Applier::send_ahead`]).
#[derive(Default)]
struct Footprint {
    tables: FastMap<u32, TableFootprint>,
    /// Keys kept, over all tables (at most [`MAX_FOOTPRINT_KEYS`]).
    keys: usize,
    /// A TRUNCATE (which may cascade to other tables): no early part beside it.
    barrier: bool,
}

#[derive(Default)]
struct TableFootprint {
    keys: FastSet<Vec<u8>>,
    ordered: bool,
    /// Net changes of the table were written out before the group's end (a Relation
    /// message, a pause, a full queue): later ones of the same keys must follow them, so
    /// none of the table's changes go ahead in this group.
    written_early: bool,
}

impl Footprint {
    fn ordered(&self, oid: u32) -> bool {
        self.tables.get(&oid).is_some_and(|t| t.ordered)
    }

    /// The table's queued changes may not go ahead of what this group wrote before them.
    fn in_order(&self, oid: u32) -> bool {
        self.tables
            .get(&oid)
            .is_some_and(|t| t.ordered || t.written_early)
    }
}

/// The early part of the open group: sent on its session while the group before runs on
/// the other, its answers not read yet.
#[derive(Default)]
struct Ahead {
    answers: VecDeque<std::pin::Pin<Box<SimpleQueryStream>>>,
    /// What was sent, to send again if the early part is rolled back.
    sent: Vec<String>,
    bytes: usize,
    /// Rolled back (or failed, and rolled back): sent again once the group before has
    /// committed.
    undone: bool,
}

/// How the columns of one source relation (by OID, from its Relation message) feed a plan.
struct RelationMap {
    name: TableName,
    plan: Option<Arc<TablePlan>>,
    /// For each plan column, the index of its source column in the relation's tuples
    /// (shared with each change applied, without a copy).
    source_index: Arc<[usize]>,
    /// Changes apply only from transactions that commit at or after this LSN (the table's
    /// snapshot).
    from: Lsn,
}

/// Where a change applies: the table's plan, and for each plan column the index of its
/// source column in the change's tuples.
type ChangeTarget = (Arc<TablePlan>, Arc<[usize]>);

/// The statement being extended with more rows.
#[derive(PartialEq, Eq)]
enum OpenStatement {
    /// A multi-row INSERT: where its text starts in the buffer, and where its first row
    /// starts (a single-row INSERT is turned into an EXECUTE of a prepared one on close).
    /// With `unnest`, rows also go to (and, after the first, only to) the applier's
    /// column arrays, and the statement is written from them on close.
    Insert {
        oid: u32,
        rows: usize,
        start: usize,
        values: usize,
        unnest: bool,
    },
    Delete {
        oid: u32,
        rows: usize,
    },
}

/// What identifies a prepared statement: the table, the operation and which columns it
/// sets and matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    oid: u32,
    kind: u8,
    shape: Vec<u8>,
}

/// A group sent to the target with its `COMMIT`, not answered yet (see
/// [`Applier::flush_group`]).
struct InFlight {
    answer: std::pin::Pin<Box<SimpleQueryStream>>,
    /// The last row of the answer so far (the WAL positions, when asked for).
    row: Option<tokio_postgres::SimpleQueryRow>,
    /// The progress row it writes.
    written: Progress,
    /// Its commit waits for the target's WAL flush.
    waits: bool,
    /// The commit LSN of its last source transaction (named by errors).
    upto: Lsn,
    sent: Instant,
    transactions: usize,
    rows: u64,
    group_ms: u64,
}

/// Applies decoded changes to the target.
pub struct Applier {
    client: Client,
    /// The backend process ID of `client` (read when a second session is added).
    pid: i32,
    job: String,
    /// Changes to a table apply only from transactions that commit at or after this LSN.
    snapshot_lsn: HashMap<TableName, Lsn>,
    relations: FastMap<u32, RelationMap>,
    limits: GroupLimits,
    sql: String,
    open: Option<OpenStatement>,
    /// The rows of an open `unnest` insert, column by column, and the plan they follow.
    arrays: ColumnArrays,
    arrays_plan: Option<Arc<TablePlan>>,
    /// A target transaction is open (its BEGIN is buffered or sent).
    in_group: bool,
    group_started: Instant,
    group_txns: usize,
    group_rows: u64,
    /// The source transaction being received: its commit LSN, and whether it is skipped
    /// (already applied, except for the changes of tables resuming at or before it).
    txn: Option<(Lsn, bool)>,
    /// The last source transaction added to the open group.
    last_in_group: Option<Progress>,
    /// The progress of the last group committed on the target (visible there).
    committed: Progress,
    /// The progress the target holds durably: what the slot may be confirmed to.
    durable: Progress,
    /// Groups committed without waiting for the target's WAL flush, oldest first: the
    /// target's WAL insert position right after each commit, and its progress. Each is
    /// durable once the target's flush position reaches it.
    unflushed: VecDeque<(Lsn, Progress)>,
    /// The group sent and not answered yet: at most one. The next group is built
    /// meanwhile, and nothing more is sent before this one has committed.
    in_flight: Option<InFlight>,
    /// Whether a full group may stay in flight while the next is built (see
    /// [`Applier::overlap_groups`]).
    overlap: bool,
    /// Progress that became durable since it was last handed out (by `commit` or
    /// `flush`).
    announce: Option<Progress>,
    /// Whether a group may commit without waiting for the target's WAL flush (see
    /// [`Applier::prepare_commits`]).
    commit_without_flush: bool,
    stats: ApplyStats,
    warned_unmapped: std::collections::HashSet<u32>,
    /// Statements prepared on this session (`PREPARE cutover_N`): updates, keyless deletes
    /// and single-row inserts run as `EXECUTE` of a generic plan instead of being parsed
    /// and planned each time.
    prepared: FastMap<StatementKey, String>,
    /// Statements prepared so far (names are never reused, even when a shape change
    /// retires statements).
    prepared_count: usize,
    /// Whether net changes may be used at all: foreign-key checks and triggers are off on
    /// the target session (see [`super::net`]).
    net_changes: bool,
    /// The second target session, when groups may overlap on two (see
    /// [`Applier::add_session`]); `client` and `prepared` are the open group's session.
    spare: Option<Lane>,
    /// What the open group changed so far, and what the group in flight changed (kept
    /// only with a second session).
    footprint: Footprint,
    flight_footprint: Option<Footprint>,
    /// The open group's early part, while the group before has not answered.
    ahead: Option<Ahead>,
    /// SQL sent now goes ahead (into `ahead`) instead of waiting for the group in flight.
    sending_ahead: bool,
    /// The queues are being written out at the end of the group (not in the middle).
    ending_group: bool,
    /// Net changes per source relation OID, for tables that qualify.
    queues: FastMap<u32, (Arc<TablePlan>, TableQueue)>,
    queued_bytes: usize,
    /// Tables whose apply is paused, and the commit LSN of the first source transaction
    /// with a change of theirs not applied (once there is one).
    paused: HashMap<TableName, Paused>,
    /// Tables paused in an earlier run that resume here: their changes apply from this
    /// commit LSN on, also in transactions the target otherwise holds already.
    resuming: HashMap<TableName, Lsn>,
    /// The target's progress when this applier started: once a group commits past it,
    /// the resumed tables have caught up.
    horizon: Lsn,
    /// Keys changed in committed groups and in the open one, not yet handed over (bounded
    /// per table). They are taken only after a `flush`, which commits the open group, so
    /// each key goes into one set once: merging a set per group into it cost the stream
    /// 6% of its CPU in a catch-up.
    touched: PendingTouched,
}

/// Changed keys while they are collected: each key as the bytes the net changes already
/// hold it by ([`super::net::key_bytes`] of its text values), turned into text only when
/// handed over, so noting a key costs no allocation per key column.
#[derive(Debug, Default)]
struct PendingTouched {
    tables: FastMap<TableName, PendingKeys>,
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct PendingKeys {
    keys: FastSet<Vec<u8>>,
    overflow: bool,
}

impl PendingTouched {
    fn len(&self) -> usize {
        self.tables.values().map(|t| t.keys.len()).sum()
    }

    /// The handed-over form: keys as text.
    fn into_touched(self) -> Touched {
        Touched {
            tables: self
                .tables
                .into_iter()
                .map(|(table, t)| {
                    let keys = t.keys.iter().map(|k| key_text(k)).collect();
                    (
                        table,
                        TouchedKeys {
                            keys,
                            overflow: t.overflow,
                        },
                    )
                })
                .collect(),
            since: self.since,
        }
    }
}

/// Target keys changed by committed source transactions, per source table, waiting to be
/// verified again (see `cutover::verifier`).
#[derive(Debug, Default, Clone)]
pub struct Touched {
    pub tables: HashMap<TableName, TouchedKeys>,
    /// When the oldest of them was committed on the target.
    pub since: Option<Instant>,
}

/// The changed keys of one table, in target key column order (text form).
#[derive(Debug, Default, Clone)]
pub struct TouchedKeys {
    pub keys: FastSet<Vec<String>>,
    /// More keys changed than are kept, or rows changed that keys cannot name (a keyless
    /// table, a TRUNCATE): only a full pass verifies the table again.
    pub overflow: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tables.values().map(|t| t.keys.len()).sum()
    }
}

/// Changed keys kept per table before it overflows.
const MAX_TOUCHED_PER_TABLE: usize = 100_000;

fn is_text(v: &ColumnValue) -> bool {
    matches!(v, ColumnValue::Text(_))
}

/// Add a changed key to a table's (`None`: the table changed in a way keys cannot name).
fn touch(t: &mut PendingKeys, key: Option<Vec<u8>>) {
    match key {
        Some(k) if !t.overflow && t.keys.len() < MAX_TOUCHED_PER_TABLE => {
            t.keys.insert(k);
        }
        Some(_) if t.overflow => {}
        _ => {
            t.overflow = true;
            t.keys = Default::default();
        }
    }
}

/// A paused table.
#[derive(Debug)]
pub struct Paused {
    pub since: Option<Lsn>,
    pub reason: String,
    /// `since` is not yet recorded on the target.
    dirty: bool,
}

/// Where the tables stand when an applier starts (from `cutover.tables`).
#[derive(Debug, Default)]
pub struct TablesAtStart {
    /// Changes to a table apply only from transactions that commit at or after its
    /// snapshot's LSN.
    pub snapshot_lsn: HashMap<TableName, Lsn>,
    /// Tables paused by an earlier run whose mapping holds again: their changes apply from
    /// this commit LSN on, also in transactions the target otherwise holds.
    pub resuming: HashMap<TableName, Lsn>,
    /// Tables that stay paused (their mapping still does not hold): where they stopped, if
    /// anywhere yet, and why.
    pub paused: HashMap<TableName, (Option<Lsn>, String)>,
}

impl Applier {
    /// `committed` is the target's progress row (or the slot's start when there is none).
    pub fn new(
        client: Client,
        job: &str,
        tables: TablesAtStart,
        committed: Progress,
        limits: GroupLimits,
        net_changes: bool,
    ) -> Self {
        let TablesAtStart {
            snapshot_lsn,
            resuming,
            paused,
        } = tables;
        Self {
            client,
            pid: 0,
            job: job.to_string(),
            snapshot_lsn,
            relations: FastMap::default(),
            limits,
            sql: String::with_capacity(MAX_SQL_BYTES + 64 * 1024),
            open: None,
            arrays: ColumnArrays::default(),
            arrays_plan: None,
            in_group: false,
            group_started: Instant::now(),
            group_txns: 0,
            group_rows: 0,
            txn: None,
            last_in_group: None,
            committed,
            durable: committed,
            unflushed: VecDeque::new(),
            in_flight: None,
            overlap: false,
            announce: None,
            commit_without_flush: false,
            stats: ApplyStats::default(),
            warned_unmapped: Default::default(),
            prepared: FastMap::default(),
            prepared_count: 0,
            net_changes,
            spare: None,
            footprint: Footprint::default(),
            flight_footprint: None,
            ahead: None,
            sending_ahead: false,
            ending_group: false,
            queues: FastMap::default(),
            queued_bytes: 0,
            paused: paused
                .into_iter()
                .map(|(table, (since, reason))| {
                    (
                        table,
                        Paused {
                            since,
                            reason,
                            dirty: since.is_some(),
                        },
                    )
                })
                .collect(),
            resuming,
            horizon: committed.commit_lsn,
            touched: PendingTouched::default(),
        }
    }

    /// Read how the target commits, once, before the first group.
    ///
    /// - A target whose `synchronous_commit` is `off` would not make even a waiting commit
    ///   durable: this session commits with `local` instead.
    /// - A target with synchronous standbys (`synchronous_standby_names`) always gets
    ///   commits that wait, as it asks: the flush position this session can read is the
    ///   local one, which says nothing of the standbys.
    /// - Otherwise a group followed by more work commits without waiting for the flush
    ///   (see `flush_group`).
    pub async fn prepare_commits(&mut self) -> Result<()> {
        let what = "read the target's commit settings";
        let row = self
            .client
            .query_one(
                "SELECT pg_catalog.current_setting('synchronous_commit'), \
                        pg_catalog.current_setting('synchronous_standby_names')",
                &[],
            )
            .await
            .map_err(|e| Error::from_pg(what, "the target", &e))?;
        let (commit, standbys): (String, String) = (row.get(0), row.get(1));
        if commit == "off" {
            for c in std::iter::once(&self.client).chain(self.spare.as_ref().map(|l| &l.client)) {
                c.batch_execute("SET synchronous_commit = local")
                    .await
                    .map_err(|e| Error::from_pg(what, "the target", &e))?;
            }
        }
        self.commit_without_flush = standbys.trim().is_empty();
        Ok(())
    }

    /// The session of the open group (the one it was created with, until a second one
    /// is added).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Give the applier a second target session, set up like the first (the job's lock
    /// joined, `session_replication_role = replica`); call it before `prepare_commits`.
    ///
    /// Groups then alternate between the two sessions. While a group runs on one, the
    /// next group's net changes of keys the running group did not touch (and rows for
    /// tables without any unique index) are sent ahead on the other, in its open
    /// transaction (see [`Applier::send_ahead`]); the rest of it and its COMMIT follow
    /// only once the running group has committed, so groups still commit in order and a
    /// group never commits after one that failed. The two never wait for each other's row
    /// locks. Only for jobs whose changes fold into net changes (replica role on, so no
    /// foreign-key checks or ordinary triggers) and whose target tables have no trigger or
    /// rule that fires in replica mode (`pg_apply::fires_in_replica`).
    pub async fn add_session(&mut self, client: Client) -> Result<()> {
        // Both read committed: a statement sent ahead that does meet a row of the group
        // before (keys equal but spelled differently) waits for it and then applies on
        // top, where a stricter level would fail.
        let mut pids = [0; 2];
        for (c, pid) in [&self.client, &client].into_iter().zip(&mut pids) {
            let rows = c
                .simple_query(
                    "SET default_transaction_isolation = 'read committed'; \
                     SELECT pg_catalog.pg_backend_pid()::text",
                )
                .await
                .map_err(|e| Error::from_pg("prepare the apply sessions", "the target", &e))?;
            *pid = rows
                .iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) => r.get(0).and_then(|t| t.parse().ok()),
                    _ => None,
                })
                .ok_or_else(|| Error::transient("the target did not report a backend pid"))?;
        }
        self.pid = pids[0];
        self.spare = Some(Lane {
            client,
            pid: pids[1],
            prepared: FastMap::default(),
        });
        Ok(())
    }

    /// The position the slot may not be confirmed past: the first source transaction a
    /// paused (or resuming) table has not applied.
    pub fn hold(&self) -> Option<Lsn> {
        self.paused
            .values()
            .filter_map(|p| p.since)
            .chain(self.resuming.values().copied())
            .min()
    }

    /// The tables paused now, with why.
    pub fn paused(&self) -> &HashMap<TableName, Paused> {
        &self.paused
    }

    /// Stop applying `table`: its changes from the current source transaction on (or from
    /// its next change, when `at_change` is false) are not applied and the slot is held
    /// before them, so a later run applies them once the operator fixed the mapping.
    pub async fn pause(
        &mut self,
        oid: u32,
        relation: Option<&Relation>,
        table: TableName,
        reason: String,
        at_change: bool,
    ) -> Result<()> {
        self.flush_queue(oid).await?;
        self.close_statement();
        if let Some(rel) = relation {
            self.relations.insert(
                rel.oid,
                RelationMap {
                    name: table.clone(),
                    plan: None,
                    source_index: Arc::from([]),
                    from: Lsn::ZERO,
                },
            );
        }
        // A table still catching up has applied nothing from where it resumes on (that
        // position moves with every group): it pauses there again.
        let resumed_at = self.resuming.remove(&table);
        let entry = self.paused.entry(table.clone()).or_insert(Paused {
            since: None,
            reason: reason.clone(),
            dirty: false,
        });
        entry.reason = reason;
        if let Some(at) = resumed_at
            && entry.since.is_none()
        {
            entry.since = Some(at);
            entry.dirty = true;
        }
        if at_change && let Some((lsn, _)) = self.txn {
            self.note_paused_change(&table, lsn);
        }
        Ok(())
    }

    /// A change of a paused table would have applied in the transaction at `lsn`.
    fn note_paused_change(&mut self, table: &TableName, lsn: Lsn) {
        let skip = self.txn.is_some_and(|t| t.1);
        let resumes = self.resuming.get(table).is_some_and(|r| *r <= lsn);
        if skip && !resumes {
            return;
        }
        if let Some(p) = self.paused.get_mut(table)
            && p.since.is_none()
        {
            p.since = Some(lsn);
            p.dirty = true;
        }
    }

    /// What the target durably holds.
    pub fn durable(&self) -> Progress {
        self.durable
    }

    pub fn stats(&self) -> ApplyStats {
        self.stats
    }

    /// Hand over the keys changed by committed transactions (the verifier compares them
    /// again), and start collecting anew.
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched).into_touched()
    }

    /// How many changed keys wait to be handed over, and since when.
    pub fn touched_pending(&self) -> (usize, Option<Instant>) {
        (self.touched.len(), self.touched.since)
    }

    /// Note the target key a change touches (`None`: a change keys cannot name).
    fn note_key(&mut self, plan: &TablePlan, idx: &[usize], tuple: &TupleData) {
        let mut key = Vec::new();
        for j in plan.key_indexes() {
            match tuple.columns.get(idx[j]) {
                Some(ColumnValue::Text(b)) => push_key_part(&mut key, b),
                _ => {
                    if !plan.keyed() {
                        break;
                    }
                    return;
                }
            }
        }
        let key = if plan.keyed() { Some(key) } else { None };
        self.note_touched(plan.source_name(), key);
    }

    /// Add a changed key of `table` to the open group's (`None`: the table changed in a
    /// way keys cannot name).
    fn note_touched(&mut self, table: &TableName, key: Option<Vec<u8>>) {
        let t = match self.touched.tables.get_mut(table) {
            Some(t) => t,
            None => self.touched.tables.entry(table.clone()).or_default(),
        };
        touch(t, key);
    }

    /// The commit LSN of the last source transaction taken in: committed, in the open
    /// group, or being received.
    pub fn last_seen_commit(&self) -> Lsn {
        let grouped = self
            .last_in_group
            .map_or(self.committed.commit_lsn, |l| l.commit_lsn);
        match self.txn {
            Some((lsn, _)) => lsn.max(grouped),
            None => grouped.max(self.committed.commit_lsn),
        }
    }

    /// Whether a source transaction is between its Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Whether applied source transactions are not durable on the target yet: in an open
    /// target transaction, in one in flight, or committed and not flushed.
    pub fn has_uncommitted(&self) -> bool {
        self.in_group || self.in_flight.is_some() || !self.unflushed.is_empty()
    }

    /// Whether the open group should be committed now.
    pub fn group_full(&self) -> bool {
        self.in_group
            && (self.group_txns >= self.limits.max_transactions
                || self.group_rows >= self.limits.max_rows
                || self.group_started.elapsed() >= self.limits.max_age)
    }

    /// A relation's shape and the plan its changes apply with (`None`: not carried), with
    /// target DDL to run first and the source columns to record with it. Returns whether
    /// the table's changes apply (false: it stays paused until the next run).
    pub async fn relation(
        &mut self,
        rel: &Relation,
        table: TableName,
        plan: Option<Arc<TablePlan>>,
        ddl: &[String],
        known_columns: Option<&[String]>,
    ) -> Result<bool> {
        // What is queued or open for the table was planned with its previous shape.
        self.flush_queue(rel.oid).await?;
        self.queues.remove(&rel.oid);
        self.close_statement();
        self.prepared.retain(|k, _| k.oid != rel.oid);
        if let Some(lane) = self.spare.as_mut() {
            lane.prepared.retain(|k, _| k.oid != rel.oid);
        }
        let mut source_index = Vec::new();
        if let Some(plan) = &plan {
            if plan.evaluated() {
                // The mapper sends target rows, in plan order.
                source_index = (0..plan.columns.len()).collect();
            } else {
                for c in &plan.columns {
                    let idx = rel
                        .columns
                        .iter()
                        .position(|rc| rc.name == c.source)
                        .ok_or_else(|| {
                            Error::operator(format!(
                                "column {}.{} is gone from the source",
                                table,
                                quote_ident(&c.source)
                            ))
                        })?;
                    source_index.push(idx);
                }
            }
        }
        match self.paused.get(&table) {
            // Changes were held back since the pause: they come again only from the slot,
            // in the next run. Until then the table stays paused.
            Some(p) if p.since.is_some() || plan.is_none() => {
                self.relations.insert(
                    rel.oid,
                    RelationMap {
                        name: table,
                        plan: None,
                        source_index: Arc::from([]),
                        from: Lsn::ZERO,
                    },
                );
                return Ok(false);
            }
            Some(_) => {
                self.paused.remove(&table);
                tracing::info!(table = %table, "the mapping holds again; the table's apply resumes");
            }
            None => {}
        }
        if !ddl.is_empty() || known_columns.is_some() {
            self.ensure_group();
            if !ddl.is_empty() {
                self.note_ordered(rel.oid);
            }
            for statement in ddl {
                self.sql.push_str(statement);
                self.sql.push(';');
            }
            if let Some(cols) = known_columns {
                let list = cols
                    .iter()
                    .map(|c| quote_literal(c))
                    .collect::<Vec<_>>()
                    .join(",");
                let _ = write!(
                    self.sql,
                    "UPDATE cutover.tables SET source_columns = ARRAY[{list}]::text[] WHERE job = {} AND source_table = {};",
                    quote_literal(&self.job),
                    quote_literal(&table.to_string())
                );
            }
        }
        let from = plan
            .as_ref()
            .and_then(|p| self.snapshot_lsn.get(p.source_name()))
            .copied()
            .unwrap_or(Lsn::ZERO);
        self.relations.insert(
            rel.oid,
            RelationMap {
                name: table,
                plan,
                source_index: source_index.into(),
                from,
            },
        );
        Ok(true)
    }

    pub fn begin(&mut self, begin: &Begin) -> Result<()> {
        let skip = begin.final_lsn <= self.committed.commit_lsn
            || self
                .last_in_group
                .is_some_and(|l| begin.final_lsn <= l.commit_lsn);
        self.txn = Some((begin.final_lsn, skip));
        Ok(())
    }

    /// Whether the transaction being received applies anything: it is new, or a table
    /// resumes at or before it.
    fn txn_applies(&self) -> bool {
        match self.txn {
            Some((lsn, skip)) => {
                !skip
                    || (lsn
                        > self
                            .last_in_group
                            .map(|l| l.commit_lsn)
                            .unwrap_or(Lsn::ZERO)
                        && self.resuming.values().any(|r| *r <= lsn))
            }
            None => false,
        }
    }

    /// The relation map for a change, when the change must be applied.
    fn target_for(&mut self, oid: u32) -> Result<Option<ChangeTarget>> {
        let Some((commit_lsn, skip)) = self.txn else {
            return Err(Error::transient(
                "replication stream sent a change outside a transaction",
            ));
        };
        let Some(rel) = self.relations.get(&oid) else {
            return Err(Error::transient(format!(
                "replication stream sent a change for relation {oid} before its Relation message"
            )));
        };
        if !self.paused.is_empty() && self.paused.contains_key(&rel.name) {
            let name = rel.name.clone();
            self.note_paused_change(&name, commit_lsn);
            return Ok(None);
        }
        if skip && self.resuming.get(&rel.name).is_none_or(|r| *r > commit_lsn) {
            return Ok(None);
        }
        let Some(plan) = rel.plan.clone() else {
            if self.warned_unmapped.insert(oid) {
                tracing::warn!(table = %rel.name, "ignoring changes to a published table the job does not map");
            }
            return Ok(None);
        };
        if commit_lsn < rel.from {
            // The table's copy was taken after this transaction committed: it is in there.
            return Ok(None);
        }
        Ok(Some((plan, Arc::clone(&rel.source_index))))
    }

    fn ensure_group(&mut self) {
        if !self.in_group {
            // The group in flight runs on this session: the new one takes the other.
            if self.in_flight.is_some()
                && let Some(lane) = self.spare.as_mut()
            {
                std::mem::swap(&mut self.client, &mut lane.client);
                std::mem::swap(&mut self.pid, &mut lane.pid);
                std::mem::swap(&mut self.prepared, &mut lane.prepared);
            }
            self.in_group = true;
            self.group_started = Instant::now();
            self.group_txns = 0;
            self.group_rows = 0;
            self.sql.push_str(GROUP_BEGIN);
        }
    }

    /// The open group changes `oid` by other than net changes (see [`Footprint`]).
    fn note_ordered(&mut self, oid: u32) {
        if self.spare.is_some() {
            self.footprint.tables.entry(oid).or_default().ordered = true;
        }
    }

    fn close_statement(&mut self) {
        match self.open.take() {
            Some(OpenStatement::Insert {
                oid,
                rows: 1,
                start,
                values,
                ..
            }) => {
                // `(v1, v2)` is already the argument list of an EXECUTE; the arrays (if
                // any) hold the same row.
                self.arrays.clear();
                self.arrays_plan = None;
                let plan = self.relations.get(&oid).and_then(|r| r.plan.clone());
                if let Some(plan) = plan {
                    let key = StatementKey {
                        oid,
                        kind: b'I',
                        shape: Vec::new(),
                    };
                    let mut head = String::new();
                    let name = self.prepare(&mut head, key, || {
                        let params = (1..=plan.columns.len())
                            .map(|n| format!("${n}"))
                            .collect::<Vec<_>>();
                        let sql = format!(
                            "INSERT INTO {} ({}) VALUES ({})",
                            plan.target_name().quoted(),
                            plan.target_column_list(),
                            params.join(",")
                        );
                        (
                            sql,
                            plan.columns.iter().map(|c| c.type_name.clone()).collect(),
                        )
                    });
                    let _ = write!(head, "EXECUTE {name}");
                    self.sql.replace_range(start..values, &head);
                }
                self.sql.push(';');
            }
            Some(OpenStatement::Insert {
                start,
                unnest: true,
                ..
            }) => {
                // Only the first row is in the buffer, as VALUES: write the statement
                // again from the arrays (set together with `unnest`, so always there).
                if let Some(plan) = self.arrays_plan.take() {
                    self.sql.truncate(start);
                    let _ = write!(
                        self.sql,
                        "INSERT INTO {} ({}) SELECT * FROM ",
                        plan.target_name().quoted(),
                        plan.target_column_list()
                    );
                    self.arrays.write_from(
                        &mut self.sql,
                        plan.columns.iter().map(|c| c.type_name.as_str()),
                    );
                    self.sql.push(';');
                }
            }
            Some(OpenStatement::Insert { .. }) => self.sql.push(';'),
            Some(OpenStatement::Delete { .. }) => self.sql.push_str(");"),
            None => {}
        }
    }

    /// The name of the prepared statement for `key`, appending its `PREPARE` to `out` the
    /// first time. `build` gives the statement text (with `$n` parameters) and the
    /// parameter types.
    fn prepare(
        &mut self,
        out: &mut String,
        key: StatementKey,
        build: impl FnOnce() -> (String, Vec<String>),
    ) -> String {
        if let Some(name) = self.prepared.get(&key) {
            return name.clone();
        }
        self.prepared_count += 1;
        let name = format!("cutover_{}", self.prepared_count);
        let (sql, types) = build();
        let _ = write!(out, "PREPARE {name}({}) AS {sql};", types.join(","));
        self.prepared.insert(key, name.clone());
        name
    }

    async fn maybe_flush(&mut self) -> Result<()> {
        if self.sql.len() + self.arrays.bytes() >= MAX_SQL_BYTES {
            self.close_statement();
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> Result<()> {
        if self.sql.is_empty() {
            return Ok(());
        }
        if self.sending_ahead {
            let answer = self
                .client
                .simple_query_raw(&self.sql)
                .await
                .map_err(|e| self.apply_error(e))?;
            let sent = std::mem::replace(
                &mut self.sql,
                String::with_capacity(MAX_SQL_BYTES + 64 * 1024),
            );
            let ahead = self.ahead.get_or_insert_default();
            ahead.bytes += sent.len();
            ahead.sent.push(sent);
            ahead.answers.push_back(Box::pin(answer));
            return Ok(());
        }
        self.settle().await?;
        let result = self.client.batch_execute(&self.sql).await;
        self.sql.clear();
        result.map_err(|e| self.apply_error(e))
    }

    fn apply_error(&self, e: tokio_postgres::Error) -> Error {
        let upto = self
            .txn
            .map(|t| t.0)
            .or(self.last_in_group.map(|l| l.commit_lsn));
        Self::apply_error_upto(upto, e)
    }

    /// An apply error, naming the source transactions it concerns.
    fn apply_error_upto(upto: Option<Lsn>, e: tokio_postgres::Error) -> Error {
        let what = match upto {
            Some(lsn) => format!("apply source transactions up to commit LSN {lsn}"),
            None => "apply source transactions".to_string(),
        };
        let mut err = Error::from_pg(&what, "the target", &e);
        if !err.is_transient() && err.hint.is_none() {
            err.hint = crate::error::hint_for(
                e.code().map(|c| c.code()),
                crate::error::is_constraint_violation,
                "the target differs from the source (a row changed or added behind the job's back?); fix the target row, then run the job again: it resumes at the same transaction",
            );
        }
        err
    }

    fn push_value(
        sql: &mut String,
        value: &ColumnValue,
        table: &TableName,
        column: &str,
    ) -> Result<()> {
        match Self::text_value(value, table, column)? {
            None => sql.push_str("NULL"),
            Some(text) => push_literal(sql, text),
        }
        Ok(())
    }

    /// A value's text (`None` for NULL); an error for a value that cannot be written.
    fn text_value<'a>(
        value: &'a ColumnValue,
        table: &TableName,
        column: &str,
    ) -> Result<Option<&'a str>> {
        match value {
            ColumnValue::Null => Ok(None),
            ColumnValue::Text(bytes) => std::str::from_utf8(bytes).map(Some).map_err(|_| {
                Error::operator(format!(
                    "invalid UTF-8 in column {table}.{}",
                    quote_ident(column)
                ))
            }),
            ColumnValue::UnchangedToast => Err(Error::operator(format!(
                "the stream sent no value for column {table}.{} of a new row",
                quote_ident(column)
            ))),
            ColumnValue::Binary(_) => Err(Error::operator(
                "the stream sent a binary value; cutover asks for text",
            )),
        }
    }

    /// Add one row to the column arrays: the values of the given plan columns, in order.
    fn push_array_row<'a>(
        arrays: &mut ColumnArrays,
        plan: &TablePlan,
        values: impl Iterator<Item = (usize, &'a ColumnValue)>,
    ) -> Result<()> {
        for (n, (j, v)) in values.enumerate() {
            arrays.push(
                n,
                Self::text_value(v, plan.source_name(), &plan.columns[j].source)?,
            );
        }
        arrays.end_row();
        Ok(())
    }

    fn value<'a>(tuple: &'a TupleData, idx: usize, table: &TableName) -> Result<&'a ColumnValue> {
        tuple.columns.get(idx).ok_or_else(|| {
            Error::operator(format!(
                "a row of {table} has fewer columns than its Relation message"
            ))
        })
    }

    pub async fn insert(&mut self, mut ins: Insert) -> Result<()> {
        let Some((plan, idx)) = self.target_for(ins.oid)? else {
            return Ok(());
        };
        // (Queued changes note their keys when written out, once per key.)
        self.ensure_group();
        if self.foldable(&plan) {
            if let Some(key) = Self::key_of(&plan, &idx, &ins.new) {
                let row = Self::take_image(&plan, &idx, &mut ins.new)?;
                let offered = self.queue(ins.oid, &plan).insert(key, row);
                if self.queued(offered, &mut ins.new).await? {
                    return Ok(());
                }
            }
            self.flush_queue(ins.oid).await?;
        } else if self.appendable(&plan) {
            let row = Self::take_image(&plan, &idx, &mut ins.new)?;
            let offered = self.queue(ins.oid, &plan).append(row);
            if self.queued(offered, &mut ins.new).await? {
                return Ok(());
            }
            self.flush_queue(ins.oid).await?;
        }
        self.note_ordered(ins.oid);
        self.note_key(&plan, &idx, &ins.new);
        let extend = matches!(self.open, Some(OpenStatement::Insert { oid, rows, .. }) if oid == ins.oid && rows < MAX_ROWS_PER_STATEMENT);
        let unnest = match self.open {
            Some(OpenStatement::Insert { unnest, .. }) if extend => unnest,
            _ => plan.columns.iter().all(|c| c.array_element),
        };
        let mut offsets = (0, 0);
        if !extend {
            self.close_statement();
            if unnest {
                self.arrays.start(plan.columns.len());
                self.arrays_plan = Some(plan.clone());
            }
        }
        if unnest {
            for (j, c) in plan.columns.iter().enumerate() {
                let v = Self::value(&ins.new, idx[j], plan.source_name())?;
                let text = Self::text_value(v, plan.source_name(), &c.source)?;
                self.arrays.push(j, text);
            }
            self.arrays.end_row();
        }
        // The first row also goes to the buffer as VALUES, in case it stays alone.
        if !(extend && unnest) {
            if extend {
                self.sql.push(',');
            } else {
                offsets.0 = self.sql.len();
                let _ = write!(
                    self.sql,
                    "INSERT INTO {} ({}) VALUES ",
                    plan.target_name().quoted(),
                    plan.target_column_list()
                );
                offsets.1 = self.sql.len();
            }
            self.sql.push('(');
            for (j, c) in plan.columns.iter().enumerate() {
                if j > 0 {
                    self.sql.push(',');
                }
                let v = Self::value(&ins.new, idx[j], plan.source_name())?;
                Self::push_value(&mut self.sql, v, plan.source_name(), &c.source)?;
            }
            self.sql.push(')');
        }
        self.open = Some(match self.open {
            Some(OpenStatement::Insert {
                oid,
                rows,
                start,
                values,
                unnest,
            }) if extend => OpenStatement::Insert {
                oid,
                rows: rows + 1,
                start,
                values,
                unnest,
            },
            _ => OpenStatement::Insert {
                oid: ins.oid,
                rows: 1,
                start: offsets.0,
                values: offsets.1,
                unnest,
            },
        });
        self.group_rows += 1;
        self.maybe_flush().await
    }

    pub async fn update(&mut self, mut upd: Update) -> Result<()> {
        let Some((plan, idx)) = self.target_for(upd.oid)? else {
            return Ok(());
        };
        self.ensure_group();
        if self.foldable(&plan) {
            let new_key = Self::key_of(&plan, &idx, &upd.new);
            // Without an old row the key did not change.
            let same_key = match (&new_key, upd.old.as_ref()) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(nk), Some(old)) => {
                    Self::key_of(&plan, &idx, old.tuple()).is_some_and(|ok| ok == *nk)
                }
            };
            // A key change (or a key without a value) goes the ordered way.
            if same_key && let Some(nk) = new_key {
                let row = Self::take_image(&plan, &idx, &mut upd.new)?;
                let offered = self.queue(upd.oid, &plan).update(nk, row);
                if self.queued(offered, &mut upd.new).await? {
                    return Ok(());
                }
            }
            self.flush_queue(upd.oid).await?;
        } else if self.appendable(&plan) {
            self.flush_queue(upd.oid).await?;
        }
        self.note_ordered(upd.oid);
        self.note_key(&plan, &idx, &upd.new);
        if let Some(old) = &upd.old {
            self.note_key(&plan, &idx, old.tuple());
        }
        self.close_statement();
        // Columns to set: every mapped column the stream sent. Unchanged TOAST values
        // ('u') are left as the target has them (hard case 1).
        let mut set = Vec::new();
        for (j, _) in plan.columns.iter().enumerate() {
            let v = Self::value(&upd.new, idx[j], plan.source_name())?;
            if !matches!(v, ColumnValue::UnchangedToast) {
                set.push(j);
            }
        }
        if set.is_empty() {
            return Ok(());
        }
        let old = upd.old.as_ref().map(OldTuple::tuple);
        let (matched, row) = if plan.keyed() {
            (
                self.key_match(&plan, &idx, old.unwrap_or(&upd.new))?,
                old.unwrap_or(&upd.new),
            )
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
            (Self::full_match(&plan, &idx, old)?, old)
        };
        let mut shape = vec![0u8; plan.columns.len()];
        for &j in &set {
            shape[j] |= 1;
        }
        for &j in &matched {
            shape[j] |= 2;
        }
        let key = StatementKey {
            oid: upd.oid,
            kind: b'U',
            shape,
        };
        let args: Vec<(&TupleData, usize)> = set
            .iter()
            .map(|&j| (&upd.new, j))
            .chain(matched.iter().map(|&j| (row, j)))
            .collect();
        self.execute_prepared(key, &plan, &idx, &args, || {
            let mut types = Vec::new();
            let mut assignments = Vec::new();
            for &j in &set {
                types.push(plan.columns[j].type_name.clone());
                assignments.push(format!("{} = ${}", quote_ident(&plan.columns[j].target), types.len()));
            }
            let condition = Self::match_sql(&plan, &matched, &mut types);
            let target = plan.target_name().quoted();
            let sql = if plan.keyed() {
                format!("UPDATE {target} SET {} WHERE {condition}", assignments.join(", "))
            } else {
                format!(
                    "UPDATE {target} SET {} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE {condition} LIMIT 1)",
                    assignments.join(", ")
                )
            };
            (sql, types)
        })?;
        self.group_rows += 1;
        self.maybe_flush().await
    }

    /// Append `EXECUTE name(args)` for the statement `key`, preparing it first (from
    /// `build`) when this session has not. Each argument is plan column `j` of a tuple.
    fn execute_prepared(
        &mut self,
        key: StatementKey,
        plan: &TablePlan,
        idx: &[usize],
        args: &[(&TupleData, usize)],
        build: impl FnOnce() -> (String, Vec<String>),
    ) -> Result<()> {
        let mut out = std::mem::take(&mut self.sql);
        let name = self.prepare(&mut out, key, build);
        self.sql = out;
        let _ = write!(self.sql, "EXECUTE {name}(");
        for (n, (tuple, j)) in args.iter().enumerate() {
            if n > 0 {
                self.sql.push(',');
            }
            let v = Self::value(tuple, idx[*j], plan.source_name())?;
            Self::push_value(
                &mut self.sql,
                v,
                plan.source_name(),
                &plan.columns[*j].source,
            )?;
        }
        self.sql.push_str(");");
        Ok(())
    }

    /// The key columns (plan indexes) that find the row, refusing a key the stream left
    /// out (an unchanged TOASTed key, hard case 2).
    fn key_match(&self, plan: &TablePlan, idx: &[usize], tuple: &TupleData) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (j, c) in plan.columns.iter().enumerate().filter(|(_, c)| c.key) {
            let v = Self::value(tuple, idx[j], plan.source_name())?;
            if !matches!(v, ColumnValue::Text(_)) {
                return Err(Error::operator(format!(
                    "key column {}.{} arrived without a value",
                    plan.source_name(),
                    quote_ident(&c.source)
                ))
                .detail("an unchanged TOASTed key, or a NULL in a key")
                .hint("set REPLICA IDENTITY FULL on the source table, or use a key column that is not stored out of line"));
            }
            out.push(j);
        }
        Ok(out)
    }

    /// For a table without a key: every column the old row carries (unchanged TOAST
    /// values are not sent, so they cannot be matched on).
    fn full_match(plan: &TablePlan, idx: &[usize], old: &TupleData) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for (j, &i) in idx.iter().enumerate().take(plan.columns.len()) {
            let v = Self::value(old, i, plan.source_name())?;
            if !matches!(v, ColumnValue::UnchangedToast) {
                out.push(j);
            }
        }
        Ok(out)
    }

    /// `a = $n AND ...` for keyed tables; `a IS NOT DISTINCT FROM $n AND ...` (by text form
    /// for types without equality) for the rest. Appends the parameter types to `types`.
    fn match_sql(plan: &TablePlan, matched: &[usize], types: &mut Vec<String>) -> String {
        let keyed = plan.keyed();
        let mut parts = Vec::new();
        for &j in matched {
            let c = &plan.columns[j];
            if c.match_as_text && !keyed {
                types.push("pg_catalog.text".to_string());
                parts.push(format!(
                    "{}::pg_catalog.text IS NOT DISTINCT FROM ${}",
                    quote_ident(&c.target),
                    types.len()
                ));
            } else {
                types.push(c.type_name.clone());
                let op = if keyed { "=" } else { "IS NOT DISTINCT FROM" };
                parts.push(format!("{} {op} ${}", quote_ident(&c.target), types.len()));
            }
        }
        if parts.is_empty() {
            "true".to_string()
        } else {
            parts.join(" AND ")
        }
    }

    pub async fn delete(&mut self, del: &Delete) -> Result<()> {
        let Some((plan, idx)) = self.target_for(del.oid)? else {
            return Ok(());
        };
        self.ensure_group();
        if self.foldable(&plan) {
            let old = del.old.tuple();
            if let Some(key) = Self::key_of(&plan, &idx, old) {
                let key_values = plan
                    .key_indexes()
                    .into_iter()
                    .map(|j| Self::value(old, idx[j], plan.source_name()).cloned())
                    .collect::<Result<_>>()?;
                self.queue(del.oid, &plan).delete(key, key_values);
                self.group_rows += 1;
                return self.after_queue().await;
            }
            self.flush_queue(del.oid).await?;
        } else if self.appendable(&plan) {
            self.flush_queue(del.oid).await?;
        }
        self.note_ordered(del.oid);
        self.note_key(&plan, &idx, del.old.tuple());
        let target = plan.target_name().quoted();
        let old = del.old.tuple();
        if plan.keyed() {
            let keys: Vec<usize> = plan.key_indexes();
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
            let matched = Self::full_match(&plan, &idx, old)?;
            let mut shape = vec![0u8; plan.columns.len()];
            for &j in &matched {
                shape[j] = 2;
            }
            let key = StatementKey {
                oid: del.oid,
                kind: b'D',
                shape,
            };
            let args: Vec<(&TupleData, usize)> = matched.iter().map(|&j| (old, j)).collect();
            self.execute_prepared(key, &plan, &idx, &args, || {
                let mut types = Vec::new();
                let condition = Self::match_sql(&plan, &matched, &mut types);
                (
                    format!(
                        "DELETE FROM {target} WHERE (tableoid, ctid) = (SELECT tableoid, ctid FROM {target} WHERE {condition} LIMIT 1)"
                    ),
                    types,
                )
            })?;
        }
        self.group_rows += 1;
        self.maybe_flush().await
    }

    pub async fn truncate(&mut self, tr: &Truncate) -> Result<()> {
        // A barrier: everything queued before it is applied before it.
        self.flush_queues().await?;
        let mut targets = Vec::new();
        for oid in &tr.oids {
            if let Some((plan, _)) = self.target_for(*oid)? {
                targets.push(plan.target_name().quoted());
                self.note_touched(plan.source_name(), None);
            }
        }
        if targets.is_empty() {
            return Ok(());
        }
        self.ensure_group();
        self.close_statement();
        if self.spare.is_some() {
            self.footprint.barrier = true;
        }
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
        let applies = self.txn_applies();
        if self.txn.take().is_none() {
            return Err(Error::transient(
                "replication stream sent a commit outside a transaction",
            ));
        }
        if !applies {
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
        if self.group_full() || (self.group_txns >= EAGER_GROUP_TXNS && self.target_idle()) {
            // More is coming: neither wait for the target's answer nor for its WAL flush
            // (see `flush_group`).
            self.flush_group(false).await?;
        }
        Ok(self.announce.take())
    }

    /// Whether the target has nothing to do while groups overlap: no group is in flight.
    /// A group of [`EAGER_GROUP_TXNS`] source transactions or more then goes at once
    /// instead of filling up: at the start of a catch-up the target begins after the first
    /// thousand transactions, not after the first full group. A group in flight is not
    /// polled for its answer here: once one is in flight, groups fill up as before (small
    /// groups cost the target more per transaction).
    fn target_idle(&self) -> bool {
        // Without overlap every group's answer is waited for, so none is ever in flight
        // here; with a second session, groups go ahead on their own terms.
        self.overlap && self.spare.is_none() && self.in_flight.is_none()
    }

    /// Whether `plan`'s changes may be folded into net changes (see [`super::net`]).
    fn foldable(&self, plan: &TablePlan) -> bool {
        self.net_changes && plan.keyed() && plan.target.other_unique_indexes == 0
    }

    /// Whether inserts into `plan`'s table may wait in its queue until the group ends, to
    /// go ahead with the next group's early part (so only with a second session): no key
    /// and no unique index at all, so no row can conflict with another (and, as for net
    /// changes, no trigger or foreign-key check sees the order).
    fn appendable(&self, plan: &TablePlan) -> bool {
        self.net_changes
            && self.spare.is_some()
            && !plan.keyed()
            && !plan.target.has_primary_key
            && plan.target.other_unique_indexes == 0
    }

    /// The row in plan column order.
    fn image(plan: &TablePlan, idx: &[usize], tuple: &TupleData) -> Result<Vec<ColumnValue>> {
        idx.iter()
            .take(plan.columns.len())
            .map(|&i| Self::value(tuple, i, plan.source_name()).cloned())
            .collect()
    }

    /// [`Applier::image`], moved out of `tuple` when its columns are in plan order already
    /// (the usual case): [`Applier::queued`] returns them if the row is not taken.
    fn take_image(
        plan: &TablePlan,
        idx: &[usize],
        tuple: &mut TupleData,
    ) -> Result<Vec<ColumnValue>> {
        let n = plan.columns.len();
        if tuple.columns.len() == n && idx.iter().take(n).copied().eq(0..n) {
            return Ok(std::mem::take(&mut tuple.columns));
        }
        Self::image(plan, idx, tuple)
    }

    /// After a row was offered to its table's queue: `true` when the queue took it (it
    /// counts, and the queues are written out if they grew too large); else the row goes
    /// back to `tuple` ([`Applier::take_image`] may have moved it out), for the ordered
    /// path.
    async fn queued(
        &mut self,
        offered: std::result::Result<(), NotFoldable>,
        tuple: &mut TupleData,
    ) -> Result<bool> {
        match offered {
            Ok(()) => {
                self.group_rows += 1;
                self.after_queue().await?;
                Ok(true)
            }
            Err(NotFoldable(row)) => {
                if tuple.columns.is_empty() {
                    tuple.columns = row;
                }
                Ok(false)
            }
        }
    }

    /// The key bytes of a row (see [`key_bytes`]); `None` when a key value is missing.
    fn key_of(plan: &TablePlan, idx: &[usize], tuple: &TupleData) -> Option<Vec<u8>> {
        key_bytes(
            plan.columns
                .iter()
                .zip(idx)
                .filter(|(c, _)| c.key)
                .map(|(_, &i)| tuple.columns.get(i).unwrap_or(&ColumnValue::Null)),
        )
    }

    fn queue(&mut self, oid: u32, plan: &Arc<TablePlan>) -> &mut TableQueue {
        &mut self
            .queues
            .entry(oid)
            .or_insert_with(|| (plan.clone(), TableQueue::default()))
            .1
    }

    async fn after_queue(&mut self) -> Result<()> {
        self.queued_bytes = self.queues.values().map(|(_, q)| q.bytes).sum();
        if self.queued_bytes > MAX_QUEUED_BYTES {
            self.flush_queues().await?;
        }
        Ok(())
    }

    async fn flush_queues(&mut self) -> Result<()> {
        let oids: Vec<u32> = self
            .queues
            .iter()
            .filter(|(_, (_, q))| !q.is_empty())
            .map(|(o, _)| *o)
            .collect();
        for oid in oids {
            self.flush_queue(oid).await?;
        }
        self.queued_bytes = 0;
        Ok(())
    }

    /// Send one table's net changes: deletes, then inserts, then updates by shape.
    async fn flush_queue(&mut self, oid: u32) -> Result<()> {
        self.flush_queue_except(oid, None).await
    }

    /// [`Applier::flush_queue`], leaving the net changes of the `held` keys in the queue.
    async fn flush_queue_except(
        &mut self,
        oid: u32,
        held: Option<&FastSet<Vec<u8>>>,
    ) -> Result<()> {
        let Some((plan, queue)) = self.queues.get_mut(&oid) else {
            return Ok(());
        };
        if queue.is_empty() {
            return Ok(());
        }
        let plan = plan.clone();
        let appended = std::mem::take(&mut queue.appended);
        let rows: FastMap<_, _> = match held {
            Some(held) if !held.is_empty() => queue
                .rows
                .extract_if(|key, _| !held.contains(key))
                .collect(),
            _ => std::mem::take(&mut queue.rows),
        };
        if queue.rows.is_empty() {
            queue.bytes = 0;
        }
        self.close_statement();
        let target = plan.target_name().quoted();
        let keys: Vec<usize> = plan.key_indexes();
        let key_list = keys
            .iter()
            .map(|&j| quote_ident(&plan.columns[j].target))
            .collect::<Vec<_>>()
            .join(",");
        let mut deletes = Vec::new();
        let mut inserts = appended;
        // Updates by the columns they set (`None`: all of them, the usual case).
        let mut updates: FastMap<Option<Vec<bool>>, Vec<Vec<ColumnValue>>> = FastMap::default();
        // With a second session, the group's keys are kept for the next group (see
        // `send_ahead`), and a table written out in the middle of the group keeps the
        // rest of its changes in order.
        let mid_group = !self.ending_group && !self.sending_ahead;
        // The changed keys, for the verifier: once per key here, not once per change.
        let touched = self
            .touched
            .tables
            .entry(plan.source_name().clone())
            .or_default();
        if !inserts.is_empty() {
            // Appended rows: a table without a key.
            touch(touched, None);
        }
        let footprint = &mut self.footprint;
        let mut keys_seen = self.spare.is_some().then(|| {
            let t = footprint.tables.entry(oid).or_default();
            t.written_early |= mid_group;
            (t, &mut footprint.keys)
        });
        for (key, op) in rows {
            // The map's key is the changed key's text values, length-prefixed (when they
            // are all text): the form `touched` holds keys in.
            let note = !touched.overflow
                && match &op {
                    NetOp::Delete(key_values) => key_values.iter().all(is_text),
                    NetOp::Insert(row) | NetOp::Update(row) | NetOp::Replace(row) => {
                        keys.iter().all(|&j| row.get(j).is_some_and(is_text))
                    }
                };
            if let Some((t, total)) = keys_seen.as_mut()
                && !t.ordered
            {
                if **total < MAX_FOOTPRINT_KEYS {
                    **total += usize::from(t.keys.insert(key.clone()));
                } else {
                    t.ordered = true;
                    **total -= t.keys.len();
                    t.keys = FastSet::default();
                }
            }
            if note {
                touch(touched, Some(key));
            }
            match op {
                NetOp::Delete(key_values) => deletes.push(key_values),
                NetOp::Insert(row) => inserts.push(row),
                NetOp::Replace(row) => {
                    deletes.push(keys.iter().map(|&j| row[j].clone()).collect());
                    inserts.push(row);
                }
                NetOp::Update(row) => {
                    let shape = row
                        .iter()
                        .any(|v| matches!(v, ColumnValue::UnchangedToast))
                        .then(|| {
                            row.iter()
                                .map(|v| !matches!(v, ColumnValue::UnchangedToast))
                                .collect()
                        });
                    updates.entry(shape).or_default().push(row);
                }
            }
        }
        // Each statement's rows in key order (see `sort_by_key`); rows appended to a table
        // without a key keep the source's order.
        let key_order: Vec<(usize, bool)> = keys
            .iter()
            .map(|&j| (j, orders_as_integer(&plan.columns[j].type_name)))
            .collect();
        let deleted_order: Vec<(usize, bool)> = key_order
            .iter()
            .enumerate()
            .map(|(n, &(_, integer))| (n, integer))
            .collect();
        sort_by_key(&mut deletes, &deleted_order);
        sort_by_key(&mut inserts, &key_order);
        for rows in updates.values_mut() {
            sort_by_key(rows, &key_order);
        }
        let arrays = |cols: &[usize]| cols.iter().all(|&j| plan.columns[j].array_element);
        let types = |cols: &[usize]| -> Vec<&str> {
            cols.iter()
                .map(|&j| plan.columns[j].type_name.as_str())
                .collect()
        };
        let matches = keys
            .iter()
            .map(|&j| format!("t.{0} = v.{0}", quote_ident(&plan.columns[j].target)))
            .collect::<Vec<_>>()
            .join(" AND ");
        let keys_unnest = arrays(&keys);
        for chunk in deletes.chunks(MAX_ROWS_PER_STATEMENT) {
            if keys_unnest {
                self.arrays.start(keys.len());
                for key_values in chunk {
                    Self::push_array_row(
                        &mut self.arrays,
                        &plan,
                        keys.iter().copied().zip(key_values),
                    )?;
                }
                let _ = write!(self.sql, "DELETE FROM {target} AS t USING ");
                self.arrays.write_from(&mut self.sql, types(&keys));
                let _ = write!(self.sql, " AS v({key_list}) WHERE {matches};");
            } else {
                let _ = write!(self.sql, "DELETE FROM {target} WHERE ({key_list}) IN (");
                for (n, key_values) in chunk.iter().enumerate() {
                    self.sql.push_str(if n == 0 { "" } else { "," });
                    Self::push_row(&mut self.sql, &plan, keys.iter().copied().zip(key_values))?;
                }
                self.sql.push_str(");");
            }
            self.send_if_full().await?;
        }
        let all: Vec<usize> = (0..plan.columns.len()).collect();
        let all_unnest = arrays(&all);
        for chunk in inserts.chunks(MAX_ROWS_PER_STATEMENT) {
            let _ = write!(
                self.sql,
                "INSERT INTO {target} ({}) ",
                plan.target_column_list()
            );
            if all_unnest {
                self.arrays.start(all.len());
                for row in chunk {
                    Self::push_array_row(&mut self.arrays, &plan, row.iter().enumerate())?;
                }
                self.sql.push_str("SELECT * FROM ");
                self.arrays.write_from(&mut self.sql, types(&all));
            } else {
                self.sql.push_str("VALUES ");
                for (n, row) in chunk.iter().enumerate() {
                    self.sql.push_str(if n == 0 { "" } else { "," });
                    Self::push_row(&mut self.sql, &plan, row.iter().enumerate())?;
                }
            }
            self.sql.push(';');
            self.send_if_full().await?;
        }
        for (shape, rows) in updates {
            let cols: Vec<usize> = match shape {
                Some(shape) => (0..shape.len()).filter(|&j| shape[j]).collect(),
                None => all.clone(),
            };
            let set: Vec<String> = cols
                .iter()
                .filter(|&&j| !plan.columns[j].key)
                .map(|&j| format!("{0} = v.{0}", quote_ident(&plan.columns[j].target)))
                .collect();
            if set.is_empty() {
                continue;
            }
            let names = cols
                .iter()
                .map(|&j| quote_ident(&plan.columns[j].target))
                .collect::<Vec<_>>()
                .join(",");
            let unnest = arrays(&cols);
            for chunk in rows.chunks(MAX_ROWS_PER_STATEMENT) {
                let _ = write!(
                    self.sql,
                    "UPDATE {target} AS t SET {} FROM ",
                    set.join(", ")
                );
                if unnest {
                    self.arrays.start(cols.len());
                    for row in chunk {
                        Self::push_array_row(
                            &mut self.arrays,
                            &plan,
                            cols.iter().map(|&j| (j, &row[j])),
                        )?;
                    }
                    self.arrays.write_from(&mut self.sql, types(&cols));
                } else {
                    self.sql.push_str("(VALUES ");
                    for (n, row) in chunk.iter().enumerate() {
                        self.sql.push_str(if n == 0 { "(" } else { ",(" });
                        for (m, &j) in cols.iter().enumerate() {
                            if m > 0 {
                                self.sql.push(',');
                            }
                            Self::push_value(
                                &mut self.sql,
                                &row[j],
                                plan.source_name(),
                                &plan.columns[j].source,
                            )?;
                            if n == 0 {
                                // The first row types the VALUES columns; the rest follow.
                                let _ = write!(self.sql, "::{}", plan.columns[j].type_name);
                            }
                        }
                        self.sql.push(')');
                    }
                    self.sql.push(')');
                }
                let _ = write!(self.sql, " AS v({names}) WHERE {matches};");
                self.send_if_full().await?;
            }
        }
        Ok(())
    }

    /// Append `(v1,v2,...)`: the values of the given plan columns, as literals.
    fn push_row<'a>(
        sql: &mut String,
        plan: &TablePlan,
        values: impl Iterator<Item = (usize, &'a ColumnValue)>,
    ) -> Result<()> {
        sql.push('(');
        for (n, (j, v)) in values.enumerate() {
            if n > 0 {
                sql.push(',');
            }
            Self::push_value(sql, v, plan.source_name(), &plan.columns[j].source)?;
        }
        sql.push(')');
        Ok(())
    }

    async fn send_if_full(&mut self) -> Result<()> {
        if self.sql.len() >= MAX_SQL_BYTES {
            self.send().await?;
        }
        Ok(())
    }

    /// Wait for the group in flight, if any; then, between source transactions, commit the
    /// open target transaction, if any, with the progress row, and wait until the target
    /// holds every committed group durably. Returns the progress that became durable since
    /// it was last handed out (`None`: none did).
    pub async fn flush(&mut self) -> Result<Option<Progress>> {
        self.settle().await?;
        if self.txn.is_some() {
            return Ok(self.announce.take());
        }
        if self.in_group {
            // (A BEGIN buffered with no source transaction finished yet: nothing to commit,
            // and the target may hold the group's transaction open.)
            self.flush_group(true).await?;
            return Ok(self.announce.take());
        }
        if self.unflushed.is_empty() {
            return Ok(self.announce.take());
        }
        // Groups committed without waiting: a write committed with a wait for the flush
        // (the progress row, unchanged) makes every earlier commit durable too.
        let sql = format!(
            "BEGIN; UPDATE cutover.progress SET updated_at = now() WHERE job = {}; COMMIT;",
            quote_literal(&self.job)
        );
        self.client
            .batch_execute(&sql)
            .await
            .map_err(|e| self.apply_error(e))?;
        if let Some(&(_, p)) = self.unflushed.back() {
            self.durable = p;
            self.announce = Some(p);
        }
        self.unflushed.clear();
        Ok(self.announce.take())
    }

    /// Commit the open group with the progress row. With `sync`, the commit waits for the
    /// target's WAL flush, which makes every earlier group durable too. Without, it does
    /// not: the target's WAL writer flushes it within moments, as PostgreSQL's own apply
    /// worker lets it (its `synchronous_commit` is `off`), and the group becomes durable
    /// when a later group (or a `flush`) finds the target's flush position past it. Either
    /// way the slot is only ever confirmed to durable progress, so a target crash loses
    /// nothing: the source streams the lost groups again.
    ///
    /// Without `sync`, and with [`Applier::overlap_groups`] on, the answer is not waited
    /// for either: the next group is built while the target runs this one, and sent (like
    /// anything else) only once this one has committed, so a group never commits after one
    /// that failed. Otherwise the answer is waited for. What became durable is handed out
    /// by the next `commit` or `flush`.
    async fn flush_group(&mut self, sync: bool) -> Result<()> {
        let Some(last) = self.last_in_group else {
            // BEGIN buffered but no source transaction finished: nothing to commit yet.
            return Ok(());
        };
        self.send_ahead().await?;
        self.ending_group = true;
        let flushed = self.flush_queues().await;
        self.ending_group = false;
        flushed?;
        self.close_statement();
        let job = quote_literal(&self.job);
        for (table, p) in self.paused.iter_mut().filter(|(_, p)| p.dirty) {
            if let Some(since) = p.since {
                let _ = write!(
                    self.sql,
                    "UPDATE cutover.tables SET paused_lsn = '{since}', attention = {} WHERE job = {job} AND source_table = {};",
                    quote_literal(&p.reason),
                    quote_literal(&table.to_string())
                );
            }
        }
        // Resumed tables have caught up once the group passes where the target was; until
        // then their resume point moves past what this group applied, in this group.
        let caught_up: Vec<TableName> = if last.commit_lsn >= self.horizon {
            self.resuming.keys().cloned().collect()
        } else {
            for (table, at) in self
                .resuming
                .iter_mut()
                .filter(|(_, at)| **at < last.end_lsn)
            {
                *at = last.end_lsn;
                let _ = write!(
                    self.sql,
                    "UPDATE cutover.tables SET paused_lsn = '{at}' WHERE job = {job} AND source_table = {};",
                    quote_literal(&table.to_string())
                );
            }
            Vec::new()
        };
        for table in &caught_up {
            let _ = write!(
                self.sql,
                "UPDATE cutover.tables SET paused_lsn = NULL, attention = NULL WHERE job = {job} AND source_table = {};",
                quote_literal(&table.to_string())
            );
        }
        // A replayed group (a resumed table catching up) never moves the progress back.
        let written = if last.commit_lsn >= self.committed.commit_lsn {
            last
        } else {
            self.committed
        };
        let _ = write!(
            self.sql,
            "INSERT INTO cutover.progress (job, commit_lsn, end_lsn, updated_at) VALUES ({job}, '{}', '{}', now()) \
             ON CONFLICT (job) DO UPDATE SET commit_lsn = EXCLUDED.commit_lsn, end_lsn = EXCLUDED.end_lsn, updated_at = now();",
            written.commit_lsn, written.end_lsn
        );
        let waits = sync || !self.commit_without_flush;
        if waits {
            self.sql.push_str(" COMMIT;");
        } else {
            self.sql.push_str(
                " SET LOCAL synchronous_commit = off; COMMIT; \
                 SELECT pg_catalog.pg_current_wal_insert_lsn()::text, pg_catalog.pg_current_wal_flush_lsn()::text;",
            );
        }
        // Nothing is sent before the group in flight has committed (so a group never
        // commits after one that failed).
        self.settle().await?;
        let answer = self
            .client
            .simple_query_raw(&self.sql)
            .await
            .map_err(|e| self.apply_error(e));
        self.sql.clear();
        self.in_flight = Some(InFlight {
            answer: Box::pin(answer?),
            row: None,
            written,
            waits,
            upto: last.commit_lsn,
            sent: Instant::now(),
            transactions: self.group_txns,
            rows: self.group_rows,
            group_ms: self.group_started.elapsed().as_millis() as u64,
        });
        self.in_group = false;
        if self.spare.is_some() {
            self.flight_footprint = Some(std::mem::take(&mut self.footprint));
        }
        self.committed = written;
        self.last_in_group = None;
        for p in self.paused.values_mut() {
            p.dirty = false;
        }
        for table in caught_up {
            self.resuming.remove(&table);
        }
        // The group's changed keys (already in `touched`) wait to be verified again.
        if !self.touched.tables.is_empty() {
            self.touched.since.get_or_insert_with(Instant::now);
        }
        if sync || !self.overlap {
            self.settle().await?;
        }
        Ok(())
    }

    /// Let a full group stay in flight while the next one is built (off by default: each
    /// group's answer is waited for). The stream turns it on for jobs without tables
    /// evaluated on the source: over TCP it gained 12% in an A/B (8 of 8 pairs), but a
    /// mapped job over a unix socket lost about 17% with it (docs/benchmarks.md, session 9).
    pub fn overlap_groups(&mut self, on: bool) {
        self.overlap = on;
    }

    /// Whether a group was sent and is not answered yet.
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Wait for the group in flight, if any; returns progress that became durable.
    pub async fn wait_in_flight(&mut self) -> Result<Option<Progress>> {
        self.settle().await?;
        Ok(self.announce.take())
    }

    /// [`Applier::wait_in_flight`], for at most `limit` (then the group stays in flight).
    pub async fn wait_in_flight_at_most(&mut self, limit: Duration) -> Result<Option<Progress>> {
        // (No early part exists between groups: `settle` is cancel-safe here.)
        match tokio::time::timeout(limit, self.settle()).await {
            Ok(done) => done.map(|()| self.announce.take()),
            Err(_) => Ok(None),
        }
    }

    /// Whether groups may overlap on two target sessions (see [`Applier::add_session`]).
    pub fn has_second_session(&self) -> bool {
        self.spare.is_some()
    }

    /// Wait for the answer to the group in flight, if any. Its progress becomes durable
    /// at once when its commit waited for the flush, else once the target's flush
    /// position passes its commit (this group's or a later one's). What became durable is
    /// handed out by the next `commit` or `flush`. Cancel-safe: dropped while waiting, the
    /// group stays in flight.
    async fn settle(&mut self) -> Result<()> {
        if self.in_flight.is_none() {
            return self.finish_ahead().await;
        }
        let mut check = tokio::time::Instant::now() + AHEAD_LOCK_CHECK;
        while let Some(flight) = self.in_flight.as_mut() {
            // Beside an early part on the other session, its answers are read meanwhile,
            // and once it is done, the group in flight is checked now and then for a wait
            // on a lock.
            let event = match self.ahead.as_mut().filter(|a| !a.undone) {
                None => Settling::Answer(flight.answer.next().await),
                Some(ahead) => {
                    let early_done = ahead.answers.is_empty();
                    tokio::select! {
                        biased;
                        m = flight.answer.next() => Settling::Answer(m),
                        m = async {
                            match ahead.answers.front_mut() {
                                Some(a) => a.next().await,
                                None => None,
                            }
                        }, if !early_done => Settling::Early(m),
                        _ = tokio::time::sleep_until(check), if early_done => Settling::Check,
                    }
                }
            };
            match event {
                Settling::Answer(Some(Ok(SimpleQueryMessage::Row(row)))) => flight.row = Some(row),
                Settling::Answer(Some(Ok(_))) => {}
                Settling::Answer(Some(Err(e))) => {
                    let upto = flight.upto;
                    self.in_flight = None;
                    // The early part's transaction ends with its session, which the
                    // failed run drops.
                    self.ahead = None;
                    return Err(Self::apply_error_upto(Some(upto), e));
                }
                Settling::Answer(None) => break,
                Settling::Early(Some(Ok(_))) => {}
                Settling::Early(None) => {
                    if let Some(a) = self.ahead.as_mut() {
                        a.answers.pop_front();
                    }
                }
                Settling::Early(Some(Err(e))) => {
                    tracing::debug!(error = %e, "a group's early part failed; it is sent again after the group before");
                    self.undo_ahead().await?;
                }
                Settling::Check => {
                    check = tokio::time::Instant::now() + AHEAD_LOCK_CHECK;
                    if self.flight_waits_for_a_lock().await? {
                        tracing::info!(
                            "the group in flight waits for a lock: the next group's early part is rolled back, to be sent again after it"
                        );
                        self.undo_ahead().await?;
                    }
                }
            }
        }
        let Some(flight) = self.in_flight.take() else {
            return self.finish_ahead().await;
        };
        self.flight_footprint = None;
        let newly_durable = if flight.waits {
            self.unflushed.clear();
            Some(flight.written)
        } else {
            let lsn = |i: usize| {
                flight
                    .row
                    .as_ref()
                    .and_then(|r| r.get(i))
                    .and_then(|t| t.parse::<Lsn>().ok())
            };
            let (Some(inserted), Some(flushed)) = (lsn(0), lsn(1)) else {
                return Err(Error::transient(
                    "the target did not report its WAL positions after a commit",
                ));
            };
            self.unflushed.push_back((inserted, flight.written));
            let mut newest = None;
            while let Some(&(at, p)) = self.unflushed.front()
                && at <= flushed
            {
                newest = Some(p);
                self.unflushed.pop_front();
            }
            newest
        };
        metrics::histogram!("cutover_apply_batch_duration_seconds")
            .record(flight.sent.elapsed().as_secs_f64());
        tracing::debug!(
            transactions = flight.transactions,
            rows = flight.rows,
            waited_for_flush = flight.waits,
            group_ms = flight.group_ms,
            commit_ms = flight.sent.elapsed().as_millis() as u64,
            "committed a group"
        );
        if let Some(p) = newly_durable {
            self.durable = p;
            self.announce = Some(p);
        }
        self.stats.transactions += flight.transactions as u64;
        self.stats.rows += flight.rows;
        metrics::counter!("cutover_applied_transactions_total")
            .increment(flight.transactions as u64);
        metrics::counter!("cutover_applied_rows_total").increment(flight.rows);
        self.finish_ahead().await
    }

    /// Send the open group's early part on its session, while the group before still runs
    /// on the other: the net changes of keys that group did not change, and the rows
    /// appended to tables without any unique index, of tables that neither group changed
    /// in another way (ordered statements, DDL), and nothing at all beside a TRUNCATE.
    /// The rest (net changes of the keys it did change, ordered statements, progress,
    /// COMMIT) waits for the group before to commit. So the group before never needs a row
    /// or unique-index entry the early part holds, and, with no foreign-key checks or
    /// triggers (replica role), nothing else of it either; the early part may wait for the
    /// group before, never the other way round. Should the group before wait for a lock
    /// anyway (a third session's lock request queued between the two, or keys equal in
    /// the index but spelled differently), the early part is rolled back and sent again
    /// once it has committed (`settle`).
    async fn send_ahead(&mut self) -> Result<()> {
        if self.spare.is_none()
            || self.in_flight.is_none()
            || self.footprint.barrier
            || !self.sql.starts_with(GROUP_BEGIN)
        {
            return Ok(());
        }
        let Some(before) = self.flight_footprint.take() else {
            return Ok(());
        };
        let result = if before.barrier {
            Ok(())
        } else {
            self.send_ahead_of(&before).await
        };
        self.flight_footprint = Some(before);
        result
    }

    async fn send_ahead_of(&mut self, before: &Footprint) -> Result<()> {
        self.close_statement();
        let rest = self.sql.split_off(GROUP_BEGIN.len());
        let oids: Vec<u32> = self
            .queues
            .iter()
            .filter(|(oid, (_, q))| {
                !q.is_empty() && !before.ordered(**oid) && !self.footprint.in_order(**oid)
            })
            .map(|(oid, _)| *oid)
            .collect();
        let none = FastSet::default();
        self.sending_ahead = true;
        let mut result = Ok(());
        for oid in oids {
            if self
                .ahead
                .as_ref()
                .is_some_and(|a| a.bytes >= MAX_AHEAD_BYTES)
            {
                break;
            }
            let held = before.tables.get(&oid).map_or(&none, |t| &t.keys);
            result = self.flush_queue_except(oid, Some(held)).await;
            if result.is_err() {
                break;
            }
        }
        // What is left: anything once a part went, more than the BEGIN before.
        let left = if self.ahead.is_some() {
            !self.sql.is_empty()
        } else {
            self.sql.len() > GROUP_BEGIN.len()
        };
        if result.is_ok() && left {
            result = self.send().await;
        }
        self.sending_ahead = false;
        if self.ahead.is_some() {
            // The BEGIN went ahead.
            self.sql = rest;
            if self.stats.pipelined_groups == 0 {
                tracing::info!(
                    "groups overlap: a group's changes went ahead on the second target session while the group before ran"
                );
            }
            self.stats.pipelined_groups += 1;
            metrics::counter!("cutover_apply_pipelined_groups_total").increment(1);
        } else {
            self.sql.push_str(&rest);
        }
        self.queued_bytes = self.queues.values().map(|(_, q)| q.bytes).sum();
        result
    }

    /// Whether the group in flight (on the other session) waits for a lock. Asked on the
    /// open group's session, idle in its transaction once its early part is done.
    async fn flight_waits_for_a_lock(&self) -> Result<bool> {
        let Some(lane) = self.spare.as_ref() else {
            return Ok(false);
        };
        let sql = format!(
            "SELECT pg_catalog.cardinality(pg_catalog.pg_blocking_pids({})) > 0",
            lane.pid
        );
        let rows = self
            .client
            .simple_query(&sql)
            .await
            .map_err(|e| self.apply_error(e))?;
        Ok(rows
            .iter()
            .any(|m| matches!(m, SimpleQueryMessage::Row(r) if r.get(0) == Some("t"))))
    }

    /// Roll the early part back (it is sent again once the group before has committed).
    async fn undo_ahead(&mut self) -> Result<()> {
        let Some(ahead) = self.ahead.as_mut() else {
            return Ok(());
        };
        // Answers still due (a failed part's later pieces) are dropped unread.
        ahead.answers.clear();
        ahead.undone = true;
        self.stats.pipeline_restarts += 1;
        metrics::counter!("cutover_apply_pipeline_restarts_total").increment(1);
        self.client
            .batch_execute("ROLLBACK")
            .await
            .map_err(|e| self.apply_error(e))
    }

    /// After the group before has committed: read the rest of the early part's answers,
    /// or, if it was rolled back (or fails now), send it again.
    async fn finish_ahead(&mut self) -> Result<()> {
        while let Some(ahead) = self.ahead.as_mut().filter(|a| !a.undone) {
            let Some(answer) = ahead.answers.front_mut() else {
                break;
            };
            match answer.next().await {
                Some(Ok(_)) => {}
                None => {
                    ahead.answers.pop_front();
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "a group's early part failed; it is sent again in order");
                    self.undo_ahead().await?;
                }
            }
        }
        let Some(ahead) = self.ahead.take() else {
            return Ok(());
        };
        if ahead.undone {
            for piece in &ahead.sent {
                self.client
                    .batch_execute(piece)
                    .await
                    .map_err(|e| self.apply_error(e))?;
            }
        }
        Ok(())
    }
}

/// The target tables (of `oids`, and their partitions) with a trigger or rule that fires
/// under `session_replication_role = replica` (enabled `ALWAYS` or `REPLICA`): its effects
/// could reach rows of other tables, so groups must not overlap (see
/// [`Applier::add_session`]).
pub async fn fires_in_replica(client: &Client, oids: &[u32]) -> Result<Vec<String>> {
    let rows = client
        .query(
            "WITH RECURSIVE rel(oid) AS ( \
               SELECT unnest($1::oid[]) \
               UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i \
                     JOIN rel ON i.inhparent = rel.oid) \
             SELECT DISTINCT c.oid::regclass::text FROM pg_catalog.pg_class c \
             WHERE c.oid IN (SELECT oid FROM rel) AND ( \
               EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t \
                       WHERE t.tgrelid = c.oid AND t.tgenabled IN ('A', 'R')) \
               OR EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite r \
                          WHERE r.ev_class = c.oid AND r.ev_enabled IN ('A', 'R') \
                            AND r.rulename <> '_RETURN')) \
             ORDER BY 1",
            &[&oids],
        )
        .await
        .map_err(|e| Error::from_pg("read the target's triggers", "the target", &e))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What settling the group in flight waits for next.
enum Settling {
    Answer(Option<std::result::Result<SimpleQueryMessage, tokio_postgres::Error>>),
    Early(Option<std::result::Result<SimpleQueryMessage, tokio_postgres::Error>>),
    Check,
}
