//! Bounded memory: a 2-million-row source transaction and a large rolled-back one pass
//! through the daemon without its resident memory growing with them.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// Peak resident set (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_million_row_transaction_in_bounded_memory() {
    // A short wal_sender_timeout: the walsender must hear from us during the long apply.
    let (src, dst) = tokio::join!(
        cluster_with("large-src", &[("wal_sender_timeout", "3s")]),
        cluster("large-dst")
    );
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute(
            "db",
            "CREATE TABLE public.t (id bigint PRIMARY KEY, v int, pad text)",
        )
        .await
        .unwrap();
    }
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write("large", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    let pid = daemon.child.as_ref().unwrap().id();
    let before = peak_rss_kib(pid);

    // A large transaction that rolls back must never show up.
    s.batch_execute("BEGIN; INSERT INTO t SELECT g, 0, 'rolled back' FROM generate_series(1, 500000) g; ROLLBACK;")
        .await
        .unwrap();
    let started = Instant::now();
    s.batch_execute(
        "INSERT INTO t SELECT g, g % 1000, 'row ' || g FROM generate_series(1, 2000000) g",
    )
    .await
    .unwrap();
    wait_equal_digest(
        &s,
        &d,
        "public.t",
        "public.t",
        Duration::from_secs(300),
        Some(&daemon),
    )
    .await;
    let elapsed = started.elapsed();
    let peak = peak_rss_kib(pid);
    println!(
        "2M-row transaction applied in {:.1}s; daemon peak RSS {} MiB (before: {} MiB)",
        elapsed.as_secs_f64(),
        peak / 1024,
        before / 1024
    );
    assert!(peak < 300 * 1024, "peak RSS {peak} KiB exceeds 300 MiB");
    let rolled_back: i64 = d
        .query_one("SELECT count(*) FROM t WHERE pad = 'rolled back'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rolled_back, 0);
    let server_log = std::fs::read_to_string(src.log_path()).unwrap_or_default();
    assert!(
        !server_log.contains("replication timeout"),
        "the walsender timed out during the long apply:\n{server_log}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(30)), Some(0));
}
