//! Row-level blake3 reconciliation of source and target (issue 5).
//!
//! The verifier answers one question per mapped table: do the source and the target hold exactly
//! the same rows at one anchored position, and if not, which keys differ? It is split so that the
//! core needs no database:
//!
//! - [`canonical`]: the versioned, typed, length-prefixed byte encoding of a row and its
//!   domain-separated blake3 digest (no NULL / `''` / `'NULL'` or column-boundary collisions).
//! - [`batch`]: rows of one side held in their canonical framing in one buffer per batch, read
//!   back on demand (no per-row or per-field allocations).
//! - [`chunk`]: the comparison of two key-ordered row streams: chunk digests on the fast path,
//!   row-level narrowing only inside mismatching chunks; multiset comparison for keyless tables.
//! - [`hasher`]: a pool of hashing threads fed by bounded channels, off any async runtime, that
//!   turns a sequence of chunk byte buffers into digests in order.
//! - [`report`]: the `verify --json` document of the operator contract.
//!
//! Reading the two sides (`COPY … TO STDOUT` in key order under snapshots anchored at an LSN) is
//! the caller's job; [`copy_text`] parses the rows it yields.

pub mod batch;
pub mod canonical;
pub mod chunk;
pub mod copy_text;
pub mod hasher;
pub mod report;
