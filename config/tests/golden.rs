//! Golden tests: every file under `testdata/jobs/invalid/` fails with exactly the
//! one-line message in its `.expected` file, and every file under
//! `testdata/jobs/valid/` parses.
//!
//! The messages are part of the user interface (scripts grep them, runbooks quote
//! them), so a change to any of them must show up in review as a diff of these files.
//! Run with `UPDATE_GOLDEN=1` to rewrite the `.expected` files after an intended change.

use std::fs;
use std::path::{Path, PathBuf};

use cutover_config::JobSpec;

/// The password planted in some invalid files; it must never come out.
const CANARY: &str = "Canary";

fn dir(kind: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../testdata/jobs")).join(kind)
}

fn toml_files(kind: &str) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = fs::read_dir(dir(kind))
        .unwrap_or_else(|e| panic!("reading testdata/jobs/{kind}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| {
            let stem = p
                .file_stem()
                .expect("file stem")
                .to_string_lossy()
                .into_owned();
            (stem, p)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .toml files in testdata/jobs/{kind}");
    files
}

#[test]
fn invalid_jobs_fail_with_the_expected_message() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for (name, path) in toml_files("invalid") {
        let text = fs::read_to_string(&path).expect("readable test file");
        let shown = format!("testdata/jobs/invalid/{name}.toml");
        let actual = match JobSpec::parse(&text, Some(Path::new(&shown))) {
            Ok(spec) => {
                failures.push(format!("{shown}: parsed, but should fail: {spec:?}"));
                continue;
            }
            Err(e) => e,
        };
        let line = actual.to_string();
        assert!(
            !line.contains('\n'),
            "{shown}: message has more than one line: {line}"
        );
        assert!(
            !format!("{line} {actual:?}").contains(CANARY),
            "{shown}: leaked a secret: {line}"
        );
        assert_eq!(actual.file(), shown);
        assert!(actual.line().is_some(), "{shown}: no line in {line}");
        let first = actual.primary().chars().next().unwrap_or('x');
        assert!(
            !first.is_uppercase(),
            "{shown}: primary should start in lower case: {line}"
        );
        assert!(
            !actual.primary().ends_with('.'),
            "{shown}: primary ends with a period: {line}"
        );

        let expected_path = path.with_extension("expected");
        if update {
            fs::write(&expected_path, format!("{line}\n")).expect("write .expected");
            continue;
        }
        match fs::read_to_string(&expected_path) {
            Ok(expected) if expected.trim_end_matches('\n') == line => {}
            Ok(expected) => failures.push(format!(
                "{shown}:\n  expected: {}\n  actual:   {line}",
                expected.trim_end_matches('\n')
            )),
            Err(e) => failures.push(format!("{shown}: no .expected file ({e}); actual: {line}")),
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches (UPDATE_GOLDEN=1 rewrites them):\n{}",
        failures.join("\n")
    );
}

#[test]
fn every_expected_file_has_a_job_file() {
    for entry in fs::read_dir(dir("invalid")).expect("testdata/jobs/invalid") {
        let path = entry.expect("directory entry").path();
        if path.extension().is_some_and(|e| e == "expected") {
            assert!(
                path.with_extension("toml").exists(),
                "{} has no .toml",
                path.display()
            );
        }
    }
}

#[test]
fn valid_jobs_parse() {
    for (name, path) in toml_files("valid") {
        let shown = format!("testdata/jobs/valid/{name}.toml");
        let text = fs::read_to_string(&path).expect("readable test file");
        if let Err(e) = JobSpec::parse(&text, Some(Path::new(&shown))) {
            panic!("{shown} should parse: {e}");
        }
        let loaded = JobSpec::load(&path).unwrap_or_else(|e| panic!("{shown} should load: {e}"));
        assert_eq!(loaded.path.as_deref(), Some(path.as_path()));
    }
}
