//! `broker serve`: the long-running broker, who may use it, and agents that join it.

use std::process::Command;
use std::time::Duration;

use broker_integration::{
    count_events, get, run_bounded, send, Home, Origin, Reply, Serve, TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-serve-0123456789";
const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A system user for the other-uid test (CI runs as root and may create it).
fn other_user() -> Option<&'static str> {
    const NAME: &str = "broker-peer-test";
    if !is_root() {
        broker_integration::skip("creating another user needs root");
        return None;
    }
    let exists = Command::new("id")
        .arg(NAME)
        .output()
        .is_ok_and(|o| o.status.success());
    if !exists {
        let made = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status();
        if !made.is_ok_and(|s| s.success()) {
            broker_integration::skip("useradd failed");
            return None;
        }
    }
    Some(NAME)
}

/// A GET of /v1/models with the OpenAI placeholder, through `serve`'s fake address.
fn ask_openai(serve: &Serve, h2: bool) -> broker_integration::ClientResponse {
    send(
        serve.addr_for("api.openai.com"),
        "api.openai.com",
        &serve.ca_pem(),
        h2,
        get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        ),
    )
    .expect("response")
}

#[test]
fn another_uid_cannot_use_the_broker() {
    let Some(user) = other_user() else { return };
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::Text(200, "ok".into()));
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let addr = serve.addr_for("api.openai.com");
    let connect_to = format!("api.openai.com:443:{}:{}", addr.ip(), addr.port());
    let curl = |as_user: Option<&str>| {
        let mut cmd = match as_user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "curl"]);
                c
            }
            // Our own agent goes through the shim, which presents the run's ticket.
            None => {
                let mut c = Command::new("curl");
                c.env("LD_PRELOAD", broker_integration::shim_lib())
                    .env(broker_contract::ENV_SHIM_CONFIG, &serve.config_path);
                c
            }
        };
        // -k: the other user cannot read the run CA under BROKER_HOME; what is tested here is
        // that the broker refuses the connection itself.
        cmd.args([
            "-sS",
            "-k",
            "--max-time",
            "10",
            "--connect-to",
            &connect_to,
            "https://api.openai.com/v1/models",
            "-H",
        ])
        .arg(format!("Authorization: Bearer {OPENAI_PH}"));
        run_bounded(&mut cmd, Duration::from_secs(30))
    };
    let ours = curl(None);
    assert!(
        ours.status.success(),
        "our own uid is served: {}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let theirs = curl(Some(user));
    assert!(
        !theirs.status.success(),
        "another uid was served: {}",
        String::from_utf8_lossy(&theirs.stdout)
    );
    assert_eq!(
        origin.requests().len(),
        1,
        "only our request reached the origin"
    );
    let denied = |audit: &str| {
        audit
            .lines()
            .any(|l| l.contains("\"denial\"") && l.contains("refused"))
    };
    let audit = home.audit_until(denied);
    assert!(denied(&audit), "{audit}");
}

