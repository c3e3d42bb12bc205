//! The sync core end to end: snapshot, streaming, every DML kind, restarts and kills.
//! Every check compares source and target with independent SQL (tests/support).

mod support;

use std::time::Duration;

use support::*;

const SCHEMA: &str = r#"
CREATE TABLE public.accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2), note text);
CREATE TABLE public."Odd ""Name""" ("Key Col" int PRIMARY KEY, "Value" text);
CREATE TABLE public.events (kind text, payload jsonb, at timestamptz);
ALTER TABLE public.events REPLICA IDENTITY FULL;
CREATE TABLE public.docs (id int PRIMARY KEY, title text, body text);
ALTER TABLE public.docs ALTER COLUMN body SET STORAGE EXTERNAL;
"#;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn setup_pair() -> (
    cutover::cluster::Cluster,
    cutover::cluster::Cluster,
    tokio_postgres::Client,
    tokio_postgres::Client,
) {
    let (src, dst) = tokio::join!(cluster("sync-src"), cluster("sync-dst"));
    src.create_database("shop").await.unwrap();
    dst.create_database("shop").await.unwrap();
    src.execute("shop", SCHEMA).await.unwrap();
    dst.execute("shop", SCHEMA).await.unwrap();
    let s = src.connect("shop").await.unwrap();
    let d = dst.connect("shop").await.unwrap();
    (src, dst, s, d)
}

