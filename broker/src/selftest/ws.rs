//! The server side of a WebSocket, as little of RFC 6455 as the self-test origin needs to
//! stream a model answer the way the Responses API does over a WebSocket (Codex tries that
//! first): the handshake's accept key, reading the client's (masked) frames, and answering
//! each text message with text frames of its own. No extensions are offered, so no
//! compression.

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

const TEXT: u8 = 0x1;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;
/// Client messages bigger than this end the connection: a model request is a few KiB.
const MAX_MESSAGE: usize = 16 << 20;

/// `Sec-WebSocket-Accept` for the client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    use base64::Engine as _;
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let digest = ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// Serve one upgraded connection: to every complete text message, send each of `events` as
/// a text message; answer pings, and stop at a close or an error.
pub async fn serve_events<S>(mut io: S, events: Vec<String>) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut message_opcode = None;
    let mut message_len = 0usize;
    loop {
        let (fin, opcode, payload) = read_frame(&mut io).await?;
        match opcode {
            CLOSE => {
                write_frame(&mut io, CLOSE, &payload).await?;
                return Ok(());
            }
            PING => write_frame(&mut io, PONG, &payload).await?,
            PONG => {}
            // 0 continues a fragmented message; anything else starts one.
            _ => {
                if opcode != 0 {
                    message_opcode = Some(opcode);
                    message_len = 0;
                }
                message_len += payload.len();
                if message_len > MAX_MESSAGE {
                    return Err(std::io::Error::other("message too large"));
                }
                if fin && message_opcode.take() == Some(TEXT) {
                    for event in &events {
                        write_frame(&mut io, TEXT, event.as_bytes()).await?;
                    }
                }
            }
        }
    }
}

/// One frame: (FIN, opcode, unmasked payload).
async fn read_frame<S: AsyncRead + Unpin>(io: &mut S) -> std::io::Result<(bool, u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    io.read_exact(&mut head).await?;
    let fin = head[0] & 0x80 != 0;
    let opcode = head[0] & 0x0F;
    let masked = head[1] & 0x80 != 0;
    let len = match head[1] & 0x7F {
        126 => u64::from(io.read_u16().await?),
        127 => io.read_u64().await?,
        n => u64::from(n),
    };
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_MESSAGE)
        .ok_or_else(|| std::io::Error::other("frame too large"))?;
    let mut mask = [0u8; 4];
    if masked {
        io.read_exact(&mut mask).await?;
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Ok((fin, opcode, payload))
}

/// One unmasked frame with FIN set (a server never masks).
async fn write_frame<S: AsyncWrite + Unpin>(
    io: &mut S,
    opcode: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    io.write_all(&frame).await?;
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn a_fragmented_text_message_gets_the_events_and_a_close_ends() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(serve_events(server, vec!["one".into(), "two".into()]));
        // "hello" masked, in two fragments, then a close.
        let mask = [1u8, 2, 3, 4];
        let masked = |data: &[u8]| -> Vec<u8> {
            data.iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect()
        };
        let mut out = vec![0x01, 0x80 | 3];
        out.extend_from_slice(&mask);
        out.extend(masked(b"hel"));
        out.extend([0x80, 0x80 | 2]);
        out.extend_from_slice(&mask);
        out.extend(masked(b"lo"));
        out.extend([0x88, 0x80]);
        out.extend_from_slice(&mask);
        client.write_all(&out).await.expect("write");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"\x81\x03one\x81\x03two\x88\x00");
        task.await.expect("task").expect("serve");
    }
}
