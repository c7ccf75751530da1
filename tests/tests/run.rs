//! `broker run`: the embedded broker with a real agent under libbroker.so.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use broker_integration::{contains, run_bounded, shim_lib, Home, Origin, TestCa};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-run-0123456789";
const DOTENV_KEY: &str = "sk-test-dotenv-openai-key-0123456789-xyz";

/// `broker run` for `home`, resolving api.openai.com to `origin`.
fn broker_run(home: &Home, ca: &TestCa, origin: &Origin, args: &[&str]) -> Command {
    let mut cmd = home.broker_run(ca, "api.openai.com", origin.addr);
    cmd.args(args);
    cmd
}

fn openai_origin(ca: &TestCa, key: &'static str) -> Origin {
    Origin::bearer(ca, "api.openai.com", key, "{\"data\":[]}")
}

#[test]
fn exit_codes_pass_through() {
    let home = Home::new();
    let status = |args: &[&str]| {
        let out = run_bounded(
            home.broker()
                .arg("run")
                .arg("--")
                .args(args)
                .stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        out.status.code()
    };
    assert_eq!(status(&["true"]), Some(0));
    assert_eq!(status(&["sh", "-c", "exit 7"]), Some(7));
    assert_eq!(status(&["sh", "-c", "kill -TERM $$"]), Some(143));
    assert_eq!(status(&["/nonexistent/agent"]), Some(127));
}

#[test]
fn signals_are_forwarded_to_the_agent() {
    let home = Home::new();
    // Outside BROKER_HOME, which the sandbox hides from the agent.
    let scratch = tempfile::tempdir().expect("tempdir");
    let marker = scratch.path().join("started");
    let mut child = home
        .broker()
        .arg("run")
        .arg("--")
        .args([
            "sh",
            "-c",
            &format!("touch {}; exec sleep 30", marker.display()),
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "agent did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert_eq!(status.code(), Some(143), "broker run returns 128+SIGTERM");
            break;
        }
        assert!(Instant::now() < deadline, "SIGTERM was not forwarded");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn curl_and_python_agents_use_the_key_without_holding_it() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = openai_origin(&ca, OPENAI_KEY);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let python = "import os,urllib.request as u\n\
        r=u.Request('https://api.openai.com/v1/models',headers={'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']})\n\
        print(u.urlopen(r).status)\n\
        print('pid=%d' % os.getpid())\n\
        print(open('/proc/self/environ','rb').read().decode(errors='replace'))";
    let mut agent_pids = Vec::new();
    for preset in [false, true] {
        let mut curl = broker_run(&home, &ca, &origin, &["--", "sh", "-c", "echo pid=$$; curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\""]);
        let mut py = broker_run(&home, &ca, &origin, &["--", "python3", "-c", python]);
        for cmd in [&mut curl, &mut py] {
            if preset {
                broker_integration::preset_ca_vars(cmd);
            }
            let out = run_bounded(cmd, Duration::from_secs(60));
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "preset={preset} {cmd:?}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY),
                "the agent saw the key"
            );
            assert!(
                stdout.contains("data") || stdout.contains("200\n"),
                "{stdout}"
            );
            agent_pids.extend(
                stdout
                    .lines()
                    .find_map(|l| l.strip_prefix("pid="))
                    .map(str::to_owned),
            );
        }
    }
    assert_eq!(origin.requests().len(), 4);
    assert!(
        !contains(&home.all_bytes(), OPENAI_KEY),
        "key in plaintext under BROKER_HOME"
    );
    // Every use is audited, even the last one of a run that exits right after it.
    let audit = std::fs::read_to_string(home.path().join("audit.jsonl")).expect("audit");
    let uses = broker_integration::count_events(&audit, "credential_use");
    assert_eq!(uses, 4, "{audit}");
    // ... each under its own agent's pid. (Inside the sandbox an agent's `$$` is its pid in
    // its own PID namespace, so the pids it printed are not the ones the host sees and the
    // audit records.)
    assert_eq!(agent_pids.len(), 4, "{agent_pids:?}");
    let mut audited: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"credential_use\""))
        .filter_map(|l| l.split("\"pid\":").nth(1)?.split(',').next())
        .collect();
    audited.sort_unstable();
    audited.dedup();
    assert_eq!(audited.len(), 4, "one pid per agent: {audit}");
}

