//! Ending a login, for `broker logout` and the system broker's `broker logout --system`: revoke
//! its tokens at the provider, then remove its row, without losing tokens that a refresh
//! rotated in between.
//!
//! Revoking is network I/O, so it runs outside the vault's write lock (a refresh in a running
//! broker would otherwise wait behind a slow provider). A refresh can therefore rotate the
//! tokens between logout's read and its removal ([`super::refresh`] stores them under that
//! lock). Deleting the row then would drop the new refresh token unrevoked: still valid at the
//! provider, and no longer anywhere the user can revoke it from. So each round revokes the
//! tokens it read, then removes the row only if it still holds those tokens
//! ([`Vault::remove_if_unchanged`], under the lock a refresh takes); if a refresh changed them,
//! the next round revokes the new ones. After [`MAX_ROUNDS`] rounds of tokens that keep
//! changing, the row is removed under the lock whatever tokens it holds, and those are revoked
//! after the lock is released: a removed row cannot be rotated any more.
//!
//! Revoking before removing means a logout killed halfway leaves revoked tokens in the vault
//! (run it again), never removed tokens that were not revoked; only that last forced round
//! removes first.

use super::revoke::Revocation;
use crate::vault::{CredentialKind, Removal, StoredCredential, Vault, VaultError};

/// Rounds of revoke-then-remove-if-unchanged before the row is removed whatever it holds.
/// Each extra round needs a refresh during the one before; a refresh stores tokens fresh for a
/// while, so a second one in a row is rare and a third is a token endpoint answering with
/// tokens that are due at once.
pub const MAX_ROUNDS: usize = 3;

/// Why there was nothing to log out of.
#[derive(Debug, thiserror::Error)]
pub enum LogoutError {
    /// No row for the provider and profile.
    #[error("not logged in")]
    NotLoggedIn,
    /// The row holds an API key or a command, not OAuth tokens.
    #[error("holds an API key, not a login")]
    NotALogin,
    #[error(transparent)]
    Vault(#[from] VaultError),
}

/// How the row left the vault (or did not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Removed while it held the tokens just revoked.
    Removed,
    /// Removed by another command (a second logout, `broker remove`) during this one.
    RemovedElsewhere,
    /// The tokens kept changing: after [`MAX_ROUNDS`] the row was removed under the lock, then
    /// the tokens it held were revoked (the last round of [`LogoutReport::rounds`]).
    RemovedThenRevoked,
    /// A `broker add` replaced the login with a key during the logout: the key was left.
    ReplacedByKey,
}

/// What a logout did.
#[derive(Debug)]
pub struct LogoutReport {
    /// One revocation per set of tokens found: the first of the login as it was read, each
    /// later one of tokens a refresh stored during the logout.
    pub rounds: Vec<Revocation>,
    pub ending: Ending,
}

/// Revoke `provider`/`profile`'s tokens with `revoke` (called outside any vault lock) and
/// remove the row, going round again when a refresh changed the tokens meanwhile (see the
/// module docs).
pub fn logout(
    vault: &Vault,
    provider: &str,
    profile: &str,
    mut revoke: impl FnMut(&StoredCredential) -> Revocation,
) -> Result<LogoutReport, LogoutError> {
    let mut cred = match vault.get_full(provider, profile)? {
        None => return Err(LogoutError::NotLoggedIn),
        Some(c) if c.kind != CredentialKind::OAuth2 => return Err(LogoutError::NotALogin),
        Some(c) => c,
    };
    let mut rounds = Vec::new();
    let ending = loop {
        if rounds.len() == MAX_ROUNDS {
            break match vault.remove_if(provider, profile, |c| c.kind == CredentialKind::OAuth2)? {
                Removal::Removed(held) => {
                    rounds.push(revoke(&held));
                    Ending::RemovedThenRevoked
                }
                Removal::Kept(_) => Ending::ReplacedByKey,
                Removal::Missing => Ending::RemovedElsewhere,
            };
        }
        rounds.push(revoke(&cred));
        match vault.remove_if_unchanged(provider, profile, &cred)? {
            Removal::Removed(_) => break Ending::Removed,
            Removal::Missing => break Ending::RemovedElsewhere,
            Removal::Kept(now) if now.kind != CredentialKind::OAuth2 => {
                break Ending::ReplacedByKey
            }
            Removal::Kept(now) => {
                tracing::info!(
                    provider,
                    profile,
                    "a refresh replaced the tokens during the logout: revoking the new ones"
                );
                cred = now;
            }
        }
    };
    Ok(LogoutReport { rounds, ending })
}

