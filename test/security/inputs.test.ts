/**
 * Hostile input on every surface (privacy, ingest, admin, auth, each vendor webhook), over a real HTTP server on
 * loopback so Content-Length, headers and raw bytes are what a client would really send: oversized, deeply nested,
 * wrongly typed and malformed bodies, header injection, and SQL metacharacters in every identifier. Always a 4xx in
 * the standard error shape (or a lookup that finds nothing), never a 5xx, and nothing stored.
 */
import type { ServerType } from '@hono/node-server';
import { listen } from '../../src/service.ts';
import { randomUUID } from 'node:crypto';
import net, { type AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook, FAKE_DATAGRAIL_API_KEY } from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { encodeCursor } from '../../src/http/pagination.ts';
import { call, createTestEnv, expectError, request, type TestEnv } from '../helpers/db.ts';
import { seedUser } from '../helpers/factories.ts';
import { adminSession, type TestSession } from '../helpers/sessions.ts';
import { rowCounts, snapshot } from './db-state.ts';

const BODY_LIMIT = 64 * 1024;
const DG_SECRET = 'dg-inputs-webhook-secret';
const OT_INBOUND = 'ot-inputs-inbound-secret';
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Identifier values that would do damage if they reached SQL as text, a LIKE pattern or a path. */
const NASTY = [
  "' OR 1=1 --",
  '"; drop table dsr_requests; --',
  "x'); delete from audit_records; --",
  '%',
  '_',
  '\\',
  '../../etc/passwd',
  'ünïcødé ☃ 😀',
  '\u0000',
  'a\u0000b',
];
const hasNul = (v: string) => v.includes('\u0000');

let env: TestEnv;
let ws: CreatedWorkspace;
let session: TestSession;
let server: ServerType;
let base = '';
let transcend: FakeTranscend;
let onetrust: FakeOneTrust;
const connectors: Record<string, string> = {};
const known = { requestId: '', auditId: '', ticketlessUser: '' };

/** A request over the network, as a client would send it. */
const http = (method: string, path: string, opts: Parameters<typeof request>[3] = {}) =>
  request((p, init) => fetch(`${base}${p}`, init), method, path, opts);

/** Exactly these bytes on a fresh connection; what came back, as latin1 text. */
function rawRequest(bytes: string | Buffer): Promise<string> {
  const port = (server.address() as AddressInfo).port;
  return new Promise((resolve, reject) => {
    const sock = net.connect(port, '127.0.0.1', () => sock.write(bytes));
    let out = '';
    sock.on('data', (d: Buffer) => (out += d.toString('latin1')));
    sock.on('end', () => resolve(out));
    sock.on('error', reject);
    sock.setTimeout(5_000, () => {
      sock.destroy();
      reject(new Error(`no answer; got so far: ${out}`));
    });
  });
}

interface Surface {
  /** `METHOD /openapi/path`, as the OpenAPI document lists it. */
  route: string;
  path: () => string;
  /** A body the route accepts (before any hostile change). */
  valid: () => Record<string, unknown>;
  /** Credentials and vendor signature for these exact body bytes. */
  auth: (raw: string) => Promise<Record<string, string>>;
  /** Where a free-form value may go in the body (for the deep nesting case). */
  deepField?: (value: unknown) => Record<string, unknown>;
}

const bearer = (key: () => string) => async () => ({ authorization: `Bearer ${key()}` });
const viaSession = async () => ({ cookie: session.cookie, 'x-csrf-token': session.csrf });

