import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DATAGRAIL_CALLBACK_ROUTE, datagrailBody, datagrailWebhook, FAKE_DATAGRAIL_API_KEY, startFakeDataGrail } from '../../connectors/datagrail/fake.ts';
import { commentsRoute, onetrustWebhook, startFakeOneTrust, statusRoute, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { maintenanceTick } from '../../src/jobs/maintenance.ts';
import { connectorsTick } from '../../src/upstream/poll.ts';
import { subjectSealContext } from '../../src/privacy/execute.ts';
import { breakErasures, call, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { auditRows, requestRow, seedUser, uniq, userFootprint } from '../helpers/factories.ts';
import { adminSession } from '../helpers/sessions.ts';

let env: TestEnv;
let transcend: FakeTranscend;

beforeAll(async () => {
  env = await createTestEnv({ reportMaxAttempts: 2 });
  transcend = await startFakeTranscend();
});
afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

async function submit(ws: CreatedWorkspace, body: unknown): Promise<string> {
  const res = await call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
  expect(res.status, res.text).toBe(202);
  expect(res.json.results[0].accepted, res.text).toBe(true);
  return res.json.results[0].requestId;
}

const retry = (ws: CreatedWorkspace, id: string) => call(env, 'POST', `/v1/privacy/requests/${id}/retry`, { key: ws.privacyKey });
const jobsFor = (id: string) => env.sql`select id, task_identifier from graphile_worker.jobs where key = ${id}`;
const ticketOf = async (requestId: string) => (await env.sql`select * from upstream_tickets where request_id = ${requestId}`)[0]!;

/** Runs due jobs until the request's ticket is no longer pending (report retries are scheduled a few ms ahead). */
async function settle(requestId: string) {
  const until = Date.now() + 15_000;
  for (;;) {
    await env.runJobs();
    const t = await ticketOf(requestId);
    if (t.status !== 'pending') return t;
    if (Date.now() > until) throw new Error(`ticket still pending: ${t.last_error}`);
    await new Promise((r) => setTimeout(r, 30));
  }
}

/** A user whose erase request has failed (erasures in the workspace are broken while it runs). */
async function failedErase(ws: CreatedWorkspace, by: 'email' | 'userId' = 'email') {
  const user = await seedUser(env, ws.ingestKey, { email: `${uniq('Retry.Me')}@Example.TEST` });
  const restore = await breakErasures(env, ws.workspaceId);
  let id: string;
  let queued: Record<string, unknown>;
  try {
    id = await submit(ws, by === 'email' ? { action: 'erase', email: user.email } : { action: 'erase', userId: user.userId });
    queued = await requestRow(env, id);
    await env.runJobs();
  } finally {
    await restore();
  }
  const row = await requestRow(env, id);
  expect(row).toMatchObject({ status: 'failed', outcome: 'failed', error_code: 'db_P0001', subject_value: null });
  return { user, id, queued, row };
}

describe('retry of a failed request', () => {
  it('keeps the identifier sealed, restores it on retry, runs to complete and chains a second audit record', async () => {
    const ws = await env.newWorkspace();
    const { user, id, queued, row } = await failedErase(ws);
    expect(queued.subject_value).toBeTruthy();

    // Sealed, bound to the row, and not in plaintext anywhere in it.
    expect(row.subject_sealed).toMatch(/^v1\.k[0-9a-f]{8}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
    const dump = JSON.stringify(row).toLowerCase();
    expect(dump).not.toContain(user.email.toLowerCase());
    expect(dump).not.toContain(user.userId);
    expect(env.deps.sealer.open(row.subject_sealed as string, subjectSealContext(id))).toBe(queued.subject_value);
    expect(() => env.deps.sealer.open(row.subject_sealed as string, subjectSealContext('req_other'))).toThrow();
    const [failedAudit, ...none] = await auditRows(env, id);
    expect(none).toHaveLength(0);
    expect(failedAudit).toMatchObject({ id: row.audit_record_id, status: 'failed', error_code: 'db_P0001' });
    expect(await userFootprint(env, ws.workspaceId, user.userId)).toMatchObject({ profiles: 1 });

    const res = await retry(ws, id);
    expect(res.status, res.text).toBe(202);
    expect(res.json).toMatchObject({ id, status: 'queued', outcome: null, errorCode: null, attempts: 0, startedAt: null, finishedAt: null });
    const requeued = await requestRow(env, id);
    expect(requeued).toMatchObject({ status: 'queued', subject_value: queued.subject_value, subject_sealed: null, finished_at: null });
    expect((await jobsFor(id)).map((j) => j.task_identifier)).toEqual(['execute_request']);

    await env.runJobs();
    const done = await requestRow(env, id);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased', error_code: null, subject_value: null, subject_sealed: null });
    expect(await userFootprint(env, ws.workspaceId, user.userId)).toEqual({ profiles: 0, events: 0, messages: 0, convs: 0, questions: 0, flags: 0 });

    const audits = await env.sql`select * from audit_records where request_id = ${id} order by chain_seq`;
    expect(audits.map((a) => [a.status, a.outcome])).toEqual([['failed', 'failed'], ['complete', 'erased']]);
    expect(audits[0]!.id).toBe(failedAudit!.id);
    expect(Number(audits[1]!.chain_seq)).toBe(Number(audits[0]!.chain_seq) + 1);
    expect(audits[1]!.prev_hash).toBe(audits[0]!.hash);
    expect(done.audit_record_id).toBe(audits[1]!.id);
    const view = await call(env, 'GET', `/v1/privacy/requests/${id}`, { key: ws.privacyKey });
    expect(view.json).toMatchObject({ status: 'complete', outcome: 'erased', auditRecordId: audits[1]!.id });
    expect(env.logs.text().toLowerCase()).not.toContain(user.email.toLowerCase());
  });

  it('credits the retry to whoever asked for it: the new audit record names the admin, the failed one the API key', async () => {
    const ws = await env.newWorkspace();
    const { id, row } = await failedErase(ws, 'userId');
    expect(row.actor_type).toBe('api_key');
    const s = await adminSession(env, ws.workspaceId);
    const res = await s.call('POST', `/v1/privacy/requests/${id}/retry`);
    expect(res.status, res.text).toBe(202);
    expect(res.json.actor).toEqual({ type: 'admin', id: s.adminId });
    await env.runJobs();
    const audits = await env.sql`select actor_type, actor_id, status from audit_records where request_id = ${id} order by chain_seq`;
    expect(audits.map((a) => [a.actor_type, a.actor_id, a.status])).toEqual([
      ['api_key', row.actor_id, 'failed'],
      ['admin', s.adminId, 'complete'],
    ]);
  });

  it('refuses to retry a request that is not failed (409), or one of another workspace (404)', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const id = await submit(ws, { action: 'suppress', userId: u.userId });
    expectError(await retry(ws, id), 409, 'conflict');
    await env.runJobs();
    expect((await requestRow(env, id)).status).toBe('complete');
    const before = await requestRow(env, id);
    const err = expectError(await retry(ws, id), 409, 'conflict');
    expect(err.message).toContain('complete');
    expect(await requestRow(env, id)).toEqual(before);
    expect(await auditRows(env, id)).toHaveLength(1);
    expect(await jobsFor(id)).toHaveLength(0);

    const { id: failedId } = await failedErase(ws, 'userId');
    expectError(await retry(other, failedId), 404, 'not_found');
    expectError(await retry(ws, 'req_doesnotexist000000000000'), 404, 'not_found');
    expect((await requestRow(env, failedId)).status).toBe('failed');
  });

  it('refuses a retry while another request for the same subject is pending, changing nothing', async () => {
    const ws = await env.newWorkspace();
    const { user, id } = await failedErase(ws, 'userId');
    const pending = await submit(ws, { action: 'erase', userId: user.userId });
    const [failedBefore, pendingBefore] = [await requestRow(env, id), await requestRow(env, pending)];
    const jobsBefore = await env.sql`select id, key, run_at from graphile_worker.jobs order by id`;

    const err = expectError(await retry(ws, id), 409, 'conflict');
    expect(err.message).toMatch(/pending/);
    expect(await requestRow(env, id)).toEqual(failedBefore);
    expect(await requestRow(env, pending)).toEqual(pendingBefore);
    expect(await env.sql`select id, key, run_at from graphile_worker.jobs order by id`).toEqual(jobsBefore);
    expect(await auditRows(env, id)).toHaveLength(1);

    // Once the other request has finished, the failed one may run again (the user is gone by then).
    await env.runJobs();
    expect((await requestRow(env, pending)).outcome).toBe('erased');
    expect((await retry(ws, id)).status).toBe(202);
    await env.runJobs();
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'not_found' });
  });

  it('retries a failed workspace-scope request (it has no identifier to keep)', async () => {
    const ws = await env.newWorkspace();
    const u = await seedUser(env, ws.ingestKey);
    const restore = await breakErasures(env, ws.workspaceId);
    let id: string;
    try {
      id = await submit(ws, { action: 'erase', scope: 'workspace' });
      await env.runJobs();
    } finally {
      await restore();
    }
    expect(await requestRow(env, id)).toMatchObject({ status: 'failed', subject_sealed: null });
    expect((await retry(ws, id)).status).toBe(202);
    await env.runJobs();
    expect(await requestRow(env, id)).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect((await userFootprint(env, ws.workspaceId, u.userId)).profiles).toBe(0);
  });

  it('maintenance wipes the sealed identifier after FAILED_SUBJECT_RETENTION_DAYS; a retry then says why it cannot run', async () => {
    const ws = await env.newWorkspace();
    const old = await failedErase(ws);
    const recent = await failedErase(ws);
    await env.sql`update dsr_requests set started_at = now() - interval '31 days 1 minute', finished_at = now() - interval '31 days'
                  where id = ${old.id}`;

    const result = await maintenanceTick(env.deps);
    expect(result.sealedSubjects).toBe(1);
    expect((await requestRow(env, old.id)).subject_sealed).toBeNull();
    expect((await requestRow(env, recent.id)).subject_sealed).toBe(recent.row.subject_sealed);
    expect(await maintenanceTick(env.deps)).toMatchObject({ sealedSubjects: 0 });

    const err = expectError(await retry(ws, old.id), 409, 'conflict');
    expect(err.message).toMatch(/retention/);
    expect((await requestRow(env, old.id)).status).toBe('failed');
    expect(await jobsFor(old.id)).toHaveLength(0);
    expect((await retry(ws, recent.id)).status).toBe(202);
  });
});

