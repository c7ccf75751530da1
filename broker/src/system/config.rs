//! `/etc/broker/config.toml`: who may use the system broker, who administers it, and what
//! each uid or group may use.
//!
//! ```toml
//! [access]
//! users = ["alice", "1003"]     # may use credentials (names or uids)
//! groups = ["agents"]           # every member may
//! admin_users = ["ops"]         # may also add, replace and remove keys (root always may)
//! admin_groups = []
//!
//! [[policy]]                    # first match wins; a uid no policy names gets all, "default"
//! users = ["alice"]
//! groups = []
//! providers = ["openai", "anthropic"]   # omitted: every provider
//! profile = "alice"                      # omitted: "default"
//!
//! [oauth.acme]                  # `broker login acme --system`: the client and endpoints
//! client_id = "..."             # (any key of a user's [oauth.<provider>]; the provider
//! token_url = "https://..."     # definition's [oauth] table gives the rest)
//! ```
//!
//! Read once at start (restart the broker after changing it or the group membership it
//! names). A file root does not own, or that group or others can write, is refused.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use serde::Deserialize;

use crate::oauth::settings::OAuthOverride;

use super::access::{AccessPolicy, UidPolicy};
use super::users::UserDb;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemConfig {
    #[serde(default)]
    pub access: AccessSection,
    #[serde(default)]
    pub policy: Vec<PolicySection>,
    /// `[oauth.<provider>]`: the OAuth client and endpoints of `broker login --system`
    /// (the same keys as in a user's `$BROKER_HOME/config.toml`, see `crate::oauth::settings`).
    #[serde(default)]
    pub oauth: HashMap<String, OAuthOverride>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub admin_users: Vec<String>,
    #[serde(default)]
    pub admin_groups: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub providers: Option<Vec<String>>,
    pub profile: Option<String>,
}

/// The config the installer writes: nobody but root may use the broker until an admin
/// names the users.
pub const DEFAULT_CONFIG: &str = r#"# The system broker's access list (see `broker serve --help` and the README,
# "System broker"). Restart the broker after editing this file.
[access]
# Who may use credentials through the broker (user names or uids; group names or gids).
users = []
groups = []
# Who may also add, replace and remove keys (`broker add --system`). Root always may.
admin_users = []
admin_groups = []

# Per-uid or per-group policy; the first one naming a uid applies to it. A uid no policy
# names may use every provider, with the "default" profile.
# [[policy]]
# users = ["alice"]
# providers = ["openai"]
# profile = "alice"

# The OAuth client of `broker login <provider> --system` (an admin runs it), when the provider
# definition names none or another one is wanted; endpoints can be overridden too.
# [oauth.github]
# client_id = "Iv1.0123456789abcdef"
"#;

