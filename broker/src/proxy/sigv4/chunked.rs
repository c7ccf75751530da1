//! `STREAMING-AWS4-HMAC-SHA256-PAYLOAD`: a body in `aws-chunked` framing where every chunk
//! carries a signature chained on the previous one (the request's signature seeds the chain).
//! The agent's chunks are signed with the placeholder secret; each is checked against that
//! chain and sent on with a signature of the real chain, chunk by chunk as the body streams.
//!
//! `STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER` adds trailing headers after the final (empty)
//! chunk, such as a checksum, with an `x-amz-trailer-signature` chained on the final chunk's:
//! it is checked and replaced the same way (the headers themselves pass as they came).
//!
//! A chunk's new signature covers the chunk's hash, and its header comes before its data, so
//! one chunk at a time is held (SDKs send 8-128 KiB chunks; [`MAX_CHUNK`] is the bound). The
//! framing keeps its length: a signature is always 64 hex digits, so `Content-Length` and
//! `x-amz-decoded-content-length` stay right.

use bytes::{Buf as _, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use ring::hmac;

use super::signer::{chunk_signature, same_signature, trailer_signature, Scope};
use crate::proxy::{BoxError, ProxyBody};

/// Largest chunk held while its signature is checked and replaced.
pub const MAX_CHUNK: usize = 8 * 1024 * 1024;
/// Longest chunk header line (`<hex size>;chunk-signature=<64 hex>`), with room for
/// extensions.
const MAX_HEADER: usize = 4096;

/// The two signature chains of one body: the agent's (placeholder key) and the upstream's
/// (real key).
pub struct Chains {
    pub amz_date: String,
    pub scope: Scope,
    pub placeholder_key: hmac::Key,
    pub placeholder_seed: String,
    pub real_key: hmac::Key,
    pub real_seed: String,
    /// Trailing headers with their own signature follow the final chunk (`-TRAILER`).
    pub trailer: bool,
}

/// The header that carries the trailing headers' signature.
const TRAILER_SIGNATURE: &str = "x-amz-trailer-signature";
/// Most trailing headers (SDKs send one checksum).
const MAX_TRAILERS: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("aws-chunked body: malformed chunk header")]
    BadHeader,
    #[error("aws-chunked body: a chunk of more than {MAX_CHUNK} bytes (the broker holds one chunk at a time to re-sign it)")]
    TooLarge,
    #[error("aws-chunked body: a chunk signature does not verify with the placeholder secret")]
    BadSignature,
    #[error("aws-chunked body: the body ended inside a chunk")]
    Truncated,
    #[error("aws-chunked body: data after the final chunk")]
    TrailingData,
    #[error("aws-chunked body: malformed trailing headers")]
    BadTrailer,
    #[error("aws-chunked body: the trailing headers carry no x-amz-trailer-signature")]
    UnsignedTrailer,
}

/// Where the parser is in the framing.
enum State {
    Header,
    Data {
        size: usize,
        signature: String,
    },
    /// After the final chunk of a `-TRAILER` body: the trailing header lines read so far,
    /// as they came (`name:value`), until the signature line.
    Trailers {
        lines: Vec<String>,
    },
    /// The trailing headers, re-signed, wait for the empty line that ends the body.
    TrailerEnd {
        out: BytesMut,
    },
    Done,
}

/// The re-signing state of one body: the framing parser and both chains.
pub struct Resigner {
    chains: Chains,
    state: State,
}

