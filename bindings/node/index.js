'use strict';
// Run Node agents under broker: the agent holds placeholders, the broker adds the real API keys
// only on requests to each key's own hosts.
//
// - spawn(cmd, args, opts): `broker run [opts] -- cmd args`, a ChildProcess; the broker is
//   embedded in it for that one command.
// - run(cmd, args, opts): the same, resolving to the exit code (128+N for signal N).
// - env(opts): an environment for child_process whose child uses the `broker serve` already
//   running for this user ($BROKER_HOME/run/shim.conf).
//
// The native parts (the `broker` binary and libbroker.so) come from the platform package
// (@broker-shim/linux-x64-gnu, ...), else this package's native/ directory (filled by
// `npm run build-native`), else $BROKER_BIN, else `broker` on PATH.
// Like `broker run` itself, the launchers prepend libbroker.so to an existing LD_PRELOAD and
// never preload it into musl or static programs.

const childProcess = require('child_process');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');

const NATIVE_DIR = path.join(__dirname, 'native');
const SHIM_FILE = 'libbroker.so';
// Variables of the broker's own that an agent must never inherit (broker launch.rs).
const BROKER_ONLY_VARS = ['BROKER_PASSPHRASE'];

class BrokerShimError extends Error {
  constructor(message) {
    super(message);
    this.name = 'BrokerShimError';
  }
}

function isExecutable(file) {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

// The per-platform packages that carry the native parts (optionalDependencies of this one:
// npm installs only the one whose os, cpu and libc match).
const PLATFORM_PACKAGES = {
  'linux-x64': '@broker-shim/linux-x64-gnu',
  'linux-arm64': '@broker-shim/linux-arm64-gnu',
};

/** The installed platform package's directory, or null. */
function platformPackageDir() {
  const name = PLATFORM_PACKAGES[`${process.platform}-${process.arch}`];
  if (!name) return null;
  try {
    return path.dirname(require.resolve(`${name}/package.json`));
  } catch {
    return null;
  }
}

/** `{ broker, lib }` from a directory holding both, or null. */
function nativeIn(dir) {
  if (!dir) return null;
  const broker = path.join(dir, 'broker');
  const lib = path.join(dir, SHIM_FILE);
  if (!fs.existsSync(broker) || !fs.existsSync(lib)) return null;
  if (!isExecutable(broker)) {
    // An archive tool may have dropped the mode bits; the file is ours to fix.
    try {
      fs.chmodSync(broker, 0o755);
    } catch {
      // Reported below.
    }
  }
  if (!isExecutable(broker)) {
    throw new BrokerShimError(`${broker} is not executable`);
  }
  return { broker, lib };
}

/** The first executable `name` on PATH, or null. */
function onPath(name) {
  for (const dir of (process.env.PATH || '').split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, name))) return path.join(dir, name);
  }
  return null;
}

/**
 * The native parts: `{ broker, lib }`, first found of: the platform package
 * (@broker-shim/linux-x64-gnu, ...), this package's native/ (`npm run build-native`),
 * $BROKER_BIN, `broker` on PATH. `lib` is null for the last two: that broker finds its own
 * libbroker.so (beside it, or the copy it carries). Throws a BrokerShimError saying how to
 * get them.
 */
function native() {
  const found = nativeIn(platformPackageDir()) || nativeIn(NATIVE_DIR);
  if (found) return found;
  const override = process.env.BROKER_BIN;
  if (override) {
    if (!isExecutable(override)) {
      throw new BrokerShimError(`BROKER_BIN=${override} is not an executable file`);
    }
    return { broker: override, lib: null };
  }
  const broker = onPath('broker');
  if (broker) return { broker, lib: null };
  const platform = PLATFORM_PACKAGES[`${process.platform}-${process.arch}`];
  throw new BrokerShimError(
    `the native broker is missing: ${
      platform
        ? `the platform package ${platform} is not installed (was the install run with --omit=optional or --no-optional?)`
        : `no prebuilt broker for ${process.platform}-${process.arch}`
    }, ${NATIVE_DIR} has no broker and ${SHIM_FILE}, BROKER_BIN is not set and no broker is on PATH. ` +
      `Reinstall broker-shim with optional dependencies, run 'npm run build-native' in ${__dirname} ` +
      `(needs Rust and the broker repository), set BROKER_BIN to a broker binary, or put one on PATH ` +
      `('cargo install --path broker')`,
  );
}

