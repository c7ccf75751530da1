//! Name resolution that bypasses `getaddrinfo`: c-ares (Node's `dns.Resolver`, and Bun's)
//! under `broker run` reaches a managed host through the broker, because the shim steers its
//! port-53 traffic to the run's DNS responder. Names the run does not manage still resolve
//! through the "system resolver" (here a local DNS server given with `--dns-upstream`).

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use broker_integration::{contains, run_bounded, shim_lib, Home, Origin, Serve, TestCa};

const OPENAI_KEY: &str = "sk-test-real-openai-key-for-dns-0123456789";

/// The agent: resolves with c-ares against a server address where nothing listens (TEST-NET-1),
/// so every answer it gets came through the broker; then opens TLS to the address it got for
/// api.openai.com and sends one request with the placeholder. Runs under Node and Bun.
const AGENT: &str = r#"
const dns = require('node:dns');
const tls = require('node:tls');
const r = new dns.Resolver({ timeout: 3000, tries: 2 });
r.setServers(['192.0.2.53']);
r.resolve4('internal.example', (e, a) => {
  console.log('internal=' + (e ? e.code : a.join(',')));
  r.resolve6('api.openai.com', (e6, a6) => {
    console.log('api6=' + (e6 ? e6.code : a6.join(',')));
    r.resolve4('api.openai.com', (e4, addrs) => {
      if (e4) { console.log('api4 failed: ' + e4.code); process.exit(2); }
      console.log('api4=' + addrs.join(','));
      const s = tls.connect({ host: addrs[0], port: 443, servername: 'api.openai.com' }, () => {
        s.write('GET /v1/models HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer ' +
          process.env.OPENAI_API_KEY + '\r\nConnection: close\r\n\r\n');
      });
      let out = '';
      s.on('data', (d) => { out += d; });
      s.on('end', () => { console.log('status=' + out.split('\r\n')[0]); console.log('body=' + out.split('\r\n\r\n').slice(1).join('')); });
      s.on('error', (err) => { console.log('tls error: ' + err.message); process.exit(3); });
    });
  });
});
"#;

/// A stand-in for the system's resolver: `internal.example` is 192.0.2.7, every other name
/// NXDOMAIN. Records the names it was asked.
struct SystemResolver {
    addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

impl SystemResolver {
    fn start() -> SystemResolver {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let addr = socket.local_addr().expect("addr");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::new();
                reply
                    .set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .add_queries(query.queries().iter().cloned());
                if let Some(q) = query.query() {
                    let name = q.name().to_ascii().to_ascii_lowercase();
                    log.lock().expect("lock").push(name.clone());
                    match (name.as_str(), q.query_type()) {
                        ("internal.example.", RecordType::A) => {
                            reply.add_answer(Record::from_rdata(
                                q.name().clone(),
                                60,
                                RData::A(A::new(192, 0, 2, 7)),
                            ));
                        }
                        ("internal.example.", _) => {}
                        _ => {
                            reply.set_response_code(ResponseCode::NXDomain);
                        }
                    }
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, from);
                }
            }
        });
        SystemResolver { addr, asked }
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().expect("lock").clone()
    }
}

/// Run `runtime -e AGENT` under `broker run` and check what it printed and what the origin saw.
fn agent_reaches_the_managed_host(runtime: &[&str]) {
    let _ = shim_lib();
    let ca = TestCa::new();
    let origin = Origin::bearer(&ca, "api.openai.com", OPENAI_KEY, "{\"data\":[]}");
    let resolver = SystemResolver::start();
    let home = Home::new();
    home.add("openai", OPENAI_KEY);
    let mut cmd = home.broker_run(&ca, "api.openai.com", origin.addr);
    cmd.arg("--dns-upstream")
        .arg(resolver.addr.to_string())
        .arg("--")
        .args(runtime)
        .arg("-e")
        .arg(AGENT);
    let out = run_bounded(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{runtime:?}: {stdout}\n{stderr}");
    assert!(
        !contains(&out.stdout, OPENAI_KEY) && !contains(&out.stderr, OPENAI_KEY),
        "the agent saw the key"
    );
    // The managed name came from the broker's responder, as this run's fake address.
    assert!(stdout.contains("api4=127.77.1."), "{stdout}\n{stderr}");
    assert!(stdout.contains("api6=::ffff:127.77.1."), "{stdout}");
    // The unmanaged name came from the system resolver, relayed unchanged.
    assert!(stdout.contains("internal=192.0.2.7"), "{stdout}");
    // Through the broker, with the key swapped in.
    assert!(stdout.contains("status=HTTP/1.1 200"), "{stdout}");
    assert!(stdout.contains("body={\"data\":[]}"), "{stdout}");
    let requests = origin.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0].header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    // The system resolver was asked about the unmanaged name only.
    let asked = resolver.asked();
    assert!(asked.iter().any(|n| n == "internal.example."), "{asked:?}");
    assert!(!asked.iter().any(|n| n.contains("openai")), "{asked:?}");
}

