//! A provider's OAuth settings, resolved from, in order of precedence: `broker login` flags,
//! the user's `$BROKER_HOME/config.toml`, and the provider definition's `[oauth]` table.
//!
//! ```toml
//! # $BROKER_HOME/config.toml
//! [oauth.github]
//! client_id = "Iv1.0123456789abcdef"
//! # any endpoint may be overridden too (an enterprise server, a local test server):
//! # token_url = "https://github.example.com/login/oauth/access_token"
//! ```
//!
//! A provider can also be given whole, with its `[oauth]` table, as a custom provider file in
//! `$BROKER_HOME/providers/`. Endpoints must be https, or plain http to this machine only.

use std::collections::HashMap;

use serde::Deserialize;

use super::OAuthError;
use crate::home::Home;
use crate::providers::{ClientAuth, Grant, Provider};

/// `$BROKER_HOME/config.toml`, the parts OAuth reads. Other sections are ignored here.
#[derive(Debug, Default, Deserialize)]
pub struct UserConfig {
    #[serde(default)]
    pub oauth: HashMap<String, OAuthOverride>,
}

/// `[oauth.<provider>]` in `config.toml`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthOverride {
    pub client_id: Option<String>,
    pub client_auth: Option<ClientAuth>,
    pub authorize_url: Option<String>,
    pub token_url: Option<String>,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub scopes: Option<Vec<String>>,
}

impl UserConfig {
    /// Read `config.toml`; a missing file is an empty config, a malformed one an error naming
    /// the file.
    pub fn load(home: &Home) -> Result<UserConfig, OAuthError> {
        let path = home.config_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text)
                .map_err(|e| OAuthError::Config(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(UserConfig::default()),
            Err(e) => Err(OAuthError::Config(format!("{}: {e}", path.display()))),
        }
    }
}

/// Everything a login needs, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    pub provider: String,
    pub display_name: String,
    pub authorize_url: Option<String>,
    pub token_url: String,
    pub device_url: Option<String>,
    pub revoke_url: Option<String>,
    pub scopes: Vec<String>,
    pub client_id: String,
    pub client_auth: ClientAuth,
    pub device_flow: bool,
    pub grant: Grant,
}

impl OAuthSettings {
    /// Resolve the settings of `provider`. `client_id` and `scopes` are the flags.
    pub fn resolve(
        provider: &Provider,
        config: &UserConfig,
        client_id: Option<&str>,
        scopes: Option<&[String]>,
    ) -> Result<OAuthSettings, OAuthError> {
        let over = config
            .oauth
            .get(&provider.name)
            .cloned()
            .unwrap_or_default();
        let def = match provider.oauth.clone() {
            Some(def) => def,
            None if over.token_url.is_some() => crate::providers::OAuthConfig {
                authorize_url: None,
                token_url: None,
                device_url: None,
                revoke_url: None,
                scopes: Vec::new(),
                client_id: None,
                client_auth: ClientAuth::None,
                device_flow: over.device_url.is_some(),
                grant: Grant::AuthorizationCode,
            },
            None => {
                return Err(OAuthError::Config(format!(
                    "provider {p} has no OAuth login (no [oauth] table): store a key with \
                     'broker add {p}', or give its endpoints in [oauth.{p}] of config.toml",
                    p = provider.name
                )))
            }
        };
        OAuthSettings::from_parts(provider, &def, over, client_id, scopes)
    }

    fn from_parts(
        provider: &Provider,
        def: &crate::providers::OAuthConfig,
        over: OAuthOverride,
        client_id: Option<&str>,
        scopes: Option<&[String]>,
    ) -> Result<OAuthSettings, OAuthError> {
        let pick = |o: Option<String>, d: &Option<String>| o.or_else(|| d.clone());
        let token_url = pick(over.token_url, &def.token_url).ok_or_else(|| {
            OAuthError::Config(format!("provider {} has no OAuth token_url", provider.name))
        })?;
        let client_id = client_id
            .map(str::to_string)
            .or(over.client_id)
            .or_else(|| def.client_id.clone())
            .ok_or_else(|| {
                OAuthError::Config(format!(
                    "no OAuth client id for {p}: register an OAuth app with the provider, then \
                     pass --client-id ID or put it in $BROKER_HOME/config.toml:\n  \
                     [oauth.{p}]\n  client_id = \"...\"",
                    p = provider.name
                ))
            })?;
        let settings = OAuthSettings {
            provider: provider.name.clone(),
            display_name: provider.display_name.clone(),
            authorize_url: pick(over.authorize_url, &def.authorize_url),
            device_url: pick(over.device_url, &def.device_url),
            revoke_url: pick(over.revoke_url, &def.revoke_url),
            token_url,
            scopes: scopes
                .map(<[String]>::to_vec)
                .or(over.scopes)
                .unwrap_or_else(|| def.scopes.clone()),
            client_id,
            client_auth: over.client_auth.unwrap_or(def.client_auth),
            device_flow: def.device_flow,
            grant: def.grant,
        };
        for url in [
            Some(&settings.token_url),
            settings.authorize_url.as_ref(),
            settings.device_url.as_ref(),
            settings.revoke_url.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            super::client::endpoint_uri(url)?;
        }
        Ok(settings)
    }

    /// Does this login need a client secret?
    pub fn confidential(&self) -> bool {
        self.client_auth != ClientAuth::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACME: &str = r#"
name = "acme"
env = ["ACME_TOKEN"]
placeholder = "acme-broker-placeholder-0000"
key_pattern = '^acme-[A-Za-z0-9-]{8,}$'
auth = "oauth2"
[[routes]]
hosts = ["api.acme.example"]
credential = [{ header = "authorization", scheme = "bearer" }]
[oauth]
authorize_url = "https://idp.acme.example/authorize"
token_url = "https://idp.acme.example/token"
scopes = ["read"]
client_auth = "none"
"#;

    #[test]
    fn flag_beats_config_beats_definition() {
        let p = Provider::from_toml(ACME, "acme.toml").expect("provider");
        let err = OAuthSettings::resolve(&p, &UserConfig::default(), None, None)
            .expect_err("no client id");
        assert!(err.to_string().contains("[oauth.acme]"), "{err}");

        let config: UserConfig = toml::from_str(
            "[oauth.acme]\nclient_id = \"from-config\"\ntoken_url = \"http://127.0.0.1:9/token\"\n",
        )
        .expect("config");
        let s = OAuthSettings::resolve(&p, &config, None, None).expect("settings");
        assert_eq!(s.client_id, "from-config");
        assert_eq!(s.token_url, "http://127.0.0.1:9/token");
        assert_eq!(s.scopes, vec!["read".to_string()]);
        let s = OAuthSettings::resolve(&p, &config, Some("flag"), Some(&["x".into()]))
            .expect("settings");
        assert_eq!((s.client_id.as_str(), s.scopes.len()), ("flag", 1));

        let plain: UserConfig = toml::from_str(
            "[oauth.acme]\nclient_id = \"c\"\ntoken_url = \"http://idp.acme.example/token\"\n",
        )
        .expect("config");
        let err = OAuthSettings::resolve(&p, &plain, None, None).expect_err("plain http");
        assert!(err.to_string().contains("https"), "{err}");
        assert!(toml::from_str::<UserConfig>("[oauth.acme]\nclientid = 1\n").is_err());
    }
}