impl LogoutReport {
    /// Did the login have a revocation endpoint?
    pub fn endpoint(&self) -> bool {
        self.rounds.iter().any(|r| r.endpoint)
    }

    /// Did the provider refuse (or not answer) a revocation?
    pub fn failed(&self) -> bool {
        self.rounds.iter().any(|r| !r.failures.is_empty())
    }

    /// Sentences for people on what was revoked, in order (`provider` for the note when there
    /// is no revocation endpoint). The removal itself is the caller's to say.
    pub fn revoked_lines(&self, provider: &str) -> Vec<String> {
        if !self.endpoint() {
            return vec![Revocation::no_endpoint_note(provider)];
        }
        let mut lines = Vec::new();
        for (i, round) in self.rounds.iter().enumerate() {
            if i == 0 {
                if !round.revoked.is_empty() {
                    lines.push(format!("Revoked the {}.", round.revoked.join(" and the ")));
                }
                continue;
            }
            let forced = self.ending == Ending::RemovedThenRevoked && i + 1 == self.rounds.len();
            let what = if round.revoked.is_empty() {
                "could not revoke them (below)".to_string()
            } else {
                format!(
                    "revoked the new {} too",
                    round.revoked.join(" and the new ")
                )
            };
            lines.push(if forced {
                format!(
                    "The tokens kept changing ({i} refreshes during the logout): removed them \
                     from the vault first, then {what}."
                )
            } else {
                format!("A refresh stored new tokens during the logout: {what}.")
            });
        }
        lines
    }

    /// The sentence for people on what became of the row (`system`: the system broker's).
    pub fn ending_line(&self, provider: &str, profile: &str, system: bool) -> String {
        let (logged_out, vault, flag) = if system {
            ("Logged the system broker out of", "its vault", " --system")
        } else {
            ("Logged out of", "the vault", "")
        };
        match self.ending {
            Ending::Removed | Ending::RemovedThenRevoked => format!(
                "{logged_out} {provider} (profile {profile}): the tokens were removed from {vault}."
            ),
            Ending::RemovedElsewhere => format!(
                "{logged_out} {provider} (profile {profile}): another command removed the tokens \
                 from {vault} meanwhile."
            ),
            Ending::ReplacedByKey => format!(
                "{provider} (profile {profile}) in {vault} now holds an API key stored during the \
                 logout: left in place (`broker remove {provider}{flag}` removes it)."
            ),
        }
    }

    /// The sentence for people when a revocation failed: each token not revoked, and why.
    pub fn failure_note(&self) -> Option<String> {
        let failures: Vec<String> = self
            .rounds
            .iter()
            .enumerate()
            .flat_map(|(i, round)| {
                round.failures.iter().map(move |(what, why)| {
                    if i == 0 {
                        format!("the {what}: {why}")
                    } else {
                        format!("the {what} a refresh stored during the logout: {why}")
                    }
                })
            })
            .collect();
        (!failures.is_empty()).then(|| {
            format!(
                "revocation failed for {} (removed locally anyway; those tokens may stay valid at \
                 the server until they expire)",
                failures.join("; ")
            )
        })
    }

