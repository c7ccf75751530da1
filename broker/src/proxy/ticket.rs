//! Run tickets: a connection is attributed to its run by proof, not by the address it arrived
//! on. Every loopback TCP port is open to every process of the user, so without this a process
//! of run A (or of no run) could connect to run B's listeners and be served under B's `--allow`
//! list, profile and handed keys.
//!
//! Each run has a random ticket ([`broker_contract::Ticket`], 128 bits) written only into its
//! shim config. On the run's fake address and `[::1]` the shim writes a 40-byte preamble (magic +
//! ticket) right after connecting, before the agent's ClientHello; on the CONNECT listener the
//! ticket is the password of `Proxy-Authorization: Basic` (from the `HTTPS_PROXY` userinfo).
//!
//! Why a preamble and not something in TLS (a client certificate, a PSK, an ALPN token): the
//! TLS client is the agent's own library (OpenSSL in Python, Node's, GnuTLS in git), which the
//! shim does not drive; and why not the peer's identity (its pid from sock_diag, then its
//! environment or cgroup): a pid says nothing a same-user process cannot fake or race, while a
//! secret only the run's own tree holds is proof. The sandbox keeps one run's config (and so
//! its ticket) out of another run's reach.
//!
//! Tickets are compared in constant time ([`subtle`]): a loopback peer can time many tries.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use broker_contract::{parse_preamble, Preamble, Ticket, TICKET_MAGIC, TICKET_PREAMBLE_LEN};
use subtle::ConstantTimeEq as _;
use tokio::io::AsyncReadExt as _;

use super::{Proxy, RunContext};
use crate::audit::{AuditEvent, EventKind};

/// Why a connection was refused. The text goes to the audit; it never holds a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// It opened with something else (a TLS ClientHello, HTTP): not through a run's shim.
    Missing,
    /// The magic, with another ticket: a process of another run (or a stale one).
    Wrong,
    /// Nothing, or only part of a preamble, before the handshake timeout.
    Timeout,
    /// The peer closed before sending anything: nothing was attempted, nothing to audit.
    ClosedSilently,
    /// The CONNECT request carried no `Proxy-Authorization: Basic`.
    NoProxyAuthorization,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "the connection did not open with a run ticket (not made through this run's shim)"
            }
            Refusal::Wrong => "the connection presented a ticket that is not this run's",
            Refusal::Timeout => "the connection sent no complete ticket in time",
            Refusal::ClosedSilently => "the connection closed before sending anything",
            Refusal::NoProxyAuthorization => {
                "the CONNECT request had no Proxy-Authorization with the run's ticket"
            }
        }
    }
}

/// Whether `candidate` is `ticket`, in time independent of where they differ.
pub(super) fn matches(candidate: &[u8], ticket: &Ticket) -> bool {
    bool::from(candidate.ct_eq(ticket.expose().as_bytes()))
}

/// Check the preamble as [`broker_contract::parse_preamble`] splits it.
pub(super) fn check_preamble(bytes: &[u8], ticket: &Ticket) -> Result<(), Refusal> {
    match parse_preamble(bytes) {
        Preamble::Ticket(candidate) if matches(candidate, ticket) => Ok(()),
        Preamble::Ticket(_) => Err(Refusal::Wrong),
        Preamble::Missing => Err(Refusal::Missing),
    }
}

/// Read exactly the preamble off `stream` (never a byte of what follows it) within `timeout`
/// and check it. Stops at the first byte that cannot start the magic, so a client without the
/// shim is refused at once instead of after the timeout.
pub(super) async fn read_preamble<S>(
    stream: &mut S,
    ticket: &Ticket,
    timeout: Duration,
) -> Result<(), Refusal>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = [0u8; TICKET_PREAMBLE_LEN];
    let mut got = 0;
    let read = async {
        while got < TICKET_PREAMBLE_LEN {
            match stream.read(&mut buf[got..]).await {
                Ok(0) | Err(_) if got == 0 => return Err(Refusal::ClosedSilently),
                Ok(0) | Err(_) => return Err(Refusal::Missing),
                Ok(n) => got += n,
            }
            let head = got.min(TICKET_MAGIC.len());
            if buf[..head] != TICKET_MAGIC[..head] {
                return Err(Refusal::Missing);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => check_preamble(&buf, ticket),
        Ok(Err(refusal)) => Err(refusal),
        Err(_) => Err(Refusal::Timeout),
    }
}

/// Check a CONNECT request's `Proxy-Authorization` (`Basic base64(user:ticket)`; the user is
/// not checked).
pub(super) fn check_proxy_authorization(
    value: Option<&http::HeaderValue>,
    ticket: &Ticket,
) -> Result<(), Refusal> {
    let Some(value) = value else {
        return Err(Refusal::NoProxyAuthorization);
    };
    let value = value.as_bytes();
    let encoded = match value.iter().position(|&b| b == b' ') {
        Some(i) if value[..i].eq_ignore_ascii_case(b"basic") => value[i + 1..].trim_ascii(),
        _ => return Err(Refusal::NoProxyAuthorization),
    };
    let decoded = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| Refusal::Wrong)?,
    );
    let password = match decoded.iter().position(|&b| b == b':') {
        Some(i) => &decoded[i + 1..],
        None => return Err(Refusal::Wrong),
    };
    match matches(password, ticket) {
        true => Ok(()),
        false => Err(Refusal::Wrong),
    }
}

