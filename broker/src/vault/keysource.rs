//! Where the vault's master key lives: a passphrase, the OS keyring, or a key file.
//!
//! The master key only wraps the vault's data key (see `mod.rs`). The vault records which
//! source holds it; opening an existing vault asks that source and no other, so a missing key
//! is reported, never replaced by a new one.

use std::fmt;
use std::fs;
use std::io::{self, Read as _};
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use zeroize::Zeroizing;

use super::crypto::KEY_LEN;
use super::VaultError;

/// Selects the key source of a new vault (and must agree with an existing one):
/// `passphrase`, `keyring` or `file`. Unset: passphrase if `BROKER_PASSPHRASE` is set, else the
/// keyring if it answers, else the key file.
pub const ENV_KEY_SOURCE: &str = "BROKER_KEY_SOURCE";
/// The vault passphrase (Argon2id). Read from the environment only, never from argv.
pub const ENV_PASSPHRASE: &str = "BROKER_PASSPHRASE";

/// How long a keyring call may take. A locked desktop keyring can wait for a user prompt
/// forever; with no Secret Service at all it fails within milliseconds.
pub const KEYRING_TIMEOUT: Duration = Duration::from_secs(3);

/// The keyring "service" of every entry broker stores.
const KEYRING_SERVICE: &str = "broker";

/// Which source holds a vault's master key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// Derived from `BROKER_PASSPHRASE` with Argon2id.
    Passphrase,
    /// A random key stored in the OS keyring (Secret Service, macOS Keychain, Windows).
    Keyring,
    /// A random key in `$BROKER_HOME/master.key` (0600).
    File,
}

impl KeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::Passphrase => "passphrase",
            KeySource::Keyring => "keyring",
            KeySource::File => "file",
        }
    }

    pub fn parse(s: &str) -> Option<KeySource> {
        match s.trim().to_ascii_lowercase().as_str() {
            "passphrase" => Some(KeySource::Passphrase),
            "keyring" => Some(KeySource::Keyring),
            "file" | "key-file" | "keyfile" => Some(KeySource::File),
            _ => None,
        }
    }

    /// `BROKER_KEY_SOURCE`, if set.
    pub fn from_env() -> Result<Option<KeySource>, VaultError> {
        match std::env::var(ENV_KEY_SOURCE) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => KeySource::parse(&v)
                .map(Some)
                .ok_or(VaultError::BadKeySourceEnv(v)),
            Err(_) => Ok(None),
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            KeySource::Passphrase => "passphrase (BROKER_PASSPHRASE)",
            KeySource::Keyring => "OS keyring",
            KeySource::File => "key file",
        })
    }
}

/// How to find or make the master key: the resolved settings, so tests can pass them in
/// instead of setting process-wide environment variables.
#[derive(Default, Clone)]
pub struct KeyConfig {
    /// Required source (`BROKER_KEY_SOURCE`); `None` picks the first that works.
    pub source: Option<KeySource>,
    /// `BROKER_PASSPHRASE`.
    pub passphrase: Option<Zeroizing<String>>,
    /// A system broker's key file, made by root (`/etc/broker/master.key`, 0640 root:broker,
    /// or systemd's `$CREDENTIALS_DIRECTORY/master.key`): the key source `file` reads this one,
    /// and never creates it. `None`: `$BROKER_HOME/master.key`, created on first use.
    pub system_key_file: Option<std::path::PathBuf>,
}

impl fmt::Debug for KeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyConfig")
            .field("source", &self.source)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "***"))
            .field("system_key_file", &self.system_key_file)
            .finish()
    }
}