#[test]
fn a_real_key_in_the_environment_is_handed_to_the_broker_and_hidden() {
    let ca = TestCa::new();
    let origin = openai_origin(&ca, DOTENV_KEY);
    let home = Home::new();
    let mut cmd = broker_run(
        &home,
        &ca,
        &origin,
        &["--allow", "openai", "--", "sh", "-c", "curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\" && echo && cat /proc/$$/environ | tr '\\0' '\\n'"],
    );
    cmd.env("OPENAI_API_KEY", DOTENV_KEY).env(
        "ANTHROPIC_API_KEY",
        "sk-ant-test-real-anthropic-in-env-12345",
    );
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("OPENAI_API_KEY=sk-broker-placeholder-openai"),
        "{stdout}"
    );
    assert!(
        !contains(&out.stdout, DOTENV_KEY),
        "the agent's environ holds the real key"
    );
    assert!(
        !stdout.contains("sk-ant-test-real-anthropic"),
        "a provider outside --allow kept its real key"
    );
    assert!(
        !stdout.contains("ANTHROPIC_API_KEY="),
        "no placeholder for providers outside --allow"
    );
    assert!(!contains(&out.stderr, DOTENV_KEY));
    assert!(
        !stdout.contains("test-vault-passphrase"),
        "the agent inherited BROKER_PASSPHRASE"
    );
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {DOTENV_KEY}").as_str())
    );
    assert!(
        !contains(&home.all_bytes(), DOTENV_KEY),
        "a run key is never stored"
    );
}

