//! The CONNECT fallback, for programs libbroker.so cannot reach (static, Go, musl).

use std::process::{Command, Stdio};
use std::time::Duration;

use broker_integration::{contains, run_bounded, Home, Origin, Reply, Serve, TestCa};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-connect-0123456";
const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";

fn openai_origin(ca: &TestCa) -> Origin {
    Origin::bearer(ca, "api.openai.com", OPENAI_KEY, "models")
}

/// curl through `serve`'s CONNECT listener, with the run's ticket in the proxy URL as
/// `broker run` gives it to a static program (in a curl config file here: never in argv).
fn curl(serve: &Serve, args: &[&str]) -> std::process::Output {
    let proxy = serve
        .config
        .connect_proxy
        .clone()
        .expect("connect proxy address");
    let ticket = serve.config.ticket.as_ref().expect("the run's ticket");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("curlrc");
    std::fs::write(
        &config,
        format!("proxy = \"http://broker:{}@{proxy}\"\n", ticket.expose()),
    )
    .expect("curlrc");
    let mut cmd = Command::new("curl");
    broker_integration::scrub(&mut cmd);
    cmd.args(["-sS", "--max-time", "20", "-K"])
        .arg(&config)
        .args(args);
    run_bounded(&mut cmd, Duration::from_secs(30))
}