    /// The audit event's `reason`: fixed phrases, nothing a server wrote.
    pub fn audit_reason(&self) -> Option<String> {
        let rotated = self.rounds.len().saturating_sub(1);
        match (self.failed(), rotated) {
            (true, _) => Some("revocation failed".into()),
            (false, 0) => None,
            (false, n) => Some(format!(
                "also revoked the tokens of {n} refresh(es) during the logout"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::TokenUpdate;

    fn vault() -> (tempfile::TempDir, Vault) {
        let (dir, _, vault) = crate::vault::test_vault();
        vault
            .put_oauth(
                "acme",
                "default",
                &TokenUpdate {
                    access: "at-0",
                    refresh: Some("rt-0"),
                    expires_at: None,
                    metadata: "{}",
                },
                None,
            )
            .expect("login");
        (dir, vault)
    }

    /// A refresh under the vault's lock, as `super::refresh` stores one.
    fn refresh(vault: &Vault, n: usize) {
        vault
            .with_credential_lock::<_, VaultError>("acme", "default", |c| {
                c.store_tokens(&TokenUpdate {
                    access: &format!("at-{n}"),
                    refresh: Some(&format!("rt-{n}")),
                    expires_at: None,
                    metadata: "{}",
                })
            })
            .expect("refresh");
    }

    /// What a provider that confirms both revocations answers.
    fn revoked(_: &StoredCredential) -> Revocation {
        Revocation {
            endpoint: true,
            revoked: vec!["refresh token", "access token"],
            failures: Vec::new(),
        }
    }

    fn refresh_tokens(cred: &StoredCredential) -> String {
        cred.refresh
            .as_ref()
            .map(|r| r.expose().to_string())
            .unwrap_or_default()
    }

    #[test]
    fn a_refresh_during_the_revocation_gets_its_tokens_revoked_too() {
        let (_dir, vault) = vault();
        let mut seen = Vec::new();
        let report = logout(&vault, "acme", "default", |cred| {
            seen.push(refresh_tokens(cred));
            // The first revocation is slow; a running broker refreshes meanwhile.
            if seen.len() == 1 {
                refresh(&vault, 1);
            }
            revoked(cred)
        })
        .expect("logout");
        assert_eq!(seen, ["rt-0", "rt-1"]);
        assert_eq!(report.ending, Ending::Removed);
        assert!(vault.get_full("acme", "default").expect("get").is_none());
        let lines = report.revoked_lines("acme");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[1].starts_with("A refresh stored new tokens"),
            "{lines:?}"
        );
        assert!(report.failure_note().is_none());
    }

    #[test]
    fn tokens_that_keep_changing_are_removed_then_revoked() {
        let (_dir, vault) = vault();
        let mut seen = Vec::new();
        let report = logout(&vault, "acme", "default", |cred| {
            seen.push(refresh_tokens(cred));
            // Every revocation races a refresh.
            refresh(&vault, seen.len());
            let mut r = revoked(cred);
            if seen.len() == MAX_ROUNDS + 1 {
                r.revoked = vec!["access token"];
                r.failures = vec![("refresh token", "server unavailable".into())];
            }
            r
        })
        .expect("logout");
        // Each set of tokens found was sent for revocation; the last ones after the row was
        // removed, so the refresh during that revocation found no row to store into.
        assert_eq!(seen, ["rt-0", "rt-1", "rt-2", "rt-3"]);
        assert_eq!(report.ending, Ending::RemovedThenRevoked);
        assert!(vault.get_full("acme", "default").expect("get").is_none());
        let lines = report.revoked_lines("acme");
        assert!(
            lines[3].starts_with("The tokens kept changing (3 refreshes"),
            "{lines:?}"
        );
        let note = report.failure_note().expect("a failure");
        assert!(
            note.contains(
                "the refresh token a refresh stored during the logout: server unavailable"
            ),
            "{note}"
        );
        assert_eq!(report.audit_reason().as_deref(), Some("revocation failed"));
    }

    #[test]
    fn a_login_replaced_by_a_key_meanwhile_is_left() {
        let (_dir, vault) = vault();
        let report = logout(&vault, "acme", "default", |cred| {
            vault
                .put(
                    "acme",
                    "default",
                    "a-key-added-meanwhile",
                    CredentialKind::ApiKey,
                )
                .expect("add");
            revoked(cred)
        })
        .expect("logout");
        assert_eq!(report.ending, Ending::ReplacedByKey);
        assert!(vault.get_full("acme", "default").expect("get").is_some());

        assert!(matches!(
            logout(&vault, "acme", "default", revoked),
            Err(LogoutError::NotALogin)
        ));
        assert!(matches!(
            logout(&vault, "acme", "other", revoked),
            Err(LogoutError::NotLoggedIn)
        ));
    }
}
