import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface Service {
  proc: ChildProcess;
  output: () => string;
  /** Resolves with the base URL printed at start-up. */
  ready: Promise<string>;
  exited: Promise<number | null>;
}

/**
 * What `npm start` runs after `node`, read from package.json so tests and benchmarks start the service with the same
 * flags (e.g. the V8 heap settings that keep its memory in bounds).
 */
export const NPM_START_ARGS: string[] = (() => {
  const pkg = JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { scripts: { start: string } };
  const [node, ...args] = pkg.scripts.start.split(/\s+/);
  if (node !== 'node') throw new Error(`package.json scripts.start must run node directly (got "${pkg.scripts.start}")`);
  return args;
})();

/**
 * `npm start` as a newcomer runs it, with its own environment; `entry` runs another entry point instead (e.g.
 * `['bin/dsr-connector.mjs', 'serve']`). `group` makes it lead its own process group, so a test can signal the group as
 * a terminal's Ctrl-C does (`process.kill(-proc.pid, 'SIGINT')`: its child processes get the signal too).
 */
export function startService(
  env: NodeJS.ProcessEnv,
  args: string[] = [],
  entry = NPM_START_ARGS,
  opts: { group?: boolean } = {},
): Service {
  const proc = spawn(process.execPath, [...entry, ...args], {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    detached: opts.group ?? false,
  });
  let out = '';
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const ready = new Promise<string>((resolve, reject) => {
    const onData = (chunk: Buffer) => {
      out += chunk.toString();
      // The banner ends with the Ctrl-C hint; wait for all of it (stdout may arrive in pieces).
      if (!/Ctrl-C to stop/.test(out)) return;
      const m = /API\s+(http:\/\/\S+)\/v1/.exec(out);
      resolve(m ? m[1]! : '');
    };
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', onData);
    void exited.then((code) => reject(new Error(`service exited early (${code}):\n${out}`)));
  });
  ready.catch(() => {});
  return { proc, output: () => out, ready, exited };
}

/** `npx dsr-connector …`; `input`, when given, is piped to its stdin (e.g. --secrets-stdin, --password-stdin). */
export function runCli(
  args: string[],
  env: NodeJS.ProcessEnv,
  opts: { input?: string } = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const stdin = opts.input === undefined ? 'ignore' : 'pipe';
    const proc = spawn(process.execPath, ['bin/dsr-connector.mjs', ...args], { cwd: ROOT, env, stdio: [stdin, 'pipe', 'pipe'] });
    if (opts.input !== undefined) proc.stdin!.end(opts.input);
    let stdout = '';
    let stderr = '';
    proc.stdout!.on('data', (c: Buffer) => (stdout += c.toString()));
    proc.stderr!.on('data', (c: Buffer) => (stderr += c.toString()));
    // 'close', not 'exit': the output pipes may still hold data when the process has exited.
    proc.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** Environment for a child: ours minus anything that would point it at another database. */
export function childEnv(extra: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const { DATABASE_URL: _omit, ...rest } = process.env;
  return { ...rest, LOG_LEVEL: 'warn', DB_POOL_MAX: '3', WORKER_CONCURRENCY: '2', ...extra };
}

export async function poll<T>(fn: () => Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > until) throw new Error('timed out waiting');
    await new Promise((r) => setTimeout(r, 100));
  }
}
