//! Throwaway PostgreSQL clusters for tests, benchmarks and `cutover demo`.
//!
//! A [`Cluster`] is a private PostgreSQL server: `initdb --no-sync` into its own temporary
//! directory, its own free TCP port on 127.0.0.1, its own short unix socket directory, and its
//! server log in a file beside the data directory. Clusters are isolated from each other, so
//! tests can start as many as they like in parallel. Dropping a [`Cluster`] stops the server
//! (`pg_ctl stop -m immediate`) and removes everything it wrote.
//!
//! Every cluster runs with `wal_level = logical` and room for replication slots and WAL
//! senders; `fsync` stays on (crash tests rely on durability) unless a setting overrides it.
//!
//! PostgreSQL refuses to run as root. When this process runs as root, the server tools run as
//! the `postgres` OS user (through `runuser -u postgres --`) and the cluster's directories are
//! handed to that user.
//!
//! The server binaries are found by [`Cluster::bin_dir`]: `$CUTOVER_PG_BINDIR` when set, else
//! `pg_config --bindir` when that directory has the server, else the newest
//! `/usr/lib/postgresql/*/bin`.
//!
//! ```no_run
//! # async fn example() -> Result<(), cutover::cluster::ClusterError> {
//! use cutover::cluster::{Cluster, ClusterOptions, StopMode};
//! let cluster = Cluster::start(ClusterOptions::default()).await?;
//! cluster.create_database("shop").await?;
//! cluster.execute("shop", "CREATE TABLE t (id int PRIMARY KEY)").await?;
//! cluster.restart(StopMode::Immediate).await?;
//! let client = cluster.connect("shop").await?;
//! # drop(client);
//! # Ok(())
//! # }
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

/// The superuser every cluster is created with.
pub const SUPERUSER: &str = "postgres";
/// The address every cluster listens on.
pub const HOST: &str = "127.0.0.1";
/// Environment variable that names the directory holding `initdb`, `pg_ctl` and `postgres`.
pub const BINDIR_ENV: &str = "CUTOVER_PG_BINDIR";

/// How long starting (or restarting) a server may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two connection attempts while waiting for a server.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many ports to try when the chosen one turns out to be taken.
const PORT_ATTEMPTS: usize = 5;
/// How many lines of the server log an error carries.
const ERROR_LOG_LINES: usize = 30;
/// Settings the cluster manages itself; [`ClusterOptions::settings`] may not name them.
const MANAGED_SETTINGS: &[&str] = &["port", "listen_addresses", "unix_socket_directories"];
/// Environment variables that would steer the PostgreSQL tools away from this cluster.
pub const PG_ENV: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGSSLMODE",
    "PGTZ",
    "PGCLIENTENCODING",
];

/// How to start a [`Cluster`].
#[derive(Clone)]
pub struct ClusterOptions {
    /// A short label: part of the temporary directory's name and the server's `cluster_name`.
    pub name: String,
    /// Extra `postgresql.conf` settings, applied after the defaults (so they override them).
    pub settings: Vec<(String, String)>,
    /// When set, the superuser gets this password and TCP connections require
    /// scram-sha-256; the unix socket stays `trust`.
    pub password: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            name: "cutover".to_owned(),
            settings: Vec::new(),
            password: None,
        }
    }
}

impl ClusterOptions {
    /// Options with this name and nothing else changed.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Adds one `postgresql.conf` setting.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Sets the superuser's password (TCP connections then require scram-sha-256).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }
}

impl fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("name", &self.name)
            .field("settings", &self.settings)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// How [`Cluster::stop`] shuts the server down (`pg_ctl stop -m ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Roll back open transactions, checkpoint, exit cleanly.
    Fast,
    /// Exit at once, as in a crash: the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_pg_ctl(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// The last lines of a cluster's server log, carried by an error.
#[derive(Clone, Debug, Default)]
pub struct LogTail {
    /// Where the log is.
    pub path: PathBuf,
    /// Its last lines (empty when the log is empty or unreadable).
    pub text: String,
}

impl fmt::Display for LogTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.trim().is_empty() {
            return Ok(());
        }
        write!(
            f,
            "\n--- last lines of the server log {} ---\n{}",
            self.path.display(),
            self.text.trim_end()
        )
    }
}

