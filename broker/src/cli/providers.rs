//! `broker providers [show NAME]`.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct ProvidersArgs {
    /// `show NAME` prints one provider's definition.
    #[arg(num_args = 0..=2)]
    pub what: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: ProvidersArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the provider catalog is not built yet")
}
