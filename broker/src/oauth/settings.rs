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

use serde::{Deserialize, Serialize};

use super::OAuthError;
use crate::home::Home;
use crate::providers::{ClientAuth, Grant, Provider};

/// `$BROKER_HOME/config.toml`, the parts OAuth reads. Other sections are ignored here. The
/// system broker builds one from the `[oauth.<provider>]` tables of root's
/// `/etc/broker/config.toml` instead ([`UserConfig::system`]).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct UserConfig {
    #[serde(default)]
    pub oauth: HashMap<String, OAuthOverride>,
    /// The system broker's (errors then name its config file and no `--client-id`).
    #[serde(skip)]
    system: bool,
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

impl OAuthOverride {
    /// Every endpoint given is https, or plain http to this machine.
    pub fn check_endpoints(&self) -> Result<(), OAuthError> {
        check_urls([
            self.token_url.as_ref(),
            self.authorize_url.as_ref(),
            self.device_url.as_ref(),
            self.revoke_url.as_ref(),
        ])
    }
}

/// Every URL given is https, or plain http to this machine.
fn check_urls<'a>(urls: impl IntoIterator<Item = Option<&'a String>>) -> Result<(), OAuthError> {
    for url in urls.into_iter().flatten() {
        super::client::endpoint_uri(url)?;
    }
    Ok(())
}

impl UserConfig {
    /// Read `config.toml`; a missing file is an empty config, a malformed one an error naming
    /// the file.
    pub fn load(home: &Home) -> Result<UserConfig, OAuthError> {
        home.read_config().map_err(OAuthError::Config)
    }

    /// The system broker's OAuth tables (from `/etc/broker/config.toml`).
    pub fn system(oauth: HashMap<String, OAuthOverride>) -> UserConfig {
        UserConfig {
            oauth,
            system: true,
        }
    }

    /// Where an admin or user sets a provider's OAuth client and endpoints.
    fn file_name(&self) -> &'static str {
        if self.system {
            "/etc/broker/config.toml (then restart the system broker)"
        } else {
            "$BROKER_HOME/config.toml"
        }
    }
}