/// Why the config cannot be used; the message names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Untrusted(#[from] super::ownership::Untrusted),
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl SystemConfig {
    /// Read `path`, refusing a file that root does not own or others can write.
    pub fn load(path: &Path) -> Result<SystemConfig, ConfigError> {
        super::ownership::root_owned(path)?;
        if let Some(dir) = path.parent() {
            super::ownership::root_owned(dir)?;
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        SystemConfig::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<SystemConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Names resolved to uids, checked against the provider catalog.
    pub fn resolve(
        &self,
        db: &UserDb,
        known_provider: &dyn Fn(&str) -> bool,
    ) -> Result<AccessPolicy, String> {
        let users = uids(db, &self.access.users, &self.access.groups)?;
        let mut admins = uids(db, &self.access.admin_users, &self.access.admin_groups)?;
        admins.insert(0);
        let mut policies = Vec::new();
        for (i, p) in self.policy.iter().enumerate() {
            if p.users.is_empty() && p.groups.is_empty() {
                return Err(format!("[[policy]] number {}: name users or groups", i + 1));
            }
            if let Some(unknown) = p.providers.iter().flatten().find(|n| !known_provider(n)) {
                return Err(format!(
                    "[[policy]] number {}: unknown provider '{unknown}' (see `broker providers`)",
                    i + 1
                ));
            }
            let profile = p.profile.clone().unwrap_or_else(|| "default".into());
            crate::vault::check_name("profile", &profile).map_err(|e| e.to_string())?;
            policies.push((
                uids(db, &p.users, &p.groups)?,
                UidPolicy {
                    providers: p.providers.clone(),
                    profile,
                },
            ));
        }
        for (name, over) in &self.oauth {
            if !known_provider(name) {
                return Err(format!(
                    "[oauth.{name}]: unknown provider '{name}' (see `broker providers`; custom ones go in /etc/broker/providers)"
                ));
            }
            over.check_endpoints()
                .map_err(|e| format!("[oauth.{name}]: {e}"))?;
        }
        Ok(AccessPolicy::new(users, admins, policies))
    }
}

fn uids(db: &UserDb, users: &[String], groups: &[String]) -> Result<BTreeSet<u32>, String> {
    let mut out = BTreeSet::new();
    for name in users {
        out.insert(db.uid(name).ok_or_else(|| {
            format!("no user '{name}' in /etc/passwd: create it, or give its uid")
        })?);
    }
    for name in groups {
        let gid = db.gid(name).ok_or_else(|| {
            format!("no group '{name}' in /etc/group: create it, or give its gid")
        })?;
        out.extend(db.members(gid));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> UserDb {
        UserDb::parse(
            "alice:x:1001:1001::/:/bin/sh\nbob:x:1002:500::/:/bin/sh\nops:x:1003:1003::/:/bin/sh\n",
            "agents:x:500:\n",
        )
    }

    #[test]
    fn the_default_config_parses_and_admits_only_root() {
        let cfg = SystemConfig::parse(DEFAULT_CONFIG).expect("parses");
        let access = cfg.resolve(&db(), &|_| true).expect("resolves");
        assert!(access.role(0).is_some());
        assert!(access.role(1001).is_none());
    }

    #[test]
    fn users_groups_admins_and_policies() {
        let cfg = SystemConfig::parse(
            "[access]\nusers = [\"alice\"]\ngroups = [\"agents\"]\nadmin_users = [\"ops\"]\n\
             [[policy]]\ngroups = [\"agents\"]\nproviders = [\"openai\"]\nprofile = \"team\"\n",
        )
        .expect("parses");
        let access = cfg.resolve(&db(), &|p| p == "openai").expect("resolves");
        use super::super::access::Role;
        assert_eq!(access.role(1001), Some(Role::User));
        assert_eq!(access.role(1002), Some(Role::User));
        assert_eq!(access.role(1003), Some(Role::Admin));
        assert_eq!(access.role(1004), None);
        let bob = access.policy_for(1002);
        assert_eq!(bob.profile, "team");
        assert!(bob.allows("openai") && !bob.allows("github"));
        let alice = access.policy_for(1001);
        assert!(alice.allows("github") && alice.profile == "default");
    }

    #[test]
    fn mistakes_are_named() {
        assert!(SystemConfig::parse("[access]\nuser = [\"x\"]\n")
            .expect_err("refused")
            .contains("unknown field"));
        let cfg =
            SystemConfig::parse("[access]\nusers = [\"nobody-like-this\"]\n").expect("parses");
        assert!(cfg
            .resolve(&db(), &|_| true)
            .expect_err("refused")
            .contains("no user 'nobody-like-this'"));
        let cfg = SystemConfig::parse("[[policy]]\nusers = [\"alice\"]\nproviders = [\"nope\"]\n")
            .expect("parses");
        assert!(cfg
            .resolve(&db(), &|_| false)
            .expect_err("refused")
            .contains("unknown provider 'nope'"));
    }

    #[test]
    fn oauth_tables_name_known_providers_and_safe_endpoints() {
        let cfg = SystemConfig::parse(
            "[oauth.github]\nclient_id = \"Iv1.root\"\ntoken_url = \"https://ghe.example/token\"\n",
        )
        .expect("parses");
        cfg.resolve(&db(), &|p| p == "github").expect("resolves");
        assert_eq!(cfg.oauth["github"].client_id.as_deref(), Some("Iv1.root"));
        assert!(cfg
            .resolve(&db(), &|_| false)
            .expect_err("refused")
            .contains("[oauth.github]: unknown provider"));
        let plain =
            SystemConfig::parse("[oauth.github]\ntoken_url = \"http://ghe.example/token\"\n")
                .expect("parses");
        assert!(plain
            .resolve(&db(), &|_| true)
            .expect_err("refused")
            .contains("https"));
        assert!(SystemConfig::parse("[oauth.github]\nclient_secret = \"x\"\n").is_err());
    }
}
