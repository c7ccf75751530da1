//! The CONNECT fallback for a program started from inside a run that the shim cannot reach
//! (static, Go, musl: [`broker_contract::elf::reach`]). Its environment gets `HTTPS_PROXY` to
//! the run's CONNECT listener (the run's ticket as the password) and the CA variables
//! ([`CA_BUNDLE_VARS`]) pointing at a bundle of the CA file it had plus the run CA: what
//! `broker run` gives such a program when it starts one itself (`broker/src/launch.rs`).
//!
//! Two halves. The constructor prepares what does not depend on the child ([`prepare`]: the
//! proxy entries, the run's directory). The exec hook, which runs in a `vfork` child, does the
//! rest with fixed buffers and raw system calls, no allocation and no locks: pick the bundle
//! to merge from the child's `SSL_CERT_FILE`, and write the merged file once per run.

use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::sync::OnceLock;

use broker_contract::{ShimConfig, CA_BUNDLE_VARS, MERGED_BUNDLE_PREFIX, SYSTEM_CA_BUNDLES};

use super::exec::{join_into, PATH_MAX};

/// What the constructor prepared for this run.
pub struct Fallback {
    /// `HTTPS_PROXY=<url>` and `https_proxy=<url>`.
    proxy: [CString; 2],
    /// The run CA, NUL-terminated.
    ca_file: CString,
    /// Where merged bundles go: the run's directory (the CA's), or this user's own (see
    /// `env::bundle_dir`).
    dir: Vec<u8>,
}

static FALLBACK: OnceLock<Fallback> = OnceLock::new();

/// Called by the constructor: prepare the fallback if this run's broker has a CONNECT listener.
pub fn prepare(cfg: &ShimConfig) {
    let Some(addr) = cfg.connect_proxy.as_deref() else {
        return;
    };
    let url = broker_contract::connect_proxy_url(addr, cfg.ticket.as_ref());
    let (Ok(upper), Ok(lower), Ok(ca_file)) = (
        CString::new(format!("HTTPS_PROXY={url}")),
        CString::new(format!("https_proxy={url}")),
        CString::new(cfg.ca_file.as_os_str().as_bytes()),
    ) else {
        return;
    };
    // Merged bundles go where this user may write (see `env::bundle_dir`): next to the run CA,
    // or, for the system broker's runs, a private directory of this user's.
    let get = |k: &str| std::env::var_os(k);
    let Some(dir) = crate::env::bundle_dir(&cfg.ca_file, &get) else {
        return;
    };
    let _ = FALLBACK.set(Fallback {
        proxy: [upper, lower],
        ca_file,
        dir: dir.into_os_string().into_vec(),
    });
}

/// This run's fallback, once the constructor prepared one.
pub fn get() -> Option<&'static Fallback> {
    FALLBACK.get()
}

/// Room for the six `VAR=<bundle path>` entries.
const ENTRIES: usize = 6 * 32 + 6 * 1024;

/// Stack space for the fallback of one exec.
pub struct Buffers {
    bundle: [u8; PATH_MAX],
    tmp: [u8; PATH_MAX],
    entries: [u8; ENTRIES],
    copy: [u8; 4096],
}

impl Default for Buffers {
    fn default() -> Buffers {
        Buffers {
            bundle: [0; PATH_MAX],
            tmp: [0; PATH_MAX],
            entries: [0; ENTRIES],
            copy: [0; 4096],
        }
    }
}

/// Does the environment entry `entry` hold a variable the fallback sets (or removes)?
pub fn replaces(entry: &[u8]) -> bool {
    let Some(eq) = entry.iter().position(|&c| c == b'=') else {
        return false;
    };
    let name = &entry[..eq];
    // NO_PROXY goes too: `broker run` lists the managed hosts there for preloaded programs,
    // and this one must send them to the CONNECT listener (see `launch::via_connect_proxy`).
    name == b"HTTPS_PROXY"
        || name == b"https_proxy"
        || name == b"NO_PROXY"
        || name == b"no_proxy"
        || CA_BUNDLE_VARS.iter().any(|v| v.as_bytes() == name)
}

