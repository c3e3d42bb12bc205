//! Verification inside `cutover run`: full passes anchored at a source LSN
//! ([`crate::anchor`]) every `[verify] every`, and on request (`POST /v1/verify`, which
//! `cutover verify` uses when the daemon runs), published in the status
//! (`last_verification`), at `GET /v1/verify/latest` and in the metrics.
//!
//! A pass never starves the apply: the source side reads at most `[verify]
//! max_rows_per_second`, a pass starts (and each table of it) only while the lag is within
//! `[ready] max_lag`, and anchors are taken without pausing the apply for more than one
//! group commit. A pass renews its anchor once it is older than `[verify]
//! snapshot_max_age`, between tables or in the middle of one (going on after the last key
//! compared), so no snapshot holds back vacuum for long on either side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::{HashMap, HashSet};

use cutover_connectors::pg_apply::{TablePlan, Touched};
use cutover_connectors::{Lsn, TableName, pg_conn};
use cutover_verifier::report::{TableReport, VerifyReport};
use tokio::sync::{RwLock, mpsc, oneshot};

use crate::anchor::{self, Anchor, BarrierSender};
use crate::job::JobContext;
use crate::status::{Phase, VerificationSummary};

/// A request for a pass now; the answer is its report, or why there is none.
pub type PassRequest = oneshot::Sender<Result<VerifyReport, String>>;

/// What the API holds of the verifier.
#[derive(Clone)]
pub struct VerifierHandle {
    requests: mpsc::Sender<PassRequest>,
    latest: Arc<RwLock<Option<VerifyReport>>>,
}

impl VerifierHandle {
    /// Run a pass now (after the one running, if any) and wait for its report.
    pub async fn pass_now(&self) -> Result<VerifyReport, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .await
            .map_err(|_| "the verifier is not running".to_string())?;
        rx.await
            .map_err(|_| "the verifier stopped before the pass finished".to_string())?
    }

    /// The report of the last pass, if there was one.
    pub async fn latest(&self) -> Option<VerifyReport> {
        self.latest.read().await.clone()
    }
}

/// How often changed keys are compared again (when there are any).
pub const REVERIFY_EVERY: Duration = Duration::from_secs(3);

/// Keys carried per table before it waits for a full pass instead.
const MAX_CARRIED_KEYS: usize = 200_000;

/// Changed keys between full passes: handed over at each anchor, compared at it.
#[derive(Default)]
struct Reverify {
    /// Keys handed over and not yet compared (a failed round keeps them).
    carry: HashMap<TableName, HashSet<Vec<String>>>,
    /// Keys whose last comparison differed: compared again every round until clean.
    suspects: HashMap<TableName, HashSet<Vec<String>>>,
    /// Tables changed in ways keys cannot name, and the anchor after which a full pass
    /// must have compared them.
    awaiting_full: HashMap<TableName, Lsn>,
    last_round: Option<Lsn>,
}

impl Reverify {
    /// Take over the keys an anchor brought.
    fn absorb(&mut self, touched: Touched, at: Lsn) {
        for (table, t) in touched.tables {
            if t.overflow {
                self.awaiting_full.insert(table.clone(), at);
                self.carry.remove(&table);
            } else if !self.awaiting_full.contains_key(&table) {
                let carry = self.carry.entry(table.clone()).or_default();
                carry.extend(t.keys);
                // Rounds that keep failing must not make the carry grow without bound.
                if carry.len() > MAX_CARRIED_KEYS {
                    self.carry.remove(&table);
                    self.awaiting_full.insert(table, at);
                }
            }
        }
    }

    fn work(&self) -> bool {
        self.carry.values().any(|k| !k.is_empty()) || self.suspects.values().any(|k| !k.is_empty())
    }

    fn publish(&self, ctx: &JobContext) {
        let suspects: usize = self.suspects.values().map(HashSet::len).sum();
        let mut awaiting: Vec<String> = self.awaiting_full.keys().map(|t| t.to_string()).collect();
        awaiting.sort();
        let last = self.last_round.map(|l| l.to_string());
        ctx.status.update(|s| {
            s.reverify.suspect_keys = suspects as u64;
            s.reverify.tables_awaiting_full_pass = awaiting;
            s.reverify.last_round_lsn = last;
        });
    }
}

