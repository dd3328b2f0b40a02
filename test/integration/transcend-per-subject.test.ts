/**
 * Transcend sends one job per identifier, keyed by request id and identifier type: a request with two identifiers of
 * one type (a second email added by enrichment) is two jobs under the same request id and type. Each must be its own
 * ticket, erased and reported with its own nonce.
 */
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FAKE_DATA_SILO_ID, startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { connectorsTick } from '../../src/upstream/poll.ts';
import { call, createConnectorVia, createTestEnv, type TestEnv } from '../helpers/db.ts';
import { seedUser, userFootprint } from '../helpers/factories.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;
let push: string;
let pull: string;

const deliver = (w: { headers: Record<string, string>; body: string }) =>
  call(env, 'POST', `/webhooks/transcend/${push}`, { body: w.body, headers: w.headers });

const ticketsOf = (requestId: string) =>
  env.sql`select t.ticket_key, t.status, t.subject_digest, r.outcome from upstream_tickets t
          join dsr_requests r on r.id = t.request_id where t.upstream->>'requestId' = ${requestId} order by t.created_at`;

/** Runs due jobs until no ticket of the Transcend request is pending (reports follow erasures). */
async function settle(requestId: string) {
  const until = Date.now() + 15_000;
  for (;;) {
    await env.runJobs();
    const rows = await ticketsOf(requestId);
    if (rows.length > 0 && rows.every((r) => r.status !== 'pending')) return rows;
    if (Date.now() > until) throw new Error('tickets still pending');
    await new Promise((r) => setTimeout(r, 30));
  }
}

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace();
  transcend = await startFakeTranscend();
  push = await createConnectorVia(env, ws.adminKey, {
    vendor: 'transcend',
    name: 'Transcend',
    config: transcend.config(),
    secrets: transcend.secrets,
  });
  pull = await createConnectorVia(env, ws.adminKey, {
    vendor: 'transcend',
    name: 'Transcend (pull)',
    config: transcend.config({ pull: { enabled: true, dataSiloId: FAKE_DATA_SILO_ID, actions: ['ERASURE'], intervalMinutes: 5 } }),
    secrets: transcend.secrets,
  });
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

describe('Transcend: two identifiers of one type on one request', () => {
  it('migration 0012 gives a ticket stored under the old key the new one: its redelivery is found, not stored again', async () => {
    // Runs first: the migration rewrites every Transcend ticket, and this one is the only one so far.
    const user = await seedUser(env, ws.ingestKey);
    const requestId = randomUUID();
    const w = await transcend.webhook({ requestId, profile: { identifier: user.email, type: 'email' } });
    const first = await deliver(w);
    expect(first.status, first.text).toBe(200);
    // As it was stored before per-subject keys.
    await env.sql`update upstream_tickets set ticket_key = ${`${requestId}:email`} where upstream->>'requestId' = ${requestId}`;
    const migration = readFileSync(new URL('../../drizzle/0012_transcend_ticket_per_subject.sql', import.meta.url), 'utf8');
    await env.sql.unsafe(migration);

    const again = await deliver(w);
    expect(again.status, again.text).toBe(200);
    expect(again.json.received[0].ticketId).toBe(first.json.received[0].ticketId);
    const rows = await ticketsOf(requestId);
    expect(rows).toHaveLength(1);
    expect(rows[0]!.ticket_key).toBe(`${requestId}:email#${rows[0]!.subject_digest.slice(0, 32)}`);
    await settle(requestId);
  });

  it('webhooks: both are accepted as two tickets, both subjects erased, each job reported with its own nonce', async () => {
    const [one, two] = [await seedUser(env, ws.ingestKey), await seedUser(env, ws.ingestKey)];
    const requestId = randomUUID();
    const hooks = [
      await transcend.webhook({ requestId, profile: { identifier: one.email, type: 'email' } }),
      await transcend.webhook({ requestId, profile: { identifier: two.email, type: 'email' } }),
    ];
    const ticketIds: string[] = [];
    for (const w of hooks) {
      const res = await deliver(w);
      expect(res.status, res.text).toBe(200);
      ticketIds.push(res.json.received[0].ticketId);
    }
    expect(new Set(ticketIds).size).toBe(2);
    // A redelivery of either is still the same ticket.
    const again = await deliver(hooks[1]!);
    expect(again.status, again.text).toBe(200);
    expect(again.json.received[0].ticketId).toBe(ticketIds[1]);

    const rows = await settle(requestId);
    expect(rows.map((r) => [r.status, r.outcome])).toEqual([
      ['delivered', 'erased'],
      ['delivered', 'erased'],
    ]);
    // The key carries a digest of the subject, never the identifier.
    for (const r of rows) {
      expect(r.ticket_key).toMatch(new RegExp(`^${requestId}:email#[0-9a-f]{32}$`));
      expect(r.ticket_key).not.toContain('@');
    }
    for (const u of [one, two]) expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 0, events: 0 });
    const nonces = hooks.map((w) => w.headers['x-transcend-nonce']!);
    const puts = transcend.fake.callsTo('PUT /v1/data-silo').map((c) => c.headers['x-transcend-nonce']);
    for (const nonce of nonces) expect(puts.filter((n) => n === nonce)).toHaveLength(1);
  });

  it('pull mode: both pending jobs become tickets in one poll, both erased and reported', async () => {
    const [one, two] = [await seedUser(env, ws.ingestKey), await seedUser(env, ws.ingestKey)];
    const shared = { requestId: randomUUID(), type: 'email', coreIdentifier: 'core-shared' };
    const items = [
      transcend.pendingItem(1, { ...shared, identifier: one.email }),
      transcend.pendingItem(2, { ...shared, identifier: two.email }),
    ];
    transcend.setPending('ERASURE', items);
    expect((await connectorsTick(env.deps)).scheduled).toEqual([pull]);
    const rows = await settle(shared.requestId);
    expect(rows.map((r) => [r.status, r.outcome])).toEqual([
      ['delivered', 'erased'],
      ['delivered', 'erased'],
    ]);
    for (const u of [one, two]) expect(await userFootprint(env, ws.workspaceId, u.userId)).toMatchObject({ profiles: 0, events: 0 });
    const puts = transcend.fake.callsTo('PUT /v1/data-silo').map((c) => c.headers['x-transcend-nonce']);
    for (const item of items) expect(puts.filter((n) => n === item.nonce)).toHaveLength(1);
  });
});
