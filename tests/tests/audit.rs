//! The keyed audit log through the real binary: a log that was cut, replaced, deleted or made a
//! symlink is found by `broker audit verify` and stops `broker run` and `broker serve` before
//! any credential is used; `broker audit reset --yes` is the way past it, and is audited.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use broker_integration::{
    count_events, run_bounded, sha256, shim_lib, v1_audit_line, Home, Origin, TestCa,
};

const OPENAI_KEY: &str = "sk-test-audit-openai-key-0123456789-abcd";

fn audit_path(home: &Home) -> PathBuf {
    home.path().join("audit.jsonl")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .expect("audit log")
        .lines()
        .map(String::from)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(path, text).expect("write audit log");
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A home with three audited vault changes (three keyed lines).
fn home_with_three_lines() -> Home {
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    home.add("anthropic", "sk-ant-test-audit-anthropic-key-0123");
    home.add("github", "ghp_test_audit_github_key_0123456789ab");
    assert_eq!(lines(&audit_path(&home)).len(), 3);
    home
}

/// `broker audit verify`: its exit code and output.
fn verify(home: &Home) -> (Option<i32>, String) {
    let out = run_bounded(
        home.broker().args(["audit", "verify"]).stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    (out.status.code(), text(&out))
}

/// `broker run -- true` and `broker serve` must both refuse to start, saying how to recover.
fn assert_start_refused(home: &Home, what: &str) {
    let run = run_bounded(
        home.broker()
            .args(["run", "--embedded", "--", "true"])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let serve = run_bounded(
        home.broker().arg("serve").stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    for (name, out) in [("run", run), ("serve", serve)] {
        let said = text(&out);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: broker {name} started: {said}"
        );
        assert!(
            said.contains("does not use credentials it cannot audit")
                && said.contains("broker audit verify")
                && said.contains("broker audit reset --yes"),
            "{what}: broker {name} said: {said}"
        );
    }
}

/// Reset, then the log verifies again, starts with the reset, and `broker run` starts.
fn assert_reset_recovers(home: &Home, what: &str) {
    let out = run_bounded(
        home.broker().args(["audit", "reset"]).stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: reset without --yes: {}",
        text(&out)
    );
    home.broker_ok(&["audit", "reset", "--yes"]);
    let log = lines(&audit_path(home));
    assert_eq!(log.len(), 1, "{what}: {log:?}");
    assert!(
        log[0].contains("\"event\":\"audit_reset\""),
        "{what}: {}",
        log[0]
    );
    assert!(
        log[0].contains("the vault's head was line 3"),
        "{what}: {}",
        log[0]
    );
    assert!(
        log[0].contains("\"command\":\"broker audit reset --yes\""),
        "{what}: {}",
        log[0]
    );
    let kept = std::fs::read_dir(home.path())
        .expect("home")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("audit.jsonl."))
        .count();
    // The old log (or whatever stood in its place) is kept beside the new one.
    let expected = usize::from(what != "deleted");
    assert_eq!(kept, expected, "{what}: the old log is kept");
    let (code, said) = verify(home);
    assert_eq!(code, Some(0), "{what}: {said}");
    home.broker_ok(&["run", "--embedded", "--", "true"]);
    home.add("openai", OPENAI_KEY);
    let (code, said) = verify(home);
    assert_eq!(code, Some(0), "{what}: {said}");
    assert!(said.contains("2 lines"), "{what}: {said}");
}

#[test]
fn audit_a_line_deleted_and_rechained_without_the_key_fails_verify_at_that_line() {
    let home = home_with_three_lines();
    let path = audit_path(&home);
    let mut log = lines(&path);
    log.remove(1);
    // What an attacker without the key can do: renumber and chain with plain SHA-256.
    let first: serde_json::Value = serde_json::from_str(&log[0]).expect("json");
    let prev = first["mac"].as_str().expect("mac").to_string();
    let mut record: serde_json::Value = serde_json::from_str(&log[1]).expect("json");
    let obj = record.as_object_mut().expect("object");
    obj.remove("mac");
    obj.insert("seq".into(), 2.into());
    obj.insert("prev".into(), prev.into());
    let body = serde_json::to_string(&record).expect("json");
    let forged = sha256(&body);
    log[1] = format!("{},\"mac\":\"{forged}\"}}", &body[..body.len() - 1]);
    write_lines(&path, &log);

    let (code, said) = verify(&home);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("BROKEN at line 2"), "{said}");
    assert!(said.contains("without the vault's key"), "{said}");
    assert_start_refused(&home, "a line deleted and re-chained");
    assert_reset_recovers(&home, "a line deleted and re-chained");
}

#[test]
fn audit_truncated_replaced_symlinked_and_deleted_logs_are_detected() {
    type Tamper = fn(&Path, &[u8]);
    let cases: [(&str, Tamper, &str); 4] = [
        (
            "truncated",
            |path, _| {
                let log = lines(path);
                write_lines(path, &log[..2]);
            },
            "cut from its end",
        ),
        (
            "replaced by an older copy",
            |path, older| {
                std::fs::write(path, older).expect("older copy");
            },
            "older copy",
        ),
        (
            "a symlink to /dev/null",
            |path, _| {
                std::fs::remove_file(path).expect("remove");
                std::os::unix::fs::symlink("/dev/null", path).expect("symlink");
            },
            "symbolic link",
        ),
        (
            "deleted",
            |path, _| {
                std::fs::remove_file(path).expect("remove");
            },
            "missing",
        ),
    ];
    for (what, tamper, reason) in cases {
        let home = Home::new();
        home.add("openai", OPENAI_KEY);
        let older = std::fs::read(audit_path(&home)).expect("log");
        home.add("anthropic", "sk-ant-test-audit-anthropic-key-0123");
        home.add("github", "ghp_test_audit_github_key_0123456789ab");
        tamper(&audit_path(&home), &older);

        let (code, said) = verify(&home);
        assert_eq!(code, Some(1), "{what}: {said}");
        assert!(said.contains(reason), "{what}: {said}");
        assert_start_refused(&home, what);
        if what.contains("symlink") {
            assert!(
                std::fs::symlink_metadata(audit_path(&home))
                    .is_ok_and(|m| m.file_type().is_symlink()),
                "{what}: the broker must not replace the symlink itself"
            );
        }
        assert_reset_recovers(&home, what);
    }
}

#[test]
fn audit_normal_use_across_restarts_keeps_verifying() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    for _ in 0..2 {
        let out = run_bounded(
            home.broker_run(&ca, "api.openai.com", origin.addr).args([
                "--",
                "sh",
                "-c",
                "curl -sS --fail-with-body 'https://api.openai.com/v1/models?after=query-not-kept' -H \"Authorization: Bearer $OPENAI_API_KEY\"",
            ]),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{}", text(&out));
    }
    let audit = std::fs::read_to_string(audit_path(&home)).expect("log");
    assert_eq!(count_events(&audit, "credential_use"), 2, "{audit}");
    // What a request's line says (the writer encodes it from the request, not from an event).
    for line in audit.lines().filter(|l| l.contains("credential_use")) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        for (field, want) in [
            ("provider", "openai"),
            ("profile", "default"),
            ("host", "api.openai.com"),
            ("sni", "api.openai.com"),
            ("method", "GET"),
            // Without the query (the agent's command line, which has it, is its own field).
            ("path", "/v1/models"),
        ] {
            assert_eq!(v[field], want, "{field}: {line}");
        }
        assert_eq!(v["status"], 200, "{line}");
        assert_eq!(v["bytes"], "{\"data\":[]}".len(), "{line}");
        assert!(
            v["run_id"].as_str().is_some_and(|r| !r.is_empty()),
            "{line}"
        );
        assert!(v["pid"].as_u64().is_some(), "{line}");
        assert!(v["latency_ms"].as_u64().is_some(), "{line}");
        assert!(
            v["command"]
                .as_str()
                .is_some_and(|c| c.starts_with("sh -c curl")),
            "{line}"
        );
    }
    assert!(
        audit
            .lines()
            .all(|l| l.contains("\"mac\":\"") && !l.contains("\"hash\"")),
        "{audit}"
    );
    assert!(!audit.contains(OPENAI_KEY));
    let (code, said) = verify(&home);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("3 lines") && said.contains("head (line 3)"),
        "{said}"
    );
    // Listing needs no key.
    let out = run_bounded(
        home.broker()
            .args(["audit", "--json"])
            .env("BROKER_KEY_SOURCE", "passphrase")
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
}

