//! The machinery every hook shares: the re-entry guard, panic containment, and finding the
//! real function behind a hooked name.

use std::cell::Cell;
use std::ffi::{c_int, c_void, CStr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// Set while this thread runs shim code (or a real resolver call made by the shim), so a
    /// hooked function reached from inside goes straight to the real one. `const` and without
    /// a destructor: usable at any point of a thread's life, no lazy registration.
    static IN_SHIM: Cell<bool> = const { Cell::new(false) };
}

/// Held while a hook runs its own logic (sets the thread-local `IN_SHIM` flag).
pub struct Guard(());

impl Guard {
    /// `None` when this thread is already inside the shim.
    pub fn enter() -> Option<Guard> {
        IN_SHIM
            .try_with(|c| (!c.replace(true)).then_some(Guard(())))
            .ok()
            .flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = IN_SHIM.try_with(|c| c.set(false));
    }
}

/// Run `f`, turning a panic into `None`: a bug in the shim must never unwind into the agent
/// (an `extern "C"` boundary would abort the process). Callers fall back to the real call.
pub fn contain<R>(f: impl FnOnce() -> R) -> Option<R> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).ok()
}

/// A libc function found with `dlsym(RTLD_NEXT)`, resolved once and cached in an atomic (no
/// lock for `fork` to strand). The constructor resolves the common ones eagerly.
pub struct RealFn {
    name: &'static CStr,
    addr: AtomicUsize,
}

impl RealFn {
    pub const fn new(name: &'static CStr) -> RealFn {
        RealFn {
            name,
            addr: AtomicUsize::new(0),
        }
    }

    /// The address of the next definition after this library, never our own hook.
    pub fn addr(&self) -> Option<usize> {
        match self.addr.load(Ordering::Acquire) {
            0 => {
                let found = next_symbol(self.name)?;
                self.addr.store(found, Ordering::Release);
                Some(found)
            }
            a => Some(a),
        }
    }
}

/// `dlsym(RTLD_NEXT, name)`, refusing an answer inside this library.
pub fn next_symbol(name: &CStr) -> Option<usize> {
    // SAFETY: `name` is NUL-terminated; RTLD_NEXT is a valid pseudo-handle from a shared object.
    let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    (p != 0 && !is_ours(p)).then_some(p)
}

/// `dlsym(handle, name)`, refusing an answer inside this library.
///
/// # Safety
/// `handle` must be a live handle from `dlopen`.
pub unsafe fn handle_symbol(handle: *mut c_void, name: &CStr) -> Option<usize> {
    // SAFETY: caller guarantees the handle; `name` is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, name.as_ptr()) } as usize;
    (p != 0 && !is_ours(p)).then_some(p)
}

/// The object containing `addr`: its load base and its path as the loader knows it.
pub fn object_of(addr: usize) -> Option<(usize, &'static CStr)> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads `addr` as a number and fills `info`.
    let ok = unsafe { libc::dladdr(addr as *const c_void, info.as_mut_ptr()) };
    if ok == 0 {
        return None;
    }
    // SAFETY: dladdr succeeded, so `info` is initialised; `dli_fname` points at the loader's
    // copy of the object name, which lives as long as the object stays loaded (objects we
    // resolve through are never unloaded while in use, and we keep a reference via dlopen).
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: non-null, NUL-terminated, see above.
    let name = unsafe { CStr::from_ptr(info.dli_fname) };
    Some((info.dli_fbase as usize, name))
}

/// Is `addr` inside this library? A real-function lookup that lands on our own hook would
/// recurse forever. A range check against our loaded segments, found once: `dladdr` would
/// scan a whole symbol table per call, which showed in every process's start-up.
pub fn is_ours(addr: usize) -> bool {
    static START: AtomicUsize = AtomicUsize::new(0);
    static END: AtomicUsize = AtomicUsize::new(0);
    let (mut start, mut end) = (START.load(Ordering::Relaxed), END.load(Ordering::Relaxed));
    if end == 0 {
        (start, end) = our_segments().unwrap_or((0, 0));
        START.store(start, Ordering::Relaxed);
        END.store(end, Ordering::Relaxed);
    }
    (start..end).contains(&addr)
}

