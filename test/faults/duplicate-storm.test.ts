/**
 * Duplicate storm: vendors deliver at least once, and a retrying vendor can send the same ticket several times at
 * once. 200 distinct tickets (DataGrail, OneTrust and Transcend) each arrive 5 times, all 1,000 requests interleaved
 * at a concurrency of 50 against a real web process. Each ticket must become exactly one ticket row, one request and
 * one execute_request job, and every copy must get the same 200 answer.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  FAKE_DATAGRAIL_API_KEY,
  datagrailBody,
  datagrailWebhook,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import { onetrustWebhook, startFakeOneTrust, type FakeOneTrust } from '../../connectors/onetrust/fake.ts';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { createConnectorVia, createTestEnv, request, type TestEnv } from '../helpers/db.ts';
import { keysOf, outboxEmptied, runConcurrently, startServiceFor, type RunningService } from './support.ts';

const TICKETS = { datagrail: 100, onetrust: 50, transcend: 50 };
const COPIES = 5;
const CONCURRENCY = 50;
const DG_SECRET = 'storm-datagrail-webhook-secret';
const OT = { clientId: 'storm-ot-client', clientSecret: 'storm-ot-client-secret', inbound: 'storm-ot-inbound-secret' };

let env: TestEnv;
let ws: CreatedWorkspace;
let server: RunningService | undefined;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
let onetrust: FakeOneTrust;
let transcend: FakeTranscend;

const createConnector = (body: unknown) => createConnectorVia(env, ws.adminKey, body);

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Duplicate storm');
  [datagrail, onetrust, transcend] = await Promise.all([
    startFakeDataGrail(),
    startFakeOneTrust({ clientId: OT.clientId, clientSecret: OT.clientSecret }),
    startFakeTranscend(),
  ]);
  // Role web only: no worker runs, so the queued jobs can be counted afterwards.
  server = await startServiceFor(keysOf(env), env.url, 'web', { DB_POOL_MAX: '10', LOG_LEVEL: 'error' });
});

afterAll(async () => {
  const code = await server?.stop();
  await Promise.all([datagrail?.fake.stop(), onetrust?.stop(), transcend?.stop()]);
  await env?.close();
  expect(code, server?.output()).toBe(0);
});

interface Delivery {
  key: string;
  path: string;
  headers: Record<string, string>;
  body: string;
}

describe('duplicate storm', () => {
  it(`${Object.values(TICKETS).reduce((a, b) => a + b)} tickets × ${COPIES} concurrent copies → one ticket, request and job each; identical answers`, async () => {
    const dg = await createConnector({
      vendor: 'datagrail',
      name: 'Storm DataGrail',
      config: { callbackHosts: ['127.0.0.1'] },
      secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
    });
    const ot = await createConnector({
      vendor: 'onetrust',
      name: 'Storm OneTrust',
      config: { baseUrl: onetrust.url, inboundAuth: { type: 'bearer' } },
      secrets: { clientId: OT.clientId, clientSecret: OT.clientSecret, inboundSecret: OT.inbound },
    });
    const tr = await createConnector({
      vendor: 'transcend',
      name: 'Storm Transcend',
      config: transcend.config({ identifierTypes: { email: 'email' } }),
      secrets: transcend.secrets,
    });

    // One signed message per ticket; its copies are byte-for-byte the same, as a vendor's redelivery is.
    const tickets: Delivery[] = [];
    const run = randomBytes(3).toString('hex');
    for (let i = 0; i < TICKETS.datagrail; i++) {
      const w = datagrailWebhook({
        secret: DG_SECRET,
        body: datagrailBody({
          webhook_request_id: randomUUID(),
          identifiers: { email: `storm-dg-${run}-${i}@example.test` },
          callback_url: datagrail.callbackUrl(),
        }),
      });
      tickets.push({ key: `dg-${i}`, path: `/webhooks/datagrail/${dg}`, headers: w.headers, body: w.rawBody });
    }
    for (let i = 0; i < TICKETS.onetrust; i++) {
      const w = onetrustWebhook({
        auth: { type: 'bearer', secret: OT.inbound },
        body: {
          subTaskId: randomUUID(),
          requestQueueRefId: `REF${run}${i}`.toUpperCase(),
          requestTypes: ['Delete Data'],
          email: `storm-ot-${run}-${i}@example.test`,
        },
      });
      tickets.push({ key: `ot-${i}`, path: `/webhooks/onetrust/${ot}`, headers: w.headers, body: w.rawBody });
    }
    for (let i = 0; i < TICKETS.transcend; i++) {
      const w = await transcend.webhook({ profile: { identifier: `storm-tr-${run}-${i}@example.test`, type: 'email' } });
      tickets.push({ key: `tr-${i}`, path: `/webhooks/transcend/${tr}`, headers: w.headers, body: w.body });
    }

    // Copies of a ticket sit next to each other in the queue (so they are in flight together), vendors interleaved.
    const order = tickets
      .map((t, i) => ({ t, rank: (i % 3) * 1_000 + Math.floor(i / 3) + Math.random() * 0.5 }))
      .sort((a, b) => a.rank - b.rank)
      .flatMap(({ t }) => Array.from({ length: COPIES }, () => t));
    expect(order).toHaveLength(tickets.length * COPIES);

    const base = server!.base;
    const answers = await runConcurrently(order, CONCURRENCY, async (d) => {
      const res = await request((p, init) => fetch(`${base}${p}`, init), 'POST', d.path, { headers: d.headers, body: d.body });
      return { key: d.key, status: res.status, text: res.text };
    });

    const bad = answers.filter((a) => a.status !== 200);
    expect(bad.slice(0, 5), `${bad.length} non-200 answers`).toEqual([]);
    const byTicket = new Map<string, Set<string>>();
    for (const a of answers) byTicket.set(a.key, (byTicket.get(a.key) ?? new Set()).add(a.text));
    expect(byTicket.size).toBe(tickets.length);
    const ticketIds = new Set<string>();
    const requestIds = new Set<string>();
    for (const [key, texts] of byTicket) {
      expect([...texts], `copies of ${key} got different answers`).toHaveLength(1);
      const body = JSON.parse([...texts][0]!) as { received: { ticketId: string; requestId: string }[] };
      expect(body.received).toHaveLength(1);
      ticketIds.add(body.received[0]!.ticketId);
      requestIds.add(body.received[0]!.requestId);
    }
    expect(ticketIds.size).toBe(tickets.length);
    expect(requestIds.size).toBe(tickets.length);

    await outboxEmptied(env.sql);
    const [db] = await env.sql<{ requests: number; tickets: number; jobs: number; keyedJobs: number }[]>`
      select (select count(*) from dsr_requests where workspace_id = ${ws.workspaceId})::int as requests,
             (select count(*) from upstream_tickets where workspace_id = ${ws.workspaceId})::int as tickets,
             (select count(*) from graphile_worker.jobs where task_identifier = 'execute_request')::int as jobs,
             (select count(distinct key) from graphile_worker.jobs where task_identifier = 'execute_request')::int
               as "keyedJobs"`;
    expect(db).toEqual({ requests: tickets.length, tickets: tickets.length, jobs: tickets.length, keyedJobs: tickets.length });

    // The rows are the ones the answers named, and every job belongs to one of those requests.
    const rows = await env.sql<{ id: string; request_id: string }[]>`select id, request_id from upstream_tickets`;
    expect(new Set(rows.map((r) => r.id))).toEqual(ticketIds);
    expect(new Set(rows.map((r) => r.request_id))).toEqual(requestIds);
    const jobKeys = await env.sql<{ key: string }[]>`
      select key from graphile_worker.jobs where task_identifier = 'execute_request'`;
    expect(new Set(jobKeys.map((j) => j.key))).toEqual(requestIds);
    const perConnector = await env.sql<{ vendor: string; n: number }[]>`
      select c.vendor, count(*)::int as n from upstream_tickets t join connectors c on c.id = t.connector_id
      group by c.vendor order by c.vendor`;
    expect(perConnector).toEqual([
      { vendor: 'datagrail', n: TICKETS.datagrail },
      { vendor: 'onetrust', n: TICKETS.onetrust },
      { vendor: 'transcend', n: TICKETS.transcend },
    ]);
  });
});
