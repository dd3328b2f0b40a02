import { createHash } from 'node:crypto';
import { readFileSync } from 'node:fs';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { adminSession } from '../helpers/sessions.ts';
import { subjectDigest } from '../../src/lib/digest.ts';

let env: TestEnv;
beforeAll(async () => {
  env = await createTestEnv();
});
afterAll(() => env.close());


const REQ_ID = /^req_[0-9a-z]{25}$/;
const AUD_ID = /^aud_[0-9a-z]{25}$/;

const submit = (ws: CreatedWorkspace, body: unknown) =>
  call(env, 'POST', '/v1/privacy/requests', { key: ws.privacyKey, body });
const get = (ws: CreatedWorkspace, path: string) => call(env, 'GET', path, { key: ws.privacyKey });
const ingest = (ws: CreatedWorkspace, path: string, body: unknown) =>
  call(env, 'POST', path, { key: ws.ingestKey, body });

/** Submits one request and returns its id, asserting it was accepted as new. */
async function submitOne(ws: CreatedWorkspace, body: Record<string, unknown>): Promise<string> {
  const res = await submit(ws, body);
  expect(res.status, res.text).toBe(202);
  expect(res.json.results).toHaveLength(1);
  expect(res.json.results[0]).toEqual({
    index: 0,
    accepted: true,
    requestId: expect.stringMatching(REQ_ID),
    status: 'queued',
  });
  return res.json.results[0].requestId;
}

async function jobCount(requestId: string): Promise<number> {
  const [r] = await env.sql<{ n: number }[]>`
    select count(*)::int as n from graphile_worker.jobs where key = ${requestId}`;
  return r!.n;
}

async function requestCount(workspaceId: string): Promise<number> {
  const [r] = await env.sql<{ n: number }[]>`
    select count(*)::int as n from dsr_requests where workspace_id = ${workspaceId}`;
  return r!.n;
}

/** Pending execute_request jobs whose key is one of this workspace's requests. */
async function workspaceJobCount(workspaceId: string): Promise<number> {
  const [r] = await env.sql<{ n: number }[]>`
    select count(*)::int as n from graphile_worker.jobs j
      join dsr_requests r on r.id = j.key where r.workspace_id = ${workspaceId}`;
  return r!.n;
}

async function requestRow(id: string) {
  const [row] = await env.sql<
    {
      workspace_id: string;
      source: string;
      actor_type: string;
      actor_id: string | null;
      action: string;
      scope: string;
      subject_kind: string;
      subject_value: string | null;
      subject_digest: string;
      external_request_id: string | null;
      status: string;
      outcome: string | null;
      audit_record_id: string | null;
      as_json: string;
    }[]
  >`select *, row_to_json(r)::text as as_json from dsr_requests r where id = ${id}`;
  return row;
}

async function privacyKeyId(workspaceId: string): Promise<string> {
  const [row] = await env.sql<{ id: string }[]>`
    select id from api_keys where workspace_id = ${workspaceId} and scope = 'privacy'`;
  return row!.id;
}

/** Follows nextCursor to the end, asserting each page holds at most `limit` items. */
async function allPages(ws: CreatedWorkspace, base: string, limit: number) {
  const ids: string[] = [];
  let cursor: string | null = null;
  let pages = 0;
  do {
    const sep = base.includes('?') ? '&' : '?';
    const url = `${base}${sep}limit=${limit}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ''}`;
    const res = await get(ws, url);
    expect(res.status, res.text).toBe(200);
    expect(res.json.data.length).toBeLessThanOrEqual(limit);
    ids.push(...res.json.data.map((d: { id: string }) => d.id));
    cursor = res.json.nextCursor;
    if (cursor !== null) expect(res.json.data).toHaveLength(limit);
    pages++;
    expect(pages).toBeLessThan(50);
  } while (cursor !== null);
  return { ids, pages };
}

describe('ops routes', () => {
  it('GET /v1 (the base the start-up banner prints) → 200 with where the API is described', async () => {
    const res = await call(env, 'GET', '/v1');
    expect(res.status).toBe(200);
    expect(res.json).toEqual({ name: 'dsr-connector', docs: '/docs', openapi: '/openapi.json', health: '/healthz' });
    expect((await call(env, 'GET', res.json.docs)).status).toBe(200);
  });

  it('GET /healthz → 200 ok', async () => {
    const res = await call(env, 'GET', '/healthz');
    expect(res.status).toBe(200);
    expect(res.json).toEqual({ status: 'ok', database: 'ok' });
  });

  it('GET /openapi.json describes the ingest and privacy routes', async () => {
    const res = await call(env, 'GET', '/openapi.json');
    expect(res.status).toBe(200);
    expect(res.json.openapi).toBe('3.1.0');
    const paths = Object.keys(res.json.paths);
    for (const p of [
      '/v1/privacy/requests',
      '/v1/privacy/requests/{id}',
      '/v1/privacy/audit',
      '/v1/privacy/audit/{id}',
      '/v1/track',
      '/v1/identify',
      '/v1/messages',
      '/v1/topics/questions',
      '/v1/batch',
      '/healthz',
    ]) {
      expect(paths).toContain(p);
    }
    expect(res.json.paths['/v1/privacy/requests'].post).toBeDefined();
    expect(res.json.paths['/v1/privacy/requests'].get).toBeDefined();
    expect(res.json.components.securitySchemes.bearer).toMatchObject({ type: 'http', scheme: 'bearer' });
  });

  it('GET /openapi.json lists the statuses the routes really answer: 409 for a foreign conversation, 503 when the database is down', async () => {
    const doc = (await call(env, 'GET', '/openapi.json')).json;
    // test/integration/ingest-api.test.ts: a conversationId of another user → 409 conflict, alone or in a batch.
    for (const path of ['/v1/messages', '/v1/batch']) expect(Object.keys(doc.paths[path].post.responses), path).toContain('409');
    // test/integration/db-down.test.ts: every route that reads the database answers 503 + Retry-After while it is down.
    const missing: string[] = [];
    for (const [path, item] of Object.entries(doc.paths as Record<string, Record<string, { responses: object }>>)) {
      for (const [method, op] of Object.entries(item)) {
        if (path === '/openapi.json' || path === '/v1') continue; // neither reads the database
        if (!Object.keys(op.responses).includes('503')) missing.push(`${method.toUpperCase()} ${path}`);
      }
    }
    expect(missing).toEqual([]);
  });

  it('GET /docs → 200 html that loads the local swagger assets', async () => {
    const res = await call(env, 'GET', '/docs');
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toMatch(/^text\/html/);
    expect(res.text).toContain('<!doctype html>');
    expect(res.text).toContain('/docs/assets/swagger-ui-bundle.js');
    const init = await call(env, 'GET', '/docs/init.js');
    expect(init.status).toBe(200);
    expect(init.text).toContain('/openapi.json');
    const css = await env.app.request('/docs/assets/swagger-ui.css');
    expect(css.status).toBe(200);
    expect(css.headers.get('content-type')).toMatch(/^text\/css/);
    expectError(await call(env, 'GET', '/docs/assets/..%2Fpackage.json'), 404, 'not_found');
  });

  it('an unknown route → 404 with the error shape', async () => {
    const err = expectError(await call(env, 'GET', '/v2/nothing-here'), 404, 'not_found');
    expect(err.message).toBe('no such route');
  });

  it('a route asked with a method it does not take → 405 with Allow, not "no such route"; nothing done', async () => {
    const ws = await env.newWorkspace();
    for (const [method, path, key, allow] of [
      ['DELETE', '/v1/privacy/requests', ws.privacyKey, 'POST, GET, HEAD'],
      ['PUT', '/v1/privacy/requests/req_0000000000000000000000000', ws.privacyKey, 'GET, HEAD'],
      ['GET', '/v1/track', ws.ingestKey, 'POST'],
      ['PUT', '/v1/admin/connectors/con_0000000000000000000000000', ws.adminKey, 'GET, PATCH, DELETE, HEAD'],
      ['GET', '/webhooks/datagrail/con_0000000000000000000000000', undefined, 'POST'],
      ['POST', '/healthz', undefined, 'GET, HEAD'],
    ] as const) {
      const res = await call(env, method, path, { key, body: method === 'GET' ? undefined : {} });
      const err = expectError(res, 405, 'method_not_allowed');
      expect(res.headers.get('allow'), `${method} ${path}`).toBe(allow);
      expect(err.message).toContain(allow);
    }
    expect(await requestCount(ws.workspaceId)).toBe(0);
    // An unknown path is still a 404, and a known path with its own method is served.
    expectError(await call(env, 'DELETE', '/v1/privacy/nothing', { key: ws.privacyKey }), 404, 'not_found');
    expect((await call(env, 'GET', '/v1/privacy/requests', { key: ws.privacyKey })).status).toBe(200);
    expect((await env.app.request('/healthz', { method: 'HEAD' })).status).toBe(200);
  });
});

