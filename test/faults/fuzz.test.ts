/**
 * Property-based fuzzing (fast-check) of everything an outsider can reach with a body: the three vendor webhooks and
 * the privacy API, in-process against a real database. FAULTS_FUZZ_RUNS cases per property (default 2,000).
 *
 * Properties, for every generated request:
 *   - never a 5xx, and every non-2xx answer has the standard error shape;
 *   - without valid authentication (near-valid signatures, tokens, timestamps, keys, cookies) nothing is stored:
 *     upstream_tickets, dsr_requests and the job queue are unchanged;
 *   - with valid authentication and an arbitrary body, what is stored is well-formed (a ticket, its request in the
 *     same workspace with the same action and subject digest, a queued job, a callback URL on an allowed host), and
 *     the answer names exactly the rows that were added;
 *   - the privacy API stores exactly the items it accepted, and nothing for an invalid one.
 * A failure prints fast-check's seed and counterexample; FAULTS_FUZZ_SEED replays a run.
 */
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FAKE_DATAGRAIL_API_KEY,
  signDataGrail,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { subjectDigest } from '../../src/lib/digest.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { userFootprint } from '../helpers/factories.ts';
import {
  anyText,
  B64,
  B64URL,
  bodyText,
  charCode,
  contentType,
  extraHeaders,
  flip,
  headerValue,
  judge,
  nearValid,
  paramsFor,
  RUNS,
  type Answer,
} from './fuzz-support.ts';

const params = paramsFor(RUNS);
// Generous: each property makes RUNS requests plus a few queries each, on a shared 2-core machine.
const PROPERTY_TIMEOUT = Math.max(60_000, RUNS * 60);

const DG_SECRET = 'fuzz-datagrail-webhook-secret';
const OT_SECRET = 'fuzz-onetrust-inbound-secret';

let env: TestEnv;
let ws: CreatedWorkspace;
let other: CreatedWorkspace;
let transcend: FakeTranscend;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
const conn = { datagrail: '', onetrust: '', transcend: '' };

interface Sent {
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: string;
}

async function send(r: Sent): Promise<Answer> {
  const res = await env.app.request(r.path, { method: r.method, headers: r.headers, body: r.body });
  return { status: res.status, text: await res.text(), headers: res.headers };
}

async function counts() {
  const [row] = await env.sql<{ tickets: number; requests: number; jobs: number }[]>`
    select (select count(*) from upstream_tickets)::int as tickets,
           (select count(*) from dsr_requests)::int as requests,
           -- Jobs handed to graphile-worker plus those still in the outbox (moved there after each commit).
           ((select count(*) from graphile_worker._private_jobs) + (select count(*) from job_outbox))::int as jobs`;
  return row!;
}

// ---------------------------------------------------------------------------------------------------------------
// Generators

// Ids are unbiased: fast-check's bias favours a few small values, which would turn most cases into replays.
const id = fc.noBias(fc.uuid());
const email = fc.oneof(
  { arbitrary: fc.noBias(fc.emailAddress()), weight: 3 },
  fc.emailAddress(),
  fc.constantFrom('Ada@Example.com', ' ada@example.com ', 'a@b'),
);
const dgBody = () =>
  nearValid({
    integration_name: fc.constant('Support Platform'),
    request_type: fc.constantFrom('deletion', 'delete', 'opt_out', 'do_not_sell', 'access', 'health_check', 'healthcheck', 'DELETION'),
    webhook_request_id: fc.oneof({ arbitrary: id, weight: 3 }, fc.string({ minLength: 1, maxLength: 40 })),
    identifiers: nearValid({ email, user_id: fc.string({ maxLength: 20 }) }),
    callback_url: fc.oneof(
      { arbitrary: fc.constant('CALLBACK'), weight: 4 },
      fc.constantFrom(
        'https://acme.datagrail.io/api/v2/webhooks/callback',
        'http://169.254.169.254/latest/meta-data',
        'http://localhost:1/x',
        'file:///etc/passwd',
        'http://127.0.0.1.evil.test/x',
        'javascript:alert(1)',
      ),
      fc.webUrl(),
    ),
  }).map((o) => (o.callback_url === 'CALLBACK' ? { ...o, callback_url: datagrail.callbackUrl() } : o));
