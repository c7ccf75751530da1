//! The run's policy (README, "Policy"), through the real broker with real clients: method/path
//! rules and every path-normalisation trick, smuggled keys, `require_placeholder`, budgets,
//! body sizes, the SSRF guard, the dry-run mode, and a policy that travels with a run joined
//! to `broker serve`.

use std::process::{Command, Output};
use std::time::Duration;

use broker_integration::{
    contains, count_events, run_bounded, shim_lib, Home, Origin, Reply, Serve, TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-policy-0123456789";
/// A real-looking key the agent should never hold (matches openai's key pattern).
const SMUGGLED: &str = "sk-smuggled-openai-key-the-agent-found-0123456789";

/// An origin for api.openai.com that answers 200 with what it received (`METHOD target`) to
/// the real key, and 401 otherwise.
fn echo_origin(ca: &TestCa) -> Origin {
    let expected = format!("Bearer {OPENAI_KEY}");
    Origin::start(ca, &["api.openai.com"], move |req| {
        if req.header("authorization") == Some(expected.as_str()) {
            Reply::Text(200, format!("{} {}", req.method, req.target))
        } else {
            Reply::Text(401, "no valid key".into())
        }
    })
}

fn setup(policy: Option<&str>) -> (TestCa, Origin, Home) {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = echo_origin(&ca);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    if let Some(policy) = policy {
        std::fs::write(home.path().join("policy.toml"), policy).expect("policy.toml");
    }
    (ca, origin, home)
}

/// `broker run [args] -- sh -c script` (embedded, api.openai.com resolved to `origin`).
fn run_script(home: &Home, ca: &TestCa, origin: &Origin, args: &[&str], script: &str) -> Output {
    let mut cmd = home.broker_run(ca, "api.openai.com", origin.addr);
    cmd.args(args).args(["--", "sh", "-c", script]);
    run_bounded(&mut cmd, Duration::from_secs(120))
}

/// A curl line printing `<tag> <status> <body>` for `method path` with the placeholder.
fn curl(tag: &str, method: &str, path: &str, extra: &str) -> String {
    format!(
        "printf '%s ' {tag}; curl -sS --path-as-is -X {method} -H \"Authorization: Bearer $OPENAI_API_KEY\" {extra} -w '|%{{http_code}}' 'https://api.openai.com{path}' | tr -d '\\n'; echo\n"
    )
}

/// The `(status, body)` printed for `tag`.
fn result<'a>(stdout: &'a str, tag: &str) -> (u16, &'a str) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("{tag} ")))
        .unwrap_or_else(|| panic!("no line for {tag}: {stdout}"));
    let rest = &line[tag.len() + 1..];
    let (body, status) = rest.rsplit_once('|').unwrap_or(("", rest));
    (status.trim().parse().unwrap_or(0), body)
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

const RULES: &str = r#"
[providers.openai]
allow = ["POST /v1/responses", "GET /v1/models", "GET /v1/files/*"]
"#;

/// Each path trick, sent raw by curl (`--path-as-is`): what the origin must receive, or `None`
/// when the broker must refuse it (403, or 400 where the request line itself is refused).
const TRICKS: &[(&str, &str, Option<&str>)] = &[
    ("GET", "/v1/models", Some("GET /v1/models")),
    ("POST", "/v1/responses", Some("POST /v1/responses")),
    ("GET", "/v1/./models", Some("GET /v1/models")),
    ("GET", "//v1//models", Some("GET /v1/models")),
    ("GET", "/v1/m%6fdels", Some("GET /v1/models")),
    ("GET", "/v1/models;x=1", Some("GET /v1/models")),
    ("GET", "/v1/models.", Some("GET /v1/models")),
    ("GET", "/v1/admin/..;/models", Some("GET /v1/models")),
    (
        "GET",
        "/v1/files/abc?purpose=x",
        Some("GET /v1/files/abc?purpose=x"),
    ),
    ("DELETE", "/v1/models", None),
    ("GET", "/v1/admin", None),
    ("GET", "/V1/MODELS", None),
    ("GET", "/v1/models/..;/admin", None),
    ("GET", "/v1/models;/../admin", None),
    ("GET", "/v1/models/.;/../admin", None),
    ("GET", "/v1/models/%2e%2e/admin", None),
    ("GET", "/v1/models/.%2E/admin", None),
    ("GET", "/v1/files/..%2Fadmin", None),
    ("GET", "/v1/files/..%2fadmin", None),
    ("GET", "/v1/files/..%5Cadmin", None),
    ("GET", "/v1/files/%252e%252e", None),
    ("GET", "/v1/files/a%3B", None),
    ("GET", "/v1/files/...", None),
    ("GET", "/v1/files/abc/../../admin", None),
    ("GET", "/v1/files/abc;/../../admin", None),
    ("GET", "/v1/files/", None),
    ("GET", "/v1/files/a/b", None),
    ("GET", "/v1/models/../../../etc", None),
];

#[test]
fn method_and_path_rules_hold_against_every_normalisation_trick() {
    let (ca, origin, home) = setup(Some(RULES));
    let mut script = String::new();
    for (i, (method, path, _)) in TRICKS.iter().enumerate() {
        script.push_str(&curl(&format!("t{i}"), method, path, ""));
    }
    // The refusal names the rule set, and so says what to change.
    script.push_str("curl -sS -o /dev/null -D - -X DELETE -H \"Authorization: Bearer $OPENAI_API_KEY\" https://api.openai.com/v1/models | grep -i '^x-broker-error:'\n");
    // Another client that sends the path as it is given: Python's http.client.
    script.push_str(
        "python3 -c \"import http.client,os,ssl\n\
c=http.client.HTTPSConnection('api.openai.com',context=ssl.create_default_context())\n\
c.request('GET','/v1/models/..;/admin',headers={'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']})\n\
print('py',c.getresponse().status)\"\n",
    );
    let out = run_script(&home, &ca, &origin, &[], &script);
    let stdout = stdout_of(&out);
    let mut forwarded = Vec::new();
    for (i, (method, path, want)) in TRICKS.iter().enumerate() {
        let (status, body) = result(&stdout, &format!("t{i}"));
        match want {
            Some(target) => {
                assert_eq!((status, body), (200, *target), "{method} {path}: {stdout}");
                forwarded.push(target.to_string());
            }
            None => assert!(
                status == 403 || status == 400,
                "{method} {path} got {status} {body}"
            ),
        }
    }
    // Nothing refused reached the origin, and what did reach it is the normalised path.
    let seen: Vec<String> = origin
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert_eq!(seen, forwarded);
    let header = stdout
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("x-broker-error:"))
        .unwrap_or_else(|| panic!("no x-broker-error: {stdout}"));
    assert!(
        header.contains("DELETE /v1/models to openai is not allowed by")
            && header.contains("policy.toml [providers.openai]")
            && header.contains("POST /v1/responses"),
        "{header}"
    );
    assert!(stdout.contains("py 403"), "{stdout}");
    // A burst of refusals is one audit line.
    let audit = home.audit_until(|a| count_events(a, "policy_denied") >= 1);
    assert_eq!(count_events(&audit, "policy_denied"), 1, "{audit}");
    assert!(audit.contains("\"provider\":\"openai\""), "{audit}");
}

