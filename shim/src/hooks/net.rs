//! libc hooks: `connect`/`__connect`, TCP Fast Open sends (`sendto`/`sendmsg` with
//! `MSG_FASTOPEN`), sends to a DNS server (steered to the run's responder, see `dns.rs`) and
//! the resolver entry points.
//!
//! Each hook converts its pointers, asks [`crate::decide`], and makes exactly one real call as
//! its last step, so `errno` and the return value are the real function's, with one exception:
//! a connection rerouted to the broker must open with the run's ticket (see
//! [`connect_to_broker`]), so there the shim completes the loopback connect itself and writes
//! the ticket before returning.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libc::{
    addrinfo, hostent, msghdr, size_t, sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage,
    socklen_t, ssize_t,
};

use broker_contract::TICKET_PREAMBLE_LEN;

use crate::decide::{self, Connect, Family, SocketFacts};
use crate::ffi::{contain, Guard, RealFn};

pub static REAL_CONNECT: RealFn = RealFn::new(c"connect");
pub static REAL_CONNECT_INTERNAL: RealFn = RealFn::new(c"__connect");
pub static REAL_SENDTO: RealFn = RealFn::new(c"sendto");
pub static REAL_SENDMSG: RealFn = RealFn::new(c"sendmsg");
pub static REAL_GETADDRINFO: RealFn = RealFn::new(c"getaddrinfo");
pub static REAL_GETHOSTBYNAME: RealFn = RealFn::new(c"gethostbyname");
pub static REAL_GETHOSTBYNAME2: RealFn = RealFn::new(c"gethostbyname2");
pub static REAL_GETHOSTBYNAME_R: RealFn = RealFn::new(c"gethostbyname_r");
pub static REAL_GETHOSTBYNAME2_R: RealFn = RealFn::new(c"gethostbyname2_r");

/// Resolve every libc function hooked here, from the constructor, so no hook calls `dlsym`
/// (which takes the loader's lock) while the program runs threads that may `fork`.
pub fn resolve_all() {
    for f in [
        &REAL_CONNECT,
        &REAL_CONNECT_INTERNAL,
        &REAL_SENDTO,
        &REAL_SENDMSG,
        &REAL_GETADDRINFO,
        &REAL_GETHOSTBYNAME,
        &REAL_GETHOSTBYNAME2,
        &REAL_GETHOSTBYNAME_R,
        &REAL_GETHOSTBYNAME2_R,
    ] {
        let _ = f.addr();
    }
}

type ConnectFn = unsafe extern "C" fn(c_int, *const sockaddr, socklen_t) -> c_int;
type SendtoFn = unsafe extern "C" fn(
    c_int,
    *const c_void,
    size_t,
    c_int,
    *const sockaddr,
    socklen_t,
) -> ssize_t;
type SendmsgFn = unsafe extern "C" fn(c_int, *const msghdr, c_int) -> ssize_t;
type GetaddrinfoFn = unsafe extern "C" fn(
    *const c_char,
    *const c_char,
    *const addrinfo,
    *mut *mut addrinfo,
) -> c_int;
type GethostbynameFn = unsafe extern "C" fn(*const c_char) -> *mut hostent;
type Gethostbyname2Fn = unsafe extern "C" fn(*const c_char, c_int) -> *mut hostent;
type GethostbynameRFn = unsafe extern "C" fn(
    *const c_char,
    *mut hostent,
    *mut c_char,
    libc::size_t,
    *mut *mut hostent,
    *mut c_int,
) -> c_int;
type Gethostbyname2RFn = unsafe extern "C" fn(
    *const c_char,
    c_int,
    *mut hostent,
    *mut c_char,
    libc::size_t,
    *mut *mut hostent,
    *mut c_int,
) -> c_int;

static BROKER_DOWN_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() = e };
}

/// Read an IPv4/IPv6 destination out of a `sockaddr`.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
pub unsafe fn read_sockaddr(addr: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); the family-specific
    // reads below are done only when `len` covers the whole struct. Unaligned reads, since
    // callers may pass any buffer.
    unsafe {
        match c_int::from((*addr).sa_family) {
            libc::AF_INET if len as usize >= size_of::<sockaddr_in>() => {
                let sin = addr.cast::<sockaddr_in>().read_unaligned();
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                Some(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)).into())
            }
            libc::AF_INET6 if len as usize >= size_of::<sockaddr_in6>() => {
                let sin6 = addr.cast::<sockaddr_in6>().read_unaligned();
                let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                let port = u16::from_be(sin6.sin6_port);
                Some(SocketAddrV6::new(ip, port, sin6.sin6_flowinfo, sin6.sin6_scope_id).into())
            }
            _ => None,
        }
    }
}

