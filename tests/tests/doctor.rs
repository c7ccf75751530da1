//! `broker doctor` and `broker ca export`.

use std::time::Duration;

use broker_integration::{agent_clients, run_bounded, Home, Serve, TestCa};

/// The agent CLIs `broker doctor` self-tests when it finds them on `PATH`.
const AGENTS: [&str; 6] = ["claude", "codex", "gemini", "opencode", "aider", "llm"];

/// `broker doctor --json` for `home` with `path` as `PATH`: the checks, each as (name,
/// status, detail), and the whole output. Fails when the output holds one of the self-test's
/// made-up keys (its prefixes are fixed; the rest is random).
fn doctor_json(home: &Home, path: &std::ffi::OsStr) -> (Vec<(String, String, String)>, String) {
    let out = run_bounded(
        home.broker().args(["doctor", "--json"]).env("PATH", path),
        Duration::from_secs(600),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    for prefix in ["sk-demo-", "sk-ant-demo-", "AIzaDemo-"] {
        assert!(
            !stdout.contains(prefix) && !stderr.contains(prefix),
            "doctor printed a made-up key of its self-test ({prefix}...)"
        );
    }
    let checks: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    let checks = checks
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            let field = |k: &str| c[k].as_str().unwrap_or_default().to_string();
            (field("check"), field("status"), field("detail"))
        })
        .collect();
    (checks, stdout)
}

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
    for name in ["curl", "python3", "node", "git", "wget"]
        .into_iter()
        .chain(AGENTS)
    {
        let s = status(&format!("self-test: {name}")).expect("each runtime is listed");
        assert!(s == "ok" || s == "skip", "{name}: {s}");
    }
}

/// With the agent CLIs that `scripts/test` installs on `PATH`, doctor runs each making one
/// model call against its self-test origin, and each passes: it printed the fake provider's
/// answer, every request reached the origin with the made-up key, and it printed no key.
#[test]
fn doctor_self_tests_each_agent_cli_on_path() {
    let clients = match agent_clients() {
        Ok(dir) => dir,
        Err(reason) => {
            println!("SKIP: the agent CLIs are not installed: {reason}");
            broker_integration::skip(&format!("the agent CLIs are not installed: {reason}"));
            return;
        }
    };
    let dirs = [
        clients.join("agents/node_modules/.bin"),
        clients.join("agents-venv/llm/bin"),
        clients.join("agents-venv/aider-chat/bin"),
    ];
    if let Some(missing) = dirs.iter().find(|d| !d.is_dir()) {
        assert!(
            std::env::var_os("BROKER_TEST_AGENT_CLIENTS").is_none(),
            "{} is missing although scripts/test installed the agent CLIs into {}",
            missing.display(),
            clients.display()
        );
        let why = format!(
            "SKIP: {} is not there (./scripts/test installs the agent CLIs)",
            missing.display()
        );
        println!("{why}");
        broker_integration::skip(&why);
        return;
    }
    // After the machine's own directories: the venvs' python3 must not stand in for the
    // system's in the python3 probe.
    let path = std::env::join_paths(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).chain(dirs),
    )
    .expect("PATH");
    let home = Home::new();
    let started = std::time::Instant::now();
    let (checks, stdout) = doctor_json(&home, &path);
    println!("broker doctor took {:.0?}:\n{stdout}", started.elapsed());
    for name in AGENTS {
        let check = format!("self-test: {name}");
        let found = checks.iter().find(|(c, _, _)| *c == check);
        let Some((_, status, detail)) = found else {
            panic!("{check} is not listed:\n{stdout}");
        };
        assert_eq!(status, "ok", "{check}: {detail}\n{stdout}");
        assert!(
            detail.contains("got the made-up key on"),
            "{check}: {detail}"
        );
        // The requests it made (listed in the detail) include a model call.
        assert!(
            [
                "POST /v1/responses",
                "GET /v1/responses (websocket)",
                "POST /v1/chat/completions",
                "POST /v1/messages",
                "generateContent",
            ]
            .iter()
            .any(|call| detail.contains(call)),
            "{check}: no model call listed: {detail}"
        );
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

/// `broker doctor` names the upstream proxy the broker would use, never its password; says
/// when there is none; and fails on one it cannot use.
#[test]
fn doctor_shows_the_upstream_proxy_without_its_password() {
    const PASSWORD: &str = "pr0xy-pa55word-for-doctor";
    let home = Home::new();
    let doctor = |env: Option<&str>| {
        let mut cmd = home.broker();
        cmd.args(["doctor", "--json", "--no-self-test"])
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY");
        if let Some(url) = env {
            cmd.env("HTTPS_PROXY", url);
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(120));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains(PASSWORD), "{text}");
        let checks: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
        let check = checks
            .as_array()
            .expect("array")
            .iter()
            .find(|c| c["check"] == "upstream proxy")
            .unwrap_or_else(|| panic!("no upstream proxy check: {text}"))
            .clone();
        (
            check["status"].as_str().unwrap_or_default().to_string(),
            check["detail"].as_str().unwrap_or_default().to_string(),
        )
    };
    let (status, detail) = doctor(Some(&format!("http://corp:{PASSWORD}@127.0.0.1:3128")));
    assert_eq!(status, "ok", "{detail}");
    assert!(
        detail.contains("http://127.0.0.1:3128 (from HTTPS_PROXY)"),
        "{detail}"
    );
    let (status, detail) = doctor(None);
    assert_eq!(status, "skip", "{detail}");
    let (status, detail) = doctor(Some("socks5://127.0.0.1:1080"));
    assert_eq!(status, "fail", "{detail}");
    assert!(detail.contains("HTTPS_PROXY"), "{detail}");
    std::fs::write(home.path().join("config.toml"), "upstream_proxy = \"\"\n").expect("config");
    let (status, _) = doctor(Some(&format!("http://corp:{PASSWORD}@127.0.0.1:3128")));
    assert_eq!(
        status, "skip",
        "upstream_proxy = \"\" overrides the environment"
    );
}
