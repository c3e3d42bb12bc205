//! Row-level blake3 reconciliation of source and target (issue 5).
