import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  datagrailBody,
  datagrailWebhook,
  FAKE_DATAGRAIL_API_KEY,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { createTestEnv, type TestEnv } from '../helpers/db.ts';
import { newAdmin } from '../helpers/sessions.ts';
import { freePort } from '../helpers/global-setup.ts';
import { ROOT, poll } from '../helpers/process.ts';

/**
 * The web role under workerd (`wrangler dev`, offline), against the test database; the job runs in Node with the
 * same digest key, as in a deployment that scales web on Workers and the worker on Node.
 */
let env: TestEnv;
let dir: string;
let base: string;
let stop: () => void;
let output = '';
let relay: Relay;

/**
 * A loopback TCP relay to the test database: the Worker connects through it, so a test can make the database
 * unreachable (nothing listening on its port) and bring it back on the same port.
 */
interface Relay {
  port: number;
  down(): Promise<void>;
  up(): Promise<void>;
}

async function startRelay(target: URL): Promise<Relay> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(target.port || 5432), target.hostname);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream).pipe(client);
  });
  const listen = (port: number) => new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  await listen(0);
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    down: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
    up: () => listen(port),
  };
}

beforeAll(async () => {
  env = await createTestEnv();
  dir = await mkdtemp(path.join(os.tmpdir(), 'dsr-wrangler-'));
  const envFile = path.join(dir, 'vars.env');
  const target = new URL(env.url);
  relay = await startRelay(target);
  const relayed = new URL(env.url);
  relayed.hostname = '127.0.0.1';
  relayed.port = String(relay.port);
  await writeFile(envFile, `DATABASE_URL=${relayed.toString()}\nDSR_DIGEST_KEY=${env.deps.digestKey.toString('base64')}\nDSR_ENCRYPTION_KEY=${env.encryptionKey.toString('base64')}\nLOG_LEVEL=warn\n`);
  // freePort only finds a port free now; another process (a test's outgoing connection, say) can take it before
  // wrangler binds it. Then start again on other ports, a few times.
  for (let attempt = 1; ; attempt++) {
    const started = await startWrangler(envFile);
    if (started === 'ready') break;
    if (started !== 'port-taken' || attempt === 3) throw new Error(`wrangler dev did not start: ${started}\n${output}`);
  }
}, 180_000);

