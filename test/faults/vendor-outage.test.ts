/**
 * Vendor outage: DataGrail answers 503 for a while, then hangs past OUTBOUND_TIMEOUT_MS for a while, then recovers.
 * 30 tickets flow through a real service process (role all: webhooks → erasures → reports) with a short report
 * backoff. Every report must be delivered after the recovery, none lost, each ticket's completion accepted by the
 * vendor exactly once, and every attempt recorded on the ticket.
 *
 * The outage has phases rather than fixed durations, so every ticket meets both failure modes on any machine: 503
 * until each ticket has been refused 3 times, then hanging until each ticket has timed out twice, then 200.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  DATAGRAIL_CALLBACK_ROUTE,
  FAKE_DATAGRAIL_API_KEY,
  datagrailBody,
  datagrailWebhook,
  startFakeDataGrail,
} from '../../connectors/datagrail/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { verifyChains } from '../../src/privacy/audit-chain.ts';
import { call, createTestEnv, request, type TestEnv } from '../helpers/db.ts';
import { userFootprint } from '../helpers/factories.ts';
import { poll } from '../helpers/process.ts';
import { keysOf, runConcurrently, startServiceFor, type RunningService } from './support.ts';

const TICKETS = 30;
const TIMEOUT_MS = 1_000;
/** Longer than the outbound timeout: the client gives up first, and the fake then answers nobody. */
const HANG_MS = 3_000;
const MAX_ATTEMPTS = 40;
/** Each ticket is refused at least this often, then times out at least this often, before the vendor recovers. */
const REFUSALS = 3;
const HANGS = 2;
const DG_SECRET = 'outage-datagrail-webhook-secret';

type Phase = 'refusing' | 'hanging' | 'recovered';

let env: TestEnv;
let ws: CreatedWorkspace;
let server: RunningService | undefined;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Vendor outage');
  datagrail = await startFakeDataGrail();
  server = await startServiceFor(keysOf(env), env.url, 'all', {
    OUTBOUND_TIMEOUT_MS: String(TIMEOUT_MS),
    REPORT_BACKOFF_BASE_MS: '50',
    REPORT_BACKOFF_MAX_MS: '400',
    REPORT_MAX_ATTEMPTS: String(MAX_ATTEMPTS),
    WORKER_CONCURRENCY: '8',
    DB_POOL_MAX: '12',
  });
});

afterAll(async () => {
  const code = await server?.stop();
  await datagrail?.fake.stop();
  await env?.close();
  expect(code, server?.output()).toBe(0);
});

