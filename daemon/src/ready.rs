//! Readiness: may the application switch to the target now?
//!
//! Why gates: a cutover script should not have to interpret lag numbers and phases
//! itself, and a DBA asking "why not yet?" wants the reason, not a boolean. So readiness
//! is a list of named gates, each either met or unmet with a one-line detail that says
//! what is missing. `GET /v1/ready` and `cutover ready` serve the same [`Readiness`]
//! document; gate names are stable (scripts may match on them), details are for humans.
//!
//! [`evaluate`] is a pure function of the status document and the `[ready]` settings, so
//! the daemon, the API and the tests agree on the answer.
//!
//! Gates so far: [`GATE_STREAMING`], [`GATE_SNAPSHOT`], [`GATE_TABLES`], [`GATE_LAG`],
//! [`GATE_VERIFIED`].

use std::time::Duration;

use cutover_config::ReadySpec;
use serde::{Deserialize, Serialize};

use crate::cli::format_duration;
use crate::status::{JobStatus, Phase};

/// The job is applying the stream (not copying, stopped or failed).
pub const GATE_STREAMING: &str = "streaming";
/// Every table's initial snapshot has been copied.
pub const GATE_SNAPSHOT: &str = "snapshot";
/// Replication lag is known and within `[ready] max_lag`.
pub const GATE_LAG: &str = "lag";
/// No table's apply is paused waiting for an operator.
pub const GATE_TABLES: &str = "tables";
/// The last verification pass, anchored at a source LSN, found no difference and is
/// younger than `[ready] max_verify_age`, and the keys changed since are compared again
/// and clean (re-verification keeps up within `[ready] max_lag` plus a few seconds).
pub const GATE_VERIFIED: &str = "verified";

/// At most this many table names are listed in the snapshot gate's detail.
const MAX_TABLES_NAMED: usize = 5;

/// The `[ready]` settings the gates are evaluated against.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadyConfig {
    /// The largest acceptable lag (`[ready] max_lag`, default 5s).
    pub max_lag: Duration,
    /// The oldest acceptable clean verification pass (`[ready] max_verify_age`, default 30m).
    pub max_verify_age: Duration,
}

impl Default for ReadyConfig {
    fn default() -> Self {
        Self {
            max_lag: Duration::from_secs(5),
            max_verify_age: Duration::from_secs(30 * 60),
        }
    }
}

impl From<&ReadySpec> for ReadyConfig {
    fn from(spec: &ReadySpec) -> Self {
        Self {
            max_lag: spec.max_lag,
            max_verify_age: spec.max_verify_age,
        }
    }
}

/// One unmet gate: its stable name and what is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gate {
    pub gate: String,
    pub detail: String,
}

/// The readiness document (`GET /v1/ready`, `cutover ready --json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Readiness {
    /// True when every gate holds.
    pub ready: bool,
    /// The gates that do not hold, in evaluation order. Empty when `ready`.
    pub unmet: Vec<Gate>,
    /// Every gate evaluated, met or not, in evaluation order.
    pub checked: Vec<String>,
    /// The job's name.
    pub job: String,
    /// The job's phase.
    pub phase: Phase,
}

/// Evaluates every gate against a status document.
pub fn evaluate(status: &JobStatus, cfg: &ReadyConfig) -> Readiness {
    let gates: [(&str, Option<String>); 5] = [
        (GATE_STREAMING, streaming_gate(status)),
        (GATE_SNAPSHOT, snapshot_gate(status)),
        (GATE_TABLES, tables_gate(status)),
        (GATE_LAG, lag_gate(status, cfg)),
        (GATE_VERIFIED, verified_gate(status, cfg)),
    ];
    let checked = gates.iter().map(|(name, _)| name.to_string()).collect();
    let unmet: Vec<Gate> = gates
        .into_iter()
        .filter_map(|(name, unmet)| {
            unmet.map(|detail| Gate {
                gate: name.to_string(),
                detail,
            })
        })
        .collect();
    Readiness {
        ready: unmet.is_empty(),
        unmet,
        checked,
        job: status.job.clone(),
        phase: status.phase,
    }
}

/// The contract's name of a phase, as it appears in the status document.
pub fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Snapshot => "snapshot",
        Phase::Streaming => "streaming",
        Phase::Stopped => "stopped",
        Phase::Failed => "failed",
    }
}

