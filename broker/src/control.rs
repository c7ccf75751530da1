//! The control socket of `broker serve` (`$BROKER_HOME/run/control.sock`, 0600, in a 0700
//! directory; the peer's uid is checked with `SO_PEERCRED`).
//!
//! One request per connection, in one of two forms:
//! - `broker run` sends a JSON line ([`OpenRun`]: its allow list, profile, policy, and any key
//!   handed over from its environment);
//! - the shim of a bare `LD_PRELOAD=libbroker.so` agent that found real keys in its environment
//!   sends a [`broker_contract::handover`] request (a plain line format, so the shim needs no
//!   JSON); its run gets the daemon's own policy, and the agent's pid and command line for the
//!   audit come from the socket's peer credentials.
//!
//! Either way the answer names the run's shim config, and the run lives exactly as long as the
//! connection: when the client exits, or is killed, the daemon closes the run's listeners and
//! removes its files. Nothing to leak, nothing to sweep.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};
use zeroize::Zeroizing;

use broker_contract::handover::{Handover, HandoverReply, HANDOVER_END, HANDOVER_MAGIC};

use crate::home::Home;
use crate::instance::{self, RunSpec, FIRST_SLOT};
use crate::proxy::{AgentPid, Proxy, RunKeys};

/// What `broker run` sends once its agent started: `agent-pid <pid>`.
const AGENT_PID: &str = "agent-pid ";
/// What `broker run` sends first when it has keys to hand over: `prove <base64 challenge>`;
/// the daemon answers `proof <base64>` (`Vault::prove`), which only a process holding the
/// vault's data key can make.
const PROVE: &str = "prove ";
const PROOF: &str = "proof ";

/// Largest request line accepted (a few keys and a command line).
const MAX_REQUEST: u64 = 256 * 1024;
/// From accept to a complete request. `broker run` and the shim write theirs at once; a client
/// that connects and then stalls (or sends a byte at a time) is closed after this, so it
/// cannot hold the daemon's descriptors. The proof in between (a keyed hash) takes
/// milliseconds.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Runs of the system broker one uid may hold at once (each `.env` handover is one): the
/// 249 slots are shared by every allowed uid, and one uid must not take them all.
const RUNS_PER_UID: usize = 16;
/// The run slots in use, with the uid owning each (a system broker's handover runs).
type Slots = std::collections::BTreeMap<u8, Option<u32>>;
/// Connections still sending their request, at once: past this, new ones are closed at once.
/// Runs start one at a time per `broker run`; 64 pending at once is a flood, not a workload.
const PENDING_AT_ONCE: usize = 64;

/// What `broker run` asks of the daemon.
#[derive(Serialize, Deserialize)]
pub struct OpenRun {
    pub allow: Option<Vec<String>>,
    pub profile: String,
    pub deny_unlisted: bool,
    pub pid: Option<u32>,
    pub command: String,
    /// Keys from the launcher's environment, for this run only (never stored).
    #[serde(default)]
    pub run_keys: HashMap<String, String>,
    /// The run's own policy layers; the daemon adds its home's `policy.toml` under them.
    #[serde(default)]
    pub policy: Option<crate::policy::RunPolicySpec>,
    /// A system broker's handover run: the uid that opened it, the only one it serves. Set
    /// by the daemon from `SO_PEERCRED`, never taken from the request.
    #[serde(skip)]
    pub owner: Option<u32>,
}

