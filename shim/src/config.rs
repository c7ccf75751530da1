//! Finding and reading the shim config file the broker wrote for this run.
//!
//! Pure functions over an injectable environment lookup, so tests never touch the real
//! environment; the constructor passes `std::env::var_os`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use broker_contract::{
    ShimConfig, DAEMON_SHIM_CONFIG_FILE, ENV_HOME, ENV_SHIM_CONFIG, ENV_SYSTEM_RUN, SYSTEM_RUN_DIR,
};

/// Where the config was looked for, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `BROKER_SHIM_CONFIG` names it: set by `broker run` or a launcher.
    Explicit(PathBuf),
    /// The running daemon's (`broker serve`) well-known file, `$BROKER_HOME/run/shim.conf`.
    Daemon(PathBuf),
    /// The system broker's (`broker serve --system`, under its own user):
    /// `/run/broker/shim.conf`, looked at when this user runs no `broker serve`.
    System(PathBuf),
    /// No `BROKER_SHIM_CONFIG` and no way to find `BROKER_HOME` (no `HOME` either).
    Nowhere,
}

impl Location {
    /// The path to read, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Location::Explicit(p) | Location::Daemon(p) | Location::System(p) => Some(p),
            Location::Nowhere => None,
        }
    }
}

/// `BROKER_HOME`, defaulting to `$XDG_DATA_HOME/broker`, then `~/.local/share/broker`.
///
/// `HOME` comes from the environment only: the constructor must not call `getpwuid`, which
/// can load NSS modules into every process.
pub fn broker_home(get: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let non_empty = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty(ENV_HOME)
        .or_else(|| non_empty("XDG_DATA_HOME").map(|d| d.join("broker")))
        .or_else(|| non_empty("HOME").map(|h| h.join(".local/share/broker")))
}

/// Where to look for the config: `BROKER_SHIM_CONFIG`, else the daemon's file.
pub fn locate(get: &dyn Fn(&str) -> Option<OsString>) -> Location {
    if let Some(p) = get(ENV_SHIM_CONFIG).filter(|v| !v.is_empty()) {
        return Location::Explicit(PathBuf::from(p));
    }
    match broker_home(get) {
        Some(home) => Location::Daemon(home.join("run").join(DAEMON_SHIM_CONFIG_FILE)),
        None => Location::Nowhere,
    }
}

/// The system broker's runtime directory: `BROKER_SYSTEM_RUN` (tests, other prefixes), else
/// `/run/broker`. The environment only moves where this process looks; what it finds there
/// must still pass [`Trust`]'s checks.
pub fn system_run_dir(get: &dyn Fn(&str) -> Option<OsString>) -> PathBuf {
    get(ENV_SYSTEM_RUN)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_RUN_DIR))
}

/// Whose config files may steer this process: its own user's, root's, and the system
/// broker's user's. That last one is the owner of the system runtime directory, and only
/// when root made that directory for it: the directory is writable by no one else, and
/// every directory above it is root's and writable by no one else. So another user cannot
/// plant a lookalike: they could make a directory only where they may write, and then its
/// parent is theirs, or world-writable like `/tmp`.
#[derive(Debug)]
pub struct Trust {
    pub my_uid: u32,
    pub system_run: PathBuf,
    /// Looked up at most once, and only when a file is not this user's or root's.
    system_uid: std::sync::OnceLock<Option<u32>>,
}

impl Trust {
    pub fn new(my_uid: u32, system_run: PathBuf) -> Trust {
        Trust {
            my_uid,
            system_run,
            system_uid: std::sync::OnceLock::new(),
        }
    }

    /// Where the system broker's config is.
    pub fn system_location(&self) -> Location {
        Location::System(self.system_run.join(DAEMON_SHIM_CONFIG_FILE))
    }

    /// The system broker's uid, if its runtime directory passes the checks.
    pub fn system_uid(&self) -> Option<u32> {
        *self
            .system_uid
            .get_or_init(|| system_broker_uid(&self.system_run))
    }

    fn owner_ok(&self, owner: u32) -> bool {
        owner == self.my_uid || owner == 0 || Some(owner) == self.system_uid()
    }
}

/// See [`Trust`]: the owner of `run_dir` if root made it for them.
pub fn system_broker_uid(run_dir: &Path) -> Option<u32> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(run_dir).ok()?;
    if !meta.is_dir() || meta.mode() & 0o022 != 0 {
        return None;
    }
    let mut at = run_dir.parent();
    while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
        let m = std::fs::symlink_metadata(dir).ok()?;
        if m.uid() != 0 || m.mode() & 0o022 != 0 {
            return None;
        }
        at = dir.parent();
    }
    Some(meta.uid())
}