const SURFACES: Surface[] = [
  {
    route: 'POST /v1/identify',
    path: () => '/v1/identify',
    valid: () => ({ userId: 'u-inputs', email: 'inputs@example.test' }),
    auth: bearer(() => ws.ingestKey),
    deepField: (v) => ({ userId: 'u-deep', traits: { deep: v } }),
  },
  {
    route: 'POST /v1/track',
    path: () => '/v1/track',
    valid: () => ({ userId: 'u-inputs', event: 'e' }),
    auth: bearer(() => ws.ingestKey),
    deepField: (v) => ({ userId: 'u-deep', event: 'e', properties: { deep: v } }),
  },
  {
    route: 'POST /v1/messages',
    path: () => '/v1/messages',
    valid: () => ({ userId: 'u-inputs', conversationId: 'c', role: 'user', content: 'hi' }),
    auth: bearer(() => ws.ingestKey),
    deepField: (v) => ({ userId: 'u-deep', conversationId: 'c', role: 'user', content: v }),
  },
  {
    route: 'POST /v1/topics/questions',
    path: () => '/v1/topics/questions',
    valid: () => ({ userId: 'u-inputs', question: 'q' }),
    auth: bearer(() => ws.ingestKey),
    deepField: (v) => ({ userId: 'u-deep', question: v }),
  },
  {
    route: 'POST /v1/batch',
    path: () => '/v1/batch',
    valid: () => ({ batch: [{ type: 'track', userId: 'u-inputs', event: 'e' }] }),
    auth: bearer(() => ws.ingestKey),
    deepField: (v) => ({ batch: [{ type: 'identify', userId: 'u-deep', traits: { deep: v } }] }),
  },
  {
    route: 'POST /v1/privacy/requests',
    path: () => '/v1/privacy/requests',
    valid: () => ({ action: 'suppress', userId: 'u-inputs' }),
    auth: bearer(() => ws.privacyKey),
    deepField: (v) => ({ requests: [v] }),
  },
  {
    route: 'POST /v1/auth/login',
    path: () => '/v1/auth/login',
    valid: () => ({ workspaceId: ws.workspaceId, email: 'nobody@example.test', password: 'wrong-password-123' }),
    auth: async () => ({}),
    deepField: (v) => ({ workspaceId: ws.workspaceId, email: v, password: 'x' }),
  },
  {
    route: 'POST /v1/auth/reauth',
    path: () => '/v1/auth/reauth',
    valid: () => ({ password: 'wrong-password-123' }),
    auth: viaSession,
    deepField: (v) => ({ password: v }),
  },
  {
    route: 'POST /v1/auth/password',
    path: () => '/v1/auth/password',
    valid: () => ({ newPassword: 'x' }),
    auth: viaSession,
    deepField: (v) => ({ newPassword: v }),
  },
  {
    route: 'POST /v1/admin/connectors',
    path: () => '/v1/admin/connectors',
    valid: () => ({ vendor: 'datagrail', name: 'x', config: {}, secrets: {} }),
    auth: bearer(() => ws.adminKey),
    deepField: (v) => ({ vendor: 'datagrail', name: 'deep', config: { deep: v }, secrets: { webhookSecret: v, apiKey: 'k' } }),
  },
  {
    route: 'PATCH /v1/admin/connectors/{id}',
    path: () => `/v1/admin/connectors/${connectors.datagrail}`,
    valid: () => ({ name: 'renamed' }),
    auth: bearer(() => ws.adminKey),
    deepField: (v) => ({ config: { deep: v } }),
  },
  {
    route: 'PUT /v1/admin/connectors/{id}/secrets',
    path: () => `/v1/admin/connectors/${connectors.datagrail}/secrets`,
    valid: () => ({ secrets: {} }),
    auth: bearer(() => ws.adminKey),
    deepField: (v) => ({ secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY, deep: v } }),
  },
  {
    route: 'POST /v1/admin/keys',
    path: () => '/v1/admin/keys',
    valid: () => ({ scope: 'nope' }),
    auth: viaSession,
    deepField: (v) => ({ scope: v }),
  },
  {
    route: 'POST /v1/admin/admins',
    path: () => '/v1/admin/admins',
    valid: () => ({ email: 'not-an-email', password: 'x' }),
    auth: bearer(() => ws.adminKey),
    deepField: (v) => ({ email: v, password: 'long-enough-password-1' }),
  },
  {
    route: 'POST /webhooks/transcend/{connectorId}',
    path: () => `/webhooks/transcend/${connectors.transcend}`,
    valid: () => ({ type: 'ACCESS', coreIdentifier: { value: '19530621' } }),
    // A fresh token per call: a token may only ever carry the first body it came with.
    auth: async () => {
      const { 'content-type': _t, ...headers } = (await transcend.webhook()).headers;
      return headers;
    },
    deepField: (v) => ({ type: 'ACCESS', coreIdentifier: { value: '19530621' }, extras: { deep: v } }),
  },
  {
    route: 'POST /webhooks/onetrust/{connectorId}',
    path: () => `/webhooks/onetrust/${connectors.onetrust}`,
    valid: () => ({ requestQueueRefId: 'REF', requestTypes: ['Access'], email: 'x@example.test' }),
    auth: async () => ({ authorization: onetrustWebhook({ auth: { type: 'bearer', secret: OT_INBOUND } }).headers.authorization! }),
    deepField: (v) => ({ requestQueueRefId: 'REF', requestTypes: ['Access'], email: 'x@example.test', deep: v }),
  },
  {
    route: 'POST /webhooks/datagrail/{connectorId}',
    path: () => `/webhooks/datagrail/${connectors.datagrail}`,
    valid: () => datagrailBody({ request_type: 'access' }),
    auth: async (raw) => {
      const { 'content-type': _t, ...headers } = datagrailWebhook({ secret: DG_SECRET, body: raw }).headers;
      return headers;
    },
    deepField: (v) => datagrailBody({ request_type: 'access', deep: v }),
  },
];

