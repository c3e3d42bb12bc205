//! Migrating into a new shape: renamed tables and columns, computed columns, dropped and
//! target-only columns, row filters and key changes, in the same database and across
//! clusters; and DDL on the source while the job streams. Every comparison is an
//! independent query: the mapping written out by hand in SQL on the source, against the
//! target's rows.

mod support;

use std::time::Duration;

use support::*;

const SOURCE: &str = r#"
CREATE TABLE public.orders (
    id int PRIMARY KEY, first_name text, last_name text, total numeric(10,2),
    status text, region text, legacy text, note text
);
ALTER TABLE public.orders ALTER COLUMN note SET STORAGE EXTERNAL;
ALTER TABLE public.orders REPLICA IDENTITY FULL;
CREATE TABLE public.customers (id int PRIMARY KEY, name text, email text);
INSERT INTO public.orders
SELECT i, 'first' || i, 'last' || i, i * 1.25, CASE WHEN i % 2 = 0 THEN 'PAID' ELSE 'Open' END,
       CASE WHEN i % 3 = 0 THEN 'us' ELSE 'eu' END, 'old', CASE WHEN i % 5 = 0 THEN repeat('n', 5000) END
FROM generate_series(1, 60) i;
INSERT INTO public.customers SELECT i, 'name' || i, 'c' || i || '@example.com' FROM generate_series(1, 20) i;
"#;

const TARGET: &str = r#"
CREATE SCHEMA v2;
CREATE TABLE v2.orders (
    order_id int PRIMARY KEY, full_name text NOT NULL, total_cents bigint, status text,
    region text, note_length int, origin text NOT NULL DEFAULT 'v1'
);
CREATE TABLE v2.clients (client_id int PRIMARY KEY, display_name text, email text);
"#;

const TABLES: &str = r#"
[[table]]
source = "public.orders"
target = "v2.orders"
where = "region = 'eu'"

[table.columns]
order_id = "id"
full_name = "first_name || ' ' || last_name"
total_cents = "(total * 100)::bigint"
status = "lower(status)"
note_length = "length(note)"

[[table]]
source = "public.customers"
target = "v2.clients"

[table.columns]
client_id = "id"
display_name = "name"
"#;

/// The orders mapping, written out by hand.
const ORDERS_BY_HAND: &str = "(SELECT id, first_name || ' ' || last_name, (total * 100)::bigint, \
     lower(status), region, length(note), 'v1'::text FROM public.orders WHERE region = 'eu')";
const ORDERS_TARGET: &str =
    "(SELECT order_id, full_name, total_cents, status, region, note_length, origin FROM v2.orders)";
const CLIENTS_BY_HAND: &str = "(SELECT id, name, email FROM public.customers)";
const CLIENTS_TARGET: &str = "(SELECT client_id, display_name, email FROM v2.clients)";

/// Changes of every kind the mapping must carry: computed columns changing, rows moving
/// into and out of the filter, key changes inside and across it, unchanged TOAST values.
const CHANGES: &str = r#"
INSERT INTO public.orders VALUES (101, 'Ann', 'Lee', 9.99, 'NEW', 'eu', 'x', NULL),
                                 (102, 'Bob', 'Ray', 1.00, 'NEW', 'us', 'x', NULL);
UPDATE public.orders SET total = total + 1 WHERE id IN (1, 2, 3);
UPDATE public.orders SET status = 'Shipped' WHERE id = 101;
UPDATE public.orders SET region = 'us' WHERE id = 4;
UPDATE public.orders SET region = 'eu' WHERE id IN (3, 102);
UPDATE public.orders SET id = 1007 WHERE id = 7;
UPDATE public.orders SET id = 1009, region = 'eu' WHERE id = 9;
UPDATE public.orders SET id = 1010, region = 'us' WHERE id = 10;
UPDATE public.orders SET first_name = 'Zed' WHERE id = 5;
UPDATE public.orders SET note = repeat('m', 6000) WHERE id = 8;
DELETE FROM public.orders WHERE id IN (11, 12);
BEGIN;
INSERT INTO public.orders VALUES (103, 'Cy', 'Doe', 3.50, 'NEW', 'eu', 'x', NULL);
UPDATE public.orders SET region = 'us' WHERE id = 103;
UPDATE public.orders SET region = 'eu', total = 4.50 WHERE id = 103;
COMMIT;
UPDATE public.customers SET name = 'renamed' WHERE id = 1;
UPDATE public.customers SET id = 100 WHERE id = 2;
DELETE FROM public.customers WHERE id = 3;
INSERT INTO public.customers VALUES (21, 'new', 'n@example.com');
"#;

