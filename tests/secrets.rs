//! No secret leaves the process: a canary password sits in the job's URL and in a
//! password variable, and must appear in no output, log, status, metric or error.

mod support;

use std::time::Duration;

use cutover::cluster::{Cluster, ClusterOptions};
use support::*;

const CANARY: &str = "Canary-7f3a9-Pw";

#[tokio::test(flavor = "multi_thread")]
async fn the_canary_password_appears_nowhere() {
    let (src, dst) = tokio::join!(
        Cluster::start(ClusterOptions::named("canary-src").password(CANARY)),
        Cluster::start(ClusterOptions::named("canary-dst").password(CANARY))
    );
    let (src, dst) = (src.unwrap(), dst.unwrap());
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", "CREATE TABLE public.t (id int PRIMARY KEY, v text)")
            .await
            .unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO t SELECT g, 'v' FROM generate_series(1, 100) g",
    )
    .await
    .unwrap();
    // The source password inside the URL, the target one in an environment variable.
    let job = Job::write_with_target(
        "canary",
        &src.url_with_password("db"),
        &dst.url("db"),
        "password_env = \"CANARY_TARGET_PASSWORD\"",
        "",
    );
    let mut daemon = {
        let log = job.dir.path().join("daemon.log");
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(bin())
            .arg("run")
            .arg(&job.path)
            .env("RUST_LOG", "trace")
            .env("CANARY_TARGET_PASSWORD", CANARY)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log,
            api: job.api(),
        }
    };
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    s.batch_execute("UPDATE t SET v = 'w' WHERE id < 50")
        .await
        .unwrap();
    wait_equal(
        &s,
        &d,
        "public.t",
        "public.t",
        Duration::from_secs(60),
        Some(&daemon),
    )
    .await;

    let mut seen = Vec::new();
    for path in ["/v1/status", "/v1/ready", "/metrics", "/healthz"] {
        seen.push((
            path.to_string(),
            daemon.get(path).await.map(|(_, b)| b).unwrap_or_default(),
        ));
    }
    let cli = |args: &[&str], env_password: bool| {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(args);
        if env_password {
            cmd.env("CANARY_TARGET_PASSWORD", CANARY);
        }
        let out = cmd.output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let api = job.api();
    let path = job.path.to_str().unwrap();
    seen.push((
        "status".into(),
        cli(&["status", "--api", &api, "--json"], false),
    ));
    seen.push(("ready".into(), cli(&["ready", "--api", &api], false)));
    seen.push((
        "check".into(),
        cli(&["-vvv", "check", path, "--json"], true),
    ));
    // Errors: the variable missing, and a wrong password in the URL.
    seen.push((
        "check without variable".into(),
        cli(&["check", path], false),
    ));
    let wrong = Job::write(
        "canary-wrong",
        &src.url_with_password("db")
            .replace(CANARY, &format!("{CANARY}x")),
        &dst.url("db"),
        "",
    );
    seen.push((
        "check wrong password".into(),
        cli(&["check", wrong.path.to_str().unwrap()], true),
    ));
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));
    seen.push(("daemon log".into(), daemon.output()));
    // What the job wrote on the target and the source.
    for (name, client) in [("target", &d), ("source", &s)] {
        let rows = client
            .query(
                "SELECT coalesce(string_agg(application_name, ','), '') FROM pg_stat_activity",
                &[],
            )
            .await
            .unwrap();
        seen.push((format!("{name} pg_stat_activity"), rows[0].get(0)));
    }
    let bookkeeping: String = d
        .query_one(
            "SELECT (SELECT string_agg(p::text, ',') FROM cutover.progress p) || (SELECT string_agg(t::text, ',') FROM cutover.tables t)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    seen.push(("cutover schema".into(), bookkeeping));

    for (what, text) in &seen {
        assert!(
            !text.contains(CANARY),
            "the canary password leaked into {what}:\n{text}"
        );
    }
    // The checks did run (a vacuous pass would prove nothing).
    assert!(
        seen.iter()
            .any(|(w, t)| w == "check" && t.contains("\"result\"")),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|(w, t)| w == "check wrong password"
                && t.contains("password authentication failed")),
        "{seen:?}"
    );
}

/// Connection failures name host:port and the cause, with a fix, on one line.
#[tokio::test(flavor = "multi_thread")]
async fn connection_failures_name_the_endpoint_and_the_cause() {
    let dst = cluster("conn-dst").await;
    dst.create_database("db").await.unwrap();
    let refused = free_port();
    // A listener that never answers: the TCP connect succeeds and the startup hangs.
    // (connect_timeout=1 counts as 2, as in libpq.)
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let cases = [
        (
            format!("postgresql://alice:{CANARY}@127.0.0.1:{refused}/db"),
            format!(
                "could not connect to 127.0.0.1:{refused}/db as user \"alice\": connection refused"
            ),
            "check that the server is running",
        ),
        (
            format!("postgresql://alice:{CANARY}@127.0.0.1:{silent_port}/db?connect_timeout=1"),
            format!(
                "could not connect to 127.0.0.1:{silent_port}/db as user \"alice\": timed out after 2s"
            ),
            "firewall",
        ),
        (
            format!(
                "postgresql://postgres:{CANARY}@127.0.0.1:{}/db?sslmode=require",
                dst.port()
            ),
            format!(
                "sslmode=require is not supported yet for 127.0.0.1:{}/db",
                dst.port()
            ),
            "sslmode=disable or prefer",
        ),
    ];
    for (url, primary, hint) in cases {
        let job = Job::write("conn", &url, &dst.url("db"), "");
        // `run` stops on what cannot pass by waiting (TLS); `check` reports every case.
        let out = std::process::Command::new(bin())
            .arg("check")
            .arg(&job.path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{stdout}");
        assert!(
            stdout.contains(&primary),
            "expected {primary:?} in:\n{stdout}"
        );
        assert!(
            stdout.contains(hint),
            "expected a fix mentioning {hint:?} in:\n{stdout}"
        );
        assert!(!stdout.contains(CANARY) && !String::from_utf8_lossy(&out.stderr).contains(CANARY));
    }
    drop(silent);
}
