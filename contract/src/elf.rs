//! What kind of program a file is, from its first bytes: a `#!` script, a dynamic ELF program
//! and its loader, or a static one. Used by the shim's exec hooks (to keep a glibc
//! `libbroker.so` out of a musl program) and by `broker run` (to send programs that cannot be
//! preloaded through the CONNECT listener).
//!
//! Pure and allocation-free: the shim runs it in a `vfork` child, where `malloc` could
//! deadlock on a lock held by another thread of the parent.

/// What the first bytes of an exec'd file say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// A script: `#!interp [arg]`. The kernel runs `interp` with our environment.
    Script {
        interp: &'a [u8],
        arg: Option<&'a [u8]>,
    },
    /// An ELF file with this `PT_INTERP` (dynamic program).
    Dynamic { interp: &'a [u8] },
    /// An ELF file without `PT_INTERP`: static, ignores `LD_PRELOAD`.
    Static,
    /// Anything else, or headers beyond the bytes read: left alone.
    Unknown,
}

fn u16_at(b: &[u8], off: usize, le: bool) -> Option<u16> {
    let a: [u8; 2] = b.get(off..off + 2)?.try_into().ok()?;
    Some(if le {
        u16::from_le_bytes(a)
    } else {
        u16::from_be_bytes(a)
    })
}

fn u32_at(b: &[u8], off: usize, le: bool) -> Option<u32> {
    let a: [u8; 4] = b.get(off..off + 4)?.try_into().ok()?;
    Some(if le {
        u32::from_le_bytes(a)
    } else {
        u32::from_be_bytes(a)
    })
}

fn u64_at(b: &[u8], off: usize, le: bool) -> Option<u64> {
    let a: [u8; 8] = b.get(off..off + 8)?.try_into().ok()?;
    Some(if le {
        u64::from_le_bytes(a)
    } else {
        u64::from_be_bytes(a)
    })
}

/// Classify a file from its first bytes (`head`; 1 KiB covers the headers of ordinary
/// programs, which put program headers and the interpreter path right after the ELF header).
pub fn inspect(head: &[u8]) -> Target<'_> {
    if let Some(rest) = head.strip_prefix(b"#!") {
        let line = rest.split(|&c| c == b'\n').next().unwrap_or(rest);
        let mut words = line
            .split(|&c| c == b' ' || c == b'\t')
            .filter(|w| !w.is_empty());
        return match words.next() {
            Some(interp) => Target::Script {
                interp,
                arg: words.next(),
            },
            None => Target::Unknown,
        };
    }
    elf_interp(head).unwrap_or(Target::Unknown)
}

fn elf_interp(h: &[u8]) -> Option<Target<'_>> {
    const PT_INTERP: u32 = 3;
    if h.get(..4)? != b"\x7fELF" {
        return None;
    }
    let le = match h.get(5)? {
        1 => true,
        2 => false,
        _ => return None,
    };
    // (phoff, phentsize, phnum) and where p_offset/p_filesz sit in a program header
    let (phoff, phentsize, phnum, wide) = match h.get(4)? {
        1 => (
            u64::from(u32_at(h, 28, le)?),
            u16_at(h, 42, le)?,
            u16_at(h, 44, le)?,
            false,
        ),
        2 => (
            u64_at(h, 32, le)?,
            u16_at(h, 54, le)?,
            u16_at(h, 56, le)?,
            true,
        ),
        _ => return None,
    };
    let phoff = usize::try_from(phoff).ok()?;
    for i in 0..usize::from(phnum) {
        let ph = phoff.checked_add(i.checked_mul(usize::from(phentsize))?)?;
        if u32_at(h, ph, le)? != PT_INTERP {
            continue;
        }
        let (off, size) = if wide {
            (u64_at(h, ph + 8, le)?, u64_at(h, ph + 32, le)?)
        } else {
            (
                u64::from(u32_at(h, ph + 4, le)?),
                u64::from(u32_at(h, ph + 16, le)?),
            )
        };
        let (off, size) = (usize::try_from(off).ok()?, usize::try_from(size).ok()?);
        let raw = h.get(off..off.checked_add(size)?)?;
        let interp = raw.split(|&c| c == 0).next().unwrap_or(raw);
        return Some(Target::Dynamic { interp });
    }
    Some(Target::Static)
}

pub fn basename(path: &[u8]) -> &[u8] {
    path.rsplit(|&c| c == b'/').next().unwrap_or(path)
}

/// Is `interp` glibc's dynamic loader (`ld-linux-x86-64.so.2`, `ld-linux-aarch64.so.1`,
/// `ld64.so.2`, ...)? Those load a glibc `libbroker.so`; any other loader may not.
pub fn is_glibc_loader(interp: &[u8]) -> bool {
    let name = basename(interp);
    name.starts_with(b"ld-linux") || name.starts_with(b"ld64.so") || name.starts_with(b"ld.so")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 little-endian header with one PT_INTERP program header.
    fn elf64(interp: Option<&[u8]>) -> Vec<u8> {
        let mut h = vec![0u8; 64 + 56 + 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2; // ELFCLASS64
        h[5] = 1; // little endian
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        h[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        h[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let p_type: u32 = if interp.is_some() { 3 } else { 1 };
        h[64..68].copy_from_slice(&p_type.to_le_bytes());
        if let Some(i) = interp {
            h[72..80].copy_from_slice(&120u64.to_le_bytes()); // p_offset
            h[96..104].copy_from_slice(&(i.len() as u64 + 1).to_le_bytes()); // p_filesz
            h[120..120 + i.len()].copy_from_slice(i);
        }
        h
    }

    #[test]
    fn elf_interpreters_are_read() {
        let musl = elf64(Some(b"/lib/ld-musl-x86_64.so.1"));
        assert_eq!(
            inspect(&musl),
            Target::Dynamic {
                interp: b"/lib/ld-musl-x86_64.so.1"
            }
        );
        assert_eq!(inspect(&elf64(None)), Target::Static);
        assert_eq!(inspect(&musl[..100]), Target::Unknown, "truncated headers");
        assert_eq!(inspect(b"hello"), Target::Unknown);
    }

    #[test]
    fn this_test_binary_is_glibc_dynamic() {
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read exe");
        match inspect(&exe[..exe.len().min(1024)]) {
            Target::Dynamic { interp } => assert!(is_glibc_loader(interp), "{interp:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn scripts_name_their_interpreter() {
        assert_eq!(
            inspect(b"#!/bin/sh\necho"),
            Target::Script {
                interp: b"/bin/sh",
                arg: None
            }
        );
        assert_eq!(
            inspect(b"#! /usr/bin/env  python3\n"),
            Target::Script {
                interp: b"/usr/bin/env",
                arg: Some(b"python3")
            }
        );
        assert_eq!(inspect(b"#!\n"), Target::Unknown);
    }

    #[test]
    fn glibc_loaders() {
        assert!(is_glibc_loader(b"/lib64/ld-linux-x86-64.so.2"));
        assert!(is_glibc_loader(
            b"/nix/store/abc-glibc-2.38/lib/ld-linux-x86-64.so.2"
        ));
        assert!(is_glibc_loader(b"/lib/ld-linux-aarch64.so.1"));
        assert!(!is_glibc_loader(b"/lib/ld-musl-x86_64.so.1"));
        assert!(!is_glibc_loader(b"/system/bin/linker64"));
    }
}