describe('vendor outage', () => {
  it(`${TICKETS} tickets through 503s and timeouts: all delivered after recovery, each accepted exactly once`, async () => {
    const base = server!.base;
    const http = (method: string, path: string, opts?: Parameters<typeof request>[3]) =>
      request((p, init) => fetch(`${base}${p}`, init), method, path, opts);

    const created = await call(env, 'POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: {
        vendor: 'datagrail',
        name: 'Outage DataGrail',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: DG_SECRET, apiKey: FAKE_DATAGRAIL_API_KEY },
      },
    });
    expect(created.status, created.text).toBe(201);
    const connectorId = created.json.id as string;

    // The vendor, phase by phase; every call is tallied per ticket (webhook_request_id).
    let phase: Phase = 'refusing';
    const tickets = Array.from({ length: TICKETS }, (_, i) => ({
      webhookRequestId: randomUUID(),
      userId: `outage-${randomBytes(3).toString('hex')}-${i}`,
      email: `outage-${randomBytes(3).toString('hex')}-${i}@example.test`,
    }));
    const tally = new Map<string, { refused: number; hung: number; accepted: number; calls: number }>(
      tickets.map((t) => [t.webhookRequestId, { refused: 0, hung: 0, accepted: 0, calls: 0 }]),
    );
    const every = (f: (t: { refused: number; hung: number }) => boolean) => [...tally.values()].every(f);
    datagrail.fake.on(DATAGRAIL_CALLBACK_ROUTE, (c) => {
      const t = tally.get((c.json as { webhook_request_id?: string } | undefined)?.webhook_request_id ?? '');
      if (!t || c.headers.authorization !== `Bearer ${FAKE_DATAGRAIL_API_KEY}`) return { status: 400, body: { error: 'unexpected call' } };
      t.calls++;
      if (phase === 'refusing') {
        t.refused++;
        if (every((x) => x.refused >= REFUSALS)) phase = 'hanging';
        return { status: 503, body: { error: 'maintenance' } };
      }
      if (phase === 'hanging') {
        t.hung++;
        if (every((x) => x.hung >= HANGS)) phase = 'recovered';
        return { status: 200, body: { success: true }, delayMs: HANG_MS };
      }
      t.accepted++;
      return { status: 200, body: { success: true } };
    });

    // Each subject has data, so the erasures have something to remove.
    const batch = tickets.flatMap((t) => [
      { type: 'identify', userId: t.userId, email: t.email, name: 'Outage Person' },
      { type: 'track', userId: t.userId, event: 'opened_widget' },
    ]);
    const seeded = await http('POST', '/v1/batch', { key: ws.ingestKey, body: { batch } });
    expect(seeded.status, seeded.text).toBe(200);

    const answers = await runConcurrently(tickets, 8, async (t) => {
      const w = datagrailWebhook({
        secret: DG_SECRET,
        body: datagrailBody({
          webhook_request_id: t.webhookRequestId,
          identifiers: { email: t.email },
          callback_url: datagrail.callbackUrl(),
        }),
      });
      return http('POST', `/webhooks/datagrail/${connectorId}`, { headers: w.headers, body: w.rawBody });
    });
    for (const a of answers) expect(a.status, a.text).toBe(200);
    const requestIds = answers.map((a) => a.json.received[0].requestId as string);

    // Everything settles by itself: the worker retries on its own backoff; nobody runs jobs for it.
    const settled = await poll(async () => {
      const [row] = await env.sql<{ pending: number; delivered: number; failed: number }[]>`
        select count(*) filter (where status = 'pending')::int as pending,
               count(*) filter (where status = 'delivered')::int as delivered,
               count(*) filter (where status = 'failed')::int as failed
        from upstream_tickets where connector_id = ${connectorId}`;
      return row!.pending === 0 ? row : undefined;
    }, 150_000);
    expect(settled).toEqual({ pending: 0, delivered: TICKETS, failed: 0 });
    expect(phase).toBe('recovered');

    const rows = await env.sql<{ ticket_key: string; attempts: number; last_error: string | null; delivered_at: Date | null }[]>`
      select ticket_key, attempts, last_error, delivered_at from upstream_tickets where connector_id = ${connectorId}`;
    expect(rows).toHaveLength(TICKETS);
    for (const row of rows) {
      const t = tally.get(row.ticket_key)!;
      // Accepted exactly once: our side never sends again after a 200, and a hung call is never answered.
      expect(t, row.ticket_key).toMatchObject({ accepted: 1 });
      expect(t.refused).toBeGreaterThanOrEqual(REFUSALS);
      expect(t.hung).toBeGreaterThanOrEqual(HANGS);
      // Every call is an attempt on the ticket, and the last one is the delivery.
      expect(row.attempts, row.ticket_key).toBe(t.calls);
      expect(row.attempts).toBeLessThan(MAX_ATTEMPTS);
      expect(row.last_error).toBeNull();
      expect(row.delivered_at).toBeInstanceOf(Date);
    }

    // Behind the reports: every request erased its subject once, with one audit record, and the chain holds.
    const requests = await env.sql<{ id: string; status: string; outcome: string; audits: number }[]>`
      select r.id, r.status, r.outcome, (select count(*) from audit_records a where a.request_id = r.id)::int as audits
      from dsr_requests r where r.id in ${env.sql(requestIds)}`;
    expect(requests).toHaveLength(TICKETS);
    for (const r of requests) expect(r).toMatchObject({ status: 'complete', outcome: 'erased', audits: 1 });
    for (const t of tickets) expect((await userFootprint(env, ws.workspaceId, t.userId)).profiles).toBe(0);
    expect((await verifyChains(env.database.db, ws.workspaceId)).ok).toBe(true);
    const [jobs] = await env.sql<{ n: number }[]>`
      select count(*)::int as n from graphile_worker.jobs where task_identifier in ('execute_request', 'report_upstream')`;
    expect(jobs!.n).toBe(0);

    // The API shows the same: delivered, with the attempts it took.
    const view = await http('GET', `/v1/privacy/requests/${requestIds[0]}`, { key: ws.privacyKey });
    expect(view.status).toBe(200);
    expect(view.json.upstreamStatus).toBe('delivered');
    expect(view.json.upstream[0].attempts).toBeGreaterThanOrEqual(REFUSALS + HANGS + 1);
  });
});
