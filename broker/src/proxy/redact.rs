//! Respond/redact: an upstream that echoes the credential (a debug endpoint, an error message
//! quoting the key) must not hand it to the agent. Every occurrence of the secret in the
//! response headers and body is overwritten with a marker of the same length, so
//! `Content-Length` stays true, while the body streams.
//!
//! Streaming without delaying events: only a chunk's tail that could be the start of the
//! secret is held back until the next chunk (or the end); ordinary text, such as an SSE
//! event ending in a blank line, passes through at once.
//!
//! A gzip/deflate body reaches this layer already decoded ([`super::decode`]). Limits: a body
//! in another coding (which the broker never offers upstream) is not inspected, and neither are
//! encodings of the secret (base64, percent-encoding).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use zeroize::Zeroizing;

use super::{BoxError, ProxyBody};

/// What the secret is replaced with (cut or repeated to the secret's length).
const MARKER: &[u8] = b"[redacted-by-broker]";

/// Overwrite the secret in header values.
pub fn redact_headers(headers: &mut HeaderMap, secret: &[u8]) {
    if secret.is_empty() {
        return;
    }
    for value in headers.values_mut() {
        if find(value.as_bytes(), secret, 0).is_some() {
            let mut bytes = value.as_bytes().to_vec();
            overwrite_all(&mut bytes, secret);
            if let Ok(new) = http::HeaderValue::from_bytes(&bytes) {
                *value = new;
            }
        }
    }
}

/// A body with every occurrence of `secret` overwritten.
pub struct RedactedBody {
    inner: ProxyBody,
    secret: Zeroizing<Vec<u8>>,
    /// Bytes held back because they might begin the secret.
    held: BytesMut,
    /// Trailers that arrived while bytes were held: sent right after those bytes.
    trailers: Option<HeaderMap>,
    done: bool,
}

impl RedactedBody {
    pub fn wrap(inner: ProxyBody, secret: &str) -> ProxyBody {
        use http_body_util::BodyExt as _;
        RedactedBody {
            inner,
            secret: Zeroizing::new(secret.as_bytes().to_vec()),
            held: BytesMut::new(),
            trailers: None,
            done: false,
        }
        .boxed()
    }

    /// Redact `held + chunk`, return what can be sent now, keep the possible secret start.
    fn process(&mut self, chunk: Bytes, last: bool) -> Bytes {
        if self.held.is_empty() && find(&chunk, &self.secret, 0).is_none() {
            // Nearly every chunk: nothing held, nothing to overwrite. It goes on as it came,
            // without a copy, less a tail that might begin the secret.
            let keep = if last {
                0
            } else {
                partial_suffix(&chunk, &self.secret)
            };
            self.held.extend_from_slice(&chunk[chunk.len() - keep..]);
            return chunk.slice(..chunk.len() - keep);
        }
        self.held.extend_from_slice(&chunk);
        overwrite_all(&mut self.held, &self.secret);
        let keep = if last {
            0
        } else {
            partial_suffix(&self.held, &self.secret)
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
                        let out = self.process(data, false);
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
                        redact_headers(&mut trailers, &self.secret);
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

/// Where `needle` next occurs in `haystack` at or after `from`. Only where its first byte is
/// (found by memchr's SIMD scan) is the rest compared: a compare at every position made a
/// 1 MiB response cost a million `memcmp` calls, and a full substring searcher costs more to
/// set up than a short response takes to scan.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let &first = needle.first()?;
    let rest = haystack.get(from..)?;
    let last_start = rest.len().checked_sub(needle.len())?;
    memchr::memchr_iter(first, &rest[..=last_start])
        .find(|&at| rest[at..at + needle.len()] == *needle)
        .map(|at| from + at)
}

pub(super) fn overwrite_all(bytes: &mut [u8], secret: &[u8]) {
    let mut from = 0;
    while let Some(at) = find(bytes, secret, from) {
        for (i, b) in bytes[at..at + secret.len()].iter_mut().enumerate() {
            *b = MARKER[i % MARKER.len()];
        }
        from = at + secret.len();
    }
}

/// The length of the longest suffix of `bytes` that is a proper prefix of `secret`.
pub(super) fn partial_suffix(bytes: &[u8], secret: &[u8]) -> usize {
    let Some(&first) = secret.first() else {
        return 0;
    };
    let max = secret.len().saturating_sub(1).min(bytes.len());
    let tail = &bytes[bytes.len() - max..];
    // Only where the secret's first byte is can a prefix of it start; the earliest such
    // place gives the longest suffix.
    memchr::memchr_iter(first, tail)
        .map(|start| tail.len() - start)
        .find(|&n| tail[tail.len() - n..] == secret[..n])
        .unwrap_or(0)
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
        let mut body = RedactedBody::wrap(inner, secret);
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
    fn partial_suffix_is_the_longest_proper_prefix_at_the_end() {
        let secret = b"abcab";
        assert_eq!(partial_suffix(b"xxab", secret), 2);
        assert_eq!(partial_suffix(b"xabca", secret), 4);
        assert_eq!(partial_suffix(b"abcab", secret), 2);
        assert_eq!(partial_suffix(b"xyz", secret), 0);
        assert_eq!(partial_suffix(b"", secret), 0);
        assert_eq!(partial_suffix(b"a", b""), 0);
    }

    #[test]
    fn headers_are_redacted() {
        let mut h = HeaderMap::new();
        h.insert("x-echo", format!("Bearer {SECRET}").parse().expect("v"));
        h.insert("x-other", "fine".parse().expect("v"));
        redact_headers(&mut h, SECRET.as_bytes());
        assert!(!h["x-echo"].to_str().expect("s").contains(SECRET));
        assert_eq!(h["x-other"], "fine");
    }
}
