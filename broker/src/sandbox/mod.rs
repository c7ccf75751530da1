//! The sandbox of `broker run`: the agent's process tree runs in new user, mount and PID
//! namespaces in which nothing that holds or reaches a key is there to read.
//!
//! Inside it, `$BROKER_HOME`, the broker's runtime directory (control socket, other runs'
//! files) and, when the master key is in the OS keyring, the session D-Bus socket are covered
//! by empty read-only mounts; the run's own directory (its shim config, CA, denial log) is
//! mounted back; `/proc` is a fresh one that shows only the agent's own process tree; the
//! broker's binary and `libbroker.so` are read-only, so the agent cannot plant a copy for the
//! user's next run. Everything else (the user's files, cwd, network, terminal, uid and gid)
//! is as it was: the agent needs no change.
//!
//! The mounts that hide things are made in one user namespace and the agent runs in a second,
//! nested one, so they are *locked* in its mount namespace: the kernel refuses to unmount them
//! or to bind-mount what is under them, even for root, even from yet another user namespace
//! the agent makes (the rule bubblewrap relies on). `no_new_privs` is set for the agent.
//!
//! Why hand-made namespaces and not a sandbox crate: the few calls needed (`unshare`, `mount`,
//! the id maps) are thin, safe wrappers in `rustix` and `nix`, while the sandbox crates either
//! drive `bwrap` (not installed by default), need `unsafe` callbacks between fork and exec, or
//! also cut the network, which the agent needs to reach the broker and unmanaged hosts.
//! Without `unsafe` (the workspace forbids it outside the shim) code cannot run between fork
//! and exec, so each stage is this binary started again:
//!
//! ```text
//! broker run                    holds the broker (non-dumpable), waits for stage 1
//! └─ broker __sandbox           unshare(user, mount, pid); maps our uid to 0 inside
//!    └─ broker __sandbox-init   PID 1 of the new PID namespace: hides, mounts /proc, then
//!       │                       unshare(user, mount) again (locks every mount), maps 0 back
//!       │                       to our uid, sets no_new_privs, reaps orphans, forwards signals
//!       └─ the agent            same uid, gid, cwd, environment, terminal
//! ```
//!
//! Each stage writes one line to a status file outside the sandbox before the agent starts:
//! `ok`; `unavailable: why` when the machine's policy refuses user namespaces (for example
//! Ubuntu's AppArmor restriction), and `broker run` then says so and runs the agent without
//! the sandbox; or `fail: why` for anything else, and `broker run` refuses to start the agent
//! (an agent of an earlier run could exhaust the count of user namespaces to force a fallback,
//! so only refusals it cannot cause fall back).

mod stages;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

pub use stages::{init_stage, setup_stage, StageArgs};

/// The hidden subcommand of stage 1.
pub const SETUP_STAGE: &str = "__sandbox";
/// The hidden subcommand of stage 2, PID 1 inside the sandbox.
pub const INIT_STAGE: &str = "__sandbox-init";
/// Carries the agent's `LD_PRELOAD` through the stages, which must not load the shim.
const ENV_AGENT_PRELOAD: &str = "BROKER_SANDBOX_LD_PRELOAD";

/// What the sandbox of one run hides and shows.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Directories covered by an empty read-only tmpfs.
    pub hide_dirs: Vec<PathBuf>,
    /// Files (a key file, a socket) covered by `/dev/null`.
    pub hide_files: Vec<PathBuf>,
    /// The run's own directory, shown (read-write) inside a hidden one.
    pub expose: Vec<PathBuf>,
    /// Files made read-only in place (the broker binary, `libbroker.so`).
    pub read_only: Vec<PathBuf>,
}

impl Plan {
    /// The plan for a run of `home` whose own files are in `run_dir`.
    /// `shim`: the libbroker.so the run preloads (found and checked once, by the caller),
    /// kept read-only like the broker binary.
    pub fn for_run(
        home: &crate::home::Home,
        run_dir: &Path,
        hide_session_bus: bool,
        shim: Option<&Path>,
    ) -> Plan {
        let mut plan = Plan::default();
        plan.hide_dirs.push(home.root().to_path_buf());
        if let Some(runtime) = crate::home::runtime_base() {
            plan.hide_dirs.push(runtime);
        }
        if hide_session_bus {
            if let Some(bus) = session_bus_socket() {
                plan.hide_files.push(bus);
            }
        }
        plan.expose.push(run_dir.to_path_buf());
        if let Ok(exe) = std::env::current_exe() {
            plan.read_only.push(exe);
        }
        if let Some(shim) = shim {
            plan.read_only.push(shim.to_path_buf());
        }
        plan
    }

