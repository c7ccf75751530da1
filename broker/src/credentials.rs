//! Where the proxy's credentials come from: the vault of `BROKER_HOME`, with OAuth access
//! tokens refreshed before they expire (single flight across processes, see
//! `crate::oauth::refresh`) and keys produced by a command (`crate::credential_command`).

use std::sync::{Arc, Mutex};

use zeroize::Zeroizing;

use crate::credential_command::{self, CommandCache};
use crate::home::Home;
use crate::oauth::refresh::FreshError;
use crate::proxy::{Credentials, LookupError, UpstreamSettings};
use crate::vault::{CredentialKind, KeyConfig, Vault};

/// Credentials from the vault in `BROKER_HOME`, opened on first use and kept open.
pub struct VaultCredentials {
    home: Home,
    keys: KeyConfig,
    vault: Mutex<Option<Arc<Vault>>>,
    /// How OAuth token endpoints are reached for refreshes (the test-only overrides apply).
    token_endpoints: UpstreamSettings,
    commands: CommandCache,
}

impl VaultCredentials {
    pub fn new(home: Home, keys: KeyConfig) -> VaultCredentials {
        VaultCredentials {
            home,
            keys,
            vault: Mutex::new(None),
            token_endpoints: UpstreamSettings::default(),
            commands: CommandCache::default(),
        }
    }

    /// Reach OAuth token endpoints (refreshes) with these settings.
    pub fn with_token_endpoints(mut self, upstream: UpstreamSettings) -> VaultCredentials {
        self.token_endpoints = upstream;
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
    fn lookup(
        &self,
        provider: &str,
        profile: &str,
    ) -> Result<Option<Zeroizing<String>>, LookupError> {
        let Some(vault) = self.vault()? else {
            return Ok(None);
        };
        let Some(stored) = vault
            .get_full(provider, profile)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        match stored.kind {
            CredentialKind::ApiKey => {
                return Ok(Some(Zeroizing::new(stored.secret.expose().to_string())))
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
        if let Some(stored) = vault
            .get_full(provider, profile)
            .map_err(|e| e.to_string())?
        {
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
    }
}
