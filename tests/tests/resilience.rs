//! Holding up under hostile clients and upstreams (issue 19): connections that never send a
//! request are closed after the head timeout, one run flooding the broker with connections
//! does not deny service to another run, and an upstream that echoes the key in any covered
//! form (the reason phrase, percent-encoding of some of its bytes, hex, JSON `\u00XX`, base64
//! wrapped across lines) does not hand it to the agent.
//!
//! The timeouts are shortened for the tests (`--request-head-timeout`, `--idle-timeout`); each
//! test asserts only that a connection is closed, within a generous bound.

use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use broker_integration::{
    client_tls, connect_as_shim, contains, count_events, get, run_bounded, send, Home, Origin,
    OriginRequest, Reply, Serve, TestCa,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const OPENAI_KEY: &str = "sk-test-real-openai-key-resilience-0123456789";
const OPENAI_PH: &str = "sk-broker-placeholder-openai-0000000000000000";
const HOST: &str = "api.openai.com";
/// How long a closed connection may take to be seen closed: far above any timeout set here,
/// so a loaded machine does not fail the test, and a connection never closed does.
const CLOSED_WITHIN: Duration = Duration::from_secs(30);

fn serve(home: &Home, ca: &TestCa, origin: &Origin, extra: &[&str]) -> Serve {
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .arg("--resolve")
        .arg(format!("{HOST}:443:{}", origin.addr))
        .args(extra);
    Serve::spawn(home, cmd)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to the broker's listener for `HOST`, as a shimmed agent makes it.
async fn tls(serve: &Serve, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let tcp = connect_as_shim(serve.addr_for(HOST)).await?;
    tokio_rustls::TlsConnector::from(client_tls(&serve.ca_pem(), alpn))
        .connect(
            rustls_pki_types::ServerName::try_from(HOST.to_string()).expect("name"),
            tcp,
        )
        .await
}

/// Whether the broker closes `stream` within [`CLOSED_WITHIN`] (what it sent before, if any).
async fn closed(stream: &mut Tls) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(CLOSED_WITHIN, read).await.ok()?;
    Some(seen)
}

fn short_timeouts() -> [&'static str; 4] {
    ["--request-head-timeout", "0.5", "--idle-timeout", "0.5"]
}

#[test]
fn a_connection_that_finishes_tls_and_sends_nothing_is_closed() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, HOST, OPENAI_KEY, "models");
    let home = Home::new();
    let serve = serve(&home, &ca, &origin, &short_timeouts());
    runtime().block_on(async {
        for alpn in [&b"http/1.1"[..], b"h2"] {
            let mut idle = tls(&serve, &[alpn]).await.expect("tls");
            assert!(
                closed(&mut idle).await.is_some(),
                "an idle {} connection was still open after {CLOSED_WITHIN:?}",
                String::from_utf8_lossy(alpn)
            );
        }
        // HTTP/2 with the preface and settings sent, but no request.
        let mut quiet = tls(&serve, &[b"h2"]).await.expect("tls");
        quiet
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("preface");
        let said = closed(&mut quiet).await.expect("closed");
        // The broker's SETTINGS, then a GOAWAY (frame type 7) before it closed.
        assert!(said.len() > 9, "{said:?}");
    });
}

#[test]
fn a_half_sent_request_head_is_closed() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, HOST, OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = serve(&home, &ca, &origin, &short_timeouts());
    runtime().block_on(async {
        let mut slow = tls(&serve, &[b"http/1.1"]).await.expect("tls");
        slow.write_all(
            format!(
                "GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {OPENAI_PH}\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("half a head");
        slow.flush().await.expect("flush");
        assert!(
            closed(&mut slow).await.is_some(),
            "a connection with half a head was still open"
        );
    });
    assert!(origin.requests().is_empty(), "nothing went upstream");
}

#[test]
fn an_http2_connection_idle_after_its_requests_is_closed() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, HOST, OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = serve(&home, &ca, &origin, &short_timeouts());
    runtime().block_on(async {
        let stream = tls(&serve, &[b"h2"]).await.expect("tls");
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        let conn = tokio::spawn(conn);
        let mut request = get(
            HOST,
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        );
        *request.version_mut() = http::Version::HTTP_2;
        let response = sender.send_request(request).await.expect("response");
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"models");
        // The broker says GOAWAY and closes: the client's connection task ends.
        let ended = tokio::time::timeout(CLOSED_WITHIN, conn).await;
        assert!(ended.is_ok(), "an idle HTTP/2 connection was still open");
    });
}

