//! Environment rewriting done once by the constructor, before the program's `main` runs.
//!
//! Planning is pure ([`plan_placeholders`], [`plan_node_ca`], [`merge_bundle`]); carrying the
//! plan out ([`apply`]) touches the process environment and is only called from the
//! constructor, while the process has a single thread.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::path::{Path, PathBuf};

use broker_contract::handover::value_fits;
use broker_contract::ShimConfig;
use zeroize::Zeroize as _;

/// The variable Node (and Bun) read extra trusted CAs from. Node links OpenSSL statically, so
/// the `SSL_CTX_new` hook never fires there: this variable is the only way in.
pub const NODE_EXTRA_CA_CERTS: &str = "NODE_EXTRA_CA_CERTS";
/// Prefix of the merged Node bundles written next to the run CA.
pub const NODE_BUNDLE_PREFIX: &str = "node-ca-";

/// What to do with one managed credential variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placeholder {
    /// Unset: set it to the placeholder so the SDK finds a key to send.
    Set { var: String, placeholder: String },
    /// Holds a real key (from a `.env` or the shell): replace it with the placeholder and scrub
    /// the original bytes. The key itself is not carried in the plan.
    Hide { var: String, placeholder: String },
}

/// The managed variables of a run: `(variable, placeholder, set when unset)`. The config's
/// `env` ones are set when unset; its `env_if_set` ones only replaced when set.
pub fn managed_vars(cfg: &ShimConfig) -> Vec<(String, String, bool)> {
    let set = cfg.env.iter().map(|(v, p)| (v.clone(), p.clone(), true));
    let if_set = cfg
        .env_if_set
        .iter()
        .map(|(v, p)| (v.clone(), p.clone(), false));
    set.chain(if_set).collect()
}

/// Plan the placeholder variables. A variable already holding its placeholder, or empty
/// (deliberately cleared), is left alone.
pub fn plan_placeholders(
    env: &[(String, String, bool)],
    get: &dyn Fn(&str) -> Option<OsString>,
) -> Vec<Placeholder> {
    env.iter()
        .filter_map(|(var, placeholder, set_when_unset)| {
            let (var, placeholder) = (var.clone(), placeholder.clone());
            let value = get(&var);
            let action = match &value {
                None if !set_when_unset => None,
                None => Some(Placeholder::Set { var, placeholder }),
                Some(v) if v.is_empty() || v == OsStr::new(&placeholder) => None,
                Some(_) => Some(Placeholder::Hide { var, placeholder }),
            };
            // The copy may be a real key: leave no trace of it on the heap.
            if let Some(value) = value {
                value.into_vec().zeroize();
            }
            action
        })
        .collect()
}

/// What to do with `NODE_EXTRA_CA_CERTS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCa {
    /// Already the run CA, or a bundle a parent process of this run merged: nothing to do.
    Keep,
    /// Unset: point it at the run CA.
    SetToCa,
    /// Set to another file: write `old + run CA` next to the run CA and point at that.
    Merge { old: PathBuf },
}

/// Where this process writes the CA bundles it merges (Node's, and those for children on
/// the CONNECT fallback): next to the run CA when this user owns that directory (a run of
/// `broker run` or of this user's `broker serve`), else a private directory of this user's
/// (the system broker's `/run/broker` is not the agent's to write, and a root process must not
/// leave root-only files there): `$XDG_RUNTIME_DIR/broker-shim`, else `/tmp/broker-shim-<uid>`,
/// made 0700 and used only if it is this user's own directory, not a link.
pub fn bundle_dir(ca_file: &Path, get: &dyn Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _};
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let ca_dir = ca_file.parent().filter(|d| !d.as_os_str().is_empty())?;
    if std::fs::metadata(ca_dir).is_ok_and(|m| m.uid() == uid) {
        return Some(ca_dir.to_owned());
    }
    let dir = match get("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(runtime) => PathBuf::from(runtime).join("broker-shim"),
        None => PathBuf::from(format!("/tmp/broker-shim-{uid}")),
    };
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.mode() & 0o077 == 0).then_some(dir)
}

/// Plan `NODE_EXTRA_CA_CERTS` for a run CA at `ca_file`, with merged bundles in `bundles`
/// (see [`bundle_dir`]).
pub fn plan_node_ca(current: Option<&OsStr>, ca_file: &Path, bundles: Option<&Path>) -> NodeCa {
    let Some(current) = current.filter(|c| !c.is_empty()) else {
        return NodeCa::SetToCa;
    };
    let current = Path::new(current);
    // Ours: a Node bundle, or the bundle the exec hooks merged for a child on the CONNECT
    // fallback (it holds the run CA too).
    let merged_here = (current.parent() == ca_file.parent() || current.parent() == bundles)
        && current.file_name().is_some_and(|n| {
            [NODE_BUNDLE_PREFIX, broker_contract::MERGED_BUNDLE_PREFIX]
                .iter()
                .any(|prefix| n.as_bytes().starts_with(prefix.as_bytes()))
        });
    if current == ca_file || merged_here {
        NodeCa::Keep
    } else {
        NodeCa::Merge {
            old: current.to_owned(),
        }
    }
}