impl Resigner {
    pub fn new(chains: Chains) -> Resigner {
        Resigner {
            chains,
            state: State::Header,
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// The next re-signed chunk (header, data and CRLF) from the front of `buf`, if it holds a
    /// whole one; `Ok(None)` when more input is needed.
    pub fn next_chunk(&mut self, buf: &mut BytesMut) -> Result<Option<Bytes>, ChunkError> {
        loop {
            match &self.state {
                State::Done => {
                    return match buf.is_empty() {
                        true => Ok(None),
                        false => Err(ChunkError::TrailingData),
                    }
                }
                State::Header => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > MAX_HEADER {
                            return Err(ChunkError::BadHeader);
                        }
                        return Ok(None);
                    };
                    let line =
                        std::str::from_utf8(&buf[..end]).map_err(|_| ChunkError::BadHeader)?;
                    let (size, signature) = parse_header(line)?;
                    buf.advance(end + 2);
                    if size == 0 && self.chains.trailer {
                        // The final chunk has no data line of its own here: the trailing
                        // headers follow its header directly.
                        let real = self.resign(&[], &signature)?;
                        self.state = State::Trailers { lines: Vec::new() };
                        return Ok(Some(Bytes::from(format!("0;chunk-signature={real}\r\n"))));
                    }
                    self.state = State::Data { size, signature };
                }
                State::Data { size, signature } => {
                    let size = *size;
                    if buf.len() < size + 2 {
                        return Ok(None);
                    }
                    if &buf[size..size + 2] != b"\r\n" {
                        return Err(ChunkError::BadHeader);
                    }
                    let data = buf.split_to(size).freeze();
                    buf.advance(2);
                    let signature = signature.clone();
                    let real = self.resign(&data, &signature)?;
                    let mut out = BytesMut::with_capacity(size + 100);
                    out.extend_from_slice(
                        format!("{size:x};chunk-signature={real}\r\n").as_bytes(),
                    );
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    self.state = match size {
                        0 => State::Done,
                        _ => State::Header,
                    };
                    return Ok(Some(out.freeze()));
                }
                State::Trailers { .. } | State::TrailerEnd { .. } => {
                    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
                        if buf.len() > MAX_HEADER {
                            return Err(ChunkError::BadTrailer);
                        }
                        return Ok(None);
                    };
                    let line = std::str::from_utf8(&buf[..end])
                        .map_err(|_| ChunkError::BadTrailer)?
                        .to_string();
                    buf.advance(end + 2);
                    if let Some(out) = self.trailer_line(line)? {
                        return Ok(Some(out));
                    }
                }
            }
        }
    }

    /// Check `signature` (the agent's, on the placeholder chain) over `data`, move both
    /// chains on, and return the real chain's signature for it.
    fn resign(&mut self, data: &[u8], signature: &str) -> Result<String, ChunkError> {
        let c = &self.chains;
        let expected = chunk_signature(
            &c.placeholder_key,
            &c.amz_date,
            &c.scope,
            &c.placeholder_seed,
            data,
        );
        if !same_signature(&expected, signature) {
            return Err(ChunkError::BadSignature);
        }
        let real = chunk_signature(&c.real_key, &c.amz_date, &c.scope, &c.real_seed, data);
        self.chains.placeholder_seed = expected;
        self.chains.real_seed = real.clone();
        Ok(real)
    }

    /// One line of the trailing headers: kept until the signature line, which is checked and
    /// replaced; the empty line after it ends the body and releases them all.
    fn trailer_line(&mut self, line: String) -> Result<Option<Bytes>, ChunkError> {
        match std::mem::replace(&mut self.state, State::Done) {
            State::TrailerEnd { mut out } if line.is_empty() => {
                out.extend_from_slice(b"\r\n");
                Ok(Some(out.freeze()))
            }
            State::TrailerEnd { .. } => Err(ChunkError::BadTrailer),
            State::Trailers { .. } if line.is_empty() => Err(ChunkError::UnsignedTrailer),
            State::Trailers { mut lines } => {
                let (name, value) = line.split_once(':').ok_or(ChunkError::BadTrailer)?;
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ChunkError::BadTrailer);
                }
                if !name.eq_ignore_ascii_case(TRAILER_SIGNATURE) {
                    if lines.len() == MAX_TRAILERS {
                        return Err(ChunkError::BadTrailer);
                    }
                    lines.push(line);
                    self.state = State::Trailers { lines };
                    return Ok(None);
                }
                let canonical = canonical_trailers(&lines);
                let c = &self.chains;
                let expected = trailer_signature(
                    &c.placeholder_key,
                    &c.amz_date,
                    &c.scope,
                    &c.placeholder_seed,
                    &canonical,
                );
                if !same_signature(&expected, &value.trim().to_ascii_lowercase()) {
                    return Err(ChunkError::BadSignature);
                }
                let real =
                    trailer_signature(&c.real_key, &c.amz_date, &c.scope, &c.real_seed, &canonical);
                let mut out = BytesMut::new();
                for kept in &lines {
                    out.extend_from_slice(kept.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(format!("{TRAILER_SIGNATURE}:{real}\r\n").as_bytes());
                self.state = State::TrailerEnd { out };
                Ok(None)
            }
            other => {
                self.state = other;
                Err(ChunkError::BadTrailer)
            }
        }
    }
}

/// The trailing headers as their signature covers them: `name:value\n`, names in lower
/// case and sorted, values trimmed.
fn canonical_trailers(lines: &[String]) -> String {
    let mut pairs: Vec<(String, &str)> = lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim()))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect()
}

/// `<hex size>;chunk-signature=<64 hex>`.
fn parse_header(line: &str) -> Result<(usize, String), ChunkError> {
    let (size, ext) = line.split_once(';').ok_or(ChunkError::BadHeader)?;
    let size = usize::from_str_radix(size.trim(), 16).map_err(|_| ChunkError::BadHeader)?;
    if size > MAX_CHUNK {
        return Err(ChunkError::TooLarge);
    }
    let signature = ext
        .trim()
        .strip_prefix("chunk-signature=")
        .ok_or(ChunkError::BadHeader)?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ChunkError::BadHeader);
    }
    Ok((size, signature.to_ascii_lowercase()))
}

