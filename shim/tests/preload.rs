//! The shim preloaded into real clients, against a local TLS origin playing the broker's
//! listener: `127.77.<slot>.1:<port>` (and `[::1]:<port6>`), serving a leaf for
//! `api.openai.com` signed by a test CA that is the run CA of the shim config.
//!
//! Every client test runs twice: with the machine's CA variables scrubbed (the shim alone must
//! make TLS work) and with them preset to the system bundle (the merge rules must hold).
//! A client that is not installed is skipped with a printed reason.
//!
//! Needs `target/debug/libbroker.so`: the first test to need it runs `cargo build -p
//! broker-shim`, so the `.so` is the current one whatever cargo built for the test; if that
//! fails, run it by hand.

use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use broker_contract::{ShimConfig, Ticket};

const PLACEHOLDER: &str = "sk-broker-placeholder-0000000000000000";
const HOST: &str = "api.openai.com";
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The CA variables this machine exports to every process (DESIGN.md section 6).
const CA_VARS: &[&str] = &[
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
    "PIP_CERT",
    "HTTPLIB2_CA_CERTS",
    "NIX_SSL_CERT_FILE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
];
const OTHER_VARS: &[&str] = &[
    "LD_PRELOAD",
    "BROKER_SHIM_CONFIG",
    "BROKER_HOME",
    "BROKER_SHIM_ACTIVE",
    "OPENAI_API_KEY",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaEnv {
    Scrubbed,
    Preset,
}
const BOTH: [CaEnv; 2] = [CaEnv::Scrubbed, CaEnv::Preset];

/// `target/<profile>/libbroker.so`, (re)built once per test binary: the test must not load a
/// stale `.so` left by an earlier build (`cargo test --test preload` of another profile or
/// target directory, say). The nested `cargo build` is quick when nothing changed.
fn shim_path() -> PathBuf {
    static SO: OnceLock<PathBuf> = OnceLock::new();
    SO.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let target_dir = profile_dir.parent().expect("target dir");
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "-q", "-p", "broker-shim", "--lib", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        match build.output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cargo build -p broker-shim failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("cannot run cargo build -p broker-shim: {e}"),
        }
        let so = profile_dir.join("libbroker.so");
        assert!(
            so.exists(),
            "{} is missing: run `cargo build -p broker-shim` first",
            so.display()
        );
        so
    })
    .clone()
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Say why a test cannot run here and let it pass; under `BROKER_TEST_REQUIRE_ALL` (set by
/// `.ci/run`, which installs everything these tests use) fail instead, so that a missing
/// install step cannot hide behind a green run. As `broker_integration::skip`, which this
/// crate does not depend on.
fn skip(reason: &str) {
    if std::env::var_os("BROKER_TEST_REQUIRE_ALL").is_some() {
        panic!("this test cannot run here: {reason} (BROKER_TEST_REQUIRE_ALL is set, as in CI, which installs what every test needs)");
    }
    eprintln!("skipped: {reason}");
}

/// Skip (see [`skip`]) when `program` is not installed.
macro_rules! require {
    ($program:expr) => {
        if which($program).is_none() {
            skip(&format!("{} is not installed", $program));
            return;
        }
    };
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The test CA and the origin's leaf, generated once per test binary with the openssl CLI.
fn pki() -> &'static Path {
    static PKI: OnceLock<PathBuf> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("broker-shim-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ossl = |args: &[&str]| run_ok(Command::new("openssl").args(args).current_dir(&dir));
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        ossl(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=broker shim test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat());
        ossl(&[&["req"][..], &ec, &["-keyout", "leaf.key", "-out", "leaf.csr", "-subj", "/CN=api.openai.com"]].concat());
        std::fs::write(
            dir.join("leaf.ext"),
            "subjectAltName=DNS:api.openai.com,DNS:x.example.org\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .expect("leaf.ext");
        ossl(&[
            "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "leaf.pem", "-days", "2", "-extfile", "leaf.ext",
        ]);
        dir
    })
}

/// A slot per test binary, away from 0 and from what other test suites are likely to use.
fn slot() -> u8 {
    (std::process::id() % 200) as u8 + 40
}

/// One test's world: a temp dir, the origin, and a shim config pointing at it.
/// The ticket of every world's config unless a test changes it.
fn default_ticket() -> Ticket {
    Ticket::from_bytes(&[0x5a; broker_contract::TICKET_BYTES])
}

struct World {
    dir: PathBuf,
    origin: Child,
    port: u16,
    log: PathBuf,
    config: PathBuf,
    ca: PathBuf,
}

impl World {
    fn new(name: &str) -> World {
        World::with(name, |_| {})
    }

    fn with(name: &str, tweak: impl FnOnce(&mut ShimConfig)) -> World {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "broker-shim-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).expect("world dir");
        let pki = pki();
        // The run CA lives in the run dir, as the broker will lay it out.
        let ca = dir.join("run").join("ca.pem");
        std::fs::copy(pki.join("ca.pem"), &ca).expect("ca");
        let log = dir.join("origin.jsonl");
        std::fs::write(&log, "").expect("log");
        let python = if Path::new("/usr/bin/python3").exists() {
            "/usr/bin/python3"
        } else {
            "python3"
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/origin.py");
        let fake = format!("127.77.{}.1", slot());
        let mut cfg = ShimConfig {
            slot: slot(),
            port: 0,
            port6: 0,
            ca_file: ca.clone(),
            deny_unlisted: false,
            hosts: vec![HOST.into(), "*.example.org".into()],
            env: vec![("OPENAI_API_KEY".into(), PLACEHOLDER.into())],
            env_if_set: vec![],
            connect_proxy: None,
            denial_log: None,
            // As the broker writes it: the origin then checks the preamble on every connection.
            ticket: Some(default_ticket()),
            dns: None,
        };
        tweak(&mut cfg);
        let mut origin = Command::new(python);
        if let Some(ticket) = &cfg.ticket {
            origin.env("ORIGIN_TICKET", ticket.expose());
        }
        origin
            .arg(script)
            .arg(pki.join("leaf.pem"))
            .arg(pki.join("leaf.key"))
            .arg(&log)
            .args([fake.as_str(), "::1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for v in OTHER_VARS {
            origin.env_remove(v);
        }
        let mut origin = origin.spawn().expect("spawn origin.py");
        let mut line = String::new();
        {
            use std::io::BufRead as _;
            let stdout = origin.stdout.take().expect("origin stdout");
            std::io::BufReader::new(stdout)
                .read_line(&mut line)
                .expect("origin ports");
        }
        let ports = parse_ports(&line);
        let (port, port6) = (ports[0], ports[1]);
        // A tweak that set a port of its own (a dead one, another listener) keeps it.
        if cfg.port == 0 {
            cfg.port = port;
        }
        if cfg.port6 == 0 {
            cfg.port6 = port6;
        }
        let config = dir.join("run").join("shim.conf");
        std::fs::write(&config, cfg.render()).expect("config");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        World {
            dir,
            origin,
            port,
            log,
            config,
            ca,
        }
    }

    fn fake_ip(&self) -> String {
        format!("127.77.{}.1", slot())
    }

    /// A client command with the shim preloaded and the CA variables per `ca`.
    fn client(&self, ca: CaEnv, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for v in CA_VARS.iter().chain(OTHER_VARS) {
            cmd.env_remove(v);
        }
        if ca == CaEnv::Preset {
            for v in CA_VARS {
                cmd.env(
                    v,
                    if *v == "SSL_CERT_DIR" {
                        "/etc/ssl/certs"
                    } else {
                        SYSTEM_BUNDLE
                    },
                );
            }
        }
        cmd.env("LD_PRELOAD", shim_path())
            .env("BROKER_SHIM_CONFIG", &self.config)
            .env("BROKER_HOME", self.dir.join("home"))
            .current_dir(&self.dir);
        cmd
    }

    /// Origin log entries whose path starts with `path`.
    fn requests(&self, path: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .expect("origin log")
            .lines()
            .filter(|l| l.contains(&format!("\"path\": \"{path}")))
            .map(str::to_string)
            .collect()
    }

    /// Assert the origin saw exactly `n` requests for `path`, over TLS with SNI api.openai.com,
    /// on the fake address.
    fn assert_reached(&self, path: &str, n: usize) {
        let reqs = self.requests(path);
        assert_eq!(reqs.len(), n, "requests for {path}: {reqs:?}");
        for r in reqs {
            assert!(r.contains("\"sni\": \"api.openai.com\""), "{r}");
            assert!(
                r.contains(&format!("\"local\": \"{}\"", self.fake_ip())),
                "{r}"
            );
        }
    }

    fn expect_body(&self, out: &Output) {
        let want = format!("origin-ok api.openai.com {}", self.fake_ip());
        assert!(
            out.stdout.contains(&want),
            "stdout lacks {want:?}:\n{}\nstderr:\n{}",
            out.stdout,
            out.stderr
        );
    }
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.origin.stdin.take());
        let _ = self.origin.kill();
        let _ = self.origin.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn parse_ports(line: &str) -> Vec<u16> {
    // [["127.77.s.1", 1234], ["::1", 5678]]
    line.split(']')
        .filter_map(|part| part.rsplit(',').next())
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run with a deadline; output goes through files so a chatty child never blocks.
fn run(cmd: &mut Command, dir: &Path) -> Output {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (dir.join(format!("out.{n}")), dir.join(format!("err.{n}")));
    let out = std::fs::File::create(&out_path).expect("stdout file");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn client");
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} timed out after {CLIENT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code(),
        stdout: std::fs::read_to_string(out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(err_path).unwrap_or_default(),
    }
}

fn run_ok_out(cmd: &mut Command, dir: &Path) -> Output {
    let out = run(cmd, dir);
    assert_eq!(
        out.code,
        Some(0),
        "{cmd:?} failed\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out
}

// ---------------------------------------------------------------------------------------
// Clients through the shim

#[test]
fn curl_reroutes_and_trusts_run_ca() {
    require!("curl");
    let w = World::new("curl");
    for ca in BOTH {
        let path = format!("/v1/curl-{ca:?}");
        let out = run_ok_out(
            w.client(ca, "curl").args([
                "-sS",
                "--max-time",
                "20",
                &format!("https://{HOST}{path}"),
            ]),
            &w.dir,
        );
        w.expect_body(&out);
        w.assert_reached(&path, 1);
    }
}

/// Every connection the shim reroutes opens with the run's ticket (the origin, like the
/// broker, refuses one that does not): here through event loops whose `connect` is
/// non-blocking (asyncio; a raw non-blocking socket, which must see a completed connect) and
/// through Fast Open. The other client tests (curl, node, wget, git) check it too, since the
/// origin checks every connection.
#[test]
fn nonblocking_connects_present_the_ticket_first() {
    require!("python3");
    let w = World::new("ticket");
    let script = "import asyncio, socket, ssl, sys\n\
                  fake = sys.argv[1]\n\
                  ctx = ssl.create_default_context()\n\
                  async def main():\n\
                  \x20   r, wr = await asyncio.open_connection('api.openai.com', 443, ssl=ctx)\n\
                  \x20   wr.write(b'GET /v1/asyncio HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n')\n\
                  \x20   print('asyncio', (await r.read()).decode().split('\\r\\n\\r\\n', 1)[1].strip())\n\
                  asyncio.run(main())\n\
                  s = socket.socket()\n\
                  s.setblocking(False)\n\
                  print('connect_ex', s.connect_ex((fake, 443)))\n\
                  s.setblocking(True)\n\
                  t = ctx.wrap_socket(s, server_hostname='api.openai.com')\n\
                  t.sendall(b'GET /v1/raw HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n')\n\
                  print('raw', b''.join(iter(lambda: t.recv(4096), b'')).decode().split('\\r\\n\\r\\n', 1)[1].strip())\n\
                  f = socket.socket()\n\
                  f.settimeout(10)\n\
                  f.sendto(b'\\x16', socket.MSG_FASTOPEN, (fake, 443))\n\
                  f.close()\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", script, &w.fake_ip()]),
        &w.dir,
    );
    let body = format!("origin-ok api.openai.com {}", w.fake_ip());
    for line in [
        format!("asyncio {body}"),
        "connect_ex 0".to_string(),
        format!("raw {body}"),
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{}\n{}",
            out.stdout,
            out.stderr
        );
    }
    w.assert_reached("/v1/asyncio", 1);
    w.assert_reached("/v1/raw", 1);
    // The Fast Open connection presented the ticket before its byte: nothing was refused.
    std::thread::sleep(Duration::from_millis(200));
    let log = std::fs::read_to_string(&w.log).expect("log");
    assert!(!log.contains("ticket_refused"), "{log}");
}

/// A config without a ticket (a broker older than tickets): no preamble, the client's bytes
/// come first as before.
#[test]
fn a_config_without_a_ticket_sends_no_preamble() {
    require!("curl");
    let w = World::with("noticket", |c| c.ticket = None);
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "curl").args([
            "-sS",
            "--max-time",
            "20",
            &format!("https://{HOST}/v1/noticket"),
        ]),
        &w.dir,
    );
    w.expect_body(&out);
    w.assert_reached("/v1/noticket", 1);
}