#[test]
fn a_second_serve_for_the_same_home_is_refused() {
    let ca = TestCa::new();
    let home = Home::new();
    let _serve = Serve::start(&home, &ca, &[]);
    let out = run_bounded(
        home.broker()
            .arg("serve")
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
}

#[test]
fn serve_will_not_start_without_an_audit_log_it_can_open() {
    let home = Home::new();
    std::fs::create_dir_all(home.path().join("audit.jsonl")).expect("a directory in its place");
    let out = run_bounded(
        home.broker()
            .arg("serve")
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "served without an audit log: {stderr}"
    );
    assert!(
        stderr.contains("audit.jsonl")
            && stderr.contains("does not use credentials it cannot audit"),
        "{stderr}"
    );
}

/// The audit log replaced under a running daemon (here by a symlink to /dev/null, which would
/// swallow every line): a credential is used only while its use can be recorded, and
/// `broker audit reset --yes` brings the daemon back. (The same refusal covers a full disk:
/// events that cannot be written are kept and retried, see `audit_queue`'s tests.)
#[test]
fn no_credential_is_used_while_the_audit_log_cannot_be_written() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let ask = || ask_openai(&serve, false);
    assert_eq!(ask().status, 200);
    let log = home.path().join("audit.jsonl");
    std::fs::rename(&log, home.path().join("moved.jsonl")).expect("move the log away");
    std::os::unix::fs::symlink("/dev/null", &log).expect("symlink");
    // A use may go out before its event fails to land; from then on the broker refuses.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let r = ask();
        if r.status == 503 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(std::time::Instant::now() < deadline, "never refused");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        refused.text().contains("audit log cannot be written"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.header("x-broker-error-source"), Some("broker"));
    let sent_before = origin.requests().len();
    for _ in 0..3 {
        assert_eq!(ask().status, 503);
    }
    assert_eq!(
        origin.requests().len(),
        sent_before,
        "nothing more went upstream"
    );
    let stderr = serve.stderr();
    assert!(
        stderr.contains("cannot append to the audit log")
            && stderr.contains("replaced while the broker ran"),
        "{stderr}"
    );
    // The reset starts a new chain where the daemon looks; it writes there at its next retry.
    home.broker_ok(&["audit", "reset", "--yes"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ask().status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {}",
            serve.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let audit = home.audit_until(|a| a.contains("\"status\":200"));
    assert!(audit.starts_with("{\"seq\":1,"), "{audit}");
    assert!(audit.contains("\"event\":\"audit_reset\""), "{audit}");
    home.broker_ok(&["audit", "verify"]);
}

/// `broker rekey` under a running daemon: the secrets stay sealed under the same data key, so
/// a daemon that has unlocked the vault goes on using them.
#[test]
fn a_running_serve_keeps_working_across_a_rekey() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let ask = || ask_openai(&serve, true).status;
    assert_eq!(ask(), 200);
    let out = run_bounded(
        home.broker()
            .args(["rekey", "--to", "passphrase"])
            .env("BROKER_NEW_PASSPHRASE", "a new passphrase for the test")
            .stdin(std::process::Stdio::null()),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!home.path().join("master.key").exists());
    assert_eq!(ask(), 200, "the daemon still unlocks what it had unlocked");
}

#[test]
fn serve_answers_through_the_fake_address() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    assert_eq!(ask_openai(&serve, true).status, 200);
}

#[test]
fn broker_run_joins_a_running_serve_with_its_own_policy() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let curl = "curl -sS -o /dev/null -w '%{http_code} ' -D - https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"; echo; echo config=$BROKER_SHIM_CONFIG; echo pid=$$";
    let run = |allow: &str| {
        let mut cmd = home.broker();
        cmd.args(["run", "--allow", allow, "--", "sh", "-c", curl])
            .stdin(std::process::Stdio::null());
        run_bounded(&mut cmd, Duration::from_secs(60))
    };
    let out = run("openai");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("200 "), "{stdout}");
    // The daemon's audit names the agent (broker run tells it the pid once it started it):
    // the pid the host sees, not the one the agent has inside its sandbox's PID namespace.
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .expect("pid line");
    let audit = home.audit_until(|a| a.contains("\"credential_use\""));
    let audited = audit
        .lines()
        .find(|l| l.contains("\"credential_use\""))
        .and_then(|l| {
            l.split("\"pid\":")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .expect("a pid in the audit");
    assert!(
        audited > 1 && audited.to_string() != pid,
        "pid {audited} (inside: {pid}): {audit}"
    );
    // The run's files lived in the daemon's directory and are gone once the run ended.
    let config = stdout
        .lines()
        .find_map(|l| l.strip_prefix("config="))
        .expect("config path")
        .to_string();
    assert!(
        config.starts_with(home.path().join("run").to_str().expect("utf8")),
        "{config}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::path::Path::new(&config).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the run's files outlived it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another run with another allow list: openai is refused by the broker.
    let out = run("anthropic");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("403 ") && stdout.contains("not allowed in this run"),
        "{stdout}"
    );
    assert_eq!(origin.requests().len(), 1);
    drop(serve);
}

/// `sh -c script` started the way a user starts an agent next to `broker serve`: a bare
/// `LD_PRELOAD`, with the machine's CA variables scrubbed or preset.
fn bare_preload(home: &Home, script: &str, preset: bool) -> Command {
    let mut cmd = Command::new("sh");
    broker_integration::scrub(&mut cmd);
    if preset {
        broker_integration::preset_ca_vars(&mut cmd);
    }
    cmd.env("BROKER_HOME", home.path())
        .env("LD_PRELOAD", broker_integration::shim_lib())
        .args(["-c", script]);
    cmd
}

#[test]
fn a_bare_preload_finds_the_running_daemon() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "ok");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let _serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    for preset in [false, true] {
        let mut cmd = bare_preload(&home, "curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"", preset);
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "preset={preset}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok");
    }
    assert_eq!(origin.requests().len(), 2);
}

