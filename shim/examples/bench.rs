//! Benchmark program (not a test): what the shim costs on the paths every program takes.
//!
//! ```text
//! cargo run --release -p broker-shim --example bench
//! ```
//!
//! Runs a child process alternately without and with `LD_PRELOAD=libbroker.so` (active shim
//! config, managed host `api.openai.com`) and prints, as medians over several rounds:
//! - pass-through `connect()` (to an unmanaged loopback address: the common case for every
//!   connection a program makes that the broker does not manage), UDP and TCP;
//! - a pass-through `sendto()` + `recvfrom()` pair (a datagram to the socket itself, with
//!   addresses: what the DNS hooks add to every datagram that is not DNS);
//! - `posix_spawn` of `/bin/true` and waiting for it: with the preload, the exec hook and the
//!   child's constructor (every process of an agent's process tree pays this once);
//! - `SSL_CTX_new()` through the global symbol (with the preload: the hook, which resolves the
//!   real function per call site and adds the run CA to the new store), and its first call
//!   (which also parses the CA);
//! - a non-blocking `connect()` to a managed host's fake address, rerouted to a listener
//!   playing the broker, until the socket is connected (as an event loop waits for it): with a
//!   config that has a run ticket (the shim completes the connect and sends the 40-byte
//!   preamble) against one without (the connect as before tickets), both preloaded. The
//!   difference is what the ticket adds to every new connection in the agent.
//!
//! Build with `--release` for numbers that mean something: the debug shim is unoptimised.
//! Uses the `libbroker.so` of the same profile (`target/<profile>/libbroker.so`), or
//! `$BROKER_SHIM_SO`. Needs the `openssl` CLI (for a throwaway CA) and `libssl.so.3`.

use std::ffi::{c_void, CStr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

const ROUNDS: usize = 7;
const UDP_CONNECTS: u32 = 200_000;
const DATAGRAMS: u32 = 100_000;
const TCP_CONNECTS: u32 = 3_000;
const SSL_CTXS: u32 = 2_000;
const SPAWNS: u32 = 200;
const BROKER_CONNECTS: u32 = 2_000;

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some("child") => child(),
        _ => parent(),
    }
}

// ---------------------------------------------------------------------------------------
// Parent: set up, run the child both ways, print medians and ratios.

fn shim_so() -> PathBuf {
    if let Some(p) = std::env::var_os("BROKER_SHIM_SO") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .expect("target/<profile>");
    profile_dir.join("libbroker.so")
}

#[derive(Default, Clone, Copy)]
struct Sample {
    udp_ns: f64,
    datagram_ns: f64,
    tcp_ns: f64,
    ssl_ns: f64,
    ssl_first_ns: f64,
    spawn_ns: f64,
    broker_ns: f64,
}

