//! The vault and audit commands through the real binary: each test gets its own temp
//! `BROKER_HOME` and the key file as key source (or a passphrase), as CI runs headless.
//!
//! Test secrets are obviously fake (`sk-test-...` with dashes) so no secret scanner mistakes
//! them for real keys. Every test ends by checking that no test secret appears in plaintext
//! anywhere under its `BROKER_HOME`, nor in anything the commands printed.

#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const OPENAI_SECRET: &str = "sk-test-cli-vault-0001-not-a-real-key";
const GITHUB_SECRET: &str = "ghp_test_cli_vault_0002_not_a_real_key";

struct Broker {
    _dir: tempfile::TempDir,
    home: PathBuf,
    passphrase: Option<String>,
    /// Everything the commands printed, checked for secrets at the end.
    printed: std::sync::Mutex<Vec<u8>>,
}

impl Broker {
    /// A fresh home using the key file.
    fn new() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("home");
        Broker {
            _dir: dir,
            home,
            passphrase: None,
            printed: Default::default(),
        }
    }

    fn with_passphrase(passphrase: &str) -> Broker {
        Broker {
            passphrase: Some(passphrase.into()),
            ..Broker::new()
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_broker"));
        cmd.args(args)
            .env("BROKER_HOME", &self.home)
            .env("BROKER_LOG", "warn")
            .env_remove("BROKER_PASSPHRASE")
            .env_remove("BROKER_KEY_SOURCE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &self.passphrase {
            Some(p) => cmd.env("BROKER_PASSPHRASE", p),
            None => cmd.env("BROKER_KEY_SOURCE", "file"),
        };
        cmd
    }

    fn record(&self, out: &Output) {
        let mut printed = self.printed.lock().unwrap();
        printed.extend_from_slice(&out.stdout);
        printed.extend_from_slice(&out.stderr);
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_cmd(self.cmd(args))
    }

    fn run_cmd(&self, mut cmd: Command) -> Output {
        let out = cmd.output().unwrap();
        self.record(&out);
        out
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "broker {args:?} failed: {}",
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// `broker add` with the secret on stdin.
    fn add_cmd(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = self.cmd(args).stdin(Stdio::piped()).spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        self.record(&out);
        out
    }

    fn add(&self, provider: &str, profile: &str, secret: &str) {
        let out = self.add_cmd(
            &["add", provider, "--profile", profile],
            &format!("{secret}\n"),
        );
        assert!(out.status.success(), "add failed: {}", text(&out.stderr));
    }

    fn list_json(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.run_ok(&["list", "--json"])).unwrap()
    }

    /// No secret in any file under the home, nor in anything printed.
    fn assert_no_plaintext(&self, secrets: &[&str]) {
        let printed = self.printed.lock().unwrap();
        for file in files_under(&self.home)
            .into_iter()
            .map(|p| (std::fs::read(&p).unwrap(), p))
        {
            for s in secrets {
                assert!(
                    !contains(&file.0, s.as_bytes()),
                    "secret in plaintext in {}",
                    file.1.display()
                );
            }
        }
        for s in secrets {
            assert!(
                !contains(&printed, s.as_bytes()),
                "secret in the commands' output"
            );
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn add_list_show_remove_round_trip() {
    let b = Broker::new();
    b.add("openai", "default", OPENAI_SECRET);
    b.add("github", "work", GITHUB_SECRET);

    let list = b.list_json();
    let names: Vec<(&str, &str)> = list
        .iter()
        .map(|c| {
            (
                c["provider"].as_str().unwrap(),
                c["profile"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("github", "work"), ("openai", "default")]);
    let table = b.run_ok(&["list"]);
    assert!(
        table.contains("openai") && table.contains("github"),
        "{table}"
    );

    let shown = b.run_ok(&["show", "openai"]);
    let len = OPENAI_SECRET.chars().count();
    assert!(shown.contains(&format!("sk-…({len} chars)")), "{shown}");
    assert!(shown.contains("key file"), "{shown}");
    let json: serde_json::Value =
        serde_json::from_str(&b.run_ok(&["show", "github", "--profile", "work", "--json"]))
            .unwrap();
    assert_eq!(
        json["secret"],
        format!("ghp_…({} chars)", GITHUB_SECRET.len())
    );
    assert_eq!(json["kind"], "api_key");
    assert_eq!(json["key_source"], "file");

    // Replacing keeps one row.
    b.add("openai", "default", "sk-test-cli-vault-0003-replacement");
    assert_eq!(b.list_json().len(), 2);

    b.run_ok(&["remove", "openai"]);
    assert_eq!(b.list_json().len(), 1);
    let out = b.run(&["remove", "openai"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no credential for openai"),
        "{}",
        text(&out.stderr)
    );
    let out = b.run(&["show", "openai"]);
    assert_eq!(out.status.code(), Some(1));

    let log = b.run_ok(&["audit", "--json"]);
    let events: Vec<String> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        events,
        [
            "credential_added",
            "credential_added",
            "credential_added",
            "credential_removed"
        ]
    );
    assert!(b.run_ok(&["audit", "verify"]).contains("OK: 4 lines"));
    b.assert_no_plaintext(&[
        OPENAI_SECRET,
        GITHUB_SECRET,
        "sk-test-cli-vault-0003-replacement",
    ]);
}

#[test]
fn secret_as_argument_is_refused_and_not_echoed() {
    let b = Broker::new();
    for args in [
        &["add", "openai", OPENAI_SECRET][..],
        &["add", "openai", "--profile", "work", OPENAI_SECRET],
        &["add", "openai", OPENAI_SECRET, "--profile", "work"],
        &["add", OPENAI_SECRET],
    ] {
        let out = b.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains("stdin") || err.contains("unknown provider"),
            "{err}"
        );
    }
    let err = text(&b.run(&["add", "openai", OPENAI_SECRET]).stderr);
    assert!(err.contains("other processes can read it"), "{err}");
    assert!(b.list_json().is_empty());
    b.assert_no_plaintext(&[OPENAI_SECRET]);
}

#[test]
fn malformed_or_placeholder_secrets_are_refused() {
    let b = Broker::new();
    let out = b.add_cmd(&["add", "openai"], "not-an-openai-key\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("does not look like a key for OpenAI"));
    assert!(!text(&out.stderr).contains("not-an-openai-key"));
    let out = b.add_cmd(&["add", "openai"], "");
    assert_eq!(out.status.code(), Some(1));
    let out = b.add_cmd(&["add", "nosuchprovider"], "x\n");
    assert!(text(&out.stderr).contains("unknown provider \"nosuchprovider\""));
    assert!(b.list_json().is_empty());
    // The placeholder agents hold is not a key, even with --force.
    let catalog = broker_cli::providers::Catalog::builtin();
    let placeholder = &catalog.get("openai").unwrap().placeholder;
    let out = b.add_cmd(&["add", "openai", "--force"], &format!("{placeholder}\n"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("placeholder"),
        "{}",
        text(&out.stderr)
    );
    assert!(b.list_json().is_empty());
    // --force stores what the pattern refuses.
    let out = b.add_cmd(&["add", "openai", "--force"], "not-an-openai-key\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    b.assert_no_plaintext(&["not-an-openai-key"]);
}

#[test]
fn wrong_passphrase_fails_clearly_and_changes_nothing() {
    let b = Broker::with_passphrase("correct horse battery staple");
    b.add("openai", "default", OPENAI_SECRET);
    assert!(b.run_ok(&["show", "openai"]).contains("passphrase"));
    assert!(!b.home.join("master.key").exists());
    let before = std::fs::read(b.home.join("vault.db")).unwrap();
    let audit_before = std::fs::read(b.home.join("audit.jsonl")).unwrap();

    let wrong = Broker {
        passphrase: Some("wrong horse".into()),
        ..Broker::new()
    };
    let wrong = Broker {
        home: b.home.clone(),
        ..wrong
    };
    for out in [
        wrong.run(&["list"]),
        wrong.run(&["show", "openai"]),
        wrong.run(&["remove", "openai"]),
        wrong.add_cmd(
            &["add", "openai", "--profile", "other"],
            "sk-test-cli-vault-0004-never-stored\n",
        ),
    ] {
        assert_eq!(out.status.code(), Some(1));
        let err = text(&out.stderr);
        assert!(
            err.contains("wrong passphrase") && err.contains("nothing was changed"),
            "{err}"
        );
    }
    // No passphrase at all: says which variable to set.
    let out = b.run_cmd({
        let mut c = b.cmd(&["list"]);
        c.env_remove("BROKER_PASSPHRASE");
        c
    });
    assert!(
        text(&out.stderr).contains("set BROKER_PASSPHRASE"),
        "{}",
        text(&out.stderr)
    );

    assert_eq!(std::fs::read(b.home.join("vault.db")).unwrap(), before);
    assert_eq!(
        std::fs::read(b.home.join("audit.jsonl")).unwrap(),
        audit_before
    );
    assert!(!b.home.join("master.key").exists());
    assert_eq!(b.list_json().len(), 1);
    b.assert_no_plaintext(&[OPENAI_SECRET, "sk-test-cli-vault-0004-never-stored"]);
    wrong.assert_no_plaintext(&[OPENAI_SECRET, "sk-test-cli-vault-0004-never-stored"]);
}

#[test]
fn missing_key_file_is_an_error_not_a_new_key() {
    let b = Broker::new();
    b.add("openai", "default", OPENAI_SECRET);
    std::fs::remove_file(b.home.join("master.key")).unwrap();
    let out = b.add_cmd(
        &["add", "openai", "--profile", "x"],
        "sk-test-cli-vault-0005-never-stored\n",
    );
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("master.key") && err.contains("missing"),
        "{err}"
    );
    assert!(!b.home.join("master.key").exists());
}

#[test]
fn eight_processes_adding_and_reading_lose_nothing() {
    let b = std::sync::Arc::new(Broker::new());
    const PER_WORKER: usize = 6;
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let b = b.clone();
            std::thread::spawn(move || {
                for i in 0..PER_WORKER {
                    let profile = format!("w{w}-{i}");
                    b.add(
                        "openai",
                        &profile,
                        &format!("sk-test-concurrent-{w}-{i}-fake"),
                    );
                    let shown = b.run_ok(&["show", "openai", "--profile", &profile]);
                    assert!(shown.contains("sk-…"), "{shown}");
                    b.run_ok(&["list"]);
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let list = b.list_json();
    assert_eq!(list.len(), 8 * PER_WORKER);
    assert!(b
        .run_ok(&["audit", "verify"])
        .contains(&format!("OK: {} lines", 8 * PER_WORKER)));
    let secrets: Vec<String> = (0..8)
        .flat_map(|w| (0..PER_WORKER).map(move |i| format!("sk-test-concurrent-{w}-{i}-fake")))
        .collect();
    b.assert_no_plaintext(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn kill_9_during_writes_leaves_a_vault_that_opens_and_verifies() {
    let b = Broker::new();
    let started = std::time::Instant::now();
    b.add("openai", "default", OPENAI_SECRET);
    let one_add = started.elapsed();
    // Start writers and SIGKILL them at moments spread over the time one add takes, so some
    // die before, some during and some after their transaction.
    for i in 0..24u32 {
        let mut child = b.cmd(&["add", "openai", "--profile", &format!("k{i}")]);
        let mut child = child.stdin(Stdio::piped()).spawn().unwrap();
        let secret = format!("sk-test-killed-{i}-fake-value\n");
        let _ = child.stdin.take().unwrap().write_all(secret.as_bytes());
        std::thread::sleep(one_add * i / 16);
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        b.record(&out);
    }
    // Every credential that was stored decrypts, and the vault still takes writes.
    let stored = b.list_json();
    eprintln!("{} of 24 killed writers had committed", stored.len() - 1);
    for c in stored {
        let profile = c["profile"].as_str().unwrap();
        b.run_ok(&["show", "openai", "--profile", profile]);
    }
    b.add("openai", "after", "sk-test-after-the-kills-fake");
    assert!(b.list_json().iter().any(|c| c["profile"] == "after"));
    let verify = b.run(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify.stdout));
    let secrets: Vec<String> = (0..24)
        .map(|i| format!("sk-test-killed-{i}-fake-value"))
        .collect();
    let mut all: Vec<&str> = secrets.iter().map(String::as_str).collect();
    all.extend([OPENAI_SECRET, "sk-test-after-the-kills-fake"]);
    b.assert_no_plaintext(&all);
}

#[test]
fn audit_verify_detects_an_edited_line() {
    let b = Broker::new();
    b.add("openai", "default", OPENAI_SECRET);
    b.add("openai", "second", "sk-test-cli-vault-0006-second-key");
    b.run_ok(&["remove", "openai", "--profile", "second"]);
    assert!(b.run_ok(&["audit", "verify"]).contains("OK: 3 lines"));

    let path = b.home.join("audit.jsonl");
    let log = std::fs::read_to_string(&path).unwrap();
    let edited = log.replacen("\"profile\":\"second\"", "\"profile\":\"innocent\"", 1);
    assert_ne!(log, edited);
    std::fs::write(&path, edited).unwrap();
    let out = b.run(&["audit", "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("BROKEN at line 2"),
        "{}",
        text(&out.stdout)
    );

    // The human view and --since still read it.
    let table = b.run_ok(&["audit", "--since", "1h"]);
    assert!(table.contains("credential_removed"), "{table}");
    assert_eq!(
        b.run_ok(&["audit", "--since", "2999-01-01T00:00:00Z", "--json"]),
        ""
    );

    // A line that is not a record is skipped with a pointer to `verify`.
    let mut log = std::fs::read_to_string(&path).unwrap();
    log.push_str("garbage\n");
    std::fs::write(&path, log).unwrap();
    let out = b.run(&["audit"]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("1 line(s)"),
        "{}",
        text(&out.stderr)
    );
    b.assert_no_plaintext(&[OPENAI_SECRET, "sk-test-cli-vault-0006-second-key"]);
}

#[test]
fn audit_follow_prints_new_events() {
    let b = Broker::new();
    b.add("openai", "default", OPENAI_SECRET);
    let mut follow = b.cmd(&["audit", "--follow", "--json"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    b.run_ok(&["remove", "openai"]);
    std::thread::sleep(Duration::from_millis(800));
    let _ = follow.kill();
    let out = follow.wait_with_output().unwrap();
    b.record(&out);
    let lines: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[1].contains("credential_removed"));
    b.assert_no_plaintext(&[OPENAI_SECRET]);
}

#[test]
fn rekey_moves_the_master_key_and_every_command_follows() {
    let mut b = Broker::new();
    b.add("openai", "default", OPENAI_SECRET);
    let key_file = b.home.join("master.key");
    assert!(key_file.exists());

    // Key file -> passphrase, the new passphrase from the environment.
    let new_pass = "correct horse battery staple";
    let out = b.run_cmd({
        let mut cmd = b.cmd(&["rekey", "--to", "passphrase"]);
        cmd.env("BROKER_NEW_PASSPHRASE", new_pass);
        cmd
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("set BROKER_PASSPHRASE"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !key_file.exists(),
        "the key file that no longer unlocks the vault is gone"
    );
    // The key file source no longer opens it; the new passphrase does.
    let out = b.run(&["list"]);
    assert!(!out.status.success());
    b.passphrase = Some(new_pass.into());
    let shown = b.run_ok(&["show", "openai", "--json"]);
    assert!(shown.contains("\"key_source\": \"passphrase\""), "{shown}");
    b.passphrase = Some("not the passphrase".into());
    assert!(text(&b.run(&["list"]).stderr).contains("wrong passphrase"));

    // Passphrase -> a key file again: the passphrase unlocks, a new key file is written.
    b.passphrase = Some(new_pass.into());
    b.run_ok(&["rekey", "--to", "file"]);
    assert!(key_file.exists());
    b.passphrase = None;
    assert_eq!(b.list_json().len(), 1);
    let verify = b.run_ok(&["audit", "verify"]);
    assert!(
        verify.contains("intact") || verify.contains("ok"),
        "{verify}"
    );
    let audit = b.run_ok(&["audit", "--json"]);
    assert_eq!(audit.matches("vault_rekeyed").count(), 2, "{audit}");
    b.assert_no_plaintext(&[OPENAI_SECRET, new_pass]);
}

#[test]
fn rekey_with_a_new_passphrase_on_stdin_and_without_a_vault() {
    let b = Broker::new();
    let out = b.run(&["rekey", "--to", "file"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no vault"),
        "{}",
        text(&out.stderr)
    );
    b.add("openai", "default", OPENAI_SECRET);
    let out = b.add_cmd(&["rekey", "--to", "passphrase"], "from stdin\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let b = Broker {
        passphrase: Some("from stdin".into()),
        ..b
    };
    assert_eq!(b.list_json().len(), 1);
    // An empty one changes nothing.
    let out = b.add_cmd(&["rekey", "--to", "passphrase"], "\n");
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("empty"), "{}", text(&out.stderr));
    assert_eq!(b.list_json().len(), 1);
    b.assert_no_plaintext(&[OPENAI_SECRET, "from stdin"]);
}
