//! Fuzz targets for broker's parsers and redactors. Each takes arbitrary bytes and panics only
//! when an invariant breaks, so the same functions serve AFL++ (`src/bin`, through
//! `scripts/fuzz`), the corpus replay (`tests/corpus.rs`: every seed and every crash ever
//! found, on each test run) and the property tests (`tests/props.rs`).
//!
//! The invariants, beyond "never panics on any input":
//! - parsers that render what they parse give it back unchanged (shim config, handover);
//! - the placeholder swap puts the secret only where the provider's route says it goes;
//! - the redactors never let the secret out, however the upstream cuts its bytes;
//! - the DNS responder answers only with the run's fake address, under the query's id.

use broker_cli::providers::{Catalog, Injection, Provider};
use broker_contract::handover::{Handover, HandoverReply};
use broker_contract::ShimConfig;

/// A target: arbitrary bytes in, a panic only when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target, by the name `scripts/fuzz` and the corpus directories use.
pub const TARGETS: &[(&str, Target)] = &[
    ("shim_config", shim_config),
    ("provider_toml", provider_toml),
    ("control_request", control_request),
    ("audit_log", audit_log),
    ("swap", swap),
    ("redact_stream", redact_stream),
    ("redact_ws", redact_ws),
    ("dns_message", dns_message),
];

/// The shim's config file: parsed, rendered and parsed again, the same config.
pub fn shim_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ShimConfig::parse(text) {
        Ok(cfg) => {
            let again = ShimConfig::parse(&cfg.render())
                .unwrap_or_else(|e| panic!("a parsed config renders to one that fails: {e}"));
            assert_eq!(again, cfg, "render/parse round trip");
        }
        Err(e) => drop(e.to_string()),
    }
}

/// A provider definition (a custom provider file): valid ones parse the same twice, and the
/// placeholder fits the key pattern; errors render.
pub fn provider_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Provider::from_toml(text, "fuzz.toml") {
        Ok(p) => {
            assert!(
                p.key_matches(&p.placeholder),
                "placeholder outside key_pattern"
            );
            let again = Provider::from_toml(text, "fuzz.toml").expect("parses twice");
            assert_eq!(again, p);
        }
        Err(e) => drop(e.to_string()),
    }
}

/// What the control socket reads: a `broker run` JSON line, a shim's handover request, the
/// daemon's handover reply.
pub fn control_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for line in text.lines() {
        let _ = broker_cli::control::parse_open_run(line);
        if let Some(reply) = HandoverReply::parse(line) {
            let again = HandoverReply::parse(reply.render().trim_end_matches('\n'));
            assert_eq!(again.as_ref(), Some(&reply), "handover reply round trip");
        }
    }
    match Handover::parse(text) {
        Ok(handover) => {
            let again = Handover::parse(&handover.render()).expect("a parsed handover re-parses");
            assert!(again == handover, "handover round trip");
        }
        Err(e) => drop(e.to_string()),
    }
}

/// The audit log as `broker audit verify` reads it, under a fixed key: a log it accepts is
/// whole lines, and it counts them.
pub fn audit_log(data: &[u8]) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"broker fuzz audit key");
    match broker_cli::audit::verify_reader(std::io::Cursor::new(data), Some(&key), None) {
        Ok(report) => {
            let lines = data.iter().filter(|&&b| b == b'\n').count();
            assert!(
                data.is_empty() || data.ends_with(b"\n"),
                "accepted a torn line"
            );
            assert_eq!(report.lines, lines);
            assert_eq!(report.keyed + report.unkeyed, lines);
        }
        Err(e) => drop(e.to_string()),
    }
}

/// The secret the swap and redaction targets use: long enough for every encoded form.
pub const SECRET: &str = "sk-fuzz-REAL-secret/key+0123456789";

/// Header names a placeholder is put in by real clients.
const HEADERS: &[&str] = &[
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "proxy-authorization",
    "cookie",
    "private-token",
];

