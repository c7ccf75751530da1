//! The broker's request path, end to end: the real `broker serve` binary, real TLS, local
//! origins on port 0 with their own CA, a client connecting the way a shimmed agent does.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use broker_integration::{
    contains, get, send, send_on_one_connection, send_taking_turns, Home, Origin, Reply, Serve,
    TestCa,
};
use bytes::Bytes;
use http_body_util::Full;

// Test secrets: valid for their providers' key patterns, obviously fake.
const OPENAI_KEY: &str = "sk-test-real-openai-key-0123456789-abcdef";
const ANTHROPIC_KEY: &str = "sk-ant-test-real-anthropic-key-0123456789";
const GEMINI_KEY: &str = "AIza-test-real-gemini-key-0123456789abcdef";
const GITHUB_KEY: &str = "ghp_test_real_github_key_0123456789abcdefghij";
const STRIPE_KEY: &str = "sk_test_real_stripe_key_0123456789";
const GITLAB_KEY: &str = "glpat-test-real-gitlab-key-0123456789ab";

const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";
const ANTHROPIC_PH: &str = "sk-ant-api03-broker-placeholder-anthropic-00000000";

/// An origin for `host` that answers 200 "ok" when it sees `expect` in the request head, else 401.
fn demanding_origin(ca: &TestCa, host: &str, expect: &'static str) -> Origin {
    Origin::start(ca, &[host], move |req| {
        let head = format!("{} {:?}", req.target, req.headers);
        if head.contains(expect) {
            Reply::Text(200, "ok: key accepted".into())
        } else {
            Reply::Text(401, "no valid key".into())
        }
    })
}

struct Setup {
    home: Home,
    serve: Serve,
    ca_pem: Vec<u8>,
}

fn setup(ca: &TestCa, origins: &[(&str, SocketAddr)], keys: &[(&str, &str)]) -> Setup {
    let home = Home::new();
    for (provider, key) in keys {
        home.add(provider, key);
    }
    let serve = Serve::start(&home, ca, origins);
    let ca_pem = serve.ca_pem();
    Setup {
        home,
        serve,
        ca_pem,
    }
}

impl Setup {
    /// A TLS connection to the broker for `host`, offering only HTTP/1.1 (upgrades).
    async fn tls_http1(
        &self,
        host: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = broker_integration::connect_as_shim(self.serve.addr_for(host))
            .await
            .expect("connect");
        tokio_rustls::TlsConnector::from(broker_integration::client_tls(
            &self.ca_pem,
            &[b"http/1.1"],
        ))
        .connect(
            rustls_pki_types::ServerName::try_from(host.to_string()).expect("name"),
            tcp,
        )
        .await
        .expect("tls")
    }

    fn get(
        &self,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        h2: bool,
    ) -> broker_integration::ClientResponse {
        send(
            self.serve.addr_for(host),
            host,
            &self.ca_pem,
            h2,
            get(host, path, headers),
        )
        .expect("request through the broker")
    }

    /// The secret must not be in the broker's stderr or anywhere in BROKER_HOME but the
    /// (encrypted) vault.
    fn assert_no_leak(&self, secret: &str) {
        assert!(
            !self.serve.stderr().contains(secret),
            "secret in broker stderr"
        );
        let audit = std::fs::read(self.home.path().join("audit.jsonl")).unwrap_or_default();
        assert!(!contains(&audit, secret), "secret in the audit log");
        assert!(
            !contains(&self.home.all_bytes(), secret),
            "secret in plaintext under BROKER_HOME"
        );
    }
}

#[test]
fn bearer_swap_over_h1_and_h2() {
    let ca = TestCa::new();
    let origin = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    for h2 in [false, true] {
        let r = s.get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &auth)],
            h2,
        );
        assert_eq!(r.status, 200, "h2={h2}: {}", r.text());
        assert_eq!(
            r.version,
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        assert!(!contains(&r.body, OPENAI_KEY));
        assert!(r
            .headers
            .iter()
            .all(|(_, v)| !contains(v.as_bytes(), OPENAI_KEY)));
    }
    let got = origin.requests();
    assert_eq!(got.len(), 2);
    for req in &got {
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {OPENAI_KEY}").as_str())
        );
        assert_eq!(req.target, "/v1/models");
    }
    // Audit: one credential_use line per request, no secret.
    let audit = wait_for_audit(&s.home, 2);
    assert!(audit
        .iter()
        .all(|l| l.contains("\"credential_use\"") && l.contains("api.openai.com")));
    s.assert_no_leak(OPENAI_KEY);
}

