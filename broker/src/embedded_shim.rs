//! The `libbroker.so` carried inside the broker binary (feature `embedded-shim`, built by
//! `build.rs`), for a broker installed without one beside it (`cargo install`): written to a
//! per-user cache directory and compared byte for byte with the embedded copy before every
//! use. A same-user agent can write there (DESIGN.md section 7) and could plant a shim for the
//! user's next run, so a file that differs in any way is replaced, never loaded.
//!
//! Not covered: a process of the user that swaps the file between this check and the agent's
//! loader opening it (a window of one `exec`). A sandboxed run (`broker run` by default
//! where namespaces are allowed) makes the file read-only in place before the agent starts.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{
    DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::launch::SHIM_FILE;

/// The shim's bytes, when this build carries them.
#[cfg(feature = "embedded-shim")]
pub const BYTES: Option<&[u8]> = Some(include_bytes!(env!("BROKER_EMBEDDED_SHIM")));
#[cfg(not(feature = "embedded-shim"))]
pub const BYTES: Option<&[u8]> = None;

/// Mode of a written shim: the user's to read and map, nobody's to write.
const FILE_MODE: u32 = 0o500;
const DIR_MODE: u32 = 0o700;

/// Where shims are written: `$XDG_CACHE_HOME/broker`, else `~/.cache/broker`.
pub fn cache_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("broker"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|home| PathBuf::from(home).join(".cache/broker"))
}

/// The path of a verified copy of the embedded shim (written first if missing or different),
/// or `None` when this build carries no shim.
pub fn extract() -> anyhow::Result<Option<PathBuf>> {
    let Some(bytes) = BYTES else {
        return Ok(None);
    };
    let root = cache_root()
        .context("neither XDG_CACHE_HOME nor HOME is set, so there is nowhere to write the embedded libbroker.so: set one, or BROKER_SHIM_LIB")?;
    ensure_at(&root, bytes).map(Some)
}

/// `root/shim-<sha256 prefix>/libbroker.so` holding exactly `bytes`: kept when it already
/// does (a file of this user's, mode 0500, same bytes), else written anew.
pub fn ensure_at(root: &Path, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex = crate::hex::lower(&digest.as_ref()[..8]);
    private_dir(root)?;
    let dir = root.join(format!("shim-{hex}"));
    private_dir(&dir)?;
    let path = dir.join(SHIM_FILE);
    if holds(&path, bytes)? {
        return Ok(path);
    }
    write(&dir, &path, bytes)?;
    if !holds(&path, bytes)? {
        bail!(
            "{} changed while it was being written: another process of this user is writing there; remove {} and retry",
            path.display(),
            dir.display()
        );
    }
    Ok(path)
}

/// Written beside and renamed over `path`: a reader never sees half a file, and whatever sat
/// at `path` (another file, a symlink) is replaced, not followed.
fn write(dir: &Path, path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path)
            .with_context(|| format!("cannot remove the directory at {}", path.display()))?;
    }
    write_atomically(dir, path, bytes, FILE_MODE)
}

/// `bytes` written to a fresh temporary file in `dir` (mode `mode`, synced) and renamed over
/// `path`: a program starting meanwhile loads the old or the new library, never half of one.
pub(crate) fn write_atomically(
    dir: &Path,
    path: &Path,
    bytes: &[u8],
    mode: u32,
) -> anyhow::Result<()> {
    let failed = || format!("cannot write libbroker.so into {}", dir.display());
    let mut tmp = tempfile::Builder::new()
        .prefix(".libbroker-")
        .tempfile_in(dir)
        .with_context(failed)?;
    tmp.write_all(bytes)
        .and_then(|()| {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
        })
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(failed)?;
    tmp.persist(path)
        .with_context(|| format!("cannot put libbroker.so at {}", path.display()))?;
    Ok(())
}

/// Whether `path` is this user's regular file, mode 0500, holding exactly `bytes`. Opened
/// without following a symlink, and checked through the open descriptor.
fn holds(path: &Path, bytes: &[u8]) -> anyhow::Result<bool> {
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        // Missing, a symlink (ELOOP), a fifo, unreadable: not ours as it should be; rewrite.
        Err(_) => return Ok(false),
    };
    let meta = file.metadata()?;
    if !meta.is_file()
        || meta.uid() != rustix::process::geteuid().as_raw()
        || meta.mode() & 0o7777 != FILE_MODE
        || meta.len() != bytes.len() as u64
    {
        return Ok(false);
    }
    let mut found = Vec::with_capacity(bytes.len());
    file.read_to_end(&mut found)
        .with_context(|| format!("cannot read {}", path.display()))?;
    Ok(found == bytes)
}