/// The placeholder scanner and swap on a request head made from `data`: the first byte picks
/// a built-in provider, then lines are header values (names cycle through [`HEADERS`]) and
/// the last line is the query. A line `PH` stands for the provider's placeholder, so the
/// fuzzer reaches the swap without guessing it. The secret must land only at the route's
/// injection points, and a request without the placeholder must be left alone (unless the
/// route injects always).
pub fn swap(data: &[u8]) {
    let catalog = Catalog::builtin();
    let providers = catalog.providers();
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let provider = &providers[usize::from(pick) % providers.len()];
    let Some(route) = provider.routes.first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest).replace("PH", &provider.placeholder);
    let mut lines: Vec<&str> = text.split('\n').collect();
    let query = lines.pop().unwrap_or_default();
    let mut headers = http::HeaderMap::new();
    for (i, line) in lines.iter().enumerate() {
        if let Ok(value) = http::HeaderValue::from_str(line) {
            headers.append(HEADERS[i % HEADERS.len()], value);
        }
    }
    let Ok(mut uri) = format!("/v1/x?{query}").parse::<http::Uri>() else {
        return;
    };
    let findings = broker_cli::proxy::swap::inspect(&catalog, provider, route, &headers, &uri);
    let (before_headers, before_uri) = (headers.clone(), uri.clone());
    let Ok(swapped) =
        broker_cli::proxy::swap::apply(provider, route, &mut headers, &mut uri, SECRET)
    else {
        return;
    };
    if !findings.needs_credential(route, &before_headers) {
        assert!(!swapped, "swapped without a placeholder");
    }
    if !swapped {
        assert_eq!(headers, before_headers, "headers changed without a swap");
        assert_eq!(uri, before_uri, "uri changed without a swap");
        return;
    }
    for (name, value) in &headers {
        let holds = value
            .as_bytes()
            .windows(SECRET.len())
            .any(|w| w == SECRET.as_bytes())
            || basic_holds_secret(value.as_bytes());
        let allowed = route
            .credential
            .iter()
            .any(|point| matches!(point, Injection::Header { name: n, .. } if n == name.as_str()));
        assert!(!holds || allowed, "the secret went into {name}");
    }
    let query_allowed = route
        .credential
        .iter()
        .any(|point| matches!(point, Injection::Query { .. }));
    let in_query = uri.query().unwrap_or("").contains(SECRET)
        || uri.query().unwrap_or("").contains("sk-fuzz-REAL");
    assert!(!in_query || query_allowed, "the secret went into the query");
}

/// Whether a `Basic` credential in `value` carries the secret.
fn basic_holds_secret(value: &[u8]) -> bool {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(value);
    text.split_whitespace()
        .filter_map(|word| base64::engine::general_purpose::STANDARD.decode(word).ok())
        .any(|decoded| {
            decoded
                .windows(SECRET.len())
                .any(|w| w == SECRET.as_bytes())
        })
}

/// Cut `body` into chunks at the positions `cuts` names (each taken modulo the length).
fn chunked<'a>(body: &'a [u8], cuts: &[u8]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * body.len() / 256)
        .collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for cut in at {
        out.push(&body[start..cut]);
        start = cut;
    }
    out.push(&body[start..]);
    out
}

/// Split `data` into (cut positions, text) at its first `|` (no `|`: no cuts).
fn cuts_and_text(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'|') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&[], data),
    }
}

/// The forms of [`SECRET`] an upstream's echo may take, each with the token that puts it in a
/// fuzzed body: as it is, every byte percent-encoded, hex (both cases), JSON `\u00XX`, base64.
fn secret_forms() -> Vec<(&'static str, Vec<u8>)> {
    use base64::Engine as _;
    let key = SECRET.as_bytes();
    let each = |f: &dyn Fn(u8) -> String| key.iter().map(|&b| f(b)).collect::<String>();
    vec![
        ("KEYPCT", each(&|b| format!("%{b:02X}")).into_bytes()),
        ("KEYHEX", each(&|b| format!("{b:02x}")).into_bytes()),
        ("KEYUHEX", each(&|b| format!("{b:02X}")).into_bytes()),
        ("KEYJSON", each(&|b| format!("\\u00{b:02x}")).into_bytes()),
        (
            "KEYB64",
            base64::engine::general_purpose::STANDARD
                .encode(key)
                .into_bytes(),
        ),
        ("KEY", key.to_vec()),
    ]
}

