//! The two stages of the sandbox, each this binary started again (see the module docs of
//! `sandbox` for why and for the process chain). Both run single-threaded until their
//! namespaces are set up: `unshare(CLONE_NEWUSER)` refuses a multi-threaded caller.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use rustix::mount::{MountFlags, MountPropagationFlags};

use super::{ENV_AGENT_PRELOAD, INIT_STAGE};

/// Arguments of both stages (built by `sandbox::spawn`, never typed by a person).
#[derive(Debug, clap::Args)]
pub struct StageArgs {
    #[arg(long)]
    pub hide_dir: Vec<PathBuf>,
    #[arg(long)]
    pub hide_file: Vec<PathBuf>,
    #[arg(long)]
    pub expose: Vec<PathBuf>,
    #[arg(long)]
    pub read_only: Vec<PathBuf>,
    /// Where to report `ok` or `fail: why` before the agent starts.
    #[arg(long)]
    pub status: PathBuf,
    #[arg(last = true, required = true)]
    pub command: Vec<OsString>,
}

impl StageArgs {
    /// The plan these arguments carry, to pass on to the next stage.
    fn plan(&self) -> super::Plan {
        super::Plan {
            hide_dirs: self.hide_dir.clone(),
            hide_files: self.hide_file.clone(),
            expose: self.expose.clone(),
            read_only: self.read_only.clone(),
        }
    }
}

/// A stage's report to `broker run`, written once.
struct Status(std::fs::File);

impl Status {
    fn open(path: &Path) -> std::io::Result<Status> {
        Ok(Status(std::fs::OpenOptions::new().append(true).open(path)?))
    }

    /// The sandbox cannot be made here and the run must not start (`broker run` refuses).
    fn fail(mut self, why: impl std::fmt::Display) -> ExitCode {
        let _ = writeln!(self.0, "fail: {why}");
        ExitCode::from(125)
    }

    /// The machine's policy refuses the sandbox (user namespaces off, or without the
    /// capabilities to mount in them): `broker run` warns and runs the agent without it.
    /// Only refusals that the agent could not have caused land here: a limit it could have
    /// exhausted (the count of user namespaces) is a [`Status::fail`].
    fn unavailable(mut self, why: impl std::fmt::Display) -> ExitCode {
        let _ = writeln!(self.0, "unavailable: {why}");
        ExitCode::from(125)
    }

    fn refused(self, policy: bool, why: impl std::fmt::Display) -> ExitCode {
        if policy {
            self.unavailable(why)
        } else {
            self.fail(why)
        }
    }

    fn ok(mut self) {
        let _ = writeln!(self.0, "ok");
    }
}