/// A running broker keeps API keys in memory, and must still follow the vault at once: a
/// replaced key is used on the very next request, a removed one is refused.
#[test]
fn a_running_broker_follows_broker_add_and_remove_at_once() {
    const SECOND_KEY: &str = "sk-test-second-openai-key-9876543210";
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::Text(200, "ok".into()));
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    let call = || {
        s.get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &auth)],
            false,
        )
    };
    let sent = |n: usize| {
        origin.requests()[n]
            .header("authorization")
            .map(str::to_string)
    };
    // Twice, so the second request is served from the broker's cache.
    for n in 0..2 {
        assert_eq!(call().status, 200);
        assert_eq!(sent(n), Some(format!("Bearer {OPENAI_KEY}")));
    }
    s.home.add("openai", SECOND_KEY);
    assert_eq!(call().status, 200);
    assert_eq!(
        sent(2),
        Some(format!("Bearer {SECOND_KEY}")),
        "the replaced key is used on the next request"
    );
    s.home.broker_ok(&["remove", "openai"]);
    let r = call();
    assert_eq!(r.status, 401, "a removed key is refused: {}", r.text());
    assert!(
        r.header("x-broker-error")
            .is_some_and(|e| e.contains("openai")),
        "{:?}",
        r.header("x-broker-error")
    );
    assert_eq!(origin.requests().len(), 3, "nothing reached the origin");
    s.assert_no_leak(SECOND_KEY);
}

