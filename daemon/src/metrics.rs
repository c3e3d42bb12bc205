//! Prometheus metrics: every metric name in one place, and the recorder behind
//! `GET /metrics`.
//!
//! Why constants: dashboards and alerts are written against metric names, so the names
//! are part of the interface. Components record through the `metrics` facade
//! (`::metrics::counter!(metrics::APPLIED_ROWS_TOTAL).increment(n)`) using these
//! constants, never string literals, so a rename is one edit and a typo is a compile
//! error. Names follow Prometheus conventions as Vector and Supabase's ETL do: a
//! `cutover_` prefix, base units in the name (`_bytes`, `_seconds`), `_total` for
//! counters.
//!
//! [`install`] installs the process-wide recorder once; later calls (several API servers
//! in one test binary) get the same handle.

use std::sync::OnceLock;

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::status::JobStatus;

/// Gauge: WAL bytes between the source's current position and the applied position.
pub const LAG_BYTES: &str = "cutover_lag_bytes";
/// Gauge: age in seconds of the oldest source change not yet applied on the target.
pub const LAG_SECONDS: &str = "cutover_lag_seconds";
/// Counter: source transactions committed on the target.
pub const APPLIED_TRANSACTIONS_TOTAL: &str = "cutover_applied_transactions_total";
/// Counter: row changes (insert, update, delete) applied on the target.
pub const APPLIED_ROWS_TOTAL: &str = "cutover_applied_rows_total";
/// Counter: target transactions (groups) whose early part was sent on the second apply
/// session while the group before still ran.
pub const APPLY_PIPELINED_GROUPS_TOTAL: &str = "cutover_apply_pipelined_groups_total";
/// Counter: early parts rolled back and sent again after the group before committed (it
/// waited for a lock, or the early part failed).
pub const APPLY_PIPELINE_RESTARTS_TOTAL: &str = "cutover_apply_pipeline_restarts_total";
/// Counter: rows copied by the initial snapshot.
pub const SNAPSHOT_ROWS_TOTAL: &str = "cutover_snapshot_rows_total";
/// Counter: bytes copied by the initial snapshot.
pub const SNAPSHOT_BYTES_TOTAL: &str = "cutover_snapshot_bytes_total";
/// Histogram: time to apply one batch on the target, in seconds.
pub const APPLY_BATCH_DURATION_SECONDS: &str = "cutover_apply_batch_duration_seconds";
/// Gauge: WAL the job's replication slot keeps on the source, in bytes.
pub const SLOT_RETAINED_WAL_BYTES: &str = "cutover_slot_retained_wal_bytes";
/// Counter: reconnections to the source after a lost connection.
pub const SOURCE_RECONNECTS_TOTAL: &str = "cutover_source_reconnects_total";
/// Counter: reconnections to the target after a lost connection.
pub const TARGET_RECONNECTS_TOTAL: &str = "cutover_target_reconnects_total";

/// Counter: rows compared by verification passes.
pub const VERIFY_ROWS_TOTAL: &str = "cutover_verify_rows_total";
/// Counter: differences found by verification passes.
pub const VERIFY_DIFFERENCES_TOTAL: &str = "cutover_verify_differences_total";
/// Counter: verification passes finished.
pub const VERIFY_PASSES_TOTAL: &str = "cutover_verify_passes_total";
/// Histogram: duration of one verification pass, in seconds.
pub const VERIFY_PASS_DURATION_SECONDS: &str = "cutover_verify_pass_duration_seconds";
/// Gauge: changed keys waiting to be verified again.
pub const VERIFY_REVERIFY_QUEUE: &str = "cutover_verify_reverify_queue";

/// Every counter, so [`install`] can register them at zero (absent and zero differ in
/// PromQL: `rate()` over a counter that appears late misses its first increments).
pub const COUNTERS: [&str; 11] = [
    APPLIED_TRANSACTIONS_TOTAL,
    APPLIED_ROWS_TOTAL,
    APPLY_PIPELINED_GROUPS_TOTAL,
    APPLY_PIPELINE_RESTARTS_TOTAL,
    SNAPSHOT_ROWS_TOTAL,
    SNAPSHOT_BYTES_TOTAL,
    SOURCE_RECONNECTS_TOTAL,
    TARGET_RECONNECTS_TOTAL,
    VERIFY_ROWS_TOTAL,
    VERIFY_DIFFERENCES_TOTAL,
    VERIFY_PASSES_TOTAL,
];