describe('authentication on privacy routes', () => {
  it('no key → 401; garbage key → 401; ingest or admin key → 403', async () => {
    const ws = await env.newWorkspace();
    const body = { action: 'erase', userId: 'nobody' };
    expectError(await call(env, 'POST', '/v1/privacy/requests', { body }), 401, 'unauthorized');
    expectError(
      await call(env, 'POST', '/v1/privacy/requests', { body, headers: { authorization: 'Bearer nope' } }),
      401,
      'unauthorized',
    );
    for (const key of [ws.ingestKey, ws.adminKey]) {
      expectError(await call(env, 'POST', '/v1/privacy/requests', { key, body }), 403, 'forbidden');
      expectError(await call(env, 'GET', '/v1/privacy/requests', { key }), 403, 'forbidden');
      expectError(await call(env, 'GET', '/v1/privacy/requests/req_x', { key }), 403, 'forbidden');
      expectError(await call(env, 'GET', '/v1/privacy/audit', { key }), 403, 'forbidden');
      expectError(await call(env, 'GET', '/v1/privacy/audit/aud_x', { key }), 403, 'forbidden');
    }
    expect(await requestCount(ws.workspaceId)).toBe(0);
  });
});

describe('POST /v1/privacy/requests', () => {
  it('a single request → 202, one queued row and exactly one job keyed by the request id', async () => {
    const ws = await env.newWorkspace();
    const id = await submitOne(ws, { action: 'erase', userId: 'single-user-1' });

    const row = await requestRow(id);
    expect(row).toMatchObject({
      workspace_id: ws.workspaceId,
      source: 'api',
      actor_type: 'api_key',
      actor_id: await privacyKeyId(ws.workspaceId),
      action: 'erase',
      scope: 'user',
      subject_kind: 'user_id',
      subject_value: 'single-user-1',
      status: 'queued',
      outcome: null,
    });
    expect(row!.subject_digest).toMatch(/^[0-9a-f]{64}$/);
    expect(await requestCount(ws.workspaceId)).toBe(1);
    expect(await jobCount(id)).toBe(1);
    const [job] = await env.sql<{ task_identifier: string; max_attempts: number; payload: unknown }[]>`
      select v.task_identifier, v.max_attempts, p.payload
        from graphile_worker.jobs v join graphile_worker._private_jobs p on p.id = v.id where v.key = ${id}`;
    expect(job).toMatchObject({
      task_identifier: 'execute_request',
      max_attempts: env.deps.executeMaxAttempts,
      payload: { requestId: id },
    });

    // The view never carries the raw subject, even while it is still stored.
    const view = await get(ws, `/v1/privacy/requests/${id}`);
    expect(view.status).toBe(200);
    expect(view.text).not.toContain('single-user-1');
  });

  it('a workspace-scope request takes no subject', async () => {
    const ws = await env.newWorkspace();
    const id = await submitOne(ws, { action: 'suppress', scope: 'workspace' });
    const view = await get(ws, `/v1/privacy/requests/${id}`);
    expect(view.json).toMatchObject({
      id,
      action: 'suppress',
      scope: 'workspace',
      subjectKind: 'workspace',
      status: 'queued',
    });
    expect((await requestRow(id))!.subject_value).toBeNull();
    expect(await jobCount(id)).toBe(1);
  });

  it('a batch answers per item: valid ones go through, invalid ones are reported with details', async () => {
    const ws = await env.newWorkspace();
    const res = await submit(ws, {
      requests: [
        { action: 'erase', userId: 'batch-a' },
        { action: 'erase', userId: 'batch-b', email: 'batch-b@example.com' },
        { action: 'obliterate', userId: 'batch-c' },
        { action: 'suppress', email: 'Batch.D@Example.com' },
        { action: 'erase', scope: 'workspace', userId: 'batch-e' },
        { action: 'erase' },
        { action: 'erase', userId: 'batch-f', unexpected: true },
        'not even an object',
        { action: 'unsuppress', userId: 'batch-g', externalRequestId: 'ext-batch-g' },
      ],
    });
    expect(res.status, res.text).toBe(202);
    const results = res.json.results as Record<string, unknown>[];
    expect(results.map((r) => r.index)).toEqual([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    expect(results.map((r) => r.accepted)).toEqual([true, false, false, true, false, false, false, false, true]);
    for (const i of [0, 3, 8]) {
      expect(results[i]).toEqual({
        index: i,
        accepted: true,
        requestId: expect.stringMatching(REQ_ID),
        status: 'queued',
      });
    }
    const pathsOf = (i: number) => (results[i]!.details as { path: string }[]).map((d) => d.path);
    for (const i of [1, 2, 4, 5, 6, 7]) {
      expect(results[i]).toMatchObject({ index: i, accepted: false, reason: 'invalid' });
      expect(results[i]!.requestId).toBeUndefined();
      expect((results[i]!.details as unknown[]).length).toBeGreaterThan(0);
    }
    expect(pathsOf(1)).toContain('userId');
    expect(pathsOf(2)).toContain('action');
    expect(pathsOf(4)).toContain('scope');
    expect(pathsOf(5)).toContain('userId');
    // Invalid items never echo the personal data they carried.
    expect(JSON.stringify(results)).not.toContain('batch-b@example.com');

    const accepted = [0, 3, 8].map((i) => results[i]!.requestId as string);
    expect(new Set(accepted).size).toBe(3);
    expect(await requestCount(ws.workspaceId)).toBe(3);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(3);
    for (const id of accepted) expect(await jobCount(id)).toBe(1);
    expect((await requestRow(accepted[1]!))).toMatchObject({ subject_kind: 'email', action: 'suppress' });
    expect((await requestRow(accepted[2]!))).toMatchObject({ external_request_id: 'ext-batch-g' });
  });

  it('a batch of 100 is accepted; 101 → 400 and nothing is created', async () => {
    const ws = await env.newWorkspace();
    const tooMany = await submit(ws, {
      requests: Array.from({ length: 101 }, (_, i) => ({ action: 'suppress', userId: `many-${i}` })),
    });
    const err = expectError(tooMany, 400, 'validation_failed');
    expect(err.details!.length).toBeGreaterThan(0);
    expect(await requestCount(ws.workspaceId)).toBe(0);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(0);

    const ok = await submit(ws, {
      requests: Array.from({ length: 100 }, (_, i) => ({ action: 'suppress', userId: `many-${i}` })),
    });
    expect(ok.status, ok.text).toBe(202);
    expect(ok.json.results).toHaveLength(100);
    expect(ok.json.results.every((r: { accepted: boolean }) => r.accepted)).toBe(true);
    expect(await requestCount(ws.workspaceId)).toBe(100);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(100);
  });

  it('a NUL character in a later item is that item\'s mistake: the batch is answered per item, as stored', async () => {
    const ws = await env.newWorkspace();
    const res = await submit(ws, {
      requests: [
        { action: 'suppress', userId: 'nul-ok', externalRequestId: 'nul-1' },
        { action: 'suppress', userId: 'nul-ok-2', externalRequestId: 'bad\u0000id' },
        { action: 'suppress', userId: 'nul\u0000user' },
      ],
    });
    expect(res.status, res.text).toBe(202);
    expect(res.json.results.map((r: { accepted: boolean; reason?: string }) => [r.accepted, r.reason ?? null])).toEqual([
      [true, null],
      [false, 'invalid'],
      [false, 'invalid'],
    ]);
    expect(JSON.stringify(res.json.results[1].details)).toMatch(/externalRequestId.*NUL/);
    expect(await requestCount(ws.workspaceId)).toBe(1);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(1);
  });

  it('a batch over 100 names the requests field in its details', async () => {
    const ws = await env.newWorkspace();
    const res = await submit(ws, {
      requests: Array.from({ length: 101 }, (_, i) => ({ action: 'erase', userId: `over-${i}` })),
    });
    const err = expectError(res, 400, 'validation_failed');
    expect(err.details!.map((d) => d.path)).toContain('requests');
  });

  it('an empty batch → 400', async () => {
    const ws = await env.newWorkspace();
    expectError(await submit(ws, { requests: [] }), 400, 'validation_failed');
    expect(await requestCount(ws.workspaceId)).toBe(0);
  });

  it('a second request for the same action and subject while the first is pending → duplicate_pending', async () => {
    const ws = await env.newWorkspace();
    const first = await submitOne(ws, { action: 'erase', email: 'Dup.Person@Example.com' });

    // Same subject spelled differently: the digest normalises the email.
    const dup = await submit(ws, { action: 'erase', email: '  dup.person@EXAMPLE.COM ' });
    expect(dup.status).toBe(202);
    expect(dup.json.results).toEqual([
      { index: 0, accepted: false, reason: 'duplicate_pending', existingRequestId: first, status: 'queued' },
    ]);
    // Within one batch too.
    const batch = await submit(ws, {
      requests: [
        { action: 'suppress', userId: 'dup-user' },
        { action: 'suppress', userId: 'dup-user' },
      ],
    });
    expect(batch.json.results[0]).toMatchObject({ accepted: true, requestId: expect.stringMatching(REQ_ID) });
    expect(batch.json.results[1]).toEqual({
      index: 1,
      accepted: false,
      reason: 'duplicate_pending',
      existingRequestId: batch.json.results[0].requestId,
      status: 'queued',
    });
    expect(await requestCount(ws.workspaceId)).toBe(2);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(2);

    // A different action on the same subject is its own request.
    const other = await submitOne(ws, { action: 'suppress', email: 'dup.person@example.com' });
    expect(other).not.toBe(first);
    // The same subject in another workspace is unrelated.
    const ws2 = await env.newWorkspace();
    await submitOne(ws2, { action: 'erase', email: 'dup.person@example.com' });

    // Once the first has finished, the same request can be made again.
    await env.runJobs();
    expect((await get(ws, `/v1/privacy/requests/${first}`)).json.status).toBe('complete');
    const again = await submitOne(ws, { action: 'erase', email: 'dup.person@example.com' });
    expect(again).not.toBe(first);
    expect(await jobCount(again)).toBe(1);
  });

  it('a resubmitted externalRequestId replays the original (before and after completion), no new job', async () => {
    const ws = await env.newWorkspace();
    const body = { action: 'suppress', userId: 'replay-user', externalRequestId: 'TICKET-1001' };
    const id = await submitOne(ws, body);
    expect(await jobCount(id)).toBe(1);

    const replay = await submit(ws, body);
    expect(replay.status).toBe(202);
    expect(replay.json.results).toEqual([
      { index: 0, accepted: true, requestId: id, status: 'queued', replayed: true },
    ]);
    expect(await requestCount(ws.workspaceId)).toBe(1);
    expect(await jobCount(id)).toBe(1);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(1);

    await env.runJobs();
    expect(await jobCount(id)).toBe(0);
    const afterDone = await submit(ws, body);
    expect(afterDone.json.results).toEqual([
      { index: 0, accepted: true, requestId: id, status: 'complete', replayed: true },
    ]);
    // The same external id for a different request is refused, pointing at the original.
    const differentBody = await submit(ws, {
      action: 'erase',
      userId: 'someone-else',
      externalRequestId: 'TICKET-1001',
    });
    expect(differentBody.status).toBe(202);
    expect(differentBody.json.results).toEqual([
      { index: 0, accepted: false, reason: 'conflict', existingRequestId: id, status: 'complete' },
    ]);
    // Another action for the same subject is a different request too: never a replay of the suppression.
    const otherAction = await submit(ws, { ...body, action: 'unsuppress' });
    expect(otherAction.json.results).toEqual([
      { index: 0, accepted: false, reason: 'conflict', existingRequestId: id, status: 'complete' },
    ]);
    // Same subject spelled differently is still the same request.
    const sameEmailBody = { action: 'suppress', email: 'Replay@Example.com', externalRequestId: 'TICKET-2002' };
    const emailId = await submitOne(ws, sameEmailBody);
    const emailReplay = await submit(ws, { ...sameEmailBody, email: ' replay@example.COM ' });
    expect(emailReplay.json.results[0]).toMatchObject({ accepted: true, requestId: emailId, replayed: true });
    await env.runJobs();
    expect(await requestCount(ws.workspaceId)).toBe(2);
    expect(await workspaceJobCount(ws.workspaceId)).toBe(0);
    expect((await get(ws, `/v1/privacy/requests/${id}`)).json).toMatchObject({ status: 'complete', attempts: 1 });

    // The external id is per workspace.
    const ws2 = await env.newWorkspace();
    const other = await submitOne(ws2, body);
    expect(other).not.toBe(id);
  });

  it('an externalRequestId is the workspace\'s: a dashboard session resubmitting one sent with the API key replays it', async () => {
    const ws = await env.newWorkspace();
    const body = { action: 'suppress', userId: 'replay-across', externalRequestId: 'TICKET-3003' };
    const id = await submitOne(ws, body);
    const s = await adminSession(env, ws.workspaceId);
    const pending = await s.call('POST', '/v1/privacy/requests', { body });
    expect(pending.json.results).toEqual([{ index: 0, accepted: true, requestId: id, status: 'queued', replayed: true }]);
    await env.runJobs();
    const done = await s.call('POST', '/v1/privacy/requests', { body });
    expect(done.json.results).toEqual([{ index: 0, accepted: true, requestId: id, status: 'complete', replayed: true }]);
    expect(await requestCount(ws.workspaceId)).toBe(1);
    // And the other way round.
    const fromSession = { action: 'unsuppress', userId: 'replay-across', externalRequestId: 'TICKET-3004' };
    const created = await s.call('POST', '/v1/privacy/requests', { body: fromSession });
    expect(created.json.results[0]).toMatchObject({ accepted: true, status: 'queued' });
    const viaKey = await submit(ws, fromSession);
    expect(viaKey.json.results).toEqual([
      { index: 0, accepted: true, requestId: created.json.results[0].requestId, status: 'queued', replayed: true },
    ]);
    expect(await requestCount(ws.workspaceId)).toBe(2);
  });

  it("migration 0013 moves ids stored from a dashboard session into the workspace's space, unless the key used it too", async () => {
    const ws = await env.newWorkspace();
    const s = await adminSession(env, ws.workspaceId);
    const moved = { action: 'suppress', userId: 'migrated-id', externalRequestId: 'TICKET-3005' };
    const both = { action: 'suppress', userId: 'used-twice', externalRequestId: 'TICKET-3006' };
    const movedId = (await s.call('POST', '/v1/privacy/requests', { body: moved })).json.results[0].requestId as string;
    const sessionTwice = (await s.call('POST', '/v1/privacy/requests', { body: both })).json.results[0].requestId as string;
    await env.runJobs();
    // As stored before: the dashboard's own key space, and the same id used with the key as well (a second request).
    await env.sql`update dsr_requests set dedupe_key = 'dashboard:ext:' || external_request_id where workspace_id = ${ws.workspaceId}`;
    const keyTwice = await submitOne(ws, both);
    expect(keyTwice).not.toBe(sessionTwice);
    const migration = readFileSync(new URL('../../drizzle/0013_external_id_workspace_space.sql', import.meta.url), 'utf8');
    await env.sql.unsafe(migration);
    const keys = await env.sql`select id, dedupe_key from dsr_requests where workspace_id = ${ws.workspaceId} order by dedupe_key`;
    expect(keys.map((k) => [k.id, k.dedupe_key])).toEqual([
      [movedId, 'api:ext:TICKET-3005'],
      [keyTwice, 'api:ext:TICKET-3006'],
      [sessionTwice, 'dashboard:ext:TICKET-3006'],
    ]);
    const again = await submit(ws, moved);
    expect(again.json.results).toEqual([{ index: 0, accepted: true, requestId: movedId, status: 'complete', replayed: true }]);
  });

  it.each([
    {
      label: 'both userId and email',
      body: { action: 'erase', userId: 'x', email: 'x@example.com' },
      field: 'userId',
    },
    { label: 'neither userId nor email', body: { action: 'erase' }, field: 'userId' },
    {
      label: 'a workspace scope with a userId',
      body: { action: 'erase', scope: 'workspace', userId: 'x' },
      field: 'scope',
    },
    {
      label: 'a workspace scope with an email',
      body: { action: 'erase', scope: 'workspace', email: 'x@example.com' },
      field: 'scope',
    },
    { label: 'a bad action', body: { action: 'delete', userId: 'x' }, field: 'action' },
    { label: 'a missing action', body: { userId: 'x' }, field: 'action' },
    { label: 'an invalid email', body: { action: 'erase', email: 'not-an-email' }, field: 'email' },
    { label: 'a bad scope', body: { action: 'erase', scope: 'tenant', userId: 'x' }, field: 'scope' },
    { label: 'an empty userId', body: { action: 'erase', userId: '' }, field: 'userId' },
  ])('a single body with $label → 400 validation_failed naming $field', async ({ body, field }) => {
    const ws = await env.newWorkspace();
    const err = expectError(await submit(ws, body), 400, 'validation_failed');
    expect(err.details, JSON.stringify(err)).toBeDefined();
    expect(err.details!.map((d) => d.path)).toContain(field);
    expect(await requestCount(ws.workspaceId)).toBe(0);
  });

  it('malformed JSON → 400 malformed_json; text/plain → 415', async () => {
    const ws = await env.newWorkspace();
    expectError(await submit(ws, '{"action": "erase",'), 400, 'malformed_json');
    expectError(
      await call(env, 'POST', '/v1/privacy/requests', {
        key: ws.privacyKey,
        body: '{"action":"erase","userId":"x"}',
        headers: { 'content-type': 'text/plain' },
      }),
      415,
      'unsupported_media_type',
    );
    expect(await requestCount(ws.workspaceId)).toBe(0);
  });
});

describe('GET /v1/privacy/requests/:id', () => {
  it('own request → 200; another workspace’s or a nonexistent id → 404 not_found', async () => {
    const a = await env.newWorkspace();
    const b = await env.newWorkspace();
    const id = await submitOne(a, { action: 'suppress', userId: 'get-user', externalRequestId: 'get-ext' });

    const own = await get(a, `/v1/privacy/requests/${id}`);
    expect(own.status).toBe(200);
    expect(own.json).toEqual({
      id,
      action: 'suppress',
      scope: 'user',
      subjectKind: 'user_id',
      status: 'queued',
      outcome: null,
      errorCode: null,
      externalRequestId: 'get-ext',
      upstreamRef: null,
      source: 'api',
      actor: { type: 'api_key', id: await privacyKeyId(a.workspaceId) },
      auditRecordId: null,
      attempts: 0,
      createdAt: expect.any(String),
      startedAt: null,
      finishedAt: null,
      upstreamStatus: null,
      upstream: [],
    });
    expect(Number.isNaN(Date.parse(own.json.createdAt))).toBe(false);

    expectError(await get(b, `/v1/privacy/requests/${id}`), 404, 'not_found');
    expectError(await get(a, '/v1/privacy/requests/req_00000000000000000000000000'), 404, 'not_found');
    expectError(await get(a, '/v1/privacy/requests/whatever'), 404, 'not_found');
  });
});

describe('GET /v1/privacy/requests (list)', () => {
  it('filters by status, externalRequestId, userId and email (case/space-insensitive)', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const erased = await submitOne(ws, { action: 'erase', userId: 'list-u1', externalRequestId: 'EXT-1' });
    const byEmail = await submitOne(ws, { action: 'suppress', email: 'List.Person@Example.com' });
    await submitOne(other, { action: 'erase', userId: 'list-u1', externalRequestId: 'EXT-1' });
    await env.runJobs();
    const queuedU1 = await submitOne(ws, { action: 'suppress', userId: 'list-u1' });
    const queuedU2 = await submitOne(ws, { action: 'erase', userId: 'list-u2' });

    const list = async (q: string) => {
      const res = await get(ws, `/v1/privacy/requests${q}`);
      expect(res.status, res.text).toBe(200);
      return (res.json.data as { id: string }[]).map((d) => d.id);
    };
    expect((await list('')).sort()).toEqual([erased, byEmail, queuedU1, queuedU2].sort());
    expect((await list('?status=complete')).sort()).toEqual([erased, byEmail].sort());
    expect((await list('?status=queued')).sort()).toEqual([queuedU1, queuedU2].sort());
    expect(await list('?status=failed')).toEqual([]);
    expect(await list('?externalRequestId=EXT-1')).toEqual([erased]);
    expect(await list('?externalRequestId=ext-1')).toEqual([]);
    expect((await list('?userId=list-u1')).sort()).toEqual([erased, queuedU1].sort());
    expect(await list('?userId=list-u1&status=queued')).toEqual([queuedU1]);
    expect(await list('?userId=LIST-U1')).toEqual([]);
    expect(await list(`?email=${encodeURIComponent('  LIST.person@example.COM ')}`)).toEqual([byEmail]);
    expect(await list('?email=list.person%40example.com')).toEqual([byEmail]);
    expect(await list('?email=nobody%40example.com')).toEqual([]);

    const all = await get(ws, '/v1/privacy/requests');
    expect(all.json.nextCursor).toBeNull();
    const ids = (all.json.data as { id: string }[]).map((d) => d.id);
    expect(ids).toEqual([...ids].sort().reverse());

    expectError(await get(ws, '/v1/privacy/requests?status=done'), 400, 'validation_failed');
    expectError(await get(ws, '/v1/privacy/requests?email=not-an-email'), 400, 'validation_failed');
  });

  it('userId and email also find a request sent with the other identifier, once it has run and resolved that user', async () => {
    const ws = await env.newWorkspace();
    const other = await env.newWorkspace();
    const person = { userId: 'res-u1', email: 'Res.Person@Example.com' };
    // The same person in another workspace: nothing of it may show in this one, nor the other way round.
    for (const w of [ws, other]) {
      const res = await ingest(w, '/v1/batch', {
        batch: [
          { type: 'identify', ...person },
          { type: 'identify', userId: 'res-u2', email: 'res.person@example.com' },
          { type: 'identify', userId: 'res-u3', email: 'res.three@example.com' },
        ],
      });
      expect(res.status, res.text).toBe(200);
    }
    // By email (resolves two profiles), by user id (resolves its email), an erasure whose profile is then gone, a
    // request that found nobody, and an erasure refused by a hold (the resolution it failed on is still what it was).
    const suppressByEmail = await submitOne(ws, { action: 'suppress', email: 'RES.person@example.com ' });
    const holdById = await submitOne(ws, { action: 'hold', userId: 'res-u1' });
    const eraseU3ByEmail = await submitOne(ws, { action: 'erase', email: 'res.three@example.com' });
    const ghost = await submitOne(ws, { action: 'erase', userId: 'res-ghost' });
    await submitOne(other, { action: 'suppress', email: 'res.person@example.com' });

    const list = async (w: CreatedWorkspace, q: string) => {
      const res = await get(w, `/v1/privacy/requests${q}`);
      expect(res.status, res.text).toBe(200);
      return (res.json.data as { id: string }[]).map((d) => d.id).sort();
    };
    const sorted = (...ids: string[]) => ids.sort();
    // Before anything ran, only what each request was sent with.
    expect(await list(ws, '?userId=res-u1')).toEqual([holdById]);
    expect(await list(ws, '?email=res.person%40example.com')).toEqual([suppressByEmail]);

    await env.runJobs();
    const eraseByEmail = await submitOne(ws, { action: 'erase', email: 'res.person@example.com' });
    await env.runJobs();
    expect((await get(ws, `/v1/privacy/requests/${eraseByEmail}`)).json).toMatchObject({ status: 'failed', errorCode: 'legal_hold' });
    expect((await get(ws, `/v1/privacy/requests/${eraseU3ByEmail}`)).json).toMatchObject({ outcome: 'erased' });
    const queuedU2 = await submitOne(ws, { action: 'unsuppress', userId: 'res-u2' });

    expect(await list(ws, '?userId=res-u1')).toEqual(sorted(suppressByEmail, holdById, eraseByEmail));
    expect(await list(ws, '?userId=res-u2')).toEqual(sorted(suppressByEmail, eraseByEmail, queuedU2));
    expect(await list(ws, '?userId=res-u2&status=complete')).toEqual([suppressByEmail]);
    expect(await list(ws, `?email=${encodeURIComponent(' RES.Person@example.com')}`)).toEqual(sorted(suppressByEmail, holdById, eraseByEmail));
    expect(await list(ws, '?userId=res-u3')).toEqual([eraseU3ByEmail]);
    expect(await list(ws, '?userId=res-ghost')).toEqual([ghost]);
    expect(await list(ws, '?email=res.three%40example.com')).toEqual([eraseU3ByEmail]);
    // The other workspace's request for the same person stays its own.
    expect(await list(other, '?userId=res-u1')).toHaveLength(1);
    expect(await list(other, '?userId=res-u1')).toEqual(await list(other, '?email=res.person%40example.com'));

    // Only keyed digests are kept of what a request resolved to, never the identifiers themselves.
    const rows = await env.sql<{ id: string; resolved_digests: string[] | null }[]>`
      select id, resolved_digests from dsr_requests where workspace_id = ${ws.workspaceId}`;
    const resolved = new Map(rows.map((r) => [r.id, r.resolved_digests]));
    const d = (kind: 'user_id' | 'email', v: string) => subjectDigest(env.deps.digestKey, ws.workspaceId, kind, v);
    expect(resolved.get(holdById)).toEqual([d('user_id', 'res-u1'), d('email', 'res.person@example.com')]);
    expect(new Set(resolved.get(suppressByEmail))).toEqual(
      new Set([d('user_id', 'res-u1'), d('user_id', 'res-u2'), d('email', 'res.person@example.com')]),
    );
    expect(resolved.get(ghost)).toBeNull();
    expect(resolved.get(queuedU2)).toBeNull();
  });

  it('paginates newest first with no duplicates or gaps; nextCursor null at the end', async () => {
    const ws = await env.newWorkspace();
    const created: string[] = [];
    for (let i = 0; i < 5; i++) created.push(await submitOne(ws, { action: 'suppress', userId: `page-${i}` }));

    const { ids, pages } = await allPages(ws, '/v1/privacy/requests', 2);
    expect(pages).toBe(3);
    expect(ids).toHaveLength(5);
    expect(new Set(ids).size).toBe(5);
    expect([...ids].sort()).toEqual([...created].sort());
    expect(ids).toEqual([...created].sort().reverse());

    const exact = await get(ws, '/v1/privacy/requests?limit=5');
    expect(exact.json.data).toHaveLength(5);
    expect(exact.json.nextCursor).toBeNull();
    const byFilter = await allPages(ws, '/v1/privacy/requests?status=queued', 1);
    expect(byFilter.ids).toEqual(ids);
  });

  it('what the cursor promises: requests committed before the first page, once each; a late commit can sort behind it', async () => {
    const ws = await env.newWorkspace();
    const pause = () => new Promise((r) => setTimeout(r, 5));
    const w = await submitOne(ws, { action: 'suppress', userId: 'cursor-w' });
    await pause();
    const y = await submitOne(ws, { action: 'suppress', userId: 'cursor-y' });
    await pause();
    // Another transaction holds the dedupe key of X's externalRequestId: X gets its id now, then waits to commit.
    const holder = await env.sql.reserve();
    await holder`begin`;
    await holder`insert into dsr_requests (id, workspace_id, source, actor_type, action, scope, subject_kind, subject_digest, dedupe_key)
                 values ('req_0000000000000000000000000', ${ws.workspaceId}, 'api', 'system', 'suppress', 'user', 'user_id', 'd', 'api:ext:ticket-x')`;
    const late = submit(ws, { action: 'suppress', userId: 'cursor-x', externalRequestId: 'ticket-x' });
    for (let waited = 0; ; waited += 10) {
      const [waiting] = await env.sql`select 1 from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'`;
      if (waiting) break;
      if (waited > 10_000) throw new Error('the late request never waited');
      await new Promise((r) => setTimeout(r, 10));
    }
    await pause();
    const z = await submitOne(ws, { action: 'suppress', userId: 'cursor-z' });

    const page1 = await get(ws, '/v1/privacy/requests?limit=2');
    expect(page1.json.data.map((r: { id: string }) => r.id)).toEqual([z, y]);
    await holder`rollback`;
    holder.release();
    const x = (await late).json.results[0];
    expect(x).toMatchObject({ accepted: true });
    expect(x.requestId > y && x.requestId < z).toBe(true);

    // X committed inside the range page 1 already covered: following the cursor does not show it.
    const page2 = await get(ws, `/v1/privacy/requests?limit=2&cursor=${page1.json.nextCursor}`);
    expect(page2.json.data.map((r: { id: string }) => r.id)).toEqual([w]);
    expect(page2.json.nextCursor).toBeNull();
    // A listing started again shows every request once, X included.
    const { ids } = await allPages(ws, '/v1/privacy/requests', 2);
    expect(ids).toEqual([z, x.requestId, y, w]);
  });

  it('rejects a garbage cursor and an out-of-range limit with 400', async () => {
    const ws = await env.newWorkspace();
    const err = expectError(await get(ws, '/v1/privacy/requests?cursor=garbage'), 400, 'validation_failed');
    expect(err.details!.map((d) => d.path)).toContain('cursor');
    expectError(
      await get(ws, `/v1/privacy/requests?cursor=${Buffer.from("req_x' or 1=1").toString('base64url')}`),
      400,
      'validation_failed',
    );
    expectError(await get(ws, '/v1/privacy/requests?limit=0'), 400, 'validation_failed');
    expectError(await get(ws, '/v1/privacy/requests?limit=101'), 400, 'validation_failed');
    expectError(await get(ws, '/v1/privacy/requests?limit=abc'), 400, 'validation_failed');
  });

  it('?upstreamStatus= lists the requests whose upstreamStatus is that one, not any request with one ticket in that state', async () => {
    const ws = await env.newWorkspace();
    const connectorId = await createConnectorVia(env, ws.adminKey, {
      vendor: 'datagrail',
      name: 'dg',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: 'dg-upstream-status-secret', apiKey: 'dg-key' },
    });
    const withTickets = async (userId: string, statuses: string[]) => {
      const id = await submitOne(ws, { action: 'suppress', userId });
      for (const [i, status] of statuses.entries()) {
        await env.sql`insert into upstream_tickets (id, workspace_id, connector_id, ticket_key, request_id, action, subject_digest, upstream_ref, status)
                      values (${`tkt_${userId}_${i}`}, ${ws.workspaceId}, ${connectorId}, ${`${userId}-${i}`}, ${id}, 'suppress', 'd', ${`${userId}-${i}`}, ${status})`;
      }
      return id;
    };
    const deliveredAndFailed = await withTickets('us-a', ['delivered', 'failed']);
    const deliveredAndPending = await withTickets('us-b', ['delivered', 'pending']);
    const delivered = await withTickets('us-c', ['delivered']);
    const pending = await withTickets('us-d', ['pending']);
    await withTickets('us-e', []);
    const pendingAndFailed = await withTickets('us-f', ['pending', 'failed']);
    for (const [status, expected] of [
      ['failed', [deliveredAndFailed, pendingAndFailed]],
      ['pending', [deliveredAndPending, pending]],
      ['delivered', [delivered]],
    ] as const) {
      const res = await get(ws, `/v1/privacy/requests?upstreamStatus=${status}`);
      expect(res.status, res.text).toBe(200);
      const rows = res.json.data as { id: string; upstreamStatus: string }[];
      expect(rows.map((r) => r.upstreamStatus), status).toEqual(expected.map(() => status));
      expect(rows.map((r) => r.id).sort(), status).toEqual([...expected].sort());
    }
  });

  it("a cursor from the other listing → 400 naming cursor, not an empty last page", async () => {
    const ws = await env.newWorkspace();
    for (const u of ['swap-1', 'swap-2']) await submitOne(ws, { action: 'suppress', userId: u });
    await env.runJobs();
    const requestsPage = await get(ws, '/v1/privacy/requests?limit=1');
    const auditPage = await get(ws, '/v1/privacy/audit?limit=1');
    expect(requestsPage.json.nextCursor).toEqual(expect.any(String));
    expect(auditPage.json.nextCursor).toEqual(expect.any(String));
    for (const path of [
      `/v1/privacy/requests?limit=1&cursor=${auditPage.json.nextCursor}`,
      `/v1/privacy/audit?limit=1&cursor=${requestsPage.json.nextCursor}`,
    ]) {
      const err = expectError(await get(ws, path), 400, 'validation_failed');
      expect(err.details!.map((d) => d.path), path).toEqual(['cursor']);
    }
    // Each in its own listing leads to the second item.
    expect((await get(ws, `/v1/privacy/requests?limit=1&cursor=${requestsPage.json.nextCursor}`)).json.data).toHaveLength(1);
    expect((await get(ws, `/v1/privacy/audit?limit=1&cursor=${auditPage.json.nextCursor}`)).json.data).toHaveLength(1);
  });
});