impl Drop for OpenRun {
    fn drop(&mut self) {
        use zeroize::Zeroize as _;
        for key in self.run_keys.values_mut() {
            key.zeroize();
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
enum Reply {
    Ok {
        run_id: String,
        shim_config: PathBuf,
    },
    Error {
        error: String,
    },
}

/// A run opened in the daemon; dropping it ends the run.
pub struct JoinedRun {
    connection: std::os::unix::net::UnixStream,
    pub run_id: String,
    pub shim_config: PathBuf,
}

impl JoinedRun {
    /// Tell the daemon the agent's pid, for the audit of this run.
    pub fn agent_started(&mut self, pid: u32) {
        // Best effort: a daemon that is gone ends the run anyway.
        let _ = writeln!(self.connection, "{AGENT_PID}{pid}");
    }
}

/// Path of the control socket for `home`.
pub fn socket_path(home: &Home) -> PathBuf {
    home.daemon_dir()
        .join(broker_contract::DAEMON_CONTROL_SOCKET)
}

/// Ask a running daemon for a run. `Ok(None)` when no daemon is running for `home`, or when
/// the request hands over keys and the process at the socket cannot prove it holds this
/// vault's data key (said on stderr; the caller then keeps the keys in a broker of its own).
pub fn join(home: &Home, request: &OpenRun) -> anyhow::Result<Option<JoinedRun>> {
    let path = socket_path(home);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        // No socket, or a stale one from a daemon that died: no daemon.
        Err(_) => return Ok(None),
    };
    let mut reader = BufReader::new(stream.try_clone()?);
    if !request.run_keys.is_empty() {
        if let Err(why) = verify_daemon(home, &mut stream, &mut reader) {
            eprintln!(
                "broker: not handing keys to the process at {} ({why}): this run uses a broker of its own",
                path.display()
            );
            return Ok(None);
        }
    }
    let mut line = Zeroizing::new(serde_json::to_vec(request)?);
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reply = String::new();
    reader.read_line(&mut reply)?;
    match serde_json::from_str::<Reply>(&reply) {
        Ok(Reply::Ok {
            run_id,
            shim_config,
        }) => Ok(Some(JoinedRun {
            connection: stream,
            run_id,
            shim_config,
        })),
        Ok(Reply::Error { error }) => anyhow::bail!("broker serve refused the run: {error}"),
        Err(_) => anyhow::bail!(
            "broker serve answered something unreadable on {}",
            path.display()
        ),
    }
}

/// Check that the process at the control socket holds the vault's data key: it signs a fresh
/// challenge, which this process checks with the vault it unlocks itself. Any program of the
/// user can listen at the socket's path; only the genuine daemon (or someone who has the
/// master key, and so everything anyway) can answer.
fn verify_daemon(
    home: &Home,
    stream: &mut std::os::unix::net::UnixStream,
    reader: &mut BufReader<std::os::unix::net::UnixStream>,
) -> Result<(), String> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let keys = crate::vault::KeyConfig::from_env().map_err(|e| e.to_string())?;
    let vault = crate::vault::Vault::open_with(home, &keys)
        .map_err(|e| format!("cannot unlock the vault here to check it: {e}"))?;
    let mut challenge = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut challenge)
        .map_err(|_| "no randomness".to_string())?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    writeln!(stream, "{PROVE}{}", b64.encode(challenge)).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(|e| e.to_string())?;
    let _ = stream.set_read_timeout(None);
    let proof = answer
        .trim_end()
        .strip_prefix(PROOF)
        .and_then(|p| b64.decode(p).ok())
        .ok_or("it does not prove that it holds this vault's key")?;
    if vault.check_proof(&challenge, &proof) {
        Ok(())
    } else {
        Err("its proof does not match this vault's key".into())
    }
}

/// Bind the control socket (removing a stale one: the caller holds the daemon lock).
pub fn bind(home: &Home) -> anyhow::Result<UnixListener> {
    bind_at(&socket_path(home), 0o600)
}

