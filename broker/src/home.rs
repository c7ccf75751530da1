//! `BROKER_HOME`: the one directory that holds all of a user's broker state.
//!
//! Layout (created 0700 on first use):
//! - `vault.db`          the encrypted credential vault (SQLite, WAL)
//! - `master.key`        the master key, when the key file is the key source (0600)
//! - `audit.jsonl`       the hash-chained audit log
//! - `providers/*.toml`  custom provider definitions
//! - `config.toml`       user settings (OAuth client ids, ...)
//! - `run/`              runtime files of `broker serve` and of each `broker run`

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use broker_contract::ENV_HOME;

/// The resolved `BROKER_HOME`.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `$BROKER_HOME`, else `$XDG_DATA_HOME/broker`, else `~/.local/share/broker`.
    pub fn from_env() -> io::Result<Home> {
        if let Some(dir) = std::env::var_os(ENV_HOME).filter(|v| !v.is_empty()) {
            return Ok(Home::at(PathBuf::from(dir)));
        }
        if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Ok(Home::at(PathBuf::from(dir).join("broker")));
        }
        let home = std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "neither BROKER_HOME nor HOME is set",
                )
            })?;
        Ok(Home::at(PathBuf::from(home).join(".local/share/broker")))
    }

    pub fn at(root: PathBuf) -> Home {
        Home { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Create the home directory (0700) if needed, and return it.
    pub fn ensure(&self) -> io::Result<&Path> {
        ensure_private_dir(&self.root)?;
        Ok(&self.root)
    }

    pub fn vault_path(&self) -> PathBuf {
        self.root.join("vault.db")
    }
    pub fn key_file_path(&self) -> PathBuf {
        self.root.join("master.key")
    }
    pub fn audit_path(&self) -> PathBuf {
        self.root.join("audit.jsonl")
    }
    pub fn providers_dir(&self) -> PathBuf {
        self.root.join("providers")
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    /// `config.toml` read as `T` (the keys one module reads; it ignores the others); a missing
    /// file is `T::default()`. A malformed file's error names the file, the line and what is
    /// wrong, but never quotes the line: it may hold the upstream proxy's password.
    pub fn read_config<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, String> {
        let path = self.config_path();
        let text = match fs::read_to_string(&path) {
            Ok(text) => zeroize::Zeroizing::new(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(T::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(0, |s| crate::providers::line_col(&text, s.start).0);
            format!(
                "{}: not valid near line {line}: {} (the line is not shown: it may hold a password)",
                path.display(),
                e.message().trim().replace('\n', "; ")
            )
        })
    }
    /// Runtime files of `broker serve` (its shim config, control socket, CA certificate).
    pub fn daemon_dir(&self) -> PathBuf {
        self.root.join("run")
    }
}

/// `$XDG_RUNTIME_DIR/broker`, where runs keep their files when the user has a runtime
/// directory (else they go under `$BROKER_HOME/run`).
pub fn runtime_base() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .map(|p| p.join("broker"))
}

/// Create `dir` and its parents with mode 0700; tighten an existing directory we own to 0700.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Create `dir` (and parents) with mode 0755, owned by us: a system broker's runtime
/// directory, which its users read and only it writes.
pub fn ensure_shared_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
}

/// [`write_private_file`], but readable by everyone (0644): the files a system broker's
/// users' shims read.
pub fn write_shared_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file_with_mode(path, contents, 0o644)
}

/// Write `contents` to `path` with mode 0600, atomically (temp file + rename), so a crash
/// never leaves a half-written file behind.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    write_file_with_mode(path, contents, 0o600)
}

/// Write `contents` to `path` atomically, with `mode` set before the rename (so the file
/// never appears with other permissions).
fn write_file_with_mode(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    if mode != 0o600 {
        f.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    fs::rename(&tmp, path)
}