#[test]
fn every_injection_style() {
    let ca = TestCa::new();
    let anthropic = demanding_origin(&ca, "api.anthropic.com", ANTHROPIC_KEY);
    let gemini = demanding_origin(&ca, "generativelanguage.googleapis.com", GEMINI_KEY);
    let github_api = demanding_origin(&ca, "api.github.com", GITHUB_KEY);
    let github_git = Origin::start(&ca, &["github.com"], |req| {
        Reply::Text(
            if req.header("authorization").is_some() {
                200
            } else {
                401
            },
            "refs".into(),
        )
    });
    let stripe = demanding_origin(&ca, "api.stripe.com", "Basic ");
    let s = setup(
        &ca,
        &[
            ("api.anthropic.com", anthropic.addr),
            ("generativelanguage.googleapis.com", gemini.addr),
            ("api.github.com", github_api.addr),
            ("github.com", github_git.addr),
            ("api.stripe.com", stripe.addr),
        ],
        &[
            ("anthropic", ANTHROPIC_KEY),
            ("gemini", GEMINI_KEY),
            ("github", GITHUB_KEY),
            ("stripe", STRIPE_KEY),
        ],
    );
    let catalog_ph = |name: &str| s.home.placeholder(name);

    // A provider header (x-api-key).
    let r = s.get(
        "api.anthropic.com",
        "/v1/messages",
        &[("x-api-key", ANTHROPIC_PH)],
        true,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        anthropic.requests()[0].header("x-api-key"),
        Some(ANTHROPIC_KEY)
    );

    // A query parameter, and the x-goog-api-key header.
    let gem_ph = catalog_ph("gemini");
    let r = s.get(
        "generativelanguage.googleapis.com",
        &format!("/v1beta/models?key={gem_ph}&alt=json"),
        &[],
        false,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        gemini.requests()[0].target,
        format!("/v1beta/models?key={GEMINI_KEY}&alt=json")
    );
    let r = s.get(
        "generativelanguage.googleapis.com",
        "/v1beta/models",
        &[("x-goog-api-key", &gem_ph)],
        false,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        gemini.requests()[1].header("x-goog-api-key"),
        Some(GEMINI_KEY)
    );

    // The `token` scheme.
    let gh_ph = catalog_ph("github");
    let r = s.get(
        "api.github.com",
        "/user",
        &[("authorization", &format!("token {gh_ph}"))],
        false,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        github_api.requests()[0].header("authorization"),
        Some(format!("token {GITHUB_KEY}").as_str())
    );

    // inject = "always": git smart-HTTP sends no credential; Basic x-access-token is added.
    let r = s.get(
        "github.com",
        "/org/repo.git/info/refs?service=git-upload-pack",
        &[],
        false,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let b64 = base64::engine::general_purpose::STANDARD;
    let expected = format!(
        "Basic {}",
        b64.encode(format!("x-access-token:{GITHUB_KEY}"))
    );
    assert_eq!(
        github_git.requests()[0].header("authorization"),
        Some(expected.as_str())
    );

    // Basic with the key as the username (curl -u sk_...:).
    let st_ph = catalog_ph("stripe");
    let basic = format!("Basic {}", b64.encode(format!("{st_ph}:")));
    let r = s.get(
        "api.stripe.com",
        "/v1/charges",
        &[("authorization", &basic)],
        false,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = format!("Basic {}", b64.encode(format!("{STRIPE_KEY}:")));
    assert_eq!(
        stripe.requests()[0].header("authorization"),
        Some(expected.as_str())
    );

    for key in [ANTHROPIC_KEY, GEMINI_KEY, GITHUB_KEY, STRIPE_KEY] {
        s.assert_no_leak(key);
    }
}

#[test]
fn placeholder_to_another_providers_host_is_never_swapped() {
    let ca = TestCa::new();
    let anthropic = Origin::start(&ca, &["api.anthropic.com"], |_| {
        Reply::Text(401, "bad key".into())
    });
    let s = setup(
        &ca,
        &[("api.anthropic.com", anthropic.addr)],
        &[("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    let r = s.get(
        "api.anthropic.com",
        "/v1/messages",
        &[("authorization", &auth), ("x-api-key", OPENAI_PH)],
        false,
    );
    assert_eq!(r.status, 401);
    let req = &anthropic.requests()[0];
    assert_eq!(
        req.header("authorization"),
        Some(auth.as_str()),
        "byte for byte"
    );
    assert_eq!(req.header("x-api-key"), Some(OPENAI_PH));
    let audit = wait_for_audit(&s.home, 1);
    assert!(
        audit
            .iter()
            .any(|l| l.contains("placeholder_to_foreign_host")),
        "{audit:?}"
    );
    s.assert_no_leak(OPENAI_KEY);
}

#[test]
fn sni_host_mismatch_is_refused() {
    let ca = TestCa::new();
    let origin = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    // TLS for api.openai.com, but the request names another host.
    let req = http::Request::builder()
        .uri("/v1/models")
        .header("host", "api.anthropic.com")
        .header("authorization", &auth)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let r = send(
        s.serve.addr_for("api.openai.com"),
        "api.openai.com",
        &s.ca_pem,
        false,
        req,
    )
    .expect("response");
    assert_eq!(r.status, 421);
    assert!(r
        .header("x-broker-error")
        .is_some_and(|h| h.contains("does not match")));
    assert!(origin.requests().is_empty());
    let audit = wait_for_audit(&s.home, 1);
    assert!(
        audit.iter().any(|l| l.contains("sni_host_mismatch")),
        "{audit:?}"
    );
}

/// A run has one fake address for all its managed hosts: the TLS server name picks the host
/// (its leaf, its route, its key), and a name the run does not manage, or none, gets no
/// certificate at all.
#[test]
fn the_sni_picks_the_host_on_the_runs_one_address() {
    let ca = TestCa::new();
    let openai = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let anthropic = demanding_origin(&ca, "api.anthropic.com", ANTHROPIC_KEY);
    let s = setup(
        &ca,
        &[
            ("api.openai.com", openai.addr),
            ("api.anthropic.com", anthropic.addr),
        ],
        &[("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)],
    );
    let addr = s.serve.run_addr();
    assert_eq!(s.serve.addr_for("api.openai.com"), addr);
    assert_eq!(s.serve.addr_for("api.anthropic.com"), addr);
    assert!(addr.ip().to_string().ends_with(".1"), "{addr}");

    for h2 in [false, true] {
        let r = send(
            addr,
            "api.anthropic.com",
            &s.ca_pem,
            h2,
            get(
                "api.anthropic.com",
                "/v1/models",
                &[("x-api-key", ANTHROPIC_PH)],
            ),
        )
        .expect("anthropic through the run's address");
        assert_eq!((r.status, r.text().as_str()), (200, "ok: key accepted"));
        let r = send(
            addr,
            "api.openai.com",
            &s.ca_pem,
            h2,
            get(
                "api.openai.com",
                "/v1/models",
                &[("authorization", &format!("Bearer {OPENAI_PH}"))],
            ),
        )
        .expect("openai through the run's address");
        assert_eq!((r.status, r.text().as_str()), (200, "ok: key accepted"));
    }
    assert_eq!(anthropic.requests().len(), 2);
    assert_eq!(openai.requests().len(), 2);
    // Each key went only to its own host.
    assert!(anthropic.requests().iter().all(
        |r| r.header("x-api-key") == Some(ANTHROPIC_KEY) && r.header("authorization").is_none()
    ));

    // An unmanaged name, a name the catalog knows but this run does not manage (AWS, in a
    // run without an AWS credential: the broker's CA could sign it, the run must not), and no
    // name at all (a client that connects by address sends no SNI): the handshake fails, no
    // certificate is sent, nothing is forwarded.
    for sni in [
        "example.com",
        "evil.openai.com.example",
        "sts.amazonaws.com",
        "127.77.1.1",
    ] {
        let err = send(addr, sni, &s.ca_pem, false, get("example.com", "/", &[]));
        assert!(err.is_err(), "{sni}: {err:?}");
        let message = err.err().unwrap_or_default();
        assert!(message.starts_with("tls:"), "{sni}: {message}");
    }
    assert_eq!(anthropic.requests().len() + openai.requests().len(), 4);
    // The unmanaged names are audited; the nameless one has nothing to record.
    let audit = s
        .home
        .audit_until(|a| broker_integration::count_events(a, "sni_host_mismatch") >= 3);
    let mismatches: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("sni_host_mismatch"))
        .collect();
    assert_eq!(mismatches.len(), 3, "{audit:?}");
    for sni in ["example.com", "sts.amazonaws.com"] {
        assert!(
            mismatches
                .iter()
                .any(|l| l.contains(&format!("\"sni\":\"{sni}\""))),
            "{sni}: {mismatches:?}"
        );
    }
    s.assert_no_leak(OPENAI_KEY);
    s.assert_no_leak(ANTHROPIC_KEY);
}

#[test]
fn server_sent_events_stream_event_by_event() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    let ca = TestCa::new();
    // Lock step: the origin sends event i only after the agent has received event i-1, so a
    // broker holding any event back stalls the stream (the origin waits 10 s, then says so).
    let delivered = Arc::new(AtomicUsize::new(0));
    let stalled = Arc::new(AtomicBool::new(false));
    let (d, st) = (delivered.clone(), stalled.clone());
    let origin = Origin::start(&ca, &["api.openai.com"], move |_| Reply::Sse {
        count: 5,
        delivered: d.clone(),
        stalled: st.clone(),
    });
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    for h2 in [false, true] {
        delivered.store(0, Ordering::SeqCst);
        let r = broker_integration::send_counting(
            s.serve.addr_for("api.openai.com"),
            "api.openai.com",
            &s.ca_pem,
            h2,
            get(
                "api.openai.com",
                "/v1/chat/completions",
                &[("authorization", &auth)],
            ),
            delivered.clone(),
        )
        .expect("response");
        assert_eq!(r.status, 200);
        assert_eq!(r.text().matches("data: event").count(), 5);
        assert!(
            !stalled.load(Ordering::SeqCst),
            "h2={h2}: the broker held an event back: {:?}",
            r.chunk_times
        );
        assert_eq!(
            r.chunk_times.len(),
            5,
            "h2={h2}: events were merged: {:?}",
            r.chunk_times
        );
    }
}

/// An upgrade to a protocol the broker does not parse is spliced as bytes, and the key is
/// overwritten in them even when the upstream writes it in two pieces.
#[test]
fn another_upgrade_is_bridged_with_the_swap_and_checked_as_bytes() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::RawEcho);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    let answers = rt.block_on(async {
        let tls = s.tls_http1("api.openai.com").await;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        let request = http::Request::builder()
            .uri("/v1/raw")
            .header("host", "api.openai.com")
            .header("authorization", format!("Bearer {OPENAI_PH}"))
            .header("connection", "Upgrade")
            .header("upgrade", "x-raw-echo")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 101);
        let mut io =
            hyper_util::rt::TokioIo::new(hyper::upgrade::on(response).await.expect("upgraded"));
        let mut answers = Vec::new();
        for line in ["hello through the broker\n", "whoami\n"] {
            io.write_all(line.as_bytes()).await.expect("write");
            let mut got = Vec::new();
            while !got.ends_with(b"\n") {
                let mut buf = [0u8; 512];
                let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf))
                    .await
                    .expect("answer in time")
                    .expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            answers.push(String::from_utf8(got).expect("utf8"));
        }
        answers
    });
    assert_eq!(answers[0], "hello through the broker\n");
    assert!(
        !answers[1].contains(OPENAI_KEY),
        "the key reached the agent in the stream"
    );
    assert!(
        answers[1].starts_with("you are Bearer [redacted-by-broker]"),
        "{}",
        answers[1]
    );
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    s.assert_no_leak(OPENAI_KEY);
}

