//! DNS steering, for resolvers that do not go through `getaddrinfo` (c-ares in Node's
//! `dns.resolve*` and in Bun, other libraries that speak DNS over a libc socket).
//!
//! The agent's traffic to port 53 goes to the run's DNS responder in the broker (its address
//! is `dns` in the shim config), which answers managed names with the run's fake address and
//! relays every other answer from the system's resolver:
//! - `connect` to port 53 (UDP, and TCP for truncated answers) connects to the responder
//!   instead (see `net.rs`, [`crate::decide::decide_connect`]);
//! - `sendto`/`sendmsg` with a port-53 destination send there instead ([`steer_send`]);
//! - `recvfrom`/`recvmsg` on a steered socket report the responder's answers as coming from the
//!   server the agent asked: c-ares and glibc's resolver drop a datagram from any other source
//!   ([`crate::decide::reply_source`]).
//!
//! Which server a socket asked is kept per fd in [`DNS_SERVERS`] (atomics only). Everything
//! else passes through: a `recvfrom` that is not on a steered socket costs one atomic load
//! after the real call; a send without a port-53 destination, two byte reads.

use std::ffi::{c_int, c_void};
use std::mem::size_of;
use std::net::SocketAddr;

use libc::{msghdr, size_t, sockaddr, socklen_t, ssize_t};

use super::net::{read_sockaddr, write_sockaddr};
use crate::decide;
use crate::fdtable::FdTable;
use crate::ffi::{contain, Guard, RealFn};

/// The server each steered socket was sending to.
pub static DNS_SERVERS: FdTable = FdTable::new();

pub static REAL_RECVFROM: RealFn = RealFn::new(c"recvfrom");
pub static REAL_RECVMSG: RealFn = RealFn::new(c"recvmsg");

type RecvfromFn = unsafe extern "C" fn(
    c_int,
    *mut c_void,
    size_t,
    c_int,
    *mut sockaddr,
    *mut socklen_t,
) -> ssize_t;
type RecvmsgFn = unsafe extern "C" fn(c_int, *mut msghdr, c_int) -> ssize_t;

/// Resolve the hooked functions from the constructor (see `net::resolve_all`).
pub fn resolve_all() {
    for f in [&REAL_RECVFROM, &REAL_RECVMSG] {
        let _ = f.addr();
    }
}

/// Is `addr` an IPv4/IPv6 address with port 53? Reads the family and the port only (the port
/// sits at the same offset in `sockaddr_in` and `sockaddr_in6`): the cheap test every send
/// with a destination, and every connect, pays.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
pub unsafe fn port_is_dns(addr: *const sockaddr, len: socklen_t) -> bool {
    if addr.is_null() || (len as usize) < size_of::<libc::sockaddr_in>() {
        return false;
    }
    // SAFETY: at least a sockaddr_in's bytes are readable (checked above); `sin_port` is at
    // the same offset in sockaddr_in6. Unaligned: callers may pass any buffer.
    let (family, port) = unsafe {
        let sin = addr.cast::<libc::sockaddr_in>().read_unaligned();
        (c_int::from(sin.sin_family), u16::from_be(sin.sin_port))
    };
    matches!(family, libc::AF_INET | libc::AF_INET6) && port == broker_contract::DNS_PORT
}

/// Whether `fd` is an `IPV6_V6ONLY` socket (only asked for IPv6 destinations).
fn v6only(fd: c_int, dest: SocketAddr) -> bool {
    if !dest.is_ipv6() {
        return false;
    }
    let mut v: c_int = 0;
    let mut len = size_of::<c_int>() as socklen_t;
    // SAFETY: `v` and `len` are valid for writes of the sizes given; a bad fd just fails.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            std::ptr::addr_of_mut!(v).cast(),
            &mut len,
        )
    };
    r == 0 && v != 0
}

/// For a send to `addr` on `fd`: the responder's address to send to instead, when `addr` is a
/// DNS server and this run has a responder; the server is remembered for `fd`. `None`: send
/// as asked.
///
/// # Safety
/// `addr` must be null or point at `len` readable bytes.
pub unsafe fn steer_send(
    fd: c_int,
    addr: *const sockaddr,
    len: socklen_t,
) -> Option<(libc::sockaddr_storage, socklen_t)> {
    // The port first: it rules out nearly every send, before the config is looked at.
    // SAFETY: caller's contract.
    if !unsafe { port_is_dns(addr, len) } || !DNS_SERVERS.fits(fd) {
        return None;
    }
    let responder = crate::config()?.dns?;
    // The shim's own sends (and the real resolver's, under the getaddrinfo hook) pass.
    let _guard = Guard::enter()?;
    contain(|| {
        // SAFETY: caller's contract.
        let dest = unsafe { read_sockaddr(addr, len) }?;
        let to = decide::dns_target(responder, dest, v6only(fd, dest))?;
        DNS_SERVERS.set(fd, dest);
        Some(write_sockaddr(to))
    })
    .flatten()
}

