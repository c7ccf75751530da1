//! The credential vault: an SQLite file (`$BROKER_HOME/vault.db`, WAL) whose secrets are sealed.
//!
//! Key hierarchy:
//! - each secret is sealed with AES-256-GCM under one random 256-bit **data key**, with its
//!   whole row (provider, profile, kind, metadata, expiry, ...) in the AAD, so a blob moved to
//!   another row, or a row edited outside broker, does not open (see [`row`]);
//! - the data key is stored wrapped (sealed) by a **master key** from one [`KeySource`]:
//!   `BROKER_PASSPHRASE` (Argon2id, salt and cost stored in the vault), the OS keyring, or a
//!   0600 key file. `BROKER_KEY_SOURCE=passphrase|keyring|file` picks the source of a new vault
//!   (tests and CI use `file`); unset, the first that works in that order is used.
//! - The vault records which source holds its key and opens only with that one. A missing key
//!   is an error that says how to recover; a new key is never made over an existing vault.
//!
//! Several processes may use one vault at once: every write is one `BEGIN IMMEDIATE`
//! transaction, readers never block writers (WAL), and first-time initialisation happens inside
//! an immediate transaction that re-checks, so two racing processes cannot make two data keys.
//!
//! The API is synchronous; async callers use `spawn_blocking`. A [`Vault`] is `Send + Sync`
//! (one connection behind a mutex), so one instance can be shared in an `Arc`.

mod audit_head;
mod crypto;
mod derive;
mod keysource;
mod oauth;
mod row;
mod schema;
mod trust;

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use zeroize::Zeroizing;

use crate::home::Home;
pub use audit_head::{AuditHead, AuditHeadStore};
use crypto::{KdfParams, RowFormat, SealingKey, DATA_KEY_AAD, DATA_KEY_AAD_V1, KEY_LEN};
use keysource::KeyringLookup;
pub use keysource::{
    new_key_file_text, read_system_key_file, KeyConfig, KeySource, ENV_KEY_SOURCE, ENV_PASSPHRASE,
    KEYRING_TIMEOUT,
};
pub use oauth::{LockedCredential, Removal, StoredCredential, TokenUpdate};

/// How long a write waits for another process's transaction before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest provider or profile name accepted.
const MAX_NAME_LEN: usize = 64;
/// Longest secret accepted (OAuth access tokens can be a few KiB of JWT).
pub const MAX_SECRET_LEN: usize = 16 * 1024;

