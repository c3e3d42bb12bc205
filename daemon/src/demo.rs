//! `cutover demo`: a whole cutover of a small shop, on two throwaway PostgreSQL clusters.
//!
//! What a newcomer runs first, so it uses nothing but the pieces `cutover run` uses: two
//! [`Cluster`]s (source and target), the job runner ([`job::run`]) in-process with a job
//! spec parsed from TOML text, the status document and the readiness gates. A writer task
//! keeps changing the source during the copy and the stream, and at the end every table is
//! compared with an independent SQL query on both sides (count and md5 of the sorted rows).
//!
//! Exit codes: 0 when every table is equal, 1 when one differs (or the target never became
//! ready), 2 when the demo could not run (or was interrupted with Ctrl-C). The clusters are
//! removed in every case, Ctrl-C included, unless `--keep` asks to keep them (then until
//! Ctrl-C).

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use cutover_config::JobSpec;
use cutover_connectors::Lsn;
use futures_util::future::try_join_all;
use indicatif::{HumanBytes, HumanCount, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, ApiState};
use crate::cli::{DemoArgs, Outcome};
use crate::cluster::{Cluster, ClusterOptions};
use crate::job::{self, JobContext};
use crate::ready::{ReadyConfig, evaluate, format_seconds};
use crate::status::{JobStatus, Phase, StatusHandle};

/// The database on both clusters.
const DB: &str = "shop";
/// The demo job's name (slot and publication `cutover_demo`).
const JOB_NAME: &str = "demo";
/// How many products the shop sells.
const PRODUCTS: u64 = 1000;
/// Every this many products has a ~20 KB description (stored out of line, TOASTed).
const LONG_DESCRIPTION_EVERY: u64 = 100;
/// Transactions per second the writer aims for.
const WRITER_TPS: u64 = 200;
/// The readiness limit on lag.
const MAX_LAG: Duration = Duration::from_secs(5);
/// How long the stream is shown once the target is ready, before the writer stops.
const SHOW_STREAMING: Duration = Duration::from_secs(3);
/// How long the target may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the target may take to catch up once the writer has stopped.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the job may take to stop.
const STOP_TIMEOUT: Duration = Duration::from_secs(40);
/// How often the live line is refreshed.
const TICK: Duration = Duration::from_millis(100);
/// How often a plain progress line is printed when stdout is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// The steps, for the `[n/7]` prefix.
const STEPS: usize = 7;

/// The tables of the shop: source name, target name.
const TABLES: [(&str, &str); 4] = [
    ("public.customers", "public.customers"),
    ("public.products", "public.products"),
    ("public.orders", "sales.orders_v2"),
    ("public.order_items", "public.order_items"),
];

/// `cutover demo`.
pub async fn run(args: &DemoArgs) -> anyhow::Result<Outcome> {
    let ui = Ui::new();
    let mut body = Box::pin(demo(args, &ui));
    let finished = tokio::select! {
        result = &mut body => result,
        _ = tokio::signal::ctrl_c() => {
            ui.clear();
            ui.line("interrupted; removing the demo clusters");
            // Dropping the demo stops its tasks and removes both clusters.
            drop(body);
            return Ok(Outcome::Unanswered);
        }
    };
    drop(body);
    let finished = finished?;
    if let Some(kept) = finished.kept {
        kept.wait_for_ctrl_c(&ui).await;
    }
    Ok(finished.outcome)
}

/// How the demo ended, with what `--keep` keeps alive.
struct Finished {
    outcome: Outcome,
    kept: Option<Kept>,
}

/// Everything that stays up with `--keep`: the clusters, the job and its API.
struct Kept {
    clusters: Clusters,
    job: Job,
    _api: Task<std::io::Result<()>>,
    _data_dir: tempfile::TempDir,
}

impl Kept {
    async fn wait_for_ctrl_c(self, ui: &Ui) {
        let _ = tokio::signal::ctrl_c().await;
        ui.line("Ctrl-C: stopping the job and removing the demo clusters");
        if let Err(e) = self.job.stop().await {
            ui.line(&format!("the job did not stop cleanly: {e:#}"));
        }
        self.clusters.remove().await;
        ui.line("removed the demo clusters");
    }
}