fn parent() {
    let so = shim_so();
    assert!(
        so.exists(),
        "{} not found: build it first (cargo build [--release] -p broker-shim)",
        so.display()
    );
    let dir = std::env::temp_dir().join(format!("broker-shim-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=broker bench CA",
        ])
        .current_dir(&dir)
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(ok, "openssl req failed (is the openssl CLI installed?)");
    // Plays the broker: accepts the rerouted connections and closes them.
    let broker = std::net::TcpListener::bind((broker_contract::run_ipv4(250), 0))
        .expect("bind 127.77.250.1");
    let broker_port = broker.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in broker.incoming() {
            drop(conn);
        }
    });
    let cfg = broker_contract::ShimConfig {
        slot: 250,
        port: broker_port,
        port6: 9,
        ca_file: dir.join("ca.pem"),
        deny_unlisted: false,
        hosts: vec!["api.openai.com".into()],
        env: vec![],
        env_if_set: vec![],
        connect_proxy: None,
        denial_log: None,
        // As the broker writes it (pass-through connects never use it).
        ticket: Some(broker_contract::Ticket::from_bytes(
            &[1; broker_contract::TICKET_BYTES],
        )),
        // As the broker writes it: every connect and send also checks for port 53.
        dns: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9))),
    };
    let config = dir.join("shim.conf");
    std::fs::write(&config, cfg.render()).expect("config");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    let no_ticket = dir.join("shim-no-ticket.conf");
    std::fs::write(
        &no_ticket,
        broker_contract::ShimConfig {
            ticket: None,
            ..cfg.clone()
        }
        .render(),
    )
    .expect("config");
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&no_ticket, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
    }

    let exe = std::env::current_exe().expect("current exe");
    let run_with = |preload: bool, config: &std::path::Path| -> Sample {
        let mut cmd = Command::new(&exe);
        cmd.arg("child")
            .env_remove("LD_PRELOAD")
            .env_remove("BROKER_SHIM_CONFIG");
        if preload {
            cmd.env("LD_PRELOAD", &so).env("BROKER_SHIM_CONFIG", config);
        }
        let out = cmd.output().expect("spawn child");
        assert!(
            out.status.success(),
            "child failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        parse_sample(&String::from_utf8_lossy(&out.stdout))
    };
    let run = |preload: bool| run_with(preload, &config);

    println!("libbroker.so: {}", so.display());
    if so.components().any(|c| c.as_os_str() == "debug") {
        println!("note: debug build of the shim; use --release for representative figures");
    }
    let (mut off, mut on, mut unticketed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        off.push(run(false));
        on.push(run(true));
        unticketed.push(run_with(true, &no_ticket));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let median = |v: &[Sample], f: fn(&Sample) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    println!("medians of {ROUNDS} rounds; child runs alternate without and with the preload\n");
    println!(
        "{:<44} {:>12} {:>12} {:>8}",
        "", "no preload", "preload", "ratio"
    );
    type Field = fn(&Sample) -> f64;
    let rows: [(&str, Field); 6] = [
        ("connect() UDP, unmanaged loopback", |s| s.udp_ns),
        ("sendto() + recvfrom() UDP, to itself", |s| s.datagram_ns),
        ("connect() TCP, unmanaged loopback", |s| s.tcp_ns),
        ("SSL_CTX_new() (+ CA added with preload)", |s| s.ssl_ns),
        ("SSL_CTX_new() first call (CA parsed)", |s| s.ssl_first_ns),
        ("posix_spawn(/bin/true) + wait (constructor)", |s| {
            s.spawn_ns
        }),
    ];
    for (name, f) in rows {
        let (a, b) = (median(&off, f), median(&on, f));
        println!("{name:<44} {:>9.0} ns {:>9.0} ns {:>8.3}", a, b, b / a);
    }
    let (a, b) = (
        median(&unticketed, |s| s.broker_ns),
        median(&on, |s| s.broker_ns),
    );
    println!(
        "\n{:<44} {:>12} {:>12} {:>8}",
        "preloaded, config", "no ticket", "ticket", "added"
    );
    println!(
        "{:<44} {:>9.0} ns {:>9.0} ns {:>+5.0} ns",
        "connect() to the broker, non-blocking, done",
        a,
        b,
        b - a
    );
    println!("\ntarget for pass-through connect(): ratio within 1.05");
}

fn parse_sample(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once(' ') else {
            continue;
        };
        let v: f64 = v.trim().parse().unwrap_or(f64::NAN);
        match k {
            "udp_ns" => s.udp_ns = v,
            "datagram_ns" => s.datagram_ns = v,
            "tcp_ns" => s.tcp_ns = v,
            "ssl_ns" => s.ssl_ns = v,
            "ssl_first_ns" => s.ssl_first_ns = v,
            "spawn_ns" => s.spawn_ns = v,
            "broker_ns" => s.broker_ns = v,
            _ => {}
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Child: the measurements. Calls go through the PLT, so with the preload they hit the hooks.

fn child() {
    println!("udp_ns {:.1}", udp_connect_ns());
    println!("datagram_ns {:.1}", datagram_ns());
    println!("tcp_ns {:.1}", tcp_connect_ns());
    let (first, each) = ssl_ctx_new_ns();
    println!("ssl_first_ns {first:.1}");
    println!("ssl_ns {each:.1}");
    println!("spawn_ns {:.1}", spawn_ns());
    if std::env::var_os("LD_PRELOAD").is_some() {
        println!("broker_ns {:.1}", broker_connect_ns());
    }
}

/// Non-blocking TCP connects to a managed host's fake address (`127.77.250.1:443`), which the
/// shim reroutes to the listener playing the broker, each until the socket is connected: an
/// `EINPROGRESS` is waited for with `poll`, as an event loop does before its first write. With
/// a ticket in the config the shim itself completes the connect and writes the preamble (the
/// call returns 0). Closed with RST (linger 0). Median of the calls.
fn broker_connect_ns() -> f64 {
    let mut sin = loopback(443);
    sin.sin_addr.s_addr = u32::from(broker_contract::run_ipv4(250)).to_be();
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let mut times = Vec::with_capacity(BROKER_CONNECTS as usize);
    for _ in 0..BROKER_CONNECTS {
        // SAFETY: plain socket calls with valid arguments; the fd is closed each iteration.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
            assert!(fd >= 0, "socket");
            let start = Instant::now();
            let r = libc::connect(fd, std::ptr::addr_of!(sin).cast(), len);
            if r == -1 {
                let e = std::io::Error::last_os_error();
                assert_eq!(e.raw_os_error(), Some(libc::EINPROGRESS), "connect: {e}");
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                assert_eq!(libc::poll(&mut pfd, 1, 5_000), 1, "poll");
            }
            times.push(start.elapsed());
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::close(fd);
        }
    }
    median_ns(times)
}

/// `posix_spawn` + `waitpid` of `/bin/true`, which inherits the environment: with the preload
/// this includes the exec hook (reading the ELF header) and the child's constructor (reading
/// the config, setting the environment). Median of the calls.
fn spawn_ns() -> f64 {
    let argv = [c"true".as_ptr(), std::ptr::null()];
    let mut times = Vec::with_capacity(SPAWNS as usize);
    for _ in 0..SPAWNS {
        let mut pid: libc::pid_t = 0;
        let start = Instant::now();
        // SAFETY: valid NUL-terminated path and argv; `environ` is libc's environment.
        unsafe {
            extern "C" {
                static environ: *const *mut std::ffi::c_char;
            }
            let r = libc::posix_spawn(
                &mut pid,
                c"/bin/true".as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                argv.as_ptr().cast(),
                environ,
            );
            assert_eq!(r, 0, "posix_spawn");
            let mut status = 0;
            libc::waitpid(pid, &mut status, 0);
        }
        times.push(start.elapsed());
    }
    median_ns(times)
}

fn loopback(port: u16) -> libc::sockaddr_in {
    // SAFETY: all-zero is a valid sockaddr_in.
    let mut sin: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = port.to_be();
    sin.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
    sin
}

fn per_op(total: Duration, n: u32) -> f64 {
    total.as_nanos() as f64 / f64::from(n)
}

/// Median of individually timed calls: robust to the rare call that waits on the scheduler or
/// a SYN retransmit on this shared machine.
fn median_ns(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_nanos() as f64
}

/// Re-`connect()` one UDP socket to 127.0.0.1:9 (no packet is sent).
fn udp_connect_ns() -> f64 {
    let sin = loopback(9);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket/connect/close calls with a valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket");
        let start = Instant::now();
        for _ in 0..UDP_CONNECTS {
            libc::connect(fd, std::ptr::addr_of!(sin).cast(), len);
        }
        let t = start.elapsed();
        libc::close(fd);
        per_op(t, UDP_CONNECTS)
    }
}

/// One byte sent with `sendto()` to the socket's own address and read back with `recvfrom()`
/// asking for the source: the two calls every datagram a program sends and receives with an
/// address goes through (with the preload, the DNS hooks' port check and fd-table lookup).
fn datagram_ns() -> f64 {
    // SAFETY: plain socket/bind/getsockname/sendto/recvfrom/close calls on buffers and
    // sockaddrs that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0, "socket");
        let mut me = loopback(0);
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, std::ptr::addr_of!(me).cast(), len),
            0,
            "bind"
        );
        assert_eq!(
            libc::getsockname(fd, std::ptr::addr_of_mut!(me).cast(), &mut len),
            0,
            "getsockname"
        );
        let mut buf = [0u8; 16];
        let start = Instant::now();
        for _ in 0..DATAGRAMS {
            libc::sendto(
                fd,
                buf.as_ptr().cast(),
                1,
                0,
                std::ptr::addr_of!(me).cast(),
                len,
            );
            let mut from: libc::sockaddr_in = std::mem::zeroed();
            let mut from_len = len;
            libc::recvfrom(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                std::ptr::addr_of_mut!(from).cast(),
                &mut from_len,
            );
        }
        let t = start.elapsed();
        libc::close(fd);
        per_op(t, DATAGRAMS)
    }
}