/// Errors of the vault. Each message says what to do; none contains a secret.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("vault database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("the vault was written by a newer broker (schema {found}, this one knows up to {supported}): upgrade broker")]
    TooNew { found: i64, supported: i64 },
    #[error("BROKER_KEY_SOURCE={0:?} is not one of: passphrase, keyring, file")]
    BadKeySourceEnv(String),
    #[error("the vault at {vault} keeps its key in the {recorded}, but BROKER_KEY_SOURCE asks for the {requested}: unset BROKER_KEY_SOURCE, or move the key with `broker rekey --to {}`", .requested.as_str())]
    SourceMismatch {
        vault: PathBuf,
        recorded: KeySource,
        requested: KeySource,
    },
    #[error(
        "the vault at {vault} is protected by a passphrase: set BROKER_PASSPHRASE to unlock it"
    )]
    PassphraseRequired { vault: PathBuf },
    #[error("BROKER_KEY_SOURCE=passphrase needs BROKER_PASSPHRASE to be set to create the vault")]
    PassphraseMissingForNewVault,
    #[error("wrong passphrase for the vault at {vault} (BROKER_PASSPHRASE): nothing was changed")]
    WrongPassphrase { vault: PathBuf },
    #[error(
        "the vault at {vault} is encrypted with the key file {key_file}, which is missing. \
             Restore master.key from a backup to {key_file}. Without it the stored credentials \
             cannot be decrypted; to start over, move {vault} away (its credentials are lost) and \
             add them again. broker never makes a new key over an existing vault"
    )]
    KeyFileMissing { vault: PathBuf, key_file: PathBuf },
    #[error("the key file {path} is readable by group or others (mode {mode:o}): run `chmod 600 {path}`, \
             and consider the stored credentials exposed")]
    KeyFileInsecure { path: PathBuf, mode: u32 },
    #[error("the key file {path} is not usable: {reason}")]
    KeyFileInvalid { path: PathBuf, reason: String },
    #[error(
        "the vault at {vault} keeps its key in the OS keyring, which is not reachable ({reason}): \
             unlock the keyring or run in your desktop session"
    )]
    KeyringUnavailable { vault: PathBuf, reason: String },
    #[error(
        "BROKER_KEY_SOURCE=keyring, but the OS keyring is not usable ({reason}): \
             use BROKER_KEY_SOURCE=file or set BROKER_PASSPHRASE"
    )]
    KeyringUnusable { reason: String },
    #[error("the vault at {vault} keeps its key in the OS keyring, but the keyring has no entry for it. \
             Restore the keyring entry (service \"broker\") from a backup; without it the stored \
             credentials cannot be decrypted. To start over, move {vault} away and add them again")]
    KeyringKeyMissing { vault: PathBuf },
    #[error("the key from the {source_name} does not open the vault at {vault} (it belongs to another vault?): nothing was changed")]
    WrongKey {
        vault: PathBuf,
        source_name: KeySource,
    },
    #[error("the vault at {vault} is damaged: {what}")]
    Corrupt { vault: PathBuf, what: String },
    #[error("credential {provider}/{profile} failed its integrity check (the vault row was changed outside broker): \
             nothing was used; run 'broker remove {provider}{flag}' and 'broker add {provider}{flag}' \
             (or 'broker login {provider}{flag}') again", flag = profile_flag(.profile))]
    Integrity { provider: String, profile: String },
    #[error("the accepted definition of provider {provider} failed its integrity check (the vault was changed outside broker): \
             review it and accept it again with 'broker providers trust {provider}'")]
    TrustIntegrity { provider: String },
    #[error("invalid {what} name {name:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    InvalidName { what: &'static str, name: String },
    #[error("invalid secret: {0}")]
    InvalidSecret(&'static str),
    #[error("the system random generator or cipher failed")]
    Crypto,
    #[error("a new passphrase is needed: set BROKER_NEW_PASSPHRASE, pipe it on stdin, or type it at the prompt")]
    NewPassphraseMissing,
    #[error("the vault's key is in the OS keyring already, and replacing it there in one step could lose it: \
             move it out and back (`broker rekey --to file`, then `broker rekey --to keyring`)")]
    KeyringInPlace,
    #[error("the OS keyring is not usable ({reason}): nothing was changed; use `broker rekey --to file` or `--to passphrase`")]
    KeyringUnusableForRekey { reason: String },
}

/// ` --profile NAME` for a profile other than the default, as the CLI takes it.
fn profile_flag(profile: &str) -> String {
    if profile == "default" {
        String::new()
    } else {
        format!(" --profile {profile}")
    }
}

impl VaultError {
    fn io(path: &Path, source: io::Error) -> VaultError {
        VaultError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What a credential is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CredentialKind {
    #[serde(rename = "api_key")]
    ApiKey,
    #[serde(rename = "oauth2")]
    OAuth2,
    /// The stored secret is a command that prints the key (`broker add --from-command`).
    #[serde(rename = "command")]
    Command,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::ApiKey => "api_key",
            CredentialKind::OAuth2 => "oauth2",
            CredentialKind::Command => "command",
        }
    }
    pub(crate) fn parse(s: &str) -> Option<CredentialKind> {
        match s {
            "api_key" => Some(CredentialKind::ApiKey),
            "oauth2" => Some(CredentialKind::OAuth2),
            "command" => Some(CredentialKind::Command),
            _ => None,
        }
    }
}

impl fmt::Display for CredentialKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A decrypted secret. Its memory is wiped on drop; `Debug` prints `***`; there is no
/// `Display`, so it cannot end up in a log line by accident: call [`Secret::expose`].
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(Zeroizing::new(value))
    }
    /// The secret itself, for the one place that needs it (the header swap).
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Is `other` the same secret? In constant time for secrets of equal length (a length
    /// difference shows): a caller compares a token it holds with the one stored.
    pub fn same_as(&self, other: &Secret) -> bool {
        use subtle::ConstantTimeEq as _;
        let (a, b) = (self.0.as_bytes(), other.0.as_bytes());
        a.len() == b.len() && bool::from(a.ct_eq(b))
    }
    /// Length in characters.
    pub fn char_len(&self) -> usize {
        self.0.chars().count()
    }
    /// A masked form for people: at most the key's conventional prefix (up to 4 characters
    /// ending in `-` or `_`, like `sk-` or `ghp_`) and the length, e.g. `sk-…(51 chars)`.
    pub fn masked(&self) -> String {
        let len = self.char_len();
        let prefix: String = if len >= 16 {
            let head: String = self.0.chars().take(4).collect();
            match head.find(['-', '_']) {
                Some(i) => head[..=i].to_string(),
                None => String::new(),
            }
        } else {
            String::new()
        };
        format!("{prefix}…({len} chars)")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A stored credential without its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CredentialInfo {
    pub provider: String,
    pub profile: String,
    pub kind: CredentialKind,
    /// RFC 3339 UTC.
    pub created_at: String,
    /// RFC 3339 UTC.
    pub updated_at: String,
    /// RFC 3339 UTC; OAuth access tokens only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The row passed its integrity check (it is as broker wrote it). When not, the fields
    /// above are what the row says, unauthenticated, and the credential is never used.
    pub integrity_ok: bool,
}

/// Whether [`Vault::put`] added a credential or replaced one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Added,
    Replaced,
}

/// Result of [`Vault::verify`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Rows checked.
    pub credentials: usize,
    /// `provider/profile` of the rows that fail their integrity check (changed outside
    /// broker, or damaged): never used until removed and added again.
    pub unreadable: Vec<String>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.unreadable.is_empty()
    }
}