impl KeyConfig {
    /// From `BROKER_KEY_SOURCE` and `BROKER_PASSPHRASE` (an empty passphrase counts as unset).
    pub fn from_env() -> Result<KeyConfig, VaultError> {
        Ok(KeyConfig {
            source: KeySource::from_env()?,
            // Taken out of the environment at start (see `hardening`).
            passphrase: crate::hardening::secret_env(ENV_PASSPHRASE).filter(|p| !p.is_empty()),
            system_key_file: None,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Key file

/// Read the master key from the key file, refusing a file others can read.
/// `Ok(None)` when the file does not exist.
pub fn read_key_file(path: &Path) -> Result<Option<Zeroizing<[u8; KEY_LEN]>>, VaultError> {
    let mut file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(VaultError::io(path, e)),
    };
    let meta = file.metadata().map_err(|e| VaultError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(VaultError::KeyFileInsecure {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.uid() != rustix::process::geteuid().as_raw() {
        return Err(VaultError::KeyFileInvalid {
            path: path.to_owned(),
            reason: format!("it belongs to uid {}, not to the current user", meta.uid()),
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| VaultError::io(path, e))?;
    decode_key(text.trim())
        .map(Some)
        .ok_or_else(|| VaultError::KeyFileInvalid {
            path: path.to_owned(),
            reason: "it does not hold a base64-encoded 32-byte key".into(),
        })
}

/// Read a system broker's key file: made by root or handed over by systemd (owned by us),
/// readable by no one else but our group (`0640 root:broker`), writable by no one but its
/// owner. Missing is an error: the system broker never makes its own key (root does, at
/// install), so a key it could not read is never silently replaced.
pub fn read_system_key_file(path: &Path) -> Result<Zeroizing<[u8; KEY_LEN]>, VaultError> {
    let mut file = fs::File::open(path).map_err(|e| VaultError::KeyFileInvalid {
        path: path.to_owned(),
        reason: format!(
            "{e}; `broker system install` (as root) makes it, or start the broker with LoadCredential=master.key or BROKER_PASSPHRASE"
        ),
    })?;
    let meta = file.metadata().map_err(|e| VaultError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    let ours = rustix::process::geteuid().as_raw();
    let group_ok = mode & 0o070 == 0
        || (mode & 0o030 == 0 && meta.gid() == rustix::process::getegid().as_raw());
    if mode & 0o007 != 0 || !group_ok {
        return Err(VaultError::KeyFileInvalid {
            path: path.to_owned(),
            reason: format!(
                "mode {mode:o} (group {}) lets others read or change it: `chown root:<broker's group> {p} && chmod 0640 {p}`, and consider the stored credentials exposed",
                meta.gid(),
                p = path.display()
            ),
        });
    }
    if meta.uid() != 0 && meta.uid() != ours {
        return Err(VaultError::KeyFileInvalid {
            path: path.to_owned(),
            reason: format!(
                "it belongs to uid {}: it must be root's (or ours, from systemd)",
                meta.uid()
            ),
        });
    }
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text)
        .map_err(|e| VaultError::io(path, e))?;
    decode_key(text.trim()).ok_or_else(|| VaultError::KeyFileInvalid {
        path: path.to_owned(),
        reason: "it does not hold a base64-encoded 32-byte key".into(),
    })
}

/// A new random master key, as a key file holds it (base64 and a newline), for
/// `broker system install`.
pub fn new_key_file_text() -> Result<Zeroizing<String>, VaultError> {
    let key = super::crypto::random_key().map_err(|_| VaultError::Crypto)?;
    Ok(Zeroizing::new(format!("{}\n", encode_key(&key).as_str())))
}

/// Create the key file (0600, created exclusively so an existing key is never overwritten).
pub fn create_key_file(path: &Path, key: &[u8; KEY_LEN]) -> Result<(), VaultError> {
    use std::io::Write as _;
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VaultError::io(path, e))?;
    let text = Zeroizing::new(format!("{}\n", encode_key(key).as_str()));
    file.write_all(text.as_bytes())
        .map_err(|e| VaultError::io(path, e))?;
    file.sync_all().map_err(|e| VaultError::io(path, e))?;
    Ok(())
}

fn encode_key(key: &[u8; KEY_LEN]) -> Zeroizing<String> {
    Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key))
}

fn decode_key(text: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let bytes = Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
    );
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    if bytes.len() != KEY_LEN {
        return None;
    }
    key.copy_from_slice(&bytes);
    Some(key)
}

// ---------------------------------------------------------------------------------------------
// OS keyring

/// One keyring entry per `BROKER_HOME`, so test homes and real homes never share a key.
fn keyring_user(home_root: &Path) -> String {
    let root = fs::canonicalize(home_root).unwrap_or_else(|_| home_root.to_owned());
    format!("master-key:{}", root.display())
}

/// Run a keyring call on its own thread, giving up after [`KEYRING_TIMEOUT`]. A call that
/// hangs (a prompt nobody answers) is left behind on its detached thread.
fn with_timeout<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, keyring::Error> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("broker-keyring".into())
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        return Err(format!("cannot start the keyring thread: {e}"));
    }
    match rx.recv_timeout(KEYRING_TIMEOUT) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the keyring did not answer within {} s (locked, or waiting for a prompt?)",
            KEYRING_TIMEOUT.as_secs()
        )),
    }
}

/// What the keyring said about our entry.
pub enum KeyringLookup {
    Found(Zeroizing<[u8; KEY_LEN]>),
    /// The keyring works but holds no entry for this home.
    Missing,
    /// The keyring cannot be reached (no Secret Service, timeout, ...): the reason.
    Unavailable(String),
}

