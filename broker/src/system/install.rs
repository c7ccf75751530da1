//! `broker system install` (as root): the broker's user, its directories, a default config,
//! the master key file and a hardened systemd unit. Never overwrites a config or key that is
//! already there.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::users::UserDb;
use super::SystemPaths;

/// What to install.
#[derive(Debug, Clone)]
pub struct InstallSettings {
    pub paths: SystemPaths,
    /// The broker's user (made with `useradd --system` if missing).
    pub user: String,
    /// Users written into a new config's `[access] users`.
    pub allow_users: Vec<String>,
    /// The binary the unit starts.
    pub binary: PathBuf,
    /// Write the unit (and, with `start`, enable and start it where systemd runs).
    pub unit: bool,
    pub start: bool,
}

/// The systemd unit for `binary`, run as `user`.
pub fn unit_text(paths: &SystemPaths, user: &str, binary: &Path) -> String {
    let key = paths.key_file();
    let state = paths.state_dir();
    let run = paths.run_dir();
    format!(
        r#"# Written by `broker system install`. The system credential broker for AI agents:
# agents of the uids in /etc/broker/config.toml get their keys through it; none of them can
# read, write or trace anything of it.
[Unit]
Description=broker: the system credential broker for AI agents
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={binary} serve --system
# The vault's master key: root's file, handed to the service (read as $CREDENTIALS_DIRECTORY/master.key).
LoadCredential=master.key:{key}
RuntimeDirectory=broker
RuntimeDirectoryMode=0755
StateDirectory=broker
StateDirectoryMode=0700
UMask=0077
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={state} {run}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
SystemCallArchitectures=native
CapabilityBoundingSet=
AmbientCapabilities=
LimitNOFILE=65536
Restart=on-failure

[Install]
WantedBy=multi-user.target
"#,
        binary = binary.display(),
        key = key.display(),
        state = state.display(),
        run = run.display(),
    )
}

/// Install; returns what was done, one line each.
pub fn install(settings: &InstallSettings) -> anyhow::Result<Vec<String>> {
    if rustix::process::geteuid().as_raw() != 0 {
        bail!("`broker system install` makes a user and writes /etc: run it as root (sudo)");
    }
    let mut done = Vec::new();
    let paths = &settings.paths;
    let db = UserDb::system();
    if db.uid(&settings.user).is_none() {
        let status = std::process::Command::new("useradd")
            .args(["--system", "--user-group", "--no-create-home", "--home-dir"])
            .arg(paths.state_dir())
            .args(["--shell", "/usr/sbin/nologin", &settings.user])
            .status()
            .context(
                "cannot run useradd (install the passwd package, or make the user yourself)",
            )?;
        if !status.success() {
            bail!("useradd {} failed ({status})", settings.user);
        }
        done.push(format!("made the system user {}", settings.user));
    }
    let db = UserDb::system();
    let uid = db
        .uid(&settings.user)
        .context("the broker's user is not in /etc/passwd")?;
    let gid = db
        .gid(&settings.user)
        .context("the broker's group is not in /etc/group")?;
    for name in &settings.allow_users {
        db.uid(name)
            .with_context(|| format!("no user '{name}' in /etc/passwd to allow"))?;
    }

    root_dir(&paths.etc_dir(), 0o755)?;
    root_dir(&paths.providers_dir(), 0o755)?;
    let config = paths.config_file();
    if !config.exists() {
        let text = default_config(&settings.allow_users);
        write_new(&config, text.as_bytes(), 0o644)?;
        done.push(format!("wrote {}", config.display()));
    }
    let key = paths.key_file();
    if !key.exists() {
        let text = crate::vault::new_key_file_text()?;
        write_new(&key, text.as_bytes(), 0o640)?;
        std::os::unix::fs::chown(&key, Some(0), Some(gid))?;
        done.push(format!(
            "made the master key {} (0640 root:{})",
            key.display(),
            settings.user
        ));
    }
    for (dir, mode) in [(paths.state_dir(), 0o700), (paths.run_dir(), 0o755)] {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(mode)
            .create(&dir)?;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    }
    done.push(format!(
        "{} (0700) and {} (0755) belong to {}",
        paths.state_dir().display(),
        paths.run_dir().display(),
        settings.user
    ));
    if settings.unit {
        if settings.binary.starts_with("/home") || settings.binary.starts_with("/root") {
            done.push(format!(
                "warning: the unit's ProtectHome=yes hides {}: copy broker to /usr/local/bin and install again",
                settings.binary.display()
            ));
        }
        let unit = paths.unit_file();
        if let Some(dir) = unit.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_replacing(
            &unit,
            unit_text(paths, &settings.user, &settings.binary).as_bytes(),
        )?;
        done.push(format!("wrote {}", unit.display()));
        if settings.start && Path::new("/run/systemd/system").exists() {
            for args in [
                &["daemon-reload"][..],
                &["enable", "--now", "broker.service"][..],
            ] {
                let status = std::process::Command::new("systemctl")
                    .args(args)
                    .status()?;
                if !status.success() {
                    bail!(
                        "systemctl {} failed ({status}): see `journalctl -u broker`",
                        args.join(" ")
                    );
                }
            }
            done.push("started broker.service (systemctl enable --now)".into());
        }
    }
    Ok(done)
}

/// A new config allowing `users`.
pub fn default_config(users: &[String]) -> String {
    let list = users
        .iter()
        .map(|u| format!("\"{}\"", u.replace(['"', '\\'], "")))
        .collect::<Vec<_>>()
        .join(", ");
    super::config::DEFAULT_CONFIG.replacen("users = []", &format!("users = [{list}]"), 1)
}

fn root_dir(dir: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Create `path` exclusively (never over an existing file), root's, with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn write_replacing(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, contents, 0o644)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_as_the_broker_user_hardened() {
        let text = unit_text(
            &SystemPaths::default(),
            "broker",
            Path::new("/usr/local/bin/broker"),
        );
        for line in [
            "User=broker",
            "ExecStart=/usr/local/bin/broker serve --system",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/broker /run/broker",
            "RuntimeDirectory=broker",
            "StateDirectory=broker",
            "LoadCredential=master.key:/etc/broker/master.key",
        ] {
            assert!(text.lines().any(|l| l == line), "{line}");
        }
        // The broker reads its peers' command lines for the audit: /proc must show them.
        assert!(!text.contains("ProtectProc=invisible"));
    }

    #[test]
    fn the_default_config_names_the_allowed_users() {
        let text = default_config(&["alice".into(), "b\"ob".into()]);
        let cfg = super::super::config::SystemConfig::parse(&text).expect("parses");
        assert_eq!(
            cfg.access.users,
            vec!["alice".to_string(), "bob".to_string()]
        );
    }
}