/// Stage 1 (`broker __sandbox`): new user, mount and PID namespaces, our uid and gid mapped
/// to 0 inside so stage 2 may mount; then stage 2, which is PID 1 of the new PID namespace.
pub fn setup_stage(args: StageArgs) -> ExitCode {
    let Ok(status) = Status::open(&args.status) else {
        return ExitCode::from(125);
    };
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    use nix::sched::CloneFlags;
    // nix's `unshare` is a safe function (rustix 1.x marks its own unsafe because of
    // CLONE_FILES, which is not used here).
    if let Err(err) = nix::sched::unshare(
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID,
    ) {
        use nix::errno::Errno;
        let policy = matches!(
            err,
            Errno::EPERM | Errno::EINVAL | Errno::ENOSYS | Errno::EACCES
        );
        return status.refused(
            policy,
            format!("the kernel refuses a user namespace: unshare: {err}"),
        );
    }
    if let Err(err) = map_ids(0, uid, 0, gid) {
        let policy = err.kind() == std::io::ErrorKind::PermissionDenied;
        return status.refused(
            policy,
            format!("cannot map ids in the new user namespace: {err}"),
        );
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut init = Command::new(exe);
    init.arg(INIT_STAGE).args(args.plan().to_args());
    init.arg("--status")
        .arg(&args.status)
        .arg("--")
        .args(&args.command);
    let child = match init.spawn() {
        Ok(child) => child,
        Err(err) => return status.fail(format!("cannot start the sandbox's init: {err}")),
    };
    drop(status);
    supervise(child.id(), None)
}

/// Stage 2 (`broker __sandbox-init`), PID 1 of the sandbox: hide, mount `/proc`, lock the
/// mounts in a nested user namespace, start the agent, reap, forward signals.
pub fn init_stage(args: StageArgs) -> ExitCode {
    let Ok(status) = Status::open(&args.status) else {
        return ExitCode::from(125);
    };
    let cwd = std::env::current_dir().ok();
    if let Err((policy, why)) = hide(&args) {
        return status.refused(policy, why);
    }
    // Our uid in the parent namespace is 0 (mapped by stage 1); the agent gets the user's own.
    let (outer_uid, outer_gid) = (
        outer_id("/proc/self/uid_map"),
        outer_id("/proc/self/gid_map"),
    );
    let (Some(outer_uid), Some(outer_gid)) = (outer_uid, outer_gid) else {
        return status.fail("cannot read the id maps of the sandbox");
    };
    use nix::sched::CloneFlags;
    if let Err(err) = nix::sched::unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS) {
        use nix::errno::Errno;
        let policy = matches!(
            err,
            Errno::EPERM | Errno::EINVAL | Errno::ENOSYS | Errno::EACCES
        );
        return status.refused(
            policy,
            format!("cannot nest the agent's user namespace: {err}"),
        );
    }
    if let Err(err) = map_ids(outer_uid, 0, outer_gid, 0) {
        let policy = err.kind() == std::io::ErrorKind::PermissionDenied;
        return status.refused(policy, format!("cannot map the agent's ids: {err}"));
    }
    if let Err(err) = rustix::thread::set_no_new_privs(true) {
        return status.fail(format!("cannot set no_new_privs: {err}"));
    }
    // Nothing to read here, but no reason to let the agent attach to its init either.
    let _ = rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable);
    // The agent's directory, looked up again through the new mounts (the inherited one
    // still points at the directory as it was). Inside a hidden directory it is refused.
    if let Some(cwd) = &cwd {
        if let Some(hidden) = args
            .hide_dir
            .iter()
            .find(|d| cwd.starts_with(d))
            .filter(|_| !args.expose.iter().any(|e| cwd.starts_with(e)))
        {
            return status.fail(format!(
                "the current directory {} is inside {}, which the sandbox hides: start the agent from another directory",
                cwd.display(),
                hidden.display()
            ));
        }
        if let Err(err) = std::env::set_current_dir(cwd) {
            return status.fail(format!(
                "cannot enter {} inside the sandbox: {err}",
                cwd.display()
            ));
        }
    }
    let mut agent = Command::new(&args.command[0]);
    agent.args(&args.command[1..]);
    match std::env::var_os(ENV_AGENT_PRELOAD) {
        Some(preload) => agent.env("LD_PRELOAD", preload),
        None => agent.env_remove("LD_PRELOAD"),
    };
    agent.env_remove(ENV_AGENT_PRELOAD);
    // Reported once the agent exists (or could not be started, which is the agent's failure,
    // not the sandbox's): `broker run` then looks up its pid for the audit.
    let spawned = agent.spawn();
    status.ok();
    let child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!(
                "broker: cannot start {}: {err}",
                args.command[0].to_string_lossy()
            );
            let code = if err.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return ExitCode::from(code);
        }
    };
    supervise(child.id(), Some(()))
}

