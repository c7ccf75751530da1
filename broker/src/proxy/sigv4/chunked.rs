//! `STREAMING-AWS4-HMAC-SHA256-PAYLOAD`: a body in `aws-chunked` framing where every chunk
//! carries a signature chained on the previous one (the request's signature seeds the chain).
//! The agent's chunks are signed with the placeholder secret; each is checked against that
//! chain and sent on with a signature of the real chain, chunk by chunk as the body streams.
//!
//! A chunk's new signature covers the chunk's hash, and its header comes before its data, so
//! one chunk at a time is held (SDKs send 8-128 KiB chunks; [`MAX_CHUNK`] is the bound). The
//! framing keeps its length: a signature is always 64 hex digits, so `Content-Length` and
//! `x-amz-decoded-content-length` stay right.

use bytes::{Buf as _, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use ring::hmac;

use super::signer::{chunk_signature, same_signature, Scope};
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
}

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
}

/// Where the parser is in the framing.
enum State {
    Header,
    Data { size: usize, signature: String },
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
                    let c = &self.chains;
                    let expected = chunk_signature(
                        &c.placeholder_key,
                        &c.amz_date,
                        &c.scope,
                        &c.placeholder_seed,
                        &data,
                    );
                    if !same_signature(&expected, signature) {
                        return Err(ChunkError::BadSignature);
                    }
                    let real =
                        chunk_signature(&c.real_key, &c.amz_date, &c.scope, &c.real_seed, &data);
                    let mut out = BytesMut::with_capacity(size + 100);
                    out.extend_from_slice(
                        format!("{size:x};chunk-signature={real}\r\n").as_bytes(),
                    );
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                    self.chains.placeholder_seed = expected;
                    self.chains.real_seed = real;
                    self.state = match size {
                        0 => State::Done,
                        _ => State::Header,
                    };
                    return Ok(Some(out.freeze()));
                }
            }
        }
    }
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
        let mut r = Resigner::new(chains());
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(split.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(chunk) = r.next_chunk(&mut buf)? {
                out.extend_from_slice(&chunk);
            }
        }
        assert!(r.is_done(), "the final chunk was seen");
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
