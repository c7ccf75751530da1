//! Who may use the system broker, decided by the uid the kernel reports for a connection
//! (`SO_PEERCRED` on the control socket, `NETLINK_SOCK_DIAG` on the loopback listeners),
//! never by anything the client sends.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A refused uid is audited at most once per this window (with the count of the others), so
/// a flood of connections is one line, not one per connection.
const REFUSAL_AUDIT_WINDOW: Duration = Duration::from_secs(60);

/// What a uid may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Use credentials.
    User,
    /// Use credentials, and add, replace, remove and list them.
    Admin,
}

/// What one uid may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidPolicy {
    /// `None`: every provider.
    pub providers: Option<Vec<String>>,
    /// The profile its requests use.
    pub profile: String,
}

impl Default for UidPolicy {
    fn default() -> UidPolicy {
        UidPolicy {
            providers: None,
            profile: "default".into(),
        }
    }
}

impl UidPolicy {
    pub fn allows(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == provider))
    }
}

/// The resolved access list of a system broker.
#[derive(Debug)]
pub struct AccessPolicy {
    users: BTreeSet<u32>,
    admins: BTreeSet<u32>,
    policies: Vec<(BTreeSet<u32>, Arc<UidPolicy>)>,
    default_policy: Arc<UidPolicy>,
    /// uid -> (last audited, refusals since)
    refusals: Mutex<HashMap<u32, (Instant, u64)>>,
}

impl AccessPolicy {
    pub fn new(
        users: BTreeSet<u32>,
        admins: BTreeSet<u32>,
        policies: Vec<(BTreeSet<u32>, UidPolicy)>,
    ) -> AccessPolicy {
        AccessPolicy {
            users,
            admins,
            policies: policies
                .into_iter()
                .map(|(u, p)| (u, Arc::new(p)))
                .collect(),
            default_policy: Arc::new(UidPolicy::default()),
            refusals: Mutex::new(HashMap::new()),
        }
    }

    pub fn role(&self, uid: u32) -> Option<Role> {
        if self.admins.contains(&uid) {
            Some(Role::Admin)
        } else if self.users.contains(&uid) {
            Some(Role::User)
        } else {
            None
        }
    }

    /// The policy of the first `[[policy]]` naming `uid`, else every provider and "default".
    pub fn policy_for(&self, uid: u32) -> Arc<UidPolicy> {
        self.policies
            .iter()
            .find(|(uids, _)| uids.contains(&uid))
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| self.default_policy.clone())
    }

    /// What a refused uid is told.
    pub fn refusal(uid: u32) -> String {
        format!(
            "uid {uid} may not use the system broker: an administrator adds it to [access] users or groups in /etc/broker/config.toml and restarts the broker"
        )
    }

    /// Whether this refusal of `uid` goes to the audit log: the first of a burst does, with
    /// the number of refusals since the last line; the rest of the window does not.
    pub fn audit_refusal(&self, uid: u32) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a map entry per distinct uid, and uids are few; forget old ones anyway.
        if map.len() > 4096 {
            map.retain(|_, (at, _)| now.duration_since(*at) < REFUSAL_AUDIT_WINDOW);
        }
        match map.get_mut(&uid) {
            Some((at, count)) if now.duration_since(*at) < REFUSAL_AUDIT_WINDOW => {
                *count += 1;
                None
            }
            Some((at, count)) => {
                let since = *count;
                *at = now;
                *count = 0;
                Some(since)
            }
            None => {
                map.insert(uid, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_refusals_is_audited_once() {
        let access = AccessPolicy::new(BTreeSet::new(), BTreeSet::new(), Vec::new());
        assert_eq!(access.audit_refusal(7), Some(0));
        for _ in 0..100 {
            assert_eq!(access.audit_refusal(7), None);
        }
        assert_eq!(
            access.audit_refusal(8),
            Some(0),
            "another uid is its own burst"
        );
    }
}
