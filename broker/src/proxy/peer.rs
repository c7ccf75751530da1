//! Only the broker's own user gets in. Loopback TCP is reachable by every local user, so each
//! accepted connection's peer is mapped to its owning uid: the peer's socket is the one whose
//! local address is our peer and whose remote address is us.
//!
//! The kernel is asked for exactly that socket over `NETLINK_SOCK_DIAG` (one round trip, a few
//! microseconds). `/proc/net/tcp{,6}` is the fallback: it lists every socket of the machine,
//! TIME_WAIT included, so after a burst of connections parsing it costs milliseconds.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// The uid owning the other end of an accepted loopback connection, if it can be found.
pub fn peer_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    match sock_diag_uid(peer, local) {
        Ok(found) => Ok(found),
        Err(_) => {
            let table = if peer.is_ipv4() {
                "/proc/net/tcp"
            } else {
                "/proc/net/tcp6"
            };
            let text = std::fs::read_to_string(table)?;
            Ok(find_uid(&text, peer, local))
        }
    }
}

// From linux/netlink.h, linux/sock_diag.h and linux/inet_diag.h.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const IPPROTO_TCP: u8 = 6;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states (8) and the socket id (48).
const REQUEST_LEN: usize = 8 + 48;
/// In an answer, `inet_diag_msg`: family, state, timer, retrans (4), the socket id (48),
/// expires, rqueue, wqueue (12), then the uid.
const UID_OFFSET: usize = NLMSG_HDRLEN + 4 + 48 + 12;

/// Ask the kernel for the TCP socket `local -> remote` and return its owner's uid.
fn sock_diag_uid(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u32>> {
    use rustix::net::sockopt::{set_socket_timeout, Timeout};
    use rustix::net::{
        netlink, recv, sendto, socket, AddressFamily, RecvFlags, SendFlags, SocketType,
    };
    let fd = socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )?;
    set_socket_timeout(&fd, Timeout::Recv, Some(Duration::from_secs(1)))?;
    let request = diag_request(local, remote);
    sendto(
        &fd,
        &request,
        SendFlags::empty(),
        &netlink::SocketAddrNetlink::new(0, 0),
    )?;
    let mut buf = [0u8; 1024];
    let (n, _) = recv(&fd, &mut buf, RecvFlags::empty())?;
    parse_diag_reply(&buf[..n.min(buf.len())])
}

/// `nlmsghdr` + `inet_diag_req_v2` asking for one socket (no `NLM_F_DUMP`: an exact lookup).
fn diag_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let family = if local.is_ipv4() {
        rustix::net::AddressFamily::INET
    } else {
        rustix::net::AddressFamily::INET6
    };
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + REQUEST_LEN);
    msg.extend_from_slice(&((NLMSG_HDRLEN + REQUEST_LEN) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence number
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id 0: the kernel
    msg.extend_from_slice(&[family.as_raw() as u8, IPPROTO_TCP, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // any TCP state
    msg.extend_from_slice(&local.port().to_be_bytes());
    msg.extend_from_slice(&remote.port().to_be_bytes());
    msg.extend_from_slice(&addr_bytes(local.ip()));
    msg.extend_from_slice(&addr_bytes(remote.ip()));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    msg.extend_from_slice(&[0xff; 8]); // INET_DIAG_NOCOOKIE
    msg
}

/// An address as the socket id holds it: 16 bytes in network order, IPv4 in the first four.
fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out.copy_from_slice(&v6.octets()),
    }
    out
}

/// The uid in a `SOCK_DIAG_BY_FAMILY` answer; `None` when the kernel has no such socket.
fn parse_diag_reply(reply: &[u8]) -> io::Result<Option<u32>> {
    let kind = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    match kind {
        Some(SOCK_DIAG_BY_FAMILY) => Ok(reply
            .get(UID_OFFSET..UID_OFFSET + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))),
        Some(NLMSG_ERROR) => Ok(None),
        _ => Err(io::Error::other("unexpected sock_diag answer")),
    }
}

/// In a `/proc/net/tcp*` table, the uid of the socket `local -> remote`.
fn find_uid(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    let want_local = encode(local);
    let want_remote = encode(remote);
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let l = fields.next()?;
        let r = fields.next()?;
        if !l.eq_ignore_ascii_case(&want_local) || !r.eq_ignore_ascii_case(&want_remote) {
            return None;
        }
        // st, tx:rx, tr:when, retrnsmt, then uid.
        fields.nth(4)?.parse().ok()
    })
}

/// The kernel's text form of an address: each 32-bit word of the address in host byte order
/// as hex, then `:` and the port as hex.
fn encode(addr: SocketAddr) -> String {
    let words: Vec<String> = match addr.ip() {
        IpAddr::V4(ip) => vec![format!("{:08X}", u32::from_ne_bytes(ip.octets()))],
        IpAddr::V6(ip) => ip
            .octets()
            .chunks(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
    };
    format!("{}:{:04X}", words.concat(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_the_kernel() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                encode("127.77.9.1:36159".parse().expect("addr")),
                "01094D7F:8D3F"
            );
            assert_eq!(
                encode("[::1]:42187".parse().expect("addr")),
                "00000000000000000000000001000000:A4CB"
            );
        }
    }

    #[test]
    fn both_lookups_find_the_uid_of_a_real_connection() {
        let ours = Some(rustix::process::geteuid().as_raw());
        for bind in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(bind) else {
                continue;
            };
            let client = std::net::TcpStream::connect(listener.local_addr().expect("addr"))
                .expect("connect");
            let (server, peer) = listener.accept().expect("accept");
            let local = server.local_addr().expect("local");
            assert_eq!(
                sock_diag_uid(peer, local).expect("sock_diag"),
                ours,
                "{bind}"
            );
            let table = if peer.is_ipv4() {
                "/proc/net/tcp"
            } else {
                "/proc/net/tcp6"
            };
            let text = std::fs::read_to_string(table).expect("table");
            assert_eq!(find_uid(&text, peer, local), ours, "{bind}");
            assert_eq!(peer_uid(local, peer).expect("peer_uid"), ours);
            drop(client);
        }
    }

    #[test]
    fn an_unknown_socket_is_not_found() {
        let a: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "127.0.0.1:2".parse().expect("addr");
        assert_eq!(sock_diag_uid(a, b).expect("sock_diag"), None);
    }

    #[test]
    fn parses_a_table_line() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            3: 0100007F:9C40 01094D7F:8D3F 01 00000000:00000000 00:00000000 00000000  1001        0 4242 1\n";
        let uid = find_uid(
            table,
            "127.0.0.1:40000".parse().expect("a"),
            "127.77.9.1:36159".parse().expect("b"),
        );
        assert_eq!(
            uid,
            if cfg!(target_endian = "little") {
                Some(1001)
            } else {
                None
            }
        );
    }
}