/// A second run, joined to the running `broker serve`, whose agent makes one request with
/// curl. Without `--upstream-ca`/`--resolve` of its own (with them `broker run` embeds a broker
/// instead of joining), so only the daemon can reach the local origin.
fn request_from_another_run(home: &Home) -> String {
    let out = run_bounded(
        home.broker().stdin(Stdio::null()).args([
            "run",
            "--",
            "sh",
            "-c",
            "curl -sS --max-time 60 https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"",
        ]),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the other run: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn two_thousand_idle_connections_from_one_run_do_not_stop_another_runs_request() {
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, HOST, OPENAI_KEY, "models");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    // `broker serve` at a low descriptor limit (hard and soft), so the flood fills it quickly;
    // the head timeout long enough that the flood's connections stay for the whole test.
    let mut cmd = Command::new("bash");
    broker_integration::scrub(&mut cmd);
    cmd.env("BROKER_HOME", home.path())
        .env("BROKER_KEY_SOURCE", "file")
        .env("BROKER_LOG", "info")
        .args(["-c", "ulimit -n 512 && exec \"$@\"", "bash"])
        .arg(broker_integration::broker_bin())
        .args(["serve", "--upstream-ca"])
        .arg(&ca.pem_path)
        .arg("--resolve")
        .arg(format!("{HOST}:443:{}", origin.addr))
        .args(["--request-head-timeout", "600"])
        .stdin(Stdio::null());
    let mut serve = Serve::spawn(&home, cmd);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", serve.pid())).expect("limits");
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 512 ")),
        "{limits}"
    );

    // The daemon's own run (the one bare preloads use) opens 2,000 connections that finish
    // TLS and send nothing, as the issue's hostile agent does.
    let rt = runtime();
    let flood: Vec<Tls> = rt.block_on(async {
        let mut held = Vec::new();
        let mut tasks = tokio::task::JoinSet::new();
        let addr = serve.addr_for(HOST);
        let connector =
            tokio_rustls::TlsConnector::from(client_tls(&serve.ca_pem(), &[b"http/1.1"]));
        for i in 0..2000 {
            let connector = connector.clone();
            tasks.spawn(async move {
                let tcp = connect_as_shim(addr).await.ok()?;
                connector
                    .connect(
                        rustls_pki_types::ServerName::try_from(HOST.to_string()).expect("name"),
                        tcp,
                    )
                    .await
                    .ok()
            });
            if i % 64 == 63 {
                while let Some(done) = tasks.join_next().await {
                    held.extend(done.expect("task"));
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            held.extend(done.expect("task"));
        }
        held
    });
    assert!(serve.is_running(), "the broker survived the flood");

    // Another run's agent is served meanwhile.
    assert_eq!(request_from_another_run(&home), "models");

    // The flooding run itself is told why, in words its client can read.
    let refused = (0..150)
        .find_map(|_| {
            let answer = send(
                serve.addr_for(HOST),
                HOST,
                &serve.ca_pem(),
                false,
                get(
                    HOST,
                    "/v1/models",
                    &[("authorization", &format!("Bearer {OPENAI_PH}"))],
                ),
            );
            match answer {
                Ok(answer) => Some(answer),
                // A refusal told while too many others are: closed without a word; retry.
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(200));
                    None
                }
            }
        })
        .expect("an answer to the flooding run");
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert!(
        refused
            .header("x-broker-error")
            .is_some_and(|e| e.contains("the most one run may hold")),
        "{:?}",
        refused.headers
    );

    // Refusals are audited once per burst, not once per connection.
    let audit = home.audit_until(|a| count_events(a, "connection_limit") >= 1);
    let lines = count_events(&audit, "connection_limit");
    assert!(
        (1..10).contains(&lines),
        "{lines} connection_limit lines for ~2,000 refusals"
    );
    assert!(
        flood.len() < 2000,
        "not every connection can have been kept"
    );

    // Once the flood closes, the run is served again.
    drop(flood);
    let served = (0..150).find_map(|_| {
        let answer = send(
            serve.addr_for(HOST),
            HOST,
            &serve.ca_pem(),
            false,
            get(
                HOST,
                "/v1/models",
                &[("authorization", &format!("Bearer {OPENAI_PH}"))],
            ),
        )
        .ok()
        .filter(|a| a.status == 200);
        if answer.is_none() {
            std::thread::sleep(Duration::from_millis(200));
        }
        answer
    });
    assert_eq!(served.map(|a| a.text()), Some("models".to_string()));
    assert!(!contains(audit.as_bytes(), OPENAI_KEY));
}

