//! Property tests: a key in any covered form ([`super::Needles`]), split anywhere across
//! chunks, never comes out of the streaming redactor, and the stream's length is kept.
//!
//! "Never comes out" is checked by a reference decoder written independently of
//! [`super::super::matcher`]: the output, with line breaks removed and every `%XX` and
//! `\u00XX` decoded, must hold neither the key, nor its hex, nor 6 consecutive bytes of it
//! decodable from base64.

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;

use super::{Needles, RedactedBody, StreamRedactor};
use std::sync::Arc;

/// The forms an upstream could echo the key in.
#[derive(Debug, Clone)]
enum Form {
    Plain,
    /// Each byte percent-encoded where the mask says, with hex digits in either case.
    Percent {
        mask: Vec<bool>,
        upper: bool,
    },
    /// Each byte as a JSON `\u00XX` escape where the mask says.
    Json {
        mask: Vec<bool>,
        upper: bool,
    },
    /// Hex, each digit's case from the mask (all lower, all upper, mixed).
    Hex {
        mask: Vec<bool>,
    },
    /// base64 of `prefix + key` (`Basic` credentials), wrapped every `width` characters from
    /// `column`, with `\n` or `\r\n`.
    Base64 {
        prefix: String,
        url_safe: bool,
        width: usize,
        column: usize,
        crlf: bool,
    },
}

fn encode(key: &[u8], form: &Form) -> Vec<u8> {
    let escape = |mask: &[bool], upper: bool, json: bool| -> Vec<u8> {
        let mut out = Vec::new();
        for (i, &b) in key.iter().enumerate() {
            if mask.get(i).copied().unwrap_or(false) {
                let hex = match upper {
                    true => format!("{b:02X}"),
                    false => format!("{b:02x}"),
                };
                let unit = match json {
                    true => format!("\\u00{hex}"),
                    false => format!("%{hex}"),
                };
                out.extend_from_slice(unit.as_bytes());
            } else {
                out.push(b);
            }
        }
        out
    };
    match form {
        Form::Plain => key.to_vec(),
        Form::Percent { mask, upper } => escape(mask, *upper, false),
        Form::Json { mask, upper } => escape(mask, *upper, true),
        Form::Hex { mask } => key
            .iter()
            .flat_map(|b| format!("{b:02x}").into_bytes())
            .enumerate()
            .map(|(i, c)| match mask.get(i % 64).copied().unwrap_or(false) {
                true => c.to_ascii_uppercase(),
                false => c,
            })
            .collect(),
        Form::Base64 {
            prefix,
            url_safe,
            width,
            column,
            crlf,
        } => {
            let mut input = prefix.as_bytes().to_vec();
            input.extend_from_slice(key);
            let text = match url_safe {
                true => URL_SAFE.encode(&input),
                false => STANDARD.encode(&input),
            };
            let mut out = Vec::new();
            let mut at = *column % width;
            for c in text.bytes() {
                if at == *width {
                    out.extend_from_slice(if *crlf { b"\r\n" } else { b"\n" });
                    at = 0;
                }
                out.push(c);
                at += 1;
            }
            out
        }
    }
}

fn form() -> impl Strategy<Value = Form> {
    let mask = proptest::collection::vec(any::<bool>(), 64);
    prop_oneof![
        Just(Form::Plain),
        (mask.clone(), any::<bool>()).prop_map(|(mask, upper)| Form::Percent { mask, upper }),
        (mask, any::<bool>()).prop_map(|(mask, upper)| Form::Json { mask, upper }),
        prop_oneof![
            Just(vec![false; 64]),
            Just(vec![true; 64]),
            proptest::collection::vec(any::<bool>(), 64),
        ]
        .prop_map(|mask| Form::Hex { mask }),
        (
            "[a-z0-9_-]{0,16}:?",
            any::<bool>(),
            prop_oneof![Just(64usize), Just(76usize)],
            0usize..76,
            any::<bool>()
        )
            .prop_map(|(prefix, url_safe, width, column, crlf)| Form::Base64 {
                prefix,
                url_safe,
                width,
                column,
                crlf,
            }),
    ]
}