/// Encode `addr` as a `sockaddr` of its own family.
pub fn write_sockaddr(addr: SocketAddr) -> (sockaddr_storage, socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: as above, for sockaddr_in.
            let mut sin: sockaddr_in = unsafe { std::mem::zeroed() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            // SAFETY: sockaddr_storage is larger than and aligned for every sockaddr type.
            unsafe {
                std::ptr::addr_of_mut!(storage)
                    .cast::<sockaddr_in>()
                    .write(sin)
            };
            size_of::<sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let mut sin6: sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            // SAFETY: as above.
            unsafe {
                std::ptr::addr_of_mut!(storage)
                    .cast::<sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<sockaddr_in6>()
        }
    };
    (storage, len as socklen_t)
}

/// Could this be a fake address (`127.77.x.x`, or v4-mapped)? A cheap pre-filter.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
unsafe fn maybe_fake(addr: *const sockaddr, len: socklen_t) -> bool {
    // SAFETY: caller's contract; `read_sockaddr` checks `len` against each family's size.
    match unsafe { read_sockaddr(addr, len) } {
        Some(SocketAddr::V4(a)) => a.ip().octets()[..2] == broker_contract::FAKE_NET,
        Some(SocketAddr::V6(a)) => a
            .ip()
            .to_ipv4_mapped()
            .is_some_and(|v4| v4.octets()[..2] == broker_contract::FAKE_NET),
        None => false,
    }
}

fn sockopt_int(fd: c_int, level: c_int, name: c_int) -> Option<c_int> {
    let mut v: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; a bad fd just fails.
    let r =
        unsafe { libc::getsockopt(fd, level, name, std::ptr::addr_of_mut!(v).cast(), &mut len) };
    (r == 0).then_some(v)
}

fn socket_facts(fd: c_int, dest: Option<SocketAddr>) -> SocketFacts {
    let stream = sockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE) == Some(libc::SOCK_STREAM);
    let v6only = matches!(dest, Some(SocketAddr::V6(_)))
        && sockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).is_some_and(|v| v != 0);
    SocketFacts { stream, v6only }
}

/// Where a connection the agent opens to `addr` really goes.
enum Route {
    /// The agent's own destination, untouched.
    AsAsked,
    /// The broker's listener, and the preamble (magic + run ticket) to present there first
    /// (`None` with the config of a broker older than tickets).
    Broker(SocketAddr, Option<[u8; TICKET_PREAMBLE_LEN]>),
    /// Refused (`ECONNREFUSED`).
    Refused,
    /// The run's DNS responder, as plain DNS (no ticket).
    Dns(SocketAddr),
}

/// The routing shared by `connect`, `__connect` and TCP Fast Open sends.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
unsafe fn route(fd: c_int, addr: *const sockaddr, len: socklen_t) -> Route {
    // Fast path, taken by every connect the broker does not manage: no config, or egress not
    // restricted and a destination outside 127.77.0.0/16. Checked on the raw bytes, before the
    // guard and the unwind frame; [`decide::decide_connect`] stays the source of truth.
    let cfg = match crate::config() {
        // SAFETY: caller's contract (all three).
        Some(cfg)
            if cfg.deny_unlisted
                || unsafe { maybe_fake(addr, len) }
                || cfg.dns.is_some() && unsafe { super::dns::port_is_dns(addr, len) } =>
        {
            cfg
        }
        _ => return Route::AsAsked,
    };
    let decision = Guard::enter().and_then(|_guard| {
        contain(|| {
            // SAFETY: caller's contract.
            let dest = unsafe { read_sockaddr(addr, len) };
            let decision = decide::decide_connect(cfg, dest, || socket_facts(fd, dest));
            if decision == Connect::Refuse(decide::Refuse::Unlisted) {
                crate::log::denial(cfg, dest);
            }
            decision
        })
    });
    match decision {
        Some(Connect::Redirect(to)) => Route::Broker(to, cfg.ticket.as_ref().map(|t| t.preamble())),
        // Steered DNS: the server is remembered for the answers' source (see `dns.rs`); a
        // socket past the fd table could not have it, so its DNS passes through.
        Some(Connect::Dns(to)) => {
            // SAFETY: caller's contract.
            match unsafe { read_sockaddr(addr, len) } {
                Some(dest) if super::dns::DNS_SERVERS.set(fd, dest) => Route::Dns(to),
                _ => Route::AsAsked,
            }
        }
        Some(Connect::Refuse(_)) => Route::Refused,
        Some(Connect::Bypass(_)) | None => Route::AsAsked,
    }
}

