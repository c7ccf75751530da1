//! OAuth logins and the token lifecycle against a real OAuth 2.0 server: npm `oidc-provider`
//! (tests/oauth-server/server.mjs) on 127.0.0.1, with a test that plays the browser
//! (tests/oauth-server/browser.py: follows the login URL, submits the login and consent forms).
//!
//! The agent side is real too: `broker run` with curl under libbroker.so against a local TLS
//! origin for `api.acme.test`, which asks the OAuth server whether the bearer token it got is a
//! live access token. Tokens are whatever the server issues; the tests learn them only from
//! what the origin received, and check they appear nowhere else.
//!
//! Without `node` these tests print why and skip; with node but without `oidc-provider`
//! installed (`./scripts/test` installs it) they fail.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use broker_integration::{
    contains, run_bounded, shim_lib, target_dir, Home, Origin, Reply, TestCa,
};

const API_HOST: &str = "api.acme.test";

/// The OAuth server, killed on drop.
struct OAuthServer {
    child: Child,
    issuer: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oauth-server")
}

fn node_modules() -> PathBuf {
    std::env::var_os("BROKER_TEST_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            target_dir()
                .parent()
                .expect("target")
                .join("clients/node/node_modules")
        })
}

impl OAuthServer {
    /// Start the server, or `None` (with the reason printed) when node is not installed.
    fn start(env: &[(&str, &str)]) -> Option<OAuthServer> {
        if Command::new("node")
            .arg("--version")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            eprintln!(
                "SKIPPED: node is not installed; the OAuth tests need node and npm oidc-provider"
            );
            return None;
        }
        let modules = node_modules();
        assert!(
            modules.join("oidc-provider").exists(),
            "npm oidc-provider is not installed in {}: run ./scripts/test (it installs \
             tests/node/package.json), or set BROKER_TEST_NODE_MODULES",
            modules.display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("oauth.log");
        std::fs::write(&log, "").expect("log");
        let mut cmd = Command::new("node");
        cmd.arg(fixture_dir().join("server.mjs"))
            .env("NODE_PATH", &modules)
            .env("OAUTH_LOG", &log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn node");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining: a closed pipe would kill the server at its next console line.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the OAuth server did not start");
        let issuer = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("unexpected first line from the OAuth server: {line:?}"))
            .to_string();
        Some(OAuthServer {
            child,
            issuer,
            log,
            _dir: dir,
        })
    }

    fn entries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("log")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Token endpoint outcomes for `grant_type`.
    fn token_events(&self, grant_type: &str) -> usize {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "token" && e["grant_type"] == grant_type)
            .count()
    }

    /// Requests that reached the token endpoint, whatever came of them.
    fn token_requests(&self) -> usize {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "request" && e["method"] == "POST" && e["path"] == "/token")
            .count()
    }

    /// Requests that reached the revocation endpoint, and whether the server revoked the
    /// grant (which ends the refresh token and every access token of the login).
    fn revocations(&self) -> (usize, bool) {
        let entries = self.entries();
        let requests = entries
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == "/token/revocation")
            .count();
        let errors = entries.iter().any(|e| e["event"] == "revocation_error");
        let revoked = entries.iter().any(|e| e["event"] == "grant_revoked");
        (requests, revoked && !errors)
    }

    /// A plain-HTTP GET to the server; the status.
    fn get(&self, path: &str, authorization: Option<&str>) -> u16 {
        let addr = self.issuer.trim_start_matches("http://");
        let mut s = TcpStream::connect(addr).expect("connect");
        let auth = authorization
            .map(|a| format!("authorization: {a}\r\n"))
            .unwrap_or_default();
        write!(s, "GET {path} HTTP/1.0\r\nhost: {addr}\r\n{auth}\r\n").expect("write");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("read");
        out.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// Does the server take `authorization` as a live access token?
    fn token_is_live(&self, authorization: &str) -> bool {
        self.get("/api/check", Some(authorization)) == 200
    }

    /// A custom provider file for this server in `home`.
    fn install_provider(&self, home: &Home, oauth_extra: &str) {
        let i = &self.issuer;
        let dir = home.path().join("providers");
        std::fs::create_dir_all(&dir).expect("providers dir");
        std::fs::write(
            dir.join("acme.toml"),
            format!(
                r#"name = "acme"
display_name = "ACME (test OAuth server)"
env = ["ACME_TOKEN"]
placeholder = "acme-broker-placeholder-0000"
key_pattern = '^[A-Za-z0-9_.~-]{{8,}}$'
auth = "oauth2"
[[routes]]
hosts = ["{API_HOST}"]
credential = [{{ header = "authorization", scheme = "bearer" }}]
[oauth]
authorize_url = "{i}/auth"
token_url = "{i}/token"
device_url = "{i}/device/auth"
revoke_url = "{i}/token/revocation"
device_flow = true
scopes = ["openid", "offline_access"]
{oauth_extra}
"#
            ),
        )
        .expect("provider file");
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API origin: 200 for a bearer token the OAuth server says is live, else 401.
fn api_origin(ca: &TestCa, issuer: &str) -> Origin {
    let addr = issuer.trim_start_matches("http://").to_string();
    Origin::start(ca, &[API_HOST], move |req| {
        let Some(auth) = req.header("authorization") else {
            return Reply::Text(401, "no token".into());
        };
        let mut s = TcpStream::connect(&addr).expect("connect idp");
        let _ = write!(
            s,
            "GET /api/check HTTP/1.0\r\nhost: {addr}\r\nauthorization: {auth}\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        if out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200") {
            Reply::Text(200, "{\"ok\":true}".into())
        } else {
            Reply::Text(401, "token not live".into())
        }
    })
}

/// `broker login acme ...`, playing the browser with `browser.py` on the URL the broker
/// prints (`url_marker` picks the line). Returns (broker's exit status, its stderr).
fn login(home: &Home, args: &[&str], url_marker: &str, browser_args: &[&str]) -> (bool, String) {
    let mut child = home
        .broker()
        .arg("login")
        .arg("acme")
        .args(["--no-browser", "--timeout", "60"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker login");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("broker login printed no URL");
        if let Some(pos) = line.find(url_marker) {
            let start = line[..pos].rfind("http").expect("url start");
            let url = line[start..].split_whitespace().next().expect("url");
            break url.to_string();
        }
    };
    let browser = run_bounded(
        Command::new("python3")
            .arg(fixture_dir().join("browser.py"))
            .arg(&url)
            .args(browser_args),
        Duration::from_secs(60),
    );
    assert!(
        browser.status.success(),
        "the browser failed: {}{}",
        String::from_utf8_lossy(&browser.stdout),
        String::from_utf8_lossy(&browser.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "broker login did not finish");
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().expect("reader");
    (status.success(), stderr)
}

/// `broker run` with curl calling the API with the placeholder (`curl -i`: headers printed).
fn agent_call(home: &Home, ca: &TestCa, origin: &Origin) -> Command {
    let mut cmd = home.broker();
    cmd.arg("run")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .arg("--resolve")
        .arg(format!("{API_HOST}:443:{}", origin.addr))
        .args([
            "--",
            "sh",
            "-c",
            "curl -sS -i --max-time 30 https://api.acme.test/v1/me -H \"Authorization: Bearer $ACME_TOKEN\"",
        ])
        .stdin(Stdio::null());
    cmd
}

fn audit_events(home: &Home, event: &str) -> usize {
    let audit = std::fs::read_to_string(home.path().join("audit.jsonl")).unwrap_or_default();
    broker_integration::count_events(&audit, event)
}

/// The bearer values the origin received.
fn tokens_seen(origin: &Origin) -> Vec<String> {
    origin
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_string))
        .collect()
}

fn assert_no_token_leaks(home: &Home, tokens: &[String], outputs: &[&[u8]]) {
    for t in tokens {
        let raw = t.trim_start_matches("Bearer ");
        assert!(
            !contains(&home.all_bytes(), raw),
            "a token in plaintext under BROKER_HOME"
        );
        for out in outputs {
            assert!(!contains(out, raw), "a token in a command's output");
        }
    }
}

#[test]
fn pkce_login_end_to_end_then_the_agent_uses_it_and_logout_revokes() {
    let Some(idp) = OAuthServer::start(&[]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");

    let (ok, stderr) = login(&home, &[], "/auth?", &[]);
    assert!(ok, "broker login failed:\n{stderr}");
    assert!(stderr.contains("code_challenge_method=S256"), "{stderr}");
    assert!(stderr.contains("Logged in to ACME"), "{stderr}");
    assert_eq!(idp.token_events("authorization_code"), 1);
    let list = run_bounded(
        home.broker().args(["list", "--json"]),
        Duration::from_secs(20),
    );
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).expect("list json");
    assert_eq!(list[0]["kind"], "oauth2", "{list}");
    assert!(list[0]["expires_at"].is_string(), "{list}");
    assert_eq!(audit_events(&home, "login"), 1);

    let out = run_bounded(
        &mut agent_call(&home, &ca, &origin),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("200") && stdout.contains("\"ok\":true"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tokens = tokens_seen(&origin);
    assert_eq!(tokens.len(), 1);
    assert!(idp.token_is_live(&tokens[0]));
    assert_no_token_leaks(
        &home,
        &tokens,
        &[&out.stdout, &out.stderr, stderr.as_bytes()],
    );

    home.broker_ok(&["logout", "acme"]);
    assert_eq!(
        idp.revocations(),
        (2, true),
        "refresh and access token revoked at the server: {:?}",
        idp.entries()
    );
    assert!(
        !idp.token_is_live(&tokens[0]),
        "the access token still works after logout"
    );
    assert_eq!(audit_events(&home, "logout"), 1);
    let list = run_bounded(
        home.broker().args(["list", "--json"]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
}

#[test]
fn device_flow_end_to_end() {
    let Some(idp) = OAuthServer::start(&[]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");

    let (ok, stderr) = login(&home, &["--device"], "user_code=", &[]);
    assert!(ok, "broker login --device failed:\n{stderr}");
    assert!(stderr.contains("enter the code"), "{stderr}");
    assert!(stderr.contains("expires in"), "{stderr}");
    assert_eq!(
        idp.token_events("urn:ietf:params:oauth:grant-type:device_code"),
        1
    );
    let out = run_bounded(
        &mut agent_call(&home, &ca, &origin),
        Duration::from_secs(60),
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_no_token_leaks(
        &home,
        &tokens_seen(&origin),
        &[&out.stdout, &out.stderr, stderr.as_bytes()],
    );
}

#[test]
fn tampered_state_is_rejected() {
    let Some(idp) = OAuthServer::start(&[]) else {
        return;
    };
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");
    let (ok, stderr) = login(&home, &[], "/auth?", &["--tamper-state"]);
    assert!(!ok, "a login with a forged state succeeded:\n{stderr}");
    assert!(stderr.contains("state"), "{stderr}");
    assert_eq!(
        idp.token_requests(),
        0,
        "the code was exchanged despite the forged state"
    );
    let list = run_bounded(
        home.broker().args(["list", "--json"]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
}

#[test]
fn four_concurrent_runs_with_an_expired_token_refresh_exactly_once() {
    // Logins get 2-second access tokens; refreshed ones an hour. The server takes its time
    // answering a refresh, so the four runs really overlap.
    let Some(idp) = OAuthServer::start(&[
        ("FIRST_TTL", "2"),
        ("REFRESH_TTL", "3600"),
        ("TOKEN_DELAY_MS", "500"),
    ]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");
    let (ok, stderr) = login(&home, &[], "/auth?", &[]);
    assert!(ok, "broker login failed:\n{stderr}");
    std::thread::sleep(Duration::from_millis(2500));

    let children: Vec<_> = (0..4)
        .map(|_| {
            agent_call(&home, &ca, &origin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn broker run")
        })
        .collect();
    let mut outputs = Vec::new();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            stdout.contains("\"ok\":true"),
            "a run failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(out);
    }
    assert_eq!(
        idp.token_events("refresh_token"),
        1,
        "exactly one refresh reaches the server: {:?}",
        idp.entries()
    );
    assert_eq!(idp.token_requests(), 2, "one code exchange and one refresh");
    assert_eq!(audit_events(&home, "refresh"), 1);
    let tokens = tokens_seen(&origin);
    assert_eq!(tokens.len(), 4);
    assert!(
        tokens.iter().all(|t| t == &tokens[0]),
        "all four used the one new token"
    );

    // The rotated refresh token was stored: the next refresh (forced by a short-lived
    // token again) works with it instead of replaying the spent one.
    let mut outs: Vec<&[u8]> = Vec::new();
    for o in &outputs {
        outs.push(&o.stdout);
        outs.push(&o.stderr);
    }
    assert_no_token_leaks(&home, &tokens, &outs);
}

#[test]
fn a_refused_refresh_answers_login_expired() {
    let Some(idp) = OAuthServer::start(&[("FIRST_TTL", "1")]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");
    let (ok, stderr) = login(&home, &[], "/auth?", &[]);
    assert!(ok, "broker login failed:\n{stderr}");
    assert_eq!(idp.get("/test/fail-token?on=1", None), 200);
    std::thread::sleep(Duration::from_millis(1500));

    for attempt in 0..2 {
        let out = run_bounded(
            &mut agent_call(&home, &ca, &origin),
            Duration::from_secs(60),
        );
        let stdout = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            stdout.contains("x-broker-error: login expired: run 'broker login acme'"),
            "attempt {attempt}: {stdout}"
        );
        assert!(
            stdout.starts_with("http/1.1 401") || stdout.starts_with("http/2 401"),
            "{stdout}"
        );
    }
    // The second use did not ask the server again: the credential is marked.
    assert_eq!(idp.token_requests(), 2, "{:?}", idp.entries());
    assert!(origin.requests().is_empty(), "nothing reached the API");
    let audit = home.audit_until(|a| a.contains("refresh refused: invalid_grant"));
    assert!(audit.contains("refresh refused: invalid_grant"), "{audit}");
}

#[test]
fn client_credentials_login_keeps_the_secret_sealed() {
    let Some(idp) = OAuthServer::start(&[]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(
        &home,
        "client_id = \"broker-service\"\nclient_auth = \"basic\"\ngrant = \"client_credentials\"",
    );
    // Scopes of a client credentials grant are resource scopes, not openid.
    let secret = "test-service-secret-0123456789";
    let out = home.run_with_stdin(&["login", "acme", "--scopes", "api"], secret);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        idp.token_events("client_credentials"),
        1,
        "{:?}",
        idp.entries()
    );
    assert!(
        !contains(&home.all_bytes(), secret),
        "client secret in plaintext"
    );
    let run = run_bounded(
        &mut agent_call(&home, &ca, &origin),
        Duration::from_secs(60),
    );
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("\"ok\":true"),
        "{}",
        String::from_utf8_lossy(&run.stdout)
    );
    assert_no_token_leaks(
        &home,
        &tokens_seen(&origin),
        &[&run.stdout, &run.stderr, &out.stderr],
    );
}

#[test]
fn a_401_from_the_upstream_refreshes_once_and_retries() {
    let Some(idp) = OAuthServer::start(&[]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    // An API that rejects the first token it sees (as if revoked upstream) and accepts the
    // next live one: the broker must refresh and resend, and the agent sees only the 200.
    let first = std::sync::Mutex::new(None::<String>);
    let live = api_origin(&ca, &idp.issuer);
    let live_addr = live.addr;
    let origin = Origin::start(&ca, &[API_HOST], move |req| {
        let auth = req.header("authorization").unwrap_or_default().to_string();
        let mut first = first.lock().expect("lock");
        if first.is_none() || first.as_deref() == Some(auth.as_str()) {
            *first = Some(auth);
            return Reply::Text(401, "token rejected".into());
        }
        drop(first);
        // Ask the live API (which asks the OAuth server) about the new token.
        let out = std::process::Command::new("curl")
            .args([
                "-sk",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--connect-to",
            ])
            .arg(format!("{API_HOST}:443:{live_addr}"))
            .arg(format!("https://{API_HOST}/v1/me"))
            .args(["-H", &format!("authorization: {auth}")])
            .output()
            .expect("curl");
        if out.stdout == b"200" {
            Reply::Text(200, "{\"ok\":true}".into())
        } else {
            Reply::Text(401, "token not live".into())
        }
    });
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");
    let (ok, stderr) = login(&home, &[], "/auth?", &[]);
    assert!(ok, "broker login failed:\n{stderr}");

    let out = run_bounded(
        &mut agent_call(&home, &ca, &origin),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"ok\":true"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(idp.token_events("refresh_token"), 1, "{:?}", idp.entries());
    let tokens = tokens_seen(&origin);
    assert_eq!(tokens.len(), 2, "one rejected request, one retry");
    assert_ne!(
        tokens[0], tokens[1],
        "the retry carried the refreshed token"
    );
    assert_eq!(audit_events(&home, "refresh"), 1);
    assert_no_token_leaks(&home, &tokens, &[&out.stdout, &out.stderr]);
}