/// The reference: what an agent could read back from `out`.
fn exposes(out: &[u8], key: &[u8]) -> bool {
    let joined: Vec<u8> = out
        .iter()
        .copied()
        .filter(|&b| b != b'\n' && b != b'\r')
        .collect();
    let text = String::from_utf8_lossy(&joined).into_owned();
    let mut decoded = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |s: &[u8]| u8::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            if let Some(b) = hex(&bytes[i + 1..i + 3]) {
                decoded.push(b);
                i += 3;
                continue;
            }
        }
        if bytes[i..].starts_with(b"\\u00") && i + 6 <= bytes.len() {
            if let Some(b) = hex(&bytes[i + 4..i + 6]) {
                decoded.push(b);
                i += 6;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let lower: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let has = |hay: &[u8], needle: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
    if has(&decoded, key) || has(&decoded.to_ascii_lowercase(), lower.as_bytes()) {
        return true;
    }
    // base64: every run of base64 characters, decoded at each of the 4 alignments.
    let is_b64 = |b: &u8| b.is_ascii_alphanumeric() || b"+/-_=".contains(b);
    for run in decoded.split(|b| !is_b64(b)).filter(|r| r.len() >= 8) {
        let run: Vec<u8> = run
            .iter()
            .map(|&b| match b {
                b'-' => b'+',
                b'_' => b'/',
                b => b,
            })
            .filter(|&b| b != b'=')
            .collect();
        for start in 0..4.min(run.len()) {
            let usable = (run.len() - start) / 4 * 4;
            if let Ok(bytes) = STANDARD.decode(&run[start..start + usable]) {
                if key.windows(6).any(|part| has(&bytes, part)) {
                    return true;
                }
            }
        }
    }
    false
}

/// `body` cut at `cuts` (positions, any order, repeats allowed).
fn chunks(body: &[u8], cuts: &[usize]) -> Vec<Bytes> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
    at.sort_unstable();
    at.dedup();
    let mut out = Vec::new();
    let mut last = 0;
    for cut in at.into_iter().chain([body.len()]) {
        out.push(Bytes::copy_from_slice(&body[last..cut]));
        last = cut;
    }
    out
}

/// What the response body redactor sends, fed `chunks` one by one.
fn through_body(needles: &Arc<Needles>, chunks: &[Bytes]) -> Vec<u8> {
    let mut body = RedactedBody {
        inner: http_body_util::BodyExt::boxed(http_body_util::Empty::new().map_err(|n| match n {})),
        needles: needles.clone(),
        held: bytes::BytesMut::new(),
        trailers: None,
        done: false,
    };
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&body.process(chunk.clone(), false));
    }
    out.extend_from_slice(&body.process(Bytes::new(), true));
    out
}

/// What the byte-stream redactor (upgraded connections) sends.
fn through_stream(needles: &Arc<Needles>, chunks: &[Bytes]) -> Vec<u8> {
    let mut stream = StreamRedactor::new(needles.clone());
    let mut out = Vec::new();
    for chunk in chunks {
        stream.feed(chunk, &mut out);
    }
    stream.finish(&mut out);
    out
}

use http_body_util::BodyExt as _;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_key_split_anywhere_in_any_covered_form_never_comes_out(
        key in "[A-Za-z0-9_-]{12,48}",
        form in form(),
        before in "[ .,:;!?(){}<>|#\n]{0,40}",
        after in "[ .,:;!?(){}<>|#\n]{0,40}",
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let key = key.as_bytes();
        let mut body = before.as_bytes().to_vec();
        body.extend_from_slice(&encode(key, &form));
        body.extend_from_slice(after.as_bytes());
        prop_assume!(exposes(&body, key), "the form as generated must expose the key");
        let needles = Arc::new(Needles::for_secret(key));
        let pieces = chunks(&body, &cuts);
        let whole = through_body(&needles, &[Bytes::from(body.clone())]);
        for out in [through_body(&needles, &pieces), through_stream(&needles, &pieces)] {
            prop_assert_eq!(out.len(), body.len());
            prop_assert!(!exposes(&out, key), "{:?} came out of {:?}", String::from_utf8_lossy(&out), form);
            prop_assert!(out.starts_with(before.as_bytes()) && out.ends_with(after.as_bytes()));
            prop_assert_eq!(&out, &whole, "chunking changed the result");
        }
    }
}
