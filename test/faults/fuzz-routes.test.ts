/**
 * Property-based fuzzing (fast-check) of the routes fuzz.test.ts does not reach, in-process against a real database:
 * every route with an `{id}` in its path, the query strings of every listing, the ingest routes, the admin routes
 * that take a body (connectors, secrets, keys, admins), the dashboard's auth routes, and the admin and privacy routes
 * with credentials that are almost right (a flipped key, the wrong scope, another workspace, a session without its
 * CSRF token or without a recent password).
 *
 * For every generated request: never a 5xx; a non-2xx answer is in the standard error shape and its message does not
 * repeat what was sent; a refused write (4xx) changed nothing anywhere in the database. Secrets never come back in
 * an answer, and nothing sent as personal data or a secret reaches the log.
 *
 * Case counts are shares of FAULTS_FUZZ_RUNS (default 2,000; see CASES), so the whole file scales with it. A failure
 * prints fast-check's seed and counterexample; FAULTS_FUZZ_SEED replays a run.
 */
import { randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAKE_DATAGRAIL_API_KEY, signDataGrail } from '../../connectors/datagrail/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { encodeCursor } from '../../src/http/pagination.ts';
import { breakErasures, call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser } from '../helpers/factories.ts';
import { adminSession, makeAuthStale, newAdmin, type TestSession } from '../helpers/sessions.ts';
import { fingerprint } from '../security/db-state.ts';
import {
  anyText,
  B64URL,
  contentType,
  flip,
  garbage,
  headerValue,
  judge,
  nearValid,
  paramsFor,
  PROTO_KEYS,
  RUNS,
  setOwn,
  type Answer,
} from './fuzz-support.ts';

/**
 * Cases per property, as shares of FAULTS_FUZZ_RUNS: 3,520 at the default, about a third of fuzz.test.ts's time, so
 * the fault suite grows by well under its ~60 s budget for this file. The auth routes are few: each login or
 * re-authentication that passes validation costs one scrypt (tens of milliseconds).
 */
const share = (f: number) => Math.max(1, Math.round(RUNS * f));
const CASES = {
  pathIds: share(0.4),
  queries: share(0.3),
  ingest: share(0.4),
  adminBodies: share(0.3),
  auth: share(0.06),
  credentials: share(0.3),
};
const timeoutFor = (cases: number) => Math.max(60_000, cases * 150);

let env: TestEnv;
let ws: CreatedWorkspace;
let other: CreatedWorkspace;
/** A session that entered its password just now, one whose last password entry is 16 minutes old, and another workspace's. */
let fresh: TestSession;
let stale: TestSession;
let foreign: TestSession;
/** Connectors of `ws` that the body properties may change (rename, new config, new secrets). */
const target = { datagrail: '', onetrust: '', transcend: '' };
/**
 * Ids no route may change anything through: another workspace's (every kind), a deleted connector, a revoked key,
 * requests that are not failed, audit records, a ticket that is not failed.
 */
const inert: Record<string, string> = {};
/** Own ids a mutation can succeed on: only the credentials property uses them, where every call must be refused. */
const live: Record<string, string> = {};

/** Marks what is sent as personal data or a secret: none of it may appear in an error or the log. */
const CANARY = `cnry${randomBytes(3).toString('hex')}`;
const canaryEmail = fc.stringMatching(/^[a-z0-9]{1,12}$/).map((s) => `${s}.${CANARY}@example.test`);
const canarySecret = fc.stringMatching(/^[A-Za-z0-9_-]{1,16}$/).map((s) => `sk-${CANARY}-${s}`);
const canaryPassword = fc.string({ minLength: 1, maxLength: 30 }).map((s) => `pw-${CANARY}-${s}`);
const canaryUserId = fc.oneof(
  { arbitrary: fc.stringMatching(/^[a-z0-9-]{1,12}$/).map((s) => `u-${CANARY}-${s}`), weight: 4 },
  fc.constantFrom(`u-${CANARY}`, ` u-${CANARY} `, `U-${CANARY}`),
);

