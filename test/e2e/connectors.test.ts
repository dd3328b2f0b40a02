/**
 * End to end through the real server process (`npm start` equivalent, role all) and real loopback fakes of the three
 * vendors: webhook in → ticket, request and job committed → erasure → audit record → report delivered upstream.
 * Everything goes over HTTP; the database is only read, to check what the API cannot show.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  FAKE_DATAGRAIL_API_KEY,
  FAKE_DATAGRAIL_WEBHOOK_SECRET,
  datagrailBody,
  datagrailWebhook,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { commentsRoute, onetrustWebhook, startFakeOneTrust, statusRoute, TOKEN_ROUTE, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { createTestEnv, request, type TestEnv } from '../helpers/db.ts';
import { uniq, userFootprint } from '../helpers/factories.ts';
import { failFirst, type FakeReply, type FakeVendor } from '../helpers/fake-vendor.ts';
import { freePort } from '../helpers/global-setup.ts';
import { childEnv, poll, startService, type Service } from '../helpers/process.ts';

const TRANSCEND_PUT = 'PUT /v1/data-silo';
const OT_CLIENT = { clientId: 'ot-e2e-client', clientSecret: 'ot-e2e-client-secret' };
const OT_INBOUND_SECRET = 'ot-e2e-inbound-secret';

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

interface RequestView {
  id: string;
  status: string;
  outcome: string | null;
  auditRecordId: string | null;
  upstreamStatus: 'pending' | 'delivered' | 'failed' | null;
  upstream: { ticketId: string; status: string; attempts: number; lastError: string | null; deliveredAt: string | null }[];
}

let env: TestEnv;
let ws: CreatedWorkspace;
let service: Service;
let base = '';
let dataDir = '';
let transcend: FakeTranscend;
let onetrust: FakeOneTrust;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
const extraFakes: { stop(): Promise<void> }[] = [];

const http = (method: string, urlPath: string, opts?: Parameters<typeof request>[3]) =>
  request((p, init) => fetch(`${base}${p}`, init), method, urlPath, opts);

/** factories.seedUser, over the network: a profile with an email, events, a conversation and a Topics question. */
async function seedUser(opts: { email?: string; events?: number } = {}) {
  const userId = uniq('e2e-user');
  const email = opts.email ?? `${userId}@example.test`;
  const conversationId = uniq('conv');
  const batch = [
    { type: 'identify', userId, email, name: 'Test Person', role: 'member', plan: 'pro', traits: { a: 1 } },
    ...Array.from({ length: opts.events ?? 3 }, (_, i) => ({ type: 'track', userId, event: `event_${i}` })),
    { type: 'message', userId, conversationId, role: 'user', content: 'hello there' },
    { type: 'message', userId, conversationId, role: 'assistant', content: 'hi, how can I help?' },
    { type: 'topic_question', userId, question: 'how do I export?' },
  ];
  const res = await http('POST', '/v1/batch', { key: ws.ingestKey, body: { batch } });
  expect(res.status, res.text).toBe(200);
  const fp = await userFootprint(env, ws.workspaceId, userId);
  expect(fp).toMatchObject({ profiles: 1, events: opts.events ?? 3, messages: 2 });
  return { userId, email };
}

async function createConnector(vendor: string, config: Record<string, unknown>, secrets: Record<string, unknown>) {
  const res = await http('POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: { vendor, name: `${vendor} e2e ${randomBytes(2).toString('hex')}`, config, secrets },
  });
  expect(res.status, res.text).toBe(201);
  expect(res.json.webhookPath).toBe(`/webhooks/${vendor}/${res.json.id}`);
  return res.json as { id: string; webhookPath: string };
}

async function sendWebhook(webhookPath: string, headers: Record<string, string>, rawBody: string) {
  const res = await http('POST', webhookPath, { headers, body: rawBody });
  return res as { status: number; json: { received: { ticketId: string; requestId: string }[] }; text: string };
}

async function getRequest(id: string): Promise<RequestView> {
  const res = await http('GET', `/v1/privacy/requests/${id}`, { key: ws.privacyKey });
  expect(res.status, res.text).toBe(200);
  return res.json as RequestView;
}

/** Polls the request until `done` holds; on timeout the last view is in the error. */
async function waitForRequest(id: string, done: (r: RequestView) => boolean, timeoutMs = 20_000): Promise<RequestView> {
  let last: RequestView | undefined;
  try {
    return await poll(async () => {
      last = await getRequest(id);
      return done(last) ? last : undefined;
    }, timeoutMs);
  } catch (err) {
    throw new Error(`${(err as Error).message}; last state: ${JSON.stringify(last)}`, { cause: err });
  }
}

