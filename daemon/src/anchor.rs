//! Anchored comparisons: both databases read as of one source LSN, so rows in flight are
//! not differences.
//!
//! The source side: a temporary logical slot created with `SNAPSHOT 'export'` yields a
//! snapshot that sees exactly the transactions committed before the slot's consistent
//! point `L`; the source reader imports it (`SET TRANSACTION SNAPSHOT`). The target side:
//! the stream is asked to hold at `L` ([`BarrierRequest`]): it commits every source
//! transaction that committed before `L` and none after, and while it holds, a REPEATABLE
//! READ transaction takes its snapshot on the target reader. Then the apply goes on, and
//! the two readers compare the same state, however long they take.
//!
//! `L` is only known once the slot exists, and the apply would overtake it while the slot
//! is created; so the stream is first asked to pause at its next transaction boundary
//! ([`PauseRequest`]), the slot is created, and the barrier at `L` is handed over. The pause
//! lasts as long as the slot creation, and never more than [`MAX_PAUSE`]: past that the
//! apply goes on, and if it overtakes `L` the stream answers [`BarrierReply::Passed`] and a
//! new anchor is taken.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cutover_config::ConnParams;
use cutover_connectors::error::{Error, Result};
use cutover_connectors::pg_apply::Touched;
use cutover_connectors::pg_source::client::ReplicationSession;
use cutover_connectors::{Lsn, pg_conn, quote_literal};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

/// Ask the stream to hold at `lsn` and take the target's snapshot there.
pub struct BarrierRequest {
    pub lsn: Lsn,
    /// The connection whose REPEATABLE READ transaction takes the snapshot.
    pub client: Client,
    pub reply: oneshot::Sender<BarrierReply>,
}

pub enum BarrierReply {
    /// The snapshot is taken: `client` is in a REPEATABLE READ transaction that sees the
    /// target exactly at the requested LSN; with the keys the apply changed (and committed)
    /// since the last hand-over, all of them visible in it.
    Held(Client, Touched),
    /// The apply was already past the LSN; take a new anchor.
    Passed,
    Failed(Error),
}

/// Ask the stream to stop taking transactions at its next boundary until the barrier
/// arrives on `barrier`.
pub struct PauseRequest {
    /// Answered once paused (everything taken so far is committed).
    pub paused: oneshot::Sender<()>,
    pub barrier: oneshot::Receiver<BarrierRequest>,
}

/// The longest the stream pauses for a verifier.
pub const MAX_PAUSE: Duration = Duration::from_secs(3);

pub type BarrierSender = mpsc::Sender<PauseRequest>;
pub type BarrierReceiver = mpsc::Receiver<PauseRequest>;

/// Both sides' readers, each in a REPEATABLE READ transaction seeing the same position.
pub struct Anchor {
    pub lsn: Lsn,
    pub source: Arc<Client>,
    pub target: Arc<Client>,
    pub taken_at: Instant,
    /// Keys changed since the previous anchor, to be verified again.
    pub touched: Touched,
}

impl Anchor {
    pub fn age(&self) -> Duration {
        self.taken_at.elapsed()
    }
}

/// Attempts at an anchor before giving up (each one loses only when the apply overtook the
/// new slot's position while it was being created).
const ATTEMPTS: usize = 5;

/// How long the stream may take to reach the anchor's position.
const BARRIER_WAIT: Duration = Duration::from_secs(120);

static NEXT: AtomicU64 = AtomicU64::new(1);

