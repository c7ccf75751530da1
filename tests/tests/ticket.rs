//! Run tickets: one run cannot use another run's listeners (and so its `--allow` list,
//! profile and handed keys). A process of run A that connects to run B's fake address, its
//! `[::1]` listener or its CONNECT listener, with or without a ticket of its own and with the
//! placeholder B would swap, is refused before anything is read, the refusal is audited as
//! `ticket_refused`, and the origin never sees the key.

use std::io::{BufRead as _, Read as _};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use broker_contract::ShimConfig;
use broker_integration::{
    contains, count_events, get, run_bounded, send, Home, Origin, Serve, TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-tickets-012345";
const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";

/// Played by a process of run A, started without the shim (as a static binary or raw
/// syscalls would be): every way into run B's listeners it has. Arguments: B's slot, port,
/// IPv6 port (0: none) and CONNECT address. One line per attempt: `<name> refused` or
/// `<name> SERVED <answer>`; the CONNECT attempts print the status code.
const ATTACK: &str = r#"
import os, socket, ssl, sys
slot, port, port6, proxy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
placeholder = os.environ["OPENAI_API_KEY"]
# Run A's own ticket, from its own shim config: valid, but not B's.
own = [l.split(" ", 1)[1].strip() for l in open(os.environ["BROKER_SHIM_CONFIG"]) if l.startswith("ticket ")][0]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # B's CA does not matter to an attacker

def attempt(name, family, addr, preamble):
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(addr)
        s.sendall(preamble)
        t = ctx.wrap_socket(s, server_hostname="api.openai.com")
        t.sendall(("GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % placeholder).encode())
        answer = t.recv(4096)
        print(name, "SERVED" if answer else "refused", answer[:40])
    except (OSError, ssl.SSLError):
        print(name, "refused")

attempt("no-ticket", socket.AF_INET, ("127.77.%s.1" % slot, port), b"")
attempt("own-ticket", socket.AF_INET, ("127.77.%s.1" % slot, port), b"\0broker1" + own.encode())
attempt("garbage", socket.AF_INET, ("127.77.%s.1" % slot, port), b"\0broker1" + b"0" * 32)
if port6:
    attempt("v6-no-ticket", socket.AF_INET6, ("::1", port6), b"")

def connect(name, auth):
    host, p = proxy.rsplit(":", 1)
    s = socket.create_connection((host, int(p)), timeout=20)
    s.sendall(("CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n%s\r\n" % auth).encode())
    status = s.recv(4096).split(b"\r\n", 1)[0].decode()
    print(name, status.split(" ")[1] if " " in status else status)

import base64
connect("connect-no-auth", "")
connect("connect-own-ticket", "Proxy-Authorization: Basic %s\r\n" % base64.b64encode(("broker:" + own).encode()).decode())
"#;

/// Run A: a `broker run` that allows only GitHub (so it has no OpenAI of its own to use),
/// whose agent plays [`ATTACK`] against run `b`.
fn attack_from_run_a(
    home: &Home,
    ca: &TestCa,
    origin: &Origin,
    b: &ShimConfig,
    embedded: bool,
) -> String {
    let mut cmd = home.broker_run(ca, "api.openai.com", origin.addr);
    if embedded {
        cmd.arg("--embedded");
    }
    cmd.args([
        "--allow",
        "github",
        "--",
        "env",
        "-u",
        "LD_PRELOAD",
        "python3",
        "-c",
        ATTACK,
    ])
    .arg(b.slot.to_string())
    .arg(b.port.to_string())
    .arg(b.port6.to_string())
    .arg(b.connect_proxy.as_deref().expect("B's CONNECT listener"))
    // run A's agent holds the OpenAI placeholder, as any agent may (it is no secret).
    .env("OPENAI_API_KEY", OPENAI_PH);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "run A: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY));
    stdout
}

/// What every attack must come to: each attempt refused, each refusal audited for run B
/// without a ticket in it, and the origin never asked with the key.
fn assert_refused(
    home: &Home,
    origin: &Origin,
    b: &ShimConfig,
    stdout: &str,
    served_before: usize,
) {
    let mut attempts = vec!["no-ticket refused", "own-ticket refused", "garbage refused"];
    if b.port6 != 0 {
        attempts.push("v6-no-ticket refused");
    }
    attempts.extend(["connect-no-auth 407", "connect-own-ticket 407"]);
    for line in &attempts {
        assert!(
            stdout.lines().any(|l| l == *line),
            "missing {line:?} in:\n{stdout}"
        );
    }
    assert_eq!(
        origin.requests().len(),
        served_before,
        "nothing of run A's reached the origin through run B"
    );
    let audit = home.audit_until(|a| count_events(a, "ticket_refused") >= attempts.len());
    let refused: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"event\":\"ticket_refused\""))
        .collect();
    assert_eq!(refused.len(), attempts.len(), "{audit}");
    for line in &refused {
        assert!(line.contains("\"run_id\":"), "{line}");
        assert!(
            line.contains("connection from 127.0.0.1:") || line.contains("connection from [::1]:"),
            "{line}"
        );
    }
    assert!(
        refused.iter().any(|l| l.contains("not this run's")),
        "a wrong ticket is told apart from none: {audit}"
    );
    let ticket = b.ticket.as_ref().expect("B has a ticket");
    assert!(
        !audit.contains(ticket.expose()),
        "a ticket in the audit log"
    );
    assert!(!contains(audit.as_bytes(), OPENAI_KEY));
}

#[test]
fn cross_run_a_joined_run_cannot_use_the_daemons_run() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    // Run B: the daemon's own run, which bare-preload agents use; it allows OpenAI.
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let b = serve.config.clone();
    assert!(b.ticket.is_some(), "broker serve's run has a ticket");
    // B's own agents are served (the harness presents B's ticket, as B's shim does).
    let ok = send(
        serve.addr_for("api.openai.com"),
        "api.openai.com",
        &serve.ca_pem(),
        false,
        get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        ),
    )
    .expect("B's own request");
    assert_eq!((ok.status, ok.text().as_str()), (200, "models"));

    // Run A joins the same daemon as a run of its own.
    let stdout = attack_from_run_a(&home, &ca, &origin, &b, false);
    assert_refused(&home, &origin, &b, &stdout, 1);
    assert!(!serve
        .stderr()
        .contains(b.ticket.as_ref().expect("ticket").expose()));
}

