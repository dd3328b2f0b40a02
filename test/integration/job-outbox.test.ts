/**
 * The job outbox (src/jobs/outbox.ts): rows committed with their data become graphile-worker jobs exactly once,
 * in batches, by the process's own dispatcher, which keeps trying while graphile-worker cannot take them.
 */
import { afterAll, beforeAll, beforeEach, expect, it } from 'vitest';
import { jobOutbox } from '../../src/db/schema/index.ts';
import { dispatchOutbox, OUTBOX_BATCH, OutboxDispatcher } from '../../src/jobs/outbox.ts';
import { createLogger } from '../../src/lib/logger.ts';
import { createTestEnv, LogCapture, type TestEnv } from '../helpers/db.ts';

let env: TestEnv;

const jobsFor = async (task: string) =>
  env.sql<{ key: string | null; payload: unknown; priority: number; max_attempts: number }[]>`
    select j.key, j.payload, j.priority, j.max_attempts
    from graphile_worker._private_jobs j join graphile_worker._private_tasks t on t.id = j.task_id
    where t.identifier = ${task} order by j.id`;

async function until(check: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > end) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

beforeAll(async () => {
  env = await createTestEnv();
});

beforeEach(async () => {
  await env.deps.outbox.flush();
});

afterAll(async () => {
  await env?.close();
});

it('moves rows to graphile-worker once, with their settings; rows naming the same key become one job (the newest)', async () => {
  await env.deps.db.insert(jobOutbox).values([
    { task: 'outbox_test_a', payload: { n: 1 }, jobKey: 'ob-k1', maxAttempts: 3, priority: -1 },
    { task: 'outbox_test_a', payload: { n: 2 }, jobKey: 'ob-k1', maxAttempts: 3, priority: -1 },
    { task: 'outbox_test_a', payload: { n: 3 } },
  ]);
  expect(await dispatchOutbox(env.deps.db)).toBe(2);
  expect(await dispatchOutbox(env.deps.db)).toBe(0);
  const jobs = await jobsFor('outbox_test_a');
  expect(jobs).toEqual([
    { key: 'ob-k1', payload: { n: 2 }, priority: -1, max_attempts: 3 },
    { key: null, payload: { n: 3 }, priority: 0, max_attempts: 25 },
  ]);
  const [left] = await env.sql`select count(*)::int as n from job_outbox`;
  expect(left!.n).toBe(0);
});

it('a batch is at most OUTBOX_BATCH rows; a pass goes on until the outbox is empty', async () => {
  const rows = Array.from({ length: OUTBOX_BATCH + 20 }, (_, i) => ({ task: 'outbox_test_b', payload: { i } }));
  await env.deps.db.insert(jobOutbox).values(rows);
  expect(await dispatchOutbox(env.deps.db)).toBe(OUTBOX_BATCH);
  await env.deps.db.insert(jobOutbox).values(rows.slice(0, 5));
  env.deps.outbox.kick();
  await env.deps.outbox.idle();
  expect(await jobsFor('outbox_test_b')).toHaveLength(OUTBOX_BATCH + 25);
});

it('a full batch holding two rows of one job key is not taken for the last: flush and a pass both go on', async () => {
  for (const move of [() => env.deps.outbox.flush(), () => (env.deps.outbox.kick(), env.deps.outbox.idle())]) {
    const tag = `outbox_test_c_${Math.random().toString(36).slice(2, 8)}`;
    const rows = Array.from({ length: OUTBOX_BATCH + 10 }, (_, i) => ({ task: tag, payload: { i }, jobKey: `${tag}-${i}` }));
    rows[1]!.jobKey = rows[0]!.jobKey; // the first batch of 500 rows makes 499 jobs
    await env.deps.db.insert(jobOutbox).values(rows);
    await move();
    const [left] = await env.sql`select count(*)::int as n from job_outbox`;
    expect(left!.n).toBe(0);
    expect(await jobsFor(tag)).toHaveLength(OUTBOX_BATCH + 9);
  }
});

it('while graphile-worker cannot take jobs, the rows wait and are moved without another kick once it can', async () => {
  const logs = new LogCapture();
  const dispatcher = new OutboxDispatcher(env.deps.db, createLogger('warn', logs));
  await env.sql`alter function graphile_worker.add_jobs(graphile_worker.job_spec[], boolean) rename to add_jobs_away`;
  try {
    await env.deps.db.insert(jobOutbox).values({ task: 'outbox_test_c', payload: {} });
    dispatcher.kick();
    await dispatcher.idle();
    expect(logs.text()).toContain('job outbox not dispatched; will retry');
    const [waiting] = await env.sql`select count(*)::int as n from job_outbox where task = 'outbox_test_c'`;
    expect(waiting!.n).toBe(1);
  } finally {
    await env.sql`alter function graphile_worker.add_jobs_away(graphile_worker.job_spec[], boolean) rename to add_jobs`;
  }
  await until(async () => (await jobsFor('outbox_test_c')).length === 1);
  dispatcher.close();
});
