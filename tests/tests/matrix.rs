//! The client matrix (issue 3), the clients no other test covers: python `httpx`, `aiohttp`
//! and a raw `ssl` socket, node `tls.connect`, curl over HTTP/2 and HTTP/1.1.
//!
//! Each is a real client run as the agent under `broker run` (embedded broker) against a local
//! TLS origin playing api.openai.com that answers 200 only to the real key, once with the
//! machine's CA variables scrubbed and once with them preset to the system bundle. Every run
//! checks that the origin got the real key, that the agent held only the placeholder (it prints
//! its variable and its whole environment, and the real key is nowhere in its output), and that
//! the real key is neither on the run's stderr (the embedded broker's log) nor in plaintext
//! anywhere under `BROKER_HOME` (the audit included).
//!
//! The Python modules come from the venv `scripts/test` builds (its `bin` first on `PATH`), node
//! from `PATH`; a missing one skips with a printed reason.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use broker_integration::{contains, run_bounded, shim_lib, which, Home, Origin, TestCa};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-matrix-0123456789";
const BODY: &str = "{\"object\":\"list\",\"data\":[{\"id\":\"matrix-model\"}]}";

/// The placeholder the broker gives agents for `OPENAI_API_KEY`, from the catalog.
fn placeholder(home: &Home) -> String {
    let placeholder = home.placeholder("openai");
    assert!(placeholder.starts_with("sk-broker-placeholder-openai"));
    placeholder
}

/// Runs `agent` under `broker run`, once with the CA variables scrubbed and once preset to the
/// system bundle, and makes the checks every client shares. The agent prints `key=<its
/// OPENAI_API_KEY>`, its environment, `status=<code>` and the response body; `check` gets
/// its stdout (already known not to hold the key) for what is particular to the client.
fn run_matrix(name: &str, agent: &[&str], check: impl Fn(&str, &str)) {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, BODY);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let placeholder = placeholder(&home);
    let real_auth = format!("Bearer {OPENAI_KEY}");

    for preset in [false, true] {
        let label = format!(
            "{name} (CA variables {})",
            if preset { "preset" } else { "scrubbed" }
        );
        let before = origin.requests().len();
        let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
        cmd.arg("--")
            .args(agent)
            .env_remove("OPENAI_API_KEY")
            // The broker's own debug lines (and h2's frame log) too must not carry the key.
            .env("BROKER_LOG", "debug")
            .stdin(Stdio::null());
        if preset {
            broker_integration::preset_ca_vars(&mut cmd);
        }
        let out = run_bounded(&mut cmd, Duration::from_secs(90));

        // Leak checks first: nothing below prints output that could hold the key.
        assert!(
            !contains(&out.stdout, OPENAI_KEY),
            "{label}: the real key leaked into the agent's stdout"
        );
        assert!(
            !contains(&out.stderr, OPENAI_KEY),
            "{label}: the real key leaked into the run's stderr (agent or broker)"
        );
        assert!(
            !contains(&home.all_bytes(), OPENAI_KEY),
            "{label}: the real key is in plaintext under BROKER_HOME"
        );

        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let context = format!("{label}\nstdout:\n{stdout}\nstderr:\n{stderr}");
        assert!(out.status.success(), "{}: {context}", out.status);
        assert!(
            stdout.lines().any(|l| l == format!("key={placeholder}")),
            "the agent did not hold the placeholder: {context}"
        );
        assert!(
            stdout.lines().any(|l| l == "status=200"),
            "no 200: {context}"
        );
        assert!(
            stdout.contains("matrix-model"),
            "the origin's body did not reach the agent: {context}"
        );
        check(&stdout, &context);

        let received = origin.requests();
        let received = &received[before..];
        assert_eq!(received.len(), 1, "one request per run: {context}");
        let auth = received[0].header("authorization").unwrap_or_default();
        assert!(
            auth == real_auth,
            "{label}: the origin did not get the real key (got {})",
            if auth.contains(&placeholder) {
                "the placeholder"
            } else if auth.is_empty() {
                "no authorization"
            } else {
                "something else"
            }
        );
    }

    let audit = std::fs::read_to_string(home.path().join("audit.jsonl")).expect("audit");
    let uses = broker_integration::count_events(&audit, "credential_use");
    assert_eq!(uses, 2, "{name}: one audited use per run: {audit}");
}

/// The `python3` on `PATH` (its absolute path) if it can import `modules`.
fn python_with(modules: &str) -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            &format!("import sys, {modules}; print(sys.executable)"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!exe.is_empty()).then(|| PathBuf::from(exe))
}

/// What every Python agent does first: show its key variable and its whole environment.
const PY_PRELUDE: &str = r#"import os, sys
key = os.environ["OPENAI_API_KEY"]
print("key=" + key)
print("environ=" + open("/proc/self/environ", "rb").read().decode(errors="replace").replace("\0", " "))
url = "https://api.openai.com/v1/models"
"#;

fn run_python(name: &str, modules: &str, script: &str, check: impl Fn(&str, &str)) {
    let Some(python) = python_with(modules) else {
        broker_integration::skip(&format!(
            "python3 on PATH cannot import {modules} (run ./scripts/test, which puts \
             target/clients/venv/bin first on PATH)"
        ));
        return;
    };
    let code = format!("{PY_PRELUDE}{script}");
    let python = python.to_string_lossy().into_owned();
    run_matrix(name, &[&python, "-c", &code], check);
}

