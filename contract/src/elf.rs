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

/// How many bytes of a program to read for [`inspect`] and [`is_go`]: the ELF header, the
/// program headers and the segments they point at in the first page. 1 KiB holds the headers
/// of C programs; a Go program puts its interpreter path and build-ID note near the end of
/// its first 4 KiB page (`PT_INTERP` at 0xfe4, the note at 0xf80..0x1000 with go1.19).
pub const HEAD_BYTES: usize = 4096;

/// Classify a file from its first bytes (`head`, [`HEAD_BYTES`] of them).
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

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;

/// The ELF header facts needed to walk the program headers.
struct Elf {
    le: bool,
    /// ELFCLASS64: where `p_offset`/`p_filesz` sit in a program header differs.
    wide: bool,
    phoff: usize,
    phentsize: usize,
    phnum: usize,
}

impl Elf {
    fn parse(h: &[u8]) -> Option<Elf> {
        if h.get(..4)? != b"\x7fELF" {
            return None;
        }
        let le = match h.get(5)? {
            1 => true,
            2 => false,
            _ => return None,
        };
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
        Some(Elf {
            le,
            wide,
            phoff: usize::try_from(phoff).ok()?,
            phentsize: usize::from(phentsize),
            phnum: usize::from(phnum),
        })
    }

    /// `(p_type, the segment's bytes if within h)` of program header `i`; `None` if the
    /// header itself lies beyond `h`.
    fn segment<'a>(&self, h: &'a [u8], i: usize) -> Option<(u32, Option<&'a [u8]>)> {
        let le = self.le;
        let ph = self.phoff.checked_add(i.checked_mul(self.phentsize)?)?;
        let p_type = u32_at(h, ph, le)?;
        let (off, size) = if self.wide {
            (u64_at(h, ph + 8, le)?, u64_at(h, ph + 32, le)?)
        } else {
            (
                u64::from(u32_at(h, ph + 4, le)?),
                u64::from(u32_at(h, ph + 16, le)?),
            )
        };
        let bytes = usize::try_from(off)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(off, size)| h.get(off..off.checked_add(size)?));
        Some((p_type, bytes))
    }
}

fn elf_interp(h: &[u8]) -> Option<Target<'_>> {
    let elf = Elf::parse(h)?;
    for i in 0..elf.phnum {
        let (p_type, bytes) = elf.segment(h, i)?;
        if p_type != PT_INTERP {
            continue;
        }
        let raw = bytes?;
        let interp = raw.split(|&c| c == 0).next().unwrap_or(raw);
        return Some(Target::Dynamic { interp });
    }
    Some(Target::Static)
}

/// Is this ELF program built by Go (it has a `Go` build-ID note)? Go makes its own system
/// calls for `connect` and DNS, static or dynamic, so a preloaded library never sees its
/// connections: it needs the CONNECT proxy like a static program.
pub fn is_go(h: &[u8]) -> bool {
    let Some(elf) = Elf::parse(h) else {
        return false;
    };
    (0..elf.phnum)
        .map_while(|i| elf.segment(h, i))
        .any(|(p_type, bytes)| p_type == PT_NOTE && bytes.is_some_and(|n| has_go_note(n, elf.le)))
}

/// Walk the notes of one `PT_NOTE` segment: `namesz, descsz, type`, then name and desc,
/// each padded to 4 bytes. Go's build ID is owner `Go`, type 4.
fn has_go_note(mut notes: &[u8], le: bool) -> bool {
    const NT_GO_BUILD_ID: u32 = 4;
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    while let (Some(namesz), Some(descsz), Some(kind)) = (
        u32_at(notes, 0, le),
        u32_at(notes, 4, le),
        u32_at(notes, 8, le),
    ) {
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let name = notes.get(12..12usize.saturating_add(namesz));
        if kind == NT_GO_BUILD_ID && name == Some(b"Go\0\0".as_slice()) {
            return true;
        }
        let next = pad(namesz)
            .zip(pad(descsz))
            .and_then(|(n, d)| 12usize.checked_add(n)?.checked_add(d));
        match next.and_then(|next| notes.get(next..)) {
            Some(rest) if !rest.is_empty() => notes = rest,
            _ => return false,
        }
    }
    false
}