#[test]
fn python_urllib_reroutes_and_trusts_run_ca() {
    require!("python3");
    let w = World::new("urllib");
    for ca in BOTH {
        let path = format!("/v1/urllib-{ca:?}");
        let script = "import sys, urllib.request\n\
                      print(urllib.request.urlopen('https://api.openai.com' + sys.argv[1], timeout=20).read().decode())";
        let out = run_ok_out(w.client(ca, "python3").args(["-c", script, &path]), &w.dir);
        w.expect_body(&out);
        w.assert_reached(&path, 1);
    }
}

#[test]
fn python_requests_with_certifi_reroutes() {
    require!("python3");
    let w = World::new("requests");
    let probe = run(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", "import requests"]),
        &w.dir,
    );
    if probe.code != Some(0) {
        skip("python requests is not installed");
        return;
    }
    for ca in BOTH {
        let path = format!("/v1/requests-{ca:?}");
        let script = "import sys, requests\n\
                      print(requests.get('https://api.openai.com' + sys.argv[1], timeout=20).text)";
        let out = run_ok_out(w.client(ca, "python3").args(["-c", script, &path]), &w.dir);
        w.expect_body(&out);
        w.assert_reached(&path, 1);
    }
}

#[test]
fn node_fetch_and_https_get_trust_run_ca_via_node_extra_ca_certs() {
    require!("node");
    let w = World::new("node");
    for ca in BOTH {
        let fetch_path = format!("/v1/node-fetch-{ca:?}");
        let script = "fetch('https://api.openai.com' + process.argv[1]).then(r => r.text())\
                      .then(t => console.log(t), e => { console.error(e); process.exit(1) })";
        let out = run_ok_out(
            w.client(ca, "node").args(["-e", script, &fetch_path]),
            &w.dir,
        );
        w.expect_body(&out);
        w.assert_reached(&fetch_path, 1);

        let get_path = format!("/v1/node-https-{ca:?}");
        let script = "require('https').get('https://api.openai.com' + process.argv[1], r => {\
                        r.setEncoding('utf8'); let b = ''; r.on('data', d => b += d); r.on('end', () => console.log(b)) })\
                      .on('error', e => { console.error(e); process.exit(1) });\
                      console.error('NODE_EXTRA_CA_CERTS=' + process.env.NODE_EXTRA_CA_CERTS)";
        let out = run_ok_out(w.client(ca, "node").args(["-e", script, &get_path]), &w.dir);
        w.expect_body(&out);
        w.assert_reached(&get_path, 1);
        let extra = out
            .stderr
            .lines()
            .find_map(|l| l.strip_prefix("NODE_EXTRA_CA_CERTS="))
            .expect("printed");
        match ca {
            CaEnv::Scrubbed => assert_eq!(Path::new(extra), w.ca),
            // merged bundle next to the run CA: the system roots plus the run CA
            CaEnv::Preset => {
                assert_eq!(Path::new(extra).parent(), w.ca.parent(), "{extra}");
                let merged = std::fs::read_to_string(extra).expect("merged bundle");
                let ca_pem = std::fs::read_to_string(&w.ca).expect("ca");
                let system = std::fs::read_to_string(SYSTEM_BUNDLE).expect("system bundle");
                assert!(merged.starts_with(system.trim_end()) && merged.ends_with(&ca_pem));
                let mode = std::fs::metadata(extra).expect("meta").permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
        }
    }
}

#[test]
fn wget_gnutls_trusts_run_ca() {
    require!("wget");
    let w = World::new("wget");
    for ca in BOTH {
        let path = format!("/v1/wget-{ca:?}");
        let out = run_ok_out(
            w.client(ca, "wget").args([
                "-q",
                "-O",
                "-",
                "--tries=1",
                "--timeout=20",
                &format!("https://{HOST}{path}"),
            ]),
            &w.dir,
        );
        w.expect_body(&out);
        w.assert_reached(&path, 1);
    }
}

#[test]
fn git_libcurl_gnutls_reaches_origin_over_verified_tls() {
    require!("git");
    let w = World::new("git");
    for ca in BOTH {
        let repo = format!("/repo-{ca:?}.git");
        // The origin is not a git server: git fails after the request, which is all we check
        // (a TLS verification failure would never reach the origin's HTTP handler).
        let out = run(
            w.client(ca, "git")
                .args(["ls-remote", &format!("https://{HOST}{repo}")])
                .env("GIT_TERMINAL_PROMPT", "0"),
            &w.dir,
        );
        assert!(!out.stderr.contains("certificate"), "{}", out.stderr);
        w.assert_reached(&format!("{repo}/info/refs"), 1);
    }
}

// ---------------------------------------------------------------------------------------
// Sockets: what is and is not rewritten

#[test]
fn udp_untouched_tcp_to_fake_address_rewritten_any_port() {
    require!("python3");
    let w = World::new("udp");
    let script = "import socket, sys\n\
                  fake = sys.argv[1]\n\
                  u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                  u.connect((fake, 5353))\n\
                  print('udp', u.getpeername()[1])\n\
                  t = socket.create_connection((fake, 8443), timeout=10)\n\
                  print('tcp', t.getpeername()[0], t.getpeername()[1])\n\
                  f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
                  f.sendto(b'x', socket.MSG_FASTOPEN, (fake, 8443))\n\
                  print('fastopen', f.getpeername()[0], f.getpeername()[1])\n\
                  print('resolved', socket.gethostbyname('api.openai.com'))\n\
                  print('v6', socket.getaddrinfo('api.openai.com', 443, socket.AF_INET6)[0][4][0])\n\
                  print('any', sorted({a[4][0] for a in socket.getaddrinfo('api.openai.com', 443)}))\n\
                  print('other', socket.getaddrinfo('localhost', 80, socket.AF_INET)[0][4][0])\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", script, &w.fake_ip()]),
        &w.dir,
    );
    let fake = w.fake_ip();
    let want = [
        "udp 5353".to_string(),
        format!("tcp {fake} {}", w.port),
        format!("fastopen {fake} {}", w.port),
        format!("resolved {fake}"),
        format!("v6 ::ffff:{fake}"),
        format!("any ['{fake}']"),
        "other 127.0.0.1".to_string(),
    ];
    for line in want {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            out.stdout
        );
    }
}