/// Why a cluster could not be started, stopped or used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error("PostgreSQL server binaries not found: {0}")]
    BinariesNotFound(String),
    /// [`ClusterOptions`] asked for something that cannot be done.
    #[error("invalid cluster options: {0}")]
    InvalidOptions(String),
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error("running as root needs a `postgres` OS user to run PostgreSQL as: {0}")]
    NoPostgresUser(String),
    /// A file-system operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A PostgreSQL tool (`initdb`, `pg_ctl`) failed.
    #[error("{command} failed ({status}){output}{log}")]
    Command {
        command: String,
        status: String,
        output: String,
        log: LogTail,
    },
    /// The server did not come up, or did something else unexpected.
    #[error("{message}{log}")]
    Server { message: String, log: LogTail },
    /// Connecting or running SQL failed.
    #[error("{context}: {detail}{log}")]
    Postgres {
        context: String,
        /// `source` and its causes, as text (the server's message for an SQL error).
        detail: String,
        #[source]
        source: tokio_postgres::Error,
        log: LogTail,
    },
}

impl ClusterError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }

    /// The server's error code when this is an error PostgreSQL sent back.
    pub fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            ClusterError::Postgres { source, .. } => source.code(),
            _ => None,
        }
    }
}

/// The OS user the server tools run as when this process is root.
#[derive(Clone, Copy, Debug)]
struct RunAs {
    uid: u32,
    gid: u32,
}

