//! Respond/redact: an upstream that echoes the credential (a debug endpoint, an error message
//! quoting the key) must not hand it to the agent. Every occurrence of the secret in the
//! response headers and body is overwritten with a marker of the same length, so
//! `Content-Length` stays true, while the body streams.
//!
//! Streaming without delaying events: only a chunk's tail that could be the start of the
//! secret is held back until the next chunk (or the end); ordinary text, such as an SSE
//! event ending in a blank line, passes through at once.
//!
//! The secret is looked for in the forms an echo may take ([`Needles`]): as it is, in base64
//! (an upstream quoting the `Authorization: Basic` header the broker sent holds the key in
//! base64 of `user:key`), in hex, and in each of these with any of its bytes percent-encoded
//! or JSON-escaped (`\u00XX`) and with line breaks between them (base64 wrapped at 64 or 76
//! characters): [`super::matcher`] decodes those on the fly.
//!
//! A gzip/deflate body reaches this layer already decoded ([`super::decode`]). Limits: a body
//! in another coding (which the broker never offers upstream) is not inspected, and neither is
//! an encoding not listed in [`Needles`] (a keyed transform, base32, a key cut into pieces).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use zeroize::Zeroizing;

use super::{matcher, BoxError, ProxyBody};

/// What the secret is replaced with (cut or repeated to the secret's length).
const MARKER: &[u8] = b"[redacted-by-broker]";

/// Text up to this long is searched for the secret in one pass ([`Needles::occur_in`]); longer
/// text needle by needle, with memchr, which costs more to set up and less per byte.
const ONE_PASS_MAX: usize = 256;

/// Below this length a secret is looked for only as it is: the encoded forms of a short string
/// are short enough to turn up by chance in ordinary text.
const MIN_ENCODED: usize = 12;

/// The byte strings an echo of one secret can take, each overwritten wherever it occurs, with
/// any of its bytes escaped and line breaks between them (see [`super::matcher`]):
/// - the secret;
/// - its base64, standard and URL-safe alphabets, at each of the three offsets a string can
///   have inside base64's 3-byte groups (`Basic base64("x-access-token:" + key)` puts the key
///   at offset 0, `Basic base64("user:" + key)` at 2). Only the characters that depend on the
///   secret alone are kept, so the match holds whatever bytes surround it; the one or two
///   characters cut at each end carry at most a byte of the key each;
/// - its hex, in either case (and mixed).
pub struct Needles {
    /// Each form, with how it is compared.
    list: Vec<(Zeroizing<Vec<u8>>, matcher::Mode)>,
    /// Whether escaped forms count: not for a secret shorter than [`MIN_ENCODED`].
    decode: bool,
    /// The first byte of each needle (both cases where case does not matter).
    firsts: matcher::ByteSet,
    /// For each byte value, the needles (bits, by index in `list`) an occurrence could start
    /// with there: those whose first byte it is, and every needle at `%` and `\` (where an
    /// escaped first byte starts) when escapes count. For [`Needles::occur_in`]'s short path.
    starts: [u8; 256],
    /// The length of the shortest needle.
    shortest: usize,
}

