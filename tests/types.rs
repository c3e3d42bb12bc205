//! A type round-trip: values that trip CDC tools (hard cases 21-26) survive the snapshot
//! and the stream unchanged, compared as text under pinned settings.

mod support;

use std::time::Duration;

use support::*;

const SCHEMA: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE public.types (
    id int PRIMARY KEY,
    n numeric, f8 float8, f4 float4,
    ts timestamp, tstz timestamptz, d date, t time, ttz timetz, iv interval,
    arr int[], tarr text[],
    j json, jb jsonb, b bytea,
    m mood, p posint,
    r int4range, tr tstzrange,
    ip inet, cidr_ cidr, mac macaddr, u uuid, money_ money,
    vb bit varying(16), bits bit(4),
    tsv tsvector, pt point, x xml, bo boolean, c char(3), vc varchar(10), "select" text,
    -- Blank-padded, with and without a length: `char(n)` pads what it is given to its
    -- length, unbounded `bpchar` keeps the blanks it was given.
    bp bpchar
);
-- The same without array columns (and with two dropped ones): the stream sends its rows
-- to the target as one array per column (`unnest`), where `types` takes VALUES.
CREATE TABLE public.scalars (LIKE public.types INCLUDING ALL);
ALTER TABLE public.scalars DROP COLUMN arr, DROP COLUMN tarr;
"#;

/// `scalars`' columns, in order.
const SCALAR_COLUMNS: &str = "n, f8, f4, ts, tstz, d, t, ttz, iv, j, jb, b, m, p, r, tr, ip, cidr_, mac, u, money_, vb, bits, tsv, pt, x, bo, c, vc, \"select\", bp";

