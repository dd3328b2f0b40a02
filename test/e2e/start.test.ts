import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import postgres from 'postgres';
import { afterAll, describe, expect, it } from 'vitest';
import { inject } from 'vitest';
import { quoteIdent } from '../../src/db/embedded.ts';
import { freePort, withDatabase } from '../helpers/global-setup.ts';
import { childEnv, poll, runCli, startService, type Service } from '../helpers/process.ts';

async function json(url: string, init: RequestInit = {}) {
  const res = await fetch(url, init);
  return { status: res.status, body: (await res.json()) as Record<string, unknown> & { results?: { requestId: string }[] } };
}

async function eraseThroughApi(base: string, keys: { ingestKey: string; privacyKey: string }, userId: string) {
  const h = (key: string) => ({ authorization: `Bearer ${key}`, 'content-type': 'application/json' });
  const tracked = await json(`${base}/v1/track`, {
    method: 'POST',
    headers: h(keys.ingestKey),
    body: JSON.stringify({ userId, event: 'signed_in' }),
  });
  expect(tracked.body).toMatchObject({ stored: true });
  const created = await json(`${base}/v1/privacy/requests`, {
    method: 'POST',
    headers: h(keys.privacyKey),
    body: JSON.stringify({ action: 'erase', userId }),
  });
  expect(created.status).toBe(202);
  const requestId = created.body.results![0]!.requestId;
  // The worker picks the job up by itself (LISTEN/NOTIFY): no one runs it for us here.
  const done = await poll(async () => {
    const r = await json(`${base}/v1/privacy/requests/${requestId}`, { headers: h(keys.privacyKey) });
    return r.body.status === 'complete' ? r.body : undefined;
  });
  expect(done).toMatchObject({ outcome: 'erased' });
  return requestId;
}

