//! Groups overlapping on two target sessions: while one group runs on one session, the
//! next group's changes that the running one does not touch go ahead on the other, in its
//! open transaction; the rest and its COMMIT follow once the running group has committed.
//! Every source transaction here also bumps one hot row (`gate`, like pgbench's
//! branches), so each group's update of it waits for the group before: it runs after the
//! early part. A slow CHECK on that row, or a row lock on it, then holds a group on the
//! target while the next group's early part is open beside it; the tests fail that group,
//! kill the daemon, or make it wait for a lock, and compare the tables by SQL.

mod support;

use std::time::Duration;

use cutover::cluster::Cluster;
use support::*;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Groups overlap on two target sessions (not the default).
const TWO_SESSIONS: &str = "apply_sessions = 2";

/// No verification passes: the anchor of one commits the open group at once (waiting for
/// the group in flight), which would keep the next group from going ahead at the moment
/// these tests look.
const NO_VERIFIER: &str = "[verify]\nevery = \"0\"\n";

/// `seq` has a key (net changes), `log` has no key or unique index (rows appended; the
/// source sends its updates and deletes whole, which these tests do not make), and
/// `gate` is one row that every transaction changes.
const SCHEMA: &str = "
CREATE TABLE public.seq (id bigint PRIMARY KEY, u bigint NOT NULL);
CREATE TABLE public.log (id bigint NOT NULL, note text);
ALTER TABLE public.log REPLICA IDENTITY FULL;
CREATE TABLE public.gate (id int PRIMARY KEY, n bigint NOT NULL);
";

/// A CHECK on the target's `gate`, run by `body` (a PL/pgSQL block over `n`).
fn gate_check(body: &str) -> String {
    format!(
        "CREATE SEQUENCE public.once;
         CREATE FUNCTION public.gate_ok(n bigint) RETURNS boolean LANGUAGE plpgsql AS $$
         BEGIN {body} RETURN true; END $$;
         ALTER TABLE public.gate ADD CONSTRAINT slow CHECK (public.gate_ok(n));"
    )
}

/// A job with `sessions` (its `[target]` keys) that has made its snapshot and stopped, and
/// a session on each side, the source's with `synchronous_commit = off` (for the backlog
/// to come).
async fn snapshot_and_stop(
    src: &Cluster,
    dst: &Cluster,
    name: &str,
    sessions: &str,
) -> (tokio_postgres::Client, tokio_postgres::Client, Job) {
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    let job = Job::write_with_target(name, &src.url("db"), &dst.url("db"), sessions, NO_VERIFIER);
    let mut daemon = Daemon::start(&job);
    daemon.wait_phase("streaming", TIMEOUT).await;
    assert_eq!(daemon.terminate(TIMEOUT), Some(0), "{}", daemon.output());
    s.batch_execute("SET synchronous_commit = off")
        .await
        .unwrap();
    (s, d, job)
}

/// Two clusters with the schema (and `target_extra` on the target), a job with `sessions`
/// (its `[target]` keys) that has made its snapshot and stopped, and a backlog of `n` source
/// transactions behind it, each inserting row `i` into `seq` and `log` and setting `gate`
/// to `i`.
async fn backlog(
    name: &str,
    sessions: &str,
    target_extra: &str,
    n: u32,
) -> (
    Cluster,
    Cluster,
    tokio_postgres::Client,
    tokio_postgres::Client,
    Job,
) {
    let (src, dst) = tokio::join!(cluster("pipe-src"), cluster("pipe-dst"));
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    let gate = "INSERT INTO public.gate VALUES (1, 0);";
    src.execute("db", &format!("{SCHEMA}{gate}")).await.unwrap();
    dst.execute("db", &format!("{SCHEMA}{target_extra}"))
        .await
        .unwrap();
    let (s, d, job) = snapshot_and_stop(&src, &dst, name, sessions).await;
    // (The DO block alone in its query: COMMIT is refused in a multi-statement one.)
    s.batch_execute(&format!(
        "DO $$ BEGIN
           FOR i IN 1..{n} LOOP
             INSERT INTO public.seq VALUES (i, i);
             INSERT INTO public.log VALUES (i, 'op ' || i);
             UPDATE public.gate SET n = i WHERE id = 1;
             COMMIT;
           END LOOP;
         END $$;"
    ))
    .await
    .unwrap();
    (src, dst, s, d, job)
}

/// Wait until one session of the job on the target runs a statement (`active`) while
/// another is idle in its open transaction: a group running beside the next group's early
/// part.
async fn wait_for_overlap(d: &tokio_postgres::Client, job: &Job, daemon: &mut Daemon) {
    assert!(
        overlap_seen(d, job, daemon).await,
        "the daemon stopped before a group ran beside the next one's early part:\n{}",
        daemon.output()
    );
}

