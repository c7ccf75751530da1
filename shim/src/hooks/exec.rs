//! exec hooks: a child the shim cannot reach (static, Go, musl; see
//! [`broker_contract::elf::reach`]) gets the run's CONNECT fallback in its environment
//! ([`super::fallback`]), and one that cannot load a glibc `libbroker.so` (a dynamic musl
//! program) the environment without our `LD_PRELOAD` entry; see [`crate::exec`].
//!
//! Hooked: `execve`, `execv`, `execvpe`, `execvp`, `posix_spawn`, `posix_spawnp`, and the
//! variadic `execl`, `execle`, `execlp` (in C, `execl.c`: glibc's own build an argv and call
//! its internal `execve`, which no preload sees; ours call the hooks here). Not hooked:
//! glibc's internal spawns (`system`, `popen`): those start `/bin/sh`, a glibc program whose
//! own `execve` is hooked.
//!
//! These run in `vfork` children, so nothing here allocates or takes a lock: the work is
//! done in fixed buffers on the stack, with raw `open`/`read`/`access` calls. The real
//! functions are resolved by the constructor ([`resolve_all`]), never here.

use std::ffi::{c_char, c_int, CStr};

use super::fallback;
use crate::exec::{self, Reach};
use crate::ffi::{contain, environ, Guard, RealFn};

pub static REAL_EXECVE: RealFn = RealFn::new(c"execve");
pub static REAL_EXECV: RealFn = RealFn::new(c"execv");
pub static REAL_EXECVPE: RealFn = RealFn::new(c"execvpe");
pub static REAL_EXECVP: RealFn = RealFn::new(c"execvp");
pub static REAL_POSIX_SPAWN: RealFn = RealFn::new(c"posix_spawn");
pub static REAL_POSIX_SPAWNP: RealFn = RealFn::new(c"posix_spawnp");

/// Resolve the real exec functions from the constructor (a `vfork` child must not `dlsym`).
pub fn resolve_all() {
    for f in [
        &REAL_EXECVE,
        &REAL_EXECV,
        &REAL_EXECVPE,
        &REAL_EXECVP,
        &REAL_POSIX_SPAWN,
        &REAL_POSIX_SPAWNP,
    ] {
        let _ = f.addr();
    }
}

type Argv = *const *const c_char;

// The C-variadic hooks of execl.c. Referenced here so the linker keeps them (a static
// archive's objects are linked only when used); exported by the version script in build.rs.
// Left out of unit-test binaries, where they would replace libc's own.
#[cfg(not(test))]
unsafe extern "C" {
    fn execl(path: *const c_char, arg: *const c_char, ...) -> c_int;
    fn execle(path: *const c_char, arg: *const c_char, ...) -> c_int;
    fn execlp(file: *const c_char, arg: *const c_char, ...) -> c_int;
}

#[cfg(not(test))]
#[used]
static VARIADIC_HOOKS: [unsafe extern "C" fn(*const c_char, *const c_char, ...) -> c_int; 3] =
    [execl, execle, execlp];
type ExecveFn = unsafe extern "C" fn(*const c_char, Argv, Argv) -> c_int;
type ExecvFn = unsafe extern "C" fn(*const c_char, Argv) -> c_int;
type SpawnFn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const libc::posix_spawn_file_actions_t,
    *const libc::posix_spawnattr_t,
    Argv,
    Argv,
) -> c_int;

/// Environments with more entries than this are passed on unchanged.
const MAX_ENV: usize = 1024;
pub const PATH_MAX: usize = 4096;

/// Stack space for one decision; lives in the hook's frame until the real call returns.
struct Scratch {
    envp: [*const c_char; MAX_ENV + 1],
    preload: [u8; PATH_MAX],
    head: [u8; exec::HEAD_BYTES],
    script: [u8; PATH_MAX],
    fallback: fallback::Buffers,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            envp: [std::ptr::null(); MAX_ENV + 1],
            preload: [0; PATH_MAX],
            head: [0; exec::HEAD_BYTES],
            script: [0; PATH_MAX],
            fallback: fallback::Buffers::default(),
        }
    }
}

