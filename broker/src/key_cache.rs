//! API keys already read from the vault, kept while the vault's files are unchanged, so a
//! request needs no thread hop, SQLite query or decryption.
//!
//! Any write by any process (`broker add`, `remove`, a refresh) to `vault.db` or its WAL is
//! seen by the first lookup that looks at the vault's files after it. Normally through inotify
//! on the vault's directory: the kernel queues the event inside the writer's `write()`, and a
//! look is one non-blocking `read()` of the queue. Where inotify cannot be used (no instances
//! left, the directory moved), a look compares the files' size and mtime instead: two `stat`
//! calls.
//!
//! A lookup looks when the last look started [`LOOK_EVERY`] or longer ago: a look is a system
//! call (about 0.3 µs here), which every proxied request paid (README, "Seventh round"). What
//! makes a removed or replaced key unusable once `broker remove` or `add` has returned is the
//! writer's half: a write that changes a key or a grant waits [`wait_for_lookups`] before it
//! returns. The last look before the lookup of a request sent after that either started after
//! the write (and saw it) or more than [`LOOK_EVERY`] before the lookup (which then looks). A
//! process that writes the vault without waiting (`sqlite3`, an older broker) is seen within
//! [`LOOK_EVERY`].

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::fs::inotify::{self, ReadFlags, WatchFlags};
use zeroize::Zeroizing;

/// The vault's files all start with this name (`vault.db`, `-wal`, `-shm`, `-journal`).
const VAULT_FILE: &[u8] = b"vault.db";

/// A lookup trusts a look at the vault's files that started less than this long ago.
pub(crate) const LOOK_EVERY: Duration = Duration::from_millis(1);

/// After a write to the vault that changes what a key cache may hold (a key added, replaced or
/// removed, a provider's grants), wait until every lookup that starts after this returns will
/// look at the vault's files again: more than [`LOOK_EVERY`] from the end of the write, on the
/// monotonic clock that every process on the machine shares. Call it when the write has
/// committed, without holding the vault's connection (`Vault::put`, `remove`, `put_oauth`,
/// `remove_if`, `set_trusted_grants` do).
pub(crate) fn wait_for_lookups() {
    let until = Instant::now() + 2 * LOOK_EVERY;
    // `sleep` may wake early on some systems: the clock decides.
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left);
    }
}

pub(crate) struct KeyCache {
    vault: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// Counts the vault changes seen; a read that straddles a change is not kept.
    generation: u64,
    changes: Changes,
    /// When the last look at the vault's files started (`None`: never).
    looked_at: Option<Instant>,
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
                looked_at: None,
                keys: HashMap::new(),
                kept_once: HashMap::new(),
            }),
        }
    }

    /// The key cached for `provider`/`profile`, if the vault has not changed since it was read
    /// (as far as a look that started less than [`LOOK_EVERY`] ago saw; see the module's doc).
    pub(crate) fn get(&self, provider: &str, profile: &str) -> Option<Zeroizing<String>> {
        let mut state = self.lock();
        if state.keys.is_empty() {
            return None;
        }
        if state.looked_at.is_none_or(|at| at.elapsed() >= LOOK_EVERY) {
            self.catch_up(&mut state);
        }
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

    /// Look at the vault's files: forget every key if the vault changed since the last look.
    fn catch_up(&self, state: &mut State) {
        // Stamped before the look: a write that lands during it may be missed by it, and is
        // then after the stamp, so it is waited out by its writer ([`wait_for_lookups`]).
        state.looked_at = Some(Instant::now());
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

    /// Write as the vault's writers do: then wait until every later lookup looks.
    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
        wait_for_lookups();
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
    fn a_lookup_looks_at_most_once_a_millisecond_and_a_writer_waits_that_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (vault, cache) = cache_in(dir.path());
        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k1"));
        // As if a look had just started: a write that does not wait is not seen yet.
        cache.lock().looked_at = Some(Instant::now() + Duration::from_secs(3600));
        std::fs::write(&vault, "v2").expect("write");
        assert_eq!(held(&cache), Some("k1".to_string()), "looked again at once");
        // A real look (it sees that write), then a write that waits as the vault's writers
        // do: the next lookup looks and drops the key.
        let g = cache.generation();
        cache.remember(g, "openai", "default", &key("k2"));
        assert_eq!(held(&cache), Some("k2".to_string()));
        std::fs::write(&vault, "v3").expect("write");
        let before = Instant::now();
        wait_for_lookups();
        assert!(
            before.elapsed() > LOOK_EVERY,
            "the writer waited {:?}",
            before.elapsed()
        );
        assert!(
            cache.get("openai", "default").is_none(),
            "the write was not seen"
        );
    }

    /// The writers' half, through the vault itself: a running broker's cache, which looked
    /// just before the write, must look again (and drop the key) on the first lookup after
    /// any write that changes a key or a grant returns. Without the wait in that write, the
    /// lookup comes well within `LOOK_EVERY` of the look and serves the old key.
    #[test]
    fn every_vault_write_that_changes_a_key_or_a_grant_is_waited_out() {
        use crate::vault::{CredentialKind, TokenUpdate, Vault, VaultError};
        type Write = dyn Fn(&Vault) -> Result<(), VaultError>;
        let (_dir, home, vault) = crate::vault::test_vault();
        let cache = KeyCache::new(home.vault_path());
        let oauth = |vault: &Vault| {
            let tokens = TokenUpdate {
                access: "oauth-access-token-0123456789",
                refresh: None,
                expires_at: None,
                metadata: "{}",
            };
            vault
                .put_oauth("openai", "default", &tokens, None)
                .map(drop)
        };
        let writes: [(&str, &Write); 5] = [
            ("put", &|v| {
                v.put(
                    "openai",
                    "default",
                    "sk-replaced-0123456789abcdef",
                    CredentialKind::ApiKey,
                )
                .map(drop)
            }),
            ("put_oauth", &oauth),
            ("remove_if", &|v| {
                v.remove_if("openai", "default", |_| true).map(drop)
            }),
            ("remove", &|v| v.remove("openai", "default").map(drop)),
            ("set_trusted_grants", &|v| {
                v.set_trusted_grants("openai", &[]).map(drop)
            }),
        ];
        for (what, write) in writes {
            // Whatever the write before left, the vault holds a key again.
            vault
                .put(
                    "openai",
                    "default",
                    "sk-kept-0123456789abcdefgh",
                    CredentialKind::ApiKey,
                )
                .expect("put");
            // A lookup that read it, as the proxy's does; the look is now.
            let g = cache.generation();
            cache.remember(g, "openai", "default", &key("sk-kept-0123456789abcdefgh"));
            write(&vault).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert!(
                cache.get("openai", "default").is_none(),
                "{what}: the cached key was served after the write returned"
            );
        }
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
        // Seen by the next look, at most a millisecond later.
        std::thread::sleep(2 * LOOK_EVERY);
        assert!(cache.get("openai", "default").is_none());
        assert!(matches!(cache.lock().changes, Changes::Stat(_)));
    }
}