/// `dir` as a real directory of this user's, mode 0700. A symlink or file in its place is
/// removed; another user's directory is an error (nothing of theirs is ours to load).
fn private_dir(dir: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => std::fs::remove_file(dir).with_context(|| {
            format!(
                "cannot remove {}, which should be a directory",
                dir.display()
            )
        })?,
        Err(_) => {}
    }
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me {
        bail!(
            "{} is not a directory of uid {me}: remove it, or set XDG_CACHE_HOME or BROKER_SHIM_LIB",
            dir.display()
        );
    }
    if meta.mode() & 0o7777 != DIR_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .with_context(|| format!("cannot make {} private (0700)", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIM: &[u8] = b"\x7fELF pretend shim bytes";

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("test fixture")
            .mode()
            & 0o7777
    }

    #[test]
    fn writes_once_private_and_named_by_hash() {
        let tmp = tempfile::tempdir().expect("test fixture");
        let root = tmp.path().join("cache/broker");
        let path = ensure_at(&root, SHIM).expect("test fixture");
        assert_eq!(std::fs::read(&path).expect("test fixture"), SHIM);
        assert_eq!(path.file_name().expect("test fixture"), SHIM_FILE);
        let dir = path.parent().expect("test fixture");
        assert!(dir
            .file_name()
            .expect("test fixture")
            .to_string_lossy()
            .starts_with("shim-"));
        assert_eq!(mode(&path), 0o500);
        assert_eq!(mode(dir), 0o700);
        assert_eq!(mode(&root), 0o700);
        let inode = std::fs::metadata(&path).expect("test fixture").ino();
        // A second use keeps the verified file.
        assert_eq!(ensure_at(&root, SHIM).expect("test fixture"), path);
        assert_eq!(std::fs::metadata(&path).expect("test fixture").ino(), inode);
        // Other bytes (a new broker) get a directory of their own.
        let other = ensure_at(&root, b"another build").expect("test fixture");
        assert_ne!(other.parent(), path.parent());
    }

    #[test]
    fn a_tampered_copy_is_replaced_not_used() {
        let tmp = tempfile::tempdir().expect("test fixture");
        let root = tmp.path().join("broker");
        let path = ensure_at(&root, SHIM).expect("test fixture");
        let dir = path.parent().expect("test fixture").to_path_buf();

        // Same length, other bytes, the mode restored: still caught by the comparison.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .expect("test fixture");
        let mut planted = SHIM.to_vec();
        planted[5] ^= 0xff;
        std::fs::write(&path, &planted).expect("test fixture");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o500))
            .expect("test fixture");
        assert_eq!(ensure_at(&root, SHIM).expect("test fixture"), path);
        assert_eq!(std::fs::read(&path).expect("test fixture"), SHIM);

        // A symlink to the attacker's library: replaced by a file, the target left alone.
        let evil = tmp.path().join("evil.so");
        std::fs::write(&evil, b"evil").expect("test fixture");
        std::fs::remove_file(&path).expect("test fixture");
        std::os::unix::fs::symlink(&evil, &path).expect("test fixture");
        ensure_at(&root, SHIM).expect("test fixture");
        assert!(std::fs::symlink_metadata(&path)
            .expect("test fixture")
            .is_file());
        assert_eq!(std::fs::read(&path).expect("test fixture"), SHIM);
        assert_eq!(std::fs::read(&evil).expect("test fixture"), b"evil");

        // A directory in its place, and a loosened mode on the directory.
        std::fs::remove_file(&path).expect("test fixture");
        std::fs::create_dir(&path).expect("test fixture");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .expect("test fixture");
        ensure_at(&root, SHIM).expect("test fixture");
        assert_eq!(std::fs::read(&path).expect("test fixture"), SHIM);
        assert_eq!(mode(&dir), 0o700);

        // Right bytes but writable: rewritten with mode 0500.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("test fixture");
        ensure_at(&root, SHIM).expect("test fixture");
        assert_eq!(mode(&path), 0o500);
    }

    #[test]
    fn a_symlinked_directory_is_replaced() {
        let tmp = tempfile::tempdir().expect("test fixture");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).expect("test fixture");
        let root = tmp.path().join("broker");
        std::os::unix::fs::symlink(&elsewhere, &root).expect("test fixture");
        let path = ensure_at(&root, SHIM).expect("test fixture");
        assert!(std::fs::symlink_metadata(&root)
            .expect("test fixture")
            .is_dir());
        assert!(path.starts_with(&root));
        assert_eq!(
            std::fs::read_dir(&elsewhere).expect("test fixture").count(),
            0
        );
    }
}
