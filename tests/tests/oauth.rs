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

use std::process::{Command, Stdio};
use std::time::Duration;

use broker_integration::oauth::{api_origin, drive_login, tokens_seen, OAuthServer, API_HOST};
use broker_integration::{contains, run_bounded, shim_lib, Home, Origin, Reply, TestCa};

/// `broker login acme ...` in `home`, playing the browser (see [`drive_login`]). Returns
/// (broker's exit status, its stderr).
fn login(home: &Home, args: &[&str], url_marker: &str, browser_args: &[&str]) -> (bool, String) {
    let mut cmd = home.broker();
    cmd.arg("login")
        .arg("acme")
        .args(["--no-browser", "--timeout", "60"])
        .args(args)
        .stdin(Stdio::null());
    let (ok, stderr, _) = drive_login(&mut cmd, url_marker, browser_args);
    (ok, stderr)
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

/// Regression: `broker logout` read the tokens, revoked them, then deleted the row. A refresh
/// that rotated the tokens in between (a running broker refreshing before expiry) had its new
/// refresh token deleted unrevoked: still valid at the server, and nowhere the user could
/// revoke it from. Here the server holds logout's first revocation request while a `broker
/// run` refreshes the expired token; logout must revoke the rotated refresh token too, and
/// remove the row.
#[test]
fn logout_also_revokes_the_tokens_a_refresh_rotated_during_it() {
    // Logins get 2-second access tokens, so the run after the sleep refreshes.
    let Some(idp) = OAuthServer::start(&[("FIRST_TTL", "2"), ("REFRESH_TTL", "3600")]) else {
        return;
    };
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = api_origin(&ca, &idp.issuer);
    let home = Home::new();
    idp.install_provider(&home, "client_id = \"broker-test\"\nclient_auth = \"none\"");
    let (ok, stderr) = login(&home, &[], "/auth?", &[]);
    assert!(ok, "broker login failed:\n{stderr}");
    assert_eq!(idp.issued_refresh_tokens().len(), 1, "{:?}", idp.entries());
    std::thread::sleep(Duration::from_millis(2500));

    idp.hold_revocations(true);
    let logout = home
        .broker()
        .args(["logout", "acme"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn broker logout");
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(logout.wait_with_output());
    });
    // Its first revocation request reaching the server means logout has read the tokens.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while idp.revocation_requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "logout sent no revocation: {:?}",
            done.try_recv()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Meanwhile a run uses the expired token: its broker refreshes, rotating the refresh token.
    let run = run_bounded(
        &mut agent_call(&home, &ca, &origin),
        Duration::from_secs(60),
    );
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("\"ok\":true"),
        "{}\n{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(idp.token_events("refresh_token"), 1, "{:?}", idp.entries());
    let issued = idp.issued_refresh_tokens();
    assert_eq!(issued.len(), 2, "the refresh rotated: {:?}", idp.entries());

    idp.hold_revocations(false);
    let out = done
        .recv_timeout(Duration::from_secs(60))
        .expect("broker logout did not finish")
        .expect("broker logout");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "broker logout failed: {stderr}");
    let revoked: Vec<String> = idp
        .revocation_requests()
        .into_iter()
        .filter(|(hint, _)| hint == "refresh_token")
        .map(|(_, fp)| fp)
        .collect();
    assert!(
        revoked.contains(&issued[0]),
        "the refresh token logout read was not revoked: {:?}",
        idp.entries()
    );
    assert!(
        revoked.contains(&issued[1]),
        "the refresh token rotated during the logout was not revoked (deleted from the vault, \
         still valid at the server): {:?}",
        idp.entries()
    );
    assert!(
        stderr.contains(
            "A refresh stored new tokens during the logout: revoked the new refresh token"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("the tokens were removed from the vault"),
        "{stderr}"
    );
    let list = run_bounded(
        home.broker().args(["list", "--json"]),
        Duration::from_secs(20),
    );
    assert_eq!(String::from_utf8_lossy(&list.stdout).trim(), "[]");
    assert_eq!(audit_events(&home, "logout"), 1);
    let tokens = tokens_seen(&origin);
    assert!(
        tokens.iter().all(|t| !idp.token_is_live(t)),
        "an access token still works after logout"
    );
    assert_no_token_leaks(
        &home,
        &tokens,
        &[&run.stdout, &run.stderr, &out.stdout, &out.stderr],
    );
}
