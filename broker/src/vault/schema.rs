//! The vault's schema and its migrations, versioned by SQLite's `user_version`.
//!
//! Migration `i` takes the schema from version `i` to `i + 1`. Never edit a released
//! migration: append a new one.

use rusqlite::{Connection, TransactionBehavior};

use super::VaultError;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the metadata row (how the data key is wrapped) and the credentials.
    "CREATE TABLE vault_meta (
         id               INTEGER PRIMARY KEY CHECK (id = 1),
         key_source       TEXT NOT NULL,        -- passphrase | keyring | file
         wrapped_data_key BLOB NOT NULL,        -- data key sealed by the master key
         kdf              TEXT,                 -- 'argon2id' for a passphrase
         kdf_salt         BLOB,
         kdf_params       TEXT,                 -- JSON {m_cost, t_cost, p_cost}
         created_at       TEXT NOT NULL
     );
     CREATE TABLE credentials (
         provider       TEXT NOT NULL,
         profile        TEXT NOT NULL,
         kind           TEXT NOT NULL CHECK (kind IN ('api_key', 'oauth2')),
         secret         BLOB NOT NULL,          -- sealed API key or OAuth access token
         refresh_secret BLOB,                   -- sealed OAuth refresh token
         expires_at     TEXT,                   -- RFC 3339, access token expiry
         metadata       TEXT NOT NULL DEFAULT '{}', -- JSON, no secrets (token endpoint, scopes)
         created_at     TEXT NOT NULL,
         updated_at     TEXT NOT NULL,
         PRIMARY KEY (provider, profile)
     ) WITHOUT ROWID;",
    // 1 -> 2: a confidential OAuth client's secret, sealed like the tokens (`broker login`).
    // OAuth state that is not secret (endpoints, client id, a failed refresh) stays in
    // `metadata`.
    "ALTER TABLE credentials ADD COLUMN client_secret BLOB;",
    // 2 -> 3: a credential can be a command that prints the key (`broker add --from-command`);
    // SQLite cannot change a CHECK in place, so the table is rebuilt with the rows copied.
    "CREATE TABLE credentials_v3 (
         provider       TEXT NOT NULL,
         profile        TEXT NOT NULL,
         kind           TEXT NOT NULL CHECK (kind IN ('api_key', 'oauth2', 'command')),
         secret         BLOB NOT NULL,          -- sealed API key, OAuth access token, or command
         refresh_secret BLOB,
         expires_at     TEXT,
         metadata       TEXT NOT NULL DEFAULT '{}', -- JSON, no secrets (endpoints, scopes, ttl)
         created_at     TEXT NOT NULL,
         updated_at     TEXT NOT NULL,
         client_secret  BLOB,
         PRIMARY KEY (provider, profile)
     ) WITHOUT ROWID;
     INSERT INTO credentials_v3 (provider, profile, kind, secret, refresh_secret, expires_at,
                                 metadata, created_at, updated_at, client_secret)
         SELECT provider, profile, kind, secret, refresh_secret, expires_at,
                metadata, created_at, updated_at, client_secret FROM credentials;
     DROP TABLE credentials;
     ALTER TABLE credentials_v3 RENAME TO credentials;",
    // 3 -> 4: rows are sealed against the whole row (row format 2, `vault::row`). The tables do
    // not change; the re-sealing needs the data key, so it happens when the vault is next
    // unlocked (`row::migrate_rows`), and the format is recorded by the AAD of the wrapped data
    // key. The bump keeps older brokers, which cannot open such rows, out with a clear error.
    "-- no table changes",
    // 4 -> 5: the provider definitions the user accepted for each provider's credentials
    // (`vault::trust`): the hosts, ports, paths and placements a key may go to, sealed.
    "CREATE TABLE IF NOT EXISTS provider_trust (
         provider   TEXT PRIMARY KEY,
         grants     BLOB NOT NULL,              -- sealed JSON list of grants
         updated_at TEXT NOT NULL
     ) WITHOUT ROWID;",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Bring the schema up to date. Cheap when it already is (one read, no write lock); otherwise
/// one immediate transaction that re-reads the version, so concurrent openers migrate once.
pub fn migrate(conn: &mut Connection) -> Result<(), VaultError> {
    let found = user_version(conn)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = user_version(&tx)?;
    // A negative version was never written by broker: treat it like an unknown newer one.
    let Some(pending) = usize::try_from(found)
        .ok()
        .and_then(|i| MIGRATIONS.get(i..))
    else {
        return Err(VaultError::TooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    };
    for migration in pending {
        tx.execute_batch(migration)?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    Ok(())
}
