/**
 * PostgreSQL restart under webhook load. This file runs its own embedded PostgreSQL (durable settings), migrated, and
 * a real web process on it with a DataGrail connector. Eight senders post unique signed webhooks in a loop; midway
 * PostgreSQL is stopped for a few seconds and started again on the same data directory and port.
 *
 * While it is down every answer is a prompt 503 in the standard error shape with Retry-After (never a hang, never
 * another 5xx); every ticket that was acknowledged with a 2xx is in the database afterwards; the same process serves
 * 2xx again once PostgreSQL is back, without a restart; and a vendor retrying what got a 503 ends with each ticket
 * stored exactly once.
 */
import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import postgres from 'postgres';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { datagrailBody, datagrailWebhook, startFakeDataGrail } from '../../connectors/datagrail/fake.ts';
import { createWorkspace, type CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { createDatabase } from '../../src/db/client.ts';
import { startEmbeddedPostgres, type EmbeddedPostgres } from '../../src/db/embedded.ts';
import { migrateDatabase } from '../../src/db/migrate.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { request } from '../helpers/db.ts';
import { freePort } from '../helpers/global-setup.ts';
import { poll } from '../helpers/process.ts';
import { errorShapeProblem, outboxEmptied, runConcurrently, startServiceFor, type RunningService } from './support.ts';

const SENDERS = 8;
/** A 503 must come back well within this: the point is that it is not a hang (a correctness bound, not a benchmark). */
const FAST_MS = 5_000;
const DG_SECRET = 'restart-datagrail-webhook-secret';
const LOAD_DEADLINE_MS = 90_000;

let dataDir = '';
let port = 0;
let pg: EmbeddedPostgres | undefined;
let sql: postgres.Sql | undefined;
let server: RunningService | undefined;
let datagrail: Awaited<ReturnType<typeof startFakeDataGrail>>;
let ws: CreatedWorkspace;

const startPg = () => startEmbeddedPostgres({ dataDir, port, database: 'dsr' });

beforeAll(async () => {
  dataDir = await mkdtemp(path.join(os.tmpdir(), 'dsr-faults-pg-'));
  port = await freePort();
  pg = await startPg();
  await migrateDatabase(pg.url, createLogger('silent'));
  const database = createDatabase(pg.url, { max: 1 });
  try {
    ws = await createWorkspace(database.db, { name: 'DB restart' });
  } finally {
    await database.close();
  }
  datagrail = await startFakeDataGrail();
  server = await startServiceFor({ digestKey: randomBytes(32), encryptionKey: randomBytes(32) }, pg.url, 'web', {
    DB_POOL_MAX: '10',
    LOG_LEVEL: 'error',
  });
});

afterAll(async () => {
  // A process that died during the test is reported by the test itself; here only a clean stop is checked.
  const alive = server !== undefined && server.proc.exitCode === null && server.proc.signalCode === null;
  const code = await server?.stop();
  await sql?.end({ timeout: 5 });
  await datagrail?.fake.stop();
  await pg?.stop().catch(() => {});
  if (dataDir) await rm(dataDir, { recursive: true, force: true });
  if (alive) expect(code, server?.output()).toBe(0);
});

interface Sent {
  webhookRequestId: string;
  started: number;
  ended: number;
  status: number;
  text: string;
  headers: Headers;
  ticketId?: string;
}

describe('PostgreSQL restart under webhook load', () => {
  it('503s while down (fast, standard shape, Retry-After), no acknowledged ticket lost, recovery without restart', async () => {
    const base = server!.base;
    const http = (method: string, p: string, opts?: Parameters<typeof request>[3]) =>
      request((u, init) => fetch(`${base}${u}`, { ...init, signal: AbortSignal.timeout(30_000) }), method, p, opts);

    const created = await http('POST', '/v1/admin/connectors', {
      key: ws.adminKey,
      body: {
        vendor: 'datagrail',
        name: 'Restart DataGrail',
        config: { callbackHosts: ['127.0.0.1'] },
        secrets: { webhookSecret: DG_SECRET, apiKey: 'restart-api-key' },
      },
    });
    expect(created.status, created.text).toBe(201);
    const connectorId = created.json.id as string;
    const webhookPath = `/webhooks/datagrail/${connectorId}`;

    const sent: Sent[] = [];
    const bodies = new Map<string, { headers: Record<string, string>; rawBody: string }>();
    let stopping = false;
    const loadDeadline = Date.now() + LOAD_DEADLINE_MS;
    /** One delivery; a connection failure is recorded as status 0 (the server must never drop a connection). */
    const inFlight = new Set<number>();
    const deliver = async (webhookRequestId: string): Promise<Sent> => {
      const w = bodies.get(webhookRequestId)!;
      const started = Date.now();
      inFlight.add(started);
      try {
        const res = await http('POST', webhookPath, { headers: w.headers, body: w.rawBody });
        const out: Sent = { webhookRequestId, started, ended: Date.now(), status: res.status, text: res.text, headers: res.headers };
        if (res.status === 200) out.ticketId = res.json.received[0].ticketId;
        return out;
      } catch (err) {
        const text = `no answer: ${(err as { cause?: { code?: string } }).cause?.code ?? (err as Error).message}`;
        return { webhookRequestId, started, ended: Date.now(), status: 0, text, headers: new Headers() };
      } finally {
        inFlight.delete(started);
      }
    };
    /** Fails at once, with the process's last words, if the web process died. */
    const expectAlive = () => {
      const { exitCode, signalCode } = server!.proc;
      if (exitCode !== null || signalCode !== null) {
        throw new Error(`the web process exited (${exitCode ?? signalCode}) while PostgreSQL restarted:\n${server!.output().slice(-1500)}`);
      }
    };
    /** Polls `fn`; on timeout says what the senders saw, and for how long the oldest request has been waiting. */
    const waitFor = async <T>(what: string, fn: () => Promise<T | undefined>, ms: number): Promise<T> => {
      try {
        return await poll(async () => {
          expectAlive();
          return fn();
        }, ms);
      } catch (err) {
        const statuses: Record<string, number> = {};
        for (const x of sent) statuses[x.status] = (statuses[x.status] ?? 0) + 1;
        const oldest = inFlight.size ? Date.now() - Math.min(...inFlight) : 0;
        throw new Error(
          `${(err as Error).message} for ${what}: answers so far ${JSON.stringify(statuses)}, ` +
            `${inFlight.size} request(s) in flight, the oldest unanswered for ${oldest} ms`,
          { cause: err },
        );
      }
    };
    const lanes = Array.from({ length: SENDERS }, async () => {
      while (!stopping && Date.now() < loadDeadline && server!.proc.exitCode === null) {
        const id = randomUUID();
        bodies.set(
          id,
          datagrailWebhook({
            secret: DG_SECRET,
            body: datagrailBody({
              webhook_request_id: id,
              identifiers: { email: `restart-${id}@example.test` },
              callback_url: datagrail.callbackUrl(),
            }),
          }),
        );
        sent.push(await deliver(id));
      }
    });
    const count = (f: (s: Sent) => boolean) => sent.filter(f).length;

    try {
      await waitFor('load to start', async () => (count((s) => s.status === 200) >= 50 ? true : undefined), 30_000);
      const stopBegan = Date.now();
      await pg!.stop();
      const down = Date.now();
      // Down long enough for every sender to meet it several times.
      await waitFor(
        'answers while PostgreSQL is down',
        async () => (Date.now() - down >= 3_000 && count((s) => s.started >= down) >= 3 * SENDERS ? true : undefined),
        30_000,
      );
      const restartBegan = Date.now();
      pg = await startPg();
      const healthy = await waitFor('/healthz to answer 200', async () => {
        const h = await http('GET', '/healthz').catch(() => undefined);
        return h?.status === 200 ? Date.now() : undefined;
      }, 30_000);
      await waitFor('2xx after recovery', async () => (count((s) => s.started >= healthy && s.status === 200) >= 50 ? true : undefined), 30_000);
      stopping = true;
      await Promise.all(lanes);

      expectAlive();
      expect(count(() => true)).toBeGreaterThan(150);

      // Only 200 or 503, ever; every 503 prompt, in the standard shape, with a Retry-After.
      const unexpected = sent.filter((s) => s.status !== 200 && s.status !== 503);
      expect(unexpected.map((s) => `${s.status} ${s.text}`).slice(0, 5)).toEqual([]);
      const refused = sent.filter((s) => s.status === 503);
      for (const s of refused) {
        expect(s.ended - s.started, s.text).toBeLessThan(FAST_MS);
        expect(errorShapeProblem(s), s.text).toBeNull();
        expect(JSON.parse(s.text).error.code).toBe('service_unavailable');
        expect(s.headers.get('retry-after'), s.text).toMatch(/^[1-9]\d*$/);
      }
      // Everything sent while the database was certainly down was refused that way.
      const whileDown = sent.filter((s) => s.started >= down && s.ended <= restartBegan);
      expect(whileDown.length).toBeGreaterThanOrEqual(3 * SENDERS);
      expect(whileDown.filter((s) => s.status !== 503)).toEqual([]);
      // Once healthy again, the same process answers 2xx.
      const after = sent.filter((s) => s.started >= healthy);
      expect(after.filter((s) => s.status !== 200).map((s) => `${s.status} ${s.text}`)).toEqual([]);
      expect(sent.filter((s) => s.ended < stopBegan).every((s) => s.status === 200)).toBe(true);

      // Every acknowledged ticket is stored, with its request and its job (the server hands the jobs its webhooks
      // committed to graphile-worker by itself, retrying while the database was away).
      sql = postgres(pg.url, { max: 2, onnotice: () => {} });
      await outboxEmptied(sql);
      const acked = sent.filter((s) => s.status === 200).map((s) => s.ticketId!);
      const stored = await sql<{ id: string; jobs: number }[]>`
        select t.id, (select count(*) from graphile_worker.jobs j where j.key = t.request_id)::int as jobs
        from upstream_tickets t where t.id in ${sql(acked)}`;
      expect(stored).toHaveLength(acked.length);
      expect(stored.every((r) => r.jobs === 1)).toBe(true);

      // The vendor retries what was refused: each of those lands now, and every webhook is one ticket in the end.
      const retried = await runConcurrently(refused, SENDERS, (s) => deliver(s.webhookRequestId));
      expect(retried.filter((s) => s.status !== 200).map((s) => `${s.status} ${s.text}`)).toEqual([]);
      await outboxEmptied(sql);
      const [totals] = await sql<{ tickets: number; requests: number; jobs: number }[]>`
        select (select count(*) from upstream_tickets)::int as tickets,
               (select count(*) from dsr_requests)::int as requests,
               (select count(*) from graphile_worker.jobs where task_identifier = 'execute_request')::int as jobs`;
      expect(totals).toEqual({ tickets: bodies.size, requests: bodies.size, jobs: bodies.size });
      expect(refused.length).toBeGreaterThanOrEqual(3 * SENDERS);
    } finally {
      stopping = true;
      await Promise.allSettled(lanes);
    }
  });
});
