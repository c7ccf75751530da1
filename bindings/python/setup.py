"""Build of broker-shim: cargo builds the `broker` binary and `libbroker.so` from the Rust
workspace, and both ship inside the package as `broker_shim/_bin/broker` and
`broker_shim/_bin/libbroker.so`. The Python code is plain; the wheel is tagged
`py3-none-<platform>` because of the two native files.

Where the workspace is, first match wins:
1. `$BROKER_SHIM_WORKSPACE`;
2. `./rust`: an sdist carries the crates there (the `sdist` command below copies the crates
   `broker` and `broker-shim` are built from, as `cargo metadata` lists them, `Cargo.lock`, and
   a `Cargo.toml` whose members are those crates only);
3. the nearest parent directory whose `Cargo.toml` is the broker workspace: a checkout, where
   `pip install ./bindings/python` builds in place (pip >= 21.3 builds local directories in place).

Environment the build honours:
- `BROKER_SHIM_PREBUILT=DIR`: copy `DIR/broker` and `DIR/libbroker.so` (e.g. `target/debug`
  after `cargo build --workspace`) instead of running cargo. For tests and packagers.
- `BROKER_SHIM_CARGO_PROFILE`: the cargo profile (default `release`).
- `CARGO`, `CARGO_TARGET_DIR` and cargo's own configuration, as for any cargo build.
"""

import json
import os
import re
import shutil
import subprocess

from setuptools import setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))
# Crates whose presence marks the broker workspace.
CRATES = ("contract", "shim", "broker")
NATIVE = ("broker", "libbroker.so")


def is_workspace(path):
    manifest = os.path.join(path, "Cargo.toml")
    if not os.path.isfile(manifest):
        return False
    with open(manifest, encoding="utf-8") as f:
        if "[workspace]" not in f.read():
            return False
    return all(os.path.isfile(os.path.join(path, c, "Cargo.toml")) for c in CRATES)


def find_workspace():
    explicit = os.environ.get("BROKER_SHIM_WORKSPACE")
    if explicit:
        if not is_workspace(explicit):
            raise SystemExit(
                f"broker-shim: BROKER_SHIM_WORKSPACE={explicit} is not the broker workspace "
                "(a Cargo.toml with [workspace] next to contract/, shim/ and broker/)"
            )
        return os.path.abspath(explicit)
    bundled = os.path.join(HERE, "rust")
    if is_workspace(bundled):
        return bundled
    path = HERE
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
        if is_workspace(path):
            return path


def find_cargo():
    cargo = os.environ.get("CARGO") or shutil.which("cargo")
    if not cargo:
        home = os.environ.get("CARGO_HOME") or os.path.expanduser("~/.cargo")
        candidate = os.path.join(home, "bin", "cargo")
        cargo = candidate if os.access(candidate, os.X_OK) else None
    if not cargo:
        raise SystemExit(
            "broker-shim: building from source needs Rust (cargo 1.89 or newer), which was not "
            "found on PATH nor in ~/.cargo/bin: install it (https://rustup.rs or your "
            "distribution's cargo package) and retry"
        )
    return cargo


def cargo_build(workspace):
    """Build the broker and the shim; return {file name: built path}."""
    profile = os.environ.get("BROKER_SHIM_CARGO_PROFILE", "release")
    cmd = [
        find_cargo(), "build", "--profile", profile,
        "-p", "broker-cli", "-p", "broker-shim",
        "--message-format=json-render-diagnostics",
    ]
    print("broker-shim: " + " ".join(cmd) + f"  (in {workspace})", flush=True)
    proc = subprocess.run(cmd, cwd=workspace, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"broker-shim: cargo build failed (exit {proc.returncode}), see above")
    # Cargo says where it put each artifact; this follows CARGO_TARGET_DIR, profiles and config.
    found = {}
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") != "compiler-artifact":
            continue
        kinds = msg.get("target", {}).get("kind", [])
        name = msg.get("target", {}).get("name")
        if "bin" in kinds and name == "broker" and msg.get("executable"):
            found["broker"] = msg["executable"]
        if "cdylib" in kinds:
            for path in msg.get("filenames", []):
                if os.path.basename(path) == "libbroker.so":
                    found["libbroker.so"] = path
    missing = [n for n in NATIVE if n not in found]
    if missing:
        raise SystemExit(f"broker-shim: cargo did not report {', '.join(missing)}")
    return found