#[test]
fn a_smuggled_key_is_refused_and_audited_without_its_value() {
    let (ca, origin, home) = setup(None);
    let script = format!(
        "{}{}",
        curl("placeholder", "GET", "/v1/models", ""),
        curl(
            "smuggled",
            "GET",
            "/v1/models",
            "-H \"Authorization: Bearer $FOUND_IN_A_FILE\""
        )
    );
    // From the environment, not the command line (which the audit records as the agent's).
    let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
    cmd.env("FOUND_IN_A_FILE", SMUGGLED)
        .args(["--", "sh", "-c", &script]);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = stdout_of(&out);
    assert_eq!(result(&stdout, "placeholder").0, 200, "{stdout}");
    let (status, body) = result(&stdout, "smuggled");
    assert_eq!(status, 403, "{stdout}");
    assert!(
        body.contains("real openai key") && !body.contains(SMUGGLED),
        "{body}"
    );
    assert_eq!(origin.requests().len(), 1, "the smuggled key never left");
    let audit = home.audit_until(|a| count_events(a, "real_key_from_agent") >= 1);
    assert_eq!(count_events(&audit, "real_key_from_agent"), 1, "{audit}");
    let on_disk: Vec<String> = walk(home.path())
        .into_iter()
        .filter(|p| std::fs::read(p).is_ok_and(|b| contains(&b, SMUGGLED)))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        on_disk.is_empty(),
        "the smuggled key is on disk: {on_disk:?}"
    );
    assert!(!contains(&out.stderr, SMUGGLED));
}

#[test]
fn require_placeholder_refuses_requests_without_it() {
    let (ca, origin, home) = setup(Some("[providers.openai]\nrequire_placeholder = true\n"));
    let script = format!(
        "{}printf 'bare '; curl -sS -w '|%{{http_code}}' https://api.openai.com/v1/models | tr -d '\\n'; echo\n",
        curl("placeholder", "GET", "/v1/models", "")
    );
    let stdout = stdout_of(&run_script(&home, &ca, &origin, &[], &script));
    assert_eq!(result(&stdout, "placeholder").0, 200, "{stdout}");
    let (status, body) = result(&stdout, "bare");
    assert_eq!(status, 403, "{stdout}");
    assert!(body.contains("require_placeholder"), "{body}");
    assert_eq!(origin.requests().len(), 1);
}