#[test]
fn python_httpx() {
    let script = r#"import httpx
with httpx.Client(timeout=20) as client:
    r = client.get(url, headers={"Authorization": "Bearer " + key})
print("status=%d" % r.status_code)
print("version=" + r.http_version)
print("body=" + r.text)
"#;
    run_python("python httpx", "httpx", script, |stdout, context| {
        assert!(stdout.lines().any(|l| l == "version=HTTP/1.1"), "{context}");
    });
}

#[test]
fn python_aiohttp() {
    let script = r#"import asyncio, aiohttp
async def main():
    timeout = aiohttp.ClientTimeout(total=20)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(url, headers={"Authorization": "Bearer " + key}) as r:
            return r.status, r.version, await r.text()
status, version, body = asyncio.run(main())
print("status=%d" % status)
print("version=%d.%d" % (version.major, version.minor))
print("resolver=" + aiohttp.DefaultResolver.__name__)
print("body=" + body)
"#;
    run_python("python aiohttp", "aiohttp", script, |stdout, context| {
        assert!(stdout.lines().any(|l| l == "version=1.1"), "{context}");
    });
}

#[test]
fn python_ssl_raw_socket() {
    // No ALPN offered, a hand-written request, read to the end (Connection: close).
    let script = r#"import socket, ssl
ctx = ssl.create_default_context()
request = ("GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer " + key
           + "\r\nUser-Agent: matrix-raw-ssl\r\nAccept: */*\r\nConnection: close\r\n\r\n")
data = b""
with socket.create_connection(("api.openai.com", 443), timeout=20) as raw:
    with ctx.wrap_socket(raw, server_hostname="api.openai.com") as tls:
        print("tls=" + tls.version())
        print("issuer=" + repr(tls.getpeercert()["issuer"]))
        tls.sendall(request.encode())
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
head, _, body = data.partition(b"\r\n\r\n")
status_line = head.split(b"\r\n")[0].decode()
print("status_line=" + status_line)
print("status=" + status_line.split(" ")[1])
print("body=" + body.decode(errors="replace"))
"#;
    run_python("python ssl socket", "ssl", script, |stdout, context| {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("status_line=HTTP/1.1 200")),
            "{context}"
        );
    });
}

#[test]
fn node_tls_connect() {
    let Some(node) = which("node") else {
        broker_integration::skip("node is not on PATH");
        return;
    };
    // No ALPN offered, a hand-written request, read to the end (Connection: close).
    let script = r#"
const tls = require('tls');
const key = process.env.OPENAI_API_KEY;
console.log('key=' + key);
console.log('environ=' + JSON.stringify(process.env));
const request = 'GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer ' + key +
  '\r\nUser-Agent: matrix-node-tls\r\nAccept: */*\r\nConnection: close\r\n\r\n';
const socket = tls.connect({ host: 'api.openai.com', port: 443, servername: 'api.openai.com' }, () => {
  console.log('authorized=' + socket.authorized);
  socket.write(request);
});
let data = '';
socket.setEncoding('utf8');
socket.setTimeout(20000, () => { console.error('timed out'); process.exit(1); });
socket.on('data', (chunk) => { data += chunk; });
socket.on('error', (err) => { console.error('error: ' + err.message); process.exit(1); });
socket.on('end', () => {
  const at = data.indexOf('\r\n\r\n');
  const statusLine = data.slice(0, data.indexOf('\r\n'));
  console.log('status_line=' + statusLine);
  console.log('status=' + statusLine.split(' ')[1]);
  console.log('body=' + data.slice(at + 4));
});
"#;
    let node = node.to_string_lossy().into_owned();
    run_matrix(
        "node tls.connect",
        &[&node, "-e", script],
        |stdout, context| {
            assert!(stdout.lines().any(|l| l == "authorized=true"), "{context}");
            assert!(
                stdout
                    .lines()
                    .any(|l| l.starts_with("status_line=HTTP/1.1 200")),
                "{context}"
            );
        },
    );
}

/// curl with `flag`, printing the HTTP version it spoke to the broker.
fn run_curl(name: &str, flag: &str, version: &str) {
    let Some(curl) = which("curl") else {
        broker_integration::skip("curl is not on PATH");
        return;
    };
    let script = format!(
        "printf 'key=%s\\n' \"$OPENAI_API_KEY\"; tr '\\0' '\\n' < /proc/$$/environ; \
         '{}' -sS --fail-with-body {flag} https://api.openai.com/v1/models \
         -H \"Authorization: Bearer $OPENAI_API_KEY\" \
         -w '\\nstatus=%{{http_code}}\\nversion=%{{http_version}}\\n'",
        curl.display()
    );
    let expected = format!("version={version}");
    run_matrix(name, &["sh", "-c", &script], |stdout, context| {
        assert!(stdout.lines().any(|l| l == expected), "{context}");
    });
}

#[test]
fn curl_http2() {
    run_curl("curl --http2", "--http2", "2");
}

#[test]
fn curl_http1_1() {
    run_curl("curl --http1.1", "--http1.1", "1.1");
}
