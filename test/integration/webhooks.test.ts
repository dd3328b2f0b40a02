import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  datagrailBody,
  datagrailWebhook,
  FAKE_DATAGRAIL_API_KEY,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { freePort } from '../../src/lib/net.ts';
import { taskList } from '../../src/jobs/tasks.ts';
import { runDueJobs } from '../../src/jobs/run-once.ts';
import { poll } from '../helpers/process.ts';
import { executeRequest } from '../../src/privacy/execute.ts';
import { reportNow } from '../../src/upstream/report.ts';
import { connectorsTick } from '../../src/upstream/poll.ts';
import { receiveTickets, ticketSecretContext } from '../../src/upstream/tickets.ts';
import { intake } from '../../src/privacy/intake.ts';

let env: TestEnv;
let a: CreatedWorkspace;
let b: CreatedWorkspace;
let transcend: FakeTranscend;
let onetrust: FakeOneTrust;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
const ids = { transcendA: '', transcendB: '', onetrustA: '', datagrailA: '', datagrailB: '' };

const OT = { clientId: 'ot-client', clientSecret: 'ot-client-secret', inbound: 'ot-inbound-secret-value' };
const DG_SECRET = 'dg-webhook-secret-a';
const DG_SECRET_B = 'dg-webhook-secret-b';

const createConnector = (ws: CreatedWorkspace, body: unknown) => createConnectorVia(env, ws.adminKey, body);

/** Posts exactly these bytes with these headers, as a vendor would. */
async function deliver(vendor: string, id: string, headers: Record<string, string>, rawBody: string) {
  return call(env, 'POST', `/webhooks/${vendor}/${id}`, {
    body: rawBody,
    headers: { 'content-type': 'application/json', ...headers },
  });
}

async function counts() {
  const [row] = await env.sql<{ requests: number; tickets: number; jobs: number }[]>`
    select (select count(*) from dsr_requests)::int as requests,
           (select count(*) from upstream_tickets)::int as tickets,
           ((select count(*) from graphile_worker.jobs) + (select count(*) from job_outbox))::int as jobs`;
  return row!;
}

async function ticketOf(requestId: string) {
  const [row] = await env.sql`select * from upstream_tickets where request_id = ${requestId}`;
  return row!;
}

/** Runs due jobs until the ticket of this request is no longer pending (retries are scheduled a few ms ahead). */
async function settle(requestId: string, timeoutMs = 15_000) {
  const until = Date.now() + timeoutMs;
  for (;;) {
    await env.runJobs();
    const t = await ticketOf(requestId);
    if (t.status !== 'pending') return t;
    if (Date.now() > until) throw new Error(`ticket still pending: ${t.last_error}`);
    await new Promise((r) => setTimeout(r, 30));
  }
}

async function getRequest(ws: CreatedWorkspace, id: string) {
  const res = await call(env, 'GET', `/v1/privacy/requests/${id}`, { key: ws.privacyKey });
  expect(res.status).toBe(200);
  return res.json;
}

beforeAll(async () => {
  env = await createTestEnv({ reportMaxAttempts: 4 });
  [a, b] = await Promise.all([env.newWorkspace('A'), env.newWorkspace('B')]);
  transcend = await startFakeTranscend();
  onetrust = await startFakeOneTrust({ clientId: OT.clientId, clientSecret: OT.clientSecret });
  datagrail = await startFakeDataGrail();
  const transcendBody = {
    vendor: 'transcend',
    name: 'Transcend',
    config: transcend.config({ identifierTypes: { email: 'email' } }),
    secrets: transcend.secrets,
  };
  ids.transcendA = await createConnector(a, transcendBody);
  ids.transcendB = await createConnector(b, transcendBody);
  ids.onetrustA = await createConnector(a, {
    vendor: 'onetrust',
    name: 'OneTrust',
    config: { baseUrl: onetrust.url, requestTypes: { 'Forget Me': 'erase' } },
    secrets: { clientId: OT.clientId, clientSecret: OT.clientSecret, inboundSecret: OT.inbound },
  });
  const dg = (secret: string) => ({
    vendor: 'datagrail',
    name: 'DataGrail',
    config: { callbackHosts: ['127.0.0.1'] },
    secrets: { webhookSecret: secret, apiKey: FAKE_DATAGRAIL_API_KEY },
  });
  ids.datagrailA = await createConnector(a, dg(DG_SECRET));
  ids.datagrailB = await createConnector(b, dg(DG_SECRET_B));
});

afterAll(async () => {
  await Promise.all([transcend?.stop(), onetrust?.stop(), datagrail?.fake.stop()]);
  await env?.close();
});

