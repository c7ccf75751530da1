//! Keeping the broker's own process out of reach of the agent it serves.
//!
//! The agent runs as the same user (DESIGN.md section 7): it may read `/proc/<pid>/environ`
//! and `/proc/<pid>/mem` of any dumpable process of that user, attach a debugger, and start
//! `broker` itself with any environment. So, first thing in `main`, every command that may
//! read a secret:
//! - never runs under a preload: `LD_PRELOAD`/`LD_AUDIT` are stripped and the binary started
//!   again (the original `LD_PRELOAD` is kept in [`ENV_ORIGINAL_PRELOAD`] for the agent
//!   `broker run` starts, which gets it back after `libbroker.so`);
//! - makes itself non-dumpable (`PR_SET_DUMPABLE 0`): its `/proc/<pid>/{environ,mem,maps}`
//!   and `ptrace` are then closed to the same uid;
//! - takes `BROKER_PASSPHRASE` (and the new passphrase of `rekey`) out of its environment and
//!   overwrites the value in the initial environment block, which `/proc/<pid>/environ`
//!   shows and which an `execve` would otherwise carry along. `broker run` does the same for
//!   real keys it finds in its environment ([`forget_env`]).
//!
//! It also answers "was this process started inside a run?" ([`inside_run`]), which decides
//! whether upstream overrides (`--resolve`, `--upstream-ca`) are taken: a program the agent
//! starts must not point a credential at a server of its own.

use std::ffi::OsString;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::sync::{Mutex, OnceLock};

use zeroize::Zeroizing;

use crate::vault::ENV_PASSPHRASE;

/// The `LD_PRELOAD` this process was started with, kept across the restart without it.
pub const ENV_ORIGINAL_PRELOAD: &str = "BROKER_ORIGINAL_LD_PRELOAD";
/// The new passphrase of `broker rekey --to passphrase`.
pub const ENV_NEW_PASSPHRASE: &str = "BROKER_NEW_PASSPHRASE";

/// Variables of the dynamic loader that would put foreign code into the broker.
const LOADER_VARS: &[&str] = &["LD_PRELOAD", "LD_AUDIT"];

/// Secrets taken out of the environment at start, by variable name.
static SECRETS: Mutex<Vec<(&'static str, Zeroizing<String>)>> = Mutex::new(Vec::new());
/// Why this process counts as started inside a run, decided once from what it started with.
static INSIDE_RUN: OnceLock<Option<String>> = OnceLock::new();
/// `/proc/self/mem`, opened while the process was still dumpable: once it is not, the file
/// belongs to root and an ordinary user cannot open it, even for its own process.
static SELF_MEM: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Protect this process; called first thing by every command except the sandbox's own stages
/// (which hold no secret and must stay dumpable to write their namespace maps).
/// Returns only if the process is already free of a preload (else it starts again).
pub fn protect_process() {
    // Decide before anything is stripped: the preload is one of the signs.
    let _ = inside_run();
    let foreign = |var: &str| {
        std::env::var_os(var).is_some_and(|p| {
            let valgrinds_own = var == "LD_PRELOAD" && only_valgrind(&p);
            !p.is_empty() && !valgrinds_own
        })
    };
    if let Some(var) = LOADER_VARS.iter().copied().find(|var| foreign(var)) {
        restart_without_preload(var);
    }
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/mem");
    *SELF_MEM.lock().unwrap_or_else(|e| e.into_inner()) = mem.ok();
    if let Err(err) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("broker: warning: cannot make this process non-dumpable ({err}); a program of your user could read its memory");
    }
    let mut secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    for var in [ENV_PASSPHRASE, ENV_NEW_PASSPHRASE] {
        if let Some(value) = take_env(var) {
            secrets.push((var, value));
        }
    }
}

/// The value `var` (`BROKER_PASSPHRASE`, `BROKER_NEW_PASSPHRASE`) had when the process
/// started: taken out of the environment by [`protect_process`], or read from it where that
/// did not run (library use, unit tests).
pub fn secret_env(var: &str) -> Option<Zeroizing<String>> {
    let secrets = SECRETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, value)) = secrets.iter().find(|(name, _)| *name == var) {
        return Some(value.clone());
    }
    std::env::var(var).ok().map(Zeroizing::new)
}

/// Remove `vars` from this process's environment and overwrite their values in the initial
/// environment block (what `/proc/<pid>/environ` shows). Call before starting threads.
pub fn forget_env(vars: &[&str]) {
    for var in vars {
        drop(take_env(var));
    }
}

