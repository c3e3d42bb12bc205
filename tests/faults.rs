//! Crashes and restarts: `kill -9` of the daemon during the snapshot and during streaming,
//! immediate restarts of the source and of the target. After each, the target must equal
//! the source exactly: nothing lost, nothing applied twice (a table without a key shows
//! duplicates as extra rows in the multiset comparison).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cutover::cluster::{Cluster, StopMode};
use support::*;

const SCHEMA: &str = "
CREATE TABLE public.counters (id int PRIMARY KEY, n bigint NOT NULL, touched timestamptz);
CREATE TABLE public.journal (op bigint NOT NULL, note text);
ALTER TABLE public.journal REPLICA IDENTITY FULL;
CREATE TABLE public.big (id bigint PRIMARY KEY, pad text);
CREATE INDEX big_pad_prefix ON public.big (left(pad, 10));
";

const TIMEOUT: Duration = Duration::from_secs(90);

/// A writer on the source: each transaction bumps a counter and appends a journal row
/// (no key: a duplicate apply would show as an extra row). It reconnects through source
/// restarts and counts its commits.
fn start_writer(
    src: &Cluster,
    stop: Arc<AtomicBool>,
) -> (tokio::task::JoinHandle<u64>, Arc<AtomicU64>) {
    start_writer_pausing(src, stop, Duration::from_millis(2))
}

/// [`start_writer`], pausing `pause` between transactions.
fn start_writer_pausing(
    src: &Cluster,
    stop: Arc<AtomicBool>,
    pause: Duration,
) -> (tokio::task::JoinHandle<u64>, Arc<AtomicU64>) {
    let cfg = src.client_config("db");
    let done = Arc::new(AtomicU64::new(0));
    let counter = done.clone();
    let handle = tokio::spawn(async move {
        let mut op: u64 = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((client, conn)) = cfg.connect(tokio_postgres::NoTls).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                op += 1;
                let sql = format!(
                    "BEGIN; UPDATE counters SET n = n + 1, touched = now() WHERE id = {}; \
                     INSERT INTO journal VALUES ({op}, 'op {op}'); COMMIT;",
                    op % 10
                );
                if client.batch_execute(&sql).await.is_err() {
                    break;
                }
                counter.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
            }
        }
        op
    });
    (handle, done)
}

async fn setup(
    big_rows: i64,
) -> (
    Cluster,
    Cluster,
    tokio_postgres::Client,
    tokio_postgres::Client,
) {
    setup_with(big_rows, &[]).await
}