const delivered = (r: RequestView) => r.upstreamStatus === 'delivered';
const settled = (r: RequestView) => r.upstreamStatus === 'delivered' || r.upstreamStatus === 'failed';

/** DataGrail callbacks for one webhook_request_id, in arrival order. */
const callbacksFor = (fake: FakeVendor, webhookRequestId: string) =>
  fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).filter((c) => (c.json as Json)?.webhook_request_id === webhookRequestId);

async function dbCount(query: Promise<{ n: number }[]>): Promise<number> {
  const [row] = await query;
  return row!.n;
}

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Connectors e2e');
  [transcend, onetrust, datagrail] = await Promise.all([
    startFakeTranscend(),
    startFakeOneTrust(OT_CLIENT),
    startFakeDataGrail(),
  ]);
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-connectors-e2e-'));
  service = startService(
    childEnv({
      DATABASE_URL: env.url,
      DATA_DIR: dataDir,
      PORT: String(await freePort()),
      DSR_DIGEST_KEY: randomBytes(32).toString('base64'),
      DSR_ENCRYPTION_KEY: randomBytes(32).toString('base64'),
      OUTBOUND_ALLOW_PRIVATE_NETWORKS: 'true',
      REPORT_BACKOFF_BASE_MS: '100',
      REPORT_BACKOFF_MAX_MS: '400',
      REPORT_MAX_ATTEMPTS: '8',
    }),
  );
  base = await service.ready;
  expect(base).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
});

afterAll(async () => {
  let exitCode: number | null | 'hung' = null;
  if (service && service.proc.exitCode === null) {
    service.proc.kill('SIGINT');
    exitCode = await Promise.race([service.exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 10_000))]);
    if (exitCode === 'hung') service.proc.kill('SIGKILL');
  }
  await Promise.all([transcend?.stop(), onetrust?.stop(), datagrail?.fake.stop(), ...extraFakes.map((f) => f.stop())]);
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
  await env?.close();
  if (service) {
    expect(exitCode, service.output()).toBe(0);
    // Warnings were logged (refused webhook, retried reports): none may carry a subject's email.
    expect(service.output()).not.toMatch(/@example\.test/);
    expect(service.output()).not.toMatch(/"level":(50|60)/);
  }
});

