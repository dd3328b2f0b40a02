/**
 * What the fault-injection files share: a real service process wired to a test database with the test's own keys,
 * a bounded concurrent runner, and a non-throwing check of the standard error shape (for loops and properties).
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { TestEnv } from '../helpers/db.ts';
import { freePort } from '../helpers/global-setup.ts';
import { childEnv, startService, type Service } from '../helpers/process.ts';
import type postgres from 'postgres';

export interface RunningService extends Service {
  base: string;
  /** SIGINT, then SIGKILL if it has not exited within `graceMs`; resolves with the exit code (or 'killed'). */
  stop(graceMs?: number): Promise<number | null | 'killed'>;
}

export interface ServiceKeys {
  digestKey: Buffer;
  encryptionKey: Buffer;
}

/** The digest and master keys of a test env, for a child that must open what the test process sealed. */
export const keysOf = (env: Pick<TestEnv, 'deps' | 'encryptionKey'>): ServiceKeys => ({
  digestKey: env.deps.digestKey,
  encryptionKey: env.encryptionKey,
});

/**
 * `node --import tsx src/main.ts --role <role>` on `databaseUrl` with the given digest and master keys, so what the
 * test process sealed or digested opens in the child and the other way round.
 */
export async function startServiceFor(
  keys: ServiceKeys,
  databaseUrl: string,
  role: 'web' | 'worker' | 'all',
  extra: NodeJS.ProcessEnv = {},
): Promise<RunningService> {
  const dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-faults-'));
  const service = startService(
    childEnv({
      DATABASE_URL: databaseUrl,
      DATA_DIR: dataDir,
      PORT: String(await freePort()),
      DSR_DIGEST_KEY: keys.digestKey.toString('base64'),
      DSR_ENCRYPTION_KEY: keys.encryptionKey.toString('base64'),
      OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true',
      ...extra,
    }),
    ['--role', role],
  );
  let base: string;
  try {
    // A worker's banner ends with the same Ctrl-C hint; it has no URL, so its base is ''.
    base = await service.ready;
  } catch (err) {
    await rm(dataDir, { recursive: true, force: true });
    throw err;
  }
  return {
    ...service,
    base,
    async stop(graceMs = 15_000) {
      let code: number | null | 'killed' = service.proc.exitCode;
      if (service.proc.exitCode === null && service.proc.signalCode === null) {
        service.proc.kill('SIGINT');
        const hung = await Promise.race([
          service.exited.then(() => false),
          new Promise<boolean>((r) => setTimeout(() => r(true), graceMs)),
        ]);
        if (hung) {
          service.proc.kill('SIGKILL');
          await service.exited;
          code = 'killed';
        } else {
          code = service.proc.exitCode;
        }
      }
      await rm(dataDir, { recursive: true, force: true });
      return code;
    },
  };
}

/** Runs `fn` over `items` with at most `concurrency` in flight; results in input order. */
export async function runConcurrently<T, R>(items: T[], concurrency: number, fn: (item: T, i: number) => Promise<R>): Promise<R[]> {
  const out = new Array<R>(items.length);
  let next = 0;
  const lanes = Array.from({ length: Math.min(concurrency, items.length) }, async () => {
    for (;;) {
      const i = next++;
      if (i >= items.length) return;
      out[i] = await fn(items[i]!, i);
    }
  });
  await Promise.all(lanes);
  return out;
}

/**
 * Why a non-2xx answer is not in the standard error shape (`{"error":{code,message,requestId,details?}}`, JSON,
 * request id echoed in X-Request-Id), or null when it is. For loops that must report the first offender, not throw.
 */
export function errorShapeProblem(res: { status: number; text: string; headers: Headers }): string | null {
  if (!res.headers.get('content-type')?.startsWith('application/json')) return `content-type ${res.headers.get('content-type')}`;
  let body: unknown;
  try {
    body = JSON.parse(res.text);
  } catch {
    return 'body is not JSON';
  }
  if (typeof body !== 'object' || body === null || Array.isArray(body)) return 'body is not an object';
  const keys = Object.keys(body);
  if (keys.length !== 1 || keys[0] !== 'error') return `top-level keys ${JSON.stringify(keys)}`;
  const err = (body as { error: unknown }).error as Record<string, unknown> | null;
  if (typeof err !== 'object' || err === null) return 'error is not an object';
  for (const k of Object.keys(err)) if (!['code', 'message', 'requestId', 'details'].includes(k)) return `unexpected key error.${k}`;
  if (typeof err.code !== 'string' || !err.code) return 'error.code missing';
  if (typeof err.message !== 'string' || !err.message) return 'error.message missing';
  if (typeof err.requestId !== 'string' || !err.requestId) return 'error.requestId missing';
  if (res.headers.get('x-request-id') !== err.requestId) return 'X-Request-Id does not echo error.requestId';
  if (err.details !== undefined) {
    if (!Array.isArray(err.details)) return 'error.details is not an array';
    for (const d of err.details as unknown[]) {
      const item = d as Record<string, unknown> | null;
      if (typeof item?.path !== 'string' || typeof item.message !== 'string') return 'error.details item is not {path, message}';
    }
  }
  return null;
}

/**
 * Waits until the web process has handed every job its webhooks committed to graphile-worker (the job outbox is
 * empty), as it does by itself after each commit and again a second after a failed attempt.
 */
export async function outboxEmptied(sql: postgres.Sql, timeoutMs = 15_000): Promise<void> {
  const until = Date.now() + timeoutMs;
  for (;;) {
    const [row] = await sql<{ n: number }[]>`select count(*)::int as n from job_outbox`;
    if (row!.n === 0) return;
    if (Date.now() > until) throw new Error(`${row!.n} job(s) still in the outbox after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
