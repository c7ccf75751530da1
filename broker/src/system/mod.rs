//! The system broker: `broker serve --system`, running as a dedicated user (`broker`), so an
//! agent running as another uid cannot read, write, ptrace or impersonate anything of it.
//!
//! Where things live, and who owns them (see README, "System broker"):
//! - `/etc/broker/config.toml` (root, not group/other writable): who may use the broker, who
//!   administers it, per-uid/group policy ([`config`]);
//! - `/etc/broker/providers/*.toml` (root): custom providers; never read from a directory a
//!   client could write;
//! - `/etc/broker/master.key` (0640 root:broker), or `$CREDENTIALS_DIRECTORY/master.key`
//!   (systemd `LoadCredential`), or `BROKER_PASSPHRASE`: the vault's master key;
//! - `/var/lib/broker` (0700, the broker's user): vault, audit log;
//! - `/run/broker` (0755, the broker's user, in root's `/run`): the shim config and CA
//!   (0644), the control socket (0666; who may do what is decided by `SO_PEERCRED`).
//!
//! Every path hangs off one root (`/`), which only `--system-root DIR` on the command line
//! moves (tests). Nothing in the environment does: an agent cannot redirect a system broker
//! started by root or systemd.

pub mod access;
pub mod admin;
mod admin_login;
pub mod config;
pub mod install;
pub mod ownership;
pub mod start;
pub mod users;

use std::path::{Path, PathBuf};

/// The system broker's paths, under one root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemPaths {
    root: PathBuf,
}

impl Default for SystemPaths {
    fn default() -> SystemPaths {
        SystemPaths::under(PathBuf::from("/"))
    }
}

impl SystemPaths {
    /// Every path under `root` instead of `/` (for tests).
    pub fn under(root: PathBuf) -> SystemPaths {
        SystemPaths { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// `/etc/broker`.
    pub fn etc_dir(&self) -> PathBuf {
        self.root.join("etc/broker")
    }
    /// `/etc/broker/config.toml`.
    pub fn config_file(&self) -> PathBuf {
        self.etc_dir().join("config.toml")
    }
    /// `/etc/broker/providers`.
    pub fn providers_dir(&self) -> PathBuf {
        self.etc_dir().join("providers")
    }
    /// `/etc/broker/master.key`.
    pub fn key_file(&self) -> PathBuf {
        self.etc_dir().join("master.key")
    }
    /// `/var/lib/broker`: the vault and the audit log.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("var/lib/broker")
    }
    /// `/run/broker`: what agents read (shim config, CA) and the control socket.
    pub fn run_dir(&self) -> PathBuf {
        if self.root == Path::new("/") {
            PathBuf::from(broker_contract::SYSTEM_RUN_DIR)
        } else {
            self.root.join("run/broker")
        }
    }
    /// The control socket in [`SystemPaths::run_dir`].
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir().join(broker_contract::DAEMON_CONTROL_SOCKET)
    }
    /// The shim config a bare preload finds.
    pub fn shim_config(&self) -> PathBuf {
        self.run_dir()
            .join(broker_contract::DAEMON_SHIM_CONFIG_FILE)
    }
    /// Runtime directories of runs opened by a shim's handover.
    pub fn runs_dir(&self) -> PathBuf {
        self.run_dir().join("runs")
    }
    /// The unit `broker system install` writes.
    pub fn unit_file(&self) -> PathBuf {
        self.root.join("etc/systemd/system/broker.service")
    }
    /// The master key as systemd's `LoadCredential=master.key:...` hands it to the service,
    /// if the service was started that way.
    pub fn credentials_key_file() -> Option<PathBuf> {
        std::env::var_os("CREDENTIALS_DIRECTORY")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("master.key"))
            .filter(|p| p.exists())
    }
}

/// The client side's idea of where the system broker is: `BROKER_SYSTEM_RUN` (tests), else
/// `/run/broker`. Only ever used to *find* a broker; the broker itself never reads it.
pub fn client_run_dir() -> PathBuf {
    std::env::var_os(broker_contract::ENV_SYSTEM_RUN)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(broker_contract::SYSTEM_RUN_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_paths_are_the_real_ones() {
        let p = SystemPaths::default();
        assert_eq!(p.config_file(), Path::new("/etc/broker/config.toml"));
        assert_eq!(p.state_dir(), Path::new("/var/lib/broker"));
        assert_eq!(p.run_dir(), Path::new("/run/broker"));
        assert_eq!(p.shim_config(), Path::new("/run/broker/shim.conf"));
        assert_eq!(p.key_file(), Path::new("/etc/broker/master.key"));
        let t = SystemPaths::under("/tmp/t".into());
        assert_eq!(t.run_dir(), Path::new("/tmp/t/run/broker"));
        assert_eq!(t.providers_dir(), Path::new("/tmp/t/etc/broker/providers"));
    }
}