describe('connectors end to end (real server, loopback vendor fakes)', () => {
  it('Transcend: signed webhook → erasure → PUT /v1/data-silo with the nonce and the audit record id', async () => {
    const user = await seedUser();
    const conn = await createConnector('transcend', transcend.config({ identifierTypes: { email: 'email' } }), transcend.secrets);
    const { headers, body } = await transcend.webhook({ profile: { identifier: user.email, type: 'email' } });
    const nonce = headers['x-transcend-nonce']!;

    const res = await sendWebhook(conn.webhookPath, headers, body);
    expect(res.status, res.text).toBe(200);
    expect(res.json.received).toHaveLength(1);
    const { ticketId, requestId } = res.json.received[0]!;
    expect(ticketId).toMatch(/^tkt_/);
    expect(requestId).toMatch(/^req_/);

    const done = await waitForRequest(requestId, delivered);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    expect(done.auditRecordId).toMatch(/^aud_/);
    expect(done.upstream).toEqual([
      expect.objectContaining({ ticketId, status: 'delivered', attempts: 1, lastError: null, deliveredAt: expect.any(String) }),
    ]);

    // What Transcend received: exactly one completion, with the job's nonce and the proof in `message`.
    const puts = transcend.fake.callsTo(TRANSCEND_PUT);
    expect(puts).toHaveLength(1);
    expect(puts[0]!.headers['x-transcend-nonce']).toBe(nonce);
    expect(puts[0]!.headers.authorization).toBe(`Bearer ${transcend.secrets.apiKey}`);
    expect(puts[0]!.json).toMatchObject({ profileStatus: 'RESOLVED' });
    expect((puts[0]!.json as Json).message).toContain(done.auditRecordId);
    // The signing key was fetched to verify the token.
    expect(transcend.fake.callsTo('GET /public-keys/sombra-general-signing-key').length).toBeGreaterThanOrEqual(1);

    // Nothing of the subject is left, and the nonce (a capability) was wiped once used.
    expect(await userFootprint(env, ws.workspaceId, user.userId)).toEqual({
      profiles: 0,
      events: 0,
      messages: 0,
      convs: 0,
      questions: 0,
      flags: 0,
    });
    const [ticket] = await env.sql`select status, secret_sealed from upstream_tickets where id = ${ticketId}`;
    expect(ticket).toEqual({ status: 'delivered', secret_sealed: null });
    const [audit] = await env.sql`select request_id, outcome from audit_records where id = ${done.auditRecordId}`;
    expect(audit).toEqual({ request_id: requestId, outcome: 'erased' });
  });

  it('OneTrust: bearer-authenticated webhook → COMPLETED status and internal comment; a revoked token is replaced once', async () => {
    const conn = await createConnector(
      'onetrust',
      { baseUrl: onetrust.url, inboundAuth: { type: 'bearer' } },
      { ...OT_CLIENT, inboundSecret: OT_INBOUND_SECRET },
    );
    const auth = { type: 'bearer' as const, secret: OT_INBOUND_SECRET };

    // Unauthenticated: refused, nothing stored.
    const refused = onetrustWebhook({ body: { subTaskId: randomUUID() } });
    expect((await sendWebhook(conn.webhookPath, refused.headers, refused.rawBody)).status).toBe(401);

    // First ticket.
    const user1 = await seedUser();
    const first = { subTaskId: randomUUID(), requestQueueRefId: `REF${randomBytes(4).toString('hex').toUpperCase()}` };
    onetrust.expectSubtask(first.subTaskId, first.requestQueueRefId);
    const w1 = onetrustWebhook({ auth, body: { ...first, requestTypes: ['Delete Data'], email: user1.email } });
    const r1 = await sendWebhook(conn.webhookPath, w1.headers, w1.rawBody);
    expect(r1.status, r1.text).toBe(200);
    const req1 = r1.json.received[0]!.requestId;
    const done1 = await waitForRequest(req1, settled);
    expect(done1).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    expect(done1.upstream).toEqual([expect.objectContaining({ status: 'delivered', attempts: 1, lastError: null })]);
    expect((await userFootprint(env, ws.workspaceId, user1.userId)).profiles).toBe(0);

    expect(onetrust.fake.callsTo(TOKEN_ROUTE)).toHaveLength(1);
    expect(onetrust.tokensIssued()).toBe(1);
    const status1 = onetrust.fake.callsTo(statusRoute(first.subTaskId));
    expect(status1).toHaveLength(1);
    expect(status1[0]!.headers.authorization).toBe('Bearer tok_1');
    expect(status1[0]!.json).toMatchObject({ status: 'COMPLETED' });
    expect((status1[0]!.json as Json).comment).toContain(done1.auditRecordId);
    const comments1 = onetrust.fake.callsTo(commentsRoute(first.requestQueueRefId));
    expect(comments1).toHaveLength(1);
    expect(comments1[0]!.json).toMatchObject({ internalComment: true });
    expect((comments1[0]!.json as Json).comment).toContain(done1.auditRecordId);

    // Token revoked upstream before its expiry: the cached token gets a 401, one fresh token is fetched.
    onetrust.expireTokens();
    const issuedBefore = onetrust.tokensIssued();
    const user2 = await seedUser();
    const second = { subTaskId: randomUUID(), requestQueueRefId: `REF${randomBytes(4).toString('hex').toUpperCase()}` };
    onetrust.expectSubtask(second.subTaskId, second.requestQueueRefId);
    const w2 = onetrustWebhook({ auth, body: { ...second, requestTypes: ['Delete Data'], email: user2.email } });
    const r2 = await sendWebhook(conn.webhookPath, w2.headers, w2.rawBody);
    expect(r2.status, r2.text).toBe(200);
    const req2 = r2.json.received[0]!.requestId;
    expect(req2).not.toBe(req1);
    const done2 = await waitForRequest(req2, settled);
    expect(done2).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    // The 401 was absorbed inside one delivery attempt.
    expect(done2.upstream).toEqual([expect.objectContaining({ status: 'delivered', attempts: 1, lastError: null })]);

    expect(onetrust.tokensIssued()).toBe(issuedBefore + 1);
    const status2 = onetrust.fake.callsTo(statusRoute(second.subTaskId));
    // First with the revoked token (answered 401), then with the new one.
    expect(status2.map((c) => c.headers.authorization)).toEqual(['Bearer tok_1', 'Bearer tok_2']);
    expect(status2[1]!.json).toMatchObject({ status: 'COMPLETED' });
    expect((status2[1]!.json as Json).comment).toContain(done2.auditRecordId);
    const comments2 = onetrust.fake.callsTo(commentsRoute(second.requestQueueRefId));
    expect(comments2).toHaveLength(1);
    expect(comments2[0]!.headers.authorization).toBe('Bearer tok_2');
    expect((comments2[0]!.json as Json).comment).toContain(done2.auditRecordId);
  });

  it('DataGrail: signed deletion → completed callback with records found; an unknown email is completed with 0 records', async () => {
    const conn = await createConnector(
      'datagrail',
      { callbackHosts: ['127.0.0.1'] },
      { webhookSecret: FAKE_DATAGRAIL_WEBHOOK_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    );
    const user = await seedUser();
    const found = randomUUID();
    const w1 = datagrailWebhook({
      secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
      body: datagrailBody({ webhook_request_id: found, identifiers: { email: user.email }, callback_url: datagrail.callbackUrl() }),
    });
    const r1 = await sendWebhook(conn.webhookPath, w1.headers, w1.rawBody);
    expect(r1.status, r1.text).toBe(200);
    const done1 = await waitForRequest(r1.json.received[0]!.requestId, settled);
    expect(done1).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    expect(await userFootprint(env, ws.workspaceId, user.userId)).toMatchObject({ profiles: 0, events: 0, messages: 0 });

    const cb1 = callbacksFor(datagrail.fake, found);
    expect(cb1).toHaveLength(1);
    expect(cb1[0]!.headers.authorization).toBe(`Bearer ${FAKE_DATAGRAIL_API_KEY}`);
    expect(cb1[0]!.json).toMatchObject({ status: 'completed', audit_record_id: done1.auditRecordId });
    expect((cb1[0]!.json as Json).records_found).toBeGreaterThan(0);

    // Nobody has this email: "no data found" is a completion, never a failure.
    const missing = randomUUID();
    const w2 = datagrailWebhook({
      secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
      body: datagrailBody({
        webhook_request_id: missing,
        identifiers: { email: `${uniq('nobody')}@example.test` },
        callback_url: datagrail.callbackUrl(),
      }),
    });
    const r2 = await sendWebhook(conn.webhookPath, w2.headers, w2.rawBody);
    expect(r2.status, r2.text).toBe(200);
    const done2 = await waitForRequest(r2.json.received[0]!.requestId, settled);
    expect(done2).toMatchObject({ status: 'complete', outcome: 'not_found', upstreamStatus: 'delivered' });
    const cb2 = callbacksFor(datagrail.fake, missing);
    expect(cb2).toHaveLength(1);
    expect(cb2[0]!.json).toMatchObject({ status: 'completed', records_found: 0, audit_record_id: done2.auditRecordId });
  });

  it('vendor down, then up: pending with the 503 shown while failing, delivered on the 4th call', async () => {
    const down = await startFakeDataGrail();
    extraFakes.push(down.fake);
    const flaky = failFirst(3, { status: 503, body: { error: 'maintenance' } }, { status: 200, body: {} });
    // The successful answer waits until the test has seen the failing state, so that state cannot be missed.
    let sawPending!: () => void;
    const seen = new Promise<void>((r) => (sawPending = r));
    down.fake.on(DATAGRAIL_CALLBACK_ROUTE, async (call, fake): Promise<FakeReply> => {
      const reply = await flaky(call, fake);
      if (reply.status === 200) await seen;
      return reply;
    });
    const conn = await createConnector(
      'datagrail',
      { callbackHosts: ['127.0.0.1'] },
      { webhookSecret: FAKE_DATAGRAIL_WEBHOOK_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    );
    const user = await seedUser();
    const id = randomUUID();
    const w = datagrailWebhook({
      secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
      body: datagrailBody({ webhook_request_id: id, identifiers: { email: user.email }, callback_url: down.callbackUrl() }),
    });
    const r = await sendWebhook(conn.webhookPath, w.headers, w.rawBody);
    expect(r.status, r.text).toBe(200);
    const requestId = r.json.received[0]!.requestId;

    try {
      const failing = await waitForRequest(
        requestId,
        (v) => v.upstreamStatus === 'pending' && (v.upstream[0]?.lastError ?? '').includes('503'),
      );
      expect(failing).toMatchObject({ status: 'complete', outcome: 'erased' });
      expect(failing.upstream[0]!.attempts).toBeGreaterThanOrEqual(1);
      expect(failing.upstream[0]!.deliveredAt).toBeNull();
    } finally {
      sawPending();
    }

    const done = await waitForRequest(requestId, settled, 25_000);
    expect(done).toMatchObject({ upstreamStatus: 'delivered' });
    expect(done.upstream).toEqual([expect.objectContaining({ status: 'delivered', attempts: 4, lastError: null })]);
    const calls = down.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE);
    expect(calls).toHaveLength(4);
    for (const c of calls) expect(c.json).toMatchObject({ webhook_request_id: id, audit_record_id: done.auditRecordId });
  }, 45_000);

  it('409 from Transcend counts as delivered (the job was already closed upstream), after exactly one call', async () => {
    const closed = await startFakeTranscend();
    extraFakes.push(closed);
    closed.fake.on(TRANSCEND_PUT, { status: 409, body: { error: 'Request already completed' } });
    const conn = await createConnector('transcend', closed.config({ identifierTypes: { email: 'email' } }), closed.secrets);
    const user = await seedUser();
    const { headers, body } = await closed.webhook({ profile: { identifier: user.email, type: 'email' } });
    const r = await sendWebhook(conn.webhookPath, headers, body);
    expect(r.status, r.text).toBe(200);
    const done = await waitForRequest(r.json.received[0]!.requestId, settled);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    expect(done.upstream).toEqual([
      expect.objectContaining({ status: 'delivered', attempts: 1, lastError: null, deliveredAt: expect.any(String) }),
    ]);
    const puts = closed.fake.callsTo(TRANSCEND_PUT);
    expect(puts).toHaveLength(1);
    expect(puts[0]!.headers['x-transcend-nonce']).toBe(headers['x-transcend-nonce']);
  });

  it('10 concurrent copies of one DataGrail webhook: identical 200s, one request, one ticket, one callback', async () => {
    const conn = await createConnector(
      'datagrail',
      { callbackHosts: ['127.0.0.1'] },
      { webhookSecret: FAKE_DATAGRAIL_WEBHOOK_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    );
    const user = await seedUser();
    const id = randomUUID();
    const w = datagrailWebhook({
      secret: FAKE_DATAGRAIL_WEBHOOK_SECRET,
      body: datagrailBody({ webhook_request_id: id, identifiers: { email: user.email }, callback_url: datagrail.callbackUrl() }),
    });
    const answers = await Promise.all(Array.from({ length: 10 }, () => sendWebhook(conn.webhookPath, w.headers, w.rawBody)));
    expect(answers.map((a) => a.status)).toEqual(Array(10).fill(200));
    const texts = new Set(answers.map((a) => JSON.stringify(a.json)));
    expect(texts.size, [...texts].join('\n')).toBe(1);
    const { ticketId, requestId } = answers[0]!.json.received[0]!;

    const done = await waitForRequest(requestId, settled);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'delivered' });
    expect(done.upstream).toEqual([expect.objectContaining({ ticketId, status: 'delivered', attempts: 1 })]);

    expect(
      await dbCount(env.sql<{ n: number }[]>`select count(*)::int as n from dsr_requests
        where workspace_id = ${ws.workspaceId} and dedupe_key = ${`connector:${conn.id}:${id}`}`),
    ).toBe(1);
    expect(
      await dbCount(env.sql<{ n: number }[]>`select count(*)::int as n from dsr_requests
        where workspace_id = ${ws.workspaceId} and actor_id = ${conn.id}`),
    ).toBe(1);
    expect(
      await dbCount(env.sql<{ n: number }[]>`select count(*)::int as n from upstream_tickets
        where connector_id = ${conn.id} and ticket_key = ${id}`),
    ).toBe(1);
    expect(
      await dbCount(env.sql<{ n: number }[]>`select count(*)::int as n from audit_records where request_id = ${requestId}`),
    ).toBe(1);

    // A late redelivery (DataGrail retrying after its own timeout) gets the same answer and triggers nothing.
    const late = await sendWebhook(conn.webhookPath, w.headers, w.rawBody);
    expect(late.status, late.text).toBe(200);
    expect(JSON.stringify(late.json)).toBe([...texts][0]);

    // Give any stray duplicate report job time to run (more than one worker poll interval), then count.
    await new Promise((r) => setTimeout(r, 2_500));
    const cbs = callbacksFor(datagrail.fake, id);
    expect(cbs).toHaveLength(1);
    expect(cbs[0]!.json).toMatchObject({ status: 'completed', audit_record_id: done.auditRecordId });
  });
});