async fn demo(args: &DemoArgs, ui: &Ui) -> anyhow::Result<Finished> {
    let started = Instant::now();
    let orders = args.rows.max(1);
    ui.line(&format!(
        "cutover demo: a live cutover of a small shop ({} orders) between two throwaway \
         PostgreSQL clusters",
        HumanCount(orders)
    ));

    // 1. Clusters.
    ui.step(1, "starting two PostgreSQL clusters (source and target)");
    let t = Instant::now();
    let clusters = Clusters::start().await?;
    ui.detail(&format!("source  {}", clusters.source.url(DB)));
    ui.detail(&format!("target  {}", clusters.target.url(DB)));
    ui.detail(&format!("up in {}", secs(t.elapsed())));

    // 2. Dataset.
    ui.step(2, "loading the shop into the source");
    let t = Instant::now();
    let counts = load_dataset(&clusters, orders).await?;
    ui.detail(&format!(
        "customers {} · products {} ({} with ~20 KB descriptions, TOASTed) · orders {} · \
         order_items {}",
        HumanCount(counts.customers),
        HumanCount(counts.products),
        PRODUCTS / LONG_DESCRIPTION_EVERY,
        HumanCount(counts.orders),
        HumanCount(counts.order_items),
    ));
    ui.detail(&format!(
        "target: the same tables, empty, with public.orders renamed to sales.orders_v2 \
         (loaded in {})",
        secs(t.elapsed())
    ));

    // 3. The job, its API and the writer.
    ui.step(
        3,
        &format!(
            "starting job \"{JOB_NAME}\" and a writer that keeps changing the source \
             (~{WRITER_TPS} transactions/s)"
        ),
    );
    let data_dir = tempfile::Builder::new()
        .prefix("cutover-demo-")
        .tempdir()
        .context("create a temporary directory for the demo job")?;
    let spec = demo_spec(&clusters, data_dir.path())?;
    let source = spec.source.conn.resolve().map_err(|e| anyhow!("{e}"))?;
    let target = spec.target.conn.resolve().map_err(|e| anyhow!("{e}"))?;
    let status = StatusHandle::new(JobStatus::new(&spec.name));
    let ready_config = ReadyConfig {
        max_lag: MAX_LAG,
        max_verify_age: spec.ready.max_verify_age,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (barrier_tx, barrier_rx) = tokio::sync::mpsc::channel(4);
    let ctx = JobContext {
        spec: Arc::new(spec),
        source,
        target,
        status: status.clone(),
        shutdown: stop_rx,
        barriers: Arc::new(tokio::sync::Mutex::new(barrier_rx)),
    };
    // Passes anchored at a source LSN, while the writer writes: the `verified` gate.
    let verifier = crate::verifier::spawn(ctx.clone(), barrier_tx);
    let api = start_api(&status, &ready_config, verifier).await;
    let writer = Writer::start(&clusters.source, orders).await?;
    let mut job = Job {
        stop: stop_tx,
        task: Task(tokio::spawn(job::run(ctx))),
    };
    let job_started = Instant::now();
    match &api {
        Some((addr, _)) => ui.detail(&format!(
            "HTTP API on http://{addr}  (GET /v1/status, /v1/ready, /metrics)"
        )),
        None => ui.detail("HTTP API not served (no local port)"),
    }

    // 4. Snapshot, then streaming.
    ui.step(
        4,
        "copying the snapshot while the writer runs, then streaming the changes",
    );
    let expected_rows = counts.total();
    ui.start_live();
    loop {
        job.check_alive().await?;
        let s = status.snapshot();
        let snapshot_done = !s.tables.is_empty() && s.tables.iter().all(|t| t.snapshot_done);
        if s.phase == Phase::Streaming && snapshot_done {
            break;
        }
        ui.live(&snapshot_line(&s, expected_rows));
        tokio::time::sleep(TICK).await;
    }
    let s = status.snapshot();
    ui.clear();
    let (rows, bytes) = copied(&s);
    ui.detail(&format!(
        "snapshot: {} rows{} copied in {}",
        HumanCount(rows),
        bytes_text(bytes),
        secs(job_started.elapsed())
    ));
    for t in &s.tables {
        ui.detail(&format!(
            "  {:<20} → {:<20} {:>9} rows",
            t.source,
            t.target,
            HumanCount(t.rows_copied).to_string()
        ));
    }

    // 5. Ready.
    ui.start_live();
    let ready_wait = Instant::now();
    let readiness = loop {
        job.check_alive().await?;
        let s = status.snapshot();
        let readiness = evaluate(&s, &ready_config);
        if readiness.ready {
            break Some((s, readiness));
        }
        if ready_wait.elapsed() > READY_TIMEOUT {
            break None;
        }
        ui.live(&streaming_line(&s, &writer));
        tokio::time::sleep(TICK).await;
    };
    ui.clear();
    let Some((s, readiness)) = readiness else {
        let s = status.snapshot();
        let r = evaluate(&s, &ready_config);
        ui.step(
            5,
            &format!(
                "✗ not ready after {}: the target did not catch up",
                secs(READY_TIMEOUT)
            ),
        );
        for gate in &r.unmet {
            ui.detail(&format!("unmet {}: {}", gate.gate, gate.detail));
        }
        drop(writer);
        let _ = job.stop().await;
        clusters.remove().await;
        ui.line(&format!("done in {}: not ready", secs(started.elapsed())));
        return Ok(Finished {
            outcome: Outcome::Negative,
            kept: None,
        });
    };
    ui.step(
        5,
        &format!(
            "ready after {}: gates {} hold; lag {} ({}), limit {}",
            secs(job_started.elapsed()),
            readiness.checked.join(", "),
            format_seconds(s.lag_seconds.unwrap_or(0.0)),
            HumanBytes(s.lag_bytes.unwrap_or(0)),
            format_seconds(MAX_LAG.as_secs_f64()),
        ),
    );
    // Let the stream be seen for a moment.
    ui.start_live();
    let show = Instant::now();
    while show.elapsed() < SHOW_STREAMING {
        job.check_alive().await?;
        let s = status.snapshot();
        ui.live(&streaming_line(&s, &writer));
        tokio::time::sleep(TICK).await;
    }
    ui.clear();
    let s = status.snapshot();
    ui.detail(&format!(
        "streaming: {} transactions ({} rows) applied so far, lag {}",
        HumanCount(s.applied_transactions),
        HumanCount(s.applied_rows),
        lag_text(&s)
    ));

    // 6. Stop the writer, catch up, compare.
    let written = writer.stop().await?;
    let end = current_lsn(&clusters.source).await?;
    ui.step(
        6,
        &format!(
            "writer stopped after {} transactions; waiting for the target to reach {end}",
            HumanCount(written)
        ),
    );
    let catch_up = Instant::now();
    ui.start_live();
    let caught_up = loop {
        job.check_alive().await?;
        let s = status.snapshot();
        let applied: Option<Lsn> = s.applied_lsn.as_deref().and_then(|l| l.parse().ok());
        if applied.is_some_and(|a| a >= end) {
            break true;
        }
        if catch_up.elapsed() > CATCH_UP_TIMEOUT {
            break false;
        }
        ui.live(&format!(
            "catching up: applied {} of {end}",
            s.applied_lsn.as_deref().unwrap_or("-")
        ));
        tokio::time::sleep(TICK).await;
    };
    ui.clear();
    let s = status.snapshot();
    if caught_up {
        ui.detail(&format!(
            "caught up in {}: applied {} ({} transactions applied in all)",
            secs(catch_up.elapsed()),
            s.applied_lsn.as_deref().unwrap_or("-"),
            HumanCount(s.applied_transactions),
        ));
    } else {
        ui.detail(&format!(
            "✗ not caught up after {}: applied {}, source at {end}; comparing anyway",
            secs(CATCH_UP_TIMEOUT),
            s.applied_lsn.as_deref().unwrap_or("-")
        ));
    }
    ui.detail("comparing every table: count(*) and md5 of all rows in order, on both sides");
    let compare = Instant::now();
    let results = compare_tables(&clusters).await?;
    let width = TABLES
        .iter()
        .map(|(s, t)| arrow(s, t).chars().count())
        .max()
        .unwrap_or(0);
    let mut equal = caught_up;
    for r in &results {
        let name = arrow(r.source, r.target);
        if r.equal() {
            ui.detail(&format!(
                "✓ {name:<width$}  {:>9} rows  md5 {}",
                HumanCount(r.source_rows).to_string(),
                &r.source_md5[..r.source_md5.len().min(12)]
            ));
        } else {
            equal = false;
            ui.detail(&format!(
                "✗ {name:<width$}  source {} rows md5 {}, target {} rows md5 {}",
                HumanCount(r.source_rows),
                &r.source_md5[..r.source_md5.len().min(12)],
                HumanCount(r.target_rows),
                &r.target_md5[..r.target_md5.len().min(12)],
            ));
        }
    }
    ui.detail(&format!("compared in {}", secs(compare.elapsed())));
    let outcome = if equal {
        Outcome::Success
    } else {
        Outcome::Negative
    };
    let verdict = if equal {
        format!("all {} tables are equal on source and target", TABLES.len())
    } else if caught_up {
        "the target differs from the source".to_owned()
    } else {
        "the target did not catch up with the source".to_owned()
    };

    // 7. Stop (or keep).
    if args.keep {
        ui.step(
            7,
            "--keep: the clusters stay up and the job keeps streaming until Ctrl-C",
        );
        ui.line(&format!("done in {}: {verdict}", secs(started.elapsed())));
        ui.line("");
        ui.line(&format!("  source  psql '{}'", clusters.source.url(DB)));
        ui.line(&format!("  target  psql '{}'", clusters.target.url(DB)));
        if let Some((addr, _)) = &api {
            ui.line(&format!("  status  curl http://{addr}/v1/status"));
            ui.line(&format!("  ready   curl http://{addr}/v1/ready"));
        }
        ui.line(&format!(
            "  try     psql '{}' -c \"UPDATE orders SET status = 'returned' WHERE id = 1\"",
            clusters.source.url(DB)
        ));
        ui.line(&format!(
            "          psql '{}' -c \"SELECT * FROM sales.orders_v2 WHERE id = 1\"",
            clusters.target.url(DB)
        ));
        ui.line("Press Ctrl-C to stop the job and remove the clusters.");
        return Ok(Finished {
            outcome,
            kept: Some(Kept {
                clusters,
                job,
                _data_dir: data_dir,
                _api: match api {
                    Some((_, task)) => task,
                    None => Task(tokio::spawn(async { Ok(()) })),
                },
            }),
        });
    }
    ui.step(7, "stopping the job and removing the demo clusters");
    let stop = Instant::now();
    let stopped = job.stop().await;
    drop(api);
    clusters.remove().await;
    drop(data_dir);
    match stopped {
        Ok(()) => ui.detail(&format!("stopped and removed in {}", secs(stop.elapsed()))),
        Err(e) => {
            ui.detail(&format!("the job did not stop cleanly: {e:#}"));
        }
    }
    ui.line(&format!("done in {}: {verdict}", secs(started.elapsed())));
    Ok(Finished {
        outcome,
        kept: None,
    })
}

// ----- clusters -----

/// The source and the target cluster; dropping them removes both.
struct Clusters {
    source: Cluster,
    target: Cluster,
}

impl Clusters {
    /// Starts both clusters in parallel and creates the `shop` database on each.
    async fn start() -> anyhow::Result<Clusters> {
        let options = |name: &str| {
            // Throwaway clusters: durability buys nothing here, speed does.
            ClusterOptions::named(name)
                .setting("fsync", "off")
                .setting("full_page_writes", "off")
        };
        let (source, target) = tokio::join!(
            Cluster::start(options("demo-source")),
            Cluster::start(options("demo-target")),
        );
        let (source, target) = (
            source.context("could not start the source cluster")?,
            target.context("could not start the target cluster")?,
        );
        let (a, b) = tokio::join!(source.create_database(DB), target.create_database(DB));
        a.context("create database shop on the source")?;
        b.context("create database shop on the target")?;
        Ok(Clusters { source, target })
    }

    /// Stops both servers and removes their files, off the async threads.
    async fn remove(self) {
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }
}

// ----- dataset -----

struct Counts {
    customers: u64,
    products: u64,
    orders: u64,
    order_items: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.customers + self.products + self.orders + self.order_items
    }
}