/// Everything a login needs, resolved. Holds nothing secret (a confidential client's secret
/// is never part of the settings): the system broker sends these to its admins' CLIs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The provider's `private_addresses = true`: its OAuth endpoints may resolve to internal
    /// addresses too (the SSRF guard, `proxy::upstream`).
    #[serde(default)]
    pub private_addresses: bool,
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
                     'broker add {p}{system}', or give its endpoints in [oauth.{p}] of {file}",
                    p = provider.name,
                    system = if config.system { " --system" } else { "" },
                    file = config.file_name(),
                )))
            }
        };
        OAuthSettings::from_parts(provider, &def, over, client_id, scopes, config)
    }

    fn from_parts(
        provider: &Provider,
        def: &crate::providers::OAuthConfig,
        over: OAuthOverride,
        client_id: Option<&str>,
        scopes: Option<&[String]>,
        config: &UserConfig,
    ) -> Result<OAuthSettings, OAuthError> {
        let pick = |o: Option<String>, d: &Option<String>| o.or_else(|| d.clone());
        let token_url = pick(over.token_url, &def.token_url).ok_or_else(|| {
            OAuthError::Config(format!("provider {} has no OAuth token_url", provider.name))
        })?;
        let client_id =
            client_id
                .map(str::to_string)
                .or(over.client_id)
                .or_else(|| def.client_id.clone())
                .ok_or_else(|| {
                    OAuthError::Config(format!(
                    "no OAuth client id for {p}: register an OAuth app with the provider, then \
                     {pass}put it in {file}:\n  [oauth.{p}]\n  client_id = \"...\"",
                    p = provider.name,
                    pass = if config.system { "" } else { "pass --client-id ID or " },
                    file = config.file_name(),
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
            private_addresses: provider.private_addresses,
        };
        settings.check_endpoints()?;
        Ok(settings)
    }

    /// Every endpoint is https, or plain http to this machine.
    pub fn check_endpoints(&self) -> Result<(), OAuthError> {
        check_urls([
            Some(&self.token_url),
            self.authorize_url.as_ref(),
            self.device_url.as_ref(),
            self.revoke_url.as_ref(),
        ])
    }

    /// The grant a login runs: client credentials for a service account, else the device
    /// flow when asked (`device`) or when there is no authorize endpoint, else the
    /// authorization code. An error says what to run instead: `command` is the login as the
    /// user typed it (`broker login P`, or with `--system`).
    pub fn choose_grant(
        &self,
        device: bool,
        command: &str,
    ) -> Result<super::GrantUsed, OAuthError> {
        use super::GrantUsed;
        if self.grant == Grant::ClientCredentials {
            return Ok(GrantUsed::ClientCredentials);
        }
        if device || (self.authorize_url.is_none() && self.device_url.is_some()) {
            if self.device_url.is_none() {
                return Err(OAuthError::Config(format!(
                    "{} does not support the device flow: run `{command}` without --device",
                    self.display_name
                )));
            }
            return Ok(GrantUsed::DeviceCode);
        }
        Ok(GrantUsed::AuthorizationCode)
    }

    /// Could a login with these settings have used `grant`?
    pub fn supports(&self, grant: super::GrantUsed) -> bool {
        use super::GrantUsed;
        match grant {
            GrantUsed::ClientCredentials => self.grant == Grant::ClientCredentials,
            _ if self.grant == Grant::ClientCredentials => false,
            GrantUsed::DeviceCode => self.device_url.is_some(),
            GrantUsed::AuthorizationCode => self.authorize_url.is_some(),
        }
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

    #[test]
    fn the_system_config_is_named_and_grants_follow_the_endpoints() {
        let p = Provider::from_toml(ACME, "acme.toml").expect("provider");
        let system = UserConfig::system(HashMap::new());
        let err = OAuthSettings::resolve(&p, &system, None, None).expect_err("no client id");
        let text = err.to_string();
        assert!(
            text.contains("/etc/broker/config.toml") && !text.contains("--client-id"),
            "{text}"
        );
        let mut oauth = HashMap::new();
        oauth.insert(
            "acme".to_string(),
            OAuthOverride {
                client_id: Some("root-app".into()),
                ..OAuthOverride::default()
            },
        );
        let s =
            OAuthSettings::resolve(&p, &UserConfig::system(oauth), None, None).expect("settings");
        assert_eq!(s.client_id, "root-app");
        use crate::oauth::GrantUsed;
        // No device endpoint: the browser flow, and --device is refused with what to run.
        assert_eq!(
            s.choose_grant(false, "broker login acme").expect("grant"),
            GrantUsed::AuthorizationCode
        );
        assert!(s
            .choose_grant(true, "broker login acme")
            .expect_err("no device flow")
            .to_string()
            .contains("without --device"));
        assert!(s.supports(GrantUsed::AuthorizationCode));
        assert!(!s.supports(GrantUsed::DeviceCode) && !s.supports(GrantUsed::ClientCredentials));
        let device = OAuthSettings {
            authorize_url: None,
            device_url: Some("https://idp.acme.example/device".into()),
            ..s.clone()
        };
        assert_eq!(
            device
                .choose_grant(false, "broker login acme")
                .expect("grant"),
            GrantUsed::DeviceCode
        );
        assert!(!device.supports(GrantUsed::AuthorizationCode));
        let service = OAuthSettings {
            grant: Grant::ClientCredentials,
            ..s
        };
        assert_eq!(
            service
                .choose_grant(true, "broker login acme")
                .expect("grant"),
            GrantUsed::ClientCredentials
        );
        assert!(service.supports(GrantUsed::ClientCredentials));
        assert!(!service.supports(GrantUsed::AuthorizationCode));
    }
}
