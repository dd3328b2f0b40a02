/**
 * A vendor (or a proxy in front of it) answering a report with a same-origin redirect. A 301/302 used to be followed
 * as a GET without the report's body, and that GET's 200 counted as delivery (nonce wiped, never re-sent) although
 * the vendor never received the outcome. Now the report is re-sent to the new location with its method, body and
 * headers, and a 303 (a page to GET, not an acceptance of the report) is refused: the ticket fails for an operator.
 */
import { afterAll, beforeAll, beforeEach, expect, it } from 'vitest';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { requestRow, seedUser, uniq } from '../helpers/factories.ts';

let env: TestEnv;
let transcend: FakeTranscend;
let ws: CreatedWorkspace;
let connectorId: string;
beforeAll(async () => {
  env = await createTestEnv();
  transcend = await startFakeTranscend();
  ws = await env.newWorkspace();
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: { vendor: 'transcend', name: 'T', config: transcend.config({ identifierTypes: { email: 'email' } }), secrets: transcend.secrets },
  });
  expect(res.status, res.text).toBe(201);
  connectorId = res.json.id as string;
});
afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});
beforeEach(() => {
  transcend.fake.calls.length = 0;
  // A GET of the new location is harmless and answers 200: it must never pass for the report's delivery.
  transcend.fake.on('GET /v2/data-silo', { status: 200, body: { ok: true } });
  transcend.fake.on('PUT /v2/data-silo', { status: 200, body: {} });
});

/** An erasure through a Transcend ticket, run to completion with its report; returns the request and its nonce. */
async function eraseThroughTicket() {
  const user = await seedUser(env, ws.ingestKey);
  const nonce = `nonce-${uniq('n')}`;
  const w = await transcend.webhook({ profile: { identifier: user.email, type: 'email' }, nonce });
  const hook = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: w.body, headers: w.headers });
  expect(hook.status, hook.text).toBe(200);
  const requestId = hook.json.received[0].requestId as string;
  await env.runJobs();
  expect((await requestRow(env, requestId)).status).toBe('complete');
  const [ticket] = await env.sql`select status, attempts, last_error, secret_sealed from upstream_tickets where request_id = ${requestId}`;
  return { ticket: ticket!, nonce };
}

const reportCalls = () => transcend.fake.calls.filter((c) => c.path.endsWith('/data-silo'));

it.each([301, 302])('a %i on the report PUT: the report is re-sent to the new location, whole, and delivered there', async (status) => {
  transcend.fake.on('PUT /v1/data-silo', { status, headers: { location: '/v2/data-silo' } });
  const { ticket, nonce } = await eraseThroughTicket();
  const calls = reportCalls();
  expect(calls.map((c) => `${c.method} ${c.path}`)).toEqual(['PUT /v1/data-silo', 'PUT /v2/data-silo']);
  // The vendor got the report itself at the new location: the same body and the same nonce.
  expect(calls[1]!.body).toBe(calls[0]!.body);
  expect(calls[1]!.json).toMatchObject({ profileStatus: 'RESOLVED' });
  expect(calls[1]!.headers['x-transcend-nonce']).toBe(nonce);
  expect(ticket).toMatchObject({ status: 'delivered', attempts: 1, secret_sealed: null });
});

it('a 303 on the report PUT: refused (nothing is fetched from its location), the ticket fails with a clear error', async () => {
  transcend.fake.on('PUT /v1/data-silo', { status: 303, headers: { location: '/v2/data-silo' } });
  const { ticket } = await eraseThroughTicket();
  expect(reportCalls().map((c) => `${c.method} ${c.path}`)).toEqual(['PUT /v1/data-silo']);
  expect(ticket).toMatchObject({ status: 'failed', attempts: 1 });
  expect(ticket.last_error).toMatch(/refused: HTTP 303 from 127\.0\.0\.1 to a PUT/);
  expect(ticket.last_error).not.toContain('/v2'); // a host at most, never a path
  // Not delivered: the nonce is kept, so a redelivery (once the URL is fixed) can still report.
  expect(ticket.secret_sealed).not.toBeNull();
});
