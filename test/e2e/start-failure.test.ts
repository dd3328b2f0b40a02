import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { REPEATED_SIGNAL_MS } from '../../src/lib/signals.ts';
import { freePort } from '../helpers/global-setup.ts';
import { childEnv, NPM_START_ARGS, poll, ROOT, startService, type Service } from '../helpers/process.ts';

/** A start-up that fails or is interrupted must not leave the embedded PostgreSQL it started running. */

const running: Service[] = [];
const dirs: string[] = [];
afterAll(async () => {
  for (const s of running) if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill('SIGKILL');
  // A server a failing test left behind is stopped here (SIGINT: PostgreSQL's fast shutdown), not left to the machine.
  for (const d of dirs) {
    const pid = postmasterPid(d);
    if (pid) {
      try {
        process.kill(pid, 'SIGINT');
        await poll(async () => (pgRunning(d) ? undefined : true), 30_000);
      } catch {
        // already gone
      }
    }
    await rm(d, { recursive: true, force: true });
  }
});

/** The pid in postmaster.pid; the file may vanish at any moment (initdb's bootstrap server writes one too). */
function postmasterPid(dataDir: string): number | undefined {
  try {
    return Number(readFileSync(path.join(dataDir, 'pg', 'postmaster.pid'), 'utf8').split('\n')[0]) || undefined;
  } catch (err) {
    if ((err as { code?: string }).code === 'ENOENT') return undefined;
    throw err;
  }
}

/** postmaster.pid is removed by a clean stop; a killed server leaves it, so the process is checked too. */
function pgRunning(dataDir: string): boolean {
  const pid = postmasterPid(dataDir);
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

async function embeddedEnv(prefix: string, extra: NodeJS.ProcessEnv = {}) {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), prefix));
  dirs.push(dataDir);
  return { dataDir, env: childEnv({ DATA_DIR: dataDir, PORT: '0', EMBEDDED_PG_PORT: String(await freePort()), ...extra }) };
}

function start(env: NodeJS.ProcessEnv, opts: { group?: boolean; entry?: string[] } = {}): Service {
  const s = startService(env, [], opts.entry ?? NPM_START_ARGS, opts);
  running.push(s);
  return s;
}

/**
 * Waits for the embedded server's pid file, checking often: PostgreSQL is starting (pg_ctl is still waiting for it)
 * or up, and the migrations come next.
 */
async function pgStarting(dataDir: string): Promise<void> {
  for (const until = Date.now() + 60_000; !postmasterPid(dataDir); ) {
    if (Date.now() > until) throw new Error('embedded PostgreSQL did not start');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

describe('npm start that cannot finish starting', () => {
  it('HTTP port in use: exits 1 naming the error, after stopping the worker and the embedded PostgreSQL', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const { dataDir, env } = await embeddedEnv('dsr-portfail-', {
      HOST: '127.0.0.1',
      PORT: String((blocker.address() as net.AddressInfo).port),
    });
    try {
      const failed = start(env);
      expect(await failed.exited).toBe(1);
      expect(failed.output()).toMatch(/dsr-connector failed to start: listen EADDRINUSE/);
      expect(pgRunning(dataDir)).toBe(false);
    } finally {
      blocker.close();
    }

    // The next start starts (and on Ctrl-C stops) a server of its own rather than reusing an orphan.
    const again = start({ ...env, PORT: '0' });
    await again.ready;
    again.proc.kill('SIGINT');
    expect(await again.exited).toBe(0);
    expect(pgRunning(dataDir)).toBe(false);
  }, 120_000);

  it('EMBEDDED_PG_PORT in use: exits 1 saying so and naming the variable, not only "pg_ctl: could not start server"', async () => {
    const blocker = net.createServer();
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', () => resolve()));
    const port = (blocker.address() as net.AddressInfo).port;
    const { dataDir, env } = await embeddedEnv('dsr-pgportfail-', { EMBEDDED_PG_PORT: String(port) });
    try {
      const failed = start(env);
      expect(await failed.exited).toBe(1);
      expect(failed.output()).toContain(
        `embedded PostgreSQL failed to start: port ${port} on 127.0.0.1 is in use by another process; set EMBEDDED_PG_PORT to a free port`,
      );
      expect(pgRunning(dataDir)).toBe(false);
    } finally {
      blocker.close();
    }
  }, 120_000);

  it('Ctrl-C during start-up: the step in flight finishes, then everything stops and the exit is that of a Ctrl-C', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-sigstart-');
    // Its own process group, signalled as a whole: a terminal's Ctrl-C reaches pg_ctl and the migrations' children too.
    const svc = start(env, { group: true });
    await pgStarting(dataDir);
    process.kill(-svc.proc.pid!, 'SIGINT');
    expect(await svc.exited).toBe(0);
    expect(svc.output()).toContain('signal during start-up');
    expect(svc.output()).not.toContain('Ctrl-C to stop'); // it never finished starting
    expect(pgRunning(dataDir)).toBe(false);
  }, 120_000);

  it('a second Ctrl-C during start-up still exits at once', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-sigtwice-');
    const svc = start(env);
    await pgStarting(dataDir);
    svc.proc.kill('SIGINT');
    await poll(async () => (svc.output().includes('signal during start-up') ? true : undefined));
    // A person's second Ctrl-C, not the copy npm forwards at once (that one is not a second Ctrl-C: below).
    await new Promise((resolve) => setTimeout(resolve, REPEATED_SIGNAL_MS + 50));
    svc.proc.kill('SIGINT');
    expect(await svc.exited).toBe(1);
    expect(svc.output()).toContain('second signal: exiting now');
    // The server the forced exit left behind is stopped by afterAll.
  }, 120_000);
});