/// The value of `SSL_CERT_FILE=` in `env`, the child's environment.
fn cert_file<'e>(env: impl Iterator<Item = &'e [u8]>) -> Option<&'e [u8]> {
    env.filter_map(|e| e.strip_prefix(b"SSL_CERT_FILE="))
        .find(|v| !v.is_empty())
}

impl Fallback {
    /// Push the fallback's entries through `push`, for a child whose environment is `env`.
    /// Pointers stay valid while `b` and `self` live.
    pub fn entries<'e>(
        &self,
        env: impl Iterator<Item = &'e [u8]>,
        b: &mut Buffers,
        mut push: impl FnMut(*const c_char),
    ) {
        for entry in &self.proxy {
            push(entry.as_ptr());
        }
        let bundle_len = self.bundle(cert_file(env), b);
        let bundle = &b.bundle[..bundle_len - 1];
        let mut at = 0;
        let mut starts = [0usize; 6];
        for (i, var) in CA_BUNDLE_VARS.iter().enumerate() {
            let Some(written) = join_into(&[var.as_bytes(), b"=", bundle], &mut b.entries[at..])
            else {
                return; // a path too long for the buffer: the child keeps its own CA variables
            };
            starts[i] = at;
            at += written.len();
        }
        for start in starts {
            push(b.entries[start..].as_ptr().cast());
        }
    }

    /// The bundle for a child whose `SSL_CERT_FILE` is `current`, written NUL-terminated into
    /// `b.bundle`; its length with the NUL. A bundle already merged for this run is kept; any
    /// other file (or the system's bundle when unset) is merged with the run CA. If that cannot
    /// be written, the run CA alone: managed hosts still verify, tunnelled ones do not.
    fn bundle(&self, current: Option<&[u8]>, b: &mut Buffers) -> usize {
        let ours = current.is_some_and(|c| {
            c.strip_prefix(self.dir.as_slice())
                .and_then(|rest| rest.strip_prefix(b"/"))
                .is_some_and(|name| {
                    name.starts_with(MERGED_BUNDLE_PREFIX.as_bytes()) && !name.contains(&b'/')
                })
        });
        let mut source = [0u8; PATH_MAX];
        let source = match current {
            Some(c) if ours => return join_into(&[c], &mut b.bundle).map_or(0, <[u8]>::len),
            Some(c) => join_into(&[c], &mut source),
            None => SYSTEM_CA_BUNDLES
                .iter()
                // SAFETY: NUL-terminated path; access is an async-signal-safe syscall.
                .find(|p| unsafe { libc::access(p.as_ptr(), libc::R_OK) } == 0)
                .map(|p| p.to_bytes_with_nul()),
        };
        if let Some(len) = source.and_then(|s| self.merge(s, b)) {
            return len;
        }
        join_into(&[self.ca_file.as_bytes()], &mut b.bundle).map_or(0, <[u8]>::len)
    }

    /// `<dir>/ssl-ca-<hash of source's path>.pem`: `source` then the run CA, written once per
    /// run (every later child reuses it) through a temporary file and `rename`, 0600.
    fn merge(&self, source: &[u8], b: &mut Buffers) -> Option<usize> {
        let mut hex = [0u8; 16];
        hex_u64(crate::env::fnv1a(&source[..source.len() - 1]), &mut hex);
        let prefix = MERGED_BUNDLE_PREFIX.as_bytes();
        let path = join_into(&[&self.dir, b"/", prefix, &hex, b".pem"], &mut b.bundle)?;
        let path_len = path.len();
        // SAFETY: NUL-terminated path; access is an async-signal-safe syscall.
        if unsafe { libc::access(path.as_ptr().cast(), libc::F_OK) } == 0 {
            return Some(path_len);
        }
        let mut pid = [0u8; 10];
        // SAFETY: getpid has no preconditions (in a vfork child it is the child's pid).
        let pid = decimal(unsafe { libc::getpid() }.unsigned_abs(), &mut pid);
        let tmp = join_into(
            &[&self.dir, b"/.", prefix, &hex, b".", pid, b".tmp"],
            &mut b.tmp,
        )?;
        // SAFETY: NUL-terminated path; open/write/close/rename/unlink are async-signal-safe.
        // O_EXCL|O_NOFOLLOW: never write through a file or link someone put there.
        unsafe {
            let fd = libc::open(
                tmp.as_ptr().cast(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            );
            if fd < 0 {
                return None;
            }
            let written = append_file(fd, source, &mut b.copy)
                .and_then(|last| match last {
                    Some(b'\n') | None => Some(()),
                    Some(_) => write_all(fd, b"\n"),
                })
                .and_then(|()| append_file(fd, self.ca_file.as_bytes_with_nul(), &mut b.copy));
            libc::close(fd);
            if written.is_some() && libc::rename(tmp.as_ptr().cast(), b.bundle.as_ptr().cast()) == 0
            {
                return Some(path_len);
            }
            libc::unlink(tmp.as_ptr().cast());
        }
        None
    }
}

