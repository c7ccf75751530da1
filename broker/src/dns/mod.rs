//! The run's DNS responder, for resolvers that never call `getaddrinfo`: c-ares (Node's
//! `dns.resolve*`, Bun's `dns`), and any other library that talks DNS itself over a libc
//! socket. The shim steers the agent's UDP and TCP traffic to port 53 here (see the shim's
//! `hooks/dns.rs`); this answers managed names with the run's fake address and forwards
//! everything else to the system's resolver, relaying its answer unchanged ([`answer`]).
//!
//! One responder per run (like the run's listeners): the answer depends on the run's slot,
//! and a datagram carries nothing that says which run sent it. It listens on 127.0.0.1 only,
//! UDP and TCP on the same port (TCP for answers too big for a datagram).
//!
//! Who can reach it: every local process, of any uid, as with any loopback UDP port (the
//! TCP listeners' peer-uid check has no cheap equivalent for a datagram, and DNS carries no
//! ticket). What it gives them: the run's fake address for the catalog's public host names
//! (which only says that a run exists, and which only this uid with the run's ticket can use),
//! and the system resolver's answers, which any local process gets by asking that resolver
//! itself. It is never reachable from another machine, so it cannot be an open resolver or an
//! amplifier; concurrent forwards and TCP clients are capped so a flood costs bounded memory.

pub mod answer;
pub mod upstream;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use answer::Action;
pub use answer::RunNames;

/// Forwarded queries in flight at once, per run; datagrams past it are dropped (the client
/// retries), so a flood costs bounded memory and sockets.
const MAX_IN_FLIGHT: usize = 256;
/// TCP clients served at once, per run (a resolver opens one per server at most).
const MAX_TCP_CLIENTS: usize = 64;
/// A TCP client that sends nothing for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Tries at finding one port free for both UDP and TCP.
const BIND_ATTEMPTS: usize = 16;

/// A running responder. Dropping it stops it.
pub struct Responder {
    pub addr: SocketAddr,
    _tasks: JoinSet<()>,
}

struct Shared {
    names: RunNames,
    upstream: Vec<SocketAddr>,
    in_flight: Arc<Semaphore>,
}

/// Start the responder of one run: `names` answered here, the rest sent to `upstream`.
pub async fn start(names: RunNames, upstream: Vec<SocketAddr>) -> io::Result<Responder> {
    let (udp, tcp) = bind_pair()?;
    let addr = udp.local_addr()?;
    let shared = Arc::new(Shared {
        names,
        upstream,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(serve_udp(Arc::new(udp), shared.clone()));
    tasks.spawn(serve_tcp(tcp, shared));
    Ok(Responder {
        addr,
        _tasks: tasks,
    })
}

/// A UDP socket and a TCP listener on the same loopback port.
fn bind_pair() -> io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..BIND_ATTEMPTS {
        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let addr = udp.local_addr()?;
        match std::net::TcpListener::bind(addr) {
            Ok(tcp) => {
                udp.set_nonblocking(true)?;
                tcp.set_nonblocking(true)?;
                return Ok((UdpSocket::from_std(udp)?, TcpListener::from_std(tcp)?));
            }
            Err(err) => last = Some(err),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port free for UDP and TCP")))
}

async fn serve_udp(socket: Arc<UdpSocket>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; upstream::MAX_MESSAGE];
    loop {
        let (n, client) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            // ICMP errors from a client that went away surface here: keep serving.
            Err(err) => {
                tracing::debug!(%err, "dns: receive failed");
                continue;
            }
        };
        match answer::decide(&shared.names, &buf[..n]) {
            Action::Answer(bytes) => {
                let _ = socket.send_to(&bytes, client).await;
            }
            Action::Forward(query) => {
                let Ok(permit) = shared.in_flight.clone().try_acquire_owned() else {
                    tracing::debug!("dns: too many queries in flight, dropped one");
                    continue;
                };
                let (socket, shared) = (socket.clone(), shared.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match upstream::forward_udp(&shared.upstream, &query).await {
                        Ok(reply) => {
                            let _ = socket.send_to(&reply, client).await;
                        }
                        // No answer to relay: the client times out and retries, as it would
                        // with its own server down.
                        Err(err) => tracing::debug!(%err, "dns: forward failed"),
                    }
                });
            }
            Action::Drop => {}
        }
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let clients = Arc::new(Semaphore::new(MAX_TCP_CLIENTS));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _peer)) => stream,
            Err(err) => {
                // Out of descriptors, say: wait a little instead of spinning on the error.
                tracing::debug!(%err, "dns: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Past the cap the connection is closed at once (dropped): the client retries.
        let Ok(permit) = clients.clone().try_acquire_owned() else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_tcp_client(stream, shared).await;
        });
    }
}