#[test]
fn connect_to_a_managed_host_is_swapped_and_others_are_tunnelled_untouched() {
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    // An unmanaged origin: reached through the tunnel, its own certificate, never decrypted.
    let other = Origin::start(&ca, &["localhost"], |req| {
        Reply::Text(200, format!("saw {:?}", req.header("authorization")))
    });
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let run_ca = serve.config.ca_file.to_str().expect("utf8").to_string();

    let out = curl(
        &serve,
        &[
            "--cacert",
            &run_ca,
            "https://api.openai.com/v1/models",
            "-H",
            &format!("Authorization: Bearer {OPENAI_PH}"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "models");
    assert!(!contains(&out.stdout, OPENAI_KEY));

    let test_ca = ca.pem_path.to_str().expect("utf8").to_string();
    let url = format!("https://localhost:{}/x", other.addr.port());
    let out = curl(
        &serve,
        &[
            "--cacert",
            &test_ca,
            &url,
            "-H",
            &format!("Authorization: Bearer {OPENAI_PH}"),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(OPENAI_PH),
        "the placeholder reaches a foreign host unswapped"
    );
    assert_eq!(
        other.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_PH}").as_str())
    );

    // Plain http through the broker's proxy is refused, with advice.
    let out = curl(&serve, &["-i", "http://api.openai.com/v1/models"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("only accepts CONNECT"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn deny_unlisted_refuses_other_destinations_through_connect() {
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let other = Origin::start(&ca, &["localhost"], |_| {
        Reply::Text(200, "should not be reached".into())
    });
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    // The agent reads the CONNECT address and its run's ticket from its shim config, as a
    // static child gets them in HTTPS_PROXY (an environment variable, not argv).
    let script = format!(
        "p=$(sed -n 's/^connect-proxy //p' \"$BROKER_SHIM_CONFIG\"); \
         export https_proxy=http://broker:$(sed -n 's/^ticket //p' \"$BROKER_SHIM_CONFIG\")@$p; \
         curl -sS -o /dev/null -w '%{{http_code}}\\n' --cacert \"$(sed -n 's/^ca //p' \"$BROKER_SHIM_CONFIG\")\" https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"; \
         curl -sS -o /dev/null -w '%{{http_code}}\\n' https://localhost:{}/ 2>&1",
        other.addr.port()
    );
    let mut cmd = home.broker();
    cmd.args(["run", "--deny-unlisted", "--upstream-ca"])
        .arg(&ca.pem_path)
        .args([
            "--resolve",
            &format!("api.openai.com:443:{}", origin.addr),
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("200\n"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("403") || stdout.contains("CONNECT tunnel failed"),
        "{stdout}"
    );
    assert!(other.requests().is_empty());
    let audit = home.audit_until(|a| {
        a.lines()
            .any(|l| l.contains("\"denial\"") && l.contains("deny-unlisted"))
    });
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"denial\"") && l.contains("deny-unlisted")),
        "{audit}"
    );
}

const GO_AGENT: &str = r#"package main

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
)

func main() {
	// Only whether they are set: the proxy URL holds the run's ticket.
	fmt.Fprintln(os.Stderr, "agent env: HTTPS_PROXY set:", os.Getenv("HTTPS_PROXY") != "",
		"LD_PRELOAD set:", os.Getenv("LD_PRELOAD") != "")
	// A glibc child of this program loads libbroker.so again: its constructor sets
	// BROKER_SHIM_ACTIVE=1 where it found the run's config (cleared here first, since the
	// value inherited from this program's own parent would say 1 anyway).
	child := exec.Command("sh", "-c", "echo $BROKER_SHIM_ACTIVE")
	child.Env = append(os.Environ(), "BROKER_SHIM_ACTIVE=")
	if out, err := child.Output(); err == nil {
		fmt.Fprintf(os.Stderr, "glibc child shim active: %s", out)
	}
	// An unmanaged host first (the test's own CA): tunnelled untouched, verified with the
	// bundle the agent had, merged with the run CA.
	if len(os.Args) > 1 {
		resp, err := http.Get(os.Args[1])
		if err != nil {
			fmt.Println("unmanaged error:", err)
			os.Exit(5)
		}
		body, _ := io.ReadAll(resp.Body)
		fmt.Println("unmanaged:", resp.StatusCode, string(body))
	}
	req, _ := http.NewRequest("GET", "https://api.openai.com/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+os.Getenv("OPENAI_API_KEY"))
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(3)
	}
	body, _ := io.ReadAll(resp.Body)
	fmt.Println(resp.StatusCode, string(body), "held:", os.Getenv("OPENAI_API_KEY"))
	if resp.StatusCode != 200 {
		os.Exit(4)
	}
}
"#;

/// Build [`GO_AGENT`] into `dir` (static with `cgo: false`, else a dynamic glibc program);
/// `None` (and a SKIP line) without a Go toolchain.
fn build_go_agent(dir: &std::path::Path, cgo: bool) -> Option<std::path::PathBuf> {
    let Some(go) = broker_integration::which("go") else {
        broker_integration::skip(
            "no Go toolchain (apt-get install golang-go); the Go cases are not tested here",
        );
        return None;
    };
    std::fs::write(dir.join("main.go"), GO_AGENT).expect("write");
    let cache = broker_integration::target_dir().join("go-cache");
    let bin = dir.join(if cgo { "dynamic-agent" } else { "static-agent" });
    let mut build = Command::new(go);
    build
        .current_dir(dir)
        .env("CGO_ENABLED", if cgo { "1" } else { "0" })
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("gopath"))
        .env("GO111MODULE", "off")
        .args(["build", "-o"])
        .arg(&bin)
        .arg("main.go");
    let out = run_bounded(&mut build, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(bin)
}

#[test]
fn a_static_go_binary_goes_through_the_connect_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(bin) = build_go_agent(dir.path(), false) else {
        return;
    };

    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let mut cmd = home.broker();
    cmd.args(["run", "--upstream-ca"])
        .arg(&ca.pem_path)
        .args([
            "--resolve",
            &format!("api.openai.com:443:{}", origin.addr),
            "--",
        ])
        .arg(&bin)
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("200 models held: sk-broker-placeholder-openai"),
        "{stdout}"
    );
    assert!(stderr.contains("is a Go program"), "{stderr}");
    assert!(!contains(&out.stdout, OPENAI_KEY));
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
}

/// How a Go agent is started inside a run, each by a process that has the shim loaded: its
/// exec hooks must give the Go child the CONNECT fallback (the Codex CLI's case: a Node
/// launcher that starts a static Rust binary).
const STARTERS: &[(&str, &[&str])] = &[
    ("sh (execve)", &["sh", "-c", "exec \"$0\" \"$@\""]),
    ("python (vfork + execve)", &["python3", "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"]),
    ("node (libuv spawn)", &["node", "-e", "const r = require('child_process').spawnSync(process.argv[1], process.argv.slice(2), {stdio: 'inherit'}); process.exit(r.status ?? 1)"]),
];

/// `broker run -- <starter> <agent> [unmanaged url]` with the agent's CA variables as `ca_vars`
/// sets them; asserts the agent reached both hosts and held only the placeholder.
fn go_agent_started_inside_a_run(bin: &std::path::Path, ca_vars: &dyn Fn(&mut Command, &TestCa)) {
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let unmanaged = Origin::start(&ca, &["localhost"], |req| {
        Reply::Text(
            200,
            format!("untouched, auth {:?}", req.header("authorization")),
        )
    });
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let unmanaged_url = format!("https://localhost:{}/", unmanaged.addr.port());
    for (name, starter) in STARTERS {
        if broker_integration::which(starter[0]).is_none() {
            broker_integration::skip(&format!("{name}: no {} on PATH", starter[0]));
            continue;
        }
        let mut cmd = home.broker();
        ca_vars(&mut cmd, &ca);
        cmd.args(["run", "--upstream-ca"])
            .arg(&ca.pem_path)
            .args([
                "--resolve",
                &format!("api.openai.com:443:{}", origin.addr),
                "--",
            ])
            .args(*starter)
            .arg(bin)
            .arg(&unmanaged_url)
            .stdin(Stdio::null());
        let out = run_bounded(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("unmanaged: 200 untouched, auth None"),
            "{name}: the unmanaged host through the tunnel: {stdout}\n{stderr}"
        );
        assert!(
            stdout.contains("200 models held: sk-broker-placeholder-openai"),
            "{name}: {stdout}\n{stderr}"
        );
        // static and Go programs keep the preload for their own glibc children
        assert!(
            stderr.contains("HTTPS_PROXY set: true LD_PRELOAD set: true"),
            "{name}: {stderr}"
        );
        assert!(
            stderr.contains("glibc child shim active: 1"),
            "{name}: the Go program's glibc child is not under the shim: {stderr}"
        );
        assert!(!contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY));
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), STARTERS.len(), "one model call per starter");
    for req in seen {
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {OPENAI_KEY}").as_str())
        );
    }
}

