//! Rewriting a user's file safely, and undoing it.
//!
//! - The original is copied to `$BROKER_HOME/import/backups/` (directory 0700, file 0600)
//!   before the file is touched. There rather than next to the file: a copy beside a `.env`
//!   could be committed, picked up by a glob (`.env*`) or read by an agent working in that
//!   project, while `$BROKER_HOME` is hidden from agents under `broker run`'s sandbox.
//! - The new content goes to a temp file in the same directory, gets the original's mode
//!   (and owner, when we run as another user), is synced, and is renamed over the original:
//!   a reader sees the old file or the new one, never half of one. A symlinked file is
//!   written through its link (dotfile managers keep the real file elsewhere).
//! - The file is read again just before the rename: if someone else wrote it since we read
//!   it (an MCP client saving its state), nothing is replaced and the import says so.
//! - Each rewrite is recorded in `$BROKER_HOME/import/manifest.json` (0600) with the SHA-256
//!   of what was written, so `--undo` restores the backup only over the file as the import
//!   left it (or with `--force`).

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};

use crate::home::{ensure_private_dir, write_private_file, Home};

/// A file to replace: what it held when read, and what it should hold.
pub struct Rewrite {
    /// As the user named it (for messages).
    pub shown: PathBuf,
    /// The file itself (symlinks resolved).
    pub target: PathBuf,
    pub original: Vec<u8>,
    pub new: Vec<u8>,
}

/// One import of one file, as recorded for `--undo`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// `env` or `mcp`.
    pub kind: String,
    pub path: PathBuf,
    pub backup: PathBuf,
    /// SHA-256 (hex) of the file as the import wrote it.
    pub written_sha256: String,
    pub at: String,
}

/// Read a file to import from: its resolved path and bytes.
pub fn read(path: &Path) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let target =
        fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
    let bytes = fs::read(&target).with_context(|| format!("cannot read {}", path.display()))?;
    Ok((target, bytes))
}

pub fn backups_dir(home: &Home) -> PathBuf {
    home.root().join("import").join("backups")
}

fn manifest_path(home: &Home) -> PathBuf {
    home.root().join("import").join("manifest.json")
}

/// Back up and replace each file, recording each for `--undo`. Stops at the first failure:
/// the files before it are rewritten (and recorded), the rest untouched.
pub fn commit(home: &Home, kind: &str, rewrites: &[Rewrite]) -> anyhow::Result<Vec<Record>> {
    let dir = backups_dir(home);
    ensure_private_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut records = Vec::new();
    for rewrite in rewrites {
        let backup = backup_path(&dir, &rewrite.target);
        write_private_file(&backup, &rewrite.original)
            .with_context(|| format!("cannot write the backup {}", backup.display()))?;
        replace(&rewrite.target, &rewrite.original, &rewrite.new)
            .with_context(|| format!("{} was not changed", rewrite.shown.display()))?;
        let record = Record {
            kind: kind.to_string(),
            path: rewrite.target.clone(),
            backup,
            written_sha256: crate::hex::sha256(&rewrite.new),
            at: crate::audit::now_rfc3339(),
        };
        let mut manifest = load_manifest(home)?;
        manifest.push(record.clone());
        save_manifest(home, &manifest)?;
        records.push(record);
    }
    Ok(records)
}

/// What `--undo` did for one file.
#[derive(Debug)]
pub struct Restored {
    pub path: PathBuf,
    pub backup: PathBuf,
}