/// The shared body of `connect` and `__connect`.
///
/// # Safety
/// The arguments of `connect(2)`.
unsafe fn connect_via(real: &RealFn, fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    let Some(real) = real.addr() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: ConnectFn = unsafe { std::mem::transmute::<usize, ConnectFn>(real) };
    // SAFETY: the agent passed `len` readable bytes at `addr` (connect's contract).
    match unsafe { route(fd, addr, len) } {
        Route::Broker(to, preamble) => {
            // SAFETY: `real` is connect(2); `fd` is the agent's.
            let r = unsafe { connect_to_broker(real, fd, to, preamble.as_ref()) };
            if r == -1 && errno() == libc::ECONNREFUSED {
                // Fail closed, but say why once: a config exists and its broker is gone.
                if !BROKER_DOWN_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    let _ = contain(|| {
                        crate::log::line(&format!(
                            "the broker is not listening at {to} (connection refused): requests \
                             to managed hosts fail until it runs again"
                        ))
                    });
                }
                set_errno(libc::ECONNREFUSED);
            }
            r
        }
        Route::Refused => {
            set_errno(libc::ECONNREFUSED);
            -1
        }
        Route::Dns(to) => {
            let (storage, slen) = write_sockaddr(to);
            // SAFETY: `real` is connect(2); a complete sockaddr that outlives the call.
            unsafe { real(fd, std::ptr::addr_of!(storage).cast(), slen) }
        }
        // SAFETY: the agent's own arguments, unchanged.
        Route::AsAsked => unsafe { real(fd, addr, len) },
    }
}

/// How long the shim waits, at most, for its loopback connect to the broker to complete before
/// writing the ticket. A loopback handshake completes within microseconds; only a broker whose
/// accept queue is full drops the SYN (retransmitted after 1 s, then 3 s), and a connect that
/// takes longer than this fails with `ETIMEDOUT` instead of blocking the agent's event loop.
const BROKER_CONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(4);

/// Connect `fd` to the broker's listener `to`, then write `preamble` (the run's ticket) before
/// any byte of the agent's; `0` on success, else `-1` with `errno`.
///
/// The ticket must be the first bytes on the connection, and the agent may write (its TLS
/// ClientHello) as soon as `connect` returns, so the shim finishes the connect here, on any
/// socket: a blocking one waits as it would have anyway; a non-blocking one, whose `connect`
/// would say `EINPROGRESS`, is waited for with `poll` (at most [`BROKER_CONNECT_WAIT`]; the
/// socket's flags are never touched, so no other thread can see them change) and gets `0`,
/// which POSIX allows a non-blocking connect to return when it completes at once (as loopback
/// connects often do). Event loops (libuv, asyncio, curl, tokio/mio) then see a writable,
/// connected socket. The 40-byte write fits an empty send buffer, so it does not wait either.
///
/// Alternatives rejected: TCP Fast Open (`TCP_FASTOPEN_CONNECT`) sends data in the SYN only
/// with a cookie and the server side enabled by sysctl, and without one a non-blocking write
/// returns `EINPROGRESS` with nothing queued; writing the ticket lazily on the agent's first
/// `write`/`send`/`writev`/`sendmsg`/`sendfile`/`SSL_write` means hooking every write path and
/// tracking per-fd state, and a missed path sends the ClientHello first.
///
/// # Safety
/// `real` is `connect(2)`; `fd` is any descriptor (a bad one just fails).
unsafe fn connect_to_broker(
    real: ConnectFn,
    fd: c_int,
    to: SocketAddr,
    preamble: Option<&[u8; TICKET_PREAMBLE_LEN]>,
) -> c_int {
    let (storage, slen) = write_sockaddr(to);
    // SAFETY: a complete sockaddr of `slen` bytes that outlives the call.
    let r = unsafe { real(fd, std::ptr::addr_of!(storage).cast(), slen) };
    let Some(preamble) = preamble else {
        return r;
    };
    if r == -1 {
        // EINTR: a blocking connect interrupted by a signal goes on in the background, as a
        // non-blocking one does; finish it here too, or the agent's next connect would get
        // EALREADY/EISCONN and the ticket would never be written.
        if !matches!(errno(), libc::EINPROGRESS | libc::EINTR) {
            return -1; // the real errno (ECONNREFUSED when the broker is gone, ...)
        }
        let deadline = std::time::Instant::now() + BROKER_CONNECT_WAIT;
        if let Err(e) = wait_writable(fd, deadline) {
            set_errno(e);
            return -1;
        }
        match sockopt_int(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
            Some(0) => {}
            Some(e) => {
                set_errno(e);
                return -1;
            }
            None => return -1, // getsockopt's errno
        }
    }
    match write_all(
        fd,
        preamble,
        std::time::Instant::now() + BROKER_CONNECT_WAIT,
    ) {
        Ok(()) => 0,
        Err(e) => {
            set_errno(e);
            -1
        }
    }
}

