//! Which hosts a credential may go to, as the user accepted them.
//!
//! A provider definition says where its key goes: each route's host specs (host, port, path
//! prefix) with the placements of the key (`Authorization: Bearer`, `x-api-key`, a query
//! parameter) and the inject policy. One *grant* is one host spec with its route's placements
//! and policy, as a canonical string. When a credential is stored (`broker add`, `broker
//! login`) the grants of the definition in effect are recorded, sealed in the vault
//! (`vault::trust`); until then, a built-in provider's own grants count as accepted. A request
//! whose grant is not accepted gets no credential: a provider file planted in
//! `$BROKER_HOME/providers/`, or a built-in widened by an upgrade, sends no key to a new host
//! until the user reviews it (`broker providers trust NAME`). A definition that only drops
//! hosts needs no review: every grant it still has was accepted.

use std::collections::BTreeSet;

use super::{Catalog, HostSpec, InjectMode, Injection, Provider};

/// The grant of `spec` in a route with these placements and policy; `private`: its host may
/// be reached at a private address (only then in the grant, so older grants stay valid).
pub fn grant(
    spec: &HostSpec,
    credential: &[Injection],
    inject: InjectMode,
    private: bool,
) -> String {
    let mut grant = serde_json::json!({
        "host": spec.to_string(),
        "credential": credential,
        "inject": inject,
    });
    if private {
        grant["private_addresses"] = serde_json::Value::Bool(true);
    }
    grant.to_string()
}

/// Every grant of `provider`, in definition order.
pub fn grants(provider: &Provider) -> Vec<String> {
    provider
        .routes
        .iter()
        .flat_map(|route| route.grants.iter().map(|g| g.to_string()))
        .collect()
}

/// The grants a provider's credentials may use when none were recorded: those of the
/// built-in definition of that name, if there is one.
pub fn builtin_grants(name: &str) -> Option<Vec<String>> {
    Catalog::builtin().get(name).map(grants)
}

/// The host part of a grant, for people (`api.openai.com`, `example.com:8443/api`).
pub fn describe(grant: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(grant).unwrap_or_default();
    let host = value["host"].as_str().unwrap_or("?");
    let placements: Vec<String> = value["credential"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(
                    |c| match (c["kind"].as_str(), c["name"].as_str(), c["param"].as_str()) {
                        (Some("header"), Some(name), _) => match c["scheme"]["type"].as_str() {
                            Some(scheme) => format!("{name}: {scheme}"),
                            None => name.to_string(),
                        },
                        (Some("query"), _, Some(param)) => format!("?{param}="),
                        _ => "?".to_string(),
                    },
                )
                .collect()
        })
        .unwrap_or_default();
    let always = value["inject"].as_str() == Some("always");
    let private = value["private_addresses"].as_bool() == Some(true);
    format!(
        "{host} ({}{}{})",
        placements.join(", "),
        if always {
            ", added to every request"
        } else {
            ""
        },
        if private {
            ", also at private addresses"
        } else {
            ""
        }
    )
}

/// What changed between the accepted grants and those in effect.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Review {
    /// In effect, not accepted: credentials are not used there until the user accepts.
    pub added: Vec<String>,
    /// Accepted, no longer in effect (needs no review).
    pub removed: Vec<String>,
}

pub fn review(accepted: &[String], current: &[String]) -> Review {
    let accepted_set: BTreeSet<&String> = accepted.iter().collect();
    let current_set: BTreeSet<&String> = current.iter().collect();
    Review {
        added: current
            .iter()
            .filter(|g| !accepted_set.contains(g))
            .cloned()
            .collect(),
        removed: accepted
            .iter()
            .filter(|g| !current_set.contains(g))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(hosts: &str, header: &str) -> Provider {
        Provider::from_toml(
            &format!(
                r#"name = "acme"
display_name = "ACME"
env = ["ACME_API_KEY"]
placeholder = "acme-broker-placeholder-0000"
key_pattern = '^acme-[A-Za-z0-9-]{{8,}}$'
auth = "api_key"
[[routes]]
hosts = [{hosts}]
credential = [{{ header = "{header}", scheme = "bearer" }}]
"#
            ),
            "test",
        )
        .expect("provider")
    }

    #[test]
    fn a_new_host_or_a_new_placement_is_a_new_grant_and_dropping_one_needs_nothing() {
        let accepted = grants(&provider(
            r#""api.acme.example", "up.acme.example""#,
            "authorization",
        ));
        let narrower = grants(&provider(r#""api.acme.example""#, "authorization"));
        assert_eq!(review(&accepted, &narrower).added, Vec::<String>::new());
        assert_eq!(review(&accepted, &narrower).removed.len(), 1);
        let wider = grants(&provider(
            r#""api.acme.example", "evil.example""#,
            "authorization",
        ));
        let added = review(&accepted, &wider).added;
        assert_eq!(added.len(), 1);
        assert!(
            describe(&added[0]).starts_with("evil.example (authorization: bearer"),
            "{}",
            describe(&added[0])
        );
        // The same host with the key in another header is not the same grant.
        let moved = grants(&provider(r#""api.acme.example""#, "x-forwarded-key"));
        assert_eq!(review(&accepted, &moved).added.len(), 1);
    }

    #[test]
    fn every_builtin_has_its_own_grants() {
        for provider in Catalog::builtin().providers() {
            let own = builtin_grants(&provider.name).expect("built in");
            assert_eq!(own, grants(provider));
            assert!(!own.is_empty());
        }
    }
}