/// Buckets of [`APPLY_BATCH_DURATION_SECONDS`]: 1ms to 30s.
const APPLY_BATCH_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Registers the help text and unit of every metric with the installed recorder.
pub fn describe_all() {
    describe_counter!(
        VERIFY_ROWS_TOTAL,
        Unit::Count,
        "Rows compared by verification passes."
    );
    describe_counter!(
        VERIFY_DIFFERENCES_TOTAL,
        Unit::Count,
        "Differences found by verification passes."
    );
    describe_counter!(
        VERIFY_PASSES_TOTAL,
        Unit::Count,
        "Verification passes finished."
    );
    describe_histogram!(
        VERIFY_PASS_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of one verification pass."
    );
    describe_gauge!(
        VERIFY_REVERIFY_QUEUE,
        Unit::Count,
        "Changed keys waiting to be verified again."
    );
    describe_gauge!(
        LAG_BYTES,
        Unit::Bytes,
        "WAL bytes between the source's current position and the last applied position."
    );
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Age of the oldest source change not yet applied on the target."
    );
    describe_counter!(
        APPLIED_TRANSACTIONS_TOTAL,
        Unit::Count,
        "Source transactions committed on the target."
    );
    describe_counter!(
        APPLY_PIPELINED_GROUPS_TOTAL,
        Unit::Count,
        "Groups whose early part ran on the second apply session beside the group before."
    );
    describe_counter!(
        APPLY_PIPELINE_RESTARTS_TOTAL,
        Unit::Count,
        "Early parts rolled back and sent again after the group before committed."
    );
    describe_counter!(
        APPLIED_ROWS_TOTAL,
        Unit::Count,
        "Row changes (insert, update, delete) applied on the target."
    );
    describe_counter!(
        SNAPSHOT_ROWS_TOTAL,
        Unit::Count,
        "Rows copied by the initial snapshot."
    );
    describe_counter!(
        SNAPSHOT_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes copied by the initial snapshot."
    );
    describe_histogram!(
        APPLY_BATCH_DURATION_SECONDS,
        Unit::Seconds,
        "Time to apply one batch of changes on the target."
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL retained on the source by the job's replication slot."
    );
    describe_counter!(
        SOURCE_RECONNECTS_TOTAL,
        Unit::Count,
        "Reconnections to the source after a lost connection."
    );
    describe_counter!(
        TARGET_RECONNECTS_TOTAL,
        Unit::Count,
        "Reconnections to the target after a lost connection."
    );
}

/// Installs the Prometheus recorder as the process-wide `metrics` recorder (once) and
/// returns the handle that renders `GET /metrics`. Idempotent.
///
/// If another recorder was installed first (by a test harness, say), the handle renders
/// a private recorder that receives nothing; the API still answers.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(APPLY_BATCH_DURATION_SECONDS.to_string()),
                    &APPLY_BATCH_BUCKETS,
                )
                .expect("the bucket list is not empty");
            let handle = match builder.install_recorder() {
                Ok(handle) => handle,
                Err(error) => {
                    tracing::warn!(
                        "cannot install the Prometheus recorder: {error}; GET /metrics will \
                         report no values"
                    );
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe_all();
            for name in COUNTERS {
                ::metrics::counter!(name).increment(0);
            }
            handle
        })
        .clone()
}

/// Sets the gauges that mirror the status document (lag, retained WAL), so a scrape
/// always agrees with `GET /v1/status`. Unknown values are left as they were.
pub fn record_status(status: &JobStatus) {
    if let Some(bytes) = status.lag_bytes {
        ::metrics::gauge!(LAG_BYTES).set(bytes as f64);
    }
    if let Some(seconds) = status.lag_seconds.filter(|s| s.is_finite()) {
        ::metrics::gauge!(LAG_SECONDS).set(seconds);
    }
    if let Some(bytes) = status.slot_retained_bytes {
        ::metrics::gauge!(SLOT_RETAINED_WAL_BYTES).set(bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent_and_renders_every_counter() {
        let first = install();
        let second = install();
        ::metrics::counter!(APPLIED_ROWS_TOTAL).increment(3);
        ::metrics::histogram!(APPLY_BATCH_DURATION_SECONDS).record(0.02);
        let mut status = JobStatus::new("t");
        status.lag_bytes = Some(42);
        record_status(&status);
        let text = second.render();
        let sorted = |text: &str| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(&text), sorted(&first.render()));
        for name in COUNTERS {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
        assert!(text.contains("cutover_lag_bytes 42"), "{text}");
        assert!(
            text.contains("cutover_apply_batch_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("# HELP cutover_applied_rows_total"), "{text}");
    }

    #[test]
    fn names_use_the_prefix_and_base_units() {
        for name in COUNTERS {
            assert!(
                name.starts_with("cutover_") && name.ends_with("_total"),
                "{name}"
            );
        }
        for name in [LAG_BYTES, SLOT_RETAINED_WAL_BYTES] {
            assert!(name.ends_with("_bytes"), "{name}");
        }
    }
}