impl Needles {
    pub fn for_secret(secret: &[u8]) -> Needles {
        let decode = secret.len() >= MIN_ENCODED;
        let exact = matcher::Mode {
            decode,
            fold_case: false,
        };
        let mut list: Vec<(Zeroizing<Vec<u8>>, matcher::Mode)> = Vec::with_capacity(8);
        let mut add = |needle: Zeroizing<Vec<u8>>, mode| {
            if !needle.is_empty() && !list.iter().any(|(n, _)| *n == needle) {
                list.push((needle, mode));
            }
        };
        add(Zeroizing::new(secret.to_vec()), exact);
        if decode {
            for offset in 0..3 {
                add(base64_core(&STANDARD_NO_PAD, secret, offset), exact);
                add(base64_core(&URL_SAFE_NO_PAD, secret, offset), exact);
            }
            // One needle, lowercase, compared without case: upper, lower and mixed hex.
            let digits = b"0123456789abcdef";
            let mut hex = Zeroizing::new(Vec::with_capacity(secret.len() * 2));
            for &b in secret {
                hex.push(digits[usize::from(b >> 4)]);
                hex.push(digits[usize::from(b & 15)]);
            }
            let folded = matcher::Mode {
                decode,
                fold_case: true,
            };
            add(hex, folded);
        }
        let firsts = matcher::ByteSet::of(list.iter().flat_map(|(n, mode)| {
            let first = n.first().copied().unwrap_or(0);
            let other = match mode.fold_case {
                true => first.to_ascii_uppercase(),
                false => first,
            };
            [first, other]
        }));
        let shortest = list.iter().map(|(n, _)| n.len()).min().unwrap_or(0);
        // At most eight forms (the secret, six base64 cores, the hex), one bit each; were there
        // more, `occur_in` would not take the one-pass path.
        let mut starts = [0u8; 256];
        for (i, (needle, mode)) in list.iter().enumerate().take(8) {
            let bit = 1u8 << i;
            let first = needle.first().copied().unwrap_or(0);
            starts[usize::from(first)] |= bit;
            if mode.fold_case {
                starts[usize::from(first.to_ascii_uppercase())] |= bit;
            }
            if mode.decode {
                starts[usize::from(b'%')] |= bit;
                starts[usize::from(b'\\')] |= bit;
            }
        }
        Needles {
            list,
            decode,
            firsts,
            starts,
            shortest,
        }
    }

    /// The secret itself (the first form).
    fn secret(&self) -> &[u8] {
        self.list.first().map_or(&[], |(n, _)| n.as_slice())
    }

    /// Where escaped bytes could start in `bytes` (none looked for when not decoding).
    fn escapes(&self, bytes: &[u8]) -> Vec<matcher::Escape> {
        match self.decode {
            true => matcher::escapes(bytes, &self.firsts),
            false => Vec::new(),
        }
    }

    /// Whether any form of the secret occurs in `bytes`.
    fn occur_in(&self, bytes: &[u8]) -> bool {
        // Every needle byte takes at least one byte of text: shorter text (most header values)
        // holds none, whatever its escapes.
        if bytes.len() < self.shortest {
            return false;
        }
        match bytes.len() <= ONE_PASS_MAX && self.list.len() <= 8 {
            true => self.occur_in_one_pass(bytes),
            false => self.occur_in_each(bytes),
        }
    }

    /// [`Needles::occur_in`] for short text: one pass over it, trying at each byte only the
    /// needles that could start there. An API's small JSON answer (81 bytes in the bench) cost
    /// about 1,900 instructions by [`Needles::occur_in_each`], whose memchr and candidate
    /// iterators are set up again for each of the five to eight needles; this about 1,260.
    fn occur_in_one_pass(&self, bytes: &[u8]) -> bool {
        for (at, &b) in bytes.iter().enumerate() {
            let could = self.starts[usize::from(b)];
            if could != 0 && self.one_starts_at(bytes, at, could) {
                return true;
            }
        }
        false
    }

    /// Whether one of the needles in `could` (bits, by index in `list`) occurs at `at`. Not
    /// inlined: the loop over the text stays a few instructions a byte.
    #[inline(never)]
    fn one_starts_at(&self, bytes: &[u8], at: usize, mut could: u8) -> bool {
        while could != 0 {
            let i = could.trailing_zeros() as usize;
            could &= could - 1;
            if let Some((needle, mode)) = self.list.get(i) {
                if let matcher::Outcome::Match(_) = matcher::match_at(bytes, at, needle, *mode) {
                    return true;
                }
            }
        }
        false
    }

    /// [`Needles::occur_in`] needle by needle, each candidate found by memchr: the faster way
    /// through longer text.
    fn occur_in_each(&self, bytes: &[u8]) -> bool {
        let escapes = self.escapes(bytes);
        self.list
            .iter()
            .any(|(n, mode)| matcher::next_match(bytes, n, 0, *mode, &escapes).is_some())
    }