/// After a successful receive on `fd` that filled `addr` (`cap` bytes of room, the real
/// length now in `*addrlen`): if the datagram came from the responder on a steered socket,
/// put the original server's address there instead.
///
/// # Safety
/// `addr` points at `cap` writable bytes; `addrlen` is valid for reads and writes.
unsafe fn report_original_server(
    fd: c_int,
    addr: *mut sockaddr,
    cap: socklen_t,
    addrlen: *mut socklen_t,
) {
    let Some(original) = DNS_SERVERS.get(fd) else {
        return; // not a steered socket: the common case, one atomic load
    };
    let Some(responder) = crate::config().and_then(|c| c.dns) else {
        return;
    };
    let _ = contain(|| {
        // SAFETY: caller's contract; the kernel wrote at most `cap` bytes.
        let got = unsafe { *addrlen }.min(cap);
        // SAFETY: `got` bytes at `addr` were written by the kernel.
        let from = unsafe { read_sockaddr(addr, got) }?;
        let report = decide::reply_source(responder, from, original)?;
        let (storage, slen) = write_sockaddr(report);
        let n = slen.min(cap) as usize;
        // SAFETY: `n` bytes fit both our storage and the caller's buffer; they do not
        // overlap (ours is on this stack frame). `addrlen` gets the full length, as the
        // kernel reports a truncated address.
        unsafe {
            std::ptr::copy_nonoverlapping(std::ptr::addr_of!(storage).cast::<u8>(), addr.cast(), n);
            *addrlen = slen;
        }
        Some(())
    });
}

/// `recvfrom(2)`: an answer from the responder on a steered socket is reported as coming from
/// the server the agent asked; everything else is the real call's result, untouched.
///
/// # Safety
/// Called by the agent with `recvfrom(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    addr: *mut sockaddr,
    addrlen: *mut socklen_t,
) -> ssize_t {
    let Some(real) = REAL_RECVFROM.addr() else {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: RecvfromFn = unsafe { std::mem::transmute::<usize, RecvfromFn>(real) };
    // SAFETY: `addrlen` is null or valid (recvfrom's contract); read before the call changes it.
    let cap = match addr.is_null() || addrlen.is_null() {
        true => 0,
        false => unsafe { *addrlen },
    };
    // SAFETY: the agent's own arguments, unchanged.
    let r = unsafe { real(fd, buf, n, flags, addr, addrlen) };
    if r >= 0 && cap > 0 {
        // SAFETY: the agent gave `cap` writable bytes at `addr` and a valid `addrlen`.
        unsafe { report_original_server(fd, addr, cap, addrlen) };
    }
    r
}

/// `recvmsg(2)`: as [`recvfrom`], for the source in `msg_name`.
///
/// # Safety
/// Called by the agent with `recvmsg(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    let Some(real) = REAL_RECVMSG.addr() else {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        unsafe { *libc::__errno_location() = libc::ENOSYS };
        return -1;
    };
    // SAFETY: the address came from dlsym for a function with this exact signature.
    let real: RecvmsgFn = unsafe { std::mem::transmute::<usize, RecvmsgFn>(real) };
    // SAFETY: `msg` is null or the agent's valid msghdr (recvmsg's contract).
    let (name, cap) = match unsafe { msg.as_ref() } {
        Some(m) if !m.msg_name.is_null() => (m.msg_name.cast::<sockaddr>(), m.msg_namelen),
        _ => (std::ptr::null_mut(), 0),
    };
    // SAFETY: the agent's own arguments, unchanged.
    let r = unsafe { real(fd, msg, flags) };
    if r >= 0 && cap > 0 {
        // SAFETY: `msg_name` holds `cap` writable bytes; `msg_namelen` is inside the agent's
        // msghdr, valid for reads and writes.
        unsafe {
            report_original_server(fd, name, cap, std::ptr::addr_of_mut!((*msg).msg_namelen))
        };
    }
    r
}
