//! An attacker who can write `$BROKER_HOME` but has no master key edits `vault.db` with
//! `sqlite3`: every field that decides how and where a secret is used (kind, metadata with the
//! token endpoint and client id, expiry, a command's TTL, the command itself) is authenticated,
//! so the broker refuses that credential with an integrity error, sends nothing with it, and
//! the agent's answer holds no byte of it. And a credential command that fails while printing
//! the key tells the agent its exit status only; its stderr reaches the broker's log redacted.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use broker_integration::{contains, run_bounded, shim_lib, Home, Origin, TestCa};

const OPENAI_KEY: &str = "sk-test-integrity-openai-key-0123456789ab";
const API_HOST: &str = "api.acme.test";
const ACCESS: &str = "at-integrity-access-token-0123456789";
const REFRESH: &str = "rt-integrity-refresh-token-0123456789";
const CLIENT_SECRET: &str = "cs-integrity-client-secret-0123456789";

/// `sqlite3 vault.db <sql>`, as an attacker with write access to the home would.
fn sqlite3(home: &Home, sql: &str) {
    let out = Command::new("sqlite3")
        // A running broker commits the audit head to the vault: wait for its lock.
        .args(["-cmd", ".timeout 5000"])
        .arg(home.path().join("vault.db"))
        .arg(sql)
        .output()
        .expect("sqlite3 is installed");
    assert!(
        out.status.success(),
        "sqlite3 {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `broker run` with curl calling `url` with the placeholder in `$var` (`curl -i`: headers
/// printed), `host` resolved to `origin`.
fn agent_call(
    home: &Home,
    ca: &TestCa,
    host: &str,
    origin: SocketAddr,
    url: &str,
    var: &str,
) -> Output {
    let curl = format!("curl -sS -i --max-time 30 {url} -H \"Authorization: Bearer ${var}\"");
    let mut cmd = home.broker_run(ca, host, origin);
    cmd.args(["--", "sh", "-c", &curl]);
    run_bounded(&mut cmd, Duration::from_secs(60))
}

/// No form of any of `secrets` (as is, base64 at each offset) in `bytes`.
fn assert_holds_none_of(bytes: &[u8], secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!contains(bytes, secret), "{what} holds a secret");
        for offset in 0..3 {
            let padded = format!("{}{secret}", &"xx"[..offset]);
            let b64 = base64::engine::general_purpose::STANDARD.encode(padded);
            // The characters that depend on the secret only.
            let core = &b64[(8 * offset).div_ceil(6)..8 * (offset + secret.len()) / 6];
            assert!(!contains(bytes, core), "{what} holds a secret in base64");
        }
    }
}

/// The agent got the integrity error for `credential` (500, `x-broker-error`), and nothing
/// else of it.
fn assert_refused(out: &Output, credential: &str, remove: &str, secrets: &[&str], edit: &str) {
    // First, so that a failing check below cannot print a secret.
    assert_holds_none_of(&out.stdout, secrets, &format!("{edit}: the agent's answer"));
    assert_holds_none_of(&out.stderr, secrets, &format!("{edit}: the broker's log"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lower = stdout.to_lowercase();
    assert!(
        lower.starts_with("http/1.1 500") || lower.starts_with("http/2 500"),
        "{edit}: {stdout}"
    );
    let expected = format!(
        "x-broker-error: credential {credential} failed its integrity check (the vault row was changed outside broker): nothing was used; run '{remove}'"
    );
    assert!(lower.contains(&expected), "{edit}: {stdout}");
    assert!(
        stdout.contains(&format!(
            "broker: credential {credential} failed its integrity check"
        )),
        "{edit}: the body says it too: {stdout}"
    );
}

/// `broker doctor --no-self-test` fails on the vault naming `credential`, and `broker list`
/// marks it.
fn assert_reported(home: &Home, credential: &str) {
    let out = run_bounded(
        home.broker().args(["doctor", "--no-self-test"]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.contains("FAIL")
            && l.contains("vault")
            && l.contains("failed the integrity check")
            && l.contains(credential)),
        "{stdout}"
    );
    let out = run_bounded(home.broker().arg("list"), Duration::from_secs(30));
    let (provider, profile) = credential.split_once('/').expect("name");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with(provider)
            && l.contains(profile)
            && l.contains("INTEGRITY CHECK FAILED")),
        "{stdout}"
    );
    let listed: serde_json::Value =
        serde_json::from_slice(&home.broker_ok(&["list", "--json"]).stdout).expect("json");
    assert!(listed
        .as_array()
        .expect("array")
        .iter()
        .any(|c| c["provider"] == provider && c["integrity_ok"] == false));
}

