//! Credential rows authenticated whole (row format 2).
//!
//! Every sealed blob of a row (the secret, the refresh token, the client secret) has the whole
//! row in its AAD ([`row_aad`]): provider, profile, the blob's field, kind, metadata (token
//! endpoint, client id, grant, a command's TTL), expiry, times, and which optional blobs the
//! row holds. A row edited outside broker (`sqlite3 vault.db "UPDATE credentials SET
//! kind='command'"`) no longer opens, and is refused with [`VaultError::Integrity`]: nothing is
//! used, run or sent. Every write re-seals the row's blobs, so there is no field that changes
//! without them. The only writer of a row is [`Vault::write_row`]; the only reader that opens
//! one is [`Vault::open_row`].
//!
//! A vault of format 1 (schema 3 and before: blobs bound to provider, profile and field only)
//! is migrated when it is first unlocked: [`migrate_rows`] re-seals every row under format 2
//! and re-wraps the data key under the format-2 AAD in one transaction. Which AAD opens the
//! wrapped data key is the vault's format, authenticated by the master key; format-1 rows are
//! never opened otherwise.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};

use super::crypto::{self, credential_aad_v1, row_aad, Field, RowBinding, SealingKey};
use super::{
    read_meta, unwrap_raw, CredentialKind, Secret, StoredCredential, Unlocked, Vault, VaultError,
};

/// A credential row as stored, blobs still sealed.
pub(super) struct RawRow {
    pub provider: String,
    pub profile: String,
    pub kind: String,
    pub secret: Vec<u8>,
    pub refresh: Option<Vec<u8>>,
    pub client_secret: Option<Vec<u8>>,
    pub expires_at: Option<String>,
    pub metadata: String,
    pub created_at: String,
    pub updated_at: String,
}

const COLUMNS: &str = "provider, profile, kind, secret, refresh_secret, client_secret, expires_at,
                       metadata, created_at, updated_at";

impl RawRow {
    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            provider: r.get(0)?,
            profile: r.get(1)?,
            kind: r.get(2)?,
            secret: r.get(3)?,
            refresh: r.get(4)?,
            client_secret: r.get(5)?,
            expires_at: r.get(6)?,
            metadata: r.get(7)?,
            created_at: r.get(8)?,
            updated_at: r.get(9)?,
        })
    }

    fn binding(&self) -> RowBinding<'_> {
        RowBinding {
            provider: &self.provider,
            profile: &self.profile,
            kind: &self.kind,
            metadata: &self.metadata,
            expires_at: self.expires_at.as_deref(),
            created_at: &self.created_at,
            updated_at: &self.updated_at,
            has_refresh: self.refresh.is_some(),
            has_client_secret: self.client_secret.is_some(),
        }
    }

    /// `provider/profile`, as reports name a row.
    pub fn name(&self) -> String {
        format!("{}/{}", shown(&self.provider), shown(&self.profile))
    }

    /// The integrity error for this row.
    pub fn integrity_error(&self) -> VaultError {
        VaultError::Integrity {
            provider: shown(&self.provider),
            profile: shown(&self.profile),
        }
    }
}

/// A name read from the file as it may be printed: broker writes only checked names
/// ([`super::check_name`]); anything else (an edit outside broker) is shown with `?` for each
/// character a checked name cannot hold, so no control sequence reaches a terminal.
pub(super) fn shown(name: &str) -> String {
    name.chars()
        .take(super::MAX_NAME_LEN)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// One row, blobs sealed.
pub(super) fn read_row(
    conn: &Connection,
    provider: &str,
    profile: &str,
) -> Result<Option<RawRow>, VaultError> {
    // Cached: the proxy reads a row again after every change to the vault's files, and the
    // audit writer's head update is one every batch; parsing the SQL each time was most of
    // the read.
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM credentials WHERE provider = ?1 AND profile = ?2"
        ))?
        .query_row(params![provider, profile], RawRow::from_sql)
        .optional()?)
}

/// Every row, sorted by provider then profile, blobs sealed.
pub(super) fn read_all(conn: &Connection) -> Result<Vec<RawRow>, VaultError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM credentials ORDER BY provider, profile"
    ))?;
    let rows = stmt.query_map([], RawRow::from_sql)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The (provider, profile) of every row, sorted: names only, no sealed column read.
pub(super) fn read_names(conn: &Connection) -> Result<Vec<(String, String)>, VaultError> {
    let mut stmt = conn
        .prepare_cached("SELECT provider, profile FROM credentials ORDER BY provider, profile")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A row to write, secrets in the clear (sealed by [`Vault::write_row`]).
pub(super) struct NewRow<'a> {
    pub kind: CredentialKind,
    pub secret: &'a str,
    pub refresh: Option<&'a str>,
    pub client_secret: Option<&'a str>,
    pub expires_at: Option<&'a str>,
    pub metadata: &'a str,
    pub created_at: &'a str,
    pub updated_at: &'a str,
}

impl Vault {
    /// Open every blob of `row` against the whole row. Any difference from what broker sealed
    /// (an edited column, a blob from elsewhere, a blob removed) is an integrity error naming
    /// the row.
    pub(super) fn open_row(&self, row: &RawRow) -> Result<StoredCredential, VaultError> {
        let integrity = || row.integrity_error();
        let kind = CredentialKind::parse(&row.kind).ok_or_else(integrity)?;
        let binding = row.binding();
        let open = |field: Field, blob: &[u8]| -> Result<Secret, VaultError> {
            let plain = self
                .data_key
                .open(blob, &row_aad(&binding, field))
                .map_err(|_| integrity())?;
            let text = std::str::from_utf8(&plain).map_err(|_| integrity())?;
            Ok(Secret::new(text.to_owned()))
        };
        Ok(StoredCredential {
            kind,
            secret: open(Field::Secret, &row.secret)?,
            refresh: row
                .refresh
                .as_deref()
                .map(|b| open(Field::Refresh, b))
                .transpose()?,
            client_secret: row
                .client_secret
                .as_deref()
                .map(|b| open(Field::ClientSecret, b))
                .transpose()?,
            expires_at: row.expires_at.clone(),
            metadata: row.metadata.clone(),
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
        })
    }

