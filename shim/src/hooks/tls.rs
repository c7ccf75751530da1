//! TLS trust hooks: OpenSSL (`SSL_CTX_new`, `SSL_CTX_new_ex`, `SSL_CTX_set_cert_store`) and
//! GnuTLS (`gnutls_certificate_allocate_credentials`) add the run CA to every new trust store.
//!
//! A process can hold more than one copy of a TLS library (Python loads `_ssl` with
//! `RTLD_LOCAL`; psycopg2-binary vendors its own OpenSSL), and mixing objects of two copies
//! crashes. So the real function is found for each call site (see
//! [`crate::ffi::resolve_for_caller`]), and every helper used on its objects (`X509_STORE_add_cert`,
//! `PEM_read_bio_X509`, ...) is looked up through the handle of the very library that real
//! function lives in, which pulls its own libcrypto.
#![allow(non_snake_case)]

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};

use crate::ffi::{
    contain, handle_symbol, hook_with_caller, object_of, open_loaded, resolve_for_caller, Guard,
};

/// One copy of a TLS library in the process: its functions, all from the same object.
pub struct Lib<const N: usize> {
    syms: [usize; N],
    /// OpenSSL only: the run CA parsed by this copy's libcrypto (`X509 *`s), built lazily.
    certs: AtomicPtr<Vec<usize>>,
}

const MAX_LIBS: usize = 8;
const MAX_SITES: usize = 64;

/// The copies of one TLS library seen so far, and which copy each call site uses.
///
/// Lock-free (a `fork` can never strand it): slots are claimed with compare-and-swap and
/// entries are never freed. Two threads racing may build the same entry twice; both work.
pub struct Libs<const N: usize> {
    names: [&'static CStr; N],
    sonames: &'static [&'static CStr],
    libs: [AtomicPtr<Lib<N>>; MAX_LIBS],
    site_keys: [AtomicUsize; MAX_SITES],
    site_libs: [AtomicPtr<Lib<N>>; MAX_SITES],
}

