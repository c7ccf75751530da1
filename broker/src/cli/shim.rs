//! `broker shim`: where the `libbroker.so` that `broker run` preloads is (the copy carried
//! inside this binary is written out and verified first), for a bare `LD_PRELOAD` and for
//! launchers; `broker shim --install FILE` writes that library to FILE, e.g. where every
//! user of a system broker can read it and none can write (`/usr/local/lib/libbroker.so`).

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
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
    let path = match launch::locate_shim()? {
        Some((path, _)) => path,
        None => anyhow::bail!(
            "libbroker.so not found next to the broker binary and this broker carries none inside (built without the `embedded-shim` feature): build the workspace, install with 'cargo install --path broker', or set BROKER_SHIM_LIB"
        ),
    };
    match args.install {
        None => println!("{}", path.display()),
        Some(dest) => {
            install(&path, &dest)?;
            println!("{}", dest.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `src` copied beside `dest` and renamed over it: a program starting meanwhile loads the old
/// or the new library, never half of one.
fn install(src: &Path, dest: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".libbroker-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.write_all(&bytes)
        .and_then(|()| {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o755))
        })
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write into {}", dir.display()))?;
    tmp.persist(dest)
        .with_context(|| format!("cannot put libbroker.so at {}", dest.display()))?;
    Ok(())
}
