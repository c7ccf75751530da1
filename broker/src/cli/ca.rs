//! `broker ca export`: the CA certificate of the running `broker serve`, for tools that must
//! be told about it by hand (a container's trust store, a JVM keystore). The CA's key never
//! leaves the broker's memory, so there is nothing else to export.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::home::{write_private_file, Home};

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print (or write) the CA certificate of the running `broker serve`, PEM.
    Export {
        /// Write to this file (0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(args: CaArgs) -> anyhow::Result<ExitCode> {
    let CaCommand::Export { out } = args.command;
    let home = Home::from_env()?;
    let running =
        std::os::unix::net::UnixStream::connect(crate::control::socket_path(&home)).is_ok();
    let path = home.daemon_dir().join("ca.pem");
    if !running {
        anyhow::bail!(
            "no 'broker serve' is running for {}: its CA exists only while it runs (a new one each start; the key is never stored)",
            home.root().display()
        );
    }
    let pem = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    match out {
        Some(file) => write_private_file(&file, &pem)
            .with_context(|| format!("cannot write {}", file.display()))?,
        None => print!("{}", String::from_utf8_lossy(&pem)),
    }
    Ok(ExitCode::SUCCESS)
}