#[test]
fn node_dns_resolver_reaches_a_managed_host_through_the_broker() {
    agent_reaches_the_managed_host(&["node"]);
}

/// Bun, from npm (`scripts/test` installs `@oven/bun-linux-x64` into the test clients): its
/// `node:dns` is c-ares too.
#[test]
fn bun_dns_resolver_reaches_a_managed_host_through_the_broker() {
    let Some(bun) = bun() else {
        broker_integration::skip(
            "no Bun at $BROKER_TEST_NODE_MODULES/@oven/bun-linux-x64/bin/bun \
             (run ./scripts/test with the npm registry reachable, on linux-x64)",
        );
        return;
    };
    agent_reaches_the_managed_host(&[bun.to_str().expect("utf-8 path")]);
}

fn bun() -> Option<PathBuf> {
    let modules = PathBuf::from(std::env::var_os("BROKER_TEST_NODE_MODULES")?);
    let bun = modules.join("@oven/bun-linux-x64/bin/bun");
    bun.is_file().then_some(bun)
}

/// The shim's other DNS paths, from Python's raw sockets: an unconnected UDP socket
/// (`sendto`, then `recvfrom` and `recvmsg` report the server the agent asked), and DNS over
/// TCP (`connect` to port 53, as c-ares does for a truncated answer), with and without
/// `--deny-unlisted`. The server asked (TEST-NET-1) does not exist.
#[test]
fn raw_udp_and_tcp_dns_are_steered_to_the_responder() {
    let _ = shim_lib();
    let resolver = SystemResolver::start();
    let agent = r#"
import socket, struct
def query(name, ident):
    labels = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.'))
    return struct.pack('>HHHHHH', ident, 0x0100, 1, 0, 0, 0) + labels + b'\0' + struct.pack('>HH', 1, 1)
def address(reply):
    return socket.inet_ntoa(reply[-4:]) if struct.unpack('>H', reply[6:8])[0] else 'none'
server = ('192.0.2.53', 53)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.sendto(query('api.openai.com', 7), server)
reply, source = u.recvfrom(4096)
print('udp', address(reply), 'from %s:%d' % source)
u.sendto(query('internal.example', 8), server)
reply, _, _, source = u.recvmsg(4096)
print('recvmsg', address(reply), 'from %s:%d' % source)
t = socket.create_connection(server, timeout=10)
q = query('api.openai.com', 9)
t.sendall(struct.pack('>H', len(q)) + q)
n = struct.unpack('>H', t.recv(2, socket.MSG_WAITALL))[0]
print('tcp', address(t.recv(n, socket.MSG_WAITALL)))
"#;
    for deny in [false, true] {
        let home = Home::new();
        let mut cmd = home.broker();
        cmd.arg("run")
            .arg("--dns-upstream")
            .arg(resolver.addr.to_string())
            .stdin(std::process::Stdio::null());
        if deny {
            cmd.arg("--deny-unlisted");
        }
        cmd.args(["--", "python3", "-c", agent]);
        let out = run_bounded(&mut cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "deny={deny}: {stdout}\n{stderr}");
        assert!(
            stdout.contains("udp 127.77.1.") && stdout.contains("from 192.0.2.53:53\nrecvmsg"),
            "deny={deny}: {stdout}"
        );
        assert!(
            stdout.contains("recvmsg 192.0.2.7 from 192.0.2.53:53"),
            "deny={deny}: {stdout}"
        );
        assert!(stdout.contains("tcp 127.77.1."), "deny={deny}: {stdout}");
    }
}

