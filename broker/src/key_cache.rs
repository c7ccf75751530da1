//! API keys already read from the vault, kept while the vault's files are unchanged, so a
//! request needs no thread hop, SQLite query or decryption.
//!
//! Any write by any process (`broker add`, `remove`, a refresh) to `vault.db` or its WAL is
//! seen before the next lookup trusts the cache. Normally through inotify on the vault's
//! directory: the kernel queues the event inside the writer's `write()`, so once `broker remove`
//! has returned, the next lookup's one non-blocking `read()` of the queue sees it. Where inotify
//! cannot be used (no instances left, the directory moved), each lookup compares the files' size
//! and mtime instead: two `stat` calls.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use zeroize::Zeroizing;

/// The vault's files all start with this name (`vault.db`, `-wal`, `-shm`, `-journal`).
const VAULT_FILE: &[u8] = b"vault.db";

pub(crate) struct KeyCache {
    vault: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// Counts the vault changes seen; a read that straddles a change is not kept.
    generation: u64,
    changes: Changes,
    /// provider -> profile -> key (nested so a lookup allocates nothing).
    keys: HashMap<String, HashMap<String, Zeroizing<String>>>,
    /// provider -> profiles whose key was ever kept: no key, kept across changes, so that
    /// after a change the proxy still knows the next read will be cached.
    kept_once: HashMap<String, std::collections::HashSet<String>>,
}

/// How changes to the vault's files are noticed.
enum Changes {
    /// Nothing is cached yet, so nothing is watched yet.
    Unwatched,
    /// inotify on the vault's directory.
    Watched(OwnedFd),
    /// No inotify: the size and mtime of `vault.db` and its WAL when last looked at.
    Stat(Stamp),
}

/// What identifies one state of the vault's files.
type Stamp = [(u64, i64, i64); 2];

impl KeyCache {
    pub(crate) fn new(vault: PathBuf) -> KeyCache {
        KeyCache {
            vault,
            state: Mutex::new(State {
                generation: 0,
                changes: Changes::Unwatched,
                keys: HashMap::new(),
                kept_once: HashMap::new(),
            }),
        }
    }

    /// The key cached for `provider`/`profile`, if the vault has not changed since it was read.
    pub(crate) fn get(&self, provider: &str, profile: &str) -> Option<Zeroizing<String>> {
        let mut state = self.lock();
        if state.keys.is_empty() {
            return None;
        }
        self.catch_up(&mut state);
        state.keys.get(provider)?.get(profile).cloned()
    }

    /// Call before reading the vault; pass the answer to [`KeyCache::remember`]. Starts watching
    /// on first use, so every change after this call is seen.
    pub(crate) fn generation(&self) -> u64 {
        let mut state = self.lock();
        if matches!(state.changes, Changes::Unwatched) {
            state.changes = self.watch();
        }
        self.catch_up(&mut state);
        state.generation
    }

    /// The generation as of the last look at the vault's files, without looking again (no
    /// system call): for caches that may lag one look behind (the accepted provider grants,
    /// checked just before the key itself, whose lookup looks).
    pub(crate) fn last_generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keep `key`, read after [`KeyCache::generation`] returned `generation`, unless the vault
    /// changed in between (then the key read may already be stale).
    pub(crate) fn remember(
        &self,
        generation: u64,
        provider: &str,
        profile: &str,
        key: &Zeroizing<String>,
    ) {
        let mut state = self.lock();
        self.catch_up(&mut state);
        let kept_once = state.kept_once.entry(provider.to_string()).or_default();
        if !kept_once.contains(profile) {
            kept_once.insert(profile.to_string());
        }
        if state.generation == generation {
            state
                .keys
                .entry(provider.to_string())
                .or_default()
                .insert(profile.to_string(), key.clone());
        }
    }

