//! The job's observable state: what `cutover status` prints and `GET /v1/status` serves.
//!
//! The field names under "Fields that scripts read" in `shared/contract.md` are stable.

use std::sync::{Arc, RwLock};

use serde::Serialize;

/// The phase of a job, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Provisioning or copying the initial snapshot.
    Snapshot,
    /// Applying the stream.
    Streaming,
    /// Stopped cleanly.
    Stopped,
    /// Stopped by an error that needs an operator.
    Failed,
}

/// Snapshot progress of one table.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TableStatus {
    /// `schema.table` on the source.
    pub source: String,
    /// `schema.table` on the target.
    pub target: String,
    pub rows_copied: u64,
    pub bytes_copied: u64,
    pub snapshot_done: bool,
    /// Set when the table's apply is paused until an operator acts (its mapping no
    /// longer holds after DDL on the source): what happened and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_attention: Option<String>,
    /// What the job noticed and handled on its own (source DDL it followed, columns it
    /// ignored), most recent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The last verification pass (`null` until one finished).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerificationSummary {
    pub finished_at: String,
    /// The source position compared at (the first anchor of the pass).
    pub lsn: Option<String>,
    /// Every table compared equal.
    pub tables_equal: bool,
    pub differences: u64,
    /// When it finished, for the readiness gate (not in the document: `finished_at` is).
    #[serde(skip)]
    pub finished: Option<std::time::SystemTime>,
}

/// Re-verification of changed keys between full passes.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct ReverifyStatus {
    /// Target keys changed (and applied) that have not been compared again yet.
    pub pending_keys: u64,
    /// Keys whose last comparison found a difference (each is compared again until clean).
    pub suspect_keys: u64,
    /// The source position of the last re-verification round.
    pub last_round_lsn: Option<String>,
    /// Tables changed in ways keys cannot name (no key, TRUNCATE, too many keys): only the
    /// next full pass verifies them again.
    pub tables_awaiting_full_pass: Vec<String>,
    /// When the oldest pending key was applied (for the readiness gate).
    #[serde(skip)]
    pub pending_since: Option<std::time::Instant>,
}

/// The whole status document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobStatus {
    pub job: String,
    pub phase: Phase,
    /// The source's current WAL position (`pg_current_wal_lsn()`), as last polled.
    pub source_lsn: Option<String>,
    /// The end LSN of the last source transaction committed on the target.
    pub applied_lsn: Option<String>,
    pub lag_bytes: Option<u64>,
    pub lag_seconds: Option<f64>,
    pub tables: Vec<TableStatus>,
    pub last_verification: Option<VerificationSummary>,
    /// Keys changed since they were last verified, and what re-verifying them found.
    pub reverify: ReverifyStatus,
    /// Source transactions applied since the daemon started.
    pub applied_transactions: u64,
    /// Row changes applied since the daemon started.
    pub applied_rows: u64,
    /// The slot's retained WAL in bytes (`pg_current_wal_lsn() - restart_lsn`).
    pub slot_retained_bytes: Option<u64>,
    /// Source tables the job does not carry although they match `[source] tables` (or sit
    /// in a schema the job copies from): created after the job started, or left out. Their
    /// changes are not replicated; add them to the job (a restart copies them).
    pub unmapped_tables: Vec<String>,
    /// The error that stopped the job, or the incident being retried.
    pub error: Option<String>,
    /// When the status was last refreshed (RFC 3339, UTC).
    pub updated_at: String,
}

impl JobStatus {
    pub fn new(job: &str) -> Self {
        Self {
            job: job.to_string(),
            phase: Phase::Snapshot,
            source_lsn: None,
            applied_lsn: None,
            lag_bytes: None,
            lag_seconds: None,
            tables: Vec::new(),
            last_verification: None,
            reverify: ReverifyStatus::default(),
            applied_transactions: 0,
            applied_rows: 0,
            slot_retained_bytes: None,
            unmapped_tables: Vec::new(),
            error: None,
            updated_at: String::new(),
        }
    }
}

/// Shared, cheaply cloned handle on the live status. Writers hold the lock only to copy
/// values in; never across an `.await`.
#[derive(Clone)]
pub struct StatusHandle(Arc<RwLock<JobStatus>>);

impl StatusHandle {
    pub fn new(status: JobStatus) -> Self {
        Self(Arc::new(RwLock::new(status)))
    }

    pub fn snapshot(&self) -> JobStatus {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn update(&self, f: impl FnOnce(&mut JobStatus)) {
        let mut guard = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }
}