#[test]
fn an_api_key_or_command_row_edited_with_sqlite3_is_refused_and_its_key_never_leaves() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let home = Home::new();
    let call = || {
        agent_call(
            &home,
            &ca,
            "api.openai.com",
            origin.addr,
            "https://api.openai.com/v1/models",
            "OPENAI_API_KEY",
        )
    };
    home.add("openai", OPENAI_KEY);
    let out = call();
    assert!(String::from_utf8_lossy(&out.stdout).contains("{\"data\":[]}"));
    assert_eq!(origin.requests().len(), 1);

    let edits = [
        // The known attack: the broker ran the key as a shell command and quoted it.
        "UPDATE credentials SET kind = 'command' WHERE provider = 'openai'",
        "UPDATE credentials SET kind = 'oauth2' WHERE provider = 'openai'",
        r#"UPDATE credentials SET metadata = '{"ttl_secs":1}' WHERE provider = 'openai'"#,
        "UPDATE credentials SET expires_at = '2000-01-01T00:00:00Z' WHERE provider = 'openai'",
        "UPDATE credentials SET updated_at = '2000-01-01T00:00:00Z' WHERE provider = 'openai'",
    ];
    for (i, edit) in edits.iter().enumerate() {
        sqlite3(&home, edit);
        let out = call();
        assert_refused(
            &out,
            "openai/default",
            "broker remove openai",
            &[OPENAI_KEY],
            edit,
        );
        assert_eq!(
            origin.requests().len(),
            1,
            "{edit}: nothing left with the key"
        );
        if i == 0 {
            assert_reported(&home, "openai/default");
        }
        // Adding it again recovers.
        home.add("openai", OPENAI_KEY);
    }
    let first = call();
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("{\"data\":[]}"),
        "{}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(origin.requests().len(), 2);

    // A command source: the command and its TTL are bound too.
    let keyfile = home.path().join("key-from-a-secrets-manager");
    std::fs::write(&keyfile, format!("{OPENAI_KEY}\n")).expect("write");
    let command = format!("cat '{}'", keyfile.display());
    home.add("anthropic", "sk-ant-test-integrity-other-key-0123456789");
    let edits = [
        r#"UPDATE credentials SET metadata = '{"ttl_secs":999999}' WHERE provider = 'openai'"#,
        "UPDATE credentials SET kind = 'api_key' WHERE provider = 'openai'",
        // Another row's sealed blob as the command.
        "UPDATE credentials SET secret = (SELECT secret FROM credentials WHERE provider = 'anthropic') WHERE provider = 'openai'",
    ];
    for edit in edits {
        home.broker_ok(&["add", "openai", "--from-command", &command]);
        let before = origin.requests().len();
        let first = call();
        assert!(
            String::from_utf8_lossy(&first.stdout).contains("{\"data\":[]}"),
            "{}{}",
            String::from_utf8_lossy(&first.stdout),
            String::from_utf8_lossy(&first.stderr)
        );
        sqlite3(&home, edit);
        let out = call();
        assert_refused(
            &out,
            "openai/default",
            "broker remove openai",
            &[OPENAI_KEY],
            edit,
        );
        assert_eq!(
            origin.requests().len(),
            before + 1,
            "{edit}: nothing left with the key"
        );
    }
    // The secrets manager's file aside, the key is nowhere under the home.
    std::fs::remove_file(&keyfile).expect("remove");
    assert!(!contains(&home.all_bytes(), OPENAI_KEY));
}

/// A token endpoint on plain http (accepted for loopback): answers every POST with fixed
/// tokens, and keeps what it was sent.
struct TokenEndpoint {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<String>>>,
}