describe('Transcend webhooks', () => {
  it('erase: verified, stored with its job before the 200, executed, and the audit id PUT back with the nonce', async () => {
    const user = await seedUser(env, a.ingestKey);
    const nonce = `nonce-${randomUUID()}`;
    const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, nonce });
    const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(res.status, res.text).toBe(200);
    const [{ ticketId, requestId }] = res.json.received;
    expect(ticketId).toMatch(/^tkt_/);
    // Durable before the answer: request, ticket and job are all committed (the job in the outbox, or already moved).
    const [queued] = await env.sql`
      select (select count(*) from graphile_worker.jobs where key = ${requestId} and task_identifier = 'execute_request')::int +
             (select count(*) from job_outbox where job_key = ${requestId} and task = 'execute_request')::int as n`;
    expect(queued!.n).toBe(1);
    const ticket = await ticketOf(requestId);
    expect(ticket).toMatchObject({ id: ticketId, connector_id: ids.transcendA, status: 'pending', workspace_id: a.workspaceId });
    expect(ticket.secret_sealed).toMatch(/^v1\./);
    expect(ticket.secret_sealed).not.toContain(nonce);

    const done = await settle(requestId);
    expect(done.status).toBe('delivered');
    expect(done.secret_sealed).toBeNull();
    const req = await getRequest(a, requestId);
    expect(req).toMatchObject({ status: 'complete', outcome: 'erased', actor: { type: 'connector', id: ids.transcendA } });
    expect(req.upstreamStatus).toBe('delivered');
    expect(await userFootprint(env, a.workspaceId, user.userId)).toMatchObject({ profiles: 0, events: 0, messages: 0 });
    const puts = transcend.fake.callsTo('PUT /v1/data-silo').filter((c) => c.headers['x-transcend-nonce'] === nonce);
    expect(puts).toHaveLength(1);
    expect((puts[0]!.json as { message: string }).message).toContain(req.auditRecordId);
    expect((puts[0]!.json as { profileStatus: string }).profileStatus).toBe('RESOLVED');
  });

  it.each([
    ['an HS256 token', { sign: 'hs256' as const }],
    ['an alg:none token', { sign: 'none' as const }],
    ['a token signed by another key', { sign: 'wrong-key' as const }],
    ['a token for another audience', { audience: 'someone-else' }],
    ['an expired token', { expiresIn: -120 }],
  ])('refuses %s with 401 and stores nothing', async (_name, opts) => {
    const before = await counts();
    const w = await transcend.webhook(opts);
    expectError(await deliver('transcend', ids.transcendA, w.headers, w.body), 401, 'unauthorized');
    expect(await counts()).toEqual(before);
  });

  it('refuses a missing token, and a token whose identifier is not the body’s', async () => {
    const w = await transcend.webhook();
    const { 'x-sombra-token': _t, ...noToken } = w.headers;
    expectError(await deliver('transcend', ids.transcendA, noToken, w.body), 401, 'unauthorized');
    const other = await transcend.webhook({ token: await transcend.signToken({ value: 'someone-else' }) });
    expectError(await deliver('transcend', ids.transcendA, other.headers, other.body), 401, 'unauthorized');
  });

  it('a token replayed on another body is refused; the same message again gets the same answer', async () => {
    const jti = randomUUID();
    const w = await transcend.webhook({ jti, profile: { identifier: `${uniq('r')}@example.test`, type: 'email' } });
    const first = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(first.status).toBe(200);
    const again = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(again.status).toBe(200);
    expect(again.json).toEqual(first.json);
    const before = await counts();
    const tampered = JSON.parse(w.body) as { type: string };
    tampered.type = 'SALE_OPT_OUT';
    expectError(await deliver('transcend', ids.transcendA, w.headers, JSON.stringify(tampered)), 401, 'token_replayed');
    expect(await counts()).toEqual(before);
  });

  it.each([
    // The tick runs 25 s on: the token is no longer accepted then, but was when this replay was verified.
    ['just past its exp (still inside the clock leeway)', { expiresIn: -10 }, 25_000],
    ['without an exp, a year later', { expiresIn: null }, 365 * 86_400_000],
  ])('a token %s is still remembered after the tick prunes: replayed on another subject, it is refused', async (_, token, tickInMs) => {
    const w = await transcend.webhook({ ...token, profile: { identifier: `${uniq('first')}@example.test`, type: 'email' } });
    const first = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(first.status, first.text).toBe(200);
    await connectorsTick(env.deps, new Date(Date.now() + tickInMs));
    const before = await counts();
    const victim = `${uniq('victim')}@example.test`;
    const replay = await transcend.webhook({ token: w.headers['x-sombra-token']!, profile: { identifier: victim, type: 'email' } });
    expectError(await deliver('transcend', ids.transcendA, replay.headers, replay.body), 401, 'token_replayed');
    expect(await counts()).toEqual(before);
    // The message itself is still a harmless redelivery.
    const again = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(again.json).toEqual(first.json);
  });

  it('a redelivered job carrying a new nonce is reported with the newest one', async () => {
    const user = await seedUser(env, a.ingestKey);
    const requestId = randomUUID();
    const profile = { identifier: user.email, type: 'email' };
    const [older, newer] = [`nonce-${randomUUID()}`, `nonce-${randomUUID()}`];
    const first = await transcend.webhook({ requestId, profile, nonce: older });
    const one = await deliver('transcend', ids.transcendA, first.headers, first.body);
    expect(one.status, one.text).toBe(200);
    const again = await transcend.webhook({ requestId, profile, nonce: newer });
    const two = await deliver('transcend', ids.transcendA, again.headers, again.body);
    expect(two.status, two.text).toBe(200);
    expect(two.json).toEqual(one.json);
    expect((await settle(one.json.received[0].requestId)).status).toBe('delivered');
    const nonces = transcend.fake
      .callsTo('PUT /v1/data-silo')
      .map((c) => c.headers['x-transcend-nonce'])
      .filter((n) => n === older || n === newer);
    expect(nonces).toEqual([newer]);
  });

  it('ACCESS is 400 action_not_implemented; malformed JSON 400; missing coreIdentifier 400; oversized 413', async () => {
    const access = await transcend.webhook({ type: 'ACCESS' });
    const err = expectError(await deliver('transcend', ids.transcendA, access.headers, access.body), 400, 'action_not_implemented');
    expect(err.message).toContain('ACCESS');
    const w = await transcend.webhook();
    expectError(await deliver('transcend', ids.transcendA, w.headers, '{"type":'), 400, 'malformed_json');
    const body = JSON.parse(w.body) as Record<string, unknown>;
    delete body.coreIdentifier;
    const missing = expectError(await deliver('transcend', ids.transcendA, w.headers, JSON.stringify(body)), 400, 'validation_failed');
    expect(JSON.stringify(missing.details)).toContain('coreIdentifier');
    const huge = JSON.stringify({ ...JSON.parse(w.body), padding: 'x'.repeat(70 * 1024) });
    expectError(await deliver('transcend', ids.transcendA, w.headers, huge), 413, 'payload_too_large');
  });

  it('cannot fetch the signing key → 503 with Retry-After (Transcend retries later), nothing stored', async () => {
    const closed = await freePort();
    const id = await createConnector(a, {
      vendor: 'transcend',
      name: 'Sombra down',
      config: transcend.config({ sombraUrl: `http://127.0.0.1:${closed}` }),
      secrets: transcend.secrets,
    });
    const before = await counts();
    const w = await transcend.webhook();
    const res = await deliver('transcend', id, w.headers, w.body);
    expectError(res, 503, 'service_unavailable');
    expect(res.headers.get('retry-after')).toBe('30');
    expect(await counts()).toEqual(before);
  });

  it('10 copies of one ticket at once: one request, one ticket, one job, ten identical answers', async () => {
    const w = await transcend.webhook({ profile: { identifier: `${uniq('c')}@example.test`, type: 'email' } });
    const before = await counts();
    const answers = await Promise.all(Array.from({ length: 10 }, () => deliver('transcend', ids.transcendA, w.headers, w.body)));
    for (const r of answers) {
      expect(r.status, r.text).toBe(200);
      expect(r.json).toEqual(answers[0]!.json);
    }
    expect(await counts()).toEqual({ requests: before.requests + 1, tickets: before.tickets + 1, jobs: before.jobs + 1 });
  });

  it('a connector only ever creates requests in its own workspace', async () => {
    const user = await seedUser(env, a.ingestKey);
    // The same Transcend organisation may be connected to two workspaces: B's connector acts on B only.
    const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' } });
    const res = await deliver('transcend', ids.transcendB, w.headers, w.body);
    expect(res.status).toBe(200);
    const requestId = res.json.received[0].requestId as string;
    const [row] = await env.sql`select workspace_id from dsr_requests where id = ${requestId}`;
    expect(row!.workspace_id).toBe(b.workspaceId);
    await settle(requestId);
    expect((await getRequest(b, requestId)).outcome).toBe('not_found');
    expect(await userFootprint(env, a.workspaceId, user.userId)).toMatchObject({ profiles: 1 });
    expectError(await call(env, 'GET', `/v1/privacy/requests/${requestId}`, { key: a.privacyKey }), 404, 'not_found');
  });

  it('a ticket for a subject whose request is already pending joins it and is reported when it finishes', async () => {
    const user = await seedUser(env, a.ingestKey);
    const api = await call(env, 'POST', '/v1/privacy/requests', {
      key: a.privacyKey,
      body: { action: 'erase', email: user.email },
    });
    const pendingId = api.json.results[0].requestId as string;
    const nonce = `nonce-${randomUUID()}`;
    const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, nonce });
    const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(res.json.received[0].requestId).toBe(pendingId);
    const t = await settle(pendingId);
    expect(t.status).toBe('delivered');
    const req = await getRequest(a, pendingId);
    const put = transcend.fake.callsTo('PUT /v1/data-silo').find((c) => c.headers['x-transcend-nonce'] === nonce);
    expect((put!.json as { message: string }).message).toContain(req.auditRecordId);
  });

  it("a ticket that joined a pending request is found by its own upstreamRef in the requests listing", async () => {
    const user = await seedUser(env, a.ingestKey);
    const api = await call(env, 'POST', '/v1/privacy/requests', {
      key: a.privacyKey,
      body: { action: 'erase', email: user.email },
    });
    const pendingId = api.json.results[0].requestId as string;
    const transcendRequestId = randomUUID();
    const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, requestId: transcendRequestId });
    const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(res.json.received[0].requestId).toBe(pendingId);
    // The admin looks the vendor's ticket up by the reference the vendor shows: the request it joined is listed.
    const list = await call(env, 'GET', `/v1/privacy/requests?upstreamRef=${transcendRequestId}`, { key: a.privacyKey });
    expect(list.status).toBe(200);
    expect(list.json.data.map((r: { id: string }) => r.id)).toEqual([pendingId]);
    expect(list.json.data[0].upstream.map((t: { upstreamRef: string }) => t.upstreamRef)).toEqual([transcendRequestId]);
    // Another workspace never finds it by that reference.
    const other = await call(env, 'GET', `/v1/privacy/requests?upstreamRef=${transcendRequestId}`, { key: b.privacyKey });
    expect(other.json.data).toEqual([]);
    await settle(pendingId);
  });

  it('a ticket joining a request that already finished is reported at once', async () => {
    const email = `${uniq('done')}@example.test`;
    const first = await transcend.webhook({ profile: { identifier: email, type: 'email' } });
    const r1 = await deliver('transcend', ids.transcendA, first.headers, first.body);
    const requestId = r1.json.received[0].requestId as string;
    await settle(requestId);
    // A second Transcend request for the same subject after the first finished: a new request (it may find new data).
    const second = await transcend.webhook({ profile: { identifier: email, type: 'email' } });
    const r2 = await deliver('transcend', ids.transcendA, second.headers, second.body);
    expect(r2.json.received[0].requestId).not.toBe(requestId);
    const t = await settle(r2.json.received[0].requestId);
    expect(t.status).toBe('delivered');
  });
});

