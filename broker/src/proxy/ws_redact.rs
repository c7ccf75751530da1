//! The upstream-to-agent half of a WebSocket that was opened with a credential: the key is
//! overwritten inside each frame's payload, as [`super::redact`] does for response bodies.
//!
//! Frames are parsed (RFC 6455 section 5.2) so that bytes are held back only inside an
//! unfinished frame: at the end of every frame everything goes out, so an interactive protocol
//! is never stalled waiting for bytes that might begin the key. Same-length replacement keeps
//! every length field true, and the marker is ASCII, so text frames stay valid UTF-8.
//!
//! The upgrade request offers no extensions (no `permessage-deflate`), so payloads are plain.
//! Not covered: a key split across two frames of a fragmented message, and masked frames
//! (a server must not send them; they pass through as they are).

use zeroize::Zeroizing;

use super::redact::{overwrite_all, partial_suffix};

/// Where in the frame stream the next byte belongs.
enum State {
    /// Collecting a frame header (`need` bytes in total, known once the first two arrive).
    Header { need: usize },
    /// Inside a payload with this many bytes still to come.
    Payload { left: u64, masked: bool },
}

pub struct FrameRedactor {
    secret: Zeroizing<Vec<u8>>,
    state: State,
    header: Vec<u8>,
    /// Payload bytes of the current frame not sent yet (they might begin the key).
    held: Zeroizing<Vec<u8>>,
}

impl FrameRedactor {
    pub fn new(secret: &str) -> FrameRedactor {
        FrameRedactor {
            secret: Zeroizing::new(secret.as_bytes().to_vec()),
            state: State::Header { need: 2 },
            header: Vec::with_capacity(14),
            held: Zeroizing::new(Vec::new()),
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
                    if let State::Payload { .. } = self.state {
                        out.extend_from_slice(&self.header);
                        self.header.clear();
                        self.end_frame_if_empty();
                    }
                }
                State::Payload { left, masked } => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                    self.held.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let left = left - n as u64;
                    self.state = State::Payload { left, masked };
                    if !masked {
                        overwrite_all(&mut self.held, &self.secret);
                    }
                    let keep = match left == 0 || masked {
                        true => 0,
                        false => partial_suffix(&self.held, &self.secret),
                    };
                    let ready = self.held.len() - keep;
                    out.extend_from_slice(&self.held[..ready]);
                    self.held.drain(..ready);
                    self.end_frame_if_empty();
                }
            }
        }
    }

    /// The upstream closed: whatever is held goes out as it is (it cannot be the whole key).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
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
        self.state = State::Payload { left, masked };
    }

    fn end_frame_if_empty(&mut self) {
        if let State::Payload { left: 0, .. } = self.state {
            self.state = State::Header { need: 2 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "sk-test-secret-0123456789";

    /// An unmasked server frame: FIN + opcode, then the payload length in its three forms.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    fn redacted(stream: &[u8], chunk: usize) -> Vec<u8> {
        let mut r = FrameRedactor::new(SECRET);
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
    fn a_frame_ending_in_a_key_prefix_is_sent_whole_at_once() {
        // Nothing is held past the end of a frame, so the agent is never kept waiting.
        let payload = b"{\"partial\":\"sk-te";
        let f = frame(1, payload);
        let mut r = FrameRedactor::new(SECRET);
        let mut out = Vec::new();
        r.feed(&f, &mut out);
        assert_eq!(out, f);
    }

    #[test]
    fn random_streams_keep_their_length_and_lose_the_key() {
        let mut rng = crate::test_rng::Rng::new(7);
        for round in 0..3000 {
            // Valid unmasked frames with the key (or part of it) at random places, or garbage.
            let garbage = round % 4 == 0;
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
                    stream.extend(frame(*rng.pick(&[0, 1, 2, 9, 10]), &payload));
                }
                stream
            };
            let mut r = FrameRedactor::new(SECRET);
            let mut out = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(300)).min(rest.len());
                r.feed(&rest[..n], &mut out);
                rest = &rest[n..];
            }
            r.finish(&mut out);
            assert_eq!(out.len(), stream.len(), "round {round}: lengths stay true");
            if !garbage {
                assert!(!contains(&out, SECRET.as_bytes()), "round {round}");
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