#[test]
fn ipv6_sockets_v4_mapped_and_v6only() {
    require!("python3");
    let w = World::new("ipv6");
    let script = "import socket, ssl, sys\n\
                  ctx = ssl.create_default_context()\n\
                  for v6only in (0, 1):\n\
                  \x20   s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
                  \x20   s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)\n\
                  \x20   s.settimeout(20)\n\
                  \x20   s.connect(('::ffff:' + sys.argv[1], 443))\n\
                  \x20   t = ctx.wrap_socket(s, server_hostname='api.openai.com')\n\
                  \x20   t.sendall(b'GET /v1/ipv6-%d HTTP/1.1\\r\\nHost: api.openai.com\\r\\nConnection: close\\r\\n\\r\\n' % v6only)\n\
                  \x20   data = b''\n\
                  \x20   while chunk := t.recv(4096):\n\
                  \x20       data += chunk\n\
                  \x20   print(data.decode().splitlines()[-1])\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", script, &w.fake_ip()]),
        &w.dir,
    );
    // A v4-mapped connect from an AF_INET6 socket lands on the broker's IPv4 listener, which
    // sees an ordinary IPv4 local address.
    let v4 = format!("origin-ok api.openai.com {}\n", w.fake_ip());
    assert!(out.stdout.contains(&v4), "{}", out.stdout);
    assert!(
        out.stdout.contains("origin-ok api.openai.com ::1"),
        "{}",
        out.stdout
    );
    assert_eq!(w.requests("/v1/ipv6-1").len(), 1);
    assert!(w.requests("/v1/ipv6-1")[0].contains("\"local\": \"::1\""));
}