impl<const N: usize> Libs<N> {
    const fn new(names: [&'static CStr; N], sonames: &'static [&'static CStr]) -> Self {
        Libs {
            names,
            sonames,
            libs: [const { AtomicPtr::new(null_mut()) }; MAX_LIBS],
            site_keys: [const { AtomicUsize::new(0) }; MAX_SITES],
            site_libs: [const { AtomicPtr::new(null_mut()) }; MAX_SITES],
        }
    }

    /// The real function number `sym` for a call from `caller`, and the library copy it
    /// belongs to (`None` when that copy cannot be registered; the call still works).
    pub fn resolve(&self, sym: usize, caller: usize) -> Option<(usize, Option<&'static Lib<N>>)> {
        if caller != 0 {
            for (key, lib) in self.site_keys.iter().zip(&self.site_libs) {
                if key.load(Ordering::Acquire) == caller {
                    // SAFETY: non-null entries are leaked boxes, never freed.
                    if let Some(lib) = unsafe { lib.load(Ordering::Acquire).as_ref() } {
                        if lib.syms[sym] != 0 {
                            return Some((lib.syms[sym], Some(lib)));
                        }
                    }
                }
            }
        }
        let real = resolve_for_caller(self.names[sym], caller, self.sonames)?;
        let lib = self.lib_of(sym, real);
        if let (Some(lib), true) = (lib, caller != 0) {
            self.remember_site(caller, lib);
        }
        Some((real, lib))
    }

    fn remember_site(&self, caller: usize, lib: &'static Lib<N>) {
        for (key, slot) in self.site_keys.iter().zip(&self.site_libs) {
            if key
                .compare_exchange(0, caller, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                slot.store(std::ptr::from_ref(lib).cast_mut(), Ordering::Release);
                return;
            }
        }
    }

    fn lib_of(&self, sym: usize, real: usize) -> Option<&'static Lib<N>> {
        for slot in &self.libs {
            // SAFETY: non-null entries are leaked boxes, never freed.
            if let Some(lib) = unsafe { slot.load(Ordering::Acquire).as_ref() } {
                if lib.syms[sym] == real {
                    return Some(lib);
                }
            }
        }
        let (_, path) = object_of(real)?;
        let handle = open_loaded(path)?; // kept: the copy must stay loaded while we use it
        let mut syms = [0usize; N];
        for (s, name) in syms.iter_mut().zip(self.names) {
            // SAFETY: `handle` is live (never closed).
            *s = unsafe { handle_symbol(handle, name) }.unwrap_or(0);
        }
        syms[sym] = real;
        let new = Box::into_raw(Box::new(Lib {
            syms,
            certs: AtomicPtr::new(null_mut()),
        }));
        for slot in &self.libs {
            if slot
                .compare_exchange(null_mut(), new, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // SAFETY: just leaked, never freed.
                return Some(unsafe { &*new });
            }
        }
        // SAFETY: `new` was never shared.
        drop(unsafe { Box::from_raw(new) });
        None
    }
}

// ---------------------------------------------------------------------------------------
// The run CA's PEM bytes, read once on first use (the constructor stays cheap).

static CA_PEM: AtomicPtr<Vec<u8>> = AtomicPtr::new(null_mut());
static CA_WARNED: AtomicBool = AtomicBool::new(false);

/// The run CA, read from `cfg.ca_file` on first use; `None` when there is no config or the
/// file cannot be read (said once on stderr).
pub fn ca_pem() -> Option<&'static [u8]> {
    // SAFETY: non-null values are leaked boxes, never freed.
    if let Some(v) = unsafe { CA_PEM.load(Ordering::Acquire).as_ref() } {
        return Some(v);
    }
    let cfg = crate::config()?;
    match std::fs::read(&cfg.ca_file) {
        Ok(pem) => {
            let new = Box::into_raw(Box::new(pem));
            match CA_PEM.compare_exchange(null_mut(), new, Ordering::AcqRel, Ordering::Acquire) {
                // SAFETY: just leaked, never freed.
                Ok(_) => Some(unsafe { &*new }),
                Err(winner) => {
                    // SAFETY: ours was never shared; the winner is leaked forever.
                    drop(unsafe { Box::from_raw(new) });
                    Some(unsafe { &*winner })
                }
            }
        }
        Err(e) => {
            if !CA_WARNED.swap(true, Ordering::Relaxed) {
                crate::log::line(&format!(
                    "cannot read the run CA {}: {e}; TLS to managed hosts will fail",
                    cfg.ca_file.display()
                ));
            }
            None
        }
    }
}

// ---------------------------------------------------------------------------------------
// OpenSSL

const SSL_CTX_NEW: usize = 0;
const SSL_CTX_NEW_EX: usize = 1;
const SSL_CTX_SET_CERT_STORE: usize = 2;
const SSL_CTX_GET_CERT_STORE: usize = 3;
const X509_STORE_ADD_CERT: usize = 4;
const BIO_NEW_MEM_BUF: usize = 5;
const BIO_FREE: usize = 6;
const PEM_READ_BIO_X509: usize = 7;
const X509_FREE: usize = 8;
const ERR_SET_MARK: usize = 9;
const ERR_POP_TO_MARK: usize = 10;

pub static OPENSSL: Libs<11> = Libs::new(
    [
        c"SSL_CTX_new",
        c"SSL_CTX_new_ex",
        c"SSL_CTX_set_cert_store",
        c"SSL_CTX_get_cert_store",
        c"X509_STORE_add_cert",
        c"BIO_new_mem_buf",
        c"BIO_free",
        c"PEM_read_bio_X509",
        c"X509_free",
        c"ERR_set_mark",
        c"ERR_pop_to_mark",
    ],
    &[c"libssl.so.3", c"libssl.so.1.1", c"libssl.so"],
);