/// The shop's tables. `{orders}` is the orders table's qualified name.
fn schema_sql(orders: &str) -> String {
    format!(
        "CREATE TABLE customers (
             id bigint PRIMARY KEY,
             name text NOT NULL,
             email text NOT NULL,
             region text NOT NULL,
             created_at timestamptz NOT NULL
         );
         CREATE TABLE products (
             id bigint PRIMARY KEY,
             sku text NOT NULL,
             title text NOT NULL,
             price numeric(10,2) NOT NULL,
             description text
         );
         CREATE TABLE {orders} (
             id bigint PRIMARY KEY,
             customer_id bigint NOT NULL,
             status text NOT NULL,
             total numeric(12,2) NOT NULL,
             placed_at timestamptz NOT NULL
         );
         CREATE TABLE order_items (
             order_id bigint NOT NULL,
             line int NOT NULL,
             product_id bigint NOT NULL,
             qty int NOT NULL,
             price numeric(10,2) NOT NULL,
             PRIMARY KEY (order_id, line)
         );"
    )
}

/// Creates the tables on both sides and fills the source: `orders` orders with one to
/// three items each (two on average), a customer per ten orders, a thousand products.
async fn load_dataset(clusters: &Clusters, orders: u64) -> anyhow::Result<Counts> {
    let customers = (orders / 10).max(1);
    let load = format!(
        "{schema}
         INSERT INTO customers
             SELECT i, 'Customer ' || i, 'customer' || i || '@example.com',
                    (ARRAY['north', 'south', 'east', 'west', 'central'])[1 + i % 5],
                    timestamptz '2024-01-01 00:00:00+00' + i * interval '7 minutes'
             FROM generate_series(1::bigint, {customers}) AS i;
         INSERT INTO products
             SELECT i, 'SKU-' || lpad(i::text, 6, '0'), 'Product ' || i,
                    round(2 + (i * 7919 % 50000) / 100.0, 2),
                    CASE WHEN i % {LONG_DESCRIPTION_EVERY} = 0
                         THEN (SELECT string_agg(md5(i::text || ':' || j), ' ')
                               FROM generate_series(1, 606) AS j)
                         ELSE 'A fine product, number ' || i || '.'
                    END
             FROM generate_series(1, {PRODUCTS}) AS i;
         INSERT INTO order_items
             SELECT o, l, p.id, 1 + (o + l) % 4, p.price
             FROM generate_series(1::bigint, {orders}) AS o
             CROSS JOIN LATERAL generate_series(1, 1 + o % 3) AS l
             JOIN products AS p ON p.id = 1 + (o * 31 + l * 17) % {PRODUCTS};
         INSERT INTO orders
             SELECT o, 1 + o * 7919 % {customers},
                    (ARRAY['new', 'paid', 'shipped', 'delivered', 'cancelled'])[1 + o % 5],
                    coalesce(t.total, 0),
                    timestamptz '2025-01-01 00:00:00+00' + o * interval '13 seconds'
             FROM generate_series(1::bigint, {orders}) AS o
             LEFT JOIN (SELECT order_id, sum(qty * price) AS total
                        FROM order_items GROUP BY order_id) AS t ON t.order_id = o;",
        schema = schema_sql("orders"),
    );
    let target_schema = format!("CREATE SCHEMA sales; {}", schema_sql("sales.orders_v2"));
    let (a, b) = tokio::join!(
        clusters.source.execute(DB, &load),
        clusters.target.execute(DB, &target_schema),
    );
    a.context("load the shop into the source")?;
    b.context("create the shop's tables on the target")?;
    let client = clusters.source.connect(DB).await?;
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM customers), (SELECT count(*) FROM products),
                    (SELECT count(*) FROM orders), (SELECT count(*) FROM order_items)",
            &[],
        )
        .await
        .context("count the shop's rows")?;
    let n = |i: usize| row.get::<_, i64>(i).max(0) as u64;
    Ok(Counts {
        customers: n(0),
        products: n(1),
        orders: n(2),
        order_items: n(3),
    })
}

