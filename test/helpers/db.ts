import { randomBytes } from 'node:crypto';
import { Writable } from 'node:stream';
import postgres from 'postgres';
import { expect, inject } from 'vitest';
import { createWorkspace, type CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { newApp } from '../../src/app.ts';
import { createDatabase, type Database } from '../../src/db/client.ts';
import { quoteIdent } from '../../src/db/embedded.ts';
import { readDocsAsset } from '../../src/http/docs-assets.ts';
import { parseEnv } from '../../src/config.ts';
import { createNodeDeps } from '../../src/deps-node.ts';
import type { AppDeps } from '../../src/http/env.ts';
import { Sealer } from '../../src/lib/sealing.ts';
import { runDueJobs } from '../../src/jobs/run-once.ts';
import { taskList } from '../../src/jobs/tasks.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { withDatabase } from './global-setup.ts';

/** Every log line the service wrote during a test, for assertions (e.g. that no personal data leaks). */
export class LogCapture extends Writable {
  lines: string[] = [];
  override _write(chunk: Buffer, _enc: string, cb: () => void) {
    this.lines.push(...chunk.toString('utf8').split('\n').filter(Boolean));
    cb();
  }
  text() {
    return this.lines.join('\n');
  }
}

export interface TestEnv {
  url: string;
  database: Database;
  deps: AppDeps;
  /** The master key the test's sealer uses (for processes that must open what this one sealed). */
  encryptionKey: Buffer;
  logs: LogCapture;
  app: ReturnType<typeof newApp>;
  /** Superuser-ish raw connection for arranging and inspecting state. */
  sql: postgres.Sql;
  newWorkspace(name?: string): Promise<CreatedWorkspace>;
  /** Runs every queued job to completion with a real graphile-worker, then returns. */
  runJobs(): Promise<void>;
  close(): Promise<void>;
}

let counter = 0;

type TestEnvOptions = NonNullable<Parameters<typeof createTestEnv>[0]>;

/**
 * The environment variables a test env's app runs with (besides the database and keys), so another runtime (the
 * Worker under wrangler) can be given exactly the same and compared with it.
 */
export function testEnvVars(opts: TestEnvOptions = {}): Record<string, string> {
  return {
    OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true',
    OUTBOUND_TIMEOUT_MS: '2000',
    REPORT_MAX_ATTEMPTS: String(opts.reportMaxAttempts ?? 5),
    REPORT_BACKOFF_BASE_MS: '20',
    REPORT_BACKOFF_MAX_MS: String(opts.reportBackoffMaxMs ?? 200),
    EXECUTE_MAX_ATTEMPTS: String(opts.maxAttempts ?? 3),
    BODY_LIMIT_BYTES: String(64 * 1024),
    PUBLIC_BASE_URL: 'https://dsr.example.test',
    ...opts.env,
  };
}

/** A fresh database cloned from the migrated template, plus the service's dependencies wired to it. */
export async function createTestEnv(
  opts: {
    maxAttempts?: number;
    reportMaxAttempts?: number;
    reportBackoffMaxMs?: number;
    /** Extra environment variables (e.g. LOGIN_MAX_ATTEMPTS_PER_ACCOUNT, TRUST_PROXY). */
    env?: Record<string, string>;
  } = {},
): Promise<TestEnv> {
  const { adminUrl, template, prefix } = inject('pg');
  const name = `${prefix}_${process.pid}_${++counter}_${randomBytes(2).toString('hex')}`;
  const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${quoteIdent(name)} template ${quoteIdent(template)}`);
  await admin.end();
  const url = withDatabase(adminUrl, name);
  // Small pools: test files run in parallel against one server, whose max_connections may be only 100.
  const database = createDatabase(url, { max: 4 });
  const logs = new LogCapture();
  const logger = createLogger('debug', logs);
  const encryptionKey = randomBytes(32);
  const vars = testEnvVars(opts);
  const deps = createNodeDeps({
    env: parseEnv(vars),
    database,
    digestKey: randomBytes(32),
    sealer: new Sealer(encryptionKey),
    logger,
    docsAsset: readDocsAsset,
  });
  const sql = postgres(url, { max: 3, onnotice: () => {} });
  return {
    url,
    database,
    deps,
    encryptionKey,
    logs,
    sql,
    app: newApp(deps),
    newWorkspace: (n = 'Test workspace') => createWorkspace(database.db, { name: n }),
    runJobs: () => runDueJobs(sql, { connectionString: url, taskList: taskList(deps), logger, outbox: deps.outbox }),
    async close() {
      await sql.end({ timeout: 5 });
      await deps.http.close();
      await database.close();
      const a = postgres(adminUrl, { max: 1, onnotice: () => {} });
      // graphile-worker's runOnce ends its own pool without waiting for it: a forced drop while one of those
      // connections is still closing terminates it, and the client reports that as an unhandled error in the test
      // file. Let them go first (a few seconds at most; the drop forces whatever is left).
      for (let i = 0; i < 100; i++) {
        const [row] = await a<{ n: number }[]>`select count(*)::int as n from pg_stat_activity where datname = ${name}`;
        if (row!.n === 0) break;
        await new Promise((r) => setTimeout(r, 50));
      }
      await a.unsafe(`drop database if exists ${quoteIdent(name)} with (force)`);
      await a.end();
    },
  };
}

/** Sends a request somewhere: the in-process app, or a real server over the network. */
export type Fetcher = (path: string, init: RequestInit) => Response | Promise<Response>;

/** A JSON request with an optional bearer key; the body text and (when it parses) its JSON come back. */
export async function request(
  fetcher: Fetcher,
  method: string,
  path: string,
  opts: { key?: string; body?: unknown; headers?: Record<string, string> } = {},
) {
  const headers: Record<string, string> = { ...opts.headers };
  if (opts.key) headers.authorization = `Bearer ${opts.key}`;
  let body: string | undefined;
  if (opts.body !== undefined) {
    body = typeof opts.body === 'string' ? opts.body : JSON.stringify(opts.body);
    headers['content-type'] ??= 'application/json';
  }
  return readAnswer(await fetcher(path, { method, headers, body }));
}

/** A response's status, headers, body text and (when it parses) its JSON. */
export async function readAnswer(res: Response) {
  const text = await res.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  return { status: res.status, json: json as any, text, headers: res.headers };
}

/**
 * Makes every erasure in the workspace fail (a trigger refuses to delete its topic questions, so the erasure rolls
 * back whole) until the returned function runs.
 */
export async function breakErasures(env: Pick<TestEnv, 'sql'>, workspaceId: string): Promise<() => Promise<void>> {
  const name = `fail_erasures_${workspaceId.replace(/\W/g, '_')}`;
  await env.sql.unsafe(`
    create function ${name}() returns trigger language plpgsql as $$
    begin raise exception 'injected failure'; end $$;
    create trigger ${name} before delete on topic_questions
      for each row when (old.workspace_id = '${workspaceId}') execute function ${name}();`);
  return async () => {
    await env.sql.unsafe(`drop trigger if exists ${name} on topic_questions; drop function if exists ${name}();`);
  };
}

/** JSON request against the in-process app. */
export function call(env: TestEnv, method: string, path: string, opts: Parameters<typeof request>[3] = {}) {
  return request((p, init) => env.app.request(p, init), method, path, opts);
}

export type Res = Awaited<ReturnType<typeof call>>;

/** Creates a connector through the admin API (the test fails unless it is created); returns its id. */
export async function createConnectorVia(env: TestEnv, adminKey: string, body: unknown): Promise<string> {
  const res = await call(env, 'POST', '/v1/admin/connectors', { key: adminKey, body });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

/** Every error answers `{ error: { code, message, requestId, details? } }` with the id echoed in X-Request-Id. */
export function expectError(res: Res, status: number, code: string) {
  expect(res.status, res.text).toBe(status);
  expect(res.headers.get('content-type')).toMatch(/^application\/json/);
  expect(Object.keys(res.json)).toEqual(['error']);
  const err = res.json.error;
  expect(err.code).toBe(code);
  expect(typeof err.message).toBe('string');
  expect(err.message.length).toBeGreaterThan(0);
  expect(typeof err.requestId).toBe('string');
  expect(err.requestId.length).toBeGreaterThan(0);
  expect(res.headers.get('x-request-id')).toBe(err.requestId);
  for (const k of Object.keys(err)) expect(['code', 'message', 'requestId', 'details']).toContain(k);
  return err as { code: string; message: string; requestId: string; details?: { path: string; message: string }[] };
}