describe('tickets joining a request that is finishing', () => {
  const waitFor = async (check: () => Promise<boolean>) => {
    const until = Date.now() + 10_000;
    while (!(await check())) {
      if (Date.now() > until) throw new Error('timed out waiting');
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  it('a ticket that joined a pending request which then finished before the ticket committed is still reported', async () => {
    const user = await seedUser(env, a.ingestKey);
    const api = await call(env, 'POST', '/v1/privacy/requests', { key: a.privacyKey, body: { action: 'erase', email: user.email } });
    const pendingId = api.json.results[0].requestId as string;
    // Pause the webhook's transaction right after it decided to join the pending request (at its ticket insert; the
    // one-statement attempt before it, which would create a new request, is refused by the pending request).
    const HOLD = 424242;
    await env.sql.unsafe(`
      create function hold_ticket() returns trigger language plpgsql as $$
      begin if new.request_id = '${pendingId}' then perform pg_advisory_xact_lock(${HOLD}); end if; return new; end $$;
      create trigger hold_ticket before insert on upstream_tickets for each row execute function hold_ticket();`);
    const holder = await env.sql.reserve();
    try {
      await holder`select pg_advisory_lock(${HOLD})`;
      const nonce = `nonce-${randomUUID()}`;
      const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, nonce });
      const answered = deliver('transcend', ids.transcendA, w.headers, w.body);
      await waitFor(async () => (await env.sql`select 1 from pg_locks where locktype = 'advisory' and objid = ${HOLD} and not granted`).length > 0);
      // Meanwhile the request runs to completion and commits; its completion cannot see the uncommitted ticket.
      await env.runJobs();
      expect((await getRequest(a, pendingId)).status).toBe('complete');
      await holder`select pg_advisory_unlock(${HOLD})`;
      const res = await answered;
      expect(res.json.received[0].requestId).toBe(pendingId);
      const t = await settle(pendingId);
      expect(t).toMatchObject({ status: 'delivered', attempts: 1 });
      expect(transcend.fake.callsTo('PUT /v1/data-silo').filter((c) => c.headers['x-transcend-nonce'] === nonce)).toHaveLength(1);
    } finally {
      holder.release();
      await env.sql.unsafe('drop trigger hold_ticket on upstream_tickets; drop function hold_ticket();');
    }
  });
});

