//! The upstream proxy: a broker whose network's way out is a (corporate) HTTP proxy reaches
//! providers through it with CONNECT (and Basic proxy auth), TLS verified end to end; the
//! proxy is set by `HTTPS_PROXY` or `upstream_proxy` in config.toml. The agent's own traffic
//! for managed hosts goes to the broker, not to the proxy its environment names, and its other
//! traffic still goes where its environment says.

use std::process::{Command, Stdio};
use std::time::Duration;

use broker_integration::connect_proxy::ConnectProxy;
use broker_integration::{
    contains, count_events, run_bounded, shim_lib, Home, Origin, Reply, TestCa,
};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-uproxy-0123456789";
const PROXY_USER: &str = "corp-user";
const PROXY_PASSWORD: &str = "pr0xy-pa55word-never-shown";
const INTRANET: &str = "intranet.corp.internal";

/// `broker run` with an embedded broker that trusts `ca` for upstreams; the upstream hosts are
/// not pinned (`--resolve` would bypass the proxy): the proxy resolves them.
fn broker_run(home: &Home, ca: &TestCa) -> Command {
    let mut cmd = home.broker();
    cmd.arg("run")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .env_remove("no_proxy")
        .stdin(Stdio::null());
    cmd
}

fn write_config(home: &Home, text: &str) {
    std::fs::write(home.path().join("config.toml"), text).expect("config.toml");
}

/// `curl` as the agent: the status of a managed call (`status=N`; `-w`, since `-D` would
/// also show a proxy's answer to CONNECT), then `x-broker-error`'s value (`error=...`), then the
/// agent's environment.
const CURL_MANAGED: &str = "curl -sS -o /dev/null -D - -w 'status=%{http_code}\\n' \
     https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\" | \
     tr -d '\\r' | sed -n -e 's/^x-broker-error: /error=/p' -e '/^status=/p'; env";

#[test]
fn the_broker_tunnels_through_https_proxy_and_the_agent_still_sends_managed_hosts_to_the_broker() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let intranet = Origin::start(&ca, &[INTRANET], |_| {
        Reply::Text(200, "intranet page".into())
    });
    let proxy = ConnectProxy::start(
        &[
            ("api.openai.com:443", origin.addr),
            (&format!("{INTRANET}:443"), intranet.addr),
        ],
        None,
    );
    let home = Home::new();
    home.add("openai", OPENAI_KEY);

    // The user's shell exports the corporate proxy: the broker takes it, and so does the agent,
    // whose clients (Python's urllib, curl) honour HTTPS_PROXY and NO_PROXY.
    let python = format!(
        "import os,urllib.request as u\n\
         def get(url, h={{}}):\n\
         \x20   try:\n\
         \x20       r=u.urlopen(u.Request(url,headers=h),timeout=30); print(url, r.status, r.read().decode())\n\
         \x20   except u.HTTPError as e: print(url, e.code, e.headers.get('x-broker-error'))\n\
         get('https://api.openai.com/v1/models',{{'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']}})\n\
         get('https://{INTRANET}/')\n"
    );
    let agent = format!("{CURL_MANAGED}; python3 -c \"$PY\"");
    let mut cmd = broker_run(&home, &ca);
    cmd.env("HTTPS_PROXY", proxy.url(None))
        .env("https_proxy", proxy.url(None))
        .env("NO_PROXY", "localhost,.corp.example")
        // The intranet origin's certificate is from the test CA: the agent trusts it as it
        // trusts its company's CA.
        .env("SSL_CERT_FILE", &ca.pem_path)
        .env("PY", &python)
        .args(["--", "sh", "-c", &agent]);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("status=200\n"),
        "curl's managed call: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("https://api.openai.com/v1/models 200 {\"data\":[]}"),
        "python's managed call: {stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("https://{INTRANET}/ 200 intranet page")),
        "python's unmanaged call through the proxy: {stdout}\n{stderr}"
    );
    // The agent's NO_PROXY kept the user's entries and gained the managed hosts.
    let no_proxy = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NO_PROXY="))
        .expect("NO_PROXY in the agent's environment");
    assert!(
        no_proxy.starts_with("localhost,.corp.example,"),
        "{no_proxy}"
    );
    assert!(
        no_proxy.split(',').any(|e| e == "api.openai.com"),
        "{no_proxy}"
    );

    // Every request the origin got carried the real key: none was the agent's own, sent to
    // the proxy with the placeholder.
    let requests = origin.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let tunnels = proxy.tunnels();
    let to_openai = tunnels
        .iter()
        .filter(|t| t.target == "api.openai.com:443")
        .count();
    assert_eq!(
        to_openai,
        origin.connections_accepted(),
        "every connection to the provider is one of the broker's tunnels: {tunnels:?}"
    );
    assert!(to_openai >= 1, "{tunnels:?}");
    assert_eq!(
        tunnels
            .iter()
            .filter(|t| t.target == format!("{INTRANET}:443"))
            .count(),
        1,
        "the agent's unmanaged request went to its proxy: {tunnels:?}"
    );
    assert!(tunnels.iter().all(|t| t.status == 200), "{tunnels:?}");
    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 2);
    assert_eq!(count_events(&audit, "credential_use"), 2, "{audit}");
}

