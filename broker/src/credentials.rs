//! Where the proxy's credentials come from: the vault of `BROKER_HOME`, with OAuth access
//! tokens refreshed before they expire (single flight across processes, see
//! `crate::oauth::refresh`) and keys produced by a command (`crate::credential_command`).

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use crate::credential_command::{self, CommandCache};
use crate::home::Home;
use crate::key_cache::KeyCache;
use crate::oauth::refresh::FreshError;
use crate::oauth::refresh::TokenEndpoints;
use crate::proxy::{Credentials, LookupError};
use crate::vault::{CredentialKind, KeyConfig, Vault, VaultError};

/// Credentials from the vault in `BROKER_HOME`, opened on first use and kept open.
pub struct VaultCredentials {
    home: Home,
    keys: KeyConfig,
    vault: Mutex<Option<Arc<Vault>>>,
    /// How OAuth token endpoints are reached for refreshes (the test-only overrides apply,
    /// and the SSRF guard).
    token_endpoints: TokenEndpoints,
    commands: CommandCache,
    /// API keys already read, valid while the vault files are unchanged.
    keys_seen: KeyCache,
    /// The accepted grants of each provider (`providers::trust`), as of a vault generation.
    accepted: Mutex<Accepted>,
}

/// Accepted grants by provider, read at one generation of the vault's files.
#[derive(Default)]
struct Accepted {
    generation: u64,
    by_provider: std::collections::HashMap<String, Arc<std::collections::HashSet<Arc<str>>>>,
}

impl VaultCredentials {
    pub fn new(home: Home, keys: KeyConfig) -> VaultCredentials {
        let keys_seen = KeyCache::new(home.vault_path());
        VaultCredentials {
            home,
            keys,
            vault: Mutex::new(None),
            token_endpoints: TokenEndpoints::default(),
            commands: CommandCache::default(),
            keys_seen,
            accepted: Mutex::new(Accepted::default()),
        }
    }

    /// Use `vault`, already open (the broker opens it at start to key its audit log).
    pub fn with_vault(self, vault: Arc<Vault>) -> VaultCredentials {
        *self.vault.lock().unwrap_or_else(|p| p.into_inner()) = Some(vault);
        self
    }

    /// Reach OAuth token endpoints (refreshes) with these settings.
    pub fn with_token_endpoints(mut self, endpoints: TokenEndpoints) -> VaultCredentials {
        self.token_endpoints = endpoints;
        self
    }

    fn vault(&self) -> Result<Option<Arc<Vault>>, String> {
        let mut slot = self.vault.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(vault) = slot.as_ref() {
            return Ok(Some(vault.clone()));
        }
        if !Vault::exists(&self.home) {
            return Ok(None);
        }
        let vault = Arc::new(Vault::open_with(&self.home, &self.keys).map_err(|e| e.to_string())?);
        *slot = Some(vault.clone());
        Ok(Some(vault))
    }
}

impl Credentials for VaultCredentials {
    fn prove(&self, challenge: &[u8]) -> Option<Vec<u8>> {
        self.vault().ok().flatten()?.prove(challenge).ok()
    }

    fn accepted_now(&self, provider: &str, grant: &str) -> Option<bool> {
        let generation = self.keys_seen.last_generation();
        let accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.generation != generation {
            return None;
        }
        // Only an acceptance is answered from here: the generation may lag one look at the
        // vault's files behind, which the key lookup right after this makes (so a stale
        // acceptance lasts one request at most), while a refusal makes no lookup and would
        // stay stale. A refusal is checked again on the blocking path.
        accepted
            .by_provider
            .get(provider)
            .is_some_and(|set| set.contains(grant))
            .then_some(true)
    }

    /// The grants recorded in the vault for `provider`; where none were (or there is no vault,
    /// or it cannot be opened here), those of the built-in definition of that name.
    fn accepts(&self, provider: &str, grant: &str) -> Result<bool, LookupError> {
        let generation = self.keys_seen.generation();
        let recorded = match self.vault() {
            Ok(Some(vault)) => vault.trusted_grants(provider).map_err(vault_error)?,
            Ok(None) | Err(_) => None,
        };
        let grants = recorded
            .or_else(|| crate::providers::trust::builtin_grants(provider))
            .unwrap_or_default();
        let set: Arc<std::collections::HashSet<Arc<str>>> =
            Arc::new(grants.into_iter().map(Arc::from).collect());
        let found = set.contains(grant);
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if accepted.generation != generation {
            accepted.generation = generation;
            accepted.by_provider.clear();
        }
        accepted.by_provider.insert(provider.to_string(), set);
        Ok(found)
    }

    fn cached(&self, provider: &str, profile: &str) -> Option<Zeroizing<String>> {
        self.keys_seen.get(provider, profile)
    }

    fn cacheable(&self, provider: &str, profile: &str) -> bool {
        self.keys_seen.was_kept(provider, profile)
    }