/// The `LD_PRELOAD=...` entry of `envp` and its index.
///
/// # Safety
/// `envp` is null or a NULL-terminated array of NUL-terminated strings.
unsafe fn find_preload(envp: Argv) -> Option<(usize, &'static [u8])> {
    if envp.is_null() {
        return None;
    }
    let mut i = 0;
    loop {
        // SAFETY: NULL-terminated array (caller's contract); `i` never passes the NULL.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            return None;
        }
        // SAFETY: each entry is NUL-terminated (caller's contract); it outlives the exec call.
        let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
        if let Some(value) = bytes.strip_prefix(b"LD_PRELOAD=") {
            return Some((i, value));
        }
        i += 1;
    }
}

/// Read the first bytes of the file at the NUL-terminated `path` into `buf`.
fn read_head<'a>(path: &[u8], buf: &'a mut [u8]) -> &'a [u8] {
    debug_assert_eq!(path.last(), Some(&0));
    // SAFETY: `path` is NUL-terminated; open/read/close are async-signal-safe syscalls and
    // `buf` is valid for `buf.len()` bytes.
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return &[];
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        &buf[..usize::try_from(n).unwrap_or(0)]
    }
}

/// Copy `parts` and a NUL into `out`; the written bytes including the NUL.
pub fn join_into<'a>(parts: &[&[u8]], out: &'a mut [u8]) -> Option<&'a [u8]> {
    let mut len = 0;
    for p in parts {
        out.get_mut(len..len + p.len())?.copy_from_slice(p);
        len += p.len();
    }
    *out.get_mut(len)? = 0;
    Some(&out[..=len])
}

/// `PATH` from the current environment, as `execvp` uses it.
fn current_path() -> &'static [u8] {
    // SAFETY: `environ` is libc's NULL-terminated environment array.
    match unsafe { find_var(environ(), b"PATH=") } {
        Some(v) => v,
        None => b"/bin:/usr/bin", // glibc's default for execvp
    }
}

/// # Safety
/// As [`find_preload`].
unsafe fn find_var(envp: Argv, prefix: &[u8]) -> Option<&'static [u8]> {
    if envp.is_null() {
        return None;
    }
    let mut i = 0;
    loop {
        // SAFETY: caller's contract.
        let entry = unsafe { *envp.add(i) };
        if entry.is_null() {
            return None;
        }
        // SAFETY: caller's contract.
        let bytes = unsafe { CStr::from_ptr(entry) }.to_bytes();
        if let Some(v) = bytes.strip_prefix(prefix) {
            return Some(v);
        }
        i += 1;
    }
}

/// Where `execvp` would find `file`: itself if it has a `/`, else the first executable
/// `dir/file` on `PATH`. Written NUL-terminated into `out`.
fn search_path<'a>(file: &[u8], out: &'a mut [u8]) -> Option<&'a [u8]> {
    if file.contains(&b'/') {
        return join_into(&[file], out);
    }
    let mut found = None;
    for dir in current_path().split(|&c| c == b':') {
        let dir: &[u8] = if dir.is_empty() { b"." } else { dir };
        let Some(candidate) = join_into(&[dir, b"/", file], out) else {
            continue;
        };
        // SAFETY: NUL-terminated path; access is an async-signal-safe syscall.
        if unsafe { libc::access(candidate.as_ptr().cast(), libc::X_OK) } == 0 {
            found = Some(candidate.len());
            break;
        }
    }
    found.map(|n| &out[..n])
}

/// How an exec'd program is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// It loads `libbroker.so`: the environment as it is.
    Preload,
    /// Out of the shim's reach: the CONNECT fallback, and our `LD_PRELOAD` entry kept (static,
    /// Go: for their glibc children) or dropped (another loader would fail to start).
    Proxy { keep_preload: bool },
}

