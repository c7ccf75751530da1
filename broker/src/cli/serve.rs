//! `broker serve`: the long-running broker for this user. Agents started with a bare
//! `LD_PRELOAD=libbroker.so cmd` find it through `$BROKER_HOME/run/shim.conf`.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use super::{LimitArgs, UpstreamArgs};
use crate::home::{ensure_private_dir, Home};
use crate::instance::{self, InstanceSettings, RunSpec};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let home = Home::from_env()?;
    home.ensure()
        .with_context(|| format!("cannot create {}", home.root().display()))?;
    let dir = home.daemon_dir();
    ensure_private_dir(&dir)?;

    // One daemon per BROKER_HOME: the lock is released by the kernel when we die, so a crash
    // never leaves a stale lock behind.
    let lock_path = dir.join("serve.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        anyhow::bail!(
            "another 'broker serve' is already running for {} (stop it first, or set BROKER_HOME)",
            home.root().display()
        );
    }

    // Every run of the user is served from this process: it may need more descriptors than
    // the soft limit's usual 1024 (the caps in `proxy::limits` are fitted to what it gets).
    if let Err(err) = crate::proxy::limits::raise_descriptor_limit() {
        tracing::warn!(%err, "cannot raise the open-file limit to its hard limit; the connection caps fit the current one");
    }
    let limits = args.limits.into_limits();
    let runtime = super::serve_runtime()?;
    runtime.block_on(async {
        let started = instance::start(InstanceSettings {
            home: home.clone(),
            upstream: args.upstream.into_settings()?,
            label: "serve".into(),
            limits,
            keys: crate::vault::KeyConfig::from_env()?,
            runtime_dir: dir.clone(),
            run: RunSpec { id: "serve".into(), command: "broker serve".into(), ..RunSpec::default() },
        })
        .await?;
        let control = crate::control::bind(&home)?;
        let control_task = tokio::spawn(crate::control::serve(control, started.proxy.clone(), dir.clone()));
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