fn streaming_gate(status: &JobStatus) -> Option<String> {
    match status.phase {
        Phase::Streaming => None,
        Phase::Snapshot => {
            Some("phase is \"snapshot\": the initial copy is still running".to_string())
        }
        Phase::Stopped => Some("phase is \"stopped\": the job is not running".to_string()),
        Phase::Failed => Some(match &status.error {
            Some(error) => format!("phase is \"failed\": {error}"),
            None => "phase is \"failed\"".to_string(),
        }),
    }
}

fn snapshot_gate(status: &JobStatus) -> Option<String> {
    let pending: Vec<&str> = status
        .tables
        .iter()
        .filter(|t| !t.snapshot_done)
        .map(|t| t.source.as_str())
        .collect();
    if pending.is_empty() {
        return None;
    }
    let total = status.tables.len();
    let noun = if total == 1 { "table" } else { "tables" };
    let mut named = pending[..pending.len().min(MAX_TABLES_NAMED)].join(", ");
    if pending.len() > MAX_TABLES_NAMED {
        named.push_str(&format!(" and {} more", pending.len() - MAX_TABLES_NAMED));
    }
    Some(format!(
        "{} of {total} {noun} not copied yet: {named}",
        pending.len()
    ))
}

fn tables_gate(status: &JobStatus) -> Option<String> {
    let paused: Vec<String> = status
        .tables
        .iter()
        .filter_map(|t| {
            t.needs_attention
                .as_ref()
                .map(|why| format!("{}: {why}", t.source))
        })
        .collect();
    match paused.len() {
        0 => None,
        1 => Some(format!("the apply of a table is paused: {}", paused[0])),
        n => Some(format!(
            "the apply of {n} tables is paused: {}",
            paused[..n.min(MAX_TABLES_NAMED)].join("; ")
        )),
    }
}

fn verified_gate(status: &JobStatus, cfg: &ReadyConfig) -> Option<String> {
    let Some(v) = &status.last_verification else {
        return Some(
            "no verification pass has finished yet (passes run every [verify] every; cutover verify runs one now)"
                .to_string(),
        );
    };
    let at = v.lsn.as_deref().unwrap_or("an unanchored position");
    if !v.tables_equal {
        return Some(format!(
            "the last verification pass (at {at}, finished {}) found {} differences; see GET /v1/verify/latest",
            v.finished_at, v.differences
        ));
    }
    let age = v
        .finished
        .and_then(|f| f.elapsed().ok())
        .unwrap_or(Duration::MAX);
    if age > cfg.max_verify_age {
        return Some(format!(
            "the last clean verification pass finished at {}, more than {} ago ([ready] max_verify_age)",
            v.finished_at,
            format_duration(cfg.max_verify_age)
        ));
    }
    let r = &status.reverify;
    if r.suspect_keys > 0 {
        return Some(format!(
            "{} changed keys differed when compared again (at {}); they are compared again until clean",
            r.suspect_keys,
            r.last_round_lsn.as_deref().unwrap_or("?")
        ));
    }
    if !r.tables_awaiting_full_pass.is_empty() {
        return Some(format!(
            "changes keys cannot name (no key, TRUNCATE, or too many) await the next full pass: {}",
            r.tables_awaiting_full_pass.join(", ")
        ));
    }
    let behind = r
        .pending_since
        .map(|t| t.elapsed())
        .filter(|&a| a > cfg.max_lag + REVERIFY_SLACK);
    if let Some(age) = behind {
        return Some(format!(
            "{} changed keys wait to be compared again, the oldest for {} (limit [ready] max_lag + {})",
            r.pending_keys,
            format_seconds(age.as_secs_f64()),
            format_duration(REVERIFY_SLACK)
        ));
    }
    None
}

/// How long past `[ready] max_lag` a changed key may wait to be compared again.
pub const REVERIFY_SLACK: Duration = Duration::from_secs(10);

