//! The binary's command line, without databases.

#[test]
fn help_lists_the_contract_commands() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .arg("--help")
        .output()
        .expect("run cutover --help");
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "check", "run", "status", "ready", "verify", "teardown", "demo",
    ] {
        assert!(
            text.contains(command),
            "--help does not mention {command}:\n{text}"
        );
    }
}

#[test]
fn demo_runs_end_to_end_and_cleans_up() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["demo", "--rows", "2000"])
        .output()
        .expect("run cutover demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("are equal"), "{stdout}");
}

#[test]
fn demo_interrupted_removes_everything() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;

    // The demo's clusters go to a private directory, so what is left is easy to see.
    let tmp = tempfile::Builder::new()
        .prefix("cdemo")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args(["demo", "--rows", "20000"])
        .env("CUTOVER_TMPDIR", tmp.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("[3/7]") {
            // The clusters run and the job is starting: interrupt it like Ctrl-C does.
            std::process::Command::new("kill")
                .arg("-INT")
                .arg(child.id().to_string())
                .status()
                .unwrap();
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(2), "{seen}");
    assert!(
        seen.contains("interrupted; removing the demo clusters"),
        "{seen}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}
