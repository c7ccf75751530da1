//! Where the audit chain stands, kept in the vault: the `seq`, MAC and byte offset of the last
//! line the broker knows it wrote to `audit.jsonl`. The log alone cannot show that lines were
//! cut from its end or that it was replaced by an older copy; compared with this head it can.
//!
//! The row is authenticated: a tag (HMAC-SHA256 under a key derived from the data key) covers
//! its fields, so moving the head back to match a cut log needs the master key. The head is a
//! lower bound: the log is written first and the head after, so after a crash the log may be
//! ahead of the head by lines MACed under the audit key, never behind it.
//!
//! A vault made by this broker has a head from its first transaction on: `seq` 0, "no line
//! yet". So a missing row means a vault made before the head existed (its log is format 1, or
//! none), or a row deleted; the audit tells the two apart as far as it can (see `audit/mod.rs`).
//!
//! The table is created here (`CREATE TABLE IF NOT EXISTS`), by a new vault or on first use,
//! and written through a connection of its own, so the audit writer never waits for the
//! vault's connection.

use std::path::PathBuf;
use std::time::Duration;

use ring::hmac;
use rusqlite::{params, Connection, OptionalExtension as _};

use super::{Vault, VaultError};

/// How long a head update waits for another writer of the vault.
const HEAD_BUSY_TIMEOUT: Duration = Duration::from_secs(2);
/// The label of the key that tags the head row.
const HEAD_KEY_LABEL: &str = "broker audit head v2";

const CREATE: &str = "CREATE TABLE IF NOT EXISTS audit_head (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    seq        INTEGER NOT NULL,   -- seq of the last line written
    mac        TEXT NOT NULL,      -- that line's MAC (hex)
    line_start INTEGER NOT NULL,   -- byte offset where that line starts in audit.jsonl
    tag        BLOB NOT NULL,      -- HMAC over the three, under a key derived from the data key
    updated_at TEXT NOT NULL
)";

/// The last line of the audit log the vault knows of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditHead {
    /// 0: no line written yet (`mac` is then 64 zeros and `line_start` 0).
    pub seq: u64,
    /// The line's MAC, lowercase hex.
    pub mac: String,
    /// Byte offset of the line's first byte.
    pub line_start: u64,
}

/// Reads and writes the head. One SQLite connection of its own (`Send`, not `Sync`).
pub struct AuditHeadStore {
    conn: Connection,
    key: hmac::Key,
    vault: PathBuf,
}

impl std::fmt::Debug for AuditHeadStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditHeadStore")
            .field("vault", &self.vault)
            .finish_non_exhaustive()
    }
}

impl Vault {
    /// Open the audit head of this vault (creating its table on first use).
    pub fn audit_head_store(&self) -> Result<AuditHeadStore, VaultError> {
        let conn = Connection::open(&self.path)?;
        // The audit writer holds the log's lock while it waits here: not for long. A head that
        // could not be moved stays a lower bound, and the next write moves it.
        conn.busy_timeout(HEAD_BUSY_TIMEOUT)?;
        // The head is a lower bound and the log is synced before it is written: a head update
        // lost to a power cut only makes it lower. So commits need not wait for the disk.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Created only when missing: even a no-op CREATE would wait for a writer's lock.
        let exists = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_head'",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        if !exists {
            conn.busy_timeout(super::BUSY_TIMEOUT)?;
            conn.execute_batch(CREATE)?;
            conn.busy_timeout(HEAD_BUSY_TIMEOUT)?;
        }
        Ok(AuditHeadStore {
            conn,
            key: self.derived_key(HEAD_KEY_LABEL),
            vault: self.path.clone(),
        })
    }
}

/// In a new vault's first transaction: the table, and the head of an empty chain.
pub(super) fn start_empty(
    tx: &Connection,
    derive: &super::derive::Derivation,
) -> Result<(), VaultError> {
    tx.execute_batch(CREATE)?;
    write_row(
        tx,
        &derive.hmac_key(HEAD_KEY_LABEL),
        &AuditHead {
            seq: 0,
            mac: crate::audit::GENESIS.to_string(),
            line_start: 0,
        },
    )
    .map_err(|e| match e {
        Some(e) => e,
        None => VaultError::Crypto,
    })
}