/// Wait until `fd` is writable (a connect completed or failed), retrying after signals.
fn wait_writable(fd: c_int, deadline: std::time::Instant) -> Result<(), c_int> {
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(libc::ETIMEDOUT);
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = c_int::try_from(left.as_millis().max(1)).unwrap_or(c_int::MAX);
        // SAFETY: one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => return Err(libc::ETIMEDOUT),
            _ if errno() == libc::EINTR => continue,
            _ => return Err(errno()),
        }
    }
}

/// Write all of `bytes` on the connected socket `fd` (blocking or not), without `SIGPIPE`.
///
/// `MSG_MORE`: the kernel holds the preamble until the agent's first write (its ClientHello)
/// and sends both in one segment, or after 200 ms at most (as `TCP_CORK`). So the broker gets
/// one segment and one wake-up, and a socket without `TCP_NODELAY` never waits for the ACK of
/// a lone preamble before Nagle lets its ClientHello go.
fn write_all(fd: c_int, bytes: &[u8], deadline: std::time::Instant) -> Result<(), c_int> {
    let mut done = 0;
    while done < bytes.len() {
        let rest = &bytes[done..];
        let flags = libc::MSG_NOSIGNAL | libc::MSG_MORE;
        // SAFETY: `rest` is valid for `rest.len()` bytes; `send` is not hooked (and would pass
        // through the hooks untouched: no MSG_FASTOPEN).
        let n = unsafe { libc::send(fd, rest.as_ptr().cast(), rest.len(), flags) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(libc::EPIPE),
            _ => match errno() {
                libc::EINTR => {}
                libc::EAGAIN => wait_writable(fd, deadline)?,
                e => return Err(e),
            },
        }
    }
    Ok(())
}

/// `MSG_FASTOPEN` to the broker: an ordinary connect with the ticket; `0` or `-1` with `errno`.
///
/// # Safety
/// `fd` is any descriptor (a bad one just fails).
unsafe fn fast_open_fallback(
    fd: c_int,
    to: SocketAddr,
    preamble: &[u8; TICKET_PREAMBLE_LEN],
) -> c_int {
    let Some(real) = REAL_CONNECT.addr() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: ConnectFn = unsafe { std::mem::transmute::<usize, ConnectFn>(real) };
    // SAFETY: `real` is connect(2).
    unsafe { connect_to_broker(real, fd, to, Some(preamble)) }
}

/// `connect(2)`: managed fake addresses go to the broker; see [`decide::decide_connect`].
///
/// # Safety
/// Called by the agent with `connect(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwarded unchanged from the agent.
    unsafe { connect_via(&REAL_CONNECT, fd, addr, len) }
}

/// glibc's internal alias of `connect`, called directly by some libraries.
///
/// # Safety
/// As [`connect`].
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn __connect(fd: c_int, addr: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwarded unchanged from the agent.
    unsafe { connect_via(&REAL_CONNECT_INTERNAL, fd, addr, len) }
}