type Ptr = *mut c_void;

impl Lib<11> {
    fn has(&self, syms: &[usize]) -> bool {
        syms.iter().all(|&s| self.syms[s] != 0)
    }

    /// The run CA as `X509 *`s of this copy, parsed once.
    ///
    /// # Safety
    /// `self` must describe a loaded OpenSSL copy (its symbols have OpenSSL's signatures).
    unsafe fn certs(&self) -> Option<&'static [usize]> {
        // SAFETY: non-null values are leaked boxes, never freed.
        if let Some(v) = unsafe { self.certs.load(Ordering::Acquire).as_ref() } {
            return Some(v);
        }
        if !self.has(&[
            BIO_NEW_MEM_BUF,
            BIO_FREE,
            PEM_READ_BIO_X509,
            X509_FREE,
            ERR_SET_MARK,
            ERR_POP_TO_MARK,
        ]) {
            return None;
        }
        let pem = ca_pem()?;
        let len = c_int::try_from(pem.len()).ok()?;
        // SAFETY: each address is this copy's definition of the named OpenSSL function, with
        // the signature written here (stable since OpenSSL 1.1).
        let mut parsed = unsafe {
            let set_mark: extern "C" fn() -> c_int = std::mem::transmute(self.syms[ERR_SET_MARK]);
            let pop_to_mark: extern "C" fn() -> c_int =
                std::mem::transmute(self.syms[ERR_POP_TO_MARK]);
            let new_mem_buf: extern "C" fn(*const c_void, c_int) -> Ptr =
                std::mem::transmute(self.syms[BIO_NEW_MEM_BUF]);
            let bio_free: extern "C" fn(Ptr) -> c_int = std::mem::transmute(self.syms[BIO_FREE]);
            let read_x509: extern "C" fn(Ptr, *mut Ptr, Ptr, Ptr) -> Ptr =
                std::mem::transmute(self.syms[PEM_READ_BIO_X509]);
            // The end of the PEM data leaves an error on the thread's queue: the mark keeps
            // the agent's view of the queue exactly as it was.
            set_mark();
            let mut out = Vec::new();
            let bio = new_mem_buf(pem.as_ptr().cast(), len);
            if !bio.is_null() {
                loop {
                    let x = read_x509(bio, null_mut(), null_mut(), null_mut());
                    if x.is_null() {
                        break;
                    }
                    out.push(x as usize);
                }
                bio_free(bio);
            }
            pop_to_mark();
            out
        };
        if parsed.is_empty() {
            return None;
        }
        parsed.shrink_to_fit();
        let new = Box::into_raw(Box::new(parsed));
        match self
            .certs
            .compare_exchange(null_mut(), new, Ordering::AcqRel, Ordering::Acquire)
        {
            // SAFETY: just leaked, never freed.
            Ok(_) => Some(unsafe { &*new }),
            Err(winner) => {
                // SAFETY: ours was never shared: free its certificates with this copy's
                // X509_free, then the box. The winner is leaked forever.
                unsafe {
                    let x509_free: extern "C" fn(Ptr) = std::mem::transmute(self.syms[X509_FREE]);
                    for &x in &*new {
                        x509_free(x as Ptr);
                    }
                    drop(Box::from_raw(new));
                    Some(&*winner)
                }
            }
        }
    }

    /// Add the run CA to `store` (an `X509_STORE *` of this copy).
    ///
    /// # Safety
    /// As [`Lib::certs`]; `store` is null or a live store of this copy.
    unsafe fn add_ca(&self, store: Ptr) {
        if store.is_null() || crate::config().is_none() || !self.has(&[X509_STORE_ADD_CERT]) {
            return;
        }
        // SAFETY: caller's contract.
        let Some(certs) = (unsafe { self.certs() }) else {
            return;
        };
        // SAFETY: this copy's functions with OpenSSL's signatures; `store` and the certs belong
        // to it. Adding a certificate already present is a no-op (OpenSSL >= 1.1.1).
        unsafe {
            let set_mark: extern "C" fn() -> c_int = std::mem::transmute(self.syms[ERR_SET_MARK]);
            let pop_to_mark: extern "C" fn() -> c_int =
                std::mem::transmute(self.syms[ERR_POP_TO_MARK]);
            let add: extern "C" fn(Ptr, Ptr) -> c_int =
                std::mem::transmute(self.syms[X509_STORE_ADD_CERT]);
            set_mark();
            for &x in certs {
                add(store, x as Ptr);
            }
            pop_to_mark();
        }
    }

    /// Add the run CA to the store of a freshly made `SSL_CTX *`.
    ///
    /// # Safety
    /// As [`Lib::certs`]; `ctx` is a live `SSL_CTX *` of this copy.
    unsafe fn add_ca_to_ctx(&self, ctx: Ptr) {
        if ctx.is_null() || crate::config().is_none() || !self.has(&[SSL_CTX_GET_CERT_STORE]) {
            return;
        }
        // SAFETY: this copy's SSL_CTX_get_cert_store on this copy's context.
        let store = unsafe {
            let get: extern "C" fn(Ptr) -> Ptr =
                std::mem::transmute(self.syms[SSL_CTX_GET_CERT_STORE]);
            get(ctx)
        };
        // SAFETY: caller's contract; the store belongs to the same copy.
        unsafe { self.add_ca(store) }
    }
}