interface Sent {
  method: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

async function send(r: Sent): Promise<Answer> {
  const res = await env.app.request(r.path, { method: r.method, headers: r.headers, body: r.body });
  return { status: res.status, text: await res.text(), headers: res.headers };
}

const json = (value: unknown) => JSON.stringify(value);
const bearer = (key: string) => ({ authorization: `Bearer ${key}` });
const sessionHeaders = (s: TestSession, csrf = true) => ({ cookie: s.cookie, ...(csrf ? { 'x-csrf-token': s.csrf } : {}) });
const isError = (res: Answer) => res.status < 200 || res.status >= 300;
/** Methods that only read: anything else (POST, PUT, PATCH, DELETE, OPTIONS, PROPFIND…) must change nothing when refused. */
const READS = new Set(['GET', 'HEAD']);

/** Field-name-shaped strings (and enum words) are what error details legitimately name: they are not probes. */
const WORDISH = /^[A-Za-z_$][\w$-]{0,63}$/;

/** What the errors say whatever was sent (examples of a valid value): a value found only within these is no echo. */
const OWN_WORDS = ['https://app.onetrust.com', 'https://multi-tenant.sombra.transcend.io', '"*.domain.tld"'];

/** The strings a request carried that an error must not repeat: values (not field names) of 8 characters or more. */
function probesOf(r: Sent, extra: string[] = []): string[] {
  const out = new Set<string>();
  const add = (s: string) => {
    const t = s.trim().toLowerCase();
    if (t.length >= 8 && !WORDISH.test(t) && !OWN_WORDS.some((w) => w.includes(t))) out.add(t);
  };
  const walk = (v: unknown, depth: number) => {
    if (depth > 40) return;
    if (typeof v === 'string') add(v);
    else if (Array.isArray(v)) for (const x of v) walk(x, depth + 1);
    else if (v && typeof v === 'object') {
      for (const [k, x] of Object.entries(v)) {
        add(k);
        walk(x, depth + 1);
      }
    }
  };
  if (r.body !== undefined) {
    try {
      walk(JSON.parse(r.body), 0);
    } catch {
      add(r.body);
    }
  }
  for (const s of extra) add(s);
  return [...out];
}

/**
 * The checks every answer passes: no 5xx, the error shape, and an error that repeats nothing the request carried
 * (its message and details, looked at case-insensitively).
 */
function judgeAll(r: Sent, res: Answer, extraProbes: string[] = []): void {
  // A HEAD answer has no body to judge.
  if (r.method === 'HEAD') return void expect(res.status, `HEAD ${r.path}`).toBeLessThan(500);
  judge(res);
  if (!isError(res)) return;
  const { error } = JSON.parse(res.text) as { error: { message: string; details?: { path: string; message: string }[] } };
  const said = [error.message, ...(error.details ?? []).flatMap((d) => [d.message, d.path])].join('\n').toLowerCase();
  for (const probe of probesOf(r, extraProbes)) expect(said, `the error repeats ${JSON.stringify(probe)}`).not.toContain(probe);
  expect(said, 'the error names a canary value').not.toContain(CANARY);
}

/** The statuses the current property got: its last check that the generated traffic reached past validation. */
let seen: number[] = [];
const count = (pred: (status: number) => boolean) => seen.filter(pred).length;
/** Enough for a property to mean something (not every case refused at the door); no demand on a short run. */
const some = (cases: number) => (cases >= 100 ? 5 : 0);

/** Sends, judges, and for a refused write checks that the database is as it was (except the tables in `except`). */
async function sendAndJudge(r: Sent, opts: { except?: string[]; probes?: string[] } = {}): Promise<Answer> {
  const mutation = !READS.has(r.method);
  const before = mutation ? await fingerprint(env, opts.except) : '';
  const res = await send(r);
  seen.push(res.status);
  judgeAll(r, res, opts.probes);
  if (mutation && isError(res)) expect(await fingerprint(env, opts.except), `a refused ${r.method} ${r.path} changed the database`).toBe(before);
  return res;
}

// ---------------------------------------------------------------------------------------------------------------
// Generators shaped like the routes' schemas

const text = (max: number) => fc.string({ minLength: 1, maxLength: max });
const isoTimestamp = fc.oneof(
  { arbitrary: fc.date({ min: new Date('1970-01-01'), max: new Date('2100-01-01'), noInvalidDate: true }).map((d) => d.toISOString()), weight: 4 },
  // Every year a four-digit ISO date can name, with any offset: the edges of what JavaScript and PostgreSQL hold.
  fc
    .tuple(
      fc.date({ min: new Date('0000-01-01T00:00:00Z'), max: new Date('9999-12-31T23:59:59Z'), noInvalidDate: true }),
      fc.constantFrom('Z', '+00:00', '+14:00', '-12:00', '+23:59', '-23:59', '+05:30'),
    )
    .map(([d, offset]) => d.toISOString().replace('Z', offset).replace(/\.\d{3}/, '')),
  fc.constantFrom(
    '0000-01-01T00:00:00Z',
    '0000-01-01T00:00:00+14:00',
    '9999-12-31T23:59:59-23:59',
    '2024-02-29T12:00:00Z',
    '2023-02-29T12:00:00Z',
    '2024-06-30T23:59:60Z',
    '2024-01-01T00:00:00.123456789Z',
    '2024-01-01',
    '2024-01-01T00:00:00',
    '+275760-09-13T00:00:00.000Z',
    '-000001-01-01T00:00:00Z',
    '1e15',
  ),
);
const jsonMap = fc.oneof(
  { arbitrary: fc.dictionary(fc.string({ maxLength: 10 }), fc.jsonValue({ maxDepth: 3 }), { maxKeys: 4 }), weight: 4 },
  fc.constantFrom(...PROTO_KEYS).chain((k) =>
    fc.jsonValue({ maxDepth: 2 }).map((v) => {
      const o: Record<string, unknown> = { plan: 'pro' };
      setOwn(o, k, v);
      return o;
    }),
  ),
  fc.nat({ max: 40 }).map((depth) => ({ deep: JSON.parse('{"a":'.repeat(depth) + '1' + '}'.repeat(depth)) as unknown })),
);
const ingestFields = {
  identify: { userId: canaryUserId, email: canaryEmail, name: text(40), role: text(20), plan: text(20), traits: jsonMap, timestamp: isoTimestamp },
  track: { userId: canaryUserId, event: text(30), properties: jsonMap, timestamp: isoTimestamp },
  message: {
    userId: canaryUserId,
    conversationId: fc.oneof(fc.constantFrom('conv-shared', 'conv-a'), text(20)),
    role: fc.constantFrom('user', 'assistant', 'system'),
    content: text(60),
    timestamp: isoTimestamp,
  },
  topic_question: { userId: canaryUserId, question: text(60), timestamp: isoTimestamp },
};
const INGEST_PATHS = { identify: '/v1/identify', track: '/v1/track', message: '/v1/messages', topic_question: '/v1/topics/questions' } as const;
const ingestRequest = fc.oneof(
  ...Object.entries(ingestFields).map(([type, fields]) =>
    nearValid(fields).map((body) => ({ path: INGEST_PATHS[type as keyof typeof INGEST_PATHS], body: json(body) })),
  ),
  fc
    .array(
      fc.oneof(
        { arbitrary: fc.oneof(...Object.entries(ingestFields).map(([type, fields]) => nearValid({ type: fc.constant(type), ...fields }))), weight: 6 },
        garbage,
      ),
      { maxLength: 4 },
    )
    .chain((batch) => nearValid({ batch: fc.constant(batch) }))
    .map((body) => ({ path: '/v1/batch', body: json(body) })),
);

// Host patterns: names, wildcards and every form of address node:net or the URL parser might take (IPv6 with a zone
// id, IPv4-mapped, hex and octal IPv4) besides the ones both refuse.
const hostPattern = fc.oneof(
  fc.constantFrom('127.0.0.1', '*.datagrail.io', 'acme.example', '::1', 'ACME.Example'),
  fc.constantFrom('*.com', '*', 'http://x.example', '[::1]', 'a..b', 'x.example:443', 'x.example/path', '', '0x7f.1', '0177.0.0.1', '2130706433'),
  fc.oneof(fc.ipV4(), fc.ipV4Extended(), fc.ipV6()),
  fc.tuple(fc.ipV6(), fc.constantFrom('%eth0', '%1', '%25en0', '%', '%%')).map(([ip, zone]) => `${ip}${zone}`),
  fc.domain(),
  anyText,
);
const requestTypes = (actions: string[]) =>
  fc.dictionary(fc.oneof(fc.string({ maxLength: 12 }), fc.constantFrom(...PROTO_KEYS, 'Delete Data', 'delete data ')), fc.constantFrom(...actions, 'nope'), {
    maxKeys: 3,
  });
const vendorUrl = fc.oneof(
  fc.constantFrom('https://acme.my.onetrust.com', 'https://multi-tenant.sombra.transcend.io', 'http://127.0.0.1:1'),
  fc.constantFrom('https://u:p@x.example', 'https://x.example/?q=1', 'https://x.example/#f', 'ftp://x.example', 'javascript:alert(1)', 'http://[::1', 'https://'),
  fc.constantFrom('http://[::1]:1/', 'http://[fe80::1%25eth0]/', 'https://x.example:99999', 'https://\u00e9.example', 'HTTPS://X.EXAMPLE', 'https://x.example/%zz'),
  fc.webUrl({ withQueryParameters: true, withFragments: true }),
  fc.ipV6().map((ip) => `https://[${ip}]/`),
);
const CONFIG = {
  datagrail: nearValid({
    callbackHosts: fc.array(hostPattern, { maxLength: 3 }),
    identifiers: fc.array(nearValid({ name: text(10), kind: fc.constantFrom('email', 'user_id', 'phone') }), { maxLength: 2 }),
    requestTypes: requestTypes(['erase', 'suppress', 'unsuppress', 'access', 'health_check']),
    timestampToleranceSeconds: fc.integer({ min: -5, max: 4000 }),
  }),
  onetrust: nearValid({
    baseUrl: vendorUrl,
    inboundAuth: fc.oneof(
      fc.constant({ type: 'bearer' }),
      nearValid({ type: fc.constant('api_key'), header: fc.constantFrom('x-api-key', 'X-Key', 'bad header', '', 'x\u0000y') }),
      nearValid({ type: fc.constant('basic'), username: fc.constantFrom('ot', 'a:b', '') }),
      nearValid({ type: fc.constantFrom('none', 'Bearer', '') }),
    ),
    requestTypes: requestTypes(['erase', 'suppress', 'unsuppress', 'access']),
    internalComment: fc.boolean(),
  }),
  transcend: nearValid({
    sombraUrl: vendorUrl,
    audience: text(20),
    selfHostedSombra: fc.boolean(),
    identifierTypes: fc.dictionary(fc.oneof(fc.string({ maxLength: 10 }), fc.constantFrom(...PROTO_KEYS)), fc.constantFrom('email', 'user_id', 'phone'), {
      maxKeys: 3,
    }),
    pull: nearValid({
      enabled: fc.boolean(),
      dataSiloId: text(20),
      actions: fc.array(fc.constantFrom('ERASURE', 'SALE_OPT_OUT', 'ACCESS', 'PLACE_ON_LEGAL_HOLD', 'x'), { maxLength: 3 }),
      intervalMinutes: fc.integer({ min: -1, max: 1500 }),
    }),
  }),
};
const SECRETS = {
  datagrail: nearValid({ webhookSecret: canarySecret, apiKey: canarySecret }),
  onetrust: nearValid({ clientId: canarySecret, clientSecret: canarySecret, inboundSecret: canarySecret }),
  transcend: nearValid({ apiKey: canarySecret, sombraApiKey: canarySecret }),
};
type Vendor = keyof typeof CONFIG;
const vendor = fc.constantFrom<Vendor>('datagrail', 'onetrust', 'transcend');
const keepSeconds = fc.oneof(
  fc.integer({ min: 0, max: 7 * 86_400 }),
  fc.constantFrom(-1, 7 * 86_400 + 1, 1.5, 2 ** 31, 2 ** 53, 1e308, '60', null),
);

// ---------------------------------------------------------------------------------------------------------------

beforeAll(async () => {
  env = await createTestEnv({
    // One report attempt: the ticket made below fails at once, to have a failed ticket for redelivery.
    reportMaxAttempts: 1,
    // Many deliberately wrong passwords below: keep them from being throttled (the throttle is tested elsewhere).
    env: { LOGIN_MAX_ATTEMPTS_PER_ACCOUNT: '1000', LOGIN_MAX_ATTEMPTS_PER_ADDRESS: '100000' },
  });
  [ws, other] = await Promise.all([env.newWorkspace('Fuzz routes'), env.newWorkspace('Fuzz routes other')]);
  [fresh, stale, foreign] = await Promise.all([
    adminSession(env, ws.workspaceId),
    adminSession(env, ws.workspaceId),
    adminSession(env, other.workspaceId),
  ]);
  await makeAuthStale(env, stale.sessionId);

  const create = async (key: string, body: unknown) => {
    const res = await call(env, 'POST', '/v1/admin/connectors', { key, body });
    expect(res.status, res.text).toBe(201);
    return res.json.id as string;
  };
  const bodies = {
    datagrail: { config: { callbackHosts: ['127.0.0.1'] }, secrets: { webhookSecret: 'dg-secret', apiKey: FAKE_DATAGRAIL_API_KEY } },
    onetrust: {
      config: { baseUrl: 'https://acme.my.onetrust.com' },
      secrets: { clientId: 'ot-client', clientSecret: 'ot-client-secret', inboundSecret: 'ot-inbound' },
    },
    transcend: { config: { sombraUrl: 'https://multi-tenant.sombra.transcend.io', audience: 'fuzz' }, secrets: { apiKey: 'tr-key' } },
  };
  for (const v of ['datagrail', 'onetrust', 'transcend'] as const) {
    target[v] = await create(ws.adminKey, { vendor: v, name: `target ${v}`, ...bodies[v] });
  }
  live.connector = await create(ws.adminKey, { vendor: 'datagrail', name: 'live', ...bodies.datagrail });
  inert.foreignConnector = await create(other.adminKey, { vendor: 'onetrust', name: 'foreign', ...bodies.onetrust });
  inert.deletedConnector = await create(ws.adminKey, { vendor: 'transcend', name: 'deleted', ...bodies.transcend });
  expect((await call(env, 'DELETE', `/v1/admin/connectors/${inert.deletedConnector}`, { key: ws.adminKey })).status).toBe(204);

  // Requests: complete (with its audit record), failed (erasures fail while topic questions cannot be deleted), queued.
  const privacy = async (key: string, body: unknown) => {
    const res = await call(env, 'POST', '/v1/privacy/requests', { key, body });
    expect(res.status, res.text).toBe(202);
    return res.json.results[0].requestId as string;
  };
  const user = await seedUser(env, ws.ingestKey);
  inert.completeRequest = await privacy(ws.privacyKey, { action: 'suppress', userId: user.userId });
  inert.foreignRequest = await privacy(other.privacyKey, { action: 'suppress', userId: 'foreign-user' });
  // A DataGrail ticket whose report cannot be delivered (nothing listens on port 1): failed after one attempt.
  const dgBody = json({
    integration_name: 'Fuzz',
    request_type: 'opt_out',
    webhook_request_id: `wr-${randomBytes(4).toString('hex')}`,
    identifiers: { email: 'ticket-subject@example.test' },
    callback_url: 'http://127.0.0.1:1/callback',
  });
  const now = Math.floor(Date.now() / 1000);
  const hook = await send({
    method: 'POST',
    path: `/webhooks/datagrail/${live.connector}`,
    headers: { 'content-type': 'application/json', 'x-webhook-timestamp': String(now), 'x-webhook-signature': signDataGrail('dg-secret', now, dgBody) },
    body: dgBody,
  });
  expect(hook.status, hook.text).toBe(200);
  live.failedTicket = (JSON.parse(hook.text) as { received: { ticketId: string }[] }).received[0]!.ticketId;
  const restoreErasures = await breakErasures(env, ws.workspaceId);
  try {
    live.failedRequest = await privacy(ws.privacyKey, { action: 'erase', email: user.email });
    await env.runJobs();
  } finally {
    await restoreErasures();
  }
  const statuses = await env.sql<{ id: string; status: string; audit_record_id: string | null }[]>`
    select id, status, audit_record_id from dsr_requests where id in (${inert.completeRequest}, ${live.failedRequest}, ${inert.foreignRequest})`;
  const byId = Object.fromEntries(statuses.map((r) => [r.id, r]));
  expect(byId[inert.completeRequest]?.status).toBe('complete');
  expect(byId[live.failedRequest]?.status).toBe('failed');
  inert.auditRecord = byId[inert.completeRequest]!.audit_record_id!;
  inert.foreignAudit = byId[inert.foreignRequest]!.audit_record_id!;
  const [ticket] = await env.sql<{ status: string }[]>`select status from upstream_tickets where id = ${live.failedTicket}`;
  expect(ticket?.status).toBe('failed');
  inert.queuedRequest = await privacy(ws.privacyKey, { action: 'suppress', userId: 'queued-user' });
  // A second ticket, still pending (its report waits for its request's job, which is never run here).
  const pendingBody = json({ ...(JSON.parse(dgBody) as object), webhook_request_id: `wr-pending-${randomBytes(4).toString('hex')}` });
  const pending = await send({
    method: 'POST',
    path: `/webhooks/datagrail/${live.connector}`,
    headers: { 'content-type': 'application/json', 'x-webhook-timestamp': String(now), 'x-webhook-signature': signDataGrail('dg-secret', now, pendingBody) },
    body: pendingBody,
  });
  expect(pending.status, pending.text).toBe(200);
  inert.pendingTicket = (JSON.parse(pending.text) as { received: { ticketId: string }[] }).received[0]!.ticketId;

  // Keys and admins: another workspace's, and a key of this one already revoked.
  const keys = await env.sql<{ id: string; workspace_id: string; scope: string }[]>`select id, workspace_id, scope from api_keys`;
  inert.foreignKey = keys.find((k) => k.workspace_id === other.workspaceId && k.scope === 'admin')!.id;
  live.ingestKeyId = keys.find((k) => k.workspace_id === ws.workspaceId && k.scope === 'ingest')!.id;
  const revoked = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'ingest' } });
  expect(revoked.status, revoked.text).toBe(201);
  inert.revokedKey = revoked.json.id as string;
  expect((await call(env, 'POST', `/v1/admin/keys/${inert.revokedKey}/revoke`, { key: ws.adminKey })).status).toBe(200);
  inert.foreignAdmin = foreign.adminId;
  live.admin = stale.adminId;
});

