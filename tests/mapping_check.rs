//! Golden files for every mapping problem `cutover check --json` reports, so the messages
//! (what, where, and the fix) cannot drift silently.
//!
//! Each case is a `[[table]]` fragment in `testdata/mapping/<case>.toml`; the failing table
//! checks it produces are rendered as `check | detail | fix` lines and compared with
//! `testdata/mapping/<case>.expected`. Rerun with `UPDATE_GOLDEN=1` to rewrite the goldens,
//! then read the diff.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

const SOURCE_SCHEMA: &str = r#"
CREATE TABLE public.orders (id int PRIMARY KEY, first_name text, last_name text, total numeric(10,2),
                            status text, region text, created timestamptz, note text);
CREATE TABLE public.counters (id int PRIMARY KEY, hits bigint, "Max Hits" bigint);
CREATE TABLE public.events (id int PRIMARY KEY, kind text, at timestamptz, payload text);
ALTER TABLE public.events REPLICA IDENTITY FULL;
CREATE TABLE public.bare (a int, b text);
CREATE TABLE public.scores (id int PRIMARY KEY, points int,
                            bonus int GENERATED ALWAYS AS (points / 10) STORED);
CREATE TYPE public.order_status AS ENUM ('new', 'paid', 'shipped');
"#;

const TARGET_SCHEMA: &str = r#"
CREATE SCHEMA v2;
CREATE TABLE v2.orders (id int PRIMARY KEY, full_name text, total_cents bigint, status text,
                        region text, created_day date, note text);
CREATE TABLE v2.counters (id int PRIMARY KEY, hits int, "Max Hits" int);
CREATE TABLE v2.orders_strict (id int PRIMARY KEY, total numeric(10,2), full_name text NOT NULL);
CREATE TABLE v2.orders_by_name (full_name text, shard int, total numeric(10,2),
                                PRIMARY KEY (full_name, shard));
CREATE TABLE v2.orders_renumbered (order_id int PRIMARY KEY, total numeric(10,2), status text);
CREATE TABLE v2.orders_gen (id int PRIMARY KEY, total numeric(10,2),
                            total_cents bigint GENERATED ALWAYS AS ((total * 100)::bigint) STORED);