/// Classify the program at `path`, following one `#!` (and `/usr/bin/env NAME`).
fn kind(path: &[u8], s: &mut Scratch) -> Kind {
    let Scratch { head, script, .. } = s;
    let proxy = |keep_preload| Kind::Proxy { keep_preload };
    let interp_path = match exec::reach(read_head(path, head)) {
        Reach::Preload => return Kind::Preload,
        Reach::Proxy(why) => return proxy(why.keeps_preload()),
        Reach::Script { interp, arg } => match (interp.ends_with(b"/env"), arg) {
            (true, Some(name)) if !name.starts_with(b"-") => search_path(name, script),
            (true, _) => None,
            (false, _) => join_into(&[interp], script),
        },
    };
    let Some(interp_path) = interp_path else {
        return Kind::Preload;
    };
    match exec::reach(read_head(interp_path, head)) {
        Reach::Proxy(why) => proxy(why.keeps_preload()),
        Reach::Preload | Reach::Script { .. } => Kind::Preload,
    }
}

/// The environment to exec `path` (NUL-terminated) with: `envp` itself, or a copy in `s`
/// with the CONNECT fallback's variables and without our `LD_PRELOAD` entry where it must go.
///
/// # Safety
/// `envp` as in [`find_preload`]; the result borrows from `envp` and `s`.
unsafe fn env_for(path: &[u8], envp: Argv, s: &mut Scratch) -> Argv {
    // SAFETY: caller's contract.
    let Some((index, value)) = (unsafe { find_preload(envp) }) else {
        return envp;
    };
    if !exec::preload_names_shim(value) {
        return envp;
    }
    let Kind::Proxy { keep_preload } = kind(path, s) else {
        return envp;
    };
    let fallback = fallback::get();
    // Our entry: kept as it is, rewritten without us, or left out (nothing else in it).
    let preload: Option<*const c_char> = if keep_preload {
        if fallback.is_none() {
            return envp;
        }
        // SAFETY: `index` is an entry of the NULL-terminated array (found above).
        Some(unsafe { *envp.add(index) })
    } else {
        const NAME: &[u8] = b"LD_PRELOAD=";
        s.preload[..NAME.len()].copy_from_slice(NAME);
        let Some(n) = exec::strip_preload(value, &mut s.preload[NAME.len()..PATH_MAX - 1]) else {
            return envp;
        };
        s.preload[NAME.len() + n] = 0;
        (n > 0).then_some(s.preload.as_ptr().cast())
    };
    let mut out = 0;
    let mut full = false;
    let mut push = |entry: *const c_char| match s.envp.get_mut(out) {
        Some(slot) if out < MAX_ENV => {
            *slot = entry;
            out += 1;
        }
        _ => full = true,
    };
    // SAFETY: caller's contract (NULL-terminated array of NUL-terminated strings).
    for (i, entry) in unsafe { fallback::iter_env(envp) }.enumerate() {
        if i == index {
            if let Some(preload) = preload {
                push(preload);
            }
        } else if fallback.is_none() || !fallback::replaces(entry) {
            push(entry.as_ptr().cast());
        }
    }
    if let Some(fallback) = fallback {
        // SAFETY: as above.
        fallback.entries(
            unsafe { fallback::iter_env(envp) },
            &mut s.fallback,
            &mut push,
        );
    }
    if full {
        return envp;
    }
    s.envp[out] = std::ptr::null();
    s.envp.as_ptr()
}

/// The environment for exec'ing the program `file` (searched on `PATH` if `search`).
///
/// # Safety
/// `file` is a NUL-terminated string; `envp` as in [`find_preload`].
unsafe fn decide(file: *const c_char, search: bool, envp: Argv, s: &mut Scratch) -> Argv {
    let Some(_guard) = Guard::enter() else {
        return envp;
    };
    if file.is_null() {
        return envp;
    }
    // SAFETY: NUL-terminated (exec's contract).
    let file = unsafe { CStr::from_ptr(file) }.to_bytes_with_nul();
    let mut path = [0u8; PATH_MAX];
    let path: &[u8] = if search {
        match search_path(&file[..file.len() - 1], &mut path) {
            Some(p) => p,
            None => return envp,
        }
    } else {
        file
    };
    // SAFETY: caller's contract.
    contain(|| unsafe { env_for(path, envp, s) }).unwrap_or(envp)
}

macro_rules! real {
    ($f:expr, $ty:ty) => {
        match $f.addr() {
            // SAFETY: resolved by dlsym for a function of exactly this signature.
            Some(a) => unsafe { std::mem::transmute::<usize, $ty>(a) },
            None => {
                // SAFETY: this thread's errno slot.
                unsafe { *libc::__errno_location() = libc::ENOSYS };
                return -1;
            }
        }
    };
}