/// Start the verifier of a job; `barriers` reaches the job's stream.
pub fn spawn(ctx: JobContext, barriers: BarrierSender) -> VerifierHandle {
    let (tx, mut rx) = mpsc::channel::<PassRequest>(16);
    let latest = Arc::new(RwLock::new(None));
    let handle = VerifierHandle {
        requests: tx,
        latest: latest.clone(),
    };
    tokio::spawn(async move {
        let every = ctx.spec.verify.every;
        let mut next_due = Instant::now();
        let mut next_round = Instant::now() + REVERIFY_EVERY;
        let mut shutdown = ctx.shutdown.clone();
        let mut reverify = Reverify::default();
        let mut plans: Vec<Arc<TablePlan>> = Vec::new();
        loop {
            let full_wait = next_due.saturating_duration_since(Instant::now());
            let round_wait = next_round.saturating_duration_since(Instant::now());
            enum Wake {
                Request(PassRequest),
                Full,
                Round,
            }
            let wake = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                req = rx.recv() => match req {
                    Some(r) => Wake::Request(r),
                    None => return,
                },
                _ = tokio::time::sleep(full_wait), if !every.is_zero() => Wake::Full,
                _ = tokio::time::sleep(round_wait) => Wake::Round,
            };
            let requested = match wake {
                Wake::Round => {
                    next_round = Instant::now() + REVERIFY_EVERY;
                    let pending = ctx.status.snapshot().reverify.pending_keys > 0
                        || ctx.status.snapshot().reverify.pending_since.is_some();
                    if settled(&ctx) && (pending || reverify.work()) {
                        if let Err(e) = run_round(&ctx, &barriers, &mut plans, &mut reverify).await
                        {
                            tracing::warn!("re-verification round failed: {e}");
                        }
                        reverify.publish(&ctx);
                    }
                    continue;
                }
                Wake::Full => None,
                Wake::Request(r) => Some(r),
            };
            if requested.is_none() && !settled(&ctx) {
                // Not streaming yet, or behind: a scheduled pass waits for the apply.
                next_due = Instant::now() + Duration::from_secs(1);
                continue;
            }
            let mut waiting: Vec<PassRequest> = requested.into_iter().collect();
            let result = run_pass(&ctx, &barriers, &mut reverify).await;
            // Requests that arrived during the pass are answered by it too.
            while let Ok(r) = rx.try_recv() {
                waiting.push(r);
            }
            match &result {
                Ok((report, used)) => {
                    plans = used.clone();
                    publish(&ctx, report);
                    reverify.publish(&ctx);
                    *latest.write().await = Some(report.clone());
                    next_due = Instant::now() + every;
                }
                Err(e) => {
                    tracing::warn!("verification pass failed: {e}");
                    next_due = Instant::now() + Duration::from_secs(10);
                }
            }
            let result = result.map(|(report, _)| report);
            for w in waiting {
                let _ = w.send(result.clone());
            }
        }
    });
    handle
}

/// The job's plans, from both catalogs (tables whose mapping does not hold are left out).
async fn plans(ctx: &JobContext) -> Result<Vec<Arc<TablePlan>>, String> {
    let app = format!("cutover/{}/verify", ctx.spec.name);
    let (source, target) = tokio::try_join!(
        pg_conn::connect(&ctx.source, &app),
        pg_conn::connect(&ctx.target, &app)
    )
    .map_err(|e| e.to_string())?;
    let mut broken = Vec::new();
    let plans = crate::job::plan_tables(
        false,
        &ctx.spec,
        &ctx.source,
        &ctx.target,
        &source,
        &target,
        Some(&mut broken),
    )
    .await
    .map_err(|e| e.to_string())?;
    for b in &broken {
        tracing::warn!(table = %b.source, "not verified: {}", b.error);
    }
    Ok(plans)
}

