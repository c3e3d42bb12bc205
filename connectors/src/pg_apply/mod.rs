//! The PostgreSQL apply: the initial copy into the target, and the stream applied
//! exactly once.
//!
//! Exactly-once rests on one rule: every target transaction that applies source changes
//! also writes, in the same transaction, the commit LSN of the last source transaction
//! it holds (`cutover.progress`). After any crash the target says how far it got, and a
//! source transaction whose commit LSN is not above that is skipped whole. The slot is
//! told only what a committed target transaction holds, so nothing the target lacks is
//! ever released by the source.

mod apply;
mod arrays;
mod copy;
mod create;
mod indexes;
mod mapper;
mod net;
mod plan;
mod state;

pub use apply::{
    Applier, ApplyStats, GroupLimits, Paused, TablesAtStart, Touched, TouchedKeys, fires_in_replica,
};
pub use copy::{
    CopyChunk, CopyCounters, CopyTask, PAGE_BYTES, copy_chunk, mark_done, plan_chunks,
    truncate_target,
};
pub use create::{TableDefinition, create_table_sql, create_target_table};
pub use indexes::{defer_indexes, restore_indexes_and_mark_done, undo_interrupted_deferrals};
pub use mapper::{Mapper, Shape, Step};
pub use plan::{ColumnMap, Filter, MappingSpec, TablePlan, plan_table};
pub use state::{
    Progress, TableState, ensure_state_schema, job_lock_key, join_job_lock, join_job_lock_raw,
    lock_job, mark_table_started, read_progress, read_table_states,
};