describe('a shutdown step that fails', () => {
  it('is logged, the later steps still run, and the exit code says so', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-stopfail-');
    const svc = start(env);
    await svc.ready;
    // PostgreSQL dies under the service: the worker's and pg_ctl's stops then fail.
    process.kill(postmasterPid(dataDir)!, 'SIGKILL');
    await poll(async () => (pgRunning(dataDir) ? undefined : true));
    svc.proc.kill('SIGINT');
    expect(await svc.exited).toBe(1);
    const out = svc.output();
    expect(out).toContain('shutdown: stopping embedded PostgreSQL failed');
    expect(out).not.toMatch(/unhandled|triggerUncaughtException/i);
  }, 120_000);
});

describe('an admin CLI command interrupted by Ctrl-C', () => {
  it('stops the embedded PostgreSQL it started (else the next npm start reuses it and never stops it), exit 130', async () => {
    for (const args of [['workspaces', 'create', '--name', 'Interrupted'], ['migrate']]) {
      const { dataDir, env } = await embeddedEnv('dsr-cliint-');
      const cli = start(env, { group: true, entry: ['bin/dsr-connector.mjs', ...args] });
      await pgStarting(dataDir);
      process.kill(-cli.proc.pid!, 'SIGINT');
      expect(await cli.exited, cli.output()).toBe(130);
      expect(cli.output()).toContain('interrupted');
      expect(pgRunning(dataDir)).toBe(false);
    }
  }, 120_000);
});

/**
 * A terminal's Ctrl-C reaches every process of the foreground group, and `npm start` / `npx` forward the SIGINT they
 * get to their child. When npm's script shell runs the command in place (bash does; it is macOS's /bin/sh), the
 * service receives the one Ctrl-C twice within milliseconds: that must stop it as one Ctrl-C does, not as a second.
 */
describe('one Ctrl-C delivered twice at once (the terminal\'s and the copy npm forwards)', () => {
  /** The terminal's SIGINT, then npm's copy a moment later (sent at once, the kernel would merge the two). */
  const twice = async (s: Service, target = s.proc.pid!) => {
    process.kill(target, 'SIGINT');
    await new Promise((resolve) => setTimeout(resolve, 30));
    s.proc.kill('SIGINT');
  };

  it('npm start with bash as its script shell stops cleanly and stops the embedded PostgreSQL', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-npmint-', { npm_config_script_shell: '/bin/bash' });
    expect(existsSync('/bin/bash')).toBe(true);
    const proc = spawn('npm', ['start'], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    let out = '';
    proc.stdout.on('data', (c: Buffer) => (out += c.toString()));
    proc.stderr.on('data', (c: Buffer) => (out += c.toString()));
    const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
    try {
      await poll(async () => (out.includes('Ctrl-C to stop') ? true : undefined), 90_000);
      process.kill(-proc.pid!, 'SIGINT'); // the whole group, as a terminal does
      expect(await exited, out).toBe(0);
      expect(out).not.toContain('second signal');
      expect(pgRunning(dataDir)).toBe(false);
    } finally {
      if (proc.exitCode === null && proc.signalCode === null) process.kill(-proc.pid!, 'SIGKILL');
    }
  }, 120_000);

  it('npm start, during start-up: finishes the step, then stops as for one Ctrl-C', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-sigdupstart-');
    const svc = start(env, { group: true });
    await pgStarting(dataDir);
    await twice(svc, -svc.proc.pid!);
    expect(await svc.exited, svc.output()).toBe(0);
    expect(svc.output()).not.toContain('second signal');
    expect(pgRunning(dataDir)).toBe(false);
  }, 120_000);

  it('an admin CLI command stops the embedded PostgreSQL it started, exit 130', async () => {
    const { dataDir, env } = await embeddedEnv('dsr-clidup-');
    const migrate = ['bin/dsr-connector.mjs', 'migrate'];
    // Initialised beforehand, so the Ctrl-C lands while the command starts the server (not initdb, which it would kill).
    expect(await start(env, { entry: migrate }).exited).toBe(0);
    const cli = start(env, { entry: migrate });
    await pgStarting(dataDir);
    await twice(cli);
    expect(await cli.exited, cli.output()).toBe(130);
    expect(pgRunning(dataDir)).toBe(false);
  }, 120_000);
});