/// Compare the changed (and the suspect) keys at a new anchor.
async fn run_round(
    ctx: &JobContext,
    barriers: &BarrierSender,
    plans_cache: &mut Vec<Arc<TablePlan>>,
    state: &mut Reverify,
) -> Result<(), String> {
    if plans_cache.is_empty() {
        *plans_cache = plans(ctx).await?;
    }
    let a = anchor::take(&ctx.source, &ctx.target, &ctx.spec.name, barriers)
        .await
        .map_err(|e| e.to_string())?;
    let mut a = a;
    tracing::debug!(lsn = %a.lsn, keys = a.touched.len(), "re-verification round anchored");
    state.absorb(std::mem::take(&mut a.touched), a.lsn);
    let mut tables: Vec<TableName> = state
        .carry
        .keys()
        .chain(state.suspects.keys())
        .cloned()
        .collect();
    tables.sort();
    tables.dedup();
    for table in tables {
        let Some(plan) = plans_cache.iter().find(|p| p.source_name() == &table) else {
            state.carry.remove(&table);
            state.suspects.remove(&table);
            continue;
        };
        let mut keys: HashSet<Vec<String>> = state.carry.remove(&table).unwrap_or_default();
        keys.extend(state.suspects.get(&table).cloned().unwrap_or_default());
        if keys.is_empty() {
            continue;
        }
        let list: Vec<Vec<String>> = keys.into_iter().collect();
        let report = match crate::verify::compare_keys(
            a.source.clone(),
            a.target.clone(),
            plan,
            &list,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                // Keep them for the next round.
                state.carry.entry(table).or_default().extend(list);
                return Err(format!("{e:#}"));
            }
        };
        metrics::counter!(crate::metrics::VERIFY_ROWS_TOTAL).increment(report.rows_compared);
        metrics::counter!(crate::metrics::VERIFY_DIFFERENCES_TOTAL)
            .increment(report.differences_total);
        let differing: HashSet<Vec<String>> = report
            .differences
            .iter()
            .map(|d| {
                d.key
                    .0
                    .iter()
                    .map(|(_, v)| v.clone().unwrap_or_default())
                    .collect()
            })
            .collect();
        if !differing.is_empty() {
            tracing::warn!(
                table = %table,
                lsn = %a.lsn,
                keys = differing.len(),
                "re-verification found changed keys that differ at an anchored position"
            );
        }
        tracing::debug!(table = %table, lsn = %a.lsn, keys = list.len(), rows = report.rows_compared, total = report.differences_total, differing = differing.len(), "changed keys verified again");
        if differing.is_empty() {
            state.suspects.remove(&table);
        } else {
            state.suspects.insert(table, differing);
        }
    }
    state.last_round = Some(a.lsn);
    Ok(())
}

/// Whether the job streams with its lag within `[ready] max_lag`.
fn settled(ctx: &JobContext) -> bool {
    let s = ctx.status.snapshot();
    s.phase == Phase::Streaming
        && s.lag_seconds
            .is_some_and(|l| l <= ctx.spec.ready.max_lag.as_secs_f64())
}