describe('report delivery', () => {
  it('409 from Transcend counts as delivered', async () => {
    transcend.fake.on('PUT /v1/data-silo', { status: 409, body: { error: 'job no longer modifiable' } });
    try {
      const w = await transcend.webhook({ profile: { identifier: `${uniq('x')}@example.test`, type: 'email' } });
      const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
      const t = await settle(res.json.received[0].requestId);
      expect(t).toMatchObject({ status: 'delivered', attempts: 1 });
    } finally {
      transcend.fake.on('PUT /v1/data-silo', { status: 200, body: {} });
    }
  });

  it('a capability that cannot be unsealed fails its attempts visibly (never sent, never a throwing job)', async () => {
    const w = await transcend.webhook({ profile: { identifier: `${uniq('s')}@example.test`, type: 'email' } });
    const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(res.status, res.text).toBe(200);
    const { ticketId, requestId } = res.json.received[0] as { ticketId: string; requestId: string };
    // Another ticket's sealed nonce: well formed, but bound to that ticket, so it does not open here.
    const other = env.deps.sealer.seal('nonce-of-another-ticket', ticketSecretContext('tkt_other'));
    await env.sql`update upstream_tickets set secret_sealed = ${other} where id = ${ticketId}`;
    const puts = transcend.fake.callsTo('PUT /v1/data-silo').length;
    const t = await settle(requestId);
    expect(t.status).toBe('failed');
    expect(t.last_error).toMatch(/^gave up after \d+ attempts: adapter error \(\w+\)$/);
    expect(transcend.fake.callsTo('PUT /v1/data-silo').length).toBe(puts);
  });

  it('vendor down for the first 2 calls: retried with backoff, then delivered; the error is visible meanwhile', async () => {
    // What the request shows between the failed attempts and the one that succeeds is read when that last call
    // arrives: the retries are 20 ms apart, so a loaded machine may run all three within one runJobs.
    let requestId = '';
    let calls3 = 0;
    let mid: Awaited<ReturnType<typeof getRequest>> | undefined;
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, async () => {
      if (++calls3 <= 2) return { status: 503 };
      mid ??= await getRequest(a, requestId);
      return { status: 200, body: {} };
    });
    const wrid = randomUUID();
    const w = datagrailWebhook({
      secret: DG_SECRET,
      body: datagrailBody({ webhook_request_id: wrid, identifiers: { email: `${uniq('d')}@example.test` }, callback_url: datagrail.callbackUrl() }),
    });
    const res = await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody);
    requestId = res.json.received[0].requestId as string;
    await env.runJobs();
    const t = await settle(requestId);
    if (!mid) throw new Error('the vendor never got a third call');
    expect(mid.upstreamStatus).toBe('pending');
    expect(mid.upstream[0].lastError).toContain('503');
    expect(mid.upstream[0].nextAttemptAt).not.toBeNull();
    expect(t).toMatchObject({ status: 'delivered', attempts: 3, last_error: null });
    const calls = datagrail.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).filter((c) => (c.json as { webhook_request_id: string }).webhook_request_id === wrid);
    expect(calls).toHaveLength(3);
  });

  it('a report job run again for an attempt already made (say its first run died after recording) never calls the vendor again', async () => {
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 503 });
    const wrid = randomUUID();
    const w = datagrailWebhook({
      secret: DG_SECRET,
      body: datagrailBody({ webhook_request_id: wrid, identifiers: { email: `${uniq('st')}@example.test` }, callback_url: datagrail.callbackUrl() }),
    });
    const requestId = (await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody)).json.received[0].requestId as string;
    const callsFor = () =>
      datagrail.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).filter((c) => (c.json as { webhook_request_id: string }).webhook_request_id === wrid).length;
    await env.runJobs();
    const { id: ticketId } = await ticketOf(requestId);
    try {
      // Only the stale job is left: the next attempt's job waits, and the vendor would now accept the report.
      await env.sql`update graphile_worker._private_jobs set run_at = now() + interval '1 hour' where key like ${`report:${ticketId}:%`}`;
      datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 200, body: {} });
      const before = await ticketOf(requestId);
      expect(before).toMatchObject({ status: 'pending' });
      expect(before.attempts).toBeGreaterThanOrEqual(1);
      const calls = callsFor();
      expect(calls).toBe(before.attempts);
      await env.sql`select graphile_worker.add_job('report_upstream',
                      json_build_object('ticketId', ${ticketId}::text, 'attempt', ${before.attempts}::int))`;
      await env.runJobs();
      expect(callsFor()).toBe(calls);
      expect(await ticketOf(requestId)).toMatchObject({ status: 'pending', attempts: before.attempts });
    } finally {
      datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 200, body: {} });
      await env.sql`update graphile_worker._private_jobs set run_at = now() where key like ${`report:${ticketId}:%`}`;
    }
    // The next attempt's own job still delivers it.
    expect(await settle(requestId)).toMatchObject({ status: 'delivered' });
  });

  it('a permanent refusal (401) stops at once; retryable failures stop after the attempt limit; both stay visible', async () => {
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 401 });
    const send = async () => {
      const w = datagrailWebhook({
        secret: DG_SECRET,
        body: datagrailBody({ webhook_request_id: randomUUID(), identifiers: { email: `${uniq('p')}@example.test` }, callback_url: datagrail.callbackUrl() }),
      });
      return (await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody)).json.received[0].requestId as string;
    };
    const refused = await send();
    expect(await settle(refused)).toMatchObject({ status: 'failed', attempts: 1 });
    expect((await getRequest(a, refused)).upstreamStatus).toBe('failed');

    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 502 });
    const down = await send();
    const t = await settle(down);
    expect(t.status).toBe('failed');
    expect(t.attempts).toBe(4);
    expect(t.last_error).toMatch(/^gave up after 4 attempts: .*502/);
    const failed = await call(env, 'GET', '/v1/privacy/requests?upstreamStatus=failed', { key: a.privacyKey });
    expect(failed.json.data.map((r: { id: string }) => r.id)).toEqual(expect.arrayContaining([refused, down]));

    // The vendor is back: an admin redelivers the failed report; another workspace cannot, nor can a pending one.
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 200, body: {} });
    expectError(await call(env, 'POST', `/v1/admin/tickets/${t.id}/redeliver`, { key: b.adminKey }), 404, 'not_found');
    // The request finished an hour ago: the tick's safety net must still see the report as just queued, not as
    // lost (it would queue a second job for the attempt, and the vendor could be called twice).
    await env.sql`update dsr_requests set finished_at = now() - interval '1 hour' where id = ${down}`;
    const again = await call(env, 'POST', `/v1/admin/tickets/${t.id}/redeliver`, { key: a.adminKey });
    expect(again.status, again.text).toBe(202);
    expect((await connectorsTick(env.deps)).requeued).toBe(0);
    expect((await settle(down)).status).toBe('delivered');
    expect((await getRequest(a, down)).upstreamStatus).toBe('delivered');
    expectError(await call(env, 'POST', `/v1/admin/tickets/${t.id}/redeliver`, { key: a.adminKey }), 409, 'conflict');
  });
});

