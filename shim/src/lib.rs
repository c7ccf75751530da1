//! `libbroker.so`: preloaded into the agent (`LD_PRELOAD`), it reroutes connections for
//! managed API hosts to the local broker and makes the agent's TLS stacks trust the broker's
//! run CA, so the agent needs no proxy settings and never holds a real credential.
//!
//! # What it does
//!
//! - **Resolution** (`getaddrinfo`, `gethostbyname*`): every managed hostname resolves to the
//!   run's one fake loopback address `127.77.<run slot>.1` ([`broker_contract::run_ipv4`]).
//! - **Connect** (`connect`, `__connect`): a TCP connect to a fake address of this run goes to
//!   the broker's one listener of the run, which learns the host from the TLS server name
//!   (SNI); with `deny_unlisted`, TCP to anywhere but loopback is refused.
//!   Everything else passes through untouched. See [`decide`]. `sendto`/`sendmsg` with
//!   `MSG_FASTOPEN` (TCP Fast Open connects as it sends) are routed the same way.
//! - **DNS** (`connect`/`sendto`/`sendmsg` to port 53, `recvfrom`/`recvmsg`): resolvers that
//!   bypass `getaddrinfo` (c-ares in Node and Bun) are steered to the run's DNS responder in the
//!   broker, which answers managed names with the run's fake address; see [`hooks::dns`].
//! - **TLS trust**: OpenSSL's `SSL_CTX_new`/`SSL_CTX_new_ex`/`SSL_CTX_set_cert_store` and
//!   GnuTLS's `gnutls_certificate_allocate_credentials` add the run CA to each new store; Node,
//!   which links OpenSSL statically, gets `NODE_EXTRA_CA_CERTS` (see [`env`](mod@env)).
//! - **Environment** (constructor): placeholders for the managed credential variables; a real
//!   key found there is replaced by its placeholder and scrubbed from `/proc/<pid>/environ`,
//!   and with `broker serve` handed to it as this process tree's own run ([`handover`]).
//! - **exec** (`execve`, `execv`, `execvp`, `execvpe`, `execl*`, `posix_spawn`, `posix_spawnp`): a
//!   program out of this library's reach (static, Go, musl) gets the run's CONNECT fallback
//!   (`HTTPS_PROXY` and a CA bundle), and one that cannot load it (musl) is started without it.
//!
//! # Why this crate needs `unsafe`
//!
//! The workspace forbids `unsafe` everywhere else. An `LD_PRELOAD` library cannot avoid it: it
//! exports C functions under libc's and OpenSSL's names, receives raw pointers from the agent,
//! finds the real functions with `dlsym`/`dladdr` and calls them through transmuted pointers,
//! and edits the process environment. Every `unsafe` block says why it is sound; the decisions
//! themselves ([`decide`], [`config`](mod@config), [`env`](mod@env)'s planning) are safe Rust, tested without
//! preloading anything.
//!
//! # Rules every hook follows
//!
//! - A bug in the shim must not take the agent down: hook logic runs inside
//!   [`ffi::contain`] (`catch_unwind`) and falls back to the real call.
//! - A thread-local guard ([`ffi::Guard`]) sends re-entrant calls straight to the real function.
//! - Never block: `connect` calls the real `connect` on the same fd with the new address and
//!   returns its result (`EINPROGRESS` for non-blocking sockets).
//! - Nothing that `fork` can strand: no threads, no mutexes; caches are atomics, state is
//!   set once by the constructor before `main`.
//!
//! # Children and what a preload cannot reach
//!
//! `LD_PRELOAD` and `BROKER_SHIM_CONFIG` are inherited, so every exec'd child of the agent is
//! covered too. Static binaries and Go programs (raw syscalls) ignore a preload, and a
//! glibc-built `libbroker.so` makes *dynamic musl* programs fail to start (exit 127): the exec
//! hooks ([`exec`], [`hooks::fallback`]) give such a child `HTTPS_PROXY` to the run's CONNECT
//! listener and a CA bundle with the run CA, and start a musl one without our `LD_PRELOAD`
//! entry. Not reached: io_uring, setuid programs, and children started with a scrubbed
//! environment (or by a static program's own `execve`, which no preload sees).

#![cfg_attr(test, allow(dead_code))]

use std::path::Path;
use std::sync::OnceLock;

use broker_contract::{ShimConfig, DAEMON_CONTROL_SOCKET, ENV_SHIM_ACTIVE, ENV_SHIM_CONFIG};

pub mod config;
pub mod decide;
pub mod env;
pub mod exec;
pub mod fdtable;
pub mod ffi;
pub mod handover;
pub mod hooks;
mod log;

static CONFIG: OnceLock<ShimConfig> = OnceLock::new();

