import { spawn } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { ServerType } from '@hono/node-server';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  datagrailBody,
  datagrailWebhook,
  FAKE_DATAGRAIL_API_KEY,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, type OneTrustWebhookAuth } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend, type WebhookOptions } from '../../connectors/transcend/fake.ts';
import { listen } from '../../src/service.ts';
import { createTestEnv, readAnswer, testEnvVars, type TestEnv } from '../helpers/db.ts';
import { makeAuthStale, newAdmin } from '../helpers/sessions.ts';
import { freePort } from '../helpers/global-setup.ts';
import { ROOT, poll } from '../helpers/process.ts';

/**
 * The web role under workerd (`wrangler dev`, offline), against the test database; jobs run in Node with the same
 * keys, as in a deployment that scales web on Workers and the worker on Node. The Worker gets the environment the
 * Node app of the test env runs with (testEnvVars), and that app also listens on loopback, so a case can send the
 * same request to both and assert that they answer alike.
 */
let env: TestEnv;
let dir: string;
let base: string;
let nodeBase: string;
let nodeServer: ServerType;
let stop: () => void;
let output = '';
let relay: Relay;
let transcend: FakeTranscend;

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
  const listenOn = (port: number) => new Promise<void>((resolve) => server.listen(port, '127.0.0.1', resolve));
  await listenOn(0);
  const port = (server.address() as net.AddressInfo).port;
  return {
    port,
    down: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const s of sockets) s.destroy();
      }),
    up: () => listenOn(port),
  };
}

beforeAll(async () => {
  env = await createTestEnv();
  nodeServer = await listen(env.app, { port: 0, hostname: '127.0.0.1' });
  nodeBase = `http://127.0.0.1:${(nodeServer.address() as net.AddressInfo).port}`;
  transcend = await startFakeTranscend();
  dir = await mkdtemp(path.join(os.tmpdir(), 'dsr-wrangler-'));
  const envFile = path.join(dir, 'vars.env');
  const target = new URL(env.url);
  relay = await startRelay(target);
  const relayed = new URL(env.url);
  relayed.hostname = '127.0.0.1';
  relayed.port = String(relay.port);
  const vars = {
    ...testEnvVars(),
    DATABASE_URL: relayed.toString(),
    DSR_DIGEST_KEY: env.deps.digestKey.toString('base64'),
    DSR_ENCRYPTION_KEY: env.encryptionKey.toString('base64'),
    LOG_LEVEL: 'info',
  };
  await writeFile(envFile, Object.entries(vars).map(([k, v]) => `${k}=${v}\n`).join(''));
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
  await new Promise<void>((resolve) => (nodeServer ? nodeServer.close(() => resolve()) : resolve()));
  await transcend?.stop();
  await relay?.down();
  await env?.close();
  if (dir) await rm(dir, { recursive: true, force: true });
});

interface Answer {
  status: number;
  headers: Headers;
  text: string;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  json: any;
}

async function ask(to: string, route: string, init: RequestInit = {}): Promise<Answer> {
  return readAnswer(await fetch(`${to}${route}`, init));
}

/**
 * What must be the same on both runtimes: status, the headers a client acts on, and the body with the values that
 * differ by nature (request ids, ids minted per request, times) taken out. Framing headers (Content-Length on Node,
 * chunked on workerd) are the platforms' own business.
 */
function comparable(a: Answer) {
  const body = a.text
    .replace(/"requestId":"[^"]+"/g, '"requestId":"…"')
    .replace(/\b(tkt|req|ses|aud|adm)_[0-9a-z]+/g, '$1_…')
    .replace(/[\w.+-]+@[\w-]+(\.[\w-]+)+/g, '…@…')
    .replace(/"csrfToken":"[^"]+"/g, '"csrfToken":"…"')
    .replace(/\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z/g, '…');
  const headers: Record<string, string | null> = {};
  for (const name of ['content-type', 'retry-after', 'allow', 'cache-control']) headers[name] = a.headers.get(name);
  headers['x-request-id'] = a.headers.get('x-request-id') === null ? null : 'set';
  return { status: a.status, headers, body };
}