/// Wait (up to a bound) while the apply is behind, so a pass does not make it worse.
async fn wait_settled(ctx: &JobContext) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !settled(ctx) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One full pass over every table the job carries.
async fn run_pass(
    ctx: &JobContext,
    barriers: &BarrierSender,
    reverify: &mut Reverify,
) -> Result<(VerifyReport, Vec<Arc<TablePlan>>), String> {
    let started = Instant::now();
    let plans = plans(ctx).await?;
    let throttle = crate::verify::Throttle::new(ctx.spec.verify.max_rows_per_second);
    let mut anchor: Option<Anchor> = None;
    let mut first_lsn = None;
    let mut tables = Vec::new();
    // At least a second: the job file is refused below that.
    let max_age = ctx.spec.verify.snapshot_max_age;
    for plan in &plans {
        // A large table is compared in parts, each in fresher snapshots than the last:
        // once the anchor is older than `max_age`, the comparison stops at its next chunk
        // bound and goes on after that key in a new anchor.
        let mut report: Option<TableReport> = None;
        let mut after: Option<Vec<cutover_verifier::chunk::Value>> = None;
        let mut parts = 0;
        loop {
            parts += 1;
            if anchor.as_ref().is_none_or(|a| a.age() >= max_age) {
                wait_settled(ctx).await;
                // The old snapshots end with their connections.
                drop(anchor.take());
                let mut a = anchor::take(&ctx.source, &ctx.target, &ctx.spec.name, barriers)
                    .await
                    .map_err(|e| e.to_string())?;
                // The keys changed since the last anchor are compared again by the next
                // round (this pass may have compared some of their rows at an earlier
                // anchor).
                reverify.absorb(std::mem::take(&mut a.touched), a.lsn);
                first_lsn.get_or_insert(a.lsn);
                anchor = Some(a);
            }
            let Some(a) = &anchor else {
                continue;
            };
            let deadline = a.taken_at + max_age;
            let (mut part, resume) = crate::verify::compare_table_part(
                a.source.clone(),
                a.target.clone(),
                plan,
                throttle.clone(),
                after.as_deref(),
                deadline,
            )
            .await
            .map_err(|e| format!("{e:#}"))?;
            part.lsn = Some(a.lsn.to_string());
            metrics::counter!(crate::metrics::VERIFY_ROWS_TOTAL).increment(part.rows_compared);
            metrics::counter!(crate::metrics::VERIFY_DIFFERENCES_TOTAL)
                .increment(part.differences_total);
            if !part.equal {
                tracing::warn!(
                    table = %plan.source_name(),
                    lsn = %a.lsn,
                    differences = part.differences_total,
                    "verification found differences at an anchored position: they are real"
                );
            }
            match &mut report {
                None => report = Some(part),
                Some(r) => r.absorb(part),
            }
            match resume {
                Some(key) => {
                    tracing::debug!(table = %plan.source_name(), "the anchor is due for renewal; the table goes on in a new one");
                    // The stopped reads end with their connections.
                    drop(anchor.take());
                    after = Some(key);
                }
                None => break,
            }
        }
        if let Some(mut r) = report {
            r.snapshots = (parts > 1).then_some(parts);
            tables.push(r);
        }
    }
    let report = VerifyReport::new(first_lsn.map(|l| l.to_string()), tables);
    metrics::counter!(crate::metrics::VERIFY_PASSES_TOTAL).increment(1);
    metrics::histogram!(crate::metrics::VERIFY_PASS_DURATION_SECONDS)
        .record(started.elapsed().as_secs_f64());
    tracing::info!(
        lsn = report.lsn.as_deref().unwrap_or("-"),
        equal = report.equal,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "verification pass finished"
    );
    // A clean comparison of a table at or after the point a change keys could not name
    // verifies it again.
    let clean_at: Vec<(TableName, Lsn)> = plans
        .iter()
        .zip(&report.tables)
        .filter(|(_, t)| t.equal)
        .filter_map(|(p, t)| {
            t.lsn
                .as_deref()
                .and_then(|l| l.parse().ok())
                .map(|l| (p.source_name().clone(), l))
        })
        .collect();
    for (table, at) in clean_at {
        if reverify
            .awaiting_full
            .get(&table)
            .is_some_and(|need| at >= *need)
        {
            reverify.awaiting_full.remove(&table);
        }
    }
    Ok((report, plans))
}

/// Put a pass's summary in the status.
fn publish(ctx: &JobContext, report: &VerifyReport) {
    let now = std::time::SystemTime::now();
    let summary = VerificationSummary {
        finished_at: crate::job::rfc3339(now),
        lsn: report.lsn.clone(),
        tables_equal: report.equal,
        differences: report.tables.iter().map(|t| t.differences_total).sum(),
        finished: Some(now),
    };
    ctx.status.update(|s| s.last_verification = Some(summary));
}