/// Bind a control socket at `path` with `mode`: 0600 for a user's daemon; 0666 for the
/// system broker, whose every connection's uid is checked against the access list (the
/// mode only lets other uids ask).
pub fn bind_at(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Who is at the other end of a control connection, as the kernel says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ControlPeer {
    pub pid: Option<u32>,
    pub uid: u32,
    /// On a system broker: what the access list lets this uid do (`None`: nothing).
    pub role: Option<crate::system::access::Role>,
}

/// Serve the control socket until the task is dropped. `admin` is a system broker's vault
/// access for its admins' requests (`None` for a user's daemon, which takes none).
pub async fn serve(
    listener: UnixListener,
    proxy: Arc<Proxy>,
    runs_dir: PathBuf,
    admin: Option<Arc<crate::system::admin::AdminContext>>,
) {
    let slots = Arc::new(Mutex::new(Slots::from([(FIRST_SLOT, None)])));
    let pending = Arc::new(tokio::sync::Semaphore::new(PENDING_AT_ONCE));
    let ours = rustix::process::geteuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // EMFILE and friends: back off instead of spinning.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = pending.clone().try_acquire_owned() else {
            tracing::warn!("control connection closed: {PENDING_AT_ONCE} others are still sending their requests");
            continue;
        };
        let peer = match (stream.peer_cred(), proxy.access()) {
            (Ok(cred), None) if cred.uid() == ours => ControlPeer {
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                uid: cred.uid(),
                role: None,
            },
            // A system broker answers every uid, if only to say no: the refusal is told in
            // the client's own format once its request line shows which that is.
            (Ok(cred), Some(access)) => ControlPeer {
                pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
                uid: cred.uid(),
                role: access.role(cred.uid()),
            },
            (other, _) => {
                tracing::warn!(peer = ?other.map(|c| c.uid()), "control connection from another uid refused");
                continue;
            }
        };
        tokio::spawn(handle(
            stream,
            permit,
            peer,
            proxy.clone(),
            runs_dir.clone(),
            slots.clone(),
            admin.clone(),
        ));
    }
}