/// The demo job: all four tables, public.orders into sales.orders_v2.
fn demo_spec(clusters: &Clusters, data_dir: &std::path::Path) -> anyhow::Result<JobSpec> {
    let parallelism = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 4);
    let mut text = format!(
        "name = \"{JOB_NAME}\"\n\
         data_dir = {data_dir}\n\n\
         [source]\n\
         url = \"{source}\"\n\n\
         [target]\n\
         url = \"{target}\"\n\n\
         [snapshot]\n\
         parallelism = {parallelism}\n\n\
         [ready]\n\
         max_lag = \"{max_lag}s\"\n",
        data_dir = toml_string(&data_dir.to_string_lossy()),
        source = clusters.source.url(DB),
        target = clusters.target.url(DB),
        max_lag = MAX_LAG.as_secs(),
    );
    // With [[table]] entries only those tables are synced: list all four.
    for (source, target) in TABLES {
        text.push_str(&format!(
            "\n[[table]]\nsource = \"{source}\"\ntarget = \"{target}\"\n"
        ));
    }
    JobSpec::parse(&text, None).map_err(|e| anyhow!("the demo's job spec is invalid: {e}"))
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ----- the job, its API -----

/// A spawned task that is aborted when dropped (so Ctrl-C leaves nothing running).
struct Task<T>(JoinHandle<T>);

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The job running in-process.
struct Job {
    stop: watch::Sender<bool>,
    task: Task<cutover_connectors::error::Result<()>>,
}