hook_with_caller! {
    /// OpenSSL `SSL_CTX *SSL_CTX_new(const SSL_METHOD *)`: the real one, then the run CA added
    /// to the new context's store.
    fn SSL_CTX_new(meth: Ptr) -> Ptr = ssl_ctx_new_imp; x86_64: "rsi", aarch64: "x1"
}

extern "C" fn ssl_ctx_new_imp(meth: Ptr, caller: usize) -> Ptr {
    let guard = Guard::enter();
    let Some((real, lib)) = contain(|| OPENSSL.resolve(SSL_CTX_NEW, caller)).flatten() else {
        return null_mut(); // no OpenSSL to forward to: fail the way OpenSSL fails
    };
    // SAFETY: the real SSL_CTX_new of the caller's OpenSSL copy, with the caller's argument.
    let ctx = unsafe { std::mem::transmute::<usize, extern "C" fn(Ptr) -> Ptr>(real)(meth) };
    if let (Some(_), Some(lib)) = (guard, lib) {
        // SAFETY: `lib` is the copy `ctx` came from.
        contain(|| unsafe { lib.add_ca_to_ctx(ctx) });
    }
    ctx
}

hook_with_caller! {
    /// OpenSSL 3 `SSL_CTX *SSL_CTX_new_ex(OSSL_LIB_CTX *, const char *propq, const SSL_METHOD *)`.
    fn SSL_CTX_new_ex(libctx: Ptr, propq: Ptr, meth: Ptr) -> Ptr = ssl_ctx_new_ex_imp; x86_64: "rcx", aarch64: "x3"
}

extern "C" fn ssl_ctx_new_ex_imp(libctx: Ptr, propq: Ptr, meth: Ptr, caller: usize) -> Ptr {
    let guard = Guard::enter();
    let Some((real, lib)) = contain(|| OPENSSL.resolve(SSL_CTX_NEW_EX, caller)).flatten() else {
        return null_mut();
    };
    // SAFETY: the real SSL_CTX_new_ex of the caller's copy, with the caller's arguments.
    let ctx = unsafe {
        std::mem::transmute::<usize, extern "C" fn(Ptr, Ptr, Ptr) -> Ptr>(real)(libctx, propq, meth)
    };
    if let (Some(_), Some(lib)) = (guard, lib) {
        // SAFETY: `lib` is the copy `ctx` came from.
        contain(|| unsafe { lib.add_ca_to_ctx(ctx) });
    }
    ctx
}