    /// Overwrite every occurrence of every form.
    pub(super) fn overwrite_all(&self, bytes: &mut [u8]) {
        if bytes.len() < self.shortest {
            return;
        }
        let escapes = self.escapes(bytes);
        for (needle, mode) in &self.list {
            let mut from = 0;
            while let Some((at, end)) = matcher::next_match(bytes, needle, from, *mode, &escapes) {
                for (i, b) in bytes[at..end].iter_mut().enumerate() {
                    *b = MARKER[i % MARKER.len()];
                }
                from = end;
            }
        }
    }

    /// How many bytes at the end of `bytes` might begin a form of the secret.
    pub(super) fn partial_suffix(&self, bytes: &[u8]) -> usize {
        self.list
            .iter()
            .map(|(n, mode)| matcher::partial_len(bytes, n, *mode))
            .max()
            .unwrap_or(0)
    }
}

/// `text` for a log line or an error message, with every form ([`Needles`]) of each of
/// `secrets` overwritten (empty ones are skipped). For text that may quote a secret: a failing
/// credential command's stderr, an OAuth server's error description.
pub fn redact_text(text: &[u8], secrets: &[&[u8]]) -> String {
    let mut bytes = Zeroizing::new(text.to_vec());
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        Needles::for_secret(secret).overwrite_all(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Most secrets whose [`Needles`] are kept.
const CACHED_SECRETS: usize = 16;

/// The [`Needles`] of the secrets in use, built once per secret rather than once per request
/// (building them is about 10k instructions, a sixth of a request's path). Entries go oldest
/// first; each holds its secret, zeroed when it goes.
#[derive(Default)]
pub struct NeedleCache(Mutex<Vec<Arc<Needles>>>);

impl NeedleCache {
    pub fn get(&self, secret: &[u8]) -> Arc<Needles> {
        let mut cached = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(hit) = cached.iter().find(|n| n.secret() == secret) {
            return hit.clone();
        }
        let needles = Arc::new(Needles::for_secret(secret));
        if cached.len() == CACHED_SECRETS {
            cached.remove(0);
        }
        cached.push(needles.clone());
        needles
    }
}

/// The characters of `engine`'s encoding of `secret` placed `offset` bytes into a 3-byte group
/// that depend on the secret's bits only.
fn base64_core(engine: &impl Engine, secret: &[u8], offset: usize) -> Zeroizing<Vec<u8>> {
    let mut input = Zeroizing::new(Vec::with_capacity(offset + secret.len()));
    input.resize(offset, 0);
    input.extend_from_slice(secret);
    let encoded = Zeroizing::new(engine.encode(&*input));
    // Character i holds bits 6i..6i+6; the secret holds bits 8*offset..8*(offset+len).
    let start = (8 * offset).div_ceil(6);
    let end = 8 * (offset + secret.len()) / 6;
    Zeroizing::new(encoded.as_bytes()[start..end].to_vec())
}

/// Overwrite every form of the secret in header values.
pub fn redact_headers(headers: &mut HeaderMap, needles: &Needles) {
    for value in headers.values_mut() {
        if needles.occur_in(value.as_bytes()) {
            let mut bytes = Zeroizing::new(value.as_bytes().to_vec());
            needles.overwrite_all(&mut bytes);
            if let Ok(new) = http::HeaderValue::from_bytes(&bytes) {
                *value = new;
            }
        }
    }
}

/// A body with every occurrence of every form of the secret overwritten.
pub struct RedactedBody {
    inner: ProxyBody,
    needles: Arc<Needles>,
    /// Bytes held back because they might begin the secret.
    held: BytesMut,
    /// Trailers that arrived while bytes were held: sent right after those bytes.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl RedactedBody {
    pub fn wrap(inner: ProxyBody, needles: Arc<Needles>) -> ProxyBody {
        use http_body_util::BodyExt as _;
        RedactedBody {
            inner,
            needles,
            held: BytesMut::new(),
            trailers: None,
            done: false,
        }
        .boxed()
    }

    /// Redact `held + chunk`, return what can be sent now, keep the possible secret start.
    fn process(&mut self, chunk: Bytes, last: bool) -> Bytes {
        if self.held.is_empty() && !self.needles.occur_in(&chunk) {
            // Nearly every chunk: nothing held, nothing to overwrite. It goes on as it came,
            // without a copy, less a tail that might begin the secret.
            let keep = if last {
                0
            } else {
                self.needles.partial_suffix(&chunk)
            };
            self.held.extend_from_slice(&chunk[chunk.len() - keep..]);
            return chunk.slice(..chunk.len() - keep);
        }
        self.held.extend_from_slice(&chunk);
        self.needles.overwrite_all(&mut self.held);
        let keep = if last {
            0
        } else {
            self.needles.partial_suffix(&self.held)
        };
        let ready = self.held.len() - keep;
        self.held.split_to(ready).freeze()
    }
}

impl Body for RedactedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(trailers) = self.trailers.take() {
                self.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        // The last chunk (a body of known length, most API answers) holds
                        // nothing back: no tail to look for, nothing to send later.
                        let last = self.inner.is_end_stream();
                        let out = self.process(data, last);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body: flush the held bytes first, then the
                        // trailers, redacted.
                        let Ok(mut trailers) = frame.into_trailers() else {
                            continue;
                        };
                        redact_headers(&mut trailers, &self.needles);
                        self.trailers = Some(trailers);
                        let out = self.process(Bytes::new(), true);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                },
                Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
                Poll::Ready(None) => {
                    self.done = true;
                    let out = self.process(Bytes::new(), true);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || (self.held.is_empty() && self.trailers.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        // Same-length replacement keeps the exact size.
        self.inner.size_hint()
    }
}

/// The bytes of an upgraded connection whose protocol the broker does not parse (anything but
/// WebSocket), with every form of the secret overwritten. As in [`RedactedBody`], bytes are
/// held back only while they might begin a form of the secret.
pub struct StreamRedactor {
    needles: Arc<Needles>,
    held: Zeroizing<Vec<u8>>,
}

impl StreamRedactor {
    pub fn new(needles: Arc<Needles>) -> StreamRedactor {
        StreamRedactor {
            needles,
            held: Zeroizing::new(Vec::new()),
        }
    }

    /// Take `input` from the upstream; append to `out` what can go to the agent now.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.held.extend_from_slice(input);
        self.needles.overwrite_all(&mut self.held);
        let ready = self.held.len() - self.needles.partial_suffix(&self.held);
        out.extend_from_slice(&self.held[..ready]);
        self.held.drain(..ready);
    }

    /// The upstream closed: what is held goes out (it cannot be a whole form of the secret).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.held);
        self.held.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt as _, StreamBody};

    const SECRET: &str = "sk-test-secret-0123456789";

    async fn run(chunks: &[&str]) -> (Vec<Bytes>, String) {
        run_with(chunks, SECRET).await
    }

    async fn run_with(chunks: &[&str], secret: &str) -> (Vec<Bytes>, String) {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c.as_bytes()))))
            .collect();
        let inner = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut body = RedactedBody::wrap(inner, Arc::new(Needles::for_secret(secret.as_bytes())));
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("frame").into_data() {
                out.push(data);
            }
        }
        let all = out
            .iter()
            .flat_map(|b| b.iter().copied())
            .collect::<Vec<u8>>();
        (out, String::from_utf8(all).expect("utf8"))
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt")
    }

    #[test]
    fn secret_is_overwritten_with_same_length() {
        let (_, text) = rt().block_on(run(&[&format!("{{\"echo\":\"Bearer {SECRET}\"}}")]));
        assert!(!text.contains(SECRET));
        assert_eq!(
            text.len(),
            format!("{{\"echo\":\"Bearer {SECRET}\"}}").len()
        );
        assert!(text.contains("[redacted-by-broker]"));
    }

    #[test]
    fn secret_split_across_chunks_is_caught() {
        for split in 1..SECRET.len() {
            let (a, b) = SECRET.split_at(split);
            let (_, text) = rt().block_on(run(&["key=", a, b, " end"]));
            assert!(!text.contains(SECRET), "split at {split}: {text}");
            assert!(text.starts_with("key=") && text.ends_with(" end"));
        }
    }

    #[test]
    fn ordinary_events_are_not_held_back() {
        let (frames, _) = rt().block_on(run(&["data: one\n\n", "data: two\n\n"]));
        assert_eq!(
            frames,
            vec![Bytes::from("data: one\n\n"), Bytes::from("data: two\n\n")]
        );
    }

    #[test]
    fn a_possible_prefix_is_released_at_the_end() {
        let (_, text) = rt().block_on(run(&["ends with sk-te"]));
        assert_eq!(text, "ends with sk-te");
    }

    /// The reference: the whole body at once, searched position by position.
    fn redact_whole(body: &[u8], secret: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        let mut at = 0;
        while at + secret.len() <= out.len() {
            if out[at..at + secret.len()] == *secret {
                for (i, b) in out[at..at + secret.len()].iter_mut().enumerate() {
                    *b = MARKER[i % MARKER.len()];
                }
                at += secret.len();
            } else {
                at += 1;
            }
        }
        out
    }

    #[test]
    fn random_bodies_in_random_chunks_come_out_as_redacted_whole() {
        // Bodies built from pieces of the secret, so that partial and overlapping matches and
        // chunk edges inside the secret are common. The secret's first byte recurs in it, so a
        // chunk can end in several different beginnings of it.
        let secret = "aab-aabaab";
        let pieces = ["aab", "-", "a", "b", "aab-aab", secret, "x", "\n\n"];
        let mut rng = crate::test_rng::Rng::new(7);
        for round in 0..2_000 {
            let body = rng.text(&pieces, 12);
            let mut chunks = Vec::new();
            let mut rest = body.as_str();
            while !rest.is_empty() {
                let cut = 1 + rng.below(rest.len());
                chunks.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            let (_, text) = rt().block_on(run_with(&chunks, secret));
            let expected = redact_whole(body.as_bytes(), secret.as_bytes());
            assert!(
                text.as_bytes() == expected.as_slice(),
                "round {round}: {chunks:?} gave {text:?}"
            );
        }
    }

    #[test]
    fn a_byte_stream_in_random_chunks_comes_out_as_redacted_whole() {
        let secret = "aab-aabaab";
        let pieces = ["aab", "-", "a", "b", "aab-aab", secret, "x", "\n"];
        let mut rng = crate::test_rng::Rng::new(11);
        for round in 0..2_000 {
            let body = rng.text(&pieces, 12);
            let mut stream = StreamRedactor::new(Arc::new(Needles::for_secret(secret.as_bytes())));
            let mut out = Vec::new();
            let mut rest = body.as_bytes();
            while !rest.is_empty() {
                let cut = 1 + rng.below(rest.len());
                stream.feed(&rest[..cut], &mut out);
                rest = &rest[cut..];
            }
            stream.finish(&mut out);
            let expected = redact_whole(body.as_bytes(), secret.as_bytes());
            assert!(out == expected, "round {round}: {body:?}");
        }
    }

    #[test]
    fn partial_suffix_is_the_longest_proper_prefix_at_the_end() {
        let secret = b"abcab";
        assert_eq!(
            matcher::partial_len(b"xxab", secret, matcher::Mode::EXACT),
            2
        );
        assert_eq!(
            matcher::partial_len(b"xabca", secret, matcher::Mode::EXACT),
            4
        );
        assert_eq!(
            matcher::partial_len(b"abcab", secret, matcher::Mode::EXACT),
            2
        );
        assert_eq!(
            matcher::partial_len(b"xyz", secret, matcher::Mode::EXACT),
            0
        );
        assert_eq!(matcher::partial_len(b"", secret, matcher::Mode::EXACT), 0);
        assert_eq!(matcher::partial_len(b"a", b"", matcher::Mode::EXACT), 0);
    }

    /// Every run of base64 characters in `text`, decoded at every start (lenient about padding
    /// and trailing bits, both alphabets): what an agent could get back from it.
    fn base64_decodings(text: &[u8]) -> Vec<Vec<u8>> {
        use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
        let lenient = GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent);
        let engines = [
            GeneralPurpose::new(&base64::alphabet::STANDARD, lenient),
            GeneralPurpose::new(&base64::alphabet::URL_SAFE, lenient),
        ];
        let mut out = Vec::new();
        for start in 0..text.len() {
            for end in start + 2..=text.len() {
                for engine in &engines {
                    if let Ok(bytes) = engine.decode(&text[start..end]) {
                        out.push(bytes);
                    }
                }
            }
        }
        out
    }

    /// Whether 6 or more consecutive bytes of `secret` occur in `bytes`.
    fn holds_part_of(bytes: &[u8], secret: &[u8]) -> bool {
        secret
            .windows(6)
            .any(|part| bytes.windows(6).any(|w| w == part))
    }

    #[test]
    fn a_key_quoted_in_base64_is_overwritten_at_every_offset_and_in_both_alphabets() {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        // `?` and `>` make the two alphabets differ (`/` against `_`, `+` against `-`).
        for secret in [SECRET, "sk-with?and>in-it-0123456789", "abcdefghijkl"] {
            let needles = Needles::for_secret(secret.as_bytes());
            for user in ["", "a", "ab", "x-access-token", "oauth2", "u"] {
                let pair = format!("{user}:{secret}");
                for encoded in [STANDARD.encode(&pair), URL_SAFE.encode(&pair)] {
                    let mut body = format!("{{\"echo\":\"Basic {encoded}\"}}").into_bytes();
                    needles.overwrite_all(&mut body);
                    let text = String::from_utf8(body.clone()).expect("ascii");
                    assert!(text.contains("[redacted-by-br"), "{user:?}: {text}");
                    assert!(
                        !base64_decodings(&body)
                            .iter()
                            .any(|d| holds_part_of(d, secret.as_bytes())),
                        "{secret} after {user:?}: the key can be decoded from {text}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_text_is_searched_in_one_pass_as_needle_by_needle() {
        // `/`, `+` and `?` give the escapes and the two base64 alphabets something to differ on;
        // the second secret's hex starts with a letter (`c3`), in either case.
        for (seed, secret) in [(23, "sk-a/b+c?d0123"), (29, "\u{e9}k-a/b+c?d0123")] {
            one_pass_against_each(seed, secret);
        }
    }

    fn one_pass_against_each(seed: u64, secret: &str) {
        use base64::engine::general_purpose::{STANDARD, URL_SAFE};
        let needles = Needles::for_secret(secret.as_bytes());
        let hex: String = secret.bytes().map(|b| format!("{b:02X}")).collect();
        // The first character, whose bytes an escaped occurrence starts with, and the rest.
        let (head, rest) = secret.split_at(secret.chars().next().map_or(0, char::len_utf8));
        let escaped =
            |prefix: &str| -> String { head.bytes().map(|b| format!("{prefix}{b:02x}")).collect() };
        let slash = secret.find('/').unwrap_or(0);
        let forms = [
            secret.to_string(),
            STANDARD.encode(format!("u:{secret}")),
            URL_SAFE.encode(format!("ab:{secret}")),
            hex.clone(),
            hex.to_lowercase(),
            secret.replace('-', "%2D").replace('/', "%2f"),
            format!("{}{rest}", escaped("%")),
            format!("{}{rest}", escaped("\\u00")),
            format!("{}\\/{}", &secret[..slash], &secret[slash + 1..]),
            format!("{head}{}\r\n{}", &rest[..2], &rest[2..]),
        ];
        // Whole forms, their beginnings (which fail near the end), and the bytes around
        // escapes, so that both answers are common.
        let mut pieces: Vec<String> = Vec::new();
        for form in &forms {
            pieces.push(form.clone());
            for cut in [1, 3, 7, form.len() - 1] {
                pieces.push(String::from_utf8_lossy(&form.as_bytes()[..cut]).into_owned());
            }
        }
        for noise in [
            "%",
            "%2",
            "%73",
            "\\",
            "\\u00",
            "\\u0073",
            "\r\n",
            "\n",
            "x",
            "s",
            "{\"a\":1}",
        ] {
            pieces.push(noise.to_string());
        }
        let pieces: Vec<&str> = pieces.iter().map(String::as_str).collect();
        let mut rng = crate::test_rng::Rng::new(seed);
        let (mut found, mut not_found) = (0, 0);
        for round in 0..20_000 {
            let body = rng.text(&pieces, 8);
            let each = needles.occur_in_each(body.as_bytes());
            assert_eq!(
                needles.occur_in_one_pass(body.as_bytes()),
                each,
                "{secret:?}, round {round}: {body:?}"
            );
            match each {
                true => found += 1,
                false => not_found += 1,
            }
        }
        assert!(
            found > 1_000 && not_found > 1_000,
            "{secret:?}: {found} / {not_found}"
        );
    }

    #[test]
    fn percent_encoded_and_json_escaped_keys_are_overwritten() {
        let secret = "key/with+reserved=chars/0123";
        let needles = Needles::for_secret(secret.as_bytes());
        for echo in [
            "key%2Fwith%2Breserved%3Dchars%2F0123",
            "key%2fwith%2breserved%3dchars%2f0123",
            "key\\/with+reserved=chars\\/0123",
            secret,
        ] {
            let mut body = format!("error: {echo}.").into_bytes();
            needles.overwrite_all(&mut body);
            let text = String::from_utf8(body).expect("ascii");
            assert!(!text.contains(echo), "{echo}: {text}");
            assert!(text.starts_with("error: [redacted") && text.ends_with('.'));
        }
    }

    #[test]
    fn a_short_key_is_looked_for_only_as_it_is() {
        // The base64 of a 4-byte key would be 5 characters long: text of any kind holds those.
        let needles = Needles::for_secret(b"k3y!");
        assert_eq!(needles.list.len(), 1);
        let mut body = b"azN5 k3y%21 k3y!".to_vec();
        needles.overwrite_all(&mut body);
        assert_eq!(body, b"azN5 k3y%21 [red");
    }

    #[test]
    fn ordinary_text_and_other_base64_pass_unchanged() {
        use base64::engine::general_purpose::STANDARD;
        let needles = Needles::for_secret(SECRET.as_bytes());
        let other = STANDARD.encode("x-access-token:sk-test-other-key-9876543210");
        let text = format!("data: {{\"text\":\"hello, world\"}}\n\nBasic {other}\n");
        let mut body = text.clone().into_bytes();
        needles.overwrite_all(&mut body);
        assert_eq!(String::from_utf8(body).expect("ascii"), text);
    }

    #[test]
    fn base64_held_back_across_chunks_is_caught() {
        use base64::engine::general_purpose::STANDARD;
        let encoded = STANDARD.encode(format!("x-access-token:{SECRET}"));
        let body = format!("Basic {encoded} end");
        for split in 1..body.len() {
            let (a, b) = body.split_at(split);
            let (_, text) = rt().block_on(run(&[a, b]));
            assert!(!text.contains(&encoded[4..]), "split at {split}: {text}");
            assert_eq!(text.len(), body.len());
            assert!(
                text.starts_with("Basic ") && text.ends_with(" end"),
                "{text}"
            );
        }
    }

    #[test]
    fn needles_are_built_once_per_secret_and_the_oldest_go_first() {
        let cache = NeedleCache::default();
        let first = cache.get(SECRET.as_bytes());
        assert!(Arc::ptr_eq(&first, &cache.get(SECRET.as_bytes())));
        let other = cache.get(b"sk-another-secret-0123456789");
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(other.secret(), b"sk-another-secret-0123456789");
        for i in 0..CACHED_SECRETS {
            cache.get(format!("sk-filler-secret-{i:04}").as_bytes());
        }
        assert!(
            !Arc::ptr_eq(&first, &cache.get(SECRET.as_bytes())),
            "evicted"
        );
    }

    #[test]
    fn headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("x-echo", format!("Bearer {SECRET}").parse().expect("v"));
        h.insert("x-other", "fine".parse().expect("v"));
        redact_headers(&mut h, &Needles::for_secret(SECRET.as_bytes()));
        assert!(!h["x-echo"].to_str().expect("s").contains(SECRET));
        assert_eq!(h["x-other"], "fine");
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod cost;
