//! Which exec'd programs may inherit `LD_PRELOAD=libbroker.so`, decided from the first bytes
//! of the file. Pure and allocation-free: the exec hooks run these in a `vfork` child (CPython's
//! `subprocess` uses `vfork`), where `malloc` could deadlock on a lock held by another thread
//! of the parent.
//!
//! A glibc-built `libbroker.so` makes a dynamic program with another loader (musl's
//! `ld-musl-*.so.1`, ...) fail to start (exit 127, "Error relocating libbroker.so"), so such
//! a child gets the environment without our entry in `LD_PRELOAD`. It runs unmanaged: its
//! connections are not rerouted (requests to managed hosts carry only placeholders).

pub use broker_contract::elf::{reach, Reach, HEAD_BYTES};

fn basename(path: &[u8]) -> &[u8] {
    path.rsplit(|&c| c == b'/').next().unwrap_or(path)
}

/// Is this the entry of `LD_PRELOAD` that names us?
pub fn is_shim_entry(entry: &[u8]) -> bool {
    basename(entry) == b"libbroker.so"
}

/// Does an `LD_PRELOAD` value name us?
pub fn preload_names_shim(value: &[u8]) -> bool {
    value.split(|&c| c == b' ' || c == b':').any(is_shim_entry)
}

/// `LD_PRELOAD` without our entry, written into `out` joined by `:`; returns its length
/// (0: nothing left, unset the variable), or `None` if `out` is too small.
pub fn strip_preload(value: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut len = 0;
    for entry in value.split(|&c| c == b' ' || c == b':') {
        if entry.is_empty() || is_shim_entry(entry) {
            continue;
        }
        if len > 0 {
            *out.get_mut(len)? = b':';
            len += 1;
        }
        out.get_mut(len..len + entry.len())?.copy_from_slice(entry);
        len += entry.len();
    }
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_stripping_keeps_other_entries() {
        let mut out = [0u8; 64];
        let n = strip_preload(b"/opt/b/libbroker.so:/usr/lib/libjemalloc.so", &mut out);
        assert_eq!(&out[..n.expect("fits")], b"/usr/lib/libjemalloc.so");
        let n = strip_preload(b"/a/x.so /opt/b/libbroker.so  /b/y.so", &mut out);
        assert_eq!(&out[..n.expect("fits")], b"/a/x.so:/b/y.so");
        assert_eq!(strip_preload(b"/opt/b/libbroker.so", &mut out), Some(0));
        assert_eq!(strip_preload(b"/a/very/long/entry.so", &mut [0u8; 4]), None);
        assert!(preload_names_shim(b"/x.so:/opt/libbroker.so"));
        assert!(!preload_names_shim(b"/opt/libbroker.so.bak"));
    }
}
