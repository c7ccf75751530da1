//! `broker doctor` and `broker ca export`.

use std::time::Duration;

use broker_integration::{run_bounded, Home, Serve, TestCa};

#[test]
fn doctor_passes_on_a_healthy_home_and_self_tests_each_runtime() {
    let home = Home::new();
    home.add("openai", "sk-test-doctor-openai-key-0123456789-ab");
    let out = run_bounded(
        home.broker().args(["doctor", "--json"]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let checks = checks.as_array().expect("array");
    let status = |name: &str| {
        checks
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap_or_default().to_string())
    };
    assert_eq!(status("vault").as_deref(), Some("ok"));
    assert_eq!(status("audit log").as_deref(), Some("ok"));
    assert_eq!(status("libbroker.so").as_deref(), Some("ok"));
    assert_eq!(status("self-test: curl").as_deref(), Some("ok"), "{stdout}");
    // Every runtime found on this machine passes; none is silently missing from the table.
    for name in ["curl", "python3", "node", "git", "wget"] {
        let s = status(&format!("self-test: {name}")).expect("each runtime is listed");
        assert!(s == "ok" || s == "skip", "{name}: {s}");
    }
}

#[test]
fn doctor_fails_on_an_edited_audit_log() {
    let home = Home::new();
    home.add("openai", "sk-test-doctor-openai-key-0123456789-ab");
    home.add("anthropic", "sk-ant-test-doctor-anthropic-key-0123");
    let audit = home.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&audit).expect("audit");
    std::fs::write(&audit, text.replacen("anthropic", "anthropiX", 1)).expect("edit");
    assert_doctor_fails_on(&home, "audit log", "line 2");
}

/// `broker doctor --no-self-test` exits 1 with a FAIL line for `check` that says `detail`.
fn assert_doctor_fails_on(home: &Home, check: &str, detail: &str) {
    let out = run_bounded(
        home.broker().args(["doctor", "--no-self-test"]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(check) && l.contains("FAIL") && l.contains(detail)),
        "{stdout}"
    );
}

#[test]
fn doctor_fails_on_a_cut_or_symlinked_audit_log() {
    let home = Home::new();
    home.add("openai", "sk-test-doctor-openai-key-0123456789-ab");
    home.add("anthropic", "sk-ant-test-doctor-anthropic-key-0123");
    let audit = home.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&audit).expect("audit");
    let first_line = text.lines().next().expect("a line");
    std::fs::write(&audit, format!("{first_line}\n")).expect("cut");
    assert_doctor_fails_on(&home, "audit log", "cut from its end");
    std::fs::remove_file(&audit).expect("remove");
    std::os::unix::fs::symlink("/dev/null", &audit).expect("symlink");
    assert_doctor_fails_on(&home, "audit log", "symbolic link");
}

#[test]
fn doctor_fails_on_an_audit_log_that_cannot_be_opened() {
    let home = Home::new();
    std::fs::create_dir_all(home.path().join("audit.jsonl")).expect("a directory in its place");
    assert_doctor_fails_on(&home, "audit log", "will not start");
}

#[test]
fn ca_export_prints_the_running_daemons_ca() {
    let home = Home::new();
    let out = run_bounded(
        home.broker().args(["ca", "export"]),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no 'broker serve' is running"));
    let serve = Serve::start(&home, &TestCa::new(), &[]);
    let out = run_bounded(
        home.broker().args(["ca", "export"]),
        Duration::from_secs(20),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, serve.ca_pem());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("-----BEGIN CERTIFICATE-----"));
}