/** The environment the broker runs with: the bundled broker uses the bundled shim. */
function brokerEnv(base) {
  const { lib } = native();
  const out = { ...(base || process.env) };
  if (lib) out.BROKER_SHIM_LIB = lib;
  return out;
}

function asList(value) {
  if (value === undefined || value === null) return [];
  return Array.isArray(value) ? value.map(String) : [String(value)];
}

/**
 * The `broker run` arguments for `cmd args` with launcher options: allow (provider names),
 * profile, denyUnlisted, the broker's TEST ONLY upstreamCa (file) and resolve
 * ("HOST:PORT:ADDR[:PORT]", one or a list), and brokerArgs (more `broker run` options).
 */
function runArgs(cmd, args, opts = {}) {
  if (!cmd) throw new BrokerShimError('no command to run');
  const out = ['run'];
  const allow = asList(opts.allow);
  if (allow.length) out.push('--allow', allow.join(','));
  if (opts.profile) out.push('--profile', String(opts.profile));
  if (opts.denyUnlisted) out.push('--deny-unlisted');
  if (opts.upstreamCa) out.push('--upstream-ca', String(opts.upstreamCa));
  for (const entry of asList(opts.resolve)) out.push('--resolve', entry);
  out.push(...asList(opts.brokerArgs), '--', String(cmd), ...asList(args));
  return out;
}

const LAUNCHER_OPTS = ['allow', 'profile', 'denyUnlisted', 'upstreamCa', 'resolve', 'brokerArgs'];

function splitOpts(opts = {}) {
  const launcher = {};
  const spawnOpts = {};
  for (const [key, value] of Object.entries(opts)) {
    (LAUNCHER_OPTS.includes(key) ? launcher : spawnOpts)[key] = value;
  }
  return { launcher, spawnOpts };
}

/**
 * Start `cmd args` under `broker run`; returns the ChildProcess of `broker run`, whose exit
 * code is the agent's. Options: those of runArgs plus child_process.spawn's (env, cwd, stdio...).
 */
function spawn(cmd, args = [], opts = {}) {
  if (!Array.isArray(args)) {
    opts = args || {};
    args = [];
  }
  const { launcher, spawnOpts } = splitOpts(opts);
  const { broker } = native();
  return childProcess.spawn(broker, runArgs(cmd, args, launcher), {
    stdio: 'inherit',
    ...spawnOpts,
    env: brokerEnv(spawnOpts.env),
  });
}

/** spawn(), resolving to the exit code (128+N if signal N ended the broker). */
function run(cmd, args = [], opts = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, opts);
    child.on('error', reject);
    child.on('exit', (code, signal) => {
      resolve(code !== null ? code : 128 + (os.constants.signals[signal] || 0));
    });
  });
}

function brokerHome() {
  if (process.env.BROKER_HOME) return process.env.BROKER_HOME;
  if (process.env.XDG_DATA_HOME) return path.join(process.env.XDG_DATA_HOME, 'broker');
  return path.join(os.homedir(), '.local', 'share', 'broker');
}

/** The parts of a shim config (broker_contract's format) that env() needs. */
function parseShimConfig(text, file) {
  const lines = text.split('\n');
  if ((lines[0] || '').trim() !== 'broker-shim-config 1') {
    throw new BrokerShimError(`${file} is not a broker shim config`);
  }
  const config = { slot: 0, port: 0, env: {} };
  for (const line of lines.slice(1)) {
    const [key, ...rest] = line.trimEnd().split(' ');
    if (key === 'slot') config.slot = Number(rest[0]);
    if (key === 'port') config.port = Number(rest[0]);
    if (key === 'env' && rest.length >= 2) config.env[rest[0]] = rest.slice(1).join(' ');
  }
  return config;
}