pub fn keyring_get(home_root: &Path) -> KeyringLookup {
    let user = keyring_user(home_root);
    let got = with_timeout(move || {
        let entry = keyring::Entry::new(KEYRING_SERVICE, &user)?;
        match entry.get_password() {
            Ok(p) => Ok(Some(Zeroizing::new(p))),
            Err(keyring::Error::NoEntry) => Ok(None),
            Err(e) => Err(e),
        }
    });
    match got {
        Ok(Some(text)) => match decode_key(text.trim()) {
            Some(key) => KeyringLookup::Found(key),
            None => {
                KeyringLookup::Unavailable("the keyring entry does not hold a 32-byte key".into())
            }
        },
        Ok(None) => KeyringLookup::Missing,
        Err(reason) => KeyringLookup::Unavailable(reason),
    }
}

/// Store a new master key in the keyring and read it back: some keyrings accept a write into
/// a session-only collection that is gone at the next login.
pub fn keyring_store(home_root: &Path, key: &[u8; KEY_LEN]) -> Result<(), String> {
    let user = keyring_user(home_root);
    let text = encode_key(key);
    let write_user = user.clone();
    with_timeout(move || {
        let entry = keyring::Entry::new(KEYRING_SERVICE, &write_user)?;
        entry.set_password(&text)
    })?;
    match keyring_get(home_root) {
        KeyringLookup::Found(back) if back[..] == key[..] => Ok(()),
        KeyringLookup::Found(_) => Err("the keyring returned a different key".into()),
        KeyringLookup::Missing => Err("the keyring did not keep the key".into()),
        KeyringLookup::Unavailable(reason) => Err(reason),
    }
}

/// Delete this home's keyring entry (after the vault moved its key elsewhere).
pub fn keyring_delete(home_root: &Path) -> Result<(), String> {
    let user = keyring_user(home_root);
    with_timeout(move || {
        let entry = keyring::Entry::new(KEYRING_SERVICE, &user)?;
        match entry.delete_credential() {
            Err(keyring::Error::NoEntry) => Ok(()),
            other => other,
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        assert!(read_key_file(&path).unwrap().is_none());
        create_key_file(&path, &[7u8; KEY_LEN]).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(*read_key_file(&path).unwrap().unwrap(), [7u8; KEY_LEN]);
        // Never overwritten.
        assert!(create_key_file(&path, &[8u8; KEY_LEN]).is_err());
        assert_eq!(*read_key_file(&path).unwrap().unwrap(), [7u8; KEY_LEN]);
    }

    #[test]
    fn key_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        create_key_file(&path, &[7u8; KEY_LEN]).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let err = read_key_file(&path).unwrap_err();
            assert!(matches!(err, VaultError::KeyFileInsecure { .. }), "{err}");
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
    }

    #[test]
    fn garbage_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        fs::write(&path, "not a key\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            read_key_file(&path),
            Err(VaultError::KeyFileInvalid { .. })
        ));
    }

    #[test]
    fn a_system_key_file_is_read_only_when_no_one_else_can() {
        use std::os::unix::fs::chown;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        fs::write(&path, new_key_file_text().unwrap().as_bytes()).unwrap();
        // Our group may read it (0640 root:broker, as the broker sees it); others may not.
        let group = rustix::process::getegid().as_raw();
        chown(&path, None, Some(group)).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o640, true),
            (0o400, true),
            (0o644, false),
            (0o660, false),
            (0o604, false),
        ] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            let read = read_system_key_file(&path);
            assert_eq!(read.is_ok(), ok, "mode {mode:o}: {:?}", read.err());
        }
        // Readable by a group that is not ours: refused.
        if rustix::process::geteuid().is_root() {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
            chown(&path, None, Some(group + 4242)).unwrap();
            let err = read_system_key_file(&path).unwrap_err();
            assert!(
                err.to_string().contains("lets others read or change it"),
                "{err}"
            );
        }
        // Missing: an error that says who makes it, never a new key.
        let missing = dir.path().join("nope.key");
        let err = read_system_key_file(&missing).unwrap_err();
        assert!(err.to_string().contains("broker system install"), "{err}");
        assert!(!missing.exists());
    }

    #[test]
    fn key_source_names() {
        for s in [KeySource::Passphrase, KeySource::Keyring, KeySource::File] {
            assert_eq!(KeySource::parse(s.as_str()), Some(s));
        }
        assert_eq!(KeySource::parse("nope"), None);
    }
}