/// How the broker reaches the connections of a program, from its first [`HEAD_BYTES`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach<'a> {
    /// A glibc program (or a file not recognised): `libbroker.so` in `LD_PRELOAD` works.
    Preload,
    /// A `#!` script: decided by its interpreter.
    Script {
        interp: &'a [u8],
        arg: Option<&'a [u8]>,
    },
    /// Out of the shim's reach: it needs `HTTPS_PROXY` to the run's CONNECT listener.
    Proxy(Unreachable<'a>),
}

/// Why a program is out of the shim's reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable<'a> {
    /// No ELF interpreter: nothing loads `LD_PRELOAD`.
    Static,
    /// Go makes its own system calls (static or dynamic).
    Go,
    /// Another dynamic loader (musl's `ld-musl-*.so.1`, ...).
    Loader(&'a [u8]),
}

impl Unreachable<'_> {
    /// May `libbroker.so` stay in `LD_PRELOAD`, for the program's glibc children? A static or
    /// Go program ignores it (or loads it harmlessly); another loader fails to start with a
    /// glibc library in it (musl: exit 127, "Error relocating libbroker.so").
    pub fn keeps_preload(&self) -> bool {
        !matches!(self, Unreachable::Loader(_))
    }
}

/// Classify a program for the broker from its first [`HEAD_BYTES`].
pub fn reach(head: &[u8]) -> Reach<'_> {
    match inspect(head) {
        Target::Script { interp, arg } => Reach::Script { interp, arg },
        Target::Dynamic { interp } if !is_glibc_loader(interp) => {
            Reach::Proxy(Unreachable::Loader(interp))
        }
        Target::Static | Target::Dynamic { .. } if is_go(head) => Reach::Proxy(Unreachable::Go),
        Target::Static => Reach::Proxy(Unreachable::Static),
        Target::Dynamic { .. } | Target::Unknown => Reach::Preload,
    }
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

    /// `elf64(interp)` with a second program header: a `PT_NOTE` holding one note.
    fn with_note(owner: &[u8; 4], kind: u32) -> Vec<u8> {
        let mut h = elf64(None);
        h[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
        let note_at = h.len();
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // namesz
        note.extend_from_slice(&8u32.to_le_bytes()); // descsz
        note.extend_from_slice(&kind.to_le_bytes());
        note.extend_from_slice(owner);
        note.extend_from_slice(b"buildid!");
        let mut ph = vec![0u8; 56];
        ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        ph[8..16].copy_from_slice(&(note_at as u64).to_le_bytes());
        ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
        h[120..176].copy_from_slice(&ph);
        h.extend_from_slice(&note);
        h
    }

    #[test]
    fn go_programs_are_known_by_their_build_id_note() {
        assert!(is_go(&with_note(b"Go\0\0", 4)));
        assert!(!is_go(&with_note(b"GNU\0", 4)), "another owner");
        assert!(!is_go(&with_note(b"Go\0\0", 1)), "another type");
        assert!(!is_go(&elf64(Some(b"/lib64/ld-linux-x86-64.so.2"))));
        assert!(!is_go(b"#!/bin/sh\n"));
        let go = with_note(b"Go\0\0", 4);
        assert!(!is_go(&go[..go.len() - 10]), "note cut off by the head");
        let exe = std::fs::read(std::env::current_exe().expect("exe")).expect("read exe");
        assert!(!is_go(&exe[..exe.len().min(HEAD_BYTES)]), "a Rust program");
        assert_eq!(reach(&go), Reach::Proxy(Unreachable::Go));
        assert_eq!(reach(&exe[..exe.len().min(HEAD_BYTES)]), Reach::Preload);
        assert_eq!(reach(&elf64(None)), Reach::Proxy(Unreachable::Static));
        let musl = elf64(Some(b"/lib/ld-musl-x86_64.so.1"));
        assert_eq!(
            reach(&musl),
            Reach::Proxy(Unreachable::Loader(b"/lib/ld-musl-x86_64.so.1"))
        );
        assert!(!Unreachable::Loader(b"x").keeps_preload());
        assert!(Unreachable::Go.keeps_preload() && Unreachable::Static.keeps_preload());
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