/// An open, unlocked vault.
pub struct Vault {
    conn: Mutex<Connection>,
    data_key: SealingKey,
    /// Keys derived from the data key (the audit chain's), see `derive.rs`.
    derive: derive::Derivation,
    key_source: KeySource,
    path: PathBuf,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("path", &self.path)
            .field("key_source", &self.key_source)
            .finish_non_exhaustive()
    }
}

/// The keys of an unlocked vault, and its row format (which AAD opened the data key).
struct Unlocked {
    master: Zeroizing<[u8; KEY_LEN]>,
    data_key: Zeroizing<[u8; KEY_LEN]>,
    format: RowFormat,
}

/// The vault's metadata row.
struct Meta {
    key_source: KeySource,
    wrapped_data_key: Vec<u8>,
    kdf_salt: Option<Vec<u8>>,
    kdf_params: Option<KdfParams>,
}

impl Vault {
    /// Does `home` hold a vault file? Lets read-only commands avoid creating one (and a key).
    pub fn exists(home: &Home) -> bool {
        home.vault_path().exists()
    }

    /// Open the vault of `home`, creating it (and its master key) on first use. The key source
    /// comes from `BROKER_KEY_SOURCE` / `BROKER_PASSPHRASE` (see [`KeyConfig::from_env`]).
    pub fn open(home: &Home) -> Result<Vault, VaultError> {
        Vault::open_with(home, &KeyConfig::from_env()?)
    }

    /// [`Vault::open`] with explicit key settings.
    pub fn open_with(home: &Home, keys: &KeyConfig) -> Result<Vault, VaultError> {
        home.ensure().map_err(|e| VaultError::io(home.root(), e))?;
        let path = home.vault_path();
        prepare_db_file(&path)?;
        let mut conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        enable_wal(&conn)?;
        schema::migrate(&mut conn)?;

        let (key_source, (data_key, derive)) = match read_meta(&conn, &path)? {
            Some(meta) => (
                meta.key_source,
                unlock(home, &path, &meta, keys, &mut conn)?,
            ),
            None => initialize(home, &path, &mut conn, keys)?,
        };
        Ok(Vault {
            conn: Mutex::new(conn),
            data_key,
            derive,
            key_source,
            path,
        })
    }

    /// Which source holds this vault's master key.
    pub fn key_source(&self) -> KeySource {
        self.key_source
    }

    /// Path of the vault file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Store (or replace) the secret of `provider`/`profile`, with no metadata. Whatever the
    /// row held before (an OAuth refresh token, expiry, client secret) goes: it belonged to
    /// the old secret.
    pub fn put(
        &self,
        provider: &str,
        profile: &str,
        secret: &str,
        kind: CredentialKind,
    ) -> Result<PutOutcome, VaultError> {
        self.put_with_metadata(provider, profile, secret, kind, "{}")
    }