    /// Seal `new` against its whole row and store it as `provider`/`profile`, replacing any row
    /// there. Every write of a credential goes through here, so no column of a row changes
    /// without its blobs being sealed again. A caller whose write can change an API key that a
    /// running broker caches calls `key_cache::wait_for_lookups` once it has committed and let
    /// go of the connection (`put`, `put_oauth`; a token refresh, which only OAuth rows see,
    /// does not need to).
    pub(super) fn write_row(
        &self,
        conn: &Connection,
        provider: &str,
        profile: &str,
        new: &NewRow<'_>,
    ) -> Result<(), VaultError> {
        let binding = RowBinding {
            provider,
            profile,
            kind: new.kind.as_str(),
            metadata: new.metadata,
            expires_at: new.expires_at,
            created_at: new.created_at,
            updated_at: new.updated_at,
            has_refresh: new.refresh.is_some(),
            has_client_secret: new.client_secret.is_some(),
        };
        let seal = |field: Field, value: &str| {
            self.data_key
                .seal(value.as_bytes(), &row_aad(&binding, field))
                .map_err(|_| VaultError::Crypto)
        };
        let secret = seal(Field::Secret, new.secret)?;
        let refresh = new.refresh.map(|r| seal(Field::Refresh, r)).transpose()?;
        let client_secret = new
            .client_secret
            .map(|c| seal(Field::ClientSecret, c))
            .transpose()?;
        conn.execute(
            "INSERT OR REPLACE INTO credentials (provider, profile, kind, secret, refresh_secret,
                 client_secret, expires_at, metadata, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            params![
                provider,
                profile,
                new.kind.as_str(),
                secret,
                refresh,
                client_secret,
                new.expires_at,
                new.metadata,
                new.created_at,
                new.updated_at
            ],
        )?;
        Ok(())
    }
}

/// Migrate a vault of row format 1: in one immediate transaction, re-seal every row against
/// its whole row and re-wrap the data key under the format-2 AAD. All or nothing: a crash
/// leaves the vault in format 1, migrated at the next open. A process that finds the vault
/// already migrated (by another one, while it waited for the lock) changes nothing.
///
/// A row whose blobs do not open under format 1 either (damaged, or moved between rows) is
/// left as it is: it fails the integrity check from now on, like any row changed outside
/// broker. Returns how many rows were re-sealed.
pub(super) fn migrate_rows(
    conn: &mut Connection,
    vault: &Path,
    unlocked: &Unlocked,
) -> Result<usize, VaultError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let corrupt = |what: &str| VaultError::Corrupt {
        vault: vault.to_owned(),
        what: what.to_string(),
    };
    let meta = read_meta(&tx, vault)?.ok_or_else(|| corrupt("no key record"))?;
    match unwrap_raw(&unlocked.master, &meta.wrapped_data_key) {
        Some((_, crypto::RowFormat::V2)) => return Ok(0),
        Some((key, crypto::RowFormat::V1)) if *key == *unlocked.data_key => {}
        _ => {
            return Err(corrupt(
                "its key record changed while it was being opened: try again",
            ))
        }
    }
    let key = SealingKey::new(&unlocked.data_key);
    let mut resealed = 0;
    for row in read_all(&tx)? {
        let open = |field: Field, blob: &[u8]| {
            key.open(blob, &credential_aad_v1(&row.provider, &row.profile, field))
                .ok()
        };
        let opened = (|| {
            let secret = open(Field::Secret, &row.secret)?;
            let refresh = match &row.refresh {
                Some(b) => Some(open(Field::Refresh, b)?),
                None => None,
            };
            let client = match &row.client_secret {
                Some(b) => Some(open(Field::ClientSecret, b)?),
                None => None,
            };
            Some((secret, refresh, client))
        })();
        let Some((secret, refresh, client)) = opened else {
            tracing::warn!(credential = %row.name(), "a credential that does not decrypt was left as it is: it fails its integrity check; remove it and add it again");
            continue;
        };
        let binding = row.binding();
        let seal = |field: Field, plain: &[u8]| {
            key.seal(plain, &row_aad(&binding, field))
                .map_err(|_| VaultError::Crypto)
        };
        let secret = seal(Field::Secret, &secret)?;
        let refresh = refresh.map(|p| seal(Field::Refresh, &p)).transpose()?;
        let client = client.map(|p| seal(Field::ClientSecret, &p)).transpose()?;
        tx.execute(
            "UPDATE credentials SET secret = ?3, refresh_secret = ?4, client_secret = ?5
             WHERE provider = ?1 AND profile = ?2",
            params![row.provider, row.profile, secret, refresh, client],
        )?;
        resealed += 1;
    }
    let wrapped = SealingKey::new(&unlocked.master)
        .seal(unlocked.data_key.as_ref(), crypto::DATA_KEY_AAD)
        .map_err(|_| VaultError::Crypto)?;
    tx.execute(
        "UPDATE vault_meta SET wrapped_data_key = ?1 WHERE id = 1",
        params![wrapped],
    )?;
    tx.commit()?;
    tracing::info!(vault = %vault.display(), credentials = resealed, "re-sealed the vault's credentials with their whole row authenticated (row format 2)");
    Ok(resealed)
}