/// As [`setup`], with extra settings for the target cluster.
async fn setup_with(
    big_rows: i64,
    target_settings: &[(&str, &str)],
) -> (
    Cluster,
    Cluster,
    tokio_postgres::Client,
    tokio_postgres::Client,
) {
    let (src, dst) = tokio::join!(
        cluster("fault-src"),
        cluster_with("fault-dst", target_settings)
    );
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute("db", SCHEMA).await.unwrap();
    dst.execute("db", SCHEMA).await.unwrap();
    src.execute(
        "db",
        &format!(
            "INSERT INTO counters SELECT g, 0, NULL FROM generate_series(0, 9) g;
             INSERT INTO big SELECT g, repeat('x', 200) FROM generate_series(1, {big_rows}) g;"
        ),
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    (src, dst, s, d)
}

async fn assert_equal(s: &tokio_postgres::Client, d: &tokio_postgres::Client, daemon: &Daemon) {
    wait_equal(
        s,
        d,
        "public.counters",
        "public.counters",
        TIMEOUT,
        Some(daemon),
    )
    .await;
    wait_equal(
        s,
        d,
        "public.journal",
        "public.journal",
        TIMEOUT,
        Some(daemon),
    )
    .await;
    wait_equal_digest(s, d, "public.big", "public.big", TIMEOUT, Some(daemon)).await;
}

async fn wait_progress(writer_done: &AtomicU64, more: u64) {
    let start = writer_done.load(Ordering::Relaxed);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while writer_done.load(Ordering::Relaxed) < start + more {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_streaming_loses_and_duplicates_nothing() {
    let (src, dst, s, d) = setup(1000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, done) = start_writer(&src, stop.clone());
    let job = Job::write("kill-stream", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    for _ in 0..3 {
        wait_progress(&done, 100).await;
        daemon.kill9();
        wait_progress(&done, 50).await;
        daemon = Daemon::start(&job);
        daemon.wait_phase("streaming", TIMEOUT).await;
    }
    wait_progress(&done, 100).await;
    stop.store(true, Ordering::Relaxed);
    let ops = writer.await.unwrap();
    assert!(ops > 300);
    assert_equal(&s, &d, &daemon).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_the_snapshot_then_restart() {
    let (src, dst, s, d) = setup(400_000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, done) = start_writer(&src, stop.clone());
    // The big table (about 94 MB) is copied in three page ranges of at least 24 MB side by
    // side, while the fourth worker copies the small tables.
    let job = Job::write(
        "kill-snap",
        &src.url("db"),
        &dst.url("db"),
        "[snapshot]\nsplit_larger_than = \"48MB\"\n",
    );
    let mut daemon = Daemon::start(&job);
    // Kill once the big table's ranges are being copied side by side, and a small table
    // is done.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(st) = daemon.status().await {
            let copying = st["tables"].as_array().is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["source"] == "public.big"
                        && t["bytes_copied"].as_u64().unwrap_or(0) > 0
                        && t["snapshot_done"] == false
                })
            });
            let small_done = st["tables"].as_array().is_some_and(|ts| {
                ts.iter()
                    .any(|t| t["source"] != "public.big" && t["snapshot_done"] == true)
            });
            let ranges: i64 = d
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY %big% FROM STDIN%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            if copying && small_done && ranges >= 2 {
                break;
            }
            assert_ne!(
                st["phase"], "streaming",
                "the copy finished before the kill; make the table bigger"
            );
        }
        assert!(std::time::Instant::now() < deadline, "{}", daemon.output());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Tables whose copy finished before the kill must not be copied again.
    let finished_before: Vec<(String, String)> = d
        .query(
            "SELECT source_table, started_at::text FROM cutover.tables WHERE done_at IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        !finished_before.is_empty(),
        "no small table finished before the kill"
    );
    daemon.kill9();
    wait_progress(&done, 50).await;
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    for (table, started_at) in &finished_before {
        let again: String = d
            .query_one(
                "SELECT started_at::text FROM cutover.tables WHERE source_table = $1",
                &[table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            &again, started_at,
            "{table} was copied again after the restart"
        );
    }
    wait_progress(&done, 100).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert_equal(&s, &d, &daemon).await;
    // The big table's indexes were built after its copy, and are all back.
    let indexes = strings(
        &d,
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'big' ORDER BY 1",
    )
    .await;
    assert_eq!(
        indexes,
        vec!["big_pad_prefix".to_string(), "big_pkey".to_string()]
    );
    let deferred: i64 = d
        .query_one(
            "SELECT count(*) FROM cutover.tables WHERE deferred_indexes IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(deferred, 0);
    // No temporary slot and no stray objects remain besides the job's slot.
    let slots = strings(
        &s,
        "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
    )
    .await;
    assert_eq!(slots, vec!["cutover_kill_snap".to_string()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn immediate_restarts_of_source_and_target_are_survived() {
    let (src, dst, _s, _d) = setup(1000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, done) = start_writer(&src, stop.clone());
    let job = Job::write("restarts", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    wait_progress(&done, 100).await;
    src.restart(StopMode::Immediate).await.unwrap();
    wait_progress(&done, 100).await;
    dst.restart(StopMode::Immediate).await.unwrap();
    settle_after_restarts(&src, &dst, &stop, writer, &done, &mut daemon).await;
}

/// Let the writer commit a little more after restarts, stop it, and compare source and
/// target through fresh clients (the old ones died with the restarts). The daemon must
/// have survived them without an operator.
async fn settle_after_restarts(
    src: &Cluster,
    dst: &Cluster,
    stop: &AtomicBool,
    writer: tokio::task::JoinHandle<u64>,
    done: &AtomicU64,
    daemon: &mut Daemon,
) {
    wait_progress(done, 100).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    assert_equal(&s, &d, daemon).await;
    assert!(
        daemon.running(),
        "the daemon must survive restarts without an operator:\n{}",
        daemon.output()
    );
}

/// Groups that commit on the target without waiting for its WAL flush are lost when the
/// target crashes before its WAL writer flushes them. The slot must not have been confirmed
/// past them: the source sends them again. Here the WAL writer waits 10 s between rounds,
/// so the target crashes with seconds of unflushed commits, five times.
#[tokio::test(flavor = "multi_thread")]
async fn target_crashes_lose_only_what_was_never_confirmed() {
    crash_the_target_five_times(
        "target-crash",
        &[("wal_writer_delay", "10s")],
        Duration::from_millis(2),
        300,
    )
    .await;
}

/// A target configured with `synchronous_commit = off` would make even a commit that waits
/// return before its flush. The apply session commits with `local` there. The writer pauses
/// 20 ms between transactions, so the stream goes idle after each one and every group is
/// such a waiting commit; the WAL writer waits 10 s between rounds, and the target crashes
/// five times.
#[tokio::test(flavor = "multi_thread")]
async fn a_target_without_synchronous_commit_still_gets_durable_commits() {
    crash_the_target_five_times(
        "async-target",
        &[("wal_writer_delay", "10s"), ("synchronous_commit", "off")],
        Duration::from_millis(20),
        50,
    )
    .await;
}

/// Run job `name` against a target with `target_settings` while a writer commits on the
/// source (pausing `pause` between transactions); crash the target five times, each after
/// `commits` more writes; then the two sides must be equal.
async fn crash_the_target_five_times(
    name: &str,
    target_settings: &[(&str, &str)],
    pause: Duration,
    commits: u64,
) {
    let (src, dst, _s, _d) = setup_with(1000, target_settings).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (writer, done) = start_writer_pausing(&src, stop.clone(), pause);
    let job = Job::write(name, &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    for _ in 0..5 {
        wait_progress(&done, commits).await;
        dst.restart(StopMode::Immediate).await.unwrap();
    }
    settle_after_restarts(&src, &dst, &stop, writer, &done, &mut daemon).await;
}

/// Wait until `daemon` logs that it waits for the job's lock (held by `holder`), then a
/// second more, in which it must apply nothing.
async fn wait_until_it_waits_for_the_lock(daemon: &mut Daemon, holder: &str) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !daemon
        .output()
        .contains("waiting for an earlier session of this job")
    {
        assert!(
            std::time::Instant::now() < deadline && daemon.running(),
            "the run did not wait for {holder}:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A session of an earlier run may still be committing on the target when a new run
/// starts (its daemon was killed mid-group). The new run must not read the progress
/// before that session has ended, or it would apply the same source transactions again.
/// Here a test session holds the job's lock in its place: nothing may be applied until it
/// lets go, and then everything, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_waits_for_an_earlier_session_on_the_target() {
    let (src, dst, s, d) = setup(100).await;
    let job = Job::write("fence", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    let earlier = dst.connect("db").await.unwrap();
    let key = cutover_connectors::pg_apply::job_lock_key("fence");
    earlier
        .execute("SELECT pg_advisory_lock($1, $2)", &[&0x6375_7476_i32, &key])
        .await
        .unwrap();
    s.batch_execute(
        "INSERT INTO journal SELECT g, 'while fenced' FROM generate_series(1, 50) g;
         UPDATE counters SET n = n + 7;",
    )
    .await
    .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_until_it_waits_for_the_lock(&mut daemon, "the job's lock").await;
    let applied: i64 = d
        .query_one(
            "SELECT count(*) FROM journal WHERE note = 'while fenced'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, 0, "changes were applied while the lock was held");
    drop(earlier);
    assert_equal(&s, &d, &daemon).await;
    assert!(daemon.running(), "{}", daemon.output());
}

/// The copy's workers write to the target too (a worker builds a finished table's indexes
/// and marks it done): each holds the job's lock, shared, while it lives. A session that
/// holds it shared, as a worker of a killed run would, keeps a new run waiting.
#[tokio::test(flavor = "multi_thread")]
async fn the_copy_workers_hold_the_job_lock() {
    let (src, dst, s, d) = setup(300_000).await;
    let job = Job::write("workers", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    let key = cutover_connectors::pg_apply::job_lock_key("workers");
    let held_by_worker = format!(
        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) \
         WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ShareLock' \
           AND l.objid = {} AND a.application_name LIKE '%copy-%'",
        u32::from_ne_bytes(key.to_ne_bytes())
    );
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let n: i64 = d.query_one(&held_by_worker, &[]).await.unwrap().get(0);
        if n > 0 {
            break;
        }
        let phase = daemon
            .status()
            .await
            .and_then(|st| st["phase"].as_str().map(str::to_string));
        assert!(
            phase.as_deref() != Some("streaming") && std::time::Instant::now() < deadline,
            "no copy worker held the job's lock during the copy:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    let worker = dst.connect("db").await.unwrap();
    worker
        .execute(
            "SELECT pg_advisory_lock_shared($1, $2)",
            &[&0x6375_7476_i32, &key],
        )
        .await
        .unwrap();
    s.batch_execute("UPDATE counters SET n = n + 3; DELETE FROM big WHERE id <= 10;")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_until_it_waits_for_the_lock(&mut daemon, "a session holding the job's lock shared").await;
    let deleted: i64 = d
        .query_one("SELECT count(*) FROM big WHERE id <= 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(deleted, 10, "changes were applied while the lock was held");
    drop(worker);
    assert_equal(&s, &d, &daemon).await;
    assert!(daemon.running(), "{}", daemon.output());
}

/// A group that fails must stop every later one: a later group committed after it would
/// move the progress past transactions the target never got. The apply builds the next
/// group while the target runs a full one (in jobs without mapped tables, like this one),
/// and sends it only once that answer has come back. Here a
/// deferred constraint trigger on the target (enabled `ALWAYS`, so it fires for the apply
/// too) refuses row 8000 at COMMIT: its group fails with the session left ready for more.
/// No row after it may reach the target, and the rows before its group must all be there.
#[tokio::test(flavor = "multi_thread")]
async fn no_group_commits_after_one_that_failed() {
    let (src, dst, s, d) = setup(0).await;
    let table = "CREATE TABLE public.seq (id bigint PRIMARY KEY, u bigint NOT NULL);";
    src.execute("db", table).await.unwrap();
    dst.execute(
        "db",
        &format!(
            "{table}
             CREATE FUNCTION refuse_8000() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.id = 8000 THEN RAISE EXCEPTION 'row 8000 refused at commit'; END IF;
               RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON seq
               DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_8000();
             ALTER TABLE seq ENABLE ALWAYS TRIGGER refuse;"
        ),
    )
    .await
    .unwrap();
    // Two apply sessions asked for: the trigger keeps the groups one at a time.
    let job = Job::write_with_target(
        "failed-group",
        &src.url("db"),
        &dst.url("db"),
        "apply_sessions = 2",
        "",
    );
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_eq!(daemon.terminate(TIMEOUT), Some(0));
    // A backlog of 20 000 one-row transactions: the restarted daemon reads it in full
    // groups, each built while the one before it runs. (The DO block alone in its query:
    // COMMIT is refused in a multi-statement one.)
    s.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    s.batch_execute(
        "DO $$ BEGIN
           FOR i IN 1..20000 LOOP
             INSERT INTO seq VALUES (i, i);
             COMMIT;
           END LOOP;
         END $$;",
    )
    .await
    .unwrap();
    let mut daemon = Daemon::start(&job);
    let output = daemon.wait_exit(TIMEOUT, "on the failed group").await;
    assert!(
        output.contains("row 8000 refused at commit") && output.contains("up to commit LSN"),
        "the error should say why and name the transactions:\n{output}"
    );
    // The trigger fires for replicated rows: groups were not overlapped.
    assert!(
        output.contains("groups are applied one at a time") && !output.contains("groups overlap"),
        "{output}"
    );
    // A trigger refused the row: no hint guessing at a row changed behind the job's back.
    assert!(
        !output.contains("behind the job's back"),
        "a wrong hint:\n{output}"
    );
    let row = d
        .query_one("SELECT count(*), coalesce(max(id), 0) FROM seq", &[])
        .await
        .unwrap();
    let (count, max): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        max < 8000,
        "rows after the failed transaction reached the target (max id {max}):\n{output}"
    );
    assert_eq!(count, max, "the target lost rows before the failed group");
    // Groups before the failed one did commit (the backlog fills several groups).
    assert!(
        max > 0,
        "no group before the failed one committed:\n{output}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_slot_is_refused_not_recreated() {
    let (src, dst) = tokio::join!(
        cluster_with(
            "lost-src",
            &[
                ("max_slot_wal_keep_size", "1MB"),
                ("max_wal_size", "64MB"),
                ("min_wal_size", "32MB"),
            ]
        ),
        cluster("lost-dst")
    );
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", "CREATE TABLE public.t (id int PRIMARY KEY, pad text)")
            .await
            .unwrap();
    }
    let s = src.connect("db").await.unwrap();
    let job = Job::write("lost", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    assert_eq!(slot_check(&job), ("pass".to_string(), true));
    // With the job stopped, write far more WAL than the slot may keep.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        s.batch_execute(
            "INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 50000) g \
             ON CONFLICT (id) DO UPDATE SET pad = EXCLUDED.pad || 'y'; CHECKPOINT; SELECT pg_switch_wal();",
        )
        .await
        .unwrap();
        let status: Option<String> = s
            .query_one(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'cutover_lost'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if status.as_deref() == Some("lost") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never became lost: {status:?}"
        );
    }
    assert_eq!(slot_check(&job), ("fail".to_string(), false));
    let err = refused(&["run", &path_str(&job.path)]);
    assert!(
        err.contains("replication slot \"cutover_lost\" is lost") && err.contains("hint:"),
        "{err}"
    );
    // Never silently recreated at the current LSN.
    let slots: i64 = s
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE wal_status <> 'lost'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0);
}

/// `cutover check`'s verdict on the job's slot, and whether it called it ours and usable.
fn slot_check(job: &Job) -> (String, bool) {
    let (_, doc) = run_json(&["check", job.path.to_str().unwrap()]);
    let slot = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "replication slot")
        .unwrap()
        .clone();
    let detail = slot["detail"].as_str().unwrap_or_default().to_string();
    if slot["result"] == "fail" {
        assert!(detail.contains("is lost"), "{slot}");
    }
    (
        slot["result"].as_str().unwrap().to_string(),
        detail.contains("exists (ours"),
    )
}