#[test]
fn websocket_upgrade_is_bridged_with_the_swap() {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.openai.com"], |_| Reply::WebSocketEcho);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let tls = s.tls_http1("api.openai.com").await;
        let mut ws = broker_integration::websocket::open(tls, "/v1/realtime", OPENAI_PH).await;
        assert_eq!(
            broker_integration::websocket::round_trip(&mut ws, "hello through the broker").await,
            "hello through the broker"
        );
        // An upstream quoting the key in a frame: overwritten before the agent gets it.
        let quoted = broker_integration::websocket::round_trip(&mut ws, "whoami").await;
        assert!(
            !quoted.contains(OPENAI_KEY),
            "the key reached the agent in a frame"
        );
        assert!(
            quoted.starts_with("you are Bearer [redacted-by-broker]"),
            "{quoted}"
        );
        // The same quote in a fragmented message cut inside the key.
        let pieces = broker_integration::websocket::round_trip(&mut ws, "whoami in pieces").await;
        assert!(
            !pieces.contains(OPENAI_KEY),
            "the key reached the agent across fragments"
        );
        assert_eq!(pieces, quoted, "the whole message arrives, redacted");
    });
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
}

#[test]
fn upstream_failures_are_clear_and_the_broker_keeps_serving() {
    let ca = TestCa::new();
    // Down: a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    // Bad certificate: signed by a CA the broker does not trust.
    let other_ca = TestCa::new();
    let untrusted = Origin::start(&other_ca, &["api.anthropic.com"], |_| {
        Reply::Text(200, "should never be reached".into())
    });
    // Reset: the origin drops the connection mid-request.
    let reset = Origin::start(&ca, &["api.mistral.ai"], |_| Reply::Reset);
    let healthy = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let s = setup(
        &ca,
        &[
            ("api.groq.com", dead_addr),
            ("api.anthropic.com", untrusted.addr),
            ("api.mistral.ai", reset.addr),
            ("api.openai.com", healthy.addr),
        ],
        &[("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)],
    );

    let r = s.get("api.groq.com", "/openai/v1/models", &[], false);
    assert_eq!(r.status, 502);
    let e = r.header("x-broker-error").expect("x-broker-error");
    assert!(e.contains("cannot reach upstream api.groq.com"), "{e}");

    let r = s.get(
        "api.anthropic.com",
        "/v1/messages",
        &[("x-api-key", ANTHROPIC_PH)],
        false,
    );
    assert_eq!(r.status, 502);
    let e = r.header("x-broker-error").expect("x-broker-error");
    assert!(e.contains("certificate"), "{e}");
    assert!(
        untrusted.requests().is_empty(),
        "no request may reach an unverified upstream"
    );

    let r = s.get("api.mistral.ai", "/v1/models", &[], true);
    assert_eq!(r.status, 502);
    assert!(r
        .header("x-broker-error")
        .is_some_and(|e| e.contains("api.mistral.ai")));
    assert!(
        r.text().starts_with("broker: "),
        "one-line body: {}",
        r.text()
    );

    // Still serving.
    let r = s.get(
        "api.openai.com",
        "/v1/models",
        &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        false,
    );
    assert_eq!(r.status, 200);
    s.assert_no_leak(ANTHROPIC_KEY);
}

/// A request that left with the key and got no answer still used the key: it is audited, with
/// the 502 the agent got. One that never left (the certificate failed) is not a use.
#[test]
fn a_request_that_left_with_the_key_and_got_no_answer_is_audited() {
    let ca = TestCa::new();
    let reset = Origin::start(&ca, &["api.openai.com"], |_| Reply::Reset);
    let other_ca = TestCa::new();
    let untrusted = Origin::start(&other_ca, &["api.anthropic.com"], |_| {
        Reply::Text(200, "should never be reached".into())
    });
    let s = setup(
        &ca,
        &[
            ("api.openai.com", reset.addr),
            ("api.anthropic.com", untrusted.addr),
        ],
        &[("openai", OPENAI_KEY), ("anthropic", ANTHROPIC_KEY)],
    );
    let r = s.get(
        "api.anthropic.com",
        "/v1/messages",
        &[("x-api-key", ANTHROPIC_PH)],
        false,
    );
    assert_eq!(r.status, 502);
    let r = s.get(
        "api.openai.com",
        "/v1/models",
        &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        false,
    );
    assert_eq!(r.status, 502);
    assert_eq!(
        reset.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str()),
        "the key left"
    );
    let audit = s.home.audit_until(|a| a.contains("\"credential_use\""));
    let uses: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"credential_use\""))
        .collect();
    assert_eq!(uses.len(), 1, "{audit}");
    assert!(
        uses[0].contains("\"provider\":\"openai\"") && uses[0].contains("\"status\":502"),
        "{}",
        uses[0]
    );
    assert!(uses[0].contains("api.openai.com failed"), "{}", uses[0]);
    s.assert_no_leak(OPENAI_KEY);
    s.assert_no_leak(ANTHROPIC_KEY);
}