#[test]
fn budgets_answer_429_at_the_right_count_and_413_for_large_bodies() {
    let (ca, origin, home) = setup(Some("[providers.openai]\nrequests_per_minute = 3\n"));
    let mut script = String::new();
    for i in 0..5 {
        script.push_str(&curl(&format!("r{i}"), "GET", "/v1/models", ""));
    }
    let stdout = stdout_of(&run_script(&home, &ca, &origin, &[], &script));
    let statuses: Vec<u16> = (0..5)
        .map(|i| result(&stdout, &format!("r{i}")).0)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429], "{stdout}");
    assert!(
        result(&stdout, "r3").1.contains("3 requests a minute"),
        "{stdout}"
    );
    let audit = home.audit_until(|a| count_events(a, "budget_exceeded") >= 1);
    assert_eq!(
        count_events(&audit, "budget_exceeded"),
        1,
        "once per burst: {audit}"
    );

    // A run's own policy file: a total, and a body size (known length, and streamed). A body
    // refused for its length before it is sent is not counted; a streamed one was admitted.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("run-policy.toml");
    std::fs::write(
        &file,
        "[run]\nmax_requests = 2\n[providers.openai]\nmax_body_bytes = 64\n",
    )
    .expect("write");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 1000]).expect("write");
    let script = format!(
        "{}{}{}{}",
        curl(
            "fits",
            "POST",
            "/v1/responses",
            "--data-binary 0123456789012345678901234567890123456789012345678901234567890123"
        ),
        curl(
            "large",
            "POST",
            "/v1/responses",
            &format!("--data-binary @{}", big.display())
        ),
        curl(
            "streamed",
            "POST",
            "/v1/responses",
            &format!(
                "-H 'Transfer-Encoding: chunked' --data-binary @{}",
                big.display()
            )
        ),
        curl("fourth", "GET", "/v1/models", ""),
    );
    let out = run_script(
        &home,
        &ca,
        &origin,
        &["--policy", file.to_str().expect("path")],
        &script,
    );
    let stdout = stdout_of(&out);
    assert_eq!(result(&stdout, "fits").0, 200, "{stdout}");
    let (status, body) = result(&stdout, "large");
    assert_eq!(status, 413, "{stdout}");
    assert!(
        body.contains("larger than 64 bytes") && body.contains("run-policy.toml"),
        "{body}"
    );
    assert_eq!(result(&stdout, "streamed").0, 413, "{stdout}");
    let (status, body) = result(&stdout, "fourth");
    assert_eq!(status, 429, "{stdout}");
    assert!(body.contains("2 requests in all"), "{body}");
}

#[test]
fn dry_run_refuses_nothing_and_audits_what_it_would_have() {
    let (ca, origin, home) = setup(None);
    let script = format!(
        "{}{}",
        curl("allowed", "GET", "/v1/models", ""),
        curl("unlisted", "POST", "/v1/responses", "")
    );
    let stdout = stdout_of(&run_script(
        &home,
        &ca,
        &origin,
        &["--policy-mode", "audit", "--allow", "openai:GET:/v1/models"],
        &script,
    ));
    assert_eq!(result(&stdout, "allowed").0, 200, "{stdout}");
    assert_eq!(result(&stdout, "unlisted").0, 200, "{stdout}");
    let audit = home.audit_until(|a| count_events(a, "policy_would_deny") >= 1);
    assert_eq!(count_events(&audit, "policy_would_deny"), 1, "{audit}");
    assert_eq!(count_events(&audit, "policy_denied"), 0, "{audit}");
    assert!(audit.contains("/v1/responses"), "{audit}");

    // The session as a starting policy, which, applied, lets the same session through.
    let suggested = home.broker_ok(&["policy", "suggest"]);
    let text = String::from_utf8_lossy(&suggested.stdout).into_owned();
    assert!(
        text.contains("\"GET /v1/models\"") && text.contains("\"POST /v1/responses\""),
        "{text}"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("suggested.toml");
    std::fs::write(&file, &text).expect("write");
    home.broker_ok(&["policy", "check", file.to_str().expect("path")]);
    let stdout = stdout_of(&run_script(
        &home,
        &ca,
        &origin,
        &["--policy", file.to_str().expect("path")],
        &script,
    ));
    assert_eq!(result(&stdout, "allowed").0, 200, "{stdout}");
    assert_eq!(result(&stdout, "unlisted").0, 200, "{stdout}");
    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 4);
    assert_eq!(count_events(&audit, "policy_denied"), 0, "{audit}");
}

#[test]
fn policy_mistakes_are_errors_with_file_line_and_field() {
    let home = Home::new();
    std::fs::write(
        home.path().join("policy.toml"),
        "[providers.openai]\nallow = [\"GET /v1/models\", \"get /v1/files\"]\n",
    )
    .expect("write");
    let out = run_bounded(
        home.broker().args(["run", "--", "true"]),
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("policy.toml:2:")
            && stderr.contains("providers.openai.allow")
            && stderr.contains("upper case"),
        "{stderr}"
    );
    std::fs::remove_file(home.path().join("policy.toml")).expect("rm");
    for (flag, says) in [
        ("opnai:GET:/v1/models", "unknown provider 'opnai'"),
        ("openai:GET:/v1/../admin", "normal form"),
        ("openai:GET", "PROVIDER:METHOD:/path"),
    ] {
        let out = run_bounded(
            home.broker().args(["run", "--allow", flag, "--", "true"]),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag}: {stderr}");
        assert!(stderr.contains(says), "{flag}: {stderr}");
    }
}

/// A run joined to `broker serve` sends its policy with it; the daemon applies it to that run
/// only, and its home policy to every run.
#[test]
fn a_run_joined_to_serve_brings_its_policy() {
    let (ca, origin, home) = setup(None);
    let mut serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let script = format!(
        "{}{}",
        curl("models", "GET", "/v1/models", ""),
        curl("responses", "POST", "/v1/responses", "")
    );
    let mut cmd: Command = home.broker();
    cmd.args([
        "run",
        "--allow",
        "openai:GET:/v1/models",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(std::process::Stdio::null());
    let stdout = stdout_of(&run_bounded(&mut cmd, Duration::from_secs(60)));
    assert_eq!(result(&stdout, "models").0, 200, "{stdout}");
    assert_eq!(result(&stdout, "responses").0, 403, "{stdout}");
    let audit = home.audit_until(|a| count_events(a, "policy_denied") >= 1);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"policy_denied\"") && l.contains("serve-run-")),
        "refused in the daemon's run for this broker run: {audit}"
    );
    // Another run of the same daemon is not bound by it.
    let mut cmd: Command = home.broker();
    cmd.args([
        "run",
        "--",
        "sh",
        "-c",
        &curl("other", "POST", "/v1/responses", ""),
    ])
    .stdin(std::process::Stdio::null());
    let stdout = stdout_of(&run_bounded(&mut cmd, Duration::from_secs(60)));
    assert_eq!(result(&stdout, "other").0, 200, "{stdout}");
    assert!(serve.is_running());
}

