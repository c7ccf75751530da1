"""Run Python agents under broker: the agent holds placeholders, the broker adds the real API
keys only on requests to each key's own hosts.

This package ships the `broker` binary and `libbroker.so` (built from the Rust workspace when
the package is built) and starts them for you:

- `run(argv, **opts)`: `broker run [opts] -- argv`, the broker embedded for that one command;
  returns its exit code.
- `env(providers=...)`: an environment for `subprocess` that makes the child use the
  `broker serve` already running for this user (`$BROKER_HOME/run/shim.conf`).
- `activate(**opts)`: re-executes the current interpreter under `broker run`, once.

Like `broker run` itself, they prepend `libbroker.so` to an existing `LD_PRELOAD` and never
preload it into musl or static programs.
"""

import json
import os
import shutil
import subprocess
import sys

__all__ = [
    "BrokerShimError",
    "NativeMissing",
    "BrokerNotRunning",
    "activate",
    "broker_path",
    "env",
    "run",
    "run_command",
    "shim_path",
]

__version__ = "0.1.0"

_BIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bin")

#: Set in the environment of a process that `activate()` re-executed, so it runs once.
ACTIVATED_VAR = "BROKER_SHIM_ACTIVATED"
#: Set to 1 by libbroker.so in a process where it loaded a config (broker_contract).
SHIM_ACTIVE_VAR = "BROKER_SHIM_ACTIVE"
#: A broker binary to use when this package carries none (it finds its own libbroker.so).
BROKER_BIN_VAR = "BROKER_BIN"
#: Where `broker` looks for libbroker.so first.
SHIM_LIB_VAR = "BROKER_SHIM_LIB"
#: Variables of the broker's own that an agent must never inherit (broker launch.rs).
_BROKER_ONLY_VARS = ("BROKER_PASSPHRASE",)


class BrokerShimError(RuntimeError):
    """A launcher problem, with a message that says what to do."""


class NativeMissing(BrokerShimError):
    """The bundled `broker` binary or `libbroker.so` is not there."""


class BrokerNotRunning(BrokerShimError):
    """`env()` found no running `broker serve`."""


def _bundled():
    """The bundled (broker, libbroker.so), or None when this install carries no build."""
    broker = os.path.join(_BIN_DIR, "broker")
    lib = os.path.join(_BIN_DIR, "libbroker.so")
    if os.path.isfile(broker) and os.path.isfile(lib):
        if not os.access(broker, os.X_OK):
            raise NativeMissing(f"{broker} is not executable: reinstall broker-shim")
        return broker, lib
    return None


def broker_path():
    """The `broker` binary, first found of: the one bundled in this package (a wheel, or a
    build from source), `$BROKER_BIN`, `broker` on `PATH`."""
    bundled = _bundled()
    if bundled:
        return bundled[0]
    override = os.environ.get(BROKER_BIN_VAR)
    if override:
        if not os.access(override, os.X_OK):
            raise NativeMissing(f"BROKER_BIN={override} is not an executable file")
        return override
    on_path = shutil.which("broker")
    if on_path:
        return on_path
    raise NativeMissing(
        f"this broker-shim install carries no broker ({_BIN_DIR} lacks broker and "
        "libbroker.so), BROKER_BIN is not set and no broker is on PATH: install a broker-shim "
        "wheel for this platform, reinstall from source with Rust present (pip install "
        "--force-reinstall --no-binary broker-shim broker-shim), set BROKER_BIN to a broker "
        "binary, or put one on PATH (cargo install --path broker)"
    )


def shim_path():
    """The bundled `libbroker.so`, or None when the broker is not the bundled one (that broker
    finds its own)."""
    bundled = _bundled()
    return bundled[1] if bundled else None


def _broker_env(base=None):
    """The environment for running the broker: the bundled broker uses the bundled shim."""
    environ = dict(os.environ if base is None else base)
    lib = shim_path()
    if lib is not None:
        environ[SHIM_LIB_VAR] = lib
    return environ


def _as_list(value):
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [os.fspath(value)]
    return [os.fspath(v) for v in value]