/// The streaming body redactor: a body made of `data`'s text with each token of
/// [`secret_forms`] replaced by its form of the secret, cut anywhere: no form comes out whole,
/// and the output keeps the body's length.
pub fn redact_stream(data: &[u8]) {
    let (cuts, text) = cuts_and_text(data);
    let forms = secret_forms();
    let mut body = String::from_utf8_lossy(text).into_owned();
    for (token, form) in &forms {
        body = body.replace(token, &String::from_utf8_lossy(form));
    }
    let body = body.into_bytes();
    let out = broker_cli::proxy::fuzzing::redact_stream(SECRET.as_bytes(), &chunked(&body, cuts));
    assert_eq!(out.len(), body.len(), "the body changed length");
    for (token, form) in &forms {
        assert!(
            !out.windows(form.len()).any(|w| w == form.as_slice()),
            "the secret came out ({token})"
        );
    }
}

/// The WebSocket redactor: unmasked server frames built from `data` (each `\n`-separated
/// piece a frame; its first byte picks text/binary/continuation/ping and FIN; `KEY` is the
/// secret), cut anywhere: the payloads that come out never hold the secret.
pub fn redact_ws(data: &[u8]) {
    let (cuts, text) = cuts_and_text(data);
    let mut wire = Vec::new();
    for piece in text.split(|&b| b == b'\n') {
        let Some((&kind, payload)) = piece.split_first() else {
            continue;
        };
        let payload = String::from_utf8_lossy(payload)
            .replace("KEY", SECRET)
            .into_bytes();
        let opcode = [1u8, 2, 0, 9][usize::from(kind & 3)];
        let fin = kind & 4 != 0 || opcode == 9;
        wire.push(u8::from(fin) << 7 | opcode);
        match payload.len() {
            n @ 0..=125 => wire.push(n as u8),
            n if n <= 0xffff => {
                wire.push(126);
                wire.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                wire.push(127);
                wire.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        wire.extend_from_slice(&payload);
    }
    let out = broker_cli::proxy::fuzzing::redact_ws(SECRET.as_bytes(), &chunked(&wire, cuts));
    for message in messages_of(&out) {
        assert!(
            !message
                .windows(SECRET.len())
                .any(|w| w == SECRET.as_bytes()),
            "the secret came out in a message"
        );
    }
}

/// The data messages in unmasked frames `wire`, each joined from its fragments (control
/// frames between them left out).
fn messages_of(mut wire: &[u8]) -> Vec<Vec<u8>> {
    let mut messages: Vec<Vec<u8>> = Vec::new();
    let mut open = false;
    while wire.len() >= 2 {
        let (fin, opcode) = (wire[0] & 0x80 != 0, wire[0] & 0x0f);
        let (len, head): (usize, usize) = match wire[1] & 0x7f {
            126 if wire.len() >= 4 => (usize::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
            127 if wire.len() >= 10 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&wire[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX),
                    10,
                )
            }
            126 | 127 => break,
            n => (usize::from(n), 2),
        };
        let Some(payload) = wire.get(head..head.saturating_add(len)) else {
            break;
        };
        if opcode < 8 {
            if opcode != 0 || !open {
                messages.push(Vec::new());
            }
            if let Some(message) = messages.last_mut() {
                message.extend_from_slice(payload);
            }
            open = !fin;
        }
        wire = &wire[head + len..];
    }
    messages
}

/// A datagram to a run's DNS responder (any local process can send one): an answer made by
/// the responder parses, carries the query's id, and holds no address but the run's fake
/// one; a forwarded query keeps the id.
pub fn dns_message(data: &[u8]) {
    use broker_cli::dns::answer::{answer_addresses, decide, Action, RunNames};
    let names = RunNames {
        slot: 9,
        hosts: vec!["api.openai.com".into(), "*.openai.azure.com".into()],
    };
    match decide(&names, data) {
        Action::Answer(reply) => {
            assert_eq!(
                reply.get(..2),
                data.get(..2),
                "the answer keeps the query's id"
            );
            let addresses = answer_addresses(&reply).expect("an answer made here parses");
            for ip in addresses {
                let v4 = match ip {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped(),
                };
                assert!(
                    v4 == Some(broker_contract::run_ipv4(9)),
                    "answered {ip}, not the run's fake address"
                );
            }
        }
        Action::Forward(query) => {
            assert_eq!(
                query.get(..2),
                data.get(..2),
                "a forwarded query keeps its id"
            );
        }
        Action::Drop => {}
    }
}