impl TokenEndpoint {
    fn start() -> TokenEndpoint {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                head.push_str(&String::from_utf8_lossy(&body));
                seen.lock().expect("lock").push(head);
                let answer = format!(
                    r#"{{"access_token":"{ACCESS}","token_type":"Bearer","expires_in":3600,"refresh_token":"{REFRESH}"}}"#
                );
                let _ = write!(
                    reader.get_mut(),
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        TokenEndpoint { addr, received }
    }

    fn received(&self) -> Vec<String> {
        self.received.lock().expect("lock").clone()
    }
}

fn install_acme(home: &Path, token_url: &str) {
    let dir = home.join("providers");
    std::fs::create_dir_all(&dir).expect("providers dir");
    std::fs::write(
        dir.join("acme.toml"),
        format!(
            r#"name = "acme"
display_name = "ACME (test OAuth endpoint)"
env = ["ACME_TOKEN"]
placeholder = "acme-broker-placeholder-0000"
key_pattern = '^[A-Za-z0-9_.~-]{{8,}}$'
auth = "oauth2"
[[routes]]
hosts = ["{API_HOST}"]
credential = [{{ header = "authorization", scheme = "bearer" }}]
[oauth]
authorize_url = "https://idp.acme.test/auth"
token_url = "{token_url}"
scopes = ["api"]
client_id = "broker-service"
client_auth = "post"
grant = "client_credentials"
"#
        ),
    )
    .expect("write provider");
}

/// The known attack on an OAuth login: its token endpoint pointed at the attacker and its
/// expiry set to the past, so the broker would send the refresh token and the client secret
/// there. Every such edit is refused before anything is sent anywhere.
#[test]
fn an_oauth_row_edited_with_sqlite3_sends_nothing_anywhere() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, API_HOST, ACCESS, "{\"ok\":true}");
    let idp = TokenEndpoint::start();
    let attacker = TcpListener::bind("127.0.0.1:0").expect("bind");
    let attacker_addr = attacker.local_addr().expect("addr");
    attacker.set_nonblocking(true).expect("nonblocking");
    let home = Home::new();
    install_acme(home.path(), &format!("http://{}/token", idp.addr));
    let login = || {
        let out = home.run_with_stdin(&["login", "acme"], CLIENT_SECRET);
        assert!(
            out.status.success(),
            "broker login: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let call = || {
        agent_call(
            &home,
            &ca,
            API_HOST,
            origin.addr,
            "https://api.acme.test/v1/me",
            "ACME_TOKEN",
        )
    };
    login();
    assert_eq!(idp.received().len(), 1);
    assert!(idp.received()[0].contains("grant_type=client_credentials"));
    let out = call();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("{\"ok\":true}"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(origin.requests().len(), 1);

    let past = "expires_at = '2000-01-01T00:00:00Z'";
    let edits = [
        format!(
            "UPDATE credentials SET metadata = replace(metadata, 'http://{}/token', 'http://{attacker_addr}/token'), {past} WHERE provider = 'acme'",
            idp.addr
        ),
        format!("UPDATE credentials SET {past} WHERE provider = 'acme'"),
        "UPDATE credentials SET metadata = replace(metadata, 'broker-service', 'other-client') WHERE provider = 'acme'".to_string(),
        "UPDATE credentials SET kind = 'command' WHERE provider = 'acme'".to_string(),
        "UPDATE credentials SET refresh_secret = NULL WHERE provider = 'acme'".to_string(),
    ];
    for (i, edit) in edits.iter().enumerate() {
        sqlite3(&home, edit);
        let token_requests = idp.received().len();
        let out = call();
        assert_refused(
            &out,
            "acme/default",
            "broker remove acme",
            &[ACCESS, REFRESH, CLIENT_SECRET],
            edit,
        );
        assert!(
            attacker.accept().is_err(),
            "{edit}: something connected to the attacker's endpoint"
        );
        assert_eq!(idp.received().len(), token_requests, "{edit}: no refresh");
        assert_eq!(
            origin.requests().len(),
            1,
            "{edit}: nothing reached the API"
        );
        if i == 0 {
            assert_reported(&home, "acme/default");
        }
        login();
    }
    let out = call();
    assert!(String::from_utf8_lossy(&out.stdout).contains("{\"ok\":true}"));
    assert_holds_none_of(
        &home.all_bytes(),
        &[ACCESS, REFRESH, CLIENT_SECRET],
        "the home",
    );
}

/// A credential command that fails after printing the key (on stdout, on stderr, in base64):
/// the agent is told its exit status and a generic reason; the broker's log has its stderr
/// with every form of the key overwritten.
#[test]
fn a_failing_credential_command_tells_the_agent_its_status_and_logs_stderr_redacted() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let home = Home::new();
    let keyfile = home.path().join("key-from-a-secrets-manager");
    let unlocked = home.path().join("unlocked");
    std::fs::write(&keyfile, format!("{OPENAI_KEY}\n")).expect("write");
    std::fs::write(&unlocked, "").expect("write");
    let (k, u) = (keyfile.display(), unlocked.display());
    let command = format!(
        "cat '{k}'; [ -e '{u}' ] && exit 0; echo \"locked, key was $(cat '{k}')\" >&2; base64 '{k}' >&2; exit 1"
    );
    home.broker_ok(&["add", "openai", "--from-command", &command, "--ttl", "0"]);
    std::fs::remove_file(&unlocked).expect("lock the secrets manager");
    let out = agent_call(
        &home,
        &ca,
        "api.openai.com",
        origin.addr,
        "https://api.openai.com/v1/models",
        "OPENAI_API_KEY",
    );
    assert_holds_none_of(&out.stdout, &[OPENAI_KEY], "the agent's answer");
    assert_holds_none_of(&out.stderr, &[OPENAI_KEY], "the broker's log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.to_lowercase().contains(
            "x-broker-error: cannot get the openai key: the credential command failed (exit 1); its error output is in the broker's log"
        ),
        "{stdout}"
    );
    assert!(origin.requests().is_empty());
    // The log has the rest of stderr, with the key overwritten.
    assert!(
        stderr.contains("locked, key was [redacted-by-broker]"),
        "the stderr is logged, redacted"
    );
    // The secrets manager's file aside, the key is nowhere under the home.
    std::fs::remove_file(&keyfile).expect("remove");
    assert!(!contains(&home.all_bytes(), OPENAI_KEY));
}