    pub(super) fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for (flag, paths) in [
            ("--hide-dir", &self.hide_dirs),
            ("--hide-file", &self.hide_files),
            ("--expose", &self.expose),
            ("--read-only", &self.read_only),
        ] {
            for path in paths {
                args.push(flag.into());
                args.push(path.into());
            }
        }
        args
    }
}

/// The session D-Bus socket (`unix:path=...` in `DBUS_SESSION_BUS_ADDRESS`, else the usual
/// `$XDG_RUNTIME_DIR/bus`), through which the OS keyring is reached. An abstract socket
/// cannot be hidden by a mount; `broker doctor` says so.
fn session_bus_socket() -> Option<PathBuf> {
    let from_address = std::env::var("DBUS_SESSION_BUS_ADDRESS")
        .ok()
        .and_then(|a| {
            a.split(';').find_map(|part| {
                let params = part.strip_prefix("unix:")?;
                params
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("path="))
                    .map(PathBuf::from)
            })
        });
    from_address
        .or_else(|| std::env::var_os("XDG_RUNTIME_DIR").map(|d| PathBuf::from(d).join("bus")))
        .filter(|p| p.exists())
}

/// How the agent was started.
pub struct Started {
    /// The process `broker run` waits for: the sandbox's first stage, or the agent.
    pub child: std::process::Child,
    /// The agent's pid as this process sees it (for the audit).
    pub agent_pid: u32,
}

/// Why the agent did not start sandboxed.
#[derive(Debug)]
enum NotReady {
    /// The machine's policy refuses the sandbox: run without it, saying so.
    Unavailable(String),
    /// Something else went wrong: do not start the agent.
    Failed(String),
}

/// Start `agent` inside the sandbox described by `plan`. `status_dir` must be a private
/// directory the sandbox hides (the stages report there). When the machine's policy refuses
/// the sandbox, the agent is started without it (saying why on stderr); any
/// other failure is an error and the agent does not start. The inner result is the agent's
/// own start (a command that is not found), as `Command::spawn` reports it.
pub fn spawn(
    agent: &mut Command,
    plan: &Plan,
    status_dir: &Path,
) -> anyhow::Result<std::io::Result<Started>> {
    let status = tempfile::Builder::new()
        .prefix("sandbox-status-")
        .tempfile_in(status_dir)?;
    let mut stage1 = stage_command(agent, plan, status.path());
    let outcome = match stage1.spawn() {
        Ok(mut child) => match wait_for_status(status.path(), &mut child) {
            Ok(()) => {
                let agent_pid = grandchild(child.id()).unwrap_or(child.id());
                return Ok(Ok(Started { child, agent_pid }));
            }
            Err(not_ready) => {
                let _ = child.kill();
                let _ = child.wait();
                match not_ready {
                    NotReady::Unavailable(why) => why,
                    NotReady::Failed(why) => anyhow::bail!(
                        "cannot start the agent's sandbox: {why} (to run the agent without it, where it can read $BROKER_HOME: --no-sandbox)"
                    ),
                }
            }
        },
        Err(err) => anyhow::bail!("cannot start the sandbox's first stage: {err}"),
    };
    eprintln!("broker: the sandbox is not available ({outcome}); the agent runs WITHOUT it and can read $BROKER_HOME and the broker's runtime files. To fix: {}", fix_hint());
    Ok(agent.spawn().map(|child| Started {
        agent_pid: child.id(),
        child,
    }))
}

/// The agent: the child of the sandbox's init, which is the child of `stage1`. Its pid in
/// the PID namespace of the sandbox means nothing outside; this is the one the audit needs.
/// Found by the parent pids in `/proc/*/stat` (the kernel here has no `task/*/children`).
fn grandchild(stage1: u32) -> Option<u32> {
    fn child_of(parent: u32, mut pids: impl Iterator<Item = u32>) -> Option<u32> {
        pids.find(|&pid| crate::procfs::parent_of(pid) == Some(parent))
    }
    // Pids are handed out in increasing order: the init and the agent usually got the next
    // few, so look there before reading every process's stat.
    let near = |after: u32| after + 1..after + 64;
    let all = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .map(|dir| {
                dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let init = child_of(stage1, near(stage1)).or_else(|| child_of(stage1, all().into_iter()))?;
    child_of(init, near(init)).or_else(|| child_of(init, all().into_iter()))
}

/// Wait until a stage reported: `ok` (the agent starts inside), or why it cannot.
fn wait_for_status(path: &Path, child: &mut std::process::Child) -> Result<(), NotReady> {
    // The stages take a few milliseconds; poll the file, and stop when stage 1 has exited
    // without a word (it reports before it exits in every path but a crash).
    let mut delay = std::time::Duration::from_micros(200);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some(line) = text.lines().next() {
            if line == "ok" {
                return Ok(());
            }
            if let Some(why) = line.strip_prefix("unavailable: ") {
                return Err(NotReady::Unavailable(why.to_string()));
            }
            let why = line.strip_prefix("fail: ").unwrap_or(line);
            return Err(NotReady::Failed(why.to_string()));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Failed(format!(
                "its first stage exited ({status}) before it was ready"
            )));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(1));
    }
}