/// Copy the file at NUL-terminated `path` to `fd`; the last byte copied (`None`: empty).
fn append_file(fd: libc::c_int, path: &[u8], buf: &mut [u8]) -> Option<Option<u8>> {
    // SAFETY: NUL-terminated path; open/read/close are async-signal-safe; `buf` is valid for
    // `buf.len()` bytes.
    unsafe {
        let src = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if src < 0 {
            return None;
        }
        let mut last = None;
        let result = loop {
            let n = libc::read(src, buf.as_mut_ptr().cast(), buf.len());
            match usize::try_from(n) {
                Ok(0) => break Some(last),
                Ok(n) => {
                    last = Some(buf[n - 1]);
                    if write_all(fd, &buf[..n]).is_none() {
                        break None;
                    }
                }
                Err(_) if *libc::__errno_location() == libc::EINTR => continue,
                Err(_) => break None,
            }
        };
        libc::close(src);
        result
    }
}

fn write_all(fd: libc::c_int, mut bytes: &[u8]) -> Option<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for its length; write is async-signal-safe.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => bytes = &bytes[n..],
            // SAFETY: this thread's errno slot.
            Err(_) if unsafe { *libc::__errno_location() } == libc::EINTR => {}
            _ => return None,
        }
    }
    Some(())
}

fn hex_u64(v: u64, out: &mut [u8; 16]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

fn decimal(mut v: u32, out: &mut [u8; 10]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return &out[i..];
        }
    }
}

