//! `broker system install | unit`: set up the system broker (see [`crate::system`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::system::install::{install, unit_text, InstallSettings};
use crate::system::SystemPaths;

#[derive(Debug, Args)]
pub struct SystemArgs {
    #[command(subcommand)]
    pub command: SystemCommand,
}

#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// As root: make the `broker` user, /etc/broker (config, master key), /var/lib/broker,
    /// /run/broker and a hardened systemd unit, then enable and start it where systemd runs.
    /// Never overwrites an existing config or key.
    Install(InstallArgs),
    /// Print the systemd unit `install` writes (for machines set up by hand).
    Unit(UnitArgs),
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// The broker's own user.
    #[arg(long, default_value = "broker")]
    pub user: String,
    /// A user who may use the broker (repeat; written into a new config only).
    #[arg(long = "allow-user", value_name = "USER")]
    pub allow_users: Vec<String>,
    /// The broker binary the unit starts (default: this one).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Write no systemd unit (a machine without systemd; see the README for the manual steps).
    #[arg(long)]
    pub no_unit: bool,
    /// Write the unit but do not enable or start it.
    #[arg(long)]
    pub no_start: bool,
    /// Put /etc, /var/lib and /run under DIR (for tests).
    #[arg(long, hide = true, value_name = "DIR")]
    pub root: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UnitArgs {
    #[arg(long, default_value = "broker")]
    pub user: String,
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
}

pub fn run(args: SystemArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        SystemCommand::Install(args) => {
            let settings = InstallSettings {
                paths: args.root.map(SystemPaths::under).unwrap_or_default(),
                user: args.user,
                allow_users: args.allow_users,
                binary: binary(args.binary)?,
                unit: !args.no_unit,
                start: !args.no_start,
            };
            for line in install(&settings)? {
                eprintln!("broker system install: {line}");
            }
            eprintln!(
                "next: `broker add <provider> --system` (as root or an admin), then `LD_PRELOAD=libbroker.so CMD` as an allowed user"
            );
            Ok(ExitCode::SUCCESS)
        }
        SystemCommand::Unit(args) => {
            print!(
                "{}",
                unit_text(&SystemPaths::default(), &args.user, &binary(args.binary)?)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match given {
        Some(path) => Ok(path),
        None => Ok(std::env::current_exe()?.canonicalize()?),
    }
}