/// Take an anchor for job `job` (its slot and publication names come from it).
pub async fn take(
    source: &ConnParams,
    target: &ConnParams,
    job: &str,
    barrier: &BarrierSender,
) -> Result<Anchor> {
    let base = cutover_connectors::pg_source::provision::object_name(job);
    let app = format!("cutover/{job}/verify");
    for _ in 0..ATTEMPTS {
        let slot = format!("{base}_v{}", NEXT.fetch_add(1, Ordering::Relaxed));
        // Everything that takes time happens before the pause.
        let mut session =
            ReplicationSession::connect(source, &slot, &base, Lsn::ZERO, &app).await?;
        let src = pg_conn::connect(source, &app).await?;
        let tgt = pg_conn::connect(target, &app).await?;
        let (paused_tx, paused_rx) = oneshot::channel();
        let (barrier_tx, barrier_rx) = oneshot::channel();
        barrier
            .send(PauseRequest {
                paused: paused_tx,
                barrier: barrier_rx,
            })
            .await
            .map_err(|_| Error::transient("the job is not running"))?;
        tracing::debug!("asked the stream to pause for a verification anchor");
        // A stream inside a long transaction cannot pause soon: go on without (the
        // barrier may then be overtaken, and the attempt repeated).
        let _ = tokio::time::timeout(MAX_PAUSE, paused_rx).await;
        let created = session.create_slot(&slot, true).await?;
        let (tx, rx) = oneshot::channel();
        if barrier_tx
            .send(BarrierRequest {
                lsn: created.consistent_point,
                client: tgt,
                reply: tx,
            })
            .is_err()
        {
            // The stream stopped waiting (the slot took long, or the stream restarted).
            continue;
        }
        src.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(&created.snapshot_name)
        ))
        .await
        .map_err(|e| Error::from_pg("import the verification snapshot", "the source", &e))?;
        // Imported: the exporting session (and its temporary slot) may go.
        drop(session);
        // On a busy source the next transaction reaches the stream at once; on an idle one,
        // a transactional logical message moves the source's WAL past the anchor: the
        // stream then sees a commit after it (PostgreSQL 14 and earlier) or a keepalive
        // past it (15 and later skip a transaction that only holds a message). Nudged again
        // every few seconds: one nudge can be lost (its connection refused on a loaded
        // server, or its WAL read before the barrier arrived).
        let reply = wait_for_stream(rx, || nudge(source, &app))
            .await
            .map_err(|()| {
                Error::transient(format!(
                    "the apply did not reach {} within {}s",
                    created.consistent_point,
                    BARRIER_WAIT.as_secs()
                ))
                .hint("the job is not streaming (still copying, stopped or failing); see cutover status")
            })?;
        match reply {
            Ok(BarrierReply::Held(target, touched)) => {
                return Ok(Anchor {
                    lsn: created.consistent_point,
                    source: Arc::new(src),
                    target: Arc::new(target),
                    taken_at: Instant::now(),
                    touched,
                });
            }
            Ok(BarrierReply::Passed) => {
                tracing::debug!(lsn = %created.consistent_point, "the apply passed the anchor; taking another");
            }
            Ok(BarrierReply::Failed(e)) => return Err(e),
            Err(_) => return Err(Error::transient("the job stopped while verifying")),
        }
    }
    Err(Error::transient(format!(
        "could not anchor a verification pass: the apply overtook {ATTEMPTS} new slots in a row"
    )))
}

/// How long to wait for source traffic before nudging the stream, and again between nudges.
const NUDGE_AFTER: Duration = Duration::from_millis(500);
const NUDGE_EVERY: Duration = Duration::from_secs(3);

/// The stream's answer to a barrier, calling `nudge` while it does not come (first after
/// [`NUDGE_AFTER`], then every [`NUDGE_EVERY`]); `Err(())` after [`BARRIER_WAIT`].
async fn wait_for_stream<F, Fut>(
    mut rx: oneshot::Receiver<BarrierReply>,
    mut nudge: F,
) -> std::result::Result<std::result::Result<BarrierReply, oneshot::error::RecvError>, ()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let deadline = tokio::time::Instant::now() + BARRIER_WAIT;
    let mut wait = NUDGE_AFTER;
    loop {
        let until = (tokio::time::Instant::now() + wait).min(deadline);
        match tokio::time::timeout_at(until, &mut rx).await {
            Ok(reply) => return Ok(reply),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err(()),
            Err(_) => {
                nudge().await;
                wait = NUDGE_EVERY;
            }
        }
    }
}

/// Write a transactional logical message on the source, so the stream sees its WAL move.
async fn nudge(source: &ConnParams, app: &str) {
    let sent = match pg_conn::connect(source, app).await {
        Ok(c) => c
            .batch_execute("SELECT pg_catalog.pg_logical_emit_message(true, 'cutover', 'anchor')")
            .await
            .map_err(|e| Error::from_pg("write the anchor's logical message", "the source", &e)),
        Err(e) => Err(e),
    };
    if let Err(e) = sent {
        tracing::warn!("could not nudge the stream for a verification anchor: {e}");
    }
}

/// Take the target's snapshot on `client` (called by the stream while it holds).
pub async fn hold_snapshot(client: &Client) -> Result<()> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SELECT 1")
        .await
        .map_err(|e| Error::from_pg("take the verification snapshot", "the target", &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A lost nudge is followed by others: the barrier is answered after the third here,
    /// long before the deadline; and a stream that never answers ends in `Err` at it.
    #[tokio::test(start_paused = true)]
    async fn the_stream_is_nudged_until_it_answers() {
        let (tx, rx) = oneshot::channel();
        let mut tx = Some(tx);
        let nudges = AtomicUsize::new(0);
        let started = tokio::time::Instant::now();
        let reply = wait_for_stream(rx, || {
            if nudges.fetch_add(1, Ordering::Relaxed) + 1 == 3
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(BarrierReply::Passed);
            }
            async {}
        })
        .await;
        assert!(matches!(reply, Ok(Ok(BarrierReply::Passed))));
        assert_eq!(nudges.load(Ordering::Relaxed), 3);
        assert_eq!(started.elapsed(), NUDGE_AFTER + 2 * NUDGE_EVERY);

        let (_tx, rx) = oneshot::channel();
        let nudges = AtomicUsize::new(0);
        let reply = wait_for_stream(rx, || {
            nudges.fetch_add(1, Ordering::Relaxed);
            async {}
        })
        .await;
        assert!(reply.is_err());
        assert!(nudges.load(Ordering::Relaxed) >= 39, "nudged all along");
    }
}