/// A plain listener on 127.0.0.1 that answers each connection with `hello`.
fn hello_listener() -> (u16, std::thread::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    let h = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let _ = s.write_all(b"hello\n");
        }
    });
    (port, h)
}

const PY_HELLO: &str = "import socket, sys\n\
                        s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n\
                        print('peer', s.getpeername()[1], s.recv(16).decode().strip())\n";

#[test]
fn unmanaged_host_untouched() {
    require!("python3");
    let w = World::new("unmanaged");
    let (port, h) = hello_listener();
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", PY_HELLO, &port.to_string()]),
        &w.dir,
    );
    assert!(
        out.stdout.contains(&format!("peer {port} hello")),
        "{}",
        out.stdout
    );
    h.join().expect("listener");
}

#[test]
fn deny_unlisted_refuses_remote_tcp_but_not_loopback() {
    require!("python3");
    let w = World::with("deny", |c| c.deny_unlisted = true);
    // 192.0.2.1 (TEST-NET-1) is never routed: without the shim this would hang or fail slowly.
    let script = "import socket, sys, time\n\
                  t0 = time.monotonic()\n\
                  try:\n\
                  \x20   socket.create_connection(('192.0.2.1', 443), timeout=10)\n\
                  \x20   print('connected')\n\
                  except ConnectionRefusedError:\n\
                  \x20   print('refused', time.monotonic() - t0 < 1)\n\
                  try:\n\
                  \x20   socket.socket().sendto(b'x', socket.MSG_FASTOPEN, ('192.0.2.1', 443))\n\
                  \x20   print('fastopen sent')\n\
                  except ConnectionRefusedError:\n\
                  \x20   print('fastopen refused')\n\
                  try:\n\
                  \x20   socket.socket().sendmsg([b'x'], [], socket.MSG_FASTOPEN, ('192.0.2.1', 443))\n\
                  \x20   print('sendmsg sent')\n\
                  except ConnectionRefusedError:\n\
                  \x20   print('sendmsg refused')\n\
                  s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)\n\
                  print('peer', s.getpeername()[1], s.recv(16).decode().strip())\n";
    let (port, h) = hello_listener();
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", script, &port.to_string()]),
        &w.dir,
    );
    assert!(out.stdout.contains("refused True"), "{}", out.stdout);
    assert!(out.stdout.contains("fastopen refused"), "{}", out.stdout);
    assert!(out.stdout.contains("sendmsg refused"), "{}", out.stdout);
    assert!(
        out.stdout.contains(&format!("peer {port} hello")),
        "{}",
        out.stdout
    );
    h.join().expect("listener");
}

