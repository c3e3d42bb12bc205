//! `cutover-bench`: `cutover` and its peers side by side, in one run, on one pair of
//! throwaway clusters, reported as ratios (docs/benchmarks.md describes the method).
//!
//! Three scenarios by default, each repeated `--reps` times with the tool order rotated every
//! repetition, and a fourth on request (`--only verify-load`):
//!
//! * `copy`: the pgbench tables at `--scale` copied into a fresh target database by
//!   `cutover run` (until every table is `snapshot_done`), `pg_dump --data-only | psql`,
//!   `pgcopydb clone` (when installed) and PostgreSQL's own logical replication (until every
//!   `pg_subscription_rel` row is ready). Floors: a server-side `COPY ... TO '/dev/null'` of
//!   `pgbench_accounts`, and `psql COPY TO STDOUT | psql COPY FROM STDIN` of the four tables
//!   into unindexed tables, two streams in parallel.
//! * `catchup`: a `pgbench -c 4 -j 2 -T <backlog-secs> -n` backlog written while the
//!   consumer is stopped, then drained by `cutover run` or by a re-enabled native subscription,
//!   timed until the consumer's slot has confirmed the WAL position taken right after pgbench
//!   ended. Floor: `pg_recvlogical` (pgoutput) of a slot created before its own backlog.
//!   A fourth tool, `cutover, mapped`, is the same `cutover run` with `pgbench_accounts`
//!   mapped through `[table.columns]` (`where = "aid > 0"`, `abalance = "abalance + 0"`): the
//!   rows stay identical (so the same gate holds), but every change to that table — the bulk
//!   of the backlog — is evaluated on the source (the daemon sends the changed rows back as
//!   `SELECT <expressions> FROM (VALUES ...)`) before it is applied. Its ratio to plain
//!   `cutover` is the cost of evaluating a mapping on the source in the stream. The filter
//!   reads only the primary key, so the table needs no `REPLICA IDENTITY FULL`.
//! * `verify` and `verify-drift`: `pgbench_accounts` (at `--verify-scale`, default `--scale`)
//!   on the source against a `pg_dump -t | psql` copy of it in a target database, compared
//!   by `cutover verify JOB.toml --json` (no daemon runs, so it compares the databases as
//!   they stand) and by `reladiff` (keyed by `aid`, every column, `-j 2`; skipped when not
//!   installed). `verify` compares identical tables; `verify-drift` a second copy (a
//!   `CREATE DATABASE ... TEMPLATE` of the first) with drift planted on the target: 100
//!   `abalance` updates, 3 deletes and 2 inserts of new keys, on distinct keys spread over
//!   the table. Floor: `COPY (SELECT * ... ORDER BY aid) TO STDOUT` from both databases in
//!   parallel through tokio-postgres `copy_out`, every byte fed to blake3, nothing compared.
//! * `verify-load` (not in the default set): what continuous verification costs the source
//!   under load. One cutover job (copied once, then streaming) carries the pgbench tables into
//!   a target; each variant restarts its daemon with the job file rewritten (same slot, it
//!   resumes) and runs `pgbench -c 4 -j 2 -T <load-secs> -n` on the source while it streams:
//!   `sync only` with `[verify] every = "0"`, `sync + continuous verify` with `every = "1s"`
//!   and `max_rows_per_second = <load-verify-rows-per-second>` (default 50000, the daemon's
//!   default), so a full pass is due a second after the previous one finished, all through
//!   the load. The figure is pgbench's tps (without initial connection time); the headline
//!   is the ratio of the two. Passes finished during the load are counted from the daemon's
//!   log (and its status), the daemon's CPU is read from `/proc/<pid>/stat` (it runs
//!   throughout), and the gate runs once the job has caught up with the end of the load.
//!
//! Every timed run of copy and catch-up (floors that write a target too) is gated by
//! comparing every pgbench table on both sides with `count(*)` and `sum(hashtext(t::text))`;
//! a mismatch marks the run FAILED. A verifier's gate is its answer: `equal` and no
//! difference for identical tables, and for the drift exactly the planted keys (100
//! different, 3 missing, 2 extra; reladiff's `-`/`+` rows counted by distinct key). CPU
//! seconds are measured for the tool's process tree (this process's reaped children,
//! `/proc/self/stat` cutime + cstime; for the in-process verify floor, this process's own
//! time) and for both PostgreSQL servers (postmaster with its reaped children, plus its live
//! children).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use cutover::cluster::{Cluster, ClusterOptions};
use tokio::process::Command;

/// The pgbench tables, largest first.
const TABLES: [&str; 4] = [
    "pgbench_accounts",
    "pgbench_history",
    "pgbench_tellers",
    "pgbench_branches",
];
/// The source database.
const SOURCE_DB: &str = "bench";
/// The `[verify]` section of jobs that only sync.
const NO_VERIFY: &str = "every = \"0\"\n";

/// The publication the native subscriptions and the pg_recvlogical floor read.
const PUBLICATION: &str = "bench_pub";
/// The section of docs/benchmarks.md this program rewrites.
const BEGIN_MARK: &str = "<!-- cutover-bench:begin (generated by cutover-bench; edits between the markers are overwritten) -->";
const END_MARK: &str = "<!-- cutover-bench:end -->";
/// How long one timed run may take before it counts as failed.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
// Environment variables that would steer the PostgreSQL tools away from the clusters.
use cutover::cluster::PG_ENV;

const COPY: &str = "copy";
const CATCHUP: &str = "catchup";
const OURS: &str = "cutover";
/// `cutover` with `pgbench_accounts` mapped through `[table.columns]` (catch-up only).
const OURS_MAPPED: &str = "cutover, mapped";
/// `cutover` with `[target] apply_sessions = 2` (catch-up with `--catchup-two-sessions`):
/// groups overlap on two target sessions.
const OURS_TWO_SESSIONS: &str = "cutover, 2 sessions";
/// `cutover` run from the binary given with `--compare-bin` (catch-up only): another build,
/// measured in the same run.
const OURS_OTHER_BUILD: &str = "cutover, other build";
/// What the mapped job writes for `pgbench_accounts`: a filter on the key and an expression
/// that leaves the value unchanged, so every change is evaluated on the source.
const MAPPED_TABLE: &str = "pgbench_accounts";
const MAPPED_WHERE: &str = "aid > 0";
const MAPPED_COLUMN: (&str, &str) = ("abalance", "abalance + 0");
const PG_DUMP: &str = "pg_dump|psql";
const PGCOPYDB: &str = "pgcopydb clone";
const NATIVE: &str = "native LR";
const FLOOR_SERVER_COPY: &str = "floor: server COPY accounts TO /dev/null";
const FLOOR_CLIENT_COPY: &str = "floor: psql COPY|COPY, 2 streams, no index";
const FLOOR_RECVLOGICAL: &str = "floor: pg_recvlogical pgoutput";
/// `verify` compares identical tables, `verify-drift` tables with planted differences; both
/// run with `--only verify`.
const VERIFY: &str = "verify";
const VERIFY_DRIFT: &str = "verify-drift";
const RELADIFF: &str = "reladiff";
const FLOOR_HASH: &str = "floor: COPY ORDER BY key → blake3, 2 streams";
/// The table the verify scenarios compare (keyed by `aid`, its primary key).
const VERIFY_TABLE: &str = "pgbench_accounts";
/// The source database of the verify scenarios when `--verify-scale` differs from `--scale`.
const VERIFY_SOURCE_DB: &str = "bench_verify";
/// The target databases of the verify scenarios: an identical copy, and one with drift.
const VERIFY_SAME_DB: &str = "verify_same";
const VERIFY_DRIFT_DB: &str = "verify_drift";
/// The drift planted on the target: `abalance` updated, rows deleted, new keys inserted.
const DRIFT_UPDATES: i64 = 100;
const DRIFT_DELETES: i64 = 3;
const DRIFT_INSERTS: i64 = 2;
/// reladiff's worker threads per database: one per CPU of the benchmark machine.
const RELADIFF_THREADS: &str = "2";
/// The goals the verify headline measures against.
const GOAL_VERIFY_FLOOR: f64 = 1.3;
const GOAL_VERIFY_VS_RELADIFF: f64 = 3.0;
const GOAL_DRIFT_VS_IDENTICAL: f64 = 1.5;
/// The source under load while the job streams, without and with continuous verification.
const VERIFY_LOAD: &str = "verify-load";
const SYNC_ONLY: &str = "sync only";
const SYNC_VERIFY: &str = "sync + continuous verify";
/// The verify-load job, its slot (`cutover_<name>`) and its target database.
const LOAD_JOB: &str = "bload";
const LOAD_SLOT: &str = "cutover_bload";
const LOAD_DB: &str = "verify_load";
/// `[verify] every` of the verifying variant: a pass is due a second after the last one
/// finished, so passes follow each other through the load.
const LOAD_PASS_EVERY: &str = "1s";
/// How often the status and the source's verify connections are sampled during the load.
const LOAD_SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Goal: source throughput with continuous verification / without.
const GOAL_LOAD_RATIO: f64 = 0.90;

#[derive(Parser, Debug)]
#[command(
    name = "cutover-bench",
    about = "Benchmark cutover against pg_dump, pgcopydb, native logical replication and reladiff in one run"
)]
struct Args {
    /// pgbench scale of the source database (scale 1 = 100,000 accounts rows).
    #[arg(long, default_value_t = 20)]
    scale: u32,
    /// Repetitions of every tool in every scenario (the tool order rotates each time).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Scenarios to run, comma-separated: copy, catchup (catchup includes `cutover, mapped`),
    /// verify (identical tables and planted drift), verify-load (not in the default set:
    /// the source's pgbench throughput while the job streams, without and with continuous
    /// verification).
    #[arg(long, default_value = "copy,catchup,verify")]
    only: String,
    /// pgbench scale of the verify scenarios' `pgbench_accounts` (default: --scale). When it
    /// differs, a second source database is initialized at this scale.
    #[arg(long)]
    verify_scale: Option<u32>,
    /// Seconds of pgbench load that make up each catch-up backlog.
    #[arg(long, default_value_t = 30)]
    backlog_secs: u32,
    /// Seconds of pgbench load in each verify-load variant.
    #[arg(long, default_value_t = 20)]
    load_secs: u32,
    /// `[verify] max_rows_per_second` of verify-load's verifying variant (0: no limit; the
    /// daemon's default is 50000).
    #[arg(long, default_value_t = 50_000)]
    load_verify_rows_per_second: u64,
    /// `[verify] snapshot_max_age` of verify-load's verifying variant, as a duration
    /// (`"10s"`); default: the daemon's default.
    #[arg(long)]
    load_snapshot_max_age: Option<String>,
    /// verify-load: run the source server and pgbench on CPU 0, the daemon and the target
    /// server on CPU 1, as if the source were a machine of its own (the daemon's hashing
    /// and the target's reads then take nothing from the source's CPU).
    #[arg(long)]
    load_pin: bool,
    /// catchup: cutover, native LR and the pg_recvlogical floor read the source over its
    /// unix socket instead of TCP on 127.0.0.1 (a source on the same host; the walsender's
    /// cost per message is much lower on a unix socket).
    #[arg(long)]
    catchup_socket: bool,
    /// catchup: also run `cutover, 2 sessions`, the job with `[target] apply_sessions = 2`
    /// (what overlapping groups on two target sessions gives, measured in the same run).
    #[arg(long)]
    catchup_two_sessions: bool,
    /// catchup: also run `cutover, other build`, the same job with this `cutover` binary
    /// (an A/B of two builds in one run).
    #[arg(long)]
    compare_bin: Option<PathBuf>,
    /// catchup: give every target's `pgbench_accounts` an extra index on `(bid, abalance)`
    /// (ours and native alike), so each update costs the target more (a new schema with
    /// more indexes than the source).
    #[arg(long)]
    catchup_target_index: bool,
    /// The `cutover` binary (default: beside this program).
    #[arg(long)]
    cutover_bin: Option<PathBuf>,
    /// The Markdown file whose generated section is rewritten.
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Do not write the Markdown file.
    #[arg(long)]
    no_docs: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Ours,
    Peer,
    /// The scenario's floor: what ratios to floor refer to.
    Floor,
    /// A floor for orientation that moves different units (one table, read only).
    ExtraFloor,
}

#[derive(Clone, Debug)]
enum Check {
    Pass,
    Fail(String),
    NotApplicable,
    Error(String),
    Skipped(String),
}

impl Check {
    fn label(&self) -> &'static str {
        match self {
            Check::Pass => "ok",
            Check::Fail(_) => "FAILED",
            Check::NotApplicable => "n/a",
            Check::Error(_) => "ERROR",
            Check::Skipped(_) => "skipped",
        }
    }

    /// Whether the run's timing counts.
    fn usable(&self) -> bool {
        matches!(self, Check::Pass | Check::NotApplicable)
    }

    fn detail(&self) -> Option<&str> {
        match self {
            Check::Fail(d) | Check::Error(d) | Check::Skipped(d) => Some(d),
            _ => None,
        }
    }
}

/// What a tool run returns.
struct Measured {
    wall: f64,
    /// cutover catch-up only: when its status showed the end of the backlog applied.
    applied: Option<f64>,
    cpu: CpuDelta,
    units: f64,
    check: Check,
    note: String,
}

/// One row of the results.
#[derive(Clone, Debug)]
struct Sample {
    scenario: &'static str,
    tool: &'static str,
    kind: Kind,
    rep: usize,
    wall: f64,
    tool_cpu: f64,
    src_cpu: f64,
    dst_cpu: f64,
    other_cpu: f64,
    applied: Option<f64>,
    units: f64,
    unit: &'static str,
    check: Check,
    note: String,
    /// verify-load only: what was observed during the load.
    load: Option<LoadFigures>,
}