/// Take `var` out of the environment: its value, with the original bytes overwritten.
fn take_env(var: &str) -> Option<Zeroizing<String>> {
    let value = std::env::var_os(var)?;
    let value = Zeroizing::new(value.to_string_lossy().into_owned());
    // Single-threaded at this point (start of main, or before `broker run` starts its
    // runtime), so removing is not racing a reader.
    std::env::remove_var(var);
    if let Err(err) = overwrite_initial_env(var) {
        tracing::debug!(%err, var, "cannot overwrite the initial environment block");
    }
    Some(value)
}

/// Overwrite the value of `var` in the environment block the kernel set up at `execve`
/// (`env_start..env_end` of `/proc/self/stat`), through `/proc/self/mem`: a process may
/// always write its own memory there, and no `unsafe` is needed. libc's `environ` no longer
/// points at the entry ([`take_env`] removed it first), so nothing reads the overwritten bytes.
fn overwrite_initial_env(var: &str) -> std::io::Result<()> {
    let (start, end) = env_block_bounds()?;
    let len = usize::try_from(end.saturating_sub(start)).map_err(std::io::Error::other)?;
    let mut guard = SELF_MEM.lock().unwrap_or_else(|e| e.into_inner());
    let mem = guard
        .as_mut()
        .ok_or_else(|| std::io::Error::other("/proc/self/mem was not opened at start"))?;
    let mut block = Zeroizing::new(vec![0u8; len]);
    mem.seek(SeekFrom::Start(start))?;
    mem.read_exact(&mut block)?;
    let prefix = format!("{var}=");
    let mut offset = 0;
    for entry in block.split(|&b| b == 0) {
        if entry.starts_with(prefix.as_bytes()) {
            let value_at = offset + prefix.len();
            let blank = vec![b'x'; entry.len() - prefix.len()];
            mem.seek(SeekFrom::Start(start + value_at as u64))?;
            mem.write_all(&blank)?;
        }
        offset += entry.len() + 1;
    }
    Ok(())
}

/// `env_start` and `env_end`, fields 50 and 51 of `/proc/self/stat`.
fn env_block_bounds() -> std::io::Result<(u64, u64)> {
    let [start, end] = crate::procfs::stat_fields("self", [50, 51])
        .ok_or_else(|| std::io::Error::other("no env bounds in /proc/self/stat"))?;
    Ok((start, end))
}

/// Whether `preload` names only valgrind's own libraries (`vgpreload_<tool>-<platform>.so`),
/// each a root-owned file that no one else can write, in directories only root can write.
///
/// Valgrind puts these in `LD_PRELOAD` of the program it runs, and the broker cannot restart
/// out of them: the program runs inside valgrind's process (`/proc/self/exe` is valgrind's),
/// so `scripts/bench-instructions` could not count the broker's instructions. They are let
/// through because the restart exists to keep out a library the agent *wrote*, and a file
/// that only root can write is not one; and a broker run under valgrind is in the hands of
/// whoever started valgrind, who gets no more from it than from starting `broker` itself
/// (the vault opens only with the master key's source, which that user has or has not
/// anyway). Anything else in the list, or any `LD_AUDIT`, still means a restart.
fn only_valgrind(preload: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    // ld.so separates entries with colons or spaces.
    let mut entries = preload
        .as_bytes()
        .split(|&b| b == b':' || b == b' ')
        .filter(|e| !e.is_empty())
        .peekable();
    entries.peek().is_some()
        && entries.all(|entry| {
            let path = std::path::Path::new(std::ffi::OsStr::from_bytes(entry));
            is_valgrind_name(path) && only_root_can_write(path)
        })
}

fn is_valgrind_name(path: &std::path::Path) -> bool {
    path.is_absolute()
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("vgpreload_") && n.ends_with(".so"))
}

/// The file, after symlinks, and every directory above it are owned by root and not
/// writable by group or others.
fn only_root_can_write(path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    real.ancestors()
        .all(|p| std::fs::metadata(p).is_ok_and(|m| root_only_writable(m.uid(), m.mode())))
}

fn root_only_writable(owner_uid: u32, mode: u32) -> bool {
    owner_uid == 0 && mode & 0o022 == 0
}

/// Start this binary again with the same arguments, without the loader's variables.
fn restart_without_preload(found: &str) -> ! {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| OsString::from("broker"));
    let mut command = std::process::Command::new("/proc/self/exe");
    command.arg0(argv0).args(args);
    if let Some(preload) = std::env::var_os("LD_PRELOAD").filter(|p| !p.is_empty()) {
        command.env(ENV_ORIGINAL_PRELOAD, preload);
    }
    for var in LOADER_VARS {
        command.env_remove(var);
    }
    let err = command.exec();
    eprintln!("broker: refusing to run with {found} set (it would load foreign code into the process that holds your keys), and cannot restart without it: {err}");
    std::process::exit(1);
}

