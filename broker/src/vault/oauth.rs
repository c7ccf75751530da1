//! OAuth credentials in the vault: an access token (the row's `secret`), a refresh token
//! (`refresh_secret`), the access token's expiry, a confidential client's secret
//! (`client_secret`, schema 2), and non-secret OAuth state in `metadata` (JSON: endpoints,
//! client id, whether the login expired). Each secret is sealed against the whole row
//! (`super::row`), so every write here re-seals all of them.
//!
//! [`Vault::with_credential_lock`] is the single-flight primitive of token refresh: it holds
//! SQLite's write lock (`BEGIN IMMEDIATE`) across read -> refresh -> store, so of several
//! processes (two `broker run`s, a `broker serve`) that find a token expiring at once, one
//! refreshes and the others, blocked on the lock, re-read and find the new token.
//!
//! [`Vault::remove_if_unchanged`] is logout's side of the same lock: it removes a login only
//! if its tokens are still the ones logout revoked, so a refresh that rotated them meanwhile
//! cannot have its new tokens deleted unrevoked (`crate::oauth::logout`).

use rusqlite::{params, OptionalExtension as _, Transaction, TransactionBehavior};

use super::row::{self, NewRow};
use super::{check_name, check_secret, CredentialKind, PutOutcome, Secret, Vault, VaultError};

/// Everything stored for one credential, secrets opened.
#[derive(Debug)]
pub struct StoredCredential {
    pub kind: CredentialKind,
    /// The API key or OAuth access token.
    pub secret: Secret,
    pub refresh: Option<Secret>,
    pub client_secret: Option<Secret>,
    /// RFC 3339 UTC.
    pub expires_at: Option<String>,
    /// JSON object, no secrets.
    pub metadata: String,
    /// RFC 3339 UTC: when the secret was last written (the access token's issue time).
    pub updated_at: String,
    /// RFC 3339 UTC: when the credential was added.
    pub created_at: String,
}

impl StoredCredential {
    /// Every secret of the credential (the key or access token, the refresh token, the client
    /// secret): what an endpoint's answer must be redacted of.
    pub fn secret_bytes(&self) -> Vec<&[u8]> {
        [
            Some(&self.secret),
            self.refresh.as_ref(),
            self.client_secret.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().as_bytes())
        .collect()
    }

    /// Are `other`'s tokens (access token or key, refresh token) the same as these? Compared
    /// in constant time; the kind must match too. The client secret and metadata are not
    /// compared: they say how to use the tokens, not which tokens a revocation ended.
    pub fn same_tokens(&self, other: &StoredCredential) -> bool {
        let refresh_same = match (&self.refresh, &other.refresh) {
            (Some(a), Some(b)) => a.same_as(b),
            (None, None) => true,
            _ => false,
        };
        // Both compared whatever the first gives, so the time does not say which differed.
        let secret_same = self.secret.same_as(&other.secret);
        self.kind == other.kind && secret_same && refresh_same
    }
}

/// What [`Vault::remove_if`] found under the lock.
#[derive(Debug)]
pub enum Removal {
    /// The row was removed; this is what it held.
    Removed(StoredCredential),
    /// The row was left in place; this is what it holds now.
    Kept(StoredCredential),
    /// There was no row (removed already).
    Missing,
}

/// New tokens from a login or a refresh.
#[derive(Debug)]
pub struct TokenUpdate<'a> {
    pub access: &'a str,
    /// `None` keeps the stored refresh token (a refresh that did not rotate it).
    pub refresh: Option<&'a str>,
    /// RFC 3339 UTC, `None` when the server did not say.
    pub expires_at: Option<String>,
    /// JSON object, no secrets.
    pub metadata: &'a str,
}

/// One credential under the vault's write lock; see [`Vault::with_credential_lock`].
pub struct LockedCredential<'a> {
    vault: &'a Vault,
    tx: &'a Transaction<'a>,
    provider: &'a str,
    profile: &'a str,
}