const running: Service[] = [];
const dirs: string[] = [];
afterAll(async () => {
  for (const s of running) if (s.proc.exitCode === null) s.proc.kill('SIGKILL');
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

describe('npm start with no database configured', () => {
  it('starts embedded PostgreSQL under the data dir, serves, stops cleanly on Ctrl-C, and keeps data on restart', async () => {
    const dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-start-'));
    dirs.push(dataDir);
    const env = childEnv({ DATA_DIR: dataDir, PORT: '0', EMBEDDED_PG_PORT: String(await freePort()) });

    const first = startService(env);
    running.push(first);
    const base = await first.ready;
    expect(first.output()).toMatch(/Health\s+http:\/\/127\.0\.0\.1:\d+\/healthz/);
    expect((await json(`${base}/healthz`)).body).toEqual({ status: 'ok', database: 'ok' });
    expect((await stat(path.join(dataDir, 'digest.key'))).mode & 0o777).toBe(0o600);
    // The connector master key is generated once, private to the user, and the operator is told.
    expect((await stat(path.join(dataDir, 'encryption.key'))).mode & 0o777).toBe(0o600);
    expect(first.output()).toContain('generated an encryption master key');

    // The CLI finds the running embedded server and uses it.
    const cli = await runCli(['workspaces', 'create', '--name', 'Start test', '--json'], env);
    expect(cli.code).toBe(0);
    const keys = JSON.parse(cli.stdout) as { workspaceId: string; ingestKey: string; privacyKey: string; adminKey: string };
    expect(keys.workspaceId).toMatch(/^ws_/);
    const requestId = await eraseThroughApi(base, keys, 'user-start-1');
    const connector = await json(`${base}/v1/admin/connectors`, {
      method: 'POST',
      headers: { authorization: `Bearer ${keys.adminKey}`, 'content-type': 'application/json' },
      body: JSON.stringify({ vendor: 'datagrail', name: 'DG', secrets: { webhookSecret: 'restart-secret', apiKey: 'restart-key' } }),
    });
    expect(connector.status).toBe(201);

    // Ctrl-C while an erasure is running: the worker drains it before the process and PostgreSQL stop.
    const password = (await readFile(path.join(dataDir, 'pg-password'), 'utf8')).trim();
    const db = postgres(`postgres://postgres:${encodeURIComponent(password)}@127.0.0.1:${env.EMBEDDED_PG_PORT}/dsr`, {
      max: 2,
      onnotice: () => {},
    });
    const auth = (key: string) => ({ authorization: `Bearer ${key}`, 'content-type': 'application/json' });
    await json(`${base}/v1/track`, { method: 'POST', headers: auth(keys.ingestKey), body: JSON.stringify({ userId: 'u-drain', event: 'e' }) });
    const blocker = await db.reserve();
    await blocker`begin`;
    await blocker`lock table topic_questions in access exclusive mode`;
    const draining = await json(`${base}/v1/privacy/requests`, {
      method: 'POST',
      headers: auth(keys.privacyKey),
      body: JSON.stringify({ action: 'erase', userId: 'u-drain' }),
    });
    const drainId = draining.body.results![0]!.requestId;
    await poll(async () => ((await db`select status from dsr_requests where id = ${drainId}`)[0]?.status === 'running' ? true : undefined));
    first.proc.kill('SIGINT');
    await new Promise((r) => setTimeout(r, 1_500));
    expect(first.proc.exitCode).toBeNull(); // still draining: the erasure holds it open
    await blocker`commit`;
    blocker.release();
    await db.end();
    expect(await first.exited).toBe(0);
    expect(existsSync(path.join(dataDir, 'pg', 'postmaster.pid'))).toBe(false);

    const second = startService(env);
    running.push(second);
    const base2 = await second.ready;
    const again = await json(`${base2}/v1/privacy/requests/${requestId}`, {
      headers: { authorization: `Bearer ${keys.privacyKey}` },
    });
    expect(again.body).toMatchObject({ id: requestId, status: 'complete' });
    const drained = await json(`${base2}/v1/privacy/requests/${drainId}`, {
      headers: { authorization: `Bearer ${keys.privacyKey}` },
    });
    expect(drained.body).toMatchObject({ status: 'complete', outcome: 'erased', attempts: 1 });
    // Same master key after the restart: the connector's sealed secrets still open (the test reads them).
    const tested = await json(`${base2}/v1/admin/connectors/${String(connector.body.id)}/test`, {
      method: 'POST',
      headers: { authorization: `Bearer ${keys.adminKey}` },
    });
    expect(tested.status).toBe(200);
    expect(second.output()).not.toContain('generated an encryption master key');
    second.proc.kill('SIGTERM');
    expect(await second.exited).toBe(0);
    expect(existsSync(path.join(dataDir, 'pg', 'postmaster.pid'))).toBe(false);
  });
});

describe('--role web and --role worker on one shared PostgreSQL (DATABASE_URL)', () => {
  it('web accepts requests, a separate worker process executes them', async () => {
    const { adminUrl, template, prefix } = inject('pg');
    const name = `${prefix}_roles`;
    const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
    await admin.unsafe(`create database ${quoteIdent(name)} template ${quoteIdent(template)}`);
    await admin.end();
    const dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-roles-'));
    dirs.push(dataDir);
    const env = childEnv({ DATABASE_URL: withDatabase(adminUrl, name), DATA_DIR: dataDir, PORT: '0' });

    const cli = await runCli(['workspaces', 'create', '--name', 'Roles', '--json'], env);
    expect(cli.code).toBe(0);
    const keys = JSON.parse(cli.stdout) as { ingestKey: string; privacyKey: string };

    const web = startService(env, ['--role', 'web']);
    const worker = startService(env, ['--role', 'worker']);
    running.push(web, worker);
    const base = await web.ready;
    await worker.ready;
    expect(base).toMatch(/^http:/);
    await eraseThroughApi(base, keys, 'user-roles-1');

    web.proc.kill('SIGTERM');
    worker.proc.kill('SIGTERM');
    expect(await web.exited).toBe(0);
    expect(await worker.exited).toBe(0);
  });

  it('rejects an unknown role with a clear message', async () => {
    const bad = startService(childEnv({ DATA_DIR: os.tmpdir() }), ['--role', 'both']);
    expect(await bad.exited).toBe(1);
    expect(bad.output()).toContain('--role must be one of web, worker, all');
  });
});

describe('CLI', () => {
  it('migrate brings an empty database to the current schema, and is idempotent', async () => {
    const { adminUrl, prefix } = inject('pg');
    const name = `${prefix}_cli_migrate`;
    const admin = postgres(adminUrl, { max: 1, onnotice: () => {} });
    await admin.unsafe(`create database ${quoteIdent(name)}`);
    const env = childEnv({ DATABASE_URL: withDatabase(adminUrl, name), DATA_DIR: os.tmpdir(), DSR_DIGEST_KEY: Buffer.alloc(32, 7).toString('base64'), DSR_ENCRYPTION_KEY: Buffer.alloc(32, 8).toString('base64') });
    for (let i = 0; i < 2; i++) {
      const out = await runCli(['migrate'], env);
      expect(out.stderr).toBe('');
      expect(out.code).toBe(0);
    }
    const db = postgres(withDatabase(adminUrl, name), { max: 1, onnotice: () => {} });
    const tables = await db<{ t: string }[]>`select table_name as t from information_schema.tables
      where table_schema = 'public' order by 1`;
    expect(tables.map((r) => r.t)).toEqual(expect.arrayContaining(['audit_records', 'dsr_requests', 'events', 'end_users']));
    const [gw] = await db`select count(*)::int as n from information_schema.tables where table_schema = 'graphile_worker'`;
    expect(gw!.n).toBeGreaterThan(0);
    await db.end();
    await admin.end();
  });

  it('rejects bad usage with exit code 2 and the usage text', async () => {
    const env = childEnv({ DATA_DIR: os.tmpdir() });
    const missing = await runCli(['workspaces', 'create'], env);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toContain('needs --name');
    const unknown = await runCli(['frobnicate'], env);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('Usage: dsr-connector');
  });
});
