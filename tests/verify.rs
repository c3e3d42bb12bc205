//! `cutover verify`: after a clean sync the tables are equal; after corrupting the target
//! behind the job's back, exactly the corrupted keys are reported, no more and no fewer.

mod support;

use std::time::Duration;

use support::*;

const SCHEMA: &str = r#"
CREATE TABLE public.acc (id int PRIMARY KEY, owner text, note text);
CREATE TABLE public.names (k text PRIMARY KEY, v int);
CREATE TABLE public.bag (v int, w text);
ALTER TABLE public.bag REPLICA IDENTITY FULL;
CREATE TABLE public.num (id int PRIMARY KEY, x float8, y numeric);
"#;

fn verify(job: &Job) -> (Option<i32>, serde_json::Value) {
    run_json(&["verify", job.path.to_str().unwrap()])
}

fn table<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["source"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_exactly_the_corrupted_keys() {
    let (src, dst) = tokio::join!(cluster("verify-src"), cluster("verify-dst"));
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", SCHEMA).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO acc SELECT g, 'o' || g, CASE WHEN g = 9 THEN '' WHEN g = 11 THEN 'NULL' ELSE NULL END FROM generate_series(1, 30000) g;
         INSERT INTO names VALUES ('a', 1), ('B', 2), ('c', 3), ('Ä', 4), ('10', 5), ('9', 6);
         INSERT INTO bag VALUES (1, 'x'), (1, 'x'), (2, NULL);
         INSERT INTO num VALUES (1, '-0', 1.0), (2, 'NaN', 2), (3, 0, 3.10);",
    )
    .await
    .unwrap();
    let (job, mut daemon, s, d) = streaming(&src, &dst, "verify", "").await;
    for t in ["public.acc", "public.names", "public.bag", "public.num"] {
        wait_equal(&s, &d, t, t, Duration::from_secs(60), Some(&daemon)).await;
    }

    // With the daemon running, the passes are anchored at a source LSN.
    let (code, doc) = verify(&job);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["equal"], true);
    assert!(doc["lsn"].is_string(), "anchored: {doc}");
    assert_eq!(table(&doc, "public.acc")["rows_compared"], 30000);

    // Corrupt the target behind the job's back: the traps of hard cases 23-24.
    d.batch_execute(
        "SET session_replication_role = replica;
         UPDATE acc SET owner = 'changed' WHERE id = 5;
         DELETE FROM acc WHERE id = 7;
         INSERT INTO acc VALUES (100000, 'extra', NULL);
         UPDATE acc SET note = NULL WHERE id = 9;          -- '' becomes NULL
         UPDATE acc SET note = NULL WHERE id = 11;         -- 'NULL' becomes NULL
         UPDATE acc SET owner = 'o2', note = '0' WHERE id = 20;   -- ('o20', NULL) vs ('o2', '0')
         UPDATE names SET v = 20 WHERE k = 'B';
         INSERT INTO bag VALUES (1, 'x');
         UPDATE num SET x = 0 WHERE id = 1;                -- -0 becomes 0
         UPDATE num SET y = 3.1 WHERE id = 3;              -- 3.10 becomes 3.1",
    )
    .await
    .unwrap();
    let (code, doc) = verify(&job);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["equal"], false);
    let acc = table(&doc, "public.acc");
    let mut got: Vec<(String, String, String)> = acc["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["key"]["id"].to_string(),
                d["columns"].to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String, String)> = [
        ("different", "\"11\"", "[\"note\"]"),
        ("different", "\"20\"", "[\"owner\",\"note\"]"),
        ("different", "\"5\"", "[\"owner\"]"),
        ("different", "\"9\"", "[\"note\"]"),
        ("extra", "\"100000\"", "[]"),
        ("missing", "\"7\"", "[]"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want, "{acc}");
    assert_eq!(acc["differences_total"], 6);
    let names = table(&doc, "public.names");
    assert_eq!(names["differences_total"], 1, "{names}");
    assert_eq!(names["differences"][0]["key"]["k"], "B");
    let bag = table(&doc, "public.bag");
    assert_eq!(bag["differences_total"], 1, "{bag}");
    assert_eq!(bag["differences"][0]["kind"], "extra");
    let num = table(&doc, "public.num");
    assert_eq!(num["differences_total"], 2, "{num}");
    assert_eq!(num["differences"][0]["key"]["id"], "1", "{num}");
    assert_eq!(num["differences"][0]["columns"][0], "x", "{num}");
    assert_eq!(num["differences"][1]["key"]["id"], "3", "{num}");
    assert!(doc["lsn"].is_string(), "anchored: {doc}");

    // Without a daemon, the databases are compared as they stand, with the same result.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    let (code, live) = verify(&job);
    assert_eq!(code, Some(1), "{live}");
    assert!(live["lsn"].is_null(), "{live}");
    for t in ["public.acc", "public.names", "public.bag", "public.num"] {
        assert_eq!(
            table(&live, t)["differences"],
            table(&doc, t)["differences"],
            "{t}"
        );
    }

    // --table limits the pass; the text form says what differs.
    let out = std::process::Command::new(bin())
        .args([
            "verify",
            job.path.to_str().unwrap(),
            "--table",
            "public.names",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.names -> public.names: DIFFERENT") && !text.contains("public.acc"),
        "{text}"
    );
}

/// With the daemon streaming under a continuous write load, `cutover verify` asks it for
/// passes anchored at a source LSN: equal, pass after pass, with the LSN in the report;
/// continuous passes fill `last_verification`, `GET /v1/verify/latest` and the `verified`
/// gate; a row corrupted on the target behind the daemon's back is reported alone, as real.
#[tokio::test(flavor = "multi_thread")]
async fn anchored_passes_under_write_load() {
    let (src, dst) = tokio::join!(cluster("anchor-src"), cluster("anchor-dst"));
    let schema = "CREATE TABLE public.hot (id int PRIMARY KEY, n bigint, note text);
                  CREATE TABLE public.cold (id int PRIMARY KEY, v text);";
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO hot SELECT g, 0, 'h' || g FROM generate_series(1, 2000) g;
         INSERT INTO cold SELECT g, 'c' || g FROM generate_series(1, 5000) g;",
    )
    .await
    .unwrap();
    let (job, mut daemon, s, d) =
        streaming(&src, &dst, "anchor", "[verify]\nevery = \"2s\"\n").await;

    // A writer that changes hot rows and inserts new ones all the time.
    let writer = Writer::start(src.connect("db").await.unwrap(), Duration::ZERO, |i| {
        format!(
            "BEGIN; UPDATE hot SET n = n + 1 WHERE id % 50 = {}; INSERT INTO hot VALUES ({}, {i}, 'new'); COMMIT;",
            i % 50,
            100_000 + i
        )
    });

    for _ in 0..3 {
        let (code, doc) = run_json(&["verify", job.path.to_str().unwrap()]);
        assert_eq!(
            code,
            Some(0),
            "an anchored pass under load: {doc:#}\n{}",
            daemon.output()
        );
        assert!(doc["lsn"].is_string(), "{doc}");
        assert_eq!(doc["equal"], true);
    }

    // Continuous passes publish their summary and their report.
    let st = daemon
        .wait_status("a clean continuous pass", Duration::from_secs(60), |st| {
            st["last_verification"]["tables_equal"] == true
        })
        .await;
    assert!(st["last_verification"]["lsn"].is_string(), "{st}");
    let (code, body) = daemon.get("/v1/verify/latest").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let latest: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(latest["equal"], true, "{latest}");
    let (_, ready) = run_json(&["ready", "--api", &job.api()]);
    assert!(
        !ready["unmet"].to_string().contains("\"verified\""),
        "a clean recent pass meets the verified gate: {ready}"
    );

    // Behind the daemon's back: one cold row (the writer never touches it).
    d.batch_execute(
        "SET session_replication_role = replica; UPDATE cold SET v = 'tampered' WHERE id = 42",
    )
    .await
    .unwrap();
    let (code, doc) = run_json(&["verify", job.path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{doc:#}");
    let cold = table(&doc, "public.cold");
    assert_eq!(cold["differences_total"], 1, "{cold}");
    assert_eq!(cold["differences"][0]["key"]["id"], "42");
    assert_eq!(cold["differences"][0]["columns"][0], "v");
    assert_eq!(table(&doc, "public.hot")["differences_total"], 0, "{doc:#}");
    // The gate goes unmet with the next continuous pass.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, ready) = run_json(&["ready", "--api", &job.api()]);
        if ready["unmet"].to_string().contains("differences") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "verified gate still met: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let writes = writer.stop().await;
    assert!(writes > 50, "the writer wrote during the passes: {writes}");
    d.batch_execute(
        "SET session_replication_role = replica; UPDATE cold SET v = 'c42' WHERE id = 42",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        "public.hot",
        "public.hot",
        Duration::from_secs(60),
        Some(&daemon),
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// Between full passes, keys changed by the stream are compared again at new anchors: a
/// target row deleted behind the daemon's back is caught when the source next updates it
/// (the apply's update finds nothing to change), readiness is revoked, and restored once a
/// later comparison of that key is clean.
#[tokio::test(flavor = "multi_thread")]
async fn changed_keys_are_verified_again_between_full_passes() {
    let (src, dst) = tokio::join!(cluster("rever-src"), cluster("rever-dst"));
    let schema = "CREATE TABLE public.acc (id int PRIMARY KEY, n bigint, note text);";
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO acc SELECT g, 0, 'a' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    // One full pass at the start, then only re-verification for the rest of the test.
    let (job, mut daemon, s, d) =
        streaming(&src, &dst, "rever", "[verify]\nevery = \"1h\"\n").await;
    let status_until = |what: &'static str, pred: fn(&serde_json::Value) -> bool| {
        daemon.wait_status(what, Duration::from_secs(60), pred)
    };
    status_until("a first clean pass", |st| {
        st["last_verification"]["tables_equal"] == true
    })
    .await;

    // Row 7 is deleted on the target behind the daemon's back; the source then updates it
    // (the apply's update finds no row: nothing else would notice).
    d.batch_execute("SET session_replication_role = replica; DELETE FROM acc WHERE id = 7")
        .await
        .unwrap();
    s.batch_execute("UPDATE acc SET n = n + 1 WHERE id IN (7, 8, 9)")
        .await
        .unwrap();
    let st = status_until("the changed key found different", |st| {
        st["reverify"]["suspect_keys"] == 1
    })
    .await;
    assert!(st["reverify"]["last_round_lsn"].is_string(), "{st}");
    let (code, ready) = run_json(&["ready", "--api", &job.api()]);
    assert_eq!(code, Some(1));
    assert!(
        ready["unmet"]
            .to_string()
            .contains("differed when compared again"),
        "{ready}"
    );
    // Repaired on the target: the next round clears it, and readiness comes back.
    d.batch_execute(
        "SET session_replication_role = replica; INSERT INTO acc SELECT id, n, note FROM (VALUES (7, 1::bigint, 'a7')) v(id, n, note)",
    )
    .await
    .unwrap();
    status_until("the suspect cleared", |st| {
        st["reverify"]["suspect_keys"] == 0 && st["reverify"]["pending_keys"] == 0
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, ready) = run_json(&["ready", "--api", &job.api()]);
        if code == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not ready again: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_equal(
        &s,
        &d,
        "public.acc",
        "public.acc",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// A comparison that outlives `[verify] snapshot_max_age` takes fresh snapshots in the
/// middle of the table and goes on after the last key it compared: every row is compared
/// once (no gap, no overlap), the rows a writer changes meanwhile are not differences, and
/// the corrupted keys in every part are reported exactly.
#[tokio::test(flavor = "multi_thread")]
async fn a_long_pass_renews_its_snapshots_inside_a_table() {
    let (src, dst) = tokio::join!(cluster("renew-src"), cluster("renew-dst"));
    let schema = "CREATE TABLE public.big (id int PRIMARY KEY, n bigint, note text);
                  CREATE TABLE public.words (k text PRIMARY KEY, v int);";
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO big SELECT g, 0, 'b' || g || repeat('.', 400) FROM generate_series(1, 100000) g;
         INSERT INTO words SELECT md5(g::text) || CASE WHEN g % 2 = 0 THEN 'Z' ELSE 'a' END, g
           FROM generate_series(1, 80000) g;",
    )
    .await
    .unwrap();
    // 100000 rows at 50000 rows a second: about two seconds, in chunks of 10000 rows, so
    // a one-second snapshot age is passed in the middle of the table. `words` takes 1.6 s
    // on its own, so it renews too, whatever the age of the snapshot it starts with.
    let (job, mut daemon, s, d) = streaming(
        &src,
        &dst,
        "renew",
        "[verify]\nevery = \"0\"\nmax_rows_per_second = 50000\nsnapshot_max_age = \"1s\"\n",
    )
    .await;
    for t in ["public.big", "public.words"] {
        wait_equal_digest(&s, &d, t, t, Duration::from_secs(60), Some(&daemon)).await;
    }

    // Behind the daemon's back, in different parts of the table.
    d.batch_execute(
        "SET session_replication_role = replica;
         UPDATE big SET note = 'tampered' WHERE id = 3;
         DELETE FROM big WHERE id = 75000;
         UPDATE big SET n = -1 WHERE id = 99999;
         UPDATE words SET v = 0 WHERE v IN (7, 29999);",
    )
    .await
    .unwrap();

    // A writer keeps changing rows in every part of the table during the pass.
    let writer = Writer::start(
        src.connect("db").await.unwrap(),
        Duration::from_millis(2),
        |i| {
            let id = 10 + (i * 7919) % 99_000;
            let id = if matches!(id, 3 | 75000 | 99999) {
                id + 1
            } else {
                id
            };
            format!("UPDATE big SET n = n + 1 WHERE id = {id}")
        },
    );

    // Rows read from the target's table, from its statistics (which a session reports
    // up to a second after its reads: wait that long first).
    let stats = dst.connect("db").await.unwrap();
    let read_on_target = || async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let row = stats
            .query_one(
                "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
                   FROM pg_stat_user_tables WHERE relname = 'big'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };
    let read_before = read_on_target().await;
    let (code, doc) = run_json(&["verify", job.path.to_str().unwrap()]);
    let writes = writer.stop().await;
    let read = read_on_target().await - read_before;
    // Without a bug, each part reads the rest of the table at most (what the servers had
    // sent ahead into the socket buffers when it stopped): with parts stopping evenly,
    // n parts read at most (n + 1) / 2 tables, plus the writer's changes applied and
    // re-verified. A plan that scans and sorts the whole table for each part reads n
    // tables. The bound sits between the two (reading from the start instead of after
    // the key is caught by the rows_compared check).
    let parts = table(&doc, "public.big")["snapshots"].as_i64().unwrap_or(1);
    let bound = 100_000 * (3 * parts + 1) / 4 + 15_000;
    assert!(
        read < bound,
        "each part reads from where the last one stopped (not from the start, nor by sorting the rest): {read} rows read on the target in {parts} snapshots (bound {bound})"
    );
    assert_eq!(code, Some(1), "{doc:#}\n{}", daemon.output());
    let big = table(&doc, "public.big");
    let snapshots = big["snapshots"].as_u64().unwrap_or(1);
    assert!(
        snapshots >= 2,
        "the pass outlived snapshot_max_age and took fresh snapshots: {big:#}"
    );
    assert_eq!(
        big["rows_compared"], 100000,
        "every row compared once across the parts: {big:#}"
    );
    let mut found: Vec<(String, String)> = big["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["key"]["id"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        [
            ("3".to_string(), "different".to_string()),
            ("75000".to_string(), "missing".to_string()),
            ("99999".to_string(), "different".to_string()),
        ],
        "exactly the corrupted keys, none of the rows the writer changed ({writes} writes): {big:#}"
    );
    // Text keys go on after the last key in byte order (COLLATE "C").
    let words = table(&doc, "public.words");
    assert!(words["snapshots"].as_u64().unwrap_or(1) >= 2, "{words:#}");
    assert_eq!(words["rows_compared"], 80000, "{words:#}");
    let mut keys: Vec<&str> = words["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"]["k"].as_str().unwrap())
        .collect();
    keys.sort();
    let expected: Vec<String> = s
        .query("SELECT k FROM words WHERE v IN (7, 29999) ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, expected, "{words:#}");
    assert!(writes > 20, "the writer wrote during the pass: {writes}");
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// A verification asked for while the stream is inside a source transaction pauses the
/// apply at that transaction's end, even when the source is idle after it. (It used to
/// wait for the next transaction to begin: on PostgreSQL 15 and later the source sends
/// none for the verifier's own logical message, so `cutover verify` failed after 120 s
/// with "the apply did not reach ...".) A trigger on the target (enabled ALWAYS, so it
/// fires for the apply) makes each insert statement take a moment, which keeps the apply
/// inside one large transaction for several seconds.
#[tokio::test(flavor = "multi_thread")]
async fn a_verification_asked_for_inside_a_transaction_pauses_at_its_end() {
    let (src, dst) = tokio::join!(cluster("midtx-src"), cluster("midtx-dst"));
    let schema = "CREATE TABLE public.big (id int PRIMARY KEY, v int);";
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    dst.execute(
        "db",
        "CREATE FUNCTION public.slow() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END $$;
         CREATE TRIGGER slow AFTER INSERT ON public.big FOR EACH STATEMENT
           EXECUTE FUNCTION public.slow();
         ALTER TABLE public.big ENABLE ALWAYS TRIGGER slow;",
    )
    .await
    .unwrap();
    // A lag of up to an hour still lets the verifier anchor (it waits while the apply is
    // behind by more than `max_lag`), so it asks while the transaction is applied.
    let (job, mut daemon, s, d) = streaming(
        &src,
        &dst,
        "midtx",
        "[verify]\nevery = \"0\"\n[ready]\nmax_lag = \"1h\"\n",
    )
    .await;
    // One transaction, then nothing more on the source.
    s.batch_execute("INSERT INTO big SELECT g, g FROM generate_series(1, 300000) g")
        .await
        .unwrap();
    // The apply (on the job's control session) is inside it once the trigger sleeps.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while sessions_waiting(&d, "cutover/midtx/control", "PgSleep").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the apply never ran the trigger:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let path = job.path.to_str().unwrap().to_owned();
    let started = std::time::Instant::now();
    let (code, report) = tokio::task::spawn_blocking(move || run_json(&["verify", &path]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{report:#}\n{}", daemon.output());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "verify took {:?}",
        started.elapsed()
    );
    assert!(
        daemon
            .output()
            .contains("a verifier asks for a pause inside a source transaction"),
        "the request did not reach the stream inside the transaction:\n{}",
        daemon.output()
    );
    wait_equal(
        &s,
        &d,
        "public.big",
        "public.big",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// Sessions on `client`'s server with application name `name` waiting on `event`.
async fn sessions_waiting(client: &tokio_postgres::Client, name: &str, event: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = $1 AND wait_event = $2",
            &[&name, &event],
        )
        .await
        .unwrap()
        .get(0)
}