#[test]
fn audit_verify_says_when_it_cannot_unlock_the_vault() {
    let home = home_with_three_lines();
    std::fs::rename(
        home.path().join("master.key"),
        home.path().join("master.key.away"),
    )
    .expect("move the key away");
    let (code, said) = verify(&home);
    assert_eq!(code, Some(1), "{said}");
    assert!(
        said.contains("NOT CHECKED") && said.contains("master.key"),
        "{said}"
    );
}

#[test]
fn audit_a_format_1_log_is_kept_and_pinned_by_the_keyed_chain() {
    let home = Home::new();
    let path = audit_path(&home);
    std::fs::create_dir_all(home.path()).expect("home");
    let first = v1_audit_line(1, &"0".repeat(64), "openai");
    let second = v1_audit_line(2, &sha256(&first), "github");
    write_lines(&path, &[first.clone(), second.clone()]);
    let (code, said) = verify(&home);
    assert_eq!(code, Some(0), "{said}");
    assert!(said.contains("2 unkeyed (format 1)"), "{said}");

    // The first broker with the key anchors the old chain, then goes on keyed.
    home.broker_ok(&["run", "--embedded", "--", "true"]);
    home.add("openai", OPENAI_KEY);
    let log = lines(&path);
    assert_eq!(log.len(), 4, "{log:?}");
    assert_eq!((&log[0], &log[1]), (&first, &second), "kept as it was");
    assert!(log[2].contains("\"event\":\"audit_keyed\""), "{}", log[2]);
    assert!(
        log[2].contains(&format!("\"prev\":\"{}\"", sha256(&second))),
        "{}",
        log[2]
    );
    let (code, said) = verify(&home);
    assert_eq!(code, Some(0), "{said}");
    assert!(
        said.contains("4 lines: 2 unkeyed (format 1) pinned by the first of 2 keyed lines"),
        "{said}"
    );

    // A format-1 line changed and its hashes recomputed: the anchor gives it away.
    let edited = v1_audit_line(1, &"0".repeat(64), "evil");
    let rehashed = v1_audit_line(2, &sha256(&edited), "github");
    let mut tampered = log.clone();
    tampered[0] = edited;
    tampered[1] = rehashed;
    write_lines(&path, &tampered);
    let (code, said) = verify(&home);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("BROKEN at line 3"), "{said}");
}