/// A bare preload gets a provider's placeholder only while a credential for it is stored,
/// and the daemon notices a `broker add` (or `remove`) made while it runs, within seconds,
/// without a restart.
#[test]
fn a_bare_preload_gets_placeholders_for_keys_added_while_the_daemon_runs() {
    let ca = TestCa::new();
    let home = Home::new();
    let _serve = Serve::start(&home, &ca, &[]);
    let script = "echo \"openai=${OPENAI_API_KEY-unset}\"";
    let agent_sees = || {
        let mut cmd = bare_preload(&home, script, false);
        cmd.env_remove("OPENAI_API_KEY");
        let out = run_bounded(&mut cmd, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let wait_for = |expected: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen = agent_sees();
            if seen.starts_with(expected) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still {seen}, not {expected}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(agent_sees(), "openai=unset");
    home.add("openai", OPENAI_KEY);
    wait_for("openai=sk-broker-placeholder-openai-");
    home.broker_ok(&["remove", "openai"]);
    wait_for("openai=unset");
}

const DOTENV_KEY: &str = "sk-test-dotenv-key-for-serve-handover-0123456789";

/// The agent of the handover test: calls the API with the key from its environment, has a
/// child (curl) call it too, then reports what it holds and waits for stdin to close so the
/// test can read its memory.
const HANDOVER_AGENT: &str = r#"
import os, subprocess, sys, urllib.request
key = os.environ["OPENAI_API_KEY"]
req = urllib.request.Request("https://api.openai.com/v1/models", headers={"Authorization": "Bearer " + key})
print("body=" + urllib.request.urlopen(req).read().decode())
child = subprocess.run(["curl", "-sS", "--fail-with-body", "https://api.openai.com/v1/models",
                        "-H", "Authorization: Bearer " + key], capture_output=True, text=True)
print("child=" + child.stdout + child.stderr)
print("key=" + key)
print("config=" + os.environ.get("BROKER_SHIM_CONFIG", ""))
print("pid=" + str(os.getpid()), flush=True)
sys.stdin.read()
"#;

#[test]
fn a_bare_preload_hands_a_real_key_to_the_daemon_for_its_own_tree_only() {
    use std::io::{BufRead as _, Read as _};
    use std::process::Stdio;
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", DOTENV_KEY, "ok");
    // The vault holds no openai key: only the handed-over key can make the origin answer.
    let home = Home::new();
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let mut agent_pids = Vec::new();
    for preset in [false, true] {
        // `exec` replaces the process that opened the run: the run must survive it.
        let mut cmd = bare_preload(&home, "exec python3 -c \"$AGENT\"", preset);
        cmd.env("AGENT", HANDOVER_AGENT)
            .env("OPENAI_API_KEY", DOTENV_KEY)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut agent = cmd.spawn().expect("spawn agent");
        let mut stdout = std::io::BufReader::new(agent.stdout.take().expect("stdout"));
        let mut report = String::new();
        while !report.contains("pid=") {
            let mut line = String::new();
            if stdout.read_line(&mut line).expect("read agent") == 0 {
                break;
            }
            report.push_str(&line);
        }
        let pid: Option<u32> = report
            .lines()
            .find_map(|l| l.strip_prefix("pid="))
            .and_then(|p| p.parse().ok());
        let in_memory = pid.and_then(|pid| broker_integration::memory_contains(pid, DOTENV_KEY));
        // The scan does see what the agent holds: the placeholder is there.
        let scan_works = pid.and_then(|pid| broker_integration::memory_contains(pid, OPENAI_PH));
        let environ = pid
            .and_then(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
            .unwrap_or_default();
        drop(agent.stdin.take());
        let status = agent.wait().expect("wait agent");
        let mut stderr = String::new();
        agent
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        assert!(
            !report.contains(DOTENV_KEY) && !stderr.contains(DOTENV_KEY),
            "preset={preset}: the agent printed the real key"
        );
        assert!(
            status.success() && pid.is_some(),
            "preset={preset}: {report}{stderr}"
        );
        assert!(
            report.contains("body=ok\n"),
            "preset={preset}: {report}{stderr}"
        );
        agent_pids.extend(pid);
        assert!(
            report.contains("child=ok\n"),
            "preset={preset}: {report}{stderr}"
        );
        assert!(report.contains(&format!("key={OPENAI_PH}")), "{report}");
        assert!(
            stderr.contains("handed to broker serve"),
            "preset={preset}: {stderr}"
        );
        assert!(
            !broker_integration::contains(&environ, DOTENV_KEY),
            "preset={preset}: /proc/<pid>/environ shows the real key"
        );
        assert_eq!(scan_works, Some(true), "preset={preset}: memory scan");
        assert_eq!(
            in_memory,
            Some(false),
            "preset={preset}: the agent's memory holds the real key (None: unreadable)"
        );
        // The run was the agent's own and ended with it: its files are gone.
        let config = report
            .lines()
            .find_map(|l| l.strip_prefix("config="))
            .expect("config line");
        assert!(
            config.starts_with(home.path().join("run").to_str().expect("utf8"))
                && config.contains("serve-run-"),
            "{config}"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::path::Path::new(config).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "the handed-over run outlived its agent"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert_eq!(origin.requests().len(), 4);
    let audit = home.audit_until(|a| {
        agent_pids
            .iter()
            .all(|pid| a.contains(&format!("\"pid\":{pid},")))
    });
    for pid in &agent_pids {
        assert!(
            audit.contains(&format!("\"pid\":{pid},")),
            "the audit names the agent's pid {pid}"
        );
    }

    // Another agent of the same user, started without the key, cannot use it, even with the
    // placeholder (which it does not get in its environment: no openai key is stored).
    let mut cmd = bare_preload(
        &home,
        &format!(
            "curl -sS -o /dev/null -w '%{{http_code}}' https://api.openai.com/v1/models -H \"Authorization: Bearer {}\"",
            home.placeholder("openai")
        ),
        false,
    );
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let code = String::from_utf8_lossy(&out.stdout);
    assert_ne!(code, "200", "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(origin.requests().len(), 4);

    // Used, audited with the agent's own pid, and never written anywhere.
    let audit = String::from_utf8_lossy(&home.all_bytes()).to_string();
    assert!(!audit.contains(DOTENV_KEY), "the key reached BROKER_HOME");
    assert!(
        !serve.stderr().contains(DOTENV_KEY),
        "the key reached the logs"
    );
    assert!(audit.contains("python3"), "the audit names the agent");
}

#[test]
fn a_real_key_stays_hidden_when_the_daemon_died() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", DOTENV_KEY, "ok");
    let home = Home::new();
    // Killed with SIGKILL: its shim config and control socket are left behind.
    drop(Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]));
    let mut cmd = bare_preload(&home, "echo key=$OPENAI_API_KEY; curl -sS https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"", false);
    cmd.env("OPENAI_API_KEY", DOTENV_KEY);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !stdout.contains(DOTENV_KEY) && !stderr.contains(DOTENV_KEY),
        "the real key reached the agent's output"
    );
    assert!(stdout.contains(&format!("key={OPENAI_PH}")), "{stdout}");
    assert!(
        stderr.contains("not handed to the broker (cannot connect to"),
        "{stderr}"
    );
    // Fail closed: the managed host is refused, never reached directly.
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(origin.requests().is_empty());
}

/// A client of the control socket may claim any pid and command; the audit records the ones
/// the kernel gives for the connection (`SO_PEERCRED`, `/proc/<pid>/cmdline`), and an agent
/// pid that is not the client's own descendant is not taken.
#[test]
fn the_audit_names_the_client_the_kernel_sees_not_the_one_it_claims() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "ok");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let _serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let liar = r#"
import json, os, socket, subprocess, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"allow": None, "profile": "default", "deny_unlisted": False,
    "pid": 1, "command": "innocent" + "-looking-claim", "run_keys": {}}).encode() + b"\n")