/// A running throwaway PostgreSQL cluster; dropping it stops the server and removes its files.
pub struct Cluster {
    name: String,
    bin_dir: PathBuf,
    /// The temporary directory holding everything; `None` only while dropping.
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    password: Option<String>,
    run_as: Option<RunAs>,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("socket_dir", &self.socket_dir)
            .field("log_path", &self.log_path)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Cluster {
    /// Creates a new cluster in a fresh temporary directory, starts it on a free port and waits
    /// until it accepts connections.
    pub async fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let settings = render_settings(&opts)?;
        let bin_dir = Cluster::bin_dir()?;
        let short_name = short_label(&opts.name);

        let base = temp_base();
        let root = tempfile::Builder::new()
            .prefix(&format!("cutover-{short_name}-"))
            .tempdir_in(&base)
            .map_err(|e| {
                ClusterError::io(format!("create a directory in {}", base.display()), e)
            })?;
        let root_path = root.path().to_path_buf();
        let owner = std::fs::metadata(&root_path)
            .map_err(|e| ClusterError::io(format!("inspect {}", root_path.display()), e))?
            .uid();
        let run_as = if owner == 0 {
            Some(postgres_user()?)
        } else {
            None
        };

        // From here on, dropping `cluster` cleans up whatever was started or written.
        let mut cluster = Cluster {
            name: opts.name.clone(),
            bin_dir,
            data_dir: root_path.join("data"),
            socket_dir: root_path.join("sock"),
            log_path: root_path.join("server.log"),
            root_path,
            root: Some(root),
            port: 0,
            password: opts.password.clone(),
            run_as,
        };
        cluster.init(&opts.name, &settings).await?;

        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = reserve_free_port()?;
            release_port(cluster.port);
            cluster.port = port;
            cluster.write_managed_conf()?;
            let log_start = std::fs::metadata(&cluster.log_path).map_or(0, |m| m.len());
            match cluster.launch().await {
                Ok(()) => break,
                Err(e) if attempt < PORT_ATTEMPTS && cluster.port_was_taken(log_start) => {
                    tracing::debug!(cluster = %cluster.name, port, "port taken, trying another: {e}");
                    // The failed attempt's lines stay in the log; mark where the next begins.
                    cluster.note_in_log(&format!("cutover: port {port} was taken, retrying"));
                }
                Err(e) => return Err(e),
            }
        }
        cluster.wait_ready().await?;
        tracing::debug!(
            cluster = %cluster.name,
            port = cluster.port,
            data_dir = %cluster.data_dir.display(),
            "PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// The cluster's label ([`ClusterOptions::name`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The TCP port the server listens on (the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on: `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The superuser's name: `"postgres"`.
    pub fn user(&self) -> &str {
        SUPERUSER
    }

    /// The superuser's password, when the cluster has one.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// The directory holding the server's unix socket (`.s.PGSQL.<port>`); connections through
    /// it are always `trust`.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The data directory (`PGDATA`).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (the server's stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The directory holding the server binaries this cluster runs.
    pub fn server_bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The postmaster's process id, read from `postmaster.pid`, while the server runs.
    pub fn pid(&self) -> Option<u32> {
        read_postmaster_pid(&self.data_dir)
    }

    /// `postgresql://postgres@127.0.0.1:PORT/dbname`, without the password.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://{SUPERUSER}@{HOST}:{}/{}",
            self.port,
            percent_encode(dbname)
        )
    }

    /// Like [`Cluster::url`], with the password (percent-encoded) when the cluster has one.
    pub fn url_with_password(&self, dbname: &str) -> String {
        match &self.password {
            None => self.url(dbname),
            Some(password) => format!(
                "postgresql://{SUPERUSER}:{}@{HOST}:{}/{}",
                percent_encode(password),
                self.port,
                percent_encode(dbname)
            ),
        }
    }

    /// A client configuration for the superuser over TCP, with the password when there is one.
    pub fn client_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(HOST)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(dbname)
            .application_name("cutover-cluster")
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }

    /// Connects as the superuser over TCP; the connection runs on a spawned task.
    pub async fn connect(&self, dbname: &str) -> Result<tokio_postgres::Client, ClusterError> {
        let (client, connection) = self
            .client_config(dbname)
            .connect(NoTls)
            .await
            .map_err(|e| self.pg_error(format!("connect to {}", self.url(dbname)), e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("cluster connection closed with an error: {e}");
            }
        });
        Ok(client)
    }

    /// Creates a database (owned by the superuser).
    pub async fn create_database(&self, name: &str) -> Result<(), ClusterError> {
        self.execute(
            "postgres",
            &format!("CREATE DATABASE {}", quote_ident(name)),
        )
        .await
    }

    /// Runs SQL (one or more statements, no parameters) in a database, on a new connection.
    pub async fn execute(&self, dbname: &str, sql: &str) -> Result<(), ClusterError> {
        let client = self.connect(dbname).await?;
        client
            .batch_execute(sql)
            .await
            .map_err(|e| self.pg_error(format!("run SQL in database {dbname:?}"), e))
    }

    /// Stops the server, then starts it again on the same port and waits until it accepts
    /// connections. After [`StopMode::Immediate`] the start runs crash recovery.
    pub async fn restart(&self, mode: StopMode) -> Result<(), ClusterError> {
        self.stop(mode).await?;
        self.start_again().await
    }

    /// Stops the server (`pg_ctl stop -m fast|immediate`) and waits until it is gone.
    pub async fn stop(&self, mode: StopMode) -> Result<(), ClusterError> {
        let timeout = START_TIMEOUT.as_secs().to_string();
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-m",
            mode.as_pg_ctl(),
            "-w",
            "-t",
            &timeout,
            "-s",
            "stop",
        ]);
        self.run(cmd, "pg_ctl stop").await?;
        tracing::debug!(cluster = %self.name, ?mode, "PostgreSQL cluster stopped");
        Ok(())
    }

    /// Starts a stopped server again on the same port and waits until it accepts connections.
    pub async fn start_again(&self) -> Result<(), ClusterError> {
        self.launch().await?;
        self.wait_ready().await
    }

    /// The last `lines` lines of the server log (empty when there is none).
    pub fn log_tail(&self, lines: usize) -> String {
        tail_of_file(&self.log_path, lines)
    }

    /// The directory with `initdb`, `pg_ctl` and `postgres`: `$CUTOVER_PG_BINDIR` when set,
    /// else `pg_config --bindir` when it has the server, else the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn bin_dir() -> Result<PathBuf, ClusterError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV) {
            let dir = PathBuf::from(dir);
            return if has_server(&dir) {
                Ok(dir)
            } else {
                Err(ClusterError::BinariesNotFound(format!(
                    "${BINDIR_ENV} is {} but initdb, pg_ctl and postgres are not all there",
                    dir.display()
                )))
            };
        }
        if let Ok(out) = std::process::Command::new("pg_config")
            .arg("--bindir")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            && out.status.success()
        {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return Ok(dir);
            }
        }
        let mut found: Vec<(Vec<u32>, PathBuf)> = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let version = entry.file_name().to_string_lossy().into_owned();
                let Some(key) = version
                    .split('.')
                    .map(|part| part.parse::<u32>().ok())
                    .collect::<Option<Vec<u32>>>()
                else {
                    continue;
                };
                let dir = entry.path().join("bin");
                if has_server(&dir) {
                    found.push((key, dir));
                }
            }
        }
        found.sort();
        found.pop().map(|(_, dir)| dir).ok_or_else(|| {
            ClusterError::BinariesNotFound(
                "neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin has initdb, pg_ctl \
                 and postgres; install PostgreSQL (scripts/install-deps.sh) or set \
                 $CUTOVER_PG_BINDIR"
                    .to_owned(),
            )
        })
    }

    // ----- internals -----

    /// `initdb`, then the authentication rules and the include of the managed settings.
    async fn init(&self, name: &str, settings: &str) -> Result<(), ClusterError> {
        self.give_to_server(&self.root_path)?;
        create_dir(&self.socket_dir)?;
        self.give_to_server(&self.socket_dir)?;

        let pwfile = self.root_path.join("pwfile");
        if let Some(password) = &self.password {
            write_file(&pwfile, &format!("{password}\n"), 0o600)?;
            self.give_to_server(&pwfile)?;
        }
        let mut cmd = self.tool("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "--no-sync",
            "-A",
            "trust",
            "-U",
            SUPERUSER,
            "--encoding=UTF8",
            "--locale=C",
        ]);
        if self.password.is_some() {
            cmd.arg(format!("--pwfile={}", pwfile.display()));
        }
        let result = self.run(cmd, "initdb").await;
        if self.password.is_some() {
            let _ = std::fs::remove_file(&pwfile);
        }
        result?;

        let host_method = if self.password.is_some() {
            "scram-sha-256"
        } else {
            "trust"
        };
        let hba = format!(
            "# Written by cutover::cluster.\n\
             local all all trust\n\
             local replication all trust\n\
             host all all {HOST}/32 {host_method}\n\
             host replication all {HOST}/32 {host_method}\n"
        );
        let hba_path = self.data_dir.join("pg_hba.conf");
        write_file(&hba_path, &hba, 0o600)?;
        self.give_to_server(&hba_path)?;

        let conf_path = self.data_dir.join("cutover.conf");
        let mut general = format!(
            "# Written by cutover::cluster.\n\
             cluster_name = '{}'\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             logging_collector = off\n\
             log_min_messages = warning\n\
             shared_buffers = '128MB'\n\
             max_connections = 100\n",
            conf_escape(&short_label(name))
        );
        general.push_str(settings);
        write_file(&conf_path, &general, 0o600)?;
        self.give_to_server(&conf_path)?;

        let main_conf = self.data_dir.join("postgresql.conf");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&main_conf)
            .map_err(|e| ClusterError::io(format!("open {}", main_conf.display()), e))?;
        file.write_all(
            b"\n# Added by cutover::cluster: its settings, then the port and sockets.\n\
              include 'cutover.conf'\n\
              include 'cutover-net.conf'\n",
        )
        .map_err(|e| ClusterError::io(format!("write {}", main_conf.display()), e))?;
        Ok(())
    }

    /// Writes the settings that pin the server to this cluster's port and socket directory.
    fn write_managed_conf(&self) -> Result<(), ClusterError> {
        let path = self.data_dir.join("cutover-net.conf");
        let text = format!(
            "# Written by cutover::cluster.\n\
             listen_addresses = '{HOST}'\n\
             port = {}\n\
             unix_socket_directories = '{}'\n",
            self.port,
            conf_escape(&self.socket_dir.to_string_lossy())
        );
        write_file(&path, &text, 0o600)?;
        self.give_to_server(&path)
    }

    /// `pg_ctl start -w`: returns once the server is up (or has failed to come up).
    async fn launch(&self) -> Result<(), ClusterError> {
        let timeout = START_TIMEOUT.as_secs().to_string();
        let mut cmd = self.tool("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .args(["-w", "-t", &timeout, "-s", "start"]);
        self.run(cmd, "pg_ctl start").await.map(|_| ())
    }

    /// Polls until a connection to the `postgres` database succeeds, or the deadline passes.
    async fn wait_ready(&self) -> Result<(), ClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let attempt = self.client_config("postgres").connect(NoTls).await;
            match attempt {
                Ok((client, connection)) => {
                    drop(client);
                    // The client is gone, so the connection ends by itself.
                    let _ = connection.await;
                    return Ok(());
                }
                Err(e) if Instant::now() >= deadline => {
                    return Err(self.pg_error(
                        format!(
                            "PostgreSQL on {HOST}:{} did not accept connections within {}s",
                            self.port,
                            START_TIMEOUT.as_secs()
                        ),
                        e,
                    ));
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Whether the start whose log lines begin at byte `log_start` failed because the TCP
    /// port was already in use.
    fn port_was_taken(&self, log_start: u64) -> bool {
        let Ok(bytes) = std::fs::read(&self.log_path) else {
            return false;
        };
        let start = usize::try_from(log_start).unwrap_or(0).min(bytes.len());
        let log = String::from_utf8_lossy(&bytes[start..]);
        // "could not bind ... Address already in use" is a LOG line, below log_min_messages;
        // the WARNING and FATAL that follow it are what the log has.
        log.contains("Address already in use")
            || log.contains("could not create listen socket")
            || log.contains("could not create any TCP/IP sockets")
    }

    fn note_in_log(&self, line: &str) {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log_path)
        {
            let _ = writeln!(file, "{line}");
        }
    }

    /// A command for one of the server tools, run as `postgres` when this process is root.
    fn tool_std(&self, program: &str) -> std::process::Command {
        let binary = self.bin_dir.join(program);
        let mut cmd = if self.run_as.is_some() {
            let mut cmd = std::process::Command::new("runuser");
            cmd.args(["-u", SUPERUSER, "--"]).arg(binary);
            cmd
        } else {
            std::process::Command::new(binary)
        };
        cmd.current_dir(&self.root_path)
            .stdin(Stdio::null())
            .env("LC_ALL", "C");
        for var in PG_ENV {
            cmd.env_remove(var);
        }
        cmd
    }

    fn tool(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::from(self.tool_std(program));
        cmd.kill_on_drop(true);
        cmd
    }

    async fn run(
        &self,
        mut cmd: tokio::process::Command,
        what: &str,
    ) -> Result<Output, ClusterError> {
        let output = cmd
            .output()
            .await
            .map_err(|e| ClusterError::io(format!("run {what}"), e))?;
        if output.status.success() {
            return Ok(output);
        }
        let mut text = String::new();
        for stream in [&output.stdout, &output.stderr] {
            let part = String::from_utf8_lossy(stream);
            if !part.trim().is_empty() {
                text.push('\n');
                text.push_str(part.trim_end());
            }
        }
        Err(ClusterError::Command {
            command: what.to_owned(),
            status: output.status.to_string(),
            output: text,
            log: self.log_for_error(),
        })
    }

    fn log_for_error(&self) -> LogTail {
        LogTail {
            path: self.log_path.clone(),
            text: self.log_tail(ERROR_LOG_LINES),
        }
    }

    fn pg_error(&self, context: String, source: tokio_postgres::Error) -> ClusterError {
        // An error the server sent back is about the SQL, not the server: keep it short.
        let log = if source.as_db_error().is_some() {
            LogTail::default()
        } else {
            self.log_for_error()
        };
        let mut detail = source.to_string();
        let mut cause = std::error::Error::source(&source);
        while let Some(inner) = cause {
            let text = inner.to_string();
            if !detail.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            cause = inner.source();
        }
        ClusterError::Postgres {
            context,
            detail,
            source,
            log,
        }
    }

    /// Hands a path to the `postgres` OS user when the tools run as that user.
    fn give_to_server(&self, path: &Path) -> Result<(), ClusterError> {
        if let Some(RunAs { uid, gid }) = self.run_as {
            std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| {
                ClusterError::io(format!("give {} to the postgres user", path.display()), e)
            })?;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if read_postmaster_pid(&self.data_dir).is_some() {
            let status = self
                .tool_std("pg_ctl")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "-t", "30", "-s", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if !matches!(status, Ok(s) if s.success()) {
                // pg_ctl could not stop it: kill the postmaster outright.
                if let Some(pid) = read_postmaster_pid(&self.data_dir) {
                    tracing::warn!(cluster = %self.name, pid, "pg_ctl stop failed; killing the postmaster");
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
        release_port(self.port);
        if let Some(root) = self.root.take()
            && let Err(e) = root.close()
        {
            tracing::warn!(cluster = %self.name, "could not remove {}: {e}", self.root_path.display());
        }
    }
}

// ----- helpers -----

/// Where the temporary directories go: short, so that socket paths stay under ~107 bytes, and
/// reachable by the `postgres` user when running as root. `CUTOVER_TMPDIR` overrides it (it
/// must be short and traversable by that user too).
fn temp_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("CUTOVER_TMPDIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let tmp = Path::new("/tmp");
    if tmp.is_dir() {
        tmp.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// The name reduced to at most 16 characters of `[A-Za-z0-9_-]`.
fn short_label(name: &str) -> String {
    let label: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(16)
        .collect();
    if label.is_empty() {
        "pg".to_owned()
    } else {
        label
    }
}

/// The user's settings as `postgresql.conf` lines, after checking their names.
fn render_settings(opts: &ClusterOptions) -> Result<String, ClusterError> {
    let mut text = String::new();
    for (name, value) in &opts.settings {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
        if !valid {
            return Err(ClusterError::InvalidOptions(format!(
                "{name:?} is not a setting name"
            )));
        }
        if MANAGED_SETTINGS.contains(&name.to_ascii_lowercase().as_str()) {
            return Err(ClusterError::InvalidOptions(format!(
                "{name} is managed by the cluster itself"
            )));
        }
        text.push_str(&format!("{name} = '{}'\n", conf_escape(value)));
    }
    Ok(text)
}

/// Escapes a value for a single-quoted `postgresql.conf` string.
fn conf_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn has_server(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|tool| dir.join(tool).is_file())
}

fn read_postmaster_pid(data_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

fn tail_of_file(path: &Path, lines: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out
}

fn create_dir(path: &Path) -> Result<(), ClusterError> {
    std::fs::create_dir(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| ClusterError::io(format!("create {}", path.display()), e))
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<(), ClusterError> {
    std::fs::write(path, text)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| ClusterError::io(format!("write {}", path.display()), e))
}

/// The `postgres` OS user's uid and gid (`id -u postgres`, `id -g postgres`).
fn postgres_user() -> Result<RunAs, ClusterError> {
    static USER: OnceLock<Result<RunAs, String>> = OnceLock::new();
    let found = USER.get_or_init(|| {
        let id = |flag: &str| -> Result<u32, String> {
            let out = std::process::Command::new("id")
                .args([flag, SUPERUSER])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run `id`: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "`id {flag} {SUPERUSER}` failed: {} (install the postgresql package, or \
                     `useradd --system postgres`)",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .map_err(|e| format!("`id {flag} {SUPERUSER}` printed no number: {e}"))
        };
        Ok(RunAs {
            uid: id("-u")?,
            gid: id("-g")?,
        })
    });
    found.clone().map_err(ClusterError::NoPostgresUser)
}

/// Ports handed to live clusters of this process, so that no two of them pick the same one
/// (and none takes the port of a cluster that is restarting).
fn ports_in_use() -> &'static Mutex<BTreeSet<u16>> {
    static PORTS: OnceLock<Mutex<BTreeSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(BTreeSet::new()))
}

/// A port that is free on 127.0.0.1 right now and not held by another cluster of this process.
fn reserve_free_port() -> Result<u16, ClusterError> {
    for _ in 0..64 {
        let listener = TcpListener::bind((HOST, 0))
            .map_err(|e| ClusterError::io(format!("find a free port on {HOST}"), e))?;
        let port = listener
            .local_addr()
            .map_err(|e| ClusterError::io("read the port of a listener", e))?
            .port();
        drop(listener);
        let mut ports = ports_in_use().lock().unwrap_or_else(|e| e.into_inner());
        if ports.insert(port) {
            return Ok(port);
        }
    }
    Err(ClusterError::Server {
        message: "could not find a free TCP port".to_owned(),
        log: LogTail::default(),
    })
}

fn release_port(port: u16) {
    if port != 0 {
        ports_in_use()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_quoted_and_checked() {
        let opts = ClusterOptions::default()
            .setting("fsync", "off")
            .setting("search_path", "a, 'b'\\c");
        assert_eq!(
            render_settings(&opts).unwrap(),
            "fsync = 'off'\nsearch_path = 'a, ''b''\\\\c'\n"
        );
        for bad in ["port", "PORT", "unix_socket_directories", "a = b", ""] {
            let opts = ClusterOptions::default().setting(bad, "1");
            assert!(render_settings(&opts).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn labels_are_short_and_safe() {
        assert_eq!(short_label("a/b c-d_e"), "abc-d_e");
        assert_eq!(short_label(""), "pg");
        assert_eq!(short_label(&"x".repeat(40)).len(), 16);
    }

    #[test]
    fn urls_encode_what_they_must() {
        assert_eq!(percent_encode("shop"), "shop");
        assert_eq!(percent_encode("p@ss w/rd"), "p%40ss%20w%2Frd");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn log_tail_takes_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "1\n2\n3\n").unwrap();
        assert_eq!(tail_of_file(&path, 2), "2\n3\n");
        assert_eq!(tail_of_file(&path, 10), "1\n2\n3\n");
        assert_eq!(tail_of_file(&dir.path().join("none"), 3), "");
    }
}
