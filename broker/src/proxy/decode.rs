//! Compressed responses to requests that carried a credential are decoded before they reach
//! the agent, so [`super::redact`] sees the plain bytes: an upstream echoing the key inside a
//! gzip body must not hand it over either.
//!
//! Two halves:
//! - the request's `Accept-Encoding` is narrowed to the codings the broker can decode
//!   (`gzip`, `deflate`, `identity`), so an upstream that follows HTTP never answers in
//!   another (`br`, `zstd`);
//! - a `gzip`/`deflate` response is inflated as it streams, and the agent gets it with no
//!   `Content-Encoding` (every HTTP client accepts that) and a weak `ETag` (it names another
//!   representation now).
//!
//! Inflating is bounded per step: input is fed in small slices, so a highly compressed chunk
//! never turns into one huge allocation.

use std::io::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, ETAG};
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame};

use super::{BoxError, ProxyBody};

/// Input bytes inflated per step (worst case ~1,000x that in output).
const SLICE: usize = 8 * 1024;

/// Codings the broker can decode, as they may appear in `Accept-Encoding`.
const DECODABLE: &[&str] = &["gzip", "x-gzip", "deflate", "identity"];

/// Keep only the codings the broker can decode in the request's `Accept-Encoding` (with their
/// q-values); `identity` when none is left. An absent header stays absent.
pub fn narrow_accept_encoding(headers: &mut HeaderMap) {
    let decodable = |item: &&str| {
        let coding = item.split(';').next().unwrap_or("").trim();
        DECODABLE.iter().any(|d| d.eq_ignore_ascii_case(coding))
    };
    // Per request: most clients ask for "gzip, deflate" already, so check before rebuilding.
    let all_decodable = headers.get_all(ACCEPT_ENCODING).iter().all(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').map(str::trim).all(|item| decodable(&item)))
    });
    if all_decodable {
        return;
    }
    let kept: Vec<&str> = headers
        .get_all(ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(decodable)
        .collect();
    let value = match kept.is_empty() {
        true => HeaderValue::from_static("identity"),
        false => HeaderValue::from_str(&kept.join(", "))
            .unwrap_or_else(|_| HeaderValue::from_static("identity")),
    };
    headers.insert(ACCEPT_ENCODING, value);
}

/// The response's single content coding, when the broker decodes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
}

/// What the response's `Content-Encoding` means for redaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoded {
    /// No coding (or `identity`): the bytes are plain.
    Plain,
    /// One coding the broker decodes.
    Decodable(Coding),
    /// Anything else (`br`, several codings): it cannot be inspected.
    Opaque,
}

