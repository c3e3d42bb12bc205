//! Verification inside `cutover run`: full passes anchored at a source LSN
//! ([`crate::anchor`]) every `[verify] every`, and on request (`POST /v1/verify`, which
//! `cutover verify` uses when the daemon runs), published in the status
//! (`last_verification`), at `GET /v1/verify/latest` and in the metrics.
//!
//! A pass never starves the apply: the source side reads at most `[verify]
//! max_rows_per_second`, a pass starts (and each table of it) only while the lag is within
//! `[ready] max_lag`, and anchors are taken without pausing the apply for more than one
//! group commit. A pass renews its anchor between tables once the anchor is older than
//! [`RENEW_AFTER`], so no snapshot holds back vacuum for long on either side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cutover_connectors::pg_apply::TablePlan;
use cutover_connectors::pg_conn;
use cutover_verifier::report::VerifyReport;
use tokio::sync::{RwLock, mpsc, oneshot};

use crate::anchor::{self, Anchor, BarrierSender};
use crate::job::JobContext;
use crate::status::{Phase, VerificationSummary};

/// An anchor older than this is replaced before the next table.
pub const RENEW_AFTER: Duration = Duration::from_secs(120);

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
        let mut shutdown = ctx.shutdown.clone();
        loop {
            let wait = next_due.saturating_duration_since(Instant::now());
            let requested = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                req = rx.recv() => match req {
                    Some(r) => Some(r),
                    None => return,
                },
                _ = tokio::time::sleep(wait), if !every.is_zero() => None,
            };
            if requested.is_none() && !settled(&ctx) {
                // Not streaming yet, or behind: a scheduled pass waits for the apply.
                next_due = Instant::now() + Duration::from_secs(1);
                continue;
            }
            let mut waiting: Vec<PassRequest> = requested.into_iter().collect();
            let result = run_pass(&ctx, &barriers).await;
            // Requests that arrived during the pass are answered by it too.
            while let Ok(r) = rx.try_recv() {
                waiting.push(r);
            }
            match &result {
                Ok(report) => {
                    publish(&ctx, report);
                    *latest.write().await = Some(report.clone());
                    next_due = Instant::now() + every;
                }
                Err(e) => {
                    tracing::warn!("verification pass failed: {e}");
                    next_due = Instant::now() + Duration::from_secs(10);
                }
            }
            for w in waiting {
                let _ = w.send(result.clone());
            }
        }
    });
    handle
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
pub async fn run_pass(ctx: &JobContext, barriers: &BarrierSender) -> Result<VerifyReport, String> {
    let started = Instant::now();
    let app = format!("cutover/{}/verify", ctx.spec.name);
    let (source, target) = tokio::try_join!(
        pg_conn::connect(&ctx.source, &app),
        pg_conn::connect(&ctx.target, &app)
    )
    .map_err(|e| e.to_string())?;
    let mut broken = Vec::new();
    let plans: Vec<Arc<TablePlan>> = crate::job::plan_tables(
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
    drop((source, target));
    for b in &broken {
        tracing::warn!(table = %b.source, "not verified: {}", b.error);
    }
    let throttle = crate::verify::Throttle::new(ctx.spec.verify.max_rows_per_second);
    let mut anchor: Option<Anchor> = None;
    let mut first_lsn = None;
    let mut tables = Vec::new();
    for plan in &plans {
        if anchor.as_ref().is_none_or(|a| a.age() > RENEW_AFTER) {
            wait_settled(ctx).await;
            // The old snapshots end with their connections.
            drop(anchor.take());
            let a = anchor::take(&ctx.source, &ctx.target, &ctx.spec.name, barriers)
                .await
                .map_err(|e| e.to_string())?;
            first_lsn.get_or_insert(a.lsn);
            anchor = Some(a);
        }
        let Some(a) = &anchor else {
            continue;
        };
        let mut report = crate::verify::compare_table(
            a.source.clone(),
            a.target.clone(),
            plan,
            throttle.clone(),
        )
        .await
        .map_err(|e| format!("{e:#}"))?;
        report.lsn = Some(a.lsn.to_string());
        metrics::counter!(crate::metrics::VERIFY_ROWS_TOTAL).increment(report.rows_compared);
        metrics::counter!(crate::metrics::VERIFY_DIFFERENCES_TOTAL)
            .increment(report.differences_total);
        if !report.equal {
            tracing::warn!(
                table = %plan.source_name(),
                lsn = %a.lsn,
                differences = report.differences_total,
                "verification found differences at an anchored position: they are real"
            );
        }
        tables.push(report);
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
    Ok(report)
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