/// `body` with every chunk re-signed as it streams. A chunk that fails its check ends the body
/// with an error, so the upstream sees a cut request, never a chunk the agent did not sign.
pub fn resign_body(body: ProxyBody, chains: Chains) -> ProxyBody {
    let start = (body, Resigner::new(chains), BytesMut::new(), false);
    let stream = futures_util::stream::try_unfold(
        start,
        |(mut body, mut resigner, mut buf, mut ended)| async move {
            loop {
                if let Some(chunk) = resigner.next_chunk(&mut buf).map_err(BoxError::from)? {
                    return Ok(Some((Frame::data(chunk), (body, resigner, buf, ended))));
                }
                if resigner.is_done() && ended {
                    return Ok(None);
                }
                if ended {
                    return Err(BoxError::from(ChunkError::Truncated));
                }
                match body.frame().await {
                    None => ended = true,
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            buf.extend_from_slice(&data);
                        }
                    }
                    Some(Err(e)) => return Err(e),
                }
            }
        },
    );
    StreamBody::new(stream).boxed()
}

#[cfg(test)]
mod tests {
    use super::super::signer::signing_key;
    use super::*;

    const PH_SECRET: &str = "placeholder-secret";
    const REAL_SECRET: &str = "real-secret";

    fn scope() -> Scope {
        Scope {
            date: "20130524".into(),
            region: "us-east-1".into(),
            service: "s3".into(),
        }
    }

    fn chains() -> Chains {
        Chains {
            amz_date: "20130524T000000Z".into(),
            scope: scope(),
            placeholder_key: signing_key(PH_SECRET, &scope()),
            placeholder_seed: "a".repeat(64),
            real_key: signing_key(REAL_SECRET, &scope()),
            real_seed: "b".repeat(64),
            trailer: false,
        }
    }

    /// A body framed and signed as an SDK would, with `secret` and `seed`.
    fn framed(secret: &str, seed: &str, chunks: &[&[u8]]) -> Vec<u8> {
        let key = signing_key(secret, &scope());
        let mut prev = seed.to_string();
        let mut out = Vec::new();
        for data in chunks.iter().copied().chain([&b""[..]]) {
            let sig = chunk_signature(&key, "20130524T000000Z", &scope(), &prev, data);
            out.extend_from_slice(format!("{:x};chunk-signature={sig}\r\n", data.len()).as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
            prev = sig;
        }
        out
    }

    fn run(input: &[u8], split: usize) -> Result<Vec<u8>, ChunkError> {
        feed(input, split, chains())
    }

    /// Feed `input` to a resigner in pieces of `split` bytes; what it sent on, once the body
    /// ended (an unfinished body is `Truncated`).
    fn feed(input: &[u8], split: usize, chains: Chains) -> Result<Vec<u8>, ChunkError> {
        let mut r = Resigner::new(chains);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(chunk) = r.next_chunk(&mut buf)? {
                out.extend_from_slice(&chunk);
            }
        }
        if !r.is_done() {
            return Err(ChunkError::Truncated);
        }
        Ok(out)
    }

    #[test]
    fn every_chunk_is_resigned_on_the_real_chain_whatever_the_read_sizes() {
        let chunks: [&[u8]; 3] = [&[b'x'; 65536], &[b'y'; 1000], b"z"];
        let agent = framed(PH_SECRET, &"a".repeat(64), &chunks);
        let expected = framed(REAL_SECRET, &"b".repeat(64), &chunks);
        for split in [1, 7, 4096, agent.len()] {
            assert_eq!(
                run(&agent, split).expect("resigned"),
                expected,
                "split {split}"
            );
        }
        assert_eq!(agent.len(), expected.len(), "Content-Length holds");
    }

    #[test]
    fn a_chunk_not_signed_with_the_placeholder_is_refused() {
        let chunks: [&[u8]; 1] = [b"data"];
        let other = framed("someone-else", &"a".repeat(64), &chunks);
        assert_eq!(run(&other, 5), Err(ChunkError::BadSignature));
        // A chunk from the right chain, but moved: the chain breaks.
        let agent = framed(PH_SECRET, &"a".repeat(64), &[b"one", b"two"]);
        let text = String::from_utf8(agent).expect("ascii");
        let swapped = text.replacen("one", "two", 1);
        assert_eq!(run(swapped.as_bytes(), 3), Err(ChunkError::BadSignature));
    }