async fn handle(
    stream: UnixStream,
    permit: tokio::sync::OwnedSemaphorePermit,
    peer: ControlPeer,
    proxy: Arc<Proxy>,
    runs_dir: PathBuf,
    slots: Arc<Mutex<Slots>>,
    admin: Option<Arc<crate::system::admin::AdminContext>>,
) {
    let peer_pid = peer.pid;
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read.take(MAX_REQUEST));
    let mut line = Zeroizing::new(String::new());
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    if !matches!(
        tokio::time::timeout_at(deadline, reader.read_line(&mut line)).await,
        Ok(Ok(_))
    ) {
        return;
    }
    // An admin's request to a system broker: one JSON line after the magic line.
    if line.trim_end() == crate::system::admin::ADMIN_MAGIC {
        line.clear();
        let answer = match tokio::time::timeout_at(deadline, reader.read_line(&mut line)).await {
            Ok(Ok(_)) => crate::system::admin::answer(&proxy, admin.as_deref(), peer, &line).await,
            _ => crate::system::admin::AdminReply::error("the request did not arrive in time"),
        };
        drop(line);
        let _ = write.write_all(&answer.render()).await;
        return;
    }
    // A system broker serves only the uids of its access list.
    let refused = match proxy.access() {
        Some(access) if peer.role.is_none() => {
            let refusal = crate::system::access::AccessPolicy::refusal(peer.uid);
            crate::proxy::record_uid_refusal(&proxy, access, None, peer.uid, &refusal);
            Some(refusal)
        }
        _ => None,
    };
    // A client about to hand over keys asks for proof that this is the genuine daemon first.
    if let Some(challenge) = line
        .trim_end()
        .strip_prefix(PROVE)
        .filter(|_| refused.is_none())
    {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let Ok(challenge) = b64.decode(challenge) else {
            return;
        };
        let credentials = proxy.credentials();
        let proof = tokio::task::spawn_blocking(move || credentials.prove(&challenge))
            .await
            .ok()
            .flatten();
        let answer = match proof {
            Some(proof) => format!("{PROOF}{}\n", b64.encode(proof)),
            None => "no-proof\n".to_string(),
        };
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        line.clear();
        if !matches!(
            tokio::time::timeout_at(deadline, reader.read_line(&mut line)).await,
            Ok(Ok(_))
        ) {
            return;
        }
    }
    let from_shim = line.trim_end() == HANDOVER_MAGIC;
    let system = proxy.access().is_some();
    let request = match (from_shim, refused) {
        // The whole request is read first, so the refusal reaches the shim (its keys are
        // wiped unread).
        (true, Some(refusal)) => {
            let handover = tokio::time::timeout_at(deadline, read_handover(&mut reader, &mut line)).await;
            if let Ok(Ok(mut handover)) = handover {
                use zeroize::Zeroize as _;
                handover.keys.iter_mut().for_each(|(_, value)| value.zeroize());
            }
            Err(refusal)
        }
        (false, Some(refusal)) => Err(refusal),
        (true, None) => tokio::time::timeout_at(deadline, read_handover(&mut reader, &mut line))
            .await
            .unwrap_or_else(|_| Err("the handover request did not arrive in time".into()))
            .and_then(|handover| from_handover(handover, &proxy, peer_pid))
            .map(|mut request| {
                // On a system broker, the handed keys are for the uid that handed them.
                request.owner = system.then_some(peer.uid);
                request
            }),
        (false, None) if system => Err(
            "the system broker opens runs only for a bare LD_PRELOAD=libbroker.so (its shim's handover); `broker run` uses a broker of your own".into(),
        ),
        (false, None) => {
            parse_open_run(&line).map(|request| attributed_by_the_kernel(request, peer_pid))
        }
    };
    drop(line);
    let reply = match request {
        Ok(request) => open(&proxy, &runs_dir, &slots, request).await,
        Err(error) => Err(error),
    };
    let (reply, opened) = match reply {
        Ok((reply, opened)) => (reply, Some(opened)),
        Err(error) => (Reply::Error { error }, None),
    };
    let out = match (from_shim, reply) {
        (true, Reply::Ok { shim_config, .. }) => HandoverReply::Ok(shim_config).render().into(),
        (true, Reply::Error { error }) => HandoverReply::Refused(error).render().into(),
        (false, reply) => {
            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            out
        }
    };
    if write.write_all(&out).await.is_err() {
        return;
    }
    // The request is in: the connection now lasts as long as its run (runs are bounded by
    // their slots), and no longer counts as pending.
    drop(permit);
    let Some((run, slot, dir, agent_pid)) = opened else {
        return;
    };
    // The run lasts until the client hangs up. `broker run` says which pid its agent got
    // (it starts the agent only once the run is open), for the audit.
    let mut rest = reader.into_inner().into_inner();
    let mut said = tokio::io::BufReader::new((&mut rest).take(64));
    let mut line = String::new();
    if said.read_line(&mut line).await.is_ok() {
        if let Some(pid) = line
            .trim_end()
            .strip_prefix(AGENT_PID)
            .and_then(|p| p.parse::<u32>().ok())
        {
            // Taken only for a process the client started: the kernel says whose child it is.
            match peer_pid {
                Some(peer) if crate::procfs::descends_from(pid, peer) => agent_pid.set(pid),
                _ => tracing::warn!(
                    claimed = pid,
                    peer = ?peer_pid,
                    "a run's client named an agent pid that is not its own descendant; the audit keeps the client's pid"
                ),
            }
        }
    }
    let mut sink = [0u8; 64];
    while matches!(rest.read(&mut sink).await, Ok(n) if n > 0) {}
    run.listeners.close();
    let _ = std::fs::remove_dir_all(&dir);
    slots
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&slot);
}

/// A `broker run` request line. The error names no part of the line (it may hold keys).
pub fn parse_open_run(line: &str) -> Result<OpenRun, String> {
    serde_json::from_str::<OpenRun>(line).map_err(|_| "malformed request".into())
}