hook_with_caller! {
    /// OpenSSL `void SSL_CTX_set_cert_store(SSL_CTX *, X509_STORE *)`: a program replacing the
    /// store (curl's CA cache, via `SSL_CTX_set1_cert_store`) gets the run CA in the new one.
    fn SSL_CTX_set_cert_store(ctx: Ptr, store: Ptr) -> () = ssl_ctx_set_cert_store_imp; x86_64: "rdx", aarch64: "x2"
}

extern "C" fn ssl_ctx_set_cert_store_imp(ctx: Ptr, store: Ptr, caller: usize) {
    let guard = Guard::enter();
    let Some((real, lib)) = contain(|| OPENSSL.resolve(SSL_CTX_SET_CERT_STORE, caller)).flatten()
    else {
        return;
    };
    if let (Some(_), Some(lib)) = (guard, lib) {
        // SAFETY: `store` belongs to the caller's copy, which `lib` is.
        contain(|| unsafe { lib.add_ca(store) });
    }
    // SAFETY: the real function of the caller's copy, with the caller's arguments.
    unsafe { std::mem::transmute::<usize, extern "C" fn(Ptr, Ptr)>(real)(ctx, store) }
}

// ---------------------------------------------------------------------------------------
// GnuTLS

const GNUTLS_ALLOCATE: usize = 0;
const GNUTLS_TRUST_MEM: usize = 1;
const GNUTLS_X509_FMT_PEM: c_int = 1;

pub static GNUTLS: Libs<2> = Libs::new(
    [
        c"gnutls_certificate_allocate_credentials",
        c"gnutls_certificate_set_x509_trust_mem",
    ],
    &[c"libgnutls.so.30"],
);

#[repr(C)]
struct Datum {
    data: *const u8,
    size: c_uint,
}

hook_with_caller! {
    /// GnuTLS `int gnutls_certificate_allocate_credentials(gnutls_certificate_credentials_t *)`:
    /// the run CA is added as trusted to every new credentials object (wget, git's libcurl).
    fn gnutls_certificate_allocate_credentials(res: *mut Ptr) -> c_int = gnutls_allocate_imp; x86_64: "rsi", aarch64: "x1"
}

/// GnuTLS's "internal error" code, returned when the real library cannot be found.
const GNUTLS_E_INTERNAL_ERROR: c_int = -59;

extern "C" fn gnutls_allocate_imp(res: *mut Ptr, caller: usize) -> c_int {
    let guard = Guard::enter();
    let Some((real, lib)) = contain(|| GNUTLS.resolve(GNUTLS_ALLOCATE, caller)).flatten() else {
        return GNUTLS_E_INTERNAL_ERROR;
    };
    // SAFETY: the real function of the caller's GnuTLS, with the caller's argument.
    let r = unsafe { std::mem::transmute::<usize, extern "C" fn(*mut Ptr) -> c_int>(real)(res) };
    if let (0, Some(_), Some(lib)) = (r, guard, lib) {
        contain(|| {
            let (Some(pem), false) = (ca_pem(), res.is_null() || lib.syms[GNUTLS_TRUST_MEM] == 0)
            else {
                return;
            };
            let Ok(size) = c_uint::try_from(pem.len()) else {
                return;
            };
            let datum = Datum {
                data: pem.as_ptr(),
                size,
            };
            // SAFETY: the same GnuTLS copy's trust_mem on the credentials it just allocated
            // (`*res`, written on success); GnuTLS copies the PEM data.
            unsafe {
                let trust_mem: extern "C" fn(Ptr, *const Datum, c_int) -> c_int =
                    std::mem::transmute(lib.syms[GNUTLS_TRUST_MEM]);
                trust_mem(*res, &datum, GNUTLS_X509_FMT_PEM);
            }
        });
    }
    r
}