/// The entries of a NULL-terminated environment array, as bytes.
///
/// # Safety
/// `envp` is null or a NULL-terminated array of NUL-terminated strings that outlive `'e`.
pub unsafe fn iter_env<'e>(envp: *const *const c_char) -> impl Iterator<Item = &'e [u8]> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if envp.is_null() {
            return None;
        }
        // SAFETY: caller's contract: `i` never passes the NULL entry.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            return None;
        }
        i += 1;
        // SAFETY: NUL-terminated and alive for `'e` (caller's contract).
        Some(unsafe { CStr::from_ptr(entry) }.to_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fallback(dir: &std::path::Path) -> Fallback {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "RUN-CA\n").expect("ca");
        Fallback {
            proxy: [
                c"HTTPS_PROXY=http://x".into(),
                c"https_proxy=http://x".into(),
            ],
            ca_file: CString::new(ca.as_os_str().as_bytes()).expect("path"),
            dir: dir.as_os_str().as_bytes().to_vec(),
        }
    }

    fn entries(f: &Fallback, env: &[&[u8]]) -> Vec<String> {
        let mut b = Box::<Buffers>::default();
        let mut out = Vec::new();
        f.entries(env.iter().copied(), &mut b, |p| {
            // SAFETY: the entries are NUL-terminated strings in `b` or `f`.
            out.push(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned());
        });
        out
    }

    fn bundle_of(entries: &[String]) -> PathBuf {
        let v = entries
            .iter()
            .find_map(|e| e.strip_prefix("SSL_CERT_FILE="))
            .expect("SSL_CERT_FILE set");
        PathBuf::from(v)
    }

    #[test]
    fn the_bundle_it_had_is_merged_with_the_run_ca_once_per_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fallback(dir.path());
        let own = dir.path().join("corporate.pem");
        std::fs::write(&own, "CORPORATE").expect("write");
        let env = format!("SSL_CERT_FILE={}", own.display());
        let got = entries(&f, &[b"PATH=/bin", env.as_bytes()]);
        assert_eq!(got.len(), 2 + CA_BUNDLE_VARS.len(), "{got:?}");
        assert_eq!(got[0], "HTTPS_PROXY=http://x");
        let bundle = bundle_of(&got);
        assert_eq!(bundle.parent(), Some(dir.path()));
        assert_eq!(
            std::fs::read(&bundle).expect("read"),
            b"CORPORATE\nRUN-CA\n"
        );
        for var in CA_BUNDLE_VARS {
            assert!(
                got.contains(&format!("{var}={}", bundle.display())),
                "{var}"
            );
        }
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&bundle)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // a grandchild that inherited the merged bundle keeps it; a second child reuses it
        let env = format!("SSL_CERT_FILE={}", bundle.display());
        assert_eq!(bundle_of(&entries(&f, &[env.as_bytes()])), bundle);
        std::fs::write(&own, "CHANGED").expect("write");
        let env = format!("SSL_CERT_FILE={}", own.display());
        assert_eq!(bundle_of(&entries(&f, &[env.as_bytes()])), bundle);
        let leftovers = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().as_bytes().starts_with(b"."))
            })
            .count();
        assert_eq!(leftovers, 0, "no temporary file left behind");
    }

    #[test]
    fn without_ssl_cert_file_the_system_bundle_is_merged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fallback(dir.path());
        let bundle = bundle_of(&entries(&f, &[b"SSL_CERT_FILE=", b"HOME=/root"]));
        let merged = std::fs::read(&bundle).expect("read");
        assert!(merged.ends_with(b"RUN-CA\n"));
        if SYSTEM_CA_BUNDLES
            .iter()
            .any(|p| std::path::Path::new(p.to_str().unwrap_or("")).is_file())
        {
            assert!(
                merged.len() > b"RUN-CA\n".len() * 10,
                "system roots included"
            );
        }
    }

    #[test]
    fn an_unreadable_bundle_leaves_the_run_ca_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fallback(dir.path());
        let got = entries(&f, &[b"SSL_CERT_FILE=/nonexistent/bundle.pem"]);
        assert_eq!(bundle_of(&got), dir.path().join("ca.pem"));
    }

    #[test]
    fn the_variables_it_sets_are_recognised() {
        assert!(replaces(b"HTTPS_PROXY=http://corp:3128"));
        assert!(replaces(b"https_proxy="));
        assert!(replaces(b"CURL_CA_BUNDLE=/x"));
        assert!(replaces(b"NO_PROXY=.openai.com"));
        assert!(replaces(b"no_proxy=api.github.com"));
        assert!(!replaces(b"HTTP_PROXY=http://corp"));
        assert!(!replaces(b"SSL_CERT_FILEX=/x"));
        assert!(!replaces(b"NO_EQUALS"));
    }

    #[test]
    fn numbers_are_written_without_allocating() {
        let mut hex = [0u8; 16];
        hex_u64(0x0123_4567_89ab_cdef, &mut hex);
        assert_eq!(&hex, b"0123456789abcdef");
        let mut d = [0u8; 10];
        assert_eq!(decimal(0, &mut d), b"0");
        assert_eq!(decimal(4_294_967_295, &mut d), b"4294967295");
    }
}