#[test]
fn the_broker_uses_upstream_proxy_from_config_toml_with_basic_auth_and_the_agent_never_sees_it() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let proxy = ConnectProxy::start(
        &[("api.openai.com:443", origin.addr)],
        Some((PROXY_USER, PROXY_PASSWORD)),
    );
    let home = Home::new();
    home.add("openai", OPENAI_KEY);

    // The agent's curl with `userinfo` in config.toml's proxy URL: its stdout and stderr.
    let run_with = |userinfo: &str| {
        write_config(
            &home,
            &format!("upstream_proxy = \"{}\"\n", proxy.url(Some(userinfo))),
        );
        let out = run_bounded(
            broker_run(&home, &ca).args(["--", "sh", "-c", CURL_MANAGED]),
            Duration::from_secs(60),
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = run_with(&format!("{PROXY_USER}:{PROXY_PASSWORD}"));
    assert!(stdout.contains("status=200\n"), "{stdout}\n{stderr}");
    let tunnels = proxy.tunnels();
    assert!(!tunnels.is_empty(), "the broker did not use the proxy");
    assert!(
        tunnels
            .iter()
            .all(|t| t.target == "api.openai.com:443" && t.authorized),
        "{tunnels:?}"
    );
    // The proxy is the broker's: nothing of it is in the agent's environment.
    assert!(!stdout.contains(PROXY_PASSWORD), "{stdout}");
    assert!(!stdout.contains(&proxy.addr.to_string()), "{stdout}");
    assert!(
        !stdout.to_ascii_lowercase().contains("https_proxy"),
        "{stdout}"
    );

    // Wrong credentials: a clear 502 naming the proxy problem, audited, and the password
    // nowhere but the file the user wrote it in.
    let (stdout, stderr) = run_with(&format!("{PROXY_USER}:wrong-{PROXY_PASSWORD}"));
    assert!(stdout.contains("status=502\n"), "{stdout}\n{stderr}");
    let error = stdout
        .lines()
        .find_map(|l| l.strip_prefix("error="))
        .unwrap_or_else(|| panic!("no x-broker-error: {stdout}"));
    assert!(
        error.contains(&format!("the upstream proxy http://{}", proxy.addr))
            && error.contains("refused its credentials"),
        "{error}"
    );
    let audit = home.audit_until(|a| count_events(a, "upstream_proxy_failed") >= 1);
    assert_eq!(count_events(&audit, "upstream_proxy_failed"), 1, "{audit}");
    assert!(proxy.tunnels().iter().any(|t| t.status == 407));
    for (what, bytes) in [
        ("the agent's output", stdout.as_bytes()),
        ("the broker's stderr", stderr.as_bytes()),
        ("the audit log", audit.as_bytes()),
    ] {
        assert!(
            !contains(bytes, PROXY_PASSWORD),
            "the proxy password is in {what}"
        );
    }
    assert_eq!(
        origin.requests().len(),
        1,
        "nothing was sent past the refusing proxy"
    );
}

#[test]
fn a_proxy_that_cannot_be_reached_or_refuses_connect_is_a_clear_502() {
    let _ = shim_lib();
    let ca = TestCa::new();
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    // No route for api.openai.com: the proxy answers 403.
    let refusing = ConnectProxy::start(&[], None);
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    for (url, expected) in [
        (
            refusing.url(None),
            "refused CONNECT to api.openai.com:443 (HTTP/1.1 403 Forbidden)",
        ),
        (format!("http://{closed}"), "cannot be reached"),
    ] {
        let out = run_bounded(
            broker_run(&home, &ca)
                .env("HTTPS_PROXY", &url)
                .args(["--", "sh", "-c", CURL_MANAGED]),
            Duration::from_secs(60),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("status=502\n"), "{url}: {stdout}");
        let error = stdout
            .lines()
            .find_map(|l| l.strip_prefix("error="))
            .unwrap_or_else(|| panic!("no x-broker-error: {stdout}"));
        assert!(
            error.starts_with("cannot reach upstream api.openai.com: the upstream proxy ")
                && error.contains("(from HTTPS_PROXY)")
                && error.contains(expected),
            "{url}: {error}"
        );
    }
    let audit = home.audit_until(|a| count_events(a, "upstream_proxy_failed") >= 2);
    assert_eq!(count_events(&audit, "upstream_proxy_failed"), 2, "{audit}");
}

#[test]
fn broker_serve_takes_https_proxy_for_websocket_upgrades_too() {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::WebSocketEcho);
    let proxy = ConnectProxy::start(&[("api.openai.com:443", origin.addr)], None);
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let placeholder = home.placeholder("openai");
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .env("HTTPS_PROXY", proxy.url(None));
    let serve = broker_integration::Serve::spawn(&home, cmd);
    let ca_pem = serve.ca_pem();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let tcp = broker_integration::connect_as_shim(serve.addr_for("api.openai.com"))
            .await
            .expect("connect");
        let tls = tokio_rustls::TlsConnector::from(broker_integration::client_tls(
            &ca_pem,
            &[b"http/1.1"],
        ))
        .connect(
            rustls_pki_types::ServerName::try_from("api.openai.com").expect("name"),
            tcp,
        )
        .await
        .expect("tls");
        let mut ws = broker_integration::websocket::open(tls, "/v1/realtime", &placeholder).await;
        assert_eq!(
            broker_integration::websocket::round_trip(&mut ws, "through two tunnels").await,
            "through two tunnels"
        );
    });
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    let tunnels = proxy.tunnels();
    assert_eq!(tunnels.len(), 1, "{tunnels:?}");
    assert_eq!(tunnels[0].target, "api.openai.com:443");
}