    /// [`Vault::put`] with `metadata` (JSON, no secrets; a command's TTL), in one transaction.
    pub fn put_with_metadata(
        &self,
        provider: &str,
        profile: &str,
        secret: &str,
        kind: CredentialKind,
        metadata: &str,
    ) -> Result<PutOutcome, VaultError> {
        check_name("provider", provider)?;
        check_name("profile", profile)?;
        check_secret(secret)?;
        let now = crate::audit::now_rfc3339();
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        // A replaced credential keeps when it was first added.
        let created: Option<String> = tx
            .query_row(
                "SELECT created_at FROM credentials WHERE provider = ?1 AND profile = ?2",
                params![provider, profile],
                |r| r.get(0),
            )
            .optional()?;
        self.write_row(
            &tx,
            provider,
            profile,
            &row::NewRow {
                kind,
                secret,
                refresh: None,
                client_secret: None,
                expires_at: None,
                metadata,
                created_at: created.as_deref().unwrap_or(&now),
                updated_at: &now,
            },
        )?;
        tx.commit()?;
        drop(conn);
        crate::key_cache::wait_for_lookups();
        Ok(if created.is_some() {
            PutOutcome::Replaced
        } else {
            PutOutcome::Added
        })
    }

    /// The secret of `provider`/`profile`, if stored. The whole row is checked.
    pub fn get(&self, provider: &str, profile: &str) -> Result<Option<Secret>, VaultError> {
        Ok(self.get_full(provider, profile)?.map(|c| c.secret))
    }

    /// Metadata of one credential (no secret), with whether it passes its integrity check.
    pub fn info(
        &self,
        provider: &str,
        profile: &str,
    ) -> Result<Option<CredentialInfo>, VaultError> {
        let conn = self.lock();
        row::read_row(&conn, provider, profile)?
            .map(|r| self.info_of(r))
            .transpose()
    }

    /// The (provider, profile) of every row, without opening any (no secret is decrypted, no
    /// integrity check made): which providers have a credential, for the placeholders a run's
    /// agent gets. A row edited outside broker is listed like the others; using it fails.
    pub fn stored_names(&self) -> Result<Vec<(String, String)>, VaultError> {
        row::read_names(&self.lock())
    }

    /// Every stored credential, sorted by provider then profile, each with whether it passes
    /// its integrity check. No secret leaves the vault.
    pub fn list(&self) -> Result<Vec<CredentialInfo>, VaultError> {
        let conn = self.lock();
        row::read_all(&conn)?
            .into_iter()
            .map(|r| self.info_of(r))
            .collect()
    }

    fn info_of(&self, row: row::RawRow) -> Result<CredentialInfo, VaultError> {
        let integrity_ok = self.open_row(&row).is_ok();
        let Some(kind) = CredentialKind::parse(&row.kind) else {
            // Only an edit outside broker writes another kind (the schema refuses it).
            return Err(row.integrity_error());
        };
        Ok(CredentialInfo {
            provider: row::shown(&row.provider),
            profile: row::shown(&row.profile),
            kind,
            created_at: row.created_at,
            updated_at: row.updated_at,
            expires_at: row.expires_at,
            integrity_ok,
        })
    }

