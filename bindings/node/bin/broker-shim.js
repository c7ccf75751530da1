#!/usr/bin/env node
'use strict';
// broker-shim [RUN OPTIONS] -- CMD ARGS...   same as `broker run [RUN OPTIONS] -- CMD ARGS...`
// broker-shim COMMAND ...                    same as `broker COMMAND ...` (add, list, serve, ...)
//
// Node cannot exec, so this process waits for the broker: it relays SIGINT, SIGTERM and SIGHUP
// to it, then exits with its code, or dies of the same signal.

const childProcess = require('child_process');
const os = require('os');
const { brokerEnv, native } = require('..');

const USAGE = `usage: broker-shim [--allow P,..] [--profile NAME] [RUN OPTIONS] -- CMD [ARGS...]
       broker-shim COMMAND [ARGS...]

Runs CMD with its API keys replaced by placeholders; the broker, embedded for the run,
puts the real keys on requests to each key's own hosts ('broker run'). Any other COMMAND
goes to the bundled broker: 'broker-shim add openai', 'broker-shim list', 'broker-shim serve',
'broker-shim help run' for every run option.
`;

/** The broker's arguments for `broker-shim args`, or null for our own usage text. */
function brokerArgv(args) {
  if (args.length === 0 || args[0] === '-h' || args[0] === '--help') return null;
  // Run options, then `--` (broker run says if it is missing).
  if (args[0].startsWith('-') && args[0] !== '-V' && args[0] !== '--version') return ['run', ...args];
  return args;
}

function main() {
  const args = process.argv.slice(2);
  const forwarded = brokerArgv(args);
  if (!forwarded) {
    process.stdout.write(USAGE);
    process.exit(args.length ? 0 : 2);
  }
  let broker;
  let env;
  try {
    broker = native().broker;
    env = brokerEnv();
  } catch (err) {
    process.stderr.write(`broker-shim: ${err.message}\n`);
    process.exit(1);
  }
  const child = childProcess.spawn(broker, forwarded, { stdio: 'inherit', env });
  const relayed = ['SIGINT', 'SIGTERM', 'SIGHUP'];
  const relay = (signal) => {
    if (child.exitCode === null && child.signalCode === null) child.kill(signal);
  };
  for (const signal of relayed) process.on(signal, relay);
  child.on('error', (err) => {
    process.stderr.write(`broker-shim: cannot run ${broker}: ${err.message}\n`);
    process.exit(1);
  });
  child.on('exit', (code, signal) => {
    if (code !== null) process.exit(code);
    // Die of the same signal, as a shell would see it; 128+N if it does not kill us.
    for (const s of relayed) process.removeAllListeners(s);
    process.kill(process.pid, signal);
    setTimeout(() => process.exit(128 + (os.constants.signals[signal] || 0)), 100);
  });
}

main();