impl Sample {
    fn rate(&self) -> f64 {
        if self.wall > 0.0 {
            self.units / self.wall
        } else {
            0.0
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct CpuSnap {
    children: f64,
    src: f64,
    dst: f64,
    /// This program's own CPU time.
    own: f64,
    /// Busy CPU time of the whole machine (`/proc/stat`).
    machine: f64,
}

#[derive(Clone, Copy, Debug, Default)]
struct CpuDelta {
    tool: f64,
    src: f64,
    dst: f64,
    /// CPU time used on the machine by anything else than the tool, the servers and this
    /// program: a run with much of it was disturbed.
    other: f64,
}

impl CpuSnap {
    fn since(self, start: CpuSnap) -> CpuDelta {
        let tool = self.children - start.children;
        let src = self.src - start.src;
        let dst = self.dst - start.dst;
        let own = self.own - start.own;
        CpuDelta {
            tool,
            src,
            dst,
            other: (self.machine - start.machine - tool - src - dst - own).max(0.0),
        }
    }
}

/// Busy ticks of all CPUs: everything in the `cpu` line of `/proc/stat` but idle and iowait.
fn machine_busy_ticks() -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    line.split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The environment of one run, for the report.
struct EnvInfo {
    date: String,
    nproc: usize,
    cpu_model: String,
    pg_version: String,
    pgcopydb: Option<String>,
    reladiff: Option<String>,
    commit: String,
    source_rows: u64,
    source_size: String,
    load_start: String,
}

/// `cutover run` as a child process.
struct Daemon {
    child: tokio::process::Child,
    api: String,
    log: PathBuf,
}

struct Bench {
    src: Cluster,
    dst: Cluster,
    pg_bin: PathBuf,
    cutover_bin: PathBuf,
    pgcopydb: Option<PathBuf>,
    reladiff: Option<PathBuf>,
    /// pgbench scale of [`SOURCE_DB`].
    scale: u32,
    work: tempfile::TempDir,
    path_env: OsString,
    clk_tck: f64,
    schema_full: PathBuf,
    schema_pre: PathBuf,
    backlog_secs: u32,
    load_secs: u32,
    load_verify_rows_per_second: u64,
    load_snapshot_max_age: Option<String>,
    load_pin: bool,
    catchup_socket: bool,
    catchup_two_sessions: bool,
    compare_bin: Option<PathBuf>,
    catchup_target_index: bool,
    source_rows: u64,
    accounts_rows: u64,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match Box::pin(real_main(args)).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("cutover-bench: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn real_main(args: Args) -> Result<i32> {
    let scenarios: Vec<String> = args
        .only
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &scenarios {
        if s != COPY && s != CATCHUP && s != VERIFY && s != VERIFY_LOAD {
            bail!("--only: unknown scenario {s:?} (use copy, catchup, verify, verify-load)");
        }
    }
    if args.reps == 0 || args.scale == 0 || args.verify_scale == Some(0) || args.load_secs == 0 {
        bail!("--reps, --scale, --verify-scale and --load-secs must be 1 or more");
    }
    let started = Instant::now();
    let bench = Box::pin(Bench::setup(&args)).await?;
    let env = bench.env_info().await?;
    eprintln!(
        "cutover-bench: scale {} ({} rows, {}), {} reps, {} CPUs, {}",
        args.scale, env.source_rows, env.source_size, args.reps, env.nproc, env.pg_version
    );

    let mut samples: Vec<Sample> = Vec::new();
    if scenarios.iter().any(|s| s == COPY) {
        Box::pin(bench.copy_scenario(args.reps, &mut samples)).await;
    }
    if scenarios.iter().any(|s| s == CATCHUP) {
        Box::pin(bench.catchup_scenario(args.reps, &mut samples)).await;
    }
    if scenarios.iter().any(|s| s == VERIFY) {
        let scale = args.verify_scale.unwrap_or(args.scale);
        Box::pin(bench.verify_scenario(args.reps, scale, &mut samples)).await;
    }
    if scenarios.iter().any(|s| s == VERIFY_LOAD) {
        Box::pin(bench.verify_load_scenario(args.reps, &mut samples)).await;
    }

    let report = render(&samples, &env, &args, started.elapsed());
    println!("{report}");
    if !args.no_docs {
        let docs = args.docs.clone().unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md")
        });
        write_docs(&docs, &report)?;
        let shown = std::fs::canonicalize(&docs).unwrap_or(docs);
        eprintln!("cutover-bench: wrote {}", shown.display());
    }
    let failed = samples
        .iter()
        .any(|s| matches!(s.check, Check::Fail(_) | Check::Error(_)));
    Ok(if failed { 1 } else { 0 })
}

impl Bench {
    async fn setup(args: &Args) -> Result<Bench> {
        let pg_bin = Cluster::bin_dir()?;
        let cutover_bin = match &args.cutover_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?
                .parent()
                .ok_or_else(|| anyhow!("this program has no directory"))?
                .join("cutover"),
        };
        if !cutover_bin.is_file() {
            bail!(
                "no cutover binary at {} (build it with `cargo build --release -p cutover`, or pass --cutover-bin)",
                cutover_bin.display()
            );
        }
        let path_env = match std::env::var_os("PATH") {
            Some(p) => {
                let mut v = pg_bin.clone().into_os_string();
                v.push(":");
                v.push(p);
                v
            }
            None => pg_bin.clone().into_os_string(),
        };
        let pgcopydb = find_in_path(&path_env, "pgcopydb");
        let reladiff = find_in_path(&path_env, "reladiff").map(resolve_pyenv_shim);
        let clk_tck = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);

        let options = |name: &str| {
            ClusterOptions::named(name)
                .setting("shared_buffers", "256MB")
                .setting("max_wal_size", "4GB")
                .setting("checkpoint_timeout", "30min")
                .setting("wal_level", "logical")
                .setting("max_worker_processes", "16")
                .setting("max_logical_replication_workers", "8")
        };
        let (src, dst) = tokio::join!(
            Cluster::start(options("bench-src")),
            Cluster::start(options("bench-dst"))
        );
        let (src, dst) = (src?, dst?);
        let work = tempfile::Builder::new()
            .prefix("cutover-bench-")
            .tempdir()?;
        let schema_full = work.path().join("schema.sql");
        let schema_pre = work.path().join("schema-pre-data.sql");
        let mut bench = Bench {
            src,
            dst,
            pg_bin,
            cutover_bin,
            pgcopydb,
            reladiff,
            scale: args.scale,
            work,
            path_env,
            clk_tck,
            schema_full,
            schema_pre,
            backlog_secs: args.backlog_secs,
            load_secs: args.load_secs,
            load_verify_rows_per_second: args.load_verify_rows_per_second,
            load_snapshot_max_age: args.load_snapshot_max_age.clone(),
            load_pin: args.load_pin,
            catchup_socket: args.catchup_socket,
            catchup_two_sessions: args.catchup_two_sessions,
            compare_bin: args.compare_bin.clone(),
            catchup_target_index: args.catchup_target_index,
            source_rows: 0,
            accounts_rows: 0,
        };

        eprintln!("cutover-bench: pgbench -i -s {}", args.scale);
        bench.src.create_database(SOURCE_DB).await?;
        let mut init = bench.tool("pgbench");
        init.args(["-i", "-q", "-s", &args.scale.to_string()])
            .args(bench.src_conn_args())
            .arg(SOURCE_DB);
        run(init, "pgbench -i").await?;
        // pgbench_history has no key; cutover needs REPLICA IDENTITY FULL for it (it only
        // receives inserts, so the WAL written is the same for every tool).
        for sql in [
            "ALTER TABLE public.pgbench_history REPLICA IDENTITY FULL",
            "VACUUM ANALYZE",
            "CHECKPOINT",
        ] {
            bench.src.execute(SOURCE_DB, sql).await?;
        }
        let mut dump = bench.tool("pg_dump");
        dump.args([
            "--section=pre-data",
            "--section=post-data",
            "--no-publications",
        ])
        .args(["--no-subscriptions", "-f"])
        .arg(&bench.schema_full)
        .args(["-d", &bench.src.url(SOURCE_DB)]);
        run(dump, "pg_dump schema").await?;
        let mut dump = bench.tool("pg_dump");
        dump.args([
            "--section=pre-data",
            "--no-publications",
            "--no-subscriptions",
        ])
        .arg("-f")
        .arg(&bench.schema_pre)
        .args(["-d", &bench.src.url(SOURCE_DB)]);
        run(dump, "pg_dump pre-data schema").await?;

        let client = bench.src.connect(SOURCE_DB).await?;
        let mut total = 0u64;
        for t in TABLES {
            // Also warms the cache for the first timed run.
            let n: i64 = client
                .query_one(&format!("SELECT count(*) FROM public.{t}"), &[])
                .await?
                .get(0);
            total += u64::try_from(n).unwrap_or(0);
            if t == "pgbench_accounts" {
                bench.accounts_rows = u64::try_from(n).unwrap_or(0);
            }
        }
        bench.source_rows = total;
        Ok(bench)
    }

