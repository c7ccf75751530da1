//! `broker serve`: the long-running broker, who may use it, and agents that join it.

use std::process::Command;
use std::time::Duration;

use broker_integration::{get, run_bounded, send, Home, Origin, Reply, Serve, TestCa};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-serve-0123456789";
const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A system user for the other-uid test (CI runs as root and may create it).
fn other_user() -> Option<&'static str> {
    const NAME: &str = "broker-peer-test";
    if !is_root() {
        eprintln!("SKIP: creating another user needs root");
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
            eprintln!("SKIP: useradd failed");
            return None;
        }
    }
    Some(NAME)
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
            None => Command::new("curl"),
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
    let audit = std::fs::read_to_string(home.path().join("audit.jsonl")).unwrap_or_default();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"denial\"") && l.contains("refused")),
        "{audit}"
    );
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
fn serve_answers_through_the_fake_address() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let r = send(
        serve.addr_for("api.openai.com"),
        "api.openai.com",
        &serve.ca_pem(),
        true,
        get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        ),
    )
    .expect("response");
    assert_eq!(r.status, 200);
}

#[test]
fn broker_run_joins_a_running_serve_with_its_own_policy() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let curl = "curl -sS -o /dev/null -w '%{http_code} ' -D - https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"; echo; echo config=$BROKER_SHIM_CONFIG";
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

#[test]
fn a_bare_preload_finds_the_running_daemon() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "ok");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let _serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    for preset in [false, true] {
        let mut cmd = Command::new("sh");
        broker_integration::scrub(&mut cmd);
        if preset {
            for var in broker_integration::CA_VARS {
                cmd.env(var, "/etc/ssl/certs/ca-certificates.crt");
            }
            cmd.env("SSL_CERT_DIR", "/etc/ssl/certs");
        }
        cmd.env("BROKER_HOME", home.path())
            .env("LD_PRELOAD", broker_integration::shim_lib())
            .args(["-c", "curl -sS --fail-with-body https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\""]);
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