/// Cover the hidden paths, show the exposed ones again, mount a fresh `/proc`.
fn hide(args: &StageArgs) -> Result<(), (bool, String)> {
    // EPERM/EACCES from a mount here is the machine's policy (a user namespace without the
    // capabilities to mount, as under Ubuntu's AppArmor restriction); anything else is not.
    let refused = |what: String| {
        move |e: rustix::io::Errno| {
            let policy = e == rustix::io::Errno::PERM || e == rustix::io::Errno::ACCESS;
            (policy, format!("{what}: {e}"))
        }
    };
    // Nothing done here may reach the user's own mount namespace.
    rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    )
    .map_err(refused("cannot make the mounts private".into()))?;
    // Open what is shown again before it disappears under the covers.
    let exposed: Vec<(PathBuf, std::fs::File)> = args
        .expose
        .iter()
        .filter_map(|path| std::fs::File::open(path).ok().map(|f| (path.clone(), f)))
        .collect();
    let mut covered: Vec<&PathBuf> = Vec::new();
    let mut dirs: Vec<&PathBuf> = args.hide_dir.iter().filter(|d| d.is_dir()).collect();
    dirs.sort_by_key(|d| d.components().count());
    for dir in dirs {
        if covered.iter().any(|c| dir.starts_with(c)) {
            continue;
        }
        rustix::mount::mount(
            "broker-hidden",
            dir.as_path(),
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            Some(c"mode=0700,size=64k"),
        )
        .map_err(refused(format!("cannot cover {}", dir.display())))?;
        covered.push(dir);
    }
    for (path, file) in &exposed {
        if !covered.iter().any(|c| path.starts_with(c)) {
            continue;
        }
        std::fs::create_dir_all(path)
            .map_err(|e| (false, format!("cannot show {} again: {e}", path.display())))?;
        use std::os::fd::AsRawFd as _;
        let source = format!("/proc/self/fd/{}", file.as_raw_fd());
        rustix::mount::mount_bind(source.as_str(), path.as_path())
            .map_err(refused(format!("cannot show {} again", path.display())))?;
    }
    for dir in &covered {
        rustix::mount::mount_remount(
            dir.as_path(),
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            c"",
        )
        .map_err(refused(format!("cannot make {} read-only", dir.display())))?;
    }
    for file in args.hide_file.iter().filter(|f| f.exists()) {
        rustix::mount::mount_bind("/dev/null", file.as_path())
            .map_err(refused(format!("cannot cover {}", file.display())))?;
    }
    for file in args.read_only.iter().filter(|f| f.exists()) {
        rustix::mount::mount_bind(file.as_path(), file.as_path())
            .and_then(|()| {
                rustix::mount::mount_remount(
                    file.as_path(),
                    MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
                    c"",
                )
            })
            .map_err(refused(format!("cannot make {} read-only", file.display())))?;
    }
    // A /proc of the new PID namespace: the broker and every process outside the run are
    // not in it. Mounted last and before the nested namespace, so the agent cannot take it
    // away to see the one underneath.
    rustix::mount::mount(
        "proc",
        "/proc",
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    )
    .map_err(refused("cannot mount a /proc of the sandbox".into()))?;
    Ok(())
}

/// Write `/proc/self/{setgroups,uid_map,gid_map}`: `inside` maps to `outside`, one id each.
fn map_ids(
    inside_uid: u32,
    outside_uid: u32,
    inside_gid: u32,
    outside_gid: u32,
) -> std::io::Result<()> {
    // "deny" is what lets an unprivileged process map its gid; a nested namespace inherits it.
    match std::fs::write("/proc/self/setgroups", "deny") {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(e),
    }
    std::fs::write(
        "/proc/self/uid_map",
        format!("{inside_uid} {outside_uid} 1"),
    )?;
    std::fs::write(
        "/proc/self/gid_map",
        format!("{inside_gid} {outside_gid} 1"),
    )
}

/// The id that 0 maps to, as stage 1 wrote it (`0 <outer> 1`).
fn outer_id(map: &str) -> Option<u32> {
    let text = std::fs::read_to_string(map).ok()?;
    let mut fields = text.split_whitespace();
    (fields.next()? == "0").then_some(())?;
    fields.next()?.parse().ok()
}

/// Wait for `pid` while forwarding the signals a supervisor sends to it; return its status
/// as ours. As PID 1 (`reap_all`), also reap orphans that the namespace hands to us.
fn supervise(pid: u32, reap_all: Option<()>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("broker: sandbox: cannot start its event loop: {err}");
            return ExitCode::from(125);
        }
    };
    let Some(target) = rustix::process::Pid::from_raw(pid as i32) else {
        return ExitCode::from(125);
    };
    runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut children) = signal(SignalKind::child()) else {
            return ExitCode::from(125);
        };
        let forwarder = tokio::spawn(crate::cli::run::forward_signals(pid));
        let code = loop {
            // Reap first: the agent may have exited before the handler was installed.
            if let Some(code) = reap(target, reap_all.is_some()) {
                break code;
            }
            if children.recv().await.is_none() {
                break 125;
            }
        };
        forwarder.abort();
        ExitCode::from(u8::try_from(code).unwrap_or(1))
    })
}

/// Reap what has exited; `Some(code)` once `target` has (128+N when signal N ended it).
fn reap(target: rustix::process::Pid, all: bool) -> Option<i32> {
    use rustix::process::{waitpid, WaitOptions};
    loop {
        let which = if all { None } else { Some(target) };
        match waitpid(which, WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                if pid == target {
                    return Some(match (status.exit_status(), status.terminating_signal()) {
                        (Some(code), _) => code,
                        (None, Some(signal)) => 128 + signal,
                        (None, None) => 1,
                    });
                }
            }
            // Nothing more has exited (Ok(None)), or no child is left (ECHILD).
            Ok(None) => return None,
            Err(_) => return Some(125),
        }
    }
}
