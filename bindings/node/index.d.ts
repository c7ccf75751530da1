import { ChildProcess, SpawnOptions } from 'child_process';

export class BrokerShimError extends Error {}

export interface LauncherOptions {
  /** Only these providers. */
  allow?: string | string[];
  /** The credential profile (default "default"). */
  profile?: string;
  /** Refuse connections to anything but the providers and loopback. */
  denyUnlisted?: boolean;
  /** TEST ONLY: also trust this CA for upstream TLS. */
  upstreamCa?: string;
  /** TEST ONLY: "HOST:PORT:ADDR[:PORT]" overrides. */
  resolve?: string | string[];
  /** More `broker run` options, verbatim. */
  brokerArgs?: string[];
}

export function spawn(cmd: string, args?: string[], opts?: LauncherOptions & SpawnOptions): ChildProcess;
export function run(cmd: string, args?: string[], opts?: LauncherOptions & SpawnOptions): Promise<number>;
export function env(opts?: { providers?: string | string[]; base?: NodeJS.ProcessEnv }): Promise<NodeJS.ProcessEnv>;
export function native(): { broker: string; lib: string | null };
export function runArgs(cmd: string, args?: string[], opts?: LauncherOptions): string[];
export function brokerEnv(base?: NodeJS.ProcessEnv): NodeJS.ProcessEnv;