    /// Remove a credential. `true` if there was one.
    pub fn remove(&self, provider: &str, profile: &str) -> Result<bool, VaultError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "DELETE FROM credentials WHERE provider = ?1 AND profile = ?2",
            params![provider, profile],
        )?;
        tx.commit()?;
        drop(conn);
        crate::key_cache::wait_for_lookups();
        Ok(n > 0)
    }

    /// Integrity check for `broker doctor`: SQLite's own check, then every row passes its
    /// integrity check (each blob opens against the whole row).
    pub fn verify(&self) -> Result<VerifyReport, VaultError> {
        let rows = {
            let conn = self.lock();
            let check: String = conn.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if check != "ok" {
                return Err(self.corrupt(format!("SQLite integrity check: {check}")));
            }
            row::read_all(&conn)?
        };
        let unreadable = rows
            .iter()
            .filter(|r| self.open_row(r).is_err())
            .map(row::RawRow::name)
            .collect();
        Ok(VerifyReport {
            credentials: rows.len(),
            unreadable,
        })
    }

    /// Wrap the data key under a new master key kept in `target` (a new passphrase, a new key
    /// file, or a new keyring entry) and record that source; the old key file or keyring entry
    /// is then removed. The secrets stay sealed under the same data key, so a broker that has
    /// unlocked the vault keeps working; what changes is what unlocks it. `keys` must unlock it
    /// as it is now.
    ///
    /// Crash-safe: the new key is stored where the vault does not look yet (a keyring entry
    /// the vault does not use, or `master.key.new`), then one transaction switches the vault
    /// to it, then `master.key.new` is renamed into place. A stop between the last two leaves
    /// both key files, and [`Vault::open`] finishes the rename.
    pub fn rekey(
        self,
        home: &Home,
        keys: &KeyConfig,
        target: KeySource,
        new_passphrase: Option<&str>,
    ) -> Result<(), VaultError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let meta = read_meta(&tx, &self.path)?.ok_or_else(|| self.corrupt("no key record"))?;
        let data_key = unlock_raw(home, &self.path, &meta, keys)?.data_key;
        if target == KeySource::Keyring && meta.key_source == KeySource::Keyring {
            return Err(VaultError::KeyringInPlace);
        }
        let pending = pending_key_file(home);
        let (master, salt, params) = match target {
            KeySource::Passphrase => {
                let pass = new_passphrase
                    .filter(|p| !p.is_empty())
                    .ok_or(VaultError::NewPassphraseMissing)?;
                let salt = crypto::random_bytes::<16>().map_err(|_| VaultError::Crypto)?;
                let params = KdfParams::DEFAULT;
                let key = crypto::derive_from_passphrase(pass.as_bytes(), &salt, params)
                    .map_err(|_| VaultError::Crypto)?;
                (key, Some(salt), Some(params))
            }
            KeySource::File => {
                let key = crypto::random_key().map_err(|_| VaultError::Crypto)?;
                // A leftover of a rekey that stopped before its commit unlocks nothing.
                remove_if_present(&pending)?;
                keysource::create_key_file(&pending, &key)?;
                (key, None, None)
            }
            KeySource::Keyring => {
                let key = crypto::random_key().map_err(|_| VaultError::Crypto)?;
                keysource::keyring_store(home.root(), &key)
                    .map_err(|reason| VaultError::KeyringUnusableForRekey { reason })?;
                (key, None, None)
            }
        };
        let (wrapped, params_json) = wrap_data_key(&master, &data_key, params, &self.path)?;
        tx.execute(
            "UPDATE vault_meta SET key_source = ?1, wrapped_data_key = ?2, kdf = ?3, kdf_salt = ?4,
             kdf_params = ?5 WHERE id = 1",
            params![
                target.as_str(),
                wrapped,
                params.map(|_| "argon2id"),
                salt.as_ref().map(|s| s.as_slice()),
                params_json,
            ],
        )?;
        tx.commit()?;
        drop(conn);
        let key_file = home.key_file_path();
        if target == KeySource::File {
            finish_key_file_move(&pending, &key_file)?;
        } else if meta.key_source == KeySource::File {
            // The old key unwraps the data key of any copy of the vault made before today.
            remove_if_present(&key_file)?;
        }
        if meta.key_source == KeySource::Keyring {
            if let Err(reason) = keysource::keyring_delete(home.root()) {
                tracing::warn!(%reason, "cannot delete the old key from the OS keyring; it unlocks only copies of the vault made before this rekey");
            }
        }
        tracing::info!(vault = %self.path.display(), from = meta.key_source.as_str(), to = target.as_str(), "moved the vault's master key");
        Ok(())
    }

    fn corrupt(&self, what: impl Into<String>) -> VaultError {
        VaultError::Corrupt {
            vault: self.path.clone(),
            what: what.into(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-done write: every write is a
        // transaction that rolls back on drop.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Provider and profile names: short, printable, no separators that could confuse a path,
/// a table or the AAD.
pub fn check_name(what: &'static str, name: &str) -> Result<(), VaultError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(VaultError::InvalidName {
            what,
            name: name.chars().take(MAX_NAME_LEN).collect(),
        })
    }
}

fn check_secret(secret: &str) -> Result<(), VaultError> {
    if secret.is_empty() {
        return Err(VaultError::InvalidSecret("it is empty"));
    }
    if secret.len() > MAX_SECRET_LEN {
        return Err(VaultError::InvalidSecret("it is longer than 16 KiB"));
    }
    if secret.chars().any(char::is_control) {
        return Err(VaultError::InvalidSecret(
            "it contains a line break or control character (only one trailing newline is removed)",
        ));
    }
    Ok(())
}

/// Create the vault file 0600 before SQLite does (SQLite would use the umask); its `-wal` and
/// `-shm` files inherit the database file's mode.
fn prepare_db_file(path: &Path) -> Result<(), VaultError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| VaultError::io(path, e))?;
    let mode = fs::metadata(path)
        .map_err(|e| VaultError::io(path, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(0o600))
            .map_err(|e| VaultError::io(path, e))?;
    }
    Ok(())
}