describe('retry and vendor tickets', () => {
  let ws: CreatedWorkspace;
  let connectorId: string;

  beforeAll(async () => {
    ws = await env.newWorkspace('Vendor retry');
    const res = await call(env, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: { vendor: 'transcend', name: 'Transcend', config: transcend.config({ identifierTypes: { email: 'email' } }), secrets: transcend.secrets },
    });
    expect(res.status, res.text).toBe(201);
    connectorId = res.json.id;
  });

  const putsWith = (nonce: string) =>
    transcend.fake.callsTo('PUT /v1/data-silo').filter((c) => c.headers['x-transcend-nonce'] === nonce).map((c) => c.json as { profileStatus: string; message: string });

  /** A Transcend erasure whose execution fails; the report of the failure gets `reply`. */
  async function failedTicket(reply: { status: number; body: unknown }) {
    const user = await seedUser(env, ws.ingestKey);
    const nonce = `nonce-${uniq('n')}`;
    const transcendRequestId = randomUUID();
    const w = await transcend.webhook({ requestId: transcendRequestId, profile: { identifier: user.email, type: 'email' }, nonce });
    transcend.fake.on('PUT /v1/data-silo', reply);
    const restore = await breakErasures(env, ws.workspaceId);
    let requestId: string;
    try {
      const res = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: w.body, headers: w.headers });
      expect(res.status, res.text).toBe(200);
      requestId = res.json.received[0].requestId;
      await settle(requestId);
    } finally {
      await restore();
    }
    expect((await requestRow(env, requestId)).status).toBe('failed');
    return { user, nonce, requestId, transcendRequestId };
  }

  it('a ticket whose failure report could not be delivered is reported again, with the new outcome, after the retry', async () => {
    const { user, nonce, requestId } = await failedTicket({ status: 400, body: { error: 'rejected' } });
    const failedTicketRow = await ticketOf(requestId);
    expect(failedTicketRow).toMatchObject({ status: 'failed', attempts: 1 });
    expect(failedTicketRow.last_error).toBeTruthy();
    expect(putsWith(nonce).map((p) => p.profileStatus)).toEqual(['ERROR']);

    transcend.fake.on('PUT /v1/data-silo', { status: 200, body: {} });
    const res = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
    expect(res.status, res.text).toBe(202);
    expect(res.json.upstreamStatus).toBe('pending');
    expect(await ticketOf(requestId)).toMatchObject({ status: 'pending', attempts: 0, last_error: null, next_attempt_at: null });

    const delivered = await settle(requestId);
    expect(delivered).toMatchObject({ status: 'delivered', secret_sealed: null });
    const req = await requestRow(env, requestId);
    expect(req).toMatchObject({ status: 'complete', outcome: 'erased' });
    const puts = putsWith(nonce);
    expect(puts.map((p) => p.profileStatus)).toEqual(['ERROR', 'RESOLVED']);
    expect(puts[1]!.message).toContain(req.audit_record_id);
    expect((await userFootprint(env, ws.workspaceId, user.userId)).profiles).toBe(0);
  });

  it('a Transcend job already told about the failure is left alone by the retry (its nonce is used up) until it is sent again', async () => {
    const { user, nonce, requestId, transcendRequestId } = await failedTicket({ status: 200, body: {} });
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered' });
    expect(putsWith(nonce).map((p) => p.profileStatus)).toEqual(['ERROR']);

    const res = await call(env, 'POST', `/v1/privacy/requests/${requestId}/retry`, { key: ws.privacyKey });
    expect(res.status, res.text).toBe(202);
    expect(res.json.upstreamStatus).toBe('delivered');
    await env.runJobs();
    const done = await requestRow(env, requestId);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered', generation: 0 });
    expect(putsWith(nonce).map((p) => p.profileStatus)).toEqual(['ERROR']);

    // An ERROR keeps the job open: Transcend sends it again with a fresh nonce, which carries the new outcome.
    const fresh = `nonce-${uniq('n')}`;
    const again = await transcend.webhook({ requestId: transcendRequestId, profile: { identifier: user.email, type: 'email' }, nonce: fresh });
    const hook = await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: again.body, headers: again.headers });
    expect(hook.status, hook.text).toBe(200);
    expect(await settle(requestId)).toMatchObject({ status: 'delivered', generation: 1, reported_audit_record_id: done.audit_record_id });
    expect(putsWith(fresh).map((p) => p.profileStatus)).toEqual(['RESOLVED']);
    expect(putsWith(fresh)[0]!.message).toContain(done.audit_record_id);
    // Sent once more, it is a plain redelivery: nothing more is reported.
    const third = await transcend.webhook({ requestId: transcendRequestId, profile: { identifier: user.email, type: 'email' }, nonce: `nonce-${uniq('n')}` });
    expect((await call(env, 'POST', `/webhooks/transcend/${connectorId}`, { body: third.body, headers: third.headers })).status).toBe(200);
    await env.runJobs();
    expect(transcend.fake.callsTo('PUT /v1/data-silo').filter((c) => (c.json as { message: string }).message.includes(done.audit_record_id))).toHaveLength(1);
  });
});