async fn mapping_converges(same_database: bool) {
    let (src, other) = tokio::join!(cluster("map-src"), cluster("map-dst"));
    src.create_database("db").await.unwrap();
    src.execute("db", SOURCE).await.unwrap();
    let dst = if same_database { &src } else { &other };
    dst.create_database("tgt").await.ok();
    let target_db = if same_database { "db" } else { "tgt" };
    dst.execute(target_db, TARGET).await.unwrap();
    let job = Job::write("mapping", &src.url("db"), &dst.url(target_db), TABLES);

    let (code, doc) = run_json(&["check", job.path.to_str().unwrap()]);
    let orders = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "table public.orders -> v2.orders")
        .cloned()
        .unwrap_or_else(|| panic!("no orders check: {doc:#}"));
    assert_eq!(orders["result"], "pass", "{doc:#}");
    assert!(
        orders["detail"]
            .as_str()
            .unwrap()
            .contains("4 computed on the source"),
        "{orders}"
    );
    assert_eq!(code, Some(0), "{doc:#}");

    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    let s = src.connect("db").await.unwrap();
    let d = dst.connect(target_db).await.unwrap();
    // The snapshot, through the mapping.
    wait_equal(
        &s,
        &d,
        ORDERS_BY_HAND,
        ORDERS_TARGET,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    wait_equal(
        &s,
        &d,
        CLIENTS_BY_HAND,
        CLIENTS_TARGET,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    // The stream, through the same mapping.
    s.batch_execute(CHANGES).await.unwrap();
    wait_equal(
        &s,
        &d,
        ORDERS_BY_HAND,
        ORDERS_TARGET,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    wait_equal(
        &s,
        &d,
        CLIENTS_BY_HAND,
        CLIENTS_TARGET,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    let eu: i64 = d
        .query_one("SELECT count(*) FROM v2.orders WHERE region <> 'eu'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(eu, 0, "only rows in the filter reach the target");

    // The verifier reads the source through the same mapping: equal, and a corrupted
    // computed cell is named by its target key and column.
    let (code, report) = run_json(&["verify", job.path.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{report:#}\n{}", daemon.output());
    d.batch_execute("UPDATE v2.orders SET total_cents = total_cents + 1 WHERE order_id = 1")
        .await
        .unwrap();
    let (code, report) = run_json(&["verify", job.path.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{report:#}");
    let orders = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "v2.orders")
        .cloned()
        .unwrap();
    assert_eq!(orders["differences_total"], 1, "{orders:#}");
    assert_eq!(orders["differences"][0]["kind"], "different", "{orders:#}");
    assert_eq!(
        orders["differences"][0]["key"]["order_id"], "1",
        "{orders:#}"
    );
    assert_eq!(
        orders["differences"][0]["columns"][0], "total_cents",
        "{orders:#}"
    );
    d.batch_execute("UPDATE v2.orders SET total_cents = total_cents - 1 WHERE order_id = 1")
        .await
        .unwrap();

    // A restart resumes through the mapping too.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    s.batch_execute(
        "UPDATE public.orders SET total = total * 2 WHERE region = 'eu'; \
         UPDATE public.orders SET region = 'eu' WHERE region = 'us' AND id % 2 = 0;",
    )
    .await
    .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_equal(
        &s,
        &d,
        ORDERS_BY_HAND,
        ORDERS_TARGET,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn mapped_columns_filters_and_keys_in_the_same_database() {
    mapping_converges(true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mapped_columns_filters_and_keys_across_clusters() {
    mapping_converges(false).await;
}

/// The status document's entry for `source`.
fn table_entry(status: &serde_json::Value, source: &str) -> serde_json::Value {
    status["tables"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["source"] == source).cloned())
        .unwrap_or_default()
}

/// Wait until `pred` holds for the table's status entry.
async fn wait_table(
    daemon: &Daemon,
    source: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let st = daemon
        .wait_status(
            &format!("{source}: {what}"),
            Duration::from_secs(30),
            |st| pred(&table_entry(st, source)),
        )
        .await;
    table_entry(&st, source)
}

/// DDL on a table mapped by name: a new column is added to the target; a type change the
/// target cannot take, and a rename, pause the table (other tables go on) until the
/// operator fixes the target and restarts; a dropped column the target can default is
/// followed.
#[tokio::test(flavor = "multi_thread")]
async fn ddl_on_a_table_mapped_by_name() {
    let (src, dst) = tokio::join!(cluster("ddl-src"), cluster("ddl-dst"));
    let schema = "CREATE TABLE public.items (id int PRIMARY KEY, name text, qty int);
                  CREATE TABLE public.other (id int PRIMARY KEY, v text);";
    src.create_database("db").await.unwrap();
    src.execute(
        "db",
        &format!("{schema} INSERT INTO public.items SELECT i, 'item' || i, i FROM generate_series(1, 10) i;"),
    )
    .await
    .unwrap();
    dst.create_database("db").await.unwrap();
    dst.execute("db", schema).await.unwrap();
    let (job, mut daemon, s, d) = streaming(&src, &dst, "ddl", "").await;
    let items = "public.items";

    // A new column with a default: added to the target, existing rows get the default.
    s.batch_execute(
        "ALTER TABLE public.items ADD COLUMN color text DEFAULT 'red';
         INSERT INTO public.items VALUES (11, 'item11', 11, 'blue');
         UPDATE public.items SET qty = 100 WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_equal(&s, &d, items, items, Duration::from_secs(30), Some(&daemon)).await;
    let t = wait_table(&daemon, items, "a note about the new column", |t| {
        t["notes"].to_string().contains("was added to public.items")
    })
    .await;
    assert!(t["needs_attention"].is_null(), "{t}");
    let default: Option<String> = d
        .query_one(
            "SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'public.items'::regclass \
             AND adnum = (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.items'::regclass AND attname = 'color')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        default.as_deref(),
        Some("'red'::text"),
        "the source's default is kept"
    );

    // A type change the target column cannot take: paused, the rest goes on.
    s.batch_execute(
        "ALTER TABLE public.items ALTER COLUMN qty TYPE bigint;
         INSERT INTO public.items VALUES (12, 'item12', 5000000000, 'green');
         UPDATE public.items SET name = 'during the pause' WHERE id = 2;
         INSERT INTO public.other VALUES (1, 'goes on');",
    )
    .await
    .unwrap();
    let t = wait_table(&daemon, items, "needs_attention", |t| {
        t["needs_attention"].as_str().is_some()
    })
    .await;
    let why = t["needs_attention"].as_str().unwrap();
    assert!(why.contains("qty") && why.contains("ALTER TABLE"), "{why}");
    wait_equal(
        &s,
        &d,
        "public.other",
        "public.other",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    let (code, ready) = run_json(&["ready", "--api", &job.api()]);
    assert_eq!(code, Some(1), "{ready}");
    assert!(
        ready["unmet"].to_string().contains("paused"),
        "the tables gate names the pause: {ready}"
    );
    // Nothing of items past the pause reached the target; the slot holds its changes.
    let n: i64 = d
        .query_one(
            "SELECT count(*) FROM public.items WHERE id = 12 OR name = 'during the pause'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // Restarted without a fix, the table stays paused and keeps holding its changes,
    // also the new ones; the others go on.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    s.batch_execute(
        "UPDATE public.items SET qty = qty + 1 WHERE id IN (2, 12);
         INSERT INTO public.items VALUES (14, 'item14', 14, 'red');
         INSERT INTO public.other VALUES (3, 'second pause');",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        "public.other",
        "public.other",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    let t = wait_table(&daemon, items, "needs_attention after the restart", |t| {
        t["needs_attention"]
            .as_str()
            .is_some_and(|w| w.contains("qty"))
    })
    .await;
    assert!(t["needs_attention"].is_string(), "{t}");
    let n: i64 = d
        .query_one(
            "SELECT count(*) FROM public.items WHERE id IN (12, 14)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "still held");

    // The operator widens the column and restarts: the held changes apply, once.
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    d.batch_execute("ALTER TABLE public.items ALTER COLUMN qty TYPE bigint")
        .await
        .unwrap();
    s.batch_execute("INSERT INTO public.other VALUES (2, 'while stopped')")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_equal(&s, &d, items, items, Duration::from_secs(30), Some(&daemon)).await;
    wait_equal(
        &s,
        &d,
        "public.other",
        "public.other",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    wait_table(&daemon, items, "the pause lifted", |t| {
        t["needs_attention"].is_null()
    })
    .await;

    // A rename pauses with the statement that fixes it; fixed and restarted, it resumes.
    s.batch_execute(
        "ALTER TABLE public.items RENAME COLUMN name TO title;
         UPDATE public.items SET title = 'retitled' WHERE id = 3;",
    )
    .await
    .unwrap();
    let t = wait_table(&daemon, items, "needs_attention", |t| {
        t["needs_attention"].as_str().is_some()
    })
    .await;
    let why = t["needs_attention"].as_str().unwrap();
    assert!(
        why.contains("renamed to \"title\"") && why.contains("RENAME COLUMN"),
        "{why}"
    );
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    d.batch_execute("ALTER TABLE public.items RENAME COLUMN name TO title")
        .await
        .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_equal(&s, &d, items, items, Duration::from_secs(30), Some(&daemon)).await;

    // A dropped column the target can default: followed, with a note.
    s.batch_execute(
        "ALTER TABLE public.items DROP COLUMN color;
         INSERT INTO public.items VALUES (13, 'item13', 13);",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        "public.items",
        "(SELECT id, title, qty FROM public.items)",
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    let t = wait_table(&daemon, items, "a note about the dropped column", |t| {
        t["notes"].to_string().contains("was dropped")
    })
    .await;
    assert!(t["needs_attention"].is_null(), "{t}");
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// DDL on a table with an explicit mapping: new columns are not carried (said in the
/// status), a type change the expressions still handle is followed, and a column the
/// mapping reads going away pauses the table.
#[tokio::test(flavor = "multi_thread")]
async fn ddl_on_a_table_with_an_explicit_mapping() {
    let (src, dst) = tokio::join!(cluster("ddlx-src"), cluster("ddlx-dst"));
    src.create_database("db").await.unwrap();
    src.execute(
        "db",
        "CREATE TABLE public.prices (id int PRIMARY KEY, amount numeric(10,2), label text);
         INSERT INTO public.prices SELECT i, i * 1.5, 'p' || i FROM generate_series(1, 10) i;",
    )
    .await
    .unwrap();
    dst.create_database("db").await.unwrap();
    dst.execute(
        "db",
        "CREATE TABLE public.prices (id int PRIMARY KEY, cents bigint, label text)",
    )
    .await
    .unwrap();
    let (_job, mut daemon, s, d) = streaming(
        &src,
        &dst,
        "ddlx",
        "[[table]]\nsource = \"public.prices\"\n\n[table.columns]\ncents = \"(amount * 100)::bigint\"\n",
    )
    .await;
    let by_hand = "(SELECT id, (amount * 100)::bigint, label FROM public.prices)";
    let prices = "public.prices";
    wait_equal(
        &s,
        &d,
        by_hand,
        prices,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;

    s.batch_execute(
        "ALTER TABLE public.prices ADD COLUMN currency text DEFAULT 'EUR';
         ALTER TABLE public.prices ALTER COLUMN amount TYPE numeric(12,3);
         INSERT INTO public.prices VALUES (11, 2.125, 'p11', 'USD');
         UPDATE public.prices SET amount = amount + 1 WHERE id = 1;",
    )
    .await
    .unwrap();
    wait_equal(
        &s,
        &d,
        by_hand,
        prices,
        Duration::from_secs(30),
        Some(&daemon),
    )
    .await;
    let t = wait_table(&daemon, prices, "notes", |t| {
        let notes = t["notes"].to_string();
        notes.contains("\\\"currency\\\"") && notes.contains("still holds")
    })
    .await;
    assert!(t["needs_attention"].is_null(), "{t}");

    s.batch_execute(
        "ALTER TABLE public.prices DROP COLUMN amount;
         INSERT INTO public.prices VALUES (12, 'p12', 'EUR');",
    )
    .await
    .unwrap();
    let t = wait_table(&daemon, prices, "needs_attention", |t| {
        t["needs_attention"].as_str().is_some()
    })
    .await;
    let why = t["needs_attention"].as_str().unwrap();
    assert!(
        why.contains("\"amount\"") && why.contains("[table.columns]"),
        "{why}"
    );
    let n: i64 = d
        .query_one("SELECT count(*) FROM public.prices WHERE id = 12", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "nothing past the pause is applied");
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}

/// `kill -9` while mapped tables stream under a writer: the target equals the mapped source
/// exactly (a keyless journal shows any change applied twice as an extra row).
#[tokio::test(flavor = "multi_thread")]
async fn mapped_tables_survive_kill_9() {
    let (src, dst) = tokio::join!(cluster("mapk-src"), cluster("mapk-dst"));
    src.create_database("db").await.unwrap();
    src.execute(
        "db",
        "CREATE TABLE public.accounts (id int PRIMARY KEY, balance numeric(12,2), region text);
         ALTER TABLE public.accounts REPLICA IDENTITY FULL;
         INSERT INTO public.accounts SELECT i, i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END
         FROM generate_series(1, 50) i;
         CREATE TABLE public.journal (op bigint, note text);
         ALTER TABLE public.journal REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    dst.create_database("db").await.unwrap();
    dst.execute(
        "db",
        "CREATE TABLE public.accounts (id int PRIMARY KEY, cents bigint, region text);
         CREATE TABLE public.journal (op bigint, shout text);",
    )
    .await
    .unwrap();
    let (job, mut daemon, s, d) = streaming(
        &src,
        &dst,
        "mapk",
        "[[table]]\nsource = \"public.accounts\"\nwhere = \"region = 'eu'\"\n\n[table.columns]\ncents = \"(balance * 100)::bigint\"\n\n\
         [[table]]\nsource = \"public.journal\"\n\n[table.columns]\nshout = \"upper(note)\"\n",
    )
    .await;
    let writer = Writer::start(
        src.connect("db").await.unwrap(),
        Duration::from_millis(2),
        |op| {
            let id = op % 50 + 1;
            let region = if op.is_multiple_of(3) { "us" } else { "eu" };
            format!(
                "BEGIN; UPDATE accounts SET balance = balance + 0.01, region = '{region}' WHERE id = {id}; \
                 INSERT INTO journal VALUES ({op}, 'op {op}'); COMMIT;"
            )
        },
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        daemon.kill9();
        tokio::time::sleep(Duration::from_millis(200)).await;
        daemon = Daemon::start(&job);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    writer.stop().await;
    wait_equal(
        &s,
        &d,
        "(SELECT id, (balance * 100)::bigint, region FROM public.accounts WHERE region = 'eu')",
        "public.accounts",
        Duration::from_secs(60),
        Some(&daemon),
    )
    .await;
    wait_equal(
        &s,
        &d,
        "(SELECT op, upper(note) FROM public.journal)",
        "public.journal",
        Duration::from_secs(60),
        Some(&daemon),
    )
    .await;
    let n: i64 = d
        .query_one("SELECT count(*) FROM public.journal", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 100, "the writer wrote while the daemon was killed: {n}");
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}