/// Switch to WAL (persistent in the file). Switching needs a moment of exclusive access, which
/// a concurrent first open can hold: retry briefly on "busy".
fn enable_wal(conn: &Connection) -> Result<(), VaultError> {
    let mut attempts = 0;
    loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(VaultError::Corrupt {
                    vault: conn.path().map(PathBuf::from).unwrap_or_default(),
                    what: format!("cannot enable WAL (journal mode stays {mode})"),
                })
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && attempts < 200 =>
            {
                attempts += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The key source recorded in `home`'s vault, read without unlocking it; `None` when there is
/// no vault yet or it cannot be read. (`broker run` hides the keyring's D-Bus socket from a
/// sandboxed agent when the vault's key is there.)
pub fn recorded_key_source(home: &Home) -> Option<KeySource> {
    let path = home.vault_path();
    if !path.is_file() {
        return None;
    }
    let conn =
        Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    read_meta(&conn, &path)
        .ok()
        .flatten()
        .map(|meta| meta.key_source)
}

fn read_meta(conn: &Connection, vault: &Path) -> Result<Option<Meta>, VaultError> {
    let row = conn
        .query_row(
            "SELECT key_source, wrapped_data_key, kdf_salt, kdf_params FROM vault_meta WHERE id = 1",
            [],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            },
        )
        .optional()?;
    let Some((source, wrapped_data_key, kdf_salt, kdf_params)) = row else {
        return Ok(None);
    };
    let corrupt = |what: String| VaultError::Corrupt {
        vault: vault.to_owned(),
        what,
    };
    let key_source = KeySource::parse(&source)
        .ok_or_else(|| corrupt(format!("unknown key source {source:?}")))?;
    let kdf_params = kdf_params
        .map(|p| serde_json::from_str::<KdfParams>(&p))
        .transpose()
        .map_err(|e| corrupt(format!("bad KDF parameters: {e}")))?;
    Ok(Some(Meta {
        key_source,
        wrapped_data_key,
        kdf_salt,
        kdf_params,
    }))
}

/// Get the master key from the source the vault recorded (and only there), then unwrap the
/// data key; a vault of row format 1 is migrated then ([`row::migrate_rows`]). Changes nothing
/// on failure (but for finishing a rekey's key file move).
fn unlock(
    home: &Home,
    vault: &Path,
    meta: &Meta,
    keys: &KeyConfig,
    conn: &mut Connection,
) -> Result<DataKeys, VaultError> {
    let unlocked = unlock_raw(home, vault, meta, keys)?;
    if unlocked.format == RowFormat::V1 {
        row::migrate_rows(conn, vault, &unlocked)?;
    }
    Ok(data_keys(&unlocked.data_key))
}

/// What the vault keeps of its data key: the sealing key and the derivation of other keys.
type DataKeys = (SealingKey, derive::Derivation);

fn data_keys(raw: &[u8; KEY_LEN]) -> DataKeys {
    (SealingKey::new(raw), derive::Derivation::new(raw))
}

/// [`unlock`] without migrating, giving the keys' bytes.
fn unlock_raw(
    home: &Home,
    vault: &Path,
    meta: &Meta,
    keys: &KeyConfig,
) -> Result<Unlocked, VaultError> {
    if let Some(requested) = keys.source.filter(|r| *r != meta.key_source) {
        return Err(VaultError::SourceMismatch {
            vault: vault.to_owned(),
            recorded: meta.key_source,
            requested,
        });
    }
    let master = match meta.key_source {
        KeySource::Passphrase => {
            let pass = keys
                .passphrase
                .as_ref()
                .ok_or_else(|| VaultError::PassphraseRequired {
                    vault: vault.to_owned(),
                })?;
            let (Some(salt), Some(params)) = (&meta.kdf_salt, meta.kdf_params) else {
                return Err(VaultError::Corrupt {
                    vault: vault.to_owned(),
                    what: "passphrase vault without KDF salt or parameters".into(),
                });
            };
            crypto::derive_from_passphrase(pass.as_bytes(), salt, params).map_err(|what| {
                VaultError::Corrupt {
                    vault: vault.to_owned(),
                    what,
                }
            })?
        }
        KeySource::Keyring => match keysource::keyring_get(home.root()) {
            KeyringLookup::Found(key) => key,
            KeyringLookup::Missing => {
                return Err(VaultError::KeyringKeyMissing {
                    vault: vault.to_owned(),
                })
            }
            KeyringLookup::Unavailable(reason) => {
                return Err(VaultError::KeyringUnavailable {
                    vault: vault.to_owned(),
                    reason,
                })
            }
        },
        KeySource::File if keys.system_key_file.is_some() => {
            let path = keys.system_key_file.as_deref().unwrap_or(Path::new(""));
            keysource::read_system_key_file(path)?
        }
        KeySource::File => {
            let key_file = home.key_file_path();
            let current = keysource::read_key_file(&key_file)?;
            // A rekey that stopped after switching the vault but before renaming its new key
            // file: the new key opens it, and the rename is finished here.
            let opens = |key: &[u8; KEY_LEN]| unwrap_raw(key, &meta.wrapped_data_key).is_some();
            if !current.as_ref().is_some_and(|key| opens(key)) {
                let pending = pending_key_file(home);
                if let Some(new) = keysource::read_key_file(&pending)?.filter(|key| opens(key)) {
                    finish_key_file_move(&pending, &key_file)?;
                    tracing::warn!(key_file = %key_file.display(), "finished moving the vault's new key file into place (a rekey had stopped)");
                    let (data_key, format) =
                        unwrap_raw(&new, &meta.wrapped_data_key).ok_or(VaultError::Crypto)?;
                    return Ok(Unlocked {
                        master: new,
                        data_key,
                        format,
                    });
                }
            }
            current.ok_or_else(|| VaultError::KeyFileMissing {
                vault: vault.to_owned(),
                key_file,
            })?
        }
    };
    let (data_key, format) =
        unwrap_raw(&master, &meta.wrapped_data_key).ok_or_else(|| match meta.key_source {
            KeySource::Passphrase => VaultError::WrongPassphrase {
                vault: vault.to_owned(),
            },
            source => VaultError::WrongKey {
                vault: vault.to_owned(),
                source_name: source,
            },
        })?;
    Ok(Unlocked {
        master,
        data_key,
        format,
    })
}

/// The data key, and the vault's row format: which of the two data-key AADs opens it.
fn unwrap_raw(
    master: &[u8; KEY_LEN],
    wrapped: &[u8],
) -> Option<(Zeroizing<[u8; KEY_LEN]>, RowFormat)> {
    let key = SealingKey::new(master);
    let (raw, format) = match key.open(wrapped, DATA_KEY_AAD) {
        Ok(raw) => (raw, RowFormat::V2),
        Err(_) => (key.open(wrapped, DATA_KEY_AAD_V1).ok()?, RowFormat::V1),
    };
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    bytes.copy_from_slice(raw.get(..KEY_LEN).filter(|_| raw.len() == KEY_LEN)?);
    Some((bytes, format))
}

/// The data key sealed by `master`, and the KDF parameters as the key record stores them.
fn wrap_data_key(
    master: &[u8; KEY_LEN],
    data_key: &[u8; KEY_LEN],
    params: Option<KdfParams>,
    vault: &Path,
) -> Result<(Vec<u8>, Option<String>), VaultError> {
    let wrapped = SealingKey::new(master)
        .seal(data_key, DATA_KEY_AAD)
        .map_err(|_| VaultError::Crypto)?;
    let params_json = params
        .map(|p| serde_json::to_string(&p))
        .transpose()
        .map_err(|e| VaultError::Corrupt {
            vault: vault.to_owned(),
            what: e.to_string(),
        })?;
    Ok((wrapped, params_json))
}

/// Where [`Vault::rekey`] writes a new key file before the vault uses it.
fn pending_key_file(home: &Home) -> PathBuf {
    home.root().join("master.key.new")
}

/// Rename the new key file over the old one, and make the rename durable.
fn finish_key_file_move(pending: &Path, key_file: &Path) -> Result<(), VaultError> {
    match fs::rename(pending, key_file) {
        Ok(()) => {}
        // Another process finished it first.
        Err(e) if e.kind() == io::ErrorKind::NotFound && key_file.exists() => return Ok(()),
        Err(e) => return Err(VaultError::io(pending, e)),
    }
    if let Some(dir) = key_file.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| VaultError::io(dir, e))?;
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<(), VaultError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(VaultError::io(path, e)),
        _ => Ok(()),
    }
}