/** The same request to the Node app and to the Worker; `init` may be a function when a body can be sent only once. */
async function both(route: string, init: RequestInit | (() => RequestInit) = {}) {
  const make = () => (typeof init === 'function' ? init() : init);
  const node = await ask(nodeBase, route, make());
  const worker = await ask(base, route, make());
  return { node, worker };
}

async function expectSame(route: string, init: RequestInit | (() => RequestInit) = {}) {
  const { node, worker } = await both(route, init);
  expect(comparable(worker), route).toEqual(comparable(node));
  return { node, worker };
}

/** The attributes of a Set-Cookie header, with the cookie's value and expiry (different on every login) left out. */
function cookieAttributes(setCookie: string | null): string[] {
  return (setCookie ?? '')
    .split(';')
    .map((part) => part.trim())
    .map((part, i) => (i === 0 ? part.replace(/=.+$/, '=…') : /^expires=/i.test(part) ? 'Expires=…' : part))
    .sort();
}

/**
 * The Worker's own log lines as wrangler printed them (its request lines left out), each with the console method it
 * was written with: wrangler prints console.warn and console.error with a marker, as Workers Logs record their level.
 * Only what reaches the console at wrangler's `--log-level info` is here (console.log is below it).
 */
function workerLog(): { method: 'info' | 'warn' | 'error'; entry: Record<string, unknown> }[] {
  return output.split('\n').flatMap((line) => {
    const start = line.indexOf('{"');
    const end = line.lastIndexOf('}');
    if (start < 0 || end < start) return [];
    try {
      const entry = JSON.parse(line.slice(start, end + 1)) as Record<string, unknown>;
      // wrangler's marker ("▲ [WARNING]", "✘ [ERROR]", coloured) precedes the line.
      const marker = line.slice(0, start);
      const method = marker.includes('ERROR') ? 'error' : marker.includes('WARNING') ? 'warn' : 'info';
      return [{ method, entry } as const];
    } catch {
      return [];
    }
  });
}

const JSON_HEADERS = { 'content-type': 'application/json' };