const ROWS: &str = r#"
INSERT INTO types VALUES
 (1, 'NaN', 'NaN', '-Infinity', 'infinity', '-infinity', '4713-01-01 BC', '24:00:00', '23:59:59.999999+14', '-178000000 years',
  '[0:2]={1,NULL,3}', '{"a,b","c\"d",NULL,""}', '{"a": 1, "a": 2}', '{"b": [1, {"c": null}], "a": 1}', '\x00ff',
  'happy', 7, '[1,10)', '["2020-01-01 00:00:00+00",infinity)', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '-12.34', B'101', B'1010', 'a fat:1 cat:2', '(1.5,-0)', '<a>x</a>', true, 'ab', 'ten chars!', 'reserved word', 'ab  '),
 (2, 'Infinity', '-0', 'Infinity', '294276-12-31 23:59:59.999999', '2000-02-29 12:00:00.123456+05:30', '5874897-12-31', '00:00:00', '00:00:00-15:59', '1 mon 2 days -03:04:05.000006',
  '{}', '{}', '[]', '{}', '\x', 'sad', 1, 'empty', 'empty', '::1', '::/0', '00:00:00:00:00:00',
  '00000000-0000-0000-0000-000000000000', '0', B'', B'0000', '', '(0,0)', '<a/>', false, '', '', '', '   '),
 (3, '-Infinity', '1e308', '1.17549435e-38', NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, 'null', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 'NULL', NULL),
 (4, '0.000000000000000000000000000001', '2.2250738585072014e-308', '-0', '2024-02-29 00:00:00', '1999-12-31 23:59:59+00', '2024-01-01', '12:34:56.789', '12:34:56+00', '0',
  '{{1,2},{3,4}}', '{"\\backslash","new\nline","tab\t"}', '"just a string"', '"\u00e9"', '\x5c27', 'ok', 2147483647, '(,)', '(,"2030-01-01 00:00:00+00"]', '2001:db8::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff',
  'ffffffff-ffff-ffff-ffff-ffffffffffff', '92233720368547758.07', B'1111111111111111', B'1111', '''quoted'' lexeme', '(-1e-300,1e300)', '<?xml version="1.0"?><r/>', NULL, 'x  ', 'x', E'multi\nline ''text'' "q" \\ end', ' x ');
"#;

#[tokio::test(flavor = "multi_thread")]
async fn values_survive_snapshot_and_stream() {
    round_trip(false).await;
}

/// The same with a target user that may set `session_replication_role`: the stream's
/// changes are folded per key and sent set-based (see `pg_apply::net`).
#[tokio::test(flavor = "multi_thread")]
async fn values_survive_snapshot_and_stream_as_net_changes() {
    round_trip(true).await;
}

async fn round_trip(net: bool) {
    let (src, dst) = tokio::join!(
        cluster(if net { "types-net-src" } else { "types-src" }),
        cluster(if net { "types-net-dst" } else { "types-dst" })
    );
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    src.execute("db", SCHEMA).await.unwrap();
    // The target is written by an ordinary role that owns the tables but may not set
    // session_replication_role: the apply then keeps the source's statement order
    // (no net changes), which this test covers.
    dst.execute(
        "db",
        &format!(
            "CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE db TO app; GRANT CREATE ON SCHEMA public TO app; SET ROLE app; {SCHEMA}"
        ),
    )
    .await
    .unwrap();
    src.execute("db", ROWS).await.unwrap();
    src.execute(
        "db",
        &format!("INSERT INTO scalars SELECT id, {SCALAR_COLUMNS} FROM types"),
    )
    .await
    .unwrap();
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let target_url = if net {
        dst.url("db")
    } else {
        dst.url("db").replace("postgres@", "app@")
    };
    let job = Job::write("types", &src.url("db"), &target_url, "");
    // Which columns may travel as array elements: all but the arrays (unnest would flatten
    // them).
    let info = cutover_connectors::catalog::table_info(
        &d,
        &cutover_connectors::TableName::new("public", "types"),
    )
    .await
    .unwrap()
    .unwrap();
    let as_elements: Vec<&str> = info
        .columns
        .iter()
        .filter(|c| !c.array_element)
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(as_elements, ["arr", "tarr"]);
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    for table in ["public.types", "public.scalars"] {
        wait_equal(&s, &d, table, table, Duration::from_secs(30), Some(&daemon)).await;
    }

    // The same values through the stream: re-insert them under new keys, then update and
    // delete by them.
    s.batch_execute(
        "INSERT INTO types SELECT id + 100, n, f8, f4, ts, tstz, d, t, ttz, iv, arr, tarr, j, jb, b, m, p, r, tr, ip, cidr_, mac, u, money_, vb, bits, tsv, pt, x, bo, c, vc, \"select\", bp FROM types;
         UPDATE types SET n = 'NaN', f8 = '-0', arr = '[5:5]={9}' WHERE id = 104;
         DELETE FROM types WHERE id = 103;",
    )
    .await
    .unwrap();
    // In one transaction, so that net changes fold: rows inserted then updated, updated
    // twice, updated then deleted, and text that needs escaping at both levels.
    s.batch_execute(&format!(
        "BEGIN;
         INSERT INTO scalars SELECT id + 100, {SCALAR_COLUMNS} FROM scalars;
         UPDATE scalars SET n = 'NaN', f8 = '-0' WHERE id = 101;
         UPDATE scalars SET \"select\" = coalesce(\"select\", '') || E' \\\\\"{{x}}'' NULL' WHERE id <> 104;
         UPDATE scalars SET vc = NULL, tsv = $$'it''s' \"q\"$$ WHERE id IN (1, 4, 101);
         UPDATE scalars SET c = '  ', bp = 'q  ' WHERE id IN (2, 102);
         DELETE FROM scalars WHERE id IN (3, 103);
         COMMIT;"
    ))
    .await
    .unwrap();
    for table in ["public.types", "public.scalars"] {
        wait_equal(&s, &d, table, table, Duration::from_secs(30), Some(&daemon)).await;
    }
    let escaped: String = d
        .query_one("SELECT \"select\" FROM scalars WHERE id = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(escaped, r#" \"{x}' NULL"#);
    // -0 stays -0 (its text differs from 0) and NaN stays NaN.
    let f8: String = d
        .query_one("SELECT f8::text FROM types WHERE id = 104", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(f8, "-0");
    // Blanks arrive: `char(3)` holds three (padding), `bpchar` the ones it was given
    // (`::text` would strip them; the row comparison above sees them too).
    let octets: Vec<(i32, i32, i32)> = d
        .query(
            "SELECT id, octet_length(c), octet_length(bp) FROM scalars WHERE id IN (2, 4, 102, 104) ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(octets, [(2, 3, 3), (4, 3, 3), (102, 3, 3), (104, 3, 3)]);
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
}