/// First use: choose a key source, make a data key, store it wrapped. Runs inside an immediate
/// transaction and re-checks, so of two processes racing here exactly one creates the key and
/// the other unlocks what the first made.
fn initialize(
    home: &Home,
    vault: &Path,
    conn: &mut Connection,
    keys: &KeyConfig,
) -> Result<(KeySource, DataKeys), VaultError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(meta) = read_meta(&tx, vault)? {
        drop(tx);
        let key = unlock(home, vault, &meta, keys, conn)?;
        return Ok((meta.key_source, key));
    }

    let (source, master, salt, params) = new_master_key(home, keys)?;
    let data_key = crypto::random_key().map_err(|_| VaultError::Crypto)?;
    let (wrapped, params_json) = wrap_data_key(&master, &data_key, params, vault)?;
    tx.execute(
        "INSERT INTO vault_meta (id, key_source, wrapped_data_key, kdf, kdf_salt, kdf_params, created_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            source.as_str(),
            wrapped,
            params.map(|_| "argon2id"),
            salt.as_ref().map(|s| s.as_slice()),
            params_json,
            crate::audit::now_rfc3339(),
        ],
    )?;
    let keys = data_keys(&data_key);
    // The audit chain's head exists as long as the vault does (see audit_head.rs).
    audit_head::start_empty(&tx, &keys.1)?;
    tx.commit()?;
    tracing::info!(vault = %vault.display(), key_source = source.as_str(), "created a new vault");
    Ok((source, keys))
}