afterAll(async () => {
  await env?.close();
});

/** Every `{id}` route of the OpenAPI document, as [METHOD, template]. */
function idRoutes(): [string, string][] {
  const doc = env.app.getOpenAPI31Document({ openapi: '3.1.0', info: { title: 'dsr-connector', version: 'fuzz' } });
  const out: [string, string][] = [];
  for (const [path, item] of Object.entries(doc.paths ?? {})) {
    for (const method of ['get', 'post', 'put', 'patch', 'delete']) {
      if (path.includes('{id}') && (item as Record<string, unknown>)[method]) out.push([method.toUpperCase(), path]);
    }
  }
  return out;
}

/** A known id, changed: one character flipped, another kind's prefix, cut short, padded, cased (never itself). */
function mangledIds(known: string[]): fc.Arbitrary<string> {
  const k = fc.constantFrom(...known);
  const real = new Set([...Object.values(inert), ...Object.values(live)]);
  return fc.oneof(
    fc.tuple(k, fc.nat(), fc.nat()).map(([id, at, pick]) => flip(id, at, 'abcdefghijklmnopqrstuvwxyz0123456789', pick)),
    fc.tuple(k, fc.constantFrom('req', 'aud', 'con', 'tkt', 'key', 'adm', 'ses', 'ws', 'x', 'REQ')).map(([id, p]) => id.replace(/^[a-z]+_/, `${p}_`)),
    fc.tuple(k, fc.nat()).map(([id, n]) => id.slice(0, n % id.length)),
    fc.tuple(k, fc.constantFrom(' ', '\t', '\u0000', '%', '/', '..', "'", '"', 'x', '\u00e9', '😀')).map(([id, c]) => `${id}${c}`),
    k.map((id) => id.toUpperCase()),
  ).filter((id) => !real.has(id));
}