impl Job {
    /// An error when the job has ended (it only ends when asked to), with its reason.
    async fn check_alive(&mut self) -> anyhow::Result<()> {
        if !self.task.0.is_finished() {
            return Ok(());
        }
        match (&mut self.task.0).await {
            Ok(Ok(())) => bail!("the demo job stopped unexpectedly"),
            Ok(Err(e)) => bail!("the demo job failed: {e}"),
            Err(e) => bail!("the demo job's task failed: {e}"),
        }
    }

    /// Asks the job to stop and waits for it.
    async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let handle = &mut self.task.0;
        match tokio::time::timeout(STOP_TIMEOUT, handle).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow!("{e}")),
            Ok(Err(e)) => Err(anyhow!("the job's task failed: {e}")),
            Err(_) => Err(anyhow!(
                "the job did not stop within {}",
                secs(STOP_TIMEOUT)
            )),
        }
    }
}

/// Serves the HTTP API on 127.0.0.1 on a free port.
async fn start_api(
    status: &StatusHandle,
    ready_config: &ReadyConfig,
    verifier: crate::verifier::VerifierHandle,
) -> Option<(std::net::SocketAddr, Task<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.ok()?;
    let addr = listener.local_addr().ok()?;
    let state = ApiState {
        status: status.clone(),
        ready_config: ready_config.clone(),
        prometheus: crate::metrics::install(),
        token: None,
        verifier: Some(verifier),
    };
    let task = tokio::spawn(api::serve(listener, state, std::future::pending()));
    Some((addr, Task(task)))
}

