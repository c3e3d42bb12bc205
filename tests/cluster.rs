//! Throwaway PostgreSQL clusters (`cutover::cluster`): start, settings, SQL, crash restart,
//! isolation and cleanup. Each test starts its own clusters, so they run in parallel.

use std::path::Path;

use cutover::cluster::{Cluster, ClusterError, ClusterOptions, StopMode};

async fn show(cluster: &Cluster, setting: &str) -> String {
    let client = cluster.connect("postgres").await.expect("connect");
    let row = client
        .query_one(&format!("SHOW {setting}"), &[])
        .await
        .expect("SHOW");
    row.get(0)
}

async fn count(cluster: &Cluster, dbname: &str, table: &str) -> i64 {
    let client = cluster.connect(dbname).await.expect("connect");
    let row = client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count");
    row.get(0)
}

/// Whether a process with this id still runs (a zombie waiting to be reaped counts as gone).
fn process_runs(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("");
            !matches!(state, "Z" | "X" | "x")
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn starts_with_logical_decoding_settings() {
    let cluster = Cluster::start(ClusterOptions::named("settings"))
        .await
        .expect("start");
    assert_eq!(show(&cluster, "wal_level").await, "logical");
    assert_eq!(show(&cluster, "max_replication_slots").await, "20");
    assert_eq!(show(&cluster, "max_wal_senders").await, "20");
    assert_eq!(show(&cluster, "fsync").await, "on");
    assert_eq!(show(&cluster, "listen_addresses").await, "127.0.0.1");
    assert_eq!(show(&cluster, "port").await, cluster.port().to_string());
    assert_eq!(show(&cluster, "server_encoding").await, "UTF8");

    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(
        cluster.url("postgres"),
        format!(
            "postgresql://postgres@127.0.0.1:{}/postgres",
            cluster.port()
        )
    );
    assert!(cluster.data_dir().join("PG_VERSION").is_file());
    let socket = cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()));
    assert!(
        socket.as_os_str().len() < 100,
        "socket path too long: {socket:?}"
    );
    assert!(socket.exists(), "no unix socket at {socket:?}");
    assert!(cluster.log_path().exists());
    assert!(cluster.pid().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_override_the_defaults() {
    let opts = ClusterOptions::named("override")
        .setting("fsync", "off")
        .setting("max_replication_slots", "7")
        .setting("application_name", "it's \\ quoted");
    let cluster = Cluster::start(opts).await.expect("start");
    assert_eq!(show(&cluster, "fsync").await, "off");
    assert_eq!(show(&cluster, "max_replication_slots").await, "7");
    assert_eq!(show(&cluster, "wal_level").await, "logical");
}

#[tokio::test(flavor = "multi_thread")]
async fn managed_settings_are_refused() {
    let err = Cluster::start(ClusterOptions::default().setting("port", "5432"))
        .await
        .expect_err("port is managed");
    assert!(matches!(err, ClusterError::InvalidOptions(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_cannot_start_reports_its_log() {
    let opts = ClusterOptions::named("broken").setting("shared_buffers", "not-a-size");
    let err = Cluster::start(opts).await.expect_err("bad setting");
    let text = err.to_string();
    assert!(text.contains("pg_ctl start"), "{text}");
    assert!(text.contains("shared_buffers"), "no server log in: {text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn creates_databases_and_runs_sql() {
    let cluster = Cluster::start(ClusterOptions::named("sql"))
        .await
        .expect("start");
    cluster.create_database("shop").await.expect("create db");
    cluster
        .execute(
            "shop",
            "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
             INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 10) g;",
        )
        .await
        .expect("execute");
    assert_eq!(count(&cluster, "shop", "orders").await, 10);

    let err = cluster
        .execute("shop", "SELECT * FROM no_such_table")
        .await
        .expect_err("missing table");
    assert_eq!(
        err.sql_state(),
        Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE),
        "{err}"
    );
    assert!(err.to_string().contains("no_such_table"), "{err}");
    assert!(cluster.create_database("shop").await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn committed_data_survives_an_immediate_restart() {
    let cluster = Cluster::start(ClusterOptions::named("crash"))
        .await
        .expect("start");
    let port = cluster.port();
    let pid_before = cluster.pid().expect("pid");
    cluster
        .execute(
            "postgres",
            "CREATE TABLE t (id int PRIMARY KEY);
             INSERT INTO t SELECT generate_series(1, 1000);",
        )
        .await
        .expect("insert");

    cluster.restart(StopMode::Immediate).await.expect("restart");
    assert_eq!(cluster.port(), port);
    assert_ne!(
        cluster.pid(),
        Some(pid_before),
        "the postmaster was not replaced"
    );
    assert_eq!(count(&cluster, "postgres", "t").await, 1000);

    // And once more, cleanly, then stopped and started by hand.
    cluster
        .execute("postgres", "INSERT INTO t VALUES (1001)")
        .await
        .expect("insert");
    cluster.restart(StopMode::Fast).await.expect("fast restart");
    assert_eq!(count(&cluster, "postgres", "t").await, 1001);

    cluster.stop(StopMode::Immediate).await.expect("stop");
    assert!(cluster.pid().is_none());
    assert!(cluster.connect("postgres").await.is_err());
    cluster.start_again().await.expect("start again");
    assert_eq!(cluster.port(), port);
    assert_eq!(count(&cluster, "postgres", "t").await, 1001);
}

#[tokio::test(flavor = "multi_thread")]
async fn password_protects_tcp_but_not_the_socket() {
    let password = "s3cret 'pa$$' @/:";
    let cluster = Cluster::start(ClusterOptions::named("password").password(password))
        .await
        .expect("start");
    assert_eq!(cluster.password(), Some(password));
    assert!(!cluster.url("postgres").contains("s3cret"));

    // connect() uses the password.
    assert_eq!(show(&cluster, "wal_level").await, "logical");
    let client = cluster.connect("postgres").await.expect("connect");
    let method: String = client
        .query_one(
            "SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host' LIMIT 1",
            &[],
        )
        .await
        .expect("hba")
        .get(0);
    assert_eq!(method, "scram-sha-256");

    // Without it, TCP is refused.
    let mut config = tokio_postgres::Config::new();
    config
        .host(cluster.host())
        .port(cluster.port())
        .user("postgres")
        .dbname("postgres");
    let err = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("TCP without a password must fail");
    // tokio-postgres refuses on its own once the server asks for a password it lacks.
    assert!(
        format!("{err:?}").to_lowercase().contains("password"),
        "unexpected error: {err:?}"
    );
    // A wrong one too.
    config.password("wrong");
    let err = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("a wrong password must fail");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );

    // The unix socket needs none.
    let mut local = tokio_postgres::Config::new();
    local
        .host_path(cluster.socket_dir())
        .port(cluster.port())
        .user("postgres")
        .dbname("postgres");
    let (client, connection) = local
        .connect(tokio_postgres::NoTls)
        .await
        .expect("socket connect without password");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("select");

    // The URL with the password works for a client that parses it.
    let config: tokio_postgres::Config = cluster
        .url_with_password("postgres")
        .parse()
        .expect("parse url");
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("connect with url");
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.expect("select");

    cluster.restart(StopMode::Immediate).await.expect("restart");
    assert_eq!(show(&cluster, "wal_level").await, "logical");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_clusters_are_isolated() {
    let (a, b) = tokio::join!(
        Cluster::start(ClusterOptions::named("left")),
        Cluster::start(ClusterOptions::named("right")),
    );
    let (a, b) = (a.expect("start a"), b.expect("start b"));
    assert_ne!(a.port(), b.port());
    assert_ne!(a.data_dir(), b.data_dir());
    assert_ne!(a.socket_dir(), b.socket_dir());
    assert_ne!(a.log_path(), b.log_path());

    a.execute("postgres", "CREATE TABLE only_in_a (x int)")
        .await
        .expect("create in a");
    b.execute("postgres", "SELECT 1").await.expect("b works");
    assert!(
        b.execute("postgres", "SELECT * FROM only_in_a")
            .await
            .is_err()
    );

    // Restarting one leaves the other alone.
    a.restart(StopMode::Immediate).await.expect("restart a");
    b.execute("postgres", "SELECT 1")
        .await
        .expect("b still works");
}

#[tokio::test(flavor = "multi_thread")]
async fn drop_stops_the_server_and_removes_its_files() {
    let cluster = Cluster::start(ClusterOptions::named("dropped"))
        .await
        .expect("start");
    let pid = cluster.pid().expect("postmaster pid");
    let data_dir = cluster.data_dir().to_path_buf();
    let socket_dir = cluster.socket_dir().to_path_buf();
    let url = cluster.url("postgres");
    assert!(process_runs(pid));
    assert!(data_dir.exists());

    drop(cluster);

    assert!(!process_runs(pid), "postmaster {pid} still runs");
    assert!(!Path::new(&data_dir).exists(), "{data_dir:?} remains");
    assert!(!socket_dir.exists(), "{socket_dir:?} remains");
    let config: tokio_postgres::Config = url.parse().expect("parse url");
    assert!(config.connect(tokio_postgres::NoTls).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn log_tail_and_bin_dir() {
    let bin = Cluster::bin_dir().expect("bin dir");
    assert!(bin.join("initdb").is_file());
    assert!(bin.join("postgres").is_file());

    let cluster = Cluster::start(ClusterOptions::named("log"))
        .await
        .expect("start");
    assert_eq!(cluster.server_bin_dir(), bin.as_path());
    // A statement that fails is logged at ERROR.
    let _ = cluster
        .execute("postgres", "SELECT 'marker-in-the-log'::int")
        .await;
    let tail = cluster.log_tail(20);
    assert!(tail.contains("marker-in-the-log"), "log tail: {tail}");
    assert!(cluster.log_tail(1).lines().count() <= 1);
}
