//! What `broker serve --system` checks and loads before it serves: it refuses to start on
//! anything an agent could have influenced, saying what to fix.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context as _};

use super::access::AccessPolicy;
use super::config::SystemConfig;
use super::ownership::{root_owned, system_broker_uid};
use super::users::UserDb;
use super::SystemPaths;
use crate::home::Home;
use crate::oauth::UserConfig;
use crate::providers::Catalog;
use crate::vault::KeyConfig;

/// Everything a system broker starts from.
pub struct SystemStart {
    pub home: Home,
    pub access: Arc<AccessPolicy>,
    pub catalog: Catalog,
    pub keys: KeyConfig,
    /// The `[oauth.<provider>]` tables of the config: `broker login --system` uses these.
    pub oauth: UserConfig,
}

/// Check the process, the config, the providers and the directories; load them.
pub fn prepare(paths: &SystemPaths) -> anyhow::Result<SystemStart> {
    let ours = rustix::process::geteuid().as_raw();
    if ours == 0 {
        bail!(
            "the system broker runs as its own user, not as root (root's processes could read it): \
             start it with the unit `broker system install` writes, or `runuser -u broker -- broker serve --system`"
        );
    }
    let config = SystemConfig::load(&paths.config_file())
        .with_context(|| format!("cannot use {}", paths.config_file().display()))?;
    let catalog = load_catalog(&paths.providers_dir())?;
    let access = config
        .resolve(&UserDb::system(), &|name| catalog.get(name).is_some())
        .map_err(|e| anyhow::anyhow!("{}: {e}", paths.config_file().display()))?;
    own_dir(&paths.state_dir(), ours, 0o700)?;
    own_dir(&paths.run_dir(), ours, 0o755)?;
    // The shims of other users trust the runtime directory only if root made it for us.
    match system_broker_uid(&paths.run_dir()) {
        Ok(uid) if uid == ours => {}
        Ok(uid) => bail!("{} belongs to uid {uid}, not to this broker's uid {ours}", paths.run_dir().display()),
        Err(why) => bail!(
            "the agents' shims would not trust {}: {why}. Its parent must be root's and writable by no one else (systemd's RuntimeDirectory= does this)",
            paths.run_dir().display()
        ),
    }
    let keys = KeyConfig {
        source: crate::vault::KeySource::from_env()?,
        passphrase: crate::hardening::secret_env(crate::vault::ENV_PASSPHRASE)
            .filter(|p| !p.is_empty()),
        system_key_file: Some(
            SystemPaths::credentials_key_file().unwrap_or_else(|| paths.key_file()),
        ),
    };
    Ok(SystemStart {
        home: Home::at(paths.state_dir()),
        access: Arc::new(access),
        catalog,
        keys,
        oauth: UserConfig::system(config.oauth),
    })
}

/// The built-ins and the definitions in `dir`, which root must own, file by file: a system
/// broker takes no provider from anywhere a client could write.
pub fn load_catalog(dir: &Path) -> anyhow::Result<Catalog> {
    if dir.exists() {
        root_owned(dir)?;
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                root_owned(&path).context("a provider file the system broker would load")?;
            }
        }
    }
    Ok(Catalog::load_from(dir)?)
}

/// `dir` exists (made if its parent lets us), is ours, and has `mode`.
fn own_dir(dir: &Path, ours: u32, mode: u32) -> anyhow::Result<()> {
    if !dir.exists() {
        std::fs::create_dir(dir).with_context(|| {
            format!(
                "cannot create {} (`broker system install` as root makes it)",
                dir.display()
            )
        })?;
    }
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != ours {
        bail!(
            "{} must be a directory owned by the broker's user (uid {ours}); it is uid {}'s: `chown <broker user>: {}`",
            dir.display(),
            meta.uid(),
            dir.display()
        );
    }
    if meta.mode() & 0o777 != mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}
