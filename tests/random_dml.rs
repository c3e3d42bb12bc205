//! Random DML against the source while the job streams, then an independent comparison.
//! Seeded (CUTOVER_TEST_SEED to replay), with every kind of change the apply folds or
//! orders: inserts, updates of keys and of TOASTed rows, deletes, re-inserts of deleted
//! keys, rolled-back savepoints, whole rolled-back transactions and TRUNCATE.

mod support;

use std::time::Duration;

use support::*;

const SCHEMA: &str = r#"
CREATE TABLE public.kv (k int PRIMARY KEY, v text, n bigint, blob text);
ALTER TABLE public.kv ALTER COLUMN blob SET STORAGE EXTERNAL;
CREATE TABLE public.pair (a int, b text, x numeric, PRIMARY KEY (a, b));
CREATE TABLE public.bag (v int, w text);
ALTER TABLE public.bag REPLICA IDENTITY FULL;
"#;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn statement(rng: &mut Rng) -> String {
    let k = rng.below(200);
    match rng.below(14) {
        0..=2 => format!(
            "INSERT INTO kv VALUES ({k}, 'v{}', {}, NULL) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, n = kv.n + 1",
            rng.below(1000),
            rng.below(100)
        ),
        3 => format!(
            "UPDATE kv SET blob = repeat(md5('{}'), 300) WHERE k = {k}",
            rng.below(1000)
        ),
        4 => format!("UPDATE kv SET n = n + 1 WHERE k % 7 = {}", rng.below(7)),
        5 => format!("UPDATE kv SET k = k + 1000 WHERE k = {k}"),
        6 => format!("DELETE FROM kv WHERE k = {k} OR k = {}", k + 1000),
        7 => format!(
            "INSERT INTO pair VALUES ({k}, 'b{}', {}.5) ON CONFLICT DO NOTHING",
            rng.below(3),
            rng.below(50)
        ),
        8 => format!("UPDATE pair SET b = b || 'x' WHERE a = {k}"),
        9 => format!("DELETE FROM pair WHERE a = {k}"),
        10 => format!(
            "INSERT INTO bag VALUES ({}, 'w{}')",
            rng.below(5),
            rng.below(3)
        ),
        11 => format!(
            "UPDATE bag SET w = 'u{}' WHERE ctid = (SELECT ctid FROM bag WHERE v = {} LIMIT 1)",
            rng.below(3),
            rng.below(5)
        ),
        12 => format!(
            "DELETE FROM bag WHERE ctid = (SELECT ctid FROM bag WHERE v = {} LIMIT 1)",
            rng.below(5)
        ),
        _ => format!("UPDATE kv SET v = NULL WHERE k = {k}"),
    }
}

/// With a superuser on the target: net changes per key.
#[tokio::test(flavor = "multi_thread")]
async fn random_transactions_converge_with_net_changes() {
    random_transactions_converge(false).await;
}

/// With an ordinary role on the target: the source's statement order.
#[tokio::test(flavor = "multi_thread")]
async fn random_transactions_converge_in_source_order() {
    random_transactions_converge(true).await;
}

async fn random_transactions_converge(ordinary_role: bool) {
    let seed: u64 = std::env::var("CUTOVER_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    println!("CUTOVER_TEST_SEED={seed}");
    let mut rng = Rng((seed ^ u64::from(ordinary_role)).max(1));
    let (src, dst) = tokio::join!(cluster("rand-src"), cluster("rand-dst"));
    src.create_database("db").await.unwrap();
    src.execute("db", SCHEMA).await.unwrap();
    dst.create_database("db").await.unwrap();
    let mut target_url = dst.url("db");
    if ordinary_role {
        dst.execute(
            "db",
            &format!("CREATE ROLE app LOGIN; GRANT CREATE ON DATABASE db TO app; GRANT CREATE ON SCHEMA public TO app; SET ROLE app; {SCHEMA}"),
        )
        .await
        .unwrap();
        target_url = target_url.replace("postgres@", "app@");
    } else {
        dst.execute("db", SCHEMA).await.unwrap();
    }
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    // Some rows before the snapshot.
    for _ in 0..100 {
        s.batch_execute(&statement(&mut rng)).await.unwrap();
    }
    let job = Job::write("random", &src.url("db"), &target_url, "");
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    for txn in 0..400 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..1 + rng.below(12) {
            if rng.below(10) == 0 {
                sql.push_str(&format!(
                    "SAVEPOINT s; {}; ROLLBACK TO s;",
                    statement(&mut rng)
                ));
            } else {
                sql.push_str(&statement(&mut rng));
                sql.push(';');
            }
        }
        if txn % 97 == 96 {
            sql.push_str("TRUNCATE bag;");
        }
        sql.push_str(if rng.below(15) == 0 {
            "ROLLBACK;"
        } else {
            "COMMIT;"
        });
        // Unique violations from random keys roll the transaction back; that is fine.
        if s.batch_execute(&sql).await.is_err() {
            s.batch_execute("ROLLBACK").await.ok();
        }
    }
    for t in ["public.kv", "public.pair", "public.bag"] {
        wait_equal(&s, &d, t, t, Duration::from_secs(60), Some(&daemon)).await;
    }
    assert_eq!(
        daemon.terminate(Duration::from_secs(20)),
        Some(0),
        "seed {seed}"
    );
}