type NewMaster = (
    KeySource,
    Zeroizing<[u8; KEY_LEN]>,
    Option<[u8; 16]>,
    Option<KdfParams>,
);

/// The master key for a new vault, from the requested source or the first that works:
/// passphrase, keyring, key file. An existing key in the keyring or key file of this home is
/// reused rather than overwritten (a vault file may have been moved away and back).
fn new_master_key(home: &Home, keys: &KeyConfig) -> Result<NewMaster, VaultError> {
    let pass = keys.passphrase.as_ref();
    let source = match keys.source {
        Some(s) => s,
        None if pass.is_some() => KeySource::Passphrase,
        // A system broker: root's key file, never a keyring (it has no session).
        None if keys.system_key_file.is_some() => KeySource::File,
        None => {
            match keyring_master(home) {
                Ok(key) => return Ok((KeySource::Keyring, key, None, None)),
                Err(reason) => {
                    tracing::info!("OS keyring not usable ({reason}); using the key file");
                }
            }
            KeySource::File
        }
    };
    match source {
        KeySource::Passphrase => {
            let pass = pass.ok_or(VaultError::PassphraseMissingForNewVault)?;
            let salt = crypto::random_bytes::<16>().map_err(|_| VaultError::Crypto)?;
            let params = KdfParams::DEFAULT;
            let key = crypto::derive_from_passphrase(pass.as_bytes(), &salt, params)
                .map_err(|_| VaultError::Crypto)?;
            Ok((KeySource::Passphrase, key, Some(salt), Some(params)))
        }
        KeySource::Keyring => keyring_master(home)
            .map(|key| (KeySource::Keyring, key, None, None))
            .map_err(|reason| VaultError::KeyringUnusable { reason }),
        KeySource::File if keys.system_key_file.is_some() => {
            let path = keys.system_key_file.as_deref().unwrap_or(Path::new(""));
            let key = keysource::read_system_key_file(path)?;
            Ok((KeySource::File, key, None, None))
        }
        KeySource::File => {
            let path = home.key_file_path();
            let key = match keysource::read_key_file(&path)? {
                Some(key) => key,
                None => {
                    let key = crypto::random_key().map_err(|_| VaultError::Crypto)?;
                    keysource::create_key_file(&path, &key)?;
                    key
                }
            };
            Ok((KeySource::File, key, None, None))
        }
    }
}

fn keyring_master(home: &Home) -> Result<Zeroizing<[u8; KEY_LEN]>, String> {
    match keysource::keyring_get(home.root()) {
        KeyringLookup::Found(key) => Ok(key),
        KeyringLookup::Unavailable(reason) => Err(reason),
        KeyringLookup::Missing => {
            let key = crypto::random_key().map_err(|_| "random generator failed".to_string())?;
            keysource::keyring_store(home.root(), &key)?;
            Ok(key)
        }
    }
}

/// For tests: a vault in a fresh temporary home (`<dir>/home`), its master key in a key file
/// there (no keyring, no passphrase).
#[cfg(test)]
pub(crate) fn test_vault() -> (tempfile::TempDir, Home, Vault) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let home = Home::at(dir.path().join("home"));
    let vault = Vault::open_with(&home, &test_key_file())
        .unwrap_or_else(|e| panic!("open a test vault: {e}"));
    (dir, home, vault)
}

/// For tests: the key settings of [`test_vault`].
#[cfg(test)]
pub(crate) fn test_key_file() -> KeyConfig {
    KeyConfig {
        source: Some(KeySource::File),
        passphrase: None,
        system_key_file: None,
    }
}

#[cfg(test)]
mod tests;