/// `old` then `ca`, each ending in a newline, so PEM blocks never run together.
pub fn merge_bundle(old: &[u8], ca: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(old.len() + ca.len() + 2);
    for part in [old, ca] {
        out.extend_from_slice(part);
        if !part.is_empty() && !part.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    out
}

/// FNV-1a, 64 bits: a stable name for the merged bundle of one old bundle path.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The merged Node bundle for `old`, next to the run CA: written once per run (its name
/// derives from `old`'s path), atomically (temp file + rename), 0600. Every process of the run
/// that sees the same `old` reuses it.
fn write_node_bundle(old: &Path, ca_file: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = format!(
        "{NODE_BUNDLE_PREFIX}{:016x}.pem",
        fnv1a(old.as_os_str().as_bytes())
    );
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let merged = merge_bundle(&std::fs::read(old)?, &std::fs::read(ca_file)?);
    let tmp = dir.join(format!(".{NODE_BUNDLE_PREFIX}{}.tmp", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&merged)?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// The real keys among the managed variables, `(variable, value)`, for handing to the broker.
/// Values that cannot travel in a handover line (see [`value_fits`]) are left out: they are
/// still hidden, just not handed over.
pub fn real_keys(
    env: &[(String, String, bool)],
    get: &dyn Fn(&str) -> Option<OsString>,
) -> Vec<(String, String)> {
    plan_placeholders(env, get)
        .into_iter()
        .filter_map(|action| match action {
            Placeholder::Hide { var, .. } => {
                let mut value = get(&var)?.into_vec();
                if !value_fits(&value) {
                    value.zeroize();
                    return None;
                }
                // Printable ASCII (checked above), so this is valid UTF-8 and reuses the buffer.
                String::from_utf8(value).ok().map(|value| (var, value))
            }
            Placeholder::Set { .. } => None,
        })
        .collect()
}

/// Which real keys the broker took over, and why the others were not.
#[derive(Debug, Clone, Default)]
pub struct Handed {
    pub vars: Vec<String>,
    pub why_not: String,
}

/// Carry out the environment plan for `cfg`; `handed` says what became of real keys.
///
/// # Safety
/// Must run while the process has exactly one thread (the constructor, before `main`): it calls
/// `setenv` and writes into the original environment strings, which no other thread may be
/// reading.
pub unsafe fn apply(cfg: &ShimConfig, handed: &Handed) {
    let get = |k: &str| std::env::var_os(k);
    for action in plan_placeholders(&managed_vars(cfg), &get) {
        match action {
            Placeholder::Set { var, placeholder } => {
                // SAFETY: single-threaded, per this function's contract.
                unsafe { set(&var, placeholder.as_bytes()) };
            }
            Placeholder::Hide { var, placeholder } => {
                // SAFETY: single-threaded, per this function's contract.
                let scrubbed = unsafe { hide(&var, placeholder.as_bytes()) };
                let scrubbed = match scrubbed {
                    true => " and scrubbed from /proc/self/environ",
                    false => "",
                };
                crate::log::line(&if handed.vars.contains(&var) {
                    format!(
                        "{var} held a real key: handed to broker serve for this process tree \
                         only (never stored); the agent sees the placeholder{scrubbed}"
                    )
                } else {
                    format!(
                        "{var} held a real key: replaced with the placeholder{scrubbed} but not \
                         handed to the broker ({}), so requests use the vault's key \
                         (`broker add`)",
                        handed.why_not
                    )
                });
            }
        }
    }
    if cfg.ca_file.as_os_str().is_empty() {
        return;
    }
    let current = get(NODE_EXTRA_CA_CERTS);
    let bundles = match current.as_ref().is_some_and(|c| !c.is_empty()) {
        true => bundle_dir(&cfg.ca_file, &get),
        false => None,
    };
    match plan_node_ca(current.as_deref(), &cfg.ca_file, bundles.as_deref()) {
        NodeCa::Keep => {}
        // SAFETY: single-threaded, per this function's contract.
        NodeCa::SetToCa => unsafe { set(NODE_EXTRA_CA_CERTS, cfg.ca_file.as_os_str().as_bytes()) },
        NodeCa::Merge { old } => match bundles
            .ok_or_else(|| std::io::Error::other("no directory of this user's to write it in"))
            .and_then(|dir| write_node_bundle(&old, &cfg.ca_file, &dir))
        {
            // SAFETY: single-threaded, per this function's contract.
            Ok(merged) => unsafe { set(NODE_EXTRA_CA_CERTS, merged.as_os_str().as_bytes()) },
            Err(e) => crate::log::line(&format!(
                "cannot merge {NODE_EXTRA_CA_CERTS} ({}) with the run CA: {e}; Node will not \
                 trust the broker",
                old.display()
            )),
        },
    }
}

/// `setenv(var, value, 1)`; values with a NUL byte are skipped (they cannot be expressed).
///
/// # Safety
/// No other thread may be reading or writing the environment.
pub unsafe fn set(var: &str, value: &[u8]) {
    let (Ok(var), Ok(value)) = (CString::new(var), CString::new(value)) else {
        return;
    };
    // SAFETY: both are valid NUL-terminated strings; exclusivity is the caller's contract.
    unsafe { libc::setenv(var.as_ptr(), value.as_ptr(), 1) };
}

/// Replace `var` with `placeholder` and zero the bytes of the old value where the kernel shows
/// them (`/proc/<pid>/environ` reads the original block on the stack, which `setenv` leaves
/// alone). Returns whether the original bytes were found in that block and scrubbed.
///
/// # Safety
/// No other thread may be reading or writing the environment.
unsafe fn hide(var: &str, placeholder: &[u8]) -> bool {
    let mut old: Option<(*mut u8, usize)> = None;
    // SAFETY: `environ` is the NULL-terminated array of NUL-terminated strings maintained by
    // libc; nobody else touches it now (caller's contract).
    unsafe {
        let mut p = crate::ffi::environ();
        while !p.is_null() && !(*p).is_null() {
            let entry = CStr::from_ptr(*p).to_bytes();
            if entry.len() > var.len()
                && entry.starts_with(var.as_bytes())
                && entry[var.len()] == b'='
            {
                let value = (*p).cast::<u8>().cast_mut().add(var.len() + 1);
                old = Some((value, entry.len() - var.len() - 1));
                break;
            }
            p = p.add(1);
        }
    }
    // SAFETY: caller's contract.
    unsafe { set(var, placeholder) };
    let Some((value, len)) = old else {
        return false;
    };
    let in_block = original_env_block()
        .is_some_and(|(start, end)| value as usize >= start && value as usize + len <= end);
    if in_block {
        // SAFETY: the range lies inside the kernel-provided environment block on the initial
        // stack (writable, owned by this process); `setenv` replaced the `environ` entry, so no
        // live pointer reads these bytes as a variable any more.
        unsafe { std::ptr::write_bytes(value, 0, len) };
    }
    in_block
}

/// `env_start` and `env_end` of this process (fields 50 and 51 of `/proc/self/stat`).
fn original_env_block() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces; fields after it start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(50 - 3);
    let start = fields.next()?.parse().ok()?;
    let end = fields.next()?.trim_end().parse().ok()?;
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `A_KEY`..`D_KEY` with placeholders `ph-a`..`ph-d`, all set when unset.
    fn four_managed_vars() -> Vec<(String, String, bool)> {
        ["a", "b", "c", "d"]
            .iter()
            .map(|x| (format!("{}_KEY", x.to_uppercase()), format!("ph-{x}"), true))
            .collect()
    }

    #[test]
    fn if_set_variables_are_hidden_but_never_added() {
        let cfg = ShimConfig {
            env: vec![("GEMINI_API_KEY".into(), "ph-g".into())],
            env_if_set: vec![
                ("GOOGLE_API_KEY".into(), "ph-g".into()),
                ("OTHER_KEY".into(), "ph-o".into()),
            ],
            ..ShimConfig::default()
        };
        let get = |k: &str| (k == "OTHER_KEY").then(|| OsString::from("real"));
        assert_eq!(
            plan_placeholders(&managed_vars(&cfg), &get),
            vec![
                Placeholder::Set {
                    var: "GEMINI_API_KEY".into(),
                    placeholder: "ph-g".into()
                },
                Placeholder::Hide {
                    var: "OTHER_KEY".into(),
                    placeholder: "ph-o".into()
                },
            ]
        );
    }

    #[test]
    fn placeholders_set_when_unset_hidden_when_real() {
        let env = four_managed_vars();
        let get = |k: &str| match k {
            "B_KEY" => Some(OsString::from("ph-b")),
            "C_KEY" => Some(OsString::from("")),
            "D_KEY" => Some(OsString::from("sk-real")),
            _ => None,
        };
        assert_eq!(
            plan_placeholders(&env, &get),
            vec![
                Placeholder::Set {
                    var: "A_KEY".into(),
                    placeholder: "ph-a".into()
                },
                Placeholder::Hide {
                    var: "D_KEY".into(),
                    placeholder: "ph-d".into()
                },
            ]
        );
    }

    #[test]
    fn real_keys_are_the_hidden_values_that_can_travel() {
        let env = four_managed_vars();
        let get = |k: &str| match k {
            "B_KEY" => Some(OsString::from("ph-b")),
            "C_KEY" => Some(OsString::from("sk real with spaces")),
            "D_KEY" => Some(OsString::from("sk-real")),
            _ => None,
        };
        assert_eq!(
            real_keys(&env, &get),
            vec![("D_KEY".to_string(), "sk-real".to_string())]
        );
    }

    #[test]
    fn node_ca_set_kept_or_merged() {
        let ca = Path::new("/run/broker/r1/ca.pem");
        assert_eq!(plan_node_ca(None, ca, None), NodeCa::SetToCa);
        assert_eq!(
            plan_node_ca(Some(OsStr::new("")), ca, None),
            NodeCa::SetToCa
        );
        assert_eq!(plan_node_ca(Some(ca.as_os_str()), ca, None), NodeCa::Keep);
        assert_eq!(
            plan_node_ca(Some(OsStr::new("/run/broker/r1/node-ca-12.pem")), ca, None),
            NodeCa::Keep
        );
        assert_eq!(
            plan_node_ca(Some(OsStr::new("/run/broker/r1/ssl-ca-12.pem")), ca, None),
            NodeCa::Keep
        );
        assert_eq!(
            plan_node_ca(
                Some(OsStr::new("/etc/ssl/certs/ca-certificates.crt")),
                ca,
                None
            ),
            NodeCa::Merge {
                old: "/etc/ssl/certs/ca-certificates.crt".into()
            }
        );
        // a bundle this user merged for the system broker's run, in its own directory
        assert_eq!(
            plan_node_ca(
                Some(OsStr::new("/tmp/broker-shim-7/node-ca-12.pem")),
                ca,
                Some(Path::new("/tmp/broker-shim-7"))
            ),
            NodeCa::Keep
        );
        // a bundle merged for another run is merged again, not trusted as ours
        assert_eq!(
            plan_node_ca(Some(OsStr::new("/run/broker/r0/node-ca-12.pem")), ca, None),
            NodeCa::Merge {
                old: "/run/broker/r0/node-ca-12.pem".into()
            }
        );
    }

    #[test]
    fn bundles_merge_with_newlines_between() {
        assert_eq!(merge_bundle(b"A\n", b"B\n"), b"A\nB\n");
        assert_eq!(merge_bundle(b"A", b"B"), b"A\nB\n");
        assert_eq!(merge_bundle(b"", b"B\n"), b"B\n");
    }

    #[test]
    fn node_bundle_written_0600_next_to_ca() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("broker-shim-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let (old, ca) = (dir.join("system.pem"), dir.join("ca.pem"));
        std::fs::write(&old, "OLD").expect("write");
        std::fs::write(&ca, "CA\n").expect("write");
        assert_eq!(
            bundle_dir(&ca, &|_| None).as_deref(),
            Some(dir.as_path()),
            "ours"
        );
        let merged = write_node_bundle(&old, &ca, &dir).expect("merged");
        assert_eq!(merged.parent(), Some(dir.as_path()));
        assert_eq!(std::fs::read(&merged).expect("read"), b"OLD\nCA\n");
        let mode = std::fs::metadata(&merged)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            plan_node_ca(Some(merged.as_os_str()), &ca, None),
            NodeCa::Keep
        );
        // written once per run: a second process reuses the same file
        assert_eq!(write_node_bundle(&old, &ca, &dir).expect("again"), merged);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bundles_for_a_ca_in_another_users_directory_go_to_a_private_one_of_ours() {
        use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
        let runtime = std::env::temp_dir().join(format!("broker-shim-rt-{}", std::process::id()));
        std::fs::create_dir_all(&runtime).expect("dir");
        let get = |k: &str| (k == "XDG_RUNTIME_DIR").then(|| runtime.clone().into_os_string());
        // /etc is root's: a CA there is not in a directory of ours (unless we are root).
        let dir = bundle_dir(Path::new("/etc/ca.pem"), &get).expect("a directory");
        // SAFETY: getuid has no preconditions and cannot fail.
        if unsafe { libc::getuid() } != 0 {
            assert_eq!(dir, runtime.join("broker-shim"));
            let meta = std::fs::metadata(&dir).expect("meta");
            assert_eq!(meta.permissions().mode() & 0o777, 0o700);
            assert_eq!(meta.uid(), unsafe { libc::getuid() });
        }
        let _ = std::fs::remove_dir_all(&runtime);
    }

    #[test]
    fn env_block_bounds_are_readable() {
        let (start, end) = original_env_block().expect("env block");
        assert!(start < end);
    }
}