/// [`wait_for_overlap`], answering false if the daemon stops first.
async fn overlap_seen(d: &tokio_postgres::Client, job: &Job, daemon: &mut Daemon) -> bool {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let states = strings(
            d,
            &format!(
                "SELECT coalesce(state, '') FROM pg_stat_activity \
                 WHERE application_name LIKE 'cutover/{}/%' ORDER BY state",
                job.name
            ),
        )
        .await;
        if states.iter().any(|s| s == "active") && states.iter().any(|s| s == "idle in transaction")
        {
            return true;
        }
        if !daemon.running() {
            return false;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no group ran beside the next one's early part (sessions: {states:?}):\n{}",
            daemon.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The ids in a target table, as (count, max).
async fn count_max(d: &tokio_postgres::Client, table: &str) -> (i64, i64) {
    let row = d
        .query_one(
            &format!("SELECT count(*), coalesce(max(id), 0) FROM {table}"),
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn assert_equal(s: &tokio_postgres::Client, d: &tokio_postgres::Client, daemon: &Daemon) {
    for table in ["public.seq", "public.log", "public.gate"] {
        wait_equal(s, d, table, table, TIMEOUT, Some(daemon)).await;
    }
}

/// The first group that takes `gate` to 8000 or more fails: its CHECK refuses the row,
/// after a sleep during which the next group's early part is open on the other session.
/// Nothing of the next group may reach the target, and every row before the failed group
/// must.
///
/// The failing group may also be the one a pause in the stream commits (it then waits for
/// the answer, so nothing goes ahead beside it): the target must hold the same prefix, and
/// the scenario runs again, up to three times, for the overlap this test is about.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_group_takes_the_next_groups_early_part_with_it() {
    let check = gate_check("IF n >= 8000 THEN PERFORM pg_sleep(2); RETURN false; END IF;");
    for attempt in 1..=3 {
        let name = format!("pipe-fail{attempt}");
        let (_src, _dst, _s, d, job) = backlog(&name, TWO_SESSIONS, &check, 20000).await;
        let mut daemon = Daemon::start(&job);
        let overlapped = overlap_seen(&d, &job, &mut daemon).await;
        let output = daemon.wait_exit(TIMEOUT, "on the failed group").await;
        assert!(
            output.contains("violates check constraint") && output.contains("up to commit LSN"),
            "the error should say why and name the transactions:\n{output}"
        );
        assert_prefix_before_8000(&d, &output).await;
        if overlapped {
            assert!(
                output.contains("groups overlap"),
                "no group went ahead:\n{output}"
            );
            return;
        }
    }
    panic!("in three runs the failing group never ran beside the next one's early part");
}

/// The target holds the rows of every group before the one that took `gate` to 8000 or
/// more, and nothing after.
async fn assert_prefix_before_8000(d: &tokio_postgres::Client, output: &str) {
    let n: i64 = d
        .query_one("SELECT n FROM public.gate", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n < 8000, "gate is {n}");
    for table in ["public.seq", "public.log"] {
        let (count, max) = count_max(d, table).await;
        assert!(
            max < 8000,
            "{table}: rows after the failed group reached the target (max id {max}):\n{output}"
        );
        assert_eq!(
            count, max,
            "{table}: the target lost rows before the failed group"
        );
        assert!(max > 0, "{table}: no group before the failed one committed");
    }
}

/// `kill -9` while a group runs (a CHECK that sleeps once) beside the next group's early
/// part. The running group still commits on the server; the early part's transaction dies
/// with its session. The next run waits for both, then resumes: nothing lost, nothing
/// twice (`log` has no key, so a row applied twice would show).
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_beside_an_early_part_loses_and_duplicates_nothing() {
    let check = gate_check(
        "IF n >= 8000 THEN
           IF nextval('public.once') = 1 THEN PERFORM pg_sleep(3); END IF;
         END IF;",
    );
    let (_src, _dst, s, d, job) = backlog("pipe-kill", TWO_SESSIONS, &check, 20000).await;
    let mut daemon = Daemon::start(&job);
    wait_for_overlap(&d, &job, &mut daemon).await;
    daemon.kill9();
    let mut daemon = Daemon::start(&job);
    assert_equal(&s, &d, &daemon).await;
    assert_eq!(count_max(&d, "public.log").await, (20000, 20000));
    daemon.terminate(TIMEOUT);
}

/// Once groups overlap, another target session locks `gate`: the next group waits for it.
/// The early part of the group after is done meanwhile and holds its own locks, which
/// that session might (in general) wait for in turn: it is rolled back, and sent again
/// once the waiting group has committed.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_waiting_for_a_lock_has_the_early_part_sent_again_after_it() {
    let (_src, dst, s, d, job) = backlog("pipe-lock", TWO_SESSIONS, "", 60000).await;
    let holder = dst.connect("db").await.unwrap();
    let mut daemon = Daemon::start(&job);
    daemon.wait_log("groups overlap", TIMEOUT).await;
    holder
        .batch_execute("BEGIN; SELECT n FROM public.gate WHERE id = 1 FOR UPDATE;")
        .await
        .unwrap();
    let (_, locked_at) = count_max(&holder, "public.seq").await;
    assert!(locked_at < 60000, "the backlog was applied before the lock");
    daemon.wait_log("early part is rolled back", TIMEOUT).await;
    // Nothing after the waiting group committed meanwhile (`gate` is in every group).
    let (_, max) = count_max(&d, "public.seq").await;
    assert_eq!(max, locked_at, "rows past the waiting group committed");
    holder.batch_execute("COMMIT").await.unwrap();
    assert_equal(&s, &d, &daemon).await;
    assert_eq!(count_max(&d, "public.log").await, (60000, 60000));
    let (_, metrics) = daemon.get("/metrics").await.unwrap();
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(
        counter("cutover_apply_pipeline_restarts_total") >= 1.0
            && counter("cutover_apply_pipelined_groups_total") >= 1.0,
        "{metrics}"
    );
    daemon.terminate(TIMEOUT);
}

/// The source sends a table's Relation message again after any change to its catalog row
/// (here `ALTER TABLE ... SET (fillfactor)`, in real life also autovacuum's ANALYZE): the
/// apply then writes the table's queued changes out before the rest. Those earlier changes
/// must not be overtaken by later ones of the same keys going ahead: each key here is set
/// twice, 1000 transactions apart, so that every group holds both changes of keys the
/// group before never touched, and some groups a Relation message between them (the
/// others go ahead).
#[tokio::test(flavor = "multi_thread")]
async fn a_relation_message_mid_group_keeps_each_keys_last_change() {
    let (src, dst) = tokio::join!(cluster("pipe-rel-src"), cluster("pipe-rel-dst"));
    src.create_database("db").await.unwrap();
    dst.create_database("db").await.unwrap();
    let table = "CREATE TABLE public.kv (k bigint PRIMARY KEY, v bigint NOT NULL);";
    src.execute("db", table).await.unwrap();
    // A CHECK that takes a moment for every 25th row keeps each group running on the
    // target while the next is built (so that it goes ahead).
    dst.execute(
        "db",
        &format!(
            "{table}
             CREATE FUNCTION public.slowly(k bigint) RETURNS boolean LANGUAGE plpgsql AS $$
             BEGIN
               IF k % 25 = 0 THEN PERFORM pg_sleep(0.0001); END IF;
               RETURN true;
             END $$;
             ALTER TABLE public.kv ADD CONSTRAINT slowly CHECK (public.slowly(k));"
        ),
    )
    .await
    .unwrap();
    src.execute(
        "db",
        "INSERT INTO public.kv SELECT g, 0 FROM generate_series(1, 30000) g;",
    )
    .await
    .unwrap();
    let (s, d, job) = snapshot_and_stop(&src, &dst, "pipe-rel", TWO_SESSIONS).await;
    s.batch_execute(
        "DO $$ BEGIN
           FOR i IN 1..30000 LOOP
             UPDATE public.kv SET v = i WHERE k = i OR k = i - 1000;
             IF i % 14000 = 7000 THEN
               EXECUTE format('ALTER TABLE public.kv SET (fillfactor = %s)', 90 + i % 7);
             END IF;
             COMMIT;
           END LOOP;
         END $$;",
    )
    .await
    .unwrap();
    let mut daemon = Daemon::start(&job);
    wait_equal(&s, &d, "public.kv", "public.kv", TIMEOUT, Some(&daemon)).await;
    assert!(
        daemon.output().contains("groups overlap"),
        "no group went ahead:\n{}",
        daemon.output()
    );
    daemon.terminate(TIMEOUT);
}

/// The source transactions of each group the daemon committed, in order (its debug log).
fn committed_groups(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter(|l| l.contains("committed a group"))
        .filter_map(|l| {
            let n = l.split("transactions=").nth(1)?;
            n.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// One target session (the default): the target has nothing to do when the catch-up
/// begins, so the first group goes as soon as it holds 1000 source transactions instead of
/// filling up to 5000. Once a group is in flight (each one's update of `gate` sleeps on the
/// target here), the next fills up as before: small groups cost the target more.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_target_gets_the_first_thousand_transactions_at_once() {
    let check = gate_check("PERFORM pg_sleep(0.3);");
    let (_src, _dst, s, d, job) = backlog("pipe-eager", "", &check, 12000).await;
    let mut daemon = Daemon::start(&job);
    assert_equal(&s, &d, &daemon).await;
    // (Stopped first: every group's answer is then read and logged.)
    assert_eq!(daemon.terminate(TIMEOUT), Some(0), "{}", daemon.output());
    let output = daemon.output();
    let groups = committed_groups(&output);
    assert_eq!(
        groups.iter().sum::<u64>(),
        12000,
        "every transaction is in one committed group: {groups:?}\n{output}"
    );
    assert!(
        groups[0] <= 1000,
        "the first group waited for more than 1000 transactions: {groups:?}"
    );
    assert!(
        groups.iter().any(|&n| n > 1000),
        "groups built while one was in flight did not fill up: {groups:?}"
    );
}