/// With no GitHub credential stored, GitHub behaves as without broker: git's anonymous
/// smart-HTTP request (which the github route would add the key to) and any request without
/// the placeholder reach github.com unchanged; one that sends the placeholder is told to add
/// the key.
#[test]
fn a_provider_without_a_stored_credential_gets_anonymous_requests_unchanged() {
    let ca = TestCa::new();
    let github = Origin::start(&ca, &["github.com"], |req| {
        match req.header("authorization") {
            None => Reply::Text(200, "public refs".into()),
            Some(_) => Reply::Text(401, "Bad credentials".into()),
        }
    });
    let s = setup(
        &ca,
        &[("github.com", github.addr)],
        &[("openai", OPENAI_KEY)],
    );
    for h2 in [false, true] {
        let r = s.get(
            "github.com",
            "/any/public-repo.git/info/refs?service=git-upload-pack",
            &[],
            h2,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "public refs");
    }
    assert!(
        github
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "a credential was added"
    );
    let placeholder = s.home.placeholder("github");
    let basic =
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{placeholder}"));
    let r = s.get(
        "github.com",
        "/any/public-repo.git/info/refs",
        &[("authorization", &format!("Basic {basic}"))],
        false,
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("x-broker-error"),
        Some("no credential for github: run 'broker add github'")
    );
    assert_eq!(
        github.requests().len(),
        2,
        "the placeholder request was forwarded"
    );
}