#[test]
fn broker_down_managed_refused_unmanaged_works() {
    require!("curl");
    require!("python3");
    // A port nobody listens on: bind, read it, close.
    let dead = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let w = World::with("down", |c| c.port = dead);
    let out = run(
        w.client(CaEnv::Scrubbed, "curl").args([
            "-sS",
            "--max-time",
            "20",
            "https://api.openai.com/v1/down",
        ]),
        &w.dir,
    );
    assert_eq!(
        out.code,
        Some(7),
        "curl must fail to connect: {}",
        out.stderr
    );
    assert!(
        out.stderr.contains("Connection refused") || out.stderr.contains("Couldn't connect"),
        "{}",
        out.stderr
    );
    // A blocking connect also gets one line saying why (non-blocking ones learn it later,
    // from SO_ERROR, which the shim does not watch).
    let script = "import socket\n\
                  for _ in range(2):\n\
                  \x20   try:\n\
                  \x20       socket.socket().connect(('api.openai.com', 443))\n\
                  \x20   except ConnectionRefusedError:\n\
                  \x20       print('refused')\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3").args(["-c", script]),
        &w.dir,
    );
    assert_eq!(out.stdout.matches("refused").count(), 2, "{}", out.stdout);
    assert_eq!(
        out.stderr.matches("the broker is not listening").count(),
        1,
        "{}",
        out.stderr
    );
    let (port, h) = hello_listener();
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .args(["-c", PY_HELLO, &port.to_string()]),
        &w.dir,
    );
    assert!(
        out.stdout.contains(&format!("peer {port} hello")),
        "{}",
        out.stdout
    );
    h.join().expect("listener");
}