/// Read the rest of a shim's handover request (the magic line is already in `text`).
async fn read_handover<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    text: &mut Zeroizing<String>,
) -> Result<Handover, String> {
    loop {
        let before = text.len();
        match reader.read_line(text).await {
            Ok(0) | Err(_) => return Err("incomplete handover request".into()),
            Ok(_) if text[before..].trim_end() == HANDOVER_END => break,
            Ok(_) => {}
        }
    }
    Handover::parse(text).map_err(|e| e.to_string())
}

/// The run for a shim's handover: the daemon's own policy (every provider, default profile),
/// with the handed keys as its credentials. Each key belongs to the provider whose environment
/// variable held it.
fn from_handover(
    mut handover: Handover,
    proxy: &Proxy,
    pid: Option<u32>,
) -> Result<OpenRun, String> {
    let mut run_keys = HashMap::new();
    let handed: Vec<(String, Zeroizing<String>)> = std::mem::take(&mut handover.keys)
        .into_iter()
        .map(|(var, value)| (var, Zeroizing::new(value)))
        .collect();
    for (var, value) in &handed {
        let provider = proxy
            .catalog()
            .providers()
            .iter()
            .find(|p| p.key_vars().any(|v| v == var));
        if let Some(provider) = provider {
            if provider.aws_sigv4.is_some() {
                // An AWS credential is several variables, made one value below.
                continue;
            }
            run_keys
                .entry(provider.name.clone())
                .or_insert_with(|| value.to_string());
        }
    }
    for provider in proxy.catalog().providers() {
        if let Some(credential) = handed_aws_credential(provider, &handed) {
            run_keys.entry(provider.name.clone()).or_insert(credential);
        }
    }
    if run_keys.is_empty() {
        return Err("none of the handed variables belongs to a provider".into());
    }
    Ok(OpenRun {
        allow: None,
        profile: String::new(),
        deny_unlisted: false,
        pid,
        command: pid.map(crate::procfs::command_line).unwrap_or_default(),
        run_keys,
        policy: None,
        owner: None,
    })
}

/// An AWS credential from handed variables: the access key id's and the secret's (and the
/// session token's, if handed), in the vault's form.
fn handed_aws_credential(
    provider: &crate::providers::Provider,
    handed: &[(String, Zeroizing<String>)],
) -> Option<String> {
    let config = provider.aws_sigv4.as_ref()?;
    let get = |var: &str| {
        handed
            .iter()
            .find(|(v, _)| v == var)
            .map(|(_, value)| value.as_str())
    };
    let id = get(provider.env.first()?)?;
    let secret = get(&config.secret_env)?;
    let credential = crate::proxy::sigv4::credential::AwsCredential::new(
        id,
        secret,
        get(&config.session_token_env),
    )
    .ok()?;
    Some(credential.encode().to_string())
}

/// The pid and command of a `broker run` request, from the kernel rather than the request:
/// the peer's pid (`SO_PEERCRED`) and, from its arguments, the agent's command (what follows
/// `--`; the whole command line when there is none). Any process of the user can send a
/// request, and the audit must not say what it claims.
fn attributed_by_the_kernel(mut request: OpenRun, peer_pid: Option<u32>) -> OpenRun {
    request.pid = peer_pid;
    request.command = match peer_pid {
        Some(pid) => {
            let args = crate::procfs::arguments(pid);
            match args.iter().position(|a| a == "--") {
                Some(at) => args[at + 1..].join(" "),
                None => args.join(" "),
            }
        }
        None => String::new(),
    };
    request
}