def run_command(argv, allow=None, profile=None, deny_unlisted=False, upstream_ca=None,
                resolve=None, broker_args=None):
    """The `broker run ... -- argv` command line that `run()` and `activate()` execute.

    `allow`: provider names; `profile`: credential profile; `deny_unlisted`: refuse connections
    to anything but the providers and loopback; `upstream_ca` and `resolve` are the broker's
    TEST ONLY options (`--upstream-ca FILE`, `--resolve HOST:PORT:ADDR[:PORT]`);
    `broker_args`: more `broker run` options, verbatim.
    """
    argv = _as_list(argv)
    if not argv:
        raise ValueError("broker_shim: no command to run")
    cmd = [broker_path(), "run"]
    allow = _as_list(allow)
    if allow:
        cmd += ["--allow", ",".join(allow)]
    if profile:
        cmd += ["--profile", profile]
    if deny_unlisted:
        cmd.append("--deny-unlisted")
    if upstream_ca:
        cmd += ["--upstream-ca", os.fspath(upstream_ca)]
    for entry in _as_list(resolve):
        cmd += ["--resolve", entry]
    cmd += _as_list(broker_args)
    return cmd + ["--"] + argv


def _status(returncode):
    # Negative: the broker itself died from a signal; report it the way shells do.
    return 128 - returncode if returncode < 0 else returncode


def run(argv, *, allow=None, profile=None, deny_unlisted=False, upstream_ca=None,
        resolve=None, broker_args=None, env=None, cwd=None, stdin=None, stdout=None,
        stderr=None):
    """Run `argv` under `broker run` and return its exit code (128+N if signal N ended it).

    The broker is embedded in the child `broker run` process for the duration of the command;
    no `broker serve` is needed. `env`, `cwd`, `stdin`, `stdout` and `stderr` are passed to
    `subprocess.Popen`; options are those of `run_command()`.
    """
    cmd = run_command(argv, allow=allow, profile=profile, deny_unlisted=deny_unlisted,
                      upstream_ca=upstream_ca, resolve=resolve, broker_args=broker_args)
    proc = subprocess.Popen(cmd, env=_broker_env(env), cwd=cwd, stdin=stdin, stdout=stdout,
                            stderr=stderr)
    try:
        return _status(proc.wait())
    except BaseException:
        # Ctrl-C or an exception in this thread: stop the agent through the broker (which
        # forwards the signal and cleans up), then let the exception go on.
        import signal

        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        raise


def _home():
    home = os.environ.get("BROKER_HOME")
    if home:
        return home
    data = os.environ.get("XDG_DATA_HOME")
    if data:
        return os.path.join(data, "broker")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "broker")


def _serve_is_listening(config):
    """Does the daemon accept connections on its run's fake address? A connection that sends
    nothing is closed by the broker without a log line. (Taking `run/serve.lock` to test it
    could make a `broker serve` starting at that moment refuse to start.)"""
    import socket

    if not config["slot"] or not config["port"]:
        return False
    try:
        with socket.create_connection((f"127.77.{config['slot']}.1", config["port"]), timeout=2):
            return True
    except OSError:
        return False


def _read_shim_config(path):
    """Slot, port and `env VAR PLACEHOLDER` lines of a shim config (broker_contract's format)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if not lines or lines[0].strip() != "broker-shim-config 1":
        raise BrokerShimError(f"{path} is not a broker shim config")
    config = {"slot": 0, "port": 0, "env": {}}
    for line in lines[1:]:
        key, _, value = line.rstrip().partition(" ")
        if key in ("slot", "port") and value.isdigit():
            config[key] = int(value)
        elif key == "env":
            var, _, placeholder = value.partition(" ")
            config["env"][var] = placeholder
    return config


def _prepend_preload(lib, existing):
    entries = [lib]
    for entry in (existing or "").replace(" ", ":").split(":"):
        if entry and entry != lib:
            entries.append(entry)
    return ":".join(entries)


def _provider_vars(providers, base):
    """{provider: [env var, ...]} for `providers`, from the broker's catalog."""
    out = subprocess.run([broker_path(), "providers", "--json"], env=_broker_env(base),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise BrokerShimError(f"broker providers failed: {out.stderr.strip()}")
    catalog = {p["name"]: list(p.get("env", [])) for p in json.loads(out.stdout)}
    unknown = [p for p in providers if p not in catalog]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)} (see 'broker-shim providers')")
    return {p: catalog[p] for p in providers}


