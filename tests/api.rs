//! The HTTP API and its clients, without databases: a server over a status the test
//! fills in, queried through `cutover::api_client`, raw TCP and the `cutover` binary.

use std::net::SocketAddr;
use std::process::Output;
use std::time::Duration;

use cutover::api::{self, ApiState};
use cutover::api_client::{self, ClientErrorKind, Endpoint};
use cutover::ready::ReadyConfig;
use cutover::status::{JobStatus, Phase, StatusHandle, TableStatus, VerificationSummary};
use cutover_config::Secret;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running API server; stops when dropped (or explicitly, to check shutdown).
struct Server {
    addr: SocketAddr,
    status: StatusHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    async fn start(token: Option<&str>) -> Server {
        let status = StatusHandle::new(snapshotting_status());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = ApiState {
            status: status.clone(),
            ready_config: ReadyConfig {
                max_lag: Duration::from_secs(5),
                max_verify_age: Duration::from_secs(1800),
            },
            prometheus: cutover::metrics::install(),
            token: token.map(Secret::new),
            verifier: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            status,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn endpoint(&self, token: Option<&str>) -> Endpoint {
        Endpoint::new(&self.addr.to_string(), token.map(Secret::new)).unwrap()
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the server stops on shutdown")
            .unwrap()
            .unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A job in the middle of its initial copy: one table done, one not, no lag known.
fn snapshotting_status() -> JobStatus {
    let mut status = JobStatus::new("shop-v2");
    status.phase = Phase::Snapshot;
    status.source_lsn = Some("0/16B6C50".into());
    status.tables = vec![
        TableStatus {
            source: "public.orders".into(),
            target: "v2.orders".into(),
            rows_copied: 1200,
            bytes_copied: 64_000,
            snapshot_done: true,
            needs_attention: None,
            notes: Vec::new(),
        },
        TableStatus {
            source: "public.items".into(),
            target: "v2.items".into(),
            rows_copied: 17,
            bytes_copied: 900,
            snapshot_done: false,
            needs_attention: None,
            notes: Vec::new(),
        },
    ];
    status
}

/// The same job, caught up.
fn make_ready(status: &mut JobStatus) {
    status.phase = Phase::Streaming;
    for table in &mut status.tables {
        table.snapshot_done = true;
    }
    status.applied_lsn = Some("0/16B6C50".into());
    status.lag_bytes = Some(0);
    status.lag_seconds = Some(0.3);
    status.last_verification = Some(VerificationSummary {
        finished_at: "2025-01-01T00:00:00Z".into(),
        lsn: Some("0/16B0000".into()),
        tables_equal: true,
        differences: 0,
        finished: Some(std::time::SystemTime::now()),
    });
}

/// `GET path` over a raw TCP connection; returns (status code, whole response text).
async fn raw_get(addr: SocketAddr, path: &str, authorization: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let auth = authorization.map_or_else(String::new, |a| format!("Authorization: {a}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    (code, response)
}

/// Runs the `cutover` binary with a clean environment for the API token and logging.
async fn cutover(args: &[&str], token: Option<&str>) -> Output {
    let env: Vec<(&str, &str)> = token
        .map(|t| ("CUTOVER_API_TOKEN", t))
        .into_iter()
        .collect();
    cutover_with_env(args, &env).await
}

/// Runs the `cutover` binary with `env` set and no ambient API token or RUST_LOG.
async fn cutover_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_cutover"));
    command
        .args(args)
        .env_remove("CUTOVER_API_TOKEN")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied());
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("cutover finishes")
        .expect("cutover runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn status_document_has_the_contract_fields() {
    let server = Server::start(None).await;
    let doc = api_client::fetch_status(&server.endpoint(None))
        .await
        .unwrap();
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
        assert!(doc.get(field).is_some(), "no {field} in {doc}");
    }
    assert_eq!(doc["job"], "shop-v2");
    assert_eq!(doc["phase"], "snapshot");
    assert_eq!(doc["source_lsn"], "0/16B6C50");
    assert!(doc["applied_lsn"].is_null());
    assert!(doc["last_verification"].is_null());
    let table = &doc["tables"][1];
    assert_eq!(table["source"], "public.items");
    assert_eq!(table["target"], "v2.items");
    assert_eq!(table["rows_copied"], 17);
    assert_eq!(table["snapshot_done"], false);

    server.status.update(make_ready);
    let doc = api_client::fetch_status(&server.endpoint(None))
        .await
        .unwrap();
    assert_eq!(doc["phase"], "streaming");
    assert_eq!(doc["lag_bytes"], 0);
    assert_eq!(doc["lag_seconds"], 0.3);
    let verification = &doc["last_verification"];
    for field in ["finished_at", "lsn", "tables_equal", "differences"] {
        assert!(
            verification.get(field).is_some(),
            "no {field} in {verification}"
        );
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_is_503_with_unmet_gates_then_200() {
    let server = Server::start(None).await;
    let answer = api_client::fetch_ready(&server.endpoint(None))
        .await
        .unwrap();
    assert_eq!(answer.http_status, 503);
    assert!(!answer.ready);
    let gates: Vec<&str> = answer.document["unmet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["gate"].as_str().unwrap())
        .collect();
    assert_eq!(gates, ["streaming", "snapshot", "lag", "verified"]);
    for gate in answer.document["unmet"].as_array().unwrap() {
        assert!(!gate["detail"].as_str().unwrap().is_empty(), "{gate}");
    }
    assert!(
        answer.document["unmet"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("public.items")
    );

    server.status.update(make_ready);
    let answer = api_client::fetch_ready(&server.endpoint(None))
        .await
        .unwrap();
    assert_eq!(answer.http_status, 200);
    assert!(answer.ready);
    assert_eq!(answer.document["unmet"], serde_json::json!([]));

    server.status.update(|s| s.lag_seconds = Some(60.0));
    let answer = api_client::fetch_ready(&server.endpoint(None))
        .await
        .unwrap();
    assert_eq!(answer.http_status, 503);
    assert_eq!(answer.document["unmet"][0]["gate"], "lag");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_token_is_required_except_for_healthz() {
    let token = "s3cret-token";
    let server = Server::start(Some(token)).await;

    for path in ["/v1/status", "/v1/ready", "/metrics"] {
        let (code, response) = raw_get(server.addr, path, None).await;
        assert_eq!(code, 401, "{path}: {response}");
        assert!(response.contains("\"error\""), "{path}: {response}");
        assert!(response.contains("www-authenticate"), "{path}: {response}");

        let (code, response) = raw_get(server.addr, path, Some("Bearer wrong-token")).await;
        assert_eq!(code, 401, "{path}: {response}");
        assert!(
            !response.contains(token),
            "{path} leaks the token: {response}"
        );

        let (code, response) = raw_get(server.addr, path, Some(&format!("Bearer {token}"))).await;
        let expected = if path == "/v1/ready" { 503 } else { 200 };
        assert_eq!(code, expected, "{path}: {response}");
    }
    let (code, response) = raw_get(server.addr, "/healthz", None).await;
    assert_eq!(code, 200, "{response}");
    assert!(response.ends_with("ok\n"), "{response}");

    let err = api_client::fetch_status(&server.endpoint(Some("nope")))
        .await
        .unwrap_err();
    assert_eq!(err.kind, ClientErrorKind::Unauthorized);
    let message = err.to_string();
    assert!(message.contains("refused the request"), "{message}");
    assert!(message.contains("hint:"), "{message}");
    assert!(
        !message.contains("nope"),
        "the message leaks the token: {message}"
    );

    let doc = api_client::fetch_status(&server.endpoint(Some(token)))
        .await
        .unwrap();
    assert_eq!(doc["job"], "shop-v2");

    // The binary reads the token from CUTOVER_API_TOKEN.
    let addr = server.addr.to_string();
    let out = cutover(&["status", "--api", &addr, "--json"], None).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("CUTOVER_API_TOKEN"),
        "{}",
        text(&out.stderr)
    );
    let out = cutover(&["status", "--api", &addr, "--json"], Some(token)).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_prometheus_text() {
    let server = Server::start(None).await;
    server.status.update(|s| s.lag_bytes = Some(4096));
    let (code, response) = raw_get(server.addr, "/metrics", None).await;
    assert_eq!(code, 200, "{response}");
    assert!(response.contains("text/plain"), "{response}");
    assert!(
        response.contains("cutover_applied_rows_total"),
        "{response}"
    );
    assert!(response.contains("cutover_lag_bytes"), "{response}");

    let (code, response) = raw_get(server.addr, "/v2/nothing", None).await;
    assert_eq!(code, 404, "{response}");
    assert!(response.contains("no such endpoint"), "{response}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_daemon_is_exit_2_with_one_line() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let addr = closed.to_string();
    for command in ["status", "ready"] {
        let out = cutover(&[command, "--api", &addr], None).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command}: {stderr}");
        assert!(
            stderr.starts_with(&format!("cutover: cannot reach the cutover API at {addr}")),
            "{command}: {stderr}"
        );
        assert!(stderr.contains("connection refused"), "{command}: {stderr}");
        assert!(stderr.contains("hint:"), "{command}: {stderr}");
        assert!(out.stdout.is_empty(), "{command}: {}", text(&out.stdout));
    }

    let err = api_client::fetch_status(&Endpoint::new(&addr, None).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.kind, ClientErrorKind::Unreachable);
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_json_prints_one_document_and_sets_the_exit_code() {
    let server = Server::start(None).await;
    let addr = server.addr.to_string();

    let out = cutover(&["ready", "--api", &addr, "--json"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {}", text(&out.stdout)));
    assert_eq!(doc["ready"], false);
    assert_eq!(doc["unmet"].as_array().unwrap().len(), 4, "{doc}");

    let out = cutover(&["ready", "--api", &addr], None).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("not ready: 4 of 5 gates unmet"),
        "{stdout}"
    );
    assert!(stdout.contains("snapshot"), "{stdout}");

    server.status.update(make_ready);
    let out = cutover(&["ready", "--api", &addr, "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["unmet"], serde_json::json!([]));
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_wait_polls_until_ready_or_the_deadline() {
    let server = Server::start(None).await;
    let addr = server.addr.to_string();

    let out = cutover(&["ready", "--api", &addr, "--wait", "700ms"], None).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("not ready after 700ms"),
        "{}",
        text(&out.stdout)
    );

    let status = server.status.clone();
    let catch_up = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        status.update(make_ready);
    });
    let out = cutover(&["ready", "--api", &addr, "--wait", "30s", "--json"], None).await;
    catch_up.await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["ready"], true);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn status_prints_a_table_or_the_json_document() {
    let server = Server::start(None).await;
    let addr = server.addr.to_string();

    let out = cutover(&["status", "--api", &addr], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for needle in [
        "shop-v2",
        "snapshot",
        "0/16B6C50",
        "public.items",
        "copying",
        "1200",
    ] {
        assert!(stdout.contains(needle), "no {needle} in:\n{stdout}");
    }

    let out = cutover(&["status", "--api", &addr, "--json"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["job"], "shop-v2");
    assert_eq!(doc["tables"][0]["rows_copied"], 1200);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_arguments_are_exit_2_with_one_line() {
    for args in [
        &["ready", "--wait", "soon"][..],
        &["status", "--jsn"][..],
        &["status", "--api", "https://x:1"][..],
    ] {
        let out = cutover(args, None).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("cutover: "), "{args:?}: {stderr}");
        assert!(stderr.contains("hint:"), "{args:?}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn config_gives_the_address_and_the_token_variable() {
    let token = "from-the-job-file-variable";
    let server = Server::start(Some(token)).await;
    let dir = tempfile::tempdir().unwrap();
    let job = dir.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"shop\"\n\n[source]\nurl = \"postgresql://u@127.0.0.1:5432/a\"\n\n\
             [target]\nurl = \"postgresql://u@127.0.0.1:5433/b\"\n\n\
             [api]\nlisten = \"{}\"\ntoken_env = \"CUTOVER_TEST_TOKEN\"\n",
            server.addr
        ),
    )
    .unwrap();
    let job = job.to_str().unwrap();

    let out = cutover_with_env(
        &["status", "--config", job, "--json"],
        &[("CUTOVER_TEST_TOKEN", token)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["job"], "shop-v2");

    // The variable named by token_env, not CUTOVER_API_TOKEN, is the one read.
    let out = cutover(&["ready", "--config", job], Some(token)).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CUTOVER_TEST_TOKEN"), "{stderr}");
    assert!(!stderr.contains(token), "{stderr}");

    std::fs::write(dir.path().join("bad.toml"), "name = \"x\"\nbogus = 1\n").unwrap();
    let bad = dir.path().join("bad.toml");
    let out = cutover(&["status", "--config", bad.to_str().unwrap()], None).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("cutover: "), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
    server.shutdown().await;
}
