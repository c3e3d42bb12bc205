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
