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