/** Sends these raw bytes to a surface with its credentials (and the given content type, JSON by default). */
async function send(s: Surface, raw: string, contentType = 'application/json') {
  return http(s.route.split(' ')[0]!, s.path(), { body: raw, headers: { 'content-type': contentType, ...(await s.auth(raw)) } });
}

/** Sends a body fetch encodes itself (a stream, a form, bytes), with the surface's credentials for `raw`. */
async function sendBody(s: Surface, body: NonNullable<RequestInit['body']>, raw: string, headers: Record<string, string> = {}) {
  const fetcher = (p: string, init: RequestInit) => fetch(`${base}${p}`, { ...init, body, duplex: 'half' } as RequestInit);
  return request(fetcher, s.route.split(' ')[0]!, s.path(), { headers: { ...(await s.auth(raw)), ...headers } });
}

const deepArray = (depth: number) => '['.repeat(depth) + ']'.repeat(depth);
/** JSON.stringify itself recurses: build the text by hand. */
const withDeep = (s: Surface, depth: number) => JSON.stringify(s.deepField!('__DEEP__')).replace('"__DEEP__"', deepArray(depth));

beforeAll(async () => {
  env = await createTestEnv({
    // Many deliberately wrong logins below: keep them from being throttled, which is tested elsewhere.
    env: { LOGIN_MAX_ATTEMPTS_PER_ACCOUNT: '1000', LOGIN_MAX_ATTEMPTS_PER_ADDRESS: '100000' },
  });
  ws = await env.newWorkspace('Inputs');
  session = await adminSession(env, ws.workspaceId);
  transcend = await startFakeTranscend();
  onetrust = await startFakeOneTrust({ clientId: 'ot', clientSecret: 'ot-secret' });
  for (const body of [
    { vendor: 'transcend', config: transcend.config(), secrets: transcend.secrets },
    { vendor: 'onetrust', config: { baseUrl: onetrust.url }, secrets: { clientId: 'ot', clientSecret: 'ot-secret', inboundSecret: OT_INBOUND } },
    { vendor: 'datagrail', config: { callbackHosts: ['127.0.0.1'] }, secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY } },
  ]) {
    const res = await call(env, 'POST', '/v1/admin/connectors', { key: ws.adminKey, body: { name: body.vendor, ...body } });
    expect(res.status, res.text).toBe(201);
    connectors[body.vendor] = res.json.id as string;
  }
  // Rows a wildcard or an injected OR would match, so "found nothing" means something.
  const user = await seedUser(env, ws.ingestKey);
  known.ticketlessUser = user.userId;
  const req = await call(env, 'POST', '/v1/privacy/requests', {
    key: ws.privacyKey,
    body: { action: 'suppress', userId: user.userId, externalRequestId: 'ext-known' },
  });
  known.requestId = req.json.results[0].requestId as string;
  await env.runJobs();
  const [row] = await env.sql<{ audit_record_id: string }[]>`select audit_record_id from dsr_requests where id = ${known.requestId}`;
  known.auditId = row!.audit_record_id;

  // The service's own listener, so parser-level refusals are answered the way production answers them.
  server = await listen(env.app, { port: 0, hostname: '127.0.0.1' });
  base = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  await Promise.all([transcend?.stop(), onetrust?.stop()]);
  await env?.close();
});