#[test]
fn a_go_binary_started_by_a_preloaded_process_gets_the_connect_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(bin) = build_go_agent(dir.path(), false) else {
        return;
    };
    // The agent's own CA file (a corporate bundle, here the test CA that signed the unmanaged
    // origin) is merged with the run CA, not replaced.
    go_agent_started_inside_a_run(&bin, &|cmd, ca| {
        broker_integration::scrub(cmd);
        cmd.env("SSL_CERT_FILE", &ca.pem_path);
    });
}

#[test]
fn a_dynamic_go_binary_is_reached_through_the_connect_fallback_too() {
    // cgo: a glibc program that loads libbroker.so, but Go's own connect() never calls libc's.
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(bin) = build_go_agent(dir.path(), true) else {
        return;
    };
    let head = std::fs::read(&bin).expect("read agent");
    assert!(
        head.windows(b"ld-linux".len()).any(|w| w == b"ld-linux"),
        "a dynamic glibc Go program"
    );
    go_agent_started_inside_a_run(&bin, &|cmd, ca| {
        broker_integration::preset_ca_vars(cmd);
        cmd.env("SSL_CERT_FILE", &ca.pem_path);
    });
}

#[test]
fn a_go_binary_started_inside_a_run_behind_a_corporate_proxy_still_reaches_the_broker() {
    // The user's shell exports a corporate proxy: `broker run` lists the managed hosts in the
    // preloaded starter's NO_PROXY (so its own requests reach the broker), and the Go child,
    // which only the CONNECT listener reaches, must not inherit that list.
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(bin) = build_go_agent(dir.path(), false) else {
        return;
    };
    let corporate = broker_integration::connect_proxy::ConnectProxy::start(&[], None);
    go_agent_started_inside_a_run(&bin, &|cmd, ca| {
        broker_integration::scrub(cmd);
        cmd.env("SSL_CERT_FILE", &ca.pem_path)
            .env("HTTPS_PROXY", corporate.url(None))
            .env("NO_PROXY", "localhost")
            .env_remove("no_proxy");
    });
    // api.openai.com is pinned with --resolve, so the broker reaches it directly too.
    assert_eq!(corporate.tunnels(), Vec::new());
}

/// The CONNECT listener decides by the run's own names, as the run's fake address does: AWS
/// is in the catalog, but a run without an AWS credential does not manage it, so a static
/// program's AWS traffic is tunnelled as it was before broker (its own `~/.aws` signs it),
/// never decrypted with the run's CA and refused.
#[test]
fn a_catalog_host_the_run_does_not_manage_is_tunnelled_not_decrypted() {
    let ca = TestCa::new();
    let origin = openai_origin(&ca);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = Serve::start(&home, &ca, &[("api.openai.com", origin.addr)]);
    let run_ca = serve.config.ca_file.to_str().expect("utf8").to_string();
    let out = curl(
        &serve,
        &["-i", "--cacert", &run_ca, "https://sts.amazonaws.com/"],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // Tunnelled: the real host (unreachable here, or with a certificate the run's CA did not
    // sign) answers or not, but the broker never does.
    assert!(!out.status.success(), "{stdout}");
    assert!(!stdout.contains("x-broker-error"), "{stdout}");
    // A managed call after it, whose audit line marks where the AWS one would be.
    let out = curl(
        &serve,
        &[
            "--cacert",
            &run_ca,
            "https://api.openai.com/v1/models",
            "-H",
            &format!("Authorization: Bearer {OPENAI_PH}"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "models");
    let audit = home.audit_until(|a| a.contains("credential_use"));
    assert!(audit.contains("credential_use"), "{audit}");
    assert!(!audit.contains("amazonaws"), "{audit}");
}