const hostileIds = fc.oneof(
  anyText,
  fc.string({ unit: 'grapheme', maxLength: 40 }),
  fc.constantFrom('\u0000', 'a\u0000b', '%00', '%', '%%', '%zz', '%E0%A4%A', '..', '.', '/', '%2F', '%2e%2e', ' ', '', '*', '{id}'),
  fc.constantFrom("' OR 1=1 --", '"; drop table dsr_requests; --', '${jndi:ldap://x}', '<script>', '\\', '__proto__', 'constructor'),
  fc.constantFrom('x'.repeat(100), 'x'.repeat(101), `req_${'a'.repeat(25)}`, `con_${'z'.repeat(25)}`, 'x'.repeat(5_000)),
  fc.integer().map(String),
);

describe('fuzz: path ids, query strings and ingest', () => {
  it(`every {id} route with another workspace's, inert, mangled and hostile ids: 4xx, nothing changed (${CASES.pathIds} cases)`, { timeout: timeoutFor(CASES.pathIds) }, async () => {
    const routes = idRoutes();
    expect(routes.length).toBeGreaterThanOrEqual(15);
    const known = Object.values(inert);
    const id = fc.oneof({ arbitrary: fc.constantFrom(...known), weight: 3 }, { arbitrary: mangledIds([...known, ...Object.values(live)]), weight: 3 }, hostileIds);
    const body = fc.oneof(
      { arbitrary: fc.constant(undefined), weight: 3 },
      fc.constantFrom(json({ name: 'renamed' }), json({ secrets: { apiKey: 'k' } }), json({ enabled: false }), '{}', '{"a":'),
      garbage.map((g) => json(g)),
    );
    const who = fc.constantFrom('key', 'session');
    // Now and then another method on the same path: what answers it must not be a route that acts.
    const otherMethod = fc.oneof(
      { arbitrary: fc.constant(undefined), weight: 7 },
      fc.constantFrom('GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS', 'PROPFIND'),
    );
    seen = [];
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...routes), otherMethod, id, fc.boolean(), body, who, async ([routeMethod, template], m, value, encoded, b, w) => {
        const method = m ?? routeMethod;
        // Raw: only what would end the path early is escaped, so malformed percent-encoding reaches the router.
        const segment = encoded ? encodeURIComponent(value) : value.replace(/[/?#\s]/g, encodeURIComponent).replaceAll('\u0000', '%00');
        const path = template.replace('{id}', segment);
        const scope = template.startsWith('/v1/privacy') ? ws.privacyKey : ws.adminKey;
        const headers: Record<string, string> = w === 'key' ? bearer(scope) : sessionHeaders(fresh);
        const body = READS.has(method) ? undefined : b;
        if (body !== undefined) headers['content-type'] = 'application/json';
        const r = { method, path, headers, body };
        const res = await sendAndJudge(r, { probes: [value] });
        if (!READS.has(method)) expect(isError(res), `${method} ${path} → ${res.status} ${res.text}`).toBe(true);
        else if (res.status === 200) expect([inert.completeRequest, inert.queuedRequest, inert.auditRecord]).toContain(value);
      }),
      paramsFor(CASES.pathIds),
    );
    // Lookups were reached: ids found nowhere (404) and found but in the wrong state (409).
    expect(count((st) => st === 404)).toBeGreaterThanOrEqual(some(CASES.pathIds));
    expect(count((st) => st === 409)).toBeGreaterThanOrEqual(some(CASES.pathIds));
  });

  it(`every listing with arbitrary query strings: never 5xx, an unknown parameter refused, pages of this workspace only (${CASES.queries} cases)`, { timeout: timeoutFor(CASES.queries) }, async () => {
    const foreignIds = new Set([inert.foreignRequest, inert.foreignAudit, inert.foreignConnector, inert.foreignKey, inert.foreignAdmin]);
    const LISTINGS: Record<string, string[]> = {
      '/v1/privacy/requests': ['status', 'externalRequestId', 'userId', 'email', 'upstreamRef', 'upstreamStatus', 'limit', 'cursor'],
      '/v1/privacy/audit': ['requestId', 'action', 'status', 'outcome', 'userId', 'email', 'limit', 'cursor'],
      '/v1/admin/connectors': [],
      '/v1/admin/keys': [],
      '/v1/admin/admins': [],
    };
    const OTHER_GETS = ['/v1/admin/audit/verify', '/v1/auth/session', '/v1', '/healthz'];
    const ids = Object.values(inert);
    const cursor = fc.oneof(
      fc.constantFrom(...ids).map(encodeCursor),
      mangledIds(ids).map(encodeCursor),
      fc.constantFrom(...ids).map((i) => Buffer.from(i).toString('base64')),
      fc.uint8Array({ maxLength: 40 }).map((b) => Buffer.from(b).toString('base64url')),
      fc.string({ maxLength: 30 }).map(encodeCursor),
      fc.constantFrom('', '=', '====', 'cmVx', `${encodeCursor(inert.completeRequest!)}==`, 'x'.repeat(201)),
    );
    const value = fc.oneof(
      anyText,
      cursor,
      fc.constantFrom('queued', 'complete', 'failed', 'running', 'pending', 'delivered', 'erase', 'hold', 'release_hold', 'held', 'released', 'legal_hold'),
      fc.constantFrom('0', '1', '100', '101', '-1', '1.5', '1e2', ' 5', '0x10', '５', 'NaN', 'Infinity', '', '2024-01-01', '2024-01-01T00:00:00Z', 'true'),
      canaryEmail,
      canaryUserId,
      fc.constantFrom(...ids),
    );
    const anyName = fc.oneof(
      fc.constantFrom('limit', 'cursor', 'status', 'action', 'userId', 'email', 'createdAfter', 'since', 'from', 'vendor', 'scope', 'q', 'page', 'offset', 'sort'),
      fc.constantFrom(...PROTO_KEYS),
      fc.string({ maxLength: 10 }),
    );
    const listing = fc.oneof(
      fc.constantFrom(...Object.keys(LISTINGS)).chain((path) =>
        fc.record({
          path: fc.constant(path),
          query: fc.array(fc.tuple(LISTINGS[path]!.length ? fc.oneof({ arbitrary: fc.constantFrom(...LISTINGS[path]!), weight: 4 }, anyName) : anyName, value), { maxLength: 4 }),
        }),
      ),
      fc.record({ path: fc.constantFrom(...OTHER_GETS), query: fc.array(fc.tuple(anyName, value), { maxLength: 2 }) }),
    );
    seen = [];
    await fc.assert(
      fc.asyncProperty(listing, fc.boolean(), fc.constantFrom('key', 'session'), async (t, raw, w) => {
        const query = raw
          ? t.query.map(([k, v]) => `${k}=${v.replace(/[#&\s]/g, '')}`).join('&')
          : new URLSearchParams(t.query).toString();
        const path = `${t.path}?${query}`;
        const key = t.path.startsWith('/v1/privacy') ? ws.privacyKey : ws.adminKey;
        const headers = w === 'session' || t.path === '/v1/auth/session' ? sessionHeaders(fresh, false) : bearer(key);
        const r = { method: 'GET', path, headers };
        const res = await sendAndJudge(r, { probes: t.query.map(([, v]) => v) });
        const allowed = LISTINGS[t.path];
        // A parameter without a name is no filter anyone could mean: it is dropped before validation.
        if (allowed && !raw && t.query.some(([k]) => k !== '' && !allowed.includes(k))) {
          // README (API): a parameter a listing does not take is refused, so a misspelt filter never lists everything.
          expect(res.status, `${path}: ${res.text}`).toBe(400);
        }
        if (res.status === 200 && allowed) {
          const page = JSON.parse(res.text) as { data: { id: string; workspaceId?: string }[]; nextCursor?: string | null };
          expect(Array.isArray(page.data)).toBe(true);
          for (const row of page.data) expect(foreignIds.has(row.id), `another workspace's ${row.id} listed`).toBe(false);
        }
      }),
      paramsFor(CASES.queries),
    );
    expect(count((st) => st === 200)).toBeGreaterThanOrEqual(some(CASES.queries));
  });

  it(`the ingest routes with near-valid and hostile bodies: never 5xx, a refused write stores nothing (${CASES.ingest} cases)`, { timeout: timeoutFor(CASES.ingest) }, async () => {
    // A conversation another user already owns, so a message naming it is a 409.
    expect((await call(env, 'POST', '/v1/messages', { key: ws.ingestKey, body: { userId: 'owner', conversationId: 'conv-shared', role: 'user', content: 'hi' } })).status).toBe(200);
    seen = [];
    await fc.assert(
      fc.asyncProperty(ingestRequest, contentType, async (req, ct) => {
        const r = { method: 'POST', path: req.path, headers: { ...bearer(ws.ingestKey), 'content-type': ct }, body: req.body };
        const res = await sendAndJudge(r);
        if (res.status === 200) {
          const answer = JSON.parse(res.text) as { accepted: boolean; stored?: boolean; results?: unknown[] };
          expect(answer.accepted).toBe(true);
          if (req.path === '/v1/batch') expect(answer.results).toHaveLength((JSON.parse(req.body) as { batch: unknown[] }).batch.length);
          else expect(typeof answer.stored).toBe('boolean');
        }
      }),
      paramsFor(CASES.ingest),
    );
    expect(count((st) => st === 200)).toBeGreaterThanOrEqual(some(CASES.ingest));
  });
});

