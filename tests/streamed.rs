//! pgoutput protocol 2: transactions larger than the source's `logical_decoding_work_mem`
//! are streamed while they run, spooled by the daemon, and applied whole at their commit,
//! in commit order; aborted ones and rolled-back subtransactions never show up, and a
//! daemon killed while a streamed transaction is open applies it once after its restart.

mod support;

use std::time::Duration;

use cutover::cluster::Cluster;
use support::*;

const SCHEMA: &str = "CREATE TABLE public.t (id int PRIMARY KEY, v text);
                      CREATE TABLE public.journal (n int, note text);
                      ALTER TABLE public.journal REPLICA IDENTITY FULL;";

/// The streaming counters of the job's slot on the source (PostgreSQL 14+), and how many
/// transactions the source spilled to its own disk for it.
async fn slot_stats(source: &tokio_postgres::Client, slot: &str) -> (i64, i64) {
    let row = source
        .query_one(
            "SELECT coalesce(stream_txns, 0), coalesce(spill_txns, 0)
               FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .expect("slot statistics");
    (row.get(0), row.get(1))
}

fn spool_files(job: &Job) -> usize {
    std::fs::read_dir(job.dir.path().join("data").join(&job.name).join("spool"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "spool"))
                .count()
        })
        .unwrap_or(0)
}

/// Wait until the daemon has spooled a block of a streamed transaction.
async fn wait_spooled(job: &Job, daemon: &Daemon) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while spool_files(job) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was streamed to the spool\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two clusters with the schema, the source streaming every transaction of more than a
/// few rows, and a job between them that streams.
async fn setup(name: &str) -> (Cluster, Cluster, Job, Daemon) {
    // A tiny decoding budget: every transaction of more than a few rows is streamed.
    let (src_name, dst_name) = (format!("{name}-src"), format!("{name}-dst"));
    let (src, dst) = tokio::join!(
        cluster_with(&src_name, &[("logical_decoding_work_mem", "64kB")]),
        cluster(&dst_name)
    );
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", SCHEMA).await.unwrap();
    }
    let job = Job::write(name, &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    (src, dst, job, daemon)
}

#[tokio::test(flavor = "multi_thread")]
async fn streamed_transactions_apply_whole_in_commit_order() {
    let (src, dst, job, mut daemon) = setup("streamed").await;
    let a = src.connect("db").await.unwrap();
    let b = src.connect("db").await.unwrap();
    let c = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();

    // A: a large transaction with a rolled-back subtransaction, a released one, and a
    // nested one rolled back inside a released one.
    a.batch_execute(
        "BEGIN;
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(1, 20000) g;
         SAVEPOINT s1;
         INSERT INTO t SELECT g, 'rolled back' FROM generate_series(100001, 105000) g;
         INSERT INTO journal SELECT g, 'rolled back' FROM generate_series(1, 3000) g;
         ROLLBACK TO SAVEPOINT s1;
         SAVEPOINT s2;
         UPDATE t SET v = 'released' WHERE id <= 3000;
         SAVEPOINT s3;
         DELETE FROM t WHERE id <= 1000;
         ROLLBACK TO SAVEPOINT s3;
         RELEASE SAVEPOINT s2;
         INSERT INTO journal SELECT g, 'a' FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    // The server streams A's changes while it runs: wait for them to reach the spool.
    wait_spooled(&job, &daemon).await;
    // B commits while A runs: a row A changes next (so A must be applied after B).
    b.batch_execute("INSERT INTO t VALUES (999999, 'b'); INSERT INTO journal VALUES (-1, 'b');")
        .await
        .unwrap();
    // C: a large transaction that aborts after it was streamed.
    c.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, 'aborted' FROM generate_series(200001, 230000) g;",
    )
    .await
    .unwrap();
    a.batch_execute(
        "UPDATE t SET v = 'a after b' WHERE id = 999999;
         INSERT INTO t SELECT g, 'a' || g FROM generate_series(20001, 40000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    c.batch_execute("ROLLBACK").await.unwrap();
    // A small transaction after all of them.
    b.batch_execute("INSERT INTO t VALUES (1000000, 'last')")
        .await
        .unwrap();

    for table in ["public.t", "public.journal"] {
        wait_equal(&a, &d, table, table, Duration::from_secs(60), Some(&daemon)).await;
    }
    let row = d
        .query_one(
            "SELECT v, (SELECT count(*) FROM t WHERE v IN ('rolled back', 'aborted')),
                    (SELECT count(*) FROM t WHERE v = 'released')
               FROM t WHERE id = 999999",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "a after b", "A applied after B");
    assert_eq!(row.get::<_, i64>(1), 0);
    assert_eq!(row.get::<_, i64>(2), 3000);

    let (streamed, spilled) = slot_stats(&a, "cutover_streamed").await;
    assert!(
        streamed >= 2,
        "the source streamed A and C instead of spilling them: stream_txns {streamed}"
    );
    assert_eq!(spilled, 0, "the source spilled nothing to its own disk");
    assert_eq!(spool_files(&job), 0, "the spool is empty once they ended");
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_while_a_streamed_transaction_is_open() {
    let (src, dst, job, mut daemon) = setup("streamkill").await;
    let a = src.connect("db").await.unwrap();
    let b = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    a.batch_execute(
        "BEGIN; INSERT INTO t SELECT g, 'a' FROM generate_series(1, 20000) g;
         INSERT INTO journal SELECT g, 'a' FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    wait_spooled(&job, &daemon).await;
    // Others commit (and are applied and confirmed) while A is open.
    for i in 0..20 {
        b.batch_execute(&format!(
            "INSERT INTO t VALUES ({}, 'b'); INSERT INTO journal VALUES ({}, 'b');",
            500_000 + i,
            -i
        ))
        .await
        .unwrap();
    }
    wait_equal(
        &b,
        &d,
        "public.journal",
        "public.journal",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    daemon.kill9();
    // A goes on and commits while the daemon is down; more work after it.
    a.batch_execute(
        "INSERT INTO t SELECT g, 'a' FROM generate_series(20001, 30000) g;
         INSERT INTO journal SELECT g, 'a2' FROM generate_series(1, 5000) g;
         COMMIT;",
    )
    .await
    .unwrap();
    // And one that is open across the restart, streamed to the new daemon from its start.
    a.batch_execute(
        "BEGIN; INSERT INTO journal SELECT g, 'across' FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    a.batch_execute("UPDATE t SET v = 'across' WHERE id <= 10; COMMIT;")
        .await
        .unwrap();
    for table in ["public.t", "public.journal"] {
        wait_equal(&a, &d, table, table, Duration::from_secs(60), Some(&daemon)).await;
    }
    // The keyless journal would show a change applied twice.
    let n: i64 = d
        .query_one("SELECT count(*) FROM journal", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5000 + 20 + 5000 + 5000);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}