#[test]
fn no_config_warns_once_per_process_tree_and_passes_through() {
    require!("python3");
    let w = World::new("noconfig");
    let (port, h) = hello_listener();
    let mut cmd = w.client(CaEnv::Scrubbed, "sh");
    cmd.env_remove("BROKER_SHIM_CONFIG");
    let script = format!("python3 -c \"$1\" {port}; sh -c 'true'; true");
    let out = run_ok_out(cmd.args(["-c", &script, "sh", PY_HELLO]), &w.dir);
    assert!(
        out.stdout.contains(&format!("peer {port} hello")),
        "{}",
        out.stdout
    );
    assert_eq!(
        out.stderr.matches("broker: no broker running").count(),
        1,
        "{}",
        out.stderr
    );
    h.join().expect("listener");
}

// ---------------------------------------------------------------------------------------
// Processes and threads

#[test]
fn forked_child_and_sh_grandchild_are_rerouted() {
    require!("python3");
    require!("curl");
    let w = World::new("fork");
    let script = "import os, sys, urllib.request\n\
                  pid = os.fork()\n\
                  if pid == 0:\n\
                  \x20   print(urllib.request.urlopen('https://api.openai.com/v1/forked', timeout=20).read().decode())\n\
                  \x20   sys.stdout.flush(); os._exit(0)\n\
                  _, status = os.waitpid(pid, 0)\n\
                  sys.exit(os.waitstatus_to_exitcode(status))\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3").args(["-c", script]),
        &w.dir,
    );
    w.expect_body(&out);
    w.assert_reached("/v1/forked", 1);

    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "sh").args([
            "-c",
            "sh -c 'curl -sS --max-time 20 https://api.openai.com/v1/grandchild; true'",
        ]),
        &w.dir,
    );
    w.expect_body(&out);
    w.assert_reached("/v1/grandchild", 1);
}