async fn assert_all_equal(s: &tokio_postgres::Client, d: &tokio_postgres::Client, daemon: &Daemon) {
    for t in [
        "public.accounts",
        r#"public."Odd ""Name""""#,
        "public.events",
        "public.docs",
    ] {
        wait_equal(s, d, t, t, TIMEOUT, Some(daemon)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_every_dml_kind_across_clusters() {
    let (src, dst, s, d) = setup_pair().await;
    s.batch_execute(
        r#"
        INSERT INTO accounts SELECT g, 'owner' || g, g * 1.5, NULL FROM generate_series(1, 5000) g;
        INSERT INTO "Odd ""Name""" VALUES (1, 'one'), (2, 'two');
        INSERT INTO events VALUES ('a', '{"x": 1}', '2024-01-01 00:00:00+00'), ('a', '{"x": 1}', '2024-01-01 00:00:00+00'), ('b', NULL, NULL);
        INSERT INTO docs SELECT g, 't' || g, repeat(md5(g::text), 1000) FROM generate_series(1, 20) g;
        "#,
    )
    .await
    .unwrap();
    let job = Job::write("dml", &src.url("shop"), &dst.url("shop"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_all_equal(&s, &d, &daemon).await;

    // Caught up and idle: ready holds, and the metrics show the lag.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let (code, body) = daemon.get("/v1/ready").await.unwrap_or_default();
        if code == 200 {
            assert!(body.contains("\"ready\":true"), "{body}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = daemon.get("/metrics").await.unwrap();
    assert!(metrics.contains("cutover_lag_bytes"), "{metrics}");
    let status = daemon.status().await.unwrap();
    for field in [
        "job",
        "phase",
        "source_lsn",
        "applied_lsn",
        "lag_bytes",
        "lag_seconds",
        "tables",
        "last_verification",
    ] {
        assert!(
            status.get(field).is_some(),
            "status lacks {field}: {status}"
        );
    }
    assert!(
        status["tables"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["snapshot_done"] == true)
    );
    let accounts = status["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["source"] == "public.accounts")
        .unwrap()
        .clone();
    assert_eq!(accounts["rows_copied"], 5000, "{accounts}");
    assert!(accounts["bytes_copied"].as_u64().unwrap() > 0, "{accounts}");

    // Every DML kind while streaming.
    s.batch_execute(
        r#"
        INSERT INTO accounts SELECT g, 'late' || g, 0, 'x' FROM generate_series(5001, 6000) g;
        UPDATE accounts SET balance = balance + 1 WHERE id % 7 = 0;
        UPDATE accounts SET id = id + 100000 WHERE id BETWEEN 10 AND 20;   -- key changes
        DELETE FROM accounts WHERE id % 11 = 0;
        UPDATE "Odd ""Name""" SET "Value" = 'uno' WHERE "Key Col" = 1;
        INSERT INTO "Odd ""Name""" VALUES (3, 'it''s "quoted"; DROP TABLE accounts; --');
        UPDATE events SET payload = '{"x": 2}' WHERE kind = 'a';           -- two identical rows
        DELETE FROM events WHERE kind = 'b';
        INSERT INTO events VALUES ('c', '[1, 2]', now());
        UPDATE docs SET title = 'changed' WHERE id <= 10;                 -- body stays unchanged TOAST
        BEGIN; INSERT INTO accounts VALUES (-1, 'rolled back', 0, NULL); ROLLBACK;
        BEGIN; INSERT INTO accounts VALUES (-2, 'sub', 0, NULL); SAVEPOINT a;
               INSERT INTO accounts VALUES (-3, 'sub rolled back', 0, NULL); ROLLBACK TO a; COMMIT;
        "#,
    )
    .await
    .unwrap();
    assert_all_equal(&s, &d, &daemon).await;
    let body_len: i64 = d
        .query_one(
            "SELECT sum(length(body))::int8 FROM docs WHERE id <= 10",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        body_len,
        10 * 32 * 1000,
        "unchanged TOAST values must be kept on the target"
    );
    let rolled_back: i64 = d
        .query_one("SELECT count(*) FROM accounts WHERE id IN (-1, -3)", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rolled_back, 0);

    // TRUNCATE reaches the target.
    s.batch_execute("TRUNCATE events; INSERT INTO events VALUES ('after', NULL, NULL);")
        .await
        .unwrap();
    assert_all_equal(&s, &d, &daemon).await;

    // A clean stop exits 0 and confirms what was applied.
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)),
        Some(0),
        "{}",
        daemon.output()
    );
    let confirmed: Option<String> = s
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'cutover_dml'", &[])
        .await
        .unwrap()
        .get(0);
    let progress: String = d
        .query_one(
            "SELECT end_lsn::text FROM cutover.progress WHERE job = 'dml'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let cmp: bool = s
        .query_one(
            "SELECT $1::text::pg_lsn >= $2::text::pg_lsn",
            &[&confirmed, &progress],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        cmp,
        "slot confirmed {confirmed:?} should have reached the applied {progress}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn new_schema_in_the_same_database() {
    let src = cluster("same-db").await;
    src.create_database("app").await.unwrap();
    src.execute(
        "app",
        "CREATE TABLE public.items (id int PRIMARY KEY, name text);
         CREATE SCHEMA v2; CREATE TABLE v2.items (id int PRIMARY KEY, name text);
         INSERT INTO public.items SELECT g, 'n' || g FROM generate_series(1, 1000) g;",
    )
    .await
    .unwrap();
    let c = src.connect("app").await.unwrap();
    let job = Job::write_with_target(
        "samedb",
        &src.url("app"),
        &src.url("app"),
        "schema = \"v2\"",
        "",
    );
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    // A table copied whole is loaded with COPY FREEZE: every page is all-frozen, so
    // nothing rewrites them later to set hint bits or to freeze them.
    c.batch_execute("CREATE EXTENSION pg_visibility")
        .await
        .unwrap();
    let (pages, frozen): (i64, i64) = {
        let row = c
            .query_one(
                "SELECT pg_relation_size('v2.items') / 8192, \
                 all_frozen FROM pg_visibility_map_summary('v2.items')",
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(
        pages > 0 && frozen == pages,
        "{frozen} of {pages} pages all-frozen"
    );
    c.batch_execute("UPDATE public.items SET name = 'x' WHERE id < 100; DELETE FROM public.items WHERE id > 900; INSERT INTO public.items VALUES (5000, 'new');")
        .await
        .unwrap();
    wait_equal(&c, &c, "public.items", "v2.items", TIMEOUT, Some(&daemon)).await;
    // The publication lists the source table only: the apply's writes are not published back.
    let published = strings(&c, "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'cutover_samedb'").await;
    assert_eq!(published, vec!["public.items".to_string()]);
    // A table created on the source after the start is reported, not silently ignored.
    c.batch_execute("CREATE TABLE public.late (id int PRIMARY KEY)")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let status = daemon.status().await.unwrap_or_default();
        if status["unmapped_tables"] == serde_json::json!(["public.late"]) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not reported: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn slot_creation_blocked_by_an_open_transaction_fails_cleanly() {
    let (src, dst) = tokio::join!(cluster("block-src"), cluster("block-dst"));
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", "CREATE TABLE public.t (id int PRIMARY KEY)")
            .await
            .unwrap();
    }
    let s = src.connect("db").await.unwrap();
    let blocker = src.connect("db").await.unwrap();
    // An open transaction with an xid keeps CREATE_REPLICATION_SLOT waiting.
    blocker
        .batch_execute("SET application_name = 'the-blocker'; BEGIN; INSERT INTO t VALUES (1);")
        .await
        .unwrap();
    let job = Job::write(
        "blocked",
        &src.url("db"),
        &dst.url("db"),
        "[snapshot]\nslot_wait = \"2s\"",
    );
    let mut daemon = Daemon::start(&job);
    let out = daemon.wait_exit(TIMEOUT, "on the blocked slot").await;
    assert!(
        out.contains("could not create replication slot \"cutover_blocked\""),
        "{out}"
    );
    assert!(
        out.contains("the-blocker"),
        "the error must name the blocking backend:\n{out}"
    );
    let slots: i64 = s
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "no half-made slot may be left behind");
    blocker.batch_execute("ROLLBACK").await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn renamed_target_table_and_idle_slot_follows_the_wal() {
    let (src, dst) = tokio::join!(cluster("rename-src"), cluster("rename-dst"));
    src.create_database("db").await.unwrap();
    src.create_database("other").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute("db", "CREATE TABLE public.orders (id int PRIMARY KEY, total numeric); INSERT INTO orders SELECT g, g FROM generate_series(1, 100) g;")
        .await
        .unwrap();
    src.execute(
        "other",
        "CREATE TABLE noise (id serial PRIMARY KEY, v text)",
    )
    .await
    .unwrap();
    dst.execute(
        "db",
        "CREATE SCHEMA sales; CREATE TABLE sales.orders_v2 (id int PRIMARY KEY, total numeric);",
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write(
        "rename",
        &src.url("db"),
        &dst.url("db"),
        "[[table]]\nsource = \"public.orders\"\ntarget = \"sales.orders_v2\"\n",
    );
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    s.batch_execute(
        "UPDATE orders SET total = total * 2 WHERE id < 50; DELETE FROM orders WHERE id > 90;",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        "public.orders",
        "sales.orders_v2",
        TIMEOUT,
        Some(&daemon),
    )
    .await;

    // WAL written elsewhere (another database) while our tables are quiet: the idle job
    // still confirms the server's WAL end, so the slot does not retain it.
    let other = src.connect("other").await.unwrap();
    other
        .batch_execute(
            "INSERT INTO noise (v) SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
        )
        .await
        .unwrap();
    let after: String = other
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let caught_up: bool = s
            .query_one(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cutover_rename'",
                &[&after],
            )
            .await
            .unwrap()
            .get(0);
        if caught_up {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle slot never moved past {after}:\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Teardown refuses while the job runs, then drops slot and publication, idempotently.
    let teardown = || {
        std::process::Command::new(bin())
            .arg("teardown")
            .arg(&job.path)
            .output()
            .unwrap()
    };
    let err = refused(&["teardown", &path_str(&job.path)]);
    assert!(
        err.contains("is in use by PID") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    for _ in 0..2 {
        let out = teardown();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let left = slots_and_publications(&s).await;
    assert_eq!(left, 0, "teardown must leave no slot and no publication");
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_what_would_fail_and_changes_nothing() {
    let (src, dst) = tokio::join!(cluster("check-src"), cluster("check-dst"));
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute(
        "db",
        "CREATE TABLE public.good (id int PRIMARY KEY, v text);
         CREATE TABLE public.nokey (v text);
         CREATE TABLE public.missing_on_target (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    dst.execute(
        "db",
        "CREATE TABLE public.good (id int PRIMARY KEY, v text); CREATE TABLE public.nokey (v text);",
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let job = Job::write("check", &src.url("db"), &dst.url("db"), "");
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(bin());
        cmd.arg("check").arg(&job.path);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = run(true);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let result = |name: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no check {name}: {doc}"))
            .clone()
    };
    assert_eq!(result("wal_level")["result"], "pass");
    assert_eq!(result("source replication connection")["result"], "pass");
    assert_eq!(result("max_slot_wal_keep_size")["result"], "warn");
    assert_eq!(result("table public.good -> public.good")["result"], "pass");
    let nokey = result("table public.nokey -> public.nokey: key");
    assert_eq!(nokey["result"], "fail");
    assert!(
        nokey["fix"]
            .as_str()
            .unwrap()
            .contains("REPLICA IDENTITY FULL"),
        "{nokey}"
    );
    let missing = result("table public.missing_on_target");
    assert_eq!(missing["result"], "fail");
    assert!(
        missing["detail"]
            .as_str()
            .unwrap()
            .contains("does not exist")
    );
    // The text form is a table too, and check changed nothing on the source.
    let text = run(false);
    assert!(String::from_utf8_lossy(&text.stdout).contains("not ready to run"));
    let created = slots_and_publications(&s).await;
    assert_eq!(created, 0, "check must not create a slot or a publication");
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_are_names_and_a_failed_preflight_creates_nothing() {
    let (src, dst) = tokio::join!(cluster("names-src"), cluster("names-dst"));
    let schema = r#"CREATE TABLE public.t (id int PRIMARY KEY);
        CREATE TABLE public."x""; DROP TABLE t; --" ("a""b" int PRIMARY KEY, "select" text);"#;
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    src.execute(
        "db",
        r#"INSERT INTO public."x""; DROP TABLE t; --" VALUES (1, 'one'), (2, 'two')"#,
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();

    // A job whose pre-flight fails (a target table is missing) leaves nothing behind.
    src.execute(
        "db",
        "CREATE TABLE public.only_on_source (id int PRIMARY KEY)",
    )
    .await
    .unwrap();
    let job = Job::write("names", &src.url("db"), &dst.url("db"), "");
    let err = refused(&["run", &path_str(&job.path)]);
    assert!(
        err.contains("target table public.only_on_source does not exist"),
        "{err}"
    );
    let created = slots_and_publications(&s).await;
    assert_eq!(
        created, 0,
        "a failed pre-flight must create no slot and no publication"
    );
    // Source and target the same database, tables mapped by name: refused before
    // anything is created.
    let onto_itself = Job::write("itself", &src.url("db"), &src.url("db"), "");
    let err = refused(&["run", &path_str(&onto_itself.path)]);
    assert!(
        err.contains("would be copied onto itself") && err.contains("hint: set [target] schema"),
        "{err}"
    );
    assert_eq!(slots_and_publications(&s).await, 0);
    src.execute("db", "DROP TABLE public.only_on_source")
        .await
        .unwrap();

    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    s.batch_execute(r#"UPDATE public."x""; DROP TABLE t; --" SET "select" = 'it''s; DROP TABLE t; --' WHERE "a""b" = 1"#)
        .await
        .unwrap();
    let table = r#"public."x""; DROP TABLE t; --""#;
    wait_equal(&s, &d, table, table, TIMEOUT, Some(&daemon)).await;
    for c in [&s, &d] {
        let t: i64 = c
            .query_one("SELECT count(*) FROM pg_tables WHERE tablename = 't'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(t, 1, "table t must still exist");
    }
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn check_fails_on_source_settings_and_foreign_slots() {
    let (src, dst) = tokio::join!(
        cluster_with(
            "check2-src",
            &[
                ("max_replication_slots", "2"),
                ("max_slot_wal_keep_size", "1GB")
            ]
        ),
        cluster("check2-dst")
    );
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", "CREATE TABLE public.t (id int PRIMARY KEY)")
            .await
            .unwrap();
    }
    // Someone else's slot under the job's name, and no slot left free.
    src.execute(
        "db",
        "SELECT pg_create_logical_replication_slot('cutover_check2', 'test_decoding');
         SELECT pg_create_logical_replication_slot('other', 'pgoutput');",
    )
    .await
    .unwrap();
    let job = Job::write("check2", &src.url("db"), &dst.url("db"), "");
    let out = std::process::Command::new(bin())
        .arg("check")
        .arg(&job.path)
        .arg("--json")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let result = |name: &str| {
        doc["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("{name}: {doc}"))
            .clone()
    };
    assert_eq!(result("free replication slots")["result"], "fail");
    assert_eq!(result("max_slot_wal_keep_size")["result"], "pass");
    let slot = result("replication slot");
    assert_eq!(slot["result"], "fail");
    assert!(
        slot["detail"]
            .as_str()
            .unwrap()
            .contains("does not use pgoutput"),
        "{slot}"
    );
    // And run refuses the foreign slot too, changing nothing.
    let err = refused(&["run", &path_str(&job.path)]);
    assert!(err.contains("does not use pgoutput"), "{err}");
    let s = src.connect("db").await.unwrap();
    let publications: i64 = s
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        publications, 0,
        "a refused run must not create the publication"
    );
}

/// The result of the check named `name` (a prefix) in a `check --json` document.
fn check_result(doc: &serde_json::Value, name: &str) -> serde_json::Value {
    let checks = doc["checks"].as_array().unwrap();
    checks
        .iter()
        .find(|c| c["check"] == name)
        .or_else(|| {
            checks
                .iter()
                .find(|c| c["check"].as_str().unwrap().starts_with(name))
        })
        .unwrap_or_else(|| panic!("no check {name}: {doc}"))
        .clone()
}

fn run_check(job: &Job) -> (Option<i32>, serde_json::Value) {
    run_json(&["check", job.path.to_str().unwrap()])
}

#[tokio::test(flavor = "multi_thread")]
async fn check_covers_roles_wal_level_columns_types_and_loops() {
    let (src, dst) = tokio::join!(
        cluster_with(
            "check3-src",
            &[("wal_level", "replica"), ("max_wal_senders", "1")]
        ),
        cluster("check3-dst")
    );
    let tables = "CREATE TABLE public.gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
         CREATE TABLE public.lob (id int PRIMARY KEY, doc oid);
         CREATE TABLE public.txtkey (k text PRIMARY KEY, v int);";
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute(
        "db",
        &format!(
            "{tables} CREATE TABLE public.typed (id int PRIMARY KEY, v bigint);
                  CREATE ROLE norepl LOGIN; GRANT SELECT ON ALL TABLES IN SCHEMA public TO norepl;"
        ),
    )
    .await
    .unwrap();
    dst.execute(
        "db",
        &format!(
            "{tables} CREATE TABLE public.typed (id int PRIMARY KEY, v int);
             ALTER TABLE public.txtkey DROP CONSTRAINT txtkey_pkey, ADD PRIMARY KEY (v);"
        ),
    )
    .await
    .unwrap();
    let job = Job::write(
        "check3",
        &src.url("db").replace("postgres@", "norepl@"),
        &dst.url("db"),
        "",
    );
    let (code, doc) = run_check(&job);
    assert_eq!(code, Some(1));
    assert_eq!(check_result(&doc, "wal_level")["result"], "fail");
    assert!(
        check_result(&doc, "wal_level")["fix"]
            .as_str()
            .unwrap()
            .contains("wal_level = logical")
    );
    let repl = check_result(&doc, "source replication connection");
    assert_eq!(repl["result"], "fail", "{repl}");
    assert!(
        repl["fix"].as_str().unwrap().contains("REPLICATION"),
        "{repl}"
    );
    assert_eq!(
        check_result(&doc, "table public.gen -> public.gen: generated")["result"],
        "warn"
    );
    assert_eq!(
        check_result(&doc, "table public.lob -> public.lob: large objects")["result"],
        "warn"
    );
    assert_eq!(
        check_result(&doc, "table public.txtkey -> public.txtkey: key storage")["result"],
        "warn"
    );
    // bigint does not fit integer implicitly: a cast is asked for.
    let typed = check_result(&doc, "table public.typed -> public.typed: mapping");
    assert_eq!(typed["result"], "fail");
    assert!(
        typed["detail"]
            .as_str()
            .unwrap()
            .contains("is integer but source column public.typed.\"v\" is bigint"),
        "{typed}"
    );
    assert!(
        typed["fix"]
            .as_str()
            .unwrap()
            .contains("v = \"v::integer\""),
        "{typed}"
    );
    assert_eq!(
        check_result(&doc, "table public.gen -> public.gen")["result"],
        "pass"
    );

    // Same database: a target table that is itself published would loop.
    dst.execute(
        "db",
        "CREATE SCHEMA v2; CREATE TABLE v2.typed (id int PRIMARY KEY, v bigint); CREATE PUBLICATION other FOR TABLE v2.typed;",
    )
    .await
    .unwrap();
    let same = Job::write(
        "check3b",
        &dst.url("db"),
        &dst.url("db"),
        "[[table]]\nsource = \"public.typed\"\ntarget = \"v2.typed\"\n",
    );
    let (code, doc) = run_check(&same);
    assert_eq!(code, Some(1));
    assert_eq!(
        check_result(&doc, "table public.typed -> v2.typed: loop")["result"],
        "fail"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_tables_arrive_under_their_root() {
    let (src, dst) = tokio::join!(cluster("part-src"), cluster("part-dst"));
    let schema = "CREATE TABLE public.events (id int, at date NOT NULL, v text, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
        CREATE TABLE public.events_2024 PARTITION OF public.events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE public.events_2025 PARTITION OF public.events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');";
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute("db", schema).await.unwrap();
    // The target need not be partitioned the same way: here it is one plain table.
    dst.execute(
        "db",
        "CREATE TABLE public.events (id int, at date NOT NULL, v text, PRIMARY KEY (id, at));",
    )
    .await
    .unwrap();
    src.execute("db", "INSERT INTO events SELECT g, date '2024-06-01' + (g % 400), 'v' FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write("part", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    s.batch_execute(
        "INSERT INTO events VALUES (5000, '2025-03-01', 'new');
         UPDATE events SET v = 'moved', at = '2025-02-02' WHERE id = 10;   -- moves across partitions
         DELETE FROM events WHERE id % 10 = 3;",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        "public.events",
        "public.events",
        TIMEOUT,
        Some(&daemon),
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_linked_by_foreign_keys_are_copied_and_streamed() {
    let (src, dst) = tokio::join!(cluster("fk-src"), cluster("fk-dst"));
    let schema = "CREATE TABLE public.customers (id int PRIMARY KEY, name text);
        CREATE TABLE public.orders (id int PRIMARY KEY, customer_id int NOT NULL REFERENCES public.customers (id), total numeric);
        CREATE INDEX orders_customer ON public.orders (customer_id);";
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", schema).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 20000) g;
         INSERT INTO orders SELECT g, 1 + g % 20000, g FROM generate_series(1, 200000) g;",
    )
    .await
    .unwrap();
    // Leftovers on the target: the copy must empty tables that foreign keys reference.
    dst.execute(
        "db",
        "INSERT INTO customers VALUES (1, 'stale'); INSERT INTO orders VALUES (1, 1, 0);",
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write("fk", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    s.batch_execute(
        "BEGIN; INSERT INTO customers VALUES (30000, 'new'); INSERT INTO orders VALUES (300000, 30000, 1); COMMIT;
         BEGIN; DELETE FROM orders WHERE customer_id = 7; DELETE FROM customers WHERE id = 7; COMMIT;",
    )
    .await
    .unwrap();
    wait_equal_digest(
        &s,
        &d,
        "public.customers",
        "public.customers",
        TIMEOUT,
        Some(&daemon),
    )
    .await;
    wait_equal_digest(
        &s,
        &d,
        "public.orders",
        "public.orders",
        TIMEOUT,
        Some(&daemon),
    )
    .await;
    // Every constraint and index is in place on the target afterwards.
    let defs: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename IN ('customers', 'orders')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(defs, 3);
    let fks: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(fks, 1);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn create_tables_builds_the_target_from_the_source() {
    let (src, dst) = tokio::join!(cluster("create-src"), cluster("create-dst"));
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute(
        "db",
        "CREATE TABLE public.items (id int PRIMARY KEY, sku text UNIQUE, price numeric CHECK (price >= 0),
                                    doubled numeric GENERATED ALWAYS AS (price * 2) STORED, note text);
         CREATE INDEX items_lower_sku ON public.items (lower(sku));
         CREATE TABLE public.lines (item int, n int, qty int NOT NULL, PRIMARY KEY (item, n));
         INSERT INTO items (id, sku, price) SELECT g, 'S' || g, g FROM generate_series(1, 5000) g;
         INSERT INTO lines SELECT g % 100, g, 1 FROM generate_series(1, 3000) g;",
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write_with_target(
        "create",
        &src.url("db"),
        &dst.url("db"),
        "schema = \"shop\"\ncreate_tables = true",
        "",
    );
    // check sees what run will create, and creates nothing itself.
    let out = std::process::Command::new(bin())
        .arg("check")
        .arg(&job.path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("shop.items does not exist; run creates it"),
        "{text}"
    );
    let before: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(before, 0);
    // verify only reads: it reports the missing table instead of creating it.
    refused(&["verify", &path_str(&job.path)]);
    let after: i64 = d
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'shop'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, 0, "verify must not create target tables");

    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    s.batch_execute("UPDATE items SET price = price + 1 WHERE id < 100; DELETE FROM lines WHERE n % 3 = 0; INSERT INTO items (id, sku, price) VALUES (9999, 'new', 5);")
        .await
        .unwrap();
    wait_equal(&s, &d, "public.items", "shop.items", TIMEOUT, Some(&daemon)).await;
    wait_equal(&s, &d, "public.lines", "shop.lines", TIMEOUT, Some(&daemon)).await;
    let indexes = strings(
        &d,
        "SELECT indexname::text FROM pg_indexes WHERE schemaname = 'shop' ORDER BY 1",
    )
    .await;
    assert_eq!(
        indexes,
        [
            "items_lower_sku",
            "items_pkey",
            "items_sku_key",
            "lines_pkey"
        ]
    );
    let checks: i64 = d
        .query_one("SELECT count(*) FROM pg_constraint WHERE contype = 'c' AND conrelid = 'shop.items'::regclass", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checks, 1);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}