/** Starts wrangler dev on fresh ports: 'ready', 'port-taken' (try again), or why it did not start. */
async function startWrangler(envFile: string): Promise<string> {
  const port = await freePort();
  let inspectorPort = await freePort();
  while (inspectorPort === port) inspectorPort = await freePort();
  output = '';
  const proc = spawn(
    process.execPath,
    [
      'node_modules/wrangler/bin/wrangler.js',
      'dev',
      '--ip', '127.0.0.1',
      '--port', String(port),
      '--inspector-port', String(inspectorPort),
      '--env-file', envFile,
      '--persist-to', path.join(dir, 'state'),
      '--show-interactive-dev-session=false',
      '--log-level', 'info',
    ],
    { cwd: ROOT, env: { ...process.env, WRANGLER_SEND_METRICS: 'false', CLOUDFLARE_CF_FETCH_ENABLED: 'false', CI: 'true' }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let exited = false;
  const gone = new Promise<void>((resolve) => proc.once('exit', () => { exited = true; resolve(); }));
  proc.stdout.on('data', (c: Buffer) => (output += c.toString()));
  proc.stderr.on('data', (c: Buffer) => (output += c.toString()));
  stop = () => proc.kill('SIGTERM');
  base = `http://127.0.0.1:${port}`;
  const portTaken = () => /Address already in use/i.test(output);
  try {
    await poll(async () => (/Ready on/.test(output) || portTaken() || exited ? true : undefined), 90_000);
  } catch (err) {
    return String(err);
  }
  if (/Ready on/.test(output) && !portTaken() && !exited) return 'ready';
  proc.kill('SIGTERM');
  const killed = setTimeout(() => proc.kill('SIGKILL'), 10_000);
  await gone;
  clearTimeout(killed);
  return portTaken() ? 'port-taken' : `exited early (${String(proc.exitCode)})`;
}

afterAll(async () => {
  stop?.();
  await relay?.down();
  await env?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('web role on Workers (wrangler dev)', () => {
  it('serves health, docs assets, ingest and the privacy API from workerd', async () => {
    expect(await (await fetch(`${base}/healthz`)).json()).toEqual({ status: 'ok', database: 'ok' });
    const css = await fetch(`${base}/docs/assets/swagger-ui.css`);
    expect(css.status).toBe(200);
    expect((await css.text()).length).toBeGreaterThan(1000);
    // Asset files are not served publicly at their own paths.
    expect((await fetch(`${base}/swagger-ui.css`)).status).toBe(404);

    const ws = await env.newWorkspace();
    const userId = `wk-${randomBytes(3).toString('hex')}`;
    const h = (key: string) => ({ authorization: `Bearer ${key}`, 'content-type': 'application/json' });
    const tracked = await fetch(`${base}/v1/track`, {
      method: 'POST',
      headers: h(ws.ingestKey),
      body: JSON.stringify({ userId, event: 'from_workers' }),
    });
    expect(await tracked.json()).toMatchObject({ stored: true });
    const bad = await fetch(`${base}/v1/track`, { method: 'POST', headers: h(ws.ingestKey), body: '{' });
    expect(bad.status).toBe(400);
    expect(((await bad.json()) as { error: { code: string } }).error.code).toBe('malformed_json');

    const created = await fetch(`${base}/v1/privacy/requests`, {
      method: 'POST',
      headers: h(ws.privacyKey),
      body: JSON.stringify({ action: 'erase', userId }),
    });
    expect(created.status).toBe(202);
    const { results } = (await created.json()) as { results: { requestId: string }[] };
    await env.runJobs();
    const done = await poll(async () => {
      const r = (await (await fetch(`${base}/v1/privacy/requests/${results[0]!.requestId}`, { headers: h(ws.privacyKey) })).json()) as {
        status: string;
        outcome: string;
      };
      return r.status === 'complete' ? r : undefined;
    });
    expect(done.outcome).toBe('erased');
    // The digest computed on Workers matches the one Node computes: lookups by user id work across runtimes.
    const listed = (await (await fetch(`${base}/v1/privacy/requests?userId=${userId}`, { headers: h(ws.privacyKey) })).json()) as {
      data: unknown[];
    };
    expect(listed.data).toHaveLength(1);
    const [events] = await env.sql`select count(*)::int as n from events where workspace_id = ${ws.workspaceId}`;
    expect(events!.n).toBe(0);
  });

  it('logs an admin in on workerd (scrypt, cookie, CSRF) and lets the session erase', async () => {
    const ws = await env.newWorkspace();
    const admin = await newAdmin(env, ws.workspaceId);
    const json = { 'content-type': 'application/json' };
    const wrong = await fetch(`${base}/v1/auth/login`, {
      method: 'POST',
      headers: json,
      body: JSON.stringify({ workspaceId: ws.workspaceId, email: admin.email, password: 'not-the-password' }),
    });
    expect(wrong.status).toBe(401);
    const res = await fetch(`${base}/v1/auth/login`, {
      method: 'POST',
      headers: { ...json, 'cf-connecting-ip': '203.0.113.7' },
      body: JSON.stringify({ workspaceId: ws.workspaceId, email: admin.email, password: admin.password }),
    });
    expect(res.status).toBe(200);
    const cookie = /^(dsr_session=[^;]+)/.exec(res.headers.get('set-cookie') ?? '')?.[1];
    expect(res.headers.get('set-cookie')).toMatch(/HttpOnly/i);
    const { csrfToken } = (await res.json()) as { csrfToken: string };
    const erase = (headers: Record<string, string>) =>
      fetch(`${base}/v1/privacy/requests`, {
        method: 'POST',
        headers: { ...json, cookie: cookie!, ...headers },
        body: JSON.stringify({ action: 'erase', userId: 'wk-session-user' }),
      });
    expect((await erase({})).status).toBe(403);
    const accepted = await erase({ 'x-csrf-token': csrfToken });
    expect(accepted.status).toBe(202);
    const [row] = await env.sql`select actor_type, actor_id, source from dsr_requests where workspace_id = ${ws.workspaceId}`;
    expect(row).toEqual({ actor_type: 'admin', actor_id: admin.adminId, source: 'dashboard' });
  });

  it('takes a signed vendor webhook on workerd; the ticket is reported from Node with the secret sealed on Workers', async () => {
    const ws = await env.newWorkspace();
    const dg = await startFakeDataGrail();
    try {
      const secret = 'workers-webhook-secret';
      const admin = { authorization: `Bearer ${ws.adminKey}`, 'content-type': 'application/json' };
      const created = await fetch(`${base}/v1/admin/connectors`, {
        method: 'POST',
        headers: admin,
        body: JSON.stringify({
          vendor: 'datagrail',
          name: 'DataGrail',
          config: { callbackHosts: ['127.0.0.1'] },
          secrets: { webhookSecret: secret, apiKey: FAKE_DATAGRAIL_API_KEY },
        }),
      });
      expect(created.status).toBe(201);
      const { id } = (await created.json()) as { id: string };
      const w = datagrailWebhook({ secret, body: datagrailBody({ callback_url: dg.callbackUrl() }) });
      const bad = await fetch(`${base}/webhooks/datagrail/${id}`, {
        method: 'POST',
        headers: { ...w.headers, 'x-webhook-signature': 'AAAA' },
        body: w.rawBody,
      });
      expect(bad.status).toBe(401);
      const res = await fetch(`${base}/webhooks/datagrail/${id}`, { method: 'POST', headers: w.headers, body: w.rawBody });
      expect(res.status).toBe(200);
      const { received } = (await res.json()) as { received: { requestId: string }[] };
      await env.runJobs();
      await env.runJobs();
      const [ticket] = await env.sql`select status from upstream_tickets where request_id = ${received[0]!.requestId}`;
      expect(ticket!.status).toBe('delivered');
      expect(dg.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE)).toHaveLength(1);
    } finally {
      await dg.fake.stop();
    }
  });

  it('answers 503 service_unavailable with Retry-After while the database is unreachable, as Node does', async () => {
    const ws = await env.newWorkspace();
    await relay.down();
    try {
      const health = await fetch(`${base}/healthz`);
      expect(health.status).toBe(503);
      const res = await fetch(`${base}/v1/track`, {
        method: 'POST',
        headers: { authorization: `Bearer ${ws.ingestKey}`, 'content-type': 'application/json' },
        body: JSON.stringify({ userId: 'wk-down', event: 'e' }),
      });
      const body = (await res.json()) as { error: { code: string } };
      expect({ status: res.status, code: body.error.code, retryAfter: res.headers.get('retry-after') }).toEqual({
        status: 503,
        code: 'service_unavailable',
        retryAfter: '5',
      });
    } finally {
      await relay.up();
    }
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
  });
});