reply = json.loads(s.makefile('rb').readline())
s.sendall(b"agent-pid 1\n")
env = dict(os.environ, LD_PRELOAD=sys.argv[2], BROKER_SHIM_CONFIG=reply["shim_config"])
p = subprocess.run(["sh", "-c", 'curl -sS https://api.openai.com/v1/models -H "Authorization: Bearer $OPENAI_API_KEY"'],
    env=env, capture_output=True)
print(p.stdout.decode(), p.stderr.decode())
print("pid=%d" % os.getpid())
"#;
    let socket = home.path().join("run").join("control.sock");
    let mut cmd = Command::new("python3");
    broker_integration::scrub(&mut cmd);
    cmd.args(["-c", liar])
        .arg(&socket)
        .arg(broker_integration::shim_lib())
        .stdin(std::process::Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .expect("pid line")
        .to_string();
    let audit = home.audit_until(|a| a.contains("\"credential_use\""));
    let line = audit
        .lines()
        .find(|l| l.contains("\"credential_use\""))
        .expect("a credential use");
    assert!(line.contains(&format!("\"pid\":{pid},")), "{line}");
    assert!(line.contains("python3"), "{line}");
    assert!(!line.contains("innocent-looking-claim"), "{line}");
}

/// `broker run` hands the keys it found in its environment only to a daemon that proves it
/// holds the vault's data key: a program listening at the control socket's path gets the
/// challenge and nothing else, and the run keeps its keys in a broker of its own.
#[test]
fn broker_run_hands_keys_only_to_a_daemon_that_proves_it_holds_the_vault() {
    const HANDED: &str = "sk-test-handed-key-for-the-proof-0123456789";
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", HANDED, "handed");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let curl = "curl -sS -o /dev/null -w '%{http_code}' https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"; echo; echo config=$BROKER_SHIM_CONFIG";

    // A fake daemon: records what it is sent, proves nothing.
    let run_dir = home.path().join("run");
    std::fs::create_dir_all(&run_dir).expect("run dir");
    let received = home.path().join("fake-daemon-received");
    let fake = r#"
import os, socket, sys
path, out = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.bind(path)
s.listen(1)
open(out + '.ready', 'w').close()
c, _ = s.accept()
f = c.makefile('rb')
with open(out, 'ab') as log:
    line = f.readline()
    log.write(line)
    c.sendall(b'no-proof\n')
    c.settimeout(2)
    try:
        log.write(f.read())
    except Exception:
        pass
"#;
    let mut daemon = Command::new("python3")
        .args(["-c", fake])
        .arg(run_dir.join("control.sock"))
        .arg(&received)
        .spawn()
        .expect("fake daemon");
    let ready = received.with_extension("ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fake daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut cmd = home.broker();
    cmd.env("OPENAI_API_KEY", HANDED)
        .args(["run", "--", "sh", "-c", curl])
        .stdin(std::process::Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let _ = daemon.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not handing keys"), "{stderr}");
    let got = std::fs::read(&received).expect("what the fake daemon got");
    assert!(
        got.starts_with(b"prove "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        !broker_integration::contains(&got, HANDED),
        "the fake daemon got the key"
    );
    let _ = std::fs::remove_file(run_dir.join("control.sock"));

    // The genuine daemon proves it, and the run joins it with the handed key.
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("200"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("config={}", run_dir.display())),
        "{stdout}"
    );
    assert_eq!(origin.requests().len(), 1);
    drop(serve);
}

/// Upstream trust comes from the system store and `--upstream-ca`, never from `SSL_CERT_FILE`
/// or `SSL_CERT_DIR`, which any program the agent starts can set: a broker given only those
/// refuses the test origin's certificate, and sends nothing.
#[test]
fn upstream_trust_ignores_ssl_cert_file_and_dir() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let ca_dir = ca.pem_path.parent().expect("ca dir").to_path_buf();
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--resolve")
        .arg(format!("api.openai.com:443:{}", origin.addr))
        .env("SSL_CERT_FILE", &ca.pem_path)
        .env("SSL_CERT_DIR", &ca_dir);
    let serve = Serve::spawn(&home, cmd);
    let answer = ask_openai(&serve, false);
    assert_eq!(answer.status, 502, "{}", answer.text());
    let why = answer
        .header("x-broker-error")
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("certificate"), "{why}");
    assert!(origin.requests().is_empty(), "a request reached the origin");
}

