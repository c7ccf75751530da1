//! `broker serve`: the long-running broker for this user. Agents started with a bare
//! `LD_PRELOAD=libbroker.so cmd` find it through `$BROKER_HOME/run/shim.conf`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::{LimitArgs, UpstreamArgs};
use crate::home::{ensure_private_dir, Home};
use crate::instance::{self, InstanceSettings, RunSpec};

#[derive(Debug, Args)]
#[command(
    after_help = "With --system: the system broker, run as its own user (see `broker system install`). \
It reads /etc/broker/config.toml (root's: who may use it, who administers it, per-uid policy), \
/etc/broker/providers/, the master key from $CREDENTIALS_DIRECTORY/master.key, /etc/broker/master.key \
or BROKER_PASSPHRASE; keeps its vault and audit in /var/lib/broker; and serves agents from /run/broker."
)]
pub struct ServeArgs {
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Serve every uid of the access list in /etc/broker/config.toml, as the system broker
    /// (run it as its own user, not root).
    #[arg(long)]
    pub system: bool,
    /// Put the system broker's /etc, /var/lib and /run under DIR (for tests; never read from
    /// the environment).
    #[arg(long, requires = "system", value_name = "DIR")]
    pub system_root: Option<std::path::PathBuf>,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    if args.system {
        return run_system(args);
    }
    let home = Home::from_env()?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let dir = home.daemon_dir();
    ensure_private_dir(&dir)?;

    let lock = lock_daemon(&dir, || {
        format!(
            "another 'broker serve' is already running for {} (stop it first, or set BROKER_HOME)",
            home.root().display()
        )
    })?;
    raise_descriptor_limit();
    let limits = args.limits.into_limits();
    let runtime = super::serve_runtime()?;
    runtime.block_on(async {
        let started = instance::start(InstanceSettings {
            home: home.clone(),
            upstream: args.upstream.into_settings(Some(&home))?,
            label: "serve".into(),
            limits,
            keys: crate::vault::KeyConfig::from_env()?,
            runtime_dir: dir.clone(),
            run: RunSpec { id: "serve".into(), command: "broker serve".into(), ..RunSpec::default() },
            system: None,
        })
        .await?;
        let control = crate::control::bind(&home)?;
        let control_task = tokio::spawn(crate::control::serve(
            control,
            started.proxy.clone(),
            dir.clone(),
            None,
        ));
        let placeholders = instance::keep_placeholders_current(
            started.proxy.clone(),
            started.shim.clone(),
            started.shim_config_path.clone(),
        );
        eprintln!(
            "broker serve: ready (port {}, {} managed hosts); agents: LD_PRELOAD=libbroker.so CMD, or broker run -- CMD",
            started.shim.port,
            started.shim.hosts.len()
        );
        super::wait_for_shutdown().await;
        control_task.abort();
        placeholders.abort();
        instance::remove_quietly(&crate::control::socket_path(&home));
        instance::remove_quietly(&started.shim_config_path);
        eprintln!("broker serve: stopped");
        anyhow::Ok(())
    })?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

/// `broker serve --system`: see [`crate::system`].
fn run_system(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let paths = match args.system_root {
        Some(root) => crate::system::SystemPaths::under(root),
        None => crate::system::SystemPaths::default(),
    };
    let start = crate::system::start::prepare(&paths)?;
    let run_dir = paths.run_dir();
    let lock = lock_daemon(&run_dir, || {
        format!(
            "another system broker is already running on {}",
            run_dir.display()
        )
    })?;
    // Runs of a broker that died: their listeners are gone with it.
    let _ = std::fs::remove_dir_all(paths.runs_dir());
    raise_descriptor_limit();
    let limits = args.limits.into_limits();
    let runtime = super::serve_runtime()?;
    // Token endpoints (refreshes, and revocations on `logout --system`) are reached as the
    // providers are: with root's command-line overrides only.
    let upstream = args.upstream.into_settings(None)?;
    let admin = std::sync::Arc::new(crate::system::admin::AdminContext {
        home: start.home.clone(),
        keys: start.keys.clone(),
        oauth: start.oauth,
        upstream: upstream.clone(),
    });
    runtime.block_on(async {
        let started = instance::start(InstanceSettings {
            home: start.home.clone(),
            upstream,
            label: "system".into(),
            limits,
            keys: start.keys,
            runtime_dir: run_dir.clone(),
            run: RunSpec { id: "system".into(), command: "bare preload".into(), ..RunSpec::default() },
            system: Some(instance::SystemSettings {
                access: start.access,
                catalog: start.catalog,
            }),
        })
        .await?;
        let control = crate::control::bind_at(&paths.control_socket(), 0o666)?;
        let control_task = tokio::spawn(crate::control::serve(
            control,
            started.proxy.clone(),
            paths.runs_dir(),
            Some(admin),
        ));
        let placeholders = instance::keep_placeholders_current(
            started.proxy.clone(),
            started.shim.clone(),
            started.shim_config_path.clone(),
        );
        eprintln!(
            "broker serve --system: ready (uid {}, port {}, {} managed hosts); agents of the allowed uids: LD_PRELOAD=libbroker.so CMD",
            rustix::process::geteuid().as_raw(),
            started.shim.port,
            started.shim.hosts.len()
        );
        super::wait_for_shutdown().await;
        control_task.abort();
        placeholders.abort();
        instance::remove_quietly(&paths.control_socket());
        instance::remove_quietly(&started.shim_config_path);
        let _ = std::fs::remove_dir_all(paths.runs_dir());
        eprintln!("broker serve --system: stopped");
        anyhow::Ok(())
    })?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

/// One daemon per directory: `serve.lock` in `dir`, held until the returned file is dropped.
/// The kernel releases it when the process dies, so a crash never leaves a stale lock.
fn lock_daemon(
    dir: &std::path::Path,
    busy: impl FnOnce() -> String,
) -> anyhow::Result<std::fs::File> {
    let lock_path = dir.join("serve.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(busy());
    }
    Ok(lock)
}

/// Every run is served from this process: it may need more descriptors than the soft limit's
/// usual 1024 (the caps in `proxy::limits` are fitted to what it gets).
fn raise_descriptor_limit() {
    if let Err(err) = crate::proxy::limits::raise_descriptor_limit() {
        tracing::warn!(%err, "cannot raise the open-file limit to its hard limit; the connection caps fit the current one");
    }
}