/// `broker serve` gives every run its own responder: a run joined to the daemon and a bare
/// preload (the daemon's own run) each get their run's fake address, and the rest is forwarded
/// to the daemon's `--dns-upstream`.
#[test]
fn runs_of_broker_serve_each_answer_with_their_own_addresses() {
    let lib = shim_lib();
    let ca = TestCa::new();
    let resolver = SystemResolver::start();
    let home = Home::new();
    let mut cmd = home.broker();
    cmd.arg("serve")
        .arg("--upstream-ca")
        .arg(&ca.pem_path)
        .arg("--dns-upstream")
        .arg(resolver.addr.to_string());
    let serve = Serve::spawn(&home, cmd);
    assert!(
        serve.config.dns.is_some(),
        "the daemon's config names its responder"
    );
    let agent = r#"
import os, socket, struct
def query(name, ident):
    labels = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.'))
    return struct.pack('>HHHHHH', ident, 0x0100, 1, 0, 0, 0) + labels + b'\0' + struct.pack('>HH', 1, 1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(10)
u.connect(('192.0.2.53', 53))
for name in ['api.openai.com', 'internal.example']:
    u.send(query(name, 5))
    reply = u.recv(4096)
    print(name, socket.inet_ntoa(reply[-4:]))
config = os.environ.get('BROKER_SHIM_CONFIG') or os.path.join(os.environ['BROKER_HOME'], 'run', 'shim.conf')
print([l for l in open(config).read().splitlines() if l.startswith('slot ')][0])
"#;
    // A run joined to the daemon (no upstream overrides: `broker run` joins it).
    let mut joined = home.broker();
    joined
        .args(["run", "--", "python3", "-c", agent])
        .stdin(std::process::Stdio::null());
    // A bare preload: the daemon's own run.
    let mut bare = std::process::Command::new("python3");
    broker_integration::scrub(&mut bare);
    bare.env("BROKER_HOME", home.path())
        .env("LD_PRELOAD", &lib)
        .args(["-c", agent])
        .stdin(std::process::Stdio::null());
    let mut slots = Vec::new();
    for (what, cmd) in [("joined", &mut joined), ("bare", &mut bare)] {
        let out = run_bounded(cmd, Duration::from_secs(60));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {stdout}\n{stderr}");
        let slot: u8 = stdout
            .lines()
            .find_map(|l| l.strip_prefix("slot "))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{what}: no slot in {stdout}"));
        assert!(
            stdout.contains(&format!("api.openai.com 127.77.{slot}.1\n")),
            "{what}: {stdout}"
        );
        assert!(
            stdout.contains("internal.example 192.0.2.7\n"),
            "{what}: {stdout}"
        );
        slots.push(slot);
    }
    assert_eq!(
        slots[1], serve.config.slot,
        "the bare preload uses the daemon's run"
    );
    assert_ne!(slots[0], slots[1], "the joined run has a slot of its own");
}

/// `--dns-upstream` points the agent's DNS at a server of its choosing for every name the run
/// does not manage: like `--resolve`, it is refused to a broker started inside a run.
#[test]
fn dns_upstream_is_refused_inside_a_run() {
    let home = Home::new();
    let out = run_bounded(
        home.broker()
            .args(["run", "--", "sh", "-c"])
            .arg("broker run --dns-upstream 127.0.0.1:53 -- true; echo rc=$?")
            .env(
                "PATH",
                format!(
                    "{}:/usr/bin:/bin",
                    broker_integration::broker_bin()
                        .parent()
                        .expect("dir")
                        .display()
                ),
            ),
        Duration::from_secs(60),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("rc=1"), "{stdout}\n{stderr}");
    assert!(stderr.contains("--dns-upstream"), "{stderr}");
}
