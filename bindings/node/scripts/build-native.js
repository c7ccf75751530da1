#!/usr/bin/env node
'use strict';
// `npm run build-native`: fill native/ with the `broker` binary and libbroker.so.
//
// - BROKER_SHIM_PREBUILT=DIR: copy DIR/broker and DIR/libbroker.so (e.g. target/debug after
//   `cargo build --workspace`) instead of running cargo.
// - Otherwise `cargo build --profile $BROKER_SHIM_CARGO_PROFILE (default release) -p broker-cli
//   -p broker-shim` in the Rust workspace: $BROKER_SHIM_WORKSPACE, else the nearest parent
//   directory of this package whose Cargo.toml is the broker workspace (bindings/node in a
//   checkout). Cargo reports where it put each artifact.

const childProcess = require('child_process');
const fs = require('fs');
const path = require('path');

const PKG = path.resolve(__dirname, '..');
const NATIVE_DIR = path.join(PKG, 'native');
const CRATES = ['contract', 'shim', 'broker'];
const FILES = ['broker', 'libbroker.so'];

function fail(message) {
  process.stderr.write(`broker-shim build-native: ${message}\n`);
  process.exit(1);
}

function isWorkspace(dir) {
  const manifest = path.join(dir, 'Cargo.toml');
  if (!fs.existsSync(manifest) || !fs.readFileSync(manifest, 'utf8').includes('[workspace]')) {
    return false;
  }
  return CRATES.every((c) => fs.existsSync(path.join(dir, c, 'Cargo.toml')));
}

function findWorkspace() {
  const explicit = process.env.BROKER_SHIM_WORKSPACE;
  if (explicit) {
    if (!isWorkspace(explicit)) fail(`BROKER_SHIM_WORKSPACE=${explicit} is not the broker workspace`);
    return path.resolve(explicit);
  }
  for (let dir = path.dirname(PKG); ; dir = path.dirname(dir)) {
    if (isWorkspace(dir)) return dir;
    if (path.dirname(dir) === dir) return null;
  }
}

function cargoBuild(workspace) {
  const cargo = process.env.CARGO || 'cargo';
  const profile = process.env.BROKER_SHIM_CARGO_PROFILE || 'release';
  const args = ['build', '--profile', profile, '-p', 'broker-cli', '-p', 'broker-shim',
    '--message-format=json-render-diagnostics'];
  process.stderr.write(`broker-shim: ${cargo} ${args.join(' ')}  (in ${workspace})\n`);
  const out = childProcess.spawnSync(cargo, args, {
    cwd: workspace,
    stdio: ['ignore', 'pipe', 'inherit'],
    encoding: 'utf8',
    maxBuffer: 256 * 1024 * 1024,
  });
  if (out.error && out.error.code === 'ENOENT') {
    fail('cargo not found: building the native parts needs Rust (cargo 1.89 or newer)');
  }
  if (out.status !== 0) fail(`cargo build failed (exit ${out.status})`);
  const found = {};
  for (const line of out.stdout.split('\n')) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      continue;
    }
    if (msg.reason !== 'compiler-artifact') continue;
    const kinds = (msg.target && msg.target.kind) || [];
    if (kinds.includes('bin') && msg.target.name === 'broker' && msg.executable) {
      found.broker = msg.executable;
    }
    if (kinds.includes('cdylib')) {
      for (const file of msg.filenames || []) {
        if (path.basename(file) === 'libbroker.so') found['libbroker.so'] = file;
      }
    }
  }
  return found;
}

function main() {
  let sources;
  const prebuilt = process.env.BROKER_SHIM_PREBUILT;
  if (prebuilt) {
    sources = Object.fromEntries(FILES.map((f) => [f, path.join(prebuilt, f)]));
  } else {
    const workspace = findWorkspace();
    if (!workspace) {
      fail('cannot find the broker Rust workspace: run this inside the broker repository, or set BROKER_SHIM_WORKSPACE (or BROKER_SHIM_PREBUILT)');
    }
    sources = cargoBuild(workspace);
  }
  fs.mkdirSync(NATIVE_DIR, { recursive: true });
  for (const file of FILES) {
    const src = sources[file];
    if (!src || !fs.existsSync(src)) fail(`${src || file} is missing`);
    const dest = path.join(NATIVE_DIR, file);
    fs.copyFileSync(src, dest);
    fs.chmodSync(dest, 0o755);
    process.stderr.write(`broker-shim: ${dest}\n`);
  }
}

main();