/// Why no config could be used. Each variant renders as the reason in the one stderr line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// No file there: no broker is running for this process.
    Missing(Location),
    /// The file exists but cannot be read, or is not ours to trust.
    Untrusted(PathBuf, &'static str),
    /// The file is malformed.
    Malformed(PathBuf, broker_contract::ConfigError),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing(loc) => match loc.path() {
                Some(p) if matches!(loc, Location::System(_)) => write!(
                    f,
                    "no broker serve of this user, and no system broker at {}",
                    p.display()
                ),
                Some(p) => write!(f, "no shim config at {}", p.display()),
                None => write!(f, "no {ENV_SHIM_CONFIG}, no {ENV_HOME} and no HOME"),
            },
            LoadError::Untrusted(p, why) => write!(f, "shim config {}: {why}", p.display()),
            LoadError::Malformed(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

/// Facts about the config file that decide whether to trust it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileFacts {
    pub owner_uid: u32,
    pub mode: u32,
}

/// The config says where this process's traffic goes and which CA it trusts, so only a file
/// written by this user, root or the system broker (see [`Trust`]) and not writable by
/// anyone else may steer it.
pub fn trust_file(facts: FileFacts, trust: &Trust) -> Result<(), &'static str> {
    if !trust.owner_ok(facts.owner_uid) {
        return Err("owned by another user; ignored");
    }
    if facts.mode & 0o022 != 0 {
        return Err("writable by group or others; ignored");
    }
    Ok(())
}

/// Read and parse the config at `loc`, checking ownership and permissions.
pub fn load(loc: &Location, trust: &Trust) -> Result<ShimConfig, LoadError> {
    use std::os::unix::fs::MetadataExt as _;
    let Some(path) = loc.path() else {
        return Err(LoadError::Missing(loc.clone()));
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::Missing(loc.clone()))
        }
        Err(_) => return Err(LoadError::Untrusted(path.to_owned(), "cannot stat")),
    };
    trust_file(
        FileFacts {
            owner_uid: meta.uid(),
            mode: meta.mode(),
        },
        trust,
    )
    .map_err(|why| LoadError::Untrusted(path.to_owned(), why))?;
    let text = std::fs::read_to_string(path)
        .map_err(|_| LoadError::Untrusted(path.to_owned(), "cannot read"))?;
    ShimConfig::parse(&text).map_err(|e| LoadError::Malformed(path.to_owned(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn explicit_config_wins() {
        let get = env(&[("BROKER_SHIM_CONFIG", "/run/x.conf"), ("BROKER_HOME", "/h")]);
        assert_eq!(locate(&get), Location::Explicit("/run/x.conf".into()));
    }

    #[test]
    fn daemon_config_under_broker_home_then_xdg_then_home() {
        let get = env(&[("BROKER_HOME", "/h"), ("HOME", "/home/u")]);
        assert_eq!(locate(&get), Location::Daemon("/h/run/shim.conf".into()));
        let get = env(&[("XDG_DATA_HOME", "/x"), ("HOME", "/home/u")]);
        assert_eq!(
            locate(&get),
            Location::Daemon("/x/broker/run/shim.conf".into())
        );
        let get = env(&[("HOME", "/home/u"), ("BROKER_SHIM_CONFIG", "")]);
        assert_eq!(
            locate(&get),
            Location::Daemon("/home/u/.local/share/broker/run/shim.conf".into())
        );
        assert_eq!(locate(&env(&[])), Location::Nowhere);
    }

    fn trust(uid: u32) -> Trust {
        Trust::new(uid, "/nonexistent/broker-system-run".into())
    }

    #[test]
    fn only_our_own_unshared_files_are_trusted() {
        let facts = |owner_uid, mode| FileFacts { owner_uid, mode };
        assert!(trust_file(facts(1000, 0o100600), &trust(1000)).is_ok());
        assert!(trust_file(facts(0, 0o100644), &trust(1000)).is_ok());
        assert!(trust_file(facts(1001, 0o100600), &trust(1000)).is_err());
        assert!(trust_file(facts(1000, 0o100666), &trust(1000)).is_err());
        assert!(trust_file(facts(1000, 0o100620), &trust(1000)).is_err());
    }

    #[test]
    fn the_system_brokers_files_are_trusted_only_in_a_directory_root_made() {
        // /tmp is root's but world-writable: a directory in it could be anyone's.
        let dir = std::env::temp_dir().join(format!("broker-shim-sys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(system_broker_uid(&dir), None);
        let _ = std::fs::remove_dir(&dir);
        // /etc is root's all the way up, and nobody else may write it.
        assert_eq!(system_broker_uid(Path::new("/etc")), Some(0));
        assert_eq!(system_broker_uid(Path::new("/nonexistent/x")), None);
        let t = Trust::new(1000, "/nonexistent/x".into());
        assert!(trust_file(
            FileFacts {
                owner_uid: 4242,
                mode: 0o100644
            },
            &t
        )
        .is_err());
        assert_eq!(
            t.system_location(),
            Location::System("/nonexistent/x/shim.conf".into())
        );
    }

    #[test]
    fn load_reports_missing_and_malformed() {
        let dir = std::env::temp_dir().join(format!("broker-shim-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let missing = Location::Explicit(dir.join("nope.conf"));
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = trust(unsafe { libc::getuid() });
        assert!(matches!(load(&missing, &uid), Err(LoadError::Missing(_))));
        let bad = dir.join("bad.conf");
        std::fs::write(&bad, "not a config\n").expect("write");
        assert!(matches!(
            load(&Location::Explicit(bad), &uid),
            Err(LoadError::Malformed(..))
        ));
        let good = dir.join("good.conf");
        let cfg = ShimConfig {
            slot: 3,
            port: 4000,
            hosts: vec!["a.b".into()],
            ..Default::default()
        };
        std::fs::write(&good, cfg.render()).expect("write");
        assert_eq!(load(&Location::Explicit(good), &uid), Ok(cfg));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