describe('bodies', () => {
  it('every route that takes a body is covered here', () => {
    const doc = env.app.getOpenAPI31Document({ openapi: '3.1.0', info: { title: 'dsr-connector', version: 'test' } });
    const withBody: string[] = [];
    for (const [path, item] of Object.entries(doc.paths ?? {})) {
      for (const [method, op] of Object.entries(item ?? {})) {
        if (op && typeof op === 'object' && 'requestBody' in op && op.requestBody) withBody.push(`${method.toUpperCase()} ${path}`);
      }
    }
    const covered = new Set(SURFACES.map((s) => s.route.replace(/\/webhooks\/\w+\//, '/webhooks/{vendor}/')));
    expect(withBody.length).toBeGreaterThan(10);
    expect([...covered].sort()).toEqual([...new Set(withBody)].sort());
  });

  it(`a body over BODY_LIMIT_BYTES (${BODY_LIMIT}) → 413 payload_too_large, nothing stored`, async () => {
    const before = await snapshot(env);
    for (const s of SURFACES) {
      const raw = JSON.stringify({ ...s.valid(), padding: 'x'.repeat(BODY_LIMIT + 1024) });
      expectError(await send(s, raw), 413, 'payload_too_large');
      // Without a Content-Length (chunked), the limit still holds while streaming.
      const chunked = await sendBody(s, new Blob([raw]).stream(), raw, { 'content-type': 'application/json' });
      expectError(chunked, 413, 'payload_too_large');
    }
    expect(await snapshot(env)).toEqual(before);
  });

  it('malformed JSON (correctly authenticated) → 400 malformed_json, nothing stored', async () => {
    const before = await snapshot(env);
    for (const s of SURFACES) {
      for (const raw of ['{"userId": ', '{userId: 1}', "{'a': 1}", '{"a":1}}', '\u0000', '']) {
        const res = await send(s, raw);
        if (raw === '') {
          // An empty body is not malformed JSON but a missing one.
          expect(res.status, `${s.route} empty: ${res.text}`).toBeGreaterThanOrEqual(400);
          expect(res.status, `${s.route} empty: ${res.text}`).toBeLessThan(500);
          continue;
        }
        const err = expectError(res, 400, 'malformed_json');
        expect(err.message, s.route).not.toContain(raw);
      }
    }
    expect(await snapshot(env)).toEqual(before);
  });

  it('text/plain, form-urlencoded, multipart, look-alikes and no content type → 415 unsupported_media_type, nothing stored', async () => {
    const before = await snapshot(env);
    for (const s of SURFACES) {
      const raw = JSON.stringify(s.valid());
      for (const type of ['text/plain', 'application/x-www-form-urlencoded', 'multipart/form-data; boundary=x', 'application/jsonx', 'text/json']) {
        expectError(await send(s, raw, type), 415, 'unsupported_media_type');
      }
      expectError(await sendBody(s, new URLSearchParams({ a: 'b' }), 'a=b'), 415, 'unsupported_media_type');
      const multipart = new FormData();
      multipart.set('json', raw);
      expectError(await sendBody(s, multipart, raw), 415, 'unsupported_media_type');
      // Bytes with no Content-Type header at all.
      expectError(await sendBody(s, new TextEncoder().encode(raw), raw), 415, 'unsupported_media_type');
    }
    expect(await snapshot(env)).toEqual(before);
  });

  // The store validates with strict schemas (src/upstream/store.ts), as every other admin and auth body is strict; the
  // route schemas in src/http/admin.ts are not, so unknown fields are stripped before the store can refuse them.
  it('an unknown field in a connector create → 400 naming it, not silently dropped', async () => {
    const before = await rowCounts(env);
    const create = await http('POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: {
        vendor: 'datagrail',
        name: 'typo',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: 's', apiKey: 'k' },
        enabeld: false,
      },
    });
    expect(JSON.stringify(expectError(create, 400, 'validation_failed').details)).toContain('enabeld');
    expect((await rowCounts(env)).connectors).toBe(before.connectors);
  });

  it('an unknown field in a connector patch (e.g. secrets) → 400 naming it, not silently dropped', async () => {
    const [row] = await env.sql`select enabled, name, secrets_sealed from connectors where id = ${connectors.onetrust!}`;
    const patch = await http('PATCH', `/v1/admin/connectors/${connectors.onetrust}`, {
      key: ws.adminKey,
      body: { name: 'renamed by a patch with secrets', secrets: { inboundSecret: 'attempted-rotation' } },
    });
    expect(JSON.stringify(expectError(patch, 400, 'validation_failed').details)).toContain('secrets');
    expect((await env.sql`select enabled, name, secrets_sealed from connectors where id = ${connectors.onetrust!}`)[0]).toEqual(row);
  });

  it('an unknown field on an ingest route (a typo, or another route\'s field) → 400 naming it, nothing stored', async () => {
    const before = await snapshot(env);
    for (const [path, body, detail] of [
      ['/v1/track', { userId: 'u-typo', event: 'e', props: { plan: 'pro' } }, { path: '(body)', message: 'Unrecognized key: "props"' }],
      ['/v1/identify', { userId: 'u-typo', name: 'Ada', trait: { plan: 'pro' } }, { path: '(body)', message: 'Unrecognized key: "trait"' }],
      ['/v1/messages', { userId: 'u-typo', conversationId: 'c', role: 'user', content: 'hi', conversation: 'c2' }, { path: '(body)', message: 'Unrecognized key: "conversation"' }],
      ['/v1/topics/questions', { userId: 'u-typo', question: 'q', email: 'x@example.test' }, { path: '(body)', message: 'Unrecognized key: "email"' }],
      ['/v1/batch', { batch: [{ type: 'track', userId: 'u-typo', event: 'e', traits: { plan: 'pro' } }] }, { path: 'batch[0]', message: 'Unrecognized key: "traits"' }],
      ['/v1/batch', { batch: [{ type: 'track', userId: 'u-typo', event: 'e' }], items: [] }, { path: '(body)', message: 'Unrecognized key: "items"' }],
    ] as const) {
      const err = expectError(await http('POST', path, { key: ws.ingestKey, body }), 400, 'validation_failed');
      expect(err.details, path).toEqual([detail]);
    }
    expect(await snapshot(env)).toEqual(before);
  });

  it('an unknown key or a map key that is a value (an email) is not repeated in the error; a field-name typo still is', async () => {
    const email = `key-canary-${randomUUID()}@example.test`;
    const request = await http('POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { action: 'erase', userId: 'u-keys', [email]: true, externalRequestid: 'typo' },
    });
    const requestError = expectError(request, 400, 'validation_failed');
    expect(request.text).not.toContain('key-canary');
    expect(JSON.stringify(requestError.details)).toContain('externalRequestid');
    expect(JSON.stringify(requestError.details)).toContain('1 key not shown');

    const mapped = await http('POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: { vendor: 'transcend', name: 'keys', config: { sombraUrl: 'https://sombra.example', audience: 'a', identifierTypes: { [email]: 'phone' } }, secrets: { apiKey: 'k' } },
    });
    const mappedError = expectError(mapped, 400, 'validation_failed');
    expect(mapped.text).not.toContain('key-canary');
    expect(mappedError.details).toContainEqual(expect.objectContaining({ path: 'config.identifierTypes[key]' }));
  });

  it('the webhook route documents the 415 it answers to a non-JSON body', () => {
    const doc = env.app.getOpenAPI31Document({ openapi: '3.1.0', info: { title: 'dsr-connector', version: 'test' } });
    const responses = doc.paths?.['/webhooks/{vendor}/{connectorId}']?.post?.responses ?? {};
    expect(Object.keys(responses)).toContain('413');
    expect(Object.keys(responses)).toContain('415');
  });

  it('a 10 000-level nested body → 4xx in the standard shape, nothing stored', async () => {
    const before = await snapshot(env);
    for (const s of SURFACES) {
      const res = await send(s, deepArray(10_000));
      expect(res.status, `${s.route}: ${res.text}`).toBeGreaterThanOrEqual(400);
      expectError(res, res.status, res.json?.error?.code);
      expect(res.status, `${s.route}: ${res.text}`).toBeLessThan(500);
    }
    expect(await snapshot(env)).toEqual(before);
  });

  it.each([2_000, 10_000])('a %i-level nested value inside a free-form field → never 5xx', async (depth) => {
    const counts = await rowCounts(env);
    const failures: string[] = [];
    for (const s of SURFACES) {
      const res = await send(s, withDeep(s, depth));
      if (res.status >= 500) failures.push(`${s.route} → ${res.status} ${res.text}`);
      else if (res.status >= 400) expectError(res, res.status, res.json.error.code);
    }
    expect(failures).toEqual([]);
    // Nothing that names a request or a connector took the deep value.
    const after = await rowCounts(env);
    expect(after.dsr_requests).toBe(counts.dsr_requests);
    expect(after.connectors).toBe(counts.connectors);
  });
});