CREATE TABLE v2.orders_nokey (id int, total numeric(10,2));
CREATE TABLE v2.bare (a int, b text);
CREATE TABLE v2.unrelated (x int, y text);
CREATE TABLE v2.events (event_id int PRIMARY KEY, kind text, payload_bytes int, day date,
                        loaded_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE v2.scores (id int PRIMARY KEY, points int, bonus_x2 int);
"#;

/// One fragment: its name, extra `[target]` keys, and whether check should pass.
struct Case {
    name: &'static str,
    target_keys: &'static str,
    ok: bool,
}

const fn fails(name: &'static str) -> Case {
    Case {
        name,
        target_keys: "",
        ok: false,
    }
}

const CASES: &[Case] = &[
    fails("unknown_target_column"),
    fails("unknown_source_column"),
    fails("syntax_error"),
    fails("unknown_function"),
    fails("type_mismatch"),
    fails("not_immutable"),
    fails("not_null_unmapped"),
    fails("key_not_derivable"),
    fails("key_unmapped"),
    fails("where_not_boolean"),
    fails("where_non_key"),
    fails("where_unknown_column"),
    fails("generated_target"),
    fails("semicolon"),
    fails("unknown_type"),
    fails("subquery_aggregate"),
    fails("qualified_column"),
    fails("where_not_immutable"),
    fails("generated_source_column"),
    fails("target_without_key"),
    fails("source_without_key"),
    fails("no_column_maps"),
    fails("missing_source"),
    fails("missing_target"),
    Case {
        name: "missing_target_mapped",
        target_keys: "create_tables = true",
        ok: false,
    },
    Case {
        name: "valid",
        target_keys: "",
        ok: true,
    },
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/mapping")
}

/// `cutover check job.toml --json` run from the job's directory, so the file prints as
/// `job.toml:LINE:`.
fn check_in_dir(job: &Job) -> (Option<i32>, serde_json::Value, String) {
    let out = Command::new(bin())
        .current_dir(job.dir.path())
        .args(["check", "job.toml", "--json"])
        .output()
        .expect("run cutover check");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {}\nstderr {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (out.status.code(), doc, stderr)
}

/// The table checks of a report, as golden lines: every failing one, or (for a passing
/// case) every one. Any other failing check means the environment is broken: panic.
fn render(doc: &serde_json::Value, ok: bool, scrub: &dyn Fn(&str) -> String) -> String {
    let mut lines = Vec::new();
    for c in doc["checks"].as_array().expect("checks") {
        let name = c["check"].as_str().unwrap_or_default();
        let result = c["result"].as_str().unwrap_or_default();
        if !name.starts_with("table ") {
            assert_ne!(result, "fail", "a check outside the tables failed: {c}");
            continue;
        }
        let detail = c["detail"].as_str().unwrap_or_default();
        let line = match (result, c["fix"].as_str()) {
            ("fail", Some(fix)) => format!("{name} | {detail} | {fix}"),
            ("fail", None) => format!("{name} | {detail} | (no fix)"),
            (_, _) if ok => format!("{name} | {result}: {detail}"),
            _ => continue,
        };
        lines.push(scrub(&line));
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

#[tokio::test(flavor = "multi_thread")]
async fn check_reports_every_mapping_error_as_in_the_goldens() {
    let pg = cluster("mapcheck").await;
    pg.create_database("src").await.unwrap();
    pg.create_database("dst").await.unwrap();
    pg.execute("src", SOURCE_SCHEMA).await.unwrap();
    pg.execute("dst", TARGET_SCHEMA).await.unwrap();

    // Every fragment in the directory is a case, and every case has its fragment.
    let dir = golden_dir();
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = CASES.iter().map(|c| c.name.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed, "testdata/mapping/*.toml and CASES differ");

    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    let port = pg.port().to_string();
    let mut mismatches = Vec::new();
    for case in CASES {
        let fragment = std::fs::read_to_string(dir.join(format!("{}.toml", case.name))).unwrap();
        let job = Job::write_with_target(
            &format!("map_{}", case.name),
            &pg.url("src"),
            &pg.url("dst"),
            case.target_keys,
            &fragment,
        );
        let (code, doc, stderr) = check_in_dir(&job);
        let job_dir = job.dir.path().display().to_string();
        let scrub = |s: &str| {
            s.replace(&job_dir, "<job dir>")
                .replace(&format!(":{port}"), ":<port>")
                .replace(&format!("port={port}"), "port=<port>")
        };
        let text = render(&doc, case.ok, &scrub);
        let table_checks = |result: &str| -> Vec<serde_json::Value> {
            doc["checks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| {
                    c["check"].as_str().unwrap().starts_with("table ") && c["result"] == result
                })
                .cloned()
                .collect()
        };
        if case.ok {
            assert_eq!(code, Some(0), "{}: {doc:#}\n{stderr}", case.name);
            assert_eq!(doc["ok"], true, "{}: {doc:#}", case.name);
            assert!(table_checks("fail").is_empty(), "{}: {doc:#}", case.name);
            let passed = table_checks("pass");
            assert_eq!(passed.len(), 1, "{}: {doc:#}", case.name);
            assert!(
                passed[0]["detail"]
                    .as_str()
                    .unwrap()
                    .contains("columns mapped"),
                "{}: {doc:#}",
                case.name
            );
        } else {
            assert_eq!(code, Some(1), "{}: {doc:#}\n{stderr}", case.name);
            assert_eq!(doc["ok"], false, "{}: {doc:#}", case.name);
            assert!(
                !table_checks("fail").is_empty(),
                "{}: no table check failed: {doc:#}",
                case.name
            );
        }

        let golden = dir.join(format!("{}.expected", case.name));
        if update {
            std::fs::write(&golden, &text).unwrap();
            continue;
        }
        let expected =
            std::fs::read_to_string(&golden).unwrap_or_else(|e| format!("(no golden file: {e})\n"));
        if expected != text {
            mismatches.push(format!(
                "case {} ({}):\n--- expected\n{expected}--- actual\n{text}",
                case.name,
                golden.display()
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "check's mapping messages differ from the goldens; if the change is intended, rerun with UPDATE_GOLDEN=1 (UPDATE_GOLDEN=1 cargo nextest run -p cutover --test mapping_check) and review the diff of testdata/mapping:\n\n{}",
        mismatches.join("\n")
    );
}