describe('redelivery of a deleted connector’s report', () => {
  it('→ 409 conflict naming the deletion; the ticket stays failed and no job is queued', async () => {
    const id = await createConnector(a, {
      vendor: 'datagrail',
      name: 'DataGrail (to delete)',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: 'dg-secret-deleted', apiKey: FAKE_DATAGRAIL_API_KEY },
    });
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 401 });
    try {
      const w = datagrailWebhook({
        secret: 'dg-secret-deleted',
        body: datagrailBody({ webhook_request_id: randomUUID(), identifiers: { email: `${uniq('x')}@example.test` }, callback_url: datagrail.callbackUrl() }),
      });
      const requestId = (await deliver('datagrail', id, w.headers, w.rawBody)).json.received[0].requestId as string;
      const t = await settle(requestId);
      expect(t.status).toBe('failed');
      const del = await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: a.adminKey });
      expect(del.status, del.text).toBe(204);
      // Its report can never be delivered any more: queuing it again would only fail it again (connector_deleted).
      const again = await call(env, 'POST', `/v1/admin/tickets/${t.id}/redeliver`, { key: a.adminKey });
      const err = expectError(again, 409, 'conflict');
      expect(err.message).toMatch(/deleted/);
      expect(await ticketOf(requestId)).toMatchObject({ status: 'failed', attempts: t.attempts, last_error: t.last_error });
      const [jobs] = await env.sql`
        select (select count(*) from graphile_worker._private_jobs where payload->>'ticketId' = ${t.id})::int +
               (select count(*) from job_outbox where payload->>'ticketId' = ${t.id})::int as n`;
      expect(jobs!.n).toBe(0);
    } finally {
      datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 200, body: {} });
    }
  });
});

describe('OneTrust webhooks', () => {
  const auth = { type: 'bearer' as const, secret: OT.inbound };

  it('erase via a mapped request type; the subtask is COMPLETED with the audit id; a new token after expiry', async () => {
    const user = await seedUser(env, a.ingestKey);
    const report = async (subTaskId: string, ref: string) => {
      onetrust.expectSubtask(subTaskId, ref);
      const w = onetrustWebhook({ auth, body: { subTaskId, requestQueueRefId: ref, requestTypes: ['Forget Me'], email: user.email } });
      const res = await deliver('onetrust', ids.onetrustA, w.headers, w.rawBody);
      expect(res.status, res.text).toBe(200);
      return res.json.received[0].requestId as string;
    };
    const first = await report(randomUUID(), 'REF1');
    expect((await settle(first)).status).toBe('delivered');
    const req = await getRequest(a, first);
    expect(req.outcome).toBe('erased');
    const status = onetrust.fake.calls.find((c) => c.method === 'PUT' && c.path.endsWith('/status'));
    expect(status!.json).toMatchObject({ status: 'COMPLETED' });
    expect((status!.json as { comment: string }).comment).toContain(req.auditRecordId);
    expect(await userFootprint(env, a.workspaceId, user.userId)).toMatchObject({ profiles: 0 });

    const tokens = onetrust.tokensIssued();
    onetrust.expireTokens();
    const second = await report(randomUUID(), 'REF2');
    expect((await settle(second)).status).toBe('delivered');
    expect(onetrust.tokensIssued()).toBe(tokens + 1);
    expect((await getRequest(a, second)).outcome).toBe('not_found');
  });

  it('wrong secret → 401; unmapped type → 422 naming it; no subject → 400; redelivery of a subtask → same answer', async () => {
    const bad = onetrustWebhook({ auth: { type: 'bearer', secret: 'nope' } });
    expectError(await deliver('onetrust', ids.onetrustA, bad.headers, bad.rawBody), 401, 'unauthorized');
    const unmapped = onetrustWebhook({ auth, body: { requestTypes: ['Teleport Data'] } });
    const err = expectError(await deliver('onetrust', ids.onetrustA, unmapped.headers, unmapped.rawBody), 422, 'unsupported_request_type');
    expect(err.message).toContain('Teleport Data');
    const noSubject = onetrustWebhook({ auth, body: { email: undefined, userId: undefined } });
    expectError(await deliver('onetrust', ids.onetrustA, noSubject.headers, noSubject.rawBody), 400, 'validation_failed');
    const w = onetrustWebhook({ auth, body: { subTaskId: randomUUID(), email: `${uniq('o')}@example.test` } });
    const one = await deliver('onetrust', ids.onetrustA, w.headers, w.rawBody);
    const two = await deliver('onetrust', ids.onetrustA, w.headers, w.rawBody);
    expect(two.json).toEqual(one.json);
  });
});

