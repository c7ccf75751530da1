//! Which DNS server each steered socket was really sending to, by file descriptor.
//!
//! The DNS hooks steer a socket's port-53 traffic to the run's responder and must later
//! report the responder's answers as coming from the server the agent asked (see
//! [`crate::decide::reply_source`]). Hooks may run in any thread, in a signal handler, or
//! between `fork` and `exec`, so this is a fixed array of atomics: no lock, no allocation.
//!
//! An entry outlives its socket (there is no `close` hook): a later socket with the same fd
//! inherits it, which is harmless, because an answer's source is rewritten only when it is
//! the responder's own address, which only a steered socket receives from. A socket whose fd
//! is past the table is not steered (its DNS passes through, as without the shim).
//!
//! Each entry is a small seqlock: writers bump the sequence to odd, store the address, and
//! bump it to even; readers retry once if it changed. Two threads steering the same fd at
//! once could still mix two addresses; the worst outcome is an answer reported from the
//! wrong server, which the client drops and retries.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

/// File descriptors `0..FDS` can be steered. 24 bytes each, in `.bss` (untouched pages cost
/// no memory).
pub const FDS: usize = 4096;

struct Entry {
    /// Bits 0-31: sequence (odd while written; 0 = never set). 32-47: port. 48-55: family
    /// (4 or 6).
    head: AtomicU64,
    /// The address's 16 bytes (IPv4 in the first four), big-endian halves.
    hi: AtomicU64,
    lo: AtomicU64,
}

/// The table: one entry per descriptor.
pub struct FdTable {
    entries: [Entry; FDS],
}

impl FdTable {
    /// An empty table (usable in a `static`).
    pub const fn new() -> FdTable {
        // A `const` initialiser, copied into each element (the array repeat needs one).
        #[allow(clippy::declare_interior_mutable_const)]
        const EMPTY: Entry = Entry {
            head: AtomicU64::new(0),
            hi: AtomicU64::new(0),
            lo: AtomicU64::new(0),
        };
        FdTable {
            entries: [EMPTY; FDS],
        }
    }

    fn entry(&self, fd: i32) -> Option<&Entry> {
        self.entries.get(usize::try_from(fd).ok()?)
    }

    /// Can `fd` be recorded?
    pub fn fits(&self, fd: i32) -> bool {
        self.entry(fd).is_some()
    }

    /// Record that `fd` was sending to `server`. `false` if `fd` is past the table.
    pub fn set(&self, fd: i32, server: SocketAddr) -> bool {
        let Some(e) = self.entry(fd) else {
            return false;
        };
        let (family, bytes) = match server.ip() {
            IpAddr::V4(v4) => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                (4u64, b)
            }
            IpAddr::V6(v6) => (6u64, v6.octets()),
        };
        let seq = (e.head.load(Ordering::Relaxed) as u32) | 1; // odd: being written
        e.head.store(u64::from(seq), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        let (hi, lo) = bytes.split_at(8);
        e.hi.store(
            u64::from_be_bytes(hi.try_into().unwrap_or_default()),
            Ordering::Relaxed,
        );
        e.lo.store(
            u64::from_be_bytes(lo.try_into().unwrap_or_default()),
            Ordering::Relaxed,
        );
        let done = u64::from(seq.wrapping_add(1).max(2))
            | (u64::from(server.port()) << 32)
            | (family << 48);
        e.head.store(done, Ordering::Release);
        true
    }

    /// The server `fd` was last steered away from, if any.
    pub fn get(&self, fd: i32) -> Option<SocketAddr> {
        let e = self.entry(fd)?;
        for _ in 0..2 {
            let head = e.head.load(Ordering::Acquire);
            let seq = head as u32;
            if seq == 0 {
                return None;
            }
            if seq & 1 == 1 {
                continue;
            }
            let (hi, lo) = (e.hi.load(Ordering::Relaxed), e.lo.load(Ordering::Relaxed));
            std::sync::atomic::fence(Ordering::Acquire);
            if e.head.load(Ordering::Relaxed) != head {
                continue;
            }
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&hi.to_be_bytes());
            bytes[8..].copy_from_slice(&lo.to_be_bytes());
            let port = (head >> 32) as u16;
            let ip = match (head >> 48) as u8 {
                4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
                _ => IpAddr::V6(Ipv6Addr::from(bytes)),
            };
            return Some(SocketAddr::new(ip, port));
        }
        None
    }
}

impl Default for FdTable {
    fn default() -> Self {
        FdTable::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_overwrites_per_fd() {
        let t = Box::new(FdTable::new());
        assert_eq!(t.get(3), None);
        let a: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        let b: SocketAddr = "[2001:db8::53]:53".parse().expect("addr");
        assert!(t.set(3, a));
        assert!(t.set(4, b));
        assert_eq!(t.get(3), Some(a));
        assert_eq!(t.get(4), Some(b));
        assert!(t.set(3, b));
        assert_eq!(t.get(3), Some(b));
        assert_eq!(t.get(5), None);
    }

    #[test]
    fn descriptors_outside_the_table_are_refused() {
        let t = Box::new(FdTable::new());
        let a: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        assert!(!t.set(-1, a));
        assert!(!t.set(FDS as i32, a));
        assert!(t.fits(FDS as i32 - 1));
        assert!(!t.fits(FDS as i32));
        assert_eq!(t.get(-1), None);
        assert_eq!(t.get(FDS as i32), None);
    }

    #[test]
    fn concurrent_readers_see_whole_addresses() {
        let t: &'static FdTable = Box::leak(Box::new(FdTable::new()));
        let a: SocketAddr = "10.0.0.2:53".parse().expect("addr");
        let b: SocketAddr = "[2001:db8::53]:5353".parse().expect("addr");
        let writer = std::thread::spawn(move || {
            for i in 0..20_000 {
                t.set(7, if i % 2 == 0 { a } else { b });
            }
        });
        for _ in 0..20_000 {
            if let Some(got) = t.get(7) {
                assert!(got == a || got == b, "torn read: {got}");
            }
        }
        writer.join().expect("writer");
    }
}