/// The SSRF guard: a provider host the broker resolves itself (no `--resolve`) to a loopback
/// address is not connected to, unless its provider says `private_addresses = true`.
#[test]
fn the_ssrf_guard_refuses_private_addresses_unless_the_provider_allows_them() {
    const KEY: &str = "acme-real-key-0123456789";
    let ca = TestCa::new();
    let expected = format!("Bearer {KEY}");
    let origin = Origin::start(&ca, &["localhost"], move |req| {
        if req.header("authorization") == Some(expected.as_str()) {
            Reply::Text(200, "internal api".into())
        } else {
            Reply::Text(401, "no valid key".into())
        }
    });
    let port = origin.addr.port();
    for private in [false, true] {
        let home = Home::new();
        let providers = home.path().join("providers");
        std::fs::create_dir_all(&providers).expect("mkdir");
        std::fs::write(
            providers.join("acme.toml"),
            format!(
                "name = \"acme\"\nenv = [\"ACME_API_KEY\"]\nplaceholder = \"acme-broker-placeholder-0000\"\n\
                 key_pattern = '^acme-[A-Za-z0-9-]{{8,}}$'\n{}\n[[routes]]\nhosts = [\"localhost:{port}\"]\n\
                 credential = [{{ header = \"authorization\", scheme = \"bearer\" }}]\n",
                if private { "private_addresses = true" } else { "" }
            ),
        )
        .expect("provider");
        home.add("acme", KEY);
        let serve = Serve::start(&home, &ca, &[]);
        let response = broker_integration::send(
            serve.addr_for("localhost"),
            "localhost",
            &serve.ca_pem(),
            false,
            broker_integration::get(
                "localhost",
                "/v1/things",
                &[("authorization", "Bearer acme-broker-placeholder-0000")],
            ),
        )
        .expect("send");
        if private {
            assert_eq!(response.status, 200, "{}", response.text());
            assert_eq!(response.text(), "internal api");
        } else {
            assert_eq!(response.status, 502, "{}", response.text());
            let error = response.header("x-broker-error").unwrap_or_default();
            assert!(
                error.contains("loopback")
                    && error.contains("SSRF guard")
                    && error.contains("private_addresses"),
                "{error}"
            );
            let audit = home.audit_until(|a| count_events(a, "upstream_address_refused") >= 1);
            assert_eq!(
                count_events(&audit, "upstream_address_refused"),
                1,
                "{audit}"
            );
        }
    }
    assert_eq!(
        origin.requests().len(),
        1,
        "only the allowed provider reached it"
    );
}

