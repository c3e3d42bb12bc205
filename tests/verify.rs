//! `cutover verify`: after a clean sync the tables are equal; after corrupting the target
//! behind the job's back, exactly the corrupted keys are reported, no more and no fewer.

mod support;

use std::time::Duration;

use support::*;

const SCHEMA: &str = r#"
CREATE TABLE public.acc (id int PRIMARY KEY, owner text, note text);
CREATE TABLE public.names (k text PRIMARY KEY, v int);
CREATE TABLE public.bag (v int, w text);
ALTER TABLE public.bag REPLICA IDENTITY FULL;
"#;

fn verify(job: &Job) -> (Option<i32>, serde_json::Value) {
    run_json(&["verify", job.path.to_str().unwrap()])
}

fn table<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["tables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["source"] == name)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_reports_exactly_the_corrupted_keys() {
    let (src, dst) = tokio::join!(cluster("verify-src"), cluster("verify-dst"));
    for c in [&src, &dst] {
        c.create_database("db").await.unwrap();
        c.execute("db", SCHEMA).await.unwrap();
    }
    src.execute(
        "db",
        "INSERT INTO acc SELECT g, 'o' || g, CASE WHEN g = 9 THEN '' WHEN g = 11 THEN 'NULL' ELSE NULL END FROM generate_series(1, 30000) g;
         INSERT INTO names VALUES ('a', 1), ('B', 2), ('c', 3), ('Ä', 4), ('10', 5), ('9', 6);
         INSERT INTO bag VALUES (1, 'x'), (1, 'x'), (2, NULL);",
    )
    .await
    .unwrap();
    let job = Job::write("verify", &src.url("db"), &dst.url("db"), "");
    let mut daemon = Daemon::start(&job);
    daemon
        .wait_phase("streaming", Duration::from_secs(60))
        .await;
    let s = src.connect("db").await.unwrap();
    let d = dst.connect("db").await.unwrap();
    for t in ["public.acc", "public.names", "public.bag"] {
        wait_equal(&s, &d, t, t, Duration::from_secs(60), Some(&daemon)).await;
    }
    assert_eq!(daemon.terminate(Duration::from_secs(20)), Some(0));

    let (code, doc) = verify(&job);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["equal"], true);
    assert_eq!(table(&doc, "public.acc")["rows_compared"], 30000);

    // Corrupt the target behind the job's back: the traps of hard cases 23-24.
    d.batch_execute(
        "SET session_replication_role = replica;
         UPDATE acc SET owner = 'changed' WHERE id = 5;
         DELETE FROM acc WHERE id = 7;
         INSERT INTO acc VALUES (100000, 'extra', NULL);
         UPDATE acc SET note = NULL WHERE id = 9;          -- '' becomes NULL
         UPDATE acc SET note = NULL WHERE id = 11;         -- 'NULL' becomes NULL
         UPDATE acc SET owner = 'o2', note = '0' WHERE id = 20;   -- ('o20', NULL) vs ('o2', '0')
         UPDATE names SET v = 20 WHERE k = 'B';
         INSERT INTO bag VALUES (1, 'x');",
    )
    .await
    .unwrap();
    let (code, doc) = verify(&job);
    assert_eq!(code, Some(1), "{doc}");
    assert_eq!(doc["equal"], false);
    let acc = table(&doc, "public.acc");
    let mut got: Vec<(String, String, String)> = acc["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_string(),
                d["key"]["id"].to_string(),
                d["columns"].to_string(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String, String)> = [
        ("different", "\"11\"", "[\"note\"]"),
        ("different", "\"20\"", "[\"owner\",\"note\"]"),
        ("different", "\"5\"", "[\"owner\"]"),
        ("different", "\"9\"", "[\"note\"]"),
        ("extra", "\"100000\"", "[]"),
        ("missing", "\"7\"", "[]"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    want.sort();
    assert_eq!(got, want, "{acc}");
    assert_eq!(acc["differences_total"], 6);
    let names = table(&doc, "public.names");
    assert_eq!(names["differences_total"], 1, "{names}");
    assert_eq!(names["differences"][0]["key"]["k"], "B");
    let bag = table(&doc, "public.bag");
    assert_eq!(bag["differences_total"], 1, "{bag}");
    assert_eq!(bag["differences"][0]["kind"], "extra");

    // --table limits the pass; the text form says what differs.
    let out = std::process::Command::new(bin())
        .args([
            "verify",
            job.path.to_str().unwrap(),
            "--table",
            "public.names",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("public.names -> public.names: DIFFERENT") && !text.contains("public.acc"),
        "{text}"
    );
}