#[test]
fn sixty_four_threads_connect_concurrently() {
    require!("python3");
    let w = World::new("threads");
    let script = "import threading, urllib.request\n\
                  ok = []\n\
                  def go(i):\n\
                  \x20   body = urllib.request.urlopen('https://api.openai.com/v1/thread-%d' % i, timeout=40).read()\n\
                  \x20   ok.append(body.startswith(b'origin-ok api.openai.com'))\n\
                  ts = [threading.Thread(target=go, args=(i,)) for i in range(64)]\n\
                  [t.start() for t in ts]\n\
                  [t.join() for t in ts]\n\
                  print('ok', sum(ok))\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3").args(["-c", script]),
        &w.dir,
    );
    assert!(
        out.stdout.contains("ok 64"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(w.requests("/v1/thread-").len(), 64);
}

// ---------------------------------------------------------------------------------------
// Environment

#[test]
fn placeholder_set_when_unset() {
    require!("python3");
    let w = World::new("placeholder");
    let script = "import os; print('key', os.environ.get('OPENAI_API_KEY')); print('active', os.environ.get('BROKER_SHIM_ACTIVE'))";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3").args(["-c", script]),
        &w.dir,
    );
    assert!(
        out.stdout.contains(&format!("key {PLACEHOLDER}")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("active 1"), "{}", out.stdout);
}

#[test]
fn real_key_in_env_is_replaced_and_scrubbed_from_proc_environ() {
    // The interpreter itself, not pyenv's bash wrapper: the scrubbing must happen in the very
    // process that reads /proc/self/environ.
    require!("python3");
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let w = World::new("hide");
    // Not a real credential; still, never printed: the script only reports booleans.
    let fake_real = "sk-proj-NOTREAL0000shimtest0000000000";
    let script = "import os\n\
                  real = os.environ.get('REAL_PROBE', '')\n\
                  print('env_is_placeholder', os.environ.get('OPENAI_API_KEY') == os.environ.get('EXPECTED'))\n\
                  print('proc_has_real', real.encode() in open('/proc/self/environ', 'rb').read().replace(b'REAL_PROBE=' + real.encode(), b''))\n";
    let mut cmd = w.client(CaEnv::Scrubbed, python);
    cmd.env("OPENAI_API_KEY", fake_real)
        .env("EXPECTED", PLACEHOLDER)
        .env("REAL_PROBE", fake_real);
    let out = run_ok_out(cmd.args(["-c", script]), &w.dir);
    assert!(
        out.stdout.contains("env_is_placeholder True"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("proc_has_real False"), "{}", out.stdout);
    assert!(
        out.stderr.contains("OPENAI_API_KEY held a real key"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains(fake_real) && !out.stdout.contains(fake_real));
}

// ---------------------------------------------------------------------------------------
// Two OpenSSL copies in one process

/// psycopg2-binary vendors its own libssl/libcrypto, loaded next to Python's `_ssl` (system
/// OpenSSL). Both must keep working, and the vendored copy must trust the run CA: libpq with
/// `sslmode=verify-full sslrootcert=system` verifies a fake PostgreSQL server that presents
/// the `api.openai.com` leaf, then reports the server's FATAL message.
#[test]
fn psycopg2_binary_vendored_openssl_next_to_system_ssl() {
    require!("python3");
    let probe = World::new("pg-probe");
    let out = run(
        probe
            .client(CaEnv::Scrubbed, "python3")
            .args(["-c", "import psycopg2"]),
        &probe.dir,
    );
    if out.code != Some(0) {
        skip("psycopg2-binary is not installed (pip install psycopg2-binary)");
        return;
    }
    drop(probe);
    let pki = pki();
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let mut pg = Command::new(python);
    pg.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fake_pg.py"))
        .arg(pki.join("leaf.pem"))
        .arg(pki.join("leaf.key"))
        .arg(format!("127.77.{}.1", slot()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for v in OTHER_VARS {
        pg.env_remove(v);
    }
    // The run's ticket, which the shim sends first (the worlds' default config has one).
    pg.env("ORIGIN_TICKET", default_ticket().expose());
    let mut pg = pg.spawn().expect("spawn fake_pg.py");
    let mut line = String::new();
    {
        use std::io::BufRead as _;
        let stdout = pg.stdout.take().expect("fake_pg stdout");
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fake_pg port");
    }
    let pg_port: u16 = line.trim().parse().expect("port");
    let w = World::with("pg", |c| c.port = pg_port);
    let script = "import ssl, urllib.request, psycopg2\n\
                  ssl.create_default_context()\n\
                  try:\n\
                  \x20   psycopg2.connect(host='api.openai.com', port=5432, user='u', dbname='d',\n\
                  \x20       sslmode='verify-full', sslrootcert='system', gssencmode='disable', connect_timeout=20)\n\
                  except psycopg2.OperationalError as e:\n\
                  \x20   print('pg:', str(e).strip())\n\
                  ssl.create_default_context()\n\
                  print('system ssl still fine')\n";
    for ca in BOTH {
        let out = run_ok_out(w.client(ca, "python3").args(["-c", script]), &w.dir);
        assert!(
            out.stdout.contains("broker-shim-pg-ok api.openai.com"),
            "{}\n{}",
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.contains("system ssl still fine"),
            "{}",
            out.stdout
        );
    }
    drop(pg.stdin.take());
    let _ = pg.kill();
    let _ = pg.wait();
}

/// Control: with a run CA that did not sign the origin's leaf, verification must fail, so the
/// tests above prove that the shim's trust injection is what makes TLS work.
#[test]
fn control_wrong_run_ca_fails_verification() {
    require!("curl");
    require!("python3");
    let w = World::new("control");
    std::fs::copy(SYSTEM_BUNDLE, &w.ca).expect("replace run CA");
    let out = run(
        w.client(CaEnv::Scrubbed, "curl").args([
            "-sS",
            "--max-time",
            "20",
            "https://api.openai.com/v1/control",
        ]),
        &w.dir,
    );
    assert_eq!(
        out.code,
        Some(60),
        "curl must fail verification: {}",
        out.stderr
    );
    let script = "import urllib.request, ssl\n\
                  try:\n\
                  \x20   urllib.request.urlopen('https://api.openai.com/v1/control', timeout=20)\n\
                  except Exception as e:\n\
                  \x20   print('failed', 'CERTIFICATE_VERIFY_FAILED' in str(e))\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3").args(["-c", script]),
        &w.dir,
    );
    assert!(out.stdout.contains("failed True"), "{}", out.stdout);
    assert!(w.requests("/v1/control").is_empty());
}

// ---------------------------------------------------------------------------------------
// exec of programs that cannot load a glibc libbroker.so

/// A dynamic musl program started under the shim must run (not exit 127 on "Error relocating
/// libbroker.so"), without our entry in its LD_PRELOAD, whichever way it is started; a glibc
/// child keeps the preload.
#[test]
fn musl_children_start_without_the_shim_glibc_children_keep_it() {
    require!("musl-gcc");
    require!("python3");
    let w = World::new("musl");
    let bin = w.dir.join("bin");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::write(
        w.dir.join("mh.c"),
        "#include <stdio.h>\n#include <stdlib.h>\nint main(void) {\n\
         const char *p = getenv(\"LD_PRELOAD\");\n\
         printf(\"musl-child LD_PRELOAD=%s\\n\", p ? p : \"(unset)\");\n return 0; }\n",
    )
    .expect("mh.c");
    run_ok(
        Command::new("musl-gcc")
            .args(["-o", "bin/musl-child", "mh.c"])
            .current_dir(&w.dir),
    );
    let head = std::fs::read(bin.join("musl-child")).expect("musl binary");
    if !head.windows(7).any(|x| x == b"ld-musl") {
        skip("musl-gcc made a static binary; a dynamic musl program is needed");
        return;
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let expect_unset = |out: &Output, n: usize| {
        assert_eq!(
            out.stdout.matches("musl-child LD_PRELOAD=(unset)").count(),
            n,
            "{}\n{}",
            out.stdout,
            out.stderr
        );
        assert!(!out.stderr.contains("Error relocating"), "{}", out.stderr);
    };
    // sh: execve with a path, and execvp-style PATH search; a glibc child keeps the preload
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "sh").env("PATH", &path).args([
            "-c",
            "./bin/musl-child; musl-child; sh -c 'echo glibc-child LD_PRELOAD=$LD_PRELOAD'",
        ]),
        &w.dir,
    );
    expect_unset(&out, 2);
    assert!(
        out.stdout.contains("glibc-child LD_PRELOAD=") && out.stdout.contains("libbroker.so"),
        "{}",
        out.stdout
    );
    // C's variadic execl / execlp / execle, from a glibc program
    if which("gcc").is_some() {
        std::fs::write(
            w.dir.join("launch.c"),
            "#include <unistd.h>\n#include <sys/wait.h>\nextern char **environ;\n\
             static void run(int how) { pid_t p = fork(); if (p == 0) {\n\
               if (how == 0) execl(\"./bin/musl-child\", \"musl-child\", (char *)0);\n\
               if (how == 1) execlp(\"musl-child\", \"musl-child\", (char *)0);\n\
               if (how == 2) execle(\"./bin/musl-child\", \"musl-child\", (char *)0, environ);\n\
               _exit(127); }\n\
               int st; waitpid(p, &st, 0); }\n\
             int main(void) { run(0); run(1); run(2); return 0; }\n",
        )
        .expect("launch.c");
        run_ok(
            Command::new("gcc")
                .args(["-o", "launch", "launch.c"])
                .current_dir(&w.dir),
        );
        let out = run_ok_out(
            w.client(CaEnv::Scrubbed, "./launch").env("PATH", &path),
            &w.dir,
        );
        expect_unset(&out, 3);
    }
    // CPython's subprocess (vfork + execve), with and without PATH search, and posix_spawn
    let script = "import os, subprocess\n\
                  subprocess.run(['./bin/musl-child'], check=True)\n\
                  subprocess.run(['musl-child'], check=True)\n\
                  os.waitpid(os.posix_spawnp('musl-child', ['musl-child'], os.environ), 0)\n\
                  os.waitpid(os.posix_spawn('./bin/musl-child', ['musl-child'], os.environ), 0)\n";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "python3")
            .env("PATH", &path)
            .args(["-c", script]),
        &w.dir,
    );
    expect_unset(&out, 4);
    if which("node").is_some() {
        let script = "const cp = require('child_process');\
                      process.stdout.write(cp.execFileSync('./bin/musl-child'));\
                      process.stdout.write(cp.execFileSync('musl-child'))";
        let out = run_ok_out(
            w.client(CaEnv::Scrubbed, "node")
                .env("PATH", &path)
                .args(["-e", script]),
            &w.dir,
        );
        expect_unset(&out, 2);
    }
}

/// `gethostbyname` (Perl calls libc's directly; Python goes through `getaddrinfo`).
#[test]
fn gethostbyname_answers_managed_hosts() {
    require!("perl");
    let w = World::new("ghbn");
    let script = "use Socket; for my $n (@ARGV) { my $h = gethostbyname($n); \
                  print \"$n \", ($h ? inet_ntoa($h) : 'none'), \"\\n\" }";
    let out = run_ok_out(
        w.client(CaEnv::Scrubbed, "perl").args([
            "-e",
            script,
            "api.openai.com",
            "x.example.org",
            "localhost",
        ]),
        &w.dir,
    );
    let s = slot();
    for line in [
        format!("api.openai.com 127.77.{s}.1"),
        // Every managed name gets the run's one address.
        format!("x.example.org 127.77.{s}.1"),
        "localhost 127.0.0.1".into(),
    ] {
        assert!(
            out.stdout.lines().any(|l| l == line),
            "missing {line:?} in:\n{}",
            out.stdout
        );
    }
}
