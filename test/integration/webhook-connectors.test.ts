/**
 * The web process keeps connectors opened between webhooks (src/upstream/store.ts WebhookConnectors) and stores a
 * fresh ticket in one statement that also checks the connector is still what the webhook was verified with. These
 * tests change connectors after they were used (through the admin API, and behind the service's back in SQL) and
 * check that no webhook is ever accepted or stored under an out-of-date copy, and that valid ones are not refused.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { datagrailBody, datagrailWebhook, FAKE_DATAGRAIL_API_KEY } from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook } from '../../connectors/onetrust/fake.ts';
import { FAKE_API_KEY, startFakeTranscend } from '../../connectors/transcend/fake.ts';
import { freshWriter } from '../../src/upstream/tickets.ts';
import { call, createConnectorVia, createTestEnv, expectError, type TestEnv } from '../helpers/db.ts';
import { uniq } from '../helpers/factories.ts';

let env: TestEnv;
let ws: CreatedWorkspace;

const createConnector = (body: unknown) => createConnectorVia(env, ws.adminKey, body);

const datagrail = (secret: string) =>
  createConnector({
    vendor: 'datagrail',
    name: 'DataGrail',
    config: { callbackHosts: ['127.0.0.1'] },
    secrets: { webhookSecret: secret, apiKey: FAKE_DATAGRAIL_API_KEY },
  });

/** A DataGrail deletion webhook for a new ticket (or the given one), signed with `secret`. */
function dgWebhook(secret: string, ticket = randomUUID()) {
  const body = datagrailBody({
    webhook_request_id: ticket,
    identifiers: { email: `${uniq('c')}@example.test` },
    callback_url: 'http://127.0.0.1:9/api/v2/webhooks/callback',
  });
  return { ticket, ...datagrailWebhook({ secret, body }) };
}

function deliver(vendor: string, id: string, w: { headers: Record<string, string>; rawBody: string }) {
  return call(env, 'POST', `/webhooks/${vendor}/${id}`, {
    body: w.rawBody,
    headers: { 'content-type': 'application/json', ...w.headers },
  });
}

async function stored(connectorId: string) {
  await env.deps.outbox.idle();
  const [row] = await env.sql<{ tickets: number; requests: number; outbox: number; jobs: number }[]>`
    select (select count(*) from upstream_tickets where connector_id = ${connectorId})::int as tickets,
           (select count(*) from dsr_requests where actor_id = ${connectorId})::int as requests,
           (select count(*) from job_outbox o where o.payload->>'requestId' in
              (select id from dsr_requests where actor_id = ${connectorId}))::int as outbox,
           (select count(*) from graphile_worker._private_jobs j where j.key in
              (select id from dsr_requests where actor_id = ${connectorId}))::int as jobs`;
  return row!;
}

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('cache');
});

afterAll(async () => {
  await env?.close();
});

