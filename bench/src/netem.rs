//! A 20 ms round trip to the origin, all on this machine.
//!
//! Preferred: a network namespace joined to this one by a veth pair (10.200.0.0/30 inside the
//! pair only), `tc netem delay 10ms` on both ends, and the origin inside the namespace. That
//! needs root, iproute2 and a kernel with `sch_netem`. Without netem (some VM kernels ship no
//! qdiscs at all) the fallback is a userspace relay on loopback that holds every chunk 10 ms in
//! each direction and the first client bytes one extra round trip, standing in for the TCP
//! handshake the relay cannot delay.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::procs::OriginProc;

pub const ONE_WAY: Duration = Duration::from_millis(10);

/// The delayed origin, and whatever must be torn down after it.
pub struct Delayed {
    /// Where the broker and the direct client reach the origin.
    pub upstream: SocketAddr,
    pub ca_pem_path: std::path::PathBuf,
    pub method: String,
    // Dropped in this order: the origin, then the namespace.
    _origin: Option<OriginProc>,
    _ns: Option<Namespace>,
    _relay: Option<tokio::runtime::Runtime>,
}

/// Set up the delayed path; `note` receives the reason the namespace was not used, if any.
pub fn setup(
    dir: &Path,
    loopback_origin: &OriginProc,
    note: &mut Vec<String>,
) -> anyhow::Result<Delayed> {
    match Namespace::create() {
        Ok(ns) => {
            let prefix = ["ip", "netns", "exec", ns.name.as_str()];
            let origin = OriginProc::start(dir, &format!("{}:443", Namespace::INNER), &prefix)?;
            return Ok(Delayed {
                upstream: origin.addr,
                ca_pem_path: origin.ca_pem_path.clone(),
                method: format!(
                    "network namespace + veth, tc netem delay {}ms each way",
                    ONE_WAY.as_millis()
                ),
                _origin: Some(origin),
                _ns: Some(ns),
                _relay: None,
            });
        }
        Err(why) => note.push(format!(
            "20 ms RTT: no netem namespace ({why:#}); using a userspace delay relay on loopback"
        )),
    }
    let (runtime, addr) = relay(loopback_origin.addr)?;
    Ok(Delayed {
        upstream: addr,
        ca_pem_path: loopback_origin.ca_pem_path.clone(),
        method: format!(
            "userspace relay on loopback: {}ms each way per chunk, first client bytes held one more round trip (for the TCP handshake)",
            ONE_WAY.as_millis()
        ),
        _origin: None,
        _ns: None,
        _relay: Some(runtime),
    })
}

/// A namespace and veth pair we created; removed on drop (also when the benchmark fails).
struct Namespace {
    name: String,
    outer_if: String,
}

impl Namespace {
    const OUTER: &'static str = "10.200.0.1";
    const INNER: &'static str = "10.200.0.2";

    fn create() -> anyhow::Result<Namespace> {
        if !rustix::process::geteuid().is_root() {
            bail!("not root");
        }
        for tool in ["ip", "tc"] {
            if broker_integration::which(tool).is_none() {
                bail!("`{tool}` (iproute2) not found");
            }
        }
        remove_stale();
        let pid = std::process::id();
        let ns = Namespace {
            name: format!("brkbench-{pid}"),
            outer_if: format!("bb{pid}a"),
        };
        let inner_if = format!("bb{pid}b");
        let n = ns.name.as_str();
        ip(&["netns", "add", n])?;
        // From here on, drop cleans up whatever was made.
        ip(&[
            "link",
            "add",
            &ns.outer_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner_if,
        ])?;
        ip(&["link", "set", &inner_if, "netns", n])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", Self::OUTER),
            "dev",
            &ns.outer_if,
        ])?;
        ip(&["link", "set", &ns.outer_if, "up"])?;
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &format!("{}/30", Self::INNER),
            "dev",
            &inner_if,
        ])?;
        ip(&["-n", n, "link", "set", &inner_if, "up"])?;
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        let delay = format!("{}ms", ONE_WAY.as_millis());
        run(Command::new("tc").args([
            "qdisc",
            "add",
            "dev",
            &ns.outer_if,
            "root",
            "netem",
            "delay",
            &delay,
        ]))
        .context("tc netem (kernel without sch_netem?)")?;
        run(Command::new("ip").args([
            "netns", "exec", n, "tc", "qdisc", "add", "dev", &inner_if, "root", "netem", "delay",
            &delay,
        ]))?;
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; deleting the namespace kills the rest.
        let _ = Command::new("ip")
            .args(["link", "del", &self.outer_if])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Namespaces left by an earlier benchmark that was killed (its pid is gone).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(pid) = name.strip_prefix("brkbench-") else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("bb{pid}a")])
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A TCP relay to `origin` on 127.0.0.1 that delays every chunk by [`ONE_WAY`] in each
/// direction, keeping order.
fn relay(origin: SocketAddr) -> anyhow::Result<(tokio::runtime::Runtime, SocketAddr)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    runtime.spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(origin).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(delayed_pipe(cr, sw, ONE_WAY * 2));
                tokio::spawn(delayed_pipe(sr, cw, Duration::ZERO));
            });
        }
    });
    Ok((runtime, addr))
}

/// Copy `from` to `to`, each chunk written [`ONE_WAY`] after it was read; the first chunk
/// `first_extra` later still.
async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    first_extra: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut extra = first_extra;
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = tokio::time::Instant::now() + ONE_WAY + extra;
                extra = Duration::ZERO;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