pub fn classify(headers: &HeaderMap) -> Encoded {
    if !headers.contains_key(CONTENT_ENCODING) {
        return Encoded::Plain;
    }
    let codings: Vec<String> = headers
        .get_all(CONTENT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    match codings.as_slice() {
        [] => Encoded::Plain,
        [one] if one == "gzip" || one == "x-gzip" => Encoded::Decodable(Coding::Gzip),
        [one] if one == "deflate" => Encoded::Decodable(Coding::Deflate),
        _ => Encoded::Opaque,
    }
}

/// Decode a response in `coding`: fix its headers and wrap its body.
pub fn decode(headers: &mut HeaderMap, body: ProxyBody, coding: Coding) -> ProxyBody {
    use http_body_util::BodyExt as _;
    headers.remove(CONTENT_ENCODING);
    headers.remove(CONTENT_LENGTH);
    if let Some(etag) = headers.get(ETAG) {
        if !etag.as_bytes().starts_with(b"W/") {
            let mut weak = b"W/".to_vec();
            weak.extend_from_slice(etag.as_bytes());
            if let Ok(weak) = HeaderValue::from_bytes(&weak) {
                headers.insert(ETAG, weak);
            }
        }
    }
    DecodedBody {
        inner: body,
        coding,
        inflater: None,
        input: Bytes::new(),
        trailers: None,
        eof: false,
        done: false,
    }
    .boxed()
}

/// One inflater, writing into a buffer the body drains.
enum Inflater {
    Gzip(GzDecoder<Vec<u8>>),
    Zlib(ZlibDecoder<Vec<u8>>),
    Raw(DeflateDecoder<Vec<u8>>),
}

impl Inflater {
    /// `deflate` is zlib-wrapped by the spec, raw by some servers: the first two bytes tell.
    fn new(coding: Coding, first: &[u8]) -> Inflater {
        match coding {
            Coding::Gzip => Inflater::Gzip(GzDecoder::new(Vec::new())),
            Coding::Deflate => {
                let zlib = first.len() >= 2
                    && first[0] & 0x0f == 8
                    && (u16::from(first[0]) << 8 | u16::from(first[1])) % 31 == 0;
                match zlib {
                    true => Inflater::Zlib(ZlibDecoder::new(Vec::new())),
                    false => Inflater::Raw(DeflateDecoder::new(Vec::new())),
                }
            }
        }
    }

    fn write(&mut self, input: &[u8]) -> std::io::Result<()> {
        match self {
            Inflater::Gzip(d) => d.write_all(input),
            Inflater::Zlib(d) => d.write_all(input),
            Inflater::Raw(d) => d.write_all(input),
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        match self {
            Inflater::Gzip(d) => d.try_finish(),
            Inflater::Zlib(d) => d.try_finish(),
            Inflater::Raw(d) => d.try_finish(),
        }
    }

    fn take_output(&mut self) -> Bytes {
        let out = match self {
            Inflater::Gzip(d) => d.get_mut(),
            Inflater::Zlib(d) => d.get_mut(),
            Inflater::Raw(d) => d.get_mut(),
        };
        Bytes::from(std::mem::take(out))
    }
}

struct DecodedBody {
    inner: ProxyBody,
    coding: Coding,
    /// Created on the first body byte (an empty body, e.g. for HEAD, needs none).
    inflater: Option<Inflater>,
    /// Compressed bytes not yet fed to the inflater.
    input: Bytes,
    trailers: Option<HeaderMap>,
    /// The upstream body ended (all input received).
    eof: bool,
    /// Everything sent but the trailers.
    done: bool,
}

fn corrupt(e: std::io::Error) -> BoxError {
    format!("the upstream's compressed body is corrupt: {e}").into()
}

impl DecodedBody {
    /// Whether pending input can be fed: `deflate` needs its first two bytes to tell zlib from
    /// raw before the inflater is made.
    fn ready_to_step(&self) -> bool {
        !self.input.is_empty()
            && (self.inflater.is_some()
                || self.coding == Coding::Gzip
                || self.input.len() >= 2
                || self.eof)
    }

    /// Feed one slice of pending input; what it inflated to (possibly nothing yet).
    fn step(&mut self) -> Result<Bytes, BoxError> {
        let n = self.input.len().min(SLICE);
        let slice = self.input.split_to(n);
        let coding = self.coding;
        let inflater = self
            .inflater
            .get_or_insert_with(|| Inflater::new(coding, &slice));
        inflater.write(&slice).map_err(corrupt)?;
        Ok(inflater.take_output())
    }

    /// The body ended: flush the inflater (a truncated stream is an error).
    fn finish(&mut self) -> Result<Bytes, BoxError> {
        match self.inflater.as_mut() {
            Some(inflater) => {
                inflater.finish().map_err(corrupt)?;
                Ok(inflater.take_output())
            }
            None => Ok(Bytes::new()),
        }
    }
}

impl Body for DecodedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.ready_to_step() {
                match self.step() {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
            if self.done {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            if self.eof {
                // All input fed: flush what the inflater still holds.
                self.done = true;
                match self.finish() {
                    Ok(out) if out.is_empty() => continue,
                    Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                    Err(e) => return Poll::Ready(Some(Err(e))),
                }
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if self.input.is_empty() => self.input = data,
                    Ok(data) => self.input = [&self.input[..], &data[..]].concat().into(),
                    // Trailers end the body.
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.eof = true;
                    }
                },
                Poll::Ready(None) => self.eof = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
    use flate2::Compression;
    use http_body_util::{BodyExt as _, StreamBody};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn accept_encoding_keeps_only_what_we_decode() {
        let narrowed = |v: &'static str| {
            let mut h = headers(&[("accept-encoding", v)]);
            narrow_accept_encoding(&mut h);
            h.get(ACCEPT_ENCODING)
                .expect("set")
                .to_str()
                .expect("ascii")
                .to_string()
        };
        assert_eq!(narrowed("gzip, deflate, br, zstd"), "gzip, deflate");
        assert_eq!(narrowed("br;q=1.0, GZIP;q=0.5"), "GZIP;q=0.5");
        assert_eq!(narrowed("br"), "identity");
        // Already decodable: left exactly as the client sent it.
        assert_eq!(narrowed("deflate;q=0.5,GZIP"), "deflate;q=0.5,GZIP");
        assert_eq!(narrowed("*"), "identity");
        let mut absent = HeaderMap::new();
        narrow_accept_encoding(&mut absent);
        assert!(absent.get(ACCEPT_ENCODING).is_none());
    }

    #[test]
    fn content_encoding_classified() {
        let c = |pairs: &[(&'static str, &'static str)]| classify(&headers(pairs));
        assert_eq!(c(&[]), Encoded::Plain);
        assert_eq!(c(&[("content-encoding", "identity")]), Encoded::Plain);
        assert_eq!(
            c(&[("content-encoding", "GZIP")]),
            Encoded::Decodable(Coding::Gzip)
        );
        assert_eq!(
            c(&[("content-encoding", "x-gzip")]),
            Encoded::Decodable(Coding::Gzip)
        );
        assert_eq!(
            c(&[("content-encoding", "deflate")]),
            Encoded::Decodable(Coding::Deflate)
        );
        assert_eq!(c(&[("content-encoding", "br")]), Encoded::Opaque);
        assert_eq!(c(&[("content-encoding", "gzip, gzip")]), Encoded::Opaque);
        assert_eq!(
            c(&[("content-encoding", "gzip"), ("content-encoding", "br")]),
            Encoded::Opaque
        );
    }

    fn compress(coding: &str, plain: &[u8]) -> Vec<u8> {
        match coding {
            "gzip" => {
                let mut e = GzEncoder::new(Vec::new(), Compression::default());
                e.write_all(plain).expect("gzip");
                e.finish().expect("gzip")
            }
            "zlib" => {
                let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
                e.write_all(plain).expect("zlib");
                e.finish().expect("zlib")
            }
            _ => {
                let mut e = DeflateEncoder::new(Vec::new(), Compression::default());
                e.write_all(plain).expect("deflate");
                e.finish().expect("deflate")
            }
        }
    }

    /// Decode `wire` sent in `chunk`-byte frames (then `trailers`); the data frames, the
    /// trailers seen, and the error if any.
    async fn run(
        coding: Coding,
        wire: &[u8],
        chunk: usize,
        trailers: Option<HeaderMap>,
    ) -> (Vec<Bytes>, Option<HeaderMap>, Option<String>) {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = wire
            .chunks(chunk.max(1))
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        let inner = StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let mut h = headers(&[
            ("content-encoding", "gzip"),
            ("content-length", "10"),
            ("etag", "\"abc\""),
        ]);
        let mut body = decode(&mut h, inner, coding);
        assert!(h.get(CONTENT_ENCODING).is_none() && h.get(CONTENT_LENGTH).is_none());
        assert_eq!(h.get(ETAG).expect("etag"), "W/\"abc\"");
        let (mut data, mut seen, mut error) = (Vec::new(), None, None);
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(d) => data.push(d),
                    Err(frame) => seen = frame.into_trailers().ok(),
                },
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        (data, seen, error)
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt")
    }

    fn joined(data: &[Bytes]) -> Vec<u8> {
        data.iter().flat_map(|b| b.iter().copied()).collect()
    }

    #[test]
    fn gzip_and_both_deflates_decode_in_any_chunking_with_trailers_kept() {
        let plain = b"{\"error\":\"bad key sk-test-secret-0123456789\"}\n".repeat(50);
        for (name, coding) in [
            ("gzip", Coding::Gzip),
            ("zlib", Coding::Deflate),
            ("raw", Coding::Deflate),
        ] {
            let wire = compress(name, &plain);
            for chunk in [1, 3, 64, wire.len()] {
                let trailers = headers(&[("x-checksum", "1")]);
                let (data, seen, error) = rt().block_on(run(coding, &wire, chunk, Some(trailers)));
                assert_eq!(error, None, "{name} chunk {chunk}");
                assert_eq!(joined(&data), plain, "{name} chunk {chunk}");
                assert_eq!(
                    seen.expect("trailers").get("x-checksum").expect("kept"),
                    "1"
                );
            }
        }
    }

    #[test]
    fn truncated_or_garbage_bodies_are_errors_and_empty_ones_are_empty() {
        let wire = compress("gzip", &b"hello world".repeat(100));
        let (_, _, error) = rt().block_on(run(Coding::Gzip, &wire[..wire.len() / 2], 16, None));
        assert!(error.expect("error").contains("corrupt"));
        let (_, _, error) = rt().block_on(run(Coding::Gzip, b"not gzip at all", 16, None));
        assert!(error.expect("error").contains("corrupt"));
        let (data, _, error) = rt().block_on(run(Coding::Gzip, b"", 16, None));
        assert_eq!((joined(&data), error), (Vec::new(), None));
    }

    #[test]
    fn a_highly_compressed_body_inflates_in_bounded_steps() {
        let plain = vec![0u8; 16 * 1024 * 1024];
        let wire = compress("gzip", &plain);
        let (data, _, error) = rt().block_on(run(Coding::Gzip, &wire, wire.len(), None));
        assert_eq!(error, None);
        assert_eq!(data.iter().map(Bytes::len).sum::<usize>(), plain.len());
        let biggest = data.iter().map(Bytes::len).max().unwrap_or(0);
        assert!(biggest <= SLICE * 1100, "one step inflated {biggest} bytes");
    }
}