describe('connectors kept between webhooks', () => {
  it('a fresh ticket is stored with its request and its job, and the job reaches graphile-worker', async () => {
    const id = await datagrail('secret-0');
    const w = dgWebhook('secret-0');
    const res = await deliver('datagrail', id, w);
    expect(res.status, res.text).toBe(200);
    const requestId = res.json.received[0].requestId as string;
    // The web side's own dispatch moved the job: nothing left in the outbox, one job under the request's key.
    expect(await stored(id)).toEqual({ tickets: 1, requests: 1, outbox: 0, jobs: 1 });
    const [job] = await env.sql`select payload, max_attempts from graphile_worker._private_jobs where key = ${requestId}`;
    expect(job).toMatchObject({ payload: { requestId }, max_attempts: env.deps.executeMaxAttempts });
  });

  it('secrets replaced after use: the new secret is accepted at once, the old one refused', async () => {
    const id = await datagrail('secret-1');
    expect((await deliver('datagrail', id, dgWebhook('secret-1'))).status).toBe(200);
    const put = await call(env, 'PUT', `/v1/admin/connectors/${id}/secrets`, {
      key: ws.adminKey,
      body: { secrets: { webhookSecret: 'secret-2', apiKey: FAKE_DATAGRAIL_API_KEY } },
    });
    expect(put.status, put.text).toBe(200);
    expect((await deliver('datagrail', id, dgWebhook('secret-2'))).status).toBe(200);
    expectError(await deliver('datagrail', id, dgWebhook('secret-1')), 401, 'unauthorized');
    expect(await stored(id)).toMatchObject({ tickets: 2, requests: 2 });
  });

  // Through the admin API, and in SQL behind the service's back (no updated_at, no API): the same outcome.
  it.each([
    {
      how: 'through the admin API',
      secret: 'secret-3',
      disable: async (id: string) => {
        const patch = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, { key: ws.adminKey, body: { enabled: false } });
        expect(patch.status, patch.text).toBe(200);
      },
    },
    {
      how: 'in SQL behind the service',
      secret: 'secret-4',
      disable: async (id: string) => {
        await env.sql`update connectors set enabled = false where id = ${id}`;
      },
    },
  ])('disabled after use ($how): a new ticket and a redelivery both get 404 and nothing is stored', async ({ secret, disable }) => {
    const id = await datagrail(secret);
    const first = dgWebhook(secret);
    expect((await deliver('datagrail', id, first)).status).toBe(200);
    const before = await stored(id);
    await disable(id);
    expectError(await deliver('datagrail', id, dgWebhook(secret)), 404, 'not_found');
    expectError(await deliver('datagrail', id, first), 404, 'not_found');
    expect(await stored(id)).toEqual(before);
  });

  it('health checks: a kept copy answers while the connector is current; disabled, re-secreted or deleted since, it does not', async () => {
    const healthCheck = (secret: string) =>
      datagrailWebhook({ secret, body: { integration_kind: 'webhook', request_type: 'health_check' } });
    const id = await datagrail('secret-hc');
    expect((await deliver('datagrail', id, healthCheck('secret-hc'))).status).toBe(200);
    expect((await deliver('datagrail', id, healthCheck('secret-hc'))).status).toBe(200); // from the kept copy
    await env.sql`update connectors set enabled = false where id = ${id}`;
    expectError(await deliver('datagrail', id, healthCheck('secret-hc')), 404, 'not_found');
    await env.sql`update connectors set enabled = true where id = ${id}`;
    expect((await deliver('datagrail', id, healthCheck('secret-hc'))).status).toBe(200);
    const put = await call(env, 'PUT', `/v1/admin/connectors/${id}/secrets`, {
      key: ws.adminKey,
      body: { secrets: { webhookSecret: 'secret-hc-2', apiKey: FAKE_DATAGRAIL_API_KEY } },
    });
    expect(put.status, put.text).toBe(200);
    expectError(await deliver('datagrail', id, healthCheck('secret-hc')), 401, 'unauthorized');
    expect((await deliver('datagrail', id, healthCheck('secret-hc-2'))).status).toBe(200);
    const del = await call(env, 'DELETE', `/v1/admin/connectors/${id}`, { key: ws.adminKey });
    expect(del.status, del.text).toBeLessThan(300);
    expectError(await deliver('datagrail', id, healthCheck('secret-hc-2')), 404, 'not_found');
    expect(await stored(id)).toEqual({ tickets: 0, requests: 0, outbox: 0, jobs: 0 });
  });

  it('touched (a new row version, same secrets): a new ticket and a redelivery are each answered as usual, stored once', async () => {
    const id = await datagrail('secret-5');
    const first = dgWebhook('secret-5');
    const r1 = await deliver('datagrail', id, first);
    expect(r1.status).toBe(200);
    await env.sql`update connectors set name = name where id = ${id}`;
    // A new ticket: the one-statement store sees the old version and stores nothing; the reloaded connector stores it.
    const second = dgWebhook('secret-5');
    const r2 = await deliver('datagrail', id, second);
    expect(r2.status, r2.text).toBe(200);
    await env.sql`update connectors set name = name where id = ${id}`;
    // A redelivery (the transaction path): the same answer as the first time.
    const again = await deliver('datagrail', id, first);
    expect(again.status, again.text).toBe(200);
    expect(again.json).toEqual(r1.json);
    expect(await stored(id)).toMatchObject({ tickets: 2, requests: 2 });
  });

  it('config changed after use: a request type mapped since is accepted, one unmapped since is refused', async () => {
    const inbound = 'ot-inbound-cache';
    const id = await createConnector({
      vendor: 'onetrust',
      name: 'OneTrust',
      config: { baseUrl: 'http://127.0.0.1:9', requestTypes: { 'Forget Me': 'erase' } },
      secrets: { clientId: 'c', clientSecret: 's', inboundSecret: inbound },
    });
    const auth = { type: 'bearer' as const, secret: inbound };
    const ot = (type: string) =>
      onetrustWebhook({ auth, body: { subTaskId: randomUUID(), requestTypes: [type], email: `${uniq('o')}@example.test` } });
    expect((await deliver('onetrust', id, ot('Forget Me'))).status).toBe(200);
    expectError(await deliver('onetrust', id, ot('Wipe Me')), 422, 'unsupported_request_type');
    const patch = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, {
      key: ws.adminKey,
      body: { config: { baseUrl: 'http://127.0.0.1:9', requestTypes: { 'Wipe Me': 'erase' } } },
    });
    expect(patch.status, patch.text).toBe(200);
    const wiped = await deliver('onetrust', id, ot('Wipe Me'));
    expect(wiped.status, wiped.text).toBe(200);
    expectError(await deliver('onetrust', id, ot('Forget Me')), 422, 'unsupported_request_type');
  });

  it('a kept copy that cannot verify (503: wrong Sombra API key or URL) is read again once the admin fixes it', async () => {
    const transcend = await startFakeTranscend();
    try {
      const id = await createConnector({
        vendor: 'transcend',
        name: 'Transcend',
        config: transcend.config(),
        secrets: { apiKey: 'wrong-transcend-api-key' },
      });
      const send = async () => {
        const w = await transcend.webhook();
        return deliver('transcend', id, { headers: w.headers, rawBody: w.body });
      };
      // Sombra refuses the key, so the signing key cannot be fetched: 503, and the connector is now kept opened.
      expectError(await send(), 503, 'service_unavailable');
      const put = await call(env, 'PUT', `/v1/admin/connectors/${id}/secrets`, {
        key: ws.adminKey,
        body: { secrets: { apiKey: FAKE_API_KEY } },
      });
      expect(put.status, put.text).toBe(200);
      const fixed = await send();
      expect(fixed.status, fixed.text).toBe(200);

      // The same for a wrong Sombra URL fixed by a config change.
      const patch = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, {
        key: ws.adminKey,
        body: { config: transcend.config({ sombraUrl: 'http://127.0.0.1:9' }) },
      });
      expect(patch.status, patch.text).toBe(200);
      expectError(await send(), 503, 'service_unavailable');
      const back = await call(env, 'PATCH', `/v1/admin/connectors/${id}`, { key: ws.adminKey, body: { config: transcend.config() } });
      expect(back.status, back.text).toBe(200);
      const again = await send();
      expect(again.status, again.text).toBe(200);
      // Two tickets of one subject: the second joined the first's pending request.
      expect(await stored(id)).toMatchObject({ tickets: 2, requests: 1 });
    } finally {
      await transcend.stop();
    }
  });

  it('a webhook for another vendor’s URL of a kept connector is 404', async () => {
    const id = await datagrail('secret-6');
    expect((await deliver('datagrail', id, dgWebhook('secret-6'))).status).toBe(200);
    expectError(await deliver('transcend', id, dgWebhook('secret-6')), 404, 'not_found');
  });

  it('the database refuses a ticket filed under a workspace other than its connector’s', async () => {
    const id = await datagrail('secret-7');
    const res = await deliver('datagrail', id, dgWebhook('secret-7'));
    expect(res.status, res.text).toBe(200);
    const other = await env.newWorkspace('cache-other');
    const ticketId = res.json.received[0].ticketId as string;
    // One key over (workspace, connector): moving a ticket to another workspace breaks it, as would a new one.
    await expect(env.sql`update upstream_tickets set workspace_id = ${other.workspaceId} where id = ${ticketId}`).rejects.toMatchObject({
      code: '23503',
      constraint_name: 'upstream_tickets_connector_fk',
    });
  });

  it('concurrent webhooks share store statements; a copy or an unstorable value among them gets its own answer', async () => {
    const id = await datagrail('secret-8');
    const hooks = Array.from({ length: 16 }, () => dgWebhook('secret-8'));
    const copy = hooks[5]!; // the same ticket delivered twice at once
    // A NUL character passes the adapter but PostgreSQL cannot store it in text: a statement carrying it fails whole.
    const unstorable = datagrailWebhook({
      secret: 'secret-8',
      body: datagrailBody({
        webhook_request_id: randomUUID(),
        identifiers: { user_id: 'bad\u0000id' },
        callback_url: 'http://127.0.0.1:9/api/v2/webhooks/callback',
      }),
    });
    const writer = freshWriter(env.deps.db);
    const before = { ...writer.stats };
    const [answers, copyAnswer, badAnswer] = await Promise.all([
      Promise.all(hooks.map((w) => deliver('datagrail', id, w))),
      deliver('datagrail', id, copy),
      deliver('datagrail', id, unstorable),
    ]);
    for (const res of answers) expect(res.status, res.text).toBe(200);
    expect(copyAnswer.status, copyAnswer.text).toBe(200);
    expect(copyAnswer.json.received[0].ticketId).toBe(answers[5]!.json.received[0].ticketId);
    expectError(badAnswer, 400, 'validation_failed');
    // Batches formed (a batch that failed was stored again ticket by ticket), and each ticket is stored exactly
    // once with its job.
    expect(writer.stats.largestBatch).toBeGreaterThan(1);
    expect(writer.stats.statements).toBeGreaterThan(before.statements);
    expect(await stored(id)).toMatchObject({ tickets: 16, requests: 16 });
    const [jobs] = await env.sql<{ n: number }[]>`
      select (select count(*) from job_outbox o where o.payload->>'requestId' in (select id from dsr_requests where actor_id = ${id}))
           + (select count(*) from graphile_worker._private_jobs j where j.key in (select id from dsr_requests where actor_id = ${id}))
           as n`;
    expect(Number(jobs!.n)).toBe(16);
  });
});