/// A vault made by the release before rows were authenticated (the fixture, see its README):
/// the first command migrates it, every credential is kept and used, and afterwards its rows
/// are bound like new ones, even with the schema version set back.
#[test]
fn a_vault_of_the_previous_release_keeps_every_credential() {
    const FIXTURE_KEY: &str = "sk-fixture-openai-key-0123456789abcdef";
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", FIXTURE_KEY, "{\"data\":[]}");
    let home = Home::new();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../broker/tests/fixtures/vault-v3");
    for name in ["vault.db", "master.key"] {
        let to = home.path().join(name);
        std::fs::copy(fixture.join(name), &to).expect("copy fixture");
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }
    // The previous release's audit log beside it (format 1, unkeyed), as `broker add` left it.
    std::fs::write(
        home.path().join("audit.jsonl"),
        broker_integration::v1_audit_line(1, &"0".repeat(64), "openai") + "\n",
    )
    .expect("old audit log");
    let listed: serde_json::Value =
        serde_json::from_slice(&home.broker_ok(&["list", "--json"]).stdout).expect("json");
    let names: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|c| {
            assert_eq!(c["integrity_ok"], true, "{c}");
            format!(
                "{}/{}:{}",
                c["provider"].as_str().unwrap_or_default(),
                c["profile"].as_str().unwrap_or_default(),
                c["kind"].as_str().unwrap_or_default()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "acme/default:oauth2",
            "anthropic/work:api_key",
            "github/default:command",
            "openai/default:api_key"
        ]
    );
    let out = run_bounded(
        home.broker().args(["doctor", "--no-self-test"]),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("vault") && l.contains("4 credentials, all intact")),
        "{stdout}"
    );
    let call = || {
        agent_call(
            &home,
            &ca,
            "api.openai.com",
            origin.addr,
            "https://api.openai.com/v1/models",
            "OPENAI_API_KEY",
        )
    };
    let first = call();
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("{\"data\":[]}"),
        "{}{}",
        String::from_utf8_lossy(&first.stdout),
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(origin.requests().len(), 1);

    sqlite3(&home, "UPDATE credentials SET kind = 'command' WHERE provider = 'openai'; PRAGMA user_version = 3;");
    let out = call();
    assert_refused(
        &out,
        "openai/default",
        "broker remove openai",
        &[FIXTURE_KEY],
        "after the migration",
    );
    assert_eq!(origin.requests().len(), 1);
}

/// A running `broker serve` that has used (and cached) the key refuses it as soon as its row is
/// edited, and uses it again once it is added again.
#[test]
fn a_running_serve_refuses_a_row_edited_under_it() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let placeholder = home.placeholder("openai");
    let serve = broker_integration::Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let ask = || {
        broker_integration::send(
            serve.addr_for("api.openai.com"),
            "api.openai.com",
            &serve.ca_pem(),
            true,
            broker_integration::get(
                "api.openai.com",
                "/v1/models",
                &[("authorization", &format!("Bearer {placeholder}"))],
            ),
        )
        .expect("response")
    };
    assert_eq!(ask().status, 200);
    assert_eq!(ask().status, 200);
    sqlite3(
        &home,
        "UPDATE credentials SET kind = 'command' WHERE provider = 'openai'",
    );
    let refused = ask();
    let mut answer = format!("{:?}", refused.headers).into_bytes();
    answer.extend_from_slice(&refused.body);
    assert_holds_none_of(&answer, &[OPENAI_KEY], "the agent's answer");
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert!(
        refused
            .header("x-broker-error")
            .is_some_and(|e| e.starts_with("credential openai/default failed its integrity check")),
        "{:?}",
        refused.headers
    );
    assert_eq!(origin.requests().len(), 2, "nothing left with the key");
    home.add("openai", OPENAI_KEY);
    assert_eq!(ask().status, 200);
    assert_eq!(origin.requests().len(), 3);
    assert_holds_none_of(serve.stderr().as_bytes(), &[OPENAI_KEY], "serve's log");
}