/// Audit (and log) a refused connection: the run it tried, the peer, why. Never the ticket.
pub(super) fn record(
    proxy: &Proxy,
    run: &RunContext,
    peer: SocketAddr,
    host: Option<&str>,
    refusal: Refusal,
) {
    if refusal == Refusal::ClosedSilently {
        return;
    }
    let reason = format!("connection from {peer} refused: {}", refusal.reason());
    tracing::warn!(run = %run.id, "{reason}");
    proxy.audit.record(AuditEvent {
        run_id: Some(run.id.clone()),
        host: host.map(str::to_string),
        reason: Some(reason),
        ..AuditEvent::new(EventKind::TicketRefused)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use broker_contract::TICKET_BYTES;

    fn ticket(b: u8) -> Ticket {
        Ticket::from_bytes(&[b; TICKET_BYTES])
    }

    #[test]
    fn preamble_check() {
        let ours = ticket(1);
        assert_eq!(check_preamble(&ours.preamble(), &ours), Ok(()));
        assert_eq!(
            check_preamble(&ticket(2).preamble(), &ours),
            Err(Refusal::Wrong)
        );
        let mut hello = [0u8; TICKET_PREAMBLE_LEN];
        hello[0] = 0x16;
        assert_eq!(check_preamble(&hello, &ours), Err(Refusal::Missing));
    }

    fn run_read(input: &[u8], ours: &Ticket) -> (Result<(), Refusal>, Vec<u8>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut cursor = std::io::Cursor::new(input.to_vec());
            let r = read_preamble(&mut cursor, ours, Duration::from_secs(1)).await;
            let pos = cursor.position() as usize;
            (r, input[pos..].to_vec())
        })
    }

    #[test]
    fn reading_stops_at_the_preamble_and_refuses_early() {
        let ours = ticket(3);
        let mut input = ours.preamble().to_vec();
        input.extend_from_slice(&[0x16, 3, 1, 0, 5]);
        let (r, rest) = run_read(&input, &ours);
        assert_eq!(r, Ok(()));
        assert_eq!(rest, [0x16, 3, 1, 0, 5], "the ClientHello is left unread");
        // Plain HTTP, shorter than a preamble: refused at once, not after the timeout.
        let (r, _) = run_read(b"GET / HTTP/1.0\r\n\r\n", &ours);
        assert_eq!(r, Err(Refusal::Missing));
        // Another run's ticket.
        let (r, _) = run_read(&ticket(4).preamble(), &ours);
        assert_eq!(r, Err(Refusal::Wrong));
        // Closed before anything, or halfway through.
        assert_eq!(run_read(b"", &ours).0, Err(Refusal::ClosedSilently));
        assert_eq!(
            run_read(&ours.preamble()[..20], &ours).0,
            Err(Refusal::Missing)
        );
    }

    #[test]
    fn a_silent_peer_times_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (mut client, mut server) = tokio::io::duplex(64);
        let r = rt.block_on(async {
            use tokio::io::AsyncWriteExt as _;
            client.write_all(&TICKET_MAGIC[..3]).await.expect("write");
            read_preamble(&mut server, &ticket(5), Duration::from_millis(50)).await
        });
        assert_eq!(r, Err(Refusal::Timeout));
    }

    #[test]
    fn proxy_authorization() {
        let ours = ticket(6);
        let basic = |user_pass: &str| {
            http::HeaderValue::from_str(&format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(user_pass)
            ))
            .expect("header")
        };
        let good = basic(&format!("broker:{}", ours.expose()));
        assert_eq!(check_proxy_authorization(Some(&good), &ours), Ok(()));
        let lower =
            http::HeaderValue::from_str(&good.to_str().expect("ascii").replace("Basic", "basic"))
                .expect("header");
        assert_eq!(check_proxy_authorization(Some(&lower), &ours), Ok(()));
        assert_eq!(
            check_proxy_authorization(None, &ours),
            Err(Refusal::NoProxyAuthorization)
        );
        for wrong in [
            basic(&format!("broker:{}", ticket(7).expose())),
            basic("broker:"),
            basic(ours.expose()),
            http::HeaderValue::from_static("Basic !!!"),
        ] {
            assert_eq!(
                check_proxy_authorization(Some(&wrong), &ours),
                Err(Refusal::Wrong),
                "{wrong:?}"
            );
        }
        let bearer =
            http::HeaderValue::from_str(&format!("Bearer {}", ours.expose())).expect("header");
        assert_eq!(
            check_proxy_authorization(Some(&bearer), &ours),
            Err(Refusal::NoProxyAuthorization)
        );
    }
}
