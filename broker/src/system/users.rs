//! Users and groups by name, from `/etc/passwd` and `/etc/group`. The broker never asks NSS
//! (which may load modules, or reach a directory server); users only a directory server knows
//! can still be named by number.

use std::collections::BTreeSet;

/// The user and group databases, read once.
#[derive(Debug, Clone, Default)]
pub struct UserDb {
    /// (name, uid, primary gid)
    users: Vec<(String, u32, u32)>,
    /// (name, gid, member names)
    groups: Vec<(String, u32, Vec<String>)>,
}

impl UserDb {
    /// `/etc/passwd` and `/etc/group`; a file that cannot be read counts as empty.
    pub fn system() -> UserDb {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        UserDb::parse(&read("/etc/passwd"), &read("/etc/group"))
    }

    pub fn parse(passwd: &str, group: &str) -> UserDb {
        let users = passwd
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                Some((
                    f.first()?.to_string(),
                    f.get(2)?.parse().ok()?,
                    f.get(3)?.parse().ok()?,
                ))
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split(':').collect();
                let members = f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
            })
            .collect();
        UserDb { users, groups }
    }

    /// A uid by name or number.
    pub fn uid(&self, name: &str) -> Option<u32> {
        if let Ok(uid) = name.parse() {
            return Some(uid);
        }
        self.users
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, uid, _)| *uid)
    }

    pub fn user_name(&self, uid: u32) -> Option<&str> {
        self.users
            .iter()
            .find(|(_, u, _)| *u == uid)
            .map(|(n, ..)| n.as_str())
    }

    /// A gid by name or number.
    pub fn gid(&self, name: &str) -> Option<u32> {
        if let Ok(gid) = name.parse() {
            return Some(gid);
        }
        self.groups
            .iter()
            .find(|(n, ..)| n == name)
            .map(|(_, gid, _)| *gid)
    }

    /// The uids in group `gid`: those whose primary group it is, and its listed members.
    pub fn members(&self, gid: u32) -> BTreeSet<u32> {
        let mut out: BTreeSet<u32> = self
            .users
            .iter()
            .filter(|(_, _, primary)| *primary == gid)
            .map(|(_, uid, _)| *uid)
            .collect();
        for (_, g, members) in &self.groups {
            if *g == gid {
                out.extend(members.iter().filter_map(|m| self.uid(m)));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_group_members() {
        let db = UserDb::parse(
            "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/home/a:/bin/sh\nbob:x:1002:500::/home/b:/bin/sh\n",
            "root:x:0:\nalice:x:1001:\nagents:x:500:alice\n",
        );
        assert_eq!(db.uid("alice"), Some(1001));
        assert_eq!(db.uid("4242"), Some(4242));
        assert_eq!(db.uid("nobody-here"), None);
        assert_eq!(db.gid("agents"), Some(500));
        assert_eq!(db.members(500), BTreeSet::from([1001, 1002]));
        assert_eq!(db.user_name(1002), Some("bob"));
    }
}
