//! `broker shim`: where the `libbroker.so` that `broker run` preloads is (the copy carried
//! inside this binary is written out and verified first), for a bare `LD_PRELOAD` and for
//! launchers; `broker shim --install FILE` writes that library to FILE, e.g. where every
//! user of a system broker can read it and none can write (`/usr/local/lib/libbroker.so`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;

use crate::launch;

#[derive(Debug, Args)]
pub struct ShimArgs {
    /// Copy the library to this file (mode 0755; replaced atomically) instead of printing
    /// its path.
    #[arg(long, value_name = "FILE")]
    pub install: Option<PathBuf>,
}

pub fn run(args: ShimArgs) -> anyhow::Result<ExitCode> {
    let Some(dest) = args.install else {
        let path = match launch::locate_shim()? {
            Some((path, _)) => path,
            None => anyhow::bail!("{NOT_FOUND}"),
        };
        println!("{}", path.display());
        return Ok(ExitCode::SUCCESS);
    };
    // The bytes this binary carries, when it carries them: never a file found on disk, which
    // the user's agent may have planted beside the binary (this is often run with sudo, for
    // every user of a system broker), and nothing is written to the caller's cache.
    let bytes = match crate::embedded_shim::BYTES {
        Some(bytes) => bytes.to_vec(),
        None => {
            let Some((src, _)) = launch::locate_shim()? else {
                anyhow::bail!("{NOT_FOUND}");
            };
            std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?
        }
    };
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    crate::embedded_shim::write_atomically(dir, &dest, &bytes, 0o755)?;
    println!("{}", dest.display());
    Ok(ExitCode::SUCCESS)
}

const NOT_FOUND: &str = "libbroker.so not found next to the broker binary and this broker carries none inside (built without the `embedded-shim` feature): build the workspace, install with 'cargo install --path broker', or set BROKER_SHIM_LIB";
