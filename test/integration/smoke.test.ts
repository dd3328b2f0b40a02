import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
beforeAll(async () => {
  env = await createTestEnv();
});
afterAll(() => env.close());

describe('smoke', () => {
  it('ingests, erases and audits end to end', async () => {
    const ws = await env.newWorkspace();
    const id = await call(env, 'POST', '/v1/identify', {
      key: ws.ingestKey,
      body: { userId: 'u1', email: 'Alice@Example.com', name: 'Alice' },
    });
    expect(id.status).toBe(200);
    const tr = await call(env, 'POST', '/v1/track', { key: ws.ingestKey, body: { userId: 'u1', event: 'opened' } });
    expect(tr.json).toMatchObject({ accepted: true, stored: true });
    const req = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { action: 'erase', email: ' alice@example.COM ' },
    });
    expect(req.status).toBe(202);
    const requestId = req.json.results[0].requestId;
    await env.runJobs();
    const got = await call(env, 'GET', `/v1/privacy/requests/${requestId}`, { key: ws.privacyKey });
    expect(got.json).toMatchObject({ status: 'complete', outcome: 'erased' });
    const audit = await call(env, 'GET', `/v1/privacy/audit/${got.json.auditRecordId}`, { key: ws.privacyKey });
    expect(audit.json.counts).toMatchObject({ profiles: 1, events: 1 });
  });
});