/// Run B: an embedded `broker run` whose agent waits on its stdin; its shim config path comes
/// out through a file, as any process of the user could find it outside a sandbox.
struct RunB {
    child: Child,
    config: ShimConfig,
}

impl RunB {
    fn start(home: &Home, ca: &TestCa, origin: &Origin) -> RunB {
        let dir = tempfile::tempdir().expect("tempdir");
        let path_file = dir.path().join("b-config-path");
        let script = format!(
            "printf %s \"$BROKER_SHIM_CONFIG\" > '{}'; read _ || true",
            path_file.display()
        );
        let mut child = home
            .broker_run(ca, "api.openai.com", origin.addr)
            .args(["--embedded", "--", "sh", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn run B");
        let deadline = Instant::now() + Duration::from_secs(30);
        let config = loop {
            let parsed = std::fs::read_to_string(&path_file)
                .ok()
                .filter(|p| !p.is_empty())
                .and_then(|p| std::fs::read_to_string(p).ok())
                .and_then(|text| ShimConfig::parse(&text).ok());
            if let Some(config) = parsed {
                break config;
            }
            if Instant::now() > deadline || matches!(child.try_wait(), Ok(Some(_))) {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                panic!("run B did not start: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        broker_integration::register_run(&config);
        RunB { child, config }
    }

    /// End B's agent (EOF on its stdin) and B with it; B's stderr.
    fn finish(mut self) -> String {
        drop(self.child.stdin.take());
        let mut err = String::new();
        if let Some(e) = self.child.stderr.take() {
            for line in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                err.push_str(&line);
                err.push('\n');
            }
        }
        let status = self.child.wait().expect("wait run B");
        assert!(status.success(), "run B: {err}");
        err
    }
}

#[test]
fn cross_run_two_embedded_runs_cannot_use_each_others_listeners() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let run_b = RunB::start(&home, &ca, &origin);
    let b = run_b.config.clone();
    // Both runs use slot 1 (each embedded broker listens on its own port), so run A's shim
    // would send 127.77.1.1 to A's own port: the attacker goes around its shim.
    let addr = std::net::SocketAddr::from((broker_contract::run_ipv4(b.slot), b.port));
    let ok = send(
        addr,
        "api.openai.com",
        &std::fs::read(&b.ca_file).expect("B's CA"),
        true,
        get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        ),
    )
    .expect("B's own request");
    assert_eq!((ok.status, ok.text().as_str()), (200, "models"));

    let stdout = attack_from_run_a(&home, &ca, &origin, &b, true);
    let b_stderr = run_b.finish();
    assert_refused(&home, &origin, &b, &stdout, 1);
    assert!(!b_stderr.contains(b.ticket.as_ref().expect("ticket").expose()));
}

#[test]
fn cross_run_connect_listener_needs_the_runs_own_ticket() {
    // B's CONNECT listener serves B's own ticket (the fallback's HTTPS_PROXY userinfo) and
    // refuses a request without one with 407 and advice, checked with curl as the client.
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let proxy = serve
        .config
        .connect_proxy
        .clone()
        .expect("CONNECT listener");
    let ticket = serve.config.ticket.clone().expect("ticket");
    let dir = tempfile::tempdir().expect("tempdir");
    let curl = |proxy_url: &str| {
        // The proxy URL (with a ticket) goes in a curl config file: never in argv.
        let config = dir.path().join("curlrc");
        std::fs::write(&config, format!("proxy = \"{proxy_url}\"\n")).expect("curlrc");
        let mut cmd = Command::new("curl");
        broker_integration::scrub(&mut cmd);
        cmd.args(["-sS", "-i", "--max-time", "20", "-K"])
            .arg(&config)
            .arg("--cacert")
            .arg(&serve.config.ca_file)
            .args(["https://api.openai.com/v1/models", "-H"])
            .arg(format!("Authorization: Bearer {OPENAI_PH}"));
        run_bounded(&mut cmd, Duration::from_secs(30))
    };
    let refused = curl(&format!("http://{proxy}"));
    assert!(!refused.status.success());
    let text = String::from_utf8_lossy(&refused.stdout);
    assert!(text.starts_with("HTTP/1.1 407"), "{text}");
    assert!(text.contains("lacks the run's ticket"), "{text}");
    let wrong = curl(&format!("http://broker:{}@{proxy}", "0".repeat(32)));
    assert!(String::from_utf8_lossy(&wrong.stdout).starts_with("HTTP/1.1 407"));
    assert_eq!(origin.requests().len(), 0);

    let served = curl(&format!("http://broker:{}@{proxy}", ticket.expose()));
    assert!(
        served.status.success(),
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    assert!(String::from_utf8_lossy(&served.stdout).ends_with("models"));
    assert_eq!(origin.requests().len(), 1);
    let audit = home.audit_until(|a| count_events(a, "ticket_refused") >= 2);
    assert_eq!(count_events(&audit, "ticket_refused"), 2, "{audit}");
    assert!(!audit.contains(ticket.expose()));
}
