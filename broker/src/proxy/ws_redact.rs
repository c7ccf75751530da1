//! The upstream-to-agent half of a WebSocket that was opened with a credential: the key is
//! overwritten inside each frame's payload, as [`super::redact`] does for response bodies.
//!
//! Frames are parsed (RFC 6455 section 5.2) so that bytes are held back only while they might
//! begin the key. A whole message in one frame keeps its header and length: at the end of the
//! frame everything goes out, so an interactive protocol is never stalled. A fragmented
//! message (FIN clear, then continuation frames) is re-fragmented, which RFC 6455 section 5.4
//! allows an intermediary when no extension is in use: the broker sends each run of payload
//! bytes that cannot begin the key as a fragment of its own and carries a possible key prefix
//! into the next fragment, so a key split across the upstream's frames is caught too. Control
//! frames in between pass at once. Same-length replacement keeps every message's length, and
//! the marker is ASCII, so text messages stay valid UTF-8.
//!
//! The upgrade request offers no extensions (no `permessage-deflate`), so payloads are plain.
//! Masked frames (a server must not send them) pass through as they are.

use std::sync::Arc;

use zeroize::Zeroizing;

use super::redact::Needles;

/// Where in the frame stream the next byte belongs.
enum State {
    /// Collecting a frame header (`need` bytes in total, known once the first two arrive).
    Header { need: usize },
    /// Inside a payload with this many bytes still to come.
    Payload { left: u64 },
}

/// The frame being read.
#[derive(Clone, Copy, Default)]
struct Frame {
    fin: bool,
    masked: bool,
    /// Part of a fragmented message: its payload goes out in the broker's own fragments.
    refragmented: bool,
}

const CONTINUATION: u8 = 0;
const TEXT: u8 = 1;
const BINARY: u8 = 2;

pub struct FrameRedactor {
    needles: Arc<Needles>,
    state: State,
    frame: Frame,
    header: Vec<u8>,
    /// Payload bytes of the current single-frame message not sent yet (they might begin the
    /// key).
    held: Zeroizing<Vec<u8>>,
    /// The fragmented message in progress: its opcode until its first fragment went out,
    /// then `CONTINUATION`.
    message: Option<u8>,
    /// Payload bytes of that message not sent yet (they might begin the key).
    carry: Zeroizing<Vec<u8>>,
}

impl FrameRedactor {
    pub fn new(needles: Arc<Needles>) -> FrameRedactor {
        FrameRedactor {
            needles,
            state: State::Header { need: 2 },
            frame: Frame::default(),
            header: Vec::with_capacity(14),
            held: Zeroizing::new(Vec::new()),
            message: None,
            carry: Zeroizing::new(Vec::new()),
        }
    }

    /// Take `input` from the upstream; append to `out` what can go to the agent now.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            match self.state {
                State::Header { need } => {
                    let n = (need - self.header.len()).min(input.len());
                    self.header.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    if self.header.len() == need {
                        self.header_progress();
                    }
                    if let State::Payload { left } = self.state {
                        if !self.frame.refragmented {
                            out.extend_from_slice(&self.header);
                        }
                        self.header.clear();
                        if left == 0 {
                            self.end_frame(out);
                        }
                    }
                }
                State::Payload { left } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    let left = left - n as u64;
                    self.state = State::Payload { left };
                    if self.frame.refragmented {
                        self.carry.extend_from_slice(&input[..n]);
                        self.needles.overwrite_all(&mut self.carry);
                        let keep = self.needles.partial_suffix(&self.carry);
                        if self.carry.len() > keep {
                            self.send_fragment(self.carry.len() - keep, false, out);
                        }
                    } else {
                        self.held.extend_from_slice(&input[..n]);
                        let masked = self.frame.masked;
                        if !masked {
                            self.needles.overwrite_all(&mut self.held);
                        }
                        let keep = match left == 0 || masked {
                            true => 0,
                            false => self.needles.partial_suffix(&self.held),
                        };
                        let ready = self.held.len() - keep;
                        out.extend_from_slice(&self.held[..ready]);
                        self.held.drain(..ready);
                    }
                    input = &input[n..];
                    if left == 0 {
                        self.end_frame(out);
                    }
                }
            }
        }
    }

    /// The upstream closed: whatever is held goes out as it is (it cannot be the whole key).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.message.is_some() && !self.carry.is_empty() {
            self.send_fragment(self.carry.len(), false, out);
        }
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&self.held);
        self.header.clear();
        self.held.clear();
    }

    /// The header bytes so far fix its full size; when they are all here, move to the payload.
    fn header_progress(&mut self) {
        let h = &self.header;
        let masked = h[1] & 0x80 != 0;
        let mask_len = if masked { 4 } else { 0 };
        let (ext, need) = match h[1] & 0x7f {
            126 => (2, 4 + mask_len),
            127 => (8, 10 + mask_len),
            _ => (0, 2 + mask_len),
        };
        if h.len() < need {
            self.state = State::Header { need };
            return;
        }
        let left = match ext {
            2 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            8 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            _ => u64::from(h[1] & 0x7f),
        };
        let fin = h[0] & 0x80 != 0;
        let opcode = h[0] & 0x0f;
        // A text or binary frame without FIN starts a fragmented message; continuations
        // belong to the one in progress. Anything else (control frames, a stray
        // continuation, masked frames) passes with its own header.
        let refragmented = !masked
            && match opcode {
                TEXT | BINARY => !fin && self.message.is_none(),
                CONTINUATION => self.message.is_some(),
                _ => false,
            };
        if refragmented && opcode != CONTINUATION {
            self.message = Some(opcode);
        }
        self.frame = Frame {
            fin,
            masked,
            refragmented,
        };
        self.state = State::Payload { left };
    }

    fn end_frame(&mut self, out: &mut Vec<u8>) {
        if self.frame.refragmented && self.frame.fin {
            // The message's last frame: everything carried goes out, with FIN.
            self.send_fragment(self.carry.len(), true, out);
            self.message = None;
        }
        self.state = State::Header { need: 2 };
    }

    /// Send the first `n` carried bytes as a fragment of the message in progress.
    fn send_fragment(&mut self, n: usize, fin: bool, out: &mut Vec<u8>) {
        let opcode = self.message.replace(CONTINUATION).unwrap_or(CONTINUATION);
        push_header(out, fin, opcode, n);
        out.extend_from_slice(&self.carry[..n]);
        self.carry.drain(..n);
    }
}