// ----- the writer -----

/// A task that keeps changing the source: new orders with items, status changes, deleted
/// items, price changes of products whose (unchanged) description is TOASTed.
struct Writer {
    stop: watch::Sender<bool>,
    task: Task<anyhow::Result<()>>,
    transactions: Arc<AtomicU64>,
}

impl Writer {
    async fn start(source: &Cluster, orders: u64) -> anyhow::Result<Writer> {
        let client = source
            .connect(DB)
            .await
            .context("connect the writer to the source")?;
        let (stop, stop_rx) = watch::channel(false);
        let transactions = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_loop(client, orders, stop_rx, transactions.clone()));
        Ok(Writer {
            stop,
            task: Task(task),
            transactions,
        })
    }

    fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Stops the writer after its current transaction; returns how many it committed.
    async fn stop(mut self) -> anyhow::Result<u64> {
        let _ = self.stop.send(true);
        match (&mut self.task.0).await {
            Ok(Ok(())) => Ok(self.transactions()),
            Ok(Err(e)) => Err(e.context("the demo's writer failed")),
            Err(e) => Err(anyhow!("the demo's writer task failed: {e}")),
        }
    }
}

async fn write_loop(
    client: tokio_postgres::Client,
    orders: u64,
    mut stop: watch::Receiver<bool>,
    transactions: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut rng = Rng::seeded();
    let mut next_order = orders + 1;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / WRITER_TPS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
        }
        let n = transactions.load(Ordering::Relaxed);
        let mut sql = String::from("BEGIN;\n");
        // A new order with one to three items.
        let id = next_order;
        next_order += 1;
        let customer = 1 + rng.below((orders / 10).max(1));
        sql.push_str(&format!(
            "INSERT INTO orders VALUES ({id}, {customer}, 'new', 0, now());\n"
        ));
        for line in 1..=1 + rng.below(3) {
            let product = 1 + rng.below(PRODUCTS);
            let qty = 1 + rng.below(4);
            sql.push_str(&format!(
                "INSERT INTO order_items SELECT {id}, {line}, id, {qty}, price \
                 FROM products WHERE id = {product};\n"
            ));
        }
        sql.push_str(&format!(
            "UPDATE orders SET total = (SELECT coalesce(sum(qty * price), 0) FROM order_items \
             WHERE order_id = {id}) WHERE id = {id};\n"
        ));
        // An existing order moves on.
        let other = 1 + rng.below(next_order - 1);
        let status = ["paid", "shipped", "delivered", "returned"][rng.below(4) as usize];
        sql.push_str(&format!(
            "UPDATE orders SET status = '{status}' WHERE id = {other};\n"
        ));
        // Every fourth transaction takes the last item off an order.
        if n.is_multiple_of(4) {
            let victim = 1 + rng.below(next_order - 1);
            sql.push_str(&format!(
                "WITH gone AS (DELETE FROM order_items WHERE order_id = {victim} AND line = \
                 (SELECT max(line) FROM order_items WHERE order_id = {victim}) \
                 RETURNING order_id, qty * price AS amount) \
                 UPDATE orders AS o SET total = o.total - gone.amount FROM gone \
                 WHERE o.id = gone.order_id;\n"
            ));
        }
        // Every 25th changes the price of a product with a TOASTed description (which the
        // update leaves unchanged), every 10th a customer's email.
        if n.is_multiple_of(25) {
            let product =
                LONG_DESCRIPTION_EVERY * (1 + rng.below(PRODUCTS / LONG_DESCRIPTION_EVERY));
            sql.push_str(&format!(
                "UPDATE products SET price = price + 0.01 WHERE id = {product};\n"
            ));
        }
        if n.is_multiple_of(10) {
            let customer = 1 + rng.below((orders / 10).max(1));
            sql.push_str(&format!(
                "UPDATE customers SET email = 'c{customer}.{n}@example.org' WHERE id = {customer};\n"
            ));
        }
        sql.push_str("COMMIT;");
        client
            .batch_execute(&sql)
            .await
            .context("write a transaction on the source")?;
        transactions.fetch_add(1, Ordering::Relaxed);
    }
}