#[test]
fn missing_credential_and_plain_http_get_advice() {
    let ca = TestCa::new();
    let origin = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let mut s = setup(&ca, &[("api.openai.com", origin.addr)], &[]);
    let r = s.get(
        "api.openai.com",
        "/v1/models",
        &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        false,
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("x-broker-error"),
        Some("no credential for openai: run 'broker add openai'")
    );
    assert!(
        origin.requests().is_empty(),
        "nothing is forwarded without the credential"
    );
    // Without a placeholder, requests pass through unchanged.
    let r = s.get("api.openai.com", "/v1/models", &[], false);
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), "no valid key");

    // Plain http:// to a managed host.
    use std::io::{Read, Write};
    let mut tcp = broker_integration::connect_as_shim_blocking(s.serve.addr_for("api.openai.com"))
        .expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    tcp.write_all(b"GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
        .expect("write");
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("use https://"), "{answer}");
    assert!(s.serve.is_running());
}

/// Wait until the audit log has at least `n` lines (the writer is asynchronous).
fn wait_for_audit(home: &Home, n: usize) -> Vec<String> {
    let events = |audit: &str| -> Vec<String> {
        audit
            .lines()
            .filter(|l| !l.contains("credential_added"))
            .map(str::to_string)
            .collect()
    };
    events(&home.audit_until(|a| events(a).len() >= n))
}

#[test]
fn demo_swaps_with_ca_variables_scrubbed_and_preset() {
    for preset in [false, true] {
        let home = Home::new();
        let mut cmd = home.broker();
        cmd.arg("demo");
        if preset {
            broker_integration::preset_ca_vars(&mut cmd);
        }
        let out = broker_integration::run_bounded(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "preset={preset}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("LD_PRELOAD=libbroker.so"),
            "the demo must use the shim: {stdout}"
        );
        assert!(
            stdout.contains("ok: the origin got the real key"),
            "{stdout}"
        );
    }
}

#[test]
fn a_custom_provider_with_a_path_prefix_gets_its_key_only_under_that_path() {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &["api.acme.test"], |req| {
        Reply::Text(200, format!("{:?}", req.header("authorization")))
    });
    let home = Home::new();
    std::fs::create_dir_all(home.path().join("providers")).expect("dir");
    std::fs::write(
        home.path().join("providers/acme.toml"),
        r#"name = "acme"
display_name = "ACME"
env = ["ACME_API_KEY"]
placeholder = "acme-broker-placeholder-000000"
key_pattern = '^acme-[A-Za-z0-9-]{8,}$'
auth = "api_key"
[[routes]]
hosts = ["api.acme.test/v1"]
credential = [{ header = "authorization", scheme = "bearer" }]
"#,
    )
    .expect("write provider");
    home.add("acme", "acme-test-real-key-0123456789");
    let serve = Serve::start(&home, &ca, &[("api.acme.test", origin.addr)]);
    let s = Setup {
        ca_pem: serve.ca_pem(),
        home,
        serve,
    };
    let auth = "Bearer acme-broker-placeholder-000000";
    let r = s.get(
        "api.acme.test",
        "/v1/things",
        &[("authorization", auth)],
        false,
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some("Bearer acme-test-real-key-0123456789")
    );
    for path in ["/admin", "/v1/../admin", "/v1x"] {
        let r = s.get("api.acme.test", path, &[("authorization", auth)], false);
        assert_eq!(r.status, 200);
        let last = origin.requests().last().cloned().expect("request");
        assert_eq!(
            last.header("authorization"),
            Some(auth),
            "{path}: outside the prefix the placeholder stays"
        );
    }
    s.assert_no_leak("acme-test-real-key-0123456789");
}

/// An api.openai.com origin that quotes the credential back in a 401, as debug endpoints and
/// some errors do.
fn key_quoting_origin(ca: &TestCa) -> Origin {
    Origin::start(ca, &["api.openai.com"], |req| {
        Reply::Text(
            401,
            format!(
                "{{\"error\":\"invalid key: {}\"}}",
                req.header("authorization").unwrap_or_default()
            ),
        )
    })
}

#[test]
fn an_upstream_echoing_the_key_never_hands_it_to_the_agent() {
    let ca = TestCa::new();
    let origin = key_quoting_origin(&ca);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    for h2 in [false, true] {
        let r = s.get(
            "api.openai.com",
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
            h2,
        );
        assert_eq!(r.status, 401);
        assert!(
            !contains(&r.body, OPENAI_KEY),
            "h2={h2}: the echoed key reached the agent: {}",
            r.text()
        );
        assert!(
            r.text()
                .contains("invalid key: Bearer [redacted-by-broker]"),
            "{}",
            r.text()
        );
        if let Some(len) = r.header("content-length") {
            assert_eq!(
                len.parse::<usize>().expect("length"),
                r.body.len(),
                "content-length stays true"
            );
        }
    }
    s.assert_no_leak(OPENAI_KEY);
}