    /// AWS's worked example for trailing headers (S3 API reference, "Signature calculations
    /// for trailing headers"): its example secret, seed signature, chunks of 65536 and 1024
    /// `a`s, and the final chunk's and the trailer's published signatures.
    #[test]
    fn aws_published_trailer_example() {
        let key = signing_key("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", &scope());
        let mut prev =
            "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e".to_string();
        for data in [&[b'a'; 65536][..], &[b'a'; 1024][..], &b""[..]] {
            prev = chunk_signature(&key, "20130524T000000Z", &scope(), &prev, data);
        }
        assert_eq!(
            prev,
            "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992"
        );
        assert_eq!(
            trailer_signature(
                &key,
                "20130524T000000Z",
                &scope(),
                &prev,
                &canonical_trailers(&["x-amz-checksum-crc32c:sOO8/Q==".into()]),
            ),
            "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435"
        );
    }

    /// A `-TRAILER` body as an SDK frames it: chunks, the final chunk's header, the trailing
    /// headers and their signature, the empty line.
    fn framed_with_trailers(
        secret: &str,
        seed: &str,
        chunks: &[&[u8]],
        trailers: &[&str],
    ) -> Vec<u8> {
        let key = signing_key(secret, &scope());
        let mut prev = seed.to_string();
        let mut out = Vec::new();
        for data in chunks.iter().copied().chain([&b""[..]]) {
            let sig = chunk_signature(&key, "20130524T000000Z", &scope(), &prev, data);
            out.extend_from_slice(format!("{:x};chunk-signature={sig}\r\n", data.len()).as_bytes());
            if !data.is_empty() {
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            prev = sig;
        }
        let lines: Vec<String> = trailers.iter().map(|t| t.to_string()).collect();
        let sig = trailer_signature(
            &key,
            "20130524T000000Z",
            &scope(),
            &prev,
            &canonical_trailers(&lines),
        );
        for line in &lines {
            out.extend_from_slice(format!("{line}\r\n").as_bytes());
        }
        out.extend_from_slice(format!("x-amz-trailer-signature:{sig}\r\n\r\n").as_bytes());
        out
    }

    fn run_trailer(input: &[u8], split: usize) -> Result<Vec<u8>, ChunkError> {
        let chains = Chains {
            trailer: true,
            ..chains()
        };
        feed(input, split, chains)
    }

    #[test]
    fn signed_trailers_are_checked_and_resigned_on_the_real_chain() {
        let chunks: [&[u8]; 2] = [&[b'x'; 70000], b"tail"];
        let trailers = [
            "x-amz-checksum-crc32:NSRBwg==",
            "X-Amz-Checksum-Sha256:abc=",
        ];
        let agent = framed_with_trailers(PH_SECRET, &"a".repeat(64), &chunks, &trailers);
        let expected = framed_with_trailers(REAL_SECRET, &"b".repeat(64), &chunks, &trailers);
        for split in [1, 9, 4096, agent.len()] {
            assert_eq!(
                run_trailer(&agent, split).expect("resigned"),
                expected,
                "split {split}"
            );
        }
        assert_eq!(agent.len(), expected.len(), "Content-Length holds");

        // A trailer changed after signing, one signed by someone else, none signed at all.
        let text = String::from_utf8(agent.clone()).expect("ascii");
        let changed = text.replace("NSRBwg==", "AAAAAA==");
        assert_eq!(
            run_trailer(changed.as_bytes(), 64),
            Err(ChunkError::BadSignature)
        );
        let other = framed_with_trailers("someone-else", &"a".repeat(64), &chunks, &trailers);
        assert_eq!(run_trailer(&other, 64), Err(ChunkError::BadSignature));
        let cut = text
            .find("x-amz-trailer-signature")
            .expect("signature line");
        let unsigned = format!("{}\r\n", &text[..cut]);
        assert_eq!(
            run_trailer(unsigned.as_bytes(), 64),
            Err(ChunkError::UnsignedTrailer)
        );
        // Nothing may follow the empty line.
        let mut more = agent;
        more.extend_from_slice(b"x");
        assert_eq!(run_trailer(&more, 64), Err(ChunkError::TrailingData));
    }

    #[test]
    fn malformed_framing_is_an_error() {
        let sig = "0".repeat(64);
        let big = format!("{:x};chunk-signature={sig}\r\n", MAX_CHUNK + 1);
        assert_eq!(
            run(big.as_bytes(), 10).expect_err("an error"),
            ChunkError::TooLarge
        );
        assert_eq!(
            run(b"zz;chunk-signature=00\r\n", 10).expect_err("an error"),
            ChunkError::BadHeader
        );
        let mut agent = framed(PH_SECRET, &"a".repeat(64), &[b"abc"]);
        agent.extend_from_slice(b"junk");
        assert_eq!(
            run(&agent, 100).expect_err("an error"),
            ChunkError::TrailingData
        );
    }
}