describe('empty filters', () => {
  it('an empty userId, externalRequestId, upstreamRef or requestId filter → 400 naming it, not every request', async () => {
    const ws = await env.newWorkspace();
    await submitOne(ws, { action: 'suppress', userId: 'someone-else' });
    for (const [path, field] of [
      ['/v1/privacy/requests?userId=', 'userId'],
      ['/v1/privacy/requests?externalRequestId=', 'externalRequestId'],
      ['/v1/privacy/requests?upstreamRef=', 'upstreamRef'],
      ['/v1/privacy/audit?userId=', 'userId'],
      ['/v1/privacy/audit?requestId=', 'requestId'],
    ] as const) {
      const err = expectError(await get(ws, path), 400, 'validation_failed');
      expect(err.details!.map((d) => d.path), path).toEqual([field]);
    }
  });

  it('a misspelt or unsupported filter → 400 naming it, not every request', async () => {
    const ws = await env.newWorkspace();
    await submitOne(ws, { action: 'suppress', userId: 'someone-else', externalRequestId: 'EXT-other' });
    await env.runJobs();
    for (const [path, field] of [
      ['/v1/privacy/requests?externalRequestID=EXT-mine', 'externalRequestID'],
      ['/v1/privacy/requests?user_id=u-mine', 'user_id'],
      ['/v1/privacy/requests?status=complete&emial=me%40example.com', 'emial'],
      // The audit list has no externalRequestId filter: it must not answer with every record.
      ['/v1/privacy/audit?externalRequestId=EXT-mine', 'externalRequestId'],
    ] as const) {
      const err = expectError(await get(ws, path), 400, 'validation_failed');
      expect(err.details, path).toEqual([{ path: field, message: 'unknown query parameter' }]);
    }
    // A parameter name that is a value (an email) is not repeated.
    const odd = await get(ws, '/v1/privacy/requests?someone%40example.com=1');
    expect(expectError(odd, 400, 'validation_failed').details).toEqual([{ path: '[key]', message: 'unknown query parameter' }]);
    expect(odd.text).not.toContain('someone');
    // The documented ones still work.
    expect((await get(ws, '/v1/privacy/requests?externalRequestId=EXT-other&limit=5&cursor=')).json.data).toHaveLength(1);
  });
});

