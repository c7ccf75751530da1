//! `broker add | list | show | remove`: the credentials in the vault.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Provider name (see `broker providers`).
    pub provider: String,
    /// Profile name, to keep several credentials for one provider.
    #[arg(long, default_value = "default")]
    pub profile: String,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    pub provider: String,
    #[arg(long, default_value = "default")]
    pub profile: String,
}

pub fn add(_args: AddArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the vault is not built yet")
}
pub fn list(_args: ListArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the vault is not built yet")
}
pub fn show(_args: ShowArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the vault is not built yet")
}
pub fn remove(_args: RemoveArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the vault is not built yet")
}