#[test]
fn a_proxy_url_the_broker_cannot_use_stops_it_at_start_without_showing_the_password() {
    let home = Home::new();
    for (url, expected) in [
        (
            "socks5://corp-user:pr0xy-pa55word-never-shown@proxy.corp:1080",
            "socks5://",
        ),
        (
            "http://corp-user:pr0xy-pa55word-never-shown@proxy.corp",
            "needs a host and a port",
        ),
    ] {
        let out = run_bounded(
            home.broker()
                .env("HTTPS_PROXY", url)
                .args(["run", "--", "true"])
                .stdin(Stdio::null()),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: {stderr}");
        assert!(
            stderr.contains("HTTPS_PROXY: ") && stderr.contains(expected),
            "{stderr}"
        );
        assert!(!stderr.contains(PROXY_PASSWORD), "{stderr}");
    }
    // upstream_proxy = "" in config.toml: no proxy, whatever the environment says.
    write_config(&home, "upstream_proxy = \"\"\n");
    let out = run_bounded(
        home.broker()
            .env("HTTPS_PROXY", "socks5://proxy.corp:1080")
            .args(["run", "--", "true"])
            .stdin(Stdio::null()),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A typo in config.toml (the URL unquoted): every command that reads the file says which
    // line is wrong, and none prints it.
    write_config(
        &home,
        &format!("upstream_proxy = http://{PROXY_USER}:{PROXY_PASSWORD}@proxy.corp:3128\n"),
    );
    for args in [
        &["run", "--", "true"][..],
        &["login", "openai", "--no-browser", "--timeout", "1"],
        &["doctor", "--no-self-test"],
    ] {
        let out = run_bounded(
            home.broker().args(args).stdin(Stdio::null()),
            Duration::from_secs(60),
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            all.contains("config.toml: not valid near line 1"),
            "{args:?}: {all}"
        );
        assert!(!all.contains(PROXY_PASSWORD), "{args:?}: {all}");
    }
}

/// A program on the CONNECT fallback (static, Go) lost its own `HTTPS_PROXY` to the broker's:
/// its tunnels to hosts the broker does not manage go out through the upstream proxy, as the
/// user's proxy would have taken them, and a host in `NO_PROXY` is reached directly. The
/// managed host is still swapped and reached through the proxy too.
#[test]
fn the_connect_listener_tunnels_unmanaged_hosts_through_the_upstream_proxy() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let intranet = Origin::start(&ca, &[INTRANET], |_| {
        Reply::Text(200, "intranet page".into())
    });
    let direct = Origin::start(&ca, &["localhost"], |_| {
        Reply::Text(200, "a page on this machine".into())
    });
    let proxy = ConnectProxy::start(
        &[
            ("api.openai.com:443", origin.addr),
            (&format!("{INTRANET}:443"), intranet.addr),
        ],
        None,
    );
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let placeholder = home.placeholder("openai");
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .env("HTTPS_PROXY", proxy.url(None))
        .env("NO_PROXY", "localhost")
        .env_remove("no_proxy");
    let serve = broker_integration::Serve::spawn(&home, cmd);
    let curl =
        |url: &str, header: Option<String>| curl_as_static_program(&home, &ca, &serve, url, header);
    let page = curl(&format!("https://{INTRANET}/"), None);
    assert_eq!(page, "intranet page", "{page}");
    let local = curl(&format!("https://localhost:{}/", direct.addr.port()), None);
    assert_eq!(local, "a page on this machine", "{local}");
    let models = curl(
        "https://api.openai.com/v1/models",
        Some(format!("Authorization: Bearer {placeholder}")),
    );
    assert_eq!(models, "{\"data\":[]}", "{models}");
    let targets: Vec<String> = proxy.tunnels().into_iter().map(|t| t.target).collect();
    assert!(
        targets.contains(&format!("{INTRANET}:443")),
        "the unmanaged tunnel went through the proxy: {targets:?}"
    );
    assert!(
        targets.contains(&"api.openai.com:443".to_string()),
        "{targets:?}"
    );
    assert!(
        !targets.iter().any(|t| t.starts_with("localhost")),
        "a NO_PROXY host is reached directly: {targets:?}"
    );
    assert_eq!(direct.requests().len(), 1);
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
}

/// curl as a static program on the CONNECT fallback: the broker's proxy URL with the run's
/// ticket in a config file (never argv), trusting the run's CA and the test CA. Its stdout
/// and stderr.
fn curl_as_static_program(
    home: &Home,
    ca: &TestCa,
    serve: &broker_integration::Serve,
    url: &str,
    header: Option<String>,
) -> String {
    let bundle = home.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        format!(
            "{}{}",
            String::from_utf8_lossy(&serve.ca_pem()),
            std::fs::read_to_string(&ca.pem_path).expect("test ca")
        ),
    )
    .expect("bundle");
    let addr = serve.config.connect_proxy.clone().expect("connect proxy");
    let ticket = serve.config.ticket.as_ref().expect("the run's ticket");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("curlrc");
    let mut text = format!("proxy = \"http://broker:{}@{addr}\"\n", ticket.expose());
    if let Some(header) = header {
        text.push_str(&format!("header = \"{header}\"\n"));
    }
    std::fs::write(&config, text).expect("curlrc");
    let mut cmd = Command::new("curl");
    broker_integration::scrub(&mut cmd);
    cmd.args(["-sS", "--max-time", "20", "--noproxy", "", "--cacert"])
        .arg(&bundle)
        .arg("-K")
        .arg(&config)
        .arg(url);
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A proxy set in config.toml, with its login, is the broker's: the CONNECT listener does not
/// lend it to the agent's tunnels to hosts the broker does not manage (they go directly), while
/// the broker's own calls to the provider still go through it.
#[test]
fn a_proxy_from_config_toml_is_not_lent_to_the_agents_unmanaged_tunnels() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let intranet = Origin::start(&ca, &[INTRANET], |_| {
        Reply::Text(200, "intranet page".into())
    });
    let proxy = ConnectProxy::start(
        &[
            ("api.openai.com:443", origin.addr),
            (&format!("{INTRANET}:443"), intranet.addr),
        ],
        Some((PROXY_USER, PROXY_PASSWORD)),
    );
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let placeholder = home.placeholder("openai");
    write_config(
        &home,
        &format!(
            "upstream_proxy = \"{}\"\n",
            proxy.url(Some(&format!("{PROXY_USER}:{PROXY_PASSWORD}")))
        ),
    );
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    let serve = broker_integration::Serve::spawn(&home, cmd);
    let page = curl_as_static_program(&home, &ca, &serve, &format!("https://{INTRANET}/"), None);
    assert_ne!(page, "intranet page", "{page}");
    let models = curl_as_static_program(
        &home,
        &ca,
        &serve,
        "https://api.openai.com/v1/models",
        Some(format!("Authorization: Bearer {placeholder}")),
    );
    assert_eq!(models, "{\"data\":[]}", "{models}");
    let targets: Vec<String> = proxy.tunnels().into_iter().map(|t| t.target).collect();
    assert!(
        targets.contains(&"api.openai.com:443".to_string())
            && !targets.iter().any(|t| t.starts_with(INTRANET)),
        "{targets:?}"
    );
    assert_eq!(intranet.requests().len(), 0);
}