/// Start an origin that answers every request with what `echo` makes of the key it received,
/// and a broker in front of it; send one request as the agent; the response as it came.
fn echoed(
    echo: impl Fn(&str) -> Reply + Send + Sync + 'static,
) -> broker_integration::ClientResponse {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &[HOST], move |req: &OriginRequest| {
        let key = req
            .header("authorization")
            .and_then(|a| a.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_string();
        echo(&key)
    });
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = serve(&home, &ca, &origin, &[]);
    let response = send(
        serve.addr_for(HOST),
        HOST,
        &serve.ca_pem(),
        false,
        get(
            HOST,
            "/v1/models",
            &[("authorization", &format!("Bearer {OPENAI_PH}"))],
        ),
    )
    .expect("response");
    assert_eq!(
        origin.requests()[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str()),
        "the origin got the key, so its echo holds it"
    );
    response
}

fn body_echo(body: String) -> Reply {
    Reply::Echo {
        status: 401,
        reason: None,
        headers: Vec::new(),
        body,
    }
}

/// The body came back as long as it was sent, with the echo overwritten.
fn assert_redacted(response: &broker_integration::ClientResponse, sent: &str, echo: &str) {
    let text = response.text();
    assert_eq!(text.len(), sent.len(), "{text}");
    assert!(!text.contains(echo), "the echo came back: {text}");
    assert!(!text.contains(OPENAI_KEY));
    assert!(text.contains("[redacted-by-br"), "{text}");
}