    /// Was a key for `provider`/`profile` ever passed to [`KeyCache::remember`]? (No system
    /// call: what the vault holds now is for [`KeyCache::get`] to say.)
    pub(crate) fn was_kept(&self, provider: &str, profile: &str) -> bool {
        self.lock()
            .kept_once
            .get(provider)
            .is_some_and(|profiles| profiles.contains(profile))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forget every key if the vault changed since the last look.
    fn catch_up(&self, state: &mut State) {
        let changed = match &mut state.changes {
            Changes::Unwatched => false,
            Changes::Watched(fd) => match drain(fd) {
                Drained::Quiet => false,
                Drained::Changed => true,
                Drained::Lost => {
                    // The watch is gone (directory moved or removed, queue error): fall back.
                    state.changes = Changes::Stat(stamp(&self.vault));
                    true
                }
            },
            Changes::Stat(last) => {
                let now = stamp(&self.vault);
                std::mem::replace(last, now) != now
            }
        };
        if changed {
            state.generation += 1;
            state.keys.clear();
        }
    }

    fn watch(&self) -> Changes {
        let watched = self.vault.parent().and_then(|dir| {
            let fd = inotify::init(inotify::CreateFlags::NONBLOCK | inotify::CreateFlags::CLOEXEC)
                .ok()?;
            let events = WatchFlags::MODIFY
                | WatchFlags::CLOSE_WRITE
                | WatchFlags::ATTRIB
                | WatchFlags::CREATE
                | WatchFlags::DELETE
                | WatchFlags::MOVED_FROM
                | WatchFlags::MOVED_TO
                | WatchFlags::DELETE_SELF
                | WatchFlags::MOVE_SELF
                | WatchFlags::ONLYDIR;
            inotify::add_watch(&fd, dir, events).ok()?;
            Some(fd)
        });
        match watched {
            Some(fd) => Changes::Watched(fd),
            None => {
                tracing::debug!("inotify unavailable: the key cache compares the vault's mtime");
                Changes::Stat(stamp(&self.vault))
            }
        }
    }
}

enum Drained {
    Quiet,
    Changed,
    Lost,
}

/// Read every queued event (one `read()` when there is none).
fn drain(fd: &OwnedFd) -> Drained {
    let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
    let mut reader = inotify::Reader::new(fd, &mut buf);
    let mut outcome = Drained::Quiet;
    loop {
        let event = match reader.next() {
            Ok(event) => event,
            Err(rustix::io::Errno::AGAIN) => return outcome,
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return Drained::Lost,
        };
        let flags = event.events();
        if flags.intersects(
            ReadFlags::IGNORED | ReadFlags::DELETE_SELF | ReadFlags::MOVE_SELF | ReadFlags::UNMOUNT,
        ) {
            return Drained::Lost;
        }
        // An overflowed queue dropped events: any of them could have been the vault's.
        let ours = flags.contains(ReadFlags::QUEUE_OVERFLOW)
            || event
                .file_name()
                .is_some_and(|name| name.to_bytes().starts_with(VAULT_FILE));
        if ours {
            outcome = Drained::Changed;
        }
    }
}

/// Size and mtime of `vault.db` and its WAL (zeros for a missing file).
fn stamp(vault: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    let mut wal = vault.as_os_str().to_owned();
    wal.push("-wal");
    [vault, Path::new(&wal)]
        .map(|f| std::fs::metadata(f).map_or((0, 0, 0), |m| (m.size(), m.mtime(), m.mtime_nsec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Zeroizing<String> {
        Zeroizing::new(s.to_string())
    }

    fn held(cache: &KeyCache) -> Option<String> {
        cache.get("openai", "default").map(|k| k.to_string())
    }

    /// A cache for a `vault.db` (written) in `dir`.
    fn cache_in(dir: &Path) -> (PathBuf, KeyCache) {
        let vault = dir.join("vault.db");
        write(&vault, "v1");
        (vault.clone(), KeyCache::new(vault))
    }

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn a_write_to_the_vault_or_its_wal_drops_every_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vault, cache) = cache_in(dir.path());
        assert!(cache.get("openai", "default").is_none());
        let g = cache.generation();
        assert!(matches!(cache.lock().changes, Changes::Watched(_)));
        cache.remember(g, "openai", "default", &key("k1"));
        assert_eq!(held(&cache), Some("k1".to_string()));
        assert!(cache.get("openai", "other").is_none());

        // Another file in the same directory (the audit log) changes nothing.
        write(&dir.path().join("audit.jsonl"), "event");
        assert_eq!(held(&cache), Some("k1".to_string()));

        // The same size and within the same mtime tick: still seen.
        write(&vault, "v2");
        assert!(cache.get("openai", "default").is_none());

        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k2"));
        write(&dir.path().join("vault.db-wal"), "frame");
        assert!(cache.get("openai", "default").is_none());
    }

    #[test]
    fn a_key_read_across_a_change_is_not_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vault, cache) = cache_in(dir.path());
        let g = cache.generation();
        // The vault changes between the read and `remember`, and another lookup notices first.
        write(&vault, "v2");
        assert!(cache.get("openai", "default").is_none());
        let _ = cache.generation();
        cache.remember(g, "openai", "default", &key("stale"));
        assert!(cache.get("openai", "default").is_none());
    }

    #[test]
    fn a_key_once_kept_stays_known_as_cacheable_but_is_not_served_after_a_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vault, cache) = cache_in(dir.path());
        assert!(!cache.was_kept("openai", "default"));
        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k1"));
        write(&vault, "v2");
        // The key is gone, but the proxy still knows the next read of it will be cached (so
        // connections that miss together wait for one read).
        assert!(cache.get("openai", "default").is_none());
        assert!(cache.was_kept("openai", "default"));
        assert!(!cache.was_kept("openai", "other"));
        assert!(!cache.was_kept("github", "default"));
    }

    #[test]
    fn without_a_watch_the_files_stamp_decides() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vault, cache) = cache_in(dir.path());
        cache.lock().changes = Changes::Stat(stamp(&vault));
        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k1"));
        assert_eq!(held(&cache), Some("k1".to_string()));
        write(&vault, "a longer v2");
        assert!(cache.get("openai", "default").is_none());
    }

    #[test]
    fn a_moved_directory_falls_back_to_the_stamp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("mkdir");
        let (_vault, cache) = cache_in(&home);
        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k1"));
        std::fs::rename(&home, dir.path().join("elsewhere")).expect("rename");
        assert!(cache.get("openai", "default").is_none());
        assert!(matches!(cache.lock().changes, Changes::Stat(_)));
    }
}
