//! Ownership checks on the files and directories the system broker trusts. A file that
//! decides who gets a key (the config, a provider definition, the master key) counts only if
//! root wrote it and nobody else can change it.

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;

/// Why a path is not trusted: a sentence naming the path and the fix.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Untrusted(pub String);

/// `path` exists, is owned by root, and is not writable by group or others.
pub fn root_owned(path: &Path) -> Result<std::fs::Metadata, Untrusted> {
    let meta = std::fs::symlink_metadata(path)
        .map_err(|e| Untrusted(format!("cannot read {}: {e}", path.display())))?;
    if meta.file_type().is_symlink() {
        return Err(Untrusted(format!(
            "{} is a symbolic link; the system broker reads only real files there (replace it with the file)",
            path.display()
        )));
    }
    if meta.uid() != 0 {
        return Err(Untrusted(format!(
            "{} belongs to uid {}, not root: only root may decide what the system broker does (`chown root: {}`)",
            path.display(),
            meta.uid(),
            path.display()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(Untrusted(format!(
            "{} is writable by group or others (mode {:o}): `chmod go-w {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        )));
    }
    Ok(meta)
}

/// `dir` and every directory above it are owned by root and not writable by group or others
/// (a sticky, world-writable `/tmp` is not enough: anyone can make a directory in it). So
/// nobody but root could have put anything at `dir`.
pub fn root_controlled_chain(dir: &Path) -> Result<(), Untrusted> {
    let mut at = Some(dir);
    while let Some(d) = at {
        if d.as_os_str().is_empty() {
            break;
        }
        root_owned(d)?;
        at = d.parent();
    }
    Ok(())
}

/// The owner of the system broker's runtime directory `run_dir`, if a client may trust it:
/// the directory is not writable by group or others, and its parent is under root's control
/// (so it was made by root, for the broker's user). The shim applies the same rule
/// (`shim/src/config.rs`).
pub fn system_broker_uid(run_dir: &Path) -> Result<u32, Untrusted> {
    let meta = std::fs::metadata(run_dir)
        .map_err(|e| Untrusted(format!("no system broker at {}: {e}", run_dir.display())))?;
    if meta.mode() & 0o022 != 0 {
        return Err(Untrusted(format!(
            "{} is writable by group or others: not a system broker's directory",
            run_dir.display()
        )));
    }
    match run_dir.parent() {
        Some(parent) => root_controlled_chain(parent)?,
        None => return Err(Untrusted("/ is not a runtime directory".into())),
    }
    Ok(meta.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_writable_parent_is_not_root_controlled() {
        // /tmp is root's but world-writable (sticky): anyone could have made a directory in it.
        assert!(root_controlled_chain(Path::new("/tmp")).is_err());
        assert!(root_controlled_chain(Path::new("/etc")).is_ok());
    }
}