async fn open(
    proxy: &Arc<Proxy>,
    runs_dir: &Path,
    slots: &Mutex<Slots>,
    mut request: OpenRun,
) -> Result<(Reply, (instance::OpenRun, u8, PathBuf, AgentPid)), String> {
    if let Some(allow) = &request.allow {
        if let Some(unknown) = allow.iter().find(|p| proxy.catalog().get(p).is_none()) {
            return Err(format!("unknown provider '{unknown}'"));
        }
    }
    let slot = {
        let mut used = slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(owner) = request.owner {
            let held = used.values().filter(|o| **o == Some(owner)).count();
            if held >= RUNS_PER_UID {
                return Err(format!(
                    "uid {owner} already holds {held} runs of the system broker, the most one uid may: each process tree started with a real key in its environment holds one while it runs"
                ));
            }
        }
        let free = (FIRST_SLOT + 1..=250)
            .find(|s| !used.contains_key(s))
            .ok_or("too many runs")?;
        used.insert(free, request.owner);
        free
    };
    let run_id = format!("serve-run-{slot}-{}", request.pid.unwrap_or(0));
    let agent_pid = AgentPid::new(request.pid);
    let dir = runs_dir.join(&run_id);
    let keys = std::mem::take(&mut request.run_keys)
        .into_iter()
        .map(|(k, v)| (k, Zeroizing::new(v)))
        .collect();
    let spec = RunSpec {
        id: run_id.clone(),
        allow: request.allow.take(),
        profiles: HashMap::new(),
        default_profile: std::mem::take(&mut request.profile),
        deny_unlisted: request.deny_unlisted,
        pid: agent_pid.clone(),
        command: std::mem::take(&mut request.command),
        run_keys: RunKeys(keys),
        policy: request.policy.take().unwrap_or_default(),
        owner: request.owner,
    };
    match instance::open_run(proxy, spec, slot, &dir).await {
        Ok(run) => {
            let reply = Reply::Ok {
                run_id,
                shim_config: run.shim_config_path.clone(),
            };
            Ok((reply, (run, slot, dir, agent_pid)))
        }
        Err(err) => {
            slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&slot);
            Err(format!("{err:#}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handed_aws_variables_make_one_credential() {
        let catalog = crate::providers::Catalog::builtin();
        let aws = catalog.get("aws").expect("aws");
        let handed = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, Zeroizing<String>)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), Zeroizing::new(v.to_string())))
                .collect();
            handed_aws_credential(aws, &vars)
        };
        let id = ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE");
        let secret = (
            "AWS_SECRET_ACCESS_KEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        );
        let stored = handed(&[id, secret, ("AWS_SESSION_TOKEN", "tok")]).expect("credential");
        let credential =
            crate::proxy::sigv4::credential::AwsCredential::decode(&stored).expect("decodes");
        assert_eq!(credential.access_key_id, id.1);
        assert_eq!(credential.session_token.as_deref(), Some("tok"));
        assert_eq!(handed(&[id]), None, "no secret, no credential");
        assert_eq!(handed(&[secret]), None, "no id, no credential");
    }

    /// The daemon parses what any process of the user sends: random requests either parse into
    /// keys that survive a round trip or fail with a line number, and never panic.
    #[test]
    fn random_handover_requests_parse_or_fail_cleanly() {
        let mut rng = crate::test_rng::Rng::new(3);
        let parts = [
            "key ",
            "end",
            " ",
            "\n",
            "\r\n",
            "OPENAI_API_KEY",
            "sk-x",
            "=",
            "é",
            "\t",
            "\0",
            "key OPENAI_API_KEY sk-abc\n",
        ];
        let mut parsed = 0;
        for round in 0..5000 {
            let mut text = String::new();
            if rng.below(4) != 0 {
                text.push_str(HANDOVER_MAGIC);
                text.push('\n');
            }
            text.push_str(&rng.text(&parts, 12));
            if rng.below(2) == 0 {
                text.push_str("\nend\n");
            }
            match Handover::parse(&text) {
                Ok(handover) => {
                    parsed += 1;
                    let again = Handover::parse(&handover.render())
                        .unwrap_or_else(|e| panic!("round {round}: {e}"));
                    assert!(again == handover, "round {round}: round trip");
                }
                Err(e) => assert!(e.line >= 1, "round {round}: {e}"),
            }
        }
        assert!(
            parsed > 20,
            "the generator reaches valid requests too ({parsed})"
        );
    }
}