describe('fuzz: admin and auth routes', () => {
  it(`admin bodies (connectors, secrets with keepPreviousForSeconds, keys, admins): never 5xx, secrets never answered, a refusal changes nothing (${CASES.adminBodies} cases)`, { timeout: timeoutFor(CASES.adminBodies) }, async () => {
    const request = fc.oneof(
      { arbitrary: vendor.chain((v) => nearValid({ vendor: fc.constant(v), name: text(30), config: CONFIG[v], secrets: SECRETS[v] })).map((b) => ({ method: 'POST', path: '/v1/admin/connectors', body: b })), weight: 3 },
      { arbitrary: vendor.chain((v) => nearValid({ name: text(30), config: CONFIG[v], enabled: fc.boolean() }).map((b) => ({ method: 'PATCH', path: `/v1/admin/connectors/${target[v]}`, body: b }))), weight: 3 },
      { arbitrary: vendor.chain((v) => nearValid({ secrets: SECRETS[v], keepPreviousForSeconds: keepSeconds }).map((b) => ({ method: 'PUT', path: `/v1/admin/connectors/${target[v]}/secrets`, body: b }))), weight: 3 },
      nearValid({ scope: fc.constantFrom('ingest', 'privacy', 'admin', 'ADMIN', 'root', '') }).map((b) => ({ method: 'POST', path: '/v1/admin/keys', body: b })),
      nearValid({ email: canaryEmail, password: fc.oneof(canaryPassword, fc.constantFrom('short', 'x'.repeat(1025))) }).map((b) => ({ method: 'POST', path: '/v1/admin/admins', body: b })),
    );
    seen = [];
    await fc.assert(
      fc.asyncProperty(request, fc.constantFrom('key', 'session', 'stale'), async (q, w) => {
        const auth = w === 'key' ? bearer(ws.adminKey) : sessionHeaders(w === 'session' ? fresh : stale);
        const r = { method: q.method, path: q.path, headers: { ...auth, 'content-type': 'application/json' }, body: json(q.body) };
        const res = await sendAndJudge(r);
        // Secrets go in and never come out: not in an error, not in the connector view.
        expect(res.text.includes(`sk-${CANARY}`), `a secret came back: ${res.text}`).toBe(false);
        if (res.status === 201 && q.path === '/v1/admin/connectors') {
          const [row] = await env.sql`select workspace_id from connectors where id = ${(JSON.parse(res.text) as { id: string }).id}`;
          expect(row?.workspace_id).toBe(ws.workspaceId);
        }
      }),
      paramsFor(CASES.adminBodies),
    );
    expect(count((st) => st === 200 || st === 201)).toBeGreaterThanOrEqual(some(CASES.adminBodies));
  });

  it(`the auth routes (login, session, reauth, logout, password) with near-valid bodies and cookies: never 5xx, no session from a refusal (${CASES.auth} cases)`, { timeout: timeoutFor(CASES.auth) }, async () => {
    // An admin of its own, whose password the property may change (its session stays: the one making the change).
    const me = await newAdmin(env, ws.workspaceId);
    const mine = await adminSession(env, ws.workspaceId, me);
    let password = me.password;
    const token = mine.cookie.slice('dsr_session='.length);
    const cookie = fc.oneof(
      { arbitrary: fc.constant('valid'), weight: 3 },
      fc.constant('none'),
      fc.record({ at: fc.nat(), pick: fc.nat() }).map(({ at, pick }) => `dsr_session=dsrs_${flip(token.slice(5), at, B64URL, pick)}`),
      headerValue.map((v) => `dsr_session=${v.replace(/[;,\s]/g, '')}`),
      fc.constantFrom(`dsr_session=${token}; dsr_session=x`, `dsr_session=${fresh.cookie.slice(13)}x`, 'dsr_session=', `DSR_SESSION=${token}`),
      fc.constantFrom('dsr_session=%', 'dsr_session=%E0%A4%A', `dsr_session=${encodeURIComponent(token)}%`, 'dsr_session="dsrs_x"', `dsr_session=${token}\u00e9`),
    );
    const csrf = fc.oneof({ arbitrary: fc.constant('valid'), weight: 3 }, fc.constant('none'), headerValue);
    const route = fc.oneof(
      nearValid({
        workspaceId: fc.constantFrom(ws.workspaceId, other.workspaceId, `${ws.workspaceId} `, ws.workspaceId.toUpperCase()),
        email: fc.oneof(fc.constant(me.email), fc.constant(me.email.toUpperCase()), canaryEmail),
        password: fc.oneof(fc.constant('PASSWORD'), canaryPassword),
      }).map((b) => ({ method: 'POST', path: '/v1/auth/login', body: b as unknown })),
      nearValid({ password: fc.oneof(fc.constant('PASSWORD'), canaryPassword) }).map((b) => ({ method: 'POST', path: '/v1/auth/reauth', body: b as unknown })),
      nearValid({ newPassword: fc.oneof(canaryPassword, fc.constantFrom('short', 'x'.repeat(1025), '            ')) }).map((b) => ({ method: 'POST', path: '/v1/auth/password', body: b as unknown })),
      fc.constantFrom({ method: 'GET', path: '/v1/auth/session', body: undefined as unknown }, { method: 'POST', path: '/v1/auth/logout', body: undefined as unknown }),
    );
    seen = [];
    await fc.assert(
      fc.asyncProperty(route, cookie, csrf, async (q, c, x) => {
        // Logging out with the valid session and its token would end the session the other cases use.
        if (q.path === '/v1/auth/logout' && c === 'valid' && x === 'valid') return;
        let body = q.body;
        if (body && typeof body === 'object') {
          const b = { ...(body as Record<string, unknown>) };
          for (const field of ['password']) if (b[field] === 'PASSWORD') b[field] = password;
          body = b;
        }
        const headers: Record<string, string> = {};
        if (c === 'valid') headers.cookie = mine.cookie;
        else if (c !== 'none') headers.cookie = c;
        if (x === 'valid') headers['x-csrf-token'] = mine.csrf;
        else if (x !== 'none') headers['x-csrf-token'] = x;
        if (body !== undefined) headers['content-type'] = 'application/json';
        const r = { method: q.method, path: q.path, headers, body: body === undefined ? undefined : json(body) };
        // A password attempt is counted whether or not it is right; nothing else may change on a refusal.
        const res = await sendAndJudge(r, { except: ['auth_throttle'] });
        if (isError(res)) {
          const set = res.headers.get('set-cookie') ?? '';
          expect(/dsr_session=[^;]+/.test(set), `a refusal set a session cookie: ${set}`).toBe(false);
        }
        if (q.path === '/v1/auth/password' && res.status === 204) password = (body as { newPassword: string }).newPassword;
      }),
      paramsFor(CASES.auth),
    );
    expect(count((st) => st >= 200 && st < 300)).toBeGreaterThanOrEqual(CASES.auth >= 60 ? 2 : 0);
  });

  it(`admin and privacy routes with almost-right credentials: 401/403/404, nothing changed (${CASES.credentials} cases)`, { timeout: timeoutFor(CASES.credentials) }, async () => {
    // Each with a body it would accept, and whether it needs a recent password when a person calls it.
    const ROUTES: { method: string; path: string; body?: unknown; recent: boolean; scope: 'admin' | 'privacy' }[] = [
      { method: 'POST', path: '/v1/admin/connectors', body: { vendor: 'transcend', name: 'x', config: { sombraUrl: 'https://s.example', audience: 'a' }, secrets: { apiKey: `sk-${CANARY}` } }, recent: true, scope: 'admin' },
      { method: 'PATCH', path: `/v1/admin/connectors/${live.connector}`, body: { config: { callbackHosts: ['127.0.0.2'] } }, recent: true, scope: 'admin' },
      { method: 'PATCH', path: `/v1/admin/connectors/${live.connector}`, body: { enabled: false }, recent: false, scope: 'admin' },
      { method: 'PUT', path: `/v1/admin/connectors/${live.connector}/secrets`, body: { secrets: { webhookSecret: `sk-${CANARY}`, apiKey: 'k' }, keepPreviousForSeconds: 60 }, recent: true, scope: 'admin' },
      { method: 'DELETE', path: `/v1/admin/connectors/${live.connector}/secrets/previous`, recent: false, scope: 'admin' },
      { method: 'POST', path: `/v1/admin/connectors/${live.connector}/disable`, recent: false, scope: 'admin' },
      { method: 'DELETE', path: `/v1/admin/connectors/${live.connector}`, recent: true, scope: 'admin' },
      { method: 'POST', path: `/v1/admin/tickets/${live.failedTicket}/redeliver`, recent: false, scope: 'admin' },
      { method: 'POST', path: '/v1/admin/keys', body: { scope: 'admin' }, recent: true, scope: 'admin' },
      { method: 'POST', path: `/v1/admin/keys/${live.ingestKeyId}/revoke`, recent: false, scope: 'admin' },
      { method: 'POST', path: `/v1/admin/keys/${live.ingestKeyId}/regenerate`, recent: true, scope: 'admin' },
      { method: 'POST', path: '/v1/admin/admins', body: { email: `new.${CANARY}@example.test`, password: `pw-${CANARY}-long-enough` }, recent: true, scope: 'admin' },
      { method: 'POST', path: `/v1/admin/admins/${live.admin}/disable`, recent: true, scope: 'admin' },
      { method: 'POST', path: '/v1/privacy/requests', body: { action: 'erase', userId: `u-${CANARY}` }, recent: true, scope: 'privacy' },
      { method: 'POST', path: '/v1/privacy/requests', body: { action: 'release_hold', email: `held.${CANARY}@example.test` }, recent: true, scope: 'privacy' },
      { method: 'POST', path: '/v1/privacy/requests', body: { action: 'suppress', scope: 'workspace' }, recent: true, scope: 'privacy' },
      { method: 'POST', path: '/v1/privacy/requests', body: { requests: [{ action: 'hold', userId: `u-${CANARY}` }, { action: 'erase', userId: `u-${CANARY}` }] }, recent: true, scope: 'privacy' },
      { method: 'POST', path: '/v1/privacy/requests', body: { action: 'hold', userId: `u-${CANARY}` }, recent: false, scope: 'privacy' },
      { method: 'POST', path: `/v1/privacy/requests/${live.failedRequest}/retry`, recent: true, scope: 'privacy' },
    ];
    const keyOf = { admin: ws.adminKey, privacy: ws.privacyKey };
    // Ways to be almost right; `stale` is refused only where a recent password is needed, so only used there.
    const credential = fc.oneof(
      fc.record({ at: fc.nat(), pick: fc.nat() }).map(({ at, pick }) => ({ kind: 'flipped' as const, at, pick })),
      fc.constantFrom(
        { kind: 'wrong-scope' as const },
        { kind: 'foreign-key' as const },
        { kind: 'foreign-session' as const },
        { kind: 'revoked' as const },
        { kind: 'no-csrf' as const },
        { kind: 'other-csrf' as const },
        { kind: 'stale' as const },
        { kind: 'basic' as const },
        { kind: 'none' as const },
      ),
      headerValue.map((v) => ({ kind: 'garbage' as const, v })),
    );
    const revokedKey = await call(env, 'POST', '/v1/admin/keys', { key: ws.adminKey, body: { scope: 'admin' } });
    expect(revokedKey.status).toBe(201);
    expect((await call(env, 'POST', `/v1/admin/keys/${revokedKey.json.id}/revoke`, { key: ws.adminKey })).status).toBe(200);
    seen = [];
    await fc.assert(
      fc.asyncProperty(fc.constantFrom(...ROUTES), credential, fc.boolean(), async (route, cred, bearerToo) => {
        if (cred.kind === 'stale' && !route.recent) return;
        // Another workspace's credentials are valid there: only a route naming one of this workspace's ids refuses them.
        const namesOwnId = Object.values(live).some((id) => route.path.includes(id));
        if ((cred.kind === 'foreign-key' || cred.kind === 'foreign-session') && !namesOwnId) return;
        const key = keyOf[route.scope];
        const prefix = `dsr_${route.scope}_`;
        let headers: Record<string, string>;
        switch (cred.kind) {
          case 'flipped':
            headers = bearer(`${prefix}${flip(key.slice(prefix.length), cred.at, B64URL, cred.pick)}`);
            break;
          case 'wrong-scope':
            headers = bearer(route.scope === 'admin' ? ws.privacyKey : ws.ingestKey);
            break;
          case 'foreign-key':
            headers = bearer(route.scope === 'admin' ? other.adminKey : other.privacyKey);
            break;
          case 'foreign-session':
            headers = sessionHeaders(foreign);
            break;
          case 'revoked':
            headers = bearer(revokedKey.json.key as string);
            break;
          case 'no-csrf':
            headers = sessionHeaders(fresh, false);
            break;
          case 'other-csrf':
            headers = { cookie: fresh.cookie, 'x-csrf-token': stale.csrf };
            break;
          case 'stale':
            headers = sessionHeaders(stale);
            break;
          case 'basic':
            headers = { authorization: `Basic ${Buffer.from(`x:${key}`).toString('base64')}` };
            break;
          case 'none':
            headers = {};
            break;
          case 'garbage':
            headers = { authorization: cred.v };
        }
        // A wrong bearer header decides even beside a valid session cookie: never half one and half the other.
        if (bearerToo && headers.authorization && cred.kind !== 'none') headers.cookie = fresh.cookie;
        if (route.body !== undefined) headers['content-type'] = 'application/json';
        const r = { method: route.method, path: route.path, headers, body: route.body === undefined ? undefined : json(route.body) };
        const res = await sendAndJudge(r);
        // 404: another workspace's key or session does not see this workspace's ids.
        expect([401, 403, 404], `${cred.kind} ${route.method} ${route.path} → ${res.status} ${res.text}`).toContain(res.status);
        if (res.status === 404) expect(['foreign-key', 'foreign-session']).toContain(cred.kind);
        if (cred.kind === 'stale') expect(JSON.parse(res.text).error.code).toBe('reauth_required');
      }),
      paramsFor(CASES.credentials),
    );
  });
});

it('nothing sent as personal data or a secret reached the log', () => {
  expect(env.logs.lines.length).toBeGreaterThan(20);
  const leaked = env.logs.lines.filter((l) => l.includes(CANARY));
  expect(leaked.slice(0, 3)).toEqual([]);
});