/// `sendto(2)`. With `MSG_FASTOPEN` on a TCP socket it connects and sends in one call (TCP
/// Fast Open, e.g. `curl --tcp-fastopen`), so it is routed like `connect`; every other send
/// passes straight through after one flag test.
///
/// # Safety
/// Called by the agent with `sendto(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    let Some(real) = REAL_SENDTO.addr() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: SendtoFn = unsafe { std::mem::transmute::<usize, SendtoFn>(real) };
    if flags & libc::MSG_FASTOPEN == 0 {
        // A datagram to a DNS server goes to the run's responder (see `dns.rs`).
        // SAFETY: the agent passed `len` readable bytes at `addr` (sendto's contract).
        if let Some((storage, slen)) = unsafe { super::dns::steer_send(fd, addr, len) } {
            // SAFETY: the agent's buffer, and a complete sockaddr that outlives the call.
            return unsafe { real(fd, buf, n, flags, std::ptr::addr_of!(storage).cast(), slen) };
        }
        // SAFETY: the agent's own arguments, unchanged.
        return unsafe { real(fd, buf, n, flags, addr, len) };
    }
    // SAFETY: the agent passed `len` readable bytes at `addr` (sendto's contract).
    match unsafe { route(fd, addr, len) } {
        Route::Broker(to, None) | Route::Dns(to) => {
            let (storage, slen) = write_sockaddr(to);
            // SAFETY: the agent's buffer, and a complete sockaddr that outlives the call.
            unsafe { real(fd, buf, n, flags, std::ptr::addr_of!(storage).cast(), slen) }
        }
        // The ticket must precede the agent's data, which Fast Open would put in the SYN: the
        // shim connects (ticket written), then sends the data on the connected socket. On
        // loopback the saved round trip is microseconds.
        // SAFETY: fd and buffer are the agent's; no address on a connected socket.
        Route::Broker(to, Some(preamble)) => match unsafe { fast_open_fallback(fd, to, &preamble) }
        {
            // SAFETY: as above.
            0 => unsafe { real(fd, buf, n, flags & !libc::MSG_FASTOPEN, std::ptr::null(), 0) },
            _ => -1,
        },
        Route::Refused => {
            set_errno(libc::ECONNREFUSED);
            -1
        }
        // SAFETY: the agent's own arguments, unchanged.
        Route::AsAsked => unsafe { real(fd, buf, n, flags, addr, len) },
    }
}

/// `sendmsg(2)`: as [`sendto`], for `MSG_FASTOPEN` with the destination in `msg_name`.
///
/// # Safety
/// Called by the agent with `sendmsg(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    let Some(real) = REAL_SENDMSG.addr() else {
        set_errno(libc::ENOSYS);
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: SendmsgFn = unsafe { std::mem::transmute::<usize, SendmsgFn>(real) };
    if msg.is_null() {
        // SAFETY: the agent's own arguments, unchanged.
        return unsafe { real(fd, msg, flags) };
    }
    if flags & libc::MSG_FASTOPEN == 0 {
        // SAFETY: `msg` is non-null and points at the agent's msghdr (sendmsg's contract),
        // whose `msg_name` holds `msg_namelen` readable bytes or is null.
        let steered = unsafe {
            super::dns::steer_send(
                fd,
                (*msg).msg_name.cast::<sockaddr>().cast_const(),
                (*msg).msg_namelen,
            )
        };
        return match steered {
            // SAFETY: a copy of the agent's msghdr (plain data) pointing at our sockaddr,
            // which outlives the call; the agent's own msghdr is not modified.
            Some((mut storage, slen)) => unsafe {
                let mut copy = msg.read();
                copy.msg_name = std::ptr::addr_of_mut!(storage).cast();
                copy.msg_namelen = slen;
                real(fd, &copy, flags)
            },
            // SAFETY: the agent's own arguments, unchanged.
            None => unsafe { real(fd, msg, flags) },
        };
    }
    // SAFETY: `msg` is non-null and points at the agent's msghdr (sendmsg's contract), whose
    // `msg_name` holds `msg_namelen` readable bytes or is null.
    let (name, namelen) = unsafe {
        (
            (*msg).msg_name.cast::<sockaddr>().cast_const(),
            (*msg).msg_namelen,
        )
    };
    // SAFETY: as above.
    match unsafe { route(fd, name, namelen) } {
        // As in `sendto`: connect and present the ticket, then send without an address.
        // SAFETY: fd is the agent's.
        Route::Broker(to, Some(preamble)) => match unsafe { fast_open_fallback(fd, to, &preamble) }
        {
            // SAFETY: a copy of the agent's msghdr (plain data) without a destination; the
            // agent's own msghdr is not modified.
            0 => unsafe {
                let mut copy = msg.read();
                copy.msg_name = std::ptr::null_mut();
                copy.msg_namelen = 0;
                real(fd, &copy, flags & !libc::MSG_FASTOPEN)
            },
            _ => -1,
        },
        Route::Broker(to, None) | Route::Dns(to) => {
            let (mut storage, slen) = write_sockaddr(to);
            // SAFETY: a copy of the agent's msghdr (plain data) pointing at our sockaddr,
            // which outlives the call; the agent's own msghdr is not modified.
            unsafe {
                let mut copy = msg.read();
                copy.msg_name = std::ptr::addr_of_mut!(storage).cast();
                copy.msg_namelen = slen;
                real(fd, &copy, flags)
            }
        }
        Route::Refused => {
            set_errno(libc::ECONNREFUSED);
            -1
        }
        // SAFETY: the agent's own arguments, unchanged.
        Route::AsAsked => unsafe { real(fd, msg, flags) },
    }
}