/// `broker __sandbox <plan> --status FILE -- PROGRAM ARGS`, with the agent's environment
/// and directory, and its `LD_PRELOAD` carried aside so the stages do not load the shim.
fn stage_command(agent: &Command, plan: &Plan, status: &Path) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut command = Command::new(exe);
    command.arg(SETUP_STAGE).args(plan.to_args());
    command.arg("--status").arg(status).arg("--");
    command.arg(agent.get_program()).args(agent.get_args());
    for (var, value) in agent.get_envs() {
        match value {
            Some(value) => command.env(var, value),
            None => command.env_remove(var),
        };
    }
    if let Some(preload) = agent
        .get_envs()
        .find(|(var, _)| *var == "LD_PRELOAD")
        .and_then(|(_, value)| value)
    {
        command.env(ENV_AGENT_PRELOAD, preload);
    }
    command.env_remove("LD_PRELOAD");
    if let Some(dir) = agent.get_current_dir() {
        command.current_dir(dir);
    }
    command
}

/// What to change so that this machine allows the sandbox, from the settings that turn
/// unprivileged user namespaces off.
pub fn fix_hint() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .ok()
    };
    if read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref() == Some("1") {
        return "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10 and later): allow them for broker with a profile in /etc/apparmor.d/broker containing `abi <abi/4.0>, include <tunables/global> profile broker /path/to/broker flags=(unconfined) { userns, }` and `sudo apparmor_parser -r /etc/apparmor.d/broker`, or for every program with `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`".into();
    }
    if read("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
        return "kernel.unprivileged_userns_clone is 0: `sudo sysctl kernel.unprivileged_userns_clone=1`".into();
    }
    if read("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
        return "user.max_user_namespaces is 0: `sudo sysctl user.max_user_namespaces=10000`"
            .into();
    }
    "check that unprivileged user namespaces are allowed (`unshare -Urmp --fork true` must work)"
        .into()
}

/// Can this machine sandbox a run? Starts the stages with this binary's `--version` as the
/// agent and nothing to hide. `Err` says why not.
pub fn probe(status_dir: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut agent = Command::new(exe);
    agent
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let status = tempfile::Builder::new()
        .prefix("sandbox-probe-")
        .tempfile_in(status_dir)
        .map_err(|e| e.to_string())?;
    let mut stage1 = stage_command(&agent, &Plan::default(), status.path());
    stage1
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = stage1.spawn().map_err(|e| e.to_string())?;
    let ready = wait_for_status(status.path(), &mut child);
    let exit = child.wait().map_err(|e| e.to_string())?;
    ready.map_err(|not_ready| match not_ready {
        NotReady::Unavailable(why) | NotReady::Failed(why) => why,
    })?;
    if exit.success() {
        Ok(())
    } else {
        Err(format!("the sandboxed test program failed ({exit})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_travels_as_arguments_the_stages_parse() {
        use clap::Parser as _;
        let plan = Plan {
            hide_dirs: vec!["/h/a".into(), "/h/b".into()],
            hide_files: vec!["/run/bus".into()],
            expose: vec!["/h/b/run/run-1".into()],
            read_only: vec!["/opt/broker".into()],
        };
        let mut argv: Vec<OsString> = vec!["broker".into(), SETUP_STAGE.into()];
        argv.extend(plan.to_args());
        argv.extend([
            "--status".into(),
            "/tmp/s".into(),
            "--".into(),
            "true".into(),
        ]);
        let cli = crate::cli::Cli::try_parse_from(argv).expect("parses");
        let crate::cli::Command::Sandbox(args) = cli.command else {
            panic!("not the sandbox stage");
        };
        assert_eq!(args.hide_dir, plan.hide_dirs);
        assert_eq!(args.hide_file, plan.hide_files);
        assert_eq!(args.expose, plan.expose);
        assert_eq!(args.read_only, plan.read_only);
        assert_eq!(args.command, vec![OsString::from("true")]);
    }
}