#[test]
fn a_key_from_a_command_is_fetched_on_use_and_failures_are_clear() {
    let ca = TestCa::new();
    let origin = openai_origin(&ca, OPENAI_KEY);
    let home = Home::new();
    let keyfile = home.path().join("key-from-a-secrets-manager");
    std::fs::write(&keyfile, format!("{OPENAI_KEY}\n")).expect("write");
    let command = format!("cat '{}'", keyfile.display());
    let out = home.broker_ok(&["add", "openai", "--from-command", &command, "--ttl", "60"]);
    assert!(!contains(&out.stderr, OPENAI_KEY) && !contains(&out.stdout, OPENAI_KEY));

    let curl =
        "curl -sS -i https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"";
    let out = run_bounded(
        &mut broker_run(&home, &ca, &origin, &["--", "sh", "-c", curl]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("200") && stdout.contains("data"),
        "{stdout}"
    );
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );

    // The command fails (the secrets manager is locked): a clear error, nothing forwarded.
    std::fs::remove_file(&keyfile).expect("remove");
    let out = run_bounded(
        &mut broker_run(&home, &ca, &origin, &["--", "sh", "-c", curl]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.to_lowercase().contains(
            "x-broker-error: cannot get the openai key: the credential command failed (exit 1)"
        ),
        "{stdout}"
    );
    assert_eq!(origin.requests().len(), 1);
    assert!(
        !contains(&home.all_bytes(), OPENAI_KEY),
        "the command's output is never stored"
    );

    // A command that fails at `broker add` stores nothing.
    let out = run_bounded(
        home.broker()
            .args(["add", "anthropic", "--from-command", "exit 3"])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the credential command failed (exit 3); nothing was stored"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Codex CLI reads its OpenAI key from `CODEX_API_KEY`: the agent finds the placeholder
/// there too, and a real key found there is handed to the run like one in `OPENAI_API_KEY`.
#[test]
fn codex_finds_the_openai_placeholder_in_codex_api_key() {
    let home = Home::new();
    let out = run_bounded(
        home.broker()
            .env("CODEX_API_KEY", DOTENV_KEY)
            .args(["run", "--", "sh", "-c", "echo \"codex=$CODEX_API_KEY\""])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("codex=sk-broker-placeholder-openai-"),
        "{stdout}"
    );
    assert!(!contains(&out.stdout, DOTENV_KEY) && !contains(&out.stderr, DOTENV_KEY));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CODEX_API_KEY held a real openai key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Gemini CLI reads `GEMINI_API_KEY`; Google's SDKs read `GOOGLE_API_KEY` first and warn on
/// every call when both are set. So only `GEMINI_API_KEY` gets the placeholder, and
/// `GOOGLE_API_KEY` stays unset, unless the user set it: then a real key there is hidden and
/// handed to the run like any other (the shim does the same for a bare `LD_PRELOAD`).
#[test]
fn gemini_gets_one_placeholder_variable_and_a_google_api_key_is_still_hidden() {
    const GOOGLE_KEY: &str = "AIzaSyTestRealGoogleKeyForRunTest0123456";
    let home = Home::new();
    // A stored key: placeholders go only to providers the run has a credential for.
    home.add("gemini", "AIzaSyTestStoredGeminiKeyForRunTest01234");
    let script = "echo \"gemini=$GEMINI_API_KEY google=${GOOGLE_API_KEY-unset}\"";
    let plain = run_bounded(
        home.broker()
            .env_remove("GOOGLE_API_KEY")
            .env_remove("GEMINI_API_KEY")
            .args(["run", "--", "sh", "-c", script])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&plain.stdout);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert!(
        stdout.contains("gemini=AIzaSy-broker-placeholder-gemini-")
            && stdout.contains("google=unset"),
        "{stdout}"
    );

    let with_key = run_bounded(
        home.broker()
            .env("GOOGLE_API_KEY", GOOGLE_KEY)
            .args(["run", "--", "sh", "-c", script])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&with_key.stdout);
    let stderr = String::from_utf8_lossy(&with_key.stderr);
    assert!(with_key.status.success(), "{stderr}");
    assert!(
        stdout.contains("google=AIzaSy-broker-placeholder-gemini-"),
        "{stdout}"
    );
    assert!(
        stderr.contains("GOOGLE_API_KEY held a real gemini key"),
        "{stderr}"
    );
    assert!(!contains(&with_key.stdout, GOOGLE_KEY) && !contains(&with_key.stderr, GOOGLE_KEY));
}

/// With a catalog of a hundred providers, an agent gets placeholders only for the providers
/// its run has a credential for (stored under the run's profile, or handed to the run): the
/// others' variables stay unset, so a tool that picks a provider by which key is set, or
/// sends a token variable when it is set, behaves as without broker. A real key the agent
/// is started with is still taken, for any provider in the catalog.
#[test]
fn only_providers_with_a_credential_get_placeholders() {
    let home = Home::new();
    home.add("openai", "sk-test-stored-openai-key-for-placeholders-0123");
    let work_key = "sk-ant-api03-test-stored-anthropic-work-profile-0123";
    let out = home.run_with_stdin(&["add", "anthropic", "--profile", "work"], work_key);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tavily_key = format!("tvly-test{}", "Real7".repeat(6));
    let script = "for v in OPENAI_API_KEY ANTHROPIC_API_KEY TAVILY_API_KEY NPM_TOKEN TWINE_PASSWORD; do eval \"echo $v=\\${$v-unset}\"; done";
    let run = |profile: Option<&str>, tavily: bool| {
        let mut cmd = home.broker();
        for var in [
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
            "TAVILY_API_KEY",
            "NPM_TOKEN",
            "TWINE_PASSWORD",
        ] {
            cmd.env_remove(var);
        }
        if tavily {
            cmd.env("TAVILY_API_KEY", &tavily_key);
        }
        cmd.arg("run");
        if let Some(profile) = profile {
            cmd.args(["--profile", profile]);
        }
        let out = run_bounded(
            cmd.args(["--", "sh", "-c", script]).stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!contains(&out.stdout, &tavily_key) && !contains(&out.stderr, &tavily_key));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let plain = run(None, false);
    for expected in [
        "OPENAI_API_KEY=sk-broker-placeholder-openai-",
        "ANTHROPIC_API_KEY=unset",
        "TAVILY_API_KEY=unset",
        "NPM_TOKEN=unset",
        "TWINE_PASSWORD=unset",
    ] {
        assert!(plain.contains(expected), "{expected} in {plain}");
    }
    // `--profile work`: the anthropic key stored there counts, the default openai one not.
    let work = run(Some("work"), false);
    assert!(
        work.contains("ANTHROPIC_API_KEY=sk-ant-api03-broker-placeholder"),
        "{work}"
    );
    assert!(work.contains("OPENAI_API_KEY=unset"), "{work}");
    // A real Tavily key in the environment is replaced and handed to the run.
    let handed = run(None, true);
    assert!(
        handed.contains("TAVILY_API_KEY=tvly-broker-placeholder-tavily-"),
        "{handed}"
    );
}

/// With only an OpenAI key stored, git and curl reach github.com (a managed host) as they
/// would without broker: the broker forwards their anonymous requests untouched, no 401 of
/// its own, with `--deny-unlisted` too (a provider's hosts are always allowed). git speaks the
/// dumb HTTP protocol to this origin (a `text/plain` ref list), which `ls-remote` accepts.
#[test]
fn git_and_curl_reach_github_unchanged_when_no_github_credential_is_stored() {
    const REF: &str = "1f0e3dad99908345f7439f8ffabdffc4b6f2d2e8";
    let ca = TestCa::new();
    let github = Origin::start(&ca, &["github.com"], |req| {
        match (req.header("authorization"), req.target.as_str()) {
            (Some(_), _) => broker_integration::Reply::Text(401, "unexpected credential".into()),
            (None, t) if t.starts_with("/any/public-repo.git/info/refs") => {
                broker_integration::Reply::Text(200, format!("{REF}\trefs/heads/main\n"))
            }
            (None, _) => broker_integration::Reply::Text(200, "github front page".into()),
        }
    });
    let origin = openai_origin(&ca, OPENAI_KEY);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let script = "git ls-remote https://github.com/any/public-repo.git && \
                  curl -sS --fail-with-body https://github.com/";
    for (preset, deny) in [(false, false), (true, false), (false, true)] {
        let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
        cmd.args(["--resolve", &format!("github.com:443:{}", github.addr)]);
        if deny {
            cmd.arg("--deny-unlisted");
        }
        cmd.args(["--", "sh", "-c", script])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
        if preset {
            broker_integration::preset_ca_vars(&mut cmd);
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "preset={preset} deny={deny}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("{REF}\trefs/heads/main")),
            "{stdout}"
        );
        assert!(stdout.contains("github front page"), "{stdout}");
    }
    let seen = github.requests();
    assert!(seen.len() >= 6, "{seen:?}");
    assert!(seen.iter().all(|r| r.header("authorization").is_none()));
    let audit = std::fs::read_to_string(home.path().join("audit.jsonl")).unwrap_or_default();
    assert_eq!(
        broker_integration::count_events(&audit, "credential_use"),
        0,
        "no credential was used: {audit}"
    );
}

/// A run has one fake address and one listener whatever the number of host patterns: a
/// provider of the user's with 400 of its own (beside the built-in catalog's; a run could
/// hold 254 when each pattern had an address of its own) works through the shim, for its
/// last exact name and a name under its last wildcard, and the shim's resolver hook gives
/// every managed name the same address.
#[test]
fn a_run_with_hundreds_of_host_patterns_reaches_the_last_ones() {
    let _ = shim_lib();
    const KEY: &str = "bulk-real-key-0123456789";
    const PH: &str = "bulk-broker-placeholder-0000";
    let ca = TestCa::new();
    let (exact, wild) = ("api299.bulk.test", "tenant.r99.bulk.test");
    let expected = format!("Bearer {KEY}");
    let origin = Origin::start(&ca, &[exact, wild], move |req| {
        match req.header("authorization") == Some(expected.as_str()) {
            true => broker_integration::Reply::Text(200, "bulk ok\n".into()),
            false => broker_integration::Reply::Text(401, "no valid key\n".into()),
        }
    });
    let home = Home::new();
    let providers = home.path().join("providers");
    std::fs::create_dir_all(&providers).expect("mkdir");
    let hosts: Vec<String> = (0..300)
        .map(|i| format!("\"api{i}.bulk.test\""))
        .chain((0..100).map(|i| format!("\"*.r{i}.bulk.test\"")))
        .collect();
    std::fs::write(
        providers.join("bulk.toml"),
        format!(
            "name = \"bulk\"\nenv = [\"BULK_API_KEY\"]\nplaceholder = \"{PH}\"\n\
             key_pattern = '^bulk-[A-Za-z0-9-]{{8,}}$'\n[[routes]]\nhosts = [{}]\n\
             credential = [{{ header = \"authorization\", scheme = \"bearer\" }}]\n",
            hosts.join(", ")
        ),
    )
    .expect("provider");
    home.add("bulk", KEY);
    let script = format!(
        "curl -sS --fail-with-body https://{exact}/v1/x -H \"Authorization: Bearer $BULK_API_KEY\" && \
         curl -sS --fail-with-body https://{wild}/v1/x -H \"Authorization: Bearer $BULK_API_KEY\" && \
         python3 -c 'import socket,sys; print(\"same\" if len({{socket.gethostbyname(h) for h in sys.argv[1:]}}) == 1 else \"differ\")' \
             {exact} {wild} api.openai.com api0.bulk.test"
    );
    let mut cmd = home.broker_run(&ca, exact, origin.addr);
    cmd.args(["--resolve", &format!("{wild}:443:{}", origin.addr)])
        .args(["--", "sh", "-c", &script]);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "bulk ok\nbulk ok\nsame\n");
    assert_eq!(origin.requests().len(), 2);
    assert!(!contains(&out.stdout, KEY) && !contains(&out.stderr, KEY));
}