describe('headers', () => {
  const errorRoute = () => http('GET', '/v1/privacy/requests/req_doesnotexist', { key: ws.privacyKey });

  it('a sane X-Request-Id is echoed; anything long, odd or hostile is replaced by a fresh UUID', async () => {
    const echoed = await http('GET', '/v1/privacy/requests/req_doesnotexist', {
      key: ws.privacyKey,
      headers: { 'x-request-id': 'client-id_123=' },
    });
    expect(expectError(echoed, 404, 'not_found').requestId).toBe('client-id_123=');
    for (const value of [
      'x'.repeat(101),
      'x'.repeat(8_000),
      'a b',
      '<script>alert(1)</script>',
      "'; drop table dsr_requests; --",
      'caf\u00e9',
      '{"json":true}',
      '${jndi:ldap://x}',
    ]) {
      const res = await http('GET', '/v1/privacy/requests/req_doesnotexist', { key: ws.privacyKey, headers: { 'x-request-id': value } });
      const err = expectError(res, 404, 'not_found');
      expect(err.requestId, value).toMatch(UUID);
      expect(res.text).not.toContain(value.slice(0, 20));
    }
    expectError(await errorRoute(), 404, 'not_found');
    expect(env.logs.text()).not.toContain('<script>');
  });

  it('CR, LF and NUL in header values, and an oversized header, are refused at the HTTP layer; nothing injected, server fine', async () => {
    const before = await snapshot(env);
    const head = (extra: string) =>
      `GET /v1/privacy/requests HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer ${ws.privacyKey}\r\n${extra}\r\n\r\n`;
    for (const [name, line] of [
      ['bare CR in X-Request-Id', 'X-Request-Id: abc\rX-Injected: 1'],
      ['bare LF in X-Request-Id', 'X-Request-Id: abc\nX-Injected: 1'],
      ['NUL in X-Request-Id', 'X-Request-Id: abc\u0000def'],
      ['NUL in a header', 'X-Anything: a\u0000b'],
      ['huge X-Request-Id', `X-Request-Id: ${'x'.repeat(70_000)}`],
    ] as const) {
      const answer = await rawRequest(Buffer.from(head(line), 'latin1'));
      // Node's parser refuses these before the app; the listener still answers in the standard error shape.
      expect(answer, name).toMatch(/^HTTP\/1\.1 4(00|31) /);
      const [rawHead, rawBody] = answer.split('\r\n\r\n');
      expect(rawHead, name).toMatch(/content-type: application\/json/i);
      const parsed = JSON.parse(rawBody!) as { error: { code: string; message: string; requestId: string } };
      expect(parsed.error.code, name).toBe(answer.startsWith('HTTP/1.1 431') ? 'headers_too_large' : 'bad_request');
      expect(parsed.error.requestId, name).toMatch(UUID);
      expect(rawHead!.toLowerCase(), name).toContain(`x-request-id: ${parsed.error.requestId}`);
      expect(answer.toLowerCase(), name).not.toContain('x-injected');
      expect(answer, name).not.toContain('"data"');
    }
    // A full CRLF makes two honest headers; neither comes back as a response header.
    const split = await rawRequest(head('X-Request-Id: abc\r\nX-Injected: 1'));
    expect(split).toMatch(/^HTTP\/1\.1 200 /);
    expect(split.toLowerCase()).not.toContain('x-injected');
    expect(split.toLowerCase()).toContain('x-request-id: abc\r\n');
    // UTF-8 bytes in a header reach the app and are replaced, not echoed.
    const utf8 = await rawRequest(Buffer.from(head('X-Request-Id: ünï😀'), 'utf8'));
    expect(utf8).toMatch(/^HTTP\/1\.1 200 /);
    expect(/x-request-id: ([^\r]*)\r\n/i.exec(utf8)?.[1]).toMatch(UUID);
    // An Authorization header with a NUL never authenticates anything.
    const nulKey = await rawRequest(
      Buffer.from(`GET /v1/privacy/requests HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer ${ws.privacyKey}\u0000\r\n\r\n`, 'latin1'),
    );
    expect(nulKey).toMatch(/^HTTP\/1\.1 4\d\d /);
    expect((await http('GET', '/healthz')).status).toBe(200);
    expect(await snapshot(env)).toEqual(before);
  });
});