/// Whether an agent could decode 6 or more consecutive bytes of `key` from any run of base64
/// characters in `text` (either alphabet, any start, lenient about padding).
fn key_decodable_from(text: &str, key: &str) -> bool {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let lenient = GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let engines = [
        GeneralPurpose::new(&base64::alphabet::STANDARD, lenient),
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient),
    ];
    let text = text.as_bytes();
    let parts: Vec<&[u8]> = key.as_bytes().windows(6).collect();
    (0..text.len()).any(|start| {
        (start + 8..=text.len()).any(|end| {
            engines.iter().any(|engine| {
                engine
                    .decode(&text[start..end])
                    .is_ok_and(|bytes| parts.iter().any(|p| bytes.windows(6).any(|w| w == *p)))
            })
        })
    })
}

/// A Basic credential holds the key in base64, so an upstream quoting the header it got
/// (an error, a debug endpoint) would hand the agent the key in a form a plain search misses.
#[test]
fn an_upstream_quoting_a_basic_credential_never_hands_back_the_key_in_base64() {
    let ca = TestCa::new();
    let quote = |req: &broker_integration::OriginRequest| {
        Reply::Text(
            401,
            format!(
                "{{\"message\":\"Bad credentials\",\"got\":\"{}\"}}",
                req.header("authorization").unwrap_or_default()
            ),
        )
    };
    let github = Origin::start(&ca, &["github.com"], quote);
    let gitlab = Origin::start(&ca, &["gitlab.com"], quote);
    let s = setup(
        &ca,
        &[("github.com", github.addr), ("gitlab.com", gitlab.addr)],
        &[("github", GITHUB_KEY), ("gitlab", GITLAB_KEY)],
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    // git smart-HTTP to github.com: the broker adds Basic x-access-token:<key> itself.
    let r = s.get("github.com", "/org/repo.git/info/refs", &[], false);
    assert_eq!(r.status, 401);
    let sent = github.requests()[0]
        .header("authorization")
        .expect("injected")
        .to_string();
    assert!(r.text().contains("Bad credentials"), "{}", r.text());
    assert!(
        !r.text().contains(&sent[10..]) && !key_decodable_from(&r.text(), GITHUB_KEY),
        "the key can be decoded from the answer"
    );
    // gitlab.com: the agent picks the user name, which moves the key inside base64's groups.
    let gl_ph = s.home.placeholder("gitlab");
    for (i, user) in ["oauth2", "ab", "a"].into_iter().enumerate() {
        for h2 in [false, true] {
            let basic = format!("Basic {}", b64.encode(format!("{user}:{gl_ph}")));
            let r = s.get(
                "gitlab.com",
                "/group/repo.git/info/refs",
                &[("authorization", &basic)],
                h2,
            );
            assert_eq!(r.status, 401);
            let sent = gitlab.requests().last().cloned().expect("request");
            assert_eq!(
                sent.header("authorization"),
                Some(format!("Basic {}", b64.encode(format!("{user}:{GITLAB_KEY}"))).as_str()),
                "user {i}: swapped inside the base64"
            );
            assert!(
                !key_decodable_from(&r.text(), GITLAB_KEY),
                "user {user:?} h2={h2}: the key can be decoded from the answer"
            );
            if let Some(len) = r.header("content-length") {
                assert_eq!(len.parse::<usize>().expect("length"), r.body.len());
            }
        }
    }
    s.assert_no_leak(GITHUB_KEY);
    s.assert_no_leak(GITLAB_KEY);
}

/// An upgrade (WebSocket) request the upstream refuses gets an ordinary answer, and an error
/// there may quote the key like any other.
#[test]
fn a_refused_upgrade_that_quotes_the_key_is_redacted() {
    let ca = TestCa::new();
    let origin = key_quoting_origin(&ca);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let r = s.get(
        "api.openai.com",
        "/v1/realtime",
        &[
            ("authorization", &format!("Bearer {OPENAI_PH}")),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        false,
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        origin.requests()[0].header("upgrade"),
        Some("websocket"),
        "went out as an upgrade"
    );
    assert!(!contains(&r.body, OPENAI_KEY), "the key reached the agent");
    assert!(
        r.text()
            .contains("invalid key: Bearer [redacted-by-broker]"),
        "{}",
        r.text()
    );
    s.assert_no_leak(OPENAI_KEY);
}

#[test]
fn a_compressed_echo_of_the_key_is_decoded_and_redacted() {
    use std::io::Write as _;
    let ca = TestCa::new();
    // Quotes the credential back inside a gzip (or deflate) body, in the coding the request
    // accepts first.
    let origin = Origin::start(&ca, &["api.openai.com"], |req| {
        let accepted = req
            .header("accept-encoding")
            .unwrap_or_default()
            .to_string();
        let plain = format!(
            "{{\"error\":\"invalid key: {}\",\"accepted\":\"{accepted}\"}}",
            req.header("authorization").unwrap_or_default()
        );
        let coding = if accepted.starts_with("deflate") {
            "deflate"
        } else {
            "gzip"
        };
        let body = match coding {
            "gzip" => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(plain.as_bytes()).expect("gzip");
                e.finish().expect("gzip")
            }
            _ => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(plain.as_bytes()).expect("zlib");
                e.finish().expect("zlib")
            }
        };
        Reply::Encoded {
            status: 401,
            coding,
            body,
        }
    });
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    for (h2, accept, offered) in [
        (false, "gzip, deflate, br, zstd", "gzip, deflate"),
        (true, "deflate, br", "deflate"),
        (false, "gzip", "gzip"),
    ] {
        let r = s.get(
            "api.openai.com",
            "/v1/models",
            &[
                ("authorization", &format!("Bearer {OPENAI_PH}")),
                ("accept-encoding", accept),
            ],
            h2,
        );
        assert!(
            !contains(&r.body, OPENAI_KEY),
            "h2={h2} {accept}: the echoed key reached the agent"
        );
        assert_eq!(r.status, 401);
        // Decoded for the agent: plain bytes, no coding, a weak validator.
        assert_eq!(r.header("content-encoding"), None, "{accept}");
        assert_eq!(r.header("etag"), Some("W/\"v1\""), "{accept}");
        let text = r.text();
        assert!(
            text.contains("invalid key: Bearer [redacted-by-broker]"),
            "{accept}: {text}"
        );
        // The upstream was offered only codings the broker can decode.
        assert!(
            text.contains(&format!("\"accepted\":\"{offered}\"")),
            "{text}"
        );
    }
    // The answer to a refused upgrade (a WebSocket request the upstream turns down) too.
    let r = s.get(
        "api.openai.com",
        "/v1/realtime",
        &[
            ("authorization", &format!("Bearer {OPENAI_PH}")),
            ("accept-encoding", "gzip, br"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ],
        false,
    );
    assert_eq!(r.status, 401);
    assert!(
        !contains(&r.body, OPENAI_KEY),
        "upgrade: the echoed key reached the agent"
    );
    assert_eq!(r.header("content-encoding"), None);
    let text = r.text();
    assert!(
        text.contains("invalid key: Bearer [redacted-by-broker]")
            && text.contains("\"accepted\":\"gzip\""),
        "{text}"
    );
    s.assert_no_leak(OPENAI_KEY);
}

/// Upstream connections outlive requests: a keep-alive agent reuses one, a new agent
/// connection reuses what an ended one left, agent connections that stay open and take turns
/// share one, concurrent h2 streams each get one, and a connection the upstream closed while
/// idle costs the agent nothing.
#[test]
fn upstream_connections_are_reused_and_a_closed_one_costs_no_request() {
    let ca = TestCa::new();
    let origin = demanding_origin(&ca, "api.openai.com", OPENAI_KEY);
    let s = setup(
        &ca,
        &[("api.openai.com", origin.addr)],
        &[("openai", OPENAI_KEY)],
    );
    let auth = format!("Bearer {OPENAI_PH}");
    let requests = |n: usize| -> Vec<_> {
        (0..n)
            .map(|i| {
                get(
                    "api.openai.com",
                    &format!("/v1/models/{i}"),
                    &[("authorization", &auth)],
                )
            })
            .collect()
    };
    let on_one_connection = |n: usize, h2: bool| {
        let responses = send_on_one_connection(
            s.serve.addr_for("api.openai.com"),
            "api.openai.com",
            &s.ca_pem,
            h2,
            requests(n),
        )
        .expect("requests through the broker");
        for r in &responses {
            assert_eq!(r.status, 200, "h2={h2}: {}", r.text());
            assert!(!contains(&r.body, OPENAI_KEY));
        }
    };

    on_one_connection(5, false);
    assert_eq!(origin.connections_accepted(), 1, "five keep-alive requests");
    on_one_connection(3, false);
    assert_eq!(
        origin.connections_accepted(),
        1,
        "a second agent connection"
    );
    let taking_turns = send_taking_turns(
        s.serve.addr_for("api.openai.com"),
        "api.openai.com",
        &s.ca_pem,
        3,
        requests(6),
    )
    .expect("requests through the broker");
    assert!(taking_turns.iter().all(|r| r.status == 200));
    assert_eq!(
        origin.connections_accepted(),
        1,
        "three open agent connections taking turns"
    );

    on_one_connection(4, true);
    let concurrent = origin.connections_accepted();
    assert!((1..=4).contains(&concurrent), "{concurrent} connections");
    on_one_connection(4, true);
    // The first batch's connections are reused (how many streams overlap varies from run to run).
    let both = origin.connections_accepted();
    assert!(both <= 4, "{both} connections for two batches of 4");

    // The upstream closes its idle connections; the next requests go out on a new one.
    origin.close_connections();
    on_one_connection(3, false);
    assert_eq!(origin.connections_accepted(), both + 1);
    assert_eq!(origin.requests().len(), 5 + 3 + 6 + 4 + 4 + 3);
    let audit = wait_for_audit(&s.home, 25);
    assert_eq!(audit.len(), 25);
    s.assert_no_leak(OPENAI_KEY);
}