    async fn env_info(&self) -> Result<EnvInfo> {
        let client = self.src.connect(SOURCE_DB).await?;
        let pg_version: String = client
            .query_one(
                "SELECT 'PostgreSQL ' || current_setting('server_version')",
                &[],
            )
            .await?
            .get(0);
        let source_size: String = client
            .query_one(
                "SELECT pg_size_pretty(pg_database_size(current_database()))",
                &[],
            )
            .await?
            .get(0);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let pgcopydb = match &self.pgcopydb {
            None => None,
            Some(p) => {
                let out = std::process::Command::new(p)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .output()
                    .ok();
                out.and_then(|o| {
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&o.stdout),
                        String::from_utf8_lossy(&o.stderr)
                    );
                    text.lines()
                        .find_map(|l| l.trim().strip_prefix("pgcopydb version "))
                        .map(|v| v.trim().to_owned())
                })
                .or_else(|| Some("unknown version".to_owned()))
            }
        };
        let reladiff = self.reladiff.as_ref().map(|p| {
            std::process::Command::new(p)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "unknown version".to_owned())
        });
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let commit = std::process::Command::new("git")
            .arg("-C")
            .arg(env!("CARGO_MANIFEST_DIR"))
            .args(["describe", "--always", "--dirty"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Ok(EnvInfo {
            date,
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            pg_version,
            pgcopydb,
            reladiff,
            commit,
            source_rows: self.source_rows,
            source_size,
            load_start: load_average(),
        })
    }

    // ----- scenarios -----

    async fn copy_scenario(&self, reps: usize, samples: &mut Vec<Sample>) {
        let mut tools: Vec<(&'static str, Kind)> = vec![
            (OURS, Kind::Ours),
            (PG_DUMP, Kind::Peer),
            (PGCOPYDB, Kind::Peer),
            (NATIVE, Kind::Peer),
            (FLOOR_CLIENT_COPY, Kind::Floor),
            (FLOOR_SERVER_COPY, Kind::ExtraFloor),
        ];
        for rep in 1..=reps {
            for &(tool, kind) in &tools {
                let unit = "rows";
                if tool == PGCOPYDB && self.pgcopydb.is_none() {
                    push(
                        samples,
                        COPY,
                        tool,
                        kind,
                        rep,
                        unit,
                        Ok(skipped(
                            "pgcopydb is not installed (apt-get install pgcopydb)",
                        )),
                    );
                    continue;
                }
                if let Err(e) = self.quiesce().await {
                    eprintln!("cutover-bench: checkpoint before {tool} failed: {e:#}");
                }
                let result = match tool {
                    OURS => Box::pin(self.copy_ours(rep)).await,
                    PG_DUMP => Box::pin(self.copy_pg_dump(rep)).await,
                    PGCOPYDB => Box::pin(self.copy_pgcopydb(rep)).await,
                    NATIVE => Box::pin(self.copy_native(rep)).await,
                    FLOOR_CLIENT_COPY => Box::pin(self.copy_floor_client(rep)).await,
                    _ => Box::pin(self.copy_floor_server(rep)).await,
                };
                push(samples, COPY, tool, kind, rep, unit, result);
            }
            tools.rotate_left(1);
        }
    }

    async fn catchup_scenario(&self, reps: usize, samples: &mut Vec<Sample>) {
        if let Err(e) = self.create_publication().await {
            for rep in 1..=reps {
                push(
                    samples,
                    CATCHUP,
                    NATIVE,
                    Kind::Peer,
                    rep,
                    "txns",
                    Err(anyhow!("create the publication: {e:#}")),
                );
            }
            return;
        }
        let mut tools: Vec<(&'static str, Kind)> = vec![
            (OURS, Kind::Ours),
            (OURS_MAPPED, Kind::Ours),
            (NATIVE, Kind::Peer),
            (FLOOR_RECVLOGICAL, Kind::Floor),
        ];
        if self.catchup_two_sessions {
            tools.insert(1, (OURS_TWO_SESSIONS, Kind::Ours));
        }
        // The other build runs right beside this one, first on even repetitions: the two
        // builds of an A/B then follow the same tool in turn, and each goes first as often.
        // (Rotated apart, one build ran after the pg_recvlogical floor in every
        // repetition but the first, and was the slower of the pair in 9 of 9 pairs over
        // the unix socket, whichever build it was.)
        let pair = self.compare_bin.is_some();
        for rep in 1..=reps {
            let mut order = tools.clone();
            if pair {
                let at = order.iter().position(|&(t, _)| t == OURS).unwrap_or(0);
                order.insert(
                    at + usize::from(rep % 2 == 1),
                    (OURS_OTHER_BUILD, Kind::Ours),
                );
            }
            for &(tool, kind) in &order {
                if let Err(e) = self.quiesce().await {
                    eprintln!("cutover-bench: checkpoint before {tool} failed: {e:#}");
                }
                let result = match tool {
                    OURS | OURS_MAPPED | OURS_TWO_SESSIONS | OURS_OTHER_BUILD => {
                        Box::pin(self.catchup_ours(rep, tool)).await
                    }
                    NATIVE => Box::pin(self.catchup_native(rep)).await,
                    _ => Box::pin(self.catchup_floor(rep)).await,
                };
                push(samples, CATCHUP, tool, kind, rep, "txns", result);
            }
            tools.rotate_left(1);
        }
        let _ = self
            .src
            .execute(
                SOURCE_DB,
                &format!("DROP PUBLICATION IF EXISTS {PUBLICATION}"),
            )
            .await;
    }

    /// `verify` and `verify-drift`: each tool on the identical copy and on the drifted one
    /// every repetition (identical first on odd repetitions, drift first on even ones).
    async fn verify_scenario(&self, reps: usize, scale: u32, samples: &mut Vec<Sample>) {
        let setup = match Box::pin(self.verify_setup(scale)).await {
            Ok(setup) => setup,
            Err(e) => {
                for rep in 1..=reps {
                    for scenario in [VERIFY, VERIFY_DRIFT] {
                        push(
                            samples,
                            scenario,
                            OURS,
                            Kind::Ours,
                            rep,
                            "rows",
                            Err(anyhow!("verify setup: {e:#}")),
                        );
                    }
                }
                self.verify_cleanup(scale).await;
                return;
            }
        };
        let identical = Drift::default();
        let mut tools: Vec<(&'static str, Kind)> = vec![
            (OURS, Kind::Ours),
            (RELADIFF, Kind::Peer),
            (FLOOR_HASH, Kind::Floor),
        ];
        for rep in 1..=reps {
            let mut phases = [
                (VERIFY, VERIFY_SAME_DB, &setup.same_job, &identical),
                (
                    VERIFY_DRIFT,
                    VERIFY_DRIFT_DB,
                    &setup.drift_job,
                    &setup.drift,
                ),
            ];
            if rep % 2 == 0 {
                phases.reverse();
            }
            for (scenario, db, job, expected) in phases {
                for &(tool, kind) in &tools {
                    if tool == RELADIFF && self.reladiff.is_none() {
                        push(
                            samples,
                            scenario,
                            tool,
                            kind,
                            rep,
                            "rows",
                            Ok(skipped(
                                "reladiff is not installed (pip install 'reladiff[postgresql]')",
                            )),
                        );
                        continue;
                    }
                    if let Err(e) = self.quiesce().await {
                        eprintln!("cutover-bench: checkpoint before {tool} failed: {e:#}");
                    }
                    let result = match tool {
                        OURS => Box::pin(self.verify_ours(job, expected, setup.rows)).await,
                        RELADIFF => {
                            Box::pin(self.verify_reladiff(
                                &setup.source_db,
                                db,
                                expected,
                                setup.rows,
                            ))
                            .await
                        }
                        _ => Box::pin(self.verify_floor(&setup.source_db, db, setup.rows)).await,
                    };
                    push(samples, scenario, tool, kind, rep, "rows", result);
                }
            }
            tools.rotate_left(1);
        }
        self.verify_cleanup(scale).await;
    }

    /// `verify-load`: the job copied once (untimed), then per repetition each variant with
    /// its own daemon run over the same job (rewritten job file, same slot), in rotated order.
    async fn verify_load_scenario(&self, reps: usize, samples: &mut Vec<Sample>) {
        let mut tools: Vec<(&'static str, Kind)> =
            vec![(SYNC_ONLY, Kind::Floor), (SYNC_VERIFY, Kind::Ours)];
        if let Err(e) = Box::pin(self.verify_load_setup()).await {
            for rep in 1..=reps {
                for &(tool, kind) in &tools {
                    push(
                        samples,
                        VERIFY_LOAD,
                        tool,
                        kind,
                        rep,
                        "txns",
                        Err(anyhow!("verify-load setup: {e:#}")),
                    );
                }
            }
        } else {
            if self.load_pin {
                self.pin_servers(Some(("0", "1")));
            }
            for rep in 1..=reps {
                for &(tool, kind) in &tools {
                    let result = Box::pin(self.verify_load_run(rep, tool == SYNC_VERIFY)).await;
                    let (result, figures) = match result {
                        Ok((m, f)) => (Ok(m), Some(f)),
                        Err(e) => (Err(e), None),
                    };
                    push(samples, VERIFY_LOAD, tool, kind, rep, "txns", result);
                    if let Some(last) = samples.last_mut() {
                        last.load = figures;
                    }
                }
                tools.rotate_left(1);
            }
            if self.load_pin {
                self.pin_servers(None);
            }
        }
        self.drop_job_objects(LOAD_JOB).await;
        self.drop_db(LOAD_DB).await;
    }

    // ----- copy tools -----

    async fn copy_ours(&self, rep: usize) -> Result<Measured> {
        let db = format!("copy_ours_{rep}");
        let name = format!("bcopy-{rep}");
        self.fresh_db(&db, Some(&self.schema_full)).await?;
        let result = async {
            let (job, api) = self.write_job(&name, &db, false)?;
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            let mut daemon = self.spawn_daemon(&job, &api, &format!("{name}.log"))?;
            let done = wait_status(&mut daemon, RUN_TIMEOUT, all_snapshot_done).await;
            let wall = t0.elapsed().as_secs_f64();
            let (cpu, check) = self.gate_then_stop(&db, daemon, cpu0, done).await?;
            Ok(Measured {
                wall,
                cpu,
                units: self.source_rows as f64,
                check,
                note: "snapshot parallelism 4, verify off; wall includes process start".into(),
                applied: None,
            })
        }
        .await;
        self.drop_job_objects(&name).await;
        self.drop_db(&db).await;
        result
    }

    async fn copy_pg_dump(&self, rep: usize) -> Result<Measured> {
        let db = format!("copy_pgdump_{rep}");
        self.fresh_db(&db, Some(&self.schema_full)).await?;
        let result = async {
            let log = self.work.path().join(format!("pg_dump-{rep}.log"));
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            self.pipe(
                |c| {
                    c.args(["--data-only", "-d", &self.src.url(SOURCE_DB)]);
                },
                "pg_dump",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    &self.dst.url(&db),
                ],
                &log,
            )
            .await?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            let check = self.gate(&db).await?;
            Ok(Measured {
                wall,
                cpu,
                units: self.source_rows as f64,
                check,
                note: "--data-only into the pre-created schema (with primary keys)".into(),
                applied: None,
            })
        }
        .await;
        self.drop_db(&db).await;
        result
    }

    async fn copy_pgcopydb(&self, rep: usize) -> Result<Measured> {
        let Some(pgcopydb) = &self.pgcopydb else {
            return Ok(skipped("pgcopydb is not installed"));
        };
        let db = format!("copy_pgcopydb_{rep}");
        self.fresh_db(&db, None).await?;
        let result = async {
            let dir = self.work.path().join(format!("pgcopydb-{rep}"));
            let log = self.work.path().join(format!("pgcopydb-{rep}.log"));
            let file = std::fs::File::create(&log)?;
            let mut cmd = Command::new(pgcopydb);
            self.prepare(&mut cmd);
            cmd.args(["clone", "--source", &self.src.url(SOURCE_DB)])
                .args(["--target", &self.dst.url(&db), "--dir"])
                .arg(&dir)
                .args(["--table-jobs", "2", "--index-jobs", "2"])
                .stdout(Stdio::from(file.try_clone()?))
                .stderr(Stdio::from(file))
                // pgcopydb kills its whole process group on a fatal error: give it its own.
                .process_group(0);
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            let status = tokio::time::timeout(RUN_TIMEOUT, cmd.status())
                .await
                .map_err(|_| anyhow!("pgcopydb clone did not finish in {RUN_TIMEOUT:?}"))??;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            if !status.success() {
                bail!(
                    "pgcopydb clone failed ({status}): {}",
                    last_lines(&std::fs::read_to_string(&log).unwrap_or_default(), 8)
                );
            }
            let check = self.gate(&db).await?;
            Ok(Measured {
                wall,
                cpu,
                units: self.source_rows as f64,
                check,
                note: "creates the schema itself: loads unindexed tables, builds indexes after, \
                       then VACUUM ANALYZE"
                    .into(),
                applied: None,
            })
        }
        .await;
        self.drop_db(&db).await;
        result
    }

    async fn copy_native(&self, rep: usize) -> Result<Measured> {
        let db = format!("copy_native_{rep}");
        let sub = format!("bench_sub_copy_{rep}");
        self.fresh_db(&db, Some(&self.schema_full)).await?;
        let result = async {
            self.create_publication().await?;
            let target = self.dst.connect(&db).await?;
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            target
                .batch_execute(&self.create_subscription_sql(&sub, false))
                .await
                .context("CREATE SUBSCRIPTION")?;
            wait_subscription_ready(&target, &sub, RUN_TIMEOUT).await?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            // Gate with the subscription still there: what was applied when the clock stopped.
            let check = self.gate(&db).await?;
            target
                .batch_execute(&format!("DROP SUBSCRIPTION {sub}"))
                .await?;
            Ok(Measured {
                wall,
                cpu,
                units: self.source_rows as f64,
                check,
                note: "CREATE SUBSCRIPTION (copy_data) until every table is ready; \
                       its CPU is in the servers'"
                    .into(),
                applied: None,
            })
        }
        .await;
        if result.is_err() {
            let _ = self
                .dst
                .execute(&db, &format!("DROP SUBSCRIPTION IF EXISTS {sub}"))
                .await;
        }
        let _ = self
            .src
            .execute(
                SOURCE_DB,
                &format!("DROP PUBLICATION IF EXISTS {PUBLICATION}"),
            )
            .await;
        self.drop_db(&db).await;
        result
    }

    async fn copy_floor_server(&self, _rep: usize) -> Result<Measured> {
        let client = self.src.connect(SOURCE_DB).await?;
        let cpu0 = self.cpu();
        let t0 = Instant::now();
        client
            .batch_execute("COPY public.pgbench_accounts TO '/dev/null'")
            .await?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = self.cpu_settled().await.since(cpu0);
        Ok(Measured {
            wall,
            cpu,
            units: self.accounts_rows as f64,
            check: Check::NotApplicable,
            note: "read floor: pgbench_accounts only, no client".into(),
            applied: None,
        })
    }

    async fn copy_floor_client(&self, rep: usize) -> Result<Measured> {
        let db = format!("copy_floor_{rep}");
        self.fresh_db(&db, Some(&self.schema_pre)).await?;
        let result = async {
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            let (a, b) = tokio::join!(
                self.copy_tables(&db, &TABLES[..1], rep, "a"),
                self.copy_tables(&db, &TABLES[1..], rep, "b")
            );
            a?;
            b?;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            let check = self.gate(&db).await?;
            Ok(Measured {
                wall,
                cpu,
                units: self.source_rows as f64,
                check,
                note: "accounts in one stream, the other tables in the other".into(),
                applied: None,
            })
        }
        .await;
        self.drop_db(&db).await;
        result
    }

    /// `psql COPY TO STDOUT | psql COPY FROM STDIN`, one table after the other.
    async fn copy_tables(&self, db: &str, tables: &[&str], rep: usize, stream: &str) -> Result<()> {
        for t in tables {
            let log = self
                .work
                .path()
                .join(format!("floor-{rep}-{stream}-{t}.log"));
            let out_sql = format!("COPY public.{t} TO STDOUT");
            let in_sql = format!("COPY public.{t} FROM STDIN");
            let src_url = self.src.url(SOURCE_DB);
            self.pipe(
                |c| {
                    c.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &src_url, "-c"])
                        .arg(&out_sql);
                },
                "psql",
                &[
                    "-X",
                    "-q",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-d",
                    &self.dst.url(db),
                    "-c",
                    &in_sql,
                ],
                &log,
            )
            .await?;
        }
        Ok(())
    }

    // ----- catch-up tools -----

    /// `cutover run` draining a backlog; with `mapped`, `pgbench_accounts` goes through
    /// `[table.columns]` (see [`Bench::write_job`]).
    /// `variant`: [`OURS`], [`OURS_MAPPED`], [`OURS_TWO_SESSIONS`] or [`OURS_OTHER_BUILD`].
    async fn catchup_ours(&self, rep: usize, variant: &str) -> Result<Measured> {
        let mapped = variant == OURS_MAPPED;
        let tag = match variant {
            OURS_MAPPED => "map",
            OURS_TWO_SESSIONS => "two",
            OURS_OTHER_BUILD => "other",
            _ => "",
        };
        let (db, name, slot) = (
            format!("catchup_ours{tag}_{rep}"),
            format!("bcatch{tag}-{rep}"),
            format!("cutover_bcatch{tag}_{rep}"),
        );
        self.catchup_target_db(&db).await?;
        let result = async {
            let target_keys = if variant == OURS_TWO_SESSIONS {
                "apply_sessions = 2\n"
            } else {
                ""
            };
            let (job, api) =
                self.write_job_verifying(&name, &db, mapped, NO_VERIFY, true, target_keys)?;
            // The job exists: slot created, snapshot copied, then the daemon stopped.
            let bin = match (variant, &self.compare_bin) {
                (OURS_OTHER_BUILD, Some(other)) => other.as_path(),
                _ => self.cutover_bin.as_path(),
            };
            let mut daemon = self.spawn_daemon_of(bin, &job, &api, &format!("{name}-setup.log"))?;
            let ready = wait_status(&mut daemon, RUN_TIMEOUT, |s| {
                all_snapshot_done(s) && s["phase"] == "streaming"
            })
            .await;
            terminate(daemon).await?;
            ready?;
            self.wait_slot_inactive(&slot).await?;
            let backlog = self.backlog().await?;

            let source = self.src.connect(SOURCE_DB).await?;
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            let mut daemon = self.spawn_daemon_of(bin, &job, &api, &format!("{name}.log"))?;
            let api_addr = daemon.api.clone();
            let drained = wait_slot_at(
                &source,
                &slot,
                &backlog.end_lsn,
                t0,
                Some(&api_addr),
                || daemon_alive(&mut daemon),
            )
            .await;
            let wall = t0.elapsed().as_secs_f64();
            let (connected, applied) = drained
                .as_ref()
                .map_or((0.0, None), |d| (d.connected, d.applied));
            let (cpu, check) = self
                .gate_then_stop(&db, daemon, cpu0, drained.map(|_| ()))
                .await?;
            Ok(Measured {
                wall,
                cpu,
                units: backlog.txns,
                check,
                note: format!(
                    "{}{}; wall includes process start; slot active after {connected:.2} s, \
                     status applied_lsn at the end after {} s",
                    if mapped {
                        format!(
                            "{MAPPED_TABLE} mapped (where {MAPPED_WHERE}, {} = {}), \
                             its changes evaluated on the source; ",
                            MAPPED_COLUMN.0, MAPPED_COLUMN.1
                        )
                    } else {
                        String::new()
                    },
                    backlog.note(),
                    applied.map_or("?".to_owned(), |a| format!("{a:.2}"))
                ),
                applied,
            })
        }
        .await;
        self.drop_job_objects(&name).await;
        self.drop_db(&db).await;
        result
    }

    async fn catchup_native(&self, rep: usize) -> Result<Measured> {
        let db = format!("catchup_native_{rep}");
        let sub = format!("bench_sub_catchup_{rep}");
        self.catchup_target_db(&db).await?;
        let result = async {
            let target = self.dst.connect(&db).await?;
            target
                .batch_execute(&self.create_subscription_sql(&sub, self.catchup_socket))
                .await
                .context("CREATE SUBSCRIPTION")?;
            wait_subscription_ready(&target, &sub, RUN_TIMEOUT).await?;
            target
                .batch_execute(&format!("ALTER SUBSCRIPTION {sub} DISABLE"))
                .await?;
            self.wait_slot_inactive(&sub).await?;
            let backlog = self.backlog().await?;

            let source = self.src.connect(SOURCE_DB).await?;
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            target
                .batch_execute(&format!("ALTER SUBSCRIPTION {sub} ENABLE"))
                .await?;
            let connected = wait_slot_at(&source, &sub, &backlog.end_lsn, t0, None, || true)
                .await?
                .connected;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            // Gate with the subscription still there: what was applied when the clock stopped.
            let check = self.gate(&db).await?;
            target
                .batch_execute(&format!("DROP SUBSCRIPTION {sub}"))
                .await?;
            Ok(Measured {
                wall,
                cpu,
                units: backlog.txns,
                check,
                note: format!(
                    "{}; slot active after {connected:.2} s; apply CPU is in the servers'",
                    backlog.note()
                ),
                applied: None,
            })
        }
        .await;
        if result.is_err() {
            let _ = self
                .dst
                .execute(&db, &format!("DROP SUBSCRIPTION IF EXISTS {sub}"))
                .await;
        }
        self.drop_db(&db).await;
        result
    }

    async fn catchup_floor(&self, rep: usize) -> Result<Measured> {
        let slot = format!("bench_floor_{rep}");
        let result = async {
            let source = self.src.connect(SOURCE_DB).await?;
            source
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await
                .context("create the floor's slot")?;
            let backlog = self.backlog().await?;
            let mut cmd = self.tool("pg_recvlogical");
            cmd.args(["-d", &self.catchup_source_url(), "-S", &slot, "--start"])
                .args(["-E", &backlog.end_lsn, "-o", "proto_version=1"])
                .args(["-o", &format!("publication_names={PUBLICATION}")])
                .args(["-F", "0", "-n", "-f", "/dev/null"]);
            let cpu0 = self.cpu();
            let t0 = Instant::now();
            tokio::time::timeout(RUN_TIMEOUT, run(cmd, "pg_recvlogical"))
                .await
                .map_err(|_| anyhow!("pg_recvlogical did not finish in {RUN_TIMEOUT:?}"))??;
            let wall = t0.elapsed().as_secs_f64();
            let cpu = self.cpu_settled().await.since(cpu0);
            Ok(Measured {
                wall,
                cpu,
                units: backlog.txns,
                check: Check::NotApplicable,
                note: format!("{}; decode + send only, no apply", backlog.note()),
                applied: None,
            })
        }
        .await;
        if let Err(e) = self.drop_slot(&slot).await {
            eprintln!("cutover-bench: drop slot {slot}: {e:#}");
        }
        result
    }

    // ----- verify tools -----

    /// The verify scenarios' databases: the source `pgbench_accounts` (at `scale`), an
    /// identical copy on the target, a second copy with the drift planted, and a job file
    /// for each pair. Untimed; ends with the copy checked identical by count and row hashes
    /// (which also brings all three tables into the cache).
    async fn verify_setup(&self, scale: u32) -> Result<VerifySetup> {
        let source_db = if scale == self.scale {
            SOURCE_DB
        } else {
            VERIFY_SOURCE_DB
        };
        if source_db != SOURCE_DB {
            eprintln!("cutover-bench: pgbench -i -s {scale} (verify source)");
            self.src
                .execute(
                    "postgres",
                    &format!("DROP DATABASE IF EXISTS {VERIFY_SOURCE_DB} WITH (FORCE)"),
                )
                .await?;
            self.src.create_database(VERIFY_SOURCE_DB).await?;
            let mut init = self.tool("pgbench");
            init.args(["-i", "-q", "-s", &scale.to_string()])
                .args(self.src_conn_args())
                .arg(VERIFY_SOURCE_DB);
            run(init, "pgbench -i (verify source)").await?;
        }
        eprintln!(
            "cutover-bench: verify setup: {VERIFY_TABLE} copied into {VERIFY_SAME_DB} and {VERIFY_DRIFT_DB}, drift planted in {VERIFY_DRIFT_DB}"
        );
        self.fresh_db(VERIFY_SAME_DB, None).await?;
        let table_arg = format!("public.{VERIFY_TABLE}");
        let src_url = self.src.url(source_db);
        self.pipe(
            |c| {
                c.args(["-t", &table_arg, "-d", &src_url]);
            },
            "pg_dump",
            &[
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.dst.url(VERIFY_SAME_DB),
            ],
            &self.work.path().join("verify-copy.log"),
        )
        .await?;
        self.dst
            .execute(
                "postgres",
                &format!("DROP DATABASE IF EXISTS {VERIFY_DRIFT_DB} WITH (FORCE)"),
            )
            .await?;
        self.dst
            .execute(
                "postgres",
                &format!("CREATE DATABASE {VERIFY_DRIFT_DB} TEMPLATE {VERIFY_SAME_DB}"),
            )
            .await?;

        let source = self.src.connect(source_db).await?;
        let row = source
            .query_one(
                &format!("SELECT count(*), coalesce(max(aid), 0)::int8 FROM public.{VERIFY_TABLE}"),
                &[],
            )
            .await?;
        let (rows, max_aid): (i64, i64) = (row.get(0), row.get(1));
        let drift = Drift::plan(max_aid)?;
        let target = self.dst.connect(VERIFY_DRIFT_DB).await?;
        let keys = |set: &BTreeSet<i64>| set.iter().copied().collect::<Vec<i64>>();
        let planted = [
            (
                format!(
                    "UPDATE public.{VERIFY_TABLE} SET abalance = abalance + 1 WHERE aid = ANY($1::int8[])"
                ),
                keys(&drift.different),
            ),
            (
                format!("DELETE FROM public.{VERIFY_TABLE} WHERE aid = ANY($1::int8[])"),
                keys(&drift.missing),
            ),
            (
                format!(
                    "INSERT INTO public.{VERIFY_TABLE} (aid, bid, abalance, filler) \
                     SELECT k, 1, 0, 'planted by cutover-bench' FROM unnest($1::int8[]) k"
                ),
                keys(&drift.extra),
            ),
        ];
        for (sql, keys) in &planted {
            let n = target
                .execute(sql.as_str(), &[keys])
                .await
                .with_context(|| format!("plant the drift: {sql}"))?;
            if n != keys.len() as u64 {
                bail!(
                    "plant the drift: {sql} touched {n} rows, not {}",
                    keys.len()
                );
            }
        }
        drop(target);
        for db in [VERIFY_SAME_DB, VERIFY_DRIFT_DB] {
            self.dst.execute(db, "VACUUM ANALYZE").await?;
        }
        if source_db != SOURCE_DB {
            self.src.execute(source_db, "VACUUM ANALYZE").await?;
        }

        let sql = format!(
            "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0)::text FROM public.{VERIFY_TABLE} t"
        );
        let (same, drifted) = tokio::try_join!(
            self.dst.connect(VERIFY_SAME_DB),
            self.dst.connect(VERIFY_DRIFT_DB)
        )?;
        let (a, b, c) = tokio::join!(
            source.query_one(&sql, &[]),
            same.query_one(&sql, &[]),
            drifted.query_one(&sql, &[])
        );
        let digest = |r: tokio_postgres::Row| (r.get::<_, i64>(0), r.get::<_, String>(1));
        let (a, b, c) = (digest(a?), digest(b?), digest(c?));
        if a != b {
            bail!("the copy in {VERIFY_SAME_DB} is not identical to the source: {a:?} vs {b:?}");
        }
        if a == c {
            bail!("the drift planted in {VERIFY_DRIFT_DB} does not show in count or row hashes");
        }
        Ok(VerifySetup {
            same_job: self.write_verify_job("bverify-same", source_db, VERIFY_SAME_DB)?,
            drift_job: self.write_verify_job("bverify-drift", source_db, VERIFY_DRIFT_DB)?,
            source_db: source_db.to_owned(),
            rows: u64::try_from(rows).unwrap_or(0),
            drift,
        })
    }

    async fn verify_cleanup(&self, scale: u32) {
        self.drop_db(VERIFY_SAME_DB).await;
        self.drop_db(VERIFY_DRIFT_DB).await;
        if scale != self.scale
            && let Err(e) = self
                .src
                .execute(
                    "postgres",
                    &format!("DROP DATABASE IF EXISTS {VERIFY_SOURCE_DB} WITH (FORCE)"),
                )
                .await
        {
            eprintln!("cutover-bench: drop database {VERIFY_SOURCE_DB}: {e:#}");
        }
    }

    /// `cutover verify JOB.toml --json` with no daemon running: it compares the databases as
    /// they stand. Gate: its exit code, `equal` and the listed keys against the planted drift.
    async fn verify_ours(&self, job: &Path, expected: &Drift, rows: u64) -> Result<Measured> {
        let mut cmd = Command::new(&self.cutover_bin);
        self.prepare(&mut cmd);
        cmd.arg("verify").arg(job).arg("--json");
        let cpu0 = self.cpu();
        let t0 = Instant::now();
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("cutover verify did not finish in {RUN_TIMEOUT:?}"))?
            .context("spawn cutover verify")?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = self.cpu_settled().await.since(cpu0);
        let code = out.status.code();
        if !matches!(code, Some(0 | 1)) {
            bail!(
                "cutover verify failed ({}): {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 8)
            );
        }
        let report: cutover_verifier::report::VerifyReport = serde_json::from_slice(&out.stdout)
            .with_context(|| {
                format!(
                    "cutover verify --json printed no report: {}",
                    last_lines(&String::from_utf8_lossy(&out.stdout), 4)
                )
            })?;
        let name = format!("public.{VERIFY_TABLE}");
        let table = report
            .tables
            .iter()
            .find(|t| t.source == name)
            .ok_or_else(|| anyhow!("cutover verify --json has no entry for {name}"))?;
        let mut found = Found::default();
        for d in &table.differences {
            let key = d
                .key
                .0
                .first()
                .and_then(|(_, v)| v.as_deref())
                .and_then(|v| v.parse::<i64>().ok())
                .ok_or_else(|| anyhow!("a difference without an integer aid: {:?}", d.key))?;
            use cutover_verifier::report::DifferenceKind;
            match d.kind {
                DifferenceKind::Different => found.different.insert(key),
                DifferenceKind::Missing => found.missing.insert(key),
                DifferenceKind::Extra => found.extra.insert(key),
            };
        }
        let mut problems = expected.judge(&found);
        let want_equal = expected.total() == 0;
        if report.equal != want_equal || table.equal != want_equal {
            problems.push(format!(
                "equal: {} (table: {}), expected {want_equal}",
                report.equal, table.equal
            ));
        }
        if code != Some(if want_equal { 0 } else { 1 }) {
            problems.push(format!("exit code {code:?}"));
        }
        if table.differences_total != expected.total() as u64
            || table.differences.len() != expected.total()
        {
            problems.push(format!(
                "differences_total {}, {} listed, expected {}",
                table.differences_total,
                table.differences.len(),
                expected.total()
            ));
        }
        if want_equal && table.rows_compared != rows {
            problems.push(format!(
                "rows_compared {}, the source has {rows}",
                table.rows_compared
            ));
        }
        Ok(Measured {
            wall,
            cpu,
            units: rows as f64,
            check: check_of(problems),
            note: format!(
                "no daemon (compared as the databases stand); {} rows compared, {} differences ({}); wall includes process start",
                table.rows_compared,
                table.differences_total,
                found.describe()
            ),
            applied: None,
        })
    }

    /// `reladiff` on the same pair of tables, keyed by `aid`, every column compared. Gate: its
    /// `-`/`+` rows, by distinct key, against the planted drift.
    async fn verify_reladiff(
        &self,
        source_db: &str,
        target_db: &str,
        expected: &Drift,
        rows: u64,
    ) -> Result<Measured> {
        let Some(reladiff) = &self.reladiff else {
            return Ok(skipped("reladiff is not installed"));
        };
        let mut cmd = Command::new(reladiff);
        self.prepare(&mut cmd);
        cmd.arg(self.src.url(source_db))
            .arg(VERIFY_TABLE)
            .arg(self.dst.url(target_db))
            .arg(VERIFY_TABLE)
            .args(reladiff_options());
        let cpu0 = self.cpu();
        let t0 = Instant::now();
        let out = tokio::time::timeout(RUN_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow!("reladiff did not finish in {RUN_TIMEOUT:?}"))?
            .context("spawn reladiff")?;
        let wall = t0.elapsed().as_secs_f64();
        let cpu = self.cpu_settled().await.since(cpu0);
        if !out.status.success() {
            bail!(
                "reladiff failed ({}): {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 8)
            );
        }
        // One JSON array a line: ["-" or "+", [aid, other columns...]]; "-" is a row only
        // in the first (source) table, "+" one only in the second (target).
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut signs: BTreeMap<i64, (bool, bool)> = BTreeMap::new();
        let mut lines = 0usize;
        for line in stdout.lines().filter(|l| !l.trim().is_empty()) {
            lines += 1;
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("reladiff printed a line that is not JSON: {line}"))?;
            let key = match &v[1][0] {
                serde_json::Value::String(s) => s.parse::<i64>().ok(),
                serde_json::Value::Number(n) => n.as_i64(),
                _ => None,
            }
            .ok_or_else(|| anyhow!("reladiff printed a row without an integer aid: {line}"))?;
            let entry = signs.entry(key).or_default();
            match v[0].as_str() {
                Some("-") => entry.0 = true,
                Some("+") => entry.1 = true,
                _ => bail!("reladiff printed a row that is neither - nor +: {line}"),
            }
        }
        let mut found = Found::default();
        for (key, pair) in signs {
            match pair {
                (true, true) => found.different.insert(key),
                (true, false) => found.missing.insert(key),
                _ => found.extra.insert(key),
            };
        }
        Ok(Measured {
            wall,
            cpu,
            units: rows as f64,
            check: check_of(expected.judge(&found)),
            note: format!(
                "reladiff {} (hashdiff across two databases); {lines} -/+ rows = {} keys ({}); wall includes Python start",
                reladiff_options().join(" "),
                found.total(),
                found.describe()
            ),
            applied: None,
        })
    }

    /// The floor: both tables streamed in key order (`COPY (SELECT * ... ORDER BY aid) TO
    /// STDOUT` through tokio-postgres), both sides in parallel, every byte into blake3.
    /// Nothing is compared but the final digests (noted, not gated). Its CPU is this
    /// program's own.
    async fn verify_floor(&self, source_db: &str, target_db: &str, rows: u64) -> Result<Measured> {
        let (source, target) =
            tokio::try_join!(self.src.connect(source_db), self.dst.connect(target_db))?;
        let sql = format!("COPY (SELECT * FROM public.{VERIFY_TABLE} ORDER BY aid) TO STDOUT");
        let cpu0 = self.cpu();
        let t0 = Instant::now();
        let a = tokio::spawn(hash_copy_out(source, sql.clone()));
        let b = tokio::spawn(hash_copy_out(target, sql));
        let (a, b) = tokio::time::timeout(RUN_TIMEOUT, async { tokio::join!(a, b) })
            .await
            .map_err(|_| anyhow!("the hash floor did not finish in {RUN_TIMEOUT:?}"))?;
        let (a, b) = (a??, b??);
        let wall = t0.elapsed().as_secs_f64();
        let end = self.cpu_settled().await;
        let mut cpu = end.since(cpu0);
        cpu.tool = end.own - cpu0.own;
        Ok(Measured {
            wall,
            cpu,
            units: rows as f64,
            check: Check::NotApplicable,
            note: format!(
                "{:.1} + {:.1} MB of COPY text hashed, digests {}; in-process, its CPU is this program's",
                a.0 as f64 / 1e6,
                b.0 as f64 / 1e6,
                if a.1 == b.1 { "equal" } else { "differ" }
            ),
            applied: None,
        })
    }

    /// A job file comparing `public.pgbench_accounts` of `source_db` with `target_db`'s.
    fn write_verify_job(&self, name: &str, source_db: &str, target_db: &str) -> Result<PathBuf> {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        // Nothing listens there: `cutover verify` finds no daemon and compares by itself.
        let port = std::net::TcpListener::bind((cutover::cluster::HOST, 0))?
            .local_addr()?
            .port();
        let text = format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\n\n[source]\nurl = \"{}\"\n\n[target]\nurl = \"{}\"\n\n\
             [[table]]\nsource = \"public.{VERIFY_TABLE}\"\n\n[verify]\nevery = \"0\"\n\n\
             [api]\nlisten = \"{}:{port}\"\n",
            dir.join("data").display(),
            self.src.url(source_db),
            self.dst.url(target_db),
            cutover::cluster::HOST
        );
        let path = dir.join("job.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    // ----- verify-load -----

    /// The verify-load job file: `[verify]` off, or passes back to back at the configured
    /// read cap.
    fn write_load_job(&self, verify: bool) -> Result<(PathBuf, String)> {
        let section = if verify {
            let mut section = format!(
                "every = \"{LOAD_PASS_EVERY}\"\nmax_rows_per_second = {}\n",
                self.load_verify_rows_per_second
            );
            if let Some(age) = &self.load_snapshot_max_age {
                let _ = writeln!(section, "snapshot_max_age = \"{age}\"");
            }
            section
        } else {
            "every = \"0\"\n".to_owned()
        };
        self.write_job_verifying(LOAD_JOB, LOAD_DB, false, &section, false, "")
    }

    /// A fresh target with the schema, and the job run until every table is copied and it
    /// streams; then its daemon is stopped (each variant starts its own).
    async fn verify_load_setup(&self) -> Result<()> {
        eprintln!(
            "cutover-bench: verify-load setup: job {LOAD_JOB} copying the pgbench tables into {LOAD_DB}"
        );
        self.fresh_db(LOAD_DB, Some(&self.schema_full)).await?;
        let (job, api) = self.write_load_job(false)?;
        let mut daemon = self.spawn_daemon(&job, &api, "setup.log")?;
        let ready = wait_status(&mut daemon, RUN_TIMEOUT, |s| {
            all_snapshot_done(s) && s["phase"] == "streaming"
        })
        .await;
        terminate(daemon).await?;
        ready?;
        self.wait_slot_inactive(LOAD_SLOT).await
    }

    /// One variant: the daemon started on the rewritten job and settled (streaming, lag at
    /// most a second, with verification a first pass finished), a checkpoint, then the
    /// timed pgbench load with the status and the source's verify connections sampled; then
    /// the wait until the job has caught up with the end of the load, the gate with the
    /// daemon still running, and SIGTERM.
    async fn verify_load_run(&self, rep: usize, verify: bool) -> Result<(Measured, LoadFigures)> {
        let (job, api) = self.write_load_job(verify)?;
        let log_name = format!("{}-{rep}.log", if verify { "verify" } else { "sync" });
        let source = self.src.connect(SOURCE_DB).await?;
        let mut daemon = self.spawn_daemon(&job, &api, &log_name)?;
        if self.load_pin
            && let Some(pid) = daemon.child.id()
        {
            pin(pid, "1");
        }
        let settled = async {
            wait_status(&mut daemon, RUN_TIMEOUT, |s| {
                all_snapshot_done(s)
                    && s["phase"] == "streaming"
                    && s["lag_seconds"].as_f64().is_some_and(|l| l <= 1.0)
            })
            .await?;
            if verify {
                wait_status(&mut daemon, RUN_TIMEOUT, |s| {
                    !s["last_verification"].is_null()
                })
                .await
                .context("wait for a first verification pass")?;
            }
            self.quiesce().await
        }
        .await;
        if let Err(e) = settled {
            let _ = terminate(daemon).await;
            return Err(e);
        }
        let measured = Box::pin(self.verify_load_measure(&source, &mut daemon, verify)).await;
        match measured {
            Ok((mut m, figures, check)) => {
                // The gate ran with the daemon up; its shutdown must be clean too.
                let stopped = terminate(daemon).await;
                if let Err(e) = stopped {
                    m.check = Check::Error(format!("{e:#}"));
                } else {
                    m.check = check;
                }
                Ok((m, figures))
            }
            Err(e) => {
                let _ = terminate(daemon).await;
                Err(e)
            }
        }
    }

    /// The timed part of [`Bench::verify_load_run`]: the load, the catch-up and the gate.
    async fn verify_load_measure(
        &self,
        source: &tokio_postgres::Client,
        daemon: &mut Daemon,
        verify: bool,
    ) -> Result<(Measured, LoadFigures, Check)> {
        let pid = daemon
            .child
            .id()
            .ok_or_else(|| anyhow!("cutover run has no pid"))?;
        let app = format!("cutover/{LOAD_JOB}/verify");
        let mut watch = LoadWatch::default();
        if let Some(s) = http_status(&daemon.api).await {
            watch.last_finished = s["last_verification"]["finished_at"]
                .as_str()
                .map(str::to_owned);
        }
        let log_start = file_len(&daemon.log);
        let mut cmd = if self.load_pin {
            // pgbench's threads start on CPU 0 with it.
            let mut cmd = Command::new("taskset");
            self.prepare(&mut cmd);
            cmd.args(["-c", "0"])
                .arg(self.pg_bin.join("pgbench"))
                .args(self.pgbench_load(self.load_secs).as_std().get_args());
            cmd
        } else {
            self.pgbench_load(self.load_secs)
        };
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let cpu0 = self.cpu();
        let daemon0 = process_ticks(pid);
        let t0 = Instant::now();
        let child = cmd.spawn().context("spawn pgbench (load)")?;
        let mut output = std::pin::pin!(child.wait_with_output());
        let out = loop {
            tokio::select! {
                out = &mut output => break out.context("pgbench (load)")?,
                () = tokio::time::sleep(LOAD_SAMPLE_EVERY) => {}
            }
            if t0.elapsed() > RUN_TIMEOUT {
                bail!("pgbench (load) did not finish in {RUN_TIMEOUT:?}");
            }
            watch.sample(&daemon.api, source, &app).await;
        };
        let load_end = Instant::now();
        let end_status = http_status(&daemon.api).await;
        let end_lsn: String = source
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let log_end = file_len(&daemon.log);
        let at_end = self.cpu_settled().await;
        let daemon1 = process_ticks(pid);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "pgbench (load) failed ({}): {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 8)
            );
        }
        if let Some(s) = &end_status {
            watch.observe(s);
        }
        let pgbench = PgbenchResult::parse(&stdout)?;

        // CPU over the load: the daemon from its own /proc entry (it is not reaped yet);
        // this program's reaped children over the window are pgbench alone.
        let mut cpu = at_end.since(cpu0);
        let pgbench_cpu = cpu.tool;
        let daemon_cpu = daemon1.saturating_sub(daemon0) as f64 / self.clk_tck;
        cpu.tool = daemon_cpu;
        cpu.other = (cpu.other - daemon_cpu).max(0.0);

        let passes = scan_pass_log(&read_range(&daemon.log, log_start, log_end));
        let api = daemon.api.clone();
        let drained = wait_slot_at(source, LOAD_SLOT, &end_lsn, load_end, Some(&api), || {
            daemon_alive(daemon)
        })
        .await
        .context("catch up with the end of the load")?;
        let caught_up = drained.applied.unwrap_or(drained.connected);
        let mut problems = Vec::new();
        match self.gate(LOAD_DB).await? {
            Check::Pass => {}
            Check::Fail(d) => problems.push(d),
            other => problems.push(other.label().to_owned()),
        }
        if passes.unequal > 0 {
            problems.push(format!(
                "{} verification passes during the load found differences: {}",
                passes.unequal,
                passes.differences.join(" | ")
            ));
        }
        if !passes.failed.is_empty() {
            problems.push(format!(
                "{} verification passes failed during the load: {}",
                passes.failed.len(),
                passes.failed.join(" | ")
            ));
        }
        if verify && passes.finished == 0 && watch.connected == 0 {
            problems.push(
                "no verification pass finished or was seen running on the source during the load"
                    .to_owned(),
            );
        }
        if !verify && passes.finished > 0 {
            problems.push(format!(
                "{} verification passes finished although [verify] every = \"0\"",
                passes.finished
            ));
        }
        let lag_end = end_status.as_ref().and_then(|s| s["lag_seconds"].as_f64());
        let lag_end_bytes = end_status.as_ref().and_then(|s| s["lag_bytes"].as_u64());
        let figures = LoadFigures {
            tps: pgbench.tps,
            passes: passes.finished,
            pass_seconds: (!passes.seconds.is_empty()).then(|| median(passes.seconds.clone())),
            lag_end,
            lag_max: watch.max_lag,
            caught_up,
            pgbench_cpu,
            verify_open: watch.fraction(watch.connected),
        };
        let shown = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
        let mut note = format!(
            "tps {:.1} (excl. connecting), {} txns, {} failed; ",
            pgbench.tps, pgbench.txns, pgbench.failed
        );
        if verify {
            let _ = write!(
                note,
                "every \"{LOAD_PASS_EVERY}\", max_rows_per_second {}, snapshot_max_age {}{}; {} passes finished in the load (status saw {}), median {} s{}; verify connection open on the source in {:.0}% of samples, query active in {:.0}%; ",
                self.load_verify_rows_per_second,
                self.load_snapshot_max_age.as_deref().unwrap_or("default"),
                if self.load_pin {
                    ", source + pgbench pinned to CPU 0, daemon + target to CPU 1"
                } else {
                    ""
                },
                passes.finished,
                watch.passes_seen,
                shown(figures.pass_seconds),
                if passes.rounds_failed > 0 {
                    format!("; {} re-verification rounds failed", passes.rounds_failed)
                } else {
                    String::new()
                },
                100.0 * watch.fraction(watch.connected),
                100.0 * watch.fraction(watch.active)
            );
        } else {
            let _ = write!(
                note,
                "every \"0\" (changed keys still re-verified); verify connection open on the source in {:.0}% of samples; ",
                100.0 * watch.fraction(watch.connected)
            );
        }
        let _ = write!(
            note,
            "lag at the end {} s ({}), max {} s; caught up in {caught_up:.2} s; pgbench CPU {pgbench_cpu:.2} s",
            shown(lag_end),
            lag_end_bytes.map_or("? bytes".to_owned(), |b| format!(
                "{:.1} MB",
                b as f64 / 1e6
            )),
            shown(watch.max_lag)
        );
        let measured = Measured {
            wall: if pgbench.tps > 0.0 {
                pgbench.txns / pgbench.tps
            } else {
                0.0
            },
            applied: None,
            cpu,
            units: pgbench.txns,
            check: Check::NotApplicable,
            note,
        };
        Ok((measured, figures, check_of(problems)))
    }

    // ----- helpers -----

    /// After `cutover run` stopped the clock: the correctness gate with the daemon still
    /// running (so it checks what was applied when the clock stopped, not what a shutdown
    /// finished later), then SIGTERM. Server CPU is counted up to the clock stop, the
    /// daemon's own CPU including its shutdown.
    async fn gate_then_stop(
        &self,
        db: &str,
        daemon: Daemon,
        cpu0: CpuSnap,
        waited: Result<()>,
    ) -> Result<(CpuDelta, Check)> {
        let at_stop = self.cpu_settled().await;
        let check = match &waited {
            Ok(()) => Some(self.gate(db).await),
            Err(_) => None,
        };
        let stopped = terminate(daemon).await;
        let exited = self.cpu();
        waited?;
        stopped?;
        let check = check.ok_or_else(|| anyhow!("no gate was run"))??;
        let mut cpu = at_stop.since(cpu0);
        cpu.tool = exited.since(cpu0).tool;
        // The daemon was still running at `at_stop`, so its CPU counted as "other" there.
        cpu.other = (cpu.other - cpu.tool).max(0.0);
        Ok((cpu, check))
    }

    /// A PostgreSQL client tool from the server's bin directory, isolated from PG* variables.
    /// `pgbench -c 4 -j 2 -n -T secs` against the source database.
    fn pgbench_load(&self, secs: u32) -> Command {
        let mut cmd = self.tool("pgbench");
        cmd.args(["-c", "4", "-j", "2", "-n", "-T", &secs.to_string()])
            .args(self.src_conn_args())
            .arg(SOURCE_DB);
        cmd
    }

    /// Pin each server with every process it has to a CPU list (`("0", "1")`: source,
    /// target); `None`: back to every CPU. New backends inherit it from the postmaster.
    fn pin_servers(&self, cpus: Option<(&str, &str)>) {
        let all = format!(
            "0-{}",
            std::thread::available_parallelism().map_or(1, |n| n.get()) - 1
        );
        let (src, dst) = cpus.unwrap_or((&all, &all));
        for (cluster, list) in [(&self.src, src), (&self.dst, dst)] {
            if let Some(postmaster) = cluster.pid() {
                pin(postmaster, list);
                for child in children(postmaster) {
                    pin(child, list);
                }
            }
        }
    }

    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.pg_bin.join(name));
        self.prepare(&mut cmd);
        cmd
    }

    fn prepare(&self, cmd: &mut Command) {
        cmd.env("PATH", &self.path_env)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for v in PG_ENV {
            cmd.env_remove(v);
        }
    }

    fn src_conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            cutover::cluster::HOST.into(),
            "-p".into(),
            self.src.port().to_string(),
            "-U".into(),
            cutover::cluster::SUPERUSER.into(),
        ]
    }

    /// `<first> | psql <psql_args>`, both waited for; stderr of both into `log`.
    async fn pipe(
        &self,
        first_args: impl FnOnce(&mut Command),
        first: &str,
        psql_args: &[&str],
        log: &Path,
    ) -> Result<()> {
        let file = std::fs::File::create(log)?;
        let mut producer = self.tool(first);
        first_args(&mut producer);
        producer
            .stdout(Stdio::piped())
            .stderr(Stdio::from(file.try_clone()?));
        let mut producer = producer.spawn().with_context(|| format!("spawn {first}"))?;
        let stdout: Stdio = producer
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{first} has no stdout"))?
            .try_into()?;
        let mut consumer = self.tool("psql");
        consumer
            .args(psql_args)
            .stdin(stdout)
            .stdout(Stdio::null())
            .stderr(Stdio::from(file));
        let mut consumer = consumer.spawn().context("spawn psql")?;
        let both = async { tokio::join!(producer.wait(), consumer.wait()) };
        let (a, b) = tokio::time::timeout(RUN_TIMEOUT, both)
            .await
            .map_err(|_| anyhow!("{first} | psql did not finish in {RUN_TIMEOUT:?}"))?;
        let (a, b) = (a?, b?);
        if !a.success() || !b.success() {
            bail!(
                "{first} ({a}) | psql ({b}) failed: {}",
                last_lines(&std::fs::read_to_string(log).unwrap_or_default(), 8)
            );
        }
        Ok(())
    }

    /// [`Bench::cpu`] after a pause, so server processes that end with the tool's
    /// connections (walsenders, backends) have exited and been counted.
    async fn cpu_settled(&self) -> CpuSnap {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.cpu()
    }

    fn cpu(&self) -> CpuSnap {
        let machine = machine_busy_ticks();
        let me = proc_stat(std::process::id());
        let children = me.as_ref().map_or(0, |s| s.cutime + s.cstime);
        let own = me.as_ref().map_or(0, |s| s.utime + s.stime);
        let ticks = |c: &Cluster| c.pid().map_or(0, server_ticks) as f64 / self.clk_tck;
        CpuSnap {
            children: children as f64 / self.clk_tck,
            src: ticks(&self.src),
            dst: ticks(&self.dst),
            own: own as f64 / self.clk_tck,
            machine: machine as f64 / self.clk_tck,
        }
    }

    /// A checkpoint on both servers, so no timed run pays for the previous one's dirty pages.
    async fn quiesce(&self) -> Result<()> {
        let (a, b) = tokio::join!(
            self.src.execute(SOURCE_DB, "CHECKPOINT"),
            self.dst.execute("postgres", "CHECKPOINT")
        );
        a?;
        b?;
        Ok(())
    }

    async fn fresh_db(&self, name: &str, schema: Option<&Path>) -> Result<()> {
        self.dst
            .execute(
                "postgres",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await?;
        self.dst.create_database(name).await?;
        if let Some(file) = schema {
            let mut cmd = self.tool("psql");
            cmd.args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &self.dst.url(name),
            ])
            .arg("-f")
            .arg(file);
            run(cmd, "psql (create the schema)").await?;
        }
        Ok(())
    }

    /// A catch-up target: the schema, and with `--catchup-target-index` the extra index.
    async fn catchup_target_db(&self, name: &str) -> Result<()> {
        self.fresh_db(name, Some(&self.schema_full)).await?;
        if self.catchup_target_index {
            self.dst
                .execute(
                    name,
                    "CREATE INDEX bench_accounts_bid_abalance ON public.pgbench_accounts (bid, abalance)",
                )
                .await?;
        }
        Ok(())
    }

    async fn drop_db(&self, name: &str) {
        if let Err(e) = self
            .dst
            .execute(
                "postgres",
                &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            )
            .await
        {
            eprintln!("cutover-bench: drop database {name}: {e:#}");
        }
    }

    async fn create_publication(&self) -> Result<()> {
        let list: Vec<String> = TABLES.iter().map(|t| format!("public.{t}")).collect();
        self.src
            .execute(
                SOURCE_DB,
                &format!(
                    "DROP PUBLICATION IF EXISTS {PUBLICATION}; CREATE PUBLICATION {PUBLICATION} FOR TABLE {}",
                    list.join(", ")
                ),
            )
            .await?;
        Ok(())
    }

    /// `socket`: connect over the source's unix socket (see `--catchup-socket`).
    fn create_subscription_sql(&self, sub: &str, socket: bool) -> String {
        let host = if socket {
            self.src.socket_dir().display().to_string()
        } else {
            cutover::cluster::HOST.to_owned()
        };
        format!(
            "CREATE SUBSCRIPTION {sub} CONNECTION 'host={host} port={} user={} dbname={SOURCE_DB}' \
             PUBLICATION {PUBLICATION} WITH (copy_data = true)",
            self.src.port(),
            cutover::cluster::SUPERUSER
        )
    }

    /// The URL catch-up consumers read [`SOURCE_DB`] with: TCP, or the unix socket with
    /// `--catchup-socket`.
    fn catchup_source_url(&self) -> String {
        if self.catchup_socket {
            format!(
                "postgresql://{}@/{SOURCE_DB}?host={}&port={}",
                cutover::cluster::SUPERUSER,
                self.src.socket_dir().display(),
                self.src.port()
            )
        } else {
            self.src.url(SOURCE_DB)
        }
    }

    /// Gate: every pgbench table equal on both sides by count and sum of row hashes.
    async fn gate(&self, db: &str) -> Result<Check> {
        let source = self.src.connect(SOURCE_DB).await?;
        let target = self.dst.connect(db).await?;
        let mut bad = Vec::new();
        for t in TABLES {
            let sql = format!(
                "SELECT count(*), coalesce(sum(hashtext(t::text)::bigint), 0)::text FROM public.{t} t"
            );
            let (a, b) = tokio::join!(source.query_one(&sql, &[]), target.query_one(&sql, &[]));
            let (a, b) = (
                a.with_context(|| format!("gate on the source, {t}"))?,
                b.with_context(|| format!("gate on the target, {t}"))?,
            );
            let a: (i64, String) = (a.get(0), a.get(1));
            let b: (i64, String) = (b.get(0), b.get(1));
            if a != b {
                bad.push(format!(
                    "{t}: source {} rows (hash {}), target {} rows (hash {})",
                    a.0, a.1, b.0, b.1
                ));
            }
        }
        Ok(if bad.is_empty() {
            Check::Pass
        } else {
            Check::Fail(bad.join("; "))
        })
    }

    /// A job file copying every pgbench table into `target_db`. With `mapped`,
    /// `pgbench_accounts` gets a key filter and a column expression that keep its rows
    /// identical but make every change go through the source-side evaluation of the mapping.
    fn write_job(&self, name: &str, target_db: &str, mapped: bool) -> Result<(PathBuf, String)> {
        self.write_job_verifying(name, target_db, mapped, NO_VERIFY, false, "")
    }

    /// [`Bench::write_job`] with `verify` as the body of its `[verify]` section; a
    /// `catchup` job reads the source as [`Bench::catchup_source_url`] says. Rewriting
    /// the file of an existing job keeps its name and data directory (so its slot), with a
    /// new API port.
    fn write_job_verifying(
        &self,
        name: &str,
        target_db: &str,
        mapped: bool,
        verify: &str,
        catchup: bool,
        target_keys: &str,
    ) -> Result<(PathBuf, String)> {
        let dir = self.work.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind((cutover::cluster::HOST, 0))?
            .local_addr()?
            .port();
        let api = format!("{}:{port}", cutover::cluster::HOST);
        let mut text = format!(
            "name = \"{name}\"\ndata_dir = \"{}\"\n\n[source]\nurl = \"{}\"\n\n[target]\nurl = \"{}\"\n{target_keys}\n",
            dir.join("data").display(),
            if catchup {
                self.catchup_source_url()
            } else {
                self.src.url(SOURCE_DB)
            },
            self.dst.url(target_db)
        );
        for t in TABLES {
            let _ = write!(text, "[[table]]\nsource = \"public.{t}\"\n");
            if mapped && t == MAPPED_TABLE {
                let _ = write!(
                    text,
                    "where = \"{MAPPED_WHERE}\"\n\n[table.columns]\n{} = \"{}\"\n",
                    MAPPED_COLUMN.0, MAPPED_COLUMN.1
                );
            }
            text.push('\n');
        }
        let _ = write!(
            text,
            "[snapshot]\nparallelism = 4\n\n[verify]\n{verify}\n[api]\nlisten = \"{api}\"\n"
        );
        let path = dir.join("job.toml");
        std::fs::write(&path, text)?;
        Ok((path, api))
    }

    fn spawn_daemon(&self, job: &Path, api: &str, log_name: &str) -> Result<Daemon> {
        self.spawn_daemon_of(&self.cutover_bin, job, api, log_name)
    }

    /// [`Bench::spawn_daemon`] with the `cutover` binary `bin`.
    fn spawn_daemon_of(&self, bin: &Path, job: &Path, api: &str, log_name: &str) -> Result<Daemon> {
        let log = job
            .parent()
            .ok_or_else(|| anyhow!("job file has no directory"))?
            .join(log_name);
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(bin);
        self.prepare(&mut cmd);
        cmd.arg("run")
            .arg(job)
            .stdout(Stdio::from(file.try_clone()?))
            .stderr(Stdio::from(file));
        let child = cmd.spawn().context("spawn cutover run")?;
        Ok(Daemon {
            child,
            api: api.to_owned(),
            log,
        })
    }

    /// Drops the slot and publication a cutover job made on the source.
    async fn drop_job_objects(&self, job: &str) {
        let object = format!("cutover_{}", job.replace('-', "_"));
        if let Err(e) = self.drop_slot(&object).await {
            eprintln!("cutover-bench: drop slot {object}: {e:#}");
        }
        let _ = self
            .src
            .execute(SOURCE_DB, &format!("DROP PUBLICATION IF EXISTS {object}"))
            .await;
    }

    async fn drop_slot(&self, slot: &str) -> Result<()> {
        let client = self.src.connect(SOURCE_DB).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let row = client
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            match row {
                None => return Ok(()),
                Some(r) if !r.get::<_, bool>(0) => {
                    client
                        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                        .await?;
                    return Ok(());
                }
                Some(_) if Instant::now() > deadline => bail!("slot {slot} stays active"),
                Some(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    async fn wait_slot_inactive(&self, slot: &str) -> Result<()> {
        let client = self.src.connect(SOURCE_DB).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let active: Option<bool> = client
                .query_opt(
                    "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?
                .map(|r| r.get(0));
            match active {
                None => bail!("slot {slot} does not exist"),
                Some(false) => return Ok(()),
                Some(true) if Instant::now() > deadline => bail!("slot {slot} stays active"),
                Some(true) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Runs the pgbench load that makes up one backlog.
    async fn backlog(&self) -> Result<Backlog> {
        let client = self.src.connect(SOURCE_DB).await?;
        // Every backlog starts at a checkpoint, so each writes a full-page image of every
        // page it changes first, whatever the run's setup did before it. Without it the
        // WAL to decode differed between tools of one run (cutover's backlogs 68-340 MB,
        // native's 304-309 MB, for the same 90-100 k transactions).
        client.batch_execute("CHECKPOINT").await?;
        let start: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let cmd = self.pgbench_load(self.backlog_secs);
        let out = run(cmd, "pgbench (backlog)").await?;
        let txns = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow!("pgbench printed no transaction count:\n{out}"))?;
        let end: String = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let wal_bytes: i64 = client
            .query_one(
                "SELECT pg_wal_lsn_diff($1::text::pg_lsn, $2::text::pg_lsn)::int8",
                &[&end, &start],
            )
            .await?
            .get(0);
        Ok(Backlog {
            txns,
            end_lsn: end,
            wal_bytes,
        })
    }
}

struct Backlog {
    txns: f64,
    end_lsn: String,
    wal_bytes: i64,
}

impl Backlog {
    fn note(&self) -> String {
        format!(
            "backlog {} txns, {:.0} MB WAL",
            self.txns,
            self.wal_bytes as f64 / 1e6
        )
    }
}

/// What one verify-load variant observed, for the headline.
#[derive(Clone, Debug)]
struct LoadFigures {
    tps: f64,
    /// Verification passes that finished during the load (from the daemon's log).
    passes: usize,
    /// Median seconds of those passes, as the daemon logged them.
    pass_seconds: Option<f64>,
    /// The status's `lag_seconds` right after pgbench ended.
    lag_end: Option<f64>,
    /// The largest `lag_seconds` the status showed during the load.
    lag_max: Option<f64>,
    /// Seconds from the end of the load until the job had applied it.
    caught_up: f64,
    pgbench_cpu: f64,
    /// Share of the samples in which a verify connection was open on the source.
    verify_open: f64,
}

/// The status and the source's verify connections, sampled during the load.
#[derive(Default)]
struct LoadWatch {
    /// Samples of `pg_stat_activity` taken.
    samples: usize,
    /// ... with a verify connection of the job open (a pass or a round in progress).
    connected: usize,
    /// ... with a verify query running.
    active: usize,
    max_lag: Option<f64>,
    last_finished: Option<String>,
    /// Changes of `last_verification.finished_at` seen.
    passes_seen: usize,
}

impl LoadWatch {
    async fn sample(&mut self, api: &str, source: &tokio_postgres::Client, app: &str) {
        if let Some(s) = http_status(api).await {
            self.observe(&s);
        }
        if let Ok(row) = source
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE state = 'active') FROM pg_stat_activity \
                 WHERE application_name = $1 AND backend_type = 'client backend'",
                &[&app],
            )
            .await
        {
            self.samples += 1;
            if row.get::<_, i64>(0) > 0 {
                self.connected += 1;
            }
            if row.get::<_, i64>(1) > 0 {
                self.active += 1;
            }
        }
    }

    fn observe(&mut self, s: &serde_json::Value) {
        if let Some(l) = s["lag_seconds"].as_f64() {
            self.max_lag = Some(self.max_lag.map_or(l, |m| m.max(l)));
        }
        let finished = s["last_verification"]["finished_at"]
            .as_str()
            .map(str::to_owned);
        if finished.is_some() && finished != self.last_finished {
            self.passes_seen += 1;
            self.last_finished = finished;
        }
    }

    fn fraction(&self, n: usize) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            n as f64 / self.samples as f64
        }
    }
}