describe('retry and vendor tickets already told of the failure (OneTrust, DataGrail)', () => {
  const OT = { clientId: 'ot-retry-client', clientSecret: 'ot-retry-client-secret', inbound: 'ot-retry-inbound-secret' };
  const DG_SECRET = 'dg-retry-webhook-secret';
  let ws: CreatedWorkspace;
  let onetrust: FakeOneTrust;
  let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
  let onetrustId: string;
  let datagrailId: string;

  const createConnector = async (body: unknown) => {
    const res = await call(env, 'POST', '/v1/admin/connectors', { key: ws.adminKey, body });
    expect(res.status, res.text).toBe(201);
    return res.json.id as string;
  };
  const onetrustConnector = () =>
    createConnector({
      vendor: 'onetrust',
      name: 'OneTrust',
      config: { baseUrl: onetrust.url },
      secrets: { clientId: OT.clientId, clientSecret: OT.clientSecret, inboundSecret: OT.inbound },
    });

  beforeAll(async () => {
    ws = await env.newWorkspace('Later outcomes');
    onetrust = await startFakeOneTrust({ clientId: OT.clientId, clientSecret: OT.clientSecret });
    datagrail = await startFakeDataGrail();
    onetrustId = await onetrustConnector();
    datagrailId = await createConnector({
      vendor: 'datagrail',
      name: 'DataGrail',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    });
  });
  afterAll(async () => {
    await Promise.all([onetrust?.stop(), datagrail?.fake.stop()]);
  });

  const view = async (id: string) => {
    const res = await call(env, 'GET', `/v1/privacy/requests/${id}`, { key: ws.privacyKey });
    expect(res.status, res.text).toBe(200);
    return res.json;
  };
  const auditOf = async (id: string) => (await requestRow(env, id)).audit_record_id as string;
  const statusPuts = (subTaskId: string) =>
    onetrust.fake.callsTo(statusRoute(subTaskId)).map((c) => c.json as { status: string; comment: string });
  const commentPuts = (ref: string) => onetrust.fake.callsTo(commentsRoute(ref)).map((c) => (c.json as { comment: string }).comment);
  const callbacks = (webhookRequestId: string) =>
    datagrail.fake
      .callsTo(DATAGRAIL_CALLBACK_ROUTE)
      .map((c) => c.json as { webhook_request_id: string; status: string; message: string; audit_record_id: string })
      .filter((b) => b.webhook_request_id === webhookRequestId);
  /** How many of these reports name the audit record as their own (`Audit record <id> (request …)`). */
  const naming = (texts: string[], auditRecordId: string) => texts.filter((t) => t.includes(`Audit record ${auditRecordId} (`)).length;

  /** A OneTrust subtask whose erasure fails while erasures are broken (left broken: call the returned restore). */
  async function failedSubtask(connectorId = onetrustId) {
    const user = await seedUser(env, ws.ingestKey);
    const subTaskId = randomUUID();
    const ref = uniq('REF');
    onetrust.expectSubtask(subTaskId, ref);
    const restore = await breakErasures(env, ws.workspaceId);
    const w = onetrustWebhook({
      auth: { type: 'bearer', secret: OT.inbound },
      body: { subTaskId, requestQueueRefId: ref, requestTypes: ['Delete Data'], email: user.email },
    });
    const res = await call(env, 'POST', `/webhooks/onetrust/${connectorId}`, { body: w.rawBody, headers: w.headers });
    expect(res.status, res.text).toBe(200);
    const requestId = res.json.received[0].requestId as string;
    await settle(requestId);
    expect(await requestRow(env, requestId)).toMatchObject({ status: 'failed', outcome: 'failed' });
    return { user, subTaskId, ref, requestId, restore };
  }

  /** A DataGrail deletion whose erasure fails; the callback of the failure is delivered. Erasures work again after. */
  async function failedDeletion() {
    const user = await seedUser(env, ws.ingestKey);
    const webhookRequestId = randomUUID();
    const restore = await breakErasures(env, ws.workspaceId);
    let requestId: string;
    try {
      const w = datagrailWebhook({
        secret: DG_SECRET,
        body: datagrailBody({ webhook_request_id: webhookRequestId, identifiers: { email: user.email }, callback_url: datagrail.callbackUrl() }),
      });
      const res = await call(env, 'POST', `/webhooks/datagrail/${datagrailId}`, { body: w.rawBody, headers: w.headers });
      expect(res.status, res.text).toBe(200);
      requestId = res.json.received[0].requestId as string;
      await settle(requestId);
    } finally {
      await restore();
    }
    expect(await requestRow(env, requestId)).toMatchObject({ status: 'failed' });
    expect(await ticketOf(requestId)).toMatchObject({ status: 'delivered' });
    expect(callbacks(webhookRequestId).map((b) => b.status)).toEqual(['failed']);
    return { user, webhookRequestId, requestId };
  }

  it('OneTrust: a subtask told FAILED is told COMPLETED, with the new audit record, once a retry of its request succeeds', async () => {
    const { user, subTaskId, ref, requestId, restore } = await failedSubtask();
    await restore();
    const failedAudit = await auditOf(requestId);
    const told = await ticketOf(requestId);
    expect(told).toMatchObject({ status: 'delivered', attempts: 1, generation: 0, reported_audit_record_id: failedAudit });
    expect(statusPuts(subTaskId).map((p) => p.status)).toEqual(['FAILED']);

    const res = await retry(ws, requestId);
    expect(res.status, res.text).toBe(202);
    // Pending again, a generation on, and still showing what OneTrust was told and when.
    expect(res.json.upstreamStatus).toBe('pending');
    expect(res.json.upstream).toEqual([
      expect.objectContaining({
        status: 'pending',
        attempts: 0,
        generation: 1,
        lastError: null,
        nextAttemptAt: null,
        reportedAuditRecordId: failedAudit,
        deliveredAt: (told.delivered_at as Date).toISOString(),
      }),
    ]);

    const delivered = await settle(requestId);
    const done = await requestRow(env, requestId);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased' });
    expect((await userFootprint(env, ws.workspaceId, user.userId)).profiles).toBe(0);
    expect(delivered).toMatchObject({ status: 'delivered', attempts: 1, generation: 1, reported_audit_record_id: done.audit_record_id });
    const puts = statusPuts(subTaskId);
    expect(puts.map((p) => p.status)).toEqual(['FAILED', 'COMPLETED']);
    expect(naming([puts[1]!.comment], done.audit_record_id as string)).toBe(1);
    expect(puts[1]!.comment).toMatch(new RegExp(`supersedes the earlier report of a failure \\(audit record ${failedAudit}\\)`, 'i'));
    const comments = commentPuts(ref);
    expect(comments).toHaveLength(2);
    expect(comments[1]).toBe(puts[1]!.comment);
    const after = await view(requestId);
    expect(after).toMatchObject({ upstreamStatus: 'delivered', auditRecordId: done.audit_record_id });
    expect(after.upstream).toEqual([expect.objectContaining({ status: 'delivered', generation: 1, reportedAuditRecordId: done.audit_record_id })]);

    // Nothing is sent twice: more job runs and the tick that requeues lost reports tell OneTrust nothing more.
    await env.runJobs();
    expect((await connectorsTick(env.deps)).requeued).toBe(0);
    await env.runJobs();
    expect(statusPuts(subTaskId)).toHaveLength(2);
    expect(commentPuts(ref)).toHaveLength(2);
    expect(JSON.stringify(await ticketOf(requestId)).toLowerCase()).not.toContain(user.email.toLowerCase());
  });

  it('OneTrust: a retry that fails again tells FAILED with its own audit record; the next, successful, one COMPLETED', async () => {
    const { subTaskId, requestId, restore } = await failedSubtask();
    const first = await auditOf(requestId);
    let second: string;
    try {
      // Still broken: the retry fails too, and OneTrust hears of that failure, superseding the first.
      expect((await retry(ws, requestId)).status).toBe(202);
      expect(await settle(requestId)).toMatchObject({ status: 'delivered', generation: 1 });
      second = await auditOf(requestId);
      expect(second).not.toBe(first);
      expect((await requestRow(env, requestId)).status).toBe('failed');
    } finally {
      await restore();
    }
    expect((await ticketOf(requestId)).reported_audit_record_id).toBe(second);
    const cli = await retry(ws, requestId);
    expect(cli.status, cli.text).toBe(202);
    expect(cli.json.upstream).toEqual([expect.objectContaining({ status: 'pending', generation: 2, reportedAuditRecordId: second })]);
    expect(await settle(requestId)).toMatchObject({ status: 'delivered', generation: 2, attempts: 1 });
    const third = await auditOf(requestId);
    expect((await requestRow(env, requestId)).outcome).toBe('erased');

    const puts = statusPuts(subTaskId);
    expect(puts.map((p) => p.status)).toEqual(['FAILED', 'FAILED', 'COMPLETED']);
    const texts = puts.map((p) => p.comment);
    // Each outcome was reported once, in order, each later one naming the one it supersedes.
    expect([first, second, third].map((id) => naming(texts, id))).toEqual([1, 1, 1]);
    expect(naming([texts[0]!], first)).toBe(1);
    expect(naming([texts[1]!], second)).toBe(1);
    expect(naming([texts[2]!], third)).toBe(1);
    expect(texts[1]).toContain(`(audit record ${first})`);
    expect(texts[2]).toContain(`(audit record ${second})`);
  });

  it('OneTrust: a ticket whose connector was deleted since is left alone by the retry (its secrets are gone)', async () => {
    const id = await onetrustConnector();
    const { subTaskId, requestId, restore } = await failedSubtask(id);
    await restore();
    const told = await ticketOf(requestId);
    expect(told.status).toBe('delivered');
    expect((await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey })).status).toBe(204);
    const res = await retry(ws, requestId);
    expect(res.status, res.text).toBe(202);
    expect(res.json.upstreamStatus).toBe('delivered');
    await env.runJobs();
    expect((await requestRow(env, requestId)).outcome).toBe('erased');
    expect(await ticketOf(requestId)).toEqual(told);
    expect(statusPuts(subTaskId).map((p) => p.status)).toEqual(['FAILED']);
  });

  it('DataGrail: a request told "failed" gets a second callback, "completed" with the new audit record, once a retry succeeds', async () => {
    const { webhookRequestId, requestId } = await failedDeletion();
    const failedAudit = await auditOf(requestId);
    const res = await retry(ws, requestId);
    expect(res.status, res.text).toBe(202);
    expect(res.json.upstream).toEqual([expect.objectContaining({ status: 'pending', generation: 1, reportedAuditRecordId: failedAudit })]);
    expect(await settle(requestId)).toMatchObject({ status: 'delivered', generation: 1 });
    const done = await requestRow(env, requestId);
    expect(done).toMatchObject({ status: 'complete', outcome: 'erased' });
    const sent = callbacks(webhookRequestId);
    expect(sent.map((b) => [b.status, b.audit_record_id])).toEqual([
      ['failed', failedAudit],
      ['completed', done.audit_record_id],
    ]);
    expect(sent[1]!.message).toContain(`(audit record ${failedAudit})`);
    await env.runJobs();
    expect(callbacks(webhookRequestId)).toHaveLength(2);
    expect((await view(requestId)).upstreamStatus).toBe('delivered');
  });

  it('DataGrail: a second callback it refuses (409, or any 4xx) leaves the ticket failed with a clear error; the delivered failure stays on record', async () => {
    for (const refusal of [409, 422]) {
      const { user, webhookRequestId, requestId } = await failedDeletion();
      const failedAudit = await auditOf(requestId);
      const told = await ticketOf(requestId);
      datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: refusal, body: { error: 'request already closed' } });
      try {
        expect((await retry(ws, requestId)).status).toBe(202);
        const ticket = await settle(requestId);
        // Not retried, and a 409 is not taken for delivered: DataGrail did not take the new outcome.
        expect(ticket).toMatchObject({
          status: 'failed',
          attempts: 1,
          generation: 1,
          reported_audit_record_id: failedAudit,
          delivered_at: told.delivered_at,
        });
        expect(ticket.last_error).toContain(`HTTP ${refusal}`);
        expect(ticket.last_error).toContain(`the earlier report (audit record ${failedAudit}) was delivered`);
        expect(ticket.last_error.toLowerCase()).not.toContain(user.email.toLowerCase());
      } finally {
        datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, { status: 200, body: {} });
      }
      expect(callbacks(webhookRequestId).map((b) => b.status)).toEqual(['failed', 'completed']);
      const v = await view(requestId);
      expect(v).toMatchObject({ status: 'complete', outcome: 'erased', upstreamStatus: 'failed' });
      expect(v.upstream).toEqual([
        expect.objectContaining({ status: 'failed', reportedAuditRecordId: failedAudit, deliveredAt: (told.delivered_at as Date).toISOString() }),
      ]);
      const listed = await call(env, 'GET', '/v1/privacy/requests?upstreamStatus=failed', { key: ws.privacyKey });
      expect(listed.json.data.map((r: { id: string }) => r.id)).toContain(requestId);
    }
  });
});
