//! Only the broker's own user gets in. Loopback TCP is reachable by every local user, so each
//! accepted connection's peer is mapped to its owning uid through `/proc/net/tcp{,6}` (the
//! peer's socket is the entry whose local address is our peer and whose remote address is us).

use std::io;
use std::net::{IpAddr, SocketAddr};

/// The uid owning the other end of an accepted loopback connection, if it can be found.
pub fn peer_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table)?;
    Ok(find_uid(&text, peer, local))
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
    fn finds_the_uid_of_a_real_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, peer) = listener.accept().expect("accept");
        let uid = peer_uid(server.local_addr().expect("local"), peer).expect("read table");
        assert_eq!(uid, Some(rustix::process::geteuid().as_raw()));
        drop(client);
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