async function createConnector(adminKey: string, body: unknown): Promise<string> {
  const res = await ask(nodeBase, '/v1/admin/connectors', {
    method: 'POST',
    headers: { authorization: `Bearer ${adminKey}`, ...JSON_HEADERS },
    body: JSON.stringify(body),
  });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

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

  it('answers the index, health, OpenAPI, docs, 404 and 405 as the Node app does', async () => {
    for (const route of ['/v1', '/healthz', '/docs', '/docs/init.js', '/docs/assets/swagger-ui.css', '/docs/assets/index.html', '/nope']) {
      await expectSame(route);
    }
    await expectSame('/healthz', { method: 'HEAD' });
    const { worker } = await expectSame('/healthz', { method: 'DELETE' });
    expect(worker.headers.get('allow')).toBe('GET, HEAD');
    await expectSame('/webhooks/transcend/con_nope');
    // The whole OpenAPI document, byte for byte: the same routes and schemas are registered on both.
    const { node: doc, worker: workerDoc } = await both('/openapi.json');
    expect(workerDoc.status).toBe(200);
    expect(workerDoc.text).toBe(doc.text);
  });

  it('refuses bodies as Node does: over the limit (declared or streamed), not JSON, malformed, unstorable', async () => {
    const ws = await env.newWorkspace();
    const headers = { authorization: `Bearer ${ws.ingestKey}`, ...JSON_HEADERS };
    const event = (extra: Record<string, unknown> = {}) => JSON.stringify({ userId: `wk-${randomBytes(3).toString('hex')}`, event: 'e', ...extra });
    const big = event({ properties: { padding: 'x'.repeat(70 * 1024) } });
    const streamed = (text: string) =>
      new ReadableStream<Uint8Array>({
        start(c) {
          c.enqueue(new TextEncoder().encode(text));
          c.close();
        },
      });
    const post = (body: string, over: Record<string, string> = {}) => ({ method: 'POST', headers: { ...headers, ...over }, body });
    // Each streamed body on a connection of its own: a server that answers before reading a body to its end leaves
    // the rest of it on the connection, where the client's next request would queue behind it.
    const chunked = (body: string, over: Record<string, string> = {}) => () =>
      ({ method: 'POST', headers: { ...headers, ...over, connection: 'close' }, body: streamed(body), duplex: 'half' }) as RequestInit;

    expect((await expectSame('/v1/track', post(big))).worker.json.error.code).toBe('payload_too_large');
    expect((await expectSame('/v1/track', post(event(), { 'content-type': 'text/plain' }))).worker.status).toBe(415);
    expect((await expectSame('/v1/track', chunked(event(), { 'content-type': 'text/plain' }))).worker.status).toBe(415);
    expect((await expectSame('/v1/track', post('{'))).worker.json.error.code).toBe('malformed_json');
    expect((await expectSame('/v1/track', post(JSON.stringify({ userId: 'a\u0000b', event: 'e' })))).worker.status).toBe(400);
    expect((await expectSame('/v1/track', chunked(event()))).worker.json).toMatchObject({ stored: true });
    expect((await expectSame('/v1/track', chunked(big))).worker.json.error.code).toBe('payload_too_large');
    // wrangler dev's local proxy (not the Worker: it answered the 413 above) loses the next request on its
    // connection to workerd after an answer sent before a streamed body was read to its end: a POST gets its own
    // 503 "Your worker restarted mid-request" at once (a GET would hang, retried). Spend that on a throwaway POST.
    const spent = await fetch(`${base}/healthz`, { method: 'POST', signal: AbortSignal.timeout(10_000) });
    expect([405, 503]).toContain(spent.status);
    expect((await fetch(`${base}/healthz`)).status).toBe(200);
  }, 60_000);

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

  it('runs a dashboard session as Node does: cookie attributes, CSRF, recent authentication, logout, rate limit', async () => {
    const ws = await env.newWorkspace();
    const sessions: Record<'node' | 'worker', { cookie: string; csrf: string; sessionId: string; setCookie: string | null }> = {} as never;
    const admins = { node: await newAdmin(env, ws.workspaceId), worker: await newAdmin(env, ws.workspaceId) };
    for (const [side, to] of [['node', nodeBase], ['worker', base]] as const) {
      const res = await ask(to, '/v1/auth/login', {
        method: 'POST',
        headers: JSON_HEADERS,
        body: JSON.stringify({ workspaceId: ws.workspaceId, email: admins[side].email, password: admins[side].password }),
      });
      expect(res.status, res.text).toBe(200);
      const setCookie = res.headers.get('set-cookie');
      sessions[side] = { cookie: /^(dsr_session=[^;]+)/.exec(setCookie ?? '')![1]!, csrf: res.json.csrfToken, sessionId: res.json.sessionId, setCookie };
    }
    // PUBLIC_BASE_URL is https in both environments: Secure, HttpOnly, SameSite=Strict, Path=/ on both.
    expect(cookieAttributes(sessions.worker.setCookie)).toEqual(cookieAttributes(sessions.node.setCookie));
    expect(sessions.worker.setCookie).toMatch(/; Secure/);

    /** One request per runtime, each with its own session (and body: the same request twice would be a duplicate). */
    const each = async (method: string, route: string, opts: { body?: (side: string) => unknown; csrf?: boolean } = {}) => {
      const out: Partial<Record<'node' | 'worker', Answer>> = {};
      for (const [side, to] of [['node', nodeBase], ['worker', base]] as const) {
        const s = sessions[side];
        out[side] = await ask(to, route, {
          method,
          headers: { cookie: s.cookie, ...(opts.csrf === false ? {} : { 'x-csrf-token': s.csrf }), ...(opts.body ? JSON_HEADERS : {}) },
          body: opts.body === undefined ? undefined : JSON.stringify(opts.body(side)),
        });
      }
      expect(comparable(out.worker!), `${method} ${route}`).toEqual(comparable(out.node!));
      return out as Record<'node' | 'worker', Answer>;
    };
    const tag = randomBytes(3).toString('hex');
    const hold = (action: string) => (side: string) => ({ action, email: `held-${tag}-${side}@example.test` });
    expect((await each('GET', '/v1/auth/session')).worker.status).toBe(200);
    expect((await each('POST', '/v1/privacy/requests', { body: hold('hold'), csrf: false })).worker.json.error.code).toBe('csrf_failed');
    // Placing a hold needs no recent authentication; releasing one does.
    for (const s of Object.values(sessions)) await makeAuthStale(env, s.sessionId);
    const held = await each('POST', '/v1/privacy/requests', { body: hold('hold') });
    expect(held.worker.json.results[0]).toMatchObject({ accepted: true });
    expect((await each('POST', '/v1/privacy/requests', { body: hold('release_hold') })).worker.json.error.code).toBe('reauth_required');
    for (const side of ['node', 'worker'] as const) {
      const to = side === 'node' ? nodeBase : base;
      const s = sessions[side];
      const res = await ask(to, '/v1/auth/reauth', {
        method: 'POST',
        headers: { cookie: s.cookie, 'x-csrf-token': s.csrf, ...JSON_HEADERS },
        body: JSON.stringify({ password: admins[side].password }),
      });
      expect(res.status, `${side} ${res.text}`).toBe(200);
    }
    const released = await each('POST', '/v1/privacy/requests', { body: hold('release_hold') });
    expect(released.worker.json.results[0]).toMatchObject({ accepted: true });
    const out = await each('POST', '/v1/auth/logout');
    expect(out.worker.status).toBe(204);
    expect(cookieAttributes(out.worker.headers.get('set-cookie'))).toEqual(cookieAttributes(out.node.headers.get('set-cookie')));
    const after = await each('GET', '/v1/auth/session');
    expect(after.worker.json.error.code).toBe('unauthorized');

    // Five wrong passwords per account (LOGIN_MAX_ATTEMPTS_PER_ACCOUNT), then 429 with Retry-After on both.
    for (let i = 0; i < 6; i++) {
      const statuses: Record<string, number> = {};
      for (const [side, to] of [['node', nodeBase], ['worker', base]] as const) {
        const res = await ask(to, '/v1/auth/login', {
          method: 'POST',
          headers: JSON_HEADERS,
          body: JSON.stringify({ workspaceId: ws.workspaceId, email: admins[side].email, password: 'not-the-password' }),
        });
        statuses[side] = res.status;
        if (res.status === 429) expect(Number(res.headers.get('retry-after'))).toBeGreaterThan(0);
      }
      expect(statuses.worker, `attempt ${i + 1}`).toBe(statuses.node);
    }
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

  it('verifies Transcend tokens as Node does, fetching the signing key from Sombra through the platform fetch', async () => {
    const ws = await env.newWorkspace();
    const id = await createConnector(ws.adminKey, { vendor: 'transcend', name: 'Transcend', config: transcend.config(), secrets: transcend.secrets });
    const cases: [string, WebhookOptions][] = [
      ['valid', {}],
      ['another key', { sign: 'wrong-key' }],
      ['HS256 with the public key', { sign: 'hs256' }],
      ['alg none', { sign: 'none' }],
      ['expired', { expiresIn: -120 }],
      ['another audience', { audience: 'someone-else' }],
      ['no token', { token: null }],
    ];
    for (const [label, opts] of cases) {
      // A fresh webhook for each side: a token or nonce used once is a replay the second time.
      const hooks = [await transcend.webhook(opts), await transcend.webhook(opts)];
      const { node, worker } = await both(`/webhooks/transcend/${id}`, () => {
        const w = hooks.shift()!;
        return { method: 'POST', headers: w.headers, body: w.body };
      });
      expect(comparable(worker), label).toEqual(comparable(node));
    }
    // The test check fetches the key too.
    const tested = await expectSame(`/v1/admin/connectors/${id}/test`, { method: 'POST', headers: { authorization: `Bearer ${ws.adminKey}` } });
    expect(tested.worker.json.ok).toBe(true);

    // Sombra unreachable: 503 with Retry-After on both (the Worker's message cannot name the socket error: the
    // platform's fetch does not give one).
    const down = await createConnector(ws.adminKey, { vendor: 'transcend', name: 'Down', config: transcend.config({ sombraUrl: 'http://127.0.0.1:9' }), secrets: transcend.secrets });
    const hooks = [await transcend.webhook(), await transcend.webhook()];
    const { node, worker } = await both(`/webhooks/transcend/${down}`, () => {
      const w = hooks.shift()!;
      return { method: 'POST', headers: w.headers, body: w.body };
    });
    expect({ status: worker.status, code: worker.json.error.code, retryAfter: worker.headers.get('retry-after') }).toEqual({
      status: node.status,
      code: node.json.error.code,
      retryAfter: node.headers.get('retry-after'),
    });
    expect(worker.status).toBe(503);

    // Sombra answering more than OUTBOUND_MAX_RESPONSE_BYTES, with no length declared: cut off while streaming.
    transcend.fake.on('GET /huge/public-keys/sombra-general-signing-key', {
      status: 200,
      body: 'x'.repeat(1100 * 1024),
      headers: { 'content-type': 'text/plain', 'transfer-encoding': 'chunked' },
    });
    const huge = await createConnector(ws.adminKey, { vendor: 'transcend', name: 'Huge', config: transcend.config({ sombraUrl: `${transcend.url}/huge` }), secrets: transcend.secrets });
    const hugeHooks = [await transcend.webhook(), await transcend.webhook()];
    const capped = await expectSame(`/webhooks/transcend/${huge}`, () => {
      const w = hugeHooks.shift()!;
      return { method: 'POST', headers: w.headers, body: w.body };
    });
    expect(capped.worker.json.error.message).toMatch(/exceeds \d+ bytes/);
  });

  it('places a legal hold from a Transcend webhook on workerd; Node runs it and reports with the nonce sealed there', async () => {
    const ws = await env.newWorkspace();
    const id = await createConnector(ws.adminKey, { vendor: 'transcend', name: 'Transcend', config: transcend.config(), secrets: transcend.secrets });
    const email = `hold-${randomBytes(3).toString('hex')}@example.test`;
    const w = await transcend.webhook({ type: 'PLACE_ON_LEGAL_HOLD', profile: { identifier: email, type: 'email' } });
    const res = await ask(base, `/webhooks/transcend/${id}`, { method: 'POST', headers: w.headers, body: w.body });
    expect(res.status, res.text).toBe(200);
    const { requestId } = res.json.received[0] as { requestId: string };
    await env.runJobs();
    await env.runJobs();
    const request = await ask(base, `/v1/privacy/requests/${requestId}`, { headers: { authorization: `Bearer ${ws.privacyKey}` } });
    expect(request.json).toMatchObject({ status: 'complete', outcome: 'held', upstreamStatus: 'delivered' });
    const [holds] = await env.sql`select count(*)::int as n from legal_holds where workspace_id = ${ws.workspaceId}`;
    expect(holds!.n).toBe(1);
    const nonce = w.headers['x-transcend-nonce']!;
    expect(transcend.reports.filter((r) => r.nonce === nonce).map((r) => r.answered)).toEqual([200]);
  });

  it('verifies OneTrust webhooks (bearer, API-key header, Basic) as Node does', async () => {
    const ws = await env.newWorkspace();
    const kinds: [Record<string, unknown>, (secret: string) => OneTrustWebhookAuth][] = [
      [{ type: 'bearer' }, (secret) => ({ type: 'bearer', secret })],
      [{ type: 'api_key', header: 'x-onetrust-key' }, (secret) => ({ type: 'api_key', header: 'x-onetrust-key', secret })],
      [{ type: 'basic', username: 'onetrust' }, (secret) => ({ type: 'basic', username: 'onetrust', password: secret })],
    ];
    for (const [inboundAuth, auth] of kinds) {
      const id = await createConnector(ws.adminKey, {
        vendor: 'onetrust',
        name: `OneTrust ${String(inboundAuth.type)}`,
        config: { baseUrl: 'http://127.0.0.1:9', inboundAuth },
        secrets: { clientId: 'client', clientSecret: 'client-secret', inboundSecret: 'the-inbound-secret' },
      });
      for (const secret of ['the-inbound-secret', 'not-the-secret']) {
        const { node, worker } = await both(`/webhooks/onetrust/${id}`, () => {
          const w = onetrustWebhook({ auth: auth(secret), body: { subTaskId: randomUUID() } });
          return { method: 'POST', headers: w.headers, body: w.rawBody };
        });
        expect(comparable(worker), `${String(inboundAuth.type)} ${secret}`).toEqual(comparable(node));
        expect(worker.status).toBe(secret === 'the-inbound-secret' ? 200 : 401);
      }
    }
  });

  it('keeps a replaced inbound secret valid for its grace period on workerd, and ends it on DELETE …/secrets/previous', async () => {
    const ws = await env.newWorkspace();
    const admin = { authorization: `Bearer ${ws.adminKey}`, ...JSON_HEADERS };
    const send = (to: string, id: string, secret: string) => {
      const w = datagrailWebhook({ secret, body: datagrailBody({ webhook_request_id: randomUUID(), callback_url: 'http://127.0.0.1:9/callback' }) });
      return ask(to, `/webhooks/datagrail/${id}`, { method: 'POST', headers: w.headers, body: w.rawBody });
    };
    const seen: Record<string, number[]> = {};
    for (const [side, to] of [['node', nodeBase], ['worker', base]] as const) {
      const id = await createConnector(ws.adminKey, {
        vendor: 'datagrail',
        name: `DataGrail ${side}`,
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: 'old-secret', apiKey: FAKE_DATAGRAIL_API_KEY },
      });
      const put = await ask(to, `/v1/admin/connectors/${id}/secrets`, {
        method: 'PUT',
        headers: admin,
        body: JSON.stringify({ secrets: { webhookSecret: 'new-secret', apiKey: FAKE_DATAGRAIL_API_KEY }, keepPreviousForSeconds: 3600 }),
      });
      expect(put.status, put.text).toBe(200);
      expect(put.json.secrets.webhookSecret.previous.expiresAt).toEqual(expect.any(String));
      const statuses = [(await send(to, id, 'old-secret')).status, (await send(to, id, 'new-secret')).status];
      if (side === 'worker') {
        // The admin's sign that the vendor still signs with the old secret: names, never a value.
        const line = await poll(async () => workerLog().find((l) => l.entry.msg === 'webhook verified with a previous inbound secret' && l.entry.connectorId === id), 10_000);
        expect(line.entry).toMatchObject({ secretNames: ['webhookSecret'], previousUntil: put.json.secrets.webhookSecret.previous.expiresAt });
        expect(JSON.stringify(line)).not.toContain('old-secret');
      }
      const ended = await ask(to, `/v1/admin/connectors/${id}/secrets/previous`, { method: 'DELETE', headers: { authorization: admin.authorization } });
      expect(ended.status, ended.text).toBe(200);
      expect(ended.json.secrets.webhookSecret.previous).toBeUndefined();
      statuses.push((await send(to, id, 'old-secret')).status, (await send(to, id, 'new-secret')).status);
      seen[side] = statuses;
    }
    expect(seen.worker).toEqual(seen.node);
    expect(seen.worker).toEqual([200, 200, 401, 200]);
  });

  it('shows a pull connector and its poll status exactly as Node does', async () => {
    const ws = await env.newWorkspace();
    const id = await createConnector(ws.adminKey, {
      vendor: 'transcend',
      name: 'Transcend pull',
      config: transcend.config({ pull: { enabled: true, dataSiloId: 'silo-workers' } }),
      secrets: transcend.secrets,
    });
    await env.sql`update connectors set last_polled_at = now() - interval '3 minutes' where id = ${id}`;
    await env.sql`
      insert into connector_poll_status
        (connector_id, last_started_at, last_succeeded_at, last_failed_at, last_error_code, last_error_message, consecutive_failures)
      values (${id}, now() - interval '3 minutes', now() - interval '1 hour', now() - interval '3 minutes',
              'upstream_http_error', 'pending requests: HTTP 500', 2)`;
    const headers = { authorization: `Bearer ${ws.adminKey}` };
    const { node, worker } = await both(`/v1/admin/connectors/${id}`, { headers });
    expect(worker.status).toBe(200);
    expect(worker.text).toBe(node.text);
    expect(worker.json.pollStatus).toMatchObject({ consecutiveFailures: 2, nextPollDueAt: expect.any(String) });
    const lists = await both('/v1/admin/connectors', { headers });
    expect(lists.worker.text).toBe(lists.node.text);
  });

  it('logs what the Node app logs, at the same level and with the same fields, and no personal data', async () => {
    const ws = await env.newWorkspace();
    const canary = `canary-${randomBytes(4).toString('hex')}`;
    const id = await createConnector(ws.adminKey, {
      vendor: 'onetrust',
      name: 'OneTrust logs',
      config: { baseUrl: 'http://127.0.0.1:9' },
      secrets: { clientId: 'client', clientSecret: 'client-secret', inboundSecret: 'the-inbound-secret' },
    });
    for (const secret of [`${canary}-secret`, 'the-inbound-secret']) {
      await both(`/webhooks/onetrust/${id}`, () => {
        const w = onetrustWebhook({ auth: { type: 'bearer', secret }, body: { subTaskId: randomUUID(), email: `${canary}@example.test` } });
        return { method: 'POST', headers: w.headers, body: w.rawBody };
      });
    }
    await both('/v1/auth/login', {
      method: 'POST',
      headers: JSON_HEADERS,
      body: JSON.stringify({ workspaceId: ws.workspaceId, email: `${canary}@example.test`, password: `${canary}-password` }),
    });
    const nodeLog = env.logs.lines.map((l) => JSON.parse(l) as Record<string, unknown>);
    const refusedOnNode = nodeLog.find((e) => e.msg === 'webhook refused' && e.connectorId === id);
    expect(refusedOnNode).toMatchObject({ level: 40, service: 'dsr-connector', code: 'unauthorized' });
    const refused = await poll(async () => workerLog().find((l) => l.entry.msg === 'webhook refused' && l.entry.connectorId === id), 10_000);
    expect(refused.method).toBe('warn');
    // Node's fields but the process's own (pid, hostname), in the same shape.
    const { pid: _pid, hostname: _hostname, ...nodeFields } = refusedOnNode!;
    expect(Object.keys(refused.entry).sort()).toEqual(Object.keys(nodeFields).sort());
    expect({ ...refused.entry, time: 0, requestId: '' }).toEqual({ ...nodeFields, time: 0, requestId: '' });
    const served = workerLog().find((l) => l.entry.msg === 'http request' && l.entry.route === '/webhooks/:vendor/:connectorId');
    expect(served).toMatchObject({ method: 'info', entry: { level: 30, service: 'dsr-connector' } });
    expect(JSON.stringify(workerLog())).not.toContain(canary);
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