/// Insert or replace the head row. `Err(None)`: the head is out of SQLite's range.
fn write_row(
    conn: &Connection,
    key: &hmac::Key,
    head: &AuditHead,
) -> Result<(), Option<VaultError>> {
    let seq = i64::try_from(head.seq).map_err(|_| None)?;
    let line_start = i64::try_from(head.line_start).map_err(|_| None)?;
    let tag = hmac::sign(key, &tag_input(head));
    // Cached: one update per audit batch.
    conn.prepare_cached(
        "INSERT INTO audit_head (id, seq, mac, line_start, tag, updated_at)
         VALUES (1, ?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, mac = excluded.mac,
             line_start = excluded.line_start, tag = excluded.tag,
             updated_at = excluded.updated_at",
    )
    .and_then(|mut statement| {
        statement.execute(params![
            seq,
            head.mac,
            line_start,
            tag.as_ref(),
            crate::audit::now_rfc3339()
        ])
    })
    .map_err(|e| Some(e.into()))?;
    Ok(())
}

impl AuditHeadStore {
    /// Does the vault hold any credential? (A vault with credentials and neither a head nor
    /// an audit log lost its log.)
    pub fn vault_has_credentials(&self) -> Result<bool, VaultError> {
        Ok(self
            .conn
            .query_row("SELECT EXISTS (SELECT 1 FROM credentials)", [], |r| {
                r.get::<_, bool>(0)
            })?)
    }

    /// The head, or `None` before the first keyed line. A row whose tag does not verify
    /// (edited without the key) is an error.
    pub fn read(&self) -> Result<Option<AuditHead>, VaultError> {
        let row = self
            .conn
            .query_row(
                "SELECT seq, mac, line_start, tag FROM audit_head WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((seq, mac, line_start, tag)) = row else {
            return Ok(None);
        };
        let edited = || VaultError::Corrupt {
            vault: self.vault.clone(),
            what: "the audit head (table audit_head) was changed without the vault's key: \
                   run `broker audit verify`, then `broker audit reset --yes`"
                .into(),
        };
        let (Ok(seq), Ok(line_start)) = (u64::try_from(seq), u64::try_from(line_start)) else {
            return Err(edited());
        };
        let head = AuditHead {
            seq,
            mac,
            line_start,
        };
        hmac::verify(&self.key, &tag_input(&head), &tag).map_err(|_| edited())?;
        Ok(Some(head))
    }

    /// Record `head` as where the chain stands.
    pub fn write(&self, head: &AuditHead) -> Result<(), VaultError> {
        write_row(&self.conn, &self.key, head).map_err(|e| {
            e.unwrap_or_else(|| VaultError::Corrupt {
                vault: self.vault.clone(),
                what: "audit head out of range".into(),
            })
        })
    }
}

/// What the tag covers: length-prefixed, so no two heads give the same bytes.
fn tag_input(head: &AuditHead) -> Vec<u8> {
    let mut input = b"broker-audit-head-v2\0".to_vec();
    input.extend_from_slice(&head.seq.to_be_bytes());
    input.extend_from_slice(&head.line_start.to_be_bytes());
    input.extend_from_slice(&(head.mac.len() as u64).to_be_bytes());
    input.extend_from_slice(head.mac.as_bytes());
    input
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn vault() -> (tempfile::TempDir, Vault) {
        let (dir, _, vault) = crate::vault::test_vault();
        (dir, vault)
    }

    #[test]
    fn audit_head_round_trips_and_an_edit_is_refused() {
        let (_dir, vault) = vault();
        let store = vault.audit_head_store().unwrap();
        let empty = store.read().unwrap().unwrap();
        assert_eq!((empty.seq, empty.line_start), (0, 0), "a new vault's head");
        let head = AuditHead {
            seq: 7,
            mac: "ab".repeat(32),
            line_start: 1234,
        };
        store.write(&head).unwrap();
        assert_eq!(store.read().unwrap(), Some(head.clone()));
        // Another connection (another process) sees it.
        assert_eq!(
            vault.audit_head_store().unwrap().read().unwrap(),
            Some(head)
        );
        // Moved back without the key, as someone who cut the log would.
        store
            .conn
            .execute("UPDATE audit_head SET seq = 3, line_start = 400", [])
            .unwrap();
        let err = store.read().unwrap_err();
        assert!(err.to_string().contains("broker audit reset"), "{err}");
    }
}
