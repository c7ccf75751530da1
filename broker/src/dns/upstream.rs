//! The system's resolver, where queries for names the run does not manage go: the nameservers
//! of `/etc/resolv.conf` (as glibc, c-ares and Go read them), or the test-only
//! `--dns-upstream` override.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// How long one nameserver has to answer one forwarded query before the next is tried.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest DNS message over UDP (and the largest a TCP length prefix can announce).
pub const MAX_MESSAGE: usize = 65535;
/// glibc reads at most three nameservers.
const MAX_NAMESERVERS: usize = 3;

/// The `nameserver` lines of a resolv.conf, port 53. An empty file means the local host, as
/// glibc assumes.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A link-local IPv6 server may carry a zone (`fe80::1%eth0`), which an IpAddr
            // cannot hold; such a server is skipped.
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, broker_contract::DNS_PORT))
        })
        .take(MAX_NAMESERVERS)
        .collect();
    match servers.is_empty() {
        true => vec![SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            broker_contract::DNS_PORT,
        )],
        false => servers,
    }
}

/// The system's nameservers, read now.
pub fn system_nameservers() -> Vec<SocketAddr> {
    parse_resolv_conf(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
}

/// Send `query` over UDP to each server in turn until one answers with its id; the answer's
/// bytes, unchanged.
pub async fn forward_udp(servers: &[SocketAddr], query: &[u8]) -> io::Result<Vec<u8>> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no nameserver");
    for server in servers {
        match tokio::time::timeout(UPSTREAM_TIMEOUT, udp_exchange(*server, query)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(err)) => last = err,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "nameserver timed out"),
        }
    }
    Err(last)
}

async fn udp_exchange(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    // A fresh socket per query: a random source port each time (spoofing resistance), and the
    // connected socket takes datagrams from `server` only.
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(query).await?;
    // Room for the largest datagram, not zeroed: `recv_buf` fills the spare capacity.
    let mut buf = Vec::with_capacity(MAX_MESSAGE);
    loop {
        buf.clear();
        let n = socket.recv_buf(&mut buf).await?;
        // The same id, else a stray datagram: wait for the real answer.
        if n >= 2 && buf[..2] == query[..2] {
            return Ok(buf);
        }
    }
}

/// Send `query` over TCP (a client retrying a truncated answer) to each server in turn.
pub async fn forward_tcp(servers: &[SocketAddr], query: &[u8]) -> io::Result<Vec<u8>> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no nameserver");
    for server in servers {
        match tokio::time::timeout(UPSTREAM_TIMEOUT, tcp_exchange(*server, query)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(err)) => last = err,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, "nameserver timed out"),
        }
    }
    Err(last)
}

async fn tcp_exchange(server: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(server).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "nameserver closed"))
}

/// One DNS-over-TCP message: a two-byte length, then the message. `None` at a clean end.
pub async fn read_framed<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut message).await?;
    Ok(Some(message))
}

/// Write one DNS-over-TCP message.
pub async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    message: &[u8],
) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message too long"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    w.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let text = "# generated\nsearch example.org\nnameserver 10.0.0.2\nnameserver  ::1 \n\
                    nameserver fe80::1%eth0\noptions ndots:2\nnameserver 10.0.0.3\nnameserver 10.0.0.4\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.0.0.2:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr"),
                "10.0.0.3:53".parse().expect("addr"),
            ]
        );
        assert_eq!(
            parse_resolv_conf("search x\n"),
            vec!["127.0.0.1:53".parse().expect("addr")]
        );
    }

    #[tokio::test]
    async fn udp_forwarding_relays_the_answer_with_the_same_id_and_tries_the_next_server() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = server.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.expect("recv");
            // A stray datagram with another id first, then the answer.
            server.send_to(b"\xff\xffstray", from).await.expect("send");
            let mut answer = buf[..n].to_vec();
            answer.extend_from_slice(b"-answered");
            server.send_to(&answer, from).await.expect("send");
        });
        // A server that refuses (nothing listens): the next one answers.
        let dead = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let dead_addr = dead.local_addr().expect("addr");
        drop(dead);
        let got = forward_udp(&[dead_addr, addr], b"\x12\x34query")
            .await
            .expect("answer");
        assert_eq!(got, b"\x12\x34query-answered");
    }

    #[tokio::test]
    async fn tcp_forwarding_frames_messages() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let q = read_framed(&mut s).await.expect("read").expect("message");
            write_framed(&mut s, &[&q[..], b"-tcp"].concat())
                .await
                .expect("write");
        });
        let got = forward_tcp(&[addr], b"\x00\x01q").await.expect("answer");
        assert_eq!(got, b"\x00\x01q-tcp");
    }
}