/// An unmasked frame header: FIN and opcode, then the payload length in its shortest form.
fn push_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    match len {
        n if n < 126 => out.push(n as u8),
        n if n <= 0xffff => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-test-secret-0123456789";

    /// An unmasked server frame with FIN set.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        push_header(&mut f, true, opcode, payload.len());
        f.extend_from_slice(payload);
        f
    }

    /// A message of `opcode` cut into frames at `cuts` (payload offsets, ascending).
    fn fragmented(opcode: u8, payload: &[u8], cuts: &[usize]) -> Vec<u8> {
        if payload.is_empty() {
            return frame(opcode, payload);
        }
        let mut bounds = vec![0];
        bounds.extend(cuts.iter().copied().filter(|&c| c < payload.len()));
        bounds.push(payload.len());
        bounds.dedup();
        let mut out = Vec::new();
        for (i, w) in bounds.windows(2).enumerate() {
            let mut f = frame(if i == 0 { opcode } else { 0 }, &payload[w[0]..w[1]]);
            if w[1] != payload.len() {
                f[0] &= 0x7f;
            }
            out.extend(f);
        }
        out
    }

    /// The messages in an unmasked frame stream, fragments joined: (opcode, payload).
    fn messages(mut stream: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut found: Vec<(u8, Vec<u8>)> = Vec::new();
        let mut open: Option<usize> = None;
        while !stream.is_empty() {
            let (fin, opcode) = (stream[0] & 0x80 != 0, stream[0] & 0x0f);
            let (len, at) = match stream[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([stream[2], stream[3]])), 4),
                127 => {
                    let b: [u8; 8] = stream[2..10].try_into().expect("8 bytes");
                    (usize::try_from(u64::from_be_bytes(b)).expect("len"), 10)
                }
                n => (usize::from(n), 2),
            };
            let payload = stream[at..at + len].to_vec();
            stream = &stream[at + len..];
            match (opcode, open) {
                (0, Some(i)) => found[i].1.extend(payload),
                _ => found.push((opcode, payload)),
            }
            if opcode < 8 {
                open = match (fin, opcode) {
                    (true, _) => None,
                    (false, 0) => open,
                    (false, _) => Some(found.len() - 1),
                };
            }
        }
        found
    }

    fn marked(payload: &[u8]) -> Vec<u8> {
        let mut p = payload.to_vec();
        Needles::for_secret(SECRET.as_bytes()).overwrite_all(&mut p);
        p
    }

    fn redacted(stream: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = FrameRedactor::new(Arc::new(Needles::for_secret(SECRET.as_bytes())));
        let mut out = Vec::new();
        for part in stream.chunks(chunk.max(1)) {
            r.feed(part, &mut out);
        }
        r.finish(&mut out);
        out
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_key_is_overwritten_in_every_frame_size_and_any_chunking() {
        let small = format!("{{\"echo\":\"{SECRET}\"}}");
        let medium = format!("{}{SECRET}{}", "a".repeat(200), "b".repeat(100));
        let large = format!("{}{SECRET}", "c".repeat(70_000));
        let mut stream = frame(1, small.as_bytes());
        stream.extend(frame(9, b"ping"));
        stream.extend(frame(2, medium.as_bytes()));
        stream.extend(frame(1, large.as_bytes()));
        for chunk in [1, 2, 7, 100, stream.len()] {
            let out = redacted(&stream, chunk);
            assert_eq!(out.len(), stream.len(), "chunk {chunk}: lengths stay true");
            assert!(!contains(&out, SECRET.as_bytes()), "chunk {chunk}");
            let marker: String = "[redacted-by-broker]"
                .chars()
                .cycle()
                .take(SECRET.len())
                .collect();
            let want = |s: &str| s.replace(SECRET, &marker);
            let mut expected = frame(1, want(&small).as_bytes());
            expected.extend(frame(9, b"ping"));
            expected.extend(frame(2, want(&medium).as_bytes()));
            expected.extend(frame(1, want(&large).as_bytes()));
            assert_eq!(out, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn a_key_split_across_fragments_is_overwritten() {
        let text = format!("{{\"echo\":\"{SECRET}\"}}");
        let start = text.find(SECRET).expect("key");
        // Cut inside the key, at its edges and around it, with a ping between fragments.
        for cuts in [
            vec![start + 3],
            vec![start, start + SECRET.len()],
            vec![start + 1, start + 2, start + 10],
            vec![1, start + SECRET.len() - 1],
        ] {
            let mut with_ping = fragmented(1, text.as_bytes(), &cuts);
            with_ping.extend(frame(9, b"ping"));
            for chunk in [1, 3, with_ping.len()] {
                let out = redacted(&with_ping, chunk);
                assert!(
                    !contains(&out, SECRET.as_bytes()),
                    "cuts {cuts:?}, chunk {chunk}"
                );
                assert_eq!(
                    messages(&out),
                    vec![(1, marked(text.as_bytes())), (9, b"ping".to_vec())],
                    "cuts {cuts:?}, chunk {chunk}"
                );
            }
        }
        // A ping inside the message goes out at once; the message stays whole around it.
        let mut stream = fragmented(2, text.as_bytes(), &[start + 5]);
        let second = stream.len() - (text.len() - start - 5) - 2;
        let ping = frame(9, b"p");
        stream.splice(second..second, ping.iter().copied());
        let out = redacted(&stream, 1);
        assert_eq!(
            messages(&out),
            vec![(2, marked(text.as_bytes())), (9, b"p".to_vec())]
        );
    }

    #[test]
    fn a_frame_ending_in_a_key_prefix_is_sent_whole_at_once() {
        // Nothing is held past the end of a frame, so the agent is never kept waiting.
        let payload = b"{\"partial\":\"sk-te";
        let f = frame(1, payload);
        let mut r = FrameRedactor::new(Arc::new(Needles::for_secret(SECRET.as_bytes())));
        let mut out = Vec::new();
        r.feed(&f, &mut out);
        assert_eq!(out, f);
    }

    #[test]
    fn random_streams_keep_their_messages_and_lose_the_key() {
        let mut rng = crate::test_rng::Rng::new(7);
        for round in 0..3000 {
            // Messages with the key (or part of it) at random places, whole or fragmented at
            // random cuts, pings between them; or garbage, which must only not panic.
            let garbage = round % 4 == 0;
            let mut expected = Vec::new();
            let stream = if garbage {
                let len = rng.below(400);
                rng.bytes(len)
            } else {
                let mut stream = Vec::new();
                for _ in 0..rng.below(5) {
                    let mut payload = Vec::new();
                    for _ in 0..rng.below(4) {
                        let piece: &[u8] = match rng.below(3) {
                            0 => SECRET.as_bytes(),
                            1 => &SECRET.as_bytes()[..rng.below(SECRET.len())],
                            _ => b"{\"x\":1}",
                        };
                        payload.extend_from_slice(piece);
                    }
                    if rng.below(10) == 0 {
                        payload.extend(std::iter::repeat_n(b'p', 70_000));
                    }
                    let opcode = *rng.pick(&[1, 2, 9, 10]);
                    let mut cuts: Vec<usize> = (0..rng.below(4))
                        .map(|_| rng.below(payload.len() + 1))
                        .collect();
                    cuts.sort_unstable();
                    if opcode < 8 && !cuts.is_empty() {
                        stream.extend(fragmented(opcode, &payload, &cuts));
                    } else {
                        stream.extend(frame(opcode, &payload));
                    }
                    expected.push((opcode, marked(&payload)));
                }
                stream
            };
            let mut r = FrameRedactor::new(Arc::new(Needles::for_secret(SECRET.as_bytes())));
            let mut out = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(300)).min(rest.len());
                r.feed(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            r.finish(&mut out);
            if !garbage {
                assert!(!contains(&out, SECRET.as_bytes()), "round {round}");
                // Not assert_eq: a failure would print megabytes of payload.
                let got = messages(&out);
                let shape = |m: &[(u8, Vec<u8>)]| -> Vec<(u8, usize)> {
                    m.iter().map(|(o, p)| (*o, p.len())).collect()
                };
                assert!(
                    got == expected,
                    "round {round}: messages differ: {:?} against {:?}",
                    shape(&got),
                    shape(&expected)
                );
            }
        }
    }

    #[test]
    fn masked_frames_pass_through() {
        let mut f = vec![0x81, 0x80 | 3, 1, 2, 3, 4];
        f.extend_from_slice(b"abc");
        assert_eq!(redacted(&f, 1), f);
    }
}
