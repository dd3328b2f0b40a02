/**
 * The hourly maintenance tick keeps what grows with every request, poll and failure from growing for ever.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startFakeTranscend, type FakeTranscend } from '../../connectors/transcend/fake.ts';
import type { CreatedWorkspace } from '../../src/accounts/workspaces.ts';
import { maintenanceTick, pruneFailedJobs } from '../../src/jobs/maintenance.ts';
import { failAbandonedRequests } from '../../src/privacy/execute.ts';
import { call, createTestEnv, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;
let ws: CreatedWorkspace;
let transcend: FakeTranscend;

beforeAll(async () => {
  env = await createTestEnv();
  ws = await env.newWorkspace('Housekeeping');
  transcend = await startFakeTranscend();
});

afterAll(async () => {
  await transcend?.stop();
  await env?.close();
});

async function pullConnector(dataSiloId: string): Promise<string> {
  const res = await call(env, 'POST', '/v1/admin/connectors', {
    key: ws.adminKey,
    body: {
      vendor: 'transcend',
      name: `Transcend (pull ${dataSiloId})`,
      config: transcend.config({ pull: { enabled: true, dataSiloId, actions: ['ERASURE'], intervalMinutes: 5 } }),
      secrets: transcend.secrets,
    },
  });
  expect(res.status, res.text).toBe(201);
  return res.json.id as string;
}

/** A poll job of the connector that may run once only: a poll that fails leaves it out of attempts. */
const addPollJob = (connectorId: string) =>
  env.sql`select graphile_worker.add_job('poll_connector', json_build_object('connectorId', ${connectorId}::text),
            job_key => ${`poll:${connectorId}`}::text, max_attempts => 1)`;

const job = async (key: string) =>
  (
    await env.sql<{ attempts: number; max_attempts: number; locked_at: Date | null; last_error: string | null }[]>`
      select attempts, max_attempts, locked_at, last_error from graphile_worker._private_jobs where key = ${key}`
  )[0];

/** Moves a job's clock back, as if its last attempt had been due that many days ago. */
const age = (key: string, days: number) =>
  env.sql`update graphile_worker._private_jobs
             set run_at = run_at - make_interval(days => ${days}), created_at = created_at - make_interval(days => ${days}),
                 updated_at = updated_at - make_interval(days => ${days})
           where key = ${key}`;

describe('jobs that ran out of attempts', () => {
  it('are removed once their last attempt was due FAILED_JOB_RETENTION_DAYS (30) ago; younger or running ones stay', async () => {
    const [old, young, running] = await Promise.all(['jobs-old', 'jobs-young', 'jobs-running'].map(pullConnector));
    // Sombra answers 503 to the first two connectors' polls: their jobs fail for good, for real.
    for (const silo of ['jobs-old', 'jobs-young']) {
      transcend.fake.on(`GET /v1/data-silo/${silo}/pending-requests/ERASURE`, { status: 503, body: { error: 'down' } });
    }
    await addPollJob(old!);
    await addPollJob(young!);
    await env.runJobs();
    for (const id of [old!, young!]) {
      expect(await job(`poll:${id}`), id).toMatchObject({ attempts: 1, max_attempts: 1, locked_at: null });
      expect((await job(`poll:${id}`))!.last_error).toContain('503');
    }
    await age(`poll:${old}`, 31);
    await age(`poll:${young}`, 29);

    // The third is on its last attempt, locked by a worker, when the tick runs (its clock moved back as well).
    transcend.fake.on('GET /v1/data-silo/jobs-running/pending-requests/ERASURE', { status: 503, body: { error: 'slow' }, delayMs: 1_500 });
    await addPollJob(running!);
    const worker = env.runJobs();
    for (let i = 0; !(await job(`poll:${running}`))?.locked_at; i++) {
      expect(i, 'the poll job was never locked').toBeLessThan(400);
      await new Promise((r) => setTimeout(r, 5));
    }
    await age(`poll:${running}`, 60);

    const result = await maintenanceTick(env.deps);
    expect(result.failedJobs).toBe(1);
    expect(await job(`poll:${old}`)).toBeUndefined();
    expect(await job(`poll:${young}`)).toMatchObject({ attempts: 1 });
    expect(await job(`poll:${running}`)).toMatchObject({ attempts: 1, locked_at: expect.any(Date) });
    await worker;
    // Its failure was recorded as usual (graphile-worker found its row), and it is young again.
    expect((await job(`poll:${running}`))!.last_error).toContain('503');
    expect((await maintenanceTick(env.deps)).failedJobs).toBe(0);
    expect(await job(`poll:${running}`)).toBeDefined();
  });

  it("an erasure's job out of attempts stays until the minute tick has failed its request, then goes", async () => {
    const res = await call(env, 'POST', '/v1/privacy/requests', {
      key: ws.privacyKey,
      body: { action: 'erase', userId: 'housekeeping-abandoned' },
    });
    expect(res.status, res.text).toBe(202);
    const requestId = res.json.results[0].requestId as string;
    // As a worker killed on every attempt leaves it (test/faults/exhausted.test.ts does it with real kills).
    await env.sql`update graphile_worker._private_jobs set attempts = max_attempts where key = ${requestId}`;
    await age(requestId, 90);

    await maintenanceTick(env.deps);
    expect(await job(requestId), 'the request is still pending: its job is what the minute tick looks for').toBeDefined();
    expect((await failAbandonedRequests(env.deps)).failed).toEqual([requestId]);
    await maintenanceTick(env.deps);
    expect(await job(requestId)).toBeUndefined();
    const [request] = await env.sql`select status, error_code from dsr_requests where id = ${requestId}`;
    expect(request).toEqual({ status: 'failed', error_code: 'attempts_exhausted' });
  });

  it('are removed in batches until none is left', async () => {
    const keys = Array.from({ length: 7 }, (_, i) => `housekeeping-batch-${i}`);
    for (const key of keys) {
      await env.sql`select graphile_worker.add_job('connectors_tick', '{}'::json, job_key => ${key}::text, max_attempts => 1)`;
      await env.sql`update graphile_worker._private_jobs set attempts = 1 where key = ${key}`;
      await age(key, 45);
    }
    expect(await pruneFailedJobs(env.deps.db, 30, { batchSize: 3 })).toBe(7);
    for (const key of keys) expect(await job(key)).toBeUndefined();
  });
});
