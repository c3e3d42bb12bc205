//! Shared pieces of the integration tests: clusters, job files, the daemon as a child
//! process, and independent SQL comparisons of source and target.
//!
//! The comparisons never use cutover's own code: they read both sides with plain SQL
//! (`row::text` under pinned settings, sorted by bytes) and compare the multisets, so a
//! bug in the daemon cannot hide itself.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cutover::cluster::{Cluster, ClusterOptions};

pub type TestResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

pub async fn cluster(name: &str) -> Cluster {
    cluster_with(name, &[]).await
}

/// A cluster with extra `postgresql.conf` settings.
pub async fn cluster_with(name: &str, settings: &[(&str, &str)]) -> Cluster {
    let opts = settings
        .iter()
        .fold(ClusterOptions::named(name), |o, (k, v)| o.setting(*k, *v));
    Cluster::start(opts)
        .await
        .expect("start a PostgreSQL cluster")
}

/// Run `cutover ARGS --json`: the exit code and the one JSON document it printed.
pub fn run_json(args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(bin())
        .args(args)
        .arg("--json")
        .output()
        .expect("run cutover");
    // A command that failed before printing its document: its error, as a string (the
    // caller's assertion on the exit code shows it).
    let doc = match serde_json::from_slice(&out.stdout) {
        Ok(doc) => doc,
        Err(_) if !out.status.success() && out.stdout.is_empty() => {
            serde_json::Value::String(String::from_utf8_lossy(&out.stderr).into_owned())
        }
        Err(e) => panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)),
    };
    (out.status.code(), doc)
}

/// Run `cutover ARGS`, which must refuse (exit 2): its error output.
pub fn refused(args: &[&str]) -> String {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run cutover");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "cutover {args:?}: {err}");
    err
}

/// A free TCP port on loopback for the daemon's API.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A job file in a temp dir.
pub struct Job {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub api_port: u16,
    pub name: String,
}

impl Job {
    /// Write a job named `name` from `source_url` to `target_url`, with `extra` TOML
    /// appended (tables, target schema...).
    pub fn write(name: &str, source_url: &str, target_url: &str, extra: &str) -> Job {
        Self::write_with_target(name, source_url, target_url, "", extra)
    }

    /// Like [`Job::write`], with `target_keys` added to the `[target]` section.
    pub fn write_with_target(
        name: &str,
        source_url: &str,
        target_url: &str,
        target_keys: &str,
        extra: &str,
    ) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let api_port = free_port();
        let text = format!(
            "name = \"{name}\"\ndata_dir = \"{data}\"\n\n[source]\nurl = \"{source_url}\"\n\n[target]\nurl = \"{target_url}\"\n{target_keys}\n\n[api]\nlisten = \"127.0.0.1:{api_port}\"\n\n{extra}\n",
            data = dir.path().join("data").display()
        );
        let path = dir.path().join("job.toml");
        std::fs::write(&path, text).unwrap();
        Job {
            dir,
            path,
            api_port,
            name: name.to_string(),
        }
    }

    pub fn api(&self) -> String {
        format!("127.0.0.1:{}", self.api_port)
    }
}

/// `cutover run` as a child process, its output in a log file.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
    pub api: String,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cutover")
}