impl Vault {
    /// Store an OAuth login: access token, refresh token, expiry, metadata, and (for a
    /// confidential client) the client secret. Replaces whatever `provider`/`profile` held.
    pub fn put_oauth(
        &self,
        provider: &str,
        profile: &str,
        tokens: &TokenUpdate<'_>,
        client_secret: Option<&str>,
    ) -> Result<PutOutcome, VaultError> {
        check_name("provider", provider)?;
        check_name("profile", profile)?;
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existed: bool = tx
            .query_row(
                "SELECT 1 FROM credentials WHERE provider = ?1 AND profile = ?2",
                params![provider, profile],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        check_secret(tokens.access)?;
        for secret in tokens.refresh.iter().chain(client_secret.iter()) {
            check_secret(secret)?;
        }
        let now = crate::audit::now_rfc3339();
        self.write_row(
            &tx,
            provider,
            profile,
            &NewRow {
                kind: CredentialKind::OAuth2,
                secret: tokens.access,
                refresh: tokens.refresh,
                client_secret,
                expires_at: tokens.expires_at.as_deref(),
                metadata: tokens.metadata,
                created_at: &now,
                updated_at: &now,
            },
        )?;
        tx.commit()?;
        drop(conn);
        // It may replace an API key that a running broker keeps in memory.
        crate::key_cache::wait_for_lookups();
        Ok(if existed {
            PutOutcome::Replaced
        } else {
            PutOutcome::Added
        })
    }

    /// Everything stored for `provider`/`profile`, secrets opened. No lock is taken.
    pub fn get_full(
        &self,
        provider: &str,
        profile: &str,
    ) -> Result<Option<StoredCredential>, VaultError> {
        let conn = self.lock();
        read_full(self, &conn, provider, profile)
    }

    /// Run `f` on `provider`/`profile` while holding the vault's write lock (an immediate
    /// transaction): no other process or thread can write the vault until `f` returns, and
    /// writes made through the [`LockedCredential`] are committed when it returns, whatever
    /// it returns (a failed refresh still records that it failed). A panic rolls back.
    ///
    /// `f` may block on the network (a token refresh): writers elsewhere wait up to the busy
    /// timeout (15 s), so `f` must give up well before that.
    pub fn with_credential_lock<T, E: From<VaultError>>(
        &self,
        provider: &str,
        profile: &str,
        f: impl FnOnce(&LockedCredential<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(VaultError::from)?;
        let result = {
            let locked = LockedCredential {
                vault: self,
                tx: &tx,
                provider,
                profile,
            };
            f(&locked)
        };
        tx.commit().map_err(VaultError::from)?;
        result
    }

    /// Remove `provider`/`profile` if `remove` says so of the row as it is now, read under the
    /// vault's write lock (the lock a refresh holds from its read to its store): no refresh
    /// can rotate the tokens between that read and the removal.
    pub fn remove_if(
        &self,
        provider: &str,
        profile: &str,
        remove: impl FnOnce(&StoredCredential) -> bool,
    ) -> Result<Removal, VaultError> {
        let removal =
            self.with_credential_lock(provider, profile, |locked| -> Result<_, VaultError> {
                let Some(current) = locked.read()? else {
                    return Ok(Removal::Missing);
                };
                if !remove(&current) {
                    return Ok(Removal::Kept(current));
                }
                locked.remove()?;
                Ok(Removal::Removed(current))
            })?;
        if matches!(removal, Removal::Removed(_)) {
            crate::key_cache::wait_for_lookups();
        }
        Ok(removal)
    }

    /// Remove `provider`/`profile` only if its tokens are still `expected`'s (see
    /// [`StoredCredential::same_tokens`]); else keep it and return what it holds now.
    pub fn remove_if_unchanged(
        &self,
        provider: &str,
        profile: &str,
        expected: &StoredCredential,
    ) -> Result<Removal, VaultError> {
        self.remove_if(provider, profile, |current| current.same_tokens(expected))
    }
}

impl LockedCredential<'_> {
    /// The credential as it is now (re-read under the lock).
    pub fn read(&self) -> Result<Option<StoredCredential>, VaultError> {
        read_full(self.vault, self.tx, self.provider, self.profile)
    }

    /// Store new tokens. A new refresh token is written in the same statement as the access
    /// token, so a rotated refresh token is never lost once the new access token exists. The
    /// row is read (and checked) first: the secrets kept are sealed again with the new row.
    pub fn store_tokens(&self, tokens: &TokenUpdate<'_>) -> Result<(), VaultError> {
        check_secret(tokens.access)?;
        if let Some(r) = tokens.refresh {
            check_secret(r)?;
        }
        let Some(current) = self.read()? else {
            return Ok(());
        };
        let now = crate::audit::now_rfc3339();
        self.vault.write_row(
            self.tx,
            self.provider,
            self.profile,
            &NewRow {
                kind: CredentialKind::OAuth2,
                secret: tokens.access,
                refresh: tokens
                    .refresh
                    .or(current.refresh.as_ref().map(Secret::expose)),
                client_secret: current.client_secret.as_ref().map(Secret::expose),
                expires_at: tokens.expires_at.as_deref(),
                metadata: tokens.metadata,
                created_at: &current.created_at,
                updated_at: &now,
            },
        )
    }

    /// Replace the metadata only (e.g. to mark a login expired); the row is re-sealed with it.
    pub fn set_metadata(&self, metadata: &str) -> Result<(), VaultError> {
        let Some(current) = self.read()? else {
            return Ok(());
        };
        self.vault.write_row(
            self.tx,
            self.provider,
            self.profile,
            &NewRow {
                kind: current.kind,
                secret: current.secret.expose(),
                refresh: current.refresh.as_ref().map(Secret::expose),
                client_secret: current.client_secret.as_ref().map(Secret::expose),
                expires_at: current.expires_at.as_deref(),
                metadata,
                created_at: &current.created_at,
                updated_at: &current.updated_at,
            },
        )
    }

    /// Delete the row (for [`Vault::remove_if`]).
    fn remove(&self) -> Result<(), VaultError> {
        self.tx.execute(
            "DELETE FROM credentials WHERE provider = ?1 AND profile = ?2",
            params![self.provider, self.profile],
        )?;
        Ok(())
    }
}

fn read_full(
    vault: &Vault,
    conn: &rusqlite::Connection,
    provider: &str,
    profile: &str,
) -> Result<Option<StoredCredential>, VaultError> {
    row::read_row(conn, provider, profile)?
        .map(|r| vault.open_row(&r))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault() -> (tempfile::TempDir, Vault) {
        let (dir, _, vault) = crate::vault::test_vault();
        (dir, vault)
    }

    #[test]
    fn oauth_round_trip_and_rotation_under_the_lock() {
        let (_dir, vault) = vault();
        let tokens = TokenUpdate {
            access: "at-1",
            refresh: Some("rt-1"),
            expires_at: Some("2000-01-01T00:00:00Z".into()),
            metadata: r#"{"token_url":"https://idp.example/token"}"#,
        };
        vault
            .put_oauth("acme", "default", &tokens, Some("client-secret"))
            .expect("put");
        let got = vault
            .get_full("acme", "default")
            .expect("get")
            .expect("row");
        assert_eq!(got.kind, CredentialKind::OAuth2);
        assert_eq!(got.secret.expose(), "at-1");
        assert_eq!(got.refresh.as_ref().map(Secret::expose), Some("rt-1"));
        assert_eq!(
            got.client_secret.as_ref().map(Secret::expose),
            Some("client-secret")
        );
        // `get` (what the proxy used before OAuth) sees the access token.
        assert_eq!(
            vault
                .get("acme", "default")
                .expect("get")
                .expect("some")
                .expose(),
            "at-1"
        );

        vault
            .with_credential_lock::<_, VaultError>("acme", "default", |c| {
                assert_eq!(c.read()?.expect("row").secret.expose(), "at-1");
                c.store_tokens(&TokenUpdate {
                    access: "at-2",
                    refresh: Some("rt-2"),
                    expires_at: None,
                    metadata: "{}",
                })
            })
            .expect("locked");
        let got = vault
            .get_full("acme", "default")
            .expect("get")
            .expect("row");
        assert_eq!(got.secret.expose(), "at-2");
        assert_eq!(got.refresh.as_ref().map(Secret::expose), Some("rt-2"));
        assert_eq!(
            got.client_secret.as_ref().map(Secret::expose),
            Some("client-secret")
        );

        // A refresh that does not rotate keeps the refresh token; an error still commits
        // what was written.
        let r: Result<(), VaultError> = vault.with_credential_lock("acme", "default", |c| {
            c.store_tokens(&TokenUpdate {
                access: "at-3",
                refresh: None,
                expires_at: None,
                metadata: r#"{"login_expired":true}"#,
            })?;
            Err(VaultError::Crypto)
        });
        assert!(r.is_err());
        let got = vault
            .get_full("acme", "default")
            .expect("get")
            .expect("row");
        assert_eq!(got.secret.expose(), "at-3");
        assert_eq!(got.refresh.as_ref().map(Secret::expose), Some("rt-2"));
        assert!(got.metadata.contains("login_expired"));
        assert!(vault.verify().expect("verify").is_ok());
    }

    fn login(vault: &Vault, access: &str, refresh: Option<&str>) {
        vault
            .put_oauth(
                "acme",
                "default",
                &TokenUpdate {
                    access,
                    refresh,
                    expires_at: None,
                    metadata: "{}",
                },
                None,
            )
            .expect("put");
    }

    fn rotate(vault: &Vault, access: &str, refresh: Option<&str>) {
        vault
            .with_credential_lock::<_, VaultError>("acme", "default", |c| {
                c.store_tokens(&TokenUpdate {
                    access,
                    refresh,
                    expires_at: None,
                    metadata: "{}",
                })
            })
            .expect("rotate");
    }

    fn stored(vault: &Vault) -> StoredCredential {
        vault
            .get_full("acme", "default")
            .expect("get")
            .expect("row")
    }

    #[test]
    fn remove_if_unchanged_removes_only_the_tokens_it_was_given() {
        let (_dir, vault) = vault();
        login(&vault, "at-1", Some("rt-1"));
        let read = stored(&vault);

        // Unchanged: removed, and what it held comes back.
        match vault
            .remove_if_unchanged("acme", "default", &read)
            .expect("remove")
        {
            Removal::Removed(held) => assert!(held.same_tokens(&read)),
            other => panic!("not removed: {other:?}"),
        }
        assert!(vault.get_full("acme", "default").expect("get").is_none());
        assert!(matches!(
            vault.remove_if_unchanged("acme", "default", &read),
            Ok(Removal::Missing)
        ));

        // A refresh rotated both tokens after the read: kept, and the new tokens reported.
        login(&vault, "at-1", Some("rt-1"));
        let read = stored(&vault);
        rotate(&vault, "at-2", Some("rt-2"));
        match vault
            .remove_if_unchanged("acme", "default", &read)
            .expect("remove")
        {
            Removal::Kept(now) => {
                assert_eq!(now.secret.expose(), "at-2");
                assert_eq!(now.refresh.as_ref().map(Secret::expose), Some("rt-2"));
            }
            other => panic!("removed a row whose tokens changed: {other:?}"),
        }
        assert_eq!(stored(&vault).secret.expose(), "at-2");

        // Only the access token changed (a refresh that does not rotate the refresh token):
        // still changed.
        let read = stored(&vault);
        rotate(&vault, "at-3", None);
        assert!(matches!(
            vault.remove_if_unchanged("acme", "default", &read),
            Ok(Removal::Kept(_))
        ));
        // Only the metadata changed (a refused refresh marks the login expired): the tokens
        // are the ones read, so it is removed.
        let read = stored(&vault);
        vault
            .with_credential_lock::<_, VaultError>("acme", "default", |c| {
                c.set_metadata(r#"{"login_expired":true}"#)
            })
            .expect("mark");
        assert!(matches!(
            vault.remove_if_unchanged("acme", "default", &read),
            Ok(Removal::Removed(_))
        ));

        // A refresh token that appeared or went away is a change; so is the kind.
        login(&vault, "at-1", None);
        let without = stored(&vault);
        login(&vault, "at-1", Some("rt-1"));
        assert!(!stored(&vault).same_tokens(&without));
        assert!(matches!(
            vault.remove_if_unchanged("acme", "default", &without),
            Ok(Removal::Kept(_))
        ));
        vault
            .put("acme", "default", "at-1", CredentialKind::ApiKey)
            .expect("put key");
        assert!(matches!(
            vault.remove_if_unchanged("acme", "default", &without),
            Ok(Removal::Kept(ref now)) if now.kind == CredentialKind::ApiKey
        ));
        assert!(vault.verify().expect("verify").is_ok());
    }
}