describe('execution and audit', () => {
  const EMAIL = 'Audit.Subject-4417@Example.com';
  const USER_ID = 'audit-subject-user-4417';
  const NAME = 'Audrey Subjectperson';

  async function seedProfile(ws: CreatedWorkspace, userId: string, email?: string) {
    const res = await ingest(ws, '/v1/batch', {
      batch: [
        { type: 'identify', userId, email, name: NAME },
        { type: 'track', userId, event: 'e1' },
        { type: 'track', userId, event: 'e2' },
        { type: 'message', userId, conversationId: `conv-${userId}`, role: 'user', content: 'hello' },
        { type: 'message', userId, conversationId: `conv-${userId}`, role: 'assistant', content: 'hi' },
        { type: 'topic_question', userId, question: 'q?' },
      ],
    });
    expect(res.status, res.text).toBe(200);
  }

  it('an erase by email completes, wipes the raw subject, and leaves a PII-free audit record', async () => {
    const ws = await env.newWorkspace();
    await seedProfile(ws, USER_ID, EMAIL);
    await seedProfile(ws, 'bystander', 'bystander@example.com');
    const id = await submitOne(ws, { action: 'erase', email: `  ${EMAIL.toUpperCase()} ` });
    const queued = await requestRow(id);
    expect(queued!.subject_value).toBe(EMAIL.toUpperCase());
    const digest = queued!.subject_digest;

    await env.runJobs();

    const req = await get(ws, `/v1/privacy/requests/${id}`);
    expect(req.status).toBe(200);
    expect(req.json).toMatchObject({
      id,
      status: 'complete',
      outcome: 'erased',
      errorCode: null,
      attempts: 1,
      auditRecordId: expect.stringMatching(AUD_ID),
      startedAt: expect.any(String),
      finishedAt: expect.any(String),
    });
    const row = await requestRow(id);
    expect(row!.subject_value).toBeNull();
    expect(row!.subject_digest).toBe(digest);
    expect(row!.audit_record_id).toBe(req.json.auditRecordId);
    expect(await jobCount(id)).toBe(0);

    const audit = await get(ws, `/v1/privacy/audit/${req.json.auditRecordId}`);
    expect(audit.status).toBe(200);
    expect(audit.json).toEqual({
      id: req.json.auditRecordId,
      requestId: id,
      action: 'erase',
      scope: 'user',
      subjectKind: 'email',
      subjectDigest: digest,
      actor: { type: 'api_key', id: await privacyKeyId(ws.workspaceId) },
      upstreamRef: null,
      status: 'complete',
      outcome: 'erased',
      counts: { profiles: 1, events: 2, conversations: 1, messages: 2, topicQuestions: 1, suppressions: 0 },
      errorCode: null,
      startedAt: expect.any(String),
      finishedAt: expect.any(String),
      recordedAt: expect.any(String),
      chain: {
        algorithm: 'sha256',
        position: 1,
        prevHash: null,
        hash: expect.stringMatching(/^[0-9a-f]{64}$/),
        canonical: expect.any(String),
        intact: true,
      },
    });
    expect(Date.parse(audit.json.finishedAt)).toBeGreaterThanOrEqual(Date.parse(audit.json.startedAt));
    // The hash is sha256 of the canonical text, and the canonical text carries the record's own fields.
    expect(createHash('sha256').update(audit.json.chain.canonical).digest('hex')).toBe(audit.json.chain.hash);
    expect(JSON.parse(audit.json.chain.canonical)).toMatchObject({ id: audit.json.id, position: 1, subjectDigest: digest });

    // The data is gone; the bystander's is not.
    const [left] = await env.sql<{ users: number; events: number; messages: number }[]>`
      select (select count(*) from end_users where workspace_id = ${ws.workspaceId})::int as users,
             (select count(*) from events where workspace_id = ${ws.workspaceId})::int as events,
             (select count(*) from messages where workspace_id = ${ws.workspaceId})::int as messages`;
    expect(left).toEqual({ users: 1, events: 2, messages: 2 });

    // No plaintext subject anywhere it would persist or be shown.
    const [auditRow] = await env.sql<{ t: string }[]>`
      select row_to_json(a)::text as t from audit_records a where id = ${req.json.auditRecordId}`;
    const [ws2] = await env.sql<{ t: string }[]>`
      select coalesce(string_agg(row_to_json(a)::text, ''), '') as t from audit_records a
       where workspace_id = ${ws.workspaceId}`;
    for (const text of [audit.text, req.text, auditRow!.t, ws2!.t, row!.as_json, env.logs.text()]) {
      const lower = text.toLowerCase();
      expect(lower).not.toContain(EMAIL.toLowerCase());
      expect(lower).not.toContain('audit.subject');
      expect(lower).not.toContain(USER_ID);
      expect(lower).not.toContain('audrey');
    }
  });

  it('an erase by user id leaves no plaintext user id in the audit record or the request row', async () => {
    const ws = await env.newWorkspace();
    const userId = 'uid-Plaintext-9931';
    await seedProfile(ws, userId, 'plain9931@example.com');
    const id = await submitOne(ws, { action: 'erase', userId });
    await env.runJobs();
    const req = await get(ws, `/v1/privacy/requests/${id}`);
    expect(req.json).toMatchObject({ status: 'complete', outcome: 'erased' });
    const audit = await get(ws, `/v1/privacy/audit/${req.json.auditRecordId}`);
    expect(audit.json).toMatchObject({ subjectKind: 'user_id', outcome: 'erased', counts: { profiles: 1, events: 2 } });
    const [auditRow] = await env.sql<{ t: string }[]>`
      select row_to_json(a)::text as t from audit_records a where id = ${req.json.auditRecordId}`;
    const row = await requestRow(id);
    expect(row!.subject_value).toBeNull();
    for (const text of [audit.text, req.text, auditRow!.t, row!.as_json, env.logs.text()]) {
      expect(text.toLowerCase()).not.toContain(userId.toLowerCase());
      expect(text.toLowerCase()).not.toContain('plain9931');
    }
  });

  it('an email shared by several profiles (any case) erases all of them', async () => {
    const ws = await env.newWorkspace();
    await seedProfile(ws, 'twin-1', 'Twin@Example.com');
    await seedProfile(ws, 'twin-2', 'twin@example.COM');
    await seedProfile(ws, 'not-a-twin', 'other@example.com');
    const id = await submitOne(ws, { action: 'erase', email: 'twin@example.com' });
    await env.runJobs();
    const req = await get(ws, `/v1/privacy/requests/${id}`);
    expect(req.json).toMatchObject({ status: 'complete', outcome: 'erased' });
    const audit = await get(ws, `/v1/privacy/audit/${req.json.auditRecordId}`);
    expect(audit.json.counts).toMatchObject({
      profiles: 2,
      events: 4,
      messages: 4,
      conversations: 2,
      topicQuestions: 2,
    });
    const users = await env.sql<{ external_id: string }[]>`
      select external_id from end_users where workspace_id = ${ws.workspaceId}`;
    expect(users.map((u) => u.external_id)).toEqual(['not-a-twin']);
  });

  it('a subject that does not exist → complete with outcome not_found and its own audit record', async () => {
    const ws = await env.newWorkspace();
    await seedProfile(ws, 'someone-real', 'real@example.com');
    const a = await submitOne(ws, { action: 'erase', userId: 'ghost-user' });
    const b = await submitOne(ws, { action: 'suppress', email: 'ghost@example.com' });
    await env.runJobs();
    const auditIds = new Set<string>();
    for (const id of [a, b]) {
      const req = await get(ws, `/v1/privacy/requests/${id}`);
      expect(req.json).toMatchObject({
        status: 'complete',
        outcome: 'not_found',
        auditRecordId: expect.stringMatching(AUD_ID),
      });
      auditIds.add(req.json.auditRecordId);
      const audit = await get(ws, `/v1/privacy/audit/${req.json.auditRecordId}`);
      expect(audit.status).toBe(200);
      expect(audit.json).toMatchObject({ requestId: id, status: 'complete', outcome: 'not_found', counts: {} });
      expect((await requestRow(id))!.subject_value).toBeNull();
    }
    expect(auditIds.size).toBe(2);
    const [n] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from audit_records where workspace_id = ${ws.workspaceId}`;
    expect(n!.n).toBe(2);
    const [users] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from end_users where workspace_id = ${ws.workspaceId}`;
    expect(users!.n).toBe(1);
  });

  it('suppress and unsuppress record suppression counts', async () => {
    const ws = await env.newWorkspace();
    await seedProfile(ws, 'sup-user', 'sup@example.com');
    const s = await submitOne(ws, { action: 'suppress', userId: 'sup-user' });
    await env.runJobs();
    const sReq = await get(ws, `/v1/privacy/requests/${s}`);
    expect(sReq.json).toMatchObject({ status: 'complete', outcome: 'suppressed' });
    expect((await get(ws, `/v1/privacy/audit/${sReq.json.auditRecordId}`)).json.counts).toEqual({ suppressions: 1 });
    const [supp] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from suppressions where workspace_id = ${ws.workspaceId} and request_id = ${s}`;
    expect(supp!.n).toBe(1);

    const u = await submitOne(ws, { action: 'unsuppress', email: 'SUP@example.com' });
    await env.runJobs();
    const uReq = await get(ws, `/v1/privacy/requests/${u}`);
    expect(uReq.json).toMatchObject({ status: 'complete', outcome: 'unsuppressed' });
    expect((await get(ws, `/v1/privacy/audit/${uReq.json.auditRecordId}`)).json.counts).toEqual({ suppressions: 1 });
    const [left] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from suppressions where workspace_id = ${ws.workspaceId}`;
    expect(left!.n).toBe(0);
  });

  it('another workspace’s audit record → 404; a nonexistent one → 404', async () => {
    const a = await env.newWorkspace();
    const b = await env.newWorkspace();
    const id = await submitOne(a, { action: 'erase', userId: 'cross-ws' });
    await env.runJobs();
    const auditId = (await get(a, `/v1/privacy/requests/${id}`)).json.auditRecordId as string;
    expect(auditId).toMatch(AUD_ID);
    expect((await get(a, `/v1/privacy/audit/${auditId}`)).status).toBe(200);
    expectError(await get(b, `/v1/privacy/audit/${auditId}`), 404, 'not_found');
    expectError(await get(a, '/v1/privacy/audit/aud_00000000000000000000000000'), 404, 'not_found');
    const listB = await get(b, '/v1/privacy/audit');
    expect(listB.json).toEqual({ data: [], nextCursor: null });
    const filtered = await get(b, `/v1/privacy/audit?requestId=${id}`);
    expect(filtered.json.data).toEqual([]);
  });

  it('lists audit records with filters and pagination', async () => {
    const ws = await env.newWorkspace();
    await seedProfile(ws, 'al-1', 'Al.One@Example.com');
    await seedProfile(ws, 'al-2', 'al.two@example.com');
    const erase1 = await submitOne(ws, { action: 'erase', userId: 'al-1' });
    const supp2 = await submitOne(ws, { action: 'suppress', email: 'al.two@example.com' });
    const ghost = await submitOne(ws, { action: 'erase', userId: 'al-ghost' });
    await env.runJobs();
    const unsupp2 = await submitOne(ws, { action: 'unsuppress', userId: 'al-2' });
    await env.runJobs();

    const auditOf = async (reqId: string) =>
      (await get(ws, `/v1/privacy/requests/${reqId}`)).json.auditRecordId as string;
    const aErase1 = await auditOf(erase1);
    const aSupp2 = await auditOf(supp2);
    const aGhost = await auditOf(ghost);
    const aUnsupp2 = await auditOf(unsupp2);
    const everything = [aErase1, aSupp2, aGhost, aUnsupp2];

    const list = async (q: string) => {
      const res = await get(ws, `/v1/privacy/audit${q}`);
      expect(res.status, res.text).toBe(200);
      return (res.json.data as { id: string }[]).map((d) => d.id);
    };
    const all = await list('');
    expect([...all].sort()).toEqual([...everything].sort());
    expect(all).toEqual([...all].sort().reverse());
    expect(await list(`?requestId=${supp2}`)).toEqual([aSupp2]);
    expect(await list('?outcome=not_found')).toEqual([aGhost]);
    expect(await list('?outcome=erased')).toEqual([aErase1]);
    expect(await list('?outcome=failed')).toEqual([]);
    expect((await list('?action=erase')).sort()).toEqual([aErase1, aGhost].sort());
    expect(await list('?status=failed')).toEqual([]);
    expect(await list('?userId=al-1')).toEqual([aErase1]);
    // By user id: only the request made by user id (the email one has another digest).
    expect(await list('?userId=al-2')).toEqual([aUnsupp2]);
    expect(await list(`?email=${encodeURIComponent(' AL.TWO@example.COM ')}`)).toEqual([aSupp2]);
    expect(await list('?userId=al-ghost&outcome=not_found')).toEqual([aGhost]);
    expect(await list('?userId=al-ghost&outcome=erased')).toEqual([]);

    const { ids, pages } = await allPages(ws, '/v1/privacy/audit', 1);
    expect(pages).toBe(4);
    expect(ids).toEqual(all);
    const twoByTwo = await allPages(ws, '/v1/privacy/audit', 2);
    expect(twoByTwo.pages).toBe(2);
    expect(twoByTwo.ids).toEqual(all);

    expectError(await get(ws, '/v1/privacy/audit?cursor=%%%'), 400, 'validation_failed');
    expectError(await get(ws, '/v1/privacy/audit?cursor=bm90LWEtY3Vyc29y'), 400, 'validation_failed');
    expectError(await get(ws, '/v1/privacy/audit?outcome=vanished'), 400, 'validation_failed');
  });

  it('audit records are immutable in the database', async () => {
    const ws = await env.newWorkspace();
    const id = await submitOne(ws, { action: 'erase', userId: 'immutable-check' });
    await env.runJobs();
    const auditId = (await get(ws, `/v1/privacy/requests/${id}`)).json.auditRecordId as string;
    await expect(env.sql`update audit_records set outcome = 'erased' where id = ${auditId}`).rejects.toThrow();
    await expect(env.sql`delete from audit_records where id = ${auditId}`).rejects.toThrow();
    expect((await get(ws, `/v1/privacy/audit/${auditId}`)).json.outcome).toBe('not_found');
  });
});
