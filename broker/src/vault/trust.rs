//! The provider definitions the user accepted: for each provider, the list of *grants* (a
//! host, port and path, with where the key goes on requests there) its credentials may be
//! used for. Sealed under the data key with the provider's name in the AAD, so a list edited,
//! or moved from one provider to another, outside broker fails to open; writing one needs
//! the master key. See `crate::provider_trust` for what a grant is and how it is checked.

use rusqlite::{params, OptionalExtension as _};

use super::{Vault, VaultError};

/// AAD of a provider's sealed grant list.
fn aad(provider: &str) -> Vec<u8> {
    let mut aad = b"broker provider trust v1\0".to_vec();
    aad.extend_from_slice(provider.as_bytes());
    aad
}

/// The label of the key that proves a daemon holds the vault (see [`Vault::prove`]).
const PROOF_KEY_LABEL: &str = "broker control proof v1";

impl Vault {
    /// Proof that this process holds the vault's data key, for `challenge`: an HMAC under a
    /// key derived for this use alone (any process of the user may ask the daemon for proofs,
    /// so the data key itself is never used for them). `broker run` asks `broker serve` for
    /// one before it hands it keys, so a program of the user's listening at the control
    /// socket's path gets nothing (see `control`).
    pub fn prove(&self, challenge: &[u8]) -> Result<Vec<u8>, VaultError> {
        let tag = ring::hmac::sign(&self.derived_key(PROOF_KEY_LABEL), challenge);
        Ok(tag.as_ref().to_vec())
    }

    /// Is `proof` a [`Vault::prove`] of `challenge` by this vault's data key?
    pub fn check_proof(&self, challenge: &[u8], proof: &[u8]) -> bool {
        ring::hmac::verify(&self.derived_key(PROOF_KEY_LABEL), challenge, proof).is_ok()
    }

    /// The grants accepted for `provider`, or `None` when none were ever recorded.
    pub fn trusted_grants(&self, provider: &str) -> Result<Option<Vec<String>>, VaultError> {
        let blob: Option<Vec<u8>> = self
            .lock()
            // Cached, as credential rows are (`row::read_row`): read again after every change
            // to the vault's files.
            .prepare_cached("SELECT grants FROM provider_trust WHERE provider = ?1")?
            .query_row(params![provider], |r| r.get(0))
            .optional()?;
        let Some(blob) = blob else {
            return Ok(None);
        };
        let integrity = || VaultError::TrustIntegrity {
            provider: provider.to_string(),
        };
        let json = self
            .data_key
            .open(&blob, &aad(provider))
            .map_err(|_| integrity())?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|_| integrity())
    }

    /// Record `grants` as what `provider`'s credentials may be used for (replacing any before).
    pub fn set_trusted_grants(&self, provider: &str, grants: &[String]) -> Result<(), VaultError> {
        super::check_name("provider", provider)?;
        let json = serde_json::to_vec(grants).map_err(|_| VaultError::Crypto)?;
        let blob = self
            .data_key
            .seal(&json, &aad(provider))
            .map_err(|_| VaultError::Crypto)?;
        self.lock().execute(
            "INSERT INTO provider_trust (provider, grants, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (provider) DO UPDATE SET grants = excluded.grants, updated_at = excluded.updated_at",
            params![provider, blob, crate::audit::now_rfc3339()],
        )?;
        // A running broker answers accepted grants from memory until it next looks.
        crate::key_cache::wait_for_lookups();
        Ok(())
    }
}