impl Daemon {
    pub fn start(job: &Job) -> Daemon {
        // One log per start, numbered by what the job's directory already holds.
        let n = std::fs::read_dir(job.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let log = job.dir.path().join(format!("daemon-{n}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .arg("run")
            .arg(&job.path)
            .env("RUST_LOG", "info,cutover=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn cutover run");
        Daemon {
            child: Some(child),
            log,
            api: job.api(),
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: no chance to finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        send_signal(c.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until the daemon exits on its own (an error that stops the job), failing with
    /// its output after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration, why: &str) -> String {
        let deadline = std::time::Instant::now() + timeout;
        while self.running() {
            assert!(
                std::time::Instant::now() < deadline,
                "the daemon did not stop {why}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.output()
    }

    /// Wait until the daemon's log holds `text`, failing with the log if it exits first or
    /// after `timeout`.
    pub async fn wait_log(&mut self, text: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while !self.output().contains(text) {
            assert!(
                std::time::Instant::now() < deadline && self.running(),
                "the daemon never logged {text:?}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `GET path` on the daemon's API: (status code, body).
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.api).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.api);
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Some((code, body))
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let (_, body) = self.get("/v1/status").await?;
        serde_json::from_str(&body).ok()
    }

    /// Poll the status document until `pred` holds (returning it), or fail after `timeout`
    /// saying `what` was not seen, with the daemon's log.
    pub async fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status().await.unwrap_or_default();
            if pred(&st) {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not seen in {timeout:?}: {st:#}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until the status says `phase`, failing with the daemon's log.
    pub async fn wait_phase(&mut self, phase: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.status().await.is_some_and(|s| s["phase"] == phase) {
                return;
            }
            if !self.running() {
                panic!(
                    "the daemon exited while waiting for phase {phase}:\n{}",
                    self.output()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "phase {phase} not reached in {timeout:?}:\n{}",
                    self.output()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn send_signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The rows of `table` as sorted `row::text` strings: an independent, multiset view.
pub async fn rows(client: &tokio_postgres::Client, table: &str, columns: &str) -> Vec<String> {
    client
        .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3; SET IntervalStyle = 'postgres'; SET bytea_output = 'hex'")
        .await
        .unwrap();
    let sql =
        format!("SELECT ({columns})::text FROM {table} t ORDER BY ({columns})::text COLLATE \"C\"");
    client
        .query(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
        .collect()
}

/// A digest of the table: row count and md5 of the sorted `row::text` (for big tables).
pub async fn digest(client: &tokio_postgres::Client, table: &str) -> (i64, String) {
    client
        .batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET extra_float_digits = 3",
        )
        .await
        .unwrap();
    let sql = format!(
        "SELECT count(*), coalesce(md5(string_agg(ROW(t.*)::text, E'\\n' ORDER BY ROW(t.*)::text COLLATE \"C\")), '') FROM {table} t"
    );
    let row = client
        .query_one(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    (row.get(0), row.get(1))
}

/// Poll until `source_table` on the source equals `target_table` on the target (all
/// columns, as a multiset), or panic after `timeout` with both sides' differences.
pub async fn wait_equal(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    source_table: &str,
    target_table: &str,
    timeout: Duration,
    daemon: Option<&Daemon>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        // `ROW(t.*)`, not `t`: a column named `t` would hide the row (the type test has one).
        let a = rows(source, source_table, "ROW(t.*)").await;
        let b = rows(target, target_table, "ROW(t.*)").await;
        if a == b {
            return;
        }
        if Instant::now() > deadline {
            let only_a: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(10).collect();
            let only_b: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(10).collect();
            panic!(
                "{source_table} != {target_table} after {timeout:?}: {} vs {} rows\nonly on source: {only_a:#?}\nonly on target: {only_b:#?}\n{}",
                a.len(),
                b.len(),
                daemon.map(|d| d.output()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Like [`wait_equal`], by digest, for large tables.
pub async fn wait_equal_digest(
    source: &tokio_postgres::Client,
    target: &tokio_postgres::Client,
    source_table: &str,
    target_table: &str,
    timeout: Duration,
    daemon: Option<&Daemon>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let a = digest(source, source_table).await;
        let b = digest(target, target_table).await;
        if a == b {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{source_table} != {target_table} after {timeout:?}: {a:?} vs {b:?}\n{}",
                daemon.map(|d| d.output()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Replication slots plus publications on a server: what a job may leave behind.
pub async fn slots_and_publications(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_publication)",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// The first column of every row of `sql`, as text.
pub async fn strings(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// A load on the source while a test goes on: transaction `i` (1, 2, ...) is the SQL
/// `step(i)` returns, on its own connection, with `pause` between transactions.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Writer {
    pub fn start(
        client: tokio_postgres::Client,
        pause: Duration,
        mut step: impl FnMut(u64) -> String + Send + 'static,
    ) -> Writer {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut i = 0;
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let sql = step(i);
                client
                    .batch_execute(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("writer: {sql}: {e:?}"));
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            i
        });
        Writer { stop, task }
    }

    /// Stop after the transaction in flight; how many were written.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the writer panicked")
    }
}

/// A job from database `db` of `src` to `db` of `dst` (with `extra` job TOML), started
/// and streaming, and a client on each side.
pub async fn streaming(
    src: &Cluster,
    dst: &Cluster,
    name: &str,
    extra: &str,
) -> (Job, Daemon, tokio_postgres::Client, tokio_postgres::Client) {
    let job = Job::write(name, &src.url("db"), &dst.url("db"), extra);
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    (job, daemon, s, d)
}