describe('tickets and their requests', () => {
  const auth = { type: 'bearer' as const, secret: OT.inbound };
  const connector = () => ({ id: ids.onetrustA, workspaceId: a.workspaceId, laterOutcome: 'at_once' as const });
  const ticket = (ticketKey: string, email: string) => ({
    ticketKey,
    action: 'erase' as const,
    subject: { kind: 'email' as const, value: email },
    upstreamRef: 'REF-LONG',
    upstream: { requestQueueRefId: 'REF-LONG' },
  });

  it('two tickets whose long keys differ only past 500 characters get a request each, for their own subject', async () => {
    const prefix = 'k'.repeat(520);
    const [alice, bob] = [`${uniq('alice')}@example.test`, `${uniq('bob')}@example.test`];
    const [one] = await receiveTickets(env.deps, connector(), [ticket(`${prefix}-one`, alice)], {}, '{"n":1}');
    const [two] = await receiveTickets(env.deps, connector(), [ticket(`${prefix}-two`, bob)], {}, '{"n":2}');
    expect(two!.requestId).not.toBe(one!.requestId);
    const rows = await env.sql`select id, subject_value from dsr_requests where id in ${env.sql([one!.requestId, two!.requestId])}`;
    expect(Object.fromEntries(rows.map((r) => [r.id, r.subject_value]))).toEqual({ [one!.requestId]: alice, [two!.requestId]: bob });
    // Each redelivery still finds its own.
    const [again] = await receiveTickets(env.deps, connector(), [ticket(`${prefix}-two`, bob)], {}, '{"n":2}');
    expect(again).toMatchObject({ requestId: two!.requestId, replayed: true });
  });

  it("a ticket whose request key is already another subject's request is refused, never joined to it", async () => {
    const key = `subtask:${randomUUID()}`;
    const other = await intake({
      ctx: env.deps,
      actor: { type: 'system', id: null, source: 'test' },
      input: {
        workspaceId: a.workspaceId,
        action: 'erase',
        scope: 'user',
        subject: { kind: 'email', value: `${uniq('other')}@example.test` },
        dedupeKey: `connector:${ids.onetrustA}:${key}`,
      },
    });
    const before = await counts();
    await expect(
      receiveTickets(env.deps, connector(), [ticket(key, `${uniq('mine')}@example.test`)], {}, '{}'),
    ).rejects.toMatchObject({ code: 'conflict' });
    expect(await counts()).toEqual(before);
    expect(await env.sql`select id from upstream_tickets where request_id = ${other.request.id}`).toEqual([]);
  });

  it('OneTrust ids over 200 characters are refused naming the field; a subject intake cannot take is named, not echoed', async () => {
    const long = onetrustWebhook({ auth, body: { subTaskId: 's'.repeat(201), email: `${uniq('o')}@example.test` } });
    const err = expectError(await deliver('onetrust', ids.onetrustA, long.headers, long.rawBody), 400, 'validation_failed');
    expect(err.details).toEqual([{ path: 'subTaskId', message: 'must be at most 200 characters' }]);
    const before = await counts();
    const local = onetrustWebhook({ auth, body: { subTaskId: randomUUID(), email: 'jane@localhost' } });
    const bad = expectError(await deliver('onetrust', ids.onetrustA, local.headers, local.rawBody), 400, 'validation_failed');
    expect(bad.message).toBe("the ticket's subject is not a valid email address");
    expect(bad.details).toEqual([{ path: 'subject', message: 'is not a valid email address' }]);
    expect(JSON.stringify(bad)).not.toContain('jane');
    expect(await counts()).toEqual(before);
  });
});

describe('DataGrail webhooks', () => {
  const signed = (body: Record<string, unknown>, secret = DG_SECRET, timestamp?: number) =>
    datagrailWebhook({ secret, body: datagrailBody({ callback_url: datagrail.callbackUrl(), ...body }), timestamp });

  it('a health check is answered 2xx and stores nothing', async () => {
    const before = await counts();
    const w = datagrailWebhook({ secret: DG_SECRET, body: { integration_kind: 'webhook', request_type: 'health_check' } });
    const res = await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody);
    expect(res.status).toBe(200);
    expect(await counts()).toEqual(before);
  });

  it('stale timestamps, bad signatures and another workspace’s secret are 401 and store nothing', async () => {
    const before = await counts();
    const stale = signed({ webhook_request_id: randomUUID() }, DG_SECRET, Math.floor(Date.now() / 1000) - 6 * 60);
    expectError(await deliver('datagrail', ids.datagrailA, stale.headers, stale.rawBody), 401, 'unauthorized');
    const w = signed({ webhook_request_id: randomUUID() });
    expectError(
      await deliver('datagrail', ids.datagrailA, { ...w.headers, 'x-webhook-signature': 'AAAA' }, w.rawBody),
      401,
      'unauthorized',
    );
    expectError(await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody.replace('deletion', 'opt_out')), 401, 'unauthorized');
    const forB = signed({ webhook_request_id: randomUUID() }, DG_SECRET);
    expectError(await deliver('datagrail', ids.datagrailB, forB.headers, forB.rawBody), 401, 'unauthorized');
    expect(await counts()).toEqual(before);
  });

  it('a webhook_request_id already received for another subject or action is 409 conflict; nothing stored or joined', async () => {
    const wrid = randomUUID();
    const first = signed({ webhook_request_id: wrid, identifiers: { email: `${uniq('first')}@example.test` } });
    const res = await deliver('datagrail', ids.datagrailA, first.headers, first.rawBody);
    expect(res.status, res.text).toBe(200);
    const before = await counts();
    const otherSubject = signed({ webhook_request_id: wrid, identifiers: { email: `${uniq('second')}@example.test` } });
    expectError(await deliver('datagrail', ids.datagrailA, otherSubject.headers, otherSubject.rawBody), 409, 'conflict');
    const sameSubjectOtherAction = JSON.parse(first.rawBody) as Record<string, unknown>;
    expect(sameSubjectOtherAction.request_type).not.toBe('opt_out');
    sameSubjectOtherAction.request_type = 'opt_out';
    const reworded = signed(sameSubjectOtherAction);
    expectError(await deliver('datagrail', ids.datagrailA, reworded.headers, reworded.rawBody), 409, 'conflict');
    expect(await counts()).toEqual(before);
    // The first delivery is still answered as it was.
    expect((await deliver('datagrail', ids.datagrailA, first.headers, first.rawBody)).json).toEqual(res.json);
  });

  it('10 copies of an unsigned-token ticket at once (no jti to serialise on): one request, one ticket, one job', async () => {
    const w = signed({ webhook_request_id: randomUUID(), identifiers: { email: `${uniq('dup')}@example.test` } });
    const before = await counts();
    const answers = await Promise.all(Array.from({ length: 10 }, () => deliver('datagrail', ids.datagrailA, w.headers, w.rawBody)));
    for (const r of answers) {
      expect(r.status, r.text).toBe(200);
      expect(r.json).toEqual(answers[0]!.json);
    }
    expect(await counts()).toEqual({ requests: before.requests + 1, tickets: before.tickets + 1, jobs: before.jobs + 1 });
  });

  it('a callback URL outside the allowed hosts is refused before anything is stored', async () => {
    const before = await counts();
    const w = signed({ webhook_request_id: randomUUID(), callback_url: 'https://evil.example.com/steal' });
    const err = expectError(await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody), 400, 'validation_failed');
    expect(JSON.stringify(err)).not.toContain('evil.example.com');
    expect(await counts()).toEqual(before);
  });

  it('deletion of an unknown subject is reported as completed with 0 records, never as a failure', async () => {
    const wrid = randomUUID();
    const w = signed({ webhook_request_id: wrid, identifiers: { email: `${uniq('nobody')}@example.test` } });
    const res = await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody);
    const requestId = res.json.received[0].requestId as string;
    expect((await settle(requestId)).status).toBe('delivered');
    const cb = datagrail.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).find((c) => (c.json as { webhook_request_id: string }).webhook_request_id === wrid);
    expect(cb!.json).toMatchObject({ status: 'completed', records_found: 0, audit_record_id: (await getRequest(a, requestId)).auditRecordId });
  });
});