describe('SQL metacharacters in identifiers', () => {
  it('in every path id → 404 not_found (400 validation_failed for a NUL), never 5xx, nothing changed', async () => {
    const before = await snapshot(env);
    const doc = env.app.getOpenAPI31Document({ openapi: '3.1.0', info: { title: 'dsr-connector', version: 'test' } });
    const idRoutes: [string, string][] = [];
    for (const [path, item] of Object.entries(doc.paths ?? {})) {
      for (const method of Object.keys(item ?? {})) {
        if (path.includes('{id}') && ['get', 'post', 'put', 'patch', 'delete'].includes(method)) idRoutes.push([method.toUpperCase(), path]);
      }
    }
    expect(idRoutes.length).toBeGreaterThan(12);
    const bodies: Record<string, unknown> = {
      'PATCH /v1/admin/connectors/{id}': { name: 'x' },
      'PUT /v1/admin/connectors/{id}/secrets': { secrets: { apiKey: 'x' } },
    };
    for (const [method, template] of idRoutes) {
      const key = template.startsWith('/v1/admin') ? ws.adminKey : ws.privacyKey;
      for (const value of [...NASTY, 'req_' + 'a'.repeat(25), "req_' OR '1'='1"]) {
        const path = template.replace('{id}', encodeURIComponent(value));
        const res = await http(method, path, { key, body: bodies[`${method} ${template}`] });
        if (hasNul(value)) {
          expect([400, 404], `${method} ${path}: ${res.text}`).toContain(res.status);
          expectError(res, res.status, res.status === 400 ? 'validation_failed' : 'not_found');
        } else {
          expectError(res, 404, 'not_found');
        }
      }
    }
    for (const value of NASTY) {
      for (const vendor of ['transcend', 'onetrust', 'datagrail', value]) {
        const res = await http('POST', `/webhooks/${encodeURIComponent(vendor)}/${encodeURIComponent(value)}`, { body: '{}' });
        expect(expectError(res, 404, 'not_found').message).toBe('no such webhook');
      }
    }
    expect(await snapshot(env)).toEqual(before);
  });

  // Found by fuzzing (test/faults/fuzz-routes.test.ts): the admin listings took no query schema, so a filter a client
  // believed in (`?vendor=`, `?scope=`) was ignored and the whole list answered, as README (API) says never happens.
  it('a query parameter on a listing that takes none (connectors, keys, admins) → 400 naming it, not the whole list', async () => {
    for (const [path, name] of [
      ['/v1/admin/connectors?vendor=onetrust', 'vendor'],
      ['/v1/admin/keys?scope=privacy', 'scope'],
      ['/v1/admin/admins?email=nobody%40example.test', 'email'],
      ['/v1/admin/connectors?limit=1', 'limit'],
    ] as const) {
      const err = expectError(await http('GET', path, { key: ws.adminKey }), 400, 'validation_failed');
      expect(err.details, path).toEqual([{ path: name, message: 'unknown query parameter' }]);
    }
    // A name that is a value (an email) is not repeated.
    const odd = await http('GET', '/v1/admin/admins?someone%40example.test=1', { key: ws.adminKey });
    expect(expectError(odd, 400, 'validation_failed').details).toEqual([{ path: '[key]', message: 'unknown query parameter' }]);
    expect(odd.text).not.toContain('someone');
    for (const path of ['/v1/admin/connectors', '/v1/admin/keys', '/v1/admin/admins']) {
      expect((await http('GET', path, { key: ws.adminKey })).status, path).toBe(200);
    }
  });

  it('in every query filter → an empty page or 400 validation_failed, never 5xx, nothing changed', async () => {
    const before = await snapshot(env);
    const filters = {
      '/v1/privacy/requests': ['userId', 'email', 'externalRequestId', 'upstreamRef', 'cursor', 'status', 'upstreamStatus', 'limit'],
      '/v1/privacy/audit': ['requestId', 'userId', 'email', 'cursor', 'action', 'status', 'outcome', 'limit'],
      '/v1/privacy/holds': ['userId', 'email', 'cursor', 'limit'],
    };
    let empties = 0;
    for (const [path, names] of Object.entries(filters)) {
      for (const name of names) {
        for (const value of [...NASTY, encodeCursor("req_' OR 1=1 --"), encodeCursor('%')]) {
          const res = await http('GET', `${path}?${name}=${encodeURIComponent(value)}`, { key: ws.privacyKey });
          if (res.status === 200) {
            expect(res.json.data, `${path}?${name}=${value}`).toEqual([]);
            empties++;
          } else {
            const err = expectError(res, 400, 'validation_failed');
            if (!hasNul(value)) expect(JSON.stringify(err.details), `${path}?${name}`).toContain(name);
          }
        }
      }
    }
    expect(empties).toBeGreaterThan(30);
    // The filters do work: the known values find the known rows.
    const found = await http('GET', `/v1/privacy/requests?externalRequestId=ext-known`, { key: ws.privacyKey });
    expect(found.json.data.map((r: { id: string }) => r.id)).toEqual([known.requestId]);
    const audit = await http('GET', `/v1/privacy/audit?requestId=${known.requestId}`, { key: ws.privacyKey });
    expect(audit.json.data.map((r: { id: string }) => r.id)).toEqual([known.auditId]);
    expect(await snapshot(env)).toEqual(before);
  });

  it('in login email / workspaceId → 401 invalid_credentials (400 for a NUL), no session, only the attempt counted', async () => {
    const before = await snapshot(env);
    for (const value of NASTY) {
      for (const body of [
        { workspaceId: ws.workspaceId, email: value, password: session.password },
        { workspaceId: value, email: session.email, password: session.password },
        { workspaceId: `${ws.workspaceId}' OR '1'='1`, email: `${session.email}' --`, password: session.password },
      ]) {
        const res = await http('POST', '/v1/auth/login', { body });
        expect(res.headers.get('set-cookie')).toBeNull();
        if (hasNul(value) && res.status === 400) expectError(res, 400, 'validation_failed');
        else expectError(res, 401, 'invalid_credentials');
      }
    }
    const after = await snapshot(env);
    delete before.auth_throttle;
    delete after.auth_throttle;
    expect(after).toEqual(before);
  });

  it('in body ids that are stored (user ids, external ids, names): stored verbatim once, or 400 for a NUL; nothing else', async () => {
    for (const value of NASTY) {
      const counts = await rowCounts(env);
      const userId = `${value}-${randomUUID()}`;
      const externalRequestId = `${value}-${randomUUID()}`;
      const ingest = await http('POST', '/v1/identify', { key: ws.ingestKey, body: { userId, name: value, traits: { [value]: value } } });
      const privacy = await http('POST', '/v1/privacy/requests', {
        key: ws.privacyKey,
        body: { action: 'suppress', userId, externalRequestId },
      });
      const connector = await http('PATCH', `/v1/admin/connectors/${connectors.onetrust}`, { key: ws.adminKey, body: { name: value } });
      if (hasNul(value)) {
        for (const res of [ingest, privacy, connector]) expectError(res, 400, 'validation_failed');
        expect(await rowCounts(env), JSON.stringify(value)).toEqual(counts);
        continue;
      }
      expect(ingest.status, ingest.text).toBe(200);
      expect(privacy.status, privacy.text).toBe(202);
      expect(connector.status, connector.text).toBe(200);
      expect(connector.json.name).toBe(value.trim());
      const users = await env.sql`select external_id, display_name, traits from end_users where workspace_id = ${ws.workspaceId} and external_id = ${userId}`;
      expect(users).toEqual([{ external_id: userId, display_name: value, traits: { [value]: value } }]);
      const byExternal = await http('GET', `/v1/privacy/requests?externalRequestId=${encodeURIComponent(externalRequestId)}`, { key: ws.privacyKey });
      expect(byExternal.json.data.map((r: { id: string }) => r.id)).toEqual([privacy.json.results[0].requestId]);
      const byUser = await http('GET', `/v1/privacy/requests?userId=${encodeURIComponent(userId)}`, { key: ws.privacyKey });
      expect(byUser.json.data).toHaveLength(1);
      const after = await rowCounts(env);
      expect({ users: after.end_users, requests: after.dsr_requests, audits: after.audit_records }).toEqual({
        users: counts.end_users! + 1,
        requests: counts.dsr_requests! + 1,
        audits: counts.audit_records,
      });
    }
    // The known rows are all still there.
    expect((await http('GET', `/v1/privacy/requests/${known.requestId}`, { key: ws.privacyKey })).status).toBe(200);
    await env.runJobs();
    const [pending] = await env.sql<{ n: number }[]>`select count(*)::int as n from dsr_requests where status <> 'complete'`;
    expect(pending!.n).toBe(0);
  });

  it('in admin emails, key scopes and webhook ticket ids → 400 with a clear code, or the ticket stored verbatim', async () => {
    const before = await rowCounts(env);
    for (const value of NASTY) {
      const admin = await http('POST', '/v1/admin/admins', { key: ws.adminKey, body: { email: value, password: 'long-enough-password-1' } });
      expectError(admin, 400, 'validation_failed');
      const key = await http('POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: value } });
      expectError(key, 400, 'validation_failed');
      const onetrustRef = await send(SURFACES.find((s) => s.route.includes('onetrust'))!, JSON.stringify({
        requestQueueRefId: value,
        subTaskId: value,
        requestTypes: [value],
        email: 'x@example.test',
      }));
      expect(onetrustRef.status, onetrustRef.text).toBeLessThan(500);
      expectError(onetrustRef, onetrustRef.status, onetrustRef.json.error.code);
    }
    const after = await rowCounts(env);
    expect({ admins: after.admin_users, keys: after.api_keys, tickets: after.upstream_tickets }).toEqual({
      admins: before.admin_users,
      keys: before.api_keys,
      tickets: before.upstream_tickets,
    });
    // A ticket id full of metacharacters is only a string: stored as is, and the redelivery finds the same ticket.
    const wrid = `' OR 1=1 -- %_${randomUUID()}`;
    const w = datagrailWebhook({
      secret: DG_SECRET,
      body: datagrailBody({ webhook_request_id: wrid, identifiers: { email: 'meta@example.test' }, callback_url: 'http://127.0.0.1:1/cb' }),
    });
    const first = await http('POST', `/webhooks/datagrail/${connectors.datagrail}`, { headers: w.headers, body: w.rawBody });
    expect(first.status, first.text).toBe(200);
    const again = await http('POST', `/webhooks/datagrail/${connectors.datagrail}`, { headers: w.headers, body: w.rawBody });
    expect(again.json).toEqual(first.json);
    const tickets = await env.sql`select ticket_key, upstream_ref from upstream_tickets where connector_id = ${connectors.datagrail!}`;
    expect(tickets).toEqual([{ ticket_key: wrid, upstream_ref: wrid }]);
    const byRef = await http('GET', `/v1/privacy/requests?upstreamRef=${encodeURIComponent(wrid)}`, { key: ws.privacyKey });
    expect(byRef.json.data).toHaveLength(1);
    const byPattern = await http('GET', `/v1/privacy/requests?upstreamRef=${encodeURIComponent("' OR 1=1 -- %")}`, { key: ws.privacyKey });
    expect(byPattern.json.data).toEqual([]);
  });
});