#[test]
fn the_upstreams_reason_phrase_never_reaches_the_agent() {
    let ca = TestCa::new();
    let origin = Origin::start(&ca, &[HOST], |req: &OriginRequest| Reply::Echo {
        status: 401,
        reason: Some(format!(
            "Rejected {}",
            req.header("authorization").unwrap_or_default()
        )),
        headers: Vec::new(),
        body: "no".into(),
    });
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let serve = serve(&home, &ca, &origin, &[]);
    let head = runtime().block_on(async {
        let mut stream = tls(&serve, &[b"http/1.1"]).await.expect("tls");
        stream
            .write_all(
                format!("GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {OPENAI_PH}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .expect("request");
        closed(&mut stream).await.expect("answered and closed")
    });
    let head = String::from_utf8_lossy(&head).into_owned();
    assert!(
        head.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "the canonical reason phrase, not the upstream's: {head}"
    );
    assert!(
        !head.contains("Rejected") && !head.contains(OPENAI_KEY),
        "{head}"
    );
}

#[test]
fn a_key_percent_encoded_in_part_in_a_header_is_redacted() {
    // Every other byte encoded, in both cases of hex digit, and the dashes.
    let encode = |key: &str| -> String {
        key.bytes()
            .enumerate()
            .map(|(i, b)| match (i % 2, i % 4, b) {
                (_, _, b'-') | (1, 1, _) => format!("%{b:02X}"),
                (1, _, _) => format!("%{b:02x}"),
                _ => (b as char).to_string(),
            })
            .collect()
    };
    let echo = encode(OPENAI_KEY);
    let response = echoed(move |key| Reply::Echo {
        status: 401,
        reason: None,
        headers: vec![("x-echo".into(), format!("key={}", encode(key)))],
        body: "no".into(),
    });
    let header = response.header("x-echo").expect("x-echo");
    assert_eq!(header.len(), "key=".len() + echo.len());
    assert!(
        !header.contains(&echo) && header.starts_with("key=[redacted-by-br"),
        "{header}"
    );
}

#[test]
fn a_key_in_lowercase_hex_is_redacted() {
    let hex = |key: &str| key.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    let sent = format!("{{\"debug\":\"{}\"}}", hex(OPENAI_KEY));
    let response = echoed(move |key| body_echo(format!("{{\"debug\":\"{}\"}}", hex(key))));
    assert_redacted(&response, &sent, &hex(OPENAI_KEY));
}

#[test]
fn a_key_in_uppercase_hex_is_redacted() {
    let hex = |key: &str| key.bytes().map(|b| format!("{b:02X}")).collect::<String>();
    let sent = format!("token=0x{}\n", hex(OPENAI_KEY));
    let response = echoed(move |key| body_echo(format!("token=0x{}\n", hex(key))));
    assert_redacted(&response, &sent, &hex(OPENAI_KEY));
}

#[test]
fn a_key_in_json_unicode_escapes_is_redacted() {
    // Every third byte as \u00XX, the way a JSON encoder that escapes some characters writes.
    let escape = |key: &str| -> String {
        key.bytes()
            .enumerate()
            .map(|(i, b)| match i % 3 {
                0 => format!("\\u00{b:02x}"),
                _ => (b as char).to_string(),
            })
            .collect()
    };
    let sent = format!(
        "{{\"error\":{{\"message\":\"bad key {}\"}}}}",
        escape(OPENAI_KEY)
    );
    let response = echoed(move |key| {
        body_echo(format!(
            "{{\"error\":{{\"message\":\"bad key {}\"}}}}",
            escape(key)
        ))
    });
    assert_redacted(&response, &sent, &escape(OPENAI_KEY));
}

/// `Basic` credentials for the key, in base64 wrapped at `width` with `eol`, as a PEM or MIME
/// body holds them.
fn wrapped_base64(key: &str, width: usize, eol: &str) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{key}"));
    let lines: Vec<&str> = text
        .as_bytes()
        .chunks(width)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    lines.join(eol)
}

fn base64_wrapped_test(width: usize, eol: &'static str) {
    let body = move |key: &str| {
        format!(
            "-----BEGIN CREDENTIALS-----{eol}{}{eol}-----END CREDENTIALS-----{eol}",
            wrapped_base64(key, width, eol)
        )
    };
    let sent = body(OPENAI_KEY);
    let wrapped = wrapped_base64(OPENAI_KEY, width, eol);
    assert!(
        wrapped.contains(eol),
        "the key's base64 is cut by a line break"
    );
    let response = echoed(move |key| body_echo(body(key)));
    assert_redacted(&response, &sent, &wrapped);
    // Joined again, no part of the key's base64 is left: at most the 20 characters of
    // `x-access-token:` and one cut at each end.
    let joined = response.text().replace(eol, "");
    let unwrapped = wrapped.replace(eol, "");
    assert!(
        !joined.contains(&unwrapped[22..unwrapped.len() - 2]),
        "{joined}"
    );
}

#[test]
fn a_key_in_base64_wrapped_at_64_columns_is_redacted() {
    base64_wrapped_test(64, "\n");
}

#[test]
fn a_key_in_base64_wrapped_at_76_columns_is_redacted() {
    base64_wrapped_test(76, "\r\n");
}

/// The descriptors `broker serve` keeps beside its client connections
/// (`limits::FD_RESERVE`): its own, and each joined run's (listeners, DNS responder, control
/// connection). The README's counts and the reserve's size rest on these: a change that gave a
/// run a listener per host pattern again (267 descriptors per run, once) would leave room for
/// no run at all, and fails here. With an AWS key stored too, a run manages every host pattern
/// of the catalog.
#[test]
fn joined_runs_cost_few_descriptors_and_fit_the_reserve() {
    use std::io::BufRead as _;
    if !broker_integration::is_root() {
        broker_integration::skip(
            "counting broker serve's descriptors needs root (the process is not dumpable)",
        );
        return;
    }
    const RUNS: usize = 4;
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, HOST, OPENAI_KEY, "x");
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let out = home.run_with_stdin(
        &["add", "aws"],
        "AKIADESCRIPTORTEST01\ndescriptorTestSecretAccessKey00000000000\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let serve = serve(&home, &ca, &origin, &[]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", serve.pid()))
            .expect("read broker serve's descriptors")
            .count()
    };
    // The fewest of ten readings over a second: a descriptor open for a moment (a vault read
    // on the blocking pool, a DNS forward) is not what a run costs.
    let settled = || {
        (0..10)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(100));
                fds()
            })
            .min()
            .expect("ten readings")
    };
    let base = settled();

    // Runs joined to serve, each held open (its agent waits on stdin) while counted.
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let mut cmd = home.broker();
        cmd.args(["run", "--", "sh", "-c", "echo started; read _ || true"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn broker run");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("read the agent's first line");
        assert_eq!(line.trim(), "started", "the run did not start its agent");
        runs.push(child);
    }
    let with_runs = settled();
    for mut child in runs {
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait for broker run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let per_run = (with_runs.saturating_sub(base)).div_ceil(RUNS);
    eprintln!("broker serve: {base} descriptors, {per_run} more per joined run");
    // README (Performance, descriptors): 24 for serve with its own run, 6 per joined run.
    assert!(base <= 40, "broker serve holds {base} descriptors");
    assert!(
        (1..=10).contains(&per_run),
        "a joined run costs {per_run} descriptors ({base} -> {with_runs} with {RUNS} runs)"
    );
    // The reserve's promise (limits.rs): room for about 35 runs at once beside the broker's own.
    let reserve = broker_cli::proxy::limits::FD_RESERVE;
    assert!(
        base + 35 * per_run <= reserve,
        "{base} + 35 runs x {per_run} descriptors exceed the reserve of {reserve}"
    );
}