/// Restore the latest import of each file of `kind` (or only of `only`), byte for byte.
/// Refuses a file that changed since the import unless `force`. Each undone import is
/// dropped from the manifest (an earlier one of the same file is then the next to undo);
/// its backup is kept.
pub fn undo(
    home: &Home,
    kind: &str,
    only: Option<&Path>,
    force: bool,
) -> anyhow::Result<Vec<Restored>> {
    let mut manifest = load_manifest(home)?;
    let only = match only {
        Some(p) => {
            Some(fs::canonicalize(p).with_context(|| format!("cannot find {}", p.display()))?)
        }
        None => None,
    };
    // The latest record of each file, newest first.
    let mut chosen: Vec<usize> = Vec::new();
    for (i, r) in manifest.iter().enumerate().rev() {
        let wanted = match &only {
            Some(p) => &r.path == p,
            None => r.kind == kind,
        };
        if wanted && !chosen.iter().any(|&j| manifest[j].path == r.path) {
            chosen.push(i);
        }
    }
    if chosen.is_empty() {
        bail!(
            "nothing to undo: no import of {} is recorded in {}",
            only.as_ref()
                .map_or_else(|| format!("{kind} files"), |p| p.display().to_string()),
            manifest_path(home).display()
        );
    }
    // Check every file first, so a refusal changes nothing.
    let mut work = Vec::new();
    for &i in &chosen {
        let r = &manifest[i];
        let current =
            fs::read(&r.path).with_context(|| format!("cannot read {}", r.path.display()))?;
        if !force && crate::hex::sha256(&current) != r.written_sha256 {
            bail!(
                "{} changed since the import of {} (its backup is {}): nothing was restored. Pass --force to restore the backup over the changes",
                r.path.display(),
                r.at,
                r.backup.display()
            );
        }
        let backup = fs::read(&r.backup)
            .with_context(|| format!("cannot read the backup {}", r.backup.display()))?;
        work.push((i, current, backup));
    }
    let mut restored = Vec::new();
    for (i, current, backup) in &work {
        let r = &manifest[*i];
        replace(&r.path, current, backup)
            .with_context(|| format!("{} was not restored", r.path.display()))?;
        restored.push(Restored {
            path: r.path.clone(),
            backup: r.backup.clone(),
        });
    }
    let mut undone: Vec<usize> = work.iter().map(|(i, ..)| *i).collect();
    undone.sort_unstable();
    for i in undone.into_iter().rev() {
        manifest.remove(i);
    }
    save_manifest(home, &manifest)?;
    Ok(restored)
}

/// Replace `target`, which must still hold `expected`, with `new`: temp file, the
/// original's mode and owner, sync, rename.
fn replace(target: &Path, expected: &[u8], new: &[u8]) -> anyhow::Result<()> {
    let meta = fs::metadata(target)?;
    let dir = target.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".broker-import-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temp file in {}", dir.display()))?;
    tmp.write_all(new)?;
    let file = tmp.as_file();
    file.set_permissions(fs::Permissions::from_mode(
        meta.permissions().mode() & 0o7777,
    ))?;
    if file.metadata()?.uid() != meta.uid() || file.metadata()?.gid() != meta.gid() {
        // Only root can give a file away; for anyone else the file keeps its owner anyway.
        if let Err(err) = std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())) {
            bail!("cannot give the new file the original's owner ({err})");
        }
    }
    file.sync_all()?;
    if fs::read(target)? != expected {
        bail!("it changed while broker was importing from it (another program wrote it): run the import again");
    }
    tmp.persist(target)
        .map_err(|e| anyhow::anyhow!("cannot rename the new file into place: {}", e.error))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `<dir>/<UTC time>-<pid>-<file name>`: unique per import, and says which file it holds.
fn backup_path(dir: &Path, target: &Path) -> PathBuf {
    let stamp: String = crate::audit::now_rfc3339()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let name = target
        .file_name()
        .map_or_else(|| "file".into(), |n| n.to_string_lossy().into_owned());
    let parent = target
        .parent()
        .and_then(|p| p.file_name())
        .map_or_else(String::new, |n| format!("{}-", n.to_string_lossy()));
    let mut n = 0;
    loop {
        let candidate = dir.join(format!("{stamp}-{}-{n}-{parent}{name}", std::process::id()));
        if !candidate.exists() {
            return candidate;
        }
        n += 1;
    }
}

fn load_manifest(home: &Home) -> anyhow::Result<Vec<Record>> {
    let path = manifest_path(home);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is damaged (not the manifest broker writes)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn save_manifest(home: &Home, records: &[Record]) -> anyhow::Result<()> {
    let path = manifest_path(home);
    if let Some(dir) = path.parent() {
        ensure_private_dir(dir)?;
    }
    let mut text = serde_json::to_vec_pretty(records)?;
    text.push(b'\n');
    write_private_file(&path, &text).with_context(|| format!("cannot write {}", path.display()))
}