/// xorshift64*: enough randomness for a demo, no dependency.
struct Rng(u64);

impl Rng {
    fn seeded() -> Rng {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Rng(nanos | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ----- comparing -----

struct TableComparison {
    source: &'static str,
    target: &'static str,
    source_rows: u64,
    source_md5: String,
    target_rows: u64,
    target_md5: String,
}

impl TableComparison {
    fn equal(&self) -> bool {
        self.source_rows == self.target_rows && self.source_md5 == self.target_md5
    }
}

/// Every table's count and md5 of its sorted rows, on both sides, all queries at once.
async fn compare_tables(clusters: &Clusters) -> anyhow::Result<Vec<TableComparison>> {
    let queries = TABLES.iter().map(|&(source, target)| async move {
        let (s, t) = tokio::join!(
            fingerprint(&clusters.source, source),
            fingerprint(&clusters.target, target)
        );
        let ((source_rows, source_md5), (target_rows, target_md5)) = (
            s.with_context(|| format!("fingerprint {source} on the source"))?,
            t.with_context(|| format!("fingerprint {target} on the target"))?,
        );
        Ok::<_, anyhow::Error>(TableComparison {
            source,
            target,
            source_rows,
            source_md5,
            target_rows,
            target_md5,
        })
    });
    try_join_all(queries).await
}

/// `count(*)` and the md5 of every row's text, sorted bytewise, on a connection of its own.
async fn fingerprint(cluster: &Cluster, table: &str) -> anyhow::Result<(u64, String)> {
    let client = cluster.connect(DB).await?;
    client
        .batch_execute("SET TimeZone = 'UTC'; SET extra_float_digits = 3")
        .await?;
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), \
                 md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), '')) \
                 FROM {table} AS t"
            ),
            &[],
        )
        .await?;
    Ok((row.get::<_, i64>(0).max(0) as u64, row.get(1)))
}