/// The address range spanned by the `PT_LOAD` segments of the object holding this code.
fn our_segments() -> Option<(usize, usize)> {
    struct Search {
        me: usize,
        found: Option<(usize, usize)>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: dl_iterate_phdr passes a valid info for each loaded object and our `data`.
        let (info, search) = unsafe { (&*info, &mut *data.cast::<Search>()) };
        let phdrs: &[libc::Elf64_Phdr] = if info.dlpi_phdr.is_null() {
            &[]
        } else {
            // SAFETY: `dlpi_phnum` program headers at `dlpi_phdr`, owned by the loader.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let base = info.dlpi_addr as usize;
        let loads = phdrs.iter().filter(|p| p.p_type == libc::PT_LOAD);
        let span = loads.fold(None, |acc: Option<(usize, usize)>, p| {
            let (s, e) = (
                base + p.p_vaddr as usize,
                base + (p.p_vaddr + p.p_memsz) as usize,
            );
            Some(acc.map_or((s, e), |(a, b)| (a.min(s), b.max(e))))
        });
        match span {
            Some((s, e)) if (s..e).contains(&search.me) => {
                search.found = Some((s, e));
                1
            }
            _ => 0,
        }
    }
    let mut search = Search {
        me: our_segments as *const () as usize,
        found: None,
    };
    // SAFETY: `visit` only reads the loader's data and writes `search`, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), std::ptr::addr_of_mut!(search).cast()) };
    search.found
}

/// A handle on an already loaded object, by path or soname; never loads anything.
pub fn open_loaded(name: &CStr) -> Option<*mut c_void> {
    if name.is_empty() {
        return None;
    }
    // SAFETY: RTLD_NOLOAD only looks the object up among those already loaded; the handle
    // keeps it loaded, which is what we want for objects whose functions we keep.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    (!h.is_null()).then_some(h)
}

/// Find the real `name` for a call made from `caller` (a return address, or 0 if unknown):
/// 1. the next definition in the global scope (what the caller would have bound to without
///    us, when its library is global);
/// 2. the caller's own scope (Python loads `_ssl` with `RTLD_LOCAL`, so its libssl is only
///    visible from there; a vendored second OpenSSL too);
/// 3. the first already loaded object among `sonames`.
pub fn resolve_for_caller(name: &CStr, caller: usize, sonames: &[&CStr]) -> Option<usize> {
    if let Some(p) = next_symbol(name) {
        return Some(p);
    }
    if caller != 0 {
        if let Some((_, path)) = object_of(caller) {
            if let Some(h) = open_loaded(path) {
                // SAFETY: `h` is a live handle just returned by dlopen.
                let found = unsafe { handle_symbol(h, name) };
                // SAFETY: balances the dlopen above; the caller's object stays loaded because
                // it is executing this call.
                unsafe { libc::dlclose(h) };
                if found.is_some() {
                    return found;
                }
            }
        }
    }
    sonames.iter().find_map(|so| {
        let h = open_loaded(so)?;
        // SAFETY: `h` is live; we keep the reference so the object stays loaded.
        unsafe { handle_symbol(h, name) }
    })
}

extern "C" {
    /// libc's environment array (`environ(7)`).
    #[link_name = "environ"]
    pub static mut ENVIRON: *mut *mut std::ffi::c_char;
}

/// The current `environ` pointer (a NULL-terminated array of `NAME=value` strings).
pub fn environ() -> *const *const std::ffi::c_char {
    // SAFETY: reads the pointer value only (no reference to the static is formed).
    unsafe { ENVIRON }.cast()
}

/// Export a hook that needs its caller's return address: a naked entry point reads it (on
/// x86_64 from the top of the stack, on aarch64 from the link register) into the next free
/// argument register and tail-jumps to `$imp`, which takes the same arguments plus
/// `caller: usize`. The stack is untouched, so `$imp` returns straight to the real caller.
/// Other architectures pass 0 (the caller-scope lookup step is skipped).
macro_rules! hook_with_caller {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $imp:path; x86_64: $x86:literal, aarch64: $arm:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// Called by the agent with the arguments of the function it replaces.
        #[cfg(target_arch = "x86_64")]
        #[unsafe(naked)]
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(concat!("mov ", $x86, ", qword ptr [rsp]"), "jmp {imp}", imp = sym $imp)
        }

        $(#[$doc])*
        ///
        /// # Safety
        /// Called by the agent with the arguments of the function it replaces.
        #[cfg(target_arch = "aarch64")]
        #[unsafe(naked)]
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            core::arch::naked_asm!(concat!("mov ", $arm, ", x30"), "b {imp}", imp = sym $imp)
        }

        $(#[$doc])*
        ///
        /// # Safety
        /// Called by the agent with the arguments of the function it replaces.
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        #[cfg_attr(not(test), no_mangle)]
        pub unsafe extern "C" fn $name($($arg: $ty),*) -> $ret {
            // SAFETY: same arguments, caller unknown.
            unsafe { $imp($($arg,)* 0) }
        }
    };
}
pub(crate) use hook_with_caller;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_blocks_reentry_and_releases() {
        let g = Guard::enter().expect("first entry");
        assert!(Guard::enter().is_none());
        drop(g);
        assert!(Guard::enter().is_some());
    }

    #[test]
    fn contain_turns_panics_into_none() {
        assert_eq!(contain(|| 5), Some(5));
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let r: Option<()> = contain(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(r, None);
    }

    #[test]
    fn real_libc_symbols_resolve_and_ours_are_refused() {
        assert!(RealFn::new(c"connect").addr().is_some());
        assert!(is_ours(is_ours as *const () as usize));
        assert!(!is_ours(libc::connect as *const () as usize));
        assert!(resolve_for_caller(c"getaddrinfo", 0, &[]).is_some());
        assert!(resolve_for_caller(c"no_such_function_anywhere", 0, &[c"libc.so.6"]).is_none());
    }
}
