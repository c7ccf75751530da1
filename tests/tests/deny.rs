//! `--deny-unlisted` through libbroker.so: a preloaded agent reaches nothing but its
//! providers and loopback, plain http:// included.
//!
//! The unlisted destination is a real listener on 192.0.2.10 (a documentation address) inside
//! a private network namespace that the test makes with `unshare -n`: nothing leaves it.

use std::process::Command;
use std::time::Duration;

use broker_integration::{broker_bin, run_bounded, shim_lib, Home};

#[test]
fn deny_unlisted_refuses_http_and_https_to_other_hosts() {
    let _ = shim_lib();
    if !rustix::process::geteuid().is_root() || broker_integration::which("unshare").is_none() {
        broker_integration::skip("needs root and unshare(1) to make a private network namespace");
        return;
    }
    let home = Home::new();
    let broker = broker_bin();
    let script = format!(
        r#"set -u
ip link set lo up && ip addr add 192.0.2.10/32 dev lo || exit 90
python3 -m http.server --bind 192.0.2.10 8080 >/dev/null 2>&1 &
srv=$!
python3 -m http.server --bind 127.0.0.1 8081 >/dev/null 2>&1 &
local=$!
trap 'kill $srv $local' EXIT
for i in $(seq 100); do curl -s -o /dev/null http://192.0.2.10:8080/ && curl -s -o /dev/null http://127.0.0.1:8081/ && break; sleep 0.05; done
{b} run -- curl -s -o /dev/null -w 'open:%{{http_code}}\n' http://192.0.2.10:8080/
{b} run --deny-unlisted -- sh -c 'curl -s -o /dev/null -w "denied-http:%{{http_code}}\n" http://192.0.2.10:8080/; curl -s -o /dev/null -w "denied-https:%{{http_code}}\n" https://192.0.2.10:8443/; curl -s -o /dev/null -w "loopback:%{{http_code}}\n" http://127.0.0.1:8081/; true'
"#,
        b = broker.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-n", "sh", "-c", &script])
        .env("BROKER_HOME", home.path())
        .env("BROKER_KEY_SOURCE", "file");
    broker_integration::scrub(&mut cmd);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("open:200"),
        "without --deny-unlisted the host is reachable: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("denied-http:000"),
        "plain http refused: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("denied-https:000"),
        "https refused: {stdout}\n{stderr}"
    );
    // Loopback stays allowed: local services keep working.
    assert!(stdout.contains("loopback:200"), "{stdout}");
    // Each refusal the shim made is in the audit log, with the destination.
    let audit = home.audit_until(|a| {
        ["192.0.2.10:8080", "192.0.2.10:8443"].iter().all(|dest| {
            a.lines()
                .any(|l| l.contains("\"denial\"") && l.contains(dest))
        })
    });
    for dest in ["192.0.2.10:8080", "192.0.2.10:8443"] {
        assert!(
            audit.lines().any(|l| l.contains("\"denial\"")
                && l.contains(dest)
                && l.contains("refused by libbroker.so")),
            "{dest} not audited: {audit}"
        );
    }
    let hosts: Vec<String> = audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "denial")
        .filter_map(|v| v["host"].as_str().map(str::to_string))
        .collect();
    assert!(
        !hosts.iter().any(|h| h.starts_with("127.")),
        "loopback is not a denial: {hosts:?}"
    );
    let verify = run_bounded(
        home.broker().args(["audit", "verify"]),
        Duration::from_secs(20),
    );
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}