/// Blocking TCP connects to a local listener; only the `connect()` call is timed. Closed with
/// RST (linger 0) so no TIME_WAIT piles up. Median of the calls.
fn tcp_connect_ns() -> f64 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });
    let sin = loopback(port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let mut times = Vec::with_capacity(TCP_CONNECTS as usize);
    for _ in 0..TCP_CONNECTS {
        // SAFETY: plain socket calls with valid arguments; the fd is closed each iteration.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket");
            let start = Instant::now();
            let r = libc::connect(fd, std::ptr::addr_of!(sin).cast(), len);
            times.push(start.elapsed());
            assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::close(fd);
        }
    }
    median_ns(times)
}

fn global_symbol(name: &CStr) -> *mut c_void {
    // SAFETY: RTLD_DEFAULT lookup of a NUL-terminated name.
    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
    assert!(!p.is_null(), "{name:?} not found");
    p
}

/// `SSL_CTX_new(TLS_method())` + `SSL_CTX_free`, with libssl loaded RTLD_GLOBAL so the global
/// lookup finds the hook first when preloaded. Returns (first call, median of the rest), ns.
fn ssl_ctx_new_ns() -> (f64, f64) {
    // SAFETY: loading the system libssl; the function types are OpenSSL's.
    unsafe {
        let h = libc::dlopen(c"libssl.so.3".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL);
        assert!(!h.is_null(), "libssl.so.3 not found");
        let method: extern "C" fn() -> *const c_void =
            std::mem::transmute(global_symbol(c"TLS_method"));
        let new: extern "C" fn(*const c_void) -> *mut c_void =
            std::mem::transmute(global_symbol(c"SSL_CTX_new"));
        let free: extern "C" fn(*mut c_void) = std::mem::transmute(global_symbol(c"SSL_CTX_free"));
        let m = method();
        let start = Instant::now();
        let ctx = new(m);
        let first = start.elapsed();
        assert!(!ctx.is_null());
        free(ctx);
        let mut times = Vec::with_capacity(SSL_CTXS as usize);
        for _ in 0..SSL_CTXS {
            let start = Instant::now();
            let ctx = new(m);
            times.push(start.elapsed());
            free(ctx);
        }
        (first.as_nanos() as f64, median_ns(times))
    }
}