/// This run's config, once the constructor has loaded one. Never blocks (the only `set` is
/// in the constructor).
pub fn config() -> Option<&'static ShimConfig> {
    CONFIG.get()
}

/// Runs when the library is loaded, before the program's `main`, with a single thread.
extern "C" fn constructor() {
    let _ = ffi::contain(init);
}

#[used]
#[cfg_attr(not(test), link_section = ".init_array")]
static CONSTRUCTOR: extern "C" fn() = constructor;

fn init() {
    hooks::net::resolve_all();
    hooks::dns::resolve_all();
    hooks::exec::resolve_all();
    let get = |k: &str| std::env::var_os(k);
    let location = config::locate(&get);
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let trust = config::Trust::new(uid, config::system_run_dir(&get));
    // No `broker serve` of this user: the system broker's, if there is one.
    let (location, loaded) = match config::load(&location, &trust) {
        Err(config::LoadError::Missing(config::Location::Daemon(_))) => {
            let system = trust.system_location();
            let loaded = config::load(&system, &trust);
            (system, loaded)
        }
        loaded => (location, loaded),
    };
    match loaded {
        Ok(cfg) => {
            let (cfg, handed) = hand_over_real_keys(cfg, &location, &trust);
            // SAFETY: the constructor runs before `main`, with the process's only thread.
            unsafe {
                env::apply(&cfg, &handed);
                env::set(ENV_SHIM_ACTIVE, b"1");
            }
            hooks::fallback::prepare(&cfg);
            let _ = CONFIG.set(cfg);
        }
        Err(why) => {
            // One line per process tree, and only when someone preloaded us on purpose (not a
            // system-wide /etc/ld.so.preload).
            let preloaded = get("LD_PRELOAD")
                .is_some_and(|p| p.as_encoded_bytes().windows(9).any(|w| w == b"libbroker"));
            let warned = get(ENV_SHIM_ACTIVE).is_some_and(|v| v == "0");
            if preloaded && !warned {
                log::line(&format!(
                    "no broker running ({why}); nothing is rerouted and managed hosts get only \
                     placeholders"
                ));
            }
            // SAFETY: as above.
            unsafe { env::set(ENV_SHIM_ACTIVE, b"0") };
        }
    }
}

/// With the daemon's config (a bare `LD_PRELOAD`), real keys in the environment go to
/// `broker serve`, which opens a run of this process tree's own with them; that run's config
/// then replaces the daemon's, here and (through `BROKER_SHIM_CONFIG`) in every child. See
/// [`handover`]. Runs started by `broker run` or a launcher took their keys already.
fn hand_over_real_keys(
    cfg: ShimConfig,
    location: &config::Location,
    trust: &config::Trust,
) -> (ShimConfig, env::Handed) {
    // Who may receive the keys: a daemon of this user (or root), or the system broker.
    let (daemon_config, receivers) = match location {
        config::Location::Daemon(path) => (path.as_path(), [Some(trust.my_uid), Some(0)]),
        config::Location::System(path) => (path.as_path(), [trust.system_uid(), Some(0)]),
        _ => (Path::new(""), [None, None]),
    };
    if daemon_config.as_os_str().is_empty() {
        let why_not = "this process belongs to a run started by `broker run` or a launcher, \
                       which takes keys from its own environment only";
        return (
            cfg,
            env::Handed {
                vars: Vec::new(),
                why_not: why_not.into(),
            },
        );
    };
    let get = |k: &str| std::env::var_os(k);
    let keys = env::real_keys(&env::managed_vars(&cfg), &get);
    // Hidden but not among `keys`: a value that cannot be sent.
    let unsendable = "its value has spaces or control characters".to_string();
    if keys.is_empty() {
        return (
            cfg,
            env::Handed {
                vars: Vec::new(),
                why_not: unsendable,
            },
        );
    }
    let vars: Vec<String> = keys.iter().map(|(var, _)| var.clone()).collect();
    let socket = daemon_config.with_file_name(DAEMON_CONTROL_SOCKET);
    let opened = handover::open_run(&socket, keys, &receivers).and_then(|path| {
        let run_config = config::load(&config::Location::Explicit(path.clone()), trust)
            .map_err(|e| e.to_string())?;
        Ok((path, run_config))
    });
    match opened {
        Ok((path, run_config)) => {
            // SAFETY: the constructor runs before `main`, with the process's only thread.
            unsafe { env::set(ENV_SHIM_CONFIG, path.as_os_str().as_encoded_bytes()) };
            (
                run_config,
                env::Handed {
                    vars,
                    why_not: unsendable,
                },
            )
        }
        Err(why_not) => (
            cfg,
            env::Handed {
                vars: Vec::new(),
                why_not,
            },
        ),
    }
}