const otBody = () =>
  nearValid({
    requestQueueRefId: fc.stringMatching(/^[A-Z0-9]{6,12}$/),
    requestQueueId: id,
    subTaskId: id,
    requestTypes: fc.oneof(
      fc.constant(['Delete Data']),
      fc.array(fc.constantFrom('Delete Data', 'Do Not Sell', 'Access', 'Opt Out', 'Unsubscribe', 'Nope'), { maxLength: 3 }),
      fc.constantFrom('Delete Data', 'Delete Data, Access', '{{RequestTypes}}'),
    ),
    email,
    userId: fc.string({ maxLength: 20 }),
  });


// ---------------------------------------------------------------------------------------------------------------

beforeAll(async () => {
  env = await createTestEnv();
  [ws, other] = await Promise.all([env.newWorkspace('Fuzz'), env.newWorkspace('Fuzz other')]);
  [transcend, datagrail] = await Promise.all([startFakeTranscend(), startFakeDataGrail()]);
  const create = async (body: unknown) => {
    const res = await call(env, 'POST', '/v1/admin/connectors', { key: ws.adminKey, body });
    expect(res.status, res.text).toBe(201);
    return res.json.id as string;
  };
  conn.datagrail = await create({
    vendor: 'datagrail',
    name: 'Fuzz DataGrail',
    config: { callbackHosts: ['127.0.0.1'] },
    secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
  });
  conn.onetrust = await create({
    vendor: 'onetrust',
    name: 'Fuzz OneTrust',
    config: { baseUrl: 'https://acme.my.onetrust.com', inboundAuth: { type: 'bearer' } },
    secrets: { clientId: 'fuzz-client', clientSecret: 'fuzz-client-secret', inboundSecret: OT_SECRET },
  });
  conn.transcend = await create({
    vendor: 'transcend',
    name: 'Fuzz Transcend',
    config: transcend.config({ identifierTypes: { email: 'email' } }),
    secrets: transcend.secrets,
  });
});

