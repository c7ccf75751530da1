//! A small HTTP CONNECT proxy, the corporate proxy of the upstream-proxy tests: it records
//! every CONNECT it is asked for, checks `Proxy-Authorization: Basic` when given credentials,
//! and tunnels a target to the local address it is told that target lives at (it resolves
//! names, as a real proxy does; the test's hostnames are the real ones).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One CONNECT the proxy was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunnel {
    /// `host:port` as the client asked.
    pub target: String,
    /// Whether it carried the expected credentials (always true for a proxy without any).
    pub authorized: bool,
    /// The status the proxy answered.
    pub status: u16,
}

/// The proxy, serving on 127.0.0.1 (port 0) until dropped.
pub struct ConnectProxy {
    pub addr: SocketAddr,
    tunnels: Arc<Mutex<Vec<Tunnel>>>,
    _runtime: tokio::runtime::Runtime,
}

impl ConnectProxy {
    /// A proxy that tunnels each `host:port` of `routes` to its address and answers 403 to any
    /// other target; with `credentials` (`user`, `password`), a CONNECT without them gets 407.
    pub fn start(routes: &[(&str, SocketAddr)], credentials: Option<(&str, &str)>) -> ConnectProxy {
        let routes: Arc<HashMap<String, SocketAddr>> = Arc::new(
            routes
                .iter()
                .map(|(target, addr)| (target.to_string(), *addr))
                .collect(),
        );
        let expected = credentials.map(|(user, password)| {
            let pair = format!("{user}:{password}");
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let tunnels = Arc::new(Mutex::new(Vec::new()));
        let recorded = tunnels.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (routes, expected, recorded) =
                    (routes.clone(), expected.clone(), recorded.clone());
                tokio::spawn(async move {
                    serve(client, &routes, expected.as_deref(), &recorded).await;
                });
            }
        });
        ConnectProxy {
            addr,
            tunnels,
            _runtime: runtime,
        }
    }

    /// `http://host:port`, or with the given userinfo.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        match userinfo {
            Some(userinfo) => format!("http://{userinfo}@{}", self.addr),
            None => format!("http://{}", self.addr),
        }
    }

    /// The CONNECTs asked for so far.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.lock().expect("lock").clone()
    }
}

async fn serve(
    mut client: TcpStream,
    routes: &HashMap<String, SocketAddr>,
    expected: Option<&str>,
    recorded: &Mutex<Vec<Tunnel>>,
) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut words = request_line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let authorization = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim().to_string())
    });
    let authorized = expected.is_none_or(|e| authorization.as_deref() == Some(e));
    let route = routes.get(target).copied();
    let status = match (method, authorized, route) {
        ("CONNECT", false, _) => 407,
        ("CONNECT", true, Some(_)) => 200,
        ("CONNECT", true, None) => 403,
        _ => 405,
    };
    recorded.lock().expect("lock").push(Tunnel {
        target: target.to_string(),
        authorized,
        status,
    });
    let answer = match status {
        200 => "HTTP/1.1 200 Connection established\r\n\r\n",
        407 => "HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n",
        403 => "HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n",
        _ => "HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n",
    };
    let upstream = match route {
        Some(addr) if status == 200 => match TcpStream::connect(addr).await {
            Ok(upstream) => upstream,
            Err(_) => {
                let _ = client
                    .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                    .await;
                return;
            }
        },
        _ => {
            let _ = client.write_all(answer.as_bytes()).await;
            return;
        }
    };
    if client.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let (mut client, mut upstream) = (client, upstream);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