/** Does something accept connections at host:port (the fake address of the daemon's run)? */
function listening(host, port, timeoutMs = 2000) {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    const done = (ok) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(timeoutMs, () => done(false));
    socket.once('connect', () => done(true));
    socket.once('error', () => done(false));
  });
}

function prependPreload(lib, existing) {
  const rest = String(existing || '')
    .split(/[ :]/)
    .filter((entry) => entry && entry !== lib);
  return [lib, ...rest].join(':');
}

function externalShim(broker) {
  const dir = path.dirname(fs.realpathSync(broker));
  const candidates = [
    process.env.BROKER_SHIM_LIB,
    path.join(dir, SHIM_FILE),
    path.join(dir, '..', 'lib', SHIM_FILE),
    path.join(dir, '..', 'lib', 'broker', SHIM_FILE),
  ];
  const found = candidates.find((p) => p && fs.existsSync(p));
  if (found) return path.resolve(found);
  // A broker installed alone (`cargo install`) carries its shim: `broker shim` writes it out,
  // checked against the copy inside, and prints where.
  const out = childProcess.spawnSync(broker, ['shim'], { encoding: 'utf8' });
  const printed = out.status === 0 ? out.stdout.trim() : '';
  if (printed && fs.existsSync(printed)) return printed;
  throw new BrokerShimError(
    `${SHIM_FILE} not found beside ${broker} and '${broker} shim' named none: set BROKER_SHIM_LIB`,
  );
}

/**
 * An environment for child_process whose child uses the running `broker serve`: libbroker.so
 * prepended to LD_PRELOAD, BROKER_SHIM_CONFIG set to $BROKER_HOME/run/shim.conf, and the
 * placeholders of `opts.providers` (default: every provider the broker serves) instead of any
 * key in `opts.base` (default process.env). `providers` narrows what is put in the object: the
 * shim in the child still sets the placeholders of every provider the daemon serves; to limit
 * what an agent may use, start it with spawn(cmd, args, { allow: [...] }).
 *
 * Rejects with a BrokerShimError when no `broker serve` is running: such an environment would
 * only give the child placeholders that nothing swaps.
 */
async function env(opts = {}) {
  const home = brokerHome();
  const file = path.join(home, 'run', 'shim.conf');
  const notRunning = new BrokerShimError(
    `no 'broker serve' is running for BROKER_HOME=${home}: start it ('npx broker-shim serve &'), ` +
      `or launch the agent with spawn()/run() or 'npx broker-shim -- CMD', which embed a broker`,
  );
  let config;
  try {
    config = parseShimConfig(fs.readFileSync(file, 'utf8'), file);
  } catch (err) {
    if (err.code === 'ENOENT') throw notRunning;
    throw err;
  }
  if (!config.slot || !config.port || !(await listening(`127.77.${config.slot}.1`, config.port))) {
    throw notRunning;
  }
  const { broker, lib } = native();
  let placeholders = config.env;
  if (opts.providers) {
    const providers = asList(opts.providers);
    const catalog = JSON.parse(
      childProcess.execFileSync(broker, ['providers', '--json'], {
        env: brokerEnv(opts.base),
        encoding: 'utf8',
      }),
    );
    const keep = new Set();
    for (const name of providers) {
      const provider = catalog.find((p) => p.name === name);
      if (!provider) throw new BrokerShimError(`unknown provider ${name} (see 'broker-shim providers')`);
      if (!(provider.env || []).some((v) => v in placeholders)) {
        throw new BrokerShimError(`the running broker does not serve ${name}`);
      }
      for (const v of provider.env || []) keep.add(v);
    }
    placeholders = Object.fromEntries(Object.entries(placeholders).filter(([v]) => keep.has(v)));
  }
  const out = { ...(opts.base || process.env) };
  for (const v of BROKER_ONLY_VARS) delete out[v];
  out.LD_PRELOAD = prependPreload(lib || externalShim(broker), out.LD_PRELOAD);
  out.BROKER_SHIM_CONFIG = file;
  Object.assign(out, placeholders);
  return out;
}

module.exports = { BrokerShimError, env, native, run, runArgs, spawn, brokerEnv };