/// A `broker serve` killed with SIGKILL (a crash): after a quiet moment the log holds every
/// event, and the vault's head names its last line (the writer writes within 5 ms and syncs and
/// moves the head within 20 ms, also when no further event comes). Killed right after a burst,
/// the last events may be lost and the head may trail the log; the log still verifies, and the
/// next start accepts it.
#[test]
fn a_killed_serve_leaves_a_log_that_verifies_and_holds_what_it_had_time_to_write() {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::Text(200, "ok".into()));
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let log = home.path().join("audit.jsonl");
    let audit = || std::fs::read_to_string(&log).expect("audit log");
    let verify = || {
        let out = run_bounded(
            home.broker()
                .args(["audit", "verify"])
                .stdin(std::process::Stdio::null()),
            Duration::from_secs(30),
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{said}");
        said
    };
    let start = || Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);

    let serve = start();
    for _ in 0..5 {
        assert_eq!(ask_openai(&serve, false).status, 200);
    }
    // Quiet for a hundred times the writer's settle interval, then killed.
    std::thread::sleep(Duration::from_secs(2));
    drop(serve);
    let text = audit();
    assert_eq!(count_events(&text, "credential_use"), 5, "{text}");
    let lines = text.lines().count();
    let said = verify();
    assert!(
        said.contains(&format!("{lines} lines")) && said.contains(&format!("head (line {lines})")),
        "the head names the last line: {said}"
    );

    let serve = start();
    for _ in 0..20 {
        assert_eq!(ask_openai(&serve, false).status, 200);
    }
    drop(serve);
    let uses = count_events(&audit(), "credential_use");
    assert!((5..=25).contains(&uses), "{uses}");
    verify();

    let serve = start();
    assert_eq!(ask_openai(&serve, false).status, 200);
    std::thread::sleep(Duration::from_secs(2));
    drop(serve);
    assert_eq!(count_events(&audit(), "credential_use"), uses + 1);
    verify();
}