fn family_of(af: c_int) -> Family {
    match af {
        libc::AF_UNSPEC => Family::Any,
        libc::AF_INET => Family::V4,
        libc::AF_INET6 => Family::V6,
        _ => Family::Other,
    }
}

/// The fake address for a hostname, if it is managed, as a numeric literal.
///
/// # Safety
/// `name` must be null or a NUL-terminated string.
unsafe fn fake_answer(name: *const c_char, family: Family) -> Option<(IpAddr, CString)> {
    let cfg = crate::config()?;
    if name.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated per the resolver's contract.
    let name = unsafe { CStr::from_ptr(name) }.to_str().ok()?;
    let ip = decide::decide_resolve(cfg, name, family)?;
    Some((ip, CString::new(ip.to_string()).ok()?))
}

/// `getaddrinfo(3)`: a managed hostname is answered by the real `getaddrinfo` for the fake
/// numeric address (`AI_NUMERICHOST`), so glibc allocates the list and `freeaddrinfo` needs
/// no hook. The guard is held across the real call, so the resolver's own sockets pass
/// through untouched.
///
/// # Safety
/// Called by the agent with `getaddrinfo(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn getaddrinfo(
    node: *const c_char,
    service: *const c_char,
    hints: *const addrinfo,
    res: *mut *mut addrinfo,
) -> c_int {
    let Some(real) = REAL_GETADDRINFO.addr() else {
        return libc::EAI_FAIL;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: GetaddrinfoFn = unsafe { std::mem::transmute::<usize, GetaddrinfoFn>(real) };
    let Some(_guard) = Guard::enter() else {
        // SAFETY: the agent's own arguments, unchanged.
        return unsafe { real(node, service, hints, res) };
    };
    let answer = contain(|| {
        // SAFETY: `hints` is null or a valid addrinfo (getaddrinfo's contract).
        let hints = unsafe { hints.as_ref() };
        if hints.is_some_and(|h| h.ai_flags & libc::AI_NUMERICHOST != 0) {
            return None; // the caller wants no name lookup at all
        }
        let af = hints.map_or(libc::AF_UNSPEC, |h| h.ai_family);
        // SAFETY: `node` is null or NUL-terminated (getaddrinfo's contract).
        unsafe { fake_answer(node, family_of(af)) }
    })
    .flatten();
    let Some((ip, literal)) = answer else {
        // SAFETY: the agent's own arguments, unchanged.
        return unsafe { real(node, service, hints, res) };
    };
    // SAFETY: addrinfo is plain old data; the copy keeps the caller's socktype/protocol/flags.
    let mut h: addrinfo = match unsafe { hints.as_ref() } {
        Some(h) => *h,
        // SAFETY: all-zero is a valid addrinfo (AF_UNSPEC, any socktype).
        None => unsafe { std::mem::zeroed() },
    };
    h.ai_family = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // AI_ADDRCONFIG would drop a loopback-only answer on a host without other addresses.
    h.ai_flags = (h.ai_flags | libc::AI_NUMERICHOST) & !libc::AI_ADDRCONFIG;
    // SAFETY: `literal` and `h` outlive the call; `service` and `res` are the agent's.
    unsafe { real(literal.as_ptr(), service, &h, res) }
}

/// Shared body of the `gethostbyname*` hooks: the name to pass to the real function.
fn hostent_name(name: *const c_char, af: c_int) -> Option<CString> {
    let _guard = Guard::enter()?;
    // SAFETY: `name` is null or NUL-terminated (the resolver's contract).
    contain(|| unsafe { fake_answer(name, family_of(af)) })
        .flatten()
        .map(|(_, lit)| lit)
}

/// `gethostbyname(3)`: managed names answered with the fake IPv4 address.
///
/// # Safety
/// Called by the agent with `gethostbyname(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn gethostbyname(name: *const c_char) -> *mut hostent {
    let Some(real) = REAL_GETHOSTBYNAME.addr() else {
        return std::ptr::null_mut();
    };
    // SAFETY: dlsym address of a function with this signature.
    let real: GethostbynameFn = unsafe { std::mem::transmute::<usize, GethostbynameFn>(real) };
    let lit = hostent_name(name, libc::AF_INET);
    // SAFETY: a NUL-terminated name that outlives the call.
    unsafe { real(lit.as_ref().map_or(name, |l| l.as_ptr())) }
}

