//! Instructions the redaction costs per response, counted under callgrind (an ignored
//! test: `valgrind --tool=callgrind --toggle-collect='*cost*workload*' <test binary>
//! --ignored --exact proxy::redact::cost::...`; `scripts/bench-redaction` runs them).
use super::*;
use http_body_util::BodyExt as _;

const KEY: &str = "sk-bench-0123456789abcdefghijklmnopqrstuv";
const JSON_BODY: &str =
    r#"{"object":"list","data":[{"id":"gpt-bench","object":"model","owned_by":"bench"}]}"#;
const ROUNDS: usize = 2000;

fn body(needles: &Arc<Needles>) -> RedactedBody {
    RedactedBody {
        inner: http_body_util::Empty::new().map_err(|n| match n {}).boxed(),
        needles: needles.clone(),
        held: BytesMut::new(),
        trailers: None,
        done: false,
    }
}

#[inline(never)]
fn small_workload(needles: &Arc<Needles>, headers: &HeaderMap) -> usize {
    let mut sent = 0;
    for _ in 0..ROUNDS {
        let mut h = headers.clone();
        redact_headers(&mut h, needles);
        let mut b = body(needles);
        sent += b
            .process(Bytes::from_static(JSON_BODY.as_bytes()), false)
            .len();
        sent += b.process(Bytes::new(), true).len();
    }
    sent
}

/// The same answer as the real path sends it: hyper's body of known length says its one chunk
/// is the last, so nothing is held back.
#[inline(never)]
fn small_last_workload(needles: &Arc<Needles>, headers: &HeaderMap) -> usize {
    let mut sent = 0;
    for _ in 0..ROUNDS {
        let mut h = headers.clone();
        redact_headers(&mut h, needles);
        let mut b = body(needles);
        sent += b
            .process(Bytes::from_static(JSON_BODY.as_bytes()), true)
            .len();
    }
    sent
}

#[inline(never)]
fn large_workload(needles: &Arc<Needles>, text: &Bytes) -> usize {
    let mut sent = 0;
    for _ in 0..20 {
        let mut b = body(needles);
        for chunk in text.chunks(16 * 1024) {
            sent += b.process(text.slice_ref(chunk), false).len();
        }
        sent += b.process(Bytes::new(), true).len();
    }
    sent
}

#[test]
#[ignore]
fn cost_small_json_workload() {
    let needles = Arc::new(Needles::for_secret(KEY.as_bytes()));
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().expect("v"));
    headers.insert("content-length", "82".parse().expect("v"));
    headers.insert("date", "Fri, 04 Dec 2026 07:00:00 GMT".parse().expect("v"));
    assert_eq!(small_workload(&needles, &headers), ROUNDS * JSON_BODY.len());
}

#[test]
#[ignore]
fn cost_small_last_json_workload() {
    let needles = Arc::new(Needles::for_secret(KEY.as_bytes()));
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().expect("v"));
    headers.insert("content-length", "82".parse().expect("v"));
    headers.insert("date", "Fri, 04 Dec 2026 07:00:00 GMT".parse().expect("v"));
    assert_eq!(
        small_last_workload(&needles, &headers),
        ROUNDS * JSON_BODY.len()
    );
}

#[test]
#[ignore]
fn cost_large_json_workload() {
    // 256 KiB of chat-completion-like JSON: text with `\n` and `\"` escapes.
    let piece = r#"{"index":0,"delta":{"content":"Here is a line,\nand \"quoted\" text; 100% sure: 0x7f3a9c.\n"}},"#;
    let text = Bytes::from(piece.repeat(256 * 1024 / piece.len()));
    let needles = Arc::new(Needles::for_secret(KEY.as_bytes()));
    assert_eq!(large_workload(&needles, &text), 20 * text.len());
}