async fn current_lsn(cluster: &Cluster) -> anyhow::Result<Lsn> {
    let client = cluster.connect(DB).await?;
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .context("read the source's WAL position")?;
    let text: String = row.get(0);
    text.parse()
        .map_err(|_| anyhow!("the source returned an invalid LSN {text:?}"))
}

// ----- output -----

/// The demo's output: numbered steps, indented details and one live line (an indicatif
/// spinner on a terminal, a plain line every few seconds otherwise).
struct Ui {
    tty: bool,
    bar: Mutex<Option<ProgressBar>>,
    last_plain: Mutex<Option<Instant>>,
}

impl Ui {
    fn new() -> Ui {
        Ui {
            tty: std::io::stdout().is_terminal(),
            bar: Mutex::new(None),
            last_plain: Mutex::new(None),
        }
    }

    fn line(&self, text: &str) {
        let bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match bar.as_ref() {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn step(&self, n: usize, text: &str) {
        self.line(&format!("[{n}/{STEPS}] {text}"));
    }

    fn detail(&self, text: &str) {
        self.line(&format!("      {text}"));
    }

    /// Starts a live line (a no-op when one is running or stdout is not a terminal).
    fn start_live(&self) {
        *self.last_plain.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        if !self.tty {
            return;
        }
        let mut bar = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        if bar.is_none() {
            let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stdout());
            b.set_style(
                ProgressStyle::with_template("      {spinner} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            *bar = Some(b);
        }
    }

    /// Updates the live line.
    fn live(&self, text: &str) {
        if self.tty {
            if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                bar.set_message(text.to_owned());
            }
            return;
        }
        let mut last = self.last_plain.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            *last = Some(Instant::now());
            println!("      … {text}");
        }
    }

    /// Removes the live line.
    fn clear(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish_and_clear();
        }
    }
}

impl Drop for Ui {
    fn drop(&mut self) {
        self.clear();
    }
}

fn copied(s: &JobStatus) -> (u64, u64) {
    s.tables.iter().fold((0, 0), |(rows, bytes), t| {
        (rows + t.rows_copied, bytes + t.bytes_copied)
    })
}

fn snapshot_line(s: &JobStatus, expected_rows: u64) -> String {
    if s.tables.is_empty() {
        return match &s.error {
            Some(e) => format!("starting: {e}"),
            None => "creating the publication and the replication slot".to_owned(),
        };
    }
    let (rows, bytes) = copied(s);
    let done = s.tables.iter().filter(|t| t.snapshot_done).count();
    let pct = (rows * 100)
        .checked_div(expected_rows)
        .unwrap_or(100)
        .min(100);
    format!(
        "snapshot: {} of ~{} rows ({pct}%){} · {done} of {} tables done{}",
        HumanCount(rows),
        HumanCount(expected_rows),
        bytes_text(bytes),
        s.tables.len(),
        retrying(s),
    )
}

/// ` (12.5 MiB)`, or nothing while no byte count is known.
fn bytes_text(bytes: u64) -> String {
    if bytes == 0 {
        String::new()
    } else {
        format!(" ({})", HumanBytes(bytes))
    }
}

/// ` · retrying: ...` while the job retries a transient error.
fn retrying(s: &JobStatus) -> String {
    match &s.error {
        Some(e) => format!(" · retrying: {e}"),
        None => String::new(),
    }
}

fn lag_text(s: &JobStatus) -> String {
    match (s.lag_seconds, s.lag_bytes) {
        (Some(secs), Some(bytes)) => format!("{} ({})", format_seconds(secs), HumanBytes(bytes)),
        (None, Some(bytes)) => HumanBytes(bytes).to_string(),
        _ => "not known yet".to_owned(),
    }
}

fn streaming_line(s: &JobStatus, writer: &Writer) -> String {
    format!(
        "streaming: lag {} · applied {} transactions ({} rows) · writer {} transactions{}",
        lag_text(s),
        HumanCount(s.applied_transactions),
        HumanCount(s.applied_rows),
        HumanCount(writer.transactions()),
        retrying(s),
    )
}

fn arrow(source: &str, target: &str) -> String {
    if source == target {
        source.to_owned()
    } else {
        format!("{source} → {target}")
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