afterAll(async () => {
  await Promise.all([transcend?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

/** Sends, judges, and checks that nothing at all was stored. */
async function expectNothingStored(r: Sent): Promise<Answer> {
  const before = await counts();
  const res = await send(r);
  judge(res);
  expect(res.status, res.text).not.toBe(200);
  expect(await counts()).toEqual(before);
  return res;
}

const seenTickets = new Set<string>();
/** Valid-authentication properties that ran all their cases (a failed one stops early and stores less). */
const completed = new Set<string>();

/**
 * Sends with valid authentication: judges the answer, and if tickets were received checks that the rows added are
 * exactly those, and well-formed.
 */
async function expectWellFormed(r: Sent, connectorId: string, extra?: (row: Record<string, unknown>) => void) {
  const before = await counts();
  const res = await send(r);
  judge(res);
  const after = await counts();
  if (res.status !== 200) {
    expect(after, `nothing may be stored on a ${res.status}`).toEqual(before);
    return;
  }
  const body = JSON.parse(res.text) as { received: { ticketId: string; requestId: string }[] };
  expect(Object.keys(body)).toEqual(['received']);
  const fresh = body.received.filter((x) => !seenTickets.has(x.ticketId));
  for (const x of body.received) seenTickets.add(x.ticketId);
  expect(after.tickets - before.tickets).toBe(fresh.length);
  expect(after.requests - before.requests).toBeLessThanOrEqual(fresh.length);
  for (const x of body.received) {
    const rows = await env.sql`
      select t.*, r.workspace_id as r_workspace, r.action as r_action, r.scope, r.subject_kind, r.subject_value,
             r.subject_digest as r_digest, r.actor_type, r.actor_id, r.status as r_status, r.dedupe_key,
             -- Its job: handed to graphile-worker, or still in the outbox that the web process empties after a commit.
             ((select count(*) from graphile_worker.jobs j where j.task_identifier = 'execute_request' and j.key = r.id) +
              (select count(*) from job_outbox o where o.task = 'execute_request' and o.job_key = r.id))::int as jobs
      from upstream_tickets t join dsr_requests r on r.id = t.request_id
      where t.id = ${x.ticketId}`;
    expect(rows).toHaveLength(1);
    const row = rows[0]!;
    expect(row).toMatchObject({
      request_id: x.requestId,
      connector_id: connectorId,
      workspace_id: ws.workspaceId,
      r_workspace: ws.workspaceId,
      r_action: row.action,
      r_digest: row.subject_digest,
      scope: 'user',
      r_status: 'queued',
      status: 'pending',
      jobs: 1,
    });
    // A ticket either created its request (then the connector is its actor) or joined the subject's pending one.
    if (row.dedupe_key === `connector:${connectorId}:${row.ticket_key}`.slice(0, 500)) {
      expect(row).toMatchObject({ actor_type: 'connector', actor_id: connectorId });
    }
    expect(['erase', 'suppress', 'unsuppress']).toContain(row.action);
    expect(['user_id', 'email']).toContain(row.subject_kind);
    // Non-empty and exact: spaces around a user id are part of it (ingest stores them too), so never trimmed away.
    expect(typeof row.subject_value === 'string' && row.subject_value.length > 0, JSON.stringify(row)).toBe(true);
    // The identifier the job will act on is the one the digest (audit record, lookups, dedupe) was computed from.
    expect(subjectDigest(env.deps.digestKey, ws.workspaceId, row.subject_kind, row.subject_value), JSON.stringify(row)).toBe(row.subject_digest);
    expect(String(row.ticket_key).length).toBeGreaterThan(0);
    extra?.(row);
  }
}

describe('fuzz: vendor webhooks without valid authentication store nothing', () => {
  it(`DataGrail: near-valid signatures and timestamps (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    // Each case breaks authentication in one way by construction; everything else may be anything.
    const forgery = fc.oneof(
      fc.record({ kind: fc.constant('wrong-secret' as const), secret: fc.string({ maxLength: 40 }).filter((s) => s !== DG_SECRET) }),
      fc.record({ kind: fc.constant('stale' as const), skew: fc.oneof(fc.integer({ min: 301, max: 10 ** 9 }), fc.integer({ min: -(10 ** 9), max: -301 })) }),
      fc.record({ kind: fc.constant('other-timestamp' as const), sent: fc.oneof(fc.integer().map(String), headerValue) }),
      fc.record({ kind: fc.constant('other-body' as const), signed: fc.string({ maxLength: 60 }) }),
      // Only the first 42 characters carry 6 signature bits each; the 43rd has spare bits a flip may leave unchanged.
      fc.record({ kind: fc.constant('flipped' as const), at: fc.nat(41), pick: fc.nat(), prefix: fc.boolean() }),
      // At most 42 kept: the 44th character is '=' padding, and the first 43 alone still decode to the same 32 bytes.
      fc.record({ kind: fc.constant('truncated' as const), keep: fc.nat(42) }),
      fc.record({ kind: fc.constant('garbage' as const), signature: headerValue, timestamp: fc.option(headerValue) }),
      fc.record({ kind: fc.constant('missing' as const), which: fc.constantFrom('signature', 'timestamp', 'both') }),
    );
    await fc.assert(
      fc.asyncProperty(bodyText(dgBody()), forgery, contentType, extraHeaders, async (body, f, ct, extra) => {
        const now = Math.floor(Date.now() / 1000);
        let timestamp: string | undefined = String(now);
        let signature: string | undefined = signDataGrail(DG_SECRET, now, body);
        switch (f.kind) {
          case 'wrong-secret':
            signature = signDataGrail(f.secret, now, body);
            break;
          case 'stale':
            timestamp = String(now + f.skew);
            signature = signDataGrail(DG_SECRET, timestamp, body);
            break;
          case 'other-timestamp':
            if (f.sent.trim() === timestamp) return;
            timestamp = f.sent;
            break;
          case 'other-body':
            if (f.signed === body) return;
            signature = signDataGrail(DG_SECRET, now, f.signed);
            break;
          case 'flipped':
            signature = `${f.prefix ? 'v1=' : ''}${flip(signature, f.at, B64, f.pick)}`;
            break;
          case 'truncated':
            signature = signature.slice(0, f.keep);
            break;
          case 'garbage':
            signature = f.signature;
            timestamp = f.timestamp ?? undefined;
            break;
          case 'missing':
            if (f.which !== 'timestamp') signature = undefined;
            if (f.which !== 'signature') timestamp = undefined;
        }
        const headers: Record<string, string> = { ...extra, 'content-type': ct };
        if (timestamp !== undefined) headers['x-webhook-timestamp'] = timestamp;
        if (signature !== undefined) headers['x-webhook-signature'] = signature;
        await expectNothingStored({ method: 'POST', path: `/webhooks/datagrail/${conn.datagrail}`, headers, body });
      }),
      params,
    );
  });

  it(`OneTrust: near-valid bearer credentials (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    const nonSpace = charCode(0x21, 0x7e);
    const credential = fc.oneof(
      fc.constant(undefined),
      headerValue.filter((v) => !v.includes(OT_SECRET)),
      fc.record({ at: fc.nat(), pick: fc.nat() }).map(({ at, pick }) => `Bearer ${flip(OT_SECRET, at, 'abcdefghijklmnopqrstuvwxyz-_0123456789', pick)}`),
      fc.nat().map((n) => `Bearer ${OT_SECRET.slice(0, n % OT_SECRET.length)}`),
      nonSpace.map((c) => `Bearer ${OT_SECRET}${c}`),
      nonSpace.map((c) => `Bearer ${c}${OT_SECRET}`),
      fc.constantFrom(`Basic ${OT_SECRET}`, `Token ${OT_SECRET}`, `${OT_SECRET}`, `Bearer`, `Bearer ${OT_SECRET.toUpperCase()}`),
      fc.constantFrom(`Basic ${Buffer.from(`user:${OT_SECRET}`).toString('base64')}`, `Bearer ${ws.adminKey}`),
    );
    await fc.assert(
      fc.asyncProperty(bodyText(otBody()), credential, contentType, extraHeaders, async (body, auth, ct, extra) => {
        const headers: Record<string, string> = { ...extra, 'content-type': ct };
        if (auth !== undefined) headers.authorization = auth;
        await expectNothingStored({ method: 'POST', path: `/webhooks/onetrust/${conn.onetrust}`, headers, body });
      }),
      params,
    );
  });

  it(`Transcend: forged, expired, mismatched and mangled tokens (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    // Signing is the slow part: a pool of forgeries made once, mangled and combined per case.
    const forged = await Promise.all([
      transcend.signToken({ sign: 'wrong-key' }),
      transcend.signToken({ sign: 'hs256' }),
      transcend.signToken({ sign: 'none' }),
      transcend.signToken({ expiresIn: -120 }),
      transcend.signToken({ audience: 'someone-else' }),
      transcend.signToken({ claims: { nbf: Math.floor(Date.now() / 1000) + 3600 } }),
      transcend.signToken({ scope: 'somethingElse' }),
    ]);
    const valid = await Promise.all(Array.from({ length: 8 }, (_, i) => transcend.signToken({ value: `core-${i}` })));
    const token = fc.oneof(
      fc.constantFrom(...forged).map((t) => ({ token: t as string | undefined, core: '19530621' })),
      // A valid token for one identifier, on a body that names another.
      fc.record({ i: fc.nat(7), core: fc.string({ minLength: 1, maxLength: 20 }) })
        .filter(({ i, core }) => core !== `core-${i}`)
        .map(({ i, core }) => ({ token: valid[i]!, core })),
      // One character of a valid token's signature changed (ES384: 96 bytes, no spare bits, so any change counts).
      fc.record({ i: fc.nat(7), at: fc.nat(), pick: fc.nat() }).map(({ i, at, pick }) => {
        const [h, p, s] = valid[i]!.split('.');
        return { token: `${h}.${p}.${flip(s!, at, B64URL, pick)}`, core: `core-${i}` };
      }),
      fc.record({ t: headerValue, core: fc.constant('19530621') }).map(({ t, core }) => ({ token: t as string | undefined, core })),
      fc.constant({ token: undefined, core: '19530621' }),
    );
    await fc.assert(
      fc.asyncProperty(
        token,
        fc.constantFrom('ERASURE', 'SALE_OPT_OUT', 'ACCESS', 'CONTACT_OPT_OUT', 'x'),
        fc.option(email, { nil: undefined }),
        fc.option(headerValue, { nil: undefined }),
        contentType,
        async (t, type, identifier, nonce, ct) => {
          const w = await transcend.webhook({
            type,
            coreId: t.core,
            token: t.token ?? null,
            nonce: nonce ?? null,
            profile: identifier === undefined ? null : { identifier, type: 'email' },
          });
          const headers = { ...w.headers, 'content-type': ct };
          await expectNothingStored({ method: 'POST', path: `/webhooks/transcend/${conn.transcend}`, headers, body: w.body });
        },
      ),
      params,
    );
  });
});

describe('fuzz: vendor webhooks with valid authentication and arbitrary bodies', () => {
  it(`DataGrail: HMAC over the fuzzed body; never 5xx, stored tickets well-formed (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    await fc.assert(
      fc.asyncProperty(bodyText(dgBody()), fc.boolean(), extraHeaders, async (body, prefix, extra) => {
        const now = Math.floor(Date.now() / 1000);
        const signature = signDataGrail(DG_SECRET, now, body);
        const headers = {
          ...extra,
          'content-type': 'application/json',
          'x-webhook-timestamp': String(now),
          'x-webhook-signature': prefix ? `v1=${signature}` : signature,
        };
        await expectWellFormed({ method: 'POST', path: `/webhooks/datagrail/${conn.datagrail}`, headers, body }, conn.datagrail, (row) => {
          // The one outbound address a webhook body may name: it must be on the connector's allowed hosts.
          const callback = new URL((row.upstream as { callbackUrl: string }).callbackUrl);
          expect(callback.hostname).toBe('127.0.0.1');
          expect(['http:', 'https:']).toContain(callback.protocol);
          const sent = JSON.parse(body) as { webhook_request_id: string };
          expect(row.ticket_key).toBe(sent.webhook_request_id.trim());
        });
      }),
      params,
    );
    completed.add('datagrail');
  });

  it(`OneTrust: the right bearer secret; never 5xx, stored tickets well-formed (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    await fc.assert(
      fc.asyncProperty(bodyText(otBody()), fc.constantFrom('Bearer', 'bearer', 'BEARER'), extraHeaders, async (body, scheme, extra) => {
        const headers = { ...extra, 'content-type': 'application/json', authorization: `${scheme} ${OT_SECRET}` };
        await expectWellFormed({ method: 'POST', path: `/webhooks/onetrust/${conn.onetrust}`, headers, body }, conn.onetrust, (row) => {
          const sent = JSON.parse(body) as { requestQueueRefId: string };
          expect(row.upstream_ref).toBe(sent.requestQueueRefId.trim());
        });
      }),
      params,
    );
    completed.add('onetrust');
  });

  it(`Transcend: a valid token on fuzzed near-valid bodies; never 5xx, stored tickets well-formed (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(fc.constantFrom('ERASURE', 'SALE_OPT_OUT', 'ACCESS', 'CONTACT_OPT_OUT', 'TRACKING_OPT_OUT'), fc.string({ maxLength: 12 })),
        fc.string({ minLength: 1, maxLength: 30 }),
        fc.option(fc.record({ identifier: fc.oneof(email, fc.string({ maxLength: 20 })), type: fc.constantFrom('email', 'phone', 'userId', '') }), { nil: null }),
        fc.option(fc.oneof(id, fc.string({ maxLength: 20 })), { nil: null }),
        fc.oneof({ arbitrary: headerValue.filter((v) => v.trim().length > 0), weight: 4 }, fc.constant(null)),
        fc.dictionary(fc.constantFrom('isTest', 'dataSubject', 'requestIdentifier', 'extras', 'type'), fc.jsonValue({ maxDepth: 2 }), { maxKeys: 2 }),
        async (type, coreId, profile, requestId, nonce, overrides) => {
          const w = await transcend.webhook({ type, coreId, profile, requestId, nonce });
          const body = JSON.stringify({ ...(JSON.parse(w.body) as object), ...overrides });
          await expectWellFormed({ method: 'POST', path: `/webhooks/transcend/${conn.transcend}`, headers: w.headers, body }, conn.transcend, (row) => {
            expect(typeof row.secret_sealed === 'string' && row.secret_sealed.startsWith('v1.'), JSON.stringify(row)).toBe(true);
          });
        },
      ),
      params,
    );
    completed.add('transcend');
  });
});

describe('fuzz: privacy API', () => {
  const action = fc.constantFrom('erase', 'suppress', 'unsuppress', 'hold', 'release_hold');
  const externalRequestId = fc.option(fc.oneof({ arbitrary: id, weight: 3 }, fc.string({ minLength: 1, maxLength: 20 })), { nil: undefined });
  // One of the three valid shapes (user id, email, whole workspace), then fields kept, dropped or replaced.
  const item = fc.oneof(
    nearValid({ action, scope: fc.constantFrom('user', undefined), userId: fc.oneof(id, fc.string({ minLength: 1, maxLength: 30 })), externalRequestId }),
    nearValid({ action, email, externalRequestId }),
    nearValid({ action, scope: fc.constant('workspace'), externalRequestId }),
  );
  const privacyBody = fc.oneof(
    { arbitrary: bodyText(item), weight: 4 },
    fc.array(fc.oneof({ arbitrary: item, weight: 4 }, fc.jsonValue({ maxDepth: 2 })), { maxLength: 5 }).map((requests) => JSON.stringify({ requests })),
    fc.constantFrom(
      JSON.stringify({ requests: [] }),
      JSON.stringify({ requests: Array.from({ length: 101 }, (_, i) => ({ action: 'suppress', userId: `over-${i}` })) }),
      JSON.stringify({ requests: [{ action: 'suppress', userId: 'u' }], extra: 1 }),
    ),
  );

  it(`POST /v1/privacy/requests with a privacy key: stores exactly what it accepts (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    await fc.assert(
      fc.asyncProperty(privacyBody, contentType, async (body, ct) => {
        const before = await counts();
        const res = await send({
          method: 'POST',
          path: '/v1/privacy/requests',
          headers: { authorization: `Bearer ${ws.privacyKey}`, 'content-type': ct },
          body,
        });
        judge(res);
        const after = await counts();
        if (res.status !== 202) {
          expect(after, `nothing may be stored on a ${res.status}`).toEqual(before);
          return;
        }
        const parsed = JSON.parse(body) as { requests?: unknown[] };
        const items: unknown[] = Array.isArray(parsed.requests) ? parsed.requests : [parsed];
        const { results } = JSON.parse(res.text) as {
          results: { index: number; accepted: boolean; requestId?: string; replayed?: boolean; reason?: string }[];
        };
        expect(results.map((r) => r.index)).toEqual(items.map((_, i) => i));
        const created = results.filter((r) => r.accepted && !r.replayed);
        expect(after.requests - before.requests).toBe(created.length);
        expect(after.jobs - before.jobs).toBe(created.length);
        expect(after.tickets).toBe(before.tickets);
        for (const r of results) {
          if (!r.accepted) {
            expect(['invalid', 'duplicate_pending', 'conflict']).toContain(r.reason);
            continue;
          }
          const input = items[r.index] as { action: string; scope?: string };
          const [row] = await env.sql`select * from dsr_requests where id = ${r.requestId!}`;
          expect(row).toMatchObject({ workspace_id: ws.workspaceId, action: input.action, scope: input.scope ?? 'user', actor_type: 'api_key' });
          if (row!.subject_kind !== 'workspace') {
            expect(subjectDigest(env.deps.digestKey, ws.workspaceId, row!.subject_kind, row!.subject_value), JSON.stringify(row)).toBe(row!.subject_digest);
          }
        }
      }),
      params,
    );
    completed.add('privacy');
  });

  it(`privacy routes without valid credentials store nothing and answer 401/403 (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    const key = ws.privacyKey;
    const prefix = 'dsr_privacy_';
    const credential = fc.oneof(
      fc.constant({}),
      headerValue.filter((v) => !v.includes(key)).map((v) => ({ authorization: v })),
      fc.record({ at: fc.nat(), pick: fc.nat() }).map(({ at, pick }) => ({
        authorization: `Bearer ${prefix}${flip(key.slice(prefix.length), at, B64URL, pick)}`,
      })),
      fc.nat().map((n) => ({ authorization: `Bearer ${key.slice(0, n % key.length)}` })),
      fc.constantFrom(
        { authorization: `Bearer ${ws.ingestKey}` },
        { authorization: `Bearer ${ws.adminKey}` },
        { authorization: `Bearer ${other.ingestKey}` },
        { authorization: `Basic ${key}` },
        { authorization: `${key}` },
        { authorization: `Bearer ${key} ${key}` },
        { authorization: `Bearer ${prefix}${'A'.repeat(43)}` },
      ),
      fc.record({ session: headerValue, csrf: fc.option(headerValue, { nil: undefined }) }).map(({ session, csrf }) => ({
        cookie: `dsr_session=${session.replace(/[;,\s]/g, '')}`,
        ...(csrf === undefined ? {} : { 'x-csrf-token': csrf }),
      })),
    );
    await fc.assert(
      fc.asyncProperty(credential, privacyBody, fc.constantFrom('POST', 'GET'), async (cred, body, method) => {
        const res = await expectNothingStored({
          method,
          path: method === 'POST' ? '/v1/privacy/requests' : `/v1/privacy/requests?limit=5`,
          headers: { ...cred, 'content-type': 'application/json' },
          ...(method === 'POST' ? { body } : {}),
        });
        // A wrong-scope key is 403; every other failure to authenticate is 401; the body is never looked at first.
        expect([401, 403], res.text).toContain(res.status);
      }),
      params,
    );
  });

  it(`GET filters and ids with arbitrary values: never 5xx, pages well-formed (${RUNS} cases)`, { timeout: PROPERTY_TIMEOUT }, async () => {
    const value = fc.oneof(
      anyText,
      fc.constantFrom('queued', 'complete', 'failed', 'running', 'pending', 'delivered', 'erase', 'erased', '0', '-1', '101', '1e3', 'NaN', ''),
      email,
      fc.string({ unit: charCode(0x25, 0x25), maxLength: 3 }).map((p) => `${p}E0%A4%A`),
    );
    const names = fc.constantFrom('status', 'externalRequestId', 'userId', 'email', 'upstreamRef', 'upstreamStatus', 'limit', 'cursor', 'requestId', 'action', 'outcome', 'x');
    const route = fc.oneof(
      fc.record({ list: fc.constantFrom('/v1/privacy/requests', '/v1/privacy/audit', '/v1/privacy/holds'), query: fc.array(fc.tuple(names, value), { maxLength: 4 }), raw: fc.boolean() }),
      fc.record({ one: fc.constantFrom('/v1/privacy/requests/', '/v1/privacy/audit/'), id: fc.oneof(anyText, fc.constantFrom(`req_${'a'.repeat(25)}`, 'aud_', '..', '%00', '%', 'x'.repeat(200))) }),
    );
    await fc.assert(
      fc.asyncProperty(route, async (r) => {
        let path: string;
        if ('list' in r) {
          // Raw: the query exactly as generated (malformed percent-encoding included); else properly encoded.
          const query = r.raw
            ? r.query.map(([k, v]) => `${k}=${v.replace(/[#\s]/g, '')}`).join('&')
            : new URLSearchParams(r.query).toString();
          path = `${r.list}?${query}`;
        } else {
          path = `${r.one}${encodeURIComponent(r.id)}`;
        }
        const res = await send({ method: 'GET', path, headers: { authorization: `Bearer ${ws.privacyKey}` } });
        judge(res);
        if (res.status === 200 && 'list' in r) {
          const page = JSON.parse(res.text) as { data: { id: string }[]; nextCursor: string | null };
          expect(Object.keys(page).sort()).toEqual(['data', 'nextCursor']);
          expect(Array.isArray(page.data)).toBe(true);
        }
        if ('one' in r) expect([200, 400, 404], res.text).toContain(res.status);
      }),
      params,
    );
  });
});

it('the fuzzed traffic reached the stores it was meant to (the valid-auth properties stored tickets)', async () => {
  // Guards against a generator that never produces an acceptable request, which would make the properties vacuous.
  const rows = await env.sql<{ connector_id: string; n: number }[]>`
    select connector_id, count(*)::int as n from upstream_tickets group by connector_id`;
  const by = Object.fromEntries(rows.map((r) => [r.connector_id, r.n]));
  for (const [vendor, id] of Object.entries(conn)) {
    if (completed.has(vendor)) expect(by[id] ?? 0, vendor).toBeGreaterThan(Math.min(10, RUNS / 20));
  }
  const [req] = await env.sql<{ n: number }[]>`
    select count(*)::int as n from dsr_requests where actor_type = 'api_key' and workspace_id = ${ws.workspaceId}`;
  if (completed.has('privacy')) expect(req!.n).toBeGreaterThan(Math.min(10, RUNS / 20));
});

describe('found by fuzzing', () => {
  // intake stores a user id trimmed (src/privacy/intake.ts, `subjectValue: subject.value.trim()`) while its digest,
  // ingest and the privacy API keep it exactly as given: the job then looks for another external id.
  it('an erasure of a user id with surrounding spaces erases that user, not the one without them', async () => {
    const own = await createTestEnv();
    try {
      const w = await own.newWorkspace('Padded user ids');
      for (const userId of [' padded-user ', 'padded-user']) {
        const res = await call(own, 'POST', '/v1/track', { key: w.ingestKey, body: { userId, event: 'opened' } });
        expect(res.status, res.text).toBe(200);
        expect(res.json).toMatchObject({ stored: true });
      }
      const created = await call(own, 'POST', '/v1/privacy/requests', {
        key: w.privacyKey,
        body: { action: 'erase', userId: ' padded-user ' },
      });
      expect(created.status, created.text).toBe(202);
      const requestId = created.json.results[0].requestId as string;
      await own.runJobs();
      const [req] = await own.sql`select status, outcome from dsr_requests where id = ${requestId}`;
      expect(req).toEqual({ status: 'complete', outcome: 'erased' });
      expect(await userFootprint(own, w.workspaceId, ' padded-user ')).toMatchObject({ profiles: 0, events: 0 });
      expect(await userFootprint(own, w.workspaceId, 'padded-user')).toMatchObject({ profiles: 1, events: 1 });
    } finally {
      await own.close();
    }
  });
});
