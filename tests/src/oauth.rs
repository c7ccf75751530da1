//! The OAuth side of the integration tests: a real OAuth 2.0 server (npm `oidc-provider`,
//! tests/oauth-server/server.mjs, on 127.0.0.1), a test provider `acme` whose endpoints are
//! that server's, an API origin for it that asks the server whether a bearer token is live,
//! and a driver that plays the browser (tests/oauth-server/browser.py) for a `broker login`.
//! Used by tests/oauth.rs (a user's logins) and tests/system.rs (the system broker's).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::{run_bounded, target_dir, Home, Origin, Reply, TestCa};

/// The API host of the test provider `acme`.
pub const API_HOST: &str = "api.acme.test";

/// The OAuth server, killed on drop.
pub struct OAuthServer {
    child: Child,
    pub issuer: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// `tests/oauth-server`: the server and the browser script.
pub fn fixture_dir() -> PathBuf {
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
    pub fn start(env: &[(&str, &str)]) -> Option<OAuthServer> {
        if Command::new("node")
            .arg("--version")
            .output()
            .map_or(true, |o| !o.status.success())
        {
            crate::skip("node is not installed; the OAuth tests need node and npm oidc-provider");
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

    pub fn entries(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .expect("log")
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Token endpoint outcomes for `grant_type`.
    pub fn token_events(&self, grant_type: &str) -> usize {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "token" && e["grant_type"] == grant_type)
            .count()
    }

    /// Requests that reached the token endpoint, whatever came of them.
    pub fn token_requests(&self) -> usize {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "request" && e["method"] == "POST" && e["path"] == "/token")
            .count()
    }

    /// Requests that reached the revocation endpoint, and whether the server revoked the
    /// grant (which ends the refresh token and every access token of the login).
    pub fn revocations(&self) -> (usize, bool) {
        let entries = self.entries();
        let requests = entries
            .iter()
            .filter(|e| e["event"] == "request" && e["path"] == "/token/revocation")
            .count();
        let errors = entries.iter().any(|e| e["event"] == "revocation_error");
        let revoked = entries.iter().any(|e| e["event"] == "grant_revoked");
        (requests, revoked && !errors)
    }

    /// The fingerprints of the refresh tokens the server issued, oldest first (see
    /// server.mjs: the first 16 hex digits of each token's SHA-256).
    pub fn issued_refresh_tokens(&self) -> Vec<String> {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "refresh_token_issued")
            .filter_map(|e| e["fp"].as_str().map(str::to_string))
            .collect()
    }

    /// The revocation requests that reached the server, in order: (`token_type_hint`, the
    /// token's fingerprint).
    pub fn revocation_requests(&self) -> Vec<(String, String)> {
        self.entries()
            .iter()
            .filter(|e| e["event"] == "revocation_request")
            .map(|e| {
                let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
                (field("hint"), field("fp"))
            })
            .collect()
    }

    /// Hold revocation requests (logged, not answered) until called again with `false`.
    pub fn hold_revocations(&self, hold: bool) {
        let on = if hold { 1 } else { 0 };
        assert_eq!(
            self.get(&format!("/test/hold-revocation?on={on}"), None),
            200
        );
    }

    /// A plain-HTTP GET to the server; the status.
    pub fn get(&self, path: &str, authorization: Option<&str>) -> u16 {
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
    pub fn token_is_live(&self, authorization: &str) -> bool {
        self.get("/api/check", Some(authorization)) == 200
    }

    /// A custom provider file for this server in `home`.
    pub fn install_provider(&self, home: &Home, oauth_extra: &str) {
        let dir = home.path().join("providers");
        std::fs::create_dir_all(&dir).expect("providers dir");
        std::fs::write(dir.join("acme.toml"), self.provider_toml(oauth_extra))
            .expect("provider file");
    }

    /// The definition of the test provider `acme` (API at [`API_HOST`], every endpoint this
    /// server's), with `oauth_extra` lines in its `[oauth]` table.
    pub fn provider_toml(&self, oauth_extra: &str) -> String {
        let i = &self.issuer;
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
        )
    }
}

impl Drop for OAuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The API origin: 200 for a bearer token the OAuth server says is live, else 401.
pub fn api_origin(ca: &TestCa, issuer: &str) -> Origin {
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

/// Run a `broker login ...` command (`cmd`, stdin set by the caller), playing the browser
/// with `browser.py` on the URL it prints (`url_marker` picks the line). Returns whether it
/// succeeded, its stderr and its stdout.
pub fn drive_login(
    cmd: &mut Command,
    url_marker: &str,
    browser_args: &[&str],
) -> (bool, String, Vec<u8>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker login");
    let stderr = child.stderr.take().expect("stderr");
    let mut stdout = child.stdout.take().expect("stdout");
    let stdout_reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = stdout.read_to_end(&mut all);
        all
    });
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
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "broker login printed no URL: {}",
                reader.join().unwrap_or_default()
            );
        };
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
    let stdout = stdout_reader.join().expect("stdout reader");
    (status.success(), stderr, stdout)
}

/// The bearer values `origin` received.
pub fn tokens_seen(origin: &Origin) -> Vec<String> {
    origin
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_string))
        .collect()
}