/// `broker approve` from a second process: a request held by an `approve = "each"` rule is
/// approved, then one denied; an `approve = "once-per-run"` rule asks once; one nobody answers
/// times out. The agent itself cannot answer: `broker approve` refuses inside a run, and the
/// sockets are hidden from its sandbox.
#[test]
fn approvals_are_granted_denied_and_timed_out_from_another_process() {
    let (ca, origin, home) = setup(Some(
        r#"
[providers.openai]
allow = [
  "GET /v1/models",
  { rule = "DELETE /v1/files/*", approve = "each" },
  { rule = "POST /v1/files", approve = "once-per-run" },
]
approve_timeout = 60
"#,
    ));
    let broker = broker_integration::broker_bin();
    let script = format!(
        "({a}) &\nsleep 1\n{b} approve >/dev/null 2>&1; echo self-approve $?\n\
         python3 -c \"import glob,os; print('sockets-seen', len(glob.glob(os.environ['BROKER_HOME']+'/run/approvals-*.sock')))\"\n\
         wait\n{d}{p1}{p2}",
        // One whole line, however it interleaves with the lines printed meanwhile.
        a = "r=$(curl -sS -X DELETE -H \"Authorization: Bearer $OPENAI_API_KEY\" -w '|%{http_code}' https://api.openai.com/v1/files/a | tr -d '\\n'); echo \"a $r\"",
        b = broker.display(),
        d = curl("b", "DELETE", "/v1/files/b", ""),
        p1 = curl("p1", "POST", "/v1/files", ""),
        p2 = curl("p2", "POST", "/v1/files", ""),
    );
    let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
    cmd.args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("broker run");
    let mut answered = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while answered.len() < 3 && std::time::Instant::now() < deadline {
        let out = home.broker_ok(&["approve", "--json"]);
        let waiting: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        for w in waiting {
            let id = w["id"].as_str().expect("id").to_string();
            if answered.contains(&id) {
                continue;
            }
            assert_eq!(w["host"], "api.openai.com");
            assert!(
                w["command"].as_str().is_some_and(|c| c.contains("sh")),
                "{w}"
            );
            let path = w["path"].as_str().expect("path");
            let deny = path == "/v1/files/b";
            if !deny && answered.is_empty() {
                // Approving asks first; with no terminal to ask on, it shows the request as
                // the broker holds it, refuses, and the request keeps waiting.
                let out = home
                    .broker()
                    .args(["approve", id.as_str()])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("broker approve");
                assert!(!out.status.success());
                let said = String::from_utf8_lossy(&out.stdout);
                let method = w["method"].as_str().expect("method");
                assert!(
                    said.contains(&format!("{id}  {method} api.openai.com{path}")),
                    "{said}"
                );
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert!(stderr.contains("add --yes"), "{stderr}");
                let still = home.broker_ok(&["approve", "--json"]);
                assert!(
                    String::from_utf8_lossy(&still.stdout).contains(&id),
                    "still waiting"
                );
            }
            let mut args = vec!["approve", id.as_str()];
            args.push(if deny { "--deny" } else { "--yes" });
            let out = home.broker_ok(&args);
            let said = String::from_utf8_lossy(&out.stdout);
            let last = said.lines().last().unwrap_or_default();
            assert!(
                last.starts_with(if deny { "denied" } else { "approved" }),
                "{said}"
            );
            answered.push(id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = stdout_of(&out);
    assert_eq!(answered.len(), 3, "three requests waited: {stdout}");
    assert_eq!(
        result(&stdout, "a"),
        (200, "DELETE /v1/files/a"),
        "{stdout}"
    );
    let (status, body) = result(&stdout, "b");
    assert_eq!(status, 403, "{stdout}");
    assert!(body.contains("denied with broker approve"), "{body}");
    assert_eq!(result(&stdout, "p1").0, 200, "{stdout}");
    assert_eq!(result(&stdout, "p2").0, 200, "once per run: {stdout}");
    assert!(stdout.contains("self-approve 1"), "{stdout}");
    assert!(stdout.contains("sockets-seen 0"), "{stdout}");
    let audit = home.audit_until(|a| count_events(a, "approval_granted") >= 2);
    assert_eq!(count_events(&audit, "approval_granted"), 2, "{audit}");
    assert_eq!(count_events(&audit, "approval_refused"), 1, "{audit}");

    // Nobody answers: refused when the (run's own, shorter) timeout passes.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("short.toml");
    std::fs::write(&file, "[providers.openai]\napprove_timeout = 1\n").expect("write");
    let out = run_script(
        &home,
        &ca,
        &origin,
        &["--policy", file.to_str().expect("path")],
        &curl("late", "DELETE", "/v1/files/c", ""),
    );
    let stdout = stdout_of(&out);
    let (status, body) = result(&stdout, "late");
    assert_eq!(status, 403, "{stdout}");
    assert!(body.contains("got no answer"), "{body}");
    assert!(
        !origin
            .requests()
            .iter()
            .any(|r| r.target.ends_with("/b") || r.target.ends_with("/c")),
        "refused requests never left"
    );
}

/// The agent answering its own request, outside the sandbox (`--no-sandbox`), as an ordinary
/// uid: it can reach the approval socket there, and speaks the protocol itself rather than
/// through `broker approve` (which refuses inside a run); the broker refuses the answer because
/// the process asking descends from the agent. The user's own `broker approve` then answers.
#[test]
fn an_agent_outside_the_sandbox_cannot_approve_its_own_request() {
    use broker_integration::{as_agent_user, give_to_agent_user};
    const ATTACK: &str = r#"
import glob, json, os, socket
def ask(path, line):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall((line + "\n").encode())
    return json.loads(s.makefile().readline())
socks = glob.glob(os.environ["BROKER_HOME"] + "/run/approvals-*.sock")
print("sockets-seen", len(socks), flush=True)
for path in socks:
    for item in ask(path, "list").get("waiting", []):
        print("self-answer", json.dumps(ask(path, "approve " + item["id"])), flush=True)
"#;
    let (ca, origin, home) = setup(Some(
        "[providers.openai]\nallow = [{ rule = \"DELETE /v1/files/*\", approve = \"each\" }]\n",
    ));
    let project = tempfile::tempdir().expect("project");
    std::fs::write(project.path().join("attack.py"), ATTACK).expect("script");
    std::fs::copy(&ca.pem_path, project.path().join("ca.pem")).expect("ca");
    give_to_agent_user(home.path());
    give_to_agent_user(project.path());
    let script = "(r=$(curl -sS -X DELETE -H \"Authorization: Bearer $OPENAI_API_KEY\" -w '|%{http_code}' https://api.openai.com/v1/files/a | tr -d '\\n'); echo \"a $r\") &\n\
                  sleep 2\npython3 attack.py\nwait\n";
    let mut cmd = home.broker();
    cmd.current_dir(project.path())
        .args(["run", "--no-sandbox", "--upstream-ca"])
        .arg(project.path().join("ca.pem"))
        .arg("--resolve")
        .arg(format!("api.openai.com:443:{}", origin.addr))
        .args(["--", "sh", "-c", script]);
    let child = as_agent_user(&cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("broker run");
    // The user answers from outside the run, once the agent has tried (its line is printed
    // before the user's answer can arrive: the request waits 60 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut denied = false;
    while !denied && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let mut list = home.broker();
        list.args(["approve", "--json"]);
        let out = run_bounded(&mut as_agent_user(&list), Duration::from_secs(30));
        let waiting: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(id) = waiting.first().and_then(|w| w["id"].as_str()) {
            // Give the agent's attempt time to happen first.
            std::thread::sleep(Duration::from_secs(3));
            let mut deny = home.broker();
            deny.args(["approve", id, "--deny"]);
            let out = run_bounded(&mut as_agent_user(&deny), Duration::from_secs(30));
            denied = out.status.success();
        }
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = stdout_of(&out);
    assert!(denied, "the user's answer was taken: {stdout}");
    assert!(
        stdout.contains("sockets-seen 1"),
        "outside the sandbox it sees the socket: {stdout}"
    );
    assert!(
        stdout.contains("self-answer") && stdout.contains("cannot answer for itself"),
        "{stdout}"
    );
    let (status, body) = result(&stdout, "a");
    assert_eq!(status, 403, "{stdout}");
    assert!(body.contains("denied with broker approve"), "{body}");
    assert!(origin.requests().is_empty(), "nothing reached the origin");
}

/// Each query trick, sent raw by curl: what the origin must receive, or `None` when the broker
/// must refuse it.
const QUERY_TRICKS: &[(&str, Option<&str>)] = &[
    ("/v1/models", Some("/v1/models")),
    ("/v1/models?limit=1", None),
    ("/v1/models?&", Some("/v1/models")),
    ("/v1/files?purpose=batch", Some("/v1/files?purpose=batch")),
    (
        "/v1/files?limit=10&purpose=fine-tune",
        Some("/v1/files?limit=10&purpose=fine-tune"),
    ),
    (
        "/v1/files?purpose=batch&purpose=fine-tune",
        Some("/v1/files?purpose=batch&purpose=fine-tune"),
    ),
    // Decoded, checked, and sent in the canonical form.
    ("/v1/files?purpose=b%61tch", Some("/v1/files?purpose=batch")),
    (
        "/v1/files?%70urpose=batch&&limit=a+b",
        Some("/v1/files?purpose=batch&limit=a%20b"),
    ),
    // An encoded '&' or '=' is data inside a value: sent on still encoded.
    (
        "/v1/files?limit=1%26admin%3D1",
        Some("/v1/files?limit=1%26admin%3D1"),
    ),
    ("/v1/files?purpose=assistants", None),
    ("/v1/files?Purpose=batch", None),
    ("/v1/files?purpose=batch&admin=1", None),
    ("/v1/files?admin=1&purpose=batch", None),
    ("/v1/files?purpose=batch%26admin%3D1", None),
    ("/v1/files?purpose%3Dbatch", None),
    ("/v1/files?purpose=batch;admin=1", None),
    ("/v1/files?limit=1;admin=1", None),
    ("/v1/files?purpose=batch&purpose=assistants", None),
    ("/v1/files?purpose=assistants&purpose=batch", None),
    ("/v1/files?purpose=%2562atch", None),
    ("/v1/files?limit=%zz", None),
];

/// Query-parameter rules through the real broker: names and values decoded before they are
/// compared, `;` and encoded separators, repeated parameters; what is allowed reaches the
/// origin in the canonical form, what is not never does.
#[test]
fn query_rules_hold_against_separator_and_encoding_tricks() {
    let (ca, origin, home) = setup(Some(
        r#"
[providers.openai]
allow = ["GET /v1/models?", "GET /v1/files?purpose=batch|fine-tune&limit=*"]
"#,
    ));
    let mut script = String::new();
    for (i, (target, _)) in QUERY_TRICKS.iter().enumerate() {
        script.push_str(&curl(&format!("q{i}"), "GET", target, "-g"));
    }
    // Python's http.client sends the target as it is given, too.
    script.push_str(
        "python3 -c \"import http.client,os,ssl\n\
c=http.client.HTTPSConnection('api.openai.com',context=ssl.create_default_context())\n\
c.request('GET','/v1/files?purpose=batch;purpose=assistants',headers={'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']})\n\
r=c.getresponse(); print('py',r.status,r.getheader('x-broker-error'))\"\n",
    );
    let stdout = stdout_of(&run_script(&home, &ca, &origin, &[], &script));
    let mut forwarded = Vec::new();
    for (i, (target, want)) in QUERY_TRICKS.iter().enumerate() {
        let (status, body) = result(&stdout, &format!("q{i}"));
        match want {
            Some(sent) => {
                assert_eq!(
                    (status, body),
                    (200, format!("GET {sent}").as_str()),
                    "{target}: {stdout}"
                );
                forwarded.push(format!("GET {sent}"));
            }
            None => assert_eq!(status, 403, "{target} got {status} {body}"),
        }
    }
    let seen: Vec<String> = origin
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert_eq!(seen, forwarded, "nothing refused reached the origin");
    let py = stdout
        .lines()
        .find(|l| l.starts_with("py "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(py.starts_with("py 403") && py.contains("raw ';'"), "{py}");
    assert!(
        !py.contains("assistants"),
        "the query is never quoted: {py}"
    );
}

/// Approval rules from `--allow` flags, in a run joined to `broker serve`: the daemon holds
/// the request, a second process answers with `broker approve` (one approved, one denied).
#[test]
fn allow_flags_ask_for_approval_in_a_run_joined_to_serve() {
    let (ca, origin, home) = setup(None);
    let mut serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let script = format!(
        "{}{}{}",
        curl("a", "DELETE", "/v1/files/a", ""),
        curl("b", "DELETE", "/v1/files/b", ""),
        curl("models", "GET", "/v1/models?", "-g"),
    );
    let mut cmd: Command = home.broker();
    cmd.args([
        "run",
        "--allow",
        "openai:GET:/v1/models?,openai:DELETE:/v1/files/*:approve=each",
        "--",
        "sh",
        "-c",
        &script,
    ])
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let child = cmd.spawn().expect("broker run");
    let mut answered: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while answered.len() < 2 && std::time::Instant::now() < deadline {
        let out = home.broker_ok(&["approve", "--json"]);
        let waiting: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        for w in waiting {
            let id = w["id"].as_str().expect("id").to_string();
            if answered.contains(&id) {
                continue;
            }
            assert!(
                w["rule"]
                    .as_str()
                    .is_some_and(|r| r.contains("DELETE /v1/files/*") && r.contains("--allow")),
                "{w}"
            );
            assert!(
                w["run"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("serve-run-")),
                "held by the daemon: {w}"
            );
            let deny = w["path"] == "/v1/files/b";
            let mut args = vec!["approve", id.as_str()];
            args.push(if deny { "--deny" } else { "--yes" });
            home.broker_ok(&args);
            answered.push(id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().expect("wait");
    let stdout = stdout_of(&out);
    assert_eq!(answered.len(), 2, "two requests waited: {stdout}");
    assert_eq!(
        result(&stdout, "a"),
        (200, "DELETE /v1/files/a"),
        "{stdout}"
    );
    let (status, body) = result(&stdout, "b");
    assert_eq!(status, 403, "{stdout}");
    assert!(body.contains("denied with broker approve"), "{body}");
    assert_eq!(
        result(&stdout, "models").0,
        200,
        "no approval asked: {stdout}"
    );
    let audit = home.audit_until(|a| count_events(a, "approval_refused") >= 1);
    assert_eq!(count_events(&audit, "approval_granted"), 1, "{audit}");
    assert_eq!(count_events(&audit, "approval_refused"), 1, "{audit}");
    assert!(serve.is_running());
}

/// A request waiting for approval is announced on the desktop where there is one: a fake
/// `notify-send` first on the broker's PATH records what it is given (the text `broker
/// approve` needs, never the key); without a session bus, nothing is run.
#[test]
fn a_waiting_request_is_announced_on_the_desktop_where_there_is_one() {
    use std::os::unix::fs::PermissionsExt as _;
    let (ca, origin, home) = setup(Some(
        "[providers.openai]\nallow = [{ rule = \"DELETE /v1/files/*\", approve = \"each\" }]\napprove_timeout = 1\n",
    ));
    let bin = tempfile::tempdir().expect("bin");
    let log = bin.path().join("notified");
    let fake = bin.path().join("notify-send");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done >> '{log}'\nenv >> '{log}'\n",
            log = log.display()
        ),
    )
    .expect("fake notify-send");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (tag, bus) in [("bus", true), ("nobus", false)] {
        let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
        // A secret the user's shell exported: the broker has it, notify-send must not.
        cmd.env("PATH", &path)
            .env("DEPLOY_TOKEN", "deploy-secret-from-the-shell-0123")
            .env_remove("XDG_RUNTIME_DIR");
        if bus {
            cmd.env("DBUS_SESSION_BUS_ADDRESS", "unix:path=/nonexistent/bus");
        } else {
            cmd.env_remove("DBUS_SESSION_BUS_ADDRESS");
        }
        cmd.args([
            "--",
            "sh",
            "-c",
            &curl(tag, "DELETE", "/v1/files/f?purpose=batch", ""),
        ]);
        let stdout = stdout_of(&run_bounded(&mut cmd, Duration::from_secs(120)));
        let (status, body) = result(&stdout, tag);
        assert_eq!(status, 403, "{stdout}");
        assert!(body.contains("got no answer"), "{body}");
    }
    let notified = std::fs::read_to_string(&log).expect("notify-send was run");
    assert_eq!(
        notified.matches("waits for approval").count(),
        1,
        "once, and only where there is a bus: {notified}"
    );
    let lines: Vec<&str> = notified.lines().collect();
    assert_eq!(
        lines.get(..4),
        Some(
            &[
                "--app-name=broker",
                "--urgency=critical",
                "--",
                "broker: DELETE to api.openai.com waits for approval"
            ][..]
        ),
        "{notified}"
    );
    assert!(
        notified.contains("DELETE /v1/files/f?purpose=...")
            && !notified.contains("purpose=batch")
            && notified.contains("broker approve ")
            && notified.contains("DELETE /v1/files/*"),
        "{notified}"
    );
    assert!(!notified.contains(OPENAI_KEY), "{notified}");
    assert!(
        notified.contains("PATH=") && !notified.contains("deploy-secret-from-the-shell"),
        "notify-send gets only what reaching the desktop needs: {notified}"
    );
}

/// The SSRF guard on the system resolver's answers: `broker serve` runs in a mount namespace of
/// its own whose /etc/hosts answers a provider's hosts with 127.0.0.1 and 169.254.169.254 (no
/// `--resolve`: a pinned address is the operator's explicit choice, README "SSRF guard"). Both
/// are refused and audited, nothing is sent; with `private_addresses = true` the loopback one
/// is served. Needs root for the namespace, as CI runs.
#[test]
fn the_ssrf_guard_refuses_loopback_and_metadata_answers_of_the_resolver() {
    const KEY: &str = "acme-real-key-0123456789";
    if !broker_integration::is_root() {
        broker_integration::skip("a mount namespace for /etc/hosts needs root (CI runs as root)");
        return;
    }
    let ca = TestCa::new();
    let expected = format!("Bearer {KEY}");
    let origin = Origin::start(&ca, &["api.acme.test"], move |req| {
        if req.header("authorization") == Some(expected.as_str()) {
            Reply::Text(200, "internal api".into())
        } else {
            Reply::Text(401, "no valid key".into())
        }
    });
    let port = origin.addr.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.1 api.acme.test\n169.254.169.254 metadata.acme.test\n",
    )
    .expect("hosts");
    let send = |serve: &Serve, host: &str| {
        broker_integration::send(
            serve.addr_for(host),
            host,
            &serve.ca_pem(),
            false,
            broker_integration::get(
                host,
                "/v1/things",
                &[("authorization", "Bearer acme-broker-placeholder-0000")],
            ),
        )
        .expect("send")
    };
    for private in [false, true] {
        let home = Home::new();
        let providers = home.path().join("providers");
        std::fs::create_dir_all(&providers).expect("mkdir");
        std::fs::write(
            providers.join("acme.toml"),
            format!(
                "name = \"acme\"\nenv = [\"ACME_API_KEY\"]\nplaceholder = \"acme-broker-placeholder-0000\"\n\
                 key_pattern = '^acme-[A-Za-z0-9-]{{8,}}$'\n{}\n[[routes]]\n\
                 hosts = [\"api.acme.test:{port}\", \"metadata.acme.test:{port}\"]\n\
                 credential = [{{ header = \"authorization\", scheme = \"bearer\" }}]\n",
                if private { "private_addresses = true" } else { "" }
            ),
        )
        .expect("provider");
        home.add("acme", KEY);
        // `broker serve` (upstream CA trusted, nothing pinned) with its own /etc/hosts.
        let broker = {
            let mut b = home.broker();
            b.arg("serve").arg("--upstream-ca").arg(&ca.pem_path);
            b
        };
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
            .arg(&hosts)
            .arg(broker.get_program())
            .args(broker.get_args());
        for (var, value) in broker.get_envs() {
            match value {
                Some(value) => cmd.env(var, value),
                None => cmd.env_remove(var),
            };
        }
        let serve = Serve::spawn(&home, cmd);
        if private {
            let response = send(&serve, "api.acme.test");
            assert_eq!(response.status, 200, "{}", response.text());
            assert_eq!(response.text(), "internal api");
            continue;
        }
        for (host, says) in [
            ("api.acme.test", "127.0.0.1 (loopback)"),
            (
                "metadata.acme.test",
                "169.254.169.254 (a cloud metadata address)",
            ),
        ] {
            let response = send(&serve, host);
            assert_eq!(response.status, 502, "{host}: {}", response.text());
            let error = response.header("x-broker-error").unwrap_or_default();
            assert!(
                error.contains(says) && error.contains("SSRF guard"),
                "{host}: {error}"
            );
        }
        let audit = home.audit_until(|a| count_events(a, "upstream_address_refused") >= 2);
        assert_eq!(
            count_events(&audit, "upstream_address_refused"),
            2,
            "{audit}"
        );
        assert!(audit.contains("metadata.acme.test"), "{audit}");
    }
    assert_eq!(
        origin.requests().len(),
        1,
        "only the provider that allows private addresses reached it"
    );
}

/// The SSRF guard covers the broker's OAuth endpoints too: `broker login` for a provider whose
/// device-authorization endpoint resolves (system resolver, nothing pinned) to 127.0.0.1 is
/// refused before anything is sent, saying why and what to do; with `private_addresses = true`
/// the same endpoint is reached (it answers an OAuth error, which the login reports).
#[test]
fn the_ssrf_guard_covers_oauth_endpoints_unless_the_provider_allows_private_addresses() {
    let ca = TestCa::new();
    let idp = Origin::start(&ca, &["localhost"], |_| {
        Reply::Json(
            400,
            r#"{"error":"invalid_client","error_description":"unknown client"}"#.into(),
        )
    });
    let port = idp.addr.port();
    for private in [false, true] {
        let home = Home::new();
        let providers = home.path().join("providers");
        std::fs::create_dir_all(&providers).expect("mkdir");
        std::fs::write(
            providers.join("acme.toml"),
            format!(
                "name = \"acme\"\nenv = [\"ACME_TOKEN\"]\nplaceholder = \"acme-broker-placeholder-0000\"\n\
                 key_pattern = '^[A-Za-z0-9_.~-]{{8,}}$'\nauth = \"oauth2\"\n{}\n[[routes]]\n\
                 hosts = [\"api.acme.test\"]\ncredential = [{{ header = \"authorization\", scheme = \"bearer\" }}]\n\
                 [oauth]\nclient_id = \"broker-test\"\nclient_auth = \"none\"\nauthorize_url = \"https://localhost:{port}/auth\"\n\
                 token_url = \"https://localhost:{port}/token\"\ndevice_url = \"https://localhost:{port}/device/auth\"\n\
                 device_flow = true\n",
                if private { "private_addresses = true" } else { "" }
            ),
        )
        .expect("provider");
        let mut cmd = home.broker();
        cmd.args([
            "login",
            "acme",
            "--device",
            "--no-browser",
            "--timeout",
            "20",
        ])
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .stdin(std::process::Stdio::null());
        let out = run_bounded(&mut cmd, Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        let requests = idp.requests().len();
        if private {
            assert_eq!(requests, 1, "{stderr}");
            assert!(stderr.contains("unknown client"), "{stderr}");
        } else {
            assert_eq!(requests, 0, "nothing is sent to a refused address");
            assert!(
                stderr.contains("127.0.0.1 (loopback)")
                    && stderr.contains("SSRF guard")
                    && stderr.contains("private_addresses = true"),
                "{stderr}"
            );
        }
    }
}