#[test]
fn audit_a_head_moved_back_without_the_key_is_refused() {
    let home = home_with_three_lines();
    let path = audit_path(&home);
    let log = lines(&path);
    write_lines(&path, &log[..1]);
    let first: serde_json::Value = serde_json::from_str(&log[0]).expect("json");
    let mac = first["mac"].as_str().expect("mac");
    // The head moved back to match the cut log, as sqlite3 can without the key.
    let out = std::process::Command::new("sqlite3")
        // A running broker commits the audit head to the vault: wait for its lock.
        .args(["-cmd", ".timeout 5000"])
        .arg(home.path().join("vault.db"))
        .arg(format!(
            "UPDATE audit_head SET seq = 1, line_start = 0, mac = '{mac}'"
        ))
        .output()
        .expect("sqlite3");
    assert!(out.status.success(), "{}", text(&out));
    let (code, said) = verify(&home);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("audit head"), "{said}");
    assert_start_refused(&home, "the head moved back");
    home.broker_ok(&["audit", "reset", "--yes"]);
    let log = lines(&path);
    assert!(
        log[0].contains("the vault's head was unreadable"),
        "{}",
        log[0]
    );
    let (code, said) = verify(&home);
    assert_eq!(code, Some(0), "{said}");
    home.broker_ok(&["run", "--embedded", "--", "true"]);
}

#[test]
fn audit_a_log_deleted_together_with_the_head_row_is_detected() {
    let home = home_with_three_lines();
    let out = std::process::Command::new("sqlite3")
        // A running broker commits the audit head to the vault: wait for its lock.
        .args(["-cmd", ".timeout 5000"])
        .arg(home.path().join("vault.db"))
        .arg("DELETE FROM audit_head")
        .output()
        .expect("sqlite3");
    assert!(out.status.success(), "{}", text(&out));
    std::fs::remove_file(audit_path(&home)).expect("remove");
    let (code, said) = verify(&home);
    assert_eq!(code, Some(1), "{said}");
    assert!(said.contains("deleted together with the head"), "{said}");
    assert_start_refused(&home, "log and head row deleted");
    home.broker_ok(&["audit", "reset", "--yes"]);
    let log = lines(&audit_path(&home));
    assert!(
        log[0].contains("the vault's head was missing"),
        "{}",
        log[0]
    );
    let (code, said) = verify(&home);
    assert_eq!(code, Some(0), "{said}");
}