describe('every vendor route', () => {
  const vendors = () => [
    {
      vendor: 'onetrust',
      id: ids.onetrustA,
      signed: (raw: string) => ({ headers: onetrustWebhook({ auth: { type: 'bearer', secret: OT.inbound } }).headers, raw }),
      unsigned: onetrustWebhook().headers,
    },
    {
      vendor: 'datagrail',
      id: ids.datagrailA,
      signed: (raw: string) => ({ headers: datagrailWebhook({ secret: DG_SECRET, body: raw }).headers, raw }),
      unsigned: { 'content-type': 'application/json' },
    },
  ];

  it('answers malformed JSON (correctly authenticated) 400, a missing credential 401, an oversized body 413; stores nothing', async () => {
    for (const v of vendors()) {
      const before = await counts();
      const bad = v.signed('{"webhook_request_id": ');
      expectError(await deliver(v.vendor, v.id, bad.headers, bad.raw), 400, 'malformed_json');
      expectError(await deliver(v.vendor, v.id, v.unsigned, '{}'), 401, 'unauthorized');
      const big = v.signed(JSON.stringify({ padding: 'x'.repeat(70 * 1024) }));
      expectError(await deliver(v.vendor, v.id, big.headers, big.raw), 413, 'payload_too_large');
      expect(await counts(), v.vendor).toEqual(before);
    }
  });

  it('never writes personal data from tickets into the logs', async () => {
    const text = env.logs.text();
    expect(text).not.toMatch(/@example\.(test|com)/);
    expect(text).not.toContain(OT.inbound);
    expect(text).not.toContain(DG_SECRET);
    expect(text).not.toMatch(/nonce-[0-9a-f]{8}/);
  });
});

describe('webhook URLs', () => {
  it('unknown, malformed, disabled, deleted and vendor-mismatched connectors all get the same 404', async () => {
    const w = signed404Body();
    const disabled = await createConnector(a, {
      vendor: 'datagrail',
      name: 'off',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: 'k' },
    });
    expect((await call(env, 'POST', `/v1/admin/connectors/${disabled}/disable`, { key: a.adminKey })).status).toBe(200);
    const deleted = await createConnector(a, {
      vendor: 'datagrail',
      name: 'gone',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: 'k' },
    });
    expect((await call(env, 'DELETE', `/v1/admin/connectors/${deleted}`, { key: a.adminKey })).status).toBe(204);
    const answers = await Promise.all([
      deliver('datagrail', 'con_00000000000000000000000000', w.headers, w.rawBody),
      deliver('datagrail', 'not-an-id', w.headers, w.rawBody),
      deliver('datagrail', disabled, w.headers, w.rawBody),
      deliver('datagrail', deleted, w.headers, w.rawBody),
      deliver('transcend', ids.datagrailA, w.headers, w.rawBody),
      deliver('acme', ids.datagrailA, w.headers, w.rawBody),
    ]);
    for (const r of answers) {
      const err = expectError(r, 404, 'not_found');
      expect(err.message).toBe('no such webhook');
    }
  });
});

function signed404Body() {
  return datagrailWebhook({ secret: DG_SECRET, body: datagrailBody({ webhook_request_id: randomUUID() }) });
}