/// Answer a TCP client's queries in order until it closes or goes idle.
async fn serve_tcp_client(mut stream: TcpStream, shared: Arc<Shared>) {
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, upstream::read_framed(&mut stream)).await {
            Ok(Ok(Some(query))) => query,
            _ => return,
        };
        let reply = match answer::decide(&shared.names, &query) {
            Action::Answer(bytes) => bytes,
            Action::Forward(query) => {
                let Ok(_permit) = shared.in_flight.try_acquire() else {
                    return;
                };
                match upstream::forward_tcp(&shared.upstream, &query).await {
                    Ok(reply) => reply,
                    Err(err) => {
                        tracing::debug!(%err, "dns: forward over TCP failed");
                        return;
                    }
                }
            }
            Action::Drop => return,
        };
        if upstream::write_framed(&mut stream, &reply).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(id)
            .set_recursion_desired(true)
            .add_query(Query::query(
                Name::from_ascii(name).expect("name"),
                RecordType::A,
            ));
        m.to_vec().expect("encode")
    }

    /// A stand-in for the system's resolver: answers every UDP query with its own bytes and a
    /// marker, so a relayed answer is recognisable.
    async fn fake_system_resolver() -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let addr = socket.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let mut reply = buf[..n].to_vec();
                reply[2] |= 0x80; // QR: a response
                reply.extend_from_slice(b"from-upstream");
                let _ = socket.send_to(&reply, from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_managed_names_and_relays_the_rest_over_udp_and_tcp() {
        let upstream = fake_system_resolver().await;
        let names = RunNames {
            slot: 5,
            hosts: vec!["api.openai.com".into()],
        };
        let responder = start(names, vec![upstream]).await.expect("start");
        assert!(responder.addr.ip().is_loopback());

        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(responder.addr).await.expect("connect");
        let mut buf = [0u8; 1024];
        client
            .send(&query(1, "api.openai.com"))
            .await
            .expect("send");
        let n = client.recv(&mut buf).await.expect("recv");
        assert_eq!(
            answer::answer_addresses(&buf[..n]),
            Some(vec!["127.77.5.1".parse().expect("ip")])
        );

        let unmanaged = query(2, "example.org");
        client.send(&unmanaged).await.expect("send");
        let n = client.recv(&mut buf).await.expect("recv");
        assert!(buf[..n].ends_with(b"from-upstream"), "relayed unchanged");
        assert_eq!(buf[..2], unmanaged[..2]);

        // TCP, same port: the managed answer (the fake resolver speaks UDP only).
        let mut tcp = TcpStream::connect(responder.addr).await.expect("tcp");
        upstream::write_framed(&mut tcp, &query(3, "API.openai.com."))
            .await
            .expect("write");
        let reply = upstream::read_framed(&mut tcp)
            .await
            .expect("read")
            .expect("reply");
        assert_eq!(
            answer::answer_addresses(&reply),
            Some(vec!["127.77.5.1".parse().expect("ip")])
        );

        // Stopped when dropped.
        let addr = responder.addr;
        drop(responder);
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