/// The `LD_PRELOAD` the user had before this process stripped its own (for the agent).
pub fn original_preload() -> Option<OsString> {
    std::env::var_os(ENV_ORIGINAL_PRELOAD)
        .or_else(|| std::env::var_os("LD_PRELOAD"))
        .filter(|p| !p.is_empty())
}

/// Why this process was started inside a broker run (by the agent or a program it started),
/// or `None`. Signs: the run's variables (`BROKER_SHIM_CONFIG`, `BROKER_SHIM_ACTIVE=1`),
/// `libbroker.so` in `LD_PRELOAD`, and an ancestor process that is a `broker run` or the
/// sandbox's init. A process that removed the variables and left the run's process tree
/// (a daemon started with `--no-sandbox` that outlives its run) is not recognised; in a
/// sandboxed run the sandbox's init is always an ancestor.
pub fn inside_run() -> Option<String> {
    INSIDE_RUN
        .get_or_init(|| {
            sign_in_environment().or_else(|| {
                broker_ancestor().map(|(pid, what)| format!("process {pid} above it is {what}"))
            })
        })
        .clone()
}

fn sign_in_environment() -> Option<String> {
    if std::env::var_os(broker_contract::ENV_SHIM_CONFIG).is_some() {
        return Some(format!("{} is set", broker_contract::ENV_SHIM_CONFIG));
    }
    if std::env::var_os(broker_contract::ENV_SHIM_ACTIVE).is_some_and(|v| v == "1") {
        return Some(format!("{}=1", broker_contract::ENV_SHIM_ACTIVE));
    }
    let preload = std::env::var_os("LD_PRELOAD").or_else(|| std::env::var_os(ENV_ORIGINAL_PRELOAD));
    if preload.is_some_and(|p| p.to_string_lossy().contains("libbroker")) {
        return Some("libbroker.so is preloaded".into());
    }
    None
}

/// The nearest ancestor that is `broker run` or the sandbox's init, with what it is.
fn broker_ancestor() -> Option<(u32, &'static str)> {
    let mut pid = std::process::id();
    for _ in 0..64 {
        pid = crate::procfs::parent_of(pid)?;
        if pid == 0 {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        let program = args.next().unwrap_or_default();
        let is_broker = program.rsplit(|&b| b == b'/').next() == Some(b"broker".as_slice());
        match args.next() {
            Some(b"run") if is_broker => return Some((pid, "a `broker run`")),
            Some(arg) if arg == crate::sandbox::INIT_STAGE.as_bytes() => {
                return Some((pid, "the sandbox of a broker run"))
            }
            _ => {}
        }
        if pid == 1 {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_env_block_bounds_are_read_from_stat() {
        let (start, end) = env_block_bounds().expect("bounds");
        assert!(start > 0 && end > start);
    }

    #[test]
    fn only_root_installed_valgrind_preloads_are_let_through() {
        use std::ffi::OsStr;
        assert!(root_only_writable(0, 0o100755));
        assert!(!root_only_writable(1000, 0o100755), "another owner");
        assert!(!root_only_writable(0, 0o100775), "group-writable");
        assert!(
            !root_only_writable(0, 0o41777),
            "a sticky world-writable directory (/tmp)"
        );
        assert!(is_valgrind_name(
            "/usr/libexec/valgrind/vgpreload_core-amd64-linux.so".as_ref()
        ));
        assert!(
            !is_valgrind_name("vgpreload_core-amd64-linux.so".as_ref()),
            "relative"
        );
        assert!(!is_valgrind_name("/usr/lib/libbroker.so".as_ref()));
        assert!(!only_valgrind(OsStr::new("")));
        assert!(!only_valgrind(OsStr::new(" : ")));
        // A lookalike in a directory anyone can write (/tmp): its owner is irrelevant.
        let dir = tempfile::tempdir_in("/tmp").expect("tempdir");
        let fake = dir.path().join("vgpreload_core-amd64-linux.so");
        std::fs::write(&fake, b"").expect("write");
        assert!(!only_valgrind(fake.as_os_str()));
        let installed = "/usr/libexec/valgrind/vgpreload_core-amd64-linux.so";
        if std::path::Path::new(installed).exists() {
            assert!(only_valgrind(OsStr::new(installed)));
            let mixed = format!("{installed}:{}", fake.display());
            assert!(
                !only_valgrind(OsStr::new(&mixed)),
                "one foreign entry spoils the list"
            );
        }
    }

    #[test]
    fn this_test_process_is_not_inside_a_run() {
        // cargo test is started by cargo, not by a run (unless someone runs the tests under
        // `broker run`, which the test harness never does).
        if sign_in_environment().is_none() {
            assert_eq!(broker_ancestor(), None);
        }
    }
}