def native_sources():
    prebuilt = os.environ.get("BROKER_SHIM_PREBUILT")
    if prebuilt:
        found = {n: os.path.join(prebuilt, n) for n in NATIVE}
        missing = [p for p in found.values() if not os.path.isfile(p)]
        if missing:
            raise SystemExit(
                f"broker-shim: BROKER_SHIM_PREBUILT={prebuilt} lacks {', '.join(missing)} "
                "(run 'cargo build --workspace' first)"
            )
        return found
    workspace = find_workspace()
    if workspace is None:
        raise SystemExit(
            "broker-shim: cannot find the broker Rust workspace to build from: build from the "
            "repository (pip install ./bindings/python) or from an sdist, or set "
            "BROKER_SHIM_WORKSPACE to the repository root"
        )
    return cargo_build(workspace)


def install_native(dest):
    os.makedirs(dest, exist_ok=True)
    for name, src in native_sources().items():
        out = os.path.join(dest, name)
        shutil.copyfile(src, out)
        os.chmod(out, 0o755)


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            dest = os.path.join(HERE, "src", "broker_shim", "_bin")
        else:
            dest = os.path.join(self.build_lib, "broker_shim", "_bin")
        install_native(dest)


def needed_crates(workspace):
    """Directories (relative to the workspace) of `broker-cli`, `broker-shim` and every workspace
    crate they depend on by path, of any kind, as cargo sees them."""
    out = subprocess.run(
        [find_cargo(), "metadata", "--no-deps", "--offline", "--format-version", "1"],
        cwd=workspace, stdout=subprocess.PIPE, text=True, check=True,
    )
    packages = {p["name"]: p for p in json.loads(out.stdout)["packages"]}
    needed, todo = set(), ["broker-cli", "broker-shim"]
    while todo:
        name = todo.pop()
        if name in needed or name not in packages:
            continue
        needed.add(name)
        todo += [d["name"] for d in packages[name]["dependencies"] if d.get("path")]
    dirs = {
        os.path.relpath(os.path.dirname(packages[n]["manifest_path"]), workspace) for n in needed
    }
    return sorted(dirs)


def copy_workspace(workspace, dest):
    """The crates and a Cargo.toml listing only them, so the sdist builds on its own."""
    os.makedirs(dest, exist_ok=True)
    crates = needed_crates(workspace)
    with open(os.path.join(workspace, "Cargo.toml"), encoding="utf-8") as f:
        manifest = f.read()
    members = "[" + ", ".join(f'"{c}"' for c in crates) + "]"
    manifest = re.sub(
        r"(?m)^(members|default-members)\s*=\s*\[[^\]]*\]",
        lambda m: f"{m.group(1)} = {members}",
        manifest,
    )
    with open(os.path.join(dest, "Cargo.toml"), "w", encoding="utf-8") as f:
        f.write(manifest)
    lock = os.path.join(workspace, "Cargo.lock")
    if os.path.isfile(lock):
        shutil.copyfile(lock, os.path.join(dest, "Cargo.lock"))
    ignore = shutil.ignore_patterns("target", ".git", "__pycache__", "*.pyc")
    for crate in crates:
        shutil.copytree(os.path.join(workspace, crate), os.path.join(dest, crate), ignore=ignore)


class Sdist(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        workspace = find_workspace()
        if workspace is None:
            raise SystemExit(
                "broker-shim: an sdist needs the Rust workspace: run this from the repository or "
                "set BROKER_SHIM_WORKSPACE"
            )
        copy_workspace(workspace, os.path.join(base_dir, "rust"))


class NativeDistribution(Distribution):
    """Not pure Python: installs to platlib and gets a platform wheel."""

    def has_ext_modules(self):
        return True


class BdistWheel(bdist_wheel):
    def finalize_options(self):
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):
        # No Python extension inside: any Python 3 on this platform can use the wheel.
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    distclass=NativeDistribution,
    cmdclass={"build_py": BuildPy, "sdist": Sdist, "bdist_wheel": BdistWheel},
)
