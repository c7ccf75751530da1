//! What the kernel says about a process, from `/proc`: its parent, its command line, whether
//! it descends from another. Used where the broker must not take a client's word for it
//! (the audit's pid and command, whether a process was started inside a run).

/// Numeric fields of `/proc/<pid>/stat` (`pid` may be `self`), numbered as in proc(5).
pub fn stat_fields<const N: usize>(pid: &str, fields: [usize; N]) -> Option<[u64; N]> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')',
    // where field 3 starts.
    let (_, rest) = stat.rsplit_once(')')?;
    let values: Vec<&str> = rest.split_whitespace().collect();
    let mut out = [0u64; N];
    for (slot, field) in out.iter_mut().zip(fields) {
        *slot = values.get(field.checked_sub(3)?)?.parse().ok()?;
    }
    Some(out)
}

/// The parent of `pid` (field 4 of `/proc/<pid>/stat`).
pub fn parent_of(pid: u32) -> Option<u32> {
    let [ppid] = stat_fields(&pid.to_string(), [4])?;
    u32::try_from(ppid).ok()
}

/// Is `pid` `ancestor` or one of its descendants?
pub fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut current = pid;
    for _ in 0..128 {
        if current == ancestor {
            return true;
        }
        match parent_of(current) {
            Some(parent) if parent != 0 && parent != current => current = parent,
            _ => return false,
        }
    }
    false
}

/// The arguments of `pid`, as the kernel holds them.
pub fn arguments(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The command line of `pid` for the audit, as `ps` shows it (arguments joined by spaces).
pub fn command_line(pid: u32) -> String {
    arguments(pid).join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_descends_from_its_parent_and_not_from_a_child() {
        let me = std::process::id();
        let parent = parent_of(me).expect("a parent");
        assert!(descends_from(me, parent));
        assert!(descends_from(me, me));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        assert!(descends_from(child.id(), me));
        assert!(!descends_from(me, child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!command_line(me).is_empty());
    }
}