    /// Every row, whether or not it passes its integrity check: a row edited outside broker
    /// still gets its placeholder, so the agent's request reaches the broker and gets the
    /// integrity error that tells the user what happened (the row itself is never used).
    /// Read without decrypting anything ([`Vault::stored_names`]), since `broker serve` asks
    /// every 2 s. No vault yet: nothing is stored. A vault that cannot be read here: unknown.
    fn stored(&self) -> Option<Vec<(String, String)>> {
        match self.vault() {
            Ok(Some(vault)) => vault.stored_names().ok(),
            Ok(None) => Some(Vec::new()),
            Err(_) => None,
        }
    }

    /// Only API keys are cached: a current cache entry means there is nothing to renew. Right
    /// after a lookup that is the answer for every API key; anything else may renew (OAuth
    /// tokens refresh, commands run again).
    fn may_renew(&self, provider: &str, profile: &str) -> bool {
        self.keys_seen.get(provider, profile).is_none()
    }

    fn lookup(
        &self,
        provider: &str,
        profile: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError> {
        let Some(vault) = self.vault()? else {
            return Ok(None);
        };
        // Taken before the read: a write racing with it changes the generation, so a key read
        // across it is not kept.
        let generation = self.keys_seen.generation();
        let Some(stored) = vault.get_full(provider, profile).map_err(vault_error)? else {
            return Ok(None);
        };
        match stored.kind {
            CredentialKind::ApiKey => {
                let secret = Zeroizing::new(stored.secret.expose().to_string());
                self.keys_seen
                    .remember(generation, provider, profile, &secret);
                return Ok(Some(secret));
            }
            CredentialKind::Command => {
                let ttl = credential_command::ttl_from(&stored.metadata);
                return self
                    .commands
                    .get_or_run(provider, profile, stored.secret.expose(), ttl)
                    .map(Some)
                    .map_err(LookupError::Source);
            }
            CredentialKind::OAuth2 => {}
        }
        // OAuth access tokens are refreshed (single flight across processes) when they are
        // about to expire.
        crate::oauth::refresh::current_secret(
            &vault,
            &self.home,
            &self.token_endpoints,
            provider,
            profile,
        )
        .map_err(fresh_error)
    }

    fn refresh_rejected(
        &self,
        provider: &str,
        profile: &str,
        rejected: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError> {
        let Some(vault) = self.vault()? else {
            return Ok(None);
        };
        // A command's cached output was rejected: run the command again.
        if let Some(stored) = vault.get_full(provider, profile).map_err(vault_error)? {
            if stored.kind == CredentialKind::Command {
                self.commands.forget(provider, profile);
                return self.lookup(provider, profile);
            }
        }
        crate::oauth::refresh::refresh_after_rejection(
            &vault,
            &self.home,
            &self.token_endpoints,
            provider,
            profile,
            rejected,
        )
        .map_err(fresh_error)
    }
}

fn fresh_error(e: FreshError) -> LookupError {
    match e {
        FreshError::LoginExpired => LookupError::LoginExpired,
        FreshError::Unavailable(message) => LookupError::Unavailable(message),
        FreshError::Integrity(message) => LookupError::Integrity(message),
    }
}

/// A vault error as the proxy reports it: a row that failed its integrity check apart.
fn vault_error(e: VaultError) -> LookupError {
    match e {
        VaultError::Integrity { .. } | VaultError::TrustIntegrity { .. } => {
            LookupError::Integrity(e.to_string())
        }
        e => LookupError::Unavailable(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_key_is_dropped_as_soon_as_the_vault_changes() {
        let (_dir, home, vault) = crate::vault::test_vault();
        let keys = crate::vault::test_key_file();
        vault
            .put(
                "openai",
                "default",
                "sk-test-first-key-0123456789",
                CredentialKind::ApiKey,
            )
            .expect("put");
        let creds = VaultCredentials::new(home.clone(), keys);
        assert!(
            creds.cached("openai", "default").is_none(),
            "nothing read yet"
        );
        let first = creds
            .lookup("openai", "default")
            .expect("lookup")
            .expect("stored");
        assert_eq!(first.as_str(), "sk-test-first-key-0123456789");
        assert!(
            !creds.may_renew("openai", "default"),
            "a plain API key has nothing to renew"
        );
        assert_eq!(
            creds
                .cached("openai", "default")
                .as_deref()
                .map(String::as_str),
            Some(first.as_str())
        );
        // Another writer (here: another connection) replaces the key.
        vault
            .put(
                "openai",
                "default",
                "sk-test-second-key-0123456789",
                CredentialKind::ApiKey,
            )
            .expect("put");
        assert!(
            creds.cached("openai", "default").is_none(),
            "a write invalidates the cache"
        );
        let second = creds
            .lookup("openai", "default")
            .expect("lookup")
            .expect("stored");
        assert_eq!(second.as_str(), "sk-test-second-key-0123456789");
        vault.remove("openai", "default").expect("remove");
        assert!(creds.cached("openai", "default").is_none());
        assert!(
            creds.lookup("openai", "default").expect("lookup").is_none(),
            "a removed key is gone at once"
        );
    }
}