/// `execve(2)`.
///
/// # Safety
/// Called by the agent with `execve(2)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn execve(path: *const c_char, argv: Argv, envp: Argv) -> c_int {
    let real = real!(REAL_EXECVE, ExecveFn);
    let mut s = Scratch::new();
    // SAFETY: the agent's arguments per execve's contract.
    let env = unsafe { decide(path, false, envp, &mut s) };
    // SAFETY: as above; `env` lives in `s` or is `envp`.
    unsafe { real(path, argv, env) }
}

/// `execv(3)`: `execve` with the current environment.
///
/// # Safety
/// Called by the agent with `execv(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn execv(path: *const c_char, argv: Argv) -> c_int {
    let mut s = Scratch::new();
    // SAFETY: `environ` is libc's environment; the agent's path per execv's contract.
    let env = unsafe { decide(path, false, environ(), &mut s) };
    if env == environ() {
        let real = real!(REAL_EXECV, ExecvFn);
        // SAFETY: the agent's own arguments.
        return unsafe { real(path, argv) };
    }
    let real = real!(REAL_EXECVE, ExecveFn);
    // SAFETY: the agent's arguments with our environment copy.
    unsafe { real(path, argv, env) }
}

/// `execvpe(3)`.
///
/// # Safety
/// Called by the agent with `execvpe(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn execvpe(file: *const c_char, argv: Argv, envp: Argv) -> c_int {
    let real = real!(REAL_EXECVPE, ExecveFn);
    let mut s = Scratch::new();
    // SAFETY: the agent's arguments per execvpe's contract.
    let env = unsafe { decide(file, true, envp, &mut s) };
    // SAFETY: as above.
    unsafe { real(file, argv, env) }
}

/// `execvp(3)`: `execvpe` with the current environment.
///
/// # Safety
/// Called by the agent with `execvp(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn execvp(file: *const c_char, argv: Argv) -> c_int {
    let mut s = Scratch::new();
    // SAFETY: `environ` is libc's environment; the agent's file per execvp's contract.
    let env = unsafe { decide(file, true, environ(), &mut s) };
    if env == environ() {
        let real = real!(REAL_EXECVP, ExecvFn);
        // SAFETY: the agent's own arguments.
        return unsafe { real(file, argv) };
    }
    let real = real!(REAL_EXECVPE, ExecveFn);
    // SAFETY: the agent's arguments with our environment copy.
    unsafe { real(file, argv, env) }
}

/// `posix_spawn(3)`.
///
/// # Safety
/// Called by the agent with `posix_spawn(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: Argv,
    envp: Argv,
) -> c_int {
    let real = match REAL_POSIX_SPAWN.addr() {
        // SAFETY: dlsym address of a function with this signature.
        Some(a) => unsafe { std::mem::transmute::<usize, SpawnFn>(a) },
        None => return libc::ENOSYS,
    };
    let mut s = Scratch::new();
    // SAFETY: the agent's arguments per posix_spawn's contract.
    let env = unsafe { decide(path, false, envp, &mut s) };
    // SAFETY: as above; posix_spawn copies what it needs before returning.
    unsafe { real(pid, path, actions, attr, argv, env) }
}

/// `posix_spawnp(3)`.
///
/// # Safety
/// Called by the agent with `posix_spawnp(3)`'s arguments.
#[cfg_attr(not(test), no_mangle)]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    actions: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: Argv,
    envp: Argv,
) -> c_int {
    let real = match REAL_POSIX_SPAWNP.addr() {
        // SAFETY: dlsym address of a function with this signature.
        Some(a) => unsafe { std::mem::transmute::<usize, SpawnFn>(a) },
        None => return libc::ENOSYS,
    };
    let mut s = Scratch::new();
    // SAFETY: the agent's arguments per posix_spawnp's contract.
    let env = unsafe { decide(file, true, envp, &mut s) };
    // SAFETY: as above.
    unsafe { real(pid, file, actions, attr, argv, env) }
}