/// `gethostbyname2(3)`.
///
/// # Safety
/// Called by the agent with `gethostbyname2(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn gethostbyname2(name: *const c_char, af: c_int) -> *mut hostent {
    let Some(real) = REAL_GETHOSTBYNAME2.addr() else {
        return std::ptr::null_mut();
    };
    // SAFETY: dlsym address of a function with this signature.
    let real: Gethostbyname2Fn = unsafe { std::mem::transmute::<usize, Gethostbyname2Fn>(real) };
    let lit = hostent_name(name, af);
    // SAFETY: a NUL-terminated name that outlives the call.
    unsafe { real(lit.as_ref().map_or(name, |l| l.as_ptr()), af) }
}

/// `gethostbyname_r(3)`.
///
/// # Safety
/// Called by the agent with `gethostbyname_r(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn gethostbyname_r(
    name: *const c_char,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    let Some(real) = REAL_GETHOSTBYNAME_R.addr() else {
        return libc::ENOSYS;
    };
    // SAFETY: dlsym address of a function with this signature.
    let real: GethostbynameRFn = unsafe { std::mem::transmute::<usize, GethostbynameRFn>(real) };
    let lit = hostent_name(name, libc::AF_INET);
    // SAFETY: the agent's buffers, and a NUL-terminated name that outlives the call.
    unsafe {
        real(
            lit.as_ref().map_or(name, |l| l.as_ptr()),
            ret,
            buf,
            buflen,
            result,
            h_errnop,
        )
    }
}

/// `gethostbyname2_r(3)`.
///
/// # Safety
/// Called by the agent with `gethostbyname2_r(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn gethostbyname2_r(
    name: *const c_char,
    af: c_int,
    ret: *mut hostent,
    buf: *mut c_char,
    buflen: libc::size_t,
    result: *mut *mut hostent,
    h_errnop: *mut c_int,
) -> c_int {
    let Some(real) = REAL_GETHOSTBYNAME2_R.addr() else {
        return libc::ENOSYS;
    };
    // SAFETY: dlsym address of a function with this signature.
    let real: Gethostbyname2RFn = unsafe { std::mem::transmute::<usize, Gethostbyname2RFn>(real) };
    let lit = hostent_name(name, af);
    // SAFETY: the agent's buffers, and a NUL-terminated name that outlives the call.
    unsafe {
        real(
            lit.as_ref().map_or(name, |l| l.as_ptr()),
            af,
            ret,
            buf,
            buflen,
            result,
            h_errnop,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trips() {
        for s in [
            "127.77.3.1:443",
            "[::ffff:127.77.3.1]:443",
            "[fe80::1%2]:80",
        ] {
            let a: SocketAddr = s.parse().expect("addr");
            let (storage, len) = write_sockaddr(a);
            // SAFETY: a complete sockaddr of `len` bytes.
            let back = unsafe { read_sockaddr(std::ptr::addr_of!(storage).cast(), len) };
            assert_eq!(back, Some(a));
        }
    }

    #[test]
    fn short_or_foreign_sockaddrs_are_not_ip() {
        let (storage, _) = write_sockaddr("127.0.0.1:1".parse().expect("addr"));
        let p = std::ptr::addr_of!(storage).cast();
        // SAFETY: `storage` has at least as many bytes as asked for.
        unsafe {
            assert_eq!(read_sockaddr(p, 4), None);
            assert_eq!(read_sockaddr(std::ptr::null(), 16), None);
        }
        // SAFETY: zeroed sockaddr_un-sized storage: family AF_UNSPEC.
        let zero: sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(
            unsafe { read_sockaddr(std::ptr::addr_of!(zero).cast(), 128) },
            None
        );
    }
}