/// What pgbench printed about a run.
struct PgbenchResult {
    txns: f64,
    failed: f64,
    /// `tps = ... (without initial connection time)`.
    tps: f64,
}

impl PgbenchResult {
    fn parse(out: &str) -> Result<PgbenchResult> {
        let txns = out
            .lines()
            .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
            .and_then(|v| v.split('/').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .ok_or_else(|| anyhow!("pgbench printed no transaction count:\n{out}"))?;
        let failed = out
            .lines()
            .find_map(|l| l.strip_prefix("number of failed transactions:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let tps = out
            .lines()
            .filter(|l| l.contains("without initial connection time"))
            .find_map(|l| l.trim().strip_prefix("tps = "))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| {
                anyhow!("pgbench printed no `tps = ... (without initial connection time)`:\n{out}")
            })?;
        Ok(PgbenchResult { txns, failed, tps })
    }
}

/// The verifier's lines in a stretch of the daemon's log.
#[derive(Default)]
struct PassLog {
    finished: usize,
    /// Passes that finished with `equal=false`.
    unequal: usize,
    seconds: Vec<f64>,
    failed: Vec<String>,
    differences: Vec<String>,
    rounds_failed: usize,
}

fn scan_pass_log(text: &str) -> PassLog {
    let mut log = PassLog::default();
    for line in text.lines() {
        if line.contains("verification pass finished") {
            log.finished += 1;
            if line.contains("equal=false") {
                log.unequal += 1;
            }
            if let Some(v) = line
                .split("seconds=")
                .nth(1)
                .and_then(|v| v.trim_start_matches('"').split('"').next())
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
            {
                log.seconds.push(v);
            }
        } else if line.contains("re-verification round failed") {
            log.rounds_failed += 1;
        } else if line.contains("verification pass failed") {
            log.failed.push(line.trim().to_owned());
        } else if line.contains("verification found differences") {
            log.differences.push(line.trim().to_owned());
        }
    }
    log
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Bytes `start..end` of a file, as text.
fn read_range(path: &Path, start: u64, end: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let end = usize::try_from(end).unwrap_or(usize::MAX).min(bytes.len());
    let start = usize::try_from(start).unwrap_or(usize::MAX).min(end);
    String::from_utf8_lossy(&bytes[start..end]).into_owned()
}

/// User + system ticks of a live process (all its threads).
/// `taskset` a process (all its threads) to a CPU list; a failure is reported, not fatal.
fn pin(pid: u32, cpus: &str) {
    let done = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
    if !done.is_ok_and(|s| s.success()) {
        eprintln!("cutover-bench: could not pin process {pid} to CPUs {cpus}");
    }
}

/// The direct children of a process, from `/proc/*/stat`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    // The command may hold spaces and parentheses: ppid is the second
                    // field after the last ')'.
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

fn process_ticks(pid: u32) -> u64 {
    proc_stat(pid).map_or(0, |s| s.utime + s.stime)
}

/// The verify scenarios' fixtures.
struct VerifySetup {
    source_db: String,
    rows: u64,
    drift: Drift,
    same_job: PathBuf,
    drift_job: PathBuf,
}

/// The differences planted on the target, by key (all empty: identical tables).
#[derive(Clone, Debug, Default)]
struct Drift {
    /// `abalance` updated on the target.
    different: BTreeSet<i64>,
    /// Deleted on the target: on the source only.
    missing: BTreeSet<i64>,
    /// Inserted on the target (new keys): on the target only.
    extra: BTreeSet<i64>,
}

/// What a verifier reported, by key.
type Found = Drift;

impl Drift {
    /// 100 updates, 3 deletes and 2 inserts on distinct keys spread over `1..=max_aid`:
    /// updates at `i * step + 7`, deletes at `i * step + 3` (first, middle, last step),
    /// inserts right after `max_aid`.
    fn plan(max_aid: i64) -> Result<Drift> {
        let step = max_aid / DRIFT_UPDATES;
        if step < 10 {
            bail!("{VERIFY_TABLE} has {max_aid} keys, too few to plant the drift");
        }
        Ok(Drift {
            different: (0..DRIFT_UPDATES).map(|i| i * step + 7).collect(),
            missing: (0..DRIFT_DELETES)
                .map(|i| i * (DRIFT_UPDATES - 1) / (DRIFT_DELETES - 1) * step + 3)
                .collect(),
            extra: (1..=DRIFT_INSERTS).map(|i| max_aid + i).collect(),
        })
    }

    fn total(&self) -> usize {
        self.different.len() + self.missing.len() + self.extra.len()
    }

    fn describe(&self) -> String {
        format!(
            "{} different, {} missing, {} extra",
            self.different.len(),
            self.missing.len(),
            self.extra.len()
        )
    }

    /// How `found` departs from this planted drift: nothing when the same keys are named
    /// with the same kinds.
    fn judge(&self, found: &Found) -> Vec<String> {
        let mut problems = Vec::new();
        for (kind, want, got) in [
            ("different", &self.different, &found.different),
            ("missing", &self.missing, &found.missing),
            ("extra", &self.extra, &found.extra),
        ] {
            if want != got {
                let unexpected: Vec<String> =
                    got.difference(want).take(5).map(i64::to_string).collect();
                let unreported: Vec<String> =
                    want.difference(got).take(5).map(i64::to_string).collect();
                problems.push(format!(
                    "{kind}: {} reported, {} planted (unexpected aids {}; not reported {})",
                    got.len(),
                    want.len(),
                    if unexpected.is_empty() {
                        "none".to_owned()
                    } else {
                        unexpected.join(",")
                    },
                    if unreported.is_empty() {
                        "none".to_owned()
                    } else {
                        unreported.join(",")
                    },
                ));
            }
        }
        problems
    }
}

fn check_of(problems: Vec<String>) -> Check {
    if problems.is_empty() {
        Check::Pass
    } else {
        Check::Fail(problems.join("; "))
    }
}

/// reladiff's options after the two `database table` pairs.
fn reladiff_options() -> [&'static str; 12] {
    [
        "-k",
        "aid",
        "-c",
        "bid",
        "-c",
        "abalance",
        "-c",
        "filler",
        "-j",
        RELADIFF_THREADS,
        "--assume-unique-key",
        "--json",
    ]
}

/// Streams one `COPY ... TO STDOUT` into blake3 (in 64 KiB slices, so blake3 can use its
/// SIMD paths): the bytes read and the digest.
async fn hash_copy_out(client: tokio_postgres::Client, sql: String) -> Result<(u64, [u8; 32])> {
    use futures_util::StreamExt as _;
    let stream = client.copy_out(sql.as_str()).await?;
    let mut stream = std::pin::pin!(stream);
    let mut hasher = cutover_verifier::canonical::domain_hasher(b"cutover-bench hash floor");
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let mut bytes = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        buf.extend_from_slice(&chunk);
        if buf.len() >= 1 << 16 {
            hasher.update(&buf);
            buf.clear();
        }
    }
    hasher.update(&buf);
    Ok((bytes, *hasher.finalize().as_bytes()))
}

fn skipped(why: &str) -> Measured {
    Measured {
        wall: 0.0,
        cpu: CpuDelta::default(),
        units: 0.0,
        check: Check::Skipped(why.to_owned()),
        note: String::new(),
        applied: None,
    }
}

fn push(
    samples: &mut Vec<Sample>,
    scenario: &'static str,
    tool: &'static str,
    kind: Kind,
    rep: usize,
    unit: &'static str,
    result: Result<Measured>,
) {
    let m = result.unwrap_or_else(|e| Measured {
        wall: 0.0,
        cpu: CpuDelta::default(),
        units: 0.0,
        check: Check::Error(format!("{e:#}")),
        note: String::new(),
        applied: None,
    });
    let sample = Sample {
        scenario,
        tool,
        kind,
        rep,
        wall: m.wall,
        tool_cpu: m.cpu.tool,
        src_cpu: m.cpu.src,
        dst_cpu: m.cpu.dst,
        other_cpu: m.cpu.other,
        applied: m.applied,
        units: m.units,
        unit,
        check: m.check,
        note: m.note,
        load: None,
    };
    eprintln!(
        "cutover-bench: {scenario} rep {rep} {tool}: {:.2} s wall, CPU-s tool {:.2} src {:.2} dst {:.2}, {} {unit}/s, {}{}",
        sample.wall,
        sample.tool_cpu,
        sample.src_cpu,
        sample.dst_cpu,
        fmt_rate(sample.rate()),
        sample.check.label(),
        sample
            .check
            .detail()
            .map(|d| format!(" ({d})"))
            .unwrap_or_default()
    );
    samples.push(sample);
}

// ----- waiting -----

async fn http_status(api: &str) -> Option<serde_json::Value> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(api).await.ok()?;
    let req = format!("GET /v1/status HTTP/1.0\r\nHost: {api}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    let (_, body) = text.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn all_snapshot_done(s: &serde_json::Value) -> bool {
    s["tables"]
        .as_array()
        .is_some_and(|t| t.len() == TABLES.len() && t.iter().all(|t| t["snapshot_done"] == true))
}

fn daemon_alive(d: &mut Daemon) -> bool {
    matches!(d.child.try_wait(), Ok(None))
}

fn daemon_log_tail(d: &Daemon) -> String {
    last_lines(&std::fs::read_to_string(&d.log).unwrap_or_default(), 10)
}

/// Polls `GET /v1/status` until `done` holds; fails when the daemon exits or fails.
async fn wait_status(
    d: &mut Daemon,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = http_status(&d.api).await {
            if done(&s) {
                return Ok(());
            }
            if s["phase"] == "failed" {
                bail!("cutover run failed: {}", daemon_log_tail(d));
            }
        }
        if !daemon_alive(d) {
            bail!("cutover run exited early: {}", daemon_log_tail(d));
        }
        if Instant::now() > deadline {
            bail!(
                "cutover run: not done after {timeout:?}: {}",
                daemon_log_tail(d)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then wait (SIGKILL after a minute).
async fn terminate(mut d: Daemon) -> Result<()> {
    if let Some(pid) = d.child.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .stdin(Stdio::null())
            .status()
            .await;
    }
    match tokio::time::timeout(Duration::from_secs(60), d.child.wait()).await {
        Ok(status) => {
            let status = status?;
            if !status.success() {
                bail!(
                    "cutover run exited with {status} after SIGTERM: {}",
                    daemon_log_tail(&d)
                );
            }
            Ok(())
        }
        Err(_) => {
            let _ = d.child.start_kill();
            let _ = d.child.wait().await;
            bail!("cutover run did not stop within 60 s of SIGTERM")
        }
    }
}

async fn wait_subscription_ready(
    target: &tokio_postgres::Client,
    sub: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let row = target
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE r.srsubstate = 'r') \
                 FROM pg_subscription_rel r JOIN pg_subscription s ON s.oid = r.srsubid \
                 WHERE s.subname = $1",
                &[&sub],
            )
            .await?;
        let (all, ready): (i64, i64) = (row.get(0), row.get(1));
        if all == TABLES.len() as i64 && ready == all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("subscription {sub}: {ready} of {all} tables ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// When (seconds after the clock started) a consumer got going and finished.
struct Drain {
    /// The slot was first seen active.
    connected: f64,
    /// cutover's `GET /v1/status` first showed `applied_lsn` at or past the end LSN.
    applied: Option<f64>,
}

/// `X/Y` (hex) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// Polls until `slot`'s confirmed_flush_lsn reaches `end_lsn`. With `api`, also notes when
/// cutover's status first showed that position applied (its confirmations reach the server
/// only on its status interval, which quantizes the slot's view).
async fn wait_slot_at(
    source: &tokio_postgres::Client,
    slot: &str,
    end_lsn: &str,
    t0: Instant,
    api: Option<&str>,
    mut alive: impl FnMut() -> bool,
) -> Result<Drain> {
    let timeout = RUN_TIMEOUT;
    let deadline = t0 + timeout;
    let mut connected: Option<f64> = None;
    let mut applied: Option<f64> = None;
    let end = parse_lsn(end_lsn);
    loop {
        if let (Some(api), None) = (api, applied)
            && let Some(status) = http_status(api).await
            && let (Some(a), Some(e)) = (status["applied_lsn"].as_str().and_then(parse_lsn), end)
            && a >= e
        {
            applied = Some(t0.elapsed().as_secs_f64());
        }
        let state: Option<(bool, bool)> = source
            .query_opt(
                "SELECT coalesce(confirmed_flush_lsn >= $2::text::pg_lsn, false), active \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot, &end_lsn],
            )
            .await?
            .map(|r| (r.get(0), r.get(1)));
        let now = t0.elapsed().as_secs_f64();
        match state {
            None => bail!("slot {slot} is gone"),
            Some((true, _)) => {
                return Ok(Drain {
                    connected: connected.unwrap_or(now),
                    applied: applied.or(api.map(|_| now)),
                });
            }
            Some((false, active)) => {
                if active && connected.is_none() {
                    connected = Some(now);
                }
            }
        }
        if !alive() {
            bail!("the consumer exited before the slot {slot} reached {end_lsn}");
        }
        if Instant::now() > deadline {
            bail!("slot {slot} did not reach {end_lsn} in {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ----- processes -----

async fn run(mut cmd: Command, what: &str) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .with_context(|| format!("spawn {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            last_lines(&String::from_utf8_lossy(&out.stderr), 8)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn find_in_path(path: &OsString, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A pyenv shim (a shell script that looks up the version, then runs the real program)
/// resolved to the program it runs, so its start-up is not timed; other paths as they are.
fn resolve_pyenv_shim(path: PathBuf) -> PathBuf {
    let in_shims = path
        .parent()
        .is_some_and(|d| d.ends_with("shims") && d.to_string_lossy().contains("pyenv"));
    let Some(name) = path.file_name().filter(|_| in_shims) else {
        return path;
    };
    std::process::Command::new("pyenv")
        .arg("which")
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|p| p.is_file())
        .unwrap_or(path)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        ppid: u32::try_from(num(1)?).ok()?,
        utime: num(11)?,
        stime: num(12)?,
        cutime: num(13)?,
        cstime: num(14)?,
    })
}

/// CPU ticks of a server: the postmaster, the children it reaped, and its live children.
fn server_ticks(postmaster: u32) -> u64 {
    // A child reaped between reading the postmaster and listing its children would be
    // counted twice or not at all: read again until the postmaster's reaped time is stable.
    let mut last = 0;
    for _ in 0..10 {
        let Some(before) = proc_stat(postmaster) else {
            return 0;
        };
        let children = live_children_ticks(postmaster);
        let Some(after) = proc_stat(postmaster) else {
            return 0;
        };
        last = after.utime + after.stime + after.cutime + after.cstime + children;
        if before.cutime + before.cstime == after.cutime + after.cstime {
            break;
        }
    }
    last
}

fn live_children_ticks(postmaster: u32) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = proc_stat(pid)
                && s.ppid == postmaster
            {
                total += s.utime + s.stime;
            }
        }
    }
    total
}

// ----- report -----

struct Summary {
    scenario: &'static str,
    tool: &'static str,
    kind: Kind,
    unit: &'static str,
    n_ok: usize,
    n_all: usize,
    wall: f64,
    rate: f64,
    tool_cpu: f64,
    src_cpu: f64,
    dst_cpu: f64,
    problems: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut out: Vec<Summary> = Vec::new();
    for s in samples {
        if out
            .iter()
            .any(|o| o.scenario == s.scenario && o.tool == s.tool)
        {
            continue;
        }
        let all: Vec<&Sample> = samples
            .iter()
            .filter(|o| o.scenario == s.scenario && o.tool == s.tool)
            .collect();
        let ok: Vec<&Sample> = all.iter().copied().filter(|o| o.check.usable()).collect();
        let mut problems: Vec<String> = Vec::new();
        for o in &all {
            if let Some(d) = o.check.detail() {
                let line = format!("rep {} {}: {d}", o.rep, o.check.label());
                if !problems.contains(&line) {
                    problems.push(line);
                }
            }
        }
        out.push(Summary {
            scenario: s.scenario,
            tool: s.tool,
            kind: s.kind,
            unit: s.unit,
            n_ok: ok.len(),
            n_all: all.len(),
            wall: median(ok.iter().map(|o| o.wall).collect()),
            rate: median(ok.iter().map(|o| o.rate()).collect()),
            tool_cpu: median(ok.iter().map(|o| o.tool_cpu).collect()),
            src_cpu: median(ok.iter().map(|o| o.src_cpu).collect()),
            dst_cpu: median(ok.iter().map(|o| o.dst_cpu).collect()),
            problems,
        });
    }
    out
}

/// The reference rates of a scenario: (best peer, its name), floor.
fn references(summaries: &[Summary], scenario: &str) -> (Option<(f64, &'static str)>, Option<f64>) {
    let best = summaries
        .iter()
        .filter(|s| s.scenario == scenario && s.kind == Kind::Peer && s.n_ok > 0)
        .max_by(|a, b| a.rate.total_cmp(&b.rate))
        .map(|s| (s.rate, s.tool));
    let floor = summaries
        .iter()
        .find(|s| s.scenario == scenario && s.kind == Kind::Floor && s.n_ok > 0)
        .map(|s| s.rate);
    (best, floor)
}

/// Time per unit relative to the reference (1.00 = as fast; lower is better).
fn ratio(reference: Option<f64>, rate: f64, kind: Kind) -> String {
    match reference {
        Some(r) if rate > 0.0 && kind != Kind::ExtraFloor && rate.is_finite() => {
            format!("{:.2}×", r / rate)
        }
        _ => "—".to_owned(),
    }
}

fn fmt_rate(r: f64) -> String {
    if !r.is_finite() || r <= 0.0 {
        "—".to_owned()
    } else if r >= 1e6 {
        format!("{:.2} M", r / 1e6)
    } else if r >= 1e3 {
        format!("{:.1} k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn fmt_secs(v: f64) -> String {
    if v.is_finite() && v > 0.0 {
        format!("{v:.2}")
    } else {
        "—".to_owned()
    }
}

/// Whether something else on the machine used more than a quarter of a CPU during the run.
fn disturbed(s: &Sample) -> bool {
    s.wall > 0.0 && s.other_cpu > 0.25 * s.wall
}

fn fmt_cpu(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".to_owned()
    }
}

fn render(samples: &[Sample], env: &EnvInfo, args: &Args, elapsed: Duration) -> String {
    let summaries = summarize(samples);
    let mut md = String::new();
    let _ = writeln!(md, "### Run of {}\n", env.date);
    let _ = writeln!(
        md,
        "- machine: {} CPUs ({}), {}; source and target servers and every tool share these CPUs",
        env.nproc, env.cpu_model, env.pg_version
    );
    let _ = writeln!(
        md,
        "- dataset: pgbench scale {} ({} rows in 4 tables, database {}); {} reps, tool order rotated each rep; catch-up backlog `pgbench -c 4 -j 2 -T {} -n`, its consumers reading the source over {}",
        args.scale,
        env.source_rows,
        env.source_size,
        args.reps,
        args.backlog_secs,
        if args.catchup_socket {
            "its unix socket (`--catchup-socket`)"
        } else {
            "TCP on 127.0.0.1"
        }
    );
    let verify_rows = samples
        .iter()
        .filter(|s| s.scenario == VERIFY || s.scenario == VERIFY_DRIFT)
        .map(|s| s.units)
        .fold(0.0, f64::max);
    let verify_ran = samples
        .iter()
        .any(|s| s.scenario == VERIFY || s.scenario == VERIFY_DRIFT);
    if verify_ran {
        let _ = writeln!(
            md,
            "- verify: `{VERIFY_TABLE}` at pgbench scale {} ({} rows) against a `pg_dump -t | psql` copy on the target; verify-drift against a second copy with {DRIFT_UPDATES} `abalance` updates, {DRIFT_DELETES} deletes and {DRIFT_INSERTS} inserts planted on the target; each tool runs on both every rep",
            args.verify_scale.unwrap_or(args.scale),
            verify_rows
        );
    }
    if samples.iter().any(|s| s.scenario == VERIFY_LOAD) {
        let _ = writeln!(
            md,
            "- verify-load: `pgbench -c 4 -j 2 -T {} -n` on the source while a cutover job streams the pgbench tables (copied once, then each variant a restart of the same job): sync only with `[verify] every = \"0\"`, sync + continuous verify with `every = \"{LOAD_PASS_EVERY}\"`, `max_rows_per_second = {}`, `snapshot_max_age = {}`; both variants every rep{}",
            args.load_secs,
            args.load_verify_rows_per_second,
            args.load_snapshot_max_age.as_deref().unwrap_or("(default)"),
            if args.load_pin {
                "; `--load-pin`: the source server and pgbench on CPU 0, the daemon and the target server on CPU 1 (the source as a machine of its own)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        md,
        "- peers: pg_dump/psql {}; pgcopydb {}{}; cutover at {}",
        env.pg_version,
        env.pgcopydb
            .as_deref()
            .unwrap_or("NOT INSTALLED (its rows are marked skipped)"),
        if verify_ran {
            format!(
                "; reladiff {} (`{}`)",
                env.reladiff
                    .as_deref()
                    .unwrap_or("NOT INSTALLED (its rows are marked skipped)"),
                reladiff_options().join(" ")
            )
        } else {
            String::new()
        },
        env.commit
    );
    let _ = writeln!(
        md,
        "- servers: shared_buffers=256MB, max_wal_size=4GB, checkpoint_timeout=30min, wal_level=logical, fsync on; a CHECKPOINT on both before every run (before its setup), and on the source before every catch-up backlog"
    );
    let _ = writeln!(
        md,
        "- total run time {:.1} min; load average {} at the start, {} at the end",
        elapsed.as_secs_f64() / 60.0,
        env.load_start,
        load_average()
    );
    let n_disturbed = samples.iter().filter(|s| disturbed(s)).count();
    let timed: f64 = samples.iter().map(|s| s.wall).sum();
    let other: f64 = samples.iter().map(|s| s.other_cpu).sum();
    let busy = if timed > 0.0 { other / timed } else { 0.0 };
    let _ = writeln!(
        md,
        "- other CPU (the machine's busy time not used by the tool, the servers or this program) averaged {busy:.2} CPUs over the timed runs; {n_disturbed} of {} runs DISTURBED (other CPU above a quarter of a CPU){}\n",
        samples.len(),
        if busy > 0.25 {
            ": **the machine was busy with other work, so these figures are disturbed; rerun on a quiet machine**"
        } else {
            ""
        }
    );

    let _ = writeln!(md, "#### Every run\n");
    let _ = writeln!(
        md,
        "| scenario | tool | rep | wall s | tool CPU s | source CPU s | target CPU s | other CPU s | units/s | vs best peer | vs floor | check | note |"
    );
    let _ = writeln!(
        md,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for s in samples {
        let (best, floor) = references(&summaries, s.scenario);
        let usable = s.check.usable();
        let measured = usable || matches!(s.check, Check::Fail(_));
        let rate = if usable { s.rate() } else { f64::NAN };
        let mut note = s.note.clone();
        if disturbed(s) {
            note = format!(
                "DISTURBED: {:.2} s of other CPU on the machine during the run; {note}",
                s.other_cpu
            );
        }
        if let Some(d) = s.check.detail() {
            note = if note.is_empty() {
                d.to_owned()
            } else {
                format!("{note}; {d}")
            };
        }
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} {}/s | {} | {} | {} | {} |",
            s.scenario,
            md_cell(s.tool),
            s.rep,
            if measured {
                fmt_secs(s.wall)
            } else {
                "—".to_owned()
            },
            if measured {
                fmt_cpu(s.tool_cpu)
            } else {
                "—".to_owned()
            },
            if measured {
                fmt_cpu(s.src_cpu)
            } else {
                "—".to_owned()
            },
            if measured {
                fmt_cpu(s.dst_cpu)
            } else {
                "—".to_owned()
            },
            if measured {
                fmt_cpu(s.other_cpu)
            } else {
                "—".to_owned()
            },
            fmt_rate(if matches!(s.check, Check::Fail(_)) {
                s.rate()
            } else {
                rate
            }),
            s.unit,
            ratio(best.map(|b| b.0), rate, s.kind),
            ratio(floor, rate, s.kind),
            s.check.label(),
            md_cell(&note)
        );
    }

    let _ = writeln!(md, "\n#### Medians (runs that passed the check)\n");
    let _ = writeln!(
        md,
        "| scenario | tool | ok/runs | wall s | tool CPU s | source CPU s | target CPU s | total CPU s | units/s | vs best peer | vs floor |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &summaries {
        let (best, floor) = references(&summaries, s.scenario);
        let _ = writeln!(
            md,
            "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} {}/s | {} | {} |",
            s.scenario,
            md_cell(s.tool),
            s.n_ok,
            s.n_all,
            fmt_secs(s.wall),
            fmt_cpu(s.tool_cpu),
            fmt_cpu(s.src_cpu),
            fmt_cpu(s.dst_cpu),
            fmt_cpu(s.tool_cpu + s.src_cpu + s.dst_cpu),
            fmt_rate(s.rate),
            s.unit,
            ratio(best.map(|b| b.0), s.rate, s.kind),
            ratio(floor, s.rate, s.kind)
        );
    }

    let _ = writeln!(
        md,
        "\n#### Ratios (time per row or per transaction; below 1.00 = faster than the reference)\n"
    );
    for scenario in [COPY, CATCHUP] {
        if !summaries.iter().any(|s| s.scenario == scenario) {
            continue;
        }
        let (best, floor) = references(&summaries, scenario);
        let find = |tool: &str| {
            summaries
                .iter()
                .find(|s| s.scenario == scenario && s.tool == tool && s.n_ok > 0)
        };
        let native = find(NATIVE);
        let show = |num: Option<&Summary>, den: Option<f64>| match (num, den) {
            (Some(n), Some(d)) if n.rate > 0.0 => format!("{:.2}×", d / n.rate),
            _ => "— (missing or failed run)".to_owned(),
        };
        let best_name = best.map_or("—", |b| b.1);
        let best_summary = best.and_then(|b| {
            summaries
                .iter()
                .find(|s| s.scenario == scenario && s.tool == b.1)
        });
        // cutover, then (catch-up) cutover with a mapped table: each its own headline.
        for tool in [OURS, OURS_MAPPED] {
            let ran = summaries
                .iter()
                .any(|s| s.scenario == scenario && s.tool == tool);
            if tool != OURS && !ran {
                continue;
            }
            let ours = find(tool);
            if tool == OURS {
                let _ = writeln!(
                    md,
                    "- **{scenario}**: cutover / best peer ({best_name}) = **{}**; cutover / floor = **{}**; native LR / floor = {}",
                    show(ours, best.map(|b| b.0)),
                    show(ours, floor),
                    show(native, floor)
                );
            } else {
                let _ = writeln!(
                    md,
                    "- **{scenario}, {tool}** (`{MAPPED_TABLE}` through `[table.columns]`, every change to it evaluated on the source): {tool} / best peer ({best_name}) = **{}**; {tool} / floor = **{}**; {tool} / cutover = **{}** (the cost of the mapping)",
                    show(ours, best.map(|b| b.0)),
                    show(ours, floor),
                    show(ours, find(OURS).map(|s| s.rate))
                );
            }
            if let (Some(o), Some(b)) = (ours, best_summary) {
                let (oc, bc) = (
                    o.tool_cpu + o.src_cpu + o.dst_cpu,
                    b.tool_cpu + b.src_cpu + b.dst_cpu,
                );
                if bc > 0.0 && oc.is_finite() {
                    let _ = writeln!(
                        md,
                        "  - total CPU (tool + both servers): {tool} {oc:.2} s vs {} {bc:.2} s = {:.2}×",
                        b.tool,
                        oc / bc
                    );
                }
            }
            let applied_rates: Vec<f64> = samples
                .iter()
                .filter(|s| s.scenario == scenario && s.tool == tool && s.check.usable())
                .filter_map(|s| s.applied.filter(|a| *a > 0.0).map(|a| s.units / a))
                .collect();
            if !applied_rates.is_empty() {
                let rate = median(applied_rates);
                let vs = |reference: Option<f64>| {
                    reference.map_or("—".to_owned(), |r| format!("{:.2}×", r / rate))
                };
                let _ = writeln!(
                    md,
                    "  - {tool} timed to its own status `applied_lsn` reaching the end: {} txns/s = {} best peer, {} floor",
                    fmt_rate(rate),
                    vs(best.map(|b| b.0)),
                    vs(floor)
                );
            }
        }
    }
    render_verify_ratios(&mut md, &summaries);
    render_verify_load(&mut md, &summaries, samples);
    let problems: Vec<String> = summaries
        .iter()
        .flat_map(|s| {
            s.problems
                .iter()
                .map(move |p| format!("- {} / {}: {}", s.scenario, s.tool, md_cell(p)))
        })
        .collect();
    if !problems.is_empty() {
        let _ = writeln!(md, "\n#### Problems\n");
        for p in problems {
            let _ = writeln!(md, "{p}");
        }
    }
    md
}

/// The verify headlines: cutover against the floor and reladiff on identical tables and on
/// the drift, and what the drift costs cutover, each beside its goal.
fn render_verify_ratios(md: &mut String, summaries: &[Summary]) {
    let find = |scenario: &str, tool: &str| {
        summaries
            .iter()
            .find(|s| s.scenario == scenario && s.tool == tool && s.n_ok > 0 && s.rate > 0.0)
    };
    // Time per row of `num` over time per row of `den` (below 1 = `num` is faster).
    let time_ratio = |num: Option<&Summary>, den: Option<&Summary>| match (num, den) {
        (Some(n), Some(d)) => Some(d.rate / n.rate),
        _ => None,
    };
    let shown = |r: Option<f64>| {
        r.map_or("— (missing or failed run)".to_owned(), |r| {
            format!("{r:.2}×")
        })
    };
    let verdict = |met: Option<bool>| match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    };
    let identical = find(VERIFY, OURS);
    for scenario in [VERIFY, VERIFY_DRIFT] {
        if !summaries.iter().any(|s| s.scenario == scenario) {
            continue;
        }
        let ours = find(scenario, OURS);
        let peer = find(scenario, RELADIFF);
        let floor = find(scenario, FLOOR_HASH);
        let vs_floor = time_ratio(ours, floor);
        let vs_peer = time_ratio(ours, peer);
        let faster = vs_peer.map(|r| 1.0 / r);
        let _ = writeln!(
            md,
            "- **{scenario}** ({}): cutover / floor = **{}** (goal ≤ {GOAL_VERIFY_FLOOR:.1}×: {}); cutover / reladiff = **{}**, i.e. cutover {} (goal at least {GOAL_VERIFY_VS_RELADIFF:.0}× faster: {}); reladiff / floor = {}",
            if scenario == VERIFY {
                "identical tables".to_owned()
            } else {
                format!(
                    "{} planted differences",
                    DRIFT_UPDATES + DRIFT_DELETES + DRIFT_INSERTS
                )
            },
            shown(vs_floor),
            verdict(vs_floor.map(|r| r <= GOAL_VERIFY_FLOOR)),
            shown(vs_peer),
            faster.map_or("—".to_owned(), |f| if f >= 1.0 {
                format!("{f:.2}× faster")
            } else {
                format!("{:.2}× slower", 1.0 / f)
            }),
            verdict(faster.map(|f| f >= GOAL_VERIFY_VS_RELADIFF)),
            shown(time_ratio(peer, floor))
        );
        if scenario == VERIFY_DRIFT {
            let drift_cost = time_ratio(ours, identical);
            let _ = writeln!(
                md,
                "  - cutover drift / cutover identical = **{}** (goal ≤ {GOAL_DRIFT_VS_IDENTICAL:.1}×: {}); reladiff drift / reladiff identical = {}",
                shown(drift_cost),
                verdict(drift_cost.map(|r| r <= GOAL_DRIFT_VS_IDENTICAL)),
                shown(time_ratio(peer, find(VERIFY, RELADIFF)))
            );
        }
        let total = |s: &Summary| s.tool_cpu + s.src_cpu + s.dst_cpu;
        if let Some(o) = ours {
            let mut line = format!(
                "  - CPU s (tool / source / target): cutover {:.2} / {:.2} / {:.2}",
                o.tool_cpu, o.src_cpu, o.dst_cpu
            );
            for other in [peer, floor].into_iter().flatten() {
                let _ = write!(
                    line,
                    "; {} {:.2} / {:.2} / {:.2}",
                    other.tool, other.tool_cpu, other.src_cpu, other.dst_cpu
                );
            }
            if let Some(p) = peer
                && total(p) > 0.0
            {
                let _ = write!(
                    line,
                    "; total CPU cutover / reladiff = {:.2}×",
                    total(o) / total(p)
                );
            }
            let _ = writeln!(md, "{line}");
        }
    }
}

/// The verify-load headline: the source's pgbench throughput with continuous verification
/// over without, beside its goal, then CPU, passes and lag of both variants.
fn render_verify_load(md: &mut String, summaries: &[Summary], samples: &[Sample]) {
    if !summaries.iter().any(|s| s.scenario == VERIFY_LOAD) {
        return;
    }
    let find = |tool: &str| {
        summaries
            .iter()
            .find(|s| s.scenario == VERIFY_LOAD && s.tool == tool && s.n_ok > 0 && s.rate > 0.0)
    };
    let (without, with) = (find(SYNC_ONLY), find(SYNC_VERIFY));
    let ratio = match (with, without) {
        (Some(w), Some(o)) => Some(w.rate / o.rate),
        _ => None,
    };
    let _ = writeln!(
        md,
        "- **{VERIFY_LOAD}** (source throughput under pgbench while the job streams): tps with continuous verification / without = **{}** (goal ≥ {GOAL_LOAD_RATIO:.2}, i.e. verification costs the source at most {:.0}%: {}); {SYNC_ONLY} {} tps, {SYNC_VERIFY} {} tps",
        ratio.map_or("— (missing or failed run)".to_owned(), |r| format!(
            "{r:.2}"
        )),
        (1.0 - GOAL_LOAD_RATIO) * 100.0,
        match ratio {
            Some(r) if r >= GOAL_LOAD_RATIO => "met",
            Some(_) => "NOT met",
            None => "not measured",
        },
        without.map_or("—".to_owned(), |s| format!("{:.1}", s.rate)),
        with.map_or("—".to_owned(), |s| format!("{:.1}", s.rate)),
    );
    let tps_of = |tool: &str, rep: usize| {
        samples
            .iter()
            .find(|s| s.scenario == VERIFY_LOAD && s.tool == tool && s.rep == rep)
            .filter(|s| s.check.usable())
            .and_then(|s| s.load.as_ref())
            .map(|f| f.tps)
    };
    let reps = samples
        .iter()
        .filter(|s| s.scenario == VERIFY_LOAD)
        .map(|s| s.rep)
        .max()
        .unwrap_or(0);
    let per_rep: Vec<String> = (1..=reps)
        .map(
            |rep| match (tps_of(SYNC_VERIFY, rep), tps_of(SYNC_ONLY, rep)) {
                (Some(w), Some(o)) if o > 0.0 => format!("{:.2}", w / o),
                _ => "—".to_owned(),
            },
        )
        .collect();
    let _ = writeln!(
        md,
        "  - the ratio per rep (variants run back to back, order rotated): {}",
        per_rep.join(", ")
    );
    let figures = |tool: &str| -> Vec<&LoadFigures> {
        samples
            .iter()
            .filter(|s| s.scenario == VERIFY_LOAD && s.tool == tool && s.check.usable())
            .filter_map(|s| s.load.as_ref())
            .collect()
    };
    let med = |v: Vec<f64>| {
        let m = median(v);
        if m.is_finite() {
            format!("{m:.2}")
        } else {
            "?".to_owned()
        }
    };
    let mut cpu_line = "  - CPU s during the load (daemon / source / target / pgbench):".to_owned();
    let mut lag_line = "  - lag (status `lag_seconds`) at the end of the load / at most during it, and seconds to catch up after it:".to_owned();
    for (i, (tool, summary)) in [(SYNC_ONLY, without), (SYNC_VERIFY, with)]
        .into_iter()
        .enumerate()
    {
        let sep = if i == 0 { " " } else { "; " };
        let f = figures(tool);
        let _ = write!(
            cpu_line,
            "{sep}{tool} {} / {} / {} / {}",
            summary.map_or("—".to_owned(), |s| format!("{:.2}", s.tool_cpu)),
            summary.map_or("—".to_owned(), |s| format!("{:.2}", s.src_cpu)),
            summary.map_or("—".to_owned(), |s| format!("{:.2}", s.dst_cpu)),
            med(f.iter().map(|f| f.pgbench_cpu).collect())
        );
        let _ = write!(
            lag_line,
            "{sep}{tool} {} / {} / {}",
            med(f.iter().filter_map(|f| f.lag_end).collect()),
            med(f.iter().filter_map(|f| f.lag_max).collect()),
            med(f.iter().map(|f| f.caught_up).collect())
        );
    }
    let _ = writeln!(md, "{cpu_line}");
    let _ = writeln!(md, "{lag_line} (medians)");
    let f = figures(SYNC_VERIFY);
    if !f.is_empty() {
        let passes: Vec<String> = f.iter().map(|f| f.passes.to_string()).collect();
        let _ = writeln!(
            md,
            "  - verification passes finished during the load, per rep: {} (median pass {} s; a verify connection open on the source in {:.0}% of the samples)",
            passes.join(", "),
            med(f.iter().filter_map(|f| f.pass_seconds).collect()),
            100.0 * median(f.iter().map(|f| f.verify_open).collect())
        );
    }
}

fn md_cell(text: &str) -> String {
    let one_line = text.replace(['\n', '\r'], " ").replace('|', "\\|");
    if one_line.chars().count() > 400 {
        let cut: String = one_line.chars().take(400).collect();
        format!("{cut}…")
    } else {
        one_line
    }
}

fn write_docs(path: &Path, report: &str) -> Result<()> {
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let section = format!("{BEGIN_MARK}\n{report}\n{END_MARK}");
    let text = match (existing.find(BEGIN_MARK), existing.find(END_MARK)) {
        (Some(b), Some(e)) if e > b => format!(
            "{}{section}{}",
            &existing[..b],
            &existing[e + END_MARK.len()..]
        ),
        _ if existing.is_empty() => format!("# Benchmarks\n\n{section}\n"),
        _ => format!("{}\n\n{section}\n", existing.trim_end()),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