fn lag_gate(status: &JobStatus, cfg: &ReadyConfig) -> Option<String> {
    let limit = format_duration(cfg.max_lag);
    let seconds = status.lag_seconds.filter(|s| s.is_finite());
    match (status.lag_bytes, seconds) {
        (None, _) => Some(format!(
            "lag is not known yet (no source position compared); limit is {limit} ([ready] max_lag)"
        )),
        (Some(bytes), None) => Some(format!(
            "lag is {bytes} bytes but its age in seconds is not known yet; limit is {limit} \
             ([ready] max_lag)"
        )),
        (Some(bytes), Some(secs)) if secs > cfg.max_lag.as_secs_f64() => Some(format!(
            "lag is {} ({bytes} bytes), above the limit of {limit} ([ready] max_lag)",
            format_seconds(secs)
        )),
        (Some(_), Some(_)) => None,
    }
}

/// `0.25s`, `12s`, `1.5s`: seconds with at most three decimals.
pub fn format_seconds(secs: f64) -> String {
    let text = format!("{secs:.3}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}s")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{TableStatus, VerificationSummary};

    fn table(name: &str, done: bool) -> TableStatus {
        TableStatus {
            source: format!("public.{name}"),
            target: format!("v2.{name}"),
            rows_copied: 10,
            bytes_copied: 100,
            snapshot_done: done,
            needs_attention: None,
            notes: Vec::new(),
        }
    }

    fn ready_status() -> JobStatus {
        let mut status = JobStatus::new("shop");
        status.phase = Phase::Streaming;
        status.tables = vec![table("orders", true), table("items", true)];
        status.lag_bytes = Some(0);
        status.lag_seconds = Some(0.2);
        status.last_verification = Some(clean_pass(Duration::from_secs(60)));
        status
    }

    fn clean_pass(age: Duration) -> VerificationSummary {
        VerificationSummary {
            finished_at: "2026-01-01T00:00:00Z".into(),
            lsn: Some("0/1000".into()),
            tables_equal: true,
            differences: 0,
            finished: Some(std::time::SystemTime::now() - age),
        }
    }

    #[test]
    fn verified_gate_needs_a_fresh_clean_pass() {
        let cfg = ReadyConfig::default();
        let mut status = ready_status();
        status.last_verification = None;
        let r = evaluate(&status, &cfg);
        assert!(
            unmet(&r, "verified")
                .unwrap()
                .contains("no verification pass")
        );
        status.last_verification = Some(clean_pass(Duration::from_secs(31 * 60)));
        let r = evaluate(&status, &cfg);
        assert!(unmet(&r, "verified").unwrap().contains("max_verify_age"));
        let mut dirty = clean_pass(Duration::from_secs(1));
        dirty.tables_equal = false;
        dirty.differences = 3;
        status.last_verification = Some(dirty);
        let r = evaluate(&status, &cfg);
        let detail = unmet(&r, "verified").unwrap();
        assert!(
            detail.contains("found 3 differences") && detail.contains("0/1000"),
            "{detail}"
        );
        status.last_verification = Some(clean_pass(Duration::from_secs(1)));
        assert!(evaluate(&status, &cfg).ready);
        // A changed key that differed when compared again revokes it until clean.
        status.reverify.suspect_keys = 1;
        status.reverify.last_round_lsn = Some("0/2000".into());
        let detail = evaluate(&status, &cfg);
        assert!(unmet(&detail, "verified").unwrap().contains("differed"));
        status.reverify.suspect_keys = 0;
        status.reverify.tables_awaiting_full_pass = vec!["public.bag".into()];
        assert!(
            unmet(&evaluate(&status, &cfg), "verified")
                .unwrap()
                .contains("public.bag")
        );
        status.reverify.tables_awaiting_full_pass.clear();
        status.reverify.pending_keys = 7;
        status.reverify.pending_since = Some(std::time::Instant::now() - Duration::from_secs(60));
        assert!(
            unmet(&evaluate(&status, &cfg), "verified")
                .unwrap()
                .contains("7 changed keys")
        );
        status.reverify.pending_since = Some(std::time::Instant::now());
        assert!(evaluate(&status, &cfg).ready);
    }

    fn unmet<'a>(r: &'a Readiness, gate: &str) -> Option<&'a str> {
        r.unmet
            .iter()
            .find(|g| g.gate == gate)
            .map(|g| g.detail.as_str())
    }

    #[test]
    fn all_gates_met_is_ready() {
        let r = evaluate(&ready_status(), &ReadyConfig::default());
        assert!(r.ready, "{r:?}");
        assert!(r.unmet.is_empty());
        assert_eq!(
            r.checked,
            ["streaming", "snapshot", "tables", "lag", "verified"]
        );
        assert_eq!(r.job, "shop");
    }

    #[test]
    fn tables_gate_names_paused_tables() {
        let mut status = ready_status();
        status.tables[1].needs_attention = Some("column \"sku\" was renamed".into());
        let r = evaluate(&status, &ReadyConfig::default());
        assert!(!r.ready);
        let detail = unmet(&r, "tables").expect("tables gate unmet");
        assert!(detail.contains("public.items"), "{detail}");
        assert!(detail.contains("renamed"), "{detail}");
        assert_eq!(r.unmet.len(), 1);
    }

    #[test]
    fn streaming_gate_names_the_phase() {
        let mut s = ready_status();
        s.phase = Phase::Snapshot;
        let r = evaluate(&s, &ReadyConfig::default());
        assert!(!r.ready);
        assert!(unmet(&r, GATE_STREAMING).unwrap().contains("\"snapshot\""));

        s.phase = Phase::Failed;
        s.error = Some("target rejected a row".into());
        let r = evaluate(&s, &ReadyConfig::default());
        let detail = unmet(&r, GATE_STREAMING).unwrap();
        assert!(detail.contains("\"failed\""), "{detail}");
        assert!(detail.contains("target rejected a row"), "{detail}");

        s.phase = Phase::Stopped;
        let r = evaluate(&s, &ReadyConfig::default());
        assert!(unmet(&r, GATE_STREAMING).unwrap().contains("\"stopped\""));
        assert_eq!(r.unmet.len(), 1, "{r:?}");
    }

    #[test]
    fn snapshot_gate_names_pending_tables_capped() {
        let mut s = ready_status();
        s.tables[1].snapshot_done = false;
        let r = evaluate(&s, &ReadyConfig::default());
        assert_eq!(
            unmet(&r, GATE_SNAPSHOT),
            Some("1 of 2 tables not copied yet: public.items")
        );

        s.tables = (0..8).map(|i| table(&format!("t{i}"), false)).collect();
        let r = evaluate(&s, &ReadyConfig::default());
        let detail = unmet(&r, GATE_SNAPSHOT).unwrap();
        assert!(
            detail.starts_with("8 of 8 tables not copied yet: public.t0,"),
            "{detail}"
        );
        assert!(detail.contains("public.t4 and 3 more"), "{detail}");
        assert!(!detail.contains("public.t5"), "{detail}");
    }

    #[test]
    fn lag_gate_needs_known_lag_within_the_limit() {
        let cfg = ReadyConfig::default();
        let mut s = ready_status();
        s.lag_bytes = None;
        s.lag_seconds = None;
        let r = evaluate(&s, &cfg);
        assert!(unmet(&r, GATE_LAG).unwrap().contains("not known"));

        s.lag_bytes = Some(4096);
        let r = evaluate(&s, &cfg);
        assert!(unmet(&r, GATE_LAG).unwrap().contains("not known"));

        s.lag_seconds = Some(f64::NAN);
        assert!(!evaluate(&s, &cfg).ready);

        s.lag_seconds = Some(12.5);
        let r = evaluate(&s, &cfg);
        assert_eq!(
            unmet(&r, GATE_LAG),
            Some("lag is 12.5s (4096 bytes), above the limit of 5s ([ready] max_lag)")
        );

        s.lag_seconds = Some(5.0);
        assert!(evaluate(&s, &cfg).ready);
    }

    #[test]
    fn readiness_serializes_with_the_contract_fields() {
        let mut s = ready_status();
        s.phase = Phase::Snapshot;
        let doc = serde_json::to_value(evaluate(&s, &ReadyConfig::default())).unwrap();
        assert_eq!(doc["ready"], false);
        assert_eq!(doc["phase"], "snapshot");
        assert_eq!(doc["unmet"][0]["gate"], "streaming");
        assert!(doc["unmet"][0]["detail"].is_string());
    }

    #[test]
    fn seconds_format_compactly() {
        assert_eq!(format_seconds(0.25), "0.25s");
        assert_eq!(format_seconds(12.0), "12s");
        assert_eq!(format_seconds(1.23456), "1.235s");
    }
}