describe('reports delivered by the job that finished the request', () => {
  const dgCalls = (ticket: string) =>
    datagrail.fake.callsTo(DATAGRAIL_CALLBACK_ROUTE).filter((c) => JSON.parse(c.body).webhook_request_id === ticket);

  async function dgTicket() {
    const wrid = randomUUID();
    const w = datagrailWebhook({
      secret: DG_SECRET,
      body: datagrailBody({ webhook_request_id: wrid, identifiers: { email: `${uniq('n')}@example.test` }, callback_url: datagrail.callbackUrl() }),
    });
    const res = await deliver('datagrail', ids.datagrailA, w.headers, w.rawBody);
    expect(res.status, res.text).toBe(200);
    return { wrid, requestId: res.json.received[0].requestId as string };
  }

  it('the execute job itself delivers the report: no report job is needed', async () => {
    const { wrid, requestId } = await dgTicket();
    // Only the execute_request task exists here: a report that waited for a report job would never be made.
    const { execute_request } = taskList(env.deps);
    await runDueJobs(env.sql, { connectionString: env.url, taskList: { execute_request }, logger: env.deps.logger, outbox: env.deps.outbox });
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', attempts: 1 });
    expect(dgCalls(wrid)).toHaveLength(1);
    const [left] = await env.sql`select count(*)::int as n from job_outbox`;
    expect(left!.n).toBe(0);
  });

  it('a connector kept open between reports is opened again once its secrets change', async () => {
    const id = await createConnector(a, {
      vendor: 'datagrail',
      name: 'rotating',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: 'first-key' },
    });
    const ticket = async () => {
      const wrid = randomUUID();
      const w = datagrailWebhook({
        secret: DG_SECRET,
        body: datagrailBody({ webhook_request_id: wrid, identifiers: { email: `${uniq('k')}@example.test` }, callback_url: datagrail.callbackUrl() }),
      });
      const res = await deliver('datagrail', id, w.headers, w.rawBody);
      expect(res.status, res.text).toBe(200);
      await settle(res.json.received[0].requestId as string);
      return dgCalls(wrid).map((c) => c.headers.authorization);
    };
    expect(await ticket()).toEqual(['Bearer first-key']);
    expect(await ticket()).toEqual(['Bearer first-key']);
    const put = await call(env, 'PUT', `/v1/admin/connectors/${id}/secrets`, { key: a.adminKey, body: { secrets: { webhookSecret: DG_SECRET, apiKey: 'second-key' } } });
    expect(put.status, put.text).toBe(200);
    // The vendor refuses the new key (the fake knows only its own), so the report is not delivered; what matters is
    // which key it carried.
    expect((await ticket()).every((h) => h === 'Bearer second-key')).toBe(true);
  });

  it('a report whose outcome cannot be recorded goes back to the outbox as it was claimed, for its job', async () => {
    const { wrid, requestId } = await dgTicket();
    await env.deps.outbox.flush();
    const result = await executeRequest(env.deps, requestId, { attempt: 1, maxAttempts: 5 });
    const reports = result.kind === 'complete' ? result.reports : [];
    expect(reports).toHaveLength(1);
    const outboxRow = () => env.sql`select task, payload, job_key, max_attempts, priority from job_outbox order by id`;
    const claimed = await outboxRow();
    expect(claimed).toHaveLength(1);
    // Recording the delivery fails (after the vendor has the report).
    await env.sql.unsafe(`
      create function refuse_delivered() returns trigger language plpgsql as $$
      begin if new.status = 'delivered' then raise exception 'refused for the test'; end if; return new; end $$;
      create trigger refuse_delivered before update on upstream_tickets for each row execute function refuse_delivered();`);
    try {
      await reportNow(env.deps, reports);
      expect(dgCalls(wrid)).toHaveLength(1);
      // Put back as it was claimed, and handed on at once (reportNow kicks the dispatcher): one job, same settings.
      await env.deps.outbox.idle();
      expect(await outboxRow()).toEqual([]);
      const jobs = await env.sql`
        select j.payload, j.max_attempts, j.priority from graphile_worker._private_jobs j
        where j.key = ${claimed[0]!.job_key as string}`;
      expect(jobs).toEqual([
        { payload: claimed[0]!.payload, max_attempts: claimed[0]!.max_attempts, priority: claimed[0]!.priority },
      ]);
    } finally {
      await env.sql.unsafe('drop trigger refuse_delivered on upstream_tickets; drop function refuse_delivered();');
    }
    // Its job delivers it (the vendor sees it again: the first outcome was never recorded).
    await settle(requestId);
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', attempts: 1 });
    expect(dgCalls(wrid)).toHaveLength(2);
  });

  it('a report already handed to graphile-worker is left to its job: one delivery in all', async () => {
    const { wrid, requestId } = await dgTicket();
    await env.deps.outbox.flush();
    const result = await executeRequest(env.deps, requestId, { attempt: 1, maxAttempts: 5 });
    expect(result.kind).toBe('complete');
    const reports = result.kind === 'complete' ? result.reports : [];
    expect(reports).toHaveLength(1);
    await env.deps.outbox.flush(); // a dispatcher got there first
    await reportNow(env.deps, reports);
    expect(dgCalls(wrid)).toHaveLength(0);
    await settle(requestId);
    expect(dgCalls(wrid)).toHaveLength(1);
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', attempts: 1 });
  });
});

describe('request views', () => {
  it('a request and its vendor tickets are read in one snapshot: never queued with a ticket already delivered', async () => {
    const w = await transcend.webhook({ profile: { identifier: `${uniq('snap')}@example.test`, type: 'email' } });
    const res = await deliver('transcend', ids.transcendA, w.headers, w.body);
    expect(res.status, res.text).toBe(200);
    const requestId = res.json.received[0].requestId as string;

    // Tickets cannot be read while this transaction holds the table, so each read below stops between the request
    // row and its tickets; meanwhile the ticket is delivered (as its job's report would) and that is committed.
    const holder = await env.sql.reserve();
    try {
      await holder`begin`;
      await holder`lock table upstream_tickets in access exclusive mode`;
      const one = getRequest(a, requestId);
      const list = call(env, 'GET', '/v1/privacy/requests?limit=100', { key: a.privacyKey });
      await poll(async () => {
        const [r] = await env.sql<{ n: number }[]>`
          select count(*)::int as n from pg_stat_activity
          where datname = current_database() and wait_event_type = 'Lock' and query ilike '%upstream_tickets%'`;
        return r!.n >= 2 ? true : undefined;
      }, 10_000);
      await holder`update upstream_tickets set status = 'delivered', delivered_at = now() where request_id = ${requestId}`;
      await holder`commit`;

      const single = await one;
      expect([single.status, single.upstreamStatus, single.upstream[0].status]).toEqual(['queued', 'pending', 'pending']);
      const listed = await list;
      expect(listed.status, listed.text).toBe(200);
      const row = listed.json.data.find((r: { id: string }) => r.id === requestId);
      expect([row.status, row.upstreamStatus]).toEqual(['queued', 'pending']);
    } finally {
      await holder`rollback`.catch(() => {});
      holder.release();
    }
    // A read after the commit sees the delivery (here without the request having run: arranged by the test).
    expect((await getRequest(a, requestId)).upstreamStatus).toBe('delivered');
  });
});