def env(providers=None, *, base=None):
    """An environment for `subprocess` whose child uses the running `broker serve`.

    The child gets `libbroker.so` prepended to `LD_PRELOAD`, `BROKER_SHIM_CONFIG` pointing at
    the daemon's `$BROKER_HOME/run/shim.conf`, and the placeholders of `providers` (default:
    every provider the broker serves) instead of any key in `base` (default `os.environ`).
    `providers` narrows what is put in the dict: the shim inside the child still sets the
    placeholders of every provider the daemon serves. To limit what an agent may use, run it
    with `run(argv, allow=[...])`.

    Raises `BrokerNotRunning` if no `broker serve` is running for `$BROKER_HOME`: this
    environment would only give the child placeholders that nothing swaps.
    """
    home = _home()
    run_dir = os.path.join(home, "run")
    config = os.path.join(run_dir, "shim.conf")
    try:
        parsed = _read_shim_config(config)
    except FileNotFoundError:
        parsed = None
    if parsed is None or not _serve_is_listening(parsed):
        raise BrokerNotRunning(
            f"no 'broker serve' is running for BROKER_HOME={home}: start it ('broker-shim "
            "serve &'), or launch the agent with broker_shim.run([...]) or 'broker-shim -- CMD', "
            "which embed a broker for the command"
        )
    placeholders = parsed["env"]
    if providers is not None:
        providers = _as_list(providers)
        wanted = _provider_vars(providers, base)
        for provider, variables in wanted.items():
            if not any(v in placeholders for v in variables):
                raise ValueError(f"the running broker does not serve {provider}")
        keep = {v for variables in wanted.values() for v in variables}
        placeholders = {v: p for v, p in placeholders.items() if v in keep}
    environ = dict(os.environ if base is None else base)
    for var in _BROKER_ONLY_VARS:
        environ.pop(var, None)
    lib = shim_path() or _external_shim()
    environ["LD_PRELOAD"] = _prepend_preload(lib, environ.get("LD_PRELOAD"))
    environ["BROKER_SHIM_CONFIG"] = config
    environ.update(placeholders)
    return environ


def _external_shim():
    """libbroker.so for a broker not bundled here: `$BROKER_SHIM_LIB`, next to the binary, or
    the copy the broker carries (`broker shim`)."""
    candidates = [os.environ.get(SHIM_LIB_VAR)]
    bindir = os.path.dirname(os.path.realpath(broker_path()))
    candidates += [os.path.join(bindir, p) for p in
                   ("libbroker.so", "../lib/libbroker.so", "../lib/broker/libbroker.so")]
    for path in candidates:
        if path and os.path.isfile(path):
            return os.path.abspath(path)
    # A broker installed alone (`cargo install`) carries its shim: `broker shim` writes it
    # out, checked against the copy inside, and prints where.
    out = subprocess.run([broker_path(), "shim"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    printed = out.stdout.strip() if out.returncode == 0 else ""
    if printed and os.path.isfile(printed):
        return printed
    raise NativeMissing("libbroker.so not found beside the broker and 'broker shim' named "
                        "none: set BROKER_SHIM_LIB")


def _interpreter_argv():
    """How this interpreter was started, to start it again the same way."""
    orig = getattr(sys, "orig_argv", None)  # Python 3.10+
    if orig:
        return [sys.executable] + list(orig[1:])
    if sys.argv and sys.argv[0] in ("-c", ""):
        raise BrokerShimError("activate() cannot re-run 'python -c' code before Python 3.10")
    return [sys.executable] + list(sys.argv)


def activate(*, allow=None, profile=None, deny_unlisted=False, upstream_ca=None, resolve=None,
             broker_args=None):
    """Re-execute this interpreter under `broker run`, once. Call it first thing in a script.

    If the process already runs under the shim (`broker run`, `broker-shim`, a previous
    `activate()`), it returns False at once. Otherwise it replaces the process with
    `broker run [opts] -- <this interpreter and its arguments>` and does not return; anything
    the script did before the call happens again in the new process. Options are those of
    `run_command()`.
    """
    if os.environ.get(ACTIVATED_VAR) or os.environ.get(SHIM_ACTIVE_VAR) == "1":
        return False
    if not sys.platform.startswith("linux"):
        raise BrokerShimError("broker-shim runs agents on Linux only")
    cmd = run_command(_interpreter_argv(), allow=allow, profile=profile,
                      deny_unlisted=deny_unlisted, upstream_ca=upstream_ca, resolve=resolve,
                      broker_args=broker_args)
    environ = _broker_env()
    environ[ACTIVATED_VAR] = "1"
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os.execve(cmd[0], cmd, environ)
